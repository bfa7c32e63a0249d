#ifndef SYNOD_CORE_DETERMINISTIC_SQLITE_H_
#define SYNOD_CORE_DETERMINISTIC_SQLITE_H_

// The two sources of non-determinism that SQL can reach, replaced by values the log decides:
// the current time ('now', CURRENT_TIMESTAMP, ...) through a VFS, and random()/randomblob()
// through functions that override the built-in ones.

#include <sqlite3.h>

#include <cstdint>
#include <functional>

namespace synod {

// A copy of SQLite's default VFS whose current time comes from a callback instead of the
// system clock. Registered under a name unique to this object for as long as it lives.
// Everything but the time (files, locks, randomness for temporary names) is the default VFS.
class TimeSourceVfs {
 public:
  // `now_unix_ms()` is called whenever SQLite asks the VFS for the current time.
  explicit TimeSourceVfs(std::function<int64_t()> now_unix_ms);
  // REQUIRES: no open connection uses this VFS.
  ~TimeSourceVfs();
  TimeSourceVfs(const TimeSourceVfs&) = delete;
  TimeSourceVfs& operator=(const TimeSourceVfs&) = delete;

  // The name to pass to sqlite3_open_v2.
  const char* name() const { return registered_.name; }

 private:
  // What SQLite holds: the VFS it calls back with, and the way back to this object. Kept
  // standard-layout so that the sqlite3_vfs* SQLite passes converts to a Registered*.
  // pAppData stays the default VFS's own (the unix VFS needs it).
  struct Registered {
    sqlite3_vfs vfs;
    TimeSourceVfs* owner;
    char name[40];
  };
  static int CurrentTime(sqlite3_vfs* vfs, double* julian_days);
  static int CurrentTimeInt64(sqlite3_vfs* vfs, sqlite3_int64* julian_ms);

  std::function<int64_t()> now_unix_ms_;
  Registered registered_;
};

// The current time of the VFS named `vfs_name` (which must be registered), in milliseconds
// since the Unix epoch.
int64_t VfsNowUnixMs(const char* vfs_name);

// random() and randomblob(N) for the request being applied: a splitmix64 stream seeded from
// (slot, request index), so the k-th call in a request gives the same value on every replica.
class RequestRandom {
 public:
  // Starts the stream for the request at `request_index` of the entry at `slot`.
  void Reset(uint64_t slot, uint64_t request_index);
  uint64_t Next();
  // Overrides random() and randomblob() on `db` with this stream. REQUIRES: this outlives db.
  void InstallOn(sqlite3* db);

 private:
  uint64_t state_ = 0;
};

}  // namespace synod

#endif  // SYNOD_CORE_DETERMINISTIC_SQLITE_H_

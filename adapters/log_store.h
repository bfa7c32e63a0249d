#ifndef SYNOD_ADAPTERS_LOG_STORE_H_
#define SYNOD_ADAPTERS_LOG_STORE_H_

// The server's durable log: one file, `<dir>/log`, in the format of core/log_codec.h and
// recovered by the same rules as the simulator's disk (sim/world.cc, SimDisk):
// - Open() replays the log. A torn tail (a write a crash cut short) is truncated away and
//   reported; a corrupt record followed by valid ones fails Open() with DataLoss, and the
//   replica must refuse to start (docs/simulation.md, "Storage faults").
// - Append() buffers a Ready's records in memory; Sync() writes them, fdatasyncs the file,
//   then writes a sync mark (made durable by the next Sync()), so that every synced record
//   has a successor and a corrupt synced record is never mistaken for a torn tail.
// - Group commit is the caller's choice: Append() every Ready of a drained batch, then call
//   Sync() once if any of them had must_sync, before sending their messages.
// - Compaction rewrites the log from the state it holds: Sync(), ReadBack(), Rewrite() (as
//   the simulator does on Ready::compacted_through). The rewrite goes to `<dir>/log.tmp` and
//   is renamed over `<dir>/log`, so a crash leaves either the old log or the new one.
//
// Errors: every OS failure is returned as a Status carrying the errno text. A failed write
// or fsync cannot be retried safely (the kernel may have dropped the dirty pages), so after
// any error the store is failed: every later call returns that same error, and the caller
// must stop the replica. A restart recovers from what reached the disk.
//
// A data directory is used by one process at a time: Open() takes an exclusive lock on
// `<dir>/LOCK` (flock) that the store holds until it is destroyed.
//
// Not thread-safe: one thread uses a LogStore at a time.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/replica.h"

namespace synod {

struct LogStoreOptions {
  // false skips every fsync and fdatasync (the server's --fsync=false). The bytes still
  // reach the kernel at each Sync(), so a process crash loses nothing that Sync() returned
  // for, but a power failure or kernel crash may lose or tear any recent write: the replica
  // may then forget promises and accepted values it acknowledged. For tests and benchmarks.
  bool fsync = true;
  // Called right after each fdatasync of the log, with the log's size at that moment: what
  // a power failure then would leave. For tests of what Sync() makes durable.
  std::function<void(uint64_t log_bytes)> after_log_fsync;
};

class LogStore {
 public:
  // Opens `<dir>/log`, creating `dir` and the log if missing, and recovers it. A torn tail
  // is truncated (and the truncation made durable); see truncated_tail_bytes().
  // Errors: DataLoss when the log is corrupt (the replica must refuse to start);
  // FailedPrecondition when another process holds the directory; the OS error otherwise.
  static absl::StatusOr<std::unique_ptr<LogStore>> Open(std::string dir,
                                                        LogStoreOptions options = {});

  // Closes the files and releases the lock. Records appended since the last Sync() are
  // dropped, as in a crash.
  ~LogStore();
  LogStore(const LogStore&) = delete;
  LogStore& operator=(const LogStore&) = delete;

  // The state Open() recovered. applied_index is 0: the caller sets it from the state
  // machine's revision. The caller may move the state out (into its Replica); the store
  // never reads it.
  PersistedState& recovered() { return recovered_; }
  // The image of the recovered snapshot when the log is of a version that kept images in
  // the log (empty otherwise): the caller moves it to its snapshot store, then Rewrite()s.
  std::string& legacy_snapshot_data() { return legacy_snapshot_data_; }
  // How many bytes of torn tail Open() truncated (0: the log ended cleanly). The caller
  // logs a warning when it is not 0.
  uint64_t truncated_tail_bytes() const { return truncated_tail_bytes_; }

  // Buffers the records of `ready` (hard state, snapshot, entries, compaction). Nothing
  // reaches the file before the next Sync().
  void Append(const Ready& ready);
  // The same, for records already framed (EncodeReady).
  void AppendFramed(std::string framed);

  // Writes every buffered record, makes it durable (unless options.fsync is false), then
  // writes a sync mark. Returns at once when nothing was appended since the last Sync().
  absl::Status Sync();

  // Recovers the state the log file holds now (applied_index 0), e.g. to Rewrite() it
  // compactly after a Ready with compacted_through > 0.
  // REQUIRES: nothing was appended since the last Sync().
  absl::StatusOr<PersistedState> ReadBack();

  // Replaces the log with a compact one holding exactly `state` (hard state, snapshot,
  // entries), atomically: write `<dir>/log.tmp`, fsync it, rename it over `<dir>/log`,
  // fsync `dir`. applied_index is not stored.
  // REQUIRES: nothing was appended since the last Sync().
  absl::Status Rewrite(const PersistedState& state);

 private:
  LogStore(std::string dir, LogStoreOptions options, int lock_fd);

  // Recovers `log_path_` into recovered_ and truncates a torn tail.
  absl::Status Recover();
  // Makes `status` the store's failure (see "Errors" above) and returns it.
  absl::Status Fail(absl::Status status);

  const std::string dir_;
  const std::string log_path_;
  const LogStoreOptions options_;
  const int lock_fd_;
  int log_fd_ = -1;  // opened with O_APPEND: every write goes to the end
  absl::Status failure_;

  PersistedState recovered_;
  std::string legacy_snapshot_data_;
  uint64_t truncated_tail_bytes_ = 0;

  std::string pending_;   // framed records appended since the last Sync()
  uint64_t records_ = 0;  // records in the file, pending ones included
  uint64_t bytes_ = 0;    // the file's size, pending records included
};

}  // namespace synod

#endif  // SYNOD_ADAPTERS_LOG_STORE_H_

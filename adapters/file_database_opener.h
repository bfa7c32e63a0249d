#ifndef SYNOD_ADAPTERS_FILE_DATABASE_OPENER_H_
#define SYNOD_ADAPTERS_FILE_DATABASE_OPENER_H_

// The server's SQLite databases: one file per database, `<data_dir>/db/<file_id>.sqlite3`,
// in WAL mode, with its `-wal` and `-shm` files beside it.
//
// File ids are a hash of a database's name or "system" (core/state_machine.h); anything
// but [A-Za-z0-9_-]{1,80} is refused, so no id ever becomes a path outside `db/`.
//
// Crash safety of Remove(): the main file is moved out of its name (durably) first, into
// `db/.trash/` where a thread deletes it (adapters/trash.h), and that is the moment the
// database is gone (List() sees main files only). A `-wal` or `-journal` file a
// crash leaves after that is never replayed into a new database of the same id: SQLite
// deletes either when it finds it beside an empty database file (tested here).
//
// Durability: the replica's log makes a write durable, not the database files. They run
// with synchronous=NORMAL (OFF without fsync): a commit reaches the OS at once and the disk
// at the next WAL checkpoint, so a process crash loses nothing, but a power failure or a
// kernel crash may lose the last commits of each file, in any order across files. The log
// always holds what rebuilds them: its latest snapshot and every entry after it. So the
// machine's boot id is kept in `<data_dir>/boot_id`, and when Create() finds that the
// machine has restarted since the databases were last written, it removes them all; the
// replica then restores them from the log (discarded_after_restart()). A clean reboot
// rebuilds too: the price is one snapshot restore and a replay of at most
// --snapshot-every entries.
//
// Not thread-safe: one thread uses an opener at a time (the handles it returns may be used
// from another thread, one at a time: they are opened with SQLITE_OPEN_NOMUTEX).

#include <sqlite3.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "adapters/trash.h"
#include "core/state_machine.h"

namespace synod {

class FileDatabaseOpener : public DatabaseOpener {
 public:
  // How long a connection waits for another one's lock before failing SQLITE_BUSY.
  static constexpr int kBusyTimeoutMs = 5000;
  // How much of a database file a read-only connection maps into memory (PRAGMA mmap_size);
  // pages beyond it are read with pread. Mapped pages that were touched count in the
  // process's RSS (they are the kernel's page cache, shared, not the process's own memory).
  static constexpr int64_t kReaderMapBytes = 32 << 20;

  // Creates `<data_dir>/db` if missing, and empties it when the machine restarted since
  // it was last written (see "Durability" above; `boot_id_source` is where the machine's
  // boot id is read, a file of tests' own in tests). With `fsync` false, databases use
  // PRAGMA synchronous=OFF and directory changes are not fsynced.
  static absl::StatusOr<std::unique_ptr<FileDatabaseOpener>> Create(
      std::string data_dir, bool fsync = true,
      std::string boot_id_source = "/proc/sys/kernel/random/boot_id");

  // Whether Create() removed the databases because the machine restarted.
  bool discarded_after_restart() const { return discarded_after_restart_; }

  // Opens `<data_dir>/db/<file_id>.sqlite3` with the VFS named `vfs_name` (nullptr: SQLite's
  // default), creating it empty with 4096-byte pages if absent, and sets journal_mode=WAL,
  // synchronous=NORMAL (OFF without fsync) and a busy timeout of kBusyTimeoutMs.
  // Errors: InvalidArgument for a bad file id or an unknown VFS; Unavailable when SQLite
  // cannot open the file or set it up (its message says why).
  absl::StatusOr<sqlite3*> Open(std::string_view file_id, const char* vfs_name) override;

  // Opens the database read-only (never creating it: NotFound if absent), for queries on
  // another thread while the state machine's own connection writes (WAL mode), mapping the
  // first kReaderMapBytes of the file.
  absl::StatusOr<sqlite3*> OpenReadOnly(std::string_view file_id, const char* vfs_name) override;

  // Deletes the database and its -wal, -shm and -journal files (OK if absent), durably,
  // after any checkpoint of it under way (the checkpointer's connection is to that file: it
  // must not go on into a new database created at the same path).
  // REQUIRES: no handle to it is open but readers' (which go on reading the deleted file).
  absl::Status Remove(std::string_view file_id) override;
  bool AdoptsFiles() const override { return true; }
  // Renames `path` to the database's file, with the directory synced (the file's contents
  // are the caller's to have made durable, or to rebuild after a machine restart, as every
  // database's: see the header).
  absl::Status Adopt(std::string_view file_id, const std::string& path) override;
  bool ReadersKeepTransactions() const override { return true; }  // WAL: readers block no one

  // The ids of the databases present, sorted. Stops the process (SYNOD_CHECK) when the
  // directory cannot be read: the state machine cannot go on without knowing its files.
  std::vector<std::string> List() override;

  // Whether `file_id` is a well-formed id: [A-Za-z0-9_-]{1,80}.
  static bool IsValidFileId(std::string_view file_id);

  // WAL checkpoints. A connection Open() returns never checkpoints in its commits (SQLite's
  // automatic checkpoint would copy pages and fsync the database file on the thread that
  // commits: the event loop). Once a commit leaves kCheckpointFrames or more frames in a
  // WAL, a checkpointer thread checkpoints that database (PASSIVE: the writer goes on), on
  // its own connection; SQLite starts the WAL over at the first commit after a checkpoint
  // that copied every frame. Only a WAL that reaches kCommitCheckpointFrames, because the
  // checkpointer cannot keep up with the commits (kCommitCheckpointFrames or more frames it
  // has not copied), is checkpointed in the commit itself.
  static constexpr int kCheckpointFrames = 1000;  // SQLite's own default
  static constexpr int kCommitCheckpointFrames = 16 * kCheckpointFrames;
  ~FileDatabaseOpener() override;
  uint64_t checkpoints() const { return checkpoints_.load(); }
  uint64_t commit_checkpoints() const { return commit_checkpoints_.load(); }

 private:
  FileDatabaseOpener(std::string db_dir, bool fsync);
  struct WalHook {
    FileDatabaseOpener* opener;
    std::string file_id;
    // Frames of the WAL the checkpointer last found copied into the database file.
    std::atomic<int> backfilled{0};
  };
  static int OnWalCommit(void* hook, sqlite3* db, const char* name, int frames);
  void RunCheckpointer();

  std::string PathOf(std::string_view file_id) const;
  // Unlinks `path`; a missing file is not an error.
  static absl::Status RemoveFile(const std::string& path);
  absl::Status SyncDbDirectory() const;

  const std::string db_dir_;
  const bool fsync_;
  std::unique_ptr<Trash> trash_;  // db/.trash, set by Create
  bool discarded_after_restart_ = false;
  // By file id; entries are never erased (their addresses are the hooks' contexts). Guarded
  // by mu_ (the checkpointer reads it).
  std::map<std::string, std::unique_ptr<WalHook>, std::less<>> wal_hooks_;
  std::mutex mu_;
  std::condition_variable wanted_cv_;
  std::set<std::string> checkpoints_wanted_;  // guarded by mu_
  std::string checkpointing_;                 // the file being checkpointed; guarded by mu_
  std::condition_variable checkpointed_cv_;   // checkpointing_ changed
  bool stopping_ = false;                     // guarded by mu_
  std::atomic<uint64_t> checkpoints_{0};
  std::atomic<uint64_t> commit_checkpoints_{0};
  std::thread checkpointer_;
};

}  // namespace synod

#endif  // SYNOD_ADAPTERS_FILE_DATABASE_OPENER_H_

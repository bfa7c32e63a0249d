#ifndef SYNOD_ADAPTERS_LOG_STORE_H_
#define SYNOD_ADAPTERS_LOG_STORE_H_

// The server's durable log: a directory of segment files, `<dir>/logs/<number>.seg`, each in
// the format of core/log_codec.h, replayed in order by the same rules as the simulator's disk
// (sim/sim_disk.h, SimDisk):
// - Open() replays every segment. A torn tail of the last segment (a write a crash cut
//   short) is truncated away and reported; a corrupt record followed by valid ones, or any
//   damage in a segment that is not the last, fails Open() with DataLoss, and the replica
//   must refuse to start (docs/simulation.md, "Storage faults").
// - Append() buffers a Ready's records in memory; Sync() writes them and a sync mark to the
//   last segment (or to a new one, see below) and fdatasyncs it, so that every synced record has a
//   successor and a corrupt synced record is never mistaken for a torn tail.
// - Group commit is the caller's choice: Append() every Ready of a drained batch, then call
//   Sync() once if any of them had must_sync, before sending their messages.
// - A new segment is started when the last one reaches options.segment_bytes, and at each
//   compaction. It begins with the current hard state and snapshot metadata, so the state
//   the segments before it held beyond their entries is repeated in it.
// - Compaction (Compact(), after the Sync() that made the snapshot durable) starts a new
//   segment and deletes the oldest segments whose every entry the snapshot covers: nothing
//   is read back or rewritten. A crash leaves the old segments or fewer of them, each
//   replaying to the same state.
// - A data directory of a version that kept the log in one file, `<dir>/log`, is moved into
//   `<dir>/logs/` as its first segment at Open(). Once the segments are durable, `<dir>/log`
//   holds a record that such a version refuses as corruption: started on this directory, it
//   stops rather than begin as a new acceptor without its promises.
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
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/replica.h"

namespace synod {

// What a batch of framed records changes that the store itself must know: a new segment
// repeats the latest hard state and snapshot metadata, and compaction deletes a segment only
// once every entry in it is covered.
struct RecordsSummary {
  std::optional<HardState> hard_state;
  std::optional<SnapshotMeta> snapshot;
  uint64_t max_slot = 0;  // of its entries (0: none)
  static RecordsSummary Of(const Ready& ready);
};

struct LogStoreOptions {
  // false skips every fsync and fdatasync (the server's --fsync=false). The bytes still
  // reach the kernel at each Sync(), so a process crash loses nothing that Sync() returned
  // for, but a power failure or kernel crash may lose or tear any recent write: the replica
  // may then forget promises and accepted values it acknowledged. For tests and benchmarks.
  bool fsync = true;
  // Called right after each fdatasync of the log, with the log's size at that moment: what
  // a power failure then would leave. For tests of what Sync() makes durable.
  std::function<void(uint64_t log_bytes)> after_log_fsync;
  // A new segment is started at the first Sync() after the last one has reached this size.
  uint64_t segment_bytes = 64 << 20;
};

class LogStore {
 public:
  // Opens the log in `dir`, creating `dir` and the log if missing, and recovers it. A torn
  // tail is truncated (and the truncation made durable); see truncated_tail_bytes().
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
  // The same, for records already framed (EncodeReady), with what they change.
  void AppendFramed(std::string framed, RecordsSummary summary);

  // Writes every buffered record and a sync mark, and makes them durable (unless
  // options.fsync is false). Returns at once when nothing was appended since the last Sync().
  absl::Status Sync();

  // Drops what a durable snapshot at `through` or later covers: starts a new segment (synced,
  // with its directory entry) and deletes the oldest segments whose entries are all at or
  // below `through`. REQUIRES: nothing was appended since the last Sync(), and the snapshot
  // record is durable.
  absl::Status Compact(uint64_t through);

  // Recovers the state the log holds now (applied_index 0), reading every segment.
  // REQUIRES: nothing was appended since the last Sync().
  absl::StatusOr<PersistedState> ReadBack();

  // Replaces the log with one holding exactly `state` (hard state, snapshot, entries): a new
  // segment written and synced, then every older one deleted. Not atomic: a crash may leave
  // older segments before the new one, which replay first, so `state` must hold at least what
  // they hold (the state recovered, say, with an image moved out). applied_index is not
  // stored. REQUIRES: nothing was appended since the last Sync().
  absl::Status Rewrite(const PersistedState& state);

  // The segment files, oldest first (tests, status).
  std::vector<std::string> SegmentPaths() const;

 private:
  struct SegmentFile {
    uint64_t number = 0;
    uint64_t max_slot = 0;
  };

  LogStore(std::string dir, LogStoreOptions options, int lock_fd);

  // Moves a one-file log of an earlier version into the segment directory.
  absl::Status MigrateOneFileLog();
  // Leaves in `<dir>/log` what a version that kept its log there refuses to start from.
  absl::Status WriteTombstone();
  // Replays every segment into recovered_ and truncates a torn tail of the last.
  absl::Status Recover();
  // Creates segment `number` holding the current hard state and snapshot, then `records`
  // (framed, with `summary`), and a sync mark; syncs it and the directory; makes it the
  // segment appended to.
  absl::Status StartSegment(std::string records, const RecordsSummary& summary);
  // Deletes the oldest segments (never the last) whose entries are all at or below
  // `through`.
  absl::Status DeleteSegmentsThrough(uint64_t through);
  std::string PathOf(uint64_t number) const;
  // Makes `status` the store's failure (see "Errors" above) and returns it.
  absl::Status Fail(absl::Status status);
  void Note(const RecordsSummary& summary);

  const std::string dir_;
  const std::string segments_dir_;
  const LogStoreOptions options_;
  const int lock_fd_;
  int log_fd_ = -1;  // the last segment, opened with O_APPEND: every write goes to the end
  absl::Status failure_;

  PersistedState recovered_;
  std::string legacy_snapshot_data_;
  uint64_t truncated_tail_bytes_ = 0;

  std::vector<SegmentFile> segments_;  // oldest first; the last is appended to
  // The latest hard state and snapshot metadata written (a new segment starts with them).
  std::optional<HardState> hard_state_;
  SnapshotMeta snapshot_;
  std::string pending_;  // framed records appended since the last Sync()
  RecordsSummary pending_summary_;
  uint64_t records_ = 0;  // records in the last segment, pending ones included
  uint64_t bytes_ = 0;    // the last segment's size, pending records included
};

}  // namespace synod

#endif  // SYNOD_ADAPTERS_LOG_STORE_H_

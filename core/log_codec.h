#ifndef SYNOD_CORE_LOG_CODEC_H_
#define SYNOD_CORE_LOG_CODEC_H_

// The durable log's format, shared by the server's log store and the simulator's disk so
// that both recover by the same rules. Pure functions: the caller does the I/O.
//
// A log is a sequence of records, each framed as
//   [u32 payload length, little endian][u64 StableHash of the payload][payload]
// where the payload is a serialized StorageRecord. The host ends each batch of records with
// a SyncMark record, written before the fsync that makes the batch durable: the last record
// of a log whose writes all reached the disk is a mark.
//
// Recovery rules (see docs/simulation.md, "Storage faults"):
// - A record that is damaged (its checksum fails, it does not parse, or its length runs
//   past the end of the log) is corruption if a synced batch lies beyond it: the next
//   record is valid, or a genuine mark (one that sits at the offset it names) follows
//   anywhere after it. Data that was durable and acknowledged is then gone; the replica must
//   not vote on what it lost, so recovery fails with DataLoss and the replica refuses to
//   start. A damaged length field is caught this way too: it can make a record look cut
//   short, or hide where the next record starts.
// - Otherwise the damage is a torn tail: a write the crash interrupted, never synced (every
//   synced batch ends with its mark). It is dropped, and the host truncates it.

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/replica.h"
#include "core/synod.pb.h"

namespace synod {

// The records to append for `ready` (hard state, entries, snapshot, compaction), framed.
std::string EncodeReady(const Ready& ready);

// What a host persists when it snapshots its state machine (the image already durable in
// its snapshot store): the snapshot's metadata, and the compaction of the log entries it
// covers. (Then Replica::Compact.)
Ready SnapshotReady(const SnapshotMeta& meta);

// A framed SyncMark, to end a batch before its fsync: `records` records precede it, and the
// mark's frame starts at byte `offset` of the log.
std::string EncodeSyncMark(uint64_t records, uint64_t offset);

std::string EncodeRecord(const StorageRecord& record);

// Where each frame of `framed` (whole frames, as EncodeReady gives them) starts.
std::vector<size_t> FrameOffsets(std::string_view framed);

struct RecoveredLog {
  PersistedState state;  // applied_index is left 0: the state machine knows its revision
  // The image of state.snapshot_meta when the log is of a version that kept images in the
  // log (empty otherwise): the host moves it to its snapshot store.
  std::string legacy_snapshot_data;
  uint64_t valid_bytes = 0;  // the log's valid prefix; the host truncates anything after it
  uint64_t records = 0;
  bool torn_tail = false;
};

// Replays a log. DataLoss when a record in the middle is corrupt (see above).
absl::StatusOr<RecoveredLog> RecoverLog(std::string_view log);

// Replays a log kept in segments (files written one after another, each framed and marked
// as above on its own: a mark's offset and count are within its segment), one segment at a
// time, so that only one segment is in memory at once.
class LogReplay {
 public:
  struct Segment {
    uint64_t valid_bytes = 0;  // the segment's valid prefix
    uint64_t records = 0;
    bool torn_tail = false;
    uint64_t max_slot = 0;  // the highest slot of an entry record in it (0: none)
  };
  // Replays the records of the next segment. `more_follow`: a later segment exists. A
  // segment is complete (its last batch synced) before the next one is started, so damage
  // anywhere in it is then corruption (DataLoss), never a torn tail.
  absl::StatusOr<Segment> Add(std::string_view segment, bool more_follow);
  // The state the segments added hold (valid_bytes, records and torn_tail are left 0: they
  // are each segment's).
  RecoveredLog Finish() &&;

 private:
  PersistedState state_;
  std::map<uint64_t, LogEntry> entries_;
  std::string legacy_snapshot_data_;
};

}  // namespace synod

#endif  // SYNOD_CORE_LOG_CODEC_H_

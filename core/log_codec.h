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
// - A record whose frame is cut short at the end of the log is a torn tail: a write the
//   crash interrupted, never synced. It is dropped, and the host truncates it.
// - A record whose checksum fails, followed by any valid record, is corruption: data that
//   was durable and acknowledged is gone. The replica must not vote on what it lost, so
//   recovery fails with DataLoss and the replica refuses to start.
// - A bad checksum on the very last record is treated as a torn tail too. Since every
//   synced batch ends with its mark, that record is a mark or a write that was never synced
//   (so never acknowledged), not state the replica promised on.

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "core/replica.h"
#include "core/synod.pb.h"

namespace synod {

// The records to append for `ready` (hard state, entries, snapshot, compaction), framed.
std::string EncodeReady(const Ready& ready);

// What a host persists when it snapshots its state machine at revision `index`: the
// snapshot, and the compaction of the log entries it covers. (Then Replica::Compact.)
Ready SnapshotReady(uint64_t index, std::string data);

// A framed SyncMark, to end a batch before its fsync; `records` records precede it.
std::string EncodeSyncMark(uint64_t records);

std::string EncodeRecord(const StorageRecord& record);

struct RecoveredLog {
  PersistedState state;      // applied_index is left 0: the state machine knows its revision
  uint64_t valid_bytes = 0;  // the log's valid prefix; the host truncates anything after it
  uint64_t records = 0;
  bool torn_tail = false;
};

// Replays a log. DataLoss when a record in the middle is corrupt (see above).
absl::StatusOr<RecoveredLog> RecoverLog(std::string_view log);

}  // namespace synod

#endif  // SYNOD_CORE_LOG_CODEC_H_

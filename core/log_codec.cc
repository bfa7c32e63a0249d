#include "core/log_codec.h"

#include <algorithm>
#include <map>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/stable_hash.h"

namespace synod {
namespace {

constexpr size_t kFrameHeaderBytes = 12;

uint64_t Checksum(std::string_view payload) {
  StableHash h;
  h.Add(payload);
  return h.value();
}

void PutFixed(std::string* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>(v >> (8 * i)));
}

uint64_t GetFixed(std::string_view in, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i)
    v |= static_cast<uint64_t>(static_cast<unsigned char>(in[i])) << (8 * i);
  return v;
}

// Outcome of reading one frame at the front of `log`.
enum class Frame { kValid, kTruncated, kBadChecksum };

Frame ReadFrame(std::string_view log, std::string_view* payload, size_t* frame_bytes) {
  if (log.size() < kFrameHeaderBytes) return Frame::kTruncated;
  uint64_t length = GetFixed(log, 4);
  if (log.size() - kFrameHeaderBytes < length) return Frame::kTruncated;
  *payload = log.substr(kFrameHeaderBytes, length);
  *frame_bytes = kFrameHeaderBytes + length;
  return Checksum(*payload) == GetFixed(log.substr(4), 8) ? Frame::kValid : Frame::kBadChecksum;
}

// A mark's payload is two small varints and their tags.
constexpr size_t kMaxSyncMarkPayloadBytes = 32;

// Whether a genuine sync mark (a valid frame holding a mark that names its own offset)
// starts anywhere in log[from, end). Only short frames are hashed, so this costs a few dozen
// bytes of hashing per byte scanned, and it runs only when recovery meets damage.
bool GenuineSyncMarkAfter(std::string_view log, size_t from) {
  for (size_t at = from; at + kFrameHeaderBytes <= log.size(); ++at) {
    uint64_t length = GetFixed(log.substr(at), 4);
    if (length == 0 || length > kMaxSyncMarkPayloadBytes) continue;
    std::string_view payload;
    size_t frame_bytes = 0;
    if (ReadFrame(log.substr(at), &payload, &frame_bytes) != Frame::kValid) continue;
    StorageRecord record;
    if (record.ParseFromArray(payload.data(), static_cast<int>(payload.size())) &&
        record.has_sync_mark() && record.sync_mark().offset() == at) {
      return true;
    }
  }
  return false;
}

}  // namespace

std::string EncodeRecord(const StorageRecord& record) {
  std::string payload;
  SYNOD_CHECK(record.SerializeToString(&payload));
  SYNOD_CHECK_LE(payload.size(), 0xffffffffu);
  std::string out;
  out.reserve(kFrameHeaderBytes + payload.size());
  PutFixed(&out, payload.size(), 4);
  PutFixed(&out, Checksum(payload), 8);
  out += payload;
  return out;
}

std::vector<size_t> FrameOffsets(std::string_view framed) {
  std::vector<size_t> offsets;
  size_t offset = 0;
  while (offset < framed.size()) {
    SYNOD_CHECK_LE(offset + kFrameHeaderBytes, framed.size());
    offsets.push_back(offset);
    offset += kFrameHeaderBytes + GetFixed(framed.substr(offset), 4);
  }
  SYNOD_CHECK_EQ(offset, framed.size());
  return offsets;
}

std::string EncodeReady(const Ready& ready) {
  std::string out;
  if (ready.hard_state) {
    StorageRecord r;
    *r.mutable_hard_state() = *ready.hard_state;
    out += EncodeRecord(r);
  }
  if (ready.snapshot) {
    StorageRecord r;
    *r.mutable_snapshot() = ready.snapshot->meta;  // the image is in the snapshot store
    out += EncodeRecord(r);
  }
  for (const LogEntry& e : ready.entries) {
    StorageRecord r;
    *r.mutable_entry() = e;
    out += EncodeRecord(r);
  }
  if (ready.compacted_through > 0) {
    StorageRecord r;
    r.set_compacted_through(ready.compacted_through);
    out += EncodeRecord(r);
  }
  return out;
}

Ready SnapshotReady(const SnapshotMeta& meta) {
  Ready r;
  r.snapshot = SnapshotToInstall{meta};
  r.compacted_through = meta.index();
  return r;
}

std::string EncodeSyncMark(uint64_t records, uint64_t offset) {
  StorageRecord r;
  r.mutable_sync_mark()->set_records(records);
  r.mutable_sync_mark()->set_offset(offset);
  return EncodeRecord(r);
}

absl::StatusOr<LogReplay::Segment> LogReplay::Add(std::string_view log, bool more_follow) {
  Segment out;
  uint64_t offset = 0;
  while (offset < log.size()) {
    std::string_view payload;
    size_t frame_bytes = 0;
    Frame frame = ReadFrame(log.substr(offset), &payload, &frame_bytes);
    StorageRecord record;
    if (frame != Frame::kValid ||
        !record.ParseFromArray(payload.data(), static_cast<int>(payload.size()))) {
      // Corruption if a synced batch lies beyond the damage; a torn last write otherwise.
      bool valid_next = false;
      if (frame != Frame::kTruncated) {
        std::string_view rest = log.substr(offset + frame_bytes);
        std::string_view next_payload;
        size_t next_bytes = 0;
        valid_next = !rest.empty() && ReadFrame(rest, &next_payload, &next_bytes) == Frame::kValid;
      }
      if (more_follow || valid_next || GenuineSyncMarkAfter(log, offset + 1)) {
        return absl::DataLossError(absl::StrCat("log record ", out.records, " at byte ", offset,
                                                " is corrupt and synced records follow it"));
      }
      out.torn_tail = true;
      break;
    }
    switch (record.kind_case()) {
      case StorageRecord::kHardState:
        state_.hard_state = record.hard_state();
        break;
      case StorageRecord::kEntry:
        out.max_slot = std::max(out.max_slot, record.entry().slot());
        entries_[record.entry().slot()] = record.entry();
        break;
      case StorageRecord::kSnapshot:
        state_.snapshot_meta = record.snapshot();
        // A log of an older version holds the image in the record; it moves to the host's
        // snapshot store at start.
        legacy_snapshot_data_ = record.snapshot_data();
        if (!legacy_snapshot_data_.empty() &&
            legacy_snapshot_data_.size() != state_.snapshot_meta.size_bytes()) {
          return absl::DataLossError(
              absl::StrCat("snapshot record ", out.records, " does not match its declared size"));
        }
        entries_.erase(entries_.begin(), entries_.upper_bound(record.snapshot().index()));
        break;
      case StorageRecord::kCompactedThrough:
        entries_.erase(entries_.begin(), entries_.upper_bound(record.compacted_through()));
        break;
      case StorageRecord::kSyncMark:
      case StorageRecord::KIND_NOT_SET:
        break;
    }
    offset += frame_bytes;
    ++out.records;
  }
  out.valid_bytes = offset;
  return out;
}

RecoveredLog LogReplay::Finish() && {
  RecoveredLog out;
  out.state = std::move(state_);
  out.legacy_snapshot_data = std::move(legacy_snapshot_data_);
  for (auto& [slot, e] : entries_) out.state.entries.push_back(std::move(e));
  return out;
}

absl::StatusOr<RecoveredLog> RecoverLog(std::string_view log) {
  LogReplay replay;
  absl::StatusOr<LogReplay::Segment> segment = replay.Add(log, /*more_follow=*/false);
  if (!segment.ok()) return segment.status();
  RecoveredLog out = std::move(replay).Finish();
  out.valid_bytes = segment->valid_bytes;
  out.records = segment->records;
  out.torn_tail = segment->torn_tail;
  return out;
}

}  // namespace synod

#ifndef SYNOD_SIM_SIM_DISK_H_
#define SYNOD_SIM_SIM_DISK_H_

// The simulator's disk: a log image with an fsync boundary and fault injection (used by
// sim/world.cc).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/log_codec.h"
#include "core/replica.h"
#include "sim/checkers.h"
#include "sim/prng.h"

namespace synod::sim::internal {

// The log in segments, by the server's rules (adapters/log_store.h): a new segment starts
// once the last one holds kSegmentBytes (small here, so that runs cross many segments) and
// at each compaction, beginning with the current promise and snapshot metadata; compaction
// deletes the oldest segments whose entries the snapshot covers; only the last segment may
// end in a torn write, and recovery replays the segments in order (LogReplay).
class SimDisk {
 public:
  static constexpr size_t kSegmentBytes = 4096;

  SimDisk() : segments_(1) {}

  // Appends what `ready` persists, unsynced.
  void Write(const Ready& ready) {
    std::string bytes = EncodeReady(ready);
    if (bytes.empty()) return;
    UnsyncedWrite w{std::move(bytes), ready.hard_state, {}, std::nullopt, 0};
    for (const LogEntry& e : ready.entries) {
      // One write may accept a slot twice (at a ballot, then at a higher one, when the
      // driver merged two Readies): recovery keeps the later record, and so does this.
      w.entries[e.slot()] = e.ballot();
      w.max_slot = std::max(w.max_slot, e.slot());
    }
    if (ready.snapshot) w.snapshot = ready.snapshot->meta;
    unsynced_.push_back(std::move(w));
  }
  void Sync() {
    if (unsynced_.empty()) return;
    if (segments_.back().bytes.size() >= kSegmentBytes) StartSegment();
    Segment& last = segments_.back();
    for (UnsyncedWrite& w : unsynced_) {
      AppendRecords(last, w.bytes);
      last.max_slot = std::max(last.max_slot, w.max_slot);
      if (w.hard_state) {
        RaiseDurablePromise(w.hard_state->promised());
        hard_state_ = w.hard_state;
      }
      if (w.snapshot) {
        snapshot_ = *w.snapshot;
        durable_state_.snapshot_index =
            std::max(durable_state_.snapshot_index, w.snapshot->index());
      }
      for (const auto& [slot, ballot] : w.entries) {
        durable_state_.accepted[slot] = ballot;
        RaiseDurablePromise(ballot);
      }
    }
    Mark(last);
    unsynced_.clear();
  }
  // A crash: every unsynced write is lost; the first may survive torn (recovery drops it),
  // in the segment the next sync would have written.
  void Crash(Prng& p, bool tear) {
    if (tear && !unsynced_.empty() && unsynced_.front().bytes.size() > 1) {
      const std::string& first = unsynced_.front().bytes;
      if (segments_.back().bytes.size() >= kSegmentBytes) {
        // A new segment, cut short: any prefix of its header and first write, empty too.
        const std::string whole = HeaderBytes() + first;
        segments_.emplace_back();
        segments_.back().bytes = whole.substr(0, p.Range(0, whole.size() - 1));
      } else {
        segments_.back().bytes += first.substr(0, p.Range(1, first.size() - 1));
      }
    }
    unsynced_.clear();
  }
  // Flips a bit anywhere in a synced record of any segment, its frame header and the last
  // record included (found later by its checksum, by the synced mark beyond it, or by the
  // segments after it).
  void Corrupt(Prng& p) {
    std::vector<Segment*> written;
    for (Segment& s : segments_) {
      if (!s.record_offsets.empty()) written.push_back(&s);
    }
    if (written.empty()) return;
    Segment& s = *written[static_cast<size_t>(p.Range(0, written.size() - 1))];
    size_t i = static_cast<size_t>(p.Range(0, s.record_offsets.size() - 1));
    size_t begin = s.record_offsets[i];
    size_t end = i + 1 < s.record_offsets.size() ? s.record_offsets[i + 1] : s.synced_bytes;
    if (begin >= end) return;
    size_t at = static_cast<size_t>(p.Range(begin, end - 1));
    s.bytes[at] = static_cast<char>(s.bytes[at] ^ (1 << p.Range(0, 7)));
  }
  // What the segments hold, replayed in order; DataLoss as the server's log store gives it.
  absl::StatusOr<RecoveredLog> Recover() const {
    LogReplay replay;
    LogReplay::Segment last;
    for (size_t i = 0; i < segments_.size(); ++i) {
      absl::StatusOr<LogReplay::Segment> segment =
          replay.Add(segments_[i].bytes, /*more_follow=*/i + 1 < segments_.size());
      if (!segment.ok()) {
        return absl::DataLossError(
            absl::StrCat("segment ", i, " is corrupt: ", segment.status().message()));
      }
      last = *segment;
    }
    RecoveredLog out = std::move(replay).Finish();
    out.valid_bytes = last.valid_bytes;
    out.records = last.records;
    out.torn_tail = last.torn_tail;
    return out;
  }
  // After a recovery: the torn tail of the last segment is cut away, as the server does,
  // and the segments go on from what `recovered` holds.
  void Reopen(const RecoveredLog& recovered) {
    Segment& last = segments_.back();
    last.bytes.resize(recovered.valid_bytes);
    while (!last.record_offsets.empty() && last.record_offsets.back() >= last.bytes.size()) {
      last.record_offsets.pop_back();
    }
    last.synced_bytes = last.bytes.size();
    unsynced_.clear();
    hard_state_ = recovered.state.hard_state;
    snapshot_ = recovered.state.snapshot_meta;
  }
  // Drops what a durable snapshot at `through` covers: a new segment, then the oldest
  // segments whose entries are all at or below it.
  void Compact(uint64_t through) {
    StartSegment();
    Mark(segments_.back());
    through = std::min(through, snapshot_.index());
    while (segments_.size() > 1 && segments_.front().max_slot <= through) {
      segments_.erase(segments_.begin());
    }
    // What the snapshot covers is no longer the acceptor's to keep (the checkers skip it).
    auto& accepted = durable_state_.accepted;
    accepted.erase(accepted.begin(), accepted.upper_bound(through));
  }
  // Replaces the log with one holding exactly `state` (the forget-promise bug).
  void Rewrite(const PersistedState& state) {
    durable_state_ = DurableAcceptorState();
    hard_state_.reset();
    snapshot_ = SnapshotMeta();
    segments_.assign(1, Segment());
    unsynced_.clear();
    Ready r;
    r.hard_state = state.hard_state;
    if (state.snapshot_meta.index() > 0) r.snapshot = SnapshotToInstall{state.snapshot_meta};
    r.entries = state.entries;
    Write(r);
    Sync();
  }
  // What the synced records hold, as recovery would read it back.
  const DurableAcceptorState& durable_state() const { return durable_state_; }
  size_t segments() const { return segments_.size(); }

 private:
  struct Segment {
    std::string bytes;
    std::vector<size_t> record_offsets;  // of every synced record, marks included
    size_t synced_bytes = 0;             // where the synced records end (a torn write follows)
    uint64_t max_slot = 0;               // of its entries
  };
  struct UnsyncedWrite {
    std::string bytes;
    std::optional<HardState> hard_state;
    std::map<uint64_t, Ballot> entries;  // slot -> ballot, as DurableAcceptorState::accepted
    std::optional<SnapshotMeta> snapshot;
    uint64_t max_slot = 0;
  };

  std::string HeaderBytes() const {
    Ready header;
    header.hard_state = hard_state_;
    if (snapshot_.index() > 0) header.snapshot = SnapshotToInstall{snapshot_};
    return EncodeReady(header);
  }
  void StartSegment() {
    segments_.emplace_back();
    AppendRecords(segments_.back(), HeaderBytes());
  }
  // Records `framed` (whole frames) at the end of `s`, unsynced until Mark.
  static void AppendRecords(Segment& s, std::string_view framed) {
    for (size_t offset : FrameOffsets(framed)) s.record_offsets.push_back(s.bytes.size() + offset);
    s.bytes += framed;
  }
  static void Mark(Segment& s) {
    s.record_offsets.push_back(s.bytes.size());
    s.bytes += EncodeSyncMark(s.record_offsets.size() - 1, s.bytes.size());
    s.synced_bytes = s.bytes.size();
  }
  void RaiseDurablePromise(const Ballot& ballot) {
    if (BallotLess(durable_state_.promised, ballot)) durable_state_.promised = ballot;
  }

  std::vector<Segment> segments_;        // oldest first; never empty
  std::optional<HardState> hard_state_;  // the latest synced, repeated by a new segment
  SnapshotMeta snapshot_;
  std::vector<UnsyncedWrite> unsynced_;
  DurableAcceptorState durable_state_;
};

}  // namespace synod::sim::internal

#endif  // SYNOD_SIM_SIM_DISK_H_

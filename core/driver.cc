#include "core/driver.h"

#include <utility>

#include "core/check.h"
#include "core/log_codec.h"

namespace synod {
namespace {

bool NeedsStorage(const Ready& ready) {
  // must_sync alone (a learned value written by an earlier Ready, to sync before it is
  // applied) is a sync with nothing new to write.
  return ready.must_sync || ready.hard_state.has_value() || !ready.entries.empty() ||
         ready.snapshot.has_value() || ready.compacted_through > 0;
}

}  // namespace

HostDriver::HostDriver(std::unique_ptr<Replica> replica, LogStorage* storage,
                       PeerTransport* transport, AppliedState* state, ClientAnswers* answers)
    : replica_(std::move(replica)),
      storage_(storage),
      transport_(transport),
      state_(state),
      answers_(answers),
      last_snapshot_index_(replica_->snapshot_index()) {}

void HostDriver::Drain() {
  if (in_drain_) return;
  in_drain_ = true;
  while (!persisting_ && replica_->HasReady()) {
    Ready ready = replica_->GetReady();
    ++counters_.readys;
    // 0. A snapshot from a peer is checked whole before anything of this Ready is kept:
    //    persisted, a bad one would stop this replica from starting ever again.
    if (ready.snapshot) {
      absl::Status valid = state_->CheckSnapshot(*ready.snapshot);
      if (!valid.ok()) {
        ++counters_.snapshots_refused;
        state_->RefuseSnapshot(valid);
        continue;  // the host replaced the replica (ReplaceReplica)
      }
    }
    if (!NeedsStorage(ready)) {
      Finish(std::move(ready));
      continue;
    }
    // 1. Persist. An fsync when a promise or an accept depends on it, and before an
    //    installed snapshot or a compaction replaces what the log holds.
    PersistOptions options;
    options.compact = ready.compacted_through > 0;
    options.sync = ready.must_sync || ready.snapshot.has_value() || options.compact;
    persisting_ = true;
    ++counters_.persists;
    if (options.sync) ++counters_.synced;
    // A leader's accepts leave now: its fsync and its followers' run at the same time.
    if (!ready.early_messages.empty()) transport_->Send(std::move(ready.early_messages));
    ready.early_messages.clear();
    in_flight_ = std::move(ready);
    after_persist_ = nullptr;
    storage_->Persist(*in_flight_, options, [this] { OnPersisted(); });
  }
  in_drain_ = false;
}

void HostDriver::OnPersisted() {
  SYNOD_CHECK(persisting_) << "a storage completion with nothing in flight";
  persisting_ = false;
  const bool nested = in_drain_;
  in_drain_ = true;
  if (in_flight_) {
    Ready ready = std::move(*in_flight_);
    in_flight_.reset();
    Finish(std::move(ready));
  } else if (after_persist_) {
    std::function<void()> then = std::move(after_persist_);
    after_persist_ = nullptr;
    then();
  }
  in_drain_ = nested;
  if (!nested) Drain();
}

void HostDriver::Finish(Ready ready) {
  // 2. Send: every promise and accept in these messages is durable now.
  if (!ready.early_messages.empty()) transport_->Send(std::move(ready.early_messages));
  if (!ready.messages.empty()) transport_->Send(std::move(ready.messages));
  // 3. Install, then apply.
  if (ready.snapshot) {
    state_->InstallSnapshot(*ready.snapshot);
    // The installed image is this replica's snapshot at that index now: one of the host's
    // own at the same index would differ in its bytes from the one it serves to peers.
    last_snapshot_index_ = std::max(last_snapshot_index_, ready.snapshot->meta.index());
  }
  for (CommittedEntry& entry : ready.committed) {
    CommittedEntry handed{entry.slot, std::move(entry.value)};
    state_->Apply(std::move(handed));
  }
  // 4. Answers to read barriers and refusals.
  for (const ForwardReply& reply : ready.replies) answers_->Answer(reply);
  // 5. Advance (it reads only the slots of ready.committed, and the snapshot's index).
  replica_->Advance(ready);
  answers_->Advanced();
}

bool HostDriver::Compact(uint64_t index, std::string image) {
  if (persisting_ || index <= last_snapshot_index_ || index <= replica_->snapshot_index() ||
      index > replica_->applied_index()) {
    return false;
  }
  // The snapshot record (and the compaction it implies) is made durable first; the log is
  // rewritten without the entries it covers when the replica's next Ready reports
  // compacted_through.
  auto record = std::make_shared<Ready>(SnapshotReady(index, std::move(image)));
  persisting_ = true;
  ++counters_.persists;
  ++counters_.synced;
  in_flight_.reset();
  after_persist_ = [this, index, record] {
    replica_->Compact(index, std::move(record->snapshot->data));
    last_snapshot_index_ = std::max(last_snapshot_index_, index);
  };
  PersistOptions options;
  options.sync = true;
  storage_->Persist(*record, options, [this] { OnPersisted(); });
  return true;
}

void HostDriver::ReplaceReplica(std::unique_ptr<Replica> replica) {
  SYNOD_CHECK(!persisting_) << "the replica was replaced while its storage was busy";
  replica_ = std::move(replica);
  last_snapshot_index_ = std::max(last_snapshot_index_, replica_->snapshot_index());
}

}  // namespace synod

#include "core/driver.h"

#include <algorithm>
#include <iterator>
#include <utility>

#include "core/check.h"
#include "core/log_codec.h"

namespace synod {
namespace {

bool SameImage(const SnapshotMeta& a, const SnapshotMeta& b) {
  return a.index() == b.index() && a.checksum() == b.checksum();
}

bool NeedsStorage(const Ready& ready) {
  // must_sync alone (a learned value written by an earlier Ready, to sync before it is
  // applied) is a sync with nothing new to write.
  return ready.must_sync || ready.hard_state.has_value() || !ready.entries.empty() ||
         ready.snapshot.has_value() || ready.compacted_through > 0;
}

}  // namespace

SnapshotMeta SnapshotMetaOf(uint64_t index, std::string_view image) {
  SnapshotMeta meta;
  meta.set_index(index);
  meta.set_size_bytes(image.size());
  meta.set_checksum(SnapshotChecksum(image));
  return meta;
}

absl::StatusOr<std::string> MemorySnapshotStore::ReadChunk(const SnapshotMeta& meta,
                                                           uint64_t offset, uint64_t max_bytes) {
  const std::string* image = Find(meta);
  if (image == nullptr || offset > image->size()) {
    return absl::NotFoundError("no such snapshot image");
  }
  return image->substr(offset, max_bytes);
}

void MemorySnapshotStore::Receive(const SnapshotMeta& meta, uint64_t offset,
                                  std::string_view data) {
  if (offset == 0) {
    incoming_meta_ = meta;
    incoming_.clear();
  }
  SYNOD_CHECK(incoming_meta_.has_value() && incoming_meta_->index() == meta.index() &&
              incoming_meta_->checksum() == meta.checksum() && offset == incoming_.size())
      << "a snapshot chunk out of order reached the store";
  incoming_.append(data);
}

absl::Status MemorySnapshotStore::Seal(const SnapshotMeta& meta) {
  if (!incoming_meta_ || incoming_meta_->index() != meta.index() ||
      incoming_meta_->checksum() != meta.checksum()) {
    return absl::FailedPreconditionError("no such snapshot image is being received");
  }
  std::string image = std::move(incoming_);
  Crash();  // nothing is being received now
  if (image.size() != meta.size_bytes() || SnapshotChecksum(image) != meta.checksum()) {
    return absl::DataLossError("the snapshot's bytes do not match its checksum");
  }
  images_[{meta.index(), meta.checksum()}] = std::move(image);
  return absl::OkStatus();
}

void MemorySnapshotStore::Retain(const SnapshotMeta& meta) {
  for (auto it = images_.begin(); it != images_.end();) {
    it = it->first == std::make_pair(meta.index(), meta.checksum()) ? std::next(it)
                                                                    : images_.erase(it);
  }
}

SnapshotMeta MemorySnapshotStore::Add(uint64_t index, std::string image) {
  SnapshotMeta meta = SnapshotMetaOf(index, image);
  images_[{meta.index(), meta.checksum()}] = std::move(image);
  return meta;
}

const std::string* MemorySnapshotStore::Find(const SnapshotMeta& meta) const {
  auto it = images_.find({meta.index(), meta.checksum()});
  return it == images_.end() ? nullptr : &it->second;
}

HostDriver::HostDriver(std::unique_ptr<Replica> replica, LogStorage* storage,
                       SnapshotStore* snapshots, PeerTransport* transport, AppliedState* state,
                       ClientAnswers* answers)
    : replica_(std::move(replica)),
      storage_(storage),
      snapshots_(snapshots),
      transport_(transport),
      state_(state),
      answers_(answers),
      last_snapshot_index_(replica_->snapshot_index()) {}

void HostDriver::Drain() {
  if (in_drain_) return;
  in_drain_ = true;
  if (persisting_ || checking_) {
    // Messages that acknowledge nothing (a leader's accepts, a follower's heartbeat
    // acknowledgements) need not wait for the storage: while it writes one Ready they go
    // out as they come, so a slow fsync neither stalls the leader's pipeline nor cuts a
    // follower off from its leader.
    std::vector<Message> early = replica_->TakeEarlyMessages();
    FillSnapshotChunks(&early);
    if (!early.empty()) transport_->Send(std::move(early));
  }
  while (!persisting_ && !checking_ && replica_->HasReady()) {
    Ready ready = replica_->GetReady();
    ++counters_.readys;
    // 0. The chunks of a snapshot a peer sends go to the store as they come. A snapshot from
    //    a peer is sealed (its checksum checked) and checked whole before anything of this
    //    Ready is kept: persisted, a bad one would stop this replica from starting again.
    //    The image is sealed as soon as its last chunk is in: chunks of a newer image may
    //    follow it in the same Ready (its sender compacted again meanwhile).
    absl::Status valid;
    for (SnapshotChunk& chunk : ready.snapshot_chunks) {
      snapshots_->Receive(chunk.meta(), chunk.offset(), chunk.data());
      if (chunk.last() && ready.snapshot && SameImage(chunk.meta(), ready.snapshot->meta)) {
        valid = snapshots_->Seal(ready.snapshot->meta);
      }
    }
    ready.snapshot_chunks.clear();
    if (ready.snapshot) {
      if (!valid.ok()) {
        ++counters_.snapshots_refused;
        state_->RefuseSnapshot(valid);
        continue;  // the host replaced the replica (ReplaceReplica)
      }
      // What acknowledges nothing need not wait for the check.
      FillSnapshotChunks(&ready.early_messages);
      if (!ready.early_messages.empty()) transport_->Send(std::move(ready.early_messages));
      ready.early_messages.clear();
      checking_ = true;
      const SnapshotToInstall snapshot = *ready.snapshot;  // in_flight_ may go with the verdict
      in_flight_ = std::move(ready);
      state_->CheckSnapshot(
          snapshot, [this](absl::Status verdict) { OnSnapshotChecked(std::move(verdict)); });
      continue;  // the loop ends here unless the verdict came at once
    }
    Persist(std::move(ready));
  }
  in_drain_ = false;
}

void HostDriver::OnSnapshotChecked(absl::Status verdict) {
  SYNOD_CHECK(checking_ && in_flight_.has_value()) << "a snapshot verdict with none checked";
  checking_ = false;
  Ready ready = std::move(*in_flight_);
  in_flight_.reset();
  const bool nested = in_drain_;
  in_drain_ = true;
  if (verdict.ok()) {
    Persist(std::move(ready));
  } else {
    ++counters_.snapshots_refused;
    state_->RefuseSnapshot(verdict);  // the host replaced the replica (ReplaceReplica)
  }
  in_drain_ = nested;
  if (!nested) Drain();
}

void HostDriver::Persist(Ready ready) {
  if (!NeedsStorage(ready)) {
    Finish(std::move(ready));
    return;
  }
  // 1. Persist. An fsync when a promise or an accept depends on it, and before an installed
  //    snapshot or a compaction replaces what the log holds.
  PersistOptions options;
  options.compact = ready.compacted_through > 0;
  options.sync = ready.must_sync || ready.snapshot.has_value() || options.compact;
  persisting_ = true;
  ++counters_.persists;
  if (options.sync) ++counters_.synced;
  // A leader's accepts leave now: its fsync and its followers' run at the same time.
  FillSnapshotChunks(&ready.early_messages);
  if (!ready.early_messages.empty()) transport_->Send(std::move(ready.early_messages));
  ready.early_messages.clear();
  in_flight_ = std::move(ready);
  after_persist_ = nullptr;
  storage_->Persist(*in_flight_, options, [this] { OnPersisted(); });
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
  FillSnapshotChunks(&ready.early_messages);
  FillSnapshotChunks(&ready.messages);
  if (!ready.early_messages.empty()) transport_->Send(std::move(ready.early_messages));
  if (!ready.messages.empty()) transport_->Send(std::move(ready.messages));
  // 3. Install, then apply.
  if (ready.snapshot) {
    state_->InstallSnapshot(*ready.snapshot);
    // The installed image is this replica's snapshot at that index now: one of the host's
    // own at the same index would differ in its bytes from the one it serves to peers.
    last_snapshot_index_ = std::max(last_snapshot_index_, ready.snapshot->meta.index());
    // The log names it durably (the Ready's records were synced): older images may go.
    snapshots_->Retain(ready.snapshot->meta);
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

void HostDriver::FillSnapshotChunks(std::vector<Message>* messages) {
  const uint64_t chunk_bytes = replica_->config().snapshot_chunk_bytes;
  size_t kept = 0;
  for (Message& m : *messages) {
    if (m.has_snapshot_chunk()) {
      SnapshotChunk* chunk = m.mutable_snapshot_chunk();
      absl::StatusOr<std::string> data =
          snapshots_->ReadChunk(chunk->meta(), chunk->offset(), chunk_bytes);
      const uint64_t size = chunk->meta().size_bytes();
      if (!data.ok() || chunk->offset() > size ||
          data->size() != std::min(chunk_bytes, size - chunk->offset())) {
        ++counters_.snapshot_chunks_unreadable;
        continue;
      }
      chunk->set_last(chunk->offset() + data->size() == size);
      chunk->set_data(*std::move(data));
    }
    if (&(*messages)[kept] != &m) (*messages)[kept] = std::move(m);
    ++kept;
  }
  messages->resize(kept);
}

bool HostDriver::CanCompact(uint64_t index) const {
  return !persisting_ && !checking_ && index > last_snapshot_index_ &&
         index > replica_->snapshot_index() && index <= replica_->applied_index();
}

bool HostDriver::Compact(const SnapshotMeta& meta) {
  const uint64_t index = meta.index();
  if (!CanCompact(index)) return false;
  // The snapshot record (and the compaction it implies) is made durable first; the log is
  // rewritten without the entries it covers when the replica's next Ready reports
  // compacted_through.
  auto record = std::make_shared<Ready>(SnapshotReady(meta));
  persisting_ = true;
  ++counters_.persists;
  ++counters_.synced;
  in_flight_.reset();
  after_persist_ = [this, meta] {
    replica_->Compact(meta);
    last_snapshot_index_ = std::max(last_snapshot_index_, meta.index());
    snapshots_->Retain(meta);
  };
  PersistOptions options;
  options.sync = true;
  storage_->Persist(*record, options, [this] { OnPersisted(); });
  return true;
}

void HostDriver::ReplaceReplica(std::unique_ptr<Replica> replica) {
  SYNOD_CHECK(!persisting_ && !checking_)
      << "the replica was replaced while its storage or a snapshot check was busy";
  replica_ = std::move(replica);
  last_snapshot_index_ = std::max(last_snapshot_index_, replica_->snapshot_index());
}

}  // namespace synod

#include "core/testing/cluster.h"

#include <utility>

#include "core/check.h"
#include "core/stable_hash.h"

namespace synod::testing {
namespace {

uint64_t Chance(std::mt19937_64& prng) { return prng() % 1000; }

std::string Encode(const Value& v) {
  std::string s;
  SYNOD_CHECK(v.SerializeToString(&s));
  return s;
}

std::string EncodeApp(uint64_t index, uint64_t hash) {
  std::string s(16, '\0');
  for (int i = 0; i < 8; ++i) {
    s[i] = static_cast<char>(index >> (8 * i));
    s[8 + i] = static_cast<char>(hash >> (8 * i));
  }
  return s;
}

std::pair<uint64_t, uint64_t> DecodeApp(const std::string& s) {
  SYNOD_CHECK_EQ(s.size(), 16u);
  uint64_t index = 0, hash = 0;
  for (int i = 0; i < 8; ++i) {
    index |= static_cast<uint64_t>(static_cast<unsigned char>(s[i])) << (8 * i);
    hash |= static_cast<uint64_t>(static_cast<unsigned char>(s[8 + i])) << (8 * i);
  }
  return {index, hash};
}

}  // namespace

class Cluster::Host : public LogStorage,
                      public PeerTransport,
                      public AppliedState,
                      public ClientAnswers {
 public:
  Host(Cluster* cluster, uint32_t id) : cluster_(cluster), id_(id) {}

  // Writes land in the unsynced image at once; a sync makes them durable. Done at once, or,
  // with asynchronous storage, a write that syncs finishes in a later Step.
  void Persist(const Ready& ready, PersistOptions options, std::function<void()> done) override {
    Node& n = node();
    if (ready.hard_state) n.unsynced.hard = *ready.hard_state;
    for (const LogEntry& e : ready.entries) n.unsynced.log[e.slot()] = e;
    if (ready.snapshot) n.unsynced.snapshot_meta = ready.snapshot->meta;
    if (ready.compacted_through > 0) {
      auto& log = n.unsynced.log;
      log.erase(log.begin(), log.upper_bound(ready.compacted_through));
    }
    if (options.sync && cluster_->async_storage_) {
      n.writes.push_back({ready.entries, std::move(done)});
      return;
    }
    if (options.sync) Sync(ready.entries);
    done();
  }

  // The oldest write in flight is durable now.
  void FinishWrite() {
    Node& n = node();
    PendingWrite w = std::move(n.writes.front());
    n.writes.pop_front();
    Sync(w.entries);
    w.done();
  }

  void Send(std::vector<Message> messages) override {
    for (Message& m : messages) {
      if (Chance(cluster_->prng_) < cluster_->faults_.drop_per_mille) continue;
      if (Chance(cluster_->prng_) < cluster_->faults_.duplicate_per_mille) {
        cluster_->network_.push_back(m);
      }
      cluster_->network_.push_back(std::move(m));
    }
  }

  void CheckSnapshot(const SnapshotToInstall&, std::function<void(absl::Status)> done) override {
    done(absl::OkStatus());
  }
  void RefuseSnapshot(const absl::Status& why) override {
    SYNOD_CHECK(false) << "the test cluster refuses no snapshot: " << why;
  }
  void InstallSnapshot(const SnapshotToInstall& snapshot) override {
    Node& n = node();
    const std::string* image = n.snapshots.Find(snapshot.meta);
    SYNOD_CHECK(image != nullptr) << "a snapshot installed from no image";
    auto [index, hash] = DecodeApp(*image);
    SYNOD_CHECK_EQ(index, snapshot.meta.index());
    n.app_index = index;
    n.app_hash = hash;
    KeepApplied();
  }
  void Apply(CommittedEntry c) override {
    Node& n = node();
    SYNOD_CHECK_EQ(c.slot, n.app_index + 1);
    // Acceptances are recorded when they become durable, before any vote can count them.
    if (cluster_->chosen_.count(c.slot) == 0 && !cluster_->violation_) {
      cluster_->violation_ = "replica " + std::to_string(id_) + " applied slot " +
                             std::to_string(c.slot) +
                             " before a majority had durably accepted its value";
    }
    std::string encoded = Encode(c.value);
    cluster_->Record(id_, c.slot, encoded);
    StableHash h;
    h.AddU64(n.app_hash);
    h.AddField(encoded);
    n.app_index = c.slot;
    n.app_hash = h.value();
    for (const ClientRequest& r : c.value.requests()) {
      if (r.origin_replica() == id_)
        cluster_->applied_writes_[{r.client_id(), r.sequence()}] = c.slot;
    }
    KeepApplied();
  }

  void Answer(const ForwardReply& reply) override {
    cluster_->replies_[{reply.client_id(), reply.sequence()}] = reply;
  }
  void Advanced() override {
    Node& n = node();
    const uint64_t every = cluster_->compact_every_;
    if (every > 0 && n.app_index >= n.driver->last_snapshot_index() + every &&
        n.driver->CanCompact(n.app_index)) {
      SYNOD_CHECK(
          n.driver->Compact(n.snapshots.Add(n.app_index, EncodeApp(n.app_index, n.app_hash))));
    }
  }

 private:
  Node& node() { return cluster_->nodes_.at(id_); }
  void Sync(const std::vector<LogEntry>& entries) {
    for (const LogEntry& e : entries) cluster_->RecordAcceptance(id_, e);
    Node& n = node();
    n.synced = n.unsynced;
  }
  // The applied state is durable on its own (as the server's SQLite commits are); the
  // log's unsynced writes are not.
  void KeepApplied() {
    Node& n = node();
    n.synced.app_index = n.unsynced.app_index = n.app_index;
    n.synced.app_hash = n.unsynced.app_hash = n.app_hash;
  }

  Cluster* const cluster_;
  const uint32_t id_;
};

Cluster::Cluster(size_t size, uint64_t seed, ReplicaConfig base)
    : base_(std::move(base)), prng_(seed) {
  for (uint32_t id = 1; id <= size; ++id) ids_.push_back(id);
  for (uint32_t id : ids_) Start(id, PersistedState());
}

Cluster::~Cluster() = default;

void Cluster::Start(uint32_t id, PersistedState state) {
  Node& n = nodes_[id];
  if (!n.host) n.host = std::make_unique<Host>(this, id);
  Host* h = n.host.get();
  n.driver = std::make_unique<HostDriver>(
      std::make_unique<Replica>(ConfigFor(id), std::move(state), prng_()), h, &n.snapshots, h, h,
      h);
}

ReplicaConfig Cluster::ConfigFor(uint32_t id) const {
  ReplicaConfig c = base_;
  c.id = id;
  c.replica_ids = ids_;
  return c;
}

PersistedState Cluster::Persisted(const Durable& d) const {
  PersistedState p;
  p.hard_state = d.hard;
  for (const auto& [slot, e] : d.log) p.entries.push_back(e);
  p.snapshot_meta = d.snapshot_meta;
  p.applied_index = d.app_index;
  return p;
}

void Cluster::Crash(uint32_t id) {
  Node& n = nodes_.at(id);
  n.writes.clear();  // never finished: their writes are lost with the unsynced image
  n.driver.reset();
  n.snapshots.Crash();
  n.unsynced = n.synced;
  n.app_index = n.synced.app_index;
  n.app_hash = n.synced.app_hash;
}

void Cluster::Restart(uint32_t id) {
  Node& n = nodes_.at(id);
  SYNOD_CHECK(n.driver == nullptr);
  Start(id, Persisted(n.synced));
  ++n.restarts;
}

void Cluster::Write(uint32_t id, uint64_t client_id, uint64_t sequence,
                    const std::string& payload) {
  Replica* r = replica(id);
  if (r == nullptr) return;
  ClientRequest req;
  req.set_client_id(client_id);
  req.set_sequence(sequence);
  Statement* st = req.mutable_command()->mutable_execute()->add_statements();
  st->set_sql(payload);
  r->Propose(std::move(req));
  Drain(id);
}

void Cluster::Read(uint32_t id, uint64_t client_id, uint64_t sequence, Consistency consistency) {
  Replica* r = replica(id);
  if (r == nullptr) return;
  ClientRequest req;
  req.set_client_id(client_id);
  req.set_sequence(sequence);
  req.mutable_command()->mutable_read_barrier()->set_consistency(consistency);
  r->Propose(std::move(req));
  Drain(id);
}

uint32_t Cluster::Leader() const {
  for (const auto& [id, n] : nodes_) {
    if (n.driver && n.driver->replica().role() == Role::kLeader) return id;
  }
  return 0;
}

void Cluster::Record(uint32_t id, uint64_t slot, const std::string& encoded) {
  auto [it, inserted] = chosen_.emplace(slot, encoded);
  if (!inserted && it->second != encoded && !violation_) {
    violation_ = "two values chosen at slot " + std::to_string(slot) + " (seen at replica " +
                 std::to_string(id) + ")";
  }
}

void Cluster::RecordAcceptance(uint32_t id, const LogEntry& e) {
  if (e.chosen()) return;  // a learned value, not an acceptance
  auto key = std::make_tuple(e.slot(), e.ballot().round(), e.ballot().replica_id());
  std::string encoded = Encode(e.value());
  auto& [value, acceptors] = acceptances_[key];
  if (acceptors.empty()) value = encoded;
  if (value != encoded && !violation_) {
    violation_ = "two values proposed at slot " + std::to_string(e.slot()) + " in one ballot";
  }
  acceptors.insert(id);
  if (acceptors.size() == ids_.size() / 2 + 1) Record(id, e.slot(), value);
}

void Cluster::Drain(uint32_t id) {
  Node& n = nodes_.at(id);
  if (n.driver) n.driver->Drain();
}

void Cluster::Deliver(const Message& m) {
  Node& n = nodes_.at(m.to());
  if (!n.driver || n.isolated || nodes_.at(m.from()).isolated) return;
  n.driver->replica().Step(m);
  Drain(m.to());
}

void Cluster::Step() {
  for (uint32_t id : ids_) {
    if (!nodes_.at(id).driver) continue;
    nodes_.at(id).driver->replica().Tick();
    Drain(id);
  }
  FinishSomeWrites();
  std::vector<Message> batch = std::move(network_);
  network_.clear();
  // Fisher-Yates with the raw 64-bit output, so the order is the same on every platform.
  for (size_t i = batch.size(); i > 1; --i) std::swap(batch[i - 1], batch[prng_() % i]);
  for (Message& m : batch) {
    if (Chance(prng_) < faults_.delay_per_mille) {
      network_.push_back(std::move(m));
      continue;
    }
    Deliver(m);
  }
  FinishSomeWrites();
}

void Cluster::FinishSomeWrites() {
  // Each node's writes finish in order, each with even odds at each chance: some within the
  // step they started in, some several steps later, while messages keep arriving.
  for (uint32_t id : ids_) {
    Node& n = nodes_.at(id);
    while (n.driver && !n.writes.empty() && prng_() % 2 == 0) n.host->FinishWrite();
  }
}

void Cluster::RunTicks(int ticks) {
  for (int i = 0; i < ticks; ++i) Step();
}

}  // namespace synod::testing

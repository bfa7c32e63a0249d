#ifndef SYNOD_CORE_TESTING_CLUSTER_H_
#define SYNOD_CORE_TESTING_CLUSTER_H_

// An in-process cluster of Replicas for the core's own tests: a test network that drops,
// duplicates and reorders under a seeded schedule, storage with an fsync boundary, and
// crash/restart that keeps only what was synced. The state machine is a stand-in (a hash
// of applied values) so the tests see the consensus alone. The full simulator is sim/.

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "core/driver.h"
#include "core/replica.h"

namespace synod::testing {

struct NetworkFaults {
  uint32_t drop_per_mille = 0;
  uint32_t duplicate_per_mille = 0;
  uint32_t delay_per_mille = 0;  // held back one more tick (again and again: a heavy tail)
};

class Cluster {
 public:
  Cluster(size_t size, uint64_t seed, ReplicaConfig base = ReplicaConfig());
  ~Cluster();

  // Advances one tick: every live replica ticks, then every message sent before this tick
  // is delivered in a random order (or held back, by the delay fault), and Ready drained.
  void Step();
  void RunTicks(int ticks);

  // Crashes replica `id`: its in-memory state and unsynced writes are lost.
  void Crash(uint32_t id);
  void Restart(uint32_t id);
  bool IsUp(uint32_t id) const { return nodes_.at(id).driver != nullptr; }
  // Cuts replica `id` off from every other (it keeps running, and hears nobody), or heals it.
  void Isolate(uint32_t id, bool isolated) { nodes_.at(id).isolated = isolated; }

  // Submits a write of `payload` at replica `id`; returns its (client_id, sequence).
  void Write(uint32_t id, uint64_t client_id, uint64_t sequence, const std::string& payload);
  void Read(uint32_t id, uint64_t client_id, uint64_t sequence, Consistency consistency);

  void set_faults(NetworkFaults faults) { faults_ = faults; }
  // Asynchronous storage: a write that must sync finishes only in a later Step (in order per
  // node), while the node keeps stepping messages and requests; a crash loses the writes in
  // flight. Off: every write finishes at once.
  void set_async_storage(bool async) { async_storage_ = async; }
  // Takes a snapshot at the applied index of every replica that has applied at least
  // `every` entries since its last one.
  void set_compact_every(uint64_t every) { compact_every_ = every; }

  Replica* replica(uint32_t id) {
    Node& n = nodes_.at(id);
    return n.driver ? &n.driver->replica() : nullptr;
  }
  uint32_t Leader() const;  // a live replica that believes it leads (0: none)
  uint64_t Applied(uint32_t id) const { return nodes_.at(id).app_index; }
  uint64_t AppHash(uint32_t id) const { return nodes_.at(id).app_hash; }

  // Every value known chosen, by slot: reported committed to a host, or accepted by a
  // majority at one ballot (the definition of chosen, seen from outside the replicas). The
  // first value seen is kept; the safety check compares every later one against it.
  const std::map<uint64_t, std::string>& chosen() const { return chosen_; }
  // Set on the first disagreement: a description of it.
  const std::optional<std::string>& violation() const { return violation_; }

  // Replies delivered to clients: (client, sequence) -> reply.
  const std::map<std::pair<uint64_t, uint64_t>, ForwardReply>& replies() const { return replies_; }
  // Writes applied, by (client, sequence) -> slot, as seen at their origin replica.
  const std::map<std::pair<uint64_t, uint64_t>, uint64_t>& applied_writes() const {
    return applied_writes_;
  }

 private:
  struct Durable {
    HardState hard;
    std::map<uint64_t, LogEntry> log;
    SnapshotMeta snapshot_meta;
    uint64_t app_index = 0;
    uint64_t app_hash = 0;
  };
  // The node's side of the host driver's interfaces: storage with an fsync boundary that
  // completes at once, the test network, and the stand-in state machine.
  class Host;
  struct PendingWrite {
    std::vector<LogEntry> entries;  // acceptances that become durable when it finishes
    std::function<void()> done;
  };
  struct Node {
    std::unique_ptr<Host> host;
    std::unique_ptr<HostDriver> driver;  // owns the replica; null while crashed
    std::deque<PendingWrite> writes;     // in flight, oldest first (asynchronous storage)
    Durable synced;
    Durable unsynced;               // synced plus writes not yet fsynced
    MemorySnapshotStore snapshots;  // images are durable once kept (a crash loses a partial one)
    uint64_t app_index = 0;
    uint64_t app_hash = 0;
    int restarts = 0;
    bool isolated = false;
  };

  void Drain(uint32_t id);
  void FinishSomeWrites();
  void Start(uint32_t id, PersistedState state);
  void Deliver(const Message& m);
  PersistedState Persisted(const Durable& d) const;
  ReplicaConfig ConfigFor(uint32_t id) const;
  void Record(uint32_t id, uint64_t slot, const std::string& encoded);
  void RecordAcceptance(uint32_t id, const LogEntry& e);

  ReplicaConfig base_;
  std::vector<uint32_t> ids_;
  std::map<uint32_t, Node> nodes_;
  std::vector<Message> network_;
  std::mt19937_64 prng_;
  NetworkFaults faults_;
  uint64_t compact_every_ = 0;
  bool async_storage_ = false;
  std::map<uint64_t, std::string> chosen_;
  // (slot, ballot round, ballot replica) -> value and the acceptors that accepted it.
  std::map<std::tuple<uint64_t, uint64_t, uint32_t>, std::pair<std::string, std::set<uint32_t>>>
      acceptances_;
  std::optional<std::string> violation_;
  std::map<std::pair<uint64_t, uint64_t>, ForwardReply> replies_;
  std::map<std::pair<uint64_t, uint64_t>, uint64_t> applied_writes_;
};

}  // namespace synod::testing

#endif  // SYNOD_CORE_TESTING_CLUSTER_H_

#ifndef SYNOD_SIM_WORLD_H_
#define SYNOD_SIM_WORLD_H_

// The simulated world: a whole Synod cluster (the real core: Replica and StateMachine on
// in-memory SQLite) with simulated network, disks, clocks, processes and clients, run in one
// thread from one seed. The same seed and binary give the same run, event for event; the
// run's trace hash proves it. See docs/simulation.md.

#include <cstdint>
#include <ostream>
#include <set>
#include <string>
#include <vector>

namespace synod::sim {

enum class Mode {
  kSafety,    // faults throughout; checkers judge safety and linearizability
  kLiveness,  // as safety, then faults stop and every pending operation must complete
};

enum class Workload {
  // Clients think 20-400 ms between operations; half of them write, half read at every
  // consistency level, each operation through a replica drawn at random.
  kMixed,
  // No think time and mostly reads. Each client writes through one replica and reads
  // through another, and after each write reads back, linearizably, the key it wrote: a
  // read that misses a write acknowledged just before it is a linearizability failure.
  kReads,
};

struct SimOptions {
  uint64_t seed = 0;
  int replicas = 3;      // 1..7
  int clients = 0;       // 1..10; 0: drawn from the seed (at least 5 with kReads)
  int64_t ticks = 3000;  // simulated 10 ms ticks of the faulty phase
  Mode mode = Mode::kSafety;
  Workload workload = Workload::kMixed;
  // false: acceptors grant no lease, as if clocks drifted beyond any bound. Lease reads may
  // then be stale and are not checked (nor are overlapping leases); linearizable reads still
  // are, and must not depend on leases.
  bool leases = true;
  // Off: replicas raise their ballot without a pre-vote, as if every peer granted it. Safety
  // must not depend on pre-votes (they rest on timing); the needless-election check of
  // liveness mode, which does, is then skipped.
  bool pre_vote = true;
  // Hostile workload beside the clients: generated expensive and malformed SQL written
  // through the log, local reads of the same on the replicas that apply, and forged peer
  // messages (from replicas outside the group, or for other replicas) handed to the core.
  bool hostile = false;
  // Media beside the clients: an actor uploads and deletes media through random replicas;
  // blobs are pushed to a majority before their metadata is proposed, fetched where missing
  // and collected when unreferenced (server/media.h, modelled). The run ends with a settling
  // time, then checks that no referenced blob is lost or missing anywhere, that every
  // stored blob has the right bytes, and that no orphan outlives collection.
  bool media = false;
  // Deliberate bugs (see KnownBugs()), to test that the checkers catch them.
  std::set<std::string> bugs;
  // If set, a readable line per event is written here.
  std::ostream* trace = nullptr;
};

struct SimResult {
  bool passed = false;
  std::string failure;  // what went wrong, readable; empty when passed
  uint64_t trace_hash = 0;
  int64_t simulated_ms = 0;
  uint64_t events = 0;
  uint64_t operations = 0;  // client operations completed (any outcome)
  uint64_t revision = 0;    // highest revision applied by any replica
  // Elections started, after the faults stopped, by a replica other than a leader that a
  // majority followed (liveness mode fails on any).
  uint64_t needless_elections = 0;
};

// Names and one-line descriptions of the deliberate bugs.
std::vector<std::pair<std::string, std::string>> KnownBugs();

// Runs one simulation. Never throws; a broken invariant inside the core aborts the process
// (SYNOD_CHECK), which is itself a failure the sweep reports.
SimResult RunSimulation(const SimOptions& options);

}  // namespace synod::sim

#endif  // SYNOD_SIM_WORLD_H_

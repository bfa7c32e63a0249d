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

struct SimOptions {
  uint64_t seed = 0;
  int replicas = 3;      // 3 or 5
  int clients = 0;       // 1..10; 0: drawn from the seed
  int64_t ticks = 3000;  // simulated 10 ms ticks of the faulty phase
  Mode mode = Mode::kSafety;
  // Hostile workload beside the clients: generated expensive and malformed SQL written
  // through the log, local reads of the same on the replicas that apply, and forged peer
  // messages (from replicas outside the group, or for other replicas) handed to the core.
  bool hostile = false;
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
};

// Names and one-line descriptions of the deliberate bugs.
std::vector<std::pair<std::string, std::string>> KnownBugs();

// Runs one simulation. Never throws; a broken invariant inside the core aborts the process
// (SYNOD_CHECK), which is itself a failure the sweep reports.
SimResult RunSimulation(const SimOptions& options);

}  // namespace synod::sim

#endif  // SYNOD_SIM_WORLD_H_

// synod-sim: runs the deterministic simulator. See docs/simulation.md.
//
//   synod-sim --seed N            one run; last line: seed=N result=pass|fail trace=HEX
//   synod-sim --seeds A..B        a sweep; failing seeds with the command that replays them,
//                                 then "P passed, F failed"
//   --replicas 1..7  --clients 1..10  --ticks T  --mode safety|liveness
//   --workload mixed|reads  --leases on|off  --pre-vote on|off
//   --hostile (expensive and malformed SQL, local reads, forged messages beside the clients)
//   --media (uploads and deletions of media beside the clients: blobs pushed, fetched and
//   collected, then checked)
//   --bug NAME (repeatable)  --list-bugs  --trace (readable trace of every event to stdout)

#include <malloc.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "sim/isolated_run.h"
#include "sim/world.h"

namespace {

using synod::sim::Mode;
using synod::sim::SimOptions;
using synod::sim::SimResult;
using synod::sim::Workload;

constexpr const char* kUsage =
    "usage: synod-sim (--seed N | --seeds A..B) [--replicas 1..7] [--clients 1..10]\n"
    "                 [--ticks T] [--mode safety|liveness] [--workload mixed|reads]\n"
    "                 [--leases on|off] [--pre-vote on|off] [--hostile] [--media] [--bug NAME]...\n"
    "                 [--trace]\n"
    "       synod-sim --list-bugs\n"
    "       synod-sim --help\n";

int Usage(const std::string& error) {
  std::cerr << "synod-sim: " << error << "\n" << kUsage;
  return 2;
}

std::string ReplayCommand(const SimOptions& o) {
  std::string cmd =
      absl::StrFormat("synod-sim --seed %d --replicas %d --ticks %d --mode %s", o.seed, o.replicas,
                      o.ticks, o.mode == Mode::kLiveness ? "liveness" : "safety");
  if (o.clients > 0) cmd += absl::StrFormat(" --clients %d", o.clients);
  if (o.workload == Workload::kReads) cmd += " --workload reads";
  if (!o.leases) cmd += " --leases off";
  if (!o.pre_vote) cmd += " --pre-vote off";
  if (o.hostile) cmd += " --hostile";
  if (o.media) cmd += " --media";
  for (const std::string& b : o.bugs) cmd += " --bug " + b;
  return cmd;
}

// Writes the full readable trace of a failing run (re-run: the run is deterministic).
std::string WriteTrace(SimOptions o) {
  const char* dir = std::getenv("TEST_UNDECLARED_OUTPUTS_DIR");
  std::string path =
      absl::StrFormat("%s/synod-sim-%d.trace", dir != nullptr ? dir : "/tmp", o.seed);
  std::ofstream out(path);
  o.trace = &out;
  synod::sim::RunSimulation(o);
  return path;
}

int RunOne(const SimOptions& o) {
  auto start = std::chrono::steady_clock::now();
  SimResult r = synod::sim::RunSimulation(o);
  double wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << absl::StrFormat(
      "simulated %.1f s in %.2f s wall (%.0fx), %d events, %d operations, revision %d, "
      "%d needless elections\n",
      r.simulated_ms / 1000.0, wall_s, wall_s > 0 ? r.simulated_ms / 1000.0 / wall_s : 0.0,
      r.events, r.operations, r.revision, r.needless_elections);
  if (!r.passed) {
    std::cout << "FAILED: " << r.failure << "\n";
    if (o.trace == nullptr) std::cout << "full trace: " << WriteTrace(o) << "\n";
    std::cout << "replay: " << ReplayCommand(o) << "\n";
  }
  std::cout << absl::StrFormat("seed=%d result=%s trace=%016x\n", o.seed,
                               r.passed ? "pass" : "fail", r.trace_hash);
  return r.passed ? 0 : 1;
}

// Each seed runs in a child process (RunIsolated), so that a SYNOD_CHECK abort in the core
// fails that seed rather than the sweep.
int RunSweep(SimOptions o, uint64_t first, uint64_t last) {
  uint64_t passed = 0, failed = 0, needless_elections = 0, seeds_with_needless = 0;
  int64_t simulated_ms = 0;
  auto start = std::chrono::steady_clock::now();
  for (uint64_t seed = first; seed <= last; ++seed) {
    o.seed = seed;
    SimResult r = synod::sim::RunIsolated(o);
    simulated_ms += r.simulated_ms;
    needless_elections += r.needless_elections;
    seeds_with_needless += r.needless_elections > 0;
    if (r.passed) {
      ++passed;
      continue;
    }
    ++failed;
    std::cout << absl::StrFormat("seed %d FAILED: %s\n  replay: %s\n", seed, r.failure,
                                 ReplayCommand(o));
  }
  double wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << absl::StrFormat("simulated %.0f s in %.1f s wall: %.0f simulated s per wall s\n",
                               simulated_ms / 1000.0, wall_s,
                               wall_s > 0 ? simulated_ms / 1000.0 / wall_s : 0.0);
  std::cout << absl::StrFormat("needless elections after the faults stopped: %d in %d seeds\n",
                               needless_elections, seeds_with_needless);
  std::cout << absl::StrFormat("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  // A run allocates and frees in bursts (snapshot images, a log read back and rewritten at
  // each compaction). Keep freed memory for the next burst rather than hand it back to the
  // kernel and fault it in again: that churn was a sixth of the run time.
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_TOP_PAD, 64 << 20);
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  setenv("TZ", "UTC", 1);  // as the server: 'localtime' in SQL must not depend on the host
  tzset();
  SimOptions o;
  bool have_seed = false, have_sweep = false;
  uint64_t first = 0, last = 0;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (arg == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (arg == "--list-bugs") {
      for (const auto& [name, what] : synod::sim::KnownBugs()) {
        std::cout << name << "\t" << what << "\n";
      }
      return 0;
    } else if (arg == "--seed") {
      if (!absl::SimpleAtoi(value(), &o.seed)) return Usage("--seed needs a number");
      have_seed = true;
    } else if (arg == "--seeds") {
      std::string v = value();
      size_t dots = v.find("..");
      if (dots == std::string::npos || !absl::SimpleAtoi(v.substr(0, dots), &first) ||
          !absl::SimpleAtoi(v.substr(dots + 2), &last) || last < first) {
        return Usage("--seeds needs A..B with A <= B");
      }
      have_sweep = true;
    } else if (arg == "--replicas") {
      if (!absl::SimpleAtoi(value(), &o.replicas) || o.replicas < 1 || o.replicas > 7) {
        return Usage("--replicas must be 1..7");
      }
    } else if (arg == "--clients") {
      if (!absl::SimpleAtoi(value(), &o.clients) || o.clients < 1 || o.clients > 10) {
        return Usage("--clients must be 1..10");
      }
    } else if (arg == "--ticks") {
      if (!absl::SimpleAtoi(value(), &o.ticks) || o.ticks < 1) return Usage("--ticks must be > 0");
    } else if (arg == "--mode") {
      std::string v = value();
      if (v == "safety") {
        o.mode = Mode::kSafety;
      } else if (v == "liveness") {
        o.mode = Mode::kLiveness;
      } else {
        return Usage("--mode must be safety or liveness");
      }
    } else if (arg == "--workload") {
      std::string v = value();
      if (v == "mixed") {
        o.workload = Workload::kMixed;
      } else if (v == "reads") {
        o.workload = Workload::kReads;
      } else {
        return Usage("--workload must be mixed or reads");
      }
    } else if (arg == "--leases") {
      std::string v = value();
      if (v != "on" && v != "off") return Usage("--leases must be on or off");
      o.leases = v == "on";
    } else if (arg == "--pre-vote") {
      std::string v = value();
      if (v != "on" && v != "off") return Usage("--pre-vote must be on or off");
      o.pre_vote = v == "on";
    } else if (arg == "--bug") {
      std::string v = value();
      bool known = false;
      for (const auto& [name, what] : synod::sim::KnownBugs()) known |= name == v;
      if (!known) return Usage("unknown bug '" + v + "' (see --list-bugs)");
      o.bugs.insert(v);
    } else if (arg == "--hostile") {
      o.hostile = true;
    } else if (arg == "--media") {
      o.media = true;
    } else if (arg == "--trace") {
      o.trace = &std::cout;
    } else {
      return Usage("unknown argument '" + arg + "'");
    }
  }
  if (have_seed == have_sweep) return Usage("give exactly one of --seed and --seeds");
  return have_seed ? RunOne(o) : RunSweep(o, first, last);
}

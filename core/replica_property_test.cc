// Property 1 of the core: under a generated schedule of message loss, duplication, delay
// and reordering, with replicas crashing (losing everything not synced) and restarting, or
// cut off from the others and healed, in groups of 1 to 7 (even ones have their own quorum
// arithmetic), at
// most one value is ever chosen per slot, and every replica that holds a chosen entry holds
// the same one. After the faults stop and every replica is back, all of them converge.

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <string>
#include <vector>

#include "core/replica.h"
#include "core/testing/cluster.h"

namespace synod {
namespace {

struct Op {
  enum Kind {
    kWrite,
    kWriteAtLeader,
    kCrash,
    kCrashLeader,
    kRestart,
    kRun,
    kIsolate,
    kHeal
  } kind = kRun;
  uint32_t node = 1;
  int ticks = 1;
};

rc::Gen<Op> GenOp(uint32_t size) {
  return rc::gen::apply(
      [](int kind, uint32_t node, int ticks) {
        static constexpr Op::Kind kKinds[] = {
            Op::kWrite,   Op::kWrite,   Op::kWriteAtLeader, Op::kWriteAtLeader,
            Op::kRun,     Op::kRun,     Op::kCrash,         Op::kCrashLeader,
            Op::kRestart, Op::kRestart, Op::kIsolate,       Op::kHeal};
        Op op;
        op.kind = kKinds[kind];
        op.node = node;
        op.ticks = ticks;
        return op;
      },
      rc::gen::inRange(0, 12), rc::gen::inRange<uint32_t>(1, size + 1), rc::gen::inRange(1, 30));
}

std::string Encode(const Value& v) {
  std::string s;
  v.SerializeToString(&s);
  return s;
}

RC_GTEST_PROP(ReplicaProperty, AtMostOneValueIsChosenPerSlotUnderFaultsAndCrashes, ()) {
  const uint32_t size = *rc::gen::inRange<uint32_t>(1, 8);
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  testing::NetworkFaults faults;
  faults.drop_per_mille = *rc::gen::inRange<uint32_t>(0, 300);
  faults.duplicate_per_mille = *rc::gen::inRange<uint32_t>(0, 200);
  faults.delay_per_mille = *rc::gen::inRange<uint32_t>(0, 500);
  const uint64_t compact_every = *rc::gen::element<uint64_t>(0, 3, 10);
  const bool async_storage = *rc::gen::arbitrary<bool>();
  const std::vector<Op> ops =
      *rc::gen::resize(60, rc::gen::container<std::vector<Op>>(GenOp(size)));

  ReplicaConfig config;
  config.max_inflight_slots = 4;  // small limits, so pipelines fill and catch-up happens
  config.max_batch_requests = 3;
  config.snapshot_chunk_bytes = 5;
  testing::Cluster c(size, seed, config);
  c.set_faults(faults);
  c.set_compact_every(compact_every);
  c.set_async_storage(async_storage);

  uint64_t sequence = 0;
  for (const Op& op : ops) {
    uint32_t leader = c.Leader();
    switch (op.kind) {
      case Op::kWrite:
      case Op::kWriteAtLeader: {
        uint32_t at = op.kind == Op::kWriteAtLeader && leader != 0 ? leader : op.node;
        ++sequence;
        c.Write(at, at, sequence, "v" + std::to_string(sequence));
        break;
      }
      case Op::kCrash:
      case Op::kCrashLeader: {
        uint32_t victim = op.kind == Op::kCrashLeader && leader != 0 ? leader : op.node;
        if (c.IsUp(victim)) c.Crash(victim);
        break;
      }
      case Op::kRestart:
        if (!c.IsUp(op.node)) c.Restart(op.node);
        break;
      case Op::kRun:
        c.RunTicks(op.ticks);
        break;
      case Op::kIsolate:
        c.Isolate(op.node, true);
        break;
      case Op::kHeal:
        for (uint32_t id = 1; id <= size; ++id) c.Isolate(id, false);
        break;
    }
    c.Step();  // time passes between any two events
    RC_ASSERT(!c.violation());
  }

  // Heal: faults stop, everyone comes back, and the group converges.
  c.set_faults(testing::NetworkFaults());
  for (uint32_t id = 1; id <= size; ++id) {
    c.Isolate(id, false);
    if (!c.IsUp(id)) c.Restart(id);
  }
  c.RunTicks(400);
  RC_ASSERT(!c.violation());
  for (uint32_t id = 1; id <= size; ++id) {
    for (const auto& [slot, encoded] : c.chosen()) {
      const Value* held = c.replica(id)->ChosenValue(slot);
      if (held != nullptr) RC_ASSERT(Encode(*held) == encoded);
    }
  }
  const uint64_t applied = c.Applied(1);
  for (uint32_t id = 2; id <= size; ++id) {
    RC_ASSERT(c.Applied(id) == applied);
    RC_ASSERT(c.AppHash(id) == c.AppHash(1));
  }
  RC_ASSERT(c.Leader() != 0u);
}

}  // namespace
}  // namespace synod

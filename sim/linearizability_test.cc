// Tests of the linearizability checker, named after the rule each one checks: hand-written
// histories first, then random small histories checked against a brute-force oracle.
// Helpers take ticks as (call, return); an ambiguous operation's return is ignored.

#include "sim/linearizability.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace synod::sim {
namespace {

using Verdict = CheckResult::Verdict;

// Far more than any small history here needs.
constexpr uint64_t kAmpleBudgetSteps = 1'000'000;

Operation Op(uint64_t id, const std::string& key, OpKind kind, int64_t call_tick,
             int64_t return_tick) {
  Operation op;
  op.id = id;
  op.client_id = id;
  op.key = key;
  op.kind = kind;
  op.call_tick = call_tick;
  op.return_tick = return_tick;
  return op;
}

Operation Write(uint64_t id, const std::string& key, int64_t value, int64_t call_tick,
                int64_t return_tick) {
  Operation op = Op(id, key, OpKind::kWrite, call_tick, return_tick);
  op.argument = value;
  return op;
}

Operation Read(uint64_t id, const std::string& key, int64_t observed, int64_t call_tick,
               int64_t return_tick) {
  Operation op = Op(id, key, OpKind::kRead, call_tick, return_tick);
  op.read_value = observed;
  return op;
}

Operation Increment(uint64_t id, const std::string& key, int64_t delta, int64_t call_tick,
                    int64_t return_tick) {
  Operation op = Op(id, key, OpKind::kIncrement, call_tick, return_tick);
  op.argument = delta;
  return op;
}

Operation Append(uint64_t id, const std::string& key, int64_t element, int64_t call_tick,
                 int64_t return_tick) {
  Operation op = Op(id, key, OpKind::kAppend, call_tick, return_tick);
  op.argument = element;
  return op;
}

Operation ReadList(uint64_t id, const std::string& key, std::vector<int64_t> observed,
                   int64_t call_tick, int64_t return_tick) {
  Operation op = Op(id, key, OpKind::kReadList, call_tick, return_tick);
  op.read_list = std::move(observed);
  return op;
}

// The outcome of `op` is unknown: it was called, then timed out.
Operation Ambiguous(Operation op) {
  op.ambiguous = true;
  op.return_tick = 0;
  return op;
}

CheckResult Check(const std::vector<Operation>& history) {
  return CheckLinearizable(history, kAmpleBudgetSteps);
}

void ExpectLinearizable(const std::vector<Operation>& history) {
  CheckResult result = Check(history);
  EXPECT_EQ(result.verdict, Verdict::kLinearizable) << VerdictName(result.verdict) << "\n"
                                                    << result.explanation;
  EXPECT_EQ(result.explanation, "");
}

void ExpectNotLinearizable(const std::vector<Operation>& history, const std::string& key) {
  CheckResult result = Check(history);
  EXPECT_EQ(result.verdict, Verdict::kNotLinearizable) << VerdictName(result.verdict);
  EXPECT_EQ(result.key, key);
  EXPECT_NE(result.explanation.find("key \"" + key + "\" is not linearizable"), std::string::npos)
      << result.explanation;
}

TEST(Register, SequentialLegalHistoryIsLinearizable) {
  ExpectLinearizable({
      Read(1, "x", 0, 0, 1),
      Write(2, "x", 5, 2, 3),
      Read(3, "x", 5, 4, 5),
      Write(4, "x", 6, 6, 7),
      Read(5, "x", 6, 8, 9),
  });
}

TEST(Register, EmptyHistoryIsLinearizableWithNoBudget) {
  CheckResult result = CheckLinearizable({}, 0);
  EXPECT_EQ(result.verdict, Verdict::kLinearizable);
  EXPECT_EQ(result.steps_used, 0u);
}

TEST(Register, ReadOfAValueNeverWrittenIsNotLinearizable) {
  ExpectNotLinearizable({Write(1, "x", 5, 0, 10), Read(2, "x", 7, 5, 15)}, "x");
}

TEST(Register, ReadThatStartsAfterAWriteReturnedCannotSeeTheOlderValue) {
  ExpectNotLinearizable({Write(1, "x", 5, 0, 10), Read(2, "x", 0, 11, 12)}, "x");
}

TEST(Register, ReadConcurrentWithAWriteMaySeeTheOldValue) {
  ExpectLinearizable({Write(1, "x", 5, 0, 10), Read(2, "x", 0, 5, 15)});
}

TEST(Register, ReadConcurrentWithAWriteMaySeeTheNewValue) {
  ExpectLinearizable({Write(1, "x", 5, 0, 10), Read(2, "x", 5, 5, 15)});
}

TEST(Register, OperationsThatMeetAtOneTickAreConcurrent) {
  // The read is called at the tick the write returns: either order is possible.
  ExpectLinearizable({Write(1, "x", 5, 0, 10), Read(2, "x", 0, 10, 20)});
}

TEST(Register, ReadsMustAgreeOnTheOrderOfConcurrentWrites) {
  // The writes may take effect in either order, but one reader sees 1 after 2 and another
  // sees 2 after 1, both after both writes returned.
  ExpectNotLinearizable(
      {
          Write(1, "x", 1, 0, 10),
          Write(2, "x", 2, 0, 10),
          Read(3, "x", 1, 11, 12),
          Read(4, "x", 2, 13, 14),
      },
      "x");
}

TEST(Ambiguous, HistoryLegalOnlyIfAnAmbiguousWriteTookEffectIsLinearizable) {
  // The write timed out, yet a read long after sees its value: it took effect late.
  ExpectLinearizable({
      Ambiguous(Write(1, "x", 5, 0, 0)),
      Read(2, "x", 0, 10, 20),
      Read(3, "x", 5, 100, 110),
  });
}

TEST(Ambiguous, HistoryLegalOnlyIfAnAmbiguousWriteDidNotTakeEffectIsLinearizable) {
  ExpectLinearizable({
      Write(1, "x", 1, 0, 10),
      Ambiguous(Write(2, "x", 2, 20, 0)),
      Read(3, "x", 1, 30, 40),
      Read(4, "x", 1, 1000, 1010),
  });
}

TEST(Ambiguous, AnAmbiguousWriteOnceSeenCannotBeUnseen) {
  ExpectNotLinearizable(
      {
          Write(1, "x", 1, 0, 10),
          Ambiguous(Write(2, "x", 2, 20, 0)),
          Read(3, "x", 2, 30, 40),
          Read(4, "x", 1, 50, 60),
      },
      "x");
}

TEST(Ambiguous, AnAmbiguousWriteCannotTakeEffectBeforeItWasCalled) {
  ExpectNotLinearizable({Read(1, "x", 5, 0, 10), Ambiguous(Write(2, "x", 5, 20, 0))}, "x");
}

TEST(Ambiguous, AmbiguousReadsAreIgnored) {
  ExpectLinearizable({Write(1, "x", 1, 0, 10), Ambiguous(Read(2, "x", 99, 20, 0))});
}

TEST(Counter, ConcurrentIncrementsMayBeSeenOneAtATime) {
  // Three overlapping increments; readers in between see each partial sum.
  ExpectLinearizable({
      Increment(1, "c", 1, 0, 100),
      Increment(2, "c", 10, 0, 100),
      Increment(3, "c", 100, 0, 100),
      Read(4, "c", 10, 10, 20),
      Read(5, "c", 110, 30, 40),
      Read(6, "c", 111, 50, 60),
      Read(7, "c", 111, 200, 210),
  });
}

TEST(Counter, ASumNoSubsetOfIncrementsMakesIsNotLinearizable) {
  ExpectNotLinearizable(
      {
          Increment(1, "c", 1, 0, 100),
          Increment(2, "c", 10, 0, 100),
          Read(3, "c", 12, 10, 20),
      },
      "c");
}

TEST(Counter, ReadAfterEveryIncrementReturnedSeesTheWholeSum) {
  ExpectNotLinearizable(
      {
          Increment(1, "c", 1, 0, 100),
          Increment(2, "c", 10, 0, 100),
          Read(3, "c", 10, 101, 110),
      },
      "c");
}

TEST(Counter, AnAmbiguousIncrementCountsAtMostOnce) {
  ExpectLinearizable({
      Increment(1, "c", 1, 0, 10),
      Ambiguous(Increment(2, "c", 5, 20, 0)),
      Read(3, "c", 6, 30, 40),
  });
  ExpectNotLinearizable(
      {
          Increment(1, "c", 1, 0, 10),
          Ambiguous(Increment(2, "c", 5, 20, 0)),
          Read(3, "c", 11, 30, 40),
      },
      "c");
}

TEST(Counter, AWriteSetsTheValueAndAnIncrementAddsToIt) {
  ExpectLinearizable({
      Increment(1, "c", 3, 0, 10),
      Write(2, "c", 100, 20, 30),
      Increment(3, "c", 1, 40, 50),
      Read(4, "c", 101, 60, 70),
  });
}

TEST(Counter, IncrementsWrapAroundInsteadOfOverflowing) {
  ExpectLinearizable({
      Write(1, "c", INT64_MAX, 0, 10),
      Increment(2, "c", 1, 20, 30),
      Read(3, "c", INT64_MIN, 40, 50),
  });
}

TEST(List, AppendsAreSeenInAnOrderConsistentWithTheirReturns) {
  ExpectLinearizable({
      Append(1, "l", 1, 0, 10),
      Append(2, "l", 2, 5, 20),
      Append(3, "l", 3, 5, 20),
      ReadList(4, "l", {1, 3}, 12, 18),
      ReadList(5, "l", {1, 3, 2}, 30, 40),
  });
}

TEST(List, ReadListOutOfOrderWithCompletedAppendsIsNotLinearizable) {
  // Append 1 returned before append 2 was called, so 2 cannot precede 1.
  ExpectNotLinearizable(
      {
          Append(1, "l", 1, 0, 10),
          Append(2, "l", 2, 20, 30),
          ReadList(3, "l", {2, 1}, 40, 50),
      },
      "l");
}

TEST(List, AnAmbiguousAppendMayAppearOrNot) {
  ExpectLinearizable({
      Append(1, "l", 1, 0, 10),
      Ambiguous(Append(2, "l", 2, 20, 0)),
      ReadList(3, "l", {1}, 30, 40),
      Append(4, "l", 4, 50, 60),
      ReadList(5, "l", {1, 4, 2}, 70, 80),
  });
  ExpectLinearizable({
      Append(1, "l", 1, 0, 10),
      Ambiguous(Append(2, "l", 2, 20, 0)),
      ReadList(3, "l", {1}, 30, 40),
  });
}

TEST(List, AnElementOfAnAmbiguousAppendCannotDisappear) {
  ExpectNotLinearizable(
      {
          Append(1, "l", 1, 0, 10),
          Ambiguous(Append(2, "l", 2, 20, 0)),
          ReadList(3, "l", {1, 2}, 30, 40),
          ReadList(4, "l", {1}, 50, 60),
      },
      "l");
}

TEST(Keys, IndependentKeysThatAreEachLegalAreLinearizable) {
  // As one register this would fail (a read of 0 after a write of 1 returned); as two keys
  // it is legal.
  ExpectLinearizable({
      Write(1, "a", 1, 0, 10),
      Read(2, "b", 0, 20, 30),
      Append(3, "c", 7, 0, 10),
      ReadList(4, "c", {7}, 20, 30),
      Read(5, "a", 1, 20, 30),
  });
}

TEST(Keys, FailureNamesTheOffendingKey) {
  ExpectNotLinearizable(
      {
          Write(1, "good", 1, 0, 10),
          Read(2, "good", 1, 20, 30),
          Write(3, "bad", 1, 0, 10),
          Read(4, "bad", 0, 20, 30),
          Write(5, "zzz", 1, 0, 10),
      },
      "bad");
}

TEST(Explanation, ShowsAMinimalFailingPartAndWhyNothingCanComeNext) {
  CheckResult result = Check({
      Write(1, "x", 1, 0, 10),
      Read(2, "x", 1, 5, 15),
      Write(3, "x", 2, 20, 30),
      Read(4, "x", 1, 35, 40),
      Write(5, "y", 7, 0, 10),
      Read(6, "y", 7, 11, 12),
  });
  ASSERT_EQ(result.verdict, Verdict::kNotLinearizable);
  EXPECT_EQ(result.key, "x");
  EXPECT_EQ(result.explanation,
            "key \"x\" is not linearizable. A minimal failing part of its history (3 of 4 "
            "operations):\n"
            "  op 1 client 1 write(1) at ticks [0, 10]\n"
            "  op 3 client 3 write(2) at ticks [20, 30]\n"
            "  op 4 client 4 read() = 1 at ticks [35, 40]\n"
            "Longest legal order found (2 operations): op 1, op 3\n"
            "After it the value is 2. None of the operations that may come next (called by "
            "tick 40, when op 4 returned) can:\n"
            "  op 4 client 4 read() = 1 at ticks [35, 40]: cannot observe that when the "
            "value is 2\n");
}

TEST(Explanation, ListFailureShowsTheList) {
  CheckResult result = Check({
      Append(1, "l", 1, 0, 10),
      Append(2, "l", 2, 20, 30),
      ReadList(3, "l", {2, 1}, 40, 50),
  });
  ASSERT_EQ(result.verdict, Verdict::kNotLinearizable);
  EXPECT_NE(result.explanation.find("After it the list is [1, 2]."), std::string::npos)
      << result.explanation;
  EXPECT_NE(result.explanation.find("read_list() = [2, 1] at ticks [40, 50]: cannot observe"),
            std::string::npos)
      << result.explanation;
}

TEST(Explanation, LeavesOutWritesCalledAfterEveryReadThatCouldHaveSeenThem) {
  // The second write of 0 could explain the stale read only if it came before it, and the
  // third write is of a value nobody read: neither is part of the failure.
  CheckResult result = Check({
      Write(1, "x", 1, 0, 10),
      Read(2, "x", 0, 20, 30),
      Write(3, "x", 0, 40, 50),
      Write(4, "x", 5, 60, 70),
  });
  ASSERT_EQ(result.verdict, Verdict::kNotLinearizable);
  EXPECT_NE(result.explanation.find("A minimal failing part of its history (2 of 4 operations):\n"
                                    "  op 1 client 1 write(1) at ticks [0, 10]\n"
                                    "  op 2 client 2 read() = 0 at ticks [20, 30]\n"
                                    "Longest"),
            std::string::npos)
      << result.explanation;
}

TEST(Explanation, SaysWhenTheBudgetRanOutWhileShrinking) {
  // The failure is found within the budget, but shrinking it is not finished.
  std::vector<Operation> history = {
      Write(1, "x", 1, 0, 10), Read(2, "x", 1, 0, 100), Read(3, "x", 1, 20, 30),
      Read(4, "x", 1, 40, 50), Read(5, "x", 0, 60, 70),
  };
  CheckResult full = Check(history);
  ASSERT_EQ(full.verdict, Verdict::kNotLinearizable);
  EXPECT_NE(full.explanation.find("A minimal failing part of its history (2 of 5 operations):"),
            std::string::npos)
      << full.explanation;
  CheckResult cut = CheckLinearizable(history, 20);
  ASSERT_EQ(cut.verdict, Verdict::kNotLinearizable);
  EXPECT_EQ(cut.steps_used, 20u);
  EXPECT_NE(cut.explanation.find("the budget ran out before it could be shrunk further"),
            std::string::npos)
      << cut.explanation;
}

// `writes` writes of distinct values 1, 2, ..., all concurrent, then `reads` reads one after
// another, all observing `observed`. The search tries the writes in id order, so the later
// the write of `observed` comes in that order, the fewer orders it tries before it finds
// one that ends with it; a value nobody wrote makes it rule out every order.
std::vector<Operation> ConcurrentWritesThenReads(int writes, int reads, int64_t observed) {
  std::vector<Operation> history;
  for (int i = 1; i <= writes; ++i) history.push_back(Write(i, "x", i, 0, 1000));
  for (int i = 0; i < reads; ++i) {
    history.push_back(Read(writes + 1 + i, "x", observed, 2000 + 10 * i, 2005 + 10 * i));
  }
  return history;
}

TEST(Budget, ATinyBudgetOnThirtyConcurrentWritesIsExhaustedNotPassed) {
  CheckResult result = CheckLinearizable(ConcurrentWritesThenReads(30, 30, 18), 1000);
  EXPECT_EQ(result.verdict, Verdict::kBudgetExhausted);
  EXPECT_EQ(result.key, "x");
  EXPECT_EQ(result.steps_used, 1000u);
  EXPECT_NE(result.explanation.find("budget of 1000 steps ran out on key \"x\" (60 operations)"),
            std::string::npos)
      << result.explanation;
}

TEST(Budget, ALargeBudgetDecidesThirtyConcurrentWrites) {
  CheckResult result = CheckLinearizable(ConcurrentWritesThenReads(30, 30, 18), 10'000'000);
  EXPECT_EQ(result.verdict, Verdict::kLinearizable) << result.explanation;
  EXPECT_GT(result.steps_used, 100'000u);
}

TEST(Budget, ALargeBudgetRulesOutEveryOrderOfTwelveConcurrentWrites) {
  // Failing means trying every order the memo cannot merge, which grows as 2^writes; twelve
  // keeps the test fast.
  CheckResult result = CheckLinearizable(ConcurrentWritesThenReads(12, 1, 99), 10'000'000);
  EXPECT_EQ(result.verdict, Verdict::kNotLinearizable);
  EXPECT_NE(result.explanation.find("(1 of 13 operations)"), std::string::npos)
      << result.explanation;
  EXPECT_EQ(CheckLinearizable(ConcurrentWritesThenReads(12, 1, 99), 1000).verdict,
            Verdict::kBudgetExhausted);
}

TEST(Budget, IsSharedByAllKeys) {
  std::vector<Operation> history;
  for (int i = 0; i < 3; ++i) {
    std::string key = "k" + std::to_string(i);
    history.push_back(Write(2 * i + 1, key, 1, 0, 10));
    history.push_back(Read(2 * i + 2, key, 1, 20, 30));
  }
  CheckResult enough = CheckLinearizable(history, kAmpleBudgetSteps);
  ASSERT_EQ(enough.verdict, Verdict::kLinearizable);
  CheckResult short_by_one = CheckLinearizable(history, enough.steps_used - 1);
  EXPECT_EQ(short_by_one.verdict, Verdict::kBudgetExhausted);
  EXPECT_EQ(short_by_one.key, "k2");
}

// An independent oracle for one key: tries every subset of the ambiguous operations to
// take effect and every order of those and the returned ones, keeping the orders in which
// no operation comes before one that returned before it was called.
bool BruteForceLinearizable(std::vector<Operation> ops) {
  std::erase_if(ops, [](const Operation& op) {
    return op.ambiguous && (op.kind == OpKind::kRead || op.kind == OpKind::kReadList);
  });
  std::vector<size_t> ambiguous;
  for (size_t i = 0; i < ops.size(); ++i) {
    if (ops[i].ambiguous) ambiguous.push_back(i);
  }
  for (uint64_t taken = 0; taken < (uint64_t{1} << ambiguous.size()); ++taken) {
    std::vector<size_t> order;
    for (size_t i = 0; i < ops.size(); ++i) {
      auto at = std::find(ambiguous.begin(), ambiguous.end(), i);
      if (at == ambiguous.end() || (taken >> (at - ambiguous.begin())) & 1) order.push_back(i);
    }
    do {
      bool legal = true;
      int64_t number = 0;
      std::vector<int64_t> list;
      for (size_t a = 0; a < order.size() && legal; ++a) {
        const Operation& op = ops[order[a]];
        for (size_t b = a + 1; b < order.size(); ++b) {
          const Operation& later = ops[order[b]];
          if (!later.ambiguous && later.return_tick < op.call_tick) legal = false;
        }
        switch (op.kind) {
          case OpKind::kWrite:
            number = op.argument;
            break;
          case OpKind::kIncrement:
            number += op.argument;
            break;
          case OpKind::kRead:
            legal = legal && op.read_value == number;
            break;
          case OpKind::kAppend:
            list.push_back(op.argument);
            break;
          case OpKind::kReadList:
            legal = legal && op.read_list == list;
            break;
        }
      }
      if (legal) return true;
    } while (std::next_permutation(order.begin(), order.end()));
  }
  return false;
}

// A random history of one key, mostly drawn from a real run: each operation takes effect at
// a random tick inside its interval (an ambiguous one maybe later, maybe never), reads see
// what that run gives them, and then, half the time, one operation's observation is
// corrupted (which matters only if it is a read).
std::vector<Operation> RandomHistory(std::mt19937_64& prng, bool list) {
  struct Planned {
    Operation op;
    int64_t effect_tick;
    bool takes_effect;
  };
  std::vector<Planned> plan;
  size_t count = 2 + prng() % 6;
  for (size_t i = 0; i < count; ++i) {
    Operation op;
    op.id = i + 1;
    op.client_id = i + 1;
    op.key = "k";
    bool read = prng() % 2 == 0;
    op.kind = list ? (read ? OpKind::kReadList : OpKind::kAppend)
                   : (read ? OpKind::kRead : (prng() % 2 ? OpKind::kWrite : OpKind::kIncrement));
    op.argument = 1 + static_cast<int64_t>(prng() % 3);
    op.call_tick = static_cast<int64_t>(prng() % 10);
    op.return_tick = op.call_tick + static_cast<int64_t>(prng() % 6);
    op.ambiguous = prng() % 4 == 0;
    int64_t effect_tick =
        op.call_tick +
        static_cast<int64_t>(prng() % (op.ambiguous ? 20 : op.return_tick - op.call_tick + 1));
    plan.push_back({op, effect_tick, !op.ambiguous || prng() % 2 == 0});
  }
  std::vector<size_t> by_effect(plan.size());
  for (size_t i = 0; i < plan.size(); ++i) by_effect[i] = i;
  std::stable_sort(by_effect.begin(), by_effect.end(),
                   [&](size_t a, size_t b) { return plan[a].effect_tick < plan[b].effect_tick; });
  int64_t number = 0;
  std::vector<int64_t> elements;
  for (size_t i : by_effect) {
    Operation& op = plan[i].op;
    if (!plan[i].takes_effect) continue;
    if (op.kind == OpKind::kWrite) number = op.argument;
    if (op.kind == OpKind::kIncrement) number += op.argument;
    if (op.kind == OpKind::kAppend) elements.push_back(op.argument);
    op.read_value = number;
    op.read_list = elements;
  }
  std::vector<Operation> history;
  for (Planned& planned : plan) history.push_back(planned.op);
  if (prng() % 2 == 0) {
    Operation& op = history[prng() % history.size()];
    op.read_value += 1;
    if (op.read_list.size() >= 2) {
      std::swap(op.read_list.front(), op.read_list.back());
    } else {
      op.read_list.push_back(1);
    }
  }
  return history;
}

TEST(Oracle, AgreesWithBruteForceOnSmallRandomHistories) {
  std::mt19937_64 prng(20240501);
  int linearizable = 0;
  int not_linearizable = 0;
  for (int round = 0; round < 3000; ++round) {
    std::vector<Operation> history = RandomHistory(prng, round % 2 == 1);
    bool expected = BruteForceLinearizable(history);
    CheckResult result = Check(history);
    ASSERT_EQ(result.verdict, expected ? Verdict::kLinearizable : Verdict::kNotLinearizable)
        << "round " << round << "\n"
        << result.explanation;
    ++(expected ? linearizable : not_linearizable);
  }
  // Both outcomes are well represented, so the agreement means something.
  EXPECT_GT(linearizable, 300);
  EXPECT_GT(not_linearizable, 300);
}

TEST(InvalidHistory, DuplicateIdsAreRejected) {
  CheckResult result = Check({Write(1, "x", 1, 0, 10), Read(1, "x", 1, 20, 30)});
  EXPECT_EQ(result.verdict, Verdict::kInvalidHistory);
  EXPECT_EQ(result.explanation, "two operations have id 1");
}

TEST(InvalidHistory, ReturnBeforeCallIsRejected) {
  CheckResult result = Check({Write(1, "x", 1, 10, 5)});
  EXPECT_EQ(result.verdict, Verdict::kInvalidHistory);
  EXPECT_EQ(result.key, "x");
  EXPECT_EQ(result.explanation,
            "op 1 client 1 write(1) at ticks [10, 5] returned before it was called");
}

TEST(InvalidHistory, AnUnknownKindIsRejected) {
  Operation op = Write(1, "x", 1, 0, 10);
  op.kind = static_cast<OpKind>(42);
  CheckResult result = Check({op});
  EXPECT_EQ(result.verdict, Verdict::kInvalidHistory);
  EXPECT_EQ(result.explanation, "op 1 has unknown kind 42");
}

TEST(InvalidHistory, AKeyMixingListAndNumberOperationsIsRejected) {
  CheckResult result = Check({Append(1, "x", 1, 0, 10), Read(2, "x", 1, 20, 30)});
  EXPECT_EQ(result.verdict, Verdict::kInvalidHistory);
  EXPECT_EQ(result.key, "x");
  EXPECT_EQ(result.explanation,
            "key \"x\" mixes list and number operations: op 1 client 1 append(1) at ticks "
            "[0, 10], op 2 client 2 read() = 1 at ticks [20, 30]");
}

}  // namespace
}  // namespace synod::sim

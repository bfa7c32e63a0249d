#ifndef SYNOD_SIM_LINEARIZABILITY_H_
#define SYNOD_SIM_LINEARIZABILITY_H_

// A linearizability checker for the simulator's client histories: the Wing–Gong search with
// Lowe's memoization, split per key as in Porcupine (a history is linearizable exactly when
// the sub-history of every key is, so each key is searched on its own).
//
// Each key follows one of two models, chosen by the operations on it:
//   - a number (kWrite, kIncrement, kRead), initially 0: a write sets it, an increment adds
//     to it (wrapping modulo 2^64), a read observes it. A key with only writes is a
//     register, a key with only increments a counter; mixing the two is allowed.
//   - a list (kAppend, kReadList), initially empty: an append adds one element at the end,
//     a read observes the whole list.
// A key used with operations of both models is an invalid history.
//
// The checker is deterministic: keys are searched in byte order of their names, operations
// in id order, and nothing depends on a clock, a random source, a seeded hash or floating
// point. The same history and budget give the same result, explanation included.

#include <cstdint>
#include <string>
#include <vector>

namespace synod::sim {

enum class OpKind { kWrite, kRead, kIncrement, kAppend, kReadList };

// One client operation on one key. Times are simulated ticks.
struct Operation {
  uint64_t id = 0;  // unique in the history; explanations name operations by it
  uint64_t client_id = 0;
  std::string key;
  OpKind kind = OpKind::kRead;
  int64_t argument = 0;  // kWrite: value written; kIncrement: delta; kAppend: element
  int64_t call_tick = 0;
  // When the client saw the outcome; at least call_tick. An operation whose call_tick equals
  // another's return_tick is treated as concurrent with it (ticks do not order events inside
  // one tick). Ignored when ambiguous.
  int64_t return_tick = 0;
  // The outcome is unknown (timed out, or refused after an earlier attempt may have been
  // proposed): the operation may or may not have taken effect, at any time after call_tick.
  // An ambiguous read tells nothing and is ignored.
  bool ambiguous = false;
  int64_t read_value = 0;          // kRead: value observed (0 if the key was never written)
  std::vector<int64_t> read_list;  // kReadList: elements observed, in order
};

struct CheckResult {
  enum class Verdict { kLinearizable, kNotLinearizable, kBudgetExhausted, kInvalidHistory };
  Verdict verdict = Verdict::kLinearizable;
  // The key whose sub-history is not linearizable, ran out of budget, or is invalid; empty
  // when the history is linearizable or the problem is not tied to one key (duplicate ids).
  std::string key;
  // Empty when linearizable. Otherwise a readable account. For kNotLinearizable: a minimal
  // failing part of the key's history (dropping one more read from it, or one more write,
  // increment or append that no read in it can have observed, given what the reads saw and
  // when they ran, makes it pass), the longest legal order the search found in that part,
  // and why no remaining operation can come next after it.
  std::string explanation;
  uint64_t steps_used = 0;  // search steps spent, at most the budget
};

// "linearizable", "not linearizable", "budget exhausted" or "invalid history".
const char* VerdictName(CheckResult::Verdict verdict);

// Decides whether `history` is linearizable under the models above.
//
// A returned (non-ambiguous) operation took effect exactly once, at some instant between
// its call_tick and its return_tick. An ambiguous write, increment or append took effect at
// most once, at some instant after its call_tick.
//
// `budget_steps` bounds the search steps over all keys together (one step tries one
// operation next, or backs out of one); kBudgetExhausted means the search stopped
// unfinished, which the caller must treat as a failure, not as a pass. Keys are checked in
// byte order and the first key that fails ends the check. After a key is found not
// linearizable, what remains of the budget is spent shrinking its history to a smaller
// failing part for the explanation; the verdict does not depend on it. Memory grows by at
// most one memoized configuration per step, so the budget bounds memory too.
//
// Returns kInvalidHistory, and searches nothing, when an operation has an unknown kind, two
// operations share an id, a returned operation returned before it was called, or a key
// mixes number and list operations.
CheckResult CheckLinearizable(const std::vector<Operation>& history, uint64_t budget_steps);

}  // namespace synod::sim

#endif  // SYNOD_SIM_LINEARIZABILITY_H_

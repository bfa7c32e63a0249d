#include "sim/linearizability.h"

#include <algorithm>
#include <cstddef>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "core/check.h"
#include "core/stable_hash.h"

namespace synod::sim {
namespace {

using Verdict = CheckResult::Verdict;

// An explanation lists at most this many operations per section, so that a failure in a
// long history stays readable.
constexpr size_t kExplanationOpsMax = 40;

bool IsListOp(OpKind kind) { return kind == OpKind::kAppend || kind == OpKind::kReadList; }

bool IsRead(OpKind kind) { return kind == OpKind::kRead || kind == OpKind::kReadList; }

// "1 operation", "2 operations".
std::string Operations(size_t count) {
  return std::to_string(count) + (count == 1 ? " operation" : " operations");
}

std::string ListText(const std::vector<int64_t>& elements) {
  std::string text = "[";
  for (size_t i = 0; i < elements.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(elements[i]);
  }
  return text + "]";
}

// "op 4 client 2 read() = 7 at ticks [10, 20]".
std::string OpText(const Operation& op) {
  std::string text = "op " + std::to_string(op.id) + " client " + std::to_string(op.client_id);
  switch (op.kind) {
    case OpKind::kWrite:
      text += " write(" + std::to_string(op.argument) + ")";
      break;
    case OpKind::kIncrement:
      text += " increment(" + std::to_string(op.argument) + ")";
      break;
    case OpKind::kAppend:
      text += " append(" + std::to_string(op.argument) + ")";
      break;
    case OpKind::kRead:
      text += " read() = " + std::to_string(op.read_value);
      break;
    case OpKind::kReadList:
      text += " read_list() = " + ListText(op.read_list);
      break;
  }
  if (op.ambiguous) {
    return text + " called at tick " + std::to_string(op.call_tick) + ", outcome unknown";
  }
  return text + " at ticks [" + std::to_string(op.call_tick) + ", " +
         std::to_string(op.return_tick) + "]";
}

// Two's-complement addition without signed overflow: counters wrap modulo 2^64.
int64_t WrappingAdd(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint64_t>(a) + static_cast<uint64_t>(b));
}

// Every list state one search reaches, interned: a list is the id of a node holding its
// last element and the id of the list before it, and equal lists get equal ids. So a list
// state is one integer to memoize, and each step adds at most one node.
class ListStates {
 public:
  static constexpr int64_t kEmpty = 0;

  int64_t Append(int64_t list, int64_t element) {
    SYNOD_CHECK(list >= 0 && static_cast<size_t>(list) < nodes_.size()) << list;
    auto [it, inserted] =
        children_.try_emplace({list, element}, static_cast<int64_t>(nodes_.size()));
    if (inserted) nodes_.push_back({list, element, nodes_[list].length + 1});
    SYNOD_CHECK_EQ(nodes_[it->second].length, nodes_[list].length + 1);
    return it->second;
  }

  bool Equals(int64_t list, const std::vector<int64_t>& elements) const {
    if (nodes_[list].length != elements.size()) return false;
    for (int64_t at = list; at != kEmpty; at = nodes_[at].parent) {
      if (elements[nodes_[at].length - 1] != nodes_[at].element) return false;
    }
    return true;
  }

  std::vector<int64_t> Elements(int64_t list) const {
    std::vector<int64_t> elements(nodes_[list].length);
    for (int64_t at = list; at != kEmpty; at = nodes_[at].parent) {
      elements[nodes_[at].length - 1] = nodes_[at].element;
    }
    return elements;
  }

 private:
  struct Node {
    int64_t parent = kEmpty;
    int64_t element = 0;
    size_t length = 0;
  };
  std::vector<Node> nodes_ = {Node{}};                       // nodes_[kEmpty] is the empty list
  std::map<std::pair<int64_t, int64_t>, int64_t> children_;  // (list, element) -> list
};

// The sequential specification of one key (see the header). A state is one int64_t: the
// number itself, or an interned list.
class Model {
 public:
  static constexpr int64_t kInitialState = 0;  // the number 0, or the empty list
  static_assert(kInitialState == ListStates::kEmpty);

  explicit Model(bool is_list) : is_list_(is_list) {}

  // The state after `op` takes effect in `state`, or nullopt when `op` cannot happen there
  // (a read that observed something else).
  std::optional<int64_t> Step(int64_t state, const Operation& op) {
    SYNOD_CHECK_EQ(IsListOp(op.kind), is_list_) << OpText(op);
    switch (op.kind) {
      case OpKind::kWrite:
        return op.argument;
      case OpKind::kIncrement:
        return WrappingAdd(state, op.argument);
      case OpKind::kRead:
        if (op.read_value != state) return std::nullopt;
        return state;
      case OpKind::kAppend:
        return lists_.Append(state, op.argument);
      case OpKind::kReadList:
        if (!lists_.Equals(state, op.read_list)) return std::nullopt;
        return state;
    }
    SYNOD_CHECK(false) << "unknown operation kind " << static_cast<int>(op.kind);
    return std::nullopt;
  }

  // "the value is 3" or "the list is [1, 2]".
  std::string StateText(int64_t state) const {
    if (is_list_) return "the list is " + ListText(lists_.Elements(state));
    return "the value is " + std::to_string(state);
  }

 private:
  bool is_list_;
  ListStates lists_;
};

// Hashes a memoized configuration with a hash that is the same on every run. Only lookups
// use it, never iteration, so it could not change a result anyway; a stable one keeps the
// run's memory use and speed reproducible too.
struct ConfigHash {
  size_t operator()(const std::vector<uint64_t>& config) const {
    StableHash hash;
    for (uint64_t word : config) hash.AddU64(word);
    return static_cast<size_t>(hash.value());
  }
};

// The memo key for having placed the operations whose bits are set in `placed_bits` and
// reached `state`. Bits are numbered in call order, so in a long history the placed set is
// whole words of ones, a short window, then zeros; the key keeps only the window (after the
// count of full words), so its size follows how many operations overlap rather than how
// long the history is.
std::vector<uint64_t> ConfigKey(const std::vector<uint64_t>& placed_bits, int64_t state) {
  size_t begin = 0;
  while (begin < placed_bits.size() && placed_bits[begin] == ~uint64_t{0}) ++begin;
  size_t end = placed_bits.size();
  while (end > begin && placed_bits[end - 1] == 0) --end;
  std::vector<uint64_t> key;
  key.reserve(end - begin + 2);
  key.push_back(begin);
  key.insert(key.end(), placed_bits.begin() + static_cast<std::ptrdiff_t>(begin),
             placed_bits.begin() + static_cast<std::ptrdiff_t>(end));
  key.push_back(static_cast<uint64_t>(state));
  return key;
}

// One Wing–Gong search, with Lowe's memoization, over the operations of one key. The
// history is a doubly linked list of call and return events in time order; the search
// repeatedly takes a call that comes before every remaining return (an operation that may
// go next), applies it to the model and unlinks it, and backs out when it meets a return
// first. Ambiguous operations have no return event: nothing has to follow them, and once
// every returned operation is placed, the ambiguous ones left over are placed last, or
// never, where they change nothing any read saw.
class KeySearch {
 public:
  // REQUIRES: `ops` are one key's operations of one model, in id order, with no ambiguous
  // reads and return_tick >= call_tick for every returned operation.
  explicit KeySearch(std::vector<const Operation*> ops)
      : ops_(std::move(ops)),
        model_(!ops_.empty() && IsListOp(ops_.front()->kind)),
        bit_of_op_(ops_.size(), kNone) {
    SYNOD_CHECK(!ops_.empty());
    struct Timed {
      int64_t tick;
      bool is_call;
      size_t op;
    };
    std::vector<Timed> timed;
    for (size_t i = 0; i < ops_.size(); ++i) {
      const Operation& op = *ops_[i];
      SYNOD_CHECK(!(op.ambiguous && IsRead(op.kind))) << OpText(op);
      timed.push_back({op.call_tick, true, i});
      if (!op.ambiguous) {
        SYNOD_CHECK_LE(op.call_tick, op.return_tick) << OpText(op);
        timed.push_back({op.return_tick, false, i});
        ++completed_count_;
      }
    }
    // Within a tick, calls come before returns, so that operations meeting at a tick are
    // concurrent.
    std::sort(timed.begin(), timed.end(), [](const Timed& a, const Timed& b) {
      if (a.tick != b.tick) return a.tick < b.tick;
      if (a.is_call != b.is_call) return a.is_call;
      return a.op < b.op;
    });
    events_.push_back({});  // the head sentinel
    std::vector<size_t> call_event(ops_.size(), kNone);
    size_t calls = 0;
    for (const Timed& t : timed) {
      size_t index = events_.size();
      Event event;
      event.op = t.op;
      event.is_call = t.is_call;
      event.prev = index - 1;
      events_.back().next = index;
      if (t.is_call) {
        call_event[t.op] = index;
        bit_of_op_[t.op] = calls++;
      } else {
        event.match = call_event[t.op];
        events_[event.match].match = index;
      }
      events_.push_back(event);
    }
    SYNOD_CHECK_EQ(calls, ops_.size());
  }

  // Searches for a linearization, taking one unit of `steps_left` per step; kBudgetExhausted
  // when it runs out first. Call once.
  Verdict Run(uint64_t& steps_left) {
    SYNOD_CHECK(!ran_);
    ran_ = true;
    std::vector<uint64_t> placed_bits((ops_.size() + 63) / 64, 0);
    std::unordered_set<std::vector<uint64_t>, ConfigHash> seen;
    std::vector<Frame> placed;
    int64_t state = Model::kInitialState;
    size_t completed_placed = 0;
    size_t at = events_[kHead].next;
    while (completed_placed < completed_count_) {
      if (steps_left == 0) return Verdict::kBudgetExhausted;
      --steps_left;
      // A returned operation is still unplaced, so its return event lies ahead.
      SYNOD_CHECK(at != kNone);
      const Event& event = events_[at];
      if (event.is_call) {
        const Operation& op = *ops_[event.op];
        std::optional<int64_t> next = model_.Step(state, op);
        if (next.has_value()) {
          FlipBit(placed_bits, event.op);
          if (seen.insert(ConfigKey(placed_bits, *next)).second) {
            placed.push_back({at, state});
            state = *next;
            if (!op.ambiguous) ++completed_placed;
            Unlink(at);
            RecordIfLongest(placed, state);
            at = events_[kHead].next;
            continue;
          }
          FlipBit(placed_bits, event.op);
        }
        at = event.next;
      } else {
        if (placed.empty()) return Verdict::kNotLinearizable;
        Frame last = placed.back();
        placed.pop_back();
        unchanged_depth_ = std::min(unchanged_depth_, placed.size());
        size_t undone = events_[last.call_event].op;
        FlipBit(placed_bits, undone);
        state = last.state_before;
        if (!ops_[undone]->ambiguous) --completed_placed;
        Relink(last.call_event);
        at = events_[last.call_event].next;
      }
    }
    return Verdict::kLinearizable;
  }

  const std::vector<const Operation*>& ops() const { return ops_; }
  size_t longest_order_size() const { return longest_order_.size(); }

  // After Run returned kNotLinearizable: the longest legal order the search found, and why
  // no remaining operation can come next after it.
  std::string DescribeDeadEnd() {
    SYNOD_CHECK(ran_);
    std::string text;
    std::vector<bool> in_order(ops_.size(), false);
    if (longest_order_.empty()) {
      text += "No operation can be placed first.";
    } else {
      text += "Longest legal order found (" + Operations(longest_order_.size()) + "): ";
      size_t skipped = longest_order_.size() > kExplanationOpsMax
                           ? longest_order_.size() - kExplanationOpsMax
                           : 0;
      if (skipped > 0) text += "(" + std::to_string(skipped) + " earlier) ... ";
      for (size_t i = 0; i < longest_order_.size(); ++i) {
        in_order[longest_order_[i]] = true;
        if (i < skipped) continue;
        if (i > skipped) text += ", ";
        text += "op " + std::to_string(ops_[longest_order_[i]]->id);
      }
      text += "\nAfter it " + model_.StateText(state_after_longest_) + ".";
    }
    // What may come next: everything called by the time the first remaining returned
    // operation returned.
    const Operation* first_to_return = nullptr;
    for (size_t i = 0; i < ops_.size(); ++i) {
      const Operation& op = *ops_[i];
      if (in_order[i] || op.ambiguous) continue;
      if (first_to_return == nullptr || op.return_tick < first_to_return->return_tick) {
        first_to_return = &op;
      }
    }
    SYNOD_CHECK(first_to_return != nullptr) << "a failed search left no returned operation";
    text += " None of the operations that may come next (called by tick " +
            std::to_string(first_to_return->return_tick) + ", when op " +
            std::to_string(first_to_return->id) + " returned) can:\n";
    size_t listed = 0;
    for (size_t i = 0; i < ops_.size(); ++i) {
      const Operation& op = *ops_[i];
      if (in_order[i] || op.call_tick > first_to_return->return_tick) continue;
      if (listed++ == kExplanationOpsMax) {
        text += "  ...\n";
        break;
      }
      text += "  " + OpText(op) + ": ";
      if (model_.Step(state_after_longest_, op).has_value()) {
        text += "could come next, but no order continuing from it works\n";
      } else {
        text += "cannot observe that when " + model_.StateText(state_after_longest_) + "\n";
      }
    }
    return text;
  }

 private:
  static constexpr size_t kNone = static_cast<size_t>(-1);
  static constexpr size_t kHead = 0;

  struct Event {
    size_t op = kNone;
    bool is_call = false;
    size_t match = kNone;  // a call's return event (kNone if ambiguous), a return's call
    size_t prev = kNone;
    size_t next = kNone;
  };
  struct Frame {
    size_t call_event;
    int64_t state_before;
  };

  void FlipBit(std::vector<uint64_t>& placed_bits, size_t op) const {
    size_t bit = bit_of_op_[op];
    placed_bits[bit / 64] ^= uint64_t{1} << (bit % 64);
  }

  // Removes a call and its return from the list. Relink undoes the latest Unlink.
  void Unlink(size_t call) {
    SYNOD_CHECK(events_[call].is_call);
    for (size_t at : {call, events_[call].match}) {
      if (at == kNone) continue;
      events_[events_[at].prev].next = events_[at].next;
      if (events_[at].next != kNone) events_[events_[at].next].prev = events_[at].prev;
    }
  }

  void Relink(size_t call) {
    SYNOD_CHECK(events_[call].is_call);
    for (size_t at : {events_[call].match, call}) {
      if (at == kNone) continue;
      events_[events_[at].prev].next = at;
      if (events_[at].next != kNone) events_[events_[at].next].prev = at;
    }
  }

  // Keeps a copy of the deepest stack of placed operations. Only the part above
  // unchanged_depth_ has changed since the last copy, so copying costs no more than the
  // steps that changed it.
  void RecordIfLongest(const std::vector<Frame>& placed, int64_t state) {
    if (placed.size() <= longest_order_.size()) return;
    SYNOD_CHECK_LE(unchanged_depth_, longest_order_.size());
    longest_order_.resize(unchanged_depth_);
    for (size_t depth = unchanged_depth_; depth < placed.size(); ++depth) {
      longest_order_.push_back(events_[placed[depth].call_event].op);
    }
    unchanged_depth_ = placed.size();
    state_after_longest_ = state;
  }

  std::vector<const Operation*> ops_;
  Model model_;
  std::vector<size_t> bit_of_op_;  // an operation's bit in a configuration: its call order
  std::vector<Event> events_;      // events_[kHead] is a sentinel before the first event
  size_t completed_count_ = 0;
  bool ran_ = false;
  std::vector<size_t> longest_order_;  // indices into ops_
  size_t unchanged_depth_ = 0;         // see RecordIfLongest
  int64_t state_after_longest_ = Model::kInitialState;
};

// Whether removing ops[i] keeps every linearizable history linearizable, so that when the
// smaller history fails the larger one must fail too. A read changes nothing. A write,
// increment or append can go when every read that could depend on it returned before it
// was called: such reads come before it in any linearization, and a read after it would
// have to depend on it, so nothing any read saw changes. On a key of writes only, the reads
// that could depend on a write are those that observed its value; for an append, those
// that observed its element; with increments on the key, every read.
bool RemovalKeepsLinearizable(const std::vector<const Operation*>& ops, size_t i) {
  const Operation& removed = *ops[i];
  if (IsRead(removed.kind)) return true;
  bool has_increments = std::any_of(
      ops.begin(), ops.end(), [](const Operation* op) { return op->kind == OpKind::kIncrement; });
  return std::all_of(ops.begin(), ops.end(), [&](const Operation* op) {
    bool could_depend = false;
    switch (op->kind) {
      case OpKind::kRead:
        could_depend = has_increments || op->read_value == removed.argument;
        break;
      case OpKind::kReadList:
        could_depend = std::find(op->read_list.begin(), op->read_list.end(), removed.argument) !=
                       op->read_list.end();
        break;
      case OpKind::kWrite:
      case OpKind::kIncrement:
      case OpKind::kAppend:
        break;
    }
    return !could_depend || op->return_tick < removed.call_tick;
  });
}

// Removes from the failing search's history as many as it can of the operations that
// RemovalKeepsLinearizable allows, keeping each removal after which the history still
// fails: reads first (which frees writes no remaining read observed), then the rest. Each
// pass tries all candidates at once, then halves, quarters and so on down to one at a time
// (delta debugging), so a failure that needs few of many operations costs few searches, and
// at the end no single candidate left can go. Stops when the budget runs out, reporting it
// in `shrunk_fully`.
KeySearch ShrinkFailure(KeySearch failing, uint64_t& steps_left, bool& shrunk_fully) {
  shrunk_fully = false;
  for (bool reads : {true, false}) {
    std::vector<const Operation*> candidates;  // in id order, like the history
    const std::vector<const Operation*>& ops = failing.ops();
    for (size_t i = 0; i < ops.size(); ++i) {
      if (IsRead(ops[i]->kind) == reads && RemovalKeepsLinearizable(ops, i)) {
        candidates.push_back(ops[i]);
      }
    }
    for (size_t chunk = candidates.size(); chunk > 0; chunk = chunk == 1 ? 0 : (chunk + 1) / 2) {
      size_t begin = 0;
      while (begin < candidates.size()) {
        size_t end = std::min(begin + chunk, candidates.size());
        std::set<uint64_t> removed_ids;
        for (size_t i = begin; i < end; ++i) removed_ids.insert(candidates[i]->id);
        std::vector<const Operation*> smaller;
        for (const Operation* op : failing.ops()) {
          if (removed_ids.count(op->id) == 0) smaller.push_back(op);
        }
        if (smaller.empty()) {  // the empty history is linearizable
          begin = end;
          continue;
        }
        KeySearch attempt(std::move(smaller));
        Verdict verdict = attempt.Run(steps_left);
        if (verdict == Verdict::kBudgetExhausted) return failing;
        if (verdict == Verdict::kNotLinearizable) {
          failing = std::move(attempt);
          candidates.erase(candidates.begin() + static_cast<std::ptrdiff_t>(begin),
                           candidates.begin() + static_cast<std::ptrdiff_t>(end));
        } else {
          begin = end;
        }
      }
    }
  }
  shrunk_fully = true;
  return failing;
}

std::string ExplainFailure(const std::string& key, size_t key_op_count, KeySearch& failing,
                           bool shrunk_fully) {
  const std::vector<const Operation*>& ops = failing.ops();
  std::string text = "key \"" + key + "\" is not linearizable. ";
  text += shrunk_fully ? "A minimal failing part" : "A failing part";
  text += " of its history (" + std::to_string(ops.size()) + " of " + Operations(key_op_count);
  text += shrunk_fully ? "):\n" : "; the budget ran out before it could be shrunk further):\n";
  for (size_t i = 0; i < ops.size() && i < kExplanationOpsMax; ++i) {
    text += "  " + OpText(*ops[i]) + "\n";
  }
  if (ops.size() > kExplanationOpsMax) {
    text += "  ... and " + std::to_string(ops.size() - kExplanationOpsMax) + " more\n";
  }
  return text + failing.DescribeDeadEnd();
}

CheckResult Invalid(std::string key, std::string explanation) {
  CheckResult result;
  result.verdict = Verdict::kInvalidHistory;
  result.key = std::move(key);
  result.explanation = std::move(explanation);
  return result;
}

}  // namespace

const char* VerdictName(CheckResult::Verdict verdict) {
  switch (verdict) {
    case Verdict::kLinearizable:
      return "linearizable";
    case Verdict::kNotLinearizable:
      return "not linearizable";
    case Verdict::kBudgetExhausted:
      return "budget exhausted";
    case Verdict::kInvalidHistory:
      return "invalid history";
  }
  return "unknown verdict";
}

CheckResult CheckLinearizable(const std::vector<Operation>& history, uint64_t budget_steps) {
  // Validate everything before searching anything.
  std::set<uint64_t> ids;
  std::map<std::string, const Operation*> first_op_of_key;
  std::map<std::string, std::vector<const Operation*>> ops_by_key;
  for (const Operation& op : history) {
    if (op.kind < OpKind::kWrite || op.kind > OpKind::kReadList) {
      return Invalid(op.key, "op " + std::to_string(op.id) + " has unknown kind " +
                                 std::to_string(static_cast<int>(op.kind)));
    }
    if (!ids.insert(op.id).second) {
      return Invalid("", "two operations have id " + std::to_string(op.id));
    }
    if (!op.ambiguous && op.return_tick < op.call_tick) {
      return Invalid(op.key, OpText(op) + " returned before it was called");
    }
    const Operation* first = first_op_of_key.try_emplace(op.key, &op).first->second;
    if (IsListOp(first->kind) != IsListOp(op.kind)) {
      return Invalid(op.key, "key \"" + op.key + "\" mixes list and number operations: " +
                                 OpText(*first) + ", " + OpText(op));
    }
    // An ambiguous read may have observed anything or nothing.
    if (op.ambiguous && IsRead(op.kind)) continue;
    ops_by_key[op.key].push_back(&op);
  }

  uint64_t steps_left = budget_steps;
  CheckResult result;
  for (auto& [key, ops] : ops_by_key) {
    std::sort(ops.begin(), ops.end(),
              [](const Operation* a, const Operation* b) { return a->id < b->id; });
    KeySearch search(ops);
    Verdict verdict = search.Run(steps_left);
    if (verdict == Verdict::kLinearizable) continue;
    result.verdict = verdict;
    result.key = key;
    if (verdict == Verdict::kBudgetExhausted) {
      result.explanation = "the search budget of " + std::to_string(budget_steps) +
                           " steps ran out on key \"" + key + "\" (" + Operations(ops.size()) +
                           "); the longest legal order found placed " +
                           std::to_string(search.longest_order_size()) + " of them";
    } else {
      bool shrunk_fully = false;
      KeySearch smallest = ShrinkFailure(std::move(search), steps_left, shrunk_fully);
      result.explanation = ExplainFailure(key, ops.size(), smallest, shrunk_fully);
    }
    break;
  }
  result.steps_used = budget_steps - steps_left;
  return result;
}

}  // namespace synod::sim

#include "sim/checkers.h"

#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/quorum.h"

namespace synod::sim {
namespace {

std::string Encode(const Value& v) {
  std::string s;
  SYNOD_CHECK(v.SerializeToString(&s));
  return s;
}

}  // namespace

void ChosenChecker::Chosen(uint32_t replica, uint64_t slot, const std::string& value,
                           const char* how) {
  auto [it, inserted] = chosen_.emplace(slot, value);
  if (!inserted && it->second != value && !violation_) {
    violation_ = absl::StrCat("two different values chosen at slot ", slot, " (the second ", how,
                              " at replica ", replica, ")");
  }
}

void ChosenChecker::Accepted(uint32_t replica, const LogEntry& entry) {
  if (entry.chosen() || entry.ballot().round() == 0) return;
  auto key = std::make_tuple(entry.slot(), entry.ballot().round(), entry.ballot().replica_id());
  std::string value = Encode(entry.value());
  auto& [first_value, acceptors] = acceptances_[key];
  if (acceptors.empty()) first_value = value;
  if (first_value != value && !violation_) {
    violation_ = absl::StrCat("two values proposed at slot ", entry.slot(), " in ballot (",
                              entry.ballot().round(), ",", entry.ballot().replica_id(), ")");
  }
  acceptors.insert(replica);
  if (acceptors.size() == cluster_size_ / 2 + 1) {
    Chosen(replica, entry.slot(), first_value, "accepted by a majority");
  }
}

void ChosenChecker::Committed(uint32_t replica, uint64_t slot, const Value& value) {
  // Every acceptance is recorded when it becomes durable, before anything can count it (a
  // follower's before its acknowledgement leaves, a leader's before its own vote counts):
  // a value applied before a majority holds it durably was chosen on a vote a crash could
  // still take back.
  if (!IsChosen(slot) && !violation_) {
    violation_ = absl::StrCat("replica ", replica, " applied slot ", slot,
                              " before a majority had durably accepted its value");
  }
  Chosen(replica, slot, Encode(value), "applied");
}

void AcceptorChecker::Persisted(uint32_t replica, const HardState& hard_state) {
  Ballot& highest = promised_[replica];
  if (BallotLess(highest, hard_state.promised())) highest = hard_state.promised();
}

void AcceptorChecker::Accepted(uint32_t replica, const LogEntry& entry) {
  if (entry.chosen() || violation_) return;
  const Ballot& highest = promised_[replica];
  if (BallotLess(entry.ballot(), highest)) {
    violation_ =
        absl::StrCat("replica ", replica, " accepted slot ", entry.slot(), " at ballot (",
                     entry.ballot().round(), ",", entry.ballot().replica_id(),
                     ") after promising (", highest.round(), ",", highest.replica_id(), ")");
  }
}

void AcceptorChecker::Sent(const Message& message) {
  if (!message.has_promise() || violation_) return;
  // Promises leave in the order they were made (one Ready may hold several, the highest
  // last), so they never go down, across restarts too.
  Ballot& sent = promise_sent_[message.from()];
  const Ballot* durable = &promised_[message.from()];
  for (const Ballot* highest : {durable, static_cast<const Ballot*>(&sent)}) {
    if (BallotLess(message.ballot(), *highest)) {
      violation_ =
          absl::StrCat("replica ", message.from(), " promised ballot (", message.ballot().round(),
                       ",", message.ballot().replica_id(), ") after promising (", highest->round(),
                       ",", highest->replica_id(), ")");
      return;
    }
  }
  sent = message.ballot();
}

std::optional<std::string> CheckDurableBeforeSend(const Message& message,
                                                  const DurableAcceptorState& durable,
                                                  const ChosenChecker& chosen) {
  const Ballot& b = message.ballot();
  auto ballot_text = [](const Ballot& x) {
    return absl::StrCat("(", x.round(), ",", x.replica_id(), ")");
  };
  if (message.has_promise() && BallotLess(durable.promised, b)) {
    return absl::StrCat("replica ", message.from(), " sent a promise of ballot ", ballot_text(b),
                        " to replica ", message.to(), " while its durable promise was ",
                        ballot_text(durable.promised), ": a crash now would forget the promise");
  }
  if (!message.has_accepted()) return std::nullopt;
  for (uint64_t slot : message.accepted().slots()) {
    auto it = durable.accepted.find(slot);
    if (it != durable.accepted.end() && BallotEqual(it->second, b)) continue;
    if (chosen.IsChosen(slot)) continue;
    return absl::StrCat("replica ", message.from(), " acknowledged slot ", slot, " at ballot ",
                        ballot_text(b), " to replica ", message.to(), " while its durable log ",
                        it == durable.accepted.end()
                            ? std::string("held nothing there")
                            : absl::StrCat("held it at ballot ", ballot_text(it->second)),
                        ": a crash now would forget the acceptance");
  }
  return std::nullopt;
}

std::optional<std::string> CheckRecoveryKeepsDurableState(uint32_t replica,
                                                          const PersistedState& recovered,
                                                          const DurableAcceptorState& durable) {
  auto ballot_text = [](const Ballot& x) {
    return absl::StrCat("(", x.round(), ",", x.replica_id(), ")");
  };
  Ballot promised = recovered.hard_state.promised();
  std::map<uint64_t, Ballot> accepted;
  for (const LogEntry& e : recovered.entries) {
    accepted[e.slot()] = e.ballot();
    if (BallotLess(promised, e.ballot())) promised = e.ballot();
  }
  if (BallotLess(promised, durable.promised)) {
    return absl::StrCat("replica ", replica, " recovered promise ", ballot_text(promised),
                        " from a log whose synced records promised ", ballot_text(durable.promised),
                        ", and started");
  }
  if (recovered.snapshot_meta.index() < durable.snapshot_index) {
    return absl::StrCat("replica ", replica, " recovered the snapshot at ",
                        recovered.snapshot_meta.index(), " from a log whose synced records named ",
                        durable.snapshot_index, ", and started");
  }
  for (const auto& [slot, ballot] : durable.accepted) {
    if (slot <= recovered.snapshot_meta.index()) continue;
    auto it = accepted.find(slot);
    if (it == accepted.end() || !BallotEqual(it->second, ballot)) {
      return absl::StrCat("replica ", replica, " recovered ",
                          it == accepted.end() ? std::string("nothing")
                                               : absl::StrCat("ballot ", ballot_text(it->second)),
                          " at slot ", slot, " from a log whose synced records accepted it at ",
                          ballot_text(ballot), ", and started");
    }
  }
  return std::nullopt;
}

void StateHashChecker::Observe(uint32_t replica, uint64_t revision, uint64_t hash,
                               std::optional<std::string>* failure) {
  auto [it, inserted] = first_.emplace(revision, std::make_pair(hash, replica));
  if (!inserted && it->second.first != hash && !*failure) {
    *failure = absl::StrCat("replicas ", it->second.second, " and ", replica,
                            " hold different states at revision ", revision);
  }
}

std::optional<std::string> CheckLocalReads(const std::vector<Operation>& history,
                                           const std::vector<LocalRead>& reads) {
  std::map<std::string, std::set<int64_t>> written;
  std::map<std::string, int64_t> increments;
  for (const Operation& op : history) {
    if (op.kind == OpKind::kWrite) written[op.key].insert(op.argument);
    if (op.kind == OpKind::kIncrement) increments[op.key] += op.argument;
  }
  for (const LocalRead& r : reads) {
    if (r.value == 0 || r.key.empty()) continue;
    if (r.key[0] == 'r' && written[r.key].count(r.value) == 0) {
      return absl::StrCat("a local read at replica ", r.replica, " saw value ", r.value, " of ",
                          r.key, ", which no client wrote");
    }
    if (r.key[0] == 'c' && (r.value < 0 || r.value > increments[r.key])) {
      return absl::StrCat("a local read at replica ", r.replica, " saw counter ", r.key, " = ",
                          r.value, ", more than all increments sent");
    }
  }
  return std::nullopt;
}

std::optional<std::string> CheckNoAcknowledgedWriteLost(
    const std::vector<Operation>& history,
    const std::function<absl::StatusOr<StatementResult>(const std::string& sql)>& query) {
  absl::StatusOr<StatementResult> list = query("SELECT key, element FROM list");
  absl::StatusOr<StatementResult> kv = query("SELECT key, value FROM kv");
  if (!list.ok() || !kv.ok()) return "the final state could not be read";
  std::set<std::pair<std::string, int64_t>> elements;
  for (const Row& r : list->rows()) elements.insert({r.values(0).text(), r.values(1).integer()});
  std::map<std::string, int64_t> values;
  for (const Row& r : kv->rows()) values[r.values(0).text()] = r.values(1).integer();
  std::map<std::string, std::pair<int64_t, int64_t>> counter_bounds;
  for (const Operation& op : history) {
    if (op.kind == OpKind::kAppend && !op.ambiguous && !elements.count({op.key, op.argument})) {
      return absl::StrCat("acknowledged append of ", op.argument, " to ", op.key, " is lost");
    }
    if (op.kind == OpKind::kIncrement) {
      auto& [low, high] = counter_bounds[op.key];
      if (!op.ambiguous) low += op.argument;
      high += op.argument;
    }
  }
  for (const auto& [key, bounds] : counter_bounds) {
    int64_t v = values.count(key) ? values[key] : 0;
    if (v < bounds.first || v > bounds.second) {
      return absl::StrCat("counter ", key, " = ", v, ", outside [", bounds.first, ", ",
                          bounds.second, "] of acknowledged and possible increments");
    }
  }
  return std::nullopt;
}

}  // namespace synod::sim

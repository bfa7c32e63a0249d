#ifndef SYNOD_SIM_CHECKERS_H_
#define SYNOD_SIM_CHECKERS_H_

// Checkers that judge a simulated run from outside the code under test. The
// linearizability checker has its own file (linearizability.h).

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/replica.h"
#include "core/synod.pb.h"
#include "sim/linearizability.h"

namespace synod::sim {

// At most one value is ever chosen per slot. A value is chosen when a majority durably
// accepted it at one ballot (seen from outside the replicas), and every value a replica
// hands its state machine must be that one.
class ChosenChecker {
 public:
  explicit ChosenChecker(size_t cluster_size) : cluster_size_(cluster_size) {}
  // `replica` made the acceptance of `entry` durable (entries with chosen set are learned
  // values, not acceptances, and are ignored).
  void Accepted(uint32_t replica, const LogEntry& entry);
  // `replica` applied `value` at `slot`.
  void Committed(uint32_t replica, uint64_t slot, const Value& value);
  // Whether a value is known chosen at `slot` (a majority durably accepted it, or a replica
  // applied it).
  bool IsChosen(uint64_t slot) const { return chosen_.count(slot) > 0; }
  const std::optional<std::string>& violation() const { return violation_; }

 private:
  void Chosen(uint32_t replica, uint64_t slot, const std::string& value, const char* how);

  size_t cluster_size_;
  std::map<uint64_t, std::string> chosen_;
  std::map<std::tuple<uint64_t, uint64_t, uint32_t>, std::pair<std::string, std::set<uint32_t>>>
      acceptances_;
  std::optional<std::string> violation_;
};

// The acceptor's rule, checked from outside and across restarts: once a replica has made a
// promise of ballot b durable, it never promises nor accepts below b again.
class AcceptorChecker {
 public:
  // `replica` made `hard_state` durable.
  void Persisted(uint32_t replica, const HardState& hard_state);
  // `replica` made the acceptance of `entry` durable (learned chosen values are ignored).
  void Accepted(uint32_t replica, const LogEntry& entry);
  // `replica` sent `message` (a Promise carries the promised ballot in its envelope).
  void Sent(const Message& message);
  const std::optional<std::string>& violation() const { return violation_; }

 private:
  std::map<uint32_t, Ballot> promised_;      // highest durable promise per replica
  std::map<uint32_t, Ballot> promise_sent_;  // highest ballot per replica sent in a Promise
  std::optional<std::string> violation_;
};

// What one replica's storage holds durably (synced), as recovery would read it back: kept by
// the simulated disk beside the bytes, so that the check at the send point need not decode
// the log.
struct DurableAcceptorState {
  // The highest ballot recovery would hold as promised: the promise in the hard state, or
  // the ballot of an entry accepted at a higher one (the replica takes that for a promise).
  Ballot promised;
  std::map<uint64_t, Ballot> accepted;  // slot -> the ballot its durable entry was accepted at
  // The highest snapshot a synced record names: recovery must not come back with an older
  // one (the entries it covers are gone from the log).
  uint64_t snapshot_index = 0;
};

// Durability before send: a Promise or an Accepted leaving `message.from()` must be covered
// by `durable`, that replica's durable state at that instant. A Promise's ballot is at most
// the durable promise; every slot an Accepted acknowledges is held durably at the Accepted's
// ballot, unless its value is chosen already (a replica that learned the chosen value
// acknowledges a repeated accept without writing anything: its vote changes nothing).
// Returns what is not covered, or nothing.
std::optional<std::string> CheckDurableBeforeSend(const Message& message,
                                                  const DurableAcceptorState& durable,
                                                  const ChosenChecker& chosen);

// Recovery keeps what was synced: when a replica's log recovers without an error, what it
// read back (`recovered`) holds at least the durable promise and every durably accepted
// entry not compacted away. A log that lost synced records must fail recovery instead (the
// replica then refuses to start). Returns what was forgotten, or nothing.
std::optional<std::string> CheckRecoveryKeepsDurableState(uint32_t replica,
                                                          const PersistedState& recovered,
                                                          const DurableAcceptorState& durable);

// Every replica's state hash at revision r is the same.
class StateHashChecker {
 public:
  void Observe(uint32_t replica, uint64_t revision, uint64_t hash,
               std::optional<std::string>* failure);

 private:
  std::map<uint64_t, std::pair<uint64_t, uint32_t>> first_;  // revision -> (hash, replica)
};

// A read served locally (consistency LOCAL) by `replica` at `revision`.
struct LocalRead {
  uint32_t replica = 0;
  uint64_t revision = 0;
  std::string key;
  int64_t value = 0;
};

// Local reads never show a value no client wrote (per key), and (checked by the world as
// they happen) never go back in revision on one replica.
std::optional<std::string> CheckLocalReads(const std::vector<Operation>& history,
                                           const std::vector<LocalRead>& reads);

// No acknowledged write is lost: `query` reads the final state of one caught-up replica.
// Every acknowledged append is present, each counter is at least the sum of acknowledged
// increments and at most that plus the ambiguous ones.
std::optional<std::string> CheckNoAcknowledgedWriteLost(
    const std::vector<Operation>& history,
    const std::function<absl::StatusOr<StatementResult>(const std::string& sql)>& query);

}  // namespace synod::sim

#endif  // SYNOD_SIM_CHECKERS_H_

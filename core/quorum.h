#ifndef SYNOD_CORE_QUORUM_H_
#define SYNOD_CORE_QUORUM_H_

// Ballot ordering and majority quorums, kept apart from the replica so the rules are easy
// to check on their own.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <set>
#include <tuple>
#include <vector>

#include "core/check.h"
#include "core/synod.pb.h"

namespace synod {

// Ballots are totally ordered by (round, replica_id); round 0 is "no ballot".
inline std::tuple<uint64_t, uint32_t> BallotKey(const Ballot& b) {
  return {b.round(), b.replica_id()};
}
inline bool BallotLess(const Ballot& a, const Ballot& b) { return BallotKey(a) < BallotKey(b); }
inline bool BallotEqual(const Ballot& a, const Ballot& b) { return BallotKey(a) == BallotKey(b); }
inline Ballot MakeBallot(uint64_t round, uint32_t replica_id) {
  Ballot b;
  b.set_round(round);
  b.set_replica_id(replica_id);
  return b;
}

// The replicas that answered one request; reports when a majority of `cluster_size` has.
class VoteSet {
 public:
  explicit VoteSet(size_t cluster_size) : cluster_size_(cluster_size) {
    SYNOD_CHECK(cluster_size > 0);
  }
  // Returns true if this vote is new.
  bool Add(uint32_t replica_id) { return voters_.insert(replica_id).second; }
  bool Has(uint32_t replica_id) const { return voters_.count(replica_id) > 0; }
  bool HasQuorum() const { return voters_.size() >= QuorumSize(cluster_size_); }
  size_t size() const { return voters_.size(); }
  void Clear() { voters_.clear(); }

  static size_t QuorumSize(size_t cluster_size) { return cluster_size / 2 + 1; }

 private:
  size_t cluster_size_;
  std::set<uint32_t> voters_;
};

// The largest value v such that a majority of `values` (one per replica) is >= v.
inline uint64_t QuorumMin(std::vector<uint64_t> values) {
  SYNOD_CHECK(!values.empty());
  std::sort(values.begin(), values.end(), std::greater<uint64_t>());
  return values[VoteSet::QuorumSize(values.size()) - 1];
}

}  // namespace synod

#endif  // SYNOD_CORE_QUORUM_H_

#ifndef SYNOD_CORE_DIVERGENCE_H_
#define SYNOD_CORE_DIVERGENCE_H_

// Divergence detection: every replica hashes its applied state at the same revisions and
// votes its hash through the log; a replica whose hash differs from a majority's at a
// revision knows its own state has diverged from the group's, though the same log applied
// (a damaged disk, a bug in determinism). Pure: the host computes hashes, proposes votes
// and reads the verdict. One DivergenceCheck per replica, on the host's thread.
//
// The host's contract:
//  1. After applying revision r, if WantsHashAt(r), it computes its state hash H and
//     proposes VoteFor(r, H) (a Command, through the log like any write).
//  2. For every Checkpoint command it applies, in log order, it calls OnVote().
//  3. When diverged() is set, the replica's state is wrong: it stops answering reads and
//     reports the divergence loudly (log, status, metrics) until an operator re-syncs it.
//
// Votes are not replicated state: a restarted replica has forgotten its own hashes and
// judges only revisions it hashed since. A vote never changes a database.

#include <cstdint>
#include <map>
#include <optional>
#include <set>

#include "core/synod.pb.h"

namespace synod {

// The way StateMachine::StateHash computes a hash, carried by every vote. Change it with
// the hash: a replica ignores votes of another format (during a rolling upgrade) rather than
// finding itself outvoted. 0 was the whole state hashed as one stream; 1 hashes each
// database's content on its own.
inline constexpr uint32_t kStateHashFormat = 1;

struct Divergence {
  uint64_t revision = 0;
  uint64_t own_hash = 0;
  uint64_t majority_hash = 0;
};

class DivergenceCheck {
 public:
  // REQUIRES: self_id is one of group_size replicas; every_revisions > 0.
  DivergenceCheck(uint32_t self_id, size_t group_size, uint64_t every_revisions);

  bool WantsHashAt(uint64_t revision) const {
    return revision > 0 && revision % every_revisions_ == 0;
  }
  // Records this replica's hash at `revision` and returns the vote to propose.
  Command VoteFor(uint64_t revision, uint64_t state_hash);
  // A vote applied from the log.
  void OnVote(const Checkpoint& vote);

  // Set once a majority agreed on a hash this replica's differs from (the first such).
  const std::optional<Divergence>& diverged() const { return diverged_; }
  // Replicas a majority outvoted (for status), this one included if diverged.
  const std::set<uint32_t>& outvoted_replicas() const { return outvoted_; }
  uint64_t agreed_revision() const { return agreed_revision_; }

 private:
  void Judge(uint64_t revision);

  const uint32_t self_id_;
  const size_t majority_;
  const uint64_t every_revisions_;
  // Votes by revision, then by replica; only the last kKeptRevisions hashed revisions.
  static constexpr size_t kKeptRevisions = 8;
  std::map<uint64_t, std::map<uint32_t, uint64_t>> votes_;
  std::map<uint64_t, uint64_t> own_hashes_;
  std::optional<Divergence> diverged_;
  std::set<uint32_t> outvoted_;
  uint64_t agreed_revision_ = 0;  // the last revision a majority agreed on with this replica
};

}  // namespace synod

#endif  // SYNOD_CORE_DIVERGENCE_H_

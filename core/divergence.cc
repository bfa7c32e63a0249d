#include "core/divergence.h"

#include "core/check.h"

namespace synod {

DivergenceCheck::DivergenceCheck(uint32_t self_id, size_t group_size, uint64_t every_revisions)
    : self_id_(self_id), majority_(group_size / 2 + 1), every_revisions_(every_revisions) {
  SYNOD_CHECK_GT(group_size, 0u);
  SYNOD_CHECK_GT(every_revisions, 0u);
}

Command DivergenceCheck::VoteFor(uint64_t revision, uint64_t state_hash) {
  SYNOD_CHECK(WantsHashAt(revision)) << revision;
  own_hashes_[revision] = state_hash;
  while (own_hashes_.size() > kKeptRevisions) own_hashes_.erase(own_hashes_.begin());
  Command command;
  Checkpoint* vote = command.mutable_checkpoint();
  vote->set_revision(revision);
  vote->set_state_hash(state_hash);
  vote->set_replica_id(self_id_);
  vote->set_hash_format(kStateHashFormat);
  Judge(revision);  // the others' votes may have been applied first
  return command;
}

void DivergenceCheck::OnVote(const Checkpoint& vote) {
  if (!WantsHashAt(vote.revision())) return;           // not a revision this group hashes
  if (vote.hash_format() != kStateHashFormat) return;  // not comparable with this one's
  // Only recent revisions are kept: an old vote (a slow replica's) changes no verdict.
  if (!votes_.empty() &&
      vote.revision() + every_revisions_ * kKeptRevisions < votes_.rbegin()->first) {
    return;
  }
  votes_[vote.revision()].emplace(vote.replica_id(), vote.state_hash());  // first vote counts
  while (votes_.size() > kKeptRevisions) votes_.erase(votes_.begin());
  Judge(vote.revision());
}

void DivergenceCheck::Judge(uint64_t revision) {
  auto votes = votes_.find(revision);
  if (votes == votes_.end()) return;
  std::map<uint64_t, size_t> count;  // by hash
  for (const auto& [replica, hash] : votes->second) ++count[hash];
  std::optional<uint64_t> majority_hash;
  for (const auto& [hash, n] : count) {
    if (n >= majority_) majority_hash = hash;
  }
  if (!majority_hash) return;
  for (const auto& [replica, hash] : votes->second) {
    if (hash != *majority_hash) outvoted_.insert(replica);
  }
  auto own = own_hashes_.find(revision);
  if (own == own_hashes_.end()) return;
  if (own->second == *majority_hash) {
    agreed_revision_ = std::max(agreed_revision_, revision);
  } else if (!diverged_) {
    diverged_ =
        Divergence{.revision = revision, .own_hash = own->second, .majority_hash = *majority_hash};
    outvoted_.insert(self_id_);
  }
}

}  // namespace synod

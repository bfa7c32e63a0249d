#include "core/divergence.h"

#include <gtest/gtest.h>

namespace synod {
namespace {

Checkpoint Vote(uint64_t revision, uint32_t replica, uint64_t hash,
                uint32_t format = kStateHashFormat) {
  Checkpoint vote;
  vote.set_revision(revision);
  vote.set_replica_id(replica);
  vote.set_state_hash(hash);
  vote.set_hash_format(format);
  return vote;
}

TEST(Divergence, HashesAreTakenAtTheSameRevisionsOnEveryReplica) {
  DivergenceCheck check(1, 3, 100);
  EXPECT_FALSE(check.WantsHashAt(0));
  EXPECT_FALSE(check.WantsHashAt(99));
  EXPECT_TRUE(check.WantsHashAt(100));
  EXPECT_TRUE(check.WantsHashAt(300));
  Command vote = check.VoteFor(100, 7);
  EXPECT_EQ(vote.checkpoint().revision(), 100u);
  EXPECT_EQ(vote.checkpoint().state_hash(), 7u);
  EXPECT_EQ(vote.checkpoint().replica_id(), 1u);
  EXPECT_EQ(vote.checkpoint().hash_format(), kStateHashFormat);
}

TEST(Divergence, AReplicaOutvotedByAMajorityKnowsItDiverged) {
  DivergenceCheck check(3, 3, 10);
  check.VoteFor(10, 666);
  check.OnVote(Vote(10, 1, 42));
  EXPECT_FALSE(check.diverged());  // one vote is not a majority
  check.OnVote(Vote(10, 2, 42));
  ASSERT_TRUE(check.diverged());
  EXPECT_EQ(check.diverged()->revision, 10u);
  EXPECT_EQ(check.diverged()->own_hash, 666u);
  EXPECT_EQ(check.diverged()->majority_hash, 42u);
  EXPECT_EQ(check.outvoted_replicas(), std::set<uint32_t>{3});
}

TEST(Divergence, TheMajorityReplicasSeeWhoWasOutvotedAndStayHealthy) {
  DivergenceCheck check(1, 3, 10);
  check.OnVote(Vote(10, 3, 666));
  check.OnVote(Vote(10, 2, 42));
  check.VoteFor(10, 42);  // its own vote arrives in the log after the others
  check.OnVote(Vote(10, 1, 42));
  EXPECT_FALSE(check.diverged());
  EXPECT_EQ(check.agreed_revision(), 10u);
  EXPECT_EQ(check.outvoted_replicas(), std::set<uint32_t>{3});
}

// In a rolling upgrade, replicas whose hashes are computed differently outvote nobody.
TEST(Divergence, VotesOfAnotherHashFormatAreNotCounted) {
  DivergenceCheck check(3, 3, 10);
  check.VoteFor(10, 666);
  check.OnVote(Vote(10, 1, 42, kStateHashFormat + 1));
  check.OnVote(Vote(10, 2, 42, kStateHashFormat + 1));
  EXPECT_FALSE(check.diverged());
  check.OnVote(Vote(10, 1, 42));
  check.OnVote(Vote(10, 2, 42));
  EXPECT_TRUE(check.diverged());
}

TEST(Divergence, WithoutAMajorityForOneHashNobodyIsJudged) {
  DivergenceCheck check(1, 4, 10);  // four replicas: a majority is three
  check.VoteFor(10, 1);
  check.OnVote(Vote(10, 1, 1));
  check.OnVote(Vote(10, 2, 1));
  check.OnVote(Vote(10, 3, 2));
  check.OnVote(Vote(10, 4, 2));
  EXPECT_FALSE(check.diverged());
  EXPECT_TRUE(check.outvoted_replicas().empty());
}

TEST(Divergence, AReplicaThatForgotItsHashDoesNotJudgeItself) {
  DivergenceCheck restarted(2, 3, 10);  // it hashed revision 10 before a restart
  restarted.OnVote(Vote(10, 1, 5));
  restarted.OnVote(Vote(10, 3, 5));
  restarted.OnVote(Vote(10, 2, 9));
  EXPECT_FALSE(restarted.diverged());
}

TEST(Divergence, AReplicaVotesOnceAndOldVotesAreForgotten) {
  DivergenceCheck check(1, 3, 10);
  check.VoteFor(10, 5);
  check.OnVote(Vote(10, 2, 9));
  check.OnVote(Vote(10, 2, 5));  // a second vote of replica 2 does not count
  check.OnVote(Vote(10, 1, 5));
  EXPECT_FALSE(check.diverged());
  EXPECT_EQ(check.agreed_revision(), 0u);  // replica 2's first vote disagreed: no majority yet
  for (uint64_t r = 20; r <= 200; r += 10) check.OnVote(Vote(r, 3, 1));
  check.OnVote(Vote(10, 3, 5));  // too old to be kept
  EXPECT_EQ(check.agreed_revision(), 0u);
}

}  // namespace
}  // namespace synod

// Tests of the Multi-Paxos replica, named after the protocol rules they check. The first
// group drives one Replica by hand, message by message; the second runs small clusters.

#include "core/replica.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/testing/cluster.h"

namespace synod {
namespace {

ReplicaConfig ConfigFor(uint32_t id, size_t size = 3) {
  ReplicaConfig c;
  c.id = id;
  for (uint32_t i = 1; i <= size; ++i) c.replica_ids.push_back(i);
  return c;
}

Message From(uint32_t from, uint32_t to, const Ballot& ballot, uint64_t commit = 0) {
  Message m;
  m.set_from(from);
  m.set_to(to);
  *m.mutable_ballot() = ballot;
  m.set_commit_index(commit);
  return m;
}

Value Payload(const std::string& sql) {
  Value v;
  ClientRequest* r = v.add_requests();
  r->set_client_id(1);
  r->set_sequence(1);
  r->mutable_command()->mutable_execute()->add_statements()->set_sql(sql);
  return v;
}

LogEntry Entry(uint64_t slot, const Ballot& ballot, const Value& v) {
  LogEntry e;
  e.set_slot(slot);
  *e.mutable_ballot() = ballot;
  *e.mutable_value() = v;
  return e;
}

std::vector<Message> Drain(Replica& r) {
  std::vector<Message> out;
  while (r.HasReady()) {
    Ready ready = r.GetReady();
    for (const Message& m : ready.messages) out.push_back(m);
    r.Advance(ready);
  }
  return out;
}

// Ticks until the replica starts an election; returns its Prepare messages.
std::vector<Message> TickUntilPrepare(Replica& r) {
  for (int i = 0; i < 1000; ++i) {
    r.Tick();
    std::vector<Message> out = Drain(r);
    if (!out.empty() && out[0].has_prepare()) return out;
  }
  ADD_FAILURE() << "no election started";
  return {};
}

// Replica 1 of three is elected with replica 2's promise, and replica 2 acknowledges its
// first heartbeat round (which starts its lease).
void BecomeLeaderWithAcknowledgedHeartbeat(Replica& r) {
  std::vector<Message> prepares = TickUntilPrepare(r);
  ASSERT_FALSE(prepares.empty());
  Ballot ballot = prepares[0].ballot();
  Message p = From(2, 1, ballot);
  p.mutable_promise();
  r.Step(p);
  ASSERT_EQ(r.role(), Role::kLeader);
  uint64_t context = 0;
  for (const Message& m : Drain(r)) {
    if (m.has_heartbeat()) context = m.heartbeat().read_context();
  }
  ASSERT_GT(context, 0u);
  Message ack = From(2, 1, ballot);
  ack.mutable_heartbeat_ack()->set_read_context(context);
  r.Step(ack);
  Drain(r);
}

TEST(Acceptor, PromiseIsPersistedWithMustSyncInTheReadyThatCarriesIt) {
  Replica r(ConfigFor(2), PersistedState(), 1);
  for (int i = 0; i < 8; ++i) r.Tick();  // past the restart lease wait
  Drain(r);
  Message prepare = From(1, 2, MakeBallot(7, 1));
  prepare.mutable_prepare()->set_from_slot(1);
  r.Step(prepare);
  ASSERT_TRUE(r.HasReady());
  Ready ready = r.GetReady();
  ASSERT_TRUE(ready.hard_state.has_value());
  EXPECT_EQ(ready.hard_state->promised().round(), 7u);
  EXPECT_EQ(ready.hard_state->promised().replica_id(), 1u);
  EXPECT_TRUE(ready.must_sync);
  ASSERT_EQ(ready.messages.size(), 1u);
  EXPECT_TRUE(ready.messages[0].has_promise());
  r.Advance(ready);
}

TEST(Acceptor, AcceptIsPersistedWithMustSyncInTheReadyThatAcknowledgesIt) {
  Replica r(ConfigFor(2), PersistedState(), 1);
  Message accept = From(1, 2, MakeBallot(3, 1));
  *accept.mutable_accept()->add_entries() = Entry(1, Ballot(), Payload("a"));
  r.Step(accept);
  Ready ready = r.GetReady();
  ASSERT_EQ(ready.entries.size(), 1u);
  EXPECT_EQ(ready.entries[0].slot(), 1u);
  EXPECT_EQ(ready.entries[0].ballot().round(), 3u);
  EXPECT_TRUE(ready.must_sync);
  ASSERT_EQ(ready.messages.size(), 1u);
  ASSERT_TRUE(ready.messages[0].has_accepted());
  EXPECT_EQ(ready.messages[0].accepted().slots(0), 1u);
  r.Advance(ready);
}

TEST(Acceptor, RejectsALowerBallotAndReportsTheHigherOne) {
  Replica r(ConfigFor(2), PersistedState(), 1);
  for (int i = 0; i < 8; ++i) r.Tick();
  Drain(r);
  Message prepare = From(3, 2, MakeBallot(5, 3));
  prepare.mutable_prepare()->set_from_slot(1);
  r.Step(prepare);
  Drain(r);
  Message accept = From(1, 2, MakeBallot(2, 1));
  *accept.mutable_accept()->add_entries() = Entry(1, Ballot(), Payload("late"));
  r.Step(accept);
  Ready ready = r.GetReady();
  EXPECT_TRUE(ready.entries.empty()) << "accepted below its promise";
  ASSERT_EQ(ready.messages.size(), 1u);
  const Message& nack = ready.messages[0];
  ASSERT_TRUE(nack.has_nack());
  EXPECT_EQ(nack.to(), 1u);
  EXPECT_EQ(nack.ballot().round(), 5u);
  EXPECT_EQ(nack.ballot().replica_id(), 3u);
  r.Advance(ready);
}

TEST(Acceptor, PromiseReportsAcceptedEntriesFromTheRequestedSlot) {
  Replica r(ConfigFor(2), PersistedState(), 1);
  Message accept = From(1, 2, MakeBallot(1, 1));
  *accept.mutable_accept()->add_entries() = Entry(1, Ballot(), Payload("one"));
  *accept.mutable_accept()->add_entries() = Entry(2, Ballot(), Payload("two"));
  r.Step(accept);
  Drain(r);
  for (int i = 0; i < 8; ++i) r.Tick();
  Drain(r);
  Message prepare = From(3, 2, MakeBallot(2, 3));
  prepare.mutable_prepare()->set_from_slot(2);
  r.Step(prepare);
  std::vector<Message> out = Drain(r);
  ASSERT_EQ(out.size(), 1u);
  ASSERT_TRUE(out[0].has_promise());
  ASSERT_EQ(out[0].promise().entries_size(), 1);
  EXPECT_EQ(out[0].promise().entries(0).slot(), 2u);
  EXPECT_EQ(out[0].promise().entries(0).ballot().round(), 1u);
}

TEST(Acceptor, RestartedAcceptorPromisesNobodyForALeaseDuration) {
  Replica r(ConfigFor(2), PersistedState(), 1);
  Message prepare = From(3, 2, MakeBallot(5, 3));
  prepare.mutable_prepare()->set_from_slot(1);
  r.Step(prepare);
  std::vector<Message> out = Drain(r);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_TRUE(out[0].has_nack()) << "a lease granted before the restart may still run";
}

TEST(Proposer, NewLeaderReproposesTheHighestBallotAcceptedValue) {
  // In a group of five the proposer needs two promises, so it sees both accepted values.
  Replica r5(ConfigFor(1, 5), PersistedState(), 1);
  std::vector<Message> prepares = TickUntilPrepare(r5);
  Ballot ballot = prepares[0].ballot();
  Message a = From(2, 1, ballot);
  *a.mutable_promise()->add_entries() = Entry(1, MakeBallot(1, 2), Payload("older"));
  a.mutable_promise()->set_last_slot(1);
  Message b = From(3, 1, ballot);
  *b.mutable_promise()->add_entries() = Entry(1, MakeBallot(2, 3), Payload("newer"));
  b.mutable_promise()->set_last_slot(1);
  r5.Step(a);
  r5.Step(b);
  EXPECT_EQ(r5.role(), Role::kLeader);
  std::vector<Message> out = Drain(r5);
  int accepts = 0;
  for (const Message& m : out) {
    if (!m.has_accept()) continue;
    ++accepts;
    ASSERT_EQ(m.accept().entries_size(), 1);
    EXPECT_EQ(m.accept().entries(0).slot(), 1u);
    EXPECT_EQ(m.accept().entries(0).value().requests(0).command().execute().statements(0).sql(),
              "newer");
  }
  EXPECT_EQ(accepts, 4);
}

TEST(Proposer, GapsBelowTheHighestAcceptedSlotAreFilledWithNoops) {
  Replica r(ConfigFor(1), PersistedState(), 1);
  std::vector<Message> prepares = TickUntilPrepare(r);
  Message p = From(2, 1, prepares[0].ballot());
  *p.mutable_promise()->add_entries() = Entry(3, MakeBallot(1, 2), Payload("three"));
  p.mutable_promise()->set_last_slot(3);
  r.Step(p);
  ASSERT_EQ(r.role(), Role::kLeader);
  std::map<uint64_t, Value> proposed;
  for (const Message& m : Drain(r)) {
    if (m.has_accept() && m.to() == 2) {
      for (const LogEntry& e : m.accept().entries()) proposed[e.slot()] = e.value();
    }
  }
  ASSERT_EQ(proposed.size(), 3u);
  EXPECT_TRUE(proposed[1].noop());
  EXPECT_TRUE(proposed[2].noop());
  EXPECT_FALSE(proposed[3].noop());
  EXPECT_EQ(proposed[3].requests_size(), 1);
}

TEST(Proposer, SlotsReportedChosenAreLearnedNotReproposed) {
  Replica r(ConfigFor(1), PersistedState(), 1);
  std::vector<Message> prepares = TickUntilPrepare(r);
  Message p = From(2, 1, prepares[0].ballot(), /*commit=*/1);
  LogEntry chosen = Entry(1, MakeBallot(1, 2), Payload("chosen"));
  chosen.set_chosen(true);
  *p.mutable_promise()->add_entries() = chosen;
  p.mutable_promise()->set_last_slot(1);
  r.Step(p);
  ASSERT_EQ(r.role(), Role::kLeader);
  for (const Message& m : Drain(r)) EXPECT_FALSE(m.has_accept());
  ASSERT_NE(r.ChosenValue(1), nullptr);
  EXPECT_EQ(r.commit_index(), 1u);
}

TEST(Proposer, BallotRoundIsDurableBeforeThePrepareAndNeverReused) {
  Replica r(ConfigFor(1), PersistedState(), 1);
  HardState durable;
  Ballot first;
  for (int i = 0; i < 1000 && first.round() == 0; ++i) {
    r.Tick();
    while (r.HasReady()) {
      Ready ready = r.GetReady();
      if (ready.hard_state) {
        EXPECT_TRUE(ready.must_sync);
        durable = *ready.hard_state;
      }
      for (const Message& m : ready.messages) {
        if (m.has_prepare()) {
          first = m.ballot();
          EXPECT_GE(durable.max_round_used(), first.round()) << "round used before durable";
        }
      }
      r.Advance(ready);
    }
  }
  ASSERT_GT(first.round(), 0u);
  PersistedState persisted;
  persisted.hard_state = durable;
  Replica restarted(ConfigFor(1), persisted, 2);
  std::vector<Message> again = TickUntilPrepare(restarted);
  ASSERT_FALSE(again.empty());
  EXPECT_GT(again[0].ballot().round(), first.round());
}

TEST(Proposer, LeaderStepsDownWhenItHearsAHigherBallot) {
  Replica r(ConfigFor(1), PersistedState(), 1);
  std::vector<Message> prepares = TickUntilPrepare(r);
  Message p = From(2, 1, prepares[0].ballot());
  p.mutable_promise();
  r.Step(p);
  ASSERT_EQ(r.role(), Role::kLeader);
  Drain(r);
  Message nack = From(3, 1, MakeBallot(prepares[0].ballot().round() + 1, 3));
  nack.mutable_nack();
  r.Step(nack);
  EXPECT_EQ(r.role(), Role::kFollower);
}

TEST(Proposer, ALeaderThatLearnsAnotherValueChosenWhereItProposedStopsLeading) {
  // Replica 1 leads at b1 and proposes v at slot 1; meanwhile a higher ballot chose w there.
  // If it kept leading and announced commit 1, a follower holding v at b1 would take v for
  // chosen.
  Replica r(ConfigFor(1, 5), PersistedState(), 1);
  std::vector<Message> prepares = TickUntilPrepare(r);
  Ballot b1 = prepares[0].ballot();
  for (uint32_t from : {2u, 3u}) {
    Message p = From(from, 1, b1);
    p.mutable_promise();
    r.Step(p);
  }
  ASSERT_EQ(r.role(), Role::kLeader);
  Drain(r);
  ClientRequest write;
  write.set_client_id(1);
  write.set_sequence(1);
  write.mutable_command()->mutable_execute()->add_statements()->set_sql("v");
  r.Propose(write);
  Drain(r);
  Message catchup = From(4, 1, MakeBallot(b1.round() + 1, 4), /*commit=*/1);
  LogEntry chosen = Entry(1, MakeBallot(b1.round() + 1, 4), Payload("w"));
  chosen.set_chosen(true);
  *catchup.mutable_catchup_response()->add_entries() = chosen;
  r.Step(catchup);
  EXPECT_NE(r.role(), Role::kLeader);
  for (const Message& m : Drain(r)) {
    EXPECT_FALSE(BallotEqual(m.ballot(), b1) && m.commit_index() >= 1 && m.has_heartbeat())
        << "announced a commit index covering a slot chosen at another ballot";
  }
  ASSERT_NE(r.ChosenValue(1), nullptr);
  EXPECT_EQ(r.ChosenValue(1)->requests(0).command().execute().statements(0).sql(), "w");
}

TEST(Reads, LinearizableReadWaitsForAQuorumRoundAfterItArrived) {
  Replica r(ConfigFor(1), PersistedState(), 1);
  std::vector<Message> prepares = TickUntilPrepare(r);
  Ballot ballot = prepares[0].ballot();
  Message p = From(2, 1, ballot);
  p.mutable_promise();
  r.Step(p);
  ASSERT_EQ(r.role(), Role::kLeader);
  Drain(r);
  ClientRequest read;
  read.set_client_id(9);
  read.set_sequence(1);
  read.mutable_command()->mutable_read_barrier()->set_consistency(LINEARIZABLE);
  r.Propose(read);
  Ready ready = r.GetReady();
  EXPECT_TRUE(ready.replies.empty()) << "answered before confirming leadership";
  uint64_t context = 0;
  for (const Message& m : ready.messages) {
    if (m.has_heartbeat()) context = m.heartbeat().read_context();
  }
  r.Advance(ready);
  ASSERT_GT(context, 0u);
  Message ack = From(2, 1, ballot);
  ack.mutable_heartbeat_ack()->set_read_context(context);
  r.Step(ack);
  ready = r.GetReady();
  ASSERT_EQ(ready.replies.size(), 1u);
  EXPECT_EQ(ready.replies[0].code(), OK);
  EXPECT_EQ(ready.replies[0].client_id(), 9u);
  r.Advance(ready);
}

TEST(Reads, LeaseReadIsRefusedWhenTheLeaseMayHaveExpired) {
  ReplicaConfig config = ConfigFor(1);
  Replica r(config, PersistedState(), 1);
  BecomeLeaderWithAcknowledgedHeartbeat(r);
  ClientRequest read;
  read.set_client_id(4);
  read.mutable_command()->mutable_read_barrier()->set_consistency(LEASE);
  auto lease_read = [&](uint64_t sequence) {
    read.set_sequence(sequence);
    r.Propose(read);
    Ready ready = r.GetReady();
    r.Advance(ready);
    EXPECT_EQ(ready.replies.size(), 1u);
    return ready.replies.empty() ? UNAVAILABLE : ready.replies[0].code();
  };
  EXPECT_EQ(lease_read(1), OK);
  // No further acknowledgements: the lease counted from the acknowledged heartbeat lasts
  // lease_duration_ticks - clock_drift_bound_ticks.
  int valid_ticks = config.lease_duration_ticks - config.clock_drift_bound_ticks;
  for (int i = 0; i < valid_ticks; ++i) {
    r.Tick();
    Drain(r);
  }
  EXPECT_EQ(lease_read(2), UNAVAILABLE);
}

TEST(Reads, LeaseAccountsForTheClockDriftBound) {
  ReplicaConfig config = ConfigFor(1);
  config.clock_drift_bound_ticks = 3;
  Replica r(config, PersistedState(), 1);
  BecomeLeaderWithAcknowledgedHeartbeat(r);
  for (int i = 0; i < config.lease_duration_ticks - config.clock_drift_bound_ticks - 1; ++i) {
    r.Tick();
    Drain(r);
  }
  EXPECT_TRUE(r.Status().lease_valid);
  r.Tick();
  Drain(r);
  EXPECT_FALSE(r.Status().lease_valid) << "lease outlived duration minus drift bound";
}

// ---------------------------------------------------------------------------------------
// Clusters.

uint32_t ElectLeader(testing::Cluster& c) {
  for (int i = 0; i < 500 && c.Leader() == 0; ++i) c.Step();
  return c.Leader();
}

TEST(Cluster, DuelingProposersSettleOnOneLeader) {
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    testing::Cluster c(5, seed);
    ASSERT_NE(ElectLeader(c), 0u) << "seed " << seed;
    c.RunTicks(50);
    int leaders = 0;
    for (uint32_t id = 1; id <= 5; ++id) leaders += c.replica(id)->role() == Role::kLeader;
    EXPECT_EQ(leaders, 1) << "seed " << seed;
  }
}

TEST(Cluster, AValueAcceptedByAMajoritySurvivesTheLeaderCrashingBeforeItIsLearned) {
  testing::Cluster c(3, 21);
  uint32_t leader = ElectLeader(c);
  ASSERT_NE(leader, 0u);
  c.RunTicks(5);
  leader = c.Leader();
  ASSERT_NE(leader, 0u);
  c.Write(leader, 1, 1, "precious");
  c.Crash(leader);  // its accepts are already on the wire
  c.RunTicks(100);
  ASSERT_FALSE(c.violation()) << *c.violation();
  ASSERT_NE(c.Leader(), 0u);
  bool found = false;
  for (const auto& [slot, encoded] : c.chosen()) {
    found |= encoded.find("precious") != std::string::npos;
  }
  EXPECT_TRUE(found) << "the chosen value was lost";
  uint32_t survivor = leader % 3 + 1;
  EXPECT_GE(c.Applied(survivor), 1u);
}

TEST(Cluster, ALeaderUnderSteadyLoadKeepsLeadingAndHoldsItsLease) {
  // Commit announcements go out on every Ready under load; they must confirm leadership
  // like periodic heartbeats do, or the leader steps down for want of quorum contact.
  testing::Cluster c(3, 23);
  uint32_t leader = ElectLeader(c);
  ASSERT_NE(leader, 0u);
  c.RunTicks(5);
  leader = c.Leader();
  Ballot ballot = c.replica(leader)->Status().ballot;
  for (uint64_t seq = 1; seq <= 300; ++seq) {
    c.Write(leader, 1, seq, "w");
    c.Step();
    ASSERT_EQ(c.Leader(), leader) << "leadership changed under load at write " << seq;
  }
  EXPECT_TRUE(BallotEqual(c.replica(leader)->Status().ballot, ballot));
  EXPECT_TRUE(c.replica(leader)->Status().lease_valid);
  c.RunTicks(10);
  EXPECT_EQ(c.applied_writes().size(), 300u);
}

TEST(Cluster, FollowerForwardsWritesAndEveryReplicaAppliesThem) {
  testing::Cluster c(3, 7);
  uint32_t leader = ElectLeader(c);
  ASSERT_NE(leader, 0u);
  uint32_t follower = leader % 3 + 1;
  for (uint64_t seq = 1; seq <= 20; ++seq) c.Write(follower, 5, seq, "w" + std::to_string(seq));
  c.RunTicks(50);
  EXPECT_EQ(c.applied_writes().size(), 20u);
  for (uint32_t id = 1; id <= 3; ++id) {
    EXPECT_EQ(c.Applied(id), c.Applied(leader));
    EXPECT_EQ(c.AppHash(id), c.AppHash(leader));
  }
  EXPECT_FALSE(c.violation());
}

TEST(Cluster, ManyRequestsAreBatchedIntoFewSlots) {
  testing::Cluster c(3, 3);
  uint32_t leader = ElectLeader(c);
  ASSERT_NE(leader, 0u);
  uint64_t before = c.replica(leader)->commit_index();
  for (uint64_t seq = 1; seq <= 500; ++seq) c.Write(leader, seq, 1, "x");
  c.RunTicks(50);
  EXPECT_EQ(c.applied_writes().size(), 500u);
  EXPECT_LE(c.replica(leader)->commit_index() - before, 64u) << "no batching or pipelining";
}

TEST(Cluster, LaggingReplicaCatchesUpThroughASnapshotAfterCompaction) {
  testing::Cluster c(3, 11);
  c.set_compact_every(5);
  uint32_t leader = ElectLeader(c);
  ASSERT_NE(leader, 0u);
  uint32_t lagging = leader % 3 + 1;
  c.Crash(lagging);
  for (uint64_t seq = 1; seq <= 40; ++seq) {
    c.Write(leader, 1, seq, "v" + std::to_string(seq));
    c.RunTicks(2);
  }
  c.RunTicks(20);
  ASSERT_GT(c.replica(leader)->Status().snapshot_index, 10u);
  c.Restart(lagging);
  c.RunTicks(200);
  EXPECT_EQ(c.Applied(lagging), c.Applied(leader));
  EXPECT_EQ(c.AppHash(lagging), c.AppHash(leader));
  EXPECT_GE(c.replica(lagging)->Status().snapshot_index, 10u) << "caught up without snapshot";
  EXPECT_FALSE(c.violation());
}

TEST(Cluster, LeaseReadsStopWhenTheLeaderLosesItsQuorum) {
  testing::Cluster c(3, 5);
  uint32_t leader = ElectLeader(c);
  ASSERT_NE(leader, 0u);
  c.RunTicks(10);
  leader = c.Leader();
  ASSERT_NE(leader, 0u);
  c.Read(leader, 77, 1, LEASE);
  ASSERT_TRUE(c.replies().count({77, 1}));
  EXPECT_EQ(c.replies().at({77, 1}).code(), OK);
  for (uint32_t id = 1; id <= 3; ++id) {
    if (id != leader) c.Crash(id);
  }
  c.RunTicks(ReplicaConfig().lease_duration_ticks);
  ASSERT_EQ(c.replica(leader)->role(), Role::kLeader) << "stepped down before the lease ran out";
  c.Read(leader, 77, 2, LEASE);
  ASSERT_TRUE(c.replies().count({77, 2}));
  EXPECT_EQ(c.replies().at({77, 2}).code(), UNAVAILABLE);
}

TEST(Cluster, LinearizableReadAtAFollowerReturnsARevisionCoveringAcknowledgedWrites) {
  testing::Cluster c(3, 9);
  uint32_t leader = ElectLeader(c);
  ASSERT_NE(leader, 0u);
  uint32_t follower = leader % 3 + 1;
  for (uint64_t seq = 1; seq <= 5; ++seq) c.Write(leader, 3, seq, "w");
  c.RunTicks(20);
  ASSERT_EQ(c.applied_writes().size(), 5u);
  uint64_t last_write_slot = c.applied_writes().at({3, 5});
  c.Read(follower, 8, 1, LINEARIZABLE);
  c.RunTicks(20);
  ASSERT_TRUE(c.replies().count({8, 1}));
  EXPECT_EQ(c.replies().at({8, 1}).code(), OK);
  EXPECT_GE(c.replies().at({8, 1}).read_revision(), last_write_slot);
}

TEST(Cluster, AWriteWithoutAQuorumIsNeverAcknowledged) {
  testing::Cluster c(3, 13);
  uint32_t leader = ElectLeader(c);
  ASSERT_NE(leader, 0u);
  for (uint32_t id = 1; id <= 3; ++id) {
    if (id != leader) c.Crash(id);
  }
  c.Write(leader, 6, 1, "lost");
  c.RunTicks(100);
  EXPECT_EQ(c.applied_writes().count({6, 1}), 0u);
  EXPECT_TRUE(c.chosen().empty());
  EXPECT_NE(c.replica(leader)->role(), Role::kLeader) << "kept leading without a quorum";
}

TEST(Cluster, ARequestThatFindsNoLeaderIsRefusedAfterTheRequestTimeout) {
  testing::Cluster c(3, 17);
  uint32_t leader = ElectLeader(c);
  ASSERT_NE(leader, 0u);
  for (uint32_t id = 1; id <= 3; ++id) {
    if (id != leader) c.Crash(id);
  }
  c.RunTicks(30);  // the leader steps down: it hears from no majority
  ASSERT_EQ(c.Leader(), 0u);
  c.Write(leader, 6, 1, "refused");
  c.RunTicks(ReplicaConfig().request_timeout_ticks + 2);
  ASSERT_TRUE(c.replies().count({6, 1}));
  EXPECT_EQ(c.replies().at({6, 1}).code(), UNAVAILABLE);
  EXPECT_EQ(c.applied_writes().count({6, 1}), 0u);
}

}  // namespace
}  // namespace synod

// Tests of the Multi-Paxos replica, named after the protocol rules they check. The first
// group drives one Replica by hand, message by message; the second runs small clusters.

#include "core/replica.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <set>
#include <sstream>
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
    for (const Message& m : ready.early_messages) out.push_back(m);
    for (const Message& m : ready.messages) out.push_back(m);
    r.Advance(ready);
  }
  return out;
}

// The answer of `pre_vote.to()` to a PreVote.
Message PreVoteAnswer(const Message& pre_vote, bool granted) {
  Message m = From(pre_vote.to(), pre_vote.from(), Ballot());
  m.mutable_pre_vote_reply()->set_attempt(pre_vote.pre_vote().attempt());
  m.mutable_pre_vote_reply()->set_granted(granted);
  return m;
}

// Ticks until the replica starts an election (every peer grants its pre-vote); returns its
// Prepare messages.
std::vector<Message> TickUntilPrepare(Replica& r) {
  for (int i = 0; i < 1000; ++i) {
    r.Tick();
    std::vector<Message> out = Drain(r);
    if (!out.empty() && out[0].has_pre_vote()) {
      for (const Message& m : out) r.Step(PreVoteAnswer(m, true));
      out = Drain(r);
    }
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

// What a test can see of a replica, as text, so that a failed comparison shows what changed.
std::string Observable(const Replica& r) {
  ReplicaStatus s = r.Status();
  std::ostringstream out;
  out << RoleName(s.role) << " leader=" << s.leader_id << " ballot=" << s.ballot.round() << "."
      << s.ballot.replica_id() << " commit=" << s.commit_index << " applied=" << s.applied_index
      << " first=" << s.first_log_index << " snapshot=" << s.snapshot_index
      << " lease=" << s.lease_valid << " pending=" << s.pending_requests
      << " inflight=" << s.inflight_slots << " ready=" << r.HasReady();
  for (const auto& [peer, ticks] : s.peer_last_heard_ticks) out << " heard" << peer << "=" << ticks;
  for (const auto& [peer, slot] : s.peer_match_index) out << " match" << peer << "=" << slot;
  for (uint64_t slot = 1; slot <= 4; ++slot)
    out << " chosen" << slot << "=" << !!r.ChosenValue(slot);
  return out.str();
}

// Steps `m` into `r` (drained) and expects it dropped: counted, for a reason that mentions
// `why`, and with no other effect.
void ExpectDropped(Replica& r, const Message& m, const std::string& why) {
  ASSERT_FALSE(r.HasReady()) << "drain the replica first";
  const std::string before = Observable(r);
  const uint64_t rejected = r.Status().rejected_message_count;
  r.Step(m);
  EXPECT_EQ(Observable(r), before);
  EXPECT_EQ(r.Status().rejected_message_count, rejected + 1);
  EXPECT_NE(r.Status().last_rejection.find(why), std::string::npos)
      << "rejected as: " << r.Status().last_rejection;
}

// `r` hears leader `leader` announce commit index `commit` and asks it for what it lacks;
// returns that catch-up request.
Message HearCommitAndAskForCatchup(Replica& r, uint32_t leader, uint64_t commit) {
  Message heartbeat = From(leader, r.id(), MakeBallot(1, leader), commit);
  heartbeat.mutable_heartbeat()->set_read_context(1);
  r.Step(heartbeat);
  Message request;
  for (const Message& m : Drain(r)) {
    if (m.has_catchup_request()) request = m;
  }
  EXPECT_TRUE(request.has_catchup_request()) << "no catch-up request";
  EXPECT_EQ(request.to(), leader);
  return request;
}

// The snapshot image the transfer tests move, in chunks of 4 bytes.
const char kImage[] = "abcdefgh";

Message Chunk(uint32_t from, uint32_t to, uint64_t index, uint64_t size_bytes, uint64_t offset,
              const std::string& data, bool last, uint64_t checksum = SnapshotChecksum(kImage)) {
  Message m = From(from, to, MakeBallot(1, from), /*commit=*/index);
  SnapshotChunk* chunk = m.mutable_snapshot_chunk();
  chunk->mutable_meta()->set_index(index);
  chunk->mutable_meta()->set_size_bytes(size_bytes);
  chunk->mutable_meta()->set_checksum(checksum);
  chunk->set_offset(offset);
  chunk->set_data(data);
  chunk->set_last(last);
  return m;
}

// Ticks `r` until it sends a catch-up request or a snapshot acknowledgement; returns it.
std::optional<Message> TickUntilCatchupMessage(Replica& r) {
  for (int i = 0; i < 100; ++i) {
    r.Tick();
    for (const Message& m : Drain(r)) {
      if (m.has_catchup_request() || m.has_snapshot_ack()) return m;
    }
  }
  return std::nullopt;
}

// Replica `r` asks `peer` to catch up to `commit` and hears that it needs a snapshot.
void AskForSnapshot(Replica& r, uint32_t peer, uint64_t commit) {
  HearCommitAndAskForCatchup(r, peer, commit);
  Message needs_snapshot = From(peer, r.id(), MakeBallot(1, peer), commit);
  needs_snapshot.mutable_catchup_response()->set_needs_snapshot(true);
  r.Step(needs_snapshot);
  Drain(r);
}

// A SnapshotAck from replica 2 to replica 1, at commit index `commit`.
Message SnapshotAckFrom2(uint64_t commit, uint64_t index, uint64_t next_offset,
                         uint64_t checksum = 0) {
  Message m = From(2, 1, Ballot(), commit);
  m.mutable_snapshot_ack()->set_index(index);
  m.mutable_snapshot_ack()->set_next_offset(next_offset);
  m.mutable_snapshot_ack()->set_checksum(checksum);
  return m;
}

// A replica that has compacted its log into a snapshot at `index` holding `data` (the
// image itself is the host's: see FillChunks).
PersistedState SnapshotHeld(uint64_t index, const std::string& data) {
  PersistedState p;
  p.snapshot_meta.set_index(index);
  p.snapshot_meta.set_size_bytes(data.size());
  p.snapshot_meta.set_checksum(SnapshotChecksum(data));
  p.applied_index = index;
  return p;
}

// What the host driver does to the snapshot chunks a replica sends: fills in their bytes
// from `image`, in chunks of `chunk_bytes`.
void FillChunks(std::vector<Message>& messages, const std::string& image, size_t chunk_bytes) {
  for (Message& m : messages) {
    if (!m.has_snapshot_chunk()) continue;
    SnapshotChunk* chunk = m.mutable_snapshot_chunk();
    EXPECT_TRUE(chunk->data().empty()) << "a replica sent bytes of a snapshot it does not hold";
    chunk->set_data(image.substr(chunk->offset(), chunk_bytes));
    chunk->set_last(chunk->offset() + chunk->data().size() == image.size());
  }
}

// The bytes of the snapshot chunks a Ready hands to the host's store.
std::string ChunkBytes(const Ready& ready) {
  std::string bytes;
  for (const SnapshotChunk& chunk : ready.snapshot_chunks) bytes += chunk.data();
  return bytes;
}

ClientRequest Write(uint64_t client_id, uint64_t sequence, const std::string& sql) {
  ClientRequest r;
  r.set_client_id(client_id);
  r.set_sequence(sequence);
  r.mutable_command()->mutable_execute()->add_statements()->set_sql(sql);
  return r;
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

TEST(Acceptor, AHeartbeatAcknowledgementWaitsForNoFsyncUnlessItsPromiseDoes) {
  Replica r(ConfigFor(2), PersistedState(), 1);
  Message heartbeat = From(1, 2, MakeBallot(1, 1), /*commit=*/0);
  heartbeat.mutable_heartbeat()->set_read_context(1);
  // The first heartbeat of a new ballot raises this replica's promise: its acknowledgement
  // says so, and leaves only once that is durable.
  r.Step(heartbeat);
  Ready ready = r.GetReady();
  EXPECT_TRUE(ready.must_sync);
  ASSERT_EQ(ready.messages.size(), 1u);
  EXPECT_TRUE(ready.messages[0].has_heartbeat_ack());
  EXPECT_TRUE(ready.early_messages.empty());
  r.Advance(ready);
  // The next ones acknowledge nothing new: they may leave before this Ready is persisted,
  // and while an earlier one is (TakeEarlyMessages).
  heartbeat.mutable_heartbeat()->set_read_context(2);
  r.Step(heartbeat);
  std::vector<Message> early = r.TakeEarlyMessages();
  ASSERT_EQ(early.size(), 1u);
  EXPECT_EQ(early[0].heartbeat_ack().read_context(), 2u);
  heartbeat.mutable_heartbeat()->set_read_context(3);
  r.Step(heartbeat);
  ready = r.GetReady();
  EXPECT_TRUE(ready.messages.empty());
  ASSERT_EQ(ready.early_messages.size(), 1u);
  EXPECT_EQ(ready.early_messages[0].heartbeat_ack().read_context(), 3u);
  r.Advance(ready);
}

TEST(Leader, HeartbeatsWaitForNoFsyncOnceTheBallotIsDurable) {
  Replica r(ConfigFor(1), PersistedState(), 1);
  BecomeLeaderWithAcknowledgedHeartbeat(r);
  // A write in flight (its accepts and its own write not yet durable) and the next
  // heartbeat round: the heartbeats go with the accepts, ahead of the leader's fsync.
  r.Propose(Write(7, 1, "INSERT INTO t VALUES (1)"));
  for (int i = 0; i < ConfigFor(1).heartbeat_interval_ticks; ++i) r.Tick();
  Ready ready = r.GetReady();
  int heartbeats = 0;
  for (const Message& m : ready.early_messages) heartbeats += m.has_heartbeat() ? 1 : 0;
  for (const Message& m : ready.messages) EXPECT_FALSE(m.has_heartbeat());
  EXPECT_EQ(heartbeats, 2);
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
      std::vector<Message> pre_votes;
      for (const Message& m : ready.messages) {
        if (m.has_prepare()) {
          first = m.ballot();
          EXPECT_GE(durable.max_round_used(), first.round()) << "round used before durable";
        }
        if (m.has_pre_vote()) pre_votes.push_back(m);
      }
      r.Advance(ready);
      for (const Message& m : pre_votes) r.Step(PreVoteAnswer(m, true));
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

// The first messages a replica sends once its election timer runs out.
std::vector<Message> TickUntilMessages(Replica& r) {
  for (int i = 0; i < 1000; ++i) {
    r.Tick();
    std::vector<Message> out = Drain(r);
    if (!out.empty()) return out;
  }
  ADD_FAILURE() << "no message sent";
  return {};
}

Message PreVoteFrom(uint32_t from, uint32_t to, uint64_t attempt) {
  Message m = From(from, to, Ballot());
  m.mutable_pre_vote()->set_attempt(attempt);
  return m;
}

std::optional<PreVoteReply> PreVoteReplyIn(const std::vector<Message>& messages) {
  for (const Message& m : messages) {
    if (m.has_pre_vote_reply()) return m.pre_vote_reply();
  }
  return std::nullopt;
}

TEST(Elections, AFollowerAsksItsPeersBeforeItRaisesItsBallot) {
  Replica r(ConfigFor(1), PersistedState(), 1);
  std::vector<Message> asked = TickUntilMessages(r);
  ASSERT_EQ(asked.size(), 2u);
  for (const Message& m : asked) ASSERT_TRUE(m.has_pre_vote()) << m.ShortDebugString();
  EXPECT_EQ(r.Status().ballot.round(), 0u) << "the ballot rose before a majority agreed";

  // Both peers refuse: no prepare, and the ballot stays where it was.
  for (const Message& m : asked) r.Step(PreVoteAnswer(m, false));
  EXPECT_TRUE(Drain(r).empty());
  EXPECT_EQ(r.role(), Role::kFollower);
  EXPECT_EQ(r.Status().ballot.round(), 0u);

  // It asks again after another timeout. A grant to the earlier attempt, arriving late, is
  // not counted; one peer granting this attempt makes a majority of three with itself.
  std::vector<Message> again = TickUntilMessages(r);
  ASSERT_FALSE(again.empty());
  ASSERT_TRUE(again[0].has_pre_vote());
  EXPECT_GT(again[0].pre_vote().attempt(), asked[0].pre_vote().attempt());
  r.Step(PreVoteAnswer(asked[0], true));
  EXPECT_TRUE(Drain(r).empty());
  r.Step(PreVoteAnswer(again[0], true));
  std::vector<Message> prepares = Drain(r);
  ASSERT_FALSE(prepares.empty());
  EXPECT_TRUE(prepares[0].has_prepare());
  EXPECT_EQ(prepares[0].ballot().round(), 1u);
  EXPECT_EQ(r.Status().elections_started, 1u);
}

TEST(Elections, AReplicaThatHeardALeaderWithinTheElectionTimeoutRefusesAPreVote) {
  ReplicaConfig config = ConfigFor(2);
  Replica r(config, PersistedState(), 1);
  Message heartbeat = From(1, 2, MakeBallot(1, 1));
  heartbeat.mutable_heartbeat();
  r.Step(heartbeat);
  Drain(r);
  r.Step(PreVoteFrom(3, 2, 7));
  std::optional<PreVoteReply> reply = PreVoteReplyIn(Drain(r));
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->attempt(), 7u);
  EXPECT_FALSE(reply->granted());
  // An election timeout without a word from the leader: it may be gone.
  for (int i = 0; i < config.election_timeout_ticks; ++i) r.Tick();
  Drain(r);
  r.Step(PreVoteFrom(3, 2, 8));
  reply = PreVoteReplyIn(Drain(r));
  ASSERT_TRUE(reply);
  EXPECT_TRUE(reply->granted());
}

TEST(Elections, ALeaderRefusesAPreVote) {
  Replica r(ConfigFor(1), PersistedState(), 1);
  BecomeLeaderWithAcknowledgedHeartbeat(r);
  ASSERT_EQ(r.role(), Role::kLeader);
  r.Step(PreVoteFrom(3, 1, 1));
  std::optional<PreVoteReply> reply = PreVoteReplyIn(Drain(r));
  ASSERT_TRUE(reply);
  EXPECT_FALSE(reply->granted());
}

TEST(Elections, ALeaderAMajorityFollowsWinsBackAnAcceptorThatPromisedAHigherBallot) {
  Replica r(ConfigFor(1), PersistedState(), 1);
  BecomeLeaderWithAcknowledgedHeartbeat(r);
  ASSERT_TRUE(r.Status().lease_valid);
  // Replica 3 promised a candidate that got no further (before a partition healed).
  Message nack = From(3, 1, MakeBallot(5, 2));
  nack.mutable_nack();
  r.Step(nack);
  std::vector<Message> out = Drain(r);
  ASSERT_FALSE(out.empty());
  EXPECT_TRUE(out[0].has_prepare());
  EXPECT_EQ(out[0].ballot().round(), 6u);
  EXPECT_EQ(out[0].ballot().replica_id(), 1u);
  EXPECT_EQ(r.role(), Role::kCandidate);
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
  // Replica 4 shows it knows slot 1 chosen; replica 1 asks it for the value.
  Message notice = From(4, 1, MakeBallot(b1.round() + 1, 4), /*commit=*/1);
  notice.mutable_heartbeat_ack();
  r.Step(notice);
  bool asked = false;
  for (const Message& m : Drain(r)) asked |= m.has_catchup_request() && m.to() == 4;
  ASSERT_TRUE(asked);
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

TEST(Proposer, TheLeaderProposesNoSlotBeyondTheSlotWindowOfItsCommitIndex) {
  // max_inflight_slots counts unchosen slots only: with slot 1 stalled, later slots are
  // chosen and leave the count, but followers drop accepts beyond their commit index plus
  // the window, so the leader must stop at the window's edge until slot 1 is chosen.
  ReplicaConfig config = ConfigFor(1);
  config.max_batch_requests = 1;  // one write per slot
  config.max_inflight_slots = 4;
  config.max_catchup_entries = 4;
  config.max_slots_beyond_commit = 8;
  Replica r(config, PersistedState(), 1);
  BecomeLeaderWithAcknowledgedHeartbeat(r);
  ASSERT_EQ(r.role(), Role::kLeader);
  const Ballot ballot = r.Status().ballot;
  for (uint64_t seq = 1; seq <= 20; ++seq) r.Propose(Write(1, seq, "w"));
  // Replica 2 acknowledges every accept it gets but those for `stalled`.
  uint64_t highest = 0;
  auto acknowledge_all_but = [&](uint64_t stalled) {
    for (bool more = true; more;) {
      more = false;
      for (const Message& m : Drain(r)) {
        if (!m.has_accept() || m.to() != 2) continue;
        for (const LogEntry& e : m.accept().entries()) {
          highest = std::max(highest, e.slot());
          if (e.slot() == stalled) continue;
          Message accepted = From(2, 1, ballot);
          accepted.mutable_accepted()->add_slots(e.slot());
          r.Step(accepted);
          more = true;
        }
      }
    }
  };
  acknowledge_all_but(/*stalled=*/1);
  EXPECT_EQ(highest, config.max_slots_beyond_commit) << "proposed beyond the slot window";
  EXPECT_EQ(r.commit_index(), 0u);
  EXPECT_EQ(r.Status().inflight_slots, 1u);
  EXPECT_EQ(r.Status().pending_requests, 12u);

  Message accepted = From(2, 1, ballot);
  accepted.mutable_accepted()->add_slots(1);
  r.Step(accepted);
  acknowledge_all_but(/*stalled=*/0);
  EXPECT_EQ(highest, 20u);
  EXPECT_EQ(r.commit_index(), 20u);
  EXPECT_EQ(r.Status().pending_requests, 0u);
  EXPECT_EQ(r.Status().rejected_message_count, 0u);
}

// Proposes a linearizable read (client 9) to leader `r`, expects no answer yet, and returns
// the read context of the heartbeat round it started.
uint64_t ProposeLinearizableRead(Replica& r) {
  ClientRequest read;
  read.set_client_id(9);
  read.set_sequence(1);
  read.mutable_command()->mutable_read_barrier()->set_consistency(LINEARIZABLE);
  r.Propose(read);
  Ready ready = r.GetReady();
  EXPECT_TRUE(ready.replies.empty()) << "answered before a round confirmed the leadership";
  uint64_t context = 0;
  for (const auto* messages : {&ready.early_messages, &ready.messages}) {
    for (const Message& m : *messages) {
      if (m.has_heartbeat()) context = m.heartbeat().read_context();
    }
  }
  r.Advance(ready);
  return context;
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
  uint64_t context = ProposeLinearizableRead(r);
  ASSERT_GT(context, 0u);
  Message ack = From(2, 1, ballot);
  ack.mutable_heartbeat_ack()->set_read_context(context);
  r.Step(ack);
  Ready ready = r.GetReady();
  ASSERT_EQ(ready.replies.size(), 1u);
  EXPECT_EQ(ready.replies[0].code(), OK);
  EXPECT_EQ(ready.replies[0].client_id(), 9u);
  r.Advance(ready);
}

// The round under way when a read arrives may have been acknowledged before it, by a follower
// that has promised a new leader since (nothing stops it without leases): only a later round
// confirms the read.
TEST(Reads, LinearizableReadIsNotConfirmedByARoundAcknowledgedBeforeItArrived) {
  Replica r(ConfigFor(1), PersistedState(), 1);
  BecomeLeaderWithAcknowledgedHeartbeat(r);
  ASSERT_EQ(r.role(), Role::kLeader);
  const Ballot ballot = r.Status().ballot;
  uint64_t context = ProposeLinearizableRead(r);
  ASSERT_GT(context, 1u) << "no new round started for the read";
  auto acknowledge = [&](uint64_t round) {
    Message ack = From(2, 1, ballot);
    ack.mutable_heartbeat_ack()->set_read_context(round);
    r.Step(ack);
    std::vector<ForwardReply> replies;
    while (r.HasReady()) {
      Ready next = r.GetReady();
      replies.insert(replies.end(), next.replies.begin(), next.replies.end());
      r.Advance(next);
    }
    return replies;
  };
  EXPECT_TRUE(acknowledge(context - 1).empty()) << "confirmed by a repeated old acknowledgement";
  std::vector<ForwardReply> replies = acknowledge(context);
  ASSERT_EQ(replies.size(), 1u);
  EXPECT_EQ(replies[0].code(), OK);
  EXPECT_EQ(replies[0].client_id(), 9u);
}

// Each round renews the leader's lease for lease_duration_ticks - clock_drift_bound_ticks:
// heartbeats at that interval or slower would let it lapse between every two rounds.
TEST(Reads, AHeartbeatIntervalAsLongAsTheLeaderCountsOnItsLeaseIsRefused) {
  ReplicaConfig config = ConfigFor(1);
  config.lease_duration_ticks = 8;
  config.clock_drift_bound_ticks = 3;
  config.heartbeat_interval_ticks = 4;
  { Replica fits(config, PersistedState(), 1); }
  config.heartbeat_interval_ticks = 5;
  EXPECT_DEATH(Replica(config, PersistedState(), 1), "heartbeat interval");
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
// Sanity checks: a message that fails one is dropped before it changes anything.

TEST(Sanity, DropsAMessageFromAnUnknownReplica) {
  Replica r(ConfigFor(2), PersistedState(), 1);
  Message prepare = From(9, 2, MakeBallot(7, 9));
  prepare.mutable_prepare()->set_from_slot(1);
  ExpectDropped(r, prepare, "not in the group");
  Message from_itself = From(2, 2, MakeBallot(7, 2));
  from_itself.mutable_prepare()->set_from_slot(1);
  ExpectDropped(r, from_itself, "from this replica itself");
}

TEST(Sanity, DropsAMessageAddressedToAnotherReplica) {
  Replica r(ConfigFor(2), PersistedState(), 1);
  Message accept = From(1, 3, MakeBallot(1, 1));
  *accept.mutable_accept()->add_entries() = Entry(1, Ballot(), Payload("a"));
  ExpectDropped(r, accept, "addressed to another replica");
}

TEST(Sanity, RefusesABallotRoundThatWouldOverflow) {
  ReplicaConfig config = ConfigFor(1);
  config.max_ballot_round_jump = UINT64_MAX;  // the cap alone
  Replica r(config, PersistedState(), 1);
  for (int i = 0; i < 8; ++i) r.Tick();  // past the restart lease wait
  Drain(r);
  for (uint64_t round : {UINT64_MAX, kMaxBallotRound}) {
    Message prepare = From(2, 1, MakeBallot(round, 2));
    prepare.mutable_prepare()->set_from_slot(1);
    ExpectDropped(r, prepare, "kMaxBallotRound");
  }
  // A candidate is not pushed to the top of the round space by a nack either.
  std::vector<Message> prepares = TickUntilPrepare(r);
  ASSERT_FALSE(prepares.empty());
  EXPECT_EQ(prepares[0].ballot().round(), 1u) << "the round wrapped or jumped";
  Message nack = From(3, 1, MakeBallot(UINT64_MAX, 3));
  nack.mutable_nack();
  ExpectDropped(r, nack, "kMaxBallotRound");
  EXPECT_EQ(r.role(), Role::kCandidate);
  uint64_t next_round = 1;
  for (int i = 0; i < 1000 && next_round == 1; ++i) {
    r.Tick();
    for (const Message& m : Drain(r)) {
      next_round = std::max(next_round, m.ballot().round());
      if (m.has_pre_vote()) r.Step(PreVoteAnswer(m, true));
    }
  }
  EXPECT_EQ(next_round, 2u);
}

TEST(Sanity, RefusesABallotRoundFarAboveAnySeen) {
  ReplicaConfig config = ConfigFor(2);
  Replica r(config, PersistedState(), 1);
  for (int i = 0; i < 8; ++i) r.Tick();
  Drain(r);
  Message prepare = From(1, 2, MakeBallot(config.max_ballot_round_jump + 1, 1));
  prepare.mutable_prepare()->set_from_slot(1);
  ExpectDropped(r, prepare, "max_ballot_round_jump");
  prepare.mutable_ballot()->set_round(config.max_ballot_round_jump);
  r.Step(prepare);
  std::vector<Message> out = Drain(r);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_TRUE(out[0].has_promise()) << "the largest allowed jump is refused";
  EXPECT_EQ(r.Status().ballot.round(), config.max_ballot_round_jump);
}

TEST(Sanity, DropsAProposerMessageAtAnotherReplicasBallot) {
  Replica r(ConfigFor(2), PersistedState(), 1);
  Message accept = From(3, 2, MakeBallot(5, 1));
  *accept.mutable_accept()->add_entries() = Entry(1, Ballot(), Payload("a"));
  ExpectDropped(r, accept, "another replica's ballot");
  Message heartbeat = From(3, 2, MakeBallot(5, 1));
  heartbeat.mutable_heartbeat();
  ExpectDropped(r, heartbeat, "another replica's ballot");
}

TEST(Sanity, DropsAnAcceptFarBeyondTheCommitIndex) {
  ReplicaConfig config = ConfigFor(2);
  Replica r(config, PersistedState(), 1);
  Message accept = From(1, 2, MakeBallot(1, 1));
  *accept.mutable_accept()->add_entries() = Entry(uint64_t{1} << 40, Ballot(), Payload("far"));
  ExpectDropped(r, accept, "beyond the slot window");
  const uint64_t edge = config.max_slots_beyond_commit;
  accept.mutable_accept()->mutable_entries(0)->set_slot(edge + 1);
  ExpectDropped(r, accept, "beyond the slot window");
  accept.mutable_accept()->mutable_entries(0)->set_slot(edge);
  r.Step(accept);
  Ready ready = r.GetReady();
  ASSERT_EQ(ready.entries.size(), 1u) << "the last slot of the window is refused";
  EXPECT_EQ(ready.entries[0].slot(), edge);
  r.Advance(ready);
}

TEST(Sanity, ANewLeaderProposesNoFurtherThanTheSlotWindow) {
  // The attack: one acceptor reports a slot far ahead, and the new leader would propose a
  // no-op in every slot below it.
  ReplicaConfig config = ConfigFor(1);
  config.max_slots_beyond_commit = 64;
  Replica r(config, PersistedState(), 1);
  std::vector<Message> prepares = TickUntilPrepare(r);
  ASSERT_FALSE(prepares.empty());
  Message promise = From(2, 1, prepares[0].ballot());
  promise.mutable_promise()->set_last_slot(uint64_t{1} << 40);
  ExpectDropped(r, promise, "beyond the slot window");
  promise.mutable_promise()->set_last_slot(3);
  *promise.mutable_promise()->add_entries() = Entry(65, MakeBallot(1, 2), Payload("far"));
  ExpectDropped(r, promise, "outside the slot window");
  Message ahead = From(2, 1, prepares[0].ballot(), /*commit=*/65);
  ahead.mutable_promise();
  ExpectDropped(r, ahead, "beyond the slot window");
  EXPECT_EQ(r.role(), Role::kCandidate);

  promise.mutable_promise()->clear_entries();
  promise.mutable_promise()->set_last_slot(64);
  r.Step(promise);
  ASSERT_EQ(r.role(), Role::kLeader);
  std::set<uint64_t> proposed;
  for (const Message& m : Drain(r)) {
    for (const LogEntry& e : m.accept().entries()) proposed.insert(e.slot());
  }
  EXPECT_EQ(proposed.size(), 64u);
  EXPECT_EQ(*proposed.rbegin(), 64u);
}

TEST(Sanity, AReplicaFarBehindStillFollowsTheLeaderAndCatchesUp) {
  // The commit index a message carries is not held to the window: it is how a replica
  // learns that it is behind. What it may not do is accept beyond the window.
  ReplicaConfig config = ConfigFor(2);
  config.max_slots_beyond_commit = 64;
  Replica r(config, PersistedState(), 1);
  Message request = HearCommitAndAskForCatchup(r, 1, /*commit=*/10000);
  EXPECT_EQ(r.Status().leader_id, 1u);
  EXPECT_EQ(request.catchup_request().from_slot(), 1u);
  EXPECT_EQ(request.catchup_request().to_slot(), config.max_catchup_entries);
  Message accept = From(1, 2, MakeBallot(1, 1), /*commit=*/10000);
  *accept.mutable_accept()->add_entries() = Entry(10001, Ballot(), Payload("new"));
  ExpectDropped(r, accept, "beyond the slot window");
}

TEST(Sanity, DropsACatchupAnswerNobodyAskedFor) {
  Replica r(ConfigFor(2), PersistedState(), 1);
  Message answer = From(1, 2, MakeBallot(1, 1), /*commit=*/1);
  LogEntry forged = Entry(1, Ballot(), Payload("DELETE FROM t"));
  forged.set_chosen(true);
  *answer.mutable_catchup_response()->add_entries() = forged;
  ExpectDropped(r, answer, "did not ask");
  EXPECT_EQ(r.ChosenValue(1), nullptr);
  EXPECT_EQ(r.commit_index(), 0u);
}

TEST(Sanity, TakesACatchupAnswerOnlyFromThePeerAskedForTheSlotsAsked) {
  Replica r(ConfigFor(2), PersistedState(), 1);
  HearCommitAndAskForCatchup(r, 1, /*commit=*/3);
  auto answer = [](uint32_t from, std::vector<uint64_t> slots, bool chosen) {
    Message m = From(from, 2, MakeBallot(1, 1), /*commit=*/4);
    for (uint64_t slot : slots) {
      LogEntry e = Entry(slot, Ballot(), Payload("v" + std::to_string(slot)));
      e.set_chosen(chosen);
      *m.mutable_catchup_response()->add_entries() = e;
    }
    return m;
  };
  ExpectDropped(r, answer(3, {1}, true), "did not ask");
  ExpectDropped(r, answer(1, {1, 4}, true), "outside the slots asked for");
  ExpectDropped(r, answer(1, {1}, false), "not marked chosen");
  Message beyond_sender = answer(1, {3}, true);
  beyond_sender.set_commit_index(2);
  ExpectDropped(r, beyond_sender, "beyond its sender's commit index");

  r.Step(answer(1, {1, 2, 3}, true));
  EXPECT_EQ(r.Status().rejected_message_count, 4u);
  EXPECT_EQ(r.commit_index(), 3u);
  Ready ready = r.GetReady();
  ASSERT_EQ(ready.committed.size(), 3u);
  EXPECT_EQ(ready.committed[2].value.requests(0).command().execute().statements(0).sql(), "v3");
  r.Advance(ready);
}

TEST(Sanity, DropsASnapshotChunkNobodyAskedFor) {
  // The attack: one chunk, first and last, of an image that is not a snapshot at all.
  Replica r(ConfigFor(2), PersistedState(), 1);
  ExpectDropped(r, Chunk(1, 2, 5, 4, 0, "junk", true), "did not ask");
  EXPECT_EQ(r.Status().snapshot_index, 0u);
}

TEST(Sanity, TakesSnapshotChunksOnlyFromThePeerAskedAndInOrder) {
  Replica r(ConfigFor(2), PersistedState(), 1);
  AskForSnapshot(r, 1, /*commit=*/10);

  ExpectDropped(r, Chunk(3, 2, 10, 8, 0, "abcd", false), "did not ask");
  ExpectDropped(r, Chunk(1, 2, 10, 8, 4, "efgh", true), "no transfer under way");
  ExpectDropped(r, Chunk(1, 2, 10, 8, 0, "abcdefghij", true), "past the snapshot's size");
  ExpectDropped(r, Chunk(1, 2, 10, 8, 0, "abcd", true), "last flag");
  Message beyond_sender = Chunk(1, 2, 11, 8, 0, "abcd", false);
  beyond_sender.set_commit_index(10);
  ExpectDropped(r, beyond_sender, "beyond its sender's commit index");

  r.Step(Chunk(1, 2, 10, 8, 0, "abcd", false));
  std::vector<Message> out = Drain(r);
  ASSERT_EQ(out.size(), 1u);
  ASSERT_TRUE(out[0].has_snapshot_ack());
  EXPECT_EQ(out[0].snapshot_ack().next_offset(), 4u);
  ExpectDropped(r, Chunk(1, 2, 10, 8, 0, "abcd", false), "out of order");
  ExpectDropped(r, Chunk(1, 2, 10, 9, 4, "efgh", false), "no transfer under way");

  r.Step(Chunk(1, 2, 10, 8, 4, "efgh", true));
  Ready ready = r.GetReady();
  ASSERT_TRUE(ready.snapshot.has_value());
  ASSERT_EQ(ready.snapshot_chunks.size(), 1u);
  EXPECT_EQ(ready.snapshot_chunks[0].offset(), 4u);
  EXPECT_EQ(ChunkBytes(ready), "efgh");
  EXPECT_EQ(ready.snapshot->meta.index(), 10u);
  EXPECT_TRUE(ready.must_sync);
  r.Advance(ready);
  EXPECT_EQ(r.commit_index(), 10u);
  EXPECT_EQ(r.Status().rejected_message_count, 7u);
}

TEST(Sanity, ASnapshotSplicedFromTwoImagesIsDroppedWholeNeverInstalled) {
  // The sender restarted between two chunks with another image at the same index and of the
  // same size. Its checksum names it: a chunk of it does not continue the transfer of the
  // first, and an image whose bytes do not match the checksum its chunks named is dropped.
  const std::string other = "abcdWXYZ";
  Replica r(ConfigFor(2), PersistedState(), 1);
  AskForSnapshot(r, 1, /*commit=*/10);
  r.Step(Chunk(1, 2, 10, 8, 0, "abcd", false));
  Drain(r);
  ExpectDropped(r, Chunk(1, 2, 10, 8, 4, "WXYZ", true, SnapshotChecksum(other)),
                "no transfer under way");
  ExpectDropped(r, Chunk(1, 2, 10, 8, 0, "abcd", false, 0), "no checksum");

  // A sender that names one image and sends bytes of another (its image file is damaged).
  r.Step(Chunk(1, 2, 10, 8, 4, "WXYZ", true));
  Ready ready = r.GetReady();
  EXPECT_FALSE(ready.snapshot.has_value()) << "a spliced image reached the host";
  EXPECT_TRUE(ready.snapshot_chunks.empty()) << "its last chunk went to the store";
  EXPECT_EQ(ready.compacted_through, 0u);
  r.Advance(ready);
  EXPECT_EQ(r.commit_index(), 0u);
  EXPECT_EQ(r.Status().last_rejection, "a snapshot whose bytes do not match its checksum");
}

TEST(Sanity, AResumeOfAnotherImageAtTheSameIndexStartsOver) {
  ReplicaConfig config = ConfigFor(1);
  config.snapshot_chunk_bytes = 4;
  Replica r(config, SnapshotHeld(10, "abcdWXYZ"), 1);
  // The image it had.
  Message resume = SnapshotAckFrom2(/*commit=*/5, 10, 4, SnapshotChecksum(kImage));
  r.Step(resume);
  std::vector<Message> out = Drain(r);
  ASSERT_EQ(out.size(), 1u);
  ASSERT_TRUE(out[0].has_snapshot_chunk());
  EXPECT_EQ(out[0].snapshot_chunk().offset(), 0u) << "bytes of two images would be spliced";
  EXPECT_EQ(out[0].snapshot_chunk().meta().checksum(), SnapshotChecksum("abcdWXYZ"));
  // The same image resumes where the receiver stopped.
  resume.mutable_snapshot_ack()->set_checksum(SnapshotChecksum("abcdWXYZ"));
  r.Step(resume);
  out = Drain(r);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].snapshot_chunk().offset(), 4u);
}

TEST(Sanity, AStalledSnapshotTransferAsksItsSenderForTheRestBeforeAnotherPeer) {
  ReplicaConfig config = ConfigFor(2);
  config.election_timeout_ticks = 100;  // no election gets in the way
  Replica r(config, PersistedState(), 1);
  HearCommitAndAskForCatchup(r, 1, /*commit=*/10);
  r.Step(Chunk(1, 2, 10, 8, 0, "abcd", false));
  Drain(r);
  // The next chunk is lost. The replica first asks replica 1 again for the rest of the
  // transfer: another peer would start it over.
  std::optional<Message> next = TickUntilCatchupMessage(r);
  ASSERT_TRUE(next.has_value());
  EXPECT_EQ(next->to(), 1u);
  ASSERT_TRUE(next->has_snapshot_ack()) << "started the transfer over";
  EXPECT_EQ(next->snapshot_ack().index(), 10u);
  EXPECT_EQ(next->snapshot_ack().next_offset(), 4u);
  // Replica 1 stays silent: the replica asks replica 3 in turn...
  next = TickUntilCatchupMessage(r);
  ASSERT_TRUE(next.has_value());
  EXPECT_EQ(next->to(), 3u);
  EXPECT_TRUE(next->has_catchup_request());
  // ...and, 3 silent too, comes back to 1 and again asks for the rest.
  next = TickUntilCatchupMessage(r);
  ASSERT_TRUE(next.has_value());
  EXPECT_EQ(next->to(), 1u);
  ASSERT_TRUE(next->has_snapshot_ack()) << "started the transfer over";
  EXPECT_EQ(next->snapshot_ack().next_offset(), 4u);
  r.Step(Chunk(1, 2, 10, 8, 4, "efgh", true));
  Ready ready = r.GetReady();
  ASSERT_TRUE(ready.snapshot.has_value());
  EXPECT_EQ(ChunkBytes(ready), "efgh");
  r.Advance(ready);
  EXPECT_EQ(r.Status().rejected_message_count, 0u);
}

TEST(Sanity, ALostSnapshotChunkIsSentAgainByTheSameSenderFromTheBytesHeld) {
  // Two real replicas: 1 holds a snapshot at 10 in two chunks, 2 has nothing.
  ReplicaConfig sender_config = ConfigFor(1);
  sender_config.snapshot_chunk_bytes = 4;
  Replica sender(sender_config, SnapshotHeld(10, "abcdefgh"), 1);
  ReplicaConfig receiver_config = ConfigFor(2);
  receiver_config.election_timeout_ticks = 100;  // no election gets in the way
  Replica receiver(receiver_config, PersistedState(), 2);

  const std::string image = "abcdefgh";
  sender.Step(HearCommitAndAskForCatchup(receiver, 1, /*commit=*/10));
  std::vector<Message> answer = Drain(sender);
  FillChunks(answer, image, 4);
  ASSERT_EQ(answer.size(), 2u);
  EXPECT_TRUE(answer[0].catchup_response().needs_snapshot());
  ASSERT_TRUE(answer[1].has_snapshot_chunk());
  EXPECT_EQ(answer[1].snapshot_chunk().offset(), 0u);
  for (const Message& m : answer) receiver.Step(m);
  std::vector<Message> ack = Drain(receiver);
  ASSERT_EQ(ack.size(), 1u);
  sender.Step(ack[0]);
  std::vector<Message> lost = Drain(sender);
  FillChunks(lost, image, 4);
  ASSERT_EQ(lost.size(), 1u);
  ASSERT_TRUE(lost[0].has_snapshot_chunk());
  EXPECT_EQ(lost[0].snapshot_chunk().offset(), 4u);

  // The second chunk is lost. The receiver asks the sender for the rest, and gets it.
  std::optional<Message> resume = TickUntilCatchupMessage(receiver);
  ASSERT_TRUE(resume.has_value());
  EXPECT_EQ(resume->to(), 1u);
  ASSERT_TRUE(resume->has_snapshot_ack()) << "started the transfer over";
  EXPECT_EQ(resume->snapshot_ack().next_offset(), 4u);
  sender.Step(*resume);
  std::vector<Message> rest = Drain(sender);
  FillChunks(rest, image, 4);
  ASSERT_EQ(rest.size(), 1u);
  ASSERT_TRUE(rest[0].has_snapshot_chunk());
  EXPECT_GT(rest[0].snapshot_chunk().offset(), 0u) << "the transfer started over";
  EXPECT_EQ(rest[0].snapshot_chunk().offset(), 4u);
  receiver.Step(rest[0]);
  Ready ready = receiver.GetReady();
  ASSERT_TRUE(ready.snapshot.has_value());
  EXPECT_EQ(ChunkBytes(ready), "efgh");
  receiver.Advance(ready);
  EXPECT_EQ(receiver.commit_index(), 10u);
  EXPECT_EQ(sender.Status().rejected_message_count, 0u);
  EXPECT_EQ(receiver.Status().rejected_message_count, 0u);
}

TEST(Sanity, AResumeOfASnapshotTheSenderNoLongerHoldsGetsTheStartOfTheOneItHolds) {
  // Replica 2 resumes a transfer of a snapshot at 12 from replica 1, which holds one at 10
  // now (it restarted with an older one). Replica 2, at 5, still lacks what that one holds.
  ReplicaConfig config = ConfigFor(1);
  config.snapshot_chunk_bytes = 4;
  Replica r(config, SnapshotHeld(10, "abcdefgh"), 1);
  Message resume = SnapshotAckFrom2(/*commit=*/5, 12, 4);
  r.Step(resume);
  std::vector<Message> out = Drain(r);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].to(), 2u);
  ASSERT_TRUE(out[0].has_snapshot_chunk());
  EXPECT_EQ(out[0].snapshot_chunk().meta().index(), 10u);
  EXPECT_EQ(out[0].snapshot_chunk().offset(), 0u);
  EXPECT_TRUE(out[0].snapshot_chunk().data().empty()) << "the host reads the bytes";
  EXPECT_EQ(r.Status().rejected_message_count, 0u);
  // Of no use to a replica that has reached 10, and past the end of the one held: dropped.
  resume.set_commit_index(10);
  ExpectDropped(r, resume, "does not hold");
  Message past_end = SnapshotAckFrom2(/*commit=*/5, 10, 9, SnapshotChecksum(kImage));
  ExpectDropped(r, past_end, "does not hold");
}

TEST(Sanity, DropsAHeartbeatAcknowledgementForARoundNeverSent) {
  Replica r(ConfigFor(1), PersistedState(), 1);
  BecomeLeaderWithAcknowledgedHeartbeat(r);
  Message ack = From(3, 1, r.Status().ballot);
  ack.mutable_heartbeat_ack()->set_read_context(1000);
  ExpectDropped(r, ack, "round never sent");
}

TEST(Sanity, DropsMalformedMessagesOfEveryKind) {
  Replica r(ConfigFor(2), PersistedState(), 1);
  const Ballot b = MakeBallot(1, 1);
  ExpectDropped(r, From(1, 2, b), "no body");

  Message no_ballot_owner = From(1, 2, MakeBallot(1, 0));
  no_ballot_owner.mutable_nack();
  ExpectDropped(r, no_ballot_owner, "malformed ballot");
  Message stranger_ballot = From(1, 2, MakeBallot(1, 9));
  stranger_ballot.mutable_nack();
  ExpectDropped(r, stranger_ballot, "not in the group");

  Message inverted = From(1, 2, b);
  inverted.mutable_catchup_request()->set_from_slot(5);
  inverted.mutable_catchup_request()->set_to_slot(4);
  ExpectDropped(r, inverted, "empty range");
  Message far_request = From(1, 2, b);
  far_request.mutable_catchup_request()->set_from_slot(1);
  far_request.mutable_catchup_request()->set_to_slot(uint64_t{1} << 40);
  ExpectDropped(r, far_request, "beyond the slot window");

  Message accepted = From(1, 2, b);
  accepted.mutable_accepted()->add_slots(uint64_t{1} << 40);
  ExpectDropped(r, accepted, "beyond the slot window");

  Message promise = From(1, 2, b);
  promise.mutable_promise()->set_last_slot(1);
  *promise.mutable_promise()->add_entries() = Entry(2, MakeBallot(1, 1), Payload("x"));
  ExpectDropped(r, promise, "past the promise's last slot");

  Message ack = From(1, 2, b);
  ack.mutable_snapshot_ack()->set_index(3);
  ExpectDropped(r, ack, "does not hold");

  Message forward = From(1, 2, b);
  forward.mutable_forward_request()->add_requests()->set_origin_replica(9);
  ExpectDropped(r, forward, "no replica of the group");

  EXPECT_EQ(r.Status().rejected_message_count, 9u);
}

// ---------------------------------------------------------------------------------------
// Clusters.

uint32_t ElectLeader(testing::Cluster& c) {
  for (int i = 0; i < 500 && c.Leader() == 0; ++i) c.Step();
  return c.Leader();
}

TEST(Sanity, AHealthyClusterRejectsNoMessage) {
  // Without forgery, loss or duplication, every message passes the checks, through
  // elections, writes, compaction and a snapshot transfer to a replica that was down.
  testing::Cluster c(3, 11);
  c.set_compact_every(5);
  uint32_t leader = ElectLeader(c);
  ASSERT_NE(leader, 0u);
  uint32_t lagging = leader % 3 + 1;
  c.Crash(lagging);
  for (uint64_t seq = 1; seq <= 40; ++seq) c.Write(leader, 1, seq, "v" + std::to_string(seq));
  c.RunTicks(20);
  c.Restart(lagging);
  c.RunTicks(100);
  ASSERT_EQ(c.Applied(lagging), c.Applied(leader));
  ASSERT_GT(c.replica(lagging)->Status().snapshot_index, 0u);
  for (uint32_t id = 1; id <= 3; ++id) {
    EXPECT_EQ(c.replica(id)->Status().rejected_message_count, 0u)
        << "replica " << id << ": " << c.replica(id)->Status().last_rejection;
  }
}

// The replica applied slots 1 and 2 and crashed before their chosen marks (not synced on
// their own) reached the disk; its log holds the values it accepted. A new leader whose
// quorum lacks them asks it for them: it must serve them, or the leader, which counts them
// chosen from this replica's commit index, never gets them (found by the property test).
TEST(Sanity, AppliedSlotsWhoseChosenMarksWereLostAreStillServedToPeers) {
  Ballot b;
  b.set_round(1);
  b.set_replica_id(1);
  PersistedState state;
  *state.hard_state.mutable_promised() = b;
  state.entries.push_back(Entry(1, b, Payload("INSERT INTO t VALUES (1)")));
  state.entries.push_back(Entry(2, b, Payload("INSERT INTO t VALUES (2)")));
  state.entries.push_back(Entry(3, b, Payload("INSERT INTO t VALUES (3)")));  // not applied
  state.applied_index = 2;
  Replica r(ConfigFor(3), std::move(state), 1);
  EXPECT_EQ(r.commit_index(), 2u);
  ASSERT_NE(r.ChosenValue(2), nullptr);
  EXPECT_EQ(r.ChosenValue(3), nullptr) << "accepted, not known chosen";
  Message ask = From(2, 3, b);
  ask.mutable_catchup_request()->set_from_slot(1);
  ask.mutable_catchup_request()->set_to_slot(2);
  r.Step(ask);
  int served = 0;
  for (const Message& m : Drain(r)) {
    if (m.has_catchup_response()) served += m.catchup_response().entries_size();
  }
  EXPECT_EQ(served, 2);
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

// A leader elected and past its first heartbeat round.
uint32_t SettledLeader(testing::Cluster& c) {
  if (ElectLeader(c) == 0) return 0;
  c.RunTicks(5);
  return c.Leader();
}

TEST(Cluster, AFollowerThatStalledHearsTheLeaderBeforeItStandsForElection) {
  testing::Cluster c(3, 29);
  uint32_t leader = SettledLeader(c);
  ASSERT_NE(leader, 0u);
  Ballot ballot = c.replica(leader)->Status().ballot;
  uint32_t stalled = leader % 3 + 1;
  // Far more than an election timeout went by while its process did not run.
  c.replica(stalled)->TickAfterStall(500);
  EXPECT_EQ(c.replica(stalled)->role(), Role::kFollower);
  EXPECT_TRUE(BallotEqual(c.replica(stalled)->Status().ballot, ballot));
  c.RunTicks(30);  // the leader's heartbeats arrive within its fresh timeout
  EXPECT_EQ(c.Leader(), leader);
  EXPECT_TRUE(BallotEqual(c.replica(leader)->Status().ballot, ballot));
}

TEST(Cluster, ALeaderThatStalledWaitsForItsFollowersBeforeSteppingDown) {
  testing::Cluster c(3, 37);
  uint32_t leader = SettledLeader(c);
  ASSERT_NE(leader, 0u);
  Ballot ballot = c.replica(leader)->Status().ballot;
  c.replica(leader)->TickAfterStall(500);
  EXPECT_EQ(c.replica(leader)->role(), Role::kLeader);
  EXPECT_FALSE(c.replica(leader)->Status().lease_valid);  // its lease ran out meanwhile
  c.RunTicks(30);
  EXPECT_EQ(c.Leader(), leader);
  EXPECT_TRUE(BallotEqual(c.replica(leader)->Status().ballot, ballot));
}

TEST(Cluster, AStalledFollowerStillStandsWhenTheLeaderIsReallyGone) {
  testing::Cluster c(3, 31);
  uint32_t leader = SettledLeader(c);
  ASSERT_NE(leader, 0u);
  c.Crash(leader);
  uint32_t stalled = leader % 3 + 1;
  c.replica(stalled)->TickAfterStall(500);
  c.RunTicks(300);
  EXPECT_NE(c.Leader(), 0u);
  EXPECT_NE(c.Leader(), leader);
}

// Replica 2 follows leader 1 and forwards a write to it; then leader 3 takes over at a
// higher ballot, announcing slot 1 chosen and its ballot floor at 1. Returns the write.
ClientRequest ForwardThenHearANewLeader(Replica& r) {
  Message old_leader = From(1, 2, MakeBallot(1, 1));
  old_leader.mutable_heartbeat();
  r.Step(old_leader);
  Drain(r);
  r.Propose(Write(7, 1, "INSERT INTO t VALUES (1)"));
  std::vector<Message> out = Drain(r);
  EXPECT_TRUE(!out.empty() && out[0].has_forward_request() && out[0].to() == 1u);
  Message new_leader = From(3, 2, MakeBallot(2, 3), /*commit=*/1);
  new_leader.mutable_heartbeat()->set_ballot_floor(1);
  r.Step(new_leader);
  ClientRequest forwarded = out.empty() ? ClientRequest() : out[0].forward_request().requests(0);
  return forwarded;
}

bool ForwardsTo(const std::vector<Message>& messages, uint32_t to) {
  for (const Message& m : messages) {
    if (m.has_forward_request() && m.to() == to) return true;
  }
  return false;
}

TEST(Forwarding, AWriteTheOldLeaderGotChosenIsNotSentToTheNewOne) {
  Replica r(ConfigFor(2), PersistedState(), 1);
  ClientRequest write = ForwardThenHearANewLeader(r);
  std::vector<Message> out = Drain(r);
  EXPECT_FALSE(ForwardsTo(out, 3)) << "sent on before slot 1 was seen";
  // Slot 1, chosen under the old ballot, holds the write: seen chosen, it is dropped.
  Message answer = From(3, 2, MakeBallot(2, 3), /*commit=*/1);
  LogEntry* e = answer.mutable_catchup_response()->add_entries();
  e->set_slot(1);
  e->set_chosen(true);
  *e->mutable_value()->add_requests() = write;
  r.Step(answer);
  for (int i = 0; i < 5; ++i) {
    r.Tick();
    out = Drain(r);
    EXPECT_FALSE(ForwardsTo(out, 3)) << "a write chosen under the old ballot was sent again";
  }
  EXPECT_EQ(r.commit_index(), 1u);
}

TEST(Forwarding, AWriteTheOldLeaderDidNotGetChosenGoesToTheNewOne) {
  Replica r(ConfigFor(2), PersistedState(), 1);
  ClientRequest write = ForwardThenHearANewLeader(r);
  Drain(r);
  Message answer = From(3, 2, MakeBallot(2, 3), /*commit=*/1);
  LogEntry* e = answer.mutable_catchup_response()->add_entries();
  e->set_slot(1);
  e->set_chosen(true);
  e->mutable_value()->set_noop(true);
  r.Step(answer);
  std::vector<Message> sent;
  for (int i = 0; i < 5 && !ForwardsTo(sent, 3); ++i) {
    r.Tick();
    sent = Drain(r);
  }
  ASSERT_TRUE(ForwardsTo(sent, 3));
  for (const Message& m : sent) {
    if (!m.has_forward_request()) continue;
    ASSERT_EQ(m.forward_request().requests_size(), 1);
    EXPECT_EQ(m.forward_request().requests(0).client_id(), write.client_id());
    EXPECT_EQ(m.forward_request().requests(0).sequence(), write.sequence());
  }
  // A late refusal from the old leader is stale: the client does not hear it.
  Message refusal = From(1, 2, MakeBallot(1, 1));
  refusal.mutable_forward_reply()->set_client_id(write.client_id());
  refusal.mutable_forward_reply()->set_sequence(write.sequence());
  refusal.mutable_forward_reply()->set_code(RESOURCE_EXHAUSTED);
  r.Step(refusal);
  Ready ready = r.GetReady();
  EXPECT_TRUE(ready.replies.empty());
  r.Advance(ready);
}

TEST(Cluster, AHealedReplicaDoesNotRaiseItsBallotWhileTheLeaderIsHeardByAMajority) {
  testing::Cluster c(3, 41);
  uint32_t leader = SettledLeader(c);
  ASSERT_NE(leader, 0u);
  Ballot ballot = c.replica(leader)->Status().ballot;
  uint32_t cut = leader % 3 + 1;
  uint64_t elections_before = c.replica(cut)->Status().elections_started;
  c.Isolate(cut, true);
  c.RunTicks(200);  // ten or more election timeouts
  ReplicaStatus isolated = c.replica(cut)->Status();
  EXPECT_GT(isolated.pre_votes_started, 0u) << "it never noticed the leader was gone";
  EXPECT_EQ(isolated.elections_started, elections_before);
  EXPECT_TRUE(BallotEqual(isolated.ballot, ballot));
  c.Isolate(cut, false);
  c.RunTicks(50);
  EXPECT_EQ(c.Leader(), leader);
  EXPECT_TRUE(BallotEqual(c.replica(leader)->Status().ballot, ballot));
  EXPECT_EQ(c.replica(cut)->Status().leader_id, leader);
  EXPECT_FALSE(c.violation());
}

TEST(Cluster, WritesForwardedToALeaderThatDiedGoToTheNextOne) {
  for (uint64_t seed : {43, 44, 45, 46}) {
    testing::Cluster c(3, seed);
    uint32_t leader = SettledLeader(c);
    ASSERT_NE(leader, 0u);
    c.Crash(leader);
    uint32_t follower = leader % 3 + 1;
    // The follower still takes the dead replica for the leader and forwards to it: the
    // request is lost with it. No client timeout here: only the failover can save it.
    for (uint64_t seq = 1; seq <= 3; ++seq) c.Write(follower, 9, seq, "w" + std::to_string(seq));
    c.RunTicks(200);
    ASSERT_NE(c.Leader(), 0u) << "seed " << seed;
    EXPECT_EQ(c.applied_writes().size(), 3u) << "seed " << seed;
    EXPECT_FALSE(c.violation());
  }
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

TEST(Cluster, AReplicaThatFellFurtherBehindThanTheSlotWindowCatchesUpAndVotesAgain) {
  ReplicaConfig base;
  base.max_batch_requests = 1;  // one write per slot
  base.max_inflight_slots = 4;
  base.max_catchup_entries = 4;
  base.max_slots_beyond_commit = 8;
  testing::Cluster c(3, 37, base);
  uint32_t leader = ElectLeader(c);
  ASSERT_NE(leader, 0u);
  c.RunTicks(5);
  leader = c.Leader();
  ASSERT_NE(leader, 0u);
  uint32_t lagging = leader % 3 + 1;
  c.Crash(lagging);
  for (uint64_t seq = 1; seq <= 40; ++seq) c.Write(leader, 1, seq, "v" + std::to_string(seq));
  c.RunTicks(100);
  ASSERT_EQ(c.applied_writes().size(), 40u);
  ASSERT_GT(c.Applied(leader), c.Applied(lagging) + base.max_slots_beyond_commit);

  // It restarts far behind; writes go on meanwhile, their accepts beyond its window at first.
  c.Restart(lagging);
  leader = c.Leader();
  ASSERT_NE(leader, 0u);
  for (uint64_t seq = 41; seq <= 50; ++seq) c.Write(leader, 1, seq, "v" + std::to_string(seq));
  c.RunTicks(200);
  EXPECT_EQ(c.applied_writes().size(), 50u);
  leader = c.Leader();
  ASSERT_NE(leader, 0u);
  EXPECT_EQ(c.Applied(lagging), c.Applied(leader)) << "did not catch up";
  EXPECT_EQ(c.AppHash(lagging), c.AppHash(leader));
  EXPECT_GT(c.replica(lagging)->Status().rejected_message_count, 0u)
      << "no accept ever fell beyond its window: the test lost its point";

  // With the third replica down, writes commit only if the one that lagged accepts them.
  uint32_t other = 1;
  while (other == leader || other == lagging) ++other;
  c.Crash(other);
  for (uint64_t seq = 51; seq <= 60; ++seq) c.Write(leader, 1, seq, "v" + std::to_string(seq));
  c.RunTicks(100);
  EXPECT_EQ(c.applied_writes().size(), 60u);
  ASSERT_NE(c.Leader(), 0u);
  EXPECT_EQ(c.Applied(lagging), c.Applied(c.Leader()));
  EXPECT_FALSE(c.violation()) << *c.violation();
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

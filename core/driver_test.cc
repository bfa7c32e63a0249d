#include "core/driver.h"

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace synod {
namespace {

// A host whose storage finishes only when the test says so.
class FakeHost : public LogStorage,
                 public PeerTransport,
                 public AppliedState,
                 public ClientAnswers {
 public:
  struct Persisted {
    PersistOptions options;
    bool has_snapshot = false;
    std::vector<std::pair<uint64_t, uint64_t>> requests;  // (client, sequence) accepted
  };

  void Persist(const Ready& ready, PersistOptions options, std::function<void()> done) override {
    Persisted p;
    p.options = options;
    p.has_snapshot = ready.snapshot.has_value();
    for (const LogEntry& e : ready.entries) {
      if (e.chosen()) continue;  // a chosen mark, not the write of the value
      for (const ClientRequest& r : e.value().requests()) {
        p.requests.emplace_back(r.client_id(), r.sequence());
      }
    }
    persisted.push_back(p);
    if (complete_at_once) {
      done();
    } else {
      completions.push_back(std::move(done));
    }
  }
  void Send(std::vector<Message> messages) override {
    for (Message& m : messages) sent.push_back(std::move(m));
  }
  void CheckSnapshot(const SnapshotToInstall&, std::function<void(absl::Status)> done) override {
    if (check_at_once) {
      done(absl::OkStatus());
    } else {
      checks.push_back(std::move(done));
    }
  }
  void RefuseSnapshot(const absl::Status& why) override {
    ASSERT_NE(driver, nullptr) << "nothing is refused: " << why;
    refused.push_back(why);
    // As a host does: the replica is rebuilt from what is durable (here: nothing).
    driver->ReplaceReplica(
        std::make_unique<Replica>(driver->replica().config(), PersistedState(), 2));
  }
  void InstallSnapshot(const SnapshotToInstall& snapshot) override {
    installed.push_back(snapshot.meta);
  }
  void Apply(CommittedEntry entry) override {
    for (const ClientRequest& r : entry.value.requests()) applied.push_back(r.sequence());
    applied_index = entry.slot;
  }
  void Answer(const ForwardReply& reply) override { answers.push_back(reply); }

  // Finishes the oldest storage operation.
  void CompleteOne() {
    ASSERT_FALSE(completions.empty());
    std::function<void()> done = std::move(completions.front());
    completions.pop_front();
    done();
  }
  void CompleteAll() {
    while (!completions.empty()) CompleteOne();
  }

  MemorySnapshotStore store;
  HostDriver* driver = nullptr;  // set: a refused snapshot rebuilds its replica
  std::vector<absl::Status> refused;
  std::vector<SnapshotMeta> installed;
  bool complete_at_once = true;
  std::deque<std::function<void()>> completions;
  bool check_at_once = true;
  std::deque<std::function<void(absl::Status)>> checks;  // verdicts not given yet
  std::vector<Persisted> persisted;
  std::vector<Message> sent;
  std::vector<uint64_t> applied;  // sequences, in apply order
  uint64_t applied_index = 0;
  std::vector<ForwardReply> answers;
};

ReplicaConfig ConfigOf(uint32_t id, std::vector<uint32_t> ids) {
  ReplicaConfig c;
  c.id = id;
  c.replica_ids = std::move(ids);
  return c;
}

ClientRequest WriteRequest(uint64_t sequence) {
  ClientRequest r;
  r.set_client_id(7);
  r.set_sequence(sequence);
  r.mutable_command()->mutable_execute()->add_statements()->set_sql("INSERT INTO t VALUES (1)");
  return r;
}

std::unique_ptr<HostDriver> LeaderAlone(FakeHost& host) {
  auto driver =
      std::make_unique<HostDriver>(std::make_unique<Replica>(ConfigOf(1, {1}), PersistedState(), 1),
                                   &host, &host.store, &host, &host, &host);
  for (int i = 0; i < 100 && driver->replica().role() != Role::kLeader; ++i) {
    driver->replica().Tick();
    driver->Drain();
  }
  EXPECT_EQ(driver->replica().role(), Role::kLeader);
  return driver;
}

// Replica 1 of three, elected with its peers' promises (storage completing at once).
std::unique_ptr<HostDriver> LeaderOfThree(FakeHost& host) {
  auto driver = std::make_unique<HostDriver>(
      std::make_unique<Replica>(ConfigOf(1, {1, 2, 3}), PersistedState(), 1), &host, &host.store,
      &host, &host, &host);
  for (int i = 0; i < 1000 && driver->replica().role() != Role::kLeader; ++i) {
    driver->replica().Tick();
    driver->Drain();
    std::vector<Message> sent = std::move(host.sent);
    host.sent.clear();
    for (const Message& m : sent) {
      Message reply;
      reply.set_from(m.to());
      reply.set_to(1);
      if (m.has_pre_vote()) {
        reply.mutable_pre_vote_reply()->set_attempt(m.pre_vote().attempt());
        reply.mutable_pre_vote_reply()->set_granted(true);
      } else if (m.has_prepare()) {
        *reply.mutable_ballot() = m.ballot();
        reply.mutable_promise()->set_from_slot(m.prepare().from_slot());
      } else {
        continue;
      }
      driver->replica().Step(reply);
      driver->Drain();
    }
  }
  EXPECT_EQ(driver->replica().role(), Role::kLeader);
  host.sent.clear();
  return driver;
}

TEST(Driver, ALeadersAcceptsLeaveBeforeItsOwnWriteIsDurableButItsVoteCountsOnlyAfter) {
  FakeHost host;
  std::unique_ptr<HostDriver> driver = LeaderOfThree(host);
  const Ballot ballot = driver->replica().promised_ballot();
  host.complete_at_once = false;
  driver->replica().Propose(WriteRequest(1));
  driver->Drain();
  ASSERT_TRUE(driver->persisting());
  uint64_t slot = 0;
  for (const Message& m : host.sent) {
    if (m.has_accept()) slot = m.accept().entries(0).slot();
  }
  ASSERT_GT(slot, 0u) << "no accept sent while the leader's own write was in flight";
  // One follower acknowledges: with the leader's vote not yet durable, that is no majority.
  Message accepted;
  accepted.set_from(2);
  accepted.set_to(1);
  *accepted.mutable_ballot() = ballot;
  accepted.mutable_accepted()->add_slots(slot);
  driver->replica().Step(accepted);
  driver->Drain();
  EXPECT_EQ(driver->replica().commit_index(), slot - 1) << "chosen on a vote a crash could undo";
  EXPECT_TRUE(host.applied.empty());
  host.CompleteAll();  // the leader's write is durable: its vote counts
  host.complete_at_once = true;
  driver->Drain();
  EXPECT_EQ(driver->replica().commit_index(), slot);
  EXPECT_EQ(host.applied, std::vector<uint64_t>{1});
}

TEST(Driver, NothingOfAReadyIsDoneBeforeItsRecordsAreDurable) {
  FakeHost host;
  HostDriver driver(std::make_unique<Replica>(ConfigOf(1, {1, 2, 3}), PersistedState(), 1), &host,
                    &host.store, &host, &host, &host);
  // Past the lease a restarted acceptor assumes, before any election of its own.
  for (int i = 0; i < ConfigOf(1, {1}).lease_duration_ticks + 1; ++i) {
    driver.replica().Tick();
    driver.Drain();
  }
  host.sent.clear();
  host.complete_at_once = false;
  // A prepare at a higher ballot: the promise must be durable before it leaves.
  Message prepare;
  prepare.set_from(2);
  prepare.set_to(1);
  prepare.mutable_ballot()->set_round(5);
  prepare.mutable_ballot()->set_replica_id(2);
  prepare.mutable_prepare()->set_from_slot(1);
  driver.replica().Step(prepare);
  driver.Drain();
  ASSERT_EQ(host.persisted.size(), 1u);
  EXPECT_TRUE(host.persisted[0].options.sync);
  EXPECT_TRUE(host.sent.empty()) << "a promise left before it was durable";
  EXPECT_TRUE(driver.persisting());
  host.CompleteOne();
  ASSERT_EQ(host.sent.size(), 1u);
  EXPECT_TRUE(host.sent[0].has_promise());
  EXPECT_EQ(host.sent[0].ballot().round(), 5u);
  EXPECT_FALSE(driver.persisting());
}

TEST(Driver, RequestsThatArriveDuringAWriteShareTheNextOne) {
  FakeHost host;
  std::unique_ptr<HostDriver> driver = LeaderAlone(host);
  host.complete_at_once = false;
  const size_t before = host.persisted.size();
  driver->replica().Propose(WriteRequest(1));
  driver->Drain();
  ASSERT_EQ(host.persisted.size(), before + 1);
  EXPECT_TRUE(host.applied.empty()) << "applied before the leader's accept was durable";
  // While that write is in flight, more requests arrive: no second write starts.
  for (uint64_t s = 2; s <= 5; ++s) {
    driver->replica().Propose(WriteRequest(s));
    driver->Drain();
  }
  EXPECT_EQ(host.persisted.size(), before + 1);
  host.CompleteAll();
  host.complete_at_once = true;
  driver->Drain();
  // The four that waited went to storage together, in one operation with one fsync.
  int operations_with_them = 0;
  for (size_t i = before; i < host.persisted.size(); ++i) {
    for (const auto& [client, sequence] : host.persisted[i].requests) {
      if (sequence >= 2) {
        ++operations_with_them;
        EXPECT_TRUE(host.persisted[i].options.sync);
        break;
      }
    }
  }
  EXPECT_EQ(operations_with_them, 1);
  EXPECT_EQ(host.applied, (std::vector<uint64_t>{1, 2, 3, 4, 5}));
}

TEST(Driver, AnOwnSnapshotWaitsForTheWriteInFlightAndIsDurableBeforeTheReplicaCompacts) {
  FakeHost host;
  std::unique_ptr<HostDriver> driver = LeaderAlone(host);
  for (uint64_t s = 1; s <= 3; ++s) {
    driver->replica().Propose(WriteRequest(s));
    driver->Drain();
  }
  ASSERT_EQ(host.applied.size(), 3u);
  host.complete_at_once = false;
  driver->replica().Propose(WriteRequest(4));
  driver->Drain();
  ASSERT_TRUE(driver->persisting());
  EXPECT_FALSE(driver->Compact(host.store.Add(host.applied_index, "image")))
      << "overtook the write in flight";
  host.CompleteAll();
  ASSERT_FALSE(driver->persisting());
  const uint64_t index = host.applied_index;
  const SnapshotMeta meta = host.store.Add(index, "image");
  ASSERT_TRUE(driver->Compact(meta));
  ASSERT_EQ(host.persisted.back().options.sync, true);
  EXPECT_TRUE(host.persisted.back().has_snapshot);
  EXPECT_EQ(driver->replica().snapshot_index(), 0u) << "compacted before the image was durable";
  EXPECT_FALSE(driver->Compact(meta));  // one storage operation at a time
  host.CompleteOne();
  EXPECT_EQ(driver->replica().snapshot_index(), index);
  EXPECT_EQ(driver->last_snapshot_index(), index);
  EXPECT_EQ(host.store.images(), 1u) << "the images of earlier indexes stay after compaction";
  EXPECT_NE(host.store.Find(meta), nullptr);
  // The next Ready rewrites the log without what the snapshot covers.
  driver->Drain();
  ASSERT_FALSE(host.completions.empty());
  EXPECT_TRUE(host.persisted.back().options.compact);
  host.CompleteAll();
  EXPECT_FALSE(driver->Compact(host.store.Add(index, "other")))
      << "a second image at the same index";
}

// Messages from replica `from` to replica 2 at ballot (1, from) and commit index `commit`.
Message To2(uint32_t from, uint64_t commit) {
  Message m;
  m.set_from(from);
  m.set_to(2);
  m.mutable_ballot()->set_round(1);
  m.mutable_ballot()->set_replica_id(from);
  m.set_commit_index(commit);
  return m;
}

Message ChunkTo2(const SnapshotMeta& meta, uint64_t offset, const std::string& data) {
  Message m = To2(1, meta.index());
  *m.mutable_snapshot_chunk()->mutable_meta() = meta;
  m.mutable_snapshot_chunk()->set_offset(offset);
  m.mutable_snapshot_chunk()->set_data(data);
  m.mutable_snapshot_chunk()->set_last(offset + data.size() == meta.size_bytes());
  return m;
}

// Replica 2 of three, a follower of 1 that lags behind its snapshot at `index`: it has asked
// 1 to catch up and heard that it needs the snapshot.
std::unique_ptr<HostDriver> FollowerAskingForASnapshot(FakeHost& host, uint64_t index) {
  ReplicaConfig config = ConfigOf(2, {1, 2, 3});
  config.election_timeout_ticks = 1000;  // no election gets in the way
  auto driver = std::make_unique<HostDriver>(std::make_unique<Replica>(config, PersistedState(), 2),
                                             &host, &host.store, &host, &host, &host);
  host.driver = driver.get();
  Message heartbeat = To2(1, index);
  heartbeat.mutable_heartbeat()->set_read_context(1);
  driver->replica().Step(heartbeat);
  driver->Drain();
  Message needs_snapshot = To2(1, index);
  needs_snapshot.mutable_catchup_response()->set_needs_snapshot(true);
  driver->replica().Step(needs_snapshot);
  driver->Drain();
  host.sent.clear();
  return driver;
}

TEST(Driver, AFollowerAcknowledgesHeartbeatsWhileItsStorageIsBusy) {
  FakeHost host;
  std::unique_ptr<HostDriver> driver = FollowerAskingForASnapshot(host, 0);
  host.complete_at_once = false;
  Message accept = To2(1, 0);
  LogEntry* e = accept.mutable_accept()->add_entries();
  e->set_slot(1);
  *e->mutable_value()->add_requests() = WriteRequest(1);
  driver->replica().Step(accept);
  driver->Drain();
  ASSERT_TRUE(driver->persisting());
  host.sent.clear();
  Message heartbeat = To2(1, 0);
  heartbeat.mutable_heartbeat()->set_read_context(7);
  driver->replica().Step(heartbeat);
  driver->Drain();
  ASSERT_EQ(host.sent.size(), 1u) << "the acknowledgement waited for the fsync";
  EXPECT_EQ(host.sent[0].heartbeat_ack().read_context(), 7u);
  host.CompleteAll();
  // The accept's acknowledgement left only once it was durable.
  bool accepted = false;
  for (const Message& m : host.sent) accepted |= m.has_accepted();
  EXPECT_TRUE(accepted);
}

TEST(Driver, ASnapshotFromAPeerGoesToTheStoreAndIsInstalledOnceSealed) {
  FakeHost host;
  const std::string image = "abcdefgh";
  const SnapshotMeta meta = SnapshotMetaOf(10, image);
  std::unique_ptr<HostDriver> driver = FollowerAskingForASnapshot(host, 10);
  driver->replica().Step(ChunkTo2(meta, 0, "abcd"));
  driver->Drain();
  EXPECT_TRUE(host.installed.empty());
  driver->replica().Step(ChunkTo2(meta, 4, "efgh"));
  driver->Drain();
  ASSERT_EQ(host.installed.size(), 1u);
  EXPECT_EQ(host.installed[0].checksum(), meta.checksum());
  ASSERT_NE(host.store.Find(meta), nullptr);
  EXPECT_EQ(*host.store.Find(meta), image);
  EXPECT_TRUE(host.persisted.back().has_snapshot);
  EXPECT_EQ(driver->replica().commit_index(), 10u);
  EXPECT_TRUE(host.refused.empty());
}

// The last chunk of one image and the first of a newer one (its sender compacted again)
// reach the driver in one Ready: the first image is sealed before the second starts over.
TEST(Driver, AnImageIsSealedBeforeTheNextImageStartsInTheSameReady) {
  FakeHost host;
  const SnapshotMeta first = SnapshotMetaOf(10, "abcdefgh");
  const SnapshotMeta second = SnapshotMetaOf(20, "ABCDEFGHIJKL");
  std::unique_ptr<HostDriver> driver = FollowerAskingForASnapshot(host, 10);
  driver->replica().Step(ChunkTo2(first, 0, "abcd"));
  driver->Drain();
  // The replica still wants more than the first image holds.
  Message heartbeat = To2(1, 20);
  heartbeat.mutable_heartbeat()->set_read_context(2);
  driver->replica().Step(heartbeat);
  driver->replica().Step(ChunkTo2(first, 4, "efgh"));
  Message next = ChunkTo2(second, 0, "ABCD");
  next.set_commit_index(20);
  driver->replica().Step(next);
  driver->Drain();
  EXPECT_TRUE(host.refused.empty()) << host.refused[0];
  ASSERT_EQ(host.installed.size(), 1u);
  EXPECT_EQ(host.installed[0].index(), 10u);
  EXPECT_NE(host.store.Find(first), nullptr);
}

// The replica checked the bytes it received against the checksum, but the store's copy is
// damaged (a write that went wrong): sealing fails, and the image is refused whole before
// anything of it is persisted.
TEST(Driver, AnImageTheStoreCannotSealIsRefusedWholeNeverPersisted) {
  FakeHost host;
  const SnapshotMeta meta = SnapshotMetaOf(10, "abcdefgh");
  std::unique_ptr<HostDriver> driver = FollowerAskingForASnapshot(host, 10);
  const size_t persisted_before = host.persisted.size();
  driver->replica().Step(ChunkTo2(meta, 0, "abcd"));
  driver->Drain();
  host.store.Receive(meta, 0, "abcX");  // the store's partial image, damaged
  driver->replica().Step(ChunkTo2(meta, 4, "efgh"));
  driver->Drain();
  ASSERT_EQ(host.refused.size(), 1u);
  EXPECT_TRUE(absl::IsDataLoss(host.refused[0])) << host.refused[0];
  EXPECT_TRUE(host.installed.empty());
  EXPECT_EQ(host.store.images(), 0u);
  for (size_t i = persisted_before; i < host.persisted.size(); ++i) {
    EXPECT_FALSE(host.persisted[i].has_snapshot) << "a spliced image was persisted";
  }
  EXPECT_EQ(driver->replica().commit_index(), 0u);
  EXPECT_EQ(driver->counters().snapshots_refused, 1u);
}

// A follower sent a whole image whose check the host has not yet given a verdict on:
// returns that verdict's callback.
std::function<void(absl::Status)> ReceiveImageUnchecked(FakeHost& host, HostDriver& driver,
                                                        const SnapshotMeta& meta,
                                                        const std::string& image) {
  host.check_at_once = false;
  driver.replica().Step(ChunkTo2(meta, 0, image));
  driver.Drain();
  EXPECT_EQ(host.checks.size(), 1u);
  if (host.checks.empty()) return [](absl::Status) {};
  std::function<void(absl::Status)> verdict = std::move(host.checks.front());
  host.checks.pop_front();
  return verdict;
}

// A host checks a large image off its loop: the verdict comes later. Until then nothing of
// the snapshot's Ready is persisted or sent but what acknowledges nothing, the follower
// goes on acknowledging heartbeats, and no snapshot of the host's own is recorded.
TEST(Driver, ASnapshotCheckedLaterIsPersistedOnlyAfterItsVerdict) {
  FakeHost host;
  const SnapshotMeta meta = SnapshotMetaOf(10, "abcdefgh");
  std::unique_ptr<HostDriver> driver = FollowerAskingForASnapshot(host, 10);
  const size_t persisted_before = host.persisted.size();
  std::function<void(absl::Status)> verdict =
      ReceiveImageUnchecked(host, *driver, meta, "abcdefgh");
  ASSERT_TRUE(driver->checking());
  EXPECT_EQ(host.persisted.size(), persisted_before);
  EXPECT_FALSE(driver->CanCompact(5));
  host.sent.clear();
  Message heartbeat = To2(1, 10);
  heartbeat.mutable_heartbeat()->set_read_context(9);
  driver->replica().Step(heartbeat);
  driver->Drain();
  ASSERT_EQ(host.sent.size(), 1u) << "the acknowledgement waited for the check";
  EXPECT_EQ(host.sent[0].heartbeat_ack().read_context(), 9u);
  EXPECT_TRUE(host.installed.empty());

  verdict(absl::OkStatus());
  EXPECT_FALSE(driver->checking());
  ASSERT_GT(host.persisted.size(), persisted_before);
  EXPECT_TRUE(host.persisted[persisted_before].has_snapshot);
  ASSERT_EQ(host.installed.size(), 1u);
  EXPECT_EQ(host.installed[0].checksum(), meta.checksum());
  EXPECT_EQ(driver->replica().commit_index(), 10u);
}

TEST(Driver, ASnapshotRefusedLaterIsNeverPersisted) {
  FakeHost host;
  const SnapshotMeta meta = SnapshotMetaOf(10, "abcdefgh");
  std::unique_ptr<HostDriver> driver = FollowerAskingForASnapshot(host, 10);
  const size_t persisted_before = host.persisted.size();
  ReceiveImageUnchecked(host, *driver, meta,
                        "abcdefgh")(absl::InvalidArgumentError("integrity_check failed"));
  ASSERT_EQ(host.refused.size(), 1u);
  EXPECT_TRUE(absl::IsInvalidArgument(host.refused[0]));
  EXPECT_FALSE(driver->checking());
  EXPECT_TRUE(host.installed.empty());
  for (size_t i = persisted_before; i < host.persisted.size(); ++i) {
    EXPECT_FALSE(host.persisted[i].has_snapshot) << "a refused image was persisted";
  }
  EXPECT_EQ(driver->counters().snapshots_refused, 1u);
}

TEST(Driver, SnapshotChunksLeaveWithTheirBytesFromTheStore) {
  FakeHost host;
  const std::string image = "abcdefghij";
  ReplicaConfig config = ConfigOf(1, {1, 2, 3});
  config.snapshot_chunk_bytes = 4;
  PersistedState state;
  state.snapshot_meta = host.store.Add(10, image);
  state.applied_index = 10;
  HostDriver driver(std::make_unique<Replica>(config, state, 1), &host, &host.store, &host, &host,
                    &host);
  // Replica 2, at 5, resumes a transfer of that image at offset 8.
  Message resume;
  resume.set_from(2);
  resume.set_to(1);
  resume.set_commit_index(5);
  resume.mutable_snapshot_ack()->set_index(10);
  resume.mutable_snapshot_ack()->set_next_offset(8);
  resume.mutable_snapshot_ack()->set_checksum(state.snapshot_meta.checksum());
  driver.replica().Step(resume);
  driver.Drain();
  ASSERT_EQ(host.sent.size(), 1u);
  ASSERT_TRUE(host.sent[0].has_snapshot_chunk());
  EXPECT_EQ(host.sent[0].snapshot_chunk().data(), "ij");
  EXPECT_TRUE(host.sent[0].snapshot_chunk().last());
  // From the start: a whole chunk, not the last.
  resume.mutable_snapshot_ack()->set_next_offset(0);
  driver.replica().Step(resume);
  driver.Drain();
  ASSERT_EQ(host.sent.size(), 2u);
  EXPECT_EQ(host.sent[1].snapshot_chunk().data(), "abcd");
  EXPECT_FALSE(host.sent[1].snapshot_chunk().last());
  // An image the store lost is not sent at all (the receiver asks elsewhere).
  host.store.Retain(SnapshotMetaOf(11, "another"));
  driver.replica().Step(resume);
  driver.Drain();
  EXPECT_EQ(host.sent.size(), 2u);
  EXPECT_EQ(driver.counters().snapshot_chunks_unreadable, 1u);
}

}  // namespace
}  // namespace synod

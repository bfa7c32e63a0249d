#ifndef SYNOD_CORE_REPLICA_H_
#define SYNOD_CORE_REPLICA_H_

// A Multi-Paxos replica with no I/O: proposer, acceptor and learner in one value the host
// owns. Time arrives as Tick(), messages as Step(), client requests as Propose(), and
// everything the host must do comes out of Ready(). See docs/consensus.md.
//
// The host loop, in this order for each Ready:
//   1. persist ready.hard_state / ready.entries / ready.snapshot (fsync when must_sync);
//   2. send ready.messages;
//   3. install ready.snapshot (if any) into the state machine, then apply
//      ready.committed in order, answering clients whose requests it applied;
//   4. deliver ready.replies (read barriers and refusals) to waiting clients;
//   5. Advance(ready).
// A promise or an accept reaches the network only after it is durable, because messages
// are sent only after the persist step of the same Ready.
//
// Not thread-safe: one thread drives a Replica at a time.

#include <cstddef>
#include <cstdint>
#include <deque>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "core/quorum.h"
#include "core/stable_hash.h"
#include "core/synod.pb.h"

namespace synod {

// No replica uses a ballot round at or above this, and a message carrying one is dropped, so
// that `round + 1` never wraps (a round of 2^64 - 1 would otherwise wrap to 0). Rounds grow by
// one per election; an honest cluster never comes near it.
inline constexpr uint64_t kMaxBallotRound = uint64_t{1} << 62;

struct ReplicaConfig {
  uint32_t id = 0;
  std::vector<uint32_t> replica_ids;  // every replica of the group, this one included

  // A follower that hears nothing from a leader for this many ticks (plus a random extra
  // of up to as many again) starts an election.
  int election_timeout_ticks = 10;
  // A leader starts a heartbeat round this often (and at every commit announcement). Each
  // round a quorum acknowledges renews its lease for lease_duration_ticks -
  // clock_drift_bound_ticks from the round's start, so the interval must be shorter than
  // that, or the lease lapses between every two rounds.
  // REQUIRES: > 0 and < lease_duration_ticks - clock_drift_bound_ticks.
  int heartbeat_interval_ticks = 2;
  // Unanswered prepares, accepts and catch-up requests are sent again after this long.
  int retry_ticks = 3;
  // A follower that acknowledged the leader at its tick t promises no other proposer until
  // t + lease_duration_ticks (its own clock). REQUIRES: < election_timeout_ticks.
  int lease_duration_ticks = 8;
  // The most the clocks of two replicas may drift apart over one lease duration, in ticks,
  // plus one for tick rounding (so at least 1).
  // The leader counts its lease as lease_duration_ticks - clock_drift_bound_ticks from the
  // moment it sent the heartbeat a quorum acknowledged. See docs/consensus.md, "Leases".
  int clock_drift_bound_ticks = 1;
  // A request waiting for a leader is refused (UNAVAILABLE) after this long.
  int request_timeout_ticks = 40;

  size_t max_batch_requests = 256;   // client requests per log entry
  size_t max_batch_bytes = 1 << 20;  // encoded bytes of client requests per log entry
  // Slots proposed and not yet chosen. Chosen slots leave the count even while an earlier one
  // stalls, so this alone does not bound how far the leader runs ahead of its commit index:
  // max_slots_beyond_commit does.
  size_t max_inflight_slots = 32;
  size_t max_pending_requests = 8192;  // requests queued at the leader or awaiting one
  size_t max_pending_reads = 8192;
  size_t max_catchup_entries = 64;     // entries per catch-up response
  size_t max_catchup_bytes = 4 << 20;  // bytes per catch-up response
  size_t max_apply_entries = 256;      // committed entries per Ready
  size_t snapshot_chunk_bytes = 256 << 10;

  // A message naming a slot more than this many slots beyond the commit index (an accept,
  // an acknowledgement, a promise, a catch-up request or answer) is dropped. This bounds the
  // log entries one message can make this replica hold, and the slots a new leader walks and
  // proposes (it fills every gap up to the highest slot a promise reports). The cost: a
  // replica that has fallen further behind than this accepts nothing, and cannot lead, until
  // it has caught up. At 2^14, a gap a forged message opens costs a new leader of five about
  // 35 MB and 0.2 s to fill (at 2^16: 120 MB, 1 s; the cost grows faster than the window).
  // The leader proposes no slot beyond its own commit index plus this, so a follower that
  // has learned that commit index takes every accept; while one slot stalls, later slots
  // wait for it at the edge of the window rather than run on past it.
  // The bound on a new leader's walk assumes storage syncs in order (docs/consensus.md).
  // REQUIRES: >= max_inflight_slots (the window does not narrow the pipeline while nothing
  // stalls) and >= max_catchup_entries.
  uint64_t max_slots_beyond_commit = 1 << 14;
  // A message whose ballot round is more than this above the highest round this replica has
  // seen is dropped, so no single message can use up the round space below kMaxBallotRound.
  uint64_t max_ballot_round_jump = uint64_t{1} << 32;

#ifdef SYNOD_TESTING_BUGS
  // Known-wrong behaviours, for testing the simulator's checkers. Compiled only into the
  // //core:*_with_bugs libraries that sim/ links; the server's build cannot turn them on.
  struct Bugs {
    bool skip_repropose = false;       // a new leader proposes no-ops instead of accepted values
    bool lease_ignores_drift = false;  // the lease runs from the ack, without the drift bound
    // A raised promise is written without an fsync, so the Promise leaves before it is durable.
    bool promise_before_durable = false;
    bool majority_off_by_one = false;  // a quorum is (n + 1) / 2 replicas instead of n / 2 + 1
    // A linearizable read is confirmed by the heartbeat round under way when it arrived, whose
    // acknowledgements may predate it, rather than by a round started after it.
    bool read_confirmed_by_old_round = false;
  } bugs;
  // A test mode, not a bug (the simulator's --leases off): an acceptor grants no lease, as if
  // its clock ran arbitrarily fast. Lease reads are then unsafe and the simulator does not
  // check them; linearizable reads must stay linearizable without any lease.
  bool testing_no_acceptor_lease = false;
  // A test mode too (the simulator's --pre-vote off, and its no-pre-vote bug): a follower
  // whose election timer runs out raises its ballot at once, as if every peer granted its
  // pre-vote. Safety must hold without pre-votes; leader stability needs them.
  bool testing_no_pre_vote = false;
#endif
};

// What the replica kept in durable storage, handed back at restart.
struct PersistedState {
  HardState hard_state;
  std::vector<LogEntry> entries;  // any order; at most one per slot
  SnapshotMeta snapshot_meta;     // index 0: no snapshot; its image is in the host's store
  uint64_t applied_index = 0;     // the state machine's revision (>= snapshot_meta.index)
};

struct CommittedEntry {
  uint64_t slot = 0;
  Value value;
};

// A snapshot whose last chunk came from a peer: its image is in the host's snapshot store.
struct SnapshotToInstall {
  SnapshotMeta meta;
};

struct Ready {
  std::optional<HardState> hard_state;  // set when it changed
  std::vector<LogEntry> entries;        // to write, replacing any entry at the same slot
  bool must_sync = false;               // an fsync is required before sending messages
  uint64_t compacted_through = 0;       // entries up to here may be deleted from storage
  std::optional<SnapshotToInstall> snapshot;
  // Chunks of a snapshot a peer sends, in order, for the host's snapshot store (a chunk at
  // offset 0 starts an image over). The last one comes with `snapshot`.
  std::vector<SnapshotChunk> snapshot_chunks;
  // The messages may hold snapshot chunks without their bytes: the host reads them from its
  // snapshot store (HostDriver).
  std::vector<Message> messages;
  // Messages that acknowledge nothing this Ready persists (a leader's accepts): the host may
  // send them before the Ready is durable, so that the leader's fsync and its followers' run
  // at the same time. A leader counts its own vote for a slot only at Advance() of the Ready
  // that persisted it.
  std::vector<Message> early_messages;
  std::vector<CommittedEntry> committed;
  std::vector<ForwardReply> replies;  // answers to read barriers and refused requests

  bool empty() const {
    return !hard_state && entries.empty() && compacted_through == 0 && !snapshot &&
           snapshot_chunks.empty() && messages.empty() && early_messages.empty() &&
           committed.empty() && replies.empty();
  }
};

// The checksum that names a snapshot image (SnapshotMeta::checksum): a StableHash of its
// size and bytes, never 0.
uint64_t SnapshotChecksum(std::string_view image);

// The same checksum, over an image read in pieces: Add its bytes in order, then value().
class SnapshotChecksummer {
 public:
  explicit SnapshotChecksummer(uint64_t image_bytes) { hash_.AddU64(image_bytes); }
  void Add(std::string_view bytes) { hash_.Add(bytes); }
  uint64_t value() const { return hash_.value() == 0 ? 1 : hash_.value(); }

 private:
  StableHash hash_;
};

enum class Role { kFollower, kCandidate, kLeader };
const char* RoleName(Role role);

// Figures the host reports in status and metrics.
struct ReplicaStatus {
  Role role = Role::kFollower;
  uint32_t leader_id = 0;  // 0: unknown
  Ballot ballot;           // the highest ballot this replica has promised
  uint64_t commit_index = 0;
  uint64_t applied_index = 0;
  uint64_t first_log_index = 0;
  uint64_t snapshot_index = 0;
  bool lease_valid = false;
  // Per peer, ticks since the last message from it (-1: never heard).
  std::map<uint32_t, int64_t> peer_last_heard_ticks;
  // Per peer, as known to the leader: the highest slot it is known to have accepted.
  std::map<uint32_t, uint64_t> peer_match_index;
  size_t pending_requests = 0;
  size_t inflight_slots = 0;
  // Peer messages dropped by the sanity checks (see Replica::Step), and why the last one was.
  // Forged or corrupt messages count here, and so do stale ones: a duplicated snapshot chunk,
  // a catch-up answer that arrives after the request was sent elsewhere.
  uint64_t rejected_message_count = 0;
  std::string last_rejection;  // empty: none yet
  // Elections this replica started (ballots it raised to stand), and pre-votes it asked
  // for, since it started.
  uint64_t elections_started = 0;
  uint64_t pre_votes_started = 0;
};

class Replica {
 public:
  // REQUIRES: config.id is in config.replica_ids; persisted is what this replica durably
  // stored before (empty for a new replica). `prng_seed` drives the election back-off.
  Replica(ReplicaConfig config, PersistedState persisted, uint64_t prng_seed);

  Replica(const Replica&) = delete;
  Replica& operator=(const Replica&) = delete;

  // One logical tick.
  void Tick();
  // `ticks` ticks at once, after the host's process did not run for that long (a pause, a
  // long stall of its loop). The clock sees every one of them, so leases held or granted
  // run out exactly as they would have. But a follower or candidate stands for election
  // only after a fresh election timeout from now: what it missed while it was not running
  // says nothing about the leader, whose heartbeats are likely waiting to be read. A leader
  // likewise waits half an election timeout for its followers' acknowledgements before it
  // steps down for want of a quorum.
  void TickAfterStall(int64_t ticks);
  // A message from a peer. It first passes the sanity checks of RejectReason(); one that
  // fails is dropped before it changes anything, and only counted in
  // ReplicaStatus::rejected_message_count. The checks do not make a forged message harmless:
  // the host must authenticate peers (see docs/consensus.md, "Sanity checks").
  void Step(const Message& message);
  // A client request: a write (queued, batched and proposed by the leader, forwarded by a
  // follower), or a read barrier (answered in Ready::replies with the revision at which
  // the read is valid). The answer to a write is the applied result; a refusal (no leader
  // within request_timeout_ticks, queue full) comes back in Ready::replies.
  void Propose(ClientRequest request);

  bool HasReady() const;
  // Everything the host must do now. REQUIRES: the previous Ready was Advance()d.
  Ready GetReady();
  // The host has done everything in `ready`.
  void Advance(const Ready& ready);

  // The host made a snapshot of the state machine at meta.index (its revision), its image in
  // the host's snapshot store. Log entries up to there are dropped, and the snapshot is
  // served to replicas that fall behind it. REQUIRES: meta.index <= applied index.
  void Compact(const SnapshotMeta& meta);
  const ReplicaConfig& config() const { return config_; }
  // The early messages (Ready::early_messages) gathered so far, taken out now: a host whose
  // storage is busy with the previous Ready sends them without waiting for it.
  std::vector<Message> TakeEarlyMessages();

  ReplicaStatus Status() const;
  uint32_t id() const { return config_.id; }
  Role role() const { return role_; }
  uint32_t leader_id() const { return leader_id_; }
  const Ballot& promised_ballot() const { return hard_.promised(); }  // ReplicaStatus::ballot
  // A leader whose last heartbeat rounds a majority acknowledged (see LeaseValid).
  bool lease_valid() const { return LeaseValid(); }
  // Whether a lease this acceptor granted (or the one a restart assumes) keeps it from
  // promising any proposer but `proposer` now (checkers: a leader's lease must rest on a
  // majority of these).
  bool LeaseBinds(uint32_t proposer) const {
    return now_ticks_ < lease_granted_until_tick_ &&
           (lease_ballot_.replica_id() == 0 || lease_ballot_.replica_id() == proposer);
  }
  uint64_t elections_started() const { return elections_started_; }
  uint64_t commit_index() const { return commit_index_; }
  uint64_t snapshot_index() const { return snapshot_meta_.index(); }
  uint64_t applied_index() const { return applied_index_; }  // as confirmed by Advance()
  // The chosen value of `slot`, if this replica holds it (tests and checkers).
  const Value* ChosenValue(uint64_t slot) const;

 private:
  struct Inflight {
    explicit Inflight(size_t cluster_size) : votes(cluster_size) {}
    VoteSet votes;
    int ticks_since_sent = 0;
  };
  struct PendingRead {
    ClientRequest request;
    uint64_t read_index = 0;
    int64_t arrived_tick = 0;
  };
  struct QueuedRequest {
    ClientRequest request;
    int64_t arrived_tick = 0;
  };

  // Why `m` must be dropped, or nullptr if it may be stepped. Every message passes through
  // here before it changes any state; see docs/consensus.md, "Sanity checks".
  const char* RejectReason(const Message& m) const;
  // Why a ballot carried by a message must be refused, or nullptr.
  const char* BallotRejectReason(const Ballot& ballot) const;
  // Aborts unless the replica's state is consistent; called after every input.
  void CheckInvariants() const;

  // Role transitions.
  void BecomeFollower(uint32_t leader_id);
  // The election timer ran out: ask the peers whether they would support an election (see
  // PreVote in core/synod.proto); StartElection once a majority would.
  void StartPreVote();
  void StartElection();
  void BecomeLeader();

  // Step, by message and role.
  void StepMessage(const Message& m);
  void StepPrepare(const Message& m);
  void StepPreVote(const Message& m);
  void StepPreVoteReply(const Message& m);
  void StepPromise(const Message& m);
  void StepAccept(const Message& m);
  // A refusal: `to`'s ballot is below this replica's promise (or a lease binds it).
  void SendNack(uint32_t to, uint64_t slot = 0);
  // An accept or a heartbeat at or above the promise, from the leader `m.from()`: promise its
  // ballot, follow it, restart the election timer and grant it a lease.
  void FollowLeader(const Message& m);
  void StepAccepted(const Message& m);
  // The leader's own votes for the slots it proposed in `ready`, now durable (Advance).
  void CountOwnVotes(const Ready& ready);
  void StepNack(const Message& m);
  void StepHeartbeat(const Message& m);
  void StepHeartbeatAck(const Message& m);
  void StepCatchupRequest(const Message& m);
  void StepCatchupResponse(const Message& m);
  void StepSnapshotChunk(const Message& m);
  void StepSnapshotAck(const Message& m);
  void StepForwardRequest(const Message& m);
  void StepForwardReply(const Message& m);

  void TickLeader();
  void TickCandidate();
  void TickFollower();
  void ExpireRequests();
  void ReceiveClientRequest(ClientRequest request);

  // Acceptor.
  bool MayPromise(const Ballot& ballot, uint32_t from) const;
  // Promises nobody but `ballot` for lease_duration_ticks from now (on receiving an accept or
  // a heartbeat from its proposer).
  void GrantLease(const Ballot& ballot);
  void RaisePromise(const Ballot& ballot);
  void AcceptEntry(uint64_t slot, const Ballot& ballot, const Value& value);

  // Learner.
  void LearnChosen(uint64_t slot, const Value& value);
  void LearnFromLeader(const Message& m);
  void AdvanceCommitIndex();
  void MaybeRequestCatchup(uint32_t peer, uint64_t peer_commit);

  // Proposer.
  void ProposeSlot(uint64_t slot, Value value);
  void SendAccept(uint32_t peer, uint64_t slot);
  // Sends `m` among the Ready's early messages when no hard state of this replica waits to
  // be durable (else with the others, after the persist).
  void SendEarly(Message m);
  // Whether the leader has requests queued and room in its pipeline for another slot.
  bool CanPropose() const;
  void MaybeProposeBatches();
  void BroadcastHeartbeat();
  bool ReadSafe() const;
  bool LeaseValid() const;
  void ServeReads();
  void FailPending(ErrorCode code, const std::string& message);

  // Client requests.
  void QueueRequest(ClientRequest request);
  void ForwardQueued();
  void HandleReadBarrier(ClientRequest request);
  void Reply(const ClientRequest& request, ErrorCode code, const std::string& message,
             uint64_t read_revision);

  void SendSnapshotChunk(uint32_t peer, uint64_t offset);
  Message NewMessage(uint32_t to) const;
  void Send(Message m);
  void PersistHardState(bool must_sync);
  void PersistEntry(uint64_t slot, bool must_sync);
  uint64_t LastSlot() const;
  uint64_t HighestRoundSeen() const;
  uint64_t RandomElectionTimeout();
  bool IsPeer(uint32_t id) const;
  // The number of replicas whose majority every VoteSet of this replica counts: the group.
  size_t VotingGroupSize() const;

  const ReplicaConfig config_;
  std::mt19937_64 prng_;

  // Acceptor state (durable).
  HardState hard_;
  std::map<uint64_t, LogEntry> log_;  // slots >= first_index_
  uint64_t first_index_ = 1;          // log_ holds no slot below this
  SnapshotMeta snapshot_meta_;

  // Learner state.
  uint64_t commit_index_ = 0;      // every slot <= this is chosen and held (or snapshotted)
  uint64_t applied_index_ = 0;     // confirmed applied by the host (Advance)
  uint64_t handed_out_index_ = 0;  // committed entries given to the host so far
  // A chosen value this replica had not accepted was written, not yet synced.
  bool unsynced_chosen_ = false;
  // The next Ready, or the one the host is persisting, syncs a hard state (a promise or a
  // round used): accepts wait for it, and leave as ordinary messages.
  bool hard_state_sync_pending_ = false;
  bool hard_state_sync_in_flight_ = false;
  uint64_t catchup_wanted_until_ = 0;
  int catchup_retry_ticks_ = 0;  // > 0 while a catch-up request is outstanding
  uint32_t catchup_peer_ = 0;    // the peer asked; catch-up answers and chunks come from it
  // The slots the outstanding catch-up request asked for (empty when it asked to resume a
  // snapshot transfer): an answer holds no others.
  uint64_t catchup_from_slot_ = 1;
  uint64_t catchup_to_slot_ = 0;
  // Snapshot being received from incoming_snapshot_from_ (its bytes go to the host's store):
  // meta and bytes so far (at least one, fewer than the snapshot's size).
  std::optional<SnapshotMeta> incoming_snapshot_meta_;
  uint32_t incoming_snapshot_from_ = 0;
  uint64_t incoming_snapshot_bytes_ = 0;                           // received so far
  std::optional<SnapshotChecksummer> incoming_snapshot_checksum_;  // of the bytes so far
  // The transfer stalled and its sender was asked again for the rest; no chunk has come
  // since. The next stall moves on to another peer.
  bool snapshot_resume_sent_ = false;

  bool replaying_stall_ = false;  // inside TickAfterStall: no election starts

  // Sanity checks.
  uint64_t rejected_message_count_ = 0;
  const char* last_rejection_ = "";

  // Role state.
  Role role_ = Role::kFollower;
  uint32_t leader_id_ = 0;
  Ballot ballot_;  // the ballot this replica proposes with (candidate, leader)
  int64_t now_ticks_ = 0;
  int64_t election_deadline_ticks_ = 0;
  // When this replica last took a heartbeat or an accept from a leader (its own clock); the
  // minimum: never. A peer's pre-vote is refused while this is within the election timeout.
  int64_t last_leader_heard_tick_ = std::numeric_limits<int64_t>::min();
  uint64_t elections_started_ = 0;
  uint64_t pre_votes_started_ = 0;
  // Lease granted by this acceptor: promise nobody but lease_ballot_ before this tick.
  Ballot lease_ballot_;
  int64_t lease_granted_until_tick_ = 0;
  std::map<uint32_t, int64_t> last_heard_tick_;

  // Candidate.
  VoteSet promises_;
  std::map<uint64_t, LogEntry> promised_entries_;  // highest-ballot entry per slot
  uint64_t promised_chosen_floor_ = 0;
  uint32_t promised_floor_peer_ = 0;
  uint64_t promised_last_slot_ = 0;
  int prepare_retry_ticks_ = 0;

  // Pre-vote (a follower whose election timer ran out).
  bool pre_voting_ = false;
  uint64_t pre_vote_attempt_ = 0;
  VoteSet pre_votes_;

  // Leader.
  uint64_t next_slot_ = 1;
  uint64_t read_floor_ = 0;            // reads are safe once commit_index_ reaches this
  uint64_t first_slot_of_ballot_ = 1;  // the lowest slot this leader may propose in its ballot
  std::map<uint64_t, Inflight> inflight_;
  std::map<uint32_t, uint64_t> match_index_;
  int heartbeat_elapsed_ticks_ = 0;
  uint64_t read_context_ = 0;                           // last heartbeat round started
  std::map<uint64_t, int64_t> read_context_sent_tick_;  // round -> tick it was sent
  std::map<uint32_t, uint64_t> acked_context_;          // peer -> highest round acked
  uint64_t quorum_acked_context_ = 0;
  int64_t lease_expires_tick_ = 0;
  int64_t last_quorum_contact_tick_ = 0;

  // Client requests.
  std::deque<QueuedRequest> queue_;         // leader: to propose; follower: to forward
  std::vector<PendingRead> waiting_reads_;  // leader: reads waiting for ReadSafe()
  std::multimap<uint64_t, PendingRead> reads_by_context_;  // leader: awaiting quorum ack
  // Follower: requests of this replica's clients forwarded to a leader and not yet answered
  // (reads) or seen chosen (writes), by (client, sequence). When another leader takes over
  // they are forwarded to it (or handled here, if this replica leads): a read is answered
  // once, and the session table applies a write at most once, so a write the old leader got
  // chosen is not applied twice.
  struct ForwardedRequest {
    ClientRequest request;
    int64_t arrived_tick = 0;
    Ballot ballot;  // of the leader it was last sent to
  };
  using ForwardedRequests = std::map<std::pair<uint64_t, uint64_t>, ForwardedRequest>;
  ForwardedRequests forwarded_reads_;
  ForwardedRequests forwarded_writes_;
  // Follower: the current leader's ballot floor (Heartbeat::ballot_floor), once heard.
  std::optional<uint64_t> leader_ballot_floor_;
  // Moves the forwarded requests last sent under another ballot than `current` back to the
  // queue: the reads, and the writes too if `writes`.
  void RequeueForwarded(const Ballot& current, bool writes);
  // Sends the writes forwarded under an earlier ballot to the current leader (or proposes
  // them, if this replica leads) once every slot chosen before its ballot has been handed
  // out here: a write chosen then was seen chosen and dropped, so none is sent twice.
  void MaybeRequeueForwardedWrites();

  Ready pending_;
  bool commit_announce_ = false;    // leader: the commit index advanced since it was sent
  bool read_round_wanted_ = false;  // leader: reads wait for a new heartbeat round
  bool awaiting_advance_ = false;
};

}  // namespace synod

#endif  // SYNOD_CORE_REPLICA_H_

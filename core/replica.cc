#include "core/replica.h"

#include <algorithm>
#include <utility>

#include "core/check.h"
#include "core/stable_hash.h"

namespace synod {
namespace {

bool SameValue(const Value& a, const Value& b) {
  std::string sa, sb;
  SYNOD_CHECK(a.SerializeToString(&sa) && b.SerializeToString(&sb));
  return sa == sb;
}

Value NoopValue() {
  Value v;
  v.set_noop(true);
  return v;
}

bool IsRead(const ClientRequest& r) { return r.command().has_read_barrier(); }

}  // namespace

const char* RoleName(Role role) {
  switch (role) {
    case Role::kFollower:
      return "follower";
    case Role::kCandidate:
      return "candidate";
    case Role::kLeader:
      return "leader";
  }
  return "unknown";
}

uint64_t SnapshotChecksum(std::string_view image) {
  SnapshotChecksummer checksum(image.size());
  checksum.Add(image);
  return checksum.value();
}

Replica::Replica(ReplicaConfig config, PersistedState persisted, uint64_t prng_seed)
    : config_(std::move(config)),
      prng_(prng_seed),
      promises_(VotingGroupSize()),
      pre_votes_(VotingGroupSize()) {
  SYNOD_CHECK(config_.id != 0) << "replica ids start at 1";
  SYNOD_CHECK(IsPeer(config_.id)) << "replica " << config_.id << " is not in its own group";
  SYNOD_CHECK(std::set<uint32_t>(config_.replica_ids.begin(), config_.replica_ids.end()).size() ==
              config_.replica_ids.size())
      << "duplicate replica ids";
  SYNOD_CHECK(config_.lease_duration_ticks < config_.election_timeout_ticks)
      << "a lease must end before a follower may start an election";
  // At least one tick: a follower starts its lease at the tick count it has when the
  // heartbeat arrives, up to a tick after the leader sent it, even with perfect clocks.
  SYNOD_CHECK(config_.clock_drift_bound_ticks >= 1 &&
              config_.clock_drift_bound_ticks < config_.lease_duration_ticks);
  SYNOD_CHECK(config_.heartbeat_interval_ticks > 0 && config_.retry_ticks > 0);
  // Otherwise the leader's lease, counted from the start of the last round a quorum
  // acknowledged, runs out before the next round can renew it.
  SYNOD_CHECK(config_.heartbeat_interval_ticks <
              config_.lease_duration_ticks - config_.clock_drift_bound_ticks)
      << "the heartbeat interval (" << config_.heartbeat_interval_ticks
      << " ticks) must be shorter than the lease the leader can count on (lease_duration_ticks "
      << config_.lease_duration_ticks << " - clock_drift_bound_ticks "
      << config_.clock_drift_bound_ticks << ")";
  SYNOD_CHECK(config_.max_inflight_slots > 0 && config_.max_batch_requests > 0);
  SYNOD_CHECK(config_.max_catchup_entries > 0);
  // The catch-up requests and the pipeline of a replica must fit in its peers' window.
  SYNOD_CHECK(config_.max_slots_beyond_commit >= config_.max_inflight_slots &&
              config_.max_slots_beyond_commit >= config_.max_catchup_entries);
  SYNOD_CHECK(config_.max_ballot_round_jump > 0);

  hard_ = std::move(persisted.hard_state);
  snapshot_meta_ = persisted.snapshot_meta;
  // The host names a snapshot stored before checksums (it holds the image).
  SYNOD_CHECK(snapshot_meta_.index() == 0 || snapshot_meta_.checksum() != 0)
      << "a snapshot without a checksum";
  first_index_ = snapshot_meta_.index() + 1;
  commit_index_ = snapshot_meta_.index();
  for (LogEntry& e : persisted.entries) {
    if (e.slot() < first_index_) continue;  // compaction may not have reached storage yet
    // The state machine applied it, so it is chosen, and the log holds its chosen value:
    // the one this replica accepted, or one it learned and synced before applying it (see
    // LearnChosen). Its chosen mark, not synced on its own, may have been lost in a crash;
    // it is restored here, so that the entry can be served to peers that lack it.
    if (e.slot() <= persisted.applied_index) e.set_chosen(true);
    // An accept and the promise it raised are written in one Ready; if a crash kept the
    // entry but not the hard state, the entry was never acknowledged, and the acceptor
    // simply behaves as having promised its ballot.
    if (BallotLess(hard_.promised(), e.ballot())) *hard_.mutable_promised() = e.ballot();
    uint64_t slot = e.slot();
    SYNOD_CHECK(log_.emplace(slot, std::move(e)).second) << "two entries for slot " << slot;
  }
  applied_index_ = handed_out_index_ = persisted.applied_index;
  SYNOD_CHECK_GE(applied_index_, snapshot_meta_.index());
  // What the state machine applied is chosen (marked so above).
  commit_index_ = std::max(commit_index_, applied_index_);
  AdvanceCommitIndex();
  next_slot_ = LastSlot() + 1;
  // A lease this replica granted before a restart may still run: promise nobody new for a
  // whole lease duration.
  lease_granted_until_tick_ = config_.lease_duration_ticks;
  election_deadline_ticks_ = RandomElectionTimeout();
  CheckInvariants();
}

// ---------------------------------------------------------------------------------------
// Small helpers.

bool Replica::IsPeer(uint32_t id) const {
  return std::find(config_.replica_ids.begin(), config_.replica_ids.end(), id) !=
         config_.replica_ids.end();
}

size_t Replica::VotingGroupSize() const {
  size_t size = config_.replica_ids.size();
#ifdef SYNOD_TESTING_BUGS
  // VoteSet's majority of one replica fewer, size / 2 + 1 of size - 1, is (size + 1) / 2 of
  // the group: half of an even group passes for a quorum.
  if (config_.bugs.majority_off_by_one && size > 1) return size - 1;
#endif
  return size;
}

uint64_t Replica::LastSlot() const {
  uint64_t last = log_.empty() ? 0 : log_.rbegin()->first;
  return std::max(last, snapshot_meta_.index());
}

uint64_t Replica::HighestRoundSeen() const {
  return std::max(hard_.max_round_used(), hard_.promised().round());
}

uint64_t Replica::RandomElectionTimeout() {
  // Randomized back-off so dueling proposers settle; the range is derived from the raw
  // 64-bit output (std distributions differ between standard libraries).
  uint64_t base = static_cast<uint64_t>(config_.election_timeout_ticks);
  return base + prng_() % (base + 1);
}

Message Replica::NewMessage(uint32_t to) const {
  Message m;
  m.set_from(config_.id);
  m.set_to(to);
  *m.mutable_ballot() = role_ == Role::kFollower ? hard_.promised() : ballot_;
  m.set_commit_index(commit_index_);
  return m;
}

void Replica::Send(Message m) {
  SYNOD_CHECK(m.to() != config_.id && IsPeer(m.to()));
  pending_.messages.push_back(std::move(m));
}

void Replica::PersistHardState(bool must_sync) {
  pending_.hard_state = hard_;
  pending_.must_sync |= must_sync;
  hard_state_sync_pending_ |= must_sync;
}

void Replica::PersistEntry(uint64_t slot, bool must_sync) {
  auto it = log_.find(slot);
  SYNOD_CHECK(it != log_.end());
  pending_.entries.push_back(it->second);
  pending_.must_sync |= must_sync;
}

void Replica::Reply(const ClientRequest& request, ErrorCode code, const std::string& message,
                    uint64_t read_revision) {
  ForwardReply reply;
  reply.set_client_id(request.client_id());
  reply.set_sequence(request.sequence());
  reply.set_code(code);
  reply.set_message(message);
  reply.set_read_revision(read_revision);
  reply.set_read_barrier(IsRead(request));
  uint32_t origin = request.origin_replica();
  if (origin == 0 || origin == config_.id || !IsPeer(origin)) {
    pending_.replies.push_back(std::move(reply));
    return;
  }
  Message m = NewMessage(origin);
  *m.mutable_forward_reply() = std::move(reply);
  Send(std::move(m));
}

// ---------------------------------------------------------------------------------------
// Sanity checks on peer messages, and the replica's own invariants.

const char* Replica::BallotRejectReason(const Ballot& ballot) const {
  if (ballot.round() >= kMaxBallotRound) return "a ballot round at or above kMaxBallotRound";
  uint64_t seen = HighestRoundSeen();
  if (ballot.round() > seen && ballot.round() - seen > config_.max_ballot_round_jump) {
    return "a ballot round more than max_ballot_round_jump above any seen";
  }
  // Round 0 is "no ballot" (an acceptor that has promised nothing) and belongs to nobody.
  if ((ballot.round() == 0) != (ballot.replica_id() == 0)) return "a malformed ballot";
  if (ballot.replica_id() != 0 && !IsPeer(ballot.replica_id())) {
    return "a ballot of a replica not in the group";
  }
  return nullptr;
}

const char* Replica::RejectReason(const Message& m) const {
  // The envelope.
  if (m.to() != config_.id) return "a message addressed to another replica";
  if (m.from() == config_.id) return "a message from this replica itself";
  if (!IsPeer(m.from())) return "a message from a replica not in the group";
  if (const char* reason = BallotRejectReason(m.ballot())) return reason;
  // The envelope's commit index is not held to the slot window: a replica far behind learns
  // from it that it must catch up. No loop walks up to it (LearnFromLeader walks the entries
  // held), and only a promise turns it into an obligation, so promises are held to the window.
  const uint64_t window_end = commit_index_ + config_.max_slots_beyond_commit;
  auto outside_window = [&](uint64_t slot) { return slot == 0 || slot > window_end; };

  // A proposer speaks at its own ballot.
  const bool at_own_ballot = m.ballot().replica_id() == m.from();
  const char* kNotOwnBallot = "a proposer message at another replica's ballot";

  switch (m.body_case()) {
    case Message::kPrepare:
    case Message::kHeartbeat:
      return at_own_ballot ? nullptr : kNotOwnBallot;
    case Message::kAccept:
      if (!at_own_ballot) return kNotOwnBallot;
      for (const LogEntry& e : m.accept().entries()) {
        if (outside_window(e.slot())) return "an accept for a slot beyond the slot window";
      }
      return nullptr;
    case Message::kNack:  // its slot is informational and never used
    case Message::kForwardReply:
    case Message::kPreVote:
    case Message::kPreVoteReply:
      return nullptr;
    case Message::kPromise: {
      const Promise& p = m.promise();
      // A candidate further behind than the window would have to propose beyond it.
      if (m.commit_index() > window_end || p.last_slot() > window_end) {
        return "a promise naming slots beyond the slot window";
      }
      for (const LogEntry& e : p.entries()) {
        if (outside_window(e.slot()) || e.slot() > p.last_slot()) {
          return "a promised entry outside the slot window or past the promise's last slot";
        }
        if (BallotRejectReason(e.ballot()) != nullptr) return "a promised entry with a bad ballot";
      }
      return nullptr;
    }
    case Message::kAccepted:
      for (uint64_t slot : m.accepted().slots()) {
        if (outside_window(slot)) return "an acknowledgement for a slot beyond the slot window";
      }
      return nullptr;
    case Message::kHeartbeatAck:
      if (m.heartbeat_ack().read_context() > read_context_) {
        return "a heartbeat acknowledgement for a round never sent";
      }
      return nullptr;
    case Message::kCatchupRequest: {
      const CatchupRequest& req = m.catchup_request();
      if (req.from_slot() == 0 || req.from_slot() > req.to_slot() || req.to_slot() > window_end) {
        return "a catch-up request for an empty range or one beyond the slot window";
      }
      return nullptr;
    }
    case Message::kCatchupResponse: {
      // Chosen values are taken on the word of the peer asked, and only for the slots asked.
      const CatchupResponse& resp = m.catchup_response();
      if (catchup_retry_ticks_ == 0 || m.from() != catchup_peer_) {
        return "a catch-up answer from a replica this one did not ask";
      }
      if (resp.needs_snapshot() && resp.entries_size() > 0) {
        return "a catch-up answer with both entries and a snapshot";
      }
      for (const LogEntry& e : resp.entries()) {
        if (!e.chosen()) return "a catch-up entry not marked chosen";
        if (e.slot() < catchup_from_slot_ || e.slot() > catchup_to_slot_) {
          return "a catch-up entry outside the slots asked for";
        }
        if (e.slot() > m.commit_index()) return "a catch-up entry beyond its sender's commit index";
      }
      return nullptr;
    }
    case Message::kSnapshotChunk: {
      // Only the transfer this replica asked for, from the peer it asked, chunk after chunk.
      const SnapshotChunk& chunk = m.snapshot_chunk();
      const SnapshotMeta& meta = chunk.meta();
      if (catchup_retry_ticks_ == 0 || m.from() != catchup_peer_) {
        return "a snapshot chunk from a replica this one did not ask";
      }
      if (meta.index() <= commit_index_) return "a snapshot chunk with nothing this replica lacks";
      if (meta.index() > m.commit_index()) return "a snapshot beyond its sender's commit index";
      uint64_t size = meta.size_bytes();
      if (chunk.offset() > size || chunk.data().size() > size - chunk.offset()) {
        return "a snapshot chunk past the snapshot's size";
      }
      bool ends = chunk.offset() + chunk.data().size() == size;
      if (chunk.last() != ends || (chunk.data().empty() && !ends)) {
        return "a snapshot chunk whose last flag disagrees with its size";
      }
      if (meta.checksum() == 0) return "a snapshot chunk whose image has no checksum";
      bool same_transfer = incoming_snapshot_meta_ && incoming_snapshot_from_ == m.from() &&
                           incoming_snapshot_meta_->index() == meta.index() &&
                           incoming_snapshot_meta_->size_bytes() == size &&
                           incoming_snapshot_meta_->checksum() == meta.checksum();
      if (same_transfer && chunk.offset() != incoming_snapshot_bytes_) {
        return "a snapshot chunk out of order";
      }
      // A chunk at offset 0 of another snapshot starts a new transfer: the peer asked now is
      // not the one of the transfer under way, or its snapshot changed since.
      if (!same_transfer && chunk.offset() != 0) return "a snapshot chunk of no transfer under way";
      return nullptr;
    }
    case Message::kSnapshotAck: {
      // It continues the snapshot held, from an offset inside it; or it names another (this
      // replica's snapshot changed, or it restarted with an older one) and is answered with
      // the start of the one held, which must then be of use: above the sender's commit index.
      const SnapshotAck& ack = m.snapshot_ack();
      bool held =
          ack.index() == snapshot_meta_.index() && ack.checksum() == snapshot_meta_.checksum();
      if (held ? ack.next_offset() > snapshot_meta_.size_bytes()
               : snapshot_meta_.index() <= m.commit_index()) {
        return "a snapshot acknowledgement for a snapshot this replica does not hold";
      }
      return nullptr;
    }
    case Message::kForwardRequest:
      for (const ClientRequest& r : m.forward_request().requests()) {
        if (!IsPeer(r.origin_replica())) return "a forwarded request from no replica of the group";
      }
      return nullptr;
    case Message::BODY_NOT_SET:
      return "a message with no body";
  }
  return nullptr;
}

void Replica::CheckInvariants() const {
  // Ballots: no round near overflow; a proposer holds its own ballot as its promise.
  SYNOD_CHECK_LT(hard_.promised().round(), kMaxBallotRound);
  SYNOD_CHECK_LT(hard_.max_round_used(), kMaxBallotRound);
  SYNOD_CHECK_EQ(role_ == Role::kLeader, leader_id_ == config_.id);
  if (role_ != Role::kFollower) {
    SYNOD_CHECK(BallotEqual(ballot_, hard_.promised())) << "a proposer promised another ballot";
    SYNOD_CHECK_EQ(ballot_.replica_id(), config_.id);
    SYNOD_CHECK_LE(ballot_.round(), hard_.max_round_used()) << "a round used before recorded";
  }
  // The log: compacted below first_index_, chosen and held up to commit_index_, applied
  // (and handed out for applying) no further.
  SYNOD_CHECK_EQ(first_index_, snapshot_meta_.index() + 1);
  SYNOD_CHECK(snapshot_meta_.index() == 0 || snapshot_meta_.checksum() != 0);
  SYNOD_CHECK(log_.empty() || log_.begin()->first >= first_index_);
  SYNOD_CHECK_LE(snapshot_meta_.index(), commit_index_);
  SYNOD_CHECK_LE(commit_index_, LastSlot()) << "a commit index past every slot held";
  auto next = log_.find(commit_index_ + 1);
  SYNOD_CHECK(next == log_.end() || !next->second.chosen()) << "the commit index lags";
  SYNOD_CHECK_LE(applied_index_, handed_out_index_);
  SYNOD_CHECK_LE(handed_out_index_, commit_index_);
  if (role_ == Role::kLeader) {
    SYNOD_CHECK_GT(next_slot_, commit_index_);
    SYNOD_CHECK(inflight_.empty() || inflight_.begin()->first > commit_index_);
  }
  if (incoming_snapshot_meta_) {
    SYNOD_CHECK(IsPeer(incoming_snapshot_from_) && incoming_snapshot_bytes_ > 0 &&
                incoming_snapshot_bytes_ < incoming_snapshot_meta_->size_bytes())
        << "a snapshot transfer that is complete, empty or from nobody";
  }
}

// ---------------------------------------------------------------------------------------
// Role transitions.

void Replica::BecomeFollower(uint32_t leader_id) {
  if (role_ == Role::kLeader) {
    // Reads that were waiting for this leader's confirmation go to the next leader.
    std::deque<QueuedRequest> requeue;
    for (PendingRead& r : waiting_reads_) requeue.push_back({std::move(r.request), r.arrived_tick});
    for (auto& [context, r] : reads_by_context_) {
      requeue.push_back({std::move(r.request), r.arrived_tick});
    }
    waiting_reads_.clear();
    reads_by_context_.clear();
    for (QueuedRequest& q : queue_) requeue.push_back(std::move(q));
    queue_ = std::move(requeue);
    inflight_.clear();
    read_context_sent_tick_.clear();
    acked_context_.clear();
    lease_expires_tick_ = 0;
  }
  role_ = Role::kFollower;
  leader_id_ = leader_id;
  pre_voting_ = false;
  election_deadline_ticks_ = now_ticks_ + RandomElectionTimeout();
  leader_ballot_floor_.reset();
  if (leader_id_ != 0) {
    // Reads forwarded to a leader that is gone go to this one, without waiting for a
    // timeout; writes once it is safe (MaybeRequeueForwardedWrites).
    RequeueForwarded(hard_.promised(), /*writes=*/false);
    ForwardQueued();
  }
}

void Replica::RequeueForwarded(const Ballot& current, bool writes) {
  for (ForwardedRequests* forwarded : {&forwarded_reads_, &forwarded_writes_}) {
    if (forwarded == &forwarded_writes_ && !writes) continue;
    for (auto it = forwarded->begin(); it != forwarded->end();) {
      ForwardedRequest& f = it->second;
      if (BallotEqual(f.ballot, current)) {
        ++it;
        continue;
      }
      queue_.push_back({std::move(f.request), f.arrived_tick});
      it = forwarded->erase(it);
    }
  }
}

void Replica::MaybeRequeueForwardedWrites() {
  if (forwarded_writes_.empty()) return;
  // Every value chosen under an earlier ballot lies at or below the current leader's floor,
  // and no slot above it can still be chosen at such a ballot (a majority promised the
  // current one). So once every slot up to the floor has been handed out here, a forwarded
  // write not seen among them was not chosen, and never will be under its old ballot.
  if (role_ == Role::kLeader && handed_out_index_ >= read_floor_) {
    RequeueForwarded(ballot_, /*writes=*/true);
    MaybeProposeBatches();
  } else if (role_ == Role::kFollower && leader_id_ != 0 && leader_ballot_floor_ &&
             handed_out_index_ >= *leader_ballot_floor_) {
    RequeueForwarded(hard_.promised(), /*writes=*/true);
    ForwardQueued();
  }
}

void Replica::StartPreVote() {
#ifdef SYNOD_TESTING_BUGS
  if (config_.testing_no_pre_vote) return StartElection();
#endif
  leader_id_ = 0;
  pre_voting_ = true;
  ++pre_vote_attempt_;
  ++pre_votes_started_;
  pre_votes_ = VoteSet(VotingGroupSize());
  pre_votes_.Add(config_.id);
  election_deadline_ticks_ = now_ticks_ + RandomElectionTimeout();
  for (uint32_t peer : config_.replica_ids) {
    if (peer == config_.id) continue;
    Message m = NewMessage(peer);
    m.mutable_pre_vote()->set_attempt(pre_vote_attempt_);
    Send(std::move(m));
  }
  if (pre_votes_.HasQuorum()) StartElection();
}

void Replica::StartElection() {
  SYNOD_CHECK(role_ != Role::kLeader) << "a leader stands for election without stepping down";
  SYNOD_CHECK(now_ticks_ >= lease_granted_until_tick_ || lease_ballot_.replica_id() == config_.id)
      << "election while a lease granted to another proposer may still run";
  role_ = Role::kCandidate;
  leader_id_ = 0;
  pre_voting_ = false;
  ++elections_started_;
  uint64_t round = HighestRoundSeen() + 1;
  // Every round held is below the cap (messages at or above it are dropped), so this never
  // wraps. It reaches the cap only after 2^62 elections, or 2^30 messages each raising the
  // round by the whole max_ballot_round_jump.
  SYNOD_CHECK_LT(round, kMaxBallotRound) << "the ballot round space is used up";
  ballot_ = MakeBallot(round, config_.id);
  // The round is durable before any message carries it, so it is never reused.
  hard_.set_max_round_used(round);
  *hard_.mutable_promised() = ballot_;
  PersistHardState(/*must_sync=*/true);

  promises_ = VoteSet(VotingGroupSize());
  promises_.Add(config_.id);
  promised_entries_.clear();
  for (auto it = log_.upper_bound(commit_index_); it != log_.end(); ++it) {
    promised_entries_.emplace(it->first, it->second);
  }
  promised_chosen_floor_ = commit_index_;
  promised_floor_peer_ = config_.id;
  promised_last_slot_ = LastSlot();
  prepare_retry_ticks_ = 0;
  election_deadline_ticks_ = now_ticks_ + RandomElectionTimeout();
  for (uint32_t peer : config_.replica_ids) {
    if (peer == config_.id) continue;
    Message m = NewMessage(peer);
    m.mutable_prepare()->set_from_slot(commit_index_ + 1);
    Send(std::move(m));
  }
  if (promises_.HasQuorum()) BecomeLeader();
}

void Replica::BecomeLeader() {
  SYNOD_CHECK(role_ == Role::kCandidate && promises_.HasQuorum());
  SYNOD_CHECK(BallotEqual(hard_.promised(), ballot_));
  // Values some promiser knows to be chosen are learned, not proposed again.
  for (auto& [slot, entry] : promised_entries_) {
    if (entry.chosen()) LearnChosen(slot, entry.value());
  }
  role_ = Role::kLeader;
  leader_id_ = config_.id;
  inflight_.clear();
  match_index_.clear();
  acked_context_.clear();
  read_context_sent_tick_.clear();
  quorum_acked_context_ = read_context_;
  lease_expires_tick_ = 0;
  last_quorum_contact_tick_ = now_ticks_;

  // Every slot up to the highest commit index reported is chosen; those this replica lacks
  // come by catch-up. Above it, re-propose the highest-ballot value of every slot, and
  // fill the gaps with no-ops.
  uint64_t floor = std::max(commit_index_, promised_chosen_floor_);
  uint64_t last = std::max({promised_last_slot_, floor, LastSlot()});
  first_slot_of_ballot_ = floor + 1;
  for (uint64_t slot = floor + 1; slot <= last; ++slot) {
    auto known = log_.find(slot);
    if (known != log_.end() && known->second.chosen()) continue;
    auto p = promised_entries_.find(slot);
    Value value = p != promised_entries_.end() ? p->second.value() : NoopValue();
#ifdef SYNOD_TESTING_BUGS
    if (config_.bugs.skip_repropose) value = NoopValue();
#endif
    ProposeSlot(slot, std::move(value));
  }
  promised_entries_.clear();
  next_slot_ = last + 1;
  // Reads are linearizable only once everything that may have been chosen before this
  // ballot is chosen here too.
  read_floor_ = last;
  // What this replica forwarded to an earlier leader and has not seen answered, it now
  // handles itself: reads now, writes once it has handed out every slot up to its floor.
  RequeueForwarded(ballot_, /*writes=*/false);
  if (floor > commit_index_) MaybeRequestCatchup(promised_floor_peer_, floor);
  BroadcastHeartbeat();
  MaybeProposeBatches();
}

// ---------------------------------------------------------------------------------------
// Tick.

void Replica::Tick() {
  ++now_ticks_;
  switch (role_) {
    case Role::kLeader:
      TickLeader();
      break;
    case Role::kCandidate:
      TickCandidate();
      break;
    case Role::kFollower:
      TickFollower();
      break;
  }
  if (catchup_retry_ticks_ > 0 && --catchup_retry_ticks_ == 0 &&
      catchup_wanted_until_ > commit_index_) {
    uint32_t peer = config_.id;
    if (incoming_snapshot_meta_ && incoming_snapshot_from_ == catchup_peer_ &&
        !snapshot_resume_sent_) {
      // A snapshot transfer stalled (a chunk or an acknowledgement was lost): ask its sender
      // for the rest once more before moving on, as another peer would start over at offset 0.
      snapshot_resume_sent_ = true;
      peer = catchup_peer_;
    } else {
      // Unanswered, or answered with nothing: ask the next peer in turn, so that one peer
      // that cannot serve (dead, or lost its chosen marks) does not stall this replica.
      auto it = std::find(config_.replica_ids.begin(), config_.replica_ids.end(), catchup_peer_);
      for (size_t i = 0; i < config_.replica_ids.size() && peer == config_.id; ++i) {
        if (it == config_.replica_ids.end() || ++it == config_.replica_ids.end()) {
          it = config_.replica_ids.begin();
        }
        peer = *it;
      }
    }
    MaybeRequestCatchup(peer, catchup_wanted_until_);
  }
  if (incoming_snapshot_meta_ && incoming_snapshot_meta_->index() <= commit_index_) {
    incoming_snapshot_meta_.reset();  // caught up otherwise: nothing in it is missing now
    incoming_snapshot_bytes_ = 0;
    incoming_snapshot_checksum_.reset();
    snapshot_resume_sent_ = false;
  }
  MaybeRequeueForwardedWrites();
  ExpireRequests();
  CheckInvariants();
}

void Replica::ExpireRequests() {
  // Refuses (UNAVAILABLE; the client may retry) what has waited too long, and drops it.
  auto refuse_expired = [&](const ClientRequest& request, int64_t arrived_tick, const char* why) {
    if (now_ticks_ - arrived_tick <= config_.request_timeout_ticks) return false;
    Reply(request, UNAVAILABLE, why, 0);
    return true;
  };
  std::erase_if(queue_, [&](const QueuedRequest& q) {
    return refuse_expired(q.request, q.arrived_tick, "no leader reachable");
  });
  std::erase_if(waiting_reads_, [&](const PendingRead& r) {
    return refuse_expired(r.request, r.arrived_tick, "the leader could not confirm the read");
  });
  std::erase_if(reads_by_context_, [&](const auto& entry) {
    const PendingRead& r = entry.second;
    return refuse_expired(r.request, r.arrived_tick, "the leader could not confirm the read");
  });
  std::erase_if(forwarded_reads_, [&](const auto& entry) {
    const ForwardedRequest& f = entry.second;
    return refuse_expired(f.request, f.arrived_tick, "the leader did not confirm the read");
  });
  // A forwarded write is not refused here: it may be chosen yet, and the host answers it
  // when it applies it or when its own timeout runs out. It is only no longer sent on.
  std::erase_if(forwarded_writes_, [&](const auto& entry) {
    return now_ticks_ - entry.second.arrived_tick > config_.request_timeout_ticks;
  });
}

void Replica::TickAfterStall(int64_t ticks) {
  SYNOD_CHECK_GE(ticks, 0);
  replaying_stall_ = true;
  for (int64_t i = 0; i < ticks; ++i) Tick();
  replaying_stall_ = false;
  if (role_ != Role::kLeader) {
    election_deadline_ticks_ = now_ticks_ + static_cast<int64_t>(RandomElectionTimeout());
  } else {
    // The followers' acknowledgements are likely waiting to be read, as the leader's
    // heartbeats are for a follower: half an election timeout to hear a majority before it
    // steps down. Only stepping down depends on this; leases and reads have their own
    // clocks, which the replay has advanced in full.
    last_quorum_contact_tick_ =
        std::max(last_quorum_contact_tick_, now_ticks_ - config_.election_timeout_ticks / 2);
  }
  CheckInvariants();
}

void Replica::TickFollower() {
  if (replaying_stall_) return;
  if (now_ticks_ >= election_deadline_ticks_ && now_ticks_ >= lease_granted_until_tick_) {
    StartPreVote();  // again after each timeout, until a majority would support it
  }
}

void Replica::TickCandidate() {
  if (replaying_stall_) return;
  if (now_ticks_ >= election_deadline_ticks_) {
    // Lost, or no majority answered: ask again before a higher round, after a randomized
    // back-off. A leader may have been elected meanwhile, or the old one heard again.
#ifdef SYNOD_TESTING_BUGS
    if (config_.testing_no_pre_vote) return StartElection();
#endif
    BecomeFollower(0);
    StartPreVote();
    return;
  }
  if (++prepare_retry_ticks_ < config_.retry_ticks) return;
  prepare_retry_ticks_ = 0;
  for (uint32_t peer : config_.replica_ids) {
    if (peer == config_.id || promises_.Has(peer)) continue;
    Message m = NewMessage(peer);
    m.mutable_prepare()->set_from_slot(commit_index_ + 1);
    Send(std::move(m));
  }
}

void Replica::TickLeader() {
  if (!replaying_stall_ &&
      now_ticks_ - last_quorum_contact_tick_ > config_.election_timeout_ticks) {
    // Cut off from a majority: stop acting as leader so clients are refused promptly.
    BecomeFollower(0);
    return;
  }
  if (++heartbeat_elapsed_ticks_ >= config_.heartbeat_interval_ticks) {
    BroadcastHeartbeat();
  }
  for (auto& [slot, inflight] : inflight_) {
    if (++inflight.ticks_since_sent < config_.retry_ticks) continue;
    inflight.ticks_since_sent = 0;
    for (uint32_t peer : config_.replica_ids) {
      if (peer != config_.id && !inflight.votes.Has(peer)) SendAccept(peer, slot);
    }
  }
  // Requests held back at the edge of the slot window (or behind slots learned otherwise
  // than by acknowledgement, as by catch-up) go out once there is room.
  MaybeProposeBatches();
}

// ---------------------------------------------------------------------------------------
// Step.

void Replica::Step(const Message& m) {
  if (const char* reason = RejectReason(m)) {
    ++rejected_message_count_;
    last_rejection_ = reason;
    return;
  }
  StepMessage(m);
  CheckInvariants();
}

void Replica::StepMessage(const Message& m) {
  last_heard_tick_[m.from()] = now_ticks_;
  switch (m.body_case()) {
    case Message::kPrepare:
      StepPrepare(m);
      break;
    case Message::kPromise:
      StepPromise(m);
      break;
    case Message::kAccept:
      StepAccept(m);
      break;
    case Message::kAccepted:
      StepAccepted(m);
      break;
    case Message::kNack:
      StepNack(m);
      break;
    case Message::kHeartbeat:
      StepHeartbeat(m);
      break;
    case Message::kHeartbeatAck:
      StepHeartbeatAck(m);
      break;
    case Message::kCatchupRequest:
      StepCatchupRequest(m);
      break;
    case Message::kCatchupResponse:
      StepCatchupResponse(m);
      break;
    case Message::kSnapshotChunk:
      StepSnapshotChunk(m);
      break;
    case Message::kSnapshotAck:
      StepSnapshotAck(m);
      break;
    case Message::kForwardRequest:
      StepForwardRequest(m);
      break;
    case Message::kForwardReply:
      StepForwardReply(m);
      break;
    case Message::kPreVote:
      StepPreVote(m);
      break;
    case Message::kPreVoteReply:
      StepPreVoteReply(m);
      break;
    case Message::BODY_NOT_SET:
      SYNOD_CHECK(false) << "RejectReason lets no message without a body through";
  }
  if (m.commit_index() > commit_index_) MaybeRequestCatchup(m.from(), m.commit_index());
}

// Acceptor ------------------------------------------------------------------------------

bool Replica::MayPromise(const Ballot& ballot, uint32_t from) const {
  if (BallotLess(ballot, hard_.promised())) return false;
  // While a lease granted to another proposer runs, its holder may be serving reads
  // without a round trip: no one else may be promised until it ends.
  if (now_ticks_ < lease_granted_until_tick_ && lease_ballot_.replica_id() != from) return false;
  return true;
}

void Replica::RaisePromise(const Ballot& ballot) {
  if (!BallotLess(hard_.promised(), ballot)) return;
  *hard_.mutable_promised() = ballot;
  bool must_sync = true;  // the promise is durable before any message says it was made
#ifdef SYNOD_TESTING_BUGS
  if (config_.bugs.promise_before_durable) must_sync = false;
#endif
  PersistHardState(must_sync);
}

void Replica::GrantLease(const Ballot& ballot) {
#ifdef SYNOD_TESTING_BUGS
  if (config_.testing_no_acceptor_lease) return;
#endif
  lease_ballot_ = ballot;
  lease_granted_until_tick_ = now_ticks_ + config_.lease_duration_ticks;
}

void Replica::AcceptEntry(uint64_t slot, const Ballot& ballot, const Value& value) {
  SYNOD_CHECK(!BallotLess(ballot, hard_.promised())) << "accept below the promise";
  if (slot < first_index_) return;  // compacted: chosen long ago
  LogEntry& e = log_[slot];
  if (e.chosen()) {
    SYNOD_CHECK(SameValue(e.value(), value))
        << "a different value proposed for chosen slot " << slot;
    return;
  }
  e.set_slot(slot);
  *e.mutable_ballot() = ballot;
  *e.mutable_value() = value;
  PersistEntry(slot, /*must_sync=*/true);
}

void Replica::SendNack(uint32_t to, uint64_t slot) {
  Message nack = NewMessage(to);
  nack.mutable_nack()->set_slot(slot);
  Send(std::move(nack));
}

void Replica::FollowLeader(const Message& m) {
  RaisePromise(m.ballot());
  if (role_ != Role::kFollower || leader_id_ != m.from()) BecomeFollower(m.from());
  election_deadline_ticks_ = now_ticks_ + RandomElectionTimeout();
  last_leader_heard_tick_ = now_ticks_;
  GrantLease(m.ballot());
}

void Replica::StepPrepare(const Message& m) {
  if (!MayPromise(m.ballot(), m.from())) return SendNack(m.from());
  bool higher = BallotLess(hard_.promised(), m.ballot());
  RaisePromise(m.ballot());
  if (higher && role_ != Role::kFollower) BecomeFollower(0);
  if (higher) {
    leader_id_ = 0;
    pre_voting_ = false;  // another replica stands: let it
    election_deadline_ticks_ = now_ticks_ + RandomElectionTimeout();
  }
  Message reply = NewMessage(m.from());
  Promise* p = reply.mutable_promise();
  uint64_t from_slot = std::max(m.prepare().from_slot(), first_index_);
  p->set_from_slot(from_slot);
  for (auto it = log_.lower_bound(from_slot); it != log_.end(); ++it) {
    *p->add_entries() = it->second;
  }
  p->set_snapshot_index(snapshot_meta_.index());
  p->set_last_slot(LastSlot());
  Send(std::move(reply));
}

void Replica::StepPreVote(const Message& m) {
  // No while this replica leads, or heard a leader within the election timeout: that leader
  // is likely alive, and an election would only depose it. (The asker's log does not matter:
  // any proposer that wins adopts what a majority accepted.)
  bool heard_leader = last_leader_heard_tick_ != std::numeric_limits<int64_t>::min() &&
                      now_ticks_ - last_leader_heard_tick_ < config_.election_timeout_ticks;
  Message reply = NewMessage(m.from());
  reply.mutable_pre_vote_reply()->set_attempt(m.pre_vote().attempt());
  reply.mutable_pre_vote_reply()->set_granted(role_ != Role::kLeader && !heard_leader);
  Send(std::move(reply));
}

void Replica::StepPreVoteReply(const Message& m) {
  const PreVoteReply& r = m.pre_vote_reply();
  if (!pre_voting_ || role_ != Role::kFollower || r.attempt() != pre_vote_attempt_ ||
      !r.granted()) {
    return;
  }
  // A lease granted since the pre-vote began (it then heard a leader, which ends the
  // pre-vote) holds this replica back.
  if (now_ticks_ < lease_granted_until_tick_ && lease_ballot_.replica_id() != config_.id) return;
  pre_votes_.Add(m.from());
  if (pre_votes_.HasQuorum()) StartElection();
}

void Replica::StepAccept(const Message& m) {
  if (BallotLess(m.ballot(), hard_.promised())) {
    return SendNack(m.from(), m.accept().entries_size() > 0 ? m.accept().entries(0).slot() : 0);
  }
  FollowLeader(m);

  Message reply = NewMessage(m.from());
  Accepted* accepted = reply.mutable_accepted();
  for (const LogEntry& e : m.accept().entries()) {
    if (e.slot() < first_index_) continue;  // compacted: the proposer learns it by catch-up
    AcceptEntry(e.slot(), m.ballot(), e.value());
    accepted->add_slots(e.slot());
  }
  LearnFromLeader(m);
  Send(std::move(reply));
}

void Replica::StepHeartbeat(const Message& m) {
  if (BallotLess(m.ballot(), hard_.promised())) return SendNack(m.from());
  FollowLeader(m);
  leader_ballot_floor_ = m.heartbeat().ballot_floor();
  LearnFromLeader(m);
  Message ack = NewMessage(m.from());
  ack.mutable_heartbeat_ack()->set_read_context(m.heartbeat().read_context());
  // It acknowledges nothing durable (only that this replica follows the ballot, which it
  // has durably promised or accepted at): it need not wait for the Ready's fsync, so a
  // follower whose disk is slow stays in contact with its leader.
  SendEarly(std::move(ack));
}

// Learner -------------------------------------------------------------------------------

void Replica::LearnChosen(uint64_t slot, const Value& value) {
  if (slot < first_index_) return;
  auto existing = log_.find(slot);
  if (existing != log_.end() && existing->second.chosen()) {
    SYNOD_CHECK(SameValue(existing->second.value(), value))
        << "two values chosen for slot " << slot;
    return;
  }
  if (role_ == Role::kLeader) {
    bool proposed_here = existing != log_.end() && BallotEqual(existing->second.ballot(), ballot_);
    bool superseded =
        proposed_here ? !SameValue(existing->second.value(), value) : slot >= next_slot_;
    // Another leader chose this slot: a value other than ours where we proposed, or a slot
    // we have not reached. Followers hold our proposal at our ballot, and would take it
    // for chosen if we announced a commit index covering this slot: stop leading first.
    if (superseded) BecomeFollower(0);
  }
  LogEntry& e = log_[slot];
  e.set_slot(slot);
  // Whether this replica accepted the very value chosen: its accept is then in the log,
  // durable before anything of the slot is applied (it went in this Ready or an earlier
  // one), and after a restart the log holds the right value for every applied slot even
  // without the mark. That is the usual case; it costs no extra fsync.
  const bool accepted_this_value = e.has_value() && SameValue(e.value(), value);
  if (!accepted_this_value) {
    *e.mutable_value() = value;
    e.clear_ballot();  // the ballot no longer describes this value
  }
  e.set_chosen(true);
  inflight_.erase(slot);
  // Not synced on its own: a chosen value lost in a crash is learned again from peers. A
  // value this replica did not accept is synced before the host applies it (GetReady), so
  // that after a restart every applied slot holds its chosen value in the log.
  PersistEntry(slot, /*must_sync=*/false);
  if (!accepted_this_value) unsynced_chosen_ = true;
  AdvanceCommitIndex();
}

void Replica::AdvanceCommitIndex() {
  uint64_t before = commit_index_;
  for (auto it = log_.find(commit_index_ + 1); it != log_.end() && it->second.chosen();
       it = log_.find(commit_index_ + 1)) {
    ++commit_index_;
  }
  if (commit_index_ > before && role_ == Role::kLeader) commit_announce_ = true;
  SYNOD_CHECK_LE(applied_index_, commit_index_);
}

void Replica::LearnFromLeader(const Message& m) {
  // A leader proposes one value per slot in its ballot, so an entry accepted at the
  // leader's ballot below its commit index holds the chosen value. The walk is over the
  // entries held, not the slots up to the commit index the message claims.
  for (auto it = log_.upper_bound(commit_index_); it != log_.end() && it->first <= m.commit_index();
       ++it) {
    if (it->second.chosen() || !BallotEqual(it->second.ballot(), m.ballot())) continue;
    Value value = it->second.value();
    LearnChosen(it->first, value);  // changes this entry in place: `it` stays valid
  }
}

void Replica::MaybeRequestCatchup(uint32_t peer, uint64_t peer_commit) {
  if (peer_commit <= commit_index_ || peer == config_.id || !IsPeer(peer)) return;
  catchup_wanted_until_ = std::max(catchup_wanted_until_, peer_commit);
  if (catchup_retry_ticks_ > 0) return;  // one request outstanding at a time
  catchup_peer_ = peer;
  Message m = NewMessage(peer);
  if (incoming_snapshot_meta_ && incoming_snapshot_from_ == peer) {
    // A transfer from this peer stalled (a chunk or an acknowledgement was lost): ask for
    // the rest of it rather than start over. A peer whose snapshot changed since answers with
    // the start of the one it holds.
    catchup_from_slot_ = 1;
    catchup_to_slot_ = 0;  // no entries asked for
    catchup_retry_ticks_ = config_.retry_ticks * 4;
    m.mutable_snapshot_ack()->set_index(incoming_snapshot_meta_->index());
    m.mutable_snapshot_ack()->set_next_offset(incoming_snapshot_bytes_);
    m.mutable_snapshot_ack()->set_checksum(incoming_snapshot_meta_->checksum());
    Send(std::move(m));
    return;
  }
  catchup_from_slot_ = commit_index_ + 1;
  catchup_to_slot_ = std::min<uint64_t>(peer_commit, commit_index_ + config_.max_catchup_entries);
  catchup_retry_ticks_ = config_.retry_ticks;
  m.mutable_catchup_request()->set_from_slot(catchup_from_slot_);
  m.mutable_catchup_request()->set_to_slot(catchup_to_slot_);
  Send(std::move(m));
}

void Replica::StepCatchupRequest(const Message& m) {
  const CatchupRequest& req = m.catchup_request();
  Message reply = NewMessage(m.from());
  CatchupResponse* resp = reply.mutable_catchup_response();
  if (req.from_slot() < first_index_) {
    resp->set_needs_snapshot(true);
    Send(std::move(reply));
    SendSnapshotChunk(m.from(), 0);
    return;
  }
  size_t bytes = 0;
  uint64_t until = std::min(req.to_slot(), commit_index_);
  for (uint64_t slot = req.from_slot(); slot <= until; ++slot) {
    auto it = log_.find(slot);
    // A chosen mark lost in a crash (it is not synced) leaves a hole this replica cannot
    // serve; the requester asks again, usually of the leader.
    if (it == log_.end() || !it->second.chosen()) break;
    const LogEntry& e = it->second;
    bytes += e.ByteSizeLong();
    if (resp->entries_size() > 0 &&
        (bytes > config_.max_catchup_bytes ||
         static_cast<size_t>(resp->entries_size()) >= config_.max_catchup_entries)) {
      break;
    }
    *resp->add_entries() = e;
  }
  Send(std::move(reply));
}

void Replica::StepCatchupResponse(const Message& m) {
  for (const LogEntry& e : m.catchup_response().entries()) LearnChosen(e.slot(), e.value());
  if (m.catchup_response().needs_snapshot()) {
    catchup_retry_ticks_ = config_.retry_ticks * 4;  // the snapshot stream takes a while
    return;
  }
  if (m.catchup_response().entries_size() == 0) return;  // retried elsewhere on the timer
  catchup_retry_ticks_ = 0;
  if (catchup_wanted_until_ > commit_index_) MaybeRequestCatchup(m.from(), catchup_wanted_until_);
}

void Replica::SendSnapshotChunk(uint32_t peer, uint64_t offset) {
  if (snapshot_meta_.index() == 0) return;
  Message m = NewMessage(peer);
  SnapshotChunk* chunk = m.mutable_snapshot_chunk();
  *chunk->mutable_meta() = snapshot_meta_;
  // The host fills in the bytes (and the last flag) from its snapshot store.
  chunk->set_offset(std::min<uint64_t>(offset, snapshot_meta_.size_bytes()));
  Send(std::move(m));
}

void Replica::StepSnapshotChunk(const Message& m) {
  // RejectReason let through only the next chunk of the transfer under way, or the first
  // chunk of a new one, from the peer this replica asked. Two replicas' snapshots at one
  // index need not be byte-identical, so a transfer comes from one sender.
  const SnapshotChunk& chunk = m.snapshot_chunk();
  const SnapshotMeta& meta = chunk.meta();
  catchup_retry_ticks_ = config_.retry_ticks * 4;  // the snapshot stream takes a while
  snapshot_resume_sent_ = false;                   // it moves: the next stall asks again
  if (chunk.offset() == 0) {
    incoming_snapshot_meta_ = meta;
    incoming_snapshot_from_ = m.from();
    incoming_snapshot_bytes_ = 0;
    incoming_snapshot_checksum_.emplace(meta.size_bytes());
  }
  SYNOD_CHECK_EQ(chunk.offset(), incoming_snapshot_bytes_);
  incoming_snapshot_bytes_ += chunk.data().size();
  incoming_snapshot_checksum_->Add(chunk.data());
  // The whole image must be the one its meta names before anything of it is kept: bytes
  // damaged on the way, or a sender whose image file is damaged, fail the checksum. The
  // transfer is dropped whole (the store never seals it) and another peer is asked.
  if (chunk.last() && incoming_snapshot_checksum_->value() != meta.checksum()) {
    ++rejected_message_count_;
    last_rejection_ = "a snapshot whose bytes do not match its checksum";
    incoming_snapshot_meta_.reset();
    incoming_snapshot_bytes_ = 0;
    incoming_snapshot_checksum_.reset();
    snapshot_resume_sent_ = true;  // the next stall asks another peer, from the start
    return;
  }
  pending_.snapshot_chunks.push_back(chunk);  // for the host's snapshot store
  Message ack = NewMessage(m.from());
  ack.mutable_snapshot_ack()->set_index(meta.index());
  ack.mutable_snapshot_ack()->set_next_offset(incoming_snapshot_bytes_);
  ack.mutable_snapshot_ack()->set_checksum(meta.checksum());
  if (!chunk.last()) return Send(std::move(ack));
  SYNOD_CHECK_EQ(incoming_snapshot_bytes_, meta.size_bytes());
  // The host seals the image in its store (checked against the checksum once more, as
  // written) and checks its content before this Ready persists anything, or refuses it
  // whole (HostDriver).
  Send(std::move(ack));
  // A new leader catches up to the highest commit index its promisers reported, which may
  // take a snapshot: it proposed nothing up to there, so it leads on. A snapshot that
  // covers a slot it proposed means another leader chose there: it has been superseded
  // (see LearnChosen).
  if (role_ == Role::kLeader && meta.index() >= first_slot_of_ballot_) BecomeFollower(0);

  // Install: everything up to meta.index is chosen and summarized by the snapshot.
  // Forwarded writes it may hold cannot be told from the others: none is sent again (their
  // clients get the host's timeout, which says a write may or may not have been applied).
  forwarded_writes_.clear();
  log_.erase(log_.begin(), log_.upper_bound(meta.index()));
  first_index_ = meta.index() + 1;
  snapshot_meta_ = meta;
  incoming_snapshot_meta_.reset();
  incoming_snapshot_bytes_ = 0;
  incoming_snapshot_checksum_.reset();
  commit_index_ = meta.index();
  handed_out_index_ = meta.index();
  AdvanceCommitIndex();
  pending_.snapshot = SnapshotToInstall{meta};
  pending_.compacted_through = meta.index();
  pending_.must_sync = true;
  if (catchup_wanted_until_ <= commit_index_) catchup_retry_ticks_ = 0;
}

void Replica::StepSnapshotAck(const Message& m) {
  const SnapshotAck& ack = m.snapshot_ack();
  // Another image than the one held (RejectReason checked the one held is of use): start
  // the one held over.
  if (ack.index() != snapshot_meta_.index() || ack.checksum() != snapshot_meta_.checksum()) {
    return SendSnapshotChunk(m.from(), 0);
  }
  if (ack.next_offset() < snapshot_meta_.size_bytes()) {
    SendSnapshotChunk(m.from(), ack.next_offset());
  }
}

// Proposer ------------------------------------------------------------------------------

void Replica::StepPromise(const Message& m) {
  if (role_ != Role::kCandidate || !BallotEqual(m.ballot(), ballot_)) return;
  if (!promises_.Add(m.from())) return;  // duplicate
  const Promise& p = m.promise();
  for (const LogEntry& e : p.entries()) {
    auto [it, inserted] = promised_entries_.emplace(e.slot(), e);
    if (inserted || it->second.chosen()) continue;
    if (e.chosen() || BallotLess(it->second.ballot(), e.ballot())) it->second = e;
  }
  if (m.commit_index() > promised_chosen_floor_) {
    promised_chosen_floor_ = m.commit_index();
    promised_floor_peer_ = m.from();
  }
  promised_last_slot_ = std::max(promised_last_slot_, p.last_slot());
  if (promises_.HasQuorum()) BecomeLeader();
}

void Replica::StepNack(const Message& m) {
  if (role_ == Role::kFollower) return;
  // A nack below our ballot comes from an acceptor bound by a lease: keep trying.
  if (!BallotLess(ballot_, m.ballot())) return;
  hard_.set_max_round_used(std::max(hard_.max_round_used(), m.ballot().round()));
  PersistHardState(/*must_sync=*/false);
  if (role_ == Role::kLeader && LeaseValid()) {
    // One acceptor promised a higher ballot (a candidate that got no further, before a
    // partition healed), while a majority still follows this leader: win that acceptor back
    // at a higher round rather than leave the group leaderless. The followers' leases name
    // this replica, so they promise it at once. A leader elected at that higher ballot
    // would have been heard from here, or would hold leases this prepare cannot break.
    // It stops leading first: its waiting reads and requests go back to the queue, to be
    // served in the new ballot.
    BecomeFollower(0);
    StartElection();
    return;
  }
  BecomeFollower(0);
}

void Replica::ProposeSlot(uint64_t slot, Value value) {
  SYNOD_CHECK(role_ == Role::kLeader);
  SYNOD_CHECK_GT(slot, commit_index_);
  AcceptEntry(slot, ballot_, value);
  auto [it, inserted] = inflight_.emplace(slot, Inflight(VotingGroupSize()));
  SYNOD_CHECK(inserted) << "slot " << slot << " proposed twice in one ballot";
  // The leader's own vote counts once its accept is durable (Advance), not before: the
  // accepts to its peers leave at once, and a value must not be chosen with a vote that a
  // crash could still take back.
  for (uint32_t peer : config_.replica_ids) {
    if (peer != config_.id) SendAccept(peer, slot);
  }
}

void Replica::CountOwnVotes(const Ready& ready) {
  if (role_ != Role::kLeader) return;
  bool counted = false;
  for (const LogEntry& e : ready.entries) {
    if (e.chosen() || !BallotEqual(e.ballot(), ballot_)) continue;
    auto it = inflight_.find(e.slot());
    if (it == inflight_.end() || !it->second.votes.Add(config_.id)) continue;
    counted = true;
    if (it->second.votes.HasQuorum()) LearnChosen(e.slot(), log_.at(e.slot()).value());
  }
  if (!counted) return;
  ServeReads();
  MaybeProposeBatches();
}

void Replica::SendAccept(uint32_t peer, uint64_t slot) {
  Message m = NewMessage(peer);
  LogEntry* e = m.mutable_accept()->add_entries();
  e->set_slot(slot);
  *e->mutable_value() = log_.at(slot).value();
  // An accept acknowledges nothing: it may leave before the leader's own write is durable.
  SendEarly(std::move(m));
}

void Replica::SendEarly(Message m) {
  SYNOD_CHECK(IsPeer(m.to()) && m.to() != config_.id);
  // Not before the ballot it carries is durable, though (a leader elected at once, with no
  // peer's promise needed, has not synced its round yet: a crash could reuse the round; a
  // follower's promise in this Ready is not durable yet).
  if (hard_state_sync_pending_ || hard_state_sync_in_flight_) {
    Send(std::move(m));
    return;
  }
  pending_.early_messages.push_back(std::move(m));
}

std::vector<Message> Replica::TakeEarlyMessages() {
  std::vector<Message> early = std::move(pending_.early_messages);
  pending_.early_messages.clear();
  return early;
}

void Replica::MaybeProposeBatches() {
  while (CanPropose()) {
    Value batch;
    size_t bytes = 0;
    while (!queue_.empty() &&
           static_cast<size_t>(batch.requests_size()) < config_.max_batch_requests) {
      ClientRequest& r = queue_.front().request;
      if (IsRead(r)) {
        ClientRequest read = std::move(r);
        queue_.pop_front();
        HandleReadBarrier(std::move(read));
        continue;
      }
      size_t size = r.ByteSizeLong();
      if (batch.requests_size() > 0 && bytes + size > config_.max_batch_bytes) break;
      bytes += size;
      *batch.add_requests() = std::move(r);
      queue_.pop_front();
    }
    if (batch.requests_size() == 0) continue;
    ProposeSlot(next_slot_++, std::move(batch));
  }
}

void Replica::StepAccepted(const Message& m) {
  if (role_ != Role::kLeader || !BallotEqual(m.ballot(), ballot_)) return;
  for (uint64_t slot : m.accepted().slots()) {
    uint64_t& match = match_index_[m.from()];
    match = std::max(match, slot);
    auto it = inflight_.find(slot);
    if (it == inflight_.end()) continue;
    it->second.votes.Add(m.from());
    if (it->second.votes.HasQuorum()) LearnChosen(slot, log_.at(slot).value());
  }
  ServeReads();
  MaybeProposeBatches();
}

void Replica::BroadcastHeartbeat() {
  SYNOD_CHECK(role_ == Role::kLeader);
  // Every heartbeat, a commit announcement included, is a new round: its acknowledgements
  // confirm leadership for reads, renew the lease and show a majority is reachable. (An
  // announcement that reused the last round would postpone the periodic heartbeat without
  // confirming anything, and a busy leader would end up stepping down.)
  heartbeat_elapsed_ticks_ = 0;
  commit_announce_ = false;
  read_round_wanted_ = false;
  ++read_context_;
  read_context_sent_tick_[read_context_] = now_ticks_;
  for (uint32_t peer : config_.replica_ids) {
    if (peer == config_.id) continue;
    Message m = NewMessage(peer);
    m.mutable_heartbeat()->set_read_context(read_context_);
    m.mutable_heartbeat()->set_ballot_floor(read_floor_);
    // It acknowledges nothing, and the commit index it carries is of values a majority
    // holds durably: it need not wait for this leader's fsync. (A lease counts from the tick
    // the round began, no later than any follower's grant.)
    SendEarly(std::move(m));
  }
  if (config_.replica_ids.size() == 1) {
    quorum_acked_context_ = read_context_;
    lease_expires_tick_ =
        now_ticks_ + config_.lease_duration_ticks - config_.clock_drift_bound_ticks;
    last_quorum_contact_tick_ = now_ticks_;
    ServeReads();
  }
}

void Replica::StepHeartbeatAck(const Message& m) {
  if (role_ != Role::kLeader || !BallotEqual(m.ballot(), ballot_)) return;
  uint64_t& acked = acked_context_[m.from()];
  acked = std::max(acked, m.heartbeat_ack().read_context());
  std::vector<uint64_t> contexts;
  for (uint32_t peer : config_.replica_ids) {
    contexts.push_back(peer == config_.id ? read_context_ : acked_context_[peer]);
  }
#ifdef SYNOD_TESTING_BUGS
  // The lowest acknowledgement left out: a "majority" of one replica fewer (VotingGroupSize).
  if (config_.bugs.majority_off_by_one && contexts.size() > 1) {
    contexts.erase(std::min_element(contexts.begin(), contexts.end()));
  }
#endif
  uint64_t quorum_context = QuorumMin(std::move(contexts));
  if (quorum_context <= quorum_acked_context_) return;
  quorum_acked_context_ = quorum_context;
  last_quorum_contact_tick_ = now_ticks_;
  auto sent = read_context_sent_tick_.find(quorum_context);
  if (sent != read_context_sent_tick_.end()) {
    // Each acknowledging follower started its lease when the heartbeat arrived, which was
    // no earlier than it was sent.
    int64_t expires = sent->second + config_.lease_duration_ticks - config_.clock_drift_bound_ticks;
#ifdef SYNOD_TESTING_BUGS
    if (config_.bugs.lease_ignores_drift) expires = now_ticks_ + config_.lease_duration_ticks;
#endif
    lease_expires_tick_ = std::max(lease_expires_tick_, expires);
  }
  read_context_sent_tick_.erase(read_context_sent_tick_.begin(),
                                read_context_sent_tick_.upper_bound(quorum_context));
  ServeReads();
}

bool Replica::ReadSafe() const { return role_ == Role::kLeader && commit_index_ >= read_floor_; }

bool Replica::LeaseValid() const {
  return role_ == Role::kLeader && now_ticks_ < lease_expires_tick_;
}

void Replica::HandleReadBarrier(ClientRequest request) {
  SYNOD_CHECK(role_ == Role::kLeader);
  Consistency level = request.command().read_barrier().consistency();
  if (level == LEASE) {
    if (ReadSafe() && LeaseValid()) return Reply(request, OK, "", commit_index_);
    return Reply(request, UNAVAILABLE, "the leader does not hold a valid lease", 0);
  }
  if (waiting_reads_.size() + reads_by_context_.size() >= config_.max_pending_reads) {
    return Reply(request, RESOURCE_EXHAUSTED, "too many reads waiting", 0);
  }
  waiting_reads_.push_back({std::move(request), 0, now_ticks_});
  ServeReads();
}

void Replica::ServeReads() {
  if (role_ != Role::kLeader) return;
  if (ReadSafe() && !waiting_reads_.empty()) {
    // The read index is taken now; the read is valid once a quorum confirms, in a
    // heartbeat round started after this point, that this replica is still the leader. (The
    // round under way may have been acknowledged before the read arrived, by followers that
    // have promised a new leader since.)
    uint64_t confirming_round = read_context_ + 1;
#ifdef SYNOD_TESTING_BUGS
    if (config_.bugs.read_confirmed_by_old_round) confirming_round = read_context_;
#endif
    for (PendingRead& r : waiting_reads_) {
      r.read_index = commit_index_;
      reads_by_context_.emplace(confirming_round, std::move(r));
    }
    waiting_reads_.clear();
    read_round_wanted_ = true;
    if (config_.replica_ids.size() == 1) BroadcastHeartbeat();
  }
  auto end = reads_by_context_.upper_bound(quorum_acked_context_);
  for (auto it = reads_by_context_.begin(); it != end; ++it) {
    Reply(it->second.request, OK, "", it->second.read_index);
  }
  reads_by_context_.erase(reads_by_context_.begin(), end);
}

// Client requests -----------------------------------------------------------------------

void Replica::Propose(ClientRequest request) {
  ReceiveClientRequest(std::move(request));
  CheckInvariants();
}

void Replica::ReceiveClientRequest(ClientRequest request) {
  if (request.origin_replica() == 0) request.set_origin_replica(config_.id);
  if (IsRead(request)) {
    Consistency level = request.command().read_barrier().consistency();
    if (level == LOCAL) return Reply(request, OK, "", applied_index_);
    if (level != LINEARIZABLE && level != LEASE) {
      return Reply(request, INVALID_ARGUMENT, "unknown read consistency", 0);
    }
    if (role_ == Role::kLeader) return HandleReadBarrier(std::move(request));
  }
  QueueRequest(std::move(request));
}

void Replica::QueueRequest(ClientRequest request) {
  if (queue_.size() >= config_.max_pending_requests) {
    return Reply(request, RESOURCE_EXHAUSTED, "too many requests queued", 0);
  }
  queue_.push_back({std::move(request), now_ticks_});
  // A leader proposes what is queued at GetReady: the requests that arrive while its host
  // is busy (persisting the previous Ready) share one slot, and are applied together.
  if (role_ == Role::kFollower && leader_id_ != 0) {
    ForwardQueued();
  }
}

void Replica::ForwardQueued() {
  SYNOD_CHECK(role_ == Role::kFollower && leader_id_ != 0 && leader_id_ != config_.id);
  while (!queue_.empty()) {
    Message m = NewMessage(leader_id_);
    ForwardRequest* fwd = m.mutable_forward_request();
    size_t bytes = 0;
    while (!queue_.empty()) {
      ClientRequest& r = queue_.front().request;
      size_t size = r.ByteSizeLong();
      if (fwd->requests_size() > 0 && bytes + size > config_.max_batch_bytes) break;
      bytes += size;
      if (r.origin_replica() == config_.id) {
        ForwardedRequests& forwarded = IsRead(r) ? forwarded_reads_ : forwarded_writes_;
        if (forwarded.size() < config_.max_pending_requests) {
          forwarded[{r.client_id(), r.sequence()}] = {r, queue_.front().arrived_tick,
                                                      hard_.promised()};
        }
      }
      *fwd->add_requests() = std::move(r);
      queue_.pop_front();
    }
    Send(std::move(m));
  }
}

void Replica::StepForwardRequest(const Message& m) {
  for (const ClientRequest& r : m.forward_request().requests()) {
    if (role_ == Role::kLeader && IsRead(r)) {
      HandleReadBarrier(r);
    } else if (role_ == Role::kFollower && leader_id_ == m.from()) {
      Reply(r, UNAVAILABLE, "not the leader", 0);  // each takes the other for the leader
    } else {
      QueueRequest(r);
    }
  }
}

void Replica::StepForwardReply(const Message& m) {
  const ForwardReply& reply = m.forward_reply();
  // A read answered already (refused on timeout, or a duplicate) is not answered twice.
  if (reply.read_barrier() && forwarded_reads_.erase({reply.client_id(), reply.sequence()}) == 0) {
    return;
  }
  if (!reply.read_barrier()) {
    // A refusal from a leader the write is no longer with (it was sent on to the next one,
    // which may get it chosen) is stale: the client must not hear it.
    auto it = forwarded_writes_.find({reply.client_id(), reply.sequence()});
    if (it != forwarded_writes_.end()) {
      if (!BallotEqual(it->second.ballot, m.ballot())) return;
      forwarded_writes_.erase(it);
    }
  }
  pending_.replies.push_back(reply);
}

// ---------------------------------------------------------------------------------------
// Ready / Advance.

bool Replica::HasReady() const {
  return !pending_.empty() || handed_out_index_ < commit_index_ ||
         (role_ == Role::kLeader && (commit_announce_ || read_round_wanted_ || CanPropose()));
}

bool Replica::CanPropose() const {
  // max_inflight_slots counts slots not yet chosen only: while one stalls, later ones are
  // chosen and the pipeline runs on. Followers drop accepts beyond their commit index plus
  // max_slots_beyond_commit, so the leader proposes no further than that from its own.
  // (A leader's next slot lies above its commit index, checked in CheckInvariants.)
  return role_ == Role::kLeader && !queue_.empty() &&
         inflight_.size() < config_.max_inflight_slots &&
         next_slot_ - commit_index_ <= config_.max_slots_beyond_commit;
}

Ready Replica::GetReady() {
  SYNOD_CHECK(!awaiting_advance_) << "GetReady before the previous Ready was advanced";
  MaybeProposeBatches();
  if (role_ == Role::kLeader && (commit_announce_ || read_round_wanted_)) {
    BroadcastHeartbeat();
  }
  uint64_t until = std::min<uint64_t>(commit_index_, handed_out_index_ + config_.max_apply_entries);
  for (uint64_t slot = handed_out_index_ + 1; slot <= until; ++slot) {
    const LogEntry& e = log_.at(slot);
    SYNOD_CHECK(e.chosen());
    if (!forwarded_writes_.empty()) {
      for (const ClientRequest& r : e.value().requests()) {
        if (r.origin_replica() == config_.id) {
          forwarded_writes_.erase({r.client_id(), r.sequence()});
        }
      }
    }
    pending_.committed.push_back({slot, e.value()});
  }
  handed_out_index_ = std::max(handed_out_index_, until);
  // After a restart every applied slot counts as chosen, and must be servable to peers.
  if (!pending_.committed.empty() && unsynced_chosen_) pending_.must_sync = true;
  if (pending_.must_sync) unsynced_chosen_ = false;
  hard_state_sync_in_flight_ = hard_state_sync_pending_;
  hard_state_sync_pending_ = false;
  Ready ready = std::move(pending_);
  pending_ = Ready();
  awaiting_advance_ = true;
  CheckInvariants();
  return ready;
}

void Replica::Advance(const Ready& ready) {
  SYNOD_CHECK(awaiting_advance_);
  awaiting_advance_ = false;
  hard_state_sync_in_flight_ = false;
  if (ready.snapshot) applied_index_ = std::max(applied_index_, ready.snapshot->meta.index());
  if (!ready.committed.empty()) {
    SYNOD_CHECK_EQ(ready.committed.front().slot, applied_index_ + 1);
    applied_index_ = ready.committed.back().slot;
  }
  CountOwnVotes(ready);
  CheckInvariants();
}

void Replica::Compact(const SnapshotMeta& meta) {
  const uint64_t index = meta.index();
  SYNOD_CHECK_LE(index, applied_index_) << "snapshot of state not yet applied";
  SYNOD_CHECK(meta.checksum() != 0 && meta.size_bytes() > 0) << "a snapshot without an image";
  if (index <= snapshot_meta_.index()) return;
  log_.erase(log_.begin(), log_.upper_bound(index));
  first_index_ = index + 1;
  snapshot_meta_ = meta;
  pending_.compacted_through = index;
  CheckInvariants();
}

// ---------------------------------------------------------------------------------------
// Introspection.

ReplicaStatus Replica::Status() const {
  ReplicaStatus s;
  s.role = role_;
  s.leader_id = leader_id_;
  s.ballot = hard_.promised();
  s.commit_index = commit_index_;
  s.applied_index = applied_index_;
  s.first_log_index = first_index_;
  s.snapshot_index = snapshot_meta_.index();
  s.lease_valid = LeaseValid();
  for (uint32_t peer : config_.replica_ids) {
    if (peer == config_.id) continue;
    auto it = last_heard_tick_.find(peer);
    s.peer_last_heard_ticks[peer] = it == last_heard_tick_.end() ? -1 : now_ticks_ - it->second;
    if (role_ == Role::kLeader) {
      auto m = match_index_.find(peer);
      s.peer_match_index[peer] = m == match_index_.end() ? 0 : m->second;
    }
  }
  s.pending_requests = queue_.size();
  s.inflight_slots = inflight_.size();
  s.rejected_message_count = rejected_message_count_;
  s.last_rejection = last_rejection_;
  s.elections_started = elections_started_;
  s.pre_votes_started = pre_votes_started_;
  return s;
}

const Value* Replica::ChosenValue(uint64_t slot) const {
  auto it = log_.find(slot);
  if (it == log_.end() || !it->second.chosen()) return nullptr;
  return &it->second.value();
}

}  // namespace synod

#include "sim/world.h"

#include "sim/world_internal.h"

namespace synod::sim::internal {

int DriftBoundTicks(int lease_duration_ticks, int64_t max_drift_ppm) {
  return 1 + static_cast<int>((lease_duration_ticks * 2 * max_drift_ppm + 999'999) / 1'000'000);
}

Swarm DrawSwarm(Prng& p, int clients_option) {
  Swarm s;
  s.drop_per_10k = p.Chance(1, 4) ? 0 : p.Range(0, 800);
  s.duplicate_per_10k = p.Chance(1, 2) ? 0 : p.Range(0, 500);
  s.tail_delay_per_10k = p.Range(0, 300);
  s.partition_every_us = p.Chance(1, 5) ? 0 : p.Range(5, 100) * 100'000;
  s.crash_every_us = p.Chance(1, 5) ? 0 : p.Range(5, 100) * 100'000;
  s.restart_per_100 = static_cast<uint64_t>(p.Range(5, 60));
  s.pause_every_us = p.Chance(1, 3) ? 0 : p.Range(10, 200) * 100'000;
  s.torn_write_per_100 = p.Range(0, 100);
  s.corruption_per_100 = p.Chance(1, 2) ? 0 : p.Range(0, 30);
  // Usually good clocks (up to 2% off); now and then bad ones (up to 25%), which the
  // configured drift bound must then cover.
  s.max_drift_ppm = p.Chance(1, 3) ? p.Range(20'000, 250'000) : p.Range(0, 20'000);
  s.compact_every = static_cast<uint64_t>(p.Range(10, 60));
  s.lease_duration_ticks = static_cast<int>(p.Range(5, ReplicaConfig().election_timeout_ticks - 1));
  s.clients = clients_option > 0 ? clients_option : static_cast<int>(p.Range(1, 10));
  s.crash_after_send_per_10k = p.Chance(1, 2) ? 0 : p.Range(1, 30);
  // The leader's lease (the lease minus the drift bound) must outlast the heartbeat interval
  // (ReplicaConfig): with bad clocks, heartbeats come every tick, and the lease grows if
  // that is not enough.
  s.heartbeat_interval_ticks = ReplicaConfig().heartbeat_interval_ticks;
  for (;;) {
    s.clock_drift_bound_ticks = DriftBoundTicks(s.lease_duration_ticks, s.max_drift_ppm);
    if (s.heartbeat_interval_ticks < s.lease_duration_ticks - s.clock_drift_bound_ticks) break;
    if (s.heartbeat_interval_ticks > 1) {
      --s.heartbeat_interval_ticks;
    } else {
      ++s.lease_duration_ticks;
    }
  }
  SYNOD_CHECK_LT(s.lease_duration_ticks, ReplicaConfig().election_timeout_ticks);
  return s;
}

World::World(const SimOptions& options)
    : options_(options),
      root_(options.seed),
      net_(root_.Next()),
      disk_(root_.Next()),
      clock_(root_.Next()),
      process_(root_.Next()),
      workload_(root_.Next()),
      hostile_(0),
      send_crash_(0),
      check_delay_(options.seed ^ 0x5eedc4ecdd5eedull),
      fsync_(0),
      media_(0),
      chosen_(static_cast<size_t>(options.replicas)) {
  SYNOD_CHECK(options_.replicas >= 1 && options_.replicas <= 7) << options_.replicas;
  Prng swarm_prng(root_.Next());
  swarm_ = DrawSwarm(swarm_prng, options.clients);
  hostile_ = Prng(root_.Next());
  send_crash_ = Prng(root_.Next());
  fsync_ = Prng(root_.Next());
  media_ = Prng(root_.Next());
  // Fast disks on some seeds, slow ones (a busy disk) on others.
  max_fsync_us_ = fsync_.Chance(1, 3) ? fsync_.Range(2'000, 20'000) : fsync_.Range(100, 2'000);
  // Many readers: at least five clients, unless the option names a number.
  if (options_.workload == Workload::kReads && options_.clients == 0) {
    swarm_.clients = std::max(swarm_.clients, 5);
  }
  hosts_.resize(options_.replicas);
  for (int i = 0; i < options_.replicas; ++i) {
    Host& h = hosts_[i];
    h.id = static_cast<uint32_t>(i + 1);
    h.opener = std::make_unique<InMemoryDatabaseOpener>();
    int64_t drift = clock_.Range(-swarm_.max_drift_ppm, swarm_.max_drift_ppm);
    h.tick_period_us = kTickUs + kTickUs * drift / 1'000'000;
  }
  clients_.resize(swarm_.clients);
  for (size_t i = 0; i < clients_.size(); ++i) {
    Client& c = clients_[i];
    c.id = 100 + i;
    if (options_.workload != Workload::kReads) continue;
    // Writes through one replica, reads through another (when there is another).
    const int n = options_.replicas;
    c.write_replica = static_cast<uint32_t>(workload_.Range(1, n));
    c.read_replica =
        n == 1 ? c.write_replica
               : static_cast<uint32_t>((c.write_replica + workload_.Range(0, n - 2)) % n + 1);
  }
  Trace(absl::StrCat(
      "world seed=", options_.seed, " replicas=", options_.replicas, " clients=", swarm_.clients,
      " drop/10k=", swarm_.drop_per_10k, " dup/10k=", swarm_.duplicate_per_10k,
      " partition_every_us=", swarm_.partition_every_us, " crash_every_us=", swarm_.crash_every_us,
      " max_drift_ppm=", swarm_.max_drift_ppm,
      options_.workload == Workload::kReads ? " workload=reads" : "",
      options_.leases ? "" : " leases=off"));
}

void World::TraceMessage(const Message& m) {
  // Only with --trace, and not part of the trace hash, which stays the same either way.
  std::string body = m.GetDescriptor()->FindFieldByNumber(m.body_case()) != nullptr
                         ? m.GetDescriptor()->FindFieldByNumber(m.body_case())->name()
                         : "empty";
  *options_.trace << now_us_ << "us   " << m.from() << "->" << m.to() << " " << body << " ballot=("
                  << m.ballot().round() << "," << m.ballot().replica_id()
                  << ") commit=" << m.commit_index() << "\n";
}

void World::Trace(const std::string& line) {
  trace_hash_.AddField(line);
  if (options_.trace != nullptr) *options_.trace << now_us_ << "us " << line << "\n";
}

void World::Fail(const std::string& what) {
  if (failure_) return;
  failure_ = absl::StrCat("at ", now_us_, "us: ", what);
  Trace("FAIL " + what);
}

void World::Schedule(int64_t at_us, EventKind kind, uint32_t target, Message m,
                     uint64_t client_sequence, uint64_t op_sequence) {
  events_.push(
      Event{at_us, next_seq_++, kind, target, std::move(m), client_sequence, op_sequence, nullptr});
}

ReplicaConfig World::ConfigFor(uint32_t id) const {
  ReplicaConfig c;
  c.id = id;
  for (const Host& h : hosts_) c.replica_ids.push_back(h.id);
  // Small limits, so batching, pipelining, catch-up and snapshots happen in every run.
  c.max_inflight_slots = 4;
  c.max_batch_requests = 4;
  c.max_catchup_entries = 8;
  c.snapshot_chunk_bytes = 4096;
  c.lease_duration_ticks = swarm_.lease_duration_ticks;
  c.clock_drift_bound_ticks = swarm_.clock_drift_bound_ticks;
  c.heartbeat_interval_ticks = swarm_.heartbeat_interval_ticks;
#ifdef SYNOD_TESTING_BUGS
  c.bugs.skip_repropose = options_.bugs.count("skip-repropose") > 0;
  c.bugs.lease_ignores_drift = options_.bugs.count("lease-ignores-drift") > 0;
  c.bugs.promise_before_durable = options_.bugs.count("promise-before-durable") > 0;
  c.bugs.majority_off_by_one = options_.bugs.count("majority-off-by-one") > 0;
  c.bugs.read_confirmed_by_old_round = options_.bugs.count("read-confirmed-by-old-round") > 0;
  c.testing_no_pre_vote = !options_.pre_vote || options_.bugs.count("no-pre-vote") > 0;
  c.testing_no_acceptor_lease = !options_.leases;
#endif
  return c;
}

// ---------------------------------------------------------------------------------------
// Processes.

void World::StartHost(Host& h) {
  SYNOD_CHECK(!h.up && !h.refused);
  absl::StatusOr<RecoveredLog> recovered = h.disk.Recover();
  if (!recovered.ok()) {
    // The replica cannot know what it promised or accepted in the lost records, so it must
    // not vote again: it refuses to start (docs/simulation.md, "Storage faults").
    h.refused = true;
    Trace(absl::StrCat("replica ", h.id, " refuses to start: ", recovered.status().ToString()));
    return;
  }
  if (std::optional<std::string> forgotten =
          CheckRecoveryKeepsDurableState(h.id, recovered->state, h.disk.durable_state())) {
    Fail(*forgotten);
    h.refused = true;  // the run has failed; starting on a forgetful log proves nothing more
    return;
  }
  h.disk.Reopen(*recovered);
  PersistedState state = std::move(recovered->state);
  StateMachineOptions sm_options;
  sm_options.testing_no_session_dedup = options_.bugs.count("no-session-dedup") > 0;
  absl::StatusOr<std::unique_ptr<StateMachine>> sm = StateMachine::Open(h.opener.get(), sm_options);
  SYNOD_CHECK(sm.ok()) << sm.status();
  h.sm = std::move(*sm);
  h.divergence = std::make_unique<DivergenceCheck>(h.id, static_cast<size_t>(options_.replicas),
                                                   kCheckpointEveryRevisions);
  // A crash between persisting a received snapshot and installing it: install it now.
  if (h.sm->revision() < state.snapshot_meta.index()) {
    const std::string* image = h.snapshots.Find(state.snapshot_meta);
    SYNOD_CHECK(image != nullptr) << "the log names a snapshot image the store lacks";
    CheckInstalledImage(h.id, state.snapshot_meta, *image);
    absl::Status restored = h.sm->RestoreSnapshot(*image);
    SYNOD_CHECK(restored.ok()) << restored;
  }
  if (options_.bugs.count("forget-promise") > 0) {
    // Forgets what it promised, and with it what it accepted and has not seen chosen (what
    // it applied it keeps: that is chosen, whether or not its mark was synced).
    state.hard_state.clear_promised();
    std::vector<LogEntry> kept;
    for (LogEntry& e : state.entries) {
      if (e.chosen() || e.slot() <= h.sm->revision()) kept.push_back(std::move(e));
    }
    state.entries = std::move(kept);
    h.disk.Rewrite(state);
  }
  state.applied_index = h.sm->revision();
  h.side = std::make_unique<HostSide>(this, &h);
  HostSide* side = h.side.get();
  h.driver = std::make_unique<HostDriver>(
      std::make_unique<Replica>(ConfigFor(h.id), std::move(state), process_.Next()), side,
      &h.snapshots, side, side, side);
  h.disk_ops.clear();
  h.disk_busy_until_us = now_us_;
  h.up = true;
  h.paused = false;
  Trace(absl::StrCat("replica ", h.id, " starts at revision ", h.sm->revision()));
  // A new process has its own timer: ticks scheduled for an earlier incarnation (one that
  // crashed and restarted within a tick) must not drive this one too.
  ++h.incarnation;
  Schedule(now_us_ + h.tick_period_us, EventKind::kTick, h.id, Message(), h.incarnation);
}

void World::CrashHost(Host& h) {
  if (!h.up) return;
  h.up = false;
  h.paused = false;
  h.driver.reset();
  h.disk_ops.clear();
  h.check_done = nullptr;
  h.sm.reset();
  h.snapshots.Crash();
  bool tear = disk_.Chance(swarm_.torn_write_per_100, 100);
  h.disk.Crash(disk_, tear);
  // Corrupt at most a minority, so the group can always go on.
  int max_corrupt = (options_.replicas - 1) / 2;
  if (corrupted_hosts_ < max_corrupt && disk_.Chance(swarm_.corruption_per_100, 100)) {
    h.disk.Corrupt(disk_);
    ++corrupted_hosts_;
    Trace(absl::StrCat("replica ", h.id, " disk corrupted"));
  }
  // Clients waiting at this replica hear nothing; they time out and retry elsewhere.
  h.pending_writes.clear();
  h.pending_reads.clear();
  h.reads_waiting_apply.clear();
  // Its uploads under way die with it (their clients see no answer); stored blobs stay.
  h.pins.clear();
  h.fetch_tries.clear();
  for (auto it = uploads_.begin(); it != uploads_.end();) {
    it = it->second.origin == h.id ? uploads_.erase(it) : std::next(it);
  }
  Trace(absl::StrCat("replica ", h.id, " crashes", tear ? " (torn write)" : ""));
}

void World::SendMessage(const Message& m) {
  if (blocked_.count({m.from(), m.to()}) > 0) return;
  if (faults_on_ && net_.Chance(swarm_.drop_per_10k, 10'000)) return;
  int copies = faults_on_ && net_.Chance(swarm_.duplicate_per_10k, 10'000) ? 2 : 1;
  for (int i = 0; i < copies; ++i) {
    int64_t delay = net_.Range(200, 3'000);
    // A heavy tail: now and then a message is held up for up to a second.
    if (faults_on_ && net_.Chance(swarm_.tail_delay_per_10k, 10'000)) delay *= net_.Range(5, 300);
    Schedule(now_us_ + delay, EventKind::kDeliver, m.to(), m);
  }
}

// The host's side of the driver (core/driver.h): the simulated disk, network, state machine
// and clients, with the checkers watching each.
class World::HostSide : public LogStorage,
                        public PeerTransport,
                        public AppliedState,
                        public ClientAnswers {
 public:
  HostSide(World* world, Host* host) : w_(world), h_(host) {}

  void Persist(const Ready& ready, PersistOptions options, std::function<void()> done) override {
    w_->StartDiskOp(*h_, ready, options, std::move(done));
  }

  // A promise or an acknowledgement must be durable by now.
  void Send(std::vector<Message> messages) override {
    bool acceptor_spoke = false;
    for (const Message& m : messages) {
      if (std::optional<std::string> uncovered =
              CheckDurableBeforeSend(m, h_->disk.durable_state(), w_->chosen_)) {
        w_->Fail(*uncovered);
      }
      acceptor_spoke |= m.has_promise() || m.has_accepted();
      w_->acceptors_.Sent(m);
      w_->SendMessage(m);
    }
    // A crash right after an acceptor spoke, before anything else reaches the disk: what it
    // promised or accepted must survive it. (The crash comes as the very next event: the
    // driver is in the middle of this Ready.)
    if (acceptor_spoke && w_->MayCrash() &&
        w_->send_crash_.Chance(w_->swarm_.crash_after_send_per_10k, 10'000)) {
      w_->Trace(absl::StrCat("replica ", h_->id, " crashes right after sending"));
      w_->Schedule(w_->now_us_, EventKind::kCrash, h_->id, Message(), h_->incarnation);
    }
  }

  // The verdict comes after a delay, as a server's does from its worker thread: meanwhile
  // the replica steps messages, and the host may crash or pause.
  void CheckSnapshot(const SnapshotToInstall& snapshot,
                     std::function<void(absl::Status)> done) override {
    const std::string* image = h_->snapshots.Find(snapshot.meta);
    SYNOD_CHECK(image != nullptr) << "a sealed snapshot is not in the store";
    SYNOD_CHECK(h_->check_done == nullptr) << "two snapshot checks at once";
    h_->check_verdict = StateMachine::CheckSnapshot(*image, snapshot.meta.index());
    h_->check_done = std::move(done);
    // Mostly quick; one check in ten lasts up to several election timeouts, as a large
    // image's does.
    const int64_t delay_us = w_->check_delay_.Chance(1, 10)
                                 ? w_->check_delay_.Range(100'000, 2'000'000)
                                 : w_->check_delay_.Range(50, 50'000);
    w_->Schedule(w_->now_us_ + delay_us, EventKind::kCheckDone, h_->id, Message(), h_->incarnation);
  }
  // As the server does: the replica is rebuilt from what its log holds (a restart without
  // the crash). The simulator's peers send whole, correct images, and the replica checks
  // their bytes as they come, so a refusal here means the driver or the store is wrong.
  void RefuseSnapshot(const absl::Status& why) override {
    w_->Trace(absl::StrCat("replica ", h_->id, " refuses a snapshot: ", why.ToString()));
    h_->disk.Sync();
    absl::StatusOr<RecoveredLog> recovered = h_->disk.Recover();
    SYNOD_CHECK(recovered.ok()) << "a log just synced does not recover: " << recovered.status();
    recovered->state.applied_index = h_->sm->revision();
    h_->driver->ReplaceReplica(std::make_unique<Replica>(
        w_->ConfigFor(h_->id), std::move(recovered->state), w_->process_.Next()));
  }
  void InstallSnapshot(const SnapshotToInstall& snapshot) override {
    const std::string* image = h_->snapshots.Find(snapshot.meta);
    SYNOD_CHECK(image != nullptr) << "a sealed snapshot is not in the store";
    w_->CheckInstalledImage(h_->id, snapshot.meta, *image);
    absl::Status restored = h_->sm->RestoreSnapshot(*image);
    SYNOD_CHECK(restored.ok()) << restored;
    SYNOD_CHECK_EQ(h_->sm->revision(), snapshot.meta.index());
    w_->Trace(absl::StrCat("replica ", h_->id, " installs snapshot at ", h_->sm->revision()));
    w_->state_hashes_.Observe(h_->id, h_->sm->revision(),
                              h_->sm->StateHash(StateMachine::HashMode::kKept), &w_->failure_);
  }
  void Apply(CommittedEntry entry) override { w_->ApplyCommitted(*h_, entry); }

  void Answer(const ForwardReply& reply) override {
    auto key = std::make_pair(reply.client_id(), reply.sequence());
    if (reply.read_barrier()) {
      auto it = h_->pending_reads.find(key);
      if (it == h_->pending_reads.end()) return;
      uint64_t client_index = it->second;
      h_->pending_reads.erase(it);
      if (reply.code() != OK) {
        w_->ClientDone(client_index, reply.sequence(), false, nullptr, nullptr, 0);
      } else {
        h_->reads_waiting_apply.push_back({client_index, reply.sequence(), reply.read_revision()});
      }
    } else {
      auto it = h_->pending_writes.find(key);
      if (it == h_->pending_writes.end()) return;
      uint64_t client_index = it->second;
      h_->pending_writes.erase(it);
      w_->ClientDone(client_index, reply.sequence(), false, nullptr, nullptr, 0);
    }
  }
  // Reads wait until the state machine has applied the revision they are valid at.
  void Advanced() override {
    std::vector<PendingRead> waiting;
    for (const PendingRead& r : h_->reads_waiting_apply) {
      if (h_->sm->revision() >= r.revision) {
        w_->ServeRead(*h_, r.client_index, r.sequence);
      } else {
        waiting.push_back(r);
      }
    }
    h_->reads_waiting_apply = std::move(waiting);
    w_->MaybeCompact(*h_);
  }

 private:
  World* const w_;
  Host* const h_;
};

void World::DrainHost(Host& h) {
  if (h.up && !h.paused) h.driver->Drain();
}

void World::StartDiskOp(Host& h, const Ready& ready, PersistOptions options,
                        std::function<void()> done) {
  // The write reaches the disk's cache at once (a crash loses it, or tears it); it is
  // durable only when the operation finishes, after a delay, in order with the others.
  h.disk.Write(ready);
  if (!options.sync && !options.compact) {
    done();  // nothing to wait for: the records become durable with the next sync
    return;
  }
  DiskOp op;
  op.sync = options.sync;
  op.compact = options.compact;
  op.compacted_through = ready.compacted_through;
  op.hard_state = ready.hard_state;
  op.entries = ready.entries;
  op.done = std::move(done);
  h.disk_busy_until_us = std::max(h.disk_busy_until_us, now_us_) + fsync_.Range(20, max_fsync_us_);
  h.disk_ops.push_back(std::move(op));
  Schedule(h.disk_busy_until_us, EventKind::kDiskDone, h.id, Message(), h.incarnation);
}

void World::OnDiskDone(Host& h, uint64_t incarnation) {
  if (!h.up || incarnation != h.incarnation || h.disk_ops.empty()) return;
  if (h.paused) {
    // The process's writer is stopped too: the operation finishes after it resumes.
    Schedule(now_us_ + h.tick_period_us, EventKind::kDiskDone, h.id, Message(), h.incarnation);
    return;
  }
  DiskOp op = std::move(h.disk_ops.front());
  h.disk_ops.pop_front();
  if (options_.trace != nullptr) {
    std::string what;
    if (op.hard_state) {
      absl::StrAppend(&what, " promise (", op.hard_state->promised().round(), ",",
                      op.hard_state->promised().replica_id(), ")");
    }
    for (const LogEntry& e : op.entries) {
      absl::StrAppend(&what, " slot ", e.slot(), e.chosen() ? " chosen" : "", " at (",
                      e.ballot().round(), ",", e.ballot().replica_id(), ")");
    }
    Trace(absl::StrCat("replica ", h.id, " made durable:", what, op.compact ? " compaction" : ""));
  }
  if (op.sync) {
    h.disk.Sync();
    // One Ready gathers what the replica did while the previous one was being written: an
    // acceptance and then a higher promise (a leader that proposed, then heard of a higher
    // ballot), or promises to several ballots, the highest last. Its acceptances and the
    // promises it sends are judged against the promise made durable before it; its own
    // promise counts from when it is sent (done() sends).
    for (const LogEntry& e : op.entries) {
      chosen_.Accepted(h.id, e);
      acceptors_.Accepted(h.id, e);
    }
  }
  if (op.compact) {
    h.disk.Compact(op.compacted_through);
    Trace(absl::StrCat("replica ", h.id, " compacted its log through ", op.compacted_through, ": ",
                       h.disk.segments(), " segments left"));
  }
  op.done();
  if (op.sync && op.hard_state) acceptors_.Persisted(h.id, *op.hard_state);
}

void World::ApplyCommitted(Host& h, const CommittedEntry& c) {
  chosen_.Committed(h.id, c.slot, c.value);
  std::vector<AppliedRequest> applied = h.sm->Apply(c.slot, c.value);
  if (c.slot % kStateHashEveryRevisions == 0) {
    state_hashes_.Observe(h.id, c.slot, h.sm->StateHash(StateMachine::HashMode::kKept), &failure_);
  }
  // The production divergence check runs too: with the same log, no replica may ever find
  // itself outvoted.
  for (const ClientRequest& request : c.value.requests()) {
    if (request.command().has_checkpoint()) h.divergence->OnVote(request.command().checkpoint());
  }
  if (h.divergence->WantsHashAt(c.slot)) {
    ClientRequest vote;
    vote.set_origin_replica(h.id);
    *vote.mutable_command() = h.divergence->VoteFor(c.slot, h.sm->StateHash());
    h.replica().Propose(std::move(vote));
  }
  if (h.divergence->diverged() && !failure_) {
    Fail(absl::StrCat("divergence check: replica ", h.id, " was outvoted at revision ",
                      h.divergence->diverged()->revision));
  }
  if (options_.media) MediaApplied(h, c, applied);
  for (const AppliedRequest& a : applied) {
    if (a.origin_replica != h.id) continue;
    auto it = h.pending_writes.find({a.client_id, a.sequence});
    if (it == h.pending_writes.end()) continue;
    uint64_t client_index = it->second;
    h.pending_writes.erase(it);
    ClientDone(client_index, a.sequence, a.result.code() == OK, &a.result, nullptr,
               a.result.revision());
  }
}

void World::ServeRead(Host& h, uint64_t client_index, uint64_t sequence) {
  const Client& c = clients_[client_index];
  if (!c.busy || c.sequence != sequence) return;
  absl::StatusOr<StatementResult> rows = h.sm->Query(kDatabase, StatementFor(c.op));
  if (!rows.ok()) {
    Fail(absl::StrCat("replica ", h.id, " could not serve a read: ", rows.status().ToString()));
    return;
  }
  if (c.op.consistency == LOCAL) {
    local_reads_.push_back({h.id, h.sm->revision(), c.op.key, 0});
    if (h.sm->revision() < h.last_local_read_revision) {
      Fail(absl::StrCat("local reads at replica ", h.id, " went back from revision ",
                        h.last_local_read_revision, " to ", h.sm->revision()));
    }
    h.last_local_read_revision = h.sm->revision();
  }
  ClientDone(client_index, sequence, true, nullptr, &*rows, h.sm->revision());
}

void World::MaybeCompact(Host& h) {
  if (!h.up || h.sm->revision() < h.driver->last_snapshot_index() + swarm_.compact_every ||
      !h.driver->CanCompact(h.sm->revision())) {
    return;
  }
  absl::StatusOr<std::string> snapshot = h.sm->Snapshot();
  if (!snapshot.ok()) return;  // right after a restart that found a half-applied entry
  // Durable in the store before the log names it.
  const SnapshotMeta meta = h.snapshots.Add(h.sm->revision(), *snapshot);
  images_written_.emplace(std::make_pair(meta.index(), meta.checksum()),
                          std::make_pair(*std::move(snapshot), h.id));
  SYNOD_CHECK(h.driver->Compact(meta));
}

void World::CheckInstalledImage(uint32_t id, const SnapshotMeta& meta, const std::string& image) {
  auto it = images_written_.find({meta.index(), meta.checksum()});
  if (it == images_written_.end()) {
    return Fail(absl::StrCat("replica ", id, " installs a snapshot image at ", meta.index(),
                             " that no replica wrote"));
  }
  if (it->second.first != image) {
    Fail(absl::StrCat("replica ", id, " installs a snapshot image at ", meta.index(),
                      " whose bytes differ from the image replica ", it->second.second,
                      " wrote under the same checksum"));
  }
}

void World::OnTick(Host& h, uint64_t incarnation) {
  if (!h.up || incarnation != h.incarnation) return;
  Schedule(now_us_ + h.tick_period_us, EventKind::kTick, h.id, Message(), h.incarnation);
  if (h.paused) return;
  h.replica().Tick();
  DrainHost(h);
  if (options_.media && now_us_ >= h.next_media_pass_us) MediaPass(h);
}

// ---------------------------------------------------------------------------------------
// The run.

bool World::Setup() {
  // Create the database and tables through the log, before any fault.
  for (Host& h : hosts_) StartHost(h);
  faults_on_ = false;
  ClientRequest create;
  create.set_client_id(1);
  create.set_sequence(1);
  create.mutable_command()->mutable_create_database()->set_name(kDatabase);
  ClientRequest tables;
  tables.set_client_id(2);
  tables.set_sequence(1);
  Execute* e = tables.mutable_command()->mutable_execute();
  e->set_database(kDatabase);
  e->set_transaction(true);
  e->add_statements()->set_sql("CREATE TABLE kv(key TEXT PRIMARY KEY, value INTEGER)");
  e->add_statements()->set_sql(
      "CREATE TABLE list(id INTEGER PRIMARY KEY, key TEXT, element INTEGER, noise INTEGER)");
  int64_t next_attempt_us = 0;
  for (int64_t limit = now_us_ + 60'000'000; now_us_ < limit && !events_.empty();) {
    Event ev = events_.top();
    events_.pop();
    now_us_ = ev.time_us;
    if (ev.kind == EventKind::kTick) OnTick(hosts_[ev.target - 1], ev.client_sequence);
    if (ev.kind == EventKind::kDiskDone) OnDiskDone(hosts_[ev.target - 1], ev.client_sequence);
    if (ev.kind == EventKind::kDeliver && hosts_[ev.target - 1].up) {
      hosts_[ev.target - 1].replica().Step(ev.message);
      DrainHost(hosts_[ev.target - 1]);
    }
    // Propose at the leader, again every second until done (sessions apply each once).
    for (Host& h : hosts_) {
      if (now_us_ < next_attempt_us || h.replica().role() != Role::kLeader) continue;
      next_attempt_us = now_us_ + 1'000'000;
      h.replica().Propose(h.sm->ListDatabases().empty() ? create : tables);
      DrainHost(h);
    }
    bool all_ready = true;
    for (const Host& h : hosts_)
      all_ready = all_ready && h.sm->ListDatabases().size() == 1 &&
                  h.sm->Query(kDatabase, StatementFor({})).ok();
    if (all_ready) return true;
  }
  return false;
}

SimResult World::Run() {
  SimResult result;
  if (!Setup()) {
    Fail("the cluster did not come up and create the test database within 60 s");
  }
  faults_on_ = true;
  int64_t fault_end_us = now_us_ + options_.ticks * kTickUs;
  Schedule(now_us_ + 100'000, EventKind::kFault, 0);
  if (options_.hostile) Schedule(now_us_ + kHostileEveryUs, EventKind::kHostile, 0);
  if (options_.media) Schedule(now_us_ + kMediaEveryMinUs, EventKind::kMedia, 0);
  for (size_t i = 0; i < clients_.size(); ++i) ClientStartOp(i);
  int64_t end_us = fault_end_us + kLivenessBoundUs;
  bool healed = false;
  // Liveness mode ends its faults with one of the cuts a pre-vote is for, held for several
  // election timeouts: one replica isolated, one that hears nobody (its own messages still
  // go out), or one link cut both ways while the others hear both ends (a bridge). When
  // the network heals, nothing may replace the leader the majority kept.
  const int64_t final_cut_us = fault_end_us - kFinalCutUs;
  bool final_cut_done = options_.mode != Mode::kLiveness || options_.replicas < 2;
  while (!failure_ && !events_.empty()) {
    Event ev = events_.top();
    if (!final_cut_done && ev.time_us >= final_cut_us) {
      now_us_ = final_cut_us;
      final_cut_done = true;
      final_cut_ = true;
      blocked_.clear();
      const uint32_t n = static_cast<uint32_t>(options_.replicas);
      uint32_t cut = static_cast<uint32_t>(net_.Range(1, n));
      int kind = static_cast<int>(net_.Range(0, 2));
      if (kind == 2) {
        uint32_t other = static_cast<uint32_t>((cut + net_.Range(0, n - 2)) % n + 1);  // not cut
        blocked_.insert({cut, other});
        blocked_.insert({other, cut});
      } else {
        for (uint32_t other = 1; other <= n; ++other) {
          if (other == cut) continue;
          blocked_.insert({other, cut});
          if (kind == 0) blocked_.insert({cut, other});
        }
      }
      static const char* const kKinds[] = {"is cut off from every other", "hears nobody (one way)",
                                           "loses one link (a bridge)"};
      Trace(absl::StrCat("replica ", cut, " ", kKinds[kind], " until the faults stop"));
      continue;
    }
    if (!healed && ev.time_us >= fault_end_us) {
      now_us_ = fault_end_us;
      healed = true;
      clients_issue_ = false;
      HealAll();
      continue;
    }
    if (ev.time_us > end_us) break;
    RunNextEvent();
    if (healed) {
      if (options_.pre_vote) WatchLeaderStability();
      bool idle = true;
      for (const Client& c : clients_) idle = idle && !c.busy;
      // In liveness mode the run goes on in a quiet network until a leader has led a
      // majority for kQuietUs, to see that nothing replaces it.
      bool quiet_enough = options_.mode != Mode::kLiveness || !options_.pre_vote ||
                          (stable_leader_ != 0 && now_us_ >= stable_since_us_ + kQuietUs);
      if (idle && quiet_enough) break;
    }
  }
  if (!failure_ && options_.mode == Mode::kLiveness) {
    for (const Client& c : clients_) {
      if (c.busy) {
        Fail(absl::StrCat("liveness: client ", c.id, " seq ", c.sequence,
                          " did not complete within ", kLivenessBoundUs / 1'000'000,
                          " s after the faults stopped"));
        break;
      }
    }
  }
  if (!failure_ && options_.mode == Mode::kLiveness && options_.pre_vote) {
    if (stable_leader_ == 0) {
      Fail(absl::StrCat("liveness: no leader led a majority within ", kLivenessBoundUs / 1'000'000,
                        " s after the faults stopped"));
    } else if (needless_elections_ > 0) {
      Fail(absl::StrCat("liveness: ", needless_elections_, " needless election(s); the first ",
                        first_needless_election_));
    }
  }
  result.needless_elections = needless_elections_;
  if (!failure_ && options_.media) {
    // Media settle: the network is healed and nothing new is uploaded; every pass runs
    // until what is missing is fetched and what is unreferenced has aged past the grace.
    const int64_t settle_end_us = now_us_ + kMediaSettleUs;
    while (!failure_ && !events_.empty() && events_.top().time_us <= settle_end_us) {
      RunNextEvent();
    }
    now_us_ = std::max(now_us_, settle_end_us);
    if (!failure_) MediaChecks();
  }
  if (!failure_) FinalChecks();
  result.passed = !failure_;
  result.failure = failure_.value_or("");
  result.trace_hash = trace_hash_.value();
  result.simulated_ms = now_us_ / 1000;
  result.events = events_run_;
  for (const Operation& op : history_) result.operations += !op.ambiguous;
  for (const Host& h : hosts_) {
    if (h.sm) result.revision = std::max(result.revision, h.sm->revision());
  }
  return result;
}

void World::RunNextEvent() {
  Event ev = events_.top();
  events_.pop();
  now_us_ = ev.time_us;
  ++events_run_;
  trace_hash_.AddU64(static_cast<uint64_t>(ev.time_us));
  trace_hash_.AddU64(static_cast<uint64_t>(ev.kind));
  Dispatch(ev);
  CheckLeases();
  if (acceptors_.violation()) Fail(*acceptors_.violation());
}

void World::Dispatch(const Event& ev) {
  switch (ev.kind) {
    case EventKind::kTick:
      OnTick(hosts_[ev.target - 1], ev.client_sequence);
      break;
    case EventKind::kDeliver: {
      Host& h = hosts_[ev.target - 1];
      if (!h.up || h.paused) break;
      if (faults_on_ && blocked_.count({ev.message.from(), ev.message.to()}) > 0) break;
      if (options_.trace != nullptr) TraceMessage(ev.message);
      h.replica().Step(ev.message);
      DrainHost(h);
      break;
    }
    case EventKind::kClientRequest:
      OnClientRequest(hosts_[ev.target - 1], ev.client_sequence, ev.op_sequence);
      break;
    case EventKind::kClientDeadline: {
      Client& c = clients_[ev.target];
      if (c.busy && c.sequence == ev.op_sequence) ClientWake(ev.target);
      break;
    }
    case EventKind::kClientWake: {
      Client& c = clients_[ev.target];
      if (!c.busy && c.sequence == ev.op_sequence) ClientStartOp(ev.target);
      break;
    }
    case EventKind::kFault:
      OnFault();
      break;
    case EventKind::kHostile:
      OnHostile();
      break;
    case EventKind::kDiskDone:
      OnDiskDone(hosts_[ev.target - 1], ev.client_sequence);
      break;
    case EventKind::kCrash: {
      Host& h = hosts_[ev.target - 1];
      if (h.up && h.incarnation == ev.client_sequence) CrashHost(h);
      break;
    }
    case EventKind::kMedia:
      OnMediaActor();
      break;
    case EventKind::kBlobDeliver: {
      Host& h = hosts_[ev.target - 1];
      if (!h.up || h.paused) break;
      if (faults_on_ && blocked_.count({ev.blob->from, ev.blob->to}) > 0) break;
      OnBlob(h, *ev.blob);
      break;
    }
    case EventKind::kCheckDone: {
      Host& h = hosts_[ev.target - 1];
      if (!h.up || h.incarnation != ev.client_sequence || h.check_done == nullptr) break;
      if (h.paused) {
        Schedule(now_us_ + h.tick_period_us, EventKind::kCheckDone, h.id, Message(), h.incarnation);
        break;
      }
      std::function<void(absl::Status)> done = std::move(h.check_done);
      h.check_done = nullptr;
      Trace(absl::StrCat("replica ", h.id, " checked a snapshot: ", h.check_verdict.ToString()));
      done(h.check_verdict);
      DrainHost(h);
      break;
    }
  }
}

void World::FinalChecks() {
  if (std::optional<std::string> v = chosen_.violation()) return Fail(*v);
  // Acknowledged writes survive every crash: the replicas that are up and caught up hold
  // every acknowledged append and at least every acknowledged increment.
  uint64_t top = 0;
  for (const Host& h : hosts_) {
    if (h.up) top = std::max(top, h.sm->revision());
  }
  for (Host& h : hosts_) {
    if (!h.up || h.sm->revision() != top) continue;
    std::optional<std::string> lost =
        CheckNoAcknowledgedWriteLost(history_, [&](const std::string& sql) {
          Statement s;
          s.set_sql(sql);
          return h.sm->Query(kDatabase, s);
        });
    if (lost) return Fail(absl::StrCat("replica ", h.id, ": ", *lost));
  }
  if (std::optional<std::string> bad = CheckLocalReads(history_, local_reads_)) return Fail(*bad);
  CheckResult lin = CheckLinearizable(history_, kLinearizabilityBudgetSteps);
  if (lin.verdict != CheckResult::Verdict::kLinearizable) {
    Fail(absl::StrCat("history ", VerdictName(lin.verdict), " (key ", lin.key,
                      "): ", lin.explanation));
  }
}

}  // namespace synod::sim::internal

namespace synod::sim {

using internal::World;
std::vector<std::pair<std::string, std::string>> KnownBugs() {
  return {
      {"forget-promise", "an acceptor forgets its promise (and unchosen accepts) on restart"},
      {"skip-repropose", "a new leader proposes no-ops instead of values already accepted"},
      {"lease-ignores-drift", "a lease runs from the acknowledgement, without the drift bound"},
      {"no-session-dedup", "the state machine applies a retried request again"},
      {"promise-before-durable",
       "a raised promise is not synced: the promise is sent before it is durable"},
      {"majority-off-by-one", "a quorum is (n+1)/2 replicas instead of n/2+1 (wrong for even n)"},
      {"read-confirmed-by-old-round",
       "a linearizable read is confirmed by a heartbeat round that started before it arrived"},
      {"no-pre-vote",
       "a replica whose election timer runs out raises its ballot without asking its peers"},
      {"media-gc-ignores-references",
       "(media runs) collection removes old blobs that metadata still references"},
      {"media-no-collection", "(media runs) unreferenced blobs are never removed"},
      {"media-no-fetch", "(media runs) a replica never fetches a blob it lacks"},

  };
}

SimResult RunSimulation(const SimOptions& options) {
  World world(options);
  return world.Run();
}

}  // namespace synod::sim

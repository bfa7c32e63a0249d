// Part of the simulated world (sim/world_internal.h).

#include "sim/world_internal.h"

namespace synod::sim::internal {

namespace {

// Hostile mode: the SQL hostile actions draw from. Every fragment touches only its own
// tables (h, f), never the clients' (kv, list), and ?1 scales its cost: most stay far under
// a request's work budget, a few spend it.
constexpr const char* kHostileSql[] = {
    "CREATE TABLE IF NOT EXISTS h(id INTEGER PRIMARY KEY, v)",
    "CREATE VIRTUAL TABLE IF NOT EXISTS f USING fts4(x)",
    "INSERT INTO f VALUES (printf('%.*c', ?1, 'w') || ' hello')",
    "SELECT count(*) FROM f WHERE f MATCH 'hel*'",
    "INSERT INTO h(v) SELECT randomblob(?1 * 100) FROM f WHERE f MATCH 'hello' LIMIT 3",
    "INSERT INTO h(v) VALUES (printf('%.*c', ?1 * 100, 'x'))",
    "SELECT length(printf('%.*c', ?1 * 100000000, 'x'))",
    "SELECT printf('%.*c', ?1 * 1000, 'a') LIKE '%' || printf('%.*c', ?1 * 10, 'a') || 'b'",
    "SELECT instr(printf('%.*c', ?1 * 1000, 'a'), printf('%.*c', ?1 * 10, 'a') || 'b')",
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT ?1 * 1000) "
    "SELECT count(*) FROM c",
    "UPDATE h SET v = replace(v, 'x', printf('%.*c', ?1, 'y')) WHERE id % 7 = ?1 % 7",
    "SELECT trim(printf('%.*c', ?1 * 100, 'a'), printf('%.*c', ?1 * 10, 'b'))",
    "DELETE FROM h WHERE id % 3 = ?1 % 3",
    "SELECT group_concat(v) FROM h",
    "SELEC 1",
    "PRAGMA journal_mode = OFF",
    "SELECT total_changes()",
    "INSERT INTO kv(key, value) SELECT 'x', 1 FROM h WHERE 0",
};

}  // namespace

// ---------------------------------------------------------------------------------------
// Faults.

void World::OnFault() {
  if (!faults_on_) return;
  // One fault process; each kind fires at its own mean rate (checked every 100 ms).
  Schedule(now_us_ + 100'000, EventKind::kFault, 0);
  auto fires = [&](int64_t every_us) {
    return every_us > 0 && process_.Chance(100'000, static_cast<uint64_t>(every_us));
  };
  int n = options_.replicas;
  if (final_cut_) {
    // The network stays as Run cut it until the faults stop.
  } else if (fires(swarm_.partition_every_us)) {
    blocked_.clear();
    int kind = static_cast<int>(net_.Range(0, 4));
    // Without leases, half the partitions cut one link: its two ends take turns leading,
    // each elected through the replicas that hear both, while the other still believes in
    // its last heartbeat round (what a lease would have made safe).
    if (!options_.leases && net_.Chance(1, 2)) kind = 4;
    uint32_t a = static_cast<uint32_t>(net_.Range(1, n));
    // Half the time the fault is aimed at the leader: that is where the protocol is tested.
    if (uint32_t leader = CurrentLeader(); leader != 0 && net_.Chance(1, 2)) a = leader;
    if (kind == 0) {  // isolate one replica
      for (int i = 1; i <= n; ++i) {
        if (static_cast<uint32_t>(i) == a) continue;
        blocked_.insert({a, i});
        blocked_.insert({static_cast<uint32_t>(i), a});
      }
    } else if (kind == 1) {  // split in two
      std::vector<int> side(n + 1);
      for (int i = 1; i <= n; ++i) side[i] = static_cast<int>(net_.Range(0, 1));
      for (int i = 1; i <= n; ++i) {
        for (int j = 1; j <= n; ++j) {
          if (side[i] != side[j]) blocked_.insert({i, j});
        }
      }
    } else if (kind == 2) {  // one-way: a hears nobody
      for (int i = 1; i <= n; ++i) {
        if (static_cast<uint32_t>(i) != a) blocked_.insert({static_cast<uint32_t>(i), a});
      }
    } else if (kind == 3) {  // clog one path
      uint32_t b = static_cast<uint32_t>(net_.Range(1, n));
      if (a != b) blocked_.insert({a, b});
    } else if (n > 1) {  // cut one link both ways: the others still hear both ends
      uint32_t b = static_cast<uint32_t>((a + net_.Range(0, n - 2)) % n + 1);  // not a
      blocked_.insert({a, b});
      blocked_.insert({b, a});
    }
    Trace(absl::StrCat("partition kind=", kind, " around ", a, " paths cut=", blocked_.size()));
  } else if (!blocked_.empty() && net_.Chance(1, 10)) {
    blocked_.clear();
    Trace("partition heals");
  }
  if (fires(swarm_.crash_every_us)) {
    uint32_t leader = CurrentLeader();
    Host& h = leader != 0 && process_.Chance(1, 2) ? hosts_[leader - 1]
                                                   : hosts_[process_.Range(0, n - 1)];
    if (h.up && MayCrash()) CrashHost(h);
  }
  for (Host& h : hosts_) {
    if (!h.up && !h.refused && process_.Chance(swarm_.restart_per_100, 100)) StartHost(h);
  }
  if (fires(swarm_.pause_every_us)) {
    Host& h = hosts_[process_.Range(0, n - 1)];
    if (h.up && !h.paused) {
      h.paused = true;
      h.paused_since_us = now_us_;
      Trace(absl::StrCat("replica ", h.id, " pauses"));
    }
  }
  for (Host& h : hosts_) {
    if (h.up && h.paused && process_.Chance(1, 10)) Resume(h);
  }
}

bool World::MayCrash() const {
  int down = 0;
  for (const Host& o : hosts_) down += !o.up;
  return faults_on_ && down < options_.replicas - 1;
}

// ---------------------------------------------------------------------------------------
// Hostile workload.

Statement World::HostileStatement() {
  constexpr size_t kFragments = sizeof(kHostileSql) / sizeof(kHostileSql[0]);
  Statement s;
  std::string sql = kHostileSql[hostile_.Range(0, kFragments - 1)];
  if (hostile_.Chance(1, 8)) {  // malformed: a few arbitrary bytes somewhere
    std::string noise(static_cast<size_t>(hostile_.Range(1, 6)), '\0');
    // ASCII: the server's JSON layer only ever hands the core valid UTF-8.
    for (char& c : noise) c = static_cast<char>(hostile_.Range(1, 127));
    sql.insert(static_cast<size_t>(hostile_.Range(0, static_cast<int64_t>(sql.size()))), noise);
  }
  s.set_sql(sql);
  if (sql.find("?1") != std::string::npos) {
    // Mostly cheap; now and then a read spends a whole work budget (writes stay small, or
    // every later snapshot and state hash of the run would carry their bulk).
    bool reads = sql.starts_with("SELECT") || sql.starts_with("WITH");
    s.add_params()->set_integer(reads && hostile_.Chance(1, 30) ? 100'000 : hostile_.Range(0, 40));
  }
  return s;
}

Message World::ForgedMessage() {
  // What an authenticated channel can still carry: messages from replicas outside the
  // group, or addressed to another replica, of any kind, with arbitrary slots and rounds.
  Message m;
  const uint32_t n = static_cast<uint32_t>(options_.replicas);
  m.set_from(hostile_.Chance(1, 2) ? n + static_cast<uint32_t>(hostile_.Range(1, 3)) : 0);
  m.set_to(static_cast<uint32_t>(hostile_.Range(1, n)));
  std::string bytes(static_cast<size_t>(hostile_.Range(0, 64)), '\0');
  for (char& c : bytes) c = static_cast<char>(hostile_.Range(0, 255));
  Message body;
  if (body.ParseFromString(bytes)) m.MergeFrom(body);     // random fields, when they parse
  if (m.from() >= 1 && m.from() <= n) m.set_from(n + 1);  // never a member of the group
  return m;
}

void World::OnHostile() {
  if (!faults_on_) return;
  Schedule(now_us_ + hostile_.Range(kHostileEveryUs / 2, 3 * kHostileEveryUs / 2),
           EventKind::kHostile, 0);
  Host& h = hosts_[hostile_.Range(0, options_.replicas - 1)];
  if (!h.up || h.paused) return;
  int action = static_cast<int>(hostile_.Range(0, 9));
  if (action < 4) {
    ClientRequest request;  // client 0: no session, never retried
    request.set_origin_replica(h.id);
    request.set_timestamp_unix_ms(now_us_ / 1000);
    Execute* e = request.mutable_command()->mutable_execute();
    e->set_database(kDatabase);
    e->set_transaction(hostile_.Chance(1, 2));
    for (int i = static_cast<int>(hostile_.Range(1, 3)); i > 0; --i) {
      *e->add_statements() = HostileStatement();
    }
    // As the server does: what Validate refuses is answered 400 and never proposed.
    if (StateMachine::Validate(request.command()).ok()) {
      Trace(absl::StrCat("hostile write via replica ", h.id));
      h.replica().Propose(std::move(request));
    }
  } else if (action < 7) {
    // A local read on a replica that applies the log: it must not change what it applies.
    Trace(absl::StrCat("hostile local read on replica ", h.id));
    h.sm->Query(kDatabase, HostileStatement()).IgnoreError();
  } else {
    Message forged = ForgedMessage();
    forged.set_to(h.id);
    Trace(absl::StrCat("forged message to replica ", h.id, " from ", forged.from()));
    h.replica().Step(forged);
  }
  DrainHost(h);
}

void World::Resume(Host& h) {
  SYNOD_CHECK(h.up && h.paused);
  h.paused = false;
  // The process's monotonic clock kept running: it catches up on the ticks it missed
  // before it handles anything else.
  int64_t missed = (now_us_ - h.paused_since_us) / h.tick_period_us;
  Trace(absl::StrCat("replica ", h.id, " resumes after ", missed, " ticks"));
  // As the server's loop does (Node::CatchUpTicks): a stall longer than a few ticks is
  // replayed at once, and gives the leader a fresh election timeout to be heard.
  constexpr int64_t kStallTicks = 5;
  if (missed > kStallTicks) {
    h.replica().TickAfterStall(missed);
  } else {
    for (int64_t i = 0; i < missed; ++i) h.replica().Tick();
  }
  DrainHost(h);
}

void World::CheckLeases() {
  if (!options_.leases) return;  // acceptors grant none: a leader's lease means nothing
  for (const Host& h : hosts_) {
    if (!h.up || h.paused || h.replica().role() != Role::kLeader) continue;
    if (!h.replica().lease_valid()) continue;
    const Ballot& mine = h.replica().promised_ballot();
    // The lease rests on a majority bound to this leader right now (itself included): each
    // refuses to promise anyone else, or is down or paused (a restarted acceptor waits out
    // a whole lease before it promises anyone). This catches a lease that outlasts the
    // acceptors' grants even when no election happens to test it.
    size_t bound = 0;
    for (const Host& o : hosts_) {
      bound += o.id == h.id || !o.up || o.paused || o.replica().LeaseBinds(h.id);
    }
    if (bound < hosts_.size() / 2 + 1) {
      Fail(absl::StrCat("replica ", h.id, " holds a lease at ballot (", mine.round(), ",",
                        mine.replica_id(), ") that only ", bound, " of ", hosts_.size(),
                        " replicas still grant"));
    }
    for (const Host& o : hosts_) {
      if (o.id == h.id || !o.up || o.replica().role() != Role::kLeader) continue;
      const Ballot& theirs = o.replica().promised_ballot();
      if (BallotLess(mine, theirs)) {
        Fail(absl::StrCat("replica ", h.id, " holds a lease at ballot (", mine.round(), ",",
                          mine.replica_id(), ") while replica ", o.id,
                          " leads at the higher ballot (", theirs.round(), ",", theirs.replica_id(),
                          "): the leases overlap"));
      }
    }
  }
}

uint32_t World::CurrentLeader() const {
  for (const Host& h : hosts_) {
    if (h.up && !h.paused && h.replica().role() == Role::kLeader) return h.id;
  }
  return 0;
}

void World::WatchLeaderStability() {
  const size_t n = hosts_.size();
  if (stable_leader_ == 0) {
    // A healthy, connected leader: a majority acknowledged its heartbeats lately (its lease
    // runs), and a majority takes it for the leader.
    uint32_t leader = CurrentLeader();
    if (leader == 0 || !hosts_[leader - 1].replica().lease_valid()) return;
    size_t following = 0;
    for (const Host& h : hosts_) {
      following += h.up && !h.paused && h.replica().leader_id() == leader;
    }
    if (following < n / 2 + 1) return;
    stable_leader_ = leader;
    stable_since_us_ = now_us_;
    elections_when_stable_.assign(n, 0);
    for (size_t i = 0; i < n; ++i) {
      if (hosts_[i].up) elections_when_stable_[i] = hosts_[i].replica().elections_started();
    }
    Trace(absl::StrCat("replica ", leader, " leads a majority in a quiet network"));
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    const Host& h = hosts_[i];
    // The leader's own elections count too: it raises its ballot only to win back an
    // acceptor that promised a higher one (Replica::StepNack), a ballot some replica raised
    // needlessly.
    if (!h.up) continue;
    uint64_t started = h.replica().elections_started();
    if (started <= elections_when_stable_[i]) continue;
    needless_elections_ += started - elections_when_stable_[i];
    elections_when_stable_[i] = started;
    if (first_needless_election_.empty()) {
      first_needless_election_ = absl::StrCat(
          "at ", now_us_, "us replica ", h.id, " started an election while replica ",
          stable_leader_, " led a majority in a quiet network (since ", stable_since_us_, "us)");
    }
    Trace(absl::StrCat("needless election by replica ", h.id));
  }
}

void World::HealAll() {
  faults_on_ = false;
  blocked_.clear();
  for (Host& h : hosts_) {
    if (h.up && h.paused) Resume(h);
    if (!h.up && !h.refused) StartHost(h);
  }
  Trace("faults stop; every replica that can is up");
}

}  // namespace synod::sim::internal

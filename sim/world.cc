#include "sim/world.h"

#include <algorithm>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <queue>
#include <random>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/divergence.h"
#include "core/driver.h"
#include "core/log_codec.h"
#include "core/replica.h"
#include "core/stable_hash.h"
#include "core/state_machine.h"
#include "sim/checkers.h"
#include "sim/linearizability.h"

namespace synod::sim {
namespace {

constexpr int64_t kTickUs = 10'000;  // one nominal replica tick: 10 ms
constexpr int64_t kClientTimeoutUs = 2'000'000;
constexpr int kReadAttempts = 4;           // a read gives up after this many (it tells nothing)
constexpr int64_t kRetryPauseUs = 50'000;  // before resending a refused request
// Reads are not logged, so they use their own sequence numbers, apart from the writes'
// (a client's writes are numbered 1, 2, 3, ... for the state machine's session).
constexpr uint64_t kReadSequenceBase = 1ull << 40;
constexpr int64_t kLivenessBoundUs = 30'000'000;  // pending operations complete within 30 s
// Liveness mode: how long a leader that a majority follows is watched, once the faults
// stop, for a needless election (about ten election timeouts).
constexpr int64_t kQuietUs = 2'000'000;
// Liveness mode: how long the last network cut lasts before the faults stop (about four of
// the longest election timeouts).
constexpr int64_t kFinalCutUs = 800'000;
constexpr uint64_t kLinearizabilityBudgetSteps = 5'000'000;
// A client waits this long between operations: enough load to keep batches and pipelines
// busy, little enough that thousands of simulated seconds fit in a CI run.
constexpr int64_t kThinkMinUs = 20'000;
constexpr int64_t kThinkMaxUs = 400'000;
// State hashes are compared at every revision that is a multiple of this (and at every
// snapshot install): hashing the whole state after every entry would dominate the run.
constexpr uint64_t kStateHashEveryRevisions = 8;
constexpr const char* kDatabase = "sim";
// Media (SimOptions::media): a media actor uploads or deletes now and then; a blob is pushed
// to a majority before its metadata is proposed; passes fetch what is missing and collect
// what is unreferenced and older than the grace. The run ends with a settling time long
// enough for every pass to have done its work, then the media checks.
constexpr int64_t kMediaEveryMinUs = 100'000;
constexpr int64_t kMediaEveryMaxUs = 400'000;
// Longer than an upload's deadline plus the stalls the faults cause: the grace must outlast
// the time from a blob's last keep to its metadata being applied (the server's is at least
// a minute against a 5 s request timeout).
constexpr int64_t kMediaGraceUs = 8'000'000;
constexpr int64_t kMediaPassEveryUs = 500'000;
constexpr int64_t kMediaUploadDeadlineUs = 5'000'000;
constexpr int64_t kMediaSettleUs = kMediaGraceUs + 6 * kMediaPassEveryUs;
constexpr int kMediaKeys = 6;
constexpr int64_t kMediaFetchTimeoutUs = 1'000'000;

// A blob's name in the simulation: 64 hex digits from the content (the state machine checks
// the form only; the server uses SHA-256).
std::string SimBlobName(std::string_view content) {
  std::string name;
  for (uint64_t salt = 0; salt < 4; ++salt) {
    StableHash hash;
    hash.AddU64(salt);
    hash.AddField(content);
    char hex[17];
    std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(hash.value()));
    name += hex;
  }
  return name;
}
// Revisions between divergence-check votes (core/divergence.h): small, so that every run
// votes many times.
constexpr uint64_t kCheckpointEveryRevisions = 16;
// Hostile mode: mean time between hostile actions, and the SQL they draw from. Every
// fragment touches only its own tables (h, f), never the clients' (kv, list), and ?1 scales
// its cost: most stay far under a request's work budget, a few spend it.
constexpr int64_t kHostileEveryUs = 100'000;
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

// A deterministic generator; ranges come from the raw 64-bit output (the std distributions
// differ between standard libraries). Probabilities are integer ratios.
class Prng {
 public:
  explicit Prng(uint64_t seed) : engine_(seed) {}
  uint64_t Next() { return engine_(); }
  // Uniform in [lo, hi].
  int64_t Range(int64_t lo, int64_t hi) {
    SYNOD_CHECK_LE(lo, hi);
    return lo + static_cast<int64_t>(Next() % static_cast<uint64_t>(hi - lo + 1));
  }
  bool Chance(uint64_t numerator, uint64_t denominator) {
    return numerator > 0 && Next() % denominator < numerator;
  }

 private:
  std::mt19937_64 engine_;
};

// Fault rates drawn per seed ("swarm" testing): each seed stresses its own corners.
struct Swarm {
  uint64_t drop_per_10k;
  uint64_t duplicate_per_10k;
  uint64_t tail_delay_per_10k;  // a message takes up to 100x the usual delay
  int64_t partition_every_us;   // mean time between network partitions (0: none)
  int64_t crash_every_us;       // mean time between replica crashes (0: none)
  uint64_t restart_per_100;     // chance per 100 ms that a crashed replica restarts
  int64_t pause_every_us;
  uint64_t torn_write_per_100;   // a crash leaves the first unsynced record torn
  uint64_t corruption_per_100;   // a crash also corrupts a synced record (bounded, below)
  int64_t max_drift_ppm;         // per-replica clock rate error
  uint64_t compact_every;        // applied entries between snapshots
  int lease_duration_ticks;      // up to one tick below the election timeout
  int clock_drift_bound_ticks;   // covers max_drift_ppm over a lease
  int heartbeat_interval_ticks;  // shorter than the lease minus the drift bound
  int clients;
  // A replica crashes right after it sent a promise or an acknowledgement, before anything
  // else reaches its disk (per 10,000 Readys that carry one).
  uint64_t crash_after_send_per_10k;
};

// Two clocks drift apart by up to twice the per-replica bound over a lease, plus a tick of
// rounding.
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

// ---------------------------------------------------------------------------------------
// Disk: a log image with an fsync boundary and fault injection.

// The log in segments, by the server's rules (adapters/log_store.h): a new segment starts
// once the last one holds kSegmentBytes (small here, so that runs cross many segments) and
// at each compaction, beginning with the current promise and snapshot metadata; compaction
// deletes the oldest segments whose entries the snapshot covers; only the last segment may
// end in a torn write, and recovery replays the segments in order (LogReplay).
class SimDisk {
 public:
  static constexpr size_t kSegmentBytes = 4096;

  SimDisk() : segments_(1) {}

  // Appends what `ready` persists, unsynced.
  void Write(const Ready& ready) {
    std::string bytes = EncodeReady(ready);
    if (bytes.empty()) return;
    UnsyncedWrite w{std::move(bytes), ready.hard_state, {}, std::nullopt, 0};
    for (const LogEntry& e : ready.entries) {
      // One write may accept a slot twice (at a ballot, then at a higher one, when the
      // driver merged two Readies): recovery keeps the later record, and so does this.
      w.entries[e.slot()] = e.ballot();
      w.max_slot = std::max(w.max_slot, e.slot());
    }
    if (ready.snapshot) w.snapshot = ready.snapshot->meta;
    unsynced_.push_back(std::move(w));
  }
  void Sync() {
    if (unsynced_.empty()) return;
    if (segments_.back().bytes.size() >= kSegmentBytes) StartSegment();
    Segment& last = segments_.back();
    for (UnsyncedWrite& w : unsynced_) {
      AppendRecords(last, w.bytes);
      last.max_slot = std::max(last.max_slot, w.max_slot);
      if (w.hard_state) {
        RaiseDurablePromise(w.hard_state->promised());
        hard_state_ = w.hard_state;
      }
      if (w.snapshot) {
        snapshot_ = *w.snapshot;
        durable_state_.snapshot_index =
            std::max(durable_state_.snapshot_index, w.snapshot->index());
      }
      for (const auto& [slot, ballot] : w.entries) {
        durable_state_.accepted[slot] = ballot;
        RaiseDurablePromise(ballot);
      }
    }
    Mark(last);
    unsynced_.clear();
  }
  // A crash: every unsynced write is lost; the first may survive torn (recovery drops it),
  // in the segment the next sync would have written.
  void Crash(Prng& p, bool tear) {
    if (tear && !unsynced_.empty() && unsynced_.front().bytes.size() > 1) {
      const std::string& first = unsynced_.front().bytes;
      if (segments_.back().bytes.size() >= kSegmentBytes) {
        // A new segment, cut short: any prefix of its header and first write, empty too.
        const std::string whole = HeaderBytes() + first;
        segments_.emplace_back();
        segments_.back().bytes = whole.substr(0, p.Range(0, whole.size() - 1));
      } else {
        segments_.back().bytes += first.substr(0, p.Range(1, first.size() - 1));
      }
    }
    unsynced_.clear();
  }
  // Flips a bit anywhere in a synced record of any segment, its frame header and the last
  // record included (found later by its checksum, by the synced mark beyond it, or by the
  // segments after it).
  void Corrupt(Prng& p) {
    std::vector<Segment*> written;
    for (Segment& s : segments_) {
      if (!s.record_offsets.empty()) written.push_back(&s);
    }
    if (written.empty()) return;
    Segment& s = *written[static_cast<size_t>(p.Range(0, written.size() - 1))];
    size_t i = static_cast<size_t>(p.Range(0, s.record_offsets.size() - 1));
    size_t begin = s.record_offsets[i];
    size_t end = i + 1 < s.record_offsets.size() ? s.record_offsets[i + 1] : s.synced_bytes;
    if (begin >= end) return;
    size_t at = static_cast<size_t>(p.Range(begin, end - 1));
    s.bytes[at] = static_cast<char>(s.bytes[at] ^ (1 << p.Range(0, 7)));
  }
  // What the segments hold, replayed in order; DataLoss as the server's log store gives it.
  absl::StatusOr<RecoveredLog> Recover() const {
    LogReplay replay;
    LogReplay::Segment last;
    for (size_t i = 0; i < segments_.size(); ++i) {
      absl::StatusOr<LogReplay::Segment> segment =
          replay.Add(segments_[i].bytes, /*more_follow=*/i + 1 < segments_.size());
      if (!segment.ok()) {
        return absl::DataLossError(
            absl::StrCat("segment ", i, " is corrupt: ", segment.status().message()));
      }
      last = *segment;
    }
    RecoveredLog out = std::move(replay).Finish();
    out.valid_bytes = last.valid_bytes;
    out.records = last.records;
    out.torn_tail = last.torn_tail;
    return out;
  }
  // After a recovery: the torn tail of the last segment is cut away, as the server does,
  // and the segments go on from what `recovered` holds.
  void Reopen(const RecoveredLog& recovered) {
    Segment& last = segments_.back();
    last.bytes.resize(recovered.valid_bytes);
    while (!last.record_offsets.empty() && last.record_offsets.back() >= last.bytes.size()) {
      last.record_offsets.pop_back();
    }
    last.synced_bytes = last.bytes.size();
    unsynced_.clear();
    hard_state_ = recovered.state.hard_state;
    snapshot_ = recovered.state.snapshot_meta;
  }
  // Drops what a durable snapshot at `through` covers: a new segment, then the oldest
  // segments whose entries are all at or below it.
  void Compact(uint64_t through) {
    StartSegment();
    Mark(segments_.back());
    through = std::min(through, snapshot_.index());
    while (segments_.size() > 1 && segments_.front().max_slot <= through) {
      segments_.erase(segments_.begin());
    }
    // What the snapshot covers is no longer the acceptor's to keep (the checkers skip it).
    auto& accepted = durable_state_.accepted;
    accepted.erase(accepted.begin(), accepted.upper_bound(through));
  }
  // Replaces the log with one holding exactly `state` (the forget-promise bug).
  void Rewrite(const PersistedState& state) {
    durable_state_ = DurableAcceptorState();
    hard_state_.reset();
    snapshot_ = SnapshotMeta();
    segments_.assign(1, Segment());
    unsynced_.clear();
    Ready r;
    r.hard_state = state.hard_state;
    if (state.snapshot_meta.index() > 0) r.snapshot = SnapshotToInstall{state.snapshot_meta};
    r.entries = state.entries;
    Write(r);
    Sync();
  }
  // What the synced records hold, as recovery would read it back.
  const DurableAcceptorState& durable_state() const { return durable_state_; }
  size_t segments() const { return segments_.size(); }

 private:
  struct Segment {
    std::string bytes;
    std::vector<size_t> record_offsets;  // of every synced record, marks included
    size_t synced_bytes = 0;             // where the synced records end (a torn write follows)
    uint64_t max_slot = 0;               // of its entries
  };
  struct UnsyncedWrite {
    std::string bytes;
    std::optional<HardState> hard_state;
    std::map<uint64_t, Ballot> entries;  // slot -> ballot, as DurableAcceptorState::accepted
    std::optional<SnapshotMeta> snapshot;
    uint64_t max_slot = 0;
  };

  std::string HeaderBytes() const {
    Ready header;
    header.hard_state = hard_state_;
    if (snapshot_.index() > 0) header.snapshot = SnapshotToInstall{snapshot_};
    return EncodeReady(header);
  }
  void StartSegment() {
    segments_.emplace_back();
    AppendRecords(segments_.back(), HeaderBytes());
  }
  // Records `framed` (whole frames) at the end of `s`, unsynced until Mark.
  static void AppendRecords(Segment& s, std::string_view framed) {
    for (size_t offset : FrameOffsets(framed)) s.record_offsets.push_back(s.bytes.size() + offset);
    s.bytes += framed;
  }
  static void Mark(Segment& s) {
    s.record_offsets.push_back(s.bytes.size());
    s.bytes += EncodeSyncMark(s.record_offsets.size() - 1, s.bytes.size());
    s.synced_bytes = s.bytes.size();
  }
  void RaiseDurablePromise(const Ballot& ballot) {
    if (BallotLess(durable_state_.promised, ballot)) durable_state_.promised = ballot;
  }

  std::vector<Segment> segments_;        // oldest first; never empty
  std::optional<HardState> hard_state_;  // the latest synced, repeated by a new segment
  SnapshotMeta snapshot_;
  std::vector<UnsyncedWrite> unsynced_;
  DurableAcceptorState durable_state_;
};

// ---------------------------------------------------------------------------------------
// Clients and their operations.

enum class ClientOpKind { kWrite, kIncrement, kAppend, kRead, kReadList };

struct ClientOp {
  ClientOpKind kind = ClientOpKind::kRead;
  std::string key;
  int64_t argument = 0;
  Consistency consistency = LINEARIZABLE;
};

struct Client {
  uint64_t id = 0;
  uint64_t sequence = 0;  // of the current operation
  uint64_t writes = 0;
  uint64_t reads = 0;
  bool busy = false;
  ClientOp op;
  int attempts = 0;
  int64_t call_us = 0;
  int64_t attempt_deadline_us = 0;
  uint32_t target = 0;
  uint64_t op_index = 0;  // into history
  // Workload::kReads: the replicas this client writes and reads through, and the key of the
  // write it saw acknowledged last, which it reads back next (empty: none).
  uint32_t write_replica = 0;
  uint32_t read_replica = 0;
  std::string read_back_key;
};

struct PendingRead {
  uint64_t client_index = 0;
  uint64_t sequence = 0;
  uint64_t revision = 0;
};

// ---------------------------------------------------------------------------------------

class World {
 public:
  explicit World(const SimOptions& options);
  SimResult Run();

 private:
  // kClientDeadline: an attempt's time is up (or its retry pause is over); kClientWake: the
  // think time after an operation is over, and the client starts its next one.
  enum class EventKind {
    kTick,
    kDeliver,
    kClientRequest,
    kClientDeadline,
    kClientWake,
    kFault,
    kHostile,
    kDiskDone,     // a host's oldest storage operation finishes (target: replica; incarnation)
    kCrash,        // a crash decided inside the driver's callbacks (target: replica; incarnation)
    kCheckDone,    // a host's check of a peer's snapshot gives its verdict (target; incarnation)
    kMedia,        // the media actor's next upload or deletion
    kBlobDeliver,  // a blob-channel packet arrives (target: replica)
  };
  // The blob channel between replicas (server/media.h), as packets on the simulated network.
  struct BlobPacket {
    enum class Kind { kPush, kPushAck, kKeep, kKeepAck, kFetch, kFetchReply };
    Kind kind = Kind::kPush;
    uint32_t from = 0;
    uint32_t to = 0;
    uint64_t upload = 0;  // push, keep: the upload they serve
    std::string sha;
    std::string content;  // push, fetch reply
    bool has = false;     // acks and replies: the sender holds the blob
  };
  static BlobPacket Packet(BlobPacket::Kind kind, uint32_t from, uint32_t to, uint64_t upload,
                           std::string sha, std::string content = "", bool has = false) {
    BlobPacket packet;
    packet.kind = kind;
    packet.from = from;
    packet.to = to;
    packet.upload = upload;
    packet.sha = std::move(sha);
    packet.content = std::move(content);
    packet.has = has;
    return packet;
  }
  struct Event {
    int64_t time_us;
    uint64_t seq;
    EventKind kind;
    uint32_t target;  // replica or client index
    Message message;
    uint64_t client_sequence = 0;  // kClientRequest: client index; kTick: incarnation
    // Client events: the sequence of the operation they belong to. One that arrives after
    // its operation is over does nothing, so every operation starts exactly once.
    uint64_t op_sequence = 0;
    std::shared_ptr<const BlobPacket> blob;  // kBlobDeliver
    bool operator>(const Event& o) const {
      return std::tie(time_us, seq) > std::tie(o.time_us, o.seq);
    }
  };
  // What a host's storage operation makes durable when it finishes, for the checkers.
  struct DiskOp {
    bool sync = false;
    bool compact = false;
    uint64_t compacted_through = 0;
    std::optional<HardState> hard_state;
    std::vector<LogEntry> entries;
    std::function<void()> done;
  };
  class HostSide;
  struct Host {
    Replica& replica() { return driver->replica(); }
    const Replica& replica() const { return driver->replica(); }
    uint32_t id = 0;
    bool up = false;
    bool paused = false;
    bool refused = false;  // found its own state corrupt: refuses to start
    std::unique_ptr<InMemoryDatabaseOpener> opener;
    std::unique_ptr<StateMachine> sm;
    std::unique_ptr<HostSide> side;               // the driver's interfaces, for this host
    std::unique_ptr<HostDriver> driver;           // owns the replica; null while down
    std::unique_ptr<DivergenceCheck> divergence;  // forgotten at a crash, as in the server
    SimDisk disk;
    // Snapshot images (the log names them by their metadata): durable once kept; a crash
    // loses one partly received.
    MemorySnapshotStore snapshots;
    int64_t tick_period_us = kTickUs;
    int64_t paused_since_us = 0;
    // Storage operations started and not yet finished, oldest first, and when the last one
    // finishes (they finish in order).
    std::deque<DiskOp> disk_ops;
    int64_t disk_busy_until_us = 0;
    std::map<std::pair<uint64_t, uint64_t>, uint64_t> pending_writes;  // -> client index
    std::map<std::pair<uint64_t, uint64_t>, uint64_t> pending_reads;   // -> client index
    std::vector<PendingRead> reads_waiting_apply;
    uint64_t last_local_read_revision = 0;
    uint64_t incarnation = 0;  // process starts so far; tick events carry theirs
    // A peer's snapshot being checked (as the server does, off the loop): its verdict,
    // given to the driver when kCheckDone comes.
    std::function<void(absl::Status)> check_done;
    absl::Status check_verdict;
    // Media blobs, by name: durable once stored (a push is acknowledged only then). When
    // each was last made young, and the pins of uploads under way (lost at a crash).
    struct Blob {
      std::string content;
      int64_t young_at_us = 0;
    };
    std::map<std::string, Blob> blobs;
    std::map<std::string, int> pins;
    // Fetches under way: peers asked so far, and when the last was asked (a lost answer is
    // given up after kMediaFetchTimeoutUs, as the server's peer requests time out).
    struct FetchTry {
      int tries = 0;
      int64_t first_peer = 0;  // the round asks every peer in turn from here
      int64_t asked_us = 0;
    };
    std::map<std::string, FetchTry> fetch_tries;
    int64_t next_media_pass_us = 0;
  };
  // An upload from its origin's side: pushed, kept, proposed.
  struct MediaUpload {
    uint32_t origin = 0;
    uint64_t incarnation = 0;
    std::string key;
    std::string sha;
    std::set<uint32_t> holders;  // the origin, and the peers that stored it
    std::set<uint32_t> kept;     // holders that made it young again before the proposal
    bool proposed = false;
    int64_t deadline_us = 0;
  };

  void Schedule(int64_t at_us, EventKind kind, uint32_t target, Message m = Message(),
                uint64_t client_sequence = 0, uint64_t op_sequence = 0);
  void Trace(const std::string& line);
  void TraceMessage(const Message& m);
  void Fail(const std::string& what);

  ReplicaConfig ConfigFor(uint32_t id) const;
  void StartHost(Host& h);
  void CrashHost(Host& h);
  void DrainHost(Host& h);
  // The host's storage (HostSide::Persist): written now, durable when kDiskDone comes.
  void StartDiskOp(Host& h, const Ready& ready, PersistOptions options, std::function<void()> done);
  void OnDiskDone(Host& h, uint64_t incarnation);
  void ApplyCommitted(Host& h, const CommittedEntry& c);
  void ServeRead(Host& h, uint64_t client_index, uint64_t sequence);
  void MaybeCompact(Host& h);
  void SendMessage(const Message& m);

  void OnTick(Host& h, uint64_t incarnation);
  void OnFault();
  // Whether a replica may crash now: faults are on, and another replica would stay up.
  bool MayCrash() const;
  uint32_t CurrentLeader() const;  // the replica that believes it leads (0: none)
  // While a leader believes its lease valid (and may answer lease reads without a round
  // trip), no other replica may lead at a higher ballot.
  void CheckLeases();
  void HealAll();
  // Once the faults stop: finds the first healthy leader a majority follows, then counts every
  // election any replica starts after that (a needless election: nothing justifies it in a
  // quiet network). Called after every event.
  void WatchLeaderStability();
  void Resume(Host& h);
  void OnClientRequest(Host& h, uint64_t client_index, uint64_t sequence);
  void ClientStartOp(uint64_t client_index);
  // The next operation of a client, and the replica it goes to.
  ClientOp MixedWorkloadOp(uint32_t* target);
  ClientOp ReadsWorkloadOp(Client& c, uint32_t* target);
  // A read of key `k` of one of the three models; of ten consistency levels drawn, those
  // below `linearizable_levels` are linearizable, then those below `lease_levels` lease,
  // the rest local.
  ClientOp RandomRead(int k, int linearizable_levels, int lease_levels);
  void ClientSend(uint64_t client_index);
  void ClientWake(uint64_t client_index);
  void ClientDone(uint64_t client_index, uint64_t sequence, bool ok, const CommandResult* result,
                  const StatementResult* rows, uint64_t revision);
  Statement StatementFor(const ClientOp& op) const;
  bool Setup();
  void FinalChecks();
  void OnHostile();
  Statement HostileStatement();
  Message ForgedMessage();
  // Media.
  // Takes the next event off the queue, runs it, and checks leases and acceptors after.
  void RunNextEvent();
  void Dispatch(const Event& ev);
  void OnMediaActor();
  void SendBlob(BlobPacket packet);
  void OnBlob(Host& h, const BlobPacket& packet);
  void ProposeMedia(Host& h, uint64_t upload_id);
  void EndUpload(uint64_t upload_id);
  void MediaApplied(Host& h, const CommittedEntry& c, const std::vector<AppliedRequest>& applied);
  void MediaPass(Host& h);
  void FetchBlob(Host& h, const std::string& sha);
  void MediaChecks();

  SimOptions options_;
  Prng root_;
  Prng net_, disk_, clock_, process_, workload_;
  Swarm swarm_;
  Prng hostile_;     // drawn from the root after the others: runs without it are unchanged
  Prng send_crash_;  // crashes right after a send (Swarm::crash_after_send_per_10k)
  // How long a snapshot check takes (its own stream, apart from the root's: the draws of
  // the other streams stay as they were).
  Prng check_delay_;
  Prng fsync_;  // how long each storage operation takes
  Prng media_;  // drawn last: the media actor and the blob channel's delays
  std::map<uint64_t, MediaUpload> uploads_;
  uint64_t next_upload_ = 1;
  std::map<std::pair<uint64_t, uint64_t>, uint64_t> media_proposals_;  // request -> upload
  uint64_t media_acknowledged_ = 0;
  int64_t max_fsync_us_ = 0;
  std::vector<Host> hosts_;
  std::vector<Client> clients_;
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> events_;
  uint64_t next_seq_ = 0;
  int64_t now_us_ = 0;
  bool faults_on_ = true;
  bool final_cut_ = false;  // liveness mode: the last network cut holds until the faults stop
  // Leader stability after the faults stop (WatchLeaderStability).
  uint32_t stable_leader_ = 0;
  int64_t stable_since_us_ = 0;
  std::vector<uint64_t> elections_when_stable_;  // per replica, elections started by then
  uint64_t needless_elections_ = 0;
  std::string first_needless_election_;
  bool clients_issue_ = true;
  std::set<std::pair<uint32_t, uint32_t>> blocked_;  // (from, to) paths cut
  int corrupted_hosts_ = 0;
  StableHash trace_hash_;
  uint64_t events_run_ = 0;
  std::optional<std::string> failure_;
  ChosenChecker chosen_;
  AcceptorChecker acceptors_;
  StateHashChecker state_hashes_;
  // Every snapshot image a replica wrote of its own state, by (index, checksum): its bytes
  // (images are small here) and who wrote it. An image installed anywhere must be one of
  // these, byte for byte (CheckInstalledImage).
  std::map<std::pair<uint64_t, uint64_t>, std::pair<std::string, uint32_t>> images_written_;
  void CheckInstalledImage(uint32_t id, const SnapshotMeta& meta, const std::string& image);
  std::vector<Operation> history_;
  std::vector<LocalRead> local_reads_;
  int64_t next_value_ = 1;
};

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

// ---------------------------------------------------------------------------------------
// Clients.

Statement World::StatementFor(const ClientOp& op) const {
  Statement s;
  auto text = [](const std::string& v) {
    SqlValue x;
    x.set_text(v);
    return x;
  };
  auto integer = [](int64_t v) {
    SqlValue x;
    x.set_integer(v);
    return x;
  };
  switch (op.kind) {
    case ClientOpKind::kWrite:
      s.set_sql(
          "INSERT INTO kv(key, value) VALUES (?, ?) "
          "ON CONFLICT(key) DO UPDATE SET value = excluded.value");
      break;
    case ClientOpKind::kIncrement:
      s.set_sql(
          "INSERT INTO kv(key, value) VALUES (?, ?) "
          "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value");
      break;
    case ClientOpKind::kAppend:
      s.set_sql("INSERT INTO list(key, element, noise) VALUES (?, ?, random())");
      break;
    case ClientOpKind::kRead:
      s.set_sql("SELECT value FROM kv WHERE key = ?");
      break;
    case ClientOpKind::kReadList:
      s.set_sql("SELECT element FROM list WHERE key = ? ORDER BY id");
      break;
  }
  *s.add_params() = text(op.key);
  if (op.kind == ClientOpKind::kWrite || op.kind == ClientOpKind::kIncrement ||
      op.kind == ClientOpKind::kAppend) {
    *s.add_params() = integer(op.argument);
  }
  return s;
}

ClientOp World::MixedWorkloadOp(uint32_t* target) {
  int k = static_cast<int>(workload_.Range(0, 2));
  int which = static_cast<int>(workload_.Range(0, 9));
  ClientOp op;
  if (which < 2) {
    op.kind = ClientOpKind::kWrite;
    op.key = absl::StrCat("r", k);
    op.argument = next_value_++;
  } else if (which < 4) {
    op.kind = ClientOpKind::kIncrement;
    op.key = absl::StrCat("c", k);
    op.argument = 1;
  } else if (which < 5) {
    op.kind = ClientOpKind::kAppend;
    op.key = absl::StrCat("l", k);
    op.argument = next_value_++;
  } else {
    op = RandomRead(k, /*linearizable_levels=*/5, /*lease_levels=*/8);
  }
  *target = static_cast<uint32_t>(workload_.Range(1, options_.replicas));
  return op;
}

ClientOp World::ReadsWorkloadOp(Client& c, uint32_t* target) {
  ClientOp op;
  *target = c.read_replica;
  if (!c.read_back_key.empty()) {
    // Reads back, through another replica, the write acknowledged a moment ago.
    op.key = std::move(c.read_back_key);
    c.read_back_key.clear();
    op.kind = op.key[0] == 'l' ? ClientOpKind::kReadList : ClientOpKind::kRead;
    return op;
  }
  int k = static_cast<int>(workload_.Range(0, 2));
  int which = static_cast<int>(workload_.Range(0, 9));
  if (which < 3) {
    *target = c.write_replica;
    int model = static_cast<int>(workload_.Range(0, 2));
    op.kind = model == 0   ? ClientOpKind::kWrite
              : model == 1 ? ClientOpKind::kIncrement
                           : ClientOpKind::kAppend;
    op.key = absl::StrCat(model == 0 ? "r" : model == 1 ? "c" : "l", k);
    op.argument = op.kind == ClientOpKind::kIncrement ? 1 : next_value_++;
    return op;
  }
  return RandomRead(k, /*linearizable_levels=*/8, /*lease_levels=*/9);
}

ClientOp World::RandomRead(int k, int linearizable_levels, int lease_levels) {
  ClientOp op;
  int model = static_cast<int>(workload_.Range(0, 2));
  op.kind = model == 2 ? ClientOpKind::kReadList : ClientOpKind::kRead;
  op.key = absl::StrCat(model == 0 ? "r" : model == 1 ? "c" : "l", k);
  int level = static_cast<int>(workload_.Range(0, 9));
  op.consistency = level < linearizable_levels ? LINEARIZABLE
                   : level < lease_levels      ? LEASE
                                               : LOCAL;
  return op;
}

void World::ClientStartOp(uint64_t client_index) {
  Client& c = clients_[client_index];
  if (!clients_issue_) return;
  c.busy = true;
  c.attempts = 0;
  c.call_us = now_us_;
  uint32_t target = 0;
  ClientOp op = options_.workload == Workload::kReads ? ReadsWorkloadOp(c, &target)
                                                      : MixedWorkloadOp(&target);
  c.op = op;
  bool is_read = op.kind == ClientOpKind::kRead || op.kind == ClientOpKind::kReadList;
  c.sequence = is_read ? kReadSequenceBase + ++c.reads : ++c.writes;
  Operation h;
  h.id = history_.size() + 1;
  h.client_id = c.id;
  h.key = op.key;
  h.argument = op.argument;
  h.call_tick = now_us_;
  h.ambiguous = true;  // until an answer says otherwise
  switch (op.kind) {
    case ClientOpKind::kWrite:
      h.kind = OpKind::kWrite;
      break;
    case ClientOpKind::kIncrement:
      h.kind = OpKind::kIncrement;
      break;
    case ClientOpKind::kAppend:
      h.kind = OpKind::kAppend;
      break;
    case ClientOpKind::kRead:
      h.kind = OpKind::kRead;
      break;
    case ClientOpKind::kReadList:
      h.kind = OpKind::kReadList;
      break;
  }
  c.op_index = history_.size();
  history_.push_back(h);
  c.target = target;
  ClientSend(client_index);
}

void World::ClientSend(uint64_t client_index) {
  Client& c = clients_[client_index];
  ++c.attempts;
  c.attempt_deadline_us = now_us_ + kClientTimeoutUs;
  Trace(absl::StrCat("client ", c.id, " seq ", c.sequence, " attempt ", c.attempts, " -> ",
                     c.target, " key ", c.op.key));
  Schedule(now_us_ + net_.Range(100, 1'000), EventKind::kClientRequest, c.target, Message(),
           client_index, c.sequence);
  Schedule(c.attempt_deadline_us, EventKind::kClientDeadline, static_cast<uint32_t>(client_index),
           Message(), 0, c.sequence);
}

void World::OnClientRequest(Host& h, uint64_t client_index, uint64_t sequence) {
  Client& c = clients_[client_index];
  if (!h.up || h.paused || !c.busy || c.sequence != sequence) return;
  bool is_read = c.op.kind == ClientOpKind::kRead || c.op.kind == ClientOpKind::kReadList;
  if (is_read && c.op.consistency == LOCAL) return ServeRead(h, client_index, sequence);
  ClientRequest req;
  req.set_client_id(c.id);
  req.set_sequence(sequence);
  req.set_timestamp_unix_ms(1'700'000'000'000 + now_us_ / 1000);
  if (is_read) {
    req.mutable_command()->mutable_read_barrier()->set_consistency(c.op.consistency);
    h.pending_reads[{c.id, sequence}] = client_index;
  } else {
    Execute* e = req.mutable_command()->mutable_execute();
    e->set_database(kDatabase);
    *e->add_statements() = StatementFor(c.op);
    e->set_transaction(true);
    h.pending_writes[{c.id, sequence}] = client_index;
  }
  h.replica().Propose(std::move(req));
  DrainHost(h);
}

void World::ClientWake(uint64_t client_index) {
  Client& c = clients_[client_index];
  if (!c.busy || now_us_ < c.attempt_deadline_us) return;
  bool is_read = c.sequence >= kReadSequenceBase;
  // A write is retried, with the same sequence, until it has a definite answer (the
  // session applies it at most once); until then it counts as ambiguous.
  if (!is_read || c.attempts < kReadAttempts) {
    c.target = c.target % options_.replicas + 1;
    return ClientSend(client_index);
  }
  Trace(absl::StrCat("client ", c.id, " seq ", c.sequence, " gives up the read"));
  c.busy = false;
  ClientStartOp(client_index);
}

void World::ClientDone(uint64_t client_index, uint64_t sequence, bool ok,
                       const CommandResult* result, const StatementResult* rows,
                       uint64_t revision) {
  Client& c = clients_[client_index];
  if (!c.busy || c.sequence != sequence) return;
  if (!ok) {
    // Refused: try the next replica at once (the same sequence, so it applies at most once).
    if (result != nullptr && result->code() != UNAVAILABLE) {
      Fail(absl::StrCat("client ", c.id, " seq ", sequence, " failed: ", result->message()));
    }
    c.attempt_deadline_us = now_us_ + kRetryPauseUs;
    Schedule(c.attempt_deadline_us, EventKind::kClientDeadline, static_cast<uint32_t>(client_index),
             Message(), 0, sequence);
    return;
  }
  Operation& h = history_[c.op_index];
  h.ambiguous = false;
  h.return_tick = now_us_;
  if (rows != nullptr) {
    if (h.kind == OpKind::kRead) {
      h.read_value = rows->rows_size() == 0 ? 0 : rows->rows(0).values(0).integer();
    } else {
      for (const Row& r : rows->rows()) h.read_list.push_back(r.values(0).integer());
    }
    if (c.op.consistency == LOCAL) {
      local_reads_.back().value = h.kind == OpKind::kRead ? h.read_value : 0;
      h.ambiguous = true;  // local reads are not linearizable; checked on their own
    }
    // Without leases a lease read may be stale, by design: it is not checked.
    if (c.op.consistency == LEASE && !options_.leases) h.ambiguous = true;
  }
  Trace(absl::StrCat("client ", c.id, " seq ", sequence, " ok at revision ", revision));
  c.busy = false;
  if (options_.workload == Workload::kReads) {
    if (rows == nullptr) c.read_back_key = c.op.key;
    // No think time, but the next operation starts a microsecond later: one called at the
    // instant another returned counts as concurrent with it, and a read-back must follow the
    // write it reads back.
    Schedule(now_us_ + 1, EventKind::kClientWake, static_cast<uint32_t>(client_index), Message(), 0,
             sequence);
    return;
  }
  Schedule(now_us_ + workload_.Range(kThinkMinUs, kThinkMaxUs), EventKind::kClientWake,
           static_cast<uint32_t>(client_index), Message(), 0, sequence);
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

// ---------------------------------------------------------------------------------------
// Media: the blob channel and the passes, modelled on server/media.cc.

void World::OnMediaActor() {
  if (!clients_issue_) return;  // quiet after the faults stop
  Schedule(now_us_ + media_.Range(kMediaEveryMinUs, kMediaEveryMaxUs), EventKind::kMedia, 0);
  Host& h = hosts_[media_.Range(0, options_.replicas - 1)];
  if (!h.up || h.paused) return;
  const std::string key = absl::StrCat("m", media_.Range(0, kMediaKeys - 1));
  if (media_.Chance(1, 5)) {
    ClientRequest request;
    request.set_client_id(media_.Next() | 1);
    request.set_sequence(1);
    request.set_origin_replica(h.id);
    request.mutable_command()->mutable_delete_media()->set_database(kDatabase);
    request.mutable_command()->mutable_delete_media()->set_key(key);
    h.replica().Propose(std::move(request));
    DrainHost(h);
    return;
  }
  std::string content = absl::StrCat("blob ", media_.Range(0, 40), "/", media_.Next() % 7);
  const std::string sha = SimBlobName(content);
  // Stored on the origin first (synced), pinned while the upload is under way.
  Host::Blob& blob = h.blobs[sha];
  blob.content = content;
  blob.young_at_us = now_us_;
  ++h.pins[sha];
  const uint64_t id = next_upload_++;
  MediaUpload& upload = uploads_[id];
  upload.origin = h.id;
  upload.incarnation = h.incarnation;
  upload.key = key;
  upload.sha = sha;
  upload.holders.insert(h.id);
  upload.kept.insert(h.id);
  upload.deadline_us = now_us_ + kMediaUploadDeadlineUs;
  Trace(absl::StrCat("replica ", h.id, " takes upload ", id, " of ", key));
  if (static_cast<size_t>(options_.replicas) / 2 + 1 <= 1) ProposeMedia(h, id);
  for (const Host& peer : hosts_) {
    if (peer.id == h.id) continue;
    SendBlob(Packet(BlobPacket::Kind::kPush, h.id, peer.id, id, sha, content));
  }
}

void World::SendBlob(BlobPacket packet) {
  if (blocked_.count({packet.from, packet.to}) > 0) return;
  if (faults_on_ && media_.Chance(swarm_.drop_per_10k, 10'000)) return;
  int64_t delay = media_.Range(200, 3'000);
  if (faults_on_ && media_.Chance(swarm_.tail_delay_per_10k, 10'000)) delay *= media_.Range(5, 300);
  events_.push(Event{now_us_ + delay, next_seq_++, EventKind::kBlobDeliver, packet.to, Message(), 0,
                     0, std::make_shared<const BlobPacket>(std::move(packet))});
}

void World::OnBlob(Host& h, const BlobPacket& p) {
  using Kind = BlobPacket::Kind;
  auto reply = [&](Kind kind, bool has, std::string content = "") {
    SendBlob(Packet(kind, h.id, p.from, p.upload, p.sha, std::move(content), has));
  };
  switch (p.kind) {
    case Kind::kPush: {
      // Stored whole (hash checked, synced, renamed) before it is acknowledged; young.
      if (SimBlobName(p.content) != p.sha) return;
      Host::Blob& blob = h.blobs[p.sha];
      blob.content = p.content;
      blob.young_at_us = now_us_;
      return reply(Kind::kPushAck, true);
    }
    case Kind::kKeep: {
      auto it = h.blobs.find(p.sha);
      if (it != h.blobs.end()) it->second.young_at_us = now_us_;
      return reply(Kind::kKeepAck, it != h.blobs.end());
    }
    case Kind::kFetch: {
      auto it = h.blobs.find(p.sha);
      return reply(Kind::kFetchReply, it != h.blobs.end(),
                   it != h.blobs.end() ? it->second.content : "");
    }
    case Kind::kFetchReply: {
      if (!h.fetch_tries.contains(p.sha)) return;  // done, or a crash forgot it
      if (!p.has || SimBlobName(p.content) != p.sha) return FetchBlob(h, p.sha);  // another
      h.fetch_tries.erase(p.sha);
      Host::Blob& blob = h.blobs[p.sha];
      blob.content = p.content;
      blob.young_at_us = now_us_;
      return;
    }
    case Kind::kPushAck:
    case Kind::kKeepAck: {
      auto it = uploads_.find(p.upload);
      if (it == uploads_.end() || it->second.origin != h.id ||
          it->second.incarnation != h.incarnation || it->second.proposed || !p.has) {
        return;
      }
      MediaUpload& upload = it->second;
      const size_t majority = static_cast<size_t>(options_.replicas) / 2 + 1;
      if (p.kind == Kind::kPushAck) {
        const bool reached = upload.holders.size() >= majority;
        upload.holders.insert(p.from);
        if (reached || upload.holders.size() < majority) return;
        // A majority stored it: each holder makes its copy young again before the proposal.
        for (uint32_t holder : upload.holders) {
          if (holder == h.id) continue;
          SendBlob(Packet(Kind::kKeep, h.id, holder, p.upload, upload.sha));
        }
        return;
      }
      upload.kept.insert(p.from);
      if (upload.kept.size() >= majority) ProposeMedia(h, p.upload);
      return;
    }
  }
}

void World::ProposeMedia(Host& h, uint64_t upload_id) {
  MediaUpload& upload = uploads_.at(upload_id);
  if (upload.proposed) return;
  upload.proposed = true;
  h.blobs.at(upload.sha).young_at_us = now_us_;
  ClientRequest request;
  request.set_client_id(media_.Next() | 1);
  request.set_sequence(1);
  request.set_origin_replica(h.id);
  PutMedia* put = request.mutable_command()->mutable_put_media();
  put->set_database(kDatabase);
  put->set_key(upload.key);
  put->set_sha256(upload.sha);
  put->set_size_bytes(h.blobs.at(upload.sha).content.size());
  put->set_content_type("application/octet-stream");
  media_proposals_[{request.client_id(), request.sequence()}] = upload_id;
  h.replica().Propose(std::move(request));
  DrainHost(h);
}

// The upload is answered (or given up): its pin goes, and its blob is young again (a write
// that timed out may still be chosen later).
void World::EndUpload(uint64_t upload_id) {
  auto it = uploads_.find(upload_id);
  if (it == uploads_.end()) return;
  Host& h = hosts_[it->second.origin - 1];
  if (h.up && h.incarnation == it->second.incarnation) {
    auto blob = h.blobs.find(it->second.sha);
    if (blob != h.blobs.end()) blob->second.young_at_us = now_us_;
    if (--h.pins[it->second.sha] == 0) h.pins.erase(it->second.sha);
  }
  uploads_.erase(it);
}

void World::MediaApplied(Host& h, const CommittedEntry& c,
                         const std::vector<AppliedRequest>& applied) {
  if (static_cast<size_t>(c.value.requests_size()) != applied.size()) return;
  for (size_t i = 0; i < applied.size(); ++i) {
    const ClientRequest& request = c.value.requests(static_cast<int>(i));
    if (!request.command().has_put_media()) continue;
    const PutMedia& put = request.command().put_media();
    if (applied[i].result.code() == OK && !h.blobs.contains(put.sha256())) {
      FetchBlob(h, put.sha256());
    }
    if (request.origin_replica() != h.id) continue;
    auto proposal = media_proposals_.find({request.client_id(), request.sequence()});
    if (proposal == media_proposals_.end()) continue;
    if (applied[i].result.code() == OK) ++media_acknowledged_;
    EndUpload(proposal->second);
    media_proposals_.erase(proposal);
  }
}

void World::FetchBlob(Host& h, const std::string& sha) {
  if (options_.bugs.count("media-no-fetch") > 0) return;
  Host::FetchTry& fetch = h.fetch_tries[sha];
  if (fetch.tries >= options_.replicas) {  // every peer asked: the next pass tries again
    h.fetch_tries.erase(sha);
    return;
  }
  if (fetch.tries == 0) fetch.first_peer = media_.Range(0, options_.replicas - 1);
  const int tries = ++fetch.tries;
  fetch.asked_us = now_us_;
  const uint32_t peer =
      static_cast<uint32_t>((fetch.first_peer + tries - 1) % options_.replicas + 1);
  if (peer == h.id) return FetchBlob(h, sha);
  SendBlob(Packet(BlobPacket::Kind::kFetch, h.id, peer, 0, sha));
}

void World::MediaPass(Host& h) {
  h.next_media_pass_us = now_us_ + kMediaPassEveryUs;
  // Uploads whose answer never came (the proposal was lost, or timed out): given up.
  for (auto it = uploads_.begin(); it != uploads_.end();) {
    const uint64_t id = it->first;
    ++it;
    const MediaUpload& upload = uploads_.at(id);
    if (upload.origin == h.id && now_us_ >= upload.deadline_us) EndUpload(id);
  }
  absl::StatusOr<std::vector<StateMachine::MediaRecord>> media =
      h.sm->ListMedia(kDatabase, "", 1'000'000);
  if (!media.ok()) return;
  std::set<std::string> referenced;
  for (const StateMachine::MediaRecord& record : *media) referenced.insert(record.media.sha256());
  for (auto it = h.fetch_tries.begin(); it != h.fetch_tries.end();) {
    it = now_us_ - it->second.asked_us > kMediaFetchTimeoutUs ? h.fetch_tries.erase(it)
                                                              : std::next(it);
  }
  for (const std::string& sha : referenced) {
    if (!h.blobs.contains(sha) && !h.fetch_tries.contains(sha)) FetchBlob(h, sha);
  }
  // Collect only when caught up with what is known committed, under a known leader
  // (server/media.cc): a replica just restarted knows no leader, and its commit index is
  // only what it applied before the crash.
  const ReplicaStatus status = h.replica().Status();
  if (status.leader_id == 0 || h.sm->revision() < status.commit_index) return;
  if (options_.bugs.count("media-no-collection") > 0) return;
  const bool ignore_references = options_.bugs.count("media-gc-ignores-references") > 0;
  for (auto it = h.blobs.begin(); it != h.blobs.end();) {
    const bool collect = (ignore_references || !referenced.contains(it->first)) &&
                         !h.pins.contains(it->first) &&
                         it->second.young_at_us < now_us_ - kMediaGraceUs;
    if (collect) Trace(absl::StrCat("replica ", h.id, " collects blob ", it->first.substr(0, 8)));
    it = collect ? h.blobs.erase(it) : std::next(it);
  }
}

void World::MediaChecks() {
  uint64_t top = 0;
  for (const Host& h : hosts_) {
    if (h.up) top = std::max(top, h.sm->revision());
  }
  const Host* reference = nullptr;
  for (const Host& h : hosts_) {
    if (h.up && h.sm->revision() == top) reference = &h;
  }
  if (reference == nullptr) return;
  absl::StatusOr<std::vector<StateMachine::MediaRecord>> media =
      reference->sm->ListMedia(kDatabase, "", 1'000'000);
  if (!media.ok()) return Fail(absl::StrCat("media: ", media.status().ToString()));
  std::set<std::string> referenced;
  for (const StateMachine::MediaRecord& record : *media) {
    const std::string& sha = record.media.sha256();
    referenced.insert(sha);
    bool anywhere = false;
    for (const Host& h : hosts_) {
      auto blob = h.blobs.find(sha);
      if (blob == h.blobs.end()) continue;
      if (SimBlobName(blob->second.content) != sha) {
        return Fail(absl::StrCat("media: replica ", h.id, " holds blob ", sha.substr(0, 8),
                                 " with other bytes"));
      }
      anywhere = true;
    }
    if (!anywhere) {
      return Fail(absl::StrCat("media: dangling metadata: key ", record.media.key(), " (revision ",
                               record.revision, ") names blob ", sha.substr(0, 8),
                               ", which no replica holds"));
    }
    for (const Host& h : hosts_) {
      if (h.up && h.sm->revision() == top && !h.blobs.contains(sha)) {
        return Fail(absl::StrCat("media: replica ", h.id, " lacks blob ", sha.substr(0, 8),
                                 " of key ", record.media.key(), " after the faults stopped"));
      }
    }
  }
  for (const Host& h : hosts_) {
    if (!h.up || h.sm->revision() != top) continue;
    for (const auto& [sha, blob] : h.blobs) {
      if (!referenced.contains(sha) && !h.pins.contains(sha) &&
          blob.young_at_us < now_us_ - kMediaGraceUs - 2 * kMediaPassEveryUs) {
        return Fail(absl::StrCat("media: replica ", h.id, " keeps orphan blob ", sha.substr(0, 8),
                                 " after collection settled"));
      }
    }
  }
  Trace(absl::StrCat("media: ", media_acknowledged_, " uploads acknowledged, ", media->size(),
                     " keys at the end"));
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

}  // namespace

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

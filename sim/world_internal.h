#ifndef SYNOD_SIM_WORLD_INTERNAL_H_
#define SYNOD_SIM_WORLD_INTERNAL_H_

// The simulated world's parts, shared by its source files: world.cc (hosts, the driver's
// interfaces, the event loop, the final checks), faults.cc (network cuts, crashes, pauses,
// hostile clients, and the lease and leader-stability watches), workload.cc (clients and
// their operations), media_model.cc (blobs) and sim_disk.h (the disk). Nothing here is
// API: sim/world.h is.

#include <algorithm>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <queue>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

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
#include "sim/prng.h"
#include "sim/sim_disk.h"
#include "sim/world.h"

namespace synod::sim::internal {

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

// Revisions between divergence-check votes (core/divergence.h): small, so that every run
// votes many times.
constexpr uint64_t kCheckpointEveryRevisions = 16;
// Hostile mode: mean time between hostile actions (their SQL is in faults.cc).
constexpr int64_t kHostileEveryUs = 100'000;

// A blob's name in the simulation (media_model.cc).
std::string SimBlobName(std::string_view content);

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
int DriftBoundTicks(int lease_duration_ticks, int64_t max_drift_ppm);
Swarm DrawSwarm(Prng& p, int clients_option);

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

}  // namespace synod::sim::internal

#endif  // SYNOD_SIM_WORLD_INTERNAL_H_

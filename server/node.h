#ifndef SYNOD_SERVER_NODE_H_
#define SYNOD_SERVER_NODE_H_

// One synod-server process: a Replica and its StateMachine driven by a libuv loop, a
// durable log, SQLite files, the peer transport and the HTTP API. Everything runs on the
// loop's thread. See docs/operations.md.

#include <uv.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "adapters/file_database_opener.h"
#include "adapters/http_client.h"
#include "adapters/http_server.h"
#include "adapters/log_store.h"
#include "adapters/log_writer.h"
#include "adapters/peer_auth.h"
#include "adapters/snapshot_files.h"
#include "adapters/snapshot_image.h"
#include "core/divergence.h"
#include "core/driver.h"
#include "core/replica.h"
#include "core/state_machine.h"
#include "server/http_util.h"
#include "server/image_stager.h"
#include "server/media.h"
#include "server/peer_links.h"
#include "server/pending_requests.h"
#include "server/routes.h"

namespace synod::server {

struct NodeOptions {
  uint32_t id = 0;
  std::string listen_host = "127.0.0.1";
  int listen_port = 0;
  std::map<uint32_t, PeerAddress> peers;  // every replica, this one included
  std::string data_dir;
  bool fsync = true;
  std::string location;  // reported in status
  int tick_ms = 10;
  // A write or consistent read not answered within this long is answered 503: it may or
  // may not have been applied, and the client may retry.
  int request_timeout_ms = 5000;
  uint64_t snapshot_every_entries = 10000;  // applied entries between log compactions
  // Largest bodies: of a database upload (PUT /v1/db/{name}), and of the JSON endpoints
  // (exec, query, d3b; a 2 MiB value in base64). Measured here (optimized build, 3 replicas
  // on one machine): 2-3 MB uploads and values commit in 0.15-0.6 s, but an 8 MB one took
  // 2.5-3.5 s and set off elections, and 16 MB never committed: a large log entry is
  // re-sent before its first copy is acknowledged and copied several times on the loop
  // (the write-path and larger-than-memory issues).
  size_t max_body_bytes = 3 << 20;
  size_t max_json_body_bytes = 3 << 20;
  // Applied entries between divergence-check votes (core/divergence.h): each replica hashes
  // its whole state at every multiple of this revision.
  uint64_t checkpoint_every_entries = 1000;
  // For crash tests only: the process kills itself (SIGKILL) right after it applies the entry
  // at this revision, between SQLite's commit and the log's next fsync. 0: never.
  uint64_t testing_kill_after_apply = 0;
  // For tests only: false behaves as a version before peer streams (batches as POSTs only,
  // stream upgrades answered 404), to check that mixed versions work together.
  bool peer_streams = true;
  // A query still running after this long is interrupted and answered 503.
  int query_timeout_ms = 2000;
  // Every replica's shared secret (at least 32 bytes): peer messages are authenticated
  // with it (adapters/peer_auth.h).
  std::string cluster_secret;
  int http_request_timeout_ms = 30000;  // a client must send a whole request within this
  // (a streamed upload: within this plus its size at 256 KiB/s)
  // Media (server/media.h): the largest file, and the grace and period of the collection of
  // unreferenced blobs.
  uint64_t max_media_bytes = uint64_t{4} << 30;
  // The largest database upload streamed to disk (PUT /v1/db/{name} over max_body_bytes).
  uint64_t max_database_bytes = uint64_t{64} << 30;
  uint64_t media_gc_grace_ms = 60 * 60 * 1000;
  uint64_t media_gc_interval_ms = 60 * 1000;
  // Open HTTP connections at most; when full, the longest-idle one makes room. main() lowers
  // it below the file-descriptor limit, so that the cap, not the kernel, decides.
  size_t max_connections = 1024;
};

// The Node is the host driver's peer transport, state machine and client answers
// (core/driver.h); its log storage is a LogWriter.
class Node : private PeerTransport, private AppliedState, private ClientAnswers {
 public:
  Node(uv_loop_t* loop, NodeOptions options);
  ~Node() override;
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  // Opens the data directory (refusing to start on a corrupt log), then starts serving.
  absl::Status Start();
  // Stops accepting requests, finishes writing the log (fsync) and closes everything;
  // `done` runs on the loop once all handles are closed.
  void Stop(std::function<void()> done);

 private:
  struct RunningQuery;
  struct Counters {
    uint64_t requests = 0;
    uint64_t errors = 0;  // answered 5xx
    uint64_t response_us_total = 0;
    uint64_t writes = 0;
    uint64_t reads = 0;
    uint64_t queries_timed_out = 0;
    uint64_t queries_inline = 0;  // answered on the loop, without a worker
    uint64_t snapshots_refused = 0;
    uint64_t votes_skipped = 0;  // divergence votes not cast: the previous one was hashing
    uint64_t accepts_dropped_while_checking = 0;  // a snapshot was being checked
  };

  // The driver's interfaces.
  void Send(std::vector<Message> messages) override;
  void CheckSnapshot(const SnapshotToInstall& snapshot,
                     std::function<void(absl::Status)> done) override;
  // A log of an older version holds its snapshot's image: it moves to the snapshot store,
  // and the log is rewritten without it.
  absl::Status MoveSnapshotOutOfLog(LogStore& store);
  // Drops a Ready whose snapshot failed its check, and rebuilds the replica from the log.
  void RefuseSnapshot(const absl::Status& why) override;
  void InstallSnapshot(const SnapshotToInstall& snapshot) override;
  void Apply(CommittedEntry entry) override;
  void Answer(const ForwardReply& reply) override;

  Replica& replica() { return driver_->replica(); }
  void OnTick();
  void CatchUpTicks();
  void Drain();
  // Committed entries wait in to_apply_ and are applied in slices of about kApplySliceMs,
  // so that a run of costly entries does not hold the loop (heartbeats, /healthz, peers)
  // for their sum. `all` applies the whole queue (before a snapshot replaces the state).
  void ApplyQueued(bool all);
  void ApplyCommitted(const CommittedEntry& entry);
  // The divergence check's part of applying `entry`: votes it carries, and this replica's
  // own vote when the entry's revision is one the group hashes.
  void CheckDivergence(const CommittedEntry& entry);
  void MaybeCompact();
  // Authentic messages from a peer (PeerLinks), stepped into the replica.
  void StepPeerMessages(uint32_t from, const MessageBatch& batch);
  void ExpirePending();

  // HTTP.
  void Handle(const HttpRequest& request, std::shared_ptr<HttpResponder> responder);
  void Respond(const std::shared_ptr<HttpResponder>& responder, int status, std::string body,
               std::string content_type = "application/json");
  void RespondError(const std::shared_ptr<HttpResponder>& responder, int status,
                    absl::string_view code, absl::string_view message);
  // The API's routes (AddRoutes) and their handlers. A handler of /v1/db/{name}/... is
  // given the name checked.
  void AddRoutes();
  void HandleHealth(const HttpRequest& request, std::shared_ptr<HttpResponder> responder);
  void HandleReady(const HttpRequest& request, std::shared_ptr<HttpResponder> responder);
  void HandleStatus(const HttpRequest& request, std::shared_ptr<HttpResponder> responder);
  void HandleMetrics(const HttpRequest& request, std::shared_ptr<HttpResponder> responder);
  void HandleD3b(const HttpRequest& request, std::shared_ptr<HttpResponder> responder);
  void HandleListDatabases(const HttpRequest& request, std::shared_ptr<HttpResponder> responder);
  void HandleDescribeDatabase(const std::string& name, const HttpRequest& request,
                              std::shared_ptr<HttpResponder> responder);
  void HandleCreateDatabase(const std::string& name, const HttpRequest& request,
                            std::shared_ptr<HttpResponder> responder);
  void HandleDropDatabase(const std::string& name, const HttpRequest& request,
                          std::shared_ptr<HttpResponder> responder);
  void HandleExec(const std::string& name, const HttpRequest& request,
                  std::shared_ptr<HttpResponder> responder);
  void HandleQuery(const std::string& name, const HttpRequest& request,
                   std::shared_ptr<HttpResponder> responder);
  void HandleBackup(const std::string& name, const HttpRequest& request,
                    std::shared_ptr<HttpResponder> responder);
  // A database as GET /v1/db and GET /v1/db/{name} describe it.
  void AppendDatabaseJson(std::string* out, const std::string& name, uint64_t revision);

  // Proposes `command`; `on_result` runs when this replica applies it. A refusal or a
  // timeout is answered with its error and drops `on_result` unrun (PendingRequests).
  void ProposeWrite(Command command, std::shared_ptr<HttpResponder> responder,
                    std::function<void(const CommandResult&)> on_result);
  // Confirms a read at `consistency`, waits until `min_revision` is applied, then runs `run`.
  void ConsistentRead(Consistency consistency, uint64_t min_revision,
                      std::shared_ptr<HttpResponder> responder, std::function<void()> run);
  void ServeWaitingReads();
  // Runs a read-only `statement` on `name` on a worker thread (a reader connection, so the
  // loop and the apply connection never wait for it), interrupting it after
  // query_timeout_ms; `done` runs on the loop with the result.
  void RunQuery(const std::string& name, Statement statement,
                std::shared_ptr<HttpResponder> responder,
                std::function<void(const StatementResult&)> done);
  static void OnQueryWork(uv_work_t* work);
  static void OnQueryDone(uv_work_t* work, int status);
  // Starts writing this replica's own snapshot image on a worker thread, or records one
  // written, when it is time.
  void StartSnapshotBuild();
  // Hashes the state at `revision` (just applied) on a worker, then proposes the vote.
  void StartStateHash(uint64_t revision);
  static void OnSnapshotBuildDone(uv_work_t* work, int status);
  // GET /v1/db/{name}/backup once the read is confirmed: copies the database on a worker
  // thread and streams the copy (BackupCopy in node.cc).
  void StartBackup(const std::string& name, std::shared_ptr<HttpResponder> responder);
  static void CopyBackup(uv_work_t* work);
  static void OnBackupCopied(uv_work_t* work, int status);
  // Sends `response`, counted in status and metrics.
  void SendCounted(const std::shared_ptr<HttpResponder>& responder, HttpResponse response);
  // Unpacks and checks the image of `meta` from the snapshot store (staged_snapshot_).
  absl::Status StageSnapshot(const SnapshotMeta& meta);
  // Answers a query's result (or error), from the loop or from a worker.
  void AnswerQuery(const absl::StatusOr<StatementResult>& result, bool interrupted,
                   const std::shared_ptr<HttpResponder>& responder,
                   const std::function<void(const StatementResult&)>& done);
  void InterruptOverdueQueries();
  // Whether a PUT /v1/db/{name} is streamed into a blob and proposed by reference: its body
  // is over max_body_bytes, or of unknown size (chunked). Smaller images go by value.
  bool StreamsDatabaseUpload(const HttpRequest& head) const;
  // The database images the log entries this replica holds name by reference.
  std::set<std::string> LogImages();
  // The HTTP body limit of a request, from its method and target.
  size_t BodyLimit(std::string_view method, std::string_view target) const;
  size_t PeerBodyLimit() const;
  uint64_t NextClientId();

  uv_loop_t* loop_;
  NodeOptions options_;
  // Media blobs and their endpoints. Declared before pending_: a pending upload's callback
  // calls into it when it is dropped.
  std::unique_ptr<MediaService> media_;
  std::unique_ptr<LogWriter> log_;
  std::unique_ptr<SnapshotFiles> snapshots_;  // DIR/snapshots: the images the log names
  std::unique_ptr<FileDatabaseOpener> opener_;
  std::unique_ptr<ImageStager> stager_;  // the state machine takes images from it
  std::unique_ptr<StateMachine> sm_;
  ReplicaConfig replica_config_;
  std::unique_ptr<HostDriver> driver_;
  std::unique_ptr<PeerAuthenticator> peer_auth_;  // outlives links_ and media_
  // Declared before http_, so destroyed after it: the server's peer streams point at it.
  std::unique_ptr<PeerLinks> links_;
  std::unique_ptr<HttpServer> http_;
  RouteTable routes_;
  // No snapshot is tried before this revision (one failed: its image could not be written).
  uint64_t next_snapshot_attempt_ = 0;
  // The image of this replica's own snapshot is written on a worker thread (SnapshotBuild);
  // once written it waits here until the driver can record it (Compact).
  // A snapshot is put off while a peer catches up from the current one (MaybeCompact).
  static constexpr int64_t kSnapshotCatchupWindowMs = 120'000;
  // A catch-up of a large image at a few MB/s takes minutes, while a busy group applies
  // thousands of entries: the delay is bounded by the memory the log takes, not a time.
  static constexpr uint64_t kMaxSnapshotDelayIntervals = 100;
  static constexpr uint64_t kMaxSnapshotDelayBytes = uint64_t{256} << 20;
  uint64_t applied_bytes_since_snapshot_ = 0;       // of commands, since a snapshot was begun
  std::map<uint32_t, int64_t> snapshot_served_ms_;  // by peer: when a chunk was last sent
  std::map<uint32_t, uint64_t> peer_commit_index_;  // by peer: the highest it reported
  struct SnapshotBuild;
  struct SnapshotCheck;
  struct StateHashJob;
  bool hashing_state_ = false;  // a divergence vote's state hash is computed on a worker
  bool snapshot_building_ = false;
  std::optional<SnapshotMeta> built_snapshot_;
  std::atomic<bool> cancel_snapshot_build_{false};
  // Backups being copied or streamed: each holds a slot (BackupCopy::slot) until its body is
  // sent or its client leaves.
  struct BackupCopy;
  static constexpr size_t kMaxBackups = 2;
  // Free disk kept beside backups: this, or a fiftieth of the file system if more.
  static constexpr uint64_t kBackupReserveBytes = uint64_t{256} << 20;
  struct BackupUsage {
    size_t count = 0;    // backups being copied or sent
    uint64_t bytes = 0;  // the disk their copies hold
  };
  std::shared_ptr<BackupUsage> backups_ = std::make_shared<BackupUsage>();
  uint64_t backups_started_ = 0;
  std::string backup_dir_;  // in the snapshot store's stage, emptied at start
  std::atomic<bool> cancel_backups_{false};
  std::atomic<bool> cancel_snapshot_check_{false};  // set at Stop
  // A snapshot from a peer between CheckSnapshot and InstallSnapshot: its databases,
  // unpacked and checked.
  std::optional<SnapshotImages> staged_snapshot_;
  SnapshotMeta staged_meta_;
  std::unique_ptr<DivergenceCheck> divergence_;
  // Queries on worker threads: at most kMaxRunningQueries; more are answered 503. Each holds
  // a reader's file descriptors (main.cc keeps them in reserve).
  static constexpr size_t kMaxRunningQueries = 64;
  std::map<uint64_t, RunningQuery*> running_queries_;  // by id
  uint64_t last_query_id_ = 0;
  // Loop time spent on queries tried inline that needed a worker after all, in the window
  // that ends at inline_window_end_ms_.
  uint64_t inline_waste_us_ = 0;
  int64_t inline_window_end_ms_ = 0;
  uv_timer_t tick_timer_;
  uv_check_t drain_check_;
  // Runs while to_apply_ holds entries: the loop then polls without waiting, and Drain (a
  // check handle) applies the next slice after each round of I/O.
  uv_idle_t apply_idle_;
  std::deque<CommittedEntry> to_apply_;
  bool tick_timer_started_ = false;
  bool stopping_ = false;
  uint64_t client_nonce_ = 0;
  uint64_t client_counter_ = 0;
  int64_t now_ms_ = 0;
  int64_t last_tick_ms_ = 0;  // loop time of the last tick given to the replica
  PendingRequests pending_{[this](const std::shared_ptr<HttpResponder>& responder, int status,
                                  std::string_view code, std::string_view message) {
    RespondError(responder, status, absl::string_view(code.data(), code.size()),
                 absl::string_view(message.data(), message.size()));
  }};
  Counters counters_;
};

}  // namespace synod::server

#endif  // SYNOD_SERVER_NODE_H_

#include "server/node.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <random>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "adapters/file_body.h"
#include "adapters/file_util.h"
#include "core/check.h"
#include "core/log_codec.h"
#include "core/sqlite_util.h"
#include "server/api.pb.h"
#include "server/http_util.h"
#include "server/json.h"
#include "server/status.h"

namespace synod::server {

// A query on a worker thread. Owned by the uv_work_t callbacks: freed in OnQueryDone.
struct Node::RunningQuery {
  uv_work_t work;
  Node* node = nullptr;
  uint64_t id = 0;
  int64_t deadline_ms = 0;
  bool interrupted = false;
  std::unique_ptr<DatabaseReader> reader;
  Statement statement;
  absl::StatusOr<StatementResult> result = absl::UnknownError("not run");
  std::shared_ptr<HttpResponder> responder;
  std::function<void(const StatementResult&)> done;
};

namespace {

// Committed entries are applied for about this long at a time; then the loop handles its
// I/O (heartbeats, requests, peers) before the next slice.
constexpr uint64_t kApplySliceMs = 20;
// Applying one entry for longer than this is logged: it delays everything on the loop.
constexpr uint64_t kSlowApplyMs = 200;
// The nice value of the threads that run queries (the loop keeps the process's own).
constexpr int kQueryNice = 10;
// A query is first tried on the loop with this much work (SQLite VM steps, about 0.1-0.5 ms):
// a point read is answered at once, without two thread hand-offs. One that needs more is
// stopped and run again from the start on a worker. The loop time such tries waste is
// bounded: past kMaxInlineWasteUs in a window of kInlineWindowMs, queries go straight to
// the workers until the window ends.
constexpr int64_t kInlineQueryWorkUnits = 10'000;
constexpr uint64_t kMaxInlineWasteUs = 5'000;
constexpr int64_t kInlineWindowMs = 100;

// 64 bits from the system's entropy source, for the replica's PRNG and client ids.
uint64_t RandomSeed() {
  std::random_device entropy;
  return (static_cast<uint64_t>(entropy()) << 32) | entropy();
}

void AppendStatementResult(std::string* out, const StatementResult& r) {
  absl::StrAppend(out, "{\"rows_affected\":", r.rows_affected(),
                  ",\"last_insert_id\":", r.last_insert_id());
  if (r.columns_size() > 0) {
    out->append(",\"columns\":[");
    for (int i = 0; i < r.columns_size(); ++i) {
      if (i > 0) out->push_back(',');
      AppendJsonString(out, r.columns(i));
    }
    out->append("],\"rows\":[");
    for (int i = 0; i < r.rows_size(); ++i) {
      if (i > 0) out->push_back(',');
      out->push_back('[');
      for (int j = 0; j < r.rows(i).values_size(); ++j) {
        if (j > 0) out->push_back(',');
        AppendSqlValue(out, r.rows(i).values(j));
      }
      out->push_back(']');
    }
    out->push_back(']');
  }
  out->push_back('}');
}

// Rows as an array of objects keyed by column name (the d3b shape).
void AppendRowObjects(std::string* out, const StatementResult& r) {
  out->push_back('[');
  for (int i = 0; i < r.rows_size(); ++i) {
    if (i > 0) out->push_back(',');
    out->push_back('{');
    for (int j = 0; j < r.rows(i).values_size() && j < r.columns_size(); ++j) {
      if (j > 0) out->push_back(',');
      AppendJsonString(out, r.columns(j));
      out->push_back(':');
      AppendSqlValue(out, r.rows(i).values(j));
    }
    out->push_back('}');
  }
  out->push_back(']');
}

absl::StatusOr<Statement> ToStatement(
    const std::string& sql,
    const google::protobuf::RepeatedPtrField<google::protobuf::Value>& params) {
  if (sql.empty()) return absl::InvalidArgumentError("\"sql\" is required");
  Statement s;
  s.set_sql(sql);
  for (const google::protobuf::Value& p : params) {
    absl::StatusOr<SqlValue> v = SqlValueFromJson(p);
    if (!v.ok()) return v.status();
    *s.add_params() = *std::move(v);
  }
  return s;
}

}  // namespace

Node::Node(uv_loop_t* loop, NodeOptions options) : loop_(loop), options_(std::move(options)) {}

Node::~Node() = default;

uint64_t Node::NextClientId() {
  // Each HTTP request is its own client session (sequence 1): unique across replicas and
  // restarts through the random nonce drawn at start.
  return client_nonce_ + (++client_counter_);
}

absl::Status Node::Start() {
  SYNOD_CHECK(options_.peers.count(options_.id) == 1);
  if (options_.cluster_secret.size() < kClusterSecretBytesMin) {
    return absl::InvalidArgumentError(
        absl::StrCat("the cluster secret must have at least ", kClusterSecretBytesMin, " bytes"));
  }
  peer_auth_ = std::make_unique<PeerAuthenticator>(options_.cluster_secret);
  divergence_ = std::make_unique<DivergenceCheck>(options_.id, options_.peers.size(),
                                                  options_.checkpoint_every_entries);
  uv_timeval64_t start;
  SYNOD_CHECK(uv_gettimeofday(&start) == 0);
  const uint64_t start_unix_ms = static_cast<uint64_t>(start.tv_sec) * 1000 + start.tv_usec / 1000;
  // Peer sequences keep their top two bits for replies and the blob channel
  // (kReplySequenceBit, kBlobSequenceBit): the clock's milliseconds must fit in 42 bits
  // (until the year 2109).
  if (start_unix_ms >= PeerSequence::kStartUnixMsLimit / 4) {
    return absl::FailedPreconditionError(
        absl::StrCat("the wall clock reads ", start_unix_ms, " ms since 1970: set it right"));
  }
  absl::StatusOr<std::unique_ptr<LogStore>> log = LogStore::Open(
      options_.data_dir, LogStoreOptions{.fsync = options_.fsync, .after_log_fsync = nullptr});
  if (!log.ok()) {
    return absl::Status(
        log.status().code(),
        absl::StrCat("cannot open the log in ", options_.data_dir, ": ", log.status().message()));
  }
  std::unique_ptr<LogStore> store = std::move(*log);
  if (store->truncated_tail_bytes() > 0) {
    fprintf(stderr, "W the log ended in a torn write (%llu bytes, never acknowledged): dropped\n",
            static_cast<unsigned long long>(store->truncated_tail_bytes()));
  }
  absl::StatusOr<std::unique_ptr<FileDatabaseOpener>> opener =
      FileDatabaseOpener::Create(options_.data_dir, options_.fsync);
  if (!opener.ok()) return opener.status();
  opener_ = std::move(*opener);
  if (opener_->discarded_after_restart()) {
    fprintf(stderr,
            "W the machine restarted since this replica last ran: its databases may have lost "
            "their last commits, so they are rebuilt from the log (its snapshot and entries)\n");
  }
  // Database images named by reference are staged here before their entries apply.
  stager_ = std::make_unique<ImageStager>(
      loop_, absl::StrCat(options_.data_dir, "/staged-images"), [this] { return media_.get(); },
      options_.max_database_bytes);
  if (absl::Status staging = stager_->Start(); !staging.ok()) return staging;
  absl::StatusOr<std::unique_ptr<StateMachine>> sm =
      StateMachine::Open(opener_.get(), StateMachineOptions{.staged_images = stager_.get()});
  if (!sm.ok()) return sm.status();
  sm_ = std::move(*sm);

  const std::string snapshot_dir = absl::StrCat(options_.data_dir, "/snapshots");
  absl::StatusOr<std::unique_ptr<SnapshotFiles>> snapshots =
      SnapshotFiles::Open(snapshot_dir, options_.fsync);
  if (!snapshots.ok()) return snapshots.status();
  snapshots_ = std::move(*snapshots);
  if (absl::Status moved = MoveSnapshotOutOfLog(*store); !moved.ok()) return moved;
  // Backups under way when the process stopped left their copies here.
  absl::StatusOr<std::string> backup_dir = snapshots_->EmptyStageDir("backups");
  if (!backup_dir.ok()) return backup_dir.status();
  backup_dir_ = *std::move(backup_dir);
  PersistedState state = std::move(store->recovered());
  if (state.snapshot_meta.index() > 0) {
    if (absl::Status whole = snapshots_->Verify(state.snapshot_meta); !whole.ok()) {
      return absl::DataLossError(
          absl::StrCat("the log names the snapshot at revision ", state.snapshot_meta.index(),
                       ", whose image is missing or damaged (", whole.message(),
                       "): replace this replica (docs/operations.md)"));
    }
  }
  // Images no durable record names (one written or received just before a crash) go.
  snapshots_->Retain(state.snapshot_meta);
  // A snapshot persisted but not yet installed when the process stopped: install it now.
  if (sm_->revision() < state.snapshot_meta.index()) {
    if (absl::Status staged = StageSnapshot(state.snapshot_meta); !staged.ok()) return staged;
    absl::Status restored = sm_->RestoreSnapshotImages(*std::move(staged_snapshot_));
    staged_snapshot_.reset();
    snapshots_->RemoveStageDir("install");  // the unpacked copies are not needed now
    if (!restored.ok()) return restored;
  }
  state.applied_index = sm_->revision();

  ReplicaConfig& config = replica_config_;
  config.id = options_.id;
  for (const auto& [id, address] : options_.peers) config.replica_ids.push_back(id);
  // 10 ms ticks: elections after 0.5-1 s of silence, heartbeats every 100 ms.
  config.election_timeout_ticks = 50;
  config.heartbeat_interval_ticks = 10;
  config.retry_ticks = 20;
  config.lease_duration_ticks = 40;
  config.clock_drift_bound_ticks = 4;  // 10% of the lease, for commodity clocks
  config.request_timeout_ticks = options_.request_timeout_ms / options_.tick_ms;
  client_nonce_ = RandomSeed() & ~0xffffffffull;
  auto replica = std::make_unique<Replica>(config, std::move(state), RandomSeed());

  {
    PeerLinksOptions links;
    links.id = options_.id;
    links.peers = options_.peers;
    links.start_unix_ms = start_unix_ms;
    links.streams = options_.peer_streams;
    links.max_batch_bytes = options_.max_body_bytes;
    links.max_frame_bytes = PeerBodyLimit();
    // A peer that comes back (restarted, or reachable again) must hear from this replica
    // well within an election timeout, or it stands for election although a leader is
    // healthy: reconnection backs off to a quarter of the (shortest) election timeout at
    // most, with jitter (docs/consensus.md, "Timing").
    links.initial_backoff_ms = static_cast<uint64_t>(options_.tick_ms);
    links.max_backoff_ms =
        static_cast<uint64_t>(options_.tick_ms * config.election_timeout_ticks / 4);
    PeerLinksHost host;
    host.step = [this](uint32_t from, const MessageBatch& batch) { StepPeerMessages(from, batch); };
    host.drain = [this] { driver_->Drain(); };
    host.send = [this](const std::shared_ptr<HttpResponder>& responder, HttpResponse response) {
      SendCounted(responder, std::move(response));
    };
    host.random_seed = [] { return RandomSeed(); };
    links_ =
        std::make_unique<PeerLinks>(loop_, std::move(links), peer_auth_.get(), std::move(host));
  }
  MediaOptions media_options;
  media_options.id = options_.id;
  media_options.peers = options_.peers;
  media_options.blob_dir = absl::StrCat(options_.data_dir, "/blobs");
  media_options.fsync = options_.fsync;
  media_options.start_unix_ms = start_unix_ms;
  media_options.max_media_bytes = options_.max_media_bytes;
  media_options.max_json_bytes = options_.max_json_body_bytes;
  media_options.gc_grace_ms = options_.media_gc_grace_ms;
  media_options.gc_interval_ms = options_.media_gc_interval_ms;
  MediaHost media_host;
  media_host.propose = [this](Command command, std::shared_ptr<HttpResponder> responder,
                              std::function<void(const CommandResult&)> on_result) {
    ProposeWrite(std::move(command), std::move(responder), std::move(on_result));
  };
  media_host.read = [this](Consistency consistency, uint64_t min_revision,
                           std::shared_ptr<HttpResponder> responder, std::function<void()> run) {
    ConsistentRead(consistency, min_revision, std::move(responder), std::move(run));
  };
  media_host.send = [this](const std::shared_ptr<HttpResponder>& responder, HttpResponse response) {
    SendCounted(responder, std::move(response));
  };
  media_host.stopping = [this] { return stopping_; };
  media_host.log_images = [this] { return LogImages(); };
  media_host.check_image = [this](const std::string& sha256,
                                  std::function<void(absl::Status)> done) {
    stager_->Check(sha256, std::move(done));
  };
  media_host.drop_image = [this](const std::string& sha256) { stager_->Drop(sha256); };
  media_host.prestage_image = [this](const std::string& sha256) { stager_->Prestage(sha256); };
  media_host.caught_up = [this] {
    ReplicaStatus s = this->replica().Status();
    return s.leader_id != 0 && sm_->revision() >= s.commit_index;
  };
  media_host.d3b_command = [](std::string_view json,
                              const std::string& file_id) -> absl::StatusOr<Command> {
    api::D3bRequest body;
    if (absl::Status s = ParseJson(json, &body); !s.ok()) return s;
    if (body.media_op() != "upload") {
      return absl::InvalidArgumentError("a multipart d3b request has \"media_op\":\"upload\"");
    }
    if (!IsValidDatabaseName(body.table())) {
      return absl::InvalidArgumentError("\"table\" must name a database");
    }
    absl::StatusOr<Statement> statement = ToStatement(body.query(), body.args());
    if (!statement.ok()) return statement.status();
    // The file id the server assigned is the statement's last parameter.
    statement->add_params()->set_text(file_id);
    Command command;
    PutMedia* put = command.mutable_put_media();
    put->set_database(body.table());
    Execute* execute = put->mutable_execute();
    execute->set_database(body.table());
    execute->set_transaction(true);
    *execute->add_statements() = *std::move(statement);
    return command;
  };
  media_host.d3b_rows = [](const CommandResult& result) {
    std::string out;
    if (result.results_size() > 0) {
      AppendRowObjects(&out, result.results(0));
    } else {
      out = "[]";
    }
    return out;
  };
  media_host.state_machine = sm_.get();
  media_host.auth = peer_auth_.get();
  media_ = std::make_unique<MediaService>(loop_, std::move(media_options), std::move(media_host));
  if (absl::Status media = media_->Start(); !media.ok()) return media;

  AddRoutes();
  HttpServerLimits limits;
  // Every endpoint has its own limit below this one (BodyLimit); streamed uploads have theirs.
  limits.max_body_bytes = PeerBodyLimit();
  limits.max_body_bytes_for = [this](std::string_view method, std::string_view target) {
    return BodyLimit(method, target);
  };
  limits.stream_body_for = [this](const HttpRequest& head) -> size_t {
    if (MediaService::IsUpload(head.method, head.target) || MediaService::IsD3bUpload(head)) {
      return static_cast<size_t>(std::min<uint64_t>(media_->max_media_bytes(), SIZE_MAX));
    }
    if (StreamsDatabaseUpload(head)) {
      return static_cast<size_t>(std::min<uint64_t>(options_.max_database_bytes, SIZE_MAX));
    }
    return 0;
  };
  limits.request_timeout_ms = options_.http_request_timeout_ms;
  limits.max_connections = options_.max_connections;
  http_ = std::make_unique<HttpServer>(
      loop_, limits,
      [this](HttpRequest request, std::shared_ptr<Responder> r) {
        Handle(request, std::make_shared<HttpResponder>(std::move(r)));
      },
      [this](const HttpRequest& head, std::shared_ptr<Responder> r) {
        auto responder = std::make_shared<HttpResponder>(std::move(r));
        if (stopping_) {
          RespondError(responder, 503, "unavailable", "the server is stopping");
          return std::shared_ptr<HttpBodySink>();
        }
        if (StreamsDatabaseUpload(head)) {
          return media_->StartDatabaseUpload(head, PathSegments(head.target)[2],
                                             std::move(responder));
        }
        return MediaService::IsUpload(head.method, head.target)
                   ? media_->StartUpload(head, std::move(responder))
                   : media_->StartD3bUpload(head, std::move(responder));
      });
  http_->set_upgrade_handler([this](const HttpRequest& request, std::function<void()> close) {
    return links_->OpenStream(request, std::move(close));
  });
  absl::Status listening = http_->Listen(options_.listen_host, options_.listen_port);
  if (!listening.ok()) return listening;
  // Nothing fails from here on: the log writer's thread and loop handle, which must be
  // closed (Stop), start only now.
  log_ = std::make_unique<LogWriter>(loop_, std::move(store));
  driver_ = std::make_unique<HostDriver>(
      std::move(replica), log_.get(), snapshots_.get(), static_cast<PeerTransport*>(this),
      static_cast<AppliedState*>(this), static_cast<ClientAnswers*>(this));

  uv_timer_init(loop_, &tick_timer_);
  tick_timer_.data = this;
  uv_timer_start(
      &tick_timer_, [](uv_timer_t* t) { static_cast<Node*>(t->data)->OnTick(); }, options_.tick_ms,
      options_.tick_ms);
  tick_timer_started_ = true;
  // Group commit: requests and peer messages read in one loop iteration are stepped into
  // the replica as they arrive, and drained together after the I/O phase, so that they
  // share one Ready: one batch, one fsync, one round of messages.
  uv_check_init(loop_, &drain_check_);
  drain_check_.data = this;
  uv_check_start(&drain_check_, [](uv_check_t* c) { static_cast<Node*>(c->data)->Drain(); });
  uv_idle_init(loop_, &apply_idle_);
  now_ms_ = static_cast<int64_t>(uv_now(loop_));
  fprintf(stderr, "I replica %u serving on %s:%d, revision %llu, data in %s\n", options_.id,
          options_.listen_host.c_str(), http_->port(),
          static_cast<unsigned long long>(sm_->revision()), options_.data_dir.c_str());
  return absl::OkStatus();
}

void Node::Stop(std::function<void()> done) {
  stopping_ = true;
  cancel_snapshot_build_.store(true);
  cancel_backups_.store(true);
  cancel_snapshot_check_.store(true);
  for (auto& [id, query] : running_queries_) query->reader->Interrupt();
  if (tick_timer_started_) {
    uv_timer_stop(&tick_timer_);
    uv_close(reinterpret_cast<uv_handle_t*>(&tick_timer_), nullptr);
    tick_timer_started_ = false;
    uv_check_stop(&drain_check_);
    uv_close(reinterpret_cast<uv_handle_t*>(&drain_check_), nullptr);
    uv_idle_stop(&apply_idle_);
    uv_close(reinterpret_cast<uv_handle_t*>(&apply_idle_), nullptr);
  }
  if (media_) media_->Stop();
  if (stager_) stager_->Stop();
  if (log_) log_->Close();  // the last records made durable; nothing more is sent
  if (links_) links_->Stop();
  if (http_) {
    http_->Close(std::move(done));
  } else {
    done();
  }
}

// ---------------------------------------------------------------------------------------
// The core's loop: persist, send, apply, advance.

void Node::OnTick() {
  CatchUpTicks();
  Drain();
  ExpirePending();
  stager_->Expire(now_ms_);
}

void Node::CatchUpTicks() {
  // The replica's clock is its tick count, and leases are counted in ticks: after a stall
  // (a pause, a slow disk, a long request) it must see every tick that went by before it
  // handles anything else, or it would trust a lease that has run out.
  uv_update_time(loop_);
  now_ms_ = static_cast<int64_t>(uv_now(loop_));
  if (last_tick_ms_ == 0) last_tick_ms_ = now_ms_;
  int64_t missed_ticks = (now_ms_ - last_tick_ms_) / options_.tick_ms;
  last_tick_ms_ += missed_ticks * options_.tick_ms;
  // A few ticks late is the loop's ordinary jitter; more is a stall (a pause, a long entry
  // applied), after which the leader's heartbeats are waiting to be read: the replica gives
  // it a fresh election timeout instead of standing at once.
  constexpr int64_t kStallTicks = 5;
  if (missed_ticks > kStallTicks) {
    if (missed_ticks * options_.tick_ms >= static_cast<int64_t>(kSlowApplyMs)) {
      fprintf(stderr, "W the loop stalled for %lld ms\n",
              static_cast<long long>(missed_ticks * options_.tick_ms));
    }
    replica().TickAfterStall(missed_ticks);
  } else {
    for (int64_t i = 0; i < missed_ticks; ++i) replica().Tick();
  }
}

void Node::Drain() {
  if (stopping_) return;
  driver_->Drain();
  ApplyQueued(/*all=*/false);
}

// The driver's interfaces: the peer transport, the state machine and the client answers.

absl::Status Node::MoveSnapshotOutOfLog(LogStore& store) {
  std::string& image = store.legacy_snapshot_data();
  if (image.empty()) return absl::OkStatus();
  SnapshotMeta& meta = store.recovered().snapshot_meta;
  if (meta.checksum() == 0) meta.set_checksum(SnapshotChecksum(image));  // before checksums
  if (absl::Status kept = snapshots_->Adopt(meta, image); !kept.ok()) return kept;
  if (absl::Status rewritten = store.Rewrite(store.recovered()); !rewritten.ok()) {
    return rewritten;
  }
  fprintf(stderr, "I moved the snapshot at revision %llu (%zu bytes) out of the log into %s\n",
          static_cast<unsigned long long>(meta.index()), image.size(),
          snapshots_->PathOf(meta).c_str());
  image.clear();
  image.shrink_to_fit();
  return absl::OkStatus();
}

absl::Status Node::StageSnapshot(const SnapshotMeta& meta) {
  staged_snapshot_.reset();
  staged_meta_ = meta;
  absl::StatusOr<std::string> stage = snapshots_->EmptyStageDir("install");
  if (!stage.ok()) return stage.status();
  absl::StatusOr<SnapshotImages> images =
      StageSnapshotImage(snapshots_->PathOf(meta), *stage, meta.index());
  if (!images.ok()) return images.status();
  staged_snapshot_ = std::move(*images);
  return absl::OkStatus();
}

// A peer's image is unpacked and checked (integrity_check of every database: seconds for a
// large one) on a worker thread; the driver holds the snapshot's Ready meanwhile and the
// loop goes on (heartbeats are acknowledged, requests answered).
struct Node::SnapshotCheck {
  uv_work_t work;
  Node* node = nullptr;
  std::string image_path;
  std::string stage_dir;
  SnapshotMeta meta;
  std::function<void(absl::Status)> done;
  absl::StatusOr<SnapshotImages> images = absl::UnknownError("not checked");
  uint64_t started_ns = 0;
};

void Node::CheckSnapshot(const SnapshotToInstall& snapshot,
                         std::function<void(absl::Status)> done) {
  staged_snapshot_.reset();
  staged_meta_ = snapshot.meta;
  absl::StatusOr<std::string> stage = snapshots_->EmptyStageDir("install");
  if (!stage.ok()) return done(stage.status());
  auto* check = new SnapshotCheck();
  check->work.data = check;
  check->node = this;
  check->image_path = snapshots_->PathOf(snapshot.meta);
  check->stage_dir = *std::move(stage);
  check->meta = snapshot.meta;
  check->done = std::move(done);
  check->started_ns = uv_hrtime();
  SYNOD_CHECK_EQ(
      uv_queue_work(
          loop_, &check->work,
          [](uv_work_t* work) {
            // On a worker thread: the image file and the stage's files only.
            auto* c = static_cast<SnapshotCheck*>(work->data);
            c->images = StageSnapshotImage(c->image_path, c->stage_dir, c->meta.index(),
                                           &c->node->cancel_snapshot_check_);
          },
          [](uv_work_t* work, int status) {
            std::unique_ptr<SnapshotCheck> c(static_cast<SnapshotCheck*>(work->data));
            Node* node = c->node;
            // Stopping: nothing more is persisted, so no verdict is given.
            if (status != 0 || node->stopping_) return;
            fprintf(stderr, "I checked the snapshot at revision %llu in %llu ms: %s\n",
                    static_cast<unsigned long long>(c->meta.index()),
                    static_cast<unsigned long long>((uv_hrtime() - c->started_ns) / 1'000'000),
                    c->images.ok() ? "ok" : c->images.status().ToString().c_str());
            absl::Status verdict = c->images.status();
            if (verdict.ok()) node->staged_snapshot_ = *std::move(c->images);
            c->images = absl::UnknownError("moved");  // its handles close now
            c->done(verdict);
            node->Drain();
          }),
      0);
}

void Node::InstallSnapshot(const SnapshotToInstall& snapshot) {
  ApplyQueued(/*all=*/true);
  SYNOD_CHECK(staged_snapshot_.has_value() && staged_meta_.index() == snapshot.meta.index() &&
              staged_meta_.checksum() == snapshot.meta.checksum())
      << "a snapshot installed without its check";
  // A snapshot of this replica's own being written is of an older state now.
  cancel_snapshot_build_.store(true);
  const uint64_t start_ns = uv_hrtime();
  absl::Status restored = sm_->RestoreSnapshotImages(*std::move(staged_snapshot_));
  staged_snapshot_.reset();
  applied_bytes_since_snapshot_ = 0;
  snapshots_->RemoveStageDir("install");  // the unpacked copies are not needed now
  // CheckSnapshot accepted it (its schema, positions and bounds included): failing now is
  // the machine's (disk, memory).
  SYNOD_CHECK(restored.ok()) << "a checked snapshot does not restore: " << restored;
  SYNOD_CHECK_EQ(sm_->revision(), snapshot.meta.index());
  fprintf(stderr, "I installed a snapshot at revision %llu (%llu bytes) in %llu ms\n",
          static_cast<unsigned long long>(sm_->revision()),
          static_cast<unsigned long long>(snapshot.meta.size_bytes()),
          static_cast<unsigned long long>((uv_hrtime() - start_ns) / 1'000'000));
  media_->OnStateReplaced();  // the blobs the new state references are checked soon
}

void Node::Apply(CommittedEntry entry) { to_apply_.push_back(std::move(entry)); }

void Node::Answer(const ForwardReply& reply) {
  const PendingRequests::Key key{reply.client_id(), reply.sequence()};
  if (reply.code() == OK && reply.read_barrier()) {
    pending_.Answer(key, PendingRequests::Confirmed{reply.read_revision()});
  } else {
    pending_.Answer(key, PendingRequests::Refused{reply.code(), reply.message()});
  }
}

void Node::ApplyQueued(bool all) {
  const uint64_t start_ns = uv_hrtime();
  bool waiting = false;  // for a database image to be staged
  while (!to_apply_.empty()) {
    if (!stager_->Ready(to_apply_.front().value)) {
      waiting = true;
      break;
    }
    ApplyCommitted(to_apply_.front());
    to_apply_.pop_front();
    if (!all && uv_hrtime() - start_ns >= kApplySliceMs * 1'000'000) break;
  }
  if (all && waiting) {
    // The state is about to be replaced (a snapshot installed, or the replica rebuilt from
    // its log): what waits for an image is covered by the snapshot, or handed out again.
    fprintf(stderr,
            "W %zu committed entries from revision %llu were not applied before the state was "
            "replaced (a database image was still being staged)\n",
            to_apply_.size(), static_cast<unsigned long long>(to_apply_.front().slot));
    to_apply_.clear();
    stager_->Clear();
  }
  ServeWaitingReads();
  // `all` runs in the middle of a Ready (before a snapshot replaces the state): a snapshot
  // of this replica's own appended now would follow the Ready's records in the log, and an
  // older image after a newer one would win at recovery. The next Drain compacts.
  if (!all) MaybeCompact();
  if (to_apply_.empty() || waiting) {
    // Waiting for an image: the staging's completion (or its retry timer) wakes the loop.
    uv_idle_stop(&apply_idle_);
  } else {
    uv_idle_start(&apply_idle_, [](uv_idle_t*) {});
  }
}

void Node::RefuseSnapshot(const absl::Status& why) {
  ++counters_.snapshots_refused;
  staged_snapshot_.reset();
  snapshots_->RemoveStageDir("install");
  fprintf(stderr,
          "E refused a snapshot from a peer (%s): nothing of it was recorded; the replica restarts "
          "from its log and asks again\n",
          why.ToString().c_str());
  // The replica already counts the snapshot as installed (its log below it is gone from
  // memory): it is rebuilt from what is durable, exactly as after a crash. Requests it held
  // are answered 503 at their deadline. The entries it already handed out are applied
  // first: the rebuilt replica starts from the state machine's revision.
  ApplyQueued(/*all=*/true);
  LogStore& store = log_->Flush();
  absl::Status synced = store.Sync();
  SYNOD_CHECK(synced.ok()) << "log fsync failed: " << synced;
  absl::StatusOr<PersistedState> state = store.ReadBack();
  SYNOD_CHECK(state.ok()) << "log read-back failed: " << state.status();
  state->applied_index = sm_->revision();
  driver_->ReplaceReplica(
      std::make_unique<Replica>(replica_config_, *std::move(state), RandomSeed()));
}

void Node::CheckDivergence(const CommittedEntry& entry) {
  const bool was_diverged = divergence_->diverged().has_value();
  for (const ClientRequest& request : entry.value.requests()) {
    if (request.command().has_checkpoint()) divergence_->OnVote(request.command().checkpoint());
  }
  if (divergence_->WantsHashAt(entry.slot)) StartStateHash(entry.slot);
  if (!was_diverged && divergence_->diverged()) {
    const Divergence& d = *divergence_->diverged();
    fprintf(stderr,
            "E DIVERGED: at revision %llu this replica's state hash is %016llx but a majority "
            "of the group has %016llx; it stops serving reads. Re-sync it from a healthy "
            "replica (docs/operations.md, \"Divergence\").\n",
            static_cast<unsigned long long>(d.revision),
            static_cast<unsigned long long>(d.own_hash),
            static_cast<unsigned long long>(d.majority_hash));
  }
}

// The state hash a divergence vote carries reads every row of every database: on a worker
// thread, from read transactions begun at the revision voted on, while entries go on being
// applied. One at a time: a revision due while one is hashed gets no vote from this replica
// (a lost vote judges nothing).
struct Node::StateHashJob {
  uv_work_t work;
  Node* node = nullptr;
  uint64_t revision = 0;
  SnapshotView view;
  uint64_t hash = 0;
};

void Node::StartStateHash(uint64_t revision) {
  if (hashing_state_) {
    ++counters_.votes_skipped;
    return;
  }
  absl::StatusOr<SnapshotView> view = sm_->OpenSnapshotView();
  if (!view.ok()) {
    fprintf(stderr, "W no divergence vote at revision %llu: %s\n",
            static_cast<unsigned long long>(revision), view.status().ToString().c_str());
    ++counters_.votes_skipped;
    return;
  }
  SYNOD_CHECK_EQ(view->revision, revision);
  auto* job = new StateHashJob();
  job->work.data = job;
  job->node = this;
  job->revision = revision;
  job->view = *std::move(view);
  hashing_state_ = true;
  SYNOD_CHECK_EQ(uv_queue_work(
                     loop_, &job->work,
                     [](uv_work_t* work) {
                       auto* j = static_cast<StateHashJob*>(work->data);
                       j->hash = StateMachine::StateHashOf(j->view);
                     },
                     [](uv_work_t* work, int status) {
                       std::unique_ptr<StateHashJob> j(static_cast<StateHashJob*>(work->data));
                       Node* node = j->node;
                       node->hashing_state_ = false;
                       j->view.databases.clear();
                       if (status != 0 || node->stopping_) return;
                       ClientRequest vote;
                       vote.set_client_id(node->NextClientId());
                       vote.set_sequence(1);
                       *vote.mutable_command() = node->divergence_->VoteFor(j->revision, j->hash);
                       // No answer awaited: a lost vote judges nothing.
                       node->replica().Propose(std::move(vote));
                       node->Drain();
                     }),
                 0);
}

void Node::ApplyCommitted(const CommittedEntry& entry) {
  uint64_t start_ns = uv_hrtime();
  std::vector<AppliedRequest> applied = sm_->Apply(entry.slot, entry.value);
  stager_->Applied();
  applied_bytes_since_snapshot_ += entry.value.ByteSizeLong();
  if (options_.testing_kill_after_apply != 0 && entry.slot >= options_.testing_kill_after_apply) {
    fprintf(stderr, "I applied revision %llu: killing this process (--testing-kill-after-apply)\n",
            static_cast<unsigned long long>(entry.slot));
    raise(SIGKILL);
  }
  uint64_t took_ms = (uv_hrtime() - start_ns) / 1'000'000;
  if (took_ms >= kSlowApplyMs) {
    fprintf(stderr, "W applying entry %llu (%d requests) held the loop for %llu ms\n",
            static_cast<unsigned long long>(entry.slot), entry.value.requests_size(),
            static_cast<unsigned long long>(took_ms));
  }
  CheckDivergence(entry);
  media_->OnApplied(entry.value, applied);
  for (const AppliedRequest& a : applied) {
    if (a.origin_replica != options_.id) continue;
    pending_.Answer({a.client_id, a.sequence}, PendingRequests::Applied{a.result});
  }
}

struct Node::SnapshotBuild {
  uv_work_t work;
  Node* node = nullptr;
  SnapshotView view;
  std::string stage_path;
  std::string image_path;
  bool fsync = true;
  const std::atomic<bool>* cancel = nullptr;
  absl::StatusOr<SnapshotMeta> meta = absl::UnknownError("not written");
  uint64_t started_ns = 0;
};

void Node::MaybeCompact() {
  // An image written: recorded as soon as the driver takes it, dropped once another
  // snapshot has overtaken it.
  if (built_snapshot_) {
    const uint64_t index = built_snapshot_->index();
    if (index <= driver_->last_snapshot_index() || index <= replica().snapshot_index()) {
      snapshots_->Discard();
      built_snapshot_.reset();
    } else if (driver_->CanCompact(index)) {
      absl::Status published = snapshots_->Publish(*built_snapshot_);
      if (published.ok()) {
        // The image is durable under its name; its record goes to the log (the log writer's
        // thread), then the replica compacts, and the log's segments the snapshot covers
        // are deleted when its next Ready reports it.
        SYNOD_CHECK(driver_->Compact(*built_snapshot_));
      } else {
        fprintf(stderr, "W no snapshot at revision %llu: %s\n",
                static_cast<unsigned long long>(index), published.ToString().c_str());
        next_snapshot_attempt_ = sm_->revision() + options_.snapshot_every_entries;
        snapshots_->Discard();
      }
      built_snapshot_.reset();
    }
    return;
  }
  if (snapshot_building_ || stopping_ ||
      sm_->revision() < driver_->last_snapshot_index() + options_.snapshot_every_entries ||
      sm_->revision() < next_snapshot_attempt_ || !driver_->CanCompact(sm_->revision())) {
    return;
  }
  // A peer this replica sent a snapshot to recently catches up from it: it installs the
  // image (seconds for a large one), then asks for the entries after it. A new snapshot
  // now would start a transfer under way over, and the compaction would drop entries that
  // peer still lacks: a peer whose catch-up takes longer than the writes between two
  // snapshots would never catch up. So none is taken until each such peer reports a commit
  // index at this replica's revision, unless the log has grown by
  // kMaxSnapshotDelayIntervals intervals or kMaxSnapshotDelayBytes of applied commands (the
  // replica holds its log's entries in memory).
  if (sm_->revision() < driver_->last_snapshot_index() +
                            kMaxSnapshotDelayIntervals * options_.snapshot_every_entries &&
      applied_bytes_since_snapshot_ < kMaxSnapshotDelayBytes) {
    for (const auto& [peer, served_ms] : snapshot_served_ms_) {
      if (now_ms_ - served_ms < kSnapshotCatchupWindowMs &&
          peer_commit_index_[peer] < sm_->revision()) {
        return;
      }
    }
  }
  StartSnapshotBuild();
}

void Node::StartSnapshotBuild() {
  applied_bytes_since_snapshot_ = 0;
  absl::StatusOr<SnapshotView> view = sm_->OpenSnapshotView();
  if (absl::IsFailedPrecondition(view.status())) return;  // an entry is half applied
  absl::StatusOr<std::string> stage =
      view.ok() ? snapshots_->EmptyStageDir("build") : view.status();
  if (!stage.ok()) {
    // The log keeps growing until a snapshot can be taken: tried again after as many
    // entries as between snapshots, not at every entry.
    next_snapshot_attempt_ = sm_->revision() + options_.snapshot_every_entries;
    fprintf(stderr, "W no snapshot at revision %llu: %s\n",
            static_cast<unsigned long long>(sm_->revision()), stage.status().ToString().c_str());
    return;
  }
  auto* build = new SnapshotBuild();
  build->work.data = build;
  build->node = this;
  build->view = *std::move(view);
  build->stage_path = absl::StrCat(*stage, "/database.sqlite3");
  build->image_path = snapshots_->OwnTempPath();
  build->fsync = options_.fsync;
  cancel_snapshot_build_.store(false);
  build->cancel = &cancel_snapshot_build_;
  build->started_ns = uv_hrtime();
  snapshot_building_ = true;
  SYNOD_CHECK_EQ(uv_queue_work(
                     loop_, &build->work,
                     [](uv_work_t* work) {
                       // On a worker thread: the view's connections and the image's files.
                       auto* b = static_cast<SnapshotBuild*>(work->data);
                       b->meta = WriteSnapshotImage(b->view, b->stage_path, b->image_path, b->fsync,
                                                    b->cancel);
                       b->view.databases.clear();  // ends the read transactions
                     },
                     &Node::OnSnapshotBuildDone),
                 0);
}

void Node::OnSnapshotBuildDone(uv_work_t* work, int status) {
  std::unique_ptr<SnapshotBuild> build(static_cast<SnapshotBuild*>(work->data));
  Node* node = build->node;
  node->snapshot_building_ = false;
  build->view.databases.clear();
  if (status != 0 || node->stopping_ || !build->meta.ok()) {
    node->snapshots_->Discard();
    if (status == 0 && !node->stopping_ && !absl::IsCancelled(build->meta.status())) {
      node->next_snapshot_attempt_ = node->sm_->revision() + node->options_.snapshot_every_entries;
      fprintf(stderr, "W no snapshot at revision %llu: %s\n",
              static_cast<unsigned long long>(build->view.revision),
              build->meta.status().ToString().c_str());
    }
    return;
  }
  fprintf(stderr, "I wrote the snapshot at revision %llu (%llu bytes) in %llu ms\n",
          static_cast<unsigned long long>(build->meta->index()),
          static_cast<unsigned long long>(build->meta->size_bytes()),
          static_cast<unsigned long long>((uv_hrtime() - build->started_ns) / 1'000'000));
  node->built_snapshot_ = *build->meta;
  node->MaybeCompact();
}

void Node::Send(std::vector<Message> messages) {
  for (const Message& m : messages) {
    if (m.has_snapshot_chunk()) snapshot_served_ms_[m.to()] = now_ms_;
  }
  links_->Send(std::move(messages));
}

size_t Node::PeerBodyLimit() const {
  // A batch carries up to one client body's worth of messages, and a catch-up answer a few
  // MiB of entries plus one entry of any size: room for both, and the framing.
  return 2 * std::max(options_.max_body_bytes, options_.max_json_body_bytes) + (8 << 20);
}

bool Node::StreamsDatabaseUpload(const HttpRequest& head) const {
  if (head.method != "PUT") return false;
  const std::vector<std::string> path = PathSegments(head.target);
  if (path.size() != 3 || path[0] != "v1" || path[1] != "db") return false;
  uint64_t declared = 0;
  if (absl::SimpleAtoi(Header(head, "content-length"), &declared)) {
    return declared > options_.max_body_bytes;
  }
  return !Header(head, "transfer-encoding").empty();  // chunked: of unknown size
}

std::set<std::string> Node::LogImages() {
  std::set<std::string> images;
  const Replica& r = replica();
  for (uint64_t slot = r.snapshot_index() + 1; slot <= r.commit_index(); ++slot) {
    const Value* value = r.ChosenValue(slot);
    if (value == nullptr) continue;
    for (const ClientRequest& request : value->requests()) {
      if (request.command().has_create_database() &&
          !request.command().create_database().image_sha256().empty()) {
        images.insert(request.command().create_database().image_sha256());
      }
    }
  }
  return images;
}

size_t Node::BodyLimit(std::string_view method, std::string_view target) const {
  if (uint64_t media = media_->BodyLimit(method, target); media > 0) {
    return static_cast<size_t>(std::min<uint64_t>(media, SIZE_MAX));
  }
  std::string_view path = target.substr(0, target.find('?'));
  if (method == "POST" && path == "/internal/v1/messages") return PeerBodyLimit();
  if (method == "PUT" && path.starts_with("/v1/db/")) {
    return options_.max_body_bytes;  // a database image
  }
  if (method == "POST") return options_.max_json_body_bytes;
  return 0;  // GET, DELETE and the rest carry no body
}

void Node::ExpirePending() {
  InterruptOverdueQueries();
  pending_.Expire(now_ms_);
}

void Node::RunQuery(const std::string& name, Statement statement,
                    std::shared_ptr<HttpResponder> responder,
                    std::function<void(const StatementResult&)> done) {
  if (running_queries_.size() >= kMaxRunningQueries) {
    return RespondError(responder, 503, "unavailable",
                        absl::StrCat("over ", kMaxRunningQueries, " queries are running"));
  }
  absl::StatusOr<std::unique_ptr<DatabaseReader>> reader = sm_->AcquireReader(name);
  if (!reader.ok()) {
    bool missing = absl::IsNotFound(reader.status());
    return RespondError(responder, missing ? 404 : 503, missing ? "not_found" : "unavailable",
                        reader.status().message());
  }
  if (now_ms_ >= inline_window_end_ms_) {
    inline_window_end_ms_ = now_ms_ + kInlineWindowMs;
    inline_waste_us_ = 0;
  }
  if (inline_waste_us_ < kMaxInlineWasteUs) {
    const uint64_t start_ns = uv_hrtime();
    std::optional<absl::StatusOr<StatementResult>> result =
        (*reader)->TryQuery(statement, kInlineQueryWorkUnits);
    if (result.has_value()) {
      ++counters_.queries_inline;
      sm_->ReleaseReader(*std::move(reader));
      return AnswerQuery(*result, /*interrupted=*/false, responder, done);
    }
    inline_waste_us_ += (uv_hrtime() - start_ns) / 1000;
  }
  auto* query = new RunningQuery();
  query->work.data = query;
  query->node = this;
  query->id = ++last_query_id_;
  query->deadline_ms = now_ms_ + options_.query_timeout_ms;
  query->reader = *std::move(reader);
  query->statement = std::move(statement);
  query->responder = std::move(responder);
  query->done = std::move(done);
  running_queries_[query->id] = query;
  SYNOD_CHECK_EQ(uv_queue_work(loop_, &query->work, &Node::OnQueryWork, &Node::OnQueryDone), 0);
}

void Node::OnQueryWork(uv_work_t* work) {
  // On a worker thread: touches only the query's own reader and fields. Queries yield the
  // CPU to the loop thread (heartbeats, writes, /healthz): on Linux a thread has its own
  // nice value, and libuv's workers only ever run this kind of work here.
  static thread_local bool niced = [] {
    return setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), kQueryNice) == 0;
  }();
  (void)niced;
  auto* query = static_cast<RunningQuery*>(work->data);
  query->result = query->reader->Query(query->statement);
}

void Node::OnQueryDone(uv_work_t* work, int status) {
  std::unique_ptr<RunningQuery> query(static_cast<RunningQuery*>(work->data));
  Node* node = query->node;
  node->running_queries_.erase(query->id);
  node->sm_->ReleaseReader(std::move(query->reader));
  if (status != 0) {
    return node->RespondError(query->responder, 503, "unavailable", "the query was cancelled");
  }
  node->AnswerQuery(query->result, query->interrupted, query->responder, query->done);
}

void Node::AnswerQuery(const absl::StatusOr<StatementResult>& result, bool interrupted,
                       const std::shared_ptr<HttpResponder>& responder,
                       const std::function<void(const StatementResult&)>& done) {
  const absl::Status& error = result.status();
  if (result.ok()) return done(*result);
  if (absl::IsDeadlineExceeded(error) || interrupted) {
    ++counters_.queries_timed_out;
    return RespondError(responder, 503, "query_timeout",
                        absl::StrCat("the query ran for more than ", options_.query_timeout_ms,
                                     " ms (--query-timeout-ms)"));
  }
  if (absl::IsResourceExhausted(error)) {
    return RespondError(responder, 429, "resource_exhausted", error.message());
  }
  if (absl::IsInvalidArgument(error) || absl::IsFailedPrecondition(error)) {
    // FailedPrecondition: the database is damaged, reported as an exec reports it.
    return RespondError(responder, 400, "invalid_argument", error.message());
  }
  RespondError(responder, 500, "internal", error.message());
}

void Node::InterruptOverdueQueries() {
  for (auto& [id, query] : running_queries_) {
    if (query->interrupted || now_ms_ < query->deadline_ms) continue;
    query->interrupted = true;
    query->reader->Interrupt();
  }
}

void Node::ServeWaitingReads() { pending_.ServeReads(sm_->revision()); }

void Node::ProposeWrite(Command command, std::shared_ptr<HttpResponder> responder,
                        std::function<void(const CommandResult&)> on_result) {
  absl::Status valid = StateMachine::Validate(command);
  if (!valid.ok()) {
    return RespondError(responder, valid.code() == absl::StatusCode::kNotFound ? 404 : 400,
                        "invalid_argument", valid.message());
  }
  ++counters_.writes;
  ClientRequest request;
  request.set_client_id(NextClientId());
  request.set_sequence(1);
  *request.mutable_command() = std::move(command);
  uv_timeval64_t wall;
  SYNOD_CHECK(uv_gettimeofday(&wall) == 0);
  request.set_timestamp_unix_ms(wall.tv_sec * 1000 + wall.tv_usec / 1000);
  pending_.AddWrite({request.client_id(), request.sequence()}, std::move(responder),
                    now_ms_ + options_.request_timeout_ms, std::move(on_result));
  replica().Propose(std::move(request));  // drained after this loop iteration's I/O
}

void Node::ConsistentRead(Consistency consistency, uint64_t min_revision,
                          std::shared_ptr<HttpResponder> responder, std::function<void()> run) {
  ++counters_.reads;
  if (divergence_->diverged()) {
    return RespondError(responder, 503, "diverged",
                        "this replica's state differs from the group's (see /v1/status); "
                        "read from another replica");
  }
  const int64_t deadline_ms = now_ms_ + options_.request_timeout_ms;
  if (consistency == LOCAL) {
    pending_.AddLocalRead(std::move(responder), deadline_ms, min_revision, std::move(run));
    return ServeWaitingReads();
  }
  ClientRequest request;
  request.set_client_id(NextClientId());
  request.set_sequence(1);
  request.mutable_command()->mutable_read_barrier()->set_consistency(consistency);
  pending_.AddRead({request.client_id(), request.sequence()}, std::move(responder), deadline_ms,
                   min_revision, std::move(run));
  replica().Propose(std::move(request));  // drained after this loop iteration's I/O
}

// ---------------------------------------------------------------------------------------
// HTTP.

void Node::Respond(const std::shared_ptr<HttpResponder>& responder, int status, std::string body,
                   std::string content_type) {
  HttpResponse response;
  response.status = status;
  response.headers.push_back({"Content-Type", std::move(content_type)});
  response.body = std::move(body);
  SendCounted(responder, std::move(response));
}

void Node::RespondError(const std::shared_ptr<HttpResponder>& responder, int status,
                        absl::string_view code, absl::string_view message) {
  Respond(responder, status,
          ErrorJson(std::string_view(code.data(), code.size()),
                    std::string_view(message.data(), message.size())));
}

// A backup is copied with SQLite's backup API on a worker thread, from a read transaction
// begun on the loop at the revision the read was confirmed at, into a file in the snapshot
// store's stage; the worker then opens the copy and unlinks it (nothing is left behind
// whatever happens next), and the loop streams it to the client in pieces. Memory stays at
// a piece; disk holds one copy of the database per backup under way. At most kMaxBackups
// run at once, and none starts unless the disk keeps kBackupReserve free beside it.
struct Node::BackupCopy {
  uv_work_t work;
  Node* node = nullptr;
  Db view;
  std::string path;
  std::shared_ptr<HttpResponder> responder;
  std::shared_ptr<void> slot;  // counted in backups_ until the body is sent
  absl::Status copied;
  int fd = -1;  // the copy, opened and unlinked
  uint64_t bytes = 0;
};

void Node::StartBackup(const std::string& name, std::shared_ptr<HttpResponder> responder) {
  absl::StatusOr<Db> view = sm_->OpenDatabaseView(name);
  if (absl::IsNotFound(view.status())) {
    return RespondError(responder, 404, "not_found", view.status().message());
  }
  if (!view.ok()) {
    const bool transient = absl::IsUnavailable(view.status());
    return RespondError(responder, transient ? 503 : 500, transient ? "unavailable" : "internal",
                        view.status().message());
  }
  if (backups_->count >= kMaxBackups) {
    return RespondError(responder, 503, "unavailable",
                        absl::StrCat(kMaxBackups, " backups are under way; try again later"));
  }
  if (!responder->connection_open()) return;  // the client left while its read was confirmed
  // The copy must fit beside the other copies with room to spare: a full disk would stop
  // the log and the databases.
  absl::StatusOr<uint64_t> bytes = FileBytes(view->get());
  struct statvfs fs;
  if (!bytes.ok() || statvfs(backup_dir_.c_str(), &fs) != 0) {
    return RespondError(
        responder, 500, "internal",
        bytes.ok() ? "cannot read the free space of the data directory" : bytes.status().message());
  }
  const uint64_t free_bytes = static_cast<uint64_t>(fs.f_bavail) * fs.f_frsize;
  const uint64_t reserve = std::max<uint64_t>(
      kBackupReserveBytes, static_cast<uint64_t>(fs.f_blocks) * fs.f_frsize / 50);
  if (free_bytes < *bytes + backups_->bytes + reserve) {
    return RespondError(
        responder, 507, "insufficient_storage",
        absl::StrCat("a backup of ", *bytes, " bytes does not fit: ", free_bytes, " bytes free, ",
                     backups_->bytes, " held by other backups, ", reserve, " kept in reserve"));
  }
  auto* job = new BackupCopy();
  job->work.data = job;
  job->node = this;
  job->view = *std::move(view);
  job->path = absl::StrCat(backup_dir_, "/", ++backups_started_, ".sqlite3");
  job->responder = std::move(responder);
  // The slot gives its count and bytes back when the body is sent or dropped.
  ++backups_->count;
  backups_->bytes += *bytes;
  job->slot = std::shared_ptr<void>(nullptr, [usage = backups_, held = *bytes](void*) {
    --usage->count;
    usage->bytes -= held;
  });
  SYNOD_CHECK_EQ(uv_queue_work(loop_, &job->work, &Node::CopyBackup, &Node::OnBackupCopied), 0);
}

void Node::CopyBackup(uv_work_t* work) {
  // On a worker thread: the job's connection and file only.
  auto* job = static_cast<BackupCopy*>(work->data);
  job->copied = CopyDatabaseToFile(job->view.get(), job->path, &job->node->cancel_backups_);
  job->view.reset();  // ends the read transaction
  if (job->copied.ok()) {
    absl::StatusOr<int> opened = OpenFile(job->path, O_RDONLY);
    struct stat st;
    if (opened.ok() && fstat(*opened, &st) != 0) {
      const int error = errno;
      close(*opened);
      opened = OsError(error, job->path);
    }
    if (opened.ok()) {
      job->fd = *opened;
      job->bytes = static_cast<uint64_t>(st.st_size);
    }
    job->copied = opened.status();
  }
  // An open file lives on until its descriptor closes; a failed copy goes now (here, not on
  // the loop: freeing a large file's blocks takes a while).
  unlink(job->path.c_str());
}

void Node::OnBackupCopied(uv_work_t* work, int status) {
  std::unique_ptr<BackupCopy> job(static_cast<BackupCopy*>(work->data));
  Node* node = job->node;
  job->view.reset();
  absl::Status copied = job->copied;
  if (status != 0 || node->stopping_) copied = absl::UnavailableError("the server is stopping");
  if (!copied.ok()) {
    if (job->fd >= 0) CloseOnPool(node->loop_, job->fd);
    const bool full = absl::IsResourceExhausted(copied);
    const bool transient = absl::IsUnavailable(copied) || absl::IsCancelled(copied);
    return node->RespondError(job->responder,
                              full        ? 507
                              : transient ? 503
                                          : 500,
                              full        ? "insufficient_storage"
                              : transient ? "unavailable"
                                          : "internal",
                              absl::StrCat("the backup could not be made: ", copied.message()));
  }
  HttpResponse response;
  response.status = 200;
  response.headers.push_back({"Content-Type", "application/vnd.sqlite3"});
  response.body_source =
      FileBodySource::Create(node->loop_, job->fd, 0, job->bytes, std::move(job->slot));
  node->SendCounted(job->responder, std::move(response));
}

void Node::SendCounted(const std::shared_ptr<HttpResponder>& responder, HttpResponse response) {
  ++counters_.requests;
  if (response.status >= 500) ++counters_.errors;
  counters_.response_us_total += responder->ElapsedMicros();
  responder->Send(std::move(response));
}

void Node::AddRoutes() {
  using Args = std::vector<std::string>;
  // A handler of the request alone.
  auto plain = [this](void (Node::*handler)(const HttpRequest&, std::shared_ptr<HttpResponder>)) {
    return [this, handler](const HttpRequest& request, const Args&,
                           std::shared_ptr<HttpResponder> responder) {
      (this->*handler)(request, std::move(responder));
    };
  };
  // A handler of /v1/db/{name}/... (Handle refused a bad name before routing).
  auto database = [this](void (Node::*handler)(const std::string&, const HttpRequest&,
                                               std::shared_ptr<HttpResponder>)) {
    return [this, handler](const HttpRequest& request, const Args& args,
                           std::shared_ptr<HttpResponder> responder) {
      (this->*handler)(args[0], request, std::move(responder));
    };
  };
  routes_.Add("POST", "/", plain(&Node::HandleD3b));
  routes_.Add("GET", "/healthz", plain(&Node::HandleHealth));
  routes_.Add("GET", "/readyz", plain(&Node::HandleReady));
  routes_.Add("GET", "/metrics", plain(&Node::HandleMetrics));
  routes_.Add("GET", "/v1/status", plain(&Node::HandleStatus));
  routes_.Add("GET", "/v1/db", plain(&Node::HandleListDatabases));
  routes_.Add("GET", "/v1/db/{}", database(&Node::HandleDescribeDatabase));
  routes_.Add("PUT", "/v1/db/{}", database(&Node::HandleCreateDatabase));
  routes_.Add("DELETE", "/v1/db/{}", database(&Node::HandleDropDatabase));
  routes_.Add("POST", "/v1/db/{}/exec", database(&Node::HandleExec));
  routes_.Add("POST", "/v1/db/{}/query", database(&Node::HandleQuery));
  routes_.Add("GET", "/v1/db/{}/backup", database(&Node::HandleBackup));
  // Media: its uploads (PUT) stream in before this (MediaService::StartUpload).
  auto media = [this](const HttpRequest& request, const Args& args,
                      std::shared_ptr<HttpResponder> responder) {
    media_->Handle(request, args[0], args.size() > 1 ? args[1] : "", std::move(responder));
  };
  routes_.Add("GET", "/v1/db/{}/media", media);
  for (const char* method : {"GET", "HEAD", "DELETE"}) {
    routes_.Add(method, "/v1/db/{}/media/{}", media);
  }
  routes_.Add(
      "POST", "/internal/v1/blob",
      [this](const HttpRequest& request, const Args&, std::shared_ptr<HttpResponder> responder) {
        media_->HandlePeer(request, std::move(responder));
      });
}

void Node::Handle(const HttpRequest& request, std::shared_ptr<HttpResponder> responder) {
  if (stopping_) return RespondError(responder, 503, "unavailable", "the server is stopping");
  CatchUpTicks();
  if (links_->HandleHttp(request, responder)) return;  // the consensus messages and streams
  if (size_t limit = BodyLimit(request.method, request.target); request.body.size() > limit) {
    return RespondError(responder, 413, "payload_too_large",
                        absl::StrCat("the body is over ", limit, " bytes"));
  }
  const std::vector<std::string> path = PathSegments(request.target);
  // A bad database name is refused whatever the method or the rest of the path.
  if (path.size() >= 3 && path[0] == "v1" && path[1] == "db" && !IsValidDatabaseName(path[2])) {
    return RespondError(responder, 400, "invalid_argument",
                        "a database name is 1 to 64 of A-Z a-z 0-9 _ -");
  }
  RouteTable::Dispatched dispatched = routes_.Dispatch(request, path, responder);
  switch (dispatched.kind) {
    case RouteTable::Dispatched::kHandled:
      return;
    case RouteTable::Dispatched::kMethodNotAllowed: {
      HttpResponse response =
          JsonErrorResponse(405, "method_not_allowed",
                            absl::StrCat(request.method, " is not allowed on this path; it takes ",
                                         dispatched.allow));
      response.headers.emplace_back("Allow", dispatched.allow);
      return SendCounted(responder, std::move(response));
    }
    case RouteTable::Dispatched::kNotFound:
      return RespondError(responder, 404, "not_found",
                          absl::StrCat("no endpoint ", request.method, " ", request.target));
  }
}

void Node::HandleHealth(const HttpRequest&, std::shared_ptr<HttpResponder> responder) {
  Respond(responder, 200, "{\"ok\":true}");
}

void Node::HandleReady(const HttpRequest&, std::shared_ptr<HttpResponder> responder) {
  ReplicaStatus s = replica().Status();
  bool ready =
      s.leader_id != 0 && sm_->revision() + 16 >= s.commit_index && !divergence_->diverged();
  Respond(responder, ready ? 200 : 503, absl::StrCat("{\"ready\":", ready ? "true" : "false", "}"));
}

// A database as GET /v1/db and GET /v1/db/{name} describe it.
void Node::AppendDatabaseJson(std::string* out, const std::string& name, uint64_t revision) {
  absl::StatusOr<uint64_t> bytes = sm_->ImageBytes(name);
  *out += "{\"name\":";
  AppendJsonString(out, name);
  *out += ",\"id\":";
  AppendJsonString(out, DatabaseFileId(name));
  absl::StrAppend(out, ",\"size\":", bytes.ok() ? *bytes : 0, ",\"revision\":", revision, "}");
}

void Node::HandleListDatabases(const HttpRequest&, std::shared_ptr<HttpResponder> responder) {
  ConsistentRead(LINEARIZABLE, 0, responder, [this, responder] {
    std::string out = "{\"databases\":[";
    bool first = true;
    for (const auto& [name, revision] : sm_->ListDatabases()) {
      if (!first) out.push_back(',');
      first = false;
      AppendDatabaseJson(&out, name, revision);
    }
    absl::StrAppend(&out, "],\"revision\":", sm_->revision(), "}");
    Respond(responder, 200, out);
  });
}

void Node::StepPeerMessages(uint32_t from, const MessageBatch& batch) {
  CatchUpTicks();
  for (const Message& m : batch.messages()) {
    // What the peer says it has chosen, for MaybeCompact (the replica checks the rest).
    if (m.from() == from) {
      uint64_t& commit = peer_commit_index_[m.from()];
      commit = std::max(commit, m.commit_index());
    }
    // While a snapshot is checked (seconds for a large one) the driver holds the replica's
    // next Ready: accepted entries would pile up in memory meanwhile. They are dropped, as
    // a lost message is; the leader sends them again after.
    if (m.has_accept() && driver_->checking()) {
      ++counters_.accepts_dropped_while_checking;
      continue;
    }
    replica().Step(m);
  }
}

void Node::HandleDescribeDatabase(const std::string& name, const HttpRequest&,
                                  std::shared_ptr<HttpResponder> responder) {
  ConsistentRead(LINEARIZABLE, 0, responder, [this, name, responder] {
    for (const auto& [db, revision] : sm_->ListDatabases()) {
      if (db != name) continue;
      std::string out;
      AppendDatabaseJson(&out, name, revision);
      return Respond(responder, 200, out);
    }
    RespondError(responder, 404, "not_found", absl::StrCat("no database ", name));
  });
}

void Node::HandleCreateDatabase(const std::string& name, const HttpRequest& request,
                                std::shared_ptr<HttpResponder> responder) {
  Command c;
  c.mutable_create_database()->set_name(name);
  std::string type = Header(request, "content-type");
  if (!request.body.empty() || absl::StartsWith(type, "application/vnd.sqlite3")) {
    c.mutable_create_database()->set_image(request.body);
  }
  ProposeWrite(std::move(c), responder, [this, responder, name](const CommandResult& r) {
    if (r.code() != OK) {
      return RespondError(responder, HttpStatusFor(r.code()), CodeName(r.code()), r.message());
    }
    std::string out = "{\"name\":";
    AppendJsonString(&out, name);
    absl::StrAppend(&out, ",\"revision\":", r.revision(), "}");
    Respond(responder, 201, out);
  });
}

void Node::HandleDropDatabase(const std::string& name, const HttpRequest&,
                              std::shared_ptr<HttpResponder> responder) {
  Command c;
  c.mutable_drop_database()->set_name(name);
  ProposeWrite(std::move(c), responder, [this, responder](const CommandResult& r) {
    if (r.code() != OK) {
      return RespondError(responder, HttpStatusFor(r.code()), CodeName(r.code()), r.message());
    }
    Respond(responder, 204, "");
  });
}

void Node::HandleBackup(const std::string& name, const HttpRequest&,
                        std::shared_ptr<HttpResponder> responder) {
  ConsistentRead(LINEARIZABLE, 0, responder,
                 [this, name, responder] { StartBackup(name, responder); });
}

void Node::HandleExec(const std::string& name, const HttpRequest& request,
                      std::shared_ptr<HttpResponder> responder) {
  api::ExecRequest body;
  if (absl::Status s = ParseJson(request.body, &body); !s.ok()) {
    return RespondError(responder, 400, "bad_request", s.message());
  }
  if (body.statements_size() == 0) {
    return RespondError(responder, 400, "invalid_argument", "\"statements\" is empty");
  }
  Command c;
  Execute* e = c.mutable_execute();
  e->set_database(name);
  e->set_transaction(body.transaction());
  for (const api::StatementJson& s : body.statements()) {
    absl::StatusOr<Statement> st = ToStatement(s.sql(), s.params());
    if (!st.ok()) return RespondError(responder, 400, "invalid_argument", st.status().message());
    *e->add_statements() = *std::move(st);
  }
  ProposeWrite(std::move(c), responder, [this, responder](const CommandResult& r) {
    // On an error the body still lists the results of the statements that were applied
    // (without a transaction, those before the failing one) and the revision, so the client
    // can read its own writes with min_revision.
    std::string out;
    if (r.code() != OK) {
      std::string error = ErrorJson(CodeName(r.code()), r.message());
      out = error.substr(0, error.size() - 1) + ",";
    } else {
      out = "{";
    }
    out += "\"results\":[";
    for (int i = 0; i < r.results_size(); ++i) {
      if (i > 0) out.push_back(',');
      AppendStatementResult(&out, r.results(i));
    }
    absl::StrAppend(&out, "],\"revision\":", r.revision(), "}");
    Respond(responder, HttpStatusFor(r.code()), out);
  });
}

void Node::HandleQuery(const std::string& name, const HttpRequest& request,
                       std::shared_ptr<HttpResponder> responder) {
  api::QueryRequest body;
  if (absl::Status s = ParseJson(request.body, &body); !s.ok()) {
    return RespondError(responder, 400, "bad_request", s.message());
  }
  Consistency level = LINEARIZABLE;
  if (body.consistency() == "lease") {
    level = LEASE;
  } else if (body.consistency() == "local") {
    level = LOCAL;
  } else if (!body.consistency().empty() && body.consistency() != "linearizable") {
    return RespondError(responder, 400, "invalid_argument",
                        "consistency is linearizable, lease or local");
  }
  absl::StatusOr<Statement> st = ToStatement(body.sql(), body.params());
  if (!st.ok()) return RespondError(responder, 400, "invalid_argument", st.status().message());
  Statement statement = *std::move(st);
  ConsistentRead(level, body.min_revision(), responder, [this, name, statement, responder] {
    uint64_t revision = sm_->revision();
    RunQuery(name, statement, responder, [this, responder, revision](const StatementResult& r) {
      const StatementResult* rows = &r;
      std::string out = "{\"columns\":[";
      for (int i = 0; i < rows->columns_size(); ++i) {
        if (i > 0) out.push_back(',');
        AppendJsonString(&out, rows->columns(i));
      }
      out += "],\"rows\":[";
      for (int i = 0; i < rows->rows_size(); ++i) {
        if (i > 0) out.push_back(',');
        out.push_back('[');
        for (int j = 0; j < rows->rows(i).values_size(); ++j) {
          if (j > 0) out.push_back(',');
          AppendSqlValue(&out, rows->rows(i).values(j));
        }
        out.push_back(']');
      }
      absl::StrAppend(&out, "],\"revision\":", revision, "}");
      Respond(responder, 200, out);
    });
  });
}

void Node::HandleD3b(const HttpRequest& request, std::shared_ptr<HttpResponder> responder) {
  api::D3bRequest body;
  if (absl::Status s = ParseJson(request.body, &body); !s.ok()) {
    return RespondError(responder, 400, "bad_request", s.message());
  }
  if (!IsValidDatabaseName(body.table())) {
    return RespondError(responder, 400, "invalid_argument", "\"table\" must name a database");
  }
  if (!body.media_op().empty() || !body.file_id().empty()) {
    // "get" streams the file back after a linearizable metadata fetch; "delete" deletes it.
    if ((body.media_op() == "get" || body.media_op() == "delete") && !body.file_id().empty()) {
      HttpRequest media_request;
      media_request.method = body.media_op() == "get" ? "GET" : "DELETE";
      media_request.target = "/";
      for (const auto& [name, value] : request.headers) {
        if (name == "range" || name == "if-none-match")
          media_request.headers.emplace_back(name, value);
      }
      return media_->Handle(media_request, body.table(), body.file_id(), std::move(responder));
    }
    return RespondError(responder, 400, "invalid_argument",
                        body.media_op() == "upload"
                            ? "an upload is a multipart/form-data body with a \"json\" field "
                              "and a \"file\" part"
                            : "media_op is get or delete, with file_id");
  }
  absl::StatusOr<Statement> st = ToStatement(body.query(), body.args());
  if (!st.ok()) return RespondError(responder, 400, "invalid_argument", st.status().message());
  std::string head = absl::AsciiStrToLower(absl::StripLeadingAsciiWhitespace(body.query()));
  bool read = absl::StartsWith(head, "select") || absl::StartsWith(head, "with");
  std::string name = body.table();
  Statement statement = *std::move(st);
  if (read) {
    return ConsistentRead(LINEARIZABLE, 0, responder, [this, name, statement, responder] {
      RunQuery(name, statement, responder, [this, responder](const StatementResult& rows) {
        std::string out;
        AppendRowObjects(&out, rows);
        Respond(responder, 200, out);
      });
    });
  }
  Command c;
  c.mutable_execute()->set_database(name);
  c.mutable_execute()->set_transaction(true);
  *c.mutable_execute()->add_statements() = std::move(statement);
  ProposeWrite(std::move(c), responder, [this, responder](const CommandResult& r) {
    if (r.code() != OK) {
      return RespondError(responder, HttpStatusFor(r.code()), CodeName(r.code()), r.message());
    }
    std::string out;
    if (r.results_size() > 0) {
      AppendRowObjects(&out, r.results(0));
    } else {
      out = "[]";
    }
    Respond(responder, 200, out);
  });
}

void Node::HandleStatus(const HttpRequest&, std::shared_ptr<HttpResponder> responder) {
  StatusReport report{.id = options_.id,
                      .replica = replica().Status(),
                      .revision = sm_->revision(),
                      .location = options_.location,
                      .diverged = divergence_->diverged(),
                      .state_agreed_revision = divergence_->agreed_revision(),
                      .outvoted_replicas = divergence_->outvoted_replicas(),
                      .tick_ms = options_.tick_ms,
                      .requests = counters_.requests,
                      .errors = counters_.errors,
                      .response_us_total = counters_.response_us_total};
  Respond(responder, 200, StatusJson(report));
}

void Node::HandleMetrics(const HttpRequest&, std::shared_ptr<HttpResponder> responder) {
  ReplicaStatus s = replica().Status();
  MetricsText out;
  out.Gauge("synod_is_leader", "1 if this replica leads", s.role == Role::kLeader ? 1 : 0);
  out.Gauge("synod_leader_id", "the leader this replica knows (0: none)", s.leader_id);
  out.Gauge("synod_ballot_round", "the highest ballot round promised", s.ballot.round());
  out.Gauge("synod_revision", "the last applied log index", sm_->revision());
  out.Gauge("synod_commit_index", "the highest index known chosen", s.commit_index);
  out.Gauge("synod_snapshot_index", "the index of the latest snapshot", s.snapshot_index);
  out.Gauge("synod_diverged", "1 if a majority's state hash differs from this replica's",
            divergence_->diverged() ? 1 : 0);
  out.Gauge("synod_state_agreed_revision",
            "the last revision at which a majority's state hash matched this replica's",
            divergence_->agreed_revision());
  out.Gauge("synod_pending_requests", "requests queued in the replica", s.pending_requests);
  out.Counter("synod_http_requests_total", "HTTP requests answered", counters_.requests);
  out.Counter("synod_http_errors_total", "HTTP requests answered with 5xx", counters_.errors);
  out.Counter("synod_writes_total", "writes proposed", counters_.writes);
  out.Counter("synod_reads_total", "consistent and local reads", counters_.reads);
  out.Counter("synod_queries_timed_out_total", "queries interrupted at --query-timeout-ms",
              counters_.queries_timed_out);
  out.Counter("synod_queries_inline_total",
              "queries answered on the loop thread, cheap enough to need no worker",
              counters_.queries_inline);
  out.Counter("synod_log_writes_total", "log writes (one per persisted Ready or snapshot)",
              driver_->counters().persists);
  out.Counter("synod_log_syncs_total", "log writes made durable with an fdatasync",
              driver_->counters().synced);
  out.Counter("synod_divergence_votes_skipped_total",
              "divergence votes not cast: the state hash of the previous one was still running",
              counters_.votes_skipped);
  out.Counter("synod_accepts_dropped_while_checking_total",
              "accepts from the leader dropped while a snapshot was checked (sent again after)",
              counters_.accepts_dropped_while_checking);
  out.Counter("synod_snapshots_refused_total",
              "snapshots from peers refused whole before anything of them was kept",
              counters_.snapshots_refused);
  out.Counter("synod_peer_messages_rejected_total",
              "authenticated peer messages the core dropped as malformed or stale",
              s.rejected_message_count);
  out.Counter("synod_elections_started_total",
              "elections this replica stood in (ballots it raised) since it started",
              s.elections_started);
  out.Counter("synod_pre_votes_started_total",
              "times this replica asked whether it could win an election since it started",
              s.pre_votes_started);
  links_->AppendMetrics(&out);
  out.Gauge("synod_queries_running", "queries on worker threads", running_queries_.size());
  out.Counter("synod_http_response_microseconds_total", "time spent answering",
              counters_.response_us_total);
  out.Family("synod_peer_heartbeat_age_ms",
             "per peer, time since this replica last heard from it (-1: never)", "gauge");
  for (const auto& [id, heard_ticks] : s.peer_last_heard_ticks) {
    out.Sample("synod_peer_heartbeat_age_ms", "peer", std::to_string(id),
               heard_ticks < 0 ? -1 : heard_ticks * options_.tick_ms);
  }
  media_->AppendMetrics(&out);
  stager_->AppendMetrics(&out);
  Respond(responder, 200, out.text(), "text/plain; version=0.0.4");
}

}  // namespace synod::server

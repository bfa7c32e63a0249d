#include "server/media.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "adapters/file_body.h"
#include "adapters/file_util.h"
#include "core/check.h"
#include "core/sqlite_util.h"
#include "server/json.h"
#include "server/multipart.h"

namespace synod::server {
namespace {

// A push that has sent nothing for this long is dropped by its receiver.
constexpr int64_t kIncomingIdleMs = 60'000;
// Free disk an upload or a push leaves beside itself (the log and the databases need room).
constexpr uint64_t kReserveBytes = uint64_t{256} << 20;
// A chunked upload checks the free disk again every this many bytes.
constexpr uint64_t kSpaceCheckBytes = uint64_t{64} << 20;
// Fetches a client may wait on at once (beyond them, 503): each holds a chunk of memory.
constexpr size_t kMaxReadFetches = 16;
// The periodic timer's period; a pass runs every gc_interval_ms, and this long after the
// last one once a start or a snapshot install asks for one (to fetch what is missing).
constexpr uint64_t kTimerMs = 1000;
constexpr int64_t kWantedPassDelayMs = 2000;
constexpr size_t kDefaultListLimit = 100;
constexpr size_t kMaxListLimit = 1000;

// Debian's Abseil has its own string_view (docs/building.md): this crosses back.
std::string_view S(absl::string_view text) { return {text.data(), text.size()}; }

int64_t WallMs() {
  uv_timeval64_t now;
  SYNOD_CHECK(uv_gettimeofday(&now) == 0);
  return now.tv_sec * 1000 + now.tv_usec / 1000;
}

// The hash a client announced for its upload: Content-SHA256 (hex) or Digest: sha-256=
// (base64, RFC 3230). "" when none; InvalidArgument when one is malformed.
absl::StatusOr<std::string> AnnouncedSha256(const HttpRequest& head) {
  std::string hex = absl::AsciiStrToLower(Header(head, "content-sha256"));
  if (!hex.empty() && !IsSha256Hex(hex)) {
    return absl::InvalidArgumentError("Content-SHA256 must be 64 hex digits");
  }
  const std::string digest = Header(head, "digest");
  if (!digest.empty()) {
    std::string from_digest;
    for (absl::string_view part : absl::StrSplit(digest, ',')) {
      part = absl::StripAsciiWhitespace(part);
      if (part.size() < 8 || !absl::EqualsIgnoreCase(part.substr(0, 8), "sha-256=")) continue;
      std::string raw;
      if (!absl::Base64Unescape(part.substr(8), &raw) || raw.size() != 32) {
        return absl::InvalidArgumentError("Digest sha-256= must be 32 bytes in base64");
      }
      from_digest = absl::BytesToHexString(raw);
    }
    if (!from_digest.empty()) {
      if (!hex.empty() && hex != from_digest) {
        return absl::InvalidArgumentError("Digest and Content-SHA256 name different hashes");
      }
      hex = from_digest;
    }
  }
  return hex;
}

// The consistency and min_revision a read asks for in its query string.
absl::StatusOr<std::pair<Consistency, uint64_t>> ReadLevel(std::string_view target) {
  Consistency level = LINEARIZABLE;
  if (std::optional<std::string> c = QueryParameter(target, "consistency")) {
    if (*c == "lease") {
      level = LEASE;
    } else if (*c == "local") {
      level = LOCAL;
    } else if (*c != "linearizable") {
      return absl::InvalidArgumentError("consistency is linearizable, lease or local");
    }
  }
  uint64_t min_revision = 0;
  if (std::optional<std::string> r = QueryParameter(target, "min_revision")) {
    if (!absl::SimpleAtoi(*r, &min_revision)) {
      return absl::InvalidArgumentError("min_revision must be a revision number");
    }
  }
  return std::make_pair(level, min_revision);
}

struct ByteRange {
  uint64_t offset = 0;
  uint64_t length = 0;
};

// The single byte range a Range header asks of a body of `size` bytes: nullopt to serve the
// whole body (no header, or one this server ignores: several ranges, other units, bad
// syntax), OutOfRange when it cannot be satisfied.
absl::StatusOr<std::optional<ByteRange>> ParseRange(absl::string_view header, uint64_t size) {
  if (header.empty()) return std::nullopt;
  if (!absl::StartsWith(header, "bytes=")) return std::nullopt;
  absl::string_view spec = header.substr(6);
  if (spec.find(',') != absl::string_view::npos) return std::nullopt;
  const size_t dash = spec.find('-');
  if (dash == absl::string_view::npos) return std::nullopt;
  const absl::string_view first = absl::StripAsciiWhitespace(spec.substr(0, dash));
  const absl::string_view last = absl::StripAsciiWhitespace(spec.substr(dash + 1));
  auto number = [](absl::string_view text, uint64_t* value) {
    if (text.empty() || text.size() > 19) return false;
    for (char c : text) {
      if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return false;
    }
    return absl::SimpleAtoi(text, value);
  };
  uint64_t a = 0;
  uint64_t b = 0;
  if (first.empty()) {  // bytes=-n: the last n bytes
    if (!number(last, &b)) return std::nullopt;
    if (b == 0 || size == 0) return absl::OutOfRangeError("empty suffix range");
    const uint64_t length = std::min(b, size);
    return ByteRange{size - length, length};
  }
  if (!number(first, &a)) return std::nullopt;
  if (last.empty()) {
    b = size == 0 ? 0 : size - 1;
  } else {
    if (!number(last, &b) || b < a) return std::nullopt;
    b = std::min(b, size == 0 ? 0 : size - 1);
  }
  if (a >= size) return absl::OutOfRangeError("the range starts past the end");
  return ByteRange{a, b - a + 1};
}

// Whether an If-None-Match header matches the entity tag `etag` (weak comparison).
bool NoneMatch(absl::string_view header, absl::string_view etag) {
  for (absl::string_view tag : absl::StrSplit(header, ',')) {
    tag = absl::StripAsciiWhitespace(tag);
    if (absl::StartsWith(tag, "W/")) tag.remove_prefix(2);
    if (tag == "*" || tag == etag) return true;
  }
  return false;
}

void AppendMediaJson(std::string* out, const PutMedia& media, uint64_t revision) {
  *out += "{\"key\":";
  AppendJsonString(out, media.key());
  *out += ",\"sha256\":";
  AppendJsonString(out, media.sha256());
  absl::StrAppend(out, ",\"size\":", media.size_bytes(), ",\"content_type\":");
  AppendJsonString(out, media.content_type());
  absl::StrAppend(out, ",\"revision\":", revision, "}");
}

}  // namespace

// ---------------------------------------------------------------------------------------
// The parts.

// One upload: its body's sink, then the blob's way to a majority and its metadata's into the
// log. Holds one of kMaxUploads slots until it is answered or abandoned.
class MediaService::Upload : public HttpBodySink, public std::enable_shared_from_this<Upload> {
 public:
  Upload(MediaService* service, std::shared_ptr<HttpResponder> responder)
      : responder(std::move(responder)), started_ns(uv_hrtime()), service_(service) {
    ++service_->uploads_;
  }
  ~Upload() override { Release(); }

  void Write(std::string piece, std::function<void()> done) override {
    if (ended_) return done();
    if (database_image && header.size() < kImageHeaderBytes) {
      // A database image is refused at its first bytes when they are not an SQLite header.
      header.append(piece.substr(0, kImageHeaderBytes - header.size()));
      if (header.size() == kImageHeaderBytes) {
        if (absl::Status valid = CheckImageHeader(header); !valid.ok()) {
          Fail(valid, "invalid_argument");
          return done();
        }
      }
    }
    busy_ = true;
    auto self = shared_from_this();
    std::shared_ptr<BlobWriter> writer = this->writer;
    auto data = std::make_shared<std::string>(std::move(piece));
    auto status = std::make_shared<absl::Status>();
    const std::string dir = service_->store_->dir();
    BlobStore* store = service_->store_.get();
    service_->OnPool(
        [writer, data, status, store] {
          const uint64_t before = writer->size();
          if (before / kSpaceCheckBytes != (before + data->size()) / kSpaceCheckBytes) {
            absl::StatusOr<uint64_t> free = store->FreeBytes();
            if (free.ok() && *free < kReserveBytes + data->size()) {
              *status = absl::ResourceExhaustedError("the disk is nearly full");
              return;
            }
          }
          *status = writer->Append(*data);
        },
        [self, status, done = std::move(done)] {
          self->busy_ = false;
          if (self->ended_) {
            self->Discard();  // abandoned while the piece was written
          } else if (!status->ok()) {
            self->Fail(*status);
          }
          done();
        });
  }

  void Finish() override {
    if (ended_) return;
    if (database_image && header.size() < kImageHeaderBytes) {
      return Fail(
          absl::InvalidArgumentError("not an SQLite database: the SQLite header is missing"),
          "invalid_argument");
    }
    busy_ = true;
    auto self = shared_from_this();
    std::shared_ptr<BlobWriter> writer = this->writer;
    auto sha256 = std::make_shared<absl::StatusOr<std::string>>(absl::UnknownError("not run"));
    const std::string expected = expected_sha256;
    service_->OnPool([writer, sha256, expected] { *sha256 = writer->Commit(expected); },
                     [self, sha256] {
                       self->busy_ = false;
                       self->size = self->writer->size();
                       self->writer.reset();  // spent: its file is the blob now, or gone
                       if (self->ended_) return;
                       if (!sha256->ok()) return self->Fail(sha256->status());
                       self->sha256 = **sha256;
                       self->stored_ns = uv_hrtime();
                       self->service_->counters_.upload_bytes += self->size;
                       if (self->database_image) return self->service_->CheckImage(self);
                       self->service_->Replicate(self);
                     });
  }

  void Abort() override {
    if (ended_) return;
    ended_ = true;
    if (!busy_) Discard();
    Release();
  }

  // Answers an error: the upload stores nothing. `invalid_code` names an InvalidArgument.
  void Fail(const absl::Status& why, std::string_view invalid_code = "digest_mismatch") {
    if (ended_) return;
    ended_ = true;
    ++service_->counters_.uploads_refused;
    if (absl::IsResourceExhausted(why)) {
      service_->RespondError(responder, 507, "insufficient_storage", S(why.message()));
    } else if (absl::IsUnavailable(why)) {
      service_->RespondError(responder, 503, "unavailable", S(why.message()));
    } else if (absl::IsInvalidArgument(why)) {
      service_->RespondError(responder, 400, invalid_code, S(why.message()));
    } else {
      service_->RespondError(responder, 500, "internal", S(why.message()));
    }
    Discard();
    Release();
  }

  bool ended() const { return ended_; }

  // Gives the slot back (at once when answered, so that a client can upload again).
  void Release() {
    if (released_) return;
    released_ = true;
    --service_->uploads_;
    // A database image staged by its check and not applied: its copy goes (if the write
    // is applied after all, the image is staged again from the blob).
    if (image_staged && !applied) service_->host_.drop_image(sha256);
  }

  std::shared_ptr<HttpResponder> responder;
  std::shared_ptr<BlobWriter> writer;
  std::string database;
  std::string key;
  std::string content_type;
  std::string expected_sha256;
  // d3b: the statements that apply with the metadata, and the answer in d3b's shape.
  std::optional<synod::Execute> execute;
  bool d3b = false;
  // A database image (PUT /v1/db/{name}): the blob becomes database `database` by
  // reference (CreateDatabase.image_sha256), not media. Its first bytes, checked early.
  bool database_image = false;
  std::string header;
  bool image_staged = false;    // checked, and staged for this replica's apply
  bool checked = false;         // this replica's check of the image is done
  bool awaiting_check = false;  // a majority holds it: proposed once the check passes
  bool applied = false;         // its write was applied here
  // Once the body is stored: its hash and size, and where it is durable.
  std::string sha256;
  uint64_t size = 0;
  const uint64_t started_ns;
  uint64_t stored_ns = 0;  // when the body was stored here
  size_t stored_on = 1;    // this replica
  size_t failed_on = 0;
  std::vector<uint32_t> holders;  // peers that stored it
  bool decided = false;           // proposing, or refused
  bool cancelled = false;         // refused: its pushes stop
  size_t keeps_answered = 0;
  size_t kept_on = 1;  // this replica, pinned

 private:
  void Discard() {
    if (writer != nullptr) service_->DiscardOnPool(std::move(writer));
    writer.reset();
  }

  MediaService* const service_;
  bool busy_ = false;   // a pool job uses the writer
  bool ended_ = false;  // abandoned or answered: the body is no longer wanted
  bool released_ = false;
};

// One blob on its way to one peer, a chunk at a time.
struct MediaService::Push {
  ~Push() {
    if (fd >= 0) CloseOnPool(loop, fd);
  }
  uv_loop_t* loop = nullptr;
  std::shared_ptr<Upload> upload;
  uint32_t peer = 0;
  int fd = -1;
  uint64_t offset = 0;
  uint64_t length = 0;  // of the chunk in flight
  int wrong_offsets = 0;
  std::shared_ptr<std::string> chunk = std::make_shared<std::string>();
};

// One blob being fetched from the peers, one peer after another.
struct MediaService::Fetch {
  std::string sha256;
  uint64_t size = 0;
  std::vector<std::function<void(absl::Status)>> waiters;
  std::deque<uint32_t> peers_left;
  uint32_t peer = 0;
  std::shared_ptr<BlobWriter> writer;
  uint64_t offset = 0;
};

// A push being received from one peer.
struct MediaService::Incoming {
  std::shared_ptr<BlobWriter> writer;
  uint64_t size = 0;
  uint64_t next = 0;
  bool busy = false;
  int64_t last_ms = 0;
};

// One convergence and collection pass, run on the pool.
struct MediaService::Pass {
  Db view;
  BlobStore* store = nullptr;
  int64_t cutoff_unix_ms = 0;  // blobs last made young before this may go
  bool collect = false;
  std::map<std::string, uint64_t> referenced;
  std::set<std::string> retained;  // named by log entries: kept, not fetched
  size_t stored = 0;
  std::vector<std::pair<std::string, uint64_t>> missing;
  uint64_t removed = 0;
  absl::Status status;
};

// ---------------------------------------------------------------------------------------

MediaService::MediaService(uv_loop_t* loop, MediaOptions options, MediaHost host)
    : loop_(loop), options_(std::move(options)), host_(std::move(host)) {}

MediaService::~MediaService() = default;

absl::Status MediaService::Start() {
  absl::StatusOr<std::unique_ptr<BlobStore>> store =
      BlobStore::Open(options_.blob_dir, options_.fsync);
  if (!store.ok()) return store.status();
  store_ = std::move(*store);
  for (const auto& [id, address] : options_.peers) {
    if (id == options_.id) continue;
    HttpClientOptions client_options;
    client_options.request_timeout_ms = options_.peer_timeout_ms;
    client_options.max_response_bytes = kBlobChunkBytes + (64 << 10);
    client_options.max_queued_requests = 64;
    clients_[id] = std::make_unique<HttpClient>(loop_, address.host, address.port, client_options);
    request_sequences_.emplace(id, PeerSequence(options_.start_unix_ms));
    reply_sequences_.emplace(id, PeerSequence(options_.start_unix_ms));
    request_windows_[id];
    reply_windows_[id];
  }
  uv_timer_init(loop_, &pass_timer_);
  pass_timer_.data = this;
  uv_timer_start(
      &pass_timer_,
      [](uv_timer_t* timer) {
        auto* self = static_cast<MediaService*>(timer->data);
        self->ExpireIncoming();
        const int64_t now = static_cast<int64_t>(uv_now(self->loop_));
        const int64_t since = now - self->last_pass_ms_;
        if (since >= static_cast<int64_t>(self->options_.gc_interval_ms) ||
            (self->pass_wanted_ && since >= kWantedPassDelayMs)) {
          self->StartPass();
        }
      },
      kTimerMs, kTimerMs);
  pass_timer_started_ = true;
  started_ = true;
  pass_wanted_ = true;  // the first pass soon after start: what is missing, what is left
  std::random_device entropy;
  file_id_state_ = (static_cast<uint64_t>(entropy()) << 32) | entropy();
  return absl::OkStatus();
}

void MediaService::Stop() {
  stopped_ = true;
  if (pass_timer_started_) {
    uv_timer_stop(&pass_timer_);
    uv_close(reinterpret_cast<uv_handle_t*>(&pass_timer_), nullptr);
    pass_timer_started_ = false;
  }
  for (auto& [id, client] : clients_) client->Close();
}

void MediaService::OnPool(std::function<void()> work, std::function<void()> after) {
  struct Job {
    uv_work_t request;
    std::function<void()> work;
    std::function<void()> after;
  };
  auto* job = new Job{{}, std::move(work), std::move(after)};
  job->request.data = job;
  SYNOD_CHECK_EQ(uv_queue_work(
                     loop_, &job->request,
                     [](uv_work_t* request) { static_cast<Job*>(request->data)->work(); },
                     [](uv_work_t* request, int) {
                       std::unique_ptr<Job> done(static_cast<Job*>(request->data));
                       done->after();
                     }),
                 0);
}

void MediaService::DiscardOnPool(std::shared_ptr<BlobWriter> writer) {
  // Deleting a large temporary file takes the file system a while: not on the loop.
  auto held = std::make_shared<std::shared_ptr<BlobWriter>>(std::move(writer));
  OnPool([held] { held->reset(); }, [] {});
}

void MediaService::Respond(const std::shared_ptr<HttpResponder>& responder, int status,
                           std::string body) {
  HttpResponse response;
  response.status = status;
  response.headers.emplace_back("Content-Type", "application/json");
  response.body = std::move(body);
  host_.send(responder, std::move(response));
}

void MediaService::RespondError(const std::shared_ptr<HttpResponder>& responder, int status,
                                std::string_view code, std::string_view message) {
  Respond(responder, status, ErrorJson(code, message));
}

bool MediaService::IsUpload(std::string_view method, std::string_view target) {
  if (method != "PUT") return false;
  std::vector<std::string> path = PathSegments(std::string(target));
  return path.size() == 5 && path[0] == "v1" && path[1] == "db" && path[3] == "media";
}

uint64_t MediaService::BodyLimit(std::string_view method, std::string_view target) const {
  if (IsUpload(method, target)) return options_.max_media_bytes;
  std::string_view path = target.substr(0, target.find('?'));
  if (method == "POST" && path == "/internal/v1/blob") {
    return kBlobChunkBytes + (64 << 10) + PeerAuthenticator::kOverheadBytes;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------
// Upload.

std::shared_ptr<MediaService::Upload> MediaService::BeginUpload(
    const HttpRequest& head, const std::string& database, std::string_view key,
    std::shared_ptr<HttpResponder>& responder) {
  auto refuse = [&](int status, std::string_view code, std::string_view message) {
    ++counters_.uploads_refused;
    RespondError(responder, status, code, message);
    return nullptr;
  };
  if (!started_ || stopped_ || host_.stopping()) {
    return refuse(503, "unavailable", "the server is stopping");
  }
  if (!IsValidDatabaseName(database)) {
    return refuse(400, "invalid_argument", "a database name is 1 to 64 of A-Z a-z 0-9 _ -");
  }
  const bool image = key.empty();
  std::string content_type;
  if (!image) {
    if (!IsValidMediaKey(key)) {
      return refuse(400, "invalid_argument",
                    "a media key is 1 to 200 of A-Z a-z 0-9 . _ ~ - without '..'");
    }
    content_type = Header(head, "content-type");
    if (content_type.empty()) content_type = "application/octet-stream";
    if (!IsValidContentType(content_type)) {
      return refuse(400, "invalid_argument",
                    "a content type is 1 to 255 printable ASCII characters");
    }
  }
  absl::StatusOr<std::string> announced = AnnouncedSha256(head);
  if (!announced.ok()) return refuse(400, "invalid_argument", S(announced.status().message()));
  if (uploads_ >= kMaxUploads) {
    return refuse(503, "unavailable",
                  absl::StrCat(kMaxUploads, " uploads are under way on this replica; retry"));
  }
  // A declared length must fit beside the reserve (a database image twice: the blob, and
  // the database made of it); a chunked body is checked as it grows.
  uint64_t declared = 0;
  if (absl::SimpleAtoi(Header(head, "content-length"), &declared)) {
    const uint64_t needed = image ? 2 * declared : declared;
    absl::StatusOr<uint64_t> free = store_->FreeBytes();
    if (free.ok() && *free < needed + kReserveBytes) {
      return refuse(507, "insufficient_storage",
                    absl::StrCat("the upload needs ", needed, " bytes and ", *free, " are free; ",
                                 kReserveBytes, " must stay free"));
    }
  }
  absl::StatusOr<std::unique_ptr<BlobWriter>> writer = store_->NewWriter();
  if (!writer.ok()) return refuse(500, "internal", S(writer.status().message()));
  auto upload = std::make_shared<Upload>(this, std::move(responder));
  upload->writer = std::move(*writer);
  upload->database = database;
  upload->key = std::string(key);
  upload->content_type = std::move(content_type);
  upload->database_image = image;
  upload->expected_sha256 = *std::move(announced);
  return upload;
}

std::shared_ptr<HttpBodySink> MediaService::StartUpload(const HttpRequest& head,
                                                        std::shared_ptr<HttpResponder> responder) {
  std::vector<std::string> path = PathSegments(head.target);
  SYNOD_CHECK_EQ(path.size(), 5u);
  return BeginUpload(head, path[2], path[4], responder);
}

std::shared_ptr<HttpBodySink> MediaService::StartDatabaseUpload(
    const HttpRequest& head, const std::string& database,
    std::shared_ptr<HttpResponder> responder) {
  return BeginUpload(head, database, "", responder);
}

void MediaService::EnsureBlob(const std::string& sha256, uint64_t size_bytes,
                              std::function<void(absl::Status)> done) {
  if (stopped_) return done(absl::CancelledError("stopping"));
  FetchBlob(sha256, size_bytes, std::move(done));
}

// d3b's upload: the multipart body parsed as it arrives, its `file` part streamed into an
// Upload, its `json` field kept (small); at the end, the d3b request becomes the upload's
// statements, and the Upload goes on as any other.
class MediaService::D3bUpload : public HttpBodySink {
 public:
  D3bUpload(MediaService* service, std::shared_ptr<Upload> upload, std::string boundary)
      : service_(service),
        upload_(std::move(upload)),
        parser_(std::move(boundary),
                {.begin = [this](const MultipartParser::Part& part) { return Begin(part); },
                 .data = [this](std::string_view data) { return Data(data); },
                 .end = [this] { return End(); }}) {}

  void Write(std::string piece, std::function<void()> done) override {
    file_bytes_.clear();
    if (absl::Status parsed = parser_.Feed(piece); !parsed.ok()) {
      upload_->Fail(parsed, "bad_request");
      return done();
    }
    if (file_bytes_.empty()) return done();
    upload_->Write(std::move(file_bytes_), std::move(done));
    file_bytes_.clear();
  }

  void Finish() override {
    if (!parser_.done() || !saw_file_ || !saw_json_) {
      return upload_->Fail(
          absl::InvalidArgumentError("a d3b upload is a multipart body with a \"json\" field "
                                     "and a \"file\" part, each once, and its closing delimiter"),
          "bad_request");
    }
    absl::StatusOr<Command> command = service_->host_.d3b_command(json_, upload_->key);
    if (command.ok()) {
      // Checked as it will be proposed (its hash is not known yet: any will do here), so
      // that refused SQL is answered before the file is replicated.
      Command checked = *command;
      checked.mutable_put_media()->set_key(upload_->key);
      checked.mutable_put_media()->set_sha256(std::string(64, '0'));
      checked.mutable_put_media()->set_content_type(upload_->content_type);
      if (absl::Status valid = StateMachine::Validate(checked); !valid.ok()) command = valid;
    }
    if (!command.ok()) return upload_->Fail(command.status(), "invalid_argument");
    const PutMedia& put = command->put_media();
    upload_->database = put.database();
    upload_->execute = put.execute();
    upload_->Finish();
  }

  void Abort() override { upload_->Abort(); }

 private:
  absl::Status Begin(const MultipartParser::Part& part) {
    if (part.name == "json" && !saw_json_) {
      saw_json_ = in_json_ = true;
      return absl::OkStatus();
    }
    if (part.name == "file" && !saw_file_) {
      saw_file_ = in_file_ = true;
      if (!part.content_type.empty()) {
        if (!IsValidContentType(part.content_type)) {
          return absl::InvalidArgumentError(
              "the file's content type is 1 to 255 printable ASCII characters");
        }
        upload_->content_type = part.content_type;
      }
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(
        "a d3b upload has one \"json\" field and one \"file\" part, nothing else");
  }
  absl::Status Data(std::string_view data) {
    if (in_json_) {
      const uint64_t limit = service_->options_.max_json_bytes;
      if (json_.size() + data.size() > limit) {
        return absl::InvalidArgumentError(
            absl::StrCat("the json field is over ", limit, " bytes (--max-json-body-bytes)"));
      }
      json_.append(data.data(), data.size());
    } else if (in_file_) {
      file_bytes_.append(data.data(), data.size());
    }
    return absl::OkStatus();
  }
  absl::Status End() {
    in_json_ = in_file_ = false;
    return absl::OkStatus();
  }

  MediaService* const service_;
  std::shared_ptr<Upload> upload_;
  MultipartParser parser_;
  std::string json_;
  std::string file_bytes_;  // of the file part, from the piece being parsed
  bool saw_json_ = false, saw_file_ = false, in_json_ = false, in_file_ = false;
};

bool MediaService::IsD3bUpload(const HttpRequest& head) {
  if (head.method != "POST" || head.target.substr(0, head.target.find('?')) != "/") return false;
  // Any multipart type: StartD3bUpload refuses one that is not form-data with a boundary.
  return absl::StartsWith(absl::AsciiStrToLower(Header(head, "content-type")), "multipart/");
}

std::shared_ptr<HttpBodySink> MediaService::StartD3bUpload(
    const HttpRequest& head, std::shared_ptr<HttpResponder> responder) {
  absl::StatusOr<std::string> boundary = MultipartBoundary(Header(head, "content-type"));
  if (!boundary.ok()) {
    ++counters_.uploads_refused;
    RespondError(responder, 400, "bad_request", S(boundary.status().message()));
    return nullptr;
  }
  // The file's key: assigned here, 16 hex digits.
  file_id_state_ += 0x9e3779b97f4a7c15ull;
  uint64_t z = file_id_state_;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  char file_id[17];
  std::snprintf(file_id, sizeof(file_id), "%016llx", static_cast<unsigned long long>(z));
  HttpRequest upload_head;
  upload_head.method = "PUT";
  upload_head.target = absl::StrCat("/v1/db/d3b/media/", file_id);  // the database comes later
  // The request's own digest and type describe the multipart body, not the file.
  for (const auto& [name, value] : head.headers) {
    if (name != "digest" && name != "content-sha256" && name != "content-type") {
      upload_head.headers.emplace_back(name, value);
    }
  }
  std::shared_ptr<HttpBodySink> sink = StartUpload(upload_head, responder);
  if (sink == nullptr) return nullptr;  // answered
  auto upload = std::static_pointer_cast<Upload>(sink);
  upload->d3b = true;
  upload->content_type = "application/octet-stream";  // unless the file part names one
  return std::make_shared<D3bUpload>(this, std::move(upload), *std::move(boundary));
}

void MediaService::Replicate(std::shared_ptr<Upload> upload) {
  if (!store_->Pin(upload->sha256)) {
    store_->Unpin(upload->sha256);
    upload->decided = true;
    return upload->Fail(absl::InternalError("the stored blob vanished"));
  }
  if (stopped_ || host_.stopping()) {
    store_->Unpin(upload->sha256);
    upload->decided = true;
    return upload->Fail(absl::UnavailableError("the server is stopping"));
  }
  if (upload->stored_on >= majority()) {
    upload->decided = true;
    return ProposeUpload(upload);
  }
  std::vector<int> fds;
  for (size_t i = 0; i < clients_.size(); ++i) {
    absl::StatusOr<int> fd = store_->OpenForReading(upload->sha256);
    if (!fd.ok()) {
      for (int open : fds) CloseOnPool(loop_, open);
      store_->Unpin(upload->sha256);
      upload->decided = true;
      return upload->Fail(fd.status());
    }
    fds.push_back(*fd);
  }
  size_t next_fd = 0;
  for (const auto& [peer, client] : clients_) {
    const int fd = fds[next_fd++];
    auto push = std::make_shared<Push>();
    push->loop = loop_;
    push->upload = upload;
    push->peer = peer;
    push->fd = fd;
    PushChunk(push);
  }
}

void MediaService::PushChunk(std::shared_ptr<Push> push) {
  if (stopped_ || push->upload->cancelled) {
    return OnPushReply(push, absl::CancelledError("stopped"));
  }
  const uint64_t size = push->upload->size;
  push->length = std::min(kBlobChunkBytes, size - push->offset);
  auto status = std::make_shared<absl::Status>();
  const int fd = push->fd;
  const uint64_t offset = push->offset;
  const uint64_t length = push->length;
  std::shared_ptr<std::string> chunk = push->chunk;
  OnPool(
      [fd, offset, length, chunk, status] {
        absl::StatusOr<std::string> read = ReadAt(fd, offset, length, "a blob");
        if (!read.ok()) {
          *status = read.status();
        } else if (read->size() != length) {
          *status = absl::DataLossError("the blob is shorter than its size");
        } else {
          *chunk = *std::move(read);
        }
      },
      [this, push, status] {
        if (!status->ok()) return OnPushReply(push, *status);
        BlobRequest request;
        request.set_sha256(push->upload->sha256);
        api::BlobWrite* write = request.mutable_write();
        write->set_size_bytes(push->upload->size);
        write->set_offset(push->offset);
        write->set_data(std::move(*push->chunk));
        write->set_database_image(push->upload->database_image);
        push->chunk->clear();
        PostToPeer(push->peer, request, [this, push](absl::StatusOr<BlobReply> reply) {
          OnPushReply(push, std::move(reply));
        });
      });
}

void MediaService::OnPushReply(std::shared_ptr<Push> push, absl::StatusOr<BlobReply> reply) {
  Upload& upload = *push->upload;
  bool stored = false;
  bool failed = !reply.ok();
  if (reply.ok()) {
    switch (reply->status()) {
      case BlobReply::STORED:
        stored = true;
        break;
      case BlobReply::OK:
        if (reply->next_offset() == push->offset + push->length &&
            reply->next_offset() < upload.size) {
          push->offset = reply->next_offset();
          return PushChunk(push);
        }
        failed = true;
        break;
      case BlobReply::WRONG_OFFSET:
        if (++push->wrong_offsets <= 3 && reply->next_offset() < upload.size) {
          push->offset = reply->next_offset();
          return PushChunk(push);
        }
        failed = true;
        break;
      default:
        failed = true;
        break;
    }
  }
  if (failed && !upload.cancelled) {
    ++counters_.pushes_failed;
    fprintf(
        stderr, "W pushing blob %s to replica %u failed: %s\n", upload.sha256.c_str(), push->peer,
        reply.ok()
            ? absl::StrCat(BlobReply::Status_Name(reply->status()), " ", reply->message()).c_str()
            : std::string((reply.status().message())).c_str());
  }
  upload.stored_on += stored ? 1 : 0;
  upload.failed_on += failed ? 1 : 0;
  if (stored) upload.holders.push_back(push->peer);
  if (upload.decided) return;  // a push that goes on after the majority: for convergence
  const size_t peers = options_.peers.size();
  const size_t pending = peers - upload.stored_on - upload.failed_on;
  if (upload.stored_on >= majority()) {
    upload.decided = true;
    const uint64_t now = uv_hrtime();
    fprintf(stderr,
            "I media %s/%s: %llu bytes received and stored in %llu ms, on a majority %llu ms "
            "later\n",
            upload.database.c_str(), upload.key.c_str(),
            static_cast<unsigned long long>(upload.size),
            static_cast<unsigned long long>((upload.stored_ns - upload.started_ns) / 1'000'000),
            static_cast<unsigned long long>((now - upload.stored_ns) / 1'000'000));
    ConfirmUpload(push->upload);
  } else if (upload.stored_on + pending < majority()) {
    upload.decided = true;
    RefuseUpload(upload, absl::StrCat("only ", upload.stored_on, " of ", peers,
                                      " replicas could store the media, and a majority must; "
                                      "nothing was committed"));
  }
}

void MediaService::RefuseUpload(Upload& upload, std::string_view why) {
  upload.cancelled = true;
  store_->Unpin(upload.sha256);
  ++counters_.uploads_refused;
  RespondError(upload.responder, 503, "unavailable", why);
  upload.Release();
}

void MediaService::ConfirmUpload(std::shared_ptr<Upload> upload) {
  // A peer's copy is spared by its collection only while it is young: a push that ended
  // long ago (a slow peer, a large blob) may have aged past the grace. Each holder makes its
  // copy young now, and only those that still hold it count.
  const size_t holders = upload->holders.size();
  for (uint32_t peer : upload->holders) {
    BlobRequest request;
    request.set_sha256(upload->sha256);
    request.mutable_keep();
    PostToPeer(peer, request, [this, upload, holders](absl::StatusOr<BlobReply> reply) {
      ++upload->keeps_answered;
      if (upload->cancelled || upload->kept_on >= majority()) return;  // decided already
      if (reply.ok() && reply->status() == BlobReply::STORED) ++upload->kept_on;
      if (upload->kept_on >= majority()) return ProposeUpload(upload);
      if (upload->keeps_answered == holders) {
        RefuseUpload(*upload,
                     "the replicas that stored the media no longer hold it; nothing "
                     "was committed");
      }
    });
  }
}

void MediaService::CheckImage(std::shared_ptr<Upload> upload) {
  // The pushes start at once (Replicate pins the blob meanwhile), and the peers check their
  // copies as their pushes end (BlobWrite.database_image), while this replica checks its
  // own: the entry, once proposed, finds the image staged nearly everywhere. Nothing is
  // proposed before this replica's check passes (ProposeUpload waits for it).
  Replicate(upload);
  if (upload->ended() || upload->cancelled) return;  // refused already
  host_.check_image(upload->sha256, [this, upload](absl::Status verdict) {
    upload->checked = true;
    if (verdict.ok()) upload->image_staged = true;
    if (upload->ended() || upload->cancelled) {
      // Refused meanwhile (no majority), and answered: its checked copy is not wanted.
      if (verdict.ok()) host_.drop_image(upload->sha256);
      return;
    }
    if (verdict.ok() && (stopped_ || host_.stopping())) {
      verdict = absl::UnavailableError("the server is stopping");
      host_.drop_image(upload->sha256);
      upload->image_staged = false;
    }
    if (!verdict.ok()) {
      // An invalid image (400), or a check this replica could not make (503): its pushes
      // stop, and nothing is proposed.
      upload->cancelled = true;
      upload->decided = true;
      store_->Unpin(upload->sha256);  // Replicate's pin
      return upload->Fail(verdict, "invalid_argument");
    }
    if (upload->awaiting_check) ProposeUpload(upload);
  });
}

void MediaService::ProposeUpload(std::shared_ptr<Upload> upload) {
  Command command;
  if (upload->database_image) {
    // Proposed once this replica's check has passed too (CheckImage).
    if (upload->cancelled || upload->ended()) return;
    if (!upload->checked) {
      upload->awaiting_check = true;
      return;
    }
    synod::CreateDatabase* create = command.mutable_create_database();
    create->set_name(upload->database);
    create->set_image_sha256(upload->sha256);
    create->set_image_size_bytes(upload->size);
  } else {
    PutMedia* put = command.mutable_put_media();
    put->set_database(upload->database);
    put->set_key(upload->key);
    put->set_sha256(upload->sha256);
    put->set_size_bytes(upload->size);
    put->set_content_type(upload->content_type);
    if (upload->execute) *put->mutable_execute() = *upload->execute;
  }
  // Unpinned, and the slot given back, once the write is answered whichever way (applied,
  // refused, or timed out: the node drops the callback then, and this with it). Young
  // again as it is unpinned: a write that timed out may still commit later (a new leader
  // may choose it), and its blob must outlive that by the grace. (A database image's blob
  // is also spared while the log names it: MediaHost::log_images.)
  std::shared_ptr<void> release(nullptr, [this, upload](void*) {
    store_->Keep(upload->sha256);
    store_->Unpin(upload->sha256);
    upload->Release();
  });
  if (absl::Status valid = StateMachine::Validate(command); !valid.ok()) {
    return RespondError(upload->responder, 400, "invalid_argument", S(valid.message()));
  }
  store_->Keep(upload->sha256);  // this replica's copy, young as the peers' are
  ++(upload->database_image ? counters_.database_uploads : counters_.uploads);
  host_.propose(
      std::move(command), upload->responder, [this, upload, release](const CommandResult& result) {
        upload->applied = true;  // a database image's staged copy was taken
        if (result.code() != OK) {
          return RespondError(upload->responder, HttpStatusFor(result.code()),
                              CodeName(result.code()), result.message());
        }
        if (upload->database_image) {
          std::string out = "{\"name\":";
          AppendJsonString(&out, upload->database);
          absl::StrAppend(&out, ",\"revision\":", result.revision(), ",\"size\":", upload->size,
                          ",\"sha256\":\"", upload->sha256, "\"}");
          return Respond(upload->responder, 201, out);
        }
        if (upload->d3b) {
          std::string out = "{\"file_id\":";
          AppendJsonString(&out, upload->key);
          absl::StrAppend(&out, ",\"sha256\":\"", upload->sha256, "\",\"size\":", upload->size,
                          ",\"rows\":", host_.d3b_rows(result), "}");
          return Respond(upload->responder, 200, out);
        }
        std::string out = "{\"key\":";
        AppendJsonString(&out, upload->key);
        out += ",\"sha256\":";
        AppendJsonString(&out, upload->sha256);
        absl::StrAppend(&out, ",\"size\":", upload->size, ",\"content_type\":");
        AppendJsonString(&out, upload->content_type);
        absl::StrAppend(&out, ",\"revision\":", result.revision(), "}");
        Respond(upload->responder, 201, out);
      });
}

// ---------------------------------------------------------------------------------------
// The blob channel.

void MediaService::PostToPeer(uint32_t peer, const BlobRequest& request,
                              std::function<void(absl::StatusOr<BlobReply>)> done) {
  std::string payload;
  SYNOD_CHECK(request.SerializeToString(&payload));
  const uint64_t sequence = request_sequences_.at(peer).Next() | kBlobSequenceBit;
  std::string sealed = host_.auth->Seal(options_.id, peer, sequence, payload);
  clients_.at(peer)->Post(
      "/internal/v1/blob", std::move(sealed),
      [this, peer, done = std::move(done)](absl::StatusOr<HttpResponse> response) {
        if (!response.ok()) return done(response.status());
        if (response->status != 200) {
          return done(absl::UnavailableError(
              absl::StrCat("replica ", peer, " answered ", response->status)));
        }
        absl::StatusOr<OpenedFrame> frame = host_.auth->Open(response->body, options_.id);
        absl::Status admitted = frame.status();
        if (admitted.ok() && (frame->from_id != peer || (frame->sequence & kBlobSequenceBit) == 0 ||
                              (frame->sequence & kReplySequenceBit) == 0)) {
          admitted = absl::PermissionDeniedError("not a blob reply from the replica asked");
        }
        if (admitted.ok()) admitted = reply_windows_.at(peer).Admit(frame->sequence);
        if (!admitted.ok()) return done(admitted);
        BlobReply reply;
        if (!reply.ParseFromArray(frame->payload.data(), static_cast<int>(frame->payload.size()))) {
          return done(absl::InvalidArgumentError("not a blob reply"));
        }
        done(std::move(reply));
      });
}

void MediaService::Reply(uint32_t to, const BlobReply& reply,
                         const std::shared_ptr<HttpResponder>& responder) {
  std::string payload;
  SYNOD_CHECK(reply.SerializeToString(&payload));
  const uint64_t sequence = reply_sequences_.at(to).Next() | kBlobSequenceBit | kReplySequenceBit;
  HttpResponse response;
  response.headers.emplace_back("Content-Type", "application/octet-stream");
  response.body = host_.auth->Seal(options_.id, to, sequence, payload);
  host_.send(responder, std::move(response));
}

void MediaService::HandlePeer(const HttpRequest& request,
                              std::shared_ptr<HttpResponder> responder) {
  // Nothing of the body is decoded before it is authenticated (adapters/peer_auth.h).
  absl::StatusOr<OpenedFrame> frame = host_.auth->Open(request.body, options_.id);
  if (!frame.ok())
    return RespondError(responder, 401, "unauthenticated", S(frame.status().message()));
  if ((frame->sequence & kBlobSequenceBit) == 0 || (frame->sequence & kReplySequenceBit) != 0) {
    return RespondError(responder, 403, "forbidden", "not a blob request's frame");
  }
  auto window = request_windows_.find(frame->from_id);
  if (window == request_windows_.end()) {
    return RespondError(responder, 403, "forbidden", "the sender is not a peer of this replica");
  }
  if (absl::Status admitted = window->second.Admit(frame->sequence); !admitted.ok()) {
    return RespondError(responder, 409, "replayed", S(admitted.message()));
  }
  BlobRequest blob_request;
  if (!blob_request.ParseFromArray(frame->payload.data(),
                                   static_cast<int>(frame->payload.size())) ||
      !IsSha256Hex(blob_request.sha256())) {
    return RespondError(responder, 400, "bad_request", "not a blob request");
  }
  if (!started_ || stopped_) return RespondError(responder, 503, "unavailable", "stopping");
  if (blob_request.has_read()) return HandleBlobRead(frame->from_id, blob_request, responder);
  if (blob_request.has_keep()) {
    auto kept = std::make_shared<bool>(false);
    BlobStore* store = store_.get();
    const std::string sha256 = blob_request.sha256();
    const uint32_t from = frame->from_id;
    return OnPool([store, sha256, kept] { *kept = store->Keep(sha256, /*durable=*/true); },
                  [this, from, kept, responder] {
                    BlobReply reply;
                    reply.set_status(*kept ? BlobReply::STORED : BlobReply::NOT_FOUND);
                    Reply(from, reply, responder);
                  });
  }
  if (blob_request.has_write()) {
    return HandleBlobWrite(frame->from_id, std::move(blob_request), responder);
  }
  RespondError(responder, 400, "bad_request", "a blob request reads or writes");
}

void MediaService::HandleBlobRead(uint32_t from, const BlobRequest& request,
                                  std::shared_ptr<HttpResponder> responder) {
  BlobReply reply;
  std::optional<BlobInfo> info = store_->Stat(request.sha256());
  if (!info) {
    reply.set_status(BlobReply::NOT_FOUND);
    return Reply(from, reply, responder);
  }
  const uint64_t offset = request.read().offset();
  if (offset > info->size_bytes) {
    reply.set_status(BlobReply::FAILED);
    reply.set_message("the offset is past the end of the blob");
    return Reply(from, reply, responder);
  }
  const uint64_t length =
      std::min({request.read().max_bytes(), kBlobChunkBytes, info->size_bytes - offset});
  auto result = std::make_shared<absl::StatusOr<std::string>>(absl::UnknownError("not run"));
  const std::string path = store_->PathOf(request.sha256());
  OnPool(
      [path, offset, length, result] {
        absl::StatusOr<int> fd = OpenFile(path, O_RDONLY);
        if (!fd.ok()) {
          *result = fd.status();
          return;
        }
        *result = ReadAt(*fd, offset, length, path);
        close(*fd);
      },
      [this, from, result, responder, size = info->size_bytes] {
        BlobReply reply;
        if (result->ok()) {
          reply.set_status(BlobReply::OK);
          reply.set_size_bytes(size);
          reply.set_data(**std::move(result));
        } else {
          reply.set_status(absl::IsNotFound(result->status()) ? BlobReply::NOT_FOUND
                                                              : BlobReply::FAILED);
          reply.set_message(std::string((result->status().message())));
        }
        Reply(from, reply, responder);
      });
}

void MediaService::HandleBlobWrite(uint32_t from, BlobRequest request,
                                   std::shared_ptr<HttpResponder> responder) {
  const api::BlobWrite& write = request.write();
  const std::string& sha256 = request.sha256();
  BlobReply reply;
  auto answer = [&](BlobReply::Status status, uint64_t next, std::string message = "") {
    reply.set_status(status);
    reply.set_next_offset(next);
    reply.set_message(std::move(message));
    Reply(from, reply, responder);
  };
  if (write.size_bytes() > options_.max_media_bytes || write.data().size() > kBlobChunkBytes ||
      write.offset() > write.size_bytes() ||
      write.data().size() > write.size_bytes() - write.offset() ||
      (write.data().empty() && write.offset() != write.size_bytes())) {
    return answer(BlobReply::FAILED, 0, "a chunk outside the blob, or too large");
  }
  const auto id = std::make_pair(from, sha256);
  auto it = incoming_.find(id);
  if (write.offset() == 0) {
    if (store_->Keep(sha256, /*durable=*/true)) {
      if (it != incoming_.end() && !it->second.busy) {
        DiscardOnPool(std::move(it->second.writer));
        incoming_.erase(it);
      }
      if (write.database_image() && host_.prestage_image) host_.prestage_image(sha256);
      return answer(BlobReply::STORED, write.size_bytes());
    }
    if (it != incoming_.end()) {
      if (it->second.busy) return answer(BlobReply::FAILED, 0, "a chunk is being written");
      DiscardOnPool(std::move(it->second.writer));  // the sender starts again
      incoming_.erase(it);
    }
    if (incoming_.size() >= kMaxIncoming) {
      return answer(BlobReply::FAILED, 0, "too many blobs being received");
    }
    absl::StatusOr<uint64_t> free = store_->FreeBytes();
    if (free.ok() && *free < write.size_bytes() + kReserveBytes) {
      return answer(BlobReply::NO_SPACE, 0,
                    absl::StrCat(*free, " bytes free, ", write.size_bytes(), " needed"));
    }
    absl::StatusOr<std::unique_ptr<BlobWriter>> writer = store_->NewWriter();
    if (!writer.ok()) return answer(BlobReply::FAILED, 0, std::string((writer.status().message())));
    Incoming& fresh = incoming_[id];
    fresh.writer = std::move(*writer);
    fresh.size = write.size_bytes();
    it = incoming_.find(id);
  } else if (it == incoming_.end() || it->second.busy || it->second.next != write.offset() ||
             it->second.size != write.size_bytes()) {
    return answer(
        BlobReply::WRONG_OFFSET,
        it == incoming_.end() || it->second.size != write.size_bytes() ? 0 : it->second.next);
  }
  Incoming& in = it->second;
  in.busy = true;
  in.last_ms = static_cast<int64_t>(uv_now(loop_));
  const bool last = write.offset() + write.data().size() == write.size_bytes();
  const bool image = write.database_image();
  std::shared_ptr<BlobWriter> writer = in.writer;
  const uint64_t next = write.offset() + write.data().size();
  auto data = std::make_shared<std::string>(std::move(*request.mutable_write()->mutable_data()));
  auto status = std::make_shared<absl::Status>();
  OnPool(
      [writer, data, status, last, sha256] {
        *status = writer->Append(*data);
        if (status->ok() && last) *status = writer->Commit(sha256).status();
      },
      [this, id, status, last, from, responder, next, image, sha256] {
        auto found = incoming_.find(id);
        const bool known = found != incoming_.end();
        if (known) {
          found->second.busy = false;
          if (status->ok()) found->second.next = next;
        }
        BlobReply reply;
        reply.set_next_offset(next);
        if (!status->ok()) {
          reply.set_status(absl::IsResourceExhausted(*status) ? BlobReply::NO_SPACE
                           : absl::IsInvalidArgument(*status) ? BlobReply::HASH_MISMATCH
                                                              : BlobReply::FAILED);
          reply.set_message(std::string((status->message())));
        } else {
          reply.set_status(last ? BlobReply::STORED : BlobReply::OK);
          if (last && image && host_.prestage_image) host_.prestage_image(sha256);
        }
        if (known && (last || !status->ok())) {
          DiscardOnPool(std::move(found->second.writer));
          incoming_.erase(found);
        }
        Reply(from, reply, responder);
      });
}

void MediaService::ExpireIncoming() {
  const int64_t now = static_cast<int64_t>(uv_now(loop_));
  for (auto it = incoming_.begin(); it != incoming_.end();) {
    if (!it->second.busy && now - it->second.last_ms > kIncomingIdleMs) {
      DiscardOnPool(std::move(it->second.writer));
      it = incoming_.erase(it);
    } else {
      ++it;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Fetch.

void MediaService::FetchBlob(const std::string& sha256, uint64_t size_bytes,
                             std::function<void(absl::Status)> done) {
  if (store_->Stat(sha256)) return done(absl::OkStatus());
  if (auto it = fetches_.find(sha256); it != fetches_.end()) {
    it->second->waiters.push_back(std::move(done));
    return;
  }
  auto fetch = std::make_shared<Fetch>();
  fetch->sha256 = sha256;
  fetch->size = size_bytes;
  fetch->waiters.push_back(std::move(done));
  // Each fetch starts with the next peer in turn, so that fetches spread over the group.
  std::vector<uint32_t> peers;
  for (const auto& [peer, client] : clients_) peers.push_back(peer);
  for (size_t i = 0; i < peers.size(); ++i) {
    fetch->peers_left.push_back(peers[(next_fetch_peer_ + i) % peers.size()]);
  }
  ++next_fetch_peer_;
  fetches_[sha256] = fetch;
  ++counters_.fetches;
  FetchFromNextPeer(fetch);
}

void MediaService::FetchFromNextPeer(std::shared_ptr<Fetch> fetch) {
  if (fetch->writer != nullptr) DiscardOnPool(std::move(fetch->writer));
  fetch->writer.reset();
  if (stopped_) return FinishFetch(fetch, absl::CancelledError("stopping"));
  if (fetch->peers_left.empty()) {
    return FinishFetch(
        fetch, absl::UnavailableError(absl::StrCat("no replica could serve blob ", fetch->sha256)));
  }
  fetch->peer = fetch->peers_left.front();
  fetch->peers_left.pop_front();
  fetch->offset = 0;
  absl::StatusOr<std::unique_ptr<BlobWriter>> writer = store_->NewWriter();
  if (!writer.ok()) return FinishFetch(fetch, writer.status());
  fetch->writer = std::move(*writer);
  FetchChunk(fetch);
}

void MediaService::FetchChunk(std::shared_ptr<Fetch> fetch) {
  if (fetch->offset == fetch->size) {
    std::shared_ptr<BlobWriter> writer = fetch->writer;
    auto status = std::make_shared<absl::Status>();
    const std::string sha256 = fetch->sha256;
    return OnPool([writer, status, sha256] { *status = writer->Commit(sha256).status(); },
                  [this, fetch, status] {
                    fetch->writer.reset();
                    if (status->ok()) return FinishFetch(fetch, absl::OkStatus());
                    ++counters_.fetch_failures;
                    fprintf(stderr, "W blob %s from replica %u: %s\n", fetch->sha256.c_str(),
                            fetch->peer, std::string((status->message())).c_str());
                    if (absl::IsResourceExhausted(*status)) return FinishFetch(fetch, *status);
                    FetchFromNextPeer(fetch);  // bad bytes: another peer
                  });
  }
  BlobRequest request;
  request.set_sha256(fetch->sha256);
  request.mutable_read()->set_offset(fetch->offset);
  request.mutable_read()->set_max_bytes(kBlobChunkBytes);
  PostToPeer(fetch->peer, request, [this, fetch](absl::StatusOr<BlobReply> reply) {
    const bool good = reply.ok() && reply->status() == BlobReply::OK &&
                      reply->size_bytes() == fetch->size && !reply->data().empty() &&
                      reply->data().size() <= fetch->size - fetch->offset;
    if (!good) {
      if (!reply.ok() || reply->status() != BlobReply::NOT_FOUND) ++counters_.fetch_failures;
      return FetchFromNextPeer(fetch);
    }
    std::shared_ptr<BlobWriter> writer = fetch->writer;
    auto data = std::make_shared<std::string>(std::move(*reply->mutable_data()));
    auto status = std::make_shared<absl::Status>();
    OnPool([writer, data, status] { *status = writer->Append(*data); },
           [this, fetch, data, status] {
             if (!status->ok()) return FinishFetch(fetch, *status);
             fetch->offset += data->size();
             FetchChunk(fetch);
           });
  });
}

void MediaService::FinishFetch(std::shared_ptr<Fetch> fetch, absl::Status status) {
  if (fetch->writer != nullptr) DiscardOnPool(std::move(fetch->writer));
  fetch->writer.reset();
  fetches_.erase(fetch->sha256);
  if (!status.ok() && !stopped_) {
    fprintf(stderr, "W fetching blob %s: %s\n", fetch->sha256.c_str(),
            std::string((status.message())).c_str());
  }
  for (auto& waiter : fetch->waiters) waiter(status);
  StartQueuedFetches();
}

void MediaService::StartQueuedFetches() {
  // A fetch may end at once (no peer to ask) and call back here: the loop below goes on.
  if (starting_fetches_) return;
  starting_fetches_ = true;
  while (!stopped_ && fetches_.size() < kMaxFetches && !fetch_queue_.empty()) {
    auto [sha256, size] = fetch_queue_.front();
    fetch_queue_.pop_front();
    fetch_queued_.erase(sha256);
    FetchBlob(sha256, size, [](absl::Status) {});  // a failure waits for the next pass
  }
  starting_fetches_ = false;
}

// ---------------------------------------------------------------------------------------
// Reads.

void MediaService::Handle(const HttpRequest& request, const std::string& database,
                          const std::string& key, std::shared_ptr<HttpResponder> responder) {
  const std::string& method = request.method;
  if (key.empty()) {
    if (method != "GET") return RespondError(responder, 405, "method_not_allowed", method);
    return List(request, database, std::move(responder));
  }
  if (!IsValidMediaKey(key)) {
    return RespondError(responder, 400, "invalid_argument",
                        "a media key is 1 to 200 of A-Z a-z 0-9 . _ ~ - without '..'");
  }
  if (method == "DELETE") {
    Command command;
    command.mutable_delete_media()->set_database(database);
    command.mutable_delete_media()->set_key(key);
    return host_.propose(std::move(command), responder,
                         [this, responder](const CommandResult& result) {
                           if (result.code() != OK) {
                             return RespondError(responder, HttpStatusFor(result.code()),
                                                 CodeName(result.code()), result.message());
                           }
                           HttpResponse response;
                           response.status = 204;
                           host_.send(responder, std::move(response));
                         });
  }
  if (method != "GET" && method != "HEAD") {
    return RespondError(responder, 405, "method_not_allowed", method);
  }
  absl::StatusOr<std::pair<Consistency, uint64_t>> level = ReadLevel(request.target);
  if (!level.ok())
    return RespondError(responder, 400, "invalid_argument", S(level.status().message()));
  host_.read(level->first, level->second, responder, [this, request, database, key, responder] {
    absl::StatusOr<PutMedia> media = host_.state_machine->GetMedia(database, key);
    if (!media.ok()) return RespondError(responder, 404, "not_found", S(media.status().message()));
    Serve(request, *media, responder, /*fetched=*/false);
  });
}

namespace {

// The head of a media response: 200 for the whole blob, 206 with its Content-Range for a part.
HttpResponse MediaHead(const PutMedia& media, const std::optional<ByteRange>& range) {
  HttpResponse response;
  response.status = range.has_value() ? 206 : 200;
  response.headers.emplace_back("Content-Type", media.content_type());
  response.headers.emplace_back("ETag", absl::StrCat("\"", media.sha256(), "\""));
  response.headers.emplace_back("Accept-Ranges", "bytes");
  if (range.has_value()) {
    response.headers.emplace_back(
        "Content-Range", absl::StrCat("bytes ", range->offset, "-",
                                      range->offset + range->length - 1, "/", media.size_bytes()));
  }
  return response;
}

HttpResponse RangeNotSatisfiable(const PutMedia& media, const absl::Status& why) {
  HttpResponse response = JsonErrorResponse(416, "range_not_satisfiable", S(why.message()));
  response.headers.emplace_back("Content-Range", absl::StrCat("bytes */", media.size_bytes()));
  return response;
}

}  // namespace

void MediaService::Serve(const HttpRequest& request, const PutMedia& media,
                         std::shared_ptr<HttpResponder> responder, bool fetched) {
  const std::string etag = absl::StrCat("\"", media.sha256(), "\"");
  if (const std::string match = Header(request, "if-none-match"); !match.empty()) {
    if (NoneMatch(match, etag)) {
      HttpResponse response;
      response.status = 304;
      response.headers.emplace_back("ETag", etag);
      return host_.send(responder, std::move(response));
    }
  }
  if (auto cached = cache_.find(media.sha256());
      cached != cache_.end() && cached->second.bytes->size() == media.size_bytes()) {
    ++counters_.cache_hits;
    cache_order_.splice(cache_order_.begin(), cache_order_, cached->second.position);
    return ServeBytes(request, media, cached->second.bytes, responder);
  }
  absl::StatusOr<int> fd = absl::NotFoundError("not looked up");
  std::optional<BlobInfo> info = store_->Stat(media.sha256());
  if (info && info->size_bytes == media.size_bytes()) fd = store_->OpenForReading(media.sha256());
  if (!fd.ok()) {
    if (fetched || fetches_.size() >= kMaxReadFetches) {
      return RespondError(responder, 503, "unavailable",
                          "this replica does not hold the media's bytes yet; retry, or read "
                          "from another replica");
    }
    // Not here yet (or damaged): fetched from a peer while the client waits.
    auto fetch = [this, request, media, responder] {
      FetchBlob(media.sha256(), media.size_bytes(),
                [this, request, media, responder](absl::Status status) {
                  if (!status.ok()) {
                    return RespondError(responder, 503, "unavailable",
                                        absl::StrCat("the media's bytes could not be fetched "
                                                     "from a peer: ",
                                                     status.message()));
                  }
                  Serve(request, media, responder, /*fetched=*/true);
                });
    };
    if (!info) return fetch();
    // Here, but of the wrong size: damaged. Removed first, or the fetch would find it.
    BlobStore* store = store_.get();
    const std::string sha256 = media.sha256();
    return OnPool([store, sha256] { store->Remove(sha256).IgnoreError(); }, fetch);
  }
  if (media.size_bytes() <= kMaxCachedBlobBytes) {
    // Read whole, once, on the pool, and checked against its name; then served from memory
    // until it falls out of the cache. Bytes that hash otherwise (a damaged disk) are
    // removed, and fetched again from a peer.
    auto bytes = std::make_shared<absl::StatusOr<std::string>>(absl::UnknownError("not run"));
    const int file = *fd;
    const uint64_t size = media.size_bytes();
    BlobStore* store = store_.get();
    const std::string sha256 = media.sha256();
    OnPool(
        [bytes, file, size, store, sha256] {
          *bytes = ReadAt(file, 0, size, "a blob");
          close(file);
          if (bytes->ok() && Sha256Hex(**bytes) != sha256) {
            *bytes = absl::DataLossError("the blob's bytes do not match its name");
            store->Remove(sha256).IgnoreError();
          }
        },
        [this, request, media, responder, bytes, fetched] {
          if (absl::IsDataLoss(bytes->status())) {
            fprintf(stderr, "W blob %s was damaged here: removed, fetched again\n",
                    media.sha256().c_str());
            if (fetched) {
              return RespondError(responder, 503, "unavailable",
                                  "the media's bytes are damaged here; read from another "
                                  "replica");
            }
            return FetchBlob(media.sha256(), media.size_bytes(),
                             [this, request, media, responder](absl::Status status) {
                               if (!status.ok()) {
                                 return RespondError(responder, 503, "unavailable",
                                                     S(status.message()));
                               }
                               Serve(request, media, responder, /*fetched=*/true);
                             });
          }
          if (!bytes->ok() || (*bytes)->size() != media.size_bytes()) {
            return RespondError(responder, 500, "internal",
                                "the media's bytes could not be read here; read from "
                                "another replica");
          }
          auto shared = std::make_shared<const std::string>(**std::move(bytes));
          CacheBlob(media.sha256(), shared);
          ServeBytes(request, media, shared, responder);
        });
    return;
  }
  absl::StatusOr<std::optional<ByteRange>> range =
      ParseRange(Header(request, "range"), media.size_bytes());
  if (!range.ok()) {
    CloseOnPool(loop_, *fd);
    return host_.send(responder, RangeNotSatisfiable(media, range.status()));
  }
  const ByteRange served = range->value_or(ByteRange{0, media.size_bytes()});
  HttpResponse response = MediaHead(media, *range);
  response.body_source = FileBodySource::Create(loop_, *fd, served.offset, served.length);
  host_.send(responder, std::move(response));
}

void MediaService::ServeBytes(const HttpRequest& request, const PutMedia& media,
                              std::shared_ptr<const std::string> bytes,
                              const std::shared_ptr<HttpResponder>& responder) {
  absl::StatusOr<std::optional<ByteRange>> range =
      ParseRange(Header(request, "range"), media.size_bytes());
  if (!range.ok()) return host_.send(responder, RangeNotSatisfiable(media, range.status()));
  const ByteRange served = range->value_or(ByteRange{0, media.size_bytes()});
  HttpResponse response = MediaHead(media, *range);
  response.body = bytes->substr(served.offset, served.length);
  host_.send(responder, std::move(response));
}

void MediaService::CacheBlob(const std::string& sha256, std::shared_ptr<const std::string> bytes) {
  if (cache_.contains(sha256) || bytes->size() > kMaxCachedBlobBytes) return;
  // Each entry is charged its bookkeeping too, so that many tiny blobs stay bounded.
  const uint64_t cost = bytes->size() + kCacheEntryOverheadBytes;
  while (!cache_order_.empty() && cache_bytes_ + cost > kCacheBytes) {
    auto oldest = cache_.find(cache_order_.back());
    cache_bytes_ -= oldest->second.bytes->size() + kCacheEntryOverheadBytes;
    cache_.erase(oldest);
    cache_order_.pop_back();
  }
  cache_order_.push_front(sha256);
  cache_bytes_ += cost;
  cache_[sha256] = CachedBlob{std::move(bytes), cache_order_.begin()};
}

void MediaService::List(const HttpRequest& request, const std::string& database,
                        std::shared_ptr<HttpResponder> responder) {
  std::string after = QueryParameter(request.target, "after").value_or("");
  if (!after.empty() && !IsValidMediaKey(after)) {
    return RespondError(responder, 400, "invalid_argument", "after must be a media key");
  }
  size_t limit = kDefaultListLimit;
  if (std::optional<std::string> text = QueryParameter(request.target, "limit")) {
    if (!absl::SimpleAtoi(*text, &limit) || limit == 0 || limit > kMaxListLimit) {
      return RespondError(responder, 400, "invalid_argument",
                          absl::StrCat("limit is 1 to ", kMaxListLimit));
    }
  }
  absl::StatusOr<std::pair<Consistency, uint64_t>> level = ReadLevel(request.target);
  if (!level.ok())
    return RespondError(responder, 400, "invalid_argument", S(level.status().message()));
  host_.read(level->first, level->second, responder, [this, database, after, limit, responder] {
    absl::StatusOr<std::vector<StateMachine::MediaRecord>> page =
        host_.state_machine->ListMedia(database, after, limit + 1);
    if (!page.ok()) return RespondError(responder, 404, "not_found", S(page.status().message()));
    const bool more = page->size() > limit;
    if (more) page->pop_back();
    std::string out = "{\"media\":[";
    for (size_t i = 0; i < page->size(); ++i) {
      if (i > 0) out += ',';
      AppendMediaJson(&out, (*page)[i].media, (*page)[i].revision);
    }
    out += "],\"next\":";
    if (more) {
      AppendJsonString(&out, page->back().media.key());
    } else {
      out += "null";
    }
    absl::StrAppend(&out, ",\"revision\":", host_.state_machine->revision(), "}");
    Respond(responder, 200, out);
  });
}

// ---------------------------------------------------------------------------------------
// Convergence and collection.

void MediaService::OnApplied(const Value& value, const std::vector<AppliedRequest>& applied) {
  if (!started_ || static_cast<size_t>(value.requests_size()) != applied.size()) return;
  for (size_t i = 0; i < applied.size(); ++i) {
    if (applied[i].result.code() != OK) continue;
    const Command& command = value.requests(static_cast<int>(i)).command();
    if (command.has_put_media()) {
      const PutMedia& put = command.put_media();
      if (!store_->Stat(put.sha256()) && !fetches_.contains(put.sha256()) &&
          fetch_queued_.insert(put.sha256()).second) {
        fetch_queue_.emplace_back(put.sha256(), put.size_bytes());
      }
    }
  }
  StartQueuedFetches();
}

void MediaService::OnStateReplaced() { pass_wanted_ = true; }

void MediaService::StartPass() {
  if (pass_running_ || stopped_ || host_.stopping()) return;
  absl::StatusOr<Db> view = host_.state_machine->OpenSystemView();
  if (!view.ok()) {
    fprintf(stderr, "W media pass: %s\n", std::string((view.status().message())).c_str());
    last_pass_ms_ = static_cast<int64_t>(uv_now(loop_));
    return;
  }
  // The cutoff is taken before the view: a blob referenced after the view's revision was
  // made young (kept) before it was proposed, so it is younger than the cutoff.
  const int64_t cutoff = WallMs() - static_cast<int64_t>(options_.gc_grace_ms);
  pass_running_ = true;
  pass_wanted_ = false;
  last_pass_ms_ = static_cast<int64_t>(uv_now(loop_));
  auto pass = std::make_shared<Pass>();
  pass->view = *std::move(view);
  pass->store = store_.get();
  pass->cutoff_unix_ms = cutoff;
  // A replica still applying what is committed may not have seen the metadata of blobs it
  // was pushed: it only fetches until it has caught up.
  pass->collect = host_.caught_up();
  if (host_.log_images) pass->retained = host_.log_images();
  OnPool(
      [pass] {
        // What the metadata references, as of the view's revision.
        Stmt stmt = MustPrepare(pass->view.get(),
                                "SELECT sha256, max(size_bytes) FROM _synod_media GROUP BY sha256");
        while (MustStep(stmt.get())) {
          pass->referenced[ColumnString(stmt.get(), 0)] =
              static_cast<uint64_t>(sqlite3_column_int64(stmt.get(), 1));
        }
        stmt.reset();
        pass->view.reset();  // its read transaction no longer holds back the WAL
        absl::StatusOr<std::vector<BlobInfo>> stored = pass->store->List();
        if (!stored.ok()) {
          pass->status = stored.status();
          return;
        }
        pass->stored = stored->size();
        std::set<std::string> here;
        for (const BlobInfo& blob : *stored) {
          here.insert(blob.sha256);
          if (pass->referenced.contains(blob.sha256) || pass->retained.contains(blob.sha256)) {
            continue;
          }
          const int64_t old_before = pass->cutoff_unix_ms;
          if (!pass->collect || blob.modified_unix_ms >= old_before) continue;
          // Checked again under the store's lock, which pinning and keeping take: a blob on
          // its way to being referenced is pinned or young.
          if (pass->store->RemoveIfUnused(blob.sha256, old_before)) ++pass->removed;
        }
        for (const BlobInfo& blob : *stored) {
          // A referenced blob of the wrong size is damaged: removed, and fetched again.
          auto ref = pass->referenced.find(blob.sha256);
          if (ref != pass->referenced.end() && ref->second != blob.size_bytes &&
              pass->store->Remove(blob.sha256).ok()) {
            here.erase(blob.sha256);
          }
        }
        for (const auto& [sha256, size] : pass->referenced) {
          if (!here.contains(sha256)) pass->missing.emplace_back(sha256, size);
        }
      },
      [this, pass] { OnPassDone(pass); });
}

void MediaService::OnPassDone(std::shared_ptr<Pass> pass) {
  pass_running_ = false;
  ++counters_.passes;
  if (!pass->status.ok()) {
    fprintf(stderr, "W media pass: %s\n", std::string(pass->status.message()).c_str());
    return;
  }
  counters_.collected += pass->removed;
  counters_.missing = pass->missing.size();
  counters_.stored = pass->stored - pass->removed;
  if (pass->removed > 0) {
    fprintf(stderr, "I media: removed %llu unreferenced blobs\n",
            static_cast<unsigned long long>(pass->removed));
  }
  for (const auto& [sha256, size] : pass->missing) {
    if (!fetches_.contains(sha256) && fetch_queued_.insert(sha256).second) {
      fetch_queue_.emplace_back(sha256, size);
    }
  }
  StartQueuedFetches();
}

void MediaService::AppendMetrics(MetricsText* out) const {
  out->Counter("synod_media_uploads_total", "Media uploads whose metadata was proposed.",
               counters_.uploads);
  out->Counter("synod_media_upload_bytes_total", "Bytes of media uploads stored here.",
               counters_.upload_bytes);
  out->Counter("synod_database_uploads_total",
               "Streamed database uploads (PUT /v1/db/{name}) proposed by reference.",
               counters_.database_uploads);
  out->Counter("synod_media_uploads_refused_total",
               "Uploads answered with an error (limits, disk, digest, no majority).",
               counters_.uploads_refused);
  out->Counter("synod_media_pushes_failed_total", "Blob pushes to a peer that failed.",
               counters_.pushes_failed);
  out->Counter("synod_media_fetches_total", "Blob fetches started.", counters_.fetches);
  out->Counter("synod_media_fetch_failures_total",
               "Blob fetches from one peer that failed or brought bytes of the wrong hash.",
               counters_.fetch_failures);
  out->Counter("synod_media_blobs_collected_total", "Unreferenced blobs removed.",
               counters_.collected);
  out->Counter("synod_media_passes_total", "Convergence and collection passes run.",
               counters_.passes);
  out->Gauge("synod_media_blobs", "Blobs stored here, at the last pass.", counters_.stored);
  out->Counter("synod_media_cache_hits_total", "Small media served from memory.",
               counters_.cache_hits);
  out->Gauge("synod_media_blobs_missing", "Referenced blobs not stored here, at the last pass.",
             counters_.missing);
}

}  // namespace synod::server

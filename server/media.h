#ifndef SYNOD_SERVER_MEDIA_H_
#define SYNOD_SERVER_MEDIA_H_

// Media: files attached to a database under a key, their bytes kept in each replica's blob
// store (adapters/blob_store.h) by content hash, their metadata (database, key, sha256, size,
// content type) in the log as PutMedia and DeleteMedia commands. See docs/api.md ("Media")
// and docs/operations.md ("Media blobs").
//
// Upload (PUT /v1/db/{name}/media/{key}): the body streams to a new blob, hashed as it
// arrives; the blob is pushed to the peers in chunks until a majority of the group holds it
// durably (this replica included); only then is the metadata proposed, so that the client's
// 201 means a majority holds both the bytes and the metadata.
//
// Convergence: a replica that applies metadata for a blob it lacks fetches it from a peer in
// the background, checking the hash; a periodic pass (and one after a snapshot is installed)
// finds every referenced blob still missing. Reads fetch a missing blob first.
//
// Garbage collection: the same pass removes blobs no metadata references, once they are older
// than the grace period. A blob is made young when it is written, pushed or about to be
// referenced, and an upload pins its blob until its metadata is applied, so a blob on its way
// to being referenced is never collected.
//
// Peer traffic: POST /internal/v1/blob, one sealed BlobRequest answered by one sealed
// BlobReply (server/api.proto), on connections of its own so that a chunk never delays a
// heartbeat. Its frames carry kBlobSequenceBit, with sequences and replay windows apart from
// the consensus messages'.
//
// Threading: everything here runs on the loop thread, except the file work, which runs on
// libuv's pool (writes, syncs, reads of chunks, listings, removals).

#include <uv.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "adapters/blob_store.h"
#include "adapters/http_client.h"
#include "adapters/http_server.h"
#include "adapters/peer_auth.h"
#include "core/state_machine.h"
#include "core/synod.pb.h"
#include "server/api.pb.h"
#include "server/http_util.h"
#include "server/peer_links.h"
#include "server/status.h"

namespace synod::server {

using api::BlobReply;
using api::BlobRequest;

struct MediaOptions {
  uint32_t id = 0;
  std::map<uint32_t, PeerAddress> peers;  // every replica, this one included
  std::string blob_dir;                   // DATA_DIR/blobs
  bool fsync = true;
  uint64_t start_unix_ms = 0;  // the process's start, for the peer sequences
  // The largest media file accepted.
  uint64_t max_media_bytes = uint64_t{4} << 30;
  // The largest `json` field of a d3b upload (as the largest JSON body elsewhere).
  uint64_t max_json_bytes = 3 << 20;
  // An unreferenced blob is removed once it is older than this.
  uint64_t gc_grace_ms = 60 * 60 * 1000;
  // How often the convergence and collection pass runs.
  uint64_t gc_interval_ms = 60 * 1000;
  // A push or fetch chunk not answered within this long fails that peer.
  uint64_t peer_timeout_ms = 10'000;
};

// What the node lends the media service.
struct MediaHost {
  std::function<void(Command, std::shared_ptr<HttpResponder>,
                     std::function<void(const CommandResult&)>)>
      propose;
  std::function<void(Consistency, uint64_t, std::shared_ptr<HttpResponder>, std::function<void()>)>
      read;
  std::function<void(const std::shared_ptr<HttpResponder>&, HttpResponse)> send;  // counted
  std::function<bool()> stopping;
  // Whether this replica has applied what it knows to be committed (collection waits for it:
  // a lagging replica has not seen the metadata that references new blobs).
  std::function<bool()> caught_up;
  // d3b uploads (POST / multipart): the command a `json` field asks for, given the file_id
  // this replica assigned (a PutMedia whose execute holds the request's SQL, the file_id
  // bound as its last parameter; InvalidArgument if the request is not a valid upload), and
  // the answer's rows as d3b writes them (a JSON array of row objects).
  std::function<absl::StatusOr<Command>(std::string_view json, const std::string& file_id)>
      d3b_command;
  std::function<std::string(const CommandResult&)> d3b_rows;
  // The blobs that the log entries this replica still holds name as database images:
  // collection spares them, so that a replica applying such an entry late can fetch its
  // image (a snapshot replaces the entries once compacted).
  std::function<std::set<std::string>()> log_images;
  // A database image upload, stored here: checked before it is pushed (`done` gets the
  // verdict: OK, InvalidArgument, or another error), and staged for this replica's apply;
  // drop_image removes that staged copy when the write is not applied.
  std::function<void(const std::string& sha256, std::function<void(absl::Status)> done)>
      check_image;
  std::function<void(const std::string& sha256)> drop_image;
  // A database image pushed here whole: the stager checks it ahead of its entry.
  std::function<void(const std::string& sha256)> prestage_image;
  StateMachine* state_machine = nullptr;
  const PeerAuthenticator* auth = nullptr;
};

class MediaService {
 public:
  // A blob moves between replicas in chunks of at most this many bytes.
  static constexpr uint64_t kBlobChunkBytes = 1 << 20;

  MediaService(uv_loop_t* loop, MediaOptions options, MediaHost host);
  ~MediaService();
  MediaService(const MediaService&) = delete;
  MediaService& operator=(const MediaService&) = delete;

  // Opens the blob store (removing what a crash left in its tmp/) and starts the periodic
  // pass.
  absl::Status Start();
  // Cancels transfers and closes the peer connections and the timer.
  void Stop();

  // Whether the request's body streams to StartUpload: PUT /v1/db/{name}/media/{key}.
  static bool IsUpload(std::string_view method, std::string_view target);
  // The body limit of requests this service takes (0 when it takes none of this kind).
  uint64_t BodyLimit(std::string_view method, std::string_view target) const;
  // Takes an upload at its headers: its body's sink, or nullptr once answered.
  std::shared_ptr<HttpBodySink> StartUpload(const HttpRequest& head,
                                            std::shared_ptr<HttpResponder> responder);
  // The same for d3b's upload, POST / with a multipart/form-data body: a `json` field with
  // the d3b request ("media_op":"upload") and a `file` part, streamed like an upload; the
  // request's SQL applies with the metadata, as one write.
  static bool IsD3bUpload(const HttpRequest& head);
  std::shared_ptr<HttpBodySink> StartD3bUpload(const HttpRequest& head,
                                               std::shared_ptr<HttpResponder> responder);
  uint64_t max_media_bytes() const { return options_.max_media_bytes; }
  // A database image too large to go through the log by value (PUT /v1/db/{name}, decided
  // by the node): streamed into a blob as a media upload is, pushed to a majority, then
  // proposed as CreateDatabase by reference. The answer is a database's (201, name and
  // revision). Its first bytes must be an SQLite header.
  std::shared_ptr<HttpBodySink> StartDatabaseUpload(const HttpRequest& head,
                                                    const std::string& database,
                                                    std::shared_ptr<HttpResponder> responder);
  // Makes sure `sha256` is stored here, fetching it from the peers if not; `done` gets OK
  // once it is (for an image a committed entry names, staged before it is applied).
  void EnsureBlob(const std::string& sha256, uint64_t size_bytes,
                  std::function<void(absl::Status)> done);
  BlobStore* store() { return store_.get(); }
  // GET (and HEAD) or DELETE /v1/db/{name}/media/{key}; GET /v1/db/{name}/media lists (key
  // empty).
  void Handle(const HttpRequest& request, const std::string& database, const std::string& key,
              std::shared_ptr<HttpResponder> responder);
  // POST /internal/v1/blob.
  void HandlePeer(const HttpRequest& request, std::shared_ptr<HttpResponder> responder);

  // The node applied `value` (with these results, one per request): fetches the blobs new
  // metadata names and this replica lacks. (A blob a deletion or a replacement leaves
  // unreferenced may go only once older than the grace: the periodic pass collects it.)
  void OnApplied(const Value& value, const std::vector<AppliedRequest>& applied);
  // The state was replaced by a snapshot: every referenced blob is checked soon.
  void OnStateReplaced();

  // Prometheus lines (synod_media_*).
  void AppendMetrics(MetricsText* out) const;

 private:
  class Upload;
  class D3bUpload;
  struct Push;
  struct Fetch;
  struct Incoming;
  struct Pass;

  // An upload's checks at its headers, and its Upload: of media under `key`, or of a
  // database image when `key` is empty. Null once answered (refused).
  std::shared_ptr<Upload> BeginUpload(const HttpRequest& head, const std::string& database,
                                      std::string_view key,
                                      std::shared_ptr<HttpResponder>& responder);
  // Runs `work` on libuv's pool, then `after` on the loop.
  void OnPool(std::function<void()> work, std::function<void()> after);
  void Respond(const std::shared_ptr<HttpResponder>& responder, int status, std::string body);
  void RespondError(const std::shared_ptr<HttpResponder>& responder, int status,
                    std::string_view code, std::string_view message);

  // Upload: the blob is stored here; push it to the peers until a majority holds it, then
  // propose its metadata.
  void Replicate(std::shared_ptr<Upload> upload);
  // A majority reported the blob stored: asks them to keep it young, then proposes.
  void ConfirmUpload(std::shared_ptr<Upload> upload);
  // Proposes the upload's metadata (PutMedia), or a database image's CreateDatabase by
  // reference once this replica's check has passed too.
  void ProposeUpload(std::shared_ptr<Upload> upload);
  // A database image upload, stored: checked, then replicated.
  void CheckImage(std::shared_ptr<Upload> upload);
  void RefuseUpload(Upload& upload, std::string_view why);
  void PushChunk(std::shared_ptr<Push> push);
  void OnPushReply(std::shared_ptr<Push> push, absl::StatusOr<BlobReply> reply);

  // Fetch: `sha256` from the peers, then `done` (OK once stored here).
  void FetchBlob(const std::string& sha256, uint64_t size_bytes,
                 std::function<void(absl::Status)> done);
  void FetchFromNextPeer(std::shared_ptr<Fetch> fetch);
  void FetchChunk(std::shared_ptr<Fetch> fetch);
  void FinishFetch(std::shared_ptr<Fetch> fetch, absl::Status status);
  void StartQueuedFetches();

  // Reads: serves the bytes of `media` to `request`, fetching them first if needed.
  void Serve(const HttpRequest& request, const PutMedia& media,
             std::shared_ptr<HttpResponder> responder, bool fetched);
  void List(const HttpRequest& request, const std::string& database,
            std::shared_ptr<HttpResponder> responder);

  // Peer side.
  void HandleBlobRead(uint32_t from, const BlobRequest& request,
                      std::shared_ptr<HttpResponder> responder);
  void HandleBlobWrite(uint32_t from, BlobRequest request,
                       std::shared_ptr<HttpResponder> responder);
  void Reply(uint32_t to, const BlobReply& reply, const std::shared_ptr<HttpResponder>& responder);
  // Posts a sealed `request` to `peer`; `done` gets the opened reply or why there is none.
  void PostToPeer(uint32_t peer, const BlobRequest& request,
                  std::function<void(absl::StatusOr<BlobReply>)> done);
  // Drops incoming pushes idle for too long.
  void ExpireIncoming();
  void DiscardOnPool(std::shared_ptr<BlobWriter> writer);

  // Convergence and collection.
  void StartPass();
  void OnPassDone(std::shared_ptr<Pass> pass);
  size_t majority() const { return options_.peers.size() / 2 + 1; }

  uv_loop_t* const loop_;
  const MediaOptions options_;
  const MediaHost host_;
  std::unique_ptr<BlobStore> store_;
  bool started_ = false;
  bool stopped_ = false;

  std::map<uint32_t, std::unique_ptr<HttpClient>> clients_;  // blob channel, by peer
  std::map<uint32_t, PeerSequence> request_sequences_;
  std::map<uint32_t, PeerSequence> reply_sequences_;
  std::map<uint32_t, ReplayWindow> request_windows_;
  std::map<uint32_t, ReplayWindow> reply_windows_;

  // Uploads whose body is arriving or whose blob is being pushed and proposed.
  static constexpr size_t kMaxUploads = 8;
  size_t uploads_ = 0;
  // Pushes received, by (sender, sha256).
  static constexpr size_t kMaxIncoming = 16;
  std::map<std::pair<uint32_t, std::string>, Incoming> incoming_;
  // Fetches under way, by sha256, and the blobs waiting for a background fetch.
  static constexpr size_t kMaxFetches = 4;
  std::map<std::string, std::shared_ptr<Fetch>> fetches_;
  std::deque<std::pair<std::string, uint64_t>> fetch_queue_;
  std::set<std::string> fetch_queued_;
  uint32_t next_fetch_peer_ = 0;
  uint64_t file_id_state_ = 0;  // d3b file ids: splitmix64 from a random seed

  bool pass_running_ = false;
  bool starting_fetches_ = false;  // StartQueuedFetches is on the stack
  bool pass_wanted_ = false;
  int64_t last_pass_ms_ = 0;  // loop time
  uv_timer_t pass_timer_;
  bool pass_timer_started_ = false;

  // Small blobs served lately, by sha256, kept in memory: a blob never changes, so a cached
  // copy is right for as long as it is kept. Up to kMaxCachedBlobBytes each and
  // kCacheBytes in all, the least recently served going first.
  static constexpr uint64_t kMaxCachedBlobBytes = 256 << 10;
  static constexpr uint64_t kCacheBytes = 32 << 20;
  static constexpr uint64_t kCacheEntryOverheadBytes = 256;
  struct CachedBlob {
    std::shared_ptr<const std::string> bytes;
    std::list<std::string>::iterator position;
  };
  std::map<std::string, CachedBlob> cache_;
  std::list<std::string> cache_order_;  // most recently served first
  uint64_t cache_bytes_ = 0;
  void CacheBlob(const std::string& sha256, std::shared_ptr<const std::string> bytes);
  // Answers `request` for `media` from these bytes (the whole blob).
  void ServeBytes(const HttpRequest& request, const PutMedia& media,
                  std::shared_ptr<const std::string> bytes,
                  const std::shared_ptr<HttpResponder>& responder);

  struct Counters {
    uint64_t uploads = 0;
    uint64_t database_uploads = 0;
    uint64_t upload_bytes = 0;
    uint64_t uploads_refused = 0;  // no majority, disk, hash, limits
    uint64_t pushes_failed = 0;
    uint64_t fetches = 0;
    uint64_t fetch_failures = 0;  // a peer that failed or served bad bytes
    uint64_t collected = 0;       // blobs removed by collection
    uint64_t passes = 0;
    uint64_t missing = 0;  // referenced blobs not here, at the last pass
    uint64_t stored = 0;   // blobs here, at the last pass
    uint64_t cache_hits = 0;
  };
  Counters counters_;
};

}  // namespace synod::server

#endif  // SYNOD_SERVER_MEDIA_H_

#include "server/peer_links.h"

#include <algorithm>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "core/check.h"

namespace synod::server {
namespace {

constexpr char kMessagesPath[] = "/internal/v1/messages";
// Messages waiting for one peer beyond this are dropped (the protocol retries).
constexpr size_t kMaxOutboxBytes = 256 << 20;

bool IsPath(const HttpRequest& request, std::string_view path) {
  std::string_view target = request.target;
  return target.substr(0, target.find('?')) == path;
}

}  // namespace

// A peer's stream, from its hello on.
class PeerLinks::InboundStream : public HttpUpgradedStream {
 public:
  InboundStream(PeerLinks* links, uint32_t peer, uint64_t number)
      : links_(links),
        peer_(peer),
        number_(number),
        reader_(links->options_.max_frame_bytes,
                [this](std::string_view frame) { return Step(frame); }) {}

  bool Receive(std::string_view bytes) override { return reader_.Receive(bytes); }

  void Closed() override {
    auto it = links_->inbound_.find(peer_);
    if (it != links_->inbound_.end() && it->second.number == number_) links_->inbound_.erase(it);
  }

 private:
  // False closes the stream: a frame that is not authentic, not from this peer, or not a
  // batch. A stale one (a replay, or one overtaken by more than the replay window) is
  // dropped, as a lost message is.
  bool Step(std::string_view frame) {
    if (links_->stopped_) return false;
    bool stale = false;
    absl::StatusOr<uint32_t> from = links_->StepBatch(frame, /*reply=*/false, peer_, &stale);
    if (from.ok()) ++links_->counters_.stream_frames_received;
    return from.ok() || stale;
  }

  PeerLinks* const links_;
  const uint32_t peer_;
  const uint64_t number_;
  PeerStreamReader reader_;
};

PeerLinks::PeerLinks(uv_loop_t* loop, PeerLinksOptions options, const PeerAuthenticator* auth,
                     PeerLinksHost host)
    : loop_(loop), options_(std::move(options)), auth_(auth), host_(std::move(host)) {
  for (const auto& [id, address] : options_.peers) {
    if (id == options_.id) continue;
    HttpClientOptions post_options;
    post_options.initial_backoff_ms = options_.initial_backoff_ms;
    post_options.max_backoff_ms = options_.max_backoff_ms;
    post_options.backoff_jitter_seed = host_.random_seed() | 1;
    // A peer may answer a POST with a batch as large as one it POSTs.
    post_options.max_response_bytes = options_.max_frame_bytes;
    clients_[id] = std::make_unique<HttpClient>(loop_, address.host, address.port, post_options);
    if (options_.streams) {
      PeerStreamOptions stream_options;
      stream_options.initial_backoff_ms = options_.initial_backoff_ms;
      stream_options.max_backoff_ms = options_.max_backoff_ms;
      stream_options.jitter_seed = host_.random_seed() | 1;
      stream_options.max_queued_bytes =
          std::max(stream_options.max_queued_bytes, options_.max_frame_bytes);
      const uint32_t peer = id;
      streams_[id] = std::make_unique<PeerStreamClient>(
          loop_, address.host, address.port, kPeerStreamTarget, stream_options,
          PeerStreamClient::Callbacks{.hello = [this, peer] { return StreamHello(peer); },
                                      .writable = [this, peer] { Flush(peer); }});
    }
    outboxes_[id];
    send_sequences_.emplace(id, PeerSequence(options_.start_unix_ms));
    reply_sequences_.emplace(id, PeerSequence(options_.start_unix_ms));
    replay_windows_[id];
    reply_windows_[id];
  }
}

PeerLinks::~PeerLinks() { Stop(); }

void PeerLinks::Stop() {
  if (stopped_) return;
  stopped_ = true;
  for (auto& [id, client] : clients_) client->Close();
  for (auto& [id, stream] : streams_) stream->Close();
}

void PeerLinks::Send(std::vector<Message> messages) {
  // Messages for a peer wait in its outbox while its stream's queue is full or a POST to it
  // is in flight, and go out together after: under load, batches grow instead of queues.
  for (Message& m : messages) {
    auto it = outboxes_.find(m.to());
    if (it == outboxes_.end()) continue;
    Outbox& box = it->second;
    size_t size = m.ByteSizeLong();
    if (box.pending_bytes + size > kMaxOutboxBytes) continue;  // lost; the protocol retries
    box.pending_bytes += size;
    box.pending.push_back(std::move(m));
  }
  for (auto& [peer, box] : outboxes_) Flush(peer);
}

std::string PeerLinks::TakeSealedBatch(uint32_t peer, bool reply) {
  Outbox& box = outboxes_.at(peer);
  MessageBatch batch;
  size_t bytes = 0;
  size_t taken = 0;
  for (; taken < box.pending.size(); ++taken) {
    size_t size = box.pending[taken].ByteSizeLong();
    if (taken > 0 && bytes + size > options_.max_batch_bytes) break;
    bytes += size;
    *batch.add_messages() = std::move(box.pending[taken]);
  }
  box.pending.erase(box.pending.begin(), box.pending.begin() + taken);
  box.pending_bytes -= std::min(box.pending_bytes, bytes);
  std::string payload;
  SYNOD_CHECK(batch.SerializeToString(&payload));
  // POST bodies and replies travel on different connections, so each has its own sequence
  // and the receiver its own replay window (a POST held up by a reconnection must not fall
  // out of a window that replies keep moving). The top bit tells them apart, so a reply
  // cannot be replayed as a POST body or the reverse.
  uint64_t sequence = reply ? reply_sequences_.at(peer).Next() | kReplySequenceBit
                            : send_sequences_.at(peer).Next();
  return auth_->Seal(options_.id, peer, sequence, payload);
}

void PeerLinks::Flush(uint32_t peer) {
  Outbox& box = outboxes_.at(peer);
  if (box.pending.empty() || stopped_ || peer == answering_peer_) return;
  auto stream_it = streams_.find(peer);
  PeerStreamClient* stream = stream_it == streams_.end() ? nullptr : stream_it->second.get();
  if (stream != nullptr && stream->open()) {
    // One frame per call under light load; under heavy load, as many as the socket's queue
    // takes, the rest waiting here until it drains (the stream calls back).
    while (!box.pending.empty() &&
           stream->HasRoom(std::min(box.pending_bytes, options_.max_batch_bytes))) {
      stream->Write(TakeSealedBatch(peer, /*reply=*/false));
    }
    return;
  }
  // Nothing while it connects, backs off, or waits after a refusal.
  if (stream != nullptr) stream->Connect();
  if (box.in_flight) return;
  box.in_flight = true;
  ++counters_.posts;
  // "replies": the peer may answer with messages of its own for this replica (server
  // versions before it answer 204 to every batch).
  clients_.at(peer)->Post(absl::StrCat(kMessagesPath, "?replies=1"),
                          TakeSealedBatch(peer, /*reply=*/false),
                          [this, peer](absl::StatusOr<HttpResponse> response) {
                            // Lost or refused batches are the protocol's business. So are the
                            // messages queued behind one that failed: the peer is down or cut off,
                            // they age while the client backs off, and the core's timers send what
                            // is still needed.
                            Outbox& b = outboxes_.at(peer);
                            b.in_flight = false;
                            if (!response.ok()) {
                              b.pending.clear();
                              b.pending_bytes = 0;
                            } else if (response->status == 200 && !stopped_) {
                              // A refused one is counted; one from another replica is refused.
                              StepBatch(response->body, /*reply=*/true, peer).IgnoreError();
                            }
                            Flush(peer);
                          });
}

absl::StatusOr<uint32_t> PeerLinks::StepBatch(std::string_view sealed, bool reply,
                                              uint32_t expected_from, bool* stale) {
  // Nothing of the body is decoded before it is authenticated (adapters/peer_auth.h).
  absl::StatusOr<OpenedFrame> frame = auth_->Open(sealed, options_.id);
  absl::Status admitted = frame.status();
  if (admitted.ok() && (frame->sequence & kBlobSequenceBit) != 0) {
    admitted = absl::PermissionDeniedError("a blob channel's frame where a message was expected");
  }
  if (admitted.ok() && reply != ((frame->sequence & kReplySequenceBit) != 0)) {
    admitted = absl::PermissionDeniedError(reply ? "a POST's frame where a reply was expected"
                                                 : "a reply's frame where a POST was expected");
  }
  if (admitted.ok() && expected_from != 0 && frame->from_id != expected_from) {
    admitted = absl::PermissionDeniedError(
        "a frame from another replica than the one this channel is with");
  }
  if (admitted.ok()) {
    auto& windows = reply ? reply_windows_ : replay_windows_;
    auto window = windows.find(frame->from_id);
    if (window == windows.end()) {
      admitted = absl::PermissionDeniedError("the sender is not a peer of this replica");
    } else {
      admitted = window->second.Admit(frame->sequence);
      if (!admitted.ok() && stale != nullptr) *stale = true;
    }
  }
  if (!admitted.ok()) {
    ++counters_.frames_refused;
    return absl::UnauthenticatedError(absl::StrCat("peer frame refused: ", admitted.message()));
  }
  MessageBatch batch;
  if (!batch.ParseFromArray(frame->payload.data(), static_cast<int>(frame->payload.size()))) {
    ++counters_.frames_refused;
    return absl::InvalidArgumentError("not a message batch");
  }
  host_.step(frame->from_id, batch);
  return frame->from_id;
}

bool PeerLinks::HandleHttp(const HttpRequest& request,
                           const std::shared_ptr<HttpResponder>& responder) {
  if (request.method == "POST" && IsPath(request, kMessagesPath)) {
    HandlePost(request, responder);
    return true;
  }
  if (options_.streams && request.target == kPeerStreamTarget) {
    host_.send(responder, JsonErrorResponse(401, "unauthenticated",
                                            absl::StrCat("a peer stream opens with an upgrade to ",
                                                         kPeerStreamProtocol, " and an authentic ",
                                                         kPeerStreamHelloHeader, " header")));
    return true;
  }
  return false;
}

void PeerLinks::HandlePost(const HttpRequest& request,
                           const std::shared_ptr<HttpResponder>& responder) {
  absl::StatusOr<uint32_t> from = StepBatch(request.body, /*reply=*/false);
  if (!from.ok()) {
    const std::string why(from.status().message());
    return host_.send(responder, absl::IsUnauthenticated(from.status())
                                     ? JsonErrorResponse(401, "unauthenticated", why)
                                     : JsonErrorResponse(400, "bad_request", why));
  }
  HttpResponse response;
  response.status = 204;
  if (request.target.ends_with("?replies=1") && outboxes_.contains(*from)) {
    // What this replica has for the sender now (a heartbeat's acknowledgement, most often)
    // rides back in the answer: one HTTP exchange per round trip instead of two. Messages
    // that need an fsync first come later, in a POST of their own.
    answering_peer_ = *from;
    host_.drain();
    answering_peer_ = 0;
    if (!outboxes_.at(*from).pending.empty()) {
      response.status = 200;
      response.body = TakeSealedBatch(*from, /*reply=*/true);
      ++counters_.replies;
    }
  }
  // Not through host_.send: peer traffic is not counted as client requests.
  responder->Send(std::move(response));
  Flush(*from);  // what did not fit
}

std::string PeerLinks::StreamHello(uint32_t peer) {
  // A frame like any other (its sequence from the same counter as the batches to `peer`),
  // whose payload names the protocol.
  return absl::BytesToHexString(
      auth_->Seal(options_.id, peer, send_sequences_.at(peer).Next(), kPeerStreamProtocol));
}

std::unique_ptr<HttpUpgradedStream> PeerLinks::OpenStream(const HttpRequest& request,
                                                          std::function<void()> close) {
  if (stopped_ || !options_.streams || request.method != "GET" ||
      request.target != kPeerStreamTarget || Header(request, "upgrade") != kPeerStreamProtocol) {
    return nullptr;
  }
  // The hello is opened and admitted like a batch, before the stream is taken: a client
  // without the cluster secret gets no stream (and cannot hold a connection without a
  // deadline).
  std::string hello;
  absl::StatusOr<OpenedFrame> frame = absl::InvalidArgumentError("no hello");
  if (DecodeHex(Header(request, kPeerStreamHelloHeader), &hello)) {
    frame = auth_->Open(hello, options_.id);
  }
  absl::Status admitted = frame.status();
  if (admitted.ok() && ((frame->sequence & (kBlobSequenceBit | kReplySequenceBit)) != 0 ||
                        frame->payload != kPeerStreamProtocol)) {
    admitted = absl::PermissionDeniedError("not a peer stream's hello");
  }
  if (admitted.ok()) {
    auto window = replay_windows_.find(frame->from_id);
    admitted = window == replay_windows_.end()
                   ? absl::PermissionDeniedError("the sender is not a peer of this replica")
                   : window->second.Admit(frame->sequence);
  }
  if (!admitted.ok()) {
    ++counters_.frames_refused;
    return nullptr;
  }
  const uint32_t peer = frame->from_id;
  const uint64_t number = ++inbound_opened_;
  // The peer opened a new stream: its old one is dead or dying (a peer keeps one). The new
  // one is recorded first, so that the old one's Closed() leaves it be.
  Inbound old = std::exchange(inbound_[peer], Inbound{.number = number, .close = std::move(close)});
  if (old.close) old.close();
  ++counters_.streams_accepted;
  return std::make_unique<InboundStream>(this, peer, number);
}

bool PeerLinks::stream_open(uint32_t peer) const {
  auto it = streams_.find(peer);
  return it != streams_.end() && it->second->open();
}

void PeerLinks::AppendMetrics(MetricsText* out) const {
  out->Counter("synod_peer_frames_refused_total",
               "peer frames refused before decoding: unauthenticated, misaddressed or replayed",
               counters_.frames_refused);
  out->Counter("synod_peer_posts_total", "message batches this replica POSTed to peers",
               counters_.posts);
  out->Counter("synod_peer_replies_total",
               "message batches this replica sent back in its answer to a peer's POST",
               counters_.replies);
  PeerStreamCounters streams;
  for (const auto& [id, stream] : streams_) {
    const PeerStreamCounters& c = stream->counters();
    streams.connects += c.connects;
    streams.failures += c.failures;
    streams.refusals += c.refusals;
    streams.frames += c.frames;
    streams.bytes += c.bytes;
  }
  out->Counter("synod_peer_stream_frames_total",
               "message batches this replica wrote on its streams to peers", streams.frames);
  out->Counter("synod_peer_stream_bytes_total", "bytes written on streams to peers", streams.bytes);
  out->Counter("synod_peer_stream_connects_total", "streams to peers opened", streams.connects);
  out->Counter("synod_peer_stream_failures_total",
               "streams to peers, or attempts to open one, that failed", streams.failures);
  out->Counter(
      "synod_peer_stream_refusals_total",
      "attempts to open a stream that a peer answered without switching (an older version)",
      streams.refusals);
  out->Counter("synod_peer_stream_frames_received_total",
               "message batches stepped from peers' streams", counters_.stream_frames_received);
  out->Counter("synod_peer_streams_accepted_total", "streams from peers taken",
               counters_.streams_accepted);
}

}  // namespace synod::server

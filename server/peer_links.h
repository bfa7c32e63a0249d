#ifndef SYNOD_SERVER_PEER_LINKS_H_
#define SYNOD_SERVER_PEER_LINKS_H_

// The peer transport of one replica: how the replica's messages reach its peers, and how
// theirs are authenticated and admitted before they are stepped. See docs/api.md ("Peer
// traffic").
//
// Outgoing: messages wait in a per-peer outbox, and leave as sealed batches
// (adapters/peer_auth.h) on the peer's stream (adapters/peer_stream.h) while it is open, one
// after another with no answer awaited. While it is not (connecting, backing off, or the
// peer is a version without streams), they go as POST /internal/v1/messages, one in flight
// per peer, and messages queued meanwhile go together in the next one.
//
// Incoming: a peer's stream (OpenStream, from the HTTP server's upgrade handler, its hello
// checked before the connection is taken) and POSTs (HandleHttp). Every frame is opened
// (MAC, destination), checked against the sender's replay window, and only then decoded;
// refusals are counted.
//
// Threading: the loop thread only.

#include <uv.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "adapters/http_client.h"
#include "adapters/http_server.h"
#include "adapters/peer_auth.h"
#include "adapters/peer_stream.h"
#include "core/synod.pb.h"
#include "server/http_util.h"
#include "server/status.h"

namespace synod::server {

// Where a peer's stream opens.
inline constexpr char kPeerStreamTarget[] = "/internal/v1/stream";
// Peer frames' sequences: the blob channel's (server/media.h) carry this bit, so that a blob
// frame is never admitted as a consensus message or the reverse...
inline constexpr uint64_t kBlobSequenceBit = uint64_t{1} << 62;
// ...and replies (to consensus POSTs, and to blob requests) carry this one.
inline constexpr uint64_t kReplySequenceBit = uint64_t{1} << 63;

struct PeerLinksOptions {
  uint32_t id = 0;
  std::map<uint32_t, PeerAddress> peers;  // every replica, this one included
  uint64_t start_unix_ms = 0;             // the process's start, for the peer sequences
  // Streams to and from peers; false behaves as a version without them (tests only).
  bool streams = true;
  // A batch takes messages up to about this many bytes (one message may pass it alone).
  size_t max_batch_bytes = 3 << 20;
  // The largest sealed batch accepted from a peer, or answered back.
  size_t max_frame_bytes = 16 << 20;
  // Reconnection back-off, from initial to max, with jitter.
  uint64_t initial_backoff_ms = 10;
  uint64_t max_backoff_ms = 125;
};

// What the node lends the transport.
struct PeerLinksHost {
  // Authentic messages from peer `from`, to be stepped into the replica.
  std::function<void(uint32_t from, const MessageBatch& batch)> step;
  // Hands what the replica has to send now to Send (a Drain of the driver).
  std::function<void()> drain;
  // Answers a refused request (counted by the node; answers to peers' batches are not).
  std::function<void(const std::shared_ptr<HttpResponder>&, HttpResponse)> send;
  std::function<uint64_t()> random_seed;
};

struct PeerLinksCounters {
  uint64_t frames_refused = 0;          // unauthenticated, misaddressed, replayed or malformed
  uint64_t posts = 0;                   // batches sent as POSTs
  uint64_t replies = 0;                 // batches sent back in the answer to a peer's POST
  uint64_t stream_frames_received = 0;  // batches stepped from peers' streams
  uint64_t streams_accepted = 0;        // peers' streams taken
};

class PeerLinks {
 public:
  // REQUIRES: `loop` and `auth` outlive this.
  PeerLinks(uv_loop_t* loop, PeerLinksOptions options, const PeerAuthenticator* auth,
            PeerLinksHost host);
  ~PeerLinks();
  PeerLinks(const PeerLinks&) = delete;
  PeerLinks& operator=(const PeerLinks&) = delete;

  // Sends `messages` to their peers (best effort: the protocol retries what is lost).
  void Send(std::vector<Message> messages);

  // Answers a request for the transport's endpoints (POST /internal/v1/messages, and a
  // GET /internal/v1/stream that was not upgraded); false if `request` is for another.
  bool HandleHttp(const HttpRequest& request, const std::shared_ptr<HttpResponder>& responder);

  // The HTTP server's upgrade handler: the stream a peer's upgrade opens, or nullptr (not a
  // peer stream, or its hello is not authentic: HandleHttp then answers the request).
  std::unique_ptr<HttpUpgradedStream> OpenStream(const HttpRequest& request,
                                                 std::function<void()> close);

  // Stops sending; connections close (the loop must run for their handles).
  void Stop();

  // Whether the stream to `peer` is open (batches to it go on it, not as POSTs).
  bool stream_open(uint32_t peer) const;

  void AppendMetrics(MetricsText* out) const;
  const PeerLinksCounters& counters() const { return counters_; }

 private:
  struct Outbox {
    bool in_flight = false;  // a POST
    std::vector<Message> pending;
    size_t pending_bytes = 0;
  };
  struct Inbound {
    uint64_t number = 0;
    std::function<void()> close;
  };
  class InboundStream;

  void Flush(uint32_t peer);
  // Takes what of `peer`'s outbox fits one batch (at least one message), sealed for it as a
  // POST's body or a stream frame, or as the `reply` to one of its POSTs.
  std::string TakeSealedBatch(uint32_t peer, bool reply);
  // Opens, admits and steps one sealed batch: a POST's body or a stream's frame, or the
  // `reply` to one of this replica's POSTs to `expected_from`. Refused frames are counted;
  // the status says why, and `stale` (when given) is set when the batch was authentic but
  // refused as a replay or as too old. Returns the sender.
  absl::StatusOr<uint32_t> StepBatch(std::string_view sealed, bool reply,
                                     uint32_t expected_from = 0, bool* stale = nullptr);
  void HandlePost(const HttpRequest& request, const std::shared_ptr<HttpResponder>& responder);
  std::string StreamHello(uint32_t peer);

  uv_loop_t* const loop_;
  const PeerLinksOptions options_;
  const PeerAuthenticator* const auth_;
  const PeerLinksHost host_;
  bool stopped_ = false;
  std::map<uint32_t, Outbox> outboxes_;
  std::map<uint32_t, std::unique_ptr<HttpClient>> clients_;        // POSTs
  std::map<uint32_t, std::unique_ptr<PeerStreamClient>> streams_;  // when options_.streams
  // POST bodies and stream frames share one sequence per peer; replies to POSTs have their
  // own (marked by kReplySequenceBit), and so do the receiver's windows.
  std::map<uint32_t, PeerSequence> send_sequences_;
  std::map<uint32_t, ReplayWindow> replay_windows_;
  std::map<uint32_t, PeerSequence> reply_sequences_;
  std::map<uint32_t, ReplayWindow> reply_windows_;
  // Streams from peers: at most one each (a newer one closes the older), by peer.
  std::map<uint32_t, Inbound> inbound_;
  uint64_t inbound_opened_ = 0;
  // While a peer's POST is being answered: its messages wait to ride back in the answer.
  uint32_t answering_peer_ = 0;
  PeerLinksCounters counters_;
};

}  // namespace synod::server

#endif  // SYNOD_SERVER_PEER_LINKS_H_

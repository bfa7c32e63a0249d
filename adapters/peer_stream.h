#ifndef SYNOD_ADAPTERS_PEER_STREAM_H_
#define SYNOD_ADAPTERS_PEER_STREAM_H_

// The peer stream: one long-lived connection from a replica to each peer, carrying the
// replica's sealed message batches (adapters/peer_auth.h) one after another, with no
// answer awaited between them (no stop-and-wait per batch).
//
// It shares the peer's HTTP port. The connection opens as an HTTP/1.1 upgrade:
//
//   GET <target> HTTP/1.1
//   Connection: Upgrade
//   Upgrade: synod-peer-stream/1
//   Synod-Peer-Hello: <hex of a sealed frame from the sender, whose payload is the protocol>
//
// The receiver opens the hello like any peer frame (MAC, destination, replay window) before
// it answers "101 Switching Protocols"; any other answer (an older server's 404, a refusal)
// means: not now. From then on the sender writes frames, each a 4-byte little-endian length
// followed by that many bytes (a sealed frame), and the receiver writes nothing. Messages
// the other way go on the peer's own stream.
//
// Delivery is best effort, as for every peer message: a frame queued on a connection that
// then fails is lost, and the protocol sends again what is still needed.
//
// Threading: everything runs on the loop's thread; nothing is thread-safe.

#include <uv.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace synod {

inline constexpr char kPeerStreamProtocol[] = "synod-peer-stream/1";
inline constexpr char kPeerStreamHelloHeader[] = "synod-peer-hello";
inline constexpr size_t kPeerStreamLengthBytes = 4;

// The bytes that carry `frame` on a stream: its length, then the frame.
std::string PeerStreamHeader(size_t frame_bytes);

// Splits a stream's bytes into frames.
class PeerStreamReader {
 public:
  // `on_frame` gets each whole frame; false from it stops the stream.
  PeerStreamReader(size_t max_frame_bytes, std::function<bool(std::string_view frame)> on_frame)
      : max_frame_bytes_(max_frame_bytes), on_frame_(std::move(on_frame)) {}

  // The next bytes of the stream. False when a frame is longer than max_frame_bytes or
  // on_frame said stop: the stream must be closed, and nothing more is read.
  bool Receive(std::string_view bytes);

  // Bytes of a frame not yet complete, held here.
  size_t buffered_bytes() const { return buffer_.size(); }

 private:
  const size_t max_frame_bytes_;
  const std::function<bool(std::string_view frame)> on_frame_;
  std::string buffer_;
  bool failed_ = false;
};

struct PeerStreamOptions {
  // From the connection attempt to the "101": otherwise the attempt failed.
  uint64_t handshake_timeout_ms = 5'000;
  // Back-off after a failed connection: from initial to max, doubling, with jitter.
  uint64_t initial_backoff_ms = 50;
  uint64_t max_backoff_ms = 2'000;
  // After a refusal (any answer but 101: an older peer, say), no new attempt this long.
  uint64_t refused_retry_ms = 30'000;
  // Frames queued in the socket beyond this: HasRoom() says no (the caller keeps or drops
  // them). One frame always fits in an empty queue.
  size_t max_queued_bytes = 16 << 20;
  // A queue that has not moved for this long (the peer stopped reading): the connection is
  // dropped and made again.
  uint64_t stall_timeout_ms = 5'000;
  // A quiet connection is probed after this long (TCP keep-alive); bytes unacknowledged for
  // stall_timeout_ms end it too (TCP_USER_TIMEOUT).
  int keepalive_seconds = 5;
  uint64_t jitter_seed = 0;
};

struct PeerStreamCounters {
  uint64_t connects = 0;  // streams opened (101 received)
  uint64_t failures = 0;  // attempts or streams that failed
  uint64_t refusals = 0;  // answers other than 101
  uint64_t frames = 0;    // frames written
  uint64_t bytes = 0;     // of them, with their length prefixes
};

// The sending side of a peer stream to one peer.
class PeerStreamClient {
 public:
  enum class State { kIdle, kConnecting, kOpen, kBackingOff, kRefused, kClosed };
  struct Callbacks {
    // The Synod-Peer-Hello header value for a new attempt (a fresh sealed frame each time).
    std::function<std::string()> hello;
    // The stream opened, or a full queue drained below half: frames may be written.
    std::function<void()> writable;
  };

  // `host` is an IPv4 or IPv6 literal. Does not connect until Connect().
  // REQUIRES: `loop` outlives this client and the handles it closes.
  PeerStreamClient(uv_loop_t* loop, std::string host, int port, std::string target,
                   PeerStreamOptions options, Callbacks callbacks);
  // Closes the client (see Close).
  ~PeerStreamClient();
  PeerStreamClient(const PeerStreamClient&) = delete;
  PeerStreamClient& operator=(const PeerStreamClient&) = delete;

  // Starts an attempt when idle (not connecting, open, backing off or refused; a refusal or
  // a back-off whose time is over counts as idle).
  void Connect();
  bool open() const { return state_ == State::kOpen; }
  State state() const { return state_; }
  // Whether a frame of `frame_bytes` may be written now.
  bool HasRoom(size_t frame_bytes) const;
  // Writes `frame` with its length. REQUIRES: open() and HasRoom(frame.size()).
  void Write(std::string frame);
  // Drops the connection; later Connects fail (nothing is sent any more). The loop must run
  // afterwards for the handles to finish closing.
  void Close();

  const PeerStreamCounters& counters() const { return counters_; }

 private:
  struct Connection;

  void OnConnected(int status);
  void OnRead(std::string_view bytes);
  void OnWritten(size_t bytes, int status);
  // Abandons the connection. `refused`: the peer answered, but not 101.
  void Fail(bool refused);
  void ArmTimer(uint64_t timeout_ms);
  void OnTimer();

  uv_loop_t* const loop_;
  const std::string host_;
  const int port_;
  const std::string target_;
  const PeerStreamOptions options_;
  const Callbacks callbacks_;
  State state_ = State::kIdle;
  Connection* connection_ = nullptr;  // frees itself once closed
  uv_timer_t* timer_;                 // heap-allocated: freed when its close completes
  uint64_t backoff_ms_ = 0;
  uint64_t jitter_state_;
  uint64_t retry_at_ms_ = 0;   // a back-off or refusal ends at this loop time
  uint64_t opened_ms_ = 0;     // when the stream last opened
  std::string answer_;         // the handshake's answer, as it arrives
  size_t queued_bytes_ = 0;    // written, not yet done
  mutable bool full_ = false;  // HasRoom said no since the queue last drained below half
  PeerStreamCounters counters_;
};

}  // namespace synod

#endif  // SYNOD_ADAPTERS_PEER_STREAM_H_

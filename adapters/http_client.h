#ifndef SYNOD_ADAPTERS_HTTP_CLIENT_H_
#define SYNOD_ADAPTERS_HTTP_CLIENT_H_

// An HTTP/1.1 client for one peer: a single keep-alive connection on a libuv loop that
// sends `POST <path>` requests with binary bodies, one at a time, in the order posted.
//
// Threading: everything runs on the thread that runs the loop; nothing is thread-safe.
//
// Failure model: a request is answered at most once, with the response or an error.
// - The connection fails (refused, reset, closed by the peer, bad response) while a
//   request is on the wire: that request fails with Unavailable. It may or may not have
//   reached the peer, so it is never re-sent here; the caller decides.
// - Requests not yet sent wait for the next connection. Reconnection backs off
//   exponentially (initial_backoff_ms doubling up to max_backoff_ms) after failures.
// - Each request fails with DeadlineExceeded request_timeout_ms after Post, queued or
//   sent. A timed-out request on the wire also closes the connection (its answer could
//   otherwise be taken for the next request's).
// - At most max_queued_requests wait; posting another fails the oldest unsent one with
//   ResourceExhausted.

#include <uv.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "adapters/http_server.h"

namespace synod {

struct HttpClientOptions {
  uint64_t request_timeout_ms = 5'000;
  uint64_t initial_backoff_ms = 50;
  uint64_t max_backoff_ms = 2'000;
  // Nonzero: each back-off waits a random time between half the current back-off and all
  // of it, drawn from a generator seeded with this, so that clients of a peer that comes
  // back do not all reconnect at once.
  uint64_t backoff_jitter_seed = 0;
  size_t max_queued_requests = 1024;
  size_t max_response_bytes = 64 * 1024 * 1024;
};

namespace http_internal {
struct ClientConnection;

// The wait for a back-off of `backoff_ms` with jitter: in [backoff_ms / 2, backoff_ms],
// drawn from `state` (a splitmix64 state, advanced).
uint64_t JitteredBackoffMs(uint64_t backoff_ms, uint64_t* state);
}  // namespace http_internal

class HttpClient {
 public:
  using Callback = std::function<void(absl::StatusOr<HttpResponse>)>;

  // `host` is an IPv4 or IPv6 literal. Connects lazily, on the first Post.
  // REQUIRES: `loop` outlives this client and the handles it closes.
  HttpClient(uv_loop_t* loop, std::string host, int port, HttpClientOptions options = {});
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;
  // Closes the client (see Close).
  ~HttpClient();

  // Sends `POST path` with `body` (Content-Type: application/octet-stream). `done` runs
  // once, on the loop, with the response (any status) or an error (see the failure model
  // above); it may run before Post returns when the request is refused at once.
  // REQUIRES: `done` does not destroy this client.
  void Post(std::string path, std::string body, Callback done);

  // Fails every pending request with Cancelled (before returning) and closes the
  // connection. Later Posts fail with FailedPrecondition. The loop must run afterwards for
  // the client's handles to finish closing.
  void Close();

 private:
  friend struct http_internal::ClientConnection;

  struct PendingRequest {
    std::string path;
    std::string body;
    Callback done;
    uint64_t deadline_ms;  // in uv_now() time
  };

  void Pump();
  void Connect();
  void OnConnected(int status);
  void OnResponse(HttpResponse response, bool keep_alive);
  // Abandons the connection; an in-flight request fails with `error`. `backoff`: wait
  // before reconnecting (the connection failed rather than just ended).
  void DropConnection(const absl::Status& error, bool backoff);
  void ArmDeadlineTimer();
  void OnDeadline();

  uv_loop_t* const loop_;
  const std::string host_;
  const int port_;
  const HttpClientOptions options_;
  bool closed_ = false;
  std::deque<PendingRequest> queue_;  // the front one is on the wire when in_flight_
  bool in_flight_ = false;
  http_internal::ClientConnection* connection_ = nullptr;  // frees itself once closed
  bool connected_ = false;
  bool backing_off_ = false;
  uint64_t backoff_ms_;
  uint64_t jitter_state_;
  uv_timer_t* backoff_timer_;   // heap-allocated: freed when its close completes
  uv_timer_t* deadline_timer_;  // likewise
};

}  // namespace synod

#endif  // SYNOD_ADAPTERS_HTTP_CLIENT_H_

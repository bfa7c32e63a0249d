#ifndef SYNOD_ADAPTERS_HTTP_SERVER_H_
#define SYNOD_ADAPTERS_HTTP_SERVER_H_

// An HTTP/1.1 server on a libuv loop, parsing with llhttp.
//
// Threading: everything (the constructor, Listen, Close, the handler, Responder::Send)
// runs on the thread that runs the loop. Nothing here is thread-safe.
//
// Each connection handles one request at a time: once a request is complete the server
// stops parsing that connection until the request is answered and the answer written, so
// pipelined requests are answered in order. The handler answers through a Responder, at
// once or later (after consensus, seconds later, or never if the connection dies first).
//
// A client that shuts down its sending side (a half-close) may still be reading: every
// complete request it sent before is answered, in order, and then the connection closes. A
// request cut short by the end of the input is answered 400.
//
// Limits, each against a way one client could take what all clients share: a body's size is
// checked when its headers are complete, before any of it is buffered (and a chunked body as
// it arrives); every request has a deadline; and when all connections are taken, the one idle
// the longest makes room for a newcomer (see HttpServerLimits).
//
// Streamed responses: a response may carry its body as an HttpBodySource instead of a string.
// The server writes the head, then asks the source for one piece at a time, and asks for the
// next only once the previous piece has been written to the socket: a client that reads
// slowly holds one piece of memory, not the body.
//
// Streamed request bodies: a request for which HttpServerLimits::stream_body_for says so is
// handed to the stream handler as soon as its headers are complete, and its body follows in
// pieces to the HttpBodySink the handler returns. The server reads no more of the connection
// while the sink is busy with a piece (back-pressure: a slow disk slows the client, memory
// holds one read's worth). The handler may answer before the body is complete (a bad key, a
// full disk): the rest of the body is then not read, and the connection closes after the
// answer. A client waiting for "100 Continue" gets it only once the handler has taken the
// request without answering. Other requests' bodies are delivered whole, bounded by the
// request's body limit.
//
// Upgrades: a complete request asking for another protocol ("Connection: upgrade" and an
// "Upgrade" header, no body) goes first to the upgrade handler, when one is set. If the
// handler takes it, the server answers "101 Switching Protocols" and from then on only
// passes the connection's bytes to the HttpUpgradedStream the handler returned: no parsing,
// no idle or request deadline, never evicted for a newcomer (the handler decides how many
// it takes), and TCP keep-alive probes to notice a peer that vanished. Otherwise the request
// is answered by the ordinary handler and the connection closes after the answer.

#include <uv.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace synod {

using HttpHeaders = std::vector<std::pair<std::string, std::string>>;

struct HttpRequest {
  std::string method;   // "GET", "POST", ...
  std::string target;   // path and query as sent, e.g. "/v1/db?x=1"
  HttpHeaders headers;  // names lower-cased, values as sent, in arrival order
  std::string body;     // de-chunked
};

// A response body produced in pieces, with back-pressure (see above). Used on the loop thread
// only.
class HttpBodySource {
 public:
  using ReadDone = std::function<void(absl::StatusOr<std::string> piece)>;
  virtual ~HttpBodySource() = default;
  // The body's length in bytes, sent as its Content-Length before any piece.
  virtual uint64_t size() const = 0;
  // Produces the next piece, 1 to `max_bytes` bytes long, and passes it to `done` on the loop
  // thread, at once or later. The server asks again only after `done` has run, and never
  // beyond size(). An error (or an empty piece) ends the connection: the head is gone, so
  // the client sees a body shorter than its Content-Length. The server may drop the source
  // (the client left) with a read under way: `done` must then still be safe to run, or never
  // run.
  virtual void Read(size_t max_bytes, ReadDone done) = 0;
};

// A request body received in pieces (see "Streamed request bodies" above). Used on the loop
// thread only. Each sink gets Write zero or more times, then exactly one of Finish or Abort.
class HttpBodySink {
 public:
  virtual ~HttpBodySink() = default;
  // The next piece of the body, never empty. The server reads no more of the connection
  // until `done` has run (at once or later, on the loop thread). `done` is safe to run after
  // the connection is gone.
  virtual void Write(std::string piece, std::function<void()> done) = 0;
  // The whole body has arrived, and every Write's `done` has run. The request is answered
  // through its Responder as usual.
  virtual void Finish() = 0;
  // The body will never be complete: the client left or sent it too slowly, it was malformed
  // or too large, or the request was answered before the body was complete. No answer is
  // expected any more (the server answers what it must, or the connection is gone).
  virtual void Abort() = 0;
};

// A connection taken over by another protocol (see "Upgrades" above). Used on the loop
// thread only.
class HttpUpgradedStream {
 public:
  virtual ~HttpUpgradedStream() = default;
  // The next bytes the client sent, in order, never empty (the first call may carry bytes
  // that followed the upgrade request in the same read). The server reads no more until it
  // returns. False: close the connection.
  virtual bool Receive(std::string_view bytes) = 0;
  // The connection is closing: the client left, reading failed, Receive returned false,
  // the handler's `close` ran, or the server closes. Called once and last (possibly from
  // inside Receive); the stream is destroyed later, once the connection's handles are
  // closed.
  virtual void Closed() = 0;
};

struct HttpResponse {
  int status = 200;
  // Content-Length is added by the server (and Connection when it closes); any such
  // headers given here are dropped.
  HttpHeaders headers;
  std::string body;
  // When set, the body comes from here (and `body` must be empty).
  std::shared_ptr<HttpBodySource> body_source;
};

// Turns on TCP keep-alive probes on a connected TCP stream: the first after `idle_seconds`
// of quiet, then a few more a third of that apart, after which the connection fails.
void SetKeepAlive(uv_stream_t* stream, int idle_seconds);

// Synod's JSON error shape: {"error":{"code":code,"message":message}}, with
// Content-Type: application/json. `code` and `message` may hold any bytes: the body is
// always valid JSON in valid UTF-8 (a byte that is not part of a well-formed UTF-8 sequence
// becomes U+FFFD).
HttpResponse JsonErrorResponse(int status, std::string_view code, std::string_view message);

struct HttpServerLimits {
  // Request line plus headers, counted as field and value bytes plus 4 per header line.
  // Larger: 431 header_too_large, then close.
  size_t max_header_bytes = 16 * 1024;
  // The largest body of any request. A request's own limit is the smaller of this and
  // max_body_bytes_for's answer. Over it: 413 payload_too_large, then close; a declared
  // Content-Length is refused as soon as the headers are complete, before any body byte is
  // buffered (and before "100 Continue"), and a chunked body once the bytes received pass it.
  size_t max_body_bytes = 64 * 1024 * 1024;
  // The body limit of one request, from its method and target (path and query as sent), so
  // that an endpoint taking small JSON bodies refuses a large one without buffering it.
  // Called once per request, on the loop thread, when its headers are complete; it must not
  // call back into the server. Unset: max_body_bytes for every request.
  std::function<size_t(std::string_view method, std::string_view target)> max_body_bytes_for;
  // Whether a request's body is streamed to the stream handler (see "Streamed request
  // bodies") rather than delivered whole, from its head (method, target, headers; the body
  // empty): the streamed body's limit, or 0 to deliver it whole, bounded as above
  // (max_body_bytes bounds the bodies held in memory, not streamed ones). Called like
  // max_body_bytes_for. Unset, or no stream handler: never.
  std::function<size_t(const HttpRequest& head)> stream_body_for;
  // A streamed request body must arrive at this rate on average: after request_timeout_ms,
  // a request whose body has arrived slower (not counting the time the sink was busy) is
  // answered 408, so that a client trickling bytes cannot hold what its sink holds. A body
  // that sends nothing for request_timeout_ms is answered 408 too.
  uint64_t min_request_bytes_per_second = 256 << 10;
  // A kept-alive connection with no request under way is closed after this long.
  uint64_t idle_timeout_ms = 60'000;
  // From a request's first byte to its last: otherwise 408 request_timeout, then close.
  uint64_t request_timeout_ms = 30'000;
  // A response the client does not read within this long: the connection is closed.
  uint64_t write_timeout_ms = 30'000;
  // A streamed body must be read at this rate on average: it is cut off (the connection
  // closed) at write_timeout_ms plus its size over this rate, so that a client reading
  // slowly cannot hold what the body holds (a file, a slot) for ever.
  uint64_t min_stream_bytes_per_second = 1 << 20;
  // Open connections at most. A connection arriving when all are taken closes the one that
  // has been idle the longest (kept alive with no request under way and no response being
  // written): its client loses only a connection it can reopen, while refusing newcomers
  // would let idle connections lock everyone out. When none is idle, the newcomer is
  // accepted and closed at once.
  size_t max_connections = 1024;
};

namespace http_internal {
class ServerConnection;
}  // namespace http_internal

// The right to answer one request. Safe to keep after the connection is gone: it holds a
// weak handle and a request id, never a pointer that can dangle.
class Responder {
 public:
  Responder(const Responder&) = delete;
  Responder& operator=(const Responder&) = delete;
  // A responder dropped without Send answers 500, so that a connection never waits for
  // an answer nobody will give.
  ~Responder();

  // Sends `response` on the connection that carried the request. Does nothing when that
  // connection has closed meanwhile (client gone, timeout, server closed).
  // REQUIRES: called at most once, on the loop thread.
  void Send(HttpResponse response);

  // False once the connection that carried the request is gone: nobody will read an answer.
  // A client that has only ended its input is still there: it may be reading.
  bool connection_open() const;

 private:
  friend class http_internal::ServerConnection;
  Responder(std::weak_ptr<http_internal::ServerConnection> connection, uint64_t request_id);

  std::weak_ptr<http_internal::ServerConnection> connection_;
  uint64_t request_id_;
  bool sent_ = false;
};

class HttpServer {
 public:
  // Called once per complete request. It may answer through `responder` before returning
  // or keep `responder` and answer later.
  using Handler = std::function<void(HttpRequest request, std::shared_ptr<Responder> responder)>;
  // Called once per streamed request when its headers are complete (`head.body` is empty).
  // Returns the sink for its body; or answers through `responder` and returns nullptr (the
  // body is then not read). A null result without an answer is answered 500.
  using StreamHandler = std::function<std::shared_ptr<HttpBodySink>(
      const HttpRequest& head, std::shared_ptr<Responder> responder)>;

  // Called once per complete request that asks for an upgrade (see "Upgrades" above).
  // Returns the stream that takes the connection over, or nullptr to answer the request
  // through the ordinary handler. `close` closes the connection later (safe to call at any
  // time, even after it closed); the stream is told through Closed().
  using UpgradeHandler = std::function<std::unique_ptr<HttpUpgradedStream>(
      const HttpRequest& request, std::function<void()> close)>;

  // REQUIRES: `loop` outlives this server.
  HttpServer(uv_loop_t* loop, HttpServerLimits limits, Handler handler,
             StreamHandler stream_handler = nullptr);
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;
  // REQUIRES: Listen never succeeded, or Close's `done` has run.
  ~HttpServer();

  // Binds host:port (an IPv4 or IPv6 literal; port 0 picks a free port) and starts
  // accepting. InvalidArgument for a bad address, Unavailable when the socket cannot be
  // bound, FailedPrecondition when already listening or closed.
  absl::Status Listen(const std::string& host, int port);

  // Sets the upgrade handler. REQUIRES: called before Listen.
  void set_upgrade_handler(UpgradeHandler handler) { upgrade_handler_ = std::move(handler); }

  // The bound port. REQUIRES: Listen succeeded.
  int port() const;

  // Stops listening and closes every connection; answers still pending are dropped.
  // `done` runs on the loop once every handle is closed (at once if none was open).
  // REQUIRES: called at most once.
  void Close(std::function<void()> done);

  // Connections, including ones being closed.
  size_t connection_count() const { return connections_.size(); }

 private:
  friend class http_internal::ServerConnection;

  static void OnConnection(uv_stream_t* listener, int status);
  static void OnListenerClosed(uv_handle_t* handle);
  void OnConnectionClosed(uint64_t connection_id);
  void MaybeFinishClose();

  uv_loop_t* const loop_;
  const HttpServerLimits limits_;
  const Handler handler_;
  const StreamHandler stream_handler_;
  UpgradeHandler upgrade_handler_;
  uv_tcp_t* listener_ = nullptr;  // heap-allocated: frees itself when its close completes
  bool listener_closing_ = false;
  int port_ = 0;
  bool closed_ = false;
  std::function<void()> close_done_;
  uint64_t next_connection_id_ = 1;
  std::unordered_map<uint64_t, std::shared_ptr<http_internal::ServerConnection>> connections_;
  // Connections not yet closing; the ones in connections_ that max_connections counts.
  size_t open_connection_count_ = 0;
  // Idle connections, the longest idle first. A connection is in this list exactly while its
  // idle timer is armed, and leaves it before it closes.
  std::list<http_internal::ServerConnection*> idle_connections_;
  std::vector<char> read_buffer_;  // shared: libuv reads into it and we parse at once
};

}  // namespace synod

#endif  // SYNOD_ADAPTERS_HTTP_SERVER_H_

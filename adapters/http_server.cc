#include "adapters/http_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <optional>

#include "adapters/json_text.h"
#include "core/check.h"
#include "core/utf8.h"
#include "llhttp.h"

namespace synod {
namespace {

constexpr size_t kReadBufferBytes = 64 * 1024;
// Unparsed bytes kept while a request is being answered; beyond this, reading pauses.
constexpr size_t kMaxBufferedInputBytes = 64 * 1024;
// Before closing a connection after its last response, the server shuts down its sending
// side and drains the client's input for up to this long: closing with unread input
// would reset the connection and could destroy the response before the client reads it.
constexpr uint64_t kLingerMs = 1000;
// An upgraded connection, quiet this long, is probed (TCP keep-alive), so that a peer
// machine that vanished is noticed within about twice this.
constexpr int kUpgradedKeepAliveSeconds = 10;
constexpr int kListenBacklog = 511;
// A declared body is given room for up to this many bytes at once (more grows as it comes,
// so that a client declaring a large body and sending none holds little).
constexpr uint64_t kMaxReservedBodyBytes = 2 << 20;
// A streamed body is asked for in pieces of at most this many bytes.
constexpr size_t kStreamPieceBytes = 256 * 1024;

const char* ReasonPhrase(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 201:
      return "Created";
    case 204:
      return "No Content";
    case 206:
      return "Partial Content";
    case 304:
      return "Not Modified";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 409:
      return "Conflict";
    case 413:
      return "Payload Too Large";
    case 415:
      return "Unsupported Media Type";
    case 416:
      return "Range Not Satisfiable";
    case 431:
      return "Request Header Fields Too Large";
    case 500:
      return "Internal Server Error";
    case 501:
      return "Not Implemented";
    case 503:
      return "Service Unavailable";
    case 507:
      return "Insufficient Storage";
    default:
      return "";
  }
}

bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) !=
        std::tolower(static_cast<unsigned char>(b[i]))) {
      return false;
    }
  }
  return true;
}

// A header the handler may not set: the server owns the message framing.
bool IsFramingHeader(std::string_view name) {
  return EqualsIgnoreCase(name, "content-length") || EqualsIgnoreCase(name, "connection") ||
         EqualsIgnoreCase(name, "transfer-encoding");
}

bool IsSafeHeaderText(std::string_view text) {
  return text.find_first_of(std::string_view("\r\n\0", 3)) == std::string_view::npos;
}

// The response's bytes on the wire, or nullopt when the handler's response cannot be sent
// as given (bad status or a header that would break the framing).
std::optional<std::string> SerializeHead(const HttpResponse& response, bool close, bool send_body) {
  if (response.body_source != nullptr && !response.body.empty()) return std::nullopt;
  if (response.status < 200 || response.status > 599) return std::nullopt;
  std::string head =
      "HTTP/1.1 " + std::to_string(response.status) + " " + ReasonPhrase(response.status) + "\r\n";
  for (const auto& [name, value] : response.headers) {
    if (name.empty() || !IsSafeHeaderText(name) || name.find(':') != std::string::npos ||
        !IsSafeHeaderText(value)) {
      return std::nullopt;
    }
    if (IsFramingHeader(name)) continue;
    head += name + ": " + value + "\r\n";
  }
  if (send_body) {
    const uint64_t length =
        response.body_source != nullptr ? response.body_source->size() : response.body.size();
    head += "Content-Length: " + std::to_string(length) + "\r\n";
  }
  if (close) head += "Connection: close\r\n";
  head += "\r\n";
  return head;
}

struct ParseError {
  int status;
  const char* code;
  std::string message;
};

}  // namespace

void SetKeepAlive(uv_stream_t* stream, int idle_seconds) {
  uv_tcp_keepalive(reinterpret_cast<uv_tcp_t*>(stream), 1, idle_seconds);
  uv_os_fd_t fd;
  if (uv_fileno(reinterpret_cast<uv_handle_t*>(stream), &fd) != 0) return;
  // libuv sets only the idle time: the probes' interval and count are the system's (75 s
  // and 9 by default), which would take minutes to give up on a peer that vanished.
  const int interval = std::max(1, idle_seconds / 3);
  const int count = 3;
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof(count));
}

HttpResponse JsonErrorResponse(int status, std::string_view code, std::string_view message) {
  HttpResponse response;
  response.status = status;
  response.headers.emplace_back("Content-Type", "application/json");
  response.body = ErrorJson(code, message);
  return response;
}

namespace http_internal {

// One accepted connection. Owned by HttpServer::connections_ until both of its handles
// have closed; Responders hold only weak handles to it.
class ServerConnection : public std::enable_shared_from_this<ServerConnection> {
 public:
  ServerConnection(HttpServer* server, uint64_t id) : server_(server), id_(id) {}
  ~ServerConnection() { SYNOD_CHECK(!idle_) << "a connection destroyed while listed as idle"; }

  // Accepts the pending connection from `listener` and starts reading it.
  void Start(uv_stream_t* listener) {
    SYNOD_CHECK_EQ(uv_tcp_init(server_->loop_, &tcp_), 0);
    SYNOD_CHECK_EQ(uv_timer_init(server_->loop_, &timer_), 0);
    tcp_.data = this;
    timer_.data = this;
    llhttp_init(&parser_, HTTP_REQUEST, &Settings());
    parser_.data = this;
    if (uv_accept(listener, reinterpret_cast<uv_stream_t*>(&tcp_)) != 0) {
      Close();
      return;
    }
    uv_tcp_nodelay(&tcp_, 1);
    ArmTimer(TimerPurpose::kIdle, server_->limits_.idle_timeout_ms);
    StartReading();
  }

  // Closes both handles; the server drops this connection once they have closed.
  void Close() {
    if (closing_) return;
    closing_ = true;
    if (upgraded_ != nullptr) upgraded_->Closed();  // kept until the handles are closed
    body_source_.reset();
    AbortSink();
    LeaveIdleList();
    SYNOD_CHECK_GT(server_->open_connection_count_, 0u);
    --server_->open_connection_count_;
    uv_close(reinterpret_cast<uv_handle_t*>(&tcp_), OnHandleClosed);
    uv_close(reinterpret_cast<uv_handle_t*>(&timer_), OnHandleClosed);
  }

  bool open() const { return !closing_; }

  // Closes this idle connection to make room for a new one.
  void Evict() {
    SYNOD_CHECK(idle_ && !closing_ && !writing_ && in_flight_request_id_ == 0 &&
                !message_in_progress_)
        << "evicting a connection that is not idle";
    Close();
  }

  // Answers request `request_id`, unless it is no longer the one awaiting an answer.
  // An answer given before the request's body was read whole (a streamed one) ends the
  // body: the rest is not read, and the connection closes after the answer.
  void Respond(uint64_t request_id, HttpResponse response) {
    if (closing_ || request_id != in_flight_request_id_ || writing_) return;
    WriteResponse(std::move(response), !keep_alive_ || server_->closed_ || message_in_progress_);
    AbortSink();  // after: a sink that goes with its Responder finds the answer given
  }

 private:
  enum class TimerPurpose { kIdle, kRequest, kWrite, kLinger };

  struct PendingWrite {
    uv_write_t request;
    ServerConnection* connection;
    std::string head;
    std::string body;
    // Whether the response goes on (a streamed body's next piece) once this is written.
    bool more = false;
  };

  static ServerConnection* From(llhttp_t* parser) {
    return static_cast<ServerConnection*>(parser->data);
  }

  static const llhttp_settings_t& Settings() {
    static const llhttp_settings_t settings = [] {
      llhttp_settings_t s;
      llhttp_settings_init(&s);
      s.on_message_begin = [](llhttp_t* p) { return From(p)->OnMessageBegin(); };
      s.on_url = [](llhttp_t* p, const char* at, size_t length) {
        return From(p)->OnHeaderBytes(&From(p)->request_.target, at, length, false);
      };
      s.on_header_field = [](llhttp_t* p, const char* at, size_t length) {
        return From(p)->OnHeaderBytes(&From(p)->header_field_, at, length, true);
      };
      s.on_header_value = [](llhttp_t* p, const char* at, size_t length) {
        return From(p)->OnHeaderBytes(&From(p)->header_value_, at, length, false);
      };
      s.on_header_value_complete = [](llhttp_t* p) { return From(p)->OnHeaderComplete(); };
      s.on_headers_complete = [](llhttp_t* p) { return From(p)->OnHeadersComplete(); };
      s.on_body = [](llhttp_t* p, const char* at, size_t length) {
        return From(p)->OnBody(at, length);
      };
      s.on_message_complete = [](llhttp_t* p) { return From(p)->OnMessageComplete(); };
      return s;
    }();
    return settings;
  }

  int OnMessageBegin() {
    message_in_progress_ = true;
    request_ = HttpRequest();
    header_bytes_ = 0;
    body_received_ = 0;
    ArmTimer(TimerPurpose::kRequest, server_->limits_.request_timeout_ms);
    return HPE_OK;
  }

  int CountHeaderBytes(size_t length) {
    header_bytes_ += length;
    if (header_bytes_ <= server_->limits_.max_header_bytes) return HPE_OK;
    parse_error_ = ParseError{431, "header_too_large",
                              "request line and headers exceed " +
                                  std::to_string(server_->limits_.max_header_bytes) + " bytes"};
    return HPE_USER;
  }

  int OnHeaderBytes(std::string* into, const char* at, size_t length, bool lower_case) {
    if (int rc = CountHeaderBytes(length); rc != HPE_OK) return rc;
    for (size_t i = 0; i < length; ++i) {
      *into +=
          lower_case ? static_cast<char>(std::tolower(static_cast<unsigned char>(at[i]))) : at[i];
    }
    return HPE_OK;
  }

  int OnHeaderComplete() {
    if (int rc = CountHeaderBytes(4); rc != HPE_OK) return rc;  // ": " and CRLF
    request_.headers.emplace_back(std::move(header_field_), std::move(header_value_));
    header_field_.clear();
    header_value_.clear();
    return HPE_OK;
  }

  int OnHeadersComplete() {
    request_.method = llhttp_method_name(static_cast<llhttp_method_t>(parser_.method));
    // An upgrade (or CONNECT) is answered as a plain request, and then the connection
    // closes: what follows on the wire would not be HTTP/1.1.
    keep_alive_ = llhttp_should_keep_alive(&parser_) && !parser_.upgrade;
    const HttpServerLimits& limits = server_->limits_;
    const size_t stream_limit = server_->stream_handler_ != nullptr && limits.stream_body_for
                                    ? limits.stream_body_for(request_)
                                    : 0;
    stream_next_ = stream_limit > 0;
    body_limit_bytes_ = limits.max_body_bytes;
    if (stream_next_) {
      body_limit_bytes_ = stream_limit;
    } else if (limits.max_body_bytes_for) {
      body_limit_bytes_ =
          std::min(body_limit_bytes_, limits.max_body_bytes_for(request_.method, request_.target));
    }
    // Refused before any body byte is buffered, and before a client waiting for
    // "100 Continue" sends one.
    if ((parser_.flags & F_CONTENT_LENGTH) && parser_.content_length > body_limit_bytes_) {
      parse_error_ = BodyTooLarge();
      stream_next_ = false;
      return -1;
    }
    // A streamed request goes to its handler outside the parser (StartStream), which also
    // decides whether the client gets "100 Continue".
    if (stream_next_) return HPE_PAUSED;
    // One allocation for a declared body of ordinary size, instead of a chain of them as it
    // grows (each large one is fresh memory, faulted in page by page).
    if (parser_.flags & F_CONTENT_LENGTH) {
      request_.body.reserve(
          static_cast<size_t>(std::min<uint64_t>(parser_.content_length, kMaxReservedBodyBytes)));
    }
    if (ExpectsContinue(request_)) WriteContinue();
    return HPE_OK;
  }

  static bool ExpectsContinue(const HttpRequest& request) {
    for (const auto& [name, value] : request.headers) {
      if (name == "expect" && EqualsIgnoreCase(value, "100-continue")) return true;
    }
    return false;
  }

  // A client that asked may wait for this interim answer before sending the body. A write
  // error here is left for the next read or write to meet.
  void WriteContinue() {
    static char continue_line[] = "HTTP/1.1 100 Continue\r\n\r\n";
    auto* request = new uv_write_t;
    uv_buf_t buf = uv_buf_init(continue_line, sizeof(continue_line) - 1);
    if (uv_write(request, reinterpret_cast<uv_stream_t*>(&tcp_), &buf, 1,
                 [](uv_write_t* done, int) { delete done; }) != 0) {
      delete request;
    }
  }

  // A chunked body is counted as it arrives; a body with a Content-Length was checked whole
  // when its headers were complete.
  int OnBody(const char* at, size_t length) {
    SYNOD_CHECK_LE(body_received_, body_limit_bytes_);
    if (length > body_limit_bytes_ - body_received_) {
      parse_error_ = BodyTooLarge();
      return HPE_USER;
    }
    body_received_ += length;
    (sink_ != nullptr ? body_pending_ : request_.body).append(at, length);
    return HPE_OK;
  }

  ParseError BodyTooLarge() const {
    return ParseError{413, "payload_too_large",
                      "request body exceeds " + std::to_string(body_limit_bytes_) + " bytes"};
  }

  // Pausing stops llhttp right after this request, so that the next pipelined request is
  // parsed only once this one is answered.
  int OnMessageComplete() {
    message_in_progress_ = false;
    if (sink_ != nullptr) body_complete_ = true;
    return HPE_PAUSED;
  }

  void StartReading() {
    if (reading_ || closing_ || input_ended_) return;
    reading_ = true;
    uv_read_start(reinterpret_cast<uv_stream_t*>(&tcp_), OnAlloc, OnRead);
  }

  void StopReading() {
    if (!reading_) return;
    reading_ = false;
    uv_read_stop(reinterpret_cast<uv_stream_t*>(&tcp_));
  }

  static void OnAlloc(uv_handle_t* handle, size_t, uv_buf_t* buf) {
    auto* self = static_cast<ServerConnection*>(handle->data);
    std::vector<char>& buffer = self->server_->read_buffer_;
    *buf = uv_buf_init(buffer.data(), buffer.size());
  }

  static void OnRead(uv_stream_t* stream, ssize_t nread, const uv_buf_t* buf) {
    auto* self = static_cast<ServerConnection*>(stream->data);
    if (self->upgraded_ != nullptr) {
      if (nread < 0) {
        self->Close();  // the end of the input, or an error: the stream is over
      } else if (nread > 0 && !self->closing_ &&
                 !self->upgraded_->Receive(std::string_view(buf->base, nread))) {
        self->Close();
      }
      return;
    }
    if (nread == UV_EOF && !self->lingering_) {
      self->OnInputEnded();
      return;
    }
    if (nread < 0) {
      // An error, or the end of the input drained while lingering. A client whose
      // connection fails with a request unanswered is gone for good: the answer, when it
      // comes, is dropped.
      self->Close();
      return;
    }
    if (nread == 0 || self->close_after_write_ || self->lingering_) return;  // draining
    self->input_.append(buf->base, static_cast<size_t>(nread));
    if (!self->Parsing()) {
      if (self->input_.size() > kMaxBufferedInputBytes) self->StopReading();
      return;
    }
    self->Process();
  }

  // The client has sent all it will, but may still be reading (it shut down only its sending
  // side): every complete request already received is answered in order, then the
  // connection closes. Were it closed at once instead, pipelined requests would go
  // unanswered.
  void OnInputEnded() {
    input_ended_ = true;
    StopReading();
    // Otherwise the answer under way (or the sink's piece) continues the work when done.
    if (Parsing() && !writing_) Process();
  }

  // Whether input is parsed now: no request is being answered, or a streamed one's sink
  // waits for more of its body.
  bool Parsing() const {
    return in_flight_request_id_ == 0 || (sink_ != nullptr && !sink_busy_ && !body_complete_);
  }

  // Parses buffered input until a request is complete (and dispatched), the input runs
  // out, or the input is bad. Once the input has ended and every request in it has been
  // answered, finishes the connection.
  void Process() {
    // After a streamed request's headers, the parser runs once even on no input: a body of
    // Content-Length 0 is complete without another byte.
    bool run_empty = false;
    while (!closing_ && Parsing() && !close_after_write_ && (!input_.empty() || run_empty)) {
      run_empty = false;
      llhttp_errno_t rc = llhttp_execute(&parser_, input_.data(), input_.size());
      if (rc == HPE_OK) {
        input_.clear();
      } else if (rc == HPE_PAUSED || rc == HPE_PAUSED_UPGRADE) {
        size_t consumed = llhttp_get_error_pos(&parser_) - input_.data();
        SYNOD_CHECK_LE(consumed, input_.size());
        input_.erase(0, consumed);
        llhttp_resume(&parser_);
        if (stream_next_) {
          stream_next_ = false;
          StartStream();
          run_empty = true;
        } else if (sink_ == nullptr) {
          if (parser_.upgrade && Upgrade()) return;
          Dispatch();
        }  // else a streamed body is complete: PumpBody finishes it
      } else if (parse_error_) {
        Fail(std::move(*parse_error_));
      } else {
        Fail(ParseError{400, "bad_request",
                        std::string("malformed request: ") + llhttp_errno_name(rc) + ": " +
                            llhttp_get_error_reason(&parser_)});
      }
    }
    if (closing_ || close_after_write_) return;
    if (sink_ != nullptr) {
      PumpBody();
      return;
    }
    if (in_flight_request_id_ != 0) return;
    if (!input_ended_) {
      StartReading();
      return;
    }
    // Every complete request has been answered and written. What is left is nothing, or the
    // start of a request that will never be completed. (Not llhttp_finish: after a pause in
    // on_message_complete it reports the last complete request as unfinished until more
    // input is parsed.)
    if (message_in_progress_) {
      Fail(ParseError{400, "bad_request", "the input ended inside a request"});
    } else {
      Close();
    }
  }

  void Dispatch() {
    SYNOD_CHECK(!writing_);
    StopTimer();
    in_flight_request_id_ = next_request_id_++;
    in_flight_is_head_ = request_.method == "HEAD";
    std::shared_ptr<Responder> responder(new Responder(weak_from_this(), in_flight_request_id_));
    HttpRequest request = std::move(request_);
    request_ = HttpRequest();
    server_->handler_(std::move(request), std::move(responder));
  }

  // Offers the request that asks for an upgrade to the upgrade handler. True: the connection
  // now belongs to the stream it returned (or is closing).
  bool Upgrade() {
    if (server_->upgrade_handler_ == nullptr || request_.method == "CONNECT" ||
        body_received_ > 0) {
      return false;
    }
    std::string protocol;
    for (const auto& [name, value] : request_.headers) {
      if (name == "upgrade") protocol = value;
    }
    if (protocol.empty() || !IsSafeHeaderText(protocol)) return false;
    std::weak_ptr<ServerConnection> weak = weak_from_this();
    std::unique_ptr<HttpUpgradedStream> stream = server_->upgrade_handler_(request_, [weak] {
      if (std::shared_ptr<ServerConnection> self = weak.lock()) self->Close();
    });
    if (stream == nullptr) return false;
    if (closing_) {  // the handler closed it already
      stream->Closed();
      return true;
    }
    request_ = HttpRequest();
    StopTimer();  // no idle or request deadline from now on, and off the idle list
    upgraded_ = std::move(stream);
    SetKeepAlive(reinterpret_cast<uv_stream_t*>(&tcp_), kUpgradedKeepAliveSeconds);
    // A failed write is met by the next read.
    struct RawWrite {
      uv_write_t request;
      std::string bytes;
    };
    auto* write = new RawWrite;
    write->bytes =
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + protocol +
        "\r\n\r\n";
    write->request.data = write;
    uv_buf_t buf = uv_buf_init(write->bytes.data(), write->bytes.size());
    if (uv_write(&write->request, reinterpret_cast<uv_stream_t*>(&tcp_), &buf, 1,
                 [](uv_write_t* done, int) { delete static_cast<RawWrite*>(done->data); }) != 0) {
      delete write;
      Close();
      return true;
    }
    std::string rest = std::move(input_);
    input_.clear();
    if (!rest.empty() && !upgraded_->Receive(rest)) Close();
    if (input_ended_) Close();  // the client sent all it will: the stream is over
    if (!closing_) StartReading();
    return true;
  }

  // Hands a streamed request to the stream handler, whose sink then takes its body.
  void StartStream() {
    SYNOD_CHECK(!writing_ && sink_ == nullptr);
    const uint64_t request_id = next_request_id_++;
    in_flight_request_id_ = request_id;
    in_flight_is_head_ = request_.method == "HEAD";
    body_complete_ = false;
    stream_started_ms_ = uv_now(server_->loop_);
    stream_busy_ms_ = 0;
    const bool expects_continue = ExpectsContinue(request_);
    std::shared_ptr<Responder> responder(new Responder(weak_from_this(), request_id));
    HttpRequest head = std::move(request_);
    request_ = HttpRequest();
    std::shared_ptr<HttpBodySink> sink = server_->stream_handler_(head, std::move(responder));
    if (closing_ || writing_ || in_flight_request_id_ != request_id) {
      if (sink != nullptr) sink->Abort();  // answered (or gone) already
      return;
    }
    if (sink == nullptr) {
      // Kept the responder without answering, against the contract: the body is not read.
      WriteResponse(JsonErrorResponse(500, "internal", "the request's body had no taker"), true);
      return;
    }
    sink_ = std::move(sink);
    if (expects_continue) WriteContinue();
  }

  // Moves a streamed body on: hands the sink what has arrived, finishes it once the body is
  // complete, or waits for the client.
  void PumpBody() {
    if (sink_busy_) {
      StopReading();
      return;
    }
    if (!body_pending_.empty()) {
      sink_busy_ = true;
      sink_busy_since_ms_ = uv_now(server_->loop_);
      StopReading();
      StopTimer();  // the client is not to blame for a slow sink
      std::string piece = std::move(body_pending_);
      body_pending_.clear();
      std::weak_ptr<ServerConnection> weak = weak_from_this();
      const uint64_t generation = sink_generation_;
      std::shared_ptr<HttpBodySink> sink = sink_;  // held across the call
      sink->Write(std::move(piece), [weak, generation] {
        std::shared_ptr<ServerConnection> self = weak.lock();
        if (self == nullptr || self->closing_ || self->sink_generation_ != generation ||
            !self->sink_busy_) {
          return;
        }
        self->sink_busy_ = false;
        self->stream_busy_ms_ += uv_now(self->server_->loop_) - self->sink_busy_since_ms_;
        self->Process();
      });
      return;
    }
    if (body_complete_) {
      std::shared_ptr<HttpBodySink> sink = std::move(sink_);
      sink_.reset();
      ++sink_generation_;
      StopTimer();  // from here on it waits for its answer like any request
      sink->Finish();
      return;
    }
    if (input_ended_) {
      Fail(ParseError{400, "bad_request", "the input ended inside a request"});
      return;
    }
    const HttpServerLimits& limits = server_->limits_;
    const uint64_t deadline =
        stream_started_ms_ + stream_busy_ms_ + limits.request_timeout_ms +
        body_received_ * 1000 / std::max<uint64_t>(limits.min_request_bytes_per_second, 1);
    const uint64_t now = uv_now(server_->loop_);
    // And no byte for request_timeout_ms is too slow too, whatever the rate so far.
    ArmTimer(TimerPurpose::kRequest,
             std::min<uint64_t>(deadline > now ? deadline - now : 0, limits.request_timeout_ms));
    StartReading();
  }

  // Tells a streamed request's sink that its body will not be complete.
  void AbortSink() {
    if (sink_ == nullptr) return;
    std::shared_ptr<HttpBodySink> sink = std::move(sink_);
    sink_.reset();
    ++sink_generation_;
    sink_busy_ = false;
    body_pending_.clear();
    sink->Abort();
  }

  void Fail(ParseError error) {
    // The request is no longer the sink's to answer: a Responder dropped with it is ignored.
    in_flight_request_id_ = 0;
    AbortSink();
    SYNOD_CHECK(!writing_);
    message_in_progress_ = false;
    stream_next_ = false;
    in_flight_is_head_ = false;
    WriteResponse(JsonErrorResponse(error.status, error.code, error.message), true);
  }

  void WriteResponse(HttpResponse response, bool close_after) {
    bool no_body = response.status == 204 || response.status == 304;
    std::optional<std::string> head = SerializeHead(response, close_after, !no_body);
    if (!head) {
      response = JsonErrorResponse(500, "internal", "the handler produced an invalid response");
      head = SerializeHead(response, close_after, true);
      no_body = false;
    }
    auto write = std::make_unique<PendingWrite>();
    write->head = std::move(*head);
    if (!no_body && !in_flight_is_head_) {
      write->body = std::move(response.body);
      if (response.body_source != nullptr && response.body_source->size() > 0) {
        body_source_ = std::move(response.body_source);
        body_left_ = body_source_->size();
        const HttpServerLimits& limits = server_->limits_;
        stream_deadline_ms_ =
            uv_now(server_->loop_) + limits.write_timeout_ms +
            body_left_ * 1000 / std::max<uint64_t>(limits.min_stream_bytes_per_second, 1);
        write->more = true;
      }
    }
    writing_ = true;
    close_after_write_ = close_after;
    Write(std::move(write));
  }

  // Writes `write` (the head, a body, or a streamed body's piece) and arms the write timer.
  void Write(std::unique_ptr<PendingWrite> write) {
    write->connection = this;
    write->request.data = write.get();
    uv_buf_t bufs[2] = {uv_buf_init(write->head.data(), write->head.size()),
                        uv_buf_init(write->body.data(), write->body.size())};
    uv_buf_t* first = write->head.empty() ? &bufs[1] : &bufs[0];
    const unsigned count = (write->head.empty() ? 0 : 1) + (write->body.empty() ? 0 : 1);
    SYNOD_CHECK_GT(count, 0u);
    int rc =
        uv_write(&write->request, reinterpret_cast<uv_stream_t*>(&tcp_), first, count, OnWriteDone);
    if (rc != 0) {
      Close();
      return;
    }
    write.release();  // OnWriteDone owns it now
    ArmTimer(TimerPurpose::kWrite, WriteTimeoutMs());
  }

  // How long the next write (or piece) may take: write_timeout_ms, and for a streamed body
  // no later than its deadline.
  uint64_t WriteTimeoutMs() const {
    const uint64_t timeout = server_->limits_.write_timeout_ms;
    if (body_source_ == nullptr) return timeout;
    const uint64_t now = uv_now(server_->loop_);
    return stream_deadline_ms_ > now ? std::min(timeout, stream_deadline_ms_ - now) : 0;
  }

  // Asks the body source for the next piece of a streamed body and writes it. The write
  // timer runs meanwhile: a source that does not answer closes the connection like a client
  // that does not read.
  void StreamNextPiece() {
    ArmTimer(TimerPurpose::kWrite, WriteTimeoutMs());
    const size_t max_bytes = static_cast<size_t>(std::min<uint64_t>(body_left_, kStreamPieceBytes));
    std::weak_ptr<ServerConnection> weak = weak_from_this();
    // Held across the call: a source that answers at once may end the body (or the
    // connection), which drops body_source_.
    std::shared_ptr<HttpBodySource> source = body_source_;
    source->Read(max_bytes, [weak, max_bytes](absl::StatusOr<std::string> piece) {
      std::shared_ptr<ServerConnection> self = weak.lock();
      if (self == nullptr || self->closing_ || self->body_source_ == nullptr) return;
      if (!piece.ok() || piece->empty() || piece->size() > max_bytes) {
        self->Close();  // the client sees a short body
        return;
      }
      self->body_left_ -= piece->size();
      auto write = std::make_unique<PendingWrite>();
      write->body = *std::move(piece);
      write->more = self->body_left_ > 0;
      if (!write->more) self->body_source_.reset();
      self->Write(std::move(write));
    });
  }

  static void OnWriteDone(uv_write_t* request, int status) {
    std::unique_ptr<PendingWrite> write(static_cast<PendingWrite*>(request->data));
    ServerConnection* self = write->connection;
    if (!self->closing_ && status >= 0 && write->more) {
      self->StreamNextPiece();
      return;
    }
    self->writing_ = false;
    self->in_flight_request_id_ = 0;
    if (self->closing_) return;
    if (status < 0) {
      self->Close();
      return;
    }
    if (self->close_after_write_) {
      // With the input ended there is nothing left to drain.
      if (self->input_ended_) {
        self->Close();
      } else {
        self->Linger();
      }
      return;
    }
    self->StopTimer();
    self->Process();
    if (!self->closing_ && self->in_flight_request_id_ == 0 && !self->message_in_progress_ &&
        !self->close_after_write_) {
      self->ArmTimer(TimerPurpose::kIdle, self->server_->limits_.idle_timeout_ms);
    }
  }

  void Linger() {
    lingering_ = true;
    input_.clear();
    int rc =
        uv_shutdown(&shutdown_, reinterpret_cast<uv_stream_t*>(&tcp_), [](uv_shutdown_t*, int) {});
    if (rc != 0) {
      Close();
      return;
    }
    ArmTimer(TimerPurpose::kLinger, kLingerMs);
    StartReading();
  }

  // The idle timer also marks the connection idle, so the two cannot disagree: a connection
  // is on the server's idle list exactly while its idle timer is armed.
  void ArmTimer(TimerPurpose purpose, uint64_t timeout_ms) {
    SYNOD_CHECK(!closing_);
    // An upgraded connection has no deadline and is never idle (a pipelined request before
    // the upgrade must not arm one when its answer is written).
    if (upgraded_ != nullptr) return;
    timer_purpose_ = purpose;
    uv_timer_start(&timer_, OnTimer, timeout_ms, 0);
    LeaveIdleList();
    if (purpose == TimerPurpose::kIdle) {
      idle_position_ = server_->idle_connections_.insert(server_->idle_connections_.end(), this);
      idle_ = true;
    }
  }

  void StopTimer() {
    uv_timer_stop(&timer_);
    LeaveIdleList();
  }

  void LeaveIdleList() {
    if (!idle_) return;
    server_->idle_connections_.erase(idle_position_);
    idle_ = false;
  }

  static void OnTimer(uv_timer_t* timer) {
    auto* self = static_cast<ServerConnection*>(timer->data);
    if (self->timer_purpose_ == TimerPurpose::kRequest) {
      self->Fail(ParseError{408, "request_timeout",
                            "request not complete within " +
                                std::to_string(self->server_->limits_.request_timeout_ms) + " ms"});
      return;
    }
    self->Close();  // idle, a response the client will not read, or lingering done
  }

  static void OnHandleClosed(uv_handle_t* handle) {
    auto* self = static_cast<ServerConnection*>(handle->data);
    if (--self->open_handles_ > 0) return;
    self->server_->OnConnectionClosed(self->id_);  // destroys *self
  }

  HttpServer* const server_;
  const uint64_t id_;
  uv_tcp_t tcp_;
  uv_timer_t timer_;
  uv_shutdown_t shutdown_;
  int open_handles_ = 2;
  llhttp_t parser_;
  TimerPurpose timer_purpose_ = TimerPurpose::kIdle;
  bool closing_ = false;
  bool reading_ = false;
  bool lingering_ = false;
  bool writing_ = false;
  bool close_after_write_ = false;
  bool input_ended_ = false;  // the client sent EOF: it will send nothing more
  bool idle_ = false;         // on the server's idle list, at idle_position_
  std::list<ServerConnection*>::iterator idle_position_;

  std::string input_;  // received, not yet parsed
  // The request being parsed.
  bool message_in_progress_ = false;
  HttpRequest request_;
  std::string header_field_;
  std::string header_value_;
  size_t header_bytes_ = 0;
  size_t body_limit_bytes_ = 0;  // this request's, known once its headers are complete
  uint64_t body_received_ = 0;   // of this request's body
  // A streamed request body (StartStream): its sink, and what has arrived for it.
  bool stream_next_ = false;  // the headers paused the parser to start a stream
  std::shared_ptr<HttpBodySink> sink_;
  uint64_t sink_generation_ = 0;  // moves on when a sink goes: a late `done` is ignored
  bool sink_busy_ = false;        // a Write's `done` has not run yet
  bool body_complete_ = false;
  std::string body_pending_;
  uint64_t stream_started_ms_ = 0;
  uint64_t stream_busy_ms_ = 0;  // time the sink was busy, not counted against the client
  uint64_t sink_busy_since_ms_ = 0;
  bool keep_alive_ = true;
  std::optional<ParseError> parse_error_;
  // The request being answered; 0 when none.
  uint64_t in_flight_request_id_ = 0;
  bool in_flight_is_head_ = false;
  uint64_t next_request_id_ = 1;
  // A streamed body being written, and how many of its bytes are still to come.
  std::shared_ptr<HttpBodySource> body_source_;
  uint64_t body_left_ = 0;
  uint64_t stream_deadline_ms_ = 0;  // loop time by which the whole body must be written
  // Set once the connection has switched protocols: it gets every byte read from then on.
  std::unique_ptr<HttpUpgradedStream> upgraded_;
};

}  // namespace http_internal

Responder::Responder(std::weak_ptr<http_internal::ServerConnection> connection, uint64_t request_id)
    : connection_(std::move(connection)), request_id_(request_id) {}

Responder::~Responder() {
  if (!sent_) {
    Send(JsonErrorResponse(500, "internal", "the request was dropped without an answer"));
  }
}

void Responder::Send(HttpResponse response) {
  SYNOD_CHECK(!sent_) << "Responder::Send called twice";
  sent_ = true;
  if (std::shared_ptr<http_internal::ServerConnection> connection = connection_.lock()) {
    connection->Respond(request_id_, std::move(response));
  }
}

bool Responder::connection_open() const {
  std::shared_ptr<http_internal::ServerConnection> connection = connection_.lock();
  return connection != nullptr && connection->open();
}

HttpServer::HttpServer(uv_loop_t* loop, HttpServerLimits limits, Handler handler,
                       StreamHandler stream_handler)
    : loop_(loop),
      limits_(limits),
      handler_(std::move(handler)),
      stream_handler_(std::move(stream_handler)),
      read_buffer_(kReadBufferBytes) {
  SYNOD_CHECK(loop_ != nullptr);
  SYNOD_CHECK(handler_ != nullptr);
}

HttpServer::~HttpServer() {
  SYNOD_CHECK(listener_ == nullptr && !listener_closing_ && connections_.empty())
      << "HttpServer destroyed before Close completed";
}

absl::Status HttpServer::Listen(const std::string& host, int port) {
  if (closed_ || listener_ != nullptr) {
    return absl::FailedPreconditionError("HttpServer: already listening or closed");
  }
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError("HttpServer: bad port " + std::to_string(port));
  }
  sockaddr_storage address;
  if (uv_ip4_addr(host.c_str(), port, reinterpret_cast<sockaddr_in*>(&address)) != 0 &&
      uv_ip6_addr(host.c_str(), port, reinterpret_cast<sockaddr_in6*>(&address)) != 0) {
    return absl::InvalidArgumentError("HttpServer: not an IP address: " + host);
  }
  auto* listener = new uv_tcp_t;
  SYNOD_CHECK_EQ(uv_tcp_init(loop_, listener), 0);
  listener->data = this;
  int rc = uv_tcp_bind(listener, reinterpret_cast<const sockaddr*>(&address), 0);
  if (rc == 0)
    rc = uv_listen(reinterpret_cast<uv_stream_t*>(listener), kListenBacklog, OnConnection);
  if (rc == 0) {
    int length = sizeof(address);
    rc = uv_tcp_getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length);
  }
  if (rc != 0) {
    listener->data = nullptr;  // frees itself, telling nobody
    uv_close(reinterpret_cast<uv_handle_t*>(listener), OnListenerClosed);
    return absl::UnavailableError("HttpServer: cannot listen on " + host + ":" +
                                  std::to_string(port) + ": " + uv_strerror(rc));
  }
  port_ = ntohs(address.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&address)->sin6_port
                                              : reinterpret_cast<sockaddr_in*>(&address)->sin_port);
  listener_ = listener;
  return absl::OkStatus();
}

int HttpServer::port() const {
  SYNOD_CHECK(port_ != 0) << "HttpServer::port before a successful Listen";
  return port_;
}

void HttpServer::Close(std::function<void()> done) {
  SYNOD_CHECK(!closed_) << "HttpServer::Close called twice";
  closed_ = true;
  close_done_ = std::move(done);
  if (listener_ != nullptr) {
    listener_closing_ = true;
    uv_close(reinterpret_cast<uv_handle_t*>(listener_), OnListenerClosed);
    listener_ = nullptr;
  }
  for (auto& [id, connection] : connections_) connection->Close();
  MaybeFinishClose();
}

void HttpServer::OnConnection(uv_stream_t* listener, int status) {
  auto* self = static_cast<HttpServer*>(listener->data);
  if (status < 0) return;  // a failed accept (e.g. out of file descriptors): keep listening
  if (self->open_connection_count_ >= self->limits_.max_connections &&
      !self->idle_connections_.empty()) {
    self->idle_connections_.front()->Evict();
  }
  uint64_t id = self->next_connection_id_++;
  auto connection = std::make_shared<http_internal::ServerConnection>(self, id);
  self->connections_.emplace(id, connection);
  ++self->open_connection_count_;
  // Accepted even when there is no room, since a connection left in the backlog would stall
  // the listener; then closed at once.
  connection->Start(listener);
  if (self->open_connection_count_ > self->limits_.max_connections) connection->Close();
}

void HttpServer::OnListenerClosed(uv_handle_t* handle) {
  auto* self = static_cast<HttpServer*>(handle->data);
  delete reinterpret_cast<uv_tcp_t*>(handle);
  if (self == nullptr) return;
  self->listener_closing_ = false;
  self->MaybeFinishClose();
}

void HttpServer::OnConnectionClosed(uint64_t connection_id) {
  connections_.erase(connection_id);
  MaybeFinishClose();
}

void HttpServer::MaybeFinishClose() {
  if (!closed_ || listener_closing_ || !connections_.empty() || !close_done_) return;
  std::function<void()> done = std::move(close_done_);
  close_done_ = nullptr;
  done();
}

}  // namespace synod

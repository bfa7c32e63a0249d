#include "adapters/http_client.h"

#include <algorithm>
#include <cctype>
#include <optional>
#include <utility>
#include <vector>

#include "core/check.h"
#include "llhttp.h"

namespace synod {
namespace http_internal {

constexpr size_t kClientReadBufferBytes = 64 * 1024;

// One TCP connection. HttpClient abandons it (client = nullptr) and uv_close frees it.
struct ClientConnection {
  HttpClient* client;
  const size_t max_response_bytes;
  uv_tcp_t tcp;
  uv_connect_t connect;
  llhttp_t parser;
  HttpResponse response;
  std::string header_field;
  std::string header_value;
  bool response_complete = false;
  std::vector<char> read_buffer = std::vector<char>(kClientReadBufferBytes);

  ClientConnection(HttpClient* owner, size_t max_response)
      : client(owner), max_response_bytes(max_response) {
    tcp.data = this;
    llhttp_init(&parser, HTTP_RESPONSE, &Settings());
    parser.data = this;
  }

  void Abandon() {
    client = nullptr;
    uv_close(reinterpret_cast<uv_handle_t*>(&tcp),
             [](uv_handle_t* handle) { delete static_cast<ClientConnection*>(handle->data); });
  }

  static ClientConnection* From(llhttp_t* parser) {
    return static_cast<ClientConnection*>(parser->data);
  }

  static const llhttp_settings_t& Settings() {
    static const llhttp_settings_t settings = [] {
      llhttp_settings_t s;
      llhttp_settings_init(&s);
      s.on_message_begin = [](llhttp_t* p) {
        From(p)->response = HttpResponse();
        return 0;
      };
      s.on_header_field = [](llhttp_t* p, const char* at, size_t length) {
        for (size_t i = 0; i < length; ++i) {
          From(p)->header_field +=
              static_cast<char>(std::tolower(static_cast<unsigned char>(at[i])));
        }
        return 0;
      };
      s.on_header_value = [](llhttp_t* p, const char* at, size_t length) {
        From(p)->header_value.append(at, length);
        return 0;
      };
      s.on_header_value_complete = [](llhttp_t* p) {
        ClientConnection* self = From(p);
        self->response.headers.emplace_back(std::move(self->header_field),
                                            std::move(self->header_value));
        self->header_field.clear();
        self->header_value.clear();
        return 0;
      };
      s.on_headers_complete = [](llhttp_t* p) {
        From(p)->response.status = llhttp_get_status_code(p);
        return 0;
      };
      s.on_body = [](llhttp_t* p, const char* at, size_t length) {
        ClientConnection* self = From(p);
        if (self->response.body.size() + length > self->max_response_bytes) {
          llhttp_set_error_reason(p, "response body too large");
          return static_cast<int>(HPE_USER);
        }
        self->response.body.append(at, length);
        return 0;
      };
      s.on_message_complete = [](llhttp_t* p) {
        From(p)->response_complete = true;
        return static_cast<int>(HPE_PAUSED);
      };
      return s;
    }();
    return settings;
  }

  static void OnRead(uv_stream_t* stream, ssize_t nread, const uv_buf_t* buf) {
    auto* self = static_cast<ClientConnection*>(stream->data);
    if (self->client == nullptr || nread == 0) return;
    HttpClient* client = self->client;
    if (nread < 0) {
      // A response framed by the end of the connection ends here.
      if (nread == UV_EOF && llhttp_finish(&self->parser) == HPE_PAUSED) {
        self->Deliver();
        if (self->client == nullptr) return;
      }
      bool was_in_flight = client->in_flight_;
      client->DropConnection(absl::UnavailableError(std::string("connection lost: ") +
                                                    uv_strerror(static_cast<int>(nread))),
                             was_in_flight);
      return;
    }
    if (!client->in_flight_) {
      client->DropConnection(absl::UnavailableError("unsolicited response"), true);
      return;
    }
    llhttp_errno_t rc = llhttp_execute(&self->parser, buf->base, static_cast<size_t>(nread));
    if (rc == HPE_OK) return;
    if (rc == HPE_PAUSED) {
      size_t consumed = llhttp_get_error_pos(&self->parser) - buf->base;
      llhttp_resume(&self->parser);
      self->Deliver();
      if (self->client == nullptr) return;
      if (consumed < static_cast<size_t>(nread)) {
        client->DropConnection(absl::UnavailableError("unsolicited response"), true);
      }
      return;
    }
    client->DropConnection(
        absl::UnavailableError(std::string("bad response: ") + llhttp_errno_name(rc) + ": " +
                               llhttp_get_error_reason(&self->parser)),
        true);
  }

  void Deliver() {
    response_complete = false;
    bool keep_alive = llhttp_should_keep_alive(&parser);
    client->OnResponse(std::move(response), keep_alive);
    response = HttpResponse();
  }
};

struct ClientWrite {
  uv_write_t request;
  ClientConnection* connection;
  std::string head;
  std::string body;
};

}  // namespace http_internal

namespace {

void CloseAndFreeTimer(uv_timer_t* timer) {
  uv_close(reinterpret_cast<uv_handle_t*>(timer),
           [](uv_handle_t* handle) { delete reinterpret_cast<uv_timer_t*>(handle); });
}

bool IsValidPath(const std::string& path) {
  return !path.empty() && path[0] == '/' && std::none_of(path.begin(), path.end(), [](char c) {
    return static_cast<unsigned char>(c) <= ' ' || c == 0x7f;
  });
}

}  // namespace

namespace http_internal {

uint64_t JitteredBackoffMs(uint64_t backoff_ms, uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const uint64_t half = backoff_ms / 2;
  return half + z % (backoff_ms - half + 1);
}

}  // namespace http_internal

HttpClient::HttpClient(uv_loop_t* loop, std::string host, int port, HttpClientOptions options)
    : loop_(loop),
      host_(std::move(host)),
      port_(port),
      options_(options),
      backoff_ms_(options.initial_backoff_ms),
      jitter_state_(options.backoff_jitter_seed),
      backoff_timer_(new uv_timer_t),
      deadline_timer_(new uv_timer_t) {
  SYNOD_CHECK(loop_ != nullptr);
  SYNOD_CHECK_GT(options_.max_queued_requests, 0u);
  SYNOD_CHECK_EQ(uv_timer_init(loop_, backoff_timer_), 0);
  SYNOD_CHECK_EQ(uv_timer_init(loop_, deadline_timer_), 0);
  backoff_timer_->data = this;
  deadline_timer_->data = this;
}

HttpClient::~HttpClient() { Close(); }

void HttpClient::Post(std::string path, std::string body, Callback done) {
  if (closed_) {
    done(absl::FailedPreconditionError("HttpClient is closed"));
    return;
  }
  if (!IsValidPath(path)) {
    done(absl::InvalidArgumentError("HttpClient: bad path: " + path));
    return;
  }
  std::optional<PendingRequest> dropped;
  queue_.push_back(PendingRequest{std::move(path), std::move(body), std::move(done),
                                  uv_now(loop_) + options_.request_timeout_ms});
  if (queue_.size() > options_.max_queued_requests) {
    auto oldest_unsent = queue_.begin() + (in_flight_ ? 1 : 0);
    dropped = std::move(*oldest_unsent);
    queue_.erase(oldest_unsent);
  }
  ArmDeadlineTimer();
  Pump();
  if (dropped) dropped->done(absl::ResourceExhaustedError("HttpClient: queue full"));
}

void HttpClient::Close() {
  if (closed_) return;
  closed_ = true;
  if (connection_ != nullptr) connection_->Abandon();
  connection_ = nullptr;
  connected_ = false;
  CloseAndFreeTimer(backoff_timer_);
  CloseAndFreeTimer(deadline_timer_);
  std::deque<PendingRequest> failed = std::move(queue_);
  queue_.clear();
  in_flight_ = false;
  for (PendingRequest& request : failed) request.done(absl::CancelledError("HttpClient closed"));
}

void HttpClient::Pump() {
  if (closed_ || in_flight_ || queue_.empty()) return;
  if (!connected_) {
    if (connection_ == nullptr && !backing_off_) Connect();
    return;
  }
  // A request is never sent twice, so its body moves into the write.
  PendingRequest& request = queue_.front();
  auto write = std::make_unique<http_internal::ClientWrite>();
  std::string authority = host_.find(':') == std::string::npos ? host_ : "[" + host_ + "]";
  write->head = "POST " + request.path + " HTTP/1.1\r\nHost: " + authority + ":" +
                std::to_string(port_) +
                "\r\nContent-Type: application/octet-stream\r\nContent-Length: " +
                std::to_string(request.body.size()) + "\r\n\r\n";
  write->body = std::move(request.body);
  write->connection = connection_;
  write->request.data = write.get();
  uv_buf_t bufs[2] = {uv_buf_init(write->head.data(), write->head.size()),
                      uv_buf_init(write->body.data(), write->body.size())};
  in_flight_ = true;
  int rc = uv_write(
      &write->request, reinterpret_cast<uv_stream_t*>(&connection_->tcp), bufs, 2,
      [](uv_write_t* request, int status) {
        std::unique_ptr<http_internal::ClientWrite> write(
            static_cast<http_internal::ClientWrite*>(request->data));
        http_internal::ClientConnection* connection = write->connection;
        if (status < 0 && connection->client != nullptr) {
          connection->client->DropConnection(
              absl::UnavailableError(std::string("write failed: ") + uv_strerror(status)), true);
        }
      });
  if (rc != 0) {
    DropConnection(absl::UnavailableError(std::string("write failed: ") + uv_strerror(rc)), true);
    return;
  }
  write.release();  // the write callback owns it now
}

void HttpClient::Connect() {
  sockaddr_storage address;
  if (uv_ip4_addr(host_.c_str(), port_, reinterpret_cast<sockaddr_in*>(&address)) != 0 &&
      uv_ip6_addr(host_.c_str(), port_, reinterpret_cast<sockaddr_in6*>(&address)) != 0) {
    std::deque<PendingRequest> failed = std::move(queue_);
    queue_.clear();
    ArmDeadlineTimer();
    for (PendingRequest& request : failed) {
      request.done(absl::InvalidArgumentError("HttpClient: not an IP address: " + host_));
    }
    return;
  }
  connection_ = new http_internal::ClientConnection(this, options_.max_response_bytes);
  SYNOD_CHECK_EQ(uv_tcp_init(loop_, &connection_->tcp), 0);
  connection_->connect.data = connection_;
  int rc = uv_tcp_connect(
      &connection_->connect, &connection_->tcp, reinterpret_cast<const sockaddr*>(&address),
      [](uv_connect_t* request, int status) {
        auto* connection = static_cast<http_internal::ClientConnection*>(request->data);
        if (connection->client != nullptr) connection->client->OnConnected(status);
      });
  if (rc != 0) DropConnection(absl::UnavailableError(uv_strerror(rc)), true);
}

void HttpClient::OnConnected(int status) {
  if (status < 0) {
    DropConnection(absl::UnavailableError(std::string("connect failed: ") + uv_strerror(status)),
                   true);
    return;
  }
  connected_ = true;
  uv_tcp_nodelay(&connection_->tcp, 1);
  uv_read_start(
      reinterpret_cast<uv_stream_t*>(&connection_->tcp),
      [](uv_handle_t* handle, size_t, uv_buf_t* buf) {
        auto* connection = static_cast<http_internal::ClientConnection*>(handle->data);
        *buf = uv_buf_init(connection->read_buffer.data(), connection->read_buffer.size());
      },
      http_internal::ClientConnection::OnRead);
  Pump();
}

void HttpClient::OnResponse(HttpResponse response, bool keep_alive) {
  SYNOD_CHECK(in_flight_ && !queue_.empty());
  in_flight_ = false;
  PendingRequest request = std::move(queue_.front());
  queue_.pop_front();
  backoff_ms_ = options_.initial_backoff_ms;
  if (!keep_alive) DropConnection(absl::OkStatus(), false);
  ArmDeadlineTimer();
  Pump();
  request.done(std::move(response));
}

void HttpClient::DropConnection(const absl::Status& error, bool backoff) {
  if (connection_ != nullptr) connection_->Abandon();
  connection_ = nullptr;
  connected_ = false;
  std::optional<PendingRequest> failed;
  if (in_flight_) {
    failed = std::move(queue_.front());
    queue_.pop_front();
    in_flight_ = false;
  }
  ArmDeadlineTimer();
  if (backoff) {
    backing_off_ = true;
    uv_timer_start(
        backoff_timer_,
        [](uv_timer_t* timer) {
          auto* self = static_cast<HttpClient*>(timer->data);
          self->backing_off_ = false;
          self->Pump();
        },
        options_.backoff_jitter_seed == 0
            ? backoff_ms_
            : http_internal::JitteredBackoffMs(backoff_ms_, &jitter_state_),
        0);
    backoff_ms_ = std::min(backoff_ms_ * 2, options_.max_backoff_ms);
  } else {
    Pump();
  }
  if (failed) failed->done(error);
}

void HttpClient::ArmDeadlineTimer() {
  if (closed_) return;
  if (queue_.empty()) {
    uv_timer_stop(deadline_timer_);
    return;
  }
  uint64_t now_ms = uv_now(loop_);
  uint64_t deadline_ms = queue_.front().deadline_ms;
  uv_timer_start(
      deadline_timer_,
      [](uv_timer_t* timer) { static_cast<HttpClient*>(timer->data)->OnDeadline(); },
      deadline_ms > now_ms ? deadline_ms - now_ms : 0, 0);
}

void HttpClient::OnDeadline() {
  uint64_t now_ms = uv_now(loop_);
  std::vector<PendingRequest> expired;
  bool expired_in_flight = false;
  // All requests share one timeout, so deadlines rise from the front of the queue.
  while (!queue_.empty() && queue_.front().deadline_ms <= now_ms) {
    if (in_flight_) expired_in_flight = true;
    in_flight_ = false;
    expired.push_back(std::move(queue_.front()));
    queue_.pop_front();
  }
  if (expired_in_flight) {
    DropConnection(absl::OkStatus(), true);  // nothing in flight to fail any more
  } else {
    ArmDeadlineTimer();
    Pump();
  }
  for (PendingRequest& request : expired) {
    request.done(absl::DeadlineExceededError("HttpClient: no response within " +
                                             std::to_string(options_.request_timeout_ms) + " ms"));
  }
}

}  // namespace synod

#include "adapters/peer_stream.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <memory>
#include <utility>
#include <vector>

#include "adapters/http_client.h"
#include "adapters/http_server.h"
#include "core/check.h"

namespace synod {
namespace {

constexpr size_t kReadBufferBytes = 16 * 1024;
// A stream open this long before it fails starts the back-off over.
constexpr uint64_t kLastingStreamMs = 1'000;
// A frame buffer grown past this is given back once it holds less.
constexpr size_t kKeptBufferBytes = 1 << 20;
// The largest handshake answer read: a 101 is a few lines.
constexpr size_t kMaxAnswerBytes = 16 * 1024;

}  // namespace

std::string PeerStreamHeader(size_t frame_bytes) {
  SYNOD_CHECK_LE(frame_bytes, uint64_t{UINT32_MAX});
  std::string header(kPeerStreamLengthBytes, '\0');
  for (size_t i = 0; i < kPeerStreamLengthBytes; ++i) {
    header[i] = static_cast<char>((frame_bytes >> (8 * i)) & 0xff);
  }
  return header;
}

bool PeerStreamReader::Receive(std::string_view bytes) {
  if (failed_) return false;
  // Whole frames are taken straight from `bytes` when nothing is buffered; the rest waits.
  std::string_view input = bytes;
  if (!buffer_.empty()) {
    buffer_.append(bytes);
    input = buffer_;
  }
  size_t used = 0;
  while (input.size() - used >= kPeerStreamLengthBytes) {
    uint64_t length = 0;
    for (size_t i = 0; i < kPeerStreamLengthBytes; ++i) {
      length |= uint64_t{static_cast<unsigned char>(input[used + i])} << (8 * i);
    }
    if (length > max_frame_bytes_) {
      failed_ = true;
      return false;
    }
    if (input.size() - used - kPeerStreamLengthBytes < length) break;
    if (!on_frame_(input.substr(used + kPeerStreamLengthBytes, length))) {
      failed_ = true;
      return false;
    }
    used += kPeerStreamLengthBytes + length;
  }
  if (buffer_.empty()) {
    buffer_.assign(input.substr(used));
  } else {
    buffer_.erase(0, used);
    // A large frame's room is not kept for the small ones that follow.
    if (buffer_.capacity() > kKeptBufferBytes && buffer_.size() <= kKeptBufferBytes) {
      buffer_.shrink_to_fit();
    }
  }
  return true;
}

struct PeerStreamClient::Connection {
  PeerStreamClient* client;  // null once abandoned
  uv_tcp_t tcp;
  uv_connect_t connect;
  std::vector<char> read_buffer = std::vector<char>(kReadBufferBytes);

  explicit Connection(PeerStreamClient* owner) : client(owner) { tcp.data = this; }

  void Abandon() {
    client = nullptr;
    uv_close(reinterpret_cast<uv_handle_t*>(&tcp),
             [](uv_handle_t* handle) { delete static_cast<Connection*>(handle->data); });
  }
};

namespace {

// One write on a connection: the request, and the bytes it holds until it is done.
struct StreamWrite {
  explicit StreamWrite(void* on) : connection(on) { request.data = this; }
  uv_write_t request;
  void* connection;  // a Connection, which outlives its writes
  std::string head;
  std::string body;
};

}  // namespace

PeerStreamClient::PeerStreamClient(uv_loop_t* loop, std::string host, int port, std::string target,
                                   PeerStreamOptions options, Callbacks callbacks)
    : loop_(loop),
      host_(std::move(host)),
      port_(port),
      target_(std::move(target)),
      options_(options),
      callbacks_(std::move(callbacks)),
      timer_(new uv_timer_t),
      jitter_state_(options.jitter_seed) {
  SYNOD_CHECK_EQ(uv_timer_init(loop_, timer_), 0);
  timer_->data = this;
}

PeerStreamClient::~PeerStreamClient() { Close(); }

void PeerStreamClient::Close() {
  if (state_ == State::kClosed) return;
  state_ = State::kClosed;
  if (connection_ != nullptr) {
    connection_->Abandon();
    connection_ = nullptr;
  }
  timer_->data = nullptr;
  uv_close(reinterpret_cast<uv_handle_t*>(timer_),
           [](uv_handle_t* handle) { delete reinterpret_cast<uv_timer_t*>(handle); });
}

void PeerStreamClient::Connect() {
  switch (state_) {
    case State::kClosed:
    case State::kConnecting:
    case State::kOpen:
      return;
    case State::kBackingOff:
    case State::kRefused:
      if (uv_now(loop_) < retry_at_ms_) return;
      break;
    case State::kIdle:
      break;
  }
  sockaddr_storage address;
  if (uv_ip4_addr(host_.c_str(), port_, reinterpret_cast<sockaddr_in*>(&address)) != 0 &&
      uv_ip6_addr(host_.c_str(), port_, reinterpret_cast<sockaddr_in6*>(&address)) != 0) {
    Fail(/*refused=*/false);
    return;
  }
  state_ = State::kConnecting;
  answer_.clear();
  connection_ = new Connection(this);
  SYNOD_CHECK_EQ(uv_tcp_init(loop_, &connection_->tcp), 0);
  connection_->connect.data = connection_;
  ArmTimer(options_.handshake_timeout_ms);
  int rc = uv_tcp_connect(&connection_->connect, &connection_->tcp,
                          reinterpret_cast<const sockaddr*>(&address),
                          [](uv_connect_t* request, int status) {
                            auto* connection = static_cast<Connection*>(request->data);
                            if (connection->client != nullptr) {
                              connection->client->OnConnected(status);
                            }
                          });
  if (rc != 0) Fail(/*refused=*/false);
}

void PeerStreamClient::OnConnected(int status) {
  if (status < 0) {
    Fail(/*refused=*/false);
    return;
  }
  uv_tcp_nodelay(&connection_->tcp, 1);
  // A stream that goes quiet (a follower may have nothing to say for hours) is probed, and
  // one whose bytes go unacknowledged for stall_timeout_ms fails, instead of the minutes
  // the system's defaults take, whatever a NAT or a peer machine that vanished does.
  SetKeepAlive(reinterpret_cast<uv_stream_t*>(&connection_->tcp), options_.keepalive_seconds);
  uv_os_fd_t fd;
  if (uv_fileno(reinterpret_cast<uv_handle_t*>(&connection_->tcp), &fd) == 0) {
    const unsigned int user_timeout_ms = static_cast<unsigned int>(options_.stall_timeout_ms);
    setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms, sizeof(user_timeout_ms));
  }
  std::string hello = callbacks_.hello();
  auto* write = new StreamWrite(connection_);
  write->head = "GET " + target_ + " HTTP/1.1\r\nHost: " + host_ + ":" + std::to_string(port_) +
                "\r\nConnection: Upgrade\r\nUpgrade: " + kPeerStreamProtocol +
                "\r\nSynod-Peer-Hello: " + hello + "\r\nContent-Length: 0\r\n\r\n";
  uv_buf_t buf = uv_buf_init(write->head.data(), write->head.size());
  // A failed handshake write is met by the read (or the handshake deadline).
  if (uv_write(&write->request, reinterpret_cast<uv_stream_t*>(&connection_->tcp), &buf, 1,
               [](uv_write_t* done, int) { delete static_cast<StreamWrite*>(done->data); }) != 0) {
    delete write;
    Fail(/*refused=*/false);
    return;
  }
  uv_read_start(
      reinterpret_cast<uv_stream_t*>(&connection_->tcp),
      [](uv_handle_t* handle, size_t, uv_buf_t* buf) {
        auto* connection = static_cast<Connection*>(handle->data);
        *buf = uv_buf_init(connection->read_buffer.data(), connection->read_buffer.size());
      },
      [](uv_stream_t* stream, ssize_t nread, const uv_buf_t* buf) {
        auto* connection = static_cast<Connection*>(stream->data);
        if (connection->client == nullptr || nread == 0) return;
        if (nread < 0) {
          connection->client->Fail(/*refused=*/false);
          return;
        }
        connection->client->OnRead(std::string_view(buf->base, static_cast<size_t>(nread)));
      });
}

void PeerStreamClient::OnRead(std::string_view bytes) {
  if (state_ != State::kConnecting) {
    Fail(/*refused=*/false);  // the receiver writes nothing once the stream is open
    return;
  }
  answer_.append(bytes);
  const size_t end = answer_.find("\r\n\r\n");
  if (end == std::string::npos) {
    if (answer_.size() > kMaxAnswerBytes) Fail(/*refused=*/true);
    return;
  }
  // "HTTP/1.1 101 ..." and nothing after the head: the receiver speaks only once.
  const bool switched =
      answer_.size() >= 12 &&
      (answer_.starts_with("HTTP/1.1 101") || answer_.starts_with("HTTP/1.0 101")) &&
      end + 4 == answer_.size();
  answer_.clear();
  if (!switched) {
    Fail(/*refused=*/true);
    return;
  }
  state_ = State::kOpen;
  opened_ms_ = uv_now(loop_);
  full_ = false;
  ++counters_.connects;
  uv_timer_stop(timer_);
  if (callbacks_.writable) callbacks_.writable();
}

bool PeerStreamClient::HasRoom(size_t frame_bytes) const {
  if (state_ != State::kOpen) return false;
  if (queued_bytes_ == 0 ||
      queued_bytes_ + kPeerStreamLengthBytes + frame_bytes <= options_.max_queued_bytes) {
    return true;
  }
  full_ = true;
  return false;
}

void PeerStreamClient::Write(std::string frame) {
  SYNOD_CHECK(state_ == State::kOpen);
  auto* write = new StreamWrite(connection_);
  write->head = PeerStreamHeader(frame.size());
  write->body = std::move(frame);
  const size_t bytes = write->head.size() + write->body.size();
  uv_buf_t bufs[2] = {uv_buf_init(write->head.data(), write->head.size()),
                      uv_buf_init(write->body.data(), write->body.size())};
  int rc = uv_write(&write->request, reinterpret_cast<uv_stream_t*>(&connection_->tcp), bufs,
                    write->body.empty() ? 1 : 2, [](uv_write_t* done, int status) {
                      std::unique_ptr<StreamWrite> w(static_cast<StreamWrite*>(done->data));
                      // The connection outlives its writes (libuv finishes them, cancelled,
                      // before it closes the handle); an abandoned one has no client.
                      auto* connection = static_cast<Connection*>(w->connection);
                      if (connection->client == nullptr) return;
                      connection->client->OnWritten(w->head.size() + w->body.size(), status);
                    });
  if (rc != 0) {
    delete write;
    Fail(/*refused=*/false);
    return;
  }
  ++counters_.frames;
  counters_.bytes += bytes;
  if (queued_bytes_ == 0) ArmTimer(options_.stall_timeout_ms);
  queued_bytes_ += bytes;
}

void PeerStreamClient::OnWritten(size_t bytes, int status) {
  if (status < 0) {
    Fail(/*refused=*/false);
    return;
  }
  queued_bytes_ -= std::min(queued_bytes_, bytes);
  if (queued_bytes_ > 0) {
    ArmTimer(options_.stall_timeout_ms);  // it moved: the stall clock starts again
  } else {
    uv_timer_stop(timer_);
  }
  if (full_ && queued_bytes_ <= options_.max_queued_bytes / 2) {
    full_ = false;
    if (callbacks_.writable) callbacks_.writable();
  }
}

void PeerStreamClient::Fail(bool refused) {
  if (state_ == State::kClosed) return;
  const uint64_t now = uv_now(loop_);
  // The back-off starts over only after a stream that lasted: one the peer closes at once
  // (it refuses a frame, say) must not be made again at every tick.
  if (state_ == State::kOpen && now - opened_ms_ >= kLastingStreamMs) backoff_ms_ = 0;
  if (connection_ != nullptr) {
    connection_->Abandon();
    connection_ = nullptr;
  }
  queued_bytes_ = 0;
  full_ = false;
  answer_.clear();
  uv_timer_stop(timer_);
  if (refused) {
    ++counters_.refusals;
    state_ = State::kRefused;
    retry_at_ms_ = now + options_.refused_retry_ms;
    return;
  }
  ++counters_.failures;
  backoff_ms_ = backoff_ms_ == 0 ? options_.initial_backoff_ms
                                 : std::min(2 * backoff_ms_, options_.max_backoff_ms);
  state_ = State::kBackingOff;
  retry_at_ms_ = now + http_internal::JitteredBackoffMs(backoff_ms_, &jitter_state_);
}

void PeerStreamClient::ArmTimer(uint64_t timeout_ms) {
  uv_timer_start(
      timer_,
      [](uv_timer_t* timer) {
        if (timer->data != nullptr) static_cast<PeerStreamClient*>(timer->data)->OnTimer();
      },
      timeout_ms, 0);
}

void PeerStreamClient::OnTimer() {
  // Connecting: no 101 in time. Open: the queue did not move in time.
  if (state_ == State::kConnecting || (state_ == State::kOpen && queued_bytes_ > 0)) {
    Fail(/*refused=*/false);
  }
}

}  // namespace synod

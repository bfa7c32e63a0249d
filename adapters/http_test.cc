// Tests for the HTTP server and client over real sockets on 127.0.0.1. The loop runs on the
// test's main thread; raw clients (blocking sockets with a receive timeout) run on a second
// thread, so that each test reads like the exchange it checks.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "adapters/file_body.h"
#include "adapters/http_client.h"
#include "adapters/http_server.h"
#include "adapters/json_text.h"
#include "adapters/peer_stream.h"
#include "gtest/gtest.h"

namespace synod {
namespace {

struct RawResponse {
  int status = 0;
  std::string head;
  std::string body;
};

// A blocking HTTP/1.1 client for the test thread. Reads give up after 5 s.
class RawClient {
 public:
  explicit RawClient(int port) : fd_(socket(AF_INET, SOCK_STREAM, 0)) {
    timeval timeout{5, 0};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
  }
  ~RawClient() { Disconnect(); }

  bool connected() const { return connected_; }

  bool Send(std::string_view data) {
    while (!data.empty()) {
      ssize_t n = send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
      if (n <= 0) return false;
      data.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }

  void ShutdownWrites() { shutdown(fd_, SHUT_WR); }

  // Closes with a reset rather than an orderly end of input, so the server learns at once
  // that nobody will read an answer.
  void Reset() {
    linger no_linger{1, 0};
    setsockopt(fd_, SOL_SOCKET, SO_LINGER, &no_linger, sizeof(no_linger));
    Disconnect();
  }

  void Disconnect() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

  // One response framed by Content-Length; nullopt on EOF, timeout or a bad frame.
  std::optional<RawResponse> Read() {
    size_t head_end;
    while ((head_end = buffer_.find("\r\n\r\n")) == std::string::npos) {
      if (!Fill()) return std::nullopt;
    }
    RawResponse response;
    response.head = buffer_.substr(0, head_end + 4);
    if (response.head.rfind("HTTP/1.1 ", 0) != 0) return std::nullopt;
    response.status = std::stoi(response.head.substr(9, 3));
    size_t length = 0;
    std::string lower = response.head;
    for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (size_t at = lower.find("content-length: "); at != std::string::npos) {
      length = std::stoul(lower.substr(at + 16));
    }
    while (buffer_.size() < head_end + 4 + length) {
      if (!Fill()) return std::nullopt;
    }
    response.body = buffer_.substr(head_end + 4, length);
    buffer_.erase(0, head_end + 4 + length);
    return response;
  }

  // Receives up to `max` bytes (after what is buffered is dropped); 0 at EOF or timeout.
  size_t ReadSome(size_t max) {
    buffer_.clear();
    std::string chunk(max, '\0');
    ssize_t n = recv(fd_, chunk.data(), max, 0);
    return n > 0 ? static_cast<size_t>(n) : 0;
  }

  // Reads until `marker` has been received; false on EOF or timeout first.
  bool ReadUntil(std::string_view marker) {
    while (buffer_.find(marker) == std::string::npos) {
      if (!Fill()) return false;
    }
    return true;
  }

  // Everything until the server closes the connection (or 5 s pass).
  std::string ReadToEof() {
    while (Fill()) {
    }
    return std::move(buffer_);
  }

  // True when the server closes the connection without sending anything more.
  bool ReadsEof() {
    if (!buffer_.empty()) return false;
    char byte;
    ssize_t n = recv(fd_, &byte, 1, 0);
    return n == 0 || (n < 0 && errno == ECONNRESET);
  }

 private:
  bool Fill() {
    char chunk[4096];
    ssize_t n = recv(fd_, chunk, sizeof(chunk), 0);
    if (n <= 0) return false;
    buffer_.append(chunk, static_cast<size_t>(n));
    return true;
  }

  int fd_;
  bool connected_ = false;
  std::string buffer_;
};

HttpResponse TextResponse(std::string body) {
  HttpResponse response;
  response.headers.emplace_back("Content-Type", "text/plain");
  response.body = std::move(body);
  return response;
}

// Answers "<method> <target> <body>", and reports an X-Custom request header as X-Seen.
void Echo(HttpRequest request, std::shared_ptr<Responder> responder) {
  HttpResponse response = TextResponse(request.method + " " + request.target + " " + request.body);
  for (const auto& [name, value] : request.headers) {
    if (name == "x-custom") response.headers.emplace_back("X-Seen", value);
  }
  responder->Send(std::move(response));
}

std::string Get(const std::string& target) {
  return "GET " + target + " HTTP/1.1\r\nHost: t\r\n\r\n";
}

// Sends `rounds` mutations of `valid` (bytes changed, cut out or inserted), each on a
// connection of its own that then ends its input, and reads what comes back.
void SendMutations(int port, const std::string& valid, uint64_t seed, int rounds) {
  std::mt19937_64 random(seed);
  for (int round = 0; round < rounds; ++round) {
    std::string input = valid;
    int mutations = 1 + static_cast<int>(random() % 8);
    for (int m = 0; m < mutations; ++m) {
      size_t at = random() % input.size();
      switch (random() % 3) {
        case 0:
          input[at] = static_cast<char>(random() % 256);
          break;
        case 1:
          input.erase(at, 1 + random() % 8);
          break;
        default:
          input.insert(at, std::string(1 + random() % 300, static_cast<char>(random())));
      }
      if (input.empty()) input = "x";
    }
    RawClient client(port);
    client.Send(input);
    client.ShutdownWrites();
    while (client.Read()) {
    }
  }
}

class HttpTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(uv_loop_init(&loop_), 0); }

  void TearDown() override {
    if (server_) CloseServer();
    uv_run(&loop_, UV_RUN_DEFAULT);  // lets handles being closed finish
    EXPECT_EQ(uv_loop_close(&loop_), 0) << "a libuv handle was left open";
  }

  void StartServer(HttpServerLimits limits, HttpServer::Handler handler, int port = 0,
                   HttpServer::StreamHandler stream_handler = nullptr) {
    server_ =
        std::make_unique<HttpServer>(&loop_, limits, std::move(handler), std::move(stream_handler));
    absl::Status status = server_->Listen("127.0.0.1", port);
    ASSERT_TRUE(status.ok()) << status;
  }

  void CloseServer() {
    bool closed = false;
    server_->Close([&] { closed = true; });
    RunUntil([&] { return closed; });
    ASSERT_TRUE(closed);
    server_.reset();
  }

  // Runs the loop until `done` holds; fails the test after `timeout_ms`.
  void RunUntil(std::function<bool()> done, uint64_t timeout_ms = 10'000) {
    struct Poll {
      std::function<bool()> done;
      uint64_t deadline_ms;
      bool timed_out = false;
      bool closed = false;
    } poll{std::move(done), uv_now(&loop_) + timeout_ms};
    uv_timer_t timer;
    timer.data = &poll;
    uv_timer_init(&loop_, &timer);
    uv_timer_start(
        &timer,
        [](uv_timer_t* t) {
          auto* p = static_cast<Poll*>(t->data);
          if (p->done()) {
            uv_stop(t->loop);
          } else if (uv_now(t->loop) >= p->deadline_ms) {
            p->timed_out = true;
            uv_stop(t->loop);
          }
        },
        0, 1);
    uv_run(&loop_, UV_RUN_DEFAULT);
    uv_close(reinterpret_cast<uv_handle_t*>(&timer),
             [](uv_handle_t* h) { static_cast<Poll*>(h->data)->closed = true; });
    while (!poll.closed) uv_run(&loop_, UV_RUN_NOWAIT);
    EXPECT_FALSE(poll.timed_out) << "timed out after " << timeout_ms << " ms";
  }

  // Runs `client` on a thread with blocking sockets while the loop serves.
  void RunClient(std::function<void()> client) {
    std::atomic<bool> finished{false};
    std::thread thread([&] {
      client();
      finished = true;
    });
    RunUntil([&] { return finished.load(); });
    thread.join();
  }

  // Runs `action` on the loop after `delay_ms`.
  void Later(uint64_t delay_ms, std::function<void()> action) {
    auto* timer = new uv_timer_t;
    timer->data = new std::function<void()>(std::move(action));
    uv_timer_init(&loop_, timer);
    uv_timer_start(
        timer,
        [](uv_timer_t* t) {
          auto* action = static_cast<std::function<void()>*>(t->data);
          (*action)();
          delete action;
          uv_close(reinterpret_cast<uv_handle_t*>(t),
                   [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
        },
        delay_ms, 0);
  }

  int port() const { return server_->port(); }

  uv_loop_t loop_;
  std::unique_ptr<HttpServer> server_;
};

TEST_F(HttpTest, AnswersGetAndPostWithContentLength) {
  StartServer({}, Echo);
  RunClient([&] {
    RawClient client(port());
    ASSERT_TRUE(client.connected());
    client.Send("GET /v1/status?verbose=1 HTTP/1.1\r\nHost: t\r\nX-Custom: Value\r\n\r\n");
    std::optional<RawResponse> get = client.Read();
    ASSERT_TRUE(get);
    EXPECT_EQ(get->status, 200);
    EXPECT_EQ(get->body, "GET /v1/status?verbose=1 ");
    EXPECT_NE(get->head.find("X-Seen: Value\r\n"), std::string::npos);
    EXPECT_NE(get->head.find("Content-Length: 25\r\n"), std::string::npos);

    client.Send("POST /v1/db/x/exec HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
    std::optional<RawResponse> post = client.Read();
    ASSERT_TRUE(post);
    EXPECT_EQ(post->body, "POST /v1/db/x/exec hello");
  });
}

TEST_F(HttpTest, HandlerSeesHeaderNamesLowerCasedInArrivalOrder) {
  HttpRequest seen;
  StartServer({}, [&](HttpRequest request, std::shared_ptr<Responder> responder) {
    seen = std::move(request);
    responder->Send(TextResponse("ok"));
  });
  RunClient([&] {
    RawClient client(port());
    client.Send("DELETE /v1/db/a HTTP/1.1\r\nHost: t\r\nX-Empty:\r\nX-MiXed: Some Value\r\n\r\n");
    ASSERT_TRUE(client.Read());
  });
  EXPECT_EQ(seen.method, "DELETE");
  EXPECT_EQ(seen.target, "/v1/db/a");
  EXPECT_EQ(seen.headers, (HttpHeaders{{"host", "t"}, {"x-empty", ""}, {"x-mixed", "Some Value"}}));
}

TEST_F(HttpTest, ExpectContinueGetsInterimAnswerBeforeTheBody) {
  StartServer({}, Echo);
  RunClient([&] {
    RawClient client(port());
    client.Send("PUT /up HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n");
    std::optional<RawResponse> interim = client.Read();
    ASSERT_TRUE(interim);
    EXPECT_EQ(interim->status, 100);
    client.Send("data");
    std::optional<RawResponse> response = client.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->body, "PUT /up data");
  });
}

TEST_F(HttpTest, ClientNotReadingItsResponseIsCutOffAfterWriteTimeout) {
  HttpServerLimits limits;
  limits.write_timeout_ms = 100;
  const size_t body_bytes = 32 * 1024 * 1024;
  StartServer(limits, [&](HttpRequest, std::shared_ptr<Responder> responder) {
    responder->Send(TextResponse(std::string(body_bytes, 'z')));
  });
  RunClient([&] {
    RawClient client(port());
    client.Send(Get("/huge"));
    std::this_thread::sleep_for(std::chrono::milliseconds(400));
    EXPECT_LT(client.ReadToEof().size(), body_bytes);
  });
}

TEST_F(HttpTest, ReassemblesChunkedBodyArrivingInPieces) {
  StartServer({}, Echo);
  RunClient([&] {
    RawClient client(port());
    for (std::string_view piece : {"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chu",
                                   "nked\r\n\r\n5\r\nhel", "lo\r\n6\r\n world\r\n", "0\r\n\r\n"}) {
      client.Send(piece);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    std::optional<RawResponse> response = client.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->body, "POST /c hello world");
  });
}

TEST_F(HttpTest, KeepAliveServesTwoRequestsOnOneConnection) {
  StartServer({}, Echo);
  RunClient([&] {
    RawClient client(port());
    client.Send(Get("/one"));
    std::optional<RawResponse> first = client.Read();
    client.Send(Get("/two"));
    std::optional<RawResponse> second = client.Read();
    ASSERT_TRUE(first && second);
    EXPECT_EQ(first->body, "GET /one ");
    EXPECT_EQ(second->body, "GET /two ");
    EXPECT_EQ(first->head.find("Connection: close"), std::string::npos);
  });
}

TEST_F(HttpTest, ConnectionCloseRequestGetsAnswerThenClose) {
  StartServer({}, Echo);
  RunClient([&] {
    RawClient client(port());
    client.Send("GET /bye HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    std::optional<RawResponse> response = client.Read();
    ASSERT_TRUE(response);
    EXPECT_NE(response->head.find("Connection: close\r\n"), std::string::npos);
    EXPECT_TRUE(client.ReadsEof());
  });
}

TEST_F(HttpTest, AnswersAsynchronouslyAndPipelinedRequestsInOrder) {
  StartServer({}, [&](HttpRequest request, std::shared_ptr<Responder> responder) {
    if (request.target != "/slow") return Echo(std::move(request), std::move(responder));
    Later(100, [responder] { responder->Send(TextResponse("slow answer")); });
  });
  RunClient([&] {
    RawClient client(port());
    client.Send(Get("/slow") + Get("/fast"));
    std::optional<RawResponse> first = client.Read();
    std::optional<RawResponse> second = client.Read();
    ASSERT_TRUE(first && second);
    EXPECT_EQ(first->body, "slow answer");
    EXPECT_EQ(second->body, "GET /fast ");
  });
}

TEST_F(HttpTest, HalfClosedClientGetsEveryPipelinedRequestAnsweredInOrder) {
  // Every third request is answered later, so the end of the input arrives while answers are
  // pending as well as while they are being written.
  int request_count = 0;
  StartServer({}, [&](HttpRequest request, std::shared_ptr<Responder> responder) {
    if (request_count++ % 3 == 0) {
      Later(5, [responder, request] { Echo(request, responder); });
    } else {
      Echo(std::move(request), std::move(responder));
    }
  });
  constexpr int kRequests = 100;
  RunClient([&] {
    RawClient client(port());
    std::string pipeline;
    for (int i = 0; i < kRequests; ++i) pipeline += Get("/" + std::to_string(i));
    client.Send(pipeline);
    client.ShutdownWrites();
    for (int i = 0; i < kRequests; ++i) {
      std::optional<RawResponse> response = client.Read();
      ASSERT_TRUE(response) << "request " << i << " was not answered";
      EXPECT_EQ(response->body, "GET /" + std::to_string(i) + " ");
    }
    EXPECT_TRUE(client.ReadsEof());
  });
  EXPECT_EQ(request_count, kRequests);
  RunUntil([&] { return server_->connection_count() == 0; });
}

TEST_F(HttpTest, HalfClosedClientGets400ForARequestItCutShort) {
  StartServer({}, Echo);
  RunClient([&] {
    RawClient client(port());
    client.Send(Get("/whole") + "POST /cut HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc");
    client.ShutdownWrites();
    std::optional<RawResponse> whole = client.Read();
    ASSERT_TRUE(whole);
    EXPECT_EQ(whole->body, "GET /whole ");
    std::optional<RawResponse> cut = client.Read();
    ASSERT_TRUE(cut);
    EXPECT_EQ(cut->status, 400);
    EXPECT_NE(cut->body.find("\"code\":\"bad_request\""), std::string::npos);
    EXPECT_TRUE(client.ReadsEof());
  });
}

TEST_F(HttpTest, MalformedRequestGets400JsonErrorAndClose) {
  StartServer({}, Echo);
  RunClient([&] {
    RawClient client(port());
    client.Send("POST /x HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n");
    std::optional<RawResponse> response = client.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->status, 400);
    EXPECT_EQ(response->body.rfind("{\"error\":{\"code\":\"bad_request\",\"message\":\"", 0), 0u)
        << response->body;
    EXPECT_NE(response->head.find("Content-Type: application/json"), std::string::npos);
    EXPECT_TRUE(client.ReadsEof());
  });
}

TEST_F(HttpTest, DeclaredBodyOverLimitGets413) {
  HttpServerLimits limits;
  limits.max_body_bytes = 1024;
  StartServer(limits, Echo);
  RunClient([&] {
    RawClient client(port());
    client.Send("POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: 1025\r\n\r\n" +
                std::string(1025, 'x'));
    std::optional<RawResponse> response = client.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->status, 413);
    EXPECT_NE(response->body.find("\"code\":\"payload_too_large\""), std::string::npos);
    EXPECT_TRUE(client.ReadsEof());
  });
}

TEST_F(HttpTest, ChunkedBodyOverLimitGets413) {
  HttpServerLimits limits;
  limits.max_body_bytes = 1024;
  StartServer(limits, Echo);
  RunClient([&] {
    RawClient client(port());
    client.Send("POST /big HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (int i = 0; i < 3; ++i) client.Send("200\r\n" + std::string(512, 'x') + "\r\n");
    std::optional<RawResponse> response = client.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->status, 413);
  });
}

TEST_F(HttpTest, DeclaredBodyOverTheEndpointLimitGets413BeforeAnyBodyIsSent) {
  HttpServerLimits limits;
  limits.max_body_bytes_for = [](std::string_view, std::string_view) -> size_t { return 1024; };
  bool handled = false;
  StartServer(limits, [&](HttpRequest, std::shared_ptr<Responder> responder) {
    handled = true;
    responder->Send(TextResponse("should not be reached"));
  });
  RunClient([&] {
    RawClient client(port());
    client.Send("POST /v1/db/x/query HTTP/1.1\r\nHost: t\r\nContent-Length: 120000000\r\n\r\n");
    std::optional<RawResponse> response = client.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->status, 413);
    EXPECT_EQ(
        response->body,
        R"({"error":{"code":"payload_too_large","message":"request body exceeds 1024 bytes"}})");
    EXPECT_NE(response->head.find("Connection: close\r\n"), std::string::npos);
    EXPECT_TRUE(client.ReadsEof());
  });
  EXPECT_FALSE(handled);
}

TEST_F(HttpTest, ChunkedBodyOverTheEndpointLimitGets413AndClose) {
  HttpServerLimits limits;
  limits.max_body_bytes_for = [](std::string_view, std::string_view) -> size_t { return 1000; };
  StartServer(limits, Echo);
  RunClient([&] {
    RawClient client(port());
    client.Send("POST /big HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    client.Send("3e8\r\n" + std::string(1000, 'x') + "\r\n");  // exactly the limit
    client.Send("1\r\nx\r\n");
    std::optional<RawResponse> response = client.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->status, 413);
    EXPECT_NE(response->body.find("exceeds 1000 bytes"), std::string::npos) << response->body;
    EXPECT_TRUE(client.ReadsEof());
  });
}

TEST_F(HttpTest, EndpointBodyLimitIsAskedWithMethodAndTargetAndCappedByTheGlobalLimit) {
  HttpServerLimits limits;
  limits.max_body_bytes = 64;
  std::vector<std::string> asked;
  limits.max_body_bytes_for = [&](std::string_view method, std::string_view target) -> size_t {
    asked.push_back(std::string(method) + " " + std::string(target));
    return target.starts_with("/small") ? 4 : 1'000'000;
  };
  StartServer(limits, Echo);
  RunClient([&] {
    RawClient client(port());
    client.Send("PUT /small?x=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nfour");
    std::optional<RawResponse> fits = client.Read();
    ASSERT_TRUE(fits);
    EXPECT_EQ(fits->body, "PUT /small?x=1 four");

    client.Send("POST /large HTTP/1.1\r\nHost: t\r\nContent-Length: 65\r\n\r\n");
    std::optional<RawResponse> capped = client.Read();
    ASSERT_TRUE(capped);
    EXPECT_EQ(capped->status, 413);
    EXPECT_NE(capped->body.find("exceeds 64 bytes"), std::string::npos) << capped->body;

    RawClient other(port());
    other.Send("PUT /small HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n");
    std::optional<RawResponse> too_large = other.Read();
    ASSERT_TRUE(too_large);
    EXPECT_EQ(too_large->status, 413);
  });
  EXPECT_EQ(asked, (std::vector<std::string>{"PUT /small?x=1", "POST /large", "PUT /small"}));
}

TEST_F(HttpTest, HeadersOverLimitGet431) {
  HttpServerLimits limits;
  limits.max_header_bytes = 1024;
  StartServer(limits, Echo);
  RunClient([&] {
    RawClient client(port());
    client.Send("GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + std::string(2000, 'y') + "\r\n\r\n");
    std::optional<RawResponse> response = client.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->status, 431);
    EXPECT_NE(response->body.find("\"code\":\"header_too_large\""), std::string::npos);
  });
}

TEST_F(HttpTest, ClientStallingMidHeadersGets408AfterRequestTimeout) {
  HttpServerLimits limits;
  limits.request_timeout_ms = 150;
  StartServer(limits, Echo);
  RunClient([&] {
    RawClient client(port());
    auto start = std::chrono::steady_clock::now();
    client.Send("GET /slowloris HTTP/1.1\r\nHost: t\r\n");
    std::optional<RawResponse> response = client.Read();
    auto waited = std::chrono::steady_clock::now() - start;
    ASSERT_TRUE(response);
    EXPECT_EQ(response->status, 408);
    EXPECT_NE(response->body.find("\"code\":\"request_timeout\""), std::string::npos);
    EXPECT_GE(waited, std::chrono::milliseconds(140));
    EXPECT_TRUE(client.ReadsEof());
  });
}

TEST_F(HttpTest, IdleKeepAliveConnectionIsClosed) {
  HttpServerLimits limits;
  limits.idle_timeout_ms = 100;
  StartServer(limits, Echo);
  RunClient([&] {
    RawClient silent(port());
    EXPECT_TRUE(silent.ReadsEof());
    RawClient after_request(port());
    after_request.Send(Get("/once"));
    ASSERT_TRUE(after_request.Read());
    EXPECT_TRUE(after_request.ReadsEof());
  });
}

TEST_F(HttpTest, AnswerAfterClientResetItsConnectionIsIgnored) {
  std::shared_ptr<Responder> held;
  StartServer({}, [&](HttpRequest request, std::shared_ptr<Responder> responder) {
    if (request.target == "/hold") {
      held = std::move(responder);
    } else {
      Echo(std::move(request), std::move(responder));
    }
  });
  RunClient([&] {
    RawClient client(port());
    client.Send(Get("/hold"));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    client.Reset();
  });
  RunUntil([&] { return held != nullptr && !held->connection_open(); });
  held->Send(TextResponse("nobody is listening"));
  held.reset();
  EXPECT_EQ(server_->connection_count(), 0u);
  RunClient([&] {
    RawClient client(port());
    client.Send(Get("/still-serving"));
    std::optional<RawResponse> response = client.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->body, "GET /still-serving ");
  });
}

TEST_F(HttpTest, DroppedResponderAnswers500) {
  StartServer({}, [](HttpRequest, std::shared_ptr<Responder>) {});
  RunClient([&] {
    RawClient client(port());
    client.Send(Get("/forgotten"));
    std::optional<RawResponse> response = client.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->status, 500);
  });
}

TEST_F(HttpTest, HeadGetsLengthWithoutBody) {
  StartServer({}, Echo);
  RunClient([&] {
    RawClient client(port());
    client.Send("HEAD /h HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    std::string received = client.ReadToEof();
    EXPECT_NE(received.find("Content-Length: 8\r\n"), std::string::npos) << received;
    EXPECT_EQ(received.substr(received.size() - 4), "\r\n\r\n") << received;
  });
}

// A streamed body of `size` bytes whose byte i is 'a' + i % 26, made at each Read; it
// counts what it has produced, and fails at `fail_at` when set.
class PatternSource : public HttpBodySource {
 public:
  PatternSource(uint64_t size, uint64_t fail_at = UINT64_MAX) : size_(size), fail_at_(fail_at) {}
  uint64_t size() const override { return size_; }
  void Read(size_t max_bytes, ReadDone done) override {
    if (produced_ >= fail_at_) {
      done(absl::UnavailableError("the disk went away"));
      return;
    }
    std::string piece;
    for (size_t i = 0; i < max_bytes && produced_ < size_; ++i, ++produced_) {
      piece.push_back(static_cast<char>('a' + produced_ % 26));
    }
    done(std::move(piece));
  }
  std::atomic<uint64_t>& produced() { return produced_; }

 private:
  const uint64_t size_;
  const uint64_t fail_at_;
  std::atomic<uint64_t> produced_{0};
};

bool IsPattern(std::string_view body, uint64_t from = 0) {
  for (size_t i = 0; i < body.size(); ++i) {
    if (body[i] != static_cast<char>('a' + (from + i) % 26)) return false;
  }
  return true;
}

// A handler that answers every request with a streamed body from `make`, and keeps a weak
// handle on the latest source in `*latest` (when given).
template <typename Source>
HttpServer::Handler StreamFrom(std::function<std::shared_ptr<Source>()> make,
                               std::weak_ptr<Source>* latest = nullptr) {
  return [make = std::move(make), latest](HttpRequest, std::shared_ptr<Responder> responder) {
    std::shared_ptr<Source> source = make();
    if (latest != nullptr) *latest = source;
    HttpResponse response;
    response.body_source = std::move(source);
    responder->Send(std::move(response));
  };
}

TEST_F(HttpTest, StreamedBodyIsProducedOnlyAsFastAsTheClientReadsThenWhole) {
  const uint64_t body_bytes = 64 << 20;
  auto source = std::make_shared<PatternSource>(body_bytes);
  StartServer({}, [&](HttpRequest request, std::shared_ptr<Responder> responder) {
    HttpResponse response;
    if (request.target == "/stream") {
      response.body_source = source;
    } else {
      response.body = "small";
    }
    responder->Send(std::move(response));
  });
  RunClient([&] {
    RawClient client(port());
    client.Send(Get("/stream"));
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    // Only what the socket buffers hold has been produced, not the body.
    EXPECT_LT(source->produced().load(), uint64_t{16} << 20);
    std::optional<RawResponse> response = client.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->status, 200);
    EXPECT_NE(response->head.find("Content-Length: 67108864\r\n"), std::string::npos);
    ASSERT_EQ(response->body.size(), body_bytes);
    EXPECT_TRUE(IsPattern(response->body));
    // The connection goes on to the next request.
    client.Send(Get("/next"));
    std::optional<RawResponse> next = client.Read();
    ASSERT_TRUE(next);
    EXPECT_EQ(next->body, "small");
  });
}

TEST_F(HttpTest, StreamedBodyThatFailsEndsTheConnectionShort) {
  StartServer({}, StreamFrom<PatternSource>(
                      [] { return std::make_shared<PatternSource>(4 << 20, 1 << 20); }));
  RunClient([&] {
    RawClient client(port());
    client.Send(Get("/stream"));
    std::string received = client.ReadToEof();
    const size_t head_end = received.find("\r\n\r\n");
    ASSERT_NE(head_end, std::string::npos);
    EXPECT_EQ(received.size() - head_end - 4, size_t{1} << 20);
  });
  RunUntil([&] { return server_->connection_count() == 0; });
}

TEST_F(HttpTest, AClientLeavingMidStreamReleasesTheSource) {
  std::weak_ptr<PatternSource> weak;
  StartServer({}, StreamFrom<PatternSource>(
                      [] { return std::make_shared<PatternSource>(uint64_t{1} << 30); }, &weak));
  RunClient([&] {
    RawClient client(port());
    client.Send(Get("/stream"));
    ASSERT_TRUE(client.ReadUntil("\r\n\r\n"));
    client.Reset();
  });
  RunUntil([&] { return weak.expired() && server_->connection_count() == 0; });
}

// A source that answers each Read a millisecond later, from the loop (as a file read on the
// thread pool does).
class LaterSource : public HttpBodySource, public std::enable_shared_from_this<LaterSource> {
 public:
  LaterSource(uint64_t size, std::function<void(uint64_t, std::function<void()>)> later)
      : size_(size), later_(std::move(later)) {}
  uint64_t size() const override { return size_; }
  void Read(size_t max_bytes, ReadDone done) override {
    auto self = shared_from_this();
    later_(1, [self, max_bytes, done = std::move(done)] {
      const size_t n =
          static_cast<size_t>(std::min<uint64_t>(max_bytes, self->size_ - self->produced_));
      self->produced_ += n;
      done(std::string(n, 'x'));
    });
  }

 private:
  const uint64_t size_;
  std::function<void(uint64_t, std::function<void()>)> later_;
  uint64_t produced_ = 0;
};

TEST_F(HttpTest, AClientLeavingWhileAPieceIsBeingReadReleasesTheSourceOnceItAnswers) {
  std::weak_ptr<LaterSource> weak;
  auto later = [this](uint64_t ms, std::function<void()> action) { Later(ms, std::move(action)); };
  StartServer(
      {}, StreamFrom<LaterSource>(
              [later] { return std::make_shared<LaterSource>(uint64_t{1} << 30, later); }, &weak));
  RunClient([&] {
    RawClient client(port());
    client.Send(Get("/stream"));
    ASSERT_TRUE(client.ReadUntil("\r\n\r\n"));
    ASSERT_GT(client.ReadSome(64 * 1024), 0u);
    client.Reset();
  });
  // The connection closes with a read under way; the late answer is dropped and the source
  // goes with it.
  RunUntil([&] { return weak.expired() && server_->connection_count() == 0; });
}

TEST_F(HttpTest, AStreamedBodyReadTooSlowlyIsCutOffAtItsDeadline) {
  HttpServerLimits limits;
  limits.write_timeout_ms = 1000;
  limits.min_stream_bytes_per_second = 16 << 20;
  const uint64_t body_bytes = 16 << 20;  // deadline: 1 s + 1 s
  StartServer(limits, StreamFrom<PatternSource>(
                          [body_bytes] { return std::make_shared<PatternSource>(body_bytes); }));
  RunClient([&] {
    RawClient client(port());
    client.Send(Get("/slow"));
    // 64 KiB every 20 ms, about 3 MiB/s: every piece within the write timeout, the whole
    // body not within its deadline.
    uint64_t received = 0;
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      const size_t n = client.ReadSome(64 * 1024);
      if (n == 0) break;
      received += n;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(received, body_bytes);
    EXPECT_LT(seconds, 4.5);
  });
}

TEST_F(HttpTest, HeadOfAStreamedBodyGetsItsLengthAndNoPiece) {
  auto source = std::make_shared<PatternSource>(12345);
  StartServer({}, StreamFrom<PatternSource>([source] { return source; }));
  RunClient([&] {
    RawClient client(port());
    client.Send("HEAD /h HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    std::string received = client.ReadToEof();
    EXPECT_NE(received.find("Content-Length: 12345\r\n"), std::string::npos) << received;
    ASSERT_GE(received.size(), 4u);
    EXPECT_EQ(received.substr(received.size() - 4), "\r\n\r\n") << received;
  });
  EXPECT_EQ(source->produced().load(), 0u);
}

TEST_F(HttpTest, FileBodyServesAByteRangeOfTheFileInPieces) {
  const std::string path = std::string(getenv("TEST_TMPDIR")) + "/body";
  std::string content;
  for (int i = 0; i < 3 << 20; ++i) content.push_back(static_cast<char>('a' + i % 26));
  {
    int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(write(fd, content.data(), content.size()), static_cast<ssize_t>(content.size()));
    close(fd);
  }
  const uint64_t offset = 1000;
  const uint64_t length = (2 << 20) + 7;
  auto hold = std::make_shared<int>(0);
  std::weak_ptr<int> held = hold;
  StartServer({}, [&](HttpRequest, std::shared_ptr<Responder> responder) {
    HttpResponse response;
    int fd = open(path.c_str(), O_RDONLY);
    response.body_source = FileBodySource::Create(&loop_, fd, offset, length, std::move(hold));
    responder->Send(std::move(response));
  });
  RunClient([&] {
    RawClient client(port());
    client.Send(Get("/file"));
    std::optional<RawResponse> response = client.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->body, content.substr(offset, length));
  });
  // Once the body is written, the source and what it holds are let go.
  RunUntil([&] { return held.expired(); });
}

TEST_F(HttpTest, NewClientTakesTheLongestIdleConnectionsPlaceWhenAllAreTaken) {
  HttpServerLimits limits;
  limits.max_connections = 3;
  StartServer(limits, Echo);
  RunClient([&] {
    RawClient first(port());
    RawClient second(port());
    RawClient third(port());
    // Each answered in turn, so each is accepted, and idle since in this order.
    for (RawClient* client : {&first, &second, &third}) {
      client->Send(Get("/warm"));
      ASSERT_TRUE(client->Read());
    }
    RawClient newcomer(port());
    newcomer.Send(Get("/healthz"));
    std::optional<RawResponse> response = newcomer.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->body, "GET /healthz ");
    EXPECT_TRUE(first.ReadsEof());
    second.Send(Get("/still-open"));
    std::optional<RawResponse> still_open = second.Read();
    ASSERT_TRUE(still_open);
    EXPECT_EQ(still_open->body, "GET /still-open ");
  });
}

TEST_F(HttpTest, IdleConnectionsThatNeverSentAByteMakeRoomForANewClient) {
  HttpServerLimits limits;
  limits.max_connections = 4;
  StartServer(limits, Echo);
  std::vector<std::unique_ptr<RawClient>> silent;
  for (int i = 0; i < 4; ++i) silent.push_back(std::make_unique<RawClient>(port()));
  RunUntil([&] { return server_->connection_count() == 4; });
  RunClient([&] {
    for (int i = 0; i < 3; ++i) {
      RawClient client(port());
      client.Send(Get("/healthz"));
      std::optional<RawResponse> response = client.Read();
      ASSERT_TRUE(response) << "client " << i;
      EXPECT_EQ(response->status, 200);
    }
  });
}

TEST_F(HttpTest, ConnectionsBeyondTheLimitAreClosedWhenNoneIsIdle) {
  HttpServerLimits limits;
  limits.max_connections = 2;
  std::vector<std::shared_ptr<Responder>> held;
  std::atomic<int> held_count{0};
  StartServer(limits, [&](HttpRequest request, std::shared_ptr<Responder> responder) {
    if (request.target != "/hold") return Echo(std::move(request), std::move(responder));
    held.push_back(std::move(responder));
    ++held_count;
  });
  RawClient first(port());
  RawClient second(port());
  RunClient([&] {
    first.Send(Get("/hold"));
    second.Send(Get("/hold"));
    while (held_count.load() < 2) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    RawClient third(port());
    EXPECT_TRUE(third.ReadsEof());
  });
  for (std::shared_ptr<Responder>& responder : held) responder->Send(TextResponse("released"));
  RunClient([&] {
    std::optional<RawResponse> released = first.Read();
    ASSERT_TRUE(released);
    EXPECT_EQ(released->body, "released");
    first.Send(Get("/1-again"));
    EXPECT_TRUE(first.Read());
  });
}

TEST_F(HttpTest, CloseWithARequestPendingReleasesEverything) {
  std::shared_ptr<Responder> held;
  bool closed = false;
  StartServer({}, [&](HttpRequest, std::shared_ptr<Responder> responder) {
    held = std::move(responder);
    server_->Close([&] { closed = true; });
  });
  RunClient([&] {
    RawClient client(port());
    client.Send(Get("/pending"));
    EXPECT_TRUE(client.ReadsEof());
  });
  RunUntil([&] { return closed; });
  EXPECT_FALSE(held->connection_open());
  held->Send(TextResponse("too late"));
  server_.reset();
}

TEST_F(HttpTest, GarbageNeverCrashesAndLeavesNoConnections) {
  HttpServerLimits limits;
  limits.max_header_bytes = 512;
  limits.max_body_bytes = 256;
  limits.request_timeout_ms = 200;
  StartServer(limits, Echo);
  const std::string valid =
      "POST /p?q=1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n"
      "GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
  RunClient([&] { SendMutations(port(), valid, 20240601, 500); });
  RunUntil([&] { return server_->connection_count() == 0; });
  RunClient([&] {
    RawClient client(port());
    client.Send(Get("/alive"));
    EXPECT_TRUE(client.Read());
  });
}

// --- Streamed request bodies -----------------------------------------------------------

// A sink that records what it is given. Each Write's `done` runs at once, or waits in
// `held` while `hold` is set (a disk write under way).
struct RecordingSink : HttpBodySink {
  std::string received;
  size_t writes = 0;
  bool finished = false;
  bool aborted = false;
  bool hold = false;
  std::function<void()> held;
  std::shared_ptr<Responder> responder;
  // Answers this instead of taking the body, at the first Write.
  std::optional<HttpResponse> refuse_at_first_write;

  void Write(std::string piece, std::function<void()> done) override {
    EXPECT_FALSE(piece.empty());
    EXPECT_FALSE(finished || aborted);
    EXPECT_FALSE(held) << "a Write before the previous one's done";
    ++writes;
    received += piece;
    if (refuse_at_first_write) {
      responder->Send(*std::move(refuse_at_first_write));
      refuse_at_first_write.reset();
    }
    if (hold) {
      held = std::move(done);
    } else {
      done();
    }
  }
  void Finish() override {
    EXPECT_FALSE(finished || aborted);
    finished = true;
    responder->Send(TextResponse("got " + std::to_string(received.size())));
  }
  void Abort() override {
    EXPECT_FALSE(finished || aborted);
    aborted = true;
  }
};

HttpServerLimits StreamingLimits() {
  HttpServerLimits limits;
  limits.max_body_bytes = 1024;  // bodies held in memory; streamed ones are not bound by it
  limits.stream_body_for = [](const HttpRequest& head) -> size_t {
    return head.method == "PUT" && head.target.starts_with("/up") ? 1 << 30 : 0;
  };
  return limits;
}

std::string Pattern(size_t size) {
  std::string out(size, '\0');
  for (size_t i = 0; i < size; ++i) out[i] = static_cast<char>('a' + i % 26);
  return out;
}

TEST_F(HttpTest, AStreamedBodyReachesItsSinkInPiecesAndTheServerStopsReadingWhileItIsBusy) {
  auto sink = std::make_shared<RecordingSink>();
  sink->hold = true;
  HttpRequest seen_head;
  StartServer(StreamingLimits(), Echo, 0,
              [&](const HttpRequest& head, std::shared_ptr<Responder> responder) {
                seen_head = head;
                sink->responder = std::move(responder);
                return sink;
              });
  const std::string body = Pattern(16 << 20);
  std::atomic<bool> sent{false};
  std::thread client_thread;
  std::unique_ptr<RawClient> client;
  RunClient([&] { client = std::make_unique<RawClient>(port()); });
  client_thread = std::thread([&] {
    client->Send("PUT /up/a HTTP/1.1\r\nHost: t\r\nContent-Length: " + std::to_string(body.size()) +
                 "\r\n\r\n");
    client->Send(body);
    sent = true;
  });
  // The sink holds its first piece: the server reads no more, so the client blocks once the
  // socket buffers are full.
  RunUntil([&] { return sink->writes == 1; });
  bool waited = false;
  Later(300, [&] { waited = true; });
  RunUntil([&] { return waited; });
  EXPECT_EQ(sink->writes, 1u);
  EXPECT_LE(sink->received.size(), size_t{256} << 10);
  EXPECT_FALSE(sent.load());
  // Released, piece by piece, the whole body arrives.
  sink->hold = false;
  std::function<void()> done = std::move(sink->held);
  sink->held = nullptr;
  done();
  RunUntil([&] { return sink->finished; });
  client_thread.join();
  EXPECT_EQ(seen_head.method, "PUT");
  EXPECT_EQ(seen_head.target, "/up/a");
  EXPECT_TRUE(seen_head.body.empty());
  EXPECT_EQ(sink->received, body);
  EXPECT_GT(sink->writes, 10u);
  RunClient([&] {
    std::optional<RawResponse> response = client->Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->body, "got 16777216");
    // The connection goes on: a buffered request after a streamed one.
    client->Send("POST /small HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc");
    std::optional<RawResponse> next = client->Read();
    ASSERT_TRUE(next);
    EXPECT_EQ(next->body, "POST /small abc");
  });
  client.reset();
}

TEST_F(HttpTest, ChunkedAndEmptyStreamedBodiesAreFinished) {
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  StartServer(StreamingLimits(), Echo, 0,
              [&](const HttpRequest&, std::shared_ptr<Responder> responder) {
                auto sink = std::make_shared<RecordingSink>();
                sink->responder = std::move(responder);
                sinks.push_back(sink);
                return sink;
              });
  RunClient([&] {
    RawClient client(port());
    client.Send("PUT /up/chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    client.Send("5\r\nhello\r\n");
    client.Send("6\r\n world\r\n0\r\n\r\n");
    std::optional<RawResponse> chunked = client.Read();
    ASSERT_TRUE(chunked);
    EXPECT_EQ(chunked->body, "got 11");
    client.Send("PUT /up/empty HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    std::optional<RawResponse> empty = client.Read();
    ASSERT_TRUE(empty);
    EXPECT_EQ(empty->body, "got 0");
    // Pipelined behind a streamed request, in one send.
    client.Send("PUT /up/p HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nxy" + Get("/after"));
    std::optional<RawResponse> first = client.Read();
    std::optional<RawResponse> second = client.Read();
    ASSERT_TRUE(first && second);
    EXPECT_EQ(first->body, "got 2");
    EXPECT_EQ(second->body, "GET /after ");
  });
  ASSERT_EQ(sinks.size(), 3u);
  EXPECT_EQ(sinks[0]->received, "hello world");
  for (const auto& sink : sinks) EXPECT_TRUE(sink->finished && !sink->aborted);
}

TEST_F(HttpTest, AnAnswerBeforeTheBodyEndsItAndClosesTheConnection) {
  auto sink = std::make_shared<RecordingSink>();
  sink->refuse_at_first_write = JsonErrorResponse(507, "insufficient_storage", "disk full");
  StartServer(StreamingLimits(), Echo, 0,
              [&](const HttpRequest&, std::shared_ptr<Responder> responder) {
                sink->responder = std::move(responder);
                return sink;
              });
  RunClient([&] {
    RawClient client(port());
    client.Send("PUT /up/x HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000\r\n\r\n");
    client.Send(std::string(1 << 20, 'x'));
    std::optional<RawResponse> response = client.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->status, 507);
    EXPECT_NE(response->head.find("Connection: close\r\n"), std::string::npos);
    client.ShutdownWrites();
    client.ReadToEof();
  });
  EXPECT_TRUE(sink->aborted);
  EXPECT_FALSE(sink->finished);
  RunUntil([&] { return server_->connection_count() == 0; });
}

TEST_F(HttpTest, AHandlerRefusingAtTheHeadersSendsNoContinueAndReadsNoBody) {
  StartServer(StreamingLimits(), Echo, 0,
              [&](const HttpRequest& head,
                  std::shared_ptr<Responder> responder) -> std::shared_ptr<HttpBodySink> {
                if (head.target == "/up/bad") {
                  responder->Send(JsonErrorResponse(400, "bad_request", "bad key"));
                  return nullptr;
                }
                auto sink = std::make_shared<RecordingSink>();
                sink->responder = std::move(responder);
                return sink;
              });
  RunClient([&] {
    RawClient refused(port());
    refused.Send(
        "PUT /up/bad HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
    std::optional<RawResponse> response = refused.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->status, 400);
    RawClient taken(port());
    taken.Send(
        "PUT /up/good HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
    ASSERT_TRUE(taken.ReadUntil("HTTP/1.1 100 Continue\r\n\r\n"));
    taken.Send("hello");
    ASSERT_TRUE(taken.ReadUntil("got 5"));
  });
}

TEST_F(HttpTest, AClientLeavingOrTricklingMidBodyAbortsTheSink) {
  HttpServerLimits limits = StreamingLimits();
  limits.request_timeout_ms = 300;
  limits.min_request_bytes_per_second = 1 << 20;
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  StartServer(limits, Echo, 0, [&](const HttpRequest&, std::shared_ptr<Responder> responder) {
    auto sink = std::make_shared<RecordingSink>();
    sink->responder = std::move(responder);
    sinks.push_back(sink);
    return sink;
  });
  RunClient([&] {
    {
      RawClient leaving(port());
      leaving.Send("PUT /up/a HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n");
      leaving.Send(std::string(1000, 'x'));
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      leaving.Reset();
    }
    RawClient trickling(port());
    trickling.Send("PUT /up/b HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n");
    // 1 KiB every 50 ms: far below 1 MiB/s.
    std::optional<RawResponse> response;
    for (int i = 0; i < 40 && !response; ++i) {
      if (!trickling.Send(std::string(1024, 'y'))) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    response = trickling.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->status, 408);
  });
  RunUntil([&] { return sinks.size() == 2 && sinks[0]->aborted && sinks[1]->aborted; });
  RunUntil([&] { return server_->connection_count() == 0; });
}

TEST_F(HttpTest, AStreamedBodyThatStopsComingIsCutOffWhateverItsRateSoFar) {
  HttpServerLimits limits = StreamingLimits();
  limits.request_timeout_ms = 300;
  limits.min_request_bytes_per_second = 64 << 10;  // 1 MiB sent earns 16 s of credit
  std::shared_ptr<RecordingSink> sink;
  StartServer(limits, Echo, 0, [&](const HttpRequest&, std::shared_ptr<Responder> responder) {
    sink = std::make_shared<RecordingSink>();
    sink->responder = std::move(responder);
    return sink;
  });
  RunClient([&] {
    RawClient stalling(port());
    stalling.Send("PUT /up/s HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000\r\n\r\n");
    stalling.Send(std::string(1 << 20, 'z'));
    const auto start = std::chrono::steady_clock::now();
    std::optional<RawResponse> response = stalling.Read();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->status, 408);
    EXPECT_LT(seconds, 3.0);
  });
  RunUntil([&] { return sink != nullptr && sink->aborted; });
}

TEST_F(HttpTest, StreamedBodiesHaveTheLimitTheirHeadGets) {
  HttpServerLimits limits = StreamingLimits();
  limits.stream_body_for = [](const HttpRequest& head) -> size_t {
    // Decided from the headers too: only a multipart body streams here.
    for (const auto& [name, value] : head.headers) {
      if (name == "content-type" && value.starts_with("multipart/")) return 4096;
    }
    return 0;
  };
  bool handled = false;
  StartServer(limits, Echo, 0, [&](const HttpRequest&, std::shared_ptr<Responder> responder) {
    handled = true;
    auto sink = std::make_shared<RecordingSink>();
    sink->responder = std::move(responder);
    return sink;
  });
  RunClient([&] {
    RawClient declared(port());
    declared.Send(
        "PUT /up/x HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/x\r\nContent-Length: "
        "4097\r\n\r\n");
    std::optional<RawResponse> response = declared.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->status, 413);
  });
  EXPECT_FALSE(handled);
  RunClient([&] {
    RawClient chunked(port());
    chunked.Send(
        "PUT /up/x HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/x\r\nTransfer-Encoding: "
        "chunked\r\n\r\n");
    chunked.Send("1001\r\n" + std::string(4097, 'x') + "\r\n");
    std::optional<RawResponse> response = chunked.Read();
    ASSERT_TRUE(response);
    EXPECT_EQ(response->status, 413);
    // Not multipart: delivered whole to the handler.
    RawClient whole(port());
    whole.Send("PUT /up/x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
    std::optional<RawResponse> echoed = whole.Read();
    ASSERT_TRUE(echoed);
    EXPECT_EQ(echoed->body, "PUT /up/x hello");
  });
}

TEST_F(HttpTest, GarbageOnStreamedRequestsNeverCrashesAndLeavesNoConnections) {
  HttpServerLimits limits = StreamingLimits();
  limits.max_header_bytes = 512;
  limits.request_timeout_ms = 200;
  limits.stream_body_for = [](const HttpRequest&) -> size_t { return 1 << 30; };
  size_t ended = 0;
  size_t started = 0;
  struct CountingSink : RecordingSink {
    size_t* ended;
    void Finish() override {
      RecordingSink::Finish();
      ++*ended;
    }
    void Abort() override {
      RecordingSink::Abort();
      ++*ended;
    }
  };
  StartServer(limits, Echo, 0, [&](const HttpRequest&, std::shared_ptr<Responder> responder) {
    ++started;
    auto sink = std::make_shared<CountingSink>();
    sink->ended = &ended;
    sink->responder = std::move(responder);
    return sink;
  });
  const std::string valid =
      "PUT /p?q=1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n"
      "POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
  RunClient([&] { SendMutations(port(), valid, 20261202, 300); });
  RunUntil([&] { return server_->connection_count() == 0; });
  EXPECT_GT(started, 0u);
  EXPECT_EQ(ended, started) << "every sink gets Finish or Abort";
}

TEST(HttpClientBackoff, JitteredWaitsStayBetweenHalfAndAllOfTheBackoffAndVary) {
  uint64_t state = 42;
  std::set<uint64_t> seen;
  for (int i = 0; i < 1000; ++i) {
    uint64_t wait = http_internal::JitteredBackoffMs(125, &state);
    EXPECT_GE(wait, 62u);
    EXPECT_LE(wait, 125u);
    seen.insert(wait);
  }
  EXPECT_GT(seen.size(), 50u) << "the waits are spread, not one value";
  EXPECT_TRUE(seen.contains(62u) && seen.contains(125u)) << "both ends are reachable";
  EXPECT_LE(http_internal::JitteredBackoffMs(1, &state), 1u);
  EXPECT_EQ(http_internal::JitteredBackoffMs(0, &state), 0u);
}

TEST_F(HttpTest, ClientPostsInOrderAndGetsResponses) {
  StartServer({}, Echo);
  HttpClient client(&loop_, "127.0.0.1", port());
  std::vector<std::string> bodies;
  for (int i = 0; i < 3; ++i) {
    client.Post("/peer/" + std::to_string(i), std::string("\0bin", 4) + std::to_string(i),
                [&](absl::StatusOr<HttpResponse> response) {
                  ASSERT_TRUE(response.ok()) << response.status();
                  EXPECT_EQ(response->status, 200);
                  bodies.push_back(response->body);
                });
  }
  RunUntil([&] { return bodies.size() == 3; });
  ASSERT_EQ(bodies.size(), 3u);
  EXPECT_EQ(bodies[0], "POST /peer/0 " + std::string("\0bin", 4) + "0");
  EXPECT_EQ(bodies[2], "POST /peer/2 " + std::string("\0bin", 4) + "2");
}

TEST_F(HttpTest, ClientReconnectsAfterServerRestart) {
  StartServer({}, Echo);
  int server_port = port();
  HttpClient client(&loop_, "127.0.0.1", server_port);
  std::optional<absl::StatusOr<HttpResponse>> first, second;
  client.Post("/a", "1", [&](absl::StatusOr<HttpResponse> r) { first = std::move(r); });
  RunUntil([&] { return first.has_value(); });
  ASSERT_TRUE(first->ok());

  CloseServer();
  // Posted while nobody listens: refused connections back off until the server is back.
  client.Post("/b", "2", [&](absl::StatusOr<HttpResponse> r) { second = std::move(r); });
  Later(200, [&] { StartServer({}, Echo, server_port); });
  RunUntil([&] { return second.has_value(); });
  ASSERT_TRUE(second->ok()) << second->status();
  EXPECT_EQ((*second)->body, "POST /b 2");
}

TEST_F(HttpTest, ClientRequestTimesOutThenNextRequestSucceeds) {
  StartServer({}, [&](HttpRequest request, std::shared_ptr<Responder> responder) {
    if (request.target == "/never") {
      Later(300, [responder] { responder->Send(TextResponse("late")); });
    } else {
      Echo(std::move(request), std::move(responder));
    }
  });
  HttpClientOptions options;
  options.request_timeout_ms = 100;
  HttpClient client(&loop_, "127.0.0.1", port(), options);
  std::optional<absl::StatusOr<HttpResponse>> timed_out, answered;
  client.Post("/never", "", [&](absl::StatusOr<HttpResponse> r) { timed_out = std::move(r); });
  client.Post("/soon", "x", [&](absl::StatusOr<HttpResponse> r) { answered = std::move(r); });
  RunUntil([&] { return timed_out.has_value(); });
  EXPECT_EQ(timed_out->status().code(), absl::StatusCode::kDeadlineExceeded);
  RunUntil([&] { return answered.has_value(); });
  EXPECT_EQ(answered->status().code(), absl::StatusCode::kDeadlineExceeded)
      << "queued behind a stuck request, it shares its fate";

  client.Post("/soon", "y", [&](absl::StatusOr<HttpResponse> r) { answered = std::move(r); });
  answered.reset();
  RunUntil([&] { return answered.has_value(); });
  ASSERT_TRUE(answered->ok()) << answered->status();
  EXPECT_EQ((*answered)->body, "POST /soon y");
}

// --- Upgrades and the peer stream --------------------------------------------------------

// An upgraded stream that records what it receives, and whether it was told of the close.
struct RecordingStream : HttpUpgradedStream {
  struct Record {
    std::string bytes;
    bool closed = false;
  };
  explicit RecordingStream(std::shared_ptr<Record> record) : record(std::move(record)) {}
  bool Receive(std::string_view bytes) override {
    EXPECT_FALSE(record->closed) << "bytes after Closed()";
    record->bytes.append(bytes);
    return record->bytes.find("stop") == std::string::npos;
  }
  void Closed() override {
    EXPECT_FALSE(record->closed) << "Closed() twice";
    record->closed = true;
  }
  std::shared_ptr<Record> record;
};

std::string UpgradeRequest(std::string_view protocol) {
  return "GET /stream HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: " +
         std::string(protocol) + "\r\n\r\n";
}

TEST_F(HttpTest, AnUpgradeTakenByItsHandlerGetsEveryByteThatFollowsTheRequest) {
  auto record = std::make_shared<RecordingStream::Record>();
  std::string seen_target;
  StartServer({}, Echo);
  server_->set_upgrade_handler([&](const HttpRequest& request, std::function<void()>) {
    seen_target = request.target;
    return std::make_unique<RecordingStream>(record);
  });
  RunClient([&] {
    RawClient client(port());
    // Bytes in the same packet as the request belong to the new protocol.
    client.Send(UpgradeRequest("test/1") + "first ");
    ASSERT_TRUE(client.ReadUntil("\r\n\r\n"));
    client.Send("GET / HTTP/1.1\r\n\r\n");  // not parsed as HTTP any more
  });  // the client leaves: what it sent arrives before the end of its input
  RunUntil([&] { return record->closed && server_->connection_count() == 0; });
  EXPECT_EQ(seen_target, "/stream");
  EXPECT_EQ(record->bytes, "first GET / HTTP/1.1\r\n\r\n");
}

TEST_F(HttpTest, AnUpgradeAnswersSwitchingProtocolsAndEndsWhenTheStreamSaysStop) {
  auto record = std::make_shared<RecordingStream::Record>();
  StartServer({}, Echo);
  server_->set_upgrade_handler([&](const HttpRequest&, std::function<void()>) {
    return std::make_unique<RecordingStream>(record);
  });
  RunClient([&] {
    RawClient client(port());
    client.Send(UpgradeRequest("test/1"));
    std::optional<RawResponse> answer = client.Read();
    ASSERT_TRUE(answer);
    EXPECT_EQ(answer->status, 101);
    EXPECT_NE(answer->head.find("Upgrade: test/1\r\n"), std::string::npos) << answer->head;
    client.Send("please stop");
    EXPECT_TRUE(client.ReadsEof());
  });
  RunUntil([&] { return record->closed && server_->connection_count() == 0; });
}

TEST_F(HttpTest, AnUpgradeTheHandlerDeclinesIsAnsweredAsARequestThenClosed) {
  StartServer({}, Echo);
  server_->set_upgrade_handler([&](const HttpRequest&, std::function<void()>) {
    return std::unique_ptr<HttpUpgradedStream>();
  });
  RunClient([&] {
    RawClient client(port());
    client.Send(UpgradeRequest("test/1"));
    std::optional<RawResponse> answer = client.Read();
    ASSERT_TRUE(answer);
    EXPECT_EQ(answer->status, 200);
    EXPECT_EQ(answer->body, "GET /stream ");
    EXPECT_TRUE(client.ReadsEof());
  });
}

TEST_F(HttpTest, AnUpgradedConnectionHasNoIdleDeadlineIsNeverEvictedAndClosesOnRequest) {
  HttpServerLimits limits;
  limits.idle_timeout_ms = 50;
  limits.max_connections = 1;
  auto record = std::make_shared<RecordingStream::Record>();
  std::function<void()> close_stream;
  StartServer(limits, Echo);
  server_->set_upgrade_handler([&](const HttpRequest&, std::function<void()> close) {
    close_stream = std::move(close);
    return std::make_unique<RecordingStream>(record);
  });
  RawClient client(port());
  RunClient([&] {
    client.Send(UpgradeRequest("test/1"));
    std::optional<RawResponse> switched = client.Read();
    ASSERT_TRUE(switched);
    EXPECT_EQ(switched->status, 101);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // four idle timeouts
    RawClient newcomer(port());  // no room, and nothing idle to make room
    EXPECT_TRUE(newcomer.ReadsEof());
    client.Send("still here");
  });
  RunUntil([&] { return record->bytes == "still here"; });
  EXPECT_FALSE(record->closed);
  close_stream();
  RunUntil([&] { return record->closed && server_->connection_count() == 0; });
  close_stream();  // harmless once closed
  RunClient([&] { EXPECT_TRUE(client.ReadsEof()); });
}

TEST_F(HttpTest, AnUpgradePipelinedBehindARequestGetsNoIdleDeadlineWhenThatIsAnswered) {
  HttpServerLimits limits;
  limits.idle_timeout_ms = 50;
  auto record = std::make_shared<RecordingStream::Record>();
  StartServer(limits, Echo);
  server_->set_upgrade_handler([&](const HttpRequest&, std::function<void()>) {
    return std::make_unique<RecordingStream>(record);
  });
  RawClient client(port());
  RunClient([&] {
    client.Send(Get("/before") + UpgradeRequest("test/1"));
    std::optional<RawResponse> answer = client.Read();
    ASSERT_TRUE(answer);
    EXPECT_EQ(answer->body, "GET /before ");
    std::optional<RawResponse> switched = client.Read();
    ASSERT_TRUE(switched);
    EXPECT_EQ(switched->status, 101);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // four idle timeouts
    client.Send("later");
  });
  RunUntil([&] { return record->bytes == "later"; });
  EXPECT_FALSE(record->closed);
  client.Disconnect();
  RunUntil([&] { return record->closed; });
}

TEST(PeerStreamReader, SplitsFramesArrivingByteByByteOrManyInOneRead) {
  std::vector<std::string> frames;
  PeerStreamReader reader(1 << 20, [&](std::string_view frame) {
    frames.emplace_back(frame);
    return true;
  });
  std::string wire;
  const std::vector<std::string> sent = {"a", "", std::string(70000, 'x'), "last"};
  for (const std::string& frame : sent) wire += PeerStreamHeader(frame.size()) + frame;
  for (char byte : wire) ASSERT_TRUE(reader.Receive(std::string_view(&byte, 1)));
  EXPECT_EQ(frames, sent);
  EXPECT_EQ(reader.buffered_bytes(), 0u);
  frames.clear();
  ASSERT_TRUE(reader.Receive(wire + PeerStreamHeader(9) + "part"));
  EXPECT_EQ(frames, sent);
  EXPECT_EQ(reader.buffered_bytes(), 8u);  // the length and the part of the next frame
}

TEST(PeerStreamReader, RefusesAFrameOverItsLimitBeforeBufferingIt) {
  int frames = 0;
  PeerStreamReader reader(100, [&](std::string_view) { return ++frames < 2; });
  EXPECT_TRUE(reader.Receive(PeerStreamHeader(100) + std::string(100, 'a')));
  EXPECT_FALSE(reader.Receive(PeerStreamHeader(101)));
  EXPECT_FALSE(reader.Receive(PeerStreamHeader(1) + "b"));  // failed for good
  EXPECT_EQ(frames, 1);
  PeerStreamReader stopping(100, [&](std::string_view) { return ++frames < 2; });
  EXPECT_FALSE(stopping.Receive(PeerStreamHeader(1) + "c"));  // the handler said stop
}

// The receiving end of peer streams for the tests: frames in order, per connection.
struct FrameStream : HttpUpgradedStream {
  struct Log {
    std::vector<std::string> frames;
    std::vector<std::string> hellos;
    std::vector<std::function<void()>> closers;
    int closed = 0;
  };
  explicit FrameStream(Log* log)
      : log(log), reader(1 << 22, [log](std::string_view frame) {
          log->frames.emplace_back(frame);
          return true;
        }) {}
  bool Receive(std::string_view bytes) override { return reader.Receive(bytes); }
  void Closed() override { ++log->closed; }
  Log* log;
  PeerStreamReader reader;
};

TEST_F(HttpTest, PeerStreamCarriesFramesInOrderAndReconnectsAfterItsConnectionCloses) {
  FrameStream::Log log;
  StartServer({}, Echo);
  server_->set_upgrade_handler([&](const HttpRequest& request, std::function<void()> close) {
    for (const auto& [name, value] : request.headers) {
      if (name == kPeerStreamHelloHeader) log.hellos.push_back(value);
    }
    log.closers.push_back(std::move(close));
    return std::make_unique<FrameStream>(&log);
  });
  int writable = 0;
  int hellos = 0;
  PeerStreamOptions options;
  options.initial_backoff_ms = 1;
  PeerStreamClient client(&loop_, "127.0.0.1", port(), "/peer", options,
                          {.hello = [&] { return "hello-" + std::to_string(++hellos); },
                           .writable = [&] { ++writable; }});
  EXPECT_FALSE(client.open());
  client.Connect();
  RunUntil([&] { return client.open(); });
  EXPECT_EQ(writable, 1);
  std::vector<std::string> sent;
  for (int i = 0; i < 50; ++i)
    sent.push_back(std::string(i * 997, static_cast<char>('a' + i % 26)));
  sent.push_back(std::string(3 << 20, 'z'));
  for (const std::string& frame : sent) {
    ASSERT_TRUE(client.HasRoom(frame.size()));
    client.Write(frame);
  }
  RunUntil([&] { return log.frames.size() == sent.size(); });
  EXPECT_EQ(log.frames, sent);
  EXPECT_EQ(log.hellos, std::vector<std::string>{"hello-1"});

  log.closers.back()();  // the receiver drops the stream
  RunUntil([&] { return !client.open(); });
  RunUntil([&] {
    client.Connect();  // as the host does whenever it has something to send
    return client.open();
  });
  client.Write("after");
  RunUntil([&] { return log.frames.size() == sent.size() + 1; });
  EXPECT_EQ(log.frames.back(), "after");
  EXPECT_EQ(log.hellos, (std::vector<std::string>{"hello-1", "hello-2"}));
  EXPECT_EQ(client.counters().connects, 2u);
  EXPECT_EQ(client.counters().failures, 1u);
  client.Close();
  RunUntil([&] { return log.closed == 2; });
}

TEST_F(HttpTest, PeerStreamTakesAnyAnswerButSwitchingProtocolsAsARefusalAndWaits) {
  StartServer({}, [](HttpRequest, std::shared_ptr<Responder> responder) {
    responder->Send(JsonErrorResponse(404, "not_found", "no such endpoint"));
  });
  PeerStreamOptions options;
  options.refused_retry_ms = 60'000;
  PeerStreamClient client(&loop_, "127.0.0.1", port(), "/peer", options,
                          {.hello = [] { return std::string("h"); }, .writable = [] {}});
  client.Connect();
  RunUntil([&] { return client.state() == PeerStreamClient::State::kRefused; });
  EXPECT_EQ(client.counters().refusals, 1u);
  client.Connect();  // too soon: no new attempt
  EXPECT_EQ(client.state(), PeerStreamClient::State::kRefused);
  EXPECT_FALSE(client.HasRoom(1));
}

TEST_F(HttpTest, PeerStreamGivesUpOnAHandshakeNobodyAnswers) {
  std::vector<std::shared_ptr<Responder>> held;
  StartServer({}, [&](HttpRequest, std::shared_ptr<Responder> responder) {
    held.push_back(std::move(responder));
  });
  PeerStreamOptions options;
  options.handshake_timeout_ms = 100;
  PeerStreamClient client(&loop_, "127.0.0.1", port(), "/peer", options,
                          {.hello = [] { return std::string("h"); }, .writable = [] {}});
  client.Connect();
  RunUntil([&] { return client.state() == PeerStreamClient::State::kBackingOff; });
  EXPECT_EQ(client.counters().failures, 1u);
  EXPECT_EQ(held.size(), 1u);
}

TEST_F(HttpTest, PeerStreamWhoseReceiverSpeaksAfterSwitchingIsDropped) {
  StartServer({}, [](HttpRequest, std::shared_ptr<Responder> responder) {
    HttpResponse response;
    response.status = 101;
    response.body = "unexpected";
    responder->Send(std::move(response));
  });
  PeerStreamOptions options;
  options.initial_backoff_ms = 60'000;
  PeerStreamClient client(&loop_, "127.0.0.1", port(), "/peer", options,
                          {.hello = [] { return std::string("h"); }, .writable = [] {}});
  client.Connect();
  RunUntil([&] {
    return client.counters().failures + client.counters().refusals == 1 && !client.open();
  });
}

TEST_F(HttpTest, PeerStreamToAPortNobodyListensOnBacksOff) {
  PeerStreamOptions options;
  options.initial_backoff_ms = 1'000;
  PeerStreamClient client(&loop_, "127.0.0.1", 1, "/peer", options,
                          {.hello = [] { return std::string("h"); }, .writable = [] {}});
  client.Connect();
  RunUntil([&] { return client.state() == PeerStreamClient::State::kBackingOff; });
  client.Connect();  // inside the back-off: nothing
  EXPECT_EQ(client.state(), PeerStreamClient::State::kBackingOff);
  EXPECT_EQ(client.counters().failures, 1u);
}

TEST_F(HttpTest, ClientCloseCancelsPendingRequests) {
  HttpClient client(&loop_, "127.0.0.1", 1);  // nothing listens on port 1
  std::optional<absl::Status> result;
  client.Post("/x", "", [&](absl::StatusOr<HttpResponse> r) { result = r.status(); });
  client.Close();
  ASSERT_TRUE(result.has_value());
  EXPECT_EQ(result->code(), absl::StatusCode::kCancelled);
  client.Post("/x", "", [&](absl::StatusOr<HttpResponse> r) { result = r.status(); });
  EXPECT_EQ(result->code(), absl::StatusCode::kFailedPrecondition);
}

// The same error body as the API handlers' (adapters/json_text.h).
TEST(JsonErrorResponse, InvalidUtf8BecomesReplacementCharactersInValidJson) {
  HttpResponse response =
      JsonErrorResponse(400, "bad\xc0", std::string("no such table: t\xff\xe2\x82\n\0", 21));
  EXPECT_EQ(response.status, 400);
  EXPECT_EQ(response.body,
            "{\"error\":{\"code\":\"bad\xef\xbf\xbd\",\"message\":\"no such table: "
            "t\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\\n\\u0000\"}}");
  EXPECT_EQ(response.body,
            ErrorJson("bad\xc0", std::string("no such table: t\xff\xe2\x82\n\0", 21)));
}

TEST(JsonErrorResponse, WellFormedUtf8IsKeptAsIs) {
  HttpResponse response = JsonErrorResponse(404, "not_found", "caf\xc3\xa9 \xf0\x9f\x98\x80");
  EXPECT_EQ(response.body,
            "{\"error\":{\"code\":\"not_found\",\"message\":\"caf\xc3\xa9 \xf0\x9f\x98\x80\"}}");
}

}  // namespace
}  // namespace synod

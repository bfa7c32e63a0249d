// Tests for the peer transport: two PeerLinks on one loop, each behind its own HTTP server,
// as two replicas' would be.

#include "server/peer_links.h"

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace synod::server {
namespace {

constexpr char kSecret[] = "0123456789abcdef0123456789abcdef";

struct Side {
  std::unique_ptr<HttpServer> server;
  std::unique_ptr<PeerLinks> links;
  std::vector<std::pair<uint32_t, Message>> stepped;  // (from, message)
};

class PeerLinksTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(uv_loop_init(&loop_), 0); }

  void TearDown() override {
    int open = 0;
    for (Side* side : {&a_, &b_}) {
      if (side->links) side->links->Stop();
      if (side->server) {
        ++open;
        side->server->Close([&open] { --open; });
      }
    }
    RunUntil([&] { return open == 0; });
    a_ = Side();
    b_ = Side();
    uv_run(&loop_, UV_RUN_DEFAULT);
    EXPECT_EQ(uv_loop_close(&loop_), 0) << "a libuv handle was left open";
  }

  // Starts replicas 1 (a_) and 2 (b_); `b_streams` false makes replica 2 a version without
  // streams.
  void Start(bool b_streams = true) {
    std::map<uint32_t, PeerAddress> peers;
    for (auto [id, side] : {std::pair{1u, &a_}, std::pair{2u, &b_}}) {
      Side* s = side;
      s->server = std::make_unique<HttpServer>(
          &loop_, HttpServerLimits{}, [s](HttpRequest request, std::shared_ptr<Responder> r) {
            auto responder = std::make_shared<HttpResponder>(std::move(r));
            if (!s->links->HandleHttp(request, responder)) {
              responder->Send(JsonErrorResponse(404, "not_found", "no such endpoint"));
            }
          });
      s->server->set_upgrade_handler([s](const HttpRequest& request, std::function<void()> close) {
        return s->links->OpenStream(request, std::move(close));
      });
      ASSERT_TRUE(s->server->Listen("127.0.0.1", 0).ok());
      peers[id] = PeerAddress{.host = "127.0.0.1", .port = s->server->port()};
    }
    for (auto [id, side] : {std::pair{1u, &a_}, std::pair{2u, &b_}}) {
      Side* s = side;
      PeerLinksOptions options;
      options.id = id;
      options.peers = peers;
      options.start_unix_ms = 1'700'000'000'000;
      options.streams = id == 1 || b_streams;
      options.initial_backoff_ms = 5;
      options.max_backoff_ms = 20;
      PeerLinksHost host;
      host.step = [s](uint32_t from, const MessageBatch& batch) {
        for (const Message& m : batch.messages()) s->stepped.emplace_back(from, m);
      };
      host.drain = [] {};
      host.send = [](const std::shared_ptr<HttpResponder>& responder, HttpResponse response) {
        responder->Send(std::move(response));
      };
      host.random_seed = [] { return uint64_t{42}; };
      s->links = std::make_unique<PeerLinks>(&loop_, std::move(options), &auth_, std::move(host));
    }
  }

  void RunUntil(const std::function<bool()>& done) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!done()) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "timed out";
      uv_run(&loop_, UV_RUN_NOWAIT);
    }
  }

  static std::vector<Message> To(uint32_t to, uint64_t commit_index) {
    Message m;
    m.set_from(1);
    m.set_to(to);
    m.set_commit_index(commit_index);
    m.mutable_heartbeat();
    return {m};
  }

  uv_loop_t loop_;
  PeerAuthenticator auth_{kSecret};
  Side a_;
  Side b_;
};

TEST_F(PeerLinksTest, APostCarriesTheFirstBatchThenTheStreamCarriesTheRest) {
  Start();
  a_.links->Send(To(2, 1));  // no stream yet: it is opened, and the batch goes as a POST
  RunUntil([&] { return b_.stepped.size() == 1 && a_.links->stream_open(2); });
  EXPECT_EQ(a_.links->counters().posts, 1u);
  for (uint64_t i = 2; i <= 50; ++i) a_.links->Send(To(2, i));
  RunUntil([&] { return b_.stepped.size() == 50; });
  for (size_t i = 0; i < b_.stepped.size(); ++i) {
    EXPECT_EQ(b_.stepped[i].first, 1u);
    EXPECT_EQ(b_.stepped[i].second.commit_index(), i + 1) << "in order";
  }
  EXPECT_EQ(a_.links->counters().posts, 1u);
  EXPECT_EQ(b_.links->counters().stream_frames_received, 49u);
  EXPECT_EQ(b_.links->counters().streams_accepted, 1u);
  EXPECT_EQ(b_.links->counters().frames_refused, 0u);
}

TEST_F(PeerLinksTest, APeerWithoutStreamsIsSentPostsAndAnswersThem) {
  Start(/*b_streams=*/false);
  for (uint64_t i = 1; i <= 5; ++i) {
    a_.links->Send(To(2, i));
    RunUntil([&] { return b_.stepped.size() == i; });
  }
  EXPECT_FALSE(a_.links->stream_open(2));
  EXPECT_EQ(a_.links->counters().posts, 5u);
  EXPECT_EQ(b_.links->counters().streams_accepted, 0u);
  MetricsText metrics;
  a_.links->AppendMetrics(&metrics);
  EXPECT_NE(metrics.text().find("synod_peer_stream_refusals_total 1\n"), std::string::npos)
      << metrics.text();
  // And the other way: replica 2 only POSTs.
  std::vector<Message> back = To(1, 9);
  back[0].set_from(2);
  b_.links->Send(back);
  RunUntil([&] { return a_.stepped.size() == 1; });
  EXPECT_EQ(a_.stepped[0].first, 2u);
  EXPECT_EQ(b_.links->counters().posts, 1u);
}

TEST_F(PeerLinksTest, MessagesToNoPeerAreDropped) {
  Start();
  a_.links->Send(To(7, 1));
  a_.links->Send(To(2, 2));
  RunUntil([&] { return b_.stepped.size() == 1; });
  EXPECT_EQ(b_.stepped[0].second.commit_index(), 2u);
}

}  // namespace
}  // namespace synod::server

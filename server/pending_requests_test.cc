#include "server/pending_requests.h"

#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace synod::server {
namespace {

// What each request was answered with: "error <status> <code> <message>", "write <code>
// <revision>" or "read".
class PendingRequestsTest : public ::testing::Test {
 protected:
  std::shared_ptr<HttpResponder> NewResponder(std::string name) {
    auto responder = std::make_shared<HttpResponder>(nullptr);
    names_[responder.get()] = std::move(name);
    return responder;
  }
  std::function<void(const CommandResult&)> OnWrite(std::string name) {
    return [this, name](const CommandResult& r) {
      answers_.push_back(name + ": write " + std::to_string(r.code()) + " " +
                         std::to_string(r.revision()));
    };
  }
  std::function<void()> OnRead(std::string name) {
    return [this, name] { answers_.push_back(name + ": read"); };
  }

  std::map<const HttpResponder*, std::string> names_;
  std::vector<std::string> answers_;
  PendingRequests pending_{[this](const std::shared_ptr<HttpResponder>& responder, int status,
                                  std::string_view code, std::string_view message) {
    answers_.push_back(names_[responder.get()] + ": error " + std::to_string(status) + " " +
                       std::string(code) + " " + std::string(message));
  }};
};

CommandResult ResultAt(uint64_t revision, ErrorCode code = OK) {
  CommandResult result;
  result.set_code(code);
  result.set_revision(revision);
  return result;
}

TEST_F(PendingRequestsTest, AWriteIsAnsweredOnceByItsResult) {
  pending_.AddWrite({1, 1}, NewResponder("w"), 100, OnWrite("w"));
  const CommandResult result = ResultAt(7, INVALID_ARGUMENT);
  pending_.Answer({1, 1}, PendingRequests::Applied{result});
  // Later outcomes for the same key find nothing: answered already.
  pending_.Answer({1, 1}, PendingRequests::Applied{result});
  pending_.Answer({1, 1}, PendingRequests::Refused{UNAVAILABLE, "no leader"});
  pending_.Expire(1000);
  EXPECT_EQ(answers_, (std::vector<std::string>{"w: write 1 7"}));
  EXPECT_EQ(pending_.awaiting_replica(), 0u);
}

TEST_F(PendingRequestsTest, ARefusalIsAnsweredWithItsErrorAndDropsTheCallback) {
  // What the callback holds is released with it (media's upload slot and pin are).
  auto held = std::make_shared<int>(0);
  std::weak_ptr<int> watch = held;
  pending_.AddWrite(
      {1, 1}, NewResponder("w1"), 100,
      [this, held = std::move(held)](const CommandResult&) { answers_.push_back("w1: ran"); });
  pending_.AddWrite({1, 2}, NewResponder("w2"), 100, OnWrite("w2"));
  pending_.AddRead({1, 3}, NewResponder("r"), 100, 0, OnRead("r"));
  pending_.Answer({1, 1}, PendingRequests::Refused{UNAVAILABLE, "no leader"});
  // A refusal that names no error is still an error.
  pending_.Answer({1, 2}, PendingRequests::Refused{OK, "lost leadership"});
  pending_.Answer({1, 3}, PendingRequests::Refused{RESOURCE_EXHAUSTED, "too many"});
  EXPECT_EQ(answers_, (std::vector<std::string>{
                          "w1: error 503 unavailable no leader",
                          "w2: error 503 unavailable lost leadership",
                          "r: error 429 resource_exhausted too many",
                      }));
  EXPECT_TRUE(watch.expired());
  EXPECT_EQ(pending_.awaiting_replica(), 0u);
}

TEST_F(PendingRequestsTest, ATimeoutIsAnAnswerLikeAnyOther) {
  pending_.AddWrite({1, 1}, NewResponder("w"), 100, OnWrite("w"));
  pending_.Answer({1, 1}, PendingRequests::TimedOut{});
  const CommandResult result = ResultAt(3);
  pending_.Answer({1, 1}, PendingRequests::Applied{result});
  ASSERT_EQ(answers_.size(), 1u);
  EXPECT_EQ(answers_[0].rfind("w: error 503 unavailable the write was not confirmed", 0), 0u);
}

TEST_F(PendingRequestsTest, AConfirmedReadWaitsForItsRevision) {
  // Confirmed at revision 5, asked for 3: it waits for 5.
  pending_.AddRead({1, 1}, NewResponder("r1"), 100, 3, OnRead("r1"));
  // Asked for 9, confirmed at 4: it waits for 9.
  pending_.AddRead({1, 2}, NewResponder("r2"), 100, 9, OnRead("r2"));
  pending_.Answer({1, 1}, PendingRequests::Confirmed{5});
  pending_.Answer({1, 2}, PendingRequests::Confirmed{4});
  EXPECT_EQ(pending_.awaiting_replica(), 0u);
  EXPECT_EQ(pending_.awaiting_revision(), 2u);
  pending_.ServeReads(4);
  EXPECT_TRUE(answers_.empty());
  pending_.ServeReads(5);
  EXPECT_EQ(answers_, (std::vector<std::string>{"r1: read"}));
  pending_.ServeReads(8);
  EXPECT_EQ(answers_.size(), 1u);
  pending_.ServeReads(9);
  EXPECT_EQ(answers_, (std::vector<std::string>{"r1: read", "r2: read"}));
  EXPECT_EQ(pending_.awaiting_revision(), 0u);
}

TEST_F(PendingRequestsTest, AReadBarrierThatWasLoggedIsConfirmedAtItsRevision) {
  pending_.AddRead({1, 1}, NewResponder("r"), 100, 0, OnRead("r"));
  const CommandResult result = ResultAt(12);
  pending_.Answer({1, 1}, PendingRequests::Applied{result});
  pending_.ServeReads(11);
  EXPECT_TRUE(answers_.empty());
  pending_.ServeReads(12);
  EXPECT_EQ(answers_, (std::vector<std::string>{"r: read"}));
}

TEST_F(PendingRequestsTest, AWriteIsNeverAnsweredAsARead) {
  pending_.AddWrite({1, 1}, NewResponder("w"), 100, OnWrite("w"));
  pending_.Answer({1, 1}, PendingRequests::Confirmed{3});
  pending_.ServeReads(100);
  ASSERT_EQ(answers_.size(), 1u);
  EXPECT_EQ(answers_[0].rfind("w: error 500 internal", 0), 0u) << answers_[0];
}

TEST_F(PendingRequestsTest, DeadlinesAnswerWritesReadsAndConfirmedReads) {
  pending_.AddWrite({1, 1}, NewResponder("w"), 100, OnWrite("w"));
  pending_.AddRead({1, 2}, NewResponder("r"), 100, 0, OnRead("r"));
  pending_.AddLocalRead(NewResponder("local"), 100, 50, OnRead("local"));
  pending_.AddWrite({1, 3}, NewResponder("later"), 200, OnWrite("later"));
  pending_.Expire(99);
  EXPECT_TRUE(answers_.empty());
  pending_.Expire(100);
  ASSERT_EQ(answers_.size(), 3u);
  EXPECT_EQ(answers_[0].rfind("w: error 503 unavailable the write was not confirmed", 0), 0u);
  EXPECT_EQ(answers_[1], "r: error 503 unavailable the read could not be confirmed in time");
  EXPECT_EQ(answers_[2], "local: error 503 unavailable the read could not be confirmed in time");
  // The write that timed out is answered once: its result, arriving late, finds nothing.
  const CommandResult result = ResultAt(3);
  pending_.Answer({1, 1}, PendingRequests::Applied{result});
  EXPECT_EQ(answers_.size(), 3u);
  // The later one is still held.
  pending_.Answer({1, 3}, PendingRequests::Applied{result});
  EXPECT_EQ(answers_.back(), "later: write 0 3");
}

TEST_F(PendingRequestsTest, AReadAddedWhileReadsAreServedIsKept) {
  // A read's callback adds another read (nested), which must neither be lost nor break the
  // pass that is running.
  pending_.AddLocalRead(NewResponder("outer"), 100, 1, [this] {
    answers_.push_back("outer: read");
    pending_.AddLocalRead(NewResponder("inner"), 100, 1, OnRead("inner"));
    pending_.AddLocalRead(NewResponder("far"), 100, 5, OnRead("far"));
    pending_.ServeReads(1);  // as a local read does at once
  });
  pending_.AddLocalRead(NewResponder("second"), 100, 1, OnRead("second"));
  pending_.ServeReads(1);
  EXPECT_EQ(answers_, (std::vector<std::string>{"outer: read", "inner: read", "second: read"}));
  EXPECT_EQ(pending_.awaiting_revision(), 1u);
  pending_.ServeReads(5);
  EXPECT_EQ(answers_.back(), "far: read");
}

}  // namespace
}  // namespace synod::server

#include "server/multipart.h"

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace synod::server {
namespace {

struct Collected {
  std::vector<MultipartParser::Part> parts;
  std::vector<std::string> contents;
  int ended = 0;
};

MultipartParser::Callbacks Collect(Collected* c) {
  return {
      .begin =
          [c](const MultipartParser::Part& p) {
            c->parts.push_back(p);
            c->contents.emplace_back();
            return absl::OkStatus();
          },
      .data =
          [c](std::string_view d) {
            c->contents.back().append(d.data(), d.size());
            return absl::OkStatus();
          },
      .end =
          [c] {
            ++c->ended;
            return absl::OkStatus();
          },
  };
}

const char kBody[] =
    "preamble\r\n"
    "--XyZ\r\n"
    "Content-Disposition: form-data; name=\"json\"\r\n"
    "\r\n"
    "{\"table\":\"t\"}\r\n"
    "--XyZ\r\n"
    "Content-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
    "Content-Type: image/png\r\n"
    "\r\n"
    "\r\n--XyNotTheBoundary\r\n--Xy\r\n"
    "--XyZ--\r\n"
    "epilogue";

TEST(Multipart, BoundaryComesFromTheContentType) {
  EXPECT_EQ(*MultipartBoundary("multipart/form-data; boundary=XyZ"), "XyZ");
  EXPECT_EQ(*MultipartBoundary("Multipart/Form-Data;boundary=\"a b\""), "a b");
  EXPECT_FALSE(MultipartBoundary("application/json").ok());
  EXPECT_FALSE(MultipartBoundary("multipart/form-data").ok());
  EXPECT_FALSE(MultipartBoundary("multipart/form-data; boundary=" + std::string(71, 'x')).ok());
}

TEST(Multipart, PartsComeOutWholeHoweverTheBodyIsCut) {
  const std::string body = kBody;
  std::mt19937_64 random(7);
  for (int round = 0; round < 200; ++round) {
    Collected c;
    MultipartParser parser("XyZ", Collect(&c));
    size_t at = 0;
    while (at < body.size()) {
      const size_t n = round == 0 ? body.size() : 1 + random() % 9;
      ASSERT_TRUE(parser.Feed(std::string_view(body).substr(at, n)).ok());
      at += n;
    }
    ASSERT_TRUE(parser.done());
    ASSERT_EQ(c.parts.size(), 2u);
    EXPECT_EQ(c.ended, 2);
    EXPECT_EQ(c.parts[0].name, "json");
    EXPECT_EQ(c.contents[0], "{\"table\":\"t\"}");
    EXPECT_EQ(c.parts[1].name, "file");
    EXPECT_EQ(c.parts[1].filename, "a.png");
    EXPECT_EQ(c.parts[1].content_type, "image/png");
    EXPECT_EQ(c.contents[1], "\r\n--XyNotTheBoundary\r\n--Xy");
  }
}

TEST(Multipart, MalformedBodiesAreErrorsThatStay) {
  for (const std::string& body : {
           std::string("--B\r\nContent-Type: text/plain\r\n\r\nx\r\n--B--"),  // no disposition
           std::string("--B\r\nno colon here\r\n\r\nx\r\n--B--"),
           std::string("--Bjunk"),
           "--B\r\n" + std::string(MultipartParser::kMaxPartHeaderBytes + 10, 'h'),
       }) {
    Collected c;
    MultipartParser parser("B", Collect(&c));
    absl::Status status = parser.Feed(body);
    EXPECT_FALSE(status.ok()) << body.substr(0, 40);
    EXPECT_FALSE(parser.Feed("more").ok());
    EXPECT_FALSE(parser.done());
  }
  // A callback's error stops the parse.
  MultipartParser parser("B", {.begin =
                                   [](const MultipartParser::Part&) {
                                     return absl::InvalidArgumentError("no such field");
                                   },
                               .data = [](std::string_view) { return absl::OkStatus(); },
                               .end = [] { return absl::OkStatus(); }});
  EXPECT_TRUE(absl::IsInvalidArgument(
      parser.Feed("--B\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n")));
}

}  // namespace
}  // namespace synod::server

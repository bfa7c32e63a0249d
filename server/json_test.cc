// Tests for the HTTP API's JSON: the nesting cap in front of protobuf's parser, how SQL
// values are written (reals above all) and read back, and that every string written is
// valid UTF-8 JSON whatever bytes it was given.

#include "server/json.h"

#include <chrono>
#include <cmath>
#include <limits>
#include <string>

#include "gtest/gtest.h"

namespace synod::server {
namespace {

std::string Nested(int depth) { return std::string(depth, '[') + std::string(depth, ']'); }

SqlValue Real(double real) {
  SqlValue value;
  value.set_real(real);
  return value;
}

std::string Written(const SqlValue& value) {
  std::string out;
  AppendSqlValue(&out, value);
  return out;
}

// What a client gets back when it sends `json` as a parameter.
absl::StatusOr<SqlValue> ReadBack(const std::string& json) {
  google::protobuf::Value parsed;
  if (absl::Status status = ParseJson(json, &parsed); !status.ok()) return status;
  return SqlValueFromJson(parsed);
}

TEST(Json, NestingUpToTheMaximumDepthPassesTheCap) {
  google::protobuf::Value value;
  EXPECT_TRUE(ParseJson(Nested(20), &value).ok());
  // Protobuf's own recursion limit may still refuse it (google.protobuf.Value takes two
  // message levels per array), but with its own error, not the cap's.
  absl::Status status = ParseJson(Nested(kMaxJsonDepth), &value);
  EXPECT_EQ(status.message().find("JSON nesting is deeper"), std::string::npos) << status;
}

TEST(Json, NestingDeeperThanTheMaximumIsRejectedBeforeParsing) {
  google::protobuf::Value value;
  absl::Status status = ParseJson(Nested(kMaxJsonDepth + 1), &value);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(), "JSON nesting is deeper than 64");
}

TEST(Json, TwentyThousandOpenBracketsAreRejectedAtOnce) {
  google::protobuf::Value value;
  auto start = std::chrono::steady_clock::now();
  absl::Status status = ParseJson(R"({"params":)" + std::string(20000, '['), &value);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(100));
}

TEST(Json, BracketsInsideStringsDoNotCountTowardTheDepth) {
  google::protobuf::Value value;
  const std::string brackets(1000, '[');
  // The escaped quote does not end the string, so the brackets after it are still inside.
  absl::Status status = ParseJson(R"(["a\"b)" + brackets + R"(", "\\"])", &value);
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(value.list_value().values(0).string_value(), "a\"b" + brackets);
}

TEST(Json, MalformedJsonIsStillRejectedByTheParser) {
  google::protobuf::Value value;
  EXPECT_EQ(ParseJson("[[1]", &value).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseJson("]]][[[", &value).code(), absl::StatusCode::kInvalidArgument);
}

TEST(Json, WholeNumberedRealKeepsItsPoint) {
  EXPECT_EQ(Written(Real(1.0)), "1.0");
  EXPECT_EQ(Written(Real(-3.0)), "-3.0");
  EXPECT_EQ(Written(Real(0.0)), "0.0");
  EXPECT_EQ(Written(Real(-0.0)), "-0.0");
}

TEST(Json, RealIsWrittenInItsShortestExactForm) {
  EXPECT_EQ(Written(Real(0.1)), "0.1");
  EXPECT_EQ(Written(Real(1.5)), "1.5");
  EXPECT_EQ(Written(Real(1e300)), "1e+300");
  EXPECT_EQ(Written(Real(-2.5e-310)), "-2.5e-310");
}

TEST(Json, IntegerIsWrittenWithoutAPoint) {
  SqlValue value;
  value.set_integer(-42);
  EXPECT_EQ(Written(value), "-42");
}

TEST(Json, RealsReadBackAsTheSameDouble) {
  for (double real : {0.1, 1.5, -2.5e-310, 1e300, 9007199254740993.0 * 4, 3.141592653589793,
                      std::numeric_limits<double>::max(), std::numeric_limits<double>::min(),
                      std::numeric_limits<double>::denorm_min()}) {
    absl::StatusOr<SqlValue> back = ReadBack(Written(Real(real)));
    ASSERT_TRUE(back.ok()) << back.status() << " for " << Written(Real(real));
    ASSERT_TRUE(back->has_real()) << Written(Real(real));
    EXPECT_EQ(back->real(), real) << Written(Real(real));
  }
}

TEST(Json, WholeNumberedRealReadsBackAsARealWhenWrapped) {
  absl::StatusOr<SqlValue> one = ReadBack(R"({"real":)" + Written(Real(1.0)) + "}");
  ASSERT_TRUE(one.ok()) << one.status();
  ASSERT_TRUE(one->has_real());
  EXPECT_EQ(one->real(), 1.0);

  absl::StatusOr<SqlValue> negative_zero = ReadBack(R"({"real":)" + Written(Real(-0.0)) + "}");
  ASSERT_TRUE(negative_zero.ok()) << negative_zero.status();
  ASSERT_TRUE(negative_zero->has_real());
  EXPECT_TRUE(std::signbit(negative_zero->real()));
}

TEST(Json, InfinitiesAreWrittenAsRealObjectsAndReadBack) {
  const double infinity = std::numeric_limits<double>::infinity();
  EXPECT_EQ(Written(Real(infinity)), R"({"real":"Infinity"})");
  EXPECT_EQ(Written(Real(-infinity)), R"({"real":"-Infinity"})");
  for (double real : {infinity, -infinity}) {
    absl::StatusOr<SqlValue> back = ReadBack(Written(Real(real)));
    ASSERT_TRUE(back.ok()) << back.status();
    ASSERT_TRUE(back->has_real());
    EXPECT_EQ(back->real(), real);
  }
}

TEST(Json, NanIsWrittenAsNull) {
  EXPECT_EQ(Written(Real(std::numeric_limits<double>::quiet_NaN())), "null");
}

TEST(Json, RealObjectWithAnythingElseIsRejected) {
  for (const char* json : {R"({"real":"NaN"})", R"({"real":"1.5"})", R"({"real":null})",
                           R"({"real":1,"base64":""})"}) {
    EXPECT_EQ(ReadBack(json).status().code(), absl::StatusCode::kInvalidArgument) << json;
  }
}

TEST(Json, BlobStillReadsBackFromBase64) {
  absl::StatusOr<SqlValue> back = ReadBack(R"({"base64":"AAE="})");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->blob(), std::string("\0\1", 2));
}

TEST(Json, ErrorJsonReplacesInvalidUtf8WithReplacementCharacter) {
  EXPECT_EQ(ErrorJson("bad_sql", "near \"\xff\xfe\": syntax error"),
            "{\"error\":{\"code\":\"bad_sql\",\"message\":"
            "\"near \\\"\xef\xbf\xbd\xef\xbf\xbd\\\": syntax error\"}}");
}

TEST(Json, StringKeepsWellFormedUtf8AndReplacesEachBadByte) {
  struct Case {
    std::string in;
    std::string out;
  };
  const std::string replacement = "\xef\xbf\xbd";
  for (const Case& c : std::initializer_list<Case>{
           {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80",
            "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"},
           {"\x80", replacement},                                      // stray continuation
           {"\xc0\xaf", replacement + replacement},                    // overlong '/'
           {"\xed\xa0\x80", replacement + replacement + replacement},  // surrogate U+D800
           {"\xf4\x90\x80\x80", replacement + replacement + replacement + replacement},  // >10FFFF
           {"ab\xe2\x82", "ab" + replacement + replacement},  // cut short at the end
           {"\xe2\x82x", replacement + replacement + "x"},    // cut short by an ASCII byte
       }) {
    std::string out;
    AppendJsonString(&out, c.in);
    EXPECT_EQ(out, "\"" + c.out + "\"");
  }
}

TEST(Json, StringEscapesQuotesBackslashesAndControlCharacters) {
  std::string out;
  AppendJsonString(&out, std::string("\"\\\n\r\t\x01\x1f\0", 8));
  EXPECT_EQ(out, R"("\"\\\n\r\t\u0001\u001f\u0000")");
}

}  // namespace
}  // namespace synod::server

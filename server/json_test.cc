// Tests for the HTTP API's JSON: the nesting cap in front of protobuf's parser, how SQL
// values are written (reals above all) and read back, and that every string written is
// valid UTF-8 JSON whatever bytes it was given.

#include "server/json.h"

#include <chrono>
#include <cmath>
#include <functional>
#include <iterator>
#include <limits>
#include <memory>
#include <random>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "server/api.pb.h"

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

// --- The request parser against protobuf's JSON parser, which it replaces ----------------

// Protobuf's parse of `json` into a fresh message like `prototype`, or its error.
absl::StatusOr<std::unique_ptr<google::protobuf::Message>> ProtobufParse(
    const google::protobuf::Message& prototype, const std::string& json) {
  std::unique_ptr<google::protobuf::Message> parsed(prototype.New());
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  auto status = google::protobuf::util::JsonStringToMessage(json, parsed.get(), options);
  if (!status.ok()) return absl::InvalidArgumentError(std::string(status.message()));
  return parsed;
}

// Both parsers accept `json` and read the same message from it.
void ExpectSameParse(const google::protobuf::Message& prototype, const std::string& json) {
  absl::StatusOr<std::unique_ptr<google::protobuf::Message>> theirs =
      ProtobufParse(prototype, json);
  ASSERT_TRUE(theirs.ok()) << json << ": " << theirs.status();
  std::unique_ptr<google::protobuf::Message> ours(prototype.New());
  absl::Status status = ParseJson(json, ours.get());
  ASSERT_TRUE(status.ok()) << json << ": " << status;
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(*ours, **theirs))
      << json << "\nours:   " << ours->ShortDebugString()
      << "\ntheirs: " << (*theirs)->ShortDebugString();
}

TEST(JsonRequests, ValidBodiesReadAsProtobufReadsThem) {
  for (
      const char* json : {
          R"({"sql":"SELECT 1"})",
          R"(  {"sql" : "SELECT ?", "params" : [1, -2.5, "x", true, false, null, {"base64":"AA=="}, {"real":1}, [1,[2]]], "consistency":"lease"}  )",
          R"({"sql":"q","min_revision":7})",
          R"({"sql":"q","minRevision":"18446744073709551615"})",
          R"({"sql":"q","minRevision":1e3})",
          R"({"sql":"q","minRevision":5.0})",
          R"({"sql":"q","minRevision":-0})",
          R"({"sql":null,"consistency":null,"min_revision":null})",
          R"({"sql":"\"\\\/\b\f\n\r\t\u0041\u00e9\u20ac\ud83d\ude00 caf\u00E9 é"})",
          R"({"params":[1e308, -1e-308, 0, -0, 123456789012345678901234567890, 0.1, 1E2, 2e+2, 3e-2]})",
          R"({"params":[1e-400, -1e-400, 4.9e-324, 2.5e-324]})",
          R"({"params":[{"a":{"b":[{}]}, "c":[]}]})",
          "{}",
          "\t\r\n{\n}\n",
      }) {
    ExpectSameParse(api::QueryRequest(), json);
  }
  for (
      const char* json : {
          R"j({"statements":[{"sql":"INSERT INTO t VALUES (?)","params":[1]},{"sql":"x"}],"transaction":true})j",
          R"({"statements":[],"transaction":false})",
          R"({"statements":null})",
      }) {
    ExpectSameParse(api::ExecRequest(), json);
  }
  ExpectSameParse(api::D3bRequest(),
                  R"({"table":"t","query":"SELECT 1","args":[1,"a"],"media_op":"","fileId":"x"})");
  for (const char* json : {"1", "-2.5e3", "\"s\"", "true", "null", "[]", "{}", "[{\"a\":null}]"}) {
    ExpectSameParse(google::protobuf::Value(), json);
  }
}

void ExpectRefused(const google::protobuf::Message& prototype, const std::string& json) {
  std::unique_ptr<google::protobuf::Message> ours(prototype.New());
  absl::Status status = ParseJson(json, ours.get());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << json;
  EXPECT_TRUE(absl::StartsWith(status.message(), "malformed request body: ")) << status;
}

TEST(JsonRequests, InvalidBodiesAreRefusedAsProtobufRefusesThem) {
  for (const char* json : {
           "",
           " ",
           "[]",
           "null",
           R"({"sql":1})",
           R"({"sql":"a" "b"})",
           R"({"sql":"a"}x)",
           R"({"sql":"a"}})",
           R"({"unknown":1})",
           R"({"SQL":"a"})",
           R"({"sql":"a\u12"})",
           R"({"sql":"\ud800"})",
           R"({"sql":"\udc00"})",
           "{\"sql\":\"\xff\"}",
           R"({"consistency":true})",
           R"({"minRevision":-1})",
           R"({"minRevision":1.5})",
           R"({"minRevision":"x"})",
           R"({"minRevision":18446744073709551616})",
           R"({"minRevision":true})",
           R"({"params":[01]})",
           R"({"params":[.5]})",
           R"({"params":[+1]})",
           R"({"params":[NaN]})",
           R"({"params":[1e400]})",
           R"({"params":[nul]})",
           R"({"params":[1)",
           R"({"sql":"a")",
       }) {
    EXPECT_FALSE(ProtobufParse(api::QueryRequest(), json).ok()) << json;
    ExpectRefused(api::QueryRequest(), json);
  }
  for (const char* json :
       {R"({"transaction":1})", R"({"statements":[1]})", R"({"statements":[{"sql":"a","x":1}]})"}) {
    EXPECT_FALSE(ProtobufParse(api::ExecRequest(), json).ok()) << json;
    ExpectRefused(api::ExecRequest(), json);
  }
}

// Protobuf's parser lets these through; they are not JSON (RFC 8259), and Synod refuses them.
TEST(JsonRequests, WhatIsNotJsonIsRefusedThoughProtobufTakesIt) {
  for (const char* json : {
           R"({"sql":"a",})",
           R"({"params":[1,]})",
           R"({"sql":"a\x"})",
           "{\"sql\":\"a\nb\"}",
           R"({"sql":'a'})",
           R"({sql:"a"})",
           R"({"params":1})",
           R"({"params":[1.]})",
           R"({"params":[1e]})",
       }) {
    ExpectRefused(api::QueryRequest(), json);
  }
  // A string for a bool, an object for a list.
  for (const char* json : {R"({"transaction":"true"})", R"({"statements":{}})"}) {
    ExpectRefused(api::ExecRequest(), json);
  }
}

// null for a repeated field is an empty list (protobuf's parser reads one null parameter).
TEST(JsonRequests, NullForAListIsAnEmptyList) {
  api::QueryRequest ours;
  ASSERT_TRUE(ParseJson(R"({"sql":"a","params":null})", &ours).ok());
  EXPECT_EQ(ours.params_size(), 0);
}

// JSON of random google.protobuf.Value trees, written by protobuf, reads back the same.
TEST(JsonRequests, RandomValuesWrittenByProtobufReadBackTheSame) {
  std::mt19937_64 random(20261202);
  std::function<void(google::protobuf::Value*, int)> fill = [&](google::protobuf::Value* v,
                                                                int depth) {
    switch (random() % (depth < 6 ? 6 : 4)) {
      case 0:
        v->set_null_value(google::protobuf::NULL_VALUE);
        break;
      case 1:
        v->set_bool_value(random() % 2 == 0);
        break;
      case 2: {
        double d = std::ldexp(static_cast<double>(random() % 2000001) - 1000000.0,
                              static_cast<int>(random() % 120) - 60);
        v->set_number_value(d);
        break;
      }
      case 3: {
        std::string text;
        for (int i = static_cast<int>(random() % 12); i > 0; --i) {
          static const char* const kPieces[] = {
              "a", "\"", "\\", "\n", "\x01", "/", "\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80",
              " ", "{["};
          text += kPieces[random() % std::size(kPieces)];
        }
        v->set_string_value(text);
        break;
      }
      case 4:
        for (int i = static_cast<int>(random() % 4); i > 0; --i) {
          fill(v->mutable_list_value()->add_values(), depth + 1);
        }
        v->mutable_list_value();
        break;
      default:
        for (int i = static_cast<int>(random() % 4); i > 0; --i) {
          fill(&(*v->mutable_struct_value()->mutable_fields())[absl::StrCat("k", random() % 5)],
               depth + 1);
        }
        v->mutable_struct_value();
        break;
    }
  };
  for (int i = 0; i < 2000; ++i) {
    api::QueryRequest request;
    request.set_sql(absl::StrCat("SELECT ", i));
    request.set_min_revision(random());
    for (int p = static_cast<int>(random() % 4); p > 0; --p) fill(request.add_params(), 0);
    std::string json;
    ASSERT_TRUE(google::protobuf::util::MessageToJsonString(request, &json).ok());
    ExpectSameParse(api::QueryRequest(), json);
    api::QueryRequest ours;
    ASSERT_TRUE(ParseJson(json, &ours).ok()) << json;
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(ours, request)) << json;
  }
}

TEST(JsonRequests, AFieldTwiceIsRefused) {
  api::QueryRequest ours;
  absl::Status status = ParseJson(R"({"sql":"a","sql":"b"})", &ours);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseJson(R"({"sql":"a","params":[],"params":[1]})", &ours).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace synod::server

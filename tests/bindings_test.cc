// One test per third-party binding: each calls into the library and checks a real result,
// so a broken BUILD target fails here by name rather than deep inside another test.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>
#include <sqlite3.h>
#include <uv.h>

#include <cstring>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "llhttp.h"
#include "tests/bindings_test.pb.h"

namespace {

TEST(Bindings, ProtobufRoundTrip) {
  synod::tests::Probe in;
  in.set_id(42);
  in.set_name("replica");
  in.add_chunks(std::string("\0\1\2", 3));
  std::string wire;
  ASSERT_TRUE(in.SerializeToString(&wire));
  synod::tests::Probe out;
  ASSERT_TRUE(out.ParseFromString(wire));
  EXPECT_EQ(out.id(), 42u);
  EXPECT_EQ(out.name(), "replica");
  ASSERT_EQ(out.chunks_size(), 1);
  EXPECT_EQ(out.chunks(0), std::string("\0\1\2", 3));
}

TEST(Bindings, SqliteInMemoryQuery) {
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(":memory:", &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "CREATE TABLE t(x INTEGER); INSERT INTO t VALUES (20),(22);", nullptr,
                         nullptr, nullptr),
            SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT sum(x) FROM t", -1, &stmt, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(stmt), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int64(stmt, 0), 42);
  sqlite3_finalize(stmt);
  sqlite3_close(db);
}

RC_GTEST_PROP(Bindings, RapidcheckReverseTwiceIsIdentity, (const std::vector<int>& xs)) {
  std::vector<int> ys(xs.rbegin(), xs.rend());
  std::vector<int> zs(ys.rbegin(), ys.rend());
  RC_ASSERT(zs == xs);
}

TEST(Bindings, LlhttpParsesRequest) {
  struct Seen {
    std::string url;
    bool complete = false;
  } seen;
  llhttp_settings_t settings;
  llhttp_settings_init(&settings);
  settings.on_url = [](llhttp_t* p, const char* at, size_t len) {
    static_cast<Seen*>(p->data)->url.append(at, len);
    return 0;
  };
  settings.on_message_complete = [](llhttp_t* p) {
    static_cast<Seen*>(p->data)->complete = true;
    return 0;
  };
  llhttp_t parser;
  llhttp_init(&parser, HTTP_REQUEST, &settings);
  parser.data = &seen;
  const char request[] = "GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_EQ(llhttp_execute(&parser, request, std::strlen(request)), HPE_OK);
  EXPECT_EQ(seen.url, "/v1/status");
  EXPECT_TRUE(seen.complete);
  EXPECT_EQ(llhttp_get_method(&parser), HTTP_GET);
}

TEST(Bindings, LibuvRunsTimer) {
  uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  uv_timer_t timer;
  int fired = 0;
  ASSERT_EQ(uv_timer_init(&loop, &timer), 0);
  timer.data = &fired;
  ASSERT_EQ(uv_timer_start(
                &timer, [](uv_timer_t* t) { ++*static_cast<int*>(t->data); }, 1, 0),
            0);
  EXPECT_EQ(uv_run(&loop, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(fired, 1);
  uv_close(reinterpret_cast<uv_handle_t*>(&timer), nullptr);
  uv_run(&loop, UV_RUN_DEFAULT);
  EXPECT_EQ(uv_loop_close(&loop), 0);
}

TEST(Bindings, AbseilStringsStatusAndMaps) {
  std::vector<std::string> parts = absl::StrSplit("a,b,c", ',');
  EXPECT_THAT(parts, ::testing::ElementsAre("a", "b", "c"));
  EXPECT_EQ(absl::StrFormat("%s-%03d", "slot", 7), "slot-007");
  EXPECT_EQ(absl::StrCat("x", 1, "y"), "x1y");
  absl::StatusOr<int> bad = absl::NotFoundError("no such database");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kNotFound);
  absl::flat_hash_map<std::string, int> m{{"a", 1}};
  m["b"] = 2;
  EXPECT_EQ(m.size(), 2u);
  EXPECT_EQ(m.at("b"), 2);
}

}  // namespace

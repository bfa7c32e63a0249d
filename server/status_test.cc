// Tests for what a replica reports about itself: the status JSON and the metrics text.

#include "server/status.h"

#include "gtest/gtest.h"

namespace synod::server {
namespace {

StatusReport LeaderReport() {
  StatusReport r;
  r.id = 2;
  r.replica.role = Role::kLeader;
  r.replica.leader_id = 2;
  r.replica.ballot.set_round(7);
  r.replica.ballot.set_replica_id(2);
  r.replica.commit_index = 1'234'567;
  r.replica.snapshot_index = 1'200'000;
  r.replica.lease_valid = true;
  r.replica.peer_last_heard_ticks = {{1, 3}, {3, -1}};
  r.replica.peer_match_index = {{1, 1'234'560}};
  r.revision = 1'234'566;
  r.location = "rack \"b\"";
  r.state_agreed_revision = 1'234'000;
  r.tick_ms = 10;
  r.requests = 4;
  r.errors = 1;
  r.response_us_total = 6'000;
  return r;
}

TEST(StatusJson, ReportsEveryFieldAndTheLeadersReplicationDelays) {
  EXPECT_EQ(StatusJson(LeaderReport()),
            "{\"id\":2,\"role\":\"leader\",\"leader\":2,\"ballot\":{\"round\":7,\"replica\":2},"
            "\"revision\":1234566,\"commit_index\":1234567,\"snapshot_index\":1200000,"
            "\"lease_valid\":true,\"location\":\"rack \\\"b\\\"\",\"diverged\":null,"
            "\"state_agreed_revision\":1234000,\"outvoted_replicas\":[],\"peers\":["
            "{\"id\":1,\"reachable\":true,\"heartbeat_age_ms\":30,"
            "\"replication_delay_entries\":7},"
            "{\"id\":3,\"reachable\":false,\"heartbeat_age_ms\":-1,"
            "\"replication_delay_entries\":1234567}],"
            "\"mean_response_ms\":1.5,\"error_rate\":0.25,\"requests\":4}");
}

TEST(StatusJson, AFollowerReportsNoDelaysAndADivergenceInHex) {
  StatusReport r = LeaderReport();
  r.replica.role = Role::kFollower;
  r.replica.peer_last_heard_ticks = {{2, 200}};  // 2 s ago: not reachable
  r.diverged = Divergence{.revision = 16, .own_hash = 0xabc, .majority_hash = 0xdef};
  r.outvoted_replicas = {3, 1};
  r.requests = 0;
  const std::string json = StatusJson(r);
  EXPECT_NE(json.find("\"diverged\":{\"revision\":16,\"own_hash\":\"0000000000000abc\","
                      "\"majority_hash\":\"0000000000000def\"}"),
            std::string::npos)
      << json;
  EXPECT_NE(json.find("\"outvoted_replicas\":[1,3]"), std::string::npos) << json;
  EXPECT_NE(json.find("\"peers\":[{\"id\":2,\"reachable\":false,\"heartbeat_age_ms\":2000}]"),
            std::string::npos)
      << json;
  EXPECT_NE(json.find("\"mean_response_ms\":6,\"error_rate\":1,\"requests\":0}"), std::string::npos)
      << json;
}

TEST(MetricsText, WritesHelpAndTypeAndWholeNumbersInFull) {
  MetricsText m;
  m.Gauge("synod_revision", "the last applied log index", 1'234'567);
  m.Gauge("synod_ratio", "a fraction", 0.125);
  m.Counter("synod_requests_total", "requests", 18'446'744'073'709'551'615ull);
  m.Family("synod_age_ms", "per peer", "gauge");
  m.Sample("synod_age_ms", "peer", "3", -1);
  EXPECT_EQ(m.text(),
            "# HELP synod_revision the last applied log index\n"
            "# TYPE synod_revision gauge\n"
            "synod_revision 1234567\n"
            "# HELP synod_ratio a fraction\n"
            "# TYPE synod_ratio gauge\n"
            "synod_ratio 0.125\n"
            "# HELP synod_requests_total requests\n"
            "# TYPE synod_requests_total counter\n"
            "synod_requests_total 18446744073709551615\n"
            "# HELP synod_age_ms per peer\n"
            "# TYPE synod_age_ms gauge\n"
            "synod_age_ms{peer=\"3\"} -1\n");
}

}  // namespace
}  // namespace synod::server

#include "server/status.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "server/json.h"

namespace synod::server {
namespace {

std::string Hex16(uint64_t value) {
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(value));
  return hex;
}

// A number as Prometheus and JSON read it: a whole number in full (a revision past a million
// must not come out as 1.23457e+06), others to six significant digits.
std::string Number(double value) {
  char text[32];
  if (value == std::floor(value) && std::fabs(value) < 9.0e15) {
    std::snprintf(text, sizeof(text), "%.0f", value);
  } else {
    std::snprintf(text, sizeof(text), "%.6g", value);
  }
  return text;
}

}  // namespace

std::string StatusJson(const StatusReport& r) {
  const ReplicaStatus& s = r.replica;
  std::string out = "{\"id\":" + std::to_string(r.id) + ",\"role\":\"" + RoleName(s.role) +
                    "\",\"leader\":" + std::to_string(s.leader_id) +
                    ",\"ballot\":{\"round\":" + std::to_string(s.ballot.round()) +
                    ",\"replica\":" + std::to_string(s.ballot.replica_id()) +
                    "},\"revision\":" + std::to_string(r.revision) +
                    ",\"commit_index\":" + std::to_string(s.commit_index) +
                    ",\"snapshot_index\":" + std::to_string(s.snapshot_index) +
                    ",\"lease_valid\":" + (s.lease_valid ? "true" : "false");
  out += ",\"location\":";
  AppendJsonString(&out, r.location);
  if (r.diverged.has_value()) {
    out += ",\"diverged\":{\"revision\":" + std::to_string(r.diverged->revision) +
           ",\"own_hash\":\"" + Hex16(r.diverged->own_hash) + "\",\"majority_hash\":\"" +
           Hex16(r.diverged->majority_hash) + "\"}";
  } else {
    out += ",\"diverged\":null";
  }
  out += ",\"state_agreed_revision\":" + std::to_string(r.state_agreed_revision) +
         ",\"outvoted_replicas\":[";
  bool first = true;
  for (uint32_t id : r.outvoted_replicas) {
    out += (first ? "" : ",") + std::to_string(id);
    first = false;
  }
  out += "],\"peers\":[";
  first = true;
  for (const auto& [id, heard_ticks] : s.peer_last_heard_ticks) {
    if (!first) out.push_back(',');
    first = false;
    const int64_t age_ms = heard_ticks < 0 ? -1 : heard_ticks * r.tick_ms;
    const bool reachable = heard_ticks >= 0 && age_ms < 1000;
    out += "{\"id\":" + std::to_string(id) + ",\"reachable\":" + (reachable ? "true" : "false") +
           ",\"heartbeat_age_ms\":" + std::to_string(age_ms);
    if (s.role == Role::kLeader) {
      auto match = s.peer_match_index.find(id);
      const uint64_t matched = match == s.peer_match_index.end() ? 0 : match->second;
      out += ",\"replication_delay_entries\":" +
             std::to_string(s.commit_index > matched ? s.commit_index - matched : 0);
    }
    out.push_back('}');
  }
  const uint64_t n = std::max<uint64_t>(r.requests, 1);
  out += "],\"mean_response_ms\":" +
         Number(static_cast<double>(r.response_us_total) / static_cast<double>(n) / 1000.0) +
         ",\"error_rate\":" + Number(static_cast<double>(r.errors) / static_cast<double>(n)) +
         ",\"requests\":" + std::to_string(r.requests) + "}";
  return out;
}

void MetricsText::Family(std::string_view name, std::string_view help, std::string_view type) {
  out_.append("# HELP ").append(name).append(" ").append(help);
  out_.append("\n# TYPE ").append(name).append(" ").append(type).append("\n");
}

void MetricsText::Counter(std::string_view name, std::string_view help, uint64_t value) {
  Family(name, help, "counter");
  out_.append(name).append(" ").append(std::to_string(value)).append("\n");
}

void MetricsText::Gauge(std::string_view name, std::string_view help, double value) {
  Family(name, help, "gauge");
  out_.append(name).append(" ").append(Number(value)).append("\n");
}

void MetricsText::Sample(std::string_view name, std::string_view label,
                         std::string_view label_value, int64_t value) {
  out_.append(name).append("{").append(label).append("=\"").append(label_value).append("\"} ");
  out_.append(std::to_string(value)).append("\n");
}

}  // namespace synod::server

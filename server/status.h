#ifndef SYNOD_SERVER_STATUS_H_
#define SYNOD_SERVER_STATUS_H_

// What a replica reports about itself: GET /v1/status as JSON, and GET /metrics in
// Prometheus' text format (docs/operations.md, "Reading status and metrics"). Rendering
// only: the node gathers the figures.

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <string_view>

#include "core/divergence.h"
#include "core/replica.h"

namespace synod::server {

// The figures of GET /v1/status.
struct StatusReport {
  uint32_t id = 0;
  ReplicaStatus replica;
  uint64_t revision = 0;  // applied
  std::string location;
  std::optional<Divergence> diverged;
  uint64_t state_agreed_revision = 0;
  std::set<uint32_t> outvoted_replicas;
  int64_t tick_ms = 10;
  // HTTP requests answered, of them with 5xx, and the time spent answering them all.
  uint64_t requests = 0;
  uint64_t errors = 0;
  uint64_t response_us_total = 0;
};

// The JSON object of GET /v1/status. A peer heard within the last second is reachable;
// replication delays are reported by the leader only (followers do not know them).
std::string StatusJson(const StatusReport& report);

// Prometheus text exposition (version 0.0.4): each metric with its HELP and TYPE lines.
class MetricsText {
 public:
  void Counter(std::string_view name, std::string_view help, uint64_t value);
  void Gauge(std::string_view name, std::string_view help, double value);
  // The HELP and TYPE lines of a metric whose samples carry labels (Sample).
  void Family(std::string_view name, std::string_view help, std::string_view type);
  // One sample of `name` with one label.
  void Sample(std::string_view name, std::string_view label, std::string_view label_value,
              int64_t value);

  const std::string& text() const { return out_; }

 private:
  std::string out_;
};

}  // namespace synod::server

#endif  // SYNOD_SERVER_STATUS_H_

#ifndef SYNOD_SERVER_HTTP_UTIL_H_
#define SYNOD_SERVER_HTTP_UTIL_H_

// What the server's HTTP handlers share (server/node.cc and server/media.cc): the exchange a
// handler answers, and small helpers for requests and errors.

#include <uv.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "adapters/http_server.h"
#include "core/synod.pb.h"

namespace synod::server {

// One HTTP exchange: the server's responder, and when the request arrived (for the mean
// response time in status and metrics).
class HttpResponder {
 public:
  explicit HttpResponder(std::shared_ptr<Responder> responder)
      : responder_(std::move(responder)), start_ns_(uv_hrtime()) {}
  void Send(HttpResponse response) { responder_->Send(std::move(response)); }
  bool connection_open() const { return responder_->connection_open(); }
  uint64_t ElapsedMicros() const { return (uv_hrtime() - start_ns_) / 1000; }

 private:
  std::shared_ptr<Responder> responder_;
  uint64_t start_ns_;
};

struct PeerAddress {
  std::string host;
  int port = 0;
};

// The HTTP status for a command's error code.
int HttpStatusFor(ErrorCode code);

// The error code's name in lower case, as the JSON error's "code".
std::string CodeName(ErrorCode code);

// The value of the request's header `name` (lower case), or "" when absent.
std::string Header(const HttpRequest& request, std::string_view name);

// Decodes `text`, an even number of hex digits (either case), into `out`. False, with
// `out` unspecified, for anything else.
bool DecodeHex(std::string_view text, std::string* out);

// Splits "/a/b/c?x" into {"a","b","c"}; percent-decoding is applied to each segment so
// that "%2F" in a name is seen (and rejected) as "/".
std::vector<std::string> PathSegments(const std::string& target);

// The value of query parameter `name` in `target` ("/p?a=1&b=2"), as sent (not decoded);
// nullopt when absent.
std::optional<std::string> QueryParameter(std::string_view target, std::string_view name);

}  // namespace synod::server

#endif  // SYNOD_SERVER_HTTP_UTIL_H_

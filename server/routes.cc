#include "server/routes.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_split.h"
#include "core/check.h"

namespace synod::server {

namespace {

constexpr std::string_view kPlaceholder = "{}";

std::vector<std::string> PatternSegments(std::string_view pattern) {
  std::vector<std::string> out;
  for (absl::string_view part :
       absl::StrSplit(absl::string_view(pattern.data(), pattern.size()), '/', absl::SkipEmpty())) {
    out.emplace_back(part.data(), part.size());
  }
  return out;
}

}  // namespace

void RouteTable::Add(std::string_view method, std::string_view pattern, Handler handler) {
  Route route{.method = std::string(method),
              .segments = PatternSegments(pattern),
              .handler = std::move(handler)};
  for (const Route& other : routes_) {
    SYNOD_CHECK(other.method != route.method || other.segments != route.segments)
        << "two routes for " << route.method << " " << std::string(pattern);
  }
  routes_.push_back(std::move(route));
}

bool RouteTable::Matches(const Route& route, const std::vector<std::string>& path,
                         std::vector<std::string>* args) {
  if (route.segments.size() != path.size()) return false;
  args->clear();
  for (size_t i = 0; i < path.size(); ++i) {
    if (route.segments[i] == kPlaceholder) {
      args->push_back(path[i]);
    } else if (route.segments[i] != path[i]) {
      return false;
    }
  }
  return true;
}

RouteTable::Dispatched RouteTable::Dispatch(const HttpRequest& request,
                                            const std::vector<std::string>& path,
                                            std::shared_ptr<HttpResponder> responder) const {
  std::vector<std::string> args;
  std::vector<std::string_view> allowed;
  for (const Route& route : routes_) {
    if (!Matches(route, path, &args)) continue;
    if (route.method == "*" || route.method == request.method) {
      route.handler(request, args, std::move(responder));
      return {.kind = Dispatched::kHandled, .allow = {}};
    }
    if (std::find(allowed.begin(), allowed.end(), route.method) == allowed.end()) {
      allowed.push_back(route.method);
    }
  }
  if (allowed.empty()) return {.kind = Dispatched::kNotFound, .allow = {}};
  Dispatched result{.kind = Dispatched::kMethodNotAllowed, .allow = {}};
  for (std::string_view method : allowed) {
    if (!result.allow.empty()) result.allow += ", ";
    result.allow += method;
  }
  return result;
}

}  // namespace synod::server

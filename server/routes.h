#ifndef SYNOD_SERVER_ROUTES_H_
#define SYNOD_SERVER_ROUTES_H_

// The HTTP API's route table: each route is a method and a path pattern, and the handler
// that answers it. A pattern is a path of literal segments and "{}" placeholders, each of
// which matches any one segment and is handed to the handler, in order ("/v1/db/{}/exec").
// A request whose path matches no route is not found (404); one whose path matches but not
// its method is answered 405 with the methods that path takes. A route whose method is "*"
// takes every method (its handler answers the ones it does not serve).
//
// Paths are matched as server/http_util.h's PathSegments splits them: percent-decoded, with
// empty segments and the query left out.

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "adapters/http_server.h"
#include "server/http_util.h"

namespace synod::server {

class RouteTable {
 public:
  using Handler =
      std::function<void(const HttpRequest& request, const std::vector<std::string>& args,
                         std::shared_ptr<HttpResponder> responder)>;

  // REQUIRES: no route of `method` with the same pattern yet.
  void Add(std::string_view method, std::string_view pattern, Handler handler);

  struct Dispatched {
    enum Kind { kHandled, kNotFound, kMethodNotAllowed } kind = kNotFound;
    // For kMethodNotAllowed: the methods the path takes, as an Allow header lists them.
    std::string allow;
  };
  // Runs the handler of the route `request` (split into `path`) matches, if any.
  Dispatched Dispatch(const HttpRequest& request, const std::vector<std::string>& path,
                      std::shared_ptr<HttpResponder> responder) const;

 private:
  struct Route {
    std::string method;
    std::vector<std::string> segments;  // "{}" for a placeholder
    Handler handler;
  };
  // Whether `path` matches `route`'s pattern; its placeholders' segments into `args`.
  static bool Matches(const Route& route, const std::vector<std::string>& path,
                      std::vector<std::string>* args);

  std::vector<Route> routes_;  // in the order added; the first match wins
};

}  // namespace synod::server

#endif  // SYNOD_SERVER_ROUTES_H_

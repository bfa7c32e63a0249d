#include "server/routes.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace synod::server {
namespace {

class RouteTableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Add("GET", "/healthz");
    Add("GET", "/v1/db");
    Add("GET", "/v1/db/{}");
    Add("PUT", "/v1/db/{}");
    Add("DELETE", "/v1/db/{}");
    Add("POST", "/v1/db/{}/exec");
    Add("*", "/v1/db/{}/media/{}");
    Add("POST", "/");
  }
  void Add(std::string method, std::string pattern) {
    table_.Add(
        method, pattern,
        [this, method, pattern](const HttpRequest& request, const std::vector<std::string>& args,
                                std::shared_ptr<HttpResponder>) {
          std::string call = method + " " + pattern + " for " + request.method;
          for (const std::string& arg : args) call += " [" + arg + "]";
          calls_.push_back(call);
        });
  }
  RouteTable::Dispatched Dispatch(std::string method, std::string target) {
    HttpRequest request;
    request.method = method;
    request.target = target;
    return table_.Dispatch(request, PathSegments(target), nullptr);
  }

  RouteTable table_;
  std::vector<std::string> calls_;
};

TEST_F(RouteTableTest, ARequestReachesTheRouteOfItsMethodWithThePlaceholders) {
  EXPECT_EQ(Dispatch("GET", "/healthz").kind, RouteTable::Dispatched::kHandled);
  EXPECT_EQ(Dispatch("PUT", "/v1/db/notes?x=1").kind, RouteTable::Dispatched::kHandled);
  EXPECT_EQ(Dispatch("DELETE", "/v1/db//notes/").kind, RouteTable::Dispatched::kHandled);
  EXPECT_EQ(Dispatch("POST", "/v1/db/a%2Fb/exec").kind, RouteTable::Dispatched::kHandled);
  EXPECT_EQ(Dispatch("HEAD", "/v1/db/notes/media/k.png").kind, RouteTable::Dispatched::kHandled);
  EXPECT_EQ(Dispatch("POST", "/").kind, RouteTable::Dispatched::kHandled);
  EXPECT_EQ(calls_, (std::vector<std::string>{
                        "GET /healthz for GET",
                        "PUT /v1/db/{} for PUT [notes]",
                        "DELETE /v1/db/{} for DELETE [notes]",
                        // Decoded: the handler sees (and refuses) the slash.
                        "POST /v1/db/{}/exec for POST [a/b]",
                        "* /v1/db/{}/media/{} for HEAD [notes] [k.png]",
                        "POST / for POST",
                    }));
}

TEST_F(RouteTableTest, AKnownPathWithAnotherMethodIsNotAllowedAndSaysWhatIs) {
  RouteTable::Dispatched d = Dispatch("PATCH", "/v1/db/notes");
  EXPECT_EQ(d.kind, RouteTable::Dispatched::kMethodNotAllowed);
  EXPECT_EQ(d.allow, "GET, PUT, DELETE");
  d = Dispatch("GET", "/v1/db/notes/exec");
  EXPECT_EQ(d.kind, RouteTable::Dispatched::kMethodNotAllowed);
  EXPECT_EQ(d.allow, "POST");
  d = Dispatch("GET", "/");
  EXPECT_EQ(d.kind, RouteTable::Dispatched::kMethodNotAllowed);
  EXPECT_EQ(d.allow, "POST");
  EXPECT_TRUE(calls_.empty());
}

TEST_F(RouteTableTest, AnUnknownPathIsNotFound) {
  for (const char* target : {"/nope", "/v1", "/v1/db/notes/exec/more", "/v1/db/notes/media",
                             "/healthz/x", "/v1/db/notes/media/a/b", "/V1/db"}) {
    EXPECT_EQ(Dispatch("GET", target).kind, RouteTable::Dispatched::kNotFound) << target;
  }
  EXPECT_TRUE(calls_.empty());
}

TEST_F(RouteTableTest, TheSameRouteTwiceIsABug) {
  EXPECT_DEATH(Add("GET", "/v1/db/{}/"), "two routes for GET");
}

}  // namespace
}  // namespace synod::server

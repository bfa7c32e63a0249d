#ifndef SYNOD_SERVER_PENDING_REQUESTS_H_
#define SYNOD_SERVER_PENDING_REQUESTS_H_

// Client requests waiting on the replica: a write until this replica applies it, a read
// until the leader confirms it and the state machine reaches the revision it must see.
//
// Whatever ends a request ends it in one place (Finish), exactly once: what the replica
// says of it comes in through Answer(key, outcome) (its result applied here, a read
// confirmed, a refusal), its deadline through Expire, and a confirmed read runs from
// ServeReads once its revision is applied. An outcome for a key no longer held (answered
// already, or never proposed here) is ignored.
//
// Threading: the loop thread only.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "core/synod.pb.h"
#include "server/http_util.h"

namespace synod::server {

class PendingRequests {
 public:
  // (client_id, sequence) of the request the replica was given.
  using Key = std::pair<uint64_t, uint64_t>;
  // How a request that ends in an error is answered (status, code, message).
  using RespondError = std::function<void(const std::shared_ptr<HttpResponder>&, int status,
                                          std::string_view code, std::string_view message)>;

  // This replica applied the request: its result.
  struct Applied {
    const CommandResult& result;
  };
  // The leader confirmed a read, valid at `read_revision`.
  struct Confirmed {
    uint64_t read_revision = 0;
  };
  // The replica refused the request (no leader, not the leader any more, ...).
  struct Refused {
    ErrorCode code = UNAVAILABLE;
    std::string_view message;
  };
  // Its deadline passed.
  struct TimedOut {};
  using Outcome = std::variant<Applied, Confirmed, Refused, TimedOut>;

  explicit PendingRequests(RespondError respond_error) : respond_error_(std::move(respond_error)) {}
  PendingRequests(const PendingRequests&) = delete;
  PendingRequests& operator=(const PendingRequests&) = delete;

  // A write proposed as `key`. `on_result` runs once, with its result, when it is applied
  // here. A write the replica refuses is answered with the refusal's error, and one that
  // times out 503 ("may or may not have been applied"); `on_result` is then dropped unrun.
  void AddWrite(Key key, std::shared_ptr<HttpResponder> responder, int64_t deadline_ms,
                std::function<void(const CommandResult&)> on_result);
  // A read barrier proposed as `key`: once confirmed, the read waits until the state machine
  // has applied `min_revision` (or the revision it was confirmed at, if later), then `run`.
  void AddRead(Key key, std::shared_ptr<HttpResponder> responder, int64_t deadline_ms,
               uint64_t min_revision, std::function<void()> run);
  // A read that needs no confirmation (local): it waits only for `min_revision`.
  void AddLocalRead(std::shared_ptr<HttpResponder> responder, int64_t deadline_ms,
                    uint64_t min_revision, std::function<void()> run);

  // What the replica says of the request `key`.
  void Answer(Key key, const Outcome& outcome);
  // Answers every request whose deadline is at or before `now_ms` (TimedOut).
  void Expire(int64_t now_ms);
  // Runs the confirmed reads the state machine, now at `applied_revision`, has caught up
  // with. A read a `run` adds is left for a later call (a nested one included).
  void ServeReads(uint64_t applied_revision);

  // Requests held: awaiting the replica, and confirmed reads awaiting their revision.
  size_t awaiting_replica() const { return by_key_.size(); }
  size_t awaiting_revision() const { return confirmed_.size(); }

 private:
  struct Request {
    std::shared_ptr<HttpResponder> responder;
    int64_t deadline_ms = 0;
    bool is_read = false;
    uint64_t min_revision = 0;
    std::function<void(const CommandResult&)> on_write;
    std::function<void()> on_read;
  };

  static std::unique_ptr<Request> NewRead(std::shared_ptr<HttpResponder> responder,
                                          int64_t deadline_ms, uint64_t min_revision,
                                          std::function<void()> run);
  // Answers `request`, which has left the maps, with `outcome`.
  void Finish(std::unique_ptr<Request> request, const Outcome& outcome);

  RespondError respond_error_;
  std::map<Key, std::unique_ptr<Request>> by_key_;
  std::vector<std::unique_ptr<Request>> confirmed_;
};

}  // namespace synod::server

#endif  // SYNOD_SERVER_PENDING_REQUESTS_H_

#include "server/pending_requests.h"

#include <algorithm>
#include <type_traits>

namespace synod::server {

void PendingRequests::AddWrite(Key key, std::shared_ptr<HttpResponder> responder,
                               int64_t deadline_ms,
                               std::function<void(const CommandResult&)> on_result) {
  auto request = std::make_unique<Request>();
  request->responder = std::move(responder);
  request->deadline_ms = deadline_ms;
  request->on_write = std::move(on_result);
  by_key_[key] = std::move(request);
}

std::unique_ptr<PendingRequests::Request> PendingRequests::NewRead(
    std::shared_ptr<HttpResponder> responder, int64_t deadline_ms, uint64_t min_revision,
    std::function<void()> run) {
  auto request = std::make_unique<Request>();
  request->responder = std::move(responder);
  request->deadline_ms = deadline_ms;
  request->is_read = true;
  request->min_revision = min_revision;
  request->on_read = std::move(run);
  return request;
}

void PendingRequests::AddRead(Key key, std::shared_ptr<HttpResponder> responder,
                              int64_t deadline_ms, uint64_t min_revision,
                              std::function<void()> run) {
  by_key_[key] = NewRead(std::move(responder), deadline_ms, min_revision, std::move(run));
}

void PendingRequests::AddLocalRead(std::shared_ptr<HttpResponder> responder, int64_t deadline_ms,
                                   uint64_t min_revision, std::function<void()> run) {
  confirmed_.push_back(NewRead(std::move(responder), deadline_ms, min_revision, std::move(run)));
}

void PendingRequests::Answer(Key key, const Outcome& outcome) {
  auto it = by_key_.find(key);
  if (it == by_key_.end()) return;
  std::unique_ptr<Request> request = std::move(it->second);
  by_key_.erase(it);
  Finish(std::move(request), outcome);
}

void PendingRequests::Finish(std::unique_ptr<Request> request, const Outcome& outcome) {
  std::visit(
      [&](const auto& o) {
        using T = std::decay_t<decltype(o)>;
        if constexpr (std::is_same_v<T, TimedOut>) {
          respond_error_(request->responder, 503, "unavailable",
                         request->is_read ? "the read could not be confirmed in time"
                                          : "the write was not confirmed by a majority in time; "
                                            "it may or may not have been applied");
        } else if constexpr (std::is_same_v<T, Refused>) {
          const ErrorCode code = o.code == OK ? UNAVAILABLE : o.code;
          respond_error_(request->responder, HttpStatusFor(code), CodeName(code), o.message);
        } else if (!request->is_read) {
          if constexpr (std::is_same_v<T, Applied>) {
            request->on_write(o.result);
          } else {
            // A write is answered by its application, never by a read's confirmation.
            respond_error_(request->responder, 500, "internal",
                           "the write was answered as if it were a read");
          }
        } else {
          // A read barrier is served without a log entry; one that was logged anyway is
          // confirmed at the revision it applied at.
          uint64_t revision = 0;
          if constexpr (std::is_same_v<T, Applied>) {
            revision = o.result.revision();
          } else {
            revision = o.read_revision;
          }
          request->min_revision = std::max(request->min_revision, revision);
          confirmed_.push_back(std::move(request));
        }
      },
      outcome);
}

void PendingRequests::Expire(int64_t now_ms) {
  for (auto it = by_key_.begin(); it != by_key_.end();) {
    if (now_ms < it->second->deadline_ms) {
      ++it;
      continue;
    }
    std::unique_ptr<Request> request = std::move(it->second);
    it = by_key_.erase(it);
    Finish(std::move(request), TimedOut{});
  }
  std::vector<std::unique_ptr<Request>> waiting = std::move(confirmed_);
  confirmed_.clear();
  for (std::unique_ptr<Request>& request : waiting) {
    if (now_ms >= request->deadline_ms) {
      Finish(std::move(request), TimedOut{});
    } else {
      confirmed_.push_back(std::move(request));
    }
  }
}

void PendingRequests::ServeReads(uint64_t applied_revision) {
  // Taken out first: a read run here may add another (which waits for the next call).
  std::vector<std::unique_ptr<Request>> waiting = std::move(confirmed_);
  confirmed_.clear();
  std::vector<std::unique_ptr<Request>> kept;
  for (std::unique_ptr<Request>& request : waiting) {
    if (applied_revision >= request->min_revision) {
      request->on_read();
    } else {
      kept.push_back(std::move(request));
    }
  }
  for (std::unique_ptr<Request>& request : confirmed_) kept.push_back(std::move(request));
  confirmed_ = std::move(kept);
}

}  // namespace synod::server

#ifndef SYNOD_SERVER_MULTIPART_H_
#define SYNOD_SERVER_MULTIPART_H_

// A streaming parser of multipart/form-data bodies (RFC 7578), for d3b's uploads: the body
// is fed in pieces as it arrives, and each part's content comes out in pieces too, so a
// file part is never held whole. A part's headers are bounded; everything else streams.

#include <cstddef>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace synod::server {

// The boundary of a Content-Type "multipart/form-data; boundary=..." (quoted or not):
// InvalidArgument if it is not one, or the boundary is missing or longer than 70 characters.
absl::StatusOr<std::string> MultipartBoundary(std::string_view content_type);

class MultipartParser {
 public:
  struct Part {
    std::string name;          // of Content-Disposition: form-data; name="..."
    std::string filename;      // "" when none
    std::string content_type;  // "" when none
  };
  struct Callbacks {
    std::function<absl::Status(const Part&)> begin;
    std::function<absl::Status(std::string_view data)> data;  // the current part's content
    std::function<absl::Status()> end;
  };
  // The headers of one part may take at most this many bytes.
  static constexpr size_t kMaxPartHeaderBytes = 16 * 1024;

  MultipartParser(std::string boundary, Callbacks callbacks);

  // Parses the next piece of the body. The first error (malformed body, or one a callback
  // returned) is returned, and again for every later call.
  absl::Status Feed(std::string_view piece);
  // Whether the closing delimiter has been seen (what follows it is ignored).
  bool done() const { return state_ == State::kDone; }

 private:
  enum class State { kDelimiter, kAfterDelimiter, kHeaders, kBody, kDone };
  absl::Status Run();
  absl::Status ParseHeaders(std::string_view headers);

  const std::string delimiter_;  // CRLF "--" boundary
  Callbacks callbacks_;
  State state_ = State::kDelimiter;
  std::string pending_;  // received, not yet consumed
  absl::Status error_;
};

}  // namespace synod::server

#endif  // SYNOD_SERVER_MULTIPART_H_

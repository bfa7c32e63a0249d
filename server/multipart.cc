#include "server/multipart.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"

namespace synod::server {
namespace {

absl::string_view A(std::string_view text) { return {text.data(), text.size()}; }
std::string_view S(absl::string_view text) { return {text.data(), text.size()}; }

// The value of parameter `name` in a header value like `form-data; name="json"`.
std::string Parameter(std::string_view value, std::string_view name) {
  for (absl::string_view field : absl::StrSplit(A(value), ';')) {
    field = absl::StripAsciiWhitespace(field);
    const size_t eq = field.find('=');
    if (eq == absl::string_view::npos) continue;
    if (!absl::EqualsIgnoreCase(absl::StripAsciiWhitespace(field.substr(0, eq)), A(name))) {
      continue;
    }
    absl::string_view v = absl::StripAsciiWhitespace(field.substr(eq + 1));
    if (v.size() >= 2 && v.front() == '"' && v.back() == '"') v = v.substr(1, v.size() - 2);
    return std::string(v);
  }
  return "";
}

}  // namespace

absl::StatusOr<std::string> MultipartBoundary(std::string_view content_type) {
  const size_t semicolon = content_type.find(';');
  const absl::string_view type = absl::StripAsciiWhitespace(A(content_type.substr(0, semicolon)));
  if (!absl::EqualsIgnoreCase(type, "multipart/form-data")) {
    return absl::InvalidArgumentError("not multipart/form-data");
  }
  if (semicolon == std::string_view::npos) {
    return absl::InvalidArgumentError("multipart/form-data without a boundary");
  }
  std::string boundary = Parameter(content_type.substr(semicolon + 1), "boundary");
  if (boundary.empty() || boundary.size() > 70) {
    return absl::InvalidArgumentError("a multipart boundary is 1 to 70 characters");
  }
  for (char c : boundary) {
    if (c < 0x20 || c > 0x7e) {
      return absl::InvalidArgumentError("a multipart boundary is printable ASCII");
    }
  }
  return boundary;
}

MultipartParser::MultipartParser(std::string boundary, Callbacks callbacks)
    : delimiter_("\r\n--" + boundary), callbacks_(std::move(callbacks)) {
  // The first delimiter may open the body without a CRLF before it: one is assumed.
  pending_ = "\r\n";
}

absl::Status MultipartParser::Feed(std::string_view piece) {
  if (!error_.ok()) return error_;
  if (state_ == State::kDone) return absl::OkStatus();
  pending_.append(piece.data(), piece.size());
  error_ = Run();
  return error_;
}

absl::Status MultipartParser::Run() {
  for (;;) {
    switch (state_) {
      case State::kDelimiter: {
        // The preamble, up to the first delimiter, is ignored.
        const size_t at = pending_.find(delimiter_);
        if (at == std::string::npos) {
          // Keep what could be the start of a delimiter.
          if (pending_.size() >= delimiter_.size()) {
            pending_.erase(0, pending_.size() - delimiter_.size() + 1);
          }
          return absl::OkStatus();
        }
        pending_.erase(0, at + delimiter_.size());
        state_ = State::kAfterDelimiter;
        break;
      }
      case State::kAfterDelimiter: {
        if (pending_.size() < 2) return absl::OkStatus();
        if (pending_.compare(0, 2, "--") == 0) {
          state_ = State::kDone;
          pending_.clear();
          return absl::OkStatus();
        }
        if (pending_.compare(0, 2, "\r\n") != 0) {
          return absl::InvalidArgumentError("a multipart delimiter not followed by CRLF");
        }
        pending_.erase(0, 2);
        state_ = State::kHeaders;
        break;
      }
      case State::kHeaders: {
        const size_t end = pending_.find("\r\n\r\n");
        if (end == std::string::npos) {
          if (pending_.size() > kMaxPartHeaderBytes) {
            return absl::InvalidArgumentError("a multipart part's headers are too large");
          }
          return absl::OkStatus();
        }
        if (end > kMaxPartHeaderBytes) {
          return absl::InvalidArgumentError("a multipart part's headers are too large");
        }
        if (absl::Status parsed = ParseHeaders(std::string_view(pending_).substr(0, end));
            !parsed.ok()) {
          return parsed;
        }
        pending_.erase(0, end + 4);
        state_ = State::kBody;
        break;
      }
      case State::kBody: {
        const size_t at = pending_.find(delimiter_);
        if (at == std::string::npos) {
          // All but what could be the start of the delimiter is the part's content.
          if (pending_.size() >= delimiter_.size()) {
            const size_t emit = pending_.size() - delimiter_.size() + 1;
            if (absl::Status s = callbacks_.data(std::string_view(pending_).substr(0, emit));
                !s.ok()) {
              return s;
            }
            pending_.erase(0, emit);
          }
          return absl::OkStatus();
        }
        if (at > 0) {
          if (absl::Status s = callbacks_.data(std::string_view(pending_).substr(0, at)); !s.ok()) {
            return s;
          }
        }
        if (absl::Status s = callbacks_.end(); !s.ok()) return s;
        pending_.erase(0, at + delimiter_.size());
        state_ = State::kAfterDelimiter;
        break;
      }
      case State::kDone:
        return absl::OkStatus();
    }
  }
}

absl::Status MultipartParser::ParseHeaders(std::string_view headers) {
  Part part;
  bool form_data = false;
  for (absl::string_view line : absl::StrSplit(A(headers), "\r\n")) {
    if (line.empty()) continue;
    const size_t colon = line.find(':');
    if (colon == absl::string_view::npos) {
      return absl::InvalidArgumentError("a malformed header in a multipart part");
    }
    const absl::string_view name = absl::StripAsciiWhitespace(line.substr(0, colon));
    const absl::string_view value = absl::StripAsciiWhitespace(line.substr(colon + 1));
    if (absl::EqualsIgnoreCase(name, "content-disposition")) {
      const absl::string_view kind = absl::StripAsciiWhitespace(value.substr(0, value.find(';')));
      form_data = absl::EqualsIgnoreCase(kind, "form-data");
      part.name = Parameter(S(value), "name");
      part.filename = Parameter(S(value), "filename");
    } else if (absl::EqualsIgnoreCase(name, "content-type")) {
      part.content_type = std::string(value);
    }
  }
  if (!form_data || part.name.empty()) {
    return absl::InvalidArgumentError("a multipart part without Content-Disposition: form-data");
  }
  return callbacks_.begin(part);
}

}  // namespace synod::server

#include "server/http_util.h"

#include <cstdio>

#include "absl/strings/ascii.h"
#include "absl/strings/str_split.h"

namespace synod::server {

int HttpStatusFor(ErrorCode code) {
  switch (code) {
    case OK:
      return 200;
    case INVALID_ARGUMENT:
      return 400;
    case NOT_FOUND:
      return 404;
    case ALREADY_EXISTS:
      return 409;
    case FAILED_PRECONDITION:
      return 412;
    case RESOURCE_EXHAUSTED:
      return 429;
    case SESSION_EXPIRED:
      return 409;
    case UNAVAILABLE:
    default:
      return 503;
  }
}

std::string CodeName(ErrorCode code) { return absl::AsciiStrToLower(ErrorCode_Name(code)); }

std::string Header(const HttpRequest& request, std::string_view name) {
  for (const auto& [key, value] : request.headers) {
    if (key == name) return value;
  }
  return "";
}

std::vector<std::string> PathSegments(const std::string& target) {
  std::string path = target.substr(0, target.find('?'));
  std::vector<std::string> out;
  for (absl::string_view part : absl::StrSplit(path, '/', absl::SkipEmpty())) {
    std::string decoded;
    for (size_t i = 0; i < part.size(); ++i) {
      int v = 0;
      if (part[i] == '%' && i + 2 < part.size() &&
          absl::ascii_isxdigit(static_cast<unsigned char>(part[i + 1])) &&
          absl::ascii_isxdigit(static_cast<unsigned char>(part[i + 2])) &&
          sscanf(std::string(part.substr(i + 1, 2)).c_str(), "%2x", &v) == 1) {
        decoded.push_back(static_cast<char>(v));
        i += 2;
        continue;
      }
      decoded.push_back(part[i]);
    }
    out.push_back(decoded);
  }
  return out;
}

std::optional<std::string> QueryParameter(std::string_view target, std::string_view name) {
  const size_t question = target.find('?');
  if (question == std::string_view::npos) return std::nullopt;
  std::string_view query = target.substr(question + 1);
  while (!query.empty()) {
    const size_t amp = query.find('&');
    std::string_view pair = query.substr(0, amp);
    const size_t eq = pair.find('=');
    if (pair.substr(0, eq) == name) {
      return std::string(eq == std::string_view::npos ? std::string_view() : pair.substr(eq + 1));
    }
    if (amp == std::string_view::npos) break;
    query.remove_prefix(amp + 1);
  }
  return std::nullopt;
}

bool DecodeHex(std::string_view text, std::string* out) {
  if (text.size() % 2 != 0) return false;
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  out->clear();
  out->reserve(text.size() / 2);
  for (size_t i = 0; i < text.size(); i += 2) {
    const int high = digit(text[i]);
    const int low = digit(text[i + 1]);
    if (high < 0 || low < 0) return false;
    out->push_back(static_cast<char>(high * 16 + low));
  }
  return true;
}

}  // namespace synod::server

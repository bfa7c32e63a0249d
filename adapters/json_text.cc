#include "adapters/json_text.h"

#include "absl/strings/str_format.h"
#include "core/utf8.h"

namespace synod {

void AppendJsonString(std::string* out, std::string_view s) {
  out->push_back('"');
  while (!s.empty()) {
    const auto c = static_cast<unsigned char>(s[0]);
    if (c >= 0x80) {
      const size_t length = Utf8SequenceBytes(s);
      if (length == 0) {
        out->append("\xef\xbf\xbd");  // U+FFFD REPLACEMENT CHARACTER
        s.remove_prefix(1);
      } else {
        out->append(s.substr(0, length));
        s.remove_prefix(length);
      }
      continue;
    }
    s.remove_prefix(1);
    switch (c) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      case '\n':
        out->append("\\n");
        break;
      case '\r':
        out->append("\\r");
        break;
      case '\t':
        out->append("\\t");
        break;
      default:
        if (c < 0x20) {
          absl::StrAppendFormat(out, "\\u%04x", c);
        } else {
          out->push_back(static_cast<char>(c));
        }
    }
  }
  out->push_back('"');
}

std::string ErrorJson(std::string_view code, std::string_view message) {
  std::string out = "{\"error\":{\"code\":";
  AppendJsonString(&out, code);
  out += ",\"message\":";
  AppendJsonString(&out, message);
  out += "}}";
  return out;
}

}  // namespace synod

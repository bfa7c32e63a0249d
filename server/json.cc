#include "server/json.h"

#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/utf8.h"
#include "google/protobuf/util/json_util.h"

namespace synod::server {
namespace {

// True when arrays and objects in `json` nest deeper than `max_depth`. One pass, O(n):
// brackets inside string literals do not count. Unbalanced brackets are left for the parser
// to reject.
bool NestedDeeperThan(std::string_view json, int max_depth) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < json.size(); ++i) {
    const char c = json[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // the escaped character, which may be a quote
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    switch (c) {
      case '"':
        in_string = true;
        break;
      case '[':
      case '{':
        if (++depth > max_depth) return true;
        break;
      case ']':
      case '}':
        if (depth > 0) --depth;
        break;
      default:
        break;
    }
  }
  return false;
}

void AppendReal(std::string* out, double real) {
  if (std::isnan(real)) {
    out->append("null");
    return;
  }
  if (std::isinf(real)) {
    out->append(real > 0 ? R"({"real":"Infinity"})" : R"({"real":"-Infinity"})");
    return;
  }
  // The shortest form that reads back as the same double; the longest is 24 characters
  // (e.g. -2.2250738585072014e-308), so to_chars cannot run out of room.
  char buffer[32];
  const std::to_chars_result result = std::to_chars(buffer, buffer + sizeof(buffer), real);
  const std::string_view text(buffer, static_cast<size_t>(result.ptr - buffer));
  out->append(text);
  if (text.find_first_of(".e") == std::string_view::npos) out->append(".0");
}

absl::StatusOr<SqlValue> RealFromJson(const google::protobuf::Value& value) {
  SqlValue out;
  if (value.has_number_value()) {
    out.set_real(value.number_value());
    return out;
  }
  if (value.has_string_value() && value.string_value() == "Infinity") {
    out.set_real(std::numeric_limits<double>::infinity());
    return out;
  }
  if (value.has_string_value() && value.string_value() == "-Infinity") {
    out.set_real(-std::numeric_limits<double>::infinity());
    return out;
  }
  return absl::InvalidArgumentError(
      "a real parameter must be {\"real\": number}, {\"real\": \"Infinity\"} or "
      "{\"real\": \"-Infinity\"}");
}

}  // namespace

absl::Status ParseJson(std::string_view json, google::protobuf::Message* message) {
  if (NestedDeeperThan(json, kMaxJsonDepth)) {
    return absl::InvalidArgumentError(absl::StrCat("JSON nesting is deeper than ", kMaxJsonDepth));
  }
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  auto status = google::protobuf::util::JsonStringToMessage(
      google::protobuf::StringPiece(json.data(), json.size()), message, options);
  if (!status.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed request body: ", std::string(status.message())));
  }
  return absl::OkStatus();
}

absl::StatusOr<SqlValue> SqlValueFromJson(const google::protobuf::Value& value) {
  SqlValue out;
  switch (value.kind_case()) {
    case google::protobuf::Value::kNullValue:
    case google::protobuf::Value::KIND_NOT_SET:
      out.set_null(true);
      return out;
    case google::protobuf::Value::kBoolValue:
      out.set_integer(value.bool_value() ? 1 : 0);
      return out;
    case google::protobuf::Value::kNumberValue: {
      double d = value.number_value();
      constexpr double kExactIntegers = 9007199254740992.0;  // 2^53
      if (std::floor(d) == d && std::fabs(d) <= kExactIntegers) {
        out.set_integer(static_cast<int64_t>(d));
      } else {
        out.set_real(d);
      }
      return out;
    }
    case google::protobuf::Value::kStringValue:
      out.set_text(value.string_value());
      return out;
    case google::protobuf::Value::kStructValue: {
      const auto& fields = value.struct_value().fields();
      if (fields.size() == 1 && fields.contains("real")) return RealFromJson(fields.at("real"));
      auto it = fields.find("base64");
      if (fields.size() == 1 && it != fields.end() && it->second.has_string_value()) {
        std::string bytes;
        if (!absl::Base64Unescape(it->second.string_value(), &bytes)) {
          return absl::InvalidArgumentError("a blob's base64 is malformed");
        }
        out.set_blob(bytes);
        return out;
      }
      return absl::InvalidArgumentError(
          "an object parameter must be {\"base64\": \"...\"} (a blob) or {\"real\": ...}");
    }
    case google::protobuf::Value::kListValue:
      return absl::InvalidArgumentError("a parameter cannot be an array");
  }
  return absl::InvalidArgumentError("unknown parameter type");
}

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

void AppendSqlValue(std::string* out, const SqlValue& value) {
  switch (value.kind_case()) {
    case SqlValue::kInteger:
      absl::StrAppend(out, value.integer());
      return;
    case SqlValue::kReal:
      AppendReal(out, value.real());
      return;
    case SqlValue::kText:
      AppendJsonString(out, value.text());
      return;
    case SqlValue::kBlob:
      out->append("{\"base64\":");
      AppendJsonString(out, absl::Base64Escape(value.blob()));
      out->push_back('}');
      return;
    case SqlValue::kNull:
    case SqlValue::KIND_NOT_SET:
      out->append("null");
      return;
  }
}

std::string ErrorJson(std::string_view code, std::string_view message) {
  std::string out = "{\"error\":{\"code\":";
  AppendJsonString(&out, code);
  out += ",\"message\":";
  AppendJsonString(&out, message);
  out += "}}";
  return out;
}

}  // namespace synod::server

#include "server/json.h"

#include <cmath>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "google/protobuf/util/json_util.h"

namespace synod::server {

absl::Status ParseJson(std::string_view json, google::protobuf::Message* message) {
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
          "an object parameter must be {\"base64\": \"...\"} (a blob)");
    }
    case google::protobuf::Value::kListValue:
      return absl::InvalidArgumentError("a parameter cannot be an array");
  }
  return absl::InvalidArgumentError("unknown parameter type");
}

void AppendJsonString(std::string* out, std::string_view s) {
  out->push_back('"');
  for (unsigned char c : s) {
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
      if (std::isfinite(value.real())) {
        absl::StrAppendFormat(out, "%.17g", value.real());
      } else {
        out->append("null");
      }
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

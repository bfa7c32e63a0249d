#include "server/json.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "core/utf8.h"

namespace synod::server {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

// A strict JSON reader that fills request messages by reflection, following protobuf's JSON
// mapping for the field types the API uses (string, bool, integers as numbers or strings,
// reals, nested messages, repeated fields and google.protobuf.Value). Protobuf's own JSON
// parser took a fifth of a lease read's time. One pass, recursion bounded by
// kMaxJsonDepth, every error an InvalidArgument that says where.
class JsonReader {
 public:
  explicit JsonReader(std::string_view text) : text_(text) {}

  absl::Status Parse(Message* message) {
    SkipSpace();
    bool ok = message->GetDescriptor() == google::protobuf::Value::descriptor()
                  ? ParseValue(static_cast<google::protobuf::Value*>(message), 0)
                  : ParseMessage(message, 0);
    if (ok) {
      SkipSpace();
      if (pos_ != text_.size()) ok = Fail("unexpected text after the JSON value");
    }
    if (ok) return absl::OkStatus();
    return absl::InvalidArgumentError(error_);
  }

 private:
  bool Fail(std::string_view what) {
    if (error_.empty()) {
      error_ = depth_exceeded_ ? absl::StrCat("JSON nesting is deeper than ", kMaxJsonDepth)
                               : absl::StrCat("malformed request body: ", std::string(what),
                                              " at offset ", std::min(pos_, text_.size()));
    }
    return false;
  }
  bool Enter(int depth) {
    if (depth < kMaxJsonDepth) return true;
    depth_exceeded_ = true;
    return Fail("");
  }
  void SkipSpace() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' ||
                                   text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }
  bool Peek(char c) const { return pos_ < text_.size() && text_[pos_] == c; }
  bool Consume(char c) {
    SkipSpace();
    if (!Peek(c)) return false;
    ++pos_;
    SkipSpace();
    return true;
  }
  bool ConsumeWord(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  // Calls `member(key)` for each member of an object; `member` parses the value.
  template <typename Member>
  bool ParseObject(int depth, Member member) {
    if (!Enter(depth)) return false;
    if (!Consume('{')) return Fail("expected an object");
    if (Consume('}')) return true;
    for (;;) {
      std::string key;
      if (!Peek('"') || !ParseString(&key)) return Fail("expected a member name");
      if (!Consume(':')) return Fail("expected ':'");
      if (!member(key)) return false;
      if (Consume(',')) continue;
      if (Consume('}')) return true;
      return Fail("expected ',' or '}'");
    }
  }
  template <typename Element>
  bool ParseArray(int depth, Element element) {
    if (!Enter(depth)) return false;
    if (!Consume('[')) return Fail("expected an array");
    if (Consume(']')) return true;
    for (;;) {
      if (!element()) return false;
      if (Consume(',')) continue;
      if (Consume(']')) return true;
      return Fail("expected ',' or ']'");
    }
  }

  bool ParseMessage(Message* message, int depth) {
    const Descriptor* type = message->GetDescriptor();
    const Reflection* reflection = message->GetReflection();
    std::vector<const FieldDescriptor*> seen;
    return ParseObject(depth, [&](const std::string& key) {
      const FieldDescriptor* field = nullptr;  // by its JSON (lowerCamel) or proto name
      for (int i = 0; i < type->field_count() && field == nullptr; ++i) {
        const FieldDescriptor* candidate = type->field(i);
        if (candidate->json_name() == key || candidate->name() == key) field = candidate;
      }
      if (field == nullptr) {
        return Fail(absl::StrCat("unknown field \"", ValidUtf8(key), "\""));
      }
      if (std::find(seen.begin(), seen.end(), field) != seen.end()) {
        return Fail(absl::StrCat("field \"", key, "\" appears twice"));
      }
      seen.push_back(field);
      SkipSpace();
      // null is the field's default (an empty list for a repeated field), as in protobuf's
      // mapping; a google.protobuf.Value holds it as its null_value.
      if ((field->is_repeated() ||
           field->message_type() != google::protobuf::Value::descriptor()) &&
          ConsumeWord("null")) {
        return true;
      }
      if (!field->is_repeated()) return ParseField(message, reflection, field, depth);
      return ParseArray(depth + 1, [&] {
        SkipSpace();
        return ParseField(message, reflection, field, depth + 1);
      });
    });
  }

  // One value of `field` (an element, if it is repeated).
  bool ParseField(Message* message, const Reflection* reflection, const FieldDescriptor* field,
                  int depth) {
    const bool repeated = field->is_repeated();
    switch (field->cpp_type()) {
      case FieldDescriptor::CPPTYPE_MESSAGE: {
        Message* inner = repeated ? reflection->AddMessage(message, field)
                                  : reflection->MutableMessage(message, field);
        if (field->message_type() == google::protobuf::Value::descriptor()) {
          return ParseValue(static_cast<google::protobuf::Value*>(inner), depth + 1);
        }
        return ParseMessage(inner, depth + 1);
      }
      case FieldDescriptor::CPPTYPE_STRING: {
        std::string text;
        if (!Peek('"')) return Fail(absl::StrCat("field \"", field->name(), "\" takes a string"));
        if (!ParseString(&text)) return false;
        if (repeated) {
          reflection->AddString(message, field, std::move(text));
        } else {
          reflection->SetString(message, field, std::move(text));
        }
        return true;
      }
      case FieldDescriptor::CPPTYPE_BOOL: {
        bool flag = false;
        if (ConsumeWord("true")) {
          flag = true;
        } else if (!ConsumeWord("false")) {
          return Fail(absl::StrCat("field \"", field->name(), "\" takes true or false"));
        }
        if (repeated) {
          reflection->AddBool(message, field, flag);
        } else {
          reflection->SetBool(message, field, flag);
        }
        return true;
      }
      case FieldDescriptor::CPPTYPE_UINT64:
      case FieldDescriptor::CPPTYPE_UINT32:
      case FieldDescriptor::CPPTYPE_INT64:
      case FieldDescriptor::CPPTYPE_INT32:
        return ParseInteger(message, reflection, field);
      case FieldDescriptor::CPPTYPE_DOUBLE: {
        double real = 0;
        if (!ParseNumber(&real)) {
          return Fail(absl::StrCat("field \"", field->name(), "\" takes a number"));
        }
        if (repeated) {
          reflection->AddDouble(message, field, real);
        } else {
          reflection->SetDouble(message, field, real);
        }
        return true;
      }
      default:
        return Fail(absl::StrCat("field \"", field->name(), "\" has a type JSON cannot set"));
    }
  }

  // An integer field: a JSON number or a string holding one, as in protobuf's mapping.
  bool ParseInteger(Message* message, const Reflection* reflection, const FieldDescriptor* field) {
    std::string quoted;
    std::string_view literal;
    if (Peek('"')) {
      if (!ParseString(&quoted)) return false;
      literal = quoted;
    } else {
      const size_t start = pos_;
      double ignored;
      if (!ParseNumber(&ignored)) {
        return Fail(absl::StrCat("field \"", field->name(), "\" takes an integer"));
      }
      literal = text_.substr(start, pos_ - start);
    }
    auto bad = [&] {
      return Fail(absl::StrCat("field \"", field->name(), "\" takes an integer in its range"));
    };
    const bool is_signed = field->cpp_type() == FieldDescriptor::CPPTYPE_INT64 ||
                           field->cpp_type() == FieldDescriptor::CPPTYPE_INT32;
    const int64_t min = field->cpp_type() == FieldDescriptor::CPPTYPE_INT32 ? INT32_MIN
                        : is_signed                                         ? INT64_MIN
                                                                            : 0;
    const uint64_t max = field->cpp_type() == FieldDescriptor::CPPTYPE_INT32    ? INT32_MAX
                         : field->cpp_type() == FieldDescriptor::CPPTYPE_UINT32 ? UINT32_MAX
                         : is_signed                                            ? INT64_MAX
                                                                                : UINT64_MAX;
    // Exact for plain integers; a form such as 1e3 or 5.0 goes through a double and must be
    // whole.
    int64_t as_signed = 0;
    uint64_t as_unsigned = 0;
    const char* end = literal.data() + literal.size();
    bool negative = !literal.empty() && literal[0] == '-';
    const std::from_chars_result exact = negative
                                             ? std::from_chars(literal.data(), end, as_signed)
                                             : std::from_chars(literal.data(), end, as_unsigned);
    if (exact.ptr == end) {
      if (exact.ec != std::errc() || (negative ? as_signed < min : as_unsigned > max)) {
        return bad();
      }
    } else {
      double real = 0;
      const std::from_chars_result r = std::from_chars(literal.data(), end, real);
      if (r.ptr != end || r.ec != std::errc() || std::floor(real) != real) return bad();
      if (real < static_cast<double>(min) || real >= static_cast<double>(max) + 1.0) return bad();
      negative = real < 0;
      as_signed = static_cast<int64_t>(real);
      as_unsigned = negative ? 0 : static_cast<uint64_t>(real);
    }
    const bool repeated = field->is_repeated();
    switch (field->cpp_type()) {
      case FieldDescriptor::CPPTYPE_UINT64:
        repeated ? reflection->AddUInt64(message, field, as_unsigned)
                 : reflection->SetUInt64(message, field, as_unsigned);
        break;
      case FieldDescriptor::CPPTYPE_UINT32:
        repeated ? reflection->AddUInt32(message, field, static_cast<uint32_t>(as_unsigned))
                 : reflection->SetUInt32(message, field, static_cast<uint32_t>(as_unsigned));
        break;
      case FieldDescriptor::CPPTYPE_INT64: {
        const int64_t v = negative ? as_signed : static_cast<int64_t>(as_unsigned);
        repeated ? reflection->AddInt64(message, field, v)
                 : reflection->SetInt64(message, field, v);
        break;
      }
      default: {
        const auto v =
            static_cast<int32_t>(negative ? as_signed : static_cast<int64_t>(as_unsigned));
        repeated ? reflection->AddInt32(message, field, v)
                 : reflection->SetInt32(message, field, v);
        break;
      }
    }
    return true;
  }

  bool ParseValue(google::protobuf::Value* value, int depth) {
    SkipSpace();
    if (pos_ >= text_.size()) return Fail("expected a value");
    switch (text_[pos_]) {
      case '{': {
        google::protobuf::Struct* members = value->mutable_struct_value();
        return ParseObject(depth, [&](const std::string& key) {
          google::protobuf::Value& member = (*members->mutable_fields())[key];
          member.Clear();  // a repeated name: the last one counts
          return ParseValue(&member, depth + 1);
        });
      }
      case '[': {
        google::protobuf::ListValue* list = value->mutable_list_value();
        return ParseArray(depth, [&] { return ParseValue(list->add_values(), depth + 1); });
      }
      case '"':
        return ParseString(value->mutable_string_value());
      case 't':
      case 'f':
        if (ConsumeWord("true")) {
          value->set_bool_value(true);
          return true;
        }
        if (ConsumeWord("false")) {
          value->set_bool_value(false);
          return true;
        }
        return Fail("expected a value");
      case 'n':
        if (!ConsumeWord("null")) return Fail("expected a value");
        value->set_null_value(google::protobuf::NULL_VALUE);
        return true;
      default: {
        double number = 0;
        if (!ParseNumber(&number)) return Fail("expected a value");
        value->set_number_value(number);
        return true;
      }
    }
  }

  // A JSON number (RFC 8259 grammar), as the nearest double; false if out of its range.
  bool ParseNumber(double* out) {
    const size_t start = pos_;
    auto digits = [&] {
      const size_t from = pos_;
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
      return pos_ > from;
    };
    if (Peek('-')) ++pos_;
    if (Peek('0')) {
      ++pos_;
    } else if (!digits()) {
      pos_ = start;
      return false;
    }
    if (Peek('.')) {
      ++pos_;
      if (!digits()) return Fail("a number needs digits after its '.'");
    }
    if (Peek('e') || Peek('E')) {
      ++pos_;
      if (Peek('+') || Peek('-')) ++pos_;
      if (!digits()) return Fail("a number needs digits in its exponent");
    }
    const std::from_chars_result r =
        std::from_chars(text_.data() + start, text_.data() + pos_, *out);
    if (r.ec == std::errc::result_out_of_range) {
      // Too small for a double is the nearest one, zero or a subnormal (as strtod reads it);
      // too large is refused.
      *out = std::strtod(std::string(text_.substr(start, pos_ - start)).c_str(), nullptr);
      if (std::isinf(*out)) return Fail("a number out of the range of a double");
    } else if (r.ec != std::errc()) {
      return Fail("a number out of the range of a double");
    }
    return true;
  }

  bool ParseHex4(uint32_t* out) {
    if (pos_ + 4 > text_.size()) return false;
    *out = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = text_[pos_++];
      *out <<= 4;
      if (c >= '0' && c <= '9') {
        *out |= static_cast<uint32_t>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        *out |= static_cast<uint32_t>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        *out |= static_cast<uint32_t>(c - 'A' + 10);
      } else {
        return false;
      }
    }
    return true;
  }

  // A string literal; REQUIRES: at its opening quote. The result is valid UTF-8 (raw bytes
  // that are not, and unpaired surrogates, are errors, as protobuf's parser has them).
  bool ParseString(std::string* out) {
    ++pos_;
    out->clear();
    size_t run = pos_;  // start of the bytes not copied yet
    for (;;) {
      if (pos_ >= text_.size()) return Fail("a string is not closed");
      const char c = text_[pos_];
      if (c == '"') break;
      if (static_cast<unsigned char>(c) < 0x20) return Fail("a control character in a string");
      if (c != '\\') {
        ++pos_;
        continue;
      }
      out->append(text_.substr(run, pos_ - run));
      ++pos_;
      if (pos_ >= text_.size()) return Fail("a string is not closed");
      const char escaped = text_[pos_++];
      // The one-character escapes, and what each stands for.
      constexpr std::string_view kEscapes = "\"\\/bfnrt";
      constexpr std::string_view kMeanings = "\"\\/\b\f\n\r\t";
      if (size_t at = kEscapes.find(escaped); at != std::string_view::npos) {
        out->push_back(kMeanings[at]);
      } else if (escaped == 'u') {
        uint32_t code = 0;
        if (!ParseHex4(&code)) return Fail("a bad \\u escape");
        if (code >= 0xDC00 && code <= 0xDFFF) return Fail("an unpaired surrogate");
        if (code >= 0xD800 && code <= 0xDBFF) {
          uint32_t low = 0;
          if (!ConsumeWord("\\u") || !ParseHex4(&low) || low < 0xDC00 || low > 0xDFFF) {
            return Fail("an unpaired surrogate");
          }
          code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
        }
        AppendUtf8(out, code);
      } else {
        return Fail("a bad escape in a string");
      }
      run = pos_;
    }
    out->append(text_.substr(run, pos_ - run));
    ++pos_;  // the closing quote
    if (!IsValidUtf8(*out)) return Fail("a string that is not valid UTF-8");
    return true;
  }

  static void AppendUtf8(std::string* out, uint32_t code) {
    if (code < 0x80) {
      out->push_back(static_cast<char>(code));
    } else if (code < 0x800) {
      out->push_back(static_cast<char>(0xC0 | (code >> 6)));
      out->push_back(static_cast<char>(0x80 | (code & 0x3F)));
    } else if (code < 0x10000) {
      out->push_back(static_cast<char>(0xE0 | (code >> 12)));
      out->push_back(static_cast<char>(0x80 | ((code >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (code & 0x3F)));
    } else {
      out->push_back(static_cast<char>(0xF0 | (code >> 18)));
      out->push_back(static_cast<char>(0x80 | ((code >> 12) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | ((code >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (code & 0x3F)));
    }
  }

  std::string_view text_;
  size_t pos_ = 0;
  bool depth_exceeded_ = false;
  std::string error_;
};

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
  message->Clear();
  return JsonReader(json).Parse(message);
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

}  // namespace synod::server

#ifndef SYNOD_SERVER_JSON_H_
#define SYNOD_SERVER_JSON_H_

// Conversions between the HTTP API's JSON and Synod's protobuf values. Requests are read
// into the messages of server/api.proto by a strict JSON reader (RFC 8259) that follows
// protobuf's JSON mapping; responses are written here.

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "adapters/json_text.h"
#include "core/synod.pb.h"
#include "google/protobuf/struct.pb.h"

namespace synod::server {

// The deepest nesting of arrays and objects ParseJson accepts (its recursion is bounded by
// it).
inline constexpr int kMaxJsonDepth = 64;

// Parses `json` into `message` (a message of server/api.proto, or a google.protobuf.Value),
// as protobuf's JSON mapping reads it: a field by its JSON or proto name; null for the
// field's default (an empty list for a repeated one); integers as numbers or strings holding
// them. Refused, with InvalidArgument saying where: what is not JSON (trailing commas, single
// quotes, bare names, raw control characters in strings, strings that are not UTF-8 or hold
// an unpaired surrogate escape), an unknown field, a field given twice, a value of the wrong
// type or out of range, and nesting deeper than kMaxJsonDepth.
absl::Status ParseJson(std::string_view json, google::protobuf::Message* message);

// A JSON parameter as an SQL value: null, true/false (1/0), a number (integer when it is
// integral and within +-2^53, else real), a string, {"base64": "..."} for a blob, or
// {"real": ...} for a real: a number (so that a whole number such as 1.0 can be passed as a
// real) or the string "Infinity" or "-Infinity". Anything else is InvalidArgument.
absl::StatusOr<SqlValue> SqlValueFromJson(const google::protobuf::Value& value);

// Appends an SQL value as JSON: null, an integer, a real, a string, or {"base64": "..."} for
// a blob. A real is written in the shortest form that reads back as the same double, and
// always with a '.' or an exponent (1.0, -0.0, 1e+300), so that it never reads as an integer.
// JSON numbers have no infinities or NaN: +infinity is written {"real":"Infinity"} and
// -infinity {"real":"-Infinity"} (SqlValueFromJson reads both back), and NaN is written null
// (SQLite itself stores a NaN as NULL).
void AppendSqlValue(std::string* out, const SqlValue& value);

}  // namespace synod::server

#endif  // SYNOD_SERVER_JSON_H_

#ifndef SYNOD_SERVER_JSON_H_
#define SYNOD_SERVER_JSON_H_

// Conversions between the HTTP API's JSON and Synod's protobuf values. Requests are
// parsed with protobuf's JSON mapping (server/api.proto); responses are written here.

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "core/synod.pb.h"
#include "google/protobuf/struct.pb.h"

namespace synod::server {

// Parses `json` into `message`, rejecting unknown fields and fields of the wrong type.
absl::Status ParseJson(std::string_view json, google::protobuf::Message* message);

// A JSON parameter as an SQL value: null, true/false (1/0), a number (integer when it is
// integral and within +-2^53, else real), a string, or {"base64": "..."} for a blob.
absl::StatusOr<SqlValue> SqlValueFromJson(const google::protobuf::Value& value);

// Appends `s` as a JSON string literal (quoted and escaped).
void AppendJsonString(std::string* out, std::string_view s);

// Appends an SQL value as JSON: null, a number, a string, or {"base64": "..."}.
void AppendSqlValue(std::string* out, const SqlValue& value);

// {"error":{"code":code,"message":message}}
std::string ErrorJson(std::string_view code, std::string_view message);

}  // namespace synod::server

#endif  // SYNOD_SERVER_JSON_H_

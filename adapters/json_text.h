#ifndef SYNOD_ADAPTERS_JSON_TEXT_H_
#define SYNOD_ADAPTERS_JSON_TEXT_H_

// JSON text that leaves the server: string literals and the error body that every JSON
// error carries, shared by the HTTP server (adapters/http_server.h) and the API handlers
// (server/), so that an error reads the same whoever answers it.

#include <string>
#include <string_view>

namespace synod {

// Appends `s` as a JSON string literal, quoted and escaped. `s` may hold any bytes: the
// literal is always valid JSON in valid UTF-8 (control characters are escaped, and a byte
// that is not part of a well-formed UTF-8 sequence becomes U+FFFD).
void AppendJsonString(std::string* out, std::string_view s);

// {"error":{"code":code,"message":message}}, valid UTF-8 whatever the bytes of `code` and
// `message` (see AppendJsonString).
std::string ErrorJson(std::string_view code, std::string_view message);

}  // namespace synod

#endif  // SYNOD_ADAPTERS_JSON_TEXT_H_

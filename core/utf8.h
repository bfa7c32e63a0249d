#ifndef SYNOD_CORE_UTF8_H_
#define SYNOD_CORE_UTF8_H_

// UTF-8 checks for what leaves the server as text: proto3 strings, JSON bodies and error
// messages must be valid UTF-8, and what clients and SQLite hand us need not be.

#include <cstddef>
#include <string>
#include <string_view>

namespace synod {

// The length of the well-formed UTF-8 sequence that `text` starts with, or 0 when it starts
// with none: a stray continuation byte, an overlong form, a surrogate, a code point above
// U+10FFFF, a sequence cut short, or an empty `text`.
size_t Utf8SequenceBytes(std::string_view text);

bool IsValidUtf8(std::string_view text);

// `text` with every byte that is not part of a well-formed sequence replaced by U+FFFD.
std::string ValidUtf8(std::string_view text);

}  // namespace synod

#endif  // SYNOD_CORE_UTF8_H_

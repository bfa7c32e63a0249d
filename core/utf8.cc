#include "core/utf8.h"

#include <algorithm>
#include <cstdint>

namespace synod {

size_t Utf8SequenceBytes(std::string_view text) {
  if (text.empty()) return 0;
  const auto lead = static_cast<unsigned char>(text[0]);
  if (lead < 0x80) return 1;
  size_t length = 0;
  uint32_t code_point = 0;
  if (lead >= 0xc2 && lead <= 0xdf) {
    length = 2;
    code_point = lead & 0x1f;
  } else if (lead >= 0xe0 && lead <= 0xef) {
    length = 3;
    code_point = lead & 0x0f;
  } else if (lead >= 0xf0 && lead <= 0xf4) {
    length = 4;
    code_point = lead & 0x07;
  } else {
    return 0;
  }
  if (text.size() < length) return 0;
  for (size_t i = 1; i < length; ++i) {
    const auto continuation = static_cast<unsigned char>(text[i]);
    if ((continuation & 0xc0) != 0x80) return 0;
    code_point = (code_point << 6) | (continuation & 0x3f);
  }
  constexpr uint32_t kSmallestOfLength[] = {0, 0, 0x80, 0x800, 0x10000};
  if (code_point < kSmallestOfLength[length] || code_point > 0x10ffff ||
      (code_point >= 0xd800 && code_point <= 0xdfff)) {
    return 0;
  }
  return length;
}

bool IsValidUtf8(std::string_view text) {
  for (size_t i = 0, n = 0; i < text.size(); i += n) {
    n = Utf8SequenceBytes(text.substr(i));
    if (n == 0) return false;
  }
  return true;
}

std::string ValidUtf8(std::string_view text) {
  std::string valid;
  valid.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    size_t n = Utf8SequenceBytes(text.substr(i));
    valid.append(n == 0 ? "\xef\xbf\xbd" : text.substr(i, n));  // U+FFFD for a bad byte
    i += std::max<size_t>(n, 1);
  }
  return valid;
}

}  // namespace synod

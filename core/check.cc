#include "core/check.h"

#include <cstdio>
#include <cstdlib>

namespace synod::internal {

CheckFailure::CheckFailure(const char* condition, const char* file, int line) {
  stream_ << file << ":" << line << ": SYNOD_CHECK failed: " << condition << " ";
}

CheckFailure::~CheckFailure() {
  std::string text = stream_.str();
  // stderr is the process's diagnostic channel, not data I/O: the core still reads and
  // writes no files of its own.
  std::fputs(text.c_str(), stderr);
  std::fputc('\n', stderr);
  std::fflush(stderr);
  std::abort();
}

}  // namespace synod::internal

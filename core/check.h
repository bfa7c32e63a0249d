#ifndef SYNOD_CORE_CHECK_H_
#define SYNOD_CORE_CHECK_H_

// SYNOD_CHECK(cond) << "context": an invariant the code relies on. It stays on in every
// build (release included): when it fails the process prints the condition, the place and
// the context, then aborts. A replica that has broken an invariant must stop rather than
// vote on a wrong state.

#include <sstream>
#include <string>

namespace synod::internal {

class CheckFailure {
 public:
  CheckFailure(const char* condition, const char* file, int line);
  [[noreturn]] ~CheckFailure();
  template <typename T>
  CheckFailure& operator<<(const T& value) {
    stream_ << value;
    return *this;
  }

 private:
  std::ostringstream stream_;
};

// Makes `cond ? (void)0 : CheckFailure(...) << x` well-typed.
struct Voidify {
  void operator&(const CheckFailure&) {}
};

}  // namespace synod::internal

#define SYNOD_CHECK(cond) \
  (cond)                  \
      ? (void)0           \
      : ::synod::internal::Voidify() & ::synod::internal::CheckFailure(#cond, __FILE__, __LINE__)

#define SYNOD_CHECK_EQ(a, b) SYNOD_CHECK((a) == (b)) << (a) << " vs " << (b) << " "
#define SYNOD_CHECK_LE(a, b) SYNOD_CHECK((a) <= (b)) << (a) << " vs " << (b) << " "
#define SYNOD_CHECK_LT(a, b) SYNOD_CHECK((a) < (b)) << (a) << " vs " << (b) << " "
#define SYNOD_CHECK_GT(a, b) SYNOD_CHECK((a) > (b)) << (a) << " vs " << (b) << " "
#define SYNOD_CHECK_GE(a, b) SYNOD_CHECK((a) >= (b)) << (a) << " vs " << (b) << " "

#endif  // SYNOD_CORE_CHECK_H_

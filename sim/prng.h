#ifndef SYNOD_SIM_PRNG_H_
#define SYNOD_SIM_PRNG_H_

// The simulator's deterministic generator (sim/world.cc and its parts).

#include <cstdint>
#include <random>

#include "core/check.h"

namespace synod::sim::internal {

// A deterministic generator; ranges come from the raw 64-bit output (the std distributions
// differ between standard libraries). Probabilities are integer ratios.
class Prng {
 public:
  explicit Prng(uint64_t seed) : engine_(seed) {}
  uint64_t Next() { return engine_(); }
  // Uniform in [lo, hi].
  int64_t Range(int64_t lo, int64_t hi) {
    SYNOD_CHECK_LE(lo, hi);
    return lo + static_cast<int64_t>(Next() % static_cast<uint64_t>(hi - lo + 1));
  }
  bool Chance(uint64_t numerator, uint64_t denominator) {
    return numerator > 0 && Next() % denominator < numerator;
  }

 private:
  std::mt19937_64 engine_;
};

}  // namespace synod::sim::internal

#endif  // SYNOD_SIM_PRNG_H_

#ifndef SYNOD_CORE_STABLE_HASH_H_
#define SYNOD_CORE_STABLE_HASH_H_

#include <cstdint>
#include <string_view>

namespace synod {

// A 64-bit FNV-1a hash that is the same in every process and on every run (unlike
// absl::Hash or std::hash, which are seeded per process). For state and trace hashes that
// must match across replicas and replays; not for hash tables facing untrusted keys.
class StableHash {
 public:
  void Add(std::string_view bytes) {
    for (unsigned char c : bytes) {
      state_ ^= c;
      state_ *= kPrime;
    }
  }
  void AddU64(uint64_t v) {
    for (int i = 0; i < 8; ++i) {
      state_ ^= static_cast<unsigned char>(v >> (8 * i));
      state_ *= kPrime;
    }
  }
  // Length-prefixed, so that ("ab","c") and ("a","bc") hash differently.
  void AddField(std::string_view bytes) {
    AddU64(bytes.size());
    Add(bytes);
  }
  uint64_t value() const { return state_; }

 private:
  static constexpr uint64_t kOffsetBasis = 14695981039346656037ull;
  static constexpr uint64_t kPrime = 1099511628211ull;
  uint64_t state_ = kOffsetBasis;
};

}  // namespace synod

#endif  // SYNOD_CORE_STABLE_HASH_H_

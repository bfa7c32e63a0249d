#include "core/deterministic_sqlite.h"

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "core/check.h"
#include "core/sql_guards.h"

namespace synod {
namespace {

// The Unix epoch (1970-01-01 00:00 UTC) is Julian day 2440587.5; SQLite counts time in
// Julian days (xCurrentTime) or Julian milliseconds (xCurrentTimeInt64).
constexpr int64_t kUnixEpochJulianMs = 210866760000000;
constexpr double kMsPerDay = 86400000.0;

// splitmix64's output function: a bijection on 64-bit values that mixes every input bit.
uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void RandomFunction(sqlite3_context* context, int argc, sqlite3_value** /*argv*/) {
  SYNOD_CHECK_EQ(argc, 0);
  auto* random = static_cast<RequestRandom*>(sqlite3_user_data(context));
  int64_t value = static_cast<int64_t>(random->Next());
  // Like the built-in random(): the value is never the one integer whose negation overflows.
  if (value < 0) value = -(value & std::numeric_limits<int64_t>::max());
  sqlite3_result_int64(context, value);
}

void RandomBlobFunction(sqlite3_context* context, int argc, sqlite3_value** argv) {
  SYNOD_CHECK_EQ(argc, 1);
  auto* random = static_cast<RequestRandom*>(sqlite3_user_data(context));
  // Like the built-in randomblob(N): N below 1 gives one byte; N above the length limit fails.
  int64_t size_bytes = sqlite3_value_int64(argv[0]);
  if (size_bytes < 1) size_bytes = 1;
  if (size_bytes > sqlite3_limit(sqlite3_context_db_handle(context), SQLITE_LIMIT_LENGTH, -1)) {
    sqlite3_result_error_toobig(context);
    return;
  }
  // Work by size, and SQLite's allocator, so that the request's budget is charged for both
  // (sql_guards.h).
  if (!ChargeValueBytes(context, size_bytes)) return;
  auto* blob = static_cast<unsigned char*>(sqlite3_malloc64(static_cast<uint64_t>(size_bytes)));
  if (blob == nullptr) {
    sqlite3_result_error_nomem(context);
    return;
  }
  const size_t size = static_cast<size_t>(size_bytes);
  for (size_t i = 0; i < size; i += 8) {
    // Little-endian bytes of each word, on every machine.
    unsigned char bytes[8];
    uint64_t word = random->Next();
    for (int j = 0; j < 8; ++j) bytes[j] = static_cast<unsigned char>(word >> (8 * j));
    std::memcpy(blob + i, bytes, std::min<size_t>(8, size - i));
  }
  sqlite3_result_blob64(context, blob, size, sqlite3_free);
}

}  // namespace

TimeSourceVfs::TimeSourceVfs(std::function<int64_t()> now_unix_ms)
    : now_unix_ms_(std::move(now_unix_ms)) {
  static_assert(std::is_standard_layout_v<Registered>);
  SYNOD_CHECK(now_unix_ms_ != nullptr);
  sqlite3_vfs* base = sqlite3_vfs_find(nullptr);
  SYNOD_CHECK(base != nullptr) << "SQLite has no default VFS";
  SYNOD_CHECK_GE(base->iVersion, 2) << "the default VFS lacks xCurrentTimeInt64";
  registered_.vfs = *base;
  registered_.owner = this;
  // The address makes the name unique among the VFSes registered at the same time.
  std::memset(registered_.name, 0, sizeof(registered_.name));
  constexpr char kPrefix[] = "synod-time-";
  std::memcpy(registered_.name, kPrefix, sizeof(kPrefix) - 1);
  char* end = registered_.name + sizeof(registered_.name) - 1;
  auto [ptr, error] = std::to_chars(registered_.name + sizeof(kPrefix) - 1, end,
                                    reinterpret_cast<uintptr_t>(this), 16);
  SYNOD_CHECK(error == std::errc());
  registered_.vfs.zName = registered_.name;
  registered_.vfs.pNext = nullptr;
  registered_.vfs.xCurrentTime = &TimeSourceVfs::CurrentTime;
  registered_.vfs.xCurrentTimeInt64 = &TimeSourceVfs::CurrentTimeInt64;
  SYNOD_CHECK(sqlite3_vfs_find(registered_.name) == nullptr) << registered_.name;
  SYNOD_CHECK_EQ(sqlite3_vfs_register(&registered_.vfs, /*makeDflt=*/0), SQLITE_OK);
}

TimeSourceVfs::~TimeSourceVfs() {
  SYNOD_CHECK_EQ(sqlite3_vfs_unregister(&registered_.vfs), SQLITE_OK);
}

int TimeSourceVfs::CurrentTime(sqlite3_vfs* vfs, double* julian_days) {
  sqlite3_int64 julian_ms = 0;
  CurrentTimeInt64(vfs, &julian_ms);
  *julian_days = static_cast<double>(julian_ms) / kMsPerDay;
  return SQLITE_OK;
}

int TimeSourceVfs::CurrentTimeInt64(sqlite3_vfs* vfs, sqlite3_int64* julian_ms) {
  const auto* registered = reinterpret_cast<const Registered*>(vfs);
  SYNOD_CHECK(registered->owner != nullptr && &registered->owner->registered_ == registered);
  *julian_ms = registered->owner->now_unix_ms_() + kUnixEpochJulianMs;
  return SQLITE_OK;
}

int64_t VfsNowUnixMs(const char* vfs_name) {
  sqlite3_vfs* vfs = sqlite3_vfs_find(vfs_name);
  SYNOD_CHECK(vfs != nullptr) << "no VFS named " << vfs_name;
  SYNOD_CHECK(vfs->iVersion >= 2 && vfs->xCurrentTimeInt64 != nullptr) << vfs_name;
  sqlite3_int64 julian_ms = 0;
  SYNOD_CHECK_EQ(vfs->xCurrentTimeInt64(vfs, &julian_ms), SQLITE_OK);
  return julian_ms - kUnixEpochJulianMs;
}

void RequestRandom::Reset(uint64_t slot, uint64_t request_index) {
  state_ = Mix(Mix(slot) ^ request_index);
}

uint64_t RequestRandom::Next() {
  state_ += 0x9e3779b97f4a7c15ull;  // splitmix64's increment: the stream visits every value
  return Mix(state_);
}

void RequestRandom::InstallOn(sqlite3* db) {
  // Not SQLITE_DETERMINISTIC (each call differs), but innocuous like the built-ins, so
  // that they keep working in triggers, views and DEFAULT clauses.
  constexpr int kFlags = SQLITE_UTF8 | SQLITE_INNOCUOUS;
  SYNOD_CHECK_EQ(sqlite3_create_function_v2(db, "random", 0, kFlags, this, &RandomFunction, nullptr,
                                            nullptr, nullptr),
                 SQLITE_OK);
  SYNOD_CHECK_EQ(sqlite3_create_function_v2(db, "randomblob", 1, kFlags, this, &RandomBlobFunction,
                                            nullptr, nullptr, nullptr),
                 SQLITE_OK);
}

}  // namespace synod

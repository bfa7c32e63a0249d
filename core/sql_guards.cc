#include "core/sql_guards.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "core/check.h"

namespace synod {
namespace {

thread_local WorkBudget* active_budget = nullptr;
// Set while the page cache runs on this thread: its allocations are charged per page (or not
// at all, for a connection's own cache), never by size.
thread_local bool in_page_cache = false;

// While this lives, nothing on this thread is charged (see its use).
class ScopedUncharged {
 public:
  ScopedUncharged() : outer_(active_budget) { active_budget = nullptr; }
  ~ScopedUncharged() { active_budget = outer_; }
  ScopedUncharged(const ScopedUncharged&) = delete;
  ScopedUncharged& operator=(const ScopedUncharged&) = delete;

 private:
  WorkBudget* outer_;
};

// SQLite's own allocator, which the charging one wraps.
sqlite3_mem_methods default_memory{};

void* ChargedMalloc(int size_bytes) {
  WorkBudget* budget = active_budget;
  if (budget != nullptr && !in_page_cache && size_bytes >= kChargedAllocationBytes &&
      !budget->ChargeAllocation(size_bytes)) {
    return nullptr;  // SQLITE_NOMEM, alike on every replica
  }
  return default_memory.xMalloc(size_bytes);
}

void* ChargedRealloc(void* old, int size_bytes) {
  WorkBudget* budget = active_budget;
  if (budget != nullptr && !in_page_cache && size_bytes >= kChargedAllocationBytes &&
      !budget->ChargeAllocation(size_bytes)) {
    return nullptr;
  }
  return default_memory.xRealloc(old, size_bytes);
}

// SQLite's own page cache, which the charging one wraps. Ephemeral tables (UNION,
// DISTINCT, IN lists, materialized views and CTEs) keep their rows in pages of a cache of
// their own, which an allocation threshold does not see: a UNION of 100 KB rows grew to
// half a gigabyte in 75 thousand steps. A cache created while a budget is active (one of
// those, created and dropped by the statement) is charged every page it adds; the caches of
// database connections are created when the connection opens, outside any budget, so what
// they hold (which depends on history) is never charged.
sqlite3_pcache_methods2 default_pages{};

struct ChargedCache {
  sqlite3_pcache* inner;
  int64_t page_bytes;
  bool charged;
};

ChargedCache* Unwrap(sqlite3_pcache* cache) { return reinterpret_cast<ChargedCache*>(cache); }

// Marks the page cache's own work on this thread (see in_page_cache).
class InPageCache {
 public:
  InPageCache() : outer_(in_page_cache) { in_page_cache = true; }
  ~InPageCache() { in_page_cache = outer_; }
  InPageCache(const InPageCache&) = delete;
  InPageCache& operator=(const InPageCache&) = delete;

 private:
  bool outer_;
};

sqlite3_pcache* ChargedCreate(int page_bytes, int extra_bytes, int purgeable) {
  InPageCache scope;
  sqlite3_pcache* inner = default_pages.xCreate(page_bytes, extra_bytes, purgeable);
  if (inner == nullptr) return nullptr;
  auto* cache = static_cast<ChargedCache*>(sqlite3_malloc(sizeof(ChargedCache)));
  if (cache == nullptr) {
    default_pages.xDestroy(inner);
    return nullptr;
  }
  *cache = ChargedCache{.inner = inner,
                        .page_bytes = static_cast<int64_t>(page_bytes) + extra_bytes,
                        .charged = active_budget != nullptr};
  return reinterpret_cast<sqlite3_pcache*>(cache);
}

void ChargedCachesize(sqlite3_pcache* cache, int pages) {
  default_pages.xCachesize(Unwrap(cache)->inner, pages);
}

int ChargedPagecount(sqlite3_pcache* cache) {
  return default_pages.xPagecount(Unwrap(cache)->inner);
}

sqlite3_pcache_page* ChargedFetch(sqlite3_pcache* cache, unsigned key, int create) {
  InPageCache scope;
  ChargedCache* c = Unwrap(cache);
  WorkBudget* budget = active_budget;
  if (!c->charged || create == 0 || budget == nullptr) {
    return default_pages.xFetch(c->inner, key, create);
  }
  int before = default_pages.xPagecount(c->inner);
  sqlite3_pcache_page* page = default_pages.xFetch(c->inner, key, create);
  if (page != nullptr && default_pages.xPagecount(c->inner) > before &&
      !budget->ChargeAllocation(c->page_bytes)) {
    default_pages.xUnpin(c->inner, page, /*discard=*/1);
    return nullptr;  // SQLITE_NOMEM, alike on every replica
  }
  return page;
}

void ChargedUnpin(sqlite3_pcache* cache, sqlite3_pcache_page* page, int discard) {
  default_pages.xUnpin(Unwrap(cache)->inner, page, discard);
}

void ChargedRekey(sqlite3_pcache* cache, sqlite3_pcache_page* page, unsigned old_key,
                  unsigned new_key) {
  default_pages.xRekey(Unwrap(cache)->inner, page, old_key, new_key);
}

void ChargedTruncate(sqlite3_pcache* cache, unsigned limit) {
  default_pages.xTruncate(Unwrap(cache)->inner, limit);
}

void ChargedDestroy(sqlite3_pcache* cache) {
  default_pages.xDestroy(Unwrap(cache)->inner);
  sqlite3_free(cache);
}

void ChargedShrink(sqlite3_pcache* cache) { default_pages.xShrink(Unwrap(cache)->inner); }

// Installed before main(), so before any SQLite use: SQLite accepts a new allocator and page
// cache only while it is not initialized.
const bool allocator_installed = [] {
  SYNOD_CHECK_EQ(sqlite3_config(SQLITE_CONFIG_GETMALLOC, &default_memory), SQLITE_OK);
  sqlite3_mem_methods charged = default_memory;
  charged.xMalloc = &ChargedMalloc;
  charged.xRealloc = &ChargedRealloc;
  SYNOD_CHECK_EQ(sqlite3_config(SQLITE_CONFIG_MALLOC, &charged), SQLITE_OK)
      << "SQLite was used before the allocator could be installed";
  SYNOD_CHECK_EQ(sqlite3_config(SQLITE_CONFIG_GETPCACHE2, &default_pages), SQLITE_OK);
  sqlite3_pcache_methods2 pages = default_pages;
  pages.xCreate = &ChargedCreate;
  pages.xCachesize = &ChargedCachesize;
  pages.xPagecount = &ChargedPagecount;
  pages.xFetch = &ChargedFetch;
  pages.xUnpin = &ChargedUnpin;
  pages.xRekey = &ChargedRekey;
  pages.xTruncate = &ChargedTruncate;
  pages.xDestroy = &ChargedDestroy;
  pages.xShrink = &ChargedShrink;
  SYNOD_CHECK_EQ(sqlite3_config(SQLITE_CONFIG_PCACHE2, &pages), SQLITE_OK);
  // No memory statistics (nothing here reads them, and no heap limit is set): with them on,
  // every SQLite allocation and free takes a process-wide mutex.
  SYNOD_CHECK_EQ(sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0), SQLITE_OK);
  return true;
}();

// One work unit stands for this many byte comparisons.
constexpr int64_t kByteComparesPerWorkUnit = 64;

int64_t Bytes(sqlite3_value* value) {
  return sqlite3_value_type(value) == SQLITE_NULL ? 0 : sqlite3_value_bytes(value);
}

// Charges the active budget (if any); false when it is spent.
bool Charge(sqlite3_context* context, int64_t byte_compares) {
  WorkBudget* budget = active_budget;
  if (budget == nullptr || budget->ChargeWork(byte_compares / kByteComparesPerWorkUnit + 1)) {
    return true;
  }
  sqlite3_result_error(context, "the request's work budget is spent", -1);
  sqlite3_result_error_code(context, SQLITE_INTERRUPT);
  return false;
}

// like(pattern, text [, escape]) and glob(pattern, text): backtracking on '%' / '*' makes
// the worst case |pattern| * |text|.
void GuardedLike(sqlite3_context* context, int argc, sqlite3_value** argv) {
  if (!Charge(context, Bytes(argv[0]) * std::max<int64_t>(Bytes(argv[1]), 1))) return;
  auto* functions = static_cast<GuardedFunctions*>(sqlite3_user_data(context));
  functions->CallBuiltin(context, "like", argc, argv);
}

void GuardedGlob(sqlite3_context* context, int argc, sqlite3_value** argv) {
  if (!Charge(context, Bytes(argv[0]) * std::max<int64_t>(Bytes(argv[1]), 1))) return;
  auto* functions = static_cast<GuardedFunctions*>(sqlite3_user_data(context));
  functions->CallBuiltin(context, "glob", argc, argv);
}

// instr(haystack, needle): a naive search, |haystack| * |needle| at worst.
void GuardedInstr(sqlite3_context* context, int argc, sqlite3_value** argv) {
  if (!Charge(context, Bytes(argv[0]) * std::max<int64_t>(Bytes(argv[1]), 1))) return;
  auto* functions = static_cast<GuardedFunctions*>(sqlite3_user_data(context));
  functions->CallBuiltin(context, "instr", argc, argv);
}

// replace(text, find, with): each position of text is compared with find.
void GuardedReplace(sqlite3_context* context, int argc, sqlite3_value** argv) {
  if (!Charge(context, Bytes(argv[0]) * std::max<int64_t>(Bytes(argv[1]), 1) + Bytes(argv[2]))) {
    return;
  }
  auto* functions = static_cast<GuardedFunctions*>(sqlite3_user_data(context));
  functions->CallBuiltin(context, "replace", argc, argv);
}

// trim(text, characters) and its kin: each end character is compared with the set.
// zeroblob(N): SQLite's own makes N zero bytes lazily, but every copy of the value into a
// record or a result writes them all.
void GuardedZeroblob(sqlite3_context* context, int argc, sqlite3_value** argv) {
  SYNOD_CHECK_EQ(argc, 1);
  const int64_t size_bytes = std::max<int64_t>(0, sqlite3_value_int64(argv[0]));
  if (!ChargeValueBytes(context, size_bytes)) return;
  if (sqlite3_result_zeroblob64(context, static_cast<sqlite3_uint64>(size_bytes)) != SQLITE_OK) {
    sqlite3_result_error_toobig(context);
  }
}

template <const char* kName>
void GuardedTrim(sqlite3_context* context, int argc, sqlite3_value** argv) {
  if (!Charge(context, Bytes(argv[0]) * std::max<int64_t>(Bytes(argv[1]), 1))) return;
  auto* functions = static_cast<GuardedFunctions*>(sqlite3_user_data(context));
  functions->CallBuiltin(context, kName, argc, argv);
}
constexpr char kTrim[] = "trim";
constexpr char kLtrim[] = "ltrim";
constexpr char kRtrim[] = "rtrim";

// The sum of every width and precision in a printf format, reading '*' fields from the
// arguments as SQLite does (an over-estimate where SQLite would wrap a huge number).
// Sets `largest` to the largest one.
int64_t PrintfFieldBytes(std::string_view format, int argc, sqlite3_value** argv,
                         int64_t* largest) {
  constexpr int64_t kSaturated = int64_t{1} << 40;
  int next_arg = 1;
  int64_t total = 0;
  *largest = 0;
  auto field = [&](int64_t value) {
    value = std::min(value, kSaturated);
    *largest = std::max(*largest, value);
    total += value;
  };
  auto star = [&]() -> int64_t {
    if (next_arg >= argc) return 0;
    int64_t value = sqlite3_value_int64(argv[next_arg++]);
    if (value == std::numeric_limits<int64_t>::min()) return kSaturated;
    return value < 0 ? -value : value;
  };
  auto number = [&](size_t* i) {
    int64_t value = 0;
    while (*i < format.size() && format[*i] >= '0' && format[*i] <= '9') {
      value = std::min(value * 10 + (format[*i] - '0'), kSaturated);
      ++*i;
    }
    return value;
  };
  for (size_t i = 0; i < format.size(); ++i) {
    if (format[i] != '%') continue;
    if (++i >= format.size()) break;
    if (format[i] == '%') continue;
    while (i < format.size() && std::strchr("-+ #!0,", format[i]) != nullptr) ++i;
    if (i < format.size() && format[i] == '*') {
      field(star());
      ++i;
    } else {
      field(number(&i));
    }
    if (i < format.size() && format[i] == '.') {
      ++i;
      if (i < format.size() && format[i] == '*') {
        field(star());
        ++i;
      } else {
        field(number(&i));
      }
    }
    while (i < format.size() && format[i] == 'l') ++i;
    if (i < format.size()) ++next_arg;  // the converted value
  }
  return total;
}

template <const char* kName>
void GuardedPrintf(sqlite3_context* context, int argc, sqlite3_value** argv) {
  if (argc < 1) return;  // printf() with no format is NULL, like the built-in
  const char* format = reinterpret_cast<const char*>(sqlite3_value_text(argv[0]));
  if (format == nullptr) return;
  std::string_view view(format, static_cast<size_t>(sqlite3_value_bytes(argv[0])));
  int64_t largest = 0;
  int64_t field_bytes = PrintfFieldBytes(view, argc, argv, &largest);
  if (largest > kMaxPrintfWidth) {
    std::string message =
        absl::StrCat(kName, "() width or precision ", largest, " is over ", kMaxPrintfWidth);
    sqlite3_result_error(context, message.c_str(), -1);
    sqlite3_result_error_code(context, SQLITE_TOOBIG);
    return;
  }
  int64_t argument_bytes = 0;
  for (int i = 1; i < argc; ++i) argument_bytes += Bytes(argv[i]);
  if (!Charge(context, static_cast<int64_t>(view.size()) + field_bytes + argument_bytes)) return;
  auto* functions = static_cast<GuardedFunctions*>(sqlite3_user_data(context));
  functions->CallBuiltin(context, kName, argc, argv);
}
constexpr char kPrintf[] = "printf";
constexpr char kFormat[] = "format";

}  // namespace

bool WorkBudget::ChargeWork(int64_t units) {
  work_units_left_ -= units;
  return !exhausted();
}

bool WorkBudget::ChargeAllocation(int64_t bytes) {
  if (allocation_bytes_left_ < 0) return false;
  allocation_bytes_left_ -= bytes;
  return !exhausted();
}

std::string WorkBudget::Reason() const {
  SYNOD_CHECK(exhausted());
  if (allocation_bytes_left_ < 0) {
    return absl::StrCat("the request allocated more than ", max_allocation_bytes_,
                        " bytes in large values");
  }
  return absl::StrCat("the request ran for more than ", max_work_units_,
                      " SQLite steps (or the equivalent work in functions)");
}

ScopedWorkBudget::ScopedWorkBudget(WorkBudget* budget) : outer_(active_budget) {
  SYNOD_CHECK(allocator_installed);
  SYNOD_CHECK(budget != nullptr);
  active_budget = budget;
}

ScopedWorkBudget::~ScopedWorkBudget() { active_budget = outer_; }

WorkBudget* ActiveWorkBudget() { return active_budget; }

bool ChargeValueBytes(sqlite3_context* context, int64_t bytes) {
  return Charge(context, bytes / kValueBytesPerWorkUnit * kByteComparesPerWorkUnit);
}

void ApplySqliteLimits(sqlite3* db) {
  constexpr std::pair<int, int> kLimits[] = {
      {SQLITE_LIMIT_LENGTH, kMaxValueBytes},
      {SQLITE_LIMIT_SQL_LENGTH, kMaxSqlBytes},
      {SQLITE_LIMIT_COLUMN, 2000},
      {SQLITE_LIMIT_EXPR_DEPTH, 500},
      {SQLITE_LIMIT_COMPOUND_SELECT, 100},
      {SQLITE_LIMIT_VDBE_OP, 250'000},
      {SQLITE_LIMIT_FUNCTION_ARG, 127},
      {SQLITE_LIMIT_ATTACHED, 0},
      {SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 10'000},
      {SQLITE_LIMIT_VARIABLE_NUMBER, 32'766},
      {SQLITE_LIMIT_TRIGGER_DEPTH, 32},
      {SQLITE_LIMIT_WORKER_THREADS, 0},
  };
  for (const auto& [limit, value] : kLimits) {
    sqlite3_limit(db, limit, value);
    SYNOD_CHECK_EQ(sqlite3_limit(db, limit, -1), value) << "SQLite limit " << limit;
  }
}

GuardedFunctions::GuardedFunctions() {
  int rc =
      sqlite3_open_v2(":memory:", &builtins_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, nullptr);
  SYNOD_CHECK_EQ(rc, SQLITE_OK) << "cannot open an in-memory database";
  ApplySqliteLimits(builtins_);
}

GuardedFunctions::~GuardedFunctions() {
  for (auto& [key, stmt] : calls_) sqlite3_finalize(stmt);
  SYNOD_CHECK_EQ(sqlite3_close(builtins_), SQLITE_OK);
}

void GuardedFunctions::InstallOn(sqlite3* db) {
  constexpr int kFlags = SQLITE_UTF8 | SQLITE_DETERMINISTIC | SQLITE_INNOCUOUS;
  using Function = void (*)(sqlite3_context*, int, sqlite3_value**);
  const std::tuple<const char*, int, Function> kGuarded[] = {
      {"like", 2, &GuardedLike},
      {"like", 3, &GuardedLike},
      {"glob", 2, &GuardedGlob},
      {"instr", 2, &GuardedInstr},
      {"replace", 3, &GuardedReplace},
      {"trim", 2, &GuardedTrim<kTrim>},
      {"ltrim", 2, &GuardedTrim<kLtrim>},
      {"rtrim", 2, &GuardedTrim<kRtrim>},
      {"printf", -1, &GuardedPrintf<kPrintf>},
      {"format", -1, &GuardedPrintf<kFormat>},
      {"zeroblob", 1, &GuardedZeroblob},
  };
  for (const auto& [name, argc, function] : kGuarded) {
    SYNOD_CHECK_EQ(sqlite3_create_function_v2(db, name, argc, kFlags, this, function, nullptr,
                                              nullptr, nullptr),
                   SQLITE_OK)
        << name;
  }
}

void GuardedFunctions::CallBuiltin(sqlite3_context* context, const char* name, int argc,
                                   sqlite3_value** argv) {
  sqlite3_stmt*& stmt = calls_[{name, argc}];
  if (stmt == nullptr) {
    // Prepared once per connection, so whether this request or an earlier one pays for it
    // depends on the replica's history: never charged.
    ScopedUncharged uncharged;
    std::string sql = absl::StrCat("SELECT ", name, "(");
    for (int i = 1; i <= argc; ++i) absl::StrAppend(&sql, i > 1 ? ", ?" : "?", i);
    sql += ")";
    int rc =
        sqlite3_prepare_v3(builtins_, sql.c_str(), -1, SQLITE_PREPARE_PERSISTENT, &stmt, nullptr);
    if (rc != SQLITE_OK) {  // e.g. too many arguments: SQLite's own message
      sqlite3_result_error(context, sqlite3_errmsg(builtins_), -1);
      sqlite3_result_error_code(context, rc);
      calls_.erase({name, argc});
      return;
    }
  }
  for (int i = 0; i < argc; ++i) sqlite3_bind_value(stmt, i + 1, argv[i]);
  int rc = sqlite3_step(stmt);
  if (rc == SQLITE_ROW) {
    sqlite3_result_value(context, sqlite3_column_value(stmt, 0));
  } else if (rc == SQLITE_TOOBIG) {
    sqlite3_result_error_toobig(context);
  } else if (rc == SQLITE_NOMEM) {
    sqlite3_result_error_nomem(context);
  } else {
    sqlite3_result_error(context, sqlite3_errmsg(builtins_), -1);
    sqlite3_result_error_code(context, rc == SQLITE_DONE ? SQLITE_ERROR : rc);
  }
  sqlite3_reset(stmt);
  sqlite3_clear_bindings(stmt);
}

}  // namespace synod

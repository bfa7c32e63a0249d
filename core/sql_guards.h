#ifndef SYNOD_CORE_SQL_GUARDS_H_
#define SYNOD_CORE_SQL_GUARDS_H_

// Deterministic bounds on what one user request may cost, so that no SQL a client can send
// freezes or exhausts a replica, and every replica stops the same request at the same point.
//
// A request gets one WorkBudget, shared by all of its statements. Three things draw on it,
// each a function of the statement and the data alone (never of timing, caches or history):
//  - SQLite virtual-machine steps, counted by a progress handler (1 unit per step);
//  - the built-in functions whose cost is not linear in their input (LIKE, GLOB, instr,
//    replace, trim, printf), which are replaced by guarded versions that charge their
//    worst-case cost before running the built-in on a private connection;
//  - allocations: every allocation of at least kChargedAllocationBytes that SQLite makes
//    while a budget is active on the thread (sorter records, values, records) is charged its
//    size, cumulatively. The lookaside and the page cache's own allocations (which depend
//    on what a connection cached) are not;
//  - the pages of ephemeral tables (UNION, DISTINCT, materialized CTEs ...): every page a
//    page cache created while a budget is active adds is charged, with the allocations.
// Past the budget the statement fails RESOURCE_EXHAUSTED alike on every replica.
//
// SQLite's run-time limits (ApplySqliteLimits) are set identically on every connection.

#include <sqlite3.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <string>
#include <utility>

namespace synod {

// Most work units (about one SQLite step each) one request may use across its statements:
// about a tenth of a second of CPU here (measured: 50 million steps took 1.1 s). Every
// replica applies every request on its event loop, so this bounds how long one request
// can hold a replica's loop.
constexpr int64_t kMaxRequestWorkUnits = 5'000'000;
// Most bytes one request may obtain in allocations of at least kChargedAllocationBytes,
// counted cumulatively (a freed and reallocated buffer counts again): room for a 3 MiB
// value bound, copied into a record and written.
constexpr int64_t kMaxRequestLargeAllocationBytes = 32 << 20;
// The smallest allocation charged: above SQLite's lookaside slots (1200 bytes), which serve
// smaller allocations or not depending on what the connection holds. The page cache's own
// allocations are never charged by size (its bulk allocation and its hash table depend on
// what a connection has cached), only per page of an ephemeral table.
constexpr int64_t kChargedAllocationBytes = 2 << 10;
// Costly work is rationed across the whole group. Every replica applies every write on its
// event loop, one after another; a stream of budget-spending writes, even one per log
// entry, would queue every other write behind it. So a write may always use an allowance
// of work units that grows with its own size (what an ordinary write of that many bytes
// needs); what it uses beyond that comes from a ration the group shares, which refills at
// a fixed rate in the requests' own (replicated) time, up to a cap. A write that needs
// more than its allowance while the ration is spent fails RESOURCE_EXHAUSTED (429, retry
// later), alike on every replica; cheap writes never wait for it. The ration is replicated
// state (stored and hashed with the revision), so it is the same on every replica.
//
// Only work units draw on it: they are exactly the same on every replica. (Allocation sizes
// are not, quite: a connection's lazily built caches, such as a full-text index's, are
// allocated by whichever request first needs them, and a restarted replica's connection
// builds them again. At the request's own limit that matters only at the boundary; a
// shared ration would carry the difference into every later request.) Functions that make
// large values from small arguments (randomblob, zeroblob) charge work by size for that
// reason.
constexpr int64_t kAllowanceWorkUnits = 10'000;
constexpr int64_t kAllowanceWorkUnitsPerByte = 4;
// Refill per second of request time, and cap: one request's whole budget per second, and
// two in a burst.
constexpr int64_t kCostlyWorkUnitsPerSecond = kMaxRequestWorkUnits;
constexpr int64_t kMaxCostlyWorkUnits = 2 * kMaxRequestWorkUnits;
// Work charged per byte of a value made by randomblob() or zeroblob(): about what copying
// and generating it costs next to a VM step.
constexpr int64_t kValueBytesPerWorkUnit = 16;
// Largest string or blob value (SQLITE_LIMIT_LENGTH).
constexpr int kMaxValueBytes = 16 << 20;
// Largest SQL text of one statement (SQLITE_LIMIT_SQL_LENGTH).
constexpr int kMaxSqlBytes = 1 << 20;
// Largest width or precision in printf()/format().
constexpr int64_t kMaxPrintfWidth = kMaxValueBytes;

// The work and memory a request may still use. Not thread-safe: one thread charges it.
class WorkBudget {
 public:
  WorkBudget(int64_t max_work_units = kMaxRequestWorkUnits,
             int64_t max_large_allocation_bytes = kMaxRequestLargeAllocationBytes)
      : work_units_left_(max_work_units),
        max_work_units_(max_work_units),
        allocation_bytes_left_(max_large_allocation_bytes),
        max_allocation_bytes_(max_large_allocation_bytes) {}

  // Charge `units` of work / `bytes` of large allocations. False once the budget is spent;
  // it stays spent.
  bool ChargeWork(int64_t units);
  bool ChargeAllocation(int64_t bytes);

  bool exhausted() const { return work_exhausted() || allocation_bytes_left_ < 0; }
  bool work_exhausted() const { return work_units_left_ < 0; }
  // A flag another thread may set to stop the work (a read past its deadline): checked
  // every thousand steps, when it stops the statement with SQLITE_INTERRUPT. Reads only:
  // replicated work never has one. REQUIRES: `cancelled` outlives the budget's use.
  void set_cancel_flag(const std::atomic<bool>* cancelled) { cancelled_ = cancelled; }
  bool cancelled() const { return cancelled_ != nullptr && cancelled_->load(); }
  // Why the budget is spent, for the error message. REQUIRES: exhausted().
  std::string Reason() const;
  int64_t work_units_used() const { return max_work_units_ - work_units_left_; }
  int64_t max_work_units() const { return max_work_units_; }

 private:
  int64_t work_units_left_;
  const int64_t max_work_units_;
  int64_t allocation_bytes_left_;
  const int64_t max_allocation_bytes_;
  const std::atomic<bool>* cancelled_ = nullptr;
};

// While this lives, the calling thread's large SQLite allocations and guarded-function costs
// are charged to `budget` (nesting restores the outer one). REQUIRES: `budget` outlives this.
class ScopedWorkBudget {
 public:
  explicit ScopedWorkBudget(WorkBudget* budget);
  ~ScopedWorkBudget();
  ScopedWorkBudget(const ScopedWorkBudget&) = delete;
  ScopedWorkBudget& operator=(const ScopedWorkBudget&) = delete;

 private:
  WorkBudget* outer_;
};

// The budget active on this thread, or nullptr.
WorkBudget* ActiveWorkBudget();

// Charges the active budget (if any) for making a value of `bytes` bytes; false, with the
// budget's error set on `context`, when it is spent.
bool ChargeValueBytes(sqlite3_context* context, int64_t bytes);

// Sets SQLite's run-time limits on `db`, the same on every replica: value length, SQL length,
// expression depth, compound SELECT terms, VDBE program size, LIKE pattern length, trigger
// depth, attached databases (none) and worker threads (none). docs/api.md lists them.
void ApplySqliteLimits(sqlite3* db);

// The guarded LIKE, GLOB, instr, replace, trim, ltrim, rtrim, printf and format: each charges
// its worst-case cost to the active budget (and refuses printf widths above
// kMaxPrintfWidth), then computes the built-in's result on a private connection, so results
// are exactly SQLite's. zeroblob charges its size (kValueBytesPerWorkUnit). (A LIKE that is not
// SQLite's own cannot use an index: the price of a bounded cost.) One object per thread of use.
class GuardedFunctions {
 public:
  GuardedFunctions();
  ~GuardedFunctions();
  GuardedFunctions(const GuardedFunctions&) = delete;
  GuardedFunctions& operator=(const GuardedFunctions&) = delete;

  // Overrides the functions on `db`. REQUIRES: this outlives db; db is used on one thread.
  void InstallOn(sqlite3* db);

  // Runs the built-in `name` on `argc` values and sets the result on `context`.
  void CallBuiltin(sqlite3_context* context, const char* name, int argc, sqlite3_value** argv);

 private:
  sqlite3* builtins_ = nullptr;  // a private in-memory connection with SQLite's own functions
  std::map<std::pair<std::string, int>, sqlite3_stmt*> calls_;  // "SELECT name(?1, ...)"
};

}  // namespace synod

#endif  // SYNOD_CORE_SQL_GUARDS_H_

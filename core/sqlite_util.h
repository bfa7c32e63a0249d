#ifndef SYNOD_CORE_SQLITE_UTIL_H_
#define SYNOD_CORE_SQLITE_UTIL_H_

// SQLite helpers for the apply state machine: handles that close themselves, internal SQL
// that must succeed, user statements run under the replication policy, database images,
// and a hash of a database's logical content.

#include <sqlite3.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/sql_guards.h"
#include "core/stable_hash.h"
#include "core/synod.pb.h"
#include "core/utf8.h"

namespace synod {

struct CloseDb {
  void operator()(sqlite3* db) const;
};
struct FinalizeStmt {
  void operator()(sqlite3_stmt* stmt) const { sqlite3_finalize(stmt); }
};
using Db = std::unique_ptr<sqlite3, CloseDb>;
using Stmt = std::unique_ptr<sqlite3_stmt, FinalizeStmt>;

// Every database the state machine keeps uses this page size (SQLite's default), so that
// images copy between databases whatever the journal mode of the destination.
constexpr int kPageSizeBytes = 4096;

// Largest result one statement may return, counted roughly (value bytes plus a per-value
// overhead). Results are stored in the session table, so they must stay small.
constexpr size_t kMaxStatementResultBytes = 4 << 20;

// Internal SQL: the state machine's own statements on its own tables. Failing is a broken
// invariant (or a failing disk), never a result, so these SYNOD_CHECK instead of returning.
void MustExec(sqlite3* db, const char* sql);
Stmt MustPrepare(sqlite3* db, std::string_view sql);
// Steps `stmt`: true for a row, false when done.
bool MustStep(sqlite3_stmt* stmt);
void MustBindBlob(sqlite3_stmt* stmt, int index, std::string_view blob);
void MustBindText(sqlite3_stmt* stmt, int index, std::string_view text);
void MustBindInt64(sqlite3_stmt* stmt, int index, int64_t value);
std::string ColumnString(sqlite3_stmt* stmt, int column);

// The state machine's own statements, prepared once per connection and kept: applying an
// entry runs the same dozen statements again and again, and parsing them was a tenth of
// the simulator's time. Get() hands a statement out reset and unbound; its Lease resets it
// again when it goes, so that no kept statement holds a transaction open between uses.
// Failing to prepare is a broken invariant (SYNOD_CHECK), as for MustPrepare.
// Clear() every statement of a connection before the connection closes (CloseDb checks).
class StatementCache {
 public:
  class Lease {
   public:
    explicit Lease(sqlite3_stmt* stmt) : stmt_(stmt) {}
    Lease(Lease&& other) noexcept : stmt_(other.stmt_) { other.stmt_ = nullptr; }
    Lease& operator=(Lease&&) = delete;
    ~Lease() { reset(); }
    sqlite3_stmt* get() const { return stmt_; }
    // Ends this use early (before a COMMIT that a pending statement would block).
    void reset();

   private:
    sqlite3_stmt* stmt_;
  };

  // `sql` is one statement; kept by its text and connection.
  Lease Get(sqlite3* db, const char* sql);
  // Runs one statement that returns no rows (BEGIN, COMMIT, ...).
  void Exec(sqlite3* db, const char* sql);
  void Clear() { statements_.clear(); }

 private:
  struct Entry {
    std::string sql;
    Stmt stmt;
  };
  // By connection and the address of the text; the text is compared too, so a key whose
  // address was reused for other text prepares again rather than running the wrong one.
  std::map<std::pair<sqlite3*, const char*>, Entry> statements_;
};

// Sets up a handle for replicated use: defensive mode, foreign keys enforced, temporary
// tables and sorts in memory. Every handle of the state machine gets the same settings, so
// the same statement behaves the same on every replica and after a restart.
void ConfigureConnection(sqlite3* db);

// A private in-memory database (no VFS I/O), configured like the others.
Db OpenScratch();

// A reader connection's prepared user statements, by their text: the most recent
// kCapacity. Only for reads, which no replica's state depends on (an Execute prepares its
// statements afresh: SQLite may charge preparing to the budget, and what a replica happened
// to keep must not change what a request is charged). Destroy it before its connection.
class QueryCache {
 public:
  static constexpr size_t kCapacity = 16;
  // Longer statements are not kept: the cache's memory stays small (a long statement can
  // compile to a large program).
  static constexpr size_t kMaxSqlBytes = 4096;
  // The statement prepared for `sql`, taken out of the cache; null if there is none.
  Stmt Take(std::string_view sql);
  // Keeps `stmt` (reset, bindings cleared) for `sql`, dropping the least recently used; a
  // statement longer than kMaxSqlBytes is finalized instead.
  void Put(std::string_view sql, Stmt stmt);

 private:
  std::vector<std::pair<std::string, Stmt>> entries_;  // least recently used first
};

// Whether `sql` is an ANALYZE statement (the only statement that writes the statistics
// SQLite keeps in memory with the schema).
bool IsAnalyze(std::string_view sql);

// Runs one user statement under the replication policy (see sqlite_util.cc), charging its
// work to `budget` (core/sql_guards.h; shared by a request's statements). Errors are
// InvalidArgument (SQLite rejected it), PermissionDenied (the policy rejected it),
// ResourceExhausted (result too large, budget spent), FailedPrecondition (the database's
// content is damaged) — all deterministic — DeadlineExceeded (sqlite3_interrupt from
// another thread: reads only) or Internal (the environment failed: I/O, locks; not the same
// on every replica). With `read_only`, statements that could write are rejected.
// A read may pass its connection's `cache`.
absl::StatusOr<StatementResult> RunUserStatement(sqlite3* db, const Statement& statement,
                                                 bool read_only, WorkBudget* budget,
                                                 QueryCache* cache = nullptr);

// Checks `statement` against the policy as far as possible without the real schema: `db` is
// a scratch database holding the state machine's own tables. Returns PermissionDenied for a
// statement the policy rejects, OK otherwise (SQL errors are left to apply time).
absl::Status CheckStatementPolicy(sqlite3* db, const Statement& statement);

// Loads a .sqlite3 file image into a scratch database, checking that it is one (header,
// page size kPageSizeBytes, PRAGMA integrity_check, virtual tables). A WAL-mode image is
// read in rollback mode: an uploaded image has no -wal file beside it. InvalidArgument if it
// is not a valid image.
absl::StatusOr<Db> LoadImage(std::string_view image);

// The pieces of LoadImage, for an image read from a file in pieces: the first
// kImageHeaderBytes bytes are an SQLite header of a supported page size and format
// (InvalidArgument if not); NormalizeImageHeader marks a WAL-mode image as a rollback one
// (in place); CheckImageContent checks the database opened from the image (integrity,
// virtual tables).
inline constexpr size_t kImageHeaderBytes = 100;
absl::Status CheckImageHeader(std::string_view header);
void NormalizeImageHeader(char* header);
absl::Status CheckImageContent(sqlite3* db);

// The single integer `sql` returns from `db`, if it returns exactly that.
std::optional<int64_t> SingleInteger(sqlite3* db, const char* sql);

// The size of `db`'s main database file, as its transaction (if one is open) sees it: its
// page count times its page size. DataLoss when SQLite cannot read them (a file damaged on
// this replica's disk).
absl::StatusOr<uint64_t> FileBytes(sqlite3* db);

// Replaces the content of `to` with that of `from`. REQUIRES: same page size.
void CopyDatabase(sqlite3* from, sqlite3* to);

// The database file image of `db`'s main database. ResourceExhausted for an image SQLite
// cannot hold in memory (2 GiB or more).
absl::StatusOr<std::string> SerializeDatabase(sqlite3* db);

// PermissionDenied if `db`'s schema has what a replicated database may not: a TEMP object, an
// object named _synod_* other than the state machine's _synod_meta table, an object on a
// _synod_ table, a foreign key to one, or a virtual table a snapshot could not carry (a
// module other than fts3/4/5 and rtree, or a full-text table with a content= option).
absl::Status CheckUserSchema(sqlite3* db);

// Hashes one connection's database, keeping what it prepares while the schema stays the same
// (kept across calls, for a hash taken every few entries). Holds statements on the
// connection: destroy it before the connection is closed.
class DatabaseHasher {
 public:
  explicit DatabaseHasher(sqlite3* db) : db_(db) {}
  // Adds the database's logical content to `hash`: its schema and every row of every table,
  // in an order that depends only on the content (not on pages or on insertion history). The
  // rows of `skipped_table`, if given, are left out (the caller hashes what of them it means
  // to).
  void Hash(StableHash* hash, std::string_view skipped_table = {});

 private:
  struct Table {
    std::string name{};
    Stmt rows{};  // every row, in the order of all its columns (the rowid first if it has one)
    int columns = 0;
    std::string error{};  // why `rows` could not be prepared (a damaged table)
  };
  void Prepare(std::string_view skipped_table);

  sqlite3* db_;
  Stmt version_;  // PRAGMA schema_version
  int64_t prepared_version_ = -1;
  std::string prepared_skipped_;
  Stmt schema_;
  std::vector<Table> tables_;
};

}  // namespace synod

#endif  // SYNOD_CORE_SQLITE_UTIL_H_

#include "core/sqlite_util.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/sql_guards.h"

namespace synod {
namespace {

// Debian's Abseil has its own string_view type (see TOOLCHAIN.md).
absl::string_view ToAbsl(std::string_view text) { return {text.data(), text.size()}; }

// `sql` without its leading whitespace, empty statements (';') and comments.
std::string_view SkipBlank(std::string_view sql) {
  size_t i = 0;
  while (i < sql.size()) {
    if (absl::ascii_isspace(static_cast<unsigned char>(sql[i])) || sql[i] == ';') {
      ++i;
    } else if (sql.substr(i, 2) == "--") {
      i = sql.find('\n', i);
      if (i == std::string_view::npos) return {};
    } else if (sql.substr(i, 2) == "/*") {
      i = sql.find("*/", i + 2);
      if (i == std::string_view::npos) return {};  // SQLite ends the comment at the end too
      i += 2;
    } else {
      break;
    }
  }
  return sql.substr(i);
}

std::string_view FirstWord(std::string_view sql) {
  size_t end = 0;
  while (end < sql.size() && absl::ascii_isalpha(static_cast<unsigned char>(sql[end]))) ++end;
  return sql.substr(0, end);
}

bool IsReserved(const char* name) {
  return name != nullptr && absl::StartsWithIgnoreCase(name, "_synod_");
}

bool IsOneOf(const char* name, std::initializer_list<const char*> names) {
  return name != nullptr && std::any_of(names.begin(), names.end(), [name](const char* n) {
           return absl::EqualsIgnoreCase(name, n);
         });
}

// PRAGMAs replicate only if they read the schema or set a value stored in the database file.
// Any other PRAGMA changes the connection (which a restarted replica would not have) or the
// way data reaches the disk (which the server alone controls).
std::optional<std::string> PragmaRejection(const char* pragma, const char* value) {
  // Reading the page size is what FTS3/4 does when it opens a table; it is 4096 everywhere.
  if (value == nullptr && IsOneOf(pragma, {"page_size"})) return std::nullopt;
  if (IsOneOf(pragma, {"application_id", "foreign_key_check", "foreign_key_list", "freelist_count",
                       "index_info", "index_list", "index_xinfo", "integrity_check", "page_count",
                       "quick_check", "table_info", "table_list", "table_xinfo", "user_version"})) {
    return std::nullopt;
  }
  if (IsOneOf(pragma, {"cache_spill", "checkpoint_fullfsync", "data_store_directory", "fullfsync",
                       "journal_mode", "journal_size_limit", "locking_mode", "mmap_size",
                       "synchronous", "temp_store", "temp_store_directory", "wal_autocheckpoint",
                       "wal_checkpoint", "writable_schema"})) {
    return absl::StrCat("PRAGMA ", pragma,
                        " is not allowed: the server controls journaling and durability");
  }
  return absl::StrCat("PRAGMA ", pragma,
                      " is not allowed: only PRAGMAs that read the schema or set user_version "
                      "or application_id are replicated");
}

// Why the policy rejects an action SQLite asks to authorize, or nullopt if it allows it.
// `analyzing`: the statement is an ANALYZE, whose own writes to the statistics tables are
// fine (and which may read the server's tables to count their rows).
std::optional<std::string> Rejection(int action, const char* arg1, const char* arg2,
                                     bool analyzing) {
  if (action == SQLITE_ANALYZE) return std::nullopt;  // reads a table's rows, writes statistics
  if (IsReserved(arg1) || IsReserved(arg2)) {
    return "names starting with _synod_ belong to the server and cannot be used";
  }
  switch (action) {
    case SQLITE_ATTACH:  // VACUUM INTO attaches its target too
    case SQLITE_DETACH:
      return "ATTACH, DETACH and VACUUM INTO are not allowed: a statement only sees its own "
             "database";
    case SQLITE_TRANSACTION:
    case SQLITE_SAVEPOINT:
      return "BEGIN, COMMIT, ROLLBACK and SAVEPOINT are not allowed: set Execute.transaction "
             "to apply statements all or nothing";
    case SQLITE_PRAGMA:  // also asked for pragma table-valued functions, at step time
      return PragmaRejection(arg1, arg2);
    case SQLITE_FUNCTION:
      if (IsOneOf(arg2, {"total_changes"})) {
        return "total_changes() is not allowed: it counts since the connection opened, which "
               "differs between replicas";
      }
      if (IsOneOf(arg2, {"fts3_tokenizer"})) {
        return "fts3_tokenizer() is not allowed: it exposes and accepts raw pointers";
      }
      if (IsOneOf(arg2, {"sqlite_version", "sqlite_source_id", "sqlite_compileoption_used",
                         "sqlite_compileoption_get"})) {
        return absl::StrCat(arg2,
                            "() is not allowed: it describes the build, which may differ "
                            "between replicas during an upgrade");
      }
      return std::nullopt;
    // TEMP objects live on one connection only: they vanish on restart and snapshot
    // restore, so replicas would diverge.
    case SQLITE_CREATE_TEMP_INDEX:
    case SQLITE_CREATE_TEMP_TABLE:
    case SQLITE_CREATE_TEMP_TRIGGER:
    case SQLITE_CREATE_TEMP_VIEW:
      return "TEMP tables, views, triggers and indexes are not allowed: they are not replicated";
    case SQLITE_READ:
      if (IsOneOf(arg1, {"sqlite_stmt", "dbstat"})) {
        return absl::StrCat(arg1, " is not allowed: it shows this connection's memory and pages");
      }
      return std::nullopt;
    case SQLITE_INSERT:
    case SQLITE_UPDATE:
    case SQLITE_DELETE:
      // The planner reads statistics when a connection opens: written by hand, they would
      // change plans on restarted replicas only. ANALYZE keeps them consistent.
      if (IsOneOf(arg1, {"sqlite_stat1", "sqlite_stat4"}) && !analyzing) {
        return "writing sqlite_stat tables is not allowed: use ANALYZE";
      }
      return std::nullopt;
    default:
      return std::nullopt;
  }
}

// Applies the policy and the request's work budget to what `db` prepares and steps while
// this lives (one user statement), and remembers why it stopped one, so the error can say so.
class StatementScope {
 public:
  StatementScope(sqlite3* db, WorkBudget* budget) : db_(db), budget_(budget), outer_(active_scope) {
    // The policy lives in the authorizer that ConfigureConnection installs for good (setting
    // an authorizer expires every statement prepared on the connection, so installing one
    // per user statement made the state machine's cached statements prepare again each time).
    int defensive = 0;
    SYNOD_CHECK_EQ(sqlite3_db_config(db_, SQLITE_DBCONFIG_DEFENSIVE, -1, &defensive), SQLITE_OK);
    SYNOD_CHECK_EQ(defensive, 1) << "a user statement on a connection ConfigureConnection did "
                                    "not set up would run without the policy";
    // A connection that has not read its schema yet (a restarted replica's, or one whose
    // schema change was rolled back) reads it now, outside the budget: what a statement is
    // charged must not depend on the cache. (This reads the schema if needed and costs
    // nothing otherwise; only the writer changes a schema, so its own is never out of date.)
    sqlite3_table_column_metadata(db_, "main", "sqlite_master", nullptr, nullptr, nullptr, nullptr,
                                  nullptr, nullptr);
    // SQLite calls the progress handler at multiples of each statement's own step count,
    // which survives sqlite3_reset. A full-text index keeps statements prepared on the
    // connection across requests (a restarted replica prepares them afresh): counted from
    // zero for every user statement, they make the same calls on every replica.
    for (sqlite3_stmt* kept = sqlite3_next_stmt(db_, nullptr); kept != nullptr;
         kept = sqlite3_next_stmt(db_, kept)) {
      sqlite3_stmt_status(kept, SQLITE_STMTSTATUS_VM_STEP, /*resetFlg=*/1);
    }
    charging_.emplace(budget_);
    active_scope = this;
    sqlite3_progress_handler(db_, kVmStepsPerProgressCall, &StatementScope::Progress, this);
  }
  ~StatementScope() {
    sqlite3_progress_handler(db_, 0, nullptr, nullptr);
    active_scope = outer_;
  }
  StatementScope(const StatementScope&) = delete;
  StatementScope& operator=(const StatementScope&) = delete;

  // The status for a failed prepare or step that returned `rc`.
  absl::Status Error(int rc) const {
    if (!rejection_.empty()) return absl::PermissionDeniedError(rejection_);
    if (budget_->exhausted()) return absl::ResourceExhaustedError(budget_->Reason());
    // These depend only on the statement and the data, so every replica fails alike.
    // Anything else (I/O, locks) depends on the machine.
    switch (rc & 0xff) {
      case SQLITE_ERROR:
      case SQLITE_CONSTRAINT:
      case SQLITE_MISMATCH:
      case SQLITE_TOOBIG:
      case SQLITE_RANGE:
      // AUTOINCREMENT past the largest rowid, or max_page_count reached. (A disk that is
      // really full would also say so; the server keeps its disk from filling up rather than
      // stop every replica on a statement that fails alike everywhere.)
      case SQLITE_FULL:
        return absl::InvalidArgumentError(ValidUtf8(sqlite3_errmsg(db_)));
      // Damage SQLite finds in a database's content: every replica holds the same bytes
      // (uploads are verified, and shadow tables are read-only to SQL), so it finds the
      // same damage. A replica whose own disk damaged its copy differs from the others in
      // its state hash, which the divergence check catches.
      case SQLITE_CORRUPT:
      case SQLITE_NOTADB:
        return absl::FailedPreconditionError(
            absl::StrCat("the database is damaged: ", ValidUtf8(sqlite3_errmsg(db_))));
      // The budget refuses an allocation alike everywhere; a real shortage of memory is
      // answered the same way rather than stopping the replica.
      case SQLITE_NOMEM:
        return absl::ResourceExhaustedError("out of memory for the statement");
      case SQLITE_INTERRUPT:
        return absl::DeadlineExceededError("the statement was interrupted: it ran out of time");
      default:
        return absl::InternalError(absl::StrCat("SQLite failed (", sqlite3_errstr(rc),
                                                "): ", ValidUtf8(sqlite3_errmsg(db_))));
    }
  }

  // The statement is an ANALYZE: SQLite writes the statistics tables through statements it
  // prepares inside it (before it asks about the ANALYZE itself), which the policy allows.
  void set_analyzing(bool analyzing) { analyzing_ = analyzing; }

  // Installed on every connection by ConfigureConnection, with the connection as `db`. It
  // judges only what a user statement prepares: the state machine's own statements pass.
  static int Authorize(void* db, int action, const char* arg1, const char* arg2,
                       const char* database, const char* /*trigger*/) {
    StatementScope* self = active_scope;
    if (self == nullptr || self->db_ != db) return SQLITE_OK;
    std::optional<std::string> rejection = Rejection(action, arg1, arg2, self->analyzing_);
    // PRAGMA temp.user_version and the like: the temp schema lives in the connection, which
    // a restarted replica does not have.
    if (!rejection.has_value() && action == SQLITE_PRAGMA && database != nullptr &&
        !absl::EqualsIgnoreCase(database, "main")) {
      rejection = absl::StrCat("PRAGMA ", database, ".", arg1,
                               " is not allowed: only the main database is replicated");
    }
    if (!rejection.has_value()) return SQLITE_OK;
    // The message may quote names from the statement, which need not be UTF-8.
    if (self->rejection_.empty()) self->rejection_ = ValidUtf8(*rejection);
    return SQLITE_DENY;
  }

 private:
  // Called every kVmStepsPerProgressCall steps; a non-zero return interrupts the statement.
  static int Progress(void* scope) {
    auto* self = static_cast<StatementScope*>(scope);
    return self->budget_->ChargeWork(kVmStepsPerProgressCall) && !self->budget_->cancelled() ? 0
                                                                                             : 1;
  }

  static constexpr int kVmStepsPerProgressCall = 1000;

  // The innermost scope of this thread (a guarded function may run a statement on another
  // connection while a user statement runs).
  static thread_local StatementScope* active_scope;

  sqlite3* db_;
  WorkBudget* budget_;
  StatementScope* outer_;
  std::optional<ScopedWorkBudget> charging_;
  std::string rejection_;
  bool analyzing_ = false;
};

thread_local StatementScope* StatementScope::active_scope = nullptr;

absl::Status CheckParameterCount(sqlite3_stmt* stmt, const Statement& statement) {
  int parameters = sqlite3_bind_parameter_count(stmt);
  if (parameters == statement.params_size()) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat("the statement has ", parameters,
                                                  " parameters but ", statement.params_size(),
                                                  " values were given"));
}

// Prepares the single statement in `statement`, checking what the policy can check before
// running it.
absl::StatusOr<Stmt> PrepareUnderPolicy(sqlite3* db, const Statement& statement,
                                        StatementScope& scope) {
  std::string_view sql = SkipBlank(statement.sql());
  if (sql.empty()) return absl::PermissionDeniedError("empty SQL statement");
  if (absl::EqualsIgnoreCase(ToAbsl(FirstWord(sql)), "VACUUM")) {
    return absl::PermissionDeniedError(
        "VACUUM is not allowed: it cannot run in a transaction, and VACUUM INTO writes files");
  }
  scope.set_analyzing(IsAnalyze(statement.sql()));
  sqlite3_stmt* raw = nullptr;
  const char* tail = nullptr;
  int rc = sqlite3_prepare_v3(db, sql.data(), static_cast<int>(sql.size()), 0, &raw, &tail);
  Stmt stmt(raw);
  if (rc != SQLITE_OK) return scope.Error(rc);
  if (stmt == nullptr) return absl::PermissionDeniedError("empty SQL statement");
  if (!SkipBlank(sql.substr(tail - sql.data())).empty()) {
    return absl::PermissionDeniedError(
        "a Statement holds one SQL statement; send several Statements instead");
  }
  if (absl::Status counted = CheckParameterCount(stmt.get(), statement); !counted.ok()) {
    return counted;
  }
  return stmt;
}

int Bind(sqlite3_stmt* stmt, int index, const SqlValue& value) {
  switch (value.kind_case()) {
    case SqlValue::kInteger:
      return sqlite3_bind_int64(stmt, index, value.integer());
    case SqlValue::kReal:
      return sqlite3_bind_double(stmt, index, value.real());
    case SqlValue::kText:
      return sqlite3_bind_text64(stmt, index, value.text().data(), value.text().size(),
                                 SQLITE_TRANSIENT, SQLITE_UTF8);
    case SqlValue::kBlob:
      // data() is never null, so an empty blob binds as a blob, not as NULL.
      return sqlite3_bind_blob64(stmt, index, value.blob().data(), value.blob().size(),
                                 SQLITE_TRANSIENT);
    case SqlValue::kNull:
    case SqlValue::KIND_NOT_SET:
      return sqlite3_bind_null(stmt, index);
  }
  SYNOD_CHECK(false) << "unknown SqlValue kind " << value.kind_case();
  return SQLITE_MISUSE;
}

SqlValue ColumnValue(sqlite3_stmt* stmt, int column) {
  SqlValue value;
  switch (sqlite3_column_type(stmt, column)) {
    case SQLITE_INTEGER:
      value.set_integer(sqlite3_column_int64(stmt, column));
      break;
    case SQLITE_FLOAT:
      value.set_real(sqlite3_column_double(stmt, column));
      break;
    case SQLITE_TEXT: {
      // A proto3 string must be valid UTF-8 (or the result would not parse again), and SQLite
      // text need not be: such text comes back as the blob of its bytes.
      std::string text = ColumnString(stmt, column);
      if (IsValidUtf8(text)) {
        value.set_text(std::move(text));
      } else {
        value.set_blob(std::move(text));
      }
      break;
    }
    case SQLITE_BLOB: {
      const void* data = sqlite3_column_blob(stmt, column);
      value.set_blob(data == nullptr ? std::string()
                                     : std::string(static_cast<const char*>(data),
                                                   sqlite3_column_bytes(stmt, column)));
      break;
    }
    default:
      value.set_null(true);
  }
  return value;
}

size_t ApproximateSizeBytes(const SqlValue& value) {
  constexpr size_t kPerValueBytes = 16;
  return kPerValueBytes + value.text().size() + value.blob().size();
}

int PageSize(sqlite3* db) {
  Stmt stmt = MustPrepare(db, "PRAGMA page_size");
  SYNOD_CHECK(MustStep(stmt.get()));
  return sqlite3_column_int(stmt.get(), 0);
}

std::string QuoteIdentifier(std::string_view name) {
  std::string quoted = "\"";
  for (char c : name) {
    quoted += c;
    if (c == '"') quoted += '"';
  }
  return quoted + "\"";
}

void HashValue(sqlite3_stmt* stmt, int column, StableHash* hash) {
  int type = sqlite3_column_type(stmt, column);
  hash->AddU64(static_cast<uint64_t>(type));
  switch (type) {
    case SQLITE_INTEGER:
      hash->AddU64(static_cast<uint64_t>(sqlite3_column_int64(stmt, column)));
      break;
    case SQLITE_FLOAT:
      hash->AddU64(std::bit_cast<uint64_t>(sqlite3_column_double(stmt, column)));
      break;
    case SQLITE_TEXT:
    case SQLITE_BLOB: {
      const char* data = static_cast<const char*>(sqlite3_column_blob(stmt, column));
      hash->AddField(std::string_view(data == nullptr ? "" : data,
                                      static_cast<size_t>(sqlite3_column_bytes(stmt, column))));
      break;
    }
    default:
      break;
  }
}

// Every row of `table`, ordered by all of its columns (with the rowid first where it has
// one), so that the order is a property of the rows alone. A table that cannot be read (say,
// an uploaded one using a collation or function this server lacks) adds SQLite's error,
// which is the same on every replica.
// The module of a CREATE VIRTUAL TABLE statement as SQLite stores it ("CREATE VIRTUAL
// TABLE name USING module(...)"), lower-cased, or "" if it cannot be read.
std::string VirtualTableModule(std::string_view sql) {
  constexpr std::string_view kPrefix = "CREATE VIRTUAL TABLE";
  if (!absl::StartsWithIgnoreCase(ToAbsl(sql), ToAbsl(kPrefix))) return "";
  size_t i = kPrefix.size();
  auto skip_space = [&] {
    while (i < sql.size() && absl::ascii_isspace(static_cast<unsigned char>(sql[i]))) ++i;
  };
  auto skip_name = [&] {
    skip_space();
    if (i >= sql.size()) return;
    char open = sql[i];
    char close = open == '[' ? ']' : open;
    if (open == '"' || open == '\'' || open == '`' || open == '[') {
      for (++i; i < sql.size(); ++i) {
        if (sql[i] != close) continue;
        if (close != ']' && i + 1 < sql.size() && sql[i + 1] == close) {
          ++i;  // a doubled quote inside the name
          continue;
        }
        ++i;
        return;
      }
      return;
    }
    while (i < sql.size() && (absl::ascii_isalnum(static_cast<unsigned char>(sql[i])) ||
                              sql[i] == '_' || static_cast<unsigned char>(sql[i]) >= 0x80)) {
      ++i;
    }
  };
  skip_name();
  skip_space();
  if (i < sql.size() && sql[i] == '.') {
    ++i;
    skip_name();
  }
  skip_space();
  if (!absl::StartsWithIgnoreCase(ToAbsl(sql.substr(i)), "USING")) return "";
  i += 5;
  skip_space();
  size_t start = i;
  while (i < sql.size() &&
         (absl::ascii_isalnum(static_cast<unsigned char>(sql[i])) || sql[i] == '_')) {
    ++i;
  }
  return absl::AsciiStrToLower(ToAbsl(sql.substr(start, i - start)));
}

// PRAGMA integrity_check does not look inside virtual tables: each module's own check runs
// here, and an image with a virtual table that cannot be checked is refused. A damaged
// full-text index would otherwise fail later statements with SQLITE_CORRUPT, and what a
// module caches per connection could make that failure differ between replicas.
bool IsCheckableModule(std::string_view module) {
  return module == "fts3" || module == "fts4" || module == "fts5" || module == "rtree" ||
         module == "rtree_i32";
}

// Whether the lower-cased CREATE VIRTUAL TABLE text `sql` passes a content= option.
bool HasContentOption(std::string_view sql) {
  for (size_t at = sql.find("content"); at != std::string_view::npos;
       at = sql.find("content", at + 1)) {
    size_t i = at + std::string_view("content").size();
    while (i < sql.size() && absl::ascii_isspace(static_cast<unsigned char>(sql[i]))) ++i;
    if (i < sql.size() && sql[i] == '=') return true;
  }
  return false;
}

absl::Status CheckVirtualTables(sqlite3* db) {
  Stmt tables = MustPrepare(db,
                            "SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND "
                            "sql LIKE 'CREATE VIRTUAL TABLE%' ORDER BY name");
  for (;;) {
    // An error here (a damaged schema, or the caller's progress handler interrupting) is
    // the image's verdict, not a reason to stop the process.
    const int step = sqlite3_step(tables.get());
    if (step == SQLITE_DONE) break;
    if (step != SQLITE_ROW) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot read the schema: ", ValidUtf8(sqlite3_errmsg(db))));
    }
    std::string name = ColumnString(tables.get(), 0);
    std::string module = VirtualTableModule(ColumnString(tables.get(), 1));
    std::string check;
    if (!IsCheckableModule(module)) {
      check.clear();
    } else if (module.starts_with("fts")) {
      check = absl::StrCat("INSERT INTO ", QuoteIdentifier(name), "(", QuoteIdentifier(name),
                           ") VALUES ('integrity-check')");
    } else {
      check = "SELECT rtreecheck(?1) = 'ok'";
    }
    if (check.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "virtual table ", ValidUtf8(QuoteIdentifier(name)), " uses module ",
          ValidUtf8(QuoteIdentifier(module)),
          ", which cannot be verified; only fts3, fts4, fts5 and rtree tables can be uploaded"));
    }
    sqlite3_stmt* raw = nullptr;
    int rc = sqlite3_prepare_v2(db, check.c_str(), -1, &raw, nullptr);
    Stmt stmt(raw);
    if (rc == SQLITE_OK && sqlite3_bind_parameter_count(stmt.get()) == 1) {
      rc = sqlite3_bind_text(stmt.get(), 1, name.c_str(), -1, SQLITE_TRANSIENT);
    }
    bool ok = false;
    if (rc == SQLITE_OK) {
      rc = sqlite3_step(stmt.get());
      ok = rc == SQLITE_DONE || (rc == SQLITE_ROW && sqlite3_column_int(stmt.get(), 0) == 1);
    }
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("corrupt SQLite database: virtual table ", ValidUtf8(QuoteIdentifier(name)),
                       " fails its integrity check: ", ValidUtf8(sqlite3_errmsg(db))));
    }
  }
  return absl::OkStatus();
}

}  // namespace

void CloseDb::operator()(sqlite3* db) const {
  int rc = sqlite3_close(db);
  SYNOD_CHECK_EQ(rc, SQLITE_OK) << "a statement is still open: " << sqlite3_errstr(rc);
}

void MustExec(sqlite3* db, const char* sql) {
  char* error = nullptr;
  int rc = sqlite3_exec(db, sql, nullptr, nullptr, &error);
  SYNOD_CHECK_EQ(rc, SQLITE_OK) << sql << ": " << (error != nullptr ? error : "");
}

Stmt MustPrepare(sqlite3* db, std::string_view sql) {
  sqlite3_stmt* raw = nullptr;
  int rc = sqlite3_prepare_v2(db, sql.data(), static_cast<int>(sql.size()), &raw, nullptr);
  SYNOD_CHECK_EQ(rc, SQLITE_OK) << sql << ": " << sqlite3_errmsg(db);
  SYNOD_CHECK(raw != nullptr) << "no statement in: " << sql;
  return Stmt(raw);
}

void StatementCache::Lease::reset() {
  if (stmt_ == nullptr) return;
  sqlite3_reset(stmt_);  // its error, if any, was the step's to report
  sqlite3_clear_bindings(stmt_);
  stmt_ = nullptr;
}

StatementCache::Lease StatementCache::Get(sqlite3* db, const char* sql) {
  Entry& entry = statements_[{db, sql}];
  if (entry.stmt == nullptr || entry.sql != sql) {
    sqlite3_stmt* raw = nullptr;
    const char* tail = nullptr;
    int rc = sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, &raw, &tail);
    SYNOD_CHECK_EQ(rc, SQLITE_OK) << sql << ": " << sqlite3_errmsg(db);
    SYNOD_CHECK(raw != nullptr) << "no statement in: " << sql;
    SYNOD_CHECK(tail == nullptr || *tail == '\0') << "more than one statement in: " << sql;
    entry.sql = sql;
    entry.stmt.reset(raw);
  }
  return Lease(entry.stmt.get());
}

void StatementCache::Exec(sqlite3* db, const char* sql) {
  Lease stmt = Get(db, sql);
  SYNOD_CHECK(!MustStep(stmt.get())) << sql << " returned a row";
}

bool MustStep(sqlite3_stmt* stmt) {
  int rc = sqlite3_step(stmt);
  SYNOD_CHECK(rc == SQLITE_ROW || rc == SQLITE_DONE)
      << sqlite3_sql(stmt) << ": " << sqlite3_errmsg(sqlite3_db_handle(stmt));
  return rc == SQLITE_ROW;
}

void MustBindBlob(sqlite3_stmt* stmt, int index, std::string_view blob) {
  SYNOD_CHECK_EQ(sqlite3_bind_blob64(stmt, index, blob.data(), blob.size(), SQLITE_TRANSIENT),
                 SQLITE_OK);
}

void MustBindText(sqlite3_stmt* stmt, int index, std::string_view text) {
  SYNOD_CHECK_EQ(
      sqlite3_bind_text64(stmt, index, text.data(), text.size(), SQLITE_TRANSIENT, SQLITE_UTF8),
      SQLITE_OK);
}

void MustBindInt64(sqlite3_stmt* stmt, int index, int64_t value) {
  SYNOD_CHECK_EQ(sqlite3_bind_int64(stmt, index, value), SQLITE_OK);
}

std::string ColumnString(sqlite3_stmt* stmt, int column) {
  const unsigned char* text = sqlite3_column_text(stmt, column);
  if (text == nullptr) return "";
  return std::string(reinterpret_cast<const char*>(text), sqlite3_column_bytes(stmt, column));
}

void ConfigureConnection(sqlite3* db) {
  int enabled = 0;
  SYNOD_CHECK_EQ(sqlite3_db_config(db, SQLITE_DBCONFIG_DEFENSIVE, 1, &enabled), SQLITE_OK);
  SYNOD_CHECK_EQ(enabled, 1);
  ApplySqliteLimits(db);
  SYNOD_CHECK_EQ(sqlite3_set_authorizer(db, &StatementScope::Authorize, db), SQLITE_OK);
  // The temp schema is opened now, outside any request's budget: opened lazily by a request
  // (reading sqlite_temp_master), its page cache would be charged to that request on a
  // fresh connection only (core/sql_guards.h).
  MustExec(db,
           "PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY; "
           "SELECT count(*) FROM temp.sqlite_master;");
}

Db OpenScratch() {
  sqlite3* raw = nullptr;
  int rc = sqlite3_open_v2(":memory:", &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr);
  Db db(raw);
  SYNOD_CHECK_EQ(rc, SQLITE_OK) << "cannot open an in-memory database";
  ConfigureConnection(db.get());
  return db;
}

bool IsAnalyze(std::string_view sql) {
  return absl::EqualsIgnoreCase(ToAbsl(FirstWord(SkipBlank(sql))), "ANALYZE");
}

Stmt QueryCache::Take(std::string_view sql) {
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (it->first != sql) continue;
    Stmt stmt = std::move(it->second);
    entries_.erase(it);
    return stmt;
  }
  return nullptr;
}

void QueryCache::Put(std::string_view sql, Stmt stmt) {
  if (sql.size() > kMaxSqlBytes) return;
  sqlite3_reset(stmt.get());
  sqlite3_clear_bindings(stmt.get());
  if (entries_.size() >= kCapacity) entries_.erase(entries_.begin());
  entries_.emplace_back(std::string(sql), std::move(stmt));
}

absl::StatusOr<StatementResult> RunUserStatement(sqlite3* db, const Statement& statement,
                                                 bool read_only, WorkBudget* budget,
                                                 QueryCache* cache) {
  StatementScope scope(db, budget);
  Stmt owned = cache != nullptr ? cache->Take(statement.sql()) : nullptr;
  if (owned != nullptr) {
    // It passed the policy when it was prepared (and SQLite asks the authorizer again if a
    // schema change makes it prepare again).
    if (absl::Status counted = CheckParameterCount(owned.get(), statement); !counted.ok()) {
      cache->Put(statement.sql(), std::move(owned));
      return counted;
    }
  } else {
    absl::StatusOr<Stmt> prepared = PrepareUnderPolicy(db, statement, scope);
    if (!prepared.ok()) return prepared.status();
    owned = *std::move(prepared);
  }
  sqlite3_stmt* stmt = owned.get();
  if (read_only && !sqlite3_stmt_readonly(stmt)) {
    return absl::PermissionDeniedError("a query must be read-only; use Execute to write");
  }
  // Back into the cache however the statement ends.
  struct GiveBack {
    QueryCache* cache;
    const std::string& sql;
    Stmt& stmt;
    ~GiveBack() {
      if (cache != nullptr) cache->Put(sql, std::move(stmt));
    }
  } give_back{cache, statement.sql(), owned};
  for (int i = 0; i < statement.params_size(); ++i) {
    int rc = Bind(stmt, i + 1, statement.params(i));
    if (rc != SQLITE_OK) return scope.Error(rc);
  }
  StatementResult result;
  int64_t changes_before = sqlite3_total_changes64(db);
  size_t result_bytes = 0;
  int columns = -1;
  for (;;) {
    int rc = sqlite3_step(stmt);
    // Named once it has run: a kept statement that a schema change made SQLite prepare
    // again (in its first step) may have other columns now ("SELECT *" after ADD COLUMN).
    if (columns < 0 && (rc == SQLITE_ROW || rc == SQLITE_DONE)) {
      columns = sqlite3_column_count(stmt);
      for (int i = 0; i < columns; ++i) {
        result.add_columns(ValidUtf8(sqlite3_column_name(stmt, i)));
      }
    }
    if (rc == SQLITE_DONE) break;
    if (rc != SQLITE_ROW) return scope.Error(rc);
    Row* row = result.add_rows();
    for (int i = 0; i < columns; ++i) {
      *row->add_values() = ColumnValue(stmt, i);
      result_bytes += ApproximateSizeBytes(row->values(i));
    }
    if (result_bytes > kMaxStatementResultBytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the result is larger than ", kMaxStatementResultBytes, " bytes"));
    }
  }
  // sqlite3_changes() keeps the count of the last statement that changed rows, so it is
  // read only if this one did (a SELECT or CREATE TABLE reports 0).
  if (sqlite3_total_changes64(db) != changes_before) {
    result.set_rows_affected(static_cast<uint64_t>(sqlite3_changes64(db)));
    result.set_last_insert_id(sqlite3_last_insert_rowid(db));
  }
  return result;
}

absl::Status CheckStatementPolicy(sqlite3* db, const Statement& statement) {
  WorkBudget budget;
  StatementScope scope(db, &budget);
  absl::StatusOr<Stmt> prepared = PrepareUnderPolicy(db, statement, scope);
  if (prepared.ok() || absl::IsPermissionDenied(prepared.status())) return prepared.status();
  return absl::OkStatus();
}

absl::Status CheckImageHeader(std::string_view header) {
  constexpr std::string_view kMagic("SQLite format 3\0", 16);
  if (header.size() < kImageHeaderBytes || header.substr(0, kMagic.size()) != kMagic) {
    return absl::InvalidArgumentError("not an SQLite database: the SQLite header is missing");
  }
  // Backup (CopyDatabase) cannot change the page size of an in-memory or WAL destination.
  // The header holds it big-endian at offset 16, with 1 meaning 65536.
  int page_size =
      static_cast<unsigned char>(header[16]) << 8 | static_cast<unsigned char>(header[17]);
  if (page_size != kPageSizeBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the database uses ", page_size == 1 ? 65536 : page_size, "-byte pages; only ",
        kPageSizeBytes, "-byte pages are supported (convert with PRAGMA page_size=", kPageSizeBytes,
        "; VACUUM;)"));
  }
  for (size_t offset : {18, 19}) {
    if (header[offset] != 1 && header[offset] != 2) {
      return absl::InvalidArgumentError(absl::StrCat("unsupported SQLite file format version ",
                                                     static_cast<int>(header[offset])));
    }
  }
  return absl::OkStatus();
}

void NormalizeImageHeader(char* header) {
  // Header bytes 18 and 19 are the file format versions for reading and writing: 1 means
  // rollback journal, 2 WAL; anything higher would leave the database read-only.
  for (size_t offset : {18, 19}) {
    if (header[offset] == 2) header[offset] = 1;
  }
}

absl::Status CheckImageContent(sqlite3* db) {
  sqlite3_stmt* raw = nullptr;
  // CHECK constraints are not judged here: this connection's random(), changes() and
  // last_insert_rowid() are not those of the writes that stored the rows, so a constraint
  // calling them could pass on one replica (or at one try) and fail on another. A
  // constraint binds the writes made after the image is installed.
  MustExec(db, "PRAGMA ignore_check_constraints = ON");
  // integrity_check, not quick_check: an index that disagrees with its table would
  // otherwise fail a later statement with SQLITE_CORRUPT on every replica.
  int rc = sqlite3_prepare_v2(db, "PRAGMA integrity_check", -1, &raw, nullptr);
  Stmt check(raw);
  if (rc == SQLITE_OK) rc = sqlite3_step(check.get());
  if (rc != SQLITE_ROW) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a valid SQLite database: ", ValidUtf8(sqlite3_errmsg(db))));
  }
  std::string verdict = ColumnString(check.get(), 0);
  if (verdict != "ok") {
    return absl::InvalidArgumentError(
        absl::StrCat("corrupt SQLite database: ", ValidUtf8(verdict)));
  }
  check.reset();
  return CheckVirtualTables(db);
}

absl::StatusOr<Db> LoadImage(std::string_view image) {
  if (absl::Status header = CheckImageHeader(image); !header.ok()) return header;
  Db scratch = OpenScratch();
  auto* copy = static_cast<unsigned char*>(sqlite3_malloc64(image.size()));
  SYNOD_CHECK(copy != nullptr) << "out of memory for an image of " << image.size() << " bytes";
  std::memcpy(copy, image.data(), image.size());
  NormalizeImageHeader(reinterpret_cast<char*>(copy));
  int rc = sqlite3_deserialize(scratch.get(), "main", copy, image.size(), image.size(),
                               SQLITE_DESERIALIZE_FREEONCLOSE | SQLITE_DESERIALIZE_RESIZEABLE);
  if (rc != SQLITE_OK) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a valid SQLite database: ", ValidUtf8(sqlite3_errmsg(scratch.get()))));
  }
  if (absl::Status checked = CheckImageContent(scratch.get()); !checked.ok()) return checked;
  return scratch;
}

absl::StatusOr<uint64_t> FileBytes(sqlite3* db) {
  std::optional<int64_t> pages = SingleInteger(db, "PRAGMA page_count");
  std::optional<int64_t> page_bytes = SingleInteger(db, "PRAGMA page_size");
  if (!pages.has_value() || !page_bytes.has_value() || *pages < 0 || *page_bytes <= 0) {
    return absl::DataLossError(
        absl::StrCat("cannot read the database's size: ", ValidUtf8(sqlite3_errmsg(db))));
  }
  return static_cast<uint64_t>(*pages) * static_cast<uint64_t>(*page_bytes);
}

std::optional<int64_t> SingleInteger(sqlite3* db, const char* sql) {
  sqlite3_stmt* raw = nullptr;
  if (sqlite3_prepare_v2(db, sql, -1, &raw, nullptr) != SQLITE_OK) return std::nullopt;
  Stmt stmt(raw);
  if (sqlite3_step(stmt.get()) != SQLITE_ROW ||
      sqlite3_column_type(stmt.get(), 0) != SQLITE_INTEGER) {
    return std::nullopt;
  }
  int64_t value = sqlite3_column_int64(stmt.get(), 0);
  if (sqlite3_step(stmt.get()) != SQLITE_DONE) return std::nullopt;
  return value;
}

void CopyDatabase(sqlite3* from, sqlite3* to) {
  SYNOD_CHECK_EQ(PageSize(from), PageSize(to));
  sqlite3_backup* backup = sqlite3_backup_init(to, "main", from, "main");
  SYNOD_CHECK(backup != nullptr) << sqlite3_errmsg(to);
  int rc = sqlite3_backup_step(backup, -1);
  int finish_rc = sqlite3_backup_finish(backup);
  SYNOD_CHECK_EQ(rc, SQLITE_DONE) << sqlite3_errstr(rc);
  SYNOD_CHECK_EQ(finish_rc, SQLITE_OK) << sqlite3_errmsg(to);
}

absl::StatusOr<std::string> SerializeDatabase(sqlite3* db) {
  sqlite3_int64 size_bytes = 0;
  unsigned char* data = sqlite3_serialize(db, "main", &size_bytes, 0);
  if (data == nullptr) {
    // SQLite allocates the whole image at once, and refuses 2 GiB or more.
    return absl::ResourceExhaustedError(absl::StrCat(
        "the database is too large to copy into memory: ", ValidUtf8(sqlite3_errmsg(db))));
  }
  std::string image(reinterpret_cast<const char*>(data), static_cast<size_t>(size_bytes));
  sqlite3_free(data);
  return image;
}

namespace {

// The first row of an internal query, its columns as text; nullopt if it has none.
std::optional<std::vector<std::string>> FirstRow(sqlite3* db, const char* sql) {
  Stmt stmt = MustPrepare(db, sql);
  if (!MustStep(stmt.get())) return std::nullopt;
  std::vector<std::string> row;
  for (int i = 0; i < sqlite3_column_count(stmt.get()); ++i) {
    row.push_back(ValidUtf8(ColumnString(stmt.get(), i)));
  }
  return row;
}

}  // namespace

absl::Status CheckUserSchema(sqlite3* db) {
  // TEMP objects vanish at a restart, so replicas would differ; the authorizer refuses them,
  // but SQLite does not ask it about a TEMP virtual table.
  if (auto temp = FirstRow(db, "SELECT name FROM temp.sqlite_schema LIMIT 1")) {
    return absl::PermissionDeniedError(
        absl::StrCat((*temp)[0], ": TEMP tables, views, triggers and indexes are not replicated"));
  }
  // Objects named _synod_* (created or renamed to), or on a _synod_ table, and foreign keys
  // that point at one (the authorizer never sees a foreign key's parent table): the state
  // machine's own writes to _synod_meta would fail on them.
  // (Only tables whose text names one are asked for their foreign keys: this runs at every
  // schema change, and a schema may hold many tables.)
  if (auto named = FirstRow(db,
                            "SELECT name FROM sqlite_schema WHERE (substr(lower(name), 1, 7) = "
                            "'_synod_' OR substr(lower(tbl_name), 1, 7) = '_synod_') AND NOT "
                            "(type = 'table' AND name = '_synod_meta') LIMIT 1")) {
    return absl::PermissionDeniedError(
        absl::StrCat((*named)[0], ": names starting with _synod_ belong to the server"));
  }
  if (auto reference = FirstRow(db,
                                "SELECT s.name, f.\"table\" FROM sqlite_schema s, "
                                "pragma_foreign_key_list(s.name) f WHERE s.type = 'table' AND "
                                "instr(lower(s.sql), '_synod_') > 0 AND "
                                "substr(lower(f.\"table\"), 1, 7) = '_synod_' LIMIT 1")) {
    return absl::PermissionDeniedError(
        absl::StrCat("table ", (*reference)[0], " has a foreign key to ", (*reference)[1],
                     ": tables named _synod_* belong to the server"));
  }
  // Every virtual table must be one a snapshot can carry (CheckVirtualTables, with the same
  // reading of its module): otherwise every later snapshot would be refused, and a replica
  // that needs one could never catch up. Full-text tables with content= keep their text
  // elsewhere, and their integrity check fails once it drifts (or always, when contentless).
  Stmt virtual_tables = MustPrepare(db,
                                    "SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND "
                                    "sql LIKE 'CREATE VIRTUAL TABLE%' ORDER BY name");
  while (MustStep(virtual_tables.get())) {
    const std::string name = ColumnString(virtual_tables.get(), 0);
    const std::string sql = absl::AsciiStrToLower(ToAbsl(ColumnString(virtual_tables.get(), 1)));
    const std::string module = VirtualTableModule(sql);
    if (!IsCheckableModule(module)) {
      return absl::PermissionDeniedError(
          absl::StrCat("virtual table ", ValidUtf8(QuoteIdentifier(name)), " uses module ",
                       ValidUtf8(QuoteIdentifier(module)),
                       "; only fts3, fts4, fts5 and rtree tables are replicated"));
    }
    if (module.starts_with("fts") && HasContentOption(sql)) {
      return absl::PermissionDeniedError(absl::StrCat(
          "full-text table ", ValidUtf8(QuoteIdentifier(name)),
          " has a content= option; only full-text tables that keep their own text are replicated"));
    }
  }
  return absl::OkStatus();
}

void DatabaseHasher::Prepare(std::string_view skipped_table) {
  tables_.clear();
  schema_ = MustPrepare(db_, "SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY 1, 2");
  // Virtual tables keep their rows in ordinary (shadow) tables, which are hashed instead.
  Stmt names = MustPrepare(db_,
                           "SELECT name FROM sqlite_schema WHERE type = 'table' AND sql NOT LIKE "
                           "'CREATE VIRTUAL TABLE%' ORDER BY name");
  while (MustStep(names.get())) {
    Table table{.name = ColumnString(names.get(), 0)};
    if (!skipped_table.empty() && table.name == skipped_table) continue;
    std::string from = absl::StrCat(" FROM ", QuoteIdentifier(table.name));
    // With its rowid if it has one (WITHOUT ROWID tables do not). A column named _rowid_
    // hides the rowid, hence the order by every column.
    sqlite3_stmt* raw = nullptr;
    std::string sql = absl::StrCat("SELECT _rowid_, *", from);
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &raw, nullptr) != SQLITE_OK) {
      sqlite3_finalize(raw);
      raw = nullptr;
      sql = absl::StrCat("SELECT *", from);
      if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &raw, nullptr) != SQLITE_OK) {
        sqlite3_finalize(raw);
        raw = nullptr;
      }
    }
    table.columns = raw == nullptr ? 0 : sqlite3_column_count(raw);
    sqlite3_finalize(raw);
    absl::StrAppend(&sql, " ORDER BY 1");
    for (int i = 2; i <= table.columns; ++i) absl::StrAppend(&sql, ", ", i);
    raw = nullptr;
    // A table SQLite cannot read (a damaged one) is hashed as its error.
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &raw, nullptr) != SQLITE_OK) {
      table.error = sqlite3_errmsg(db_);
    }
    table.rows.reset(raw);
    tables_.push_back(std::move(table));
  }
  prepared_skipped_ = std::string(skipped_table);
}

void DatabaseHasher::Hash(StableHash* hash, std::string_view skipped_table) {
  if (version_ == nullptr) version_ = MustPrepare(db_, "PRAGMA schema_version");
  SYNOD_CHECK(MustStep(version_.get()));
  const int64_t version = sqlite3_column_int64(version_.get(), 0);
  sqlite3_reset(version_.get());
  if (version != prepared_version_ || skipped_table != prepared_skipped_) {
    Prepare(skipped_table);
    prepared_version_ = version;
  }
  while (MustStep(schema_.get())) {
    for (int i = 0; i < 4; ++i) HashValue(schema_.get(), i, hash);
  }
  sqlite3_reset(schema_.get());
  for (Table& table : tables_) {
    hash->AddField(table.name);
    if (table.rows == nullptr) {
      hash->AddField(table.error);
      continue;
    }
    int rc;
    while ((rc = sqlite3_step(table.rows.get())) == SQLITE_ROW) {
      hash->AddU64(0x524f57);  // a row marker: an empty table differs from a table of empty rows
      for (int i = 0; i < table.columns; ++i) HashValue(table.rows.get(), i, hash);
    }
    if (rc != SQLITE_DONE) hash->AddField(sqlite3_errmsg(db_));
    sqlite3_reset(table.rows.get());
  }
}

}  // namespace synod

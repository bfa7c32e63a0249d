// What each command does. How the commands of an entry are applied and made to survive a
// crash is in state_machine.cc.

#include <algorithm>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/sql_guards.h"
#include "core/sqlite_util.h"
#include "core/state_machine_impl.h"

namespace synod {
namespace state_machine_internal {
namespace {

// A request's result is stored whole in one row (its session, and SlotResults), and a row is
// at most kMaxValueBytes: room for a group's results (kMaxGroupResultBytes) and one more.
constexpr size_t kMaxRequestResultBytes = 4 << 20;
// Longest error message a result keeps (longer ones are cut).
constexpr size_t kMaxMessageBytes = 4096;
constexpr size_t kMaxContentTypeBytes = 255;
constexpr size_t kMaxRegisteredNameBytes = 255;

absl::Status CheckDatabaseName(std::string_view name) {
  if (IsValidDatabaseName(name)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("invalid database name ", Quote(name),
                                                 ": use 1 to 64 of A-Z, a-z, 0-9, '_' and '-'"));
}

absl::Status CheckLength(std::string_view what, std::string_view value, size_t max_bytes) {
  if (value.empty() || value.size() > max_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(ToAbsl(what), " must have 1 to ", max_bytes, " bytes"));
  }
  if (!IsValidUtf8(value))
    return absl::InvalidArgumentError(absl::StrCat(ToAbsl(what), " must be UTF-8"));
  return absl::OkStatus();
}

absl::Status CheckExecuteFields(const Execute& execute) {
  if (execute.statements().empty()) {
    return absl::InvalidArgumentError("execute needs at least one statement");
  }
  // A log entry holding a string field that is not UTF-8 could not be read back (proto3
  // refuses it), and a replica that cannot read its log cannot start.
  for (const Statement& statement : execute.statements()) {
    bool valid = IsValidUtf8(statement.sql());
    for (const SqlValue& param : statement.params()) valid = valid && IsValidUtf8(param.text());
    if (!valid) return absl::InvalidArgumentError("SQL text and parameters must be UTF-8");
  }
  return CheckDatabaseName(execute.database());
}

absl::Status CheckMediaKey(std::string_view key) {
  if (IsValidMediaKey(key)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("invalid media key ", Quote(key),
                   ": use 1 to 200 of A-Z, a-z, 0-9, '.', '_', '~' and '-', without '..'"));
}

absl::Status CheckSha256(std::string_view sha256) {
  bool valid = sha256.size() == 64;
  for (char c : sha256) valid = valid && absl::ascii_isxdigit(c) && !absl::ascii_isupper(c);
  if (valid) return absl::OkStatus();
  return absl::InvalidArgumentError("sha256 must be 64 lower-case hex digits");
}

}  // namespace

CommandResult Failure(ErrorCode code, absl::string_view message) {
  CommandResult result;
  result.set_code(code);
  result.set_message(std::string(message));
  return result;
}

CommandResult ParseResult(std::string_view bytes) {
  CommandResult result;
  SYNOD_CHECK(result.ParseFromArray(bytes.data(), static_cast<int>(bytes.size())));
  return result;
}

std::string Quote(std::string_view text) {
  constexpr size_t kMaxQuotedBytes = 80;
  return absl::StrCat("\"", absl::CHexEscape(ToAbsl(text.substr(0, kMaxQuotedBytes))),
                      text.size() > kMaxQuotedBytes ? "...\"" : "\"");
}

absl::Status CheckCommandFields(const Command& command) {
  std::vector<absl::Status> checks;
  switch (command.kind_case()) {
    case Command::kCreateDatabase: {
      const synod::CreateDatabase& create = command.create_database();
      if (create.image_sha256().empty()) {
        if (create.image_size_bytes() != 0) {
          return absl::InvalidArgumentError("an image size without its sha256");
        }
        return CheckDatabaseName(create.name());
      }
      if (!create.image().empty()) {
        return absl::InvalidArgumentError("an image is given by value or by reference, not both");
      }
      if (create.image_size_bytes() < kImageHeaderBytes) {
        return absl::InvalidArgumentError("an image by reference has at least an SQLite header");
      }
      checks = {CheckDatabaseName(create.name()), CheckSha256(create.image_sha256())};
      break;
    }
    case Command::kDropDatabase:
      return CheckDatabaseName(command.drop_database().name());
    case Command::kExecute:
      return CheckExecuteFields(command.execute());
    case Command::kReadBarrier:
    case Command::kCheckpoint:
      return absl::OkStatus();
    case Command::kPutMedia: {
      const PutMedia& put = command.put_media();
      if (put.has_execute()) {
        if (put.execute().database() != put.database()) {
          return absl::InvalidArgumentError("a media's statements run in its own database");
        }
        if (!put.execute().transaction()) {
          return absl::InvalidArgumentError("a media's statements run as one transaction");
        }
        if (absl::Status execute = CheckExecuteFields(put.execute()); !execute.ok()) {
          return execute;
        }
      }
      checks = {CheckDatabaseName(put.database()), CheckMediaKey(put.key()),
                CheckSha256(put.sha256()),
                IsValidContentType(put.content_type())
                    ? absl::OkStatus()
                    : absl::InvalidArgumentError(absl::StrCat("a content type is 1 to ",
                                                              kMaxContentTypeBytes,
                                                              " printable ASCII characters"))};
      break;
    }
    case Command::kDeleteMedia:
      checks = {CheckDatabaseName(command.delete_media().database()),
                CheckMediaKey(command.delete_media().key())};
      break;
    case Command::kRegisterName:
      checks = {CheckLength("name", command.register_name().name(), kMaxRegisteredNameBytes),
                CheckLength("owner", command.register_name().owner(), kMaxRegisteredNameBytes)};
      break;
    case Command::kReleaseName:
      checks = {CheckLength("name", command.release_name().name(), kMaxRegisteredNameBytes),
                CheckLength("owner", command.release_name().owner(), kMaxRegisteredNameBytes)};
      break;
    case Command::KIND_NOT_SET:
      return absl::InvalidArgumentError("unknown or empty command");
  }
  for (const absl::Status& check : checks) {
    if (!check.ok()) return check;
  }
  return absl::OkStatus();
}

absl::Status PrepareUploadedImage(sqlite3* image) {
  char* error = nullptr;
  if (sqlite3_exec(image, "DROP TABLE IF EXISTS _synod_meta", nullptr, nullptr, &error) !=
      SQLITE_OK) {
    absl::Status status = absl::InvalidArgumentError(
        absl::StrCat("cannot replace the image's _synod_meta table: ", ValidUtf8(error)));
    sqlite3_free(error);
    return status;
  }
  if (absl::Status reserved = CheckUserSchema(image); !reserved.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("the image contains ", reserved.message()));
  }
  return absl::OkStatus();
}

}  // namespace state_machine_internal

absl::Status CheckAndPrepareImage(sqlite3* image) {
  if (absl::Status checked = CheckImageContent(image); !checked.ok()) return checked;
  return state_machine_internal::PrepareUploadedImage(image);
}

using state_machine_internal::CheckCommandFields;
using state_machine_internal::Failure;
using state_machine_internal::kUserMetaSchema;
using state_machine_internal::ParseResult;
using state_machine_internal::PrepareUploadedImage;
using state_machine_internal::Quote;

StateMachine::Impl::Outcome StateMachine::Impl::RunCommand(uint64_t slot, uint64_t index,
                                                           const Command& command) {
  Outcome outcome;
  if (absl::Status fields = CheckCommandFields(command); !fields.ok()) {
    outcome.result = Failure(INVALID_ARGUMENT, fields.message());
  } else {
    switch (command.kind_case()) {
      case Command::kCreateDatabase:
        outcome.result = CreateDatabase(slot, index, command.create_database());
        break;
      case Command::kDropDatabase:
        outcome = DropDatabase(command.drop_database());
        break;
      case Command::kExecute:
        outcome.result = Execute(slot, index, command.execute());
        break;
      case Command::kReadBarrier:
      case Command::kCheckpoint:  // a vote for the host's divergence check: nothing to change
        break;                    // the result's revision is the answer
      case Command::kPutMedia: {
        const synod::PutMedia& put = command.put_media();
        if (put.has_execute()) {
          // ANALYZE applies alone, outside a group (ApplyInGroup): not beside media.
          if (RunsAnalyze(put.execute())) {
            outcome.result = Failure(INVALID_ARGUMENT, "ANALYZE cannot run with a media upload");
            break;
          }
          // Its key is new (a d3b file id): one taken is refused before anything applies,
          // rather than replaced after the statements.
          if (databases.contains(put.database()) && MediaExists(put.database(), put.key())) {
            outcome.result =
                Failure(ALREADY_EXISTS, absl::StrCat("media ", Quote(put.key()), " exists"));
            break;
          }
          // The statements first, in the request's savepoint: the metadata only if they
          // succeed. (The database exists if they do: PutMedia then cannot fail.)
          outcome.result = Execute(slot, index, put.execute());
          if (outcome.result.code() != OK) break;
          CommandResult stored = PutMedia(slot, put);
          SYNOD_CHECK_EQ(stored.code(), OK) << stored.message();
          break;
        }
        outcome.result = PutMedia(slot, put);
        break;
      }
      case Command::kDeleteMedia:
        outcome.result = DeleteMedia(command.delete_media());
        break;
      case Command::kRegisterName:
        outcome.result = RegisterName(slot, command.register_name());
        break;
      case Command::kReleaseName:
        outcome.result = ReleaseName(command.release_name());
        break;
      case Command::KIND_NOT_SET:
        SYNOD_CHECK(false) << "CheckCommandFields accepted an empty command";
    }
  }
  outcome.result.set_revision(slot);
  return outcome;
}

std::string StateMachine::Impl::ChooseFileId(std::string_view name) {
  const std::string hashed = DatabaseFileId(name);
  std::string file_id = hashed;
  Stmt in_use = MustPrepare(system.get(), "SELECT 1 FROM _synod_catalog WHERE file_id = ?");
  for (size_t suffix = 1;; ++suffix) {
    MustBindText(in_use.get(), 1, file_id);
    if (!MustStep(in_use.get())) return file_id;
    sqlite3_reset(in_use.get());
    SYNOD_CHECK_LE(suffix, databases.size());  // each catalog entry blocks one suffix at most
    file_id = absl::StrCat(hashed, "-", suffix);
  }
}

CommandResult StateMachine::Impl::CreateDatabase(uint64_t slot, uint64_t index,
                                                 const synod::CreateDatabase& create) {
  // An image by reference is taken first, whatever the outcome: the host stages one for
  // each such request, and removes what is taken and not moved into place.
  absl::StatusOr<std::string> staged = std::string();  // an image by reference: its file
  if (!create.image_sha256().empty()) {
    SYNOD_CHECK(options.staged_images != nullptr)
        << "an image by reference, and no staged images: the host must stage them";
    staged = options.staged_images->Take(create.image_sha256());
    SYNOD_CHECK(staged.ok() || absl::IsInvalidArgument(staged.status()))
        << "image " << create.image_sha256() << " not staged: " << staged.status();
  }
  if (databases.contains(create.name())) {
    return Failure(ALREADY_EXISTS, absl::StrCat("database ", create.name(), " already exists"));
  }
  if (!staged.ok()) return Failure(INVALID_ARGUMENT, staged.status().message());
  Db image;
  if (!create.image().empty()) {
    absl::StatusOr<Db> loaded = LoadImage(create.image());
    absl::Status prepared = loaded.ok() ? PrepareUploadedImage(loaded->get()) : loaded.status();
    if (!prepared.ok()) return Failure(INVALID_ARGUMENT, prepared.message());
    image = std::move(*loaded);
  }
  Database db{.file_id = ChooseFileId(create.name()),
              .revision = slot,
              .request_index = index,
              .generation = ++last_generation};
  // A staged file is moved into place (a rename) where the opener keeps files; otherwise
  // it is copied, as an image by value is.
  bool adopted = false;
  if (!staged->empty()) {
    const absl::Status moved = opener->AdoptsFiles() ? opener->Adopt(db.file_id, *staged)
                                                     : absl::UnimplementedError("no files");
    SYNOD_CHECK(!absl::IsDataLoss(moved)) << moved;
    adopted = moved.ok();
    if (!adopted) {
      sqlite3* raw = nullptr;
      const int rc = sqlite3_open_v2(staged->c_str(), &raw,
                                     SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, nullptr);
      image = Db(raw);
      SYNOD_CHECK_EQ(rc, SQLITE_OK) << "cannot open the staged image " << *staged;
    }
  }
  absl::StatusOr<Db> handle = OpenDatabase(db.file_id);
  SYNOD_CHECK(handle.ok()) << handle.status();
  db.handle = std::move(*handle);
  if (!adopted) {
    Stmt objects = MustPrepare(db.handle.get(), "SELECT count(*) FROM sqlite_schema");
    SYNOD_CHECK(MustStep(objects.get()));
    SYNOD_CHECK_EQ(sqlite3_column_int64(objects.get(), 0), 0) << "file " << db.file_id << " in use";
    objects.reset();
    if (image != nullptr) CopyDatabase(image.get(), db.handle.get());
  }
  image.reset();  // a staged file not moved is the host's to remove

  CommandResult result;  // OK; RunCommand sets the revision
  MustExec(db.handle.get(), "BEGIN");
  MustExec(db.handle.get(), kUserMetaSchema);
  Stmt meta = MustPrepare(db.handle.get(), "INSERT INTO _synod_meta VALUES (0, ?, ?, ?)");
  MustBindInt64(meta.get(), 1, static_cast<int64_t>(slot));
  MustBindInt64(meta.get(), 2, static_cast<int64_t>(index));
  MustBindBlob(meta.get(), 3, result.SerializeAsString());
  SYNOD_CHECK(!MustStep(meta.get()));
  meta.reset();
  MustExec(db.handle.get(), "COMMIT");

  Stmt catalog = MustPrepare(system.get(), "INSERT INTO _synod_catalog VALUES (?, ?)");
  MustBindText(catalog.get(), 1, create.name());
  MustBindText(catalog.get(), 2, db.file_id);
  SYNOD_CHECK(!MustStep(catalog.get()));
  databases.emplace(create.name(), std::move(db));
  return result;
}

StateMachine::Impl::Outcome StateMachine::Impl::DropDatabase(const synod::DropDatabase& drop) {
  auto it = databases.find(drop.name());
  if (it == databases.end()) {
    return {.result = Failure(NOT_FOUND, absl::StrCat("no database named ", drop.name()))};
  }
  for (const char* sql : {"DELETE FROM _synod_catalog WHERE name = ?",
                          "DELETE FROM _synod_media WHERE database = ?"}) {
    Stmt stmt = MustPrepare(system.get(), sql);
    MustBindText(stmt.get(), 1, drop.name());
    SYNOD_CHECK(!MustStep(stmt.get()));
  }
  Outcome outcome{.file_to_remove = it->second.file_id};
  idle_readers.erase(drop.name());
  statements.Clear();
  databases.erase(it);  // closes the handle, so the file can be removed after the commit
  return outcome;
}

namespace {

// Whether the open transaction holds deferred constraint violations that would make its
// COMMIT fail (foreign keys declared DEFERRABLE INITIALLY DEFERRED, PRAGMA
// defer_foreign_keys).
bool HasUnresolvedDeferredConstraints(sqlite3* handle) {
  int current = 0;
  int highest = 0;
  SYNOD_CHECK_EQ(sqlite3_db_status(handle, SQLITE_DBSTATUS_DEFERRED_FKS, &current, &highest, 0),
                 SQLITE_OK);
  return current != 0;
}

}  // namespace

void StateMachine::Impl::ReloadStatistics(sqlite3* handle) {
  SYNOD_CHECK(sqlite3_get_autocommit(handle)) << "statistics reloaded inside a transaction";
  // What the planner knows of a table lives in the schema SQLite keeps in memory, and
  // ANALYZE leaves it different from what a connection opened afresh reads: a rollback that
  // changes no schema keeps the statistics it loaded, and an ANALYZE of an emptied table
  // keeps the old row estimate. This connection would then plan otherwise than a restarted
  // replica, and the same statement could pick another index, and another row. The schema
  // and its statistics are read again from the database, as at a restart.
  MustExec(handle, "PRAGMA writable_schema = RESET");
}

int64_t StateMachine::Impl::SchemaVersion(sqlite3* handle) {
  // A TEMP object (which changes only the temp schema's version) counts as a change too.
  StatementCache::Lease version =
      statements.Get(handle,
                     "SELECT (SELECT schema_version FROM pragma_schema_version) + "
                     "(SELECT count(*) FROM temp.sqlite_schema) * 4294967296");
  SYNOD_CHECK(MustStep(version.get()));
  return sqlite3_column_int64(version.get(), 0);
}

CommandResult StateMachine::Impl::Execute(uint64_t slot, uint64_t index,
                                          const synod::Execute& execute) {
  auto it = databases.find(execute.database());
  if (it == databases.end()) {
    return Failure(NOT_FOUND, absl::StrCat("no database named ", execute.database()));
  }
  Database& db = it->second;
  sqlite3* handle = db.handle.get();
  if (db.results_slot == slot) {
    auto stored = db.results.find(index);
    if (stored != db.results.end()) return stored->second;  // applied before a crash
    SYNOD_CHECK(db.results.empty() || db.results.rbegin()->first < index)
        << "request " << index << " of slot " << slot << " ran after later ones";
  }
  SYNOD_CHECK_LE(db.revision, slot);
  // In a group (state_machine_impl.h), the database's transaction stays open across the
  // group's requests, and each request is a savepoint in it.
  const bool grouped = group.open;
  if (!grouped || !db.in_group) {
    if (grouped) JoinGroup(execute.database(), db);
    // The results kept with the database are those of the requests of its transaction: those
    // of earlier ones are in _synod_entry_results, committed with the system database.
    db.results.clear();
    db.results_slot = slot;
  }
  auto keep = [&](const CommandResult& kept) { db.results[index] = kept; };

  // changes() and last_insert_rowid() start at 0 in every request, whatever the connection
  // ran before (a restarted replica's connection ran nothing): a DELETE of no row resets
  // changes().
  sqlite3_set_last_insert_rowid(handle, 0);
  statements.Exec(handle, grouped ? "SAVEPOINT synod_request" : "BEGIN");
  statements.Exec(handle, "DELETE FROM _synod_meta WHERE 0");
  CommandResult result;
  size_t result_bytes = 0;
  // One budget for the whole request, across its statements: its allowance of work, plus
  // what the group's ration of costly work holds, up to a request's limit (sql_guards.h).
  const int64_t allowance = kAllowanceWorkUnits + kAllowanceWorkUnitsPerByte *
                                                      static_cast<int64_t>(execute.ByteSizeLong());
  WorkBudget budget(
      std::min(kMaxRequestWorkUnits, allowance + std::max<int64_t>(0, costly.work_units)));
  // What it drew from the ration, recorded before the result is stored anywhere.
  auto spent = [&](CommandResult* result) {
    result->set_costly_work_units(
        static_cast<uint64_t>(std::max<int64_t>(0, budget.work_units_used() - allowance)));
  };
  const int64_t schema_at_start = SchemaVersion(handle);
  // A request that runs ANALYZE applies alone (see ApplyInGroup), and reloads the statistics
  // once its transaction has ended, committed or not.
  const bool analyzes = RunsAnalyze(execute);
  SYNOD_CHECK(!(grouped && analyzes)) << "an ANALYZE applied in a group";
  int64_t schema_version = schema_at_start;
  // Whether undoing this request alone within the group's transaction is unsafe: the
  // statement ended the transaction, or the request changed the schema (SQLite 3.40 fails
  // the COMMIT after a savepoint that created a full-text table and wrote to it is rolled
  // back). The group is then applied again one request at a time.
  auto breaks_group = [&] {
    return sqlite3_get_autocommit(handle) || SchemaVersion(handle) != schema_at_start;
  };
  // Undoes the whole request: its savepoint in a group, its transaction alone. False when
  // that is unsafe in the group (breaks_group), which is then marked broken.
  auto undo_request = [&] {
    if (grouped && breaks_group()) {
      group.broken = true;
      return false;
    }
    if (grouped) {
      statements.Exec(handle, "ROLLBACK TO synod_request");
      statements.Exec(handle, "RELEASE synod_request");
    } else if (!sqlite3_get_autocommit(handle)) {
      MustExec(handle, "ROLLBACK");
    }
    if (analyzes) ReloadStatistics(handle);
    return true;
  };
  for (int i = 0; i < execute.statements_size(); ++i) {
    if (!execute.transaction()) statements.Exec(handle, "SAVEPOINT synod_statement");
    absl::StatusOr<StatementResult> statement =
        RunUserStatement(handle, execute.statements(i), /*read_only=*/false, &budget);
    // The whole request's result is stored with the session: keep it well under what
    // SQLite and protobuf accept.
    if (statement.ok() && (result_bytes += statement->ByteSizeLong()) >
                              state_machine_internal::kMaxRequestResultBytes) {
      statement = absl::ResourceExhaustedError(
          absl::StrCat("the request's results are over ",
                       state_machine_internal::kMaxRequestResultBytes, " bytes"));
    }
    // A statement that changed the schema may not name or point at the server's tables.
    if (statement.ok()) {
      const int64_t version = SchemaVersion(handle);
      if (version != schema_version) {
        schema_version = version;
        if (absl::Status schema = CheckUserSchema(handle); !schema.ok()) statement = schema;
      }
    }
    // A statement on its own commits on its own, as in SQLite's autocommit mode: a deferred
    // constraint it leaves unresolved fails it (COMMIT would fail otherwise).
    if (statement.ok() && !execute.transaction() && HasUnresolvedDeferredConstraints(handle)) {
      statement = absl::InvalidArgumentError(
          "FOREIGN KEY constraint failed (deferred: unresolved when the statement ended)");
    }
    if (statement.ok()) {
      if (!execute.transaction()) statements.Exec(handle, "RELEASE synod_statement");
      *result.add_results() = *std::move(statement);
      continue;
    }
    // Only the machine can fail this way (I/O, locks): every outcome a client's SQL or data
    // can cause is a deterministic status (see RunUserStatement).
    SYNOD_CHECK(!absl::IsInternal(statement.status()) &&
                !absl::IsDeadlineExceeded(statement.status()))
        << "a statement failed in a way that may differ between replicas: " << statement.status();
    // Stopped short of its own limit, because the group's ration of costly work is spent.
    if (budget.work_exhausted() && budget.max_work_units() < kMaxRequestWorkUnits) {
      statement = absl::ResourceExhaustedError(
          "the group is busy with costly writes: this one needs more work than it has left "
          "now; retry later");
    }
    result.set_code(absl::IsResourceExhausted(statement.status()) ? RESOURCE_EXHAUSTED
                                                                  : INVALID_ARGUMENT);
    // SQLite's messages may quote the statement (a JSON path, a value): kept short, so that
    // results stored with a session or a group stay far below a row's limit.
    std::string message = absl::StrCat("statement ", i + 1, ": ", statement.status().message());
    if (message.size() > state_machine_internal::kMaxMessageBytes) {
      message.resize(state_machine_internal::kMaxMessageBytes);
      message = absl::StrCat(ValidUtf8(message), "...");
    }
    result.set_message(std::move(message));
    // Nothing of the request stays if it asked for a transaction, if the statement ended
    // the transaction itself (ON CONFLICT ROLLBACK, RAISE(ROLLBACK), out of memory), or if
    // it was the first: a request that changed nothing leaves the database's revision alone.
    if (execute.transaction() || sqlite3_get_autocommit(handle) || i == 0) {
      if (!undo_request()) return result;
      result.clear_results();
      spent(&result);
      // Kept in a group: its later requests commit with it, and a replay after a crash must
      // not run this one again on their changes. Alone it committed nothing.
      if (grouped) keep(result);
      return result;
    }
    MustExec(handle, "ROLLBACK TO synod_statement; RELEASE synod_statement");
    break;
  }
  if (execute.transaction() && HasUnresolvedDeferredConstraints(handle)) {
    if (!undo_request()) return result;
    result.Clear();
    result.set_code(INVALID_ARGUMENT);
    result.set_message(
        "FOREIGN KEY constraint failed (deferred: unresolved when the transaction ended); "
        "nothing of the transaction was applied");
    spent(&result);
    if (grouped) keep(result);
    return result;
  }
  spent(&result);  // before it is stored: a replay after a crash charges the same
  db.revision = slot;
  db.request_index = index;
  keep(result);
  if (grouped) {
    statements.Exec(handle, "RELEASE synod_request");  // _synod_meta is written at its commit
    return result;
  }
  StatementCache::Lease meta = statements.Get(
      handle, "UPDATE _synod_meta SET revision = ?, request_index = ?, result = ? WHERE id = 0");
  MustBindInt64(meta.get(), 1, static_cast<int64_t>(slot));
  MustBindInt64(meta.get(), 2, static_cast<int64_t>(index));
  MustBindBlob(meta.get(), 3, SlotResultsBlob(db));
  SYNOD_CHECK(!MustStep(meta.get()));
  SYNOD_CHECK_EQ(sqlite3_changes(handle), 1);
  meta.reset();
  statements.Exec(handle, "COMMIT");
  if (analyzes) ReloadStatistics(handle);
  return result;
}

CommandResult StateMachine::Impl::PutMedia(uint64_t slot, const synod::PutMedia& put) {
  if (!databases.contains(put.database())) {
    return Failure(NOT_FOUND, absl::StrCat("no database named ", put.database()));
  }
  Stmt stmt =
      MustPrepare(system.get(), "INSERT OR REPLACE INTO _synod_media VALUES (?, ?, ?, ?, ?, ?)");
  MustBindText(stmt.get(), 1, put.database());
  MustBindText(stmt.get(), 2, put.key());
  MustBindText(stmt.get(), 3, put.sha256());
  MustBindInt64(stmt.get(), 4, static_cast<int64_t>(put.size_bytes()));
  MustBindText(stmt.get(), 5, put.content_type());
  MustBindInt64(stmt.get(), 6, static_cast<int64_t>(slot));
  SYNOD_CHECK(!MustStep(stmt.get()));
  return CommandResult();
}

bool StateMachine::Impl::MediaExists(std::string_view database, std::string_view key) {
  Stmt stmt =
      MustPrepare(system.get(), "SELECT 1 FROM _synod_media WHERE database = ? AND key = ?");
  MustBindText(stmt.get(), 1, database);
  MustBindText(stmt.get(), 2, key);
  return MustStep(stmt.get());
}

CommandResult StateMachine::Impl::DeleteMedia(const synod::DeleteMedia& del) {
  Stmt stmt = MustPrepare(system.get(), "DELETE FROM _synod_media WHERE database = ? AND key = ?");
  MustBindText(stmt.get(), 1, del.database());
  MustBindText(stmt.get(), 2, del.key());
  SYNOD_CHECK(!MustStep(stmt.get()));
  if (sqlite3_changes(system.get()) == 0) {
    return Failure(NOT_FOUND,
                   absl::StrCat("no media ", Quote(del.key()), " in database ", del.database()));
  }
  return CommandResult();
}

CommandResult StateMachine::Impl::RegisterName(uint64_t slot, const synod::RegisterName& reg) {
  Stmt owner = MustPrepare(system.get(), "SELECT owner FROM _synod_names WHERE name = ?");
  MustBindText(owner.get(), 1, reg.name());
  if (MustStep(owner.get())) {
    if (ColumnString(owner.get(), 0) == reg.owner()) return CommandResult();  // already its own
    return Failure(ALREADY_EXISTS,
                   absl::StrCat("name ", Quote(reg.name()), " is registered to another owner"));
  }
  Stmt insert = MustPrepare(system.get(), "INSERT INTO _synod_names VALUES (?, ?, ?)");
  MustBindText(insert.get(), 1, reg.name());
  MustBindText(insert.get(), 2, reg.owner());
  MustBindInt64(insert.get(), 3, static_cast<int64_t>(slot));
  SYNOD_CHECK(!MustStep(insert.get()));
  return CommandResult();
}

CommandResult StateMachine::Impl::ReleaseName(const synod::ReleaseName& release) {
  Stmt owner = MustPrepare(system.get(), "SELECT owner FROM _synod_names WHERE name = ?");
  MustBindText(owner.get(), 1, release.name());
  if (!MustStep(owner.get())) {
    return Failure(NOT_FOUND, absl::StrCat("name ", Quote(release.name()), " is not registered"));
  }
  if (ColumnString(owner.get(), 0) != release.owner()) {
    return Failure(FAILED_PRECONDITION,
                   absl::StrCat("name ", Quote(release.name()), " is registered to another owner"));
  }
  Stmt del = MustPrepare(system.get(), "DELETE FROM _synod_names WHERE name = ?");
  MustBindText(del.get(), 1, release.name());
  SYNOD_CHECK(!MustStep(del.get()));
  return CommandResult();
}

}  // namespace synod

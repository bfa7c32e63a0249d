#include "core/state_machine.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/deterministic_sqlite.h"
#include "core/snapshot_format.h"
#include "core/sql_guards.h"
#include "core/sqlite_util.h"
#include "core/stable_hash.h"
#include "core/state_machine_impl.h"

// How an entry is applied, and why it survives a crash at any point:
//
// The requests of an entry apply in groups (Impl::Group). A group holds one transaction of
// the system database and one of each user database its requests touch; each request is a
// savepoint within them. A user database records, in its _synod_meta row, its position (the
// slot and index of the last request that changed it) and the results of the requests of
// its open transaction (SlotResults). The system database records each request's session
// and its result in _synod_entry_results. A group commits its user databases first, then
// the system database; the group that ends the entry also clears _synod_entry_results and
// advances the revision in that last commit. A request that creates or drops a database
// ends the group before it and commits on its own (a file is made or removed with it), and
// so does every request of a group that one of its statements broke (it ended the
// transaction itself, taking the group's earlier requests with it): that group is rolled
// back and applied again one request at a time, each committed on its own, the same way.
//
// After a crash the entry is applied again from its first request: a request with a row in
// _synod_entry_results is answered from it; a request whose user database holds its result
// (the database committed, the system database did not) is answered from there; a database
// file the catalog does not name (a create whose system transaction was lost, or a drop
// whose file removal was) is removed by Open(), so the create runs again.

namespace synod {

using state_machine_internal::CheckCommandFields;
using state_machine_internal::Failure;
using state_machine_internal::kSystemFileId;
using state_machine_internal::kUserMetaSchema;
using state_machine_internal::ParseResult;
using state_machine_internal::PrepareUploadedImage;
using state_machine_internal::Quote;
using state_machine_internal::ToAbsl;

namespace {

// A group commits early once its results are this large: they are kept in memory and in
// the _synod_meta rows of the databases it touched until it commits.
constexpr size_t kMaxGroupResultBytes = 4 << 20;

// The request index that seeds random() in Query(); no request of an entry has it.
constexpr uint64_t kQueryRequestIndex = std::numeric_limits<uint64_t>::max();

// Unsigned 64-bit values (client ids, sequences, sizes) are stored as their int64 bit pattern.
constexpr char kSystemSchema[] = R"sql(
  CREATE TABLE IF NOT EXISTS _synod_revision(
    id INTEGER PRIMARY KEY CHECK (id = 0),
    revision INTEGER NOT NULL,
    now_unix_ms INTEGER NOT NULL);
  INSERT OR IGNORE INTO _synod_revision VALUES (0, 0, 0);
  CREATE TABLE IF NOT EXISTS _synod_costly_budget(
    id INTEGER PRIMARY KEY CHECK (id = 0),
    work_units INTEGER NOT NULL,
    as_of_unix_ms INTEGER NOT NULL);
  CREATE TABLE IF NOT EXISTS _synod_catalog(
    name TEXT PRIMARY KEY,
    file_id TEXT NOT NULL UNIQUE) WITHOUT ROWID;
  CREATE TABLE IF NOT EXISTS _synod_sessions(
    client_id INTEGER PRIMARY KEY,
    sequence INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    result BLOB NOT NULL);
  CREATE INDEX IF NOT EXISTS _synod_sessions_by_age ON _synod_sessions(revision, client_id);
  CREATE TABLE IF NOT EXISTS _synod_entry_results(
    request_index INTEGER PRIMARY KEY,
    result BLOB NOT NULL);
  CREATE TABLE IF NOT EXISTS _synod_media(
    database TEXT NOT NULL,
    key TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (database, key)) WITHOUT ROWID;
  CREATE TABLE IF NOT EXISTS _synod_names(
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    revision INTEGER NOT NULL) WITHOUT ROWID;
)sql";

// Snapshot framing: core/snapshot_format.h.
bool ReadU64(std::string_view* in, uint64_t* value) {
  if (in->size() < kSnapshotU64Bytes) return false;
  *value = DecodeSnapshotU64(*in);
  in->remove_prefix(kSnapshotU64Bytes);
  return true;
}

bool ReadField(std::string_view* in, std::string_view* field) {
  uint64_t size_bytes = 0;
  if (!ReadU64(in, &size_bytes) || size_bytes > in->size()) return false;
  *field = in->substr(0, size_bytes);
  in->remove_prefix(size_bytes);
  return true;
}

using SnapshotFrames = std::vector<std::pair<std::string_view, std::string_view>>;

absl::StatusOr<SnapshotFrames> DecodeSnapshot(std::string_view snapshot) {
  constexpr size_t kChecksumBytes = 8;
  if (snapshot.size() < kSnapshotMagic.size() + kChecksumBytes ||
      snapshot.substr(0, kSnapshotMagic.size()) != kSnapshotMagic) {
    return absl::InvalidArgumentError("not a Synod snapshot");
  }
  std::string_view body = snapshot.substr(0, snapshot.size() - kChecksumBytes);
  std::string_view trailer = snapshot.substr(body.size());
  uint64_t checksum = 0;
  ReadU64(&trailer, &checksum);
  StableHash hash;
  hash.Add(body);
  if (hash.value() != checksum) return absl::InvalidArgumentError("snapshot checksum mismatch");
  body.remove_prefix(kSnapshotMagic.size());
  SnapshotFrames frames;
  while (!body.empty()) {
    std::string_view file_id;
    std::string_view image;
    if (!ReadField(&body, &file_id) || !ReadField(&body, &image)) {
      return absl::InvalidArgumentError("truncated snapshot frame");
    }
    frames.emplace_back(file_id, image);
  }
  return frames;
}

// Checks that the images of a snapshot (by file id) form a state: a system database whose
// catalog names exactly the other images, each a user database.
// The state machine's own tables in `db` (those named _synod_*), as SQLite stores them.
std::string OwnSchema(sqlite3* db) {
  std::string schema;
  Stmt stmt = MustPrepare(db,
                          "SELECT type, name, tbl_name, sql FROM sqlite_schema WHERE name LIKE "
                          "'\\_synod\\_%' ESCAPE '\\' ORDER BY type, name");
  while (MustStep(stmt.get())) {
    for (int i = 0; i < 4; ++i) absl::StrAppend(&schema, ColumnString(stmt.get(), i), "\n");
  }
  return schema;
}

// The own schema a database made by `sql` has.
std::string OwnSchemaOf(const char* sql) {
  Db scratch = OpenScratch();
  MustExec(scratch.get(), sql);
  return OwnSchema(scratch.get());
}

// Checks everything the state machine relies on without checking when it loads a state
// (it stops the process instead): the exact schema of its own tables, one position per
// database no further than one entry ahead of the system's, and the session bound. A peer's
// snapshot that passes is one this replica can restore and start from.
absl::Status CheckImagesFormAState(const SnapshotImages& images) {
  auto system = images.find(kSystemFileId);
  if (system == images.end() || OwnSchema(system->second.get()) != OwnSchemaOf(kSystemSchema)) {
    return absl::InvalidArgumentError("the snapshot has no system database of this version");
  }
  std::optional<int64_t> revision =
      SingleInteger(system->second.get(), "SELECT revision FROM _synod_revision");
  std::optional<int64_t> sessions =
      SingleInteger(system->second.get(), "SELECT count(*) FROM _synod_sessions");
  std::optional<int64_t> costly_rows = SingleInteger(
      system->second.get(),
      "SELECT count(*) FROM _synod_costly_budget WHERE typeof(work_units) = 'integer' AND "
      "typeof(as_of_unix_ms) = 'integer'");
  if (!revision || *revision < 0 || !sessions || costly_rows != 1 ||
      *sessions > static_cast<int64_t>(StateMachine::kMaxSessions)) {
    return absl::InvalidArgumentError("the snapshot's system database is inconsistent");
  }
  const std::string user_schema = OwnSchemaOf(kUserMetaSchema);
  std::set<std::string> user_images;
  for (const auto& [file_id, image] : images) {
    if (file_id == kSystemFileId) continue;
    std::optional<int64_t> position =
        SingleInteger(image.get(), "SELECT revision FROM _synod_meta");
    if (OwnSchema(image.get()) != user_schema || !position || *position < 0 ||
        *position > *revision + 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("snapshot database ", file_id, " has no valid _synod_meta row"));
    }
    user_images.insert(file_id);
  }
  std::set<std::string> catalogued;
  sqlite3_stmt* raw = nullptr;
  if (sqlite3_prepare_v2(system->second.get(), "SELECT file_id FROM _synod_catalog", -1, &raw,
                         nullptr) != SQLITE_OK) {
    return absl::InvalidArgumentError("the snapshot's system database has no catalog");
  }
  for (Stmt catalog(raw); sqlite3_step(catalog.get()) == SQLITE_ROW;) {
    catalogued.insert(ColumnString(catalog.get(), 0));
  }
  if (catalogued != user_images) {
    return absl::InvalidArgumentError("the snapshot's databases do not match its catalog");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Db> StateMachine::Impl::OpenDatabase(std::string_view file_id) {
  absl::StatusOr<sqlite3*> opened = opener->Open(file_id, vfs.name());
  if (!opened.ok()) return opened.status();
  Db db(*opened);
  ConfigureConnection(db.get());
  random.InstallOn(db.get());
  guarded.InstallOn(db.get());
  Stmt page_size = MustPrepare(db.get(), "PRAGMA page_size");
  SYNOD_CHECK(MustStep(page_size.get()));
  if (sqlite3_column_int(page_size.get(), 0) != kPageSizeBytes) {
    return absl::FailedPreconditionError(absl::StrCat(
        "database ", ToAbsl(file_id), " does not use ", kPageSizeBytes, "-byte pages"));
  }
  return db;
}

// Reads the state from the system database and opens every database of its catalog.
absl::Status StateMachine::Impl::Load() {
  statements.Clear();
  databases.clear();
  Stmt stmt = MustPrepare(system.get(), "SELECT revision, now_unix_ms FROM _synod_revision");
  SYNOD_CHECK(MustStep(stmt.get()));
  revision = static_cast<uint64_t>(sqlite3_column_int64(stmt.get(), 0));
  now_unix_ms = sqlite3_column_int64(stmt.get(), 1);
  stmt = MustPrepare(system.get(), "SELECT work_units, as_of_unix_ms FROM _synod_costly_budget");
  SYNOD_CHECK(MustStep(stmt.get()));
  costly = {.work_units = sqlite3_column_int64(stmt.get(), 0),
            .as_of_unix_ms = sqlite3_column_int64(stmt.get(), 1)};
  stmt = MustPrepare(system.get(), "SELECT count(*) FROM _synod_entry_results");
  SYNOD_CHECK(MustStep(stmt.get()));
  mid_entry = sqlite3_column_int64(stmt.get(), 0) > 0;

  std::vector<std::string> files = opener->List();
  std::set<std::string, std::less<>> existing(files.begin(), files.end());
  std::set<std::string, std::less<>> catalogued;
  stmt = MustPrepare(system.get(), "SELECT name, file_id FROM _synod_catalog");
  while (MustStep(stmt.get())) {
    std::string name = ColumnString(stmt.get(), 0);
    Database db{.file_id = ColumnString(stmt.get(), 1), .generation = ++last_generation};
    if (!existing.contains(db.file_id)) {
      return absl::DataLossError(
          absl::StrCat("database ", name, " is missing its file ", db.file_id));
    }
    absl::StatusOr<Db> handle = OpenDatabase(db.file_id);
    if (!handle.ok()) return handle.status();
    db.handle = std::move(*handle);
    sqlite3_stmt* raw = nullptr;
    sqlite3_prepare_v2(db.handle.get(), "SELECT revision, request_index, result FROM _synod_meta",
                       -1, &raw, nullptr);
    Stmt meta(raw);
    if (meta == nullptr || sqlite3_step(meta.get()) != SQLITE_ROW) {
      return absl::DataLossError(absl::StrCat("database ", name, " has no _synod_meta row"));
    }
    db.revision = static_cast<uint64_t>(sqlite3_column_int64(meta.get(), 0));
    db.request_index = static_cast<uint64_t>(sqlite3_column_int64(meta.get(), 1));
    const std::string result = ColumnString(meta.get(), 2);
    SlotResults stored;
    if (!stored.ParseFromString(result)) {
      return absl::DataLossError(absl::StrCat("database ", name, " has a damaged _synod_meta row"));
    }
    if (stored.slot() == 0) {
      // Written by an older version: the result of the request at (revision, request_index).
      db.results_slot = db.revision;
      db.results[db.request_index] = ParseResult(result);
    } else {
      db.results_slot = stored.slot();
      for (const IndexedResult& entry : stored.results())
        db.results[entry.index()] = entry.result();
    }
    SYNOD_CHECK_LE(db.revision, revision + 1) << name;
    SYNOD_CHECK_LE(db.results_slot, revision + 1) << name;
    // A group may have committed here only the results of requests that changed nothing.
    mid_entry = mid_entry || db.revision > revision || db.results_slot > revision;
    catalogued.insert(db.file_id);
    databases.emplace(std::move(name), std::move(db));
  }
  for (const std::string& file : files) {
    if (file == kSystemFileId || catalogued.contains(file)) continue;
    absl::Status removed = opener->Remove(file);  // see "after a crash" at the top
    if (!removed.ok()) return removed;
  }
  stmt = MustPrepare(system.get(), "SELECT count(*) FROM _synod_sessions");
  SYNOD_CHECK(MustStep(stmt.get()));
  session_count = static_cast<size_t>(sqlite3_column_int64(stmt.get(), 0));
  SYNOD_CHECK_LE(session_count, kMaxSessions);
  return absl::OkStatus();
}

CommandResult StateMachine::Impl::ApplyRequest(uint64_t slot, uint64_t index,
                                               const ClientRequest& request, bool ends_entry) {
  now_unix_ms = request.timestamp_unix_ms();
  RefillCostlyBudget();
  // Results are stored for an entry's requests only until it ends: only an entry found half
  // applied at Open() can have one for this request.
  if (std::optional<CommandResult> stored =
          mid_entry ? EntryResult(index) : std::optional<CommandResult>()) {
    ChargeCostlyBudget(*stored);
    if (ends_entry) FinishEntry(slot);
    return *std::move(stored);
  }
  random.Reset(slot, index);
  // SQLite's own generator picks rowids once a table holds the largest one: seed it from
  // the request too. (It is process-wide: one state machine applies at a time.)
  sqlite3_test_control(SQLITE_TESTCTRL_PRNG_SEED,
                       static_cast<int>(slot * 0x9E3779B97F4A7C15ull + index), nullptr);
  statements.Exec(system.get(), "BEGIN");
  Outcome outcome = ApplyWithSession(slot, index, request);
  ChargeCostlyBudget(outcome.result);
  if (ends_entry) {
    // The entry's end commits with its last request: one transaction fewer per entry.
    StoreEntryEnd(slot);
  } else {
    StoreEntryResult(index, outcome.result.SerializeAsString());
  }
  statements.Exec(system.get(), "COMMIT");
  if (ends_entry) EntryEnded(slot);
  if (!outcome.file_to_remove.empty()) {
    absl::Status removed = opener->Remove(outcome.file_to_remove);
    SYNOD_CHECK(removed.ok()) << removed;
  }
  return outcome.result;
}

void StateMachine::Impl::ApplyRequests(uint64_t slot, const Value& value,
                                       std::vector<AppliedRequest>* applied) {
  const int count = value.requests_size();
  for (int i = 0; i < count; ++i) {
    const ClientRequest& request = value.requests(i);
    const bool last = i + 1 == count;
    const uint64_t index = static_cast<uint64_t>(i);
    std::optional<CommandResult> grouped = ApplyInGroup(slot, index, request, last);
    if (group.broken) {
      // Applied again one request at a time, from the group's first.
      const int first = group.first;
      RollBackGroup();
      for (int j = first; j <= i; ++j) {
        (*applied)[j].result =
            ApplyRequest(slot, static_cast<uint64_t>(j), value.requests(j), j + 1 == count);
      }
      continue;
    }
    if (grouped.has_value()) {
      (*applied)[i].result = *std::move(grouped);
      if (last && group.open) {
        CommitGroup(slot, /*ends_entry=*/true);
      } else if (last) {
        FinishEntry(slot);  // answered from _synod_entry_results: nothing else to commit
      } else if (group.result_bytes > kMaxGroupResultBytes) {
        CommitGroup(slot, /*ends_entry=*/false);
      }
      continue;
    }
    // It creates or drops a database, or runs ANALYZE: alone.
    if (group.open) CommitGroup(slot, /*ends_entry=*/false);
    (*applied)[i].result = ApplyRequest(slot, index, request, last);
  }
  SYNOD_CHECK(!group.open);
}

std::optional<CommandResult> StateMachine::Impl::ApplyInGroup(uint64_t slot, uint64_t index,
                                                              const ClientRequest& request,
                                                              bool ends_entry) {
  const Command& command = request.command();
  // Creating or dropping a database, and ANALYZE (whose statistics are reloaded after its
  // transaction: see Execute), apply alone.
  if (command.has_create_database() || command.has_drop_database() ||
      (command.has_execute() && RunsAnalyze(command.execute()))) {
    return std::nullopt;
  }
  now_unix_ms = request.timestamp_unix_ms();
  RefillCostlyBudget();
  if (std::optional<CommandResult> stored =
          mid_entry ? EntryResult(index) : std::optional<CommandResult>()) {
    ChargeCostlyBudget(*stored);
    return stored;
  }
  if (!group.open) OpenGroup(static_cast<int>(index));
  random.Reset(slot, index);
  sqlite3_test_control(SQLITE_TESTCTRL_PRNG_SEED,
                       static_cast<int>(slot * 0x9E3779B97F4A7C15ull + index), nullptr);
  Outcome outcome = ApplyWithSession(slot, index, request);
  if (group.broken) return std::nullopt;
  SYNOD_CHECK(outcome.file_to_remove.empty()) << "only a drop removes a file";
  ChargeCostlyBudget(outcome.result);
  const std::string serialized = outcome.result.SerializeAsString();
  // Kept until the entry ends, for a crash after this group commits and before it does (the
  // group that ends the entry clears them in the same commit).
  if (!ends_entry) StoreEntryResult(index, serialized);
  group.result_bytes += serialized.size();
  return std::move(outcome.result);
}

void StateMachine::Impl::OpenGroup(int first) {
  SYNOD_CHECK(!group.open);
  group = Group{.open = true,
                .first = first,
                .session_count = session_count,
                .costly_work_units = costly.work_units,
                .costly_as_of_unix_ms = costly.as_of_unix_ms};
  statements.Exec(system.get(), "BEGIN");
}

void StateMachine::Impl::JoinGroup(std::string_view name, Database& db) {
  SYNOD_CHECK(group.open && !db.in_group);
  group.saved.emplace(std::string(name), Group::SavedDatabase{.revision = db.revision,
                                                              .request_index = db.request_index,
                                                              .results_slot = db.results_slot,
                                                              .results = db.results});
  group.touched.emplace_back(name);
  statements.Exec(db.handle.get(), "BEGIN");
  db.in_group = true;
}

void StateMachine::Impl::CommitGroup(uint64_t slot, bool ends_entry) {
  SYNOD_CHECK(group.open);
  // User databases first: a crash before the system database commits leaves each with the
  // results of its requests (SlotResults), and the entry is applied again from them.
  for (const std::string& name : group.touched) {
    Database& db = databases.find(name)->second;
    sqlite3* handle = db.handle.get();
    StatementCache::Lease meta = statements.Get(
        handle, "UPDATE _synod_meta SET revision = ?, request_index = ?, result = ? WHERE id = 0");
    MustBindInt64(meta.get(), 1, static_cast<int64_t>(db.revision));
    MustBindInt64(meta.get(), 2, static_cast<int64_t>(db.request_index));
    MustBindBlob(meta.get(), 3, SlotResultsBlob(db));
    SYNOD_CHECK(!MustStep(meta.get()));
    SYNOD_CHECK_EQ(sqlite3_changes(handle), 1);
    meta.reset();
    statements.Exec(handle, "COMMIT");
    db.in_group = false;
  }
  if (ends_entry) StoreEntryEnd(slot);
  statements.Exec(system.get(), "COMMIT");
  if (ends_entry) EntryEnded(slot);
  group = Group{};
}

void StateMachine::Impl::RollBackGroup() {
  SYNOD_CHECK(group.open);
  for (const std::string& name : group.touched) {
    Database& db = databases.find(name)->second;
    // The statement that broke the group may have ended its database's transaction.
    if (!sqlite3_get_autocommit(db.handle.get())) MustExec(db.handle.get(), "ROLLBACK");
    Group::SavedDatabase& saved = group.saved.find(name)->second;
    db.revision = saved.revision;
    db.request_index = saved.request_index;
    db.results_slot = saved.results_slot;
    db.results = std::move(saved.results);
    db.in_group = false;
  }
  MustExec(system.get(), "ROLLBACK");
  session_count = group.session_count;
  costly = {.work_units = group.costly_work_units, .as_of_unix_ms = group.costly_as_of_unix_ms};
  group = Group{};
}

std::string StateMachine::Impl::SlotResultsBlob(const Database& db) {
  SlotResults stored;
  stored.set_slot(db.results_slot);
  for (const auto& [index, result] : db.results) {
    IndexedResult* entry = stored.add_results();
    entry->set_index(index);
    *entry->mutable_result() = result;
  }
  return stored.SerializeAsString();
}

StateMachine::Impl::Outcome StateMachine::Impl::ApplyWithSession(uint64_t slot, uint64_t index,
                                                                 const ClientRequest& request) {
  const uint64_t client_id = request.client_id();
  if (client_id == 0) return RunCommand(slot, index, request.command());
  std::optional<Session> session = LoadSession(client_id);
  bool dedup = true;
#ifdef SYNOD_TESTING_BUGS
  dedup = !options.testing_no_session_dedup;
#endif
  if (dedup && session.has_value() && request.sequence() == session->sequence) {
    Outcome repeated{.result = session->result};
    repeated.result.clear_costly_work_units();  // answered from the session: costs nothing now
    return repeated;
  }
  if (session.has_value() ? request.sequence() < session->sequence : request.sequence() != 1) {
    CommandResult expired =
        Failure(SESSION_EXPIRED,
                session.has_value()
                    ? absl::StrCat("sequence ", request.sequence(), " of client ", client_id,
                                   " is older than its last applied sequence ", session->sequence)
                    : absl::StrCat("client ", client_id,
                                   " has no session: a new client starts at sequence 1"));
    expired.set_revision(slot);
    return {.result = expired};
  }
  Outcome outcome = RunCommand(slot, index, request.command());
  StoreSession(client_id, request.sequence(), slot, outcome.result, !session.has_value());
  return outcome;
}

std::optional<StateMachine::Impl::Session> StateMachine::Impl::LoadSession(uint64_t client_id) {
  StatementCache::Lease stmt = statements.Get(
      system.get(), "SELECT sequence, result FROM _synod_sessions WHERE client_id = ?");
  MustBindInt64(stmt.get(), 1, static_cast<int64_t>(client_id));
  if (!MustStep(stmt.get())) return std::nullopt;
  return Session{.sequence = static_cast<uint64_t>(sqlite3_column_int64(stmt.get(), 0)),
                 .result = ParseResult(ColumnString(stmt.get(), 1))};
}

void StateMachine::Impl::StoreSession(uint64_t client_id, uint64_t sequence, uint64_t slot,
                                      const CommandResult& result, bool is_new) {
  if (is_new && session_count == kMaxSessions) {
    MustExec(system.get(),
             "DELETE FROM _synod_sessions WHERE client_id = (SELECT client_id FROM "
             "_synod_sessions ORDER BY revision, client_id LIMIT 1)");
    SYNOD_CHECK_EQ(sqlite3_changes(system.get()), 1);
  } else if (is_new) {
    ++session_count;
  }
  SYNOD_CHECK_LE(session_count, kMaxSessions);
  StatementCache::Lease stmt =
      statements.Get(system.get(), "INSERT OR REPLACE INTO _synod_sessions VALUES (?, ?, ?, ?)");
  MustBindInt64(stmt.get(), 1, static_cast<int64_t>(client_id));
  MustBindInt64(stmt.get(), 2, static_cast<int64_t>(sequence));
  MustBindInt64(stmt.get(), 3, static_cast<int64_t>(slot));
  MustBindBlob(stmt.get(), 4, result.SerializeAsString());
  SYNOD_CHECK(!MustStep(stmt.get()));
}

void StateMachine::Impl::RefillCostlyBudget() {
  // Timestamps come from the clocks of the replicas that received the requests. Time that
  // goes back refills nothing, but the ration follows it back: one replica whose clock ran
  // far ahead must not starve costly writes until the others' clocks catch up. (Skewed
  // clocks can only refill it faster, never stop it.) A request with no time says nothing.
  if (now_unix_ms <= 0) return;
  const int64_t elapsed_ms = now_unix_ms - costly.as_of_unix_ms;
  costly.as_of_unix_ms = now_unix_ms;
  if (elapsed_ms <= 0) return;
  // Past a full refill's worth of time the ration is full (and nothing overflows).
  if (elapsed_ms >= (kMaxCostlyWorkUnits / kCostlyWorkUnitsPerSecond + 1) * 1000) {
    costly.work_units = kMaxCostlyWorkUnits;
  } else {
    costly.work_units = std::min(kMaxCostlyWorkUnits,
                                 costly.work_units + elapsed_ms * kCostlyWorkUnitsPerSecond / 1000);
  }
}

void StateMachine::Impl::ChargeCostlyBudget(const CommandResult& result) {
  costly.work_units -= static_cast<int64_t>(result.costly_work_units());
}

void StateMachine::Impl::StoreEntryResult(uint64_t index, const std::string& serialized) {
  StatementCache::Lease stmt =
      statements.Get(system.get(), "INSERT INTO _synod_entry_results VALUES (?, ?)");
  MustBindInt64(stmt.get(), 1, static_cast<int64_t>(index));
  MustBindBlob(stmt.get(), 2, serialized);
  SYNOD_CHECK(!MustStep(stmt.get()));
}

std::optional<CommandResult> StateMachine::Impl::EntryResult(uint64_t index) {
  StatementCache::Lease stmt = statements.Get(
      system.get(), "SELECT result FROM _synod_entry_results WHERE request_index = ?");
  MustBindInt64(stmt.get(), 1, static_cast<int64_t>(index));
  if (!MustStep(stmt.get())) return std::nullopt;
  return ParseResult(ColumnString(stmt.get(), 0));
}

void StateMachine::Impl::FinishEntry(uint64_t slot) {
  statements.Exec(system.get(), "BEGIN");
  StoreEntryEnd(slot);
  statements.Exec(system.get(), "COMMIT");
  EntryEnded(slot);
}

void StateMachine::Impl::StoreEntryEnd(uint64_t slot) {
  statements.Exec(system.get(), "DELETE FROM _synod_entry_results");
  StatementCache::Lease stmt = statements.Get(
      system.get(), "UPDATE _synod_revision SET revision = ?, now_unix_ms = ? WHERE id = 0");
  MustBindInt64(stmt.get(), 1, static_cast<int64_t>(slot));
  MustBindInt64(stmt.get(), 2, now_unix_ms);
  SYNOD_CHECK(!MustStep(stmt.get()));
  SYNOD_CHECK_EQ(sqlite3_changes(system.get()), 1);
  stmt.reset();
  StatementCache::Lease budget = statements.Get(
      system.get(),
      "UPDATE _synod_costly_budget SET work_units = ?, as_of_unix_ms = ? WHERE id = 0");
  MustBindInt64(budget.get(), 1, costly.work_units);
  MustBindInt64(budget.get(), 2, costly.as_of_unix_ms);
  SYNOD_CHECK(!MustStep(budget.get()));
  SYNOD_CHECK_EQ(sqlite3_changes(system.get()), 1);
}

void StateMachine::Impl::EntryEnded(uint64_t slot) {
  revision = slot;
  mid_entry = false;
}

absl::StatusOr<std::unique_ptr<StateMachine>> StateMachine::Open(DatabaseOpener* opener,
                                                                 StateMachineOptions options) {
  SYNOD_CHECK(opener != nullptr);
  std::unique_ptr<StateMachine> machine(new StateMachine());
  machine->impl_ = std::make_unique<Impl>(opener);
  machine->impl_->options = options;
  Impl& impl = *machine->impl_;
  absl::StatusOr<Db> system = impl.OpenDatabase(kSystemFileId);
  if (!system.ok()) return system.status();
  impl.system = std::move(*system);
  MustExec(impl.system.get(), "BEGIN");
  MustExec(impl.system.get(), kSystemSchema);
  Stmt costly =
      MustPrepare(impl.system.get(), "INSERT OR IGNORE INTO _synod_costly_budget VALUES (0, ?, 0)");
  MustBindInt64(costly.get(), 1, kMaxCostlyWorkUnits);  // a new group starts with it full
  SYNOD_CHECK(!MustStep(costly.get()));
  costly.reset();
  MustExec(impl.system.get(), "COMMIT");
  absl::Status loaded = impl.Load();
  if (!loaded.ok()) return loaded;
  return machine;
}

StateMachine::~StateMachine() = default;

std::vector<AppliedRequest> StateMachine::Apply(uint64_t slot, const Value& value) {
  SYNOD_CHECK_EQ(slot, impl_->revision + 1) << "entries apply in slot order";
  SYNOD_CHECK(!value.noop() || value.requests().empty()) << "a no-op carries no requests";
  // Idle readers read the state before this entry: they end their transactions first, so
  // that none holds the WAL while the entry commits (SQLite then starts it over after a
  // checkpoint, instead of growing it).
  for (auto& [name, readers] : impl_->idle_readers) {
    for (std::unique_ptr<DatabaseReader>& reader : readers) reader->EndRead();
  }
  std::vector<AppliedRequest> applied;
  applied.reserve(value.requests_size());
  for (const ClientRequest& request : value.requests()) {
    applied.push_back({.client_id = request.client_id(),
                       .sequence = request.sequence(),
                       .origin_replica = request.origin_replica(),
                       .result = {}});
  }
  if (value.requests_size() == 0) {
    impl_->FinishEntry(slot);
  } else {
    impl_->ApplyRequests(slot, value, &applied);
  }
  return applied;
}

uint64_t StateMachine::revision() const { return impl_->revision; }

absl::Status StateMachine::Validate(const Command& command) {
  if (absl::Status fields = CheckCommandFields(command); !fields.ok()) return fields;
  if (command.has_create_database() && !command.create_database().image().empty()) {
    absl::StatusOr<Db> image = LoadImage(command.create_database().image());
    absl::Status prepared = image.ok() ? PrepareUploadedImage(image->get()) : image.status();
    if (!prepared.ok()) return prepared;
  }
  const synod::Execute* execute = command.has_execute() ? &command.execute()
                                  : command.has_put_media() && command.put_media().has_execute()
                                      ? &command.put_media().execute()
                                      : nullptr;
  if (execute != nullptr) {
    // The state machine's own table exists here, so statements naming it reach the policy.
    // Statements are only prepared on it, never run, so one per thread serves every check.
    thread_local Db scratch = [] {
      Db db = OpenScratch();
      MustExec(db.get(), kUserMetaSchema);
      return db;
    }();
    for (int i = 0; i < execute->statements_size(); ++i) {
      absl::Status policy = CheckStatementPolicy(scratch.get(), execute->statements(i));
      if (!policy.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("statement ", i + 1, ": ", policy.message()));
      }
    }
  }
  return absl::OkStatus();
}

DatabaseReader::DatabaseReader(std::string database, uint64_t generation)
    : database_(std::move(database)),
      generation_(generation),
      vfs_(std::make_unique<TimeSourceVfs>([this] { return now_unix_ms_; })) {}

DatabaseReader::~DatabaseReader() = default;

void DatabaseReader::BeginRead() {
  if (keeps_transaction_ && sqlite3_get_autocommit(db_.get())) {
    statements_.Exec(db_.get(), "BEGIN");
  }
}

void DatabaseReader::EndRead() {
  // An interrupted statement may have ended the transaction already.
  if (!sqlite3_get_autocommit(db_.get())) statements_.Exec(db_.get(), "COMMIT");
}

absl::StatusOr<StatementResult> DatabaseReader::Query(const Statement& statement) {
  if (interrupted_.load()) {
    return absl::DeadlineExceededError("the statement was interrupted: it ran out of time");
  }
  BeginRead();
  WorkBudget budget;
  // An Interrupt() between the check above and the statement's start would be forgotten by
  // SQLite; the flag, checked as the statement runs, is not.
  budget.set_cancel_flag(&interrupted_);
  absl::StatusOr<StatementResult> result =
      RunUserStatement(db_.get(), statement, /*read_only=*/true, &budget, &queries_);
  if (absl::IsPermissionDenied(result.status())) {
    return absl::InvalidArgumentError(result.status().message());
  }
  return result;
}

std::optional<absl::StatusOr<StatementResult>> DatabaseReader::TryQuery(const Statement& statement,
                                                                        int64_t max_work_units) {
  WorkBudget budget(max_work_units);
  BeginRead();
  absl::StatusOr<StatementResult> result =
      RunUserStatement(db_.get(), statement, /*read_only=*/true, &budget, &queries_);
  if (!result.ok() && budget.work_exhausted() && max_work_units < kMaxRequestWorkUnits) {
    return std::nullopt;
  }
  if (absl::IsPermissionDenied(result.status())) {
    return absl::InvalidArgumentError(result.status().message());
  }
  return result;
}

void DatabaseReader::Interrupt() {
  interrupted_.store(true);
  sqlite3_interrupt(db_.get());
}

absl::StatusOr<std::unique_ptr<DatabaseReader>> StateMachine::AcquireReader(
    std::string_view database) {
  auto it = impl_->databases.find(database);
  if (it == impl_->databases.end()) {
    return absl::NotFoundError(absl::StrCat("no database named ", Quote(database)));
  }
  std::unique_ptr<DatabaseReader> reader;
  auto idle = impl_->idle_readers.find(database);
  if (idle != impl_->idle_readers.end() && !idle->second.empty()) {
    reader = std::move(idle->second.back());
    idle->second.pop_back();
    SYNOD_CHECK_EQ(reader->generation_, it->second.generation);
  } else {
    reader.reset(new DatabaseReader(std::string(database), it->second.generation));
    reader->keeps_transaction_ = impl_->opener->ReadersKeepTransactions();
    absl::StatusOr<sqlite3*> opened =
        impl_->opener->OpenReadOnly(it->second.file_id, reader->vfs_->name());
    if (!opened.ok()) return opened.status();
    reader->db_.reset(*opened);
    ConfigureConnection(reader->db_.get());
    MustExec(reader->db_.get(), "PRAGMA query_only = ON");
    reader->random_.InstallOn(reader->db_.get());
    reader->guarded_.InstallOn(reader->db_.get());
  }
  reader->interrupted_.store(false);
  reader->acquired_at_revision_ = impl_->revision;
  reader->now_unix_ms_ = impl_->now_unix_ms;
  reader->random_.Reset(impl_->revision, kQueryRequestIndex);
  return reader;
}

void StateMachine::ReleaseReader(std::unique_ptr<DatabaseReader> reader) {
  SYNOD_CHECK(reader != nullptr);
  auto it = impl_->databases.find(reader->database());
  if (it == impl_->databases.end() || it->second.generation != reader->generation_) return;
  // A query on a worker may have begun its transaction after later entries applied.
  if (reader->acquired_at_revision_ != impl_->revision) reader->EndRead();
  // Every reader holds file descriptors (the database, its -wal and -shm): few are kept.
  size_t idle_total = 0;
  for (const auto& [name, readers] : impl_->idle_readers) idle_total += readers.size();
  std::vector<std::unique_ptr<DatabaseReader>>& idle = impl_->idle_readers[reader->database()];
  if (idle.size() < Impl::kMaxIdleReaders && idle_total < Impl::kMaxIdleReadersTotal) {
    idle.push_back(std::move(reader));
  }
}

absl::StatusOr<StatementResult> StateMachine::Query(std::string_view database,
                                                    const Statement& statement) {
  absl::StatusOr<std::unique_ptr<DatabaseReader>> reader = AcquireReader(database);
  if (!reader.ok()) return reader.status();
  absl::StatusOr<StatementResult> result = (*reader)->Query(statement);
  ReleaseReader(*std::move(reader));
  return result;
}

std::vector<std::pair<std::string, uint64_t>> StateMachine::ListDatabases() const {
  std::vector<std::pair<std::string, uint64_t>> databases;
  for (const auto& [name, db] : impl_->databases) databases.emplace_back(name, db.revision);
  return databases;
}

absl::StatusOr<uint64_t> StateMachine::ImageBytes(std::string_view database) {
  auto it = impl_->databases.find(database);
  if (it == impl_->databases.end()) {
    return absl::NotFoundError(absl::StrCat("no database named ", Quote(database)));
  }
  return FileBytes(it->second.handle.get());
}

absl::StatusOr<std::string> StateMachine::Backup(std::string_view database) {
  auto it = impl_->databases.find(database);
  if (it == impl_->databases.end()) {
    return absl::NotFoundError(absl::StrCat("no database named ", Quote(database)));
  }
  return SerializeDatabase(it->second.handle.get());
}

absl::StatusOr<PutMedia> StateMachine::GetMedia(std::string_view database, std::string_view key) {
  // Prepared once: a media read runs it on the loop for every request.
  StatementCache::Lease stmt = impl_->statements.Get(
      impl_->system.get(),
      "SELECT sha256, size_bytes, content_type FROM _synod_media WHERE database = ? AND key = ?");
  MustBindText(stmt.get(), 1, database);
  MustBindText(stmt.get(), 2, key);
  if (!MustStep(stmt.get())) {
    return absl::NotFoundError(
        absl::StrCat("no media ", Quote(key), " in database ", Quote(database)));
  }
  synod::PutMedia media;
  media.set_database(std::string(database));
  media.set_key(std::string(key));
  media.set_sha256(ColumnString(stmt.get(), 0));
  media.set_size_bytes(static_cast<uint64_t>(sqlite3_column_int64(stmt.get(), 1)));
  media.set_content_type(ColumnString(stmt.get(), 2));
  return media;
}

absl::StatusOr<std::vector<StateMachine::MediaRecord>> StateMachine::ListMedia(
    std::string_view database, std::string_view after_key, size_t limit) {
  if (!impl_->databases.contains(database)) {
    return absl::NotFoundError(absl::StrCat("no database named ", Quote(database)));
  }
  Stmt stmt =
      MustPrepare(impl_->system.get(),
                  "SELECT key, sha256, size_bytes, content_type, revision FROM _synod_media "
                  "WHERE database = ? AND key > ? ORDER BY key LIMIT ?");
  MustBindText(stmt.get(), 1, database);
  MustBindText(stmt.get(), 2, after_key);
  MustBindInt64(stmt.get(), 3, static_cast<int64_t>(std::min<size_t>(limit, INT64_MAX)));
  std::vector<MediaRecord> page;
  while (MustStep(stmt.get())) {
    MediaRecord& record = page.emplace_back();
    record.media.set_database(std::string(database));
    record.media.set_key(ColumnString(stmt.get(), 0));
    record.media.set_sha256(ColumnString(stmt.get(), 1));
    record.media.set_size_bytes(static_cast<uint64_t>(sqlite3_column_int64(stmt.get(), 2)));
    record.media.set_content_type(ColumnString(stmt.get(), 3));
    record.revision = static_cast<uint64_t>(sqlite3_column_int64(stmt.get(), 4));
  }
  return page;
}

absl::StatusOr<std::string> StateMachine::NameOwner(std::string_view name) {
  Stmt stmt = MustPrepare(impl_->system.get(), "SELECT owner FROM _synod_names WHERE name = ?");
  MustBindText(stmt.get(), 1, name);
  if (!MustStep(stmt.get())) {
    return absl::NotFoundError(absl::StrCat("name ", Quote(name), " is not registered"));
  }
  return ColumnString(stmt.get(), 0);
}

absl::StatusOr<std::string> StateMachine::Snapshot(uint64_t max_bytes) {
  if (impl_->mid_entry) {
    return absl::FailedPreconditionError(
        absl::StrCat("slot ", impl_->revision + 1, " is half applied; apply it first"));
  }
  absl::StatusOr<uint64_t> system_bytes = FileBytes(impl_->system.get());
  if (!system_bytes.ok()) return system_bytes.status();
  uint64_t total_bytes = *system_bytes;
  for (const auto& [name, db] : impl_->databases) {
    absl::StatusOr<uint64_t> bytes = FileBytes(db.handle.get());
    if (!bytes.ok()) {
      return absl::Status(bytes.status().code(),
                          absl::StrCat("database ", name, ": ", bytes.status().message()));
    }
    total_bytes += *bytes;
  }
  if (total_bytes > max_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the databases hold ", total_bytes, " bytes; a snapshot holds at most ", max_bytes));
  }
  std::string snapshot(kSnapshotMagic);
  auto append = [&snapshot](std::string_view file_id, sqlite3* db) -> absl::Status {
    absl::StatusOr<std::string> image = SerializeDatabase(db);
    if (!image.ok()) return image.status();
    snapshot += SnapshotFrameHeader(file_id, image->size());
    snapshot.append(*image);
    return absl::OkStatus();
  };
  if (absl::Status appended = append(kSystemFileId, impl_->system.get()); !appended.ok()) {
    return appended;
  }
  for (const auto& [name, db] : impl_->databases) {
    if (absl::Status appended = append(db.file_id, db.handle.get()); !appended.ok()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("no snapshot of database ", name, ": ", appended.message()));
    }
  }
  StableHash checksum;
  checksum.Add(snapshot);
  AppendSnapshotU64(&snapshot, checksum.value());
  return snapshot;
}

namespace {

// Decodes and checks a whole snapshot (framing, checksum, every image, the catalog).
absl::StatusOr<SnapshotImages> LoadSnapshot(std::string_view snapshot) {
  absl::StatusOr<SnapshotFrames> frames = DecodeSnapshot(snapshot);
  if (!frames.ok()) return frames.status();
  SnapshotImages images;
  for (const auto& [file_id, bytes] : *frames) {
    absl::StatusOr<Db> image = LoadImage(bytes);
    if (!image.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("snapshot database ", ToAbsl(file_id), ": ", image.status().message()));
    }
    if (!images.emplace(std::string(file_id), std::move(*image)).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("snapshot holds database ", ToAbsl(file_id), " twice"));
    }
  }
  return images;
}

}  // namespace

absl::Status StateMachine::CheckSnapshotImages(const SnapshotImages& images, uint64_t revision) {
  if (absl::Status whole = CheckImagesFormAState(images); !whole.ok()) return whole;
  Stmt stmt = MustPrepare(images.at(kSystemFileId).get(), "SELECT revision FROM _synod_revision");
  SYNOD_CHECK(MustStep(stmt.get()));  // CheckImagesFormAState found the row
  uint64_t held = static_cast<uint64_t>(sqlite3_column_int64(stmt.get(), 0));
  if (held != revision) {
    return absl::InvalidArgumentError(
        absl::StrCat("the snapshot holds revision ", held, ", not ", revision));
  }
  return absl::OkStatus();
}

absl::Status StateMachine::CheckSnapshot(std::string_view snapshot, uint64_t revision) {
  absl::StatusOr<SnapshotImages> images = LoadSnapshot(snapshot);
  if (!images.ok()) return images.status();
  return CheckSnapshotImages(*images, revision);
}

absl::Status StateMachine::RestoreSnapshot(std::string_view snapshot) {
  // Check everything before changing anything.
  absl::StatusOr<SnapshotImages> loaded = LoadSnapshot(snapshot);
  if (!loaded.ok()) return loaded.status();
  if (absl::Status whole = CheckImagesFormAState(*loaded); !whole.ok()) return whole;
  return RestoreSnapshotImages(*std::move(loaded));
}

namespace {

// A read-only connection to `file_id` in a read transaction begun now.
absl::StatusOr<Db> OpenHeldReader(DatabaseOpener& opener, const std::string& file_id) {
  absl::StatusOr<sqlite3*> opened = opener.OpenReadOnly(file_id, nullptr);
  if (!opened.ok()) return opened.status();
  Db reader(*opened);
  // The read transaction begins at the first read: the state as of this revision.
  if (sqlite3_exec(reader.get(), "BEGIN; SELECT count(*) FROM sqlite_schema;", nullptr, nullptr,
                   nullptr) != SQLITE_OK) {
    return absl::UnavailableError(absl::StrCat("cannot read database ", file_id, ": ",
                                               ValidUtf8(sqlite3_errmsg(reader.get()))));
  }
  return reader;
}

}  // namespace

absl::StatusOr<SnapshotView> StateMachine::OpenSnapshotView() {
  if (impl_->mid_entry) {
    return absl::FailedPreconditionError(
        absl::StrCat("slot ", impl_->revision + 1, " is half applied; apply it first"));
  }
  if (!impl_->opener->ReadersKeepTransactions()) {
    return absl::UnimplementedError("these databases cannot be read beside their writer");
  }
  SnapshotView view;
  view.revision = impl_->revision;
  std::vector<std::string> file_ids{std::string(kSystemFileId)};
  for (const auto& [name, db] : impl_->databases) {
    file_ids.push_back(db.file_id);
    view.positions.push_back({name, db.revision, db.request_index});
  }
  for (const std::string& file_id : file_ids) {
    absl::StatusOr<Db> reader = OpenHeldReader(*impl_->opener, file_id);
    if (!reader.ok()) return reader.status();
    view.databases.emplace_back(file_id, *std::move(reader));
  }
  return view;
}

absl::StatusOr<Db> StateMachine::OpenSystemView() {
  if (!impl_->opener->ReadersKeepTransactions()) {
    return absl::UnimplementedError("these databases cannot be read beside their writer");
  }
  return OpenHeldReader(*impl_->opener, kSystemFileId);
}

absl::StatusOr<Db> StateMachine::OpenDatabaseView(std::string_view database) {
  auto it = impl_->databases.find(database);
  if (it == impl_->databases.end()) {
    return absl::NotFoundError(absl::StrCat("no database named ", Quote(database)));
  }
  if (!impl_->opener->ReadersKeepTransactions()) {
    return absl::UnimplementedError("these databases cannot be read beside their writer");
  }
  return OpenHeldReader(*impl_->opener, it->second.file_id);
}

absl::Status StateMachine::RestoreSnapshotImages(SnapshotImages images) {
  // The caller checked the images (CheckSnapshotImages).

  // The images backed by files, closed so that their files can be moved into place.
  std::map<std::string, std::string, std::less<>> files;  // file id -> path
  if (impl_->opener->AdoptsFiles()) {
    for (auto& [file_id, image] : images) {
      const char* path = sqlite3_db_filename(image.get(), "main");
      if (path == nullptr || path[0] == '\0') continue;  // in memory
      files.emplace(file_id, path);
      image.reset();
    }
  }

  // Remove the system database first: a crash from here on leaves no catalog, so Open()
  // starts from an empty state (removing every user file) rather than from a mixed one.
  impl_->idle_readers.clear();
  impl_->statements.Clear();
  impl_->databases.clear();
  impl_->system_hasher.reset();
  impl_->system.reset();
  absl::Status removed = impl_->opener->Remove(kSystemFileId);
  SYNOD_CHECK(removed.ok()) << removed;
  for (const std::string& file_id : impl_->opener->List()) {
    removed = impl_->opener->Remove(file_id);
    SYNOD_CHECK(removed.ok()) << removed;
  }
  // Each database is moved or copied into place; the system database last, since its
  // catalog makes the state whole.
  auto install = [&](const std::string& file_id, Db& image) -> Db {
    auto staged = files.find(file_id);
    const absl::Status adopted = staged != files.end()
                                     ? impl_->opener->Adopt(file_id, staged->second)
                                     : absl::UnimplementedError("not a file");
    SYNOD_CHECK(!absl::IsDataLoss(adopted)) << adopted;
    if (adopted.ok()) {
      absl::StatusOr<Db> db = impl_->OpenDatabase(file_id);
      SYNOD_CHECK(db.ok()) << db.status();
      return *std::move(db);
    }
    if (staged != files.end()) {
      // Not moved (another file system): copied from its file.
      sqlite3* raw = nullptr;
      const int rc = sqlite3_open_v2(staged->second.c_str(), &raw,
                                     SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, nullptr);
      image = Db(raw);
      SYNOD_CHECK_EQ(rc, SQLITE_OK) << "cannot open the checked image " << staged->second;
    }
    absl::StatusOr<Db> db = impl_->OpenDatabase(file_id);
    SYNOD_CHECK(db.ok()) << db.status();
    CopyDatabase(image.get(), db->get());
    return *std::move(db);
  };
  for (auto& [file_id, image] : images) {
    if (file_id != kSystemFileId) install(file_id, image);
  }
  impl_->system = install(std::string(kSystemFileId), images.find(kSystemFileId)->second);
  absl::Status reloaded = impl_->Load();
  SYNOD_CHECK(reloaded.ok()) << reloaded;
  return absl::OkStatus();
}

// Its format is kStateHashFormat (core/divergence.h), as StateHash's: change both with it.
uint64_t StateMachine::StateHashOf(SnapshotView& view) {
  SYNOD_CHECK_EQ(view.databases.size(), view.positions.size() + 1);
  SYNOD_CHECK(!view.databases.empty() && view.databases[0].first == kSystemFileId);
  StableHash hash;
  hash.AddField(kSystemFileId);
  DatabaseHasher(view.databases[0].second.get()).Hash(&hash);
  view.databases[0].second.reset();
  for (size_t i = 0; i < view.positions.size(); ++i) {
    const SnapshotView::Position& position = view.positions[i];
    Db& reader = view.databases[i + 1].second;
    hash.AddField(position.name);
    StableHash content;
    DatabaseHasher(reader.get()).Hash(&content, "_synod_meta");
    reader.reset();  // its read transaction no longer holds back its WAL
    hash.AddU64(content.value());
    hash.AddU64(position.revision);
    hash.AddU64(position.request_index);
  }
  return hash.value();
}

// Its format is kStateHashFormat (core/divergence.h): change that with it, and StateHashOf.
uint64_t StateMachine::StateHash(HashMode mode) {
  StableHash hash;
  hash.AddField(kSystemFileId);
  if (!impl_->system_hasher.has_value()) impl_->system_hasher.emplace(impl_->system.get());
  impl_->system_hasher->Hash(&hash);
  for (auto& [name, db] : impl_->databases) {
    hash.AddField(name);
    if (mode == HashMode::kFresh || !db.content_hash.has_value() ||
        db.hashed_revision != db.revision || db.hashed_request_index != db.request_index) {
      // Not the results kept for a crash (SlotResults): which requests they hold depends on
      // how the entry was grouped, which a crash can change.
      StableHash content;
      if (mode == HashMode::kFresh) {
        // Nothing kept on the connection: a vote is rare, and a database may hold many
        // tables (one statement each).
        DatabaseHasher(db.handle.get()).Hash(&content, "_synod_meta");
      } else {
        if (db.hasher == nullptr) db.hasher = std::make_unique<DatabaseHasher>(db.handle.get());
        db.hasher->Hash(&content, "_synod_meta");
      }
      db.content_hash = content.value();
      db.hashed_revision = db.revision;
      db.hashed_request_index = db.request_index;
    }
    hash.AddU64(*db.content_hash);
    hash.AddU64(db.revision);
    hash.AddU64(db.request_index);
  }
  return hash.value();
}

void AppendSnapshotU64(std::string* out, uint64_t value) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>(value >> (8 * i)));
}

uint64_t DecodeSnapshotU64(std::string_view in) {
  SYNOD_CHECK_GE(in.size(), kSnapshotU64Bytes);
  uint64_t value = 0;
  for (int i = 0; i < 8; ++i) {
    value |= static_cast<uint64_t>(static_cast<unsigned char>(in[i])) << (8 * i);
  }
  return value;
}

std::string SnapshotFrameHeader(std::string_view file_id, uint64_t image_bytes) {
  std::string header;
  AppendSnapshotU64(&header, file_id.size());
  header.append(file_id);
  AppendSnapshotU64(&header, image_bytes);
  return header;
}

bool IsValidMediaKey(std::string_view key) {
  constexpr size_t kMaxKeyBytes = 200;
  if (key.empty() || key.size() > kMaxKeyBytes || key.find("..") != std::string_view::npos) {
    return false;
  }
  for (char c : key) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '~' &&
        c != '-') {
      return false;
    }
  }
  return true;
}

bool IsValidContentType(std::string_view type) {
  constexpr size_t kMaxTypeBytes = 255;
  if (type.empty() || type.size() > kMaxTypeBytes) return false;
  for (char c : type) {
    if (c < 0x20 || c > 0x7e) return false;
  }
  return true;
}

bool IsValidDatabaseName(std::string_view name) {
  constexpr size_t kMaxNameBytes = 64;
  if (name.empty() || name.size() > kMaxNameBytes) return false;
  for (char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

std::string DatabaseFileId(std::string_view name) {
  StableHash hash;
  hash.Add(name);
  constexpr char kHexDigits[] = "0123456789abcdef";
  std::string file_id(16, '0');
  for (int i = 0; i < 16; ++i) file_id[15 - i] = kHexDigits[(hash.value() >> (4 * i)) & 0xf];
  return file_id;
}

}  // namespace synod

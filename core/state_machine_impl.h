#ifndef SYNOD_CORE_STATE_MACHINE_IMPL_H_
#define SYNOD_CORE_STATE_MACHINE_IMPL_H_

// The inside of StateMachine, shared by its two source files: state_machine.cc (how entries
// apply and survive a crash, sessions, snapshots) and state_machine_commands.cc (what each
// command does). Nothing else includes this.

#include <sqlite3.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/deterministic_sqlite.h"
#include "core/sqlite_util.h"
#include "core/state_machine.h"
#include "core/synod.pb.h"

namespace synod {
namespace state_machine_internal {

inline constexpr char kSystemFileId[] = "system";

// Each user database's position and the result of the last request that changed it.
inline constexpr char kUserMetaSchema[] = R"sql(
  CREATE TABLE _synod_meta(
    id INTEGER PRIMARY KEY CHECK (id = 0),
    revision INTEGER NOT NULL,
    request_index INTEGER NOT NULL,
    result BLOB NOT NULL);
)sql";

// Debian's Abseil has its own string_view type (see TOOLCHAIN.md).
inline absl::string_view ToAbsl(std::string_view text) { return {text.data(), text.size()}; }

// A result with an error `code`.
CommandResult Failure(ErrorCode code, absl::string_view message);

// Parses a result the state machine stored itself (a failure is a broken invariant).
CommandResult ParseResult(std::string_view bytes);

// A prefix of `text`, escaped, for an error message.
std::string Quote(std::string_view text);

// The checks that need no state, made both by Validate() and at apply time.
absl::Status CheckCommandFields(const Command& command);

// Readies an uploaded image to become a user database: its own _synod_meta (from a backup
// of a Synod database) gives way to the new one, and no other _synod_ name may remain.
absl::Status PrepareUploadedImage(sqlite3* image);

}  // namespace state_machine_internal

struct StateMachine::Impl {
  struct Database {
    std::string file_id{};
    Db handle{};
    // The position of the last request that changed it: a slot and the request's index.
    uint64_t revision = 0;
    uint64_t request_index = 0;
    // Tells this incarnation of the database from an earlier one of the same name, for
    // readers handed back after a drop or a snapshot restore.
    uint64_t generation = 0;
    // The results of the requests of slot `results_slot` that touched it, as committed in its
    // _synod_meta row (SlotResults) or about to be with the open group.
    uint64_t results_slot = 0;
    std::map<uint64_t, CommandResult> results{};
    bool in_group = false;  // its transaction of the open group is open
    // Its content hash as of the request at (hashed_revision, hashed_request_index): only a
    // request changes a database, and each one moves its position. The hasher holds
    // statements on `handle` (declared after it, so destroyed first).
    std::unique_ptr<DatabaseHasher> hasher{};
    std::optional<uint64_t> content_hash{};
    uint64_t hashed_revision = 0;
    uint64_t hashed_request_index = 0;
  };
  // Requests of one entry applied in one transaction per database: the system database's
  // and each user database's they touch, committed together (user databases first). A
  // request that creates or drops a database ends a group and applies alone, as does every
  // request of a group that one of its statements broke (it ended the transaction itself:
  // ON CONFLICT ROLLBACK, RAISE(ROLLBACK)): the group is rolled back and applied again one
  // request at a time.
  struct Group {
    bool open = false;
    int first = 0;  // the index of its first request
    size_t result_bytes = 0;
    bool broken = false;
    std::vector<std::string> touched{};  // databases with a transaction open, in order
    // What the group changed in memory, restored when it is rolled back.
    struct SavedDatabase {
      uint64_t revision = 0;
      uint64_t request_index = 0;
      uint64_t results_slot = 0;
      std::map<uint64_t, CommandResult> results;
    };
    std::map<std::string, SavedDatabase, std::less<>> saved{};
    size_t session_count = 0;
    int64_t costly_work_units = 0;
    int64_t costly_as_of_unix_ms = 0;
  };
  struct Session {
    uint64_t sequence = 0;
    CommandResult result;
  };
  // A command's result, and a dropped database's file to remove once the drop commits.
  struct Outcome {
    CommandResult result{};
    std::string file_to_remove{};
  };

  StateMachineOptions options;

  explicit Impl(DatabaseOpener* opener) : opener(opener), vfs([this] { return now_unix_ms; }) {}

  absl::StatusOr<Db> OpenDatabase(std::string_view file_id);
  absl::Status Load();
  // `ends_entry`: the entry's last request, whose transaction also records the entry's end.
  CommandResult ApplyRequest(uint64_t slot, uint64_t index, const ClientRequest& request,
                             bool ends_entry);
  // Applies the requests of the entry at `slot` (at least one), in groups where it can; their
  // results go to `applied`.
  void ApplyRequests(uint64_t slot, const Value& value, std::vector<AppliedRequest>* applied);
  // The grouped path: nullopt when the request must apply alone (it creates or drops a
  // database) or broke the group (group.broken).
  std::optional<CommandResult> ApplyInGroup(uint64_t slot, uint64_t index,
                                            const ClientRequest& request, bool ends_entry);
  void OpenGroup(int first);
  void JoinGroup(std::string_view name, Database& db);
  void CommitGroup(uint64_t slot, bool ends_entry);
  void RollBackGroup();
  // The _synod_meta row's result column for `db` (its SlotResults).
  static std::string SlotResultsBlob(const Database& db);
  Outcome ApplyWithSession(uint64_t slot, uint64_t index, const ClientRequest& request);
  Outcome RunCommand(uint64_t slot, uint64_t index, const Command& command);
  CommandResult CreateDatabase(uint64_t slot, uint64_t index, const synod::CreateDatabase& c);
  Outcome DropDatabase(const synod::DropDatabase& drop);
  CommandResult Execute(uint64_t slot, uint64_t index, const synod::Execute& execute);
  int64_t SchemaVersion(sqlite3* handle);  // PRAGMA schema_version
  // After a request that ran ANALYZE on `handle`, with its transaction ended.
  void ReloadStatistics(sqlite3* handle);
  static bool RunsAnalyze(const synod::Execute& execute) {
    for (const Statement& statement : execute.statements()) {
      if (IsAnalyze(statement.sql())) return true;
    }
    return false;
  }
  CommandResult PutMedia(uint64_t slot, const synod::PutMedia& put);
  CommandResult DeleteMedia(const synod::DeleteMedia& del);
  bool MediaExists(std::string_view database, std::string_view key);
  CommandResult RegisterName(uint64_t slot, const synod::RegisterName& reg);
  CommandResult ReleaseName(const synod::ReleaseName& release);
  std::string ChooseFileId(std::string_view name);
  std::optional<Session> LoadSession(uint64_t client_id);
  void StoreSession(uint64_t client_id, uint64_t sequence, uint64_t slot,
                    const CommandResult& result, bool is_new);
  std::optional<CommandResult> EntryResult(uint64_t index);
  void StoreEntryResult(uint64_t index, const std::string& serialized);
  // The group's budget for costly work (sql_guards.h): refilled to the time of the request
  // being applied, then charged what its result records.
  void RefillCostlyBudget();
  void ChargeCostlyBudget(const CommandResult& result);
  // The end of the entry at `slot`: FinishEntry in a transaction of its own; StoreEntryEnd
  // within the caller's, followed by EntryEnded once that commits.
  void FinishEntry(uint64_t slot);
  void StoreEntryEnd(uint64_t slot);
  void EntryEnded(uint64_t slot);

  DatabaseOpener* const opener;
  // 'now' for SQL: the timestamp of the request being applied, or of the last one applied
  // (stored with the revision, so a restarted replica's queries see the same 'now').
  int64_t now_unix_ms = 0;
  // The VFS and the random functions outlive every handle (declared before them).
  TimeSourceVfs vfs;
  RequestRandom random;
  GuardedFunctions guarded;
  Db system;
  std::optional<DatabaseHasher> system_hasher;             // on `system`; reset before it is closed
  std::map<std::string, Database, std::less<>> databases;  // by name
  uint64_t last_generation = 0;
  // Idle readers by database name, at most kMaxIdleReaders each; closed before the
  // databases (declared after them) and whenever their database goes away.
  static constexpr size_t kMaxIdleReaders = 4;
  static constexpr size_t kMaxIdleReadersTotal = 16;
  std::map<std::string, std::vector<std::unique_ptr<DatabaseReader>>, std::less<>> idle_readers;
  uint64_t revision = 0;
  // The rows of _synod_sessions: counted by Load(), then kept up to date by StoreSession().
  size_t session_count = 0;
  // Open() found the entry at revision + 1 half applied; cleared when it is applied.
  bool mid_entry = false;
  // The group's budget for costly work, as of the request being applied: loaded with the
  // revision, stored when an entry finishes (so a half-applied entry replays from its start).
  struct CostlyBudget {
    int64_t work_units = 0;
    int64_t as_of_unix_ms = 0;
  };
  CostlyBudget costly;
  Group group;
  // The state machine's own statements on `system` and the databases: last, so that they
  // are finalized before any handle closes; cleared whenever a handle is closed.
  StatementCache statements;
};

}  // namespace synod

#endif  // SYNOD_CORE_STATE_MACHINE_IMPL_H_

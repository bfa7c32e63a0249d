#ifndef SYNOD_CORE_STATE_MACHINE_H_
#define SYNOD_CORE_STATE_MACHINE_H_

// The apply state machine: turns chosen log entries into changes of named SQLite databases,
// deterministically, so that the same log yields the same databases on every replica.
//
// Contract:
// - Apply(entry) must be called for every slot in order (slot = revision() + 1), including
//   no-ops, or the state jumps forward with RestoreSnapshot.
// - Each database stores the revision it has applied inside the same SQLite transaction as
//   the change, so Open() after a crash resumes exactly where each database stopped.
// - A failing statement, an unknown database or an unknown command is a *result* (an error
//   CommandResult, identical on every replica), never an abort. What can differ between
//   replicas (a failing disk, memory exhausted) stops the process with SYNOD_CHECK instead.
// - Non-deterministic SQL (random(), randomblob(), 'now' in date/time functions,
//   CURRENT_TIMESTAMP/DATE/TIME) is made deterministic from the entry: 'now' is the
//   request's timestamp_unix_ms and random values derive from (slot, request index, call).
//   PRAGMAs that change journaling or durability are rejected, as is any statement that
//   touches the state machine's own tables (named _synod_*), ATTACH/DETACH, VACUUM and
//   transaction statements (BEGIN, SAVEPOINT, ...: use Execute.transaction).
// - Execute: one SQL statement per Statement, its parameters bound by position. With
//   `transaction`, the statements apply all or nothing. Without it, each statement applies
//   on its own, in order, and the first failing one stops the rest: the statements before it
//   stay applied, and the error result lists their results. Either way a statement error is
//   an INVALID_ARGUMENT result carrying SQLite's message.
// - Limits, the same on every replica (core/sqlite_util.h): a statement runs at most
//   kMaxStatementVmSteps SQLite steps and returns at most kMaxStatementResultBytes, or fails
//   RESOURCE_EXHAUSTED; a string or blob value is at most 64 MiB; an uploaded image must use
//   4096-byte pages. Foreign keys are enforced. TEXT that is not valid UTF-8 is returned as a
//   blob of its bytes (proto3 strings must be UTF-8).
// - Client sessions: a request whose (client_id, sequence) was already applied returns the
//   stored result without applying again. See kMaxSessions.
//
// Not thread-safe: one thread drives a StateMachine at a time.

#include <sqlite3.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/deterministic_sqlite.h"
#include "core/sql_guards.h"
#include "core/sqlite_util.h"
#include "core/synod.pb.h"

namespace synod {

// Where the state machine's SQLite databases live. The core never opens files itself: the
// server passes an opener for files in its data directory, tests and the simulator pass
// InMemoryDatabaseOpener.
class DatabaseOpener {
 public:
  virtual ~DatabaseOpener() = default;
  // Opens the database stored under `file_id` (a hash of its name, or "system"), creating
  // it empty if absent, using the SQLite VFS named `vfs_name`. The caller owns the handle
  // and closes it with sqlite3_close. Databases use SQLite's default page size (4096 bytes).
  virtual absl::StatusOr<sqlite3*> Open(std::string_view file_id, const char* vfs_name) = 0;
  // Opens another connection to the database stored under `file_id`, for reading only (the
  // caller also sets PRAGMA query_only), with its current time from the VFS `vfs_name`.
  // The handle may be used on another thread than the opener's, one thread at a time.
  // NotFound if there is no such database.
  virtual absl::StatusOr<sqlite3*> OpenReadOnly(std::string_view file_id, const char* vfs_name) = 0;
  // Deletes the database stored under `file_id` (nothing to do if absent).
  // REQUIRES: no handle to it is open.
  virtual absl::Status Remove(std::string_view file_id) = 0;
  // The file ids that currently exist (for Open() after a restart).
  virtual std::vector<std::string> List() = 0;
  // Whether a reader may keep a read transaction open while the state machine writes: true
  // for WAL files, false for shared-cache memory databases (they lock whole tables).
  virtual bool ReadersKeepTransactions() const { return false; }
  // Whether Adopt works (file-backed openers).
  virtual bool AdoptsFiles() const { return false; }
  // Makes the closed database file at `path` the database stored under `file_id`, by moving
  // it there (a rename: no copy). DataLoss: it moved, but the move could not be made
  // durable (the disk is failing). Another error (another file system, say) leaves `path`
  // as it was; the caller copies it instead. REQUIRES: no database is stored under `file_id`.
  virtual absl::Status Adopt(std::string_view /*file_id*/, const std::string& /*path*/) {
    return absl::UnimplementedError("this opener keeps no files");
  }
};

// Each Open() of a file id returns a handle to the same in-memory database until Remove(),
// also across StateMachine instances (a "restart"). Every handle takes its current time from
// the VFS named in the latest Open() call. REQUIRES: one StateMachine at a time uses an
// opener, and every handle is closed before the opener is destroyed.
class InMemoryDatabaseOpener : public DatabaseOpener {
 public:
  InMemoryDatabaseOpener();
  ~InMemoryDatabaseOpener() override;
  InMemoryDatabaseOpener(const InMemoryDatabaseOpener&) = delete;
  InMemoryDatabaseOpener& operator=(const InMemoryDatabaseOpener&) = delete;

  absl::StatusOr<sqlite3*> Open(std::string_view file_id, const char* vfs_name) override;
  // Shared-cache databases are shared only between connections of the opener's VFS: a
  // reader takes the time of the latest Open(), not `vfs_name`'s.
  absl::StatusOr<sqlite3*> OpenReadOnly(std::string_view file_id, const char* vfs_name) override;
  absl::Status Remove(std::string_view file_id) override;
  std::vector<std::string> List() override;

 private:
  absl::StatusOr<sqlite3*> OpenShared(std::string_view file_id);

  // Shared-cache databases are shared only between connections of the same VFS object, and
  // each StateMachine registers its own. So every handle uses this opener's VFS, which takes
  // the time from the VFS named in the latest Open() call.
  std::string time_vfs_name_;
  std::unique_ptr<TimeSourceVfs> vfs_;
  // One extra connection per database keeps a shared-cache in-memory database alive
  // between Open() calls.
  std::map<std::string, sqlite3*, std::less<>> keep_alive_;
  // Removals of each file id so far: part of its database's name, so that a removed
  // database is never reopened.
  std::map<std::string, uint64_t, std::less<>> incarnations_;
};

// What applying one request produced, for the replica that answers the client.
struct AppliedRequest {
  uint64_t client_id = 0;
  uint64_t sequence = 0;
  uint32_t origin_replica = 0;
  CommandResult result;
};

// Database images named by reference (CreateDatabase.image_sha256), staged by the host
// before it applies the entry that names them: the host copies the blob into a private
// file, checks it as an uploaded image is checked (CheckImageHeader on its first bytes,
// NormalizeImageHeader, then CheckAndPrepareImage on the file opened), and keeps the
// verdict.
class StagedImages {
 public:
  virtual ~StagedImages() = default;
  // Takes the staged image `sha256` names: the path of a private file the state machine may
  // move (DatabaseOpener::Adopt) or copy, holding an image that passed the checks; or
  // InvalidArgument with the reason it failed (the same verdict on every replica: the same
  // bytes, checked the same way). Any other error is the host's bug: it must stage every
  // image an entry names before the entry is applied. Each request naming an image takes
  // one, whatever its result; a file taken and not moved into place is the host's to remove.
  virtual absl::StatusOr<std::string> Take(const std::string& sha256) = 0;
};

// Checks a database image the host opened read-write from a private copy (its header
// already checked and normalized) as an image by value is checked (integrity, virtual
// tables, reserved names), and prepares it in place to become a database (its _synod_meta
// table dropped). InvalidArgument if it is not a valid image.
absl::Status CheckAndPrepareImage(sqlite3* image);

struct StateMachineOptions {
  // Where images named by reference come from (nullptr: none may be applied).
  StagedImages* staged_images = nullptr;
#ifdef SYNOD_TESTING_BUGS
  // A known-wrong behaviour for the simulator's checker tests, compiled only into
  // //core:state_machine_with_bugs: a retried request is applied again.
  bool testing_no_session_dedup = false;
#endif
};

// A read-only connection to one database, apart from the connection that applies the log:
// nothing a read does (caches, virtual-table state) can change how a later entry applies.
// Obtained from StateMachine::AcquireReader on the state machine's thread; Query may then run
// on any one thread at a time, while the state machine goes on applying (files in WAL mode:
// a query sees the state as of its start). Interrupt() is safe from any thread.
class DatabaseReader {
 public:
  ~DatabaseReader();
  DatabaseReader(const DatabaseReader&) = delete;
  DatabaseReader& operator=(const DatabaseReader&) = delete;

  // Runs a read-only statement under its own work budget (core/sql_guards.h). Errors as
  // StateMachine::Query, plus DeadlineExceeded after Interrupt().
  absl::StatusOr<StatementResult> Query(const Statement& statement);
  // As Query, but gives up (nullopt) once the statement has used `max_work_units`: a host
  // answers cheap reads at once on its own thread, and hands the others to a worker (Query
  // again, from the start).
  std::optional<absl::StatusOr<StatementResult>> TryQuery(const Statement& statement,
                                                          int64_t max_work_units);
  // Makes the Query running now, or the next one to start, stop with DeadlineExceeded.
  // Thread-safe.
  void Interrupt();

  const std::string& database() const { return database_; }

 private:
  friend class StateMachine;
  DatabaseReader(std::string database, uint64_t generation);

  // A reader's read transaction stays open between its queries while the state machine's
  // revision stays where it was (reads of an unchanged state take no locks and keep their
  // page cache); it ends when an entry is applied, or when the reader comes back at a later
  // revision than it was handed out at. So an idle reader's open transaction always reads
  // the current state, and none holds back a WAL checkpoint for long.
  void BeginRead();
  void EndRead();

  const std::string database_;
  const uint64_t generation_;  // which incarnation of the database it reads
  uint64_t acquired_at_revision_ = 0;
  bool keeps_transaction_ = false;  // DatabaseOpener::ReadersKeepTransactions
  // 'now' and random() of the reader's queries: the last applied request's time, and a
  // stream seeded from the revision at acquisition.
  int64_t now_unix_ms_ = 0;
  std::atomic<bool> interrupted_{false};  // cleared when the reader is handed out again
  std::unique_ptr<TimeSourceVfs> vfs_;
  RequestRandom random_;
  GuardedFunctions guarded_;
  Db db_;                      // closed before what it uses
  StatementCache statements_;  // finalized before db_ closes
  QueryCache queries_;         // likewise
};

// A snapshot's databases by file id ("system" and one per user database), as open handles.
using SnapshotImages = std::map<std::string, Db, std::less<>>;

// A state machine's databases held at one revision (StateMachine::OpenSnapshotView).
struct SnapshotView {
  uint64_t revision = 0;
  std::vector<std::pair<std::string, Db>> databases;  // (file id, reader), system first
  // Of each user database, in the order of `databases` after the system's: its name and
  // position (revision, request index), for StateMachine::StateHashOf.
  struct Position {
    std::string name;
    uint64_t revision = 0;
    uint64_t request_index = 0;
  };
  std::vector<Position> positions;
};

class StateMachine {
 public:
  // Sessions kept at most. A session holds a client's last applied sequence and its result;
  // client_id 0 has no session (its requests are never de-duplicated). A client's first
  // request has sequence 1 and opens its session; later ones have higher sequences. A
  // request is answered SESSION_EXPIRED if its sequence is below its session's, or if its
  // client has no session and the sequence is not 1: the session was evicted, so the request
  // may already have been applied, and applying it again could apply it twice. When a new
  // session would exceed the bound, the session whose last request has the lowest revision
  // is evicted (ties broken by client_id).
  static constexpr size_t kMaxSessions = 10000;

  // Opens (or creates) the state stored through `opener`. REQUIRES: opener outlives this.
  static absl::StatusOr<std::unique_ptr<StateMachine>> Open(DatabaseOpener* opener,
                                                            StateMachineOptions options = {});
  ~StateMachine();
  StateMachine(const StateMachine&) = delete;
  StateMachine& operator=(const StateMachine&) = delete;

  // Applies the chosen entry at `slot`. REQUIRES: slot == revision() + 1.
  // Returns one AppliedRequest per request in the entry (none for a no-op). A result's
  // revision is `slot`, except for a retried request, which returns the stored result of
  // the slot where it was applied.
  std::vector<AppliedRequest> Apply(uint64_t slot, const Value& value);

  // The log index of the last applied entry.
  uint64_t revision() const;

  // Checks a command before it is proposed: bad names, empty SQL, invalid images, statements
  // that would be rejected at apply time anyway (journaling/durability PRAGMAs, _synod_*
  // tables, ...) as far as that can be known without the database's schema. A command that
  // passes may still fail at apply time (e.g. a constraint violation). InvalidArgument if not.
  static absl::Status Validate(const Command& command);

  // Runs a read-only query against the applied state (for query endpoints and reads), on a
  // reader connection (AcquireReader), on this thread. 'now' is the timestamp of the last
  // applied request, and random() depends only on the revision. NotFound for an unknown
  // database, InvalidArgument for a statement that fails or could write, ResourceExhausted
  // past a limit, FailedPrecondition for a damaged database, Internal if SQLite fails.
  absl::StatusOr<StatementResult> Query(std::string_view database, const Statement& statement);

  // A reader of `database` as applied now (NotFound if there is none), from a small pool.
  // Hand it back with ReleaseReader (on this thread) once its queries are done.
  absl::StatusOr<std::unique_ptr<DatabaseReader>> AcquireReader(std::string_view database);
  // Keeps `reader` for reuse, or closes it if its database was dropped or replaced since.
  void ReleaseReader(std::unique_ptr<DatabaseReader> reader);

  // Names of databases, sorted, with their applied revisions (the slot of the last request
  // that changed each).
  std::vector<std::pair<std::string, uint64_t>> ListDatabases() const;

  // The size of `database`'s image, page count times page size, read without copying it
  // (NotFound if there is none). Equals the size of Backup(database).
  absl::StatusOr<uint64_t> ImageBytes(std::string_view database);

  // A consistent .sqlite3 image of `database` (NotFound if there is none). It includes the
  // database's _synod_meta table, which CreateDatabase replaces when the image is uploaded.
  absl::StatusOr<std::string> Backup(std::string_view database);

  // The metadata stored by PutMedia for `key` of `database` (NotFound if none).
  absl::StatusOr<PutMedia> GetMedia(std::string_view database, std::string_view key);
  // One page of `database`'s media, in key order: up to `limit` keys after `after_key` ("":
  // from the first). NotFound if there is no such database.
  struct MediaRecord {
    PutMedia media;
    uint64_t revision = 0;  // of the PutMedia that stored it
  };
  absl::StatusOr<std::vector<MediaRecord>> ListMedia(std::string_view database,
                                                     std::string_view after_key, size_t limit);
  // A read-only connection to the state machine's own database (the catalog and the media
  // metadata, table _synod_media), in a read transaction begun at the current revision, for
  // a scan off this thread (the media blobs referenced, for garbage collection). As
  // OpenDatabaseView.
  absl::StatusOr<Db> OpenSystemView();

  // The owner of a registered unique name (NotFound if it is not registered).
  absl::StatusOr<std::string> NameOwner(std::string_view name);

  // The whole state (every database and the session table) as one byte string, and back:
  // the simulator's snapshots, held in memory (the server writes and reads images as files,
  // in pieces: OpenSnapshotView, CheckSnapshotImages, RestoreSnapshotImages and
  // adapters/snapshot_image.h). Snapshot() is FailedPrecondition right after an Open() that
  // found an entry half applied by a crash, until that entry is applied again.
  // RestoreSnapshot checks the whole snapshot before changing anything (InvalidArgument if
  // it is damaged), then replaces the whole state, removing the databases the snapshot does
  // not have. A snapshot of more than `max_bytes` (SQLite serializes a database in one
  // allocation of under 2 GiB) is ResourceExhausted, found from the databases' sizes before
  // anything is copied.
  static constexpr uint64_t kMaxSnapshotBytes = (uint64_t{2} << 30) - (64 << 20);
  absl::StatusOr<std::string> Snapshot(uint64_t max_bytes = kMaxSnapshotBytes);
  absl::Status RestoreSnapshot(std::string_view snapshot);
  // Whether RestoreSnapshot would accept `snapshot`, and it holds state at `revision`
  // (InvalidArgument if not). Changes nothing: a host checks a snapshot from a peer with it
  // before persisting anything, so that a bad one never reaches its disk.
  static absl::Status CheckSnapshot(std::string_view snapshot, uint64_t revision);

  // The same for a snapshot whose databases are open handles (an image unpacked from a file
  // by the host, each database already checked with CheckImageContent): whether they form
  // a state at `revision` that this replica can restore, and then the restore itself (which
  // copies each database with SQLite's backup API: memory stays bounded).
  // An image backed by a file (one the host unpacked) is moved into place when the opener
  // adopts files, not copied: installing a large snapshot then takes renames, not a copy.
  static absl::Status CheckSnapshotImages(const SnapshotImages& images, uint64_t revision);
  absl::Status RestoreSnapshotImages(SnapshotImages images);

  // A consistent read view of every database at the current revision, for writing a
  // snapshot image off the state machine's thread (adapters/snapshot_image.h): one read-only
  // connection per database, each in a read transaction begun now. While it is open the
  // state machine goes on applying entries (WAL readers see none of them). The connections
  // may be used on another thread, one thread at a time. FailedPrecondition while an entry
  // is half applied (as Snapshot()); Unimplemented when the opener's readers cannot keep a
  // transaction open beside the writer (in-memory databases).
  absl::StatusOr<SnapshotView> OpenSnapshotView();
  // The same for one user database (NotFound if there is none): a read-only connection in a
  // read transaction begun at the current revision, for a backup copied off this thread.
  absl::StatusOr<Db> OpenDatabaseView(std::string_view database);

  // A hash of the logical content of every database and the session table: equal on two
  // replicas exactly when they hold the same state. Stable across processes.
  // kFresh reads every row (what a divergence vote needs: damage to a database's file shows
  // even if no request changed the database). kKept reuses a database's part while no
  // request changed it since it was last hashed (kKept), for checks that run often and are
  // about what requests did (the simulator's). Both give the same value on a healthy replica.
  enum class HashMode { kFresh, kKept };
  uint64_t StateHash(HashMode mode = HashMode::kFresh);
  // StateHash(kFresh) of the state `view` holds, computed from its readers (on any thread,
  // one at a time), each released once hashed. The same value StateHash gave at the view's
  // revision.
  static uint64_t StateHashOf(SnapshotView& view);

 private:
  StateMachine() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Is `name` a valid database name ([A-Za-z0-9_-]{1,64})?
bool IsValidDatabaseName(std::string_view name);

// Is `key` a valid media key: 1 to 200 of A-Z a-z 0-9 . _ ~ -, without "..", so that a key
// is safe in a URL path segment as it is, and never names a path?
bool IsValidMediaKey(std::string_view key);

// Is `type` a valid media content type: 1 to 255 printable ASCII characters (it is served
// back as a header)?
bool IsValidContentType(std::string_view type);

// The on-disk id of a database: a hash of its name, so that no name becomes a path. Two
// names with the same hash get distinct ids through the catalog (a "-N" suffix).
std::string DatabaseFileId(std::string_view name);

}  // namespace synod

#endif  // SYNOD_CORE_STATE_MACHINE_H_

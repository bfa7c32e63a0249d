#include "adapters/file_database_opener.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <system_error>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "adapters/file_util.h"
#include "core/check.h"

namespace synod {
namespace {

constexpr size_t kMaxFileIdBytes = 80;
constexpr char kDbSuffix[] = ".sqlite3";
// What SQLite may keep beside a database file.
constexpr const char* kSideFileSuffixes[] = {"-wal", "-shm", "-journal"};

absl::string_view ToAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

absl::Status ExecPragma(sqlite3* db, const std::string& pragma, const std::string& path) {
  char* error = nullptr;
  if (sqlite3_exec(db, pragma.c_str(), nullptr, nullptr, &error) != SQLITE_OK) {
    absl::Status status = absl::UnavailableError(
        absl::StrCat(pragma, " failed on ", path, ": ", error != nullptr ? error : "?"));
    sqlite3_free(error);
    return status;
  }
  return absl::OkStatus();
}

// Switches `db` to WAL. The pragma answers the mode in effect, which stays the old one when
// the switch is impossible (a VFS without shared memory, a read-only file).
absl::Status SetWalMode(sqlite3* db, const std::string& path) {
  sqlite3_stmt* stmt = nullptr;
  int rc = sqlite3_prepare_v2(db, "PRAGMA journal_mode=WAL", -1, &stmt, nullptr);
  std::string mode;
  if (rc == SQLITE_OK && sqlite3_step(stmt) == SQLITE_ROW) {
    const unsigned char* text = sqlite3_column_text(stmt, 0);
    if (text != nullptr) mode = reinterpret_cast<const char*>(text);
  }
  std::string error = sqlite3_errmsg(db);
  sqlite3_finalize(stmt);
  if (absl::AsciiStrToLower(mode) != "wal") {
    return absl::UnavailableError(absl::StrCat("cannot set journal_mode=WAL on ", path, ": ",
                                               mode.empty() ? error : "mode stays " + mode));
  }
  return absl::OkStatus();
}

// The contents of `path`, or "" when it cannot be read.
std::string ReadWhole(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

bool FileDatabaseOpener::IsValidFileId(std::string_view file_id) {
  if (file_id.empty() || file_id.size() > kMaxFileIdBytes) return false;
  return std::all_of(file_id.begin(), file_id.end(), [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-';
  });
}

absl::StatusOr<std::unique_ptr<FileDatabaseOpener>> FileDatabaseOpener::Create(
    std::string data_dir, bool fsync, std::string boot_id_source) {
  std::string db_dir = absl::StrCat(data_dir, "/db");
  std::error_code error;
  std::filesystem::create_directories(db_dir, error);
  if (error) {
    return absl::Status(absl::ErrnoToStatusCode(error.value()),
                        absl::StrCat("cannot create ", db_dir, ": ", error.message()));
  }
  std::unique_ptr<FileDatabaseOpener> opener(new FileDatabaseOpener(db_dir, fsync));
  // The machine's boot id now, and when the databases were last written.
  std::string boot_id = ReadWhole(boot_id_source);
  const std::string kept_path = absl::StrCat(data_dir, "/boot_id");
  std::string kept = ReadWhole(kept_path);
  if (!boot_id.empty() && !kept.empty() && kept != boot_id) {
    // Commits since the last checkpoint may be lost, in any order across files: the log
    // holds what rebuilds them (its snapshot and the entries after it).
    std::filesystem::remove_all(db_dir, error);
    if (!error) std::filesystem::create_directories(db_dir, error);
    if (error) {
      return absl::Status(absl::ErrnoToStatusCode(error.value()),
                          absl::StrCat("cannot clear ", db_dir, ": ", error.message()));
    }
    if (absl::Status synced = opener->SyncDbDirectory(); !synced.ok()) return synced;
    opener->discarded_after_restart_ = true;
  }
  if (!boot_id.empty() && kept != boot_id) {
    // Durable before it names this boot: an empty file after a power failure would hide the
    // next restart.
    const std::string tmp = absl::StrCat(kept_path, ".tmp");
    int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("cannot create ", tmp));
    const bool written =
        write(fd, boot_id.data(), boot_id.size()) == static_cast<ssize_t>(boot_id.size()) &&
        (!fsync || ::fsync(fd) == 0);
    const int write_errno = errno;
    close(fd);
    if (!written) return absl::ErrnoToStatus(write_errno, absl::StrCat("cannot write ", tmp));
    if (rename(tmp.c_str(), kept_path.c_str()) != 0) {
      return absl::ErrnoToStatus(errno, absl::StrCat("cannot rename ", tmp));
    }
    if (absl::Status synced = SyncDirectory(data_dir); !synced.ok()) return synced;
  }
  // Inside db/ (List() sees only database files), so on its file system: removed databases
  // are moved there and deleted in the background. Opened after any wipe of db/ above.
  absl::StatusOr<std::unique_ptr<Trash>> trash = Trash::Open(absl::StrCat(db_dir, "/.trash"));
  if (!trash.ok()) return trash.status();
  opener->trash_ = *std::move(trash);
  return opener;
}

FileDatabaseOpener::FileDatabaseOpener(std::string db_dir, bool fsync)
    : db_dir_(std::move(db_dir)), fsync_(fsync), checkpointer_([this] { RunCheckpointer(); }) {}

FileDatabaseOpener::~FileDatabaseOpener() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  wanted_cv_.notify_all();
  checkpointer_.join();
}

int FileDatabaseOpener::OnWalCommit(void* hook, sqlite3* db, const char* name, int frames) {
  auto* h = static_cast<WalHook*>(hook);
  if (frames - h->backfilled.load() >= kCommitCheckpointFrames) {
    // The checkpointer has not kept up: this commit checkpoints, so that the WAL can start
    // over at the next one.
    ++h->opener->commit_checkpoints_;
    sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, nullptr, nullptr);
  } else if (frames >= kCheckpointFrames) {
    {
      std::lock_guard<std::mutex> lock(h->opener->mu_);
      h->opener->checkpoints_wanted_.insert(h->file_id);
    }
    h->opener->wanted_cv_.notify_one();
  }
  return SQLITE_OK;
}

void FileDatabaseOpener::RunCheckpointer() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    wanted_cv_.wait(lock, [this] { return stopping_ || !checkpoints_wanted_.empty(); });
    if (stopping_) return;
    std::string file_id = *checkpoints_wanted_.begin();
    checkpoints_wanted_.erase(checkpoints_wanted_.begin());
    checkpointing_ = file_id;  // Remove() waits for it
    lock.unlock();
    // A connection of its own, never creating the file: a database removed meanwhile is
    // simply not there. The checkpoint syncs the database file as the writer would have.
    const std::string path = PathOf(file_id);
    sqlite3* db = nullptr;
    int backfilled = -1;
    if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, nullptr) ==
        SQLITE_OK) {
      // Closing it never checkpoints or deletes the WAL: that is the writer's.
      sqlite3_db_config(db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1, nullptr);
      sqlite3_busy_timeout(db, kBusyTimeoutMs);
      sqlite3_exec(db, fsync_ ? "PRAGMA synchronous=NORMAL" : "PRAGMA synchronous=OFF", nullptr,
                   nullptr, nullptr);
      int log_frames = 0;
      if (sqlite3_wal_checkpoint_v2(db, "main", SQLITE_CHECKPOINT_PASSIVE, &log_frames,
                                    &backfilled) == SQLITE_OK &&
          backfilled > 0) {
        ++checkpoints_;
      }
    }
    sqlite3_close(db);
    lock.lock();
    checkpointing_.clear();
    checkpointed_cv_.notify_all();
    if (backfilled >= 0) {
      auto hook = wal_hooks_.find(file_id);
      if (hook != wal_hooks_.end()) hook->second->backfilled.store(backfilled);
    }
  }
}

std::string FileDatabaseOpener::PathOf(std::string_view file_id) const {
  SYNOD_CHECK(IsValidFileId(file_id));
  return absl::StrCat(db_dir_, "/", ToAbsl(file_id), kDbSuffix);
}

absl::Status FileDatabaseOpener::RemoveFile(const std::string& path) {
  if (unlink(path.c_str()) != 0 && errno != ENOENT) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot remove ", path));
  }
  return absl::OkStatus();
}

absl::Status FileDatabaseOpener::SyncDbDirectory() const {
  return fsync_ ? SyncDirectory(db_dir_) : absl::OkStatus();
}

absl::StatusOr<sqlite3*> FileDatabaseOpener::Open(std::string_view file_id, const char* vfs_name) {
  if (!IsValidFileId(file_id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad database file id \"", ToAbsl(file_id), "\": want [A-Za-z0-9_-]{1,80}"));
  }
  if (vfs_name != nullptr && sqlite3_vfs_find(vfs_name) == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("no SQLite VFS named ", vfs_name));
  }
  std::string path = PathOf(file_id);
  struct stat st;
  bool created = false;
  if (stat(path.c_str(), &st) != 0) {
    if (errno != ENOENT) return absl::ErrnoToStatus(errno, absl::StrCat("cannot stat ", path));
    created = true;
  }
  sqlite3* db = nullptr;
  int rc =
      sqlite3_open_v2(path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, vfs_name);
  absl::Status status;
  if (rc != SQLITE_OK) {
    status = absl::UnavailableError(absl::StrCat(
        "cannot open ", path, ": ", db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc)));
  }
  if (status.ok()) {
    sqlite3_extended_result_codes(db, 1);
    sqlite3_busy_timeout(db, kBusyTimeoutMs);
    // Only takes effect on a new database; the state machine checks an existing one's.
    status = ExecPragma(db, absl::StrCat("PRAGMA page_size=", kPageSizeBytes), path);
  }
  if (status.ok()) status = SetWalMode(db, path);
  if (status.ok()) {
    // The log makes a write durable, not the database file (see the header).
    status = ExecPragma(db, fsync_ ? "PRAGMA synchronous=NORMAL" : "PRAGMA synchronous=OFF", path);
  }
  // SQLite makes the directory entries of its WAL files durable, not that of a new database.
  if (status.ok() && created) status = SyncDbDirectory();
  if (!status.ok()) {
    sqlite3_close(db);
    return status;
  }
  // Checkpoints run on the checkpointer's thread (see the header); this replaces SQLite's
  // automatic checkpoint on this connection.
  std::lock_guard<std::mutex> lock(mu_);  // the checkpointer reads wal_hooks_
  auto hook = wal_hooks_.find(file_id);
  if (hook == wal_hooks_.end()) {
    auto made = std::make_unique<WalHook>();
    made->opener = this;
    made->file_id = std::string(file_id);
    hook = wal_hooks_.emplace(std::string(file_id), std::move(made)).first;
  }
  sqlite3_wal_hook(db, &FileDatabaseOpener::OnWalCommit, hook->second.get());
  return db;
}

absl::StatusOr<sqlite3*> FileDatabaseOpener::OpenReadOnly(std::string_view file_id,
                                                          const char* vfs_name) {
  if (!IsValidFileId(file_id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad database file id \"", ToAbsl(file_id), "\""));
  }
  std::string path = PathOf(file_id);
  sqlite3* db = nullptr;
  // No SQLITE_OPEN_CREATE: a database that is gone is NotFound, never created empty.
  int rc = sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, vfs_name);
  if (rc != SQLITE_OK) {
    struct stat st;
    std::string why = absl::StrCat("cannot open ", path, ": ",
                                   db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
    absl::Status status = stat(path.c_str(), &st) != 0 && errno == ENOENT
                              ? absl::NotFoundError(why)
                              : absl::UnavailableError(why);  // descriptors, permissions
    sqlite3_close(db);
    return status;
  }
  sqlite3_extended_result_codes(db, 1);
  sqlite3_busy_timeout(db, kBusyTimeoutMs);
  // Reads map the first kReaderMapBytes of the file instead of copying each page they miss
  // with pread (a point read spent 14% of its time there).
  sqlite3_exec(db, absl::StrCat("PRAGMA mmap_size = ", kReaderMapBytes).c_str(), nullptr, nullptr,
               nullptr);
  return db;
}

absl::Status FileDatabaseOpener::Remove(std::string_view file_id) {
  if (!IsValidFileId(file_id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad database file id \"", ToAbsl(file_id), "\""));
  }
  {
    std::unique_lock<std::mutex> lock(mu_);
    checkpoints_wanted_.erase(std::string(file_id));
    checkpointed_cv_.wait(lock, [&] { return checkpointing_ != file_id; });
    auto hook = wal_hooks_.find(file_id);
    if (hook != wal_hooks_.end()) hook->second->backfilled.store(0);
  }
  // Moved out of db/ (a rename), and deleted in the background: unlinking a large file
  // takes a while, which the caller's loop must not wait for.
  std::string path = PathOf(file_id);
  if (absl::Status removed = trash_->Remove(path); !removed.ok()) return removed;
  if (absl::Status synced = SyncDbDirectory(); !synced.ok()) return synced;
  // Leftovers of a crash from here on are harmless (see the header).
  for (const char* suffix : kSideFileSuffixes) {
    if (absl::Status removed = trash_->Remove(path + suffix); !removed.ok()) return removed;
  }
  return absl::OkStatus();
}

absl::Status FileDatabaseOpener::Adopt(std::string_view file_id, const std::string& path) {
  if (!IsValidFileId(file_id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad database file id \"", ToAbsl(file_id), "\""));
  }
  const std::string target = PathOf(file_id);
  // Side files a crash left (REQUIRES: no database under the id) must not meet the new file.
  for (const char* suffix : kSideFileSuffixes) {
    if (absl::Status removed = RemoveFile(target + suffix); !removed.ok()) return removed;
  }
  if (rename(path.c_str(), target.c_str()) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot move ", path, " to ", target));
  }
  if (absl::Status synced = SyncDbDirectory(); !synced.ok()) {
    return absl::DataLossError(absl::StrCat("moved ", path, " to ", target,
                                            " but cannot sync the directory: ", synced.message()));
  }
  return absl::OkStatus();
}

std::vector<std::string> FileDatabaseOpener::List() {
  std::vector<std::string> file_ids;
  std::error_code error;
  std::filesystem::directory_iterator it(db_dir_, error);
  for (; !error && it != std::filesystem::directory_iterator(); it.increment(error)) {
    std::string name = it->path().filename().string();
    std::string_view suffix = kDbSuffix;
    if (name.size() <= suffix.size() || !name.ends_with(suffix)) continue;
    std::string file_id = name.substr(0, name.size() - suffix.size());
    if (IsValidFileId(file_id)) file_ids.push_back(std::move(file_id));
  }
  SYNOD_CHECK(!error) << "cannot list " << db_dir_ << ": " << error.message();
  std::sort(file_ids.begin(), file_ids.end());
  return file_ids;
}

}  // namespace synod

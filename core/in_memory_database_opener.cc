// InMemoryDatabaseOpener (declared in core/state_machine.h): the databases of tests and of
// the simulator, in memory, surviving the StateMachine that opened them.

#include <charconv>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/deterministic_sqlite.h"
#include "core/state_machine.h"

namespace synod {
namespace {

// File ids go into a URI, so they are kept to characters with no meaning there.
bool IsValidFileId(std::string_view file_id) {
  if (file_id.empty()) return false;
  for (char c : file_id) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

}  // namespace

InMemoryDatabaseOpener::InMemoryDatabaseOpener()
    : vfs_(std::make_unique<TimeSourceVfs>([this] {
        SYNOD_CHECK(!time_vfs_name_.empty()) << "no database was opened yet";
        return VfsNowUnixMs(time_vfs_name_.c_str());
      })) {}

InMemoryDatabaseOpener::~InMemoryDatabaseOpener() {
  for (auto& [file_id, db] : keep_alive_) {
    SYNOD_CHECK_EQ(sqlite3_close(db), SQLITE_OK) << "a handle to " << file_id << " is open";
  }
}

absl::StatusOr<sqlite3*> InMemoryDatabaseOpener::OpenShared(std::string_view file_id) {
  // The opener's address tells its databases from those of another opener in the process.
  char address[2 * sizeof(uintptr_t) + 1] = {};
  std::to_chars(address, address + sizeof(address) - 1, reinterpret_cast<uintptr_t>(this), 16);
  // Each incarnation of a file id is its own database: a reader still open on a removed
  // one keeps that one alive without it showing through a new database of the same id.
  std::string uri =
      absl::StrCat("file:synod-", address, "-", absl::string_view(file_id.data(), file_id.size()),
                   "-", incarnations_[std::string(file_id)], "?mode=memory&cache=shared");
  sqlite3* db = nullptr;
  int rc = sqlite3_open_v2(
      uri.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_URI, vfs_->name());
  if (rc != SQLITE_OK) {
    absl::Status error = absl::UnavailableError(
        absl::StrCat("cannot open in-memory database ", uri, ": ", sqlite3_errstr(rc)));
    sqlite3_close(db);
    return error;
  }
  return db;
}

absl::StatusOr<sqlite3*> InMemoryDatabaseOpener::Open(std::string_view file_id,
                                                      const char* vfs_name) {
  if (!IsValidFileId(file_id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad file id \"", absl::string_view(file_id.data(), file_id.size()), "\""));
  }
  SYNOD_CHECK(vfs_name != nullptr && sqlite3_vfs_find(vfs_name) != nullptr) << "no such VFS";
  time_vfs_name_ = vfs_name;
  if (keep_alive_.find(file_id) == keep_alive_.end()) {
    absl::StatusOr<sqlite3*> keep_alive = OpenShared(file_id);
    if (!keep_alive.ok()) return keep_alive.status();
    keep_alive_.emplace(std::string(file_id), *keep_alive);
  }
  return OpenShared(file_id);
}

absl::StatusOr<sqlite3*> InMemoryDatabaseOpener::OpenReadOnly(std::string_view file_id,
                                                              const char* /*vfs_name*/) {
  if (keep_alive_.find(file_id) == keep_alive_.end()) {
    return absl::NotFoundError(
        absl::StrCat("no database ", absl::string_view(file_id.data(), file_id.size())));
  }
  return OpenShared(file_id);
}

absl::Status InMemoryDatabaseOpener::Remove(std::string_view file_id) {
  auto it = keep_alive_.find(file_id);
  if (it == keep_alive_.end()) return absl::OkStatus();
  // With no other handle open, closing the last connection frees the database.
  SYNOD_CHECK_EQ(sqlite3_close(it->second), SQLITE_OK);
  ++incarnations_[it->first];
  keep_alive_.erase(it);
  return absl::OkStatus();
}

std::vector<std::string> InMemoryDatabaseOpener::List() {
  std::vector<std::string> file_ids;
  for (const auto& [file_id, db] : keep_alive_) file_ids.push_back(file_id);
  return file_ids;
}

}  // namespace synod

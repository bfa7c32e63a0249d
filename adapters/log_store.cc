#include "adapters/log_store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <string_view>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "adapters/file_util.h"
#include "core/check.h"
#include "core/log_codec.h"

namespace synod {
namespace {

// The frame header of core/log_codec.h: u32 payload length, u64 checksum.
constexpr size_t kFrameHeaderBytes = 12;

// The number of framed records in `framed` (concatenated whole frames).
uint64_t CountRecords(std::string_view framed) {
  uint64_t records = 0;
  size_t offset = 0;
  while (offset < framed.size()) {
    SYNOD_CHECK_LE(offset + kFrameHeaderBytes, framed.size());
    uint64_t length = 0;
    for (int i = 0; i < 4; ++i) {
      length |= static_cast<uint64_t>(static_cast<unsigned char>(framed[offset + i])) << (8 * i);
    }
    offset += kFrameHeaderBytes + length;
    ++records;
  }
  SYNOD_CHECK_EQ(offset, framed.size());
  return records;
}

}  // namespace

absl::StatusOr<std::unique_ptr<LogStore>> LogStore::Open(std::string dir, LogStoreOptions options) {
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) {
    return absl::Status(absl::ErrnoToStatusCode(error.value()),
                        absl::StrCat("cannot create data directory ", dir, ": ", error.message()));
  }
  std::string lock_path = absl::StrCat(dir, "/LOCK");
  absl::StatusOr<int> lock_fd = OpenFile(lock_path, O_RDWR | O_CREAT);
  if (!lock_fd.ok()) return lock_fd.status();
  if (flock(*lock_fd, LOCK_EX | LOCK_NB) != 0) {
    int flock_errno = errno;
    close(*lock_fd);
    if (flock_errno == EWOULDBLOCK) {
      return absl::FailedPreconditionError(absl::StrCat(
          "data directory ", dir, " is in use by another process (", lock_path, " is locked)"));
    }
    return OsError(flock_errno, absl::StrCat("cannot lock ", lock_path));
  }
  std::unique_ptr<LogStore> store(new LogStore(std::move(dir), options, *lock_fd));
  if (absl::Status recovered = store->Recover(); !recovered.ok()) return recovered;
  return store;
}

LogStore::LogStore(std::string dir, LogStoreOptions options, int lock_fd)
    : dir_(std::move(dir)),
      log_path_(absl::StrCat(dir_, "/log")),
      options_(options),
      lock_fd_(lock_fd) {}

LogStore::~LogStore() {
  if (log_fd_ >= 0) close(log_fd_);
  close(lock_fd_);  // releases the flock
}

absl::Status LogStore::Recover() {
  // A rewrite that a crash interrupted before its rename: the old log is still whole.
  std::string tmp_path = absl::StrCat(log_path_, ".tmp");
  if (unlink(tmp_path.c_str()) != 0 && errno != ENOENT) {
    return OsError(errno, absl::StrCat("cannot remove ", tmp_path));
  }
  absl::StatusOr<int> fd = OpenFile(log_path_, O_RDWR | O_CREAT | O_APPEND);
  if (!fd.ok()) return fd.status();
  log_fd_ = *fd;
  absl::StatusOr<std::string> bytes = ReadAll(log_fd_, log_path_);
  if (!bytes.ok()) return bytes.status();
  absl::StatusOr<RecoveredLog> log = RecoverLog(*bytes);
  if (!log.ok()) {
    return absl::DataLossError(absl::StrCat(
        log_path_, " is corrupt: ", log.status().message(),
        ". State this replica made durable and acknowledged is lost, so it refuses to start: it "
        "cannot know what it promised or accepted (docs/simulation.md, \"Storage faults\")"));
  }
  truncated_tail_bytes_ = bytes->size() - log->valid_bytes;
  if (truncated_tail_bytes_ > 0) {
    if (ftruncate(log_fd_, static_cast<off_t>(log->valid_bytes)) != 0) {
      return OsError(errno, absl::StrCat("cannot truncate the torn tail of ", log_path_));
    }
  }
  // What was recovered is made durable before anything acts on it: after a process crash
  // the file may hold written records the kernel never flushed, which the replica is about
  // to rely on (and the host to delete snapshot images by). The log may also have just been
  // created; its directory entry must be durable too.
  if (options_.fsync) {
    if (absl::Status synced = DataSync(log_fd_, log_path_); !synced.ok()) return synced;
    if (absl::Status synced = SyncDirectory(dir_); !synced.ok()) return synced;
  }
  records_ = log->records;
  bytes_ = log->valid_bytes;
  recovered_ = std::move(log->state);
  legacy_snapshot_data_ = std::move(log->legacy_snapshot_data);
  return absl::OkStatus();
}

absl::Status LogStore::Fail(absl::Status status) {
  SYNOD_CHECK(!status.ok());
  failure_ = status;
  return status;
}

void LogStore::Append(const Ready& ready) { AppendFramed(EncodeReady(ready)); }

void LogStore::AppendFramed(std::string framed) {
  records_ += CountRecords(framed);
  bytes_ += framed.size();
  pending_ += framed;
}

absl::Status LogStore::Sync() {
  if (!failure_.ok()) return failure_;
  if (pending_.empty()) return absl::OkStatus();
  // A mark follows every batch of records and is made durable by the same fsync, so the
  // last record of a synced log is always a mark: corruption of the last record that holds
  // state is told from a torn write (see core/log_codec.h). It carries the count of records
  // before it.
  std::string mark = EncodeSyncMark(records_, bytes_);
  ++records_;
  bytes_ += mark.size();
  pending_ += mark;
  if (absl::Status written = WriteAll(log_fd_, pending_, log_path_); !written.ok()) {
    return Fail(written);
  }
  pending_.clear();
  if (options_.fsync) {
    if (absl::Status synced = DataSync(log_fd_, log_path_); !synced.ok()) return Fail(synced);
  }
  if (options_.after_log_fsync) {
    struct stat st;
    SYNOD_CHECK_EQ(fstat(log_fd_, &st), 0);
    options_.after_log_fsync(static_cast<uint64_t>(st.st_size));
  }
  return absl::OkStatus();
}

absl::StatusOr<PersistedState> LogStore::ReadBack() {
  SYNOD_CHECK(pending_.empty()) << "ReadBack() with records appended since the last Sync()";
  if (!failure_.ok()) return failure_;
  absl::StatusOr<std::string> bytes = ReadAll(log_fd_, log_path_);
  if (!bytes.ok()) return Fail(bytes.status());
  absl::StatusOr<RecoveredLog> log = RecoverLog(*bytes);
  if (!log.ok()) {
    return Fail(absl::DataLossError(
        absl::StrCat(log_path_, " was corrupted while in use: ", log.status().message())));
  }
  return std::move(log->state);
}

absl::Status LogStore::Rewrite(const PersistedState& state) {
  SYNOD_CHECK(pending_.empty()) << "Rewrite() with records appended since the last Sync()";
  if (!failure_.ok()) return failure_;
  // The same records as SimDisk::Rewrite in the simulator.
  Ready compact;
  compact.hard_state = state.hard_state;
  if (state.snapshot_meta.index() > 0) compact.snapshot = SnapshotToInstall{state.snapshot_meta};
  compact.entries = state.entries;
  std::string framed = EncodeReady(compact);
  uint64_t records = CountRecords(framed);
  framed += EncodeSyncMark(records, framed.size());

  std::string tmp_path = absl::StrCat(log_path_, ".tmp");
  absl::StatusOr<int> fd = OpenFile(tmp_path, O_RDWR | O_CREAT | O_TRUNC | O_APPEND);
  if (!fd.ok()) return Fail(fd.status());
  absl::Status status = WriteAll(*fd, framed, tmp_path);
  if (status.ok() && options_.fsync) status = DataSync(*fd, tmp_path);
  if (status.ok() && rename(tmp_path.c_str(), log_path_.c_str()) != 0) {
    status = OsError(errno, absl::StrCat("cannot rename ", tmp_path, " to ", log_path_));
  }
  if (!status.ok()) {
    close(*fd);
    return Fail(status);
  }
  // From here the open file is the log.
  close(log_fd_);
  log_fd_ = *fd;
  records_ = records + 1;
  bytes_ = framed.size();
  if (options_.fsync) {
    if (absl::Status synced = SyncDirectory(dir_); !synced.ok()) return Fail(synced);
  }
  return absl::OkStatus();
}

}  // namespace synod

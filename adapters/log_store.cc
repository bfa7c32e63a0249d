#include "adapters/log_store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <string_view>
#include <system_error>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "adapters/file_util.h"
#include "core/check.h"
#include "core/log_codec.h"

namespace synod {
namespace {

// What `<dir>/log` holds once its records have moved into segments: a damaged record followed
// by a genuine sync mark, which a version that kept its log in that one file recovers as
// corruption (it refuses to start) rather than starting over without its promises.
const std::string& OneFileTombstone() {
  static const std::string* tombstone = [] {
    std::string damaged(12, '\0');  // a frame header (core/log_codec.h)
    damaged[0] = 1;                 // a payload of one byte
    damaged += "\xff";              // whose checksum (0) does not match
    return new std::string(damaged + EncodeSyncMark(1, damaged.size()));
  }();
  return *tombstone;
}

}  // namespace

RecordsSummary RecordsSummary::Of(const Ready& ready) {
  RecordsSummary summary;
  summary.hard_state = ready.hard_state;
  if (ready.snapshot) summary.snapshot = ready.snapshot->meta;
  for (const LogEntry& e : ready.entries) summary.max_slot = std::max(summary.max_slot, e.slot());
  return summary;
}

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
      segments_dir_(absl::StrCat(dir_, "/logs")),
      options_(options),
      lock_fd_(lock_fd) {}

LogStore::~LogStore() {
  if (log_fd_ >= 0) close(log_fd_);
  close(lock_fd_);  // releases the flock
}

std::string LogStore::PathOf(uint64_t number) const {
  return absl::StrFormat("%s/%020u.seg", segments_dir_, number);
}

std::vector<std::string> LogStore::SegmentPaths() const {
  std::vector<std::string> paths;
  for (const SegmentFile& segment : segments_) paths.push_back(PathOf(segment.number));
  return paths;
}

absl::Status LogStore::MigrateOneFileLog() {
  // A rewrite of an earlier version that a crash interrupted before its rename: the old log
  // is still whole.
  const std::string old_path = absl::StrCat(dir_, "/log");
  const std::string tmp_path = absl::StrCat(old_path, ".tmp");
  if (unlink(tmp_path.c_str()) != 0 && errno != ENOENT) {
    return OsError(errno, absl::StrCat("cannot remove ", tmp_path));
  }
  std::error_code error;
  std::filesystem::create_directories(segments_dir_, error);
  if (error) {
    return absl::Status(absl::ErrnoToStatusCode(error.value()),
                        absl::StrCat("cannot create ", segments_dir_, ": ", error.message()));
  }
  const bool no_segments = std::filesystem::is_empty(segments_dir_, error);
  if (error) {
    return absl::Status(absl::ErrnoToStatusCode(error.value()),
                        absl::StrCat("cannot list ", segments_dir_, ": ", error.message()));
  }
  absl::StatusOr<int> old_fd = OpenFile(old_path, O_RDONLY);
  if (!old_fd.ok()) {
    if (absl::IsNotFound(old_fd.status())) return absl::OkStatus();
    return old_fd.status();
  }
  absl::StatusOr<std::string> old_bytes = ReadAll(*old_fd, old_path);
  close(*old_fd);
  if (!old_bytes.ok()) return old_bytes.status();
  if (*old_bytes == OneFileTombstone()) {
    if (!no_segments) return absl::OkStatus();
    return absl::DataLossError(
        absl::StrCat("the log was moved into ", segments_dir_,
                     ", which holds no segment: this replica "
                     "refuses to start (docs/operations.md, \"Data directory\")"));
  }
  if (!no_segments) {
    return absl::FailedPreconditionError(
        absl::StrCat("both ", old_path, " (a log of an earlier version) and segments in ",
                     segments_dir_, " exist: move one away"));
  }
  // One rename: a crash leaves the old file or the first segment, never both.
  const std::string first = PathOf(1);
  if (rename(old_path.c_str(), first.c_str()) != 0) {
    return OsError(errno, absl::StrCat("cannot move ", old_path, " to ", first));
  }
  if (options_.fsync) {
    if (absl::Status synced = SyncDirectory(segments_dir_); !synced.ok()) return synced;
  }
  return absl::OkStatus();
}

absl::Status LogStore::WriteTombstone() {
  // An earlier version started on this directory would find no log and begin again as a
  // new acceptor, forgetting what this one promised: it finds a log it refuses instead.
  // Written once the segments are durable: a tombstone without them means they were lost.
  const std::string path = absl::StrCat(dir_, "/log");
  if (access(path.c_str(), F_OK) == 0) return absl::OkStatus();
  const std::string tmp = absl::StrCat(path, ".tmp");
  absl::StatusOr<int> fd = OpenFile(tmp, O_WRONLY | O_CREAT | O_TRUNC);
  if (!fd.ok()) return fd.status();
  absl::Status written = WriteAll(*fd, OneFileTombstone(), tmp);
  if (written.ok() && options_.fsync) written = DataSync(*fd, tmp);
  close(*fd);
  if (!written.ok()) return written;
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    return OsError(errno, absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  if (options_.fsync) return SyncDirectory(dir_);
  return absl::OkStatus();
}

absl::Status LogStore::Recover() {
  if (absl::Status migrated = MigrateOneFileLog(); !migrated.ok()) return migrated;
  std::vector<uint64_t> numbers;
  std::error_code error;
  for (const auto& file : std::filesystem::directory_iterator(segments_dir_, error)) {
    const std::string name = file.path().filename().string();
    uint64_t number = 0;
    if (name.size() == 24 && name.ends_with(".seg") &&
        absl::SimpleAtoi(absl::string_view(name).substr(0, 20), &number) && number > 0) {
      numbers.push_back(number);
    }
  }
  if (error) {
    return absl::Status(absl::ErrnoToStatusCode(error.value()),
                        absl::StrCat("cannot list ", segments_dir_, ": ", error.message()));
  }
  std::sort(numbers.begin(), numbers.end());
  if (numbers.empty()) numbers.push_back(1);  // a new log: its first segment, empty
  // Segments are deleted oldest first, each deletion made durable before the next: the ones
  // left are numbered without a gap. A gap is a segment lost, and what it held with it.
  for (size_t i = 1; i < numbers.size(); ++i) {
    if (numbers[i] != numbers[i - 1] + 1) {
      return absl::DataLossError(absl::StrCat(
          PathOf(numbers[i - 1] + 1), " is missing (segments ", numbers[i - 1], " and ", numbers[i],
          " are there): state this replica made durable is lost, so it refuses to "
          "start (docs/simulation.md, \"Storage faults\")"));
    }
  }
  LogReplay replay;
  for (size_t i = 0; i < numbers.size(); ++i) {
    const bool last = i + 1 == numbers.size();
    const std::string path = PathOf(numbers[i]);
    absl::StatusOr<int> fd = OpenFile(path, last ? O_RDWR | O_CREAT | O_APPEND : O_RDONLY);
    if (!fd.ok()) return fd.status();
    absl::StatusOr<std::string> bytes = ReadAll(*fd, path);
    if (!bytes.ok()) {
      close(*fd);
      return bytes.status();
    }
    absl::StatusOr<LogReplay::Segment> segment = replay.Add(*bytes, /*more_follow=*/!last);
    if (!segment.ok()) {
      close(*fd);
      return absl::DataLossError(absl::StrCat(
          path, " is corrupt: ", segment.status().message(),
          ". State this replica made durable and acknowledged is lost, so it refuses to start: "
          "it cannot know what it promised or accepted (docs/simulation.md, \"Storage "
          "faults\")"));
    }
    segments_.push_back({numbers[i], segment->max_slot});
    if (!last) {
      // Written before a crash, perhaps never flushed: durable before the replica acts on it.
      absl::Status synced = options_.fsync ? DataSync(*fd, path) : absl::OkStatus();
      close(*fd);
      if (!synced.ok()) return synced;
      continue;
    }
    log_fd_ = *fd;
    truncated_tail_bytes_ = bytes->size() - segment->valid_bytes;
    if (truncated_tail_bytes_ > 0 &&
        ftruncate(log_fd_, static_cast<off_t>(segment->valid_bytes)) != 0) {
      return OsError(errno, absl::StrCat("cannot truncate the torn tail of ", path));
    }
    records_ = segment->records;
    bytes_ = segment->valid_bytes;
  }
  // What was recovered is made durable before anything acts on it: after a process crash
  // the file may hold written records the kernel never flushed, which the replica is about
  // to rely on (and the host to delete snapshot images by). The segment may also have just
  // been created; its directory entry must be durable too.
  if (options_.fsync) {
    if (absl::Status synced = DataSync(log_fd_, PathOf(numbers.back())); !synced.ok()) {
      return synced;
    }
    if (absl::Status synced = SyncDirectory(segments_dir_); !synced.ok()) return synced;
    if (absl::Status synced = SyncDirectory(dir_); !synced.ok()) return synced;
  }
  if (absl::Status written = WriteTombstone(); !written.ok()) return written;
  RecoveredLog log = std::move(replay).Finish();
  recovered_ = std::move(log.state);
  legacy_snapshot_data_ = std::move(log.legacy_snapshot_data);
  hard_state_ = recovered_.hard_state;
  snapshot_ = recovered_.snapshot_meta;
  return absl::OkStatus();
}

absl::Status LogStore::Fail(absl::Status status) {
  SYNOD_CHECK(!status.ok());
  failure_ = status;
  return status;
}

void LogStore::Note(const RecordsSummary& summary) {
  if (summary.hard_state) hard_state_ = summary.hard_state;
  if (summary.snapshot) snapshot_ = *summary.snapshot;
  segments_.back().max_slot = std::max(segments_.back().max_slot, summary.max_slot);
}

void LogStore::Append(const Ready& ready) {
  AppendFramed(EncodeReady(ready), RecordsSummary::Of(ready));
}

void LogStore::AppendFramed(std::string framed, RecordsSummary summary) {
  pending_ += framed;
  if (summary.hard_state) pending_summary_.hard_state = std::move(summary.hard_state);
  if (summary.snapshot) pending_summary_.snapshot = std::move(summary.snapshot);
  pending_summary_.max_slot = std::max(pending_summary_.max_slot, summary.max_slot);
}

absl::Status LogStore::Sync() {
  if (!failure_.ok()) return failure_;
  if (pending_.empty()) return absl::OkStatus();
  std::string records = std::move(pending_);
  RecordsSummary summary = std::move(pending_summary_);
  pending_.clear();
  pending_summary_ = RecordsSummary();
  if (bytes_ >= options_.segment_bytes) return StartSegment(std::move(records), summary);
  // A mark follows every batch of records and is made durable by the same fsync, so the
  // last record of a synced segment is always a mark: corruption of the last record that
  // holds state is told from a torn write (see core/log_codec.h). It carries the count of
  // records before it in its segment.
  const uint64_t count = FrameOffsets(records).size();
  records += EncodeSyncMark(records_ + count, bytes_ + records.size());
  const std::string path = PathOf(segments_.back().number);
  if (absl::Status written = WriteAll(log_fd_, records, path); !written.ok()) {
    return Fail(written);
  }
  if (options_.fsync) {
    if (absl::Status synced = DataSync(log_fd_, path); !synced.ok()) return Fail(synced);
  }
  records_ += count + 1;
  bytes_ += records.size();
  Note(summary);
  if (options_.after_log_fsync) options_.after_log_fsync(bytes_);
  return absl::OkStatus();
}

absl::Status LogStore::StartSegment(std::string records, const RecordsSummary& summary) {
  Ready header;
  header.hard_state = hard_state_;
  if (snapshot_.index() > 0) header.snapshot = SnapshotToInstall{snapshot_};
  std::string framed = EncodeReady(header) + records;
  const uint64_t count = FrameOffsets(framed).size();
  framed += EncodeSyncMark(count, framed.size());
  const uint64_t number = segments_.back().number + 1;
  const std::string path = PathOf(number);
  absl::StatusOr<int> fd = OpenFile(path, O_RDWR | O_CREAT | O_TRUNC | O_APPEND);
  if (!fd.ok()) return Fail(fd.status());
  absl::Status status = WriteAll(*fd, framed, path);
  if (status.ok() && options_.fsync) status = DataSync(*fd, path);
  // The segment's directory entry is durable before anything relies on it (a deletion of
  // the segments before it, or an acknowledgement of what it holds).
  if (status.ok() && options_.fsync) status = SyncDirectory(segments_dir_);
  if (!status.ok()) {
    close(*fd);
    return Fail(status);
  }
  close(log_fd_);
  log_fd_ = *fd;
  segments_.push_back({number, 0});
  records_ = count + 1;
  bytes_ = framed.size();
  Note(summary);
  if (options_.after_log_fsync) options_.after_log_fsync(bytes_);
  return absl::OkStatus();
}

absl::Status LogStore::DeleteSegmentsThrough(uint64_t through) {
  // A deletion a crash undoes is harmless: the segments after it repeat the hard state and
  // snapshot it held, and the snapshot covers its entries. Each is made durable before the
  // next, so the segments left are always numbered without a gap (Recover checks it).
  while (segments_.size() > 1 && segments_.front().max_slot <= through) {
    const std::string path = PathOf(segments_.front().number);
    if (unlink(path.c_str()) != 0 && errno != ENOENT) {
      return Fail(OsError(errno, absl::StrCat("cannot delete ", path)));
    }
    segments_.erase(segments_.begin());
    if (options_.fsync) {
      if (absl::Status synced = SyncDirectory(segments_dir_); !synced.ok()) return Fail(synced);
    }
  }
  return absl::OkStatus();
}

absl::Status LogStore::Compact(uint64_t through) {
  SYNOD_CHECK(pending_.empty()) << "Compact() with records appended since the last Sync()";
  if (!failure_.ok()) return failure_;
  if (absl::Status started = StartSegment("", RecordsSummary()); !started.ok()) return started;
  // Never past the durable snapshot: the entries above it are all the log has of them.
  return DeleteSegmentsThrough(std::min(through, snapshot_.index()));
}

absl::StatusOr<PersistedState> LogStore::ReadBack() {
  SYNOD_CHECK(pending_.empty()) << "ReadBack() with records appended since the last Sync()";
  if (!failure_.ok()) return failure_;
  LogReplay replay;
  for (size_t i = 0; i < segments_.size(); ++i) {
    const std::string path = PathOf(segments_[i].number);
    absl::StatusOr<int> fd = OpenFile(path, O_RDONLY);
    if (!fd.ok()) return Fail(fd.status());
    absl::StatusOr<std::string> bytes = ReadAll(*fd, path);
    close(*fd);
    if (!bytes.ok()) return Fail(bytes.status());
    absl::StatusOr<LogReplay::Segment> segment =
        replay.Add(*bytes, /*more_follow=*/i + 1 < segments_.size());
    if (!segment.ok()) {
      return Fail(absl::DataLossError(
          absl::StrCat(path, " was corrupted while in use: ", segment.status().message())));
    }
  }
  return std::move(std::move(replay).Finish().state);
}

absl::Status LogStore::Rewrite(const PersistedState& state) {
  SYNOD_CHECK(pending_.empty()) << "Rewrite() with records appended since the last Sync()";
  if (!failure_.ok()) return failure_;
  hard_state_ = state.hard_state;
  snapshot_ = state.snapshot_meta;
  Ready entries;
  entries.entries = state.entries;
  absl::Status started = StartSegment(EncodeReady(entries), RecordsSummary::Of(entries));
  if (!started.ok()) return started;
  return DeleteSegmentsThrough(UINT64_MAX);
}

}  // namespace synod

#include "adapters/snapshot_files.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "adapters/file_util.h"
#include "core/replica.h"

namespace synod {
namespace {

constexpr char kImageSuffix[] = ".snap";
constexpr char kIncomingName[] = "incoming.part";
constexpr char kOwnTempName[] = "own.tmp";
constexpr char kStageName[] = "stage";
constexpr char kTrashName[] = "trash";
// Images are read back in pieces of this size to check them (memory stays bounded).
constexpr uint64_t kCheckBlockBytes = 1 << 20;

// Whether the image file `fd` (at `path`) holds `meta.size_bytes` bytes whose checksum is
// meta.checksum.
absl::Status CheckImage(int fd, const std::string& path, const SnapshotMeta& meta) {
  struct stat st;
  if (fstat(fd, &st) != 0) return OsError(errno, absl::StrCat("cannot stat ", path));
  if (static_cast<uint64_t>(st.st_size) != meta.size_bytes()) {
    return absl::DataLossError(absl::StrCat("the snapshot image ", path, " holds ", st.st_size,
                                            " bytes, not ", meta.size_bytes()));
  }
  SnapshotChecksummer checksum(meta.size_bytes());
  for (uint64_t offset = 0; offset < meta.size_bytes(); offset += kCheckBlockBytes) {
    absl::StatusOr<std::string> block = ReadAt(fd, offset, kCheckBlockBytes, path);
    if (!block.ok()) return block.status();
    if (block->empty()) return absl::DataLossError(absl::StrCat(path, " shrank"));
    checksum.Add(*block);
  }
  if (checksum.value() != meta.checksum()) {
    return absl::DataLossError("the snapshot's bytes do not match its checksum");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<SnapshotFiles>> SnapshotFiles::Open(std::string dir, bool fsync) {
  std::error_code error;
  const bool created = std::filesystem::create_directories(dir, error);
  if (error) {
    return absl::Status(absl::ErrnoToStatusCode(error.value()),
                        absl::StrCat("cannot create ", dir, ": ", error.message()));
  }
  if (created && fsync) {  // its entry in the data directory
    const std::string parent = std::filesystem::path(dir).parent_path().string();
    if (absl::Status synced = SyncDirectory(parent.empty() ? "." : parent); !synced.ok()) {
      return synced;
    }
  }
  // What a crash left half written, or left to delete: never named by the log.
  std::filesystem::remove_all(absl::StrCat(dir, "/", kStageName), error);
  if (error) {
    return absl::Status(
        absl::ErrnoToStatusCode(error.value()),
        absl::StrCat("cannot remove ", dir, "/", kStageName, ": ", error.message()));
  }
  absl::StatusOr<std::unique_ptr<Trash>> trash = Trash::Open(absl::StrCat(dir, "/", kTrashName));
  if (!trash.ok()) return trash.status();
  for (const char* name : {kIncomingName, kOwnTempName}) {
    std::filesystem::remove(absl::StrCat(dir, "/", name), error);
    if (error) {
      return absl::Status(absl::ErrnoToStatusCode(error.value()),
                          absl::StrCat("cannot remove ", dir, "/", name, ": ", error.message()));
    }
  }
  return std::unique_ptr<SnapshotFiles>(
      new SnapshotFiles(std::move(dir), fsync, *std::move(trash)));
}

SnapshotFiles::SnapshotFiles(std::string dir, bool fsync, std::unique_ptr<Trash> trash)
    : dir_(std::move(dir)), fsync_(fsync), trash_(std::move(trash)) {}

SnapshotFiles::~SnapshotFiles() {
  CloseReader();
  CloseIncoming();
}

void SnapshotFiles::RemoveInBackground(const std::string& path) {
  // A file left behind is removed at the next Open (or by Retain).
  if (absl::Status removed = trash_->Remove(path); !removed.ok()) {
    fprintf(stderr, "W %s\n", removed.ToString().c_str());
  }
}

std::string SnapshotFiles::PathOf(const SnapshotMeta& meta) const {
  return absl::StrFormat("%s/%020" PRIu64 "-%016" PRIx64 "%s", dir_, meta.index(), meta.checksum(),
                         kImageSuffix);
}

void SnapshotFiles::CloseReader() {
  if (reader_fd_ >= 0) close(reader_fd_);
  reader_fd_ = -1;
  reader_key_.reset();
}

void SnapshotFiles::CloseIncoming() {
  if (incoming_fd_ >= 0) close(incoming_fd_);
  incoming_fd_ = -1;
  incoming_meta_.reset();
  incoming_bytes_ = 0;
  incoming_checksum_.reset();
  incoming_error_ = absl::OkStatus();
}

absl::StatusOr<std::string> SnapshotFiles::ReadChunk(const SnapshotMeta& meta, uint64_t offset,
                                                     uint64_t max_bytes) {
  const std::pair<uint64_t, uint64_t> key{meta.index(), meta.checksum()};
  const std::string path = PathOf(meta);
  if (reader_key_ != key) {
    CloseReader();
    absl::StatusOr<int> fd = OpenFile(path, O_RDONLY);
    if (!fd.ok()) return fd.status();  // NotFound when there is no such image
    reader_fd_ = *fd;
    reader_key_ = key;
  }
  if (offset > meta.size_bytes()) return absl::OutOfRangeError("past the snapshot's end");
  return ReadAt(reader_fd_, offset, std::min(max_bytes, meta.size_bytes() - offset), path);
}

void SnapshotFiles::Receive(const SnapshotMeta& meta, uint64_t offset, std::string_view data) {
  const std::string path = absl::StrCat(dir_, "/", kIncomingName);
  if (offset == 0) {
    CloseIncoming();
    incoming_meta_ = meta;
    absl::StatusOr<int> fd = OpenFile(path, O_RDWR | O_CREAT | O_TRUNC);  // read to Seal
    if (!fd.ok()) {
      incoming_error_ = fd.status();
      return;
    }
    incoming_fd_ = *fd;
    incoming_checksum_.emplace(meta.size_bytes());
  }
  if (!incoming_error_.ok()) return;
  if (!incoming_meta_ || incoming_meta_->index() != meta.index() ||
      incoming_meta_->checksum() != meta.checksum() || offset != incoming_bytes_) {
    incoming_error_ = absl::InternalError("a snapshot chunk out of order reached the store");
    return;
  }
  incoming_error_ = WriteAllAt(incoming_fd_, data, offset, path);
  incoming_bytes_ += data.size();
  incoming_checksum_->Add(data);  // checked at Seal, without reading the file back
}

absl::Status SnapshotFiles::Seal(const SnapshotMeta& meta) {
  const std::string path = absl::StrCat(dir_, "/", kIncomingName);
  absl::Status sealed = incoming_error_;
  if (sealed.ok() && (!incoming_meta_ || incoming_meta_->index() != meta.index() ||
                      incoming_meta_->checksum() != meta.checksum())) {
    sealed = absl::FailedPreconditionError("no such snapshot image is being received");
  }
  if (sealed.ok() &&
      (incoming_bytes_ != meta.size_bytes() || incoming_checksum_->value() != meta.checksum())) {
    sealed = absl::DataLossError("the snapshot's bytes do not match its checksum");
  }
  if (sealed.ok() && fsync_) sealed = DataSync(incoming_fd_, path);
  if (sealed.ok() && rename(path.c_str(), PathOf(meta).c_str()) != 0) {
    sealed = OsError(errno, absl::StrCat("cannot rename ", path));
  }
  if (sealed.ok() && fsync_) sealed = SyncDirectory(dir_);
  CloseIncoming();
  if (!sealed.ok()) RemoveInBackground(path);
  return sealed;
}

void SnapshotFiles::Retain(const SnapshotMeta& meta) {
  const std::string kept = std::filesystem::path(PathOf(meta)).filename().string();
  std::error_code error;
  std::filesystem::directory_iterator it(dir_, error);
  for (; !error && it != std::filesystem::directory_iterator(); it.increment(error)) {
    const std::string name = it->path().filename().string();
    if (name == kept || !name.ends_with(kImageSuffix)) continue;
    CloseReader();  // it may be the one removed
    RemoveInBackground(it->path().string());
  }
  if (error) {
    fprintf(stderr, "W cannot list %s to remove old snapshot images: %s\n", dir_.c_str(),
            error.message().c_str());
  }
}

absl::Status SnapshotFiles::Keep(const SnapshotMeta& meta, std::string_view image) {
  const std::string path = absl::StrCat(dir_, "/", kOwnTempName);
  absl::StatusOr<int> fd = OpenFile(path, O_WRONLY | O_CREAT | O_TRUNC);
  if (!fd.ok()) return fd.status();
  absl::Status kept = WriteAll(*fd, image, path);
  if (kept.ok() && fsync_) kept = DataSync(*fd, path);
  close(*fd);
  if (kept.ok() && rename(path.c_str(), PathOf(meta).c_str()) != 0) {
    kept = OsError(errno, absl::StrCat("cannot rename ", path));
  }
  if (kept.ok() && fsync_) kept = SyncDirectory(dir_);
  if (!kept.ok()) unlink(path.c_str());
  return kept;
}

absl::StatusOr<SnapshotMeta> SnapshotFiles::Write(uint64_t index, std::string_view image) {
  SnapshotMeta meta = SnapshotMetaOf(index, image);
  if (absl::Status kept = Keep(meta, image); !kept.ok()) return kept;
  return meta;
}

absl::Status SnapshotFiles::Adopt(const SnapshotMeta& meta, std::string_view image) {
  if (image.size() != meta.size_bytes() || SnapshotChecksum(image) != meta.checksum()) {
    return absl::DataLossError("the snapshot's bytes do not match its checksum");
  }
  return Keep(meta, image);
}

std::string SnapshotFiles::OwnTempPath() const { return absl::StrCat(dir_, "/", kOwnTempName); }

absl::Status SnapshotFiles::Publish(const SnapshotMeta& meta) {
  const std::string path = OwnTempPath();
  if (rename(path.c_str(), PathOf(meta).c_str()) != 0) {
    return OsError(errno, absl::StrCat("cannot rename ", path));
  }
  return fsync_ ? SyncDirectory(dir_) : absl::OkStatus();
}

void SnapshotFiles::Discard() { RemoveInBackground(OwnTempPath()); }

void SnapshotFiles::RemoveStageDir(std::string_view name) {
  RemoveInBackground(absl::StrCat(dir_, "/", kStageName, "/", std::string(name)));
}

absl::StatusOr<std::string> SnapshotFiles::EmptyStageDir(std::string_view name) {
  const std::string stage = absl::StrCat(dir_, "/", kStageName, "/", std::string(name));
  RemoveStageDir(name);
  std::error_code error;
  std::filesystem::create_directories(stage, error);
  if (error) {
    return absl::Status(absl::ErrnoToStatusCode(error.value()),
                        absl::StrCat("cannot empty ", stage, ": ", error.message()));
  }
  return stage;
}

absl::Status SnapshotFiles::Verify(const SnapshotMeta& meta) {
  const std::string path = PathOf(meta);
  absl::StatusOr<int> fd = OpenFile(path, O_RDONLY);
  if (!fd.ok()) return fd.status();
  absl::Status checked = CheckImage(*fd, path, meta);
  close(*fd);
  return checked;
}

absl::StatusOr<std::string> SnapshotFiles::ReadImage(const SnapshotMeta& meta) {
  const std::string path = PathOf(meta);
  absl::StatusOr<int> fd = OpenFile(path, O_RDONLY);
  if (!fd.ok()) return fd.status();
  absl::StatusOr<std::string> image = ReadAll(*fd, path);
  close(*fd);
  if (!image.ok()) return image.status();
  if (image->size() != meta.size_bytes() || SnapshotChecksum(*image) != meta.checksum()) {
    return absl::DataLossError(
        absl::StrCat("the snapshot image ", path, " does not match its checksum"));
  }
  return image;
}

}  // namespace synod

#include "adapters/snapshot_image.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <functional>
#include <optional>
#include <set>
#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "adapters/file_database_opener.h"
#include "adapters/file_util.h"
#include "core/replica.h"
#include "core/snapshot_format.h"
#include "core/stable_hash.h"

namespace synod {
namespace {

// Images are copied in blocks of this size.
constexpr uint64_t kBlockBytes = 1 << 20;

// Closes a file descriptor when it goes out of scope.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// Pages copied per backup step: the cancel flag is looked at between steps.
constexpr int kBackupStepPages = 256;

// Copies the main database of `from` into a new plain database file at `path`. Every step
// reads from `from`'s open read transaction (sqlite3_backup_step opens one only if there is
// none), and no other connection writes through `from`, so the copy never restarts.
absl::Status BackupToFile(sqlite3* from, const std::string& path,
                          const std::function<bool()>& cancelled) {
  unlink(path.c_str());
  sqlite3* raw = nullptr;
  int rc =
      sqlite3_open_v2(path.c_str(), &raw,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nullptr);
  Db to(raw);
  if (rc == SQLITE_OK) {
    rc = sqlite3_exec(to.get(), "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF", nullptr,
                      nullptr, nullptr);
  }
  if (rc == SQLITE_OK) {
    sqlite3_backup* backup = sqlite3_backup_init(to.get(), "main", from, "main");
    if (backup == nullptr) {
      rc = sqlite3_errcode(to.get());
    } else {
      do {
        rc = cancelled() ? SQLITE_INTERRUPT : sqlite3_backup_step(backup, kBackupStepPages);
      } while (rc == SQLITE_OK);
      int finished = sqlite3_backup_finish(backup);
      rc = rc == SQLITE_DONE ? finished : rc;
    }
  }
  if (rc != SQLITE_OK) {
    if (cancelled()) return absl::CancelledError("the copy was cancelled");
    const std::string message =
        absl::StrCat("cannot copy a database into ", path, ": ",
                     to != nullptr ? sqlite3_errmsg(to.get()) : sqlite3_errstr(rc));
    return (rc & 0xff) == SQLITE_FULL ? absl::ResourceExhaustedError(message)
                                      : absl::UnavailableError(message);
  }
  return absl::OkStatus();
}

// Appends bytes to the image file, hashing them for its checksum and its trailer.
class ImageWriter {
 public:
  ImageWriter(int fd, const std::string& path, uint64_t total_bytes)
      : fd_(fd), path_(path), checksum_(total_bytes) {}
  absl::Status Append(std::string_view bytes, bool in_body = true) {
    if (in_body) body_.Add(bytes);
    checksum_.Add(bytes);
    written_ += bytes.size();
    return WriteAll(fd_, bytes, path_);
  }
  uint64_t body_hash() const { return body_.value(); }
  uint64_t checksum() const { return checksum_.value(); }
  uint64_t written() const { return written_; }

 private:
  const int fd_;
  const std::string& path_;
  SnapshotChecksummer checksum_;
  StableHash body_;
  uint64_t written_ = 0;
};

}  // namespace

absl::Status CopyDatabaseToFile(sqlite3* from, const std::string& path,
                                const std::atomic<bool>* cancel) {
  return BackupToFile(from, path, [cancel] { return cancel != nullptr && cancel->load(); });
}

absl::StatusOr<SnapshotMeta> WriteSnapshotImage(SnapshotView& view, const std::string& stage_path,
                                                const std::string& path, bool fsync,
                                                const std::atomic<bool>* cancel) {
  const std::function<bool()> cancelled = [cancel] { return cancel != nullptr && cancel->load(); };
  // The copy of a database being staged is removed whatever happens.
  struct Unlink {
    const std::string& path;
    ~Unlink() { unlink(path.c_str()); }
  } unlink_stage{stage_path};
  // The image's size comes first in its checksum: every database's size, as the view's
  // transactions see them, before anything is copied.
  uint64_t total = kSnapshotMagic.size() + kSnapshotU64Bytes;
  std::vector<uint64_t> sizes;
  for (const auto& [file_id, reader] : view.databases) {
    absl::StatusOr<uint64_t> bytes = FileBytes(reader.get());
    if (!bytes.ok()) return bytes.status();
    sizes.push_back(*bytes);
    total += SnapshotFrameHeader(file_id, *bytes).size() + *bytes;
  }
  absl::StatusOr<int> out = OpenFile(path, O_WRONLY | O_CREAT | O_TRUNC);
  if (!out.ok()) return out.status();
  Fd out_fd(*out);
  ImageWriter image(out_fd.get(), path, total);
  if (absl::Status s = image.Append(kSnapshotMagic); !s.ok()) return s;
  for (size_t i = 0; i < view.databases.size(); ++i) {
    auto& [file_id, reader] = view.databases[i];
    if (cancelled()) return absl::CancelledError("the snapshot was cancelled");
    if (absl::Status copied = BackupToFile(reader.get(), stage_path, cancelled); !copied.ok()) {
      return cancelled() ? absl::CancelledError("the snapshot was cancelled") : copied;
    }
    // Copied: its read transaction ends now, so that its WAL can be checkpointed again while
    // the other databases are copied.
    reader.reset();
    absl::StatusOr<int> staged = OpenFile(stage_path, O_RDONLY);
    if (!staged.ok()) return staged.status();
    Fd staged_fd(*staged);
    struct stat st;
    if (fstat(staged_fd.get(), &st) != 0) return OsError(errno, "cannot stat " + stage_path);
    if (static_cast<uint64_t>(st.st_size) != sizes[i]) {
      return absl::InternalError(absl::StrCat("database ", file_id, " was copied as ", st.st_size,
                                              " bytes, not the ", sizes[i], " it holds"));
    }
    if (absl::Status s = image.Append(SnapshotFrameHeader(file_id, sizes[i])); !s.ok()) return s;
    for (uint64_t offset = 0; offset < sizes[i]; offset += kBlockBytes) {
      if (cancelled()) return absl::CancelledError("the snapshot was cancelled");
      absl::StatusOr<std::string> block = ReadAt(staged_fd.get(), offset, kBlockBytes, stage_path);
      if (!block.ok()) return block.status();
      if (block->empty()) return absl::DataLossError(stage_path + " shrank");
      if (absl::Status s = image.Append(*block); !s.ok()) return s;
    }
    unlink(stage_path.c_str());
  }
  std::string trailer;
  AppendSnapshotU64(&trailer, image.body_hash());
  if (absl::Status s = image.Append(trailer, /*in_body=*/false); !s.ok()) return s;
  SYNOD_CHECK_EQ(image.written(), total);
  if (fsync) {
    if (absl::Status s = DataSync(out_fd.get(), path); !s.ok()) return s;
  }
  SnapshotMeta meta;
  meta.set_index(view.revision);
  meta.set_size_bytes(total);
  meta.set_checksum(image.checksum());
  return meta;
}

namespace {

// Reads an image file front to back, hashing what it reads for the trailer.
class ImageReader {
 public:
  ImageReader(int fd, const std::string& path, uint64_t size) : fd_(fd), path_(path), size_(size) {}
  // The bytes before the trailer not yet read.
  uint64_t body_left() const { return size_ - kSnapshotU64Bytes - offset_; }
  absl::StatusOr<std::string> Read(uint64_t bytes) {
    if (bytes > body_left()) return Damaged("a frame runs past the image's end");
    absl::StatusOr<std::string> read = ReadAt(fd_, offset_, bytes, path_);
    if (!read.ok()) return read.status();
    if (read->size() != bytes) return Damaged("the image file shrank");
    offset_ += bytes;
    body_.Add(*read);
    return read;
  }
  absl::StatusOr<uint64_t> ReadU64() {
    absl::StatusOr<std::string> bytes = Read(kSnapshotU64Bytes);
    if (!bytes.ok()) return bytes.status();
    return DecodeSnapshotU64(*bytes);
  }
  // Whether the trailer holds the hash of everything read. REQUIRES: body_left() == 0.
  absl::Status CheckTrailer() {
    absl::StatusOr<std::string> trailer = ReadAt(fd_, offset_, kSnapshotU64Bytes, path_);
    if (!trailer.ok()) return trailer.status();
    if (trailer->size() != kSnapshotU64Bytes || DecodeSnapshotU64(*trailer) != body_.value()) {
      return Damaged("snapshot checksum mismatch");
    }
    return absl::OkStatus();
  }
  static absl::Status Damaged(std::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("damaged snapshot image: ", std::string(why)));
  }

 private:
  const int fd_;
  const std::string& path_;
  const uint64_t size_;
  uint64_t offset_ = 0;
  StableHash body_;
};

// Copies `bytes` bytes of a database image from `in` into a new file at `path`, checking
// and normalizing its header (core/sqlite_util.h).
absl::Status StageDatabase(ImageReader& in, uint64_t bytes, const std::string& path,
                           const std::atomic<bool>* cancel) {
  if (bytes < kImageHeaderBytes) return ImageReader::Damaged("a database image is too short");
  absl::StatusOr<int> out = OpenFile(path, O_WRONLY | O_CREAT | O_EXCL);
  if (!out.ok()) return out.status();
  Fd out_fd(*out);
  for (uint64_t offset = 0; offset < bytes; offset += kBlockBytes) {
    if (cancel != nullptr && cancel->load()) return absl::CancelledError("the check was cancelled");
    absl::StatusOr<std::string> block = in.Read(std::min(kBlockBytes, bytes - offset));
    if (!block.ok()) return block.status();
    if (offset == 0) {
      if (absl::Status header = CheckImageHeader(*block); !header.ok()) return header;
      NormalizeImageHeader(block->data());
    }
    if (absl::Status s = WriteAll(out_fd.get(), *block, path); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<SnapshotImages> StageSnapshotImage(const std::string& path,
                                                  const std::string& stage_dir, uint64_t revision,
                                                  const std::atomic<bool>* cancel) {
  absl::StatusOr<int> opened = OpenFile(path, O_RDONLY);
  if (!opened.ok()) return opened.status();
  Fd fd(*opened);
  struct stat st;
  if (fstat(fd.get(), &st) != 0) return OsError(errno, "cannot stat " + path);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < kSnapshotMagic.size() + kSnapshotU64Bytes) {
    return ImageReader::Damaged("too short");
  }
  ImageReader in(fd.get(), path, size);
  absl::StatusOr<std::string> magic = in.Read(kSnapshotMagic.size());
  if (!magic.ok()) return magic.status();
  if (*magic != kSnapshotMagic) return absl::InvalidArgumentError("not a Synod snapshot");
  std::vector<std::pair<std::string, std::string>> staged;  // (file id, path)
  std::set<std::string> seen;
  while (in.body_left() > 0) {
    absl::StatusOr<uint64_t> id_bytes = in.ReadU64();
    if (!id_bytes.ok()) return id_bytes.status();
    if (*id_bytes > kSnapshotMaxFileIdBytes) return ImageReader::Damaged("a file id too long");
    absl::StatusOr<std::string> file_id = in.Read(*id_bytes);
    if (!file_id.ok()) return file_id.status();
    if (!FileDatabaseOpener::IsValidFileId(*file_id) || !seen.insert(*file_id).second) {
      return ImageReader::Damaged("a bad or repeated file id");
    }
    absl::StatusOr<uint64_t> image_bytes = in.ReadU64();
    if (!image_bytes.ok()) return image_bytes.status();
    const std::string staged_path = absl::StrCat(stage_dir, "/", *file_id, ".sqlite3");
    if (absl::Status s = StageDatabase(in, *image_bytes, staged_path, cancel); !s.ok()) {
      return absl::Status(s.code(),
                          absl::StrCat("snapshot database ", *file_id, ": ", s.message()));
    }
    staged.emplace_back(*file_id, staged_path);
  }
  if (absl::Status trailer = in.CheckTrailer(); !trailer.ok()) return trailer;
  SnapshotImages images;
  for (const auto& [file_id, staged_path] : staged) {
    // Read-write, as a scratch database is: the check of a full-text table is an INSERT of
    // a command (it changes nothing). No journal: nothing here needs one, and a journal's
    // header would draw from SQLite's random generator, which the loop seeds per request.
    sqlite3* raw = nullptr;
    int rc = sqlite3_open_v2(staged_path.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX,
                             nullptr);
    Db db(raw);
    // The schema is read first, where damage is an error: ConfigureConnection's statements
    // load it too, and stop the process on any error.
    if (rc == SQLITE_OK) {
      rc = sqlite3_exec(db.get(), "SELECT count(*) FROM sqlite_schema", nullptr, nullptr, nullptr);
    }
    if (rc == SQLITE_OK) {
      ConfigureConnection(db.get());
      rc = sqlite3_exec(db.get(), "PRAGMA journal_mode = OFF", nullptr, nullptr, nullptr);
    }
    if (rc == SQLITE_OK && cancel != nullptr) {
      // The checks (integrity_check reads every page) stop once the flag is set.
      sqlite3_progress_handler(
          db.get(), 10'000,
          [](void* flag) { return static_cast<const std::atomic<bool>*>(flag)->load() ? 1 : 0; },
          const_cast<std::atomic<bool>*>(cancel));
    }
    absl::Status checked =
        rc == SQLITE_OK
            ? CheckImageContent(db.get())
            : absl::InvalidArgumentError(absl::StrCat("cannot open: ", sqlite3_errstr(rc)));
    if (cancel != nullptr && cancel->load()) return absl::CancelledError("the check was cancelled");
    if (!checked.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("snapshot database ", file_id, ": ", checked.message()));
    }
    if (cancel != nullptr) sqlite3_progress_handler(db.get(), 0, nullptr, nullptr);
    images.emplace(file_id, std::move(db));
  }
  if (absl::Status whole = StateMachine::CheckSnapshotImages(images, revision); !whole.ok()) {
    return whole;
  }
  return images;
}

}  // namespace synod

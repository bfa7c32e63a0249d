#include "adapters/blob_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "adapters/file_util.h"
#include "core/check.h"

namespace synod {
namespace {

bool IsLowerHex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

std::string Hex(const unsigned char* bytes, size_t size) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out(size * 2, '\0');
  for (size_t i = 0; i < size; ++i) {
    out[2 * i] = kDigits[bytes[i] >> 4];
    out[2 * i + 1] = kDigits[bytes[i] & 0xf];
  }
  return out;
}

int64_t ModifiedUnixMs(const struct stat& st) {
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000 + st.st_mtim.tv_nsec / 1'000'000;
}

absl::Status MakeDirectory(const std::string& path) {
  if (mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) return OsError(errno, "mkdir " + path);
  return absl::OkStatus();
}

// Names of the temporary files of this process: unique across threads.
std::atomic<uint64_t> temp_counter{0};

}  // namespace

bool IsSha256Hex(std::string_view text) {
  if (text.size() != 64) return false;
  for (char c : text) {
    if (!IsLowerHex(c)) return false;
  }
  return true;
}

// OpenSSL's SHA-256, fed as the bytes arrive.
struct BlobWriter::Hasher {
  Hasher() : context(EVP_MD_CTX_new()) {
    SYNOD_CHECK(context != nullptr && EVP_DigestInit_ex(context, EVP_sha256(), nullptr) == 1)
        << "OpenSSL could not start a SHA-256";
  }
  ~Hasher() { EVP_MD_CTX_free(context); }
  void Update(std::string_view bytes) {
    SYNOD_CHECK(EVP_DigestUpdate(context, bytes.data(), bytes.size()) == 1);
  }
  std::string HexDigest() {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int size = 0;
    SYNOD_CHECK(EVP_DigestFinal_ex(context, digest, &size) == 1 && size == 32);
    return Hex(digest, size);
  }
  EVP_MD_CTX* context;
};

std::string Sha256Hex(std::string_view bytes) {
  BlobWriter::Hasher hasher;
  hasher.Update(bytes);
  return hasher.HexDigest();
}

absl::StatusOr<std::unique_ptr<BlobStore>> BlobStore::Open(std::string dir, bool fsync) {
  if (absl::Status made = MakeDirectory(dir); !made.ok()) return made;
  for (const char* sub : {"/tmp", "/trash"}) {
    const std::string path = dir + sub;
    if (absl::Status made = MakeDirectory(path); !made.ok()) return made;
    DIR* listing = opendir(path.c_str());
    if (listing == nullptr) return OsError(errno, "opendir " + path);
    while (dirent* entry = readdir(listing)) {
      const std::string name = entry->d_name;
      if (name == "." || name == "..") continue;
      if (unlink((path + "/" + name).c_str()) != 0 && errno != ENOENT) {
        const int error = errno;
        closedir(listing);
        return OsError(error, "unlink " + path + "/" + name);
      }
    }
    closedir(listing);
  }
  return std::unique_ptr<BlobStore>(new BlobStore(std::move(dir), fsync));
}

std::string BlobStore::PathOf(std::string_view sha256) const {
  SYNOD_CHECK(IsSha256Hex(sha256)) << "not a blob name";
  return dir_ + "/" + std::string(sha256.substr(0, 2)) + "/" + std::string(sha256.substr(2));
}

std::optional<BlobInfo> BlobStore::Stat(std::string_view sha256) const {
  struct stat st;
  if (stat(PathOf(sha256).c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return std::nullopt;
  return BlobInfo{std::string(sha256), static_cast<uint64_t>(st.st_size), ModifiedUnixMs(st)};
}

absl::StatusOr<int> BlobStore::OpenForReading(std::string_view sha256) const {
  const std::string path = PathOf(sha256);
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return OsError(errno, "open " + path);
  return fd;
}

absl::Status BlobStore::Touch(std::string_view sha256) const {
  const std::string path = PathOf(sha256);
  if (utimensat(AT_FDCWD, path.c_str(), nullptr, 0) != 0) return OsError(errno, "touch " + path);
  return absl::OkStatus();
}

absl::Status BlobStore::Remove(std::string_view sha256) const {
  const std::string path = PathOf(sha256);
  if (unlink(path.c_str()) != 0 && errno != ENOENT) return OsError(errno, "unlink " + path);
  return absl::OkStatus();
}

bool BlobStore::Pin(std::string_view sha256) {
  std::lock_guard<std::mutex> lock(mutex_);
  ++pins_[std::string(sha256)];
  return Touch(sha256).ok();
}

void BlobStore::Unpin(std::string_view sha256) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = pins_.find(sha256);
  SYNOD_CHECK(it != pins_.end()) << "unpinning a blob that is not pinned";
  if (--it->second == 0) pins_.erase(it);
}

bool BlobStore::Keep(std::string_view sha256, bool durable) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!Touch(sha256).ok()) return false;
  }
  if (!durable || !fsync_) return true;
  return SyncDirectory(dir_ + "/" + std::string(sha256.substr(0, 2))).ok();
}

bool BlobStore::RemoveIfUnused(std::string_view sha256, int64_t cutoff_unix_ms) {
  std::string trashed;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (pins_.find(sha256) != pins_.end()) return false;
    std::optional<BlobInfo> info = Stat(sha256);
    if (!info || info->modified_unix_ms >= cutoff_unix_ms) return false;
    trashed = dir_ + "/trash/" + std::to_string(++trash_counter_);
    if (rename(PathOf(sha256).c_str(), trashed.c_str()) != 0) return false;
  }
  unlink(trashed.c_str());  // slow for a large file: outside the lock
  return true;
}

absl::StatusOr<std::vector<BlobInfo>> BlobStore::List() const {
  std::vector<BlobInfo> blobs;
  DIR* top = opendir(dir_.c_str());
  if (top == nullptr) return OsError(errno, "opendir " + dir_);
  while (dirent* shard = readdir(top)) {
    const std::string prefix = shard->d_name;
    if (prefix.size() != 2 || !IsLowerHex(prefix[0]) || !IsLowerHex(prefix[1])) continue;
    const std::string shard_dir = dir_ + "/" + prefix;
    DIR* listing = opendir(shard_dir.c_str());
    if (listing == nullptr) continue;  // removed meanwhile, or not a directory
    while (dirent* entry = readdir(listing)) {
      const std::string sha256 = prefix + entry->d_name;
      if (!IsSha256Hex(sha256)) continue;
      struct stat st;
      if (fstatat(dirfd(listing), entry->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 ||
          !S_ISREG(st.st_mode)) {
        continue;
      }
      blobs.push_back(BlobInfo{sha256, static_cast<uint64_t>(st.st_size), ModifiedUnixMs(st)});
    }
    closedir(listing);
  }
  closedir(top);
  return blobs;
}

absl::StatusOr<uint64_t> BlobStore::FreeBytes() const {
  struct statvfs fs;
  if (statvfs(dir_.c_str(), &fs) != 0) return OsError(errno, "statvfs " + dir_);
  return static_cast<uint64_t>(fs.f_bavail) * fs.f_frsize;
}

absl::StatusOr<std::unique_ptr<BlobWriter>> BlobStore::NewWriter() {
  const std::string path = absl::StrCat(dir_, "/tmp/", getpid(), ".", temp_counter.fetch_add(1));
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return OsError(errno, "create " + path);
  return std::unique_ptr<BlobWriter>(new BlobWriter(this, path, fd));
}

BlobWriter::BlobWriter(BlobStore* store, std::string temp_path, int fd)
    : store_(store), temp_path_(std::move(temp_path)), fd_(fd), hasher_(new Hasher) {}

BlobWriter::~BlobWriter() { Discard(); }

void BlobWriter::Discard() {
  if (fd_ < 0) return;
  close(fd_);
  fd_ = -1;
  unlink(temp_path_.c_str());
}

absl::Status BlobWriter::Append(std::string_view bytes) {
  if (!error_.ok()) return error_;
  if (fd_ < 0) return error_ = absl::FailedPreconditionError("the blob writer is spent");
  absl::Status written = WriteAll(fd_, bytes, temp_path_);
  if (!written.ok()) {
    error_ = written;  // a full disk (ENOSPC, EDQUOT) is ResourceExhausted
    Discard();
    return error_;
  }
  hasher_->Update(bytes);
  size_ += bytes.size();
  return absl::OkStatus();
}

absl::StatusOr<std::string> BlobWriter::Commit(std::string_view expected_sha256) {
  if (!error_.ok()) return error_;
  if (fd_ < 0) return absl::FailedPreconditionError("the blob writer is spent");
  const std::string sha256 = hasher_->HexDigest();
  if (!expected_sha256.empty() && sha256 != expected_sha256) {
    Discard();
    error_ = absl::InvalidArgumentError("the bytes hash to " + sha256 + ", not " +
                                        std::string(expected_sha256));
    return error_;
  }
  if (store_->fsync_) {
    if (absl::Status synced = DataSync(fd_, temp_path_); !synced.ok()) {
      Discard();
      return error_ = synced;
    }
  }
  close(fd_);
  fd_ = -1;
  const std::string shard = absl::StrCat(store_->dir_, "/", sha256.substr(0, 2));
  const std::string path = store_->PathOf(sha256);
  absl::Status moved = MakeDirectory(shard);
  if (moved.ok()) {
    // A copy stored already (the same bytes) is replaced, so the blob is young: under the
    // collection lock, so that a collection never removes what was just stored.
    std::lock_guard<std::mutex> lock(store_->mutex_);
    // Young from now: the file's time is its last write's, and the sync since may have
    // taken longer than a collection's grace.
    if (utimensat(AT_FDCWD, temp_path_.c_str(), nullptr, 0) != 0) {
      moved = OsError(errno, "touch " + temp_path_);
    } else if (rename(temp_path_.c_str(), path.c_str()) != 0) {
      moved = OsError(errno, "rename " + temp_path_ + " to " + path);
    }
  }
  if (!moved.ok()) {
    unlink(temp_path_.c_str());
    return error_ = moved;
  }
  if (store_->fsync_) {
    // The rename, and the shard's own entry when it was just made, must survive a crash.
    if (absl::Status synced = SyncDirectory(shard); !synced.ok()) return error_ = synced;
    if (absl::Status synced = SyncDirectory(store_->dir_); !synced.ok()) return error_ = synced;
  }
  return sha256;
}

absl::Status BlobStore::CopyOut(std::string_view sha256, const std::string& path) const {
  absl::StatusOr<int> in = OpenForReading(sha256);
  if (!in.ok()) return in.status();
  const int out = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out < 0) {
    close(*in);
    return OsError(errno, "create " + path);
  }
  BlobWriter::Hasher hasher;
  absl::Status status;
  constexpr uint64_t kPieceBytes = 1 << 20;
  for (uint64_t offset = 0;;) {
    absl::StatusOr<std::string> piece = ReadAt(*in, offset, kPieceBytes, PathOf(sha256));
    if (!piece.ok()) {
      status = piece.status();
      break;
    }
    if (piece->empty()) break;
    hasher.Update(*piece);
    if (status = WriteAll(out, *piece, path); !status.ok()) break;
    offset += piece->size();
  }
  close(*in);
  if (close(out) != 0 && status.ok()) status = OsError(errno, "close " + path);
  if (status.ok()) {
    const std::string hashed = hasher.HexDigest();
    if (hashed != sha256) {
      status = absl::DataLossError(absl::StrCat("the stored blob ", std::string(sha256),
                                                " hashes to ", hashed, ": it is damaged"));
    }
  }
  if (!status.ok()) unlink(path.c_str());
  return status;
}

}  // namespace synod

#ifndef SYNOD_ADAPTERS_BLOB_STORE_H_
#define SYNOD_ADAPTERS_BLOB_STORE_H_

// A content-addressed store of immutable files (media blobs), named by the SHA-256 of their
// bytes: DIR/ab/cdef... holds the blob whose hash, in lower-case hex, is "abcdef...". A name
// is never taken from a client: only a hash this store computed, or one checked to be 64
// lower-case hex digits, becomes a path.
//
// A blob is written through a BlobWriter into DIR/tmp/, hashed as its bytes arrive, made
// durable (fdatasync) and renamed into place (and the directory synced), so a crash leaves a
// whole blob or none. Open() deletes what an earlier process left in tmp/.
//
// Deletion: Remove() unlinks. A read under way on an open descriptor goes on to the end
// (POSIX keeps an unlinked file's blocks until its last descriptor closes).
//
// Collection: RemoveIfUnused() removes a blob only if it is old and not pinned, and it does
// so under the same lock as Pin(), Keep() and the rename that stores a blob, so that a blob
// about to be referenced (pinned, or made young) is never removed in between. Under the
// lock the blob is only renamed into DIR/trash/; it is unlinked after (that takes a while
// for a large file, and the event loop takes this lock). Open() empties DIR/trash/ too.
//
// Thread-safety: BlobStore's methods may run on several threads at once (the file system
// orders them); each BlobWriter is used by one thread at a time. Nothing here runs on an
// event loop by itself: the host calls the slow ones (writes, syncs, listing) on workers.

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace synod {

// Whether `text` is 64 lower-case hex digits (a SHA-256 as this store names blobs).
bool IsSha256Hex(std::string_view text);

// The SHA-256 of `bytes`, as this store names blobs.
std::string Sha256Hex(std::string_view bytes);

struct BlobInfo {
  std::string sha256;
  uint64_t size_bytes = 0;
  int64_t modified_unix_ms = 0;  // the last write or Touch
};

class BlobWriter;

class BlobStore {
 public:
  // Creates DIR and DIR/tmp when absent and empties DIR/tmp. `fsync` false skips the
  // syncs (tests, and --fsync=false).
  static absl::StatusOr<std::unique_ptr<BlobStore>> Open(std::string dir, bool fsync);
  BlobStore(const BlobStore&) = delete;
  BlobStore& operator=(const BlobStore&) = delete;

  const std::string& dir() const { return dir_; }

  // The blob's path. REQUIRES: IsSha256Hex(sha256).
  std::string PathOf(std::string_view sha256) const;

  // The stored blob's size and age; nullopt when it is not stored.
  std::optional<BlobInfo> Stat(std::string_view sha256) const;

  // Opens the blob for reading (O_RDONLY | O_CLOEXEC): NotFound when it is not stored.
  absl::StatusOr<int> OpenForReading(std::string_view sha256) const;

  // Sets the blob's modification time to now: a blob just written or about to be referenced
  // is young, and garbage collection spares young blobs. NotFound when it is not stored.
  absl::Status Touch(std::string_view sha256) const;

  // Unlinks the blob (nothing to do when it is not stored).
  absl::Status Remove(std::string_view sha256) const;

  // Pins the blob: RemoveIfUnused leaves it alone until as many Unpin calls; and makes it
  // young. Returns whether it is stored.
  bool Pin(std::string_view sha256);
  // REQUIRES: pinned.
  void Unpin(std::string_view sha256);
  // Makes the blob young, under the collection lock. Returns whether it is stored. With
  // `durable`, its directory entry is synced too (another writer of the same bytes may have
  // just renamed it in): a peer answers that it holds a blob only once that is durable.
  bool Keep(std::string_view sha256, bool durable = false);
  // Removes the blob if it is stored, not pinned, and was last modified before
  // `cutoff_unix_ms`. Returns whether it removed it.
  bool RemoveIfUnused(std::string_view sha256, int64_t cutoff_unix_ms);

  // Every stored blob, in no particular order. Files that are not blobs (bad names) are
  // skipped.
  absl::StatusOr<std::vector<BlobInfo>> List() const;

  // Bytes free on the store's file system for an unprivileged writer.
  absl::StatusOr<uint64_t> FreeBytes() const;

  // A writer of a new blob into DIR/tmp/.
  absl::StatusOr<std::unique_ptr<BlobWriter>> NewWriter();

  // Copies the stored blob into a new file at `path` (not synced: a private copy), checking
  // that its bytes still hash to `sha256`. NotFound when it is not stored, DataLoss when its
  // bytes are damaged (the caller removes it and fetches it again), ResourceExhausted when
  // the disk is full. On an error nothing is left at `path`.
  absl::Status CopyOut(std::string_view sha256, const std::string& path) const;

 private:
  friend class BlobWriter;
  BlobStore(std::string dir, bool fsync) : dir_(std::move(dir)), fsync_(fsync) {}

  const std::string dir_;
  const bool fsync_;
  std::mutex mutex_;  // the collection lock (see above)
  std::map<std::string, int, std::less<>> pins_;
  uint64_t trash_counter_ = 0;
};

// Writes one new blob. Destroying a writer that was not committed deletes its temporary
// file.
class BlobWriter {
 public:
  ~BlobWriter();
  BlobWriter(const BlobWriter&) = delete;
  BlobWriter& operator=(const BlobWriter&) = delete;

  // Appends `bytes`, hashing them. ResourceExhausted when the disk is full, the OS error
  // otherwise; after an error the writer only fails.
  absl::Status Append(std::string_view bytes);

  uint64_t size() const { return size_; }

  // Finishes the blob: its hash must be `expected_sha256` when that is not empty
  // (InvalidArgument otherwise, and nothing is stored). The file is synced and renamed into
  // place (replacing a stored copy of the same bytes, so the blob is young again).
  // Returns the hash. The writer is spent either way.
  absl::StatusOr<std::string> Commit(std::string_view expected_sha256 = "");

 private:
  friend class BlobStore;
  friend std::string Sha256Hex(std::string_view bytes);
  struct Hasher;
  BlobWriter(BlobStore* store, std::string temp_path, int fd);
  void Discard();

  BlobStore* const store_;
  const std::string temp_path_;
  int fd_;
  uint64_t size_ = 0;
  absl::Status error_;
  std::unique_ptr<Hasher> hasher_;
};

}  // namespace synod

#endif  // SYNOD_ADAPTERS_BLOB_STORE_H_

#ifndef SYNOD_ADAPTERS_SNAPSHOT_FILES_H_
#define SYNOD_ADAPTERS_SNAPSHOT_FILES_H_

// The server's snapshot store (core/driver.h SnapshotStore): one file per image in the
// data directory's snapshots/, named by the snapshot's index and checksum,
//
//   snapshots/00000000000000012345-0123456789abcdef.snap
//
// plus incoming.part, the image a peer is sending. An image file is written whole, synced
// and renamed into place (with its directory synced) before the log names it, so a crash
// leaves either no file or a whole one; files no log record names are removed (Retain, and
// at Open the temporary ones). Chunks are read and written with pread/pwrite: memory stays
// at one chunk, whatever the image's size.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "adapters/trash.h"
#include "core/driver.h"
#include "core/replica.h"

namespace synod {

class SnapshotFiles : public SnapshotStore {
 public:
  // Opens (creating) the directory `dir` and removes what a crash left half written.
  // `fsync` false: nothing is synced (tests, benchmarks; as the log's --fsync=false).
  static absl::StatusOr<std::unique_ptr<SnapshotFiles>> Open(std::string dir, bool fsync);
  ~SnapshotFiles() override;
  SnapshotFiles(const SnapshotFiles&) = delete;
  SnapshotFiles& operator=(const SnapshotFiles&) = delete;

  absl::StatusOr<std::string> ReadChunk(const SnapshotMeta& meta, uint64_t offset,
                                        uint64_t max_bytes) override;

  void Receive(const SnapshotMeta& meta, uint64_t offset, std::string_view data) override;
  absl::Status Seal(const SnapshotMeta& meta) override;
  void Retain(const SnapshotMeta& meta) override;

  // Keeps `image`, the host's own snapshot at `index`, durably; returns its metadata.
  absl::StatusOr<SnapshotMeta> Write(uint64_t index, std::string_view image);
  // Keeps `image` under `meta` as given (the image a log of an older version held).
  absl::Status Adopt(const SnapshotMeta& meta, std::string_view image);
  // Whether the image file `meta` names is whole: its size and checksum (read in pieces).
  absl::Status Verify(const SnapshotMeta& meta);
  // The whole image, checked against its checksum.
  absl::StatusOr<std::string> ReadImage(const SnapshotMeta& meta);

  // The host's own snapshot, written in pieces (adapters/snapshot_image.h): to
  // OwnTempPath(), synced, then Publish()ed under its metadata (a rename, and the directory
  // synced); or Discard()ed.
  std::string OwnTempPath() const;
  absl::Status Publish(const SnapshotMeta& meta);
  void Discard();
  // A directory (`name`: one per use) for the databases of an image being unpacked or
  // built, emptied of what an earlier use (or a crash) left in it.
  absl::StatusOr<std::string> EmptyStageDir(std::string_view name);
  // Removes that directory and what it holds (in the background).
  void RemoveStageDir(std::string_view name);
  std::string PathOf(const SnapshotMeta& meta) const;

 private:
  SnapshotFiles(std::string dir, bool fsync, std::unique_ptr<Trash> trash);
  // Moves `path` (a file or a directory) into trash/ at once and deletes it in the
  // background (adapters/trash.h).
  void RemoveInBackground(const std::string& path);
  // Writes `image` to a temporary file, syncs it and renames it to `meta`'s name.
  absl::Status Keep(const SnapshotMeta& meta, std::string_view image);
  // Syncs the file at `path` (open as `fd`), checks it holds the image `meta` names, and
  // renames it to `meta`'s name.
  absl::Status Install(int fd, const std::string& path, const SnapshotMeta& meta);
  void CloseReader();
  void CloseIncoming();

  const std::string dir_;
  const bool fsync_;
  // The image last read from, kept open between chunks.
  std::optional<std::pair<uint64_t, uint64_t>> reader_key_;  // (index, checksum)
  int reader_fd_ = -1;
  // The image being received, and how far.
  std::optional<SnapshotMeta> incoming_meta_;
  int incoming_fd_ = -1;
  uint64_t incoming_bytes_ = 0;
  std::optional<SnapshotChecksummer> incoming_checksum_;  // of the bytes written so far
  absl::Status incoming_error_;  // a chunk that could not be written: Seal fails
  std::unique_ptr<Trash> trash_;
};

}  // namespace synod

#endif  // SYNOD_ADAPTERS_SNAPSHOT_FILES_H_

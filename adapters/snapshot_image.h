#ifndef SYNOD_ADAPTERS_SNAPSHOT_IMAGE_H_
#define SYNOD_ADAPTERS_SNAPSHOT_IMAGE_H_

// Snapshot images (core/snapshot_format.h) as files, written and read in pieces: memory
// stays bounded by one block and SQLite's page caches, whatever the databases' size.

#include <atomic>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "core/state_machine.h"
#include "core/synod.pb.h"

namespace synod {

// Copies the main database of `from` into a new plain database file at `path` (replacing
// it) with SQLite's backup API, inside `from`'s open read transaction, 256 pages per step.
// Stops early (Cancelled) once `*cancel` is set. For a worker thread. Not synced.
absl::Status CopyDatabaseToFile(sqlite3* from, const std::string& path,
                                const std::atomic<bool>* cancel = nullptr);

// Writes the image of `view` (StateMachine::OpenSnapshotView) to `path`, replacing it: each
// database is copied with SQLite's backup API, inside the view's read transaction, into the
// plain database file `stage_path`, whose bytes are then appended to the image; the
// database's reader is then closed (its read transaction no longer holds back its WAL).
// Syncs the image when `fsync`. Returns its metadata (index: the view's revision). For a
// worker thread: it touches only the view's connections and these files. Stops early
// (Cancelled) once `*cancel` is set.
absl::StatusOr<SnapshotMeta> WriteSnapshotImage(SnapshotView& view, const std::string& stage_path,
                                                const std::string& path, bool fsync,
                                                const std::atomic<bool>* cancel = nullptr);

// Unpacks the image at `path` into one database file per database in `stage_dir` (which
// must exist and hold none of them), checking as it goes: the framing, every database
// (CheckImageHeader, then CheckImageContent once written) and the trailer; then that the
// databases form a state at `revision` (StateMachine::CheckSnapshotImages). The databases
// are returned open, read-only, ready for StateMachine::RestoreSnapshotImages.
// InvalidArgument for a damaged image; the OS error when a file cannot be read or written.
// Stops early (Cancelled) once `*cancel` is set.
absl::StatusOr<SnapshotImages> StageSnapshotImage(const std::string& path,
                                                  const std::string& stage_dir, uint64_t revision,
                                                  const std::atomic<bool>* cancel = nullptr);

}  // namespace synod

#endif  // SYNOD_ADAPTERS_SNAPSHOT_IMAGE_H_

#ifndef SYNOD_ADAPTERS_FILE_UTIL_H_
#define SYNOD_ADAPTERS_FILE_UTIL_H_

// Small POSIX file helpers shared by the adapters that own files (the log, the database
// files, the snapshot images). Errors carry the OS error and the path.

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace synod {

absl::Status OsError(int error_number, const std::string& what);

// open(2) with O_CLOEXEC and mode 0644.
absl::StatusOr<int> OpenFile(const std::string& path, int flags);
absl::Status WriteAll(int fd, std::string_view bytes, const std::string& path);
// pwrite(2) of all of `bytes` at `offset`.
absl::Status WriteAllAt(int fd, std::string_view bytes, uint64_t offset, const std::string& path);
// The whole file (what is there, if it shrinks meanwhile).
absl::StatusOr<std::string> ReadAll(int fd, const std::string& path);
// Up to `max_bytes` from `offset` (fewer only at the end of the file).
absl::StatusOr<std::string> ReadAt(int fd, uint64_t offset, uint64_t max_bytes,
                                   const std::string& path);
absl::Status DataSync(int fd, const std::string& path);
// Makes the directory's entries (files created, renamed or removed in it) durable.
absl::Status SyncDirectory(const std::string& dir);

}  // namespace synod

#endif  // SYNOD_ADAPTERS_FILE_UTIL_H_

#include "adapters/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"

namespace synod {

absl::Status OsError(int error_number, const std::string& what) {
  return absl::ErrnoToStatus(error_number, what);
}

absl::Status WriteAll(int fd, std::string_view bytes, const std::string& path) {
  while (!bytes.empty()) {
    ssize_t written = write(fd, bytes.data(), bytes.size());
    if (written < 0) {
      if (errno == EINTR) continue;
      return OsError(errno, absl::StrCat("cannot write ", path));
    }
    bytes.remove_prefix(static_cast<size_t>(written));
  }
  return absl::OkStatus();
}

absl::Status WriteAllAt(int fd, std::string_view bytes, uint64_t offset, const std::string& path) {
  while (!bytes.empty()) {
    ssize_t written = pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(offset));
    if (written < 0) {
      if (errno == EINTR) continue;
      return OsError(errno, absl::StrCat("cannot write ", path));
    }
    bytes.remove_prefix(static_cast<size_t>(written));
    offset += static_cast<uint64_t>(written);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadAt(int fd, uint64_t offset, uint64_t max_bytes,
                                   const std::string& path) {
  std::string bytes(static_cast<size_t>(max_bytes), '\0');
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t got =
        pread(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(offset + done));
    if (got < 0) {
      if (errno == EINTR) continue;
      return OsError(errno, absl::StrCat("cannot read ", path));
    }
    if (got == 0) break;  // the end of the file
    done += static_cast<size_t>(got);
  }
  bytes.resize(done);
  return bytes;
}

absl::StatusOr<std::string> ReadAll(int fd, const std::string& path) {
  struct stat st;
  if (fstat(fd, &st) != 0) return OsError(errno, absl::StrCat("cannot stat ", path));
  std::string bytes(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t got = pread(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (got < 0) {
      if (errno == EINTR) continue;
      return OsError(errno, absl::StrCat("cannot read ", path));
    }
    if (got == 0) break;  // the file shrank under us; recover what is there
    done += static_cast<size_t>(got);
  }
  bytes.resize(done);
  return bytes;
}

absl::Status DataSync(int fd, const std::string& path) {
  if (fdatasync(fd) != 0) return OsError(errno, absl::StrCat("cannot fdatasync ", path));
  return absl::OkStatus();
}

absl::Status SyncDirectory(const std::string& dir) {
  int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return OsError(errno, absl::StrCat("cannot open directory ", dir));
  absl::Status status;
  if (fsync(fd) != 0) status = OsError(errno, absl::StrCat("cannot fsync directory ", dir));
  close(fd);
  return status;
}

absl::StatusOr<int> OpenFile(const std::string& path, int flags) {
  int fd = open(path.c_str(), flags | O_CLOEXEC, 0644);
  if (fd < 0) return OsError(errno, absl::StrCat("cannot open ", path));
  return fd;
}

}  // namespace synod

// Measures what one durable log append costs on the filesystem it runs on, four ways:
// fsync or fdatasync, after appending to a growing file or after overwriting a file whose
// blocks were preallocated (fallocate) and written once. Prints the median and p99 per way.
//
//   bazel run -c opt //tools/fsync:fsync_bench -- [--dir DIR] [--appends N] [--bytes B]
//
// DIR must be on the disk under test (default: the current directory).

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Way {
  const char* name;
  bool preallocate;
  bool datasync;
};

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(p * static_cast<double>(v.size() - 1));
  return v[i];
}

int Fail(const char* what) {
  std::perror(what);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = ".";
  int appends = 500;
  size_t bytes = 300;  // about one small batch of entries
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--dir") {
      dir = argv[i + 1];
    } else if (flag == "--appends") {
      appends = std::atoi(argv[i + 1]);
    } else if (flag == "--bytes") {
      bytes = static_cast<size_t>(std::atoll(argv[i + 1]));
    } else {
      std::fprintf(stderr, "usage: fsync_bench [--dir DIR] [--appends N] [--bytes B]\n");
      return 2;
    }
  }
  if (appends < 2 || bytes == 0) return 2;
  const Way ways[] = {{"append + fsync", false, false},
                      {"append + fdatasync", false, true},
                      {"preallocated + fsync", true, false},
                      {"preallocated + fdatasync", true, true}};
  const std::string data(bytes, 'x');
  std::printf("%d appends of %zu bytes in %s\n", appends, bytes, dir.c_str());
  std::printf("%-26s %10s %10s\n", "way", "p50 ms", "p99 ms");
  for (const Way& way : ways) {
    std::string path = dir + "/fsync_bench.tmp";
    unlink(path.c_str());
    int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return Fail("open");
    const off_t total = static_cast<off_t>(bytes) * appends;
    if (way.preallocate) {
      // Allocated and written once, so that later overwrites change no metadata.
      if (posix_fallocate(fd, 0, total) != 0) return Fail("posix_fallocate");
      std::string zeros(static_cast<size_t>(total), '\0');
      if (pwrite(fd, zeros.data(), zeros.size(), 0) != static_cast<ssize_t>(zeros.size())) {
        return Fail("pwrite");
      }
      if (fsync(fd) != 0) return Fail("fsync");
    }
    std::vector<double> ms;
    for (int i = 0; i < appends; ++i) {
      auto start = std::chrono::steady_clock::now();
      off_t at = static_cast<off_t>(bytes) * i;
      if (pwrite(fd, data.data(), bytes, at) != static_cast<ssize_t>(bytes)) return Fail("pwrite");
      if ((way.datasync ? fdatasync(fd) : fsync(fd)) != 0) return Fail("sync");
      ms.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count());
    }
    close(fd);
    unlink(path.c_str());
    std::printf("%-26s %10.3f %10.3f\n", way.name, Percentile(ms, 0.5), Percentile(ms, 0.99));
  }
  return 0;
}

#ifndef SYNOD_ADAPTERS_TRASH_H_
#define SYNOD_ADAPTERS_TRASH_H_

// A directory of files being deleted. Deleting a large file takes ext4 a while (a tenth of a
// second or more for hundreds of megabytes), which an event loop must not wait for: Remove()
// moves the file into the trash at once, with a rename, and a thread of the trash's own
// deletes it. What a crash leaves in the trash is deleted when it is opened again.

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"

namespace synod {

class Trash {
 public:
  // Empties `dir` of what an earlier process left (at once) and creates it. It must be on
  // the same file system as the files removed through it.
  static absl::StatusOr<std::unique_ptr<Trash>> Open(std::string dir);
  // Stops the thread; what is still in the trash goes at the next Open.
  ~Trash();
  Trash(const Trash&) = delete;
  Trash& operator=(const Trash&) = delete;

  // Moves `path` (a file or a directory) into the trash and deletes it in the background.
  // Nothing to do if it is absent; deleted here if it cannot be moved (the error when that
  // fails too: `path` is still there). For one thread at a time.
  absl::Status Remove(const std::string& path);

 private:
  explicit Trash(std::string dir);
  void Run();

  const std::string dir_;
  uint64_t moved_ = 0;  // names given in the trash
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> queue_;  // guarded by mu_
  bool stopping_ = false;           // guarded by mu_
  std::thread thread_;
};

}  // namespace synod

#endif  // SYNOD_ADAPTERS_TRASH_H_

#include "adapters/trash.h"

#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"

namespace synod {

absl::StatusOr<std::unique_ptr<Trash>> Trash::Open(std::string dir) {
  std::error_code error;
  std::filesystem::remove_all(dir, error);
  if (!error) std::filesystem::create_directories(dir, error);
  if (error) {
    return absl::Status(absl::ErrnoToStatusCode(error.value()),
                        absl::StrCat("cannot empty ", dir, ": ", error.message()));
  }
  return std::unique_ptr<Trash>(new Trash(std::move(dir)));
}

Trash::Trash(std::string dir) : dir_(std::move(dir)), thread_([this] { Run(); }) {}

Trash::~Trash() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

absl::Status Trash::Remove(const std::string& path) {
  const std::string moved = absl::StrCat(dir_, "/", ++moved_);
  if (std::rename(path.c_str(), moved.c_str()) != 0) {
    // Not moved (absent, or on another file system): deleted here.
    std::error_code error;
    std::filesystem::remove_all(path, error);
    if (error) {
      return absl::Status(absl::ErrnoToStatusCode(error.value()),
                          absl::StrCat("cannot remove ", path, ": ", error.message()));
    }
    return absl::OkStatus();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(moved);
  }
  cv_.notify_one();
  return absl::OkStatus();
}

void Trash::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    if (stopping_) return;  // what is left goes at the next Open
    std::string path = std::move(queue_.back());
    queue_.pop_back();
    lock.unlock();
    std::error_code error;
    std::filesystem::remove_all(path, error);
    lock.lock();
  }
}

}  // namespace synod

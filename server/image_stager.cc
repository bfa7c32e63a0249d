#include "server/image_stager.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "adapters/file_util.h"
#include "core/check.h"
#include "core/sqlite_util.h"

namespace synod::server {

namespace {

// Whether SQLite's error `code` is this machine's (a disk, memory, descriptors, a lock),
// not the image's: such a failure is tried again later, never taken as the verdict.
bool IsMachineError(int code) {
  switch (code & 0xff) {
    case SQLITE_IOERR:
    case SQLITE_FULL:
    case SQLITE_NOMEM:
    case SQLITE_CANTOPEN:
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_INTERRUPT:
    case SQLITE_PERM:
    case SQLITE_READONLY:
    case SQLITE_PROTOCOL:
    case SQLITE_ABORT:
      return true;
    default:
      return false;
  }
}

}  // namespace

// The pool's part of staging (see the header).

absl::Status CheckStagedFile(const std::string& path, bool* verdict) {
  *verdict = false;
  auto machine = [&](const absl::Status& status) {
    return absl::UnavailableError(absl::StrCat("staging ", path, ": ", status.ToString()));
  };
  const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return machine(absl::ErrnoToStatus(errno, "open"));
  absl::StatusOr<std::string> header = ReadAt(fd, 0, kImageHeaderBytes, path);
  if (!header.ok()) {
    close(fd);
    return machine(header.status());
  }
  if (absl::Status valid = CheckImageHeader(*header); !valid.ok()) {
    close(fd);
    *verdict = true;
    return valid;
  }
  NormalizeImageHeader(header->data());
  absl::Status written = WriteAllAt(fd, *header, 0, path);
  close(fd);
  if (!written.ok()) return machine(written);
  sqlite3* raw = nullptr;
  const int rc =
      sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, nullptr);
  Db db(raw);
  if (rc != SQLITE_OK) {
    if (IsMachineError(rc)) return machine(absl::InternalError(sqlite3_errstr(rc)));
    *verdict = true;
    return absl::InvalidArgumentError(
        absl::StrCat("not a valid SQLite database: ", sqlite3_errstr(rc)));
  }
  if (absl::Status checked = CheckAndPrepareImage(db.get()); !checked.ok()) {
    if (IsMachineError(sqlite3_extended_errcode(db.get()))) return machine(checked);
    *verdict = true;
    return checked;
  }
  db.reset();
  // Written back now, off the loop: the database's first sync (a checkpoint, on the loop)
  // would otherwise flush the whole copy.
  const int sync_fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (sync_fd < 0) return machine(absl::ErrnoToStatus(errno, "open"));
  absl::Status synced = DataSync(sync_fd, path);
  close(sync_fd);
  if (!synced.ok()) return machine(synced);
  *verdict = true;
  return absl::OkStatus();
}

namespace {

// Removes a staged file and what SQLite may have left beside it.
void RemoveStagedFile(const std::string& path) {
  unlink(path.c_str());
  unlink((path + "-journal").c_str());
}

}  // namespace

struct ImageStager::Job {
  uv_work_t request;
  ImageStager* stager = nullptr;
  BlobStore* store = nullptr;
  std::string sha256;
  std::string path;
  absl::Status status;   // the machine's error, if any
  bool verdict = false;  // status is the image's verdict (OK or InvalidArgument)
  JobDone done;
  uint64_t generation = 0;  // the stager's when it started
};

ImageStager::ImageStager(uv_loop_t* loop, std::string dir, std::function<MediaService*()> media)
    : loop_(loop), dir_(std::move(dir)), media_(std::move(media)) {}

ImageStager::~ImageStager() = default;

absl::Status ImageStager::Start() {
  std::error_code error;
  std::filesystem::remove_all(dir_, error);
  if (error) return absl::InternalError(absl::StrCat("cannot empty ", dir_, ": ", error.message()));
  std::filesystem::create_directories(dir_, error);
  if (error)
    return absl::InternalError(absl::StrCat("cannot create ", dir_, ": ", error.message()));
  return absl::OkStatus();
}

void ImageStager::Stop() {
  if (stopped_) return;
  stopped_ = true;
  if (timer_initialized_) {
    uv_timer_stop(&retry_timer_);
    uv_close(reinterpret_cast<uv_handle_t*>(&retry_timer_), nullptr);
  }
}

bool ImageStager::Ready(const Value& value) {
  std::map<std::string, std::pair<size_t, uint64_t>> needed;  // count and size, by sha256
  for (const ClientRequest& request : value.requests()) {
    if (!request.command().has_create_database()) continue;
    const synod::CreateDatabase& create = request.command().create_database();
    if (create.image_sha256().empty()) continue;
    auto& [count, size] = needed[create.image_sha256()];
    ++count;
    size = create.image_size_bytes();
  }
  for (const auto& [sha256, need] : needed) {
    auto it = staged_.find(sha256);
    if (it != staged_.end() && it->second.size() >= need.first) continue;
    if (!staging_ && !retry_pending_ && !stopped_ && !prestaging_.contains(sha256)) {
      Stage(sha256, need.second);
    }
    return false;
  }
  // The entry is applied next: what it does not take (a retried request answered from its
  // session, an entry half applied before a crash) is dropped after it (Applied).
  needed_.clear();
  for (const auto& [sha256, need] : needed) needed_[sha256] = need.first;
  return true;
}

void ImageStager::Stage(const std::string& sha256, uint64_t size_bytes) {
  MediaService* media = media_();
  SYNOD_CHECK(media != nullptr);
  staging_ = true;
  media->EnsureBlob(sha256, size_bytes, [this, sha256](absl::Status fetched) {
    if (stopped_) return;
    if (!fetched.ok()) return OnStaged(sha256, fetched, "", /*verdict=*/false);
    CopyAndCheck(sha256, [this, sha256](absl::Status status, std::string path, bool verdict) {
      OnStaged(sha256, std::move(status), std::move(path), verdict);
    });
  });
}

void ImageStager::Check(const std::string& sha256, std::function<void(absl::Status)> done) {
  if (stopped_) return done(absl::UnavailableError("the server is stopping"));
  CopyAndCheck(sha256, [this, sha256, done = std::move(done)](absl::Status status, std::string path,
                                                              bool verdict) {
    if (verdict && status.ok()) {
      ++counters_.staged;
      staged_[sha256].push_back(std::move(path));  // this replica's apply takes it
    }
    done(status);
  });
}

void ImageStager::Prestage(const std::string& sha256) {
  if (stopped_ || prestaging_.contains(sha256) || staged_.contains(sha256)) return;
  prestaging_.insert(sha256);
  const uint64_t generation = generation_;
  CopyAndCheck(sha256,
               [this, sha256, generation](absl::Status status, std::string path, bool verdict) {
                 prestaging_.erase(sha256);
                 if (!(verdict && status.ok())) return;  // nothing kept: staged again if it commits
                 if (generation != generation_) return RemoveOnPool(std::move(path));
                 ++counters_.prestaged;
                 prestaged_ms_[path] = static_cast<int64_t>(uv_now(loop_));
                 staged_[sha256].push_back(std::move(path));
               });
}

void ImageStager::Expire(int64_t now_ms) {
  if (now_ms - last_expire_ms_ < 10'000 || prestaged_ms_.empty()) return;
  last_expire_ms_ = now_ms;
  for (auto it = prestaged_ms_.begin(); it != prestaged_ms_.end();) {
    if (now_ms - it->second < kPrestagedTtlMs) {
      ++it;
      continue;
    }
    for (auto& [sha256, images] : staged_) {
      for (auto image = images.begin(); image != images.end(); ++image) {
        if (image->ok() && **image == it->first) {
          RemoveOnPool(**image);
          images.erase(image);
          break;
        }
      }
    }
    std::erase_if(staged_, [](const auto& entry) { return entry.second.empty(); });
    it = prestaged_ms_.erase(it);
  }
}

void ImageStager::Drop(const std::string& sha256) {
  auto it = staged_.find(sha256);
  if (it == staged_.end()) return;
  for (auto image = it->second.begin(); image != it->second.end(); ++image) {
    if (!image->ok()) continue;
    prestaged_ms_.erase(**image);
    RemoveOnPool(**image);
    it->second.erase(image);
    break;
  }
  if (it->second.empty()) staged_.erase(it);
}

void ImageStager::CopyAndCheck(const std::string& sha256, JobDone done) {
  MediaService* media = media_();
  SYNOD_CHECK(media != nullptr);
  auto* job = new Job();
  job->request.data = job;
  job->stager = this;
  job->store = media->store();
  job->sha256 = sha256;
  job->path = absl::StrCat(dir_, "/", ++files_, "-", sha256.substr(0, 16), ".db");
  job->done = std::move(done);
  job->generation = generation_;
  SYNOD_CHECK_EQ(uv_queue_work(
                     loop_, &job->request,
                     [](uv_work_t* request) {
                       auto* j = static_cast<Job*>(request->data);
                       j->status = j->store->CopyOut(j->sha256, j->path);
                       if (absl::IsDataLoss(j->status)) {
                         // Damaged here: removed, and fetched again at the next try.
                         (void)j->store->Remove(j->sha256);
                         return;
                       }
                       if (!j->status.ok()) return;
                       j->status = CheckStagedFile(j->path, &j->verdict);
                       if (!j->status.ok()) RemoveStagedFile(j->path);
                     },
                     [](uv_work_t* request, int) {
                       std::unique_ptr<Job> j(static_cast<Job*>(request->data));
                       if (j->stager->stopped_ || j->generation != j->stager->generation_) {
                         // Stopped, or cleared meanwhile: its copy is not wanted.
                         if (j->status.ok()) RemoveStagedFile(j->path);
                         return;
                       }
                       j->done(j->status, j->path, j->verdict);
                     }),
                 0);
}

void ImageStager::OnStaged(const std::string& sha256, absl::Status status, std::string path,
                           bool verdict) {
  staging_ = false;
  if (verdict) {
    retry_delay_ms_ = 0;
    if (status.ok()) {
      ++counters_.staged;
      staged_[sha256].push_back(std::move(path));
    } else {
      ++counters_.invalid;
      staged_[sha256].push_back(std::move(status));
    }
    return;  // the loop wakes (this is a callback) and the node applies on
  }
  ++counters_.retries;
  retry_delay_ms_ =
      retry_delay_ms_ == 0 ? kFirstRetryMs : std::min(2 * retry_delay_ms_, kMaxRetryMs);
  fprintf(stderr,
          "W cannot stage database image %s yet (%s): applying waits; next try in %llu ms\n",
          sha256.c_str(), std::string(status.message()).c_str(),
          static_cast<unsigned long long>(retry_delay_ms_));
  retry_pending_ = true;
  if (!timer_initialized_) {
    // Made at the first retry only: a node that fails to start leaves no handle behind.
    uv_timer_init(loop_, &retry_timer_);
    retry_timer_.data = this;
    timer_initialized_ = true;
  }
  uv_timer_start(
      &retry_timer_,
      [](uv_timer_t* timer) { static_cast<ImageStager*>(timer->data)->retry_pending_ = false; },
      retry_delay_ms_, 0);
}

void ImageStager::Clear() {
  ++generation_;
  needed_.clear();
  prestaged_ms_.clear();
  for (auto& [sha256, images] : staged_) {
    for (absl::StatusOr<std::string>& image : images) {
      if (image.ok()) RemoveOnPool(*std::move(image));
    }
  }
  staged_.clear();
}

void ImageStager::Applied() {
  // A file moved into place is gone from here; one copied (or refused) is removed.
  for (std::string& path : taken_) RemoveOnPool(std::move(path));
  taken_.clear();
  for (const auto& [sha256, left] : needed_) {
    auto it = staged_.find(sha256);
    for (size_t i = 0; i < left && it != staged_.end() && !it->second.empty(); ++i) {
      if (it->second.front().ok()) {
        prestaged_ms_.erase(*it->second.front());
        RemoveOnPool(*std::move(it->second.front()));
      }
      it->second.pop_front();
    }
    if (it != staged_.end() && it->second.empty()) staged_.erase(it);
  }
  needed_.clear();
}

void ImageStager::RemoveOnPool(std::string path) {
  struct Removal {
    uv_work_t request;
    std::string path;
  };
  auto* removal = new Removal{{}, std::move(path)};
  removal->request.data = removal;
  SYNOD_CHECK_EQ(
      uv_queue_work(
          loop_, &removal->request,
          [](uv_work_t* request) { RemoveStagedFile(static_cast<Removal*>(request->data)->path); },
          [](uv_work_t* request, int) { delete static_cast<Removal*>(request->data); }),
      0);
}

absl::StatusOr<std::string> ImageStager::Take(const std::string& sha256) {
  auto it = staged_.find(sha256);
  if (it == staged_.end() || it->second.empty()) {
    return absl::NotFoundError(absl::StrCat("database image ", sha256, " is not staged"));
  }
  absl::StatusOr<std::string> image = std::move(it->second.front());
  it->second.pop_front();
  if (it->second.empty()) staged_.erase(it);
  if (image.ok()) {
    prestaged_ms_.erase(*image);
    taken_.push_back(*image);
  }
  if (auto need = needed_.find(sha256); need != needed_.end() && --need->second == 0) {
    needed_.erase(need);
  }
  return image;
}

void ImageStager::AppendMetrics(MetricsText* out) const {
  out->Counter("synod_database_images_staged_total",
               "Database images by reference staged (fetched if needed, copied, checked) before "
               "their entry was applied",
               counters_.staged);
  out->Counter("synod_database_images_prestaged_total",
               "Database images checked and staged as soon as their push was stored here, "
               "before their entry was proposed",
               counters_.prestaged);
  out->Counter("synod_database_images_invalid_total",
               "Database images by reference that failed their checks (the entry's result)",
               counters_.invalid);
  out->Counter("synod_database_image_staging_retries_total",
               "Stagings that failed for a reason other than the image (no peer held it yet, "
               "disk) and were tried again later",
               counters_.retries);
}

}  // namespace synod::server

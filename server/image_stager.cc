#include "server/image_stager.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
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
  Work work;
  std::string path;
  absl::Status status;
  bool verdict = false;     // the status is the image's (OK or InvalidArgument)
  uint64_t generation = 0;  // the stager's when it started
};

ImageStager::ImageStager(uv_loop_t* loop, std::string dir, std::function<MediaService*()> media,
                         uint64_t max_bytes)
    : loop_(loop), dir_(std::move(dir)), media_(std::move(media)), max_bytes_(max_bytes) {}

ImageStager::~ImageStager() = default;

absl::Status ImageStager::Start() {
  std::error_code error;
  std::filesystem::remove_all(dir_, error);
  if (error) return absl::InternalError(absl::StrCat("cannot empty ", dir_, ": ", error.message()));
  std::filesystem::create_directories(dir_, error);
  if (error) {
    return absl::InternalError(absl::StrCat("cannot create ", dir_, ": ", error.message()));
  }
  return absl::OkStatus();
}

void ImageStager::Stop() {
  if (stopped_) return;
  stopped_ = true;
  queue_.clear();
  if (timer_initialized_) {
    uv_timer_stop(&retry_timer_);
    uv_close(reinterpret_cast<uv_handle_t*>(&retry_timer_), nullptr);
  }
}

bool ImageStager::Wanted(const std::string& sha256) const {
  for (const std::optional<Work>* running : {&running_stage_, &running_other_}) {
    if (running->has_value() && (*running)->sha256 == sha256 && (*running)->kind != Kind::kCheck) {
      return true;
    }
  }
  for (const Work& work : queue_) {
    if (work.sha256 == sha256 && work.kind != Kind::kCheck) return true;
  }
  return false;
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
    // A prestage still queued becomes this entry's stage, at the front; one running
    // counts: it brings a copy (or fails, and this asks again).
    std::erase_if(queue_, [&](const Work& work) {
      return work.kind == Kind::kPrestage && work.sha256 == sha256;
    });
    if (!retry_pending_ && !stopped_ && !Wanted(sha256)) {
      Enqueue({.kind = Kind::kStage, .sha256 = sha256, .size_bytes = need.second, .done = {}});
    }
    return false;
  }
  // The entry is applied next: what it does not take is dropped after it (Applied).
  needed_.clear();
  for (const auto& [sha256, need] : needed) needed_[sha256] = need.first;
  return true;
}

void ImageStager::Check(const std::string& sha256, std::function<void(absl::Status)> done) {
  if (stopped_) return done(absl::UnavailableError("the server is stopping"));
  Enqueue({.kind = Kind::kCheck, .sha256 = sha256, .size_bytes = 0, .done = std::move(done)});
}

void ImageStager::Prestage(const std::string& sha256) {
  if (stopped_ || staged_.contains(sha256) || Wanted(sha256) || queue_.size() >= kMaxQueued) {
    return;
  }
  if (auto refused = refused_ms_.find(sha256);
      refused != refused_ms_.end() && Now() - refused->second < kTtlMs) {
    return;  // found invalid lately: a peer pushing it again gets no new copy
  }
  MediaService* media = media_();
  std::optional<BlobInfo> blob = media->store()->Stat(sha256);
  if (!blob.has_value() || blob->size_bytes > max_bytes_) return;
  // The free disk is checked on the pool, just before the copy (RunOnPool).
  Enqueue({.kind = Kind::kPrestage, .sha256 = sha256, .size_bytes = blob->size_bytes, .done = {}});
}

void ImageStager::Enqueue(Work work) {
  if (work.kind == Kind::kStage) {
    queue_.push_front(std::move(work));  // an entry waits for it
  } else {
    queue_.push_back(std::move(work));
  }
  Pump();
}

void ImageStager::Pump() {
  if (stopped_) return;
  if (!running_other_.has_value()) {
    // The first Check before any Prestage: an upload waits for it, nobody for those.
    auto next = std::find_if(queue_.begin(), queue_.end(),
                             [](const Work& w) { return w.kind == Kind::kCheck; });
    if (next == queue_.end()) {
      next = std::find_if(queue_.begin(), queue_.end(),
                          [](const Work& w) { return w.kind == Kind::kPrestage; });
    }
    if (next != queue_.end()) {
      Work work = std::move(*next);
      queue_.erase(next);
      running_other_ = Work{.kind = work.kind, .sha256 = work.sha256, .size_bytes = 0, .done = {}};
      Run(std::move(work));
    }
  }
  if (running_stage_.has_value()) return;
  auto next = std::find_if(queue_.begin(), queue_.end(),
                           [](const Work& w) { return w.kind == Kind::kStage; });
  if (next == queue_.end()) return;
  Work work = std::move(*next);
  queue_.erase(next);
  running_stage_ = Work{.kind = work.kind, .sha256 = work.sha256, .size_bytes = 0, .done = {}};
  // A Stage fetches the blob first if this replica lacks it.
  MediaService* media = media_();
  SYNOD_CHECK(media != nullptr);
  const std::string sha256 = work.sha256;
  const uint64_t size = work.size_bytes;
  auto held = std::make_shared<Work>(std::move(work));
  const uint64_t generation = generation_;
  media->EnsureBlob(sha256, size, [this, held, generation](absl::Status fetched) {
    if (stopped_) return;
    if (!fetched.ok() || generation != generation_) {
      return Finish(std::move(*held), fetched, "", /*verdict=*/false,
                    /*stale=*/generation != generation_);
    }
    Run(std::move(*held));
  });
}

void ImageStager::RunOnPool(Job* j) {
  if (j->work.kind == Kind::kPrestage) {
    // Staged ahead only if the copy fits (jobs queued meanwhile used the disk), and only
    // what starts as an SQLite file. Nothing found here is a verdict: the blob's hash is
    // not checked yet, and an entry naming it stages it again, checking the hash first.
    absl::StatusOr<uint64_t> free = j->store->FreeBytes();
    constexpr uint64_t kReserveBytes = uint64_t{256} << 20;
    if (!free.ok() || *free < j->work.size_bytes + kReserveBytes) {
      j->status = absl::ResourceExhaustedError("no room to stage ahead");
      return;
    }
    absl::StatusOr<int> fd = j->store->OpenForReading(j->work.sha256);
    if (!fd.ok()) {
      j->status = fd.status();
      return;
    }
    absl::StatusOr<std::string> header = ReadAt(*fd, 0, kImageHeaderBytes, "a blob");
    close(*fd);
    if (!header.ok() || !CheckImageHeader(*header).ok()) {
      j->status = absl::FailedPreconditionError("not staged ahead: no SQLite header");
      return;
    }
  }
  // The copy checks the blob's hash: a verdict is only ever given on the right bytes.
  j->status = j->store->CopyOut(j->work.sha256, j->path);
  if (absl::IsDataLoss(j->status)) {
    // Damaged here: removed, and fetched again at the next try.
    (void)j->store->Remove(j->work.sha256);
  }
  if (!j->status.ok()) {
    j->status = absl::UnavailableError(j->status.ToString());
    return;
  }
  j->status = CheckStagedFile(j->path, &j->verdict);
  if (!j->status.ok()) RemoveStagedFile(j->path);
}

void ImageStager::Run(Work work) {
  MediaService* media = media_();
  SYNOD_CHECK(media != nullptr);
  auto* job = new Job();
  job->request.data = job;
  job->stager = this;
  job->store = media->store();
  job->path = absl::StrCat(dir_, "/", ++files_, "-", work.sha256.substr(0, 16), ".db");
  job->work = std::move(work);
  job->generation = generation_;
  SYNOD_CHECK_EQ(uv_queue_work(
                     loop_, &job->request,
                     [](uv_work_t* request) { RunOnPool(static_cast<Job*>(request->data)); },
                     [](uv_work_t* request, int) {
                       std::unique_ptr<Job> j(static_cast<Job*>(request->data));
                       ImageStager* stager = j->stager;
                       if (stager->stopped_) {
                         if (j->status.ok()) RemoveStagedFile(j->path);
                         return;
                       }
                       stager->Finish(std::move(j->work), j->status, std::move(j->path), j->verdict,
                                      /*stale=*/j->generation != stager->generation_);
                     }),
                 0);
}

void ImageStager::Finish(Work work, absl::Status status, std::string path, bool verdict,
                         bool stale) {
  (work.kind == Kind::kStage ? running_stage_ : running_other_).reset();
  const bool valid = verdict && status.ok();
  // A Check's verdict and copy hold whatever the state: only stagings are cleared.
  if (work.kind == Kind::kCheck) stale = false;
  if (stale) {
    // Cleared meanwhile (the state was replaced): nothing of it is kept.
    if (valid) RemoveOnPool(std::move(path));
    return Pump();
  }
  if (verdict && !status.ok()) {
    ++counters_.invalid;
    refused_ms_[work.sha256] = Now();
  }
  switch (work.kind) {
    case Kind::kStage:
      if (!verdict) {
        ScheduleRetry(work.sha256, status);
        break;
      }
      retry_delay_ms_ = 0;
      if (valid) ++counters_.staged;
      staged_[work.sha256].push_back({.image = valid ? absl::StatusOr<std::string>(std::move(path))
                                                     : absl::StatusOr<std::string>(status),
                                      .staged_ms = Now()});
      break;  // the loop wakes (this is a callback) and the node applies on
    case Kind::kCheck:
      if (valid) {
        ++counters_.staged;
        staged_[work.sha256].push_back({.image = std::move(path), .staged_ms = Now()});
      }
      work.done(status);
      break;
    case Kind::kPrestage:
      // Only a valid copy is kept: an entry naming an invalid image stages it again.
      if (valid) {
        ++counters_.prestaged;
        staged_[work.sha256].push_back({.image = std::move(path), .staged_ms = Now()});
      }
      break;
  }
  Pump();
}

void ImageStager::ScheduleRetry(const std::string& sha256, const absl::Status& why) {
  ++counters_.retries;
  retry_delay_ms_ =
      retry_delay_ms_ == 0 ? kFirstRetryMs : std::min(2 * retry_delay_ms_, kMaxRetryMs);
  fprintf(stderr,
          "W cannot stage database image %s yet (%s): applying waits; next try in %llu ms\n",
          sha256.c_str(), std::string(why.message()).c_str(),
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

void ImageStager::Drop(const std::string& sha256) {
  auto it = staged_.find(sha256);
  if (it == staged_.end()) return;
  for (auto copy = it->second.begin(); copy != it->second.end(); ++copy) {
    if (!copy->image.ok()) continue;
    RemoveOnPool(*std::move(copy->image));
    it->second.erase(copy);
    break;
  }
  if (it->second.empty()) staged_.erase(it);
}

void ImageStager::Expire(int64_t now_ms) {
  if (now_ms - last_expire_ms_ < kExpireEveryMs) return;
  last_expire_ms_ = now_ms;
  for (auto it = staged_.begin(); it != staged_.end();) {
    std::deque<Copy>& copies = it->second;
    while (!copies.empty() && now_ms - copies.front().staged_ms >= kTtlMs) {
      ++counters_.expired;
      if (copies.front().image.ok()) RemoveOnPool(*std::move(copies.front().image));
      copies.pop_front();
    }
    it = copies.empty() ? staged_.erase(it) : std::next(it);
  }
  std::erase_if(refused_ms_, [&](const auto& entry) { return now_ms - entry.second >= kTtlMs; });
}

void ImageStager::Clear() {
  ++generation_;
  retry_delay_ms_ = 0;
  if (retry_pending_) {  // an entry of the new state need not wait out the old delay
    uv_timer_stop(&retry_timer_);
    retry_pending_ = false;
  }
  needed_.clear();
  for (auto& [sha256, copies] : staged_) {
    for (Copy& copy : copies) {
      if (copy.image.ok()) RemoveOnPool(*std::move(copy.image));
    }
  }
  staged_.clear();
  // Stages and prestages waiting are not wanted now (an entry asks again); checks are
  // uploads', and run.
  std::erase_if(queue_, [](const Work& work) { return work.kind != Kind::kCheck; });
}

void ImageStager::Applied() {
  // A file moved into place is gone from here; one copied (or refused) is removed.
  for (std::string& path : taken_) RemoveOnPool(std::move(path));
  taken_.clear();
  for (const auto& [sha256, left] : needed_) {
    auto it = staged_.find(sha256);
    for (size_t i = 0; i < left && it != staged_.end() && !it->second.empty(); ++i) {
      if (it->second.front().image.ok()) RemoveOnPool(*std::move(it->second.front().image));
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
  absl::StatusOr<std::string> image = std::move(it->second.front().image);
  it->second.pop_front();
  if (it->second.empty()) staged_.erase(it);
  if (image.ok()) taken_.push_back(*image);
  if (auto need = needed_.find(sha256); need != needed_.end() && --need->second == 0) {
    needed_.erase(need);
  }
  return image;
}

void ImageStager::AppendMetrics(MetricsText* out) const {
  out->Counter("synod_database_images_staged_total",
               "Database images by reference staged (fetched if needed, copied, checked) before "
               "their entry was applied, or checked by the uploading replica",
               counters_.staged);
  out->Counter("synod_database_images_prestaged_total",
               "Database images checked and staged as soon as their push was stored here, "
               "before their entry was proposed",
               counters_.prestaged);
  out->Counter("synod_database_images_invalid_total",
               "Database images found invalid by their checks", counters_.invalid);
  out->Counter("synod_database_image_staging_retries_total",
               "Stagings that failed for a reason other than the image (no peer held it yet, "
               "disk) and were tried again later",
               counters_.retries);
  out->Counter("synod_database_images_expired_total",
               "Staged copies nobody took within 10 minutes, removed", counters_.expired);
}

}  // namespace synod::server

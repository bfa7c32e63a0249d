#ifndef SYNOD_SERVER_IMAGE_STAGER_H_
#define SYNOD_SERVER_IMAGE_STAGER_H_

// Stages the database images that committed entries name by reference
// (CreateDatabase.image_sha256) before the node applies them: the blob is fetched from a
// peer if this replica lacks it (MediaService::EnsureBlob), copied into a private file under
// DIR while its hash is checked (a damaged blob is removed and fetched again), and checked
// and prepared as an uploaded image (core's CheckAndPrepareImage), all on libuv's pool. The
// state machine then takes the file (StagedImages::Take) and moves it into place.
//
// The verdict of the checks is the same on every replica (the same bytes, checked the same
// way): an invalid image is a deterministic INVALID_ARGUMENT result, never a failure. What
// is not a verdict (no peer holds the blob yet, a full disk, a read error) is retried, with
// a growing delay, and meanwhile the entry waits: applying stalls here, not consensus.
//
// Threading: the loop thread, except the pool work.

#include <uv.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/replica.h"
#include "core/state_machine.h"
#include "server/media.h"
#include "server/status.h"

namespace synod::server {

// Checks and prepares the image copied to `path` (the pool's part of staging): its header,
// then the database, then makes it durable. `verdict` says whether the status is the
// image's (OK, or InvalidArgument with the reason: the same on every replica, from the
// same bytes) or this machine's (a read, a write, a sync, memory, SQLite's I/O errors),
// which is tried again and never taken as the image's.
absl::Status CheckStagedFile(const std::string& path, bool* verdict);

class ImageStager : public StagedImages {
 public:
  // `media` is asked for the blob store and for fetches (it is made after the stager).
  // Images over `max_bytes` (--max-database-bytes) are never staged ahead.
  ImageStager(uv_loop_t* loop, std::string dir, std::function<MediaService*()> media,
              uint64_t max_bytes);
  ~ImageStager() override;
  ImageStager(const ImageStager&) = delete;
  ImageStager& operator=(const ImageStager&) = delete;

  // Creates DIR, emptied of what an earlier process staged.
  absl::Status Start();
  void Stop();

  // Whether every image `value` names by reference is staged (true for most entries, which
  // name none). If not, has the next one staged; the loop wakes when it is done.
  bool Ready(const Value& value);
  // Checks the image `sha256` (stored here) as it would be staged, for an upload before it
  // is proposed: `done` gets the verdict (OK, InvalidArgument) or an error of this machine
  // (Unavailable). A valid image stays staged for this replica's own apply.
  void Check(const std::string& sha256, std::function<void(absl::Status)> done);
  // Removes one staged copy of `sha256`, if any (its write was not applied).
  void Drop(const std::string& sha256);
  // A database image pushed here whole (its upload not yet proposed): staged ahead, so that
  // the entry that names it need not wait for the copy and the check. Skipped when a copy
  // is here or on its way, when it is too large or the disk too full for a copy, when the
  // same image was found invalid lately, or when kMaxQueued jobs wait already.
  void Prestage(const std::string& sha256);
  // Every kExpireEveryMs: removes copies nobody took within kTtlMs (an upload refused after
  // its push, a push that came after its entry was applied); an entry that needs one later
  // has it staged again. Cheap when called often (every tick).
  void Expire(int64_t now_ms);
  // Every staged copy is dropped (the state was replaced by a snapshot); jobs under way
  // finish, and what they bring is dropped too.
  void Clear();

  absl::StatusOr<std::string> Take(const std::string& sha256) override;
  // After an entry is applied: what it took and did not move into place is removed, and so
  // is what it named and did not take (a retried request answered from its session).
  void Applied();

  void AppendMetrics(MetricsText* out) const;

  static constexpr int64_t kTtlMs = 10 * 60 * 1000;
  static constexpr int64_t kExpireEveryMs = 10'000;
  static constexpr size_t kMaxQueued = 8;

 private:
  // Jobs run one at a time in each of two lanes: Stages (an entry waits for one), and the
  // rest, Checks (an upload waits for one) before Prestages (nobody waits).
  enum class Kind { kStage, kCheck, kPrestage };
  struct Work {
    Kind kind;
    std::string sha256;
    uint64_t size_bytes = 0;
    std::function<void(absl::Status)> done;  // kCheck
  };
  struct Job;
  struct Copy {
    absl::StatusOr<std::string> image;  // a path, or the verdict that the image is invalid
    int64_t staged_ms = 0;
  };
  void Enqueue(Work work);
  void Pump();
  // The pool's part of a job, after the blob is here: the copy (its hash checked), then
  // CheckStagedFile on the copy; a Prestage first checks the free disk and reads the blob's
  // header to skip what is no SQLite file. Then Finish on the loop.
  void Run(Work work);
  static void RunOnPool(Job* job);
  void Finish(Work work, absl::Status status, std::string path, bool verdict, bool stale);
  void ScheduleRetry(const std::string& sha256, const absl::Status& why);
  bool Wanted(const std::string& sha256) const;  // a job for it is queued or running
  void RemoveOnPool(std::string path);
  int64_t Now() const { return static_cast<int64_t>(uv_now(loop_)); }

  uv_loop_t* const loop_;
  const std::string dir_;
  const std::function<MediaService*()> media_;
  const uint64_t max_bytes_;
  bool stopped_ = false;
  // Staged and not yet taken, by sha256.
  std::map<std::string, std::deque<Copy>> staged_;
  std::vector<std::string> taken_;  // by the entry being applied
  // The images the entry being applied names and has not taken yet, by sha256.
  std::map<std::string, size_t> needed_;
  uint64_t generation_ = 0;  // Clear() drops what jobs started before it bring
  std::deque<Work> queue_;
  // Two lanes, each running one job at a time: an entry's Stage never waits behind a long
  // Check or Prestage. Their kind and sha256 (the work itself is with the job).
  std::optional<Work> running_stage_;
  std::optional<Work> running_other_;
  std::map<std::string, int64_t> refused_ms_;  // images found invalid lately: when
  int64_t last_expire_ms_ = 0;
  uint64_t files_ = 0;
  // After a Stage fails for a reason that is not a verdict, the next try waits (doubling
  // up to a bound).
  uv_timer_t retry_timer_;
  bool timer_initialized_ = false;
  bool retry_pending_ = false;
  uint64_t retry_delay_ms_ = 0;
  static constexpr uint64_t kFirstRetryMs = 200;
  static constexpr uint64_t kMaxRetryMs = 30'000;
  struct Counters {
    uint64_t staged = 0;
    uint64_t prestaged = 0;
    uint64_t invalid = 0;
    uint64_t retries = 0;
    uint64_t expired = 0;
  };
  Counters counters_;
};

}  // namespace synod::server

#endif  // SYNOD_SERVER_IMAGE_STAGER_H_

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
#include <set>
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
  // `media` is asked for each blob when a staging starts (it is made after the stager).
  ImageStager(uv_loop_t* loop, std::string dir, std::function<MediaService*()> media);
  ~ImageStager() override;
  ImageStager(const ImageStager&) = delete;
  ImageStager& operator=(const ImageStager&) = delete;

  // Creates DIR, emptied of what an earlier process staged.
  absl::Status Start();
  void Stop();

  // Whether every image `value` names by reference is staged (true for most entries, which
  // name none). If not, starts staging the next one; the loop wakes when it is done.
  bool Ready(const Value& value);
  // Checks the image `sha256` (stored here) as it would be staged, for an upload before it
  // is proposed: `done` gets the verdict (OK, InvalidArgument) or the machine's error. A
  // valid image stays staged for this replica's own apply (Drop it if the write fails).
  void Check(const std::string& sha256, std::function<void(absl::Status)> done);
  // Removes one staged copy of `sha256`, if any (its write was not applied).
  void Drop(const std::string& sha256);
  // A database image pushed here whole (its upload not yet proposed): staged now, so that
  // the entry that names it need not wait for the copy and the check. A valid copy nobody
  // takes within kPrestagedTtlMs is removed (Expire); anything else is not kept (the entry,
  // if it ever commits, stages again).
  void Prestage(const std::string& sha256);
  // Removes prestaged copies past their time; cheap when called often (every tick).
  void Expire(int64_t now_ms);
  // The images staged and not taken are dropped (the state was replaced by a snapshot).
  void Clear();

  absl::StatusOr<std::string> Take(const std::string& sha256) override;
  // After an entry is applied: what it took and did not move into place is removed.
  void Applied();

  void AppendMetrics(MetricsText* out) const;

 private:
  struct Job;
  // The pool's part: copies the blob into a new file under DIR (checking its hash), checks
  // and prepares it. `verdict`: the status is the image's (OK or InvalidArgument).
  using JobDone = std::function<void(absl::Status status, std::string path, bool verdict)>;
  void CopyAndCheck(const std::string& sha256, JobDone done);
  void Stage(const std::string& sha256, uint64_t size_bytes);
  void OnStaged(const std::string& sha256, absl::Status status, std::string path, bool verdict);
  void RemoveOnPool(std::string path);

  uv_loop_t* const loop_;
  const std::string dir_;
  const std::function<MediaService*()> media_;
  bool stopped_ = false;
  // Staged and not yet taken, by sha256: a path, or the verdict that the image is invalid.
  std::map<std::string, std::deque<absl::StatusOr<std::string>>> staged_;
  std::vector<std::string> taken_;  // by the entry being applied
  // The images the entry being applied names and has not taken yet, by sha256.
  std::map<std::string, size_t> needed_;
  uint64_t generation_ = 0;  // Clear() drops what jobs started before it bring
  // Prestaging under way, by sha256; and prestaged copies not yet taken, by path: when.
  std::set<std::string> prestaging_;
  std::map<std::string, int64_t> prestaged_ms_;
  int64_t last_expire_ms_ = 0;
  static constexpr int64_t kPrestagedTtlMs = 10 * 60 * 1000;
  bool staging_ = false;  // one at a time
  uint64_t files_ = 0;
  // After a failure that is not a verdict, the next try waits (doubling up to a bound).
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
  };
  Counters counters_;
};

}  // namespace synod::server

#endif  // SYNOD_SERVER_IMAGE_STAGER_H_

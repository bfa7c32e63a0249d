#include "adapters/log_writer.h"

#include <utility>

#include "core/check.h"
#include "core/log_codec.h"

namespace synod {

LogWriter::LogWriter(uv_loop_t* loop, std::unique_ptr<LogStore> store)
    : loop_(loop), store_(std::move(store)) {
  SYNOD_CHECK_EQ(
      uv_async_init(loop_, &async_,
                    [](uv_async_t* a) { static_cast<LogWriter*>(a->data)->OnCompletions(); }),
      0);
  async_.data = this;
  thread_ = std::thread([this] { Run(); });
}

LogWriter::~LogWriter() { SYNOD_CHECK(closed_) << "a LogWriter destroyed without Close()"; }

void LogWriter::Persist(const Ready& ready, PersistOptions options, std::function<void()> done) {
  // Stopping: the write never completes, so nothing that depends on it is acknowledged.
  if (closed_) return;
  Job job;
  job.framed = EncodeReady(ready);
  job.summary = RecordsSummary::Of(ready);
  job.sync = options.sync;
  if (options.compact) job.compact_through = ready.compacted_through;
  const bool wait = options.sync || job.compact_through > 0;
  if (wait) job.done = std::move(done);
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(job));
  }
  wake_.notify_one();
  // Without an fsync there is nothing to wait for: the records are durable with the next
  // sync, which comes after them in the queue.
  if (!wait) done();
}

void LogWriter::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    wake_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_, and nothing left to write
    Job job = std::move(queue_.front());
    queue_.pop_front();
    running_job_ = true;
    lock.unlock();
    RunJob(job);
    lock.lock();
    running_job_ = false;
    const bool tell_loop = job.done != nullptr || !job.status.ok();
    if (tell_loop) completed_.push_back(std::move(job));
    if (queue_.empty()) idle_.notify_all();
    if (tell_loop) uv_async_send(&async_);
  }
}

void LogWriter::RunJob(Job& job) {
  store_->AppendFramed(std::move(job.framed), std::move(job.summary));
  if (!job.sync && job.compact_through == 0) return;
  job.status = store_->Sync();
  if (!job.status.ok() || job.compact_through == 0) return;
  // Durable first, then the segments the snapshot covers are deleted.
  job.status = store_->Compact(job.compact_through);
}

void LogWriter::OnCompletions() {
  std::deque<Job> done;
  {
    std::lock_guard<std::mutex> lock(mu_);
    done.swap(completed_);
  }
  for (Job& job : done) {
    // Whatever depended on this write (a promise, an accept, an installed snapshot) must
    // not be acknowledged: stop rather than go on.
    SYNOD_CHECK(job.status.ok()) << "log write failed: " << job.status;
    if (job.done && !closed_) job.done();
  }
}

LogStore& LogWriter::Flush() {
  {
    std::unique_lock<std::mutex> lock(mu_);
    idle_.wait(lock, [&] { return queue_.empty() && !running_job_; });
  }
  OnCompletions();
  return *store_;
}

void LogWriter::Close() {
  if (closed_) return;
  closed_ = true;  // completions run no callback from now on: nothing more is sent or answered
  Flush();
  absl::Status synced = store_->Sync();
  SYNOD_CHECK(synced.ok()) << "final log sync failed: " << synced;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_one();
  thread_.join();
  store_.reset();  // closes the files and releases the data directory's lock
  uv_close(reinterpret_cast<uv_handle_t*>(&async_), nullptr);
}

size_t LogWriter::queued() const {
  std::lock_guard<std::mutex> lock(mu_);
  return queue_.size() + (running_job_ ? 1 : 0);
}

}  // namespace synod

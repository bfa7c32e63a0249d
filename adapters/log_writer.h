#ifndef SYNOD_ADAPTERS_LOG_WRITER_H_
#define SYNOD_ADAPTERS_LOG_WRITER_H_

// The server's log storage for the host driver (core/driver.h): a LogStore driven by a
// writer thread, so that appends, fsyncs and compactions never hold the loop.
//
// Persist() frames the Ready's records on the loop thread and queues them. A write that
// needs no fsync is done at once (its records become durable with the next sync, as with
// LogStore::Append); one that does completes later: the writer thread writes, fdatasyncs
// (and compacts the log: a new segment, older ones deleted), and then the loop thread calls its
// done(). Operations run in the order they were queued. While the writer is busy, the driver keeps
// gathering requests into its next Ready: that is the group commit.
//
// A failed write or fsync stops the process (SYNOD_CHECK on the loop thread): the log
// store is failed for good, and nothing that depended on it may be acknowledged.
//
// Thread safety: Persist, Flush and Close are called on the loop thread only.

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "adapters/log_store.h"
#include "core/driver.h"
#include "uv.h"

namespace synod {

class LogWriter : public LogStorage {
 public:
  // Takes the store over; its thread starts at once.
  LogWriter(uv_loop_t* loop, std::unique_ptr<LogStore> store);
  // Close() first.
  ~LogWriter() override;
  LogWriter(const LogWriter&) = delete;
  LogWriter& operator=(const LogWriter&) = delete;

  void Persist(const Ready& ready, PersistOptions options, std::function<void()> done) override;

  // Waits (blocking the loop) until every queued operation has run, and returns the store
  // for a synchronous use (the driver's snapshot refusal reads the log back). Completions
  // of the operations run before Flush returns.
  LogStore& Flush();
  // Flushes, makes every record durable, stops the thread, closes the store (releasing the
  // data directory) and the loop handle.
  void Close();

  // Operations queued and not yet done (metrics).
  size_t queued() const;

 private:
  struct Job {
    std::string framed;
    RecordsSummary summary;
    bool sync = false;
    uint64_t compact_through = 0;  // 0: no compaction
    std::function<void()> done;    // empty: nobody waits for it
    absl::Status status;
  };

  void Run();
  void RunJob(Job& job);
  void OnCompletions();

  uv_loop_t* const loop_;
  std::unique_ptr<LogStore> store_;
  uv_async_t async_;
  bool closed_ = false;

  mutable std::mutex mu_;
  std::condition_variable wake_;  // the thread: a job was queued, or stop
  std::condition_variable idle_;  // Flush: the queue drained
  std::deque<Job> queue_;         // guarded by mu_
  std::deque<Job> completed_;     // guarded by mu_: run, waiting for the loop
  bool running_job_ = false;      // guarded by mu_
  bool stop_ = false;             // guarded by mu_
  std::thread thread_;
};

}  // namespace synod

#endif  // SYNOD_ADAPTERS_LOG_WRITER_H_

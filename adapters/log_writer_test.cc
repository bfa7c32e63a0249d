#include "adapters/log_writer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "core/driver.h"
#include "core/log_codec.h"

namespace synod {
namespace {

class LogWriterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* base = std::getenv("TEST_TMPDIR");
    std::string pattern = std::string(base != nullptr ? base : "/tmp") + "/log_writer_test.XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    ASSERT_EQ(uv_loop_init(&loop_), 0);
  }
  void TearDown() override {
    uv_run(&loop_, UV_RUN_DEFAULT);  // runs the close callbacks
    EXPECT_EQ(uv_loop_close(&loop_), 0);
    std::filesystem::remove_all(dir_);
  }

  std::unique_ptr<LogWriter> OpenWriter() {
    absl::StatusOr<std::unique_ptr<LogStore>> store = LogStore::Open(dir_);
    EXPECT_TRUE(store.ok()) << store.status();
    return std::make_unique<LogWriter>(&loop_, std::move(*store));
  }
  // Runs the loop until `flag` is set.
  void RunUntil(const bool& flag) {
    for (int i = 0; i < 10000 && !flag; ++i) uv_run(&loop_, UV_RUN_ONCE);
    ASSERT_TRUE(flag);
  }
  PersistedState Recovered() {
    absl::StatusOr<std::unique_ptr<LogStore>> store = LogStore::Open(dir_);
    EXPECT_TRUE(store.ok()) << store.status();
    return std::move((*store)->recovered());
  }

  std::string dir_;
  uv_loop_t loop_;
};

LogEntry Entry(uint64_t slot) {
  LogEntry e;
  e.set_slot(slot);
  e.mutable_ballot()->set_round(1);
  e.mutable_ballot()->set_replica_id(1);
  e.mutable_value()->set_noop(true);
  return e;
}

Ready EntriesReady(uint64_t from, uint64_t to, bool must_sync) {
  Ready r;
  for (uint64_t slot = from; slot <= to; ++slot) r.entries.push_back(Entry(slot));
  r.must_sync = must_sync;
  return r;
}

TEST_F(LogWriterTest, ASyncedWriteIsDoneOnTheLoopOnlyOnceDurable) {
  std::unique_ptr<LogWriter> writer = OpenWriter();
  bool done = false;
  Ready ready = EntriesReady(1, 3, true);
  writer->Persist(ready, PersistOptions{.sync = true}, [&] { done = true; });
  EXPECT_FALSE(done) << "done before the loop ran";
  RunUntil(done);
  writer->Close();
  EXPECT_EQ(Recovered().entries.size(), 3u);
}

TEST_F(LogWriterTest, AWriteWithoutSyncIsDoneAtOnceAndDurableWithTheNextSync) {
  std::unique_ptr<LogWriter> writer = OpenWriter();
  bool first = false, second = false;
  Ready a = EntriesReady(1, 2, false);
  writer->Persist(a, PersistOptions{}, [&] { first = true; });
  EXPECT_TRUE(first);
  Ready b = EntriesReady(3, 3, true);
  writer->Persist(b, PersistOptions{.sync = true}, [&] { second = true; });
  RunUntil(second);
  writer->Flush();
  writer->Close();
  EXPECT_EQ(Recovered().entries.size(), 3u);
}

// The log's segment files, by name.
std::vector<std::string> SegmentNames(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& f : std::filesystem::directory_iterator(dir + "/logs")) {
    names.push_back(f.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

TEST_F(LogWriterTest, ACompactingWriteDeletesTheSegmentsItCoversOffTheLoop) {
  std::unique_ptr<LogWriter> writer = OpenWriter();
  bool written = false, compacted = false;
  Ready entries = EntriesReady(1, 10, true);
  writer->Persist(entries, PersistOptions{.sync = true}, [&] { written = true; });
  Ready snapshot = SnapshotReady(SnapshotMetaOf(8, "image"));
  writer->Persist(snapshot, PersistOptions{.sync = true, .compact = true},
                  [&] { compacted = true; });
  RunUntil(compacted);
  EXPECT_TRUE(written);
  // Slots 9 and 10 are in the first segment: it stays, and a new one is started.
  EXPECT_EQ(SegmentNames(dir_),
            (std::vector<std::string>{"00000000000000000001.seg", "00000000000000000002.seg"}));
  compacted = false;
  Ready more = EntriesReady(11, 12, true);
  HardState promised;
  promised.mutable_promised()->set_round(5);
  promised.mutable_promised()->set_replica_id(3);
  more.hard_state = promised;
  writer->Persist(more, PersistOptions{.sync = true}, [] {});
  Ready later = SnapshotReady(SnapshotMetaOf(12, "later image"));
  writer->Persist(later, PersistOptions{.sync = true, .compact = true}, [&] { compacted = true; });
  RunUntil(compacted);
  // Every entry written so far is covered: only the new segment is left.
  EXPECT_EQ(SegmentNames(dir_), (std::vector<std::string>{"00000000000000000003.seg"}));
  writer->Close();
  PersistedState state = Recovered();
  EXPECT_EQ(state.snapshot_meta.index(), 12u);
  EXPECT_EQ(state.snapshot_meta.checksum(), SnapshotChecksum("later image"));
  EXPECT_TRUE(state.entries.empty());
  // The promise was in a deleted segment: the new one's header repeats it.
  EXPECT_EQ(state.hard_state.promised().round(), 5u);
  EXPECT_EQ(state.hard_state.promised().replica_id(), 3u);
}

TEST_F(LogWriterTest, FlushRunsEveryQueuedOperationAndItsCompletion) {
  std::unique_ptr<LogWriter> writer = OpenWriter();
  int done = 0;
  std::vector<Ready> readys;
  for (uint64_t i = 1; i <= 20; ++i) readys.push_back(EntriesReady(i, i, true));
  for (Ready& r : readys) writer->Persist(r, PersistOptions{.sync = true}, [&] { ++done; });
  writer->Flush();
  EXPECT_EQ(done, 20);
  EXPECT_EQ(writer->queued(), 0u);
  writer->Close();
  EXPECT_EQ(Recovered().entries.size(), 20u);
}

}  // namespace
}  // namespace synod

#include "adapters/log_store.h"

#include <gtest/gtest.h>
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "adapters/file_database_opener.h"
#include "core/driver.h"
#include "core/log_codec.h"
#include "core/state_machine.h"

namespace synod {
namespace {

namespace fs = std::filesystem;

class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* base = std::getenv("TEST_TMPDIR");
    std::string pattern = std::string(base != nullptr ? base : "/tmp") + "/log_store_test.XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string ReadFile(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  void WriteFile(const std::string& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << bytes;
  }
  // The first segment of the log (the only one until a segment is started).
  std::string LogPath() const { return dir_ + "/logs/00000000000000000001.seg"; }

  std::string dir_;
};

using LogStoreTest = TempDirTest;

LogEntry Entry(uint64_t slot, uint64_t round, bool chosen) {
  LogEntry e;
  e.set_slot(slot);
  e.mutable_ballot()->set_round(round);
  e.mutable_ballot()->set_replica_id(1);
  e.mutable_value()->set_noop(true);
  e.set_chosen(chosen);
  return e;
}

Ready AcceptReady(uint64_t round, std::vector<LogEntry> entries) {
  Ready r;
  HardState hs;
  hs.mutable_promised()->set_round(round);
  hs.mutable_promised()->set_replica_id(2);
  hs.set_max_round_used(round);
  r.hard_state = hs;
  r.entries = std::move(entries);
  r.must_sync = true;
  return r;
}

// A comparable picture of a persisted state (entries sorted by slot, as recovery gives them).
std::string Describe(const PersistedState& s) {
  std::string out = s.hard_state.SerializeAsString() + "|" + s.snapshot_meta.SerializeAsString();
  for (const LogEntry& e : s.entries) out += "|" + e.SerializeAsString();
  return out;
}

std::unique_ptr<LogStore> MustOpen(const std::string& dir, LogStoreOptions options = {}) {
  absl::StatusOr<std::unique_ptr<LogStore>> store = LogStore::Open(dir, options);
  EXPECT_TRUE(store.ok()) << store.status();
  return store.ok() ? std::move(*store) : nullptr;
}

// Two synced batches: promise round 3 with slots 1-2, then round 4 choosing slot 1.
void WriteTwoBatches(LogStore& store) {
  store.Append(AcceptReady(3, {Entry(1, 3, false), Entry(2, 3, false)}));
  ASSERT_TRUE(store.Sync().ok());
  store.Append(AcceptReady(4, {Entry(1, 3, true)}));
  ASSERT_TRUE(store.Sync().ok());
}

TEST_F(LogStoreTest, ANewDirectoryStartsEmpty) {
  std::unique_ptr<LogStore> store = MustOpen(dir_ + "/nested/data");
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->recovered().hard_state.promised().round(), 0u);
  EXPECT_TRUE(store->recovered().entries.empty());
  EXPECT_EQ(store->truncated_tail_bytes(), 0u);
  EXPECT_TRUE(fs::exists(dir_ + "/nested/data/logs/00000000000000000001.seg"));
}

TEST_F(LogStoreTest, WhatWasSyncedIsRecoveredAfterReopening) {
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_);
    WriteTwoBatches(*store);
  }
  std::unique_ptr<LogStore> store = MustOpen(dir_);
  const PersistedState& s = store->recovered();
  EXPECT_EQ(store->truncated_tail_bytes(), 0u);
  EXPECT_EQ(s.hard_state.promised().round(), 4u);
  EXPECT_EQ(s.applied_index, 0u);
  ASSERT_EQ(s.entries.size(), 2u);
  EXPECT_EQ(s.entries[0].slot(), 1u);
  EXPECT_TRUE(s.entries[0].chosen());  // the later record for a slot replaces the earlier
  EXPECT_EQ(s.entries[1].slot(), 2u);
}

TEST_F(LogStoreTest, RecordsAppendedButNeverSyncedAreLostAsInACrash) {
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_);
    WriteTwoBatches(*store);
    store->Append(AcceptReady(9, {Entry(3, 9, false)}));
  }
  std::unique_ptr<LogStore> store = MustOpen(dir_);
  EXPECT_EQ(store->recovered().hard_state.promised().round(), 4u);
  EXPECT_EQ(store->recovered().entries.size(), 2u);
}

TEST_F(LogStoreTest, SyncWithNothingAppendedWritesNothing) {
  std::unique_ptr<LogStore> store = MustOpen(dir_);
  WriteTwoBatches(*store);
  uint64_t size = fs::file_size(LogPath());
  ASSERT_TRUE(store->Sync().ok());
  EXPECT_EQ(fs::file_size(LogPath()), size);
}

TEST_F(LogStoreTest, ATornPartialRecordIsTruncatedAndReportedOnce) {
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_);
    WriteTwoBatches(*store);
  }
  std::string synced = ReadFile(LogPath());
  WriteFile(LogPath(), synced + EncodeReady(AcceptReady(5, {Entry(3, 5, false)})).substr(0, 9));
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_);
    EXPECT_EQ(store->truncated_tail_bytes(), 9u);
    EXPECT_EQ(store->recovered().hard_state.promised().round(), 4u);
    EXPECT_EQ(ReadFile(LogPath()), synced);
  }
  std::unique_ptr<LogStore> store = MustOpen(dir_);
  EXPECT_EQ(store->truncated_tail_bytes(), 0u);
  EXPECT_EQ(store->recovered().entries.size(), 2u);
}

TEST_F(LogStoreTest, ALogCutShortInItsLastRecordIsATornTail) {
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_);
    WriteTwoBatches(*store);
  }
  uint64_t size = fs::file_size(LogPath());
  fs::resize_file(LogPath(), size - 3);  // into the last sync mark
  std::unique_ptr<LogStore> store = MustOpen(dir_);
  EXPECT_GT(store->truncated_tail_bytes(), 0u);
  EXPECT_EQ(store->recovered().hard_state.promised().round(), 4u);
  EXPECT_EQ(fs::file_size(LogPath()), size - 3 - store->truncated_tail_bytes());
  // Appending after the truncation gives a log that recovers cleanly.
  store->Append(AcceptReady(6, {Entry(2, 6, false)}));
  ASSERT_TRUE(store->Sync().ok());
  store.reset();
  store = MustOpen(dir_);
  EXPECT_EQ(store->truncated_tail_bytes(), 0u);
  EXPECT_EQ(store->recovered().hard_state.promised().round(), 6u);
}

TEST_F(LogStoreTest, AFlippedByteInAnEarlyRecordFailsOpenWithDataLoss) {
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_);
    WriteTwoBatches(*store);
  }
  std::string log = ReadFile(LogPath());
  log[20] ^= 0x10;  // inside the first record's payload
  WriteFile(LogPath(), log);
  absl::StatusOr<std::unique_ptr<LogStore>> store = LogStore::Open(dir_);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(store.status().message().find(LogPath()), absl::string_view::npos);
  EXPECT_NE(store.status().message().find("refuses to start"), absl::string_view::npos);
  EXPECT_EQ(ReadFile(LogPath()), log);  // left as found, for the operator to inspect
}

TEST_F(LogStoreTest, TheSyncMarkIsDurableWithTheBatchItEnds) {
  std::vector<uint64_t> durable_sizes;
  LogStoreOptions options;
  options.after_log_fsync = [&](uint64_t bytes) { durable_sizes.push_back(bytes); };
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_, options);
    WriteTwoBatches(*store);
  }
  ASSERT_EQ(durable_sizes.size(), 2u);
  // Nothing Sync() wrote waits for a later fsync.
  EXPECT_EQ(durable_sizes.back(), fs::file_size(LogPath()));

  // A power failure right after the second batch's fsync, then damage to its last record
  // of state (the promise and the chosen mark): the mark after it shows that record was
  // synced, so it is lost state, not a torn write, and the replica refuses to start.
  std::string log = ReadFile(LogPath()).substr(0, durable_sizes.back());
  const size_t mark_bytes = EncodeSyncMark(5, log.size()).size();
  log[log.size() - mark_bytes - 3] ^= 0x10;
  WriteFile(LogPath(), log);
  absl::StatusOr<std::unique_ptr<LogStore>> store = LogStore::Open(dir_);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss) << store.status();
}

TEST_F(LogStoreTest, RewriteKeepsTheStateInOneShorterSegment) {
  std::unique_ptr<LogStore> store = MustOpen(dir_);
  for (uint64_t round = 1; round <= 20; ++round) {
    store->Append(AcceptReady(round, {Entry(1, round, false), Entry(2, round, false)}));
  }
  store->Append(SnapshotReady(SnapshotMetaOf(1, "image")));
  ASSERT_TRUE(store->Sync().ok());
  uint64_t size_before = fs::file_size(LogPath());

  absl::StatusOr<PersistedState> state = store->ReadBack();
  ASSERT_TRUE(state.ok()) << state.status();
  ASSERT_EQ(state->entries.size(), 1u);  // slot 1 was compacted away
  ASSERT_TRUE(store->Rewrite(*state).ok());
  ASSERT_EQ(store->SegmentPaths().size(), 1u);
  EXPECT_LT(fs::file_size(store->SegmentPaths()[0]), size_before);
  EXPECT_FALSE(fs::exists(LogPath()));

  // The store goes on appending to the new segment.
  store->Append(AcceptReady(21, {Entry(3, 21, false)}));
  ASSERT_TRUE(store->Sync().ok());
  store.reset();
  store = MustOpen(dir_);
  EXPECT_EQ(store->truncated_tail_bytes(), 0u);
  PersistedState expected = *state;
  expected.hard_state = AcceptReady(21, {}).hard_state.value();
  expected.entries.push_back(Entry(3, 21, false));
  EXPECT_EQ(Describe(store->recovered()), Describe(expected));
  EXPECT_EQ(store->recovered().snapshot_meta.checksum(), SnapshotChecksum("image"));
}

// A log of a version that kept the snapshot's image in its record: the image is recovered
// for the host to move to its snapshot store, and a Rewrite drops it from the log.
TEST_F(LogStoreTest, AnImageInAnOlderSnapshotRecordIsRecoveredAndRewrittenAway) {
  const std::string image(10'000, 'i');
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_);
    StorageRecord record;
    *record.mutable_snapshot() = SnapshotMetaOf(1, image);
    record.set_snapshot_data(image);
    RecordsSummary summary;
    summary.snapshot = record.snapshot();
    store->AppendFramed(EncodeRecord(record), summary);
    ASSERT_TRUE(store->Sync().ok());
  }
  std::unique_ptr<LogStore> store = MustOpen(dir_);
  EXPECT_EQ(store->legacy_snapshot_data(), image);
  ASSERT_TRUE(store->Rewrite(store->recovered()).ok());
  ASSERT_EQ(store->SegmentPaths().size(), 1u);
  EXPECT_LT(fs::file_size(store->SegmentPaths()[0]), 200u);
  store.reset();
  store = MustOpen(dir_);
  EXPECT_TRUE(store->legacy_snapshot_data().empty());
  EXPECT_EQ(store->recovered().snapshot_meta.index(), 1u);
}

TEST_F(LogStoreTest, ALeftoverTemporaryFromAnInterruptedRewriteIsIgnored) {
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_);
    WriteTwoBatches(*store);
  }
  // An earlier version rewrote its one-file log through log.tmp.
  WriteFile(dir_ + "/log.tmp", "half a rewrite");
  std::unique_ptr<LogStore> store = MustOpen(dir_);
  EXPECT_EQ(store->recovered().hard_state.promised().round(), 4u);
  EXPECT_FALSE(fs::exists(dir_ + "/log.tmp"));
}

// Slots 1..n, one synced batch each, with the promise's round equal to the slot.
void WriteSlots(LogStore& store, uint64_t from, uint64_t to) {
  for (uint64_t slot = from; slot <= to; ++slot) {
    store.Append(AcceptReady(slot, {Entry(slot, slot, true)}));
    ASSERT_TRUE(store.Sync().ok());
  }
}

TEST_F(LogStoreTest, AOneFileLogOfAnEarlierVersionBecomesTheFirstSegment) {
  std::string old_log;
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_);
    WriteTwoBatches(*store);
    old_log = ReadFile(LogPath());
  }
  fs::remove_all(dir_ + "/logs");
  WriteFile(dir_ + "/log", old_log);
  std::unique_ptr<LogStore> store = MustOpen(dir_);
  EXPECT_EQ(store->recovered().hard_state.promised().round(), 4u);
  EXPECT_EQ(store->recovered().entries.size(), 2u);
  EXPECT_EQ(ReadFile(LogPath()), old_log);
  // What is left in its place is refused by the earlier version's recovery.
  absl::StatusOr<RecoveredLog> old_reading = RecoverLog(ReadFile(dir_ + "/log"));
  ASSERT_FALSE(old_reading.ok());
  EXPECT_EQ(old_reading.status().code(), absl::StatusCode::kDataLoss);
  // And the store opens on it again.
  store.reset();
  store = MustOpen(dir_);
  EXPECT_EQ(store->recovered().hard_state.promised().round(), 4u);
}

TEST_F(LogStoreTest, ANewDataDirectoryHasTheMarkAnEarlierVersionRefuses) {
  { MustOpen(dir_); }
  absl::StatusOr<RecoveredLog> old_reading = RecoverLog(ReadFile(dir_ + "/log"));
  ASSERT_FALSE(old_reading.ok());
  EXPECT_EQ(old_reading.status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(LogStoreTest, SegmentsGoneFromBesideTheMarkAreDataLoss) {
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_);
    WriteTwoBatches(*store);
  }
  fs::remove_all(dir_ + "/logs");
  absl::StatusOr<std::unique_ptr<LogStore>> store = LogStore::Open(dir_);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss) << store.status();
}

TEST_F(LogStoreTest, AMissingSegmentBetweenOthersIsDataLoss) {
  const LogStoreOptions small{.fsync = true, .after_log_fsync = nullptr, .segment_bytes = 300};
  std::vector<std::string> segments;
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_, small);
    WriteSlots(*store, 1, 20);
    segments = store->SegmentPaths();
  }
  ASSERT_GE(segments.size(), 3u);
  fs::remove(segments[1]);
  absl::StatusOr<std::unique_ptr<LogStore>> store = LogStore::Open(dir_, small);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss) << store.status();
  EXPECT_NE(store.status().message().find(segments[1]), absl::string_view::npos);
}

TEST_F(LogStoreTest, BothAOneFileLogAndSegmentsRefuseToOpen) {
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_);
    WriteTwoBatches(*store);
  }
  WriteFile(dir_ + "/log", ReadFile(LogPath()));
  absl::StatusOr<std::unique_ptr<LogStore>> store = LogStore::Open(dir_);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition) << store.status();
}

TEST_F(LogStoreTest, SegmentsStartAtTheirSizeAndReplayInOrder) {
  const LogStoreOptions small{.fsync = true, .after_log_fsync = nullptr, .segment_bytes = 300};
  PersistedState before;
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_, small);
    WriteSlots(*store, 1, 40);
    EXPECT_GT(store->SegmentPaths().size(), 5u);
    absl::StatusOr<PersistedState> state = store->ReadBack();
    ASSERT_TRUE(state.ok()) << state.status();
    before = *std::move(state);
  }
  EXPECT_EQ(before.entries.size(), 40u);
  EXPECT_EQ(before.hard_state.promised().round(), 40u);
  std::unique_ptr<LogStore> store = MustOpen(dir_, small);
  EXPECT_EQ(Describe(store->recovered()), Describe(before));
}

TEST_F(LogStoreTest, CompactionDeletesTheSegmentsTheSnapshotCoversAndNothingElse) {
  const LogStoreOptions small{.fsync = true, .after_log_fsync = nullptr, .segment_bytes = 300};
  std::unique_ptr<LogStore> store = MustOpen(dir_, small);
  WriteSlots(*store, 1, 40);
  const std::vector<std::string> segments = store->SegmentPaths();
  store->Append(SnapshotReady(SnapshotMetaOf(25, "image")));
  ASSERT_TRUE(store->Sync().ok());
  const std::string kept_before = ReadFile(segments.back());
  std::vector<std::string> bytes_before;
  for (const std::string& path : segments) bytes_before.push_back(ReadFile(path));
  ASSERT_TRUE(store->Compact(25).ok());
  // The segments whose entries are all at or below 25 are gone; the others are untouched.
  absl::StatusOr<PersistedState> state = store->ReadBack();
  ASSERT_TRUE(state.ok()) << state.status();
  ASSERT_EQ(state->entries.size(), 15u);
  EXPECT_EQ(state->entries.front().slot(), 26u);
  EXPECT_EQ(state->hard_state.promised().round(), 40u);
  EXPECT_EQ(state->snapshot_meta.index(), 25u);
  const std::vector<std::string> left = store->SegmentPaths();
  EXPECT_LT(left.size(), segments.size());
  EXPECT_FALSE(fs::exists(segments.front()));
  EXPECT_EQ(ReadFile(segments.back()), kept_before);
  for (const std::string& path : segments) {
    if (!fs::exists(path)) continue;
    // A kept segment holds an entry above the snapshot (or is the newest).
    EXPECT_TRUE(std::find(left.begin(), left.end(), path) != left.end());
  }
  {
    store.reset();
    std::unique_ptr<LogStore> reopened = MustOpen(dir_, small);
    EXPECT_EQ(Describe(reopened->recovered()), Describe(*state));
  }
  // Deletions are durable one by one, oldest first: a crash may undo the last ones. Undone,
  // last first, each leaves a log that replays to the same state.
  for (size_t i = segments.size(); i-- > 0;) {
    if (fs::exists(segments[i])) continue;
    WriteFile(segments[i], bytes_before[i]);
    std::unique_ptr<LogStore> undone = MustOpen(dir_, small);
    EXPECT_EQ(Describe(undone->recovered()), Describe(*state)) << "with " << segments[i];
  }
}

TEST_F(LogStoreTest, DamageAtTheEndOfASegmentThatIsNotTheLastIsDataLoss) {
  const LogStoreOptions small{.fsync = true, .after_log_fsync = nullptr, .segment_bytes = 300};
  std::vector<std::string> segments;
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_, small);
    WriteSlots(*store, 1, 10);
    segments = store->SegmentPaths();
  }
  ASSERT_GE(segments.size(), 2u);
  // Cut into the first segment's last mark: in the last segment this would be a torn tail;
  // here a later segment shows it was synced.
  fs::resize_file(segments[0], fs::file_size(segments[0]) - 3);
  absl::StatusOr<std::unique_ptr<LogStore>> store = LogStore::Open(dir_, small);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss) << store.status();
  EXPECT_NE(store.status().message().find(segments[0]), absl::string_view::npos);
}

TEST_F(LogStoreTest, ANewSegmentACrashCutShortLeavesTheStateBeforeIt) {
  const LogStoreOptions small{.fsync = true, .after_log_fsync = nullptr, .segment_bytes = 300};
  std::vector<std::string> before_roll;
  std::vector<std::string> after_roll;
  PersistedState before;
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_, small);
    WriteSlots(*store, 1, 10);
    before_roll = store->SegmentPaths();
    // Slots until the next Sync starts a new segment.
    uint64_t slot = 11;
    while (store->SegmentPaths().size() == before_roll.size()) {
      WriteSlots(*store, slot, slot);
      ++slot;
    }
    after_roll = store->SegmentPaths();
    // The state before the Sync that started the new segment.
    store.reset();
    fs::path kept = fs::path(dir_) / "kept";
    fs::create_directory(kept);
    fs::rename(after_roll.back(), kept / "new");
    store = MustOpen(dir_, small);
    before = store->recovered();
    store.reset();
    fs::rename(kept / "new", after_roll.back());
  }
  ASSERT_EQ(after_roll.size(), before_roll.size() + 1);
  // A crash while the new segment was being written: 20 of its bytes reached the disk.
  const std::string new_segment = ReadFile(after_roll.back());
  WriteFile(after_roll.back(), new_segment.substr(0, 20));
  std::unique_ptr<LogStore> store = MustOpen(dir_, small);
  EXPECT_EQ(store->truncated_tail_bytes(), 20u);
  EXPECT_EQ(Describe(store->recovered()), Describe(before));
  // The store goes on from there.
  const uint64_t next = before.entries.back().slot() + 1;
  WriteSlots(*store, next, next);
  store.reset();
  store = MustOpen(dir_, small);
  EXPECT_EQ(store->truncated_tail_bytes(), 0u);
  EXPECT_EQ(store->recovered().entries.back().slot(), next);
}

TEST_F(LogStoreTest, ASecondStoreOnTheSameDirectoryIsRefused) {
  std::unique_ptr<LogStore> store = MustOpen(dir_);
  absl::StatusOr<std::unique_ptr<LogStore>> second = LogStore::Open(dir_);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  store.reset();
  EXPECT_TRUE(LogStore::Open(dir_).ok());
}

TEST_F(LogStoreTest, WithoutFsyncTheLogIsStillWrittenAtEachSync) {
  {
    std::unique_ptr<LogStore> store = MustOpen(dir_, {.fsync = false, .after_log_fsync = nullptr});
    WriteTwoBatches(*store);
  }
  std::unique_ptr<LogStore> store = MustOpen(dir_, {.fsync = false, .after_log_fsync = nullptr});
  EXPECT_EQ(store->recovered().hard_state.promised().round(), 4u);
}

TEST_F(LogStoreTest, OpeningAFileAsTheDataDirectoryFailsWithTheOsError) {
  WriteFile(dir_ + "/plain", "x");
  absl::StatusOr<std::unique_ptr<LogStore>> store = LogStore::Open(dir_ + "/plain");
  ASSERT_FALSE(store.ok());
  EXPECT_NE(store.status().message().find(dir_ + "/plain"), absl::string_view::npos);
}

// ---------------------------------------------------------------------------------------

using FileDatabaseOpenerTest = TempDirTest;

std::unique_ptr<FileDatabaseOpener> MustCreate(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<FileDatabaseOpener>> opener = FileDatabaseOpener::Create(dir);
  EXPECT_TRUE(opener.ok()) << opener.status();
  return opener.ok() ? std::move(*opener) : nullptr;
}

std::string QueryText(sqlite3* db, const char* sql) {
  sqlite3_stmt* stmt = nullptr;
  std::string out;
  if (sqlite3_prepare_v2(db, sql, -1, &stmt, nullptr) == SQLITE_OK &&
      sqlite3_step(stmt) == SQLITE_ROW && sqlite3_column_text(stmt, 0) != nullptr) {
    out = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
  }
  sqlite3_finalize(stmt);
  return out;
}

void Exec(sqlite3* db, const char* sql) {
  ASSERT_EQ(sqlite3_exec(db, sql, nullptr, nullptr, nullptr), SQLITE_OK) << sqlite3_errmsg(db);
}

TEST_F(FileDatabaseOpenerTest, ADatabaseKeepsItsDataAcrossHandles) {
  std::unique_ptr<FileDatabaseOpener> opener = MustCreate(dir_);
  absl::StatusOr<sqlite3*> db = opener->Open("system", nullptr);
  ASSERT_TRUE(db.ok()) << db.status();
  EXPECT_EQ(QueryText(*db, "PRAGMA journal_mode"), "wal");
  // NORMAL: the log makes writes durable (see "Durability" in file_database_opener.h).
  EXPECT_EQ(QueryText(*db, "PRAGMA synchronous"), "1");
  Exec(*db, "CREATE TABLE t(x); INSERT INTO t VALUES ('kept')");
  EXPECT_EQ(QueryText(*db, "PRAGMA page_size"), "4096");
  ASSERT_EQ(sqlite3_close(*db), SQLITE_OK);
  EXPECT_TRUE(fs::exists(dir_ + "/db/system.sqlite3"));

  db = opener->Open("system", sqlite3_vfs_find(nullptr)->zName);
  ASSERT_TRUE(db.ok()) << db.status();
  EXPECT_EQ(QueryText(*db, "SELECT x FROM t"), "kept");
  ASSERT_EQ(sqlite3_close(*db), SQLITE_OK);
}

TEST_F(FileDatabaseOpenerTest,
       DatabasesAreDiscardedOnlyWhenTheMachineRestartedSinceTheyWereWritten) {
  const std::string boot = dir_ + "/fake_boot_id";
  auto create = [&](const char* boot_id) {
    WriteFile(boot, boot_id);
    absl::StatusOr<std::unique_ptr<FileDatabaseOpener>> opener =
        FileDatabaseOpener::Create(dir_ + "/data", true, boot);
    EXPECT_TRUE(opener.ok()) << opener.status();
    return std::move(*opener);
  };
  {
    std::unique_ptr<FileDatabaseOpener> opener = create("boot-1");
    EXPECT_FALSE(opener->discarded_after_restart());  // a new directory
    absl::StatusOr<sqlite3*> db = opener->Open("a1", nullptr);
    ASSERT_TRUE(db.ok()) << db.status();
    ASSERT_EQ(sqlite3_close(*db), SQLITE_OK);
  }
  {
    std::unique_ptr<FileDatabaseOpener> opener = create("boot-1");  // a process restart
    EXPECT_FALSE(opener->discarded_after_restart());
    EXPECT_EQ(opener->List(), std::vector<std::string>{"a1"});
  }
  {
    std::unique_ptr<FileDatabaseOpener> opener = create("boot-2");  // the machine restarted
    EXPECT_TRUE(opener->discarded_after_restart());
    EXPECT_TRUE(opener->List().empty());
  }
  EXPECT_FALSE(create("boot-2")->discarded_after_restart());
}

TEST_F(FileDatabaseOpenerTest, ListShowsDatabasesSortedAndRemoveDeletesTheirFiles) {
  std::unique_ptr<FileDatabaseOpener> opener = MustCreate(dir_);
  for (const char* id : {"system", "b2", "a1"}) {
    absl::StatusOr<sqlite3*> db = opener->Open(id, nullptr);
    ASSERT_TRUE(db.ok()) << db.status();
    Exec(*db, "CREATE TABLE t(x)");
    ASSERT_EQ(sqlite3_close(*db), SQLITE_OK);
  }
  WriteFile(dir_ + "/db/notes.txt", "not a database");
  EXPECT_EQ(opener->List(), (std::vector<std::string>{"a1", "b2", "system"}));

  absl::StatusOr<sqlite3*> open_wal = opener->Open("b2", nullptr);  // leaves -wal and -shm
  ASSERT_TRUE(open_wal.ok());
  Exec(*open_wal, "INSERT INTO t VALUES (1)");
  ASSERT_TRUE(fs::exists(dir_ + "/db/b2.sqlite3-wal"));
  ASSERT_EQ(sqlite3_close(*open_wal), SQLITE_OK);
  ASSERT_TRUE(opener->Remove("b2").ok());
  EXPECT_EQ(opener->List(), (std::vector<std::string>{"a1", "system"}));
  for (const char* suffix : {"", "-wal", "-shm", "-journal"}) {
    EXPECT_FALSE(fs::exists(dir_ + "/db/b2.sqlite3" + suffix)) << suffix;
  }
  EXPECT_TRUE(opener->Remove("b2").ok());  // already gone
  EXPECT_TRUE(opener->Remove("never-existed").ok());
  // The files were moved to the trash, and are deleted there in the background.
  for (int i = 0; i < 500 && !fs::is_empty(dir_ + "/db/.trash"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(fs::is_empty(dir_ + "/db/.trash"));
}

TEST_F(FileDatabaseOpenerTest, WhatACrashLeftInTheTrashGoesAtTheNextStart) {
  fs::create_directories(dir_ + "/db/.trash");
  WriteFile(dir_ + "/db/.trash/7", "a database being deleted when the process died");
  std::unique_ptr<FileDatabaseOpener> opener = MustCreate(dir_);
  EXPECT_TRUE(fs::is_empty(dir_ + "/db/.trash"));
}

TEST_F(FileDatabaseOpenerTest, ANewDatabaseDoesNotReplayAStaleWalLeftByACrash) {
  std::unique_ptr<FileDatabaseOpener> opener = MustCreate(dir_);
  std::string path = dir_ + "/db/d.sqlite3";
  absl::StatusOr<sqlite3*> db = opener->Open("d", nullptr);
  ASSERT_TRUE(db.ok());
  Exec(*db, "CREATE TABLE old(x); INSERT INTO old VALUES (1)");
  std::string wal = ReadFile(path + "-wal");
  ASSERT_FALSE(wal.empty());
  ASSERT_EQ(sqlite3_close(*db), SQLITE_OK);
  // A crash between unlinking the database and its WAL.
  ASSERT_TRUE(opener->Remove("d").ok());
  WriteFile(path + "-wal", wal);

  db = opener->Open("d", nullptr);
  ASSERT_TRUE(db.ok()) << db.status();
  EXPECT_EQ(QueryText(*db, "SELECT count(*) FROM sqlite_schema"), "0");
  ASSERT_EQ(sqlite3_close(*db), SQLITE_OK);
}

TEST_F(FileDatabaseOpenerTest, BadFileIdsAreRejectedAndCreateNothing) {
  std::unique_ptr<FileDatabaseOpener> opener = MustCreate(dir_);
  for (const std::string& id :
       {std::string(""), std::string("../escape"), std::string("a/b"), std::string("a.b"),
        std::string("nul\0x", 5), std::string(81, 'a')}) {
    absl::StatusOr<sqlite3*> db = opener->Open(id, nullptr);
    ASSERT_FALSE(db.ok()) << id;
    EXPECT_EQ(db.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(opener->Remove(id).code(), absl::StatusCode::kInvalidArgument);
  }
  // Only the trash's directory is there.
  for (const auto& f : fs::directory_iterator(dir_ + "/db")) {
    EXPECT_EQ(f.path().filename(), ".trash");
  }
  EXPECT_FALSE(fs::exists(dir_ + "/escape.sqlite3"));
  absl::StatusOr<sqlite3*> longest = opener->Open(std::string(80, 'a'), nullptr);
  ASSERT_TRUE(longest.ok()) << longest.status();
  ASSERT_EQ(sqlite3_close(*longest), SQLITE_OK);
}

TEST_F(FileDatabaseOpenerTest, AnUnknownVfsIsRejected) {
  std::unique_ptr<FileDatabaseOpener> opener = MustCreate(dir_);
  absl::StatusOr<sqlite3*> db = opener->Open("system", "no-such-vfs");
  ASSERT_FALSE(db.ok());
  EXPECT_EQ(db.status().code(), absl::StatusCode::kInvalidArgument);
}

Value ExecEntry(std::string_view database, std::string_view sql) {
  Value value;
  Command* command = value.add_requests()->mutable_command();
  command->mutable_execute()->set_database(std::string(database));
  command->mutable_execute()->add_statements()->set_sql(std::string(sql));
  return value;
}

std::string CountRows(StateMachine& sm) {
  absl::StatusOr<std::unique_ptr<DatabaseReader>> reader = sm.AcquireReader("d");
  EXPECT_TRUE(reader.ok()) << reader.status();
  if (!reader.ok()) return "";
  Statement count;
  count.set_sql("SELECT count(*) FROM t");
  absl::StatusOr<StatementResult> rows = (*reader)->Query(count);
  sm.ReleaseReader(*std::move(reader));
  EXPECT_TRUE(rows.ok()) << rows.status();
  return rows.ok() ? rows->rows(0).values(0).ShortDebugString() : "";
}

TEST_F(FileDatabaseOpenerTest, ReadersSeeEveryAppliedEntryAndHoldBackNoCheckpoint) {
  // Readers of WAL files keep their read transaction between queries while nothing is
  // applied; each applied entry ends them, so they see it and let checkpoints through.
  std::unique_ptr<FileDatabaseOpener> opener = MustCreate(dir_);
  absl::StatusOr<std::unique_ptr<StateMachine>> sm = StateMachine::Open(opener.get());
  ASSERT_TRUE(sm.ok()) << sm.status();
  Value create;
  create.add_requests()->mutable_command()->mutable_create_database()->set_name("d");
  uint64_t slot = 0;
  (*sm)->Apply(++slot, create);
  (*sm)->Apply(++slot, ExecEntry("d", "CREATE TABLE t(x)"));
  const std::string wal = dir_ + "/db/" + DatabaseFileId("d") + ".sqlite3-wal";
  uintmax_t largest_wal = 0;
  for (int k = 0; k < 1500; ++k) {  // about 15 MB: several times the checkpoint size
    ASSERT_EQ(CountRows(**sm), absl::StrCat("integer: ", k)) << k;
    ASSERT_EQ(CountRows(**sm), absl::StrCat("integer: ", k)) << "the same, read again";
    (*sm)->Apply(++slot, ExecEntry("d", "INSERT INTO t VALUES (randomblob(10000))"));
    largest_wal = std::max(largest_wal, fs::file_size(wal));
  }
  // The WAL is checkpointed from 1000 pages on (on the opener's checkpointer thread, not in
  // the commits, so it may run a little past them) and then written from its start again: a
  // reader left holding an old transaction would have made it grow to the whole 15 MB.
  EXPECT_LT(largest_wal, 10u << 20);
  EXPECT_GT(opener->checkpoints(), 0u);
  EXPECT_EQ(opener->commit_checkpoints(), 0u) << "the checkpointer kept up with no commit";

  // A reader handed out before an entry applied (a query on a worker) and used after it
  // reads the newer state, and comes back without holding it for the next reader.
  absl::StatusOr<std::unique_ptr<DatabaseReader>> out = (*sm)->AcquireReader("d");
  ASSERT_TRUE(out.ok());
  (*sm)->Apply(++slot, ExecEntry("d", "INSERT INTO t VALUES (1)"));
  Statement count;
  count.set_sql("SELECT count(*) FROM t");
  absl::StatusOr<StatementResult> rows = (*out)->Query(count);
  ASSERT_TRUE(rows.ok());
  EXPECT_EQ(rows->rows(0).values(0).integer(), 1501);
  (*sm)->ReleaseReader(*std::move(out));
  (*sm)->Apply(++slot, ExecEntry("d", "INSERT INTO t VALUES (2)"));
  EXPECT_EQ(CountRows(**sm), "integer: 1502");
}

}  // namespace
}  // namespace synod

#include "core/log_codec.h"

#include <gtest/gtest.h>

namespace synod {
namespace {

Ready SomeReady(uint64_t slot, uint64_t round) {
  Ready r;
  HardState hs;
  hs.mutable_promised()->set_round(round);
  hs.mutable_promised()->set_replica_id(1);
  hs.set_max_round_used(round);
  r.hard_state = hs;
  LogEntry e;
  e.set_slot(slot);
  *e.mutable_ballot() = hs.promised();
  e.mutable_value()->set_noop(true);
  r.entries.push_back(e);
  r.must_sync = true;
  return r;
}

std::string TwoSyncedReadys() {
  return EncodeReady(SomeReady(1, 3)) + EncodeSyncMark(2) + EncodeReady(SomeReady(2, 4)) +
         EncodeSyncMark(4);
}

TEST(LogCodec, RecoversWhatWasWritten) {
  absl::StatusOr<RecoveredLog> got = RecoverLog(TwoSyncedReadys());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE(got->torn_tail);
  EXPECT_EQ(got->state.hard_state.promised().round(), 4u);
  ASSERT_EQ(got->state.entries.size(), 2u);
  EXPECT_EQ(got->state.entries[1].slot(), 2u);
  EXPECT_EQ(got->valid_bytes, TwoSyncedReadys().size());
}

TEST(LogCodec, ATornLastRecordIsDroppedNotReportedAsCorruption) {
  std::string log = TwoSyncedReadys();
  std::string torn = log + EncodeReady(SomeReady(3, 5)).substr(0, 9);
  absl::StatusOr<RecoveredLog> got = RecoverLog(torn);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->torn_tail);
  EXPECT_EQ(got->valid_bytes, log.size());
  EXPECT_EQ(got->state.entries.size(), 2u);
}

TEST(LogCodec, ACorruptRecordFollowedByValidOnesIsDataLoss) {
  std::string log = TwoSyncedReadys();
  log[20] ^= 0x40;  // inside the first record's payload
  absl::StatusOr<RecoveredLog> got = RecoverLog(log);
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss);
}

TEST(LogCodec, CompactionDropsEntriesUpToTheSnapshot) {
  Ready snap;
  snap.snapshot = SnapshotToInstall{};
  snap.snapshot->meta.set_index(1);
  snap.snapshot->meta.set_size_bytes(3);
  snap.snapshot->data = "abc";
  snap.compacted_through = 1;
  absl::StatusOr<RecoveredLog> got = RecoverLog(TwoSyncedReadys() + EncodeReady(snap));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->state.snapshot_meta.index(), 1u);
  EXPECT_EQ(got->state.snapshot_data, "abc");
  ASSERT_EQ(got->state.entries.size(), 1u);
  EXPECT_EQ(got->state.entries[0].slot(), 2u);
}

}  // namespace
}  // namespace synod

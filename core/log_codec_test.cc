#include "core/log_codec.h"

#include <gtest/gtest.h>

#include "core/driver.h"

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

// Appends `ready` and its sync mark to `log`, as a host's Sync() does.
void AppendSynced(std::string* log, const Ready& ready) {
  *log += EncodeReady(ready);
  *log += EncodeSyncMark(0, log->size());
}

std::string TwoSyncedReadys() {
  std::string log;
  AppendSynced(&log, SomeReady(1, 3));
  AppendSynced(&log, SomeReady(2, 4));
  return log;
}

// The frame header's u32 payload length of the record at `offset`.
void SetFrameLength(std::string* log, size_t offset, uint32_t length) {
  for (int i = 0; i < 4; ++i) (*log)[offset + i] = static_cast<char>(length >> (8 * i));
}

uint32_t FrameLength(const std::string& log, size_t offset) {
  uint32_t length = 0;
  for (int i = 0; i < 4; ++i) {
    length |= static_cast<uint32_t>(static_cast<unsigned char>(log[offset + i])) << (8 * i);
  }
  return length;
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

TEST(LogCodec, ALengthDamagedToRunPastTheEndIsDataLossNotATornTail) {
  // The first record now seems cut short by the end of the log. The synced mark beyond it
  // shows it is not a torn write.
  std::string log = TwoSyncedReadys();
  SetFrameLength(&log, 0, FrameLength(log, 0) | 0x00100000);
  absl::StatusOr<RecoveredLog> got = RecoverLog(log);
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss);
}

TEST(LogCodec, ALengthDamagedToEndEarlyIsDataLoss) {
  // The first record's checksum now fails, and the next frame starts in the wrong place.
  std::string log = TwoSyncedReadys();
  SetFrameLength(&log, 0, FrameLength(log, 0) - 1);
  absl::StatusOr<RecoveredLog> got = RecoverLog(log);
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss);
}

TEST(LogCodec, DamageToTheLastMarkLosesNoSyncedRecord) {
  std::string log;
  AppendSynced(&log, SomeReady(1, 3));
  log += EncodeReady(SomeReady(2, 4));
  const size_t state_bytes = log.size();
  log += EncodeSyncMark(0, state_bytes);
  log[log.size() - 1] ^= 0x01;
  absl::StatusOr<RecoveredLog> got = RecoverLog(log);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->torn_tail);
  EXPECT_EQ(got->valid_bytes, state_bytes);
  EXPECT_EQ(got->state.hard_state.promised().round(), 4u);
  EXPECT_EQ(got->state.entries.size(), 2u);
}

TEST(LogCodec, AMarkInsideAClientsPayloadDoesNotTurnATornWriteIntoDataLoss) {
  // A client can put any bytes in a request, a well-formed mark among them. Torn after
  // that copy, the write is still a torn tail: the copy does not sit at the offset it names.
  std::string log = TwoSyncedReadys();
  Ready ready = SomeReady(3, 5);
  ready.hard_state.reset();
  Command* command = ready.entries[0].mutable_value()->add_requests()->mutable_command();
  std::string fake_marks;
  for (uint64_t at = 0; at < 4096; ++at) fake_marks += EncodeSyncMark(9, at);
  command->mutable_create_database()->set_image(fake_marks);
  std::string torn = log + EncodeReady(ready);
  torn.resize(torn.size() - 10);
  absl::StatusOr<RecoveredLog> got = RecoverLog(torn);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->torn_tail);
  EXPECT_EQ(got->valid_bytes, log.size());
}

TEST(LogCodec, CompactionDropsEntriesUpToTheSnapshot) {
  const std::string log = TwoSyncedReadys() + EncodeReady(SnapshotReady(SnapshotMetaOf(1, "abc")));
  absl::StatusOr<RecoveredLog> got = RecoverLog(log);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->state.snapshot_meta.index(), 1u);
  EXPECT_EQ(got->state.snapshot_meta.checksum(), SnapshotChecksum("abc"));
  EXPECT_TRUE(got->legacy_snapshot_data.empty());
  ASSERT_EQ(got->state.entries.size(), 1u);
  EXPECT_EQ(got->state.entries[0].slot(), 2u);
}

TEST(LogCodec, ASnapshotRecordHoldsItsMetadataOnly) {
  std::string image(100'000, 'x');
  EXPECT_LT(EncodeReady(SnapshotReady(SnapshotMetaOf(1, image))).size(), 200u);
}

// Versions before snapshot stores wrote the image into the record (without a checksum at
// first): recovery hands it to the host, which moves it to its store.
TEST(LogCodec, AnImageInAnOlderSnapshotRecordIsRecovered) {
  StorageRecord record;
  record.mutable_snapshot()->set_index(1);
  record.mutable_snapshot()->set_size_bytes(3);
  record.set_snapshot_data("abc");
  absl::StatusOr<RecoveredLog> got = RecoverLog(TwoSyncedReadys() + EncodeRecord(record));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->legacy_snapshot_data, "abc");
  EXPECT_EQ(got->state.snapshot_meta.checksum(), 0u);

  record.set_snapshot_data("abcd");  // not the declared size
  EXPECT_TRUE(absl::IsDataLoss(RecoverLog(TwoSyncedReadys() + EncodeRecord(record)).status()));
}

}  // namespace
}  // namespace synod

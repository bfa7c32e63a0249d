#include "adapters/snapshot_files.h"

#include <stdlib.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace synod {
namespace {

namespace fs = std::filesystem;

class SnapshotFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* base = std::getenv("TEST_TMPDIR");
    std::string pattern =
        std::string(base != nullptr ? base : "/tmp") + "/snapshot_files_test.XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern + "/snapshots";
    Reopen();
  }
  void TearDown() override {
    files_.reset();
    fs::remove_all(fs::path(dir_).parent_path());
  }
  void Reopen() {
    files_.reset();
    absl::StatusOr<std::unique_ptr<SnapshotFiles>> opened = SnapshotFiles::Open(dir_, true);
    ASSERT_TRUE(opened.ok()) << opened.status();
    files_ = std::move(*opened);
  }
  std::vector<std::string> Files() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir_)) {
      if (entry.is_regular_file()) names.push_back(entry.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  }
  // Sends `image` to the store in chunks of `chunk` bytes, as the driver does.
  void ReceiveWhole(const SnapshotMeta& meta, const std::string& image, size_t chunk) {
    for (size_t offset = 0; offset < image.size(); offset += chunk) {
      files_->Receive(meta, offset, std::string_view(image).substr(offset, chunk));
    }
  }

  std::string dir_;
  std::unique_ptr<SnapshotFiles> files_;
};

TEST_F(SnapshotFilesTest, AnOwnImageIsKeptUnderItsIndexAndChecksumAndReadInChunks) {
  const std::string image = "the image of revision 7";
  absl::StatusOr<SnapshotMeta> meta = files_->Write(7, image);
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_EQ(meta->index(), 7u);
  EXPECT_EQ(meta->size_bytes(), image.size());
  EXPECT_EQ(meta->checksum(), SnapshotChecksum(image));
  EXPECT_TRUE(files_->Verify(*meta).ok());
  EXPECT_EQ(Files(), std::vector<std::string>{fs::path(files_->PathOf(*meta)).filename()});
  EXPECT_EQ(*files_->ReadChunk(*meta, 0, 8), "the imag");
  EXPECT_EQ(*files_->ReadChunk(*meta, 16, 100), "ision 7") << "short only at the end";
  EXPECT_EQ(*files_->ReadImage(*meta), image);
  SnapshotMeta other = *meta;
  other.set_checksum(other.checksum() + 1);
  EXPECT_TRUE(absl::IsNotFound(files_->ReadChunk(other, 0, 8).status()));
  EXPECT_FALSE(files_->Verify(other).ok());
}

TEST_F(SnapshotFilesTest, AnImageReceivedInChunksIsKeptOnlyWhenItsBytesMatchItsChecksum) {
  const std::string image(10'000, 'x');
  const SnapshotMeta meta = SnapshotMetaOf(5, image);
  ReceiveWhole(meta, image, 999);
  ASSERT_TRUE(files_->Seal(meta).ok());
  EXPECT_EQ(*files_->ReadImage(meta), image);

  // Two images spliced: the first half of one, the rest of another of the same size.
  std::string other(10'000, 'y');
  const SnapshotMeta other_meta = SnapshotMetaOf(6, other);
  files_->Receive(other_meta, 0, other.substr(0, 5'000));
  files_->Receive(other_meta, 5'000, image.substr(5'000));
  absl::Status sealed = files_->Seal(other_meta);
  EXPECT_TRUE(absl::IsDataLoss(sealed)) << sealed;
  EXPECT_FALSE(files_->Verify(other_meta).ok());
  EXPECT_EQ(Files().size(), 1u) << "a refused image left a file behind";

  // Sealing what is not being received fails too.
  EXPECT_FALSE(files_->Seal(other_meta).ok());
}

TEST_F(SnapshotFilesTest, AChunkAtOffsetZeroStartsTheImageOver) {
  const std::string image = "abcdefgh";
  const SnapshotMeta meta = SnapshotMetaOf(3, image);
  files_->Receive(meta, 0, "abcd");
  files_->Receive(meta, 0, "abcd");
  files_->Receive(meta, 4, "efgh");
  EXPECT_TRUE(files_->Seal(meta).ok());
  EXPECT_EQ(*files_->ReadImage(meta), image);
}

TEST_F(SnapshotFilesTest, WhatIsRemovedInTheBackgroundIsGoneByTheNextOpen) {
  absl::StatusOr<SnapshotMeta> old_meta = files_->Write(1, std::string(1 << 20, 'o'));
  absl::StatusOr<SnapshotMeta> new_meta = files_->Write(2, "two");
  ASSERT_TRUE(old_meta.ok() && new_meta.ok());
  absl::StatusOr<std::string> stage = files_->EmptyStageDir("install");
  ASSERT_TRUE(stage.ok()) << stage.status();
  std::ofstream(*stage + "/copy.sqlite3") << "a copy";
  files_->Retain(*new_meta);
  files_->RemoveStageDir("install");
  EXPECT_FALSE(fs::exists(files_->PathOf(*old_meta))) << "moved away at once";
  EXPECT_FALSE(fs::exists(*stage));
  Reopen();  // waits for the deleter, or removes what it left
  EXPECT_TRUE(fs::is_empty(dir_ + "/trash"));
  EXPECT_TRUE(files_->Verify(*new_meta).ok());
}

TEST_F(SnapshotFilesTest, RetainRemovesEveryOtherImageButNotOneBeingReceived) {
  absl::StatusOr<SnapshotMeta> old_meta = files_->Write(1, "one");
  absl::StatusOr<SnapshotMeta> new_meta = files_->Write(2, "two");
  ASSERT_TRUE(old_meta.ok() && new_meta.ok());
  const SnapshotMeta incoming = SnapshotMetaOf(9, "nine");
  files_->Receive(incoming, 0, "ni");
  files_->Retain(*new_meta);
  EXPECT_FALSE(files_->Verify(*old_meta).ok());
  EXPECT_TRUE(files_->Verify(*new_meta).ok());
  files_->Receive(incoming, 2, "ne");
  EXPECT_TRUE(files_->Seal(incoming).ok());
  EXPECT_TRUE(files_->Verify(incoming).ok());
}

TEST_F(SnapshotFilesTest, WhatACrashLeftHalfWrittenIsRemovedAtOpen) {
  absl::StatusOr<SnapshotMeta> kept = files_->Write(4, "four");
  ASSERT_TRUE(kept.ok());
  files_->Receive(SnapshotMetaOf(8, "eight"), 0, "eig");
  std::ofstream(dir_ + "/own.tmp") << "half";
  Reopen();
  EXPECT_EQ(Files(), std::vector<std::string>{fs::path(files_->PathOf(*kept)).filename()});
  EXPECT_EQ(*files_->ReadImage(*kept), "four");
}

TEST_F(SnapshotFilesTest, AnImageFromAnOlderLogIsAdoptedOnlyUnderItsOwnChecksum) {
  const SnapshotMeta meta = SnapshotMetaOf(12, "legacy");
  SnapshotMeta wrong = meta;
  wrong.set_checksum(meta.checksum() ^ 1);
  EXPECT_TRUE(absl::IsDataLoss(files_->Adopt(wrong, "legacy")));
  ASSERT_TRUE(files_->Adopt(meta, "legacy").ok());
  EXPECT_EQ(*files_->ReadImage(meta), "legacy");
}

TEST_F(SnapshotFilesTest, ADamagedImageFileIsNotReadAsTheImage) {
  absl::StatusOr<SnapshotMeta> meta = files_->Write(4, "four");
  ASSERT_TRUE(meta.ok());
  std::ofstream(files_->PathOf(*meta), std::ios::binary | std::ios::trunc) << "fouR";
  EXPECT_TRUE(absl::IsDataLoss(files_->ReadImage(*meta).status()));
  EXPECT_TRUE(absl::IsDataLoss(files_->Verify(*meta)));
}

}  // namespace
}  // namespace synod

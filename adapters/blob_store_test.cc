#include "adapters/blob_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "gtest/gtest.h"

namespace synod {
namespace {

// SHA-256 of "hello world" and of nothing (FIPS 180-2 test vectors, as `sha256sum` prints).
constexpr char kHelloWorld[] = "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
constexpr char kEmpty[] = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

std::string FreshDir(const std::string& name) {
  const std::string dir = std::string(std::getenv("TEST_TMPDIR")) + "/" + name;
  std::string command = "rm -rf '" + dir + "'";
  EXPECT_EQ(std::system(command.c_str()), 0);
  return dir;
}

int CountFiles(const std::string& dir) {
  std::string command = "test $(find '" + dir + "' -type f | wc -l) -eq ";
  for (int n = 0; n < 100; ++n) {
    if (std::system((command + std::to_string(n)).c_str()) == 0) return n;
  }
  return -1;
}

TEST(BlobStore, Sha256HexIsTheStandardDigest) {
  EXPECT_EQ(Sha256Hex("hello world"), kHelloWorld);
  EXPECT_EQ(Sha256Hex(""), kEmpty);
}

TEST(BlobStore, IsSha256HexTakesOnly64LowerCaseHexDigits) {
  EXPECT_TRUE(IsSha256Hex(kHelloWorld));
  EXPECT_FALSE(IsSha256Hex(std::string(kHelloWorld).substr(1)));
  std::string upper = kHelloWorld;
  upper[0] = 'B';
  EXPECT_FALSE(IsSha256Hex(upper));
  EXPECT_FALSE(IsSha256Hex("../" + std::string(61, 'a')));
  EXPECT_FALSE(IsSha256Hex(std::string(63, 'a') + '\0'));
}

TEST(BlobStore, AWrittenBlobIsStoredUnderItsHashInPieces) {
  const std::string dir = FreshDir("store");
  auto store = BlobStore::Open(dir, /*fsync=*/true);
  ASSERT_TRUE(store.ok()) << store.status();
  auto writer = (*store)->NewWriter();
  ASSERT_TRUE(writer.ok()) << writer.status();
  ASSERT_TRUE((*writer)->Append("hello").ok());
  ASSERT_TRUE((*writer)->Append(" world").ok());
  EXPECT_EQ((*writer)->size(), 11u);
  absl::StatusOr<std::string> sha = (*writer)->Commit();
  ASSERT_TRUE(sha.ok()) << sha.status();
  EXPECT_EQ(*sha, kHelloWorld);
  EXPECT_EQ((*store)->PathOf(*sha),
            dir + "/b9/4d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9");
  std::optional<BlobInfo> info = (*store)->Stat(*sha);
  ASSERT_TRUE(info);
  EXPECT_EQ(info->size_bytes, 11u);
  absl::StatusOr<int> fd = (*store)->OpenForReading(*sha);
  ASSERT_TRUE(fd.ok());
  char buffer[32] = {};
  EXPECT_EQ(read(*fd, buffer, sizeof(buffer)), 11);
  close(*fd);
  EXPECT_EQ(std::string(buffer), "hello world");
  // Nothing is left in tmp/.
  EXPECT_EQ(CountFiles(dir + "/tmp"), 0);

  // An empty blob is a blob too.
  auto empty = (*store)->NewWriter();
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(*(*empty)->Commit(), kEmpty);

  absl::StatusOr<std::vector<BlobInfo>> listed = (*store)->List();
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->size(), 2u);
}

TEST(BlobStore, AHashThatDoesNotMatchStoresNothing) {
  const std::string dir = FreshDir("mismatch");
  auto store = BlobStore::Open(dir, /*fsync=*/false);
  ASSERT_TRUE(store.ok());
  auto writer = (*store)->NewWriter();
  ASSERT_TRUE((*writer)->Append("hello world!").ok());
  absl::StatusOr<std::string> sha = (*writer)->Commit(kHelloWorld);
  EXPECT_TRUE(absl::IsInvalidArgument(sha.status())) << sha.status();
  EXPECT_FALSE((*store)->Stat(kHelloWorld));
  EXPECT_EQ(CountFiles(dir), 0);
  // A spent writer only fails.
  EXPECT_FALSE((*writer)->Append("more").ok());
}

TEST(BlobStore, AWriterDroppedUncommittedLeavesNothingAndOpenClearsWhatACrashLeft) {
  const std::string dir = FreshDir("dropped");
  {
    auto store = BlobStore::Open(dir, /*fsync=*/false);
    ASSERT_TRUE(store.ok());
    auto writer = (*store)->NewWriter();
    ASSERT_TRUE((*writer)->Append("partial").ok());
    EXPECT_EQ(CountFiles(dir + "/tmp"), 1);
  }
  EXPECT_EQ(CountFiles(dir + "/tmp"), 0);
  // A crash mid-write leaves a temporary file: the next Open removes it.
  const int fd = open((dir + "/tmp/123.4").c_str(), O_WRONLY | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  close(fd);
  auto store = BlobStore::Open(dir, /*fsync=*/false);
  ASSERT_TRUE(store.ok());
  EXPECT_EQ(CountFiles(dir), 0);
}

TEST(BlobStore, StoringTheSameBytesTwiceKeepsOneTouchedAndRemoveUnlinks) {
  const std::string dir = FreshDir("twice");
  auto store = BlobStore::Open(dir, /*fsync=*/false);
  ASSERT_TRUE(store.ok());
  for (int i = 0; i < 2; ++i) {
    auto writer = (*store)->NewWriter();
    ASSERT_TRUE((*writer)->Append("hello world").ok());
    ASSERT_TRUE((*writer)->Commit(kHelloWorld).ok());
  }
  EXPECT_EQ(CountFiles(dir), 1);
  // An old blob is made young by Touch.
  struct timespec old_times[2] = {{1000, 0}, {1000, 0}};
  ASSERT_EQ(utimensat(AT_FDCWD, (*store)->PathOf(kHelloWorld).c_str(), old_times, 0), 0);
  EXPECT_EQ((*store)->Stat(kHelloWorld)->modified_unix_ms, 1'000'000);
  ASSERT_TRUE((*store)->Touch(kHelloWorld).ok());
  EXPECT_GT((*store)->Stat(kHelloWorld)->modified_unix_ms, 1'000'000'000'000);
  // A reader keeps its bytes after Remove.
  absl::StatusOr<int> fd = (*store)->OpenForReading(kHelloWorld);
  ASSERT_TRUE(fd.ok());
  ASSERT_TRUE((*store)->Remove(kHelloWorld).ok());
  EXPECT_FALSE((*store)->Stat(kHelloWorld));
  EXPECT_TRUE(absl::IsNotFound((*store)->OpenForReading(kHelloWorld).status()));
  EXPECT_TRUE(absl::IsNotFound((*store)->Touch(kHelloWorld)));
  char buffer[16] = {};
  EXPECT_EQ(pread(*fd, buffer, sizeof(buffer), 0), 11);
  close(*fd);
  EXPECT_TRUE((*store)->Remove(kHelloWorld).ok()) << "removing an absent blob is not an error";
}

TEST(BlobStore, CollectionRemovesOnlyOldUnpinnedBlobsThroughTheTrash) {
  const std::string dir = FreshDir("collect");
  auto store = BlobStore::Open(dir, /*fsync=*/false);
  ASSERT_TRUE(store.ok());
  auto writer = (*store)->NewWriter();
  ASSERT_TRUE((*writer)->Append("hello world").ok());
  ASSERT_TRUE((*writer)->Commit().ok());
  const int64_t now_ms = (*store)->Stat(kHelloWorld)->modified_unix_ms;
  // Young: spared.
  EXPECT_FALSE((*store)->RemoveIfUnused(kHelloWorld, now_ms - 1000));
  // Old but pinned: spared, and pinning made it young.
  ASSERT_TRUE((*store)->Pin(kHelloWorld));
  EXPECT_FALSE((*store)->RemoveIfUnused(kHelloWorld, now_ms + 60'000));
  (*store)->Unpin(kHelloWorld);
  EXPECT_TRUE((*store)->Keep(kHelloWorld));
  // Old and unpinned: removed, and nothing is left in the trash.
  EXPECT_TRUE((*store)->RemoveIfUnused(kHelloWorld, now_ms + 60'000));
  EXPECT_FALSE((*store)->Stat(kHelloWorld));
  EXPECT_EQ(CountFiles(dir), 0);
  EXPECT_FALSE((*store)->RemoveIfUnused(kHelloWorld, now_ms + 60'000));
  EXPECT_FALSE((*store)->Keep(kHelloWorld));
  EXPECT_FALSE((*store)->Pin(kHelloWorld)) << "pinning an absent blob says so";
  (*store)->Unpin(kHelloWorld);
  // What a crash left in the trash goes at the next Open.
  const int fd = open((dir + "/trash/7").c_str(), O_WRONLY | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  close(fd);
  ASSERT_TRUE(BlobStore::Open(dir, /*fsync=*/false).ok());
  EXPECT_EQ(CountFiles(dir), 0);
}

TEST(BlobStore, CopyOutCopiesAStoredBlobCheckingItsHash) {
  const std::string dir = FreshDir("copy-out");
  auto store = BlobStore::Open(dir, /*fsync=*/false);
  ASSERT_TRUE(store.ok()) << store.status();
  std::string bytes(3 << 20, 'x');  // more than one piece
  bytes[12345] = 'y';
  auto writer = (*store)->NewWriter();
  ASSERT_TRUE(writer.ok());
  ASSERT_TRUE((*writer)->Append(bytes).ok());
  absl::StatusOr<std::string> sha = (*writer)->Commit();
  ASSERT_TRUE(sha.ok());
  const std::string copy = std::string(std::getenv("TEST_TMPDIR")) + "/copy";
  ASSERT_TRUE((*store)->CopyOut(*sha, copy).ok());
  std::string command = "cmp -s '" + copy + "' '" + (*store)->PathOf(*sha) + "'";
  EXPECT_EQ(std::system(command.c_str()), 0);

  EXPECT_TRUE(absl::IsNotFound((*store)->CopyOut(kHelloWorld, copy + "2")));
  EXPECT_NE(access((copy + "2").c_str(), F_OK), 0);

  // Damaged on disk: refused, and no copy left behind.
  const int fd = open((*store)->PathOf(*sha).c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(pwrite(fd, "z", 1, 2 << 20), 1);
  close(fd);
  absl::Status damaged = (*store)->CopyOut(*sha, copy + "3");
  EXPECT_TRUE(absl::IsDataLoss(damaged)) << damaged;
  EXPECT_NE(access((copy + "3").c_str(), F_OK), 0);
}

}  // namespace
}  // namespace synod

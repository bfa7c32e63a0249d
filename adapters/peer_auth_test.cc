#include "adapters/peer_auth.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

namespace synod {
namespace {

const std::string kSecret = "0123456789abcdef0123456789abcdef-cluster-A";
const std::string kOtherSecret = "0123456789abcdef0123456789abcdef-cluster-B";
constexpr uint32_t kFrom = 2;
constexpr uint32_t kTo = 3;

bool IsRefusal(const absl::Status& status) {
  return status.code() == absl::StatusCode::kInvalidArgument ||
         status.code() == absl::StatusCode::kUnauthenticated ||
         status.code() == absl::StatusCode::kPermissionDenied;
}

std::string HmacSha256(std::string_view key, std::string_view data) {
  unsigned char tag[32];
  unsigned int tag_bytes = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
       reinterpret_cast<const unsigned char*>(data.data()), data.size(), tag, &tag_bytes);
  return std::string(reinterpret_cast<const char*>(tag), tag_bytes);
}

TEST(PeerAuth, ASealedFrameOpensWithItsSenderSequenceAndPayload) {
  PeerAuthenticator auth(kSecret);
  std::string frame = auth.Seal(kFrom, kTo, 0x0123456789abcdefull, "a message batch");
  EXPECT_EQ(frame.size(), PeerAuthenticator::kOverheadBytes + 15);
  absl::StatusOr<OpenedFrame> opened = auth.Open(frame, kTo);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(opened->from_id, kFrom);
  EXPECT_EQ(opened->sequence, 0x0123456789abcdefull);
  EXPECT_EQ(opened->payload, "a message batch");
}

TEST(PeerAuth, AFrameWithAnEmptyPayloadOpens) {
  PeerAuthenticator auth(kSecret);
  absl::StatusOr<OpenedFrame> opened = auth.Open(auth.Seal(kFrom, kTo, 7, ""), kTo);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_TRUE(opened->payload.empty());
}

TEST(PeerAuth, AReplicaSealedWithTheSameSecretOpensTheFrame) {
  PeerAuthenticator sender(kSecret);
  PeerAuthenticator receiver(kSecret);
  EXPECT_TRUE(receiver.Open(sender.Seal(kFrom, kTo, 1, "x"), kTo).ok());
}

// Pins the documented wire format, and that the MAC key is derived from the secret rather
// than the secret itself.
TEST(PeerAuth, TheFrameLayoutIsTheDocumentedOneWithADerivedKey) {
  PeerAuthenticator auth(kSecret);
  std::string frame = auth.Seal(0x04030201, 0x08070605, 0x100f0e0d0c0b0a09ull, "pay");
  std::string header = std::string("SYN1") + std::string("\x01\x02\x03\x04", 4) +
                       std::string("\x05\x06\x07\x08", 4) +
                       std::string("\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10", 8) +
                       std::string("\x03\x00\x00\x00\x00\x00\x00\x00", 8);
  ASSERT_EQ(header.size(), PeerAuthenticator::kHeaderBytes);
  std::string mac_key = HmacSha256(kSecret, "synod peer v1");
  EXPECT_EQ(frame, header + "pay" + HmacSha256(mac_key, header + "pay"));
  EXPECT_NE(frame.substr(frame.size() - 32), HmacSha256(kSecret, header + "pay"));
}

TEST(PeerAuth, AFlippedBitAnywhereInTheFrameIsRefused) {
  PeerAuthenticator auth(kSecret);
  const std::string frame = auth.Seal(kFrom, kTo, 42, "payload bytes");
  const size_t payload_end = PeerAuthenticator::kHeaderBytes + 13;
  for (size_t byte = 0; byte < frame.size(); ++byte) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string corrupted = frame;
      corrupted[byte] = static_cast<char>(corrupted[byte] ^ (1 << bit));
      absl::StatusOr<OpenedFrame> opened = auth.Open(corrupted, kTo);
      ASSERT_FALSE(opened.ok()) << "byte " << byte << " bit " << bit;
      EXPECT_TRUE(IsRefusal(opened.status())) << opened.status();
      bool in_magic = byte < 4;
      bool in_length = byte >= 20 && byte < PeerAuthenticator::kHeaderBytes;
      if (in_magic || in_length) {
        EXPECT_EQ(opened.status().code(), absl::StatusCode::kInvalidArgument)
            << "byte " << byte << " bit " << bit;
      } else {
        // From, to, sequence, payload and the tag itself: caught by the tag.
        EXPECT_EQ(opened.status().code(), absl::StatusCode::kUnauthenticated)
            << "byte " << byte << " bit " << bit << (byte >= payload_end ? " (tag)" : "");
      }
    }
  }
}

TEST(PeerAuth, AFrameSealedWithAnotherSecretIsRefused) {
  PeerAuthenticator ours(kSecret);
  PeerAuthenticator theirs(kOtherSecret);
  absl::StatusOr<OpenedFrame> opened = ours.Open(theirs.Seal(kFrom, kTo, 1, "x"), kTo);
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.status().code(), absl::StatusCode::kUnauthenticated);
}

TEST(PeerAuth, AnAuthenticFrameForAnotherReplicaIsRefused) {
  PeerAuthenticator auth(kSecret);
  std::string frame = auth.Seal(kFrom, kTo, 1, "x");
  absl::StatusOr<OpenedFrame> opened = auth.Open(frame, kTo + 1);
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.status().code(), absl::StatusCode::kPermissionDenied);
  // Reflected back to its sender: refused too.
  EXPECT_EQ(auth.Open(frame, kFrom).status().code(), absl::StatusCode::kPermissionDenied);
}

TEST(PeerAuth, ATruncatedOrExtendedFrameIsRefused) {
  PeerAuthenticator auth(kSecret);
  const std::string frame = auth.Seal(kFrom, kTo, 9, "some payload");
  for (size_t size = 0; size < frame.size(); ++size) {
    absl::StatusOr<OpenedFrame> opened = auth.Open(std::string_view(frame).substr(0, size), kTo);
    ASSERT_FALSE(opened.ok()) << "prefix of " << size << " bytes";
    EXPECT_EQ(opened.status().code(), absl::StatusCode::kInvalidArgument) << size;
  }
  absl::StatusOr<OpenedFrame> extended = auth.Open(frame + "!", kTo);
  ASSERT_FALSE(extended.ok());
  EXPECT_EQ(extended.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PeerAuth, TwoConcatenatedFramesAreRefused) {
  PeerAuthenticator auth(kSecret);
  std::string frame = auth.Seal(kFrom, kTo, 1, "x");
  EXPECT_FALSE(auth.Open(frame + frame, kTo).ok());
}

TEST(PeerSequence, IsStrictlyIncreasingFromTheStartTimeInTheHighBits) {
  PeerSequence sequence(1'700'000'000'000);
  uint64_t first = sequence.Next();
  EXPECT_EQ(first, uint64_t{1'700'000'000'000} << PeerSequence::kCounterBits);
  uint64_t previous = first;
  for (int i = 0; i < 3000; ++i) {
    uint64_t next = sequence.Next();
    EXPECT_GT(next, previous);
    previous = next;
  }
}

TEST(PeerSequence, ASenderRestartedOneMillisecondLaterStartsAboveItsPreviousSequences) {
  PeerSequence before(1'700'000'000'000);
  uint64_t last_before = 0;
  // Fewer than 2^20 frames in the previous incarnation's one millisecond.
  for (int i = 0; i < 100'000; ++i) last_before = before.Next();
  PeerSequence after(1'700'000'000'001);
  uint64_t first_after = after.Next();
  EXPECT_GT(first_after, last_before);

  ReplayWindow window;
  EXPECT_TRUE(window.Admit(last_before).ok());
  EXPECT_TRUE(window.Admit(first_after).ok());
  EXPECT_FALSE(window.Admit(last_before).ok()) << "the old incarnation's frames are now old";
}

TEST(ReplayWindow, AdmitsSequencesReorderedWithinTheWindow) {
  ReplayWindow window;
  // 3981 is 1022 behind the highest admitted (5003) when it arrives.
  for (uint64_t s : {5000u, 5003u, 5001u, 5002u, 4000u, 3981u, 5004u}) {
    EXPECT_TRUE(window.Admit(s).ok()) << s;
  }
  EXPECT_EQ(window.highest_sequence(), 5004u);
  // The oldest one is still remembered at the window's edge (1023 behind).
  EXPECT_EQ(window.Admit(3981).code(), absl::StatusCode::kAlreadyExists);
}

TEST(ReplayWindow, RefusesADuplicateWhetherHighestOrOlder) {
  ReplayWindow window;
  ASSERT_TRUE(window.Admit(100).ok());
  ASSERT_TRUE(window.Admit(90).ok());
  EXPECT_EQ(window.Admit(100).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(window.Admit(90).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(window.Admit(95).ok());
}

TEST(ReplayWindow, RefusesASequenceAWholeWindowOrMoreBehindTheHighest) {
  ReplayWindow window;
  ASSERT_TRUE(window.Admit(10'000).ok());
  EXPECT_EQ(window.Admit(10'000 - ReplayWindow::kWindowSequences).code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ(window.Admit(1).code(), absl::StatusCode::kOutOfRange);
  EXPECT_TRUE(window.Admit(10'000 - ReplayWindow::kWindowSequences + 1).ok());
}

TEST(ReplayWindow, ARefusedSequenceLeavesTheWindowUnchanged) {
  ReplayWindow window;
  ASSERT_TRUE(window.Admit(2000).ok());
  ASSERT_FALSE(window.Admit(2000).ok());
  ASSERT_FALSE(window.Admit(1).ok());
  EXPECT_EQ(window.highest_sequence(), 2000u);
  EXPECT_TRUE(window.Admit(1999).ok());
}

TEST(ReplayWindow, RemembersEverySequenceItSlidesPast) {
  ReplayWindow window;
  // Admit every sequence once while sliding forward by small steps, then replay them all.
  for (uint64_t s = 1; s <= 3000; s += 3) ASSERT_TRUE(window.Admit(s).ok()) << s;
  for (uint64_t s = 3000 - ReplayWindow::kWindowSequences + 1; s <= 3000; ++s) {
    absl::Status status = window.Admit(s);
    if (s % 3 == 1) {
      EXPECT_EQ(status.code(), absl::StatusCode::kAlreadyExists) << s;
    } else {
      EXPECT_TRUE(status.ok()) << s;
    }
  }
}

TEST(ReplayWindow, AJumpFartherThanTheWindowForgetsEverythingBehindIt) {
  ReplayWindow window;
  ASSERT_TRUE(window.Admit(10).ok());
  ASSERT_TRUE(window.Admit(10 + 5 * ReplayWindow::kWindowSequences).ok());
  EXPECT_EQ(window.Admit(10).code(), absl::StatusCode::kOutOfRange);
  EXPECT_TRUE(window.Admit(11 + 4 * ReplayWindow::kWindowSequences).ok());
}

TEST(ReplayWindow, AdmitsSequenceZeroFirst) {
  ReplayWindow window;
  EXPECT_TRUE(window.Admit(0).ok());
  EXPECT_EQ(window.Admit(0).code(), absl::StatusCode::kAlreadyExists);
}

class SecretFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* base = std::getenv("TEST_TMPDIR");
    std::string pattern = std::string(base != nullptr ? base : "/tmp") + "/peer_auth_test.XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string WriteSecretFile(const std::string& bytes, mode_t mode = 0600) {
    std::string path = dir_ + "/secret";
    std::filesystem::remove(path);  // a previous 0400 file could not be rewritten
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out << bytes;
    }
    EXPECT_EQ(chmod(path.c_str(), mode), 0);
    return path;
  }

  std::string dir_;
};

TEST_F(SecretFileTest, LoadClusterSecretStripsTheTrailingNewline) {
  absl::StatusOr<std::string> secret = LoadClusterSecret(WriteSecretFile(kSecret + " \r\n\n"));
  ASSERT_TRUE(secret.ok()) << secret.status();
  EXPECT_EQ(*secret, kSecret);
}

TEST_F(SecretFileTest, LoadClusterSecretKeepsLeadingAndInnerBytes) {
  std::string binary = std::string("  \0\n", 4) + std::string(40, '\xff');
  absl::StatusOr<std::string> secret = LoadClusterSecret(WriteSecretFile(binary));
  ASSERT_TRUE(secret.ok()) << secret.status();
  EXPECT_EQ(*secret, binary);
}

TEST_F(SecretFileTest, LoadClusterSecretRejectsAShortSecret) {
  // 31 bytes of secret, padded past 32 by whitespace that is stripped.
  absl::StatusOr<std::string> secret =
      LoadClusterSecret(WriteSecretFile(std::string(31, 'k') + "\n\n\n"));
  ASSERT_FALSE(secret.ok());
  EXPECT_EQ(secret.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(secret.status().message().find("at least 32"), std::string_view::npos)
      << secret.status();
  EXPECT_FALSE(LoadClusterSecret(WriteSecretFile("")).ok());
  EXPECT_TRUE(LoadClusterSecret(WriteSecretFile(std::string(32, 'k'))).ok());
}

TEST_F(SecretFileTest, LoadClusterSecretRejectsAFileOverTheSizeLimit) {
  EXPECT_TRUE(
      LoadClusterSecret(WriteSecretFile(std::string(kClusterSecretFileBytesMax, 'k'))).ok());
  absl::StatusOr<std::string> secret =
      LoadClusterSecret(WriteSecretFile(std::string(kClusterSecretFileBytesMax + 1, 'k')));
  ASSERT_FALSE(secret.ok());
  EXPECT_EQ(secret.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SecretFileTest, LoadClusterSecretReportsAMissingFileAsNotFound) {
  EXPECT_EQ(LoadClusterSecret(dir_ + "/missing").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SecretFileTest, LoadClusterSecretRejectsADirectory) {
  EXPECT_EQ(LoadClusterSecret(dir_).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SecretFileTest, APermissionCheckAcceptsOnlyAnOwnerOnlyFile) {
  EXPECT_TRUE(CheckSecretFilePermissions(WriteSecretFile(kSecret, 0600)).ok());
  EXPECT_TRUE(CheckSecretFilePermissions(WriteSecretFile(kSecret, 0400)).ok());
  for (mode_t mode : {0640, 0604, 0620, 0602, 0610, 0601}) {
    absl::Status status = CheckSecretFilePermissions(WriteSecretFile(kSecret, mode));
    EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << std::oct << mode;
  }
  absl::Status status = CheckSecretFilePermissions(WriteSecretFile(kSecret, 0644));
  EXPECT_NE(status.message().find("0644"), std::string_view::npos) << status;
  EXPECT_NE(status.message().find("chmod 600"), std::string_view::npos) << status;
}

TEST_F(SecretFileTest, APermissionCheckOfAMissingFileReportsNotFound) {
  EXPECT_EQ(CheckSecretFilePermissions(dir_ + "/missing").code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace synod

#include "adapters/peer_auth.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "core/check.h"

namespace synod {
namespace {

constexpr char kMagic[4] = {'S', 'Y', 'N', '1'};
// Names this format's key: a future frame version derives an unrelated key.
constexpr char kKeyDerivationLabel[] = "synod peer v1";

constexpr size_t kFromOffset = 4;
constexpr size_t kToOffset = 8;
constexpr size_t kSequenceOffset = 12;
constexpr size_t kPayloadBytesOffset = 20;
static_assert(kPayloadBytesOffset + 8 == PeerAuthenticator::kHeaderBytes);

void PutLittleEndian(uint64_t value, int width_bytes, char* out) {
  for (int i = 0; i < width_bytes; ++i) out[i] = static_cast<char>(value >> (8 * i));
}

uint64_t GetLittleEndian(const char* in, int width_bytes) {
  uint64_t value = 0;
  for (int i = 0; i < width_bytes; ++i) {
    value |= static_cast<uint64_t>(static_cast<unsigned char>(in[i])) << (8 * i);
  }
  return value;
}

// HMAC-SHA256 of `data` under `key` into `tag`. OpenSSL fails here only when it cannot
// allocate, which the process does not survive anyway.
void HmacSha256(const void* key, size_t key_bytes, const char* data, size_t data_bytes,
                unsigned char (&tag)[PeerAuthenticator::kTagBytes]) {
  SYNOD_CHECK_LE(key_bytes, kClusterSecretFileBytesMax);
  unsigned int tag_bytes = 0;
  unsigned char* result =
      HMAC(EVP_sha256(), key, static_cast<int>(key_bytes),
           reinterpret_cast<const unsigned char*>(data), data_bytes, tag, &tag_bytes);
  SYNOD_CHECK(result != nullptr) << "HMAC-SHA256 failed";
  SYNOD_CHECK_EQ(tag_bytes, PeerAuthenticator::kTagBytes);
}

}  // namespace

absl::StatusOr<std::string> LoadClusterSecret(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot open cluster secret file ", path));
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int error_number = errno;
    close(fd);
    return absl::ErrnoToStatus(error_number,
                               absl::StrCat("cannot stat cluster secret file ", path));
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat("cluster secret file ", path, " is not a regular file"));
  }
  // Read one byte more than allowed, so that an oversized file is detected even if it grew
  // after fstat().
  std::string secret(kClusterSecretFileBytesMax + 1, '\0');
  size_t read_bytes = 0;
  while (read_bytes < secret.size()) {
    ssize_t n = read(fd, secret.data() + read_bytes, secret.size() - read_bytes);
    if (n < 0) {
      if (errno == EINTR) continue;
      int error_number = errno;
      close(fd);
      OPENSSL_cleanse(secret.data(), secret.size());
      return absl::ErrnoToStatus(error_number,
                                 absl::StrCat("cannot read cluster secret file ", path));
    }
    if (n == 0) break;
    read_bytes += static_cast<size_t>(n);
  }
  close(fd);
  if (read_bytes > kClusterSecretFileBytesMax) {
    OPENSSL_cleanse(secret.data(), secret.size());
    return absl::InvalidArgumentError(absl::StrCat("cluster secret file ", path,
                                                   " is larger than the limit of ",
                                                   kClusterSecretFileBytesMax, " bytes"));
  }
  secret.resize(read_bytes);
  absl::StripTrailingAsciiWhitespace(&secret);
  if (secret.size() < kClusterSecretBytesMin) {
    size_t secret_bytes = secret.size();
    OPENSSL_cleanse(secret.data(), secret.size());
    return absl::InvalidArgumentError(absl::StrCat(
        "cluster secret in ", path, " is ", secret_bytes,
        " bytes after stripping trailing whitespace; at least ", kClusterSecretBytesMin,
        " are required (generate one with: openssl rand -base64 48 > ", path, ")"));
  }
  return secret;
}

absl::Status CheckSecretFilePermissions(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot stat cluster secret file ", path));
  }
  if ((st.st_mode & 077) != 0) {
    char mode_octal[8];
    std::snprintf(mode_octal, sizeof(mode_octal), "%04o", st.st_mode & 07777u);
    return absl::FailedPreconditionError(
        absl::StrCat("cluster secret file ", path, " has mode ", mode_octal,
                     ": group or others may access it; run chmod 600 ", path));
  }
  return absl::OkStatus();
}

PeerAuthenticator::PeerAuthenticator(std::string_view cluster_secret) {
  SYNOD_CHECK_GE(cluster_secret.size(), kClusterSecretBytesMin);
  SYNOD_CHECK_LE(cluster_secret.size(), kClusterSecretFileBytesMax);
  HmacSha256(cluster_secret.data(), cluster_secret.size(), kKeyDerivationLabel,
             sizeof(kKeyDerivationLabel) - 1, mac_key_);
}

PeerAuthenticator::~PeerAuthenticator() { OPENSSL_cleanse(mac_key_, sizeof(mac_key_)); }

std::string PeerAuthenticator::Seal(uint32_t from_id, uint32_t to_id, uint64_t sequence,
                                    std::string_view payload) const {
  std::string frame(kOverheadBytes + payload.size(), '\0');
  std::memcpy(frame.data(), kMagic, sizeof(kMagic));
  PutLittleEndian(from_id, 4, frame.data() + kFromOffset);
  PutLittleEndian(to_id, 4, frame.data() + kToOffset);
  PutLittleEndian(sequence, 8, frame.data() + kSequenceOffset);
  PutLittleEndian(payload.size(), 8, frame.data() + kPayloadBytesOffset);
  if (!payload.empty()) std::memcpy(frame.data() + kHeaderBytes, payload.data(), payload.size());
  unsigned char tag[kTagBytes];
  HmacSha256(mac_key_, sizeof(mac_key_), frame.data(), kHeaderBytes + payload.size(), tag);
  std::memcpy(frame.data() + kHeaderBytes + payload.size(), tag, kTagBytes);
  SYNOD_CHECK_EQ(frame.size(), kOverheadBytes + payload.size());
  return frame;
}

absl::StatusOr<OpenedFrame> PeerAuthenticator::Open(std::string_view frame,
                                                    uint32_t expected_to_id) const {
  if (frame.size() < kOverheadBytes) {
    return absl::InvalidArgumentError(absl::StrCat("peer frame of ", frame.size(),
                                                   " bytes is shorter than its ", kOverheadBytes,
                                                   "-byte header and tag"));
  }
  if (std::memcmp(frame.data(), kMagic, sizeof(kMagic)) != 0) {
    return absl::InvalidArgumentError("peer frame does not start with the magic \"SYN1\"");
  }
  const size_t payload_bytes = frame.size() - kOverheadBytes;
  const uint64_t declared_payload_bytes = GetLittleEndian(frame.data() + kPayloadBytesOffset, 8);
  if (declared_payload_bytes != payload_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("peer frame declares a payload of ",
                                                   declared_payload_bytes, " bytes but carries ",
                                                   payload_bytes));
  }
  unsigned char expected_tag[kTagBytes];
  HmacSha256(mac_key_, sizeof(mac_key_), frame.data(), kHeaderBytes + payload_bytes, expected_tag);
  if (CRYPTO_memcmp(expected_tag, frame.data() + kHeaderBytes + payload_bytes, kTagBytes) != 0) {
    return absl::UnauthenticatedError(
        "peer frame tag does not match: forged, corrupted or sealed with another cluster "
        "secret");
  }
  const uint32_t to_id = static_cast<uint32_t>(GetLittleEndian(frame.data() + kToOffset, 4));
  if (to_id != expected_to_id) {
    return absl::PermissionDeniedError(absl::StrCat("peer frame is addressed to replica ", to_id,
                                                    ", not to this replica ", expected_to_id));
  }
  OpenedFrame opened;
  opened.from_id = static_cast<uint32_t>(GetLittleEndian(frame.data() + kFromOffset, 4));
  opened.sequence = GetLittleEndian(frame.data() + kSequenceOffset, 8);
  opened.payload = frame.substr(kHeaderBytes, payload_bytes);
  return opened;
}

PeerSequence::PeerSequence(uint64_t start_unix_ms) : next_(start_unix_ms << kCounterBits) {
  SYNOD_CHECK_LT(start_unix_ms, kStartUnixMsLimit);
}

uint64_t PeerSequence::Next() {
  // Unreachable in practice (2^64 frames), but a wrapped sequence would look like a replay
  // to every receiver, forever.
  SYNOD_CHECK_LT(next_, UINT64_MAX) << "peer sequence exhausted";
  return next_++;
}

absl::Status ReplayWindow::Admit(uint64_t sequence) {
  if (!any_admitted_ || sequence > highest_sequence_) {
    const uint64_t advance = any_admitted_ ? sequence - highest_sequence_ : kWindowSequences;
    if (advance >= kWindowSequences) {
      admitted_.reset();
    } else {
      admitted_ <<= static_cast<size_t>(advance);
    }
    admitted_.set(0);
    highest_sequence_ = sequence;
    any_admitted_ = true;
    return absl::OkStatus();
  }
  const uint64_t behind = highest_sequence_ - sequence;
  if (behind >= kWindowSequences) {
    return absl::OutOfRangeError(absl::StrCat("peer sequence ", sequence, " is ", behind,
                                              " behind the highest admitted ", highest_sequence_,
                                              ", outside the window of ", kWindowSequences));
  }
  if (admitted_.test(static_cast<size_t>(behind))) {
    return absl::AlreadyExistsError(
        absl::StrCat("peer sequence ", sequence, " was already admitted (a replay)"));
  }
  admitted_.set(static_cast<size_t>(behind));
  SYNOD_CHECK(admitted_.test(0)) << "the highest admitted sequence is always marked";
  return absl::OkStatus();
}

}  // namespace synod

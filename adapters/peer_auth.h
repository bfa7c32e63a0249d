#ifndef SYNOD_ADAPTERS_PEER_AUTH_H_
#define SYNOD_ADAPTERS_PEER_AUTH_H_

// Peer authentication (issue 8): every replica-to-replica body is a sealed frame, and a
// receiver opens it before it decodes a single byte of the payload.
//
// The host's contract, in order, each with its reason:
//  1. At start, load the cluster secret with LoadClusterSecret() (and decide with
//     CheckSecretFilePermissions() whether a group- or world-accessible file is fatal), then
//     build one PeerAuthenticator from it. Every replica holds the same secret: it proves
//     membership of the cluster.
//  2. The sender draws its wall-clock start time once, keeps one PeerSequence per
//     destination, and sends Seal(self, peer, sequence.Next(), payload) as the body. The
//     sequence makes every frame unique, so a receiver can tell a replay from a new frame.
//  3. The receiver calls Open(body, self). Any error: refuse the body (401/403/400) and
//     decode nothing, because unauthenticated bytes must never reach the protobuf parser.
//  4. Then it checks that OpenedFrame::from_id is a configured peer, and only then passes
//     the sequence to that peer's ReplayWindow::Admit(). A refused sequence is dropped
//     without decoding. Admit() comes after Open() so a forger cannot move the window.
//  5. Only now is OpenedFrame::payload parsed (as a MessageBatch) and stepped.
//
// What this does not give (by design, stated so nobody relies on it):
//  - Confidentiality: payloads travel in the clear. TLS is planned separately.
//  - Per-replica identity: any holder of the cluster secret can seal a frame with any
//    from_id. A stolen secret, or a compromised replica, can impersonate the whole cluster.
//  - Replay protection across a receiver restart: ReplayWindow lives in memory, so a freshly
//    restarted receiver admits the first frame of each sender it sees, old or not. This is
//    bounded by the protocol itself: Multi-Paxos is safe under duplicated and delayed
//    messages (the simulator injects both), so a replayed authentic frame can do no more
//    than the network already may. The window keeps replays from costing work, and keeps
//    an attacker from doing even that while the receiver runs.
//
// Frame layout (all integers little-endian, fixed width):
//   offset  0  magic "SYN1"        4 bytes
//   offset  4  from_id             u32
//   offset  8  to_id               u32
//   offset 12  sequence            u64
//   offset 20  payload_bytes       u64
//   offset 28  payload             payload_bytes bytes
//   then       tag                 32 bytes: HMAC-SHA256(mac_key, header || payload)
// mac_key = HMAC-SHA256(cluster_secret, "synod peer v1"): the raw secret never keys a MAC
// over attacker-chosen bytes, and a later format version derives an unrelated key.
//
// Everything here except the two file functions is pure: no I/O, no clock, no randomness.
// PeerAuthenticator is immutable after construction and safe to use from several threads;
// PeerSequence and ReplayWindow are not thread-safe.

#include <bitset>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace synod {

// The smallest cluster secret accepted: 256 bits, the HMAC-SHA256 key strength.
inline constexpr size_t kClusterSecretBytesMin = 32;
// The largest secret file read (before trailing whitespace is stripped).
inline constexpr size_t kClusterSecretFileBytesMax = 4096;

// Reads the cluster secret from the file at `path` and strips trailing ASCII whitespace
// (so a file written by `echo` or an editor works). The bytes are otherwise used as they
// are: a text secret such as `openssl rand -base64 48` output is fine, and so is binary.
// Errors: the OS error when the file cannot be opened or read (NotFound when missing);
// InvalidArgument when it is not a regular file, is larger than kClusterSecretFileBytesMax,
// or holds fewer than kClusterSecretBytesMin bytes after stripping.
// Does not check the file's permissions: see CheckSecretFilePermissions().
absl::StatusOr<std::string> LoadClusterSecret(const std::string& path);

// Returns OK when the file at `path` grants no permission at all to group or others
// (mode & 077 == 0, e.g. 0600 or 0400). A secret others can read is no longer secret, and
// one others can write lets them choose it.
// Errors: FailedPrecondition naming the mode and the fix (chmod 600) when mode & 077 != 0;
// the OS error when the file cannot be stat()ed.
// Separate from LoadClusterSecret() so that the server decides whether this is fatal.
absl::Status CheckSecretFilePermissions(const std::string& path);

// The fields of an authentic frame addressed to this replica.
struct OpenedFrame {
  uint32_t from_id = 0;
  uint64_t sequence = 0;
  // Points into the frame given to Open(): valid only while that buffer is alive and
  // unchanged. Authentic but not yet decoded.
  std::string_view payload;
};

// Seals and opens peer frames with a MAC key derived from the cluster secret.
class PeerAuthenticator {
 public:
  static constexpr size_t kHeaderBytes = 28;
  static constexpr size_t kTagBytes = 32;
  // Frame size = kOverheadBytes + payload size.
  static constexpr size_t kOverheadBytes = kHeaderBytes + kTagBytes;

  // REQUIRES: kClusterSecretBytesMin <= cluster_secret.size() <= kClusterSecretFileBytesMax
  // (as LoadClusterSecret() guarantees); checked, the process aborts otherwise.
  // Keeps only the derived MAC key, never the secret.
  explicit PeerAuthenticator(std::string_view cluster_secret);
  // Wipes the MAC key from memory.
  ~PeerAuthenticator();
  PeerAuthenticator(const PeerAuthenticator&) = default;
  PeerAuthenticator& operator=(const PeerAuthenticator&) = default;

  // Returns the frame carrying `payload` from replica `from_id` to replica `to_id`, stamped
  // with `sequence` (see PeerSequence). Its size is kOverheadBytes + payload.size().
  std::string Seal(uint32_t from_id, uint32_t to_id, uint64_t sequence,
                   std::string_view payload) const;

  // Authenticates `frame` for the replica `expected_to_id`. Checks, in order: size, magic
  // and payload length (InvalidArgument: malformed), the tag in constant time
  // (Unauthenticated: forged, corrupted, or sealed with another secret), then the
  // destination (PermissionDenied: an authentic frame for another replica, never acted on
  // here, so a frame cannot be reflected or redirected). Reads nothing of the payload.
  // On success the result's payload points into `frame` (see OpenedFrame).
  // Does not check for replays: that is ReplayWindow's job, after Open().
  absl::StatusOr<OpenedFrame> Open(std::string_view frame, uint32_t expected_to_id) const;

 private:
  unsigned char mac_key_[kTagBytes];
};

// The sequence numbers one sender stamps on its frames to one destination.
//
// sequence = (start_unix_ms << kCounterBits) + frames sealed so far. Strictly increasing
// within a process; and across a restart the new process's first sequence is larger than
// every sequence of the previous one, so the receiver's ReplayWindow moves straight past
// the old incarnation without any handshake, under two assumptions:
//  - the wall clock read at start is later than the previous incarnation's start (the
//    clock did not step back by more than the previous process's lifetime), and
//  - the previous incarnation sealed fewer than 2^20 (about a million) frames per
//    millisecond of its lifetime on average; peer POSTs are many orders of magnitude fewer.
// If either fails, the receiver refuses the new process's frames as replays until its
// sequences pass the old ones: a loss of liveness for that link, never of safety.
// A counter that runs past 2^20 simply carries into the millisecond bits.
// One PeerSequence per destination, so each receiver's window sees a dense sequence and
// the full kWindowSequences of reordering tolerance.
class PeerSequence {
 public:
  static constexpr int kCounterBits = 20;
  // Starts in milliseconds below 2^44 (until the year 2527) cannot overflow the sequence.
  static constexpr uint64_t kStartUnixMsLimit = uint64_t{1} << (64 - kCounterBits);

  // `start_unix_ms`: the host's wall clock (Unix epoch, milliseconds) read once at process
  // start. REQUIRES: start_unix_ms < kStartUnixMsLimit (checked).
  explicit PeerSequence(uint64_t start_unix_ms);

  // Returns the next sequence: larger than every one returned before.
  uint64_t Next();

 private:
  uint64_t next_;
};

// Drops replayed frames from one sender. HTTP POSTs from one sender may arrive out of
// order (several connections, retries), so a sliding window is used, not "greater than the
// last": a sequence is admitted if it is within kWindowSequences of the highest admitted
// one (sequence > highest - kWindowSequences) and was not admitted before.
//
// The host keeps one ReplayWindow per configured peer, so memory is bounded by the
// membership, and calls Admit() only with the sequence of a frame that Open() authenticated.
class ReplayWindow {
 public:
  static constexpr uint64_t kWindowSequences = 1024;

  // Admits `sequence` and records it. Errors, each leaving the window unchanged:
  // AlreadyExists when it was admitted before (a replay or a duplicate delivery);
  // OutOfRange when it is kWindowSequences or more below the highest admitted sequence
  // (too old to tell; dropped, as the protocol tolerates a lost message).
  absl::Status Admit(uint64_t sequence);

  // The highest sequence admitted so far; 0 before the first.
  uint64_t highest_sequence() const { return highest_sequence_; }

 private:
  bool any_admitted_ = false;
  uint64_t highest_sequence_ = 0;
  // Bit i set: sequence highest_sequence_ - i was admitted.
  std::bitset<kWindowSequences> admitted_;
};

}  // namespace synod

#endif  // SYNOD_ADAPTERS_PEER_AUTH_H_

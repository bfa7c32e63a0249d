#ifndef SYNOD_CORE_DRIVER_H_
#define SYNOD_CORE_DRIVER_H_

// The host driver: the one implementation of the Ready contract (core/replica.h), shared by
// the server (server/node.cc), the simulator (sim/world.cc) and the core's test cluster
// (core/testing/cluster.cc). For each Ready it does, in this order:
//
//   0. hand the snapshot chunks received from a peer to the snapshot store; check a
//      snapshot whose last chunk came whole (a bad one is refused before anything is kept);
//   1. persist: hand the Ready's records to the log storage, with an fsync when a promise,
//      an accept or an installed snapshot depends on it, and a compaction when the Ready
//      compacts; then wait for the storage to say it is done;
//   2. send the Ready's messages (its early_messages, a leader's accepts, leave before step
//      1 begins), with the bytes of the snapshot chunks they carry read from the store;
//   3. install its snapshot, hand its committed entries to the state machine;
//   4. answer the clients it has replies for;
//   5. Replica::Advance.
//
// Persisting is asynchronous: the storage may finish on another thread (the server's log
// writer) or after a simulated delay, and calls back on the host's thread. While a Ready is
// being persisted the host keeps stepping messages, requests and ticks into the replica;
// they gather into the next Ready, which is persisted in one write and one fsync when the
// current one is done (group commit). One storage operation is in flight at a time;
// meanwhile the messages that acknowledge nothing (Ready::early_messages) are sent as they
// come.
//
// The host's own snapshots go through the driver too (Compact), so that a snapshot record
// never overtakes or trails a Ready's records in the log out of order.
//
// Snapshot images are not in the log, nor in the replica: the log records a snapshot's
// metadata (SnapshotMeta: index, size, checksum), and the image itself is in the host's
// SnapshotStore (files on the server). An image is durable in the store before a log
// record names it, and stays there until a later record names another.
//
// The driver does no I/O: it talks only to the interfaces below. It is single-threaded:
// every call, and every callback it makes, is on the host's thread.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/replica.h"

namespace synod {

// How a Ready is to be persisted.
struct PersistOptions {
  // An fsync must make the records durable before done() is called.
  bool sync = false;
  // After the sync, the storage drops what ready.compacted_through covers.
  bool compact = false;
};

class LogStorage {
 public:
  virtual ~LogStorage() = default;
  // Starts writing the records of `ready` (see EncodeReady in core/log_codec.h). Calls
  // done() on the host's thread once they are written, made durable when options.sync,
  // and the log rewritten when options.compact. Operations finish in the order they were
  // started; done() may be called before Persist returns. `ready` stays valid until done().
  // A storage that fails stops the process: a failed fsync cannot be retried safely.
  virtual void Persist(const Ready& ready, PersistOptions options, std::function<void()> done) = 0;
};

// Where the host keeps snapshot images, by their metadata. An image is named by its index
// and its checksum (two replicas' images at one index may differ in their bytes).
class SnapshotStore {
 public:
  virtual ~SnapshotStore() = default;
  // Up to `max_bytes` of the image `meta` names, from `offset` (fewer only where the image
  // ends). NotFound when no such image is held; another error when it cannot be read.
  virtual absl::StatusOr<std::string> ReadChunk(const SnapshotMeta& meta, uint64_t offset,
                                                uint64_t max_bytes) = 0;
  // A chunk of the image `meta` names, received from a peer. Chunks come in order from
  // offset 0; a chunk at offset 0 starts an image over, dropping any partly received one.
  virtual void Receive(const SnapshotMeta& meta, uint64_t offset, std::string_view data) = 0;
  // The last chunk of `meta` was received. The image is kept, durable, if its bytes are the
  // ones `meta` names (its size and checksum); otherwise an error, and nothing is kept.
  virtual absl::Status Seal(const SnapshotMeta& meta) = 0;
  // The log names `meta` durably: every other whole image may go (one being received stays).
  virtual void Retain(const SnapshotMeta& meta) = 0;
};

// The metadata of `image`, the snapshot at `index`.
SnapshotMeta SnapshotMetaOf(uint64_t index, std::string_view image);

// A SnapshotStore in memory, for the simulator and the core's tests. Sealed images and the
// host's own are durable; a crash (Crash()) loses a partly received one.
class MemorySnapshotStore : public SnapshotStore {
 public:
  absl::StatusOr<std::string> ReadChunk(const SnapshotMeta& meta, uint64_t offset,
                                        uint64_t max_bytes) override;
  void Receive(const SnapshotMeta& meta, uint64_t offset, std::string_view data) override;
  absl::Status Seal(const SnapshotMeta& meta) override;
  void Retain(const SnapshotMeta& meta) override;

  // Keeps the host's own image of its state at `index`; returns its metadata.
  SnapshotMeta Add(uint64_t index, std::string image);
  // The image `meta` names, or null.
  const std::string* Find(const SnapshotMeta& meta) const;
  size_t images() const { return images_.size(); }
  void Crash() {
    incoming_meta_.reset();
    incoming_.clear();
  }

 private:
  std::map<std::pair<uint64_t, uint64_t>, std::string> images_;  // by (index, checksum)
  std::optional<SnapshotMeta> incoming_meta_;
  std::string incoming_;
};

class PeerTransport {
 public:
  virtual ~PeerTransport() = default;
  // Sends to peers; delivery is best effort (the protocol retries what is lost).
  virtual void Send(std::vector<Message> messages) = 0;
};

class AppliedState {
 public:
  virtual ~AppliedState() = default;
  // A snapshot from a peer, sealed in the snapshot store, is checked whole before anything
  // of its Ready is persisted: the host calls `done` with its verdict on its own thread, at
  // once or later (checking a large image takes seconds: a host does it off its loop).
  // Meanwhile the driver holds that Ready, as while it is persisted: only early messages
  // leave, and no snapshot of the host's own is recorded. `done` is never called after the
  // host stops (nothing more is persisted then).
  virtual void CheckSnapshot(const SnapshotToInstall& snapshot,
                             std::function<void(absl::Status)> done) = 0;
  // Sealing or CheckSnapshot failed. The replica already counts the snapshot as installed, so the
  // host must rebuild it from what is durable (HostDriver::ReplaceReplica) before it returns.
  virtual void RefuseSnapshot(const absl::Status& why) = 0;
  // The snapshot is durable: the state machine becomes it.
  virtual void InstallSnapshot(const SnapshotToInstall& snapshot) = 0;
  // A committed entry, in slot order. The host may apply it now or queue it.
  virtual void Apply(CommittedEntry entry) = 0;
};

class ClientAnswers {
 public:
  virtual ~ClientAnswers() = default;
  // An answer to a read barrier, or a refused request.
  virtual void Answer(const ForwardReply& reply) = 0;
  // After each Ready is done (Replica::Advance): serve what waited for it.
  virtual void Advanced() {}
};

struct DriverCounters {
  uint64_t readys = 0;    // Readys handled
  uint64_t persists = 0;  // storage operations started (Readys and own snapshots)
  uint64_t synced = 0;    // of them, with an fsync
  uint64_t snapshots_refused = 0;
  uint64_t snapshot_chunks_unreadable = 0;  // chunks not sent: the store could not read them
};

class HostDriver {
 public:
  // The interfaces must outlive the driver.
  HostDriver(std::unique_ptr<Replica> replica, LogStorage* storage, SnapshotStore* snapshots,
             PeerTransport* transport, AppliedState* state, ClientAnswers* answers);
  HostDriver(const HostDriver&) = delete;
  HostDriver& operator=(const HostDriver&) = delete;

  Replica& replica() { return *replica_; }
  const Replica& replica() const { return *replica_; }

  // Handles every Ready the replica has, as far as storage allows. Call it after stepping,
  // proposing or ticking. Safe to call from inside the driver's own callbacks (it then
  // returns at once; the outer call goes on).
  void Drain();

  // Persists the record of the host's snapshot `meta` of its state machine (its image
  // already durable in the snapshot store), then Replica::Compact. Refused (false) while a
  // storage operation is in flight, when the snapshot's index is not above the replica's
  // snapshot, or above what Advance() confirmed applied; the host asks again later.
  bool Compact(const SnapshotMeta& meta);
  // Whether Compact would take a snapshot at `index` now (ask before making its image).
  bool CanCompact(uint64_t index) const;
  // The index of the last snapshot persisted or installed here (0: none).
  uint64_t last_snapshot_index() const { return last_snapshot_index_; }

  // Replaces the replica with one rebuilt from durable state (from RefuseSnapshot).
  // REQUIRES: no storage operation or snapshot check in flight.
  void ReplaceReplica(std::unique_ptr<Replica> replica);

  // Whether a storage operation is in flight.
  bool persisting() const { return persisting_; }
  // Whether a snapshot from a peer is being checked (AppliedState::CheckSnapshot).
  bool checking() const { return checking_; }
  const DriverCounters& counters() const { return counters_; }

 private:
  void OnPersisted();
  // Persists `ready` (or finishes it at once when it needs no storage).
  void Persist(Ready ready);
  void OnSnapshotChecked(absl::Status verdict);
  void Finish(Ready ready);
  // Fills the snapshot chunks among `messages` with their bytes from the store; drops those
  // it cannot read (the receiver asks again).
  void FillSnapshotChunks(std::vector<Message>* messages);

  std::unique_ptr<Replica> replica_;
  LogStorage* const storage_;
  SnapshotStore* const snapshots_;
  PeerTransport* const transport_;
  AppliedState* const state_;
  ClientAnswers* const answers_;

  bool persisting_ = false;
  bool checking_ = false;  // in_flight_ holds a snapshot being checked
  bool in_drain_ = false;  // a Drain loop or a Finish runs: nested Drains return
  // The Ready being checked or persisted (empty for own snapshots).
  std::optional<Ready> in_flight_;
  std::function<void()> after_persist_;
  uint64_t last_snapshot_index_ = 0;
  DriverCounters counters_;
};

}  // namespace synod

#endif  // SYNOD_CORE_DRIVER_H_

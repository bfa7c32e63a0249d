// Part of the simulated world (sim/world_internal.h).

#include "sim/world_internal.h"

namespace synod::sim::internal {

// A blob's name in the simulation: 64 hex digits from the content (the state machine checks
// the form only; the server uses SHA-256).
std::string SimBlobName(std::string_view content) {
  std::string name;
  for (uint64_t salt = 0; salt < 4; ++salt) {
    StableHash hash;
    hash.AddU64(salt);
    hash.AddField(content);
    char hex[17];
    std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(hash.value()));
    name += hex;
  }
  return name;
}

// ---------------------------------------------------------------------------------------
// Media: the blob channel and the passes, modelled on server/media.cc.

void World::OnMediaActor() {
  if (!clients_issue_) return;  // quiet after the faults stop
  Schedule(now_us_ + media_.Range(kMediaEveryMinUs, kMediaEveryMaxUs), EventKind::kMedia, 0);
  Host& h = hosts_[media_.Range(0, options_.replicas - 1)];
  if (!h.up || h.paused) return;
  const std::string key = absl::StrCat("m", media_.Range(0, kMediaKeys - 1));
  if (media_.Chance(1, 5)) {
    ClientRequest request;
    request.set_client_id(media_.Next() | 1);
    request.set_sequence(1);
    request.set_origin_replica(h.id);
    request.mutable_command()->mutable_delete_media()->set_database(kDatabase);
    request.mutable_command()->mutable_delete_media()->set_key(key);
    h.replica().Propose(std::move(request));
    DrainHost(h);
    return;
  }
  std::string content = absl::StrCat("blob ", media_.Range(0, 40), "/", media_.Next() % 7);
  const std::string sha = SimBlobName(content);
  // Stored on the origin first (synced), pinned while the upload is under way.
  Host::Blob& blob = h.blobs[sha];
  blob.content = content;
  blob.young_at_us = now_us_;
  ++h.pins[sha];
  const uint64_t id = next_upload_++;
  MediaUpload& upload = uploads_[id];
  upload.origin = h.id;
  upload.incarnation = h.incarnation;
  upload.key = key;
  upload.sha = sha;
  upload.holders.insert(h.id);
  upload.kept.insert(h.id);
  upload.deadline_us = now_us_ + kMediaUploadDeadlineUs;
  Trace(absl::StrCat("replica ", h.id, " takes upload ", id, " of ", key));
  if (static_cast<size_t>(options_.replicas) / 2 + 1 <= 1) ProposeMedia(h, id);
  for (const Host& peer : hosts_) {
    if (peer.id == h.id) continue;
    SendBlob(Packet(BlobPacket::Kind::kPush, h.id, peer.id, id, sha, content));
  }
}

void World::SendBlob(BlobPacket packet) {
  if (blocked_.count({packet.from, packet.to}) > 0) return;
  if (faults_on_ && media_.Chance(swarm_.drop_per_10k, 10'000)) return;
  int64_t delay = media_.Range(200, 3'000);
  if (faults_on_ && media_.Chance(swarm_.tail_delay_per_10k, 10'000)) delay *= media_.Range(5, 300);
  events_.push(Event{now_us_ + delay, next_seq_++, EventKind::kBlobDeliver, packet.to, Message(), 0,
                     0, std::make_shared<const BlobPacket>(std::move(packet))});
}

void World::OnBlob(Host& h, const BlobPacket& p) {
  using Kind = BlobPacket::Kind;
  auto reply = [&](Kind kind, bool has, std::string content = "") {
    SendBlob(Packet(kind, h.id, p.from, p.upload, p.sha, std::move(content), has));
  };
  switch (p.kind) {
    case Kind::kPush: {
      // Stored whole (hash checked, synced, renamed) before it is acknowledged; young.
      if (SimBlobName(p.content) != p.sha) return;
      Host::Blob& blob = h.blobs[p.sha];
      blob.content = p.content;
      blob.young_at_us = now_us_;
      return reply(Kind::kPushAck, true);
    }
    case Kind::kKeep: {
      auto it = h.blobs.find(p.sha);
      if (it != h.blobs.end()) it->second.young_at_us = now_us_;
      return reply(Kind::kKeepAck, it != h.blobs.end());
    }
    case Kind::kFetch: {
      auto it = h.blobs.find(p.sha);
      return reply(Kind::kFetchReply, it != h.blobs.end(),
                   it != h.blobs.end() ? it->second.content : "");
    }
    case Kind::kFetchReply: {
      if (!h.fetch_tries.contains(p.sha)) return;  // done, or a crash forgot it
      if (!p.has || SimBlobName(p.content) != p.sha) return FetchBlob(h, p.sha);  // another
      h.fetch_tries.erase(p.sha);
      Host::Blob& blob = h.blobs[p.sha];
      blob.content = p.content;
      blob.young_at_us = now_us_;
      return;
    }
    case Kind::kPushAck:
    case Kind::kKeepAck: {
      auto it = uploads_.find(p.upload);
      if (it == uploads_.end() || it->second.origin != h.id ||
          it->second.incarnation != h.incarnation || it->second.proposed || !p.has) {
        return;
      }
      MediaUpload& upload = it->second;
      const size_t majority = static_cast<size_t>(options_.replicas) / 2 + 1;
      if (p.kind == Kind::kPushAck) {
        const bool reached = upload.holders.size() >= majority;
        upload.holders.insert(p.from);
        if (reached || upload.holders.size() < majority) return;
        // A majority stored it: each holder makes its copy young again before the proposal.
        for (uint32_t holder : upload.holders) {
          if (holder == h.id) continue;
          SendBlob(Packet(Kind::kKeep, h.id, holder, p.upload, upload.sha));
        }
        return;
      }
      upload.kept.insert(p.from);
      if (upload.kept.size() >= majority) ProposeMedia(h, p.upload);
      return;
    }
  }
}

void World::ProposeMedia(Host& h, uint64_t upload_id) {
  MediaUpload& upload = uploads_.at(upload_id);
  if (upload.proposed) return;
  upload.proposed = true;
  h.blobs.at(upload.sha).young_at_us = now_us_;
  ClientRequest request;
  request.set_client_id(media_.Next() | 1);
  request.set_sequence(1);
  request.set_origin_replica(h.id);
  PutMedia* put = request.mutable_command()->mutable_put_media();
  put->set_database(kDatabase);
  put->set_key(upload.key);
  put->set_sha256(upload.sha);
  put->set_size_bytes(h.blobs.at(upload.sha).content.size());
  put->set_content_type("application/octet-stream");
  media_proposals_[{request.client_id(), request.sequence()}] = upload_id;
  h.replica().Propose(std::move(request));
  DrainHost(h);
}

// The upload is answered (or given up): its pin goes, and its blob is young again (a write
// that timed out may still be chosen later).
void World::EndUpload(uint64_t upload_id) {
  auto it = uploads_.find(upload_id);
  if (it == uploads_.end()) return;
  Host& h = hosts_[it->second.origin - 1];
  if (h.up && h.incarnation == it->second.incarnation) {
    auto blob = h.blobs.find(it->second.sha);
    if (blob != h.blobs.end()) blob->second.young_at_us = now_us_;
    if (--h.pins[it->second.sha] == 0) h.pins.erase(it->second.sha);
  }
  uploads_.erase(it);
}

void World::MediaApplied(Host& h, const CommittedEntry& c,
                         const std::vector<AppliedRequest>& applied) {
  if (static_cast<size_t>(c.value.requests_size()) != applied.size()) return;
  for (size_t i = 0; i < applied.size(); ++i) {
    const ClientRequest& request = c.value.requests(static_cast<int>(i));
    if (!request.command().has_put_media()) continue;
    const PutMedia& put = request.command().put_media();
    if (applied[i].result.code() == OK && !h.blobs.contains(put.sha256())) {
      FetchBlob(h, put.sha256());
    }
    if (request.origin_replica() != h.id) continue;
    auto proposal = media_proposals_.find({request.client_id(), request.sequence()});
    if (proposal == media_proposals_.end()) continue;
    if (applied[i].result.code() == OK) ++media_acknowledged_;
    EndUpload(proposal->second);
    media_proposals_.erase(proposal);
  }
}

void World::FetchBlob(Host& h, const std::string& sha) {
  if (options_.bugs.count("media-no-fetch") > 0) return;
  Host::FetchTry& fetch = h.fetch_tries[sha];
  if (fetch.tries >= options_.replicas) {  // every peer asked: the next pass tries again
    h.fetch_tries.erase(sha);
    return;
  }
  if (fetch.tries == 0) fetch.first_peer = media_.Range(0, options_.replicas - 1);
  const int tries = ++fetch.tries;
  fetch.asked_us = now_us_;
  const uint32_t peer =
      static_cast<uint32_t>((fetch.first_peer + tries - 1) % options_.replicas + 1);
  if (peer == h.id) return FetchBlob(h, sha);
  SendBlob(Packet(BlobPacket::Kind::kFetch, h.id, peer, 0, sha));
}

void World::MediaPass(Host& h) {
  h.next_media_pass_us = now_us_ + kMediaPassEveryUs;
  // Uploads whose answer never came (the proposal was lost, or timed out): given up.
  for (auto it = uploads_.begin(); it != uploads_.end();) {
    const uint64_t id = it->first;
    ++it;
    const MediaUpload& upload = uploads_.at(id);
    if (upload.origin == h.id && now_us_ >= upload.deadline_us) EndUpload(id);
  }
  absl::StatusOr<std::vector<StateMachine::MediaRecord>> media =
      h.sm->ListMedia(kDatabase, "", 1'000'000);
  if (!media.ok()) return;
  std::set<std::string> referenced;
  for (const StateMachine::MediaRecord& record : *media) referenced.insert(record.media.sha256());
  for (auto it = h.fetch_tries.begin(); it != h.fetch_tries.end();) {
    it = now_us_ - it->second.asked_us > kMediaFetchTimeoutUs ? h.fetch_tries.erase(it)
                                                              : std::next(it);
  }
  for (const std::string& sha : referenced) {
    if (!h.blobs.contains(sha) && !h.fetch_tries.contains(sha)) FetchBlob(h, sha);
  }
  // Collect only when caught up with what is known committed, under a known leader
  // (server/media.cc): a replica just restarted knows no leader, and its commit index is
  // only what it applied before the crash.
  const ReplicaStatus status = h.replica().Status();
  if (status.leader_id == 0 || h.sm->revision() < status.commit_index) return;
  if (options_.bugs.count("media-no-collection") > 0) return;
  const bool ignore_references = options_.bugs.count("media-gc-ignores-references") > 0;
  for (auto it = h.blobs.begin(); it != h.blobs.end();) {
    const bool collect = (ignore_references || !referenced.contains(it->first)) &&
                         !h.pins.contains(it->first) &&
                         it->second.young_at_us < now_us_ - kMediaGraceUs;
    if (collect) Trace(absl::StrCat("replica ", h.id, " collects blob ", it->first.substr(0, 8)));
    it = collect ? h.blobs.erase(it) : std::next(it);
  }
}

void World::MediaChecks() {
  uint64_t top = 0;
  for (const Host& h : hosts_) {
    if (h.up) top = std::max(top, h.sm->revision());
  }
  const Host* reference = nullptr;
  for (const Host& h : hosts_) {
    if (h.up && h.sm->revision() == top) reference = &h;
  }
  if (reference == nullptr) return;
  absl::StatusOr<std::vector<StateMachine::MediaRecord>> media =
      reference->sm->ListMedia(kDatabase, "", 1'000'000);
  if (!media.ok()) return Fail(absl::StrCat("media: ", media.status().ToString()));
  std::set<std::string> referenced;
  for (const StateMachine::MediaRecord& record : *media) {
    const std::string& sha = record.media.sha256();
    referenced.insert(sha);
    bool anywhere = false;
    for (const Host& h : hosts_) {
      auto blob = h.blobs.find(sha);
      if (blob == h.blobs.end()) continue;
      if (SimBlobName(blob->second.content) != sha) {
        return Fail(absl::StrCat("media: replica ", h.id, " holds blob ", sha.substr(0, 8),
                                 " with other bytes"));
      }
      anywhere = true;
    }
    if (!anywhere) {
      return Fail(absl::StrCat("media: dangling metadata: key ", record.media.key(), " (revision ",
                               record.revision, ") names blob ", sha.substr(0, 8),
                               ", which no replica holds"));
    }
    for (const Host& h : hosts_) {
      if (h.up && h.sm->revision() == top && !h.blobs.contains(sha)) {
        return Fail(absl::StrCat("media: replica ", h.id, " lacks blob ", sha.substr(0, 8),
                                 " of key ", record.media.key(), " after the faults stopped"));
      }
    }
  }
  for (const Host& h : hosts_) {
    if (!h.up || h.sm->revision() != top) continue;
    for (const auto& [sha, blob] : h.blobs) {
      if (!referenced.contains(sha) && !h.pins.contains(sha) &&
          blob.young_at_us < now_us_ - kMediaGraceUs - 2 * kMediaPassEveryUs) {
        return Fail(absl::StrCat("media: replica ", h.id, " keeps orphan blob ", sha.substr(0, 8),
                                 " after collection settled"));
      }
    }
  }
  Trace(absl::StrCat("media: ", media_acknowledged_, " uploads acknowledged, ", media->size(),
                     " keys at the end"));
}

}  // namespace synod::sim::internal

// synod-server: one replica of a Synod cluster. See docs/operations.md.

#include <malloc.h>
#include <signal.h>
#include <sys/resource.h>
#include <uv.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <iostream>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "adapters/peer_auth.h"
#include "server/node.h"

namespace {

constexpr const char* kUsage =
    R"(usage: synod-server --id N --listen HOST:PORT --peers ID=HOST:PORT,... --data-dir DIR
                    --cluster-secret-file FILE [--fsync=true|false] [--location LABEL]

  --id N            this replica's id (1..), one of the ids in --peers
  --listen H:P      address for the HTTP API and peer traffic
  --peers LIST      every replica of the group, this one included: 1=127.0.0.1:7001,2=...
  --data-dir DIR    where the log and the SQLite files live (created if missing)
  --cluster-secret-file FILE   the secret every replica shares (at least 32 bytes, mode 600):
                    peer messages are authenticated with it
  --fsync B         fsync the log before acknowledging (default true); false survives a
                    process crash but not a power failure
  --location LABEL  a label or coordinates reported in /v1/status
  --snapshot-every N           applied entries between log compactions (default 10000)
  --checkpoint-every N         applied entries between divergence-check votes (default 1000)
  --max-body-bytes N           largest database upload that goes through the log by value
                               (default 3145728); larger ones stream to disk
                               (--max-database-bytes)
  --max-json-body-bytes N      largest exec, query or d3b body accepted (default 3145728)
  --query-timeout-ms N         a query running longer is interrupted, answered 503 (default 2000)
  --http-request-timeout-ms N  time a client has to send a whole request (default 30000); a
                               media upload has this plus its size at 256 KiB/s
  --max-media-bytes N          largest media file accepted (default 4294967296)
  --max-database-bytes N       largest database upload (PUT /v1/db/{name}) streamed to disk,
                               for images over --max-body-bytes (default 68719476736)
  --media-gc-grace-ms N        an unreferenced media blob is removed once older than this
                               (default 3600000, at least 60000)
  --testing-media-gc-grace-ms N for tests only: the same, without the floor
  --media-gc-interval-ms N     how often blobs are checked: fetched if missing, removed if
                               unreferenced (default 60000)
  --testing-kill-after-apply N for crash tests: SIGKILL this process right after it applies
                               revision N (its SQLite commit done, its log not yet synced)
  --testing-peer-streams B     for tests only: false behaves as a version without peer
                               streams (batches as POSTs only, stream upgrades refused)
  --help            this text
)";

int Fail(const std::string& message) {
  std::cerr << "synod-server: " << message << "\n" << kUsage;
  return 2;
}

bool ParseHostPort(const std::string& text, synod::server::PeerAddress* out) {
  size_t colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0) return false;
  out->host = text.substr(0, colon);
  return absl::SimpleAtoi(text.substr(colon + 1), &out->port) && out->port > 0 && out->port < 65536;
}

struct Shutdown {
  synod::server::Node* node;
  uv_signal_t sigint;
  uv_signal_t sigterm;
  bool started = false;
};

void OnSignal(uv_signal_t* handle, int signum) {
  auto* s = static_cast<Shutdown*>(handle->data);
  if (s->started) return;
  s->started = true;
  fprintf(stderr, "I signal %d: syncing the log and stopping\n", signum);
  uv_close(reinterpret_cast<uv_handle_t*>(&s->sigint), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&s->sigterm), nullptr);
  s->node->Stop([] {});
}

}  // namespace

int main(int argc, char** argv) {
  // Peer batches, media chunks and request bodies are allocations of a MiB or so, made and
  // freed all the time. By default glibc maps each one fresh (and, freed, hands it back), so
  // every one is faulted in page by page: measured here, that made pushing media to peers
  // 2.7 times slower. Such allocations are kept for reuse instead, up to 64 MiB of freed
  // memory at the top of the heap.
  mallopt(M_MMAP_THRESHOLD, 16 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
  synod::server::NodeOptions options;
  bool have_id = false, have_listen = false, have_peers = false, have_dir = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    size_t eq = arg.find('=');
    if (arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    } else if (arg != "--help" && i + 1 < argc) {
      value = argv[++i];
    }
    if (arg == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (arg == "--id") {
      if (!absl::SimpleAtoi(value, &options.id) || options.id == 0) {
        return Fail("--id must be a positive number");
      }
      have_id = true;
    } else if (arg == "--listen") {
      synod::server::PeerAddress a;
      if (!ParseHostPort(value, &a)) return Fail("--listen must be HOST:PORT");
      options.listen_host = a.host;
      options.listen_port = a.port;
      have_listen = true;
    } else if (arg == "--peers") {
      for (absl::string_view item : absl::StrSplit(value, ',', absl::SkipEmpty())) {
        std::string entry(item);
        size_t at = entry.find('=');
        uint32_t id = 0;
        synod::server::PeerAddress a;
        if (at == std::string::npos || !absl::SimpleAtoi(entry.substr(0, at), &id) || id == 0 ||
            !ParseHostPort(entry.substr(at + 1), &a)) {
          return Fail("--peers must be ID=HOST:PORT,... (bad item '" + entry + "')");
        }
        if (!options.peers.emplace(id, a).second) {
          return Fail("--peers names replica " + std::to_string(id) + " twice");
        }
      }
      have_peers = true;
    } else if (arg == "--data-dir") {
      if (value.empty()) return Fail("--data-dir must not be empty");
      options.data_dir = value;
      have_dir = true;
    } else if (arg == "--fsync") {
      if (value != "true" && value != "false") return Fail("--fsync must be true or false");
      options.fsync = value == "true";
    } else if (arg == "--location") {
      options.location = value;
    } else if (arg == "--snapshot-every") {
      if (!absl::SimpleAtoi(value, &options.snapshot_every_entries) ||
          options.snapshot_every_entries == 0) {
        return Fail("--snapshot-every must be a positive number");
      }
    } else if (arg == "--max-body-bytes") {
      if (!absl::SimpleAtoi(value, &options.max_body_bytes) || options.max_body_bytes == 0) {
        return Fail("--max-body-bytes must be a positive number");
      }
    } else if (arg == "--cluster-secret-file") {
      absl::Status permissions = synod::CheckSecretFilePermissions(value);
      if (!permissions.ok()) return Fail(std::string(permissions.message()));
      absl::StatusOr<std::string> secret = synod::LoadClusterSecret(value);
      if (!secret.ok()) return Fail(std::string(secret.status().message()));
      options.cluster_secret = *std::move(secret);
    } else if (arg == "--testing-kill-after-apply") {
      if (!absl::SimpleAtoi(value, &options.testing_kill_after_apply)) {
        return Fail("--testing-kill-after-apply must be a number");
      }
    } else if (arg == "--testing-peer-streams") {
      if (value != "true" && value != "false") {
        return Fail("--testing-peer-streams must be true or false");
      }
      options.peer_streams = value == "true";
    } else if (arg == "--checkpoint-every") {
      if (!absl::SimpleAtoi(value, &options.checkpoint_every_entries) ||
          options.checkpoint_every_entries == 0) {
        return Fail("--checkpoint-every must be a positive number");
      }
    } else if (arg == "--max-json-body-bytes") {
      if (!absl::SimpleAtoi(value, &options.max_json_body_bytes) ||
          options.max_json_body_bytes == 0) {
        return Fail("--max-json-body-bytes must be a positive number");
      }
    } else if (arg == "--query-timeout-ms") {
      if (!absl::SimpleAtoi(value, &options.query_timeout_ms) || options.query_timeout_ms <= 0) {
        return Fail("--query-timeout-ms must be a positive number");
      }
    } else if (arg == "--http-request-timeout-ms") {
      if (!absl::SimpleAtoi(value, &options.http_request_timeout_ms) ||
          options.http_request_timeout_ms <= 0) {
        return Fail("--http-request-timeout-ms must be a positive number");
      }
    } else if (arg == "--max-database-bytes") {
      if (!absl::SimpleAtoi(value, &options.max_database_bytes) ||
          options.max_database_bytes == 0) {
        return Fail("--max-database-bytes must be a positive number");
      }
    } else if (arg == "--max-media-bytes") {
      if (!absl::SimpleAtoi(value, &options.max_media_bytes) || options.max_media_bytes == 0) {
        return Fail("--max-media-bytes must be a positive number");
      }
    } else if (arg == "--media-gc-grace-ms") {
      // A blob is made young just before its metadata is proposed and when the proposal
      // is answered (or times out): a write that timed out but is chosen later, after an
      // election, must find its blob still there.
      if (!absl::SimpleAtoi(value, &options.media_gc_grace_ms) ||
          options.media_gc_grace_ms < 60'000) {
        return Fail("--media-gc-grace-ms must be at least 60000");
      }
    } else if (arg == "--testing-media-gc-grace-ms") {
      if (!absl::SimpleAtoi(value, &options.media_gc_grace_ms)) {
        return Fail("--testing-media-gc-grace-ms must be a number");
      }
    } else if (arg == "--media-gc-interval-ms") {
      if (!absl::SimpleAtoi(value, &options.media_gc_interval_ms) ||
          options.media_gc_interval_ms == 0) {
        return Fail("--media-gc-interval-ms must be a positive number");
      }
    } else {
      return Fail("unknown flag '" + arg + "'");
    }
  }
  if (!have_id || !have_listen || !have_peers || !have_dir) {
    return Fail("--id, --listen, --peers and --data-dir are required");
  }
  if (options.cluster_secret.empty()) {
    return Fail("--cluster-secret-file is required (tools/up creates one: 32 random bytes)");
  }
  if (options.peers.count(options.id) == 0) return Fail("--peers must include --id");
  if (options.peers.size() % 2 == 0) {
    fprintf(stderr, "W an even number of replicas tolerates no more failures than one fewer\n");
  }
  signal(SIGPIPE, SIG_IGN);
  // Connections must meet the connection cap (which evicts idle ones to make room) before
  // they meet the file-descriptor limit (which refuses everyone, /healthz included): take
  // the hard limit, and keep descriptors in reserve for the log, the databases and peers.
  // The reserve: the log, three per open database (file, -wal, -shm), three per reader (64
  // running queries, 16 idle readers), peers, the listener and libuv's own.
  constexpr rlim_t kReservedDescriptors = 512;
  struct rlimit files;
  if (getrlimit(RLIMIT_NOFILE, &files) == 0) {
    files.rlim_cur = files.rlim_max;
    setrlimit(RLIMIT_NOFILE, &files);
    getrlimit(RLIMIT_NOFILE, &files);
    if (files.rlim_cur < options.max_connections + kReservedDescriptors) {
      options.max_connections = files.rlim_cur > 2 * kReservedDescriptors
                                    ? files.rlim_cur - kReservedDescriptors
                                    : files.rlim_cur / 2;
      fprintf(stderr, "W at most %zu open connections: the file-descriptor limit is %llu\n",
              options.max_connections, static_cast<unsigned long long>(files.rlim_cur));
    }
  }
  // SQLite's 'localtime' modifier reads the process's time zone: the same on every replica
  // only if it is fixed.
  setenv("TZ", "UTC", 1);
  tzset();

  // libuv's pool runs queries, snapshot writes and checks, vote hashes, backup copies and
  // the reads of streamed bodies: 4 threads (its default) are too few for long jobs beside
  // short ones. Set before the pool's first use; an operator's setting wins.
  setenv("UV_THREADPOOL_SIZE", "16", /*overwrite=*/0);
  uv_loop_t* loop = uv_default_loop();
  synod::server::Node node(loop, options);
  absl::Status started = node.Start();
  if (!started.ok()) {
    fprintf(stderr, "E synod-server cannot start: %s\n", started.ToString().c_str());
    return 1;
  }
  Shutdown shutdown{&node, {}, {}};
  uv_signal_init(loop, &shutdown.sigint);
  uv_signal_init(loop, &shutdown.sigterm);
  shutdown.sigint.data = shutdown.sigterm.data = &shutdown;
  uv_signal_start(&shutdown.sigint, OnSignal, SIGINT);
  uv_signal_start(&shutdown.sigterm, OnSignal, SIGTERM);
  uv_run(loop, UV_RUN_DEFAULT);
  fprintf(stderr, "I stopped\n");
  return 0;
}

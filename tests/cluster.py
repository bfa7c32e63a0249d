"""A local Synod cluster of real synod-server processes on loopback, for end-to-end tests."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_ports(n):
    """n distinct free TCP ports on 127.0.0.1, chosen now."""
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


class Response:
    def __init__(self, status, body, headers):
        self.status = status
        self.body = body
        self.headers = headers

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.status} {self.body[:300]!r}>"


class Cluster:
    def __init__(self, server, size=3, extra_flags=(), data_root=None):
        self.server = server
        self.size = size
        self.extra_flags = list(extra_flags)
        self.root = data_root or tempfile.mkdtemp(prefix="synod-e2e-")
        self.ports = free_ports(size)
        self.procs = {}
        self.logs = {}
        # Every replica shares one secret; peer messages are authenticated with it.
        self.secret_file = os.path.join(self.root, "cluster-secret")
        if not os.path.exists(self.secret_file):
            fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(32).hex() + "\n")

    def peers(self):
        return ",".join(f"{i + 1}=127.0.0.1:{p}" for i, p in enumerate(self.ports))

    def url(self, i):
        return f"http://127.0.0.1:{self.ports[i - 1]}"

    def start(self, i, flags=()):
        """Starts replica i, with `flags` added to the cluster's own for this start only."""
        data = os.path.join(self.root, str(i))
        if i in self.logs:
            self.logs[i].close()
        log = open(os.path.join(self.root, f"{i}.log"), "ab")
        self.logs[i] = log
        self.procs[i] = subprocess.Popen(
            [self.server, "--id", str(i), "--listen", f"127.0.0.1:{self.ports[i - 1]}",
             "--peers", self.peers(), "--data-dir", data,
             "--cluster-secret-file", self.secret_file] + self.extra_flags + list(flags),
            stdout=log, stderr=log)

    def start_all(self):
        for i in range(1, self.size + 1):
            self.start(i)
        self.wait_ready()

    def kill(self, i, sig=signal.SIGKILL):
        p = self.procs[i]
        p.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            p.wait(timeout=20)

    def stop_all(self):
        for i, p in self.procs.items():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self.logs.values():
            log.close()

    def cleanup(self):
        shutil.rmtree(self.root, ignore_errors=True)

    def finish(self):
        """Stops every replica, then removes the data and logs (kept, and named on stderr,
        when SYNOD_E2E_KEEP is set)."""
        self.stop_all()
        if os.environ.get("SYNOD_E2E_KEEP"):
            print(f"data and logs kept in {self.root}", file=sys.stderr)
        else:
            self.cleanup()

    def request(self, i, method, path, body=None, headers=None, timeout=15):
        conn = http.client.HTTPConnection("127.0.0.1", self.ports[i - 1], timeout=timeout)
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers = dict(headers or {}, **{"Content-Type": "application/json"})
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return Response(r.status, r.read(), dict(r.getheaders()))
        finally:
            conn.close()

    def status(self, i):
        return self.request(i, "GET", "/v1/status", timeout=5).json()

    def leader(self):
        for i in range(1, self.size + 1):
            if self.procs[i].poll() is not None:
                continue
            try:
                s = self.status(i)
            except OSError:
                continue
            if s["role"] == "leader":
                return i
        return 0

    def wait_leader(self, timeout=15):
        """The replica that leads, waiting for an election if there is none right now."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            leader = self.leader()
            if leader:
                return leader
            time.sleep(0.1)
        raise AssertionError("no leader within %s s; logs in %s" % (timeout, self.root))

    def wait_ready(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.leader():
                return
            time.sleep(0.1)
        raise AssertionError("no leader within %s s; logs in %s" % (timeout, self.root))

    def wait_revision(self, i, revision, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.status(i)["revision"] >= revision:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"replica {i} did not reach revision {revision}")

    def exec_retrying(self, i, db, sql, params=(), attempts=20):
        """A write retried on 503 (as a client does across a leader change)."""
        for _ in range(attempts):
            r = self.exec(i, db, sql, params)
            if r.status != 503:
                return r
            time.sleep(0.2)
        return r

    def exec(self, i, db, sql, params=(), transaction=True, timeout=15):
        return self.request(i, "POST", f"/v1/db/{db}/exec",
                            {"statements": [{"sql": sql, "params": list(params)}],
                             "transaction": transaction}, timeout=timeout)

    def query(self, i, db, sql, consistency="linearizable", params=(), min_revision=0):
        return self.request(i, "POST", f"/v1/db/{db}/query",
                            {"sql": sql, "params": list(params), "consistency": consistency,
                             "min_revision": min_revision})

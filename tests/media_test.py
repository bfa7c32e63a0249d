"""End-to-end tests of media: uploads streamed to a majority, reads from any replica, refetch
after a wipe, Range and ETag, deletion and collection, and every bad input refused.

Usage: media_test.py PATH_TO_SYNOD_SERVER [unittest args]
"""

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster import Cluster  # noqa: E402

SERVER = None


def blob_files(root, i):
    """The blobs stored by replica i (paths under its blob store), tmp/ included."""
    out = []
    for dirpath, _, files in os.walk(os.path.join(root, str(i), "blobs")):
        out.extend(os.path.join(dirpath, f) for f in files)
    return sorted(out)


def stored_blobs(root, i):
    """The hashes of the whole blobs replica i holds."""
    out = set()
    for path in blob_files(root, i):
        parts = path.split(os.sep)
        if parts[-2] != "tmp":
            out.add(parts[-2] + parts[-1])
    return out


class MediaTest(unittest.TestCase):
    flags = ("--testing-media-gc-grace-ms", "3000", "--media-gc-interval-ms", "1000")

    def setUp(self):
        self.c = Cluster(SERVER, extra_flags=self.flags)
        self.c.start_all()
        r = self.c.request(1, "PUT", "/v1/db/photos")
        self.assertEqual(r.status, 201, r)

    def tearDown(self):
        self.c.finish()

    def upload(self, i, key, data, content_type="image/png", headers=None, db="photos"):
        h = {"Content-Type": content_type}
        h.update(headers or {})
        return self.c.request(i, "PUT", f"/v1/db/{db}/media/{key}", body=data, headers=h,
                              timeout=60)

    def assert_error(self, r, status, what):
        self.assertEqual(r.status, status, f"{what}: {r}")
        self.assertIn("error", r.json(), what)

    def wait_for(self, what, predicate, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        self.fail(f"{what}: not within {timeout} s; logs in {self.c.root}")


class Media(MediaTest):
    def test_upload_through_one_replica_read_from_the_others_after_it_is_killed(self):
        data = os.urandom(3 * 1048576 + 17)  # several chunks, not a multiple of one
        r = self.upload(1, "cat.png", data)
        self.assertEqual(r.status, 201, r)
        body = r.json()
        sha = hashlib.sha256(data).hexdigest()
        self.assertEqual((body["key"], body["sha256"], body["size"]), ("cat.png", sha, len(data)))
        # The 201 means a majority holds the bytes: two replicas at least, at once.
        holders = [i for i in (1, 2, 3) if sha in stored_blobs(self.c.root, i)]
        self.assertGreaterEqual(len(holders), 2, holders)
        self.c.kill(1)
        for i in (2, 3):
            g = self.c.request(i, "GET", "/v1/db/photos/media/cat.png", timeout=60)
            self.assertEqual(g.status, 200, g)
            self.assertEqual(g.body, data)
            self.assertEqual(g.headers["Content-Type"], "image/png")
            self.assertEqual(g.headers["ETag"], f'"{sha}"')
        # Every replica converges on the blob, without a read asking for it.
        self.c.start(1)
        self.wait_for("every replica holds the blob",
                      lambda: all(sha in stored_blobs(self.c.root, i) for i in (1, 2, 3)))

    def test_a_wiped_replica_refetches_every_blob(self):
        blobs = {}
        for n in range(4):
            data = os.urandom(200_000 + n)
            self.assertEqual(self.upload(1 + n % 3, f"k{n}", data).status, 201)
            blobs[f"k{n}"] = data
        want = {hashlib.sha256(d).hexdigest() for d in blobs.values()}
        self.wait_for("every replica holds every blob",
                      lambda: all(want <= stored_blobs(self.c.root, i) for i in (1, 2, 3)))
        # Replica 1's copy of one blob is damaged (same size, one byte changed): a fetch from
        # it fails its hash check, and the fetcher asks another peer.
        damaged = hashlib.sha256(blobs["k0"]).hexdigest()
        path = os.path.join(self.c.root, "1", "blobs", damaged[:2], damaged[2:])
        with open(path, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))
        self.c.kill(3)
        shutil.rmtree(os.path.join(self.c.root, "3"))
        self.c.start(3)
        # Rebuilt from the others (log or snapshot), then the background pass fetches
        # every referenced blob.
        self.wait_for("the wiped replica refetched every blob",
                      lambda: want <= stored_blobs(self.c.root, 3), timeout=60)
        for key, data in blobs.items():
            g = self.c.request(3, "GET", f"/v1/db/photos/media/{key}?consistency=local")
            self.assertEqual((g.status, g.body), (200, data), key)
        # Replica 1 serves its damaged blob's bytes only after checking them: it finds the
        # damage, removes its copy, and fetches the blob again.
        g = self.c.request(1, "GET", "/v1/db/photos/media/k0?consistency=local")
        self.assertEqual((g.status, g.body), (200, blobs["k0"]))

    def test_range_etag_304_head_and_listing(self):
        data = bytes(range(256)) * 4000
        sha = hashlib.sha256(data).hexdigest()
        self.assertEqual(self.upload(2, "doc.bin", data, "application/pdf").status, 201)
        path = "/v1/db/photos/media/doc.bin"
        r = self.c.request(3, "GET", path, headers={"Range": "bytes=100-199"})
        self.assertEqual(r.status, 206, r)
        self.assertEqual(r.body, data[100:200])
        self.assertEqual(r.headers["Content-Range"], f"bytes 100-199/{len(data)}")
        r = self.c.request(3, "GET", path, headers={"Range": "bytes=-10"})
        self.assertEqual((r.status, r.body), (206, data[-10:]))
        r = self.c.request(3, "GET", path, headers={"Range": f"bytes={len(data) - 5}-"})
        self.assertEqual((r.status, r.body), (206, data[-5:]))
        r = self.c.request(1, "GET", path, headers={"Range": f"bytes={len(data)}-"})
        self.assertEqual(r.status, 416, r)
        self.assertEqual(r.headers["Content-Range"], f"bytes */{len(data)}")
        r = self.c.request(1, "GET", path, headers={"If-None-Match": f'"{sha}"'})
        self.assertEqual((r.status, r.body), (304, b""))
        self.assertEqual(r.headers["ETag"], f'"{sha}"')
        r = self.c.request(1, "GET", path, headers={"If-None-Match": '"other"'})
        self.assertEqual((r.status, r.body), (200, data))
        r = self.c.request(1, "HEAD", path)
        self.assertEqual((r.status, r.body), (200, b""))
        self.assertEqual(r.headers["Content-Length"], str(len(data)))
        for consistency in ("linearizable", "lease", "local"):
            r = self.c.request(2, "GET", f"{path}?consistency={consistency}")
            self.assertEqual((r.status, r.body), (200, data), consistency)
        # Listing, paginated.
        for n in range(5):
            self.assertEqual(self.upload(1, f"p{n}", b"x" * n).status, 201)
        r = self.c.request(1, "GET", "/v1/db/photos/media?limit=4")
        self.assertEqual(r.status, 200, r)
        page = r.json()
        self.assertEqual([m["key"] for m in page["media"]], ["doc.bin", "p0", "p1", "p2"])
        self.assertEqual(page["media"][0]["sha256"], sha)
        self.assertEqual(page["media"][0]["size"], len(data))
        self.assertEqual(page["media"][0]["content_type"], "application/pdf")
        self.assertEqual(page["next"], "p2")
        r = self.c.request(1, "GET", "/v1/db/photos/media?limit=4&after=p2")
        self.assertEqual([m["key"] for m in r.json()["media"]], ["p3", "p4"])
        self.assertIsNone(r.json()["next"])
        # An empty file is media too.
        r = self.c.request(3, "GET", "/v1/db/photos/media/p0")
        self.assertEqual((r.status, r.body), (200, b""))

    def test_delete_and_drop_remove_metadata_and_collect_unreferenced_blobs(self):
        shared = os.urandom(50_000)
        own = os.urandom(50_000)
        sha_shared = hashlib.sha256(shared).hexdigest()
        sha_own = hashlib.sha256(own).hexdigest()
        self.assertEqual(self.upload(1, "a", shared).status, 201)
        self.assertEqual(self.upload(2, "b", shared).status, 201)  # the same bytes
        self.assertEqual(self.upload(3, "c", own).status, 201)
        self.wait_for("all replicas hold both blobs", lambda: all(
            {sha_shared, sha_own} <= stored_blobs(self.c.root, i) for i in (1, 2, 3)))
        r = self.c.request(2, "DELETE", "/v1/db/photos/media/a")
        self.assertEqual(r.status, 204, r)
        self.assertEqual(self.c.request(1, "GET", "/v1/db/photos/media/a").status, 404)
        self.assertEqual(self.c.request(2, "DELETE", "/v1/db/photos/media/a").status, 404)
        self.assertEqual(self.c.request(1, "DELETE", "/v1/db/photos/media/c").status, 204)
        # "c"'s blob goes once past the grace; "a"'s stays, as "b" still references it.
        self.wait_for("the unreferenced blob is collected everywhere", lambda: all(
            sha_own not in stored_blobs(self.c.root, i) for i in (1, 2, 3)))
        for i in (1, 2, 3):
            self.assertIn(sha_shared, stored_blobs(self.c.root, i))
        g = self.c.request(3, "GET", "/v1/db/photos/media/b")
        self.assertEqual((g.status, g.body), (200, shared))
        # Dropping the database drops its media, and the blobs follow.
        self.assertEqual(self.c.request(1, "DELETE", "/v1/db/photos").status, 204)
        self.wait_for("the dropped database's blobs are collected", lambda: all(
            not stored_blobs(self.c.root, i) for i in (1, 2, 3)))


    def test_d3b_media_get_and_delete(self):
        data = os.urandom(70_000)
        self.assertEqual(self.upload(1, "f1", data).status, 201)
        r = self.c.request(2, "POST", "/", {"table": "photos", "query": "", "media_op": "get",
                                            "file_id": "f1"})
        self.assertEqual((r.status, r.body), (200, data))
        r = self.c.request(3, "POST", "/", {"table": "photos", "query": "", "media_op": "get",
                                            "file_id": "f1"}, headers={"Range": "bytes=0-9"})
        self.assertEqual((r.status, r.body), (206, data[:10]))
        for bad in ({"media_op": "get"}, {"media_op": "rename", "file_id": "f1"},
                    {"media_op": "get", "file_id": "../x"}):
            r = self.c.request(1, "POST", "/", dict({"table": "photos", "query": ""}, **bad))
            self.assertEqual(r.status, 400, (bad, r))
        r = self.c.request(1, "POST", "/", {"table": "photos", "query": "", "media_op": "upload"})
        self.assertEqual(r.status, 400, r)
        r = self.c.request(1, "POST", "/", {"table": "photos", "query": "",
                                            "media_op": "delete", "file_id": "f1"})
        self.assertEqual(r.status, 204, r)
        r = self.c.request(2, "POST", "/", {"table": "photos", "query": "", "media_op": "get",
                                            "file_id": "f1"})
        self.assertEqual(r.status, 404, r)


    def d3b_upload(self, i, fields, file_bytes, boundary="b0undary", file_type="image/png"):
        parts = []
        if fields is not None:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="json"\r\n\r\n'
                         .encode() + json.dumps(fields).encode() + b"\r\n")
        if file_bytes is not None:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                         f'filename="x.png"\r\nContent-Type: {file_type}\r\n\r\n'.encode()
                         + file_bytes + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.c.request(i, "POST", "/", body=body, timeout=60, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"})

    def test_d3b_multipart_upload_runs_its_sql_with_the_metadata(self):
        r = self.c.exec(1, "photos", "CREATE TABLE photo(name TEXT UNIQUE, file_id TEXT)")
        self.assertEqual(r.status, 200, r)
        data = os.urandom(2 * 1048576 + 5)
        insert = {"table": "photos", "media_op": "upload", "args": ["cat"],
                  "query": "INSERT INTO photo(name, file_id) VALUES (?, ?) RETURNING name, file_id"}
        r = self.d3b_upload(2, insert, data)
        self.assertEqual(r.status, 200, r)
        answer = r.json()
        file_id = answer["file_id"]
        self.assertEqual(answer["sha256"], hashlib.sha256(data).hexdigest())
        self.assertEqual(answer["rows"], [{"name": "cat", "file_id": file_id}])
        g = self.c.request(3, "POST", "/", {"table": "photos", "query": "", "media_op": "get",
                                            "file_id": file_id}, timeout=60)
        self.assertEqual((g.status, g.body), (200, data))
        self.assertEqual(g.headers["Content-Type"], "image/png")
        q = self.c.request(1, "POST", "/", {"table": "photos", "query": "SELECT name FROM photo",
                                            "args": []})
        self.assertEqual(q.json(), [{"name": "cat"}])
        # The SQL fails (the name is taken): no row, no metadata, and the blob goes.
        r = self.d3b_upload(1, insert, b"other bytes")
        self.assertEqual(r.status, 400, r)
        listed = self.c.request(1, "GET", "/v1/db/photos/media").json()["media"]
        self.assertEqual([m["key"] for m in listed], [file_id])
        sha_other = hashlib.sha256(b"other bytes").hexdigest()
        self.wait_for("the refused upload's blob is collected", lambda: all(
            sha_other not in stored_blobs(self.c.root, i) for i in (1, 2, 3)))
        # Bad bodies: no file part, no json, a json that is not an upload, no boundary.
        self.assertEqual(self.d3b_upload(1, insert, None).status, 400)
        self.assertEqual(self.d3b_upload(1, None, b"x").status, 400)
        self.assertEqual(self.d3b_upload(1, dict(insert, media_op="get"), b"x").status, 400)
        self.assertEqual(self.d3b_upload(1, dict(insert, table="no/such"), b"x").status, 400)
        r = self.d3b_upload(1, dict(insert, query="PRAGMA journal_mode = OFF"), b"x")
        self.assertEqual(r.status, 400, r)
        # A json field over --max-json-body-bytes (3 MiB by default).
        r = self.d3b_upload(1, dict(insert, query="SELECT 1 -- " + "x" * (3 << 20)), b"x")
        self.assertEqual(r.status, 400, r)
        self.assertIn("--max-json-body-bytes", r.json()["error"]["message"])
        r = self.c.request(1, "POST", "/", body=b"--x--", headers={"Content-Type": "multipart/form-data"})
        self.assertEqual(r.status, 400, r)
        # d3b delete; the row stays (it is the application's), the file goes.
        r = self.c.request(1, "POST", "/", {"table": "photos", "query": "", "media_op": "delete",
                                            "file_id": file_id})
        self.assertEqual(r.status, 204, r)
        self.assertEqual(self.c.request(2, "GET", f"/v1/db/photos/media/{file_id}").status, 404)


class MediaBadInput(MediaTest):
    flags = MediaTest.flags + ("--max-media-bytes", str(4 << 20))

    def assert_nothing_left(self):
        time.sleep(0.3)
        for i in (1, 2, 3):
            self.assertEqual(blob_files(self.c.root, i), [], f"replica {i} kept files")
        r = self.c.request(1, "GET", "/v1/db/photos/media")
        self.assertEqual(r.json()["media"], [])

    def test_every_bad_upload_gets_its_error_and_leaves_nothing(self):
        for key in ("..", "a..b", "a%2Fb", "a%00b", "a%0Ab", "x" * 201, "%2E%2E", "sp%20ace"):
            self.assert_error(self.upload(1, key, b"data"), 400, f"key {key!r}")
        self.assert_error(self.upload(1, "k", b"data", db="bad%2Fdb"), 400, "database name")
        self.assert_error(self.upload(1, "k", b"data", content_type="text/\x7fplain"), 400,
                          "content type")
        wrong = hashlib.sha256(b"other").hexdigest()
        self.assert_error(self.upload(1, "k", b"data", headers={"Content-SHA256": wrong}), 400,
                          "Content-SHA256 mismatch")
        self.assert_error(self.upload(1, "k", b"data", headers={"Content-SHA256": "zz"}), 400,
                          "malformed Content-SHA256")
        self.assert_error(
            self.upload(1, "k", b"data", headers={"Digest": "sha-256=AAAA"}), 400,
            "malformed Digest")
        self.assert_error(self.upload(1, "k", b"data", db="nosuchdb"), 404, "unknown database")
        # A matching digest is taken.
        good = hashlib.sha256(b"data").digest()
        import base64
        r = self.upload(1, "ok", b"data",
                        headers={"Digest": "sha-256=" + base64.b64encode(good).decode()})
        self.assertEqual(r.status, 201, r)
        self.assertEqual(self.c.request(1, "DELETE", "/v1/db/photos/media/ok").status, 204)
        # Over --max-media-bytes (set low below) before any byte of the body.
        r = self.c.request(1, "PUT", "/v1/db/photos/media/big",
                           headers={"Content-Length": str(5 << 20)}, body=None)
        self.assert_error(r, 413, "too large")
        self.wait_for("the deleted blob is collected",
                      lambda: all(not blob_files(self.c.root, i) for i in (1, 2, 3)))
        self.assert_nothing_left()

    def test_a_client_leaving_mid_upload_leaves_nothing(self):
        s = socket.create_connection(("127.0.0.1", self.c.ports[0]))
        s.sendall(b"PUT /v1/db/photos/media/cut HTTP/1.1\r\nHost: t\r\n"
                  b"Content-Length: 3000000\r\n\r\n" + os.urandom(1_000_000))
        self.wait_for("the partial upload is on disk", lambda: any(
            "tmp" in p for p in blob_files(self.c.root, 1)))
        s.close()
        self.wait_for("the partial upload is gone", lambda: not blob_files(self.c.root, 1))
        self.assert_nothing_left()

    def test_no_majority_for_the_bytes_is_503_and_commits_nothing(self):
        self.c.kill(2)
        self.c.kill(3)
        r = self.upload(1, "lonely", os.urandom(10_000))
        self.assert_error(r, 503, "no majority")
        self.c.start(2)
        self.c.start(3)
        self.c.wait_ready()
        r = self.c.request(2, "GET", "/v1/db/photos/media/lonely")
        self.assertEqual(r.status, 404, r)
        # The bytes replica 1 stored go too, once past the grace.
        self.wait_for("the refused upload's blob is collected",
                      lambda: all(not blob_files(self.c.root, i) for i in (1, 2, 3)))
        self.assert_nothing_left()


def sqlite_image(table, rows, row_bytes, wal=False):
    """The bytes of a new SQLite database file with `rows` random blobs in `table`."""
    import sqlite3
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "image.db")
        db = sqlite3.connect(path)
        if wal:
            db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"CREATE TABLE {table}(id INTEGER PRIMARY KEY, b BLOB)")
        for _ in range(rows):
            db.execute(f"INSERT INTO {table}(b) VALUES (randomblob({row_bytes}))")
        db.commit()
        if wal:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        with open(path, "rb") as f:
            return f.read()


def staged_files(root, i):
    d = os.path.join(root, str(i), "staged-images")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


class DatabaseUploads(MediaTest):
    """Database images over --max-body-bytes stream to disk as blobs and are proposed by
    reference; each replica stages the image (fetching it if it lacks it) before applying."""
    flags = MediaTest.flags + ("--max-body-bytes", "65536", "--max-database-bytes",
                               str(8 << 20))

    def put_image(self, i, name, data, headers=None):
        h = {"Content-Type": "application/vnd.sqlite3"}
        h.update(headers or {})
        return self.c.request(i, "PUT", f"/v1/db/{name}", body=data, headers=h, timeout=60)

    def count(self, i, name, min_revision=0):
        try:
            r = self.c.query(i, name, "SELECT count(*), sum(length(b)) FROM t",
                             consistency="local", min_revision=min_revision)
        except OSError as e:  # not listening yet
            return e
        return r.json()["rows"][0] if r.status == 200 else r

    def test_a_replica_down_at_upload_fetches_the_image_when_it_applies_it(self):
        self.c.kill(3)
        data = sqlite_image("t", 12, 100_000, wal=True)
        self.assertGreater(len(data), 65536)
        r = self.put_image(1, "big", data)
        self.assertEqual(r.status, 201, r)
        body = r.json()
        sha = hashlib.sha256(data).hexdigest()
        self.assertEqual((body["name"], body["sha256"], body["size"]), ("big", sha, len(data)))
        revision = body["revision"]
        self.assertEqual(self.count(2, "big", revision), [12, 1_200_000])
        # Replica 2 checked its copy as the push ended, and applied the entry with it.
        metrics = self.c.request(2, "GET", "/metrics").body.decode()
        self.assertIn("synod_database_images_prestaged_total 1\n", metrics)
        self.assertIn("synod_database_images_staged_total 0\n", metrics)
        # Past the grace, the image's blob is kept where it is: the log still names it.
        time.sleep(5)
        for i in (1, 2):
            self.assertIn(sha, stored_blobs(self.c.root, i), f"replica {i}")
        self.c.start(3)
        self.wait_for("replica 3 applies the upload", lambda: self.count(3, "big", revision)
                      == [12, 1_200_000])
        self.assertIn(sha, stored_blobs(self.c.root, 3))
        for i in (1, 2, 3):
            self.assertEqual(staged_files(self.c.root, i), [], f"replica {i}")
        # A chunked upload (its size unknown) streams too.
        conn = http.client.HTTPConnection("127.0.0.1", self.c.ports[1], timeout=60)
        pieces = [data[k:k + 300_000] for k in range(0, len(data), 300_000)]
        conn.request("PUT", "/v1/db/chunked", body=iter(pieces), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        r = conn.getresponse()
        answer = r.read()
        self.assertEqual(r.status, 201, answer)
        revision = json.loads(answer)["revision"]
        conn.close()
        for i in (1, 2, 3):
            self.assertEqual(self.count(i, "chunked", revision), [12, 1_200_000], f"replica {i}")

    def test_bad_and_oversized_images_are_refused_and_commit_nothing(self):
        before = self.c.status(1)["revision"]
        garbage = os.urandom(200_000)
        r = self.put_image(1, "garbage", garbage)
        self.assert_error(r, 400, "not an SQLite file")
        self.assertEqual(r.json()["error"]["code"], "invalid_argument")
        # An SQLite header over garbage: refused by the check before anything is proposed.
        header = sqlite_image("t", 1, 10)[:100]
        r = self.put_image(1, "damaged", header + garbage)
        self.assert_error(r, 400, "damaged image")
        # An image with a table of Synod's own.
        import sqlite3  # noqa: F401
        reserved = sqlite_image("_synod_sessions", 3, 40_000)
        self.assert_error(self.put_image(1, "reserved", reserved), 400, "reserved table")
        self.assert_error(self.put_image(1, "bad.name", reserved), 400, "bad name")
        # Over --max-database-bytes: refused before the body.
        r = self.c.request(1, "PUT", "/v1/db/huge", headers={"Content-Length": str(9 << 20)},
                           body=None)
        self.assert_error(r, 413, "over --max-database-bytes")
        names = [d["name"] for d in self.c.request(2, "GET", "/v1/db").json()["databases"]]
        self.assertEqual(names, ["photos"])
        self.assertEqual(self.c.status(1)["revision"], before)
        self.assertEqual(staged_files(self.c.root, 1), [])
        # The peers' own checks of the pushed copies (begun as each push ended) keep nothing.
        self.wait_for("no staged copy is left",
                      lambda: all(not staged_files(self.c.root, i) for i in (1, 2, 3)))
        for i in (2, 3):
            metrics = self.c.request(i, "GET", "/metrics").body.decode()
            self.assertIn("synod_database_images_prestaged_total 0\n", metrics)
        # Their blobs are unreferenced, and collected past the grace.
        self.wait_for("the refused images' blobs are collected",
                      lambda: all(not blob_files(self.c.root, i) for i in (1, 2, 3)))


class MediaDiskFull(MediaTest):
    flags = MediaTest.flags + ("--max-media-bytes", str(1 << 50))

    def test_an_upload_the_disk_cannot_hold_is_507_before_a_byte_is_stored(self):
        # 500 TiB declared: more than the disk has free, within --max-media-bytes.
        r = self.c.request(1, "PUT", "/v1/db/photos/media/huge",
                           headers={"Content-Length": str(500 << 40)}, body=None)
        self.assertEqual(r.status, 507, r)
        self.assertEqual(r.json()["error"]["code"], "insufficient_storage")
        for i in (1, 2, 3):
            self.assertEqual(blob_files(self.c.root, i), [])


if __name__ == "__main__":
    SERVER = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)

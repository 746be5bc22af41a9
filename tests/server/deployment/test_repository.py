"""The package repository: index rules, range arithmetic, and a real server answering raw HTTP requests —
lengths, digests, ranges (and a real resumed download), refusals of traversal, unknown files, listings
and other methods."""
from __future__ import annotations

import hashlib
import os
import socket

import pytest
from twisted.internet import reactor, threads
from twisted.python import usage
from twisted.trial import unittest

from dsmt.server.deployment import repository
from dsmt.server.deployment.fetch import PART_SUFFIX, Fetcher
from dsmt.server.deployment.repository import (
    INDEX_NAME, Index, Options, Repository, RepositoryError, add_to_index, format_index, makeService, parse_index,
    parse_range, repository_site,
)

DIGEST = "ab" * 32


# -- ranges ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header, size, expected", [
    (None, 100, None),
    (b"bytes=0-99", 100, (0, 99)),
    (b"bytes=10-", 100, (10, 99)),
    (b"bytes=10-1000", 100, (10, 99)),
    (b"bytes = 5 - 6", 100, (5, 6)),
    (b"bytes=-5", 100, (95, 99)),
    (b"bytes=-500", 100, (0, 99)),
    (b"bytes=99-99", 100, (99, 99)),
    (b"bytes=100-", 100, "unsatisfiable"),
    (b"bytes=-0", 100, "unsatisfiable"),
    (b"bytes=0-", 0, "unsatisfiable"),
    (b"bytes=-3", 0, "unsatisfiable"),
    (b"bytes=6-5", 100, None),               # invalid: ignored
    (b"bytes=0-1,5-6", 100, None),           # several ranges: the whole file
    (b"bytes=-", 100, None),
    (b"items=0-5", 100, None),
    (b"bytes=" + b"9" * 40 + b"-", 100, None),
    (b"\xff\x00", 100, None),
])
def test_parse_range(header, size, expected):
    assert parse_range(header, size) == expected


# -- the index -----------------------------------------------------------------------------------------


def test_index_parses_sha256sum_output_and_round_trips():
    data = f"{DIGEST.upper()}  b.tgz\n\n{'cd' * 32} *a.zip\n".encode()
    index = parse_index(data)
    assert index.entries == {"b.tgz": DIGEST, "a.zip": "cd" * 32}
    assert "a.zip" in index and "c" not in index
    assert format_index(index) == f"{'cd' * 32}  a.zip\n{DIGEST}  b.tgz\n".encode()
    assert parse_index(format_index(index)) == index


@pytest.mark.parametrize("data, words", [
    (b"abc  x.tgz\n", "line 1 is not"),
    (f"{DIGEST} x.tgz\n".encode(), "line 1 is not"),
    (f"{DIGEST}  ok.tgz\n{DIGEST}  ../etc/passwd\n".encode(), "line 2: '../etc/passwd' is not a plain file name"),
    (f"{DIGEST}  sub/x.tgz\n".encode(), "not a plain file name"),
    (f"{DIGEST}  .hidden\n".encode(), "not a plain file name"),
    (f"{DIGEST}  x\x01y\n".encode(), "not a plain file name"),
    (f"{DIGEST}  x.tgz\n{DIGEST}  x.tgz\n".encode(), "line 2 lists 'x.tgz' a second time"),
    (f"{DIGEST}  {INDEX_NAME}\n".encode(), "lists the index itself"),
    (b"\xff\xfe", "not UTF-8"),
    (b"#" * (repository.MAX_INDEX_BYTES + 1), "over 1048576 bytes"),
])
def test_bad_indexes_are_refused_with_the_line(data, words):
    with pytest.raises(RepositoryError) as caught:
        parse_index(data)
    assert caught.value.code == "index" and words in caught.value.reason


def test_an_index_with_too_many_entries_is_refused():
    data = "".join(f"{DIGEST}  p{i}.tgz\n" for i in range(repository.MAX_INDEX_ENTRIES + 1)).encode()
    with pytest.raises(RepositoryError, match="more than 10000 packages"):
        parse_index(data)


def test_add_to_index_writes_sorted_atomically_and_replaces(tmp_path):
    add_to_index(str(tmp_path), "z.tgz", DIGEST)
    index = add_to_index(str(tmp_path), "a.tgz", "CD" * 32)
    assert index.entries == {"z.tgz": DIGEST, "a.tgz": "cd" * 32}
    add_to_index(str(tmp_path), "z.tgz", "ef" * 32)
    assert (tmp_path / INDEX_NAME).read_text() == f"{'cd' * 32}  a.tgz\n{'ef' * 32}  z.tgz\n"
    assert sorted(os.listdir(tmp_path)) == [INDEX_NAME]            # no temporary file left


@pytest.mark.parametrize("name, digest, words", [
    ("../x.tgz", DIGEST, "not a plain file name"),
    ("x.tgz", "nothex", "not a SHA-256 digest"),
    (INDEX_NAME, DIGEST, "cannot be named"),
])
def test_add_to_index_refuses_bad_entries(tmp_path, name, digest, words):
    with pytest.raises(RepositoryError, match=words):
        add_to_index(str(tmp_path), name, digest)
    assert not (tmp_path / INDEX_NAME).exists()


def test_add_to_index_refuses_to_extend_a_broken_index(tmp_path):
    (tmp_path / INDEX_NAME).write_text("garbage\n")
    with pytest.raises(RepositoryError, match="line 1"):
        add_to_index(str(tmp_path), "x.tgz", DIGEST)
    assert (tmp_path / INDEX_NAME).read_text() == "garbage\n"


def test_a_repository_needs_a_directory(tmp_path):
    with pytest.raises(RepositoryError, match="not a directory"):
        Repository(str(tmp_path / "missing"))


# -- the twistd service ----------------------------------------------------------------------------------


def test_options_and_service(tmp_path):
    with pytest.raises(usage.UsageError, match="give --root"):
        Options().parseOptions([])
    with pytest.raises(usage.UsageError, match="not a directory"):
        Options().parseOptions(["--root", str(tmp_path / "missing")])
    (tmp_path / INDEX_NAME).write_text("garbage\n")
    with pytest.raises(usage.UsageError, match="index: SHA256SUMS line 1"):
        Options().parseOptions(["--root", str(tmp_path)])
    (tmp_path / "ok").mkdir()
    add_to_index(str(tmp_path / "ok"), "x.tgz", DIGEST)
    options = Options()
    options.parseOptions(["--root", str(tmp_path / "ok"), "--listen", "tcp:0:interface=127.0.0.1"])
    assert options["listen"] == "tcp:0:interface=127.0.0.1"
    assert makeService(options).endpoint is not None
    assert Options()["listen"] == repository.DEFAULT_LISTEN


# -- a real server ------------------------------------------------------------------------------------------


def raw_request(port: int, request: bytes):
    """Send ``request`` as is (no client normalises the path) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        headers[key.strip().lower().decode()] = value.strip().decode()
    return int(lines[0].split()[1]), headers, body


class ServedRepository(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.root = os.path.join(self.dir, "repo")
        os.makedirs(self.root)
        self.data = os.urandom(200_000)
        self.digest = hashlib.sha256(self.data).hexdigest()
        self.put("xyz-1.0.0.tgz", self.data)
        with open(os.path.join(self.dir, "secret"), "wb") as out:
            out.write(b"outside the repository")
        with open(os.path.join(self.root, "unlisted.tgz"), "wb") as out:
            out.write(b"not in the index")
        site = repository_site(self.root)
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.number = self.port.getHost().port

    def put(self, name: str, data: bytes) -> None:
        with open(os.path.join(self.root, name), "wb") as out:
            out.write(data)
        add_to_index(self.root, name, hashlib.sha256(data).hexdigest())

    def request(self, method: str, path: str, *headers: str):
        text = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        text += "".join(f"{header}\r\n" for header in headers) + "\r\n"
        return threads.deferToThread(raw_request, self.number, text.encode("latin-1"))

    def run_async(self, coroutine):
        from twisted.internet import defer
        return defer.ensureDeferred(coroutine)

    def test_get_serves_the_exact_bytes_with_length_and_no_encoding(self):
        async def run():
            status, headers, body = await self.request("GET", "/xyz-1.0.0.tgz")
            self.assertEqual(status, 200)
            self.assertEqual(body, self.data)
            self.assertEqual(hashlib.sha256(body).hexdigest(), self.digest)
            self.assertEqual(headers["content-length"], str(len(self.data)))
            self.assertEqual(headers["content-type"], "application/octet-stream")
            self.assertEqual(headers["accept-ranges"], "bytes")
            self.assertEqual(headers["etag"], f'"{self.digest}"')
            self.assertNotIn("content-encoding", headers)
            self.assertNotIn("transfer-encoding", headers)
        return self.run_async(run())

    def test_a_tar_gz_is_not_marked_gzip_encoded(self):
        async def run():
            self.put("app.tar.gz", b"\x1f\x8b" + b"x" * 100)
            status, headers, body = await self.request("GET", "/app.tar.gz")
            self.assertEqual((status, body), (200, b"\x1f\x8b" + b"x" * 100))
            self.assertNotIn("content-encoding", headers)
        return self.run_async(run())

    def test_head_gives_the_headers_and_no_body(self):
        async def run():
            status, headers, body = await self.request("HEAD", "/xyz-1.0.0.tgz")
            self.assertEqual((status, body), (200, b""))
            self.assertEqual(headers["content-length"], str(len(self.data)))
            status, headers, body = await self.request("HEAD", "/missing.tgz")
            self.assertEqual((status, body), (404, b""))
        return self.run_async(run())

    def test_ranges(self):
        async def run():
            size = len(self.data)
            status, headers, body = await self.request("GET", "/xyz-1.0.0.tgz", "Range: bytes=1000-")
            self.assertEqual((status, body), (206, self.data[1000:]))
            self.assertEqual(headers["content-range"], f"bytes 1000-{size - 1}/{size}")
            self.assertEqual(headers["content-length"], str(size - 1000))
            status, headers, body = await self.request("GET", "/xyz-1.0.0.tgz", "Range: bytes=-10")
            self.assertEqual((status, body), (206, self.data[-10:]))
            status, headers, body = await self.request("GET", "/xyz-1.0.0.tgz", "Range: bytes=5-9")
            self.assertEqual((status, body, headers["content-range"]), (206, self.data[5:10], f"bytes 5-9/{size}"))
            status, headers, body = await self.request("GET", "/xyz-1.0.0.tgz", f"Range: bytes={size}-")
            self.assertEqual(status, 416)
            self.assertEqual(headers["content-range"], f"bytes */{size}")
            for ignored in ("Range: bytes=0-1,4-5", "Range: lines=1-2", "Range: bytes=9-2"):
                status, headers, body = await self.request("GET", "/xyz-1.0.0.tgz", ignored)
                self.assertEqual((status, len(body)), (200, size), ignored)
            status, _, body = await self.request("GET", "/xyz-1.0.0.tgz", "Range: bytes=10-", 'If-Range: "old"')
            self.assertEqual((status, body), (200, self.data))
            status, _, body = await self.request("GET", "/xyz-1.0.0.tgz", "Range: bytes=10-",
                                                 f'If-Range: "{self.digest}"')
            self.assertEqual((status, body), (206, self.data[10:]))
            status, headers, body = await self.request("HEAD", "/xyz-1.0.0.tgz", "Range: bytes=10-19")
            self.assertEqual((status, headers["content-length"], body), (206, "10", b""))
        return self.run_async(run())

    def test_the_fetcher_resumes_a_partial_download_from_it(self):
        async def run():
            downloads = os.path.join(self.dir, "downloads")
            os.makedirs(downloads)
            with open(os.path.join(downloads, "p.tgz" + PART_SUFFIX), "wb") as out:
                out.write(self.data[:123_456])
            path = await Fetcher(reactor=reactor, idle_timeout=5).fetch(
                f"http://127.0.0.1:{self.number}/xyz-1.0.0.tgz", downloads, "p.tgz", self.digest)
            with open(path, "rb") as stream:
                self.assertEqual(stream.read(), self.data)
        return self.run_async(run())

    def test_traversal_unknown_files_and_listings_are_404(self):
        async def run():
            os.makedirs(os.path.join(self.root, "sub"))
            with open(os.path.join(self.root, "sub", "x.tgz"), "wb") as out:
                out.write(b"x")
            for path in ("/", "/unlisted.tgz", "/../secret", "/%2e%2e/secret", "/..%2fsecret", "/%2e%2e%2fsecret",
                         "/sub/x.tgz", "/sub%2fx.tgz", "/sub/", "/xyz-1.0.0.tgz/", "/xyz-1.0.0.tgz/x",
                         "//xyz-1.0.0.tgz", "/./xyz-1.0.0.tgz", "/%00", "/" + "a" * 5000,
                         "http://elsewhere/../secret"):
                status, headers, body = await self.request("GET", path)
                self.assertEqual(status, 404, path)
                self.assertNotIn(b"outside", body)
                self.assertNotIn(b"xyz-1.0.0.tgz", body)
                self.assertEqual(headers["content-type"], "text/plain; charset=utf-8")
        return self.run_async(run())

    def test_listed_links_directories_and_missing_files_are_404(self):
        async def run():
            os.symlink(os.path.join(self.dir, "secret"), os.path.join(self.root, "link.tgz"))
            add_to_index(self.root, "link.tgz", DIGEST)
            os.makedirs(os.path.join(self.root, "dir.tgz"))
            add_to_index(self.root, "dir.tgz", DIGEST)
            add_to_index(self.root, "gone.tgz", DIGEST)
            for name, words in (("link.tgz", b"symbolic link, which is never followed"), ("dir.tgz", b"not a regular file"),
                                ("gone.tgz", b"missing")):
                status, _, body = await self.request("GET", f"/{name}")
                self.assertEqual(status, 404, name)
                self.assertIn(words, body)
                self.assertNotIn(b"outside", body)
        return self.run_async(run())

    def test_other_methods_are_405(self):
        async def run():
            for method in ("POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PROPFIND", "BREW"):
                status, headers, body = await self.request(method, "/xyz-1.0.0.tgz", "Content-Length: 0")
                self.assertEqual(status, 405, method)
                self.assertEqual(headers["allow"], "GET, HEAD")
                self.assertIn(b"only GET and HEAD", body)
            self.assertTrue(os.path.exists(os.path.join(self.root, "xyz-1.0.0.tgz")))
        return self.run_async(run())

    def test_the_index_is_served_and_followed_without_a_restart(self):
        async def run():
            status, headers, body = await self.request("GET", f"/{INDEX_NAME}")
            self.assertEqual(status, 200)
            self.assertEqual(parse_index(body), Index({"xyz-1.0.0.tgz": self.digest}))
            self.assertNotIn("etag", headers)
            self.put("new.tgz", b"new package")
            status, _, body = await self.request("GET", "/new.tgz")
            self.assertEqual((status, body), (200, b"new package"))
        return self.run_async(run())

    def test_a_broken_index_makes_every_request_503_with_the_reason(self):
        async def run():
            with open(os.path.join(self.root, INDEX_NAME), "ab") as out:
                out.write(b"not a line\n")
            status, _, body = await self.request("GET", "/xyz-1.0.0.tgz")
            self.assertEqual(status, 503)
            self.assertEqual(body, f"{INDEX_NAME} line 2 is not '<sha256>  <name>'\n".encode())
            os.unlink(os.path.join(self.root, INDEX_NAME))
            os.symlink(os.path.join(self.dir, "secret"), os.path.join(self.root, INDEX_NAME))
            status, _, body = await self.request("GET", "/xyz-1.0.0.tgz")
            self.assertEqual(status, 503)
            self.assertIn(b"cannot open SHA256SUMS", body)
            os.unlink(os.path.join(self.root, INDEX_NAME))
            os.makedirs(os.path.join(self.root, INDEX_NAME))
            status, _, body = await self.request("GET", "/xyz-1.0.0.tgz")
            self.assertEqual((status, body), (503, b"SHA256SUMS is not a regular file\n"))
        return self.run_async(run())

    def test_an_empty_repository_serves_nothing(self):
        async def run():
            os.unlink(os.path.join(self.root, INDEX_NAME))
            status, _, _ = await self.request("GET", "/xyz-1.0.0.tgz")
            self.assertEqual(status, 404)
        return self.run_async(run())

"""Package downloads: the pure bookkeeping without a reactor, then real twisted.web servers on 127.0.0.1."""
from __future__ import annotations

import hashlib
import os

import pytest
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server, static

from dsmt.server.deployment.fetch import (
    PART_SUFFIX, FetchError, Fetcher, PartialDownload, Verdict, _endpoint_factory_class, check_file_name, check_url,
    client_endpoint,
)
from dsmt.server.refusal import Refusal

PAYLOAD = os.urandom(200_000)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def refusal(code: str, call, *args, **kwargs) -> FetchError:
    with pytest.raises(FetchError) as caught:
        call(*args, **kwargs)
    assert caught.value.code == code, str(caught.value)
    return caught.value


# -- URL and name checks -------------------------------------------------------------------------

@pytest.mark.parametrize("url, fragment", [
    ("ftp://example.org/p.tar", "scheme 'ftp'"),
    ("gopher://example.org/", "scheme"),
    ("http:///p.tar", "no host"),
    ("http://user:secret@example.org/p.tar", "credentials"),
    ("http://example.org/a b", "space"),
    ("http://example.org/\x00", "control"),
    ("http://example.org:99999/", "malformed"),
    ("http://example.org/" + "a" * 3000, "over 2048"),
    ("file://otherhost/etc/passwd", "names the host"),
    ("file:///etc/passwd", "none are configured"),
    ("", "empty"),
])
def test_hostile_urls(url, fragment):
    assert fragment in refusal("bad-url", check_url, url).reason


def test_file_urls_only_under_roots(tmp_path):
    root = tmp_path / "packages"
    root.mkdir()
    (root / "p.tar").write_bytes(b"x")
    assert check_url(f"file://{root}/p.tar", [str(root)]) == ("file", str(root / "p.tar"))
    assert check_url(f"file://localhost{root}/p%2Etar", [str(root)])[1] == str(root / "p.tar")
    refusal("bad-url", check_url, f"file://{root}/../secret", [str(root)])
    os.symlink("/etc/passwd", root / "sneaky")
    refusal("bad-url", check_url, f"file://{root}/sneaky", [str(root)])
    assert check_url("https://example.org:8443/p.tar") == ("https", None)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", ".hidden", "x" * 251, "a\nb"])
def test_bad_file_names(name):
    refusal("bad-url", check_file_name, name)


# -- the pure bookkeeping ------------------------------------------------------------------------

def test_full_download_verifies_and_renames(tmp_path):
    download = PartialDownload(str(tmp_path), "p.tar", DIGEST.upper())
    assert download.range_header is None
    assert download.accept(200, None, len(PAYLOAD)) is Verdict.WRITE
    for start in range(0, len(PAYLOAD), 7000):
        download.write(PAYLOAD[start:start + 7000])
    assert download.complete() == str(tmp_path / "p.tar")
    assert (tmp_path / "p.tar").read_bytes() == PAYLOAD and not (tmp_path / ("p.tar" + PART_SUFFIX)).exists()
    assert PartialDownload(str(tmp_path), "p.tar", DIGEST).already_complete()


def test_resume_appends_after_a_matching_206(tmp_path):
    (tmp_path / "p.tar.part").write_bytes(PAYLOAD[:1000])
    download = PartialDownload(str(tmp_path), "p.tar", DIGEST)
    assert download.range_header == b"bytes=1000-"
    assert download.accept(206, b"bytes 1000-199999/200000") is Verdict.WRITE
    download.write(PAYLOAD[1000:])
    assert open(download.complete(), "rb").read() == PAYLOAD


def test_200_to_a_range_request_restarts(tmp_path):
    (tmp_path / "p.tar.part").write_bytes(b"garbage")
    download = PartialDownload(str(tmp_path), "p.tar", DIGEST)
    assert download.accept(200) is Verdict.WRITE and download.offset == 0
    download.write(PAYLOAD)
    assert open(download.complete(), "rb").read() == PAYLOAD


@pytest.mark.parametrize("status, content_range", [(206, b"bytes 0-10/200000"), (206, None), (416, None)])
def test_unusable_range_answers_retry_in_full(tmp_path, status, content_range):
    (tmp_path / "p.tar.part").write_bytes(PAYLOAD[:1000])
    download = PartialDownload(str(tmp_path), "p.tar", DIGEST)
    assert download.accept(status, content_range) is Verdict.RETRY_FULL
    assert download.range_header is None and not (tmp_path / "p.tar.part").exists()


def test_checksum_mismatch_deletes(tmp_path):
    download = PartialDownload(str(tmp_path), "p.tar", "00" * 32)
    download.accept(200)
    download.write(PAYLOAD)
    error = refusal("checksum", download.complete)
    assert DIGEST in error.reason and os.listdir(tmp_path) == []


def test_size_limits(tmp_path):
    download = PartialDownload(str(tmp_path), "p.tar", DIGEST, max_bytes=1000)
    refusal("too-large", download.accept, 200, None, 1001)
    download = PartialDownload(str(tmp_path), "p.tar", DIGEST, max_bytes=1000)
    download.accept(200)
    download.write(b"x" * 1000)
    refusal("too-large", download.write, b"x")
    assert os.listdir(tmp_path) == []
    (tmp_path / "p.tar.part").write_bytes(b"x" * 10)
    refusal("too-large", PartialDownload(str(tmp_path), "p.tar", DIGEST, max_bytes=1000).accept, 206,
            b"bytes 10-5000/5001")


def test_http_status_and_bad_digest(tmp_path):
    assert "HTTP 404" in refusal("http-status", PartialDownload(str(tmp_path), "p", DIGEST).accept, 404).reason
    refusal("http-status", PartialDownload(str(tmp_path), "p", DIGEST).accept, 206, b"bytes 0-1/2")
    refusal("checksum", PartialDownload, str(tmp_path), "p", "not-a-digest")
    refusal("io", PartialDownload, str(tmp_path / "missing"), "p", DIGEST)


def test_refusals_are_refusals():
    assert issubclass(FetchError, Refusal)


# -- over real HTTP ------------------------------------------------------------------------------

# -- connections ---------------------------------------------------------------------------------

def test_ip_literals_are_connected_without_name_resolution():
    from twisted.internet import endpoints
    # Made, not connected: no reactor run needed.
    assert isinstance(client_endpoint(reactor, "127.0.0.1", 80), endpoints.TCP4ClientEndpoint)
    assert isinstance(client_endpoint(reactor, "::1", 80), endpoints.TCP6ClientEndpoint)
    assert isinstance(client_endpoint(reactor, "localhost", 80), endpoints.HostnameEndpoint)
    assert client_endpoint(reactor, "127.0.0.1", 80, timeout=2)._timeout == 2


def test_the_agent_endpoints_wrap_https_in_tls_and_refuse_other_schemes():
    from twisted.internet import endpoints
    from twisted.web.client import URI, BrowserLikePolicyForHTTPS
    from twisted.web.error import SchemeNotSupported
    factory = _endpoint_factory_class()(reactor, BrowserLikePolicyForHTTPS())
    assert isinstance(factory.endpointForURI(URI.fromBytes(b"http://10.0.0.1:81/p")), endpoints.TCP4ClientEndpoint)
    tls = factory.endpointForURI(URI.fromBytes(b"https://10.0.0.1/p"))
    assert isinstance(tls, endpoints._WrapperEndpoint)
    assert isinstance(tls._wrappedEndpoint, endpoints.TCP4ClientEndpoint)
    with pytest.raises(SchemeNotSupported):
        factory.endpointForURI(URI.fromBytes(b"gopher://10.0.0.1/p"))


class Recorder(resource.Resource):
    """Serves PAYLOAD at any path: with Range support (static.File), without, cut short, or never."""

    isLeaf = True

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.mode = "range"
        self.ranges: list = []

    def render_GET(self, request):
        self.ranges.append(request.getHeader(b"range"))
        if self.mode == "range":
            return static.File(self.path).render_GET(request)
        if self.mode == "missing":
            request.setResponseCode(404)
            return b"no such package"
        if self.mode == "silent":
            return server.NOT_DONE_YET
        request.setHeader(b"content-length", b"%d" % len(PAYLOAD))
        if self.mode == "cut":
            request.write(PAYLOAD[: len(PAYLOAD) // 2])
            transport = request.channel.transport
            transport.unregisterProducer()  # else the transport waits for the channel before closing
            transport.loseConnection()
            return server.NOT_DONE_YET
        return PAYLOAD  # "norange": ignores Range, always 200


class HttpFetchTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        source = os.path.join(self.dir, "source.bin")
        with open(source, "wb") as out:
            out.write(PAYLOAD)
        self.resource = Recorder(source)
        site = server.Site(self.resource)
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/xyz.tar.gz"
        self.dest = os.path.join(self.dir, "dest")
        os.makedirs(self.dest)
        self.fetcher = Fetcher(reactor=reactor, idle_timeout=5)

    async def failure(self, code: str, sha: str = DIGEST, **kwargs) -> FetchError:
        fetcher = Fetcher(reactor=reactor, **kwargs) if kwargs else self.fetcher
        try:
            await fetcher.fetch(self.url, self.dest, "xyz.tar.gz", sha)
        except FetchError as error:
            self.assertEqual(error.code, code, str(error))
            return error
        self.fail("no FetchError")

    def path(self, suffix: str = "") -> str:
        return os.path.join(self.dest, "xyz.tar.gz" + suffix)

    @defer.inlineCallbacks
    def test_download(self):
        path = yield self.fetcher.fetch(self.url, self.dest, "xyz.tar.gz", DIGEST)
        self.assertEqual(path, self.path())
        self.assertEqual(open(path, "rb").read(), PAYLOAD)
        self.assertEqual(self.resource.ranges, [None])
        again = yield self.fetcher.fetch(self.url, self.dest, "xyz.tar.gz", DIGEST)  # already there: no transfer
        self.assertEqual((again, len(self.resource.ranges)), (path, 1))

    @defer.inlineCallbacks
    def test_interrupted_download_resumes_with_range(self):
        self.resource.mode = "cut"
        error = yield defer.ensureDeferred(self.failure("unreachable"))
        self.assertIn("kept to resume", error.reason)
        kept = os.path.getsize(self.path(PART_SUFFIX))
        self.assertTrue(0 < kept < len(PAYLOAD))
        self.resource.mode = "range"
        path = yield self.fetcher.fetch(self.url, self.dest, "xyz.tar.gz", DIGEST)
        self.assertEqual(open(path, "rb").read(), PAYLOAD)
        self.assertEqual(self.resource.ranges[-1], b"bytes=%d-" % kept)
        self.assertFalse(os.path.exists(self.path(PART_SUFFIX)))

    @defer.inlineCallbacks
    def test_server_without_range_support_restarts(self):
        with open(self.path(PART_SUFFIX), "wb") as out:
            out.write(b"stale bytes from another version")
        self.resource.mode = "norange"
        path = yield self.fetcher.fetch(self.url, self.dest, "xyz.tar.gz", DIGEST)
        self.assertEqual(open(path, "rb").read(), PAYLOAD)
        self.assertEqual(self.resource.ranges, [b"bytes=32-"])

    @defer.inlineCallbacks
    def test_part_longer_than_the_file_retries_in_full(self):
        with open(self.path(PART_SUFFIX), "wb") as out:
            out.write(PAYLOAD + b"extra")
        path = yield self.fetcher.fetch(self.url, self.dest, "xyz.tar.gz", DIGEST)  # 416, then a full request
        self.assertEqual(open(path, "rb").read(), PAYLOAD)
        self.assertEqual(self.resource.ranges, [b"bytes=200005-", None])

    @defer.inlineCallbacks
    def test_wrong_checksum_deletes(self):
        error = yield defer.ensureDeferred(self.failure("checksum", sha="11" * 32))
        self.assertIn(DIGEST, error.reason)
        self.assertEqual(os.listdir(self.dest), [])

    @defer.inlineCallbacks
    def test_404(self):
        self.resource.mode = "missing"
        error = yield defer.ensureDeferred(self.failure("http-status"))
        self.assertIn("404", error.reason)

    @defer.inlineCallbacks
    def test_too_large(self):
        error = yield defer.ensureDeferred(self.failure("too-large", max_bytes=1000))
        self.assertIn("1000", error.reason)
        self.assertEqual(os.listdir(self.dest), [])

    @defer.inlineCallbacks
    def test_too_large_without_content_length(self):
        self.resource.mode = "norange"
        fetcher = Fetcher(reactor=reactor, max_bytes=100_000)
        self.resource.render_GET = lambda request: (request.write(PAYLOAD), request.finish(), server.NOT_DONE_YET)[2]
        with self.assertRaises(FetchError) as caught:
            yield fetcher.fetch(self.url, self.dest, "xyz.tar.gz", DIGEST)
        self.assertEqual(caught.exception.code, "too-large")
        self.assertEqual(os.listdir(self.dest), [])

    @defer.inlineCallbacks
    def test_refused_connection(self):
        yield self.port.stopListening()
        error = yield defer.ensureDeferred(self.failure("unreachable"))
        self.assertIn("127.0.0.1", error.reason)

    @defer.inlineCallbacks
    def test_silent_server_times_out(self):
        self.resource.mode = "silent"
        error = yield defer.ensureDeferred(self.failure("timeout", idle_timeout=0.2))
        self.assertIn("no response", error.reason)

    @defer.inlineCallbacks
    def test_hostile_url_refused_before_any_connection(self):
        with self.assertRaises(FetchError) as caught:
            yield self.fetcher.fetch("ftp://127.0.0.1/x", self.dest, "xyz.tar.gz", DIGEST)
        self.assertEqual(caught.exception.code, "bad-url")
        with self.assertRaises(FetchError) as caught:
            yield self.fetcher.fetch(self.url, self.dest, "../escape", DIGEST)
        self.assertEqual(caught.exception.code, "bad-url")
        self.assertEqual(self.resource.ranges, [])

    @defer.inlineCallbacks
    def test_file_url(self):
        fetcher = Fetcher(reactor=reactor, file_roots=[self.dir])
        url = "file://" + os.path.join(self.dir, "source.bin")
        path = yield fetcher.fetch(url, self.dest, "xyz.tar.gz", DIGEST)
        self.assertEqual(open(path, "rb").read(), PAYLOAD)
        with self.assertRaises(FetchError) as caught:
            yield fetcher.fetch(url, self.dest, "other.tar.gz", "22" * 32)
        self.assertEqual(caught.exception.code, "checksum")
        with self.assertRaises(FetchError) as caught:
            yield self.fetcher.fetch(url, self.dest, "third.tar.gz", DIGEST)  # no roots configured
        self.assertEqual(caught.exception.code, "bad-url")
        self.assertEqual(sorted(os.listdir(self.dest)), ["xyz.tar.gz"])

"""Downloading packages into a sliver: SHA-256 verified while writing, resumable, bounded.

Contract: :meth:`Fetcher.fetch` returns a Deferred firing with the path of ``<directory>/<name>``
once its content's SHA-256 equals the expected digest, or failing with :class:`FetchError` (a
Refusal) whose ``code`` is one of:

* ``bad-url`` — not ``http://``, ``https://`` or ``file://``; credentials in the URL (they would
  end in logs); over :data:`MAX_URL_LENGTH`; spaces or control characters; a ``file://`` URL with a
  host, or a path outside the fetcher's ``file_roots`` (none by default: a descriptor must not
  copy the node's own files, such as ``/etc/shadow``, into a sliver and learn, from the checksum
  verdict, whether a guess of them was right); a bad ``name`` (not one plain file name);
* ``unreachable`` — connection refused, DNS failure, connection lost mid-body (the partial file is
  kept to resume); ``timeout`` — no response or no body bytes for ``idle_timeout`` seconds;
* ``http-status`` — any status other than 200, or 206/416 answering our range request;
* ``checksum`` — the complete content has another SHA-256: the file is deleted;
* ``too-large`` — announced or received size over ``max_bytes`` (:data:`MAX_PACKAGE_BYTES`):
  the partial file is deleted;
* ``io`` — the local file system failed.

**Resume.**  Bytes arrive in ``<name>.part``, hashed as they are written.  A later fetch of the
same name finds the ``.part``, hashes what it holds and asks for the rest with ``Range:
bytes=<size>-``.  A ``206`` whose ``Content-Range`` starts there is appended; a ``200`` (the
server ignores ranges) restarts from zero; a ``416`` or a ``206`` starting elsewhere drops the
partial file and asks again without a range (at most once).  The final checksum guards against a
server whose file changed in between.  ``file://`` copies always start from zero.

An existing ``<name>`` whose digest already matches is returned without any transfer.

:class:`PartialDownload` holds all the bookkeeping (hashing, resume decisions, limits, the final
rename) and never touches the network or a reactor; :class:`Fetcher` is the Twisted edge (treq).

**Connections.**  :func:`http_client` (the fetcher's and the HTTP health checks' client) pools
nothing — one request per connection, nothing left open — and connects to an IP address literal
with a plain TCP endpoint (:func:`client_endpoint`); names go through ``HostnameEndpoint``.
"""
from __future__ import annotations

import enum
import functools
import hashlib
import os
import re
import stat
from urllib.parse import unquote, urlsplit

from dsmt.server.deployment.checksum import HASH_CHUNK_BYTES, normalize_sha256, sha256_file
from dsmt.server.refusal import Refusal

__all__ = ["FetchError", "PartialDownload", "Verdict", "Fetcher", "check_url", "check_file_name", "client_endpoint",
           "http_client", "MAX_PACKAGE_BYTES", "MAX_URL_LENGTH", "IDLE_TIMEOUT", "PART_SUFFIX"]

#: Largest package: a PlanetLab sliver's disk share was a few GB and it must also hold the
#: unpacked tree (unpack's own limit is 1 GiB); 512 MiB compressed is a large application.
MAX_PACKAGE_BYTES = 512 * 1024 * 1024
#: Longest URL accepted: what browsers and most servers accept (RFC 9110 recommends at least
#: 8000, common practice is 2048), and the descriptor schema's limit.
MAX_URL_LENGTH = 2048
#: Seconds without a response or without a body byte before giving up: a minute is past any
#: congested transatlantic round trip, yet frees the engine quickly from a dead server.
IDLE_TIMEOUT = 60.0
#: Suffix of the partial file a download writes to and resumes from.
PART_SUFFIX = ".part"
#: Longest file name (NAME_MAX), the ``.part`` suffix included.
_MAX_NAME_BYTES = 255

_CONTENT_RANGE = re.compile(rb"bytes\s+([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)\Z")
_UNSAFE_URL = re.compile(r"[\x00-\x20\x7f]")


class FetchError(Refusal):
    """A download failed or was refused: ``code`` (module docstring) and a precise reason."""


def check_url(url: str, file_roots=()) -> tuple[str, str | None]:
    """``(scheme, local path or None)`` for an acceptable URL, else FetchError ``bad-url``."""
    if not isinstance(url, str) or not url:
        raise FetchError("bad-url", "the URL is empty")
    shown = url if len(url) <= 100 else url[:100] + "…"
    if len(url) > MAX_URL_LENGTH:
        raise FetchError("bad-url", f"the URL {shown} is over {MAX_URL_LENGTH} characters")
    if _UNSAFE_URL.search(url):
        raise FetchError("bad-url", f"the URL {shown!r} has a space or control character")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchError("bad-url", f"the URL {shown} is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise FetchError("bad-url", f"the URL {shown} has no host")
        if parts.username is not None or parts.password is not None:
            raise FetchError("bad-url", f"the URL {shown} carries credentials; they would be logged")
        if port == 0:
            raise FetchError("bad-url", f"the URL {shown} has port 0")
        return scheme, None
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise FetchError("bad-url", f"the file URL {shown} names the host {parts.netloc!r}; only local files")
        path = os.path.realpath(unquote(parts.path))
        roots = [os.path.realpath(root) for root in file_roots]
        if not any(os.path.commonpath([root, path]) == root for root in roots):
            allowed = ", ".join(roots) if roots else "none are configured"
            raise FetchError("bad-url", f"the file URL {shown} is outside the allowed directories ({allowed})")
        return scheme, path
    raise FetchError("bad-url", f"the URL {shown} has scheme {parts.scheme!r}; only http, https and file are "
                     "supported")


def check_file_name(name: str) -> str:
    """``name`` if it is one plain file name (no ``/``, not ``.``/``..``, no leading ``.``, no control
    character, short enough for the ``.part`` suffix), else FetchError ``bad-url``."""
    if (not isinstance(name, str) or not name or "/" in name or name.startswith(".") or _UNSAFE_URL.search(name)
            or len((name + PART_SUFFIX).encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES):
        raise FetchError("bad-url", f"{name!r} is not a plain file name for the package")
    return name


class Verdict(enum.Enum):
    """What to do with a response: write its body, or drop the partial file and ask again without a range."""

    WRITE = "write"
    RETRY_FULL = "retry-full"


class PartialDownload:
    """The bookkeeping of one download into ``directory/name`` through ``name.part``; no network, no reactor.

    Use: :attr:`range_header` for the request; :meth:`accept` with the response's status and
    headers; :meth:`write` each body chunk; :meth:`complete` at the end (verify, rename) or
    :meth:`close` to stop keeping the ``.part``; :meth:`discard` to delete it.
    """

    def __init__(self, directory: str, name: str, sha256: str, *, max_bytes: int = MAX_PACKAGE_BYTES,
                 resume: bool = True):
        self.final_path = os.path.join(directory, check_file_name(name))
        self.part_path = self.final_path + PART_SUFFIX
        try:
            self.sha256 = normalize_sha256(sha256)
        except ValueError as exc:
            raise FetchError("checksum", str(exc)) from None
        self.max_bytes = max_bytes
        self.hasher = hashlib.sha256()
        self.offset = 0
        self._file = None
        try:
            if not os.path.isdir(directory):
                raise FetchError("io", f"{directory} is not a directory")
            if resume and os.path.isfile(self.part_path) and not os.path.islink(self.part_path):
                self.hasher, self.offset = sha256_file(self.part_path, limit=max_bytes)
                if self.offset > max_bytes:
                    self._start_over()
        except OSError as exc:
            raise FetchError("io", f"cannot read {self.part_path}: {exc.strerror or exc}") from None

    @property
    def range_header(self) -> bytes | None:
        """The ``Range`` header value to send, or None for a full request."""
        return b"bytes=%d-" % self.offset if self.offset else None

    def already_complete(self) -> bool:
        """True when ``directory/name`` exists and already has the expected digest."""
        try:
            if not os.path.isfile(self.final_path) or os.path.islink(self.final_path):
                return False
            hasher, size = sha256_file(self.final_path, limit=self.max_bytes)
        except OSError:
            return False
        return size <= self.max_bytes and hasher.hexdigest() == self.sha256

    def accept(self, status: int, content_range: bytes | None = None, content_length: int | None = None) -> Verdict:
        """Decide from a response's status and headers (see the module docstring); FetchError if refused."""
        if status == 206 and self.offset:
            match = _CONTENT_RANGE.match((content_range or b"").strip())
            if not match or int(match.group(1)) != self.offset:
                return self._retry_full()
            total = match.group(3)
            if total != b"*" and int(total) > self.max_bytes:
                raise self._too_large(int(total))
            self._open(append=True)
            return Verdict.WRITE
        if status == 416 and self.offset:
            return self._retry_full()
        if status != 200:
            raise FetchError("http-status", f"the server answered HTTP {status}")
        if content_length is not None and content_length > self.max_bytes:
            raise self._too_large(content_length)
        self._start_over()
        self._open(append=False)
        return Verdict.WRITE

    def write(self, data: bytes) -> None:
        """Append ``data`` to the partial file and the hash; FetchError ``too-large`` past the limit."""
        if self.offset + len(data) > self.max_bytes:
            raise self._too_large(self.offset + len(data))
        try:
            self._file.write(data)
        except OSError as exc:
            raise FetchError("io", f"cannot write {self.part_path}: {exc.strerror or exc}") from None
        self.hasher.update(data)
        self.offset += len(data)

    def complete(self) -> str:
        """Verify the digest and rename the partial file into place; the final path.  On a mismatch the
        partial file is deleted and FetchError ``checksum`` raised."""
        self.close()
        digest = self.hasher.hexdigest()
        if digest != self.sha256:
            self.discard()
            raise FetchError("checksum", f"{os.path.basename(self.final_path)} has SHA-256 {digest}, not the expected "
                             f"{self.sha256} ({self.offset} bytes); the download was deleted")
        try:
            os.replace(self.part_path, self.final_path)
        except OSError as exc:
            raise FetchError("io", f"cannot move {self.part_path} into place: {exc.strerror or exc}") from None
        return self.final_path

    def copy_from(self, path: str) -> None:
        """Fill the partial file from the local file at ``path`` (a ``file://`` download), from zero."""
        self._start_over()
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(descriptor, "rb") as source:
                if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
                    raise FetchError("bad-url", f"{path} is not a regular file")
                self._open(append=False)
                while chunk := source.read(HASH_CHUNK_BYTES):
                    self.write(chunk)
        except OSError as exc:
            raise FetchError("io", f"cannot read {path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        """Flush and close the partial file, keeping it for a later resume."""
        if self._file is not None:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError:
                pass
            finally:
                self._file.close()
                self._file = None

    def discard(self) -> None:
        """Close and delete the partial file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        try:
            os.unlink(self.part_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise FetchError("io", f"cannot delete {self.part_path}: {exc.strerror or exc}") from None

    def _retry_full(self) -> Verdict:
        self._start_over()
        return Verdict.RETRY_FULL

    def _start_over(self) -> None:
        self.discard()
        self.hasher = hashlib.sha256()
        self.offset = 0

    def _open(self, *, append: bool) -> None:
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
            self._file = os.fdopen(os.open(self.part_path, flags, 0o644), "ab" if append else "wb")
        except OSError as exc:
            raise FetchError("io", f"cannot open {self.part_path}: {exc.strerror or exc}") from None

    def _too_large(self, size: int) -> FetchError:
        self.discard()
        return FetchError("too-large", f"{os.path.basename(self.final_path)} is {size} bytes or more, over the "
                          f"limit of {self.max_bytes}")


def client_endpoint(reactor, host: str, port: int, timeout: float | None = None):
    """A TCP client endpoint to ``host``:``port`` (``timeout``: seconds to connect; None: Twisted's 30).

    An IP address literal gets ``TCP4ClientEndpoint``/``TCP6ClientEndpoint``.  ``HostnameEndpoint``
    — what a name gets — would "resolve" the literal with ``getaddrinfo`` in a thread, and report a
    refused connection only at its next attempt tick, 0.3 s later: a health probe of a service not
    listening yet cost ~2 ms of CPU and 0.3 s instead of ~0.2 ms and a round trip."""
    from twisted.internet import abstract, endpoints
    kwargs = {} if timeout is None else {"timeout": timeout}
    if abstract.isIPAddress(host):
        return endpoints.TCP4ClientEndpoint(reactor, host, port, **kwargs)
    if abstract.isIPv6Address(host):
        return endpoints.TCP6ClientEndpoint(reactor, host, port, **kwargs)
    return endpoints.HostnameEndpoint(reactor, host, port, **kwargs)


@functools.lru_cache(maxsize=None)
def _endpoint_factory_class():
    """The ``IAgentEndpointFactory`` of :func:`http_client` (built once: Twisted is imported late here,
    so the pure part of this module needs no reactor)."""
    from twisted.internet.endpoints import wrapClientTLS
    from twisted.web.error import SchemeNotSupported
    from twisted.web.iweb import IAgentEndpointFactory
    from zope.interface import implementer

    @implementer(IAgentEndpointFactory)
    class EndpointFactory:
        """:func:`client_endpoint` for ``http``, wrapped in TLS for ``https`` (Twisted's standard factory,
        with ``HostnameEndpoint`` for every host, does the same)."""

        def __init__(self, reactor, tls_policy):
            self.reactor, self.tls_policy = reactor, tls_policy

        def endpointForURI(self, uri):
            try:
                host = uri.host.decode("ascii")
            except UnicodeDecodeError:
                raise ValueError(f"the host of {uri.toBytes()!r} is not ASCII") from None
            endpoint = client_endpoint(self.reactor, host, uri.port)
            if uri.scheme == b"http":
                return endpoint
            if uri.scheme == b"https":
                return wrapClientTLS(self.tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
    return EndpointFactory


def http_client(reactor, tls_policy=None):
    """A treq ``HTTPClient`` pooling no connection, with :func:`client_endpoint`'s connections
    (``tls_policy``: an ``IPolicyForHTTPS``, default ``BrowserLikePolicyForHTTPS``)."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
    factory = _endpoint_factory_class()(reactor, tls_policy or BrowserLikePolicyForHTTPS())
    return HTTPClient(Agent.usingEndpointFactory(reactor, factory, pool=HTTPConnectionPool(reactor, persistent=False)))


class Fetcher:
    """Downloads over treq (:func:`http_client`), and copies ``file://`` URLs under ``file_roots``.
    ``reactor`` defaults to the global one."""

    def __init__(self, *, reactor=None, file_roots=(), max_bytes: int = MAX_PACKAGE_BYTES,
                 idle_timeout: float = IDLE_TIMEOUT, tls_policy=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.file_roots = tuple(file_roots)
        self.max_bytes = max_bytes
        self.idle_timeout = idle_timeout
        self.http = http_client(reactor, tls_policy)

    def fetch(self, url: str, directory: str, name: str, sha256: str):
        """Download ``url`` to ``directory/name`` (see the module docstring); a Deferred of the final path."""
        from twisted.internet import defer
        return defer.ensureDeferred(self._fetch(url, directory, name, sha256))

    async def _fetch(self, url: str, directory: str, name: str, sha256: str) -> str:
        scheme, local = check_url(url, self.file_roots)
        download = PartialDownload(directory, name, sha256, max_bytes=self.max_bytes, resume=scheme != "file")
        if download.already_complete():
            download.close()
            return download.final_path
        if local is not None:
            try:
                download.copy_from(local)
            except BaseException:
                download.discard()
                raise
            return download.complete()
        for _ in range(2):  # a resume, then at most one full request
            if await self._transfer(url, download) is Verdict.WRITE:
                return download.complete()
        raise FetchError("http-status", "the server refused the range request twice")  # pragma: no cover

    async def _transfer(self, url: str, download: PartialDownload) -> Verdict:
        from twisted.internet import defer, error
        from twisted.web.client import ResponseFailed, ResponseNeverReceived
        from twisted.web.error import SchemeNotSupported
        headers = {b"Range": [download.range_header]} if download.range_header else {}
        try:
            response = await self.http.get(url, headers=headers, unbuffered=True, timeout=self.idle_timeout, reactor=self.reactor)
        except SchemeNotSupported as exc:
            download.close()
            raise FetchError("bad-url", f"{url} was redirected to an unsupported scheme: {exc}") from None
        except (defer.CancelledError, error.TimeoutError, error.ConnectError, error.DNSLookupError, ResponseFailed,
                error.ConnectionLost, ResponseNeverReceived) as exc:
            download.close()
            reasons = [reason.value for reason in getattr(exc, "reasons", ())] + [exc]
            if any(isinstance(reason, (defer.CancelledError, error.TimeoutError)) for reason in reasons):
                raise FetchError("timeout", f"no response from {url} in {self.idle_timeout:g} s") from None
            raise FetchError("unreachable", f"cannot reach {url}: {_describe(exc)}") from None
        try:
            length = response.length if isinstance(response.length, int) else None
            content_range = response.headers.getRawHeaders(b"content-range", [None])[0]
            verdict = download.accept(response.code, content_range, length)
        except FetchError:
            abandon_response(response)
            raise
        if verdict is Verdict.RETRY_FULL:
            await _drain(response)
            return verdict
        await _BodyWriter(self.reactor, response, download, self.idle_timeout, url).done
        return Verdict.WRITE


def _describe(exc) -> str:
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return "; ".join(str(reason.value) or type(reason.value).__name__ for reason in reasons)
    return str(exc) or type(exc).__name__


def abandon_response(response) -> None:
    """Stop receiving a response's body: the connection is closed (the pool keeps none)."""
    from twisted.internet import protocol

    class Abandon(protocol.Protocol):
        def connectionMade(self):
            self.transport.stopProducing()

    response.deliverBody(Abandon())


async def _drain(response) -> None:
    from twisted.internet import defer
    try:
        await response.text()
    except defer.CancelledError:
        raise
    except Exception:  # noqa: BLE001 — the body of a refused range answer is not needed
        pass


class _BodyWriter:
    """Feeds a response body to a :class:`PartialDownload`; ``done`` fires when the body is complete.

    Stops the transfer on a refusal (``too-large``, ``io``) or after ``idle_timeout`` seconds without
    a byte, keeping the partial file for a resume in both the idle and the lost-connection cases.
    """

    def __init__(self, reactor, response, download: PartialDownload, idle_timeout: float, url: str):
        from twisted.internet import defer, protocol
        self.download, self.url, self.idle_timeout = download, url, idle_timeout
        self.done = defer.Deferred()
        self.failure: FetchError | None = None
        writer = self

        class Body(protocol.Protocol):
            def connectionMade(self):
                writer.transport = self.transport

            def dataReceived(self, data):
                writer.received(data)

            def connectionLost(self, reason):
                writer.lost(reason)

        self.timer = reactor.callLater(idle_timeout, self._idle)
        self.transport = None
        response.deliverBody(Body())

    def received(self, data: bytes) -> None:
        if self.failure is not None:
            return
        self.timer.reset(self.idle_timeout)
        try:
            self.download.write(data)
        except FetchError as refusal:
            self.failure = refusal
            self.transport.stopProducing()

    def _idle(self) -> None:
        self.failure = FetchError("timeout", f"no data from {self.url} for {self.idle_timeout:g} s after "
                                  f"{self.download.offset} bytes; the partial file is kept to resume")
        if self.transport is not None:
            self.transport.stopProducing()

    def lost(self, reason) -> None:
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss
        if self.timer.active():
            self.timer.cancel()
        if self.failure is not None:
            self.download.close()
            self.done.errback(self.failure)
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.download.close()
            self.done.errback(FetchError("unreachable", f"the connection to {self.url} was lost after "
                                         f"{self.download.offset} bytes ({_describe(reason.value)}); the partial "
                                         "file is kept to resume"))

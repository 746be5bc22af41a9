"""A package repository: one directory's packages over HTTP, as the deployment engine downloads them.

``Repository(root)`` is a leaf ``twisted.web`` resource.  It serves ``GET`` and ``HEAD`` of
``/<name>`` for exactly the names its index lists, plus the index itself, and nothing else:

* **Index.**  ``<root>/SHA256SUMS`` (:data:`INDEX_NAME`), in ``sha256sum``'s format — one
  ``<64 hex digits><space><space or *><name>`` line per package, so ``sha256sum -c SHA256SUMS``
  checks a copy of the repository.  Names are plain file names (``fetch.check_file_name``: no ``/``,
  no leading ``.``, no control character).  The index is re-read when its size or modification time
  changes (a build that adds a package needs no restart), and refused whole — every request then
  answers ``503`` with the reason — when a line is malformed, a name repeats, it has more than
  :data:`MAX_INDEX_ENTRIES` lines or more than :data:`MAX_INDEX_BYTES` bytes.  :func:`add_to_index`
  writes it (sorted, atomically).
* **Bytes as they are.**  ``Content-Type: application/octet-stream`` and never a
  ``Content-Encoding`` (``twisted.web.static.File`` marks ``.tar.gz`` files ``gzip``-encoded, and
  HTTP clients then hand over the *decompressed* bytes, whose SHA-256 is not the package's);
  ``Content-Length`` always; ``Accept-Ranges: bytes``; ``ETag`` is the digest the index lists.
* **Ranges** (resumable downloads, RFC 9110 §14): one ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n``
  range is answered ``206`` with ``Content-Range``; a range starting past the end ``416`` with
  ``Content-Range: bytes */<size>``; a malformed ``Range``, several ranges, or an ``If-Range`` that
  is not the current ``ETag`` get the whole file (``200``), as the RFC allows.
* **Refusals.**  ``404`` for ``/`` (no directory listing), for any name the index does not list,
  for a path of more than one segment (``/a/b``, an encoded ``%2F``, ``..``), and for a listed name
  whose file is missing, is not a regular file or is a symbolic link (files are opened
  ``O_NOFOLLOW``: nothing outside ``root`` is ever read).  ``405`` with ``Allow: GET, HEAD`` for
  every other method.  Error bodies are one plain-text sentence.

Limit: the repository does not re-hash packages; a file changed behind its index is served as it
is, and the engine's fetcher, which checks every download's SHA-256, refuses it.

:func:`makeService` (with :class:`Options`) is the ``twistd dsmt-repository`` daemon::

    twistd -n dsmt-repository --root .demo/repository --listen tcp:8781:interface=127.0.0.1
"""
from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass

from twisted.python import usage
from twisted.web import http, resource, server, static

from dsmt.server.atomicfile import write_atomic
from dsmt.server.deployment.checksum import normalize_sha256
from dsmt.server.deployment.fetch import FetchError, check_file_name
from dsmt.server.refusal import Refusal

__all__ = ["Repository", "RepositoryError", "Index", "parse_index", "format_index", "add_to_index", "parse_range",
           "repository_site", "Options", "makeService", "INDEX_NAME", "MAX_INDEX_BYTES", "MAX_INDEX_ENTRIES",
           "DEFAULT_LISTEN"]

#: The index file inside the repository directory (``sha256sum``'s customary name).
INDEX_NAME = "SHA256SUMS"
#: Largest index read: a line is at most 66 + 255 bytes, so 1 MiB holds thousands of packages while
#: a runaway file cannot make every request read megabytes.
MAX_INDEX_BYTES = 1024 * 1024
#: Most packages listed: far more than one demo or site needs; bounds the name table in memory.
MAX_INDEX_ENTRIES = 10000
#: Where the daemon listens unless told: loopback only (slivers of one machine fetch from it), on a
#: port next to the engine's.
DEFAULT_LISTEN = "tcp:8781:interface=127.0.0.1"
#: The methods served; anything else is 405.
ALLOWED_METHODS = (b"GET", b"HEAD")

_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)\Z")
_RANGE = re.compile(rb"\s*bytes\s*=\s*([0-9]{0,19})\s*-\s*([0-9]{0,19})\s*\Z")


class RepositoryError(Refusal):
    """The index is unusable (code ``index``) or cannot be written (code ``io``)."""


@dataclass(frozen=True)
class Index:
    """The names a repository serves and the SHA-256 (lower case) its index gives each."""

    entries: dict

    def __contains__(self, name: str) -> bool:
        return name in self.entries


def parse_index(data: bytes) -> Index:
    """The :class:`Index` in ``data`` (module docstring), or RepositoryError ``index`` naming the line."""
    if len(data) > MAX_INDEX_BYTES:
        raise RepositoryError("index", f"{INDEX_NAME} is over {MAX_INDEX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RepositoryError("index", f"{INDEX_NAME} is not UTF-8 (byte {exc.start})") from None
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _LINE.match(line)
        if not match:
            raise RepositoryError("index", f"{INDEX_NAME} line {number} is not '<sha256>  <name>'")
        name = match.group(2)
        try:
            check_file_name(name)
        except FetchError:
            raise RepositoryError("index", f"{INDEX_NAME} line {number}: {name[:80]!r} is not a plain file "
                                  "name") from None
        if name == INDEX_NAME:
            raise RepositoryError("index", f"{INDEX_NAME} line {number} lists the index itself")
        if name in entries:
            raise RepositoryError("index", f"{INDEX_NAME} line {number} lists {name!r} a second time")
        if len(entries) == MAX_INDEX_ENTRIES:
            raise RepositoryError("index", f"{INDEX_NAME} lists more than {MAX_INDEX_ENTRIES} packages")
        entries[name] = match.group(1).lower()
    return Index(entries)


def format_index(index: Index) -> bytes:
    """``index`` as ``sha256sum`` writes it, sorted by name (so equal indexes are equal bytes)."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(index.entries.items())).encode("utf-8")


def add_to_index(root: str, name: str, sha256: str) -> Index:
    """List ``name`` with ``sha256`` in ``root``'s index (replacing an older entry); the new Index.

    The index is written to a temporary file and renamed into place, so a reader sees the old or the
    new one, never half.  RepositoryError ``index`` for a bad name, digest or existing index; ``io``.
    """
    try:
        check_file_name(name)
        digest = normalize_sha256(sha256)
    except (FetchError, ValueError) as exc:
        raise RepositoryError("index", f"cannot list {name!r}: {exc}") from None
    if name == INDEX_NAME:
        raise RepositoryError("index", f"a package cannot be named {INDEX_NAME}")
    path = os.path.join(root, INDEX_NAME)
    try:
        with open(path, "rb") as stream:
            current = parse_index(stream.read(MAX_INDEX_BYTES + 1))
    except FileNotFoundError:
        current = Index({})
    except OSError as exc:
        raise RepositoryError("io", f"cannot read {path}: {exc.strerror or exc}") from None
    index = Index({**current.entries, name: digest})
    if len(index.entries) > MAX_INDEX_ENTRIES:
        raise RepositoryError("index", f"{INDEX_NAME} would list more than {MAX_INDEX_ENTRIES} packages")
    try:
        write_atomic(path, format_index(index))
    except OSError as exc:
        raise RepositoryError("io", f"cannot write {path}: {exc.strerror or exc}") from None
    return index


def parse_range(header: bytes | None, size: int):
    """What to send for a ``Range`` header and a file of ``size`` bytes (module docstring):
    ``None`` (the whole file), ``(first, last)`` inclusive, or ``"unsatisfiable"``."""
    if header is None:
        return None
    match = _RANGE.match(header)
    if not match or match.group(1) == match.group(2) == b"":
        return None                                   # malformed or several ranges: ignored
    first, last = match.group(1), match.group(2)
    if first == b"":                                  # bytes=-n: the last n bytes
        suffix = int(last)
        if suffix == 0:
            return "unsatisfiable"
        return (max(0, size - suffix), size - 1) if size else "unsatisfiable"
    start = int(first)
    if last != b"" and int(last) < start:
        return None                                   # invalid range: ignored (RFC 9110 §14.1.1)
    end = size - 1 if last == b"" else int(last)
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


class Repository(resource.Resource):
    """The repository of the directory ``root`` (module docstring)."""

    isLeaf = True

    def __init__(self, root: str):
        super().__init__()
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise RepositoryError("io", f"{root} is not a directory")
        self._index: Index | None = None
        self._index_key = None

    # -- the index ----------------------------------------------------------------------------------

    def index(self) -> Index:
        """The current index (re-read when its file changed); RepositoryError when it is unusable."""
        path = os.path.join(self.root, INDEX_NAME)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return Index({})
        except OSError as exc:
            raise RepositoryError("index", f"cannot open {INDEX_NAME}: {exc.strerror or exc}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise RepositoryError("index", f"{INDEX_NAME} is not a regular file")
        with os.fdopen(fd, "rb") as stream:
            key = (info.st_ino, info.st_size, info.st_mtime_ns)
            if key != self._index_key:
                self._index = parse_index(stream.read(MAX_INDEX_BYTES + 1))
                self._index_key = key
        return self._index

    # -- requests -----------------------------------------------------------------------------------

    def render(self, request):
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        if request.method not in ALLOWED_METHODS:
            request.setHeader(b"Allow", b", ".join(ALLOWED_METHODS))
            return self._error(request, http.NOT_ALLOWED, f"only GET and HEAD are served here, not "
                               f"{request.method.decode('latin-1')[:20]}")
        segments = request.postpath
        if len(segments) != 1 or not segments[0]:
            return self._error(request, http.NOT_FOUND, "no such package (this repository lists no directories)")
        name = segments[0].decode("utf-8", "replace")
        try:
            index = self.index()
        except RepositoryError as refusal:
            return self._error(request, http.SERVICE_UNAVAILABLE, refusal.reason)
        if name == INDEX_NAME:
            return self._serve(request, name, None)
        if name not in index:
            return self._error(request, http.NOT_FOUND, "no such package")
        return self._serve(request, name, index.entries[name])

    def _serve(self, request, name: str, digest: str | None):
        try:
            fd = os.open(os.path.join(self.root, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return self._error(request, http.NOT_FOUND, "the package is listed but is a symbolic link, "
                                   "which is never followed")
            return self._error(request, http.NOT_FOUND, "the package is listed but its file is missing")
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return self._error(request, http.NOT_FOUND, "the package is listed but is not a regular file")
        stream = os.fdopen(fd, "rb")
        size = info.st_size
        etag = b'"%s"' % digest.encode("ascii") if digest else None
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8" if digest is None else
                          b"application/octet-stream")
        request.setHeader(b"Accept-Ranges", b"bytes")
        if etag:
            request.setHeader(b"ETag", etag)
        wanted = parse_range(request.getHeader(b"range"), size)
        condition = request.getHeader(b"if-range")
        if condition is not None and condition.strip() != etag:
            wanted = None
        if wanted == "unsatisfiable":
            stream.close()
            request.setHeader(b"Content-Range", b"bytes */%d" % size)
            return self._error(request, http.REQUESTED_RANGE_NOT_SATISFIABLE,
                               f"the range is outside the package's {size} bytes")
        if wanted is None:
            first, length = 0, size
            request.setResponseCode(http.OK)
        else:
            first, last = wanted
            length = last - first + 1
            request.setResponseCode(http.PARTIAL_CONTENT)
            request.setHeader(b"Content-Range", b"bytes %d-%d/%d" % (first, last, size))
        request.setHeader(b"Content-Length", b"%d" % length)
        if request.method == b"HEAD" or length == 0:
            stream.close()
            return b""
        if wanted is None:
            static.NoRangeStaticProducer(request, stream).start()
        else:
            static.SingleRangeStaticProducer(request, stream, first, length).start()
        return server.NOT_DONE_YET

    @staticmethod
    def _error(request, code: int, sentence: str) -> bytes:
        body = (sentence + "\n").encode("utf-8")
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body


def repository_site(root: str):
    """A ``Site`` serving :class:`Repository` ``root`` at ``/`` (no request encoders: bytes as they are)."""
    return server.Site(Repository(root))


class Options(usage.Options):
    synopsis = "--root DIR [--listen STRPORT]"
    longdesc = __doc__
    optParameters = [
        ["root", "r", None, "the repository directory (holds SHA256SUMS and the packages)"],
        ["listen", "l", DEFAULT_LISTEN, "where to listen (a strports description)"],
    ]

    def postOptions(self):
        if not self["root"]:
            raise usage.UsageError("give --root")
        if not os.path.isdir(self["root"]):
            raise usage.UsageError(f"--root {self['root']}: not a directory")
        try:
            Repository(self["root"]).index()
        except RepositoryError as refusal:
            raise usage.UsageError(str(refusal))


def makeService(options):
    """The ``twistd dsmt-repository`` service: :func:`repository_site` on ``--listen``."""
    from twisted.application import strports
    return strports.service(options["listen"], repository_site(options["root"]))

"""Unpacking packages (tar — plain, gzip, bzip2, xz — and zip) into a sliver, never outside it.

Contract: :func:`unpack` either creates ``dest`` holding exactly the archive's members and
returns an :class:`UnpackResult`, or raises :class:`UnpackError` (a Refusal: ``code`` + reason
naming the member) and leaves no trace: nothing is ever written outside ``dest``, not even
partially.  How:

1. **Validate first.**  Every member's metadata is checked before one byte is written; reading
   the member list stops as soon as a limit is crossed, so a bomb is refused after reading at most
   the limit, not after decompressing all of it.
2. **Extract into a fresh temporary directory** created next to ``dest`` (same file system), with
   files opened ``O_CREAT|O_EXCL|O_NOFOLLOW``, symlinks created last; then one ``rename`` makes it
   ``dest``.  On any error the temporary directory is removed.  ``dest`` must not exist or be an
   empty directory (``dest-exists`` otherwise): replacing an installed tree is the caller's decision.

Rules, each refused with its code:

* ``absolute-path`` — a name starting with ``/``; ``parent-reference`` — a ``..`` segment
  (``./`` and empty segments are dropped; ``.`` itself is the root and skipped);
* ``bad-name`` — NUL, a backslash (Windows separator: its meaning differs between systems), other
  control characters; ``name-too-long`` — over :data:`MAX_NAME_BYTES` or a segment over
  :data:`MAX_SEGMENT_BYTES`;
* ``duplicate`` — the same path twice (directories excepted); ``conflict`` — a path below a
  member that is not a directory (``a`` a file and ``a/b``);
* **Links.**  Decision: symbolic links are *allowed* when they provably stay inside ``dest`` —
  real packages (shared-library version links, ``bin/python -> python3``) need them — and refused
  otherwise with ``link-escape``: the target must be relative, non-empty, and its resolution from
  the link's directory must never climb above ``dest`` nor pass *through* another symlink member
  (a symlink followed by ``..`` is where lexical checks and the kernel disagree); no member may
  be written through a symlink member either (``link-escape``).  The last segment of a target may
  be another symlink member, which is itself checked.  A link's own directory is made of real
  directories only, so lexical resolution equals the kernel's.  Hard links are allowed only to an
  earlier regular-file member of the same archive and are extracted as **copies** (no shared
  inode, so nothing can later write through them; the copy counts towards the size limit);
  anything else is ``bad-link``.  Zip symlinks (Unix mode ``S_IFLNK``) follow the same rules.
* ``device`` — character or block devices; ``fifo`` — named pipes; ``unsupported-type`` —
  anything else that is not a file, directory or link (sparse files, sockets, unknown tar types),
  and encrypted zip members;
* **Modes.**  Ownership is never applied.  setuid, setgid and sticky bits are *stripped*, as
  are group/other write: files become 0644, or 0755 when the owner could execute; directories
  0755.  (Refusing them would reject many ordinary tarballs made by root.)
* ``too-many-members`` — over :data:`MAX_MEMBERS`; ``too-large`` — declared or actual total over
  :data:`MAX_TOTAL_BYTES`, or a tar extended header over :data:`MAX_HEADER_BYTES`;
* ``corrupt`` — not a readable tar or zip (bad CRC, truncated, bad compression);
  ``unknown-format`` — neither; ``io`` — the file system failed (disk full, permissions).

Synchronous and pure of Twisted: the engine runs it in a thread.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass

from dsmt.server.refusal import Refusal

__all__ = ["UnpackError", "UnpackResult", "unpack", "detect_format", "MAX_MEMBERS", "MAX_TOTAL_BYTES",
           "MAX_NAME_BYTES", "MAX_SEGMENT_BYTES", "MAX_LINK_TARGET_BYTES", "MAX_HEADER_BYTES", "COPY_CHUNK_BYTES"]

#: Most members in one archive.  Real application packages have hundreds to a few thousand files
#: (a full Python virtualenv: ~5000); 20000 leaves room while bounding the member list kept in
#: memory and the inodes one package can take from the sliver.
MAX_MEMBERS = 20000
#: Most bytes written (uncompressed), links' copies included: a PlanetLab sliver's disk share was
#: a few GB, and a 1 GiB unpacked application is already large.  Zip bombs stop here.
MAX_TOTAL_BYTES = 1024 * 1024 * 1024
#: Longest member name in UTF-8 bytes: PATH_MAX on Linux.
MAX_NAME_BYTES = 4096
#: Longest path segment: NAME_MAX on Linux file systems.
MAX_SEGMENT_BYTES = 255
#: Longest symlink target (and zip symlink member, whose content is the target): PATH_MAX.
MAX_LINK_TARGET_BYTES = 4096
#: Largest single read the tar reader may make of the decompressed stream.  Member data is read
#: in :data:`COPY_CHUNK_BYTES` pieces; only extended headers (pax, GNU long names) are read whole,
#: and a real one is a few hundred bytes — 1 MiB refuses a header built to exhaust memory.
MAX_HEADER_BYTES = 1024 * 1024
#: Bytes copied per read while extracting.
COPY_CHUNK_BYTES = 64 * 1024
#: Decompressed bytes a tar stream may hold beyond its members' data: headers (512 bytes each,
#: plus extended headers) and the end-of-archive padding.
_TAR_OVERHEAD_BYTES = MAX_MEMBERS * 3 * 512 + 16 * MAX_HEADER_BYTES

_FILE_MODE, _EXEC_MODE, _DIR_MODE = 0o644, 0o755, 0o755
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnpackError(Refusal):
    """An archive was refused or could not be unpacked: ``code`` (module docstring) and a precise reason."""


@dataclass(frozen=True)
class UnpackResult:
    """What :func:`unpack` wrote: ``files`` (regular files and hard-link copies), ``directories``,
    ``symlinks``, ``bytes`` (file data)."""

    dest: str
    files: int
    directories: int
    symlinks: int
    bytes: int


@dataclass(frozen=True)
class _Member:
    path: str                # normalised, '/'-separated, relative
    kind: str                # "file", "dir", "symlink", "hardlink"
    size: int = 0
    executable: bool = False
    target: str = ""         # symlink target text, or hard link's normalised member path
    source: object = None    # the TarInfo / ZipInfo


# ---------------------------------------------------------------------------------------------------
# Format detection and the bounded tar stream

def detect_format(path: str) -> str:
    """``"zip"`` or ``"tar"`` from the file's first bytes (compressed tar included); UnpackError otherwise."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(512)
    except OSError as exc:
        raise UnpackError("io", f"cannot read archive {path}: {exc.strerror or exc}") from None
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) or head[257:262] == b"ustar":
        return "tar"
    raise UnpackError("unknown-format", f"{os.path.basename(path)} is neither a tar (plain, gzip, bzip2, xz) nor "
                      "a zip archive")


class _Bounded(io.RawIOBase):
    """A decompressed tar stream that refuses oversized headers and reading past a budget."""

    def __init__(self, raw, budget: int):
        self.raw = raw
        self.budget = budget

    def readable(self):
        return True

    def seekable(self):
        return True

    def read(self, size=-1):
        if size is None or size < 0 or size > MAX_HEADER_BYTES:
            raise UnpackError("too-large", f"the tar stream asks for a {size}-byte read (an extended header over "
                              f"{MAX_HEADER_BYTES} bytes)")
        self._check(self.raw.tell() + size)
        return self.raw.read(size)

    def seek(self, offset, whence=io.SEEK_SET):
        target = offset if whence == io.SEEK_SET else self.raw.tell() + offset if whence == io.SEEK_CUR else None
        if target is None:
            raise io.UnsupportedOperation("seek from the end")
        self._check(target)
        return self.raw.seek(target)

    def tell(self):
        return self.raw.tell()

    def _check(self, position: int) -> None:
        if position > self.budget:
            raise UnpackError("too-large", f"the decompressed tar stream is over {self.budget} bytes")


def _open_tar(path: str) -> tarfile.TarFile:
    with open(path, "rb") as stream:
        head = stream.read(6)
    opener = (gzip.open if head.startswith(b"\x1f\x8b") else bz2.open if head.startswith(b"BZh")
              else lzma.open if head.startswith(b"\xfd7zXZ\x00") else open)
    raw = opener(path, "rb")
    try:
        return tarfile.open(fileobj=_Bounded(raw, MAX_TOTAL_BYTES + _TAR_OVERHEAD_BYTES), mode="r:")
    except BaseException:
        raw.close()
        raise


_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile,
            NotImplementedError, UnicodeDecodeError, ValueError)


# ---------------------------------------------------------------------------------------------------
# Validation

def _normalise(name: str) -> str:
    """The member's relative path, or UnpackError; ``""`` for the archive's root (``.``, ``./``)."""
    shown = repr(name if len(name) <= 80 else name[:80] + "…")
    if "\x00" in name:
        raise UnpackError("bad-name", f"member {shown} has a NUL character")
    if "\\" in name:
        raise UnpackError("bad-name", f"member {shown} has a backslash (a Windows separator)")
    if _CONTROL.search(name):
        raise UnpackError("bad-name", f"member {shown} has a control character")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise UnpackError("name-too-long", f"member {shown} is over {MAX_NAME_BYTES} bytes")
    if name.startswith("/"):
        raise UnpackError("absolute-path", f"member {shown} is an absolute path")
    segments = [segment for segment in name.split("/") if segment not in ("", ".")]
    for segment in segments:
        if segment == "..":
            raise UnpackError("parent-reference", f"member {shown} has a '..' segment")
        if len(segment.encode("utf-8", "surrogateescape")) > MAX_SEGMENT_BYTES:
            raise UnpackError("name-too-long", f"member {shown} has a segment over {MAX_SEGMENT_BYTES} bytes")
    return "/".join(segments)


def _executable(mode: int) -> bool:
    return bool(mode & stat.S_IXUSR)


def _tar_member(info: tarfile.TarInfo) -> _Member | None:
    path = _normalise(info.name)
    shown = repr(info.name[:80])
    if info.isdir():
        return _Member(path, "dir", source=info) if path else None
    if not path:
        raise UnpackError("bad-name", f"member {shown} names the archive's root but is not a directory")
    if info.issparse():
        raise UnpackError("unsupported-type", f"member {shown} is a sparse file")
    if info.isreg():
        return _Member(path, "file", info.size, _executable(info.mode), source=info)
    if info.issym():
        return _Member(path, "symlink", target=info.linkname, source=info)
    if info.islnk():
        return _Member(path, "hardlink", target=_normalise(info.linkname), source=info)
    if info.ischr() or info.isblk():
        raise UnpackError("device", f"member {shown} is a device file")
    if info.isfifo():
        raise UnpackError("fifo", f"member {shown} is a named pipe")
    raise UnpackError("unsupported-type", f"member {shown} has tar type {info.type!r}")


def _zip_member(info: zipfile.ZipInfo) -> _Member | None:
    path = _normalise(info.filename)
    shown = repr(info.filename[:80])
    mode = info.external_attr >> 16
    if info.flag_bits & 0x1:
        raise UnpackError("unsupported-type", f"member {shown} is encrypted")
    if info.is_dir() or stat.S_ISDIR(mode):
        return _Member(path, "dir", source=info) if path else None
    if not path:
        raise UnpackError("bad-name", f"member {shown} names the archive's root but is not a directory")
    file_type = stat.S_IFMT(mode)
    if file_type in (0, stat.S_IFREG):
        return _Member(path, "file", info.file_size, _executable(mode), source=info)
    if file_type == stat.S_IFLNK:
        if info.file_size > MAX_LINK_TARGET_BYTES:
            raise UnpackError("link-escape", f"symlink {shown} has a target over {MAX_LINK_TARGET_BYTES} bytes")
        return _Member(path, "symlink", info.file_size, source=info)
    if file_type in (stat.S_IFCHR, stat.S_IFBLK):
        raise UnpackError("device", f"member {shown} is a device file")
    if file_type == stat.S_IFIFO:
        raise UnpackError("fifo", f"member {shown} is a named pipe")
    raise UnpackError("unsupported-type", f"member {shown} has file type {file_type:o}")


class _Plan:
    """The validated member list: paths, kinds, totals."""

    def __init__(self):
        self.members: list[_Member] = []
        self.kinds: dict[str, str] = {}
        self.total = 0

    def add(self, member: _Member | None) -> None:
        if member is None:
            return
        if len(self.members) >= MAX_MEMBERS:
            raise UnpackError("too-many-members", f"the archive has more than {MAX_MEMBERS} members")
        path = member.path
        if member.kind == "hardlink":
            if self.kinds.get(member.target) != "file":
                raise UnpackError("bad-link", f"hard link {path!r} points to {member.target!r}, which is not an "
                                  "earlier regular file of the archive")
            member = _Member(path, "hardlink", self._size_of(member.target), self._executable_of(member.target),
                             member.target, member.source)
        previous = self.kinds.get(path)
        if previous is not None and not (previous == "dir" and member.kind == "dir"):
            raise UnpackError("duplicate", f"member {path!r} appears twice in the archive")
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            kind = self.kinds.get(parent)
            if kind == "symlink":
                raise UnpackError("link-escape", f"member {path!r} would be written through the symlink {parent!r}")
            if kind not in (None, "dir"):
                raise UnpackError("conflict", f"member {path!r} is below {parent!r}, which is not a directory")
        if member.kind == "dir" and previous == "dir":
            return
        self.total += member.size
        if self.total > MAX_TOTAL_BYTES:
            raise UnpackError("too-large", f"the archive unpacks to more than {MAX_TOTAL_BYTES} bytes")
        self.kinds[path] = member.kind
        self.members.append(member)

    def _size_of(self, path: str) -> int:
        return next(m.size for m in self.members if m.path == path and m.kind == "file")

    def _executable_of(self, path: str) -> bool:
        return next(m.executable for m in self.members if m.path == path and m.kind == "file")

    def check_links(self, target_of) -> dict[str, str]:
        """Check every symlink (see the module docstring); ``target_of(member)`` reads its target."""
        targets: dict[str, str] = {}
        for member in self.members:
            if member.kind == "dir":
                continue
            parts = member.path.split("/")
            for depth in range(1, len(parts)):  # a later symlink member cannot sit above an earlier member
                if self.kinds.get("/".join(parts[:depth])) == "symlink":
                    raise UnpackError("link-escape", f"member {member.path!r} would be written through the symlink "
                                      f"{'/'.join(parts[:depth])!r}")
            if member.kind != "symlink":
                continue
            target = target_of(member)
            targets[member.path] = target
            shown = repr(target if len(target) <= 80 else target[:80] + "…")
            if not target or "\x00" in target or len(target.encode("utf-8", "surrogateescape")) > MAX_LINK_TARGET_BYTES:
                raise UnpackError("link-escape", f"symlink {member.path!r} has an empty, NUL-holding or over-long "
                                  "target")
            if target.startswith("/"):
                raise UnpackError("link-escape", f"symlink {member.path!r} points to the absolute path {shown}")
            stack = parts[:-1]
            segments = [segment for segment in target.split("/") if segment not in ("", ".")]
            for index, segment in enumerate(segments):
                if segment == "..":
                    if not stack:
                        raise UnpackError("link-escape", f"symlink {member.path!r} -> {shown} leaves the destination")
                    stack.pop()
                    continue
                stack.append(segment)
                if index < len(segments) - 1 and self.kinds.get("/".join(stack)) == "symlink":
                    raise UnpackError("link-escape", f"symlink {member.path!r} -> {shown} passes through the symlink "
                                      f"{'/'.join(stack)!r}")
            if not stack:
                raise UnpackError("link-escape", f"symlink {member.path!r} -> {shown} points at the destination "
                                  "itself")
        return targets


# ---------------------------------------------------------------------------------------------------
# Extraction

def unpack(archive: str, dest: str, *, format: str | None = None) -> UnpackResult:
    """Unpack ``archive`` (``format`` ``"tar"`` or ``"zip"``; None: :func:`detect_format`) as ``dest``."""
    if format is None:
        format = detect_format(archive)
    if format not in ("tar", "zip"):
        raise UnpackError("unknown-format", f"format {format!r} is neither 'tar' nor 'zip'")
    dest = os.path.abspath(dest)
    if os.path.lexists(dest) and not (os.path.isdir(dest) and not os.path.islink(dest) and not os.listdir(dest)):
        raise UnpackError("dest-exists", f"{dest} exists and is not an empty directory")
    parent = os.path.dirname(dest)
    try:
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.unpacking-", dir=parent)
    except OSError as exc:
        raise UnpackError("io", f"cannot create a staging directory in {parent}: {exc.strerror or exc}") from None
    try:
        try:
            result = (_unpack_zip if format == "zip" else _unpack_tar)(archive, staging)
            os.chmod(staging, _DIR_MODE)
            if os.path.isdir(dest) and not os.path.islink(dest):
                os.rmdir(dest)
            os.rename(staging, dest)
        except _CORRUPT as exc:
            raise UnpackError("corrupt", f"{os.path.basename(archive)} is not a readable {format} archive: "
                              f"{exc}") from None
        except OSError as exc:
            if exc.errno is None:  # bz2 and friends report bad data as OSError without an errno
                raise UnpackError("corrupt", f"{os.path.basename(archive)} is not a readable {format} archive: "
                                  f"{exc}") from None
            raise UnpackError("io", f"unpacking {os.path.basename(archive)}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return UnpackResult(dest, *result)


def _unpack_tar(archive: str, staging: str):
    plan = _Plan()
    with _open_tar(archive) as tar:
        for info in tar:            # lazy: stops at the first member over a limit
            plan.add(_tar_member(info))
        plan.check_links(lambda member: member.source.linkname)
        return _extract(plan, staging, lambda member: tar.extractfile(member.source),
                        lambda member: member.source.linkname)


def _unpack_zip(archive: str, staging: str):
    plan = _Plan()
    with zipfile.ZipFile(archive) as package:
        infos = package.infolist()
        if len(infos) > MAX_MEMBERS:
            raise UnpackError("too-many-members", f"the archive has {len(infos)} members, over {MAX_MEMBERS}")
        for info in infos:
            plan.add(_zip_member(info))

        def target_of(member: _Member) -> str:
            data = package.read(member.source)[:MAX_LINK_TARGET_BYTES + 1]
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                raise UnpackError("link-escape", f"symlink {member.path!r} has a target that is not UTF-8") from None

        targets = plan.check_links(target_of)
        return _extract(plan, staging, lambda member: package.open(member.source), lambda m: targets[m.path])


def _extract(plan: _Plan, staging: str, open_member, link_target):
    files = directories = symlinks = written = 0
    for member in plan.members:
        if member.kind != "dir":
            continue
        os.makedirs(os.path.join(staging, member.path), mode=_DIR_MODE, exist_ok=True)
        directories += 1
    for member in plan.members:
        if member.kind not in ("file", "hardlink"):
            continue
        target = os.path.join(staging, member.path)
        os.makedirs(os.path.dirname(target), mode=_DIR_MODE, exist_ok=True)
        mode = _EXEC_MODE if member.executable else _FILE_MODE
        if member.kind == "hardlink":
            source = open(os.path.join(staging, member.target), "rb")
        else:
            source = open_member(member)
        with source:
            descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            with os.fdopen(descriptor, "wb") as out:
                while True:
                    chunk = source.read(COPY_CHUNK_BYTES)
                    if not chunk:
                        break
                    written += len(chunk)
                    if written > MAX_TOTAL_BYTES:
                        raise UnpackError("too-large", f"member {member.path!r} takes the archive over "
                                          f"{MAX_TOTAL_BYTES} bytes")
                    out.write(chunk)
        os.chmod(target, mode)  # the umask may have narrowed it; strip nothing more
        files += 1
    for member in plan.members:
        if member.kind != "symlink":
            continue
        path = os.path.join(staging, member.path)
        os.makedirs(os.path.dirname(path), mode=_DIR_MODE, exist_ok=True)
        os.symlink(link_target(member), path)
        symlinks += 1
    for member in plan.members:  # directories last: a 0555 directory from the archive never blocks its files
        if member.kind == "dir":
            os.chmod(os.path.join(staging, member.path), _DIR_MODE)
    return files, directories, symlinks, written

"""Build application XYZ's package into a repository directory and write its deployment descriptor.

    python examples/xyz/build.py REPOSITORY BASE_URL [--descriptor FILE]

1. **The package** ``xyz-<version>.tgz`` (``<version>``: the template descriptor's application
   version, which must equal ``xyz_server.VERSION``): every file under ``examples/xyz/app/`` —
   ``__pycache__``, ``*.pyc`` and dot files left out — at the archive's root, as a gzip-compressed
   ustar archive.  **Reproducible**: members sorted by name, mtime :data:`MTIME`, owner and group 0
   with no names, mode 0644 (0755 for files the owner may execute), no directory members, a gzip
   header with mtime 0 and no file name, compression level 9.  The same sources give the same
   bytes, hence the same SHA-256, on every run with the same zlib (zlib versions may compress
   differently; the digest in the descriptor is always the one just built).  The name ends in
   ``.tgz``: a static file server that maps ``.tar.gz`` to ``Content-Encoding: gzip`` would hand
   HTTP clients decompressed bytes.
2. **The repository**: the package written atomically into ``REPOSITORY`` (created if missing) and
   listed in its ``SHA256SUMS`` (``dsmt.server.deployment.repository.add_to_index``), which
   ``twistd dsmt-repository --root REPOSITORY`` serves.
3. **The descriptor**: ``examples/xyz/descriptor.xml`` with the package's ``url`` (``BASE_URL``
   + ``/`` + the package name) and ``sha256`` filled in — and nothing else changed — validated with
   ``parse_descriptor`` and written to ``--descriptor`` (default ``REPOSITORY/xyz.xml``, which the
   repository does not serve: it is not in the index).

Errors (a bad base URL, an unreadable source, a template that does not validate) end the program
with status 1 and one sentence; :func:`build` raises :class:`BuildError` for them.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from urllib.parse import quote

from dsmt.server.atomicfile import write_atomic
from dsmt.server.deployment.descriptor import DescriptorError, parse_descriptor
from dsmt.server.deployment.fetch import FetchError, check_url
from dsmt.server.deployment.repository import RepositoryError, add_to_index

HERE = os.path.dirname(os.path.abspath(__file__))
#: The application's sources: what the package holds.
SOURCE = os.path.join(HERE, "app")
#: The descriptor template (stand-in package URL and digest).
TEMPLATE = os.path.join(HERE, "descriptor.xml")
#: Every member's modification time: a fixed instant (2008-01-01 UTC, the era of the paper this
#: project follows), so checkouts and edits at different times build identical archives.
MTIME = 1199145600
#: gzip level: the highest, fixed, since the level changes the bytes.
COMPRESS_LEVEL = 9
_PACKAGE = re.compile(rb"<package\b[^>]*>")
_VERSION = re.compile(r'^VERSION = "([^"]+)"', re.MULTILINE)


class BuildError(Exception):
    """The build cannot be done; the message says why."""


@dataclass(frozen=True)
class Package:
    name: str
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Build:
    package: Package
    url: str
    descriptor_path: str


def members(source: str = SOURCE) -> list[tuple[str, str]]:
    """``(name in the archive, path)`` of every file packaged from ``source``, sorted by name."""
    found = []
    for root, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
        for file in files:
            if file.startswith(".") or file.endswith(".pyc"):
                continue
            path = os.path.join(root, file)
            if os.path.islink(path) or not os.path.isfile(path):
                raise BuildError(f"{path} is not a regular file; the package holds files only")
            found.append((os.path.relpath(path, source).replace(os.sep, "/"), path))
    if not found:
        raise BuildError(f"{source} holds no file to package")
    return sorted(found)


def archive_bytes(source: str = SOURCE) -> bytes:
    """The reproducible ``.tgz`` of ``source`` (module docstring)."""
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=COMPRESS_LEVEL, fileobj=raw, mtime=0) as zipped:
        with tarfile.open(fileobj=zipped, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for name, path in members(source):
                with open(path, "rb") as stream:
                    data = stream.read()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = MTIME
                info.mode = 0o755 if os.stat(path).st_mode & 0o100 else 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                archive.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def template_version(template: bytes, source: str = SOURCE) -> str:
    """The application version of ``template``, checked against the server's ``VERSION``."""
    try:
        version = parse_descriptor(template).application.version
    except DescriptorError as exc:
        raise BuildError(f"the descriptor template is invalid: {exc}") from None
    server = os.path.join(source, "xyz_server.py")
    try:
        with open(server, encoding="utf-8") as stream:
            match = _VERSION.search(stream.read())
    except OSError as exc:
        raise BuildError(f"cannot read {server}: {exc.strerror or exc}") from None
    if not match or match.group(1) != version:
        raise BuildError(f"the descriptor says version {version} but {server} says "
                         f"{match.group(1) if match else 'none'}; make them agree")
    return version


def build_package(repository: str, version: str, source: str = SOURCE) -> Package:
    """Write ``xyz-<version>.tgz`` into ``repository`` atomically and list it in the index."""
    name = f"xyz-{version}.tgz"
    data = archive_bytes(source)
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(repository, name)
    try:
        os.makedirs(repository, exist_ok=True)
        write_atomic(path, data)
        add_to_index(repository, name, digest)
    except OSError as exc:
        raise BuildError(f"cannot write {path}: {exc.strerror or exc}") from None
    except RepositoryError as exc:
        raise BuildError(str(exc)) from None
    return Package(name, path, digest, len(data))


def render_descriptor(template: bytes, url: str, sha256: str) -> bytes:
    """``template`` with its one ``<package>``'s ``url`` and ``sha256`` replaced, validated."""
    found = _PACKAGE.findall(template)
    if len(found) != 1:
        raise BuildError(f"the template has {len(found)} <package> elements; exactly one is expected")
    escaped = url.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").encode("utf-8")

    def fill(match):
        element = re.sub(rb'\burl="[^"]*"', lambda _: b'url="' + escaped + b'"', match.group(0))
        return re.sub(rb'\bsha256="[^"]*"', lambda _: b'sha256="' + sha256.encode("ascii") + b'"', element)
    text = _PACKAGE.sub(fill, template)
    try:
        package = parse_descriptor(text).components[0].package
    except DescriptorError as exc:
        raise BuildError(f"the descriptor for {url} is invalid: {exc}") from None
    if package.url != url or package.sha256.lower() != sha256:
        raise BuildError("the template's <package> has no url or sha256 attribute to fill in")
    return text


def build(repository: str, base_url: str, descriptor_path: str | None = None, *, template: str = TEMPLATE,
          source: str = SOURCE) -> Build:
    """Steps 1–3 of the module docstring; what was built."""
    repository = os.path.abspath(repository)
    try:
        with open(template, "rb") as stream:
            template_bytes = stream.read()
    except OSError as exc:
        raise BuildError(f"cannot read {template}: {exc.strerror or exc}") from None
    version = template_version(template_bytes, source)
    url = f"{base_url.rstrip('/')}/{quote(f'xyz-{version}.tgz')}"
    try:
        check_url(url, file_roots=(repository,))
    except FetchError as exc:
        raise BuildError(f"base URL {base_url!r}: {exc.reason}") from None
    package = build_package(repository, version, source)
    text = render_descriptor(template_bytes, url, package.sha256)
    descriptor_path = os.path.abspath(descriptor_path or os.path.join(repository, "xyz.xml"))
    try:
        write_atomic(descriptor_path, text)
    except OSError as exc:
        raise BuildError(f"cannot write {descriptor_path}: {exc.strerror or exc}") from None
    return Build(package, url, descriptor_path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="build.py", description="Build XYZ's package, repository index and "
                                     "deployment descriptor.")
    parser.add_argument("repository", help="the repository directory (created if missing)")
    parser.add_argument("base_url", help="the URL the repository is served at, e.g. http://127.0.0.1:8781/")
    parser.add_argument("--descriptor", help="where to write the descriptor (default: REPOSITORY/xyz.xml)")
    args = parser.parse_args(argv)
    try:
        result = build(args.repository, args.base_url, args.descriptor)
    except BuildError as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return 1
    print(f"{result.package.name} {result.package.sha256} {result.package.size} bytes")
    print(f"descriptor: {result.descriptor_path} (package {result.url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

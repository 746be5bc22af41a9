"""Writing a file so that a crash leaves the old one or the new one, never half of either.

:func:`write_atomic` writes to a temporary file in the same directory, flushes
and fsyncs it, renames it over the target (atomic on POSIX within one file
system) and fsyncs the directory, so the rename itself survives a power loss.
Used wherever dsmt replaces a file another process or a restart reads: the
slice directories, sliver config files, the package index and build outputs.
"""
from __future__ import annotations

import os
import tempfile

__all__ = ["write_atomic", "fsync_directory"]


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` by ``data`` atomically, with permission bits ``mode``; OSError on failure (the
    temporary file is removed)."""
    directory = os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as stream:
            os.fchmod(stream.fileno(), mode)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    """fsync a directory, so renames and creations in it are durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

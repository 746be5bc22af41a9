"""SHA-256 digests as descriptors write them and packages are checked against.

A digest is written as 64 hexadecimal digits; :func:`normalize_sha256` accepts
either case and returns lower case, the one form compared everywhere (so
``ABC…`` in a descriptor matches ``abc…`` computed here).  :func:`sha256_file`
hashes a file in bounded chunks, never reading it whole into memory.
"""
from __future__ import annotations

import hashlib
import re

__all__ = ["normalize_sha256", "sha256_file", "HASH_CHUNK_BYTES"]

#: Bytes read per call when hashing a file: large enough that the per-call
#: overhead vanishes next to SHA-256 itself, small enough to hold in cache.
HASH_CHUNK_BYTES = 1024 * 1024

_HEX64 = re.compile(r"[0-9a-fA-F]{64}\Z")


def normalize_sha256(text: str) -> str:
    """``text`` in lower case if it is 64 hexadecimal digits, else ValueError naming it."""
    if not isinstance(text, str) or not _HEX64.match(text):
        shown = repr(text) if not isinstance(text, str) or len(text) <= 80 else repr(text[:80] + "…")
        raise ValueError(f"{shown} is not a SHA-256 digest (64 hexadecimal digits)")
    return text.lower()


def sha256_file(path: str, hasher=None, *, limit: int | None = None):
    """Feed the file at ``path`` to ``hasher`` (a new SHA-256 if None) and return ``(hasher, bytes_read)``.

    With ``limit``, reading stops after ``limit + 1`` bytes so a caller can tell "over the limit"
    without hashing an unbounded file.
    """
    hasher = hashlib.sha256() if hasher is None else hasher
    total = 0
    with open(path, "rb") as stream:
        while True:
            want = HASH_CHUNK_BYTES if limit is None else min(HASH_CHUNK_BYTES, limit + 1 - total)
            if want <= 0:
                break
            chunk = stream.read(want)
            if not chunk:
                break
            hasher.update(chunk)
            total += len(chunk)
    return hasher, total

"""The router's accounts file: service names and scrypt password hashes.

Format: one ``name:hash`` line per account (as :func:`passwd_line` writes it);
blank lines and lines starting with ``#`` are ignored.  A name is the service
name the account logs in as: 1–255 of ``A-Z a-z 0-9 . _ -``.  A hash is
``scrypt$<log2 n>$<r>$<p>$<salt base64>$<hash base64>``.

Contract: :meth:`Accounts.parse` / :meth:`Accounts.load` accept a file only if
every line is valid and no name repeats, else raise :class:`AccountsError`
naming the line.  :meth:`Accounts.check` answers a login in roughly constant
time whether or not the name exists.  scrypt parameters read from a file are
capped (:data:`MAX_MEMORY_BYTES`, :data:`MAX_WORK`), so a hostile or mistaken
line cannot make one verification take minutes or gigabytes.  Verification
takes ~0.2 s of CPU and releases the GIL: callers on a reactor run it in a
thread.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
from typing import NamedTuple

__all__ = [
    "read_password",
    "LOG2_N", "R", "P", "SALT_BYTES", "HASH_BYTES", "MAX_MEMORY_BYTES", "MAX_WORK", "MAX_NAME_CHARS",
    "AccountsError", "hash_password", "verify_password", "passwd_line", "check_name", "Accounts",
]

#: scrypt cost parameters for new hashes: N = 2**14, r = 8, p = 5 is one of
#: OWASP's equivalent recommended settings; of those it needs the least memory
#: (16 MiB per verification, so ten logins checked at once in the reactor's
#: thread pool stay under 200 MiB) and takes ~0.2 s — once per connection.
LOG2_N = 14
R = 8
P = 5
#: Random salt per hash: 16 bytes makes collisions between accounts negligible.
SALT_BYTES = 16
#: Derived key length: 32 bytes (256 bits) is beyond any brute force.
HASH_BYTES = 32
#: Most memory a verification may use (scrypt needs 128·r·(N + p + 2) bytes):
#: 4× the default, room for stronger settings later, far from exhausting a host.
MAX_MEMORY_BYTES = 64 * 1024 * 1024
#: Most work a verification may do, as N·r·p: 4× the default (~1 s).
MAX_WORK = 4 * (2 ** LOG2_N) * R * P
#: Longest account (service) name.
MAX_NAME_CHARS = 255

_NAME = re.compile(r"[A-Za-z0-9._-]{1,%d}" % MAX_NAME_CHARS)
_B64 = r"[A-Za-z0-9+/]+={0,2}"
_ENCODED = re.compile(r"scrypt\$([0-9]{1,2})\$([0-9]{1,3})\$([0-9]{1,3})\$(%s)\$(%s)" % (_B64, _B64))
_SALT_RANGE = (8, 64)
_HASH_RANGE = (16, 64)


class AccountsError(ValueError):
    """An account name, a hash or an accounts file is not valid; the message says where and why."""


class _Scrypt(NamedTuple):
    """A decoded hash: its parameters, salt and derived key."""

    log2_n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _memory(log2_n: int, r: int, p: int) -> int:
    """Bytes OpenSSL's scrypt allocates for these parameters (what its ``maxmem`` check compares)."""
    return 128 * r * ((1 << log2_n) + p + 2)


def _derive(password: str, log2_n: int, r: int, p: int, salt: bytes, length: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=1 << log2_n, r=r, p=p,
                          maxmem=_memory(log2_n, r, p), dklen=length)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _decode(encoded: str) -> _Scrypt:
    """Parse and bound-check an encoded hash; raise :class:`AccountsError` if malformed or too costly."""
    match = _ENCODED.fullmatch(encoded)
    if match is None:
        raise AccountsError("hash is not scrypt$<log2 n>$<r>$<p>$<salt base64>$<hash base64>")
    log2_n, r, p = (int(group) for group in match.group(1, 2, 3))
    try:
        salt, digest = (base64.b64decode(group, validate=True) for group in match.group(4, 5))
    except binascii.Error:
        raise AccountsError("hash has invalid base64") from None
    params = _Scrypt(log2_n, r, p, salt, digest)
    if log2_n < 1 or r < 1 or p < 1:
        raise AccountsError(f"scrypt parameters out of range: log2 n={log2_n}, r={r}, p={p}")
    if _memory(log2_n, r, p) > MAX_MEMORY_BYTES or (1 << log2_n) * r * p > MAX_WORK:
        raise AccountsError(f"scrypt parameters log2 n={log2_n}, r={r}, p={p} exceed the limits "
                            f"({MAX_MEMORY_BYTES} bytes of memory, N·r·p ≤ {MAX_WORK})")
    if not _SALT_RANGE[0] <= len(salt) <= _SALT_RANGE[1] or not _HASH_RANGE[0] <= len(digest) <= _HASH_RANGE[1]:
        raise AccountsError(f"salt must be {_SALT_RANGE[0]}–{_SALT_RANGE[1]} bytes and hash "
                            f"{_HASH_RANGE[0]}–{_HASH_RANGE[1]} bytes")
    return params


def _matches(password: str, params: _Scrypt) -> bool:
    derived = _derive(password, params.log2_n, params.r, params.p, params.salt, len(params.digest))
    return hmac.compare_digest(derived, params.digest)


def hash_password(password: str) -> str:
    """Hash ``password`` with scrypt (:data:`LOG2_N`, :data:`R`, :data:`P`) and a fresh random salt."""
    if not password:
        raise AccountsError("password must not be empty")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _derive(password, LOG2_N, R, P, salt, HASH_BYTES)
    return f"scrypt${LOG2_N}${R}${P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (constant-time compare); malformed encodings raise."""
    return _matches(password, _decode(encoded))


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid account name, else raise :class:`AccountsError`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AccountsError(f"invalid account name {name!r}: use 1–{MAX_NAME_CHARS} of A-Z a-z 0-9 . _ -")
    return name


def passwd_line(name: str, password: str) -> str:
    """The accounts-file line for a new account (no newline)."""
    return f"{check_name(name)}:{hash_password(password)}"


#: Verified against when the name is unknown, so that answer costs the same
#: scrypt as a wrong password (no timing oracle for which names exist).
_UNKNOWN = _Scrypt(LOG2_N, R, P, bytes(SALT_BYTES), bytes(HASH_BYTES))


class Accounts:
    """Accounts read from an accounts file: name → scrypt hash."""

    def __init__(self, hashes: dict[str, str]):
        """``hashes`` maps valid names to encoded hashes; both are checked here."""
        self._hashes = {check_name(name): _decode(encoded) for name, encoded in hashes.items()}
        # name -> HMAC of the last password that verified, under a key that
        # never leaves this process: a client reconnecting after a router
        # hiccup costs a microsecond instead of a scrypt (hundreds of nodes
        # reconnect at once after a restart).
        self._remembered: dict[str, bytes] = {}
        self._memo_key = secrets.token_bytes(32)

    @classmethod
    def parse(cls, text: str, *, source: str = "accounts") -> Accounts:
        """Read ``name:hash`` lines; errors name ``source`` and the line number."""
        hashes: dict[str, str] = {}
        first_line: dict[str, int] = {}
        for number, line in enumerate(text.split("\n"), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, colon, encoded = line.partition(":")
            try:
                if not colon:
                    raise AccountsError("expected name:hash")
                check_name(name)
                _decode(encoded)
            except AccountsError as exc:
                raise AccountsError(f"{source}:{number}: {exc}") from None
            if name in hashes:
                raise AccountsError(f"{source}:{number}: duplicate account {name!r} (first on line "
                                    f"{first_line[name]})")
            hashes[name] = encoded
            first_line[name] = number
        return cls(hashes)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Accounts:
        """Read the accounts file at ``path`` (UTF-8); OSError if it cannot be read."""
        with open(path, "rb") as file:
            data = file.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AccountsError(f"{os.fspath(path)}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        return cls.parse(text, source=os.fspath(path))

    def with_account(self, name: str, password: str) -> Accounts:
        """A copy of these accounts with one more, ``name`` with ``password`` (hashed here: one scrypt),
        held in memory only — for a daemon's own internal login (the router's ``--manage-psepr``).  This
        object is unchanged; :class:`AccountsError` if ``name`` is invalid or already an account."""
        if check_name(name) in self._hashes:
            raise AccountsError(f"account {name!r} already exists")
        copy = Accounts({})
        copy._hashes = dict(self._hashes)
        copy._hashes[name] = _decode(hash_password(password))
        return copy

    def __contains__(self, name: object) -> bool:
        return name in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)

    def check(self, name: str, password: str) -> bool:
        """Whether ``name`` exists and ``password`` is its password.

        Costs one scrypt (also for unknown names: no timing oracle), except when
        the same password already verified for ``name`` in this process.
        """
        params = self._hashes.get(name)
        if params is None:
            _matches(password, _UNKNOWN)
            return False
        memo = hmac.new(self._memo_key, password.encode("utf-8"), "sha256").digest()
        remembered = self._remembered.get(name)
        if remembered is not None and hmac.compare_digest(memo, remembered):
            return True
        if _matches(password, params):
            self._remembered[name] = memo
            return True
        return False


def read_password(path: str | None) -> str | None:
    """A client's PsEPR password: the first line of ``path`` (no line end), or ``$PSEPR_PASSWORD`` when no
    file is given (None when neither).  OSError when the file cannot be read."""
    if path is None:
        return os.environ.get("PSEPR_PASSWORD")
    with open(path, encoding="utf-8") as handle:
        return handle.readline().rstrip("\r\n")

"""The per-user slice directory ``svm`` keeps (docs/dslice.md, the dslice HOWTO's ``.planetlab/slices``).

Layout under ``$DSMT_HOME`` (default ``~/.dsmt``)::

    slices/<slice>/spec.xml            the slice XML the slice was created with
    slices/<slice>/nodes               "<node> <endpoint-url>" per line: where each node manager answers
    slices/<slice>/tickets/<node>      a ticket not yet redeemed (the agent's signed bytes, unchanged)
    slices/<slice>/leases/<node>       a lease whose sliver is not created yet (lease document, below)
    slices/<slice>/vms/<node>          a lease whose sliver exists (same document)
    slices/<slice>/sshkeys/<fp>        a user key added (one OpenSSH line; file named by its SHA-256 fingerprint)
    slices/<slice>/slicekeypair/id_ed25519, id_ed25519.pub   the per-slice key pair

Lease document (``leases/`` and ``vms/``), namespace :data:`LEASE_NS`::

    <l:lease xmlns:l="http://dsmt.org/ns/lease">
      <l:leaseId>…</l:leaseId><l:ticketId>…</l:ticketId><l:slice>…</l:slice><l:node>…</l:node>
      <l:slots>1</l:slots><l:grantedAt>…</l:grantedAt><l:expiresAt>…</l:expiresAt><l:leaselen>…</l:leaselen>
    </l:lease>

(times in POSIX seconds), read back strictly with ``xmlsafe.parse_xml``.

Contracts:

* **Atomic writes**: every file is written to a temporary file in the same
  directory, fsynced, then ``os.replace``d over its name (and the directory
  fsynced), so a killed ``svm`` leaves whole files only — the old one or the
  new one.  A move (ticket → lease → vm) writes the new file before removing
  the old one: killed in between, the node is in both directories and the
  later one wins (:meth:`SliceFiles.leases` callers look at ``vms/`` first).
* **Names**: slice names must pass ``check_slice_name`` and file names in
  ``tickets/``, ``leases/``, ``vms/`` must be *normalised* node addresses
  (``normalize_node_address(name) == name``), so ``..``, ``/``, ``.tmp``,
  NUL or upper-case spellings never name a file; listings skip anything else
  found there (temporary files, a user's stray file).  Files are opened with
  ``O_NOFOLLOW`` and read up to a size limit: a symlink or a huge file planted
  in the directory is refused, not followed or slurped.
* **clean(now)**: a slice with no valid ticket (``notAfter > now``) and no
  lease or vm (``expiresAt > now``) is removed whole — the HOWTO's ``svm
  clean``.  Unreadable files count as not valid.  A slice is removed by
  renaming it to ``slices/.trash-…`` first, so a killed ``clean`` never
  leaves a half-removed slice looking alive; leftover trash is removed by the
  next clean.

Errors are :class:`SliceDirectoryError` (``bad-name``, ``no-slice``,
``bad-file``, ``io``) with a sentence naming the file.  Not safe against two
``svm`` processes changing one slice at once (the last write wins per file).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import uuid

from lxml import etree

from dsmt.server.agent.tickets import MAX_TICKET_BYTES, TicketError, parse_ticket
from dsmt.server.atomicfile import write_atomic
from dsmt.server.refusal import Refusal
from dsmt.server.slicemanager.calls import LeaseInfo
from dsmt.server.slicemanager.spec import MAX_NUMNODES, MAX_SPEC_BYTES, SliceSpecError, check_slice_name, \
    node_sort_key, normalize_node_address
from dsmt.transports.xmlsafe import XmlSafetyError, parse_xml

__all__ = [
    "SliceDirectory", "SliceFiles", "SliceDirectoryError", "LEASE_NS", "HOME_ENV", "DEFAULT_HOME",
    "TICKETS", "LEASES", "VMS", "SSHKEYS", "SLICEKEYPAIR", "lease_document", "parse_lease_document",
    "write_atomic", "default_home",
]

HOME_ENV = "DSMT_HOME"
DEFAULT_HOME = "~/.dsmt"
LEASE_NS = "http://dsmt.org/ns/lease"
TICKETS, LEASES, VMS, SSHKEYS, SLICEKEYPAIR = "tickets", "leases", "vms", "sshkeys", "slicekeypair"
NODE_KINDS = (TICKETS, LEASES, VMS)
PRIVATE_KEY_FILE, PUBLIC_KEY_FILE = "id_ed25519", "id_ed25519.pub"

#: Largest lease document read: one is ~500 bytes; 4 KiB leaves room for long host names and ids.
MAX_LEASE_BYTES = 4096
#: Largest ``nodes`` file read: a 253-character host name and a URL of up to 2 KiB per node, for the
#: largest slice (MAX_NUMNODES), rounded up.
MAX_NODES_FILE_BYTES = MAX_NUMNODES * 2400
#: Longest endpoint URL kept: browsers' and proxies' practical URL limit.
MAX_ENDPOINT_CHARS = 2048
#: Largest key file read (user public key lines, the slice private key): an RSA-16384 key is ~3 KiB in
#: OpenSSH form; 16 KiB refuses anything that is not a key.
MAX_KEY_BYTES = 16 * 1024

_LEASE_FIELDS = ("leaseId", "ticketId", "slice", "node", "slots", "grantedAt", "expiresAt", "leaselen")
_LEASE_INTS = {"slots", "grantedAt", "expiresAt", "leaselen"}
_LEASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
_INT = re.compile(r"(?:0|[1-9][0-9]{0,11})\Z")
_FINGERPRINT_FILE = re.compile(r"SHA256-[A-Za-z0-9_-]{43}\Z")
_TRASH = ".trash-"


class SliceDirectoryError(Refusal):
    """A slice directory problem: ``bad-name``, ``no-slice``, ``bad-file`` or ``io``, with a sentence."""


def default_home(environ=os.environ) -> str:
    """``$DSMT_HOME``, else ``~/.dsmt``."""
    return environ.get(HOME_ENV) or os.path.expanduser(DEFAULT_HOME)


# --------------------------------------------------------------------------------------------- files

def _read_limited(path: str, limit: int) -> bytes:
    """The bytes of regular file ``path`` (no symlink), or SliceDirectoryError if larger than ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SliceDirectoryError("bad-file", f"{path} is a symbolic link; refusing to follow it") from None
        raise SliceDirectoryError("io", f"cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SliceDirectoryError("bad-file", f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise SliceDirectoryError("io", f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise SliceDirectoryError("bad-file", f"{path} is over the limit of {limit} bytes")
    return data


def read_user_file(path: str, limit: int) -> bytes:
    """A file the user names on the command line (a key, a ticket, a lease): same rules as our own files
    except that a symbolic link is followed (the user chose it)."""
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError) as exc:
        raise SliceDirectoryError("io", f"cannot read {path}: {exc}") from None
    return _read_limited(real, limit)


def _node_file_name(node: str) -> str:
    """``node`` if it is a normalised node address (and so a safe file name), else SliceDirectoryError."""
    try:
        if isinstance(node, str) and normalize_node_address(node) == node:
            return node
    except SliceSpecError:
        pass
    shown = str(node)[:60]
    raise SliceDirectoryError("bad-name", f"{shown!r} is not a normalised node address")


def _is_node_file_name(name: str) -> bool:
    try:
        return normalize_node_address(name) == name
    except SliceSpecError:
        return False


# ------------------------------------------------------------------------------------ lease document

def _l(name: str) -> str:
    return f"{{{LEASE_NS}}}{name}"


def lease_document(lease: LeaseInfo) -> bytes:
    """The lease document (module docstring) for ``lease``."""
    root = etree.Element(_l("lease"), nsmap={"l": LEASE_NS})
    values = (lease.lease_id, lease.ticket_id, lease.slice, lease.node, lease.slots, lease.granted_at,
              lease.expires_at, lease.leaselen)
    for name, value in zip(_LEASE_FIELDS, values):
        etree.SubElement(root, _l(name)).text = str(value)
    return etree.tostring(root, xml_declaration=True, encoding="utf-8", pretty_print=True)


def parse_lease_document(data: bytes, what: str = "lease file") -> LeaseInfo:
    """A :class:`LeaseInfo` from a lease document, or SliceDirectoryError ``bad-file`` naming the problem."""
    def bad(sentence: str) -> SliceDirectoryError:
        return SliceDirectoryError("bad-file", f"{what}: {sentence}")
    try:
        root = parse_xml(data, max_bytes=MAX_LEASE_BYTES, max_depth=2, what=what)
    except XmlSafetyError as exc:
        raise SliceDirectoryError("bad-file", str(exc)) from None
    except (ValueError, LookupError, etree.LxmlError) as exc:
        raise bad(f"not readable XML: {exc}") from None
    if root.tag != _l("lease") or root.attrib or (root.text or "").strip():
        raise bad(f"the root must be <l:lease> in {LEASE_NS}, without attributes or text")
    children = list(root)
    if [child.tag for child in children] != [_l(name) for name in _LEASE_FIELDS]:
        raise bad("<l:lease> must hold exactly " + ", ".join(_LEASE_FIELDS) + " in this order")
    values: dict[str, object] = {}
    for name, child in zip(_LEASE_FIELDS, children):
        text = (child.text or "").strip()
        if child.attrib or len(child) or (child.tail or "").strip():
            raise bad(f"<l:{name}> must hold text only")
        if name in _LEASE_INTS:
            if not _INT.match(text):
                raise bad(f"<l:{name}> {text[:20]!r} is not a whole number")
            values[name] = int(text)
        else:
            values[name] = text
    for name in ("leaseId", "ticketId"):
        if not _LEASE_ID.match(values[name]):
            raise bad(f"<l:{name}> {values[name][:40]!r} is not an id")
    try:
        check_slice_name(values["slice"])
        _node_file_name(values["node"])
    except (SliceSpecError, SliceDirectoryError) as exc:
        raise bad(getattr(exc, "reason", str(exc))) from None
    return LeaseInfo(*(values[name] for name in _LEASE_FIELDS))


# ----------------------------------------------------------------------------------------- directory

class SliceDirectory:
    """``<home>/slices``: one :class:`SliceFiles` per slice.  ``home`` defaults to :func:`default_home`."""

    def __init__(self, home: str | None = None):
        self.home = os.path.abspath(home or default_home())
        self.slices_path = os.path.join(self.home, "slices")

    def slice(self, name: str) -> "SliceFiles":
        """The files of slice ``name`` (which need not exist yet); SliceDirectoryError ``bad-name``."""
        try:
            check_slice_name(name)
        except SliceSpecError as exc:
            raise SliceDirectoryError("bad-name", str(exc)) from None
        return SliceFiles(name, os.path.join(self.slices_path, name))

    def names(self) -> list[str]:
        """Slices present (directories with a valid slice name, not symlinks), sorted."""
        try:
            entries = list(os.scandir(self.slices_path))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SliceDirectoryError("io", f"cannot list {self.slices_path}: {exc.strerror}") from None
        found = []
        for entry in entries:
            try:
                check_slice_name(entry.name)
            except SliceSpecError:
                continue
            if entry.is_dir(follow_symlinks=False):
                found.append(entry.name)
        return sorted(found)

    def clean(self, now: float) -> list[str]:
        """Remove every slice with no valid ticket, lease or vm at ``now``; return their names."""
        removed = []
        for name in self.names():
            files = self.slice(name)
            if not files.alive(now):
                files.remove_all()
                removed.append(name)
        self._empty_trash()
        return removed

    def _empty_trash(self) -> None:
        try:
            entries = list(os.scandir(self.slices_path))
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(_TRASH) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)


class SliceFiles:
    """The files of one slice (see the module docstring).  Nothing is created before :meth:`create`."""

    def __init__(self, name: str, path: str):
        self.name = name
        self.path = path

    def __repr__(self) -> str:
        return f"SliceFiles({self.name!r}, {self.path!r})"

    def exists(self) -> bool:
        return os.path.isdir(self.path) and not os.path.islink(self.path)

    def require(self) -> "SliceFiles":
        """self if the slice directory exists, else SliceDirectoryError ``no-slice``."""
        if not self.exists():
            raise SliceDirectoryError("no-slice", f"there is no slice {self.name} in {os.path.dirname(self.path)}")
        return self

    def create(self) -> "SliceFiles":
        """Make the slice directory and its subdirectories (mode 0700: tickets and keys are credentials)."""
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            for sub in (TICKETS, LEASES, VMS, SSHKEYS, SLICEKEYPAIR):
                os.makedirs(os.path.join(self.path, sub), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SliceDirectoryError("io", f"cannot create {self.path}: {exc.strerror}") from None
        return self

    def _write(self, path: str, data: bytes, mode: int = 0o600) -> None:
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            write_atomic(path, data, mode)
        except OSError as exc:
            raise SliceDirectoryError("io", f"cannot write {path}: {exc.strerror}") from None

    def _remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SliceDirectoryError("io", f"cannot remove {path}: {exc.strerror}") from None

    # ---- spec and endpoints

    def write_spec(self, data: bytes) -> None:
        self._write(os.path.join(self.path, "spec.xml"), data, 0o644)

    def spec(self) -> bytes | None:
        path = os.path.join(self.path, "spec.xml")
        return _read_limited(path, MAX_SPEC_BYTES) if os.path.lexists(path) else None

    def endpoints(self) -> dict[str, str]:
        """The ``nodes`` file: node -> endpoint URL ({} if absent); SliceDirectoryError ``bad-file``."""
        path = os.path.join(self.path, "nodes")
        if not os.path.lexists(path):
            return {}
        data = _read_limited(path, MAX_NODES_FILE_BYTES)
        found: dict[str, str] = {}
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SliceDirectoryError("bad-file", f"{path} is not UTF-8 text") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            words = line.split()
            if len(words) != 2 or not _is_node_file_name(words[0]) or len(words[1]) > MAX_ENDPOINT_CHARS:
                raise SliceDirectoryError("bad-file", f"{path} line {number}: expected '<node> <endpoint-url>'")
            found[words[0]] = words[1]
        return found

    def add_endpoints(self, endpoints: dict[str, str]) -> None:
        """Record (or update) the endpoints of these nodes, keeping the others."""
        merged = self.endpoints()
        for node, url in endpoints.items():
            _node_file_name(node)
            if not url or len(url) > MAX_ENDPOINT_CHARS or any(c.isspace() for c in url):
                raise SliceDirectoryError("bad-name", f"endpoint {url[:60]!r} of {node} is not a URL")
            merged[node] = url
        lines = "".join(f"{node} {merged[node]}\n" for node in sorted(merged, key=node_sort_key))
        self._write(os.path.join(self.path, "nodes"), lines.encode("utf-8"), 0o644)

    # ---- per-node files

    def node_path(self, kind: str, node: str) -> str:
        if kind not in NODE_KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        return os.path.join(self.path, kind, _node_file_name(node))

    def nodes(self, kind: str) -> list[str]:
        """Nodes with a file in ``kind`` (tickets, leases, vms), in :func:`node_sort_key` order."""
        directory = os.path.join(self.path, kind)
        if kind not in NODE_KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SliceDirectoryError("io", f"cannot list {directory}: {exc.strerror}") from None
        return sorted((e.name for e in entries if _is_node_file_name(e.name) and e.is_file(follow_symlinks=False)),
                      key=node_sort_key)

    def put_ticket(self, node: str, data: bytes) -> None:
        self._write(self.node_path(TICKETS, node), data)

    def ticket(self, node: str) -> bytes:
        return _read_limited(self.node_path(TICKETS, node), MAX_TICKET_BYTES)

    def put_lease(self, kind: str, lease: LeaseInfo) -> None:
        """Write ``lease`` as ``kind``/<its node> (kind: leases or vms)."""
        if kind not in (LEASES, VMS):
            raise ValueError(f"leases are kept in leases/ or vms/, not {kind!r}")
        self._write(self.node_path(kind, lease.node), lease_document(lease))

    def lease(self, kind: str, node: str) -> LeaseInfo:
        path = self.node_path(kind, node)
        lease = parse_lease_document(_read_limited(path, MAX_LEASE_BYTES), path)
        if lease.node != node or lease.slice != self.name:
            raise SliceDirectoryError("bad-file", f"{path} holds a lease of slice {lease.slice} on {lease.node}")
        return lease

    def remove(self, kind: str, node: str) -> None:
        self._remove(self.node_path(kind, node))

    def alive(self, now: float) -> bool:
        """Whether any ticket is still redeemable or any lease or vm unexpired at ``now`` (unreadable: not)."""
        for node in self.nodes(TICKETS):
            try:
                if parse_ticket(self.ticket(node)).not_after > now:
                    return True
            except (TicketError, SliceDirectoryError):
                continue
        for kind in (LEASES, VMS):
            for node in self.nodes(kind):
                try:
                    if self.lease(kind, node).expires_at > now:
                        return True
                except SliceDirectoryError:
                    continue
        return False

    def remove_all(self) -> None:
        """Remove the whole slice directory (renamed to trash first, so it disappears at once)."""
        if not self.exists():
            return
        trash = os.path.join(os.path.dirname(self.path), f"{_TRASH}{self.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, trash)
        except OSError as exc:
            raise SliceDirectoryError("io", f"cannot remove {self.path}: {exc.strerror}") from None
        shutil.rmtree(trash, ignore_errors=True)

    # ---- keys

    def keypair_files(self) -> tuple[bytes, str] | None:
        """``(private OpenSSH bytes, public line)`` of the slice key pair, or None if there is none yet."""
        directory = os.path.join(self.path, SLICEKEYPAIR)
        private, public = os.path.join(directory, PRIVATE_KEY_FILE), os.path.join(directory, PUBLIC_KEY_FILE)
        if not (os.path.lexists(private) and os.path.lexists(public)):
            return None
        line = _read_limited(public, MAX_KEY_BYTES).decode("utf-8", "replace").strip()
        return _read_limited(private, MAX_KEY_BYTES), line

    def save_keypair(self, private_openssh: bytes, public_line: str) -> None:
        """Write the key pair: the public half first, so a pair is complete once the private file exists."""
        directory = os.path.join(self.path, SLICEKEYPAIR)
        self._write(os.path.join(directory, PUBLIC_KEY_FILE), (public_line.strip() + "\n").encode("utf-8"), 0o644)
        self._write(os.path.join(directory, PRIVATE_KEY_FILE), private_openssh, 0o600)

    @staticmethod
    def _key_file_name(fingerprint: str) -> str:
        name = fingerprint.replace(":", "-", 1).replace("+", "-").replace("/", "_").rstrip("=")
        if not _FINGERPRINT_FILE.match(name):
            raise SliceDirectoryError("bad-name", f"{fingerprint[:80]!r} is not a SHA256 key fingerprint")
        return name

    def put_user_key(self, fingerprint: str, line: str) -> None:
        self._write(os.path.join(self.path, SSHKEYS, self._key_file_name(fingerprint)),
                    (line.strip() + "\n").encode("utf-8"), 0o644)

    def remove_user_key(self, fingerprint: str) -> None:
        self._remove(os.path.join(self.path, SSHKEYS, self._key_file_name(fingerprint)))

    def user_keys(self) -> list[str]:
        """The user key lines recorded, sorted by file name."""
        directory = os.path.join(self.path, SSHKEYS)
        try:
            names = sorted(e.name for e in os.scandir(directory)
                           if _FINGERPRINT_FILE.match(e.name) and e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            return []
        return [_read_limited(os.path.join(directory, name), MAX_KEY_BYTES).decode("utf-8", "replace").strip()
                for name in names]

    def clear_user_keys(self) -> None:
        directory = os.path.join(self.path, SSHKEYS)
        try:
            names = [e.name for e in os.scandir(directory) if _FINGERPRINT_FILE.match(e.name)]
        except FileNotFoundError:
            return
        for name in names:
            self._remove(os.path.join(directory, name))

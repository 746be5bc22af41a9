"""Sliver backends: where a slice lives on a node.  The default is a directory sandbox.

:class:`SliverBackend` is what the node manager drives (create, delete, keys,
processes, recovery at start); :class:`DirectorySandbox` implements it with
one directory per slice under a root the node manager owns::

    <root>/<slice>/                 mode 700
        home/                       700   HOME of the sliver's processes (their cwd)
            .ssh/                   700
                authorized_keys     600   the slice public key first, then the user keys, one per line
                id_ed25519          600   the slice private key   } when create() was given a key pair
                id_ed25519.pub      644   the slice public key    }
        logs/<name>.log             600   stdout and stderr of started processes (appended)
        run/<pgid>.pid              600   one per started process group: "<pgid> <start-time>"

Contracts and decisions:

* **Keys.** ``keys``/``add_key``/``del_key``/``nuke_keys`` work on *user* keys
  and return how many there are afterwards.  The slice key is not a user key:
  it stays the first line of ``authorized_keys`` after :meth:`nuke_keys` (it is
  how the slice's nodes reach each other; removing user keys is what NukeKeys
  means), cannot be removed with :meth:`del_key`, and adding it is a no-op.
  The same key (same type and key data, whatever the comment) is kept once.
  At most :data:`MAX_USER_KEYS` user keys.  ``authorized_keys`` is rewritten
  whole, atomically: a temporary file in ``.ssh`` is written, fsynced and
  ``os.replace``\\d onto it, then the directory is fsynced.
* **Crash safety.** :meth:`create` builds ``<root>/.creating-<slice>`` and
  renames it to ``<root>/<slice>`` (atomic): a sliver directory is either
  whole or absent.  :meth:`delete` kills the sliver's process groups, renames
  the directory to ``<root>/.deleting-<slice>-<random>`` (atomic: the sliver is
  gone) and then removes that.  :meth:`recover`, called when the node manager
  starts, removes every ``.creating-*`` and ``.deleting-*`` leftover.
* **Paths.** Slice names are checked with ``check_slice_name`` (no ``/``,
  ``.``, ``..``).  Everything below the root is reached through directory
  file descriptors opened with ``O_NOFOLLOW``: a sliver directory, ``home``,
  ``.ssh`` or file replaced by a symbolic link is refused (``backend``), never
  followed out of the root.  Removal uses ``shutil.rmtree``, which does not
  follow links either.
* **Processes.** :meth:`start` runs ``argv`` in a new session (so a new
  process group) with cwd ``home``, environment ``HOME``, ``USER``,
  ``LOGNAME``, ``PATH`` (:data:`DEFAULT_PATH`) plus the caller's ``env``
  (which may not redefine ``HOME``, ``USER`` or ``LOGNAME``), stdin from
  ``/dev/null``, stdout and stderr appended to ``logs/<name>.log``, and the
  :class:`ResourceLimits` applied as both soft and hard limits (the process
  cannot raise them).  The limits are set by a tiny launcher (``python -I -S
  -c``) that calls ``setrlimit`` and then ``exec``\\s ``argv`` — not by a
  ``preexec_fn``, which CPython documents as unsafe when the parent has
  threads (the node manager runs Twisted thread pools).  An ``exec`` failure
  comes back through a close-on-exec pipe, so :meth:`start` raises it
  (``backend``) instead of leaving a dead process.  That launcher is the
  default :class:`Spawner`; a caller may pass another with the same contract
  (the node manager forks its engines from a pre-imported fork server,
  ``dsmt.server.nodemanager.forkserver``).  The group id is recorded in
  ``run/`` with the leader's start time (``/proc/<pid>/stat``), so a recorded
  group whose number was reused by an unrelated process after a restart is
  never signalled.
* **Stopping.** :meth:`stop` sends SIGKILL to every recorded group (the
  sliver's processes cannot catch it; a graceful stop is the application's
  business, through the deployment engine), reaps the children this object
  started (bounded by :data:`KILL_WAIT_SECONDS`) and forgets the groups.
  :meth:`delete` stops first.  Linux delivers a group signal to a child being
  forked at that moment too, so nothing of the group survives — but a process
  that left its group (``setsid``) escapes a directory sandbox; stronger
  backends (a uid or a cgroup per slice) close that.

**Isolation limits.** Slivers of a directory sandbox run under the node
manager's own uid: they are kept apart by convention (own home, own process
groups, resource limits), not by the kernel.  It suits trusted slices and
tests; hostile code needs a backend with a uid, container or VM per slice.
For the same reason ``ResourceLimits.processes`` (``RLIMIT_NPROC``) is
refused by :class:`DirectorySandbox`: the kernel counts *every* process of the
uid — the node manager, every other sliver, the operator's shell — so the
limit would neither bound one sliver nor leave the others alone.  The other
limits are per process (inherited by children), not a budget for the whole
sliver: bounding a sliver's total needs cgroups.

One caller at a time: the node manager calls a backend from its reactor
thread only.  Errors are :class:`SliverError` (a Refusal) with codes
``no-sliver``, ``exists``, ``invalid-name``, ``too-many-keys``, ``backend``.
"""
from __future__ import annotations

import abc
import errno
import os
import re
import resource
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, fields

from dsmt.server.refusal import Refusal
from dsmt.server.slicemanager.spec import SliceSpecError, check_slice_name
from .sshkeys import SliceKeyPair, SshKeyError, SshPublicKey, parse_private_key, parse_public_key

__all__ = [
    "SliverBackend", "DirectorySandbox", "SliverError", "ResourceLimits", "RecoveryReport",
    "NO_SLIVER", "EXISTS", "INVALID_NAME", "TOO_MANY_KEYS", "BACKEND",
    "MAX_USER_KEYS", "KILL_WAIT_SECONDS", "LAUNCH_TIMEOUT_SECONDS", "DEFAULT_PATH", "MAX_ARGV_BYTES",
    "LAUNCHER", "limit_argument", "process_start_time", "process_alive", "Spawner", "StartedProcess",
    "SpawnerUnavailable", "ExecSpawner", "EXEC", "read_report",
]

NO_SLIVER = "no-sliver"
EXISTS = "exists"
INVALID_NAME = "invalid-name"
TOO_MANY_KEYS = "too-many-keys"
BACKEND = "backend"

#: Most user keys per sliver.  A slice is shared by a team; 256 keys is more
#: than any team and keeps ``authorized_keys`` (read by sshd at every login,
#: rewritten at every change) a few hundred KB at worst.
MAX_USER_KEYS = 256
#: How long stop/delete wait for the children they started to exit after
#: SIGKILL.  A killed process exits in milliseconds; one still there after
#: 5 s is stuck in the kernel (uninterruptible I/O) and is reported.
KILL_WAIT_SECONDS = 5.0
#: How long start() waits for the launcher to exec the command.  Starting the
#: launcher takes tens of milliseconds; 10 s covers a loaded node.
LAUNCH_TIMEOUT_SECONDS = 10.0
#: PATH of started processes (the caller's ``env`` may replace it).
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Largest argv + env of one start(), in bytes: well under Linux's ARG_MAX
#: (2 MB by default), so a too-long command fails here with a reason.
MAX_ARGV_BYTES = 256 * 1024
#: Largest ``authorized_keys`` read back: MAX_USER_KEYS + 1 lines of the
#: longest accepted key line, rounded up.
_MAX_AUTHORIZED_KEYS_BYTES = (MAX_USER_KEYS + 1) * 17 * 1024
_CREATING = ".creating-"
_DELETING = ".deleting-"
_LOG_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: The launcher: sets the limits it is given (``resource:soft:hard`` triples,
#: comma-separated), closes its report pipe on exec, and execs the command;
#: on failure it writes the errno to the pipe and exits 127.
LAUNCHER = r"""
import os, resource, sys
fd = int(sys.argv[1])
os.set_inheritable(fd, False)
try:
    for item in filter(None, sys.argv[2].split(",")):
        which, soft, hard = (int(part) for part in item.split(":"))
        resource.setrlimit(which, (soft, hard))
    os.execvp(sys.argv[3], sys.argv[3:])
except OSError as exc:
    os.write(fd, b"%d" % (exc.errno or 0))
    os._exit(127)
"""


class SliverError(Refusal):
    """A sliver operation failed: ``code`` (no-sliver, exists, invalid-name, too-many-keys, backend) and reason."""


@dataclass(frozen=True)
class ResourceLimits:
    """Per-process resource limits of a sliver's processes; None means unlimited (the node's own limit).

    ``cpu_seconds`` (RLIMIT_CPU), ``address_space_bytes`` (RLIMIT_AS),
    ``open_files`` (RLIMIT_NOFILE), ``processes`` (RLIMIT_NPROC: per *uid*,
    see the module docstring), ``file_size_bytes`` (RLIMIT_FSIZE).  A limit
    above the node manager's own hard limit is lowered to it (an unprivileged
    process cannot raise a hard limit).
    """

    cpu_seconds: int | None = None
    address_space_bytes: int | None = None
    open_files: int | None = None
    processes: int | None = None
    file_size_bytes: int | None = None

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"ResourceLimits.{field.name} must be a non-negative integer or None, not {value!r}")

    def rlimits(self) -> list[tuple[int, int]]:
        """(resource, value) pairs of the limits that are set."""
        pairs = [(resource.RLIMIT_CPU, self.cpu_seconds), (resource.RLIMIT_AS, self.address_space_bytes),
                 (resource.RLIMIT_NOFILE, self.open_files), (resource.RLIMIT_NPROC, self.processes),
                 (resource.RLIMIT_FSIZE, self.file_size_bytes)]
        return [(which, value) for which, value in pairs if value is not None]


@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`SliverBackend.recover` found: leftovers removed, slivers present, entries left alone.

    ``removed``: names of ``.creating-*``/``.deleting-*`` entries removed;
    ``slivers``: slice names with a sliver; ``ignored``: ``(entry, reason)``
    for entries of the root that are neither (left untouched for an operator).
    """

    removed: tuple[str, ...] = ()
    slivers: tuple[str, ...] = ()
    ignored: tuple[tuple[str, str], ...] = ()


class SliverBackend(abc.ABC):
    """Where slivers live.  Every method validates the slice name and raises SliverError on failure."""

    @abc.abstractmethod
    def create(self, slice_name: str, keypair: SliceKeyPair | None) -> None:
        """Create the sliver, with the slice key pair installed when given; ``exists`` if it is there."""

    @abc.abstractmethod
    def delete(self, slice_name: str) -> None:
        """Kill the sliver's processes and remove it entirely; ``no-sliver`` if absent."""

    @abc.abstractmethod
    def exists(self, slice_name: str) -> bool:
        """Whether the sliver exists."""

    @abc.abstractmethod
    def list(self) -> list[str]:
        """Slice names with a sliver, sorted."""

    @abc.abstractmethod
    def add_key(self, slice_name: str, key: SshPublicKey) -> int:
        """Authorise a user key (kept once); return the number of user keys."""

    @abc.abstractmethod
    def del_key(self, slice_name: str, key: SshPublicKey) -> int:
        """Remove a user key (absent: no change); return the number of user keys."""

    @abc.abstractmethod
    def nuke_keys(self, slice_name: str) -> int:
        """Remove every user key (the slice key stays); return 0."""

    @abc.abstractmethod
    def keys(self, slice_name: str) -> list[SshPublicKey]:
        """The user keys, in the order they were added."""

    @abc.abstractmethod
    def start(self, slice_name: str, argv: list[str], env: dict | None = None, *,
              spawner: "Spawner | None" = None) -> int:
        """Start ``argv`` in the sliver in a new process group; return its pid (= its group id).  ``spawner``
        (default :data:`EXEC`) makes the process."""

    @abc.abstractmethod
    def stop(self, slice_name: str) -> int:
        """Kill every process group started in the sliver; return how many groups were signalled."""

    @abc.abstractmethod
    def recover(self) -> RecoveryReport:
        """Bring the backend to a consistent state after a crash; called when the node manager starts."""

    @abc.abstractmethod
    def home(self, slice_name: str) -> str:
        """The sliver's home directory (a path: what it names may be changed by the sliver's own
        processes, so write below it through the backend's methods, never by path)."""


def _check_name(slice_name) -> str:
    try:
        return check_slice_name(slice_name)
    except SliceSpecError as exc:
        raise SliverError(INVALID_NAME, str(exc)) from None


def _fsync_dir(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:                      # some file systems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise


def _lexists(dir_fd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def process_start_time(pid: int) -> str:
    """The start time of ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22); ``"-"`` if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read()
    except OSError:
        return "-"
    try:
        return text[text.rindex(b")") + 2:].split()[19].decode("ascii")
    except (ValueError, IndexError):
        return "-"


def process_alive(pid: int | None, started: str | None) -> bool:
    """True if ``pid`` runs and started at ``started`` (``/proc/<pid>/stat``): the same process."""
    if not pid or not started or started == "-":
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read()
        if text[text.rindex(b")") + 2:].split()[0] in (b"Z", b"X"):
            return False           # dead, not yet reaped by its parent
    except (OSError, ValueError, IndexError):
        return False
    return process_start_time(pid) == started


def limit_argument(limits: "ResourceLimits") -> str:
    """The launcher's limits argument (``which:soft:hard,…``) for ``limits``; a value above this process's hard
    limit is lowered to it (an unprivileged process cannot raise its hard limit)."""
    items = []
    for which, value in limits.rlimits():
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and value > hard:
            value = hard
        items.append(f"{which}:{value}:{value}")
    return ",".join(items)


class StartedProcess(abc.ABC):
    """A process a :class:`Spawner` started: ``pid`` (also its process group and session: it leads both)."""

    pid: int

    @abc.abstractmethod
    def started(self) -> str | None:
        """None once the command runs, else why it did not start (the process is then gone or exiting)."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> None:
        """Return once the process has exited; raise ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""


class SpawnerUnavailable(Exception):
    """A spawner that cannot start anything now (nothing was started): the caller may use another.
    Not an OSError, so :meth:`DirectorySandbox.start` passes it through instead of making it a refusal."""


class Spawner(abc.ABC):
    """How :meth:`DirectorySandbox.start` makes a sliver process, once the sandbox has checked the command,
    built the environment and opened the log.  Contract of :meth:`spawn`: run ``argv`` as the leader of a new
    session with cwd ``cwd``, exactly the environment ``env``, stdin from ``/dev/null``, stdout and stderr on
    ``log_fd`` (the spawner does not close it) and the limits ``limits`` (:func:`limit_argument`'s string)
    as soft and hard limits; raise OSError when this command could not be started, or
    :class:`SpawnerUnavailable` when this spawner cannot start anything now.  Either way nothing runs."""

    @abc.abstractmethod
    def spawn(self, argv: list[str], env: dict, cwd: str, log_fd: int, limits: str) -> StartedProcess:
        """Start ``argv`` as the contract above says."""


class _LaunchedProcess(StartedProcess):
    def __init__(self, popen: subprocess.Popen, report_fd: int):
        self.pid, self._popen, self._report_fd = popen.pid, popen, report_fd

    def started(self) -> str | None:
        try:
            return _await_exec(self._report_fd)
        finally:
            os.close(self._report_fd)

    def wait(self, timeout: float) -> None:
        self._popen.wait(timeout=timeout)


class ExecSpawner(Spawner):
    """Starts ``argv`` through :data:`LAUNCHER` (``python -I -S -c``: setrlimit, then exec): a fresh process
    image per start.  An ``exec`` failure comes back through a close-on-exec pipe and :meth:`started`
    reports it."""

    def spawn(self, argv, env, cwd, log_fd, limits):
        read_fd, write_fd = os.pipe()
        try:
            command = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(write_fd), limits, *argv]
            popen = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log_fd,
                                     stderr=log_fd, start_new_session=True, pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return _LaunchedProcess(popen, read_fd)


#: The spawner :meth:`DirectorySandbox.start` uses unless it is given another.
EXEC = ExecSpawner()


def read_report(read_fd: int, timeout: float, limit: int = 4096) -> bytes | None:
    """What a starting child wrote to its report pipe before closing it (b"" once it closed its end
    without writing: it started), at most ``limit`` bytes kept; None when it neither wrote nor closed
    within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([read_fd], [], [], remaining)
        if ready:
            chunk = os.read(read_fd, 4096)
            if not chunk:
                return data
            data = (data + chunk)[:limit]


def _await_exec(read_fd: int) -> str | None:
    """None once the launcher exec'd the command (its pipe end closed), else why it failed."""
    data = read_report(read_fd, LAUNCH_TIMEOUT_SECONDS, 64)
    if data is None:
        return f"the launcher did not start it within {LAUNCH_TIMEOUT_SECONDS:g} s"
    if not data:
        return None
    try:
        number = int(data)
    except ValueError:
        number = 0
    return os.strerror(number) if number else "the launcher failed"


class DirectorySandbox(SliverBackend):
    """Slivers as directories under ``root`` (see the module docstring for layout and contracts).

    Nothing is touched on construction; :meth:`recover` creates ``root`` (mode
    700) when it is missing, and every other operation refuses (``backend``)
    while it is.  ``limits.processes`` is refused (ValueError): see the module
    docstring.
    """

    def __init__(self, root: str, *, limits: ResourceLimits = ResourceLimits()):
        if limits.processes is not None:
            raise ValueError("ResourceLimits.processes (RLIMIT_NPROC) counts every process of the uid, not of one "
                             "sliver; a directory sandbox runs all slivers under one uid, so it cannot apply it")
        self.root = os.path.abspath(root)
        self.limits = limits
        self._children: dict[str, dict[int, StartedProcess]] = {}

    # -- paths ------------------------------------------------------------------------------------------

    def _open_root(self) -> int:
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SliverError(BACKEND, f"sliver root {self.root} is missing") from None
        except OSError as exc:
            raise SliverError(BACKEND, f"sliver root {self.root} cannot be opened: {exc.strerror}") from None

    def _open_dir(self, parent_fd: int, name: str, shown: str) -> int:
        """Open directory ``name`` under ``parent_fd`` without following a link; SliverError otherwise."""
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                kind = "a symbolic link" if self._is_link(parent_fd, name) else "not a directory"
                raise SliverError(BACKEND, f"{shown} is {kind}; refusing to use it") from None
            raise SliverError(BACKEND, f"{shown} cannot be opened: {exc.strerror}") from None

    @staticmethod
    def _is_link(parent_fd: int, name: str) -> bool:
        try:
            return stat.S_ISLNK(os.lstat(name, dir_fd=parent_fd).st_mode)
        except OSError:
            return False

    def _open_sliver(self, slice_name: str, *parts: str) -> int:
        """A descriptor of ``<root>/<slice>/<parts…>``; ``no-sliver`` if the sliver is absent."""
        root_fd = self._open_root()
        try:
            try:
                fd = self._open_dir(root_fd, slice_name, f"sliver directory of {slice_name!r}")
            except FileNotFoundError:
                raise SliverError(NO_SLIVER, f"slice {slice_name!r} has no sliver on this node") from None
        finally:
            os.close(root_fd)
        shown = slice_name
        for part in parts:
            shown += "/" + part
            try:
                child = self._open_dir(fd, part, f"{shown} of sliver {slice_name!r}")
            except FileNotFoundError:
                raise SliverError(BACKEND, f"{shown} of sliver {slice_name!r} is missing") from None
            finally:
                os.close(fd)
            fd = child
        return fd

    @staticmethod
    def _mkdir(parent_fd: int, name: str, mode: int) -> int:
        os.mkdir(name, mode, dir_fd=parent_fd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        os.fchmod(fd, mode)                      # whatever the umask
        return fd

    @staticmethod
    def _write_file(dir_fd: int, name: str, data: bytes, mode: int) -> None:
        """Write ``name`` in ``dir_fd`` atomically: temp file, fsync, os.replace, fsync of the directory."""
        temp = f".{name}.tmp-{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                     dir_fd=dir_fd)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temp, dir_fd=dir_fd)
            raise
        os.close(fd)
        try:
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            os.unlink(temp, dir_fd=dir_fd)
            raise
        _fsync_dir(dir_fd)

    @staticmethod
    def _read_file(dir_fd: int, name: str, limit: int, shown: str) -> bytes:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SliverError(BACKEND, f"{shown} is a symbolic link; refusing to read it") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SliverError(BACKEND, f"{shown} is not a regular file")
            chunks, size = [], 0
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise SliverError(BACKEND, f"{shown} is over {limit} bytes")
            return b"".join(chunks)
        finally:
            os.close(fd)

    # -- lifecycle --------------------------------------------------------------------------------------

    def exists(self, slice_name: str) -> bool:
        slice_name = _check_name(slice_name)
        root_fd = self._open_root()
        try:
            entry = os.lstat(slice_name, dir_fd=root_fd)
        except FileNotFoundError:
            return False
        finally:
            os.close(root_fd)
        if stat.S_ISLNK(entry.st_mode):
            raise SliverError(BACKEND, f"sliver directory of {slice_name!r} is a symbolic link; refusing to use it")
        return stat.S_ISDIR(entry.st_mode)

    def list(self) -> list[str]:
        root_fd = self._open_root()
        try:
            names = []
            for entry in os.scandir(root_fd):
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                    try:
                        names.append(check_slice_name(entry.name))
                    except SliceSpecError:
                        continue
            return sorted(names)
        finally:
            os.close(root_fd)

    def home(self, slice_name: str) -> str:
        slice_name = _check_name(slice_name)
        os.close(self._open_sliver(slice_name, "home"))
        return os.path.join(self.root, slice_name, "home")

    def create(self, slice_name: str, keypair: SliceKeyPair | None) -> None:
        slice_name = _check_name(slice_name)
        slice_key = None
        if keypair is not None:
            try:
                keypair = parse_private_key(keypair.private_openssh, keypair.public_line)
            except SshKeyError as exc:
                raise SliverError(BACKEND, f"slice key pair of {slice_name!r} is not usable: {exc.reason}") from None
            slice_key = parse_public_key(keypair.public_line)
        if self.exists(slice_name):
            raise SliverError(EXISTS, f"slice {slice_name!r} already has a sliver on this node")
        building = _CREATING + slice_name
        root_fd = self._open_root()
        try:
            if _lexists(root_fd, building):                 # a failed create of this process
                shutil.rmtree(building, dir_fd=root_fd)
            try:
                self._build(root_fd, building, slice_key, keypair)
                os.rename(building, slice_name, src_dir_fd=root_fd, dst_dir_fd=root_fd)
                _fsync_dir(root_fd)
            except BaseException as exc:
                if _lexists(root_fd, building):
                    shutil.rmtree(building, dir_fd=root_fd, ignore_errors=True)
                if isinstance(exc, OSError):
                    raise SliverError(BACKEND, f"cannot create the sliver of {slice_name!r}: {exc}") from None
                raise
        finally:
            os.close(root_fd)

    def _build(self, root_fd: int, name: str, slice_key: SshPublicKey | None,
               keypair: SliceKeyPair | None) -> None:
        top = self._mkdir(root_fd, name, 0o700)
        try:
            for sub in ("logs", "run"):
                os.close(self._mkdir(top, sub, 0o700))
            home = self._mkdir(top, "home", 0o700)
            try:
                ssh = self._mkdir(home, ".ssh", 0o700)
                try:
                    if keypair is not None:
                        self._write_file(ssh, "id_ed25519", keypair.private_openssh, 0o600)
                        self._write_file(ssh, "id_ed25519.pub", (keypair.public_line + "\n").encode(), 0o644)
                    self._write_authorized(ssh, slice_key, [])
                finally:
                    os.close(ssh)
                _fsync_dir(home)
            finally:
                os.close(home)
            _fsync_dir(top)
        finally:
            os.close(top)

    def delete(self, slice_name: str) -> None:
        slice_name = _check_name(slice_name)
        os.close(self._open_sliver(slice_name))           # no-sliver / symlink refused before anything is killed
        self.stop(slice_name)
        doomed = f"{_DELETING}{slice_name}-{secrets.token_hex(4)}"
        root_fd = self._open_root()
        try:
            try:
                os.rename(slice_name, doomed, src_dir_fd=root_fd, dst_dir_fd=root_fd)
                _fsync_dir(root_fd)
            except OSError as exc:
                raise SliverError(BACKEND, f"cannot remove the sliver of {slice_name!r}: {exc}") from None
            try:
                shutil.rmtree(doomed, dir_fd=root_fd)
            except OSError:
                pass                                       # the sliver is gone; recover() removes the rest
        finally:
            os.close(root_fd)
        self._children.pop(slice_name, None)

    def recover(self) -> RecoveryReport:
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SliverError(BACKEND, f"sliver root {self.root} cannot be created: {exc.strerror}") from None
        removed, slivers, ignored = [], [], []
        root_fd = self._open_root()
        try:
            for entry in sorted(os.scandir(root_fd), key=lambda entry: entry.name):
                name = entry.name
                is_dir = entry.is_dir(follow_symlinks=False)
                if name.startswith((_CREATING, _DELETING)):
                    if is_dir:
                        if name.startswith(_DELETING):
                            self._kill_recorded(root_fd, name)
                        shutil.rmtree(name, dir_fd=root_fd)
                    else:
                        os.unlink(name, dir_fd=root_fd)
                    removed.append(name)
                elif entry.is_symlink():
                    ignored.append((name, "a symbolic link, never followed"))
                elif not is_dir:
                    ignored.append((name, "not a directory"))
                else:
                    try:
                        slivers.append(check_slice_name(name))
                    except SliceSpecError:
                        ignored.append((name, "not a valid slice name"))
            if removed:
                _fsync_dir(root_fd)
        finally:
            os.close(root_fd)
        return RecoveryReport(removed=tuple(removed), slivers=tuple(slivers), ignored=tuple(ignored))

    # -- keys -------------------------------------------------------------------------------------------

    def _write_authorized(self, ssh_fd: int, slice_key: SshPublicKey | None, user_keys: list[SshPublicKey]) -> None:
        lines = ([slice_key.line] if slice_key is not None else []) + [key.line for key in user_keys]
        self._write_file(ssh_fd, "authorized_keys", "".join(line + "\n" for line in lines).encode(), 0o600)

    def _slice_key(self, slice_name: str, ssh_fd: int) -> SshPublicKey | None:
        try:
            data = self._read_file(ssh_fd, "id_ed25519.pub", 2 * 1024, f"{slice_name}/home/.ssh/id_ed25519.pub")
        except FileNotFoundError:
            return None
        try:
            return parse_public_key(data)
        except SshKeyError as exc:
            raise SliverError(BACKEND, f"slice public key of {slice_name!r} is damaged: {exc.reason}") from None

    def _user_keys(self, slice_name: str, ssh_fd: int, slice_key: SshPublicKey | None) -> list[SshPublicKey]:
        shown = f"{slice_name}/home/.ssh/authorized_keys"
        try:
            data = self._read_file(ssh_fd, "authorized_keys", _MAX_AUTHORIZED_KEYS_BYTES, shown)
        except FileNotFoundError:
            return []
        keys = []
        for number, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                key = parse_public_key(line)
            except SshKeyError as exc:
                raise SliverError(BACKEND, f"line {number} of {shown} is not a valid key ({exc.reason}); "
                                           "NukeKeys rewrites the file") from None
            if slice_key is None or key.identity != slice_key.identity:
                keys.append(key)
        return keys

    def _edit_keys(self, slice_name: str, edit) -> int:
        slice_name = _check_name(slice_name)
        ssh = self._open_sliver(slice_name, "home", ".ssh")
        try:
            slice_key = self._slice_key(slice_name, ssh)
            before = self._user_keys(slice_name, ssh, slice_key) if edit is not None else []
            after = edit(before, slice_key) if edit is not None else []
            if after != before or edit is None:
                self._write_authorized(ssh, slice_key, after)
            return len(after)
        except OSError as exc:
            raise SliverError(BACKEND, f"cannot update the keys of {slice_name!r}: {exc}") from None
        finally:
            os.close(ssh)

    def keys(self, slice_name: str) -> list[SshPublicKey]:
        slice_name = _check_name(slice_name)
        ssh = self._open_sliver(slice_name, "home", ".ssh")
        try:
            return self._user_keys(slice_name, ssh, self._slice_key(slice_name, ssh))
        except OSError as exc:
            raise SliverError(BACKEND, f"cannot read the keys of {slice_name!r}: {exc}") from None
        finally:
            os.close(ssh)

    def add_key(self, slice_name: str, key: SshPublicKey) -> int:
        def add(keys, slice_key):
            if any(old.identity == key.identity for old in keys) or \
                    (slice_key is not None and slice_key.identity == key.identity):
                return keys
            if len(keys) >= MAX_USER_KEYS:
                raise SliverError(TOO_MANY_KEYS, f"sliver {slice_name!r} already has {len(keys)} user keys, "
                                                 f"the most allowed; delete one first")
            return keys + [key]
        return self._edit_keys(slice_name, add)

    def del_key(self, slice_name: str, key: SshPublicKey) -> int:
        return self._edit_keys(slice_name, lambda keys, _: [old for old in keys if old.identity != key.identity])

    def nuke_keys(self, slice_name: str) -> int:
        return self._edit_keys(slice_name, None)

    # -- processes --------------------------------------------------------------------------------------

    def _limit_argument(self) -> str:
        return limit_argument(self.limits)

    def start(self, slice_name: str, argv: list[str], env: dict | None = None, *,
              spawner: "Spawner | None" = None) -> int:
        slice_name = _check_name(slice_name)
        if not isinstance(argv, (list, tuple)) or not argv or not all(isinstance(arg, str) for arg in argv):
            raise SliverError(BACKEND, "a command must be a non-empty list of strings")
        environment = {"HOME": "", "USER": slice_name, "LOGNAME": slice_name, "PATH": DEFAULT_PATH}
        for name, value in (env or {}).items():
            if not isinstance(name, str) or not isinstance(value, str) or not name or "=" in name:
                raise SliverError(BACKEND, f"environment entry {name!r} is not a NAME=value pair of strings")
            if name in ("HOME", "USER", "LOGNAME"):
                raise SliverError(BACKEND, f"environment variable {name} is set by the sliver and cannot be given")
            environment[name] = value
        if any("\0" in text for text in [*argv, *environment, *environment.values()]):
            raise SliverError(BACKEND, "a command or its environment holds a NUL character")
        size = sum(len(text.encode("utf-8", "surrogateescape")) + 1 for text in [*argv, *environment,
                                                                                 *environment.values()])
        if size > MAX_ARGV_BYTES:
            raise SliverError(BACKEND, f"command and environment are {size} bytes; at most {MAX_ARGV_BYTES}")
        log_name = os.path.basename(argv[0])
        log_name = log_name if _LOG_NAME.match(log_name) and not log_name.startswith(".") else "process"
        top = self._open_sliver(slice_name)
        log_fd = None
        try:
            home = self._open_dir(top, "home", f"{slice_name}/home")
            os.close(home)
            logs = self._open_dir(top, "logs", f"{slice_name}/logs")
            try:
                log_fd = os.open(f"{log_name}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=logs)
            finally:
                os.close(logs)
            environment["HOME"] = home_path = os.path.join(self.root, slice_name, "home")
            process = (spawner or EXEC).spawn(list(argv), environment, home_path, log_fd, self._limit_argument())
            self._children.setdefault(slice_name, {})[process.pid] = process
            try:
                self._record_group(top, slice_name, process.pid)
            except BaseException:
                os.killpg(process.pid, signal.SIGKILL)    # never leave a process that no record names
                self._reap(slice_name, process.pid)
                raise
            failure = process.started()
        except FileNotFoundError as exc:
            raise SliverError(BACKEND, f"cannot start {argv[0]!r} in sliver {slice_name!r}: {exc.strerror}") from None
        except OSError as exc:
            raise SliverError(BACKEND, f"cannot start {argv[0]!r} in sliver {slice_name!r}: {exc}") from None
        finally:
            if log_fd is not None:
                os.close(log_fd)
            os.close(top)
        if failure is not None:
            self.stop(slice_name, only=process.pid)
            raise SliverError(BACKEND, f"cannot start {argv[0]!r} in sliver {slice_name!r}: {failure}")
        return process.pid

    def _record_group(self, top_fd: int, slice_name: str, pgid: int) -> None:
        run = self._open_dir(top_fd, "run", f"{slice_name}/run")
        try:
            self._write_file(run, f"{pgid}.pid", f"{pgid} {process_start_time(pgid)}\n".encode(), 0o600)
        finally:
            os.close(run)

    def _recorded_groups(self, run_fd: int) -> list[tuple[str, int, str]]:
        groups = []
        for entry in os.scandir(run_fd):
            if not entry.name.endswith(".pid") or not entry.is_file(follow_symlinks=False):
                continue
            try:
                fields_ = self._read_file(run_fd, entry.name, 128, entry.name).split()
                pgid, started = int(fields_[0]), fields_[1].decode("ascii")
            except (OSError, SliverError, ValueError, IndexError, UnicodeDecodeError):
                os.unlink(entry.name, dir_fd=run_fd)      # unreadable record: nothing safe to signal
                continue
            if pgid > 1:
                groups.append((entry.name, pgid, started))
        return groups

    @staticmethod
    def signal_group(pgid: int, started: str, sig: int) -> bool:
        """Signal group ``pgid`` unless its number now belongs to another process; True if signalled.

        A living leader with another start time means the number was reused:
        skip.  A dead leader cannot have had its number reused while members
        of its group live (the kernel does not hand out a pid in use as a
        group id), so the group is still the sliver's.
        """
        now = process_start_time(pgid)
        if started != "-" and now != "-" and now != started:
            return False
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return False
        return True

    def _kill_recorded(self, parent_fd: int, name: str) -> int:
        """SIGKILL the groups recorded in ``<parent>/<name>/run``, forget them; return how many were signalled."""
        try:
            top = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError:
            return 0
        try:
            try:
                run = os.open("run", _DIR_FLAGS, dir_fd=top)
            except OSError:
                return 0
            try:
                signalled = 0
                for file_name, pgid, started in self._recorded_groups(run):
                    signalled += self.signal_group(pgid, started, signal.SIGKILL)
                    os.unlink(file_name, dir_fd=run)
                return signalled
            finally:
                os.close(run)
        finally:
            os.close(top)

    def stop(self, slice_name: str, *, only: int | None = None) -> int:
        """SIGKILL the sliver's recorded process groups (or just group ``only``) and reap the children it started."""
        slice_name = _check_name(slice_name)
        top = self._open_sliver(slice_name)
        try:
            run = self._open_dir(top, "run", f"{slice_name}/run")
        except FileNotFoundError:
            raise SliverError(BACKEND, f"{slice_name}/run of sliver {slice_name!r} is missing") from None
        finally:
            os.close(top)
        signalled = 0
        recorded: set[int] = set()
        try:
            for file_name, pgid, started in self._recorded_groups(run):
                recorded.add(pgid)
                if only is not None and pgid != only:
                    continue
                try:
                    signalled += self.signal_group(pgid, started, signal.SIGKILL)
                except PermissionError:
                    raise SliverError(BACKEND, f"process group {pgid} of sliver {slice_name!r} cannot be "
                                               "signalled (it belongs to another user)") from None
                os.unlink(file_name, dir_fd=run)
        finally:
            os.close(run)
        if only is None:
            signalled += self._kill_strays(slice_name, recorded)
        self._reap(slice_name, only)
        return signalled

    def _kill_strays(self, slice_name: str, recorded: set[int]) -> int:
        """SIGKILL the processes of this user whose working directory is inside the sliver but which left its
        recorded groups (a supervisor in the sliver starting its children in sessions of their own: the
        deployment engine does).  A process that also moved its working directory out escapes this backend;
        a backend with a user id or a cgroup per sliver closes that gap."""
        inside = os.path.join(os.path.realpath(self.root), slice_name) + os.sep
        killed = 0
        me = os.getpid()
        try:
            entries = os.listdir("/proc")
        except OSError:
            return 0                                       # no /proc: only the recorded groups are stopped
        for entry in entries:
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                if os.stat(f"/proc/{entry}").st_uid != os.getuid() or os.getpgid(int(entry)) in recorded:
                    continue                               # another user's, or a recorded group's (killed already)
                cwd = os.readlink(f"/proc/{entry}/cwd") + os.sep
            except OSError:
                continue                                   # gone meanwhile, or not ours to look at
            if cwd.startswith(inside):
                try:
                    os.kill(int(entry), signal.SIGKILL)
                    killed += 1
                except OSError:
                    pass
        return killed

    def _reap(self, slice_name: str, only: int | None) -> None:
        children = self._children.get(slice_name, {})
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        for pid in [pid for pid in children if only is None or pid == only]:
            try:
                children[pid].wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise SliverError(BACKEND, f"process {pid} of sliver {slice_name!r} did not exit within "
                                           f"{KILL_WAIT_SECONDS:g} s of SIGKILL") from None
            del children[pid]

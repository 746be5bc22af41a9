"""Running a sliver's commands: one-shot (install, health and stop commands) and supervised (start).

**Launching.**  A command runs without a shell in its own session (so its own process group),
under the descriptor's limits, with the node manager's launcher (``dsmt.server.nodemanager.
sliver``): a tiny ``python -I -S -c`` program that sets the limits with ``setrlimit`` (soft = hard,
the process cannot raise them) and ``exec``\\s the command, reporting an ``exec`` failure through a
close-on-exec pipe (here the child's fd 3) — so a missing program is a precise ``launch`` error,
not a mysterious exit 127.  This module prefixes the launcher with ``os.setsid()``: Twisted's
``spawnProcess`` has no ``start_new_session``.  Environment: ``HOME`` (the sliver home), ``USER``
and ``LOGNAME`` (the slice), ``PATH`` (the sliver's default) and the command's ``<env>`` (which
cannot redefine the first three); stdin is ``/dev/null``; stdout and stderr are appended to
``<home>/logs/<component>.log``; cwd is the command's ``cwd`` inside the home (resolved, and refused
with ``path-escape`` when a symbolic link would take it out).  ``limits.processes``
(RLIMIT_NPROC) is not applied, for the reason the node manager's directory sandbox gives: the
kernel counts every process of the uid, not the component's.

**Supervision.**  :class:`Supervisor` starts a component's process, notices its exit through its
``ProcessProtocol`` (an event, never a poll), and restarts it after the delay :class:`Backoff`
gives — ``backoff_initial`` doubling up to ``backoff_max`` — at most ``max_restarts`` times; then
it stays down and the listener is told it gave up.  A process that stayed up for
:data:`STABLE_SECONDS` gets its restart budget back.  Stopping sends the stop signal (or runs the
stop command) to the process group and ``SIGKILL`` after the grace period.  A process re-adopted
after an engine restart is not the engine's child: its liveness is checked every
:data:`ADOPTED_POLL_SECONDS` against its recorded start time (a reused pid is not ours).

The listener (the engine) gets ``process_exited(name, reason, delay, restarts)`` — ``delay`` None
when it gave up — and ``process_restarted(name, pid, started)``.  Timers use ``clock`` (tests pass
a ``task.Clock``); processes use ``reactor``.

Errors: :class:`ProcessError` (a Refusal) with codes ``launch`` (bad command, environment or
program that cannot be executed), ``path-escape``, ``io`` (the log cannot be opened), ``timeout``.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

from twisted.internet import defer, protocol

from dsmt.server.deployment.descriptor import Command, Limits, RestartPolicy, StopSpec, substitute
from dsmt.server.nodemanager.sliver import (
    LAUNCHER, DEFAULT_PATH, MAX_ARGV_BYTES, DirectorySandbox, ResourceLimits, limit_argument, process_alive,
    process_start_time,
)
from dsmt.server.refusal import Refusal

__all__ = [
    "ProcessError", "Launch", "ExitStatus", "Backoff", "Supervisor", "prepare", "run_once", "inside_home",
    "process_alive", "STABLE_SECONDS", "ADOPTED_POLL_SECONDS", "STOP_POLL_SECONDS", "LOG_DIR",
]

#: Seconds a (re)started process must stay up for its earlier crashes to be forgiven: ten minutes
#: separates a crash loop (seconds apart, even at the largest backoff) from rare transient faults.
STABLE_SECONDS = 600.0
#: How often an adopted process's liveness is checked: its exit is not signalled to us, and 2 s
#: bounds the time a crash goes unnoticed while costing one /proc read.
ADOPTED_POLL_SECONDS = 2.0
#: How often a stopping adopted process is checked for its exit (real time: a signalled process
#: dies in milliseconds).
STOP_POLL_SECONDS = 0.05
#: The logs directory inside the sliver home.
LOG_DIR = "logs"
#: The child's descriptor the launcher reports an exec failure on.
_REPORT_FD = 3
#: The launcher of the node manager, in a session of its own first.
_SESSION_LAUNCHER = "import os\nos.setsid()\n" + LAUNCHER
_SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "HUP": signal.SIGHUP, "QUIT": signal.SIGQUIT,
            "KILL": signal.SIGKILL, "USR1": signal.SIGUSR1, "USR2": signal.SIGUSR2}
_RESERVED_ENV = ("HOME", "USER", "LOGNAME")


class ProcessError(Refusal):
    """A command could not be run, or did not finish in time: ``code`` (module docstring) and reason."""


def inside_home(home: str, relative: str | None, what: str = "path") -> str:
    """The absolute path of ``relative`` (a checked sliver path, or None for the home itself) after
    resolving symbolic links; ProcessError ``path-escape`` if that is not inside ``home``."""
    root = os.path.realpath(home)
    path = os.path.realpath(os.path.join(root, relative)) if relative else root
    if os.path.commonpath([root, path]) != root:
        raise ProcessError("path-escape", f"{what} {relative!r} leads out of the sliver (to {path})")
    return path


@dataclass(frozen=True)
class Launch:
    """A command ready to spawn: the launcher's argv, environment, cwd and log file."""

    name: str
    program: str
    args: tuple[str, ...]
    env: dict
    cwd: str
    log_path: str


def _limit_argument(limits: Limits | None) -> str:
    if limits is None:
        return ""
    return limit_argument(ResourceLimits(cpu_seconds=limits.cpu_seconds, address_space_bytes=limits.memory_bytes,
                                         open_files=limits.open_files, file_size_bytes=limits.file_size_bytes))


def prepare(home: str, slice_name: str, name: str, command: Command, values: dict[str, str]) -> Launch:
    """Substitute ``values`` into ``command`` and build its :class:`Launch` (module docstring)."""
    try:
        argv = [substitute(arg, values) for arg in command.argv]
        env = {key: substitute(value, values) for key, value in command.env}
    except (KeyError, ValueError) as exc:
        raise ProcessError("launch", f"command of {name!r}: {exc}") from None
    for key in env:
        if key in _RESERVED_ENV:
            raise ProcessError("launch", f"command of {name!r}: {key} is set by the sliver and cannot be given")
    environment = {"HOME": os.path.realpath(home), "USER": slice_name, "LOGNAME": slice_name, "PATH": DEFAULT_PATH}
    environment.update(env)
    texts = [*argv, *environment, *environment.values()]
    if any("\0" in text for text in texts):
        raise ProcessError("launch", f"command of {name!r}: a NUL character in its arguments or environment")
    size = sum(len(text.encode("utf-8", "surrogateescape")) + 1 for text in texts)
    if size > MAX_ARGV_BYTES:
        raise ProcessError("launch", f"command of {name!r}: {size} bytes of arguments and environment; at most "
                           f"{MAX_ARGV_BYTES}")
    cwd = inside_home(home, command.cwd, f"cwd of {name!r}")
    if not os.path.isdir(cwd):
        raise ProcessError("launch", f"command of {name!r}: its cwd {command.cwd!r} is not a directory in the sliver")
    logs = inside_home(home, LOG_DIR, "the logs directory")
    args = ("-I", "-S", "-c", _SESSION_LAUNCHER, str(_REPORT_FD), _limit_argument(command.limits), *argv)
    return Launch(name, argv[0], args, environment, cwd, os.path.join(logs, f"{name}.log"))


@dataclass(frozen=True)
class ExitStatus:
    code: int | None
    signal: int | None

    @property
    def ok(self) -> bool:
        return self.code == 0 and self.signal is None

    def __str__(self) -> str:
        if self.signal is not None:
            try:
                shown = signal.Signals(self.signal).name
            except ValueError:
                shown = "?"
            return f"killed by signal {self.signal} ({shown})"
        if self.code is None:
            return "exited (status unknown)"
        return f"exited with status {self.code}"


class _Protocol(protocol.ProcessProtocol):
    """``launched`` fires with the pid once the command is exec'd (ProcessError ``launch`` if it could
    not be); ``ended`` fires with the :class:`ExitStatus`."""

    def __init__(self, launch: Launch):
        self.launch = launch
        self.launched = defer.Deferred()
        self.ended = defer.Deferred()
        self.report = b""

    def childDataReceived(self, fd, data):
        if fd == _REPORT_FD and len(self.report) < 64:
            self.report += data

    def childConnectionLost(self, fd):
        if fd == _REPORT_FD:
            self._exec_done()

    def _exec_done(self):
        if self.launched.called:
            return
        if not self.report:
            self.launched.callback(self.transport.pid)
            return
        try:
            reason = os.strerror(int(self.report))
        except ValueError:
            reason = "the launcher failed"
        self.launched.errback(ProcessError("launch", f"cannot start {self.launch.program!r} for "
                                           f"{self.launch.name!r}: {reason}"))

    def processEnded(self, reason):
        self._exec_done()
        value = reason.value
        self.ended.callback(ExitStatus(getattr(value, "exitCode", None), getattr(value, "signal", None)))


def _spawn(reactor, launch: Launch) -> _Protocol:
    try:
        os.makedirs(os.path.dirname(launch.log_path), mode=0o700, exist_ok=True)
        log_fd = os.open(launch.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ProcessError("io", f"cannot open the log of {launch.name!r}: {exc.strerror or exc}") from None
    null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    process = _Protocol(launch)
    try:
        reactor.spawnProcess(process, sys.executable, (sys.executable, *launch.args), env=launch.env,
                             path=launch.cwd, childFDs={0: null_fd, 1: log_fd, 2: log_fd, _REPORT_FD: "r"})
    except OSError as exc:
        raise ProcessError("launch", f"cannot start the launcher for {launch.name!r}: {exc}") from None
    finally:
        os.close(log_fd)
        os.close(null_fd)
    return process


def _signal(pid: int, started: str | None, sig: int) -> bool:
    """Signal ``pid``'s process group (the process alone while it is still creating it); True if sent."""
    if DirectorySandbox.signal_group(pid, started or "-", sig):
        return True
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def _run_once(reactor, clock, launch: Launch, timeout: float) -> ExitStatus:
    process = _spawn(reactor, launch)
    pid = await process.launched
    started = process_start_time(pid)
    expired = []

    def kill():
        expired.append(True)
        _signal(pid, started, signal.SIGKILL)

    timer = clock.callLater(timeout, kill)
    status = await process.ended
    if timer.active():
        timer.cancel()
    if expired:
        raise ProcessError("timeout", f"{launch.program!r} of {launch.name!r} did not finish within {timeout:g} s "
                           "and was killed")
    return status


def run_once(reactor, clock, launch: Launch, timeout: float):
    """Run ``launch`` to its end; a Deferred of its :class:`ExitStatus`.  ProcessError ``timeout`` (the
    process group is killed) after ``timeout`` seconds of ``clock``; ``launch`` if it cannot start."""
    return defer.ensureDeferred(_run_once(reactor, clock, launch, timeout))


class Backoff:
    """The restart policy's arithmetic.  Pure: times are given.

    :meth:`after_exit` returns the delay before the next restart, or None when ``max_restarts``
    restarts were already made; :meth:`started` notes a (re)start time, and a process that ran
    :data:`STABLE_SECONDS` before exiting gets a fresh budget.
    """

    def __init__(self, policy: RestartPolicy, restarts: int = 0):
        self.policy = policy
        self.restarts = restarts
        self.started_at: float | None = None

    def started(self, now: float) -> None:
        self.started_at = now

    def after_exit(self, now: float) -> float | None:
        if self.started_at is not None and now - self.started_at >= STABLE_SECONDS:
            self.restarts = 0
        if self.restarts >= self.policy.max_restarts:
            return None
        delay = min(self.policy.backoff_initial * (2 ** self.restarts), self.policy.backoff_max)
        self.restarts += 1
        return delay


class _Supervised:
    def __init__(self, launch: Launch, backoff: Backoff, stop: StopSpec | None, stop_launch: Launch | None):
        self.launch, self.backoff, self.stop_spec = launch, backoff, stop or StopSpec()
        self.stop_launch = stop_launch
        self.pid: int | None = None
        self.started: str | None = None
        self.process: _Protocol | None = None
        self.timer = None            # the pending restart, or the adopted-liveness poll
        self.stopping: defer.Deferred | None = None


class Supervisor:
    """Supervised processes of one sliver (module docstring)."""

    def __init__(self, reactor, listener, *, clock=None):
        self.reactor = reactor
        self.clock = clock or reactor
        self.listener = listener
        self.procs: dict[str, _Supervised] = {}

    # -- queries --------------------------------------------------------------------------------------

    def pid(self, name: str) -> int | None:
        entry = self.procs.get(name)
        return entry.pid if entry else None

    def started(self, name: str) -> str | None:
        entry = self.procs.get(name)
        return entry.started if entry else None

    def restarts(self, name: str) -> int:
        entry = self.procs.get(name)
        return entry.backoff.restarts if entry else 0

    def is_up(self, name: str) -> bool:
        """A process of ``name`` is running (or a restart of it is pending)."""
        entry = self.procs.get(name)
        return entry is not None and entry.stopping is None and (entry.pid is not None or entry.timer is not None)

    # -- start, adopt, stop ---------------------------------------------------------------------------

    def start(self, launch: Launch, policy: RestartPolicy, stop: StopSpec | None = None, restarts: int = 0,
              stop_launch: Launch | None = None):
        """Start ``launch`` supervised; a Deferred of its pid (ProcessError if it cannot start: then it is
        not supervised).  A process of that name already up is kept: its pid is returned.  ``stop``:
        how to stop it; ``stop_launch``: its stop command, prepared (when ``stop`` has one)."""
        entry = self.procs.get(launch.name)
        if entry is not None and entry.pid is not None and entry.stopping is None:
            return defer.succeed(entry.pid)
        if entry is not None and entry.timer is not None:
            entry.timer.cancel()
        entry = self.procs[launch.name] = _Supervised(launch, Backoff(policy, restarts), stop, stop_launch)
        d = self._launch(entry)
        d.addErrback(self._forget_on_failure, launch.name, entry)
        return d

    def _forget_on_failure(self, failure, name, entry):
        if self.procs.get(name) is entry:
            del self.procs[name]
        return failure

    def _launch(self, entry: _Supervised):
        try:
            process = _spawn(self.reactor, entry.launch)
        except ProcessError:
            return defer.fail()
        entry.process = process

        def launched(pid):
            entry.pid, entry.started = pid, process_start_time(pid)
            entry.backoff.started(self.clock.seconds())
            process.ended.addCallback(self._ended, entry)
            return pid
        return process.launched.addCallback(launched)

    def adopt(self, launch: Launch, policy: RestartPolicy, stop: StopSpec | None, pid: int, started: str,
              restarts: int = 0, stop_launch: Launch | None = None) -> bool:
        """Supervise a process a previous engine started; False (nothing supervised) if it is gone."""
        if not process_alive(pid, started):
            return False
        entry = self.procs[launch.name] = _Supervised(launch, Backoff(policy, restarts), stop, stop_launch)
        entry.pid, entry.started = pid, started
        entry.backoff.started(self.clock.seconds())
        entry.timer = self.clock.callLater(ADOPTED_POLL_SECONDS, self._poll_adopted, entry)
        return True

    def _poll_adopted(self, entry: _Supervised) -> None:
        entry.timer = None
        if process_alive(entry.pid, entry.started):
            entry.timer = self.clock.callLater(ADOPTED_POLL_SECONDS, self._poll_adopted, entry)
        else:
            self._ended(ExitStatus(None, None), entry)

    def _ended(self, status: ExitStatus, entry: _Supervised) -> None:
        entry.pid = entry.process = None
        if self.procs.get(entry.launch.name) is not entry:
            return
        if entry.stopping is not None:
            del self.procs[entry.launch.name]
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            entry.stopping.callback(status)
            return
        self._crashed(entry, str(status))

    def _crashed(self, entry: _Supervised, reason: str) -> None:
        delay = entry.backoff.after_exit(self.clock.seconds())
        if delay is not None:
            entry.timer = self.clock.callLater(delay, self._restart, entry)
        else:
            del self.procs[entry.launch.name]
        self.listener.process_exited(entry.launch.name, reason, delay, entry.backoff.restarts)

    def _restart(self, entry: _Supervised) -> None:
        entry.timer = None

        def failed(failure):
            failure.trap(ProcessError)
            if self.procs.get(entry.launch.name) is entry and entry.stopping is None:
                self._crashed(entry, failure.value.reason)

        def restarted(pid):
            if entry.stopping is None:
                self.listener.process_restarted(entry.launch.name, pid, entry.started)
        self._launch(entry).addCallbacks(restarted, failed)

    def stop(self, name: str):
        """Stop ``name``'s process (module docstring); a Deferred of its :class:`ExitStatus` (None when
        nothing was running).  A pending restart is cancelled."""
        entry = self.procs.get(name)
        if entry is None:
            return defer.succeed(None)
        if entry.stopping is not None:
            return _chain(entry.stopping)
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        entry.timer = None
        if entry.pid is None:
            del self.procs[name]
            return defer.succeed(None)
        entry.stopping = defer.Deferred()
        done = _chain(entry.stopping)
        spec = entry.stop_spec
        pid, started = entry.pid, entry.started
        if entry.stop_launch is not None:
            # The stop command's own outcome does not matter: the grace timer below ends the process
            # whatever the command did.
            run_once(self.reactor, self.clock, entry.stop_launch, spec.grace).addErrback(lambda _: None)
        else:
            _signal(pid, started, _SIGNALS.get(spec.signal, signal.SIGTERM))
        entry.timer = self.clock.callLater(spec.grace, _signal, pid, started, signal.SIGKILL)
        if entry.process is None:      # adopted: its exit is not signalled to us
            self._watch_stopping(entry)
        return done

    def _watch_stopping(self, entry: _Supervised) -> None:
        if process_alive(entry.pid, entry.started):
            self.reactor.callLater(STOP_POLL_SECONDS, self._watch_stopping, entry)
        else:
            self._ended(ExitStatus(None, None), entry)


def _chain(d: defer.Deferred) -> defer.Deferred:
    """A new Deferred firing with ``d``'s result, leaving ``d``'s own chain alone."""
    out = defer.Deferred()

    def fire(result):
        out.callback(result)
        return result
    d.addCallback(fire)
    return out

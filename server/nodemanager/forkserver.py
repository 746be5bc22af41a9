"""A fork server for sliver daemons: ``twistd`` started by forking a pre-imported process, not by exec.

Why.  A deployment engine is ``twistd dsmt-engine`` in every sliver.  Started
as a fresh interpreter, each one spends ~0.5 s of CPU importing Twisted, spyne,
zeep, lxml and dsmt before it does anything; a node manager creating hundreds of
slivers spends most of its time there (bench/deploy.py).  The fork server is a
child process of the node manager that imports those modules once, then
``fork``\\s one child per start: the child inherits the imported modules (and
shares their memory pages copy-on-write) and runs ``twistd`` in-process with
the command line it was given, exactly as the exec'd ``twistd`` would.

Contract of the child (the same as :class:`~dsmt.server.nodemanager.sliver.ExecSpawner`'s,
the :class:`~dsmt.server.nodemanager.sliver.Spawner` contract): leader of a new
session; cwd, environment (exactly the one given: ``os.environ`` is replaced),
stdin ``/dev/null``, stdout and stderr on the sliver's log, resource limits set
soft and hard; then ``twistd`` runs with ``sys.argv`` = the command line and
the child exits with its status.  Setting up happens before the fork server
answers: a failure there (a missing directory, a limit refused) comes back as
the start's error and the child is gone, as an exec failure comes back from the
launcher.  What differs from exec: the interpreter's own start-up options
(``sys.path``, ``sys.flags``) are the fork server's; modules imported by the
fork server are not re-imported — which is the point; and
``/proc/<pid>/environ`` shows the fork server's own minimal environment
(:func:`server_environment`), not the one ``os.environ`` holds.

**No reactor before the fork.**  A Twisted reactor owns an epoll descriptor; a
reactor installed in the fork server would be shared by every child.  The fork
server therefore only imports modules, checks afterwards that
``twisted.internet.reactor`` was not installed by any of them, and refuses to
serve (each start answered with an error, so callers fall back to exec) if one
was.  Each child's ``twistd`` installs its own reactor.

**Wire** (a Unix stream socket pair; pure codec in :func:`encode_request` /
:class:`MessageReader`): each message is a 4-byte big-endian length and a
UTF-8 JSON object.  The fork server first sends ``{"ready": true}`` once its
imports are done (or ``{"ready": false, "error": …}``).  A request is
``{"argv": [...], "env": {...}, "cwd": "...", "limits": "..."}`` with the log's
descriptor passed alongside (``SCM_RIGHTS``); the answer is ``{"pid": N,
"started": "<start time>"}`` or ``{"error": "..."}``.  Messages are at most
:data:`MAX_MESSAGE_BYTES`.  One request at a time (the node manager's reactor
thread is the only caller).  End of file on the socket ends the fork server;
the children it started keep running (they belong to their slivers, as exec'd
engines do) and are reparented.

The fork server reaps its children (``SIGCHLD``), so a killed sliver daemon
does not linger as a zombie.  The node manager learns of a dead engine from
``/proc`` (:meth:`~dsmt.server.nodemanager.bootstrap.EngineBootstrap.watch`),
not from the fork server.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Iterable, Sequence

from dsmt.server.nodemanager.sliver import (
    DEFAULT_PATH, LAUNCH_TIMEOUT_SECONDS, MAX_ARGV_BYTES, Spawner, SpawnerUnavailable, StartedProcess, process_alive,
    process_start_time, read_report,
)

__all__ = ["ForkServer", "ForkedProcess", "MessageReader", "ProtocolError", "encode_message", "serve",
           "MAX_MESSAGE_BYTES", "READY_TIMEOUT_SECONDS", "BASE_PRELOAD"]

#: Largest message either side accepts: a request holds at most MAX_ARGV_BYTES of command and environment,
#: at most doubled by JSON escaping, plus the cwd and limits; anything larger is a broken peer.
MAX_MESSAGE_BYTES = 2 * MAX_ARGV_BYTES + 64 * 1024
#: How long the first start waits for the fork server's imports (~0.3–0.6 s of CPU on an idle machine; a
#: node starting many daemons at once can take several times that).
READY_TIMEOUT_SECONDS = 60.0
#: How long a start waits for its answer once the fork server is ready: a fork and the child's set-up take
#: milliseconds; the same bound as the exec launcher's.
ANSWER_TIMEOUT_SECONDS = LAUNCH_TIMEOUT_SECONDS
#: How long close() waits for the fork server to exit after its socket closed, before killing it.
CLOSE_TIMEOUT_SECONDS = 5.0
#: What every fork server imports: twistd and its plugin discovery (the rest is per use, e.g. the engine's).
BASE_PRELOAD = ("twisted.scripts.twistd", "twisted.application.app", "twisted.plugin")

_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A message that is not a well-formed fork-server message (too large, not JSON, not an object)."""


def encode_message(message: dict) -> bytes:
    """``message`` framed for the wire; ProtocolError if it exceeds :data:`MAX_MESSAGE_BYTES`."""
    body = json.dumps(message, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"a message of {len(body)} bytes; at most {MAX_MESSAGE_BYTES}")
    return _HEADER.pack(len(body)) + body


class MessageReader:
    """Incremental decoder: :meth:`feed` bytes, :meth:`next` gives each complete message (a dict) or None.

    ProtocolError for a declared length over :data:`MAX_MESSAGE_BYTES` (raised as soon as the header is
    in, before the body is buffered), a body that is not UTF-8 JSON, or JSON that is not an object."""

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > MAX_MESSAGE_BYTES:
                raise ProtocolError(f"a message of {length} bytes announced; at most {MAX_MESSAGE_BYTES}")

    def next(self) -> dict | None:
        if len(self._buffer) < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(self._buffer)
        if len(self._buffer) < _HEADER.size + length:
            return None
        body = bytes(self._buffer[_HEADER.size:_HEADER.size + length])
        del self._buffer[:_HEADER.size + length]
        try:
            message = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"a message that is not UTF-8 JSON: {exc}") from None
        if not isinstance(message, dict):
            raise ProtocolError(f"a message that is not a JSON object: {type(message).__name__}")
        if len(self._buffer) >= _HEADER.size:
            self.feed(b"")                                 # check the next header's length at once
        return message


def check_request(message: dict) -> tuple[list[str], dict[str, str], str, list[tuple[int, int, int]]]:
    """The fields of a start request, checked: ``(argv, env, cwd, limits)``; ProtocolError otherwise."""
    argv, env, cwd, limits = (message.get(key) for key in ("argv", "env", "cwd", "limits"))
    if not isinstance(argv, list) or not argv or not all(isinstance(arg, str) for arg in argv):
        raise ProtocolError("argv must be a non-empty list of strings")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and "=" not in k
                                            for k, v in env.items()):
        raise ProtocolError("env must map names (without '=') to strings")
    if not isinstance(cwd, str) or not os.path.isabs(cwd):
        raise ProtocolError("cwd must be an absolute path")
    if any("\0" in text for text in [*argv, *env, *env.values(), cwd]):
        raise ProtocolError("a NUL character in the command, environment or cwd")
    if not isinstance(limits, str):
        raise ProtocolError("limits must be a string")
    triples = []
    for item in filter(None, limits.split(",")):
        try:
            which, soft, hard = (int(part) for part in item.split(":"))
        except ValueError:
            raise ProtocolError(f"limit {item!r} is not resource:soft:hard") from None
        triples.append((which, soft, hard))
    return argv, env, cwd, triples


# ------------------------------------------------------------------ the fork server process

def preload(modules: Iterable[str]) -> str | None:
    """Import ``modules`` and twistd's plugins; None when this process may fork daemons, else why not."""
    for name in (*BASE_PRELOAD, *modules):
        importlib.import_module(name)
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins
    list(getPlugins(IServiceMaker))                        # load the plugin modules twistd will look up
    if "twisted.internet.reactor" in sys.modules:
        return "a preloaded module installed a Twisted reactor; forked children would share it"
    import threading
    if threading.active_count() > 1:
        return "a preloaded module started a thread; forking a threaded process is unsafe"
    return None


def _become(argv, env, cwd, limits, log_fd: int) -> None:
    """In the forked child: the Spawner contract's session, descriptors, cwd, environment and limits."""
    import resource
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))
    sys.argv = list(argv)


def _child(argv, env, cwd, limits, log_fd: int, report_fd: int, keep_closed: Sequence[int]) -> None:
    """The forked child's life: set up (a failure goes to ``report_fd``), then run twistd; never returns."""
    try:
        signal.set_wakeup_fd(-1)
        for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in keep_closed:
            os.close(fd)
        _become(argv, env, cwd, limits, log_fd)
    except BaseException as exc:  # a set-up failure is the start's error, reported to the node manager
        try:
            os.write(report_fd, str(exc).encode("utf-8", "replace")[:1000] or b"set-up failed")
        finally:
            os._exit(127)
    os.close(report_fd)                                    # end of file: set up, twistd starts
    code = 1
    try:
        from twisted.scripts.twistd import run
        run()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _await_setup(report_fd: int) -> str | None:
    """None once the child closed its end without writing (set up), else what it reported."""
    data = read_report(report_fd, ANSWER_TIMEOUT_SECONDS)
    if data is None:
        return f"the forked child did not set up within {ANSWER_TIMEOUT_SECONDS:g} s"
    return data.decode("utf-8", "replace") or None


def _reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _receive(sock: socket.socket, reader: MessageReader) -> tuple[dict | None, list[int]]:
    """The next request and the descriptors that came with it; (None, []) at end of file."""
    fds: list[int] = []
    while True:
        message = reader.next()
        if message is not None:
            return message, fds
        data, received, _, _ = socket.recv_fds(sock, 65536, 4)
        fds.extend(received)
        if not data:
            for fd in fds:
                os.close(fd)
            return None, []
        reader.feed(data)


def _start(sock: socket.socket, wake_fds: tuple[int, int], message: dict, fds: list[int]) -> dict:
    """Fork and set up one child for ``message``; the answer to send."""
    argv, env, cwd, limits = check_request(message)
    if len(fds) != 1:
        raise ProtocolError(f"a start request carries exactly one descriptor (the log), not {len(fds)}")
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(argv, env, cwd, limits, fds[0], write_fd, (sock.fileno(), *wake_fds))
    os.close(write_fd)
    try:
        failure = _await_setup(read_fd)
    finally:
        os.close(read_fd)
    if failure is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        return {"error": failure}
    return {"pid": pid, "started": process_start_time(pid)}


def serve(sock: socket.socket, modules: Sequence[str]) -> None:
    """The fork server's loop on ``sock`` after preloading ``modules``; returns at end of file."""
    try:
        refusal = preload(modules)
    except Exception as exc:  # an import that fails: every start is refused, callers fall back to exec
        refusal = f"preloading failed: {exc}"
    gc.collect()
    gc.freeze()                  # keep the imported objects out of the children's collections: fewer copied pages
    sock.sendall(encode_message({"ready": refusal is None, **({"error": refusal} if refusal else {})}))
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_write)
    reader = MessageReader()
    while True:
        ready, _, _ = select.select([sock, wake_read], [], [])
        if wake_read in ready:
            os.read(wake_read, 4096)
            _reap_children()
        if sock not in ready:
            continue
        try:
            message, fds = _receive(sock, reader)
        except ProtocolError as exc:
            sock.sendall(encode_message({"error": f"malformed request: {exc}"}))
            return                                         # the stream cannot be resynchronised
        if message is None:
            return
        try:
            if refusal is not None:
                answer = {"error": refusal}
            else:
                answer = _start(sock, (wake_read, wake_write), message, fds)
        except ProtocolError as exc:
            answer = {"error": f"malformed request: {exc}"}
        except OSError as exc:
            answer = {"error": f"cannot fork: {exc}"}
        finally:
            for fd in fds:
                os.close(fd)
        sock.sendall(encode_message(answer))
        _reap_children()


def main(argv: Sequence[str]) -> int:
    """``python -P -m dsmt.server.nodemanager.forkserver FD [MODULE...]``: serve on socket descriptor FD."""
    sock = socket.socket(fileno=int(argv[0]))
    try:
        serve(sock, argv[1:])
    finally:
        sock.close()
    return 0


# ------------------------------------------------------------------ the node manager's side

def server_environment() -> dict[str, str]:
    """The fork server's own environment: ``PATH`` and, when set, ``PYTHONPATH`` (a working tree's code) —
    nothing else of the node manager's.  A forked daemon's ``os.environ`` is the one its start gave, but
    ``/proc/<pid>/environ`` shows the environment its process image was exec'd with, i.e. this one, so it
    must carry nothing a sliver should not see."""
    environment = {"PATH": DEFAULT_PATH}
    if os.environ.get("PYTHONPATH"):
        environment["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return environment


class ForkedProcess(StartedProcess):
    """A child of the fork server: not this process's child, so waiting is watching ``/proc``."""

    #: Seconds between two looks at /proc while waiting for an exit (a killed child is reaped within a
    #: millisecond or two by the fork server).
    POLL_SECONDS = 0.005

    def __init__(self, pid: int, started: str):
        self.pid, self.start_time = pid, started

    def started(self) -> str | None:
        return None                                        # the fork server answered after the set-up

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while process_alive(self.pid, self.start_time):
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(self.POLL_SECONDS)


class ForkServer(Spawner):
    """The node manager's handle on one fork server (a :class:`~dsmt.server.nodemanager.sliver.Spawner`).

    ``preload``: the modules the daemons it starts use (e.g. the engine's).  The server process starts at
    the first :meth:`start` or :meth:`spawn` and again after it failed.  :meth:`spawn` accepts only
    command lines whose ``argv[0]`` is ``twistd`` (the child runs twistd in-process; ``argv[0]`` names the
    twistd an exec would run, i.e. this installation's); any failure of the fork server itself raises
    :class:`SpawnerUnavailable` (nothing was started; the caller may exec instead), a refused start
    (set-up failed in the child) raises OSError.  Blocking calls, one at a time (the reactor thread)."""

    def __init__(self, preload: Sequence[str] = (), *, python: str = sys.executable):
        self.preload, self.python = tuple(preload), python
        self._process: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._reader = MessageReader()
        self._ready = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the fork server process if it is not running (its imports proceed in the background)."""
        if self._process is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._process = subprocess.Popen(
                [self.python, "-P", "-m", "dsmt.server.nodemanager.forkserver", str(theirs.fileno()),
                 *self.preload],
                stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), close_fds=True, env=server_environment())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock, self._reader, self._ready = ours, MessageReader(), False

    def close(self) -> None:
        """Stop the fork server (its children keep running)."""
        process, self._process = self._process, None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if process is not None:
            try:
                process.wait(timeout=CLOSE_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _answer(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            message = self._reader.next()
            if message is not None:
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer within {timeout:g} s")
            self._sock.settimeout(remaining)
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("the fork server exited")
            self._reader.feed(data)

    def spawn(self, argv, env, cwd, log_fd, limits) -> ForkedProcess:
        if os.path.basename(argv[0]) != "twistd":
            raise SpawnerUnavailable(f"the fork server runs twistd only, not {argv[0]!r}")
        try:
            self.start()
            if not self._ready:
                ready = self._answer(READY_TIMEOUT_SECONDS)
                if not ready.get("ready"):
                    raise ConnectionError(ready.get("error") or "the fork server is not ready")
                self._ready = True
            request = encode_message({"argv": list(argv), "env": dict(env), "cwd": cwd, "limits": limits})
            socket.send_fds(self._sock, [request[:_HEADER.size]], [log_fd])
            self._sock.sendall(request[_HEADER.size:])
            answer = self._answer(ANSWER_TIMEOUT_SECONDS)
        except (OSError, ProtocolError) as exc:
            self.close()                                   # a broken fork server is started again next time
            raise SpawnerUnavailable(f"the fork server failed: {exc}") from None
        if "error" in answer:
            raise OSError(answer["error"])
        pid, started = answer.get("pid"), answer.get("started")
        if not isinstance(pid, int) or pid <= 1 or not isinstance(started, str):
            self.close()
            raise SpawnerUnavailable(f"the fork server answered {answer!r}")
        return ForkedProcess(pid, started)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

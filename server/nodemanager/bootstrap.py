"""The sliver bootstrap: a node manager starts the deployment engine inside each new sliver.

Reference 000's client layers: the container (sliver) is made by the sliver
manager, then the *sliver bootstrap* installs and starts the deployment agent
(our deployment engine, ``twistd dsmt-engine``) inside it, then the engine
installs the application.  A node manager started with ``--engine`` does the
middle layer: once CreateSliver made a sliver ``running``, it writes the
engine's files into the sliver and starts the engine as a sliver process
(its own session, the sliver's limits, output in the sliver's
``logs/twistd.log``).  The engine itself reports its installation as
``org.dsmt.component.sliver-bootstrap`` events (managed
``org.dsmt.component.deployment-agent``: requested → … → running), because
only it knows when it is up — logged in to PsEPR and listening for commands.

Files, in the sliver's home (``~/.dsmt/``, mode 700): ``psepr.pw`` (the
``<slice>_mgr`` account's password, mode 600), ``engine.sqlite`` (the
engine's state) and ``descriptors/``.  Their presence also marks a sliver as
bootstrapped: CreateSliver repeated on a running sliver does not start a second
engine.  Deleting the sliver kills the engine with every other sliver process.

**How engines start.**  Given a ``spawner`` (the node manager daemon gives a
:class:`~dsmt.server.nodemanager.forkserver.ForkServer` preloaded with the
engine's modules), an engine is forked from that pre-imported process instead
of exec'ing a fresh ``twistd``: ~0.02 s of CPU per engine instead of ~0.5 s
(bench/RESULTS.md), with the same session, limits, log and command line.  When
the fork server is unavailable the engine is exec'd as before (logged).

Contract of :class:`EngineBootstrap`: ``start(slice_name)`` never raises; a
failure to write or to start is logged and published as the bootstrap's
``failed`` (the engine could not report it itself).  ``ensure(slice_name)``
starts the engine of a bootstrapped sliver again when its process is gone (its
pid and start time are kept in ``~/.dsmt/engine.pid``).  ``watch(slices)`` is
what the node manager runs for its running slivers when it starts and then
every :data:`WATCH_SECONDS`: an engine found dead is published ``failed`` and
started again (it recovers its deployments from its own state and reports
``requested`` … ``running``), at most :data:`MAX_RESTARTS` times per
:data:`RESTART_WINDOW_SECONDS` per sliver — an engine that keeps dying is then
left ``failed`` (logged) until the window lets it try again.
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from twisted.logger import Logger

from dsmt.server.statusevents import DEPLOYMENT_AGENT, SLIVER_BOOTSTRAP, deployment_status

__all__ = ["EngineSettings", "EngineBootstrap", "ENGINE_DIR", "WATCH_SECONDS", "MAX_RESTARTS",
           "RESTART_WINDOW_SECONDS"]

log = Logger(namespace="dsmt.nodemanager.bootstrap")

#: The engine's directory in a sliver's home.
ENGINE_DIR = ".dsmt"
#: Seconds between two looks at the engines of running slivers: a dead engine is back within this (plus its
#: own start).  A look is a pid file and a /proc read per sliver (tens of µs), so even hundreds of slivers
#: cost nothing measurable at this interval.
WATCH_SECONDS = 5.0
#: Restarts of one sliver's engine allowed per RESTART_WINDOW_SECONDS: an engine that cannot stay up (a
#: broken state file, a full disk) is not restarted in a loop; after the window it is tried again.
MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 600.0


@dataclass(frozen=True)
class EngineSettings:
    """How engines are started: ``router`` (PsEPR URLs), ``password`` (of the ``<slice>_mgr`` accounts),
    ``ca`` (PEM path: engines check callers' signatures; None: they accept unsigned requests),
    ``http`` (engines also serve SOAP/HTTP on a loopback port the kernel picks; its URL is written to
    ``~/.dsmt/engine.sqlite.url``), ``extra`` (more ``dsmt-engine`` arguments, e.g. ``--package-root``),
    ``watch_seconds`` (between two looks at the running slivers' engines)."""

    router: str
    password: str | None = None
    ca: str | None = None
    http: bool = False
    extra: Sequence[str] = ()
    watch_seconds: float = WATCH_SECONDS


def _twistd() -> str:
    """The ``twistd`` next to the running Python (the same installation, so it sees dsmt's plugins)."""
    return str(Path(sys.executable).parent / "twistd")


class EngineBootstrap:
    """Starts ``twistd dsmt-engine`` in new slivers of ``backend`` for node ``node``; ``spawner`` (default:
    exec) makes the processes; ``clock`` (monotonic seconds) times the restart window."""

    def __init__(self, backend, node: str, settings: EngineSettings, publish: Callable, *, spawner=None,
                 clock: Callable[[], float] = time.monotonic):
        self.backend, self.node, self.settings, self.publish = backend, node, settings, publish
        self.spawner, self.clock = spawner, clock
        self._restarts: dict[str, deque] = {}
        self._given_up: set[str] = set()

    def argv(self, slice_name: str, home: str) -> list[str]:
        engine = os.path.join(home, ENGINE_DIR)
        argv = [_twistd(), "-n", "--pidfile=", "dsmt-engine", "--slice", slice_name, "--host", self.node,
                "--home", home, "--state", os.path.join(engine, "engine.sqlite"),
                "--descriptors", os.path.join(engine, "descriptors"), "--router", self.settings.router,
                "--password-file", os.path.join(engine, "psepr.pw")]
        argv += ["--ca", self.settings.ca] if self.settings.ca else ["--allow-unsigned"]
        if self.settings.http:
            argv += ["--http", "tcp:0:interface=127.0.0.1"]
        return argv + list(self.settings.extra)

    def start(self, slice_name: str) -> int | None:
        """Write the engine's files and start it; the engine's pid, or None (already there, or failed)."""
        return self._start(slice_name, fresh=True)

    def ensure(self, slice_name: str) -> int | None:
        """Start the engine of a bootstrapped sliver again if its process is gone; its new pid, or None."""
        return self._start(slice_name, fresh=False)

    def watch(self, slices: Iterable[str]) -> list[str]:
        """Start again the dead engines of bootstrapped ``slices`` (see the module docstring); the slices
        whose engine was started again."""
        restarted = []
        for slice_name in slices:
            try:
                engine = os.path.join(self.backend.home(slice_name), ENGINE_DIR)
            except Exception:
                continue                                   # the sliver went away meanwhile
            if not os.path.isdir(engine) or self._alive(engine):
                continue
            now = self.clock()
            history = self._restarts.setdefault(slice_name, deque())
            while history and now - history[0] >= RESTART_WINDOW_SECONDS:
                history.popleft()
            if len(history) >= MAX_RESTARTS:
                if slice_name not in self._given_up:
                    self._given_up.add(slice_name)
                    log.error("{node}: the deployment engine of {slice} died {count} times in {window:g} s; "
                              "not restarted before the oldest of those leaves the window", node=self.node,
                              slice=slice_name, count=len(history), window=RESTART_WINDOW_SECONDS)
                continue
            self._given_up.discard(slice_name)
            history.append(now)
            log.warn("{node}: the deployment engine of {slice} is not running; starting it again",
                     node=self.node, slice=slice_name)
            self._publish_failed(slice_name)                # the engine died without a word: say it for it
            if self._start(slice_name, fresh=False, failure_published=True) is not None:
                restarted.append(slice_name)
        return restarted

    def _publish_failed(self, slice_name: str) -> None:
        try:
            self.publish(deployment_status(slice_name, self.node, SLIVER_BOOTSTRAP, DEPLOYMENT_AGENT, "failed"))
        except Exception:
            log.failure("{node}: the bootstrap's failure could not be published", node=self.node)

    def _spawn(self, slice_name: str, argv: list[str], environment: dict) -> int:
        """Start the engine with the spawner, or by exec when the spawner is unavailable."""
        from dsmt.server.nodemanager.sliver import SpawnerUnavailable
        if self.spawner is not None:
            try:
                return self.backend.start(slice_name, argv, environment, spawner=self.spawner)
            except SpawnerUnavailable as exc:
                log.warn("{node}: {error}; the engine of {slice} is exec'd instead", node=self.node, error=exc,
                         slice=slice_name)
        return self.backend.start(slice_name, argv, environment)

    def _alive(self, engine: str) -> bool:
        """Whether the recorded engine process exists, is the one recorded (start time) and is no zombie."""
        from dsmt.server.nodemanager.sliver import process_alive
        try:
            with open(os.path.join(engine, "engine.pid"), encoding="ascii") as handle:
                pid, started = handle.read().split()
            return process_alive(int(pid), started)
        except (OSError, ValueError):
            return False

    def _start(self, slice_name: str, *, fresh: bool, failure_published: bool = False) -> int | None:
        from dsmt.server.atomicfile import write_atomic
        from dsmt.server.nodemanager.sliver import process_start_time
        try:
            home = self.backend.home(slice_name)
            engine = os.path.join(home, ENGINE_DIR)
            if fresh:
                if os.path.isdir(engine):
                    return None                   # bootstrapped already: CreateSliver repeated
                os.mkdir(engine, 0o700)
                os.mkdir(os.path.join(engine, "descriptors"), 0o700)
                descriptor = os.open(os.path.join(engine, "psepr.pw"), os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                     | os.O_NOFOLLOW, 0o600)
                with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                    handle.write((self.settings.password or "") + "\n")
            elif not os.path.isdir(engine) or self._alive(engine):
                return None                       # never bootstrapped, or its engine runs
            environment = {}
            if os.environ.get("PYTHONPATH"):          # a working tree's code (tests, make demo)
                environment["PYTHONPATH"] = os.pathsep.join(
                    os.path.abspath(p) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p)
            pid = self._spawn(slice_name, self.argv(slice_name, home), environment)
            write_atomic(os.path.join(engine, "engine.pid"), f"{pid} {process_start_time(pid)}\n".encode(), 0o600)
            log.info("{node}: deployment engine of {slice} started (pid {pid})", node=self.node, slice=slice_name,
                     pid=pid)
            return pid
        except Exception as exc:  # the contract: logged and published, never raised into CreateSliver's reply
            log.error("{node}: the deployment engine of {slice} did not start: {error}", node=self.node,
                      slice=slice_name, error=exc)
            if not failure_published:
                self._publish_failed(slice_name)
            return None

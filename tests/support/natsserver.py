"""Real nats-server processes for tests: one server, or a cluster on loopback.

Servers listen on 127.0.0.1 only and on ports the kernel picks (``-1``), read
back from the ports file nats-server writes, so parallel runs never collide.
Each server owns a temporary directory (ports file and log) removed on stop.

Fixtures (import them into a test module or a conftest)::

    from tests.support.natsserver import nats_server, nats_cluster  # noqa: F401

``nats_server`` yields a started :class:`NatsServer`, ``nats_cluster`` a
:class:`NatsCluster` of three whose routes are all up.  Both are
function-scoped and stop their processes whether or not the test passed.
For ``unittest``/``trial`` test cases, which cannot take fixture arguments,
mark the class ``@pytest.mark.usefixtures("nats_server")`` and read
``self.nats_server`` (likewise ``self.nats_cluster``).

When no nats-server binary is found the fixtures skip, or fail when the
environment variable ``CI`` is ``true``, since CI is meant to install it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Sequence

import pytest

from dsmt.client.testbed import stop_process

#: Where Debian (``/usr/sbin``) and hand installs put nats-server outside ``PATH``.
FALLBACK_DIRS = ("/usr/sbin", "/usr/local/sbin")

#: Bound on waiting for a server to write its ports file or a cluster to
#: connect its routes: both take milliseconds, so reaching it means a broken
#: server, not a slow one.
STARTUP_TIMEOUT = 10.0

#: Interval between looks at a file or endpoint that has no change
#: notification; start-up is the only place the harness polls.
POLL_INTERVAL = 0.01

#: Monitoring requests go straight to loopback, whatever proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_nats_server() -> str:
    """Path of the nats-server binary; skip the test without one, fail under ``CI=true``."""
    candidates = [shutil.which("nats-server"), *(os.path.join(d, "nats-server") for d in FALLBACK_DIRS)]
    for candidate in candidates:
        if candidate is not None and os.access(candidate, os.X_OK):
            return candidate
    message = ("nats-server not found on PATH or in " + ", ".join(FALLBACK_DIRS)
               + "; install it (Debian: apt-get install nats-server)")
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _wait_until(condition, what: str, process: subprocess.Popen, log: Path):
    """Poll *condition* until it returns something truthy; fail after :data:`STARTUP_TIMEOUT` or if *process* exits."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        result = condition()
        if result:
            return result
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited with {process.returncode} before {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {STARTUP_TIMEOUT} s waiting for {what}:\n{_tail(log)}")
        time.sleep(POLL_INTERVAL)


def _tail(log: Path) -> str:
    if not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-20:])


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


class NatsServer:
    """One nats-server process on 127.0.0.1, started by the constructor.

    *args* are extra command-line options (``["--user", "u", "--pass", "p"]``).
    *cluster* adds a route listener on a kernel-chosen port; *routes* are
    ``nats://`` URLs of route listeners to connect to.  A monitoring endpoint
    is always enabled (``monitor_port``).  Use as a context manager, or call
    :meth:`stop`.
    """

    def __init__(self, args: Sequence[str] = (), *, cluster: bool = False, routes: Sequence[str] = ()):
        binary = find_nats_server()
        self._directory = tempfile.TemporaryDirectory(prefix="nats-server-")
        directory = Path(self._directory.name)
        self.log = directory / "nats-server.log"
        command = [binary, "-a", "127.0.0.1", "-p", "-1", "-m", "-1",
                   "--ports_file_dir", str(directory), "--log", str(self.log), *args]
        expected = {"nats", "monitoring"}
        if cluster:
            command += ["--cluster", "nats://127.0.0.1:-1", "--cluster_name", "dsmt-test"]
            expected.add("cluster")
        if routes:
            command += ["--routes", ",".join(routes)]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ports_file = directory / f"nats-server_{self.process.pid}.ports"
            ports = _wait_until(lambda: self._read_ports(ports_file, expected),
                                "its ports file", self.process, self.log)
        except BaseException:
            self.stop()
            raise
        self.host = "127.0.0.1"
        self.port = _port(ports["nats"][0])
        self.monitor_port = _port(ports["monitoring"][0])
        self.cluster_url = ports["cluster"][0] if cluster else None

    @staticmethod
    def _read_ports(path: Path, expected: set[str]) -> dict | None:
        """The ports file's JSON once it has every *expected* listener; ``None`` while absent or half-written."""
        try:
            ports = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return ports if expected <= ports.keys() else None

    def monitor(self, endpoint: str) -> dict:
        """GET a monitoring endpoint such as ``routez`` and decode its JSON."""
        url = f"http://127.0.0.1:{self.monitor_port}/{endpoint}"
        with _DIRECT.open(url, timeout=STARTUP_TIMEOUT) as response:
            return json.load(response)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server, kill it if it is still alive after *timeout*, remove its directory."""
        stop_process(self.process, timeout)
        self._directory.cleanup()

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class NatsCluster:
    """*n* clustered servers on loopback, full mesh, started by the constructor.

    Route listeners use kernel-chosen ports, so server *k* is started with
    explicit routes to servers ``0..k-1``, whose ports are known by then; that
    gives every pair a route without reserving ports in advance (and without
    the race of probing for free ones).  :meth:`wait_for_routes` (called by the
    constructor) returns once every server has routes to all ``n - 1`` others.
    """

    def __init__(self, n: int = 3):
        self.servers: list[NatsServer] = []
        try:
            for _ in range(n):
                self.servers.append(NatsServer(cluster=True, routes=[s.cluster_url for s in self.servers]))
            self.wait_for_routes()
        except BaseException:
            self.stop()
            raise

    def __getitem__(self, index: int) -> NatsServer:
        """Server *index*, counting from 0 (negative counts from the end)."""
        return self.servers[index]

    def __len__(self) -> int:
        return len(self.servers)

    def wait_for_routes(self) -> None:
        """Block until every server has a route to every other one."""
        want = len(self.servers) - 1
        for server in self.servers:
            _wait_until(lambda: len(self._peers(server)) == want,
                        f"{want} routes on port {server.port}", server.process, server.log)

    @staticmethod
    def _peers(server: NatsServer) -> set[str]:
        """Server ids *server* has a route to (a pair may briefly hold two routes while they race)."""
        return {route["remote_id"] for route in server.monitor("routez")["routes"]}

    def wait_for_interest(self, index: int, subject: str) -> None:
        """Block until server *index* knows, through a route, of a remote subscription to *subject*.

        Subscriptions spread over routes asynchronously: a message published
        on one server right after a subscription on another may find no
        interest yet and be dropped.  Call this between the two.
        """
        server = self.servers[index]

        def routed() -> bool:
            routes = server.monitor("routez?subs=1")["routes"]
            return any(subject in (route.get("subscriptions_list") or ()) for route in routes)

        _wait_until(routed, f"interest in {subject!r} on port {server.port}", server.process, server.log)

    def stop(self) -> None:
        """Stop every server."""
        for server in self.servers:
            server.stop()

    def __enter__(self) -> NatsCluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _attach(request: pytest.FixtureRequest, name: str, value) -> None:
    """Expose a fixture value as ``self.<name>`` on a unittest/trial test case."""
    if request.instance is not None:
        setattr(request.instance, name, value)


@pytest.fixture
def nats_server(request):
    """A started :class:`NatsServer`, stopped after the test."""
    with NatsServer() as server:
        _attach(request, "nats_server", server)
        yield server


@pytest.fixture
def nats_cluster(request):
    """A :class:`NatsCluster` of three with all routes up, stopped after the test."""
    with NatsCluster(3) as cluster:
        _attach(request, "nats_cluster", cluster)
        yield cluster

"""``dsmt-testbed``: a local dslice testbed — PsEPR router, agent and node farms as real daemons in one directory.

Everything lives in one directory ``DIR`` (created if missing) and every
daemon is a separate ``twistd`` process bound to 127.0.0.1 only::

    DIR/pki/                 ca.pem, service-agent.*, service-nodemanager.*, user-alice.* (EC P-256, dsmt-pki)
    DIR/psepr.pw             the PsEPR password every client gives (the router accepts any login)
    DIR/router.log           the router's log (each daemon: stdout, stderr and twistd log in one file)
    DIR/agent.log, agent.sqlite
    DIR/farm0.log, farm0/<node>/slivers/<slice>/…   farm 0's node managers (one state directory per node)
    DIR/farm0-nodes.txt      "node slots endpoint" per node, written by the farm once it listens
    DIR/home/slices/<slice>/ the svm slice directories (``svm --dir DIR/home``)
    DIR/testbed.json         pids, ports and URLs of the running daemons (read by ``dsmt-testbed down``)

Shell: start a testbed of 5 nodes, use it from another terminal, stop it::

    dsmt-testbed up /tmp/tb --nodes 5          # prints the svm flags to use; runs until Ctrl-C
    # in another terminal, with the flags printed (they name /tmp/tb/pki and /tmp/tb/home):
    printf '<slice><name>xyz1</name><numnodes>5</numnodes><leaselen>600</leaselen></slice>' > xyz1.xml
    svm --agent http://127.0.0.1:PORT/agent --cert /tmp/tb/pki/user-alice.pem \\
        --key /tmp/tb/pki/user-alice.key --ca /tmp/tb/pki/ca.pem --dir /tmp/tb/home createslice xyz1.xml
    dsmt-testbed down /tmp/tb                  # stops what a killed `up` left running

``up`` options: ``--nodes N`` (default 5), ``--farms F`` (node farms
splitting the nodes, default 1), ``--capacity C`` (slots per node, default
10), ``--no-router`` (HTTP only: no PsEPR router), ``--slice-manager`` (also
``twistd dsmt-slicemanager``, state in ``DIR/slicemanager/``).  Exit status: 0 stopped
cleanly; 1 a daemon did not start (its log's tail is printed); 2 usage error.

Python (tests, benchmarks)::

    from dsmt.client.testbed import Testbed
    with Testbed("/tmp/tb", nodes=5) as bed:             # start() ... stop()
        bed.write_spec("xyz1", numnodes=5, leaselen=600)  # DIR/xyz1.xml
        result = bed.svm("createslice", "xyz1.xml")       # a CompletedProcess (text)
        assert result.returncode == 0, result.stdout + result.stderr
        bed.svm("renewslice", "xyz1", transport="psepr")
        with bed.listen("/org/dsmt/ns/deployment/xyz1/", user="xyz1_mgr") as events:
            bed.svm("deleteslice", "xyz1")
            events.wait_for(lambda got: len(got) >= 5)     # parsed PsEPR events
        bed.kill_farm(0)                                  # SIGKILL by default
        bed.restart_farm(0)                               # same port, same state directory

Contracts and limits:

* **Ports.**  Each daemon gets a port the kernel reports free
  (:func:`free_port`); when another process takes it before the daemon binds,
  the daemon exits with "Address already in use" and is started again on a
  new port, at most :data:`PORT_ATTEMPTS` times.  A farm keeps its port for
  life (:meth:`Testbed.restart_farm` reuses it), because ``svm`` remembers
  node endpoints in ``slices/<s>/nodes``.  So parallel testbeds never collide.
* **Readiness** (:meth:`Testbed.start`): the router and the agent logged that
  they listen on their port and accept connections there; every farm wrote its nodes file; with a router, every node
  manager (and the agent) logged in to it; finally ``svm getads`` lists every
  node.  Each wait is bounded by :data:`STARTUP_TIMEOUT`; a daemon that exits
  or does not get ready raises :class:`TestbedError` naming the daemon, its
  exit status and the tail of its log (:data:`LOG_TAIL_CHARS`).
* **Stopping** (:meth:`Testbed.stop`, also on leaving the ``with`` block or
  after a failed start): SIGTERM to every daemon (farms, agent, router), then
  SIGKILL to any still running after :data:`STOP_TIMEOUT` seconds.  Children
  run in their own sessions, so a Ctrl-C in the terminal reaches only
  ``dsmt-testbed up``, which then stops them in that order.
* **Children's code**: every child runs with this process's environment, its
  ``PYTHONPATH`` made absolute (:func:`child_environment`), and the tools
  next to the running Python (``twistd``) or ``python -m dsmt.client.…`` — so a
  testbed started from a working tree runs that tree.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

__all__ = ["Testbed", "TestbedError", "Daemon", "Farm", "Listener", "child_environment", "free_port", "stop_process", "main",
           "STARTUP_TIMEOUT", "STOP_TIMEOUT", "PORT_ATTEMPTS", "COMMAND_TIMEOUT", "LOG_TAIL_CHARS", "USER"]

#: Seconds a daemon may take to become ready.  One starts in about a second on an idle 2-core machine;
#: thirty covers a machine busy with a parallel test run without hiding a daemon that hangs for good.
STARTUP_TIMEOUT = 30.0
#: Seconds a daemon has to exit after SIGTERM before it gets SIGKILL: a clean twistd stop (closing its
#: PsEPR connections and databases) takes about a second.
STOP_TIMEOUT = 10.0
#: Times a daemon is started on a fresh port when another process took the one chosen first.
PORT_ATTEMPTS = 5
#: Longest an ``svm`` or ``psepr`` command run by the testbed may take: svm's own per-node default
#: timeout is a minute, so two minutes lets it report instead of being cut short.
COMMAND_TIMEOUT = 120.0
#: Characters of a daemon's log quoted in an error: enough for a traceback, short enough to read.
LOG_TAIL_CHARS = 3000
#: Seconds between two looks at a condition being waited for.
POLL_INTERVAL = 0.05
#: The user whose certificate the testbed's ``svm`` runs sign with.
USER = "alice"
#: PsEPR password the daemons and clients give (the testbed's router accepts any login).
PSEPR_PASSWORD = "testbed"
STATE_FILE = "testbed.json"
#: What a daemon's log says when its port was taken between free_port() and its bind.
_PORT_TAKEN = "Address already in use"
#: What the PsEPR client logs once logged in (one line per connection).
_CONNECTED = "connected to psepr://"


class TestbedError(Exception):
    """The testbed could not do what it was asked; the message names the daemon and quotes its log."""

    __test__ = False  # not a pytest test class


# --------------------------------------------------------------------------------------------- helpers

def child_environment(**extra: str) -> dict[str, str]:
    """This process's environment with ``PYTHONPATH`` made absolute (children run in other directories)."""
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    env.update(extra)
    return env


def stop_process(process: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on right now (the kernel's choice, released at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _listening(daemon: "Daemon") -> bool:
    """Whether ``daemon`` itself listens on its port: Twisted logs "<factory> starting on <port>" once bound, and
    the port answers (a connection alone could be another process that took the port)."""
    return f" starting on {daemon.port}\n" in daemon.output() and _accepts(daemon.port)


def _twistd() -> list[str]:
    """``twistd`` next to the running Python (a virtualenv's), else the module through this Python."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; "
                                  "run()"]


def poll(condition: Callable[[], object], timeout: float, what: str, *, check: Callable[[], None] | None = None):
    """``condition()``'s first true value, looked at every POLL_INTERVAL; TestbedError after ``timeout``
    seconds naming ``what``.  ``check()`` runs before each look and may raise (a daemon died)."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TestbedError(f"{what}: not within {timeout:g} s")
        time.sleep(POLL_INTERVAL)


# --------------------------------------------------------------------------------------------- daemons

@dataclass
class Daemon:
    """One twistd process: ``name`` (router, agent, farm0…), its arguments after ``twistd -n``, its log."""

    name: str
    directory: Path
    arguments: Callable[[int], list[str]]   # the twistd arguments for a port
    port: int | None = None
    process: subprocess.Popen | None = None
    log_offset: int = 0                      # where this run's part of the (appended) log starts

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, port: int) -> None:
        self.port = port
        argv = _twistd() + ["-n", "--pidfile=", "--logfile=-"] + self.arguments(port)
        with open(self.log, "ab") as log:
            self.log_offset = log.tell()
            log.write(f"--- dsmt-testbed: starting {self.name}: {' '.join(argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(argv, cwd=self.directory, env=child_environment(), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        """This run's log text so far."""
        try:
            with open(self.log, "rb") as handle:
                handle.seek(self.log_offset)
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self) -> str:
        text = self.output()
        return text[-LOG_TAIL_CHARS:]

    def check_alive(self) -> None:
        """TestbedError naming the daemon, its exit status and its log's tail if it is not running."""
        if self.process is None:
            raise TestbedError(f"{self.name} was never started")
        status = self.process.poll()
        if status is not None:
            raise TestbedError(f"{self.name} exited with status {status}; the end of {self.log}:\n{self.tail()}")

    def signal(self, number: int) -> None:
        if self.running():
            self.process.send_signal(number)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit status (None if never started)."""
        if self.process is None:
            return None
        return stop_process(self.process, timeout)

    def wait_ready(self, ready: Callable[[], object], timeout: float, what: str):
        """``ready()``'s value once true; TestbedError if the daemon dies or ``timeout`` passes first."""
        try:
            return poll(ready, timeout, f"{self.name}: {what}", check=self.check_alive)
        except TestbedError as exc:
            if "not within" in str(exc):
                raise TestbedError(f"{exc}; the end of {self.log}:\n{self.tail()}") from None
            raise

    def port_taken(self) -> bool:
        return _PORT_TAKEN in self.output()


def _start_on_free_port(daemon: Daemon, ready: Callable[[], object], what: str, port: int | None = None,
                        timeout: float = STARTUP_TIMEOUT) -> None:
    """Start ``daemon`` on ``port`` (or a free one) and wait for ``ready``; on a port taken meanwhile, try a new
    free port (at most PORT_ATTEMPTS times; a fixed ``port`` is tried once)."""
    attempts = 1 if port is not None else PORT_ATTEMPTS
    for attempt in range(attempts):
        daemon.start(port if port is not None else free_port())
        try:
            daemon.wait_ready(ready, timeout, what)
            return
        except TestbedError:
            if daemon.running() or not daemon.port_taken() or attempt == attempts - 1:
                raise


@dataclass
class Farm:
    """A node farm: ``index``, its node names, state directory, nodes file and daemon."""

    index: int
    nodes: list[str]
    state_dir: Path
    nodes_file: Path
    daemon: Daemon

    @property
    def pid(self) -> int | None:
        return self.daemon.pid

    @property
    def port(self) -> int | None:
        return self.daemon.port

    def endpoint(self, node: str) -> str:
        return f"http://127.0.0.1:{self.daemon.port}/nodemanager/{node}"

    def sliver_dir(self, node: str, slice_name: str) -> Path:
        """Where ``node``'s directory sandbox keeps the sliver of ``slice_name`` (it may not exist)."""
        return self.state_dir / node / "slivers" / slice_name


# --------------------------------------------------------------------------------------------- listener

class Listener:
    """A ``psepr listen CHANNEL --user USER --format xml`` process writing one event per line to a file.

    Started by :meth:`Testbed.listen`, which returns once the router granted the lease (the listener says
    so on its standard error), so no event sent afterwards is missed.  :meth:`events` parses what arrived
    so far; :meth:`wait_for` polls with a bound; :meth:`stop` ends the process.  A context manager.
    """

    def __init__(self, testbed: "Testbed", channel: str, user: str, path: Path):
        self.channel, self.user, self.path = channel, user, path
        self.errors = path.with_suffix(".err")
        argv = [sys.executable, "-m", "dsmt.client.psepr_cli", "listen", channel, "--user", user, "--format", "xml",
                "--router", testbed.router_url, "--password-file", str(testbed.password_file),
                "--instance", f"testbed-listener-{os.getpid()}"]
        with open(path, "wb") as out, open(self.errors, "wb") as err:
            self.process = subprocess.Popen(argv, cwd=testbed.directory, env=child_environment(),
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        try:
            poll(lambda: b"psepr: listening on" in self.errors.read_bytes(), STARTUP_TIMEOUT,
                 f"psepr listen {channel} as {user}", check=self._check_alive)
        except BaseException:
            self.stop()
            raise

    def _check_alive(self) -> None:
        status = self.process.poll()
        if status is not None:
            raise TestbedError(f"psepr listen {self.channel} exited with status {status}: "
                               f"{self.errors.read_text(errors='replace')[-LOG_TAIL_CHARS:]}")

    def events(self) -> list:
        """The events received so far (``dsmt.transports.psepr.event.Event``), in arrival order."""
        from dsmt.transports.psepr.event import parse_event
        lines = self.path.read_bytes().split(b"\n")
        return [parse_event(line) for line in lines[:-1] if line.strip()]  # the last may be half written

    def wait_for(self, condition: Callable[[list], object], timeout: float = STARTUP_TIMEOUT):
        """The events once ``condition(events)`` is true; TestbedError after ``timeout`` (with what arrived)."""
        try:
            return poll(lambda: condition(self.events()) and self.events(), timeout,
                        f"events on {self.channel} for {self.user}", check=self._check_alive)
        except TestbedError as exc:
            got = [getattr(e.payload, "value", "?") for e in self.events()]
            raise TestbedError(f"{exc}; received {len(got)}: {got[-20:]}") from None

    def stop(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------- testbed

class Testbed:
    """Router, agent and ``farms`` node farms hosting ``nodes`` node managers, as processes in ``directory``.

    ``transport_router``: start a PsEPR router and connect every daemon to it (``svm --transport psepr``
    and :meth:`listen` need it).  ``capacity``: slots per node.  ``ticket_validity``: the agent's
    ``--ticket-validity`` (None: its default).  ``node_pattern``: the farms' ``--name`` pattern, with
    ``{n}`` (counting from 1 across farms) and ``{farm}`` (the farm's index).  ``node_names``: instead,
    one farm process per name, hosting that one node (real machines have one node manager each).
    ``engines``: node managers start the deployment engine in every new sliver (``--engine``);
    ``engine_http``: the engines also serve SOAP/HTTP (:meth:`engine_url`); ``engine_args``: more
    engine options of the node managers (e.g. ``["--engine-watch", "0.2"]``, ``["--engine-exec"]``).
    ``slice_manager``: also start ``twistd dsmt-slicemanager`` (its certificate ``service-slicemanager``,
    its slice directory ``DIR/slicemanager/``, the svm commands as a SOAP service at
    :attr:`slice_manager_url`), reaching the agent and nodes over HTTP.
    """

    __test__ = False

    def __init__(self, directory, *, nodes: int = 5, farms: int = 1, transport_router: bool = True,
                 capacity: int = 10, slice_manager: bool = False, ticket_validity: int | None = None,
                 node_pattern: str = "n{n:03d}.farm{farm}.test", node_names: Sequence[str] | None = None,
                 engines: bool = False, engine_http: bool = False, engine_args: Sequence[str] = ()):
        from dsmt.server.nodemanager.daemon import MAX_FARM_NODES
        if node_names is not None:     # one farm (process) per named node, as on real machines
            nodes = farms = len(node_names)
            if not nodes or len(set(node_names)) != nodes or any("{" in n or "}" in n for n in node_names):
                raise ValueError("node_names must be distinct names without braces")
        if engines and not transport_router:
            raise ValueError("engines report over PsEPR: they need the router")
        if engine_args and not engines:
            raise ValueError("engine_args without engines")
        if not 1 <= farms <= nodes:
            raise ValueError(f"farms must be 1..nodes ({nodes}), not {farms}")
        if nodes > farms * MAX_FARM_NODES:
            raise ValueError(f"{nodes} nodes need more than {farms} farm(s) of at most {MAX_FARM_NODES}")
        if not 0 <= capacity <= 10_000:
            raise ValueError(f"capacity must be 0..10000 slots, not {capacity}")
        self.directory = Path(directory).absolute()
        self.node_count, self.farm_count, self.capacity = nodes, farms, capacity
        self.transport_router, self.with_slice_manager = transport_router, slice_manager
        self.ticket_validity = ticket_validity
        self.engines = engines
        self.engine_http = engine_http
        self.engine_args = [str(arg) for arg in engine_args]
        self.pki = self.directory / "pki"
        self.home = self.directory / "home"
        self.password_file = self.directory / "psepr.pw"
        self.router: Daemon | None = None
        self.agent: Daemon | None = None
        self.slice_manager: Daemon | None = None
        self.farms: list[Farm] = []
        self._listeners: list[Listener] = []
        self._extra: dict[str, Daemon] = {}     # more agents (add_agent)
        first = 1
        for index in range(farms):
            if node_names is not None:
                self.farms.append(self._farm(index, [node_names[index]], 1, node_names[index]))
                continue
            count = nodes // farms + (1 if index < nodes % farms else 0)
            names = [node_pattern.format(n=n, farm=index) for n in range(first, first + count)]
            self.farms.append(self._farm(index, names, first, node_pattern))
            first += count

    # -- paths and URLs --------------------------------------------------------------------------------

    @property
    def ca(self) -> Path:
        return self.pki / "ca.pem"

    @property
    def user_cert(self) -> Path:
        return self.pki / f"user-{USER}.pem"

    @property
    def user_key(self) -> Path:
        return self.pki / f"user-{USER}.key"

    @property
    def router_url(self) -> str | None:
        return None if self.router is None else f"psepr://127.0.0.1:{self.router.port}"

    @property
    def agent_url(self) -> str:
        return f"http://127.0.0.1:{self.agent.port}/agent"

    @property
    def slice_manager_url(self) -> str | None:
        return None if self.slice_manager is None else f"http://127.0.0.1:{self.slice_manager.port}/slicemanager"

    @property
    def nodes(self) -> list[str]:
        """Every node's name, farm by farm."""
        return [node for farm in self.farms for node in farm.nodes]

    @property
    def pids(self) -> dict[str, int | None]:
        daemons = (([self.router] if self.router else []) + [self.agent] + [farm.daemon for farm in self.farms]
                   + ([self.slice_manager] if self.slice_manager else []) + list(self._extra.values()))
        return {daemon.name: daemon.pid for daemon in daemons if daemon is not None}

    def farm_of(self, node: str) -> Farm:
        for farm in self.farms:
            if node in farm.nodes:
                return farm
        raise KeyError(f"no farm hosts {node}")

    def sliver_dir(self, node: str, slice_name: str) -> Path:
        return self.farm_of(node).sliver_dir(node, slice_name)

    def engine_url(self, node: str, slice_name: str) -> str | None:
        """The HTTP URL of the engine in ``node``'s sliver of ``slice_name`` (``engine_http``), once it listens."""
        path = self.sliver_dir(node, slice_name) / "home" / ".dsmt" / "engine.sqlite.url"
        try:
            return path.read_text().strip() or None
        except OSError:
            return None

    def slice_dir(self, slice_name: str) -> Path:
        """``svm``'s directory for ``slice_name`` (``home/slices/<slice>``)."""
        return self.home / "slices" / slice_name

    # -- starting ----------------------------------------------------------------------------------------

    def _pki(self) -> None:
        """The CA and the certificates missing in ``DIR/pki`` (a restarted testbed keeps its PKI)."""
        services = ["agent", "nodemanager"] + (["slicemanager"] if self.with_slice_manager else [])
        wanted = [("ca.pem", ["ca", "--name", "dsmt testbed CA"])]
        wanted += [(f"service-{name}.pem", ["issue", "--service", name]) for name in services]
        wanted += [(f"user-{USER}.pem", ["issue", "--user", USER])]
        for path, command in wanted:
            if (self.pki / path).exists():
                continue
            command = command + ["--key", "ec", str(self.pki)]
            result = subprocess.run([sys.executable, "-m", "dsmt.client.dsmt_pki"] + command, cwd=self.directory,
                                    env=child_environment(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
            if result.returncode != 0:
                raise TestbedError(f"dsmt-pki {' '.join(command)} failed ({result.returncode}): "
                                   f"{(result.stdout + result.stderr)[-LOG_TAIL_CHARS:]}")

    def _psepr_arguments(self) -> list[str]:
        if self.router is None:
            return []
        return ["--router", self.router_url, "--password-file", str(self.password_file)]

    def _farm(self, index: int, names: list[str], first: int, pattern: str) -> Farm:
        name = f"farm{index}"
        state_dir = self.directory / name
        nodes_file = self.directory / f"{name}-nodes.txt"

        def arguments(port: int) -> list[str]:
            return (["dsmt-nodefarm", "--nodes", str(len(names)), "--name", pattern.replace("{farm}", str(index)),
                     "--first", str(first), "--capacity", str(self.capacity), "--state-dir", str(state_dir),
                     "--ticket-ca", str(self.ca), "--ca", str(self.ca),
                     "--cert", str(self.pki / "service-nodemanager.pem"),
                     "--key", str(self.pki / "service-nodemanager.key"),
                     "--http", f"tcp:{port}:interface=127.0.0.1", "--agent", self.agent_url,
                     "--nodes-file", str(nodes_file)] + self._psepr_arguments()
                    + (["--engine"] if self.engines else []) + (["--engine-http"] if self.engine_http else [])
                    + self.engine_args)
        return Farm(index, names, state_dir, nodes_file, Daemon(name, self.directory, arguments))

    def start(self) -> "Testbed":
        """Create the PKI, start every daemon and wait until every node is registered (module docstring)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        self.password_file.write_text(PSEPR_PASSWORD + "\n")
        os.chmod(self.password_file, 0o600)
        try:
            self._pki()
            if self.transport_router:
                self.router = Daemon("router", self.directory, lambda port: [
                    "psepr-router", "--allow-anonymous", "--listen", f"tcp:{port}:interface=127.0.0.1",
                    "--name", "testbed-router", "--stats-interval", "0"])
                _start_on_free_port(self.router, lambda: _listening(self.router), "listening")
            self.agent = Daemon("agent", self.directory, self._agent_arguments)
            _start_on_free_port(self.agent, lambda: _listening(self.agent), "listening")
            if self.router is not None:
                self._wait_connected(self.agent, 1)
            for farm in self.farms:
                self._start_farm(farm)
            self.wait_registered()
            if self.with_slice_manager:
                self.slice_manager = Daemon("slicemanager", self.directory, self._slice_manager_arguments)
                _start_on_free_port(self.slice_manager, lambda: _listening(self.slice_manager), "listening")
            self._write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def _agent_arguments(self, port: int) -> list[str]:
        arguments = ["dsmt-agent", "--key", str(self.pki / "service-agent.key"),
                     "--cert", str(self.pki / "service-agent.pem"), "--ca", str(self.ca),
                     "--http", f"tcp:{port}:interface=127.0.0.1", "--db", str(self.directory / "agent.sqlite")]
        if self.ticket_validity is not None:
            arguments += ["--ticket-validity", str(self.ticket_validity)]
        return arguments + self._psepr_arguments()

    def _slice_manager_arguments(self, port: int) -> list[str]:
        return (["dsmt-slicemanager", "--ca", str(self.ca), "--service-ca", str(self.ca),
                 "--cert", str(self.pki / "service-slicemanager.pem"),
                 "--key", str(self.pki / "service-slicemanager.key"),
                 "--http", f"tcp:{port}:interface=127.0.0.1", "--agent", self.agent_url,
                 "--slices-dir", str(self.directory / "slicemanager")] + self._psepr_arguments())

    def _wait_connected(self, daemon: Daemon, count: int) -> None:
        """Wait until ``daemon`` logged ``count`` PsEPR logins in this run (its endpoints then lease at once)."""
        daemon.wait_ready(lambda: daemon.output().count(_CONNECTED) >= count, STARTUP_TIMEOUT,
                          f"{count} PsEPR login(s) to {self.router_url}")

    def _start_farm(self, farm: Farm, port: int | None = None) -> None:
        with contextlib.suppress(FileNotFoundError):
            farm.nodes_file.unlink()
        _start_on_free_port(farm.daemon, farm.nodes_file.exists, f"writing {farm.nodes_file.name}", port)
        if self.router is not None:
            self._wait_connected(farm.daemon, len(farm.nodes))

    def getads(self) -> list[str]:
        """The nodes the agent advertises (``svm getads``); TestbedError if svm fails."""
        result = self.svm("getads")
        if result.returncode != 0:
            raise TestbedError(f"svm getads failed ({result.returncode}): {result.stderr[-LOG_TAIL_CHARS:]}")
        return result.stdout.split()

    def wait_registered(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Wait until ``svm getads`` lists every node (farms register once they listen)."""
        wanted = set(self.nodes)

        def check():
            for daemon in [self.agent] + [farm.daemon for farm in self.farms]:
                daemon.check_alive()
        try:
            poll(lambda: wanted <= set(self.getads()), timeout, "every node registered with the agent", check=check)
        except TestbedError as exc:
            if "not within" not in str(exc):
                raise
            missing = sorted(wanted - set(self.getads()))
            raise TestbedError(f"{exc}; missing {missing[:10]}; the end of {self.farms[0].daemon.log}:\n"
                               f"{self.farms[0].daemon.tail()}") from None

    def _write_state(self) -> None:
        state = {"directory": str(self.directory), "pids": self.pids, "router": self.router_url,
                 "agent": self.agent_url, "slicemanager": self.slice_manager_url, "nodes": self.nodes,
                 "farms": [{"index": f.index, "port": f.port, "nodes": f.nodes} for f in self.farms],
                 "svm": self.svm_flags("http"), "svm-psepr": self.svm_flags("psepr") if self.router else None}
        temporary = self.directory / (STATE_FILE + ".tmp")
        temporary.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(temporary, self.directory / STATE_FILE)

    # -- farms -------------------------------------------------------------------------------------------

    def kill_farm(self, index: int, number: int = signal.SIGKILL) -> int | None:
        """Send signal ``number`` to farm ``index`` and wait for it to exit; its exit status."""
        daemon = self.farms[index].daemon
        daemon.signal(number)
        try:
            return daemon.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise TestbedError(f"{daemon.name} still runs {STOP_TIMEOUT:g} s after signal {number}") from None

    def restart_farm(self, index: int) -> None:
        """Start farm ``index`` again (stopping it first if it runs) on the same port and state directory, and
        wait until it listens (and, with a router, its node managers logged in)."""
        farm = self.farms[index]
        farm.daemon.stop()
        self._start_farm(farm, port=farm.port)
        self.wait_registered()
        self._write_state()

    # -- more agents -------------------------------------------------------------------------------------

    def add_pldb(self, user: str, watch: str = "/org/dsmt/ns/deployment/") -> Daemon:
        """Start PLDB (``twistd pldb``) logged in as ``user`` — a slice's events reach ``<slice>_mgr`` leases
        only, so a slice's PLDB is that account's — recording ``watch``; returns once it is logged in.
        Stopped with the testbed."""
        if self.router is None:
            raise TestbedError("PLDB records PsEPR events: this testbed has no router")
        name = f"pldb-{user}"
        daemon = Daemon(name, self.directory, lambda port: [
            "pldb", "--router", self.router_url, "--service", user, "--instance", "pldb",
            "--password-file", str(self.password_file), "--db", str(self.directory / f"{name}.sqlite"),
            "--watch", watch])
        self._extra[name] = daemon
        daemon.start(0)
        self._wait_connected(daemon, 1)
        self._write_state()
        return daemon

    def slice_manager_client(self):
        """A zeep client of the slice manager daemon, signing as the user and verifying signed replies."""
        import zeep

        from dsmt.server.contracts import wsdl_path
        from dsmt.transports.soap.pki import Purpose, TrustStore
        from dsmt.transports.soap.wssec import Signer, SigningTransport, Verifier
        from dsmt.transports.soap.zeepsupport import client_settings
        if self.slice_manager is None:
            raise TestbedError("this testbed has no slice manager (slice_manager=False)")
        transport = SigningTransport(zeep.Transport(timeout=COMMAND_TIMEOUT),
                                     Signer.from_files(str(self.user_key), str(self.user_cert)),
                                     Verifier(TrustStore.from_files(str(self.ca)), purpose=Purpose.SERVER))
        client = zeep.Client(wsdl_path("slicemanager"), transport=transport, settings=client_settings())
        binding = next(b for b in client.wsdl.bindings.values() if not b.name.localname.endswith("_psepr"))
        return client.create_service(binding.name, self.slice_manager_url)

    def create_slice_via_slice_manager(self, slice_name: str, nodes: Sequence[str], leaselen: int = 3600) -> list[str]:
        """``CreateSlice`` on the slice manager for ``nodes`` (in that order); the per-node lines, or TestbedError."""
        spec = (f"<slice><name>{slice_name}</name><numnodes>{len(nodes)}</numnodes><leaselen>{leaselen}</leaselen>"
                f"<ips>{' '.join(nodes)}</ips></slice>")
        report = self.slice_manager_client().CreateSlice(spec)
        lines = [result.line for result in report.result or ()]
        if not report.ok:
            raise TestbedError(f"CreateSlice {slice_name}: {report.summary}: {'; '.join(lines)}")
        return lines

    def add_repository(self, root) -> str:
        """Start a package repository (``twistd dsmt-repository``) serving ``root``; its base URL (``…/``).
        Stopped with the testbed."""
        daemon = Daemon("repository", self.directory, lambda port: [
            "dsmt-repository", "--root", str(Path(root).absolute()), "--listen", f"tcp:{port}:interface=127.0.0.1"])
        self._extra["repository"] = daemon
        _start_on_free_port(daemon, lambda: _accepts(daemon.port), "accepting connections")
        self._write_state()
        return f"http://127.0.0.1:{daemon.port}/"

    def add_agent(self, name: str) -> str:
        """Start another agent, ``name``, selling the same nodes (``--nodes`` from the farms' nodes files, its own
        database ``DIR/<name>.sqlite``, the agent's certificate), HTTP only; its URL.  PDN-02-005 lets several
        agents sell one node: the node manager's admission control is what keeps a node from being overbooked.
        Stopped with the testbed."""
        if name in self.pids or name in self._extra:
            raise ValueError(f"a daemon named {name!r} exists already")
        nodes_file = self.directory / f"{name}-nodes.txt"
        nodes_file.write_text("".join(farm.nodes_file.read_text() for farm in self.farms))
        daemon = Daemon(name, self.directory, lambda port: [
            "dsmt-agent", "--key", str(self.pki / "service-agent.key"), "--cert", str(self.pki / "service-agent.pem"),
            "--ca", str(self.ca), "--http", f"tcp:{port}:interface=127.0.0.1", "--nodes", str(nodes_file),
            "--db", str(self.directory / f"{name}.sqlite")])
        self._extra[name] = daemon
        _start_on_free_port(daemon, lambda: _listening(daemon), "listening")
        self._write_state()
        return f"http://127.0.0.1:{daemon.port}/agent"

    # -- clients -----------------------------------------------------------------------------------------

    def svm_flags(self, transport: str = "http") -> list[str]:
        """The ``svm`` options (before the command) that reach this testbed as the user ``alice``."""
        flags = ["--agent", self.agent_url, "--cert", str(self.user_cert), "--key", str(self.user_key),
                 "--ca", str(self.ca), "--dir", str(self.home)]
        if transport == "psepr":
            if self.router is None:
                raise TestbedError("this testbed has no PsEPR router (transport_router=False)")
            flags += ["--transport", "psepr", "--router", self.router_url, "--password-file", str(self.password_file)]
        elif transport != "http":
            raise ValueError(f"transport must be 'http' or 'psepr', not {transport!r}")
        return flags

    def svm(self, *args: str, transport: str = "http", timeout: float = COMMAND_TIMEOUT,
            cwd=None) -> subprocess.CompletedProcess:
        """Run ``svm [flags] *args`` (options such as ``-p 1`` may lead ``args``) in ``cwd`` (default the
        testbed's directory); the CompletedProcess with text stdout and stderr."""
        return subprocess.run(self.svm_command(*args, transport=transport), cwd=cwd or self.directory,
                              env=self.environment(), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def svm_command(self, *args, transport: str = "http") -> list[str]:
        """The argv :meth:`svm` runs (for a caller that needs the process itself, e.g. to kill it midway)."""
        return [sys.executable, "-m", "dsmt.client.svm"] + self.svm_flags(transport) + [str(a) for a in args]

    @staticmethod
    def environment() -> dict[str, str]:
        """The environment the testbed's children run with (:func:`child_environment`)."""
        return child_environment()

    def listen(self, channel: str, user: str) -> Listener:
        """A started :class:`Listener` on ``channel`` logged in as ``user`` (events addressed to a service
        reach leases held by that service: listen as ``<slice>_mgr`` for a slice's status events)."""
        if self.router is None:
            raise TestbedError("this testbed has no PsEPR router (transport_router=False)")
        path = self.directory / f"listen-{len(self._listeners)}.xml"
        listener = Listener(self, channel, user, path)
        self._listeners.append(listener)
        return listener

    def write_spec(self, name: str, *, numnodes: int, leaselen: int, ips: Sequence[str] = ()) -> Path:
        """``DIR/<name>.xml``: a slice XML of the dslice HOWTO's form."""
        extra = f"<ips>{' '.join(ips)}</ips>" if ips else ""
        path = self.directory / f"{name}.xml"
        path.write_text(f'<?xml version="1.0" ?>\n<slice><name>{name}</name><numnodes>{numnodes}</numnodes>'
                        f"<leaselen>{leaselen}</leaselen>{extra}</slice>\n")
        return path

    # -- stopping ----------------------------------------------------------------------------------------

    def stop(self) -> dict[str, int | None]:
        """Stop listeners, farms, agent and router (SIGTERM, SIGKILL after STOP_TIMEOUT); exit statuses."""
        for listener in self._listeners:
            listener.stop()
        daemons = ([self.slice_manager] + [farm.daemon for farm in self.farms] + list(self._extra.values())
                   + [self.agent, self.router])
        for daemon in daemons:
            if daemon is not None:
                daemon.signal(signal.SIGTERM)
        statuses = {daemon.name: daemon.stop() for daemon in daemons if daemon is not None}
        self._stop_slivers()
        return statuses

    def _stop_slivers(self) -> None:
        """Kill what runs in the slivers (engines, applications): a node manager leaves its slivers running when
        it stops — on a real machine they outlive it — but a testbed's machine goes away with it."""
        from dsmt.server.nodemanager.sliver import DirectorySandbox, SliverError
        for farm in self.farms:
            for node in farm.nodes:
                root = farm.state_dir / node / "slivers"
                if not root.is_dir():
                    continue
                sandbox = DirectorySandbox(str(root))
                for slice_name in sandbox.list():
                    with contextlib.suppress(SliverError, OSError):
                        sandbox.stop(slice_name)

    def __enter__(self) -> "Testbed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------- down

def _ours(pid: int, directory: Path) -> bool:
    """Whether ``pid`` still runs with ``directory`` as its working directory (the testbed started it)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == directory
    except OSError:
        return False


def down(directory, timeout: float = STOP_TIMEOUT) -> list[str]:
    """Stop the daemons ``DIR/testbed.json`` records that still run in ``directory``; the names stopped."""
    directory = Path(directory).absolute()
    with open(directory / STATE_FILE, encoding="utf-8") as handle:
        pids = json.load(handle)["pids"]
    alive = {name: pid for name, pid in pids.items() if isinstance(pid, int) and _ours(pid, directory)}
    for pid in alive.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_ours(pid, directory) for pid in alive.values()) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
    for pid in alive.values():
        if _ours(pid, directory):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return sorted(alive)


# --------------------------------------------------------------------------------------------- CLI

def _shell_words(words: Iterable[str]) -> str:
    import shlex
    return " ".join(shlex.quote(word) for word in words)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsmt-testbed", description="A local dslice testbed: router, agent "
                                     "and node farms as daemons in one directory.",
                                     epilog="exit status: 0 ok; 1 a daemon failed; 2 usage error")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a testbed in DIR and run until Ctrl-C")
    up.add_argument("directory", metavar="DIR")
    up.add_argument("--nodes", type=int, default=5, help="node managers (default 5)")
    up.add_argument("--farms", type=int, default=1, help="node farms sharing them (default 1)")
    up.add_argument("--capacity", type=int, default=10, help="slots per node (default 10)")
    up.add_argument("--no-router", action="store_true", help="no PsEPR router: HTTP only")
    up.add_argument("--slice-manager", action="store_true", help="also start the slice manager daemon")
    stop = sub.add_parser("down", help="stop the daemons a testbed in DIR left running")
    stop.add_argument("directory", metavar="DIR")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "down":
        try:
            stopped = down(args.directory)
        except (OSError, ValueError, KeyError) as exc:
            print(f"dsmt-testbed: no testbed state in {args.directory}: {exc}", file=sys.stderr)
            return 1
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    try:
        bed = Testbed(args.directory, nodes=args.nodes, farms=args.farms, capacity=args.capacity,
                      transport_router=not args.no_router, slice_manager=args.slice_manager)
    except ValueError as exc:
        print(f"dsmt-testbed: {exc}", file=sys.stderr)
        return 2
    stopping = []

    def interrupted(number, frame):
        stopping.append(number)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)
    try:
        bed.start()
        print(f"testbed in {bed.directory}: {len(bed.nodes)} nodes ({bed.nodes[0]} … {bed.nodes[-1]})")
        print(f"  svm {_shell_words(bed.svm_flags('http'))} getads")
        if bed.router is not None:
            print(f"  svm {_shell_words(bed.svm_flags('psepr'))} getads")
            print(f"  psepr listen /org/dsmt/ns/deployment/SLICE/ --user SLICE_mgr --router {bed.router_url} "
                  f"--password-file {bed.password_file}")
        if bed.slice_manager is not None:
            print(f"  slice manager: {bed.slice_manager_url}  (WSDL: wsdl/slicemanager.wsdl)")
        print("Ctrl-C stops it.", flush=True)
        while True:
            for daemon in [bed.router, bed.agent, bed.slice_manager] + [farm.daemon for farm in bed.farms]:
                if daemon is not None:
                    daemon.check_alive()
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping", flush=True)
        return 0
    except TestbedError as exc:
        print(f"dsmt-testbed: {exc}", file=sys.stderr)
        return 1
    finally:
        bed.stop()


if __name__ == "__main__":
    sys.exit(main())

"""The sliver bootstrap: the engine's files in a new sliver, its command line, once only, failures published."""
from __future__ import annotations

import os
import stat

from dsmt.server.nodemanager.bootstrap import (
    ENGINE_DIR, MAX_RESTARTS, RESTART_WINDOW_SECONDS, EngineBootstrap, EngineSettings,
)
from dsmt.server.nodemanager.sliver import DirectorySandbox, SliverError, SpawnerUnavailable


class Recording(DirectorySandbox):
    """The real sandbox, with process starts recorded instead of run (the engine needs a router)."""

    def __init__(self, root, fail=None):
        super().__init__(root)
        self.started, self.spawners, self.fail = [], [], fail

    def start(self, slice_name, argv, env=None, *, spawner=None):
        if self.fail:
            raise SliverError("backend", self.fail)
        if spawner is not None:
            spawner.spawn(argv, env, "", -1, "")              # raises SpawnerUnavailable when it is
        self.spawners.append(spawner)
        self.started.append((slice_name, list(argv), dict(env or {})))
        return os.getpid()          # a living process with a start time: "the engine runs"


def make(tmp_path, **options):
    backend = Recording(str(tmp_path / "slivers"), **options)
    backend.recover()
    backend.create("xyz1", None)
    events = []
    settings = EngineSettings(router="psepr://127.0.0.1:23345", password="s3cret", ca=None, extra=("--x", "y"))
    return backend, EngineBootstrap(backend, "n1.test", settings, events.append), events


def test_the_engine_gets_its_files_and_command_line(tmp_path):
    backend, bootstrap, events = make(tmp_path)
    assert bootstrap.start("xyz1") == os.getpid()
    home = backend.home("xyz1")
    engine = os.path.join(home, ENGINE_DIR)
    assert stat.S_IMODE(os.stat(engine).st_mode) == 0o700
    password = os.path.join(engine, "psepr.pw")
    assert stat.S_IMODE(os.stat(password).st_mode) == 0o600 and open(password).read() == "s3cret\n"
    ((name, argv, _),) = backend.started
    assert name == "xyz1" and argv[0].endswith("twistd")
    assert argv[1:4] == ["-n", "--pidfile=", "dsmt-engine"]
    flags = dict(zip(argv[4::2], argv[5::2]))
    assert flags["--slice"] == "xyz1" and flags["--host"] == "n1.test" and flags["--home"] == home
    assert flags["--router"] == "psepr://127.0.0.1:23345" and flags["--password-file"] == password
    assert "--allow-unsigned" in argv and argv[-2:] == ["--x", "y"]
    assert events == []                       # the engine reports its own installation


def test_a_repeated_create_starts_no_second_engine(tmp_path):
    backend, bootstrap, _ = make(tmp_path)
    bootstrap.start("xyz1")
    assert bootstrap.start("xyz1") is None
    assert len(backend.started) == 1


def test_a_failed_start_is_published_not_raised(tmp_path):
    backend, bootstrap, events = make(tmp_path, fail="cannot start 'twistd': No such file or directory")
    assert bootstrap.start("xyz1") is None
    (event,) = events
    assert event.channel == "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-bootstrap/status/"
    assert event.payload.value == ("hostname=n1.test,component=org.dsmt.component.sliver-bootstrap,"
                                   "managed=org.dsmt.component.deployment-agent,slice=xyz1,status=failed")
    assert bootstrap.start("nosuchslice") is None and len(events) == 2


def test_a_signing_engine_gets_the_ca(tmp_path):
    backend = Recording(str(tmp_path / "slivers"))
    backend.recover()
    backend.create("xyz1", None)
    EngineBootstrap(backend, "n1.test", EngineSettings(router="psepr://r:1", ca="/etc/dsmt/ca.pem"),
                    lambda event: None).start("xyz1")
    argv = backend.started[0][1]
    assert argv[argv.index("--ca") + 1] == "/etc/dsmt/ca.pem" and "--allow-unsigned" not in argv


def test_ensure_restarts_only_a_dead_engine(tmp_path):
    backend, bootstrap, _ = make(tmp_path)
    assert bootstrap.ensure("xyz1") is None            # never bootstrapped: nothing to bring back
    bootstrap.start("xyz1")
    assert bootstrap.ensure("xyz1") is None and len(backend.started) == 1      # it runs
    pid_file = os.path.join(backend.home("xyz1"), ENGINE_DIR, "engine.pid")
    with open(pid_file, "w") as handle:
        handle.write(f"{os.getpid()} 1\n")               # the recorded process is gone (its number reused)
    assert bootstrap.ensure("xyz1") == os.getpid() and len(backend.started) == 2
    assert open(os.path.join(backend.home("xyz1"), ENGINE_DIR, "psepr.pw")).read() == "s3cret\n"


def test_engines_with_http_listen_on_loopback_only(tmp_path):
    backend = Recording(str(tmp_path / "slivers"))
    backend.recover()
    backend.create("xyz1", None)
    EngineBootstrap(backend, "n1.test", EngineSettings(router="psepr://r:1", http=True), lambda event: None).start("xyz1")
    argv = backend.started[0][1]
    assert argv[argv.index("--http") + 1] == "tcp:0:interface=127.0.0.1"


def kill_recorded_engine(backend, slice_name="xyz1"):
    """Make the recorded engine a dead one (its number now belongs to another process)."""
    with open(os.path.join(backend.home(slice_name), ENGINE_DIR, "engine.pid"), "w") as handle:
        handle.write(f"{os.getpid()} 1\n")


FAILED = ("hostname=n1.test,component=org.dsmt.component.sliver-bootstrap,"
          "managed=org.dsmt.component.deployment-agent,slice=xyz1,status=failed")


def test_watch_restarts_a_dead_engine_and_says_it_failed(tmp_path):
    backend, bootstrap, events = make(tmp_path)
    backend.create("idle", None)                       # never bootstrapped: not watched
    bootstrap.start("xyz1")
    assert bootstrap.watch(["xyz1", "idle", "gone"]) == [] and events == []       # alive: left alone
    kill_recorded_engine(backend)
    assert bootstrap.watch(["xyz1", "idle", "gone"]) == ["xyz1"]
    assert [event.payload.value for event in events] == [FAILED] and len(backend.started) == 2


def test_an_engine_that_keeps_dying_is_left_failed_until_the_window_passes(tmp_path):
    now = [1000.0]
    backend = Recording(str(tmp_path / "slivers"))
    backend.recover()
    backend.create("xyz1", None)
    events = []
    bootstrap = EngineBootstrap(backend, "n1.test", EngineSettings(router="psepr://r:1"), events.append,
                                clock=lambda: now[0])
    bootstrap.start("xyz1")
    for _ in range(MAX_RESTARTS):
        kill_recorded_engine(backend)
        assert bootstrap.watch(["xyz1"]) == ["xyz1"]
        now[0] += 1
    kill_recorded_engine(backend)
    assert bootstrap.watch(["xyz1"]) == [] and bootstrap.watch(["xyz1"]) == []
    assert len(backend.started) == 1 + MAX_RESTARTS and len(events) == MAX_RESTARTS
    now[0] += RESTART_WINDOW_SECONDS                    # the first restarts left the window
    assert bootstrap.watch(["xyz1"]) == ["xyz1"] and len(backend.started) == 2 + MAX_RESTARTS


def test_a_failing_restart_is_published_once(tmp_path):
    backend, bootstrap, events = make(tmp_path)
    bootstrap.start("xyz1")
    kill_recorded_engine(backend)
    backend.fail = "cannot start 'twistd': No such file or directory"
    assert bootstrap.watch(["xyz1"]) == [] and [event.payload.value for event in events] == [FAILED]


class Unavailable:
    def spawn(self, *args):
        raise SpawnerUnavailable("the fork server failed: gone")


class Available:
    def spawn(self, *args):
        return None


def test_engines_use_the_spawner_and_are_execd_when_it_is_unavailable(tmp_path):
    backend = Recording(str(tmp_path / "slivers"))
    backend.recover()
    for name in ("a", "b"):
        backend.create(name, None)
    available, unavailable = Available(), Unavailable()
    settings = EngineSettings(router="psepr://r:1")
    assert EngineBootstrap(backend, "n1.test", settings, print, spawner=available).start("a") == os.getpid()
    assert EngineBootstrap(backend, "n1.test", settings, print, spawner=unavailable).start("b") == os.getpid()
    assert backend.spawners == [available, None] and [name for name, _, _ in backend.started] == ["a", "b"]

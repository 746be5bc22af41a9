"""The engine fork server: its wire codec (pure), and the real fork server process starting real twistd."""
from __future__ import annotations

import json
import os
import resource
import signal
import struct
import sys
import time

import pytest

from dsmt.server.nodemanager.forkserver import (
    MAX_MESSAGE_BYTES, ForkServer, MessageReader, ProtocolError, check_request, encode_message,
)
from dsmt.server.nodemanager.sliver import DirectorySandbox, SliverError, SpawnerUnavailable, process_alive

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


# ------------------------------------------------------------------ codec

def test_messages_round_trip_whole_and_byte_by_byte():
    messages = [{"ready": True}, {"argv": ["twistd", "-n"], "env": {"A": "é"}}, {"pid": 42, "started": "7"}]
    wire = b"".join(encode_message(message) for message in messages)
    whole = MessageReader()
    whole.feed(wire)
    assert [whole.next() for _ in messages] == messages and whole.next() is None
    trickle, seen = MessageReader(), []
    for index in range(len(wire)):
        trickle.feed(wire[index:index + 1])
        message = trickle.next()
        if message is not None:
            seen.append(message)
    assert seen == messages


def test_an_oversized_message_is_refused_before_its_body_arrives():
    reader = MessageReader()
    with pytest.raises(ProtocolError, match="announced"):
        reader.feed(struct.pack(">I", MAX_MESSAGE_BYTES + 1))
    with pytest.raises(ProtocolError, match="at most"):
        encode_message({"env": {"X": "y" * MAX_MESSAGE_BYTES}})


@pytest.mark.parametrize("body, reason", [
    (b"\xff\xfe", "not UTF-8 JSON"), (b"{not json", "not UTF-8 JSON"), (b"[1, 2]", "not a JSON object"),
    (b'"text"', "not a JSON object"),
])
def test_malformed_bodies_are_protocol_errors(body, reason):
    reader = MessageReader()
    reader.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError, match=reason):
        reader.next()


def request(**changes):
    message = {"argv": [TWISTD, "--version"], "env": {"PATH": "/bin"}, "cwd": "/", "limits": "7:64:64"}
    message.update(changes)
    return message


def test_a_good_request_is_checked_into_its_fields():
    assert check_request(request()) == ([TWISTD, "--version"], {"PATH": "/bin"}, "/", [(7, 64, 64)])
    assert check_request(request(limits=""))[3] == []


@pytest.mark.parametrize("changes, reason", [
    ({"argv": []}, "argv"), ({"argv": "twistd"}, "argv"), ({"argv": ["twistd", 3]}, "argv"),
    ({"env": {"A=B": "c"}}, "env"), ({"env": {"": "c"}}, "env"), ({"env": {"A": 1}}, "env"), ({"env": []}, "env"),
    ({"cwd": "relative/dir"}, "absolute"), ({"cwd": None}, "absolute"),
    ({"argv": ["twistd", "a\0b"]}, "NUL"), ({"env": {"A": "\0"}}, "NUL"), ({"cwd": "/tmp/\0"}, "NUL"),
    ({"limits": 7}, "limits"), ({"limits": "7:64"}, "resource:soft:hard"), ({"limits": "a:b:c"}, "resource"),
])
def test_hostile_requests_are_refused_with_the_field_named(changes, reason):
    with pytest.raises(ProtocolError, match=reason):
        check_request(request(**changes))


# ------------------------------------------------------------------ the real fork server

@pytest.fixture
def fork_server():
    server = ForkServer(("twisted.web.server",))
    yield server
    server.close()


def open_log(path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


#: A twistd application file that reports what the child sees from inside: environment, cwd, session and
#: limits (``/proc/<pid>/environ`` cannot tell: it shows the environment the process image was exec'd with).
REPORTING_TAC = """
import json, os, resource
from twisted.application import service
with open(os.environ["REPORT"], "w") as handle:
    json.dump({"env": dict(os.environ), "cwd": os.getcwd(), "pgid": os.getpgid(0), "sid": os.getsid(0),
               "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
               "stdout": os.readlink("/proc/self/fd/1"), "stdin": os.readlink("/proc/self/fd/0")}, handle)
application = service.Application("reporting")
"""


def reporting_child(fork_server, tmp_path, limits=""):
    (tmp_path / "report.tac").write_text(REPORTING_TAC)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "REPORT": str(tmp_path / "report.json"),
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    log = open_log(tmp_path / "twistd.log")
    try:
        process = fork_server.spawn([TWISTD, "-n", "--pidfile=", "-y", str(tmp_path / "report.tac")], env,
                                    str(tmp_path), log, limits)
    finally:
        os.close(log)
    wait_for(lambda: (tmp_path / "report.json").exists() and (tmp_path / "report.json").stat().st_size,
             "the child reports")
    return process, env, json.loads((tmp_path / "report.json").read_text())


def wait_for(predicate, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s"
        time.sleep(0.01)


def test_a_forked_twistd_runs_with_the_spawner_contract(tmp_path, fork_server):
    process, env, seen = reporting_child(fork_server, tmp_path, f"{resource.RLIMIT_NOFILE}:200:200")
    try:
        assert process.started() is None and process_alive(process.pid, process.start_time)
        assert seen["env"] == env                                      # exactly the environment given
        assert seen["cwd"] == str(tmp_path) and seen["pgid"] == seen["sid"] == process.pid
        assert seen["nofile"] == [200, 200]
        assert seen["stdout"] == str(tmp_path / "twistd.log") and seen["stdin"] == os.devnull
    finally:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(5)
    wait_for(lambda: not os.path.exists(f"/proc/{process.pid}"), "the fork server reaps its killed child")


def test_the_fork_server_runs_with_a_minimal_environment_of_its_own(tmp_path, fork_server, monkeypatch):
    monkeypatch.setenv("NODE_MANAGER_SECRET", "not for slivers")
    process, _, _ = reporting_child(fork_server, tmp_path)
    try:
        with open(f"/proc/{process.pid}/environ", "rb") as handle:      # the image's: the fork server's
            image = dict(item.decode().split("=", 1) for item in handle.read().split(b"\0") if item)
        assert "NODE_MANAGER_SECRET" not in image and set(image) <= {"PATH", "PYTHONPATH"}
    finally:
        os.kill(process.pid, signal.SIGKILL)


def test_a_failed_set_up_is_the_starts_error_and_leaves_nothing(tmp_path, fork_server):
    log = open_log(tmp_path / "x.log")
    try:
        with pytest.raises(OSError, match="No such file"):
            fork_server.spawn([TWISTD, "--version"], {}, str(tmp_path / "missing"), log, "")
        with pytest.raises(OSError):          # a soft limit above the hard one: setrlimit refuses
            fork_server.spawn([TWISTD, "--version"], {}, str(tmp_path), log, f"{resource.RLIMIT_NOFILE}:20:10")
        with pytest.raises(OSError, match="malformed request: cwd"):
            fork_server.spawn([TWISTD, "--version"], {}, "relative", log, "")
        with pytest.raises(SpawnerUnavailable, match="twistd only"):
            fork_server.spawn(["/bin/sh", "-c", "true"], {}, str(tmp_path), log, "")
        process = fork_server.spawn([TWISTD, "--version"], {"PATH": "/bin"}, str(tmp_path), log, "")
    finally:
        os.close(log)
    process.wait(10)                                                    # the server still serves
    assert "twistd" in (tmp_path / "x.log").read_text()


def test_a_dead_fork_server_is_reported_then_started_again(tmp_path, fork_server):
    log = open_log(tmp_path / "x.log")
    try:
        fork_server.spawn([TWISTD, "--version"], {}, str(tmp_path), log, "").wait(10)
        first = fork_server.pid
        os.kill(first, signal.SIGKILL)
        with pytest.raises(SpawnerUnavailable, match="fork server failed"):
            fork_server.spawn([TWISTD, "--version"], {}, str(tmp_path), log, "")
        fork_server.spawn([TWISTD, "--version"], {}, str(tmp_path), log, "").wait(10)
        assert fork_server.pid not in (None, first)
    finally:
        os.close(log)


def test_a_fork_server_whose_preload_installs_a_reactor_refuses_to_fork(tmp_path):
    server = ForkServer(("twisted.internet.reactor",))
    log = open_log(tmp_path / "x.log")
    try:
        with pytest.raises(SpawnerUnavailable, match="installed a Twisted reactor"):
            server.spawn([TWISTD, "--version"], {}, str(tmp_path), log, "")
    finally:
        os.close(log)
        server.close()


def test_the_sandbox_records_stops_and_waits_for_forked_processes(tmp_path, fork_server):
    sandbox = DirectorySandbox(str(tmp_path / "slivers"))
    sandbox.recover()
    sandbox.create("xyz1", None)
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    pid = sandbox.start("xyz1", [TWISTD, "-n", "--pidfile=", "web", "--listen", "tcp:0:interface=127.0.0.1",
                                 "--path", "."], env, spawner=fork_server)
    run = tmp_path / "slivers" / "xyz1" / "run"
    assert (run / f"{pid}.pid").read_text().split()[0] == str(pid)
    started = (run / f"{pid}.pid").read_text().split()[1]
    assert sandbox.stop("xyz1") == 1
    assert not process_alive(pid, started)                     # stop() waited for it
    assert list(run.iterdir()) == []
    with pytest.raises(SpawnerUnavailable):            # passed through, not a refusal: the caller may exec
        sandbox.start("xyz1", ["/bin/sh", "-c", "sleep 60"], spawner=fork_server)
    assert list(run.iterdir()) == []
    with pytest.raises(SliverError, match="no sliver"):
        sandbox.start("nosuch", [TWISTD, "--version"], spawner=fork_server)


def test_the_fork_server_exits_when_its_node_manager_goes_and_its_children_live_on(tmp_path, fork_server):
    log = open_log(tmp_path / "x.log")
    try:
        process = fork_server.spawn([TWISTD, "-n", "--pidfile=", "web", "--listen", "tcp:0:interface=127.0.0.1",
                                     "--path", str(tmp_path)], {"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                                    str(tmp_path), log, "")
    finally:
        os.close(log)
    server = fork_server.pid
    fork_server.close()                                 # the socket closes: end of file for the server
    assert not os.path.exists(f"/proc/{server}")
    try:
        assert process_alive(process.pid, process.start_time)
    finally:
        os.kill(process.pid, signal.SIGKILL)


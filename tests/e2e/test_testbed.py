"""The testbed launcher itself: ``dsmt-testbed up``/``down`` as processes, a port taken meanwhile, a daemon
that cannot start (the error names it and quotes its log)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from dsmt.client import testbed as testbed_module
from dsmt.client.testbed import Testbed, TestbedError, child_environment, poll

pytestmark = pytest.mark.timeout(120)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().split(") ", 1)[1][0] != "Z"


def test_up_prints_the_svm_flags_and_down_stops_what_a_killed_up_left(tmp_path):
    directory = tmp_path / "bed"
    up = subprocess.Popen([sys.executable, "-m", "dsmt.client.testbed", "up", str(directory), "--nodes", "2"],
                          env=child_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = []
        while not out or out[-1] != "Ctrl-C stops it.\n":
            line = up.stdout.readline()
            assert line, up.stderr.read()
            out.append(line)
        state = json.loads((directory / "testbed.json").read_text())
        assert f"--agent {state['agent']} " in out[1] and f"--dir {directory}/home getads" in out[1]
        assert "--transport psepr --router " in out[2]
        # the flags printed work as they are
        flags = out[1].split()[1:-1]
        result = subprocess.run([sys.executable, "-m", "dsmt.client.svm", *flags, "getads"], env=child_environment(),
                                capture_output=True, text=True, timeout=60)
        assert result.stdout.split() == ["n001.farm0.test", "n002.farm0.test"], result.stderr
        up.kill()   # as kill -9: the daemons run on in their own sessions
        up.wait()
        pids = state["pids"]
        assert sorted(pids) == ["agent", "farm0", "router"] and all(alive(pid) for pid in pids.values())
        down = subprocess.run([sys.executable, "-m", "dsmt.client.testbed", "down", str(directory)],
                              env=child_environment(), capture_output=True, text=True, timeout=60)
        assert (down.returncode, down.stdout) == (0, "stopped: agent, farm0, router\n")
        poll(lambda: not any(alive(pid) for pid in pids.values()), 10, "the daemons' exit")
        again = subprocess.run([sys.executable, "-m", "dsmt.client.testbed", "down", str(directory)],
                               env=child_environment(), capture_output=True, text=True, timeout=60)
        assert (again.returncode, again.stdout) == (0, "stopped: nothing was running\n")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        testbed_module.down(directory) if (directory / "testbed.json").exists() else None


def test_up_stops_every_daemon_on_sigint(tmp_path):
    directory = tmp_path / "bed"
    up = subprocess.Popen([sys.executable, "-m", "dsmt.client.testbed", "up", str(directory), "--nodes", "1",
                           "--no-router"], env=child_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    try:
        while up.stdout.readline() not in ("Ctrl-C stops it.\n", ""):
            pass
        pids = json.loads((directory / "testbed.json").read_text())["pids"]
        assert sorted(pids) == ["agent", "farm0"]
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        assert not any(alive(pid) for pid in pids.values())
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_usage_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dsmt.client.testbed", "up", str(tmp_path), "--nodes", "2",
                             "--farms", "3"], env=child_environment(), capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (2, "dsmt-testbed: farms must be 1..nodes (2), not 3\n")
    result = subprocess.run([sys.executable, "-m", "dsmt.client.testbed", "down", str(tmp_path / "none")],
                            env=child_environment(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("dsmt-testbed: no testbed state in ")
    with pytest.raises(ValueError, match=r"farms must be 1..nodes \(5\), not 0"):
        Testbed(tmp_path, farms=0)


def test_the_slice_manager_daemon_on_request(tmp_path):
    import urllib.request
    with Testbed(tmp_path / "bed", nodes=1, transport_router=False, slice_manager=True) as bed:
        assert sorted(bed.pids) == ["agent", "farm0", "slicemanager"]
        assert (bed.pki / "service-slicemanager.pem").exists()
        with urllib.request.urlopen(bed.slice_manager_url + "?wsdl", timeout=10) as answer:
            assert answer.status == 200 and b"CreateSlice" in answer.read()
    assert bed.slice_manager.process.returncode is not None


def test_a_port_taken_meanwhile_is_replaced_and_a_daemon_that_dies_is_named_with_its_log(tmp_path, monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real = testbed_module.free_port
    monkeypatch.setattr(testbed_module, "free_port", lambda: next(ports, None) or real())
    bed = Testbed(tmp_path / "bed", nodes=1, node_pattern="bad_name{n}")  # the farm refuses this name
    with pytest.raises(TestbedError) as caught:
        bed.start()
    taken.close()
    message = str(caught.value)
    assert message.startswith("farm0 exited with status 1; the end of ")
    assert "--name 'bad_name{n}'" in message and "is neither an IPv4/IPv6 address nor a DNS host name" in message
    router_log = (tmp_path / "bed" / "router.log").read_text()
    assert router_log.count("dsmt-testbed: starting router") == 2 and "Address already in use" in router_log
    assert all(daemon.process.poll() is not None for daemon in (bed.router, bed.agent, bed.farms[0].daemon))

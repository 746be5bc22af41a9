"""``twistd psepr-router``: the dropin lists the daemons, and the daemon really runs.

These tests run the ``twistd`` installed next to the running Python
(``.venv/bin/twistd``), so they see the dropin ``twisted/plugins/dsmt_plugins.py``
as installed by ``make venv``.  The dsmt code the daemon imports is whatever
this test process imports: the installed package under ``make test``, the
working tree under ``PYTHONPATH=.dev`` (the path is passed on, made absolute).
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from dsmt.transports.psepr.client import PsEPRConnection
from dsmt.transports.psepr.event import Event
from tests.support.processes import TWISTD, child_environment, free_port
from tests.support.psepr import PASSWORD, Collector, accounts_text

#: Seconds a twistd that only parses its options may take (it exits at once).
QUICK = 30


def twistd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run twistd to completion (option parsing only: it exits within a second); output as one text."""
    return subprocess.run([str(TWISTD), *args], cwd=cwd, env=child_environment(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=QUICK)


def test_twistd_lists_the_daemons(tmp_path):
    result = twistd("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    commands = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ") and line.split()}
    assert {"psepr-router", "pldb"} <= commands, result.stdout


def test_psepr_router_help_shows_its_options(tmp_path):
    result = twistd("-n", "psepr-router", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    for option in ("--accounts", "--listen", "--max-lease", "--max-output-buffer", "--login-timeout",
                   "--stats-interval", "--allow-anonymous"):
        assert option in result.stdout


@pytest.mark.parametrize("content, complaint", [
    (None, "No such file or directory"),
    ("alice:not-a-hash\n", ":1: hash is not scrypt"),
    ("\n# comment\nbad name:x\n", ":3: invalid account name"),
], ids=["missing", "bad-hash", "bad-name"])
def test_unusable_accounts_file_stops_the_daemon_naming_the_file(tmp_path, content, complaint):
    accounts = tmp_path / "accounts"
    if content is not None:
        accounts.write_text(content)
    result = twistd("-n", "--pidfile=", "psepr-router", "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
                    "--accounts", str(accounts), cwd=tmp_path)
    assert result.returncode != 0
    last = result.stdout.strip().splitlines()[-1]
    assert f"cannot use accounts file {accounts}" in last and complaint in last, result.stdout


@pytest.mark.parametrize("args, complaint", [
    ((), "--accounts FILE is required"),
    (("--allow-anonymous", "--max-lease", "0"), "--max-lease must be at least 1 second"),
    (("--allow-anonymous", "--max-output-buffer", "0"), "--max-output-buffer must be at least 1 byte"),
    (("--allow-anonymous", "--name", " spaced "), "--name: router name"),
])
def test_bad_options_stop_the_daemon(tmp_path, args, complaint):
    result = twistd("-n", "--pidfile=", "psepr-router", *args, cwd=tmp_path)
    assert result.returncode != 0
    assert complaint in result.stdout.strip().splitlines()[-1], result.stdout


class RunningDaemonTests(unittest.TestCase):
    """A real ``twistd -n psepr-router`` process, used by real clients."""

    timeout = 30
    #: Seconds the daemon may take to start answering logins.
    STARTUP = 20

    def setUp(self):
        self.workdir = Path(tempfile.mkdtemp(prefix="dsmt-twistd-"))  # outside the repository
        self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
        accounts = self.workdir / "accounts"
        accounts.write_text(accounts_text())
        self.port = free_port()
        self.output = (self.workdir / "twistd.out").open("w+")
        self.process = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "--logfile=-", "psepr-router",
             "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--accounts", str(accounts),
             "--stats-interval", "0", "--name", "router-under-test"],
            cwd=self.workdir, env=child_environment(), stdout=self.output, stderr=subprocess.STDOUT)
        self.exited = threads.deferToThread(self.process.wait)  # fires with the exit code
        self.connections = []
        self.addCleanup(self._stop)

    @defer.inlineCallbacks
    def _stop(self):
        for connection in self.connections:
            connection.close()
        if self.process.poll() is None:
            self.process.terminate()
            killer = reactor.callLater(10, self.process.kill)
            yield self.exited
            if killer.active():
                killer.cancel()
        yield self.exited
        self.output.close()

    def log(self) -> str:
        self.output.flush()
        self.output.seek(0)
        return self.output.read()

    @defer.inlineCallbacks
    def client(self, user: str):
        """A connection that keeps trying (with the client's own backoff) until the daemon answers."""
        connection = PsEPRConnection.from_urls(f"psepr://127.0.0.1:{self.port}", service=user,
                                               password=PASSWORD, instance="node1")
        self.connections.append(connection)  # closed by the cleanup, which also stops its retries
        answered = defer.Deferred()

        def settle(result):
            if not answered.called:
                answered.callback(result)

        connection.connect(retry=True).addBoth(settle)
        self.exited.addCallback(lambda code: (settle(AssertionError(f"daemon exited ({code}):\n{self.log()}")),
                                              code)[1])
        timer = reactor.callLater(self.STARTUP, settle, AssertionError(
            f"daemon did not answer within {self.STARTUP} s:\n{self.log()}"))
        result = yield answered
        if timer.active():
            timer.cancel()
        if isinstance(result, Exception):
            raise result
        return connection

    @defer.inlineCallbacks
    def test_daemon_routes_an_event(self):
        sub = yield self.client("alice")
        pub = yield self.client("bob")
        got = Collector()
        lease = sub.lease("/daemon/", 60, callback=got)
        yield lease.ready
        yield sub.flush()
        pub.send(Event.attribute("/daemon/x/", "status", "hello"))
        yield got.wait(1)
        self.assertEqual(got.values(), ["hello"])
        self.assertEqual((got.events[0].from_service, got.events[0].from_instance), ("bob", "node1"))
        for connection in self.connections:
            connection.close()
        self.process.terminate()
        code = yield self.exited
        # twistd shuts down cleanly, then ends itself with the signal it received (Twisted ≥ 23)
        self.assertIn(code, (0, -signal.SIGTERM), self.log())
        self.assertIn("Server Shut Down.", self.log())
        self.assertNotIn("Traceback", self.log())


"""``twistd -n pldb`` as a real process: records, answers, and keeps its data across kill -9."""
import os
import signal
import subprocess

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from dsmt.client.pldb import query_pldb
from dsmt.transports.psepr.event import Event
from tests.support.processes import TWISTD, child_environment, start_twistd
from tests.support.psepr import PASSWORD, RouterHarness, connect

#: Seconds the daemon may take to start answering queries.
STARTUP = 20
CHANNEL = "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-mgr/status/"


class PldbDaemonTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.router = yield RouterHarness().start()
        self.addCleanup(self.router.stop)
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.password_file = os.path.join(self.workdir, "pldb.pw")
        with open(self.password_file, "w") as handle:
            handle.write(PASSWORD + "\n")
        self.db = os.path.join(self.workdir, "pldb.sqlite")
        self.log = open(os.path.join(self.workdir, "pldb.log"), "w+")
        self.addCleanup(self.log.close)
        self.client = yield connect(self.router.url, "alice")
        self.addCleanup(self.client.close)

    def start_daemon(self):
        process, exited = start_twistd(self, [
            "pldb", "--router", self.router.url, "--password-file", self.password_file, "--db", self.db,
            "--instance", "db1", "--watch", "/org/dsmt/ns/deployment/"], cwd=self.workdir, log=self.log)
        self.process = process
        return process, exited

    @defer.inlineCallbacks
    def answered_query(self, channel):
        """Query until the daemon answers (it is starting), bounded by STARTUP seconds."""
        deadline = reactor.seconds() + STARTUP
        while True:
            result = yield defer.ensureDeferred(query_pldb(self.client, channel, timeout=0.5))
            if result.complete:
                return result
            if reactor.seconds() > deadline or self.process.poll() is not None:
                self.log.seek(0)
                self.fail(f"PLDB did not answer within {STARTUP} s (exit status {self.process.poll()}):\n"
                          f"{self.log.read()[-3000:]}")

    @defer.inlineCallbacks
    def test_records_answers_and_survives_kill_9(self):
        process, exited = self.start_daemon()
        first = yield self.answered_query("/org/dsmt/ns/deployment/")
        self.assertEqual(first.attrs, [])
        self.client.send(Event.attribute(CHANNEL, "deployment-status", "hostname=h1,status=running"))
        yield self.client.flush()
        result = None
        for _ in range(50):  # the daemon records asynchronously: ask until the value is there
            result = yield self.answered_query("/org/dsmt/ns/deployment/xyz1/")
            if result.attrs:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual([(a.channel, a.value) for a in result.attrs], [(CHANNEL, "hostname=h1,status=running")])

        process.send_signal(signal.SIGKILL)
        yield exited
        self.start_daemon()
        result = yield self.answered_query("/org/dsmt/ns/deployment/xyz1/")
        self.assertEqual([(a.channel, a.value, a.from_service) for a in result.attrs],
                         [(CHANNEL, "hostname=h1,status=running", "alice")])

    @defer.inlineCallbacks
    def test_bad_options_stop_the_daemon_with_a_message(self):
        process = yield threads.deferToThread(
            subprocess.run, [str(TWISTD), "-n", "--pidfile=", "pldb", "--watch", "no-slashes"],
            cwd=self.workdir, env=child_environment(), capture_output=True, text=True, timeout=30)
        self.assertNotEqual(process.returncode, 0)
        self.assertIn("must begin and end with '/'", process.stdout + process.stderr)

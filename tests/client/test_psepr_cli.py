"""The ``psepr`` command, run as a real process against a real router (and PLDB)."""
import json
import os
import sys

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from dsmt.server.pldb.daemon import PldbService
from dsmt.server.pldb.store import PldbStore
from dsmt.transports.psepr.accounts import Accounts
from dsmt.transports.psepr.client import PsEPRConnection
from tests.support.psepr import PASSWORD, RouterHarness

CLI = [sys.executable, "-m", "dsmt.client.psepr_cli"]


class CliProcess(protocol.ProcessProtocol):
    """Collects output; ``ended`` fires with (status, stdout, stderr); ``stderr_line(text)`` waits for a line."""

    def __init__(self, stdin: bytes | None = None):
        self.stdin = stdin
        self.out = b""
        self.err = b""
        self.ended = defer.Deferred()
        self._waiting: list[tuple[bytes, defer.Deferred]] = []

    def connectionMade(self):
        if self.stdin is not None:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.err += data
        for needle, waiter in list(self._waiting):
            if needle in self.err:
                self._waiting.remove((needle, waiter))
                waiter.callback(None)

    def stderr_line(self, text: str) -> defer.Deferred:
        if text.encode() in self.err:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._waiting.append((text.encode(), waiter))
        return waiter

    def processEnded(self, reason):
        for _, waiter in self._waiting:
            waiter.errback(AssertionError(f"process ended first; stderr: {self.err.decode()}"))
        self.ended.callback((reason.value.exitCode, self.out.decode(), self.err.decode()))


def run(*args, stdin: bytes | None = None, env: dict | None = None) -> CliProcess:
    process = CliProcess(stdin)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PSEPR_")}
    environment.update(env or {})
    reactor.spawnProcess(process, CLI[0], CLI + list(args), env=environment)
    return process


class PsEPRCommandTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.router = yield RouterHarness().start()
        self.env = {"PSEPR_ROUTER": self.router.url, "PSEPR_USER": "alice", "PSEPR_PASSWORD": PASSWORD,
                    "PSEPR_INSTANCE": "node1"}

    def tearDown(self):
        return self.router.stop()

    @defer.inlineCallbacks
    def test_send_and_listen_in_every_format(self):
        for style in ("text", "json", "xml"):
            listener = run("listen", "/cli/", "--count", "1", "--format", style, env=self.env)
            yield listener.stderr_line("listening on /cli/")
            sender = run("send", "/cli/a/", "--field", "status", "--value", "x=1 & <y>", "--expire", "30",
                         env=self.env | {"PSEPR_USER": "bob"})
            status, out, err = yield sender.ended
            self.assertEqual((status, err), (0, ""))
            status, out, err = yield listener.ended
            self.assertEqual(status, 0, err)
            if style == "json":
                record = json.loads(out)
                self.assertEqual((record["channel"], record["field"], record["value"], record["from_service"],
                                  record["expire"]), ("/cli/a/", "status", "x=1 & <y>", "bob", 30))
            elif style == "xml":
                self.assertIn("<value>x=1 &amp; &lt;y&gt;</value>", out)
            else:
                self.assertEqual(out, "/cli/a/ status=x=1 & <y> (from bob/node1)\n")

    @defer.inlineCallbacks
    def test_send_any_payload_from_a_file(self):
        payload = self.mktemp()
        with open(payload, "wb") as handle:
            handle.write(b'<payload xmlns="urn:dsmt:test"><thing n="1"/></payload>')
        listener = run("listen", "/p/", "--type", "urn:dsmt:test", "--count", "1", "--format", "xml", env=self.env)
        yield listener.stderr_line("listening on")
        status, _, err = yield run("send", "/p/", "--payload", payload, env=self.env).ended
        self.assertEqual(status, 0, err)
        status, out, _ = yield listener.ended
        self.assertIn('<thing n="1"/>', out)

    @defer.inlineCallbacks
    def test_listen_ends_incomplete_when_too_few_events_arrive(self):
        status, out, err = yield run("listen", "/quiet/", "--count", "2", "--seconds", "0.3", env=self.env).ended
        self.assertEqual(status, 1)
        self.assertIn("received 0 of 2 events", err)
        status, _, _ = yield run("listen", "/quiet/", "--seconds", "0.2", env=self.env).ended
        self.assertEqual(status, 0)

    @defer.inlineCallbacks
    def test_query_prints_what_pldb_remembers(self):
        connection = PsEPRConnection.from_urls(self.router.url, service="pldb", password=PASSWORD, instance="db")
        pldb = PldbService(connection, PldbStore(self.mktemp()), ["/org/dsmt/ns/deployment/"])
        pldb.startService()
        self.addCleanup(pldb.stopService)
        yield defer.DeferredList([lease.ready for lease in pldb.leases])
        yield connection.flush()
        status, _, err = yield run("send", "/org/dsmt/ns/deployment/xyz1/c/status/", "--field",
                                   "deployment-status", "--value", "status=running", env=self.env).ended
        self.assertEqual(status, 0, err)
        yield connection.flush()
        status, out, err = yield run("query", "/org/dsmt/ns/deployment/xyz1/", env=self.env).ended
        self.assertEqual(status, 0, err)
        self.assertEqual(out, "/org/dsmt/ns/deployment/xyz1/c/status/ deployment-status=status=running "
                              "(from alice/node1)\n")
        status, out, err = yield run("query", "/org/dsmt/ns/deployment/", "--pldb-channel", "/nobody/",
                                     "--timeout", "0.2", env=self.env).ended
        self.assertEqual(status, 1)
        self.assertIn("no answer from PLDB", err)

    @defer.inlineCallbacks
    def test_clear_errors_and_exit_statuses(self):
        cases = [
            (["send", "/x/", "--field", "f", "--value", "v"], {"PSEPR_ROUTER": "psepr://127.0.0.1:9"}, 3,
             "cannot reach psepr://127.0.0.1:9"),
            (["send", "/x/", "--field", "f", "--value", "v"], {"PSEPR_PASSWORD": "wrong"}, 4, "refused the login"),
            (["send", "x", "--field", "f", "--value", "v"], {}, 2, "must begin and end with '/'"),
            (["send", "/x/", "--field", "f"], {}, 2, "needs --field and --value"),
            (["send", "/x/", "--payload", "/nonexistent/p.xml"], {}, 2, "cannot read payload file"),
            (["send", "/x/", "--field", "f", "--value", "\x01"], {}, 2, "invalid event"),
            (["listen", "/x/", "--router", "http://h"], {}, 2, "must start with psepr:// or nats://"),
            (["send", "/x/", "--field", "f", "--value", "v", "--password-file", "/nonexistent"], {}, 2,
             "cannot read password file"),
        ]
        for args, env, expected_status, message in cases:
            status, out, err = yield run(*args, env=self.env | env).ended
            self.assertEqual(status, expected_status, (args, err))
            self.assertIn(message, err, args)
            self.assertNotIn("Traceback", err, args)

    @defer.inlineCallbacks
    def test_payload_file_with_a_dtd_is_refused(self):
        payload = self.mktemp()
        with open(payload, "wb") as handle:
            handle.write(b'<!DOCTYPE p [<!ENTITY x SYSTEM "file:///etc/passwd">]><payload xmlns="urn:x">&x;</payload>')
        status, _, err = yield run("send", "/x/", "--payload", payload, env=self.env).ended
        self.assertEqual(status, 2)
        self.assertIn("DOCTYPE", err)


class PasswdTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_passwd_prints_an_accounts_line(self):
        status, out, err = yield run("passwd", "xyz1_mgr", stdin=b"s3cret\n").ended
        self.assertEqual(status, 0, err)
        accounts = Accounts.parse(out)
        self.assertTrue(accounts.check("xyz1_mgr", "s3cret"))
        self.assertFalse(accounts.check("xyz1_mgr", "s3cret\n"))

    @defer.inlineCallbacks
    def test_passwd_refuses_bad_names_and_empty_passwords(self):
        status, _, err = yield run("passwd", "bad name", stdin=b"pw\n").ended
        self.assertEqual(status, 2)
        self.assertNotIn("Traceback", err)
        status, _, err = yield run("passwd", "ok", stdin=b"\n").ended
        self.assertEqual(status, 2)
        self.assertIn("empty password", err)

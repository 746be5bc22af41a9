"""Health checks: the retry counting (pure), then real HTTP, TCP and command probes."""
import sys

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest
from twisted.web import resource, server

from dsmt.server.deployment.descriptor import Command, HealthCheck
from dsmt.server.deployment.health import (
    STARTUP_PROBE_MAX_SECONDS, STARTUP_PROBE_SECONDS, HealthChecker, HealthError, RetryCounter,
)
from dsmt.server.deployment.supervisor import ExitStatus


def test_steady_rule_counts_consecutive_failures():
    counter = RetryCounter(3, 10, startup=False, now=0)
    assert [counter.record(False, t).verdict for t in (0, 10)] == ["retry", "retry"]
    assert counter.record(True, 20).verdict == "healthy" and counter.failures == 0
    decisions = [counter.record(False, t) for t in (30, 40, 50)]
    assert [d.verdict for d in decisions] == ["retry", "retry", "unhealthy"]
    assert decisions[0].delay == 10


def test_startup_rule_probes_quickly_within_the_window():
    counter = RetryCounter(2, 1, startup=True, now=0)
    decision = counter.record(False, 0.05)
    assert decision.verdict == "retry" and decision.delay == STARTUP_PROBE_SECONDS
    assert counter.record(False, 1.85).verdict == "retry"
    assert counter.record(False, 1.95).verdict == "unhealthy"


def test_startup_pauses_double_up_to_the_cap_and_end_with_the_window():
    counter = RetryCounter(3, 5, startup=True, now=0)                  # a 15 s window
    now, delays = 0.0, []
    while (decision := counter.record(False, now)).verdict == "retry":
        delays.append(decision.delay)
        now += decision.delay
    assert delays[:4] == [STARTUP_PROBE_SECONDS, 2 * STARTUP_PROBE_SECONDS, STARTUP_PROBE_MAX_SECONDS,
                          STARTUP_PROBE_MAX_SECONDS]
    assert max(delays) == STARTUP_PROBE_MAX_SECONDS
    assert abs(now - 15) < 1e-9 and decision.verdict == "unhealthy"    # probed until the window's very end
    short = RetryCounter(2, 0.05, startup=True, now=0)                  # never a pause over the interval
    assert short.record(False, 0).delay == 0.05


class Status(resource.Resource):
    isLeaf = True
    code = 200

    def render_GET(self, request):
        request.setResponseCode(self.code)
        return b"ok"


class ProbeTests(unittest.TestCase):
    def setUp(self):
        self.resource = Status()
        site = server.Site(self.resource)
        site.noisy = False
        self.http = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.port = self.http.getHost().port
        self.addCleanup(lambda: self.http.stopListening() if self.http.connected else None)

    def checker(self, **kwargs):
        fields = dict(kind="http", interval=0.1, timeout=0.1, retries=2)
        fields.update(kwargs)
        return HealthChecker(reactor, HealthCheck(**fields), {"port": str(self.port)},
                             run_command=lambda command, timeout: defer.succeed(ExitStatus(int(command.argv[0]), None)))

    @defer.inlineCallbacks
    def test_http(self):
        check = self.checker(url="http://127.0.0.1:${port}/health")
        self.assertIsNone((yield check.probe()))
        self.resource.code = 503
        self.assertIn("HTTP status 503", (yield check.probe()))
        with self.assertRaises(HealthError) as caught:
            yield check.wait_healthy(startup=False)
        self.assertEqual(caught.exception.code, "unhealthy")
        self.assertIn("2 consecutive failed checks", caught.exception.reason)

    @defer.inlineCallbacks
    def test_tcp(self):
        self.assertIsNone((yield self.checker(kind="tcp", host="127.0.0.1", port="${port}").probe()))
        yield self.http.stopListening()
        reason = yield self.checker(kind="tcp", host="127.0.0.1", port="${port}").probe()
        self.assertIn("ConnectionRefusedError", reason)
        with self.assertRaises(HealthError) as caught:
            yield self.checker(kind="tcp", host="127.0.0.1", port="${port}").wait_healthy()
        self.assertIn("not healthy within 0.2 s of starting", caught.exception.reason)

    @defer.inlineCallbacks
    def test_startup_wait_succeeds_once_the_service_listens(self):
        port = self.port
        yield self.http.stopListening()
        check = self.checker(kind="tcp", host="127.0.0.1", port=str(port), interval=5, timeout=1)
        waiting = check.wait_healthy()
        ports = []
        reactor.callLater(0.15, lambda: ports.append(
            reactor.listenTCP(port, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")))
        yield waiting
        self.assertEqual(len(ports), 1)
        yield ports[0].stopListening()

    @defer.inlineCallbacks
    def test_command(self):
        self.assertIsNone((yield self.checker(kind="command", command=Command(("0",))).probe()))
        self.assertIn("exited with status 1", (yield self.checker(kind="command", command=Command(("1",))).probe()))
        self.assertIsNotNone(sys.executable)

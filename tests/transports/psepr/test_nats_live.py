"""The Twisted NATS adapter against real nats-server processes (one server, an auth server, a cluster).

Trial test cases: pytest runs them and trial spins the reactor until each
returned Deferred fires.  No test sleeps; ordering comes from the protocol
itself (one connection's messages arrive in order, PING/PONG flushes) and,
across a cluster, from the harness's wait for route interest.  The one timed
wait is the handshake timeout of a silent server, 0.2 s by design.
"""
import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError, inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from dsmt.transports.psepr.nats import (
    NatsAuthorizationError, NatsNotConnectedError, NatsProtocolError, channel_to_subject, connect_nats,
    subject_to_channel, subtree_subjects)
from tests.support import natsserver
from tests.support.natsserver import NatsServer

pytestmark = pytest.mark.nats


class Inbox:
    """Collects messages of one or more subscriptions; :meth:`until` waits for one matching a payload."""

    def __init__(self):
        self.messages = []
        self._waiting = {}

    def __call__(self, subject, payload, reply):
        self.messages.append((subject, payload, reply))
        waiter = self._waiting.pop(payload, None)
        if waiter is not None:
            waiter.callback(None)

    def until(self, payload: bytes) -> Deferred:
        if payload in self.payloads():
            return succeed(None)
        self._waiting[payload] = Deferred()
        return self._waiting[payload]

    def payloads(self):
        return [payload for _, payload, _ in self.messages]


class LiveTestCase(TestCase):
    timeout = 10

    @inlineCallbacks
    def client(self, server, **options):
        """A ready connection to *server*, closed when the test ends."""
        protocol = yield connect_nats(reactor, server.host, server.port, **options)
        self.addCleanup(protocol.close)
        return protocol


@pytest.mark.usefixtures("nats_server")
class SingleServerTests(LiveTestCase):

    @inlineCallbacks
    def test_connect(self):
        client = yield self.client(self.nats_server, name="dsmt-test")
        self.assertIn("server_id", client.server_info)
        self.assertEqual(client.server_info["max_payload"], 1024 * 1024)
        yield client.flush()

    @inlineCallbacks
    def test_publish_subscribe_round_trip(self):
        subscriber = yield self.client(self.nats_server)
        publisher = yield self.client(self.nats_server)
        inbox = Inbox()
        subscriber.subscribe("psepr.a", inbox)
        yield subscriber.flush()  # the server has the subscription before anyone publishes
        payloads = [b"", b"\r\nMSG x 1 2\r\n", bytes(range(256)), b"m" * (1024 * 1024)]
        for payload in payloads:
            publisher.publish("psepr.a", payload, reply="psepr.reply")
        yield inbox.until(payloads[-1])
        self.assertEqual(inbox.payloads(), payloads)
        self.assertEqual({(s, r) for s, _, r in inbox.messages}, {("psepr.a", "psepr.reply")})

    @inlineCallbacks
    def test_subtree_lease_is_sibling_safe(self):
        lease = "/org/dsmt/ns/deployment/xyz1/"
        client = yield self.client(self.nats_server)
        inbox = Inbox()
        for subject in subtree_subjects(lease):
            client.subscribe(subject, inbox)
        yield client.flush()
        inside = [lease, lease + "org.dsmt.component.sliver-mgr/status/"]
        outside = ["/org/dsmt/ns/deployment/xyz10/", "/org/dsmt/ns/deployment/xyz1.evil/",
                   "/org/dsmt/ns/deployment/"]
        for channel in outside + inside:
            client.publish(channel_to_subject(channel), channel.encode())
        yield inbox.until(inside[-1].encode())  # one connection's messages arrive in order
        self.assertEqual([subject_to_channel(s) for s, _, _ in inbox.messages], inside)

    @inlineCallbacks
    def test_unsubscribe_stops_delivery(self):
        client = yield self.client(self.nats_server)
        dropped, witness = Inbox(), Inbox()
        sid = client.subscribe("psepr.u", dropped)
        client.subscribe("psepr.u", witness)
        client.publish("psepr.u", b"1")
        yield client.flush()  # the server queues our own messages ahead of the PONG
        client.unsubscribe(sid)
        client.publish("psepr.u", b"2")
        yield client.flush()
        self.assertEqual(dropped.payloads(), [b"1"])
        self.assertEqual(witness.payloads(), [b"1", b"2"])

    @inlineCallbacks
    def test_failing_subscriber_does_not_break_the_connection(self):
        client = yield self.client(self.nats_server)
        inbox = Inbox()
        client.subscribe("psepr.f", lambda *message: 1 / 0)
        client.subscribe("psepr.f", inbox)
        client.publish("psepr.f", b"1")
        client.publish("psepr.f", b"2")
        yield client.flush()
        self.assertEqual(inbox.payloads(), [b"1", b"2"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        yield client.flush()  # still connected

    @inlineCallbacks
    def test_server_stop_is_reported(self):
        client = yield self.client(self.nats_server)
        lost = client.when_connection_lost()
        self.nats_server.stop()
        reason = yield lost
        self.assertIsInstance(reason, (ConnectionDone, ConnectionLost))
        self.assertRaises(NatsNotConnectedError, client.publish, "psepr.a", b"")


class AuthorizationTests(LiveTestCase):

    def setUp(self):
        self.server = NatsServer(["--user", "dsmt", "--pass", "s3cret"])
        self.addCleanup(self.server.stop)

    @inlineCallbacks
    def test_right_credentials(self):
        client = yield self.client(self.server, user="dsmt", password="s3cret")
        self.assertTrue(client.server_info["auth_required"])
        yield client.flush()

    @inlineCallbacks
    def test_wrong_or_missing_credentials_fail_clearly(self):
        for options in [{"user": "dsmt", "password": "wrong"}, {}]:
            with self.assertRaises(NatsAuthorizationError) as raised:
                yield connect_nats(reactor, self.server.host, self.server.port, **options)
            self.assertEqual(raised.exception.message, "Authorization Violation")


@pytest.mark.usefixtures("nats_cluster")
class ClusterTests(LiveTestCase):

    @inlineCallbacks
    def test_subscription_on_one_node_receives_publish_on_another(self):
        subscriber = yield self.client(self.nats_cluster[0])
        publisher = yield self.client(self.nats_cluster[-1])
        own, below = subtree_subjects("/org/dsmt/")
        inbox = Inbox()
        subscriber.subscribe(own, inbox)
        subscriber.subscribe(below, inbox)
        yield subscriber.flush()
        # Both SUBs travel the same route in order, so interest in the second implies the first.
        yield deferToThread(self.nats_cluster.wait_for_interest, -1, below)
        publisher.publish(channel_to_subject("/org/dsmt/"), b"own")
        publisher.publish(channel_to_subject("/org/dsmt/x/y/"), b"below")
        yield inbox.until(b"below")
        self.assertEqual(inbox.payloads(), [b"own", b"below"])


class Impostor(Protocol):
    """A server that sends *greeting*, then nothing; fires *closed* when the client hangs up."""

    def __init__(self, greeting: bytes, closed: Deferred):
        self.greeting, self.closed = greeting, closed

    def connectionMade(self):
        self.transport.write(self.greeting)

    def connectionLost(self, reason):
        self.closed.callback(None)


class MisbehavingServerTests(TestCase):
    """What connect_nats does when the peer is not a working nats-server."""
    timeout = 10

    @inlineCallbacks
    def connect(self, greeting: bytes, **options):
        closed = Deferred()
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: Impostor(greeting, closed)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        try:
            yield connect_nats(reactor, "127.0.0.1", port.getHost().port, **options)
        finally:
            yield closed  # connect_nats fails once its side is closed; wait for this side too

    def test_silent_server_times_out(self):
        return self.assertFailure(self.connect(b"", timeout=0.2), TimeoutError)

    @inlineCallbacks
    def test_garbage_is_a_protocol_error(self):
        yield self.assertFailure(self.connect(b"HTTP/1.1 400 Bad Request\r\n\r\n"), NatsProtocolError)
        self.assertEqual(len(self.flushLoggedErrors(NatsProtocolError)), 1)


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), (None, pytest.skip.Exception)])
def test_missing_server_skips_or_fails_in_ci(monkeypatch, ci, outcome):
    monkeypatch.setattr(natsserver.shutil, "which", lambda name: None)
    monkeypatch.setattr(natsserver, "FALLBACK_DIRS", ())
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="nats-server not found"):
        natsserver.find_nats_server()

"""The NATS backend through :class:`PsEPRConnection`: what only it does, against real nats-server processes.

``test_psepr_live.py`` checks the delivery contract both backends keep; this
module checks what is specific to NATS: a cluster (a lease on one node, a
publisher on another; failover between nodes), NATS logins, the router's jobs
done client-side (narrowing, payload-type filter, dropping unreadable
payloads, grants, subscriptions per lease) and the server's ``max_payload``.

No test sleeps.  Non-delivery is proven with a marker sent after the events
that must not arrive (one publisher's messages arrive in order).  Across a
cluster, the harness polls the monitoring endpoint for route interest (in a
thread); a reconnect and a grant are waited for through Deferreds: the
connection's own ``connect()`` and a spy on the link-to-connection grant
callback.
"""
import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from dsmt.transports.psepr import backend_nats
from dsmt.transports.psepr.backend_nats import EventTooLarge
from dsmt.transports.psepr.client import ConnectFailed, LoginFailed, PsEPRConnection, PsEPRError
from dsmt.transports.psepr.event import ATTRIBUTE_NS, MAX_EVENT_BYTES, Event, OpaquePayload, event_to_xml
from dsmt.transports.psepr.leasetable import DEFAULT_MAX_LEASE_SECONDS
from dsmt.transports.psepr.nats import NatsAuthorizationError, channel_to_subject, connect_nats, subtree_subjects
from tests.support.natsserver import NatsServer, _wait_until
from tests.support.psepr import PASSWORD, listen

pytestmark = pytest.mark.nats

#: Bound on waiting for a reconnect or a grant (each takes well under a second).
WAIT = 5


def attr(channel, value, **addressing):
    return Event.attribute(channel, "status", value, **addressing)


def url(*servers) -> str:
    return ",".join(f"nats://127.0.0.1:{server.port}" for server in servers)


class LogCapture:
    """Warnings logged by the PsEPR client (namespace ``dsmt.psepr.client``) during a test."""

    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event):
        if event.get("log_namespace") == "dsmt.psepr.client" and event.get("log_level") == LogLevel.warn:
            self.events.append(event)

    def messages(self):
        return [formatEvent(event) for event in self.events]


def next_grant(connection, lease) -> Deferred:
    """Fires with the seconds of the next grant the link reports for *lease* (a spy on ``link_granted``)."""
    granted = Deferred()
    original = connection.link_granted

    def spy(identifier, seconds):
        original(identifier, seconds)
        if identifier == lease.identifier and not granted.called:
            del connection.link_granted
            granted.callback(seconds)

    connection.link_granted = spy
    return granted.addTimeout(WAIT, reactor)


def when_lost(connection) -> Deferred:
    """Fires once *connection* has been told its current NATS connection is gone."""
    return connection.link.protocol.when_connection_lost()


class NatsBackendTestCase(TestCase):
    timeout = 15

    @inlineCallbacks
    def client(self, servers, user="alice", *, instance="node1", password=PASSWORD, retry=False):
        """A logged-in connection to *servers* (a failover list), closed (and waited for) after the test."""
        connection = PsEPRConnection.from_urls(url(*servers), service=user, password=password, instance=instance)
        self.addCleanup(self._close, connection)
        yield connection.connect(retry=retry)
        return connection

    @staticmethod
    def _close(connection):
        link = connection.link
        connection.close()
        if link is not None:
            return link.protocol.when_connection_lost()

    @inlineCallbacks
    def raw_client(self, server):
        """A bare NATS connection (no PsEPR on top), for publishing what a PsEPR client never would."""
        protocol = yield connect_nats(reactor, server.host, server.port)
        self.addCleanup(protocol.close)
        return protocol

    def listen(self, connection, channel, payload_type=None, seconds=60):
        return listen(connection, channel, payload_type, seconds)


def wait_for_interest_via(cluster, index, via, subject) -> Deferred:
    """Like ``NatsCluster.wait_for_interest``, but only through the route to server *via*.

    After a node stops, the others may still list its route (and its
    subscriptions) for a moment; interest through the route to the node the
    subscriber moved to is what a publish needs.
    """
    server, peer_id = cluster[index], cluster[via].monitor("varz")["server_id"]

    def routed():
        return any(route["remote_id"] == peer_id and subject in (route.get("subscriptions_list") or ())
                   for route in server.monitor("routez?subs=1")["routes"])

    return deferToThread(_wait_until, routed, f"interest in {subject!r} through the route to server {via}",
                         server.process, server.log)


@pytest.mark.usefixtures("nats_cluster")
class ClusterTests(NatsBackendTestCase):

    @inlineCallbacks
    def test_lease_on_one_node_receives_events_published_on_another(self):
        lease_channel = "/org/dsmt/ns/deployment/xyz1/"
        a = yield self.client([self.nats_cluster[0]], "alice")
        b = yield self.client([self.nats_cluster[2]], "bob", instance="node3")
        got = yield self.listen(a, lease_channel)  # granted, and flushed: node 0 has both subscriptions
        for subject in subtree_subjects(lease_channel):
            yield deferToThread(self.nats_cluster.wait_for_interest, 2, subject)
        for channel in ("/org/dsmt/ns/deployment/xyz10/", "/org/dsmt/ns/deployment/xyz1.evil/",
                        "/org/dsmt/ns/deployment/", "/org/dsmt/ns/deployment/xyz1/comp/status/host/",
                        lease_channel):
            b.send(attr(channel, channel))
        yield got.wait(2)  # the siblings went first: had they been delivered, they would be in by now
        self.assertEqual(got.events, [attr("/org/dsmt/ns/deployment/xyz1/comp/status/host/",
                                           "/org/dsmt/ns/deployment/xyz1/comp/status/host/",
                                           from_service="bob", from_instance="node3"),
                                      attr(lease_channel, lease_channel, from_service="bob", from_instance="node3")])

    @inlineCallbacks
    def test_failover_to_the_next_node_re_registers_leases(self):
        cluster = self.nats_cluster
        connection = yield self.client([cluster[0], cluster[1]], retry=True)
        publisher = yield self.client([cluster[2]], "bob")
        self.assertEqual(connection.link.protocol.server_info["port"], cluster[0].port)
        got = yield self.listen(connection, "/f/")
        subject, below = subtree_subjects("/f/")
        yield wait_for_interest_via(cluster, 2, 0, below)
        publisher.send(attr("/f/x/", "before"))
        yield got.wait(1)

        lost = when_lost(connection)
        regranted = next_grant(connection, got.lease)
        cluster[0].stop()
        yield lost
        self.assertFalse(connection.connected)
        yield connection.connect(retry=True).addTimeout(WAIT, reactor)  # fires once the link to node 1 is up
        self.assertEqual(connection.link.protocol.server_info["port"], cluster[1].port)
        seconds = yield regranted
        self.assertEqual(seconds, 60)
        self.assertTrue(got.lease.active())

        yield connection.flush()
        for each in (subject, below):  # re-registered: both subscriptions are on node 1 now
            yield wait_for_interest_via(cluster, 2, 1, each)
        publisher.send(attr("/f/", "after-own"))
        publisher.send(attr("/f/x/", "after-below"))
        yield got.wait(3)
        self.assertEqual(got.values(), ["before", "after-own", "after-below"])


class AuthTests(NatsBackendTestCase):

    def setUp(self):
        self.server = NatsServer(["--user", "alice", "--pass", "secret"])
        self.addCleanup(self.server.stop)

    @inlineCallbacks
    def test_right_password_connects(self):
        connection = yield self.client([self.server], "alice", password="secret")
        got = yield self.listen(connection, "/auth/")
        connection.send(attr("/auth/", "ok"))
        yield got.wait(1)
        self.assertEqual(got.values(), ["ok"])

    @inlineCallbacks
    def test_wrong_or_missing_password_is_login_failed_and_not_retried(self):
        for user, password in (("alice", "wrong"), ("bob", "secret"), ("alice", None)):
            connection = PsEPRConnection.from_urls(url(self.server), service=user, password=password)
            self.addCleanup(connection.close)
            with self.assertRaises(LoginFailed) as raised:
                yield connection.connect(retry=True)  # a daemon would retry anything else
            self.assertIn(f"service {user!r}", str(raised.exception))
            self.assertFalse(connection.connected)
            self.assertIsNone(connection._reconnect_call)  # nothing scheduled: given up for good
        self.assertEqual(self.server.monitor("varz")["total_connections"], 3)  # one attempt each


class LoginTimeoutTests(TestCase):

    def test_authentication_timeout_is_retried_not_login_failed(self):
        # nats-server answers "-ERR 'Authentication Timeout'" when CONNECT comes too late (a stalled
        # reactor): the credentials were never judged, so it is an ordinary failed attempt.
        def stalled(reactor, host, port, **options):
            return fail(NatsAuthorizationError("Authentication Timeout"))

        self.patch(backend_nats, "connect_nats", stalled)
        connection = PsEPRConnection.from_urls("nats://127.0.0.1:4222", service="alice", password=PASSWORD)
        self.addCleanup(connection.close)
        return self.assertFailure(connection.connect(retry=False), ConnectFailed)


@pytest.mark.usefixtures("nats_server")
class ClientSideRoutingTests(NatsBackendTestCase):
    """What the router does centrally, the NATS backend does in the receiving client."""

    @inlineCallbacks
    def test_events_for_another_service_or_instance_are_not_delivered(self):
        alice = yield self.client([self.nats_server], "alice", instance="node1")
        bob = yield self.client([self.nats_server], "bob", instance="node2")
        got = yield self.listen(alice, "/n/")
        bob.send(attr("/n/", "to-bob", to_service="bob"))
        bob.send(attr("/n/", "to-alice-node2", to_service="alice", to_instance="node2"))
        bob.send(attr("/n/x/", "to-node2", to_instance="node2"))
        bob.send(attr("/n/", "to-alice-node1", to_service="alice", to_instance="node1"))
        bob.send(attr("/n/", "marker"))
        yield got.wait(2)
        self.assertEqual(got.values(), ["to-alice-node1", "marker"])

    @inlineCallbacks
    def test_payload_type_filter(self):
        alice = yield self.client([self.nats_server])
        bob = yield self.client([self.nats_server], "bob")
        opaque = yield self.listen(alice, "/p/", "urn:dsmt:test")
        attributes = yield self.listen(alice, "/p/", ATTRIBUTE_NS)
        bob.send(Event("/p/q/", OpaquePayload.from_xml(b'<payload xmlns="urn:dsmt:test"><x>1</x></payload>')))
        bob.send(attr("/p/", "marker"))
        yield attributes.wait(1)
        yield opaque.wait(1)
        self.assertEqual(attributes.values(), ["marker"])
        self.assertEqual([(e.channel, e.payload_type) for e in opaque.events], [("/p/q/", "urn:dsmt:test")])

    @inlineCallbacks
    def test_unreadable_payloads_are_dropped_with_a_warning(self):
        alice = yield self.client([self.nats_server])
        got = yield self.listen(alice, "/j/")
        logged = LogCapture(self)
        raw = yield self.raw_client(self.nats_server)
        subject = channel_to_subject("/j/")
        junk = [
            b"", b"not xml at all", b"<event", b"\xff\xfe\x00<", b"<foo/>",
            b'<!DOCTYPE event [<!ENTITY x "y">]><event xmlns="http://psepr.org/xs/event"/>',
            event_to_xml(attr("/j/", "v")).replace(b"<channel>/j/</channel>", b"<channel>j</channel>"),
            event_to_xml(attr("/j/", "v")).replace(b"</event>", b""),
        ]
        for payload in junk:
            raw.publish(subject, payload)
        raw.publish(subject, event_to_xml(attr("/j/", "marker")))
        yield got.wait(1)
        self.assertEqual(got.values(), ["marker"])
        messages = logged.messages()
        self.assertEqual(len(messages), len(junk), messages)
        self.assertTrue(all(m.startswith("dropping an unreadable event on psepr.j: ") for m in messages), messages)
        bob = yield self.client([self.nats_server], "bob")  # the connection still works end to end
        bob.send(attr("/j/", "after"))
        yield got.wait(2)
        self.assertEqual(got.values(), ["marker", "after"])

    @inlineCallbacks
    def test_event_whose_channel_is_not_its_subject_is_dropped(self):
        alice = yield self.client([self.nats_server])
        root = yield self.listen(alice, "/")
        logged = LogCapture(self)
        raw = yield self.raw_client(self.nats_server)
        # A raw publisher puts /m/secret/'s event on /m/'s subject: leases on /m/secret/ would never see it,
        # a lease on / would see it under a channel it was not published on.
        raw.publish(channel_to_subject("/m/"), event_to_xml(attr("/m/secret/", "forged")))
        raw.publish(channel_to_subject("/m/"), event_to_xml(attr("/m/", "marker")))
        yield root.wait(1)
        self.assertEqual(root.values(), ["marker"])
        self.assertEqual(logged.messages(), ["dropping an event for /m/secret/ published on psepr.m, "
                                             "another channel's subject"])


@pytest.mark.usefixtures("nats_server")
class LeaseTests(NatsBackendTestCase):

    def subscriptions(self) -> int:
        return self.nats_server.monitor("subsz")["num_subscriptions"]

    @inlineCallbacks
    def test_grant_is_the_request_capped_at_the_default_maximum(self):
        alice = yield self.client([self.nats_server])
        short = alice.lease("/g/short/", 60)
        long = alice.lease("/g/long/", DEFAULT_MAX_LEASE_SECONDS * 24)
        before = reactor.seconds()
        yield short.ready
        yield long.ready
        self.assertEqual((short.granted, long.granted), (60, DEFAULT_MAX_LEASE_SECONDS))
        self.assertLess(abs(long.expires_at - before - DEFAULT_MAX_LEASE_SECONDS), 1)

    @inlineCallbacks
    def test_release_unsubscribes_both_subjects(self):
        alice = yield self.client([self.nats_server])
        bob = yield self.client([self.nats_server], "bob")
        base = self.subscriptions()
        kept = yield self.listen(alice, "/r/")
        gone = yield self.listen(alice, "/r/gone/")
        self.assertEqual(self.subscriptions(), base + 4)
        gone.lease.release()
        yield alice.flush()
        self.assertEqual(self.subscriptions(), base + 2)
        bob.send(attr("/r/gone/", "1"))
        bob.send(attr("/r/gone/x/", "2"))
        yield kept.wait(2)
        self.assertEqual(gone.values(), [])
        kept.lease.release()
        yield alice.flush()
        self.assertEqual(self.subscriptions(), base)

    @inlineCallbacks
    def test_renewal_keeps_the_same_subscriptions(self):
        alice = yield self.client([self.nats_server])
        bob = yield self.client([self.nats_server], "bob")
        base = self.subscriptions()
        got = yield self.listen(alice, "/renew/", seconds=1)
        first_expiry = got.lease.expires_at
        seconds = yield next_grant(alice, got.lease)  # renewed at 80 % of the second
        self.assertEqual(seconds, 1)
        self.assertGreater(got.lease.expires_at, first_expiry)
        yield alice.flush()
        self.assertEqual(self.subscriptions(), base + 2)  # not subscribed a second time
        bob.send(attr("/renew/", "1"))
        bob.send(attr("/renew/", "marker"))
        yield got.wait(2)
        self.assertEqual(got.values(), ["1", "marker"])  # once each


class MaxPayloadTests(NatsBackendTestCase):
    """nats-server 2.9 has no ``--max_payload`` flag: the limit comes from a configuration file."""

    LIMIT = 4096

    def start_server(self, max_payload):
        config = self.mktemp()
        with open(config, "w") as file:
            file.write(f"max_payload: {max_payload}\n")
        server = NatsServer(["-c", config])
        self.addCleanup(server.stop)
        return server

    @staticmethod
    def event_of(size, channel="/big/"):
        """An attribute event whose XML (as sent, with a sender) is exactly *size* bytes."""
        def make(n):
            return attr(channel, "x" * n, from_service="alice", from_instance="node1")
        overhead = len(event_to_xml(make(0)))
        event = make(size - overhead)
        assert len(event_to_xml(event)) == size
        return event

    @inlineCallbacks
    def test_event_over_max_payload_fails_clearly_and_the_connection_stays_up(self):
        server = self.start_server(self.LIMIT)
        alice = yield self.client([server])
        self.assertEqual(alice.link.protocol.server_info["max_payload"], self.LIMIT)
        got = yield self.listen(alice, "/big/")
        with self.assertRaises(EventTooLarge) as raised:
            alice.send(self.event_of(self.LIMIT + 1))
        self.assertIsInstance(raised.exception, PsEPRError)
        self.assertIsInstance(raised.exception, ValueError)
        self.assertIn(f"is {self.LIMIT + 1} bytes", str(raised.exception))
        self.assertIn(f"at most {self.LIMIT}", str(raised.exception))
        self.assertTrue(alice.connected)
        at_limit = self.event_of(self.LIMIT)
        alice.send(at_limit)
        alice.send(attr("/big/", "marker"))
        yield got.wait(2)
        self.assertEqual(got.events[0], at_limit)
        self.assertEqual(got.values()[1], "marker")
        yield alice.flush()
        self.assertTrue(alice.connected)

    @inlineCallbacks
    def test_event_over_the_event_limit_is_refused_even_if_the_server_takes_it(self):
        server = self.start_server(2 * MAX_EVENT_BYTES)  # every receiver would drop it as unreadable
        alice = yield self.client([server])
        got = yield self.listen(alice, "/big/")
        self.assertRaises(EventTooLarge, alice.send, self.event_of(MAX_EVENT_BYTES + 1))
        at_limit = self.event_of(MAX_EVENT_BYTES)
        alice.send(at_limit)
        yield got.wait(1)
        self.assertEqual(got.events, [at_limit])


@pytest.mark.usefixtures("nats_server")
class ConnectionLossTests(NatsBackendTestCase):

    @inlineCallbacks
    def test_send_and_lease_while_the_loss_is_being_reported_are_queued_not_raised(self):
        # A flush() errback runs while the NATS connection is being torn down, before the
        # connection has been told: what it sends or leases must be queued, not raise.
        alice = yield self.client([self.nats_server], retry=True)
        pending = alice.flush()
        lost = when_lost(alice)
        self.nats_server.stop()
        with self.assertRaises(ConnectionError):
            yield pending
        alice.send(attr("/q/", "queued"))
        lease = alice.lease("/q/", 60)
        self.assertFalse(alice.connected)
        self.assertEqual(alice.queued, 1)
        self.assertIn(lease.identifier, alice.leases)
        yield lost

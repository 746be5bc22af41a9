"""PsEPR end to end over real sockets, on both backends: the embedded router and nats-server.

Non-delivery is proven without sleeping: after the events that must not
arrive, the publisher sends a marker that must; events from one publisher
arrive in order, so once the marker is in, anything else would have been too.
"""
import pytest
from twisted.internet import defer
from twisted.trial import unittest

from dsmt.transports.psepr.event import ATTRIBUTE_NS, Event, OpaquePayload
from tests.support.psepr import NatsHarness, RouterHarness, connect, listen


def attr(channel, value, **addressing):
    return Event.attribute(channel, "status", value, **addressing)


class DeliveryTests:
    """The contract every backend keeps.  Subclasses provide ``make_harness``."""

    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.harness = yield self.make_harness().start()
        self.connections = []

    @defer.inlineCallbacks
    def tearDown(self):
        for connection in self.connections:
            connection.close()
        yield self.harness.stop()

    @defer.inlineCallbacks
    def client(self, user="alice", instance="node1"):
        connection = yield connect(self.harness.url, user, instance=instance)
        self.connections.append(connection)
        return connection

    def listen(self, connection, channel, payload_type=None):
        return listen(connection, channel, payload_type)

    @defer.inlineCallbacks
    def test_subtree_delivery_and_siblings(self):
        sub = yield self.client("alice")
        pub = yield self.client("bob")
        got = yield self.listen(sub, "/org/dsmt/ns/deployment/xyz1/")
        for channel in ("/org/dsmt/ns/deployment/xyz1/", "/org/dsmt/ns/deployment/xyz1/c/status/h/",
                        "/org/dsmt/ns/deployment/xyz10/", "/org/dsmt/ns/deployment/xyz1.evil/",
                        "/org/dsmt/ns/deployment/", "/org/dsmt/ns/deployment/xyz1/marker/"):
            pub.send(attr(channel, channel))
        yield got.wait(3)
        self.assertEqual(got.values(), ["/org/dsmt/ns/deployment/xyz1/",
                                         "/org/dsmt/ns/deployment/xyz1/c/status/h/",
                                         "/org/dsmt/ns/deployment/xyz1/marker/"])
        first = got.events[0]
        self.assertEqual((first.from_service, first.from_instance), ("bob", "node1"))

    @defer.inlineCallbacks
    def test_root_lease_receives_everything(self):
        sub = yield self.client()
        pub = yield self.client("bob")
        got = yield self.listen(sub, "/")
        pub.send(attr("/a/", "1"))
        pub.send(attr("/b/c/", "2"))
        yield got.wait(2)
        self.assertEqual(got.values(), ["1", "2"])

    @defer.inlineCallbacks
    def test_payload_type_filter(self):
        sub = yield self.client()
        pub = yield self.client("bob")
        attrs = yield self.listen(sub, "/t/", ATTRIBUTE_NS)
        others = yield self.listen(sub, "/t/", "urn:dsmt:test")
        pub.send(Event("/t/", OpaquePayload.from_xml(b'<payload xmlns="urn:dsmt:test"><x>1</x></payload>')))
        pub.send(attr("/t/", "marker"))
        yield attrs.wait(1)
        yield others.wait(1)
        self.assertEqual(attrs.values(), ["marker"])
        self.assertEqual([e.payload_type for e in others.events], ["urn:dsmt:test"])

    @defer.inlineCallbacks
    def test_service_and_instance_narrowing(self):
        a1 = yield self.client("alice", "node1")
        a2 = yield self.client("alice", "node2")
        c1 = yield self.client("carol", "node1")
        pub = yield self.client("bob")
        got = {}
        for name, conn in (("a1", a1), ("a2", a2), ("c1", c1)):
            got[name] = yield self.listen(conn, "/n/")
        pub.send(attr("/n/", "to-alice", to_service="alice"))
        pub.send(attr("/n/", "to-node1", to_instance="node1"))
        pub.send(attr("/n/", "to-alice-node2", to_service="alice", to_instance="node2"))
        pub.send(attr("/n/", "all"))
        for collector, count in ((got["a1"], 3), (got["a2"], 3), (got["c1"], 2)):
            yield collector.wait(count)
        self.assertEqual(got["a1"].values(), ["to-alice", "to-node1", "all"])
        self.assertEqual(got["a2"].values(), ["to-alice", "to-alice-node2", "all"])
        self.assertEqual(got["c1"].values(), ["to-node1", "all"])

    @defer.inlineCallbacks
    def test_overlapping_leases_each_get_the_event_once(self):
        sub = yield self.client()
        pub = yield self.client("bob")
        outer = yield self.listen(sub, "/o/")
        inner = yield self.listen(sub, "/o/i/")
        pub.send(attr("/o/i/x/", "1"))
        pub.send(attr("/o/", "2"))
        yield outer.wait(2)
        yield inner.wait(1)
        self.assertEqual(outer.values(), ["1", "2"])
        self.assertEqual(inner.values(), ["1"])

    @defer.inlineCallbacks
    def test_release_stops_delivery(self):
        sub = yield self.client()
        pub = yield self.client("bob")
        gone = yield self.listen(sub, "/r/gone/")
        kept = yield self.listen(sub, "/r/")
        gone.lease.release()
        yield sub.flush()
        pub.send(attr("/r/gone/", "1"))
        yield kept.wait(1)
        self.assertEqual(gone.values(), [])

    @defer.inlineCallbacks
    def test_a_sender_with_a_lease_hears_itself(self):
        sub = yield self.client()
        got = yield self.listen(sub, "/self/")
        sub.send(attr("/self/", "echo"))
        yield got.wait(1)
        self.assertEqual(got.values(), ["echo"])

    async def test_async_iteration(self):
        sub, pub = await self.client(), await self.client("bob")
        lease = sub.lease("/it/", 60)
        await lease.ready
        await sub.flush()
        for n in range(3):
            pub.send(attr("/it/", str(n)))
        seen = []
        async for event in lease:
            seen.append(event.payload.value)
            if len(seen) == 3:
                break
        self.assertEqual(seen, ["0", "1", "2"])

    @defer.inlineCallbacks
    def test_large_event_near_the_limit(self):
        sub = yield self.client()
        pub = yield self.client("bob")
        got = yield self.listen(sub, "/big/")
        pub.send(attr("/big/", "x" * (900 * 1024)))
        yield got.wait(1)
        self.assertEqual(len(got.values()[0]), 900 * 1024)


class RouterDeliveryTests(DeliveryTests, unittest.TestCase):
    def make_harness(self):
        return RouterHarness()


@pytest.mark.usefixtures("nats_server")
class NatsDeliveryTests(DeliveryTests, unittest.TestCase):
    def make_harness(self):
        return NatsHarness(self.nats_server)

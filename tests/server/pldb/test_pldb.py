"""PLDB: the store (pure), the wire payloads, and the service end to end with a real router."""
import pytest
from twisted.internet import defer
from twisted.trial import unittest

from dsmt.client.pldb import query_pldb
from dsmt.server.pldb.daemon import PldbService
from dsmt.server.pldb.store import PldbStore
from dsmt.transports.psepr.client import PsEPRConnection
from dsmt.transports.psepr.event import Event, EventError, OpaquePayload
from dsmt.transports.psepr.pldbwire import (
    MAX_PART_BYTES, PLDBATTRLIST_NS, PLDBGET_NS, PldbAttr, PldbQuery, parse_query, parse_reply, reply_parts)
from tests.support.psepr import PASSWORD, Collector, RouterHarness, connect


# ---------------------------------------------------------------- store

def test_store_keeps_the_newest_value_per_channel_and_field(tmp_path):
    store = PldbStore(str(tmp_path / "pldb.sqlite"))
    store.record(PldbAttr("/s/a/", "status", "requested", 1.0, "svc", "n1"))
    store.record(PldbAttr("/s/a/", "status", "running", 2.0, "svc", "n1"))
    store.record(PldbAttr("/s/a/", "load", "0.5", 2.0))
    store.record(PldbAttr("/s/b/", "status", "failed", 3.0))
    store.record(PldbAttr("/s_x/", "status", "sibling", 3.0))
    store.record(PldbAttr("/s0/", "status", "sibling", 3.0))
    assert [(a.channel, a.field, a.value) for a in store.query("/s/", now=10)] == [
        ("/s/a/", "load", "0.5"), ("/s/a/", "status", "running"), ("/s/b/", "status", "failed")]
    assert [a.value for a in store.query("/s/", "status", now=10)] == ["running", "failed"]
    assert len(store.query("/", now=10)) == 5
    store.close()
    reopened = PldbStore(str(tmp_path / "pldb.sqlite"))
    assert len(reopened) == 5


def test_store_leaves_out_expired_values(tmp_path):
    store = PldbStore(str(tmp_path / "pldb.sqlite"))
    store.record(PldbAttr("/a/", "x", "1", 100.0, expire=90))
    store.record(PldbAttr("/a/", "y", "2", 100.0))
    assert [a.field for a in store.query("/a/", now=189.9)] == ["x", "y"]
    assert [a.field for a in store.query("/a/", now=190.0)] == ["y"]


# ---------------------------------------------------------------- payloads

def test_query_round_trip_and_validation():
    query = PldbQuery("q1", "/a/", "/r/q1/", "status")
    assert parse_query(query.payload()) == query
    with pytest.raises(EventError, match="reply channel"):
        PldbQuery("q1", "/a/", "r")
    with pytest.raises(EventError, match="missing"):
        parse_query(OpaquePayload.from_xml(f'<payload xmlns="{PLDBGET_NS}"><query>q</query></payload>'.encode()))
    with pytest.raises(EventError, match="not a PLDB query"):
        parse_query(OpaquePayload.from_xml(b'<payload xmlns="urn:x"/>'))


def test_reply_parts_round_trip_and_split():
    attrs = [PldbAttr(f"/a/{n}/", "f", "v" * 2000 + "<&>", 1.5, "svc", None, 90) for n in range(600)]
    payloads = reply_parts("q", attrs)
    assert len(payloads) > 1 and all(len(p.xml) <= MAX_PART_BYTES + 4096 for p in payloads)
    replies = [parse_reply(p) for p in payloads]
    assert [r.part for r in replies] == list(range(1, len(payloads) + 1))
    assert [a for r in replies for a in r.attrs] == attrs
    empty = parse_reply(reply_parts("q", [])[0])
    assert (empty.part, empty.parts, empty.attrs) == (1, 1, ())


@pytest.mark.parametrize("body, complaint", [
    ("<query>q</query><part>2</part><parts>1</parts>", "out of range"),
    ("<query>q</query><part>1</part><parts>99999</parts>", "out of range"),
    ("<query>q</query><part>x</part><parts>1</parts>", "integer"),
    ("<query>q</query><part>1</part><parts>1</parts><attr><channel>/a/</channel><field>f</field>"
     "<value>v</value><time>soon</time></attr>", "number"),
])
def test_hostile_replies_are_refused(body, complaint):
    with pytest.raises(EventError, match=complaint):
        parse_reply(OpaquePayload.from_xml(f'<payload xmlns="{PLDBATTRLIST_NS}">{body}</payload>'.encode()))


# ---------------------------------------------------------------- service

class PldbServiceTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.router = yield RouterHarness().start()
        self.db = self.mktemp() + ".sqlite"
        self.clients = []
        self.pldb = None

    @defer.inlineCallbacks
    def tearDown(self):
        if self.pldb is not None and self.pldb.running:
            self.pldb.stopService()
        for client in self.clients:
            client.close()
        yield self.router.stop()

    @defer.inlineCallbacks
    def start_pldb(self):
        connection = PsEPRConnection.from_urls(self.router.url, service="pldb", password=PASSWORD, instance="db1")
        self.pldb = PldbService(connection, PldbStore(self.db), ["/org/dsmt/ns/deployment/"])
        self.pldb.startService()
        yield defer.DeferredList([lease.ready for lease in self.pldb.leases], fireOnOneErrback=True)
        yield connection.flush()

    @defer.inlineCallbacks
    def client(self, user="alice"):
        connection = yield connect(self.router.url, user)
        self.clients.append(connection)
        return connection

    @defer.inlineCallbacks
    def publish_and_settle(self, publisher, events):
        """Send events; return once PLDB has recorded them (a second listener sees the last one)."""
        seen = Collector()
        lease = publisher.lease("/org/dsmt/ns/deployment/", 60, callback=seen)
        yield lease.ready
        yield publisher.flush()
        for event in events:
            publisher.send(event)
        yield seen.wait(len(events))
        yield self.pldb.connection.flush()  # PLDB handled everything routed before this round trip
        lease.release()

    @defer.inlineCallbacks
    def test_replays_last_values_and_survives_restart(self):
        yield self.start_pldb()
        publisher = yield self.client("bob")
        channel = "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-mgr/status/"
        events = [Event.attribute(channel, "deployment-status", f"hostname=h{n % 2},status={s}", expire=900)
                  for n, s in enumerate(["requested", "requested", "instantiated", "running"])]
        events[2] = Event.attribute(channel + "h0/", "deployment-status", "status=instantiated")
        yield self.publish_and_settle(publisher, events)
        self.assertEqual(self.pldb.recorded, 4)

        querier = yield self.client("carol")
        result = yield defer.ensureDeferred(query_pldb(querier, "/org/dsmt/ns/deployment/xyz1/", timeout=5))
        self.assertTrue(result.complete)
        self.assertEqual([(a.channel, a.value, a.from_service) for a in result.attrs], [
            (channel, "hostname=h1,status=running", "bob"),
            (channel + "h0/", "status=instantiated", "bob")])

        self.pldb.stopService()
        yield self.start_pldb()  # same database file
        result = yield defer.ensureDeferred(query_pldb(querier, "/org/dsmt/ns/deployment/xyz1/", timeout=5))
        self.assertEqual(len(result.attrs), 2)
        narrowed = yield defer.ensureDeferred(
            query_pldb(querier, channel + "h0/", field="deployment-status", timeout=5))
        self.assertEqual([a.value for a in narrowed.attrs], ["status=instantiated"])

    @defer.inlineCallbacks
    def test_query_with_nothing_stored_gets_an_empty_complete_answer(self):
        yield self.start_pldb()
        querier = yield self.client("carol")
        result = yield defer.ensureDeferred(query_pldb(querier, "/org/dsmt/ns/deployment/none/", timeout=5))
        self.assertTrue(result.complete)
        self.assertEqual(result.attrs, [])

    @defer.inlineCallbacks
    def test_no_pldb_means_no_answer_after_the_timeout(self):
        querier = yield self.client("carol")
        result = yield defer.ensureDeferred(query_pldb(querier, "/org/dsmt/ns/deployment/", timeout=0.2))
        self.assertIsNone(result.parts_expected)
        self.assertFalse(result.complete)

    @defer.inlineCallbacks
    def test_malformed_query_is_ignored_and_pldb_keeps_answering(self):
        yield self.start_pldb()
        querier = yield self.client("carol")
        querier.send(Event("/org/dsmt/ns/pldb/query/", OpaquePayload.from_xml(
            f'<payload xmlns="{PLDBGET_NS}"><query>q</query></payload>'.encode())))
        result = yield defer.ensureDeferred(query_pldb(querier, "/org/dsmt/ns/deployment/", timeout=5))
        self.assertTrue(result.complete)
        self.assertEqual(self.pldb.answered, 1)

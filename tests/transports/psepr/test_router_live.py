"""The embedded router over real sockets on 127.0.0.1: what only a live router shows.

Leases capped by ``max_lease``, refused logins, unreachable routers, clients
re-leasing after a router restart, the slow-consumer policy, hostile bytes on
raw connections, the login timeout and the statistics channel.

Nothing sleeps: tests wait on Deferreds — a lease's ``ready``, a ``flush()``
round trip, a :class:`~tests.support.psepr.Collector`, a raw connection's
close.  Non-delivery is proven with a marker event sent after the events that
must not arrive (events from one publisher arrive in order).  Time-dependent
behaviour (the login timeout) runs on a :class:`task.Clock` given to the
router while its sockets stay real.
"""
from __future__ import annotations

import socket

from lxml import etree
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from dsmt.transports.psepr import stream
from dsmt.transports.psepr.client import ConnectFailed, LoginFailed
from dsmt.transports.psepr.event import Event, LeasePayload, event_to_xml, parse_event
from dsmt.transports.psepr.router import ROUTER_SERVICE, STATS_CHANNEL, RouterProtocol
from tests.support.psepr import PASSWORD, RouterHarness, connect, listen


def attr(channel: str, value: str, **addressing) -> Event:
    return Event.attribute(channel, "status", value, **addressing)


def login_bytes(user: str = "carol", resource: str = "raw") -> bytes:
    return stream.stream_header(to="psepr") + stream.auth_request("login", user, PASSWORD, resource)


def stream_error_of(raw: bytes) -> str:
    """The condition of a ``<stream:error>`` as cut from the stream (its prefix is declared by the header)."""
    error = etree.fromstring(b"<s xmlns:stream='%s'>" % stream.NS_STREAMS.encode() + raw + b"</s>")[0]
    ns = "{%s}" % stream.NS_STREAM_ERRORS
    (condition,) = [child.tag[len(ns):] for child in error if child.tag != ns + "text"]
    return condition


def free_port() -> int:
    """A port nothing listens on (bound once by the kernel's choice, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def router_side(core, username: str) -> RouterProtocol:
    """The router's protocol object serving ``username`` (white box: found through its session)."""
    (session,) = [session for session in core.sessions if session.username == username]
    return session._send.__self__


class RawPeer(protocol.Protocol):
    """A bare TCP client: writes whatever the test says, parses what the router sends back.

    ``closed`` fires with the reason (an exception, as a result) once the connection is gone.  By default
    the peer closes its side when the router closes the stream, as a client
    should; with ``close_on_stream_close=False`` only the router can end it.
    """

    def __init__(self, close_on_stream_close: bool = True):
        self.close_on_stream_close = close_on_stream_close
        self.parser = stream.StreamParser()
        self.items: list = []
        self.broken: stream.StreamError | None = None
        self.closed = defer.Deferred()
        self._waiters: list = []

    def dataReceived(self, data):
        if self.broken is not None:
            return
        try:
            self.items += self.parser.feed(data)
        except stream.StreamError as exc:
            self.broken = exc
        for predicate, waiter in list(self._waiters):
            if predicate(self.items):
                self._waiters.remove((predicate, waiter))
                waiter.callback(self.items)
        if self.close_on_stream_close and stream.StreamClosed() in self.items:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        waiters, self._waiters = self._waiters, []
        for _, waiter in waiters:
            waiter.errback(AssertionError(f"connection closed first; received {self.items!r}"))
        self.closed.callback(reason.value)

    def until(self, predicate) -> defer.Deferred:
        """Fires once ``predicate(items)`` holds (fails if the connection closes first)."""
        if predicate(self.items):
            return defer.succeed(self.items)
        waiter = defer.Deferred()
        self._waiters.append((predicate, waiter))
        return waiter

    def stanzas(self) -> list[stream.Stanza]:
        return [item for item in self.items if isinstance(item, stream.Stanza)]

    def ended_with_stream_error(self) -> str:
        """Check the router ended this stream properly: header, one stream error, its close, nothing after."""
        if self.broken is not None:
            raise AssertionError(f"router sent a broken stream: {self.broken}")
        kinds = [type(item) for item in self.items]
        assert kinds[0] is stream.StreamOpened and kinds[-2:] == [stream.Stanza, stream.StreamClosed], self.items
        assert self.items[-2].name == stream.STREAM_ERROR_NAME, self.items[-2]
        return stream_error_of(self.items[-2].raw)


def logged_in(items) -> bool:
    return any(isinstance(item, stream.Stanza) and item.name == "iq" for item in items)


class RouterTestCase(unittest.TestCase):
    """A fresh router per test, with helpers for logged-in clients and raw connections."""

    timeout = 20

    def harness_options(self) -> dict:
        return {}

    @defer.inlineCallbacks
    def setUp(self):
        self.harness = yield RouterHarness(**self.harness_options()).start()
        self.connections = []
        self.raw_peers = []

    @defer.inlineCallbacks
    def tearDown(self):
        for connection in self.connections:
            connection.close()
        for peer in self.raw_peers:
            if peer.transport.connected:
                peer.transport.abortConnection()
        yield self.harness.stop()
        yield defer.gatherResults([peer.closed for peer in self.raw_peers])

    @property
    def core(self):
        return self.harness.core

    @defer.inlineCallbacks
    def clients(self, *users: str, retry: bool = False):
        """Logged-in connections, one per ``user`` (logins checked in parallel: each costs a scrypt)."""
        connections = yield defer.gatherResults(
            [connect(self.harness.url, user, retry=retry) for user in users], consumeErrors=True)
        self.connections += connections
        return connections

    def listen(self, connection, channel: str, payload_type: str | None = None):
        return listen(connection, channel, payload_type)

    @defer.inlineCallbacks
    def raw(self, data: bytes = b"", **options):
        """A raw TCP connection to the router that has sent ``data``."""
        peer = RawPeer(**options)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.harness.port.getHost().port), peer)
        self.raw_peers.append(peer)
        peer.transport.setTcpNoDelay(True)
        if data:
            peer.transport.write(data)
        return peer


class LeaseAndLoginTests(RouterTestCase):
    def harness_options(self):
        return {"max_lease": 5}

    @defer.inlineCallbacks
    def test_grant_is_capped_by_max_lease(self):
        (sub,) = yield self.clients("alice")
        lease = sub.lease("/cap/", 60)
        yield lease.ready
        self.assertEqual(lease.granted, 5)
        (held,) = self.core.leases.leases_of(next(iter(self.core.sessions)))
        self.assertEqual(held.duration, 5)

    @defer.inlineCallbacks
    def test_wrong_password_is_login_failed(self):
        yield self.assertFailure(connect(self.harness.url, "alice", password="wrong"), LoginFailed)
        self.assertEqual(self.core.counters.login_failures, 1)

    @defer.inlineCallbacks
    def test_closed_port_is_connect_failed(self):
        yield self.assertFailure(connect(f"psepr://127.0.0.1:{free_port()}", retry=False), ConnectFailed)

    @defer.inlineCallbacks
    def test_stats_channel(self):
        (sub,) = yield self.clients("alice")
        got = yield self.listen(sub, "/org/dsmt/ns/psepr/router/")
        expected = self.core.stats()
        self.assertEqual(self.core.publish_stats(), len(expected))
        yield got.wait(len(expected))
        self.assertEqual({e.payload.field: e.payload.value for e in got.events},
                         {name: str(value) for name, value in expected.items()})
        self.assertEqual({(e.channel, e.from_service) for e in got.events}, {(STATS_CHANNEL, ROUTER_SERVICE)})
        self.assertEqual(expected["connections"], 1)
        self.assertEqual(expected["leases"], 1)


@defer.inlineCallbacks
def reconnected(connection, old_link, rounds: int = 50):
    """Fires once ``connection`` runs on a link other than ``old_link`` and the router answered a flush on it.

    A connection registers its leases again as soon as its new link is up, so
    after that flush the router has granted them.  Every round waits for
    something (a connect, a flush that fails once the old link notices the
    router is gone); ``rounds`` only bounds a connection that never comes back.
    """
    for _ in range(rounds):
        link = connection.link
        if link is None:
            yield connection.connect()
            continue
        try:
            yield connection.flush()
        except ConnectionError:
            continue
        if link is not old_link:
            return
    raise AssertionError(f"{connection} did not reconnect")


class RestartTests(RouterTestCase):
    @defer.inlineCallbacks
    def test_clients_reconnect_and_lease_again_after_a_restart(self):
        sub, pub = yield self.clients("alice", "bob", retry=True)
        got = yield self.listen(sub, "/restart/")
        pub.send(attr("/restart/", "before"))
        yield got.wait(1)
        old_sub, old_pub = sub.link, pub.link
        yield self.harness.stop()  # drops every session, as a crashed router would
        self.assertEqual(len(self.core.leases), 0)
        yield self.harness.start()  # a new router on the same port: it knows no lease
        self.assertEqual(len(self.core.leases), 0)
        yield reconnected(sub, old_sub)
        yield reconnected(pub, old_pub)
        self.assertEqual(len(self.core.leases), 1)
        pub.send(attr("/restart/", "after"))
        yield got.wait(2)
        self.assertEqual(got.values(), ["before", "after"])
        self.assertTrue(got.lease.active())


class SlowConsumerTests(RouterTestCase):
    #: Most bytes published while waiting for the slow consumer to be dropped.
    BUDGET = 64 * 1024 * 1024
    #: Bytes published per round trip: far below what would make a reading client lag.
    BATCH_EVENTS, EVENT_BYTES = 8, 4000

    def harness_options(self):
        return {"max_output_buffer": 64 * 1024}

    @defer.inlineCallbacks
    def test_client_that_stops_reading_is_dropped_and_others_get_everything(self):
        slow, good, pub = yield self.clients("alice", "carol", "bob")
        yield self.listen(slow, "/s/")
        good_got = yield self.listen(good, "/s/")
        # small kernel buffers on both sides, so the router's own buffer fills quickly
        slow.link.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        router_side(self.core, "alice").transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        slow.link.transport.pauseProducing()  # the slow client stops reading its socket
        padding = "x" * self.EVENT_BYTES
        sent = published = 0
        while self.core.counters.slow_consumer_drops == 0 and sent < self.BUDGET:
            for _ in range(self.BATCH_EVENTS):
                pub.send(attr("/s/", f"{published}:{padding}"))
                published += 1
                sent += self.EVENT_BYTES
            yield pub.flush()
        self.assertEqual(self.core.counters.slow_consumer_drops, 1, f"no drop after {sent} bytes")
        self.assertNotIn("alice", [session.username for session in self.core.sessions])
        self.assertEqual([lease.service for lease in self.core.leases.leases_of(
            next(s for s in self.core.sessions if s.username == "carol"))], ["carol"])
        self.assertEqual(len(self.core.leases), 1)
        pub.send(attr("/s/", "marker"))
        yield good_got.wait(published + 1)
        self.assertEqual([value.split(":")[0] for value in good_got.values()],
                         [str(n) for n in range(published)] + ["marker"])
        self.assertEqual(self.core.counters.slow_consumer_drops, 1)
        self.assertTrue(pub.connected and good.connected)


class LaggingClientTests(RouterTestCase):
    @defer.inlineCallbacks
    def test_session_ending_while_its_client_lags_still_closes_the_connection(self):
        """The router closes a session while megabytes wait for its client: once read, the socket closes."""
        (pub,) = yield self.clients("bob")
        lagging = yield self.raw(login_bytes("carol"), close_on_stream_close=False)
        yield lagging.until(logged_in)
        lagging.transport.write(stream.wrap_message(event_to_xml(
            Event("/lag/", LeasePayload("l1", 60), from_service="carol"))) + stream.ping_request("p"))
        yield lagging.until(lambda items: len(items) == 4)  # header, login result, grant, ping result
        lagging.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server = router_side(self.core, "carol")
        server.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        lagging.transport.pauseProducing()
        published = 0
        while not server._paused and published < 2000:  # 2000 × 4 KB stays under max_output_buffer
            for _ in range(8):
                pub.send(attr("/lag/", f"{published}:" + "x" * 4000))
                published += 1
            yield pub.flush()
        self.assertTrue(server._paused, "the router never had to buffer for the lagging client")
        yield self.harness.stop()  # closes every session (the router shutting down)
        lagging.transport.resumeProducing()
        reason = yield lagging.closed
        self.assertIsInstance(reason, error.ConnectionDone)
        self.assertIsNone(lagging.broken)
        self.assertEqual(lagging.items[-1], stream.StreamClosed())
        events = [parse_event(s.raw) for s in lagging.stanzas()[3:]]  # after login result, grant, ping result
        self.assertEqual(len(events), published)


class HostileInputTests(RouterTestCase):
    CASES = [
        ("http request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not-well-formed"),
        ("binary garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)), "not-well-formed"),
        ("billion laughs", b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
         + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
                    for i in range(1, 10))
         + b"]><lolz>&lol9;</lolz>", "restricted-xml"),
        ("DTD after login", login_bytes("alice") + b'<!DOCTYPE x [<!ENTITY a "b">]>', "not-well-formed"),
        ("2 MiB stanza", login_bytes("alice") + b"<message><body>" + b"x" * (2 * 1024 * 1024)
         + b"</body></message>", "policy-violation"),
    ]

    @defer.inlineCallbacks
    def test_hostile_bytes_end_that_connection_only(self):
        sub, pub = yield self.clients("carol", "bob")
        got = yield self.listen(sub, "/h/")
        for number, (name, data, condition) in enumerate(self.CASES):
            peer = yield self.raw(data)
            yield peer.closed
            self.assertEqual(peer.ended_with_stream_error(), condition, name)
            pub.send(attr("/h/", name))
            yield got.wait(number + 1)
        self.assertEqual(got.values(), [name for name, _, _ in self.CASES])
        self.assertEqual(self.core.counters.protocol_errors, len(self.CASES))
        self.assertEqual(len(self.core.sessions), 2)
        self.assertEqual(len(self.core.leases), 1)

    @defer.inlineCallbacks
    def test_client_learns_the_condition_of_a_stream_error(self):
        """A PsEPRConnection whose stream the router ends reports the stream error's condition and text."""
        (client,) = yield self.clients("alice")
        client.link.transport.write(b"<!-- not allowed -->")  # as if the client's own bytes were broken
        failure = yield self.assertFailure(client.flush(), ConnectionError)
        self.assertIn("router ended the stream: restricted-xml: comment not allowed", str(failure))
        self.assertEqual(self.core.counters.protocol_errors, 1)

    @defer.inlineCallbacks
    def test_login_trickled_one_byte_per_reactor_turn_works(self):
        sub, pub = yield self.clients("carol", "bob")
        got = yield self.listen(sub, "/t/")
        peer = yield self.raw()
        for byte in login_bytes("alice"):
            peer.transport.write(bytes([byte]))
            yield task.deferLater(reactor, 0, lambda: None)  # one reactor turn: the byte goes out alone
        yield peer.until(logged_in)
        self.assertEqual(peer.stanzas()[0].raw, stream.auth_result("login"))
        event = stream.wrap_message(event_to_xml(attr("/t/", "trickled", from_service="alice")))
        peer.transport.write(event)
        yield got.wait(1)
        self.assertEqual(got.values(), ["trickled"])


class LoginTimeoutTests(RouterTestCase):
    def harness_options(self):
        self.clock = task.Clock()
        return {"clock": self.clock, "login_timeout": 5}

    @defer.inlineCallbacks
    def test_connection_without_login_is_timed_out_and_logged_in_clients_stay(self):
        (client,) = yield self.clients("alice")  # logs in (checked in a thread), then sends nothing
        silent = yield self.raw(stream.stream_header(to="psepr"))
        yield silent.until(lambda items: items)  # the router's header: the session and its timer exist
        self.clock.advance(4.9)
        self.assertEqual(self.core.counters.connections, 2)
        self.clock.advance(0.1)
        self.assertEqual(self.core.counters.connections, 1)
        yield silent.closed
        self.assertEqual(silent.ended_with_stream_error(), "connection-timeout")
        self.clock.advance(60)
        yield client.flush()  # still connected: its login stopped its timer
        self.assertTrue(client.connected)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # only the lease reaper is left

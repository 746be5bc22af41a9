"""PsEPRConnection's own logic on a fake link and a fake clock: grants, renewal, retries,
queueing, reconnection with backoff and failover, and per-lease delivery."""
import random

import pytest
from twisted.internet import defer, task

from dsmt.transports.psepr.client import (
    BACKOFF_MAX, LEASE_RETRIES, LEASE_RETRY_SECONDS, ConnectFailed, ConnectionClosed, EventTooLarge,
    LeaseRefused,
    LoginFailed, PsEPRConnection, SendQueueFull, parse_url)
from dsmt.transports.psepr.event import Event


class FakeLink:
    def __init__(self, handler):
        self.handler = handler
        self.sent = []
        self.requests = []
        self.released = []
        self.closed = False

    def send(self, event, xml):
        self.sent.append(event)

    def request_lease(self, identifier, channel, seconds, payload_type):
        self.requests.append((identifier, channel, seconds, payload_type))

    def release_lease(self, identifier, channel):
        self.released.append(identifier)

    def flush(self):
        return defer.succeed(None)

    def close(self):
        self.closed = True


class FakeBackend:
    """Each connect() waits until the test answers it with up() / down() / refuse()."""

    def __init__(self):
        self.attempts = []

    def connect(self, reactor, address, handler):
        d = defer.Deferred()
        self.attempts.append((address, handler, d))
        return d

    def up(self):
        address, handler, d = self.attempts[-1]
        link = FakeLink(handler)
        d.callback(link)
        return link

    def down(self, why="connection refused"):
        self.attempts[-1][2].errback(ConnectionRefusedError(why))

    def refuse(self):
        self.attempts[-1][2].errback(LoginFailed("wrong password"))


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def backend():
    return FakeBackend()


def make(clock, backend, urls="psepr://a:1,psepr://b:2", **kwargs):
    conn = PsEPRConnection.from_urls(urls, service="svc", password="pw", instance="node1", reactor=clock,
                                     rng=random.Random(7), **kwargs)
    conn.backend = backend
    return conn


def attr(channel, value="v"):
    return Event.attribute(channel, "f", value)


def test_urls():
    assert str(parse_url("psepr://127.0.0.1")) == "psepr://127.0.0.1:23345"
    assert str(parse_url("nats://h:4333")) == "nats://h:4333"
    for bad in ("http://h", "psepr://", "psepr://h:99999", "psepr://h/path", "psepr://u@h"):
        with pytest.raises(ValueError):
            parse_url(bad)
    with pytest.raises(ValueError, match="same backend"):
        PsEPRConnection.from_urls("psepr://a,nats://b", service="s")


def test_grant_renewal_at_80_percent(clock, backend):
    conn = make(clock, backend)
    conn.connect()
    link = backend.up()
    lease = conn.lease("/a/", 100)
    assert link.requests == [(lease.identifier, "/a/", 100, None)]
    conn.link_granted(lease.identifier, 50)
    assert lease.ready.called and lease.granted == 50
    clock.advance(39.9)
    assert len(link.requests) == 1
    clock.advance(0.1)
    assert len(link.requests) == 2  # renewed at 80 % of the granted 50 s


def test_unanswered_lease_request_is_retried_then_refused(clock, backend):
    conn = make(clock, backend)
    conn.connect()
    link = backend.up()
    lease = conn.lease("/a/", 100)
    failures = []
    lease.ready.addErrback(failures.append)
    for _ in range(LEASE_RETRIES - 1):
        clock.advance(LEASE_RETRY_SECONDS)
    assert len(link.requests) == LEASE_RETRIES
    clock.advance(LEASE_RETRY_SECONDS)
    assert failures and failures[0].check(LeaseRefused)
    assert "no answer" in failures[0].getErrorMessage()
    assert lease.identifier not in conn.leases


def test_refusal_fails_ready_with_the_reason(clock, backend):
    conn = make(clock, backend)
    conn.connect()
    backend.up()
    lease = conn.lease("/a/", 100)
    failures = []
    lease.ready.addErrback(failures.append)
    conn.link_refused(lease.identifier, "holder already has 3 leases")
    assert "3 leases" in failures[0].getErrorMessage()


def test_events_go_to_each_matching_lease_once(clock, backend):
    conn = make(clock, backend)
    conn.connect()
    backend.up()
    got = {"a": [], "ab": [], "typed": [], "other": []}
    leases = {
        "a": conn.lease("/a/", 60, callback=got["a"].append),
        "ab": conn.lease("/a/b/", 60, callback=got["ab"].append),
        "typed": conn.lease("/a/", 60, "urn:x", callback=got["typed"].append),
        "other": conn.lease("/z/", 60, callback=got["other"].append),
    }
    for lease in leases.values():
        conn.link_granted(lease.identifier, 60)
    event = attr("/a/b/c/")
    conn.link_event(event)
    assert got == {"a": [event], "ab": [event], "typed": [], "other": []}
    conn.link_event(event, leases["ab"].identifier)  # a backend that knows which lease it came for
    assert len(got["ab"]) == 2 and len(got["a"]) == 1


def test_lapsed_lease_receives_nothing(clock, backend):
    conn = make(clock, backend)
    conn.connect()
    link = backend.up()
    got = []
    lease = conn.lease("/a/", 10, callback=got.append)
    conn.link_granted(lease.identifier, 10)
    link.request_lease = lambda *args: None  # renewals go unanswered
    clock.advance(10)
    conn.link_event(attr("/a/"))
    assert got == []


def test_async_iteration_and_backlog(clock, backend):
    conn = make(clock, backend)
    conn.connect()
    backend.up()
    lease = conn.lease("/a/", 60)
    conn.link_granted(lease.identifier, 60)
    conn.link_event(attr("/a/", "1"))  # kept until someone iterates
    seen = []

    async def consume():
        async for event in lease:
            seen.append(event.payload.value)
            if len(seen) == 3:
                break

    d = defer.ensureDeferred(consume())
    conn.link_event(attr("/a/", "2"))
    conn.link_event(attr("/a/", "3"))
    assert d.called and seen == ["1", "2", "3"]


def test_iteration_ends_when_the_lease_is_released(clock, backend):
    conn = make(clock, backend)
    conn.connect()
    link = backend.up()
    lease = conn.lease("/a/", 60)

    async def consume():
        return [event async for event in lease]

    d = defer.ensureDeferred(consume())
    lease.release()
    assert link.released == [lease.identifier]
    assert d.result == []


def test_sends_are_queued_while_disconnected_and_bounded(clock, backend):
    conn = make(clock, backend, max_queued_sends=3)
    for n in range(3):
        conn.send(attr("/a/", str(n)))
    with pytest.raises(SendQueueFull):
        conn.send(attr("/a/", "overflow"))
    conn.connect()
    link = backend.up()
    assert [e.payload.value for e in link.sent] == ["0", "1", "2"] and conn.queued == 0


def test_reconnect_releases_everything_in_order_with_backoff_and_failover(clock, backend):
    conn = make(clock, backend)
    conn.connect()
    link = backend.up()
    lease = conn.lease("/a/", 60)
    conn.link_lost(link, "router went away")
    conn.send(attr("/a/", "while-down"))
    delays = []
    for _ in range(8):  # both addresses refuse for a while; delays grow up to the cap
        before = clock.seconds()
        while len(backend.attempts) == 1 + len(delays):
            clock.advance(0.05)
        delays.append(clock.seconds() - before)
        backend.down()
    assert delays[0] <= 0.55 and delays[-1] >= BACKOFF_MAX / 2 - 0.1
    assert all(d <= BACKOFF_MAX + 0.05 for d in delays)
    addresses = [str(address) for address, _, _ in backend.attempts]
    # after a loss the next router is tried first (failover), then the list in turn
    assert addresses[:5] == ["psepr://a:1", "psepr://b:2", "psepr://a:1", "psepr://b:2", "psepr://a:1"]
    clock.advance(BACKOFF_MAX)
    new_link = backend.up()
    assert new_link.requests[0][:2] == (lease.identifier, "/a/")  # lease re-registered first ...
    assert [e.payload.value for e in new_link.sent] == ["while-down"]  # ... then the queue flushed


def test_connect_without_retry_reports_every_address(clock, backend):
    conn = make(clock, backend)
    failures = []
    conn.connect(retry=False).addErrback(failures.append)
    backend.down()
    clock.advance(0)
    backend.down()
    assert failures and failures[0].check(ConnectFailed)
    assert "psepr://a:1" in failures[0].getErrorMessage() and "psepr://b:2" in failures[0].getErrorMessage()


def test_login_refusal_is_not_retried(clock, backend):
    conn = make(clock, backend)
    failures = []
    conn.connect().addErrback(failures.append)
    backend.refuse()
    clock.advance(100)
    assert failures[0].check(LoginFailed) and len(backend.attempts) == 1


def test_close_stops_everything(clock, backend):
    conn = make(clock, backend)
    conn.connect()
    link = backend.up()
    lease = conn.lease("/a/", 60)
    conn.close()
    assert link.closed and lease.released and link.released == [lease.identifier]
    with pytest.raises(ConnectionClosed):
        conn.send(attr("/a/"))
    with pytest.raises(ConnectionClosed):
        conn.lease("/a/")


def test_oversized_events_are_refused_before_queueing(clock, backend):
    conn = make(clock, backend)
    with pytest.raises(EventTooLarge, match="at most 1048576"):
        conn.send(attr("/a/", "x" * (1024 * 1024)))
    assert conn.queued == 0


def test_a_queued_event_the_new_server_refuses_does_not_stop_the_others(clock, backend):
    conn = make(clock, backend)
    conn.send(attr("/a/", "big"))
    conn.send(attr("/a/", "small"))
    conn.connect()
    address, handler, d = backend.attempts[-1]
    link = FakeLink(handler)
    original = link.send

    def picky(event, xml):
        if event.payload.value == "big":
            raise EventTooLarge("over this server's max_payload")
        original(event, xml)

    link.send = picky
    connected = []
    d.addCallback(connected.append)
    d.callback(link)
    assert [e.payload.value for e in link.sent] == ["small"] and connected


def test_bad_arguments(clock, backend):
    conn = make(clock, backend)
    with pytest.raises(ValueError, match="begin and end"):
        conn.lease("nope")
    with pytest.raises(ValueError, match="positive"):
        conn.lease("/a/", 0)
    with pytest.raises(TypeError):
        conn.send("<event/>")

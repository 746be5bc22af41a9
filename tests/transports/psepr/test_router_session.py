"""The router's protocol logic without a reactor: :class:`RouterSession` and :class:`RouterCore`.

Each :class:`Peer` is one client: bytes built with the ``stream`` builders go
in through ``data_received``; what the session hands to ``send`` is parsed
back with a :class:`~dsmt.transports.psepr.stream.StreamParser` (so a reply
that is not a well-formed continuation of the stream fails the test), and
calls to ``close`` are counted.  Logins are checked synchronously against a
real accounts file (``RouterCore._check_login_now``) unless a test brings its
own ``check_login``.
"""
from __future__ import annotations

import pytest
from lxml import etree

from dsmt.transports.psepr import stream
from dsmt.transports.psepr.accounts import Accounts
from dsmt.transports.psepr.event import (
    ATTRIBUTE_NS, LEASE_NS, AttributePayload, Event, LeasePayload, OpaquePayload, event_from_element, event_to_xml,
    parse_event)
from dsmt.transports.psepr.router import (
    MAX_LOGIN_ATTEMPTS, MAX_PENDING_STANZAS, ROUTER_SERVICE, STATS_CHANNEL, RouterCore, RouterSession)
from tests.support.psepr import FakeClock, PASSWORD, accounts_text

NS_EVENT = "http://psepr.org/xs/event"


@pytest.fixture(scope="module")
def accounts():
    """One accounts object for the module: it remembers verified passwords, so only the first login costs a scrypt."""
    return Accounts.parse(accounts_text())


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def core(accounts, clock):
    return RouterCore(accounts=accounts, clock=clock, max_lease=600, name="router-test")


class Peer:
    """One client of ``core``: a :class:`RouterSession` fed with bytes, its output parsed back."""

    def __init__(self, core: RouterCore):
        self.core = core
        self.output = bytearray()  # every byte the session sent
        self.closes = 0
        self.session = RouterSession(core, self._send, self._close)
        self._parser = stream.StreamParser()
        self.items: list = []

    def _send(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.output += data
        self.items += self._parser.feed(data)  # raises StreamError if the router's stream is broken

    def _close(self) -> None:
        self.closes += 1

    # input ------------------------------------------------------------------
    def feed(self, *chunks: bytes) -> "Peer":
        for chunk in chunks:
            self.session.data_received(chunk)
        return self

    def open(self) -> "Peer":
        return self.feed(stream.stream_header(to="psepr"))

    def login(self, user: str = "alice", resource: str = "node1", password: str = PASSWORD) -> "Peer":
        self.open().feed(stream.auth_request("login", user, password, resource))
        assert self.session.state == RouterSession.OPEN, self.items
        self.take()
        return self

    def send_event(self, event: Event) -> bytes:
        raw = stream.wrap_message(event_to_xml(event))
        self.feed(raw)
        return raw

    def lease(self, channel: str, identifier: str = "l1", seconds: int = 60, payload_type: str | None = None,
              op: str = "register") -> bytes:
        return self.send_event(Event(channel, LeasePayload(identifier, seconds, op, payload_type),
                                     from_service=self.session.username, from_instance=self.session.resource))

    def ping(self, iq_id: str = "p1") -> "Peer":
        return self.feed(stream.ping_request(iq_id))

    # output -----------------------------------------------------------------
    def take(self) -> list:
        """Items received since the last call (StreamOpened, Stanza, StreamClosed)."""
        items, self.items = self.items, []
        return items

    def stanzas(self) -> list[stream.Stanza]:
        """Stanzas received since the last call (a leading stream header is skipped)."""
        items = [item for item in self.take() if not isinstance(item, stream.StreamOpened)]
        assert all(isinstance(item, stream.Stanza) for item in items), items
        return items

    def pop(self) -> stream.Stanza:
        """The first stanza received and not yet taken (a leading stream header is skipped)."""
        while self.items and isinstance(self.items[0], stream.StreamOpened):
            self.items.pop(0)
        item = self.items.pop(0)
        assert isinstance(item, stream.Stanza), item
        return item

    def events(self) -> list[Event]:
        return [parse_event(stanza.raw) for stanza in self.stanzas()]

    def stream_error(self) -> tuple[str, str]:
        """The stream error that ended this peer's stream (and nothing after its close)."""
        items = [item for item in self.take() if not isinstance(item, stream.StreamOpened)]
        assert [type(item) for item in items] == [stream.Stanza, stream.StreamClosed], items
        assert items[0].name == stream.STREAM_ERROR_NAME
        assert self.output.endswith(stream.STREAM_CLOSE)
        assert self.output.count(stream.STREAM_CLOSE) == 1, "the stream was closed more than once"
        assert self.session.state == RouterSession.CLOSED
        assert self.closes == 1
        return stream_error_of(items[0].raw)


def stream_error_of(raw: bytes) -> tuple[str, str]:
    """(condition, text) of a ``<stream:error>`` as cut from the stream.

    Its ``stream:`` prefix is declared by the stream header, so on its own it
    is not namespace-well-formed; it is read inside an element declaring it.
    """
    error = etree.fromstring(b"<s xmlns:stream='%s'>" % stream.NS_STREAMS.encode() + raw + b"</s>")[0]
    assert error.tag == stream.STREAM_ERROR_NAME
    ns = "{%s}" % stream.NS_STREAM_ERRORS
    conditions = [child.tag[len(ns):] for child in error if child.tag != ns + "text"]
    assert len(conditions) == 1 and conditions[0] in stream.STREAM_ERROR_CONDITIONS, conditions
    return conditions[0], error.findtext(ns + "text")


def attr(channel: str, value: str, **addressing) -> Event:
    return Event.attribute(channel, "status", value, **addressing)


def iq_of(stanza: stream.Stanza) -> stream.IqInfo:
    assert stanza.name == "iq", stanza
    return stream.parse_iq(stanza.raw)


def error_text(stanza: stream.Stanza) -> tuple[str, Event | None]:
    """(text, echoed event or None) of an error message from the router."""
    assert stanza.name == "message" and stream.is_error_message(stanza.raw), stanza
    text, echoed = stream.parse_error_message(stanza.raw)
    return text, None if echoed is None else event_from_element(echoed)


# ---------------------------------------------------------------- login

def test_login_ok(core):
    peer = Peer(core).open()
    (opened,) = peer.take()
    assert isinstance(opened, stream.StreamOpened)
    assert opened.attributes["from"] == "router-test" and opened.attributes["id"]
    peer.feed(stream.auth_request("a1", "alice", PASSWORD, "node1"))
    (result,) = peer.stanzas()
    assert result.raw == stream.auth_result("a1")
    assert (peer.session.state, peer.session.username, peer.session.resource) == ("open", "alice", "node1")
    assert core.counters.login_failures == 0 and core.counters.connections == 1


@pytest.mark.parametrize("user, password", [("alice", "wrong"), ("mallory", PASSWORD)],
                         ids=["wrong-password", "unknown-user"])
def test_refused_login_is_an_auth_error_and_the_stream_goes_on(core, user, password):
    peer = Peer(core).open()
    peer.take()
    peer.feed(stream.auth_request("a1", user, password, "node1"))
    (answer,) = peer.stanzas()
    assert answer.raw == stream.auth_error("a1")
    assert peer.session.state == RouterSession.AWAIT_LOGIN and peer.closes == 0
    assert core.counters.login_failures == 1
    peer.feed(stream.auth_request("a2", "alice", PASSWORD, "node1"))  # a second try may succeed
    assert [s.raw for s in peer.stanzas()] == [stream.auth_result("a2")]
    assert peer.session.state == RouterSession.OPEN


def test_too_many_refused_logins_end_the_stream(slow_core, later):
    peer = Peer(slow_core).open()
    for attempt in range(1, MAX_LOGIN_ATTEMPTS + 1):
        peer.feed(stream.auth_request(f"a{attempt}", "alice", "wrong", "n"))
        later.answer(False)
        assert peer.pop().raw == stream.auth_error(f"a{attempt}")
    condition, text = peer.stream_error()
    assert condition == "not-authorized" and f"{MAX_LOGIN_ATTEMPTS} logins refused" in text
    assert slow_core.counters.login_failures == MAX_LOGIN_ATTEMPTS


def test_login_without_password_is_refused(core):
    peer = Peer(core).open()
    peer.take()
    peer.feed(b'<iq type="set" id="a1"><query xmlns="jabber:iq:auth"><username>alice</username></query></iq>')
    assert [s.raw for s in peer.stanzas()] == [stream.auth_error("a1")]
    assert core.counters.login_failures == 1


def test_fields_query(core):
    peer = Peer(core).open()
    peer.take()
    peer.feed(stream.auth_fields_request("q1"))
    assert [s.raw for s in peer.stanzas()] == [stream.auth_fields_result("q1")]
    assert peer.session.state == RouterSession.AWAIT_LOGIN


def test_login_by_one_byte_at_a_time(core):
    peer = Peer(core)
    data = stream.stream_header(to="psepr") + stream.auth_request("a1", "alice", PASSWORD, "node1")
    peer.feed(*(data[i:i + 1] for i in range(len(data))))
    assert peer.session.state == RouterSession.OPEN
    assert peer.take()[1].raw == stream.auth_result("a1")


def test_anyone_may_log_in_without_accounts(clock):
    peer = Peer(RouterCore(accounts=None, clock=clock)).login("whoever", password="x")
    assert peer.session.username == "whoever"


@pytest.mark.parametrize("stanza", [
    stream.wrap_message(event_to_xml(attr("/a/", "1"))),
    b"<presence/>",
    stream.ping_request("p1"),
], ids=["message", "presence", "ping"])
def test_stanzas_before_login_end_the_stream_not_authorized(core, stanza):
    other = Peer(core).login("bob")
    other.lease("/")
    other.take()
    peer = Peer(core).open()
    peer.feed(stanza)
    condition, text = peer.stream_error()
    assert condition == "not-authorized" and "log in" in text
    assert core.counters.login_failures == 1
    assert core.counters.deliveries == 0 and other.take() == []
    assert peer.session not in core.sessions


def test_bad_login_iq_is_a_protocol_error(core):
    peer = Peer(core).open()
    peer.feed(b'<iq type="set"><query xmlns="jabber:iq:auth"/></iq>')  # no id
    assert peer.stream_error()[0] == "bad-format"
    assert core.counters.protocol_errors == 1


# ---------------------------------------------------------------- leases

def test_grant_echoes_identifier_and_duration(core):
    peer = Peer(core).login()
    peer.lease("/a/", identifier="my-lease", seconds=60, payload_type=ATTRIBUTE_NS)
    (grant,) = peer.events()
    assert grant.channel == "/a/"
    assert grant.payload == LeasePayload("my-lease", 60, "register", ATTRIBUTE_NS)
    assert (grant.from_service, grant.from_instance) == (ROUTER_SERVICE, "router-test")
    assert core.counters.lease_requests == 1 and len(core.leases) == 1
    lease = core.leases.leases_of(peer.session)[0]
    assert (lease.service, lease.instance, lease.payload_type) == ("alice", "node1", ATTRIBUTE_NS)


def test_grant_is_capped_at_max_lease(core):
    peer = Peer(core).login()
    peer.lease("/a/", seconds=99999)
    (grant,) = peer.events()
    assert grant.payload.duration == 600
    assert core.leases.leases_of(peer.session)[0].duration == 600


def test_renewal_replaces_the_lease(core):
    peer = Peer(core).login()
    peer.lease("/a/", identifier="x")
    peer.lease("/b/", identifier="x")  # same identifier: the lease moves
    assert [e.channel for e in peer.events()] == ["/a/", "/b/"]
    assert [lease.channel for lease in core.leases.leases_of(peer.session)] == ["/b/"]


def test_unregister(core):
    sub, pub = Peer(core).login(), Peer(core).login("bob")
    sub.lease("/a/", identifier="x")
    sub.take()
    sub.lease("/a/", identifier="x", seconds=0, op="unregister")
    (answer,) = sub.events()
    assert answer.payload == LeasePayload("x", 0, "unregister")
    assert len(core.leases) == 0
    pub.send_event(attr("/a/", "1"))
    assert sub.take() == [] and core.counters.undeliverable == 1


def test_refusal_over_the_per_holder_limit_echoes_the_request(accounts, clock):
    core = RouterCore(accounts=accounts, clock=clock, max_leases_per_holder=2)
    peer = Peer(core).login()
    peer.lease("/a/", identifier="l1")
    peer.lease("/b/", identifier="l2")
    peer.take()
    peer.lease("/c/", identifier="l3")
    (refusal,) = peer.stanzas()
    text, echoed = error_text(refusal)
    assert "2 leases" in text
    assert echoed.payload.identifier == "l3" and echoed.channel == "/c/"
    assert core.counters.rejected == 1 and len(core.leases) == 2
    peer.lease("/a/", identifier="l1")  # renewing an existing lease is still allowed
    assert peer.events()[0].payload.identifier == "l1"


def test_refusal_of_a_zero_duration_echoes_the_request(core):
    peer = Peer(core).login()
    peer.lease("/a/", identifier="l0", seconds=0)
    text, echoed = error_text(peer.stanzas()[0])
    assert "at least 1 second" in text and echoed.payload.identifier == "l0"
    assert core.counters.rejected == 1 and len(core.leases) == 0
    assert peer.session.state == RouterSession.OPEN


def test_unreadable_lease_request_is_refused_without_echo(core):
    peer = Peer(core).login()
    peer.feed(stream.wrap_message(
        f'<event xmlns="{NS_EVENT}"><to><channel>/a/</channel></to><payload xmlns="{LEASE_NS}">'
        f"<identifier>l1</identifier><duration>-5</duration></payload></event>".encode()))
    text, echoed = error_text(peer.stanzas()[0])
    assert "duration" in text and echoed is None
    assert core.counters.rejected == 1


def test_leases_lapse(core, clock):
    sub, pub = Peer(core).login(), Peer(core).login("bob")
    sub.lease("/a/", seconds=10)
    sub.take()
    clock.now += 10
    pub.send_event(attr("/a/", "late"))
    assert sub.take() == []
    assert len(core.leases.expire()) == 1


# ---------------------------------------------------------------- routing

def test_forwarded_bytes_are_exactly_the_senders_stanza(core):
    sub, pub = Peer(core).login(), Peer(core).login("bob")
    sub.lease("/a/")
    sub.take()
    # odd but valid: single quotes, spacing, an unknown child, a comment-free CDATA value,
    # character references, a prefixed payload namespace
    raw = ("<message  to='psepr' id=\"m&amp;1\"><x xmlns='jabber:x:expire' seconds='5'/>\n"
           f"<event xmlns='{NS_EVENT}'><to>\n <channel> /a/b/ </channel></to>"
           f"<from><service>bob</service></from><extra xmlns='urn:x'>&#233;</extra>"
           f"<p:payload xmlns:p='{ATTRIBUTE_NS}'><p:field>f</p:field>"
           "<p:value><![CDATA[<x>]]> &lt; caf\u00e9</p:value></p:payload></event>\n</message>").encode()
    pub.feed(raw[:7], raw[7:50], raw[50:])
    (forwarded,) = sub.stanzas()
    assert forwarded.raw == raw
    event = parse_event(forwarded.raw)
    assert (event.channel, event.payload.value) == ("/a/b/", "<x> < caf\u00e9")


def test_subtree_routing_and_siblings(core):
    sub, pub = Peer(core).login(), Peer(core).login("bob")
    sub.lease("/org/x1/")
    sub.take()
    for channel in ("/org/x1/", "/org/x1/c/d/", "/org/x10/", "/org/x1.evil/", "/org/"):
        pub.send_event(attr(channel, channel))
    assert [e.payload.value for e in sub.events()] == ["/org/x1/", "/org/x1/c/d/"]
    assert (core.counters.deliveries, core.counters.undeliverable) == (2, 3)


def test_payload_type_filter(core):
    sub, pub = Peer(core).login(), Peer(core).login("bob")
    sub.lease("/t/", payload_type="urn:dsmt:test")
    sub.take()
    pub.send_event(attr("/t/", "attribute"))
    pub.send_event(Event("/t/", OpaquePayload.from_xml(b'<payload xmlns="urn:dsmt:test"><x/></payload>')))
    assert [e.payload_type for e in sub.events()] == ["urn:dsmt:test"]


def test_service_and_instance_narrowing(core):
    a1, a2 = Peer(core).login("alice", "node1"), Peer(core).login("alice", "node2")
    c1, pub = Peer(core).login("carol", "node1"), Peer(core).login("bob", "node9")
    for peer in (a1, a2, c1):
        peer.lease("/n/")
        peer.take()
    pub.send_event(attr("/n/", "to-alice", to_service="alice"))
    pub.send_event(attr("/n/", "to-node1", to_instance="node1"))
    pub.send_event(attr("/n/", "to-alice-node2", to_service="alice", to_instance="node2"))
    pub.send_event(attr("/n/", "to-nobody", to_service="nobody"))
    pub.send_event(attr("/n/", "all"))
    assert [e.payload.value for e in a1.events()] == ["to-alice", "to-node1", "all"]
    assert [e.payload.value for e in a2.events()] == ["to-alice", "to-alice-node2", "all"]
    assert [e.payload.value for e in c1.events()] == ["to-node1", "all"]
    assert core.counters.undeliverable == 1


def test_overlapping_leases_deliver_once_per_session(core):
    sub, pub = Peer(core).login(), Peer(core).login("bob")
    sub.lease("/o/", identifier="outer")
    sub.lease("/o/i/", identifier="inner")
    sub.take()
    pub.send_event(attr("/o/i/x/", "1"))
    assert len(sub.stanzas()) == 1 and core.counters.deliveries == 1


def test_sender_with_a_lease_hears_itself(core):
    peer = Peer(core).login()
    peer.lease("/self/")
    peer.take()
    raw = peer.send_event(attr("/self/", "echo"))
    assert [s.raw for s in peer.stanzas()] == [raw]


@pytest.mark.parametrize("channel_xml, reason", [
    ("<channel>no-slashes</channel>", "must begin and end"),
    ("<channel>/a//b/</channel>", "empty segment"),
    ("<channel>/a/../</channel>", "relative segment"),
    ("<channel> </channel>", "to/channel is empty"),
    ("", "to/channel is empty"),
])
def test_event_with_a_bad_channel_is_refused_and_the_stream_goes_on(core, channel_xml, reason):
    sub, pub = Peer(core).login(), Peer(core).login("bob")
    sub.lease("/")
    sub.take()
    pub.feed(stream.wrap_message(
        f'<event xmlns="{NS_EVENT}"><to>{channel_xml}</to><payload xmlns="{ATTRIBUTE_NS}">'
        "<field>f</field><value>v</value></payload></event>".encode()))
    text, echoed = error_text(pub.stanzas()[0])
    assert reason in text and echoed is None
    assert sub.take() == []
    assert core.counters.rejected == 1
    pub.send_event(attr("/ok/", "after"))
    assert [e.payload.value for e in sub.events()] == ["after"]
    assert pub.session.state == RouterSession.OPEN and pub.closes == 0


@pytest.mark.parametrize("body, reason", [
    (b"<body>hello</body>", "no PsEPR event"),
    (f'<event xmlns="{NS_EVENT}"><to><channel>/a/</channel></to></event>'.encode(), "payload"),
    (f'<event xmlns="{NS_EVENT}"><to><channel>/a/</channel></to><payload><v/></payload></event>'.encode(),
     "payload"),
    (f'<event xmlns="{NS_EVENT}"><to><channel>/a/</channel></to><payload xmlns=""><v/></payload></event>'.encode(),
     "payload"),
], ids=["no-event", "no-payload", "payload-in-the-event-namespace", "payload-in-no-namespace"])
def test_message_that_is_not_an_event_is_refused(core, body, reason):
    sub, pub = Peer(core).login(), Peer(core).login("bob")
    sub.lease("/")
    sub.take()
    pub.feed(b"<message to='psepr'>" + body + b"</message>")
    text, _ = error_text(pub.stanzas()[0])
    assert reason in text
    assert sub.take() == [] and core.counters.rejected == 1 and core.counters.deliveries == 0


def test_legacy_attribute_namespace_reaches_attribute_leases(core):
    sub, pub = Peer(core).login(), Peer(core).login("bob")
    sub.lease("/a/", payload_type=ATTRIBUTE_NS)
    sub.take()
    pub.feed(stream.wrap_message(
        f'<event xmlns="{NS_EVENT}"><to><channel>/a/</channel></to>'
        '<payload xmlns="http://psepr.org/ns/payload/attribute"><field>f</field><value>v</value></payload>'
        "</event>".encode()))
    assert [e.payload.value for e in sub.events()] == ["v"]


# ---------------------------------------------------------------- iq

def test_pings_are_answered_in_order(core):
    peer = Peer(core).login()
    peer.lease("/a/", identifier="l1")
    peer.ping("p1")
    peer.feed(stream.wrap_message(event_to_xml(attr("/a/", "x")).replace(b"/a/", b"/a//")))
    peer.send_event(attr("/a/", "mine"))
    peer.ping("p2")
    kinds = []
    for stanza in peer.stanzas():
        if stanza.name == "iq":
            kinds.append(("iq",) + tuple(iq_of(stanza)[:2]))
        elif stream.is_error_message(stanza.raw):
            kinds.append(("error",))
        else:
            kinds.append(("event", parse_event(stanza.raw).payload_type))
    assert kinds == [("event", LEASE_NS), ("iq", "result", "p1"), ("error",), ("event", ATTRIBUTE_NS),
                     ("iq", "result", "p2")]


def test_unknown_iq_is_refused_and_results_are_ignored(core):
    peer = Peer(core).login()
    peer.feed(b'<iq type="get" id="v1"><query xmlns="jabber:iq:version"/></iq>',
              b'<iq type="set" id="v2"><query xmlns="jabber:iq:auth"/></iq>',
              b'<iq type="result" id="v3"/>', b'<iq type="error" id="v4"/>', b"<presence/>")
    assert [s.raw for s in peer.stanzas()] == [stream.iq_error("v1"), stream.iq_error("v2")]
    assert peer.session.state == RouterSession.OPEN


def test_malformed_iq_after_login_is_a_protocol_error(core):
    peer = Peer(core).login()
    peer.feed(b'<iq type="bogus" id="x"/>')
    assert peer.stream_error()[0] == "bad-format"
    assert core.counters.protocol_errors == 1


# ---------------------------------------------------------------- broken streams

HOSTILE = {
    "garbage": (b"\x00\x01hello garbage", "not-well-formed", False),
    "dtd": (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
            b"<lolz>&lol2;</lolz>", "restricted-xml", False),
    "dtd-after-login": (b'<!DOCTYPE x [<!ENTITY a "aaaa">]>', "not-well-formed", True),
    "comment": (b"<!-- hi -->", "restricted-xml", True),
    "oversized": (b"<message><body>" + b"x" * (stream.MAX_STANZA_BYTES + 1) + b"</body></message>",
                  "policy-violation", True),
    "text": (b"stray text", "bad-format", True),
    "duplicate-channel": (
        f'<message><event xmlns="{NS_EVENT}"><to><channel>/a/</channel><channel>/b/</channel></to>'
        "</event></message>".encode(), "bad-format", True),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_broken_stream_ends_with_a_stream_error_and_releases_leases(core, name):
    data, condition, after_login = HOSTILE[name]
    good_sub, good_pub = Peer(core).login("carol"), Peer(core).login("bob")
    good_sub.lease("/a/")
    good_sub.take()
    peer = Peer(core)
    if after_login:
        peer.login()
        peer.lease("/a/")
        peer.lease("/b/", identifier="l2")
        peer.take()
        assert len(core.leases) == 3
    peer.feed(data)
    assert peer.stream_error()[0] == condition
    if not after_login:
        assert peer.output.startswith(b"<?xml")  # a stream header first: the error needs a stream
    assert core.counters.protocol_errors == 1
    assert len(core.leases) == 1 and peer.session not in core.sessions
    peer.feed(stream.wrap_message(event_to_xml(attr("/a/", "ignored"))))  # a closed session ignores input
    assert peer.take() == [] and peer.closes == 1
    good_pub.send_event(attr("/a/", "still-working"))
    assert [e.payload.value for e in good_sub.events()] == ["still-working"]


def test_client_close_is_answered_once_and_releases_leases(core):
    peer = Peer(core).login()
    peer.lease("/a/")
    peer.take()
    peer.feed(stream.STREAM_CLOSE)
    assert peer.take() == [stream.StreamClosed()]
    assert peer.output.count(stream.STREAM_CLOSE) == 1 and peer.closes == 1
    assert len(core.leases) == 0 and core.counters.connections == 0


def test_connection_lost_releases_leases(core):
    peer = Peer(core).login()
    peer.lease("/a/")
    peer.session.connection_lost()
    peer.session.connection_lost()
    assert len(core.leases) == 0 and core.counters.connections == 0 and not core.sessions


def test_fail_before_the_header_sends_a_header_first(core):
    peer = Peer(core)
    peer.session.fail("connection-timeout", "too slow")
    assert peer.stream_error() == ("connection-timeout", "too slow")


# ---------------------------------------------------------------- counters

def test_counters(core):
    sub, pub = Peer(core).login(), Peer(core).login("bob")
    sub.lease("/a/")                        # events_in 1, lease_requests 1
    pub.send_event(attr("/a/", "1"))        # events_in 2, deliveries 1
    pub.send_event(attr("/b/", "2"))        # events_in 3, undeliverable 1
    pub.send_event(attr("/a/", "3"))        # events_in 4, deliveries 2
    pub.feed(b"<message><body/></message>")  # events_in 5, rejected 1
    stats = core.stats()
    assert {k: stats[k] for k in ("events_in", "deliveries", "undeliverable", "rejected", "lease_requests",
                                  "connections", "connections_total", "leases", "login_failures",
                                  "protocol_errors", "slow_consumer_drops")} == {
        "events_in": 5, "deliveries": 2, "undeliverable": 1, "rejected": 1, "lease_requests": 1,
        "connections": 2, "connections_total": 2, "leases": 1, "login_failures": 0, "protocol_errors": 0,
        "slow_consumer_drops": 0}
    assert stats["bytes_in"] > 0  # bytes_out is counted by the socket adapter
    Peer(core).open().feed(stream.auth_request("x", "alice", "nope", "n"))
    Peer(core).feed(b"GET / HTTP/1.1\r\n\r\n")
    assert (core.counters.login_failures, core.counters.protocol_errors) == (1, 1)
    assert (core.counters.connections, core.counters.connections_total) == (3, 4)


def test_publish_stats_only_when_someone_listens(core):
    assert core.publish_stats() == 0
    sub = Peer(core).login()
    sub.lease("/org/dsmt/ns/psepr/router/")
    sub.take()
    expected = core.stats()
    assert core.publish_stats() == len(expected)
    events = sub.events()
    assert {e.channel for e in events} == {STATS_CHANNEL}
    assert {(e.from_service, e.from_instance) for e in events} == {(ROUTER_SERVICE, "router-test")}
    assert {e.payload.field: e.payload.value for e in events} == {k: str(v) for k, v in expected.items()}
    assert all(isinstance(e.payload, AttributePayload) for e in events)


def test_router_name_must_be_usable_in_events(accounts, clock):
    with pytest.raises(ValueError, match="name"):
        RouterCore(accounts=accounts, clock=clock, name=" spaced ")


# ---------------------------------------------------------------- login checked later

class LaterLogins:
    """A ``check_login`` that answers when the test says so (as the thread pool does)."""

    def __init__(self, accounts: Accounts):
        self.accounts = accounts
        self.waiting: list = []

    def __call__(self, name, password, done):
        self.waiting.append((name, password, done))

    def answer(self, ok: bool | None = None) -> None:
        name, password, done = self.waiting.pop(0)
        done(self.accounts.check(name, password) if ok is None else ok)


@pytest.fixture
def later(accounts):
    return LaterLogins(accounts)


@pytest.fixture
def slow_core(accounts, clock, later):
    return RouterCore(accounts=accounts, clock=clock, check_login=later, name="router-test")


def test_stanzas_sent_during_the_check_are_processed_after_it(slow_core, later):
    sub = Peer(slow_core)
    sub.open().feed(stream.auth_request("a1", "alice", PASSWORD, "node1"))
    sub.lease("/a/", identifier="early")
    sub.ping("p1")
    assert sub.session.state == RouterSession.CHECKING
    assert [type(item) for item in sub.take()] == [stream.StreamOpened]  # nothing answered yet
    later.answer()
    stanzas = sub.stanzas()
    assert stanzas[0].raw == stream.auth_result("a1")
    assert parse_event(stanzas[1].raw).payload.identifier == "early"
    assert iq_of(stanzas[2])[:2] == ("result", "p1")
    lease = slow_core.leases.leases_of(sub.session)[0]
    assert (lease.service, lease.instance) == ("alice", "node1")


def test_messages_queued_behind_a_refused_login_are_not_authorized(slow_core, later):
    listener = Peer(slow_core)
    listener.open().feed(stream.auth_request("a1", "carol", PASSWORD, "n"))
    later.answer()
    listener.lease("/")
    listener.take()
    peer = Peer(slow_core)
    peer.open().feed(stream.auth_request("a1", "alice", "wrong", "n"),
                     stream.wrap_message(event_to_xml(attr("/a/", "sneaky"))))
    later.answer(False)
    assert peer.pop().raw == stream.auth_error("a1")
    assert peer.stream_error()[0] == "not-authorized"
    assert listener.take() == [] and slow_core.counters.deliveries == 0


def test_second_login_attempt_in_the_queue_holds_back_what_follows(slow_core, later):
    listener = Peer(slow_core)
    listener.open().feed(stream.auth_request("a1", "carol", PASSWORD, "n"))
    later.answer()
    listener.lease("/")
    listener.take()
    peer = Peer(slow_core)
    peer.open().feed(stream.auth_request("a1", "alice", "wrong", "n"),
                     stream.auth_request("a2", "alice", "also-wrong", "n"),
                     stream.wrap_message(event_to_xml(attr("/a/", "sneaky"))))
    later.answer(False)  # first attempt refused; the second is now being checked
    assert [s.raw for s in peer.stanzas()] == [stream.auth_error("a1")]
    assert peer.session.state == RouterSession.CHECKING
    assert listener.take() == [], "a message was routed before its sender logged in"
    later.answer(False)  # second attempt refused too: the queued message is not authorized
    assert peer.pop().raw == stream.auth_error("a2")
    assert peer.stream_error()[0] == "not-authorized"
    assert listener.take() == [] and slow_core.counters.deliveries == 0


def test_second_login_attempt_in_the_queue_may_succeed(slow_core, later):
    peer = Peer(slow_core)
    peer.open().feed(stream.auth_request("a1", "alice", "wrong", "n"),
                     stream.auth_request("a2", "alice", PASSWORD, "n"))
    peer.lease("/a/")
    later.answer(False)
    later.answer()
    stanzas = peer.stanzas()
    assert [s.raw for s in stanzas[:2]] == [stream.auth_error("a1"), stream.auth_result("a2")]
    assert parse_event(stanzas[2].raw).payload_type == LEASE_NS
    assert peer.session.state == RouterSession.OPEN


def test_flooding_during_the_check_is_cut_off(slow_core, later):
    peer = Peer(slow_core)
    peer.open().feed(stream.auth_request("a1", "alice", PASSWORD, "n"))
    ping = stream.ping_request("p")
    peer.feed(ping * MAX_PENDING_STANZAS)
    assert peer.session.state == RouterSession.CHECKING and peer.closes == 0
    peer.feed(ping)
    condition, text = peer.stream_error()
    assert condition == "policy-violation" and "before the login" in text
    later.answer()  # the late answer finds the session gone
    assert peer.take() == [] and not slow_core.sessions


def test_late_answer_after_the_connection_went_away_is_ignored(slow_core, later):
    peer = Peer(slow_core)
    peer.open().feed(stream.auth_request("a1", "alice", PASSWORD, "n"))
    peer.take()
    peer.session.connection_lost()
    later.answer()
    assert peer.take() == [] and peer.session.state == RouterSession.CLOSED


def test_close_queued_during_the_check_is_handled_after_it(slow_core, later):
    peer = Peer(slow_core)
    peer.open().feed(stream.auth_request("a1", "alice", PASSWORD, "n"), stream.STREAM_CLOSE)
    later.answer()
    items = peer.take()
    assert items[1:] == [stream.Stanza("iq", stream.auth_result("a1"), None), stream.StreamClosed()]
    assert peer.closes == 1 and not slow_core.sessions


def test_opened_callback_fires_once_on_login(accounts, clock, later):
    core = RouterCore(accounts=accounts, clock=clock, check_login=later)
    opened = []
    session = RouterSession(core, lambda data: None, lambda: None, opened=lambda: opened.append(1))
    session.data_received(stream.stream_header() + stream.auth_request("a1", "alice", "x", "n"))
    later.answer(False)
    assert opened == []
    session.data_received(stream.auth_request("a2", "alice", PASSWORD, "n"))
    later.answer()
    assert opened == [1]

"""The client's end of a router link without sockets: :class:`RouterLinkProtocol` and its :class:`StanzaReader`.

Bytes as a router sends them (built with the ``stream`` builders) go in
through ``dataReceived`` on a fake transport; a fake handler (the part of
``PsEPRConnection`` a link calls) records what comes out.  Hostile input must
end the link with a clear reason — the connection then reconnects — and never
make it hang or hold unbounded memory; whatever the router's own parser
accepts, and so may forward, must never break the link.
"""
from __future__ import annotations

import os
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dsmt.transports.psepr import stream
from dsmt.transports.psepr.backend_router import (
    FEED_SLICE_BYTES, LOGIN_ID, RouterLinkProtocol, StanzaReader)
from dsmt.transports.psepr.client import Address, LoginFailed
from dsmt.transports.psepr.event import (
    ATTRIBUTE_NS, LEASE_NS, LEGACY_ATTRIBUTE_NS, Event, EventError, LeasePayload, OpaquePayload, event_to_xml,
    parse_event)
from dsmt.transports.psepr.router import ROUTER_SERVICE

HEADER = stream.stream_header(sender="router-test", stream_id="0123456789abcdef")
LOGIN = HEADER + stream.auth_result(LOGIN_ID)
CHANNEL = "/org/dsmt/ns/deployment/xyz1/app/status/"


class Handler:
    """What a link calls on its ``PsEPRConnection``, recorded."""

    service, password, instance = "alice", "secret", "node1"

    def __init__(self):
        self.calls: list[tuple] = []
        self.lost: list[str] = []

    def link_event(self, event, identifier=None):
        self.calls.append(("event", event))

    def link_granted(self, identifier, seconds):
        self.calls.append(("granted", identifier, seconds))

    def link_refused(self, identifier, reason):
        self.calls.append(("refused", identifier, reason))

    def link_lost(self, link, reason):
        self.lost.append(reason)


class Transport:
    connected = True

    def __init__(self):
        self.written = bytearray()

    def write(self, data):
        self.written += data

    def setTcpNoDelay(self, enabled):
        pass

    def loseConnection(self):
        self.connected = False


def new_link() -> tuple[RouterLinkProtocol, Handler]:
    handler = Handler()
    link = RouterLinkProtocol(handler, Address("psepr", "router-test", 1))
    link.makeConnection(Transport())
    return link, handler


def logged_in() -> tuple[RouterLinkProtocol, Handler]:
    link, handler = new_link()
    link.dataReceived(LOGIN)
    assert link._logged_in and link.ready.called
    return link, handler


def failure(link: RouterLinkProtocol, handler: Handler) -> str | None:
    """Why the link ended (link_lost once logged in, the failed ``ready`` before), or None if it did not."""
    if handler.lost:
        assert len(handler.lost) == 1, handler.lost
        assert not link.transport.connected and link.reader is None
        return handler.lost[0]
    reasons = []
    link.ready.addErrback(lambda f: reasons.append(f.getErrorMessage()))
    if reasons:
        assert not link.transport.connected and link.reader is None
        return reasons[0]
    return None


def attr(value: str, channel: str = CHANNEL, **addressing) -> Event:
    return Event.attribute(channel, "deployment-status", value, expire=90, from_service="bob",
                           from_instance="planetlab5.nbgisp.com", **addressing)


def message(event: Event) -> bytes:
    return stream.wrap_message(event_to_xml(event))


def grant(identifier: str, seconds: int, channel: str = CHANNEL) -> bytes:
    return message(Event(channel, LeasePayload(identifier, seconds), from_service=ROUTER_SERVICE,
                         from_instance="router-test"))


EVENTS = [attr("status=running"), attr("é€😀 & <tags> \r\n\t kept", to_service="alice", to_instance="node1"),
          Event("/opaque/", OpaquePayload.from_xml(b'<payload xmlns="urn:dsmt:test"><a b="1">x &amp; y</a></payload>'),
                from_service="bob"),
          # its payload XML comes out as sent: redundant declarations kept, none of the stream's added
          Event("/opaque/", OpaquePayload.from_xml(b'<p:payload xmlns:p="urn:p"><x:y xmlns:x="urn:x">'
                                                   b'<x:y xmlns:x="urn:x" a="1">t</x:y></x:y></p:payload>'))]
REFUSED = Event(CHANNEL, LeasePayload("l2", 60), from_service="alice", from_instance="node1")
#: A session as the router sends it, with everything a client meets: header, login result, a grant, events
#: (one in a legacy namespace with CDATA and character references, as another client may have written it),
#: refusals with and without the lease request echoed, a ping result, a presence, whitespace between stanzas.
SESSION = (LOGIN + grant("l1", 60) + message(EVENTS[0]) + b"\n "
           + stream.error_message("lease l2: no such right", event_to_xml(REFUSED))
           + message(EVENTS[1]) + stream.error_message("bad event") + stream.auth_result("ping-1")
           + b'<presence from="x"/>' + message(EVENTS[2]) + message(EVENTS[3])
           + b'<message to="psepr"><event xmlns="http://psepr.org/xs/event"><to><channel>/legacy/</channel></to>'
           + f'<payload xmlns="{LEGACY_ATTRIBUTE_NS}"><field>f</field>'.encode()
           + b"<value>a<![CDATA[<b>&]]>&#13;&#x20AC;</value></payload></event></message>")
EXPECTED = [("granted", "l1", 60), ("event", EVENTS[0]), ("refused", "l2", "lease l2: no such right"),
            ("event", EVENTS[1]), ("refused", None, "bad event"), ("event", EVENTS[2]), ("event", EVENTS[3]),
            ("event", Event.attribute("/legacy/", "f", "a<b>&\r€"))]


def test_a_session_delivers_grants_events_refusals_and_ping_results_in_order():
    link, handler = new_link()
    assert link.transport.written.startswith(stream.stream_header(to="psepr"))
    flushed = link.flush()
    link.dataReceived(SESSION)
    assert link.ready.called and flushed.called
    assert handler.calls == EXPECTED
    assert failure(link, handler) is None and link.transport.connected


def test_a_session_split_at_every_byte_boundary_yields_the_same_calls():
    for cut in range(1, len(SESSION)):
        link, handler = new_link()
        link.dataReceived(SESSION[:cut])
        link.dataReceived(SESSION[cut:])
        assert handler.calls == EXPECTED, cut
        assert failure(link, handler) is None, cut


def test_a_session_one_byte_at_a_time_yields_the_same_calls():
    link, handler = new_link()
    for index in range(len(SESSION)):
        link.dataReceived(SESSION[index:index + 1])
    assert handler.calls == EXPECTED
    assert failure(link, handler) is None


def test_a_big_stanza_is_not_kept_once_used():
    link, handler = logged_in()
    link.dataReceived(message(attr("x" * 500_000)))
    assert len(handler.calls) == 1 and len(handler.calls[0][1].payload.value) == 500_000
    (kept,) = link.reader.root  # the tree keeps the last stanza until the next one starts: emptied
    assert len(kept) == 0 and kept.text is None and not kept.attrib


def test_stanzas_are_handed_out_once_and_freed():
    """Over many reads, the reader's tree keeps at most one top-level element and no text."""
    link, handler = logged_in()
    reader = link.reader
    batch = b"".join(message(attr(str(n))) + b" " for n in range(50))
    for _ in range(40):
        for start in range(0, len(batch), 1500):  # stanzas cut anywhere
            link.dataReceived(batch[start:start + 1500])
            assert len(reader.root) <= 1 and not reader.root.text
    assert [call[1].payload.value for call in handler.calls] == [str(n) for n in range(50)] * 40
    assert failure(link, handler) is None


def statm_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_stays_flat_over_a_long_stream():
    """50 MB of events and whitespace keepalives: neither Python objects nor the parser's tree grow."""
    link, handler = logged_in()
    received = [0]
    handler.link_event = lambda event, identifier=None: received.__setitem__(0, received[0] + 1)
    chunk = b"".join(message(attr("x" * 900 + str(n))) for n in range(60)) + b" " * 1000
    for _ in range(50):  # warm up: allocator pools, lxml's name dictionary
        link.dataReceived(chunk)
    rss = statm_rss()
    tracemalloc.start()
    try:
        for _ in range(800):
            link.dataReceived(chunk)
            link.dataReceived(b" ")  # a keepalive
        python_growth = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert received == [850 * 60] and failure(link, handler) is None
    assert python_growth < 256 * 1024
    assert statm_rss() - rss < 8 * 1024 * 1024  # the ~50 MB fed would show


def test_whitespace_keepalives_never_add_up_to_the_size_limit():
    """Twice the stanza limit of whitespace between two stanzas, in reads of every size: only text, all dropped."""
    link, handler = logged_in()
    for _ in range(2 * stream.MAX_STANZA_BYTES // 1024):
        link.dataReceived(b" \r\n\t" * 256)
    for _ in range(5000):
        link.dataReceived(b"\n")
    link.dataReceived(message(attr("still here")))
    assert failure(link, handler) is None and [call[1].payload.value for call in handler.calls] == ["still here"]
    assert link.reader._held < FEED_SLICE_BYTES


# ---------------------------------------------------------------- hostile input

def test_a_doctype_is_refused_before_the_parser_sees_it():
    laughs = (b'<?xml version="1.0"?><!DOCTYPE stream:stream [<!ENTITY lol "lol">'
              + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
                         for i in range(1, 10)) + b"]>")
    external = b'<!DOCTYPE stream:stream SYSTEM "http://127.0.0.1:9/evil.dtd">'
    for prolog in (laughs, external):
        data = prolog + HEADER + b'<iq type="result" id="login" a="&lol9;"/>'
        for cut in range(1, len(prolog) + 12):  # wherever the reads split it
            link, handler = new_link()
            link.dataReceived(data[:cut])
            link.dataReceived(data[cut:])
            assert failure(link, handler) == "router sent a broken stream: restricted-xml: DOCTYPE not allowed", cut
            assert not link._logged_in and handler.calls == []


def test_a_doctype_after_the_header_is_not_well_formed():
    link, handler = logged_in()
    link.dataReceived(b'<!DOCTYPE x [<!ENTITY a "b">]>')
    assert failure(link, handler).startswith("router sent a broken stream: not-well-formed: ")


def test_an_undefined_entity_fails_the_link_instead_of_stalling_it():
    link, handler = logged_in()
    link.dataReceived(b'<message><event xmlns="http://psepr.org/xs/event">&xxe;</event></message>'
                      + message(attr("after")))
    assert "not-well-formed: Entity 'xxe' not defined" in failure(link, handler)
    assert handler.calls == []


@pytest.mark.parametrize("opening", [b"<message><body>", b'<message a="', b"<message><![CDATA[", b"<message><!--",
                                     b'<presence><x y="', b'<message/> <message a="', b"<unknown xmlns='urn:x'>"])
def test_an_oversized_stanza_fails_early_with_bounded_memory(opening):
    """Fed in socket-sized reads, a stanza that never ends is refused within two reads of the limit."""
    link, handler = logged_in()
    piece = b"x" * FEED_SLICE_BYTES
    fed = len(opening)
    tracemalloc.start()
    try:
        link.dataReceived(opening)
        while failure(link, handler) is None and fed < 8 * stream.MAX_STANZA_BYTES:
            link.dataReceived(piece)
            fed += len(piece)
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert failure(link, handler) == (
        f"router sent a broken stream: policy-violation: stanza exceeds {stream.MAX_STANZA_BYTES} bytes")
    assert fed <= stream.MAX_STANZA_BYTES + 2 * FEED_SLICE_BYTES
    assert python_peak < 512 * 1024  # nothing of the stanza is copied into Python objects
    link.dataReceived(message(attr("after the failure")))  # ignored: the link is over
    assert handler.calls == []


def test_an_oversized_stanza_in_one_read_fails_too():
    link, handler = logged_in()
    link.dataReceived(b"<message><body>" + b"x" * (2 * stream.MAX_STANZA_BYTES) + b"</body></message>"
                      + message(attr("after")))
    assert "policy-violation: stanza exceeds" in failure(link, handler)
    assert handler.calls == []


def test_a_stanza_at_the_limit_is_delivered_wherever_it_starts():
    """The size count never refuses a stanza within the limit, even one starting at the end of a read."""
    head, tail = message(attr("")).split(b"<value>")
    value = "v" * (stream.MAX_STANZA_BYTES - len(head) - len(tail) - len(b"<value>"))
    big = message(attr(value))
    assert len(big) == stream.MAX_STANZA_BYTES
    for before in (b"", message(attr("small")) * 50):
        link, handler = logged_in()
        data = before + big + message(attr("next"))
        for start in range(0, len(data), FEED_SLICE_BYTES):
            link.dataReceived(data[start:start + FEED_SLICE_BYTES])
        assert failure(link, handler) is None
        assert [len(call[1].payload.value) for call in handler.calls][-2:] == [len(value), 4]


def nested(levels: int) -> bytes:
    return b"<a>" * levels + b"</a>" * levels


def opaque_stanza(levels: int) -> bytes:
    """A message whose opaque payload holds ``levels`` nested elements: stream depth 4 + levels."""
    return (b'<message><event xmlns="http://psepr.org/xs/event"><to><channel>/d/</channel></to>'
            b'<payload xmlns="urn:x">' + nested(levels) + b"</payload></event></message>")


def router_accepts(data: bytes) -> bool:
    """Would the router's own parser (the same rules, so what it may forward) take these bytes?"""
    try:
        stream.StreamParser().feed(HEADER + data)
    except stream.StreamError:
        return False
    return True


def test_depth_limit_is_the_routers_exactly():
    for levels in range(24, 34):
        data = opaque_stanza(levels)
        link, handler = logged_in()
        link.dataReceived(data)
        reason = failure(link, handler)
        if router_accepts(data):
            assert reason is None and len(handler.calls) == 1, levels
        else:
            assert reason == ("router sent a broken stream: policy-violation: a stanza is nested deeper than "
                              f"{stream.MAX_DEPTH} elements (counting the stream)"), levels
            assert handler.calls == []
    assert 4 + 28 == stream.MAX_DEPTH and router_accepts(opaque_stanza(28)) and not router_accepts(opaque_stanza(29))


@pytest.mark.parametrize("stanza", [
    b'<message><extra xmlns="urn:x">' + nested(40) + b"</extra><event xmlns='http://psepr.org/xs/event'/></message>",
    b'<message><event xmlns="http://psepr.org/xs/event"><to><channel>/d/</channel></to><extra>' + nested(40)
    + b'</extra><payload xmlns="urn:x"/></event></message>',
    b'<message><event xmlns="http://psepr.org/xs/event"><to><channel>/d/' + nested(40)
    + b'</channel></to><payload xmlns="urn:x"/></event></message>',  # a bad event, but too deep first
    f'<message><event xmlns="http://psepr.org/xs/event"><to><channel>/d/</channel></to><payload xmlns="{ATTRIBUTE_NS}">'
    .encode() + b"<field>f</field><value>v</value><other>" + nested(40) + b"</other></payload></event></message>",
    b'<message type="error">' + nested(40) + b"</message>",
    b'<iq type="result" id="ping-9">' + nested(40) + b"</iq>",
    b"<presence>" + nested(40) + b"</presence>",
    b'<features xmlns="urn:not:a:stanza">' + nested(40) + b"</features><presence/>",
])
def test_too_deep_anywhere_fails_the_link(stanza):
    link, handler = logged_in()
    link.dataReceived(stanza + message(attr("after")))
    assert "policy-violation: a stanza is nested deeper than 32" in failure(link, handler)
    assert handler.calls == []


@pytest.mark.parametrize("data, complaint", [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not-well-formed: Start tag expected"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)), "not-well-formed"),
    (HEADER.decode().encode("utf-16"), "not-well-formed"),
    (HEADER + b"<iq type='result' id='login'>\xff\xfe</iq>", "not-well-formed"),
    (HEADER + b"<iq type='result' id='login'></message>", "not-well-formed: Opening and ending tag mismatch"),
    (b"<stream xmlns='jabber:client'><iq type='result' id='login'/>", "invalid-namespace"),
    (b"<other><message xmlns='jabber:client'/>", "invalid-namespace"),
    (b"<s:stream xmlns:s='http://etherx.jabber.org/streams' xmlns='jabber:client'>", "bad-namespace-prefix"),
    (HEADER.replace(b'xmlns="jabber:client"', b'xmlns="jabber:server"'), "invalid-namespace"),
    (HEADER.replace(b'version="1.0"', b"xmlns:extra='urn:x' version='1.0'"), "bad-namespace-prefix"),
    (b"<?xml version='1.1'?>" + HEADER[len(b"<?xml version='1.0'?>"):], "unsupported-version"),
    (b"<?xml version='1.0' encoding='ISO-8859-1'?>" + HEADER[len(b"<?xml version='1.0'?>"):]
     + b"<iq type='result' id='login'>\xe9</iq>", "not-well-formed"),
    (LOGIN + b"<message>&#0;</message>", "not-well-formed"),
    (LOGIN + b"<message>" + b"<a>" * 300, "not-well-formed: Excessive depth"),
    (LOGIN + b"</stream:stream><message/>", "not-well-formed: Extra content at the end of the document"),
    (LOGIN + b"</stream:stream>", "router closed the stream"),
])
def test_garbage_fails_the_link_with_a_clear_reason(data, complaint):
    link, handler = new_link()
    link.dataReceived(data)
    reason = failure(link, handler)
    assert reason is not None and complaint in reason, reason
    if not reason.startswith("router closed"):
        assert reason.startswith("router sent a broken stream: ")
    assert [call for call in handler.calls if call[0] == "event"] == []


def test_a_stream_error_from_the_router_is_reported_with_its_condition_and_text():
    link, handler = logged_in()
    link.dataReceived(message(attr("before"))
                      + stream.stream_error("policy-violation", "disconnecting slow consumer: over 4194304 bytes"))
    assert failure(link, handler) == ("router ended the stream: policy-violation: "
                                      "disconnecting slow consumer: over 4194304 bytes")
    assert [call[1].payload.value for call in handler.calls] == ["before"]


def test_nothing_after_a_stream_error_is_read():
    link, handler = logged_in()
    link.dataReceived(b"<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>"
                      + message(attr("after")))
    assert failure(link, handler) == "router ended the stream: conflict: "
    assert handler.calls == []


def test_a_stream_error_before_the_login_fails_ready():
    link, handler = new_link()
    link.dataReceived(HEADER + stream.stream_error("not-authorized", "3 logins refused"))
    assert failure(link, handler) == "router ended the stream: not-authorized: 3 logins refused"
    link.dataReceived(b"<iq type='result' id='login'/>")
    assert not link._logged_in


def test_a_stream_error_without_a_known_condition_is_still_reported():
    link, handler = logged_in()
    link.dataReceived(b"<stream:error><x xmlns='urn:other'/></stream:error>")
    assert failure(link, handler) == "router ended the stream: undefined-condition: "


def test_the_router_closing_the_stream_ends_the_link():
    link, handler = logged_in()
    pending = link.flush()
    link.dataReceived(message(attr("last")) + stream.STREAM_CLOSE)
    assert failure(link, handler) == "router closed the stream"
    assert [call[1].payload.value for call in handler.calls] == ["last"]
    assert pending.called  # failed: nobody waits forever
    pending.addErrback(lambda f: f.trap(ConnectionError))


def test_a_refused_login_fails_ready_with_login_failed():
    link, handler = new_link()
    link.dataReceived(HEADER + b"<iq type='result' id='other'/>" + message(attr("early"))
                      + stream.auth_error(LOGIN_ID))
    errors = []
    link.ready.addErrback(lambda f: errors.append(f))
    assert errors and errors[0].check(LoginFailed) and not link.transport.connected
    assert handler.calls == [] and handler.lost == []


def test_a_broken_iq_fails_the_link():
    link, handler = logged_in()
    link.dataReceived(b"<iq type='result'/>")
    assert failure(link, handler) == (
        "router sent a broken iq: an iq needs a type (get, set, result, error) and an id")


def test_unreadable_events_are_dropped_and_the_stream_goes_on():
    link, handler = logged_in()
    link.dataReceived(b'<message><event xmlns="http://psepr.org/xs/event"><to><channel>nope</channel></to>'
                      b'<payload xmlns="urn:x"/></event></message>'
                      b"<message><body>no event</body></message>"
                      b'<message xmlns=""><event xmlns="http://psepr.org/xs/event"/></message>'
                      b'<other xmlns="urn:x"><message/></other>'
                      + message(attr("fine")))
    assert failure(link, handler) is None
    assert [call[1].payload.value for call in handler.calls] == ["fine"]


def test_connection_lost_is_reported():
    from twisted.python.failure import Failure
    link, handler = logged_in()
    link.connectionLost(Failure(ConnectionResetError("reset by peer")))
    assert handler.lost == ["connection lost: reset by peer"]


def test_the_reader_stays_dead_after_an_error():
    reader = StanzaReader()
    with pytest.raises(stream.StreamError) as first:
        reader.feed(b"<!DOCTYPE x><x/>")
    with pytest.raises(stream.StreamError) as again:
        reader.feed(LOGIN)
    assert again.value is first.value and reader.root is None


# ---------------------------------------------------------------- what the router forwards

NAMES = st.sampled_from(["a", "b", "x:y", "payload", "field", "value", "event", "channel"])
TEXT = st.lists(st.sampled_from(["t", " ", "\n", "\r\n", "&amp;", "&lt;", "&#13;", "&#x1F600;", "é", "<![CDATA[<&]]>",
                                 "]]", "/org/", "planetlab1"]), max_size=4).map("".join)


def _element(children):
    return st.builds(
        lambda name, attributes, text, kids, tail: (
            (f'<{name} xmlns:x="urn:x"' if ":" in name else f"<{name}") + attributes + ">" + text + "".join(kids)
            + f"</{name}>" + tail),
        NAMES, st.sampled_from(["", ' a="1"', " xmlns='urn:other'", ' x:z="&amp;"']), TEXT, children, TEXT)


#: Extra content: nothing mostly, else elements nested a few levels, text around them.
EXTRAS = st.one_of(st.just(""), st.recursive(st.just(""), lambda kids: _element(st.lists(kids, max_size=3)),
                                               max_leaves=6))
PAYLOAD_TYPES = st.sampled_from([ATTRIBUTE_NS, LEGACY_ATTRIBUTE_NS, LEASE_NS, "urn:dsmt:test"])


@st.composite
def forwarded_stanzas(draw):
    """Message stanzas near a real event: optional parts present or not, now and then repeated or wrong,
    in any order, with extra elements and text around them."""
    def part(name, text):
        return f"<{name}>{text}</{name}>"

    def often():
        return draw(st.integers(0, 9)) < 9

    def rarely():
        return draw(st.integers(0, 9)) == 9

    channel = draw(st.sampled_from(["/a/", "/a/b/", " /a/b/ ", "/org/dsmt/ns/x/"])) if often() else draw(
        st.sampled_from(["/a", "", "/a//b/"]))
    to_parts = [part("channel", channel)] if often() else []
    to_parts += [part(name, value) for name, value in (("service", "alice"), ("instance", "node1"))
                 if draw(st.booleans())]
    from_parts = [part(name, value) for name, value in (("service", draw(st.sampled_from(["bob", ROUTER_SERVICE]))),
                                                        ("instance", " h ")) if draw(st.booleans())]
    payload_type = draw(PAYLOAD_TYPES) if often() else draw(st.sampled_from(["", None]))
    if payload_type in (ATTRIBUTE_NS, LEGACY_ATTRIBUTE_NS):
        payload_parts = [part("field", draw(st.sampled_from(["f", " f "])) if often() else "")] if often() else []
        payload_parts += [part("value", draw(TEXT))] if often() else []
        if draw(st.booleans()):
            payload_parts.append(part("expire", draw(st.sampled_from(["90", " 7 "])) if often() else "x"))
    elif payload_type == LEASE_NS:
        payload_parts = [part("identifier", "l1")] if often() else []
        payload_parts += [part("duration", draw(st.sampled_from(["60", "0", "x"])))] if often() else []
        payload_parts += [part("op", draw(st.sampled_from(["register", "unregister", "steal"])))] if rarely() else []
        payload_parts += [part("type", "urn:t")] if rarely() else []
    else:
        payload_parts = [draw(EXTRAS)]
    if payload_parts and rarely():
        payload_parts.append(draw(st.sampled_from(payload_parts)))  # a repeated part
    if rarely():
        payload_parts.append(draw(EXTRAS))
    xmlns = "" if payload_type is None else f' xmlns="{payload_type}"'
    event_parts = [f"<to>{''.join(draw(st.permutations(to_parts)))}{draw(EXTRAS)}</to>" if often() else "",
                   f"<payload{xmlns}>{''.join(draw(st.permutations(payload_parts)))}</payload>" if often() else ""]
    if from_parts:
        event_parts.append(f"<from>{''.join(from_parts)}</from>")
    if rarely():
        event_parts.append(draw(EXTRAS))
    event = f'<event xmlns="http://psepr.org/xs/event">{"".join(draw(st.permutations(event_parts)))}</event>'
    attributes = draw(st.sampled_from(['', ' to="psepr"', ' type="chat"', " id='x'"]))
    extra = draw(st.sampled_from(["", '<x xmlns="jabber:x:expire" seconds="60"/>', "<body>hi</body>"]))
    return f"<message{attributes}>{extra}{event}{draw(EXTRAS)}</message>".encode()


def previous_outcome(raw: bytes):
    """What the link did with a message before StanzaReader: a second parse of its bytes with parse_event."""
    try:
        event = parse_event(raw)
    except EventError:
        return None
    if event.payload_type == LEASE_NS and event.from_service == ROUTER_SERVICE:
        return ("granted", event.payload.identifier, event.payload.duration)
    return ("event", event)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(forwarded_stanzas())
def test_whatever_the_router_forwards_never_breaks_the_link_and_reads_as_before(raw):
    """The router's parser is the judge of what reaches clients: all it accepts must pass the link.

    And the link reads it as the previous receive path (``parse_event`` on the
    stanza's bytes) did: the same event, the same grant, or dropped by both.
    """
    if not router_accepts(raw):
        return
    link, handler = logged_in()
    link.dataReceived(raw + message(attr("marker")))
    assert failure(link, handler) is None
    expected = previous_outcome(raw)
    assert handler.calls == ([] if expected is None else [expected]) + [("event", attr("marker"))]

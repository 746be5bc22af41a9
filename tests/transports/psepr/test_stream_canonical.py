"""The router's fast path for canonical messages (``StreamParser(fast_path=True)``, the default).

Every test compares the fast parser with an expat-only one (``fast_path=False``) on the same bytes: the
items must be equal (names, exact raw bytes, route headers), or both must refuse the stream with the same
condition.  Hostile variants of the canonical form — forbidden characters and references, bad UTF-8, ``]]>``,
reserved namespaces, oversized fields and stanzas — must reach expat's verdict, never slip through.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dsmt.transports.psepr import stream
from dsmt.transports.psepr.event import AttributePayload, Event, LeasePayload, OpaquePayload, event_to_xml
from dsmt.transports.psepr.stream import (
    MAX_CHANNEL_BYTES, MAX_NAME_BYTES, RouteHeader, Stanza, StreamError, StreamParser, wrap_message)

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns=\"jabber:client\" "
          b"xmlns:stream=\"http://etherx.jabber.org/streams\" to=\"psepr\" version=\"1.0\">")
SOAP_NS = "http://dsmt.org/ns/psepr/soap"
CHANNEL = "/org/dsmt/ns/soap/ping/"


def soap_event(envelope: str = "&lt;soap:Envelope xmlns:soap='urn:s'&gt;&lt;/soap:Envelope&gt;", **names) -> Event:
    xml = (f'<payload xmlns="{SOAP_NS}"><content-type>text/xml; charset=utf-8</content-type>'
           f"<envelope>{envelope}</envelope></payload>").encode()
    return Event(CHANNEL, OpaquePayload(SOAP_NS, xml), **names)


def canonical(event: Event, **wrap) -> bytes:
    return wrap_message(event_to_xml(event), **wrap)


SOAP = canonical(soap_event(from_service="bench", from_instance="caller0"))


def outcome(chunks: list[bytes], *, fast_path: bool, **options):
    """The items of a whole stream fed in ``chunks``, or ("error", condition) where it is refused."""
    parser = StreamParser(fast_path=fast_path, **options)
    items = []
    try:
        for chunk in chunks:
            items += parser.feed(chunk)
    except StreamError as exc:
        return "error", exc.condition
    return items


def same_either_way(chunks: list[bytes], **options):
    fast, slow = outcome(chunks, fast_path=True, **options), outcome(chunks, fast_path=False, **options)
    assert fast == slow
    return fast


def test_soap_message_is_taken_by_the_fast_path_with_expats_items():
    items = same_either_way([HEADER + SOAP + b"\n " + SOAP])
    assert [item.raw for item in items[1:]] == [SOAP, SOAP]
    assert items[1].route == RouteHeader(CHANNEL, None, None, "bench", "caller0", SOAP_NS)
    parser = StreamParser()
    parser.feed(HEADER)
    parser._expat = None  # the fast path must not need expat for these
    assert parser.feed(SOAP + b"\n" + SOAP + b"  ") == [Stanza("message", SOAP, items[1].route)] * 2
    assert not parser._buf


@pytest.mark.parametrize("event", [
    Event.attribute("/a/b/", "status", "x & y < z > w\r\n\tend", to_service="svc", to_instance="node1",
                    from_service="me", from_instance="host.example.org", expire=90),
    Event("/a/", LeasePayload("lease-1", 600, "register", SOAP_NS), from_service="s"),
    Event("/a/", LeasePayload("lease-1", 0, "unregister")),
    soap_event(to_instance="n\u00e9ud-\u263a", from_service="caf\u00e9"),
    Event.attribute("/a/", "f", ""),
])
def test_events_this_package_writes_route_the_same_either_way(event):
    for wrap in ({}, {"to": "r & <d>"}, {"expire_seconds": 0}):
        raw = canonical(event, **wrap)
        items = same_either_way([HEADER + raw])
        assert items[1].raw == raw and items[1].route is not None


def test_canonical_and_other_stanzas_interleave_in_order():
    other = b"<message to='psepr'><body>no event</body></message>"
    ping = stream.ping_request("p1")
    data = HEADER + SOAP + other + b"\n" + SOAP + ping + SOAP + stream.STREAM_CLOSE
    items = same_either_way([data])
    assert [getattr(item, "raw", None) for item in items[1:-1]] == [SOAP, other, SOAP, ping, SOAP]
    assert isinstance(items[-1], stream.StreamClosed)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=4 * len(SOAP) + 40), max_size=8))
def test_any_chunking_gives_the_same_items(cuts):
    data = HEADER + SOAP + b" " + SOAP + b"<presence/>" + SOAP + SOAP
    cuts = sorted(set(c + len(HEADER) for c in cuts if c + len(HEADER) < len(data)))
    chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    assert same_either_way(chunks) == outcome([data], fast_path=False)


# ---------------------------------------------------------------- hostile variants of the canonical form

def with_envelope(text: bytes) -> bytes:
    return SOAP.replace(b"<envelope>", b"<envelope>" + text, 1)


@pytest.mark.parametrize("stanza, condition", [
    (with_envelope(b"\x01"), "not-well-formed"),                          # C0 control
    (with_envelope(b"\x1f"), "not-well-formed"),
    (with_envelope(b"&#0;"), "not-well-formed"),                          # reference to no character
    (with_envelope(b"&#x1;"), "not-well-formed"),
    (with_envelope(b"&xxe;"), "not-well-formed"),                         # undefined entity
    (with_envelope(b"&amp"), "not-well-formed"),                          # unterminated reference
    (with_envelope(b"a]]>b"), "not-well-formed"),                         # CDATA end in text
    (with_envelope(b"caf\xc3"), "not-well-formed"),                       # truncated UTF-8
    (with_envelope(b"\xed\xa0\x80"), "not-well-formed"),                  # a surrogate, as UTF-8
    (with_envelope(b"\xef\xbf\xbe"), "not-well-formed"),                  # U+FFFE
    (with_envelope(b"\xef\xbf\xbf"), "not-well-formed"),                  # U+FFFF
    (with_envelope(b"\xc0\xbc"), "not-well-formed"),                      # overlong "<"
    (SOAP.replace(f'xmlns="{SOAP_NS}"'.encode(), b'xmlns="http://www.w3.org/2000/xmlns/"'), "not-well-formed"),
    (SOAP.replace(f'xmlns="{SOAP_NS}"'.encode(), b'xmlns="http://www.w3.org/XML/1998/namespace"'),
     "not-well-formed"),
    (SOAP.replace(CHANNEL.encode(), b"/" + b"c" * MAX_CHANNEL_BYTES + b"/"), "policy-violation"),
    (SOAP.replace(b">caller0<", b">" + b"i" * (MAX_NAME_BYTES + 1) + b"<"), "policy-violation"),
    (SOAP.replace(b">caller0<", ">é".encode() * 128 + b"<"), "policy-violation"),  # 128 chars, 256 bytes
    (SOAP.replace(b"</envelope>", b"</envelopf>"), "not-well-formed"),
    (SOAP.replace(f'xmlns="{SOAP_NS}"'.encode(), b'xmlns="a\tb"'), "not-well-formed"),  # expat: no tab in a URI
])
def test_hostile_canonical_lookalikes_get_expats_verdict(stanza, condition):
    assert same_either_way([HEADER + SOAP + stanza]) == ("error", condition)
    assert same_either_way([HEADER, SOAP, stanza]) == ("error", condition)


@pytest.mark.parametrize("stanza", [
    SOAP.replace(b">caller0<", b"> caller0\t\n<"),                        # stripped like expat's
    SOAP.replace(b">caller0<", b"><"),                                    # empty: None
    SOAP.replace(b">caller0<", b">caller\r0<"),                           # CR: expat's rule, not the fast path's
    SOAP.replace(b">caller0<", b">a&amp;b<"),                             # a reference in a field
    SOAP.replace(b">caller0<", b">" + b"i" * MAX_NAME_BYTES + b"<"),      # at the limit
    SOAP.replace(CHANNEL.encode(), b"/" + b"c" * (MAX_CHANNEL_BYTES - 2) + b"/"),
    SOAP.replace(f'xmlns="{SOAP_NS}"'.encode(), b'xmlns=""'),             # no payload type
    with_envelope(b"&#13;&#10;&#9;&quot;&apos;&gt;&#65;&#x263A;\xe2\x98\xba"),
    SOAP.replace(b'<message to="psepr">', b"<message>"),
    SOAP.replace(b'seconds="60"', b'seconds="99999999999"'),
])
def test_odd_but_acceptable_variants_route_the_same_either_way(stanza):
    items = same_either_way([HEADER + stanza + SOAP])
    assert [item.raw for item in items[1:]] == [stanza, SOAP]


def test_stanza_limit_is_exact_on_the_fast_path():
    for limit, accepted in ((len(SOAP), True), (len(SOAP) - 1, False)):
        result = same_either_way([HEADER + SOAP], max_stanza_bytes=limit)
        assert (result[1].raw == SOAP) if accepted else (result == ("error", "policy-violation"))


def test_errors_after_fast_stanzas_are_still_found():
    assert same_either_way([HEADER + SOAP * 3 + b"<message></mess>"]) == ("error", "not-well-formed")
    assert same_either_way([HEADER + SOAP + b"text" + SOAP]) == ("error", "bad-format")
    assert same_either_way([HEADER + SOAP + b"<!-- c -->"]) == ("error", "restricted-xml")
    assert same_either_way([HEADER + SOAP + stream.STREAM_CLOSE + SOAP]) == ("error", "not-well-formed")
    assert same_either_way([HEADER + SOAP + b"<message><a>" * 20]) == ("error", "policy-violation")


def test_nothing_before_the_stream_header_is_taken():
    assert same_either_way([SOAP]) == ("error", "invalid-namespace")
    assert outcome([HEADER[:-1], b">" + SOAP], fast_path=True)[1].raw == SOAP


MUTATIONS = st.lists(st.tuples(st.integers(min_value=0, max_value=len(SOAP) - 1),
                               st.sampled_from([b"", b"<", b">", b"&", b"]]>", b"\x00", b"\r", b"\xc3", b"\xef\xbf",
                                                b"\"", b"'", b"/", b"a", b"&lt;", b"&#0;", b"\t", b"\xe2\x98\xba"])),
                     min_size=1, max_size=4)


@settings(max_examples=500, deadline=None)
@given(MUTATIONS, st.integers(min_value=1, max_value=2 * len(SOAP)))
def test_mutated_canonical_messages_get_the_same_verdict(mutations, chunk):
    """Bytes replaced anywhere in a canonical message: the fast parser accepts exactly what expat accepts."""
    data = bytearray(SOAP)
    for position, replacement in mutations:
        data[position:position + 1] = replacement
    stream_bytes = HEADER + SOAP + bytes(data) + SOAP
    chunks = [stream_bytes[:len(HEADER)]] + [stream_bytes[i:i + chunk] for i in range(len(HEADER), len(stream_bytes),
                                                                                       chunk)]
    same_either_way(chunks)
    same_either_way([stream_bytes])


NAMES = st.none() | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufffe\uffff"
                                          + "".join(chr(c) for c in range(1, 32) if c not in (9, 10, 13))),
                            min_size=1, max_size=40).filter(lambda name: name == name.strip())
VALUES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufffe\uffff"
                               + "".join(chr(c) for c in range(1, 32) if c not in (9, 10, 13))), max_size=80)


@settings(max_examples=300, deadline=None)
@given(NAMES, NAMES, NAMES, NAMES, VALUES)
def test_generated_events_route_the_same_either_way(to_service, to_instance, from_service, from_instance, value):
    event = Event.attribute("/a/b/", "f", value, to_service=to_service, to_instance=to_instance,
                            from_service=from_service, from_instance=from_instance)
    items = same_either_way([HEADER + canonical(event)])
    assert items[1].route.to_instance == (to_instance.strip(" \t\r\n") or None if to_instance else None)


def test_attribute_payload_from_the_builders():
    raw = canonical(Event("/a/", AttributePayload("f", "v", 5)))
    assert same_either_way([HEADER + raw])[1].route.payload_type == "http://psepr.org/xs/payload/attribute"

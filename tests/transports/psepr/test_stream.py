"""Tests of the PsEPR stream codec: framing, exact raw bytes, routing headers, limits, hostile input."""
from __future__ import annotations

import itertools
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from lxml import etree

from dsmt.transports.psepr import stream
from dsmt.transports.psepr.stream import (
    MAX_CHANNEL_BYTES, MAX_DEPTH, MAX_HEADER_BYTES, MAX_NAME_BYTES, MAX_STANZA_BYTES, MAX_TOKEN_BYTES,
    NS_STREAMS, AuthRequest, RouteHeader, Stanza, StreamClosed, StreamError, StreamOpened, StreamParser,
    parse_auth, wrap_message)

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns=\"jabber:client\" "
          b"xmlns:stream=\"http://etherx.jabber.org/streams\" to=\"psepr\" version=\"1.0\">")
CHANNEL = "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-mgr/status/"
ATTRIBUTE_NS = "http://psepr.org/xs/payload/attribute"
LEASE_NS = "http://psepr.org/xs/payload/lease"

#: The message of the original clients, as they format it.
EXAMPLE = f"""<message to="psepr"><x xmlns="jabber:x:expire" seconds="60"/>
<event xmlns="http://psepr.org/xs/event">
  <to><channel>{CHANNEL}</channel>
      <service>xyz1_mgr</service><instance/></to>
  <from><service>xyz1_mgr</service><instance>planetlab5.nbgisp.com</instance></from>
  <payload xmlns="{ATTRIBUTE_NS}">
    <field>deployment-status</field><value>hostname=planetlab5.nbgisp.com,status=requested</value><expire>90</expire></payload></event></message>""".encode()
EXAMPLE_ROUTE = RouteHeader(CHANNEL, "xyz1_mgr", None, "xyz1_mgr", "planetlab5.nbgisp.com", ATTRIBUTE_NS)

#: Stanzas whose raw bytes must come back exactly: odd whitespace, both quote
#: styles, self-closing tags, CDATA, character and entity references,
#: ">" and "/>" inside attribute values, non-ASCII text.
ODD_STANZAS = [
    b"<iq type='set' id=\"a1\"><query xmlns='jabber:iq:auth'><username>xyz1_mgr</username>"
    b"<password>s&amp;cr&#233;t</password><resource>host.example.org</resource></query></iq>",
    b"<message\n   to = 'psepr'\t><x xmlns='jabber:x:expire' seconds='60' />"
    b"<event xmlns='http://psepr.org/xs/event'><to ><channel><![CDATA[/a/<b>/]]>c/</channel><instance/></to>"
    b"<payload xmlns='urn:x'><v a='x>y' b=\"/>\">caf\xc3\xa9 &#x263A; &lt;&gt;</v></payload></event></message  >",
    b"<iq id='/>' type=\"result\"/>",
    b"<presence/>",
    b"<message to='a&gt;b'><body>no event here</body></message>",
]


def collect(chunks) -> list:
    parser = StreamParser()
    return [item for chunk in chunks for item in parser.feed(chunk)]


def stanzas_of(data: bytes) -> list[Stanza]:
    return [item for item in collect([data]) if isinstance(item, Stanza)]


def route_of(event: bytes) -> RouteHeader | None:
    (stanza,) = stanzas_of(HEADER + b"<message>" + event + b"</message>")
    return stanza.route


def fails(data: bytes | list[bytes], condition: str, text: str | None = None, **parser_options) -> StreamError:
    parser = StreamParser(**parser_options)
    with pytest.raises(StreamError) as caught:
        for chunk in [data] if isinstance(data, bytes) else data:
            parser.feed(chunk)
    assert caught.value.condition == condition, caught.value
    if text is not None:
        assert text in caught.value.text
    return caught.value


def event_xml(to: str = f"<channel>{CHANNEL}</channel>", sender: str = "", payload: str = "") -> bytes:
    return f'<event xmlns="http://psepr.org/xs/event"><to>{to}</to>{sender}{payload}</event>'.encode()


# ---------------------------------------------------------------- framing

def test_example_stream_items():
    data = HEADER + b"\n" + EXAMPLE + b"\n  " + stream.STREAM_CLOSE
    assert collect([data]) == [
        StreamOpened({"to": "psepr", "version": "1.0"}),
        Stanza("message", EXAMPLE, EXAMPLE_ROUTE),
        StreamClosed(),
    ]


def test_stanza_names():
    data = (HEADER + b"<iq type='get' id='1'/><stream:features/><foo xmlns='urn:x'/><bar xmlns=''/>"
            + stream.STREAM_CLOSE)
    assert [stanza.name for stanza in stanzas_of(data)] == [
        "iq", "{http://etherx.jabber.org/streams}features", "{urn:x}foo", "{}bar"]


def test_header_attributes_in_clark_notation():
    header = HEADER.replace(b' version="1.0"', b" xml:lang='en' id='x&amp;y'")
    (opened,) = collect([header])
    assert opened.attributes == {"to": "psepr", "{http://www.w3.org/XML/1998/namespace}lang": "en", "id": "x&y"}


@pytest.mark.parametrize("raw", ODD_STANZAS)
def test_raw_is_exactly_the_received_bytes(raw):
    data = HEADER + b" \r\n\t" + raw + b"\n" + raw + stream.STREAM_CLOSE
    assert [stanza.raw for stanza in stanzas_of(data)] == [raw, raw]
    assert all(type(stanza.raw) is bytes for stanza in stanzas_of(data))


def test_empty_stanza_right_before_stream_close():
    data = HEADER + b"<iq type='result' id='a1'/>" + stream.STREAM_CLOSE
    assert collect([data])[1:] == [Stanza("iq", b"<iq type='result' id='a1'/>", None), StreamClosed()]


def test_whole_example_stream():
    data = real_stream()
    items = collect([data])
    assert [type(item).__name__ for item in items] == (
        ["StreamOpened"] + ["Stanza"] * (len(ODD_STANZAS) + 2) + ["StreamClosed"])
    assert [item.raw for item in items[1:-1]] == [EXAMPLE, *ODD_STANZAS, EXAMPLE]


def real_stream() -> bytes:
    return HEADER + b"\n".join([EXAMPLE, *ODD_STANZAS, b" ", EXAMPLE]) + b" \n" + stream.STREAM_CLOSE


def test_byte_by_byte_feeding_gives_the_same_items():
    data = real_stream()
    assert collect(data[i:i + 1] for i in range(len(data))) == collect([data])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=len(real_stream())), max_size=40))
def test_any_chunking_gives_the_same_items(cuts):
    data = real_stream()
    bounds = [0, *sorted(cuts), len(data)]
    assert collect(data[a:b] for a, b in zip(bounds, bounds[1:])) == collect([data])


def test_whitespace_keepalives_are_not_buffered():
    parser = StreamParser()
    parser.feed(HEADER)
    tracemalloc.start()
    try:
        for _ in range(160):  # 10 MiB of keep-alives
            assert parser.feed(b" " * 65536) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024
    assert parser.feed(EXAMPLE) == [Stanza("message", EXAMPLE, EXAMPLE_ROUTE)]


def test_empty_feed_and_header_alone():
    parser = StreamParser()
    assert parser.feed(b"") == []
    assert parser.feed(HEADER[:10]) == []
    assert parser.feed(HEADER[10:]) == [StreamOpened({"to": "psepr", "version": "1.0"})]


# ---------------------------------------------------------------- routing header

FIELD_FORMS = {"absent": "", "empty": "<{0}/>", "blank": "<{0}> \n </{0}>", "present": "<{0}> value-{0} </{0}>"}


@pytest.mark.parametrize("service, instance", list(itertools.product(FIELD_FORMS, FIELD_FORMS)))
@pytest.mark.parametrize("with_from", [False, True])
def test_route_fields_absent_empty_present(service, instance, with_from):
    to = f"<channel>{CHANNEL}</channel>" + FIELD_FORMS[service].format("service") + FIELD_FORMS[instance].format(
        "instance")
    sender = ("<from>" + FIELD_FORMS[instance].format("service") + FIELD_FORMS[service].format("instance")
              + "</from>") if with_from else ""
    route = route_of(event_xml(to, sender, f'<payload xmlns="{LEASE_NS}"><op>register</op></payload>'))
    expected_service = "value-service" if service == "present" else None
    expected_instance = "value-instance" if instance == "present" else None
    assert route == RouteHeader(
        CHANNEL, expected_service, expected_instance,
        ("value-service" if instance == "present" else None) if with_from else None,
        ("value-instance" if service == "present" else None) if with_from else None,
        LEASE_NS)


@pytest.mark.parametrize("to, channel", [
    ("", None),
    ("<channel/>", None),
    ("<channel>  </channel>", None),
    ("<channel>\n /a/b/ \n</channel>", "/a/b/"),
    ("<channel>\u00a0/a/\u2003</channel>", "\u00a0/a/\u2003"),  # only XML whitespace is stripped
    ("<channel><![CDATA[/a/]]>b&#47;&amp;/</channel>", "/a/b/&/"),
])
def test_channel_text(to, channel):
    assert route_of(event_xml(to)).channel == channel


@pytest.mark.parametrize("payload, payload_type", [
    ("", None),
    (f'<payload xmlns="{ATTRIBUTE_NS}"><field>f</field></payload>', ATTRIBUTE_NS),
    ('<payload xmlns="urn:example:opaque"><a><b/></a></payload>', "urn:example:opaque"),
    ('<p:payload xmlns:p="urn:prefixed"/>', "urn:prefixed"),
    ('<payload xmlns=""/>', None),
])
def test_payload_type_is_the_payload_namespace(payload, payload_type):
    assert route_of(event_xml(payload=payload)).payload_type == payload_type


@pytest.mark.parametrize("body", [
    b"<body>hello</body>",
    b"<wrap><event xmlns='http://psepr.org/xs/event'><to><channel>/a/</channel></to></event></wrap>",
    b"<event xmlns='urn:not-psepr'><to><channel>/a/</channel></to></event>",
])
def test_no_route_without_a_psepr_event_child(body):
    assert route_of(body) is None


def test_no_route_for_non_message_stanzas():
    data = HEADER + b"<iq type='set' id='1'>" + event_xml() + b"</iq>"
    assert stanzas_of(data)[0].route is None


def test_routing_elements_outside_their_place_are_ignored():
    # a <channel> under <from>, or deeper inside <to>, is not the route's channel
    event = event_xml(to="<x><channel>/deep/</channel></x><channel>/real/</channel>",
                      sender="<from><channel>/no/</channel></from>")
    assert route_of(event).channel == "/real/"


def test_wrap_message_output_routes():
    raw = wrap_message(b"<?xml version='1.0' encoding='UTF-8'?>\n" + event_xml())
    assert raw.startswith(b'<message to="psepr"><x xmlns="jabber:x:expire" seconds="60"/><event ')
    assert stanzas_of(HEADER + raw) == [Stanza("message", raw, RouteHeader(CHANNEL, None, None, None, None, None))]


@pytest.mark.parametrize("event, text", [
    (event_xml() + event_xml(), "more than one <event> in <message>"),
    (event_xml(to=f"<channel>{CHANNEL}</channel><channel>/other/</channel>"), "more than one <channel> in <to>"),
    (event_xml(to="<channel>/a/</channel></to><to><service>s</service>"), "more than one <to> in <event>"),
    (event_xml(sender="<from><instance/><instance>i</instance></from>"), "more than one <instance> in <from>"),
    (event_xml(payload="<payload xmlns='urn:a'/><payload xmlns='urn:b'/>"), "more than one <payload> in <event>"),
])
def test_ambiguous_routes_are_refused(event, text):
    fails(HEADER + b"<message>" + event + b"</message>", "bad-format", text)


def test_element_inside_a_routing_field_is_refused():
    fails(HEADER + b"<message>" + event_xml(to="<channel>/a/<b/></channel>") + b"</message>", "bad-format",
          "element inside <channel>")


@pytest.mark.parametrize("field, limit", [("channel", MAX_CHANNEL_BYTES), ("service", MAX_NAME_BYTES),
                                          ("instance", MAX_NAME_BYTES)])
def test_routing_field_limits_in_utf8_bytes(field, limit):
    at_limit = "a" * limit
    assert route_of(event_xml(to=f"<{field}>{at_limit}</{field}>"))[("channel", "service", "instance").index(
        field)] == at_limit
    fails(HEADER + b"<message>" + event_xml(to=f"<{field}>{at_limit}b</{field}>") + b"</message>",
          "policy-violation", f"<to><{field}> exceeds {limit} bytes")
    two_byte = "\u00e9" * (limit // 2 + 1)  # fewer characters than the limit, more bytes
    fails(HEADER + b"<message>" + event_xml(to=f"<{field}>{two_byte}</{field}>") + b"</message>",
          "policy-violation", f"exceeds {limit} bytes")


def test_long_routing_field_is_refused_while_it_arrives():
    parser = StreamParser()
    parser.feed(HEADER + b"<message><event xmlns='http://psepr.org/xs/event'><to><channel>")
    parser.feed(b"a" * MAX_CHANNEL_BYTES)
    with pytest.raises(StreamError, match="exceeds 1024 bytes"):
        parser.feed(b"a")


# ---------------------------------------------------------------- builders

def test_stream_header_round_trip():
    header = stream.stream_header(sender="psepr", stream_id='i"d<&\n', to="x")
    assert header.startswith(b"<?xml version='1.0'?><stream:stream ")
    assert collect([header]) == [StreamOpened({"to": "x", "from": "psepr", "id": 'i"d<&\n', "version": "1.0"})]


def test_auth_request_round_trip():
    raw = stream.auth_request("a&1", "xyz1_mgr", "p<a>ss \r\nw\u00f6rd", "host.example.org")
    (stanza,) = stanzas_of(HEADER + raw)
    assert stanza == Stanza("iq", raw, None)
    assert parse_auth(stanza.raw) == AuthRequest("a&1", "set", "xyz1_mgr", "p<a>ss \r\nw\u00f6rd", "host.example.org")


def test_auth_fields_request_and_result():
    assert parse_auth(stream.auth_fields_request("q1")) == AuthRequest("q1", "get", None, None, None)
    result = etree.fromstring(stream.auth_fields_result("q1"))
    assert (result.get("type"), result.get("id")) == ("result", "q1")
    assert [child.tag for child in result.find("{jabber:iq:auth}query")] == [
        "{jabber:iq:auth}username", "{jabber:iq:auth}password", "{jabber:iq:auth}resource"]


def test_auth_result_and_error():
    assert stream.auth_result("a1") == b'<iq type="result" id="a1"/>'
    error = etree.fromstring(stream.auth_error("a1"))
    assert (error.get("type"), error.get("id")) == ("error", "a1")
    assert error.find("error").attrib == {"code": "401", "type": "auth"}
    assert error.find("error/{urn:ietf:params:xml:ns:xmpp-stanzas}not-authorized") is not None
    data = HEADER + stream.auth_result("a1") + stream.auth_error("a1")
    assert [s.name for s in stanzas_of(data)] == ["iq", "iq"]


def test_stream_error_round_trip():
    raw = stream.stream_error("policy-violation", "stanza <too> big & bad")
    items = collect([stream.stream_header(sender="psepr", stream_id="1") + raw])
    assert items[1].name == f"{{{NS_STREAMS}}}error"
    assert items[2] == StreamClosed()
    assert stream.parse_stream_error(items[1].raw) == ("policy-violation", "stanza <too> big & bad")
    with pytest.raises(StreamError, match="expected one"):
        stream.parse_stream_error(b"<iq/>")
    with pytest.raises(ValueError):
        stream.stream_error("no-such-condition", "x")


def test_error_message_round_trip():
    (stanza,) = stanzas_of(HEADER + stream.error_message("bad <channel> & more"))
    assert stanza.name == "message" and stanza.route is None
    assert etree.fromstring(stanza.raw).findtext(".//{urn:ietf:params:xml:ns:xmpp-stanzas}text") == (
        "bad <channel> & more")


def test_wrap_message_options_and_declarations():
    event = event_xml()
    assert wrap_message(event, to="r&d", expire_seconds=5) == (
        b'<message to="r&amp;d"><x xmlns="jabber:x:expire" seconds="5"/>' + event + b"</message>")
    assert wrap_message(b'<?xml version="1.0"?>' + event) == wrap_message(event)
    with pytest.raises(ValueError, match="UTF-16"):
        wrap_message(b"<?xml version='1.0' encoding='UTF-16'?>" + event)
    with pytest.raises(ValueError):
        wrap_message(event, expire_seconds=-1)
    wrap_message(event, expire_seconds=1)  # cached: True == 1 must not find it
    for _ in range(2):  # the wrapper's start is cached: refusals are not
        with pytest.raises(ValueError, match="non-negative int, not True"):
            wrap_message(event, expire_seconds=True)  # was written as seconds="True"
        with pytest.raises(ValueError, match="non-negative int, not 1.5"):
            wrap_message(event, expire_seconds=1.5)
        with pytest.raises(TypeError, match="expected str, not list"):
            wrap_message(event, to=["psepr"])
        with pytest.raises(ValueError, match="U\\+0000"):
            wrap_message(event, to="a\x00")
    assert wrap_message(event, expire_seconds=1) != wrap_message(event, expire_seconds=2)
    assert wrap_message(b"<?xml?>" + event).startswith(b'<message to="psepr"><x') and b"<?xml?>" in \
        wrap_message(b"<?xml?>" + event)  # not a declaration: kept as it is


@pytest.mark.parametrize("build", [
    lambda bad: stream.auth_request("1", bad, "p", "r"),
    lambda bad: stream.auth_result(bad),
    lambda bad: stream.stream_header(to=bad),
    lambda bad: stream.error_message(bad),
])
def test_builders_refuse_characters_xml_cannot_carry(build):
    with pytest.raises(ValueError, match="U\\+0000"):
        build("a\x00b")


@pytest.mark.parametrize("raw, text", [
    (b"<iq type='set' id='1'><query xmlns='jabber:iq:register'/></iq>", "no <query"),
    (b"<iq type='result' id='1'><query xmlns='jabber:iq:auth'/></iq>", "type 'set' or 'get'"),
    (b"<iq type='set'><query xmlns='jabber:iq:auth'/></iq>", "an id"),
    (b"<message><query xmlns='jabber:iq:auth'/></message>", "expected <iq>"),
    (b"<iq type='set' id='1'><query xmlns='jabber:iq:auth'>", "not well-formed"),
    (b"<!DOCTYPE iq [<!ENTITY x SYSTEM 'file:///etc/passwd'>]><iq type='set' id='1'>"
     b"<query xmlns='jabber:iq:auth'><username>&x;</username></query></iq>", "DOCTYPE"),
    (b"<iq type='set' id='1'><query xmlns='jabber:iq:auth'><password>" + b"x" * 9000
     + b"</password></query></iq>", "over the limit"),
])
def test_parse_auth_refuses_anything_else(raw, text):
    with pytest.raises(StreamError) as caught:
        parse_auth(raw)
    assert caught.value.condition == "bad-format"
    assert text in caught.value.text


def test_parse_auth_accepts_jabber_client_namespace():
    raw = (b"<iq xmlns='jabber:client' type='get' id='g'>"
           b"<query xmlns='jabber:iq:auth'><username>u</username></query></iq>")
    assert parse_auth(raw) == AuthRequest("g", "get", "u", None, None)


# ---------------------------------------------------------------- hostile input

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<stream:stream xmlns="jabber:client" xmlns:stream="http://etherx.jabber.org/streams">
<message>&lol3;</message>"""
XXE = b"""<?xml version="1.0"?><!DOCTYPE m [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<stream:stream xmlns="jabber:client" xmlns:stream="http://etherx.jabber.org/streams"><message>&xxe;</message>"""


@pytest.mark.parametrize("data, condition, text", [
    (BILLION_LAUGHS, "restricted-xml", "DOCTYPE not allowed"),
    (XXE, "restricted-xml", "DOCTYPE not allowed"),
    (b"<!DOCTYPE stream:stream>" + HEADER[21:], "restricted-xml", "DOCTYPE not allowed"),
    (HEADER + b"<message>&xxe;</message>", "not-well-formed", "undefined entity"),
    (HEADER + b"<?php evil()?>", "restricted-xml", "processing instruction <?php?>"),
    (HEADER + b"<message><?pi x?></message>", "restricted-xml", "processing instruction"),
    (HEADER + b"<message><!-- hidden --></message>", "restricted-xml", "comment not allowed"),
    (HEADER + b"<message>\xff\xfe</message>", "not-well-formed", "not well-formed"),
    (HEADER + b"<message>caf\xc3</message>", "not-well-formed", None),
    (b"<?xml version='1.0' encoding='UTF-16'?>" + HEADER[21:], "unsupported-encoding", "UTF-16"),
    (b"<?xml version='1.0' encoding='ISO-8859-1'?>" + HEADER[21:], "unsupported-encoding", "ISO-8859-1"),
    (HEADER.decode().encode("utf-16"), "unsupported-encoding", "UTF-16"),
    (HEADER[21:].decode().encode("utf-16"), "unsupported-encoding", "UTF-16"),
    (HEADER[21:].decode().encode("utf-16-be"), "unsupported-encoding", "UTF-16"),
    (HEADER[21:].decode().encode("utf-16-le"), "unsupported-encoding", "UTF-16"),
    (HEADER[21:].decode().encode("utf-32"), "not-well-formed", None),
    (b"\xef\xbb\xbf" + HEADER + b"<message>\x00</message>", "not-well-formed", None),
    (b"<?xml version='1.1'?>" + HEADER[21:], "unsupported-version", "1.1"),
    (HEADER + b"<message><x:y/></message>", "not-well-formed", "unbound prefix"),
    (HEADER.replace(b" to=", b" xmlns:x='urn:x' to="), "bad-namespace-prefix", "declares prefix 'x'"),
    (HEADER.replace(b"http://etherx.jabber.org/streams", b"urn:other"), "invalid-namespace", "<stream:stream>"),
    (HEADER.replace(b'xmlns="jabber:client" ', b""), "invalid-namespace", "default namespace"),
    (HEADER.replace(b'"jabber:client"', b'"jabber:server"'), "invalid-namespace", "default namespace"),
    (b"<s:stream xmlns='jabber:client' xmlns:s='http://etherx.jabber.org/streams'>", "bad-namespace-prefix", "'s'"),
    (b"<message xmlns='jabber:client'/>", "invalid-namespace", None),
    (HEADER + b"hello<message/>", "bad-format", "text outside stanzas: 'hello'"),
    (HEADER + "\u00a0".encode() + b"<message/>", "bad-format", "text outside stanzas"),
    (HEADER + b"<message></mess>", "not-well-formed", f"mismatched tag at line 1, column {len(HEADER) + 11}"),
    (b"\x00\x01garbage", "not-well-formed", None),
    (HEADER + stream.STREAM_CLOSE + b"<message/>", "not-well-formed", "junk after document element"),
])
def test_hostile_streams_are_refused(data, condition, text):
    fails(data, condition, text)


def test_depth_limit():
    def nested(depth):  # stream + message make 2 levels
        return HEADER + b"<message>" + b"<a>" * (depth - 2) + b"</a>" * (depth - 2) + b"</message>"
    assert stanzas_of(nested(MAX_DEPTH))[0].name == "message"
    fails(nested(MAX_DEPTH + 1), "policy-violation", f"depth {MAX_DEPTH + 1} exceeds {MAX_DEPTH}")
    fails(HEADER + b"<a>" * 100_000, "policy-violation", "depth 33 exceeds 32")


def test_stanza_limit_is_exact():
    body = b"<message>" + b"x" * 1000 + b"</message>"
    assert stanzas_of(HEADER + body)[0].raw == body
    fails(HEADER + body, "policy-violation", f"stanza exceeds {len(body) - 1} bytes", max_stanza_bytes=len(body) - 1)
    assert StreamParser(max_stanza_bytes=len(body)).feed(HEADER + body)[1].raw == body


def test_default_stanza_limit_fits_a_largest_event():
    from dsmt.transports.psepr import event
    assert stream.NS_EVENT == event.EVENT_NS
    assert stream.MAX_EVENT_BYTES == event.MAX_EVENT_BYTES
    big = event_xml(payload='<payload xmlns="urn:x">' + "x" * (event.MAX_EVENT_BYTES - 200) + "</payload>")
    assert len(big) <= event.MAX_EVENT_BYTES
    raw = wrap_message(big, to="psepr" * 100)
    assert stanzas_of(HEADER + raw)[0].raw == raw


@pytest.mark.parametrize("one_feed", [False, True])
def test_oversized_stanza_is_refused_as_the_limit_is_crossed(one_feed):
    """10 MiB of one stanza: refused within a feed slice of the limit, memory bounded by the limit."""
    chunk = 64 * 1024
    parser = StreamParser()
    parser.feed(HEADER + b"<message><body>")
    data = b"x" * (10 * 1024 * 1024)
    fed = 0
    tracemalloc.start()
    try:
        with pytest.raises(StreamError) as caught:
            if one_feed:
                parser.feed(data)
            for fed in range(0, len(data), chunk):
                parser.feed(data[fed:fed + chunk])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.condition == "policy-violation"
    assert caught.value.text == f"stanza exceeds {MAX_STANZA_BYTES} bytes"
    assert one_feed or fed <= MAX_STANZA_BYTES + chunk
    assert peak < 2 * MAX_STANZA_BYTES + 4 * chunk


def test_oversized_start_tag_is_refused_while_it_arrives():
    parser = StreamParser()
    parser.feed(HEADER + b"<message a='")
    with pytest.raises(StreamError, match=f"unfinished markup exceeds {MAX_TOKEN_BYTES} bytes"):
        for _ in range(MAX_TOKEN_BYTES // 1024 + 1):
            parser.feed(b"y" * 1024)


def test_oversized_header_is_refused():
    fails([HEADER[:-1], b" a='" + b"x" * MAX_HEADER_BYTES], "policy-violation",
          f"stream header exceeds {MAX_HEADER_BYTES} bytes")
    fails(HEADER[:-1] + b" a='" + b"x" * MAX_HEADER_BYTES + b"'>", "policy-violation", "stream header exceeds")
    fails(b" " * (MAX_HEADER_BYTES + 1), "policy-violation", "stream header exceeds")


def test_parser_is_dead_after_an_error():
    parser = StreamParser()
    with pytest.raises(StreamError) as first:
        parser.feed(HEADER + b"<message><!-- x --></message>")
    with pytest.raises(StreamError) as again:
        parser.feed(EXAMPLE)
    assert again.value is first.value


def test_stream_error_requires_a_known_condition():
    assert StreamError("not-well-formed", "x").condition == "not-well-formed"
    with pytest.raises(ValueError):
        StreamError("whatever", "x")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_only_ever_raise_stream_error(data, after_header):
    parser = StreamParser()
    try:
        if after_header:
            parser.feed(HEADER)
        parser.feed(data)
    except StreamError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(real_stream()) - 1), st.integers(min_value=0, max_value=255))
def test_corrupted_streams_only_ever_raise_stream_error(position, value):
    data = bytearray(real_stream())
    data[position] = value
    try:
        collect([bytes(data[:position + 1]), bytes(data[position + 1:])])
    except StreamError:
        pass


XMLISH = st.lists(st.sampled_from([
    "<", ">", "/", "/>", "</", "'", '"', "=", " ", "\n", ":", "&", ";", "&amp;", "&#65;", "!", "[", "]", "?", "-",
    "<!--", "-->", "<![CDATA[", "]]>", "<?", "?>", "message", "event", "iq", "x", "stream:", "xmlns", "xmlns:p",
    "p:", "http://psepr.org/xs/event", "to", "channel", "payload", "</message>", "<message>", "</stream:stream>",
    "\u00e9", "\x00", "\ud7ff",
]), max_size=60).map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass"))


@settings(max_examples=500, deadline=None)
@given(XMLISH, st.integers(min_value=1, max_value=64))
def test_xml_like_garbage_only_ever_raises_stream_error(data, chunk):
    parser = StreamParser()
    parser.feed(HEADER)
    try:
        for start in range(0, len(data), chunk):
            for item in parser.feed(data[start:start + chunk]):
                if isinstance(item, Stanza):  # whatever is accepted is exactly a well-formed piece of the input
                    assert item.raw in data
                    etree.fromstring(b"<s xmlns:stream='http://etherx.jabber.org/streams'>" + item.raw + b"</s>")
    except StreamError:
        pass

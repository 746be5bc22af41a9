"""Event model and codec: round trips, the reference wire format, hostile input."""
import pytest
from hypothesis import given, settings, strategies as st
from lxml import etree

from dsmt.transports.psepr.event import (
    ATTRIBUTE_NS, LEASE_NS, LEGACY_ATTRIBUTE_NS, MAX_EVENT_BYTES, AttributePayload, Event, EventError,
    LeasePayload, OpaquePayload, event_to_xml, parse_event)

REFERENCE = b"""<message to="psepr"><x xmlns="jabber:x:expire" seconds="60"/>
<event xmlns="http://psepr.org/xs/event">
  <to><channel>/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-mgr/status/</channel>
      <service>xyz1_mgr</service><instance/></to>
  <from><service>xyz1_mgr</service><instance>planetlab5.nbgisp.com</instance></from>
  <payload xmlns="http://psepr.org/ns/payload/attribute">
    <field>deployment-status</field><value>hostname=planetlab5.nbgisp.com,component=org.dsmt.component.sliver-mgr,managed=org.dsmt.component.container,slice=xyz1,status=requested</value>
    <expire>90</expire></payload></event></message>"""

SEGMENT = st.text(alphabet="abz09.-_:", min_size=1, max_size=10).filter(lambda s: s not in (".", ".."))
CHANNEL = st.lists(SEGMENT, max_size=6).map(lambda segs: "/" + "".join(s + "/" for s in segs))
NAME = st.none() | st.text(alphabet="abcxyz019._-", min_size=1, max_size=20)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufffe\uffff"
                             + "".join(chr(c) for c in range(1, 32) if c not in (9, 10, 13))), max_size=50)


def test_reference_event_parses_with_legacy_namespace():
    event = parse_event(REFERENCE)
    assert event.channel == "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-mgr/status/"
    assert event.to_service == "xyz1_mgr" and event.to_instance is None
    assert event.from_service == "xyz1_mgr" and event.from_instance == "planetlab5.nbgisp.com"
    assert event.payload_type == ATTRIBUTE_NS  # legacy spelling normalised
    assert event.payload.field == "deployment-status"
    assert event.payload.value.endswith("slice=xyz1,status=requested")
    assert event.payload.expire == 90


def test_built_event_validates_against_the_published_xsd():
    import pathlib
    schema = etree.XMLSchema(etree.parse(str(pathlib.Path(__file__).parents[3] / "wsdl" / "psepr-event.xsd")))
    for event in (
        Event.attribute("/a/", "f", "v", expire=5, to_service="s", to_instance="i", from_service="me"),
        Event("/a/", LeasePayload("l1", 60)),
        Event("/a/", LeasePayload("l1", 60, "unregister", ATTRIBUTE_NS)),
        Event("/a/", OpaquePayload.from_xml(b'<payload xmlns="urn:x"><anything/></payload>')),
    ):
        assert schema.validate(etree.fromstring(event_to_xml(event))), schema.error_log


@settings(max_examples=200)
@given(CHANNEL, TEXT.filter(lambda s: s.strip() == s and s), TEXT, st.none() | st.integers(0, 10**9),
       NAME, NAME, NAME, NAME)
def test_attribute_round_trip(channel, field, value, expire, ts, ti, fs, fi):
    event = Event.attribute(channel, field, value, expire=expire, to_service=ts, to_instance=ti,
                            from_service=fs, from_instance=fi)
    assert parse_event(event_to_xml(event)) == event


@given(st.text(alphabet="abc-_.0", min_size=1, max_size=30), st.integers(0, 10**6),
       st.sampled_from(["register", "unregister"]), st.none() | st.sampled_from([ATTRIBUTE_NS, "urn:x:y"]))
def test_lease_round_trip(identifier, duration, op, payload_type):
    event = Event("/x/", LeasePayload(identifier, duration, op, payload_type))
    assert parse_event(event_to_xml(event)) == event


def test_opaque_payload_round_trip_keeps_namespace_and_content():
    payload = OpaquePayload.from_xml(
        b'<p:payload xmlns:p="urn:soap-over-psepr"><p:env a="1">x &amp; y</p:env></p:payload>')
    event = parse_event(event_to_xml(Event("/soap/", payload)))
    assert event.payload_type == "urn:soap-over-psepr"
    element = event.payload.element()
    assert element.find("{urn:soap-over-psepr}env").text == "x & y"


def test_opaque_payload_is_checked_on_construction():
    with pytest.raises(EventError, match="not well-formed"):
        OpaquePayload("urn:x", b"<payload xmlns='urn:x'>")
    with pytest.raises(EventError, match="namespace"):
        OpaquePayload("urn:y", b"<payload xmlns='urn:x'/>")
    with pytest.raises(EventError, match="own structure"):
        OpaquePayload.from_xml(f'<payload xmlns="{LEASE_NS}"/>'.encode())


def _wrap(body: str) -> bytes:
    return f'<event xmlns="http://psepr.org/xs/event">{body}</event>'.encode()


ATTR = f'<payload xmlns="{ATTRIBUTE_NS}"><field>f</field><value>v</value></payload>'


@pytest.mark.parametrize("data, complaint", [
    (b"", "empty|not well-formed"),
    (b"not xml", "not well-formed"),
    (b"<event xmlns='http://psepr.org/xs/event'>", "not well-formed"),
    (b"<event/>", "expected <event"),
    (_wrap(ATTR), "no <to>"),
    (_wrap("<to/>" + ATTR), "no <channel>"),
    (_wrap("<to><channel>  </channel></to>" + ATTR), "channel is empty"),
    (_wrap("<to><channel>/a</channel></to>" + ATTR), "begin and end"),
    (_wrap("<to><channel>/a/</channel><channel>/b/</channel></to>" + ATTR), "at most one"),
    (_wrap("<to><channel>/a/</channel></to>"), "exactly one <payload>"),
    (_wrap("<to><channel>/a/</channel></to>" + ATTR + ATTR), "exactly one <payload>"),
    (_wrap("<to><channel>/a/</channel></to><payload><field>f</field></payload>"), "no namespace of its own"),
    (_wrap(f'<to><channel>/a/</channel></to><payload xmlns="{ATTRIBUTE_NS}"><value>v</value></payload>'),
     "no <field>"),
    (_wrap(f'<to><channel>/a/</channel></to><payload xmlns="{ATTRIBUTE_NS}"><field>f</field>'
           '<value>v</value><expire>-3</expire></payload>'), "non-negative integer"),
    (_wrap(f'<to><channel>/a/</channel></to><payload xmlns="{LEASE_NS}"><identifier>x</identifier>'
           '<duration>60</duration><op>steal</op></payload>'), "op must be"),
    (_wrap(f'<to><channel>/a/</channel></to><payload xmlns="{LEASE_NS}"><identifier>x</identifier>'
           '<duration>99999999999999999999</duration></payload>'), "non-negative integer"),
    (_wrap(f'<to><channel>/a/</channel><service><b/></service></to>{ATTR}'), "must hold text"),
    (_wrap(f'<to><channel>/a/</channel><service>{"s" * 300}</service></to>{ATTR}'), "longer than 255"),
    (b"<message><body/></message>", "exactly one event"),
])
def test_malformed_events_name_the_problem(data, complaint):
    with pytest.raises(EventError, match=complaint):
        parse_event(data)


@pytest.mark.parametrize("data", [
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
    b'<event xmlns="http://psepr.org/xs/event"><to><channel>/&lol2;/</channel></to></event>',
    b'<!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]><event xmlns="http://psepr.org/xs/event">&x;</event>',
    b'<!doctype e SYSTEM "http://127.0.0.1:9/evil.dtd"><e/>',
])
def test_dtds_and_entities_are_refused(data):
    with pytest.raises(EventError, match="DOCTYPE"):
        parse_event(data)


def test_oversized_event_is_refused_before_parsing():
    data = _wrap("<to><channel>/a/</channel></to>" + ATTR.replace("<value>v", "<value>" + "v" * MAX_EVENT_BYTES))
    with pytest.raises(EventError, match="over the limit"):
        parse_event(data)


def test_deep_event_is_refused():
    deep = "<a>" * 40 + "</a>" * 40
    data = _wrap(f'<to><channel>/a/</channel></to><payload xmlns="urn:x">{deep}</payload>')
    with pytest.raises(EventError, match="deeper than"):
        parse_event(data)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_event_error(data):
    try:
        parse_event(data)
    except EventError:
        pass


@settings(max_examples=200)
@given(st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_corrupted_reference_only_ever_raises_event_error(position, junk):
    data = REFERENCE[:position] + junk + REFERENCE[position + len(junk):]
    try:
        parse_event(data)
    except EventError:
        pass


@pytest.mark.parametrize("kwargs, complaint", [
    (dict(channel="nope", payload=AttributePayload("f", "v")), "begin and end"),
    (dict(channel="/a/", payload="text"), "payload must be"),
    (dict(channel="/a/", payload=AttributePayload("f", "v"), to_service=" padded"), "non-empty"),
    (dict(channel="/a/", payload=AttributePayload("f", "v"), from_instance="a\x01b"), "U\\+0001"),
])
def test_invalid_events_cannot_be_built(kwargs, complaint):
    with pytest.raises(EventError, match=complaint):
        Event(**kwargs)


def test_invalid_payloads_cannot_be_built():
    with pytest.raises(EventError, match="field is empty"):
        AttributePayload("", "v")
    with pytest.raises(EventError, match="expire"):
        AttributePayload("f", "v", expire=-1)
    with pytest.raises(EventError, match="duration"):
        LeasePayload("id", -5)
    with pytest.raises(EventError, match="identifier is empty"):
        LeasePayload("", 5)


def test_legacy_namespace_never_written():
    event = parse_event(REFERENCE)
    assert LEGACY_ATTRIBUTE_NS.encode() not in event_to_xml(event)


@pytest.mark.parametrize("service, instance, complaint", [
    (" padded", None, "from/service ' padded' must be non-empty"),
    ("ok", "", "from/instance '' must be non-empty"),
    ("ok", "a\x01b", "from/instance contains a character XML cannot carry: U\\+0001"),
    ("x" * 256, None, "from/service is longer than 255 characters"),
    (b"bytes", None, "from/service must be text, not bytes"),
])
def test_with_sender_checks_the_sender_like_the_constructor(service, instance, complaint):
    event = Event("/a/", AttributePayload("f", "v"), to_service="s", to_instance="i")
    with pytest.raises(EventError, match=complaint):
        event.with_sender(service, instance)
    with pytest.raises(EventError, match=complaint):
        Event("/a/", AttributePayload("f", "v"), from_service=service, from_instance=instance)


def test_with_sender_keeps_every_other_field():
    event = Event("/a/b/", AttributePayload("f", "v"), to_service="s", to_instance="i")
    assert event.with_sender("me", "host") == Event("/a/b/", AttributePayload("f", "v"), to_service="s",
                                                    to_instance="i", from_service="me", from_instance="host")
    assert event.with_sender(None, None) == event


def test_cached_checks_still_refuse_after_accepting():
    """Channels and names are checked through caches: a good value cached must not let a bad one through."""
    Event("/a/", AttributePayload("f", "v"), to_service="name")
    for kwargs, complaint in ((dict(to_service="name "), "non-empty"), (dict(channel="/a//"), "empty segment"),
                              (dict(channel=b"/a/"), "must be text"), (dict(to_instance=7), "must be text")):
        with pytest.raises(EventError, match=complaint):
            Event(**{"channel": "/a/", "payload": AttributePayload("f", "v"), **kwargs})


def reference_event_xml(event: Event) -> bytes:
    """event_to_xml as it was written before its parts were cached: the oracle for the cached version."""
    def escape(text):
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")

    def leaf(tag, text):
        return "" if text is None else f"<{tag}>{escape(text)}</{tag}>"

    payload = event.payload
    if isinstance(payload, AttributePayload):
        expire = "" if payload.expire is None else f"<expire>{payload.expire}</expire>"
        body = (f'<payload xmlns="{ATTRIBUTE_NS}"><field>{escape(payload.field)}</field>'
                f"<value>{escape(payload.value)}</value>{expire}</payload>")
    elif isinstance(payload, LeasePayload):
        body = (f'<payload xmlns="{LEASE_NS}"><duration>{payload.duration}</duration>'
                f"<identifier>{escape(payload.identifier)}</identifier><op>{payload.op}</op>"
                f"{leaf('type', payload.payload_type)}</payload>")
    else:
        body = payload.xml.decode("utf-8")
    sender = ""
    if event.from_service is not None or event.from_instance is not None:
        sender = f"<from>{leaf('service', event.from_service)}{leaf('instance', event.from_instance)}</from>"
    return (f'<event xmlns="http://psepr.org/xs/event"><to><channel>{escape(event.channel)}</channel>'
            f"{leaf('service', event.to_service)}{leaf('instance', event.to_instance)}</to>{sender}{body}</event>"
            ).encode("utf-8")


OPAQUE = st.sampled_from([OpaquePayload("urn:x", b'<payload xmlns="urn:x"><a>caf\xc3\xa9 &amp; &lt;</a></payload>'),
                          OpaquePayload("urn:y", b'<payload xmlns="urn:y"/>')])


@settings(max_examples=200, deadline=None)
@given(CHANNEL, NAME, NAME, st.none() | TEXT.filter(lambda t: t and t == t.strip() and len(t) <= 255), NAME,
       st.one_of(OPAQUE, st.builds(AttributePayload, st.just("f"), TEXT), st.builds(LeasePayload, st.just("id"),
                                                                                   st.integers(0, 10**6))))
def test_event_to_xml_is_byte_for_byte_what_it_was(channel, to_service, to_instance, from_service, from_instance,
                                                   payload):
    event = Event(channel, payload, to_service, to_instance, from_service, from_instance)
    for _ in range(2):  # the second time from the cache of event heads
        assert event_to_xml(event) == reference_event_xml(event)
    parsed = parse_event(event_to_xml(event))  # (an opaque payload comes back re-serialised by lxml)
    assert (parsed.channel, parsed.to_instance, parsed.from_service) == (channel, to_instance, from_service)


def test_event_to_xml_still_refuses_an_opaque_payload_that_is_not_utf8():
    payload = object.__new__(OpaquePayload)  # cannot be built by the constructor (it parses), nor parsed
    object.__setattr__(payload, "namespace", "urn:x")
    object.__setattr__(payload, "xml", b'<payload xmlns="urn:x">\xff</payload>')
    with pytest.raises(UnicodeDecodeError):
        event_to_xml(Event("/a/", payload))

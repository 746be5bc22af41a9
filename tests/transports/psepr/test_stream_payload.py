"""The stream parser inside and after a payload: the routing header's guarantees.

Pinned here: the depth limit inside a payload, routing elements after the
payload (read, and refused when duplicated), routing-looking elements inside
the payload (ignored), and the stanzas that follow.
"""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from dsmt.transports.psepr import stream
from dsmt.transports.psepr.stream import MAX_DEPTH, NS_EVENT, RouteHeader, Stanza, StreamError, StreamParser

from tests.transports.psepr.test_stream import EXAMPLE, EXAMPLE_ROUTE, HEADER, fails, route_of, stanzas_of

EVENT_OPEN = f'<event xmlns="{NS_EVENT}">'


def message(*children: str) -> bytes:
    return ("<message>" + EVENT_OPEN + "".join(children) + "</event></message>").encode()


def test_depth_limit_holds_inside_a_payload():
    # stream, message, event, payload make 4 levels
    def nested(depth):
        inner = "<a>" * (depth - 4) + "</a>" * (depth - 4)
        return HEADER + message("<to><channel>/a/</channel></to>", f"<payload xmlns='urn:x'>{inner}</payload>")

    (stanza,) = stanzas_of(nested(MAX_DEPTH))
    assert stanza.route.payload_type == "urn:x"
    fails(nested(MAX_DEPTH + 1), "policy-violation", f"depth {MAX_DEPTH + 1} exceeds {MAX_DEPTH}")
    fails(HEADER + message("<payload xmlns='urn:x'>" + "<a>" * 100), "policy-violation",
          f"depth {MAX_DEPTH + 1} exceeds {MAX_DEPTH}")


def test_routing_elements_after_the_payload_are_read():
    route = route_of(EVENT_OPEN.encode() + b"<payload xmlns='urn:x'><v>1</v></payload>"
                     b"<to><channel>/after/</channel><service>s</service></to>"
                     b"<from><instance>i</instance></from></event>")
    assert route == RouteHeader("/after/", "s", None, None, "i", "urn:x")


@pytest.mark.parametrize("children, text", [
    (("<to><channel>/a/</channel></to>", "<payload xmlns='urn:x'><v/></payload>", "<to><channel>/b/</channel></to>"),
     "more than one <to> in <event>"),
    (("<from><service>a</service></from>", "<payload xmlns='urn:x'/>", "<from><service>b</service></from>"),
     "more than one <from> in <event>"),
    (("<payload xmlns='urn:a'><v><w/></v></payload>", "<to/>", "<payload xmlns='urn:b'/>"),
     "more than one <payload> in <event>"),
])
def test_duplicates_after_the_payload_are_refused(children, text):
    fails(HEADER + message(*children), "bad-format", text)


def test_second_event_after_a_payload_is_refused():
    event = EVENT_OPEN + "<to><channel>/a/</channel></to><payload xmlns='urn:x'><v/></payload></event>"
    fails(HEADER + f"<message>{event}{event}</message>".encode(), "bad-format", "more than one <event> in <message>")


def test_routing_names_inside_the_payload_are_ignored():
    inside = (f"<to xmlns='{NS_EVENT}'><channel>/inside/</channel></to><from xmlns='{NS_EVENT}'/>"
              f"<payload xmlns='urn:other'><payload/></payload><event xmlns='{NS_EVENT}'><to/></event>")
    route = route_of(EVENT_OPEN.encode() + f"<to><channel>/real/</channel></to><payload xmlns='urn:x'>{inside}"
                     "</payload></event>".encode())
    assert route == RouteHeader("/real/", None, None, None, None, "urn:x")


def test_empty_payload_then_more_stanzas():
    first = message("<payload xmlns='urn:x'/>", "<to><channel>/a/</channel></to>")
    data = HEADER + first + b"<iq type='get' id='1'><a><b/></a></iq>" + EXAMPLE + stream.STREAM_CLOSE
    parser = StreamParser()
    items = [item for byte in range(len(data)) for item in parser.feed(data[byte:byte + 1])]
    assert items[1:] == [
        Stanza("message", first, RouteHeader("/a/", None, None, None, None, "urn:x")),
        Stanza("iq", b"<iq type='get' id='1'><a><b/></a></iq>", None),
        Stanza("message", EXAMPLE, EXAMPLE_ROUTE),
        stream.StreamClosed(),
    ]


# ---------------------------------------------------------------- against a reference reading

_INNER_NAMES = ["to", "from", "payload", "event", "channel", "service", "a"]
_inner = st.recursive(
    st.just(""),
    lambda children: st.lists(st.tuples(st.sampled_from(_INNER_NAMES), st.booleans(), children), max_size=3).map(
        lambda items: "".join(f"<{name}{' xmlns=%r' % NS_EVENT if in_event else ''}>{inside}</{name}>"
                              for name, in_event, inside in items)),
    max_leaves=8)
_child = st.one_of(
    st.tuples(st.just("to"), st.integers(0, 9), _inner),
    st.tuples(st.just("from"), st.integers(0, 9), _inner),
    st.tuples(st.just("payload"), st.integers(0, 9), _inner),
    st.tuples(st.just("other"), st.integers(0, 9), _inner),
)


def _render(kind: str, number: int, inner: str) -> str:
    if kind == "to":
        return f"<to><channel>/c{number}/</channel></to>"
    if kind == "from":
        return f"<from><service>s{number}</service></from>"
    if kind == "payload":
        return f"<payload xmlns='urn:p{number}'>{inner}</payload>"
    return f"<x xmlns='urn:o'>{inner}</x>"


@given(st.lists(_child, max_size=6))
def test_any_arrangement_of_event_children_reads_as_the_rules_say(children):
    """Routing children in any order, with any payload content: the route, or the first duplicate refused."""
    data = HEADER + message(*(_render(*child) for child in children)) + EXAMPLE
    seen: dict[str, int] = {}
    duplicate = None
    for kind, number, _ in children:
        if kind == "other":
            continue
        if kind in seen:
            duplicate = kind
            break
        seen[kind] = number
    if duplicate is not None:
        fails(data, "bad-format", f"more than one <{duplicate}> in <event>")
        return
    first, second = stanzas_of(data)
    assert first.route == RouteHeader(
        f"/c{seen['to']}/" if "to" in seen else None, None, None,
        f"s{seen['from']}" if "from" in seen else None, None,
        f"urn:p{seen['payload']}" if "payload" in seen else None)
    assert second == Stanza("message", EXAMPLE, EXAMPLE_ROUTE)  # the full handlers are back


def test_malformed_payload_ends_the_stream():
    parser = StreamParser()
    with pytest.raises(StreamError, match="not-well-formed"):
        parser.feed(HEADER + message("<payload xmlns='urn:x'><a></b></payload>"))
    with pytest.raises(StreamError, match="not-well-formed"):
        parser.feed(EXAMPLE)

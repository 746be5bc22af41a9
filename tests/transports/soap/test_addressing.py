"""WS-Addressing helpers (pure): lenient reading, strict writing, splicing headers into envelope bytes."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st
from lxml import etree

from dsmt.transports.soap.addressing import (
    ANONYMOUS, WSA_NS, AddressingError, AddressingHeaders, EndpointReference, insert_headers, new_message_id,
    read_headers, reply_headers, request_headers)

S11 = "http://schemas.xmlsoap.org/soap/envelope/"
W = "{%s}" % WSA_NS
UUID = "0b7d0a3c-5a28-4e0b-9f1c-2f2f6d1f5a11"


def envelope(header: str = "", body: str = "<x:op xmlns:x='urn:x'/>") -> bytes:
    head = f"<s:Header>{header}</s:Header>" if header is not None else ""
    return f"<s:Envelope xmlns:s='{S11}' xmlns:wsa='{WSA_NS}'>{head}<s:Body>{body}</s:Body></s:Envelope>".encode()


def parsed(data: bytes):
    return etree.fromstring(data)


def blocks_of(data: bytes) -> list[etree._Element]:
    return list(etree.fromstring(b"<h>" + data + b"</h>"))


# ------------------------------------------------------------------ reading

def test_no_header_or_no_addressing_is_none():
    assert read_headers(parsed(envelope(header=None))) is None
    assert read_headers(parsed(envelope("<t:Other xmlns:t='urn:t'/>"))) is None


def test_reads_every_header_and_keeps_text_exactly():
    headers = read_headers(parsed(envelope(
        f"<wsa:MessageID>  {UUID}\n</wsa:MessageID><wsa:Action>urn:a</wsa:Action><wsa:To>http://wrong/</wsa:To>"
        "<wsa:ReplyTo><wsa:Address> psepr:/org/x/reply/ </wsa:Address><wsa:ReferenceParameters>"
        "<t:Slot xmlns:t='urn:t'>7</t:Slot></wsa:ReferenceParameters></wsa:ReplyTo>"
        "<wsa:FaultTo><wsa:Address>psepr:/org/x/faults/</wsa:Address></wsa:FaultTo>"
        "<wsa:RelatesTo>urn:uuid:earlier</wsa:RelatesTo>")))
    assert headers.message_id == f"  {UUID}\n"  # bare UUID accepted, whitespace kept: echoed byte for byte
    assert (headers.action, headers.to, headers.relates_to) == ("urn:a", "http://wrong/", "urn:uuid:earlier")
    assert headers.reply_to.address == "psepr:/org/x/reply/"
    (parameter,) = headers.reply_to.reference_parameters
    assert (parameter.tag, parameter.text) == ("{urn:t}Slot", "7")
    assert headers.fault_to == EndpointReference("psepr:/org/x/faults/")


@pytest.mark.parametrize("name", ["MessageID", "Action", "To", "ReplyTo", "FaultTo"])
def test_a_repeated_header_is_refused(name):
    block = f"<wsa:{name}><wsa:Address>a</wsa:Address></wsa:{name}>"
    with pytest.raises(AddressingError, match=f"wsa:{name} appears 2 times") as caught:
        read_headers(parsed(envelope(block * 2)))
    assert caught.value.subcode == "InvalidCardinality"


def test_an_endpoint_without_address_is_refused():
    with pytest.raises(AddressingError, match="wsa:ReplyTo has no wsa:Address") as caught:
        read_headers(parsed(envelope("<wsa:ReplyTo/>")))
    assert caught.value.subcode == "MissingAddressInEPR"


# ------------------------------------------------------------------ writing

def test_reply_headers_answer_the_request():
    parameter = etree.fromstring("<t:Slot xmlns:t='urn:t'>7</t:Slot>")
    request = AddressingHeaders(message_id=UUID, reply_to=EndpointReference("psepr:/r/", (parameter,)))
    blocks = blocks_of(reply_headers(request, action="urn:out"))
    assert [b.tag for b in blocks] == [W + "To", W + "Action", W + "MessageID", W + "RelatesTo", "{urn:t}Slot"]
    assert [b.text for b in blocks[:2]] + [blocks[3].text] == ["psepr:/r/", "urn:out", UUID]
    assert re.fullmatch(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", blocks[2].text)
    assert blocks[4].get(W + "IsReferenceParameter") == "true"
    assert parameter.get(W + "IsReferenceParameter") is None  # the request's copy is untouched


def test_reply_goes_to_anonymous_by_default_and_faults_to_fault_to():
    assert blocks_of(reply_headers(AddressingHeaders(action="urn:in"), action="urn:out"))[0].text == ANONYMOUS
    request = AddressingHeaders(reply_to=EndpointReference("urn:reply"), fault_to=EndpointReference("urn:fault"))
    assert blocks_of(reply_headers(request, action="urn:f", fault=True))[0].text == "urn:fault"
    assert blocks_of(reply_headers(request, action="urn:o"))[0].text == "urn:reply"
    assert [b.tag for b in blocks_of(reply_headers(request, action="urn:o"))] == [
        W + "To", W + "Action", W + "MessageID"]  # no MessageID in the request: no RelatesTo


def test_request_headers_round_trip_through_read_headers():
    parameter = etree.fromstring("<t:Slot xmlns:t='urn:t'>7 &amp; 8</t:Slot>")
    data = insert_headers(envelope(header=None), request_headers(
        action="urn:a & b", to="psepr:/org/x/", message_id=UUID, reply_to=EndpointReference("urn:r", (parameter,)),
        fault_to=EndpointReference("urn:f")))
    headers = read_headers(parsed(data))
    assert (headers.action, headers.to, headers.message_id) == ("urn:a & b", "psepr:/org/x/", UUID)
    assert headers.reply_to.address == "urn:r" and headers.reply_to.reference_parameters[0].text == "7 & 8"
    assert headers.fault_to.address == "urn:f"
    assert read_headers(parsed(insert_headers(envelope(header=None), request_headers(action="a", to="b")))) \
        .message_id.startswith("urn:uuid:")


def test_text_xml_cannot_carry_is_refused():
    with pytest.raises(ValueError, match="characters XML cannot carry"):
        request_headers(action="a\x00", to="b")


def test_message_ids_are_fresh():
    assert len({new_message_id() for _ in range(100)}) == 100


def test_message_ids_are_version_4_uuids_in_canonical_form():
    import uuid
    variants = set()
    for _ in range(2000):
        message_id = new_message_id()
        assert message_id.startswith("urn:uuid:")
        parsed = uuid.UUID(message_id[len("urn:uuid:"):])
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == message_id[9:]
        variants.add(message_id[9 + 19])
    assert variants == set("89ab")  # every variant digit occurs: the random bits really are used


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufffe\uffff")
               .filter(lambda c: c in "\t\n\r" or ord(c) >= 0x20), max_size=60))
def test_relates_to_equals_any_message_id_exactly(message_id):
    data = insert_headers(envelope(header=None), request_headers(action="a", to="b", message_id=message_id or "x"))
    request = read_headers(parsed(data))
    reply = insert_headers(envelope(header=None), reply_headers(request, action="urn:out"))
    assert read_headers(parsed(reply)).relates_to == (message_id or "x")


# ------------------------------------------------------------------ splicing

BLOCK = b"<n:B xmlns:n='urn:n'>1</n:B>"


def spliced_out(result: bytes, original: bytes, inserted: bytes) -> bytes:
    assert result.count(inserted) == 1
    return result.replace(inserted, b"", 1)


def test_insert_into_an_existing_header_changes_nothing_else():
    original = (b"<?xml version='1.0' encoding='UTF-8'?>\n<!-- a <s:Header> in a comment -->\n"
                b"<s:Envelope xmlns:s='" + S11.encode() + b"' a='x > y'>\n  <s:Header  >\n    <t:Old xmlns:t='urn:t'/>"
                b"\n  </s:Header>\n  <s:Body>\n    <x/>\n  </s:Body>\n</s:Envelope>\n")
    result = insert_headers(original, BLOCK)
    assert spliced_out(result, original, BLOCK) == original
    assert [child.tag for child in parsed(result)[0]] == ["{urn:n}B", "{urn:t}Old"]


def test_insert_opens_a_self_closing_header():
    original = b"<s:Envelope xmlns:s='" + S11.encode() + b"'><s:Header a='1' /><s:Body/></s:Envelope>"
    result = insert_headers(original, BLOCK)
    assert result == (b"<s:Envelope xmlns:s='" + S11.encode() + b"'><s:Header a='1'>" + BLOCK
                      + b"</s:Header><s:Body/></s:Envelope>")


def test_insert_creates_a_header_before_the_body():
    original = b"\xef\xbb\xbf<Envelope xmlns='" + S11.encode() + b"'>\n<Body><x/></Body></Envelope>"
    result = insert_headers(original, BLOCK)
    assert result == (b"\xef\xbb\xbf<Envelope xmlns='" + S11.encode() + b"'>\n<Header>" + BLOCK
                      + b"</Header><Body><x/></Body></Envelope>")
    assert parsed(result)[0].tag == "{%s}Header" % S11


def test_insert_nothing_returns_the_same_bytes():
    original = envelope()
    assert insert_headers(original, b"") is original


@pytest.mark.parametrize("data", [b"", b"<x/>", b"<s:Envelope/>", b"<s:Envelope xmlns:s='u'><s:Other/></s:Envelope>",
                                  b"<s:Envelope xmlns:s='u'><t:Header/></s:Envelope>", b"<s:Envelope xmlns:s='u'>"])
def test_insert_refuses_what_is_not_an_envelope(data):
    with pytest.raises(ValueError, match="not a SOAP envelope"):
        insert_headers(data, BLOCK)

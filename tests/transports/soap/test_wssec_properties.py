"""Properties of verification under random damage (hypothesis).

For random byte changes in a signed envelope, verification either raises
:class:`WsSecurityFault` or succeeds — and it may only succeed when nothing
signed changed: every referenced element and SignedInfo canonicalise exactly
as before, with the same signature value and certificate.  (Some changes are
invisible to XML: the quote style of the XML declaration, whitespace between
attributes, the unused bits of a base64 character, the unsigned
mustUnderstand attribute.  "Never verifies" would be false for those; "never
verifies with different signed content" is the property that matters.)
"""
from __future__ import annotations

import base64
import functools
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from dsmt.transports.soap.wssec import DS_NS, EXC_C14N, WSSE_NS, WSU_NS, Verifier, WsSecurityFault
from tests.transports.soap.test_wssec import BARE_ENVELOPE, NOW, SOAP11_ENVELOPE, parties, signed


@functools.lru_cache(maxsize=None)
def originals() -> tuple[bytes, bytes]:
    return signed(SOAP11_ENVELOPE), signed(BARE_ENVELOPE)


def signed_content(data: bytes):
    """What a signature vouches for: canonical referenced elements, SignedInfo, signature value, certificate."""
    root = etree.fromstring(data)
    by_id = {element.get(f"{{{WSU_NS}}}Id"): element for element in root.iter() if element.get(f"{{{WSU_NS}}}Id")}
    parts = []
    for reference in root.iter(f"{{{DS_NS}}}Reference"):
        inclusive = reference.find(f".//{{{EXC_C14N}}}InclusiveNamespaces")
        prefixes = inclusive.get("PrefixList").split() if inclusive is not None else None
        parts.append(etree.tostring(by_id[reference.get("URI")[1:]], method="c14n", exclusive=True,
                                    inclusive_ns_prefixes=prefixes))
    parts.append(etree.tostring(root.find(f".//{{{DS_NS}}}SignedInfo"), method="c14n", exclusive=True))
    parts.append(base64.b64decode(root.findtext(f".//{{{DS_NS}}}SignatureValue")))
    parts.append(base64.b64decode(root.findtext(f".//{{{WSSE_NS}}}BinarySecurityToken")))
    return parts


#: Regions of a signed envelope worth aiming at (regex of the bytes; the whole document is one too).
REGIONS = [rb"<soap:Body.*</soap:Body>", rb"<s:Body.*</s:Body>", rb"<wsu:Timestamp.*</wsu:Timestamp>",
           rb"<wsa:MessageID.*</wsa:Action>", rb"<ds:SignedInfo>.*</ds:SignedInfo>",
           rb"<ds:SignatureValue>.*</ds:SignatureValue>", rb"<wsse:BinarySecurityToken.*</wsse:BinarySecurityToken>",
           rb"<wsse:Security.*</wsse:Security>", rb"\A.*\Z"]
#: Replacement bytes: XML-significant and plain ones more often than the rest.
BYTES = st.one_of(st.sampled_from(b"aAzZ09+/= \t\n<>&\"'#:-_.x"), st.integers(0, 255))


@st.composite
def changes(draw, data: bytes):
    """One to three (position, byte) changes, each inside a region chosen at random."""
    result = []
    for _ in range(draw(st.integers(1, 3))):
        found = [m.span() for m in (re.search(r, data, re.S) for r in REGIONS) if m]
        start, end = draw(st.sampled_from(found))
        result.append((draw(st.integers(start, end - 1)), draw(BYTES)))
    return result


def damaged(data: bytes, edits) -> bytes:
    buffer = bytearray(data)
    for position, value in edits:
        buffer[position] = value
    return bytes(buffer)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), which=st.sampled_from([0, 1]))
def test_random_byte_changes_never_verify_changed_content_and_raise_only_faults(data, which):
    original = originals()[which]
    damage = damaged(original, data.draw(changes(original)))
    verifier = Verifier(parties().trust, replay_capacity=None)
    try:
        verifier.verify(damage, now=NOW + 1)
    except WsSecurityFault:
        return
    assert signed_content(damage) == signed_content(original)


@settings(max_examples=150, deadline=None)
@given(start=st.integers(min_value=0, max_value=1 << 16), length=st.integers(min_value=1, max_value=400))
def test_truncated_or_cut_envelopes_raise_only_faults(start, length):
    original = originals()[0]
    start %= len(original)
    data = original[:start] + original[start + length:]
    try:
        Verifier(parties().trust, replay_capacity=None).verify(data, now=NOW + 1)
    except WsSecurityFault:
        return
    assert signed_content(data) == signed_content(original)


@settings(max_examples=100, deadline=None)
@given(garbage=st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_faults(garbage):
    try:
        Verifier(parties().trust).verify(garbage, now=NOW)
    except WsSecurityFault:
        return
    raise AssertionError("random bytes verified")

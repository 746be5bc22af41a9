"""WS-Security: signing, verification and its precise faults (pure: no reactor, no sleeping).

Time is fixed (:data:`NOW`) and passed explicitly.  Keys are EC P-256 unless a
test is about RSA (RSA-3072 key generation costs ~0.3 s each).  Envelopes
signed by *other* code (xmlsec's own template API) are built by
:func:`xmlsec_signed`, for interop and for what our signer refuses to make
(SHA-1, missing references).
"""
from __future__ import annotations

import base64
import functools
import re
import types
from dataclasses import dataclass

import pytest
import xmlsec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from lxml import etree

from dsmt.transports.soap import pki, wssec
from dsmt.transports.soap.pki import Purpose
from dsmt.transports.soap.wssec import (
    DS_NS, SOAP11_NS, SOAP12_NS, WSA_NS, WSSE_NS, WSU_NS, X509V3, SigningError, Signer, Verifier, WsSecurityFault,
    WsSecurityPolicy)

from tests.support.testpki import ISSUED, NOW as TEST_NOW, Party, authorities, issue, xmlsec_verifies  # noqa: F401  (Party: other wssec tests import it from here)

#: 2027-01-15T08:00:00Z: every message is signed and checked around this instant.
NOW = float(TEST_NOW)

SOAP11_ENVELOPE = f"""<?xml version="1.0" encoding="utf-8"?>
<soap:Envelope xmlns:soap="{SOAP11_NS}" xmlns:wsa="{WSA_NS}"><soap:Header>
<wsa:MessageID>urn:uuid:5f0c8a1e-1111-4222-8333-944455556666</wsa:MessageID>
<wsa:To>http://node1.example/soap/nodemanager</wsa:To>
<wsa:Action>http://dsmt.org/ns/nodemanager/createSliver</wsa:Action>
<wsa:ReplyTo><wsa:Address>http://www.w3.org/2005/08/addressing/anonymous</wsa:Address></wsa:ReplyTo>
</soap:Header><soap:Body><nm:createSliver xmlns:nm="http://dsmt.org/ns/nodemanager">
<nm:slice>xyz1</nm:slice><nm:ticket>T-42</nm:ticket></nm:createSliver></soap:Body></soap:Envelope>""".encode()

SOAP12_ENVELOPE = f"""<env:Envelope xmlns:env="{SOAP12_NS}"><env:Header>
<a:MessageID xmlns:a="{WSA_NS}">urn:uuid:0e8f2f5c-aaaa-4bbb-8ccc-0123456789ab</a:MessageID>
<a:RelatesTo xmlns:a="{WSA_NS}">urn:uuid:11111111-2222-4333-8444-555555555555</a:RelatesTo>
</env:Header><env:Body><r:result xmlns:r="urn:r">ok</r:result></env:Body></env:Envelope>""".encode()

#: No Header, no WS-Addressing: the signer adds the Header; replay is keyed on the signature value.
BARE_ENVELOPE = f'<s:Envelope xmlns:s="{SOAP11_NS}"><s:Body><p:ping xmlns:p="urn:p"/></s:Body></s:Envelope>'.encode()


# ------------------------------------------------------------------------------------------ PKI

@dataclass(frozen=True)
class Pki:
    ca: Party
    alice: Party          # user, clientAuth
    bob: Party            # another user of the same CA
    service: Party        # service "nodemanager", serverAuth + clientAuth, DNS node1.example
    other_ca: Party
    mallory: Party        # a user of the other CA

    @property
    def trust(self) -> pki.TrustStore:
        return pki.TrustStore([self.ca.cert])


@functools.lru_cache(maxsize=None)
def parties() -> Pki:
    ca, other = authorities()
    return Pki(ca, issue(ca, "user", "alice"), issue(ca, "user", "bob"),
               issue(ca, "service", "nodemanager", dns_names=["node1.example"]), other, issue(other, "user", "mallory"))


@functools.lru_cache(maxsize=None)
def rsa_party() -> Party:
    """An RSA-3072 user of the test CA (made once: RSA key generation is slow)."""
    return issue(parties().ca, "user", "carol", key_type="rsa")




def signer(party: Party | None = None, **options) -> Signer:
    party = party or parties().alice
    return Signer(party.key, party.cert, **options)


def verifier(**options) -> Verifier:
    options.setdefault("trust", parties().trust)
    return Verifier(options.pop("trust"), **options)


def signed(envelope: bytes = SOAP11_ENVELOPE, party: Party | None = None, *, now: float = NOW, **options) -> bytes:
    return signer(party, **options).sign(envelope, now=now)


def fault_of(data: bytes, *, now: float = NOW + 1, **options) -> WsSecurityFault:
    with pytest.raises(WsSecurityFault) as caught:
        verifier(**options).verify(data, now=now)
    return caught.value


def assert_fault(data: bytes, code: str, reason: str, **options) -> WsSecurityFault:
    """Verification fails with ``code`` (e.g. 'wsse:FailedCheck') and a reason matching regex ``reason``."""
    fault = fault_of(data, **options)
    assert fault.prefixed_code == code, str(fault)
    assert re.search(reason, fault.reason), str(fault)
    return fault


def xmlsec_signed(envelope: bytes, party: Party, *, signature=xmlsec.Transform.ECDSA_SHA256,
                  digest=xmlsec.Transform.SHA256, c14n=xmlsec.Transform.EXCL_C14N,
                  transform=xmlsec.Transform.EXCL_C14N, created: str = "2027-01-15T08:00:00Z",
                  expires: str | None = "2027-01-15T08:05:00Z", cover=("body", "timestamp"),
                  cert=None) -> bytes:
    """A WS-Security envelope signed with xmlsec's template API (not our signer): Timestamp, BST, Signature."""
    root = etree.fromstring(envelope)
    soap_ns = etree.QName(root).namespace
    header = root.find(f"{{{soap_ns}}}Header")
    if header is None:
        header = etree.Element(f"{{{soap_ns}}}Header")
        root.insert(0, header)
    body = root.find(f"{{{soap_ns}}}Body")
    security = etree.SubElement(header, f"{{{WSSE_NS}}}Security", nsmap={"wsse": WSSE_NS, "wsu": WSU_NS})
    timestamp = etree.SubElement(security, f"{{{WSU_NS}}}Timestamp", {f"{{{WSU_NS}}}Id": "ts"})
    etree.SubElement(timestamp, f"{{{WSU_NS}}}Created").text = created
    if expires is not None:
        etree.SubElement(timestamp, f"{{{WSU_NS}}}Expires").text = expires
    token = etree.SubElement(security, f"{{{WSSE_NS}}}BinarySecurityToken",
                             {"ValueType": X509V3, "EncodingType": wssec.BASE64_BINARY, f"{{{WSU_NS}}}Id": "tok"})
    token.text = base64.b64encode((cert or party.cert).public_bytes(serialization.Encoding.DER)).decode()
    body.set(f"{{{WSU_NS}}}Id", "body")
    sig = xmlsec.template.create(root, c14n, signature, ns="ds")
    security.append(sig)
    context = xmlsec.SignatureContext()
    for name, target in (("body", body), ("timestamp", timestamp)):
        if name in cover:
            reference = xmlsec.template.add_reference(sig, digest, uri="#" + target.get(f"{{{WSU_NS}}}Id"))
            xmlsec.template.add_transform(reference, transform)
            context.register_id(target, "Id", WSU_NS)
    key_info = xmlsec.template.ensure_key_info(sig)
    str_element = etree.SubElement(key_info, f"{{{WSSE_NS}}}SecurityTokenReference")
    etree.SubElement(str_element, f"{{{WSSE_NS}}}Reference", URI="#tok", ValueType=X509V3)
    pem = party.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    context.key = xmlsec.Key.from_memory(pem, xmlsec.KeyFormat.PEM)
    context.sign(sig)
    return etree.tostring(root)


def tree(data: bytes):
    return etree.fromstring(data)


# ---------------------------------------------------------------------------------- round trips

def test_soap11_round_trip_names_the_signer_and_the_signed_message_id():
    caller = verifier().verify(signed(), now=NOW + 1)
    assert caller.subject == "CN=alice,OU=user"
    assert caller.common_name == "alice"
    assert caller.certificate == parties().alice.cert
    assert caller.message_id == "urn:uuid:5f0c8a1e-1111-4222-8333-944455556666"
    assert caller.relates_to is None


def test_soap12_round_trip_with_relates_to():
    caller = verifier(purpose=Purpose.SERVER).verify(signed(SOAP12_ENVELOPE, parties().service), now=NOW)
    assert caller.subject == "CN=nodemanager,OU=service"
    assert caller.message_id == "urn:uuid:0e8f2f5c-aaaa-4bbb-8ccc-0123456789ab"
    assert caller.relates_to == "urn:uuid:11111111-2222-4333-8444-555555555555"
    root = tree(signed(SOAP12_ENVELOPE))
    assert root.find(f"{{{SOAP12_NS}}}Header/{{{WSSE_NS}}}Security").get(f"{{{SOAP12_NS}}}mustUnderstand") == "true"


def test_rsa_3072_round_trip_uses_rsa_sha256():
    data = signed(party=rsa_party())
    method = tree(data).find(f".//{{{DS_NS}}}SignatureMethod").get("Algorithm")
    assert method == "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
    assert verifier().verify(data, now=NOW).subject == "CN=carol,OU=user"


def test_signed_envelope_layout():
    root = tree(signed())
    header = root.find(f"{{{SOAP11_NS}}}Header")
    security = header[0]
    assert security.tag == f"{{{WSSE_NS}}}Security" and security.get(f"{{{SOAP11_NS}}}mustUnderstand") == "1"
    assert [etree.QName(child).localname for child in security] == ["Timestamp", "BinarySecurityToken", "Signature"]
    assert security[0].findtext(f"{{{WSU_NS}}}Created") == "2027-01-15T08:00:00.000Z"
    assert security[0].findtext(f"{{{WSU_NS}}}Expires") == "2027-01-15T08:05:00.000Z"
    ids = {element.get(f"{{{WSU_NS}}}Id"): etree.QName(element).localname
           for element in root.iter() if element.get(f"{{{WSU_NS}}}Id")}
    uris = [reference.get("URI")[1:] for reference in root.iter(f"{{{DS_NS}}}Reference")]
    assert [ids[uri] for uri in uris] == ["Body", "Timestamp", "MessageID", "To", "Action", "ReplyTo"]
    digests = {m.get("Algorithm") for m in root.iter(f"{{{DS_NS}}}DigestMethod")}
    assert digests == {"http://www.w3.org/2001/04/xmlenc#sha256"}
    assert root.nsmap["wsu"] == WSU_NS  # declared once on the Envelope, not as ns0, ns1… per element


def test_envelope_without_header_gets_one():
    data = signed(BARE_ENVELOPE)
    assert tree(data)[0].tag == f"{{{SOAP11_NS}}}Header"
    caller = verifier().verify(data, now=NOW)
    assert caller.message_id is None


def test_our_signatures_satisfy_xmlsec_own_verification():
    """Conformance: xmlsec resolving the references itself agrees with our digests and signature."""
    for envelope in (SOAP11_ENVELOPE, SOAP12_ENVELOPE, BARE_ENVELOPE):
        assert xmlsec_verifies(signed(envelope), parties().alice, ids=True)
    assert xmlsec_verifies(signed(party=rsa_party()), rsa_party(), ids=True)
    assert not xmlsec_verifies(signed().replace(b"T-42", b"T-43"), parties().alice, ids=True)


@pytest.mark.parametrize("signature", [xmlsec.Transform.ECDSA_SHA256, xmlsec.Transform.ECDSA_SHA384])
def test_envelope_signed_by_xmlsec_templates_verifies(signature):
    """Interop: another signer's layout (newlines in the Signature, no InclusiveNamespaces) is accepted."""
    caller = verifier(require_signed_addressing=False).verify(
        xmlsec_signed(SOAP11_ENVELOPE, parties().alice, signature=signature), now=NOW)
    assert caller.subject == "CN=alice,OU=user"
    assert caller.message_id is None  # the MessageID is not signed, so not trusted


def test_an_rsa_envelope_signed_by_xmlsec_templates_verifies():
    data = xmlsec_signed(BARE_ENVELOPE, rsa_party(), signature=xmlsec.Transform.RSA_SHA512,
                         digest=xmlsec.Transform.SHA512)
    assert verifier().verify(data, now=NOW).subject == "CN=carol,OU=user"


def test_signing_refuses_what_it_cannot_sign():
    with pytest.raises(SigningError, match="already has a wsse:Security header"):
        signer().sign(signed())
    with pytest.raises(SigningError, match="not a SOAP 1.1 or 1.2 envelope"):
        signer().sign(b"<a/>")
    with pytest.raises(SigningError, match="DOCTYPE"):
        signer().sign(b'<!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>')
    with pytest.raises(SigningError, match="does not belong to certificate CN=bob"):
        Signer(parties().alice.key, parties().bob.cert)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    _, weak_cert = pki.make_certificate(parties().ca.key, parties().ca.cert, "user", "weak", key=weak, now=ISSUED)
    with pytest.raises(SigningError, match="RSA key of 1024 bits is too weak"):
        Signer(weak, weak_cert)


def test_inclusive_namespaces_protect_qnames_in_content():
    """exclusive C14N alone would not cover xmlns:t (used only inside xsi:type); re-binding it must fail."""
    envelope = (f'<s:Envelope xmlns:s="{SOAP11_NS}" xmlns:t="urn:types" '
                'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><s:Body>'
                '<p:set xmlns:p="urn:p"><p:value xsi:type="t:Limit">7</p:value></p:set></s:Body></s:Envelope>').encode()
    data = signed(envelope)
    assert verifier().verify(data, now=NOW)
    assert_fault(data.replace(b'xmlns:t="urn:types"', b'xmlns:t="urn:evil"'), "wsse:FailedCheck",
                 r"^digest of soap:Body \('#Body-[0-9a-f]+'\) does not match")


# ------------------------------------------------------------------------------------ tampering

def test_tampered_body():
    assert_fault(signed().replace(b"T-42", b"T-43"), "wsse:FailedCheck",
                 r"^digest of soap:Body \('#Body-[0-9a-f]+'\) does not match: it was changed after signing$")


def test_tampered_timestamp():
    assert_fault(signed().replace(b"08:05:00.000Z", b"09:05:00.000Z"), "wsse:FailedCheck",
                 r"^digest of wsu:Timestamp \('#TS-[0-9a-f]+'\) does not match")


@pytest.mark.parametrize("old, new, header", [
    (b"urn:uuid:5f0c8a1e-1111", b"urn:uuid:5f0c8a1e-2222", "MessageID"),
    (b"http://node1.example/soap/nodemanager", b"http://node2.example/soap/nodemanager", "To"),
    (b"nodemanager/createSliver", b"nodemanager/deleteSliver", "Action"),
    (b"2005/08/addressing/anonymous", b"2005/08/addressing/none", "ReplyTo"),
])
def test_tampered_addressing_header(old, new, header):
    assert_fault(signed().replace(old, new), "wsse:FailedCheck", rf"^digest of wsa:{header} ")


def test_tampered_signature_value():
    data = signed()
    value = tree(data).findtext(f".//{{{DS_NS}}}SignatureValue")
    forged = base64.b64encode(bytes(b ^ 0xFF for b in base64.b64decode(value))).decode()
    assert_fault(data.replace(value.encode(), forged.encode()), "wsse:FailedCheck",
                 r"^signature value does not verify with the certificate's key")


def test_body_changed_and_its_digest_recomputed_breaks_the_signature_value():
    data = signed()
    root = tree(data)
    body = root.find(f"{{{SOAP11_NS}}}Body")
    reference = next(r for r in root.iter(f"{{{DS_NS}}}Reference") if r.get("URI") == "#" + body.get(f"{{{WSU_NS}}}Id"))
    old_digest = reference.findtext(f"{{{DS_NS}}}DigestValue")
    forged = data.replace(b"T-42", b"T-43")
    prefixes = reference.find(f".//{{{wssec.EXC_C14N}}}InclusiveNamespaces").get("PrefixList").split()
    import hashlib
    new_body = tree(forged).find(f"{{{SOAP11_NS}}}Body")
    new_digest = base64.b64encode(hashlib.sha256(etree.tostring(
        new_body, method="c14n", exclusive=True, inclusive_ns_prefixes=prefixes)).digest()).decode()
    forged = forged.replace(old_digest.encode(), new_digest.encode())
    assert_fault(forged, "wsse:FailedCheck", r"^signature value does not verify")


def test_wrong_certificate_in_the_token():
    """Signed by alice, but the token carries bob's (trusted) certificate."""
    alice, bob = parties().alice, parties().bob
    der = lambda party: base64.b64encode(party.cert.public_bytes(serialization.Encoding.DER))  # noqa: E731
    data = signed().replace(der(alice), der(bob))
    assert_fault(data, "wsse:FailedCheck", r"^signature value does not verify with the certificate's key")


def test_reindented_document_fails():
    parser = etree.XMLParser(remove_blank_text=True)
    pretty = etree.tostring(etree.fromstring(signed(), parser), pretty_print=True)
    # whitespace lands inside ds:SignedInfo too, and the signature value is checked first
    assert_fault(pretty, "wsse:FailedCheck", r"^signature value does not verify")


def test_reserialised_document_still_verifies():
    """Serialising the parsed tree again without re-indenting changes no canonical form."""
    data = etree.tostring(etree.fromstring(signed()), encoding="utf-8")
    assert verifier().verify(data, now=NOW)


# ----------------------------------------------------------------------------- signature wrapping

def _move_body_into_header(data: bytes, *, keep_id: bool) -> bytes:
    root = tree(data)
    header, body = root.find(f"{{{SOAP11_NS}}}Header"), root.find(f"{{{SOAP11_NS}}}Body")
    wrapper = etree.SubElement(header, "{urn:attacker}Wrapper")
    evil = etree.Element(f"{{{SOAP11_NS}}}Body")
    if keep_id:  # a second element carrying the same Id, before or after the original
        evil.set(f"{{{WSU_NS}}}Id", body.get(f"{{{WSU_NS}}}Id"))
    etree.SubElement(evil, "{http://dsmt.org/ns/nodemanager}deleteSliver").text = "everything"
    root.replace(body, evil)
    wrapper.append(body)
    return etree.tostring(root)


def test_body_moved_into_a_header_is_not_the_signed_body():
    data = _move_body_into_header(signed(), keep_id=False)
    assert_fault(data, "wsse:InvalidSecurity", r"^signature does not cover soap:Body$")


def test_duplicate_id_is_wrapping():
    data = _move_body_into_header(signed(), keep_id=True)
    assert_fault(data, "wsse:InvalidSecurity", r"^duplicate wsu:Id 'Body-[0-9a-f]+' \(signature wrapping\)$")


def test_xmlsec_alone_is_fooled_by_the_wrapping_we_refuse():
    """Why the Id check exists: xmlsec registers the first of two equal Ids and verifies the decoy."""
    alice = parties().alice
    data = signed()
    root = tree(data)
    body = root.find(f"{{{SOAP11_NS}}}Body")
    header = root.find(f"{{{SOAP11_NS}}}Header")
    decoy = etree.SubElement(header, "{urn:attacker}Wrapper")
    decoy.append(etree.fromstring(etree.tostring(body)))        # the signed Body, first in document order
    body[0][1].text = "T-666"                                   # the Body the service would execute
    attacked = etree.tostring(root)
    assert xmlsec_verifies(attacked, alice, ids=True)
    assert_fault(attacked, "wsse:InvalidSecurity", r"^duplicate wsu:Id 'Body-[0-9a-f]+' \(signature wrapping\)$")


def test_duplicate_id_in_a_plain_id_attribute_is_wrapping_too():
    data = signed()
    body_id = tree(data).find(f"{{{SOAP11_NS}}}Body").get(f"{{{WSU_NS}}}Id")
    data = data.replace(b"<nm:slice>", f'<nm:note Id="{body_id}"/><nm:slice>'.encode())
    assert_fault(data, "wsse:InvalidSecurity", rf"^duplicate wsu:Id '{body_id}' \(signature wrapping\)$")


def test_signature_must_cover_body_and_timestamp():
    alice = parties().alice
    assert_fault(xmlsec_signed(BARE_ENVELOPE, alice, cover=("timestamp",)), "wsse:InvalidSecurity",
                 r"^signature does not cover soap:Body$")
    assert_fault(xmlsec_signed(BARE_ENVELOPE, alice, cover=("body",)), "wsse:InvalidSecurity",
                 r"^signature does not cover wsu:Timestamp$")


def test_unsigned_addressing_header_added_by_an_attacker():
    data = signed().replace(b"</soap:Header>", f'<wsa:FaultTo xmlns:wsa="{WSA_NS}"><wsa:Address>'
                            'http://attacker.example/</wsa:Address></wsa:FaultTo></soap:Header>'.encode())
    assert_fault(data, "wsse:InvalidSecurity", r"^signature does not cover wsa:FaultTo$")


def test_unsigned_addressing_headers_pass_when_not_required_but_are_not_trusted():
    data = xmlsec_signed(SOAP11_ENVELOPE, parties().alice)
    assert_fault(data, "wsse:InvalidSecurity", r"^signature does not cover wsa:MessageID$")
    assert verifier(require_signed_addressing=False).verify(data, now=NOW).message_id is None


def test_two_security_headers_or_two_signatures():
    data = signed()
    security = re.search(rb"<wsse:Security.*</wsse:Security>", data).group()
    assert_fault(data.replace(security, security + security), "wsse:InvalidSecurity",
                 r"^2 wsse:Security headers; exactly one is accepted$")
    signature = re.search(rb"<ds:Signature.*</ds:Signature>", data).group()
    assert_fault(data.replace(signature, signature + signature), "wsse:InvalidSecurity",
                 r"^wsse:Security holds 2 ds:Signature elements; exactly one is accepted$")


def test_missing_pieces_of_the_security_header():
    data = signed()
    timestamp = re.search(rb"<wsu:Timestamp.*</wsu:Timestamp>", data).group()
    assert_fault(data.replace(timestamp, b""), "wsse:InvalidSecurity", r"^wsse:Security has no wsu:Timestamp$")
    signature = re.search(rb"<ds:Signature.*</ds:Signature>", data).group()
    assert_fault(data.replace(signature, b""), "wsse:InvalidSecurity", r"^wsse:Security has no ds:Signature$")
    assert_fault(re.sub(rb'URI="#X509-[0-9a-f]+"', b'URI="#nowhere"', data), "wsse:SecurityTokenUnavailable",
                 r"^security token '#nowhere' is not in the message$")
    assert_fault(re.sub(rb'(<ds:Reference URI=")#', rb"\1http://evil.example/doc#", data, count=1),
                 "wsse:InvalidSecurity", r"^reference URI 'http://evil.example/doc#Body-[0-9a-f]+' is not a "
                                         r"same-document '#id' reference$")


# ----------------------------------------------------------------------------------- certificates

def test_certificate_from_another_ca():
    assert_fault(signed(party=parties().mallory), "wsse:FailedAuthentication",
                 r"^certificate not issued by a trusted CA \(subject CN=mallory,OU=user, issuer CN=another CA\)$")


def test_expired_certificate():
    later = ISSUED + 366 * 86400
    assert_fault(signed(now=later), "wsse:FailedAuthentication", r"^certificate CN=alice,OU=user expired at 20",
                 now=later)


def test_not_yet_valid_certificate():
    ca = parties().ca
    future = Party(*pki.make_certificate(ca.key, ca.cert, "user", "dave", key_type="ec", now=NOW + 86400))
    assert_fault(signed(party=future), "wsse:FailedAuthentication",
                 r"^certificate CN=dave,OU=user is not valid before 2027-01-16T07:55:00Z$")


def test_user_certificate_cannot_sign_replies():
    assert_fault(signed(SOAP12_ENVELOPE), "wsse:FailedAuthentication",
                 r"^certificate CN=alice,OU=user is not valid for serverAuth \(its extended key usage: clientAuth\)$",
                 purpose=Purpose.SERVER)


def test_service_certificate_checked_against_the_expected_host():
    data = signed(SOAP12_ENVELOPE, parties().service)
    assert verifier(purpose=Purpose.SERVER, dns_name="node1.example").verify(data, now=NOW)
    assert_fault(data, "wsse:FailedAuthentication", r"is not valid for node2.example \(it names node1.example\)$",
                 purpose=Purpose.SERVER, dns_name="node2.example")


def test_pinned_certificates():
    pinned = pki.PinnedCertificates([parties().bob.cert])
    assert verifier(trust=pinned).verify(signed(party=parties().bob), now=NOW).subject == "CN=bob,OU=user"
    assert_fault(signed(), "wsse:FailedAuthentication",
                 r"^certificate CN=alice,OU=user is not one of the 1 pinned certificates$", trust=pinned)


def test_broken_tokens():
    data = signed()
    token = tree(data).findtext(f".//{{{WSSE_NS}}}BinarySecurityToken")
    assert_fault(data.replace(token.encode(), b"not*base64"), "wsse:InvalidSecurityToken",
                 r"^wsse:BinarySecurityToken is not valid base64$")
    assert_fault(data.replace(token.encode(), base64.b64encode(b"\x30\x03\x02\x01\x01")),
                 "wsse:InvalidSecurityToken", r"^wsse:BinarySecurityToken is not an X.509 certificate")
    assert_fault(data.replace(token.encode(), b"A" * 20000), "wsse:InvalidSecurityToken",
                 r"^wsse:BinarySecurityToken is 20000 characters, over the limit of 16384$")
    assert_fault(data.replace(b'ValueType="http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-x509-token-'
                              b'profile-1.0#X509v3" wsu:Id', b'ValueType="urn:kerberos" wsu:Id'),
                 "wsse:UnsupportedSecurityToken", r"^token type 'urn:kerberos' is not supported")


# ------------------------------------------------------------------------------------ algorithms

def test_sha1_signature_built_with_xmlsec_is_weak():
    party = rsa_party()
    data = xmlsec_signed(BARE_ENVELOPE, party, signature=xmlsec.Transform.RSA_SHA1, digest=xmlsec.Transform.SHA1)
    assert xmlsec_verifies(data, party, ids=True)  # a valid signature, by an algorithm we refuse
    assert_fault(data, "wsse:UnsupportedAlgorithm", r"^weak signature algorithm rsa-sha1$")


def test_sha1_digest_is_weak():
    data = xmlsec_signed(BARE_ENVELOPE, parties().alice, digest=xmlsec.Transform.SHA1)
    assert_fault(data, "wsse:UnsupportedAlgorithm", r"^weak digest algorithm sha1$")


@pytest.mark.parametrize("uri, reason", [
    ("http://www.w3.org/2000/09/xmldsig#hmac-sha1", r"^weak signature algorithm hmac-sha1$"),
    ("http://www.w3.org/2001/04/xmldsig-more#hmac-sha256", r"^weak signature algorithm hmac-sha256$"),
    ("http://www.w3.org/2001/04/xmldsig-more#rsa-md5", r"^weak signature algorithm rsa-md5$"),
    ("http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha1", r"^weak signature algorithm ecdsa-sha1$"),
    ("urn:rot13", r"^unknown signature algorithm 'urn:rot13'$"),
])
def test_weak_or_unknown_signature_methods(uri, reason):
    data = signed().replace(b"http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256", uri.encode())
    assert_fault(data, "wsse:UnsupportedAlgorithm", reason)


@pytest.mark.parametrize("uri, reason", [
    ("http://www.w3.org/2001/04/xmldsig-more#md5", r"^weak digest algorithm md5$"),
    ("http://www.w3.org/2001/04/xmldsig-more#sha224", r"^weak digest algorithm sha224$"),
    ("urn:crc32", r"^unknown digest algorithm 'urn:crc32'$"),
])
def test_weak_or_unknown_digest_methods(uri, reason):
    data = signed().replace(b"http://www.w3.org/2001/04/xmlenc#sha256", uri.encode(), 1)
    assert_fault(data, "wsse:UnsupportedAlgorithm", reason)


def test_canonicalizations_and_transforms_other_than_exclusive_c14n():
    alice = parties().alice
    assert_fault(xmlsec_signed(BARE_ENVELOPE, alice, c14n=xmlsec.Transform.C14N), "wsse:UnsupportedAlgorithm",
                 r"^canonicalization inclusive C14N is not accepted \(only exclusive C14N\)$")
    assert_fault(xmlsec_signed(BARE_ENVELOPE, alice, transform=xmlsec.Transform.ENVELOPED),
                 "wsse:UnsupportedAlgorithm", r"^transform enveloped-signature is not accepted in reference '#body'")
    data = signed().replace(b'<ds:Transform Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#">',
                            b'<ds:Transform Algorithm="http://www.w3.org/TR/1999/REC-xpath-19991116">', 1)
    assert_fault(data, "wsse:UnsupportedAlgorithm", r"^transform XPath is not accepted in reference '#Body-")


def test_algorithm_must_fit_the_key():
    data = xmlsec_signed(BARE_ENVELOPE, parties().alice)
    forged = data.replace(b"xmldsig-more#ecdsa-sha256", b"xmldsig-more#rsa-sha256")
    assert_fault(forged, "wsse:UnsupportedAlgorithm", r"^signature algorithm rsa-sha256 does not fit the "
                                                      r"certificate's EC key$")


def test_weak_rsa_key():
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    ca = parties().ca
    _, cert = pki.make_certificate(ca.key, ca.cert, "user", "weak", key=weak, now=ISSUED)
    data = xmlsec_signed(BARE_ENVELOPE, Party(weak, cert), signature=xmlsec.Transform.RSA_SHA256)
    assert_fault(data, "wsse:UnsupportedAlgorithm", r"^weak RSA key of 1024 bits \(at least 2048\)$")


# ------------------------------------------------------------------------------------ timestamps

def test_expired_timestamp():
    data = signed()  # Expires = NOW + 300; skew 60
    assert verifier().verify(data, now=NOW + 360)
    assert_fault(data, "wsu:MessageExpired", r"^timestamp expired at 2027-01-15T08:05:00.000Z \(now "
                                             r"2027-01-15T08:06:00.001Z, clock skew allowed 60 s\)$", now=NOW + 360.001)


def test_future_timestamp_beyond_skew():
    assert verifier().verify(signed(now=NOW + 60), now=NOW)
    assert_fault(signed(now=NOW + 61), "wsu:MessageExpired",
                 r"^timestamp created at 2027-01-15T08:01:01.000Z is in the future \(now 2027-01-15T08:00:00.000Z, "
                 r"clock skew allowed 60 s\)$", now=NOW)


def test_a_long_expires_does_not_outlive_max_age():
    data = signed(ttl=86400)
    assert verifier().verify(data, now=NOW + 360)
    assert_fault(data, "wsu:MessageExpired", r"^message created at 2027-01-15T08:00:00.000Z is older than 300 s",
                 now=NOW + 361)


def test_configurable_skew():
    assert_fault(signed(now=NOW + 10), "wsu:MessageExpired", r"is in the future", max_skew=5, now=NOW)


def test_timestamp_without_expires_uses_max_age():
    data = xmlsec_signed(BARE_ENVELOPE, parties().alice, expires=None)
    assert verifier().verify(data, now=NOW + 300)
    assert_fault(data, "wsu:MessageExpired", r"is older than 300 s", now=NOW + 361)


@pytest.mark.parametrize("created, expires, reason", [
    ("2027-01-15 08:00:00", "2027-01-15T08:05:00Z", r"^wsu:Created '2027-01-15 08:00:00' is not an xsd:dateTime"),
    ("2027-01-15T08:00:00", "2027-01-15T08:05:00Z", r"^wsu:Created '2027-01-15T08:00:00' is not an xsd:dateTime "
                                                    r"with a time zone$"),
    ("2027-02-30T08:00:00Z", "2027-03-01T08:05:00Z", r"^wsu:Created '2027-02-30T08:00:00Z' is not a valid date"),
    ("2027-01-15T08:00:00Z", "2027-01-15T07:00:00Z", r"^wsu:Expires is not after wsu:Created$"),
])
def test_malformed_timestamps(created, expires, reason):
    data = xmlsec_signed(BARE_ENVELOPE, parties().alice, created=created, expires=expires)
    assert_fault(data, "wsse:InvalidSecurity", reason)


def test_time_zones_are_honoured():
    data = xmlsec_signed(BARE_ENVELOPE, parties().alice, created="2027-01-15T09:00:00+01:00",
                         expires="2027-01-15T03:05:00.5-05:00")
    assert verifier().verify(data, now=NOW + 360)
    assert_fault(data, "wsu:MessageExpired", r"^timestamp expired at 2027-01-15T08:05:00.500Z", now=NOW + 361)


# ---------------------------------------------------------------------------------------- replay

def test_replayed_message_id():
    check = verifier()
    data = signed()
    check.verify(data, now=NOW + 1)
    with pytest.raises(WsSecurityFault) as caught:
        check.verify(data, now=NOW + 2)
    assert str(caught.value) == "wsse:InvalidSecurity: replayed message urn:uuid:5f0c8a1e-1111-4222-8333-944455556666"


def test_same_message_id_signed_again_is_a_replay_but_not_from_another_signer():
    check = verifier()
    check.verify(signed(), now=NOW)
    check.verify(signed(party=parties().bob), now=NOW)  # bob's own MessageID space
    with pytest.raises(WsSecurityFault, match="replayed message urn:uuid:5f0c8a1e"):
        check.verify(signed(now=NOW + 5), now=NOW + 6)


def test_replay_without_message_id_is_keyed_on_the_signature():
    check = verifier()
    data = signed(BARE_ENVELOPE)
    check.verify(data, now=NOW)
    check.verify(signed(BARE_ENVELOPE), now=NOW)  # signed again: a new signature value
    with pytest.raises(WsSecurityFault, match=r"^wsse:InvalidSecurity: replayed message \(its signature value "
                                              r"was seen before\)$"):
        check.verify(data, now=NOW + 1)


def test_replay_cache_forgets_after_the_window_and_fails_closed_when_full():
    cache = wssec.ReplayCache(capacity=2)
    assert cache.add(b"a", until=NOW + 10, now=NOW)
    assert not cache.add(b"a", until=NOW + 10, now=NOW + 5)
    assert cache.add(b"b", until=NOW + 20, now=NOW)
    with pytest.raises(WsSecurityFault, match="replay cache is full") as caught:
        cache.add(b"c", until=NOW + 20, now=NOW + 1)
    assert caught.value.receiver
    assert cache.add(b"c", until=NOW + 30, now=NOW + 11)  # "a" expired: room again
    assert len(cache) == 2
    assert cache.add(b"a", until=NOW + 40, now=NOW + 31)  # everything before expired and is forgotten
    assert len(cache) == 1
    with pytest.raises(ValueError):
        wssec.ReplayCache(0)


# ---------------------------------------------------------------------------------- hostile input

@pytest.mark.parametrize("data, reason", [
    (b'<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]><lolz>&lol2;</lolz>',
     r"^envelope refused: SOAP envelope has a DOCTYPE; DTDs and entity declarations are not allowed$"),
    (b"<a>" * 40 + b"</a>" * 40, r"^envelope refused: SOAP envelope is nested deeper than 32 elements$"),
    (b"<soap:Envelope", r"^envelope refused: SOAP envelope is not well-formed XML"),
    (b"", r"^envelope refused: SOAP envelope is"),
    ("<str/>", r"^envelope refused: SOAP envelope must be bytes, not str$"),
    (b"<a/>", r"^not a SOAP 1.1 or 1.2 envelope: the root element is <a>$"),
    (f'<s:Envelope xmlns:s="{SOAP11_NS}"/>'.encode(), r"^the envelope has 0 soap:Body elements"),
    (f'<s:Envelope xmlns:s="{SOAP11_NS}"><s:Body/><s:Header/></s:Envelope>'.encode(),
     r"^soap:Header comes after soap:Body$"),
])
def test_hostile_or_broken_xml(data, reason):
    assert_fault(data, "wsse:InvalidSecurity", reason)


def test_huge_envelope():
    data = signed().replace(b"T-42", b"x" * (1024 * 1024))
    assert_fault(data, "wsse:InvalidSecurity", r"^envelope refused: SOAP envelope is \d+ bytes, over the limit of "
                                               r"1048576$")


# --------------------------------------------------------------------------------------- policy

def context(envelope=None):
    return types.SimpleNamespace(envelope=envelope, caller="unset")


def policy(**options) -> WsSecurityPolicy:
    service = parties().service
    options.setdefault("clock", lambda: NOW)
    return WsSecurityPolicy(parties().trust, service.key, service.cert, **options)


def test_policy_inbound_sets_the_caller_and_returns_the_same_bytes():
    data = signed()
    call = context()
    assert policy().inbound(data, call) is data
    assert call.caller.subject == "CN=alice,OU=user"


def test_policy_reuses_the_cores_parsed_tree():
    data = signed()
    call = context(etree.fromstring(data))
    policy().inbound(data, call)
    assert call.caller.message_id.startswith("urn:uuid:5f0c8a1e")


def test_policy_refuses_unsigned_requests_when_required():
    from dsmt.transports.soap.core import SOAP11, SOAP12, SoapFault
    with pytest.raises(SoapFault) as caught:
        policy().inbound(SOAP11_ENVELOPE, context())
    fault = caught.value
    assert fault.code == SoapFault.SENDER and fault.reason == "message is not signed: no wsse:Security header"
    assert [str(subcode) for subcode in fault.subcodes] == [f"{{{WSSE_NS}}}InvalidSecurity"]
    soap11 = etree.fromstring(fault.to_envelope(SOAP11))
    faultcode = soap11.find(f".//{{{SOAP11_NS}}}Fault/faultcode")
    assert faultcode.text.endswith(":InvalidSecurity") and faultcode.nsmap[faultcode.text.split(":")[0]] == WSSE_NS
    soap12 = etree.fromstring(fault.to_envelope(SOAP12))
    assert soap12.find(f".//{{{SOAP12_NS}}}Subcode/{{{SOAP12_NS}}}Value").text.endswith(":InvalidSecurity")


def test_policy_allows_unsigned_requests_when_not_required_but_still_checks_signed_ones():
    from dsmt.transports.soap.core import SoapFault
    lenient = policy(require_signed=False)
    call = context()
    assert lenient.inbound(SOAP11_ENVELOPE, call) is SOAP11_ENVELOPE
    assert call.caller is None
    with pytest.raises(SoapFault, match="does not match"):
        lenient.inbound(signed().replace(b"T-42", b"T-43"), context())


def test_policy_signs_replies_the_client_verifies():
    reply = policy().outbound(SOAP12_ENVELOPE, context())
    check = verifier(purpose=Purpose.SERVER, dns_name="node1.example")
    assert check.verify(reply, now=NOW).subject == "CN=nodemanager,OU=service"
    verify_only = WsSecurityPolicy(parties().trust)
    assert verify_only.outbound(SOAP12_ENVELOPE, context()) is SOAP12_ENVELOPE
    assert policy().understood_headers == {f"{{{WSSE_NS}}}Security"}


def test_policy_replay_fault_is_a_sender_fault_and_full_cache_a_receiver_fault():
    from dsmt.transports.soap.core import SoapFault
    strict = policy(replay_capacity=1)
    strict.inbound(signed(), context())
    with pytest.raises(SoapFault) as caught:
        strict.inbound(signed(), context())
    assert caught.value.code == SoapFault.SENDER and caught.value.reason.startswith("replayed message")
    with pytest.raises(SoapFault) as caught:
        strict.inbound(signed(party=parties().bob), context())
    assert caught.value.code == SoapFault.RECEIVER and "replay cache is full" in caught.value.reason


def test_policy_from_files(tmp_path):
    ca = pki.create_ca(str(tmp_path), "file CA", key_type="ec")
    service = pki.issue_certificate(str(tmp_path), "service", "pldb", key_type="ec")
    user = pki.issue_certificate(str(tmp_path), "user", "erin", key_type="ec")
    server = WsSecurityPolicy.from_files(ca_files=[ca.certificate], key_file=service.key,
                                         cert_file=service.certificate)
    client = Signer.from_files(user.key, user.certificate)
    call = context()
    server.inbound(client.sign(BARE_ENVELOPE), call)
    assert call.caller.subject == "CN=erin,OU=user"
    with pytest.raises(pki.PkiError, match="one of the two"):
        WsSecurityPolicy.from_files()


def test_fault_text():
    fault = WsSecurityFault(wssec.MESSAGE_EXPIRED, "timestamp expired at …")
    assert str(fault) == "wsu:MessageExpired: timestamp expired at …"
    assert fault.to_soap_fault().soap11_faultcode == wssec.MESSAGE_EXPIRED


@pytest.mark.parametrize("envelope", [
    f'<Envelope xmlns="{SOAP12_NS}"><Body><x xmlns="urn:x"/></Body></Envelope>'.encode(),
    f'<wsse:Envelope xmlns:wsse="{SOAP11_NS}"><wsse:Body><x/></wsse:Body></wsse:Envelope>'.encode(),
    f'<wsu:Envelope xmlns:wsu="{SOAP11_NS}"><wsu:Body><x/></wsu:Body></wsu:Envelope>'.encode(),
])
def test_unusual_envelope_prefixes(envelope):
    assert verifier().verify(signed(envelope), now=NOW)


def test_relative_namespace_uris_cannot_be_canonicalised():
    """C14N refuses relative namespace URIs: a fault (or a SigningError), never an lxml exception."""
    relative = f'<s:Envelope xmlns:s="{SOAP11_NS}"><s:Body><p:x xmlns:p="urnp"/></s:Body></s:Envelope>'.encode()
    with pytest.raises(SigningError, match=r"^soap:Body cannot be canonicalised"):
        signer().sign(relative)
    data = signed(BARE_ENVELOPE).replace(b'xmlns:p="urn:p"', b'xmlns:p="urnp"')
    assert_fault(data, "wsse:InvalidSecurity", r"^soap:Body cannot be canonicalised: relative namespace URI 'urnp'$")


def test_is_fault():
    fault = f'<s:Envelope xmlns:s="{SOAP11_NS}"><s:Body><s:Fault><faultcode>s:Client</faultcode>' \
            '<faultstring>no</faultstring></s:Fault></s:Body></s:Envelope>'
    assert wssec.is_fault(fault.encode())
    assert not wssec.is_fault(BARE_ENVELOPE)
    assert not wssec.is_fault(b"<not-xml")

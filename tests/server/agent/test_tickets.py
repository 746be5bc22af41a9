"""Tickets: enveloped XML-DSig round trips, and every refusal with its precise code (pure; fixed clock)."""
from __future__ import annotations

import re

import pytest
import xmlsec
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from dsmt.server.agent.tickets import (
    BAD_SIGNATURE, EXPIRED, MALFORMED, MAX_TICKET_BYTES, NOT_YET_VALID, UNSUPPORTED_ALGORITHM, UNTRUSTED_ISSUER,
    WEAK_ALGORITHM, WRAPPING, WRONG_NODE, TicketError, TicketSigningError, parse_ticket, sign_ticket, verify_ticket)
from dsmt.transports.soap import pki

from tests.support.testpki import xmlsec_verifies

from .support import DS, NOW, parties, rsa_agent, t, ticket, unsigned, xmlsec_signed


def signed(party=None, **changes) -> bytes:
    party = party or parties().agent
    return sign_ticket(ticket(party, **changes), party.key, party.cert)


def refused(data: bytes, code: str, pattern: str, *, now: float = NOW + 1, trust=None, **options) -> TicketError:
    with pytest.raises(TicketError) as caught:
        verify_ticket(data, trust or parties().trust, now=now, **options)
    assert caught.value.code == code, str(caught.value)
    assert re.search(pattern, caught.value.reason), str(caught.value)
    return caught.value


# ------------------------------------------------------------------------------------ round trips

def test_round_trip_returns_the_ticket():
    data = signed()
    assert verify_ticket(data, parties().trust, now=NOW + 1, node="141.213.4.201") == ticket()


def test_rsa_round_trip_uses_rsa_sha256():
    data = signed(rsa_agent())
    method = etree.fromstring(data).find(f".//{{{DS}}}SignatureMethod").get("Algorithm")
    assert method == "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
    assert verify_ticket(data, parties().trust, now=NOW).issuer == "CN=rsa-agent,OU=service"


def test_layout_is_an_enveloped_signature_over_the_whole_document():
    root = etree.fromstring(signed())
    assert root.tag == t("ticket")
    assert [etree.QName(child).localname for child in root] == [
        "id", "slice", "node", "resources", "leaselen", "notBefore", "notAfter", "issuer", "Signature"]
    assert root.findtext(t("notBefore")) == "2027-01-15T08:00:00Z"
    assert root.findtext(t("notAfter")) == "2027-01-15T09:00:00Z"
    reference = root.find(f"{{{DS}}}Signature/{{{DS}}}SignedInfo/{{{DS}}}Reference")
    assert reference.get("URI") == ""
    assert [x.get("Algorithm") for x in reference.iter(f"{{{DS}}}Transform")] == [
        "http://www.w3.org/2000/09/xmldsig#enveloped-signature", "http://www.w3.org/2001/10/xml-exc-c14n#"]
    assert root.find(f".//{{{DS}}}X509Data/{{{DS}}}X509Certificate") is not None


def test_several_resources_and_ipv6_node():
    data = signed(resources={"slots": 2, "disk-mb": 512}, node="2001:db8::7")
    assert verify_ticket(data, parties().trust, now=NOW, node="2001:DB8:0::7").resources == {"slots": 2,
                                                                                            "disk-mb": 512}


def test_parse_ticket_reads_without_verifying():
    assert parse_ticket(signed()) == ticket()


# ------------------------------------------------------------------------------ xmlsec as referee

def test_xmlsec_verifies_our_tickets_and_rejects_tampered_ones():
    data = signed()
    assert xmlsec_verifies(data, parties().agent)
    assert xmlsec_verifies(signed(rsa_agent()), rsa_agent())
    tampered = data.replace(b"141.213.4.201", b"141.213.4.202")
    assert not xmlsec_verifies(tampered, parties().agent)
    refused(tampered, BAD_SIGNATURE, r"digest does not match: it was changed after signing")


@pytest.mark.parametrize("party", ["ec", "rsa"])
def test_tickets_signed_by_xmlsec_templates_verify(party):
    party = rsa_agent() if party == "rsa" else parties().agent
    method = xmlsec.Transform.RSA_SHA256 if party is rsa_agent() else xmlsec.Transform.ECDSA_SHA256
    data = xmlsec_signed(unsigned(signed(party)), party, signature=method)
    assert verify_ticket(data, parties().trust, now=NOW).issuer == party.subject


# ------------------------------------------------------------------------------------------ tamper

@pytest.mark.parametrize("old, new", [
    (b"<t:slice>oceanstore<", b"<t:slice>oceanstorf<"),
    (b">1209600<", b">1209601<"),
    (b'name="slots">1<', b'name="slots">9<'),
    (b"09:00:00Z", b"10:00:00Z"),
    (b"  <t:node>", b"  <t:node> "),   # even whitespace inside a field is signed
])
def test_any_change_to_the_payload_is_a_bad_signature(old, new):
    data = signed()
    assert old in data
    tampered = data.replace(old, new, 1)
    refused(tampered, BAD_SIGNATURE, r"digest does not match")
    assert not xmlsec_verifies(tampered, parties().agent)


def test_changed_signature_value_or_signed_info_is_a_bad_signature():
    data = signed()
    root = etree.fromstring(data)
    value = root.find(f".//{{{DS}}}SignatureValue")
    value.text = ("B" if value.text[0] != "B" else "C") + value.text[1:]
    refused(etree.tostring(root), BAD_SIGNATURE, r"signature value does not verify")
    digest = etree.fromstring(data)
    digest.find(f".//{{{DS}}}DigestValue").text = "AAAA" + digest.find(f".//{{{DS}}}DigestValue").text[4:]
    refused(etree.tostring(digest), BAD_SIGNATURE, r"signature value does not verify")


def test_resigned_by_another_key_with_the_original_certificate_is_a_bad_signature():
    mallory = parties().other_agent
    forged = etree.fromstring(signed(mallory))
    # put the genuine agent's certificate in KeyInfo: the signature is still mallory's
    genuine = etree.fromstring(signed())
    forged.find(f".//{{{DS}}}X509Certificate").text = genuine.find(f".//{{{DS}}}X509Certificate").text
    refused(etree.tostring(forged), BAD_SIGNATURE, r"signature value does not verify")


# ------------------------------------------------------------------------------------------ wrapping

def test_xmlsec_alone_accepts_a_wrapped_forgery_that_we_refuse():
    """Why tickets carry no Id: signed as SAML does (URI="#id"), xmlsec follows the Id to the wrapped original."""
    agent = parties().agent
    genuine = xmlsec_signed(unsigned(signed()), agent, uri="#tkt", id_attribute="tkt")
    assert xmlsec_verifies(genuine, agent, ids=True)
    original = etree.fromstring(genuine)
    signature = original.find(f"{{{DS}}}Signature")
    original.remove(signature)
    forged = unsigned(signed())
    forged.find(t("node")).text = "10.6.6.6"          # mallory's node
    wrapper = etree.SubElement(forged, t("extension"))
    wrapper.append(original)                          # the signed original, hidden inside
    forged.append(signature)
    data = etree.tostring(forged)
    assert xmlsec_verifies(data, agent, ids=True)     # xmlsec alone: "valid"
    refused(data, WRAPPING, r"Id attribute 'tkt'")
    refused(genuine, WRAPPING, r"Id attribute 'tkt'")


def test_duplicate_ids_are_wrapping():
    root = etree.fromstring(signed())
    root.find(t("slice")).set("Id", "x")
    root.find(t("node")).set("{urn:evil}Id", "x")
    refused(etree.tostring(root), WRAPPING, r"duplicate Id 'x'")
    root = etree.fromstring(signed())
    root.find(t("slice")).set("{http://www.w3.org/XML/1998/namespace}id", "y")
    refused(etree.tostring(root), WRAPPING, r"Id attribute 'y'")


def test_signature_must_cover_the_root():
    """A genuine signed ticket nested inside a forged one: its signature covers only the nested copy."""
    forged = unsigned(signed())
    forged.find(t("node")).text = "10.6.6.6"
    forged.append(etree.fromstring(signed()))
    refused(etree.tostring(forged), WRAPPING, r"ds:Signature is not a child of t:ticket")


def test_reference_other_than_the_whole_document_is_wrapping():
    data = signed().replace(b'URI=""', b'URI="#other"')
    refused(data, WRAPPING, r"references '#other', not the whole ticket")
    root = etree.fromstring(signed())
    reference = root.find(f".//{{{DS}}}Reference")
    reference.getparent().append(etree.fromstring(etree.tostring(reference)))
    refused(etree.tostring(root), WRAPPING, r"2 references")


def test_two_signatures_are_wrapping():
    root = etree.fromstring(signed())
    root.append(etree.fromstring(etree.tostring(root.find(f"{{{DS}}}Signature"))))
    refused(etree.tostring(root), WRAPPING, r"2 ds:Signature elements")


# ------------------------------------------------------------------------------------------- issuer

def test_certificate_of_another_ca_is_untrusted():
    refused(signed(parties().rogue), UNTRUSTED_ISSUER, r"not issued by a trusted CA")


def test_user_certificate_cannot_issue_tickets():
    refused(signed(parties().user), UNTRUSTED_ISSUER, r"not valid for serverAuth")


def test_issuers_restrict_the_accepted_subjects():
    data = signed(parties().other_agent)
    refused(data, UNTRUSTED_ISSUER, r"CN=agent2,OU=service is not an accepted ticket issuer",
            issuers={"CN=agent,OU=service"})
    assert verify_ticket(signed(), parties().trust, now=NOW, issuers={"CN=agent,OU=service"})


def test_issuer_named_in_the_ticket_must_be_the_signer():
    root = unsigned(signed(parties().other_agent))
    root.find(t("issuer")).text = "CN=agent,OU=service"
    data = xmlsec_signed(root, parties().other_agent)
    refused(data, UNTRUSTED_ISSUER, r"names issuer 'CN=agent,OU=service' but was signed by CN=agent2,OU=service")


def test_certificate_expired_at_verification_time():
    refused(signed(), UNTRUSTED_ISSUER, r"expired at", now=NOW + 400 * 86400)


def test_missing_or_extra_certificates():
    root = etree.fromstring(signed())
    data = root.find(f".//{{{DS}}}X509Data")
    data.append(etree.fromstring(etree.tostring(data[0])))
    refused(etree.tostring(root), UNTRUSTED_ISSUER, r"exactly one ds:X509Data/ds:X509Certificate \(found 2\)")
    root = etree.fromstring(signed())
    root.find(f".//{{{DS}}}X509Certificate").text = "bm90IGEgY2VydA=="
    refused(etree.tostring(root), MALFORMED, r"not an X.509 certificate")


# ------------------------------------------------------------------------------------------ algorithms

def test_sha1_signature_forged_with_xmlsec_is_weak():
    agent = rsa_agent()
    data = xmlsec_signed(unsigned(signed(agent)), agent, signature=xmlsec.Transform.RSA_SHA1)
    assert xmlsec_verifies(data, agent)      # a valid signature, by an algorithm we refuse
    refused(data, WEAK_ALGORITHM, r"signature method rsa-sha1 is weak")


def test_sha1_digest_forged_with_xmlsec_is_weak():
    agent = parties().agent
    data = xmlsec_signed(unsigned(signed()), agent, digest=xmlsec.Transform.SHA1)
    assert xmlsec_verifies(data, agent)
    refused(data, WEAK_ALGORITHM, r"digest method sha1 is weak")


def test_unknown_algorithms_and_transforms_are_unsupported():
    refused(signed().replace(b"xmldsig-more#ecdsa-sha256", b"xmldsig-more#ecdsa-sha3"), UNSUPPORTED_ALGORITHM,
            r"signature method .*ecdsa-sha3.* not supported")
    inclusive = b"http://www.w3.org/TR/2001/REC-xml-c14n-20010315"
    refused(signed().replace(b'CanonicalizationMethod Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"',
                             b'CanonicalizationMethod Algorithm="' + inclusive + b'"'),
            UNSUPPORTED_ALGORITHM, r"canonicalization .* exclusive C14N is required")
    refused(signed().replace(b'<ds:Transform Algorithm="http://www.w3.org/2000/09/xmldsig#enveloped-signature"/>',
                             b""), UNSUPPORTED_ALGORITHM, r"enveloped-signature then exclusive C14N")


def test_signature_method_must_fit_the_key():
    refused(signed().replace(b"xmldsig-more#ecdsa-sha256", b"xmldsig-more#rsa-sha256"), UNSUPPORTED_ALGORITHM,
            r"rsa-sha256 does not fit the certificate's ec key")


# ------------------------------------------------------------------------------------------------ term

def test_not_yet_valid_and_expired_with_skew():
    data = signed()
    assert verify_ticket(data, parties().trust, now=NOW - 60)
    refused(data, NOT_YET_VALID, r"not valid before 2027-01-15T08:00:00Z \(now 2027-01-15T07:58:59Z, clock skew "
                                 r"allowed 60 s\)", now=NOW - 61)
    assert verify_ticket(data, parties().trust, now=NOW + 3600 + 60)
    refused(data, EXPIRED, r"ticket T-1 expired at 2027-01-15T09:00:00Z", now=NOW + 3600 + 61)
    refused(data, EXPIRED, r"expired", now=NOW + 3600 + 1, max_skew=0)


# ------------------------------------------------------------------------------------------------ node

def test_wrong_node():
    refused(signed(), WRONG_NODE, r"ticket T-1 is for node 141.213.4.201, not 141.213.4.202", node="141.213.4.202")
    refused(signed(node="node1.example"), WRONG_NODE, r"not node2.example", node="Node2.Example.")
    assert verify_ticket(signed(node="node1.example"), parties().trust, now=NOW, node="NODE1.example.")


# ------------------------------------------------------------------------------------------- malformed

@pytest.mark.parametrize("data, pattern", [
    (b"", r"not well-formed|empty"),
    (b"<t:ticket xmlns:t='http://dsmt.org/ns/ticket'/>", r"not signed"),
    (b"<ticket/>", r"root element is 'ticket'"),
    (b'<!DOCTYPE t [<!ENTITY a "b">]><t/>', r"DOCTYPE"),
    (b"<a>" + b" " * MAX_TICKET_BYTES + b"</a>", rf"over the limit of {MAX_TICKET_BYTES}"),
])
def test_malformed(data, pattern):
    refused(data, MALFORMED, pattern)


def test_processing_instructions_are_dropped_before_digesting():
    """The documented difference from xmlsec: a PI carries nothing dsmt reads, and the safe parser drops it."""
    data = signed().replace(b"<t:slice>", b"<?junk x?><t:slice>", 1)
    assert verify_ticket(data, parties().trust, now=NOW) == ticket()
    assert not xmlsec_verifies(data, parties().agent)


def test_signature_holds_exactly_its_three_parts():
    root = etree.fromstring(signed())
    etree.SubElement(root.find(f"{{{DS}}}Signature"), f"{{{DS}}}Object").text = "x"
    refused(etree.tostring(root), MALFORMED, r"ds:SignedInfo, ds:SignatureValue and ds:KeyInfo, in this order "
                                             r"\(found: SignedInfo, SignatureValue, KeyInfo, Object\)")


def test_extra_payload_element_signed_by_a_trusted_agent_is_still_malformed():
    root = unsigned(signed())
    etree.SubElement(root, t("comment")).text = "hi"
    refused(xmlsec_signed(root, parties().agent), MALFORMED, r"must hold exactly t:id, t:slice")


# --------------------------------------------------------------------------------------------- signing

def test_signing_refuses_misuse():
    agent, other = parties().agent, parties().other_agent
    with pytest.raises(TicketSigningError, match="does not belong to certificate"):
        sign_ticket(ticket(), agent.key, other.cert)
    with pytest.raises(TicketSigningError, match="is not the certificate's subject"):
        sign_ticket(ticket(issuer="CN=someone"), agent.key, agent.cert)
    for bad, pattern in [(dict(not_after=NOW), "not_after is not after not_before"),
                         (dict(node="Node.Example"), "not a normalised node address"),
                         (dict(ticket_id="a b"), "ticket id"),
                         (dict(slice_name="../x"), "slice name"),
                         (dict(resources={}), "1 to 16 resources"),
                         (dict(resources={"slots": -1}), "amount -1"),
                         (dict(resources={"slots": True}), "amount True"),
                         (dict(leaselen=0), "leaselen 0"),
                         (dict(not_before=1.5), "not whole POSIX seconds")]:
        with pytest.raises(TicketSigningError, match=pattern):
            sign_ticket(ticket(**bad), agent.key, agent.cert)


def test_ticket_is_immune_to_later_changes_of_the_callers_dict():
    resources = {"slots": 1}
    value = ticket(resources=resources)
    resources["slots"] = 5
    assert value.resources == {"slots": 1} and hash(value) == hash(ticket())


# ------------------------------------------------------------------------------------------- properties

@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_single_byte_change_is_refused_or_changes_nothing(data):
    """Flip one byte anywhere: a TicketError, or (insignificant bytes, e.g. base64 line breaks) the same ticket."""
    original = _signed_once()
    position = data.draw(st.integers(0, len(original) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda b: b != original[position]))
    mutated = original[:position] + bytes([value]) + original[position + 1:]
    try:
        result = verify_ticket(mutated, parties().trust, now=NOW)
    except TicketError:
        return
    assert result == ticket()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_ticket_error(data):
    with pytest.raises(TicketError):
        verify_ticket(data, parties().trust, now=NOW)


_SIGNED: list[bytes] = []


def _signed_once() -> bytes:
    if not _SIGNED:
        _SIGNED.append(signed())
    return _SIGNED[0]


def test_pinned_certificates_work_as_trust():
    agent = parties().agent
    assert verify_ticket(signed(), pki.PinnedCertificates([agent.cert]), now=NOW).ticket_id == "T-1"

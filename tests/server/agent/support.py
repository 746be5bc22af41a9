"""Shared fixtures for the agent tests: a fixed clock, a test PKI, and xmlsec as referee and forger."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import xmlsec
from cryptography.hazmat.primitives import serialization
from lxml import etree

from dsmt.server.agent.tickets import TICKET_NS, Ticket
from dsmt.transports.soap import pki
from tests.support.testpki import NOW, Party, authorities, issue  # noqa: F401  (NOW: the tests read it from here)

DS = "http://www.w3.org/2000/09/xmldsig#"


@dataclass(frozen=True)
class Pki:
    ca: Party
    agent: Party        # service "agent" (serverAuth + clientAuth)
    other_agent: Party  # another service of the same CA
    user: Party         # user "alice" (clientAuth only) of the same CA
    other_ca: Party
    rogue: Party        # service "agent" of the other CA

    @property
    def trust(self) -> pki.TrustStore:
        return pki.TrustStore([self.ca.cert])


@functools.lru_cache(maxsize=None)
def parties() -> Pki:
    ca, other = authorities()
    return Pki(ca, issue(ca, "service", "agent"), issue(ca, "service", "agent2"), issue(ca, "user", "alice"), other,
               issue(other, "service", "agent"))


@functools.lru_cache(maxsize=None)
def rsa_agent() -> Party:
    """An RSA-3072 service of the test CA (made once: RSA key generation is slow)."""
    return issue(parties().ca, "service", "rsa-agent", key_type="rsa")


def ticket(party: Party | None = None, **changes) -> Ticket:
    party = party or parties().agent
    fields = dict(ticket_id="T-1", slice_name="oceanstore", node="141.213.4.201", resources={"slots": 1},
                  not_before=NOW, not_after=NOW + 3600, issuer=party.subject, leaselen=1209600)
    fields.update(changes)
    return Ticket(**fields)


def pem_key(party: Party) -> bytes:
    return party.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())


def unsigned(data: bytes) -> etree._Element:
    """The ticket document of ``data`` without its ds:Signature (tail kept, as the transform does)."""
    root = etree.fromstring(data)
    signature = root.find(f"{{{DS}}}Signature")
    if signature is not None:
        previous = signature.getprevious()
        previous.tail = (previous.tail or "") + (signature.tail or "")
        root.remove(signature)
    return root


def xmlsec_signed(root: etree._Element, party: Party, *, signature=xmlsec.Transform.ECDSA_SHA256,
                  digest=xmlsec.Transform.SHA256, uri: str = "", id_attribute: str | None = None) -> bytes:
    """``root`` signed by xmlsec's template API (not our signer): enveloped, exclusive C14N, X509Data."""
    if id_attribute is not None:
        root.set("Id", id_attribute)
    sig = xmlsec.template.create(root, xmlsec.Transform.EXCL_C14N, signature, ns="ds")
    root.append(sig)
    reference = xmlsec.template.add_reference(sig, digest, uri=uri)
    xmlsec.template.add_transform(reference, xmlsec.Transform.ENVELOPED)
    xmlsec.template.add_transform(reference, xmlsec.Transform.EXCL_C14N)
    key_info = xmlsec.template.ensure_key_info(sig)
    xmlsec.template.add_x509_data(key_info)
    context = xmlsec.SignatureContext()
    if id_attribute is not None:
        context.register_id(root, "Id")
    key = xmlsec.Key.from_memory(pem_key(party), xmlsec.KeyFormat.PEM)
    key.load_cert_from_memory(party.cert.public_bytes(serialization.Encoding.PEM), xmlsec.KeyFormat.CERT_PEM)
    context.key = key
    context.sign(sig)
    return etree.tostring(root, xml_declaration=True, encoding="utf-8")


def t(name: str) -> str:
    return f"{{{TICKET_NS}}}{name}"

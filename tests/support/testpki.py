"""The test PKI every signing test builds on: two CAs at a fixed instant, and certificates issued from them.

Certificates are issued :data:`ISSUED` (30 days before the tests' "now",
2027-01-15T08:00:00Z) and valid a year, so tests pass explicit times and never
depend on the wall clock.  EC keys: quick to make; RSA where a test needs it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import xmlsec
from cryptography.hazmat.primitives import serialization
from lxml import etree

from dsmt.transports.soap import pki

#: The instant the signing tests take as "now" (2027-01-15T08:00:00Z).
NOW = 1_800_000_000
#: When the test certificates were issued.
ISSUED = NOW - 30 * 86400
_DS = "http://www.w3.org/2000/09/xmldsig#"


@dataclass(frozen=True)
class Party:
    key: object
    cert: object

    @property
    def subject(self) -> str:
        return pki.subject_text(self.cert)


@functools.lru_cache(maxsize=None)
def authorities() -> tuple[Party, Party]:
    """``(ca, other_ca)``: the trusted test CA and one nobody trusts (made once per run)."""
    return (Party(*pki.make_ca("dsmt test CA", key_type="ec", now=ISSUED)),
            Party(*pki.make_ca("another CA", key_type="ec", now=ISSUED)))


def issue(issuer: Party, kind: str, name: str, *, key_type: str = "ec", **options) -> Party:
    """A ``kind`` ("service" or "user") certificate named ``name`` from ``issuer``, issued at :data:`ISSUED`."""
    return Party(*pki.make_certificate(issuer.key, issuer.cert, kind, name, key_type=key_type, now=ISSUED,
                                       **options))


def xmlsec_verifies(data: bytes, party: Party, *, ids: bool = False) -> bool:
    """xmlsec's own full verification with ``party``'s certificate (registering ``Id`` attributes when ``ids``)."""
    root = etree.fromstring(data)
    if ids:
        xmlsec.tree.add_ids(root, ["Id"])
    context = xmlsec.SignatureContext()
    context.key = xmlsec.Key.from_memory(party.cert.public_bytes(serialization.Encoding.PEM),
                                         xmlsec.KeyFormat.CERT_PEM)
    try:
        context.verify(root.find(f".//{{{_DS}}}Signature"))
    except xmlsec.Error:
        return False
    return True

"""WS-Security (X.509 signatures) for dsmt's SOAP services: pure functions over envelope bytes.

What a signed envelope carries (SOAP 1.1 or 1.2; the signer writes exactly this)::

    <soap:Header>
      <wsse:Security soap:mustUnderstand="1">
        <wsu:Timestamp wsu:Id="TS-…"><wsu:Created>…Z</wsu:Created><wsu:Expires>…Z</wsu:Expires></wsu:Timestamp>
        <wsse:BinarySecurityToken ValueType="…#X509v3" EncodingType="…#Base64Binary" wsu:Id="X509-…">MII…</…>
        <ds:Signature>                    exclusive C14N; RSA-SHA256 or ECDSA-SHA256; SHA-256 digests
          <ds:SignedInfo>… one ds:Reference per signed element: #Body, #Timestamp, and each
                           WS-Addressing header present (MessageID, To, Action, RelatesTo, ReplyTo,
                           FaultTo, From) so none can be swapped …</ds:SignedInfo>
          <ds:SignatureValue>…</ds:SignatureValue>
          <ds:KeyInfo><wsse:SecurityTokenReference><wsse:Reference URI="#X509-…"/></…></ds:KeyInfo>
        </ds:Signature>
      </wsse:Security>
      <wsa:MessageID wsu:Id="…">urn:uuid:…</wsa:MessageID> …
    </soap:Header>
    <soap:Body wsu:Id="Body-…">…</soap:Body>

Each reference's exclusive-C14N transform lists, as ``InclusiveNamespaces``,
every namespace prefix in scope anywhere in the signed element: exclusive
C14N otherwise leaves out declarations only used inside attribute values or
text (``xsi:type="ns1:T"``), and those could then be re-bound without
breaking the signature.

Layers:

* :class:`Signer` — ``sign(envelope_bytes) -> signed_bytes``.  The result is
  serialised once; whoever forwards it must send those bytes unchanged.
* :class:`Verifier` — ``verify(received_bytes) -> VerifiedCaller`` or
  :class:`WsSecurityFault`.  It checks **the bytes received**: re-serialising
  or re-indenting a signed document breaks its signature.
* :class:`WsSecurityPolicy` — both, as an envelope filter of the SOAP core
  (``core.EnvelopeFilter``: ``inbound(bytes, context) -> bytes`` sets
  ``context.caller``; ``outbound(bytes, context) -> bytes`` signs the reply).
* :class:`SigningTransport` / :class:`AsyncSigningTransport` — the zeep side:
  wraps a zeep transport, signs each request's bytes, verifies each reply's
  bytes (and that its ``RelatesTo`` names the request).

Verification contract (in this order; the first failure raises):

1. parse safely (``dsmt.transports.xmlsafe``: no DTD, size and depth limits);
2. a SOAP 1.1/1.2 Envelope with one Body; exactly one ``wsse:Security`` header
   holding exactly one ``ds:Signature`` (anywhere inside it), one
   ``wsu:Timestamp`` and the ``wsse:BinarySecurityToken`` its KeyInfo names;
3. algorithms on the allow-list (:data:`SIGNATURE_METHODS`,
   :data:`DIGEST_METHODS`, exclusive C14N as the only canonicalization and
   transform) — SHA-1, MD5, SHA-224, RIPEMD-160 and every HMAC are *weak*;
4. every reference is ``#id`` and its value is carried by exactly one element
   in the whole document (``Id`` in any namespace, ``ID``, ``id``,
   ``xml:id``: two carriers are signature wrapping), that element has it as
   ``wsu:Id``, and the referenced set contains the Envelope's own Body, the
   Timestamp, and every WS-Addressing header present;
5. the certificate is valid for the purpose now (trust store or pins,
   ``pki.py``), its key fits the signature algorithm and is not weak;
6. the signature value is checked over the canonical SignedInfo
   (``cryptography``), then each digest is recomputed over exactly the
   element step 4 vetted (exclusive C14N by libxml2, through lxml);
7. the Timestamp is fresh: created ≤ now + skew, now ≤ Expires + skew, and
   now ≤ Created + max_age + skew;
8. the (signer, signed MessageID — or SignatureValue when there is none) pair
   was not accepted before within that window.

Why step 6 is not ``xmlsec.SignatureContext.verify``: xmlsec resolves the
``#id`` references itself through the Ids registered with
``xmlsec.tree.add_ids``, which keeps the *first* of two elements with one Id
(the classic wrapping vector: the tests show xmlsec alone accepting a
wrapped Body), so its answer is about whatever element it found; and it
canonicalises each reference by walking the whole document: parse, add_ids
and verify take ~0.45 ms for a Body, a Timestamp and four WS-Addressing
headers — over the 0.3 ms budget before any other check.  Digesting the
vetted elements directly is both exact and ~3× faster.
The tests keep xmlsec as the referee: xmlsec's own full verification accepts
every envelope :class:`Signer` makes, and envelopes signed with xmlsec's
template API verify here.

Facts this relies on (lxml 6.1.3, libxml2 2.14.6, cryptography 50):

* zeep's ``Signature``/``BinarySignature`` default to RSA-SHA1/SHA1 and its
  ``verify_envelope`` resolves references with ``xpath(...)[0]`` — it accepts
  signature wrapping; neither is used here.
* lxml's C14N of an element below a subtree that was built detached and then
  inserted leaves out namespace declarations of that subtree's root, so an
  in-memory tree can canonicalise differently from its own serialisation:
  the signer digests a tree re-parsed from the bytes it sends.
* libxml2's C14N refuses relative namespace URIs (``xmlns:p="urnp"``):
  that is a fault here, not an lxml error.
* cryptography parses certificate fields lazily: a corrupt subject surfaces
  as ``ValueError`` on first access, so tokens are fully read when loaded.

Faults are WS-Security 1.0 codes (``wsu:MessageExpired`` for freshness), each
with a reason naming the exact problem; see :class:`WsSecurityFault`.  Time
is POSIX seconds from an injectable clock; every entry point also takes
``now=`` so tests never sleep.  Not thread-safe (one reactor thread).
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import heapq
import inspect
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from lxml import etree

from dsmt.transports.soap.pki import (
    MIN_RSA_KEY_BITS, CertificateError, PinnedCertificates, PkiError, Purpose, TrustStore, load_certificate,
    load_private_key, subject_text)
from dsmt.transports.xmlsafe import DEFAULT_MAX_DEPTH, XmlSafetyError, parse_xml

__all__ = [
    "SOAP11_NS", "SOAP12_NS", "WSSE_NS", "WSU_NS", "DS_NS", "WSA_NS", "WSA_SUBMISSION_NS", "X509V3", "BASE64_BINARY",
    "EXC_C14N", "SIGNATURE_METHODS", "DIGEST_METHODS", "MAX_ENVELOPE_BYTES", "MAX_REFERENCES", "MAX_TOKEN_BYTES",
    "DEFAULT_TTL", "DEFAULT_MAX_SKEW", "DEFAULT_MAX_AGE", "DEFAULT_REPLAY_CAPACITY",
    "UNSUPPORTED_SECURITY_TOKEN", "UNSUPPORTED_ALGORITHM", "INVALID_SECURITY", "INVALID_SECURITY_TOKEN",
    "FAILED_AUTHENTICATION", "FAILED_CHECK", "SECURITY_TOKEN_UNAVAILABLE", "MESSAGE_EXPIRED",
    "WsSecurityFault", "SigningError", "VerifiedCaller", "SignedEnvelope", "Signer", "Verifier", "ReplayCache",
    "WsSecurityPolicy", "SigningTransport", "AsyncSigningTransport", "is_fault",
    # XML-DSig primitives shared with the agent's signed tickets (dsmt.server.agent.tickets)
    "WEAK_SIGNATURE_METHODS", "WEAK_DIGEST_METHODS", "SIGNATURE_URI_FOR", "canonical_bytes", "key_kind",
    "sign_bytes", "signature_verifies", "signature_method_for", "read_certificate",
]

# ----------------------------------------------------------------------------------- namespaces

SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
WSSE_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
DS_NS = "http://www.w3.org/2000/09/xmldsig#"
#: W3C WS-Addressing 1.0 (what zeep and WSDM write) and the 2004/08 submission
#: (WS-Management's); headers of either are signed and must be signed.
WSA_NS = "http://www.w3.org/2005/08/addressing"
WSA_SUBMISSION_NS = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
X509V3 = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-x509-token-profile-1.0#X509v3"
BASE64_BINARY = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-soap-message-security-1.0#Base64Binary"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"

_SOAP_NAMESPACES = (SOAP11_NS, SOAP12_NS)
_WSA_NAMESPACES = (WSA_NS, WSA_SUBMISSION_NS)
#: WS-Addressing headers that steer a message: each present must be signed.
ADDRESSING_HEADERS = ("MessageID", "To", "Action", "RelatesTo", "ReplyTo", "FaultTo", "From")
_ADDRESSING_TAGS = {f"{{{ns}}}{name}": name for ns in _WSA_NAMESPACES for name in ADDRESSING_HEADERS}

_SECURITY = f"{{{WSSE_NS}}}Security"
_BST = f"{{{WSSE_NS}}}BinarySecurityToken"
_STR = f"{{{WSSE_NS}}}SecurityTokenReference"
_STR_REFERENCE = f"{{{WSSE_NS}}}Reference"
_TIMESTAMP = f"{{{WSU_NS}}}Timestamp"
_CREATED = f"{{{WSU_NS}}}Created"
_EXPIRES = f"{{{WSU_NS}}}Expires"
_WSU_ID = f"{{{WSU_NS}}}Id"
_SIGNATURE = f"{{{DS_NS}}}Signature"
_SIGNED_INFO = f"{{{DS_NS}}}SignedInfo"
_C14N_METHOD = f"{{{DS_NS}}}CanonicalizationMethod"
_SIGNATURE_METHOD = f"{{{DS_NS}}}SignatureMethod"
_REFERENCE = f"{{{DS_NS}}}Reference"
_TRANSFORMS = f"{{{DS_NS}}}Transforms"
_TRANSFORM = f"{{{DS_NS}}}Transform"
_DIGEST_METHOD = f"{{{DS_NS}}}DigestMethod"
_DIGEST_VALUE = f"{{{DS_NS}}}DigestValue"
_SIGNATURE_VALUE = f"{{{DS_NS}}}SignatureValue"
_KEY_INFO = f"{{{DS_NS}}}KeyInfo"
_INCLUSIVE_NAMESPACES = f"{{{EXC_C14N}}}InclusiveNamespaces"
_TOKEN_REFERENCE_PATH = f"{_STR}/{_STR_REFERENCE}"

# ----------------------------------------------------------------------------------- algorithms

_MORE = "http://www.w3.org/2001/04/xmldsig-more#"
#: Accepted signature methods: URI -> (short name, key kind, hash).
SIGNATURE_METHODS = {
    _MORE + "rsa-sha256": ("rsa-sha256", "rsa", hashes.SHA256()),
    _MORE + "rsa-sha384": ("rsa-sha384", "rsa", hashes.SHA384()),
    _MORE + "rsa-sha512": ("rsa-sha512", "rsa", hashes.SHA512()),
    _MORE + "ecdsa-sha256": ("ecdsa-sha256", "ec", hashes.SHA256()),
    _MORE + "ecdsa-sha384": ("ecdsa-sha384", "ec", hashes.SHA384()),
    _MORE + "ecdsa-sha512": ("ecdsa-sha512", "ec", hashes.SHA512()),
}
#: Signature methods refused as weak: SHA-1, MD5, SHA-224, RIPEMD-160 hashes
#: (below "RSA-SHA256 or better"), and HMAC (a shared secret names no signer).
WEAK_SIGNATURE_METHODS = {
    "http://www.w3.org/2000/09/xmldsig#rsa-sha1": "rsa-sha1",
    "http://www.w3.org/2000/09/xmldsig#dsa-sha1": "dsa-sha1",
    "http://www.w3.org/2000/09/xmldsig#hmac-sha1": "hmac-sha1",
    _MORE + "rsa-md5": "rsa-md5",
    _MORE + "rsa-sha224": "rsa-sha224",
    _MORE + "rsa-ripemd160": "rsa-ripemd160",
    _MORE + "ecdsa-sha1": "ecdsa-sha1",
    _MORE + "ecdsa-sha224": "ecdsa-sha224",
    _MORE + "hmac-md5": "hmac-md5",
    _MORE + "hmac-ripemd160": "hmac-ripemd160",
    _MORE + "hmac-sha224": "hmac-sha224",
    _MORE + "hmac-sha256": "hmac-sha256",
    _MORE + "hmac-sha384": "hmac-sha384",
    _MORE + "hmac-sha512": "hmac-sha512",
}
#: Accepted digest methods: URI -> hashlib name.
DIGEST_METHODS = {
    "http://www.w3.org/2001/04/xmlenc#sha256": "sha256",
    _MORE + "sha384": "sha384",
    "http://www.w3.org/2001/04/xmlenc#sha512": "sha512",
}
WEAK_DIGEST_METHODS = {
    "http://www.w3.org/2000/09/xmldsig#sha1": "sha1",
    _MORE + "md5": "md5",
    _MORE + "sha224": "sha224",
    "http://www.w3.org/2001/04/xmlenc#ripemd160": "ripemd160",
}
#: Canonicalizations and transforms we know and refuse (exclusive C14N is the only one accepted).
_REFUSED_TRANSFORMS = {
    "http://www.w3.org/TR/2001/REC-xml-c14n-20010315": "inclusive C14N",
    "http://www.w3.org/TR/2001/REC-xml-c14n-20010315#WithComments": "inclusive C14N with comments",
    "http://www.w3.org/2006/12/xml-c14n11": "C14N 1.1",
    "http://www.w3.org/2006/12/xml-c14n11#WithComments": "C14N 1.1 with comments",
    EXC_C14N + "WithComments": "exclusive C14N with comments",
    "http://www.w3.org/2000/09/xmldsig#enveloped-signature": "enveloped-signature",
    "http://www.w3.org/2000/09/xmldsig#base64": "base64",
    "http://www.w3.org/TR/1999/REC-xpath-19991116": "XPath",
    "http://www.w3.org/2002/06/xmldsig-filter2": "XPath filter 2",
    "http://www.w3.org/TR/1999/REC-xslt-19991116": "XSLT",
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-soap-message-security-1.0#STR-Transform": "STR-Transform",
}
SIGNATURE_URI_FOR = {  # what the signer writes, per key
    ("rsa", 0): _MORE + "rsa-sha256",
    ("ec", 256): _MORE + "ecdsa-sha256",
    ("ec", 384): _MORE + "ecdsa-sha384",
    ("ec", 521): _MORE + "ecdsa-sha512",
}
_SHA256 = "http://www.w3.org/2001/04/xmlenc#sha256"

# ---------------------------------------------------------------------------------------- limits

#: Largest envelope verified or signed.  dsmt's SOAP messages are a few KB
#: (slice specs for hundreds of nodes, tens of KB); 1 MiB equals the PsEPR
#: event cap, so any envelope that can travel over SOAP-over-PsEPR fits.
MAX_ENVELOPE_BYTES = 1024 * 1024
#: Most ds:Reference elements accepted.  A dsmt signature has 2 + up to 7
#: WS-Addressing headers; each extra reference is a digest over its subtree,
#: i.e. attacker-chosen work before the signature is known to be good.
MAX_REFERENCES = 16
#: Largest BinarySecurityToken (base64 characters).  An RSA-4096 certificate is
#: ~2 KB of DER; 16 KiB leaves room for long names and extensions.
MAX_TOKEN_BYTES = 16 * 1024
#: Seconds between wsu:Created and wsu:Expires on what we sign.  Five minutes
#: is WSS4J's default: long enough for a slow multi-hop PsEPR delivery.
DEFAULT_TTL = 300
#: Seconds of clock difference tolerated each way.  dsmt nodes run NTP; a
#: minute absorbs the odd lagging node without widening replay much.
DEFAULT_MAX_SKEW = 60
#: Oldest message accepted (seconds since wsu:Created), whatever its Expires
#: says: it caps how long a replay-cache entry must live, so a sender cannot
#: ask for a ten-year Expires and pin an entry for ten years.
DEFAULT_MAX_AGE = 300
#: Messages remembered for replay detection (~190 bytes each, measured).
#: 200,000 covers ~500 messages/s sustained over the ~7-minute acceptance
#: window (max_age + 2 × skew) in ~38 MB; when full and nothing has expired,
#: new messages are refused (fail closed) rather than old entries forgotten.
DEFAULT_REPLAY_CAPACITY = 200_000
#: Parsed certificates kept by BinarySecurityToken text: parsing a
#: certificate costs ~20 µs, a tenth of the budget per message.
TOKEN_CACHE_SIZE = 1024

# ----------------------------------------------------------------------------------------- faults

UNSUPPORTED_SECURITY_TOKEN = etree.QName(WSSE_NS, "UnsupportedSecurityToken")
UNSUPPORTED_ALGORITHM = etree.QName(WSSE_NS, "UnsupportedAlgorithm")
INVALID_SECURITY = etree.QName(WSSE_NS, "InvalidSecurity")
INVALID_SECURITY_TOKEN = etree.QName(WSSE_NS, "InvalidSecurityToken")
FAILED_AUTHENTICATION = etree.QName(WSSE_NS, "FailedAuthentication")
FAILED_CHECK = etree.QName(WSSE_NS, "FailedCheck")
SECURITY_TOKEN_UNAVAILABLE = etree.QName(WSSE_NS, "SecurityTokenUnavailable")
MESSAGE_EXPIRED = etree.QName(WSU_NS, "MessageExpired")

_PREFIXES = {WSSE_NS: "wsse", WSU_NS: "wsu"}


class WsSecurityFault(Exception):
    """A message failed WS-Security processing: a fault ``code`` (QName) and a precise ``reason``.

    Codes (WS-Security 1.0, §12, and ``wsu:MessageExpired`` of §10):

    =============================== ================================================================
    ``wsse:InvalidSecurity``        Security header missing or malformed, wrapping (duplicate Id,
                                    Body / Timestamp / WS-Addressing header not signed), replay,
                                    envelope refused by the safe parser
    ``wsse:UnsupportedAlgorithm``   weak (SHA-1, MD5, HMAC…) or unknown algorithm, transform or key
    ``wsse:UnsupportedSecurityToken`` token type other than X.509 v3
    ``wsse:InvalidSecurityToken``   token not base64 / not a certificate / too large
    ``wsse:SecurityTokenUnavailable`` KeyInfo names a token the message does not carry
    ``wsse:FailedAuthentication``   certificate not trusted, expired, or not valid for the purpose
    ``wsse:FailedCheck``            a digest or the signature value does not verify
    ``wsu:MessageExpired``          Timestamp expired, too old, or created in the future
    =============================== ================================================================

    ``receiver`` is True when the receiver, not the message, is at fault (the
    replay cache is full).  :meth:`to_soap_fault` gives the SOAP core's fault.
    """

    def __init__(self, code: etree.QName, reason: str, *, receiver: bool = False):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.receiver = receiver

    @property
    def prefixed_code(self) -> str:
        """``wsse:FailedCheck`` and the like."""
        return f"{_PREFIXES.get(self.code.namespace, 'ns')}:{self.code.localname}"

    def __str__(self) -> str:
        return f"{self.prefixed_code}: {self.reason}"

    def to_soap_fault(self):
        """This fault as the SOAP core's :class:`~dsmt.transports.soap.core.SoapFault`: code Sender
        (Receiver when ``receiver``), the WS-Security code as subcode (SOAP 1.2) and as ``faultcode``
        (SOAP 1.1, as WS-Security §12 writes it), the reason as the fault string."""
        from dsmt.transports.soap.core import SoapFault  # imported late: clients need no spyne
        return SoapFault(SoapFault.RECEIVER if self.receiver else SoapFault.SENDER, self.reason,
                         subcodes=(self.code.text,), soap11_faultcode=self.code.text)


def _fault(code: etree.QName, reason: str) -> WsSecurityFault:
    return WsSecurityFault(code, reason)


class SigningError(ValueError):
    """An envelope we were asked to sign cannot be signed (our own bug or misuse, not the peer's)."""


# -------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class VerifiedCaller:
    """Who signed a message that verified: for authorization and logs.

    ``subject`` is the certificate subject as RFC 4514 (``CN=alice,OU=user``);
    ``message_id`` and ``relates_to`` are the *signed* WS-Addressing values (None
    when absent).
    """

    subject: str
    certificate: x509.Certificate
    message_id: str | None
    relates_to: str | None = None

    @property
    def common_name(self) -> str | None:
        names = self.certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(names[0].value) if names else None


@dataclass(frozen=True)
class SignedEnvelope:
    """The signed bytes and the WS-Addressing MessageID they carry (None if the envelope had none)."""

    data: bytes
    message_id: str | None


# ----------------------------------------------------------------------------------------- times

#: xsd:dateTime with a time zone (WS-Security says UTC "SHOULD"; offsets are honoured).
_XSD_DATETIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d)\Z")


def _xsd_time(moment: float) -> str:
    """POSIX seconds as xsd:dateTime in UTC with milliseconds (what WSS4J writes)."""
    whole = int(moment // 1)
    millis = int(round((moment - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def _parse_time(element, what: str) -> float:
    text = (element.text or "").strip()
    match = _XSD_DATETIME.match(text)
    if match is None:
        raise _fault(INVALID_SECURITY, f"{what} {text[:40]!r} is not an xsd:dateTime with a time zone")
    try:   # the regex fixed the shape; fromisoformat (C, Python ≥ 3.11) checks the ranges and converts
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise _fault(INVALID_SECURITY, f"{what} {text!r} is not a valid date and time") from None


# ------------------------------------------------------------------------------------ envelopes

def _label(element) -> str:
    """``soap:Body``, ``wsu:Timestamp``, ``wsa:MessageID`` … for reasons."""
    qname = etree.QName(element)
    prefix = {SOAP11_NS: "soap", SOAP12_NS: "soap", WSU_NS: "wsu", WSSE_NS: "wsse", DS_NS: "ds",
              WSA_NS: "wsa", WSA_SUBMISSION_NS: "wsa"}.get(qname.namespace)
    return f"{prefix}:{qname.localname}" if prefix else f"<{qname.text}>"


def _envelope_parts(root, error: Callable[[str], Exception]):
    """(soap namespace, Header or None, Body) of a SOAP 1.1/1.2 envelope, else ``error(reason)``."""
    qname = _ENVELOPE_TAGS.get(root.tag)
    if qname is None:
        raise error(f"not a SOAP 1.1 or 1.2 envelope: the root element is {_label(root)}")
    soap_ns = qname.namespace
    header_tag, body_tag = _HEADER_TAGS[soap_ns]
    headers = [child for child in root if child.tag == header_tag]
    bodies = [child for child in root if child.tag == body_tag]
    if len(bodies) != 1:
        raise error(f"the envelope has {len(bodies)} soap:Body elements; exactly one is required")
    if len(headers) > 1:
        raise error(f"the envelope has {len(headers)} soap:Header elements; at most one is allowed")
    header = headers[0] if headers else None
    if header is not None and root.index(header) > root.index(bodies[0]):
        raise error("soap:Header comes after soap:Body")
    return soap_ns, header, bodies[0]


_HEADER_TAGS = {ns: (f"{{{ns}}}Header", f"{{{ns}}}Body") for ns in _SOAP_NAMESPACES}
_ENVELOPE_TAGS = {f"{{{ns}}}Envelope": etree.QName(ns, "Envelope") for ns in _SOAP_NAMESPACES}


def _addressing_headers(header) -> list:
    if header is None:
        return []
    return [child for child in header if child.tag in _ADDRESSING_TAGS]


def is_fault(envelope: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> bool:
    """True if ``envelope`` is a SOAP envelope whose Body holds a Fault (false for anything unparsable)."""
    try:
        root = parse_xml(envelope, max_bytes=max_bytes, what="SOAP envelope")
        soap_ns, _, body = _envelope_parts(root, ValueError)
    except (XmlSafetyError, ValueError):
        return False
    return len(body) >= 1 and body[0].tag == f"{{{soap_ns}}}Fault"


def _inclusive_prefixes(element) -> list[str]:
    """Every namespace prefix in scope anywhere in ``element``'s subtree ('#default' for the default one).

    In scope at ``element`` (``nsmap``) plus every prefix declared below it, read off its serialisation
    (3× faster than the XPath namespace axis).  Text that merely looks like a declaration can only add
    prefixes: C14N ignores one not in scope, and rendering one that is in scope only protects more.
    """
    prefixes = {prefix or "#default" for prefix in element.nsmap}
    prefixes.update((match.group(1) or b"#default").decode("ascii")
                    for match in _DECLARATION.finditer(etree.tostring(element)))
    prefixes.discard("xml")
    return sorted(prefixes)


#: A namespace declaration in serialised XML; the prefix group only matches plain (ASCII NCName) prefixes,
#: so nothing odd ever reaches a PrefixList.
_DECLARATION = re.compile(rb"xmlns(?::([A-Za-z_][A-Za-z0-9_.\-]*))?=")


# ---------------------------------------------------------------------------------------- signer

def key_kind(public_key) -> tuple[str, int]:
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa", public_key.key_size
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "ec", public_key.curve.key_size
    return type(public_key).__name__, 0


def read_certificate(der: bytes):
    """``(certificate, subject, public_key)`` of a DER certificate.

    cryptography parses lazily, so every field used later is touched here and
    a malformed one fails now: ``ValueError`` for what is not a certificate,
    ``UnsupportedAlgorithm`` for a key type it does not know.  Shared by
    WS-Security tokens and the agent's tickets.
    """
    certificate = x509.load_der_x509_certificate(der)
    subject, _, _ = subject_text(certificate), certificate.issuer, certificate.extensions
    return certificate, subject, certificate.public_key()


def signature_method_for(key, certificate: x509.Certificate) -> str:
    """The ``SignatureMethod`` URI for signing with ``key`` as the holder of ``certificate``.

    Raises :class:`SigningError` when the key does not belong to the
    certificate, is RSA under :data:`MIN_RSA_KEY_BITS`, or is of a kind or size
    we do not sign with.  Shared by envelope signing and the agent's tickets.
    """
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != \
            certificate.public_key().public_bytes(serialization.Encoding.DER, public):
        raise SigningError(f"the private key does not belong to certificate {subject_text(certificate)}")
    kind, size = key_kind(certificate.public_key())
    if kind == "rsa" and size < MIN_RSA_KEY_BITS:
        raise SigningError(f"RSA key of {size} bits is too weak; at least {MIN_RSA_KEY_BITS} are required")
    uri = SIGNATURE_URI_FOR.get((kind, 0 if kind == "rsa" else size))
    if uri is None:
        raise SigningError(f"cannot sign with a {kind} key of {size} bits; use RSA or EC P-256/384/521")
    return uri


class Signer:
    """Signs SOAP envelopes with an X.509 key: Body, Timestamp and WS-Addressing headers.

    ``key`` is an RSA (≥ 2048 bits; RSA-SHA256) or EC P-256/384/521 private key
    (ECDSA with SHA-256/384/512); ``certificate`` its certificate, sent as the
    BinarySecurityToken.  ``ttl`` seconds become wsu:Expires - wsu:Created.
    ``must_understand`` marks the Security header ``mustUnderstand``, so a
    receiver that does not process WS-Security refuses the message instead
    of running it unchecked.
    """

    def __init__(self, key, certificate: x509.Certificate, *, ttl: float = DEFAULT_TTL,
                 clock: Callable[[], float] = time.time, must_understand: bool = True,
                 max_bytes: int = MAX_ENVELOPE_BYTES):
        uri = signature_method_for(key, certificate)
        if not ttl > 0:
            raise SigningError(f"ttl must be positive seconds, not {ttl!r}")
        self.certificate = certificate
        self.ttl = ttl
        self.clock = clock
        self.must_understand = must_understand
        self.max_bytes = max_bytes
        self.signature_method = uri
        self._key = key
        self._hash = SIGNATURE_METHODS[uri][2]
        self._token = base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode("ascii")

    @classmethod
    def from_files(cls, key_file: str, cert_file: str, **options) -> "Signer":
        return cls(load_private_key(key_file), load_certificate(cert_file), **options)

    def sign(self, envelope: bytes, *, now: float | None = None) -> bytes:
        """``envelope`` (bytes of a SOAP 1.1/1.2 envelope without a Security header), signed."""
        return self.sign_envelope(envelope, now=now).data

    def sign_envelope(self, envelope: bytes, *, now: float | None = None) -> SignedEnvelope:
        """Like :meth:`sign`, also returning the envelope's WS-Addressing MessageID."""
        now = self.clock() if now is None else now
        try:
            root = parse_xml(envelope, max_bytes=self.max_bytes, what="SOAP envelope")
        except XmlSafetyError as exc:
            raise SigningError(str(exc)) from None
        soap_ns, header, body = _envelope_parts(root, SigningError)
        if header is not None and header.find(_SECURITY) is not None:
            raise SigningError("the envelope already has a wsse:Security header")
        root = _with_wsu_declared(root)
        if header is None:
            header = root.makeelement(f"{{{soap_ns}}}Header")
            root.insert(0, header)
        addressing = _addressing_headers(header)
        token = secrets.token_hex(6)
        soap_prefix = root.prefix if root.prefix not in (None, "wsse", "wsu", "ds", "ec") else "soapenv"
        targets = [(body, "Body")] + [(h, _ADDRESSING_TAGS[h.tag]) for h in addressing]
        for number, (target, name) in enumerate(targets):
            existing = target.get(_WSU_ID)
            if existing is None:
                target.set(_WSU_ID, f"{name}-{token}" if number == 0 else f"{name}-{token}-{number}")
            elif not _REFERENCE_URI.match("#" + existing):
                raise SigningError(f"{_label(target)} has wsu:Id {existing[:80]!r}, not a plain name")
        plan = [(target.get(_WSU_ID), _inclusive_prefixes(target)) for target, _ in targets]
        # The Timestamp will sit in Security, in Header: its scope is the Header's plus Security's own.
        plan.insert(1, (f"TS-{token}", sorted({*(p or "#default" for p in header.nsmap), "wsse", "wsu", soap_prefix})))

        # The Security header is written as text and parsed once (a third of the cost of building it
        # element by element); every value in it is ours or was checked to be a plain name.
        must_understand = (f' {soap_prefix}:mustUnderstand="{"1" if soap_ns == SOAP11_NS else "true"}"'
                           if self.must_understand else "")
        references = "".join(
            f'<ds:Reference URI="#{target_id}"><ds:Transforms><ds:Transform Algorithm="{EXC_C14N}">'
            + (f'<ec:InclusiveNamespaces xmlns:ec="{EXC_C14N}" PrefixList="{" ".join(prefixes)}"/>'
               if prefixes else "")
            + f'</ds:Transform></ds:Transforms><ds:DigestMethod Algorithm="{_SHA256}"/>'
              '<ds:DigestValue></ds:DigestValue></ds:Reference>'
            for target_id, prefixes in plan)
        bst_id = f"X509-{token}"
        security = etree.fromstring(
            f'<wsse:Security xmlns:wsse="{WSSE_NS}" xmlns:wsu="{WSU_NS}" xmlns:{soap_prefix}="{soap_ns}"'
            f'{must_understand}><wsu:Timestamp wsu:Id="TS-{token}"><wsu:Created>{_xsd_time(now)}</wsu:Created>'
            f'<wsu:Expires>{_xsd_time(now + self.ttl)}</wsu:Expires></wsu:Timestamp>'
            f'<wsse:BinarySecurityToken EncodingType="{BASE64_BINARY}" ValueType="{X509V3}" wsu:Id="{bst_id}">'
            f'{self._token}</wsse:BinarySecurityToken>'
            f'<ds:Signature xmlns:ds="{DS_NS}"><ds:SignedInfo>'
            f'<ds:CanonicalizationMethod Algorithm="{EXC_C14N}"/>'
            f'<ds:SignatureMethod Algorithm="{self.signature_method}"/>{references}</ds:SignedInfo>'
            f'<ds:SignatureValue></ds:SignatureValue><ds:KeyInfo><wsse:SecurityTokenReference>'
            f'<wsse:Reference URI="#{bst_id}" ValueType="{X509V3}"/></wsse:SecurityTokenReference></ds:KeyInfo>'
            f'</ds:Signature></wsse:Security>')
        header.insert(0, security)
        message_id = next((h.text.strip() for h in addressing
                           if h.tag.endswith("}MessageID") and h.text), None)

        # Digest and sign a tree parsed from the bytes we send, never the tree built above: lxml's C14N
        # of an element under a subtree that was created detached and then inserted omits namespace
        # declarations of that subtree's root (seen with lxml 6.1.3), so the in-memory tree and the
        # bytes can canonicalise differently.  What the verifier parses is what we sign.
        root = etree.fromstring(etree.tostring(root, encoding="utf-8"), _OWN_PARSER)
        _, header, body = _envelope_parts(root, SigningError)
        security = header[0]
        signature = security[2]
        wanted = {target_id for target_id, _ in plan}
        index = {element.get(_WSU_ID): element for element in (body, *header, *security)}
        counts: dict[str, int] = {}
        for value in _ID_VALUES(root):
            if value in wanted:
                counts[value] = counts.get(value, 0) + 1
        duplicated = sorted(value for value, count in counts.items() if count > 1)
        if duplicated:
            raise SigningError(f"the envelope already has more than one element with Id {duplicated[0]!r}")
        signed_info = signature[0]
        for (target_id, prefixes), reference in zip(plan, signed_info[2:]):
            target = index[target_id]
            try:
                digest = hashlib.sha256(canonical_bytes(target, prefixes)).digest()
            except etree.C14NError:
                raise SigningError(f"{_label(target)} cannot be canonicalised (a relative namespace URI?)") from None
            reference[2].text = base64.b64encode(digest).decode("ascii")
        raw = sign_bytes(self._key, self._hash, canonical_bytes(signed_info, None))
        signature[1].text = base64.b64encode(raw).decode("ascii")
        return SignedEnvelope(etree.tostring(root, xml_declaration=True, encoding="utf-8"), message_id)


#: Parses the signer's own intermediate bytes (already checked; nothing to strip).
_OWN_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, collect_ids=False)


def canonical_bytes(element, prefixes) -> bytes:
    """Exclusive C14N (no comments) of ``element``'s subtree, rendering ``prefixes`` inclusively.

    This is what an XML-DSig same-document ``#id`` reference with the
    exclusive-C14N transform digests, and what SignedInfo is signed as; lxml
    and xmlsec both call libxml2's canonicalizer for it.
    """
    return etree.tostring(element, method="c14n", exclusive=True, with_comments=False,
                          inclusive_ns_prefixes=prefixes)


def sign_bytes(key, algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    """An XML-DSig SignatureValue: RSA PKCS#1 v1.5, or ECDSA as r ‖ s, each the curve's size (XMLDSig 1.1)."""
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), algorithm)
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(algorithm)))
    size = (key.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def signature_verifies(public_key, algorithm: hashes.HashAlgorithm, data: bytes, value: bytes) -> bool:
    """Whether ``value`` (as :func:`sign_bytes` writes it) signs ``data`` with ``public_key``."""
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(value, data, padding.PKCS1v15(), algorithm)
            return True
        size = (public_key.curve.key_size + 7) // 8
        if len(value) != 2 * size:
            return False
        r, s = int.from_bytes(value[:size], "big"), int.from_bytes(value[size:], "big")
        public_key.verify(encode_dss_signature(r, s), data, ec.ECDSA(algorithm))
        return True
    except (InvalidSignature, ValueError):
        return False


def _checked_canonical(element, prefixes) -> bytes:
    """:func:`canonical_bytes` for the verifier: a document C14N refuses is a fault, not an lxml error."""
    try:
        return canonical_bytes(element, prefixes)
    except etree.C14NError:
        relative = sorted({uri for _, uri in element.xpath("namespace::* | .//namespace::*") if ":" not in uri})
        raise _fault(INVALID_SECURITY, f"{_label(element)} cannot be canonicalised" + (
            f": relative namespace URI {relative[0]!r}" if relative else "")) from None


def _with_wsu_declared(root):
    """``root``, or a copy of the Envelope element declaring ``xmlns:wsu`` that adopts its children.

    Without it lxml declares a fresh ``ns0`` prefix on every element given a
    wsu:Id: legal, but noisy in logs and ~90 bytes per signed element.
    """
    if WSU_NS in root.nsmap.values() or "wsu" in root.nsmap:
        return root
    new_root = etree.Element(root.tag, attrib=dict(root.attrib), nsmap={**root.nsmap, "wsu": WSU_NS})
    new_root.text = root.text
    new_root.extend(list(root))
    return new_root


# ---------------------------------------------------------------------------------- replay cache

class ReplayCache:
    """Keys seen recently, each until its own expiry; bounded.

    ``add(key, until, now)`` returns False if ``key`` is already held (a
    replay) and True after remembering it until ``until``.  When ``capacity``
    keys are held and none has expired, it raises :class:`WsSecurityFault`
    (``receiver=True``): refusing work is safer than forgetting a key and
    letting its message be replayed.
    """

    def __init__(self, capacity: int = DEFAULT_REPLAY_CAPACITY):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"replay cache capacity must be a positive integer, not {capacity!r}")
        self.capacity = capacity
        self._until: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._until)

    def _purge(self, now: float) -> None:
        heap, until = self._heap, self._until
        while heap and heap[0][0] < now:
            expiry, key = heapq.heappop(heap)
            if until.get(key) == expiry:
                del until[key]

    def add(self, key: bytes, until: float, now: float) -> bool:
        self._purge(now)
        if key in self._until:
            return False
        if len(self._until) >= self.capacity:
            raise WsSecurityFault(INVALID_SECURITY, f"replay cache is full ({self.capacity} messages within the "
                                  "timestamp window); refusing new messages until some expire", receiver=True)
        self._until[key] = until
        heapq.heappush(self._heap, (until, key))
        return True


# -------------------------------------------------------------------------------------- verifier

@dataclass(frozen=True)
class _Token:
    certificate: x509.Certificate
    key: object            # the certificate's public key
    fingerprint: bytes     # SHA-256 of the DER
    subject: str
    kind: str              # "rsa" / "ec" / other
    size: int


class _TokenCache:
    """Parsed certificates by BinarySecurityToken text (LRU, :data:`TOKEN_CACHE_SIZE`)."""

    def __init__(self, size: int):
        self._size = size
        self._entries: OrderedDict[str, _Token] = OrderedDict()

    def get(self, text: str) -> _Token:
        token = self._entries.get(text)
        if token is not None:
            self._entries.move_to_end(text)
            return token
        token = _load_token(text)
        self._entries[text] = token
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return token


def _load_token(text: str) -> _Token:
    if len(text) > MAX_TOKEN_BYTES:
        raise _fault(INVALID_SECURITY_TOKEN, f"wsse:BinarySecurityToken is {len(text)} characters, "
                                             f"over the limit of {MAX_TOKEN_BYTES}")
    try:
        der = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise _fault(INVALID_SECURITY_TOKEN, "wsse:BinarySecurityToken is not valid base64") from None
    try:
        certificate, subject, public_key = read_certificate(der)
    except ValueError as exc:
        raise _fault(INVALID_SECURITY_TOKEN, f"wsse:BinarySecurityToken is not an X.509 certificate: {exc}") from None
    except UnsupportedAlgorithm as exc:
        raise _fault(UNSUPPORTED_ALGORITHM, f"the certificate's key type is not supported: {exc}") from None
    kind, size = key_kind(public_key)
    return _Token(certificate, public_key, hashlib.sha256(der).digest(), subject, kind, size)


#: True when some element sits deeper than xmlsafe's DEFAULT_MAX_DEPTH (one XPath step per level).
_TOO_DEEP = etree.XPath("boolean(" + "/*" * (DEFAULT_MAX_DEPTH + 1) + ")")
#: The values of every attribute that could be taken for an Id: ``Id`` in any namespace (what
#: ``xmlsec.tree.add_ids`` registers), ``ID``, ``id``, ``xml:id``.  An element carrying one value twice
#: (``Id`` and ``wsu:Id``) counts twice: refused as a duplicate, conservatively.  (A union of four paths
#: is twice as fast as one predicate testing local-name() three ways.)
_ID_VALUES = etree.XPath("//@*[local-name()='Id'] | //@ID | //@id | //@xml:id", smart_strings=False)
_ID_CARRIER = etree.XPath("//*[@*[local-name()='Id'] = $id or @ID = $id or @id = $id or @xml:id = $id]")
_REFERENCE_URI = re.compile(r"#([A-Za-z_][A-Za-z0-9_.\-]{0,127})\Z")


def _algorithm(element, what: str) -> str:
    uri = element.get("Algorithm") if element is not None else None
    if not uri:
        raise _fault(INVALID_SECURITY, f"ds:SignedInfo has no ds:{what} with an Algorithm")
    return uri


def _prefix_list(method, where: str) -> list[str] | None:
    """The ``ec:InclusiveNamespaces/@PrefixList`` inside a CanonicalizationMethod or Transform, if any."""
    children = list(method)
    if not children:
        return None
    if len(children) != 1 or children[0].tag != _INCLUSIVE_NAMESPACES:
        raise _fault(INVALID_SECURITY, f"{where} may hold only ec:InclusiveNamespaces")
    return (children[0].get("PrefixList") or "").split() or None


def _carrier(root, index: dict, counts: dict, identifier: str, uri: str):
    """The one element whose wsu:Id is ``identifier`` (already known to be carried at most once)."""
    element = index.get(identifier)
    if element is not None:
        return element
    if not counts.get(identifier):
        raise _fault(INVALID_SECURITY, f"reference {uri!r} resolves to no element")
    element = _ID_CARRIER(root, id=identifier)[0]
    if element.get(_WSU_ID) != identifier:
        raise _fault(INVALID_SECURITY, f"reference {uri!r} names an element without that wsu:Id")
    return element


def _check_reference(reference):
    """Vet one ds:Reference: ``(uri, id, hashlib name, inclusive prefixes, DigestValue element)``.

    Accepted shape (XML-DSig order): ``URI="#id"``, Transforms holding exactly
    one exclusive-C14N Transform (optionally with InclusiveNamespaces), an
    allowed DigestMethod, a DigestValue.
    """
    uri = reference.get("URI") or ""
    match = _REFERENCE_URI.match(uri)
    if match is None:
        raise _fault(INVALID_SECURITY, f"reference URI {uri[:80]!r} is not a same-document '#id' reference")
    if len(reference) != 3 or reference[0].tag != _TRANSFORMS or reference[1].tag != _DIGEST_METHOD \
            or reference[2].tag != _DIGEST_VALUE:
        raise _fault(INVALID_SECURITY, f"reference {uri!r} must hold Transforms, DigestMethod and DigestValue")
    transforms, digest_method, digest_value = reference[0], reference[1], reference[2]
    if len(transforms) != 1 or transforms[0].tag != _TRANSFORM:
        raise _fault(INVALID_SECURITY, f"reference {uri!r} must have exactly one ds:Transform (exclusive C14N), "
                                       f"not {len(transforms)}")
    transform = transforms[0]
    algorithm = transform.get("Algorithm") or ""
    if algorithm != EXC_C14N:
        name = _REFUSED_TRANSFORMS.get(algorithm)
        if name is None:
            raise _fault(UNSUPPORTED_ALGORITHM, f"unknown transform {algorithm[:100]!r} in reference {uri!r}")
        raise _fault(UNSUPPORTED_ALGORITHM, f"transform {name} is not accepted in reference {uri!r} "
                                            "(only exclusive C14N)")
    prefixes = _prefix_list(transform, f"the transform of reference {uri!r}") if len(transform) else None
    digest_uri = digest_method.get("Algorithm") or ""
    digest = DIGEST_METHODS.get(digest_uri)
    if digest is None:
        weak = WEAK_DIGEST_METHODS.get(digest_uri)
        raise _fault(UNSUPPORTED_ALGORITHM, f"weak digest algorithm {weak}" if weak else
                     f"unknown digest algorithm {digest_uri[:100]!r}")
    return uri, match.group(1), digest, prefixes, digest_value


def _base64(element, what: str) -> bytes:
    try:
        return binascii.a2b_base64("".join((element.text or "").split()) if element is not None else "",
                                   strict_mode=True)
    except (binascii.Error, ValueError):
        raise _fault(INVALID_SECURITY, f"{what} is not valid base64") from None


class Verifier:
    """Verifies signed SOAP envelopes (see the module docstring for the exact contract).

    ``trust`` is a :class:`~dsmt.transports.soap.pki.TrustStore` or
    :class:`~dsmt.transports.soap.pki.PinnedCertificates` (anything with their
    ``validate(certificate, purpose, at=, dns_name=)``).  ``purpose`` is
    ``Purpose.CLIENT`` on a service (callers sign) and ``Purpose.SERVER`` on a
    client checking replies; ``dns_name`` optionally requires the signer's
    certificate to name that host.  ``replay_capacity=None`` turns replay
    detection off (benchmarks, and tests that verify one message twice).
    ``require_signed_addressing=False`` accepts unsigned WS-Addressing headers
    (peers that sign only Body and Timestamp, as zeep's own signer does); the
    MessageID then is not trusted and replay is keyed on the signature value.

    Costs (small request, six references, shared 2-core VM; ``bench/wssec.py``):
    median ~0.27 ms per message from bytes with EC P-256, ~0.24 ms with
    RSA-3072, ~50 µs less when given the SOAP core's parsed tree.
    """

    def __init__(self, trust, *, purpose: Purpose = Purpose.CLIENT, clock: Callable[[], float] = time.time,
                 max_skew: float = DEFAULT_MAX_SKEW, max_age: float = DEFAULT_MAX_AGE,
                 replay_capacity: int | None = DEFAULT_REPLAY_CAPACITY, require_signed_addressing: bool = True,
                 dns_name: str | None = None, max_bytes: int = MAX_ENVELOPE_BYTES):
        if not hasattr(trust, "validate"):
            raise TypeError(f"trust must be a TrustStore or PinnedCertificates, not {type(trust).__name__}")
        if not max_skew >= 0 or not max_age > 0:
            raise ValueError("max_skew must be ≥ 0 and max_age > 0 seconds")
        self.trust = trust
        self.purpose = purpose
        self.clock = clock
        self.max_skew = max_skew
        self.max_age = max_age
        self.replay = ReplayCache(replay_capacity) if replay_capacity is not None else None
        self.require_signed_addressing = require_signed_addressing
        self.dns_name = dns_name
        self.max_bytes = max_bytes
        self._tokens = _TokenCache(TOKEN_CACHE_SIZE)

    def verify(self, envelope: bytes, *, now: float | None = None, required: bool = True,
               parsed=None) -> VerifiedCaller | None:
        """Verify the exact bytes received; return the signer, or None for an unsigned message when not
        ``required``.  Raises :class:`WsSecurityFault` and nothing else.

        ``parsed`` may be the root element ``xmlsafe.parse_xml`` made of exactly
        these bytes (the SOAP core's ``context.envelope``), saving a second parse;
        it is read, never changed.
        """
        now = self.clock() if now is None else now
        if parsed is not None and isinstance(envelope, (bytes, bytearray)) and len(envelope) <= self.max_bytes:
            root = parsed
        else:
            try:   # the depth is checked below, by one XPath instead of xmlsafe's walk (~20 µs less)
                root = parse_xml(envelope, max_bytes=self.max_bytes, max_depth=None, what="SOAP envelope")
            except XmlSafetyError as exc:
                raise _fault(INVALID_SECURITY, f"envelope refused: {exc}") from None
            if _TOO_DEEP(root):
                raise _fault(INVALID_SECURITY, f"envelope refused: SOAP envelope is nested deeper than "
                                               f"{DEFAULT_MAX_DEPTH} elements")
        _, header, body = _envelope_parts(root, lambda reason: _fault(INVALID_SECURITY, reason))
        securities = header.findall(_SECURITY) if header is not None else []
        if not securities:
            if required:
                raise _fault(INVALID_SECURITY, "message is not signed: no wsse:Security header")
            return None
        if len(securities) > 1:
            raise _fault(INVALID_SECURITY, f"{len(securities)} wsse:Security headers; exactly one is accepted")
        security = securities[0]

        # -- 2. structure: one Signature, one Timestamp ------------------------------------------------
        signatures = list(security.iter(_SIGNATURE))
        if len(signatures) != 1:
            raise _fault(INVALID_SECURITY, "wsse:Security has no ds:Signature" if not signatures else
                         f"wsse:Security holds {len(signatures)} ds:Signature elements; exactly one is accepted")
        signature = signatures[0]
        if signature.getparent() is not security:
            raise _fault(INVALID_SECURITY, "ds:Signature must be a direct child of wsse:Security")
        timestamps = security.findall(_TIMESTAMP)
        if len(timestamps) != 1:
            raise _fault(INVALID_SECURITY, "wsse:Security has no wsu:Timestamp" if not timestamps else
                         f"wsse:Security holds {len(timestamps)} wsu:Timestamp elements; exactly one is accepted")
        timestamp = timestamps[0]
        signed_info = signature[0] if len(signature) else None
        if signed_info is None or signed_info.tag != _SIGNED_INFO:
            raise _fault(INVALID_SECURITY, "ds:Signature must begin with ds:SignedInfo")
        parts = list(signed_info)   # XML-DSig order: CanonicalizationMethod, SignatureMethod, Reference+
        if len(parts) < 3 or parts[0].tag != _C14N_METHOD or parts[1].tag != _SIGNATURE_METHOD \
                or any(part.tag != _REFERENCE for part in parts[2:]):
            raise _fault(INVALID_SECURITY, "ds:SignedInfo must hold CanonicalizationMethod, SignatureMethod and "
                                           "one or more ds:Reference, in that order")

        # -- 3. algorithms -----------------------------------------------------------------------------
        c14n_method, method_element, references = parts[0], parts[1], parts[2:]
        c14n = _algorithm(c14n_method, "CanonicalizationMethod")
        if c14n != EXC_C14N:
            name = _REFUSED_TRANSFORMS.get(c14n)
            raise _fault(UNSUPPORTED_ALGORITHM, f"unknown canonicalization {c14n[:100]!r}" if name is None else
                         f"canonicalization {name} is not accepted (only exclusive C14N)")
        signed_info_prefixes = _prefix_list(c14n_method, "ds:CanonicalizationMethod")
        method_uri = _algorithm(method_element, "SignatureMethod")
        method = SIGNATURE_METHODS.get(method_uri)
        if method is None:
            weak = WEAK_SIGNATURE_METHODS.get(method_uri)
            raise _fault(UNSUPPORTED_ALGORITHM, f"weak signature algorithm {weak}" if weak else
                         f"unknown signature algorithm {method_uri[:100]!r}")
        if len(references) > MAX_REFERENCES:
            raise _fault(INVALID_SECURITY, f"ds:SignedInfo has {len(references)} references, "
                                           f"over the limit of {MAX_REFERENCES}")
        checked = [_check_reference(reference) for reference in references]
        ids = [identifier for _, identifier, _, _, _ in checked]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise _fault(INVALID_SECURITY, f"ds:SignedInfo references '#{duplicate}' twice")

        # -- 4. references resolve to exactly one element; Body, Timestamp, addressing covered -----------
        key_info = signature.find(_KEY_INFO)
        token_reference = key_info.find(_TOKEN_REFERENCE_PATH) if key_info is not None else None
        token_uri = token_reference.get("URI", "") if token_reference is not None else ""
        token_match = _REFERENCE_URI.match(token_uri)
        if token_match is None:
            raise _fault(INVALID_SECURITY, "ds:KeyInfo must hold a wsse:SecurityTokenReference with a "
                                           "wsse:Reference URI='#id' naming a wsse:BinarySecurityToken")
        token_id = token_match.group(1)
        wanted = set(ids)
        wanted.add(token_id)
        counts: dict[str, int] = {}
        for value in _ID_VALUES(root):
            if value in wanted:
                counts[value] = counts.get(value, 0) + 1
        for identifier, count in counts.items():
            if count > 1:
                raise _fault(INVALID_SECURITY, f"duplicate wsu:Id {identifier!r} (signature wrapping)")
        # Each wanted Id is now carried once in the whole document; find its carrier among the usual places
        # (Body, the headers, the Security header's children) before searching the document for it.
        index = {}
        for element in (body, *header, *security):
            identifier = element.get(_WSU_ID)
            if identifier in wanted:
                index[identifier] = element
        targets = [_carrier(root, index, counts, identifier, uri) for uri, identifier, _, _, _ in checked]
        if not any(target is body for target in targets):
            raise _fault(INVALID_SECURITY, "signature does not cover soap:Body")
        if not any(target is timestamp for target in targets):
            raise _fault(INVALID_SECURITY, "signature does not cover wsu:Timestamp")
        message_id = relates_to = None
        seen_addressing: set[str] = set()
        for element in header:
            local = _ADDRESSING_TAGS.get(element.tag)
            if local is None:
                continue
            signed = any(target is element for target in targets)
            if not signed and self.require_signed_addressing:
                raise _fault(INVALID_SECURITY, f"signature does not cover wsa:{local}")
            if local in seen_addressing:
                raise _fault(INVALID_SECURITY, f"more than one wsa:{local} header")
            seen_addressing.add(local)
            if signed and local == "MessageID":
                message_id = (element.text or "").strip() or None
            elif signed and local == "RelatesTo":
                relates_to = (element.text or "").strip() or None

        # -- 5. the token and its certificate ------------------------------------------------------------
        if not counts.get(token_id):
            raise _fault(SECURITY_TOKEN_UNAVAILABLE, f"security token {token_uri!r} is not in the message")
        bst = _carrier(root, index, counts, token_id, token_uri)
        if bst.tag != _BST or bst.getparent() is not security or bst.get(_WSU_ID) != token_id:
            raise _fault(INVALID_SECURITY_TOKEN, f"{token_uri!r} is not a wsse:BinarySecurityToken in wsse:Security")
        if bst.get("ValueType") != X509V3:
            raise _fault(UNSUPPORTED_SECURITY_TOKEN, f"token type {str(bst.get('ValueType'))[:100]!r} is not "
                                                     "supported; only X.509 v3 certificates")
        if bst.get("EncodingType", BASE64_BINARY) != BASE64_BINARY:
            raise _fault(INVALID_SECURITY_TOKEN, f"token encoding {bst.get('EncodingType')[:100]!r} "
                                                 "is not Base64Binary")
        token = self._tokens.get("".join((bst.text or "").split()))
        if token.kind not in ("rsa", "ec"):
            raise _fault(UNSUPPORTED_ALGORITHM, f"the certificate's {token.kind} key is not supported (RSA or EC)")
        if token.kind != method[1]:
            raise _fault(UNSUPPORTED_ALGORITHM, f"signature algorithm {method[0]} does not fit the certificate's "
                                                f"{token.kind.upper()} key")
        if token.kind == "rsa" and token.size < MIN_RSA_KEY_BITS:
            raise _fault(UNSUPPORTED_ALGORITHM, f"weak RSA key of {token.size} bits (at least {MIN_RSA_KEY_BITS})")
        try:
            self.trust.validate(token.certificate, self.purpose, at=now, dns_name=self.dns_name)
        except CertificateError as exc:
            raise _fault(FAILED_AUTHENTICATION, str(exc)) from None

        # -- 6. the signature value over SignedInfo, then each digest over its vetted element ------------
        # (in this order, a forger who can put any public certificate in the token gets no more than one
        # signature check before being refused: no digests over large elements of his choosing)
        value = _base64(signature.find(_SIGNATURE_VALUE), "ds:SignatureValue")
        if not signature_verifies(token.key, method[2], _checked_canonical(signed_info, signed_info_prefixes), value):
            raise _fault(FAILED_CHECK, "signature value does not verify with the certificate's key "
                                       "(ds:SignedInfo was changed, or another key signed it)")
        for (uri, _, digest_name, prefixes, digest_value), target in zip(checked, targets):
            expected = _base64(digest_value, f"the DigestValue of reference {uri!r}")
            if hashlib.new(digest_name, _checked_canonical(target, prefixes)).digest() != expected:
                raise _fault(FAILED_CHECK, f"digest of {_label(target)} ({uri!r}) does not match: "
                                           "it was changed after signing")

        # -- 7, 8. freshness and replay, on authenticated values -----------------------------------------
        created_element = timestamp.find(_CREATED)
        if created_element is None:
            raise _fault(INVALID_SECURITY, "wsu:Timestamp has no wsu:Created")
        created = _parse_time(created_element, "wsu:Created")
        expires_element = timestamp.find(_EXPIRES)
        expires = _parse_time(expires_element, "wsu:Expires") if expires_element is not None else None
        skew = self.max_skew
        if expires is not None and expires <= created:
            raise _fault(INVALID_SECURITY, "wsu:Expires is not after wsu:Created")
        if created > now + skew:
            raise _fault(MESSAGE_EXPIRED, f"timestamp created at {_xsd_time(created)} is in the future "
                                          f"(now {_xsd_time(now)}, clock skew allowed {skew:g} s)")
        if expires is not None and now > expires + skew:
            raise _fault(MESSAGE_EXPIRED, f"timestamp expired at {_xsd_time(expires)} "
                                          f"(now {_xsd_time(now)}, clock skew allowed {skew:g} s)")
        if now > created + self.max_age + skew:
            raise _fault(MESSAGE_EXPIRED, f"message created at {_xsd_time(created)} is older than "
                                          f"{self.max_age:g} s (now {_xsd_time(now)})")
        if self.replay is not None:
            if message_id is not None:
                seen = "mid:" + message_id
            else:
                seen = "sig:" + base64.b64encode(value).decode("ascii")
            key = hashlib.blake2b(token.fingerprint + seen.encode("utf-8"), digest_size=16).digest()
            until = min(created + self.max_age, expires if expires is not None else float("inf")) + skew
            if not self.replay.add(key, until, now):
                raise _fault(INVALID_SECURITY, f"replayed message {message_id}" if message_id is not None
                             else "replayed message (its signature value was seen before)")
        return VerifiedCaller(token.subject, token.certificate, message_id, relates_to)


# ------------------------------------------------------------------------------------ the policy

class WsSecurityPolicy:
    """One service's WS-Security: an envelope filter of the SOAP core (``core.EnvelopeFilter``).

    ``SoapCore(services, tns, name, filters=[policy])`` is all the glue:

    * ``inbound(request_bytes, context) -> request_bytes`` verifies the exact
      bytes (reusing ``context.envelope``, the core's safe parse of them, when
      present), sets ``context.caller`` to the :class:`VerifiedCaller` — or None
      for an unsigned request when ``require_signed`` is False — and returns
      the same bytes object.  Failures raise the core's ``SoapFault``
      (:meth:`WsSecurityFault.to_soap_fault`).  A request that carries a
      Security header is always verified: a bad signature is never ignored.
    * ``outbound(reply_bytes, context) -> signed_bytes`` signs every reply,
      faults included, with ``key``/``cert`` (unchanged when the policy has none).
    * ``understood_headers``: ``wsse:Security``, so signed requests (marked
      mustUnderstand) pass the core's mustUnderstand check.

    ``trust``: TrustStore or PinnedCertificates for callers (Purpose.CLIENT).
    ``clock``: POSIX seconds.  ``ttl``: lifetime written into replies.
    ``max_skew``, ``max_age``, ``replay_capacity``, ``require_signed_addressing``:
    see :class:`Verifier`.
    """

    understood_headers = frozenset({_SECURITY})

    def __init__(self, trust, key=None, cert: x509.Certificate | None = None, require_signed: bool = True,
                 clock: Callable[[], float] = time.time, max_skew: float = DEFAULT_MAX_SKEW,
                 ttl: float = DEFAULT_TTL, replay_capacity: int | None = DEFAULT_REPLAY_CAPACITY, *,
                 max_age: float = DEFAULT_MAX_AGE, require_signed_addressing: bool = True,
                 max_bytes: int = MAX_ENVELOPE_BYTES):
        if (key is None) != (cert is None):
            raise ValueError("give both key and cert (to sign replies) or neither")
        self.require_signed = require_signed
        self.verifier = Verifier(trust, purpose=Purpose.CLIENT, clock=clock, max_skew=max_skew, max_age=max_age,
                                 replay_capacity=replay_capacity, require_signed_addressing=require_signed_addressing,
                                 max_bytes=max_bytes)
        self.signer = Signer(key, cert, ttl=ttl, clock=clock, max_bytes=max_bytes) if key is not None else None

    @classmethod
    def from_files(cls, *, ca_files=(), pinned_files=(), key_file: str | None = None, cert_file: str | None = None,
                   **options) -> "WsSecurityPolicy":
        """Build from PEM files: trusted CA certificates (or pinned peer certificates), and this service's
        key and certificate.  Raises :class:`~dsmt.transports.soap.pki.PkiError` with a readable message."""
        if bool(ca_files) == bool(pinned_files):
            raise PkiError("give CA files or pinned certificate files (one of the two)")
        trust = TrustStore.from_files(*ca_files) if ca_files else PinnedCertificates.from_files(*pinned_files)
        key = load_private_key(key_file) if key_file else None
        cert = load_certificate(cert_file) if cert_file else None
        return cls(trust, key, cert, **options)

    def __repr__(self) -> str:
        signs = f"signs as {subject_text(self.signer.certificate)}" if self.signer else "does not sign"
        return f"<WsSecurityPolicy {'requires' if self.require_signed else 'allows unsigned'}; {signs}>"

    def inbound(self, envelope: bytes, context, *, now: float | None = None) -> bytes:
        try:
            caller = self.verifier.verify(envelope, now=now, required=self.require_signed,
                                          parsed=getattr(context, "envelope", None))
        except WsSecurityFault as fault:
            raise fault.to_soap_fault() from None
        context.caller = caller
        return envelope

    def outbound(self, envelope: bytes, context=None, *, now: float | None = None) -> bytes:
        if self.signer is None:
            return envelope
        return self.signer.sign(envelope, now=now)


# ------------------------------------------------------------------------------------------ zeep

class SigningTransport:
    """A zeep transport wrapper: requests leave signed, replies are verified on the bytes received.

    ``SigningTransport(zeep.Transport(), signer, verifier)`` goes where zeep
    takes a transport (``zeep.Client(wsdl, transport=...)``).  Why a transport
    and not a ``client.wsse`` object: zeep hands ``wsse.verify`` a tree it parsed
    itself, not the bytes received, and ``wsse`` sees the request and the reply
    separately.  Here ``post_xml`` serialises zeep's envelope (after its
    WS-Addressing and plugins), signs those bytes, posts them with the wrapped
    transport's ``post(address, bytes, headers)``, and verifies
    ``response.content`` before zeep parses it — including that the reply's
    signed ``RelatesTo`` (when present) names the request's MessageID.

    The verifier should have ``purpose=Purpose.SERVER`` (and ``dns_name`` to
    pin the service's host).  An unsigned SOAP Fault reply passes when
    ``accept_unsigned_faults`` (a service refusing our signature cannot sign
    its refusal meaningfully; zeep then raises the Fault); any other unsigned
    reply raises :class:`WsSecurityFault`.  Every other attribute is the
    wrapped transport's.
    """

    def __init__(self, transport, signer: Signer, verifier: Verifier | None, *, accept_unsigned_faults: bool = True):
        self._transport = transport
        self.signer = signer
        self.verifier = verifier
        self.accept_unsigned_faults = accept_unsigned_faults

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def _request(self, envelope) -> SignedEnvelope:
        data = envelope if isinstance(envelope, bytes) else etree.tostring(envelope, xml_declaration=True,
                                                                          encoding="utf-8")
        return self.signer.sign_envelope(data)

    def _check_reply(self, request: SignedEnvelope, response) -> None:
        content = getattr(response, "content", None)
        if self.verifier is None or not content:
            return
        caller = self.verifier.verify(content, required=False)
        if caller is None:
            if self.accept_unsigned_faults and is_fault(content, max_bytes=self.verifier.max_bytes):
                return
            raise WsSecurityFault(INVALID_SECURITY, "reply is not signed: no wsse:Security header")
        if request.message_id is not None and caller.relates_to is not None \
                and caller.relates_to != request.message_id:
            raise WsSecurityFault(INVALID_SECURITY, f"reply relates to {caller.relates_to!r}, "
                                                    f"not to this request {request.message_id!r}")

    def post_xml(self, address, envelope, headers):
        request = self._request(envelope)
        response = self._transport.post(address, request.data, headers)
        self._check_reply(request, response)
        return response


class AsyncSigningTransport(SigningTransport):
    """:class:`SigningTransport` for ``zeep.AsyncClient``.

    With a wrapped transport that has its own ``async def post(address, bytes,
    headers)`` (zeep's ``AsyncTransport``) the signed bytes go out as they are.
    With one that only overrides ``async def post_xml`` (``dsmt.transports.http.
    TreqTransport``) it is handed the signed envelope parsed back into a tree,
    which it serialises again: zeep's ``etree_to_string`` neither indents nor
    reorders, so every canonical form — and the signature — is unchanged (the
    tests check this path too).  The reply is verified on its bytes either way.
    """

    async def post_xml(self, address, envelope, headers):
        request = self._request(envelope)
        if inspect.iscoroutinefunction(getattr(type(self._transport), "post", None)):
            response = await self._transport.post(address, request.data, headers)
            convert = getattr(self._transport, "new_response", None)
            if convert is not None:
                response = convert(response)
        else:
            response = await self._transport.post_xml(address, etree.fromstring(request.data, _OWN_PARSER), headers)
        self._check_reply(request, response)
        return response

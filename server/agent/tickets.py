"""Tickets: the agent's signed promise of resources on one node for one slice, verifiable offline.

A ticket is a whole XML document signed with an *enveloped* XML-DSig
signature (the node manager needs nothing but the CA certificate to check it)::

    <?xml version='1.0' encoding='utf-8'?>
    <t:ticket xmlns:t="http://dsmt.org/ns/ticket">
      <t:id>0f6c…</t:id>                      unique per ticket: redeeming it twice gives the same lease
      <t:slice>oceanstore</t:slice>
      <t:node>141.213.4.201</t:node>         the only node that may redeem it
      <t:resources><t:resource name="slots">1</t:resource></t:resources>
      <t:leaselen>1209600</t:leaselen>       seconds; the lease the node grants on redemption
      <t:notBefore>2027-01-15T08:00:00Z</t:notBefore>   redeemable from …
      <t:notAfter>2027-01-15T09:00:00Z</t:notAfter>     … until (the ticket's term, not the lease's)
      <t:issuer>CN=agent,OU=service</t:issuer>          the signing certificate's subject
      <ds:Signature>                exclusive C14N; RSA-SHA256 or ECDSA-SHA256/384/512; SHA-256 digest
        <ds:SignedInfo>… one ds:Reference URI="" (the whole document) with the transforms
                       enveloped-signature, exclusive C14N …</ds:SignedInfo>
        <ds:SignatureValue>…</ds:SignatureValue>
        <ds:KeyInfo><ds:X509Data><ds:X509Certificate>MII…</ds:X509Certificate></ds:X509Data></ds:KeyInfo>
      </ds:Signature>
    </t:ticket>

Why ``URI=""`` and no ``Id``: the signature covers the root element and all
it holds by construction.  An ``#id`` reference is what XML signature
wrapping exploits — the verifier is shown one element and the application
reads another (xmlsec registers the first of two equal Ids, or an Id on a
wrapped copy; ``tests/server/agent/test_tickets.py`` shows xmlsec alone
accepting such a forgery).  So a ticket carries no Id-like attribute at all
(``Id`` in any namespace, ``ID``, ``id``, ``xml:id``), has exactly one
``ds:Signature``, a child of the root, with exactly one reference, ``URI=""``.

Verification contract (:func:`verify_ticket`; in this order, the first
failure raises :class:`TicketError` with its code):

1. safe parse (``dsmt.transports.xmlsafe``: no DTD/entities, ≤
   :data:`MAX_TICKET_BYTES`, depth ≤ :data:`_MAX_DEPTH`); root ``t:ticket``
   (``malformed``);
2. signature structure as above (``wrapping``: several or misplaced
   signatures, a reference other than ``URI=""``, Id attributes);
3. algorithms: exclusive C14N (optionally with ``InclusiveNamespaces``),
   the transforms exactly enveloped-signature then exclusive C14N, a
   signature method and digest from ``wssec``'s allow-lists
   (``weak-algorithm`` for SHA-1, MD5, SHA-224, RIPEMD-160, HMAC;
   ``unsupported-algorithm`` for anything else unknown);
4. exactly one X.509 certificate in ``ds:KeyInfo/ds:X509Data``; it must be
   valid now for ``purpose`` (default ``Purpose.SERVER``: only *service*
   certificates carry serverAuth, so a user certificate of the same CA
   cannot mint tickets) under ``trust`` (``TrustStore.validate``), and its
   subject one of ``issuers`` when given (``untrusted-issuer``); its key
   must fit the signature method and not be weak (``weak-algorithm``);
5. the signature value over the canonical SignedInfo, then the digest over
   the document without the Signature element (``bad-signature``) — computed
   with ``cryptography`` and libxml2's C14N directly, not
   ``xmlsec.SignatureContext.verify``, so that what is digested is exactly the
   element the application then reads (the same reasoning as
   ``transports/soap/wssec.py``);
6. the payload: elements, once each, in order, values valid
   (``malformed``); ``t:issuer`` equals the certificate's subject
   (``untrusted-issuer``: a trusted agent cannot issue in another's name);
7. term, with ``max_skew`` seconds of clock difference allowed each way
   (``not-yet-valid``, ``expired``);
8. ``node`` when given must equal the ticket's node (``wrong-node``).

Signing (:func:`sign_ticket`) writes the document, re-parses the bytes and
signs that tree (lxml can canonicalise a tree built in memory differently
from its own serialisation — see ``wssec.py``), so the bytes returned are
exactly what was signed; they must be stored and sent unchanged.

xmlsec's own verifier (``xmlsec.SignatureContext.verify``) accepts every
ticket :func:`sign_ticket` makes; the tests keep it as the referee.

Known, harmless difference from xmlsec: the safe parser drops comments and
processing instructions before anything is digested, so a PI inserted into a
signed ticket still verifies here (it carries nothing dsmt reads) while xmlsec
rejects it; comments are outside C14N-without-comments for both.

Pure: no I/O; time is passed in (``now``, POSIX seconds).
"""
from __future__ import annotations

import base64
import binascii
import calendar
import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Collection, Mapping

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from lxml import etree

from dsmt.server.refusal import Refusal
from dsmt.server.slicemanager.spec import SLICE_NAME_PATTERN, SliceSpecError, normalize_node_address
from dsmt.transports.soap.pki import MIN_RSA_KEY_BITS, CertificateError, Purpose, subject_text
# wssec's algorithm tables and primitives: one implementation of XML-DSig signature values and C14N for
# all of dsmt.
from dsmt.transports.soap.wssec import (
    DIGEST_METHODS, DS_NS, EXC_C14N, SIGNATURE_METHODS, WEAK_DIGEST_METHODS,
    WEAK_SIGNATURE_METHODS, SigningError, canonical_bytes, key_kind, sign_bytes, signature_method_for,
    signature_verifies, read_certificate)
from dsmt.transports.xmlsafe import XmlSafetyError, parse_xml

__all__ = [
    "TICKET_NS", "Ticket", "TicketError", "TicketSigningError", "sign_ticket", "verify_ticket", "parse_ticket",
    "MAX_TICKET_BYTES", "MAX_CERTIFICATE_CHARS", "DEFAULT_MAX_SKEW", "MAX_RESOURCES", "MAX_RESOURCE_AMOUNT",
    "MALFORMED", "WRAPPING", "WEAK_ALGORITHM", "UNSUPPORTED_ALGORITHM", "UNTRUSTED_ISSUER", "BAD_SIGNATURE",
    "NOT_YET_VALID", "EXPIRED", "WRONG_NODE", "CODES",
]

TICKET_NS = "http://dsmt.org/ns/ticket"
ENVELOPED_SIGNATURE = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
_SHA256 = "http://www.w3.org/2001/04/xmlenc#sha256"

# ------------------------------------------------------------------------------------------ limits

#: Largest ticket read.  A ticket is ~1 KB plus the certificate (~1–2 KB;
#: RSA-4096 with long names stays under 4 KB); 32 KiB refuses anything that is
#: not a ticket before any parsing work.
MAX_TICKET_BYTES = 32 * 1024
#: Largest ds:X509Certificate (base64 characters): as wssec's token limit.
MAX_CERTIFICATE_CHARS = 16 * 1024
#: Seconds of clock difference tolerated when checking the term: the agent
#: stamps notBefore with its own "now" and the node manager may redeem at
#: once with a clock a little behind.  As wssec's DEFAULT_MAX_SKEW (NTP'd nodes).
DEFAULT_MAX_SKEW = 60
#: Most resource kinds in one ticket (dsmt issues one, ``slots``).
MAX_RESOURCES = 16
#: Largest amount of one resource: anything above is a bug or an attack.
MAX_RESOURCE_AMOUNT = 1_000_000
#: Longest lease a ticket may carry: the node manager caps leases at 14 days
#: by default; a ticket never promises more than a node could grant.
MAX_TICKET_LEASELEN = 14 * 24 * 3600
#: Depth: ticket / resources / resource, and Signature / SignedInfo / Reference / Transforms / Transform /
#: InclusiveNamespaces (6 under the root).
_MAX_DEPTH = 7

# ------------------------------------------------------------------------------------------ codes

MALFORMED = "malformed"                        # not a ticket, or a field is invalid
WRAPPING = "wrapping"                          # signature placement / references / Ids that allow wrapping
WEAK_ALGORITHM = "weak-algorithm"              # SHA-1, MD5, SHA-224, RIPEMD-160, HMAC; weak RSA key
UNSUPPORTED_ALGORITHM = "unsupported-algorithm"  # unknown algorithm or transform, key not fitting it
UNTRUSTED_ISSUER = "untrusted-issuer"          # certificate not trusted / not allowed / issuer name mismatch
BAD_SIGNATURE = "bad-signature"                # signature value or digest does not verify: tampered
NOT_YET_VALID = "not-yet-valid"
EXPIRED = "expired"
WRONG_NODE = "wrong-node"
CODES = (MALFORMED, WRAPPING, WEAK_ALGORITHM, UNSUPPORTED_ALGORITHM, UNTRUSTED_ISSUER, BAD_SIGNATURE,
         NOT_YET_VALID, EXPIRED, WRONG_NODE)


class TicketError(Refusal):
    """A ticket was refused: ``code`` (one of :data:`CODES`) and a precise ``reason``."""


class TicketSigningError(ValueError):
    """A ticket cannot be signed as asked (our caller's mistake, not a peer's)."""


# ------------------------------------------------------------------------------------------ model

_TICKET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
_RESOURCE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
_SLICE_NAME = re.compile(SLICE_NAME_PATTERN + r"\Z")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")
_INT = re.compile(r"(?:0|[1-9][0-9]{0,11})\Z")


@dataclass(frozen=True)
class Ticket:
    """What a ticket promises.

    ``ticket_id``: ``[A-Za-z0-9][A-Za-z0-9._:-]{0,127}``, unique per ticket.
    ``slice_name``: a valid slice name (``spec.SLICE_NAME_PATTERN``; reserved
    names are the spec parser's business).  ``node``: a normalised node
    address.  ``resources``: ``{name: amount}``, 1 to :data:`MAX_RESOURCES`
    names ``[a-z][a-z0-9_-]{0,31}``, amounts 0..:data:`MAX_RESOURCE_AMOUNT`.
    ``not_before`` < ``not_after``: whole POSIX seconds, the window in which
    the ticket may be redeemed.  ``issuer``: the signing certificate's subject
    (RFC 4514).  ``leaselen``: seconds of lease the node grants, 1..14 days.
    :meth:`problem` says what is wrong with a value, or None.
    """

    ticket_id: str
    slice_name: str
    node: str
    resources: Mapping[str, int]
    not_before: int
    not_after: int
    issuer: str
    leaselen: int
    _frozen_resources: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        # Keep our own sorted copy: a caller's dict changing later cannot change what was signed.
        items = tuple(sorted(dict(self.resources).items())) if isinstance(self.resources, Mapping) else ()
        object.__setattr__(self, "_frozen_resources", items)
        object.__setattr__(self, "resources", dict(items))

    def __hash__(self):
        return hash((self.ticket_id, self.slice_name, self.node, self._frozen_resources, self.not_before,
                     self.not_after, self.issuer, self.leaselen))

    def problem(self) -> str | None:
        """None if every field is valid, else a sentence naming the first invalid one."""
        if not isinstance(self.ticket_id, str) or not _TICKET_ID.match(self.ticket_id):
            return f"ticket id {str(self.ticket_id)[:60]!r} is not 1-128 letters, digits and . _ : -"
        if not isinstance(self.slice_name, str) or not _SLICE_NAME.match(self.slice_name):
            return f"slice name {str(self.slice_name)[:60]!r} is not valid"
        try:
            if not isinstance(self.node, str) or normalize_node_address(self.node) != self.node:
                return f"node {str(self.node)[:60]!r} is not a normalised node address"
        except SliceSpecError as exc:
            return str(exc)
        if not self.resources or len(self.resources) > MAX_RESOURCES:
            return f"a ticket names 1 to {MAX_RESOURCES} resources, not {len(self.resources)}"
        for name, amount in self._frozen_resources:
            if not isinstance(name, str) or not _RESOURCE_NAME.match(name):
                return f"resource name {str(name)[:40]!r} is not valid"
            if type(amount) is not int or not 0 <= amount <= MAX_RESOURCE_AMOUNT:
                return f"resource {name} amount {amount!r} is not an integer in 0..{MAX_RESOURCE_AMOUNT}"
        for what, value in (("not_before", self.not_before), ("not_after", self.not_after)):
            if type(value) is not int or not 0 <= value < 253402300800:   # year 10000
                return f"{what} {value!r} is not whole POSIX seconds before the year 10000"
        if self.not_after <= self.not_before:
            return "not_after is not after not_before"
        if not isinstance(self.issuer, str) or not self.issuer or len(self.issuer) > 1024:
            return "issuer is empty or too long"
        if type(self.leaselen) is not int or not 1 <= self.leaselen <= MAX_TICKET_LEASELEN:
            return f"leaselen {self.leaselen!r} is not 1..{MAX_TICKET_LEASELEN} seconds"
        return None


def _xsd_time(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _read_time(text: str, what: str) -> int:
    if not _TIME.match(text):
        raise TicketError(MALFORMED, f"<{what}> {text[:40]!r} is not a UTC time like 2027-01-15T08:00:00Z")
    try:
        return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        raise TicketError(MALFORMED, f"<{what}> {text!r} is not a valid date and time") from None


# ---------------------------------------------------------------------------------------- signing

def _t(name: str) -> str:
    return f"{{{TICKET_NS}}}{name}"


def _ds(name: str) -> str:
    return f"{{{DS_NS}}}{name}"


_SIGNATURE = _ds("Signature")
_PAYLOAD = ("id", "slice", "node", "resources", "leaselen", "notBefore", "notAfter", "issuer")


def _payload_xml(ticket: Ticket) -> etree._Element:
    root = etree.Element(_t("ticket"), nsmap={"t": TICKET_NS})
    root.text = "\n  "

    def add(name: str, text: str | None = None) -> etree._Element:
        element = etree.SubElement(root, _t(name))
        element.text = text
        element.tail = "\n  "
        return element

    add("id", ticket.ticket_id)
    add("slice", ticket.slice_name)
    add("node", ticket.node)
    resources = add("resources")
    for name, amount in ticket._frozen_resources:
        etree.SubElement(resources, _t("resource"), name=name).text = str(amount)
    add("leaselen", str(ticket.leaselen))
    add("notBefore", _xsd_time(ticket.not_before))
    add("notAfter", _xsd_time(ticket.not_after))
    add("issuer", ticket.issuer)
    return root


def sign_ticket(ticket: Ticket, key, cert: x509.Certificate) -> bytes:
    """The ticket as a signed XML document (bytes; store and send them unchanged).

    ``key``: RSA ≥ 2048 bits (RSA-SHA256) or EC P-256/384/521 (ECDSA with
    SHA-256/384/512); ``cert``: its certificate, whose subject must be
    ``ticket.issuer``.  Raises :class:`TicketSigningError` for an invalid
    ticket, a key not matching the certificate, or a key that cannot sign.
    """
    problem = ticket.problem()
    if problem is not None:
        raise TicketSigningError(f"cannot sign an invalid ticket: {problem}")
    try:
        method = signature_method_for(key, cert)
    except SigningError as exc:
        raise TicketSigningError(str(exc)) from None
    if ticket.issuer != subject_text(cert):
        raise TicketSigningError(f"ticket issuer {ticket.issuer!r} is not the certificate's subject "
                                 f"{subject_text(cert)!r}")

    root = _payload_xml(ticket)
    root[-1].tail = "\n"
    certificate = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")
    signature = etree.fromstring(
        f'<ds:Signature xmlns:ds="{DS_NS}"><ds:SignedInfo>'
        f'<ds:CanonicalizationMethod Algorithm="{EXC_C14N}"/><ds:SignatureMethod Algorithm="{method}"/>'
        f'<ds:Reference URI=""><ds:Transforms><ds:Transform Algorithm="{ENVELOPED_SIGNATURE}"/>'
        f'<ds:Transform Algorithm="{EXC_C14N}"/></ds:Transforms><ds:DigestMethod Algorithm="{_SHA256}"/>'
        f'<ds:DigestValue></ds:DigestValue></ds:Reference></ds:SignedInfo><ds:SignatureValue></ds:SignatureValue>'
        f'<ds:KeyInfo><ds:X509Data><ds:X509Certificate>{certificate}</ds:X509Certificate></ds:X509Data>'
        f'</ds:KeyInfo></ds:Signature>')
    signature.tail = "\n"
    root.append(signature)
    # Sign a tree parsed from the bytes we return (see the module docstring).
    root = etree.fromstring(etree.tostring(root, encoding="utf-8"), _OWN_PARSER)
    signature = root[-1]
    signed_info = signature[0]
    digest = hashlib.sha256(canonical_bytes(_without(root, signature), None)).digest()
    signed_info[2][2].text = base64.b64encode(digest).decode("ascii")
    value = sign_bytes(key, SIGNATURE_METHODS[method][2], canonical_bytes(signed_info, None))
    signature[1].text = base64.b64encode(value).decode("ascii")
    return etree.tostring(root, xml_declaration=True, encoding="utf-8")


_OWN_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, collect_ids=False)


def _without(root, signature) -> etree._Element:
    """A copy of the document ``root`` without ``signature``: the enveloped-signature transform.

    The transform removes the Signature element node only; the text after it
    (lxml's ``tail``) stays in the document, so it is moved to the preceding
    node before removal.
    """
    copy = etree.fromstring(etree.tostring(root), _OWN_PARSER)
    target = copy[root.index(signature)]   # the signature is a child of the root (vetted by both callers)
    tail = target.tail
    if tail:
        previous = target.getprevious()
        if previous is not None:
            previous.tail = (previous.tail or "") + tail
        else:
            copy.text = (copy.text or "") + tail
    copy.remove(target)
    return copy


# -------------------------------------------------------------------------------------- verifying

#: Every attribute that some XML-DSig implementation could take for an Id.
_ID_ATTRIBUTES = etree.XPath("//@*[local-name()='Id'] | //@ID | //@id | //@xml:id", smart_strings=False)
_SIGNATURES = etree.XPath("//ds:Signature", namespaces={"ds": DS_NS})


def _only(parent, tag: str, what: str, code: str = MALFORMED):
    found = parent.findall(tag)
    if len(found) != 1:
        raise TicketError(code, f"{what}: expected exactly one, found {len(found)}")
    return found[0]


def _prefix_list(method, where: str) -> list[str] | None:
    children = list(method)
    if not children:
        return None
    if len(children) != 1 or children[0].tag != f"{{{EXC_C14N}}}InclusiveNamespaces":
        raise TicketError(MALFORMED, f"{where} may hold only ec:InclusiveNamespaces")
    return (children[0].get("PrefixList") or "").split() or None


def _check_algorithm(uri: str | None, allowed: Mapping, weak: Mapping, what: str):
    if uri in allowed:
        return allowed[uri]
    if uri in weak:
        raise TicketError(WEAK_ALGORITHM, f"{what} {weak[uri]} is weak; SHA-256 or better is required")
    raise TicketError(UNSUPPORTED_ALGORITHM, f"{what} {str(uri)[:100]!r} is not supported")


def _b64(element, what: str) -> bytes:
    text = "".join((element.text or "").split()) if element is not None else ""
    try:
        return binascii.a2b_base64(text, strict_mode=True) if text else b""
    except (binascii.Error, ValueError):
        raise TicketError(MALFORMED, f"{what} is not valid base64") from None


def verify_ticket(data: bytes, trust, *, now: float, node: str | None = None,
                  purpose: Purpose = Purpose.SERVER, issuers: Collection[str] | None = None,
                  max_skew: float = DEFAULT_MAX_SKEW) -> Ticket:
    """Check a signed ticket (the bytes as received) and return what it promises.

    ``trust``: a ``TrustStore`` (or ``PinnedCertificates``) for agent
    certificates; ``now``: POSIX seconds; ``node``: when given, the node
    verifying (any form :func:`normalize_node_address` accepts) — the ticket
    must name it; ``purpose``: the extended key usage the agent's certificate
    must have; ``issuers``: when given, the accepted certificate subjects
    (RFC 4514, e.g. ``"CN=agent,OU=service"``).  Raises :class:`TicketError`;
    see the module docstring for the order of checks.
    """
    # -- 1. parse ----------------------------------------------------------------------------------
    root = _parse_ticket_root(data)

    # -- 2. signature structure: nothing a wrapping attack needs ------------------------------------
    signatures = _SIGNATURES(root)
    if not signatures:
        raise TicketError(MALFORMED, "the ticket is not signed: no ds:Signature")
    if len(signatures) > 1:
        raise TicketError(WRAPPING, f"the ticket holds {len(signatures)} ds:Signature elements; exactly one "
                                    "is allowed")
    signature = signatures[0]
    if signature.getparent() is not root:
        raise TicketError(WRAPPING, "ds:Signature is not a child of t:ticket (an enveloped signature over "
                                    "the whole ticket is required)")
    ids = _ID_ATTRIBUTES(root)
    if ids:
        values = [str(value) for value in ids]
        duplicated = sorted({value for value in values if values.count(value) > 1})
        detail = f"duplicate Id {duplicated[0][:60]!r}" if duplicated else f"Id attribute {values[0][:60]!r}"
        raise TicketError(WRAPPING, f"the ticket carries an {detail}; tickets are signed whole (URI=\"\") and "
                                    "carry no Ids, which is what signature wrapping redirects")
    parts = [etree.QName(child).localname if etree.QName(child).namespace == DS_NS else child.tag
             for child in signature]
    if parts != ["SignedInfo", "SignatureValue", "KeyInfo"]:
        raise TicketError(MALFORMED, "ds:Signature must hold ds:SignedInfo, ds:SignatureValue and ds:KeyInfo, "
                                     f"in this order (found: {', '.join(str(p)[:60] for p in parts[:6])})")
    signed_info = signature[0]
    references = signed_info.findall(_ds("Reference"))
    if len(references) != 1:
        raise TicketError(WRAPPING, f"ds:SignedInfo has {len(references)} references; exactly one, URI=\"\" "
                                    "(the whole ticket), is required")
    reference = references[0]
    if reference.get("URI") != "":
        raise TicketError(WRAPPING, f"the signature references {str(reference.get('URI'))[:100]!r}, not the whole "
                                    "ticket (URI=\"\")")

    # -- 3. algorithms ---------------------------------------------------------------------------------
    c14n = _only(signed_info, _ds("CanonicalizationMethod"), "ds:CanonicalizationMethod")
    if c14n.get("Algorithm") != EXC_C14N:
        raise TicketError(UNSUPPORTED_ALGORITHM, f"canonicalization {str(c14n.get('Algorithm'))[:100]!r} is not "
                                                 "supported; exclusive C14N is required")
    signed_info_prefixes = _prefix_list(c14n, "ds:CanonicalizationMethod")
    method_element = _only(signed_info, _ds("SignatureMethod"), "ds:SignatureMethod")
    method = _check_algorithm(method_element.get("Algorithm"), SIGNATURE_METHODS, WEAK_SIGNATURE_METHODS,
                              "signature method")
    transforms_element = reference.find(_ds("Transforms"))
    transforms = list(transforms_element) if transforms_element is not None else []
    if [t.get("Algorithm") for t in transforms] != [ENVELOPED_SIGNATURE, EXC_C14N] or \
            any(t.tag != _ds("Transform") for t in transforms):
        shown = ", ".join(str(t.get("Algorithm"))[:80] for t in transforms) or "none"
        raise TicketError(UNSUPPORTED_ALGORITHM, f"the reference's transforms must be enveloped-signature then "
                                                 f"exclusive C14N (found: {shown})")
    if len(transforms[0]):
        raise TicketError(MALFORMED, "the enveloped-signature transform takes no content")
    reference_prefixes = _prefix_list(transforms[1], "the exclusive C14N transform")
    digest_method = _only(reference, _ds("DigestMethod"), "ds:DigestMethod")
    digest_name = _check_algorithm(digest_method.get("Algorithm"), DIGEST_METHODS, WEAK_DIGEST_METHODS,
                                   "digest method")

    # -- 4. the certificate ------------------------------------------------------------------------------
    key_info = signature[2]
    certificates = key_info.findall(f"{_ds('X509Data')}/{_ds('X509Certificate')}")
    if len(certificates) != 1:
        raise TicketError(UNTRUSTED_ISSUER, f"ds:KeyInfo must carry exactly one ds:X509Data/ds:X509Certificate "
                                            f"(found {len(certificates)})")
    text = "".join((certificates[0].text or "").split())
    if len(text) > MAX_CERTIFICATE_CHARS:
        raise TicketError(MALFORMED, f"ds:X509Certificate is {len(text)} characters, over the limit of "
                                     f"{MAX_CERTIFICATE_CHARS}")
    try:
        certificate, subject, public_key = read_certificate(_b64(certificates[0], "ds:X509Certificate"))
    except ValueError as exc:
        raise TicketError(MALFORMED, f"ds:X509Certificate is not an X.509 certificate: {exc}") from None
    except UnsupportedAlgorithm as exc:
        raise TicketError(UNSUPPORTED_ALGORITHM, f"the certificate's key type is not supported: {exc}") from None
    kind, size = key_kind(public_key)
    if kind != method[1]:
        raise TicketError(UNSUPPORTED_ALGORITHM, f"signature method {method[0]} does not fit the certificate's "
                                                 f"{kind} key")
    if kind == "rsa" and size < MIN_RSA_KEY_BITS:
        raise TicketError(WEAK_ALGORITHM, f"weak RSA key of {size} bits (at least {MIN_RSA_KEY_BITS})")
    try:
        trust.validate(certificate, purpose, at=now)
    except CertificateError as exc:
        raise TicketError(UNTRUSTED_ISSUER, str(exc)) from None
    if issuers is not None and subject not in issuers:
        raise TicketError(UNTRUSTED_ISSUER, f"{subject} is not an accepted ticket issuer")

    # -- 5. signature value, then the digest over the document without the signature ---------------------
    try:
        value = _b64(signature[1], "ds:SignatureValue")
        canonical_signed_info = canonical_bytes(signed_info, signed_info_prefixes)
        if not signature_verifies(public_key, method[2], canonical_signed_info, value):
            raise TicketError(BAD_SIGNATURE, "the signature value does not verify with the certificate's key "
                                             "(ds:SignedInfo was changed, or another key signed it)")
        expected = _b64(reference.find(_ds("DigestValue")), "ds:DigestValue")
        actual = hashlib.new(digest_name, canonical_bytes(_without(root, signature), reference_prefixes)).digest()
    except etree.C14NError:
        raise TicketError(MALFORMED, "the ticket cannot be canonicalised (a relative namespace URI?)") from None
    if actual != expected:
        raise TicketError(BAD_SIGNATURE, "the ticket's digest does not match: it was changed after signing")

    # -- 6. payload ----------------------------------------------------------------------------------------
    ticket = _read_payload(root, signature)
    if ticket.issuer != subject:
        raise TicketError(UNTRUSTED_ISSUER, f"the ticket names issuer {ticket.issuer[:100]!r} but was signed by "
                                            f"{subject}")

    # -- 7. term ----------------------------------------------------------------------------------------
    if now + max_skew < ticket.not_before:
        raise TicketError(NOT_YET_VALID, f"ticket {ticket.ticket_id} is not valid before "
                                         f"{_xsd_time(ticket.not_before)} (now {_xsd_time(int(now))}, clock skew "
                                         f"allowed {max_skew:g} s)")
    if now - max_skew > ticket.not_after:
        raise TicketError(EXPIRED, f"ticket {ticket.ticket_id} expired at {_xsd_time(ticket.not_after)} "
                                   f"(now {_xsd_time(int(now))}, clock skew allowed {max_skew:g} s)")

    # -- 8. node ----------------------------------------------------------------------------------------
    if node is not None:
        try:
            here = normalize_node_address(node)
        except SliceSpecError:
            here = node
        if here != ticket.node:
            raise TicketError(WRONG_NODE, f"ticket {ticket.ticket_id} is for node {ticket.node}, not {here}")
    return ticket


def _parse_ticket_root(data: bytes):
    """The ticket's root element, parsed safely; :class:`TicketError` ``malformed`` otherwise."""
    try:
        root = parse_xml(data, max_bytes=MAX_TICKET_BYTES, max_depth=_MAX_DEPTH, what="ticket")
    except XmlSafetyError as exc:
        raise TicketError(MALFORMED, str(exc)) from None
    except (ValueError, LookupError, etree.LxmlError) as exc:
        raise TicketError(MALFORMED, f"ticket is not readable XML: {exc}") from None
    if root.tag != _t("ticket"):
        raise TicketError(MALFORMED, f"the root element is {root.tag[:100]!r}, not {{{TICKET_NS}}}ticket")
    return root


def parse_ticket(data: bytes) -> Ticket:
    """The payload of a ticket **without checking its signature** — for display and bookkeeping only
    (``svm``'s per-slice directory); anything that grants resources must call :func:`verify_ticket`."""
    root = _parse_ticket_root(data)
    return _read_payload(root, root.find(_SIGNATURE))


def _read_payload(root, signature) -> Ticket:
    if root.attrib:
        raise TicketError(MALFORMED, "t:ticket takes no attributes")
    if (root.text or "").strip():
        raise TicketError(MALFORMED, "t:ticket holds text outside its elements")
    children = [child for child in root if child is not signature]
    tags = [child.tag for child in children]
    expected = [_t(name) for name in _PAYLOAD]
    if tags != expected:
        raise TicketError(MALFORMED, "t:ticket must hold exactly " + ", ".join(f"t:{n}" for n in _PAYLOAD)
                                     + " in this order, and the signature")
    values: dict[str, str] = {}
    for name, child in zip(_PAYLOAD, children):
        if child.attrib or (child.tail or "").strip() or (name != "resources" and len(child)):
            raise TicketError(MALFORMED, f"t:{name} must hold text only, with no attributes")
        values[name] = (child.text or "").strip()
    if (signature is not None and (signature.tail or "").strip()):
        raise TicketError(MALFORMED, "t:ticket holds text outside its elements")
    resources: dict[str, int] = {}
    resources_element = children[_PAYLOAD.index("resources")]
    if values["resources"]:
        raise TicketError(MALFORMED, "t:resources holds text; it takes t:resource elements")
    for element in resources_element:
        name = element.get("name")
        amount = (element.text or "").strip()
        if element.tag != _t("resource") or len(element) or set(element.attrib) != {"name"} or \
                (element.tail or "").strip():
            raise TicketError(MALFORMED, "t:resources may hold only <t:resource name=\"…\">amount</t:resource>")
        if name in resources:
            raise TicketError(MALFORMED, f"resource {name[:40]!r} appears twice")
        if not _INT.match(amount):
            raise TicketError(MALFORMED, f"resource {name[:40]!r} amount {amount[:20]!r} is not a whole number")
        resources[name] = int(amount)
    for name in ("leaselen",):
        if not _INT.match(values[name]):
            raise TicketError(MALFORMED, f"t:{name} {values[name][:20]!r} is not a whole number")
    ticket = Ticket(values["id"], values["slice"], values["node"], resources,
                    _read_time(values["notBefore"], "t:notBefore"), _read_time(values["notAfter"], "t:notAfter"),
                    values["issuer"], int(values["leaselen"]))
    problem = ticket.problem()
    if problem is not None:
        raise TicketError(MALFORMED, problem)
    return ticket

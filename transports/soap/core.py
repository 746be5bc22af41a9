"""The SOAP core: one server pipeline, bytes in and bytes out, shared by every SOAP transport.

:class:`SoapCore` turns the bytes of a request envelope into a
:class:`SoapResponse` (the bytes of the reply or of a fault).  It knows no
sockets: the HTTP resource (``dsmt.transports.http``) and SOAP-over-PsEPR feed
it bytes and send back what it returns.  Inside, it drives spyne's
transport-agnostic ``ServerBase`` pipeline (``generate_contexts`` →
``get_in_object`` → ``get_out_object`` → ``get_out_string``) on one spyne
``Application`` of its own — spyne keeps the WSDL transport URI on the
``Application``, so each transport needs its own core, built from the same
service classes.  ``spyne.server.twisted`` is not used (on Twisted 26 it does
not import, answers every POST with 405 and fails on ``?wsdl``) and neither is
WSGI (a method returning a Deferred silently gets an empty reply there).

Pipeline, in order; each step either passes or answers a fault:

1. **Size**: an envelope over ``limits.max_envelope_bytes`` is answered with a
   fault (``EnvelopeTooLarge``), never truncated.
2. **Safe XML**: parsed by :func:`dsmt.transports.xmlsafe.parse_xml` (no DTD,
   no entities, no network, at most ``limits.max_depth`` levels).  spyne never
   parses bytes: it is handed this tree, so hostile XML never reaches its
   parser.  A transport that parsed the envelope already (SOAP over PsEPR)
   hands its tree in (``process(parsed=…)``) and it is not parsed twice; the
   depth limit is checked on the tree either way.  A ``charset`` in the content type must agree with the document's
   own encoding (spyne would raise ``UnicodeDecodeError`` on a disagreement;
   here it is a ``CharsetMismatch`` fault).
3. **Envelope**: the root must be this core's SOAP version's ``Envelope``
   (the other version's is ``VersionMismatch``, anything else ``NotSOAP``),
   holding an optional ``Header`` and a ``Body`` with exactly one element.
4. **WS-Addressing** headers are read (``addressing.read_headers``); from here
   on every reply, fault or not, carries the reply headers (``RelatesTo`` =
   the request's ``MessageID``) when the request had WS-Addressing headers —
   and so do refusals at steps 2–3 once the tree exists (too deep,
   VersionMismatch, …), their headers read leniently.
5. **mustUnderstand**: a header block aimed at this node (no role, *next* or
   *ultimateReceiver*) with ``mustUnderstand`` true that nobody here
   processes is a ``MustUnderstand`` fault — so a signed request sent to a
   service without the WS-Security filter is refused, not silently run.
6. **Inbound filters** (:class:`EnvelopeFilter`, e.g. WS-Security) see the
   exact bytes and may refuse them or put the caller's identity in
   ``context.caller``.
7. **Operation**: the Body's element must name an operation
   (``UnknownOperation``), the request's ``wsa:Action``, when present, must be
   that operation's (``wsa:ActionNotSupported``), and the Body must be valid against the service's schema
   (``InvalidBody``; lxml's XML Schema validator, see below).
8. **Call**: operations made of text, integers, booleans, binary and complex
   types of them are read and answered by a codec compiled when the core is
   built (:mod:`dsmt.transports.soap.fastpath`, a fraction of spyne's cost per
   call; the reply's WS-Addressing headers written in place); the others go
   through spyne's pipeline.  Either way the service method may return a
   value, a Deferred or a coroutine (``async def``).  A spyne ``Fault`` it raises is answered as that fault; any
   other exception is logged with its traceback and answered as
   ``Receiver``/``InternalError`` without any detail.
9. **Outbound filters** run in reverse order on the reply bytes (signing).

Faults.  :class:`SoapFault` is the one fault type: the code (SOAP 1.2 names:
``Sender``, ``Receiver``, ``VersionMismatch``, ``MustUnderstand``), subcodes as
qualified names, a reason, an optional detail element.  SOAP 1.2 writes it as
``Code/Value`` + nested ``Subcode/Value`` QNames; SOAP 1.1 as a dotted
``faultcode`` (``soap:Client.BadXML``, ``Sender``→``Client``,
``Receiver``→``Server``), the convention of SOAP 1.1 §4.4.1.  Faults of the
core have subcodes in :data:`DSMT_FAULT_NS`; faults raised by a service method
have them in the service's target namespace (``Client.QuotaExceeded`` →
``Sender`` / ``tns:QuotaExceeded``), and a fault class the method declares in
``_throws`` is also written as its schema element in the detail, as the WSDL
says.  spyne's own fault writer is not used: for SOAP 1.2 it writes unqualified
subcodes and an empty ``Role``, refuses codes not starting with Client/Server,
and crashes writing its own schema-validation faults.

=======================  ========  =====================================================
subcode (DSMT_FAULT_NS)  code      when
=======================  ========  =====================================================
EnvelopeTooLarge         Sender    over ``max_envelope_bytes``
BadXML                   Sender    not well-formed, a DOCTYPE (DTD/entities), too deep
CharsetMismatch          Sender    content-type charset ≠ the document's encoding
NotSOAP                  Sender    the root is not a SOAP Envelope
BadEnvelope              Sender    no Body, elements out of place, Body not one element
UnknownOperation         Sender    the Body's element is no operation of this service
InvalidBody              Sender    the Body does not match the operation's schema
InternalError            Receiver  the service (or a filter) failed unexpectedly
=======================  ========  =====================================================

plus ``VersionMismatch`` (answered in a SOAP 1.1 envelope, as SOAP 1.2
Appendix A asks, with an ``Upgrade`` header when this core speaks 1.2),
``MustUnderstand``, and WS-Addressing's ``wsa:InvalidAddressingHeader``
(subcodes ``wsa:InvalidCardinality``, ``wsa:MissingAddressInEPR``).

Validator choice: lxml's XML Schema validation (against the schema spyne
derives from the service, the one the WSDL publishes), run by the core itself.
spyne's ``soft`` validator only checks what its deserialiser meets and words
errors vaguely ("'n' member does not respect frequency constraints"); the
schema names the element and the rule ("Element '{urn:x}n': 'abc' is not a
valid value of the atomic type 'xs:integer'.") and checks exactly the
published contract, for a few microseconds per message.

WS-Addressing Actions: the WSDL this core serves carries explicit
``wsam:Action`` attributes on every input, output and fault message, so zeep
clients send ``Action``/``MessageID``/``To`` by themselves.  By default they
follow the WS-Addressing Metadata default action pattern (§4.4.4); a service
whose specification fixes other URIs (WS-ResourceProperties' ``rpw-2``
actions, say) declares them per operation with ``SoapCore(…, actions={name:
OperationActions(input=…, output=…, faults={…})})``.  A reply's Action is the
operation's output action; a fault's is the action declared for the raised
fault class (by its type name, declared in ``_throws`` or not), else
``addressing.FAULT_ACTION``.  **Request Actions are checked** (WS-Addressing
SOAP Binding §6.4.4): a request whose ``wsa:Action`` is not the input action of
the operation its Body names gets a Sender fault ``wsa:ActionNotSupported``
(detail ``wsa:ProblemAction``) — a client that believes it calls another
operation than the one its Body names is told so rather than answered.  The
check is lenient: a request without ``wsa:Action`` (or without WS-Addressing)
is dispatched on its Body as before; ``check_actions=False`` turns it off.
spyne routes on the Body's first child; operations with an empty Body
(WS-Transfer Get) are not dispatchable by this core as it stands.

Correlated refusals: once the envelope is parsed, a refusal of the whole
envelope — ``VersionMismatch``, too deep (``BadXML``), ``CharsetMismatch``,
``BadEnvelope`` — still carries the reply headers (``RelatesTo``) when the
request's WS-Addressing headers can be read (leniently: unreadable ones are
ignored there), so callers on every transport can correlate it.
"""
from __future__ import annotations

import codecs
import copy
import functools
from inspect import iscoroutine
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Protocol, Sequence

from lxml import etree
from spyne import BODY_STYLE_WRAPPED, Application, MethodContext
from spyne.interface.wsdl import Wsdl11
from spyne.interface.xml_schema import XmlSchema
from spyne.model.fault import Fault
from spyne.protocol.soap import Soap11, Soap12
from spyne.server._base import ServerBase
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.logger import Logger

from dsmt.transports.soap import HTTP_TRANSPORT, PSEPR_TRANSPORT, addressing
from dsmt.transports.soap.fastpath import FastMethodContext, OperationCodec, UnreadableValue, compile_operation
from dsmt.transports.xmlsafe import DEFAULT_MAX_DEPTH, XmlSafetyError, check_depth, parse_xml

__all__ = [
    "HTTP_TRANSPORT", "PSEPR_TRANSPORT", "DSMT_FAULT_NS", "WSAM_NS", "MAX_ENVELOPE_BYTES", "MAX_ENVELOPE_DEPTH",
    "SoapVersion", "SOAP11", "SOAP12", "SoapFault", "SoapLimits", "SoapResponse", "CallContext", "EnvelopeFilter",
    "OperationActions", "SoapCore", "envelope_too_large", "action_not_supported",
]

log = Logger(namespace="dsmt.soap.core")

#: Namespace of the subcodes of the faults the core itself raises.
DSMT_FAULT_NS = "http://dsmt.org/ns/soap/fault"
#: WS-Addressing 1.0 Metadata: ``wsam:Action`` on WSDL input/output/fault messages.
WSAM_NS = "http://www.w3.org/2007/05/addressing/metadata"

#: Largest request envelope accepted.  The biggest messages planned are slice
#: specifications and deployment descriptors for a few hundred nodes (hundreds
#: of KB, signed); 1 MiB leaves room and is PsEPR's event size, so an envelope
#: accepted over HTTP could also travel as an event (less its wrapper).
MAX_ENVELOPE_BYTES = 1024 * 1024
#: Deepest nesting accepted: a WS-Security-signed envelope is about 12 levels
#: deep and service types add a few; 32 keeps every tree walk short.
MAX_ENVELOPE_DEPTH = DEFAULT_MAX_DEPTH
#: How many WSDL documents (one per public address) a core keeps.  A service
#: has one or two addresses; when the address comes from a request's Host
#: header, the bound keeps clients sending random hosts from growing memory.
WSDL_CACHE_SIZE = 8
#: Operations named in an UnknownOperation fault (the reason stays short).
MAX_LISTED_OPERATIONS = 20
#: Longest reason a fault repeats from a request's content (spyne's casting errors quote the whole value:
#: a 1 MiB envelope must not come back as a 1 MiB fault).
MAX_QUOTED_REASON_CHARS = 300

_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_WSDL = "{http://schemas.xmlsoap.org/wsdl/}"
_WSAM_ACTION = "{%s}Action" % WSAM_NS


@dataclass(frozen=True)
class SoapVersion:
    """What differs between SOAP 1.1 and 1.2 on the wire."""

    name: str
    envelope_ns: str
    content_type: str
    #: How this version spells the Sender and Receiver fault codes.
    sender: str
    receiver: str
    #: The attribute naming the node a header block is meant for (absent: the ultimate receiver, which a
    #: service is), and the roles a service plays besides.
    role_attribute: str
    roles: frozenset[str]


_SOAP12_ROLE = "http://www.w3.org/2003/05/soap-envelope/role/"
SOAP11 = SoapVersion("1.1", "http://schemas.xmlsoap.org/soap/envelope/", "text/xml; charset=utf-8",
                     "Client", "Server", "actor", frozenset({"http://schemas.xmlsoap.org/soap/actor/next"}))
SOAP12 = SoapVersion("1.2", "http://www.w3.org/2003/05/soap-envelope", "application/soap+xml; charset=utf-8",
                     "Sender", "Receiver", "role",
                     frozenset({_SOAP12_ROLE + "next", _SOAP12_ROLE + "ultimateReceiver"}))
_VERSIONS = {version.envelope_ns: version for version in (SOAP11, SOAP12)}


class SoapFault(Exception):
    """A SOAP fault, written in either SOAP version by :meth:`to_envelope`.

    ``code`` is one of the SOAP 1.2 code names below; ``subcodes`` are
    qualified names in Clark notation (``{namespace}local``), outermost first;
    ``detail`` an element written inside ``detail``/``Detail``; ``headers``
    header blocks sent with the fault; ``action`` the WS-Addressing Action of
    the fault message (default :data:`addressing.FAULT_ACTION`).  The WS-*
    specifications give SOAP 1.1 faults a ``faultcode`` of their own (e.g.
    ``wsse:InvalidSecurity``): ``soap11_faultcode`` (Clark notation) replaces
    the dotted code in SOAP 1.1 when set.
    """

    SENDER = "Sender"
    RECEIVER = "Receiver"
    VERSION_MISMATCH = "VersionMismatch"
    MUST_UNDERSTAND = "MustUnderstand"

    def __init__(self, code: str, reason: str, *, subcodes: Sequence[str] = (), detail: etree._Element | None = None,
                 headers: Sequence[etree._Element] = (), action: str | None = None,
                 soap11_faultcode: str | None = None):
        if code not in (self.SENDER, self.RECEIVER, self.VERSION_MISMATCH, self.MUST_UNDERSTAND):
            raise ValueError(f"not a SOAP fault code: {code!r}")
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.subcodes = tuple(etree.QName(subcode) for subcode in subcodes)
        if any(subcode.namespace is None for subcode in self.subcodes):
            raise ValueError("fault subcodes must be qualified names ({namespace}local)")
        self.detail = detail
        self.headers = tuple(headers)
        self.action = action
        self.soap11_faultcode = None if soap11_faultcode is None else etree.QName(soap11_faultcode)

    @classmethod
    def sender(cls, subcode: str, reason: str, **options) -> SoapFault:
        """A Sender (SOAP 1.1: Client) fault of the core, subcode ``subcode`` in :data:`DSMT_FAULT_NS`."""
        return cls(cls.SENDER, reason, subcodes=(f"{{{DSMT_FAULT_NS}}}{subcode}",), **options)

    @classmethod
    def receiver(cls, subcode: str, reason: str, **options) -> SoapFault:
        """A Receiver (SOAP 1.1: Server) fault of the core, subcode ``subcode`` in :data:`DSMT_FAULT_NS`."""
        return cls(cls.RECEIVER, reason, subcodes=(f"{{{DSMT_FAULT_NS}}}{subcode}",), **options)

    def __repr__(self):
        codes = "/".join([self.code] + [subcode.localname for subcode in self.subcodes])
        return f"SoapFault({codes}: {self.reason!r})"

    def to_envelope(self, version: SoapVersion) -> bytes:
        """This fault as a complete UTF-8 envelope of ``version``."""
        env = version.envelope_ns
        envelope = etree.Element(f"{{{env}}}Envelope", nsmap={"soap": env})
        if self.headers:
            etree.SubElement(envelope, f"{{{env}}}Header").extend(copy.deepcopy(block) for block in self.headers)
        fault = etree.SubElement(etree.SubElement(envelope, f"{{{env}}}Body"), f"{{{env}}}Fault")
        if version is SOAP11:
            self._write_soap11(fault)
        else:
            self._write_soap12(fault, env)
        return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")

    def _write_soap11(self, fault: etree._Element) -> None:
        if self.soap11_faultcode is not None:
            _qname_text(fault, "faultcode", self.soap11_faultcode)
        else:
            code = {self.SENDER: SOAP11.sender, self.RECEIVER: SOAP11.receiver}.get(self.code, self.code)
            etree.SubElement(fault, "faultcode").text = "soap:" + ".".join(
                [code] + [subcode.localname for subcode in self.subcodes])
        etree.SubElement(fault, "faultstring").text = self.reason
        if self.detail is not None:
            etree.SubElement(fault, "detail").append(copy.deepcopy(self.detail))

    def _write_soap12(self, fault: etree._Element, env: str) -> None:
        parent = etree.SubElement(fault, f"{{{env}}}Code")
        etree.SubElement(parent, f"{{{env}}}Value").text = "soap:" + self.code
        for subcode in self.subcodes:
            parent = etree.SubElement(parent, f"{{{env}}}Subcode")
            _qname_text(parent, f"{{{env}}}Value", subcode)
        reason = etree.SubElement(etree.SubElement(fault, f"{{{env}}}Reason"), f"{{{env}}}Text")
        reason.set(_XML_LANG, "en")
        reason.text = self.reason
        if self.detail is not None:
            etree.SubElement(fault, f"{{{env}}}Detail").append(copy.deepcopy(self.detail))


def _qname_text(parent: etree._Element, tag: str, qname: etree.QName) -> None:
    """Add ``tag`` whose text is ``qname``, declaring its prefix on the element itself."""
    etree.SubElement(parent, tag, nsmap={"c": qname.namespace}).text = "c:" + qname.localname


def envelope_too_large(limit: int, size: int | None = None) -> SoapFault:
    """The fault for an envelope over ``limit`` bytes (``size`` when known, else "more than")."""
    amount = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return SoapFault.sender("EnvelopeTooLarge", f"SOAP envelope is {amount}, over the limit of {limit} bytes")


def _brief(reason: str) -> str:
    """``reason`` cut to :data:`MAX_QUOTED_REASON_CHARS` characters, saying so when cut."""
    if len(reason) <= MAX_QUOTED_REASON_CHARS:
        return reason
    return reason[:MAX_QUOTED_REASON_CHARS] + f"… ({len(reason)} characters in all)"


def _internal_error() -> SoapFault:
    return SoapFault.receiver("InternalError", "internal error; the service logged the details")


def action_not_supported(action: str, operation: str, expected: str | None) -> SoapFault:
    """WS-Addressing's ``ActionNotSupported`` (SOAP Binding §6.4.4): Sender, subcode
    ``wsa:ActionNotSupported``, detail ``wsa:ProblemAction/wsa:Action`` naming the Action received."""
    wsa = "{%s}" % addressing.WSA_NS
    detail = etree.Element(wsa + "ProblemAction", nsmap={"wsa": addressing.WSA_NS})
    etree.SubElement(detail, wsa + "Action").text = action
    return SoapFault(SoapFault.SENDER, f"the Action {action!r} cannot be processed here: the Body names operation "
                                       f"{operation}, whose Action is {expected!r}",
                     subcodes=(wsa + "ActionNotSupported",), detail=detail,
                     soap11_faultcode=wsa + "ActionNotSupported")


@dataclass(frozen=True)
class SoapLimits:
    """Per-core limits; the defaults' reasons are at :data:`MAX_ENVELOPE_BYTES` and :data:`MAX_ENVELOPE_DEPTH`."""

    max_envelope_bytes: int = MAX_ENVELOPE_BYTES
    max_depth: int = MAX_ENVELOPE_DEPTH


@dataclass(frozen=True)
class SoapResponse:
    """What to send back: the envelope's bytes, its SOAP version, and the fault when it is one."""

    body: bytes
    version: SoapVersion
    fault: SoapFault | None = None

    @property
    def content_type(self) -> str:
        return self.version.content_type

    @property
    def is_fault(self) -> bool:
        return self.fault is not None


@dataclass(eq=False)
class CallContext:
    """One request's context, shared by the filters and the service method (spyne's ``ctx.udc``).

    ``transport`` is the core's transport URI; ``peer`` what the transport
    says about the sender (an ``IAddress`` for HTTP); ``envelope`` the request
    parsed safely from exactly the bytes the current filter receives;
    ``addressing`` its WS-Addressing headers (None without any); ``caller`` the
    authenticated identity, set by an inbound filter (None: anonymous);
    ``fault`` the fault being answered, for outbound filters.
    """

    transport: str
    version: SoapVersion
    peer: object = None
    envelope: etree._Element | None = None
    addressing: addressing.AddressingHeaders | None = None
    caller: object = None
    fault: SoapFault | None = None


class EnvelopeFilter(Protocol):
    """A stage around the service call that works on an envelope's bytes (WS-Security is one).

    ``inbound`` gets the request's exact bytes (a well-formed envelope of the
    core's SOAP version; ``context.envelope`` is its parsed tree — read it,
    don't change it) and returns the bytes to go on with, usually the same
    object, or raises :class:`SoapFault`.  It may set ``context.caller``.
    ``outbound`` gets the reply's final bytes (WS-Addressing headers already
    in) and returns the bytes to send, e.g. signed.  A filter's ``outbound``
    runs for every request its ``inbound`` was called for, faults included
    (``context.fault`` says which); filters run in order inbound and in
    reverse order outbound.  Filters run on the reactor thread and must be
    quick.  ``understood_headers`` (Clark names) are the header blocks the
    filter processes: they pass the mustUnderstand check.  Any other exception
    from a filter is logged and answered as an InternalError fault (an
    outbound failure's fault is sent unfiltered).
    """

    understood_headers: frozenset[str]

    def inbound(self, envelope: bytes, context: CallContext) -> bytes: ...

    def outbound(self, envelope: bytes, context: CallContext) -> bytes: ...


# ------------------------------------------------------------------ spyne glue

class _PreParsed:
    """Mixin for spyne's SOAP protocols: take the envelope the core parsed safely and checked, instead of
    parsing bytes and searching the tree again.  The core sets ``ctx.in_header_doc`` (the Header's
    children, or None) and ``ctx.in_body_doc`` (the Body's element) before ``generate_contexts``."""

    def create_in_document(self, ctx, charset=None):
        ctx.in_document = ctx.udc.envelope

    def decompose_incoming_envelope(self, ctx, message=None):
        ctx.method_request_string = ctx.in_body_doc.tag


class _Soap11In(_PreParsed, Soap11):
    pass


class _Soap12In(_PreParsed, Soap12):
    pass


_PROTOCOLS = {SOAP11: (_Soap11In, Soap11), SOAP12: (_Soap12In, Soap12)}


# spyne keeps a process-wide registry of applications by (tns, name) for its NullServer, which dsmt does
# not use, and warns "Overwriting application" whenever a second one of the same name is built.  dsmt builds
# one per transport, SOAP version and hosted instance by design (a node-manager farm: hundreds), so the
# warning says nothing here; errors from that module still show.
logging.getLogger("spyne.util.appreg").setLevel(logging.ERROR)


class _Application(Application):
    """spyne's Application whose method calls always give a Deferred, so that values, Deferreds and
    coroutines are awaited alike and every exception reaches the core (spyne would turn a synchronous
    one into its own 'Internal Error' fault)."""

    def call_wrapper(self, ctx):
        return defer.maybeDeferred(super().call_wrapper, ctx)


class _Server(ServerBase):
    """spyne's transport-agnostic pipeline; ``transport`` is the URI the WSDL binding names."""

    def __init__(self, app: Application, transport_uri: str):
        self.transport = transport_uri
        super().__init__(app)


@dataclass(frozen=True)
class OperationActions:
    """The WS-Addressing Actions a service declares for one operation (``SoapCore(actions=…)``).

    ``input`` and ``output`` replace the default-pattern actions of the request and the reply;
    ``faults`` maps a fault class's type name (spyne ``get_type_name()``) to the Action of that fault's
    message — written on the operation's ``wsdl:fault`` when the operation declares the class in
    ``_throws``, and used for the reply whenever the method raises it.  ``None``: the default."""

    input: str | None = None
    output: str | None = None
    faults: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Actions:
    """The WS-Addressing Actions of one operation's messages, as its WSDL declares them (``faults``: also
    the declared actions of fault classes the WSDL does not list)."""

    input: str | None
    output: str | None
    faults: dict[str, str] = field(default_factory=dict)


def _annotate_actions(definitions: etree._Element,
                      declared: Mapping[str, OperationActions] | None = None) -> dict[str, _Actions]:
    """Give every portType message an explicit ``wsam:Action`` — the one ``declared`` for its operation,
    else the default action pattern (WS-Addressing Metadata §4.4.4) — and return the actions by operation
    name."""
    declared = declared or {}
    tns = definitions.get("targetNamespace")
    delimiter = ":" if tns.startswith("urn:") else "/"
    base = tns if tns.endswith(delimiter) else tns + delimiter
    actions = {}
    for port_type in definitions.iter(_WSDL + "portType"):
        for operation in port_type.iter(_WSDL + "operation"):
            name = operation.get("name")
            ours = declared.get(name, OperationActions())

            def declare(message: etree._Element, explicit: str | None, *parts: str) -> str:
                action = explicit or message.get(_WSAM_ACTION) or base + delimiter.join(
                    (port_type.get("name"),) + parts)
                message.set(_WSAM_ACTION, action)
                return action

            request = operation.find(_WSDL + "input")
            reply = operation.find(_WSDL + "output")
            faults = dict(ours.faults)
            faults.update({fault.get("name"): declare(fault, ours.faults.get(fault.get("name")), name, "Fault",
                                                      fault.get("name"))
                           for fault in operation.iter(_WSDL + "fault")})
            actions[name] = _Actions(
                input=declare(request, ours.input, request.get("name")),
                output=None if reply is None else declare(reply, ours.output, reply.get("name")),
                faults=faults)
    return actions


def _returns_one(descriptor) -> bool:
    """Whether spyne keeps this method's return value wrapped in a one-element list (see
    ``Application.process_request``) rather than as the sequence of its several results."""
    return descriptor.body_style is not BODY_STYLE_WRAPPED or len(descriptor.out_message._type_info) <= 1


@functools.lru_cache(maxsize=64)
def _charset(content_type: str | None) -> str | None:
    """The ``charset`` parameter of a media type (cached: a transport sends the same few content types)."""
    for parameter in (content_type or "").split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"') or None
    return None


@functools.lru_cache(maxsize=64)
def _same_encoding(a: str, b: str) -> bool:
    """Whether two encoding names mean the same codec (cached for the same reason as :func:`_charset`; the
    cache is bounded because both names come from requests)."""
    try:
        return codecs.lookup(a).name == codecs.lookup(b).name
    except LookupError:
        return False


class _Refused(Exception):
    """A request refused as a whole once parsed (``fault``), with its WS-Addressing headers when they could
    be read (``request``), so the refusal is correlated."""

    def __init__(self, fault: SoapFault, request: addressing.AddressingHeaders | None):
        super().__init__(fault.reason)
        self.fault, self.request = fault, request


def _lenient_addressing(root: etree._Element) -> addressing.AddressingHeaders | None:
    """The WS-Addressing headers of a parsed envelope of either SOAP version, or None when it is no SOAP
    envelope or its headers are unusable (the refusal then goes uncorrelated)."""
    name = etree.QName(root)
    if name.localname != "Envelope" or name.namespace not in _VERSIONS:
        return None
    try:
        return addressing.read_headers(root)
    except addressing.AddressingError:
        return None


# ------------------------------------------------------------------ the core

class SoapCore:
    """SOAP server core for one set of spyne service classes on one transport.

    ``services`` are spyne ``ServiceBase`` classes, ``tns`` and ``name`` the
    target namespace and name of their WSDL; ``soap_version`` is
    :data:`SOAP11` or :data:`SOAP12`; ``transport_uri`` the WSDL binding's
    transport (:data:`HTTP_TRANSPORT`, :data:`PSEPR_TRANSPORT`); ``filters``
    :class:`EnvelopeFilter` objects, outermost first; ``actions`` the
    WS-Addressing Actions of operations that do not follow the default
    pattern (operation name → :class:`OperationActions`); ``check_actions``
    whether a request's ``wsa:Action``, when present, must be its operation's
    input action; ``fast_path`` whether operations whose types allow it run
    through compiled codecs (:mod:`dsmt.transports.soap.fastpath`) instead of
    spyne's object machinery.  Build one core per transport from the same
    service classes.  Service methods receive the :class:`CallContext` as
    ``ctx.udc`` — the one attribute of ``ctx`` dsmt promises on both paths.
    """

    def __init__(self, services: Iterable[type], tns: str, name: str, *, soap_version: SoapVersion = SOAP11,
                 transport_uri: str = HTTP_TRANSPORT, limits: SoapLimits = SoapLimits(),
                 filters: Sequence[EnvelopeFilter] = (), actions: Mapping[str, OperationActions] | None = None,
                 check_actions: bool = True, fast_path: bool = True):
        in_protocol, out_protocol = _PROTOCOLS[soap_version]
        self.version = soap_version
        self.transport_uri = transport_uri
        self.limits = limits
        self.filters = tuple(filters)
        self.application = _Application(list(services), tns, name, in_protocol=in_protocol(),
                                        out_protocol=out_protocol())
        self.application.interface.nsmap["wsam"] = WSAM_NS  # prefix of the Action annotations
        self._server = _Server(self.application, transport_uri)
        self._operations = self.application.interface.service_method_map
        self._declared_actions = dict(actions or {})
        unknown = set(self._declared_actions) - {d.operation_name for ds in self._operations.values() for d in ds}
        if unknown:
            raise ValueError(f"actions declared for operations the services do not have: {', '.join(sorted(unknown))}")
        self.check_actions = check_actions
        schema = XmlSchema(self.application.interface)
        schema.build_validation_schema()
        self._schema: etree.XMLSchema = schema.validation_schema
        self._actions = self._wsdl_tree("urn:dsmt:address-unknown")[1]
        self._understood = frozenset(
            ["{%s}%s" % (addressing.WSA_NS, local)
             for local in ("To", "Action", "MessageID", "ReplyTo", "FaultTo", "From", "RelatesTo")]
            + ["{%s}%s" % (cls.get_namespace(), cls.get_type_name())
               for descriptors in self._operations.values() for descriptor in descriptors
               for cls in descriptor.in_header or ()]
            + [name for envelope_filter in self.filters for name in envelope_filter.understood_headers])
        self._envelope_tag, self._header_tag, self._body_tag = (
            f"{{{self.version.envelope_ns}}}{local}" for local in ("Envelope", "Header", "Body"))
        self._must_understand_attribute = f"{{{self.version.envelope_ns}}}mustUnderstand"
        self._role_attribute = f"{{{self.version.envelope_ns}}}{self.version.role_attribute}"
        self._our_roles = self.version.roles | {None}  # None: a block without a role is for the ultimate receiver
        self._wsdl_cache: OrderedDict[str, bytes] = OrderedDict()
        self._codecs: dict[str, OperationCodec] = {}
        if fast_path:
            for tag, descriptors in self._operations.items():
                codec = compile_operation(self.application, descriptors[0], self.version.envelope_ns) \
                    if len(descriptors) == 1 else None
                if codec is not None:
                    self._codecs[tag] = codec

    # ------------------------------------------------------------ public

    def process(self, request: bytes, *, content_type: str | None = None, peer: object = None,
                parsed: etree._Element | None = None) -> defer.Deferred:
        """Answer one request envelope: a Deferred that always fires with a :class:`SoapResponse`.

        ``content_type`` is the request's media type if the transport has one
        (only its ``charset`` is used); ``peer`` is passed on as
        ``CallContext.peer``.  ``parsed``, when given, must be the root
        element :func:`dsmt.transports.xmlsafe.parse_xml` made of exactly
        ``request`` (any ``max_depth``: the core checks its own depth limit on
        it), for a transport that had to parse the envelope already (SOAP over
        PsEPR reads ReplyTo first): the core uses it instead of parsing again,
        and does not change it.  The Deferred never fails: every problem,
        including a bug here, is answered with a fault.
        """
        return defer.ensureDeferred(self._process(bytes(request), content_type, peer, parsed))

    def fault_response(self, fault: SoapFault, *,
                       request: addressing.AddressingHeaders | None = None) -> SoapResponse:
        """``fault`` as a response of this core's SOAP version, for a transport that refuses a request
        itself (an oversized body, a reply that cannot travel).  VersionMismatch is written in SOAP 1.1.
        With ``request`` (the request's WS-Addressing headers) the fault carries the reply headers
        (``RelatesTo``, fault Action)."""
        version = SOAP11 if fault.code == SoapFault.VERSION_MISMATCH else self.version
        body = fault.to_envelope(version)
        if request is not None:
            body = addressing.insert_headers(body, addressing.reply_headers(
                request, action=fault.action or addressing.FAULT_ACTION, fault=True))
        return SoapResponse(body, version, fault)

    def wsdl(self, address: str) -> bytes:
        """The WSDL document with ``address`` as the port's location (built once per address, cached)."""
        document = self._wsdl_cache.pop(address, None)
        if document is None:
            document = etree.tostring(self._wsdl_tree(address)[0], xml_declaration=True, encoding="UTF-8")
            if len(self._wsdl_cache) >= WSDL_CACHE_SIZE:
                self._wsdl_cache.popitem(last=False)
        self._wsdl_cache[address] = document
        return document

    # ------------------------------------------------------------ pipeline

    async def _process(self, data: bytes, content_type: str | None, peer: object,
                       parsed: etree._Element | None) -> SoapResponse:
        context = CallContext(self.transport_uri, self.version, peer)
        try:
            return await self._answer(data, content_type, context, parsed)
        except Exception:
            log.failure("the SOAP core failed on a request")
            return self.fault_response(_internal_error())

    async def _answer(self, data: bytes, content_type: str | None, context: CallContext,
                      parsed: etree._Element | None) -> SoapResponse:
        try:
            header, body = self._read(data, content_type, context, parsed)
            context.addressing = self._read_addressing(header)
        except _Refused as refused:  # no usable message, nothing for the filters; correlated when possible
            return self.fault_response(refused.fault, request=refused.request)
        except SoapFault as fault:
            return self.fault_response(fault)
        entered: list[EnvelopeFilter] = []
        try:
            self._check_must_understand(header)
            for envelope_filter in self.filters:
                entered.append(envelope_filter)
                filtered = self._inbound(envelope_filter, data, context)
                if filtered is not data:
                    try:
                        data, (header, body) = filtered, self._read(filtered, content_type, context)
                    except _Refused as refused:  # addressing was read already: the reply headers follow
                        raise refused.fault from None
            reply, action, headed = await self._call(body, context)
        except SoapFault as fault:
            context.fault = fault
            reply, action, headed = fault.to_envelope(self.version), fault.action or addressing.FAULT_ACTION, False
        if context.addressing is not None and not headed:
            reply = addressing.insert_headers(reply, addressing.reply_headers(
                context.addressing, action=action, fault=context.fault is not None))
        for envelope_filter in reversed(entered):
            try:
                reply = envelope_filter.outbound(reply, context)
            except Exception:
                log.failure("outbound filter {filter!r} failed", filter=envelope_filter)
                return self.fault_response(_internal_error())
        return SoapResponse(reply, self.version, context.fault)

    def _read(self, data: bytes, content_type: str | None, context: CallContext,
              parsed: etree._Element | None = None) -> tuple[etree._Element | None, etree._Element]:
        """Steps 1–3: size, safe parse (or the transport's ``parsed`` tree), charset, envelope structure.
        Sets ``context.envelope`` and returns its Header (None without one) and the Body's element.  A refusal once the tree exists is raised
        as :class:`_Refused`, with the request's WS-Addressing headers read leniently."""
        limit = self.limits.max_envelope_bytes
        if len(data) > limit:
            raise envelope_too_large(limit, len(data))
        if parsed is not None:
            root = parsed
        else:
            try:  # depth is checked below, on the tree, so a too-deep request's fault can be correlated
                root = parse_xml(data, max_bytes=limit, max_depth=None, what="SOAP envelope")
            except XmlSafetyError as exc:
                raise SoapFault.sender("BadXML", str(exc)) from None
        try:
            return self._check_envelope(root, content_type, context)
        except SoapFault as fault:
            raise _Refused(fault, _lenient_addressing(root)) from None

    def _check_envelope(self, root: etree._Element, content_type: str | None,
                        context: CallContext) -> tuple[etree._Element | None, etree._Element]:
        try:
            check_depth(root, self.limits.max_depth, "SOAP envelope")
        except XmlSafetyError as exc:
            raise SoapFault.sender("BadXML", str(exc)) from None
        declared = _charset(content_type)
        encoding = root.getroottree().docinfo.encoding or "UTF-8"
        if declared is not None and not _same_encoding(declared, encoding):
            raise SoapFault.sender("CharsetMismatch",
                                   f"the content type says charset={declared} but the document is {encoding}")
        if root.tag != self._envelope_tag:
            name = etree.QName(root)
            if name.localname == "Envelope" and name.namespace in _VERSIONS:
                raise self._version_mismatch(_VERSIONS[name.namespace])
            raise SoapFault.sender("NotSOAP", f"the document's root is {name.text}, not a SOAP {self.version.name} "
                                              f"Envelope ({self._envelope_tag})")
        children = [child for child in root if isinstance(child.tag, str)]
        header = children.pop(0) if children and children[0].tag == self._header_tag else None
        if not children or children[0].tag != self._body_tag:
            raise SoapFault.sender("BadEnvelope", "the Envelope has no Body where one belongs (after the Header)")
        if len(children) > 1 and self.version is SOAP12:
            raise SoapFault.sender("BadEnvelope", f"{children[1].tag} follows the Body; SOAP 1.2 allows nothing there")
        operations = [child for child in children[0] if isinstance(child.tag, str)]
        if len(operations) != 1:
            raise SoapFault.sender("BadEnvelope", f"the Body holds {len(operations)} elements; it must hold exactly one "
                                                  "(the operation's)")
        context.envelope = root
        return header, operations[0]

    def _version_mismatch(self, received: SoapVersion) -> SoapFault:
        upgrade = ()
        if self.version is SOAP12:  # SOAP 1.2 §5.4.7: tell a 1.1 sender which envelope we take
            env = SOAP12.envelope_ns
            element = etree.Element(f"{{{env}}}Upgrade", nsmap={"upg": env})
            etree.SubElement(element, f"{{{env}}}SupportedEnvelope", qname="upg:Envelope")
            upgrade = (element,)
        return SoapFault(SoapFault.VERSION_MISMATCH, f"this service speaks SOAP {self.version.name}, the request is a "
                                                     f"SOAP {received.name} envelope", headers=upgrade)

    def _read_addressing(self, header: etree._Element | None) -> addressing.AddressingHeaders | None:
        try:
            return addressing.read_header_blocks(header)
        except addressing.AddressingError as exc:
            wsa = "{%s}" % addressing.WSA_NS
            raise SoapFault(SoapFault.SENDER, str(exc), subcodes=(wsa + "InvalidAddressingHeader", wsa + exc.subcode),
                            soap11_faultcode=wsa + "InvalidAddressingHeader") from None

    def _check_must_understand(self, header: etree._Element | None) -> None:
        if header is None:
            return
        must_understand = self._must_understand_attribute
        missed = [block.tag for block in header if block.get(must_understand) in ("1", "true")
                  and isinstance(block.tag, str) and block.tag not in self._understood
                  and block.get(self._role_attribute) in self._our_roles]
        if missed:
            not_understood = ()
            if self.version is SOAP12:  # SOAP 1.2 §5.4.8: name them in NotUnderstood header blocks
                not_understood = tuple(self._not_understood(tag) for tag in missed)
            raise SoapFault(SoapFault.MUST_UNDERSTAND, f"header blocks not understood here: {', '.join(missed)}",
                            headers=not_understood)

    @staticmethod
    def _not_understood(tag: str) -> etree._Element:
        qname = etree.QName(tag)
        element = etree.Element(f"{{{SOAP12.envelope_ns}}}NotUnderstood", nsmap={"n": qname.namespace})
        element.set("qname", "n:" + qname.localname)
        return element

    def _inbound(self, envelope_filter: EnvelopeFilter, data: bytes, context: CallContext) -> bytes:
        try:
            return envelope_filter.inbound(data, context)
        except SoapFault:
            raise
        except Exception:
            log.failure("inbound filter {filter!r} failed", filter=envelope_filter)
            raise _internal_error() from None

    async def _call(self, body: etree._Element, context: CallContext) -> tuple[bytes, str, bool]:
        """Steps 7–8: find and validate the operation, run it (compiled codec or spyne); return the reply, its
        Action, and whether the reply carries its WS-Addressing headers already (the compiled path writes
        them in place)."""
        descriptors = self._operations.get(body.tag)
        if not descriptors:
            names = sorted({d.operation_name for ds in self._operations.values() for d in ds})
            listed = ", ".join(names[:MAX_LISTED_OPERATIONS]) + (", …" if len(names) > MAX_LISTED_OPERATIONS else "")
            raise SoapFault.sender("UnknownOperation", f"{body.tag} is not an operation of this service "
                                                       f"(operations: {listed})")
        actions = self._actions[descriptors[0].operation_name]
        requested = None if context.addressing is None else context.addressing.action
        if self.check_actions and requested is not None and requested != actions.input:
            raise action_not_supported(requested, descriptors[0].operation_name, actions.input)
        if not self._schema.validate(body):
            raise SoapFault.sender("InvalidBody", next(iter(self._schema.error_log)).message)
        codec = self._codecs.get(body.tag)
        if codec is not None:
            return await self._call_compiled(codec, body, context, actions), actions.output, True
        ctx = MethodContext(self._server, MethodContext.SERVER)
        ctx.udc = context
        header = body.getparent().getprevious()
        ctx.in_header_doc = None if header is None else list(header)
        ctx.in_body_doc = body
        try:
            ctx = self._server.generate_contexts(ctx)[0]  # spyne's auxiliary methods are not supported
            if ctx.in_error is None:
                self._server.get_in_object(ctx)
            if ctx.in_error is not None:
                raise SoapFault.sender("InvalidBody", _brief(str(ctx.in_error.faultstring)))
            self._server.get_out_object(ctx)
            single = _returns_one(ctx.descriptor)
            try:
                result = await (ctx.out_object[0] if single else ctx.out_object)
            except Fault as fault:
                raise self._service_fault(fault, ctx.descriptor, actions, ctx) from None
            except Exception:
                log.failure("{operation} failed", operation=ctx.descriptor.operation_name)
                raise _internal_error() from None
            return self._spyne_reply(ctx, result), actions.output, False
        finally:
            ctx.close()

    async def _call_compiled(self, codec: OperationCodec, body: etree._Element, context: CallContext,
                             actions: _Actions) -> bytes:
        """Step 8 for an operation with a compiled codec (``fastpath``): the method is called as spyne would
        call it, with the same answers to values, Deferreds, coroutines and exceptions.  The reply carries
        its WS-Addressing headers (when the request had some)."""
        descriptor = codec.descriptor
        try:
            args = codec.decode(body)
        except UnreadableValue as exc:
            raise SoapFault.sender("InvalidBody", _brief(str(exc))) from None
        try:
            result = codec.function(*args) if codec.no_ctx else codec.function(
                FastMethodContext(self.application, descriptor, context), *args)
            if isinstance(result, Failure):
                result.raiseException()
            if isinstance(result, defer.Deferred) or iscoroutine(result):
                result = await result
        except Fault as fault:
            raise self._service_fault(fault, descriptor, actions) from None
        except Exception:
            log.failure("{operation} failed", operation=descriptor.operation_name)
            raise _internal_error() from None
        headers = b"" if context.addressing is None else addressing.reply_headers(context.addressing,
                                                                                   action=actions.output)
        reply = codec.encode(result, headers)
        if reply is None:  # a value the codec does not write: spyne writes it (or fails on it) as it always has
            ctx = self._spyne_context(descriptor, context)
            try:
                reply = addressing.insert_headers(self._spyne_reply(ctx, result), headers)
            finally:
                ctx.close()
        return reply

    def _spyne_context(self, descriptor, context: CallContext) -> MethodContext:
        """A spyne context for ``descriptor``, for the compiled path's rare needs (writing a reply or a declared
        fault spyne's way)."""
        ctx = MethodContext(self._server, MethodContext.SERVER)
        ctx.udc = context
        ctx.descriptor = descriptor
        return ctx

    def _spyne_reply(self, ctx: MethodContext, result: object) -> bytes:
        """The reply envelope spyne writes for the method's ``result``."""
        ctx.out_object = [result] if _returns_one(ctx.descriptor) else result
        try:
            self._server.get_out_string(ctx)
        except Exception:
            log.failure("the reply of {operation} could not be serialised", operation=ctx.descriptor.operation_name)
            raise _internal_error() from None
        return b"".join(ctx.out_string)

    def _service_fault(self, fault: Fault, descriptor, actions: _Actions, ctx: MethodContext | None = None) -> SoapFault:
        """A spyne Fault raised by a service method, as a SoapFault: ``Client.X.Y`` → Sender with subcodes
        ``tns:X``, ``tns:Y``; a fault class the operation declares becomes the detail as well."""
        head, *rest = str(fault.faultcode or "Server").split(".")
        if head in ("Client", "Sender"):
            code = SoapFault.SENDER
        elif head in ("Server", "Receiver"):
            code = SoapFault.RECEIVER
        else:
            code, rest = SoapFault.RECEIVER, [head, *rest]
        tns = self.application.interface.get_tns()
        detail = None
        declared = type(fault) in (descriptor.faults or ())
        if declared:
            holder = etree.Element("detail")
            own = ctx is None
            ctx = self._spyne_context(descriptor, None) if own else ctx
            try:
                self.application.out_protocol.complex_to_parent(ctx, type(fault), fault, holder, fault.get_namespace())
            finally:
                if own:
                    ctx.close()
            detail = holder[0]
        return SoapFault(code, str(fault.faultstring), subcodes=[f"{{{tns}}}{part}" for part in rest if part],
                         detail=detail, action=actions.faults.get(type(fault).get_type_name()))

    def _wsdl_tree(self, address: str) -> tuple[etree._Element, dict[str, _Actions]]:
        """A fresh, annotated WSDL for ``address`` and its actions (spyne drops ``<wsdl:service>`` when one
        ``Wsdl11`` object is built twice)."""
        document = Wsdl11(self.application.interface)
        document.build_interface_document(address)
        return document.root_elt, _annotate_actions(document.root_elt, self._declared_actions)

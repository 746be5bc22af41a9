"""SOAP over PsEPR, both ends: a service endpoint on a channel, a zeep transport, multicast calls.

Framing (schema: ``wsdl/soap-over-psepr.xsd``; README "SOAP over PsEPR")::

    <event xmlns="http://psepr.org/xs/event">
      <to><channel>/org/dsmt/ns/soap/echo/</channel><instance>node7</instance></to>   (no instance: the group)
      <from><service>alice</service><instance>cli-1</instance></from>
      <payload xmlns="http://dsmt.org/ns/psepr/soap">
        <content-type>application/soap+xml; charset=utf-8</content-type>           (optional)
        <envelope>&lt;soap:Envelope …&gt;…&lt;/soap:Envelope&gt;</envelope>
      </payload>
    </event>

* ``<envelope>`` holds the SOAP envelope's UTF-8 bytes **as escaped text**:
  ``&`` ``<`` and CR become ``&amp;`` ``&lt;`` ``&#13;`` (and ``]]>`` becomes
  ``]]&gt;``); the receiver's text, encoded as UTF-8, is the sender's bytes
  exactly, so a WS-Security signature verifies on what arrives.  An envelope
  that is not UTF-8, or holds a character XML cannot carry, is refused.
* **Size**: an event carries at most ``MAX_EVENT_BYTES`` (1 MiB) of XML.  The
  escaped envelope may take :data:`MAX_ESCAPED_ENVELOPE_BYTES`
  (1 MiB − :data:`FRAMING_RESERVE`); escaping grows an envelope by 3–4 bytes
  per ``<``/``&``/CR, so typical envelopes up to ~0.9 MB fit and *any*
  envelope up to :data:`GUARANTEED_ENVELOPE_BYTES` (≈203 KiB, every byte an
  ``&``) does.  Callers get :class:`EnvelopeTooLarge` before anything is
  sent; a service whose reply does not fit answers a Receiver fault
  ``EnvelopeTooLarge`` instead.
* **Channels**: a service's instances lease ``/org/dsmt/ns/soap/<service>/``
  (typed to :data:`PAYLOAD_NS`); a request with ``to/instance`` reaches one
  instance, one without reaches every instance (multicast).  The WSDL port
  address is ``psepr:/org/dsmt/ns/soap/<service>/`` or, for one instance,
  ``psepr:/org/dsmt/ns/soap/<service>/?instance=<name>``.
* **Correlation** is WS-Addressing 1.0: a request carries ``MessageID`` and
  ``ReplyTo`` = ``psepr:/org/dsmt/ns/soap/reply/<caller id>/``, a channel the
  caller leases; the reply goes there with ``to/service``/``to/instance`` of
  the request's sender and ``RelatesTo`` equal to the MessageID.  A service
  only replies below ``/org/dsmt/ns/soap/reply/`` — a request cannot make it
  send to somebody else's channel.  A request without such a ``ReplyTo`` is
  not run: it is dropped, counted and logged (PsEPR has no back channel).

Server: :class:`PsEPRSoapEndpoint`.  Client: :class:`PsEPRTransport` (zeep,
``AsyncClient``) and :func:`multicast_call`.
"""
from __future__ import annotations

import functools
import hashlib
import re
import secrets
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape as _escape_text

from lxml import etree
from requests import Response
from requests.structures import CaseInsensitiveDict
from twisted.application import service as _service
from twisted.internet import defer
from twisted.logger import Logger
from zeep.transports import Transport
from zeep.wsdl.utils import etree_to_string

from dsmt.transports.psepr.channel import ChannelError, validate_channel
from dsmt.transports.psepr.client import PsEPRError
from dsmt.transports.psepr.event import MAX_EVENT_BYTES, Event, OpaquePayload
from dsmt.transports.soap import PSEPR_TRANSPORT, addressing
from dsmt.transports.soap.zeepsupport import binding_classes
from dsmt.transports.xmlsafe import XmlSafetyError, parse_xml, split_tag

__all__ = [
    "PSEPR_TRANSPORT", "PAYLOAD_NS", "SERVICE_CHANNEL_PREFIX", "REPLY_CHANNEL_PREFIX", "FRAMING_RESERVE",
    "MAX_ESCAPED_ENVELOPE_BYTES", "GUARANTEED_ENVELOPE_BYTES", "CALL_TIMEOUT", "REPLY_CACHE_SECONDS",
    "REPLY_CACHE_ENTRIES", "REPLY_CACHE_BYTES", "LEASE_SECONDS", "PsEPRSoapError", "EnvelopeTooLarge",
    "PayloadError", "CallTimeout", "ReplyCache", "PsEPRPeer", "PsEPRSoapEndpoint", "PsEPRTransport",
    "ReplyToPlugin", "Result", "multicast_call", "service_channel", "service_address", "parse_address",
    "encode_payload", "decode_payload", "escaped_size",
]

log = Logger(namespace="dsmt.soap.psepr")

#: The payload type (namespace) of a SOAP envelope carried in an event.
PAYLOAD_NS = "http://dsmt.org/ns/psepr/soap"
#: Services live below this channel, one segment each: ``/org/dsmt/ns/soap/<service>/``.
SERVICE_CHANNEL_PREFIX = "/org/dsmt/ns/soap/"
#: Callers' reply channels: ``/org/dsmt/ns/soap/reply/<caller id>/``; ``reply`` is no service name.
REPLY_CHANNEL_PREFIX = SERVICE_CHANNEL_PREFIX + "reply/"
#: Bytes of an event kept for everything but the escaped envelope: the event's tags and namespaces
#: (~200 bytes), a channel (≤ 1024), four names (≤ 255 characters each, up to 4 UTF-8 bytes a
#: character when escaped… 4 × 1020) and a content type (≤ 255).  8 KiB covers the worst case, so the
#: envelope's limit below does not depend on names or channels.
FRAMING_RESERVE = 8 * 1024
#: Largest escaped envelope an event carries.
MAX_ESCAPED_ENVELOPE_BYTES = MAX_EVENT_BYTES - FRAMING_RESERVE
#: Largest envelope that fits whatever it holds (escaping grows a byte at most fivefold: ``&`` → ``&amp;``).
GUARANTEED_ENVELOPE_BYTES = MAX_ESCAPED_ENVELOPE_BYTES // 5
#: Longest ``<content-type>`` accepted (a media type with charset and action fits in far less).
MAX_CONTENT_TYPE_CHARS = 255
#: Seconds a call waits for its reply by default: the same minute as SOAP over HTTP (``http.CALL_TIMEOUT``).
CALL_TIMEOUT = 60.0
#: Seconds a reply stays in a service's reply cache: a caller retrying with the same bytes does so
#: within its call timeout (default 60 s); twice that covers a retry sent just before timing out.
REPLY_CACHE_SECONDS = 120.0
#: Replies a service's cache holds at most: 2 minutes at ~80 calls/s; past it the oldest go first.
REPLY_CACHE_ENTRIES = 10_000
#: Bytes of replies the cache holds at most: replies may be up to 1 MiB each, entries alone do not
#: bound memory.
REPLY_CACHE_BYTES = 64 * 1024 * 1024
#: Lease length asked for by services and callers (renewed at 80 % by the connection).
LEASE_SECONDS = 600

_P = "{%s}" % PAYLOAD_NS
_PAYLOAD, _ENVELOPE, _CONTENT_TYPE = _P + "payload", _P + "envelope", _P + "content-type"
#: C0 controls XML 1.0 cannot carry, and U+FFFE/U+FFFF, as UTF-8 (surrogates are not valid UTF-8).
_NOT_XML_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]|\xef\xbf[\xbe\xbf]")
#: The longest run of bytes without such a C0 control from the start: one tight loop, where a search for
#: :data:`_NOT_XML_BYTES` tries its alternatives at every byte (several µs per KiB against well under one).
_NO_C0_CONTROL = re.compile(rb"[^\x00-\x08\x0b\x0c\x0e-\x1f]*")
_NONCHARACTER = re.compile(rb"\xef\xbf[\xbe\xbf]")
_SEGMENT = re.compile(r"[A-Za-z0-9._~:@+=,\-]+\Z")
_WSA = "{%s}" % addressing.WSA_NS
_SOAP_ENVELOPES = ("http://schemas.xmlsoap.org/soap/envelope/", "http://www.w3.org/2003/05/soap-envelope")
_WSSE_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"


class PsEPRSoapError(PsEPRError):
    """Base of this module's errors."""


class EnvelopeTooLarge(PsEPRSoapError, ValueError):
    """An envelope does not fit in one PsEPR event (see :data:`MAX_ESCAPED_ENVELOPE_BYTES`)."""


class PayloadError(PsEPRSoapError, ValueError):
    """A payload is not a SOAP-over-PsEPR payload, or an envelope cannot be carried; the message says why."""


class CallTimeout(PsEPRSoapError, TimeoutError):
    """No reply within the call's timeout; names the service, the operation and the seconds."""

    def __init__(self, service: str, operation: str, seconds: float, message_id: str, instance: str | None = None):
        target = f"service {service!r}" + (f" (instance {instance!r})" if instance else "")
        super().__init__(f"no reply from {target} to {operation!r} within {seconds:g} s (MessageID {message_id})")
        self.service, self.operation, self.seconds, self.message_id, self.instance = (
            service, operation, seconds, message_id, instance)


# ------------------------------------------------------------------------------------------ framing

def escaped_size(envelope: bytes) -> int:
    """Bytes ``envelope`` takes once escaped inside ``<envelope>`` (no copy is made)."""
    return (len(envelope) + 4 * envelope.count(b"&") + 3 * envelope.count(b"<") + 4 * envelope.count(b"\r")
            + 3 * envelope.count(b"]]>"))


def _check_envelope(envelope: bytes) -> None:
    """PayloadError unless ``envelope`` is UTF-8 without characters XML cannot carry (the first one is named)."""
    ascii_only = envelope.isascii()
    if not ascii_only:
        try:
            envelope.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"a SOAP envelope travels over PsEPR as UTF-8; this one is not ({exc.reason} at "
                               f"byte {exc.start})") from None
    if _NO_C0_CONTROL.match(envelope).end() == len(envelope) and (ascii_only or not _NONCHARACTER.search(envelope)):
        return
    bad = _NOT_XML_BYTES.search(envelope)  # the slow scan, only to name the first offender
    raise PayloadError(f"the envelope holds a character XML cannot carry ({bad.group()!r} at byte {bad.start()})")


@functools.lru_cache(maxsize=64)
def _payload_head(content_type: str | None) -> bytes:
    """``<payload …>`` and the ``<content-type>`` element: the same few content types recur, so built once each."""
    head = b'<payload xmlns="%s">' % PAYLOAD_NS.encode()
    if content_type is not None:
        if len(content_type) > MAX_CONTENT_TYPE_CHARS or _NOT_XML_BYTES.search(content_type.encode("utf-8")):
            raise PayloadError(f"unusable content type {content_type[:80]!r}")
        head += b"<content-type>%s</content-type>" % _escape_text(content_type).encode("utf-8")
    return head


def encode_payload(envelope: bytes, content_type: str | None = None) -> OpaquePayload:
    """The event payload carrying ``envelope`` (its exact bytes).

    Raises :class:`EnvelopeTooLarge` when the escaped envelope is over
    :data:`MAX_ESCAPED_ENVELOPE_BYTES`, :class:`PayloadError` when the bytes
    cannot be carried as text (not UTF-8, characters outside XML).
    """
    size = escaped_size(envelope)
    if size > MAX_ESCAPED_ENVELOPE_BYTES:
        raise EnvelopeTooLarge(f"the SOAP envelope is {len(envelope)} bytes, {size} once escaped; a PsEPR event "
                               f"carries at most {MAX_ESCAPED_ENVELOPE_BYTES} escaped bytes (any envelope up to "
                               f"{GUARANTEED_ENVELOPE_BYTES} bytes fits)")
    _check_envelope(envelope)
    if content_type.__class__ is not str and content_type is not None:
        raise PayloadError(f"the content type must be text, not {type(content_type).__name__}")
    head = _payload_head(content_type)
    text = envelope.replace(b"&", b"&amp;").replace(b"<", b"&lt;").replace(b"\r", b"&#13;")
    if b"]]>" in text:
        text = text.replace(b"]]>", b"]]&gt;")
    return OpaquePayload.built(PAYLOAD_NS, head + b"<envelope>" + text + b"</envelope></payload>")


def decode_payload(payload) -> tuple[bytes, str | None]:
    """(envelope bytes, content type or None) from a received payload; :class:`PayloadError` says what is wrong."""
    if not isinstance(payload, OpaquePayload) or payload.namespace != PAYLOAD_NS:
        raise PayloadError(f"payload type {getattr(payload, 'namespace', None)!r} is not {PAYLOAD_NS}")
    root = payload.parsed_element()  # received: the event parser's tree, not parsed a second time
    if root is None:
        try:
            # no depth check needed: below, anything but two leaf elements is refused
            root = parse_xml(payload.xml, max_bytes=MAX_EVENT_BYTES, max_depth=None, what="payload")
        except XmlSafetyError as exc:
            raise PayloadError(str(exc)) from None
    envelope = content_type = None
    for child in root:
        if child.tag == _ENVELOPE:
            if envelope is not None:
                raise PayloadError("the payload has more than one <envelope>")
            envelope = child
        elif child.tag == _CONTENT_TYPE:
            if content_type is not None:
                raise PayloadError("the payload has more than one <content-type>")
            content_type = child
        elif isinstance(child.tag, str):
            raise PayloadError(f"unexpected element {child.tag} in the payload")
    if envelope is None:
        raise PayloadError("the payload has no <envelope>")
    for element in (envelope, content_type):
        if element is not None and len(element):
            raise PayloadError(f"<{etree.QName(element).localname}> must hold text (the escaped envelope), "
                               "not elements")
    if not envelope.text:
        raise PayloadError("the <envelope> is empty")
    kind = None if content_type is None else (content_type.text or "").strip() or None
    return envelope.text.encode("utf-8"), kind


# ------------------------------------------------------------------------------------------ addresses

def service_channel(service: str) -> str:
    """``/org/dsmt/ns/soap/<service>/`` (ValueError for a name that is no channel segment, or ``reply``)."""
    if not isinstance(service, str) or not _SEGMENT.match(service) or service in (".", "..", "reply"):
        raise ValueError(f"{service!r} is not a usable SOAP service name (one channel segment: letters, digits, "
                         "'. _ ~ : @ + = , -'; 'reply' is reserved)")
    return f"{SERVICE_CHANNEL_PREFIX}{service}/"


def service_address(service: str, instance: str | None = None) -> str:
    """The WSDL port address of a service (or of one of its instances)."""
    address = "psepr:" + service_channel(service)
    return address if instance is None else f"{address}?instance={instance}"


@functools.lru_cache(maxsize=1024)
def parse_address(address: str) -> tuple[str, str | None]:
    """``psepr:<channel>[?instance=<name>]`` → (channel, instance or None); ValueError names the problem.

    Cached (a few addresses recur for every call); a refused address is not cached and raises each time."""
    parts = urlsplit(address)
    if parts.scheme != "psepr" or parts.netloc or parts.fragment:
        raise ValueError(f"{address!r} is not a psepr: address (psepr:/channel/[?instance=name])")
    try:
        validate_channel(parts.path)
    except ChannelError as exc:
        raise ValueError(f"{address!r}: {exc}") from None
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    if set(query) - {"instance"} or len(query.get("instance", ())) > 1:
        raise ValueError(f"{address!r}: the only query parameter is one instance=")
    instance = query.get("instance", [None])[0] or None
    return parts.path, instance


def _service_name(channel: str) -> str:
    return channel[len(SERVICE_CHANNEL_PREFIX):].strip("/") if channel.startswith(SERVICE_CHANNEL_PREFIX) else channel


def _reply_channel(reply_to: addressing.EndpointReference | None) -> str | None:
    """The reply channel a request names, when it is one a service may answer on."""
    if reply_to is None or not reply_to.address.startswith("psepr:"):
        return None
    try:
        channel, _ = parse_address(reply_to.address)
    except ValueError:
        return None
    return channel if channel.startswith(REPLY_CHANNEL_PREFIX) and channel != REPLY_CHANNEL_PREFIX else None


def _lenient_reply_to(envelope) -> addressing.EndpointReference | None:
    """The first ReplyTo's address of an envelope whose WS-Addressing headers are otherwise unusable."""
    header = envelope.find("{%s}Header" % split_tag(envelope.tag)[0])
    address = None if header is None else header.find(f"{_WSA}ReplyTo/{_WSA}Address")
    return None if address is None else addressing.EndpointReference((address.text or "").strip())


_MESSAGE_ID, _REPLY_TO, _RELATES_TO, _ADDRESS = (_WSA + name for name in ("MessageID", "ReplyTo", "RelatesTo",
                                                                           "Address"))


def _read_addressing(envelope) -> addressing.AddressingHeaders | None:
    """``addressing.read_headers`` for the hot path: MessageID, ReplyTo and RelatesTo read in one pass
    over the Header (what correlation needs); anything less plain — a repeated header, reference
    parameters, a ReplyTo without Address — goes to ``read_headers`` itself, which decides."""
    header = envelope[0] if len(envelope) else None
    if header is None or header.tag != "{%s}Header" % split_tag(envelope.tag)[0]:
        return None
    message_id = reply_to = relates_to = None
    plain = True
    for block in header:
        tag = block.tag
        if tag == _MESSAGE_ID:
            plain = plain and message_id is None
            message_id = block.text or ""
        elif tag == _RELATES_TO:
            plain = plain and relates_to is None and not block.attrib
            relates_to = block.text or ""
        elif tag == _REPLY_TO:
            address = block[0] if len(block) == 1 else None
            plain = plain and reply_to is None and address is not None and address.tag == _ADDRESS
            if plain:
                reply_to = addressing.EndpointReference((address.text or "").strip())
        elif tag.__class__ is str and tag.startswith(_WSA) and tag[len(_WSA):] in ("FaultTo", "From"):
            plain = False
    if not plain:
        return addressing.read_headers(envelope)
    if message_id is None and reply_to is None and relates_to is None:
        return addressing.read_headers(envelope)
    return addressing.AddressingHeaders(message_id=message_id, reply_to=reply_to, relates_to=relates_to)


def _body(envelope):
    """The envelope's first Body child (what ``envelope.find`` returns, without its path compilation), or None."""
    tag = "{%s}Body" % split_tag(envelope.tag)[0]
    for child in envelope:
        if child.tag == tag:
            return child
    return None


def _is_fault(envelope) -> bool:
    body = _body(envelope)
    if body is None:
        return False
    fault = "{%s}Fault" % split_tag(envelope.tag)[0]
    return any(child.tag == fault for child in body)


# ------------------------------------------------------------------------------------------ server

class ReplyCache:
    """Replies by (MessageID, SHA-256 of the request's bytes), for :data:`REPLY_CACHE_SECONDS`, bounded in
    entries and bytes (oldest out first).  ``clock``: seconds."""

    def __init__(self, clock: Callable[[], float], *, seconds: float = REPLY_CACHE_SECONDS,
                 max_entries: int = REPLY_CACHE_ENTRIES, max_bytes: int = REPLY_CACHE_BYTES):
        self.clock, self.seconds, self.max_entries, self.max_bytes = clock, seconds, max_entries, max_bytes
        self._entries: OrderedDict[tuple, tuple[float, bytes, str | None]] = OrderedDict()
        self.bytes = 0

    def __len__(self):
        return len(self._entries)

    def _purge(self, now: float) -> None:
        entries = self._entries
        while entries and (next(iter(entries.values()))[0] <= now or len(entries) > self.max_entries
                           or self.bytes > self.max_bytes):
            _, (_, body, _) = entries.popitem(last=False)
            self.bytes -= len(body)

    def get(self, key: tuple) -> tuple[bytes, str | None] | None:
        self._purge(self.clock())
        entry = self._entries.get(key)
        return None if entry is None else entry[1:]

    def put(self, key: tuple, body: bytes, content_type: str | None) -> None:
        now = self.clock()
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old[1])
        self._entries[key] = (now + self.seconds, body, content_type)
        self.bytes += len(body)
        self._purge(now)


@dataclass(frozen=True)
class PsEPRPeer:
    """What a service knows of a caller over PsEPR (``CallContext.peer``): its event's sender and channel."""

    service: str | None
    instance: str | None
    reply_channel: str
    #: The instance this endpoint answers as (its connection's), for methods that need to know.
    local_instance: str | None = None


@dataclass
class _InFlight:
    targets: list  # (reply channel, to service, to instance) of each copy of the request


class PsEPRSoapEndpoint(_service.Service):
    """One instance of a SOAP service on PsEPR: leases ``/org/dsmt/ns/soap/<service_name>/`` on
    ``connection`` and answers each request envelope through ``core`` (a :class:`SoapCore` built with
    ``transport_uri=PSEPR_TRANSPORT``) on the request's reply channel.

    It answers requests sent to the group (no ``to/instance``) and to ``connection.instance``.  A Twisted
    ``Service``; or call :meth:`start` (fires once the lease is granted) and :meth:`stop`.

    Repeated MessageIDs: a request whose MessageID *and* exact bytes were answered within
    :data:`REPLY_CACHE_SECONDS` is answered with the same reply bytes without running anything (so a
    signed retry never meets WS-Security's replay check); a copy arriving while the first is still running
    waits for its reply.  The same MessageID with other bytes is a new request (the core, and WS-Security's
    replay cache for signed ones, judge it).

    Never raises out of the event callback.  ``stats`` counts: ``received``, ``answered``, ``cached``
    (answered from the cache or joined in flight), ``faults``, ``too_large`` (replies replaced by the
    EnvelopeTooLarge fault), ``dropped_malformed`` (payload or XML unreadable, no reply possible),
    ``dropped_no_reply_to`` (no ``psepr:`` ReplyTo below ``/org/dsmt/ns/soap/reply/``),
    ``ignored`` (for another instance or a sub-channel), ``send_failed``, ``errors``.
    """

    def __init__(self, connection, core, service_name: str, *, lease_seconds: int = LEASE_SECONDS,
                 cache: ReplyCache | None = None):
        self.connection = connection
        self.core = core
        self.service_name = service_name
        self.channel = service_channel(service_name)
        self.lease_seconds = lease_seconds
        self.cache = cache if cache is not None else ReplyCache(connection.reactor.seconds)
        self.stats: Counter = Counter()
        self.lease = None
        self._in_flight: dict[tuple, _InFlight] = {}

    def __repr__(self):
        return f"<PsEPRSoapEndpoint {self.service_name} instance={self.connection.instance}>"

    def start(self) -> defer.Deferred:
        """Lease the channel; fires with self once granted."""
        if self.lease is None:
            self.lease = self.connection.lease(self.channel, self.lease_seconds, PAYLOAD_NS, callback=self._received)
        return self.lease.ready.addCallback(lambda _: self)

    def stop(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def startService(self):
        super().startService()
        self.start().addErrback(lambda failure: log.failure("{endpoint}: no lease", failure, endpoint=self))

    def stopService(self):
        self.stop()
        return super().stopService()

    # ------------------------------------------------------------ requests

    def _received(self, event: Event) -> None:
        try:
            self._handle(event)
        except Exception:
            self.stats["errors"] += 1
            log.failure("{endpoint} failed on a request event", endpoint=self)

    def _drop(self, counter: str, event: Event, why: str) -> None:
        self.stats[counter] += 1
        log.info("{endpoint}: request from {service}/{instance} dropped: {why}", endpoint=self,
                 service=event.from_service, instance=event.from_instance, why=why)

    def _handle(self, event: Event) -> None:
        self.stats["received"] += 1
        if event.channel != self.channel or event.to_instance not in (None, self.connection.instance):
            self.stats["ignored"] += 1
            return
        try:
            envelope, content_type = decode_payload(event.payload)
            # parsed once: the Header is read here, the core takes the tree (``parsed=``) and checks the depth
            # itself (a too-deep request gets its fault, correlated)
            root = parse_xml(envelope, max_bytes=MAX_EVENT_BYTES, max_depth=None, what="SOAP envelope")
        except (PayloadError, XmlSafetyError) as exc:
            self._drop("dropped_malformed", event, str(exc))
            return
        if split_tag(root.tag)[0] not in _SOAP_ENVELOPES:
            self._drop("dropped_malformed", event, f"not a SOAP envelope: {root.tag}")
            return
        try:
            headers = _read_addressing(root)
            reply_to = None if headers is None else headers.reply_to
        except addressing.AddressingError:
            headers, reply_to = None, _lenient_reply_to(root)  # the core answers the addressing fault
        reply_channel = _reply_channel(reply_to)
        if reply_channel is None:
            self._drop("dropped_no_reply_to", event, "no psepr: ReplyTo below " + REPLY_CHANNEL_PREFIX
                       + (f" ({reply_to.address!r})" if reply_to is not None else ""))
            return
        message_id = None if headers is None else headers.message_id
        target = (reply_channel, event.from_service, event.from_instance)
        key = None
        if message_id is not None:
            key = (message_id, hashlib.sha256(envelope).digest())
            cached = self.cache.get(key)
            if cached is not None:
                self.stats["cached"] += 1
                self._send(target, *cached)
                return
            flight = self._in_flight.get(key)
            if flight is not None:
                self.stats["cached"] += 1
                flight.targets.append(target)
                return
            self._in_flight[key] = _InFlight([target])
        peer = PsEPRPeer(event.from_service, event.from_instance, reply_channel, self.connection.instance)
        answer = self.core.process(envelope, content_type=content_type, peer=peer, parsed=root)
        answer.addCallback(self._answered, key, target, headers)
        answer.addErrback(self._failed, key)

    def _answered(self, response, key, target, headers) -> None:
        body = response.body
        if response.fault is not None:
            self.stats["faults"] += 1  # correlated by the core, whatever refused the request
        try:
            payload = encode_payload(body, response.content_type)
        except PsEPRSoapError as exc:
            self.stats["too_large"] += 1
            log.warn("{endpoint}: reply not sendable ({error}); answering a fault", endpoint=self, error=exc)
            from dsmt.transports.soap.core import SoapFault
            fault = SoapFault.receiver("EnvelopeTooLarge", f"the reply cannot travel over PsEPR: {exc}")
            body = self.core.fault_response(fault, request=headers).body
            payload = encode_payload(body, response.content_type)
        flight = self._in_flight.pop(key, None) if key is not None else None
        targets = flight.targets if flight is not None else [target]
        if key is not None:
            self.cache.put(key, body, response.content_type)
        self.stats["answered"] += 1
        for each in targets:
            self._send_payload(each, payload)

    def _failed(self, failure, key) -> None:
        self.stats["errors"] += 1
        self._in_flight.pop(key, None)
        log.failure("{endpoint}: answering failed", failure, endpoint=self)

    def _send(self, target, body: bytes, content_type: str | None) -> None:
        self._send_payload(target, encode_payload(body, content_type))

    def _send_payload(self, target, payload: OpaquePayload) -> None:
        channel, service, instance = target
        try:
            self.connection.send(Event(channel, payload, to_service=service, to_instance=instance))
        except Exception as exc:
            self.stats["send_failed"] += 1
            log.warn("{endpoint}: reply to {channel} not sent: {error}", endpoint=self, channel=channel, error=exc)


# ------------------------------------------------------------------------------------------ client

@dataclass(frozen=True)
class _Reply:
    envelope: bytes
    content_type: str | None
    instance: str | None
    fault: bool


def _response(reply: _Reply, version_hint: str) -> Response:
    response = Response()
    response._content = reply.envelope
    response.status_code = 500 if reply.fault else 200
    response.headers = CaseInsensitiveDict({"Content-Type": reply.content_type or version_hint})
    response.encoding = "utf-8"
    return response


class ReplyToPlugin:
    """zeep plugin giving each request the transport's ``ReplyTo`` before zeep's other egress steps end —
    needed only when a signing wrapper (``wssec.AsyncSigningTransport``) wraps :class:`PsEPRTransport`:
    the wrapper signs what zeep hands it, so the ReplyTo must be in the envelope by then."""

    def __init__(self, transport: "PsEPRTransport"):
        self.transport = transport

    def egress(self, envelope, http_headers, operation, binding_options):
        self.transport._address_tree(envelope)
        return envelope, http_headers

    def ingress(self, envelope, http_headers, operation):
        return envelope, http_headers


class PsEPRTransport(Transport):
    """zeep transport for SOAP over PsEPR, for ``zeep.AsyncClient`` inside a reactor.

    ``PsEPRTransport(connection, timeout=…)``; ``await transport.start()`` leases the reply channel
    ``/org/dsmt/ns/soap/reply/<random id>/``; then ``make_client(wsdl_bytes, transport, asynchronous=True)``
    and ``defer.ensureDeferred(client.service.op(…))``.  ``binding_classes`` makes zeep accept WSDL ports
    bound to :data:`PSEPR_TRANSPORT`.  ``instance`` sends every call to that instance (else the port
    address's ``?instance=``, else the group — where every instance would answer; use
    :func:`multicast_call` for that).

    Each call: zeep's envelope gets a ``MessageID`` (when zeep did not add one) and the ``ReplyTo``,
    is signed when ``signer`` is given (addressing → sign → send), travels as one event, and the reply
    whose ``RelatesTo`` is that MessageID is handed to zeep (status 200, or 500 for a fault) after
    ``verifier`` checked its signature when given.  No reply within ``timeout`` seconds fails the call
    with :class:`CallTimeout`.  An envelope too large for an event fails with :class:`EnvelopeTooLarge`
    before anything is sent.  PsEPR delivery is best effort: with ``retry_every`` the request's event is
    sent again, byte for byte, every that many seconds until the reply or the timeout — the service runs
    it once and answers copies from its reply cache (a signed request stays valid: same bytes).
    """

    binding_classes = binding_classes(PSEPR_TRANSPORT)

    def __init__(self, connection, *, timeout: float = CALL_TIMEOUT, instance: str | None = None,
                 signer=None, verifier=None, accept_unsigned_faults: bool = True, clock=None,
                 lease_seconds: int = LEASE_SECONDS, retry_every: float | None = None):
        super().__init__(operation_timeout=timeout)
        self.connection = connection
        self.timeout = timeout
        self.instance = instance
        self.signer, self.verifier, self.accept_unsigned_faults = signer, verifier, accept_unsigned_faults
        self.clock = clock or connection.reactor
        self.lease_seconds = lease_seconds
        self.retry_every = retry_every
        self.caller_id = secrets.token_hex(8)
        self.reply_channel = f"{REPLY_CHANNEL_PREFIX}{self.caller_id}/"
        self.reply_to = "psepr:" + self.reply_channel
        self.lease = None
        self.stats: Counter = Counter()
        self._pending: dict[str, Callable[[_Reply], None]] = {}

    def start(self) -> defer.Deferred:
        """Lease the reply channel; fires with self once the lease is in force."""
        if self.lease is None:
            self.lease = self.connection.lease(self.reply_channel, self.lease_seconds, PAYLOAD_NS,
                                               callback=self._received)

        @defer.inlineCallbacks
        def ready():
            yield self.lease.ready
            yield self.connection.flush()  # the grant is routed: replies sent from now on reach us
            return self
        return ready()

    def close(self) -> None:
        """Release the reply lease; calls still waiting fail with :class:`PsEPRSoapError`."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        pending, self._pending = self._pending, {}
        for handler in pending.values():
            handler(None)

    async def aclose(self) -> None:
        self.close()

    def _load_remote_data(self, url):
        raise PsEPRSoapError(f"not loading {url} synchronously inside the reactor: pass the WSDL's bytes")

    # ------------------------------------------------------------ zeep entry points

    async def post_xml(self, address, envelope, headers):
        message_id = self._address_tree(envelope)
        data = etree_to_string(envelope)
        return await self._call(address, data, headers, message_id, _operation_name(envelope))

    async def post(self, address, message, headers):
        """Bytes already final (e.g. signed by ``wssec.AsyncSigningTransport`` wrapping this transport)."""
        root = parse_xml(message, max_bytes=MAX_EVENT_BYTES, max_depth=None, what="SOAP envelope")
        found = _read_addressing(root) or addressing.AddressingHeaders()
        message_id = found.message_id
        if found.reply_to is None or message_id is None:
            if root.find(".//{%s}Security" % _WSSE_NS) is not None:
                raise PsEPRSoapError("the signed envelope has no ReplyTo/MessageID: add them before signing "
                                     "(PsEPRTransport(signer=…), or ReplyToPlugin(transport) in the client's plugins)")
            blocks = b""
            if message_id is None:
                message_id = addressing.new_message_id()
                blocks += b'<wsa:MessageID xmlns:wsa="%s">%s</wsa:MessageID>' % (
                    addressing.WSA_NS.encode(), _escape_text(message_id).encode())
            if found.reply_to is None:
                blocks += self._reply_to_block()
            message = addressing.insert_headers(message, blocks)
        return await self._call(address, message, headers, message_id, _operation_name(root), presigned=True)

    # ------------------------------------------------------------ the call

    def _reply_to_block(self) -> bytes:
        return b'<wsa:ReplyTo xmlns:wsa="%s"><wsa:Address>%s</wsa:Address></wsa:ReplyTo>' % (
            addressing.WSA_NS.encode(), _escape_text(self.reply_to).encode())

    def _address_tree(self, envelope) -> str:
        """Give zeep's envelope tree a MessageID (if missing) and this transport's ReplyTo; return the id."""
        namespace = etree.QName(envelope).namespace
        header = envelope.find("{%s}Header" % namespace)
        if header is None:
            header = etree.Element("{%s}Header" % namespace)
            envelope.insert(0, header)
        message_id = header.find(_WSA + "MessageID")
        if message_id is None:
            message_id = etree.SubElement(header, _WSA + "MessageID", nsmap={"wsa": addressing.WSA_NS})
            message_id.text = addressing.new_message_id()
        reply_to = header.find(_WSA + "ReplyTo")
        if reply_to is None:
            reply_to = etree.SubElement(header, _WSA + "ReplyTo", nsmap={"wsa": addressing.WSA_NS})
            etree.SubElement(reply_to, _WSA + "Address").text = self.reply_to
        return message_id.text

    def _prepare(self, data: bytes, presigned: bool):
        """Sign when this transport signs (after addressing, before sending)."""
        if self.signer is not None and not presigned:
            return self.signer.sign_envelope(data).data
        return data

    def _check(self, reply: _Reply, message_id: str) -> None:
        if self.verifier is None:
            return
        from dsmt.transports.soap.wssec import INVALID_SECURITY, WsSecurityFault
        caller = self.verifier.verify(reply.envelope, required=False)
        if caller is None:
            if self.accept_unsigned_faults and reply.fault:
                return
            raise WsSecurityFault(INVALID_SECURITY, "reply is not signed: no wsse:Security header")
        if caller.relates_to is not None and caller.relates_to != message_id:
            raise WsSecurityFault(INVALID_SECURITY, f"reply relates to {caller.relates_to!r}, "
                                                    f"not to this request {message_id!r}")

    def _send(self, channel: str, instance: str | None, data: bytes, content_type: str | None) -> Event:
        payload = encode_payload(data, content_type)  # EnvelopeTooLarge / PayloadError before anything is sent
        if self.lease is None:
            raise PsEPRSoapError("the transport is not started (await transport.start()) or closed")
        event = Event(channel, payload, to_instance=instance)
        self.connection.send(event)
        return event

    def _resend(self, event: Event, message_id: str, calls: list) -> None:
        """Send the request's event again, byte for byte (the service answers a copy from its reply cache)."""
        if message_id not in self._pending:
            return
        self.stats["resent"] += 1
        try:
            self.connection.send(event)
        except PsEPRError as exc:
            log.info("request {id} not re-sent: {error}", id=message_id, error=exc)
        calls[0] = self.clock.callLater(self.retry_every, self._resend, event, message_id, calls)

    async def _call(self, address: str, data: bytes, headers, message_id: str, operation: str,
                    presigned: bool = False):
        channel, instance = parse_address(address)
        instance = self.instance or instance
        data = self._prepare(data, presigned)
        content_type = (headers or {}).get("Content-Type")
        waiter = defer.Deferred()

        def handler(reply):
            self._pending.pop(message_id, None)
            if timer.active():
                timer.cancel()
            if not waiter.called:
                if reply is None:
                    waiter.errback(PsEPRSoapError("the transport was closed before the reply came"))
                else:
                    waiter.callback(reply)

        def expire():
            self._pending.pop(message_id, None)
            self.stats["timeouts"] += 1
            waiter.errback(CallTimeout(_service_name(channel), operation, self.timeout, message_id, instance))

        if message_id in self._pending:
            raise PsEPRSoapError(f"MessageID {message_id} is already waiting for a reply")
        event = self._send(channel, instance, data, content_type)
        timer = self.clock.callLater(self.timeout, expire)
        self._pending[message_id] = handler
        if self.retry_every:
            resends = [None]
            resends[0] = self.clock.callLater(self.retry_every, self._resend, event, message_id, resends)
            waiter.addBoth(_cancelled, resends)
        reply = await waiter
        self._check(reply, message_id)
        return _response(reply, content_type or "text/xml; charset=utf-8")

    # ------------------------------------------------------------ replies

    def _received(self, event: Event) -> None:
        try:
            if event.channel != self.reply_channel:
                self.stats["ignored"] += 1
                return
            envelope, content_type = decode_payload(event.payload)
            root = parse_xml(envelope, max_bytes=MAX_EVENT_BYTES, what="SOAP reply")
            found = _read_addressing(root)
        except (PsEPRSoapError, XmlSafetyError, addressing.AddressingError) as exc:
            self.stats["malformed"] += 1
            log.info("reply from {service}/{instance} dropped: {error}", service=event.from_service,
                     instance=event.from_instance, error=exc)
            return
        except Exception:
            self.stats["errors"] += 1
            log.failure("reading a reply failed")
            return
        handler = None if found is None or found.relates_to is None else self._pending.get(found.relates_to)
        if handler is None:
            self.stats["unmatched"] += 1  # late (timed out), duplicate, or not ours
            return
        self.stats["replies"] += 1
        try:
            handler(_Reply(envelope, content_type, event.from_instance, _is_fault(root)))
        except Exception:
            self.stats["errors"] += 1
            log.failure("handling a reply failed")


def _cancelled(result, calls: list):
    if calls[0] is not None and calls[0].active():
        calls[0].cancel()
    return result


def _operation_name(envelope) -> str:
    body = _body(envelope)
    if body is not None:
        for child in body:
            if isinstance(child.tag, str):
                return child.tag.rpartition("}")[2]
    return "?"


# ------------------------------------------------------------------------------------------ multicast

@dataclass(frozen=True)
class Result:
    """One instance's answer to a multicast call: ``outcome`` is ``"value"`` (``value`` set), ``"fault"``
    (``fault``: the ``zeep.exceptions.Fault``), ``"missing"`` (no reply by the deadline) or ``"error"``
    (``error``: a reply that could not be read or verified)."""

    instance: str
    outcome: str
    value: object = None
    fault: Exception | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "value"


def multicast_call(transport: PsEPRTransport, service, operation: str, args=(), kwargs=None, *,
                   instances=None, expected: int | None = None, deadline: float) -> defer.Deferred:
    """Call ``operation`` on every instance of a service with one event; fires with {instance: Result}.

    ``service`` is a zeep service proxy of the PsEPR port (``client.service`` or ``zeepsupport.bind``)
    whose client uses ``transport``.  The request is serialised once by zeep (its WS-Addressing and
    plugins), given the transport's ReplyTo, signed when the transport signs, and sent once to the
    service's group channel; every reply whose RelatesTo is its MessageID is parsed by zeep's binding
    (``process_reply``) — the replier is the reply event's ``from/instance``.

    Gathering ends when ``expected`` instances have replied (default: ``len(instances)`` when
    ``instances`` names them, else none: the deadline decides), or after ``deadline`` seconds.  The
    result holds each instance that replied and each of ``instances`` that did not (``"missing"``).
    """
    return defer.ensureDeferred(_multicast(transport, service, operation, tuple(args), dict(kwargs or {}),
                                           instances, expected, deadline))


async def _multicast(transport, service, operation, args, kwargs, instances, expected, deadline):
    client, binding, options = service._client, service._binding, service._binding_options
    envelope, headers = binding._create(operation, args, kwargs, client=client, options=options)
    message_id = transport._address_tree(envelope)
    data = transport._prepare(etree_to_string(envelope), False)
    channel, _ = parse_address(options["address"])
    named = list(instances) if instances is not None else []
    if expected is None and instances is not None:
        expected = len(named)
    content_type = (headers or {}).get("Content-Type")
    operation_obj = binding.get(operation)
    results: dict[str, Result] = {}
    done = defer.Deferred()

    def handler(reply):
        if reply is None:  # transport closed
            finish()
            return
        instance = reply.instance or "?"
        if instance in results:
            return
        try:
            transport._check(reply, message_id)
            value = binding.process_reply(client, operation_obj, _response(reply, content_type or "text/xml"))
            results[instance] = Result(instance, "value", value=value)
        except Exception as exc:  # zeep raises the service's Fault
            from zeep.exceptions import Fault
            if isinstance(exc, Fault):
                results[instance] = Result(instance, "fault", fault=exc)
            else:
                results[instance] = Result(instance, "error", error=exc)
        if expected is not None and len(results) >= expected and all(name in results for name in named):
            finish()

    def finish():
        transport._pending.pop(message_id, None)
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(None)

    transport._send(channel, None, data, content_type)
    timer = transport.clock.callLater(deadline, finish)
    transport._pending[message_id] = handler
    if expected == 0:
        finish()
    await done
    for name in named:
        results.setdefault(name, Result(name, "missing"))
    return results

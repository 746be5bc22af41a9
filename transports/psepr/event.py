"""PsEPR events: the model, and the codec between it and XML (pure, no I/O).

An event is the document the original PsEPR clients sent, usually inside an
XMPP ``<message>`` (see ``stream.py`` for the wrapper)::

    <event xmlns="http://psepr.org/xs/event">
      <to><channel>/org/dsmt/ns/deployment/xyz1/…/status/</channel>
          <service>xyz1_mgr</service><instance/></to>
      <from><service>xyz1_mgr</service><instance>planetlab5.nbgisp.com</instance></from>
      <payload xmlns="http://psepr.org/xs/payload/attribute">
        <field>deployment-status</field><value>…,status=requested</value><expire>90</expire>
      </payload>
    </event>

The payload's namespace is its type.  Two types are understood here:
*attribute* (``field``, ``value``, optional ``expire`` seconds; the
``…/ns/payload/attribute`` spelling of an old document is accepted on input and
normalised) and *lease* (``duration``, ``identifier``, ``op``).  Any other
namespace is carried as opaque XML.

Parsing contract: :func:`parse_event` accepts bytes of an ``<event>`` document
or of a ``<message>`` holding one; it refuses DTDs and entities, documents over
:data:`MAX_EVENT_BYTES` or deeper than :data:`MAX_EVENT_DEPTH`, and anything
structurally wrong, raising :class:`EventError` with a message naming the
problem.  Unknown extra elements in ``<event>`` are ignored (forward
compatibility); a repeated known element is an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from lxml import etree

from dsmt.transports.psepr.channel import ChannelError, channel_problem, validate_channel
from dsmt.transports.xmlsafe import XmlSafetyError, check_depth, parse_xml

__all__ = [
    "EVENT_NS", "ATTRIBUTE_NS", "LEGACY_ATTRIBUTE_NS", "LEASE_NS", "MAX_EVENT_BYTES", "MAX_EVENT_DEPTH",
    "MAX_NAME_CHARS", "EventError", "Event", "AttributePayload", "LeasePayload", "OpaquePayload",
    "Payload", "parse_event", "event_to_xml", "canonical_payload_type",
]

EVENT_NS = "http://psepr.org/xs/event"
ATTRIBUTE_NS = "http://psepr.org/xs/payload/attribute"
#: The spelling reference 000 uses; accepted on input, never written.
LEGACY_ATTRIBUTE_NS = "http://psepr.org/ns/payload/attribute"
LEASE_NS = "http://psepr.org/xs/payload/lease"

#: Largest event accepted, in bytes of XML.  PsEPR events are small status
#: records (hundreds of bytes); 1 MiB leaves room for SOAP envelopes carried as
#: opaque payloads and equals NATS' default ``max_payload``, so an event that
#: passes here also fits the clustered backend.
MAX_EVENT_BYTES = 1024 * 1024
#: Deepest nesting accepted: an event is 4 levels deep; a signed SOAP envelope
#: inside an opaque payload reaches about 12.
MAX_EVENT_DEPTH = 32
#: Longest service or instance name, in characters (a DNS name is ≤ 253).
MAX_NAME_CHARS = 255
#: Longest payload type (a namespace URI) accepted in a lease filter.
MAX_TYPE_CHARS = 1024

_E = "{%s}" % EVENT_NS
_XML_CHARS = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class EventError(ValueError):
    """An event (bytes or fields) is not acceptable; the message names what is wrong."""


def canonical_payload_type(namespace: str | None) -> str | None:
    """Map the legacy attribute namespace to the wire one; anything else unchanged."""
    return ATTRIBUTE_NS if namespace == LEGACY_ATTRIBUTE_NS else namespace


def _check_text(what: str, text: str, *, max_chars: int | None = None) -> str:
    if not isinstance(text, str):
        raise EventError(f"{what} must be text, not {type(text).__name__}")
    if max_chars is not None and len(text) > max_chars:
        raise EventError(f"{what} is longer than {max_chars} characters")
    bad = _XML_CHARS.search(text)
    if bad:
        raise EventError(f"{what} contains a character XML cannot carry: U+{ord(bad.group()):04X}")
    return text


def _check_name(what: str, name: str | None) -> str | None:
    if name is None:
        return None
    _check_text(what, name, max_chars=MAX_NAME_CHARS)
    if not name or name != name.strip():
        raise EventError(f"{what} {name!r} must be non-empty without surrounding whitespace")
    return name


@dataclass(frozen=True, slots=True)
class AttributePayload:
    """A named value: ``field`` = ``value``, valid for ``expire`` seconds if given."""

    field: str
    value: str
    expire: int | None = None
    namespace = ATTRIBUTE_NS

    def __post_init__(self):
        _check_text("attribute field", self.field, max_chars=MAX_NAME_CHARS)
        if not self.field:
            raise EventError("attribute field is empty")
        _check_text("attribute value", self.value)
        if self.expire is not None and (not isinstance(self.expire, int) or self.expire < 0):
            raise EventError(f"attribute expire must be a non-negative integer, not {self.expire!r}")


LEASE_OPS = ("register", "unregister")


@dataclass(frozen=True, slots=True)
class LeasePayload:
    """A lease request (or, from the router, a grant): ``identifier`` is chosen by the client.

    ``payload_type`` (dsmt's optional ``<type>`` element) restricts the lease
    to events of that payload namespace; absent, the lease receives every type.
    """

    identifier: str
    duration: int
    op: str = "register"
    payload_type: str | None = None
    namespace = LEASE_NS

    def __post_init__(self):
        _check_text("lease identifier", self.identifier, max_chars=MAX_NAME_CHARS)
        if not self.identifier:
            raise EventError("lease identifier is empty")
        if not isinstance(self.duration, int) or self.duration < 0:
            raise EventError(f"lease duration must be a non-negative integer of seconds, not {self.duration!r}")
        if self.op not in LEASE_OPS:
            raise EventError(f"lease op must be one of {', '.join(LEASE_OPS)}, not {self.op!r}")
        if self.payload_type is not None:
            _check_text("lease type", self.payload_type, max_chars=MAX_TYPE_CHARS)
            if not self.payload_type:
                raise EventError("lease type is empty")


@dataclass(frozen=True, slots=True)
class OpaquePayload:
    """Any other payload type: its namespace and the serialised ``<payload>`` element.

    Build one from XML with :meth:`from_xml`; ``xml`` always holds one
    ``<payload>`` element in ``namespace``.
    """

    namespace: str
    xml: bytes

    def __post_init__(self):
        if not isinstance(self.xml, bytes):
            raise EventError(f"opaque payload must be bytes of XML, not {type(self.xml).__name__}")
        parsed = OpaquePayload.from_xml(self.xml)
        if parsed.namespace != self.namespace:
            raise EventError(f"opaque payload is in namespace {parsed.namespace!r}, not {self.namespace!r}")

    @classmethod
    def from_xml(cls, data: bytes) -> "OpaquePayload":
        """Parse (safely) a ``<payload xmlns="TYPE">…</payload>`` document."""
        try:
            element = parse_xml(data, max_bytes=MAX_EVENT_BYTES, max_depth=MAX_EVENT_DEPTH - 2, what="payload")
        except XmlSafetyError as exc:
            raise EventError(str(exc)) from None
        return _opaque_from_element(element)

    def element(self):
        """The payload as an lxml element (parsed again, safely)."""
        return parse_xml(self.xml, max_bytes=MAX_EVENT_BYTES, what="payload")


Payload = Union[AttributePayload, LeasePayload, OpaquePayload]


@dataclass(frozen=True, slots=True)
class Event:
    """One PsEPR event.  Fields are validated on construction."""

    channel: str
    payload: Payload
    to_service: str | None = None
    to_instance: str | None = None
    from_service: str | None = None
    from_instance: str | None = None

    def __post_init__(self):
        try:
            validate_channel(self.channel)
        except ChannelError as exc:
            raise EventError(str(exc)) from None
        if not isinstance(self.payload, (AttributePayload, LeasePayload, OpaquePayload)):
            raise EventError(f"payload must be an attribute, lease or opaque payload, not {type(self.payload).__name__}")
        _check_name("to/service", self.to_service)
        _check_name("to/instance", self.to_instance)
        _check_name("from/service", self.from_service)
        _check_name("from/instance", self.from_instance)

    @property
    def payload_type(self) -> str:
        return self.payload.namespace

    @classmethod
    def attribute(cls, channel: str, field: str, value: str, *, expire: int | None = None, **addressing) -> "Event":
        """Shortcut for the common case: an attribute event."""
        return cls(channel, AttributePayload(field, value, expire), **addressing)


# ---------------------------------------------------------------- parsing

def parse_event(data: bytes, *, max_bytes: int = MAX_EVENT_BYTES) -> Event:
    """Parse an ``<event>`` document, or a ``<message>`` wrapping one, into an :class:`Event`.

    This is every subscriber's per-event cost, so it walks each element's
    children once and trusts what the parser already guarantees (XML
    characters); the channel and name rules are still checked.  Depth is
    checked only inside opaque payloads: the known parts have a fixed shape.
    """
    try:
        root = parse_xml(data, max_bytes=max_bytes, max_depth=None, what="event")
    except XmlSafetyError as exc:
        raise EventError(str(exc)) from None
    return event_from_element(root)


def event_from_element(root) -> Event:
    """Build an :class:`Event` from an already (safely) parsed ``<event>`` or ``<message>`` element."""
    if root.tag != _E + "event":
        if etree.QName(root).localname != "message":
            raise EventError(f"expected <event xmlns={EVENT_NS!r}>, found <{root.tag}>")
        events = root.findall(_E + "event")
        if len(events) != 1:
            raise EventError(f"a message must carry exactly one event, found {len(events)}")
        root = events[0]
    parts = _children(root, _E, ("to", "from", "payload"), "event", any_namespace="payload")
    to = parts.get("to")
    if to is None:
        raise EventError("<event> has no <to>")
    payload = parts.get("payload")
    if payload is None:
        raise EventError("an event must carry exactly one <payload>, found 0")
    address = _children(to, _E, ("channel", "service", "instance"), "to")
    if "channel" not in address:
        raise EventError("<to> has no <channel>")
    channel = _text(address["channel"])
    if channel is None:
        raise EventError("to/channel is empty")
    sender = _children(parts["from"], _E, ("service", "instance"), "from") if "from" in parts else {}
    return _parsed_event(channel, _payload_from_element(payload), _text(address.get("service")),
                         _text(address.get("instance")), _text(sender.get("service")),
                         _text(sender.get("instance")))


def _children(parent, prefix: str, names: tuple[str, ...], where: str, *, any_namespace: str | None = None) -> dict:
    """The children of ``parent`` named ``prefix + name`` for each name, in one pass; a repeat is an error.

    ``any_namespace`` names the one child accepted in any namespace (the payload).
    """
    found = {}
    for child in parent:
        tag = child.tag
        if not isinstance(tag, str):
            continue
        if tag.startswith(prefix):
            name = tag[len(prefix):]
        elif any_namespace is not None and (tag == any_namespace or tag.endswith("}" + any_namespace)):
            name = any_namespace
        else:
            continue
        if name in names:
            if name in found:
                if name == any_namespace:
                    raise EventError(f"an event must carry exactly one <{name}>, found more")
                raise EventError(f"<{where}> has more than one <{name}>; at most one is allowed")
            found[name] = child
    return found


def _parsed_event(channel: str, payload: "Payload", to_service, to_instance, from_service, from_instance) -> Event:
    """An :class:`Event` from parsed parts: the channel and name rules are checked; XML characters need not be."""
    problem = channel_problem(channel)
    if problem is not None:
        raise EventError(problem)
    for what, name in (("to/service", to_service), ("to/instance", to_instance),
                       ("from/service", from_service), ("from/instance", from_instance)):
        if name is not None and len(name) > MAX_NAME_CHARS:
            raise EventError(f"{what} is longer than {MAX_NAME_CHARS} characters")
    event = object.__new__(Event)
    for attribute, value in (("channel", channel), ("payload", payload), ("to_service", to_service),
                             ("to_instance", to_instance), ("from_service", from_service),
                             ("from_instance", from_instance)):
        object.__setattr__(event, attribute, value)
    return event


def _text(element) -> str | None:
    """Stripped text of a leaf element; None when absent or empty."""
    if element is None:
        return None
    if len(element):
        raise EventError(f"<{etree.QName(element).localname}> must hold text, not elements")
    text = (element.text or "").strip()
    return text or None


def _payload_from_element(payload) -> Payload:
    namespace = etree.QName(payload).namespace
    if not namespace or namespace == EVENT_NS:
        raise EventError("<payload> has no namespace of its own; its namespace is its type")
    p = "{%s}" % namespace
    namespace = canonical_payload_type(namespace)
    if namespace == ATTRIBUTE_NS:
        fields = _children(payload, p, ("field", "value", "expire"), "payload")
        if "field" not in fields:
            raise EventError("<payload> has no <field>")
        if "value" not in fields:
            raise EventError("<payload> has no <value>")
        field = _text(fields["field"])
        if field is None:
            raise EventError("attribute field is empty")
        if len(field) > MAX_NAME_CHARS:
            raise EventError(f"attribute field is longer than {MAX_NAME_CHARS} characters")
        value_element = fields["value"]
        if len(value_element):
            raise EventError("<value> must hold text, not elements")
        attribute = object.__new__(AttributePayload)  # parsed: the parser guaranteed XML characters
        object.__setattr__(attribute, "field", field)
        object.__setattr__(attribute, "value", value_element.text or "")
        object.__setattr__(attribute, "expire", _int(_text(fields.get("expire")), "attribute expire"))
        return attribute
    if namespace == LEASE_NS:
        fields = _children(payload, p, ("identifier", "duration", "op", "type"), "payload")
        for required in ("identifier", "duration"):
            if required not in fields:
                raise EventError(f"<payload> has no <{required}>")
        identifier = _text(fields["identifier"])
        if identifier is None:
            raise EventError("lease identifier is empty")
        duration = _int(_text(fields["duration"]), "lease duration")
        if duration is None:
            raise EventError("lease duration is empty")
        return LeasePayload(identifier, duration, _text(fields.get("op")) or "register", _text(fields.get("type")))
    try:
        check_depth(payload, MAX_EVENT_DEPTH - 2, "payload")
    except XmlSafetyError as exc:
        raise EventError(str(exc)) from None
    return _opaque_from_element(payload)


def _opaque_from_element(element) -> OpaquePayload:
    if etree.QName(element).localname != "payload":
        raise EventError(f"expected a <payload> element, found <{etree.QName(element).localname}>")
    namespace = etree.QName(element).namespace
    if not namespace:
        raise EventError("<payload> has no namespace; its namespace is its type")
    if canonical_payload_type(namespace) in (ATTRIBUTE_NS, LEASE_NS):
        raise EventError(f"payload type {namespace} has its own structure; it cannot be opaque")
    payload = object.__new__(OpaquePayload)  # already parsed and checked: skip __post_init__'s second parse
    object.__setattr__(payload, "namespace", namespace)
    object.__setattr__(payload, "xml", etree.tostring(element, with_tail=False))
    return payload


def _int(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise EventError(f"{what} must be a non-negative integer, not {text[:40]!r}")
    return int(text)


# ---------------------------------------------------------------- building

def _escape(text: str) -> str:
    """Escape text content; CR becomes a character reference so XML's newline normalisation keeps it."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")


def _leaf(tag: str, text: str | None) -> str:
    return "" if text is None else f"<{tag}>{_escape(text)}</{tag}>"


def _payload_xml(payload: Payload) -> str:
    if isinstance(payload, AttributePayload):
        expire = "" if payload.expire is None else f"<expire>{payload.expire}</expire>"
        return (f'<payload xmlns="{ATTRIBUTE_NS}"><field>{_escape(payload.field)}</field>'
                f"<value>{_escape(payload.value)}</value>{expire}</payload>")
    if isinstance(payload, LeasePayload):
        return (f'<payload xmlns="{LEASE_NS}"><duration>{payload.duration}</duration>'
                f"<identifier>{_escape(payload.identifier)}</identifier><op>{payload.op}</op>"
                f"{_leaf('type', payload.payload_type)}</payload>")
    return payload.xml.decode("utf-8")


def event_to_xml(event: Event) -> bytes:
    """Serialise an event as a compact ``<event>`` document (UTF-8, no XML declaration)."""
    sender = ""
    if event.from_service is not None or event.from_instance is not None:
        sender = f"<from>{_leaf('service', event.from_service)}{_leaf('instance', event.from_instance)}</from>"
    return (
        f'<event xmlns="{EVENT_NS}"><to><channel>{_escape(event.channel)}</channel>'
        f"{_leaf('service', event.to_service)}{_leaf('instance', event.to_instance)}</to>"
        f"{sender}{_payload_xml(event.payload)}</event>"
    ).encode("utf-8")

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

import copy
import functools
from dataclasses import dataclass, field
from typing import Union

from lxml import etree

from dsmt.transports.psepr.channel import ChannelError, channel_problem, validate_channel
from dsmt.transports.xmlsafe import NOT_XML_CHAR, XmlSafetyError, check_depth, escape_text, parse_xml, split_tag

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


class EventError(ValueError):
    """An event (bytes or fields) is not acceptable; the message names what is wrong."""


def canonical_payload_type(namespace: str | None) -> str | None:
    """Map the legacy attribute namespace to the wire one; anything else unchanged."""
    return ATTRIBUTE_NS if namespace == LEGACY_ATTRIBUTE_NS else namespace


def _check_text(what: str, text: str, *, max_chars: int | None = None) -> str:
    if not isinstance(text, str):
        raise EventError(f"{what} must be text, not {type(text).__name__}")
    problem = _text_problem(text, max_chars)
    if problem is not None:
        raise EventError(f"{what} {problem}")
    return text


def _text_problem(text: str, max_chars: int | None) -> str | None:
    """What makes ``text`` unusable in an event (too long, a character XML cannot carry), or None."""
    if max_chars is not None and len(text) > max_chars:
        return f"is longer than {max_chars} characters"
    bad = NOT_XML_CHAR.search(text)
    if bad:
        return f"contains a character XML cannot carry: U+{ord(bad.group()):04X}"
    return None


def _check_name(what: str, name: str | None) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise EventError(f"{what} must be text, not {type(name).__name__}")
    problem = _name_problem(name)
    if problem is not None:
        raise EventError(f"{what} {problem}")
    return name


@functools.lru_cache(maxsize=4096)
def _name_problem(name: str) -> str | None:
    """What makes a service or instance name unusable, or None (cached: the same few names recur in every
    event a connection sends)."""
    problem = _text_problem(name, MAX_NAME_CHARS)
    if problem is None and (not name or name != name.strip()):
        problem = f"{name!r} must be non-empty without surrounding whitespace"
    return problem


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
    #: The received element (see :meth:`parsed_element`); not part of the value.
    _parsed: object = field(default=None, init=False, repr=False, compare=False, hash=False)

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

    @classmethod
    def built(cls, namespace: str, xml: bytes) -> "OpaquePayload":
        """A payload whose ``xml`` a builder of this package wrote itself, well-formed by construction: not
        parsed again (the constructor's check is one safe parse).  Callers own that promise; the
        receiving side parses it as any other."""
        payload = object.__new__(cls)
        object.__setattr__(payload, "namespace", namespace)
        object.__setattr__(payload, "xml", xml)
        object.__setattr__(payload, "_parsed", None)
        return payload

    def element(self):
        """The payload as an lxml element (parsed again, safely)."""
        return parse_xml(self.xml, max_bytes=MAX_EVENT_BYTES, what="payload")

    def parsed_element(self):
        """The element this payload was read from when it was received (taken: a second call, or a payload
        built locally, gets None) — so one reader can skip parsing :attr:`xml` again.  It came from the
        event parser's safe parse (size and depth limits applied)."""
        element = self._parsed
        object.__setattr__(self, "_parsed", None)
        return element


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
        channel = self.channel
        if channel.__class__ is not str or channel_problem(channel) is not None:  # cached: channels recur
            try:
                validate_channel(channel)
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

    def with_sender(self, service: str | None, instance: str | None) -> "Event":
        """This event with ``from/service`` and ``from/instance`` set (checked like the constructor's, EventError);
        the other fields were checked when this event was made, so they are copied as they are — what
        ``dataclasses.replace`` gives, without its second pass over every field (a sender's hot path)."""
        _check_name("from/service", service)
        _check_name("from/instance", instance)
        event = _new(Event)
        _SET_CHANNEL(event, self.channel)
        _SET_PAYLOAD(event, self.payload)
        _SET_TO_SERVICE(event, self.to_service)
        _SET_TO_INSTANCE(event, self.to_instance)
        _SET_FROM_SERVICE(event, service)
        _SET_FROM_INSTANCE(event, instance)
        return event

    @classmethod
    def attribute(cls, channel: str, field: str, value: str, *, expire: int | None = None, **addressing) -> "Event":
        """Shortcut for the common case: an attribute event."""
        return cls(channel, AttributePayload(field, value, expire), **addressing)


# ---------------------------------------------------------------- parsing

def parse_event(data: bytes, *, max_bytes: int = MAX_EVENT_BYTES) -> Event:
    """Parse an ``<event>`` document, or a ``<message>`` wrapping one, into an :class:`Event`.

    This is every subscriber's per-event cost, so it walks each element's
    children once and trusts what the parser already guarantees (XML
    characters); the channel and name rules are still checked.  The depth
    limit (:data:`MAX_EVENT_DEPTH`, the whole tree) costs next to nothing: the
    known parts have a fixed shape, so only an opaque payload and the unused
    elements that have children of their own are walked for it.
    """
    try:
        root = parse_xml(data, max_bytes=max_bytes, max_depth=None, what="event")
    except XmlSafetyError as exc:
        raise EventError(str(exc)) from None
    return event_from_element(root, max_depth=MAX_EVENT_DEPTH)


_EVENT = _E + "event"
_TO, _FROM = _E + "to", _E + "from"
_CHANNEL, _SERVICE, _INSTANCE = _E + "channel", _E + "service", _E + "instance"
_ATTRIBUTE_PAYLOAD = "{%s}payload" % ATTRIBUTE_NS
_LEGACY_ATTRIBUTE_PAYLOAD = "{%s}payload" % LEGACY_ATTRIBUTE_NS
_LEASE_PAYLOAD = "{%s}payload" % LEASE_NS
#: Element names of an attribute payload's parts, per spelling of its namespace.
_ATTRIBUTE_PARTS = {
    payload_tag: {payload_tag[:-len("payload")] + name: name for name in ("field", "value", "expire")}
    for payload_tag in (_ATTRIBUTE_PAYLOAD, _LEGACY_ATTRIBUTE_PAYLOAD)}
_LEASE_PARTS = {"{%s}%s" % (LEASE_NS, name): name for name in ("identifier", "duration", "op", "type")}
#: Depth of the deepest known part (message/event/to/channel): a ``max_depth`` below it is checked the slow way.
_KNOWN_DEPTH = 4

# Parsed parts are stored straight into the frozen, slotted dataclasses (their
# checks are for values built by hand; the parser already guaranteed XML
# characters and the code below checks the rest): one slot store each.
_new = object.__new__
_SET_CHANNEL, _SET_PAYLOAD, _SET_TO_SERVICE, _SET_TO_INSTANCE, _SET_FROM_SERVICE, _SET_FROM_INSTANCE = (
    Event.__dict__[name].__set__
    for name in ("channel", "payload", "to_service", "to_instance", "from_service", "from_instance"))
_SET_FIELD, _SET_VALUE, _SET_EXPIRE = (AttributePayload.__dict__[name].__set__ for name in ("field", "value", "expire"))


def event_from_element(root, *, max_depth: int | None = None) -> Event:
    """Build an :class:`Event` from an already (safely) parsed ``<event>`` or ``<message>`` element.

    ``max_depth`` (``root`` counts as 1), when given, bounds the whole tree:
    elements the event does not use are checked too, so an event returned
    comes from a tree at most that deep.  Without it only an opaque payload's
    depth is checked (at most ``MAX_EVENT_DEPTH - 2`` levels).
    """
    if max_depth is not None and max_depth < _KNOWN_DEPTH:
        try:
            check_depth(root, max_depth, "event")
        except XmlSafetyError as exc:
            raise EventError(str(exc)) from None
    level = 1  # of the <event> element
    tag = root.tag
    if tag != _EVENT:
        if tag.__class__ is not str or tag.rpartition("}")[2] != "message":
            raise EventError(f"expected <event xmlns={EVENT_NS!r}>, found <{tag}>")
        event = None
        count = 0
        for child in root:
            if child.tag == _EVENT:
                event = child
                count += 1
            elif max_depth is not None and len(child):
                _check_unused(child, 2, max_depth)
        if count != 1:
            raise EventError(f"a message must carry exactly one event, found {count}")
        root = event
        level = 2
    to = sender = payload = None
    for child in root:
        tag = child.tag
        if tag == _TO:
            if to is not None:
                raise EventError("<event> has more than one <to>; at most one is allowed")
            to = child
        elif tag == _FROM:
            if sender is not None:
                raise EventError("<event> has more than one <from>; at most one is allowed")
            sender = child
        elif tag.__class__ is str and (tag.endswith("}payload") or tag == "payload"):  # any namespace: its type
            if payload is not None:
                raise EventError("an event must carry exactly one <payload>, found more")
            payload = child
        elif max_depth is not None and len(child):
            _check_unused(child, level + 1, max_depth)
    if to is None:
        raise EventError("<event> has no <to>")
    if payload is None:
        raise EventError("an event must carry exactly one <payload>, found 0")
    # Leaves are read as they are met (this is the hot path: no call per leaf).
    channel = to_service = to_instance = from_service = from_instance = None  # their texts
    seen = 0
    for child in to:
        tag = child.tag
        if tag == _CHANNEL:
            if seen & 1:
                raise EventError("<to> has more than one <channel>; at most one is allowed")
            seen |= 1
            if len(child):
                raise EventError("<channel> must hold text, not elements")
            text = child.text
            channel = (text.strip() or None) if text else None
        elif tag == _SERVICE:
            if seen & 2:
                raise EventError("<to> has more than one <service>; at most one is allowed")
            seen |= 2
            if len(child):
                raise EventError("<service> must hold text, not elements")
            text = child.text
            to_service = (text.strip() or None) if text else None
        elif tag == _INSTANCE:
            if seen & 4:
                raise EventError("<to> has more than one <instance>; at most one is allowed")
            seen |= 4
            if len(child):
                raise EventError("<instance> must hold text, not elements")
            text = child.text
            to_instance = (text.strip() or None) if text else None
        elif max_depth is not None and len(child):
            _check_unused(child, level + 2, max_depth)
    if not seen & 1:
        raise EventError("<to> has no <channel>")
    if channel is None:
        raise EventError("to/channel is empty")
    if sender is not None:
        seen = 0
        for child in sender:
            tag = child.tag
            if tag == _SERVICE:
                if seen & 1:
                    raise EventError("<from> has more than one <service>; at most one is allowed")
                seen |= 1
                if len(child):
                    raise EventError("<service> must hold text, not elements")
                text = child.text
                from_service = (text.strip() or None) if text else None
            elif tag == _INSTANCE:
                if seen & 2:
                    raise EventError("<from> has more than one <instance>; at most one is allowed")
                seen |= 2
                if len(child):
                    raise EventError("<instance> must hold text, not elements")
                text = child.text
                from_instance = (text.strip() or None) if text else None
            elif max_depth is not None and len(child):
                _check_unused(child, level + 2, max_depth)
    return _parsed_event(channel, _payload_from_element(payload, level + 1, max_depth), to_service, to_instance,
                         from_service, from_instance)


def _check_unused(element, level: int, max_depth: int) -> None:
    """``element``, at ``level``, is not part of the event; still, nothing below it may pass ``max_depth``."""
    try:
        check_depth(element, max_depth - level + 1)
    except XmlSafetyError:
        raise EventError(f"event is nested deeper than {max_depth} elements") from None


def _parsed_event(channel: str, payload: "Payload", to_service, to_instance, from_service, from_instance) -> Event:
    """An :class:`Event` from parsed parts: the channel and name rules are checked; XML characters need not be."""
    problem = channel_problem(channel)
    if problem is not None:
        raise EventError(problem)
    if ((to_service is not None and len(to_service) > MAX_NAME_CHARS)
            or (to_instance is not None and len(to_instance) > MAX_NAME_CHARS)
            or (from_service is not None and len(from_service) > MAX_NAME_CHARS)
            or (from_instance is not None and len(from_instance) > MAX_NAME_CHARS)):
        for what, name in (("to/service", to_service), ("to/instance", to_instance),
                           ("from/service", from_service), ("from/instance", from_instance)):
            if name is not None and len(name) > MAX_NAME_CHARS:
                raise EventError(f"{what} is longer than {MAX_NAME_CHARS} characters")
    event = _new(Event)
    _SET_CHANNEL(event, channel)
    _SET_PAYLOAD(event, payload)
    _SET_TO_SERVICE(event, to_service)
    _SET_TO_INSTANCE(event, to_instance)
    _SET_FROM_SERVICE(event, from_service)
    _SET_FROM_INSTANCE(event, from_instance)
    return event


def _text(element) -> str | None:
    """Stripped text of a leaf element; None when absent or empty."""
    if element is None:
        return None
    if len(element):
        raise EventError(f"<{etree.QName(element).localname}> must hold text, not elements")
    text = element.text
    return (text.strip() or None) if text else None


def _payload_from_element(payload, level: int = 2, max_depth: int | None = None) -> Payload:
    """The payload at ``level`` (see :func:`event_from_element` for ``max_depth``)."""
    tag = payload.tag
    parts = _ATTRIBUTE_PARTS.get(tag)
    if parts is not None:
        field = value = expire = None
        seen = 0
        for child in payload:
            name = parts.get(child.tag)
            if name is None:
                if max_depth is not None and len(child):
                    _check_unused(child, level + 1, max_depth)
                continue
            if name == "value":
                if seen & 2:
                    raise EventError("<payload> has more than one <value>; at most one is allowed")
                seen |= 2
                if len(child):
                    raise EventError("<value> must hold text, not elements")
                value = child.text or ""  # not stripped: a value is kept as sent
                continue
            bit = 1 if name == "field" else 4
            if seen & bit:
                raise EventError(f"<payload> has more than one <{name}>; at most one is allowed")
            seen |= bit
            if len(child):
                raise EventError(f"<{name}> must hold text, not elements")
            text = child.text
            text = (text.strip() or None) if text else None
            if bit == 1:
                field = text
            else:
                expire = _int(text, "attribute expire")
        if not seen & 1:
            raise EventError("<payload> has no <field>")
        if not seen & 2:
            raise EventError("<payload> has no <value>")
        if field is None:
            raise EventError("attribute field is empty")
        if len(field) > MAX_NAME_CHARS:
            raise EventError(f"attribute field is longer than {MAX_NAME_CHARS} characters")
        attribute = _new(AttributePayload)  # parsed: the parser guaranteed XML characters
        _SET_FIELD(attribute, field)
        _SET_VALUE(attribute, value)
        _SET_EXPIRE(attribute, expire)
        return attribute
    if tag == _LEASE_PAYLOAD:
        fields = {}
        for child in payload:
            name = _LEASE_PARTS.get(child.tag)
            if name is not None:
                if name in fields:
                    raise EventError(f"<payload> has more than one <{name}>; at most one is allowed")
                fields[name] = child
            elif max_depth is not None and len(child):
                _check_unused(child, level + 1, max_depth)
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
    namespace = split_tag(tag)[0]
    if not namespace or namespace == EVENT_NS:
        raise EventError("<payload> has no namespace of its own; its namespace is its type")
    limit = MAX_EVENT_DEPTH - 2
    if max_depth is not None:
        limit = min(limit, max_depth - level + 1)
    try:
        check_depth(payload, limit, "payload")
    except XmlSafetyError as exc:
        raise EventError(str(exc)) from None
    return _opaque_from_element(payload)


def _opaque_from_element(element) -> OpaquePayload:
    namespace, local = split_tag(element.tag)
    if local != "payload":
        raise EventError(f"expected a <payload> element, found <{local}>")
    if not namespace:
        raise EventError("<payload> has no namespace; its namespace is its type")
    if canonical_payload_type(namespace) in (ATTRIBUTE_NS, LEASE_NS):
        raise EventError(f"payload type {namespace} has its own structure; it cannot be opaque")
    if element.getparent() is not None:
        # Serialised alone, an element carries every namespace declared around it (inside a
        # stream: the stream's own); a copy keeps only those it uses, and its own declarations.
        element = copy.deepcopy(element)
    payload = object.__new__(OpaquePayload)  # already parsed and checked: skip __post_init__'s second parse
    object.__setattr__(payload, "namespace", namespace)
    object.__setattr__(payload, "xml", etree.tostring(element, with_tail=False))
    # The parsed element, detached, for a reader of this payload type (SOAP over PsEPR) that would otherwise
    # parse ``xml`` again: parsed_element() hands it out once.  Not part of the value (equality, repr).
    object.__setattr__(payload, "_parsed", element)
    return payload


def _int(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise EventError(f"{what} must be a non-negative integer, not {text[:40]!r}")
    return int(text)


# ---------------------------------------------------------------- building

def _leaf(tag: str, text: str | None) -> str:
    return "" if text is None else f"<{tag}>{escape_text(text)}</{tag}>"


def _payload_xml(payload: Payload) -> str:
    if isinstance(payload, AttributePayload):
        expire = "" if payload.expire is None else f"<expire>{payload.expire}</expire>"
        return (f'<payload xmlns="{ATTRIBUTE_NS}"><field>{escape_text(payload.field)}</field>'
                f"<value>{escape_text(payload.value)}</value>{expire}</payload>")
    if isinstance(payload, LeasePayload):
        return (f'<payload xmlns="{LEASE_NS}"><duration>{payload.duration}</duration>'
                f"<identifier>{escape_text(payload.identifier)}</identifier><op>{payload.op}</op>"
                f"{_leaf('type', payload.payload_type)}</payload>")
    return payload.xml.decode("utf-8")


def event_to_xml(event: Event) -> bytes:
    """Serialise an event as a compact ``<event>`` document (UTF-8, no XML declaration)."""
    head = _event_head(event.channel, event.to_service, event.to_instance, event.from_service, event.from_instance)
    payload = event.payload
    if payload.__class__ is OpaquePayload:  # already bytes: no decoding and encoding again
        xml = payload.xml
        if not xml.isascii():
            xml.decode("utf-8")  # refused as before when it is not UTF-8
        return head + xml + b"</event>"
    return head + _payload_xml(payload).encode("utf-8") + b"</event>"


@functools.lru_cache(maxsize=1024)
def _event_head(channel: str, to_service, to_instance, from_service, from_instance) -> bytes:
    """``<event …><to>…</to><from>…</from>``: a connection sends to and from the same few addresses, so each
    combination is escaped and encoded once."""
    sender = ""
    if from_service is not None or from_instance is not None:
        sender = f"<from>{_leaf('service', from_service)}{_leaf('instance', from_instance)}</from>"
    return (f'<event xmlns="{EVENT_NS}"><to><channel>{escape_text(channel)}</channel>'
            f"{_leaf('service', to_service)}{_leaf('instance', to_instance)}</to>{sender}").encode("utf-8")

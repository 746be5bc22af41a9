"""The PsEPR stream codec: the XMPP-style framing of the original clients (pure, no I/O).

A connection carries one XML document per direction: a stream header
(``<stream:stream xmlns="jabber:client" …>``), then top-level children
("stanzas": a legacy XEP-0078 ``jabber:iq:auth`` login, then ``<message>``
stanzas each carrying one PsEPR ``<event>``), then ``</stream:stream>``.

:class:`StreamParser` turns received bytes into :class:`StreamOpened`,
:class:`Stanza` and :class:`StreamClosed` items in one pass of expat.  Each
stanza's ``raw`` is exactly the bytes received for it, so the router forwards
them without re-serialising, and a message's routing header
(:class:`RouteHeader`) is collected in that same pass.  A message in the
*canonical form* this package writes (``wrap_message(event_to_xml(…))``, see
:data:`_CANONICAL_MESSAGE`) that arrives whole between stanzas is recognised
by one regular expression instead (about a third of expat's cost, whose
Python callbacks dominate); the form is a fixed grammar of well-formed XML,
so what it accepts expat would accept too, with the same items — anything
else, or anything in doubt, goes to expat.  The builders below
produce the bytes of the other direction; :func:`parse_auth` reads a login.

Safety contract of the parser: no DOCTYPE (hence no entity declarations and no
entity expansion), no processing instructions or comments (RFC 6120 §11.1), no
encoding but UTF-8, no external resources ever; only the ``stream`` prefix and
the ``jabber:client`` default namespace may be declared by the stream header,
so a stanza's bytes mean the same inside any other PsEPR stream; and every
limit below holds while bytes arrive, so memory stays bounded by the stanza
limit plus one feed slice whatever the peer sends.  Violations raise
:class:`StreamError` carrying an RFC 6120 stream error condition.
"""
from __future__ import annotations

import functools
import re
from typing import NamedTuple, Union
from xml.parsers import expat

from dsmt.transports.xmlsafe import XmlSafetyError, parse_xml

__all__ = [
    "NS_CLIENT", "NS_STREAMS", "NS_STREAM_ERRORS", "NS_STANZA_ERRORS", "NS_AUTH", "NS_EXPIRE", "NS_EVENT",
    "MAX_EVENT_BYTES", "MESSAGE_WRAPPER_BYTES", "MAX_STANZA_BYTES", "MAX_DEPTH", "MAX_HEADER_BYTES",
    "MAX_CHANNEL_BYTES", "MAX_NAME_BYTES", "FEED_SLICE_BYTES", "MAX_TOKEN_BYTES",
    "MAX_AUTH_BYTES", "STREAM_ERROR_CONDITIONS",
    "StreamError", "StreamOpened", "Stanza", "StreamClosed", "StreamItem", "RouteHeader", "AuthRequest",
    "StreamParser",
    "STREAM_CLOSE", "stream_header", "auth_request", "auth_fields_request", "auth_result",
    "auth_fields_result", "auth_error", "stream_error", "error_message", "wrap_message", "parse_auth",
    "STREAM_ERROR_NAME", "IqInfo", "ping_request", "iq_error", "parse_iq", "is_error_message",
    "parse_error_message", "parse_stream_error",
]

NS_CLIENT = "jabber:client"
NS_STREAMS = "http://etherx.jabber.org/streams"
NS_STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
NS_STANZA_ERRORS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_AUTH = "jabber:iq:auth"
NS_EXPIRE = "jabber:x:expire"
NS_EVENT = "http://psepr.org/xs/event"

#: Largest PsEPR event, in bytes (the same figure as ``event.MAX_EVENT_BYTES``):
#: events are status records of hundreds of bytes; 1 MiB leaves room for SOAP
#: envelopes carried as opaque payloads.
MAX_EVENT_BYTES = 1024 * 1024
#: Room for the ``<message>`` wrapper around an event: the wrapper itself is
#: about 100 bytes; 8 KiB also covers long ``to``/``id`` attributes.
MESSAGE_WRAPPER_BYTES = 8 * 1024
#: Default largest stanza, in bytes from its ``<`` to its final ``>``
#: (1,056,768): a largest event in its wrapper.  Configurable per parser.
MAX_STANZA_BYTES = MAX_EVENT_BYTES + MESSAGE_WRAPPER_BYTES
#: Deepest element nesting, counting the stream element as 1: events reach 5
#: (stream/message/event/to/channel); a WS-Security-signed SOAP envelope in an
#: opaque payload reaches about 12.  32 leaves room for real documents while
#: refusing the deeply nested documents that only attacks produce.
MAX_DEPTH = 32
#: Largest stream opening (XML declaration, whitespace and the header tag):
#: real headers are about 200 bytes; 4 KiB allows long host names and extra
#: attributes yet bounds what is buffered before the peer has said who it is.
MAX_HEADER_BYTES = 4 * 1024
#: Largest ``to/channel`` text, in UTF-8 bytes: a channel is a path of names;
#: 1 KiB is far above real channels (~100 bytes) and the channel validator's limit.
MAX_CHANNEL_BYTES = 1024
#: Largest ``service``/``instance`` text, in UTF-8 bytes: services are account
#: names (≤ 255 characters) and instances host names (a DNS name is ≤ 253).
MAX_NAME_BYTES = 255
#: Input is handed to expat in slices of at most this many bytes, and the size
#: limits are checked after each: a peer sending one huge stanza in one large
#: ``feed`` is refused within this many bytes of crossing the limit.  64 KiB is
#: a typical socket read, so normal feeds are never split.
FEED_SLICE_BYTES = 64 * 1024
#: Largest unfinished piece of markup (a start tag with its attributes, say)
#: at the end of a feed.  expat scans such a token again on every feed, so a
#: peer trickling a huge tag byte by byte would cost time quadratic in its
#: size (CVE-2023-52425); real tags are well under 1 KiB, and 16 KiB bounds
#: that rescanning to milliseconds per stanza.  Text is reported as it comes
#: and never counts.
MAX_TOKEN_BYTES = 16 * 1024
#: Largest ``jabber:iq:auth`` request :func:`parse_auth` reads: a login is three
#: short fields (< 1 KiB); 8 KiB allows long passwords and resources.
MAX_AUTH_BYTES = 8 * 1024

#: The stream error conditions of RFC 6120 §4.9.3.
STREAM_ERROR_CONDITIONS = frozenset((
    "bad-format", "bad-namespace-prefix", "conflict", "connection-timeout", "host-gone", "host-unknown",
    "improper-addressing", "internal-server-error", "invalid-from", "invalid-namespace", "invalid-xml",
    "not-authorized", "not-well-formed", "policy-violation", "remote-connection-failed", "reset",
    "resource-constraint", "restricted-xml", "see-other-host", "system-shutdown", "undefined-condition",
    "unsupported-encoding", "unsupported-feature", "unsupported-stanza-type", "unsupported-version",
))


class StreamError(Exception):
    """The stream broke a rule; ``condition`` is an RFC 6120 stream error condition, ``text`` says what."""

    def __init__(self, condition: str, text: str):
        if condition not in STREAM_ERROR_CONDITIONS:
            raise ValueError(f"unknown stream error condition {condition!r}")
        super().__init__(f"{condition}: {text}")
        self.condition = condition
        self.text = text


class StreamOpened(NamedTuple):
    """The peer's stream header arrived.  ``attributes`` maps names (``{ns}local`` when namespaced) to values."""

    attributes: dict[str, str]


class RouteHeader(NamedTuple):
    """What the router needs from a ``<message>``'s event; each field a stripped string or ``None``.

    ``payload_type`` is the payload element's namespace as received.
    """

    channel: str | None
    to_service: str | None
    to_instance: str | None
    from_service: str | None
    from_instance: str | None
    payload_type: str | None


class Stanza(NamedTuple):
    """One top-level child of the stream.

    ``name`` is the local name for ``jabber:client`` elements (``"message"``,
    ``"iq"``, ``"presence"``) and ``{namespace}local`` otherwise (``{}local``
    without a namespace).  ``raw`` is exactly the bytes received, from the
    stanza's ``<`` to its final ``>``.  ``route`` is set for a ``<message>``
    whose child is a PsEPR ``<event>``.
    """

    name: str
    raw: bytes
    route: RouteHeader | None


class StreamClosed(NamedTuple):
    """The peer sent ``</stream:stream>``."""


StreamItem = Union[StreamOpened, Stanza, StreamClosed]


class AuthRequest(NamedTuple):
    """A ``jabber:iq:auth`` request; ``kind`` is ``"set"`` (log in) or ``"get"`` (which fields?).

    Fields absent or empty are ``None``; deciding what is missing is the caller's business.
    """

    iq_id: str
    kind: str
    username: str | None
    password: str | None
    resource: str | None


# ---------------------------------------------------------------- parsing

_SEP = " "  # expat's separator between namespace and local name ("uri local")
_STREAM = NS_STREAMS + _SEP + "stream"
_MESSAGE = NS_CLIENT + _SEP + "message"
_CLIENT_PREFIX = NS_CLIENT + _SEP
_XML_SPACE = " \t\r\n"  # XML's whitespace; str.strip() would also take Unicode spaces
_ENCODING_ERRORS = frozenset(expat.errors.codes[message] for message in (
    expat.errors.XML_ERROR_UNKNOWN_ENCODING, expat.errors.XML_ERROR_INCORRECT_ENCODING))

#: One start or empty-element tag from its ``<``; quoted attribute values may hold ``>`` and ``/``.
_TAG = re.compile(rb"""<[^'">]*(?:(?:"[^"]*"|'[^']*')[^'">]*)*>""")

#: C0 controls but tab and newline, for character classes: XML forbids them, and turns CR into a newline.
_C0 = rb"\x00-\x08\x0b-\x1f"
#: Text content the canonical form may hold: no markup, no C0 control (references are checked separately).
_CANONICAL_TEXT = rb"[^<" + _C0 + rb"]*"
#: A routing field's text: as above, without references (its bytes are its text).
_CANONICAL_FIELD = rb"([^<&" + _C0 + rb"]*)"
#: A double-quoted attribute value without references or whitespace that XML would normalise.
_CANONICAL_ATTRIBUTE = rb'"[^"<&\t\n' + _C0 + rb']*"'
#: A message in the canonical form: ``wrap_message(event_to_xml(event))`` for an event whose routing fields hold
#: no reference and whose payload is a sequence of text-only leaf elements without attributes (attribute and SOAP
#: payloads).  Every string it matches is one well-formed element, 5 levels deep counting the stream, in the
#: stream's default namespace, as long as the ``_NOT_CANONICAL_*`` checks find nothing in it and it is valid UTF-8
#: (checked separately: a character class cannot say it, and separate scans are much faster than alternatives
#: inside the expression).  Groups: channel, to/service, to/instance,
#: from/service, from/instance (raw bytes), payload namespace.
_CANONICAL_MESSAGE = re.compile(
    rb"<message(?: to=" + _CANONICAL_ATTRIBUTE + rb")?>"
    rb'(?:<x xmlns="jabber:x:expire" seconds="[0-9]{1,10}"/>)?'
    rb'<event xmlns="http://psepr\.org/xs/event">'
    rb"<to><channel>" + _CANONICAL_FIELD + rb"</channel>(?:<service>" + _CANONICAL_FIELD + rb"</service>)?"
    rb"(?:<instance>" + _CANONICAL_FIELD + rb"</instance>)?</to>"
    rb"(?:<from>(?:<service>" + _CANONICAL_FIELD + rb"</service>)?(?:<instance>" + _CANONICAL_FIELD
    + rb"</instance>)?</from>)?"
    rb"<payload xmlns=(" + _CANONICAL_ATTRIBUTE + rb")>"
    rb"(?:<([A-Za-z_][A-Za-z0-9_.\-]{0,63})>" + _CANONICAL_TEXT + rb"</\7>)*"
    rb"</payload></event></message>")
#: What the canonical form's character classes let through but XML forbids: a reference other than the ones this
#: package writes (``&#0;`` is not XML, an entity may be undefined); :func:`_canonical_route` also refuses
#: ``]]>`` in text, bytes that are not UTF-8, and ``EF BF``, the start of U+FFFE/U+FFFF (even when it starts
#: another character: then expat decides).
_NOT_CANONICAL_REFERENCE = re.compile(rb"&(?!(?:amp|lt|gt|quot|apos|#13|#10|#9);)")
#: Whitespace between stanzas.
_STREAM_SPACE = re.compile(rb"[ \t\r\n]*")
#: Limits of the canonical form's routing fields, in the order of its groups.
_CANONICAL_LIMITS = (MAX_CHANNEL_BYTES, MAX_NAME_BYTES, MAX_NAME_BYTES, MAX_NAME_BYTES, MAX_NAME_BYTES)
#: Namespaces no default namespace declaration may name (expat refuses them).
_RESERVED_NAMESPACES = (b'"http://www.w3.org/XML/1998/namespace"', b'"http://www.w3.org/2000/xmlns/"')


class _Context:
    """A position on the path to the routing fields: message → event → to/from → field.

    ``level`` is the element depth (stream = 1).  ``children`` maps expat names
    of the elements that lead further; a *field* (``slot`` set) collects its
    text into ``RouteHeader[slot]`` and may not contain elements.  ``bit``
    marks the context as seen in the current stanza: a second one is a
    duplicate, which would let router and receivers disagree on the route.
    """

    __slots__ = ("label", "level", "child_depth", "parent", "children", "bit", "slot", "limit")

    def __init__(self, label: str, parent: _Context | None, bit: int = 0, slot: int | None = None,
                 limit: int = 0):
        self.label = label
        self.parent = parent
        self.level = 2 if parent is None else parent.level + 1
        self.child_depth = self.level + 1
        self.children: dict[str, _Context] = {}
        self.bit = bit
        self.slot = slot
        self.limit = limit
        if parent is not None:
            parent.children[NS_EVENT + _SEP + label] = self


_MESSAGE_CTX = _Context("message", None)
_EVENT_CTX = _Context("event", _MESSAGE_CTX, bit=1)
_TO_CTX = _Context("to", _EVENT_CTX, bit=2)
_FROM_CTX = _Context("from", _EVENT_CTX, bit=4)
_Context("channel", _TO_CTX, bit=8, slot=0, limit=MAX_CHANNEL_BYTES)
_Context("service", _TO_CTX, bit=16, slot=1, limit=MAX_NAME_BYTES)
_Context("instance", _TO_CTX, bit=32, slot=2, limit=MAX_NAME_BYTES)
_Context("service", _FROM_CTX, bit=64, slot=3, limit=MAX_NAME_BYTES)
_Context("instance", _FROM_CTX, bit=128, slot=4, limit=MAX_NAME_BYTES)
_PAYLOAD_BIT = 256
_PAYLOAD_SLOT = 5


class StreamParser:
    """Incremental parser of one received stream (h11-style: bytes in, items out, no I/O).

    :meth:`feed` returns, in order, one :class:`StreamOpened`, a
    :class:`Stanza` per top-level child, and :class:`StreamClosed`.  Limits:
    ``max_stanza_bytes`` (default :data:`MAX_STANZA_BYTES`), :data:`MAX_DEPTH`,
    :data:`MAX_HEADER_BYTES`, :data:`MAX_TOKEN_BYTES`, and
    :data:`MAX_CHANNEL_BYTES` / :data:`MAX_NAME_BYTES` for routing fields.
    Only the bytes of the stanza in progress are kept; whitespace between
    stanzas is dropped as it comes.  Text outside stanzas must be whitespace.

    A broken rule raises :class:`StreamError`; items of the failing ``feed``
    call are not returned (the stream is over: RFC 6120 stream errors are
    unrecoverable), and the parser is dead: every later ``feed`` raises the
    same error.

    Canonical messages (see the module) arriving whole between stanzas are
    taken without expat when ``fast_path`` is true (the default); the items
    are the same either way (tests compare both).  Expat does not see those
    bytes, so the line and column of a later expat error count from where it
    resumed.
    """

    def __init__(self, *, max_stanza_bytes: int = MAX_STANZA_BYTES, fast_path: bool = True):
        self.max_stanza_bytes = max_stanza_bytes
        self.fast_path = fast_path
        self._skipped = 0  # stream bytes not given to expat (canonical stanzas): stream offset = expat's + this
        self._items: list[StreamItem] = []
        self._error: StreamError | None = None
        self._buf = bytearray()     # received bytes from stream offset self._base on
        self._base = 0
        self._opened = False
        self._depth = 0
        self._stanza_start: int | None = None  # stream offset of the current stanza's "<"
        self._stanza_name = ""
        self._stanza_end: int | None = None    # its end offset if it is one empty-element tag "<x …/>"
        self._ctx: _Context | None = None
        self._seen = 0
        self._route_values: list[str | None] = []
        self._route: RouteHeader | None = None
        self._text = ""
        self._header_namespaces: dict[str | None, str] = {}
        self._field_text_handler = self._on_field_text  # bound once: installed for each routing field
        self._expat = self._new_expat()

    def _new_expat(self):
        """An expat parser forced to UTF-8, namespace-aware, with every handler the rules need."""
        parser = expat.ParserCreate("UTF-8", _SEP)
        parser.ordered_attributes = True
        parser.XmlDeclHandler = self._on_xml_decl
        parser.StartDoctypeDeclHandler = self._on_doctype
        parser.ProcessingInstructionHandler = self._on_pi
        parser.CommentHandler = self._on_comment
        parser.StartNamespaceDeclHandler = self._on_header_namespace
        parser.StartElementHandler = self._on_start
        parser.EndElementHandler = self._on_end
        parser.CharacterDataHandler = self._on_stream_text
        if hasattr(parser, "SetReparseDeferralEnabled"):
            # expat >= 2.6 may hold back an unfinished token until "enough" bytes
            # follow: a stanza completed by a short last segment would wait for
            # the next one.  MAX_TOKEN_BYTES bounds the rescanning instead.
            parser.SetReparseDeferralEnabled(False)
        return parser

    # ------------------------------------------------------------ feeding

    def feed(self, data: bytes) -> list[StreamItem]:
        """Parse the next received bytes (any chunking); return the items they complete, in order.

        Raises :class:`StreamError` when the stream breaks a rule (see the class).
        """
        if self._error is not None:
            raise self._error
        items = self._items = []
        view = memoryview(data)
        for start in range(0, len(view), FEED_SLICE_BYTES):
            piece = view[start:start + FEED_SLICE_BYTES]
            if self.fast_path and self._depth == 1 and self._stanza_start is None and not self._buf:
                taken = self._take_canonical(piece)
                if taken:
                    if taken == len(piece):
                        continue
                    piece = piece[taken:]
            self._buf += piece
            try:
                self._expat.Parse(piece, False)  # handlers raise StreamError through it
            except expat.ExpatError as exc:
                raise self._expat_error(exc) from None
            parsed = self._offset()  # outside handlers: just past the last parse event
            self._check_unfinished(parsed)
            self._trim(parsed)
        return items

    def _offset(self) -> int:
        """The stream offset of expat's current position (expat does not count canonical stanzas)."""
        return self._expat.CurrentByteIndex + self._skipped

    def _take_canonical(self, piece: memoryview) -> int:
        """Emit the canonical messages (and whitespace) at the start of ``piece``; return how many bytes they take.

        Called only between stanzas with every earlier byte parsed (nothing buffered), so ``piece`` starts at
        stream level.  Stops at the first thing that is not a whole canonical message within the limits —
        an unfinished one, another stanza, text, the stream's end — and leaves it to expat, which applies
        every rule (and raises the errors).
        """
        size = len(piece)
        position = taken = 0
        items, max_bytes = self._items, self.max_stanza_bytes
        while True:
            position = _STREAM_SPACE.match(piece, position).end()
            if position == size:
                taken = size
                break
            match = _CANONICAL_MESSAGE.match(piece, position)
            if match is None:
                taken = position
                break
            end = match.end()
            raw = bytes(piece[position:end])
            route = _canonical_route(match, raw, end - position, max_bytes)
            if route is None:
                taken = position
                break
            items.append(Stanza("message", raw, route))
            position = end
        self._skipped += taken
        self._base += taken
        return taken

    def _fail(self, condition: str, text: str) -> StreamError:
        """Record the error that ends this stream; the caller raises it."""
        self._error = StreamError(condition, text)
        return self._error

    def _expat_error(self, exc: expat.ExpatError) -> StreamError:
        """Translate an expat error: wrong encodings are ``unsupported-encoding``, the rest ``not-well-formed``."""
        condition = "unsupported-encoding" if exc.code in _ENCODING_ERRORS else "not-well-formed"
        return self._fail(condition, f"{expat.ErrorString(exc.code)} at line {exc.lineno}, column {exc.offset}")

    def _check_unfinished(self, parsed: int) -> None:
        """Refuse, as soon as it crosses its limit, a header, stanza or piece of markup still arriving.

        ``parsed`` is where expat stopped: the bytes after it are an unfinished
        token (a tag, a comment…) that expat scans again on every feed.
        """
        end = self._base + len(self._buf)
        if end - parsed > MAX_TOKEN_BYTES:
            raise self._fail("policy-violation", f"unfinished markup exceeds {MAX_TOKEN_BYTES} bytes")
        if not self._opened:
            if end > MAX_HEADER_BYTES:
                raise self._fail("policy-violation", f"stream header exceeds {MAX_HEADER_BYTES} bytes")
        elif end - self._needed_from(parsed) > self.max_stanza_bytes:
            raise self._fail("policy-violation", f"stanza exceeds {self.max_stanza_bytes} bytes")

    def _needed_from(self, parsed: int) -> int:
        """The first byte still needed: the current stanza's ``<``, else the first unparsed byte."""
        return parsed if self._stanza_start is None else self._stanza_start

    def _trim(self, parsed: int) -> None:
        """Drop every byte before :meth:`_needed_from` (all kept until the header is complete)."""
        if self._opened:
            keep = self._needed_from(parsed)
            del self._buf[:keep - self._base]
            self._base = keep

    # ------------------------------------------------------------ prolog rules

    def _on_xml_decl(self, version: str | None, encoding: str | None, standalone: int) -> None:
        if version != "1.0":
            raise self._fail("unsupported-version", f"XML version {version} (only 1.0)")
        if encoding is not None and encoding.upper() not in ("UTF-8", "UTF8"):
            raise self._fail("unsupported-encoding", f"encoding {encoding} (only UTF-8)")

    def _on_doctype(self, name, sysid, pubid, has_internal_subset) -> None:
        raise self._fail("restricted-xml", "DOCTYPE not allowed")

    def _on_pi(self, target: str, data: str) -> None:
        raise self._fail("restricted-xml", f"processing instruction <?{target}?> not allowed")

    def _on_comment(self, data: str) -> None:
        raise self._fail("restricted-xml", "comment not allowed")

    def _on_header_namespace(self, prefix: str | None, uri: str) -> None:
        self._header_namespaces[prefix] = uri

    # ------------------------------------------------------------ elements

    def _on_start(self, name: str, attributes: list[str]) -> None:
        """Count depth; on the path to the routing fields, follow it (inline: this runs for every element)."""
        depth = self._depth + 1
        if depth > MAX_DEPTH:
            raise self._fail("policy-violation", f"depth {depth} exceeds {MAX_DEPTH}")
        self._depth = depth
        ctx = self._ctx
        if ctx is None:
            if depth == 2:
                self._open_stanza(name)
            elif depth == 1:
                self._open_stream(name, attributes)
        elif depth == ctx.child_depth:
            child = ctx.children.get(name)
            if child is None:
                self._other_child(ctx, name)
                return
            if self._seen & child.bit:
                raise self._duplicate(child.label, ctx)
            self._seen |= child.bit
            self._ctx = child
            if child.slot is not None:
                self._text = ""
                self._expat.CharacterDataHandler = self._field_text_handler
            elif child is _EVENT_CTX:
                self._route_values = [None] * 6

    def _on_end(self, name: str) -> None:
        """Count depth; leaving a routing context stores its field or, for the event, the header."""
        depth = self._depth
        self._depth = depth - 1
        ctx = self._ctx
        if ctx is not None and depth == ctx.level:
            self._ctx = ctx.parent
            if ctx.slot is not None:
                self._store_field(ctx)
            elif ctx is _EVENT_CTX:
                self._route = RouteHeader(*self._route_values)
        if depth == 2:
            self._close_stanza()
        elif depth == 1:
            self._items.append(StreamClosed())

    def _on_stream_text(self, text: str) -> None:
        if text.strip(_XML_SPACE):
            raise self._fail("bad-format", f"text outside stanzas: {text[:40]!r}")

    # ------------------------------------------------------------ stream and stanzas

    def _open_stream(self, name: str, attributes: list[str]) -> None:
        """Check the stream header and its namespace declarations; emit :class:`StreamOpened`."""
        # expat detects UTF-16 (a byte order mark, or "<" next to a NUL) even when told UTF-8
        if self._buf.startswith((b"\xff\xfe", b"\xfe\xff")) or 0 in self._buf[:2]:
            raise self._fail("unsupported-encoding", "stream is UTF-16 (only UTF-8)")
        if name != _STREAM:
            raise self._fail("invalid-namespace", f"stream must open with <stream:stream> in {NS_STREAMS}")
        declared = self._header_namespaces
        extra = sorted(prefix for prefix in declared if prefix not in (None, "stream"))
        if extra:
            raise self._fail("bad-namespace-prefix", f"stream header declares prefix {extra[0]!r}")
        if declared.get("stream") != NS_STREAMS:
            raise self._fail("bad-namespace-prefix", f"stream header must bind prefix 'stream' to {NS_STREAMS}")
        if declared.get(None) != NS_CLIENT:
            raise self._fail("invalid-namespace", f"stream default namespace must be {NS_CLIENT}")
        self._expat.StartNamespaceDeclHandler = None
        start = self._offset()
        if _TAG.match(self._buf, start).end() > MAX_HEADER_BYTES:  # nothing is trimmed before the header
            raise self._fail("policy-violation", f"stream header exceeds {MAX_HEADER_BYTES} bytes")
        self._opened = True
        names = [_clark(attributes[i]) for i in range(0, len(attributes), 2)]
        self._items.append(StreamOpened(dict(zip(names, attributes[1::2]))))

    def _open_stanza(self, name: str) -> None:
        """Note the stanza's name, where it starts, and where it ends if it is one empty-element tag.

        (expat reports the end of ``<x/>`` at the tag's end in current versions
        but at its start in old ones; the tag itself settles it.)
        """
        start = self._stanza_start = self._offset()
        self._stanza_name = name[len(_CLIENT_PREFIX):] if name.startswith(_CLIENT_PREFIX) else _clark(name, "{}")
        tag_end = _TAG.match(self._buf, start - self._base).end()
        self._stanza_end = self._base + tag_end if self._buf[tag_end - 2] == 0x2F else None  # "/>"
        self._expat.CharacterDataHandler = None  # text inside stanzas is only collected for routing fields
        if name == _MESSAGE:
            self._ctx = _MESSAGE_CTX
            self._seen = 0

    def _close_stanza(self) -> None:
        """Cut the stanza's exact bytes out of the buffer and emit it."""
        start, end = self._stanza_start, self._stanza_end
        if end is None:  # expat points at "</"; an end tag holds no ">" before its own
            end = self._buf.index(b">", self._offset() - self._base) + 1 + self._base
        if end - start > self.max_stanza_bytes:
            raise self._fail("policy-violation", f"stanza exceeds {self.max_stanza_bytes} bytes")
        raw = bytes(self._buf[start - self._base:end - self._base])
        self._items.append(Stanza(self._stanza_name, raw, self._route))
        self._stanza_start = None
        self._route = None
        self._expat.CharacterDataHandler = self._on_stream_text

    # ------------------------------------------------------------ routing header

    def _other_child(self, ctx: _Context, name: str) -> None:
        """A child off the routing path: refused in a field, the payload type in an event, else ignored."""
        if ctx.slot is not None:
            raise self._fail("bad-format", f"element inside <{ctx.label}>")
        namespace, _, local = name.rpartition(_SEP)
        if ctx is _EVENT_CTX and local == "payload":  # in any namespace: that is the payload's type
            if self._seen & _PAYLOAD_BIT:
                raise self._duplicate("payload", ctx)
            self._seen |= _PAYLOAD_BIT
            self._route_values[_PAYLOAD_SLOT] = namespace or None

    def _duplicate(self, label: str, parent: _Context) -> StreamError:
        """A second routing element of one kind: router and receivers could read different ones."""
        return self._fail("bad-format", f"more than one <{label}> in <{parent.label}>")

    def _on_field_text(self, text: str) -> None:
        text = self._text = self._text + text  # fields are short: concatenation beats a list
        if len(text) > self._ctx.limit:  # characters ≤ UTF-8 bytes: refused early, memory stays bounded
            raise self._field_too_long(self._ctx)

    def _field_too_long(self, ctx: _Context) -> StreamError:
        return self._fail("policy-violation", f"<{ctx.parent.label}><{ctx.label}> exceeds {ctx.limit} bytes")

    def _store_field(self, ctx: _Context) -> None:
        """A routing field ends: check its UTF-8 size, store its stripped text (``None`` when empty)."""
        self._expat.CharacterDataHandler = None
        text = self._text
        if not text.isascii() and len(text.encode("utf-8")) > ctx.limit:
            raise self._field_too_long(ctx)
        self._route_values[ctx.slot] = text.strip(_XML_SPACE) or None


def _canonical_route(match: re.Match, raw: bytes, size: int, max_stanza_bytes: int) -> RouteHeader | None:
    """The route of a canonical message (``match`` of :data:`_CANONICAL_MESSAGE` on ``raw``'s bytes), or None
    when expat must judge it after all: over a limit, not UTF-8, a character or reference XML forbids or this
    form does not use, a reserved namespace.

    The fields are what expat's path stores: text stripped of XML whitespace, empty as None; the canonical
    form holds no reference, so a field's bytes are its text and their length its UTF-8 size.
    """
    if size > max_stanza_bytes or _NOT_CANONICAL_REFERENCE.search(raw) is not None:
        return None
    if b"]" in raw and b"]]>" in raw:  # one byte is found much faster than three
        return None
    if not raw.isascii():
        if b"\xef\xbf" in raw:
            return None
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    namespace = match.group(6)
    if namespace in _RESERVED_NAMESPACES:
        return None
    fields = []
    for value, limit in zip(match.group(1, 2, 3, 4, 5), _CANONICAL_LIMITS):
        if value is None:
            fields.append(None)
        elif len(value) > limit:
            return None
        else:
            fields.append(value.decode("utf-8").strip(_XML_SPACE) or None)
    fields.append(namespace[1:-1].decode("utf-8") or None)
    return RouteHeader(*fields)


def _clark(name: str, bare: str = "") -> str:
    """expat's ``"uri local"`` as ``{uri}local``; a name without namespace gets ``bare`` in front."""
    uri, sep, local = name.rpartition(_SEP)
    return f"{{{uri}}}{local}" if sep else bare + name


# ---------------------------------------------------------------- building

#: Characters XML 1.0 cannot carry at all, even as character references.
_NOT_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})
_ATTR_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                               "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"})


def _xml_chars(value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected str, not {type(value).__name__}")
    bad = _NOT_XML.search(value)
    if bad:
        raise ValueError(f"character U+{ord(bad.group()):04X} cannot be sent in XML")
    return value


def _text(value: str) -> str:
    """Escape text content (CR as a reference, so XML's newline normalisation keeps it)."""
    return _xml_chars(value).translate(_TEXT_ESCAPES)


def _attr(value: str) -> str:
    """Escape a double-quoted attribute value (whitespace as references, so normalisation keeps it)."""
    return _xml_chars(value).translate(_ATTR_ESCAPES)


STREAM_CLOSE = b"</stream:stream>"


def stream_header(*, sender: str | None = None, to: str | None = None, stream_id: str | None = None) -> bytes:
    """The XML declaration and stream header; ``sender`` becomes ``from`` (the router answers with it and ``id``)."""
    extra = "".join(f' {name}="{_attr(value)}"'
                    for name, value in (("to", to), ("from", sender), ("id", stream_id)) if value is not None)
    return (f"<?xml version='1.0'?><stream:stream xmlns=\"{NS_CLIENT}\" xmlns:stream=\"{NS_STREAMS}\""
            f'{extra} version="1.0">').encode("utf-8")


def auth_request(iq_id: str, username: str, password: str, resource: str) -> bytes:
    """A legacy (XEP-0078) login: ``jabber:iq:auth`` set with plaintext password (send it over TLS or a trusted net)."""
    return (f'<iq type="set" id="{_attr(iq_id)}"><query xmlns="{NS_AUTH}"><username>{_text(username)}</username>'
            f"<password>{_text(password)}</password><resource>{_text(resource)}</resource></query></iq>"
            ).encode("utf-8")


def auth_fields_request(iq_id: str) -> bytes:
    """Ask which login fields the router wants (``jabber:iq:auth`` get)."""
    return f'<iq type="get" id="{_attr(iq_id)}"><query xmlns="{NS_AUTH}"/></iq>'.encode("utf-8")


def auth_result(iq_id: str) -> bytes:
    """The login succeeded."""
    return f'<iq type="result" id="{_attr(iq_id)}"/>'.encode("utf-8")


def auth_fields_result(iq_id: str) -> bytes:
    """Answer a fields request: username, password and resource."""
    return (f'<iq type="result" id="{_attr(iq_id)}"><query xmlns="{NS_AUTH}">'
            f"<username/><password/><resource/></query></iq>").encode("utf-8")


def auth_error(iq_id: str) -> bytes:
    """The login failed: ``401`` / ``not-authorized``."""
    return (f'<iq type="error" id="{_attr(iq_id)}"><error code="401" type="auth">'
            f'<not-authorized xmlns="{NS_STANZA_ERRORS}"/></error></iq>').encode("utf-8")


def stream_error(condition: str, text: str) -> bytes:
    """A stream error followed by the stream's close; ``condition`` must be an RFC 6120 condition."""
    if condition not in STREAM_ERROR_CONDITIONS:
        raise ValueError(f"unknown stream error condition {condition!r}")
    return (f'<stream:error><{condition} xmlns="{NS_STREAM_ERRORS}"/>'
            f'<text xmlns="{NS_STREAM_ERRORS}">{_text(text)}</text></stream:error>').encode("utf-8") + STREAM_CLOSE


def error_message(text: str, event_xml: bytes | None = None) -> bytes:
    """A ``<message type="error">`` (``bad-request``) refusing one event; the stream goes on.

    ``event_xml``, when given, is the refused ``<event>`` echoed back (as XMPP
    error stanzas echo what they refuse), so a client can tell which lease
    request was refused.
    """
    echo = b"" if event_xml is None else _XML_DECL.sub(b"", event_xml, count=1)
    return (b'<message type="error">' + echo
            + (f'<error type="modify"><bad-request xmlns="{NS_STANZA_ERRORS}"/>'
               f'<text xmlns="{NS_STANZA_ERRORS}">{_text(text)}</text></error></message>').encode("utf-8"))


#: Name of a ``<stream:error>`` element as :class:`Stanza` reports it.
STREAM_ERROR_NAME = "{%s}error" % NS_STREAMS
NS_PING = "urn:xmpp:ping"
#: Largest iq, error message or stream error read with :func:`parse_iq`,
#: :func:`parse_error_message` or :func:`parse_stream_error`: these are small
#: control stanzas (an echoed event is at most 1 MiB plus the wrapper).
MAX_CONTROL_BYTES = MAX_STANZA_BYTES


class IqInfo(NamedTuple):
    """An ``<iq>``: its ``type``, ``id`` and the namespace of its first child (None if it has none)."""

    kind: str
    iq_id: str
    child_namespace: str | None


def ping_request(iq_id: str) -> bytes:
    """An XEP-0199 ping; the router answers with an iq result once everything before it was handled."""
    return f'<iq type="get" id="{_attr(iq_id)}"><ping xmlns="{NS_PING}"/></iq>'.encode("utf-8")


def iq_error(iq_id: str, condition: str = "service-unavailable") -> bytes:
    """Refuse an iq the router does not serve (RFC 6120 stanza error)."""
    return (f'<iq type="error" id="{_attr(iq_id)}"><error type="cancel"><{condition} xmlns="{NS_STANZA_ERRORS}"/>'
            f"</error></iq>").encode("utf-8")


def _parse_control(raw: bytes, what: str):
    try:
        return parse_xml(raw, max_bytes=MAX_CONTROL_BYTES, what=what)
    except XmlSafetyError as exc:
        raise StreamError("bad-format", str(exc)) from None


def parse_iq(raw_iq: bytes) -> IqInfo:
    """Read an iq's type, id and first child's namespace (``bad-format`` StreamError if it is not one)."""
    iq = _parse_control(raw_iq, "iq")
    if iq.tag not in ("iq", "{%s}iq" % NS_CLIENT):
        raise StreamError("bad-format", f"expected <iq>, got <{iq.tag}>")
    kind, iq_id = iq.get("type"), iq.get("id")
    if kind not in ("get", "set", "result", "error") or not iq_id:
        raise StreamError("bad-format", "an iq needs a type (get, set, result, error) and an id")
    children = [child for child in iq if isinstance(child.tag, str)]
    namespace = children[0].tag[1:].split("}", 1)[0] if children and children[0].tag.startswith("{") else None
    return IqInfo(kind, iq_id, namespace)


#: ``type="error"`` (or ``'error'``) among a start tag's attributes.
_ERROR_TYPE = re.compile(rb"""\stype\s*=\s*["']error["']""")


def is_error_message(raw_message: bytes) -> bool:
    """Cheap test on a message stanza's start tag: is it ``type="error"``?"""
    head = _TAG.match(raw_message)
    return head is not None and _ERROR_TYPE.search(head.group()) is not None


def parse_error_message(raw_message: bytes):
    """``(text, echoed event element or None)`` of an error message from the router."""
    message = _parse_control(raw_message, "error message")
    text = message.findtext(f"{{{NS_CLIENT}}}error/{{{NS_STANZA_ERRORS}}}text")
    if text is None:
        text = message.findtext(f"error/{{{NS_STANZA_ERRORS}}}text") or "refused (no reason given)"
    echoed = message.find("{%s}event" % NS_EVENT)
    return text, echoed


def parse_stream_error(raw_error: bytes) -> tuple[str, str]:
    """``(condition, text)`` of a peer's ``<stream:error>``, as :class:`StreamParser` cut it.

    The ``stream:`` prefix is declared on the stream header, not on the cut
    stanza, so it is read inside a wrapper that declares it.
    """
    wrapped = _parse_control(f'<w xmlns:stream="{NS_STREAMS}">'.encode("ascii") + raw_error + b"</w>",
                             "stream error")
    if len(wrapped) != 1 or wrapped[0].tag != STREAM_ERROR_NAME:
        raise StreamError("bad-format", "expected one <stream:error>")
    error = wrapped[0]
    condition, text = "undefined-condition", ""
    for child in error:
        if not isinstance(child.tag, str) or not child.tag.startswith("{%s}" % NS_STREAM_ERRORS):
            continue
        local = child.tag.split("}", 1)[1]
        if local == "text":
            text = child.text or ""
        else:
            condition = local
    return condition, text


#: An XML declaration and the whitespace after it.
_XML_DECL = re.compile(rb"<\?xml\s[^?]*\?>\s*")
_DECLARED_ENCODING = re.compile(rb"""\sencoding\s*=\s*["']([^"']*)["']""")


def wrap_message(event_xml: bytes, *, to: str = "psepr", expire_seconds: int = 60) -> bytes:
    """Put a serialised ``<event>`` document (UTF-8; an XML declaration is stripped) in the message wrapper.

    The event bytes are copied as they are: they are the caller's serialisation
    and the receiving parser checks them.
    """
    if event_xml[:2] == b"<?":
        declaration = _XML_DECL.match(event_xml)
        if declaration:
            encoding = _DECLARED_ENCODING.search(declaration.group())
            if encoding and encoding.group(1).upper() not in (b"UTF-8", b"UTF8"):
                raise ValueError(f"event is encoded as {encoding.group(1).decode('ascii', 'replace')}, not UTF-8")
            event_xml = event_xml[declaration.end():]
    # checked before the cache, whose keys compare equal across types (True == 1 == 1.0)
    if expire_seconds.__class__ is not int or expire_seconds < 0:  # a bool is no number of seconds either
        raise ValueError(f"expire_seconds must be a non-negative int, not {expire_seconds!r}")
    if to.__class__ is not str:
        _attr(to)  # raises the TypeError
    return _message_head(to, expire_seconds) + event_xml + b"</message>"


@functools.lru_cache(maxsize=64)
def _message_head(to: str, expire_seconds: int) -> bytes:
    """The message wrapper's start (built once per ``to`` and expiry: every event of a client uses the same)."""
    return f'<message to="{_attr(to)}"><x xmlns="{NS_EXPIRE}" seconds="{expire_seconds}"/>'.encode("utf-8")


# ---------------------------------------------------------------- reading a login

_AUTH = "{%s}" % NS_AUTH


def parse_auth(raw_iq: bytes) -> AuthRequest:
    """Read a ``jabber:iq:auth`` get or set (at most :data:`MAX_AUTH_BYTES`, parsed without DTD or entities).

    The iq may be in ``jabber:client`` or, as cut from a stream, in no
    namespace.  Anything else — another iq, another type, no id, bad XML —
    raises :class:`StreamError` ``bad-format``.
    """
    try:
        iq = parse_xml(raw_iq, max_bytes=MAX_AUTH_BYTES, what="jabber:iq:auth request")
    except XmlSafetyError as exc:
        raise StreamError("bad-format", str(exc)) from None
    if iq.tag not in ("iq", "{%s}iq" % NS_CLIENT):
        raise StreamError("bad-format", f"expected <iq>, got <{iq.tag}>")
    kind, iq_id = iq.get("type"), iq.get("id")
    if kind not in ("set", "get") or not iq_id:
        raise StreamError("bad-format", "jabber:iq:auth request needs type 'set' or 'get' and an id")
    query = iq.find(_AUTH + "query")
    if query is None:
        raise StreamError("bad-format", f"iq holds no <query xmlns='{NS_AUTH}'>")
    return AuthRequest(iq_id, kind, *(query.findtext(_AUTH + field) or None
                                      for field in ("username", "password", "resource")))

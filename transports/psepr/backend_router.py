"""Client backend for the embedded router: the XMPP-style stream of the original clients.

``connect(reactor, address, handler)`` opens a TCP connection, sends the
stream header and the ``jabber:iq:auth`` login, and fires with a link once the
router accepted it (:class:`~dsmt.transports.psepr.client.LoginFailed` if it
refused, a connection error if unreachable).  The link then carries events and
lease requests; what arrives goes back to ``handler`` (the
:class:`~dsmt.transports.psepr.client.PsEPRConnection`):

* grants (lease payloads from the router) → ``handler.link_granted``;
* error messages echoing a lease request → ``handler.link_refused``;
* every other event → ``handler.link_event(event)`` (the router already
  applied service/instance narrowing; the connection matches its leases).

What the router sends is read by :class:`StanzaReader`: one lxml pull parser
over the whole stream, so each event is parsed once, in C, and built straight
from its element (:func:`~dsmt.transports.psepr.event.event_from_element`).
The client needs neither the raw bytes of a stanza (the router needs them to
forward it) nor its route header, so it does not run the router's
:class:`~dsmt.transports.psepr.stream.StreamParser`.
"""
from __future__ import annotations

import itertools

from lxml import etree
from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger

from dsmt.transports.psepr import stream
from dsmt.transports.psepr.event import (
    Event, EventError, LeasePayload, event_from_element, event_to_xml)
from dsmt.transports.psepr.router import ROUTER_SERVICE
from dsmt.transports.xmlsafe import XmlSafetyError, check_depth

__all__ = ["StanzaReader", "RouterLinkProtocol", "connect", "CONNECT_TIMEOUT", "LOGIN_ID", "STANZA_DEPTH",
           "FEED_SLICE_BYTES"]

log = Logger(namespace="dsmt.psepr.client")

#: Seconds allowed for TCP connect + stream header + login before giving up on an address.
CONNECT_TIMEOUT = 10
#: The id of the login iq (one login per stream).
LOGIN_ID = "login"
#: Deepest a stanza may be, counting itself as 1: the stream's limit
#: (:data:`~dsmt.transports.psepr.stream.MAX_DEPTH`) counts the stream element too.
STANZA_DEPTH = stream.MAX_DEPTH - 1
#: Received bytes are handed to the parser in slices of at most this many, and
#: the size limit is checked after each: a socket read, so normal reads are not split.
FEED_SLICE_BYTES = 64 * 1024

_STREAM = "{%s}stream" % stream.NS_STREAMS
_MESSAGE = "{%s}message" % stream.NS_CLIENT
_IQ = "{%s}iq" % stream.NS_CLIENT
_STREAM_ERROR = stream.STREAM_ERROR_NAME
_STREAM_ERRORS = "{%s}" % stream.NS_STREAM_ERRORS
_ERROR_TEXT = "{%s}error/{%s}text" % (stream.NS_CLIENT, stream.NS_STANZA_ERRORS)
_BARE_ERROR_TEXT = "error/{%s}text" % stream.NS_STANZA_ERRORS
_ECHOED_EVENT = "{%s}event" % stream.NS_EVENT
#: Namespaces of the top-level elements the reader reports (the stream's own
#: and the stanzas'); any other top-level element is dropped unread.
_REPORTED = ("{%s}" % stream.NS_CLIENT, "{%s}" % stream.NS_STREAMS)
_IQ_KINDS = ("get", "set", "result", "error")


def _pull_parser() -> etree.XMLPullParser:
    """The options of :mod:`dsmt.transports.xmlsafe`, as a pull parser reporting stream-level elements.

    ``resolve_entities="internal"`` rather than ``False``: with ``False`` an
    undefined entity reference (``&x;``) silently stops lxml's push parser
    (lxml ignores that error in this mode and libxml2 halts), which would leave
    the link hanging; with ``"internal"`` it is an error like any other.  No
    entity is ever declared — :class:`StanzaReader` refuses a DOCTYPE before
    the parser sees it — and external entities are never loaded either way.
    The encoding is fixed to UTF-8, whatever the stream declares.
    """
    return etree.XMLPullParser(
        events=("start", "end"), tag=tuple(prefix + "*" for prefix in _REPORTED),
        resolve_entities="internal", no_network=True, load_dtd=False, dtd_validation=False, huge_tree=False,
        collect_ids=False, remove_comments=True, remove_pis=True, encoding="utf-8")


class StanzaReader:
    """Incremental reader of the stream a router sends to a client: bytes in, stanza elements out.

    :meth:`feed` returns, in order, each top-level element completed by the
    bytes given (``message``, ``iq``, ``presence``… in ``jabber:client``,
    ``stream:error``), and the stream element itself once ``</stream:stream>``
    arrived.  They are lxml elements still in the tree: use them, then call
    :meth:`release` (or the next :meth:`feed` does).  Top-level elements in
    any other namespace are dropped unread (their depth is still checked).

    Safety: no DOCTYPE (refused in the bytes, before the parser sees them),
    so no entity declarations; no network or file access; comments and
    processing instructions are dropped; UTF-8 only.  Size: a top-level
    element may take at most ``max_stanza_bytes`` bytes received after the
    slice (of at most :data:`FEED_SLICE_BYTES`) in which it began, checked
    after every slice — so no stanza within the limit is ever refused, one
    over it by less than a slice may pass, and the parser never holds more
    than the limit plus two slices (an unfinished tag between stanzas counts
    the same way).  Memory: released elements are unlinked from the tree and
    the last one emptied, and text between stanzas (whitespace keepalives) is
    dropped as the parser consumes it, so memory stays flat over any number
    of stanzas.  Depth is left to the caller, who reads the stanza
    (:data:`STANZA_DEPTH`); elements dropped unread are checked here.

    Broken input raises :class:`~dsmt.transports.psepr.stream.StreamError`;
    the reader is then dead and every later :meth:`feed` raises it again.
    """

    def __init__(self, *, max_stanza_bytes: int = stream.MAX_STANZA_BYTES):
        self.max_stanza_bytes = max_stanza_bytes
        self.root = None  # the stream element, once its start tag arrived
        self._parser = _pull_parser()
        self._events = self._parser.read_events()
        self._error: stream.StreamError | None = None
        self._held = 0      # bytes the parser may hold: see _account
        self._head = b""    # the last bytes before the stream opened: a DOCTYPE split across reads
        self._last = None   # the root's last child after the previous slice,
        self._last_ended = False  # and whether it was complete (handed out)
        self._reported = 0  # top-level elements in the tree that were handed out
        self._scanned = 0   # leading top-level elements known to be handed out or checked

    def feed(self, data: bytes) -> list:
        """Parse the next received bytes (any chunking); return the top-level elements they complete.

        The elements returned by the previous call are released first, if
        :meth:`release` was not called.
        """
        if self._error is not None:
            raise self._error
        self._prune()
        done: list = []
        if len(data) <= FEED_SLICE_BYTES:
            self._feed(data, done)
        else:
            view = memoryview(data)
            for start in range(0, len(view), FEED_SLICE_BYTES):
                self._feed(bytes(view[start:start + FEED_SLICE_BYTES]), done)
        return done

    def release(self) -> None:
        """The elements handed out are used: unlink them from the tree, and empty the one it still holds.

        Until then they stay in the tree as parsed, so reading one never
        depends on where the reads split the stream (lxml tidies the namespace
        declarations of what it unlinks).  The last top-level element stays,
        emptied: the parser may still be adding to it or to its tail.
        """
        if self._error is not None:
            return
        self._prune()
        if self._last_ended:
            self._last.clear(keep_tail=True)

    def _prune(self) -> None:
        """Unlink every top-level element but the last: they are complete, their tails too.

        (Dropping previous siblings is the safe way to prune a tree while it
        is parsed.)  Those never handed out were checked by :meth:`_account`.
        """
        root = self.root
        if root is not None and len(root) > 1:
            del root[:-1]
            self._scanned = 0
            self._reported = int(self._last_ended)

    def _fail(self, condition: str, text: str) -> stream.StreamError:
        """Record the error that ends this stream and free the tree; the caller raises it."""
        self._error = stream.StreamError(condition, text)
        self._parser = self._events = self.root = self._last = None
        self._last_ended = False
        return self._error

    def _feed(self, piece: bytes, done: list) -> None:
        root = self.root
        if root is None:
            head = self._head + piece
            if b"<!DOCTYPE" in head:  # before the stream element is the only place a DOCTYPE can be
                raise self._fail("restricted-xml", "DOCTYPE not allowed")
            self._head = head[-8:]
            before = 0
        else:
            before = len(root)
        try:
            self._parser.feed(piece)
        except etree.XMLSyntaxError as exc:
            raise self._fail("not-well-formed", str(exc)) from None
        first = len(done)
        closed = False
        for action, element in self._events:
            if action == "end":
                if element.getparent() is root:
                    done.append(element)
                elif element is root:
                    closed = True
            elif root is None:
                root = self._open(element)
        held = self._held + len(piece)
        if root is not None:
            self.root = root
            held = self._account(root, piece, before, done[first:], held)
            if closed:
                done.append(root)  # </stream:stream>: the stream is over, after everything before it
        if held > self.max_stanza_bytes:
            raise self._fail("policy-violation", f"stanza exceeds {self.max_stanza_bytes} bytes")
        self._held = held

    def _account(self, root, piece: bytes, before: int, new: list, held: int) -> int:
        """How many bytes the parser may still hold after this slice; ``held`` counts them up to it.

        They are the bytes received since the last slice in which a top-level
        element began or ended: if one did in this one, the count starts
        afresh.  Between stanzas (the last child complete), the text the
        parser takes in (whitespace keepalives) is dropped at once; libxml2
        takes text in only up to the next ``<`` or once a few hundred bytes
        wait, so when it did, what it still holds came in this slice.  An
        unfinished start tag, or anything else, stays in the parser and counts.
        """
        count = len(root)
        if count:
            last = root[-1]
            ended = (last is self._last and self._last_ended) or (bool(new) and last is new[-1])
            if new or count > before:
                held = 0
            self._last, self._last_ended = last, ended
            self._reported += len(new)
            if count - 1 > self._scanned:
                if count - 1 > self._reported - ended:  # one not handed out finished before the last
                    self._check_unread(root[self._scanned:count - 1])
                self._scanned = count - 1
            if ended and last.tail is not None:
                last.tail = None  # the parser appends the next text to a new node
                held = min(held, len(piece))
        elif root.text is not None:  # before the first stanza
            root.text = None
            held = min(held, len(piece))
        return held

    def _check_unread(self, elements) -> None:
        """Top-level elements outside the stanza namespaces are dropped unread, but within the depth limit."""
        for element in elements:
            tag = element.tag
            if not (tag.__class__ is str and tag.startswith(_REPORTED)):
                try:
                    check_depth(element, STANZA_DEPTH)
                except XmlSafetyError:
                    raise self._fail("policy-violation", _too_deep()) from None

    def _open(self, element):
        """The first reported start tag must be the stream's, with the header rules of ``stream.py``."""
        if element.tag != _STREAM or element.getparent() is not None:
            raise self._fail("invalid-namespace", f"stream must open with <stream:stream> in {stream.NS_STREAMS}")
        docinfo = element.getroottree().docinfo
        if docinfo.doctype or docinfo.internalDTD is not None:
            raise self._fail("restricted-xml", "DOCTYPE not allowed")
        if docinfo.xml_version not in (None, "1.0"):
            raise self._fail("unsupported-version", f"XML version {docinfo.xml_version} (only 1.0)")
        declared = element.nsmap
        extra = sorted(prefix for prefix in declared if prefix not in (None, "stream"))
        if extra:
            raise self._fail("bad-namespace-prefix", f"stream header declares prefix {extra[0]!r}")
        if declared.get("stream") != stream.NS_STREAMS:
            raise self._fail("bad-namespace-prefix", f"stream header must bind prefix 'stream' to {stream.NS_STREAMS}")
        if declared.get(None) != stream.NS_CLIENT:
            raise self._fail("invalid-namespace", f"stream default namespace must be {stream.NS_CLIENT}")
        return element


def _too_deep() -> str:
    return f"a stanza is nested deeper than {stream.MAX_DEPTH} elements (counting the stream)"


class RouterLinkProtocol(protocol.Protocol):
    def __init__(self, handler, address):
        self.handler = handler
        self.address = address
        self.reader: StanzaReader | None = StanzaReader()
        self.ready: defer.Deferred = defer.Deferred()
        self._logged_in = False
        self._closing = False
        self._pings: dict[str, defer.Deferred] = {}
        self._ping_ids = itertools.count(1)

    # Twisted ---------------------------------------------------------------
    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.transport.write(stream.stream_header(to="psepr"))
        self.transport.write(stream.auth_request(LOGIN_ID, self.handler.service, self.handler.password or "",
                                                 self.handler.instance or ""))

    def dataReceived(self, data):
        reader = self.reader
        if reader is None:
            return
        try:
            stanzas = reader.feed(data)
        except stream.StreamError as exc:
            self._fail(f"router sent a broken stream: {exc.condition}: {exc.text}")
            return
        for element in stanzas:
            if self.reader is None:  # a stanza before this one broke the link
                return
            tag = element.tag
            if tag == _MESSAGE and self._logged_in:
                self._message(element)
            elif tag == _IQ:
                self._iq(element)
            elif tag == _STREAM_ERROR:
                self._stream_error(element)
            elif tag == _STREAM:
                self._fail("router closed the stream")
            else:  # presence, messages before the login, …: nothing for PsEPR
                self._readable(element)
        if self.reader is not None:
            reader.release()

    def connectionLost(self, reason):
        self._fail(f"connection lost: {reason.getErrorMessage()}")

    # stanzas -----------------------------------------------------------------
    def _readable(self, element) -> bool:
        """Check a stanza's depth the thorough way (rare stanzas only); a stanza too deep breaks the link."""
        try:
            check_depth(element, STANZA_DEPTH)
        except XmlSafetyError:
            self._fail(f"router sent a broken stream: policy-violation: {_too_deep()}")
            return False
        return True

    def _message(self, element):
        if element.get("type") == "error":
            self._error_message(element)
            return
        try:
            event = event_from_element(element, max_depth=STANZA_DEPTH)
        except EventError as exc:
            if self._readable(element):  # only a stanza too deep breaks the stream; a bad event is dropped
                log.warn("dropping an unreadable event from {address}: {error}", address=self.address, error=exc)
            return
        payload = event.payload
        if payload.__class__ is LeasePayload and event.from_service == ROUTER_SERVICE:
            self.handler.link_granted(payload.identifier, payload.duration)
        else:
            self.handler.link_event(event)

    def _iq(self, element):
        if not self._readable(element):
            return
        kind, iq_id = element.get("type"), element.get("id")
        if kind not in _IQ_KINDS or not iq_id:
            self._fail("router sent a broken iq: an iq needs a type (get, set, result, error) and an id")
            return
        if not self._logged_in:
            if iq_id != LOGIN_ID:
                return
            if kind == "result":
                self._logged_in = True
                self.ready.callback(self)
            else:
                self.ready.errback(_login_failed(self.handler.service, self.address))
                self._closing = True
                self.transport.loseConnection()
            return
        waiter = self._pings.pop(iq_id, None)
        if waiter is not None:
            waiter.callback(None)

    def _error_message(self, element):
        """A refused event (``stream.error_message``): its reason, and the lease request it echoes if any."""
        if not self._readable(element):
            return
        text = element.findtext(_ERROR_TEXT)
        if text is None:
            text = element.findtext(_BARE_ERROR_TEXT) or "refused (no reason given)"
        echoed = element.find(_ECHOED_EVENT)
        identifier = None
        if echoed is not None:
            try:
                payload = event_from_element(echoed).payload
            except EventError:
                payload = None
            if isinstance(payload, LeasePayload):
                identifier = payload.identifier
        self.handler.link_refused(identifier, text)

    def _stream_error(self, element):
        """The router ended the stream (``stream.stream_error``): report its condition and text."""
        if not self._readable(element):
            return
        condition, text = "undefined-condition", ""
        for child in element:
            tag = child.tag
            if tag.__class__ is str and tag.startswith(_STREAM_ERRORS):
                local = tag[len(_STREAM_ERRORS):]
                if local == "text":
                    text = child.text or ""
                else:
                    condition = local
        self._fail(f"router ended the stream: {condition}: {text}")

    def _fail(self, reason: str):
        self.reader = None  # nothing more is read; the parser and its tree go
        pings, self._pings = self._pings, {}
        for waiter in pings.values():
            waiter.errback(ConnectionError(reason))
        if not self.ready.called:
            self.ready.errback(ConnectionError(reason))
        elif not self._closing:
            self._closing = True
            self.handler.link_lost(self, reason)
        if self.transport is not None and self.transport.connected:
            self.transport.loseConnection()

    # link API ------------------------------------------------------------------
    def send(self, event: Event, xml: bytes | None = None) -> None:
        self.transport.write(stream.wrap_message(xml if xml is not None else event_to_xml(event)))

    def request_lease(self, identifier: str, channel: str, seconds: int, payload_type: str | None) -> None:
        self.send(Event(channel, LeasePayload(identifier, seconds, "register", payload_type),
                        from_service=self.handler.service, from_instance=self.handler.instance))

    def release_lease(self, identifier: str, channel: str) -> None:
        self.send(Event(channel, LeasePayload(identifier, 0, "unregister"),
                        from_service=self.handler.service, from_instance=self.handler.instance))

    def flush(self) -> defer.Deferred:
        """Fires once the router has handled everything sent before (an XEP-0199 ping round trip)."""
        if self.transport is None or not self.transport.connected:
            return defer.fail(ConnectionError("not connected"))
        iq_id = f"ping-{next(self._ping_ids)}"
        self._pings[iq_id] = waiter = defer.Deferred()
        self.transport.write(stream.ping_request(iq_id))
        return waiter

    def close(self) -> None:
        self._closing = True
        if self.transport is not None and self.transport.connected:
            self.transport.write(stream.STREAM_CLOSE)
            self.transport.loseConnection()


def _login_failed(service, address):
    from dsmt.transports.psepr.client import LoginFailed
    return LoginFailed(f"{address} refused the login of service {service!r} (wrong name or password)")


def connect(reactor, address, handler) -> defer.Deferred:
    """Open a link to ``address``; fires with it once logged in."""
    endpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=CONNECT_TIMEOUT)
    link_protocol = RouterLinkProtocol(handler, address)
    factory = protocol.Factory.forProtocol(lambda: link_protocol)
    factory.noisy = False  # one "Starting factory" line per reconnect attempt helps nobody
    d = endpoint.connect(factory)

    def connected(_):
        timer = reactor.callLater(CONNECT_TIMEOUT, link_protocol._fail, "no answer to the login")
        link_protocol.ready.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        return link_protocol.ready

    d.addCallback(connected)
    return d

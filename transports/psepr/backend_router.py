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
"""
from __future__ import annotations

import itertools

from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger

from dsmt.transports.psepr import stream
from dsmt.transports.psepr.event import (
    LEASE_NS, Event, EventError, LeasePayload, event_from_element, event_to_xml, parse_event)
from dsmt.transports.psepr.router import ROUTER_SERVICE

log = Logger(namespace="dsmt.psepr.client")

#: Seconds allowed for TCP connect + stream header + login before giving up on an address.
CONNECT_TIMEOUT = 10
#: The id of the login iq (one login per stream).
LOGIN_ID = "login"


class RouterLinkProtocol(protocol.Protocol):
    def __init__(self, handler, address):
        self.handler = handler
        self.address = address
        self.parser = stream.StreamParser()
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
        try:
            items = self.parser.feed(data)
        except stream.StreamError as exc:
            self._fail(f"router sent a broken stream: {exc.condition}: {exc.text}")
            return
        for item in items:
            if isinstance(item, stream.Stanza):
                if item.name == stream.STREAM_ERROR_NAME:
                    try:
                        condition, text = stream.parse_stream_error(item.raw)
                    except stream.StreamError as exc:
                        condition, text = "unreadable stream error", exc.text
                    self._fail(f"router ended the stream: {condition}: {text}")
                else:
                    self._stanza(item)
            elif isinstance(item, stream.StreamClosed):
                self._fail("router closed the stream")

    def connectionLost(self, reason):
        self._fail(f"connection lost: {reason.getErrorMessage()}")

    # stanzas -----------------------------------------------------------------
    def _stanza(self, stanza):
        if stanza.name == "iq":
            self._iq(stanza)
            return
        if not self._logged_in or stanza.name != "message":
            return
        try:
            if stream.is_error_message(stanza.raw):
                self._error_message(stanza.raw)
                return
            event = parse_event(stanza.raw)
        except (EventError, stream.StreamError) as exc:
            log.warn("dropping an unreadable event from {address}: {error}", address=self.address, error=exc)
            return
        if event.payload_type == LEASE_NS and event.from_service == ROUTER_SERVICE:
            self.handler.link_granted(event.payload.identifier, event.payload.duration)
        else:
            self.handler.link_event(event)

    def _iq(self, stanza):
        try:
            iq = stream.parse_iq(stanza.raw)
        except stream.StreamError as exc:
            self._fail(f"router sent a broken iq: {exc.text}")
            return
        if not self._logged_in:
            if iq.iq_id != LOGIN_ID:
                return
            if iq.kind == "result":
                self._logged_in = True
                self.ready.callback(self)
            else:
                self.ready.errback(_login_failed(self.handler.service, self.address))
                self._closing = True
                self.transport.loseConnection()
            return
        waiter = self._pings.pop(iq.iq_id, None)
        if waiter is not None:
            waiter.callback(None)

    def _error_message(self, raw: bytes):
        text, echoed = stream.parse_error_message(raw)
        identifier = None
        if echoed is not None:
            try:
                payload = event_from_element(echoed).payload
            except EventError:
                payload = None
            if isinstance(payload, LeasePayload):
                identifier = payload.identifier
        self.handler.link_refused(identifier, text)

    def _fail(self, reason: str):
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

"""Client backend for NATS: PsEPR semantics on a NATS server or cluster.

Mapping (see ``nats.py`` for the subject escaping):

* an event is published to the subject of its channel; the NATS payload is
  the ``<event>`` document (the same bytes the router would carry, without
  the XMPP ``<message>`` wrapper);
* a lease is two subscriptions, ``S`` and ``S.>``, so it receives its channel
  and everything below it; each delivery is tagged with the lease it came
  for, so a connection holding overlapping leases hands each lease each
  event once;
* what the router does centrally happens here in the client: the payload-type
  filter, ``to/service`` / ``to/instance`` narrowing (against this
  connection's own service and instance), and grants: a lease is granted at
  once for ``min(requested, DEFAULT_MAX_LEASE_SECONDS)`` and lapses unless
  the connection renews it (it does, at 80 %).

Logins: the service name and password are sent as NATS ``user``/``pass``; a
server with authorization refuses wrong ones (``LoginFailed``, not retried), a
server without it ignores them.  nats-server's ``Authentication Timeout`` (our
``CONNECT`` arrived too late) says nothing about the credentials: it fails the
attempt like an unreachable server, so it is retried.

What arrives is checked before it is handed on: a payload that is not a
readable ``<event>``, or whose ``<channel>`` is not the channel of the subject
it was published on (a raw NATS publisher can put anything anywhere), is
dropped with a warning; the connection carries on.

Sending (``PsEPRConnection.send`` on this backend):

* an event larger than the link's limit -- the smaller of the server's
  ``max_payload`` (from its ``INFO``; 1 MiB unless configured) and
  ``event.MAX_EVENT_BYTES`` (what every receiver's parser accepts) -- raises
  :class:`EventTooLarge` (a :class:`~dsmt.transports.psepr.client.PsEPRError`
  and a :class:`ValueError`) naming both sizes; nothing is written and the
  connection stays up.  Publishing it anyway would make nats-server drop the
  whole connection (``Maximum Payload Violation``), or every receiver drop the
  event.  The limit is the server's, so it is known only while connected: an
  event queued while disconnected meets the check when the queue goes out
  after the reconnect (inside ``PsEPRConnection._link_up``, which does not
  catch it yet);
* the NATS connection can be gone before the client has been told (a
  ``flush()`` errback runs while the connection is being torn down): the link
  then reports the loss at once and hands the event back to the connection,
  which queues it like any send while disconnected; a lease request in that
  window is made again after the reconnect.  Neither raises.

``flush()`` fails with :class:`ConnectionError` when not connected, or when
the connection is lost before the server answered.
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from dsmt.transports.psepr.client import EventTooLarge, LoginFailed
from dsmt.transports.psepr.event import MAX_EVENT_BYTES, Event, EventError, parse_event
from dsmt.transports.psepr.leasetable import DEFAULT_MAX_LEASE_SECONDS
from dsmt.transports.psepr.nats import (
    DEFAULT_MAX_PAYLOAD, NatsAuthorizationError, NatsNotConnectedError, channel_to_subject, connect_nats,
    subtree_subjects)

log = Logger(namespace="dsmt.psepr.client")

#: Seconds allowed for TCP connect and the NATS handshake.
CONNECT_TIMEOUT = 10


class NatsLink:
    def __init__(self, protocol, handler, reactor, address=None):
        self.protocol = protocol
        self.handler = handler
        self.reactor = reactor
        self.address = address
        self._subscriptions: dict[str, tuple[str, tuple[int, int]]] = {}
        self._closing = False
        protocol.when_connection_lost().addCallback(self._lost)

    def _lost(self, reason) -> None:
        if not self._closing:
            self._closing = True
            self.handler.link_lost(self, f"connection lost: {reason}")

    @property
    def max_event_bytes(self) -> int:
        """Largest event (bytes of XML) this link sends: server ``max_payload``, at most ``MAX_EVENT_BYTES``."""
        info = self.protocol.server_info or {}
        return min(info.get("max_payload", DEFAULT_MAX_PAYLOAD), MAX_EVENT_BYTES)

    def _gone(self) -> None:
        """The protocol is no longer connected but has not told us yet: report the loss now."""
        self._lost("connection lost")

    def send(self, event: Event, data: bytes) -> None:
        """Publish ``data`` (the event's XML, already checked against the 1 MiB event limit)."""
        limit = self.max_event_bytes
        if len(data) > limit:
            where = f"{self.address}" if self.address is not None else "the NATS server"
            raise EventTooLarge(f"event on {event.channel} is {len(data)} bytes of XML; {where} accepts at most "
                                f"{limit} (server max_payload); not sent")
        try:
            self.protocol.publish(channel_to_subject(event.channel), data)
        except NatsNotConnectedError:
            self._gone()
            self.handler.send(event)  # disconnected now: queued (or SendQueueFull, as for any send)

    def request_lease(self, identifier: str, channel: str, seconds: int, payload_type: str | None) -> None:
        current = self._subscriptions.get(identifier)
        if current is None or current[0] != channel:
            if current is not None:
                self._unsubscribe(identifier)
            deliver = self._receiver(identifier)
            try:
                sids = tuple(self.protocol.subscribe(subject, deliver) for subject in subtree_subjects(channel))
            except NatsNotConnectedError:
                self._gone()  # the connection requests every lease again once reconnected
                return
            self._subscriptions[identifier] = (channel, sids)
        granted = min(seconds, DEFAULT_MAX_LEASE_SECONDS)
        self.reactor.callLater(0, self.handler.link_granted, identifier, granted)

    def _receiver(self, identifier: str):
        handler = self.handler

        def deliver(subject: str, payload: bytes, reply) -> None:
            try:
                event = parse_event(payload)
            except EventError as exc:
                log.warn("dropping an unreadable event on {subject}: {error}", subject=subject, error=exc)
                return
            if channel_to_subject(event.channel) != subject:
                log.warn("dropping an event for {channel} published on {subject}, another channel's subject",
                         channel=event.channel, subject=subject)
                return
            if event.to_service is not None and event.to_service != handler.service:
                return
            if event.to_instance is not None and event.to_instance != handler.instance:
                return
            handler.link_event(event, identifier)

        return deliver

    def _unsubscribe(self, identifier: str) -> None:
        _, sids = self._subscriptions.pop(identifier)
        for sid in sids:
            self.protocol.unsubscribe(sid)

    def release_lease(self, identifier: str, channel: str) -> None:
        if identifier in self._subscriptions:
            self._unsubscribe(identifier)

    def flush(self) -> defer.Deferred:
        try:
            pong = self.protocol.flush()
        except NatsNotConnectedError as exc:
            return defer.fail(ConnectionError(str(exc)))

        def lost(failure):
            raise ConnectionError(f"connection lost before the server answered: {failure.getErrorMessage()}") \
                from failure.value

        return pong.addErrback(lost)

    def close(self) -> None:
        self._closing = True
        self.protocol.transport.loseConnection()


def connect(reactor, address, handler) -> defer.Deferred:
    """Connect to the NATS server at ``address``; fires with a :class:`NatsLink`."""
    credentials = {}
    if handler.password is not None:
        credentials = {"user": handler.service, "password": handler.password}
    d = connect_nats(reactor, address.host, address.port, timeout=CONNECT_TIMEOUT,
                     name=f"dsmt {handler.service}/{handler.instance or '-'}", **credentials)

    def refused(failure):
        failure.trap(NatsAuthorizationError)
        if "timeout" in failure.value.message.lower():
            # nats-server's "Authentication Timeout": our CONNECT came too late (a stalled
            # reactor, a slow link); the credentials were never judged, so try again.
            raise ConnectionError(f"{address} timed out the login: {failure.value.message}")
        raise LoginFailed(f"{address} refused the login of service {handler.service!r} (wrong name or password)")

    return d.addCallbacks(lambda protocol: NatsLink(protocol, handler, reactor, address), refused)

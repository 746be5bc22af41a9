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
server with authorization refuses wrong ones (``LoginFailed``), a server
without it ignores them.
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from dsmt.transports.psepr.event import Event, EventError, event_to_xml, parse_event
from dsmt.transports.psepr.leasetable import DEFAULT_MAX_LEASE_SECONDS
from dsmt.transports.psepr.nats import (
    NatsAuthorizationError, NatsNotConnectedError, channel_to_subject, connect_nats, subtree_subjects)

log = Logger(namespace="dsmt.psepr.client")

#: Seconds allowed for TCP connect and the NATS handshake.
CONNECT_TIMEOUT = 10


class NatsLink:
    def __init__(self, protocol, handler, reactor):
        self.protocol = protocol
        self.handler = handler
        self.reactor = reactor
        self._subscriptions: dict[str, tuple[str, tuple[int, int]]] = {}
        self._closing = False
        protocol.when_connection_lost().addCallback(self._lost)

    def _lost(self, reason) -> None:
        if not self._closing:
            self._closing = True
            self.handler.link_lost(self, f"connection lost: {reason}")

    def send(self, event: Event) -> None:
        self.protocol.publish(channel_to_subject(event.channel), event_to_xml(event))

    def request_lease(self, identifier: str, channel: str, seconds: int, payload_type: str | None) -> None:
        current = self._subscriptions.get(identifier)
        if current is None or current[0] != channel:
            if current is not None:
                self._unsubscribe(identifier)
            deliver = self._receiver(identifier)
            sids = tuple(self.protocol.subscribe(subject, deliver) for subject in subtree_subjects(channel))
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
            return self.protocol.flush()
        except NatsNotConnectedError as exc:
            return defer.fail(ConnectionError(str(exc)))

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
        from dsmt.transports.psepr.client import LoginFailed
        raise LoginFailed(f"{address} refused the login of service {handler.service!r} (wrong name or password)")

    return d.addCallbacks(lambda protocol: NatsLink(protocol, handler, reactor), refused)

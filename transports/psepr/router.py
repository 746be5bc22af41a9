"""The embedded PsEPR router: sessions (pure) and their Twisted adapter.

The router speaks the XMPP-style stream the original PsEPR clients used
(``stream.py`` frames it): a stream header, a legacy ``jabber:iq:auth`` login
checked against the accounts file, then ``<message>`` stanzas each carrying
one event.  A message whose payload is a lease request changes the lease table
and is answered on the same stream with the grant (the identifier echoed, the
granted duration); any other message is routed: its header (channel, payload
type, ``to/service``, ``to/instance``) is looked up in the lease table and
**the bytes received** are written to every receiver.  Nothing is stored:
delivery is best effort.

Layers:

* :class:`RouterCore` — lease table, sessions, counters; no I/O.
* :class:`RouterSession` — one client's protocol state machine (header →
  login → open → closed); fed bytes, it calls ``send``/``close`` callables.
* :class:`RouterProtocol` / :class:`RouterFactory` — the thin Twisted
  adapter: TCP_NODELAY, a bounded output buffer with the slow-consumer policy,
  login checks off the reactor thread, the login timeout, the expiry reaper.

Slow consumers: a connection whose socket stops draining is paused by Twisted
(producer API); what the router writes to it while paused is counted, and once
that passes ``max_output_buffer`` bytes the connection is closed with a
``policy-violation`` stream error and a log line.  Memory per connection is
bounded by Twisted's high-water mark plus that limit.
"""
from __future__ import annotations

import functools
import os
import secrets
from dataclasses import dataclass, field as dc_field
from typing import Callable

from twisted.internet import defer, protocol, task, threads
from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from dsmt.transports.psepr import stream
from dsmt.transports.psepr.accounts import Accounts
from dsmt.transports.psepr.channel import ChannelError, validate_channel
from dsmt.transports.psepr.event import (
    ATTRIBUTE_NS, LEASE_NS, EventError, Event, LeasePayload, event_to_xml, parse_event)
from dsmt.transports.psepr.leasetable import DEFAULT_MAX_LEASE_SECONDS, LeaseError, LeaseTable

__all__ = ["RouterCore", "RouterSession", "RouterFactory", "RouterProtocol", "DEFAULT_PORT",
           "ROUTER_SERVICE", "STATS_CHANNEL"]

log = Logger(namespace="dsmt.psepr.router")

#: The port the original PsEPR routers listened on.
DEFAULT_PORT = 23345
#: Service name the router uses in the events it writes itself (grants, statistics).
ROUTER_SERVICE = "psepr-router"
#: Where the router publishes its counters (one attribute event per counter, instance = router name).
STATS_CHANNEL = "/org/dsmt/ns/psepr/router/stats/"
#: Bytes a client may leave unread before it is disconnected as a slow consumer.
#: 4 MiB is ~4,000 typical events: seconds of backlog for a consumer that can
#: keep up on average, while 1,000 stuck clients still cost at most 4 GB.
DEFAULT_MAX_OUTPUT_BUFFER = 4 * 1024 * 1024
#: Seconds a new connection has to log in; an idle unauthenticated socket
#: otherwise holds a slot forever.
LOGIN_TIMEOUT = 30
#: Stanzas a session holds while its login is being checked (the check runs in
#: a thread, ~30 ms); a client that floods before the answer is cut off.
MAX_PENDING_STANZAS = 64
#: Longest error text echoed back to a client (keeps replies small).
MAX_ERROR_TEXT = 300


@functools.lru_cache(maxsize=8192)
def _channel_problem(channel: str) -> str | None:
    """None for a valid channel, else the reason (cached: channels repeat on the hot path)."""
    try:
        validate_channel(channel)
    except ChannelError as exc:
        return str(exc)
    return None


@dataclass
class Counters:
    connections: int = 0
    connections_total: int = 0
    events_in: int = 0
    deliveries: int = 0
    undeliverable: int = 0
    rejected: int = 0
    lease_requests: int = 0
    slow_consumer_drops: int = 0
    protocol_errors: int = 0
    login_failures: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class RouterCore:
    """Lease table, live sessions and counters of one router; no I/O.

    ``check_login(name, password, done)`` decides logins and calls
    ``done(bool)``, now or later (the Twisted adapter runs the password hash
    in a thread).  ``None`` accounts means anyone may log in (only with the
    router's explicit ``--allow-anonymous``).
    """

    def __init__(self, *, accounts: Accounts | None, clock: Callable[[], float],
                 max_lease: int = DEFAULT_MAX_LEASE_SECONDS, name: str = "psepr",
                 check_login: Callable[[str, str, Callable[[bool], None]], None] | None = None):
        self.accounts = accounts
        self.leases = LeaseTable(clock=clock, max_duration=max_lease)
        self.name = name
        self.counters = Counters()
        self.sessions: set[RouterSession] = set()
        self.check_login = check_login or self._check_login_now

    def _check_login_now(self, name: str, password: str, done: Callable[[bool], None]) -> None:
        done(self.accounts is None or self.accounts.check(name, password))

    def stats(self) -> dict[str, int]:
        stats = self.counters.as_dict()
        stats["leases"] = len(self.leases)
        return stats

    def route(self, raw: bytes, header: stream.RouteHeader) -> int:
        """Write ``raw`` to every session whose lease matches ``header``; return how many."""
        receivers = self.leases.receivers(header.channel, header.payload_type, header.to_service, header.to_instance)
        for session in receivers:
            session.deliver(raw)
        count = len(receivers)
        self.counters.deliveries += count
        if not count:
            self.counters.undeliverable += 1
        return count

    def publish(self, event: Event) -> int:
        """Route an event the router itself writes (statistics)."""
        header = stream.RouteHeader(event.channel, event.to_service, event.to_instance,
                                    event.from_service, event.from_instance, event.payload_type)
        return self.route(stream.wrap_message(event_to_xml(event)), header)

    def publish_stats(self) -> int:
        """Publish every counter as an attribute event on :data:`STATS_CHANNEL` (if anyone listens)."""
        if not self.leases.receivers(STATS_CHANNEL, ATTRIBUTE_NS):
            return 0
        return sum(self.publish(Event.attribute(STATS_CHANNEL, name, str(value), from_service=ROUTER_SERVICE,
                                                from_instance=self.name))
                   for name, value in self.stats().items())


class RouterSession:
    """One client's stream: header → login → open → closed.

    ``send(bytes)`` writes to this client; ``close()`` drops the connection
    after what was sent.  Errors in the stream end it with a stream error;
    errors in a single event are answered with an error message and the
    stream goes on.
    """

    AWAIT_HEADER, AWAIT_LOGIN, CHECKING, OPEN, CLOSED = "await-header", "await-login", "checking", "open", "closed"

    def __init__(self, core: RouterCore, send: Callable[[bytes], None], close: Callable[[], None]):
        self.core = core
        self._send = send
        self._close = close
        self.parser = stream.StreamParser()
        self.state = self.AWAIT_HEADER
        self.username: str | None = None
        self.resource: str | None = None
        self._pending: list = []
        core.sessions.add(self)
        core.counters.connections += 1
        core.counters.connections_total += 1

    def __repr__(self):
        return f"<RouterSession {self.username or '?'}/{self.resource or '?'} {self.state}>"

    # ------------------------------------------------------------ input

    def data_received(self, data: bytes) -> None:
        if self.state == self.CLOSED:
            return
        self.core.counters.bytes_in += len(data)
        try:
            items = self.parser.feed(data)
        except stream.StreamError as exc:
            self.core.counters.protocol_errors += 1
            log.info("closing {session}: {condition}: {text}", session=self, condition=exc.condition, text=exc.text)
            self.fail(exc.condition, exc.text)
            return
        for item in items:
            if self.state == self.CLOSED:
                return
            if self.state == self.CHECKING:
                if len(self._pending) >= MAX_PENDING_STANZAS:
                    self.fail("policy-violation", "too many stanzas before the login was answered")
                    return
                self._pending.append(item)
            else:
                self._handle(item)

    def _handle(self, item) -> None:
        if isinstance(item, stream.StreamOpened):
            self._send(stream.stream_header(sender=self.core.name, stream_id=secrets.token_hex(8)))
            self.state = self.AWAIT_LOGIN
        elif isinstance(item, stream.StreamClosed):
            self.close()
        elif self.state == self.AWAIT_LOGIN:
            self._login(item)
        elif item.name == "message":
            self._message(item)
        elif item.name == "iq":
            self._iq_when_open(item)
        # presence and other stanzas carry nothing for PsEPR: ignored

    def _login(self, stanza) -> None:
        if stanza.name != "iq":
            self.core.counters.login_failures += 1
            self.fail("not-authorized", f"log in (jabber:iq:auth) before sending <{stanza.name}>")
            return
        try:
            request = stream.parse_auth(stanza.raw)
        except stream.StreamError as exc:
            self.fail(exc.condition, exc.text)
            return
        if request.kind == "get":
            self._send(stream.auth_fields_result(request.iq_id))
            return
        if not request.username or request.password is None:
            self._send(stream.auth_error(request.iq_id))
            self.core.counters.login_failures += 1
            return
        self.state = self.CHECKING
        self.core.check_login(request.username, request.password,
                              lambda ok: self._login_checked(request, ok))

    def _login_checked(self, request, ok: bool) -> None:
        if self.state != self.CHECKING:
            return  # connection went away meanwhile
        if not ok:
            self.core.counters.login_failures += 1
            log.info("login refused for {name!r}", name=request.username)
            self._send(stream.auth_error(request.iq_id))
            self.state = self.AWAIT_LOGIN
        else:
            self.username, self.resource = request.username, request.resource or None
            self._send(stream.auth_result(request.iq_id))
            self.state = self.OPEN
        pending, self._pending = self._pending, []
        for item in pending:
            if self.state == self.CLOSED:
                return
            if self.state == self.AWAIT_LOGIN and not isinstance(item, (stream.StreamClosed,)):
                self._login(item)
            else:
                self._handle(item)

    def _iq_when_open(self, stanza) -> None:
        """Answer pings (a client's flush barrier); refuse every other iq."""
        try:
            iq = stream.parse_iq(stanza.raw)
        except stream.StreamError as exc:
            self.fail(exc.condition, exc.text)
            return
        if iq.kind == "get" and iq.child_namespace == stream.NS_PING:
            self._send(stream.auth_result(iq.iq_id))  # an empty iq result
        elif iq.kind in ("get", "set"):
            self._send(stream.iq_error(iq.iq_id))

    def _message(self, stanza) -> None:
        counters = self.core.counters
        counters.events_in += 1
        header = stanza.route
        if header is None:
            counters.rejected += 1
            self._reply_error("message carries no PsEPR event")
            return
        problem = _channel_problem(header.channel) if header.channel else "to/channel is empty"
        if problem:
            counters.rejected += 1
            self._reply_error(problem)
            return
        if header.payload_type == LEASE_NS:
            self._lease(stanza.raw)
        else:
            self.core.route(stanza.raw, header)

    def _lease(self, raw: bytes) -> None:
        self.core.counters.lease_requests += 1
        try:
            request = parse_event(raw)
        except EventError as exc:
            self.core.counters.rejected += 1
            self._reply_error(str(exc))
            return
        payload = request.payload
        try:
            if payload.op == "unregister":
                self.core.leases.release(self, payload.identifier)
                granted = 0
            else:
                granted = self.core.leases.grant(
                    self, payload.identifier, request.channel, payload.duration,
                    payload_type=payload.payload_type, service=self.username, instance=self.resource).duration
        except (LeaseError, ChannelError) as exc:
            self.core.counters.rejected += 1
            self._reply_error(str(exc), event_to_xml(request))
            return
        grant = Event(request.channel, LeasePayload(payload.identifier, granted, payload.op, payload.payload_type),
                      from_service=ROUTER_SERVICE, from_instance=self.core.name)
        self._send(stream.wrap_message(event_to_xml(grant)))

    def _reply_error(self, text: str, echo: bytes | None = None) -> None:
        self._send(stream.error_message(text[:MAX_ERROR_TEXT], echo))

    # ------------------------------------------------------------ output

    def deliver(self, raw: bytes) -> None:
        """Forward a routed stanza to this client (best effort)."""
        if self.state == self.OPEN:
            self._send(raw)

    def fail(self, condition: str, text: str) -> None:
        """End the stream with a stream error."""
        if self.state == self.CLOSED:
            return
        if self.state == self.AWAIT_HEADER:
            self._send(stream.stream_header(sender=self.core.name, stream_id=secrets.token_hex(8)))
        self._send(stream.stream_error(condition, text[:MAX_ERROR_TEXT]))
        self.close()

    def close(self) -> None:
        if self.state == self.CLOSED:
            return
        if self.state != self.AWAIT_HEADER:
            self._send(stream.STREAM_CLOSE)
        self.connection_lost()
        self._close()

    def connection_lost(self) -> None:
        """Forget this session: its leases go with it."""
        if self.state == self.CLOSED:
            return
        self.state = self.CLOSED
        self._pending = []
        self.core.leases.release_holder(self)
        self.core.sessions.discard(self)
        self.core.counters.connections -= 1


# ---------------------------------------------------------------- Twisted adapter

@implementer(IPushProducer)
class RouterProtocol(protocol.Protocol):
    """Thin adapter: socket ↔ :class:`RouterSession`, with the slow-consumer policy."""

    session: RouterSession | None = None

    def connectionMade(self):
        factory = self.factory
        self.transport.setTcpNoDelay(True)
        self._paused = False
        self._written_while_paused = 0
        self.transport.registerProducer(self, True)
        self.session = RouterSession(factory.core, self._write, self.transport.loseConnection)
        self._login_timer = factory.reactor.callLater(factory.login_timeout, self._login_timed_out)

    def dataReceived(self, data):
        self.session.data_received(data)
        if self.session.state == RouterSession.OPEN and self._login_timer.active():
            self._login_timer.cancel()

    def connectionLost(self, reason):
        if self._login_timer.active():
            self._login_timer.cancel()
        if self.session is not None:
            self.session.connection_lost()

    def _login_timed_out(self):
        self.session.fail("connection-timeout", f"no login within {self.factory.login_timeout} seconds")

    def _write(self, data: bytes) -> None:
        core = self.factory.core
        core.counters.bytes_out += len(data)
        if self._paused:
            self._written_while_paused += len(data)
            if self._written_while_paused > self.factory.max_output_buffer:
                core.counters.slow_consumer_drops += 1
                log.warn("disconnecting slow consumer {session}: over {limit} bytes unread",
                         session=self.session, limit=self.factory.max_output_buffer)
                self._paused = False  # let the stream error itself through
                self.session.fail("policy-violation", "slow consumer: output buffer limit exceeded")
                self.transport.abortConnection()
                return
        self.transport.write(data)

    # IPushProducer: the transport tells us when its buffer is full / drained.
    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        self._written_while_paused = 0

    def stopProducing(self):
        pass


class RouterFactory(protocol.Factory):
    protocol = RouterProtocol

    def __init__(self, *, accounts: Accounts | None, reactor=None, max_lease: int = DEFAULT_MAX_LEASE_SECONDS,
                 max_output_buffer: int = DEFAULT_MAX_OUTPUT_BUFFER, login_timeout: float = LOGIN_TIMEOUT,
                 name: str | None = None, check_logins_in_thread: bool = True):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.max_output_buffer = max_output_buffer
        self.login_timeout = login_timeout
        self.core = RouterCore(accounts=accounts, clock=reactor.seconds, max_lease=max_lease,
                               name=name or os.uname().nodename,
                               check_login=self._check_login_in_thread if check_logins_in_thread else None)
        self._reaper = task.LoopingCall(self.core.leases.expire)
        self._reaper.clock = reactor

    def _check_login_in_thread(self, name, password, done):
        accounts = self.core.accounts
        if accounts is None:
            done(True)
            return
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), accounts.check, name, password)
        d.addCallbacks(done, lambda failure: (log.failure("login check failed", failure), done(False)))

    def startFactory(self):
        if not self._reaper.running:
            self._reaper.start(1.0, now=False)

    def stopFactory(self):
        if self._reaper.running:
            self._reaper.stop()

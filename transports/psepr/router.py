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
that passes ``max_output_buffer`` bytes the connection is aborted (its backlog
discarded; a stream error would only queue behind it), its leases released,
and a log line written.  Memory per connection is bounded by Twisted's
high-water mark plus that limit.  Note the limit is on bytes written while
paused, so a burst larger than both to one client in one reactor turn drops
even a client that reads.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Callable

from twisted.internet import protocol, task, threads
from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from dsmt.transports.psepr import stream
from dsmt.transports.psepr.accounts import Accounts
from dsmt.transports.psepr.channel import ChannelError, channel_problem
from dsmt.transports.psepr.event import (
    ATTRIBUTE_NS, EVENT_NS, LEASE_NS, AttributePayload, EventError, Event, LeasePayload, event_to_xml, parse_event)
from dsmt.transports.psepr.leasetable import (
    DEFAULT_MAX_LEASE_SECONDS, MAX_LEASES_PER_HOLDER, LeaseError, LeaseTable)

__all__ = ["RouterCore", "RouterSession", "RouterFactory", "RouterProtocol", "DEFAULT_PORT",
           "ROUTER_SERVICE", "STATS_CHANNEL", "MAX_LOGIN_ATTEMPTS", "MAX_PENDING_STANZAS", "check_router_name"]

log = Logger(namespace="dsmt.psepr.router")

#: The port the original PsEPR routers listened on.
DEFAULT_PORT = 23345
#: Service name the router uses in the events it writes itself (grants, statistics).
ROUTER_SERVICE = "psepr-router"
#: Where the router publishes its counters (one attribute event per counter, instance = router name).
STATS_CHANNEL = "/org/dsmt/ns/psepr/router/stats/"
#: Bytes a client may leave unread before it is disconnected as a slow consumer.
#: What it buys is time: how long a subscriber may fall behind what is routed to
#: it before it counts as stuck.  16 MiB is ~15,000 events of ~1.1 KB: about one
#: second at the ~15,000 events/s a Python subscriber took when this was measured
#: (bench/RESULTS.md), ~0.4 s at the ~38,000 events/s the router delivers 1→1
#: with today's client; 4 MiB dropped such a healthy subscriber ~0.25 s into an
#: unthrottled burst, after ~3,850 events.  (nats-server allows 64 MB, its
#: ``max_pending``.)  The cost: a stuck client holds up to this much, plus
#: Twisted's 64 KiB, until it is dropped, so 100 clients stuck at once on one
#: busy stream hold ~1.7 GB until their allowances fill (a second or less at the
#: rates above) and they are dropped.
DEFAULT_MAX_OUTPUT_BUFFER = 16 * 1024 * 1024
#: Seconds a new connection has to log in; an idle unauthenticated socket
#: otherwise holds a slot forever.
LOGIN_TIMEOUT = 30
#: Stanzas a session holds while its login is being checked (the check runs in
#: a thread, ~30 ms); a client that floods before the answer is cut off.
MAX_PENDING_STANZAS = 64
#: Refused logins one connection may try before its stream is ended.  A real
#: client tries once; each try costs a scrypt (~0.2 s of CPU in the thread
#: pool), so unlimited tries would let one connection keep a thread busy for
#: the whole login timeout, guessing passwords.
MAX_LOGIN_ATTEMPTS = 3
#: Longest error text echoed back to a client (keeps replies small).
MAX_ERROR_TEXT = 300


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


def check_router_name(name: str) -> str:
    """Return ``name`` if the router can write it as the instance of its own events, else raise ValueError."""
    try:
        Event(STATS_CHANNEL, AttributePayload("name", "x"), from_instance=name)
    except EventError as exc:
        raise ValueError(f"router name {name!r} cannot be the instance of its events: {exc}") from None
    return name


class RouterCore:
    """Lease table, live sessions and counters of one router; no I/O.

    ``check_login(name, password, done)`` decides logins and calls
    ``done(bool)``, now or later (the Twisted adapter runs the password hash
    in a thread).  ``None`` accounts means anyone may log in (only with the
    router's explicit ``--allow-anonymous``).  ``name`` is the instance the
    router writes in its own events (grants, statistics), so it must be a valid
    instance name (ValueError otherwise).
    """

    def __init__(self, *, accounts: Accounts | None, clock: Callable[[], float],
                 max_lease: int = DEFAULT_MAX_LEASE_SECONDS, name: str = "psepr",
                 check_login: Callable[[str, str, Callable[[bool], None]], None] | None = None,
                 max_leases_per_holder: int = MAX_LEASES_PER_HOLDER):
        check_router_name(name)
        self.accounts = accounts
        self.leases = LeaseTable(clock=clock, max_duration=max_lease, max_leases_per_holder=max_leases_per_holder)
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
    after what was sent; ``opened()``, if given, is called once the login
    succeeded (the adapter stops its login timer).  Errors in the stream end
    it with a stream error; errors in a single event are answered with an
    error message and the stream goes on.

    Until the login succeeds nothing but ``jabber:iq:auth`` iqs is accepted.
    While a login is being checked, what arrives is queued (at most
    :data:`MAX_PENDING_STANZAS`) and handled once the answer is in, in order;
    a queued second login attempt holds back everything behind it in turn.
    After :data:`MAX_LOGIN_ATTEMPTS` refused logins the stream is ended.
    """

    AWAIT_HEADER, AWAIT_LOGIN, CHECKING, OPEN, CLOSED = "await-header", "await-login", "checking", "open", "closed"

    def __init__(self, core: RouterCore, send: Callable[[bytes], None], close: Callable[[], None],
                 opened: Callable[[], None] | None = None):
        self.core = core
        self._send = send
        self._close = close
        self._opened = opened
        self.parser = stream.StreamParser()
        self.state = self.AWAIT_HEADER
        self.username: str | None = None
        self.resource: str | None = None
        self._pending: list = []
        self._refused_logins = 0
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
            self._protocol_error(exc)
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
        try:
            if stanza.name == "iq" and stream.parse_iq(stanza.raw).child_namespace == stream.NS_AUTH:
                request = stream.parse_auth(stanza.raw)
            else:
                self.core.counters.login_failures += 1
                what = "an iq of another kind" if stanza.name == "iq" else f"<{stanza.name}>"
                self.fail("not-authorized", f"log in (jabber:iq:auth) before sending {what}")
                return
        except stream.StreamError as exc:
            self._protocol_error(exc)
            return
        if request.kind == "get":
            self._send(stream.auth_fields_result(request.iq_id))
            return
        if not request.username or request.password is None:
            self._refuse_login(request)
            return
        self.state = self.CHECKING
        self.core.check_login(request.username, request.password,
                              lambda ok: self._login_checked(request, ok))

    def _login_checked(self, request, ok: bool) -> None:
        if self.state != self.CHECKING:
            return  # connection went away meanwhile
        if not ok:
            log.info("login refused for {name!r}", name=request.username)
            self.state = self.AWAIT_LOGIN
            self._refuse_login(request)
        else:
            self.username, self.resource = request.username, request.resource or None
            self._send(stream.auth_result(request.iq_id))
            self.state = self.OPEN
            if self._opened is not None:
                self._opened()
        pending, self._pending = self._pending, []
        for index, item in enumerate(pending):
            if self.state == self.CLOSED:
                return
            if self.state == self.CHECKING:
                # A queued login attempt is being checked now: what follows it
                # waits for that answer too (else it would be handled unauthenticated).
                self._pending = pending[index:] + self._pending
                return
            self._handle(item)

    def _refuse_login(self, request) -> None:
        """Answer a refused login; the last allowed one also ends the stream."""
        self.core.counters.login_failures += 1
        self._refused_logins += 1
        self._send(stream.auth_error(request.iq_id))
        if self._refused_logins >= MAX_LOGIN_ATTEMPTS:
            self.fail("not-authorized", f"{self._refused_logins} logins refused")

    def _iq_when_open(self, stanza) -> None:
        """Answer pings (a client's flush barrier); refuse every other iq."""
        try:
            iq = stream.parse_iq(stanza.raw)
        except stream.StreamError as exc:
            self._protocol_error(exc)
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
        problem = channel_problem(header.channel) if header.channel else "to/channel is empty"
        if problem:
            counters.rejected += 1
            self._reply_error(problem)
            return
        if header.payload_type in (None, EVENT_NS):  # receivers could not read it (parse_event refuses it)
            counters.rejected += 1
            self._reply_error("event has no <payload> in a namespace of its own (its type)")
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

    def _protocol_error(self, exc: stream.StreamError) -> None:
        """The client broke the stream's rules: count it, log it, end the stream."""
        self.core.counters.protocol_errors += 1
        log.info("closing {session}: {condition}: {text}", session=self, condition=exc.condition, text=exc.text)
        self.fail(exc.condition, exc.text)

    def fail(self, condition: str, text: str) -> None:
        """End the stream with a stream error (which carries the stream's close)."""
        if self.state == self.CLOSED:
            return
        if self.state == self.AWAIT_HEADER:
            self._send(stream.stream_header(sender=self.core.name, stream_id=secrets.token_hex(8)))
        self._send(stream.stream_error(condition, text[:MAX_ERROR_TEXT]))
        self._end()

    def close(self) -> None:
        """End the stream normally: close it (if it was opened) and drop the connection."""
        if self.state == self.CLOSED:
            return
        if self.state != self.AWAIT_HEADER:
            self._send(stream.STREAM_CLOSE)
        self._end()

    def _end(self) -> None:
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
    """Thin adapter: socket ↔ :class:`RouterSession`, with the slow-consumer policy.

    The protocol is the streaming producer of its own transport: Twisted calls
    :meth:`pauseProducing` when more than its buffer size (64 KiB) waits to be
    sent and :meth:`resumeProducing` once everything went out.
    """

    session: RouterSession | None = None
    _login_timer = None

    def connectionMade(self):
        factory = self.factory
        self.transport.setTcpNoDelay(True)
        self._paused = False
        self._written_while_paused = 0
        self._dropping = False
        self.transport.registerProducer(self, True)
        self.session = RouterSession(factory.core, self._write, self._close, opened=self._cancel_login_timer)
        self._login_timer = factory.clock.callLater(factory.login_timeout, self._login_timed_out)

    def dataReceived(self, data):
        self.session.data_received(data)

    def connectionLost(self, reason):
        self._cancel_login_timer()
        if self.session is not None:
            self.session.connection_lost()

    def _cancel_login_timer(self):
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._login_timer = None

    def _login_timed_out(self):
        self._login_timer = None
        self.session.fail("connection-timeout", f"no login within {self.factory.login_timeout} seconds")

    def _close(self) -> None:
        """The session is over: send what is buffered, then close.

        The producer is unregistered first: Twisted does not close a
        connection whose streaming producer is paused once the buffer drains
        (it resumes the producer instead), so a session ending while its
        client lagged would otherwise keep its socket open for ever.
        """
        self._cancel_login_timer()
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _write(self, data: bytes) -> None:
        if self._dropping:
            return  # being aborted: nothing more goes out
        core = self.factory.core
        core.counters.bytes_out += len(data)
        if self._paused:
            self._written_while_paused += len(data)
            if self._written_while_paused > self.factory.max_output_buffer:
                self._drop_slow_consumer()
                return
        self.transport.write(data)

    def _drop_slow_consumer(self) -> None:
        """Abort a connection whose client stopped reading; its leases go with it.

        The connection is aborted rather than closed: closing would first try
        to send the backlog the client is not reading.  For the same reason no
        stream error is sent (it would sit behind that backlog).
        """
        self._dropping = True
        self.factory.core.counters.slow_consumer_drops += 1
        log.warn("disconnecting slow consumer {session}: over {limit} bytes unread",
                 session=self.session, limit=self.factory.max_output_buffer)
        self.session.fail("policy-violation", "slow consumer: output buffer limit exceeded")
        self.transport.abortConnection()

    # IPushProducer: the transport tells us when its buffer is full / drained.
    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        self._written_while_paused = 0

    def stopProducing(self):
        pass


class RouterFactory(protocol.Factory):
    """Builds :class:`RouterProtocol`s around one :class:`RouterCore` (``self.core``).

    ``reactor`` runs the login checks in its thread pool; ``clock`` (default:
    the reactor) times the login timeout, the expiry reaper and the lease
    table, so tests can drive time with a :class:`twisted.internet.task.Clock`
    while the sockets stay real.
    """

    protocol = RouterProtocol

    def __init__(self, *, accounts: Accounts | None, reactor=None, clock=None,
                 max_lease: int = DEFAULT_MAX_LEASE_SECONDS, max_output_buffer: int = DEFAULT_MAX_OUTPUT_BUFFER,
                 login_timeout: float = LOGIN_TIMEOUT, name: str | None = None,
                 check_logins_in_thread: bool = True, max_leases_per_holder: int = MAX_LEASES_PER_HOLDER):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.max_output_buffer = max_output_buffer
        self.login_timeout = login_timeout
        self.core = RouterCore(accounts=accounts, clock=self.clock.seconds, max_lease=max_lease,
                               name=name or os.uname().nodename, max_leases_per_holder=max_leases_per_holder,
                               check_login=self._check_login_in_thread if check_logins_in_thread else None)
        self._reaper = task.LoopingCall(self.core.leases.expire)
        self._reaper.clock = self.clock

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

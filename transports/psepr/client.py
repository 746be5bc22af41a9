"""PsEPR client: :class:`PsEPRConnection`, the same API over every backend.

::

    conn = PsEPRConnection.from_urls(["psepr://127.0.0.1:23345"], service="xyz1_mgr",
                                     password="…", instance="node1.example.org")
    yield conn.connect()
    lease = conn.lease("/org/dsmt/ns/deployment/xyz1/", 600, callback=print)
    yield lease.ready                      # fires once the first grant arrives
    conn.send(Event.attribute("/org/dsmt/ns/deployment/xyz1/x/status/", "deployment-status", "…"))
    async for event in lease: ...          # or iterate, inside a coroutine

Backends (chosen by the URL scheme, one configuration value):

* ``psepr://host[:port]`` — the embedded router (``router.py``), over the
  XMPP-style stream; the router grants leases and routes events.
* ``nats://host[:port]`` — a NATS server or cluster (``backend_nats.py``);
  channels become subjects, leases become subscriptions, grants and expiry
  happen client-side with the same maximum as the router's default.

Contract, whatever the backend:

* Each lease receives every matching event once (a connection holding leases
  on ``/a/`` and ``/a/b/`` gets an event on ``/a/b/x/`` once, delivered to
  both leases).
* Leases are renewed at 80 % of the granted time; an unanswered request is
  sent again every 20 s up to 10 times (as the original clients did); after
  a reconnect every lease is registered again before queued sends go out.
* **Sends while disconnected are queued**, up to :data:`MAX_QUEUED_SENDS`
  events; past that :meth:`PsEPRConnection.send` raises :class:`SendQueueFull`
  at once, so a caller never loses an event silently.  After :meth:`close`,
  ``send`` raises :class:`ConnectionClosed`.
* Reconnection: exponential backoff with jitter (0.5 s doubling to 30 s, each
  delay drawn between half and all of the current step), moving to the next
  address of the list after each failure (failover).  A refused login is not
  retried: it will not get better by itself.
"""
from __future__ import annotations

import itertools
from collections import deque
import random
import secrets
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dsmt.transports.psepr.channel import validate_channel
from dsmt.transports.psepr.event import MAX_EVENT_BYTES, Event, canonical_payload_type, event_to_xml

__all__ = ["PsEPRConnection", "Lease", "Address", "PsEPRError", "ConnectFailed", "LoginFailed",
           "LeaseRefused", "SendQueueFull", "ConnectionClosed", "EventTooLarge", "parse_url", "MAX_QUEUED_SENDS",
           "DEFAULT_LEASE_SECONDS"]

log = Logger(namespace="dsmt.psepr.client")

#: Events kept while disconnected.  A reconnect takes seconds; 1,000 events
#: cover a burst of status changes from a busy node without letting a long
#: outage grow memory without bound (1,000 × ≤1 MiB worst case, ~1 MB typical).
MAX_QUEUED_SENDS = 1000
#: Lease length asked for when the caller does not say (the original default).
DEFAULT_LEASE_SECONDS = 3600
#: Renew when this fraction of the granted time has passed.
RENEW_AT = 0.8
#: Re-send an unanswered lease request after this many seconds, this many times.
LEASE_RETRY_SECONDS = 20
LEASE_RETRIES = 10
#: Reconnect backoff: first step, growth factor, cap (seconds).
BACKOFF_INITIAL, BACKOFF_FACTOR, BACKOFF_MAX = 0.5, 2.0, 30.0
#: Events a lease keeps for an async iterator that is not reading; older ones
#: are dropped (counted in ``Lease.dropped``) rather than growing memory.
MAX_ITERATOR_BACKLOG = 10_000


class PsEPRError(Exception):
    """Base of the client's errors."""


class ConnectFailed(PsEPRError):
    """No address of the list could be reached."""


class LoginFailed(PsEPRError):
    """The router (or NATS server) refused the service name and password."""


class LeaseRefused(PsEPRError):
    """The router refused a lease request; the message gives its reason."""


class SendQueueFull(PsEPRError):
    """Disconnected, and :data:`MAX_QUEUED_SENDS` events are already waiting."""


class ConnectionClosed(PsEPRError):
    """The connection was closed by its owner."""


class EventTooLarge(PsEPRError, ValueError):
    """The event's XML is larger than PsEPR carries (:data:`MAX_EVENT_BYTES`) or the server accepts."""


@dataclass(frozen=True)
class Address:
    scheme: str  # "psepr" or "nats"
    host: str
    port: int

    def __str__(self):
        return f"{self.scheme}://{self.host}:{self.port}"


DEFAULT_PORTS = {"psepr": 23345, "nats": 4222}


def parse_url(url: str) -> Address:
    """``psepr://host[:port]`` or ``nats://host[:port]`` → :class:`Address` (ValueError names the problem)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"router address {url!r} must start with psepr:// or nats://")
    if not parts.hostname:
        raise ValueError(f"router address {url!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"router address {url!r} must be scheme://host[:port] and nothing else")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise ValueError(f"router address {url!r} has an invalid port") from None
    return Address(parts.scheme, parts.hostname, port)


class Lease:
    """A lease held by a :class:`PsEPRConnection`; delivers the events it covers.

    ``ready`` fires with the lease on the first grant, or fails with
    :class:`LeaseRefused` (or the connection's error).  Events go to every
    callback added, and to async iterators (``async for event in lease``).
    """

    def __init__(self, connection: "PsEPRConnection", identifier: str, channel: str, seconds: int,
                 payload_type: str | None):
        self.connection = connection
        self.identifier = identifier
        self.channel = channel
        self.requested = seconds
        self.payload_type = canonical_payload_type(payload_type) or None
        self.granted: int | None = None
        self.expires_at: float | None = None
        self.released = False
        self.received = 0
        self.dropped = 0
        self.ready: Deferred = Deferred()
        self._callbacks: list[Callable[[Event], object]] = []
        self._backlog: deque[Event] = deque(maxlen=MAX_ITERATOR_BACKLOG)
        self._waiters: list[Deferred] = []
        self._iterated = False
        self._renew_call = None
        self._retry_call = None
        self._attempts = 0

    def __repr__(self):
        return f"<Lease {self.identifier} {self.channel} type={self.payload_type} granted={self.granted}>"

    def add_callback(self, callback: Callable[[Event], object]) -> None:
        self._callbacks.append(callback)

    def covers(self, event: Event) -> bool:
        return (event.channel.startswith(self.channel)
                and (self.payload_type is None or self.payload_type == event.payload_type))

    def active(self) -> bool:
        return (not self.released and self.expires_at is not None
                and self.connection.reactor.seconds() < self.expires_at)

    def release(self) -> None:
        """Stop receiving; the router is told if connected (best effort, no answer awaited)."""
        self.connection._release(self)

    # async iteration ----------------------------------------------------
    def __aiter__(self):
        self._iterated = True
        return self

    def __anext__(self) -> Deferred:
        if self._backlog:
            return defer.succeed(self._backlog.popleft())
        if self.released:
            return defer.fail(StopAsyncIteration())
        waiter = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _deliver(self, event: Event) -> None:
        self.received += 1
        for callback in tuple(self._callbacks):  # a callback may add callbacks
            try:
                callback(event)
            except Exception:
                log.failure("lease {lease} callback failed", lease=self)
        if self._waiters:
            self._waiters.pop(0).callback(event)
        elif self._iterated or not self._callbacks:  # kept for an iterator, now or later
            if len(self._backlog) == self._backlog.maxlen:
                self.dropped += 1  # the deque drops the oldest
            self._backlog.append(event)

    def _end(self) -> None:
        for waiter in self._waiters:
            waiter.errback(StopAsyncIteration())
        self._waiters = []


class PsEPRConnection:
    """One logical connection to PsEPR over a list of addresses (failover)."""

    def __init__(self, addresses: list[Address], *, service: str, password: str | None = None,
                 instance: str | None = None, reactor=None, max_queued_sends: int = MAX_QUEUED_SENDS,
                 rng: random.Random | None = None):
        if not addresses:
            raise ValueError("at least one router address is needed")
        schemes = {address.scheme for address in addresses}
        if len(schemes) != 1:
            raise ValueError("all router addresses must use the same backend (psepr:// or nats://)")
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.addresses = list(addresses)
        self.service = service
        self.password = password
        self.instance = instance
        self.max_queued_sends = max_queued_sends
        self.backend = _backend(schemes.pop())
        self.link = None
        self.leases: dict[str, Lease] = {}
        self.sent = 0
        self.received = 0
        self._queue: list[tuple[Event, bytes]] = []
        self._closed = False
        self._rng = rng or random.Random()
        self._ids = (f"{secrets.token_hex(4)}-{n}" for n in itertools.count(1))
        self._address_index = 0
        self._failures = 0
        self._reconnect_call = None
        self._connecting = False
        self._connected_waiters: list[Deferred] = []
        self._keep_trying = True

    @classmethod
    def from_urls(cls, urls, **kwargs) -> "PsEPRConnection":
        if isinstance(urls, str):
            urls = [u for u in urls.split(",") if u.strip()]
        return cls([parse_url(url) for url in urls], **kwargs)

    # ------------------------------------------------------------ connecting

    @property
    def connected(self) -> bool:
        return self.link is not None

    def connect(self, *, retry: bool = True) -> Deferred:
        """Connect; fires with self once logged in.

        With ``retry`` (daemons) it keeps trying with backoff until it
        succeeds; without (command-line tools) it tries each address once and
        fails with :class:`ConnectFailed` naming them.  A refused login fails
        with :class:`LoginFailed` either way.
        """
        if self._closed:
            return defer.fail(ConnectionClosed("connection was closed"))
        if self.link is not None:
            return defer.succeed(self)
        self._keep_trying = retry
        waiter = Deferred()
        self._connected_waiters.append(waiter)
        if not self._connecting and self._reconnect_call is None:
            self._attempt(tries_left=len(self.addresses))
        return waiter

    def _attempt(self, tries_left: int) -> None:
        self._reconnect_call = None
        if self._closed:
            return
        self._connecting = True
        address = self.addresses[self._address_index]
        d = self.backend.connect(self.reactor, address, self)
        d.addCallbacks(lambda link: self._link_up(link, address),
                       lambda failure: self._link_failed(failure, address, tries_left - 1))

    def _link_up(self, link, address: Address) -> None:
        self._connecting = False
        if self._closed:
            link.close()
            return
        log.info("connected to {address}", address=address)
        self.link = link
        self._failures = 0
        for lease in self.leases.values():
            lease._attempts = 0
            self._request(lease)
        queued, self._queue = self._queue, []
        for event, xml in queued:
            try:
                self._send_now(event, xml)
            except PsEPRError as exc:  # e.g. over this server's own max_payload: that event only
                log.warn("queued event on {channel} not sent: {error}", channel=event.channel, error=exc)
        waiters, self._connected_waiters = self._connected_waiters, []
        for waiter in waiters:
            waiter.callback(self)

    def _link_failed(self, failure, address: Address, tries_left: int) -> None:
        self._connecting = False
        if failure.check(LoginFailed):
            self._give_up(failure)
            return
        log.info("cannot reach {address}: {error}", address=address, error=failure.getErrorMessage())
        self._address_index = (self._address_index + 1) % len(self.addresses)
        if not self._keep_trying and tries_left <= 0:
            names = ", ".join(str(a) for a in self.addresses)
            self._give_up(ConnectFailed(f"cannot reach {names}: {failure.getErrorMessage()}"))
            return
        self._schedule_reconnect(tries_left)

    def _schedule_reconnect(self, tries_left: int) -> None:
        if not self._keep_trying:  # a command-line tool: one quick pass over the list
            self._reconnect_call = self.reactor.callLater(0, self._attempt, tries_left)
            return
        step = min(BACKOFF_MAX, BACKOFF_INITIAL * BACKOFF_FACTOR ** self._failures)
        self._failures += 1
        delay = step / 2 + self._rng.uniform(0, step / 2)
        self._reconnect_call = self.reactor.callLater(delay, self._attempt, len(self.addresses))

    def _give_up(self, failure, *, quietly: bool = False) -> None:
        """Fail everyone waiting for a connection; with nobody waiting, log why (unless ``quietly``)."""
        waiters, self._connected_waiters = self._connected_waiters, []
        for waiter in waiters:
            waiter.errback(failure)
        if not waiters and not quietly:
            log.error("giving up: {error}", error=getattr(failure, "getErrorMessage", lambda: failure)())

    # called by links ----------------------------------------------------
    def link_lost(self, link, reason: str) -> None:
        if link is not self.link:
            return
        self.link = None
        for lease in self.leases.values():
            _cancel(lease, "_retry_call")
            _cancel(lease, "_renew_call")
        if self._closed:
            return
        log.info("connection lost ({reason}); reconnecting", reason=reason)
        self._keep_trying = True
        self._address_index = (self._address_index + 1) % len(self.addresses)  # fail over first
        self._schedule_reconnect(len(self.addresses))

    def link_event(self, event: Event, identifier: str | None = None) -> None:
        """An event arrived; ``identifier`` names the lease it came for, or None to match locally.

        Every event of a subscriber passes here, so :meth:`Lease.active` and
        :meth:`Lease.covers` are inlined, with the clock read once per event.
        """
        self.received += 1
        if identifier is not None:
            lease = self.leases.get(identifier)
            if lease is not None and lease.active() and lease.covers(event):
                lease._deliver(event)
            return
        channel = event.channel
        payload_type = event.payload.namespace
        now = self.reactor.seconds()
        for lease in tuple(self.leases.values()):  # a callback may take or release leases
            expires_at = lease.expires_at
            if (expires_at is not None and now < expires_at and not lease.released
                    and channel.startswith(lease.channel)
                    and (lease.payload_type is None or lease.payload_type == payload_type)):
                lease._deliver(event)

    def link_granted(self, identifier: str, seconds: int) -> None:
        lease = self.leases.get(identifier)
        if lease is None or lease.released:
            return
        _cancel(lease, "_retry_call")
        lease.granted = seconds
        lease.expires_at = self.reactor.seconds() + seconds
        lease._attempts = 0
        _cancel(lease, "_renew_call")
        lease._renew_call = self.reactor.callLater(max(seconds * RENEW_AT, 0.1), self._renew, lease)
        if not lease.ready.called:
            lease.ready.callback(lease)

    def link_refused(self, identifier: str, reason: str) -> None:
        lease = self.leases.pop(identifier, None)
        if lease is None:
            log.warn("router refused an event: {reason}", reason=reason)
            return
        self._forget(lease)
        if not lease.ready.called:
            lease.ready.errback(LeaseRefused(reason))
        else:
            log.warn("lease {lease} refused on renewal: {reason}", lease=lease, reason=reason)

    # ------------------------------------------------------------ API

    def send(self, event: Event) -> None:
        """Send an event (best effort).  Queued while disconnected; see the module docstring.

        An event without a sender is sent as coming from this connection's
        service and instance, as the original clients did.
        """
        if self._closed:
            raise ConnectionClosed("connection was closed")
        if not isinstance(event, Event):
            raise TypeError(f"send() takes an Event, not {type(event).__name__}")
        if event.from_service is None and event.from_instance is None:
            event = event.with_sender(self.service, self.instance)
        xml = event_to_xml(event)
        if len(xml) > MAX_EVENT_BYTES:
            raise EventTooLarge(f"event on {event.channel} is {len(xml)} bytes of XML; PsEPR carries at most "
                                f"{MAX_EVENT_BYTES}; not sent")
        if self.link is None:
            if len(self._queue) >= self.max_queued_sends:
                raise SendQueueFull(f"disconnected and {len(self._queue)} events already queued")
            self._queue.append((event, xml))
            return
        self._send_now(event, xml)

    def _send_now(self, event: Event, xml: bytes) -> None:
        self.link.send(event, xml)
        self.sent += 1

    def flush(self) -> Deferred:
        """Fires once everything sent so far has been processed by the router (a round trip).

        Fails with :class:`ConnectionError` when not connected.
        """
        if self.link is None:
            return defer.fail(ConnectionError("not connected"))
        return self.link.flush()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def lease(self, channel: str, seconds: int = DEFAULT_LEASE_SECONDS, payload_type: str | None = None, *,
              callback: Callable[[Event], object] | None = None) -> Lease:
        """Ask for a lease on ``channel`` (and every channel below it); returns at once."""
        if self._closed:
            raise ConnectionClosed("connection was closed")
        validate_channel(channel)
        if not isinstance(seconds, int) or seconds < 1:
            raise ValueError(f"lease length must be a positive number of seconds, not {seconds!r}")
        lease = Lease(self, next(self._ids), channel, seconds, payload_type)
        if callback is not None:
            lease.add_callback(callback)
        self.leases[lease.identifier] = lease
        if self.link is not None:
            self._request(lease)
        return lease

    def _request(self, lease: Lease) -> None:
        if self.link is None or lease.released:
            return
        lease._attempts += 1
        _cancel(lease, "_retry_call")
        retry = self._request if lease._attempts < LEASE_RETRIES else self._unanswered
        lease._retry_call = self.reactor.callLater(LEASE_RETRY_SECONDS, retry, lease)
        self.link.request_lease(lease.identifier, lease.channel, lease.requested, lease.payload_type)

    def _unanswered(self, lease: Lease) -> None:
        lease._retry_call = None
        self.link_refused(lease.identifier, f"no answer to {LEASE_RETRIES} lease requests")

    def _renew(self, lease: Lease) -> None:
        lease._renew_call = None
        lease._attempts = 0
        self._request(lease)

    def _release(self, lease: Lease) -> None:
        if lease.released:
            return
        self.leases.pop(lease.identifier, None)
        self._forget(lease)
        if self.link is not None:
            self.link.release_lease(lease.identifier, lease.channel)

    def _forget(self, lease: Lease) -> None:
        lease.released = True
        _cancel(lease, "_retry_call")
        _cancel(lease, "_renew_call")
        lease._end()

    def close(self) -> None:
        """Release every lease, drop the link and stop reconnecting.  Queued sends are discarded."""
        if self._closed:
            return
        for lease in list(self.leases.values()):
            self._release(lease)
        self._closed = True
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        self._queue = []
        link, self.link = self.link, None
        if link is not None:
            link.close()
        self._give_up(ConnectionClosed("connection was closed"), quietly=True)  # closing is not an error


def _cancel(lease: Lease, attribute: str) -> None:
    call = getattr(lease, attribute)
    if call is not None and call.active():
        call.cancel()
    setattr(lease, attribute, None)


def _backend(scheme: str):
    if scheme == "psepr":
        from dsmt.transports.psepr import backend_router
        return backend_router
    from dsmt.transports.psepr import backend_nats
    return backend_nats

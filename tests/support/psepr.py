"""Live PsEPR backends for tests: an in-process router on port 0, or a real nats-server.

Both harnesses give a URL for :class:`PsEPRConnection` and connections logged
in as one of :data:`USERS`; every service's password is :data:`PASSWORD`.
"""
from __future__ import annotations

from twisted.internet import defer, reactor

from dsmt.transports.psepr.accounts import Accounts, passwd_line
from dsmt.transports.psepr.client import PsEPRConnection
from dsmt.transports.psepr.router import RouterFactory

USERS = ("alice", "bob", "carol", "pldb")
PASSWORD = "correct horse"
_ACCOUNTS_TEXT = None


_ACCOUNTS = None


def shared_accounts() -> Accounts:
    """One :class:`Accounts` for every router of the run: it remembers verified logins, so each
    user costs one scrypt per test run instead of one per test."""
    global _ACCOUNTS
    if _ACCOUNTS is None:
        _ACCOUNTS = Accounts.parse(accounts_text())
    return _ACCOUNTS


def accounts_text() -> str:
    """An accounts file for :data:`USERS` (hashed once per test run: scrypt is deliberately slow)."""
    global _ACCOUNTS_TEXT
    if _ACCOUNTS_TEXT is None:
        _ACCOUNTS_TEXT = "".join(passwd_line(name, PASSWORD) + "\n" for name in USERS)
    return _ACCOUNTS_TEXT


class RouterHarness:
    """A router in this process, listening on 127.0.0.1 on a port the kernel picks."""

    scheme = "psepr"

    def __init__(self, **factory_options):
        self.factory_options = factory_options
        self.factory = None
        self.port = None
        self._port_number = 0

    def start(self):
        self.factory = RouterFactory(accounts=shared_accounts(), **self.factory_options)
        self.port = reactor.listenTCP(self._port_number, self.factory, interface="127.0.0.1")
        self._port_number = self.port.getHost().port
        return defer.succeed(self)

    @property
    def url(self) -> str:
        return f"psepr://127.0.0.1:{self._port_number}"

    @property
    def core(self):
        return self.factory.core

    @defer.inlineCallbacks
    def stop(self):
        """Stop listening and drop every client connection (as a crashed router would)."""
        if self.port is not None:
            yield self.port.stopListening()
            self.port = None
            for session in list(self.factory.core.sessions):
                session.close()


class NatsHarness:
    """A nats-server process (see ``tests/support/natsserver.py``)."""

    scheme = "nats"

    def __init__(self, server):
        self.server = server

    def start(self):
        return defer.succeed(self)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.server.port}"

    def stop(self):
        return defer.succeed(None)


def connect(url: str, user: str = "alice", *, instance: str = "node1", password: str = PASSWORD,
            retry: bool = False) -> defer.Deferred:
    """A logged-in :class:`PsEPRConnection` (fires with it)."""
    connection = PsEPRConnection.from_urls(url, service=user, password=password, instance=instance)
    return connection.connect(retry=retry)


class Collector:
    """Collects a lease's events; ``wait(n)`` fires once ``n`` have arrived."""

    def __init__(self):
        self.events = []
        self._waiters = []

    def __call__(self, event):
        self.events.append(event)
        for count, waiter in list(self._waiters):
            if len(self.events) >= count:
                self._waiters.remove((count, waiter))
                waiter.callback(self.events)

    def wait(self, count: int) -> defer.Deferred:
        if len(self.events) >= count:
            return defer.succeed(self.events)
        waiter = defer.Deferred()
        self._waiters.append((count, waiter))
        return waiter

    def values(self):
        return [event.payload.value for event in self.events]


@defer.inlineCallbacks
def listen(connection, channel: str, payload_type: str | None = None, seconds: int = 60):
    """A granted lease whose events go to a :class:`Collector` (fires with it; ``collector.lease``).

    Fires after a flush round trip, so the lease is in force for anything sent afterwards.
    """
    collector = Collector()
    lease = connection.lease(channel, seconds, payload_type, callback=collector)
    yield lease.ready
    yield connection.flush()
    collector.lease = lease
    return collector


class FakeClock:
    """Seconds for a lease table, moved by hand (``clock.now = …``)."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

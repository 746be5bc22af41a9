"""Ask PLDB for the last values under a channel (the library behind ``psepr query``).

::

    result = await query_pldb(connection, "/org/dsmt/ns/deployment/xyz1/", timeout=10)
    for attr in result.attrs: print(attr.channel, attr.field, attr.value)

The caller's connection leases a fresh reply channel
(``/org/dsmt/ns/pldb/reply/<random>/``, attribute-list type only), sends the
query to PLDB's query channel, and gathers reply parts until all have arrived
or ``timeout`` seconds pass; the lease is released either way.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

from twisted.internet import defer

from dsmt.transports.psepr.event import Event, EventError
from dsmt.transports.psepr.pldbwire import PLDBATTRLIST_NS, PldbAttr, PldbQuery, parse_reply

__all__ = ["query_pldb", "PldbResult", "DEFAULT_QUERY_CHANNEL", "REPLY_ROOT"]

DEFAULT_QUERY_CHANNEL = "/org/dsmt/ns/pldb/query/"
REPLY_ROOT = "/org/dsmt/ns/pldb/reply/"
#: Lease on the reply channel: long enough for any answer, short enough to lapse if we vanish.
REPLY_LEASE_SECONDS = 120


@dataclass
class PldbResult:
    attrs: list[PldbAttr]
    parts_received: int
    parts_expected: int | None  # None: no answer at all

    @property
    def complete(self) -> bool:
        return self.parts_expected is not None and self.parts_received == self.parts_expected


async def query_pldb(connection, channel: str, *, field: str | None = None,
                     pldb_channel: str = DEFAULT_QUERY_CHANNEL, timeout: float = 10.0,
                     malformed=lambda error: None) -> PldbResult:
    """Query PLDB; returns what arrived within ``timeout`` (see :class:`PldbResult`)."""
    query_id = secrets.token_hex(8)
    reply_channel = f"{REPLY_ROOT}{query_id}/"
    parts: dict[int, object] = {}
    done = defer.Deferred()

    def on_reply(event):
        try:
            reply = parse_reply(event.payload)
        except EventError as exc:
            malformed(exc)
            return
        if reply.query_id != query_id:
            return
        parts[reply.part] = reply
        if len(parts) == reply.parts and not done.called:
            done.callback(None)

    lease = connection.lease(reply_channel, REPLY_LEASE_SECONDS, PLDBATTRLIST_NS, callback=on_reply)
    try:
        await lease.ready
        query = PldbQuery(query_id, channel, reply_channel, field)
        connection.send(Event(pldb_channel, query.payload()))
        timer = connection.reactor.callLater(timeout, lambda: done.called or done.callback(None))
        await done
        if timer.active():
            timer.cancel()
    finally:
        lease.release()
    expected = next(iter(parts.values())).parts if parts else None
    return PldbResult([attr for n in sorted(parts) for attr in parts[n].attrs], len(parts), expected)

"""The router's lease table: who receives an event (pure, no I/O).

A *lease* is held by a *holder* (for the router: one client connection, any
hashable object here) under an identifier the client chose.  It covers a
channel and every channel below it, optionally only one payload type, for a
granted number of seconds; it lapses unless renewed.

:meth:`LeaseTable.receivers` answers "who receives an event sent to channel C
with payload type T, addressed to service S and instance I": every holder of
an unexpired lease on C or on a parent of C, whose payload filter is empty or
equal to T, and — when S or I are given — whose own service name / instance
(from its login) equals them.  A holder with several matching leases is
listed once.

The table is a trie keyed by channel segment, so a lookup costs one step per
segment of C plus the leases found on the way, independent of how many leases
exist elsewhere.  Time comes from an injectable ``clock`` (seconds, monotonic)
so expiry is tested without waiting.

The router asks the same question for every event it routes, and the answers
change only when a lease is granted, renewed, released or reaped (each bumps
the table's :attr:`~LeaseTable.generation`) or when a lease lapses.  So
:meth:`LeaseTable.receivers` remembers its answers per (channel, payload type,
to/service, to/instance) within one generation (a bump forgets them all), each
with the span of clock time over which it stays exact: from the lookup to the
earliest expiry among the leases it found.  A lookup outside that span looks
again, so a lease still lapses exactly at its time, before the reaper runs, as
without the cache.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

from dsmt.transports.psepr.channel import channel_segments
from dsmt.transports.psepr.event import canonical_payload_type

__all__ = ["LeaseTable", "Lease", "LeaseError", "DEFAULT_MAX_LEASE_SECONDS", "MAX_LEASES_PER_HOLDER",
           "RECEIVERS_CACHE_SIZE", "MAX_CACHED_KEY_CHARS", "MAX_CACHED_HOLDERS"]

#: Longest lease a router grants unless configured otherwise.  The original
#: clients asked for 3600 s by default and renewed at 80 %; an hour bounds how
#: long a vanished client's leases linger when its connection is not closed.
DEFAULT_MAX_LEASE_SECONDS = 3600
#: Most leases one holder may keep.  A client leases a handful of channels;
#: 16,384 covers a PLDB or a monitor watching every slice of a large
#: deployment while keeping one misbehaving client from filling the router's
#: memory (each lease costs a few hundred bytes).
MAX_LEASES_PER_HOLDER = 16_384
#: Most answers :meth:`LeaseTable.receivers` remembers.  When full it starts
#: afresh rather than tracking recency: every lease change starts it afresh
#: anyway, so entries are short-lived, and a hit stays one dict lookup.  A
#: router sees a few hundred to a few thousand distinct (channel, type, to)
#: headers between two lease changes (the status channels of every node of a
#: deployment); 4,096 covers that.  Memory: an entry of a typical header
#: (~100-character channel, a few holders) is ~0.4 KB, 1.6 MB for a full cache;
#: the two limits below bound the worst entry to ~4 KB (measured: a 512-character
#: key of 4-byte characters, 256 holders), 17 MB for a full cache, whatever
#: senders write.
RECEIVERS_CACHE_SIZE = 4096
#: Longest header (channel + payload type + service + instance, in characters)
#: whose answer is remembered.  Real headers are 100-300 characters; the payload
#: type, though, is whatever namespace a sender writes (up to a whole stanza),
#: and remembering it would let a sender pin that much memory per entry.
MAX_CACHED_KEY_CHARS = 512
#: Largest answer (holders) remembered.  Delivering to that many costs far more
#: than looking them up, so remembering gains little, and it bounds the entry.
MAX_CACHED_HOLDERS = 256


class LeaseError(ValueError):
    """A lease request the table refuses; the message says why."""


@dataclass(eq=False, slots=True)
class Lease:
    holder: Hashable
    identifier: str
    channel: str
    payload_type: str | None
    service: str | None
    instance: str | None
    duration: int
    expires_at: float


@dataclass(slots=True)
class _Node:
    children: dict = field(default_factory=dict)
    leases: list = field(default_factory=list)


class LeaseTable:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 max_duration: int = DEFAULT_MAX_LEASE_SECONDS,
                 max_leases_per_holder: int = MAX_LEASES_PER_HOLDER):
        if max_duration < 1:
            raise ValueError("max_duration must be at least one second")
        self._clock = clock
        self.max_duration = max_duration
        self.max_leases_per_holder = max_leases_per_holder
        self._root = _Node()
        self._by_key: dict[tuple, Lease] = {}
        self._by_holder: dict[Hashable, dict[str, Lease]] = {}
        self._expiry_heap: list[tuple[float, int, Lease]] = []
        self._sequence = 0
        #: Bumped by every change to the set of leases (grant, renewal, release, expiry).
        self.generation = 0
        # receivers() answers of this generation (forgotten at once on a bump, so
        # they never keep a departed holder alive): key -> (holders, exact from
        # this clock time, until this one (excluded))
        self._cache: dict[tuple, tuple[list, float, float]] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def holders(self) -> int:
        return len(self._by_holder)

    # ------------------------------------------------------------ changes

    def grant(self, holder: Hashable, identifier: str, channel: str, requested: int, *,
              payload_type: str | None = None, service: str | None = None,
              instance: str | None = None) -> Lease:
        """Grant (or renew, for the same holder and identifier) a lease; return it.

        The granted duration is ``min(requested, max_duration)``.  Renewing
        with another channel or filter moves the lease.  Raises
        :class:`LeaseError` for a bad channel, a duration under one second or
        a holder over its lease limit.
        """
        segments = channel_segments(channel)  # raises ChannelError (a ValueError) naming the problem
        if not isinstance(requested, int) or requested < 1:
            raise LeaseError(f"lease duration must be at least 1 second, not {requested!r}")
        key = (holder, identifier)
        old = self._by_key.get(key)
        if old is not None:
            self._unlink(old)
        elif len(self._by_holder.get(holder, ())) >= self.max_leases_per_holder:
            raise LeaseError(f"holder already has {self.max_leases_per_holder} leases, the most allowed")
        duration = min(requested, self.max_duration)
        lease = Lease(holder, identifier, channel, canonical_payload_type(payload_type) or None,
                      service, instance, duration, self._clock() + duration)
        node = self._root
        for segment in segments:
            node = node.children.setdefault(segment, _Node())
        node.leases.append(lease)
        self._by_key[key] = lease
        self._by_holder.setdefault(holder, {})[identifier] = lease
        self._sequence += 1
        heapq.heappush(self._expiry_heap, (lease.expires_at, self._sequence, lease))
        self._changed()
        return lease

    def release(self, holder: Hashable, identifier: str) -> Lease | None:
        """Drop one lease; return it, or None if the holder had no such lease."""
        lease = self._by_key.get((holder, identifier))
        if lease is not None:
            self._unlink(lease)
        return lease

    def release_holder(self, holder: Hashable) -> list[Lease]:
        """Drop every lease of ``holder`` (its connection closed); return them."""
        leases = list(self._by_holder.get(holder, {}).values())
        for lease in leases:
            self._unlink(lease)
        return leases

    def expire(self) -> list[Lease]:
        """Drop every lease whose time has come; return them (oldest first)."""
        now = self._clock()
        expired = []
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            expires_at, _, lease = heapq.heappop(heap)
            if self._by_key.get((lease.holder, lease.identifier)) is lease and lease.expires_at == expires_at:
                self._unlink(lease)
                expired.append(lease)
        return expired

    def next_expiry(self) -> float | None:
        """Clock time at which the next lease lapses (None when there are none)."""
        heap = self._expiry_heap
        while heap and self._by_key.get((heap[0][2].holder, heap[0][2].identifier)) is not heap[0][2]:
            heapq.heappop(heap)  # drop heap entries of released or renewed leases
        return heap[0][0] if heap else None

    def _changed(self) -> None:
        """The set of leases changed: a new generation, whose receivers are yet to be looked up."""
        self.generation += 1
        if self._cache:
            self._cache.clear()

    def _unlink(self, lease: Lease) -> None:
        self._changed()
        del self._by_key[(lease.holder, lease.identifier)]
        mine = self._by_holder[lease.holder]
        del mine[lease.identifier]
        if not mine:
            del self._by_holder[lease.holder]
        segments = channel_segments(lease.channel)
        path = [self._root]
        for segment in segments:
            path.append(path[-1].children[segment])
        path[-1].leases.remove(lease)
        for depth in range(len(segments), 0, -1):  # prune empty branches
            node = path[depth]
            if node.leases or node.children:
                break
            del path[depth - 1].children[segments[depth - 1]]

    # ------------------------------------------------------------ lookups

    def leases_of(self, holder: Hashable) -> list[Lease]:
        return list(self._by_holder.get(holder, {}).values())

    def receivers(self, channel: str, payload_type: str | None = None,
                  to_service: str | None = None, to_instance: str | None = None) -> list[Hashable]:
        """Holders that receive an event with this header, each once, in lease order.

        ``channel`` must already be valid (the caller parsed it); an unknown
        or invalid channel simply has no receivers beyond the root's leases.
        The answer is a new list, the caller's to keep.
        """
        now = self._clock()
        key = (channel, payload_type, to_service, to_instance)
        cache = self._cache
        hit = cache.get(key)
        if hit is not None and hit[1] <= now < hit[2]:
            return hit[0].copy()
        holders, until = self._lookup(channel, payload_type, to_service, to_instance, now)
        if (len(holders) <= MAX_CACHED_HOLDERS and MAX_CACHED_KEY_CHARS
                >= len(channel) + len(payload_type or "") + len(to_service or "") + len(to_instance or "")):
            if len(cache) >= RECEIVERS_CACHE_SIZE:
                cache.clear()
            cache[key] = (holders, now, until)
            return holders.copy()
        return holders

    def _lookup(self, channel: str, payload_type: str | None, to_service: str | None, to_instance: str | None,
                now: float) -> tuple[list[Hashable], float]:
        """The receivers at clock time ``now``, and the earliest expiry among the leases that select them.

        The answer stays exact from ``now`` until that expiry (excluded): the
        leases found are all still alive until then, and those left out for
        having lapsed stay lapsed.
        """
        payload_type = canonical_payload_type(payload_type)
        found: dict[Hashable, None] = {}
        until = math.inf
        node = self._root
        segments = channel[1:-1].split("/") if len(channel) > 1 else ()
        index = 0
        while node is not None:
            for lease in node.leases:
                expires_at = lease.expires_at
                if (expires_at > now
                        and (lease.payload_type is None or lease.payload_type == payload_type)
                        and (to_service is None or lease.service == to_service)
                        and (to_instance is None or lease.instance == to_instance)):
                    found[lease.holder] = None
                    if expires_at < until:
                        until = expires_at
            if index == len(segments):
                break
            node = node.children.get(segments[index])
            index += 1
        return list(found), until

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
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

from dsmt.transports.psepr.channel import channel_segments
from dsmt.transports.psepr.event import canonical_payload_type

__all__ = ["LeaseTable", "Lease", "LeaseError", "DEFAULT_MAX_LEASE_SECONDS", "MAX_LEASES_PER_HOLDER"]

#: Longest lease a router grants unless configured otherwise.  The original
#: clients asked for 3600 s by default and renewed at 80 %; an hour bounds how
#: long a vanished client's leases linger when its connection is not closed.
DEFAULT_MAX_LEASE_SECONDS = 3600
#: Most leases one holder may keep.  A client leases a handful of channels;
#: 16,384 covers a PLDB or a monitor watching every slice of a large
#: deployment while keeping one misbehaving client from filling the router's
#: memory (each lease costs a few hundred bytes).
MAX_LEASES_PER_HOLDER = 16_384


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

    def _unlink(self, lease: Lease) -> None:
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
        """
        now = self._clock()
        payload_type = canonical_payload_type(payload_type)
        found: dict[Hashable, None] = {}
        node = self._root
        segments = channel[1:-1].split("/") if len(channel) > 1 else ()
        index = 0
        while node is not None:
            for lease in node.leases:
                if (lease.expires_at > now
                        and (lease.payload_type is None or lease.payload_type == payload_type)
                        and (to_service is None or lease.service == to_service)
                        and (to_instance is None or lease.instance == to_instance)):
                    found[lease.holder] = None
            if index == len(segments):
                break
            node = node.children.get(segments[index])
            index += 1
        return list(found)

"""Node manager core: tickets in, leases out.  Pure: no reactor, clock injected.

Decisions:

* One sliver per slice per node: a *different* ticket for a slice that already
  holds an unexpired lease here is refused with ``already-leased``; extending a
  lease is the explicit :meth:`NodeManager.renew`.  An expired lease not yet
  reaped also refuses: only :meth:`NodeManager.reap` removes leases, so its
  caller always learns which slivers to delete.
* Redeeming the *same* ticket (same ticket id) while its lease exists returns
  that lease unchanged, also after a restart (the store is durable).  Checked
  after signature verification, so only a valid ticket gets an answer.
* A ticket whose lease was released or reaped cannot be redeemed again
  (``replayed``): redeemed ticket ids are kept until the ticket's not_after
  plus the verification skew, after which it fails verification anyway.
* Lease length = min(ticket.leaselen, max_lease_seconds); expires_at = now + that.
* Slots: the ticket's ``slots`` resource (0 if absent).
* Owner: :meth:`NodeManager.redeem` records the caller it is given (the
  certificate subject of a signed request, or None) on a new lease; checking it
  on later operations is the node service's job (:mod:`.node`).
"""
from __future__ import annotations

import math
import uuid
from typing import Callable, Collection

from dsmt.server.agent.tickets import DEFAULT_MAX_SKEW, TicketError, Ticket, verify_ticket
from dsmt.server.refusal import Refusal
from dsmt.server.utctime import utc_text
from dsmt.server.slicemanager.spec import normalize_node_address
from .store import ACTIVE, Lease, LeaseStore

#: Longest lease granted, whatever a ticket asks: the dslice HOWTO's 14 days.
DEFAULT_MAX_LEASE_SECONDS = 14 * 24 * 3600

CAPACITY = "capacity"
POLICY = "policy"
ALREADY_LEASED = "already-leased"
REPLAYED = "replayed"


class AdmissionRefused(Refusal):
    """A redeem was refused: ``code`` (capacity, policy, already-leased, replayed, or a TicketError code)."""
    #: SOAP fault name (``Client.AdmissionRefused.<code>``, see dsmt.server.faults).
    fault = "AdmissionRefused"


class NoLease(Refusal):
    """renew/release of a slice that holds no unexpired lease here (code ``no-lease``)."""
    fault = "NoLease"

    def __init__(self, reason: str):
        super().__init__("no-lease", reason)


#: A policy hook returns None to admit, or a reason string to refuse.
Policy = Callable[[Ticket], "str | None"]


class NodeManager:
    def __init__(self, node_address: str, trust, store: LeaseStore, clock: Callable[[], float], *,
                 capacity_slots: int, max_lease_seconds: int = DEFAULT_MAX_LEASE_SECONDS,
                 issuers: Collection[str] | None = None, policy: Policy | None = None):
        if capacity_slots < 0 or max_lease_seconds < 1:
            raise ValueError("capacity_slots must be >= 0 and max_lease_seconds >= 1")
        self.node_address = normalize_node_address(node_address)
        self._trust, self._store, self._clock = trust, store, clock
        self.capacity_slots, self.max_lease_seconds = capacity_slots, max_lease_seconds
        self._issuers, self._policy = issuers, policy

    @property
    def store(self) -> LeaseStore:
        """The durable store (the node service keeps its sliver records there too)."""
        return self._store

    def now(self) -> int:
        """The injected clock, in whole POSIX seconds (the unit of every lease time)."""
        return math.floor(self._clock())

    def redeem(self, ticket_bytes: bytes, owner: str | None = None) -> Lease:
        """Verify a ticket for this node and grant (or return the existing) lease; raises AdmissionRefused.

        ``owner`` is recorded on a new lease; the existing lease of the same ticket is returned as it is
        (whoever owns it).  A refusal changes nothing in the store.
        """
        now = self.now()
        try:
            ticket = verify_ticket(ticket_bytes, self._trust, now=now, node=self.node_address,
                                   issuers=self._issuers)
        except TicketError as exc:
            raise AdmissionRefused(exc.code, exc.reason) from None
        same = self._store.by_ticket(ticket.ticket_id)
        if same is not None and now < same.expires_at:
            return same
        if same is None and self._store.was_redeemed(ticket.ticket_id):
            raise AdmissionRefused(REPLAYED, f"ticket {ticket.ticket_id} was already redeemed and its lease ended")
        held = self._store.by_slice(ticket.slice_name)
        if held is not None:
            # Expired but not yet reaped also refuses: only reap() removes a lease, so the caller
            # always learns which slivers to delete.  Retry after reap().
            raise AdmissionRefused(ALREADY_LEASED, f"slice {ticket.slice_name} already holds lease "
                                   f"{held.lease_id} (expires {utc_text(held.expires_at)}); renew it, or "
                                   "delete it first")
        if self._policy is not None:
            reason = self._policy(ticket)
            if reason is not None:
                raise AdmissionRefused(POLICY, reason)
        slots = ticket.resources.get("slots", 0)
        used = self._used(now)
        if used + slots > self.capacity_slots:
            raise AdmissionRefused(CAPACITY, f"{slots} slot{'' if slots == 1 else 's'} asked, {used} of "
                                             f"{self.capacity_slots} in use")
        length = min(ticket.leaselen, self.max_lease_seconds)
        lease = Lease(uuid.uuid4().hex, ticket.ticket_id, ticket.slice_name, ticket.node, slots, now,
                      now + length, length, ACTIVE, owner)
        self._store.insert(lease, ticket.not_after)
        return lease

    def lease(self, slice_name: str) -> Lease | None:
        """The slice's lease, expired or not (an expired one stays until :meth:`reap`)."""
        return self._store.by_slice(slice_name)

    def held(self, slice_name: str) -> Lease:
        """The slice's unexpired lease, else raise NoLease."""
        lease = self._store.by_slice(slice_name)
        if lease is None or self.now() >= lease.expires_at:
            raise NoLease(f"slice {quoted(slice_name)} holds no lease on {self.node_address}")
        return lease

    def _used(self, now: int) -> int:
        return sum(lease.slots for lease in self._store.all() if now < lease.expires_at)

    def slots_in_use(self) -> int:
        """Slots of the unexpired leases (what admission counts against ``capacity_slots``)."""
        return self._used(self.now())

    def renew(self, slice_name: str) -> Lease:
        """New expiry = now + leaselen ("renewing at time t, valid until t + leaselen")."""
        lease = self.held(slice_name)
        expires = self.now() + lease.leaselen
        self._store.set_expiry(slice_name, expires)
        return self._store.by_slice(slice_name)

    def release(self, slice_name: str) -> Lease:
        lease = self.held(slice_name)
        self._store.delete([lease.lease_id])
        return lease

    def leases(self) -> list[Lease]:
        """Unexpired leases, soonest expiry first."""
        now = self.now()
        return [l for l in self._store.all() if now < l.expires_at]

    def expirations(self) -> dict[str, int]:
        """slice -> expires_at of unexpired leases."""
        return {l.slice: l.expires_at for l in self.leases()}

    def reap(self) -> list[Lease]:
        """Remove leases with expires_at <= now in one transaction; return them (caller deletes slivers)."""
        now = self.now()
        gone = [l for l in self._store.all() if l.expires_at <= now]
        if gone:
            self._store.delete([l.lease_id for l in gone])
        self._store.forget_redeemed(now - DEFAULT_MAX_SKEW)
        return gone


#: Longest slice name quoted in a refusal: a valid one is at most 32 characters; a hostile megabyte is cut.
_SHOWN_CHARS = 40


def quoted(name: str) -> str:
    """``name`` as quoted in a refusal sentence, cut to :data:`_SHOWN_CHARS`."""
    text = str(name)
    return repr(text) if len(text) <= _SHOWN_CHARS else repr(text[:_SHOWN_CHARS]) + "…"

"""The agent's pure core: which nodes exist, how much they can take, and ticket issuance.

* :class:`NodeRegistry` — the nodes the agent advertises, each with a
  capacity in *slots* (one slot = one sliver), from configuration or from
  node managers registering; and the agent's reservations against them.
* :class:`Agent` — ``issue(spec)`` turns a :class:`~dsmt.server.slicemanager.
  spec.SliceSpec` into one signed ticket per node, or raises
  :class:`ShortageError` having changed nothing; ``getads()`` lists the nodes
  and their free capacity.

Choosing nodes (deterministic, so the same state gives the same answer):

* ``spec.ips`` given: the nodes are taken from that list only, in the user's
  order, skipping those that cannot take the slice (unknown to the agent, or
  no free slot), until ``numnodes`` are found — the dslice HOWTO's "allocate m
  of the n nodes starting from the beginning of the list … if m nodes cannot
  be allocated, an error will be reported".
* otherwise: every registered node with a free slot, **most free slots
  first**, ties broken by address (:func:`~dsmt.server.slicemanager.spec.
  node_sort_key`: IPv4 numerically, then IPv6, then host names) — spreading
  slices over the emptiest nodes, and reproducible in tests and logs.

All or nothing: the nodes are chosen and every ticket is signed *before*
any slot is reserved; a shortage or a signing failure leaves the registry
exactly as it was.  The :class:`ShortageError` names how many nodes were
asked for, how many were available, and each preferred node refused and why.

Reservations: each ticket reserves one slot of its node until
``not_after + leaselen`` — the latest a lease obtained with it can end
(redeemed at the last moment, never renewed).  A ticket never redeemed thus
holds its slot for a while longer than necessary: conservative by design,
because the node manager does the final admission control and the agent must
not promise the same slot twice.  :meth:`NodeRegistry.release` frees a slot
early (slice deleted).  Lease renewals are not seen by the agent; nodes
re-registering with their used capacity is the next step (see DESIGN).

Term of a ticket: ``not_before = now`` and ``not_after = now +
ticket_validity`` (default :data:`DEFAULT_TICKET_VALIDITY`, one hour).  The
ticket's term is how long it may be *redeemed*; the lease's length is the
separate ``leaselen`` field.  One hour covers ``svm createslice`` on many
nodes with retries (the HOWTO: "several minutes"), while an unused or leaked
ticket stops being worth anything soon.

Pure: no I/O; time comes from the injected ``clock`` (POSIX seconds); ticket
ids from the injected ``new_id``.  Not thread-safe (one reactor thread).
"""
from __future__ import annotations

import heapq
import time
import uuid
from urllib.parse import urlsplit
from dataclasses import dataclass
from typing import Callable

from cryptography import x509

from dsmt.server.agent.tickets import MAX_TICKET_LEASELEN, Ticket, sign_ticket
from dsmt.server.slicemanager.spec import SliceSpec, SliceSpecError, check_slice_name, node_sort_key, \
    normalize_node_address
from dsmt.transports.soap.pki import subject_text

__all__ = [
    "NodeRegistry", "NodeAd", "Agent", "AgentError", "ShortageError", "RegistryError",
    "DEFAULT_TICKET_VALIDITY", "MAX_TICKET_VALIDITY", "MAX_SLOTS", "MAX_NODES", "SLOTS", "MAX_ENDPOINT_CHARS",
    "check_endpoint",
]

#: Seconds a ticket may be redeemed in (see the module docstring).
DEFAULT_TICKET_VALIDITY = 3600
#: Longest ticket term configurable: a day.  Longer makes a leaked ticket a
#: long-lived credential, and reservations pile up for unredeemed tickets.
MAX_TICKET_VALIDITY = 24 * 3600
#: Most slots one node may declare: far above any real machine's slivers;
#: a typo or a hostile registration should not advertise a million.
MAX_SLOTS = 10_000
#: Most nodes an agent knows: ten times PlanetLab's size; bounds memory and getads' answer.
MAX_NODES = 100_000
#: The resource a ticket grants: one sliver's slot.
SLOTS = "slots"
#: Longest node manager endpoint URL accepted: ``https://`` + a 253-character host name + port and path
#: fit in 300; 1024 leaves room and keeps getads' answer for MAX_NODES nodes bounded.
MAX_ENDPOINT_CHARS = 1024


class AgentError(Exception):
    """The agent cannot do what was asked; the message says why."""


class RegistryError(AgentError, ValueError):
    """A node registration or configuration is not acceptable."""


class ShortageError(AgentError):
    """Too few nodes can take the slice; nothing was issued or reserved.

    ``asked``: nodes required; ``available``: nodes that could take it;
    ``refused``: ``(node, reason)`` for each preferred node skipped, in list order.
    """

    def __init__(self, slice_name: str, asked: int, available: int, refused: tuple[tuple[str, str], ...]):
        self.slice_name = slice_name
        self.asked = asked
        self.available = available
        self.refused = refused
        message = (f"slice {slice_name} needs {asked} node{'s' if asked != 1 else ''}; "
                   f"only {available} {'is' if available == 1 else 'are'} available")
        if refused:
            message += "; preferred nodes refused: " + "; ".join(f"{node}: {why}" for node, why in refused)
        super().__init__(message)


@dataclass(frozen=True)
class NodeAd:
    """One advertised node: its address, its capacity in slots, how many are free now, and its node
    manager's endpoint URL (None when the agent was not told one)."""

    node: str
    slots: int
    free: int
    endpoint: str | None = None


@dataclass
class _Node:
    slots: int
    used: int = 0
    endpoint: str | None = None


def check_endpoint(endpoint: str) -> str:
    """``endpoint`` if it is a usable node manager URL — ``http``/``https``, a host, at most
    :data:`MAX_ENDPOINT_CHARS` characters, no whitespace, control characters, user name or fragment —
    else :class:`RegistryError` naming the problem."""
    if not isinstance(endpoint, str) or not endpoint:
        raise RegistryError("the endpoint must be an http:// or https:// URL, not empty")
    if len(endpoint) > MAX_ENDPOINT_CHARS:
        raise RegistryError(f"the endpoint is {len(endpoint)} characters, over the limit of {MAX_ENDPOINT_CHARS}")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7f for ch in endpoint):
        raise RegistryError(f"the endpoint {endpoint[:100]!r} holds whitespace or control characters")
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018  (raises ValueError for a port out of range or not a number)
    except ValueError as exc:
        raise RegistryError(f"the endpoint {endpoint[:100]!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RegistryError(f"the endpoint {endpoint[:100]!r} is not an http:// or https:// URL with a host")
    if parts.username is not None or parts.fragment:
        raise RegistryError(f"the endpoint {endpoint[:100]!r} must not carry a user name or a fragment")
    return endpoint


class NodeRegistry:
    """Nodes and their capacity, and the agent's reservations of slots.

    ``register(node, slots, endpoint=None)`` adds a node or changes its
    capacity (a node manager registering, or the operator's configuration);
    a capacity below the slots currently reserved leaves the node full, not
    negative.  ``endpoint`` (:func:`check_endpoint`) is the node manager's
    URL advertised with the node; None keeps the one known (if any).
    ``unregister(node)`` stops advertising it (its reservations are dropped
    with it).  Addresses are normalised (:func:`normalize_node_address`), so
    ``Host.Example.`` and ``host.example`` are one node.

    Reservations: ``reserve(ticket_id, node, until)`` / ``release(ticket_id)``
    and ``expire(now)``, which frees every reservation whose ``until`` has
    passed.  ``free(node, now)`` expires first.
    """

    def __init__(self, nodes: dict[str, int] | None = None, *, max_nodes: int = MAX_NODES):
        self.max_nodes = max_nodes
        self._nodes: dict[str, _Node] = {}
        self._reservations: dict[str, tuple[str, float]] = {}   # ticket id -> (node, until)
        self._expiry: list[tuple[float, str]] = []               # heap of (until, ticket id)
        for node, slots in (nodes or {}).items():
            self.register(node, slots)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: str) -> bool:
        try:
            return normalize_node_address(node) in self._nodes
        except SliceSpecError:
            return False

    @staticmethod
    def _address(node: str) -> str:
        try:
            return normalize_node_address(node)
        except SliceSpecError as exc:
            raise RegistryError(str(exc)) from None

    def register(self, node: str, slots: int, endpoint: str | None = None) -> str:
        """Add ``node`` with ``slots`` capacity (and ``endpoint``), or set them; returns the normalised address."""
        address = self._address(node)
        if type(slots) is not int or not 0 <= slots <= MAX_SLOTS:
            raise RegistryError(f"node {address}: capacity must be a whole number of slots in 0..{MAX_SLOTS}, "
                                f"not {slots!r}")
        if endpoint is not None:
            try:
                check_endpoint(endpoint)
            except RegistryError as exc:
                raise RegistryError(f"node {address}: {exc}") from None
        entry = self._nodes.get(address)
        if entry is None:
            if len(self._nodes) >= self.max_nodes:
                raise RegistryError(f"cannot register {address}: the agent already knows {self.max_nodes} nodes")
            self._nodes[address] = _Node(slots, endpoint=endpoint)
        else:
            entry.slots = slots
            if endpoint is not None:
                entry.endpoint = endpoint
        return address

    def unregister(self, node: str) -> None:
        """Stop advertising ``node``; raises RegistryError if it is not registered."""
        address = self._address(node)
        if self._nodes.pop(address, None) is None:
            raise RegistryError(f"node {address} is not registered")
        for ticket_id in [t for t, (n, _) in self._reservations.items() if n == address]:
            del self._reservations[ticket_id]

    def expire(self, now: float) -> None:
        """Free every reservation whose end has passed."""
        heap = self._expiry
        while heap and heap[0][0] <= now:
            until, ticket_id = heapq.heappop(heap)
            held = self._reservations.get(ticket_id)
            if held is not None and held[1] == until:
                self._release(ticket_id)

    def reserve(self, ticket_id: str, node: str, until: float) -> None:
        """Hold one slot of ``node`` for ``ticket_id`` until ``until``; the node must have a free slot."""
        entry = self._nodes.get(node)
        if entry is None:
            raise RegistryError(f"node {node} is not registered")
        if ticket_id in self._reservations:
            raise RegistryError(f"ticket {ticket_id} already holds a reservation")
        if entry.used >= entry.slots:
            raise RegistryError(f"node {node} has no free slot")
        entry.used += 1
        self._reservations[ticket_id] = (node, until)
        heapq.heappush(self._expiry, (until, ticket_id))

    def release(self, ticket_id: str) -> bool:
        """Free the slot ``ticket_id`` holds; False if it holds none (already released or expired)."""
        if ticket_id not in self._reservations:
            return False
        self._release(ticket_id)
        return True

    def _release(self, ticket_id: str) -> None:
        node, _ = self._reservations.pop(ticket_id)
        entry = self._nodes.get(node)
        if entry is not None and entry.used > 0:
            entry.used -= 1

    def capacity(self, node: str) -> int | None:
        """Slots ``node`` declared; None if it is not registered."""
        entry = self._nodes.get(node)
        return None if entry is None else entry.slots

    def holds(self, ticket_id: str) -> bool:
        """Whether ``ticket_id`` holds a reservation now (as of the last expiry)."""
        return ticket_id in self._reservations

    def free(self, node: str, now: float) -> int | None:
        """Free slots of ``node`` at ``now``; None if it is not registered."""
        self.expire(now)
        entry = self._nodes.get(node)
        return None if entry is None else max(0, entry.slots - entry.used)

    def ads(self, now: float) -> list[NodeAd]:
        """Every node, most free slots first, ties by address (:func:`node_sort_key`)."""
        self.expire(now)
        ads = [NodeAd(node, entry.slots, max(0, entry.slots - entry.used), entry.endpoint)
               for node, entry in self._nodes.items()]
        ads.sort(key=lambda ad: (-ad.free, node_sort_key(ad.node)))
        return ads


class Agent:
    """Issues signed tickets for slice specs against a :class:`NodeRegistry`.

    ``key``/``cert``: the agent's signing key and its (service) certificate;
    tickets name ``subject_text(cert)`` as issuer.  ``clock``: POSIX seconds.
    ``ticket_validity``: seconds a ticket may be redeemed in.
    ``max_leaselen``: longest lease a ticket may carry (14 days; the node
    manager's cap).  ``new_id``: fresh ticket ids (default: random UUID hex).
    """

    def __init__(self, registry: NodeRegistry, key, cert: x509.Certificate, clock: Callable[[], float] = time.time,
                 *, ticket_validity: int = DEFAULT_TICKET_VALIDITY, max_leaselen: int = MAX_TICKET_LEASELEN,
                 new_id: Callable[[], str] = lambda: uuid.uuid4().hex):
        if type(ticket_validity) is not int or not 1 <= ticket_validity <= MAX_TICKET_VALIDITY:
            raise ValueError(f"ticket validity must be 1..{MAX_TICKET_VALIDITY} seconds, not {ticket_validity!r}")
        if type(max_leaselen) is not int or not 1 <= max_leaselen <= MAX_TICKET_LEASELEN:
            raise ValueError(f"max_leaselen must be 1..{MAX_TICKET_LEASELEN} seconds, not {max_leaselen!r}")
        self.registry = registry
        self.cert = cert
        self.issuer = subject_text(cert)
        self.clock = clock
        self.ticket_validity = ticket_validity
        self.max_leaselen = max_leaselen
        self.new_id = new_id
        self._key = key

    def getads(self) -> list[NodeAd]:
        """The advertised nodes and their free capacity now (the order :meth:`issue` uses without ``ips``)."""
        return self.registry.ads(self.clock())

    def choose(self, spec: SliceSpec, now: float) -> list[str]:
        """The nodes :meth:`issue` would use for ``spec`` at ``now``, or :class:`ShortageError`; changes nothing."""
        registry = self.registry
        if spec.ips:
            chosen: list[str] = []
            refused: list[tuple[str, str]] = []
            for node in spec.ips:
                if len(chosen) == spec.numnodes:
                    break
                free = registry.free(node, now)
                if free is None:
                    refused.append((node, "not a node this agent knows"))
                elif free == 0:
                    slots = registry.capacity(node)
                    refused.append((node, f"full (0 of {slots} slot{'s' if slots != 1 else ''} free)"))
                else:
                    chosen.append(node)
            if len(chosen) < spec.numnodes:
                raise ShortageError(spec.name, spec.numnodes, len(chosen), tuple(refused))
            return chosen
        candidates = [ad.node for ad in registry.ads(now) if ad.free > 0]
        if len(candidates) < spec.numnodes:
            raise ShortageError(spec.name, spec.numnodes, len(candidates), ())
        return candidates[:spec.numnodes]

    def issue(self, spec: SliceSpec) -> list[bytes]:
        """One signed ticket per node for ``spec`` (in the order the nodes were chosen), or an error with
        nothing reserved: :class:`ShortageError`, or :class:`AgentError` for a spec this agent refuses."""
        self._check(spec)
        now = self.clock()
        nodes = self.choose(spec, now)
        start = int(now)
        not_after = start + self.ticket_validity
        tickets = []
        for node in nodes:
            ticket = Ticket(self.new_id(), spec.name, node, {SLOTS: 1}, start, not_after, self.issuer, spec.leaselen)
            tickets.append((ticket, sign_ticket(ticket, self._key, self.cert)))
        ids = [ticket.ticket_id for ticket, _ in tickets]
        if len(set(ids)) != len(ids) or any(self.registry.holds(ticket_id) for ticket_id in ids):
            raise AgentError("the ticket id source repeated an id; nothing was issued")
        for ticket, _ in tickets:   # cannot fail now: every node was seen free at `now` and ids are new
            self.registry.reserve(ticket.ticket_id, ticket.node, not_after + spec.leaselen)
        return [data for _, data in tickets]

    def _check(self, spec: SliceSpec) -> None:
        if not isinstance(spec, SliceSpec):
            raise AgentError(f"expected a SliceSpec, not {type(spec).__name__}")
        try:
            check_slice_name(spec.name)
        except SliceSpecError as exc:
            raise AgentError(str(exc)) from None
        if type(spec.numnodes) is not int or spec.numnodes < 1:
            raise AgentError(f"numnodes must be at least 1, not {spec.numnodes!r}")
        if type(spec.leaselen) is not int or not 1 <= spec.leaselen <= self.max_leaselen:
            raise AgentError(f"lease length {spec.leaselen!r} s is not in 1..{self.max_leaselen} s")
        normalized = []
        for node in spec.ips:
            try:
                address = normalize_node_address(node)
            except SliceSpecError as exc:
                raise AgentError(str(exc)) from None
            if address != node:
                raise AgentError(f"preferred node {node!r} is not normalised (parse specs with parse_slice_spec)")
            normalized.append(address)
        if len(set(normalized)) != len(normalized):
            raise AgentError("the preferred node list has duplicates")

"""The container manager of reference 003, as the slice manager plays it: node progress in, status events out.

The slice manager selects nodes for a slice and drives each through its sliver's creation; it tells a
:class:`ContainerManager` what happens, and the container manager publishes reference 003's events
(builders in :mod:`dsmt.server.statusevents`, all for service ``<slice>_mgr``, sent from ``sender``):

========================================  ================  =======================
call                                      ``sliver-state``  status in ``node-list``
========================================  ================  =======================
``select(nodes)``                         ``selected``      ``selected``
``creating(node)``                        ``installing``    ``creating``
``initializing(node)``                    ``installing``    ``initializing``
``installed(node)``                       ``installed``     ``running``
``failed(node, reason)``                  ``failed``        ``not-responding``
``failed(node, reason, timeout=True)``    ``failed``        ``timeout-creating``
``deselect(node)``                        ``deselected``    ``deselected``
========================================  ================  =======================

Publication contract:

* A ``sliver-state`` event is published for a node only when its sliver state changes, and one
  ``node-list`` event (the whole list, in selection order) per call, only when some node's status
  changed: ``creating`` twice publishes nothing the second time; ``initializing`` after ``creating``
  publishes only the ``node-list`` (the sliver is still ``installing``).  ``select`` publishes one
  ``sliver-state`` per node, then one ``node-list``.
* **A deselected node leaves the list once reported**: ``deselect`` publishes its ``sliver-state``
  ``deselected`` and a ``node-list`` in which it appears as ``deselected``, then forgets it; later
  ``node-list`` events (and :meth:`ContainerManager.refresh`) no longer carry it, and its last
  ``sliver-state`` ages out at the listeners after ``STATUS_EXPIRE``.  So the list is bounded by the
  slice's current nodes, and a node can be selected again later (unless it was excluded).
* :meth:`ContainerManager.refresh` re-publishes every node's ``sliver-state`` and the ``node-list``
  (an empty list too: "no nodes" is a status), since each value expires after
  :data:`~dsmt.server.statusevents.STATUS_EXPIRE` seconds; :meth:`~ContainerManager.next_refresh` says
  when the next one is due (every :data:`REFRESH_INTERVAL` seconds from the first publication), so a
  Twisted adapter schedules it with ``callLater``.

Progress calls are the slice manager's own code: a call that makes no sense (a node not in the list,
selecting a node twice or an excluded node, a name that is not a node address) raises
:class:`ContainerStateError` before anything is published.

Commands: :meth:`ContainerManager.handle` takes any event the container-mgr channel delivers and
accepts only a ``node-exclude`` for this slice naming a node in the list.  It never raises because of
the event: everything else (another channel, service or slice, a payload that is not an attribute,
another field — the manager's own ``node-list`` echoed back among them —, a malformed, oversized or
forged value, an unknown host, a node already excluded) comes back as :attr:`Handled.ignored`, a
:class:`~dsmt.server.refusal.Refusal` whose code is one of :data:`IGNORE_CODES`, for the adapter to log.
An accepted command returns the actions the slice manager carries out: :class:`Exclude` (delete that
sliver, then call ``deselect``) and, when ``keep_size`` is set, fewer than ``keep_size`` nodes are
left and ``choose_replacement`` offers one, :class:`Select` (obtain a sliver there and call
``select``).  Excluded nodes are never selected again for this slice: ``select`` refuses them, and
``choose_replacement`` is handed them, with every current and pending node, as the set to avoid.

Pure: no I/O, no reactor; time comes from ``clock`` (POSIX seconds), events leave through ``publish``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Union

from dsmt.server.refusal import Refusal
from dsmt.server.slicemanager.spec import MAX_NUMNODES, SliceSpecError, check_slice_name, normalize_node_address
from dsmt.server.statusevents import (NODE_EXCLUDE, STATUS_EXPIRE, StatusValueError, container_mgr_channel,
                                      manager_service, node_list, parse_node_exclude, sliver_state)
from dsmt.transports.psepr.event import AttributePayload, Event

__all__ = ["ContainerManager", "ContainerStateError", "Exclude", "Select", "Handled", "REFRESH_INTERVAL",
           "MAX_REASON_CHARS", "IGNORE_CODES"]

#: Seconds between re-publications of the whole status.  Each value is valid for STATUS_EXPIRE (90)
#: seconds and a value published between two refreshes is re-sent at the next one, so no value is
#: ever older than this when re-sent; 60 leaves 30 seconds for delivery through the router.
REFRESH_INTERVAL = 60
assert REFRESH_INTERVAL < STATUS_EXPIRE

#: Longest failure reason kept for a node: a sentence for the slice manager's log and health report,
#: not a traceback or a remote error page.
MAX_REASON_CHARS = 500

#: Why :meth:`ContainerManager.handle` ignores an event.
IGNORE_CODES = ("wrong-channel", "wrong-service", "wrong-payload", "wrong-field", "malformed", "wrong-slice",
                "unknown-host", "already-excluded")


class ContainerStateError(ValueError):
    """A progress call the container manager cannot apply; the message says why."""


@dataclass(frozen=True, slots=True)
class Exclude:
    """Delete ``host``'s sliver (then call :meth:`ContainerManager.deselect`)."""

    host: str


@dataclass(frozen=True, slots=True)
class Select:
    """Obtain a sliver on ``host`` as a replacement (then call :meth:`ContainerManager.select`)."""

    host: str


Action = Union[Exclude, Select]


@dataclass(frozen=True, slots=True)
class Handled:
    """What :meth:`ContainerManager.handle` made of an event.

    ``actions`` to carry out, in order; ``ignored``: why the event was ignored (then no actions);
    ``note``: a remark on an accepted command (why no replacement was selected), for the log.
    """

    actions: tuple[Action, ...] = ()
    ignored: Refusal | None = None
    note: str | None = None


# Progress call → (sliver-state, node-list status).
_SELECTED = ("selected", "selected")
_CREATING = ("installing", "creating")
_INITIALIZING = ("installing", "initializing")
_INSTALLED = ("installed", "running")
_NOT_RESPONDING = ("failed", "not-responding")
_TIMEOUT = ("failed", "timeout-creating")
_DESELECTED = ("deselected", "deselected")


def _shown(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


class ContainerManager:
    """Reference 003's container manager for one slice (see the module docstring for the contract).

    ``publish`` receives each event; ``sender`` is the ``from`` instance (the slice manager's host);
    ``clock`` returns POSIX seconds; ``keep_size`` (1..MAX_NUMNODES or None) is the size the slice is
    kept at after exclusions; ``choose_replacement(avoid)`` returns a node address not in ``avoid``, or
    None when there is none.
    """

    def __init__(self, slice_name: str, *, publish: Callable[[Event], None], sender: str,
                 clock: Callable[[], float], keep_size: int | None = None,
                 choose_replacement: Callable[[set[str]], str | None] | None = None):
        try:
            check_slice_name(slice_name)
        except SliceSpecError as exc:
            raise ContainerStateError(str(exc)) from None
        if not isinstance(sender, str) or not sender or sender != sender.strip():
            raise ContainerStateError(f"sender {sender!r} must be a non-empty name without surrounding whitespace")
        if keep_size is not None and (isinstance(keep_size, bool) or not isinstance(keep_size, int)
                                      or not 1 <= keep_size <= MAX_NUMNODES):
            raise ContainerStateError(f"keep_size {keep_size!r} is not a whole number from 1 to {MAX_NUMNODES}")
        self.slice_name = slice_name
        self.sender = sender
        self.keep_size = keep_size
        self._publish = publish
        self._clock = clock
        self._choose = choose_replacement
        self._channel = container_mgr_channel(slice_name)
        self._service = manager_service(slice_name)
        self._nodes: dict[str, tuple[str, str]] = {}  # node → (sliver-state, node-list status), selection order
        self._reasons: dict[str, str] = {}
        self._excluded: set[str] = set()
        self._pending: set[str] = set()  # replacements handed out, not yet selected
        self._last_refresh: float | None = None

    # ------------------------------------------------------------ views

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes in the list, in selection order."""
        return tuple(self._nodes)

    @property
    def excluded(self) -> frozenset[str]:
        """Nodes excluded by command: never selected again for this slice."""
        return frozenset(self._excluded)

    @property
    def pending(self) -> frozenset[str]:
        """Replacements returned as :class:`Select` actions and not yet passed to :meth:`select`."""
        return frozenset(self._pending)

    def snapshot(self) -> dict[str, tuple[str, str]]:
        """``{node: (sliver_state, node_list_status)}`` in selection order (the slice's health)."""
        return dict(self._nodes)

    def reason(self, node: str) -> str | None:
        """Why ``node`` last failed, while it is ``failed``; else None."""
        return self._reasons.get(node)

    # ------------------------------------------------------------ progress

    def select(self, nodes: Iterable[str]) -> None:
        """Add ``nodes`` to the list as ``selected``; all or none (ContainerStateError names the first problem)."""
        if isinstance(nodes, str):
            raise ContainerStateError("select takes a collection of node addresses, not one string")
        chosen: list[str] = []
        for text in nodes:
            node = self._address(text)
            if node in self._excluded:
                raise ContainerStateError(f"node {node} was excluded from slice {self.slice_name}; "
                                          "it cannot be selected again")
            if node in self._nodes or node in chosen:
                raise ContainerStateError(f"node {node} is already selected for slice {self.slice_name}")
            chosen.append(node)
        if len(self._nodes) + len(chosen) > MAX_NUMNODES:
            raise ContainerStateError(f"slice {self.slice_name} would have {len(self._nodes) + len(chosen)} nodes; "
                                      f"at most {MAX_NUMNODES} fit a node-list")
        if not chosen:
            return
        for node in chosen:
            self._nodes[node] = _SELECTED
            self._pending.discard(node)
            self._publish(sliver_state(self.slice_name, node, _SELECTED[0], sender=self.sender))
        self._publish_list()

    def creating(self, node: str) -> None:
        """The sliver on ``node`` is being created."""
        self._move(node, _CREATING)

    def initializing(self, node: str) -> None:
        """The sliver on ``node`` exists and is being initialised (keys, limits)."""
        self._move(node, _INITIALIZING)

    def installed(self, node: str) -> None:
        """The sliver on ``node`` is ready."""
        self._move(node, _INSTALLED)

    def failed(self, node: str, reason: str, timeout: bool = False) -> None:
        """The sliver on ``node`` failed (``timeout``: creating it took too long); ``reason`` is kept, truncated."""
        if not isinstance(reason, str):
            raise ContainerStateError(f"failure reason must be text, not {type(reason).__name__}")
        node = self._move(node, _TIMEOUT if timeout else _NOT_RESPONDING)
        self._reasons[node] = reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS - 1] + "…"

    def deselect(self, node: str) -> None:
        """``node`` leaves the slice: reported ``deselected`` once, then dropped from the list."""
        node = self._move(node, _DESELECTED)
        del self._nodes[node]

    def _address(self, text: str) -> str:
        try:
            return normalize_node_address(text)
        except SliceSpecError as exc:
            raise ContainerStateError(str(exc)) from None

    def _move(self, text: str, states: tuple[str, str]) -> str:
        node = self._address(text)
        old = self._nodes.get(node)
        if old is None:
            raise ContainerStateError(f"node {node} is not selected for slice {self.slice_name}")
        self._nodes[node] = states
        if states[1] != _NOT_RESPONDING[1] and states[1] != _TIMEOUT[1]:
            self._reasons.pop(node, None)
        if states[0] != old[0]:
            self._publish(sliver_state(self.slice_name, node, states[0], sender=self.sender))
        if states[1] != old[1]:
            self._publish_list()
        return node

    def _publish_list(self) -> None:
        self._publish(node_list(self.slice_name, {node: states[1] for node, states in self._nodes.items()},
                                sender=self.sender))
        if self._last_refresh is None:
            self._last_refresh = self._clock()

    # ------------------------------------------------------------ refresh

    def refresh(self) -> None:
        """Re-publish every node's ``sliver-state``, then the ``node-list``; the next is due REFRESH_INTERVAL later."""
        for node, states in self._nodes.items():
            self._publish(sliver_state(self.slice_name, node, states[0], sender=self.sender))
        self._publish(node_list(self.slice_name, {node: states[1] for node, states in self._nodes.items()},
                                sender=self.sender))
        self._last_refresh = self._clock()

    def next_refresh(self) -> float | None:
        """When :meth:`refresh` is next due (clock seconds); None while nothing has been published."""
        return None if self._last_refresh is None else self._last_refresh + REFRESH_INTERVAL

    # ------------------------------------------------------------ commands

    def handle(self, event: Event) -> Handled:
        """Act on a ``node-exclude`` command; anything else is ignored with a reason.

        Never raises because of the event; an exception from ``choose_replacement`` (the slice
        manager's own code) propagates, after the node has been recorded as excluded.
        """
        host = self._check(event)
        if isinstance(host, Refusal):
            return Handled(ignored=host)
        self._excluded.add(host)
        actions: list[Action] = [Exclude(host)]
        note = None
        if self.keep_size is not None:
            left = sum(1 for node in self._nodes if node not in self._excluded) + len(self._pending)
            if left >= self.keep_size:
                note = None
            elif self._choose is None:
                note = (f"slice {self.slice_name} has {left} of {self.keep_size} nodes "
                        "and no way to choose a replacement")
            else:
                replacement, note = self._replacement()
                if replacement is not None:
                    self._pending.add(replacement)
                    actions.append(Select(replacement))
        return Handled(actions=tuple(actions), note=note)

    def _check(self, event) -> str | Refusal:
        """The host a valid ``node-exclude`` names, else the Refusal saying why the event is ignored."""
        if not isinstance(event, Event):
            return Refusal("wrong-payload", f"expected an event, got {type(event).__name__}")
        if event.channel != self._channel:
            return Refusal("wrong-channel", f"channel {_shown(event.channel)} is not {self._channel}")
        if event.to_service != self._service:
            return Refusal("wrong-service", f"service {_shown(str(event.to_service))} is not {self._service}")
        payload = event.payload
        if not isinstance(payload, AttributePayload):
            return Refusal("wrong-payload", f"payload type {_shown(event.payload_type)} is not an attribute payload")
        if payload.field != NODE_EXCLUDE:
            return Refusal("wrong-field", f"field {_shown(payload.field)} is not {NODE_EXCLUDE}")
        try:
            host_text, slice_name = parse_node_exclude(payload.value)
            host = normalize_node_address(host_text)
        except (StatusValueError, SliceSpecError) as exc:
            return Refusal("malformed", f"node-exclude value {_shown(payload.value)}: {exc}")
        if slice_name != self.slice_name:
            return Refusal("wrong-slice", f"node-exclude names slice {slice_name!r}, not {self.slice_name}")
        if host in self._excluded:
            return Refusal("already-excluded", f"node {host} is already excluded from slice {self.slice_name}")
        if host not in self._nodes:
            return Refusal("unknown-host", f"node {host} is not selected for slice {self.slice_name}")
        return host

    def _replacement(self) -> tuple[str | None, str | None]:
        """A replacement from ``choose_replacement`` (and None), or None and why there is none."""
        avoid = set(self._excluded) | set(self._nodes) | self._pending
        offered = self._choose(set(avoid))
        if offered is None:
            return None, f"no replacement node is available for slice {self.slice_name}"
        try:
            node = normalize_node_address(offered)
        except SliceSpecError as exc:
            return None, f"replacement refused: {exc}"
        if node in avoid:
            return None, f"replacement refused: node {node} is excluded or already in slice {self.slice_name}"
        return node, None

"""Installation lifecycle of an application's components, as reference 000 defines it.  Pure.

States (``dsmt.server.statusevents.INSTALL_STATES``)::

    requested ──► instantiated ──► initialized ──► [installed ──►] running
        │               │               │                │            │
        └───────────────┴───────┬───────┴────────────────┴────────────┤
                                ▼                                     ▼
                              failed ◄──────────────────────────► terminated

* ``requested`` — the deployment was accepted for this component;
* ``instantiated`` — its package is on the node (fetched and verified; at once without a package);
* ``initialized`` — unpacked and configured (every config file rendered): ready to install or run;
* ``installed`` — its install command ran and succeeded (only components that have one);
* ``running`` — started and healthy (its health check passed once; at once without one);
* ``failed`` — a step failed or the process died; ``reason`` says which and why;
* ``terminated`` — stopped or uninstalled.

Legal transitions (:data:`TRANSITIONS`): the progress states only move forward; any state but
``terminated`` can fail; any state but ``failed`` can be terminated; a ``failed`` or ``terminated``
component comes back either through ``requested`` (deployed again) or straight to ``running`` (a
restart: the supervisor's after a crash, or a START command) — but only when it was *prepared*
(all its preparation milestones reached), since nothing can run that was never installed.  Anything
else raises :class:`IllegalTransition`.

**Milestones.**  The engine's management components report what they did — package fetched,
unpacked, configured, install command run — in whatever order the descriptor's steps run them
(XYZ's ``xyz-web`` runs its install command before its ``configure`` step).  The component moves
to the furthest progress state whose milestones are all reached, through every state in between,
so the published order is always the reference's: a component that ran its install command
before being configured stays ``instantiated`` until configured, then becomes ``initialized`` and
``installed`` in one go.

**What is published.**  Reference 000's application install monitor reports
``component=org.dsmt.component.deployment-agent, managed=<APP>`` — the *application* (``managed=XYZ``,
the name that APPCONFIG carries), not one of its processes.  An application of several components
therefore has one published state, derived by :func:`application_state` from its components'
states, and :class:`ApplicationStatus` yields one ``deployment-status`` event each time that derived
state changes.  For a one-component application the published sequence is exactly the
component's.  Per-component states are the engine's own record (store, ``status()``,
manageability).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable

from dsmt.server.refusal import Refusal
from dsmt.server.statusevents import DEPLOYMENT_AGENT, deployment_status

__all__ = [
    "REQUESTED", "INSTANTIATED", "INITIALIZED", "INSTALLED", "RUNNING", "FAILED", "TERMINATED", "PROGRESS",
    "TRANSITIONS", "IllegalTransition", "Milestone", "Transition", "ComponentLifecycle", "application_state",
    "ApplicationStatus", "MAX_REASON_CHARS",
]

REQUESTED = "requested"
INSTANTIATED = "instantiated"
INITIALIZED = "initialized"
INSTALLED = "installed"
RUNNING = "running"
FAILED = "failed"
TERMINATED = "terminated"
#: The forward states, in order.
PROGRESS = (REQUESTED, INSTANTIATED, INITIALIZED, INSTALLED, RUNNING)

#: Legal transitions: state (None: never requested) → the states it may move to.
TRANSITIONS: dict[str | None, frozenset[str]] = {
    None: frozenset({REQUESTED}),
    REQUESTED: frozenset({INSTANTIATED, FAILED, TERMINATED}),
    INSTANTIATED: frozenset({INITIALIZED, FAILED, TERMINATED}),
    INITIALIZED: frozenset({INSTALLED, RUNNING, FAILED, TERMINATED}),
    INSTALLED: frozenset({RUNNING, FAILED, TERMINATED}),
    RUNNING: frozenset({FAILED, TERMINATED}),
    FAILED: frozenset({REQUESTED, RUNNING, TERMINATED}),
    TERMINATED: frozenset({REQUESTED, RUNNING}),
}

#: Longest failure reason kept: a sentence plus a command's name and exit status; a hostile or
#: runaway message (a whole stderr) is cut so the store and the status stay small.
MAX_REASON_CHARS = 1024


class IllegalTransition(Refusal):
    """A transition :data:`TRANSITIONS` does not allow (code ``illegal-transition``), or running a
    component that was never prepared (code ``not-prepared``)."""


class Milestone(str, enum.Enum):
    """What a management component did for a component; see the module docstring."""

    FETCHED = "fetched"
    UNPACKED = "unpacked"
    CONFIGURED = "configured"
    INSTALLED = "installed"


@dataclass(frozen=True)
class Transition:
    component: str
    before: str | None
    after: str
    reason: str | None = None


def _clip(reason: str | None) -> str | None:
    if reason is None:
        return None
    reason = str(reason)
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS - 1] + "…"


class ComponentLifecycle:
    """One component's state, failure reason and milestones.

    ``needs``: the milestones that make the component prepared (a component without a package
    needs neither FETCHED nor UNPACKED, without config files not CONFIGURED, without an install
    command not INSTALLED).  Every method returns the transitions it made, in order (possibly none).
    """

    def __init__(self, name: str, needs: Iterable[Milestone], *, state: str | None = None,
                 reason: str | None = None, milestones: Iterable[Milestone] = ()):
        if state not in TRANSITIONS:
            raise ValueError(f"{state!r} is not a lifecycle state")
        self.name = name
        self.needs = frozenset(Milestone(m) for m in needs)
        self.state = state
        self.reason = reason
        self.milestones = {Milestone(m) for m in milestones}

    @classmethod
    def for_component(cls, component, **kwargs) -> "ComponentLifecycle":
        """The lifecycle of a descriptor :class:`~dsmt.server.deployment.descriptor.Component`."""
        needs = []
        if component.package is not None:
            needs += [Milestone.FETCHED, Milestone.UNPACKED]
        if component.configs:
            needs.append(Milestone.CONFIGURED)
        if component.install is not None:
            needs.append(Milestone.INSTALLED)
        return cls(component.name, needs, **kwargs)

    @property
    def has_install(self) -> bool:
        return Milestone.INSTALLED in self.needs

    @property
    def prepared(self) -> bool:
        """Every milestone this component needs is reached: it can run."""
        return self.needs <= self.milestones

    def _to(self, state: str, reason: str | None = None) -> Transition:
        if state not in TRANSITIONS.get(self.state, ()):
            raise IllegalTransition("illegal-transition", f"component {self.name!r} cannot go from "
                                    f"{self.state or 'undefined'} to {state}")
        transition = Transition(self.name, self.state, state, _clip(reason))
        self.state, self.reason = state, transition.reason
        return transition

    def request(self) -> list[Transition]:
        """Deployed (again): back to ``requested``, milestones forgotten (steps re-run, idempotently)."""
        transition = self._to(REQUESTED)
        self.milestones.clear()
        return [transition]

    def reach(self, milestone: Milestone) -> list[Transition]:
        """Record ``milestone`` and move forward as far as the milestones allow (module docstring).
        Outside the progress states (failed, terminated, running) only the milestone is recorded."""
        self.milestones.add(Milestone(milestone))
        return self.advance()

    def advance(self) -> list[Transition]:
        """Move forward as far as the milestones allow (``requested`` at least; never to ``running``)."""
        made: list[Transition] = []
        if self.state not in (REQUESTED, INSTANTIATED, INITIALIZED):
            return made
        have = self.milestones
        if self.state == REQUESTED and {Milestone.FETCHED} & self.needs <= have:
            made.append(self._to(INSTANTIATED))
        if self.state == INSTANTIATED and {Milestone.UNPACKED, Milestone.CONFIGURED} & self.needs <= have:
            made.append(self._to(INITIALIZED))
        if self.state == INITIALIZED and self.has_install and Milestone.INSTALLED in have:
            made.append(self._to(INSTALLED))
        return made

    def run(self) -> list[Transition]:
        """Started and healthy: ``running``.  IllegalTransition ``not-prepared`` if it was never prepared."""
        if self.state == RUNNING:
            return []
        if not self.prepared:
            missing = ", ".join(sorted(m.value for m in self.needs - self.milestones))
            raise IllegalTransition("not-prepared", f"component {self.name!r} cannot run: not yet {missing}")
        return [self._to(RUNNING)]

    def fail(self, reason: str) -> list[Transition]:
        """``failed`` with ``reason``; an already failed component keeps its state and takes the new
        reason without a transition (nothing new to publish)."""
        if self.state == FAILED:
            self.reason = _clip(reason)
            return []
        return [self._to(FAILED, reason)]

    def terminate(self) -> list[Transition]:
        """Stopped or uninstalled: ``terminated`` (no-op when it already is)."""
        if self.state == TERMINATED:
            return []
        return [self._to(TERMINATED)]


def _rank(lifecycle: ComponentLifecycle) -> int:
    # A prepared component without an install command counts as installed: it is as ready as one
    # whose install ran.
    if lifecycle.state == INITIALIZED and lifecycle.prepared and not lifecycle.has_install:
        return PROGRESS.index(INSTALLED)
    return PROGRESS.index(lifecycle.state)


def application_state(components: Iterable[ComponentLifecycle]) -> str | None:
    """The application's published state, derived from its components'.

    ``failed`` if any component failed; else ``terminated`` if any is terminated (the application
    is not whole: stopped or uninstalled); else the least advanced progress state — where
    ``installed`` is reported only when some component has an install command (otherwise a fully
    prepared application is ``initialized`` until it runs, as in reference 000); None before any
    component is requested.
    """
    components = list(components)
    states = {c.state for c in components}
    if not components or None in states:
        return None
    if FAILED in states:
        return FAILED
    if TERMINATED in states:
        return TERMINATED
    state = PROGRESS[min(_rank(c) for c in components)]
    if state == INSTALLED and not any(c.has_install for c in components):
        return INITIALIZED
    return state


class ApplicationStatus:
    """The application's published state and its events (module docstring).

    ``update(components)`` returns the ``deployment-status`` event when the derived state changed
    (None otherwise); ``event()`` is the current state's event, for re-sending (None while undefined).
    """

    def __init__(self, slice_name: str, host: str, application: str, state: str | None = None):
        # Build one event now: a slice, host or application name that cannot be written into a status
        # value is refused here, at deploy time, not at the first state change.
        deployment_status(slice_name, host, DEPLOYMENT_AGENT, application, REQUESTED)
        self.slice_name, self.host, self.application = slice_name, host, application
        self.state = state

    def update(self, components: Iterable[ComponentLifecycle], transition: Transition | None = None):
        """``transition``: judge the components as of that transition — one of several a single call made
        (``initialized`` then ``installed``), so none of the application's states is skipped."""
        if transition is not None:
            components = [_Seen(c, transition.after) if c.name == transition.component else c for c in components]
        state = application_state(components)
        if state == self.state:
            return None
        self.state = state
        return self.event()

    def event(self):
        if self.state is None:
            return None
        return deployment_status(self.slice_name, self.host, DEPLOYMENT_AGENT, self.application, self.state)


class _Seen:
    """A lifecycle as it was at one of the transitions just made."""

    def __init__(self, lifecycle: ComponentLifecycle, state: str):
        self.name, self.state, self.needs, self.milestones = lifecycle.name, state, lifecycle.needs, lifecycle.milestones
        self.has_install, self.prepared = lifecycle.has_install, lifecycle.prepared

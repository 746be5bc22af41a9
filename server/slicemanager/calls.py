"""How the slice manager reaches the agent and the node managers: two protocols, their values and errors.

The slice manager core (:mod:`dsmt.server.slicemanager.core`) speaks only to
:class:`AgentCalls` and :class:`NodeCalls`; the HTTP and PsEPR adapters
(``dsmt.server.slicemanager.remote``) implement them over zeep, and tests
implement them over the pure cores.  Whatever the transport, an adapter
hands back the plain values defined here (:class:`NodeAd`,
:class:`LeaseInfo`, :class:`SliverInfo`, ``int`` key counts) and turns every
failure into a :class:`NodeCallError` / :class:`AgentCallError` whose
``code`` and ``reason`` are what ``svm`` prints — never a traceback.

Node operations and their keyword arguments are exactly those of
``docs/dslice.md`` (:data:`OPERATIONS`).  One :meth:`NodeCalls.run` carries
every node's request of one step, so a PsEPR adapter can send a single
multicast when all requests have the same arguments (``AddKey``,
``RenewLease``, ``DeleteSliver``…) and an HTTP adapter can fan out with
:func:`run_each`.

Error codes: a SOAP fault's code below ``Client.`` (``AdmissionRefused.capacity``,
``NoLease``, ``NoSliver``, ``InvalidKey``, ``NotOwner``, ``BadLease``,
``InvalidSpec``, ``Shortage``), or one of :data:`UNREACHABLE`,
:data:`TIMEOUT`, :data:`ERROR` (anything else: a malformed answer, a server
fault).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from dsmt.server.refusal import Refusal

__all__ = [
    "AgentCalls", "NodeCalls", "NodeAd", "LeaseInfo", "SliverInfo", "NodeRequest", "Outcome", "OnResult",
    "NodeCallError", "AgentCallError", "CallOptions", "OPERATIONS", "UNREACHABLE", "TIMEOUT", "ERROR",
    "check_request", "run_each", "as_call_error",
]

#: The node could not be reached (connection refused, no route, PsEPR router down…).
UNREACHABLE = "unreachable"
#: No answer within the caller's timeout (``svm -t``).
TIMEOUT = "timeout"
#: Any other failure: a server fault without a code we know, an answer we cannot read.
ERROR = "error"

#: Node manager operations and their keyword arguments (docs/dslice.md, node manager table).
OPERATIONS: Mapping[str, tuple[str, ...]] = {
    "Redeem": ("ticket",),
    "CreateSliver": ("slice", "leaseId", "slicePublicKey", "slicePrivateKey"),
    "DeleteSliver": ("slice",),
    "AddKey": ("slice", "key"),
    "DelKey": ("slice", "key"),
    "NukeKeys": ("slice",),
    "RenewLease": ("slice",),
    "GetSliver": ("slice",),
}


class NodeCallError(Refusal):
    """One node's call failed: ``code`` (a fault code such as ``AdmissionRefused.capacity``, or
    ``unreachable``/``timeout``/``error``) and ``reason`` (the sentence ``svm`` prints)."""


class AgentCallError(Refusal):
    """The agent call failed as a whole (``InvalidSpec``, ``Shortage``, ``unreachable``, ``timeout``, ``error``)."""


@dataclass(frozen=True)
class NodeAd:
    """One node the agent advertises: address, capacity and free slots, and its node manager's endpoint URL."""

    node: str
    slots: int
    free: int
    endpoint: str


@dataclass(frozen=True)
class LeaseInfo:
    """A node manager's ``LeaseInfo`` (POSIX seconds); valid while ``now < expires_at``."""

    lease_id: str
    ticket_id: str
    slice: str
    node: str
    slots: int
    granted_at: int
    expires_at: int
    leaselen: int


@dataclass(frozen=True)
class SliverInfo:
    """A node manager's ``SliverInfo``: ``state`` as in docs/dslice.md, ``keys`` the count of user keys."""

    slice: str
    node: str
    state: str
    lease_id: str | None
    expires_at: int | None
    keys: int


class NodeRequest(NamedTuple):
    """One node's request: its normalised address, its node manager's endpoint URL, the operation's arguments."""

    node: str
    endpoint: str
    kwargs: Mapping[str, Any]


#: A node's outcome: the operation's value (LeaseInfo, SliverInfo or a key count) or a NodeCallError.
Outcome = Any
#: Called once per node as soon as its outcome is known, before ``run``'s Deferred fires.
OnResult = Callable[[str, Outcome], None]


class AgentCalls(Protocol):
    """The agent, as the slice manager uses it.  Every Deferred fails only with :class:`AgentCallError`."""

    def getads(self) -> defer.Deferred:
        """``Deferred[list[NodeAd]]``: the advertised nodes."""

    def issue_tickets(self, spec_xml: bytes) -> defer.Deferred:
        """``Deferred[list[bytes]]``: one signed ticket per node, exactly as the agent signed them."""

    def release(self, ticket_ids: Sequence[str]) -> defer.Deferred:
        """``Deferred[int]``: how many of these tickets' reservations the agent freed."""


class NodeCalls(Protocol):
    """The node managers, as the slice manager uses them."""

    def run(self, operation: str, requests: Sequence[NodeRequest], *, parallelism: int, timeout: float | None,
            on_result: OnResult | None = None) -> defer.Deferred:
        """Call ``operation`` on every request's node, at most ``parallelism`` at a time, each for at most
        ``timeout`` seconds (None: the transport's own limit).  ``Deferred[dict[node, Outcome]]`` with one
        entry per request; it never fails: each node's failure is its :class:`NodeCallError`.
        ``on_result(node, outcome)`` is called once per node as its outcome arrives."""


@dataclass(frozen=True)
class CallOptions:
    """What ``svm`` tells the adapter factory
    (``remote.make_calls(options) -> (AgentCalls, NodeCalls, close)``).

    ``transport``: ``http`` or ``psepr``; ``agent_url``: the agent's URL (HTTP);
    ``router``/``psepr_service``/``password_file``: the PsEPR login; ``cert``/``key``/``ca``: PEM files
    for WS-Security signing and TLS; ``timeout``: seconds per call (None: the transport's own).
    """

    transport: str = "http"
    agent_url: str | None = None
    router: str | None = None
    psepr_service: str | None = None
    password_file: str | None = None
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    timeout: float | None = None


def check_request(operation: str, kwargs: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``operation`` is a node manager operation and ``kwargs`` its exact arguments."""
    expected = OPERATIONS.get(operation)
    if expected is None:
        raise ValueError(f"unknown node manager operation {operation!r}")
    if set(kwargs) != set(expected):
        raise ValueError(f"{operation} takes {', '.join(expected)}; got {', '.join(sorted(kwargs)) or 'nothing'}")


def as_call_error(failure_or_exception) -> NodeCallError:
    """A :class:`NodeCallError` for any failure: itself if it already is one (or any Refusal, code kept),
    ``timeout`` for a cancelled call, else ``error`` with the exception's text (never a traceback)."""
    exc = getattr(failure_or_exception, "value", failure_or_exception)
    if isinstance(exc, NodeCallError):
        return exc
    if isinstance(exc, Refusal):
        return NodeCallError(exc.code, exc.reason)
    if isinstance(exc, (defer.CancelledError, defer.TimeoutError)):
        return NodeCallError(TIMEOUT, "no answer in time")
    text = str(exc).strip() or type(exc).__name__
    return NodeCallError(ERROR, text[:_MAX_REASON])


#: Longest reason kept from an unexpected exception's text: a line, not a dump.
_MAX_REASON = 300


def run_each(call_one: Callable[[NodeRequest], defer.Deferred], operation: str, requests: Sequence[NodeRequest], *,
             parallelism: int, timeout: float | None, on_result: OnResult | None = None,
             clock: IReactorTime | None = None,
             check: Callable[[str, Mapping[str, Any]], None] = check_request) -> defer.Deferred:
    """The :meth:`NodeCalls.run` contract for transports that make one call per node.

    ``call_one(request)`` returns a Deferred of the node's value (or raises /
    fails).  At most ``parallelism`` calls are outstanding (a
    ``DeferredSemaphore``); each is cancelled after ``timeout`` seconds of
    ``clock`` (default: the global reactor) and its outcome is then
    ``NodeCallError("timeout")`` even if the call ignores cancellation.
    Requests must name distinct nodes.  ``check(operation, kwargs)`` raises ValueError for a request the
    contract does not allow (default: :func:`check_request`, the node manager's operations; the deployment
    engines' adapters pass their own), before any call is made.
    """
    if type(parallelism) is not int or parallelism < 1:
        raise ValueError(f"parallelism must be a whole number >= 1, not {parallelism!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive seconds or None, not {timeout!r}")
    nodes = [request.node for request in requests]
    if len(set(nodes)) != len(nodes):
        raise ValueError("requests must name distinct nodes")
    for request in requests:
        check(operation, request.kwargs)
    if clock is None and timeout is not None:
        from twisted.internet import reactor as clock
    semaphore = defer.DeferredSemaphore(parallelism)
    outcomes: dict[str, Outcome] = {}

    def one(request: NodeRequest) -> defer.Deferred:
        finished = defer.Deferred()
        call = defer.maybeDeferred(call_one, request)
        timer = None
        if timeout is not None and not call.called:
            def expire():
                if not finished.called:
                    finished.callback(NodeCallError(TIMEOUT, f"no answer from {request.node} in {timeout:g} s"))
                call.cancel()
            timer = clock.callLater(timeout, expire)

        def settle(result):
            if timer is not None and timer.active():
                timer.cancel()
            if not finished.called:
                finished.callback(as_call_error(result) if isinstance(result, Failure) else result)
            return None
        call.addBoth(settle)
        return finished

    def record(outcome, node: str):
        outcomes[node] = outcome
        if on_result is not None:
            on_result(node, outcome)

    def acquired(request: NodeRequest):
        return semaphore.run(one, request).addCallback(record, request.node)

    done = defer.gatherResults([acquired(request) for request in requests], consumeErrors=True)
    return done.addCallback(lambda _: {request.node: outcomes[request.node] for request in requests})

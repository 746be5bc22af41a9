"""Running a deployment plan across the nodes of a slice: the engines' calls, batch by batch.

``Orchestrator(engine_calls, *, parallelism, timeout, on_event).run(plan, nodes, descriptors)``
executes a parsed :class:`~dsmt.server.deployment.plan.Plan` with the semantics of that module:
steps in ``sequence``, ``parallel`` branches together, ``barrier``s holding branches, each step
rolled out in batches (:class:`~dsmt.server.deployment.plan.Rollout`, the pure batching and
threshold logic) with one :meth:`EngineCalls.run` per batch, and the whole plan stopping when a step
exceeds its ``max-failures``.  The Deferred fires with a :class:`PlanReport` — also when nodes
failed or the plan stopped: the report says so; it fails only with a
:class:`~dsmt.server.deployment.plan.PlanError` raised before any call (a listed node not in the
slice, a missing or invalid descriptor, parameters that do not fit it).

**Outcomes.**  A node's call is ``ok`` when the engine answered and its answer is not a report with
``ok`` false (``engine.Report``: a deploy or command whose steps failed counts as failed, with the
first step failure's code and ``"<action> <component>: <reason>"``); ``failed`` with the
:class:`~dsmt.server.slicemanager.calls.NodeCallError`'s code and reason (``unreachable``,
``timeout``, a fault code…); ``skipped`` when the step or the plan stopped before its batch.

**Events.**  ``on_event(PlanEvent)`` is told, in order: ``step`` (a step starts), ``batch`` (a
batch's calls are made), ``node`` (one node's result, as it arrives), ``done`` (a step ended, its
report attached), ``stopped`` (a step exceeded its threshold; nothing further starts).  Its
exceptions are logged, never raised into the run.

**Transports.**  :class:`EngineCalls` is :class:`~dsmt.server.slicemanager.calls.NodeCalls`'s
contract with the engine's operations (``plan.OPERATIONS``).  Adapters over ``wsdl/deployment.wsdl``
(HTTP, and PsEPR with one multicast for a uniform batch — ``Start``, ``Stop``, a ``Deploy`` without
``${node}``) hand back ``engine.Report``-like values (``ok``, ``failures``) or ``NodeCallError`` failures;
tests implement it in memory.

Concurrency: at most ``parallelism`` calls per batch; parallel branches each run their own batch,
so a plan with B branches makes at most ``B × parallelism`` calls at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence as Seq

from twisted.internet import defer
from twisted.logger import Logger

from dsmt.server.deployment.engine import Gate
from dsmt.server.deployment.plan import (
    FAILED, OK, Barrier, NodeResult, Parallel, Plan, PlanError, PlanStep, Rollout, Sequence, barrier_holders,
    bind, check_descriptors,
)
from dsmt.server.refusal import Refusal
from dsmt.server.slicemanager.calls import ERROR, NodeRequest, OnResult, as_call_error

__all__ = ["EngineCalls", "Orchestrator", "PlanReport", "StepReport", "PlanEvent", "node_result",
           "DEFAULT_PARALLELISM", "PlanError"]

#: Calls in flight per batch unless told otherwise: the slice manager's own default fan-out; a batch
#: of a few hundred nodes then takes a few rounds, and no engine host sees a burst of connections.
DEFAULT_PARALLELISM = 32

_log = Logger()


class EngineCalls(Protocol):
    """The nodes' deployment engines, as a plan uses them (``NodeCalls.run``'s contract)."""

    def run(self, operation: str, requests: Seq[NodeRequest], *, parallelism: int, timeout: float | None,
            on_result: OnResult | None = None) -> defer.Deferred:
        """Call ``operation`` (``Deploy``, ``Start``, ``Stop``, ``Uninstall``, ``Command``) on every request's
        node, at most ``parallelism`` at a time, each for at most ``timeout`` seconds.
        ``Deferred[dict[node, outcome]]``; it never fails: a node's failure is its ``NodeCallError``.
        ``on_result(node, outcome)`` is called once per node as its outcome arrives."""


def node_result(outcome: Any) -> NodeResult:
    """A node's :class:`NodeResult` from an engine call's outcome (module docstring, *Outcomes*)."""
    if isinstance(outcome, Refusal):
        return NodeResult(FAILED, outcome.code, outcome.reason)
    if isinstance(outcome, BaseException):
        error = as_call_error(outcome)
        return NodeResult(FAILED, error.code, error.reason)
    if getattr(outcome, "ok", True) is False:
        failures = tuple(getattr(outcome, "failures", ()) or ())
        if failures:
            first = failures[0]
            return NodeResult(FAILED, first.code, f"{first.action} {first.component}: {first.reason}", outcome)
        return NodeResult(FAILED, "failed", "the engine reported a failure", outcome)
    return NodeResult(OK, value=outcome)


@dataclass(frozen=True)
class StepReport:
    """One step: ``results`` per node in the step's node order; ``exceeded`` when its failures went over
    ``max-failures`` (which stopped the plan)."""

    name: str
    action: str
    results: Mapping[str, NodeResult]
    exceeded: bool

    def count(self, status: str) -> int:
        return sum(1 for result in self.results.values() if result.status == status)

    def nodes(self, status: str) -> list[str]:
        return [node for node, result in self.results.items() if result.status == status]


@dataclass(frozen=True)
class PlanReport:
    """A plan's run: ``steps`` in document order; ``stopped_by`` the step whose threshold stopped it.

    ``ok``: no step exceeded its threshold (failures within thresholds are in the steps' results);
    ``complete``: every node of every step is ``ok``.
    """

    plan: str
    steps: tuple[StepReport, ...]
    stopped_by: str | None = None

    @property
    def ok(self) -> bool:
        return self.stopped_by is None

    @property
    def stopped(self) -> bool:
        return self.stopped_by is not None

    @property
    def complete(self) -> bool:
        return all(result.status == OK for step in self.steps for result in step.results.values())

    def step(self, name: str) -> StepReport:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def summary(self) -> list[str]:
        """One line per step (``step NAME: N ok, N failed, N skipped``), then the verdict."""
        lines = [f"step {step.name}: {step.count(OK)} ok, {step.count(FAILED)} failed, "
                 f"{step.count('skipped')} skipped" + (" (over max-failures)" if step.exceeded else "")
                 for step in self.steps]
        lines.append(f"plan {self.plan}: " + ("stopped by step " + repr(self.stopped_by) if self.stopped
                                               else "complete" if self.complete else "done with tolerated failures"))
        return lines


@dataclass(frozen=True)
class PlanEvent:
    """Progress of a run (module docstring, *Events*): ``kind``, the ``step``'s name, the ``batch`` number
    (from 1) and its ``nodes`` for ``batch``; ``node`` and ``result`` for ``node``; ``report`` for ``done``."""

    kind: str
    step: str
    batch: int | None = None
    nodes: tuple[str, ...] = ()
    node: str | None = None
    result: NodeResult | None = None
    report: StepReport | None = None


class Orchestrator:
    """Executes plans through ``engine_calls`` (module docstring)."""

    def __init__(self, engine_calls: EngineCalls, *, parallelism: int = DEFAULT_PARALLELISM,
                 timeout: float | None = None, on_event: Callable[[PlanEvent], Any] | None = None):
        if type(parallelism) is not int or parallelism < 1:
            raise ValueError(f"parallelism must be a whole number >= 1, not {parallelism!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive seconds or None, not {timeout!r}")
        self.calls = engine_calls
        self.parallelism = parallelism
        self.timeout = timeout
        self.on_event = on_event

    def run(self, plan: Plan, nodes: Mapping[str, str] | Iterable[str],
            descriptors: Mapping[str, bytes] | None = None) -> defer.Deferred:
        """Run ``plan`` on a slice of ``nodes`` (node → engine endpoint URL, or just the nodes when the
        transport addresses them by name) with the declared descriptors' bytes; ``Deferred[PlanReport]``.
        Raises PlanError before any call (module docstring)."""
        endpoints = dict(nodes) if isinstance(nodes, Mapping) else dict.fromkeys(nodes, "")
        bound = bind(plan, endpoints)
        descriptors = dict(descriptors or {})
        if plan.descriptors:
            check_descriptors(plan, descriptors)
        run = _Run(self, plan, bound, endpoints, descriptors)
        return defer.ensureDeferred(run.execute())

    def _emit(self, event: PlanEvent) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001 — a progress display's bug must not stop a rollout
            _log.failure("plan event listener failed on {kind}", kind=event.kind)


class _Run:
    """One execution: the steps' rollouts, the plan-wide stop, the live barrier gates."""

    def __init__(self, owner: Orchestrator, plan: Plan, bound: Mapping[str, tuple[str, ...]],
                 endpoints: Mapping[str, str], descriptors: Mapping[str, bytes]):
        self.owner, self.plan, self.endpoints, self.descriptors = owner, plan, endpoints, descriptors
        self.rollouts = {step.name: Rollout(step, bound[step.name]) for step in plan.step_list()}
        self.stopped_by: str | None = None
        self.stop_reason = ""
        self.gates: list[Gate] = []

    async def execute(self) -> PlanReport:
        await self._walk(self.plan.steps, {})
        steps = tuple(self._report(rollout) for rollout in self.rollouts.values())
        return PlanReport(self.plan.name, steps, self.stopped_by)

    @staticmethod
    def _report(rollout: Rollout) -> StepReport:
        return StepReport(rollout.step.name, rollout.step.action.describe(), rollout.ordered_results(),
                          rollout.exceeded)

    async def _walk(self, item, gates: dict) -> None:
        if isinstance(item, PlanStep):
            await self._step(self.rollouts[item.name])
        elif isinstance(item, Barrier):
            await gates[item.name].arrive()
        elif isinstance(item, Sequence):
            for child in item.steps:
                await self._walk(child, gates)
        else:
            assert isinstance(item, Parallel)
            inner = {name: Gate(count) for name, count in barrier_holders(item).items()}
            self.gates.extend(inner.values())
            if self.stopped_by is not None:
                for gate in inner.values():
                    gate.break_()
            await defer.gatherResults([defer.ensureDeferred(self._walk(branch, inner)) for branch in item.branches],
                                      consumeErrors=True)

    async def _step(self, rollout: Rollout) -> None:
        step = rollout.step
        emit = self.owner._emit
        if self.stopped_by is not None:
            rollout.skip_rest(self.stop_reason)
            emit(PlanEvent("done", step.name, report=self._report(rollout)))
            return
        emit(PlanEvent("step", step.name, nodes=rollout.nodes))
        while True:
            if self.stopped_by is not None:
                rollout.skip_rest(self.stop_reason)
                break
            batch = rollout.next_batch()
            if batch is None:
                break
            emit(PlanEvent("batch", step.name, batch=rollout.started, nodes=batch))
            await self._batch(rollout, batch)
        emit(PlanEvent("done", step.name, report=self._report(rollout)))
        if rollout.exceeded and self.stopped_by is None:
            self.stopped_by = step.name
            self.stop_reason = (f"the plan stopped: step {step.name!r} failed on {rollout.failed} of "
                                f"{len(rollout.nodes)} node(s), more than max-failures {step.max_failures}%")
            emit(PlanEvent("stopped", step.name))
            for gate in self.gates:
                gate.break_()

    async def _batch(self, rollout: Rollout, batch: tuple[str, ...]) -> None:
        step = rollout.step
        action = step.action
        requests = [NodeRequest(node, self.endpoints.get(node, ""), action.kwargs(node, self.descriptors))
                    for node in batch]

        def arrived(node: str, outcome: Any) -> None:
            if node in rollout.results or node not in batch:
                return
            result = node_result(outcome)
            rollout.record(node, result)
            self.owner._emit(PlanEvent("node", step.name, node=node, result=result))

        try:
            outcomes = await self.owner.calls.run(action.operation, requests, parallelism=self.owner.parallelism,
                                                  timeout=self.owner.timeout, on_result=arrived)
        except Exception as exc:  # noqa: BLE001 — an adapter that broke its contract fails its batch, not the plan
            error = as_call_error(exc)
            outcomes = {node: error for node in batch}
        for node in batch:
            arrived(node, outcomes.get(node, _missing(node)) if isinstance(outcomes, Mapping) else _missing(node))


def _missing(node: str) -> Refusal:
    return Refusal(ERROR, f"the engine calls gave no outcome for {node}")


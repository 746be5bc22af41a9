"""The deployment engine of one sliver: runs a descriptor's steps through management components,
keeps every component's lifecycle, supervises the processes, and publishes the application's status.

``Engine(slice, host, home, store, publish, reactor=, clock=, fetcher=, registry=)``:

* :meth:`Engine.deploy` parses the descriptor (``DescriptorError`` fails the Deferred; nothing is
  recorded), binds the parameters, stops what a previous deployment runs, records the deployment
  (store) and every component ``requested``, then runs the steps: ``sequence`` one after the
  other, stopping at the first failure; ``parallel`` branches together; a ``barrier`` holds its
  branch until every branch holding it arrives — and fails the waiting branches when one of them
  failed before arriving (no deadlock).  Each ``<do>`` runs the management components of its action
  (``components.ACTIONS``; a plugin's name is its own action); ``start`` first runs whatever
  preparation the component still lacks (a component whose descriptor has config files but no
  ``configure`` step is configured anyway).  The Deferred fires with a :class:`Report` — also when
  steps failed: ``ok`` and ``failures`` say so.
* :meth:`start`, :meth:`stop`, :meth:`uninstall` run one action for one component (all for uninstall
  without a name); :meth:`status` is ``{component: state}``; :meth:`details` adds reason, pid and
  restarts.
* Every lifecycle transition is written to the store first — with the application's derived state
  (``lifecycle.ApplicationStatus``) when it changes it, in the same transaction — then, in that case,
  published as one ``deployment-status`` event (``component=org.dsmt.component.deployment-agent, managed=<APP>``).
* **Monitor.**  A supervised process that exits makes its component ``failed`` with the exit and
  the restart plan in the reason; the supervisor restarts it after the backoff, and once healthy
  again it is ``running`` (both published).  After ``max_restarts`` it stays ``failed``.
* **Health monitor.**  A ``running`` component with a ``<health>`` check is checked again every
  ``interval`` seconds of ``clock`` — one timer per component, armed when it becomes ``running``
  and re-armed after each healthy verdict, cancelled when it leaves ``running`` (no other polling).
  A round is the health check's steady rule (``retries`` consecutive failed probes, ``interval``
  apart, make it unhealthy).  Unhealthy: the component becomes ``failed`` ("health check: …",
  published) and its process group is killed (``SIGKILL``: a process that fails its checks may be
  hung and deaf to its stop signal), so the supervisor restarts it under the restart policy like
  any crash — ``running`` again once healthy, ``failed`` for good after ``max_restarts``.
* **Re-sending.**  Status events expire (``statusevents.STATUS_EXPIRE``); the current status is
  re-sent :data:`RESEND_SECONDS` after the last event, then every :data:`RESEND_SECONDS`, so late
  listeners and PLDB see it.  One timer on ``clock``, rescheduled at each event (no loop);
  :attr:`next_resend` is when it fires.
* :meth:`recover` applies the store's recovery rule (see ``store``) after a restart.
* :meth:`close` cancels the engine's timers and leaves the processes running (a new engine on the
  same store re-adopts them).

``reactor`` does the I/O and real-time timeouts (downloads, health probes, install timeouts);
``clock`` (default: ``reactor``) times restart backoff, stop grace, adopted-process checks and
re-sending — tests drive those with a ``task.Clock``.  ``publish(event)`` may return anything; its
exceptions are logged, never raised into the engine (the state is in the store either way).
"""
from __future__ import annotations

import signal
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from dsmt.server.deployment.components import PREPARATION, Context, Registry
from dsmt.server.deployment.descriptor import (
    Barrier, Do, Parallel, Sequence, barriers_of, parse_descriptor, resolve_parameters,
)
from dsmt.server.deployment.health import HealthChecker, HealthError
from dsmt.server.deployment.lifecycle import (
    FAILED, INITIALIZED, INSTALLED, INSTANTIATED, REQUESTED, RUNNING, TERMINATED, ApplicationStatus,
    ComponentLifecycle, Milestone,
)
from dsmt.server.deployment.supervisor import ProcessError
from dsmt.server.nodemanager.sliver import DirectorySandbox
from dsmt.server.refusal import Refusal
from dsmt.server.slicemanager.spec import check_slice_name

__all__ = ["Engine", "Report", "StepFailure", "RESEND_SECONDS"]

#: Seconds between re-sends of an unchanged status: every minute keeps a value with the 90 s
#: expiry (``STATUS_EXPIRE``) alive across one lost event.
RESEND_SECONDS = 60.0

_log = Logger()


@dataclass(frozen=True)
class StepFailure:
    action: str
    component: str
    code: str
    reason: str


@dataclass(frozen=True)
class Report:
    """What a deployment or command did: ``ok`` when no step failed; the components' states after it."""

    application: str | None
    ok: bool
    states: dict
    failures: tuple[StepFailure, ...] = ()


class Gate:
    """A barrier of one parallel: ``arrive()`` fires True when all ``count`` branches arrived, False
    once broken (a holder failed)."""

    def __init__(self, count: int):
        self.count, self.waiting, self.broken = count, [], False

    def arrive(self) -> defer.Deferred:
        if self.broken:
            return defer.succeed(False)
        d = defer.Deferred()
        self.waiting.append(d)
        if len(self.waiting) == self.count:
            for waiting in self.waiting:
                waiting.callback(True)
        return d

    def break_(self) -> None:
        if self.broken or len(self.waiting) == self.count:
            return
        self.broken = True
        for waiting in self.waiting:
            waiting.callback(False)


class Engine:
    """One sliver's deployment engine (module docstring)."""

    def __init__(self, slice_name: str, host: str, home: str, store, publish, *, reactor=None, clock=None,
                 fetcher=None, registry: Registry | None = None, resend_interval: float = RESEND_SECONDS):
        if reactor is None:
            from twisted.internet import reactor
        from dsmt.server.deployment.supervisor import Supervisor
        self.slice_name = check_slice_name(slice_name)
        self.host, self.home, self.store, self.publish = host, home, store, publish
        self.reactor, self.clock = reactor, clock or reactor
        if fetcher is None:
            from dsmt.server.deployment.fetch import Fetcher
            fetcher = Fetcher(reactor=reactor)
        self.registry = registry or Registry()
        self.resend_interval = resend_interval
        self.supervisor = Supervisor(reactor, self, clock=self.clock)
        self.context = Context(self.slice_name, host, home, {}, reactor, self.clock, fetcher, self.supervisor,
                               self._record)
        self.descriptor = None
        self.lifecycles: dict[str, ComponentLifecycle] = {}
        self.application: ApplicationStatus | None = None
        self._resend = None
        self._busy = False
        self._failures: list[StepFailure] = []
        self._monitors: dict = {}                 # component → its pending health timer or round
        self._unhealthy: dict[str, str] = {}      # component → why the monitor killed its process

    # -- queries ----------------------------------------------------------------------------------------

    def status(self) -> dict[str, str | None]:
        return {name: lifecycle.state for name, lifecycle in self.lifecycles.items()}

    def details(self) -> dict[str, dict]:
        return {name: {"state": lc.state, "reason": lc.reason, "pid": self.supervisor.pid(name),
                       "restarts": self.supervisor.restarts(name)} for name, lc in self.lifecycles.items()}

    @property
    def next_resend(self) -> float | None:
        """When the status is re-sent next (``clock`` seconds), or None."""
        return self._resend.getTime() if self._resend is not None and self._resend.active() else None

    # -- state changes ------------------------------------------------------------------------------------

    def _record(self, name: str, **fields) -> None:
        self.store.record(name, **fields)

    def _apply(self, name: str, transitions) -> None:
        lifecycle = self.lifecycles[name]
        for transition in transitions:
            event = self.application.update(self.lifecycles.values(), transition)
            changed = {} if event is None else {"application_state": self.application.state}
            self.store.record(name, state=transition.after, reason=transition.reason,
                              milestones=lifecycle.milestones, **changed)
            if transition.after == RUNNING:
                self._watch(name)
            elif transition.before == RUNNING:
                self._unwatch(name)
            if event is not None:
                self._send(event)

    # -- the health monitor -------------------------------------------------------------------------------

    def _watch(self, name: str) -> None:
        """Arm ``name``'s health timer (module docstring), unless it has no check or one is armed."""
        health = self.descriptor.component(name).health
        if health is None or name in self._monitors:
            return
        self._monitors[name] = self.clock.callLater(health.interval, self._check_health, name)

    def _unwatch(self, name: str) -> None:
        pending = self._monitors.pop(name, None)
        if pending is None:
            return
        if isinstance(pending, defer.Deferred):
            pending.cancel()
        elif pending.active():
            pending.cancel()

    def _unwatch_all(self) -> None:
        for name in list(self._monitors):
            self._unwatch(name)

    def _check_health(self, name: str) -> None:
        self._monitors.pop(name, None)
        if self.lifecycles.get(name) is None or self.lifecycles[name].state != RUNNING:
            return
        component = self.descriptor.component(name)
        checker = HealthChecker(self.reactor, component.health, self.context.values, clock=self.clock,
                                run_command=lambda command, timeout: self.context.run_command(name, command, timeout))
        round_ = self._monitors[name] = checker.wait_healthy(startup=False)
        round_.addCallbacks(self._still_healthy, self._now_unhealthy, callbackArgs=(name, round_),
                            errbackArgs=(name, round_))

    def _still_healthy(self, _, name: str, round_) -> None:
        if self._monitors.get(name) is round_:
            del self._monitors[name]
            self._watch(name)

    def _now_unhealthy(self, failure, name: str, round_) -> None:
        if self._monitors.get(name) is not round_:
            return                      # cancelled: the component left running meanwhile
        del self._monitors[name]
        reason = failure.value.reason if failure.check(HealthError) else failure.getErrorMessage()
        pid, started = self.supervisor.pid(name), self.supervisor.started(name)
        if pid is not None:
            self._unhealthy[name] = reason
        self._apply(name, self.lifecycles[name].fail(f"health check: {reason}"))
        if pid is not None and not DirectorySandbox.signal_group(pid, started or "-", signal.SIGKILL):
            self._unhealthy.pop(name, None)
            _log.warn("{component} is unhealthy but its process {pid} could not be killed", component=name, pid=pid)

    def _send(self, event) -> None:
        try:
            self.publish(event)
        except Exception:  # noqa: BLE001 — publishing is best effort; the store holds the truth
            _log.failure("publishing {channel} failed", channel=event.channel)
        self._schedule_resend()

    def _schedule_resend(self) -> None:
        if self._resend is not None and self._resend.active():
            self._resend.cancel()
        self._resend = self.clock.callLater(self.resend_interval, self.resend_status) if self.resend_interval else None

    def resend_status(self):
        """Publish the current status again (and schedule the next re-send); the event, or None."""
        event = self.application.event() if self.application is not None else None
        if event is None:
            self._resend = None
            return None
        self._send(event)
        return event

    def close(self) -> None:
        """Cancel the engine's timers; supervised processes keep running (module docstring)."""
        if self._resend is not None and self._resend.active():
            self._resend.cancel()
        self._resend = None
        self._unwatch_all()
        for entry in self.supervisor.procs.values():
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
        self.supervisor.procs.clear()
        for wait in list(self.context.waits.values()):
            wait.cancel()

    # -- deploying ----------------------------------------------------------------------------------------

    def deploy(self, descriptor_bytes: bytes, parameters: dict | None = None):
        """Deploy (module docstring); a Deferred of the :class:`Report`."""
        return defer.ensureDeferred(self._deploy(descriptor_bytes, dict(parameters or {})))

    def _load(self, descriptor, values, records=None) -> None:
        self._unwatch_all()
        self._unhealthy.clear()
        self.descriptor = descriptor
        self.context.values.clear()
        self.context.values.update(values)
        self.lifecycles = {}
        for component in descriptor.components:
            record = (records or {}).get(component.name)
            kwargs = {} if record is None else {"state": record.state, "reason": record.reason,
                                                "milestones": [Milestone(m) for m in record.milestones]}
            self.lifecycles[component.name] = ComponentLifecycle.for_component(component, **kwargs)

    async def _deploy(self, data: bytes, parameters: dict) -> Report:
        if self._busy:
            raise Refusal("busy", "a deployment is already in progress on this sliver")
        descriptor = parse_descriptor(data, actions=self.registry.actions())
        values = resolve_parameters(descriptor, parameters)
        application = ApplicationStatus(self.slice_name, self.host, descriptor.application.name)
        self._busy = True
        try:
            if self.descriptor is not None:
                for name in self.lifecycles:
                    if self.supervisor.pid(name) is not None or self.supervisor.is_up(name):
                        await self._do("stop", name)
            self.store.begin_deployment(descriptor.application.name, descriptor.application.version, data,
                                        values, [component.name for component in descriptor.components])
            self._load(descriptor, values)
            self.application = application
            for name, lifecycle in self.lifecycles.items():
                self._apply(name, lifecycle.request())
            return await self._run_steps()
        finally:
            self._busy = False

    async def _run_steps(self) -> Report:
        self._failures = []
        await self._step(self.descriptor.steps, {})
        return self._report()

    def _report(self) -> Report:
        return Report(self.descriptor.application.name if self.descriptor else None, not self._failures,
                      self.status(), tuple(self._failures))

    async def _step(self, step, gates: dict) -> bool:
        if isinstance(step, Do):
            return await self._do(step.action, step.component)
        if isinstance(step, Barrier):
            return await gates[step.name].arrive()
        if isinstance(step, Sequence):
            for child in step.steps:
                if not await self._step(child, gates):
                    return False
            return True
        assert isinstance(step, Parallel)
        holders: dict[str, int] = {}
        for branch in step.branches:
            for barrier in barriers_of(branch):
                holders[barrier.name] = holders.get(barrier.name, 0) + 1
        inner = {name: Gate(count) for name, count in holders.items()}

        async def branch_run(branch) -> bool:
            ok = await self._step(branch, inner)
            if not ok:
                for gate in inner.values():
                    gate.break_()
            return ok
        results = await defer.gatherResults([defer.ensureDeferred(branch_run(b)) for b in step.branches])
        return all(results)

    async def _do(self, action: str, name: str) -> bool:
        component = self.descriptor.component(name)
        lifecycle = self.lifecycles[name]
        try:
            self._apply(name, lifecycle.advance())
            plan = list(self.registry.plan(action))
            if action == "start" and lifecycle.state != RUNNING:
                preparation = [self.registry.get(step) for milestone, step in PREPARATION
                               if milestone in lifecycle.needs and milestone not in lifecycle.milestones]
                plan = preparation + plan
            for management in plan:
                await management.run(self.context, component)
                if management.reaches is not None:
                    self._apply(name, lifecycle.reach(management.reaches))
                if management.outcome == RUNNING:
                    self._apply(name, lifecycle.run())
                elif management.outcome == TERMINATED:
                    self._apply(name, lifecycle.terminate())
            return True
        except (Refusal, ProcessError, HealthError) as refusal:
            self._failed(name, action, refusal.code, refusal.reason)
        except defer.CancelledError:
            self._failed(name, action, "cancelled", "the step was cancelled")
        except Exception as exc:  # noqa: BLE001 — a plugin's bug fails its component, not the engine
            _log.failure("management component failed on {component}", component=name)
            self._failed(name, action, "internal", f"{type(exc).__name__}: {exc}")
        return False

    def _failed(self, name: str, action: str, code: str, reason: str) -> None:
        self._failures.append(StepFailure(action, name, code, reason))
        self._apply(name, self.lifecycles[name].fail(f"{action}: {code}: {reason}"))

    # -- commands ---------------------------------------------------------------------------------------

    def _command(self, action: str, names):
        async def run() -> Report:
            if self.descriptor is None:
                raise Refusal("no-deployment", "nothing is deployed on this sliver")
            for name in names:
                if name not in self.lifecycles:
                    raise Refusal("unknown-component", f"{self.descriptor.application.name} has no component "
                                  f"{name!r}")
            self._failures = []
            for name in names:
                await self._do(action, name)
            return self._report()
        return defer.ensureDeferred(run())

    def start(self, component: str):
        """Start one component (preparing what it lacks); a Deferred of the Report."""
        return self._command("start", [component])

    def stop(self, component: str):
        return self._command("stop", [component])

    def uninstall(self, component: str | None = None):
        """Uninstall one component, or all of them (in reverse order) when None."""
        names = [component] if component is not None else list(reversed(list(self.lifecycles)))
        return self._command("uninstall", names)

    # -- the supervisor's listener ---------------------------------------------------------------------------

    def process_exited(self, name: str, reason: str, delay: float | None, restarts: int) -> None:
        wait = self.context.waits.pop(name, None)
        if wait is not None:
            wait.cancel()
        lifecycle = self.lifecycles.get(name)
        if lifecycle is None:
            return
        policy = self.descriptor.component(name).restart
        unhealthy = self._unhealthy.pop(name, None)
        if unhealthy is not None:
            reason = f"failed its health check ({unhealthy}) and was killed"
        if delay is None:
            text = f"the process {reason}; gave up after {restarts} restart(s) (maxRestarts={policy.max_restarts})"
        else:
            text = f"the process {reason}; restart {restarts} of {policy.max_restarts} in {delay:g} s"
        self.store.record(name, pid=None, pid_started=None, restarts=restarts, restart_pending=delay is not None)
        self._apply(name, lifecycle.fail(text))

    def process_restarted(self, name: str, pid: int, started: str) -> None:
        self.store.record(name, pid=pid, pid_started=started, restart_pending=False)
        component = self.descriptor.component(name)
        if component.health is None:
            self._restarted_healthy(None, name)
            return
        wait = self.context.waits[name] = self.context.health(component).wait_healthy(startup=True)
        wait.addCallbacks(self._restarted_healthy, self._restarted_unhealthy, callbackArgs=(name,),
                          errbackArgs=(name, wait))

    def _restarted_healthy(self, _, name: str) -> None:
        self.context.waits.pop(name, None)
        try:
            self._apply(name, self.lifecycles[name].run())
        except Refusal as refusal:
            self._apply(name, self.lifecycles[name].fail(refusal.reason))

    def _restarted_unhealthy(self, failure, name: str, wait) -> None:
        if self.context.waits.get(name) is wait:
            del self.context.waits[name]
        if failure.check(defer.CancelledError):
            return
        self._apply(name, self.lifecycles[name].fail(f"restarted but {failure.getErrorMessage()}"))
        self.supervisor.stop(name)

    # -- recovery ----------------------------------------------------------------------------------------

    def recover(self):
        """Apply the store's recovery rule; a Deferred of the Report (None when nothing was deployed)."""
        return defer.ensureDeferred(self._recover())

    async def _recover(self) -> Report | None:
        stored = self.store.load()
        if stored is None:
            return None
        descriptor = parse_descriptor(stored.descriptor, actions=self.registry.actions())
        values = resolve_parameters(descriptor, stored.parameters)
        self._load(descriptor, values, stored.components)
        self.application = ApplicationStatus(self.slice_name, self.host, descriptor.application.name, stored.state)
        self.resend_status()
        self._failures = []
        rerun, restart = False, []
        for component in descriptor.components:
            name, record = component.name, stored.components[component.name]
            if record.state == RUNNING:
                launch = self.context.launch(name, component.start)
                stop_launch = None
                if component.stop is not None and component.stop.command is not None:
                    stop_launch = self.context.launch(name, component.stop.command)
                if self.supervisor.adopt(launch, component.restart, component.stop, record.pid, record.pid_started,
                                         record.restarts, stop_launch=stop_launch):
                    self._watch(name)
                    continue
                self.store.record(name, pid=None, pid_started=None)
                self._apply(name, self.lifecycles[name].fail("the process was lost while the engine was down"))
                restart.append(name)
            elif record.state in (REQUESTED, INSTANTIATED, INITIALIZED, INSTALLED):
                rerun = True
            elif record.state == FAILED and record.restart_pending:
                restart.append(name)
        for name in restart:
            await self._do("start", name)
        if rerun:
            self._busy = True
            try:
                await self._step(self.descriptor.steps, {})
            finally:
                self._busy = False
        return self._report()


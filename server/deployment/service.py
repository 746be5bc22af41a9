"""The deployment engine's operations and their SOAP face: ``DeploymentService`` (``wsdl/deployment.wsdl``).

Namespace :data:`TNS`; HTTP path ``/deployment``; over PsEPR each engine is instance ``<host>`` of
service ``deployment.<slice>`` (channel ``/org/dsmt/ns/soap/deployment.<slice>/``,
:func:`psepr_service_for`), so one multicast call reaches **every engine of one slice** and no
other slice's (the committed WSDL's PsEPR port names the generic ``deployment`` channel; callers
address a slice with :func:`psepr_address`).

=============  ==========================================  ================  =================================
operation      in                                          out               faults (SOAP 1.1 faultcode)
=============  ==========================================  ================  =================================
``Deploy``     ``descriptor`` (the XML, as text),          ``Report``        ``Client.InvalidDescriptor``,
               ``parameter*`` (``name``, ``value``)                          ``Client.Busy``
``Stage``      the same                                    ``Staged``        ``Client.InvalidDescriptor``
``Start``      ``component``                               ``Report``        ``Client.NoDeployment``,
``Stop``       ``component``                               ``Report``        ``Client.UnknownComponent``,
``Uninstall``  ``component`` (optional: all of them)       ``Report``        ``Client.Busy``
``Status``     —                                           ``EngineStatus``  —
``Command``    ``command`` (``dsmt.server.deployment.      ``CommandReply``  ``Client.InvalidCommand.<code>``,
               commands``' grammar)                                          ``Client.NotStaged``,
                                                                             ``Client.WrongApplication``, the above
=============  ==========================================  ================  =================================

* ``Report``: ``application``, ``ok`` (no step failed), ``state`` (the application's published
  state), one ``component`` per component (``name``, ``state``, ``reason``, ``pid``,
  ``restarts``) and one ``failure`` per failed step (``action``, ``component``, ``code``,
  ``reason``).  A deployment whose steps failed is a Report with ``ok`` false, not a fault: the
  descriptor was accepted and what happened is in the states.  ``Deploy`` answers when the
  deployment's steps have all run (downloads, installs and health checks included).
* ``InvalidDescriptor``'s reason is the ``DescriptorError``'s (its code first:
  ``schema: line 3: …``), parameters included (``parameter: 'port' is required…``).
* **One operation at a time.**  While a deployment, a command or the start-up recovery runs,
  every other operation but ``Status`` is ``Client.Busy``.  Commands from the command channel
  queue instead (at most :data:`MAX_QUEUED_COMMANDS`; more are refused and logged).

**Commands** (the channel's and ``Command``'s), for ``<host>`` ``*`` or this engine's host:

* ``APPCONFIG,<host>,<app>,<proc>`` — this node runs application ``<app>`` as ``<proc>``: deploy
  the descriptor **staged** for ``<app>`` (``Stage``; kept in the engine's descriptor directory,
  :class:`StagedDescriptors`).  Idempotent: when ``<app>`` is already deployed from the same
  descriptor with the same parameter values, nothing is redone and the current status is re-sent
  (a planner may repeat APPCONFIG).  Nothing staged but ``<app>`` deployed: the same.  Nothing
  staged and ``<app>`` not deployed: ``NotStaged``.
* ``UPDATE,<host>,<app>`` — deploy ``<app>`` again from its staged descriptor (a new version), or
  from the deployed one when none is staged: every component is stopped and the steps re-run.
* ``UNINSTALL,<host>,<app>[,<component>]``, ``START,…``, ``STOP,…`` — the engine's operations on
  the deployed application, which must be ``<app>`` (``WrongApplication`` otherwise).

A command for another host is answered ``outcome`` ``ignored`` (a multicast reaches every
engine); ``CommandReply`` holds the command as read, the outcome (``ran`` / ``ignored``), the
reason when ignored and the Report when it ran.

**Engine-provided parameters.**  When a descriptor declares a parameter named ``node``, ``slice``
or ``proc`` and the caller gives no value, the engine gives its host name, its slice and (APPCONFIG)
the proc — so ``tests/server/deployment/fixtures/xyz.xml``'s required ``node`` needs no value.

Sizes: the SOAP core's envelope limit (1 MiB) bounds every request; then the descriptor meets
``parse_descriptor``'s limits and each parameter ``resolve_parameters``' (at most
``MAX_PARAMETERS`` parameters, in the schema).  Text lengths are not schema facets (spyne writes
them in an order that changes between runs, and the committed WSDL must not).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

from spyne import Boolean, ComplexModel, Integer, ServiceBase, Unicode, rpc
from twisted.internet import defer
from twisted.logger import Logger

from dsmt.server.deployment import commands as cmd
from dsmt.server.deployment.descriptor import (
    MAX_COMPONENTS, MAX_DESCRIPTOR_BYTES, MAX_PARAMETERS, DescriptorError, parse_descriptor, resolve_parameters,
)
from dsmt.server.deployment.engine import Report
from dsmt.server.faults import client_fault, subcode
from dsmt.server.refusal import Refusal
from dsmt.server.slicemanager.slicedir import write_atomic

__all__ = [
    "TNS", "NAME", "PSEPR_SERVICE", "HTTP_PATH", "MAX_QUEUED_COMMANDS", "MAX_STAGED_PARAMETERS_BYTES",
    "ENGINE_PARAMETERS", "FAULT_NAMES", "psepr_service_for", "psepr_address", "StagedDescriptors", "Outcome",
    "Operations", "ComponentState", "Failure", "ReportType", "EngineStatus", "Staged", "CommandReply", "Parameter",
    "deployment_service",
]

log = Logger(namespace="dsmt.deployment")

TNS = "http://dsmt.org/ns/deployment/service"
#: WSDL name (binding and port names: ``deployment``, ``deployment_psepr``).
NAME = "deployment"
#: The generic PsEPR service name (the committed WSDL's port); engines serve ``deployment.<slice>``.
PSEPR_SERVICE = "deployment"
#: URL path of the HTTP endpoint.
HTTP_PATH = "deployment"
#: Most channel commands waiting while one runs: a planner sends a handful per node (APPCONFIG,
#: then START/STOP); 16 absorbs a burst, and a flood is refused instead of queueing without end.
MAX_QUEUED_COMMANDS = 16
#: Largest staged parameter file read back: the SOAP envelope that brought the values is at most
#: 1 MiB, and JSON escaping at most doubles typical text.
MAX_STAGED_PARAMETERS_BYTES = 2 * 1024 * 1024
#: Parameters the engine fills in when a descriptor declares them and no value was given.
ENGINE_PARAMETERS = ("node", "slice", "proc")
#: Refusal codes → fault names (``Client.<name>``); others become their CamelCase (``faults.subcode``).
FAULT_NAMES = {
    "busy": "Busy", "no-deployment": "NoDeployment", "unknown-component": "UnknownComponent",
    "not-staged": "NotStaged", "wrong-application": "WrongApplication", "store": "StorageError",
    "io": "StorageError",
}
_BUSY = "another deployment operation is in progress on this engine; try again when it is done"


def psepr_service_for(slice_name: str) -> str:
    """The PsEPR service name the engines of ``slice_name`` serve: ``deployment.<slice>``."""
    from dsmt.server.slicemanager.spec import check_slice_name
    return f"{PSEPR_SERVICE}.{check_slice_name(slice_name)}"


def psepr_address(slice_name: str, host: str | None = None) -> str:
    """The ``psepr:`` address of every engine of a slice, or of the one on ``host``."""
    from dsmt.transports.psepr_soap import service_address
    return service_address(psepr_service_for(slice_name), host)


# ------------------------------------------------------------------ staged descriptors

class StagedDescriptors:
    """Descriptors waiting for APPCONFIG/UPDATE, one per application: ``<dir>/<app>.xml`` (the bytes as
    given) and ``<dir>/<app>.json`` (the parameters given), each file written atomically.  A crash
    between the two writes can pair new parameters with the old descriptor; nothing trusts a staged
    pair: a deployment validates it again.  Application names are the schema's
    (:data:`~dsmt.server.deployment.commands.APPLICATION_NAME`), so a name is never a path."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)

    def _paths(self, application: str) -> tuple[str, str]:
        if not cmd.APPLICATION_NAME.match(application or ""):
            raise Refusal("bad-name", f"{str(application)[:60]!r} is not an application name")
        base = os.path.join(self.directory, application)
        return base + ".xml", base + ".json"

    def put(self, application: str, descriptor: bytes, parameters: dict[str, str]) -> None:
        xml, params = self._paths(application)
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            write_atomic(params, json.dumps(parameters, sort_keys=True).encode("utf-8"), 0o600)
            write_atomic(xml, descriptor, 0o600)
        except OSError as exc:
            raise Refusal("io", f"cannot stage {application}: {exc.strerror or exc}") from None

    def get(self, application: str) -> tuple[bytes, dict[str, str]] | None:
        """The staged descriptor and parameters of ``application``, or None."""
        xml, params = self._paths(application)
        try:
            data = _read(xml, MAX_DESCRIPTOR_BYTES)
        except FileNotFoundError:
            return None
        try:
            given = json.loads(_read(params, MAX_STAGED_PARAMETERS_BYTES).decode("utf-8"))
        except FileNotFoundError:
            given = {}
        except (ValueError, UnicodeDecodeError):
            raise Refusal("io", f"the staged parameters of {application} are not readable JSON") from None
        if not isinstance(given, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in given.items()):
            raise Refusal("io", f"the staged parameters of {application} are not a name → text mapping")
        return data, given


def _read(path: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise Refusal("io", f"cannot read {os.path.basename(path)}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise Refusal("io", f"{os.path.basename(path)} is over {limit} bytes")
    return data


# ------------------------------------------------------------------ the operations

@dataclass(frozen=True)
class Outcome:
    """What a command did: ``ran`` (``report``) or ``ignored`` (``reason``)."""

    command: str
    outcome: str
    reason: str | None = None
    report: Report | None = None


class Operations:
    """The engine's operations, one at a time, shared by the SOAP face and the command channel.

    ``engine``: the :class:`~dsmt.server.deployment.engine.Engine`; ``staged``: its
    :class:`StagedDescriptors` (None: APPCONFIG/UPDATE only act on what is deployed).  Every operation
    returns a Deferred; :class:`~dsmt.server.refusal.Refusal` (``DescriptorError`` included) fails it.
    ``counts``: ``run``, ``ignored``, ``refused`` channel commands.
    """

    def __init__(self, engine, staged: StagedDescriptors | None = None, *, max_queued: int = MAX_QUEUED_COMMANDS):
        self.engine = engine
        self.staged = staged
        self.max_queued = max_queued
        self.counts: Counter = Counter()
        self.last_command: defer.Deferred | None = None   # the latest channel command (tests wait on it)
        self._lock = defer.DeferredLock()

    @property
    def busy(self) -> bool:
        return self._lock.locked

    def _exclusive(self, function, *args) -> defer.Deferred:
        """``function(*args)`` now, or Busy when another operation holds the engine."""
        if self._lock.locked:
            return defer.fail(Refusal("busy", _BUSY))
        return self._queued(function, *args)

    def _queued(self, function, *args) -> defer.Deferred:
        def call():
            return defer.maybeDeferred(function, *args).addCallback(
                lambda value: defer.ensureDeferred(value) if hasattr(value, "__await__") else value)
        return self._lock.run(call)

    # -- parameters -----------------------------------------------------------------------------

    def _given(self, data: bytes, parameters: dict[str, str], proc: str | None = None):
        """(descriptor, the values to deploy with): ``parameters`` plus the engine-provided ones."""
        descriptor = parse_descriptor(data, actions=self.engine.registry.actions())
        provided = {"node": self.engine.host, "slice": self.engine.slice_name, "proc": proc}
        given = dict(parameters)
        for parameter in descriptor.parameters:
            if parameter.name in ENGINE_PARAMETERS and parameter.name not in given and provided[parameter.name]:
                given[parameter.name] = provided[parameter.name]
        return descriptor, given

    # -- operations -------------------------------------------------------------------------------

    def deploy(self, data: bytes, parameters: dict[str, str] | None = None) -> defer.Deferred:
        """Deploy ``data`` (a Deferred of the engine's Report; DescriptorError before anything is done)."""
        def run():
            _, given = self._given(data, parameters or {})
            return self.engine.deploy(data, given)
        return self._exclusive(run)

    def stage(self, data: bytes, parameters: dict[str, str] | None = None):
        """Check ``data`` and ``parameters`` as a deployment would (``proc``, which only APPCONFIG gives, as
        a placeholder), and keep them for APPCONFIG; the descriptor's Application (name, version).
        DescriptorError / Refusal when refused."""
        if self.staged is None:
            raise Refusal("not-staged", "this engine keeps no staged descriptors")
        descriptor, given = self._given(data, parameters or {}, proc="proc")
        resolve_parameters(descriptor, given)
        self.staged.put(descriptor.application.name, data, dict(parameters or {}))
        return descriptor.application

    def start(self, component: str) -> defer.Deferred:
        return self._exclusive(self.engine.start, component)

    def stop(self, component: str) -> defer.Deferred:
        return self._exclusive(self.engine.stop, component)

    def uninstall(self, component: str | None = None) -> defer.Deferred:
        return self._exclusive(self.engine.uninstall, component)

    def recover(self) -> defer.Deferred:
        """The engine's recovery, holding the engine (operations are Busy meanwhile)."""
        return self._queued(self.engine.recover)

    def deployed(self) -> str | None:
        descriptor = self.engine.descriptor
        return descriptor.application.name if descriptor is not None else None

    # -- commands ----------------------------------------------------------------------------------

    def command(self, text: str) -> defer.Deferred:
        """A ``Command`` operation: a Deferred of its :class:`Outcome`; CommandError when refused, Busy when
        another operation runs."""
        verdict = cmd.judge(text, host=self.engine.host)
        if verdict.refused is not None:
            return defer.fail(verdict.refused)
        if verdict.ignored is not None:
            return defer.succeed(Outcome(text, "ignored", verdict.ignored))
        return self._exclusive(self._run, verdict.command)

    def received(self, event) -> None:
        """The command channel's callback: judged, logged, queued; never raises."""
        verdict = cmd.judge(event, host=self.engine.host, slice_name=self.engine.slice_name)
        if verdict.ignored is not None:
            self.counts["ignored"] += 1
            log.debug("command ignored: {why}", why=verdict.ignored)
            return
        if verdict.refused is not None:
            self.counts["refused"] += 1
            log.warn("command refused ({code}): {reason}", code=verdict.refused.code, reason=verdict.refused.reason)
            return
        if len(self._lock.waiting) >= self.max_queued:
            self.counts["refused"] += 1
            log.warn("command refused (busy): {command}: {queued} commands already wait",
                     command=verdict.command.text(), queued=len(self._lock.waiting))
            return
        self.counts["run"] += 1
        command = verdict.command
        log.info("command {command} from {sender}", command=command.text(),
                 sender=f"{getattr(event, 'from_service', None)}/{getattr(event, 'from_instance', None)}")
        self.last_command = self._queued(self._run, command)
        self.last_command.addCallbacks(self._done, self._failed, errbackArgs=(command,))

    @staticmethod
    def _done(outcome: Outcome) -> None:
        report = outcome.report
        if report is not None and not report.ok:
            for failure in report.failures:
                log.warn("{command}: {action} of {component} failed ({code}): {reason}", command=outcome.command,
                         action=failure.action, component=failure.component, code=failure.code,
                         reason=failure.reason)

    @staticmethod
    def _failed(failure, command) -> None:
        if failure.check(Refusal):
            log.warn("command {command} refused ({code}): {reason}", command=command.text(),
                     code=failure.value.code, reason=failure.value.reason)
        else:
            log.failure("command {command} failed", failure, command=command.text())

    async def _run(self, command: cmd.Command) -> Outcome:
        engine = self.engine
        if command.verb in (cmd.APPCONFIG, cmd.UPDATE):
            report = await self._configure(command)
        else:
            if self.deployed() != command.application:
                raise Refusal("wrong-application", f"{command.application} is not deployed on this engine "
                              f"({self.deployed() or 'nothing'} is)")
            if command.verb == cmd.START:
                report = await engine.start(command.target)
            elif command.verb == cmd.STOP:
                report = await engine.stop(command.target)
            else:
                report = await engine.uninstall(command.target)
        return Outcome(command.text(), "ran", report=report)

    async def _configure(self, command: cmd.Command) -> Report:
        engine = self.engine
        application = command.application
        staged = self.staged.get(application) if self.staged is not None else None
        stored = engine.store.load() if self.deployed() == application else None
        if staged is None:
            if stored is None:
                raise Refusal("not-staged", f"no descriptor of {application} is staged on this engine (Stage it "
                              "first) and it is not deployed")
            data, parameters = stored.descriptor, None
        else:
            data, parameters = staged
        proc = command.target if command.verb == cmd.APPCONFIG else None
        if parameters is None:
            given = dict(stored.parameters)
        else:
            _, given = self._given(data, parameters, proc)
        if command.verb == cmd.APPCONFIG and stored is not None and stored.descriptor == data:
            descriptor = parse_descriptor(data, actions=engine.registry.actions())
            if resolve_parameters(descriptor, given) == stored.parameters:
                engine.resend_status()
                return Report(application, True, engine.status())
        return await engine.deploy(data, given)


# ------------------------------------------------------------------ SOAP types

_Required = dict(min_occurs=1, nillable=False)
_Optional = dict(min_occurs=0, nillable=False)


class Parameter(ComplexModel):
    """One parameter value of a deployment."""

    __namespace__ = TNS
    _type_info = [("name", Unicode(**_Required)), ("value", Unicode(**_Required))]


class ComponentState(ComplexModel):
    """One component: lifecycle state (absent before it was requested), failure reason, process, restarts."""

    __namespace__ = TNS
    _type_info = [
        ("name", Unicode(**_Required)),
        ("state", Unicode(**_Optional)),
        ("reason", Unicode(**_Optional)),
        ("pid", Integer(**_Optional)),
        ("restarts", Integer(**_Required)),
    ]


class Failure(ComplexModel):
    """One failed step."""

    __namespace__ = TNS
    _type_info = [("action", Unicode(**_Required)), ("component", Unicode(**_Required)),
                  ("code", Unicode(**_Required)), ("reason", Unicode(**_Required))]


_Components = ComponentState.customize(min_occurs=0, max_occurs=MAX_COMPONENTS, nillable=False)


class ReportType(ComplexModel):
    """What a deployment or an operation did (see the module docstring)."""

    __namespace__ = TNS
    __type_name__ = "Report"
    _type_info = [
        ("application", Unicode(**_Optional)),
        ("ok", Boolean(**_Required)),
        ("state", Unicode(**_Optional)),
        ("component", _Components),
        ("failure", Failure.customize(min_occurs=0, max_occurs=MAX_COMPONENTS * 8, nillable=False)),
    ]


class EngineStatus(ComplexModel):
    """The engine now: its slice and host, the deployed application (if any) and its components."""

    __namespace__ = TNS
    _type_info = [
        ("slice", Unicode(**_Required)),
        ("host", Unicode(**_Required)),
        ("application", Unicode(**_Optional)),
        ("version", Unicode(**_Optional)),
        ("state", Unicode(**_Optional)),
        ("busy", Boolean(**_Required)),
        ("component", _Components),
    ]


class Staged(ComplexModel):
    """The application a staged descriptor deploys."""

    __namespace__ = TNS
    _type_info = [("application", Unicode(**_Required)), ("version", Unicode(**_Required))]


class CommandReply(ComplexModel):
    """A command's outcome: ``ran`` (``report``) or ``ignored`` (``reason``: for another host)."""

    __namespace__ = TNS
    _type_info = [
        ("command", Unicode(**_Required)),
        ("outcome", Unicode(**_Required)),
        ("reason", Unicode(**_Optional)),
        ("report", ReportType.customize(**_Optional)),
    ]


def _components(engine) -> list[ComponentState]:
    return [ComponentState(name=name, state=info["state"], reason=info["reason"], pid=info["pid"],
                           restarts=info["restarts"]) for name, info in engine.details().items()]


def _report(engine, report: Report) -> ReportType:
    state = engine.application.state if engine.application is not None else None
    return ReportType(application=report.application, ok=report.ok, state=state, component=_components(engine),
                      failure=[Failure(action=f.action, component=f.component, code=f.code, reason=f.reason)
                               for f in report.failures])


def _fault(refusal: Refusal):
    if isinstance(refusal, DescriptorError):
        return client_fault("InvalidDescriptor", str(refusal))
    if isinstance(refusal, cmd.CommandError):
        return client_fault("InvalidCommand", refusal.reason, refusal.code)
    return client_fault(FAULT_NAMES.get(refusal.code) or subcode(refusal.code), refusal.reason)


def _faulted(failure):
    failure.trap(Refusal)
    raise _fault(failure.value)


def _parameters(values) -> dict[str, str]:
    given: dict[str, str] = {}
    for parameter in values or ():
        if parameter.name in given:
            raise client_fault("InvalidDescriptor", f"parameter: {parameter.name[:64]!r} is given twice")
        given[parameter.name] = parameter.value
    return given


def deployment_service(operations: Operations | None) -> type:
    """The spyne service class ``DeploymentService`` answering for ``operations`` (None: for the WSDL only)."""
    engine = operations.engine if operations is not None else None
    _Parameters = Parameter.customize(min_occurs=0, max_occurs=MAX_PARAMETERS, nillable=False)

    def answer(d: defer.Deferred) -> defer.Deferred:
        return d.addCallback(lambda report: _report(engine, report)).addErrback(_faulted)

    def text_bytes(text: str) -> bytes:
        return text.encode("utf-8", "surrogatepass")

    class DeploymentService(ServiceBase):
        __service_name__ = "DeploymentService"

        @rpc(Unicode(**_Required), _Parameters, _returns=ReportType, _out_variable_name="report")
        def Deploy(ctx, descriptor, parameter):
            return answer(operations.deploy(text_bytes(descriptor), _parameters(parameter)))

        @rpc(Unicode(**_Required), _Parameters, _returns=Staged, _out_variable_name="staged")
        def Stage(ctx, descriptor, parameter):
            try:
                application = operations.stage(text_bytes(descriptor), _parameters(parameter))
            except Refusal as refusal:
                raise _fault(refusal) from None
            return Staged(application=application.name, version=application.version)

        @rpc(Unicode(**_Required), _returns=ReportType, _out_variable_name="report")
        def Start(ctx, component):
            return answer(operations.start(component))

        @rpc(Unicode(**_Required), _returns=ReportType, _out_variable_name="report")
        def Stop(ctx, component):
            return answer(operations.stop(component))

        @rpc(Unicode(**_Optional), _returns=ReportType, _out_variable_name="report")
        def Uninstall(ctx, component):
            return answer(operations.uninstall(component))

        @rpc(_returns=EngineStatus, _out_variable_name="status")
        def Status(ctx):
            descriptor = engine.descriptor
            return EngineStatus(
                slice=engine.slice_name, host=engine.host, busy=operations.busy,
                application=descriptor.application.name if descriptor else None,
                version=descriptor.application.version if descriptor else None,
                state=engine.application.state if engine.application is not None else None,
                component=_components(engine))

        @rpc(Unicode(**_Required), _returns=CommandReply, _out_variable_name="reply")
        def Command(ctx, command):
            def replied(outcome: Outcome) -> CommandReply:
                report = _report(engine, outcome.report) if outcome.report is not None else None
                return CommandReply(command=outcome.command, outcome=outcome.outcome, reason=outcome.reason,
                                    report=report)
            return operations.command(command).addCallback(replied).addErrback(_faulted)

    return DeploymentService


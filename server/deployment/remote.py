"""The deployment engines over the network: :class:`HttpEngineCalls` and :class:`PsEPREngineCalls`.

Both implement :class:`~dsmt.server.deployment.orchestrate.EngineCalls` (``NodeCalls.run``'s
contract) over the committed ``wsdl/deployment.wsdl`` with the slice manager's per-node machinery
(:class:`~dsmt.server.slicemanager.remote.HttpCalls` / ``PsEPRCalls`` given :func:`engine_contract`):

* **HTTP** (:class:`HttpEngineCalls`): each request's ``endpoint`` is its engine's URL
  (``http://host:port/deployment``); one call per node, at most ``parallelism`` at a time.
* **PsEPR** (:class:`PsEPREngineCalls`): the engines of slice S serve PsEPR service
  ``deployment.<S>`` with their host as instance (``service.psepr_address``).  A batch whose requests
  all carry the same arguments (``Start``, ``Stop``, a ``Deploy`` without ``${node}``…) is **one
  multicast** to every engine of the slice, gathered from the named nodes until all answered or the
  timeout; otherwise one call per node, addressed by instance.

**Requests** carry the keyword arguments of :data:`OPERATIONS` (``plan.OPERATIONS`` plus ``Stage``
and ``Status``): ``descriptor`` as bytes (UTF-8 XML) and ``parameters`` as a name → value mapping,
which the adapter turns into the WSDL's text and ``parameter`` list (sorted by name, so equal
mappings make equal envelopes); ``component`` None on ``Uninstall`` means every component.  A
request outside that contract raises ValueError before anything is sent.

**Outcomes** (plain values, never zeep objects): ``Deploy``/``Start``/``Stop``/``Uninstall`` →
:class:`~dsmt.server.deployment.engine.Report` (``states``: component → state); ``Command`` →
:class:`CommandResult`; ``Status`` → :class:`EngineState`; ``Stage`` → :class:`StagedApplication`.
A node's failure is a :class:`~dsmt.server.slicemanager.calls.NodeCallError` whose code is the
fault's below ``Client.`` (``InvalidDescriptor``, ``Busy``, ``NoDeployment``, ``WrongApplication``,
``InvalidCommand.malformed``…) or ``unreachable`` / ``timeout`` / ``error``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

from dsmt.server.deployment.engine import Report, StepFailure
from dsmt.server.deployment.plan import OPERATIONS as PLAN_OPERATIONS
from dsmt.server.deployment.service import NAME as WSDL_NAME, psepr_address
from dsmt.server.slicemanager.remote import HttpCalls, NodeContract, PsEPRCalls

__all__ = ["OPERATIONS", "CommandResult", "EngineState", "StagedApplication", "check_engine_request",
           "engine_arguments", "engine_contract", "HttpEngineCalls", "PsEPREngineCalls"]

#: Engine operations and the keyword arguments of their requests (module docstring, *Requests*).
OPERATIONS: Mapping[str, tuple[str, ...]] = {
    **PLAN_OPERATIONS,
    "Stage": ("descriptor", "parameters"),
    "Status": (),
}


@dataclass(frozen=True)
class CommandResult:
    """A ``Command``'s reply: ``outcome`` ``ran`` (``report``) or ``ignored`` (``reason``: another host).
    ``ok`` and ``failures`` are the report's (an ignored command is ok), so a plan counts a command whose
    steps failed as failed (``orchestrate.node_result``)."""

    command: str
    outcome: str
    reason: str | None = None
    report: Report | None = None

    @property
    def ok(self) -> bool:
        return self.report is None or self.report.ok

    @property
    def failures(self) -> tuple[StepFailure, ...]:
        return self.report.failures if self.report is not None else ()


@dataclass(frozen=True)
class EngineState:
    """A ``Status`` reply: the engine's slice and host, its application (None before any deployment),
    the application's state, whether an operation runs, and component → state."""

    slice: str
    host: str
    application: str | None
    version: str | None
    state: str | None
    busy: bool
    components: dict = field(default_factory=dict)


class StagedApplication(NamedTuple):
    """A ``Stage`` reply: the application the staged descriptor deploys."""

    application: str
    version: str


def _text(value) -> str | None:
    return None if value is None else str(value)


def _report(value) -> Report:
    if not isinstance(value.ok, bool):
        raise TypeError("ok is not a boolean")
    states = {str(c.name): _text(c.state) for c in value.component or ()}
    failures = tuple(StepFailure(str(f.action), str(f.component), str(f.code), str(f.reason))
                     for f in value.failure or ())
    return Report(_text(value.application), value.ok, states, failures)


def _command(value) -> CommandResult:
    return CommandResult(str(value.command), str(value.outcome), _text(value.reason),
                         None if value.report is None else _report(value.report))


def _status(value) -> EngineState:
    return EngineState(str(value.slice), str(value.host), _text(value.application), _text(value.version),
                       _text(value.state), bool(value.busy),
                       {str(c.name): _text(c.state) for c in value.component or ()})


def _staged(value) -> StagedApplication:
    return StagedApplication(str(value.application), str(value.version))


#: How each operation's reply becomes its outcome value.
_CONVERT = {"Deploy": _report, "Start": _report, "Stop": _report, "Uninstall": _report, "Command": _command,
            "Status": _status, "Stage": _staged}


def check_engine_request(operation: str, kwargs: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``kwargs`` are exactly ``operation``'s (:data:`OPERATIONS`) with the right types."""
    expected = OPERATIONS.get(operation)
    if expected is None:
        raise ValueError(f"unknown deployment engine operation {operation!r}")
    if set(kwargs) != set(expected):
        raise ValueError(f"{operation} takes {', '.join(expected) or 'nothing'}; "
                         f"got {', '.join(sorted(kwargs)) or 'nothing'}")
    if "descriptor" in kwargs:
        if not isinstance(kwargs["descriptor"], bytes):
            raise ValueError(f"{operation}'s descriptor is bytes, not {type(kwargs['descriptor']).__name__}")
        try:
            kwargs["descriptor"].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("the descriptor is not UTF-8 text") from None
        parameters = kwargs["parameters"]
        if not isinstance(parameters, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in parameters.items()):
            raise ValueError(f"{operation}'s parameters are a mapping of names to text")
    component = kwargs.get("component")
    if component is None and operation in ("Start", "Stop"):
        raise ValueError(f"{operation} needs a component")
    if component is not None and not isinstance(component, str):
        raise ValueError("a component is named by text")
    if "command" in kwargs and not isinstance(kwargs["command"], str):
        raise ValueError("a command is text")


def engine_arguments(operation: str, kwargs: Mapping[str, Any]) -> dict:
    """The WSDL operation's keyword arguments for a checked request (module docstring, *Requests*)."""
    if "descriptor" in kwargs:
        return {"descriptor": kwargs["descriptor"].decode("utf-8"),
                "parameter": [{"name": name, "value": value} for name, value in sorted(kwargs["parameters"].items())]}
    if operation == "Uninstall" and kwargs.get("component") is None:
        return {}
    return dict(kwargs)


@functools.lru_cache(maxsize=None)
def engine_contract(slice_name: str | None = None) -> NodeContract:
    """The engines' :class:`NodeContract` (for slice ``slice_name``'s PsEPR service; None: HTTP only, where
    no PsEPR address is needed).  The slice name is checked (``spec.check_slice_name``)."""
    address = functools.partial(psepr_address, slice_name) if slice_name is not None else _no_psepr_address
    if slice_name is not None:
        address(None)            # the slice name's check, now rather than at the first call
    return NodeContract(WSDL_NAME, address, _CONVERT, check_engine_request, engine_arguments)


def _no_psepr_address(node: str | None = None) -> str:
    raise ValueError("the engines' PsEPR address needs the slice's name")


class HttpEngineCalls(HttpCalls):
    """The engines at their HTTP endpoint URLs (each request's ``endpoint``), one call per node."""

    def __init__(self, transport, *, reactor=None):
        super().__init__(engine_contract(), transport, reactor=reactor)


class PsEPREngineCalls(PsEPRCalls):
    """The engines of slice ``slice_name`` over SOAP/PsEPR on ``transport`` (a started
    :class:`~dsmt.transports.psepr_soap.PsEPRTransport`): one multicast to ``deployment.<slice>`` for a
    batch whose requests share their arguments, else one call per host."""

    def __init__(self, transport, slice_name: str, *, reactor=None):
        super().__init__(engine_contract(slice_name), transport, reactor=reactor)
        self.slice = slice_name

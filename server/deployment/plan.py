"""Deployment plans: which engine operations run on which nodes of a slice, in which order.

A plan (namespace :data:`NAMESPACE`, schema ``wsdl/deployment-plan.xsd``) is the workflow across
nodes that composes the per-node deployment engines (``wsdl/deployment.wsdl``) — the paper's BPEL
example "install on node A, then on node B" is a two-step ``<sequence>``.  It declares:

* **descriptors** (``<descriptor name href>``): the deployment descriptors its ``deploy`` steps
  send, ``href`` relative to the plan's file (:func:`read_descriptors`);
* **node sets** (``<nodes name>``): listed ``<node>`` addresses (normalised with
  ``normalize_node_address``) and ``<include set>`` of other sets, or ``all="true"`` — every node of
  the slice, known only when the plan is bound to a slice (:func:`bind`);
* **steps**: one action (``deploy`` a descriptor with parameters; ``start``/``stop``/``uninstall`` a
  component; a ``command`` line) on one node set, composed as ``sequence``, ``parallel`` and
  ``barrier`` with the deployment descriptor's semantics (``descriptor.barriers_of``).

**Rolling steps.**  A step's nodes (the set, in its order) are cut into batches of ``batch`` nodes
(a count, or a percentage of the set rounded up, at least 1; default: one batch of all).  Batches
run one after the other; after each, if more than ``max-failures`` percent of the step's nodes have
failed (``failed * 100 > max_failures * total``; default 0 %: any failure), the step has
*exceeded* its threshold: its remaining nodes are *skipped*, and the whole plan stops — no further
batch or step starts anywhere (other branches finish the batch they are in; their later nodes and
steps are skipped; barriers release their waiters).  Failures within the threshold are reported and
the plan goes on.  :class:`Rollout` is that logic, pure; :func:`dry_run` prints the calls a run
would make in its order; ``orchestrate.Orchestrator`` executes them.

**Templates.**  In parameter values and command text ``${node}`` is the node the call goes to and
``$$`` a literal ``$`` (``descriptor.substitute``); no other name exists.

Contract: :func:`parse_plan` returns a :class:`Plan` or raises :class:`PlanError` — never another
exception, whatever the bytes.  Codes: ``unsafe-xml`` (DTD, oversized, too deep, not well-formed),
``schema`` (the XSD's first violation with its line), ``duplicate`` (a descriptor, node set or step
name twice, a node twice in one set, a parameter twice in one deploy), ``unknown-node-set``,
``unknown-descriptor``, ``cycle`` (node sets include each other in a loop, or themselves),
``node-set`` (a set both ``all`` and listing nodes, or neither), ``node`` (not an address),
``template`` (a ``${…}`` other than ``${node}``), ``barrier`` (as for descriptors), ``limit`` (more
than :data:`MAX_STEPS`, :data:`MAX_NODE_SETS`, :data:`MAX_DESCRIPTORS` or a set over
:data:`MAX_SET_NODES`).  At bind time: ``unknown-node`` (a listed node is not in the slice),
``unknown-descriptor`` (no bytes for a declared descriptor), ``descriptor`` (a referenced
descriptor is invalid: its own code and reason follow), ``parameter`` (a deploy's parameters do
not fit its descriptor), ``io`` (a file cannot be read).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Union

from lxml import etree

from dsmt.server.deployment.descriptor import (
    MAX_DESCRIPTOR_BYTES, MAX_PARAMETERS, Barrier, DescriptorError, Parallel, Sequence, check_barriers,
    barriers_of, parse_descriptor, resolve_parameters, substitute, template_names,
)
from dsmt.server.refusal import Refusal
from dsmt.server.slicemanager.spec import MAX_NUMNODES, SliceSpecError, normalize_node_address
from dsmt.transports.xmlsafe import XmlSafetyError, parse_xml

__all__ = [
    "NAMESPACE", "SCHEMA_NAME", "MAX_PLAN_BYTES", "MAX_DEPTH", "MAX_STEPS", "MAX_NODE_SETS", "MAX_DESCRIPTORS",
    "MAX_SET_NODES", "OPERATIONS", "OK", "FAILED", "SKIPPED",
    "PlanError", "Plan", "DescriptorRef", "NodeSet", "Action", "PlanStep", "BatchSize", "NodeResult", "Rollout",
    "Sequence", "Parallel", "Barrier", "parse_plan", "read_plan", "read_descriptors", "bind", "check_descriptors",
    "dry_run", "walk_steps", "barrier_holders", "schema",
]

NAMESPACE = "http://dsmt.org/ns/deployment/plan"
#: The schema's file in the installed contracts (``dsmt.wsdl``, the repository's ``wsdl/``).
SCHEMA_NAME = "deployment-plan.xsd"

#: Largest plan read.  A plan lists at most a slice's nodes (1000 addresses of ≤ 60 bytes with
#: markup ≈ 80 KB per set) plus steps; 256 KiB fits a few full sets and stops a giant document.
MAX_PLAN_BYTES = 256 * 1024
#: Deepest nesting: plan/steps/…/step/deploy/parameter is 5 fixed levels; 32 leaves ~25 levels of
#: sequence/parallel, far beyond what anyone writes, and keeps every recursive walk short.
MAX_DEPTH = 32
#: Most steps (and composition elements) in a plan: a rollout is a handful of steps; 256 bounds
#: the report (steps × nodes) and the dry run's length.
MAX_STEPS = 256
#: Most node sets: a few per role or site; 64 bounds the include walk.
MAX_NODE_SETS = 64
#: Most descriptors one plan deploys: one per application plus versions to roll between.
MAX_DESCRIPTORS = 32
#: Most nodes in one set, listed or included: a slice's own maximum (``spec.MAX_NUMNODES``).
MAX_SET_NODES = MAX_NUMNODES

#: The engine operation of each action element (``wsdl/deployment.wsdl``) and its keyword arguments as
#: ``EngineCalls`` requests carry them: ``descriptor`` bytes and ``parameters`` a dict (an adapter turns them
#: into the WSDL's text and ``parameter`` list), ``component`` (None: every component), ``command`` text.
OPERATIONS: Mapping[str, tuple[str, ...]] = {
    "Deploy": ("descriptor", "parameters"),
    "Start": ("component",),
    "Stop": ("component",),
    "Uninstall": ("component",),
    "Command": ("command",),
}
_ELEMENT_OPERATION = {"deploy": "Deploy", "start": "Start", "stop": "Stop", "uninstall": "Uninstall",
                      "command": "Command"}

#: A node's outcome in a step.
OK, FAILED, SKIPPED = "ok", "failed", "skipped"

_Q = "{%s}" % NAMESPACE
_NODE = "node"


class PlanError(Refusal):
    """A plan is not acceptable (or cannot be bound to a slice): ``code`` (module docstring) and a reason
    naming the element and its line; ``line`` is that line (None when there is no single place)."""

    def __init__(self, code: str, reason: str, line: int | None = None):
        super().__init__(code, reason if line is None else f"line {line}: {reason}")
        self.line = line


# ---------------------------------------------------------------------------------------------------
# The model

@dataclass(frozen=True)
class DescriptorRef:
    name: str
    href: str


@dataclass(frozen=True)
class NodeSet:
    """A set with its includes resolved: ``all`` (every node of the slice) or ``nodes`` in document order,
    each once."""

    name: str
    nodes: tuple[str, ...] = ()
    all: bool = False


@dataclass(frozen=True)
class BatchSize:
    """``count`` nodes, or ``percent`` of the step's nodes rounded up (at least 1); neither: all at once."""

    count: int | None = None
    percent: int | None = None

    def of(self, total: int) -> int:
        """Nodes per batch for a step of ``total`` nodes (0 when there are none)."""
        if total == 0:
            return 0
        if self.count is not None:
            return min(self.count, total)
        if self.percent is not None:
            return max(1, math.ceil(self.percent * total / 100))
        return total

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent}%" if self.percent else "all"


@dataclass(frozen=True)
class Action:
    """One engine operation (:data:`OPERATIONS`).  ``descriptor``: the descriptor's name (Deploy);
    ``parameters``: (name, value template) pairs; ``component``: Start/Stop/Uninstall (None for every
    component on Uninstall); ``text``: the Command line (a template)."""

    operation: str
    descriptor: str | None = None
    parameters: tuple[tuple[str, str], ...] = ()
    component: str | None = None
    text: str | None = None

    def kwargs(self, node: str, descriptors: Mapping[str, bytes]) -> dict:
        """The operation's keyword arguments for the call to ``node`` (templates substituted)."""
        values = {_NODE: node}
        if self.operation == "Deploy":
            return {"descriptor": descriptors[self.descriptor],
                    "parameters": {name: substitute(value, values) for name, value in self.parameters}}
        if self.operation == "Command":
            return {"command": substitute(self.text, values)}
        return {"component": self.component}

    def describe(self) -> str:
        """One line naming the operation and its arguments as written (templates unsubstituted)."""
        if self.operation == "Deploy":
            shown = ", ".join(f"{name}={value!r}" for name, value in self.parameters)
            return f"Deploy {self.descriptor}" + (f" ({shown})" if shown else "")
        if self.operation == "Command":
            return f"Command {self.text!r}"
        if self.component is None:
            return f"{self.operation} every component"
        return f"{self.operation} {self.component}"


@dataclass(frozen=True)
class PlanStep:
    """One action on node set ``nodes``, in batches of ``batch``, stopping above ``max_failures`` percent."""

    name: str
    nodes: str
    action: Action
    batch: BatchSize = BatchSize()
    max_failures: int = 0
    line: int | None = field(default=None, compare=False)


#: A plan's composition: descriptor's Sequence / Parallel / Barrier around PlanStep leaves.
Composition = Union[Sequence, Parallel, Barrier, PlanStep]


@dataclass(frozen=True)
class Plan:
    name: str
    descriptors: tuple[DescriptorRef, ...]
    node_sets: tuple[NodeSet, ...]
    steps: Composition

    def node_set(self, name: str) -> NodeSet:
        for node_set in self.node_sets:
            if node_set.name == name:
                return node_set
        raise KeyError(name)

    def step_list(self) -> tuple[PlanStep, ...]:
        """Every step, in document order."""
        return tuple(walk_steps(self.steps))


def walk_steps(composition: Composition):
    """Yield the :class:`PlanStep` leaves of ``composition`` in document order."""
    pending = [composition]
    while pending:
        item = pending.pop()
        if isinstance(item, PlanStep):
            yield item
        elif isinstance(item, Sequence):
            pending.extend(reversed(item.steps))
        elif isinstance(item, Parallel):
            pending.extend(reversed(item.branches))


def barrier_holders(parallel: Parallel) -> dict[str, int]:
    """How many branches of ``parallel`` hold each of its barriers (``descriptor.barriers_of``)."""
    holders: dict[str, int] = {}
    for branch in parallel.branches:
        for barrier in barriers_of(branch):
            holders[barrier.name] = holders.get(barrier.name, 0) + 1
    return holders


# ---------------------------------------------------------------------------------------------------
# Parsing

@functools.lru_cache(maxsize=1)
def schema() -> etree.XMLSchema:
    """The compiled plan schema from the installed contracts."""
    from dsmt.server.contracts import schema_path
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    with open(schema_path(SCHEMA_NAME.removesuffix(".xsd")), "rb") as stream:
        return etree.XMLSchema(etree.parse(stream, parser))


def read_plan(path: str) -> Plan:
    """:func:`parse_plan` of the file at ``path``; PlanError ``io`` if it cannot be read."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_PLAN_BYTES + 1)
    except OSError as exc:
        raise PlanError("io", f"cannot read plan {path}: {exc.strerror or exc}") from None
    return parse_plan(data)


def parse_plan(data: bytes) -> Plan:
    """Parse and check a plan (module docstring)."""
    try:
        root = parse_xml(data, max_bytes=MAX_PLAN_BYTES, max_depth=MAX_DEPTH, what="deployment plan")
    except XmlSafetyError as exc:
        raise PlanError("unsafe-xml", str(exc)) from None
    if root.tag != _Q + "plan":
        tag = str(root.tag)
        raise PlanError("schema", f"the root element is <{tag[:120]}>, not <plan> in namespace {NAMESPACE}",
                        root.sourceline)
    checker = schema()
    if not checker.validate(root):
        error = checker.error_log[0]
        raise PlanError("schema", error.message.replace(_Q, ""), error.line)
    return _Reader().read(root)


def _local(element) -> str:
    return etree.QName(element).localname


class _Reader:
    """One pass over a schema-valid tree: builds the model and checks the semantic rules."""

    def __init__(self):
        self.count = 0
        self.step_names: dict[str, int] = {}
        self.descriptors: dict[str, DescriptorRef] = {}
        self.sets: dict[str, NodeSet] = {}

    def read(self, root) -> Plan:
        descriptor_elements = list(root.iterchildren(_Q + "descriptor"))
        if len(descriptor_elements) > MAX_DESCRIPTORS:
            raise PlanError("limit", f"{len(descriptor_elements)} descriptors, over the limit of {MAX_DESCRIPTORS}",
                            descriptor_elements[MAX_DESCRIPTORS].sourceline)
        lines: dict[str, int] = {}
        for element in descriptor_elements:
            name = element.get("name")
            if name in self.descriptors:
                raise PlanError("duplicate", f"<descriptor name={name!r}> is declared twice (first on line "
                                f"{lines[name]})", element.sourceline)
            self.descriptors[name] = DescriptorRef(name, element.get("href"))
            lines[name] = element.sourceline
        self.sets = self._node_sets(list(root.iterchildren(_Q + "nodes")))
        steps = self._composition(next(root.find(_Q + "steps").iterchildren()))
        try:
            check_barriers(steps)
        except DescriptorError as exc:
            raise PlanError("barrier", exc.reason) from None
        return Plan(root.get("name"), tuple(self.descriptors.values()), tuple(self.sets.values()), steps)

    # -- node sets ---------------------------------------------------------------------------------

    def _node_sets(self, elements) -> dict[str, NodeSet]:
        if len(elements) > MAX_NODE_SETS:
            raise PlanError("limit", f"{len(elements)} node sets, over the limit of {MAX_NODE_SETS}",
                            elements[MAX_NODE_SETS].sourceline)
        by_name: dict[str, object] = {}
        for element in elements:
            name = element.get("name")
            if name in by_name:
                raise PlanError("duplicate", f"<nodes name={name!r}> is declared twice (first on line "
                                f"{by_name[name].sourceline})", element.sourceline)
            by_name[name] = element
        for element in elements:
            every = element.get("all", "false") in ("true", "1")
            listed = len(element)
            name = element.get("name")
            if every and listed:
                raise PlanError("node-set", f"<nodes name={name!r}> is all=\"true\" and lists nodes too; it is "
                                "either every node of the slice or the nodes it lists", element.sourceline)
            if not every and not listed:
                raise PlanError("node-set", f"<nodes name={name!r}> lists no node; list <node>s, <include> sets, "
                                "or say all=\"true\"", element.sourceline)
            for include in element.iterchildren(_Q + "include"):
                target = include.get("set")
                if target == name:
                    raise PlanError("cycle", f"<nodes name={name!r}> includes itself", include.sourceline)
                if target not in by_name:
                    raise PlanError("unknown-node-set", f"<nodes name={name!r}> includes set {target!r}, which is "
                                    "not declared", include.sourceline)
        resolved: dict[str, NodeSet] = {}
        for element in elements:
            self._resolve(element, by_name, resolved, [])
        return {element.get("name"): resolved[element.get("name")] for element in elements}

    def _resolve(self, element, by_name, resolved: dict[str, NodeSet], path: list[str]) -> NodeSet:
        name = element.get("name")
        if name in resolved:
            return resolved[name]
        if name in path:
            loop = path[path.index(name):] + [name]
            raise PlanError("cycle", "node sets include each other in a loop: " + " -> ".join(loop),
                            element.sourceline)
        path.append(name)
        every = element.get("all", "false") in ("true", "1")
        nodes: dict[str, None] = {}
        listed: set[str] = set()
        for child in element.iterchildren():
            if _local(child) == "include":
                included = self._resolve(by_name[child.get("set")], by_name, resolved, path)
                every = every or included.all
                nodes.update(dict.fromkeys(included.nodes))
            else:
                try:
                    address = normalize_node_address((child.text or "").strip())
                except SliceSpecError as exc:
                    raise PlanError("node", f"<nodes name={name!r}>: {exc}", child.sourceline) from None
                if address in listed:
                    raise PlanError("duplicate", f"<nodes name={name!r}> lists {address} twice", child.sourceline)
                listed.add(address)
                nodes[address] = None
            if len(nodes) > MAX_SET_NODES:
                raise PlanError("limit", f"<nodes name={name!r}> holds more than {MAX_SET_NODES} nodes",
                                child.sourceline)
        path.pop()
        resolved[name] = NodeSet(name, () if every else tuple(nodes), every)
        return resolved[name]

    # -- steps -------------------------------------------------------------------------------------

    def _composition(self, element) -> Composition:
        self.count += 1
        if self.count > MAX_STEPS:
            raise PlanError("limit", f"more than {MAX_STEPS} step elements", element.sourceline)
        kind = _local(element)
        if kind == "step":
            return self._step(element)
        if kind == "barrier":
            return Barrier(element.get("name"), element.sourceline)
        children = tuple(self._composition(child) for child in element.iterchildren())
        return Sequence(children) if kind == "sequence" else Parallel(children)

    def _step(self, element) -> PlanStep:
        number = len(self.step_names) + 1
        name = element.get("name") or f"step {number}"
        if name in self.step_names:
            raise PlanError("duplicate", f"<step name={name!r}> is named twice (first on line "
                            f"{self.step_names[name]})", element.sourceline)
        self.step_names[name] = element.sourceline
        where = f"<step name={name!r}>"
        set_name = element.get("nodes")
        if set_name not in self.sets:
            raise PlanError("unknown-node-set", f"{where} runs on node set {set_name!r}, which is not declared",
                            element.sourceline)
        batch = element.get("batch")
        size = BatchSize() if batch is None else (
            BatchSize(percent=int(batch[:-1])) if batch.endswith("%") else BatchSize(count=int(batch)))
        action = self._action(next(element.iterchildren()), where)
        return PlanStep(name, set_name, action, size, int(element.get("max-failures", "0%")[:-1]),
                        element.sourceline)

    def _action(self, element, where: str) -> Action:
        operation = _ELEMENT_OPERATION[_local(element)]
        if operation == "Deploy":
            descriptor = element.get("descriptor")
            if descriptor not in self.descriptors:
                raise PlanError("unknown-descriptor", f"{where} deploys descriptor {descriptor!r}, which no "
                                "<descriptor> declares", element.sourceline)
            parameters: dict[str, str] = {}
            for parameter in element.iterchildren(_Q + "parameter"):
                name = parameter.get("name")
                if name in parameters:
                    raise PlanError("duplicate", f"{where}: parameter {name!r} is given twice", parameter.sourceline)
                if len(parameters) == MAX_PARAMETERS:
                    raise PlanError("limit", f"{where}: more than {MAX_PARAMETERS} parameters", parameter.sourceline)
                parameters[name] = self._template(parameter.get("value"), parameter, f"{where} parameter {name!r}")
            return Action("Deploy", descriptor=descriptor, parameters=tuple(parameters.items()))
        if operation == "Command":
            return Action("Command", text=self._template(element.text, element, f"{where} <command>"))
        return Action(operation, component=element.get("component"))

    @staticmethod
    def _template(text: str, element, what: str) -> str:
        try:
            names = template_names(text)
        except ValueError as exc:
            raise PlanError("template", f"{what}: {exc}", element.sourceline) from None
        for name in names:
            if name != _NODE:
                raise PlanError("template", f"{what} uses ${{{name}}}; the only name a plan knows is ${{node}} (the "
                                "node the call goes to)", element.sourceline)
        return text


# ---------------------------------------------------------------------------------------------------
# Descriptors and binding

def read_descriptors(plan: Plan, base_dir: str) -> dict[str, bytes]:
    """The bytes of every descriptor ``plan`` declares, ``href`` relative to ``base_dir`` (the plan's
    directory; an absolute href is used as is), checked with :func:`check_descriptors`."""
    found: dict[str, bytes] = {}
    for ref in plan.descriptors:
        path = os.path.join(base_dir, ref.href)
        try:
            with open(path, "rb") as stream:
                found[ref.name] = stream.read(MAX_DESCRIPTOR_BYTES + 1)
        except OSError as exc:
            raise PlanError("io", f"cannot read descriptor {ref.name!r} ({path}): {exc.strerror or exc}") from None
    check_descriptors(plan, found)
    return found


def check_descriptors(plan: Plan, descriptors: Mapping[str, bytes]) -> None:
    """Raise PlanError unless every declared descriptor has valid bytes in ``descriptors`` and every deploy's
    parameters fit its descriptor (none undeclared, every required one given; ``${node}`` as a sample)."""
    parsed = {}
    for ref in plan.descriptors:
        if ref.name not in descriptors:
            raise PlanError("unknown-descriptor", f"no content for descriptor {ref.name!r} ({ref.href})")
        try:
            parsed[ref.name] = parse_descriptor(bytes(descriptors[ref.name]))
        except DescriptorError as exc:
            raise PlanError("descriptor", f"descriptor {ref.name!r} ({ref.href}) is invalid: {exc}") from None
    for step in plan.step_list():
        action = step.action
        if action.operation != "Deploy":
            continue
        sample = {name: substitute(value, {_NODE: "node.example"}) for name, value in action.parameters}
        try:
            resolve_parameters(parsed[action.descriptor], sample)
        except DescriptorError as exc:
            raise PlanError("parameter", f"<step name={step.name!r}>: {exc.reason}", step.line) from None


def bind(plan: Plan, slice_nodes: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Each step's nodes (by step name) on a slice of ``slice_nodes`` (normalised addresses, in the order the
    ``all`` sets take).  PlanError ``unknown-node`` when a listed node is not in the slice."""
    members = tuple(dict.fromkeys(slice_nodes))
    known = set(members)
    bound: dict[str, tuple[str, ...]] = {}
    for step in plan.step_list():
        node_set = plan.node_set(step.nodes)
        if node_set.all:
            bound[step.name] = members
            continue
        for node in node_set.nodes:
            if node not in known:
                raise PlanError("unknown-node", f"node set {node_set.name!r} (step {step.name!r}) names {node}, "
                                "which is not a node of the slice", step.line)
        bound[step.name] = node_set.nodes
    return bound


# ---------------------------------------------------------------------------------------------------
# Rolling one step (pure)

@dataclass(frozen=True)
class NodeResult:
    """A node's outcome in one step: ``status`` :data:`OK`, :data:`FAILED` (``code``, ``reason``) or
    :data:`SKIPPED` (``reason`` says why); ``value`` is the engine's answer when there was one."""

    status: str
    code: str | None = None
    reason: str | None = None
    value: object = field(default=None, compare=False)


class Rollout:
    """The batching and threshold logic of one step on its nodes; no I/O, no clock.

    ``batches`` is fixed at creation.  :meth:`next_batch` gives the next batch (and marks it started)
    or None once every batch ran, the threshold was exceeded, or :meth:`skip_rest` was called;
    :meth:`record` takes each node's result.  :attr:`exceeded` is checked between batches.
    """

    def __init__(self, step: PlanStep, nodes: Iterable[str]):
        self.step = step
        self.nodes = tuple(nodes)
        size = step.batch.of(len(self.nodes))
        self.batches = tuple(self.nodes[i:i + size] for i in range(0, len(self.nodes), size)) if size else ()
        self.results: dict[str, NodeResult] = {}
        self.started = 0
        self.closed = False

    @property
    def failed(self) -> int:
        return sum(1 for result in self.results.values() if result.status == FAILED)

    @property
    def exceeded(self) -> bool:
        """More than ``max_failures`` percent of the step's nodes failed."""
        return self.failed * 100 > self.step.max_failures * len(self.nodes)

    @property
    def done(self) -> bool:
        return self.closed or self.exceeded or self.started == len(self.batches)

    def next_batch(self) -> tuple[str, ...] | None:
        """The next batch to run, or None (see the class docstring); the batches not given are skipped."""
        if self.done:
            self._skip(f"the step stopped: {self._why()}" if self.exceeded else None)
            return None
        batch = self.batches[self.started]
        self.started += 1
        return batch

    def record(self, node: str, result: NodeResult) -> None:
        if node not in self.nodes:
            raise ValueError(f"{node} is not a node of step {self.step.name!r}")
        self.results[node] = result

    def skip_rest(self, reason: str) -> None:
        """No further batch of this step runs: every node without a result is skipped with ``reason``."""
        self.closed = True
        self._skip(reason)

    def _skip(self, reason: str | None) -> None:
        for node in self.nodes:
            if node not in self.results:
                self.results[node] = NodeResult(SKIPPED, reason=reason or "the step stopped")

    def _why(self) -> str:
        return (f"{self.failed} of {len(self.nodes)} node(s) failed, more than max-failures "
                f"{self.step.max_failures}%")

    def ordered_results(self) -> dict[str, NodeResult]:
        """Results in the step's node order (nodes without a result yet are left out)."""
        return {node: self.results[node] for node in self.nodes if node in self.results}


# ---------------------------------------------------------------------------------------------------
# Dry run

def dry_run(plan: Plan, nodes: Iterable[str]) -> list[str]:
    """The calls a run of ``plan`` on a slice of ``nodes`` would make, batch by batch, in order, as lines.

    A step prints its action, node set, size, batch and threshold, then one line per batch with its
    nodes (one call each, made together).  Branches of a ``parallel`` run together: each is printed in
    turn, indented under ``branch N``.  Assumes every call succeeds (no step stops).  PlanError as
    :func:`bind`.
    """
    bound = bind(plan, nodes)
    members = tuple(dict.fromkeys(nodes))
    lines = [f"plan {plan.name}: {len(plan.step_list())} step(s) on a slice of {len(members)} node(s)"]

    def emit(item: Composition, depth: int) -> None:
        pad = "  " * depth
        if isinstance(item, PlanStep):
            rollout = Rollout(item, bound[item.name])
            count = len(rollout.nodes)
            lines.append(f"{pad}step {item.name}: {item.action.describe()} on {item.nodes} ({count} node(s)), "
                         f"batch {item.batch}, max-failures {item.max_failures}%")
            for index, batch in enumerate(rollout.batches, 1):
                lines.append(f"{pad}  batch {index}/{len(rollout.batches)}: {', '.join(batch)}")
            if not rollout.batches:
                lines.append(f"{pad}  no node: no call")
        elif isinstance(item, Barrier):
            lines.append(f"{pad}barrier {item.name}")
        elif isinstance(item, Sequence):
            for child in item.steps:
                emit(child, depth)
        else:
            lines.append(f"{pad}parallel: {len(item.branches)} branches together")
            for index, branch in enumerate(item.branches, 1):
                lines.append(f"{pad}  branch {index}")
                emit(branch, depth + 2)
            lines.append(f"{pad}end parallel")

    emit(plan.steps, 0)
    return lines

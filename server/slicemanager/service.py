"""The slice manager's SOAP face: ``SliceManagerService`` (``wsdl/slicemanager.wsdl``, namespace :data:`TNS`).

The ``svm`` commands as operations, each answered by the
:class:`~dsmt.server.slicemanager.core.SliceManager` the daemon runs with its
own slice directory (``--slices-dir``) and its own calls to the agent and the
node managers:

================  ===============================  ==========================================
operation         in                               what ``svm`` command
================  ===============================  ==========================================
``GetAds``        —                                ``getads`` (``ad*``)
``CreateSlice``   ``spec`` (the slice XML, text)   ``createslice``
``DeleteSlice``   ``slice``                        ``deleteslice``
``AddKey``        ``slice``, ``key`` (one line)    ``addkey``
``DelKey``        ``slice``, ``key``               ``delkey``
``NukeKeys``      ``slice``                        ``nukekeys``
``RenewSlice``    ``slice``                        ``renewslice``
``NodeList``      ``slice``                        ``nodelist`` (``value*``: the nodes)
``Expirations``   ``slice``                        ``expirations`` (``expiresAt`` per node)
``NewLeases``     ``slice``, ``node*``             ``newleases`` on those nodes' tickets (none: all)
``NewVms``        ``slice``, ``node*``             ``newvms`` on those nodes' leases (none: all)
``Clean``         —                                ``clean`` (``value*``: the slices removed)
================  ===============================  ==========================================

Every operation returns a :class:`SliceReport`: ``ok`` (every node succeeded),
``summary`` (``svm``'s summary line), and one ``result`` per node — ``node``,
``ok``, ``line`` (``Success on X`` / ``Error on X: reason``, or the expiration
line), ``code`` and ``reason`` when it failed, ``state``/``expiresAt``/``keys``
when the node's answer carries them.  A node's failure is in its result, not a
fault: the report is what ``svm`` prints.  ``NewLeases``/``NewVms`` take node
names, never file paths: the service reads only its own slice directory.

Faults (``Client.<name>``, the reason is the sentence ``svm`` prints after
``svm: error:``): the command failed as a whole, nothing was done on the nodes
— :data:`FAULT_NAMES` maps the core's codes: ``InvalidSpec``, ``Shortage``,
``AgentUnreachable`` (unreachable or silent agent), ``AgentError``,
``SliceExists``, ``NoSlice``, ``InvalidSlice`` (not a slice name),
``NoNodes``, ``InvalidKey``, ``InvalidNode``, ``NoTicket``/``NoLease``
(NewLeases/NewVms on a node without one), ``StorageError``, ``NotOwner``.

**Owner.** When a request is signed (WS-Security, verified by the daemon's
policy), the certificate subject that created a slice owns it
(:class:`SliceOwners`, ``<slices-dir>/owners/<slice>``): every later operation
on the slice must be signed by the same subject, else ``Client.NotOwner`` —
unsigned requests included.  A slice created by an unsigned request (a
deployment with ``--allow-unsigned``) has no owner and anyone who reaches the
service may act on it.  ``CreateSlice`` of a live slice owned by another
subject is ``NotOwner``; a dead leftover is taken over.  The owner record goes
with the slice (``DeleteSlice`` that removed it, ``Clean``).  ``GetAds`` and
``Clean`` (which removes only slices with nothing valid left) are anyone's.
The node managers see only the slice manager's own certificate (it signs its
outgoing calls): their owner check guards the slice manager's leases, this one
guards the users' slices.

**One command per slice at a time** (:class:`SliceLocks`): the core is not
safe against two commands on one slice; requests on one slice queue in
arrival order, requests on different slices run concurrently.  The container
manager's exclusions take the same lock.

Sizes: the SOAP core's envelope limit bounds every request before a method
runs, and the schema bounds the node lists (``MAX_NUMNODES``); then each value
meets its own rule with a precise fault: a spec over ``MAX_SPEC_BYTES`` is
``InvalidSpec`` (``parse_slice_spec``), a key over ``MAX_KEY_BYTES``
``InvalidKey``, a slice or node name ``check_slice_name`` /
``normalize_node_address`` refuse ``InvalidSlice`` / ``InvalidNode``.  (Text
lengths are not schema facets: spyne writes restricted simple types in an
order that changes from run to run, and the committed WSDL must not.)
"""
from __future__ import annotations

import os
from typing import Any, Callable

from spyne import Boolean, ComplexModel, Integer, ServiceBase, Unicode, rpc
from twisted.internet import defer

from dsmt.server.agent.core import MAX_NODES
from dsmt.server.faults import client_fault, subcode
from dsmt.server.hosting import caller_subject
from dsmt.server.refusal import Refusal
from dsmt.server.slicemanager.calls import AgentCallError, LeaseInfo, NodeCallError, SliverInfo
from dsmt.server.slicemanager.core import Report, SliceManager, expiration_line, result_line
from dsmt.server.slicemanager.slicedir import LEASES, MAX_KEY_BYTES, TICKETS, SliceDirectoryError, write_atomic
from dsmt.server.slicemanager.spec import (MAX_NUMNODES, SliceSpecError, check_slice_name, normalize_node_address,
                                           parse_slice_spec)

__all__ = ["TNS", "NAME", "PSEPR_SERVICE", "HTTP_PATH", "FAULT_NAMES", "MAX_SUBJECT_BYTES", "NodeResult", "NodeAd", "SliceReport", "SliceOwners", "SliceLocks",
           "report_of", "slicemanager_service"]

TNS = "http://dsmt.org/ns/slicemanager"
#: WSDL name (binding and port names: ``slicemanager``, ``slicemanager_psepr``).
NAME = "slicemanager"
#: PsEPR service name: channel ``/org/dsmt/ns/soap/slicemanager/``.
PSEPR_SERVICE = "slicemanager"
#: URL path of the HTTP endpoint.
HTTP_PATH = "slicemanager"
#: Largest owner record read back: a certificate subject (RFC 4514) is a line, not a document.
MAX_SUBJECT_BYTES = 4096

#: The core's command-level codes → fault names (``Client.<name>``).  Agent codes not listed are
#: ``AgentError``; other codes not listed become their own CamelCase name (``faults.subcode``).
FAULT_NAMES = {
    "invalid-spec": "InvalidSpec", "InvalidSpec": "InvalidSpec", "Shortage": "Shortage",
    "unreachable": "AgentUnreachable", "timeout": "AgentUnreachable", "error": "AgentError",
    "exists": "SliceExists", "no-slice": "NoSlice", "bad-name": "InvalidSlice", "no-nodes": "NoNodes",
    "invalid-key": "InvalidKey", "bad-file": "BadFile", "io": "StorageError",
}

_Required = dict(min_occurs=1, nillable=False)
_Optional = dict(min_occurs=0, nillable=False)


class NodeResult(ComplexModel):
    """One node's outcome of a command."""

    __namespace__ = TNS
    _type_info = [
        ("node", Unicode(**_Required)),
        ("ok", Boolean(**_Required)),
        ("line", Unicode(**_Required)),
        ("code", Unicode(**_Optional)),
        ("reason", Unicode(**_Optional)),
        ("state", Unicode(**_Optional)),
        ("expiresAt", Integer(**_Optional)),
        ("keys", Integer(**_Optional)),
    ]


class NodeAd(ComplexModel):
    """One node the agent advertises (GetAds)."""

    __namespace__ = TNS
    _type_info = [("node", Unicode(**_Required)), ("slots", Integer(**_Required)), ("free", Integer(**_Required)),
                  ("endpoint", Unicode(**_Optional))]


class SliceReport(ComplexModel):
    """What a command did (see the module docstring)."""

    __namespace__ = TNS
    _type_info = [
        ("command", Unicode(**_Required)),
        ("slice", Unicode(**_Optional)),
        ("ok", Boolean(**_Required)),
        ("summary", Unicode(**_Required)),
        ("result", NodeResult.customize(min_occurs=0, max_occurs=MAX_NUMNODES, nillable=False)),
        ("value", Unicode.customize(min_occurs=0, max_occurs=MAX_NODES, nillable=False)),
        ("ad", NodeAd.customize(min_occurs=0, max_occurs=MAX_NODES, nillable=False)),
    ]


def _result(report: Report, node: str, outcome: Any) -> NodeResult:
    if isinstance(outcome, NodeCallError):
        return NodeResult(node=node, ok=False, line=result_line(node, outcome), code=outcome.code,
                          reason=outcome.reason)
    result = NodeResult(node=node, ok=True, line=result_line(node, outcome))
    if isinstance(outcome, (LeaseInfo, SliverInfo)):
        result.expiresAt = outcome.expires_at
    if isinstance(outcome, SliverInfo):
        result.state, result.keys = outcome.state, outcome.keys
    if isinstance(outcome, int) and not isinstance(outcome, bool):
        result.keys = outcome
    if report.command == "expirations" and isinstance(outcome, LeaseInfo):
        result.line = expiration_line(report.slice, node, outcome.expires_at)
    return result


def report_of(report: Report) -> SliceReport:
    """The SOAP value of a core :class:`Report` that ran (``report.error`` is None)."""
    answer = SliceReport(command=report.command, slice=report.slice, ok=report.ok, summary=report.summary(),
                         result=[_result(report, node, outcome) for node, outcome in report.outcomes.items()])
    if report.command == "getads":
        answer.ad = [NodeAd(node=ad.node, slots=ad.slots, free=ad.free, endpoint=ad.endpoint or None)
                     for ad in report.values]
    else:
        answer.value = [str(value) for value in report.values]
    return answer


def _fault(refusal: Refusal):
    name = FAULT_NAMES.get(refusal.code)
    if name is None:
        name = "AgentError" if isinstance(refusal, AgentCallError) else subcode(refusal.code)
    return client_fault(name, refusal.reason)


class SliceOwners:
    """Who owns which slice: ``<home>/owners/<slice>`` holds the owner's certificate subject (UTF-8).

    Written atomically; a missing file means no owner.  Names are checked (``check_slice_name``), so a
    hostile name never becomes a path.
    """

    def __init__(self, home: str):
        self.path = os.path.join(os.path.abspath(home), "owners")

    def _file(self, slice_name: str) -> str:
        check_slice_name(slice_name)
        return os.path.join(self.path, slice_name)

    def owner(self, slice_name: str) -> str | None:
        try:
            with open(self._file(slice_name), "rb") as handle:
                data = handle.read(MAX_SUBJECT_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SliceDirectoryError("io", f"cannot read the owner of slice {slice_name}: {exc.strerror}") from None
        if len(data) > MAX_SUBJECT_BYTES:
            raise SliceDirectoryError("io", f"the owner record of slice {slice_name} is over {MAX_SUBJECT_BYTES} "
                                      "bytes")
        return data.decode("utf-8", "replace")

    def claim(self, slice_name: str, subject: str | None) -> None:
        """Record ``subject`` as the owner (None: the slice has no owner)."""
        if subject is None:
            self.forget(slice_name)
            return
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        write_atomic(self._file(slice_name), subject.encode("utf-8"), 0o600)

    def forget(self, slice_name: str) -> None:
        try:
            os.unlink(self._file(slice_name))
        except FileNotFoundError:
            pass


class SliceLocks:
    """One ``DeferredLock`` per slice name, made on demand and dropped when idle."""

    def __init__(self):
        self._locks: dict[str, defer.DeferredLock] = {}

    def run(self, slice_name: str, function: Callable, *args) -> defer.Deferred:
        """``function(*args)`` (a value, Deferred or coroutine) once no other command holds ``slice_name``."""
        lock = self._locks.setdefault(slice_name, defer.DeferredLock())

        def call():
            return defer.maybeDeferred(function, *args).addCallback(
                lambda value: defer.ensureDeferred(value) if hasattr(value, "__await__") else value)

        def release(result):
            if not lock.locked and not lock.waiting:
                self._locks.pop(slice_name, None)
            return result
        return lock.run(call).addBoth(release)

    def busy(self) -> list[str]:
        return sorted(name for name, lock in self._locks.items() if lock.locked)


def slicemanager_service(manager: SliceManager | None, owners: SliceOwners | None = None, *,
                         locks: SliceLocks | None = None,
                         on_report: Callable[[Report], None] | None = None) -> type:
    """The spyne service class ``SliceManagerService`` answering for ``manager`` (None: for the WSDL only).

    ``owners``: the owner records (None: no owner check at all); ``on_report(report)``: called with
    every report that ran (the daemon's container bookkeeping)."""
    locks = locks or SliceLocks()

    def check_owner(ctx, slice_name: str) -> None:
        if owners is None:
            return
        owner = owners.owner(slice_name)
        subject = caller_subject(ctx)
        if owner is not None and subject != owner:
            signer = "unsigned" if subject is None else "signed by another certificate subject"
            raise client_fault("NotOwner", f"slice {slice_name} belongs to the certificate subject that created "
                                           f"it; this request is {signer}")

    def answer(report: Report) -> SliceReport:
        if on_report is not None:
            on_report(report)
        if report.error is not None:
            raise _fault(report.error)
        if owners is not None and report.slice and not manager.directory.slice(report.slice).exists():
            owners.forget(report.slice)
        return report_of(report)

    def slice_files(slice_name: str):
        try:
            return manager.directory.slice(slice_name)
        except SliceDirectoryError as exc:
            raise _fault(exc) from None

    def checked_key(key: str) -> str:
        if len(key) > MAX_KEY_BYTES:
            raise client_fault("InvalidKey", f"the key is over {MAX_KEY_BYTES} characters; an OpenSSH public key "
                                             "line is far shorter")
        return key

    def on_slice(ctx, slice_name: str, command: Callable[[], defer.Deferred]) -> defer.Deferred:
        slice_files(slice_name)     # a name that is not one: InvalidSlice before any lock is made

        def run():
            check_owner(ctx, slice_name)
            return command().addCallback(answer)
        return locks.run(slice_name, run)

    def chosen(files, kind: str, nodes) -> list[str]:
        """The files of ``kind`` for ``nodes`` (none given: all of them); faults for a node without one."""
        if not files.exists():
            raise client_fault("NoSlice", f"there is no slice {files.name}")
        present = files.nodes(kind)
        wanted = []
        for text in nodes or ():
            try:
                node = normalize_node_address(text)
            except SliceSpecError as exc:
                raise client_fault("InvalidNode", str(exc)) from None
            if node not in present:
                what = "ticket" if kind == TICKETS else "lease"
                raise client_fault("NoTicket" if kind == TICKETS else "NoLease",
                                   f"slice {files.name} holds no {what} for {node}")
            if node not in wanted:
                wanted.append(node)
        wanted = wanted or present
        if not wanted:
            raise client_fault("NoNodes", f"slice {files.name} holds no "
                                          f"{'ticket' if kind == TICKETS else 'lease'} to use")
        return [files.node_path(kind, node) for node in wanted]

    _Slice = Unicode(**_Required)
    _Nodes = Unicode(min_occurs=0, max_occurs=MAX_NUMNODES, nillable=False)

    class SliceManagerService(ServiceBase):
        __service_name__ = "SliceManagerService"

        @rpc(_returns=SliceReport)
        def GetAds(ctx):
            return manager.getads().addCallback(answer)

        @rpc(Unicode(**_Required), _returns=SliceReport)
        def CreateSlice(ctx, spec):
            data = spec.encode("utf-8", "surrogatepass")
            try:
                name = parse_slice_spec(data).name
            except SliceSpecError as exc:
                raise client_fault("InvalidSpec", str(exc)) from None
            subject = caller_subject(ctx)

            def run():
                if owners is not None and owners.owner(name) not in (None, subject) and \
                        manager.directory.slice(name).alive(manager.clock()):
                    check_owner(ctx, name)

                def created(report: Report) -> Report:
                    if owners is not None and report.error is None and manager.directory.slice(name).exists():
                        owners.claim(name, subject)
                    return report
                return manager.createslice(data).addCallback(created).addCallback(answer)
            return locks.run(name, run)

        @rpc(_Slice, _returns=SliceReport, _in_variable_names={"slice_name": "slice"})
        def DeleteSlice(ctx, slice_name):
            return on_slice(ctx, slice_name, lambda: manager.deleteslice(slice_name))

        @rpc(_Slice, Unicode(**_Required), _returns=SliceReport, _in_variable_names={"slice_name": "slice"})
        def AddKey(ctx, slice_name, key):
            return on_slice(ctx, slice_name, lambda: manager.addkey(slice_name, checked_key(key)))

        @rpc(_Slice, Unicode(**_Required), _returns=SliceReport, _in_variable_names={"slice_name": "slice"})
        def DelKey(ctx, slice_name, key):
            return on_slice(ctx, slice_name, lambda: manager.delkey(slice_name, checked_key(key)))

        @rpc(_Slice, _returns=SliceReport, _in_variable_names={"slice_name": "slice"})
        def NukeKeys(ctx, slice_name):
            return on_slice(ctx, slice_name, lambda: manager.nukekeys(slice_name))

        @rpc(_Slice, _returns=SliceReport, _in_variable_names={"slice_name": "slice"})
        def RenewSlice(ctx, slice_name):
            return on_slice(ctx, slice_name, lambda: manager.renewslice(slice_name))

        @rpc(_Slice, _returns=SliceReport, _in_variable_names={"slice_name": "slice"})
        def NodeList(ctx, slice_name):
            return on_slice(ctx, slice_name, lambda: manager.nodelist(slice_name))

        @rpc(_Slice, _returns=SliceReport, _in_variable_names={"slice_name": "slice"})
        def Expirations(ctx, slice_name):
            return on_slice(ctx, slice_name, lambda: manager.expirations(slice_name))

        @rpc(_Slice, _Nodes, _returns=SliceReport, _in_variable_names={"slice_name": "slice"})
        def NewLeases(ctx, slice_name, node):
            files = slice_files(slice_name)
            return on_slice(ctx, slice_name, lambda: manager.newleases(slice_name, chosen(files, TICKETS, node)))

        @rpc(_Slice, _Nodes, _returns=SliceReport, _in_variable_names={"slice_name": "slice"})
        def NewVms(ctx, slice_name, node):
            files = slice_files(slice_name)
            return on_slice(ctx, slice_name, lambda: manager.newvms(slice_name, chosen(files, LEASES, node)))

        @rpc(_returns=SliceReport)
        def Clean(ctx):
            def cleaned(report: Report) -> Report:
                if owners is not None:
                    for name in report.values:
                        owners.forget(name)
                return report
            return manager.clean().addCallback(cleaned).addCallback(answer)

    return SliceManagerService

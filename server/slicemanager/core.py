"""The slice manager: every ``svm`` command, over :class:`AgentCalls`, :class:`NodeCalls` and a slice directory.

One method per command of the dslice HOWTO; each returns ``Deferred[Report]``
and never fails for a reason a user can cause (bad files, refusals,
unreachable services): those are in the :class:`Report`.

* ``newtickets(spec)``: the spec is parsed locally
  (:func:`~dsmt.server.slicemanager.spec.parse_slice_spec`), the agent asked
  for its ads (node endpoints) and then for tickets; only when both answered
  and every ticket is for this slice on a distinct node are ``spec.xml``,
  ``nodes`` and ``tickets/<node>`` written.  An agent failure (``Shortage``,
  ``InvalidSpec``, ``unreachable``…) is one error and nothing changes
  locally.  A slice that still holds a valid ticket, lease or vm is refused
  (``exists``): ``deleteslice`` it, or resume with ``newleases``/``newvms``;
  an expired leftover is cleaned first.
* ``newleases(slice, ticket_files)``: ``Redeem(ticket)`` on each ticket's
  node (the node comes from the ticket); a node that answers gets
  ``leases/<node>`` and loses ``tickets/<node>``.
* ``newvms(slice, lease_files)``: ``CreateSliver(slice, leaseId,
  slicePublicKey, slicePrivateKey)`` with the per-slice key pair (generated
  once, kept in ``slicekeypair/``); a node that answers moves from
  ``leases/`` to ``vms/``.
* ``createslice(spec)`` = the three; a node failing at step 2 is not tried at
  step 3; one outcome (and one ``on_result`` call) per node: its first
  failing step's error, or success after step 3.
* ``deleteslice(slice)``: ``DeleteSliver`` on every node with a vm or lease
  (``NoSliver``/``NoLease`` count as success: already gone); each node's
  files go on success; the tickets of the nodes deleted and the unredeemed
  ones are released at the agent (their slots are free again); the
  whole slice directory goes when everything succeeded.
* ``addkey``/``delkey``/``nukekeys``: on every node with a vm; the key is
  checked locally first (``parse_public_key``); ``sshkeys/`` records the keys
  added (kept after a partial ``delkey``, so a retry knows what is there).
* ``renewslice``: ``RenewLease`` on every node with a vm or lease; the files
  are rewritten with the new expiry.
* ``nodelist``/``expirations``: read ``vms/`` only, no network.
* ``clean()``: the HOWTO's clean, at ``clock()``.

Progress (``on_progress(slice, node, step, outcome)``, for whoever follows nodes through their sliver's
life — the container manager of reference 003): called as each node reaches a step, after its files
were written, whatever the command.  Steps (:data:`PROGRESS_STEPS`): ``ticket`` (outcome: the Ticket,
for every node of a newtickets/createslice once all tickets are saved), ``leased`` (Redeem's LeaseInfo
or NodeCallError), ``creating`` (outcome None: CreateSliver is about to be sent to the node),
``created`` (CreateSliver's SliverInfo or NodeCallError), ``deleted`` (deleteslice's DeleteSliver:
SliverInfo — ``terminated`` when already gone — or NodeCallError).  A node without an endpoint gets
its step's NodeCallError (``no-endpoint``) without a ``creating``.

Endpoints come from ``slices/<s>/nodes``; nodes missing there are looked up
once per command in the agent's ads, and a node still unknown fails with
``no-endpoint``.  Outcomes are processed (files written) as they arrive, then
passed to ``on_result``, so a killed ``svm`` has saved every answer it printed.

Not safe against two slice managers working on one slice at once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from twisted.internet import defer

from dsmt.server.agent.tickets import MAX_TICKET_BYTES, TicketError, parse_ticket
from dsmt.server.refusal import Refusal
from dsmt.server.utctime import utc_text
from dsmt.server.slicemanager.calls import ERROR, UNREACHABLE, AgentCallError, AgentCalls, LeaseInfo, NodeCallError, NodeCalls, \
    NodeRequest, SliverInfo
from dsmt.server.slicemanager.slicedir import LEASES, MAX_LEASE_BYTES, TICKETS, VMS, \
    SliceDirectory, SliceDirectoryError, SliceFiles, parse_lease_document, read_user_file
from dsmt.server.slicemanager.spec import SliceSpecError, node_sort_key, parse_slice_spec

__all__ = ["SliceManager", "Report", "SliceManagerError", "result_line", "expiration_line", "DEFAULT_PARALLELISM",
           "ALREADY_GONE", "PROGRESS_STEPS", "OnProgress"]

#: Node calls outstanding at once by default: the dslice HOWTO's ``svm -p`` default of 16 threads.
DEFAULT_PARALLELISM = 16
#: Fault codes that mean DeleteSliver has nothing left to delete on that node: success for deleteslice.
ALREADY_GONE = frozenset({"NoSliver", "NoLease"})
#: Node code when the slice manager knows no endpoint for a node.
NO_ENDPOINT = "no-endpoint"
#: The steps ``on_progress`` reports, in the order a node goes through them (see the module docstring).
PROGRESS_STEPS = ("ticket", "leased", "creating", "created", "deleted")
#: ``on_progress(slice, node, step, outcome)``.
OnProgress = Callable[[str, str, str, Any], None]


class SliceManagerError(Refusal):
    """A command failed before or instead of reaching the nodes (``invalid-spec``, ``bad-file``, ``exists``,
    ``no-nodes``, ``invalid-key``, or a slice directory code)."""


@dataclass
class Report:
    """What a command did.

    ``outcomes``: node -> the node's value or its :class:`NodeCallError`, in
    :func:`node_sort_key` order.  ``error``: the command's own failure (agent
    or local), None if it ran.  ``values``: what a listing command found
    (``getads``: NodeAds; ``nodelist``: nodes; ``clean``: slices removed).
    """

    command: str
    slice: str | None = None
    outcomes: dict[str, Any] = field(default_factory=dict)
    error: Refusal | None = None
    values: list = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [node for node, outcome in self.outcomes.items() if isinstance(outcome, NodeCallError)]

    @property
    def succeeded(self) -> list[str]:
        return [node for node, outcome in self.outcomes.items() if not isinstance(outcome, NodeCallError)]

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed

    def summary(self) -> str:
        what = self.command + (f" {self.slice}" if self.slice else "")
        if self.error is not None:
            return f"{what}: failed: {self.error.reason}"
        if self.command == "expirations":
            return f"{what}: {len(self.succeeded)} sliver{'s' if len(self.succeeded) != 1 else ''}, " \
                   f"{len(self.failed)} unreadable"
        if self.outcomes:
            return f"{what}: {len(self.succeeded)} succeeded, {len(self.failed)} failed"
        return f"{what}: {len(self.values)} found" if self.command != "clean" else \
            f"{what}: {len(self.values)} slice{'s' if len(self.values) != 1 else ''} removed"


def result_line(node: str, outcome: Any) -> str:
    """``Success on X`` or ``Error on X: <reason>`` (the HOWTO's per-node lines)."""
    if isinstance(outcome, NodeCallError):
        return f"Error on {node}: {outcome.reason}"
    return f"Success on {node}"


def expiration_line(slice_name: str, node: str, expires_at: int) -> str:
    """``Sliver for slice S expires YYYY-MM-DD HH:MM:SS UTC on NODE`` (the HOWTO's expirations line)."""
    return f"Sliver for slice {slice_name} expires {utc_text(expires_at)} on {node}"


def _sorted(outcomes: dict) -> dict:
    return {node: outcomes[node] for node in sorted(outcomes, key=node_sort_key)}


def _default_new_keypair(slice_name: str):
    from dsmt.server.nodemanager.sshkeys import generate_slice_keypair
    return generate_slice_keypair(slice_name)


def _default_parse_key(line: str):
    from dsmt.server.nodemanager.sshkeys import parse_public_key
    return parse_public_key(line)


class SliceManager:
    """The ``svm`` commands.  ``clock``: POSIX seconds (``clean``, ``exists`` checks).

    ``parallelism``/``timeout``: passed to every :meth:`NodeCalls.run`.
    ``on_result(node, outcome)``: called once per node as its final outcome is
    known (after its files were written).  ``new_keypair(slice)`` and
    ``parse_key(line)``: the ``sshkeys`` functions by default.  ``on_progress(slice, node, step, outcome)``:
    see the module docstring (exceptions it raises propagate: it must not raise).
    """

    def __init__(self, agent: AgentCalls, nodes: NodeCalls, directory: SliceDirectory, *,
                 clock: Callable[[], float] = time.time, parallelism: int = DEFAULT_PARALLELISM,
                 timeout: float | None = None, on_result: Callable[[str, Any], None] | None = None,
                 new_keypair: Callable[[str], Any] | None = None, parse_key: Callable[[str], Any] | None = None,
                 on_progress: OnProgress | None = None):
        if type(parallelism) is not int or parallelism < 1:
            raise ValueError(f"parallelism must be a whole number >= 1, not {parallelism!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive seconds or None, not {timeout!r}")
        self.agent, self.nodes, self.directory = agent, nodes, directory
        self.clock, self.parallelism, self.timeout = clock, parallelism, timeout
        self.on_result = on_result
        self.on_progress = on_progress
        self.new_keypair = new_keypair or _default_new_keypair
        self.parse_key = parse_key or _default_parse_key

    # ------------------------------------------------------------------------------------ plumbing

    def _emit(self, node: str, outcome: Any) -> None:
        if self.on_result is not None:
            self.on_result(node, outcome)

    def _progress(self, slice_name: str, node: str, step: str | None, outcome: Any) -> None:
        if self.on_progress is not None and step is not None:
            self.on_progress(slice_name, node, step, outcome)

    def _command(self, command: str, slice_name: str | None, body) -> defer.Deferred:
        """Run coroutine ``body(report)``; user-caused failures become ``report.error``."""
        report = Report(command, slice_name)

        async def run():
            try:
                await body(report)
            except (AgentCallError, SliceManagerError, SliceDirectoryError) as exc:
                report.error = exc
            report.outcomes = _sorted(report.outcomes)
            return report
        return defer.Deferred.fromCoroutine(run())

    async def _endpoints(self, files: SliceFiles, nodes: Iterable[str]) -> tuple[dict[str, str], dict]:
        """``(node -> endpoint, node -> NodeCallError)``: from ``nodes``, else from the agent's ads (recorded)."""
        known = files.endpoints()
        wanted = list(nodes)
        missing = [node for node in wanted if node not in known]
        why = "the agent does not advertise it"
        if missing:
            try:
                ads = await self.agent.getads()
            except AgentCallError as exc:
                ads, why = [], f"the agent could not be asked ({exc.reason})"
            learned = {ad.node: ad.endpoint for ad in ads if ad.node in missing and ad.endpoint}
            if learned:
                files.add_endpoints(learned)
                known.update(learned)
        found = {node: known[node] for node in wanted if node in known}
        errors = {node: NodeCallError(NO_ENDPOINT, f"no endpoint known for {node}: {why}")
                  for node in wanted if node not in known}
        return found, errors

    async def _run(self, operation: str, files: SliceFiles, kwargs_of: dict[str, dict], process,
                   emit: Callable[[str, Any], None] | None, step: str | None = None,
                   started: str | None = None) -> dict[str, Any]:
        """Call ``operation`` on every node of ``kwargs_of``; ``process(node, raw)`` turns each raw outcome
        into the final one (writing files) as it arrives; ``emit`` sees every final outcome, and
        ``on_progress`` sees it as ``step`` (and, before the calls, ``started`` for each node called)."""
        endpoints, outcomes = await self._endpoints(files, kwargs_of)
        for node, outcome in outcomes.items():
            self._progress(files.name, node, step, outcome)
            if emit is not None:
                emit(node, outcome)

        unreachable: dict[str, Any] = {}          # held back: the node may have moved (a new endpoint)

        def arrived(node: str, raw: Any, *, final: bool = False) -> None:
            if node in outcomes or node not in endpoints:
                return
            if not final and isinstance(raw, NodeCallError) and raw.code == UNREACHABLE:
                unreachable[node] = raw
                return
            try:
                outcome = process(node, raw)
            except NodeCallError as exc:
                outcome = exc
            except Refusal as exc:
                outcome = NodeCallError(exc.code, exc.reason)
            outcomes[node] = outcome
            self._progress(files.name, node, step, outcome)
            if emit is not None:
                emit(node, outcome)

        async def call(nodes) -> None:
            requests = [NodeRequest(node, endpoints[node], kwargs_of[node]) for node in sorted(nodes, key=node_sort_key)]
            for request in requests:
                self._progress(files.name, request.node, started, None)
            if requests:
                results = await self.nodes.run(operation, requests, parallelism=self.parallelism,
                                               timeout=self.timeout, on_result=arrived)
                for node, raw in results.items():      # an adapter that did not call on_result
                    arrived(node, raw)

        await call(endpoints)
        if unreachable:
            moved = await self._moved(files, unreachable, endpoints)
            stuck = {node: raw for node, raw in unreachable.items() if node not in moved}
            unreachable.clear()
            if moved:
                await call(moved)                      # once more, at the endpoint the agent advertises now
            for node, raw in {**stuck, **unreachable}.items():
                arrived(node, raw, final=True)
        for node in endpoints:
            arrived(node, NodeCallError(ERROR, f"no answer from {node} was recorded"), final=True)
        return outcomes

    async def _moved(self, files: SliceFiles, unreachable: dict, endpoints: dict) -> list[str]:
        """The unreachable nodes the agent now advertises at another endpoint (a node manager restarted
        elsewhere); their endpoints are updated in ``endpoints`` and in the slice's ``nodes`` file."""
        try:
            ads = await self.agent.getads()
        except AgentCallError:
            return []
        learned = {ad.node: ad.endpoint for ad in ads
                   if ad.node in unreachable and ad.endpoint and ad.endpoint != endpoints.get(ad.node)}
        if learned:
            files.add_endpoints(learned)
            endpoints.update(learned)
        return sorted(learned, key=node_sort_key)

    @staticmethod
    def _expect(raw: Any, kind: type, node: str, slice_name: str):
        """``raw`` if it is a ``kind`` for this slice and node, else NodeCallError ``error``."""
        if isinstance(raw, NodeCallError):
            raise raw
        if not isinstance(raw, kind):
            raise NodeCallError(ERROR, f"{node} answered {type(raw).__name__}, not {kind.__name__}")
        if kind is int:
            return raw
        if raw.slice != slice_name or raw.node != node:
            raise NodeCallError(ERROR, f"{node} answered for slice {raw.slice} on {raw.node}")
        return raw

    def _slice(self, slice_name: str) -> SliceFiles:
        return self.directory.slice(slice_name).require()

    # ------------------------------------------------------------------------------------- agent

    def getads(self) -> defer.Deferred:
        """The agent's ads (``Report.values``: NodeAds in the agent's order)."""
        async def body(report):
            report.values = list(await self.agent.getads())
        return self._command("getads", None, body)

    async def _issue(self, spec_bytes: bytes, report: Report) -> SliceFiles:
        try:
            spec = parse_slice_spec(spec_bytes)
        except SliceSpecError as exc:
            raise SliceManagerError("invalid-spec", str(exc)) from None
        report.slice = spec.name
        files = self.directory.slice(spec.name)
        if files.exists() and files.alive(self.clock()):
            raise SliceManagerError("exists", f"slice {spec.name} already has tickets, leases or slivers in "
                                    f"{files.path}; delete it first, or resume with newleases/newvms")
        ads = await self.agent.getads()
        tickets = await self.agent.issue_tickets(spec_bytes)
        by_node: dict[str, tuple[bytes, Any]] = {}
        for data in tickets:
            try:
                ticket = parse_ticket(data)
            except TicketError as exc:
                raise AgentCallError(ERROR, f"the agent returned an unreadable ticket: {exc.reason}") from None
            if ticket.slice_name != spec.name or ticket.node in by_node:
                raise AgentCallError(ERROR, f"the agent returned a ticket for slice {ticket.slice_name} on "
                                     f"{ticket.node}, which was not asked for")
            by_node[ticket.node] = (data, ticket)
        endpoints = {ad.node: ad.endpoint for ad in ads if ad.node in by_node and ad.endpoint}
        files.remove_all()                      # an expired leftover (a live slice was refused above)
        files.create()
        files.write_spec(spec_bytes)
        files.add_endpoints(endpoints)
        for node, (data, _) in by_node.items():
            files.put_ticket(node, data)
        report.outcomes = {node: ticket for node, (_, ticket) in by_node.items()}
        for node in sorted(report.outcomes, key=node_sort_key):
            self._progress(spec.name, node, "ticket", report.outcomes[node])
        return files

    def newtickets(self, spec_bytes: bytes) -> defer.Deferred:
        """Step 1: tickets from the agent into ``tickets/`` (outcomes: node -> Ticket)."""
        async def body(report):
            await self._issue(spec_bytes, report)
            for node in sorted(report.outcomes, key=node_sort_key):
                self._emit(node, report.outcomes[node])
        return self._command("newtickets", None, body)

    # ------------------------------------------------------------------------------------- steps 2, 3

    def _read_tickets(self, files: SliceFiles, paths: Sequence[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for path in paths:
            data = read_user_file(path, MAX_TICKET_BYTES)
            try:
                ticket = parse_ticket(data)
            except TicketError as exc:
                raise SliceManagerError("bad-file", f"{path} is not a ticket: {exc.reason}") from None
            if ticket.slice_name != files.name:
                raise SliceManagerError("bad-file", f"{path} is a ticket for slice {ticket.slice_name}, "
                                        f"not {files.name}")
            if ticket.node in found:
                raise SliceManagerError("bad-file", f"{path}: two tickets for {ticket.node}")
            found[ticket.node] = data
        return found

    def _read_leases(self, files: SliceFiles, paths: Sequence[str]) -> dict[str, LeaseInfo]:
        found: dict[str, LeaseInfo] = {}
        for path in paths:
            lease = parse_lease_document(read_user_file(path, MAX_LEASE_BYTES), path)
            if lease.slice != files.name:
                raise SliceManagerError("bad-file", f"{path} is a lease of slice {lease.slice}, not {files.name}")
            if lease.node in found:
                raise SliceManagerError("bad-file", f"{path}: two leases for {lease.node}")
            found[lease.node] = lease
        return found

    async def _redeem(self, files: SliceFiles, tickets: dict[str, bytes], emit) -> dict[str, Any]:
        def process(node, raw):
            lease = self._expect(raw, LeaseInfo, node, files.name)
            files.put_lease(LEASES, lease)
            files.remove(TICKETS, node)
            return lease
        return await self._run("Redeem", files, {node: {"ticket": data} for node, data in tickets.items()},
                               process, emit, step="leased")

    def _keypair(self, files: SliceFiles) -> tuple[bytes, str]:
        found = files.keypair_files()
        if found is not None:
            return found
        pair = self.new_keypair(files.name)
        files.save_keypair(pair.private_openssh, pair.public_line)
        return pair.private_openssh, pair.public_line

    async def _create(self, files: SliceFiles, leases: dict[str, LeaseInfo], emit) -> dict[str, Any]:
        if not leases:
            return {}
        private, public = self._keypair(files)

        def process(node, raw):
            sliver = self._expect(raw, SliverInfo, node, files.name)
            lease = leases[node]
            if sliver.expires_at is not None and sliver.expires_at != lease.expires_at:
                lease = LeaseInfo(lease.lease_id, lease.ticket_id, lease.slice, lease.node, lease.slots,
                                  lease.granted_at, sliver.expires_at, lease.leaselen)
            files.put_lease(VMS, lease)
            files.remove(LEASES, node)
            return sliver
        kwargs = {node: {"slice": files.name, "leaseId": lease.lease_id, "slicePublicKey": public,
                         "slicePrivateKey": private} for node, lease in leases.items()}
        return await self._run("CreateSliver", files, kwargs, process, emit, step="created", started="creating")

    def newleases(self, slice_name: str, ticket_files: Sequence[str]) -> defer.Deferred:
        """Step 2 on these ticket files: Redeem, ``tickets/`` -> ``leases/`` per node that answered."""
        async def body(report):
            files = self._slice(slice_name)
            report.outcomes = await self._redeem(files, self._read_tickets(files, ticket_files), self._emit)
        return self._command("newleases", slice_name, body)

    def newvms(self, slice_name: str, lease_files: Sequence[str]) -> defer.Deferred:
        """Step 3 on these lease files: CreateSliver, ``leases/`` -> ``vms/`` per node that answered."""
        async def body(report):
            files = self._slice(slice_name)
            report.outcomes = await self._create(files, self._read_leases(files, lease_files), self._emit)
        return self._command("newvms", slice_name, body)

    def createslice(self, spec_bytes: bytes) -> defer.Deferred:
        """Steps 1, 2 and 3; one outcome per node (its first failing step's error, or the SliverInfo)."""
        async def body(report):
            files = await self._issue(spec_bytes, report)
            tickets = {node: files.ticket(node) for node in report.outcomes}

            def errors_only(node, outcome):
                if isinstance(outcome, NodeCallError):
                    self._emit(node, outcome)
            leased = await self._redeem(files, tickets, errors_only)
            leases = {node: lease for node, lease in leased.items() if isinstance(lease, LeaseInfo)}
            created = await self._create(files, leases, self._emit)
            report.outcomes = {**leased, **created}
        return self._command("createslice", None, body)

    # ------------------------------------------------------------------------------- slice commands

    def deleteslice(self, slice_name: str) -> defer.Deferred:
        """DeleteSliver on every node with a vm or lease; release at the agent the tickets of the nodes deleted
        and the unredeemed ones (their slots are free again); remove what is done."""
        async def body(report):
            files = self._slice(slice_name)
            targets = set(files.nodes(VMS)) | set(files.nodes(LEASES))
            leased_tickets = {}      # node -> the ticket its lease came from: its agent reservation ends too
            for kind in (LEASES, VMS):
                for node in files.nodes(kind):
                    try:
                        leased_tickets[node] = files.lease(kind, node).ticket_id
                    except SliceDirectoryError:
                        pass             # unreadable: the agent's reservation lapses at the ticket's term

            def process(node, raw):
                if isinstance(raw, NodeCallError) and raw.code not in ALREADY_GONE:
                    raise raw
                files.remove(VMS, node)
                files.remove(LEASES, node)
                if isinstance(raw, NodeCallError):
                    return SliverInfo(slice_name, node, "terminated", None, None, 0)
                return self._expect(raw, SliverInfo, node, slice_name)
            report.outcomes = await self._run("DeleteSliver", files, {node: {"slice": slice_name}
                                                                      for node in targets}, process, self._emit,
                                              step="deleted")
            ticket_ids = {}
            for node in files.nodes(TICKETS):
                try:
                    ticket_ids[node] = parse_ticket(files.ticket(node)).ticket_id
                except (TicketError, SliceDirectoryError):
                    ticket_ids[node] = None      # unreadable: nothing to release, remove it with the rest
            wanted = sorted({t for t in ticket_ids.values() if t is not None}
                            | {leased_tickets[node] for node in report.succeeded if node in leased_tickets})
            if wanted:
                await self.agent.release(wanted)
            for node in ticket_ids:
                files.remove(TICKETS, node)
            if not report.failed:
                files.remove_all()
        return self._command("deleteslice", slice_name, body)

    def _key(self, key_text: str):
        text = key_text.strip() if isinstance(key_text, str) else ""
        if not text or "\n" in text or "\r" in text:
            raise SliceManagerError("invalid-key", "the key file must hold exactly one OpenSSH public key line")
        try:
            return self.parse_key(text)
        except Refusal as exc:
            raise SliceManagerError("invalid-key", exc.reason) from None

    async def _on_vms(self, files: SliceFiles, operation: str, kwargs: dict) -> dict[str, Any]:
        nodes = files.nodes(VMS)
        if not nodes:
            raise SliceManagerError("no-nodes", f"slice {files.name} has no sliver (nothing in {files.path}/vms)")
        return await self._run(operation, files, {node: dict(kwargs) for node in nodes},
                               lambda node, raw: self._expect(raw, int, node, files.name), self._emit)

    def addkey(self, slice_name: str, key_text: str) -> defer.Deferred:
        """AddKey on every node with a vm; the key is recorded in ``sshkeys/`` once a node took it."""
        async def body(report):
            files = self._slice(slice_name)
            key = self._key(key_text)
            report.outcomes = await self._on_vms(files, "AddKey", {"slice": slice_name, "key": key.line})
            if report.succeeded:
                files.put_user_key(key.fingerprint, key.line)
        return self._command("addkey", slice_name, body)

    def delkey(self, slice_name: str, key_text: str) -> defer.Deferred:
        """DelKey on every node with a vm; the record goes when every node succeeded."""
        async def body(report):
            files = self._slice(slice_name)
            key = self._key(key_text)
            report.outcomes = await self._on_vms(files, "DelKey", {"slice": slice_name, "key": key.line})
            if not report.failed:
                files.remove_user_key(key.fingerprint)
        return self._command("delkey", slice_name, body)

    def nukekeys(self, slice_name: str) -> defer.Deferred:
        """NukeKeys on every node with a vm; the records go when every node succeeded."""
        async def body(report):
            files = self._slice(slice_name)
            report.outcomes = await self._on_vms(files, "NukeKeys", {"slice": slice_name})
            if not report.failed:
                files.clear_user_keys()
        return self._command("nukekeys", slice_name, body)

    def renewslice(self, slice_name: str) -> defer.Deferred:
        """RenewLease on every node with a vm or lease; each file rewritten with the new expiry."""
        async def body(report):
            files = self._slice(slice_name)
            vms, leases = set(files.nodes(VMS)), set(files.nodes(LEASES))
            if not vms | leases:
                raise SliceManagerError("no-nodes", f"slice {slice_name} has no lease on any node")

            def process(node, raw):
                lease = self._expect(raw, LeaseInfo, node, slice_name)
                files.put_lease(VMS if node in vms else LEASES, lease)
                return lease
            report.outcomes = await self._run("RenewLease", files, {node: {"slice": slice_name}
                                                                    for node in vms | leases}, process, self._emit)
        return self._command("renewslice", slice_name, body)

    # --------------------------------------------------------------------------------------- local

    def nodelist(self, slice_name: str) -> defer.Deferred:
        """The nodes with a vm (``Report.values``), from ``vms/``."""
        async def body(report):
            report.values = self._slice(slice_name).nodes(VMS)
        return self._command("nodelist", slice_name, body)

    def expirations(self, slice_name: str) -> defer.Deferred:
        """Outcomes: node -> its vm's LeaseInfo, from ``vms/``; an unreadable file is that node's error."""
        async def body(report):
            files = self._slice(slice_name)
            for node in files.nodes(VMS):
                try:
                    report.outcomes[node] = files.lease(VMS, node)
                except SliceDirectoryError as exc:
                    report.outcomes[node] = NodeCallError(exc.code, exc.reason)
        return self._command("expirations", slice_name, body)

    def clean(self) -> defer.Deferred:
        """Remove slices with no valid ticket, lease or vm (``Report.values``: their names)."""
        async def body(report):
            report.values = self.directory.clean(self.clock())
        return self._command("clean", None, body)

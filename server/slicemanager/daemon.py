"""``twistd dsmt-slicemanager``: the ``svm`` commands as a SOAP service, and reference 003's container manager.

::

    twistd -n dsmt-slicemanager --ca ca.pem --cert slicemanager.pem --key slicemanager.key \\
        --http tcp:8092:interface=127.0.0.1 --agent http://agent:8090/agent \\
        --router psepr://router:23345 --password-file slicemanager.pw --slices-dir /var/lib/dsmt/slicemanager

The SOAP options are :class:`~dsmt.server.hosting.HostingOptions`'; the
service is ``SliceManagerService`` (``dsmt.server.slicemanager.service``) at
``/slicemanager`` and on PsEPR service ``slicemanager``.  Its own options:

==========================  ==========================================================================
``--agent URL``             the agent (``http://agent:8090/agent``); required with ``--transport http``
``--transport http|psepr``  how the agent and the node managers are reached; ``psepr`` logs in on
                            ``--router`` with its own connection (instance ``svm-<pid>``)
``--slices-dir DIR``        the slice directory home (``DIR/slices/<slice>/…`` as ``svm``'s, plus
                            ``DIR/owners/<slice>``); default :data:`DEFAULT_SLICES_DIR`
``--parallelism N``         node calls at once (``svm -p``; no short form: ``-p`` is ``--password-file``)
``-t``/``--timeout S``      longest wait for each node (``svm -t``); default: the transport's own
``--service-ca FILE``       replies of the agent and node managers must be signed by a service
                            certificate of this CA; default: replies are not checked
==========================  ==========================================================================

Outgoing calls are signed with ``--cert``/``--key`` when given: the node
managers then see the slice manager as the owner of every lease it redeemed.

**Container manager** (:class:`LiveContainers`, reference 003 played live):
one :class:`~dsmt.server.slicemanager.container.ContainerManager` per slice,
fed by the core's progress (``on_progress``) while any command runs:

=====================================  ============================================
core progress                          container manager
=====================================  ============================================
``ticket`` (tickets saved)             ``select`` (one node at a time)
``leased`` failed                      ``failed`` (``timeout=True`` for a timeout)
``creating`` (CreateSliver sent)       ``creating``
``created`` ``running`` / other state  ``installed`` / ``initializing``
``created`` failed                     ``failed`` (``timeout=True`` for a timeout)
``deleted`` succeeded                  ``deselect``
=====================================  ============================================

A node the container manager does not list yet (``NewVms`` after a restart)
is selected first.  Events are published on the service's PsEPR connection
(without ``--router`` they are only logged); each slice's manager holds a
lease on its container-mgr channel — on its own connection logged in as
``<slice>_mgr`` (the router delivers ``node-exclude``, addressed to that
service, only to its leases; password: ``--mgr-password-file``, default
``--password-file``'s) — and acts on ``node-exclude`` commands
under the slice's lock (:class:`~dsmt.server.slicemanager.service.SliceLocks`):
``Exclude`` → ``DeleteSliver`` on that node alone (``NoSliver``/``NoLease``
count as gone), its files removed, then ``deselect``; ``Select`` → a ticket
for that node alone (the slice's spec with ``numnodes`` 1 and ``ips`` naming
it; the agent takes nodes from ``ips`` only), then ``newleases`` and
``newvms`` on it — progress as above.  ``keep_size`` is the slice's
``numnodes``; a replacement is the first node the agent advertises with a
free slot that is not in the slice, excluded or pending.  Refreshes are
``callLater`` timers at ``next_refresh`` (no polling).  A slice whose
directory is gone (deleted, cleaned) is retired: timer cancelled, lease
released.  At start, the slices on disk are taken up again: nodes with a vm
are reported ``installed`` (the slice directory's record), nodes with a
ticket or lease ``selected``.

Limits: a replacement whose ticket, lease or sliver fails stays pending in
its container manager (it is logged; a later exclusion of another node does
not count it twice).  The slice directory is this daemon's alone: an ``svm``
working on the same directory at the same time is not coordinated.
"""
from __future__ import annotations

import time
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from dsmt.server.agent.tickets import TicketError, parse_ticket
from dsmt.server.hosting import HostingOptions, ServiceHost, event_publisher, host_service, read_password, \
    stop_daemon_failed
from dsmt.server.manage.wsdm import ManageableResource, OperationalStatus, resource_id_for
from dsmt.server.refusal import Refusal
from dsmt.server.slicemanager.calls import TIMEOUT, AgentCallError, CallOptions, NodeCallError, NodeRequest, \
    SliverInfo
from dsmt.server.slicemanager.container import ContainerManager, ContainerStateError, Exclude, Select
from dsmt.server.slicemanager.core import ALREADY_GONE, DEFAULT_PARALLELISM, Report, SliceManager
from dsmt.server.slicemanager.service import HTTP_PATH, NAME, PSEPR_SERVICE, TNS, SliceLocks, SliceOwners, \
    slicemanager_service
from dsmt.server.slicemanager.slicedir import LEASES, TICKETS, VMS, SliceDirectory, SliceDirectoryError
from dsmt.server.slicemanager.spec import SliceSpecError, parse_slice_spec
from dsmt.server.statusevents import NODE_EXCLUDE, NODE_LIST_STATES, container_mgr_channel

__all__ = ["DEFAULT_SLICES_DIR", "MAX_PARALLELISM", "MAX_TIMEOUT", "CONTAINER_LEASE_SECONDS", "Options",
           "LiveContainers", "SliceManagerResource", "makeService"]

log = Logger(namespace="dsmt.slicemanager")

#: The slice directory home unless ``--slices-dir`` says otherwise (relative to the daemon's directory).
DEFAULT_SLICES_DIR = "slicemanager-state"
#: Most node calls at once: ``svm``'s limit (one file descriptor each; 1024 is the usual per-process limit).
MAX_PARALLELISM = 1024
#: Longest ``--timeout``: ``svm``'s limit, a ticket's default term.
MAX_TIMEOUT = 3600.0
#: Seconds asked for each container-mgr channel lease; the connection renews it at 80 %, so this only
#: bounds how long the router keeps delivering to a slice manager that died.
CONTAINER_LEASE_SECONDS = 600


class Options(HostingOptions):
    synopsis = "(--agent URL | --transport psepr --router URL) (--ca FILE | --allow-unsigned) --http STRPORT"
    longdesc = __doc__
    psepr_name = PSEPR_SERVICE
    optParameters = [
        ["agent", None, None, "the agent's URL (http://agent:8090/agent)"],
        ["transport", None, "http", "how the agent and node managers are reached: http or psepr"],
        ["slices-dir", "d", DEFAULT_SLICES_DIR, "slice directory home (created if missing)"],
        ["parallelism", None, DEFAULT_PARALLELISM, f"node calls at once (1..{MAX_PARALLELISM})", int],
        ["timeout", "t", None, f"longest wait for each node, seconds (0..{MAX_TIMEOUT:g})", float],
        ["service-ca", None, None, "CA whose service certificates must sign the agent's and node managers' replies"],
        ["mgr-password-file", None, None, "password of the <slice>_mgr PsEPR accounts the container managers "
                                          "log in with (first line); default: --password-file's"],
    ]

    def postOptions(self):
        super().postOptions()
        if self["transport"] not in ("http", "psepr"):
            raise usage.UsageError(f"--transport must be http or psepr, not {self['transport']!r}")
        if self["transport"] == "http" and not self["agent"]:
            raise usage.UsageError("the HTTP transport reaches the agent at --agent URL: give it")
        if self["agent"] and not self["agent"].startswith(("http://", "https://")):
            raise usage.UsageError(f"--agent must be an http:// or https:// URL, not {self['agent'][:100]!r}")
        if self["transport"] == "psepr" and not self["router"]:
            raise usage.UsageError("--transport psepr needs --router")
        if not 1 <= self["parallelism"] <= MAX_PARALLELISM:
            raise usage.UsageError(f"--parallelism must be 1..{MAX_PARALLELISM}, not {self['parallelism']}")
        if self["timeout"] is not None and not 0 < self["timeout"] <= MAX_TIMEOUT:
            raise usage.UsageError(f"--timeout must be more than 0 and at most {MAX_TIMEOUT:g} s, "
                                   f"not {self['timeout']}")
        self["call-options"] = CallOptions(
            transport=self["transport"], agent_url=self["agent"], router=self["router"],
            psepr_service=self["psepr-service"] or PSEPR_SERVICE, password_file=self["password-file"],
            cert=self["cert"], key=self["key"], ca=self["service-ca"], timeout=self["timeout"])


# ------------------------------------------------------------------ container managers, live

class LiveContainers(service.Service):
    """The container managers of every slice (see the module docstring).

    ``manager``: the core (its ``on_progress`` is :meth:`progress`); ``locks``: the service's per-slice
    locks; ``connection``: the PsEPR connection events go out on and commands come in on (None: logged
    only); ``sender``: the ``from`` instance; ``reactor``: timers and clock.
    """

    def __init__(self, manager: SliceManager, locks: SliceLocks, *, sender: str, reactor, connection=None,
                 command_connection=None):
        self.manager = manager
        self.locks = locks
        self.sender = sender
        self.reactor = reactor
        self.connection = connection
        self.command_connection = command_connection
        self.command_connections: dict[str, Any] = {}
        self.containers: dict[str, ContainerManager] = {}
        self.leases: dict[str, Any] = {}
        self.timers: dict[str, Any] = {}
        self.last_command: defer.Deferred | None = None  # the latest node-exclude handling (tests wait on it)
        self._ads: list = []

    # ------------------------------------------------------------ publishing

    def publish(self, event) -> None:
        """Sent on the daemon's connection (set once the host is built), else logged; a failed send waits for
        the next refresh."""
        event_publisher(self.connection, log)(event)

    def container(self, slice_name: str) -> ContainerManager:
        """The slice's container manager, made on first use (keep_size: the spec's numnodes)."""
        found = self.containers.get(slice_name)
        if found is not None:
            return found
        keep_size = None
        try:
            spec = self.manager.directory.slice(slice_name).spec()
            keep_size = parse_slice_spec(spec).numnodes if spec else None
        except (SliceSpecError, SliceDirectoryError) as exc:
            log.warn("slice {slice}: no usable spec.xml ({error}); it is not kept at a size", slice=slice_name,
                     error=exc)
        found = self.containers[slice_name] = ContainerManager(
            slice_name, publish=self.publish, sender=self.sender, clock=self.reactor.seconds, keep_size=keep_size,
            choose_replacement=lambda avoid: self._choose(avoid))
        connection = self.command_connection(slice_name) if self.command_connection is not None else None
        if connection is not None:
            self.command_connections[slice_name] = connection
            connection.connect(retry=True).addErrback(
                lambda failure: log.warn("slice {slice}: no command connection ({error})", slice=slice_name,
                                         error=failure.getErrorMessage()))
            self.leases[slice_name] = connection.lease(
                container_mgr_channel(slice_name), CONTAINER_LEASE_SECONDS,
                callback=lambda event, name=slice_name: self.received(name, event))
        return found

    def _arm(self, slice_name: str) -> None:
        timer = self.timers.pop(slice_name, None)
        if timer is not None and timer.active():
            timer.cancel()
        container = self.containers.get(slice_name)
        due = None if container is None or not self.running else container.next_refresh()
        if due is not None:
            self.timers[slice_name] = self.reactor.callLater(max(0.0, due - self.reactor.seconds()),
                                                             self._refresh, slice_name)

    def _refresh(self, slice_name: str) -> None:
        self.timers.pop(slice_name, None)
        container = self.containers.get(slice_name)
        if container is not None:
            container.refresh()
            self._arm(slice_name)

    def retire(self, slice_name: str) -> None:
        """Forget a slice that is gone: no more refreshes, lease released."""
        self.containers.pop(slice_name, None)
        timer = self.timers.pop(slice_name, None)
        if timer is not None and timer.active():
            timer.cancel()
        lease = self.leases.pop(slice_name, None)
        if lease is not None:
            lease.release()
        connection = self.command_connections.pop(slice_name, None)
        if connection is not None:
            connection.close()

    # ------------------------------------------------------------ progress in

    def progress(self, slice_name: str, node: str, step: str, outcome) -> None:
        """The core's ``on_progress``; never raises (an inapplicable step is logged)."""
        try:
            self._apply(self.container(slice_name), node, step, outcome)
        except ContainerStateError as exc:
            log.warn("slice {slice}: {step} on {node} not reported: {error}", slice=slice_name, step=step,
                     node=node, error=exc)
        self._arm(slice_name)

    @staticmethod
    def _apply(container: ContainerManager, node: str, step: str, outcome) -> None:
        listed = node in container.nodes
        if step == "deleted":
            if listed and not isinstance(outcome, NodeCallError):
                container.deselect(node)
            return
        if not listed:
            container.select([node])
        if isinstance(outcome, NodeCallError):
            container.failed(node, outcome.reason, timeout=outcome.code == TIMEOUT)
        elif step == "creating":
            container.creating(node)
        elif step == "created":
            if isinstance(outcome, SliverInfo) and outcome.state == "running":
                container.installed(node)
            else:
                container.initializing(node)

    def after_report(self, report: Report) -> None:
        """The service's ``on_report``: retire slices whose directory is gone."""
        names = list(report.values) if report.command == "clean" else [report.slice] if report.slice else []
        for name in names:
            if name in self.containers and not self.manager.directory.slice(name).exists():
                self.retire(name)

    # ------------------------------------------------------------ commands in

    def received(self, slice_name: str, event) -> None:
        """A container-mgr channel event: ``node-exclude`` commands are handled under the slice's lock."""
        payload = getattr(event, "payload", None)
        if getattr(payload, "field", None) != NODE_EXCLUDE:
            return  # our own node-list and sliver-state, echoed by the router
        self.last_command = self.locks.run(slice_name, self._command, slice_name, event)
        self.last_command.addErrback(lambda failure: log.failure("slice {slice}: node-exclude failed", failure,
                                                                 slice=slice_name))

    async def _command(self, slice_name: str, event) -> None:
        container = self.containers.get(slice_name)
        if container is None:
            return
        try:
            self._ads = list(await self.manager.agent.getads())
        except AgentCallError as exc:
            self._ads = []
            log.warn("slice {slice}: the agent's ads are unavailable ({error}); no replacement", slice=slice_name,
                     error=exc.reason)
        handled = container.handle(event)
        if handled.ignored is not None:
            log.warn("slice {slice}: node-exclude ignored ({code}): {reason}", slice=slice_name,
                     code=handled.ignored.code, reason=handled.ignored.reason)
            return
        if handled.note:
            log.info("slice {slice}: {note}", slice=slice_name, note=handled.note)
        for action in handled.actions:
            if isinstance(action, Exclude):
                await self._exclude(slice_name, action.host)
            elif isinstance(action, Select):
                await self._replace(slice_name, action.host)

    def _choose(self, avoid: set[str]) -> str | None:
        for ad in self._ads:
            if ad.free > 0 and ad.node not in avoid and ad.endpoint:
                return ad.node
        return None

    async def _exclude(self, slice_name: str, node: str) -> None:
        files = self.manager.directory.slice(slice_name)
        endpoint = files.endpoints().get(node)
        if endpoint is None:
            outcome = NodeCallError("no-endpoint", f"no endpoint known for {node}")
        else:
            outcomes = await self.manager.nodes.run(
                "DeleteSliver", [NodeRequest(node, endpoint, {"slice": slice_name})], parallelism=1,
                timeout=self.manager.timeout)
            outcome = outcomes[node]
        if isinstance(outcome, NodeCallError) and outcome.code not in ALREADY_GONE:
            log.warn("slice {slice}: {node} excluded but its sliver was not deleted: {reason}", slice=slice_name,
                     node=node, reason=outcome.reason)
            return
        files.remove(VMS, node)
        files.remove(LEASES, node)
        files.remove(TICKETS, node)
        self.progress(slice_name, node, "deleted", SliverInfo(slice_name, node, "terminated", None, None, 0))
        log.info("slice {slice}: {node} excluded, its sliver deleted", slice=slice_name, node=node)

    async def _replace(self, slice_name: str, node: str) -> None:
        files = self.manager.directory.slice(slice_name)
        try:
            spec = parse_slice_spec(files.spec() or b"")
            one = (f"<slice><name>{spec.name}</name><numnodes>1</numnodes><leaselen>{spec.leaselen}</leaselen>"
                   f"<ips>{node}</ips></slice>").encode()
            (data,) = await self.manager.agent.issue_tickets(one)
            ticket = parse_ticket(data)
            if ticket.slice_name != slice_name or ticket.node != node:
                raise AgentCallError("error", f"the agent returned a ticket for {ticket.slice_name} on {ticket.node}")
        except (SliceSpecError, SliceDirectoryError, TicketError, Refusal, ValueError) as exc:
            log.warn("slice {slice}: no replacement on {node}: {error}", slice=slice_name, node=node,
                     error=getattr(exc, "reason", None) or exc)
            return
        endpoint = {ad.node: ad.endpoint for ad in self._ads}.get(node)
        if endpoint:
            files.add_endpoints({node: endpoint})
        files.put_ticket(node, data)
        self.progress(slice_name, node, "ticket", ticket)
        leased = await self.manager.newleases(slice_name, [files.node_path(TICKETS, node)])
        if leased.ok:
            await self.manager.newvms(slice_name, [files.node_path(LEASES, node)])
        log.info("slice {slice}: replacement {node} selected", slice=slice_name, node=node)

    # ------------------------------------------------------------ life

    def recover(self) -> None:
        """Take up the slices on disk (see the module docstring)."""
        for name in self.manager.directory.names():
            files = self.manager.directory.slice(name)
            vms = files.nodes(VMS)
            others = [node for node in files.nodes(LEASES) + files.nodes(TICKETS) if node not in vms]
            if not vms and not others:
                continue
            container = self.container(name)
            try:
                container.select(list(dict.fromkeys(vms + others)))
                for node in vms:
                    container.installed(node)
            except ContainerStateError as exc:
                log.warn("slice {slice} not taken up: {error}", slice=name, error=exc)
            self._arm(name)

    def startService(self):
        super().startService()
        self.recover()

    def stopService(self):
        for name in list(self.containers):
            timer = self.timers.pop(name, None)
            if timer is not None and timer.active():
                timer.cancel()
        for connection in self.command_connections.values():
            connection.close()
        self.command_connections.clear()
        self.leases.clear()
        return super().stopService()


class _Calls(service.Service):
    """Makes the core's agent and node calls when the daemon starts (PsEPR connects inside the reactor)
    and releases them when it stops."""

    def __init__(self, manager: SliceManager, options: CallOptions, make_calls):
        self.manager, self.options, self.make_calls = manager, options, make_calls
        self._close = None

    def startService(self):
        super().startService()
        self.manager.agent, self.manager.nodes, self._close = self.make_calls(self.options)

    def stopService(self):
        super().stopService()
        close, self._close = self._close, None
        return defer.maybeDeferred(close) if close is not None else None


class SliceManagerResource(ManageableResource):
    """The slice manager for the manageability port: ``Slices`` (in the slice directory), ``Managed``
    (slices with a container manager) and ``Nodes<Status>`` per node-list status over every slice.
    Available; PartiallyAvailable while its PsEPR connection (when it has one) is down; Unavailable
    once stopped."""

    caption = "dsmt slice manager"

    def __init__(self, containers: LiveContainers, home: str, running=lambda: True):
        from dsmt.server.manage.daemons import DSMT_VERSION
        self.containers = containers
        self.running = running
        self.resource_id = resource_id_for("slicemanager", containers.manager.directory.home)
        self.description = f"dsmt slice manager: svm's commands and the container manager (slices in {home})"
        self.version = DSMT_VERSION

    def operational_status(self) -> OperationalStatus:
        if not self.running():
            return OperationalStatus.UNAVAILABLE
        connection = self.containers.connection
        if connection is not None and not connection.connected:
            return OperationalStatus.PARTIALLY_AVAILABLE
        return OperationalStatus.AVAILABLE

    def metric_names(self):
        from dsmt.server.manage.daemons import camel
        return ("Slices", "Managed") + tuple("Nodes" + camel(status) for status in NODE_LIST_STATES)

    def metrics(self):
        from dsmt.server.manage.daemons import camel
        counts = dict.fromkeys(NODE_LIST_STATES, 0)
        for container in self.containers.containers.values():
            for _, status in container.snapshot().values():
                counts[status] += 1
        try:
            slices = len(self.containers.manager.directory.names())
        except SliceDirectoryError:
            slices = 0
        return {"Slices": slices, "Managed": len(self.containers.containers),
                **{"Nodes" + camel(status): count for status, count in counts.items()}}


def _command_connections(options: Options):
    """``slice -> PsEPRConnection`` logged in as ``<slice>_mgr`` (instance ``--instance``), or None without
    ``--router``.  The router delivers an event addressed to service S only to leases held by S, and
    ``node-exclude`` is addressed to ``<slice>_mgr`` (reference 003), so each slice's commands need a login
    as that service: with the password of ``--mgr-password-file``, else the daemon's own."""
    if not options["router"]:
        return None
    from dsmt.server.statusevents import manager_service
    from dsmt.transports.psepr.client import PsEPRConnection
    password = read_password(options["mgr-password-file"]) if options["mgr-password-file"] else options["password"]

    def connection(slice_name: str):
        return PsEPRConnection.from_urls(options["router"], service=manager_service(slice_name),
                                         instance=options["instance"], password=password)
    return connection


def makeService(options: Options, reactor=None, make_calls=None) -> ServiceHost:
    """The slice manager's :class:`ServiceHost` (``host.manager``, ``host.containers``, ``host.manage``,
    ``host.owners``; the hosted service is ``host.hosted[0]``).  ``make_calls(CallOptions) -> (agent,
    nodes, close)``: ``remote.make_calls`` by default."""
    if reactor is None:
        from twisted.internet import reactor
    if make_calls is None:
        from dsmt.server.slicemanager.remote import make_calls
    directory = SliceDirectory(options["slices-dir"])
    locks = SliceLocks()
    owners = SliceOwners(options["slices-dir"])
    manager = SliceManager(None, None, directory, clock=time.time, parallelism=options["parallelism"],
                           timeout=options["timeout"])
    containers = LiveContainers(manager, locks, sender=options["instance"], reactor=reactor,
                                command_connection=_command_connections(options))
    manager.on_progress = containers.progress
    resource = SliceManagerResource(containers, directory.home, running=lambda: containers.running)
    services = [slicemanager_service(manager, owners, locks=locks, on_report=containers.after_report)]
    host = host_service(services, TNS, NAME, path=HTTP_PATH, resource=resource, options=options,
                        psepr_service=PSEPR_SERVICE, reactor=reactor)
    containers.connection = host.hosted[0].connection
    _Calls(manager, options["call-options"], make_calls).setServiceParent(host)
    containers.setServiceParent(host)
    host.manager, host.containers, host.manage, host.owners = manager, containers, resource, owners

    def cannot_listen(failure):
        stop_daemon_failed(host.reactor)  # logged by the host; a daemon that cannot serve exits 1
    host.when_listening().addErrback(cannot_listen)
    return host

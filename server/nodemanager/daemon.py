"""``twistd dsmt-nodemanager`` (one node) and ``twistd dsmt-nodefarm`` (many node managers in one process).

One node, as on a real machine::

    twistd -n dsmt-nodemanager --node 10.0.0.5 --state-dir /var/lib/dsmt/nodemanager \\
        --ticket-ca ca.pem --ca ca.pem --cert node.pem --key node.key --capacity 10 \\
        --http tcp:8091 --public-url https://10.0.0.5:8091/nodemanager \\
        --router psepr://router:23345 --password-file nodemanager.pw \\
        --agent http://agent:8090/agent

A farm, for tests and benchmarks (each node manager its own name, state
directory, HTTP path and PsEPR connection/instance; nothing shared but the
process, the HTTP port and the signing certificate)::

    twistd -n dsmt-nodefarm --nodes 50 --name 'n{n:03d}.farm.test' --state-dir farm/ \\
        --ticket-ca ca.pem --allow-unsigned --http tcp:0:interface=127.0.0.1 \\
        --nodes-file farm/nodes.txt

What a node manager does when started (:class:`NodeManagerService`):

1. :meth:`NodeService.recover` — finish or roll back what a crash interrupted
   (``dsmt.server.nodemanager.node``'s recovery rule);
2. serve the node manager operations (``wsdl/nodemanager.wsdl``) on HTTP at
   ``/nodemanager`` (farm: ``/nodemanager/<node>``) and on PsEPR as instance
   ``<node>`` of ``/org/dsmt/ns/soap/nodemanager/``, publishing the sliver
   manager's events (reference 000) on its PsEPR connection;
3. reap expired leases exactly when the earliest one ends (a timer re-armed
   after every change; no polling);
4. with ``--engine``: start the deployment engine in every sliver CreateSliver
   makes ``running`` (``dsmt.server.nodemanager.bootstrap``), forked from one
   pre-imported fork server per process (``dsmt.server.nodemanager.forkserver``;
   ``--engine-exec`` starts each as a fresh ``twistd`` instead), and watch the
   engines of running slivers: one found dead is started again;
5. once listening, register with ``--agent`` (``Register(node, capacity,
   endpoint)``), retried with backoff until the agent answers, and — farm —
   write ``--nodes-file`` (``node slots endpoint`` lines, the agent's
   ``--nodes`` format), which also tells a test that the farm is ready.

State per node: ``<state-dir>/leases.sqlite`` (leases, owners, sliver
records) and ``<state-dir>/slivers/`` (the directory sandboxes); a farm uses
``<state-dir>/<node>/`` for each node.

Events: published on the node manager's own PsEPR connection when
``--router`` is given, else only logged.
"""
from __future__ import annotations

import os
import time
from typing import Mapping

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from dsmt.server.hosting import HostingOptions, ServiceHost, event_publisher, stop_daemon_failed
from dsmt.server.manage.wsdm import ManageableResource, OperationalStatus, resource_id_for

__all__ = ["NodeManagerOptions", "FarmOptions", "NodeManagerResource", "NodeManagerService", "build_node",
           "makeService", "REGISTER_RETRY_MAX", "MAX_FARM_NODES"]

log = Logger(namespace="dsmt.nodemanager")

#: Longest wait between two registration attempts: an agent that comes back is seen within a minute.
REGISTER_RETRY_MAX = 60.0
#: First wait between registration attempts (doubled up to REGISTER_RETRY_MAX).
REGISTER_RETRY_FIRST = 0.5
#: Most node managers one farm process hosts: each holds a SQLite database, a PsEPR connection and
#: their buffers (a few MB); 1,000 is far beyond the 200-node benchmark and keeps a typo from exhausting
#: the machine's file descriptors.
MAX_FARM_NODES = 1000
#: Longest a reaper timer waits before looking again (a clock step or a very long lease still gets a
#: look at least this often).
MAX_REAP_WAIT = 3600.0


class NodeManagerResource(ManageableResource):
    """A node manager's manageability: capacity, slots in use, slivers by state."""

    caption = "dsmt node manager"

    def __init__(self, node, state_dir: str, running=lambda: True):
        from dsmt.server.manage.daemons import DSMT_VERSION
        self.node = node
        self.running = running
        self.resource_id = resource_id_for("nodemanager", node.node, os.path.abspath(state_dir))
        self.description = f"node manager of {node.node}: tickets to leases to slivers (state in {state_dir})"
        self.version = DSMT_VERSION

    def operational_status(self) -> OperationalStatus:
        return OperationalStatus.AVAILABLE if self.running() else OperationalStatus.UNAVAILABLE

    def metrics(self) -> Mapping[str, int]:
        from dsmt.server.manage.daemons import camel
        counts = {"CapacitySlots": self.node.capacity_slots, "SlotsInUse": self.node.slots_in_use()}
        for state, count in self.node.slivers_by_state().items():
            counts["Slivers" + camel(state)] = count
        return counts


class _Reaper:
    """Calls ``node.reap()`` when the earliest lease ends; :meth:`poke` re-arms after a change."""

    def __init__(self, node, clock):
        self.node, self.clock = node, clock
        self._call = None

    def poke(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        expiry = self.node.next_expiry()
        if expiry is None:
            self._call = None
            return
        wait = min(max(0.0, expiry - self.clock.seconds()), MAX_REAP_WAIT)
        self._call = self.clock.callLater(wait, self._reap)

    def _reap(self) -> None:
        self._call = None
        try:
            for info in self.node.reap():
                log.info("{node}: sliver of {slice} ended ({state})", node=self.node.node, slice=info.slice,
                         state=info.state)
        except Exception:
            log.failure("{node}: reaping failed; retried at the next change", node=self.node.node)
        self.poke()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class _Poking:
    """The node service as the SOAP face sees it: every call re-arms the reaper after it ran, and a sliver
    CreateSliver made ``running`` gets its deployment engine (``bootstrap``), once the reply has left."""

    def __init__(self, node, reaper: _Reaper, bootstrap=None, clock=None):
        self._node, self._reaper, self._bootstrap, self._clock = node, reaper, bootstrap, clock

    def __getattr__(self, name):
        attribute = getattr(self._node, name)
        if not callable(attribute) or name not in ("redeem", "renew", "delete_sliver", "create_sliver"):
            return attribute

        def call(*args):
            try:
                result = attribute(*args)
            finally:
                self._reaper.poke()
            if name == "create_sliver" and self._bootstrap is not None and result.state == "running":
                self._clock.callLater(0, self._bootstrap.start, result.slice)
            return result
        return call


def build_node(node_name: str, state_dir: str, ticket_trust, *, capacity: int, connection=None,
               clock=time.time, max_lease_seconds: int | None = None, issuers=None):
    """A :class:`~dsmt.server.nodemanager.node.NodeService` over ``state_dir`` (created if missing)."""
    from dsmt.server.nodemanager.core import DEFAULT_MAX_LEASE_SECONDS, NodeManager
    from dsmt.server.nodemanager.node import NodeService
    from dsmt.server.nodemanager.sliver import DirectorySandbox
    from dsmt.server.nodemanager.store import LeaseStore
    os.makedirs(os.path.join(state_dir, "slivers"), mode=0o700, exist_ok=True)
    store = LeaseStore(os.path.join(state_dir, "leases.sqlite"))
    manager = NodeManager(node_name, ticket_trust, store, clock, capacity_slots=capacity,
                          max_lease_seconds=max_lease_seconds or DEFAULT_MAX_LEASE_SECONDS, issuers=issuers)
    return NodeService(manager, DirectorySandbox(os.path.join(state_dir, "slivers")),
                       event_publisher(connection, log, manager.node_address))


class NodeManagerService(service.Service):
    """Starts one node (recover, reaper) and registers it with the agent once its endpoint is known."""

    def __init__(self, node, hosted, *, clock, agent: str | None = None, capacity: int = 0, endpoint=None,
                 signer=None, bootstrap=None):
        self.node = node
        self.bootstrap = bootstrap
        self.signer = signer
        self.hosted = hosted
        self.clock = clock
        self.agent = agent
        self.capacity = capacity
        self.endpoint = endpoint  # a callable giving the endpoint URL once the host listens
        self.reaper = _Reaper(node, clock)
        self.registered = False
        self._watch = None
        self.last_attempt: defer.Deferred | None = None  # the latest registration attempt (tests wait on it)
        self._retry = None

    def startService(self):
        super().startService()
        report = self.node.recover()
        for action in report.actions:
            log.info("{node}: recovery: {slice}: {why}", node=self.node.node, slice=action.slice, why=action.why)
        self.reaper.poke()
        if self.bootstrap is not None:        # engines lost with the machine come back with the node manager
            from twisted.internet.task import LoopingCall
            self._watch = LoopingCall(self.watch_engines)
            self._watch.clock = self.clock
            self._watch.start(self.bootstrap.settings.watch_seconds, now=True)

    def watch_engines(self) -> None:
        """Start again the engines of running slivers that are gone (``EngineBootstrap.watch``)."""
        try:
            self.bootstrap.watch([sliver.slice for sliver in self.node.list_slivers() if sliver.state == "running"])
        except Exception:  # the watch must keep running: one bad look is logged and the next one tries again
            log.failure("{node}: watching the deployment engines failed", node=self.node.node)

    def register(self, delay: float = REGISTER_RETRY_FIRST) -> defer.Deferred:
        """Register with the agent (when one is configured), retrying with backoff until it answers."""
        if not self.agent or not self.running:
            return defer.succeed(None)
        from dsmt.server.agent.register import register_node
        call = defer.maybeDeferred(register_node, self.agent, self.node.node, self.capacity, self.endpoint(),
                                   signer=self.signer)

        def done(_):
            self.registered = True
            log.info("{node}: registered with {agent}", node=self.node.node, agent=self.agent)

        def failed(failure):
            log.warn("{node}: registration with {agent} failed ({error}); retry in {delay:.1f} s",
                     node=self.node.node, agent=self.agent, error=failure.getErrorMessage(), delay=delay)
            if self.running:
                self._retry = self.clock.callLater(delay, self.register, min(delay * 2, REGISTER_RETRY_MAX))
        self.last_attempt = call.addCallbacks(done, failed)
        return self.last_attempt

    def stopService(self):
        self.reaper.stop()
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        return super().stopService()


# ------------------------------------------------------------------ options

class _NodeOptions(HostingOptions):
    psepr_name = "nodemanager"
    optParameters = [
        ["state-dir", "d", "nodemanager-state", "directory of the node's state (created if missing)"],
        ["capacity", None, 10, "slots this node offers (one sliver per slot)", int],
        ["ticket-ca", None, None, "CA certificate (PEM) whose service certificates may sign tickets; "
                                  "default: the first --ca"],
        ["issuer", None, None, "accept tickets only from this certificate subject (RFC 4514); default: any "
                               "service certificate of --ticket-ca"],
        ["max-lease", None, None, "longest lease granted, seconds (default 14 days)", int],
        ["agent", None, None, "agent URL to register with (http://agent:8090/agent); default: none"],
        ["engine-router", None, None, "the PsEPR router the slivers' deployment engines use (default: --router)"],
        ["engine-password-file", None, None, "password of the <slice>_mgr accounts the engines log in with "
                                             "(default: --password-file's)"],
        ["engine-ca", None, None, "CA the engines check callers' signatures with (default: none: they accept "
                                  "unsigned requests)"],
        ["engine-watch", None, None, "seconds between two looks for dead engines of running slivers (default 5)",
         float],
    ]
    optFlags = [["engine", None, "start the deployment engine (twistd dsmt-engine) in every new sliver"],
                ["engine-exec", None, "start each engine as a fresh twistd process instead of forking it from "
                                      "a pre-imported fork server (slower; the fork server is the default)"],
                ["engine-http", None, "the engines also serve SOAP/HTTP on a loopback port (its URL in the "
                                      "sliver's ~/.dsmt/engine.sqlite.url)"]]

    def postOptions(self):
        super().postOptions()
        from dsmt.transports.soap.pki import PkiError, TrustStore
        ticket_ca = self["ticket-ca"] or (self["ca"][0] if self["ca"] else None)
        if ticket_ca is None:
            raise usage.UsageError("tickets are verified against a CA: give --ticket-ca FILE (or --ca FILE)")
        if not 0 <= self["capacity"] <= 10_000:
            raise usage.UsageError(f"--capacity must be 0..10000 slots, not {self['capacity']}")
        try:
            self["ticket-trust"] = TrustStore.from_files(ticket_ca)
        except (PkiError, ValueError, OSError) as exc:
            raise usage.UsageError(str(exc))
        self["engine-args"] = []
        self["engine-router"] = self["engine-router"] or self["router"]
        from dsmt.server.nodemanager.bootstrap import WATCH_SECONDS
        if self["engine-watch"] is None:
            self["engine-watch"] = WATCH_SECONDS
        elif not 0.1 <= self["engine-watch"] <= 3600:
            raise usage.UsageError(f"--engine-watch must be 0.1..3600 seconds, not {self['engine-watch']:g}")
        if self["engine"]:
            from dsmt.transports.psepr.accounts import read_password
            if not self["engine-router"]:
                raise usage.UsageError("--engine: the engines report over PsEPR; give --router or --engine-router")
            try:
                self["engine-password"] = read_password(self["engine-password-file"] or self["password-file"])
            except OSError as exc:
                raise usage.UsageError(f"--engine-password-file: {exc}")
        else:
            self["engine-password"] = None


class NodeManagerOptions(_NodeOptions):
    synopsis = "--node NAME --ticket-ca CA.pem (--ca CA.pem | --allow-unsigned) (--http STRPORT | --router URL)"
    longdesc = __doc__
    optParameters = [["node", "n", None, "this node's address as tickets name it (IP address or host name)"]]

    def postOptions(self):
        super().postOptions()
        from dsmt.server.slicemanager.spec import SliceSpecError, normalize_node_address
        if not self["node"]:
            raise usage.UsageError("give --node (the address tickets name this node by)")
        try:
            self["node"] = normalize_node_address(self["node"])
        except SliceSpecError as exc:
            raise usage.UsageError(str(exc))


class FarmOptions(_NodeOptions):
    synopsis = "--nodes N --ticket-ca CA.pem (--ca CA.pem | --allow-unsigned) --http STRPORT [--router URL]"
    longdesc = __doc__
    optParameters = [
        ["nodes", None, 10, "how many node managers to host", int],
        ["name", None, "n{n:03d}.farm.test", "node name pattern ({n} counts from 1)"],
        ["first", None, 1, "first value of {n}", int],
        ["nodes-file", None, None, "write 'node slots endpoint' lines here once listening (the agent's --nodes)"],
        ["public-base", None, None, "base URL the endpoints are written with (default http://127.0.0.1:PORT)"],
    ]

    def postOptions(self):
        super().postOptions()
        from dsmt.server.slicemanager.spec import SliceSpecError, normalize_node_address
        if not 1 <= self["nodes"] <= MAX_FARM_NODES:
            raise usage.UsageError(f"--nodes must be 1..{MAX_FARM_NODES}, not {self['nodes']}")
        if not self["http"]:
            raise usage.UsageError("a farm needs --http (its endpoints are written to --nodes-file)")
        try:
            names = [self["name"].format(n=n) for n in range(self["first"], self["first"] + self["nodes"])]
            self["node-names"] = [normalize_node_address(name) for name in names]
        except (KeyError, IndexError, ValueError, SliceSpecError) as exc:
            raise usage.UsageError(f"--name {self['name']!r}: {exc}")
        if len(set(self["node-names"])) != len(names):
            raise usage.UsageError(f"--name {self['name']!r} gives the same name to several nodes: put {{n}} in it")


# ------------------------------------------------------------------ assembly

class ForkServerService(service.Service):
    """Runs the process's engine fork server (``dsmt.server.nodemanager.forkserver``) with the host: started
    with it, so its imports are done before the first sliver needs an engine; stopped with it (the
    engines it started keep running, as exec'd ones do)."""

    def __init__(self, fork_server):
        self.fork_server = fork_server

    def startService(self):
        super().startService()
        try:
            self.fork_server.start()
        except OSError as exc:  # engines are then exec'd (EngineBootstrap falls back)
            log.error("the engine fork server did not start: {error}", error=exc)

    def stopService(self):
        self.fork_server.close()
        return super().stopService()


def _fork_server(options):
    """The engine fork server all node managers of this process share, when engines are started by fork."""
    if not options["engine"] or options["engine-exec"]:
        return None
    from dsmt.server.deployment.daemon import PRELOAD_MODULES
    from dsmt.server.nodemanager.forkserver import ForkServer
    return ForkServer(PRELOAD_MODULES)


def _host_nodes(options, names: list[str], state_dirs: list[str], paths: list[str], reactor) -> ServiceHost:
    from dsmt.server.nodemanager.service import SERVICE_NAME, TNS, nodemanager_service
    host = ServiceHost(http=options["http"], soap_version=options["soap-version"], reactor=reactor)
    fork_server = _fork_server(options)
    if fork_server is not None:
        ForkServerService(fork_server).setServiceParent(host)
    top_nodes = []
    for name, state_dir, path in zip(names, state_dirs, paths):
        connection = options.new_connection(instance=name)
        node = build_node(name, state_dir, options["ticket-trust"], capacity=options["capacity"],
                          connection=connection, clock=reactor.seconds, max_lease_seconds=options["max-lease"],
                          issuers=[options["issuer"]] if options["issuer"] else None)
        bootstrap = _bootstrap(options, node, connection, fork_server)
        runner = NodeManagerService(node, None, clock=reactor, agent=options["agent"], capacity=options["capacity"],
                                    signer=_signer(options), bootstrap=bootstrap)
        resource = NodeManagerResource(node, state_dir, running=lambda runner=runner: runner.running)
        hosted = host.add([nodemanager_service(_Poking(node, runner.reaper, bootstrap, reactor))], TNS, SERVICE_NAME,
                          path=path,
                          public_url=_public_url(options, path), policy=options.new_policy(),
                          connection=connection, resource=resource,
                          manage_http=options["manage-http"] if len(names) == 1 else None,
                          manage_psepr=options["manage-psepr"])
        runner.hosted = hosted
        runner.setServiceParent(hosted)
        top_nodes.append(runner)
    host.node_runners = top_nodes
    return host


def _bootstrap(options, node, connection, fork_server=None):
    """The sliver bootstrap when ``--engine`` asks for it (``dsmt.server.nodemanager.bootstrap``)."""
    if not options["engine"]:
        return None
    from dsmt.server.nodemanager.bootstrap import EngineBootstrap, EngineSettings
    settings = EngineSettings(router=options["engine-router"], password=options["engine-password"],
                              ca=options["engine-ca"], http=bool(options["engine-http"]), extra=options["engine-args"],
                              watch_seconds=options["engine-watch"])
    return EngineBootstrap(node.backend, node.node, settings, event_publisher(connection, log, node.node),
                           spawner=fork_server)


def _signer(options):
    """The node manager signs its registration with its own certificate when it has one."""
    if options["signing-key"] is None:
        return None
    from dsmt.transports.soap.wssec import Signer
    return Signer(options["signing-key"], options["signing-cert"])


def _public_url(options, path: str) -> str | None:
    """The URL the options give the service at ``path`` (``--public-url``, or ``--public-base`` + path)."""
    if options.get("public-url"):
        return options["public-url"]
    if options.get("public-base"):
        return f"{options['public-base'].rstrip('/')}/{path}"
    return None


def _endpoint_for(options, host: ServiceHost, path: str):
    """The endpoint registered and written to the nodes file: the public URL, else the listening port's."""
    def endpoint() -> str:
        return _public_url(options, path) or f"http://127.0.0.1:{host.ports[0].getHost().port}/{path}"
    return endpoint


def _after_listening(options, host: ServiceHost, paths: list[str]) -> None:
    def listening(_):
        lines = []
        for runner, path in zip(host.node_runners, paths):
            runner.endpoint = _endpoint_for(options, host, path)
            lines.append(f"{runner.node.node} {options['capacity']} {runner.endpoint()}\n")
        if options.get("nodes-file"):
            temporary = options["nodes-file"] + ".tmp"
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.writelines(lines)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, options["nodes-file"])
            log.info("{count} node managers listening; endpoints in {path}", count=len(lines),
                     path=options["nodes-file"])
        for runner in host.node_runners:
            runner.register()

    def failed(failure):
        log.error("node managers not started: {error}", error=failure.getErrorMessage())
        stop_daemon_failed(host.reactor)  # logged by the host; a daemon that cannot serve exits 1
    host.when_listening().addCallbacks(listening, failed)


class _Starter(service.Service):
    """Arms the after-listening step when the host starts (a host must start before it listens)."""

    def __init__(self, options, host, paths):
        self.options, self.host, self.paths = options, host, paths

    def startService(self):
        super().startService()
        _after_listening(self.options, self.host, self.paths)


def makeService(options, reactor=None) -> service.Service:
    if reactor is None:
        from twisted.internet import reactor
    if isinstance(options, FarmOptions):
        names = options["node-names"]
        state_dirs = [os.path.join(options["state-dir"], name) for name in names]
        paths = [f"nodemanager/{name}" for name in names]
    else:
        names = [options["node"]]
        state_dirs = [options["state-dir"]]
        paths = ["nodemanager"]
    host = _host_nodes(options, names, state_dirs, paths, reactor)
    _Starter(options, host, paths).setServiceParent(host)
    return host


#: twistd reads ``Options`` and ``makeService`` of the module its ServiceMaker names.
Options = NodeManagerOptions

"""``twistd dsmt-engine``: the deployment engine of one sliver, as a daemon.

::

    twistd -n dsmt-engine --slice xyz1 --host planetlab5.nbgisp.com --home /home/xyz1 \\
        --state /home/xyz1/.deploy/engine.sqlite --allow-unsigned --http tcp:8093:interface=127.0.0.1 \\
        --router psepr://router:23345 --password-file xyz1_mgr.pw [--package-root /srv/packages] \\
        [--descriptors DIR] [--resend-interval 60]

The SOAP options are :class:`~dsmt.server.hosting.HostingOptions`'; the service is
``DeploymentService`` (``dsmt.server.deployment.service``) at ``/deployment`` and, over PsEPR, instance
``<host>`` of service ``deployment.<slice>`` (one multicast reaches every engine of the slice).
Its own options:

=========================  =====================================================================
``--slice S``              the sliver's slice (required)
``--host H``               this node's address, as status events and commands name it (required;
                           normalised); it is also the PsEPR instance
``--home DIR``             the sliver's home: packages, unpacked trees, logs (required; must exist)
``--state FILE``           the engine's SQLite state (required; created if missing)
``--descriptors DIR``      staged descriptors for APPCONFIG (default: ``<state>.staged``)
``--package-root DIR``     a directory ``file://`` package URLs may read from (repeatable; default:
                           none, so ``file://`` URLs are refused)
``--resend-interval S``    seconds between re-sends of an unchanged status (default 60; at most
                           ``STATUS_EXPIRE``, so a status never lapses between two re-sends)
=========================  =====================================================================

**PsEPR account.**  The router delivers an event addressed to service S only to connections
logged in as S; status events and commands of a slice are addressed to ``<slice>_mgr``
(docs/dslice.md).  So the engine logs in as its slice's account, ``<slice>_mgr``
(``--psepr-service`` overrides it; ``--password-file`` is that account's password), on one
connection that publishes the status events, holds the command channel's lease and serves SOAP.

**Start-up** (:class:`EngineDaemon`), publishing its own installation as reference 000's
``org.dsmt.component.sliver-bootstrap`` reports ``org.dsmt.component.deployment-agent``:

1. ``requested`` — the daemon starts; ``instantiated`` — the engine and its store are open;
2. the engine recovers what it had deployed (``Engine.recover``, operations Busy meanwhile) →
   ``initialized`` (``failed`` if recovery failed: logged, the daemon still serves);
3. the HTTP endpoints listen → ``installed``;
4. the command channel's lease is granted (without ``--router``: at once) → ``running``: the
   engine now waits for APPCONFIG.

The bootstrap status is re-sent every ``--resend-interval`` seconds (one timer, re-armed; the
application's own status is re-sent by the engine).  Commands arriving on
``/org/dsmt/ns/deployment/<slice>/org.dsmt.component.deployment-agent/command/`` are judged
(``commands.judge``) and queued (``service.Operations.received``).

**Manageability** (:class:`EngineResource`): the application and its state, each component's state
and restarts (``State.<component>``, ``Restarts.<component>``), counts of components per state,
restarts in all, channel commands run / ignored / refused.  Stopping the daemon leaves the
application's processes running: the next start re-adopts them.
"""
from __future__ import annotations

import os
from typing import Mapping

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from dsmt.server.deployment.commands import command_channel
from dsmt.server.deployment.engine import RESEND_SECONDS, Engine
from dsmt.server.deployment.lifecycle import FAILED, PROGRESS, TERMINATED
from dsmt.server.deployment.service import (
    HTTP_PATH, NAME, PSEPR_SERVICE, TNS, Operations, StagedDescriptors, deployment_service, psepr_service_for,
)
from dsmt.server.hosting import HostingOptions, ServiceHost, event_publisher, stop_daemon_failed
from dsmt.server.manage.wsdm import ManageableResource, OperationalStatus, resource_id_for
from dsmt.server.statusevents import (
    DEPLOYMENT_AGENT, SLIVER_BOOTSTRAP, STATUS_EXPIRE, deployment_status, manager_service,
)

__all__ = ["Options", "EngineDaemon", "EngineResource", "makeService", "COMMAND_LEASE_SECONDS",
           "BOOTSTRAP_STATES", "PRELOAD_MODULES"]

log = Logger(namespace="dsmt.engine")

#: Seconds asked for the command channel's lease; the connection renews it at 80 %, so this only bounds
#: how long the router keeps delivering commands to an engine that died.
COMMAND_LEASE_SECONDS = 600
#: What an engine imports by the time it runs, beyond this module: the fork server that starts engines
#: (``dsmt.server.nodemanager.forkserver``) imports these once, so a forked engine does not.  None of them
#: may install a reactor at import (the fork server checks).  A module missing here is only imported by
#: each engine itself: slower, never wrong.
PRELOAD_MODULES = (
    "dsmt.server.deployment.daemon", "dsmt.server.deployment.fetch", "dsmt.server.deployment.store",
    "dsmt.server.manage.daemons", "dsmt.transports.http", "dsmt.transports.psepr_soap",
    "dsmt.transports.psepr.backend_router", "dsmt.transports.soap.zeepsupport",
    "twisted.application.internet", "twisted.application.strports", "twisted.internet.epollreactor",
    "twisted.web.server", "twisted.web.client", "treq", "zeep", "sqlite3",
)
#: The engine's own installation, in the order it is published (reference 000's sliver-bootstrap).
BOOTSTRAP_STATES = ("requested", "instantiated", "initialized", "installed", "running")


class Options(HostingOptions):
    synopsis = ("--slice S --host H --home DIR --state FILE (--ca FILE | --allow-unsigned) "
                "(--http STRPORT | --router URL)")
    longdesc = __doc__
    psepr_name = PSEPR_SERVICE
    optParameters = [
        ["slice", "s", None, "the sliver's slice"],
        ["host", None, None, "this node's address, as events and commands name it"],
        ["home", None, None, "the sliver's home directory (must exist)"],
        ["state", None, None, "the engine's SQLite state file (created if missing)"],
        ["descriptors", None, None, "directory of staged descriptors (default: <state>.staged)"],
        ["resend-interval", None, RESEND_SECONDS, f"seconds between status re-sends (more than 0, at most "
                                                  f"{STATUS_EXPIRE})", float],
    ]

    def __init__(self):
        super().__init__()
        self["package-root"] = []

    def opt_package_root(self, path):
        """a directory file:// package URLs may read from (repeatable)"""
        self["package-root"].append(os.path.abspath(path))

    def postOptions(self):
        from dsmt.server.slicemanager.spec import SliceSpecError, check_slice_name, normalize_node_address
        for name in ("slice", "host", "home", "state"):
            if not self[name]:
                raise usage.UsageError(f"give --{name}")
        try:
            self["slice"] = check_slice_name(self["slice"])
            self["host"] = normalize_node_address(self["host"])
        except SliceSpecError as exc:
            raise usage.UsageError(str(exc))
        if not os.path.isdir(self["home"]):
            raise usage.UsageError(f"--home {self['home']!r} is not a directory")
        for root in self["package-root"]:
            if not os.path.isdir(root):
                raise usage.UsageError(f"--package-root {root!r} is not a directory")
        if not 0 < self["resend-interval"] <= STATUS_EXPIRE:
            raise usage.UsageError(f"--resend-interval must be more than 0 and at most {STATUS_EXPIRE} s (the "
                                   f"status events' expiry), not {self['resend-interval']:g}")
        self["descriptors"] = self["descriptors"] or self["state"] + ".staged"
        self["psepr-service"] = self["psepr-service"] or manager_service(self["slice"])
        self["instance"] = self["host"]
        super().postOptions()


# ------------------------------------------------------------------ the daemon

class EngineDaemon(service.Service):
    """Start-up, the bootstrap status and the command channel (module docstring).

    ``host``: the :class:`ServiceHost` (its ``when_listening``); ``connection``: the PsEPR connection
    (None: no commands, events logged); ``clock``: the re-send timer's.  ``started`` fires once the
    engine is ``running`` (tests wait on it); ``bootstrap`` is the state last published.
    """

    def __init__(self, engine: Engine, operations: Operations, host: ServiceHost, *, connection=None, clock=None,
                 resend_interval: float = RESEND_SECONDS):
        self.engine, self.operations, self.host = engine, operations, host
        self.connection = connection
        self.clock = clock or host.reactor
        self.resend_interval = resend_interval
        self.publish = engine.publish
        self.bootstrap: str | None = None
        self.lease = None
        self.started: defer.Deferred = defer.Deferred()
        self._resend = None
        self._run: defer.Deferred | None = None

    def _report(self, state: str) -> None:
        self.bootstrap = state
        self._send()

    def _send(self) -> None:
        """Publish the bootstrap state and re-arm the one re-send timer."""
        if self._resend is not None and self._resend.active():
            self._resend.cancel()
        self._resend = None
        self.publish(deployment_status(self.engine.slice_name, self.engine.host, SLIVER_BOOTSTRAP, DEPLOYMENT_AGENT,
                                       self.bootstrap))
        if self.running:
            self._resend = self.clock.callLater(self.resend_interval, self._send)

    def startService(self):
        super().startService()
        self._report("requested")
        self._report("instantiated")
        self._run = defer.ensureDeferred(self._start())
        self._run.addErrback(self._not_started)

    @staticmethod
    def _not_started(failure) -> None:
        if not failure.check(defer.CancelledError):   # cancelled: the daemon stopped first
            log.failure("the engine did not start", failure)

    async def _start(self) -> None:
        try:
            report = await self.operations.recover()
        except Exception:  # noqa: BLE001 — a store that cannot be read: reported and logged, still served
            log.failure("recovery failed")
            self._report(FAILED)
            return
        if report is not None and not report.ok:
            for failure in report.failures:
                log.warn("recovery: {action} of {component} failed ({code}): {reason}", action=failure.action,
                         component=failure.component, code=failure.code, reason=failure.reason)
        self._report("initialized")
        await self.host.when_listening()
        self._report("installed")
        if self.connection is not None:
            self.lease = self.connection.lease(command_channel(self.engine.slice_name), COMMAND_LEASE_SECONDS,
                                               callback=self.operations.received)
            await self.lease.ready
        self._report("running")
        log.info("engine of {slice} on {host} running; waiting for commands", slice=self.engine.slice_name,
                 host=self.engine.host)
        if not self.started.called:
            self.started.callback(self)

    def stopService(self):
        if self._resend is not None and self._resend.active():
            self._resend.cancel()
        self._resend = None
        if self._run is not None and not self._run.called:
            self._run.cancel()
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        self.engine.close()
        self.engine.store.close()
        return super().stopService()


class EngineResource(ManageableResource):
    """The engine for the manageability port (module docstring).  Available; PartiallyAvailable while a
    component is failed or the PsEPR connection (when there is one) is down; Unavailable once stopped."""

    caption = "dsmt deployment engine"

    def __init__(self, engine: Engine, operations: Operations, state_path: str, *, connection=None,
                 running=lambda: True):
        from dsmt.server.manage.daemons import DSMT_VERSION
        self.engine, self.operations, self.connection, self.running = engine, operations, connection, running
        self.resource_id = resource_id_for("deployment-engine", engine.slice_name, engine.host,
                                           os.path.abspath(state_path))
        self.description = (f"deployment engine of slice {engine.slice_name} on {engine.host} "
                            f"(state in {state_path})")
        self.version = DSMT_VERSION

    def operational_status(self) -> OperationalStatus:
        if not self.running():
            return OperationalStatus.UNAVAILABLE
        if self.connection is not None and not self.connection.connected:
            return OperationalStatus.PARTIALLY_AVAILABLE
        if FAILED in self.engine.status().values():
            return OperationalStatus.PARTIALLY_AVAILABLE
        return OperationalStatus.AVAILABLE

    def metrics(self) -> Mapping[str, int | str | bool]:
        from dsmt.server.manage.daemons import camel
        engine = self.engine
        details = engine.details()
        application = engine.application
        values: dict[str, int | str | bool] = {
            "Application": engine.descriptor.application.name if engine.descriptor is not None else "",
            "ApplicationState": (application.state if application is not None else None) or "undefined",
            "Busy": self.operations.busy,
            "Components": len(details),
        }
        for state in PROGRESS + (FAILED, TERMINATED):
            values["Components" + camel(state)] = sum(1 for info in details.values() if info["state"] == state)
        values["Restarts"] = sum(info["restarts"] for info in details.values())
        for name in ("run", "ignored", "refused"):
            values["Commands" + camel(name)] = self.operations.counts[name]
        for name, info in details.items():
            values[f"State.{name}"] = info["state"] or "undefined"
            values[f"Restarts.{name}"] = info["restarts"]
        return values


def makeService(options: Options, reactor=None) -> ServiceHost:
    """The engine's :class:`ServiceHost` (``host.engine``, ``host.operations``, ``host.daemon``,
    ``host.manage``; the hosted service is ``host.hosted[0]``).  The daemon stops, with the reason
    logged, when ``--http`` cannot listen."""
    if reactor is None:
        from twisted.internet import reactor
    from dsmt.server.deployment.fetch import Fetcher
    from dsmt.server.deployment.store import Store
    connection = options.new_connection()
    store = Store(options["state"])
    engine = Engine(options["slice"], options["host"], options["home"], store, event_publisher(connection, log),
                    reactor=reactor, fetcher=Fetcher(reactor=reactor, file_roots=tuple(options["package-root"])),
                    resend_interval=options["resend-interval"])
    operations = Operations(engine, StagedDescriptors(options["descriptors"]))
    host = ServiceHost(http=options["http"], soap_version=options["soap-version"], reactor=reactor)
    daemon = EngineDaemon(engine, operations, host, connection=connection, resend_interval=options["resend-interval"])
    resource = EngineResource(engine, operations, options["state"], connection=connection,
                              running=lambda: daemon.running)
    hosted = host.add([deployment_service(operations)], TNS, NAME, path=HTTP_PATH,
                      psepr_service=psepr_service_for(options["slice"]), public_url=options["public-url"],
                      policy=options.new_policy(), connection=connection, resource=resource,
                      manage_http=options["manage-http"], manage_psepr=options["manage-psepr"])
    daemon.setServiceParent(hosted)
    host.engine, host.operations, host.daemon, host.manage = engine, operations, daemon, resource

    def cannot_listen(failure):
        stop_daemon_failed(host.reactor)  # logged by the host; a daemon that cannot serve exits 1

    def listening(ports):
        if ports:  # where callers reach it over HTTP (a port chosen by the kernel is known only now)
            _write_endpoint(options["state"], options["public-url"] or f"http://127.0.0.1:{ports[0]}/{HTTP_PATH}")
    host.when_listening().addCallbacks(listening, cannot_listen)
    return host


#: Next to the state file: the URL of the engine's HTTP endpoint, once it listens (a sliver's engine gets a
#: port chosen by the kernel; its node manager and benchmarks read the URL here).
ENDPOINT_SUFFIX = ".url"


def _write_endpoint(state: str, url: str) -> None:
    from dsmt.server.atomicfile import write_atomic
    try:
        write_atomic(state + ENDPOINT_SUFFIX, (url + "\n").encode("ascii"), 0o644)
    except OSError as exc:
        log.warn("the HTTP endpoint's URL could not be written: {error}", error=exc)

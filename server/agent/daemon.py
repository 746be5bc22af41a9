"""``twistd dsmt-agent``: the agent daemon — advertises nodes, issues signed tickets, over SOAP/HTTP and PsEPR.

::

    twistd -n dsmt-agent --key agent.key --cert agent.pem --ca ca.pem \\
        --http tcp:8090:interface=127.0.0.1 [--nodes nodes.txt] [--db agent.sqlite] \\
        [--router psepr://127.0.0.1:23345 --password-file agent.pw] [--ticket-validity 3600]

``--key``/``--cert`` (required) sign the tickets — and the SOAP replies when
``--ca`` is given; the other SOAP options are :class:`~dsmt.server.hosting.
HostingOptions`' (``--allow-unsigned``, ``--soap12``, ``--manage-http``…).
The service is ``AgentService`` (``dsmt.server.agent.service``) at
``/agent`` and on PsEPR service ``agent``.

``--nodes FILE``: one node per line, ``node slots [endpoint]`` (blank lines
and ``#`` comments ignored), e.g. ``141.213.4.201 4 http://141.213.4.201:8091/nodemanager``.
Read at every start; a line overrides what the database holds for its node
(an endpoint left out keeps the one known).  A bad line stops the daemon
with a usage error naming the line.

State (``--db``, SQLite, default :data:`DEFAULT_DB`): the nodes (capacity,
endpoint) — from the file and from ``Register`` — and the reservations the
issued tickets hold, written in one transaction per request
(:class:`SqliteRegistry`) before the reply leaves.  A restart, kill -9
included, keeps both: the agent never promises a reserved slot twice.
Reservations that ended while the agent was down are dropped when it starts.
WAL journal with ``synchronous=NORMAL``: a killed process loses nothing; a
power failure may lose the last transactions (slots then look free too early
— the node manager's admission control still refuses an over-full node).
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from typing import Iterator

from twisted.application import service
from twisted.python import usage

from dsmt.server.agent.core import (
    DEFAULT_TICKET_VALIDITY, MAX_NODES, MAX_SLOTS, MAX_TICKET_VALIDITY, Agent, NodeRegistry, RegistryError)
from dsmt.server.agent.service import HTTP_PATH, NAME, PSEPR_SERVICE, TNS, agent_service
from dsmt.server.hosting import HostingOptions, ServiceHost, host_service, stop_daemon_failed
from dsmt.server.manage.wsdm import ManageableResource, OperationalStatus, resource_id_for

__all__ = ["DEFAULT_DB", "MAX_NODES_FILE_BYTES", "SqliteRegistry", "AgentResource", "read_nodes_file", "Options",
           "makeService"]

#: The state database unless ``--db`` says otherwise (relative to the daemon's directory).
DEFAULT_DB = "agent.sqlite"
#: Largest ``--nodes`` file read: MAX_NODES lines of ~100 characters (address, slots, endpoint URL).
MAX_NODES_FILE_BYTES = MAX_NODES * 128


class SqliteRegistry(NodeRegistry):
    """A :class:`NodeRegistry` that writes every change through to SQLite and reloads it at start.

    Writes happen inside :meth:`atomic` (one transaction per request: ``IssueTickets`` reserving for
    many nodes commits once) or, outside it, one statement at a time.  ``clock``: POSIX seconds, for
    dropping the reservations that ended while the agent was down.
    """

    def __init__(self, path: str, clock=time.time, *, max_nodes: int = MAX_NODES):
        super().__init__(max_nodes=max_nodes)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit; atomic() opens transactions
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS nodes (node TEXT PRIMARY KEY, slots INTEGER NOT NULL, "
                        "endpoint TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS reservations (ticket_id TEXT PRIMARY KEY, node TEXT NOT NULL, "
                        "until REAL NOT NULL)")
        now = clock()
        self.db.execute("DELETE FROM reservations WHERE until <= ?", (now,))
        capacities = {}
        for node, slots, endpoint in self.db.execute("SELECT node, slots, endpoint FROM nodes"):
            NodeRegistry.register(self, node, MAX_SLOTS, endpoint)  # room for every stored reservation first
            capacities[node] = slots
        for ticket_id, node, until in self.db.execute("SELECT ticket_id, node, until FROM reservations"):
            if node in capacities:
                NodeRegistry.reserve(self, ticket_id, node, until)
        for node, slots in capacities.items():
            NodeRegistry.register(self, node, slots)  # the real capacity: a node may now be full

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def register(self, node: str, slots: int, endpoint: str | None = None) -> str:
        address = super().register(node, slots, endpoint)
        self.db.execute("INSERT INTO nodes (node, slots, endpoint) VALUES (?, ?, ?) ON CONFLICT(node) DO UPDATE "
                        "SET slots = excluded.slots, endpoint = COALESCE(excluded.endpoint, nodes.endpoint)",
                        (address, slots, endpoint))
        return address

    def unregister(self, node: str) -> None:
        super().unregister(node)
        address = self._address(node)
        self.db.execute("DELETE FROM nodes WHERE node = ?", (address,))
        self.db.execute("DELETE FROM reservations WHERE node = ?", (address,))

    def reserve(self, ticket_id: str, node: str, until: float) -> None:
        super().reserve(ticket_id, node, until)
        self.db.execute("INSERT INTO reservations (ticket_id, node, until) VALUES (?, ?, ?)", (ticket_id, node, until))

    def release(self, ticket_id: str) -> bool:
        held = super().release(ticket_id)
        if held:
            self.db.execute("DELETE FROM reservations WHERE ticket_id = ?", (ticket_id,))
        return held


class AgentResource(ManageableResource):
    """The agent for the manageability port: metrics ``Nodes``, ``Slots`` and ``FreeSlots`` (now);
    Available, or PartiallyAvailable while its PsEPR connection (when it has one) is down."""

    caption = "dsmt agent"

    def __init__(self, agent: Agent, db_path: str):
        self.agent = agent
        self.connection = None  # set once hosted, when the agent is on PsEPR
        self.resource_id = resource_id_for("agent", agent.issuer, os.path.abspath(db_path))
        self.description = f"dsmt agent {agent.issuer}: advertises nodes and issues signed tickets"
        from dsmt.server.manage.daemons import DSMT_VERSION
        self.version = DSMT_VERSION

    def operational_status(self) -> OperationalStatus:
        if self.connection is not None and not self.connection.connected:
            return OperationalStatus.PARTIALLY_AVAILABLE
        return OperationalStatus.AVAILABLE

    def metrics(self):
        ads = self.agent.getads()
        return {"Nodes": len(ads), "Slots": sum(ad.slots for ad in ads), "FreeSlots": sum(ad.free for ad in ads)}

    def metric_names(self):
        return ("Nodes", "Slots", "FreeSlots")


def read_nodes_file(path: str) -> list[tuple[str, int, str | None]]:
    """``(node, slots, endpoint or None)`` per line of a ``--nodes`` file, each checked as ``Register``
    would; ValueError naming the file and line of the first problem."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_NODES_FILE_BYTES + 1)
    if len(data) > MAX_NODES_FILE_BYTES:
        raise ValueError(f"{path}: over {MAX_NODES_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    scratch = NodeRegistry()
    nodes = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) not in (2, 3):
            raise ValueError(f"{path}, line {number}: expected 'node slots [endpoint]', found {len(words)} words")
        node, slots, endpoint = words[0], words[1], words[2] if len(words) == 3 else None
        if not slots.isascii() or not slots.isdigit() or len(slots) > 6:
            raise ValueError(f"{path}, line {number}: slots {slots[:20]!r} is not a whole number in 0..{MAX_SLOTS}")
        try:
            nodes.append((scratch.register(node, int(slots), endpoint), int(slots), endpoint))
        except RegistryError as exc:
            raise ValueError(f"{path}, line {number}: {exc}") from None
    return nodes


class Options(HostingOptions):
    synopsis = "--key FILE --cert FILE (--ca FILE | --allow-unsigned) --http STRPORT [options]"
    longdesc = __doc__
    psepr_name = PSEPR_SERVICE
    optParameters = [
        ["nodes", None, None, "nodes file: 'node slots [endpoint]' per line"],
        ["db", "d", DEFAULT_DB, "SQLite database of nodes and reservations (created if missing)"],
        ["ticket-validity", None, DEFAULT_TICKET_VALIDITY, f"seconds a ticket may be redeemed in "
                                                           f"(1..{MAX_TICKET_VALIDITY})", int],
    ]

    def postOptions(self):
        if self["key"] is None:
            raise usage.UsageError("the agent signs tickets: give --key and --cert")
        super().postOptions()
        if not 1 <= self["ticket-validity"] <= MAX_TICKET_VALIDITY:
            raise usage.UsageError(f"--ticket-validity must be 1..{MAX_TICKET_VALIDITY} seconds, "
                                   f"not {self['ticket-validity']}")
        try:
            self["node-list"] = read_nodes_file(self["nodes"]) if self["nodes"] else []
        except (ValueError, OSError) as exc:
            raise usage.UsageError(str(exc))


class _Closing(service.Service):
    """Closes the registry's database when the daemon stops."""

    def __init__(self, registry: SqliteRegistry):
        self.registry = registry

    def stopService(self):
        self.registry.close()
        return super().stopService()


def makeService(options: Options) -> ServiceHost:
    """The agent's :class:`ServiceHost` (``host.agent``, ``host.registry``, ``host.manage``; the hosted
    service is ``host.hosted[0]``).  The daemon stops, with the reason logged, when ``--http`` cannot listen."""
    registry = SqliteRegistry(options["db"])
    with registry.atomic():
        for node, slots, endpoint in options["node-list"]:
            registry.register(node, slots, endpoint)
    agent = Agent(registry, options["signing-key"], options["signing-cert"],
                  ticket_validity=options["ticket-validity"])
    resource = AgentResource(agent, options["db"])
    services = [agent_service(agent, signed_registration=bool(options["ca"]), atomic=registry.atomic)]
    host = host_service(services, TNS, NAME, path=HTTP_PATH, resource=resource, options=options,
                        psepr_service=PSEPR_SERVICE)
    resource.connection = host.hosted[0].connection
    _Closing(registry).setServiceParent(host)
    host.agent, host.registry, host.manage = agent, registry, resource

    def cannot_listen(failure):
        stop_daemon_failed(host.reactor)  # logged by the host; a daemon that cannot serve exits 1
    host.when_listening().addErrback(cannot_listen)
    return host

"""``twistd pldb``: the PLDB daemon — records attribute events, answers queries.

::

    twistd -n pldb --router psepr://127.0.0.1:23345 --service pldb --password-file pldb.pw \\
        --db /var/lib/dsmt/pldb.sqlite --watch /org/dsmt/ns/deployment/

PLDB holds an attribute-typed lease on every ``--watch`` channel (default
``/org/dsmt/ns/``) and stores the newest value of each (channel, field).  It
holds a query-typed lease on ``--query-channel`` (default
:data:`QUERY_CHANNEL`) and answers each query on the reply channel it names
(see ``dsmt.transports.psepr.pldbwire``).  ``psepr query CHANNEL`` is the
command-line face.
"""
from __future__ import annotations

import os

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from dsmt.transports.psepr.client import ConnectionClosed, PsEPRConnection
from dsmt.transports.psepr.event import ATTRIBUTE_NS, Event, EventError
from dsmt.transports.psepr.pldbwire import PLDBGET_NS, PldbAttr, parse_query, reply_parts
from dsmt.server.pldb.store import PldbStore
from dsmt.transports.psepr.accounts import read_password

log = Logger(namespace="dsmt.pldb")

#: Where PLDB listens for queries unless told otherwise.
QUERY_CHANNEL = "/org/dsmt/ns/pldb/query/"
#: Lease length PLDB asks for (renewed at 80 %).
LEASE_SECONDS = 600


class PldbService(service.Service):
    """Records attribute events from its leases into a :class:`PldbStore` and answers queries."""

    def __init__(self, connection: PsEPRConnection, store: PldbStore, watch: list[str],
                 query_channel: str = QUERY_CHANNEL, clock=None):
        self.connection = connection
        self.store = store
        self.watch = watch
        self.query_channel = query_channel
        self.clock = clock or connection.reactor
        self.recorded = 0
        self.answered = 0
        self.leases = []

    def startService(self):
        super().startService()
        for channel in self.watch:
            self.leases.append(self.connection.lease(channel, LEASE_SECONDS, ATTRIBUTE_NS, callback=self.record))
        self.leases.append(self.connection.lease(self.query_channel, LEASE_SECONDS, PLDBGET_NS,
                                                 callback=self.answer))
        self.connection.connect(retry=True).addErrback(self._not_connected)

    def _not_connected(self, failure) -> None:
        if not failure.check(ConnectionClosed):  # closed: we are stopping, nothing to report
            log.error("PLDB cannot connect: {error}", error=failure.getErrorMessage())

    def stopService(self):
        self.connection.close()
        self.store.close()
        return super().stopService()

    def record(self, event: Event) -> None:
        payload = event.payload
        self.store.record(PldbAttr(event.channel, payload.field, payload.value, self.clock.seconds(),
                                   event.from_service, event.from_instance, payload.expire))
        self.recorded += 1

    def answer(self, event: Event) -> None:
        try:
            query = parse_query(event.payload)
        except EventError as exc:
            log.warn("ignoring a malformed PLDB query from {sender}: {error}",
                     sender=event.from_service, error=exc)
            return
        attrs = self.store.query(query.channel, query.field, now=self.clock.seconds())
        for payload in reply_parts(query.query_id, attrs):
            self.connection.send(Event(query.reply, payload, to_service=event.from_service,
                                       to_instance=event.from_instance,
                                       from_service=self.connection.service,
                                       from_instance=self.connection.instance))
        self.answered += 1


class Options(usage.Options):
    synopsis = "--router URL --db PATH [options]"
    longdesc = __doc__
    optParameters = [
        ["router", "r", os.environ.get("PSEPR_ROUTER", "psepr://127.0.0.1:23345"),
         "router address(es), comma-separated: psepr://host:port or nats://host:port"],
        ["service", "s", "pldb", "service name PLDB logs in with"],
        ["password-file", "p", None, "file holding the service's password (first line)"],
        ["instance", "i", os.uname().nodename, "instance name"],
        ["db", "d", "pldb.sqlite", "SQLite database file (created if missing)"],
        ["query-channel", "q", QUERY_CHANNEL, "channel PLDB answers queries on"],
        ["manage-http", None, None, "strports endpoint of the manageability port (WSDM over SOAP/HTTP: "
         "/manage SOAP 1.1, /manage12 SOAP 1.2); default: none"],
    ]
    optFlags = [["manage-psepr", None, "serve manageability over PsEPR too (SOAP 1.1 and 1.2 on "
                                       "/org/dsmt/ns/soap/manageability/, on PLDB's own connection)"]]

    def __init__(self):
        super().__init__()
        self["watch"] = []

    def opt_watch(self, channel):
        """channel subtree to record (repeatable; default /org/dsmt/ns/)"""
        self["watch"].append(channel)

    def postOptions(self):
        from dsmt.transports.psepr.channel import ChannelError, validate_channel
        self["watch"] = self["watch"] or ["/org/dsmt/ns/"]
        try:
            for channel in self["watch"] + [self["query-channel"]]:
                validate_channel(channel)
            self["connection"] = PsEPRConnection.from_urls(
                self["router"], service=self["service"], instance=self["instance"],
                password=read_password(self["password-file"]))
        except (ChannelError, ValueError, OSError) as exc:
            raise usage.UsageError(str(exc))


def makeService(options) -> service.Service:
    pldb = PldbService(options["connection"], PldbStore(options["db"]), options["watch"], options["query-channel"])
    if not (options["manage-http"] or options["manage-psepr"]):
        return pldb
    from dsmt.server.manage.daemons import PldbResource, http_service, psepr_service
    top = service.MultiService()
    pldb.setServiceParent(top)
    top.pldb = pldb
    top.manage = PldbResource(pldb, options["db"])
    if options["manage-http"]:
        http_service(top.manage, options["manage-http"]).setServiceParent(top)
    if options["manage-psepr"]:
        psepr_service(top.manage, pldb.connection).setServiceParent(top)
    return top

"""``twistd psepr-router``: the embedded PsEPR router as a daemon.

::

    psepr passwd xyz1_mgr < secret.txt >> accounts      # one name:hash line per service
    twistd -n psepr-router --listen tcp:23345:interface=127.0.0.1 --accounts accounts

``--listen`` takes strports endpoint strings (repeatable), so TLS works too:
``--listen ssl:23346:privateKey=key.pem:certKey=cert.pem``.  Counters are
logged every ``--stats-interval`` seconds and published on
``/org/dsmt/ns/psepr/router/stats/`` (``psepr listen /org/dsmt/ns/psepr/router/``).

Manageability: ``--manage-http ENDPOINT`` serves WSDM over SOAP/HTTP;
``--manage-psepr`` answers on ``/org/dsmt/ns/soap/manageability/`` (SOAP 1.1
and 1.2, instance = ``--name``).  The router has no client connection of its
own, so for ``--manage-psepr`` it logs in to itself: over loopback to the port
of the first TCP ``--listen`` endpoint (``tcp:`` or ``tcp6:``; an interface of
0.0.0.0/:: is reached at 127.0.0.1/::1), as the internal account
``psepr-router-manage`` whose random password is made at start and kept in
memory only (never in the accounts file).  Without a TCP listener the flag is
refused.  The internal connection counts in the router's counters like any.
"""
from __future__ import annotations

import os
import secrets

from twisted.application import service, strports
from twisted.application.internet import TimerService
from twisted.logger import Logger
from twisted.python import usage

from dsmt.transports.psepr.accounts import Accounts, AccountsError
from dsmt.transports.psepr.leasetable import DEFAULT_MAX_LEASE_SECONDS
from dsmt.transports.psepr.router import (
    DEFAULT_MAX_OUTPUT_BUFFER, DEFAULT_PORT, LOGIN_TIMEOUT, RouterFactory, check_router_name)

log = Logger(namespace="dsmt.psepr.router")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = __doc__
    optParameters = [
        ["accounts", "a", None, "accounts file of name:hash lines (see `psepr passwd`)"],
        ["max-lease", None, DEFAULT_MAX_LEASE_SECONDS, "longest lease granted, seconds", int],
        ["max-output-buffer", None, DEFAULT_MAX_OUTPUT_BUFFER,
         "bytes a client may leave unread before it is disconnected as a slow consumer", int],
        ["stats-interval", None, 10.0, "seconds between counter reports (0: never)", float],
        ["login-timeout", None, float(LOGIN_TIMEOUT), "seconds a new connection has to log in", float],
        ["name", None, os.uname().nodename, "router name (instance in the events it writes)"],
        ["manage-http", None, None, "strports endpoint of the manageability port (WSDM over SOAP/HTTP: "
         "/manage SOAP 1.1, /manage12 SOAP 1.2); default: none"],
    ]
    optFlags = [["allow-anonymous", None, "accept any login (no accounts file); for local experiments only"],
                ["manage-psepr", None, "serve manageability over PsEPR too (SOAP 1.1 and 1.2 on "
                                       "/org/dsmt/ns/soap/manageability/): the router logs in to its first TCP "
                                       "--listen endpoint over loopback with an internal account"]]

    def __init__(self):
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description):
        """strports endpoint to listen on (repeatable; default tcp:23345)"""
        self["listen"].append(description)

    def postOptions(self):
        if not self["listen"]:
            self["listen"] = [f"tcp:{DEFAULT_PORT}"]
        if self["accounts"] is None and not self["allow-anonymous"]:
            raise usage.UsageError("--accounts FILE is required (or --allow-anonymous for local experiments)")
        if self["accounts"] is not None:
            try:
                self["accounts-loaded"] = Accounts.load(self["accounts"])
            except (OSError, AccountsError) as exc:
                raise usage.UsageError(f"cannot use accounts file {self['accounts']}: {exc}")
        else:
            self["accounts-loaded"] = None
        if self["max-lease"] < 1:
            raise usage.UsageError("--max-lease must be at least 1 second")
        if self["max-output-buffer"] < 1:
            raise usage.UsageError("--max-output-buffer must be at least 1 byte")
        if not self["login-timeout"] > 0:
            raise usage.UsageError("--login-timeout must be more than 0 seconds")
        try:
            check_router_name(self["name"])
        except ValueError as exc:
            raise usage.UsageError(f"--name: {exc}")
        if self["manage-psepr"]:
            self["manage-psepr-listen"] = first_tcp_listen(self["listen"])
            if self["manage-psepr-listen"] is None:
                raise usage.UsageError(
                    "--manage-psepr needs a TCP --listen endpoint (tcp:PORT or tcp6:PORT, e.g. "
                    "--listen tcp:23345:interface=127.0.0.1): the router logs in to itself over loopback; "
                    f"the endpoints given are {', '.join(self['listen'])}")
            accounts = self["accounts-loaded"]
            if accounts is not None and MANAGE_ACCOUNT in accounts:
                raise usage.UsageError(f"--manage-psepr: the accounts file must not hold {MANAGE_ACCOUNT!r}, the "
                                       "router's internal account")


#: The account the router's own manageability connection logs in as (``--manage-psepr``).
MANAGE_ACCOUNT = "psepr-router-manage"
#: Loopback addresses for a listener bound to every interface.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def first_tcp_listen(listen: list[str]) -> int | None:
    """The index of the first ``tcp:``/``tcp6:`` strports description in ``listen``, or None."""
    for index, description in enumerate(listen):
        if description.split(":", 1)[0].strip().lower() in ("tcp", "tcp6"):
            return index
    return None


class LoopbackManagement(service.MultiService):
    """``--manage-psepr``: once ``listening`` (the strports service of a TCP ``--listen``) has its port, a
    :class:`PsEPRConnection` to that port over loopback, as ``account``/``password``, instance
    ``instance``, carrying the manageability endpoint (``server.manage.daemons.psepr_service``).
    ``connection`` and ``endpoint`` are set once the port is known."""

    def __init__(self, resource, listening, *, account: str, password: str, instance: str):
        super().__init__()
        self.resource, self.listening = resource, listening
        self.account, self.password, self.instance = account, password, instance
        self.connection = self.endpoint = None

    def startService(self):
        super().startService()
        # the listener is started before us (it comes first in the parent): its port is being opened
        self.listening._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        if port is None:  # the listener failed (strports logged why): nothing to connect to
            log.error("--manage-psepr: the TCP listener did not start; manageability over PsEPR is off")
            return port
        if not self.running or self.connection is not None:
            return port
        from dsmt.server.manage.daemons import psepr_service
        from dsmt.transports.psepr.client import Address, PsEPRConnection
        host = port.getHost()
        address = Address("psepr", _LOOPBACK.get(host.host, host.host), host.port)
        self.connection = PsEPRConnection([address], service=self.account, password=self.password,
                                          instance=self.instance)
        self.endpoint = psepr_service(self.resource, self.connection)
        self.endpoint.setServiceParent(self)  # leases its channel; registered once connected
        self.connection.connect(retry=True).addErrback(self._not_connected)
        return port

    @staticmethod
    def _not_connected(failure) -> None:
        from dsmt.transports.psepr.client import ConnectionClosed
        if not failure.check(ConnectionClosed):  # closed: we are stopping
            log.error("--manage-psepr: cannot log in to this router: {error}", error=failure.getErrorMessage())

    def stopService(self):
        stopped = super().stopService()
        if self.connection is not None:
            self.connection.close()
        return stopped


def makeService(options) -> service.Service:
    accounts, password = options["accounts-loaded"], None
    if options["manage-psepr"]:
        password = secrets.token_urlsafe(32)
        if accounts is not None:  # with --allow-anonymous any login works already
            accounts = accounts.with_account(MANAGE_ACCOUNT, password)
    factory = RouterFactory(accounts=accounts, max_lease=options["max-lease"],
                            max_output_buffer=options["max-output-buffer"], name=options["name"],
                            login_timeout=options["login-timeout"])
    top = service.MultiService()
    listeners = []
    for description in options["listen"]:
        listeners.append(strports.service(description, factory))
        listeners[-1].setServiceParent(top)
    if options["stats-interval"] > 0:
        TimerService(options["stats-interval"], _report, factory.core).setServiceParent(top)
    top.router = factory  # for operators and tests holding the service
    if options["manage-http"] or options["manage-psepr"]:
        from dsmt.server.manage.daemons import RouterResource, http_service  # only with --manage-*
        top.manage = RouterResource(factory, options["listen"])
        if options["manage-http"]:
            http_service(top.manage, options["manage-http"]).setServiceParent(top)
        if options["manage-psepr"]:
            top.manage_psepr = LoopbackManagement(top.manage, listeners[options["manage-psepr-listen"]],
                                                  account=MANAGE_ACCOUNT, password=password,
                                                  instance=options["name"])
            top.manage_psepr.setServiceParent(top)
    return top


def _report(core) -> None:
    stats = core.stats()
    log.info("router counters: {counters}", counters=" ".join(f"{k}={v}" for k, v in stats.items()))
    core.publish_stats()

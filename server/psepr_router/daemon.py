"""``twistd psepr-router``: the embedded PsEPR router as a daemon.

::

    psepr passwd xyz1_mgr < secret.txt >> accounts      # one name:hash line per service
    twistd -n psepr-router --listen tcp:23345:interface=127.0.0.1 --accounts accounts

``--listen`` takes strports endpoint strings (repeatable), so TLS works too:
``--listen ssl:23346:privateKey=key.pem:certKey=cert.pem``.  Counters are
logged every ``--stats-interval`` seconds and published on
``/org/dsmt/ns/psepr/router/stats/`` (``psepr listen /org/dsmt/ns/psepr/router/``).
"""
from __future__ import annotations

import os

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
    optFlags = [["allow-anonymous", None, "accept any login (no accounts file); for local experiments only"]]

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


def makeService(options) -> service.Service:
    factory = RouterFactory(accounts=options["accounts-loaded"], max_lease=options["max-lease"],
                            max_output_buffer=options["max-output-buffer"], name=options["name"],
                            login_timeout=options["login-timeout"])
    top = service.MultiService()
    for description in options["listen"]:
        strports.service(description, factory).setServiceParent(top)
    if options["stats-interval"] > 0:
        TimerService(options["stats-interval"], _report, factory.core).setServiceParent(top)
    top.router = factory  # for operators and tests holding the service
    if options["manage-http"]:
        from dsmt.server.manage.daemons import RouterResource, http_service  # only with --manage-http
        top.manage = RouterResource(factory, options["listen"])
        http_service(top.manage, options["manage-http"]).setServiceParent(top)
    return top


def _report(core) -> None:
    stats = core.stats()
    log.info("router counters: {counters}", counters=" ".join(f"{k}={v}" for k, v in stats.items()))
    core.publish_stats()

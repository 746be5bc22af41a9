"""``twistd -n psepr-router`` without twistd: the same service, for the benchmark (optionally profiled).

Run: ``python bench/_psepr_router.py [--cprofile FILE] [psepr-router options]``, e.g.
``--listen tcp:0:interface=127.0.0.1 --accounts FILE``.  It parses the
daemon's own options (``daemon.Options``), builds the daemon's own
service (``daemon.makeService``) and runs the reactor, logging to
stdout as ``twistd -n`` does.  The benchmark uses it when the twistd dropin
is not installed (``PYTHONPATH=.dev`` runs of the working tree) and whenever
it profiles the router: SIGTERM stops the reactor and the cProfile statistics
are written to ``--cprofile FILE``.
"""
from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver

from dsmt.server.psepr_router import daemon


def main(argv: list[str]) -> int:
    profile = None
    if argv[:1] == ["--cprofile"]:
        profile, argv = argv[1], argv[2:]
    options = daemon.Options()
    options.parseOptions(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    service = daemon.makeService(options)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    if profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.runcall(reactor.run)
        profiler.dump_stats(profile)
    else:
        reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

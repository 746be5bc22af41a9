"""``createslice`` time against node count, over HTTP and over PsEPR, split into tickets / leases / slivers.

Setup: a local testbed (``dsmt.client.testbed``: PsEPR router, agent and
``--farms`` node farms hosting ``--nodes`` node managers, each a separate
process on 127.0.0.1, certificates from ``dsmt-pki``).  The slice manager core
(what ``svm`` runs) drives them from this process with ``svm``'s own adapters
(``dsmt.server.slicemanager.remote``), signing every request with the user's
certificate and verifying every signed reply, at ``svm``'s default
parallelism (``-p 16``) unless ``--parallelism`` says otherwise:

* tickets — ``newtickets``: one agent call (the agent signs one ticket per node);
* leases  — ``newleases``: ``Redeem`` on every node;
* slivers — ``newvms``: ``CreateSliver`` on every node (sandbox, keys, events);

then ``deleteslice`` (not timed).  For each node count 1, 10, 50, 100, 200
(``--counts``) and each transport, ``--rounds`` slices are created and the
median round is printed.  Memory: the resident set of every farm process
after the runs, divided by the nodes it hosts, next to a farm of one node
started the same way (the fixed cost of a process).  One line per count shows
the curve's growth (seconds per node).

Bar (issue 4): 200 nodes in ≤ 20 s on this 2-core machine.

Run (from the repository, after ``make dev``)::

    PYTHONPATH=.dev .venv/bin/python bench/createslice.py                 # ~2 min
    PYTHONPATH=.dev .venv/bin/python bench/createslice.py --quick         # 1, 10, 50 nodes, one round

Exit status 0 when every measurement was taken (the verdict is printed as PASS/MISS), 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

BAR_SECONDS_200 = 20.0


def spec(name: str, numnodes: int) -> bytes:
    return f"<slice><name>{name}</name><numnodes>{numnodes}</numnodes><leaselen>3600</leaselen></slice>".encode()


def rss_mb(pid: int) -> float:
    import psutil
    return psutil.Process(pid).memory_info().rss / 1e6


def measure(bed, transports, counts, rounds: int, parallelism: int) -> dict:
    """{transport: {count: [(tickets, leases, slivers), …]}}, in one run of the reactor."""
    from twisted.internet import defer, task

    from dsmt.server.slicemanager.calls import CallOptions
    from dsmt.server.slicemanager.core import SliceManager
    from dsmt.server.slicemanager.remote import make_calls
    from dsmt.server.slicemanager.slicedir import SliceDirectory

    results: dict[str, dict[int, list]] = {}

    async def run(reactor):
        for transport in transports:
            await run_one(transport, results.setdefault(transport, {}))

    async def run_one(transport, results):
        options = CallOptions(transport=transport, agent_url=bed.agent_url, router=bed.router_url,
                              psepr_service="bench", password_file=str(bed.password_file),
                              cert=str(bed.user_cert), key=str(bed.user_key), ca=str(bed.ca))
        agent, nodes, close = make_calls(options)
        manager = SliceManager(agent, nodes, SliceDirectory(str(bed.home)), parallelism=parallelism)
        try:
            for count in counts:
                for number in range(rounds):
                    name = f"b{transport}{count}r{number}"
                    began = time.perf_counter()
                    report = await manager.newtickets(spec(name, count))
                    tickets = time.perf_counter()
                    _check(report, name, "newtickets", count)
                    files = [str(bed.slice_dir(name) / "tickets" / node) for node in report.outcomes]
                    report = await manager.newleases(name, files)
                    leases = time.perf_counter()
                    _check(report, name, "newleases", count)
                    files = [str(bed.slice_dir(name) / "leases" / node) for node in report.outcomes]
                    report = await manager.newvms(name, files)
                    slivers = time.perf_counter()
                    _check(report, name, "newvms", count)
                    results.setdefault(count, []).append((tickets - began, leases - tickets, slivers - leases))
                    report = await manager.deleteslice(name)
                    _check(report, name, "deleteslice", count)
        finally:
            await close()

    failures = []

    def main(reactor):
        return defer.ensureDeferred(run(reactor)).addErrback(failures.append)
    try:
        task.react(main)
    except SystemExit:
        pass
    if failures:
        failures[0].raiseException()
    return results


def _check(report, name: str, command: str, count: int) -> None:
    if not report.ok or (command != "newtickets" and len(report.outcomes) != count):
        problems = [f"{node}: {outcome}" for node, outcome in report.outcomes.items() if node in report.failed]
        raise RuntimeError(f"{command} {name}: {report.summary()} {problems[:3]} {report.error}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="1,10,50,100,200")
    parser.add_argument("--farms", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallelism", type=int, default=16)
    parser.add_argument("--transports", default="http,psepr")
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args(argv)
    if options.quick:
        options.counts, options.rounds = "1,10,50", 1
    counts = [int(c) for c in options.counts.split(",")]
    transports = options.transports.split(",")
    nodes = max(counts)

    from dsmt.client.testbed import Testbed
    print(f"# createslice — Python {platform.python_version()}, {os.cpu_count()} CPUs, {nodes} node managers in "
          f"{options.farms} farm processes, -p {options.parallelism}, median of {options.rounds} round(s), "
          f"signed requests and replies")
    try:
        with tempfile.TemporaryDirectory(prefix="dsmt-bench-") as directory:
            one = Testbed(os.path.join(directory, "one"), nodes=1, farms=1, transport_router=False)
            with one:
                single = rss_mb(one.farms[0].pid)
            started = time.perf_counter()
            with Testbed(os.path.join(directory, "bed"), nodes=nodes, farms=min(options.farms, nodes),
                         capacity=2) as bed:
                print(f"# testbed up in {time.perf_counter() - started:.1f} s")
                results = measure(bed, transports, counts, options.rounds, options.parallelism)
                farms = [(len(farm.nodes), rss_mb(farm.pid)) for farm in bed.farms]
    except Exception as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1

    print(f"\n{'transport':<10}{'nodes':>6}{'tickets s':>11}{'leases s':>10}{'slivers s':>11}{'total s':>9}"
          f"{'ms/node':>9}")
    totals = {}
    for transport, by_count in results.items():
        for count in counts:
            rows = sorted(by_count[count], key=sum)
            tickets, leases, slivers = rows[len(rows) // 2]
            total = tickets + leases + slivers
            totals[(transport, count)] = total
            print(f"{transport:<10}{count:>6}{tickets:>11.3f}{leases:>10.3f}{slivers:>11.3f}{total:>9.3f}"
                  f"{1000 * total / count:>9.1f}")
    print(f"\nmemory: a farm of 1 node {single:.1f} MB; " + "; ".join(
        f"farm of {n} nodes {mb:.1f} MB ({(mb - single) / max(1, n - 1):.2f} MB per further node)"
        for n, mb in farms))
    if nodes >= 200:
        for transport in transports:
            total = totals[(transport, 200)]
            print(f"200 nodes over {transport} ≤ {BAR_SECONDS_200:g} s: {total:.2f} s — "
                  f"{'PASS' if total <= BAR_SECONDS_200 else 'MISS'} ({total / BAR_SECONDS_200:.2f} of the bar)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

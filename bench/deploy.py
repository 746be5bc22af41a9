"""Deploy time against node count, and the whole create-slice-and-deploy path (issue 5's benchmark).

Setup per node count N (``--counts``, default 1, 10, 50, 100, 200): a local testbed
(``dsmt.client.testbed``) of N node managers in ``--farms`` processes, each starting a real deployment
engine (``twistd dsmt-engine``, its own process) in every new sliver, a PsEPR router, the agent, and a
package repository serving XYZ (``examples/xyz``).  Then, timed from this process:

* create  — ``svm -p 32 createslice`` of an N-node slice over the transport (signed), until it returns;
* engines — until every engine reported its own installation ``running`` (sliver-bootstrap events,
  seen by a listener as ``<slice>_mgr``): one process start per node;
* deploy  — ``Deploy`` of XYZ on every engine at once over the transport (PsEPR: the slice's engine
  service by instance; HTTP: each engine's own loopback endpoint, ``--engine-http``), one call per node
  (each XYZ gets its own port), until every engine answered a report with XYZ running (download,
  unpack, configure, start, health check);

printed side by side with the total, one row per transport (a fresh testbed for each), with the engines'
average memory after the deploy: RSS, and PSS (``/proc/<pid>/smaps_rollup``: shared pages divided among
their sharers — forked engines share their imported modules with the fork server copy-on-write).

``--engine-start exec`` makes the node managers start each engine as a fresh ``twistd``
(``--engine-exec``) instead of forking it from their fork server (the default), for comparison.

Bar (issue 5): 200 nodes created and deployed in ≤ 40 s on this 2-core machine.

    PYTHONPATH=.dev .venv/bin/python bench/deploy.py --counts 1,10,50
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BAR_SECONDS_200 = 40.0


def load_build():
    """``examples/xyz/build.py`` as a module (the demo's loader: one way to build XYZ)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from xyz1_demo import load_build as demo_load_build
    return demo_load_build()


def engines_running(events, nodes) -> bool:
    running = set()
    for event in events:
        value = getattr(event.payload, "value", "")
        if "component=org.dsmt.component.sliver-bootstrap" in value and value.endswith("status=running"):
            running.add(value.split(",", 1)[0].removeprefix("hostname="))
    return set(nodes) <= running


def deploy_all(bed, jobs, nodes, descriptor: bytes) -> dict:
    """For each (transport, slice) of ``jobs`` in turn, Deploy on every engine of the slice at once
    (``transport``: psepr, or http at each engine's own endpoint); {transport: (seconds, failed nodes)}.
    One run of the reactor for all (it cannot be restarted)."""
    from twisted.internet import defer, task

    from dsmt.client.testbed import free_port
    from dsmt.server.deployment.remote import HttpEngineCalls, PsEPREngineCalls
    from dsmt.server.slicemanager.calls import NodeRequest
    from dsmt.server.statusevents import manager_service
    from dsmt.transports.http import TreqTransport
    from dsmt.transports.psepr.client import PsEPRConnection
    from dsmt.transports.psepr_soap import PsEPRTransport
    timings: dict = {}

    async def run(reactor):
        for transport, slice_name in jobs:
            began = time.perf_counter()
            failed = await run_one(transport, slice_name)
            timings[transport] = (time.perf_counter() - began, failed)

    async def run_one(transport, slice_name) -> list[str]:
        """The engines' own call adapters (what dsmtc and plans use), one request per node: its own port."""
        connection = PsEPRConnection.from_urls(bed.router_url, service=manager_service(slice_name),
                                               instance="bench-planner",
                                               password=bed.password_file.read_text().strip())
        await connection.connect(retry=False)
        if transport == "psepr":
            carrier = PsEPRTransport(connection, timeout=300)
            await carrier.start()
            calls = PsEPREngineCalls(carrier, slice_name)
        else:
            carrier = TreqTransport(timeout=300)
            calls = HttpEngineCalls(carrier)
        requests = [NodeRequest(node, bed.engine_url(node, slice_name) or "",
                                {"descriptor": descriptor,
                                 "parameters": {"port": str(free_port()), "python": sys.executable}})
                    for node in nodes]
        try:
            outcomes = await calls.run("Deploy", requests, parallelism=len(requests), timeout=300)
        finally:
            if transport == "psepr":
                carrier.close()
            else:
                await carrier.aclose()
            connection.close()
        return [node for node, outcome in outcomes.items() if not getattr(outcome, "ok", False)]

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit:
        pass
    return timings


def engine_memory(bed, slice_name: str) -> tuple[float, float]:
    """Average (RSS, PSS) in MB of the slice's engine processes, from /proc (0, 0 when none is readable)."""
    rss, pss, seen = 0, 0, 0
    for node in bed.nodes:
        try:
            pid = (bed.sliver_dir(node, slice_name) / "home" / ".dsmt" / "engine.pid").read_text().split()[0]
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line and not line[0].isdigit())
        except (OSError, ValueError, IndexError):
            continue
        rss += int(fields["Rss"].split()[0])
        pss += int(fields["Pss"].split()[0])
        seen += 1
    return (rss / seen / 1024, pss / seen / 1024) if seen else (0.0, 0.0)


def measure(count: int, farms: int, directory: str, transports, engine_start: str = "fork") -> dict:
    """One testbed of ``count`` nodes; per transport, one slice created and deployed over it: the three
    phases' seconds (one run: the reactor runs once per process)."""
    from dsmt.client.testbed import Testbed, poll
    rows = {}
    with Testbed(directory, nodes=count, farms=min(farms, count), engines=True, engine_http=True,
                 capacity=len(transports) + 1, engine_args=["--engine-exec"] if engine_start == "exec" else []) as bed:
        repository = Path(directory) / "repository"
        repository.mkdir()
        build = load_build().build(repository, bed.add_repository(repository))
        descriptor = Path(build.descriptor_path).read_bytes()
        timings = {}
        for transport in transports:
            name = f"b{transport}"
            bed.write_spec(name, numnodes=count, leaselen=3600)
            with bed.listen(f"/org/dsmt/ns/deployment/{name}/", user=f"{name}_mgr") as listener:
                began = time.perf_counter()
                result = bed.svm("-p", "32", "createslice", f"{name}.xml", transport=transport)
                created = time.perf_counter()
                if result.returncode != 0:
                    raise RuntimeError(f"createslice: {result.stdout[-500:]} {result.stderr[-500:]}")
                poll(lambda: engines_running(listener.events(), bed.nodes)
                     and all(bed.engine_url(node, name) for node in bed.nodes), 600, "every engine running")
                engines = time.perf_counter()
            timings[transport] = (name, began, created, engines)
        # deployed after both slices exist, one transport after the other: the deploys share the CPU with
        # nothing but each other's idle engines
        deploys = deploy_all(bed, [(t, timings[t][0]) for t in transports], bed.nodes, descriptor)
        for transport in transports:
            name, began, created, engines = timings[transport]
            seconds, failed = deploys[transport]
            if failed:
                raise RuntimeError(f"deploy over {transport} failed on {len(failed)} nodes: {failed[:5]}")
            rss, pss = engine_memory(bed, name)
            rows[transport] = {"create": created - began, "engines": engines - created, "deploy": seconds,
                               "rss": rss, "pss": pss}
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="1,10,50,100,200")
    parser.add_argument("--farms", type=int, default=4)
    parser.add_argument("--transports", default="http,psepr")
    parser.add_argument("--engine-start", choices=("fork", "exec"), default="fork",
                        help="how node managers start engines (default: fork, from their fork server)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)   # a child measuring one count
    options = parser.parse_args(argv)
    if options.one:
        import json
        with tempfile.TemporaryDirectory(prefix="dsmt-deploy-") as directory:
            print(json.dumps(measure(options.one, options.farms, directory, options.transports.split(","),
                                     options.engine_start)), flush=True)
        return 0
    import json
    import subprocess
    counts = [int(c) for c in options.counts.split(",")]
    print(f"# create + deploy — Python {platform.python_version()}, {os.cpu_count()} CPUs, node managers in "
          f"{options.farms} farm processes, one engine process per sliver ({options.engine_start}ed); create and "
          "deploy over each transport")
    print(f"{'transport':<10}{'nodes':>6}{'create s':>10}{'engines s':>11}{'deploy s':>10}{'total s':>9}{'ms/node':>9}"
          f"{'engine RSS MB':>15}{'engine PSS MB':>15}")
    totals = {}
    for count, transport in [(c, t) for c in counts for t in options.transports.split(",")]:
        # one child (and testbed) per count and transport: each runs its own reactor once, and 200 engine
        # processes (~70 MB each) per testbed stay within the machine's memory
        child = subprocess.run([sys.executable, __file__, "--one", str(count), "--farms", str(options.farms),
                                "--transports", transport, "--engine-start", options.engine_start],
                               capture_output=True, text=True, timeout=2400)
        if child.returncode != 0 or not child.stdout.strip():
            print(f"{transport:<10}{count:>6}  failed: {(child.stderr or child.stdout)[-800:]}")
            return 1
        for transport, row in json.loads(child.stdout.strip().splitlines()[-1]).items():
            total = row["create"] + row["engines"] + row["deploy"]
            totals[(transport, count)] = total
            print(f"{transport:<10}{count:>6}{row['create']:>10.2f}{row['engines']:>11.2f}{row['deploy']:>10.2f}"
                  f"{total:>9.2f}{1000 * total / count:>9.0f}{row['rss']:>15.1f}{row['pss']:>15.1f}", flush=True)
    for (transport, count), total in totals.items():
        if count == 200:
            print(f"200 nodes created and deployed over {transport} ≤ {BAR_SECONDS_200:g} s: {total:.1f} s — "
                  f"{'PASS' if total <= BAR_SECONDS_200 else 'MISS'} ({total / BAR_SECONDS_200:.2f} of the bar)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

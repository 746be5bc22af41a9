"""The CPU of one Deploy of XYZ by one deployment engine, and where it goes (issue 5's deploy step).

    PYTHONPATH=.dev .venv/bin/python bench/deploy_cpu.py [--runs 10] [--warm] [--profile 25]

Setup: XYZ is built (``examples/xyz/build.py``) into a temporary repository served by a separate
process (``repository_site``, as ``twistd dsmt-repository`` serves it), so its CPU is not counted as
the engine's.  Then, ``--runs`` times, one engine deploys XYZ into a fresh sliver home with a fresh
SQLite store (``Store``, WAL + ``synchronous=FULL`` as in production) and the real reactor, fetcher and
supervisor, the descriptor's ``python`` parameter being this interpreter (as ``bench/deploy.py`` gives
it), until the Deploy's report (XYZ ``running``: downloaded, unpacked, configured, started, healthy).

* **cold** (default): every run is a new process that first imports what the node manager's fork
  server preloads (``daemon.PRELOAD_MODULES``) — as a forked engine starts, with one Deploy in its life;
  measured from there, so once-per-process costs not preloaded (the thread pool's start) count.
* ``--warm``: all runs in this one process (the once-per-process costs paid by the first run only).

Figures per run: the engine's CPU (``getrusage(RUSAGE_SELF)``, user + system) and wall time from
the Deploy call (the store and the engine exist already, as in a running daemon) to its report, CPU
per phase (between the store's lifecycle records: download, unpack, configure, start + health) and
the CPU of XYZ's process itself — its launcher and XYZ, one pid (the launcher ``exec``\\s XYZ) —
read from ``/proc/<pid>/stat`` when it is healthy (clock ticks: 10 ms resolution) and exactly, from
``RUSAGE_CHILDREN``, after the engine stopped it (start to stop, including the health probes it
answered).  Printed: the median and the spread over the runs.  ``--profile N`` prints the engine's
``cProfile`` top N functions by CPU time (cumulative and own) of the last run.

Limits: one machine, shared — repeat the measure and compare runs made under the same load.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Seconds one Deploy may take before the run is abandoned (it takes a fraction of a second).
DEPLOY_TIMEOUT_SECONDS = 60.0
#: The repository server, run as its own process (its CPU is not the engine's).
_REPOSITORY = """
import sys
from twisted.internet import reactor
from dsmt.server.deployment.repository import repository_site
site = repository_site(sys.argv[1]); site.noisy = False
port = reactor.listenTCP(0, site, interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def proc_cpu(pid: int) -> float:
    """Seconds of CPU (user + system) of live process ``pid`` so far (``/proc``, clock-tick resolution)."""
    with open(f"/proc/{pid}/stat", "rb") as stream:
        fields = stream.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def preload() -> None:
    """Import what a forked engine finds already imported (the fork server's preload)."""
    import importlib
    from dsmt.server.deployment.daemon import PRELOAD_MODULES
    from dsmt.server.nodemanager.forkserver import BASE_PRELOAD
    for name in (*BASE_PRELOAD, *PRELOAD_MODULES):
        importlib.import_module(name)


def deploy_once(descriptor: bytes, workdir: str, profile: int = 0) -> dict:
    """One Deploy of XYZ by a new engine in ``workdir``; the run's figures (module docstring)."""
    from twisted.internet import defer, reactor

    from dsmt.server.deployment.engine import Engine
    from dsmt.server.deployment.store import Store

    home = os.path.join(workdir, "home")
    os.makedirs(home)
    marks: list[tuple[str, float, float]] = []

    class TimedStore(Store):
        def record(self, name, **fields):
            super().record(name, **fields)
            if "state" in fields:
                what = fields["state"]
                if fields.get("milestones"):
                    what += "+" + ",".join(sorted(str(getattr(m, "value", m)) for m in fields["milestones"]))
                marks.append((what, time.perf_counter(), cpu_self()))

    profiler = None
    if profile:
        import cProfile
        profiler = cProfile.Profile(time.process_time)   # CPU, not wall (the reactor waits)
    store = TimedStore(os.path.join(workdir, "engine.sqlite"))
    events = []
    engine = Engine("xyz1", "node1.example.org", home, store, events.append, reactor=reactor)
    wall0, cpu0, children0 = time.perf_counter(), cpu_self(), cpu_children()
    if profiler:
        profiler.enable()
    marks.append(("begin", wall0, cpu0))
    out: dict = {}

    @defer.inlineCallbacks
    def run():
        deploy = engine.deploy(descriptor, {"node": "node1.example.org", "slice": "xyz1", "port": str(free_port()),
                                            "python": sys.executable})
        deploy.addTimeout(DEPLOY_TIMEOUT_SECONDS, reactor)
        report = yield deploy
        wall1, cpu1 = time.perf_counter(), cpu_self()
        if profiler:
            profiler.disable()
        pid = engine.supervisor.pid("xyz")
        out.update(ok=report.ok, failures=[f.reason for f in report.failures], wall=wall1 - wall0,
                   engine_cpu=cpu1 - cpu0, xyz_cpu_at_healthy=proc_cpu(pid) if pid else None,
                   events=[event.payload.value.rsplit("status=", 1)[1] for event in events])
        yield engine.stop("xyz")
        engine.close()
        store.close()
        # The launcher + XYZ (one pid) was reaped by the reactor when it ended: its whole CPU.
        out["xyz_cpu"] = cpu_children() - children0
        phases, walls = {}, {}
        for (_, t0, before), (what, t1, after) in zip(marks, marks[1:]):
            if t1 <= wall1:
                phases[what] = phases.get(what, 0.0) + after - before
                walls[what] = walls.get(what, 0.0) + t1 - t0
        out["phases"], out["phase_walls"] = phases, walls

    done = run()
    done.addErrback(lambda failure: out.update(ok=False, failures=[failure.getErrorMessage()]))
    done.addBoth(lambda _: reactor.stop())
    reactor.run()
    if profiler:
        import io
        import pstats
        for key in ("cumulative", "tottime"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(profile)
            out[f"profile_{key}"] = text.getvalue()
    return out


def warm_runs(descriptor: bytes, runs: int, profile: int) -> list[dict]:
    """All runs in this process, one after the other in one reactor run (a reactor cannot be restarted)."""
    from twisted.internet import defer, reactor

    from dsmt.server.deployment.engine import Engine
    from dsmt.server.deployment.store import Store
    results = []

    @defer.inlineCallbacks
    def chain():
        for index in range(runs):
            workdir = tempfile.mkdtemp(prefix="deploy-cpu-")
            home = os.path.join(workdir, "home")
            os.makedirs(home)
            store = Store(os.path.join(workdir, "engine.sqlite"))
            engine = Engine("xyz1", "node1.example.org", home, store, lambda event: None, reactor=reactor)
            children0 = cpu_children()
            wall0, cpu0 = time.perf_counter(), cpu_self()
            report = yield engine.deploy(descriptor, {"node": "node1.example.org", "slice": "xyz1",
                                                      "port": str(free_port()), "python": sys.executable})
            wall1, cpu1 = time.perf_counter(), cpu_self()
            yield engine.stop("xyz")
            engine.close()
            store.close()
            results.append({"ok": report.ok, "failures": [f.reason for f in report.failures], "wall": wall1 - wall0,
                            "engine_cpu": cpu1 - cpu0, "xyz_cpu": cpu_children() - children0, "phases": {}})

    done = chain()
    done.addErrback(lambda failure: print(failure.getTraceback(), file=sys.stderr))
    done.addBoth(lambda _: reactor.stop())
    reactor.run()
    return results


def summary(results: list[dict]) -> None:
    def line(label, values):
        values = [v for v in values if v is not None]
        if not values:
            return
        print(f"  {label:<24} median {statistics.median(values) * 1000:7.1f} ms   min {min(values) * 1000:7.1f}"
              f"   max {max(values) * 1000:7.1f}")
    failed = [r for r in results if not r.get("ok")]
    if failed:
        print(f"  {len(failed)} of {len(results)} runs failed: {failed[0].get('failures')}")
    results = [r for r in results if r.get("ok")]
    if not results:
        return
    line("engine CPU", [r["engine_cpu"] for r in results])
    line("engine wall", [r["wall"] for r in results])
    line("XYZ CPU when healthy", [r.get("xyz_cpu_at_healthy") for r in results])
    line("XYZ CPU start..stop", [r["xyz_cpu"] for r in results])
    line("engine + XYZ CPU", [r["engine_cpu"] + r["xyz_cpu"] for r in results])
    phases = [name for name in results[-1]["phases"]]
    for name in phases:
        line(f"  → {name[:20]} CPU", [r["phases"].get(name) for r in results])
        line(f"  → {name[:20]} wall", [r.get("phase_walls", {}).get(name) for r in results])
    if results[-1].get("events"):
        print(f"  events: {', '.join(results[-1]['events'])}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runs", type=int, default=10, help="deploys measured (default 10)")
    parser.add_argument("--warm", action="store_true", help="all runs in this process (module docstring)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the engine's cProfile top N functions of the last (cold) run")
    parser.add_argument("--one", metavar="DESCRIPTOR", help=argparse.SUPPRESS)   # a cold run's own process
    args = parser.parse_args(argv)
    if args.one:
        preload()
        workdir = tempfile.mkdtemp(prefix="deploy-cpu-")
        print(json.dumps(deploy_once(Path(args.one).read_bytes(), workdir, args.profile)))
        return 0

    sys.path.insert(0, str(ROOT / "examples"))
    from xyz1_demo import load_build
    top = tempfile.mkdtemp(prefix="deploy-cpu-repo-")
    repository = os.path.join(top, "repository")
    os.makedirs(repository)
    server = subprocess.Popen([sys.executable, "-c", _REPOSITORY, repository], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        build = load_build().build(repository, f"http://127.0.0.1:{port}/")
        print(f"# one Deploy of XYZ ({'warm, one process' if args.warm else 'cold: a process per run'}), "
              f"{args.runs} runs, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
        if args.warm:
            results = warm_runs(Path(build.descriptor_path).read_bytes(), args.runs, args.profile)
        else:
            results = []
            for index in range(args.runs):
                profile = args.profile if index == args.runs - 1 else 0
                done = subprocess.run([sys.executable, __file__, "--one", build.descriptor_path, "--profile",
                                       str(profile)], capture_output=True, text=True, check=False)
                lines = done.stdout.strip().splitlines()
                try:
                    results.append(json.loads(lines[-1]))
                except (IndexError, ValueError):
                    results.append({"ok": False, "failures": [done.stderr.strip()[-500:]]})
        summary(results)
        if args.profile and results and results[-1].get("profile_cumulative"):
            print(results[-1]["profile_cumulative"])
            print(results[-1]["profile_tottime"])
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

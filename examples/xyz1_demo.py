"""``make demo``: reference 000's scenario, for real — application XYZ installed in slice ``xyz1`` on five nodes.

Starts, each as its own process on 127.0.0.1 (``dsmt.client.testbed``): a PsEPR
router, the agent, five node managers (one per node, named as the DSMT
overview's hosts; each starts the deployment engine in every new sliver), the
slice manager, PLDB (as ``xyz1_mgr``, the slice's account), a package
repository serving XYZ (``examples/xyz/``, built reproducibly with its
sha256), and a listener on ``/org/dsmt/ns/deployment/xyz1/``.  Then, as a
service planner would:

1. ``CreateSlice`` on the slice manager (signed): the sliver managers report
   the containers (requested → instantiated → initialized → running), the
   engines report their own installation (sliver-bootstrap);
2. stages XYZ's descriptor on every engine (its own port each: five XYZ on one
   machine) and sends ``APPCONFIG,<host>,XYZ,XYZ-proc`` on the deployment
   agent's command channel, exactly as the reference shows;
3. shows live progress (a node × component table) until every engine reports
   XYZ ``running`` and every XYZ answers its HTTP health check;

then prints a recap, stops everything and exits 0 — or 1 naming what failed.
The raw event XML the listener received is kept in ``.demo/xyz1-events.xml``;
logs of every daemon in ``.demo/testbed/``.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from xyz1_status_events import HOSTS, SLICE, appconfig_event  # noqa: E402

from dsmt.client.testbed import Testbed, TestbedError, free_port  # noqa: E402
from dsmt.client.dsmtc import render_table  # noqa: E402
from dsmt.server.statusevents import DEPLOYMENT_AGENT, SLIVER_BOOTSTRAP, manager_service  # noqa: E402

WORK = Path.cwd() / ".demo"
CHANNEL = f"/org/dsmt/ns/deployment/{SLICE}/"
#: Longest the whole scenario may take once the daemons run: each node installs in about a second; two
#: minutes covers a loaded 2-core machine without hiding a hang.
SCENARIO_TIMEOUT = 120.0


def load_build():
    spec = importlib.util.spec_from_file_location("xyz_build", HERE / "xyz" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def table_of(events):
    """``dsmtc watch``'s node × component table folded from the listener's events."""
    from dsmt.client.dsmtc import SliceTable
    table = SliceTable(SLICE, HOSTS)
    for event in events:
        table.apply(event)
    return table


def healthy(url: str) -> bool:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stage_and_configure(bed, descriptor: bytes, ports: dict[str, int]) -> None:
    """Stage the descriptor on each engine (SOAP over PsEPR through the engines' call adapters; the demo's
    engines accept unsigned requests), then send the reference's APPCONFIG command to each host — all on one
    PsEPR connection as ``xyz1_mgr``."""
    from twisted.internet import defer, task

    from dsmt.server.deployment.remote import PsEPREngineCalls
    from dsmt.server.slicemanager.calls import NodeCallError, NodeRequest
    from dsmt.transports.psepr.client import PsEPRConnection
    from dsmt.transports.psepr_soap import PsEPRTransport
    problems = []

    async def run(reactor):
        connection = PsEPRConnection.from_urls(bed.router_url, service=manager_service(SLICE),
                                               instance="service-planner", password=bed.password_file.read_text()
                                               .strip())
        await connection.connect(retry=False)
        transport = PsEPRTransport(connection, timeout=30)
        await transport.start()
        try:
            requests = [NodeRequest(host, "", {"descriptor": descriptor,
                                               "parameters": {"port": str(ports[host]), "python": sys.executable}})
                        for host in HOSTS]
            staged = await PsEPREngineCalls(transport, SLICE).run("Stage", requests, parallelism=len(HOSTS),
                                                                  timeout=30)
            refused = {host: outcome for host, outcome in staged.items() if isinstance(outcome, NodeCallError)}
            if refused:
                host, error = next(iter(refused.items()))
                raise TestbedError(f"{host}: {error.reason}")
            for host in HOSTS:
                connection.send(appconfig_event(host))
            await connection.flush()
        except Exception as exc:
            problems.append(f"staging XYZ failed: {exc}")
        finally:
            transport.close()
            connection.close()

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as exit:
        if exit.code:
            problems.append(f"staging XYZ failed (exit {exit.code})")
    if problems:
        raise TestbedError(problems[0])


def main() -> int:
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir()
    repository = WORK / "repository"
    started = time.monotonic()
    bed = Testbed(WORK / "testbed", node_names=HOSTS, engines=True, slice_manager=True)
    try:
        print(f"starting the router, agent, {len(HOSTS)} node managers and the slice manager …", flush=True)
        bed.start()
        bed.add_pldb(manager_service(SLICE))
        repository.mkdir()
        base_url = bed.add_repository(repository)
        build = load_build().build(repository, base_url)
        print(f"XYZ package {build.package.name} (sha256 {build.package.sha256[:16]}…) served at {base_url}")
        listener = bed.listen(CHANNEL, user=manager_service(SLICE))
        print(f"daemons up in {time.monotonic() - started:.1f} s; creating slice {SLICE} …", flush=True)

        result = bed.create_slice_via_slice_manager(SLICE, HOSTS)
        for line in result:
            print(line)
        deadline = time.monotonic() + SCENARIO_TIMEOUT

        def wait(condition, what):
            shown = None
            while True:
                table = table_of(listener.events())
                text = "\n".join(render_table(table))
                if text != shown:
                    print("\n" + text, flush=True)
                    shown = text
                if condition(table):
                    return table
                if time.monotonic() > deadline:
                    raise TestbedError(f"{what}: not within {SCENARIO_TIMEOUT:g} s")
                time.sleep(0.3)

        wait(lambda t: all(t.status(h, SLIVER_BOOTSTRAP) == "running" for h in HOSTS), "every engine running")
        ports = {host: free_port() for host in HOSTS}
        stage_and_configure(bed, Path(build.descriptor_path).read_bytes(), ports)
        print(f"\nAPPCONFIG sent to {len(HOSTS)} engines", flush=True)
        wait(lambda t: all(t.status(h, DEPLOYMENT_AGENT) in ("running", "failed") for h in HOSTS), "XYZ running")
        table = table_of(listener.events())
        urls = {host: f"http://127.0.0.1:{ports[host]}/health" for host in HOSTS}
        answers = {host: healthy(urls[host]) for host in HOSTS}
        listener.stop()
        shutil.copyfile(listener.path, WORK / "xyz1-events.xml")

        print("\nRecap:")
        for host in HOSTS:
            print(f"  {host:<28} XYZ {table.status(host, DEPLOYMENT_AGENT) or '-':<8} health "
                  f"{'ok' if answers[host] else 'NOT answering'}  ({urls[host]})")
        count = len(listener.events())
        print(f"{count} events received, kept in {WORK / 'xyz1-events.xml'}; "
              f"{time.monotonic() - started:.1f} s in all")
        ok = all(answers.values()) and all(table.status(h, DEPLOYMENT_AGENT) == "running" for h in HOSTS)
        if not ok:
            print("demo failed: XYZ is not running and healthy on every node", file=sys.stderr)
        return 0 if ok else 1
    except Exception as exc:  # a demo reports what went wrong in a sentence; the logs in .demo/ say more
        print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        bed.stop()


if __name__ == "__main__":
    sys.exit(main())

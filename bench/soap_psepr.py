"""SOAP over PsEPR against SOAP over HTTP, and multicast calls to 10, 100 and 200 instances.

Processes (all on 127.0.0.1, each with its own reactor):

* a PsEPR router (``RouterFactory``, anonymous logins);
* a service process holding one :class:`~dsmt.transports.psepr_soap.PsEPRSoapEndpoint` (PsEPR) and a
  :class:`~dsmt.transports.http.SoapResource` (HTTP) over one trivial operation ``ping(text) -> text``
  (SOAP 1.1, two cores from the same service class: one per transport);
* load processes: ``--callers`` concurrent callers (1 and 20), split over ``--load-processes``.
  Both transports send the envelope zeep builds for ``ping("hello")`` (WS-Addressing included), a
  fresh MessageID per call.  HTTP callers write prepared requests on persistent connections and read
  the replies' ``Content-Length``; PsEPR callers use :class:`PsEPRTransport` itself (``post``: the
  event is built and sent, the reply is decoded, parsed and correlated by ``RelatesTo``) — the PsEPR
  client does more per call than the HTTP one, never less.  All load processes of a point are started
  before any result is read, so they measure the same window.
* CPU per call: every load process reads, at the start and end of its measured window, its own CPU
  time and that of the service and the router (``/proc/<pid>/stat``; Linux only, else ``-``); the
  table prints µs of CPU per counted call and the share of one core, per role.  What limits a point
  shows there: HTTP raw runs the service at 100 % of a core; PsEPR spends CPU in three processes.
* multicast: ``N`` instances (10, 100, 200) spread over ``--hosts`` processes, each instance its own
  ``PsEPRConnection`` + endpoint; a caller process runs ``multicast_call(expected=N)`` ``--rounds``
  times and reports the time until every reply is in (p50, p99).

Bars (from the issue): PsEPR ≥ HTTP in calls/s at 20 concurrent callers; multicast to 200 p50 ≤ 0.5 s.

Run (from the repository)::

    PYTHONPATH=.dev .venv/bin/python bench/soap_psepr.py            # ~1 min
    PYTHONPATH=.dev .venv/bin/python bench/soap_psepr.py --quick    # smoke run

Exit status 0 when every measurement was taken (the verdict is printed as PASS/MISS), 1 otherwise.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from _common import child_env, percentile

HERE = Path(__file__).resolve()
TNS = "http://dsmt.org/ns/bench/ping"
SERVICE = "ping"
BAR_MULTICAST_P50 = 0.5


def make_core(transport_uri: str):
    from spyne import ServiceBase, Unicode, rpc

    from dsmt.transports.soap.core import SoapCore

    class PingService(ServiceBase):
        @rpc(Unicode, _returns=Unicode)
        def ping(ctx, text):
            return text

    return SoapCore([PingService], TNS, "PingService", transport_uri=transport_uri)


def request_template(core, address: str) -> bytes:
    """zeep's envelope for ``ping("hello")`` with ``@MID@`` where its MessageID goes."""
    import zeep
    from zeep.wsdl.utils import etree_to_string

    from dsmt.transports.soap.zeepsupport import make_client
    from dsmt.transports.psepr_soap import PsEPRTransport

    transport = zeep.Transport()
    transport.binding_classes = PsEPRTransport.binding_classes
    client = make_client(core.wsdl(address), transport)
    envelope = client.create_message(client.service, "ping", "hello")
    message_id = envelope.find(".//{http://www.w3.org/2005/08/addressing}MessageID")
    message_id.text = "@MID@"
    return etree_to_string(envelope)


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far, from ``/proc`` (None where there is none)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15
    except (OSError, ValueError, IndexError):
        return None


class CpuWindow:
    """CPU seconds spent during a load process's measured window by the load process itself (``load``) and by
    the processes named in ``BENCH_WATCH`` (``name:pid,…``: the service and the router), read at the window's
    start and end from the reactor, so the figures cover exactly the calls counted."""

    def __init__(self, reactor, warmup: float, seconds: float):
        watched = (item.split(":") for item in os.environ.get("BENCH_WATCH", "").split(",") if item)
        self.pids = {"load": os.getpid(), **{name: int(pid) for name, pid in watched}}
        self._spent: dict[str, float | None] | None = None
        self._began: dict[str, float | None] = {}
        reactor.callLater(warmup, self._start)
        self._stopping = reactor.callLater(warmup + seconds, self._stop)

    def _start(self) -> None:
        self._began = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def _stop(self) -> None:
        if self._spent is None:
            self._spent = {}
            for name, pid in self.pids.items():
                now, began = cpu_seconds(pid), self._began.get(name)
                self._spent[name] = None if now is None or began is None else now - began

    @property
    def spent(self) -> dict[str, float | None]:
        """{name: CPU seconds, or None when unknown}; read right after the window when the timer has not fired
        yet (the last calls end a moment after it, and the reactor may stop first)."""
        if self._stopping.active():
            self._stopping.cancel()
        self._stop()
        return self._spent


# ---------------------------------------------------------------- child roles

def role_router() -> None:
    from twisted.internet import reactor

    from dsmt.transports.psepr.router import RouterFactory

    factory = RouterFactory(accounts=None, check_logins_in_thread=False)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=256)
    emit(port=port.getHost().port)
    reactor.run()


def _connect_all(url: str, names: list[str]):
    from twisted.internet import defer

    from dsmt.transports.psepr.client import PsEPRConnection

    connections = [PsEPRConnection.from_urls(url, service="bench", password="x", instance=name) for name in names]
    return defer.gatherResults([c.connect(retry=False) for c in connections]).addCallback(lambda _: connections)


def role_host(url: str, count: int, prefix: str, http: bool) -> None:
    """``count`` endpoints (own connection each); with ``http`` also the HTTP resource on one port."""
    from twisted.internet import defer, reactor

    from dsmt.transports.psepr_soap import PSEPR_TRANSPORT, PsEPRSoapEndpoint
    from dsmt.transports.soap import HTTP_TRANSPORT

    core = make_core(PSEPR_TRANSPORT)

    @defer.inlineCallbacks
    def start():
        connections = yield _connect_all(url, [f"{prefix}{n:03d}" for n in range(count)])
        endpoints = [PsEPRSoapEndpoint(c, core, SERVICE) for c in connections]
        yield defer.gatherResults([e.start() for e in endpoints])
        yield defer.gatherResults([c.flush() for c in connections])
        port = None
        if http:
            from twisted.web.resource import Resource
            from dsmt.transports.http import SoapResource, SoapSite
            root = Resource()
            root.putChild(b"soap", SoapResource(make_core(HTTP_TRANSPORT)))
            port = reactor.listenTCP(0, SoapSite(root, logPath=os.devnull), interface="127.0.0.1", backlog=256)
            port = port.getHost().port
        gc.freeze()
        emit(ready=True, http_port=port)

    start().addErrback(lambda f: (f.printTraceback(file=sys.stderr), reactor.stop()))
    reactor.run()


def role_load_http(port: int, callers: int, warmup: float, seconds: float) -> None:
    """The raw HTTP load generator of ``bench/soap_http.py``, with a fresh MessageID per call."""
    import uuid

    from soap_http import load

    from twisted.internet import reactor

    template = request_template(make_core("http://schemas.xmlsoap.org/soap/http"), f"http://127.0.0.1:{port}/soap")
    window = CpuWindow(reactor, warmup, seconds)  # load() prints its JSON line; the CPU figures follow on another
    gc.freeze()
    load(port, "/soap", template, callers, warmup, seconds,
         make_body=lambda: template.replace(b"@MID@", f"urn:uuid:{uuid.uuid4()}".encode()))
    emit(cpu=window.spent)


def role_load_treq(port: int, callers: int, warmup: float, seconds: float) -> None:
    """HTTP callers at the PsEPR callers' level: ``TreqTransport.post_xml``-style calls through treq's
    persistent pool (the HTTP client a zeep caller inside a reactor uses), reply bytes read."""
    import uuid

    from twisted.internet import defer, reactor

    from dsmt.transports.http import TreqTransport

    address = f"http://127.0.0.1:{port}/soap"
    template = request_template(make_core("http://schemas.xmlsoap.org/soap/http"), address)
    latencies: list[int] = []
    failures = [0]

    async def caller(transport, start, stop):
        while (now := time.perf_counter_ns()) < stop:
            body = template.replace(b"@MID@", f"urn:uuid:{uuid.uuid4()}".encode())
            response = await transport.http.post(address, data=body,
                                                 headers={"Content-Type": "text/xml; charset=utf-8"})
            await response.content()
            if response.code != 200:
                failures[0] += 1
            end = time.perf_counter_ns()
            if now >= start and end <= stop:
                latencies.append(end - now)

    @defer.inlineCallbacks
    def main():
        transport = TreqTransport(timeout=10)
        gc.freeze()
        start = time.perf_counter_ns() + int(warmup * 1e9)
        stop = start + int(seconds * 1e9)
        window = CpuWindow(reactor, warmup, seconds)
        yield defer.gatherResults([defer.ensureDeferred(caller(transport, start, stop)) for _ in range(callers)])
        emit(calls=len(latencies), failures=failures[0], latencies_us=[n // 1000 for n in latencies])
        emit(cpu=window.spent)
        yield defer.ensureDeferred(transport.aclose())
        reactor.stop()

    main().addErrback(lambda f: (f.printTraceback(file=sys.stderr), reactor.stop()))
    reactor.run()


def role_load_psepr(url: str, callers: int, warmup: float, seconds: float, instance: str) -> None:
    import uuid

    from twisted.internet import defer, reactor

    from dsmt.transports.psepr_soap import PSEPR_TRANSPORT, PsEPRTransport, service_address

    address = service_address(SERVICE)
    latencies: list[int] = []
    failures = [0]

    async def caller(transport, template, start, stop):
        while (now := time.perf_counter_ns()) < stop:
            body = template.replace(b"@MID@", f"urn:uuid:{uuid.uuid4()}".encode())
            try:
                response = await transport.post(address, body, {"Content-Type": "text/xml; charset=utf-8"})
                if response.status_code != 200:
                    failures[0] += 1
            except Exception as exc:
                failures[0] += 1
                print(f"call failed: {exc}", file=sys.stderr)
                continue
            end = time.perf_counter_ns()
            if now >= start and end <= stop:
                latencies.append(end - now)

    @defer.inlineCallbacks
    def main():
        (connection,) = yield _connect_all(url, [instance])
        transport = PsEPRTransport(connection, timeout=10)
        yield transport.start()
        template = request_template(make_core(PSEPR_TRANSPORT), address)
        template = template.replace(b"</wsa:MessageID>", b"</wsa:MessageID>" + transport._reply_to_block(), 1) \
            if b"</wsa:MessageID>" in template else template
        gc.freeze()
        start = time.perf_counter_ns() + int(warmup * 1e9)
        stop = start + int(seconds * 1e9)
        window = CpuWindow(reactor, warmup, seconds)
        yield defer.gatherResults([defer.ensureDeferred(caller(transport, template, start, stop))
                                   for _ in range(callers)])
        emit(calls=len(latencies), failures=failures[0], latencies_us=[n // 1000 for n in latencies])
        emit(cpu=window.spent)
        reactor.stop()

    main().addErrback(lambda f: (f.printTraceback(file=sys.stderr), reactor.stop()))
    reactor.run()


def role_multicast(url: str, instances: int, rounds: int, deadline: float) -> None:
    from twisted.internet import defer, reactor

    from dsmt.transports.psepr_soap import PSEPR_TRANSPORT, PsEPRTransport, multicast_call, service_address
    from dsmt.transports.soap.zeepsupport import make_client

    @defer.inlineCallbacks
    def main():
        (connection,) = yield _connect_all(url, ["mcaller"])
        transport = PsEPRTransport(connection, timeout=10)
        yield transport.start()
        client = make_client(make_core(PSEPR_TRANSPORT).wsdl(service_address(SERVICE)), transport, asynchronous=True)
        gc.freeze()
        times, complete = [], 0
        for n in range(rounds + 2):  # two warm-up rounds
            began = time.perf_counter()
            results = yield multicast_call(transport, client.service, "ping", ("hi",), expected=instances,
                                           deadline=deadline)
            took = time.perf_counter() - began
            if n >= 2:
                times.append(took)
                complete += sum(1 for r in results.values() if r.ok) == instances
        emit(times=times, complete=complete)
        reactor.stop()

    main().addErrback(lambda f: (f.printTraceback(file=sys.stderr), reactor.stop()))
    reactor.run()


# ---------------------------------------------------------------- orchestration

def spawn(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            env=child_env(**env), text=True)


def first_line(process: subprocess.Popen) -> dict:
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"child {process.args[2:]} ended without answering (exit {process.wait()})")
    return json.loads(line)


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()


def run_load(kind: str, target: str, callers: int, processes: int, warmup: float, seconds: float,
             watch: dict[str, int]) -> dict:
    """Run ``callers`` split over ``processes`` load processes, all started before any result is read (they
    measure the same window).  ``watch``: processes whose CPU the load processes sample over their window."""
    splits = [callers // processes + (1 if n < callers % processes else 0) for n in range(processes)]
    environment = {"BENCH_WATCH": ",".join(f"{name}:{pid}" for name, pid in watch.items())}
    children = []
    for n, share in enumerate(s for s in splits if s):
        if kind in ("http", "treq"):
            children.append(spawn(f"load-{kind}", target, str(share), str(warmup), str(seconds), **environment))
        else:
            children.append(spawn("load-psepr", target, str(share), str(warmup), str(seconds), f"caller{n}",
                                  **environment))
    calls, failures, latencies, cpu = 0, 0, [], {}
    for child in children:
        result = first_line(child)
        spent = first_line(child)["cpu"]
        child.wait()
        calls += result["calls"]
        failures += result["failures"]
        latencies += result["latencies_us"]
        for name, seconds_spent in spent.items():  # the load processes add up; the watched ones are shared
            if seconds_spent is not None:
                cpu[name] = cpu.get(name, 0.0) + seconds_spent if name == "load" else seconds_spent
    return {"rate": calls / seconds, "p50": percentile(latencies, 0.5) / 1000, "p99": percentile(latencies, 0.99) / 1000,
            "failures": failures, "calls": calls, "cpu": cpu}


def cpu_cell(row: dict, role: str) -> str:
    spent = row["cpu"].get(role)
    if spent is None or not row["calls"]:
        return "-"
    return f"{1e6 * spent / row['calls']:.0f} ({100 * spent / (row['calls'] / row['rate']):.0f}%)"


def main(argv: list[str]) -> int:
    if argv and argv[0] == "router":
        role_router()
        return 0
    if argv and argv[0] == "host":
        role_host(argv[1], int(argv[2]), argv[3], argv[4] == "http")
        return 0
    if argv and argv[0] == "load-http":
        role_load_http(int(argv[1]), int(argv[2]), float(argv[3]), float(argv[4]))
        return 0
    if argv and argv[0] == "load-treq":
        role_load_treq(int(argv[1]), int(argv[2]), float(argv[3]), float(argv[4]))
        return 0
    if argv and argv[0] == "load-psepr":
        role_load_psepr(argv[1], int(argv[2]), float(argv[3]), float(argv[4]), argv[5])
        return 0
    if argv and argv[0] == "multicast":
        role_multicast(argv[1], int(argv[2]), int(argv[3]), float(argv[4]))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--load-processes", type=int, default=2)
    parser.add_argument("--hosts", type=int, default=4, help="processes hosting the multicast instances")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args(argv)
    if options.quick:
        options.seconds, options.warmup, options.rounds = 1.5, 0.5, 5

    print(f"# SOAP over PsEPR vs HTTP — Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{options.seconds:g} s per point")
    router = spawn("router")
    processes = [router]
    try:
        url = f"psepr://127.0.0.1:{first_line(router)['port']}"
        server = spawn("host", url, "1", "srv", "http")
        processes.append(server)
        http_port = first_line(server)["http_port"]
        rows = {}
        watch = {"service": server.pid, "router": router.pid}
        for callers in (1, 20):
            split = 1 if callers == 1 else options.load_processes
            rows[("HTTP raw", callers)] = run_load("http", str(http_port), callers, split, options.warmup,
                                                   options.seconds, watch)
            rows[("HTTP treq", callers)] = run_load("treq", str(http_port), callers, split, options.warmup,
                                                    options.seconds, watch)
            rows[("PsEPR", callers)] = run_load("psepr", url, callers, split, options.warmup, options.seconds,
                                                watch)
        stop(server)
        processes.remove(server)
        roles = ("service", "router", "load")
        print(f"{'transport':<11}{'callers':>8}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}   "
              + "".join(f"{role + ' µs/call (%)':>22}" for role in roles))
        for (kind, callers), row in rows.items():
            cpu = "".join(f"{cpu_cell(row, role):>22}" for role in roles)
            print(f"{kind:<11}{callers:>8}{row['rate']:>10.0f}{row['p50']:>9.2f}{row['p99']:>9.2f}{row['failures']:>8}"
                  f"   {cpu}")
        print("(CPU over the measured window: per call counted, and in % of one core; the router idles for HTTP)")

        print(f"\n{'multicast to':<14}{'hosts':>6}{'rounds':>8}{'complete':>10}{'p50 s':>8}{'p99 s':>8}")
        multicast = {}
        for instances in (10, 100, 200):
            hosts = min(options.hosts, instances)
            per = [instances // hosts + (1 if n < instances % hosts else 0) for n in range(hosts)]
            children = [spawn("host", url, str(count), f"h{n}-", "-") for n, count in enumerate(per)]
            processes += children
            for child in children:
                first_line(child)
            caller = spawn("multicast", url, str(instances), str(options.rounds), "5")
            result = first_line(caller)
            caller.wait()
            stop(*children)
            for child in children:
                processes.remove(child)
            p50, p99 = percentile(result["times"], 0.5), percentile(result["times"], 0.99)
            multicast[instances] = p50
            print(f"{instances:<14}{hosts:>6}{len(result['times']):>8}{result['complete']:>10}{p50:>8.3f}{p99:>8.3f}")

        psepr = rows[("PsEPR", 20)]["rate"]
        for kind in ("HTTP treq", "HTTP raw"):
            http = rows[(kind, 20)]["rate"]
            print(f"\nPsEPR ≥ {kind} at 20 callers: {psepr:.0f} vs {http:.0f} calls/s — "
                  f"{'PASS' if psepr >= http else 'MISS'}", end="")
        print()
        print(f"multicast to 200, p50 ≤ {BAR_MULTICAST_P50} s: {multicast[200]:.3f} s — "
              f"{'PASS' if multicast[200] <= BAR_MULTICAST_P50 else 'MISS'}")
        return 0
    except Exception as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        stop(*processes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

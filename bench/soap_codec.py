"""The SOAP core's compiled path against spyne's pipeline, in process: CPU per call, side by side.

Each row runs the same request through two cores built from the same service
class — ``SoapCore(…)`` (compiled codecs) and ``SoapCore(…, fast_path=False)``
(spyne's ``get_in_object``/``get_out_string``) — and prints µs per call (best
of ``--repeat`` rounds of ``--calls``) and the ratio.  The replies are checked
to be the same bytes first, so the rows compare equal work.

Rows:

* ``ping`` — ``ping(text) -> text`` with the WS-Addressing headers zeep sends
  (the operation of ``bench/soap_http.py``);
* ``report N`` — the slice manager's ``SliceReport`` on N nodes (a
  ``NodeResult`` each), the reply ``svm`` gets for a command over a whole
  slice; the report objects are built outside the timed call's codec work
  but inside the method, on both sides;
* ``group in`` — a complex argument with repeated complex members (20
  ``Parameter``-like entries) read into objects, a short reply.

Run (from the repository)::

    PYTHONPATH=.dev .venv/bin/python bench/soap_codec.py
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

from spyne import ComplexModel, Integer, ServiceBase, Unicode, rpc

from dsmt.server.slicemanager.service import TNS, NodeResult, SliceReport
from dsmt.transports.soap.core import SOAP11, SoapCore


class Entry(ComplexModel):
    __namespace__ = TNS
    _type_info = [("name", Unicode(min_occurs=1, nillable=False)), ("value", Unicode), ("weight", Integer)]


class Batch(ComplexModel):
    __namespace__ = TNS
    _type_info = [("label", Unicode(min_occurs=1, nillable=False)),
                  ("entry", Entry.customize(min_occurs=0, max_occurs=100, nillable=False))]


def make_service(reports: dict[int, SliceReport]):
    class Bench(ServiceBase):
        @rpc(Unicode, _returns=Unicode)
        def ping(ctx, text):
            return text

        @rpc(Integer, _returns=SliceReport)
        def report(ctx, nodes):
            return reports[nodes]

        @rpc(Batch, _returns=Integer)
        def batch(ctx, batch):
            return len(batch.entry or ())

    return Bench


def slice_report(nodes: int) -> SliceReport:
    return SliceReport(command="NewVms", slice="xyz1", ok=True, summary=f"{nodes} of {nodes} nodes",
                       result=[NodeResult(node=f"node{i}.example.org", ok=True, line=f"Success on node{i}.example.org",
                                          state="running", expiresAt=1790000000 + i, keys=2) for i in range(nodes)])


def envelope(body: str) -> bytes:
    header = ('<s:Header xmlns:wsa="http://www.w3.org/2005/08/addressing"><wsa:MessageID>urn:uuid:'
              '3147649e-6d9f-4dc2-9359-b4d682a32406</wsa:MessageID></s:Header>')
    return (f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP11.envelope_ns}" xmlns:t="{TNS}">'
            f"{header}<s:Body>{body}</s:Body></s:Envelope>").encode()


def per_call(core: SoapCore, request: bytes, calls: int, repeat: int) -> tuple[float, bytes]:
    reply = core.process(request, content_type=SOAP11.content_type).result
    if reply.is_fault:
        raise SystemExit(f"the benchmark request was refused: {reply.body[:300]!r}")
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(calls):
            core.process(request, content_type=SOAP11.content_type)
        best = min(best, (time.process_time() - started) / calls)
    return best * 1e6, reply.body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per round for ping (fewer for big rows)")
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    sizes = (10, 200)
    service = make_service({n: slice_report(n) for n in sizes})
    compiled = SoapCore([service], TNS, "Bench")
    spyne = SoapCore([service], TNS, "Bench", fast_path=False)
    entries = "".join(f"<t:entry><t:name>p{i}</t:name><t:value>v &amp; {i}</t:value><t:weight>{i}</t:weight></t:entry>"
                      for i in range(20))
    rows = [("ping", "<t:ping><t:text>hello</t:text></t:ping>", options.calls)]
    rows += [(f"report {n}", f"<t:report><t:nodes>{n}</t:nodes></t:report>", max(20, options.calls * 10 // n // 10))
             for n in sizes]
    rows.append(("group in (20 entries)", f"<t:batch><t:batch><t:label>b</t:label>{entries}</t:batch></t:batch>",
                 options.calls // 4))
    print(f"SOAP core, compiled path vs spyne's pipeline — CPython {platform.python_version()}, "
          f"best of {options.repeat} rounds, CPU µs per call")
    print(f"{'request':<24}{'spyne µs':>12}{'compiled µs':>14}{'speed-up':>10}{'reply bytes':>13}")
    for name, body, calls in rows:
        request = envelope(body)
        slow, slow_reply = per_call(spyne, request, calls, options.repeat)
        fast, fast_reply = per_call(compiled, request, calls, options.repeat)
        if slow_reply.split(b"<soap11env:Body>")[1] != fast_reply.split(b"<soap11env:Body>")[1]:
            print(f"{name}: the two paths' replies differ", file=sys.stderr)
            return 1
        print(f"{name:<24}{slow:>12,.1f}{fast:>14,.1f}{slow / fast:>9.1f}×{len(fast_reply):>13,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

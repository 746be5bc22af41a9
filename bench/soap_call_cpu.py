"""CPU per SOAP call with every role in one process: SOAP over PsEPR (router included) against SOAP/HTTP (treq).

One process runs a PsEPR router, the ``ping`` service of ``bench/soap_psepr.py`` on both transports, and
20 callers; it prints the CPU time per call (``time.process_time``), so the transports' total work can be
compared without the multi-process scheduling of ``soap_psepr.py``.  ``PROF=1`` adds a cProfile listing.

    PYTHONPATH=.dev .venv/bin/python bench/soap_call_cpu.py psepr 4000
    PYTHONPATH=.dev .venv/bin/python bench/soap_call_cpu.py http 4000
"""
import cProfile
import os
import pstats
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from twisted.internet import reactor, defer
from soap_psepr import make_core, request_template, SERVICE
from dsmt.transports.psepr.router import RouterFactory
from dsmt.transports.psepr.client import PsEPRConnection
from dsmt.transports.psepr_soap import PSEPR_TRANSPORT, PsEPRSoapEndpoint, PsEPRTransport, service_address
from dsmt.transports.soap import HTTP_TRANSPORT
from dsmt.transports.http import SoapResource, SoapSite, TreqTransport
from twisted.web.resource import Resource
import uuid
N = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
MODE = sys.argv[1]

@defer.inlineCallbacks
def main():
    factory = RouterFactory(accounts=None, check_logins_in_thread=False)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    url = f"psepr://127.0.0.1:{port.getHost().port}"
    sc = PsEPRConnection.from_urls(url, service="bench", password="x", instance="srv")
    yield sc.connect(retry=False)
    ep = PsEPRSoapEndpoint(sc, make_core(PSEPR_TRANSPORT), SERVICE)
    yield ep.start(); yield sc.flush()
    root = Resource(); root.putChild(b"soap", SoapResource(make_core(HTTP_TRANSPORT)))
    hp = reactor.listenTCP(0, SoapSite(root, logPath=os.devnull), interface="127.0.0.1")
    cc = PsEPRConnection.from_urls(url, service="bench", password="x", instance="cli")
    yield cc.connect(retry=False)
    tr = PsEPRTransport(cc, timeout=10); yield tr.start()
    address = service_address(SERVICE)
    tpl = request_template(make_core(PSEPR_TRANSPORT), address)
    tpl = tpl.replace(b"</wsa:MessageID>", b"</wsa:MessageID>" + tr._reply_to_block(), 1)
    haddr = f"http://127.0.0.1:{hp.getHost().port}/soap"
    htpl = request_template(make_core(HTTP_TRANSPORT), haddr)
    treq_t = TreqTransport(timeout=10)
    async def one_psepr():
        body = tpl.replace(b"@MID@", f"urn:uuid:{uuid.uuid4()}".encode())
        r = await tr.post(address, body, {"Content-Type": "text/xml; charset=utf-8"})
        assert r.status_code == 200
    async def one_http():
        body = htpl.replace(b"@MID@", f"urn:uuid:{uuid.uuid4()}".encode())
        r = await treq_t.http.post(haddr, data=body, headers={"Content-Type": "text/xml; charset=utf-8"})
        await r.content()
    one = one_psepr if MODE == "psepr" else one_http
    for _ in range(200):
        yield defer.ensureDeferred(one())
    prof = cProfile.Profile() if os.environ.get("PROF") else None
    c0 = time.process_time(); t0 = time.perf_counter()
    prof and prof.enable()
    async def caller(n):
        for _ in range(n):
            await one()
    yield defer.gatherResults([defer.ensureDeferred(caller(N // 20)) for _ in range(20)])
    prof and prof.disable()
    c1 = time.process_time(); t1 = time.perf_counter()
    print(f"{MODE}: {N} calls, cpu {1e6*(c1-c0)/N:.0f} us/call, wall {1e6*(t1-t0)/N:.0f} us/call")
    prof and pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    reactor.stop()
main().addErrback(lambda f: (f.printTraceback(), reactor.stop()))
reactor.run()

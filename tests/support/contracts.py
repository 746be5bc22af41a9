"""What the SOAP service tests share: the committed WSDL checks and zeep calls that return their fault."""
from __future__ import annotations

import os
import subprocess
import sys

import treq
from twisted.internet import defer, reactor
from twisted.web.client import HTTPConnectionPool
from zeep.exceptions import Fault

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wsdl_file(name: str) -> str:
    """The committed ``wsdl/<name>.wsdl`` of the working tree."""
    return os.path.join(ROOT, "wsdl", f"{name}.wsdl")


def generator():
    """``wsdl/generate.py`` of the working tree (normalise, committed_wsdl)."""
    from dsmt.wsdl import generate
    return generate


@defer.inlineCallbacks
def assert_served_wsdl_is_committed(url: str, name: str):
    """The WSDL served at ``url?wsdl`` equals ``wsdl/<name>.wsdl`` apart from the address and the PsEPR port,
    and the committed file is what ``wsdl/generate.py`` writes now."""
    generate = generator()
    served = yield treq.get(url + "?wsdl", pool=HTTPConnectionPool(reactor, persistent=False)).addCallback(treq.content)
    with open(wsdl_file(name), "rb") as handle:
        committed = handle.read()
    assert generate.normalise(served) == generate.normalise(committed, drop_psepr=True)
    assert committed == generate.committed_wsdl(name), "run: python wsdl/generate.py"


def zeep_dump(name: str) -> str:
    """What ``python -m zeep wsdl/<name>.wsdl`` prints (it must load the committed file)."""
    result = subprocess.run([sys.executable, "-m", "zeep", wsdl_file(name)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


class ZeepCalls:
    """Mixin for trial cases with ``self.service`` (an async zeep proxy): ``call`` and ``fault``."""

    def call(self, operation, **kwargs):
        return defer.ensureDeferred(getattr(self.service, operation)(**kwargs))

    @defer.inlineCallbacks
    def fault(self, operation, **kwargs) -> Fault:
        try:
            yield self.call(operation, **kwargs)
        except Fault as fault:
            return fault
        raise AssertionError(f"{operation} did not fail")


def soap11_envelope(tns: str, body: str, prefix: str = "m") -> bytes:
    """A SOAP 1.1 envelope around ``body`` (XML text using ``prefix`` for ``tns``), for hand-made requests."""
    from dsmt.transports.soap.core import SOAP11
    return (f'<s:Envelope xmlns:s="{SOAP11.envelope_ns}" xmlns:{prefix}="{tns}"><s:Body>{body}</s:Body>'
            f"</s:Envelope>").encode()


def post_soap11(url: str, body: bytes):
    """POST ``body`` as SOAP 1.1 on a fresh connection; Deferred of the reply's bytes."""
    from dsmt.transports.soap.core import SOAP11
    return treq.post(url, data=body, headers={"content-type": SOAP11.content_type},
                     pool=HTTPConnectionPool(reactor, persistent=False)).addCallback(treq.content)


def committed_client(name: str):
    """A synchronous zeep client of the committed ``wsdl/<name>.wsdl`` that accepts the PsEPR port too (every
    dsmt WSDL declares an HTTP and a PsEPR port)."""
    import zeep

    from dsmt.transports.soap import PSEPR_TRANSPORT
    from dsmt.transports.soap.zeepsupport import binding_classes, make_client
    transport = zeep.Transport()
    transport.binding_classes = binding_classes(PSEPR_TRANSPORT)
    return make_client(wsdl_file(name), transport)


def port_addresses(client) -> dict:
    """``{port name: (transport URI, address)}`` of a zeep client's WSDL."""
    return {port.name: (port.binding.transport, port.binding_options["address"])
            for service in client.wsdl.services.values() for port in service.ports.values()}

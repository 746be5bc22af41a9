"""Service hosting: refusals as faults, the shared daemon options, and a farm of services in one process."""
from __future__ import annotations

import pytest
import treq
import zeep.exceptions
from spyne import ServiceBase, Unicode, rpc
from twisted.internet import defer, reactor
from twisted.python import usage
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from dsmt.server.faults import client_fault, refusal_fault, subcode
from dsmt.server.hosting import HostingOptions, ServiceHost, caller_subject, host_service, resource_path
from dsmt.server.manage.wsdm import OperationalStatus, StaticResource
from dsmt.server.refusal import Refusal
from dsmt.transports.http import TreqTransport
from dsmt.transports.psepr.client import PsEPRConnection
from dsmt.transports.psepr_soap import PsEPRTransport, service_address
from dsmt.transports.soap import PSEPR_TRANSPORT, wssec
from dsmt.transports.soap.core import SOAP11, SOAP12
from dsmt.transports.soap.pki import Purpose, TrustStore
from dsmt.transports.soap.zeepsupport import bind, make_client
from tests.support.psepr import PASSWORD, RouterHarness, connect
from tests.support.testpki import NOW, authorities, issue
from tests.transports.soap.service import FaultView

TNS = "http://dsmt.org/ns/test/hosting"
LOCAL = "tcp:0:interface=127.0.0.1"


class NoLease(Refusal):
    fault = "NoLease"


class AdmissionRefused(Refusal):
    fault = "AdmissionRefused"


def clock():
    return NOW


def node_service(node: str) -> type:
    """A per-instance service: answers with its node and the verified caller; refuses on demand."""

    class NodeService(ServiceBase):
        @rpc(_returns=Unicode)
        def who(ctx):
            return f"{node} for {caller_subject(ctx)}"

        @rpc(Unicode, _returns=Unicode)
        def refuse(ctx, code):
            raise refusal_fault(AdmissionRefused(code, f"refused: {code}"))

    return NodeService


def post(url: str, body: bytes, version=SOAP11):
    return treq.post(url, data=body, headers={"content-type": version.content_type},
                     pool=HTTPConnectionPool(reactor, persistent=False)).addCallback(treq.content)


def refuse_envelope(version, code: str) -> bytes:
    return (f'<s:Envelope xmlns:s="{version.envelope_ns}" xmlns:t="{TNS}"><s:Body><t:refuse><t:code>{code}'
            f"</t:code></t:refuse></s:Body></s:Envelope>").encode()


# ------------------------------------------------------------------ faults

def test_refusal_faults_follow_the_dslice_convention():
    assert refusal_fault(NoLease("no-lease", "slice x holds no lease here")).faultcode == "Client.NoLease"
    fault = refusal_fault(AdmissionRefused("already-leased", "slice x already holds a lease"))
    assert (fault.faultcode, fault.faultstring) == ("Client.AdmissionRefused.already-leased",
                                                     "slice x already holds a lease")
    assert refusal_fault(Refusal("capacity", "full")).faultcode == "Client.Refused"
    assert refusal_fault(Refusal("capacity", "full"), "AdmissionRefused").faultcode == \
        "Client.AdmissionRefused.capacity"
    assert refusal_fault(NoLease("x", "y"), "BadLease").faultcode == "Client.BadLease"
    # codes that are no NCName (or hold the separator '.') become CamelCase
    assert [subcode(c) for c in ("not-yet-valid", "rate.limit", "2fast", "x y!", "", "_ok")] == \
        ["not-yet-valid", "RateLimit", "Code2fast", "XY", "Code", "_ok"]
    assert client_fault("Shortage", "too few").faultcode == "Client.Shortage"


class FaultsOnTheWire(unittest.TestCase):
    """The SOAP core writes every refusal as a valid fault in both versions."""

    @defer.inlineCallbacks
    def setUp(self):
        self.hosts = []
        for version in (SOAP11, SOAP12):
            host = host_service([node_service("n1")], TNS, "node", path="node", http=LOCAL, soap_version=version)
            host.startService()
            self.hosts.append(host)
        self.urls = {}
        for version, host in zip((SOAP11, SOAP12), self.hosts):
            (port,) = yield host.when_listening()
            self.urls[version] = f"http://127.0.0.1:{port}/node"

    @defer.inlineCallbacks
    def tearDown(self):
        for host in self.hosts:
            yield host.stopService()

    @defer.inlineCallbacks
    def test_admission_codes_with_dashes_and_odd_codes(self):
        for code, written in (("already-leased", "already-leased"), ("wrong-node", "wrong-node"),
                              ("rate.limit", "RateLimit"), ("9lives", "Code9lives")):
            fault = FaultView((yield post(self.urls[SOAP11], refuse_envelope(SOAP11, code))))
            assert fault.code == f"Client.AdmissionRefused.{written}", fault
            assert fault.reason == f"refused: {code}"
            fault = FaultView((yield post(self.urls[SOAP12], refuse_envelope(SOAP12, code), SOAP12)))
            assert (fault.code, fault.subcodes) == ("Sender", [(TNS, "AdmissionRefused"), (TNS, written)]), fault


# ------------------------------------------------------------------ options

def make_pki(tmp_path):
    from cryptography.hazmat.primitives import serialization
    ca, _ = authorities()
    service = issue(ca, "service", "host")
    (tmp_path / "ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "s.pem").write_bytes(service.cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "s.key").write_bytes(service.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(tmp_path / "ca.pem"), str(tmp_path / "s.pem"), str(tmp_path / "s.key")


@pytest.mark.parametrize("arguments, complaint", [
    (["--http", LOCAL, "--cert", "s.pem"], "give both --cert and --key"),
    (["--http", LOCAL], "unsigned requests are refused by default, so --ca is needed"),
    (["--allow-unsigned"], "nothing to serve on"),
    (["--http", LOCAL, "--allow-unsigned", "--manage-psepr"], "--manage-psepr needs --router"),
    (["--http", LOCAL, "--ca", "missing.pem"], "missing.pem"),
    (["--router", "http://x", "--allow-unsigned"], "http://x"),
])
def test_hosting_options_refuse_what_cannot_work(arguments, complaint):
    with pytest.raises(usage.UsageError, match=complaint):
        HostingOptions().parseOptions(arguments)


def test_hosting_options_build_a_fresh_policy_and_connection_per_instance(tmp_path):
    ca, cert, key = make_pki(tmp_path)
    (tmp_path / "pw").write_text("secret\n")
    options = HostingOptions()
    options.parseOptions(["--http", LOCAL, "--ca", ca, "--ca", ca, "--cert", cert, "--key", key, "--soap12",
                          "--router", "psepr://127.0.0.1:1", "--password-file", str(tmp_path / "pw"),
                          "--instance", "n1"])
    assert options["soap-version"] is SOAP12 and options["password"] == "secret"
    first, second = options.new_policy(), options.new_policy()
    assert first is not second and first.verifier is not second.verifier and first.require_signed
    assert first.signer is not None
    connection = options.new_connection("n2")
    assert (connection.service, connection.instance) == ("service", "n2")
    assert options.new_connection().instance == "n1"
    unsigned = HostingOptions()
    unsigned.parseOptions(["--http", LOCAL, "--allow-unsigned"])
    assert unsigned.new_policy() is None and unsigned.new_connection() is None
    allowing = HostingOptions()
    allowing.parseOptions(["--http", LOCAL, "--allow-unsigned", "--ca", ca])
    assert not allowing.new_policy().require_signed and allowing.new_policy().signer is None


def test_resource_paths_and_mount_conflicts():
    assert resource_path("/nodemanager/10.0.0.7/") == [b"nodemanager", b"10.0.0.7"]
    for bad in ("", "a//b", "../x", "a/ b", "ä"):
        with pytest.raises(ValueError, match="not a usable resource path"):
            resource_path(bad)
    host = ServiceHost(http=LOCAL)
    host.add([node_service("a")], TNS, "node", path="nm/a")
    with pytest.raises(ValueError, match="already mounted at /nm/a"):
        host.add([node_service("a")], TNS, "node", path="nm/a/")
    with pytest.raises(ValueError, match="needs the service's ManageableResource"):
        host.add([node_service("b")], TNS, "node", path="nm/b", manage_http=LOCAL)
    with pytest.raises(ValueError, match="not a usable SOAP service name"):
        host.add([node_service("c")], TNS, "node", path="nm/c", psepr_service="a/b")


class ListenFailure(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_port_that_cannot_listen_fails_when_listening_with_the_endpoint(self):
        blocker = ServiceHost(http=LOCAL)
        blocker.startService()
        (port,) = yield blocker.when_listening()
        self.addCleanup(blocker.stopService)
        host = ServiceHost(http=[LOCAL, f"tcp:{port}:interface=127.0.0.1"])
        host.startService()
        with self.assertRaises(RuntimeError) as caught:
            yield host.when_listening()
        assert f"cannot listen on tcp:{port}:interface=127.0.0.1" in str(caught.exception)
        self.flushLoggedErrors()
        yield host.stopService()
        assert host.ports == []
        bad = ServiceHost(http="nonsense:1")
        bad.startService()
        with self.assertRaises(RuntimeError):
            yield bad.when_listening()
        yield bad.stopService()


# ------------------------------------------------------------------ a farm: many instances, one process

class Farm(unittest.TestCase):
    """Three node services in one process: one site, one path, one connection, one policy each."""

    timeout = 20
    NODES = ("n1", "n2", "n3")

    @defer.inlineCallbacks
    def setUp(self):
        self.router = yield RouterHarness().start()
        ca, _ = authorities()
        self.service_party = issue(ca, "service", "farm")
        self.user = issue(ca, "user", "alice")
        self.trust_store = TrustStore([ca.cert])
        self.host = ServiceHost(http=LOCAL)
        self.status = OperationalStatus.AVAILABLE
        for node in self.NODES:
            policy = wssec.WsSecurityPolicy(self.trust_store, self.service_party.key, self.service_party.cert,
                                            require_signed=False, clock=clock)
            connection = PsEPRConnection.from_urls(self.router.url, service="bob", password=PASSWORD,
                                                   instance=node)
            resource = StaticResource(f"urn:uuid:{node}", node, node, "1", lambda: self.status)
            self.host.add([node_service(node)], TNS, "node", path=f"nodemanager/{node}", psepr_service="node",
                          policy=policy, connection=connection, resource=resource, manage_psepr=True)
        self.host.startService()
        (port,) = yield self.host.when_listening()
        self.base = f"http://127.0.0.1:{port}"
        yield defer.gatherResults([hosted.endpoint.start() for hosted in self.host.hosted])
        for hosted in self.host.hosted:
            yield hosted.connection.connect()
            yield hosted.connection.flush()
        self.alice = yield connect(self.router.url, "alice", instance="caller")
        self.transports = []

    @defer.inlineCallbacks
    def tearDown(self):
        for transport in self.transports:
            yield transport.aclose()
        self.alice.close()
        yield self.host.stopService()
        yield self.router.stop()

    def signing(self):
        return (wssec.Signer(self.user.key, self.user.cert, clock=clock),
                wssec.Verifier(self.trust_store, purpose=Purpose.SERVER, clock=clock))

    @defer.inlineCallbacks
    def http_client(self, node, signed):
        transport = TreqTransport()
        self.transports.append(transport)
        wsdl = yield defer.ensureDeferred(transport.fetch(f"{self.base}/nodemanager/{node}?wsdl"))
        if signed:
            transport = wssec.AsyncSigningTransport(transport, *self.signing())
        return make_client(wsdl, transport, asynchronous=True)

    @defer.inlineCallbacks
    def test_each_instance_answers_for_itself_over_http_signed_and_unsigned(self):
        for node in self.NODES:
            client = yield self.http_client(node, signed=False)
            assert (yield defer.ensureDeferred(client.service.who())) == f"{node} for None"
            client = yield self.http_client(node, signed=True)
            assert (yield defer.ensureDeferred(client.service.who())) == f"{node} for CN=alice,OU=user"
            with self.assertRaises(zeep.exceptions.Fault) as caught:
                yield defer.ensureDeferred(client.service.refuse("capacity"))
            assert caught.exception.message == "refused: capacity"

    @defer.inlineCallbacks
    def test_each_instance_answers_for_itself_over_psepr_and_multicast_reaches_all(self):
        from dsmt.transports.psepr_soap import multicast_call
        wsdl = self.host.hosted[0].psepr_core.wsdl(service_address("node"))
        signer, verifier = self.signing()
        for node in self.NODES:
            transport = PsEPRTransport(self.alice, timeout=5, instance=node, signer=signer, verifier=verifier)
            yield transport.start()
            self.addCleanup(transport.close)
            service = bind(make_client(wsdl, transport, asynchronous=True), PSEPR_TRANSPORT)
            assert (yield defer.ensureDeferred(service.who())) == f"{node} for CN=alice,OU=user"
        transport = PsEPRTransport(self.alice, timeout=5, signer=signer, verifier=verifier)
        yield transport.start()
        self.addCleanup(transport.close)
        client = make_client(wsdl, transport, asynchronous=True)
        results = yield multicast_call(transport, client.service, "who", instances=list(self.NODES), deadline=5)
        # one policy (one replay cache) per instance: the one signed request is accepted by each
        assert {name: result.value for name, result in results.items()} == {
            node: f"{node} for CN=alice,OU=user" for node in self.NODES}

    @defer.inlineCallbacks
    def test_manageability_per_instance_on_its_own_connection(self):
        from dsmt.server.manage.wsdm import MUWS2_NS, manageability_core
        from lxml import etree
        resource = self.host.hosted[1].resource
        wsdl = manageability_core(resource, transport_uri=PSEPR_TRANSPORT).wsdl(service_address("manageability"))
        transport = PsEPRTransport(self.alice, timeout=5, instance="n2")
        yield transport.start()
        self.addCleanup(transport.close)
        service = bind(make_client(wsdl, transport, asynchronous=True), PSEPR_TRANSPORT)
        (caption,) = yield defer.ensureDeferred(service.GetResourceProperty(etree.QName(MUWS2_NS, "Caption")))
        assert caption.text == "n2"

"""Manageability (WSDM over WS-RF RP 1.2): the router and PLDB daemons as twistd builds them, on real sockets.

zeep clients are asynchronous (``TreqTransport``, WSDL fetched from ``?wsdl``)
so the trial reactor keeps serving; broken requests are POSTed raw with treq.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import treq
import zeep
from lxml import etree
from twisted.internet import defer, reactor, task
from twisted.python import usage
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from dsmt.server.manage.daemons import camel
from dsmt.server.manage.wsdm import (
    ACTIONS, RPW_NS, WSRF_FAULT_ACTION, MANAGE_NS, MUWS1_NS, MUWS2_NS, RP_NS, OperationalStatus, StaticResource, manageability_core, property_document,
    resource_id_for)
from dsmt.server.pldb import daemon as pldb_daemon
from dsmt.transports.http import TreqTransport
from dsmt.server.psepr_router import daemon as router_service
from dsmt.transports.psepr.accounts import Accounts, passwd_line
from dsmt.transports.psepr.event import Event
from dsmt.transports.psepr_soap import PsEPRTransport, service_address
from dsmt.transports.soap import HTTP_TRANSPORT, PSEPR_TRANSPORT
from dsmt.transports.soap.core import SOAP11, SOAP12
from dsmt.transports.soap.zeepsupport import bind, make_client
from tests.support.contracts import committed_client, port_addresses
from tests.support.psepr import PASSWORD, RouterHarness, accounts_text, connect
from tests.transports.soap.service import FaultView, assert_core_fault

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
WSDL_FILE = os.path.join(ROOT, "wsdl", "manageability.wsdl")
LOCAL = "tcp:0:interface=127.0.0.1"
PATHS = {SOAP11: "manage", SOAP12: "manage12"}
M1, M2, M = f"{{{MUWS1_NS}}}", f"{{{MUWS2_NS}}}", f"{{{MANAGE_NS}}}"


def _generator():
    spec = importlib.util.spec_from_file_location("wsdl_generate", os.path.join(ROOT, "wsdl", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _port(endpoint_service) -> defer.Deferred:
    """The port a started strports service listens on (its kernel-chosen number)."""
    number = defer.Deferred()

    def got(port):
        number.callback(port.getHost().port)
        return port  # the service's own Deferred keeps its port (stopService needs it)
    endpoint_service._waitingForPort.addCallback(got)
    return number


def _envelope(version, body: str) -> bytes:
    return (f'<s:Envelope xmlns:s="{version.envelope_ns}" xmlns:rp="{RP_NS}" xmlns:m2="{MUWS2_NS}">'
            f"<s:Body>{body}</s:Body></s:Envelope>").encode()


class ActionRecorder:
    """zeep plugin: the (request Action, reply Action) of every call, faults included, as they travel."""

    WSA = "{http://www.w3.org/2005/08/addressing}"

    def __init__(self):
        self.pairs: list[tuple[str, str]] = []
        self._sent = None

    def egress(self, envelope, http_headers, operation, binding_options):
        self._sent = envelope.findtext(f"{{{etree.QName(envelope).namespace}}}Header/{self.WSA}Action")
        return envelope, http_headers

    def ingress(self, envelope, http_headers, operation):
        self.pairs.append((self._sent, envelope.findtext(f"{{{etree.QName(envelope).namespace}}}Header/"
                                                         f"{self.WSA}Action")))
        return envelope, http_headers


def _values(elements) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for element in elements:
        found.setdefault(element.tag, []).append(element.text)
    return found


# ------------------------------------------------------------------ the pure model

def test_document_order_and_values():
    resource = StaticResource(resource_id_for("test", "a"), "cap", "desc", "1.2", lambda: OperationalStatus.AVAILABLE,
                              lambda: {"EventsIn": 3, "Ratio": 0.5})
    document = property_document(resource)
    assert [child.tag for child in document] == (
        [M1 + "ResourceId"] + [M1 + "ManageabilityCapability"] * 6
        + [M2 + n for n in ("Caption", "Description", "Version", "OperationalStatus", "CurrentTime")]
        + [M + "EventsIn", M + "Ratio"])
    assert document.findtext(M1 + "ResourceId") == resource_id_for("test", "a") != resource_id_for("test", "b")
    assert document.findtext(M1 + "ResourceId").startswith("urn:uuid:")
    assert document.find(M2 + "Caption").get("{http://www.w3.org/XML/1998/namespace}lang") == "en"
    assert document.findtext(M + "EventsIn") == "3" and document.findtext(M + "Ratio") == "0.5"
    assert camel("slow_consumer_drops") == "SlowConsumerDrops"


# ------------------------------------------------------------------ the router daemon

class ManageHarness(unittest.TestCase):
    timeout = 15

    def setUp(self):
        self.transports: list[TreqTransport] = []

    @defer.inlineCallbacks
    def tearDown(self):
        for transport in self.transports:
            yield transport.aclose()

    @defer.inlineCallbacks
    def client(self, version):
        transport = TreqTransport()
        self.transports.append(transport)
        wsdl = yield defer.ensureDeferred(transport.fetch(f"{self.base}/{PATHS[version]}?wsdl"))
        return make_client(wsdl, transport, asynchronous=True)

    def call(self, client, operation, *args):
        return defer.ensureDeferred(getattr(client.service, operation)(*args))

    def post(self, version, body: bytes):
        return treq.post(f"{self.base}/{PATHS[version]}", data=body, headers={"content-type": version.content_type},
                         pool=HTTPConnectionPool(reactor, persistent=False)).addCallback(treq.content)

    @defer.inlineCallbacks
    def status(self, version=SOAP11):
        client = yield self.client(version)
        (element,) = yield self.call(client, "GetResourceProperty", etree.QName(MUWS2_NS, "OperationalStatus"))
        return element.text


class RouterManageTests(ManageHarness):
    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        options = router_service.Options()
        options.parseOptions(["--allow-anonymous", "--listen", LOCAL, "--manage-http", LOCAL, "--stats-interval", "0",
                              "--name", "router1"])
        self.top = router_service.makeService(options)
        self.top.startService()
        listen, manage = list(self.top)
        self.router_url = f"psepr://127.0.0.1:{(yield _port(listen))}"
        self.base = f"http://127.0.0.1:{(yield _port(manage))}"
        self.connections = []

    @defer.inlineCallbacks
    def tearDown(self):
        for connection in self.connections:
            connection.close()
        yield super().tearDown()
        yield self.top.stopService()

    @defer.inlineCallbacks
    def test_the_three_operations_in_both_soap_versions_show_live_counters(self):
        for version in (SOAP11, SOAP12):
            client = yield self.client(version)
            document = yield self.call(client, "GetResourcePropertyDocument")
            assert document.tag == M + "ManageabilityProperties"
            assert document.findtext(M2 + "OperationalStatus") == "Available"
            assert document.findtext(M2 + "Caption") == "dsmt PsEPR router"
            assert document.findtext(M1 + "ResourceId").startswith("urn:uuid:")
            for metric in ("Connections", "Leases", "EventsIn", "Deliveries", "SlowConsumerDrops", "Rejected"):
                assert document.find(M + metric) is not None, metric
            before = int(document.findtext(M + "EventsIn"))

            connection = yield connect(self.router_url, "alice", instance=f"n{version.name}")
            self.connections.append(connection)
            connection.send(Event.attribute("/org/dsmt/ns/test/", "f", "v"))
            yield connection.flush()

            (events_in,) = yield self.call(client, "GetResourceProperty", etree.QName(MANAGE_NS, "EventsIn"))
            assert int(events_in.text) == before + 1
            found = _values((yield self.call(client, "GetMultipleResourceProperties", [
                etree.QName(MANAGE_NS, "Connections"), etree.QName(MUWS1_NS, "ManageabilityCapability"),
                etree.QName(MUWS2_NS, "CurrentTime")])))
            assert list(found) == [M + "Connections", M1 + "ManageabilityCapability", M2 + "CurrentTime"]
            assert int(found[M + "Connections"][0]) == len(self.connections)
            assert "http://docs.oasis-open.org/wsdm/muws/capabilities/OperationalStatus" in \
                found[M1 + "ManageabilityCapability"]

    @defer.inlineCallbacks
    def test_status_follows_the_listening_port(self):
        assert (yield self.status()) == "Available"
        listen = list(self.top)[0]
        yield listen.stopService()
        assert (yield self.status(SOAP12)) == "Unavailable"

    @defer.inlineCallbacks
    def test_unknown_qname_is_the_ws_rf_fault(self):
        for version in (SOAP11, SOAP12):
            client = yield self.client(version)
            with self.assertRaises(zeep.exceptions.Fault) as caught:
                yield self.call(client, "GetResourceProperty", etree.QName(MANAGE_NS, "Nonsense"))
            assert f"{{{MANAGE_NS}}}Nonsense is not a resource property" in caught.exception.message
            fault = FaultView((yield self.post(version, _envelope(
                version, '<rp:GetMultipleResourceProperties xmlns:x="urn:x"><rp:ResourceProperty>m2:Caption'
                         '</rp:ResourceProperty><rp:ResourceProperty>x:y</rp:ResourceProperty>'
                         '</rp:GetMultipleResourceProperties>'))))
            if version is SOAP11:
                assert fault.code == "Client.InvalidResourcePropertyQNameFault"
            else:
                assert (fault.code, fault.subcodes) == ("Sender", [(RP_NS, "InvalidResourcePropertyQNameFault")])
            assert fault.reason == "{urn:x}y is not a resource property of this resource"

    @defer.inlineCallbacks
    def test_malformed_requests_get_precise_faults(self):
        cases = [
            ("<rp:GetResourceProperty>q:Caption</rp:GetResourceProperty>", "InvalidBody",
             "'q:Caption' has no corresponding namespace declaration"),
            ("<rp:GetResourceProperty>not a qname</rp:GetResourceProperty>", "InvalidBody", "QName"),
            ("<rp:GetMultipleResourceProperties/>", "InvalidBody", "Missing child"),
            ("<rp:GetResourcePropertyDocument><rp:x/></rp:GetResourcePropertyDocument>", "InvalidBody",
             "Element content is not allowed"),
            ("<rp:SetResourceProperties/>", "UnknownOperation", "GetResourcePropertyDocument"),
        ]
        for version in (SOAP11, SOAP12):
            for body, subcode, reason in cases:
                assert_core_fault((yield self.post(version, _envelope(version, body))), version, subcode, reason)
        # the prefix is resolved in the request element's own scope, wherever it is declared
        reply = yield self.post(SOAP12, _envelope(SOAP12, f'<rp:GetResourceProperty xmlns:z="{MUWS2_NS}">z:Version'
                                                          "</rp:GetResourceProperty>"))
        assert etree.fromstring(reply).findtext(f".//{M2}Version") == "0.1.0"
        # the other SOAP version's envelope on a path is a VersionMismatch
        fault = FaultView((yield self.post(SOAP12, _envelope(SOAP11, "<rp:GetResourcePropertyDocument/>"))))
        assert fault.code == "VersionMismatch"

    @defer.inlineCallbacks
    def test_ws_addressing_2005_08_replies_correlate(self):
        wsa = "http://www.w3.org/2005/08/addressing"

        def request(action: str, body: str = "<rp:GetResourceProperty>m2:Caption</rp:GetResourceProperty>"):
            header = (f'<s:Header><a:Action xmlns:a="{wsa}">{action}</a:Action>'
                      f'<a:MessageID xmlns:a="{wsa}">urn:uuid:6b0f4c1e-0000-4000-8000-000000000001</a:MessageID>'
                      f'<a:To xmlns:a="{wsa}">{self.base}/manage12</a:To></s:Header>')
            return _envelope(SOAP12, body).replace(b"<s:Body>", header.encode() + b"<s:Body>")

        def headers(reply: bytes):
            root = etree.fromstring(reply)
            return (root.findtext(f"{{{SOAP12.envelope_ns}}}Header/{{{wsa}}}RelatesTo"),
                    root.findtext(f"{{{SOAP12.envelope_ns}}}Header/{{{wsa}}}Action"))

        reply = yield self.post(SOAP12, request(f"{RPW_NS}/GetResourceProperty/GetResourcePropertyRequest"))
        assert headers(reply) == ("urn:uuid:6b0f4c1e-0000-4000-8000-000000000001",
                                  f"{RPW_NS}/GetResourceProperty/GetResourcePropertyResponse")
        assert etree.fromstring(reply).findtext(f".//{M2}Caption") == "dsmt PsEPR router"
        # WS-RF faults carry WS-RF's fault Action
        reply = yield self.post(SOAP12, request(f"{RPW_NS}/GetResourceProperty/GetResourcePropertyRequest",
                                                "<rp:GetResourceProperty>m2:Nonsense</rp:GetResourceProperty>"))
        assert headers(reply)[1] == WSRF_FAULT_ACTION
        # an Action naming another operation than the Body's: WS-Addressing's ActionNotSupported, correlated
        wrong = f"{RPW_NS}/GetResourcePropertyDocument/GetResourcePropertyDocumentRequest"
        reply = yield self.post(SOAP12, request(wrong))
        fault = FaultView(reply)
        assert (fault.code, fault.subcodes) == ("Sender", [(wsa, "ActionNotSupported")])
        assert etree.fromstring(reply).findtext(f".//{{{wsa}}}ProblemAction/{{{wsa}}}Action") == wrong
        assert headers(reply) == ("urn:uuid:6b0f4c1e-0000-4000-8000-000000000001",
                                  "http://www.w3.org/2005/08/addressing/soap/fault")
        fault = FaultView((yield self.post(SOAP11, _envelope(SOAP11, "<rp:GetResourcePropertyDocument/>").replace(
            b"<s:Body>", f'<s:Header><a:Action xmlns:a="{wsa}">urn:other</a:Action></s:Header><s:Body>'.encode()))))
        assert fault.code == "ActionNotSupported"  # SOAP 1.1: wsa:ActionNotSupported as the faultcode

    @defer.inlineCallbacks
    def test_zeep_sends_and_receives_the_ws_rf_actions(self):
        for version in (SOAP11, SOAP12):
            client = yield self.client(version)
            seen = ActionRecorder()
            client.plugins.append(seen)
            yield self.call(client, "GetResourcePropertyDocument")
            yield self.call(client, "GetResourceProperty", etree.QName(MUWS2_NS, "Caption"))
            yield self.call(client, "GetMultipleResourceProperties", [etree.QName(MUWS2_NS, "Caption")])
            with self.assertRaises(zeep.exceptions.Fault):
                yield self.call(client, "GetResourceProperty", etree.QName(MANAGE_NS, "Nonsense"))
            assert seen.pairs == [(ACTIONS[op].input, ACTIONS[op].output) for op in (
                "GetResourcePropertyDocument", "GetResourceProperty", "GetMultipleResourceProperties")] + [
                (ACTIONS["GetResourceProperty"].input, WSRF_FAULT_ACTION)]
            assert seen.pairs[0] == (
                "http://docs.oasis-open.org/wsrf/rpw-2/GetResourcePropertyDocument/GetResourcePropertyDocumentRequest",
                "http://docs.oasis-open.org/wsrf/rpw-2/GetResourcePropertyDocument/GetResourcePropertyDocumentResponse")

    @defer.inlineCallbacks
    def test_served_wsdl_is_the_committed_one(self):
        generate = _generator()
        served = yield treq.get(f"{self.base}/manage?wsdl", pool=HTTPConnectionPool(reactor, persistent=False)
                                ).addCallback(treq.content)
        with open(WSDL_FILE, "rb") as handle:
            committed = handle.read()
        assert generate.normalise(served) == generate.normalise(committed, drop_psepr=True)
        assert committed == generate.committed_wsdl("manageability"), "run: python wsdl/generate.py"


def test_no_manageability_port_unless_asked():
    options = router_service.Options()
    options.parseOptions(["--allow-anonymous", "--listen", LOCAL, "--stats-interval", "0"])
    top = router_service.makeService(options)
    assert len(list(top)) == 1 and not hasattr(top, "manage")
    options = pldb_daemon.Options()
    options.parseOptions(["--router", "psepr://127.0.0.1:1", "--db", "x.sqlite"])
    pldb = pldb_daemon.makeService(options)
    pldb.store.close()
    assert isinstance(pldb, pldb_daemon.PldbService)


# ------------------------------------------------------------------ the router over PsEPR (loopback login)

class RouterPsEPRManageTests(unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def setUp(self):
        accounts = self.mktemp()
        with open(accounts, "w") as handle:
            handle.write(accounts_text())
        options = router_service.Options()
        options.parseOptions(["--accounts", accounts, "--listen", "unix:" + self.mktemp(), "--listen", LOCAL,
                              "--manage-psepr", "--stats-interval", "0", "--name", "router1"])
        self.top = router_service.makeService(options)
        self.top.startService()
        self.router_url = f"psepr://127.0.0.1:{(yield _port(list(self.top)[1]))}"
        yield self.top.manage_psepr.endpoint.lease.ready  # the router's own login, over loopback
        self.alice = yield connect(self.router_url, "alice")
        self.transport = PsEPRTransport(self.alice, timeout=5, instance="router1")
        yield self.transport.start()

    @defer.inlineCallbacks
    def tearDown(self):
        self.transport.close()
        self.alice.close()
        yield self.top.stopService()

    @defer.inlineCallbacks
    def test_committed_wsdl_psepr_port_answers_with_ws_rf_actions(self):
        client = make_client(WSDL_FILE, self.transport, asynchronous=True)
        seen = ActionRecorder()
        client.plugins.append(seen)
        service = bind(client, PSEPR_TRANSPORT)
        document = yield defer.ensureDeferred(service.GetResourcePropertyDocument())
        assert document.findtext(M2 + "Caption") == "dsmt PsEPR router"
        assert document.findtext(M2 + "OperationalStatus") == "Available"
        (status,) = yield defer.ensureDeferred(service.GetResourceProperty(etree.QName(MUWS2_NS, "OperationalStatus")))
        assert status.text == "Available"
        found = _values((yield defer.ensureDeferred(service.GetMultipleResourceProperties(
            [etree.QName(MANAGE_NS, "Connections"), etree.QName(MUWS1_NS, "ResourceId")]))))
        assert found == {M + "Connections": ["2"],  # alice and the router's own manageability connection
                         M1 + "ResourceId": [self.top.manage.resource_id]}
        with self.assertRaises(zeep.exceptions.Fault):
            yield defer.ensureDeferred(service.GetResourceProperty(etree.QName(MANAGE_NS, "Nonsense")))
        assert seen.pairs == [(ACTIONS[op].input, ACTIONS[op].output) for op in (
            "GetResourcePropertyDocument", "GetResourceProperty", "GetMultipleResourceProperties")] + [
            (ACTIONS["GetResourceProperty"].input, WSRF_FAULT_ACTION)]
        endpoint = self.top.manage_psepr.endpoint
        assert (endpoint.connection.service, endpoint.connection.instance) == ("psepr-router-manage", "router1")
        assert endpoint.stats["answered"] == 4 and endpoint.stats["faults"] == 1, endpoint.stats

    def test_internal_account_is_in_memory_only(self):
        factory = self.top.router
        assert "psepr-router-manage" in factory.core.accounts
        assert "psepr-router-manage" not in Accounts.parse(accounts_text())
        assert not factory.core.accounts.check("psepr-router-manage", PASSWORD)


@pytest.mark.parametrize("listen, complaint", [
    (["unix:/tmp/dsmt-router.sock"], "needs a TCP --listen endpoint"),
    (["ssl:23346:privateKey=k.pem:certKey=c.pem"], "the endpoints given are ssl:23346"),
])
def test_manage_psepr_needs_a_tcp_listener(listen, complaint):
    options = router_service.Options()
    arguments = ["--allow-anonymous", "--manage-psepr"] + [item for each in listen for item in ("--listen", each)]
    with pytest.raises(usage.UsageError, match=complaint):
        options.parseOptions(arguments)


def test_manage_psepr_refuses_an_accounts_file_holding_the_internal_account(tmp_path):
    accounts = tmp_path / "accounts"
    accounts.write_text(passwd_line("psepr-router-manage", "guessed") + "\n")
    with pytest.raises(usage.UsageError, match="internal account"):
        router_service.Options().parseOptions(["--accounts", str(accounts), "--manage-psepr"])
    assert router_service.first_tcp_listen(["unix:/x", "TCP6:0", "tcp:1"]) == 1


# ------------------------------------------------------------------ PLDB

class PldbManageTests(ManageHarness):
    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        self.router = yield RouterHarness().start()
        password = self.mktemp()
        with open(password, "w") as handle:
            handle.write(PASSWORD + "\n")
        options = pldb_daemon.Options()
        options.parseOptions(["--router", self.router.url, "--password-file", password, "--db", self.mktemp(),
                              "--watch", "/org/dsmt/ns/deployment/", "--instance", "pldb1",
                              "--manage-http", LOCAL, "--manage-psepr"])
        self.top = pldb_daemon.makeService(options)
        self.top.startService()
        http = [s for s in self.top if hasattr(s, "_waitingForPort")][0]
        self.base = f"http://127.0.0.1:{(yield _port(http))}"
        yield defer.DeferredList([lease.ready for lease in self.top.pldb.leases])
        self.alice = yield connect(self.router.url, "alice")

    @defer.inlineCallbacks
    def tearDown(self):
        self.alice.close()
        yield super().tearDown()
        yield self.top.stopService()
        yield self.router.stop()

    @defer.inlineCallbacks
    def test_counters_and_status_over_http_in_both_versions(self):
        self.alice.send(Event.attribute("/org/dsmt/ns/deployment/x/", "status", "running"))
        yield self.alice.flush()
        while self.top.pldb.recorded < 1:
            yield task.deferLater(reactor, 0.01, lambda: None)
        for version in (SOAP11, SOAP12):
            client = yield self.client(version)
            document = yield self.call(client, "GetResourcePropertyDocument")
            assert document.findtext(M2 + "OperationalStatus") == "Available"
            assert document.findtext(M2 + "Caption") == "dsmt PLDB"
            found = _values((yield self.call(client, "GetMultipleResourceProperties", [
                etree.QName(MANAGE_NS, "Recorded"), etree.QName(MANAGE_NS, "ValuesStored"),
                etree.QName(MANAGE_NS, "Answered")])))
            assert found == {M + "Recorded": ["1"], M + "ValuesStored": ["1"], M + "Answered": ["0"]}
        yield self.router.stop()  # PLDB loses its router and keeps trying
        while self.top.pldb.connection.connected:
            yield task.deferLater(reactor, 0.01, lambda: None)
        assert (yield self.status(SOAP12)) == "PartiallyAvailable"

    @defer.inlineCallbacks
    def test_over_psepr_in_both_versions(self):
        transport = PsEPRTransport(self.alice, timeout=5)
        yield transport.start()
        self.addCleanup(transport.close)
        soap12_wsdl = manageability_core(self.top.manage, soap_version=SOAP12,
                                         transport_uri=PSEPR_TRANSPORT).wsdl(service_address("manageability"))
        for wsdl in (WSDL_FILE, soap12_wsdl):  # the committed WSDL's PsEPR port is SOAP 1.1
            client = make_client(wsdl, transport, asynchronous=True)
            service = bind(client, PSEPR_TRANSPORT)
            (status,) = yield defer.ensureDeferred(
                service.GetResourceProperty(etree.QName(MUWS2_NS, "OperationalStatus")))
            assert status.text == "Available"
            document = yield defer.ensureDeferred(service.GetResourcePropertyDocument())
            assert document.findtext(M2 + "Caption") == "dsmt PLDB"
            found = _values((yield defer.ensureDeferred(service.GetMultipleResourceProperties(
                [etree.QName(MANAGE_NS, "Answered"), etree.QName(MUWS1_NS, "ResourceId")]))))
            assert found == {M + "Answered": ["0"], M1 + "ResourceId": [self.top.manage.resource_id]}
            with self.assertRaises(zeep.exceptions.Fault) as caught:
                yield defer.ensureDeferred(service.GetResourceProperty(etree.QName(MANAGE_NS, "Nonsense")))
            assert "Nonsense is not a resource property" in caught.exception.message
        endpoint = [s for s in self.top if hasattr(s, "cache")][0]
        assert endpoint.stats["answered"] == 8 and endpoint.stats["faults"] == 2, endpoint.stats


# ------------------------------------------------------------------ the committed WSDL

def test_python_m_zeep_loads_the_committed_wsdl():
    result = subprocess.run([sys.executable, "-m", "zeep", WSDL_FILE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "GetResourcePropertyDocument() -> _value_1: ANY" in result.stdout, result.stdout


def test_the_committed_wsdl_declares_an_http_and_a_psepr_port():
    client = committed_client("manageability")
    ports = port_addresses(client)
    assert ports == {"manageability": (HTTP_TRANSPORT, "http://localhost:8081/manage"),
                     "manageability_psepr": (PSEPR_TRANSPORT, "psepr:/org/dsmt/ns/soap/manageability/")}
    for uri in (HTTP_TRANSPORT, PSEPR_TRANSPORT):
        assert bind(client, uri).GetResourceProperty is not None

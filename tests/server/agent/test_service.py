"""The agent over SOAP: zeep clients from the committed wsdl/agent.wsdl, over HTTP and PsEPR, signed and not."""
from __future__ import annotations

import itertools

import treq
import zeep
import zeep.exceptions
from zeep.proxy import AsyncServiceProxy
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from dsmt.server.agent.core import Agent, NodeRegistry
from dsmt.server.agent.service import HTTP_PATH, NAME, PSEPR_SERVICE, TNS, agent_service
from dsmt.server.agent.tickets import verify_ticket
from dsmt.server.hosting import host_service
from dsmt.transports.http import TreqTransport
from dsmt.transports.psepr.client import PsEPRConnection
from dsmt.transports.psepr_soap import PsEPRTransport
from dsmt.transports.soap import HTTP_TRANSPORT, PSEPR_TRANSPORT, wssec
from dsmt.transports.soap.core import SOAP11
from dsmt.transports.soap.pki import Purpose
from dsmt.transports.soap.zeepsupport import bind, make_client
from tests.support.contracts import assert_served_wsdl_is_committed, committed_client, port_addresses, wsdl_file, zeep_dump
from tests.support.psepr import PASSWORD, RouterHarness, connect
from tests.transports.soap.service import FaultView, assert_core_fault

from .support import NOW, parties

WSDL_FILE = wsdl_file("agent")
LOCAL = "tcp:0:interface=127.0.0.1"
BINDING = f"{{{TNS}}}{NAME}"
NODES = {"10.0.0.1": (2, "http://10.0.0.1:8091/nodemanager"), "10.0.0.2": (1, "http://10.0.0.2:8091/nodemanager"),
         "full.example": (0, None)}


def spec(name="oceanstore", numnodes=2, leaselen=3600, ips=None) -> str:
    preferred = f"<ips>{ips}</ips>" if ips is not None else ""
    return (f'<?xml version="1.0" ?><slice><name>{name}</name><numnodes>{numnodes}</numnodes>'
            f"<leaselen>{leaselen}</leaselen>{preferred}</slice>")


def clock():
    return NOW


def raw(body: str) -> bytes:
    return (f'<s:Envelope xmlns:s="{SOAP11.envelope_ns}" xmlns:a="{TNS}"><s:Body>{body}</s:Body>'
            f"</s:Envelope>").encode()


class AgentHarness(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.router = yield RouterHarness().start()
        pki = parties()
        registry = NodeRegistry()
        for node, (slots, endpoint) in NODES.items():
            registry.register(node, slots, endpoint)
        counter = itertools.count(1)
        self.agent = Agent(registry, pki.agent.key, pki.agent.cert, clock, new_id=lambda: f"T-{next(counter)}")
        policy = wssec.WsSecurityPolicy(pki.trust, pki.agent.key, pki.agent.cert, require_signed=False, clock=clock)
        connection = PsEPRConnection.from_urls(self.router.url, service="bob", password=PASSWORD, instance="agent1")
        self.host = host_service([agent_service(self.agent, signed_registration=True)], TNS, NAME, path=HTTP_PATH,
                                 http=LOCAL, policy=policy, connection=connection, psepr_service=PSEPR_SERVICE)
        self.host.startService()
        (port,) = yield self.host.when_listening()
        self.url = f"http://127.0.0.1:{port}/{HTTP_PATH}"
        hosted = self.host.hosted[0]
        yield hosted.endpoint.start()
        yield hosted.connection.connect()
        yield hosted.connection.flush()
        self.caller = yield connect(self.router.url, "alice", instance="svm")
        self.transports = []

    @defer.inlineCallbacks
    def tearDown(self):
        for transport in self.transports:
            yield defer.ensureDeferred(transport.aclose())
        self.caller.close()
        yield self.host.stopService()
        yield self.router.stop()

    def signing(self, party=None):
        party = party or parties().user
        return (wssec.Signer(party.key, party.cert, clock=clock),
                wssec.Verifier(parties().trust, purpose=Purpose.SERVER, clock=clock))

    def http_service(self, signed: bool):
        transport = TreqTransport()
        self.transports.append(transport)
        if signed:
            transport = wssec.AsyncSigningTransport(transport, *self.signing())
        client = make_client(WSDL_FILE, transport, asynchronous=True)
        return AsyncServiceProxy(client, client.wsdl.bindings[BINDING], address=self.url)

    @defer.inlineCallbacks
    def psepr_service(self, signed: bool):
        options = dict(zip(("signer", "verifier"), self.signing())) if signed else {}
        transport = PsEPRTransport(self.caller, timeout=5, **options)
        yield transport.start()
        self.transports.append(transport)
        return bind(make_client(WSDL_FILE, transport, asynchronous=True), PSEPR_TRANSPORT)

    @defer.inlineCallbacks
    def services(self):
        """(label, service proxy) for HTTP and PsEPR, unsigned and signed."""
        found = []
        for signed in (False, True):
            found.append((f"http signed={signed}", self.http_service(signed)))
            found.append((f"psepr signed={signed}", (yield self.psepr_service(signed))))
        return found

    def post(self, body: bytes):
        return treq.post(self.url, data=body, headers={"content-type": SOAP11.content_type},
                         pool=HTTPConnectionPool(reactor, persistent=False)).addCallback(treq.content)


def call(service, operation, *args):
    return defer.ensureDeferred(getattr(service, operation)(*args))


class AgentServiceTests(AgentHarness):

    @defer.inlineCallbacks
    def test_getads_issue_and_release_on_every_transport(self):
        for label, service in (yield self.services()):
            ads = yield call(service, "GetAds")
            assert [(ad.node, ad.slots, ad.free, ad.endpoint) for ad in ads] == [
                ("10.0.0.1", 2, 2, NODES["10.0.0.1"][1]), ("10.0.0.2", 1, 1, NODES["10.0.0.2"][1]),
                ("full.example", 0, 0, None)], label
            tickets = yield call(service, "IssueTickets", spec(ips="10.0.0.2 10.0.0.1"))
            issued = [verify_ticket(data, parties().trust, now=NOW) for data in tickets]
            assert [(t.node, t.slice_name, t.leaselen) for t in issued] == [
                ("10.0.0.2", "oceanstore", 3600), ("10.0.0.1", "oceanstore", 3600)], label
            assert [ad.free for ad in (yield call(service, "GetAds"))] == [1, 0, 0], label
            released = yield call(service, "Release", [t.ticket_id for t in issued] + ["T-unknown"])
            assert released == 2, label
            assert (yield call(service, "Release", [issued[0].ticket_id])) == 0
            assert (yield call(service, "Release", [])) == 0

    @defer.inlineCallbacks
    def test_spec_and_shortage_faults_are_precise(self):
        cases = [
            (spec(numnodes=3), "Client.Shortage", "slice oceanstore needs 3 nodes; only 2 are available"),
            (spec(numnodes=2, ips="10.0.0.1 full.example 10.9.9.9"), "Client.Shortage",
             "preferred nodes refused: full.example: full (0 of 0 slots free); 10.9.9.9: not a node this agent "
             "knows"),
            (spec(name="root"), "Client.InvalidSpec", "root"),
            (spec(numnodes=0), "Client.InvalidSpec", "<numnodes> is 0; it must be between 1 and 1000"),
            ("<slice><name>x</name></slice", "Client.InvalidSpec", "not well-formed"),
            ("<!DOCTYPE slice [<!ENTITY x 'oceanstore'>]><slice><name>&x;</name></slice>", "Client.InvalidSpec",
             "DOCTYPE"),
            ("<slice>" + "<ips>1.2.3.4</ips>" * 20000 + "</slice>", "Client.InvalidSpec", "over the limit"),
            ("<slice><name>s</name><numnode>2</numnode></slice>", "Client.InvalidSpec", "unknown element <numnode>"),
        ]
        for label, service in (yield self.services()):
            for text, code, reason in cases:
                with self.assertRaises(zeep.exceptions.Fault) as caught:
                    yield call(service, "IssueTickets", text)
                assert caught.exception.code.endswith(code), (label, caught.exception.code)
                assert reason in caught.exception.message, (label, caught.exception.message)
        assert [ad.free for ad in self.agent.getads()] == [2, 1, 0]  # nothing was reserved

    @defer.inlineCallbacks
    def test_register_needs_a_signature_and_valid_values(self):
        unsigned, signed = self.http_service(False), self.http_service(True)
        with self.assertRaises(zeep.exceptions.Fault) as caught:
            yield call(unsigned, "Register", "10.0.0.9", 4, "http://10.0.0.9:8091/nodemanager")
        assert caught.exception.code.endswith("Client.InvalidRegistration")
        assert "Register must be signed" in caught.exception.message
        assert "10.0.0.9" not in self.agent.registry
        assert (yield call(signed, "Register", "Node9.Example.", 4, "https://node9.example/nodemanager")) == \
            "node9.example"
        psepr = yield self.psepr_service(True)
        assert (yield call(psepr, "Register", "node9.example", 5, "https://node9.example:8443/nodemanager")) == \
            "node9.example"
        ads = {ad.node: ad for ad in (yield call(unsigned, "GetAds"))}
        assert (ads["node9.example"].slots, ads["node9.example"].endpoint) == (5, "https://node9.example:8443/"
                                                                                 "nodemanager")
        for node, slots, endpoint, reason in [
            ("10.0.0.9", -1, "http://10.0.0.9/", "capacity must be a whole number of slots in 0..10000, not -1"),
            ("10.0.0.9", 10 ** 30, "http://10.0.0.9/", "capacity must be a whole number"),
            ("not a host!", 1, "http://10.0.0.9/", "not a host!"),
            ("10.0.0.9", 1, "ftp://10.0.0.9/", "not an http:// or https:// URL"),
            ("10.0.0.9", 1, "javascript:alert(1)", "not an http:// or https:// URL"),
        ]:
            with self.assertRaises(zeep.exceptions.Fault) as caught:
                yield call(signed, "Register", node, slots, endpoint)
            assert caught.exception.code.endswith("Client.InvalidRegistration"), caught.exception.code
            assert reason in caught.exception.message, caught.exception.message

    @defer.inlineCallbacks
    def test_wrong_types_and_hostile_envelopes_are_refused_by_the_schema(self):
        cases = [
            ("<a:Register><a:node>10.0.0.9</a:node><a:slots>ten</a:slots><a:endpoint>http://x/</a:endpoint>"
             "</a:Register>", "InvalidBody", "'ten' is not a valid value of the atomic type 'xs:integer'"),
            ("<a:Register><a:node>10.0.0.9</a:node></a:Register>", "InvalidBody", "Missing child"),
            ("<a:IssueTickets><a:spec><slice/></a:spec></a:IssueTickets>", "InvalidBody", "Element content"),
            ("<a:IssueTickets/>", "InvalidBody", "Missing child"),
            ("<a:Release>" + "<a:ticketId>x</a:ticketId>" * 1001 + "</a:Release>", "InvalidBody", "ticketId"),
            ("<a:Release><a:ticketId>" + "x" * 129 + "</a:ticketId></a:Release>", "InvalidBody", "maxLength"),
            ("<a:Shutdown/>", "UnknownOperation", "GetAds, IssueTickets, Register, Release"),
        ]
        for body, subcode, reason in cases:
            assert_core_fault((yield self.post(raw(body))), SOAP11, subcode, reason)
        doctype = b'<?xml version="1.0"?><!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]>' + raw("&x;")
        assert_core_fault((yield self.post(doctype)), SOAP11, "BadXML", "DOCTYPE")
        fault = FaultView((yield self.post(raw(f"<a:IssueTickets><a:spec>{'y' * 2_000_000}</a:spec>"
                                               "</a:IssueTickets>"))))
        assert fault.code == "Client.EnvelopeTooLarge", fault
        # the SOAP 1.1 faultcode of a service refusal, as docs/dslice.md lists it
        fault = FaultView((yield self.post(raw(f"<a:IssueTickets><a:spec>{spec(numnodes=9).replace('<', '&lt;')}"
                                               "</a:spec></a:IssueTickets>"))))
        assert (fault.code, fault.reason) == ("Client.Shortage", "slice oceanstore needs 9 nodes; only 2 are "
                                                                 "available")

    @defer.inlineCallbacks
    def test_replies_are_signed_by_the_agent(self):
        service = self.http_service(True)  # the signing transport verifies every reply against the CA
        ads = yield call(service, "GetAds")
        assert len(ads) == 3
        reply = yield self.post(raw("<a:GetAds/>"))
        caller = wssec.Verifier(parties().trust, purpose=Purpose.SERVER, clock=clock).verify(reply)
        assert caller.subject == "CN=agent,OU=service"

    def test_served_wsdl_is_the_committed_one(self):
        return assert_served_wsdl_is_committed(self.url, "agent")


def test_python_m_zeep_loads_the_committed_wsdl():
    dump = zeep_dump("agent")
    for line in ("IssueTickets(spec: xsd:string) -> ticket: xsd:base64Binary[]",
                 "Register(node: xsd:string, slots: xsd:integer, endpoint: xsd:string) -> node: xsd:string",
                 "Release(ticketId: ns0:Release_ticketIdType[]) -> released: xsd:integer"):
        assert line in dump, dump
    assert "GetAds() -> NodeAd: ns0:NodeAd[]" in dump, dump


def test_the_committed_wsdl_declares_an_http_and_a_psepr_port():
    ports = port_addresses(committed_client("agent"))
    assert ports == {"agent": (HTTP_TRANSPORT, "http://localhost:8090/agent"),
                     "agent_psepr": (PSEPR_TRANSPORT, "psepr:/org/dsmt/ns/soap/agent/")}

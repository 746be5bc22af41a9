"""The node manager's SOAP face over HTTP: zeep from the committed WSDL, precise faults, hostile envelopes."""
from __future__ import annotations

import os

import pytest
from twisted.internet import defer
from twisted.trial import unittest

from dsmt.server.agent.tickets import Ticket, sign_ticket
from dsmt.server.hosting import ServiceHost
from dsmt.server.nodemanager.daemon import build_node
from dsmt.server.nodemanager.service import SERVICE_NAME, TNS, nodemanager_service
from dsmt.server.nodemanager.sshkeys import generate_slice_keypair
from dsmt.transports.http import TreqTransport
from dsmt.transports.soap import HTTP_TRANSPORT
from dsmt.transports.soap.zeepsupport import bind, make_client
from tests.server.agent.support import NOW, parties
from tests.support.contracts import post_soap11, soap11_envelope, ZeepCalls, assert_served_wsdl_is_committed, wsdl_file, zeep_dump
from tests.transports.soap.service import FaultView

WSDL_FILE = wsdl_file("nodemanager")
NODE = "n1.test"
USER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKBWt+ZtAgTWkyBeFz00RGsP3g0Msw9xyhj3PHUpXqkO user@test"


def ticket(slice_name="oceanstore", node=NODE, ticket_id="T-1", **changes) -> bytes:
    agent = parties().agent
    fields = dict(ticket_id=ticket_id, slice_name=slice_name, node=node, resources={"slots": 1}, not_before=NOW - 10,
                  not_after=NOW + 3600, issuer=agent.subject, leaselen=3600)
    fields.update(changes)
    return sign_ticket(Ticket(**fields), agent.key, agent.cert)


def raw(body: str) -> bytes:
    return soap11_envelope(TNS, body, prefix="n")


post = post_soap11


class OverHttp(ZeepCalls, unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        base = self.mktemp()
        os.makedirs(base)
        self.node = build_node(NODE, os.path.join(base, NODE), parties().trust, capacity=2, clock=lambda: NOW)
        self.host = ServiceHost(http="tcp:0:interface=127.0.0.1")
        self.host.add([nodemanager_service(self.node)], TNS, SERVICE_NAME, path="nodemanager")
        self.host.startService()
        (port,) = yield self.host.when_listening()
        self.url = f"http://127.0.0.1:{port}/nodemanager"
        self.transport = TreqTransport()
        client = make_client(WSDL_FILE, self.transport, asynchronous=True)
        from zeep.proxy import AsyncServiceProxy
        self.service = AsyncServiceProxy(client, bind(client, HTTP_TRANSPORT)._binding, address=self.url)

    @defer.inlineCallbacks
    def tearDown(self):
        yield defer.ensureDeferred(self.transport.aclose())
        yield self.host.stopService()

    @defer.inlineCallbacks
    def test_a_whole_sliver_life_through_zeep(self):
        lease = yield self.call("Redeem", ticket=ticket())
        assert (lease.slice, lease.node, lease.expiresAt, lease.leaselen) == ("oceanstore", NODE, NOW + 3600, 3600)
        again = yield self.call("Redeem", ticket=ticket())
        assert again.leaseId == lease.leaseId                       # the same ticket, the same lease
        pair = generate_slice_keypair("oceanstore")
        sliver = yield self.call("CreateSliver", slice="oceanstore", leaseId=lease.leaseId,
                                 slicePublicKey=pair.public_line, slicePrivateKey=pair.private_openssh)
        assert (sliver.state, sliver.keys) == ("running", 0)
        assert (yield self.call("AddKey", slice="oceanstore", key=USER_KEY)) == 1
        assert (yield self.call("AddKey", slice="oceanstore", key=USER_KEY)) == 1
        assert (yield self.call("NukeKeys", slice="oceanstore")) == 0
        listed = yield self.call("ListSlivers")
        assert [s.slice for s in listed] == ["oceanstore"]
        deleted = yield self.call("DeleteSliver", slice="oceanstore")
        assert deleted.state == "terminated"
        assert (yield self.call("ListSlivers")) in ([], None)

    @defer.inlineCallbacks
    def test_every_refusal_is_its_fault(self):
        cases = [
            ("Redeem", dict(ticket=b"<t/>"), "Client.AdmissionRefused.malformed"),
            ("Redeem", dict(ticket=ticket(node="n2.test")), "Client.AdmissionRefused.wrong-node"),
            ("Redeem", dict(ticket=ticket(not_before=NOW - 7200, not_after=NOW - 3600)),
             "Client.AdmissionRefused.expired"),
            ("RenewLease", dict(slice="oceanstore"), "Client.NoLease"),
            ("GetSliver", dict(slice="oceanstore"), "Client.NoSliver"),
        ]
        for operation, kwargs, code in cases:
            fault = yield self.fault(operation, **kwargs)
            assert fault.code.endswith(code), (operation, fault.code, fault.message)
        lease = yield self.call("Redeem", ticket=ticket())
        fault = yield self.fault("CreateSliver", slice="oceanstore", leaseId="not-" + lease.leaseId,
                                 slicePublicKey=None, slicePrivateKey=None)
        assert fault.code.endswith("Client.BadLease"), fault.code
        yield self.call("CreateSliver", slice="oceanstore", leaseId=lease.leaseId, slicePublicKey=None,
                        slicePrivateKey=None)
        fault = yield self.fault("AddKey", slice="oceanstore", key='command="rm -rf /" ' + USER_KEY)
        assert fault.code.endswith("Client.InvalidKey") and "option" in fault.message, fault.message
        fault = yield self.fault("Redeem", ticket=ticket(slice_name="other", ticket_id="T-2", resources={"slots": 2}))
        assert fault.code.endswith("Client.AdmissionRefused.capacity"), fault.code

    @defer.inlineCallbacks
    def test_hostile_envelopes_get_core_faults(self):
        for body, code in (
                ("<n:Redeem><n:ticket>!!not base64!!</n:ticket></n:Redeem>", "Client.InvalidBody"),
                ("<n:AddKey><n:slice>x</n:slice></n:AddKey>", "Client.InvalidBody"),
                ("<n:Unknown/>", "Client.UnknownOperation")):
            fault = FaultView((yield post(self.url, raw(body))))
            assert fault.code == code, (body, fault)
        fault = FaultView((yield post(self.url, b'<!DOCTYPE x [<!ENTITY a "b">]>' + raw("<n:ListSlivers/>"))))
        assert fault.code == "Client.BadXML", fault
        huge = raw(f"<n:Redeem><n:ticket>{'A' * (2 * 1024 * 1024)}</n:ticket></n:Redeem>")
        fault = FaultView((yield post(self.url, huge)))
        assert fault.code == "Client.EnvelopeTooLarge", fault

    def test_served_wsdl_is_the_committed_one(self):
        return assert_served_wsdl_is_committed(self.url, "nodemanager")


@pytest.mark.timeout(60)
def test_python_m_zeep_loads_the_committed_wsdl():
    dump = zeep_dump("nodemanager")
    for line in ("Redeem(ticket: xsd:base64Binary) -> RedeemResult: ns0:LeaseInfo",
                 "CreateSliver(slice: xsd:string, leaseId: xsd:string, slicePublicKey: xsd:string, "
                 "slicePrivateKey: xsd:base64Binary) -> CreateSliverResult: ns0:SliverInfo"):
        assert line in dump, dump

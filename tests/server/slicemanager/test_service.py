"""The slice manager over SOAP/HTTP: zeep from the committed wsdl/slicemanager.wsdl, against a real agent and
real node managers in this process (``build_node``: SQLite store and directory sandbox each), unsigned.

Tickets are signed by the test PKI at its fixed instant, so every clock here is that instant.
"""
from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial import unittest

from dsmt.server.agent.core import Agent, NodeRegistry
from dsmt.server.agent.service import NAME as AGENT_NAME, TNS as AGENT_TNS, agent_service
from dsmt.server.hosting import ServiceHost
from dsmt.server.nodemanager.daemon import build_node
from dsmt.server.nodemanager.service import SERVICE_NAME as NM_NAME, TNS as NM_TNS, nodemanager_service
from dsmt.server.slicemanager import remote, service as sm_service
from dsmt.server.slicemanager.core import SliceManager
from dsmt.server.slicemanager.service import NAME, TNS, SliceLocks, SliceOwners, slicemanager_service
from dsmt.server.slicemanager.slicedir import SliceDirectory
from dsmt.server.utctime import utc_text
from dsmt.transports.http import TreqTransport
from dsmt.transports.soap import HTTP_TRANSPORT
from dsmt.transports.soap.zeepsupport import bind, make_client
from tests.server.agent.support import NOW, parties
from tests.support.contracts import post_soap11, soap11_envelope, ZeepCalls, assert_served_wsdl_is_committed, wsdl_file
from tests.transports.soap.service import FaultView

WSDL_FILE = wsdl_file("slicemanager")
LOCAL = "tcp:0:interface=127.0.0.1"
NODES = ("n1.test", "n2.test", "n3.test")
USER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKBWt+ZtAgTWkyBeFz00RGsP3g0Msw9xyhj3PHUpXqkO user@test"


def spec(name: str = "oceanstore", numnodes: int = 3) -> str:
    return f"<slice><name>{name}</name><numnodes>{numnodes}</numnodes><leaselen>3600</leaselen></slice>"


class Dslice:
    """An agent and node managers on one ServiceHost (HTTP, port 0); ``connections``: PsEPR connection per
    node (optional)."""

    def __init__(self, base: str, nodes=NODES, connections=None):
        pki = parties()
        self.registry = NodeRegistry()
        self.agent = Agent(self.registry, pki.agent.key, pki.agent.cert, clock=lambda: NOW)
        self.host = ServiceHost(http=LOCAL)
        self.host.add([agent_service(self.agent)], AGENT_TNS, AGENT_NAME, path="agent")
        self.nodes = {}
        for name in nodes:
            node = build_node(name, os.path.join(base, name), pki.trust, capacity=4, clock=lambda: NOW,
                              connection=(connections or {}).get(name))
            self.host.add([nodemanager_service(node)], NM_TNS, NM_NAME, path=f"nodemanager/{name}")
            self.nodes[name] = node

    @defer.inlineCallbacks
    def start(self, register=None):
        self.host.startService()
        (port,) = yield self.host.when_listening()
        self.base_url = f"http://127.0.0.1:{port}"
        for name in register or self.nodes:
            self.registry.register(name, 4, f"{self.base_url}/nodemanager/{name}")
        return self

    @property
    def agent_url(self) -> str:
        return f"{self.base_url}/agent"

    def stop(self):
        return self.host.stopService()


def zeep_service(transport, url: str):
    from zeep.proxy import AsyncServiceProxy
    client = make_client(WSDL_FILE, transport, asynchronous=True)
    return AsyncServiceProxy(client, bind(client, HTTP_TRANSPORT)._binding, address=url)


class OverHttp(ZeepCalls, unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        base = self.mktemp()
        os.makedirs(base)
        self.dslice = yield Dslice(base).start()
        self.treq = TreqTransport()
        self.home = os.path.join(base, "slicemanager")
        self.manager = SliceManager(remote.HttpAgentCalls(self.dslice.agent_url, self.treq),
                                    remote.HttpNodeCalls(self.treq), SliceDirectory(self.home), clock=lambda: NOW,
                                    timeout=5)
        self.subject = None
        self.reports = []
        self.host = ServiceHost(http=LOCAL)
        self.host.add([slicemanager_service(self.manager, SliceOwners(self.home), locks=SliceLocks(),
                                            on_report=self.reports.append)], TNS, NAME, path="slicemanager")
        self.host.startService()
        (port,) = yield self.host.when_listening()
        self.url = f"http://127.0.0.1:{port}/slicemanager"
        self.client_transport = TreqTransport()
        self.service = zeep_service(self.client_transport, self.url)

    @defer.inlineCallbacks
    def tearDown(self):
        yield defer.ensureDeferred(self.client_transport.aclose())
        yield defer.ensureDeferred(self.treq.aclose())
        yield self.host.stopService()
        yield self.dslice.stop()


    def post(self, body: bytes):
        return post_soap11(self.url, body)

    @staticmethod
    def raw(body: str) -> bytes:
        return soap11_envelope(TNS, body)

    @defer.inlineCallbacks
    def test_a_slice_life_as_svm_prints_it(self):
        ads = yield self.call("GetAds")
        assert sorted(ad.node for ad in ads.ad) == sorted(NODES) and ads.ok
        created = yield self.call("CreateSlice", spec=spec())
        assert (created.command, created.slice, created.ok) == ("createslice", "oceanstore", True)
        assert created.summary == "createslice oceanstore: 3 succeeded, 0 failed"
        assert [(r.node, r.ok, r.line, r.state) for r in created.result] == \
            [(n, True, f"Success on {n}", "running") for n in NODES]
        listed = yield self.call("NodeList", slice="oceanstore")
        assert listed.value == list(NODES)
        expiring = yield self.call("Expirations", slice="oceanstore")
        assert [r.line for r in expiring.result] == \
            [f"Sliver for slice oceanstore expires {utc_text(NOW + 3600)} on {n}" for n in NODES]
        assert {r.expiresAt for r in expiring.result} == {NOW + 3600}
        added = yield self.call("AddKey", slice="oceanstore", key=USER_KEY)
        assert [r.keys for r in added.result] == [1, 1, 1]
        renewed = yield self.call("RenewSlice", slice="oceanstore")
        assert renewed.ok and len(renewed.result) == 3
        deleted = yield self.call("DeleteSlice", slice="oceanstore")
        assert deleted.ok and deleted.summary == "deleteslice oceanstore: 3 succeeded, 0 failed"
        for node in self.dslice.nodes.values():
            assert node.list_slivers() == [] and node.slots_in_use() == 0
        fault = yield self.fault("NodeList", slice="oceanstore")
        assert fault.code.endswith("Client.NoSlice"), fault.code
        assert [r.command for r in self.reports] == ["getads", "createslice", "nodelist", "expirations", "addkey",
                                                     "renewslice", "deleteslice", "nodelist"]

    @defer.inlineCallbacks
    def test_a_node_failure_is_a_result_not_a_fault(self):
        self.dslice.registry.register("dead.test", 4, "http://127.0.0.1:1/nodemanager")
        created = yield self.call("CreateSlice", spec=spec("partial", 4))
        assert not created.ok
        (dead,) = [r for r in created.result if not r.ok]
        assert (dead.node, dead.code) == ("dead.test", "unreachable")
        assert dead.line.startswith("Error on dead.test: cannot reach dead.test")
        # retry what is left, as the HOWTO says: NewVms has nothing, NewLeases retries the ticket
        fault = yield self.fault("NewVms", slice="partial", node=["n1.test"])
        assert fault.code.endswith("Client.NoLease") and "holds no lease for n1.test" in fault.message
        again = yield self.call("NewLeases", slice="partial", node=[])
        assert [(r.node, r.code) for r in again.result] == [("dead.test", "unreachable")]

    @defer.inlineCallbacks
    def test_command_failures_are_precise_faults(self):
        cases = [
            ("CreateSlice", {"spec": "<slice>"}, "InvalidSpec"),
            ("CreateSlice", {"spec": '<!DOCTYPE x [<!ENTITY a "aaaa">]><slice/>'}, "InvalidSpec"),
            ("CreateSlice", {"spec": spec("root")}, "InvalidSpec"),
            ("CreateSlice", {"spec": spec("big", 50)}, "Shortage"),
            ("NodeList", {"slice": "../../etc"}, "InvalidSlice"),
            ("DeleteSlice", {"slice": "x" * 5000}, "InvalidSlice"),
            ("RenewSlice", {"slice": "nosuch"}, "NoSlice"),
            ("NewLeases", {"slice": "nosuch", "node": []}, "NoSlice"),
        ]
        for operation, kwargs, name in cases:
            fault = yield self.fault(operation, **kwargs)
            assert fault.code.endswith(f"Client.{name}"), (operation, kwargs, fault.code, fault.message)
            assert "Traceback" not in fault.message and fault.message
        yield self.call("CreateSlice", spec=spec("twice", 1))
        fault = yield self.fault("CreateSlice", spec=spec("twice", 1))
        assert fault.code.endswith("Client.SliceExists"), fault.code
        for key in ("not a key", USER_KEY + "\n" + USER_KEY, "x" * 20000):
            fault = yield self.fault("AddKey", slice="twice", key=key)
            assert fault.code.endswith("Client.InvalidKey"), (key[:20], fault.code)
        fault = yield self.fault("NewLeases", slice="twice", node=["no such node!"])
        assert fault.code.endswith("Client.InvalidNode"), fault.code
        fault = yield self.fault("NewLeases", slice="twice", node=["n1.test"])
        assert fault.code.endswith("Client.NoTicket"), fault.code

    @defer.inlineCallbacks
    def test_an_unreachable_agent_is_a_fault(self):
        self.manager.agent = remote.HttpAgentCalls("http://127.0.0.1:1/agent", self.treq)
        fault = yield self.fault("CreateSlice", spec=spec())
        assert fault.code.endswith("Client.AgentUnreachable") and "cannot reach the agent" in fault.message
        fault = yield self.fault("GetAds")
        assert fault.code.endswith("Client.AgentUnreachable")

    @defer.inlineCallbacks
    def test_hostile_envelopes(self):
        view = FaultView((yield self.post(self.raw("<m:CreateSlice><m:spec>" + "a" * (3 << 20)
                                                   + "</m:spec></m:CreateSlice>"))))
        assert view.code == "Client.EnvelopeTooLarge", view.code
        view = FaultView((yield self.post(self.raw("<m:NewLeases><m:slice>s</m:slice>"
                                                   + "<m:node>n</m:node>" * 1001 + "</m:NewLeases>"))))
        assert view.code == "Client.InvalidBody", view.code
        view = FaultView((yield self.post(self.raw("<m:DeleteSlice/>"))))
        assert view.code == "Client.InvalidBody", view.code
        view = FaultView((yield self.post(self.raw("<m:CreateSlice><m:spec>&lt;slice&gt;&lt;name&gt;a\u0000"
                                                   "</m:spec></m:CreateSlice>"))))
        assert view.code in ("Client.BadXML", "Client.InvalidSpec"), view.code
        big = spec("huge").replace("</slice>", "<ips>" + " ".join(f"h{i}.test" for i in range(40000)) + "</ips>"
                                   "</slice>")
        fault = yield self.fault("CreateSlice", spec=big)
        assert fault.code.endswith("Client.InvalidSpec"), fault.code
        assert SliceDirectory(self.home).names() == []

    @defer.inlineCallbacks
    def test_the_creator_owns_the_slice(self):
        self.patch(sm_service, "caller_subject", lambda ctx: self.subject)
        self.subject = "CN=alice,OU=user"
        yield self.call("CreateSlice", spec=spec("owned", 1))
        assert SliceOwners(self.home).owner("owned") == "CN=alice,OU=user"
        for subject in ("CN=mallory,OU=user", None):
            self.subject = subject
            for operation, kwargs in (("DeleteSlice", {}), ("NodeList", {}), ("AddKey", {"key": USER_KEY}),
                                      ("NewVms", {"node": []})):
                fault = yield self.fault(operation, slice="owned", **kwargs)
                assert fault.code.endswith("Client.NotOwner"), (subject, operation, fault.code)
            fault = yield self.fault("CreateSlice", spec=spec("owned", 1))
            assert fault.code.endswith("Client.NotOwner"), fault.code
        self.subject = "CN=alice,OU=user"
        deleted = yield self.call("DeleteSlice", slice="owned")
        assert deleted.ok and SliceOwners(self.home).owner("owned") is None
        self.subject = None     # unsigned creation: no owner, anyone may act
        yield self.call("CreateSlice", spec=spec("open", 1))
        self.subject = "CN=bob,OU=user"
        assert (yield self.call("NodeList", slice="open")).ok

    @defer.inlineCallbacks
    def test_commands_on_one_slice_queue(self):
        first = self.call("CreateSlice", spec=spec("queued", 3))
        second = self.call("NodeList", slice="queued")     # waits for the creation, then sees its nodes
        created, listed = yield defer.gatherResults([first, second])
        assert created.ok and listed.value == list(NODES)

    def test_served_wsdl_is_the_committed_one(self):
        return assert_served_wsdl_is_committed(self.url, "slicemanager")

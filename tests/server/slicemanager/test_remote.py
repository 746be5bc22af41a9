"""The slice manager's network adapters against real services in this process: HTTP and PsEPR give one story.

An agent and three node managers (``build_node``: real SQLite store and
directory sandbox each) are hosted on one :class:`ServiceHost` (HTTP, port 0)
and on a PsEPR router in this process; the :class:`SliceManager` core drives
them through :mod:`dsmt.server.slicemanager.remote` over each transport.
Unsigned (the WS-Security paths have their own tests); tickets are signed by
the test PKI at its fixed instant, so the services' clocks are that instant.
"""
from __future__ import annotations

import os

import pytest
from twisted.internet import defer
from twisted.trial import unittest
from zeep.exceptions import Fault

from dsmt.server.agent.core import Agent, NodeRegistry
from dsmt.server.agent.service import NAME as AGENT_NAME, TNS as AGENT_TNS, agent_service
from dsmt.server.hosting import ServiceHost
from dsmt.server.nodemanager.daemon import build_node
from dsmt.server.nodemanager.service import SERVICE_NAME, TNS, nodemanager_service
from dsmt.server.slicemanager import remote
from dsmt.server.slicemanager.calls import TIMEOUT, UNREACHABLE, LeaseInfo, NodeRequest, SliverInfo
from dsmt.server.slicemanager.core import SliceManager
from dsmt.server.slicemanager.slicedir import SliceDirectory
from dsmt.transports.http import TreqTransport
from dsmt.transports.psepr_soap import PsEPRTransport
from tests.server.agent.support import NOW, parties
from tests.support.psepr import RouterHarness, connect

NODES = ("n1.test", "n2.test", "n3.test")
LOCAL = "tcp:0:interface=127.0.0.1"


def spec(name: str, numnodes: int = 3) -> bytes:
    return (f"<slice><name>{name}</name><numnodes>{numnodes}</numnodes><leaselen>3600</leaselen></slice>").encode()


@pytest.mark.parametrize("code, expected", [
    ("soap:Client.AdmissionRefused.capacity", "AdmissionRefused.capacity"),
    ("Client.NoLease", "NoLease"),
    ("{http://schemas.xmlsoap.org/soap/envelope/}Client.NotOwner", "NotOwner"),
    ("soap:Server", "error"),
    ("", "error"),
    ("Custom", "Custom"),
])
def test_fault_codes_are_read_below_client(code, expected):
    assert remote.fault_code(Fault("m", code=code)) == expected


def test_soap12_subcodes_are_joined():
    from lxml.etree import QName
    fault = Fault("m", code="soap:Sender", subcodes=[QName(TNS, "AdmissionRefused"), QName(TNS, "already-leased")])
    assert remote.fault_code(fault) == "AdmissionRefused.already-leased"


class BothTransports(unittest.TestCase):
    """One agent, three node managers; the same commands over HTTP and over PsEPR."""

    @defer.inlineCallbacks
    def setUp(self):
        self.router = RouterHarness()
        yield self.router.start()
        base = self.mktemp()
        os.makedirs(base)
        pki = parties()
        self.registry = NodeRegistry()
        agent = Agent(self.registry, pki.agent.key, pki.agent.cert, clock=lambda: NOW)
        self.host = ServiceHost(http=LOCAL)
        self.agent_connection = yield connect(self.router.url, "alice", instance="agent")
        self.host.add([agent_service(agent)], AGENT_TNS, AGENT_NAME, path="agent", connection=self.agent_connection)
        self.nodes = {}
        for name in NODES:
            connection = yield connect(self.router.url, "bob", instance=name)
            node = build_node(name, os.path.join(base, name), pki.trust, capacity=4, connection=connection,
                              clock=lambda: NOW)
            self.host.add([nodemanager_service(node)], TNS, SERVICE_NAME, path=f"nodemanager/{name}",
                          connection=connection)
            self.nodes[name] = node
        self.host.startService()
        (port,) = yield self.host.when_listening()
        self.base_url = f"http://127.0.0.1:{port}"
        for name in NODES:
            self.registry.register(name, 4, f"{self.base_url}/nodemanager/{name}")
        for hosted in self.host.hosted:  # every endpoint holds its lease before a call is made
            yield hosted.endpoint.start()
        yield defer.gatherResults([h.connection.flush() for h in self.host.hosted])
        self.home = os.path.join(base, "home")
        self.treq = TreqTransport()
        self.caller = yield connect(self.router.url, "carol", instance="svm-test")
        self.psepr = PsEPRTransport(self.caller, timeout=5)
        yield self.psepr.start()

    @defer.inlineCallbacks
    def tearDown(self):
        self.psepr.close()
        self.caller.close()
        yield defer.ensureDeferred(self.treq.aclose())
        yield self.host.stopService()
        yield self.router.stop()

    def manager(self, transport: str, **options) -> SliceManager:
        if transport == "http":
            agent = remote.HttpAgentCalls(f"{self.base_url}/agent", self.treq)
            nodes = remote.HttpNodeCalls(self.treq)
        else:
            agent = remote.PsEPRAgentCalls(self.psepr)
            nodes = remote.PsEPRNodeCalls(self.psepr)
        return SliceManager(agent, nodes, SliceDirectory(self.home), clock=lambda: NOW, **options)

    @defer.inlineCallbacks
    def story(self, transport: str, slice_name: str) -> dict:
        """createslice, addkey, renewslice, deleteslice: each command's outcome kinds per node."""
        manager = self.manager(transport)
        seen = {}
        created = yield manager.createslice(spec(slice_name))
        seen["createslice"] = created
        key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKBWt+ZtAgTWkyBeFz00RGsP3g0Msw9xyhj3PHUpXqkO user@test"
        seen["addkey"] = yield manager.addkey(slice_name, key)
        seen["renewslice"] = yield manager.renewslice(slice_name)
        seen["deleteslice"] = yield manager.deleteslice(slice_name)
        return seen

    @defer.inlineCallbacks
    def test_the_same_story_over_both_transports(self):
        stories = {}
        for transport, slice_name in (("http", "overhttp"), ("psepr", "overpsepr")):
            stories[transport] = yield self.story(transport, slice_name)
        for command in ("createslice", "addkey", "renewslice", "deleteslice"):
            shapes = {}
            for transport, story in stories.items():
                report = story[command]
                assert report.ok, (transport, command, report.outcomes, report.error)
                shapes[transport] = {node: type(outcome).__name__ for node, outcome in report.outcomes.items()}
            assert shapes["http"] == shapes["psepr"], (command, shapes)
            assert sorted(shapes["http"]) == sorted(NODES)
        assert {n: o.keys for n, o in stories["psepr"]["createslice"].outcomes.items()} == dict.fromkeys(NODES, 0)
        assert set(stories["http"]["addkey"].outcomes.values()) == {1}
        for node in self.nodes.values():  # every sliver deleted, every lease released
            assert node.list_slivers() == [] and node.slots_in_use() == 0
        # ... and every ticket's reservation at the agent: the slots are advertised free again
        assert {ad.node: ad.free for ad in self.registry.ads(NOW)} == dict.fromkeys(NODES, 4)

    @defer.inlineCallbacks
    def test_refusals_carry_the_fault_code_over_both_transports(self):
        requests = [NodeRequest(name, f"{self.base_url}/nodemanager/{name}", {"ticket": b"<not-a-ticket/>"})
                    for name in NODES[:2]]
        for calls in (remote.HttpNodeCalls(self.treq), remote.PsEPRNodeCalls(self.psepr)):
            outcomes = yield calls.run("Redeem", requests, parallelism=2, timeout=5)
            assert {o.code for o in outcomes.values()} == {"AdmissionRefused.malformed"}, outcomes
            outcomes = yield calls.run("RenewLease", [NodeRequest(n, f"{self.base_url}/nodemanager/{n}",
                                                                  {"slice": "nosuch"}) for n in NODES],
                                       parallelism=3, timeout=5)
            assert {o.code for o in outcomes.values()} == {"NoLease"}, outcomes

    @defer.inlineCallbacks
    def test_an_unreachable_or_silent_node_is_reported_not_raised(self):
        dead = [NodeRequest("dead.test", "http://127.0.0.1:1/nodemanager", {"slice": "x"})]
        outcomes = yield remote.HttpNodeCalls(self.treq).run("GetSliver", dead, parallelism=1, timeout=5)
        assert outcomes["dead.test"].code == UNREACHABLE
        # over PsEPR nobody answers for an unknown instance: a timeout, one node alone or in a multicast
        seen = []
        outcomes = yield remote.PsEPRNodeCalls(self.psepr).run(
            "GetSliver", [NodeRequest("dead.test", "", {"slice": "x"}), NodeRequest("n1.test", "", {"slice": "x"})],
            parallelism=2, timeout=0.3, on_result=lambda node, outcome: seen.append(node))
        assert outcomes["dead.test"].code == TIMEOUT
        assert outcomes["n1.test"].code == "NoSliver"
        assert sorted(seen) == ["dead.test", "n1.test"]

    @defer.inlineCallbacks
    def test_values_are_the_plain_types(self):
        manager = self.manager("http")
        report = yield manager.createslice(spec("typed", 1))
        ((node, sliver),) = report.outcomes.items()
        assert isinstance(sliver, SliverInfo) and sliver.state == "running" and sliver.node == node
        renewed = yield remote.HttpNodeCalls(self.treq).run(
            "RenewLease", [NodeRequest(node, f"{self.base_url}/nodemanager/{node}", {"slice": "typed"})],
            parallelism=1, timeout=5)
        assert isinstance(renewed[node], LeaseInfo) and renewed[node].expires_at == NOW + 3600
        ads = yield remote.HttpAgentCalls(f"{self.base_url}/agent", self.treq).getads()
        assert sorted(ad.node for ad in ads) == sorted(NODES)

    @defer.inlineCallbacks
    def test_agent_failures_are_agent_call_errors(self):
        agent = remote.HttpAgentCalls(f"{self.base_url}/agent", self.treq)
        with self.assertRaises(Exception) as caught:
            yield agent.issue_tickets(spec("toomany", 50))
        assert caught.exception.code == "Shortage"
        with self.assertRaises(Exception) as caught:
            yield agent.issue_tickets(b"\xff\xfe")
        assert caught.exception.code == "InvalidSpec"
        dead = remote.HttpAgentCalls("http://127.0.0.1:1/agent", self.treq)
        with self.assertRaises(Exception) as caught:
            yield dead.getads()
        assert caught.exception.code == UNREACHABLE

"""The node manager daemons: options, the exact reaper timer, registration with retries, and a farm in process."""
from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, task
from twisted.python import usage
from twisted.trial import unittest

from dsmt.server.agent.core import Agent, NodeRegistry
from dsmt.server.agent.service import NAME as AGENT_NAME, TNS as AGENT_TNS, agent_service
from dsmt.server.hosting import ServiceHost
from dsmt.server.nodemanager import daemon
from dsmt.server.nodemanager.daemon import FarmOptions, NodeManagerOptions, NodeManagerResource, _Reaper, build_node
from tests.server.agent.support import NOW, parties

LOCAL = "tcp:0:interface=127.0.0.1"


@pytest.fixture
def ca_file(tmp_path):
    path = tmp_path / "ca.pem"
    path.write_bytes(parties().ca.cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def test_node_manager_options(ca_file):
    options = NodeManagerOptions()
    options.parseOptions(["--node", "Node1.Example.", "--ticket-ca", ca_file, "--allow-unsigned", "--http", LOCAL])
    assert options["node"] == "node1.example" and options["capacity"] == 10
    assert options["ticket-trust"] is not None


@pytest.mark.parametrize("argv, complaint", [
    (["--ticket-ca", "CA", "--allow-unsigned", "--http", LOCAL], "give --node"),
    (["--node", "n1", "--allow-unsigned", "--http", LOCAL, "--no-such-option"], "no-such-option"),
    (["--node", "bad_name!", "--ticket-ca", "CA", "--allow-unsigned", "--http", LOCAL], "bad_name"),
    (["--node", "n1", "--ticket-ca", "CA", "--allow-unsigned", "--http", LOCAL, "--capacity", "-1"], "--capacity"),
    (["--node", "n1", "--allow-unsigned", "--http", LOCAL], "tickets are verified against a CA"),
    (["--node", "n1", "--ticket-ca", "CA", "--http", LOCAL], "--ca is needed"),
    (["--node", "n1", "--ticket-ca", "/nonexistent/ca.pem", "--allow-unsigned", "--http", LOCAL], "nonexistent"),
    (["--node", "n1", "--ticket-ca", "CA", "--allow-unsigned", "--http", LOCAL, "--engine-watch", "0"],
     "--engine-watch must be 0.1..3600 seconds, not 0"),
    (["--node", "n1", "--ticket-ca", "CA", "--allow-unsigned", "--http", LOCAL, "--engine-watch", "nan"],
     "--engine-watch must be"),
    (["--node", "n1", "--ticket-ca", "CA", "--allow-unsigned", "--http", LOCAL, "--engine-watch", "x"],
     "could not convert string to float: 'x'"),
])
def test_node_manager_usage_errors(ca_file, argv, complaint):
    argv = [ca_file if word == "CA" else word for word in argv]
    with pytest.raises(usage.UsageError) as caught:
        NodeManagerOptions().parseOptions(argv)
    assert complaint in str(caught.value)


@pytest.mark.parametrize("argv, complaint", [
    (["--nodes", "0"], "--nodes must be 1..1000"),
    (["--nodes", "1001"], "--nodes must be 1..1000"),
    (["--nodes", "3", "--name", "same.node"], "gives the same name to several nodes"),
    (["--nodes", "3", "--name", "n{x}.test"], "--name"),
    (["--nodes", "3", "--name", "bad_{n}!"], "--name"),
])
def test_farm_usage_errors(ca_file, argv, complaint):
    with pytest.raises(usage.UsageError, match=complaint):
        FarmOptions().parseOptions(argv + ["--ticket-ca", ca_file, "--allow-unsigned", "--http", LOCAL])


def test_farm_needs_http(ca_file):
    with pytest.raises(usage.UsageError, match="a farm needs --http"):
        FarmOptions().parseOptions(["--ticket-ca", ca_file, "--allow-unsigned", "--router", "psepr://127.0.0.1:1"])


def test_farm_names(ca_file):
    options = FarmOptions()
    options.parseOptions(["--nodes", "3", "--first", "9", "--ticket-ca", ca_file, "--allow-unsigned", "--http", LOCAL])
    assert options["node-names"] == ["n009.farm.test", "n010.farm.test", "n011.farm.test"]


class FakeNode:
    """Just what the reaper reads: the next expiry and reap(); records the reaps."""

    node = "n1.test"

    def __init__(self, expiries):
        self.expiries = list(expiries)
        self.reaped_at = []
        self.clock = None

    def next_expiry(self):
        return self.expiries[0] if self.expiries else None

    def reap(self):
        self.reaped_at.append(self.clock.seconds())
        while self.expiries and self.expiries[0] <= self.clock.seconds():
            self.expiries.pop(0)
        return []


def test_the_reaper_fires_exactly_at_the_earliest_expiry_and_rearms():
    clock = task.Clock()
    node = FakeNode([10, 25])
    node.clock = clock
    reaper = _Reaper(node, clock)
    reaper.poke()
    clock.advance(9.9)
    assert node.reaped_at == []
    clock.advance(0.1)
    assert node.reaped_at == [10]
    clock.advance(15)
    assert node.reaped_at == [10, 25]
    assert clock.getDelayedCalls() == []          # nothing left: no polling
    node.expiries = [30]                          # a change (redeem) re-arms it
    reaper.poke()
    clock.advance(5)
    assert node.reaped_at == [10, 25, 30]
    node.expiries = [100]
    reaper.poke()
    reaper.stop()
    assert clock.getDelayedCalls() == []


def test_an_expiry_in_the_past_is_reaped_at_once_and_a_far_one_is_looked_at_hourly():
    clock = task.Clock()
    clock.advance(1000)
    node = FakeNode([5])
    node.clock = clock
    _Reaper(node, clock).poke()
    clock.advance(0)
    assert node.reaped_at == [1000]
    node.expiries = [1000 + 10 * 86400]
    reaper = _Reaper(node, clock)
    reaper.poke()
    (call,) = clock.getDelayedCalls()
    assert call.getTime() == 1000 + daemon.MAX_REAP_WAIT


class RealNode(unittest.TestCase):
    """build_node over a state directory, its manageability, and registration retried until the agent answers."""

    def setUp(self):
        self.base = self.mktemp()
        os.makedirs(self.base)

    def test_build_node_makes_its_state_and_reports_capacity(self):
        node = build_node("n1.test", os.path.join(self.base, "n1"), parties().trust, capacity=3, clock=lambda: NOW)
        assert os.path.isdir(os.path.join(self.base, "n1", "slivers"))
        assert os.path.isfile(os.path.join(self.base, "n1", "leases.sqlite"))
        resource = NodeManagerResource(node, os.path.join(self.base, "n1"))
        metrics = resource.metrics()
        assert metrics["CapacitySlots"] == 3 and metrics["SlotsInUse"] == 0 and metrics["SliversRunning"] == 0
        assert resource.operational_status().value == "Available"

    @defer.inlineCallbacks
    def test_registration_is_retried_until_the_agent_answers(self):
        from tests.support.processes import free_port
        node = build_node("n1.test", os.path.join(self.base, "n1"), parties().trust, capacity=3, clock=lambda: NOW)
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}/nodemanager"
        clock = task.Clock()
        runner = daemon.NodeManagerService(node, None, clock=clock, agent=f"http://127.0.0.1:{port}/agent",
                                           capacity=3, endpoint=lambda: endpoint)
        runner.startService()
        self.addCleanup(runner.stopService)
        yield runner.register()                       # nobody listens: refused, a retry waits on the clock
        assert not runner.registered
        (retry,) = [call for call in clock.getDelayedCalls() if call.getTime() == daemon.REGISTER_RETRY_FIRST]
        registry = NodeRegistry()
        agent = Agent(registry, parties().agent.key, parties().agent.cert, clock=lambda: NOW)
        host = ServiceHost(http=f"tcp:{port}:interface=127.0.0.1")
        host.add([agent_service(agent)], AGENT_TNS, AGENT_NAME, path="agent")
        host.startService()
        self.addCleanup(host.stopService)
        yield host.when_listening()
        clock.advance(daemon.REGISTER_RETRY_FIRST)
        yield runner.last_attempt
        assert runner.registered
        assert [(ad.node, ad.slots, ad.endpoint) for ad in registry.ads(NOW)] == [("n1.test", 3, endpoint)]

"""The agent's core: node choice, all-or-nothing issuance, shortage messages, capacity accounting."""
from __future__ import annotations

import itertools

import pytest

from dsmt.server.agent.core import (
    DEFAULT_TICKET_VALIDITY, Agent, AgentError, NodeAd, NodeRegistry, RegistryError, ShortageError)
from dsmt.server.agent.tickets import TicketSigningError, verify_ticket
from dsmt.server.slicemanager.spec import SliceSpec, parse_slice_spec

from .support import NOW, parties


class Clock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


def agent(nodes: dict[str, int], clock: Clock | None = None, **options) -> Agent:
    counter = itertools.count(1)
    options.setdefault("new_id", lambda: f"T-{next(counter)}")
    party = parties().agent
    return Agent(NodeRegistry(nodes), party.key, party.cert, clock or Clock(), **options)


def tickets_of(issued: list[bytes], now: float = NOW):
    return [verify_ticket(data, parties().trust, now=now) for data in issued]


def free_map(a: Agent) -> dict[str, int]:
    return {ad.node: ad.free for ad in a.getads()}


# ------------------------------------------------------------------------------------------ choice

def test_howto_preferred_example_takes_the_first_free_nodes_in_list_order():
    spec = parse_slice_spec(b'<?xml version="1.0" ?> <slice> <name>oceanstore</name> <numnodes>2</numnodes> '
                            b'<leaselen>1209600</leaselen> <ips>141.213.4.201 216.165.109.81 216.165.109.82</ips> '
                            b'</slice>')
    a = agent({"141.213.4.201": 1, "216.165.109.81": 0, "216.165.109.82": 5, "10.0.0.1": 9})
    issued = tickets_of(a.issue(spec))
    assert [x.node for x in issued] == ["141.213.4.201", "216.165.109.82"]
    first = issued[0]
    assert (first.slice_name, first.resources, first.leaselen) == ("oceanstore", {"slots": 1}, 1209600)
    assert (first.not_before, first.not_after) == (NOW, NOW + DEFAULT_TICKET_VALIDITY)
    assert first.issuer == "CN=agent,OU=service"
    assert [x.ticket_id for x in issued] == ["T-1", "T-2"]


def test_preferred_list_stops_once_enough_nodes_are_found():
    a = agent({"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 1})
    issued = tickets_of(a.issue(SliceSpec("s", 2, 60, ("10.0.0.3", "10.0.0.1", "10.0.0.2"))))
    assert [x.node for x in issued] == ["10.0.0.3", "10.0.0.1"]
    assert free_map(a) == {"10.0.0.1": 0, "10.0.0.2": 1, "10.0.0.3": 0}


def test_without_preferences_most_free_first_ties_by_address():
    a = agent({"node-b.example": 3, "10.0.0.10": 3, "10.0.0.9": 3, "2001:db8::1": 3, "10.0.0.1": 7,
               "node-a.example": 1, "10.0.0.2": 0})
    issued = tickets_of(a.issue(SliceSpec("s", 5, 60)))
    assert [x.node for x in issued] == ["10.0.0.1", "10.0.0.9", "10.0.0.10", "2001:db8::1", "node-b.example"]


def test_getads_lists_every_node_with_its_free_capacity_in_issue_order():
    a = agent({"10.0.0.2": 2, "10.0.0.1": 2, "full.example": 0})
    assert a.getads() == [NodeAd("10.0.0.1", 2, 2), NodeAd("10.0.0.2", 2, 2), NodeAd("full.example", 0, 0)]
    a.issue(SliceSpec("s", 1, 60))
    assert a.getads() == [NodeAd("10.0.0.2", 2, 2), NodeAd("10.0.0.1", 2, 1), NodeAd("full.example", 0, 0)]


# ------------------------------------------------------------------------------------------ shortage

def test_shortage_names_asked_available_and_refused_preferred_nodes():
    a = agent({"10.0.0.1": 1, "10.0.0.2": 0, "10.0.0.4": 2})
    before = a.getads()
    spec = SliceSpec("oceanstore", 3, 60, ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"))
    with pytest.raises(ShortageError) as caught:
        a.issue(spec)
    error = caught.value
    assert (error.asked, error.available) == (3, 2)
    assert error.refused == (("10.0.0.2", "full (0 of 0 slots free)"), ("10.0.0.3", "not a node this agent knows"))
    assert str(error) == ("slice oceanstore needs 3 nodes; only 2 are available; preferred nodes refused: "
                          "10.0.0.2: full (0 of 0 slots free); 10.0.0.3: not a node this agent knows")
    assert a.getads() == before                      # nothing reserved


def test_shortage_without_preferences():
    a = agent({"10.0.0.1": 1, "10.0.0.2": 0})
    with pytest.raises(ShortageError, match=r"^slice s needs 2 nodes; only 1 is available$"):
        a.issue(SliceSpec("s", 2, 60))
    assert free_map(a) == {"10.0.0.1": 1, "10.0.0.2": 0}


def test_a_node_filled_by_an_earlier_slice_is_refused_as_full():
    a = agent({"10.0.0.1": 1, "10.0.0.2": 1})
    a.issue(SliceSpec("first", 1, 60, ("10.0.0.1",)))
    with pytest.raises(ShortageError) as caught:
        a.issue(SliceSpec("second", 2, 60, ("10.0.0.1", "10.0.0.2")))
    assert caught.value.refused == (("10.0.0.1", "full (0 of 1 slot free)"),)
    assert free_map(a) == {"10.0.0.1": 0, "10.0.0.2": 1}


def test_signing_failure_reserves_nothing():
    a = agent({"10.0.0.1": 1, "10.0.0.2": 1})
    a.issuer = "CN=somebody else"                    # every signature now fails
    with pytest.raises(TicketSigningError):
        a.issue(SliceSpec("s", 2, 60))
    assert free_map(a) == {"10.0.0.1": 1, "10.0.0.2": 1}


def test_repeated_ticket_ids_are_refused_and_reserve_nothing():
    party = parties().agent
    a = Agent(NodeRegistry({"10.0.0.1": 1, "10.0.0.2": 1}), party.key, party.cert, Clock(), new_id=lambda: "same")
    with pytest.raises(AgentError, match="repeated an id"):
        a.issue(SliceSpec("s", 2, 60))
    assert free_map(a) == {"10.0.0.1": 1, "10.0.0.2": 1}


# ----------------------------------------------------------------------------------------- capacity

def test_capacity_accounting_and_reservation_expiry():
    clock = Clock()
    a = agent({"10.0.0.1": 2}, clock, ticket_validity=600)
    a.issue(SliceSpec("s1", 1, 1000))
    a.issue(SliceSpec("s2", 1, 5000))
    assert free_map(a) == {"10.0.0.1": 0}
    with pytest.raises(ShortageError):
        a.issue(SliceSpec("s3", 1, 60))
    clock.now = NOW + 600 + 1000 - 1                  # s1's ticket could still turn into a running lease
    assert free_map(a) == {"10.0.0.1": 0}
    clock.now = NOW + 600 + 1000                      # not_after + leaselen: s1's slot is free again
    assert free_map(a) == {"10.0.0.1": 1}
    clock.now = NOW + 600 + 5000
    assert free_map(a) == {"10.0.0.1": 2}


def test_release_and_capacity_changes():
    registry = NodeRegistry({"10.0.0.1": 2})
    party = parties().agent
    a = Agent(registry, party.key, party.cert, Clock(), new_id=iter(["A", "B"]).__next__)
    a.issue(SliceSpec("s", 1, 60))
    a.issue(SliceSpec("t", 1, 60))
    registry.register("10.0.0.1", 1)                  # capacity lowered below what is reserved: full, not negative
    assert registry.free("10.0.0.1", NOW) == 0
    assert registry.release("A") and not registry.release("A")
    assert registry.free("10.0.0.1", NOW) == 0
    assert registry.release("B")
    assert registry.free("10.0.0.1", NOW) == 1
    registry.unregister("10.0.0.1")
    assert a.getads() == [] and "10.0.0.1" not in registry


def test_registration_rules():
    registry = NodeRegistry()
    assert registry.register("Node1.Example.", 3) == "node1.example"
    assert "NODE1.example" in registry and len(registry) == 1
    for node, slots, pattern in [("10.0.0.256", 1, "neither"), ("10.0.0.1", -1, "0..10000"),
                                 ("10.0.0.1", 10_001, "0..10000"), ("10.0.0.1", 1.5, "0..10000"),
                                 ("10.0.0.1", True, "0..10000")]:
        with pytest.raises(RegistryError, match=pattern):
            registry.register(node, slots)
    with pytest.raises(RegistryError, match="not registered"):
        registry.unregister("10.9.9.9")
    small = NodeRegistry(max_nodes=1)
    small.register("10.0.0.1", 1)
    with pytest.raises(RegistryError, match="already knows 1 nodes"):
        small.register("10.0.0.2", 1)


# ------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("spec, pattern", [
    (SliceSpec("root", 1, 60), "reserved"),
    (SliceSpec("../x", 1, 60), "not a valid login"),
    (SliceSpec("s", 0, 60), "numnodes must be at least 1"),
    (SliceSpec("s", 1, 14 * 86400 + 1), "lease length 1209601 s is not in 1..1209600 s"),
    (SliceSpec("s", 1, 60, ("Node.Example",)), "not normalised"),
    (SliceSpec("s", 1, 60, ("10.0.0.1", "10.0.0.1")), "duplicates"),
])
def test_agent_refuses_specs_it_did_not_parse(spec, pattern):
    a = agent({"10.0.0.1": 5})
    with pytest.raises(AgentError, match=pattern):
        a.issue(spec)
    assert free_map(a) == {"10.0.0.1": 5}


def test_agent_options_are_checked():
    party = parties().agent
    with pytest.raises(ValueError, match="ticket validity"):
        Agent(NodeRegistry(), party.key, party.cert, Clock(), ticket_validity=0)
    with pytest.raises(ValueError, match="max_leaselen"):
        Agent(NodeRegistry(), party.key, party.cert, Clock(), max_leaselen=15 * 86400)


def test_tickets_are_for_their_node_only():
    a = agent({"10.0.0.1": 1, "10.0.0.2": 1})
    first, second = a.issue(SliceSpec("s", 2, 60))
    assert verify_ticket(first, parties().trust, now=NOW, node="10.0.0.1").node == "10.0.0.1"
    with pytest.raises(Exception, match="wrong-node"):
        verify_ticket(second, parties().trust, now=NOW, node="10.0.0.1")


# ------------------------------------------------------------------------------------------ endpoints

def test_endpoints_are_advertised_checked_and_kept_on_capacity_changes():
    registry = NodeRegistry()
    registry.register("Node7.Example.", 2, "http://node7.example:8091/nodemanager")
    registry.register("node7.example", 3)  # capacity only: the endpoint stays
    assert registry.ads(NOW) == [NodeAd("node7.example", 3, 3, "http://node7.example:8091/nodemanager")]
    registry.register("node7.example", 3, "https://node7.example/nodemanager")
    assert registry.ads(NOW)[0].endpoint == "https://node7.example/nodemanager"
    for endpoint, complaint in [
        ("ftp://node7.example/", "not an http:// or https:// URL"),
        ("http:///nodemanager", "not an http:// or https:// URL with a host"),
        ("http://node7.example:99999/", "is not a URL"),
        ("http://user@node7.example/", "user name"),
        ("http://node7.example/ x", "whitespace"),
        ("http://node7.example/" + "x" * 1100, "over the limit of 1024"),
        ("", "not empty"),
    ]:
        with pytest.raises(RegistryError, match=complaint):
            registry.register("node7.example", 1, endpoint)
    assert registry.ads(NOW)[0] == NodeAd("node7.example", 3, 3, "https://node7.example/nodemanager")

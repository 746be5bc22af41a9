"""Status events of references 000 and 003: exact channels, fields and values; hostile names refused."""
from __future__ import annotations

import pytest

from dsmt.server.statusevents import (
    CONTAINER, CONTAINER_MGR, MAX_COMMAND_VALUE_CHARS, SLIVER_MGR, STATUS_EXPIRE, StatusValueError,
    container_mgr_channel, deployment_status, format_pairs, manager_service, node_exclude, node_list,
    parse_node_exclude, parse_pairs, sliver_state, sliver_state_channel, status_channel)
from dsmt.transports.psepr.event import ATTRIBUTE_NS, event_to_xml, parse_event

HOSTILE_NAMES = ["", "a,b", "a=b", "a/b", "a b", "a\nb", "é", "x" * 256, "a<b", "a&b"]


def attribute(event):
    assert event.payload_type == ATTRIBUTE_NS
    return event.payload.field, event.payload.value, event.payload.expire


def test_manager_service():
    assert manager_service("xyz1") == "xyz1_mgr"
    with pytest.raises(StatusValueError):
        manager_service("a,b")


def test_deployment_status_exact():
    event = deployment_status("xyz1", "planetlab5.nbgisp.com", SLIVER_MGR, CONTAINER, "requested")
    assert event.channel == "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-mgr/status/"
    assert status_channel("xyz1", SLIVER_MGR) == event.channel
    assert attribute(event) == (
        "deployment-status",
        "hostname=planetlab5.nbgisp.com,component=org.dsmt.component.sliver-mgr,"
        "managed=org.dsmt.component.container,slice=xyz1,status=requested",
        STATUS_EXPIRE)
    assert (event.to_service, event.from_service, event.from_instance) == ("xyz1_mgr", "xyz1_mgr",
                                                                           "planetlab5.nbgisp.com")
    assert event.to_instance is None


def test_deployment_status_refuses_unknown_status():
    with pytest.raises(StatusValueError, match="not one of"):
        deployment_status("xyz1", "n1", SLIVER_MGR, CONTAINER, "bogus")


def test_sliver_state_exact():
    event = sliver_state("xyz1", "10.0.0.1", "installing", sender="mgr.example.org")
    assert event.channel == "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.container-mgr/status/10.0.0.1/"
    assert sliver_state_channel("xyz1", "10.0.0.1") == event.channel
    assert attribute(event) == ("sliver-state", "hostname=10.0.0.1,slice=xyz1,value=installing", STATUS_EXPIRE)
    assert (event.to_service, event.from_service, event.from_instance) == ("xyz1_mgr", "xyz1_mgr", "mgr.example.org")


def test_sliver_state_ipv6_host_makes_a_valid_channel():
    event = sliver_state("xyz1", "2001:db8::1", "selected", sender="m")
    assert event.channel.endswith("/status/2001:db8::1/")
    assert parse_event(event_to_xml(event)) == event


@pytest.mark.parametrize("state", ["running", "SELECTED", "", "selected,x=y"])
def test_sliver_state_refuses_other_states(state):
    with pytest.raises(StatusValueError, match="sliver state"):
        sliver_state("xyz1", "n1", state, sender="m")


def test_node_list_exact_in_given_order():
    event = node_list("xyz1", {"n2": "running", "n1": "timeout-creating", "n3": "deselected"}, sender="m")
    assert event.channel == "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.container-mgr/"
    assert container_mgr_channel("xyz1") == event.channel
    assert f"/{CONTAINER_MGR}/" in event.channel
    assert attribute(event) == ("node-list", "n2/running,n1/timeout-creating,n3/deselected", STATUS_EXPIRE)
    assert attribute(node_list("xyz1", {}, sender="m"))[1] == ""


def test_node_list_refuses_unknown_status():
    with pytest.raises(StatusValueError, match="node status"):
        node_list("xyz1", {"n1": "installed"}, sender="m")


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_refused_everywhere(name):
    with pytest.raises(StatusValueError):
        sliver_state("xyz1", name, "selected", sender="m")
    with pytest.raises(StatusValueError):
        sliver_state(name, "n1", "selected", sender="m")
    with pytest.raises(StatusValueError):
        node_list("xyz1", {name: "selected"}, sender="m")
    with pytest.raises(StatusValueError):
        deployment_status("xyz1", name, SLIVER_MGR, CONTAINER, "running")
    with pytest.raises(StatusValueError):
        deployment_status("xyz1", "n1", name, CONTAINER, "running")
    with pytest.raises(StatusValueError):
        node_exclude("xyz1", name, sender="m")


def test_refused_name_message_is_short():
    with pytest.raises(StatusValueError) as caught:
        sliver_state("xyz1", "x" * 10_000, "selected", sender="m")
    assert len(str(caught.value)) < 200


def test_pairs_round_trip_and_errors():
    assert parse_pairs(format_pairs([("a", "1"), ("b", "2")])) == {"a": "1", "b": "2"}
    for bad, pattern in [("a", "not key=value"), ("=1", "not key=value"), ("a=1,a=2", "twice"), ("", "not key")]:
        with pytest.raises(StatusValueError, match=pattern):
            parse_pairs(bad)


def test_node_exclude_exact_and_round_trip():
    event = node_exclude("xyz1", "planetlab1.example.org", sender="operator.example.org")
    assert event.channel == "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.container-mgr/"
    assert attribute(event) == ("node-exclude", "hostname=planetlab1.example.org,slice=xyz1", STATUS_EXPIRE)
    assert (event.to_service, event.from_service, event.from_instance) == ("xyz1_mgr", "xyz1_mgr",
                                                                           "operator.example.org")
    assert parse_node_exclude(event.payload.value) == ("planetlab1.example.org", "xyz1")
    assert parse_node_exclude("slice=xyz1,hostname=n1") == ("n1", "xyz1")


@pytest.mark.parametrize("value, pattern", [
    ("hostname=a,b=c", "unexpected key 'b'"),
    ("hostname=a,slice=xyz1,value=installed", "unexpected key 'value'"),
    ("hostname=a", "no slice="),
    ("slice=xyz1", "no hostname="),
    ("hostname=a,hostname=b,slice=xyz1", "twice"),
    ("hostname=a/b,slice=xyz1", "hostname"),
    ("hostname=,slice=xyz1", "hostname"),
    ("hostname=a b,slice=xyz1", "hostname"),
    ("hostname=a,slice=x=y", "slice"),
    ("hostname=a;slice=xyz1", "no slice="),
    ("", "not key=value"),
    ("h" * (MAX_COMMAND_VALUE_CHARS + 1), "longer than 512"),
])
def test_parse_node_exclude_refuses(value, pattern):
    with pytest.raises(StatusValueError, match=pattern):
        parse_node_exclude(value)


def test_parse_node_exclude_refuses_non_text():
    with pytest.raises(StatusValueError, match="must be text"):
        parse_node_exclude(b"hostname=a,slice=b")

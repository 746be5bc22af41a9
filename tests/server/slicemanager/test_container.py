"""The container manager (reference 003): exact event sequences, node-exclude handling, refresh timing."""
from __future__ import annotations

import pytest

from dsmt.server.slicemanager.container import (
    IGNORE_CODES, MAX_REASON_CHARS, REFRESH_INTERVAL, ContainerManager, ContainerStateError, Exclude, Select)
from dsmt.server.statusevents import STATUS_EXPIRE, node_exclude, node_list, sliver_state
from dsmt.transports.psepr.event import (
    ATTRIBUTE_NS, AttributePayload, Event, LeasePayload, OpaquePayload, event_to_xml, parse_event)

SLICE = "xyz1"
SENDER = "mgr.example.org"
ROOT = "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.container-mgr/"


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, **options):
        self.events: list[Event] = []
        self.clock = Clock()
        self.manager = ContainerManager(SLICE, publish=self.events.append, sender=SENDER, clock=self.clock, **options)

    def taken(self) -> list[tuple[str, str, str]]:
        """(channel, field, value) of the events published since the last call; checks the addressing too."""
        out = []
        for event in self.events:
            assert event.payload_type == ATTRIBUTE_NS
            assert (event.to_service, event.from_service, event.from_instance) == ("xyz1_mgr", "xyz1_mgr", SENDER)
            assert event.payload.expire == STATUS_EXPIRE
            assert parse_event(event_to_xml(event)) == event
            out.append((event.channel, event.payload.field, event.payload.value))
        self.events.clear()
        return out


def state(host: str, value: str) -> tuple[str, str, str]:
    return (f"{ROOT}status/{host}/", "sliver-state", f"hostname={host},slice=xyz1,value={value}")


def listed(value: str) -> tuple[str, str, str]:
    return (ROOT, "node-list", value)


@pytest.fixture
def h():
    return Harness()


# ---------------------------------------------------------------- progress → events

def test_select_publishes_each_sliver_state_then_one_list(h):
    h.manager.select(["n1.example.org", "10.0.0.2", "2001:db8::1"])
    assert h.taken() == [
        state("n1.example.org", "selected"), state("10.0.0.2", "selected"), state("2001:db8::1", "selected"),
        listed("n1.example.org/selected,10.0.0.2/selected,2001:db8::1/selected"),
    ]


def test_full_lifecycle_exact_sequence(h):
    h.manager.select(["n1", "n2"])
    h.taken()
    h.manager.creating("n1")
    assert h.taken() == [state("n1", "installing"), listed("n1/creating,n2/selected")]
    h.manager.initializing("n1")
    assert h.taken() == [listed("n1/initializing,n2/selected")]  # still installing: no sliver-state
    h.manager.installed("n1")
    assert h.taken() == [state("n1", "installed"), listed("n1/running,n2/selected")]
    h.manager.creating("n2")
    h.manager.failed("n2", "connection refused")
    assert h.taken() == [state("n2", "installing"), listed("n1/running,n2/creating"),
                         state("n2", "failed"), listed("n1/running,n2/not-responding")]
    h.manager.failed("n2", "gave up after 600 s", timeout=True)
    assert h.taken() == [listed("n1/running,n2/timeout-creating")]  # sliver already failed
    h.manager.deselect("n2")
    assert h.taken() == [state("n2", "deselected"), listed("n1/running,n2/deselected")]
    h.manager.installed("n1")
    assert h.taken() == []
    h.manager.deselect("n1")
    assert h.taken() == [state("n1", "deselected"), listed("n1/deselected")]
    assert h.manager.snapshot() == {}


def test_unchanged_progress_publishes_nothing(h):
    h.manager.select(["n1"])
    h.manager.creating("n1")
    h.taken()
    h.manager.creating("n1")
    assert h.taken() == []
    h.manager.select([])
    assert h.taken() == []


def test_initializing_straight_after_select_reports_installing(h):
    h.manager.select(["n1"])
    h.taken()
    h.manager.initializing("n1")
    assert h.taken() == [state("n1", "installing"), listed("n1/initializing")]


def test_deselected_node_leaves_list_after_one_report(h):
    h.manager.select(["n1", "n2"])
    h.manager.deselect("n1")
    h.taken()
    assert h.manager.nodes == ("n2",)
    h.manager.creating("n2")
    assert h.taken() == [state("n2", "installing"), listed("n2/creating")]
    h.manager.refresh()
    assert h.taken() == [state("n2", "installing"), listed("n2/creating")]
    with pytest.raises(ContainerStateError, match="n1 is not selected"):
        h.manager.creating("n1")
    h.manager.select(["n1"])  # deselected (not excluded): may come back, at the end of the list
    assert h.taken()[-1] == listed("n2/creating,n1/selected")


def test_snapshot_and_reason(h):
    h.manager.select(["n1", "n2"])
    h.manager.installed("n1")
    h.manager.failed("n2", "x" * 10_000, timeout=True)
    assert h.manager.snapshot() == {"n1": ("installed", "running"), "n2": ("failed", "timeout-creating")}
    assert list(h.manager.snapshot()) == ["n1", "n2"]
    assert len(h.manager.reason("n2")) == MAX_REASON_CHARS
    assert h.manager.reason("n1") is None
    h.manager.creating("n2")  # retried: the old reason no longer applies
    assert h.manager.reason("n2") is None
    snap = h.manager.snapshot()
    snap["n1"] = ("failed", "not-responding")
    assert h.manager.snapshot()["n1"] == ("installed", "running")


def test_node_names_are_normalised(h):
    h.manager.select(["N1.Example.ORG."])
    h.manager.creating("n1.example.org")
    assert h.manager.snapshot() == {"n1.example.org": ("installing", "creating")}


@pytest.mark.parametrize("call", [
    lambda m: m.select("n1"),
    lambda m: m.select(["n1", "n1"]),
    lambda m: m.select(["N1"]),          # already selected, other spelling
    lambda m: m.select(["n3", "a,b"]),   # all or none
    lambda m: m.select(["a/b"]),
    lambda m: m.select([""]),
    lambda m: m.creating("n9"),
    lambda m: m.installed("a=b"),
    lambda m: m.failed("n1", None),
    lambda m: m.deselect("n9"),
])
def test_nonsense_progress_raises_before_publishing(h, call):
    h.manager.select(["n1"])
    h.taken()
    before = h.manager.snapshot()
    with pytest.raises(ContainerStateError):
        call(h.manager)
    assert h.taken() == []
    assert h.manager.snapshot() == before


@pytest.mark.parametrize("options, pattern", [
    (dict(slice_name="Root"), "slice name"),
    (dict(slice_name="root"), "reserved"),
    (dict(slice_name="a,b"), "slice name"),
    (dict(sender=""), "sender"),
    (dict(keep_size=0), "keep_size"),
    (dict(keep_size=True), "keep_size"),
    (dict(keep_size=10**6), "keep_size"),
])
def test_constructor_refuses(options, pattern):
    arguments = dict(slice_name=SLICE, publish=print, sender=SENDER, clock=Clock())
    arguments.update(options)
    with pytest.raises(ContainerStateError, match=pattern):
        ContainerManager(arguments.pop("slice_name"), **arguments)


# ---------------------------------------------------------------- refresh timing

def test_refresh_timing_with_injected_clock(h):
    assert h.manager.next_refresh() is None
    h.clock.now = 2000.0
    h.manager.select(["n1", "n2"])
    assert h.manager.next_refresh() == 2000.0 + REFRESH_INTERVAL
    h.clock.now = 2030.0
    h.manager.installed("n1")  # a change does not move the refresh (n2's status is still from 2000)
    assert h.manager.next_refresh() == 2000.0 + REFRESH_INTERVAL
    h.taken()
    h.clock.now = 2060.0
    h.manager.refresh()
    assert h.taken() == [state("n1", "installed"), state("n2", "selected"), listed("n1/running,n2/selected")]
    assert h.manager.next_refresh() == 2060.0 + REFRESH_INTERVAL
    assert REFRESH_INTERVAL < STATUS_EXPIRE


def test_refresh_of_an_empty_list_says_so(h):
    h.manager.select(["n1"])
    h.manager.deselect("n1")
    h.taken()
    h.manager.refresh()
    assert h.taken() == [listed("")]


# ---------------------------------------------------------------- node-exclude

def exclude(host="n1"):
    return node_exclude(SLICE, host, sender="operator.example.org")


def test_exclude_without_keep_size(h):
    h.manager.select(["n1", "n2"])
    h.taken()
    result = h.manager.handle(exclude("N1."))
    assert result.actions == (Exclude("n1"),) and result.ignored is None and result.note is None
    assert h.taken() == []  # nothing changes until the sliver is deleted
    assert h.manager.excluded == {"n1"}
    h.manager.deselect("n1")
    assert h.taken() == [state("n1", "deselected"), listed("n1/deselected,n2/selected")]
    with pytest.raises(ContainerStateError, match="excluded"):
        h.manager.select(["n1"])


def test_exclude_with_keep_size_selects_a_replacement():
    offered = []

    def choose(avoid):
        offered.append(set(avoid))
        return next((n for n in ["n1", "n2", "n3", "n4", "n5"] if n not in avoid), None)

    h = Harness(keep_size=2, choose_replacement=choose)
    h.manager.select(["n1", "n2"])
    assert h.manager.handle(exclude("n1")).actions == (Exclude("n1"), Select("n3"))
    assert offered == [{"n1", "n2"}]
    assert h.manager.pending == {"n3"}
    # A second exclusion before the first replacement is selected: the pending one is avoided and counted.
    assert h.manager.handle(exclude("n2")).actions == (Exclude("n2"), Select("n4"))
    assert offered[-1] == {"n1", "n2", "n3"}
    h.manager.deselect("n1")
    h.manager.deselect("n2")
    h.manager.select(["n3", "n4"])
    assert h.manager.pending == frozenset()
    h.taken()
    assert h.manager.handle(exclude("n3")).actions == (Exclude("n3"), Select("n5"))
    assert offered[-1] == {"n1", "n2", "n3", "n4"}  # excluded nodes are never offered again
    assert h.manager.handle(exclude("n4")).actions == (Exclude("n4"),)
    assert h.manager.handle(exclude("n4")).ignored.code == "already-excluded"


def test_keep_size_not_reached_needs_no_replacement():
    calls = []
    h = Harness(keep_size=1, choose_replacement=lambda avoid: calls.append(avoid) or "n9")
    h.manager.select(["n1", "n2"])
    assert h.manager.handle(exclude("n1")).actions == (Exclude("n1"),)
    assert calls == []


@pytest.mark.parametrize("offer, note", [
    (None, "no replacement node is available"),
    ("n1", "excluded or already in slice"),
    ("n2", "excluded or already in slice"),
    ("a,b", "replacement refused"),
])
def test_replacement_problems_are_notes_not_errors(offer, note):
    h = Harness(keep_size=2, choose_replacement=lambda avoid: offer)
    h.manager.select(["n1", "n2"])
    result = h.manager.handle(exclude("n1"))
    assert result.actions == (Exclude("n1"),)
    assert note in result.note
    assert h.manager.pending == frozenset()


def test_keep_size_without_chooser_notes_the_shortfall():
    h = Harness(keep_size=2)
    h.manager.select(["n1", "n2"])
    result = h.manager.handle(exclude("n1"))
    assert result.actions == (Exclude("n1"),)
    assert "1 of 2 nodes" in result.note


def raw(value, *, field="node-exclude", channel=ROOT, service="xyz1_mgr"):
    return Event.attribute(channel, field, value, to_service=service)


OPAQUE = OpaquePayload.from_xml(b'<payload xmlns="urn:other"><field>node-exclude</field></payload>')


@pytest.mark.parametrize("event, code", [
    (raw("hostname=n1,slice=other"), "wrong-slice"),
    (raw("hostname=n1,slice=xyz10"), "wrong-slice"),
    (raw("hostname=n9,slice=xyz1"), "unknown-host"),
    (raw("hostname=n1,b=c"), "malformed"),
    (raw("hostname=n1,slice=xyz1,b=c"), "malformed"),
    (raw("hostname=n1,hostname=n2,slice=xyz1"), "malformed"),
    (raw("hostname=n1"), "malformed"),
    (raw("hostname=n1/x,slice=xyz1"), "malformed"),
    (raw("hostname=1.2.3,slice=xyz1"), "malformed"),
    (raw("hostname=n1,slice=xyz1" + "x" * 1_000_000), "malformed"),
    (raw("hostname=" + "n" * 600 + ",slice=xyz1"), "malformed"),
    (raw(""), "malformed"),
    (raw("hostname=n1,slice=xyz1", field="node-list"), "wrong-field"),
    (raw("hostname=n1,slice=xyz1", field="node-include"), "wrong-field"),
    (raw("hostname=n1,slice=xyz1", channel=ROOT + "status/n1/"), "wrong-channel"),
    (raw("hostname=n1,slice=xyz1", channel="/org/dsmt/ns/deployment/other/org.dsmt.component.container-mgr/"),
     "wrong-channel"),
    (raw("hostname=n1,slice=xyz1", service="other_mgr"), "wrong-service"),
    (raw("hostname=n1,slice=xyz1", service=None), "wrong-service"),
    (Event(ROOT, LeasePayload("id", 60), to_service="xyz1_mgr"), "wrong-payload"),
    (Event(ROOT, OPAQUE, to_service="xyz1_mgr"), "wrong-payload"),
    ("hostname=n1,slice=xyz1", "wrong-payload"),
    (None, "wrong-payload"),
])
def test_hostile_or_stray_events_are_ignored_with_a_reason(h, event, code):
    h.manager.select(["n1", "n2"])
    h.taken()
    result = h.manager.handle(event)
    assert result.actions == ()
    assert result.ignored.code == code and code in IGNORE_CODES
    assert result.ignored.reason and len(result.ignored.reason) < 400
    assert h.manager.excluded == frozenset()
    assert h.taken() == []


def test_own_node_list_echo_is_ignored(h):
    h.manager.select(["n1"])
    for event in list(h.events):
        assert h.manager.handle(event).ignored.code in ("wrong-field", "wrong-channel")


def test_parsed_wire_event_is_accepted(h):
    h.manager.select(["planetlab1.example.org"])
    wire = event_to_xml(node_exclude(SLICE, "planetlab1.example.org", sender="op"))
    assert h.manager.handle(parse_event(wire)).actions == (Exclude("planetlab1.example.org"),)


def test_node_list_builder_matches_manager_output(h):
    h.manager.select(["n1"])
    assert h.events[-1] == node_list(SLICE, {"n1": "selected"}, sender=SENDER)
    assert h.events[0] == sliver_state(SLICE, "n1", "selected", sender=SENDER)
    assert isinstance(h.events[0].payload, AttributePayload)

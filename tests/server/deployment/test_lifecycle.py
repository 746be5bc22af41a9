"""The per-component lifecycle and the application's derived, published state (pure)."""
import pytest

from dsmt.server.deployment.descriptor import parse_descriptor
from dsmt.server.deployment.lifecycle import (
    TRANSITIONS, ApplicationStatus, ComponentLifecycle, IllegalTransition, Milestone, application_state,
)
from dsmt.server.statusevents import INSTALL_STATES, parse_pairs

ALL = list(Milestone)


def states(transitions):
    return [t.after for t in transitions]


def test_transition_table_uses_the_reference_states_only():
    used = {s for s in TRANSITIONS if s} | {t for targets in TRANSITIONS.values() for t in targets}
    assert used <= set(INSTALL_STATES) and "undefined" not in used


def test_install_before_configure_still_publishes_in_reference_order():
    lc = ComponentLifecycle("web", ALL)
    assert states(lc.request()) == ["requested"]
    assert states(lc.reach(Milestone.FETCHED)) == ["instantiated"]
    assert states(lc.reach(Milestone.UNPACKED)) == []
    assert states(lc.reach(Milestone.INSTALLED)) == []          # not configured yet: stays instantiated
    assert states(lc.reach(Milestone.CONFIGURED)) == ["initialized", "installed"]
    assert states(lc.run()) == ["running"]
    assert states(lc.run()) == []


def test_component_without_package_or_install():
    lc = ComponentLifecycle("bare", [])
    lc.request()
    assert states(lc.advance()) == ["instantiated", "initialized"]
    assert states(lc.run()) == ["running"]


def test_failure_restart_and_illegal_moves():
    lc = ComponentLifecycle("web", [Milestone.FETCHED])
    lc.request()
    with pytest.raises(IllegalTransition) as caught:
        lc.run()
    assert caught.value.code == "not-prepared" and "fetched" in caught.value.reason
    assert states(lc.fail("download: checksum: bad")) == ["failed"]
    assert lc.reason == "download: checksum: bad"
    assert lc.fail("again") == [] and lc.reason == "again"
    with pytest.raises(IllegalTransition):
        lc.run()                                   # never prepared: cannot be restarted
    lc.reach(Milestone.FETCHED)
    assert states(lc.run()) == ["running"]         # failed -> running: a restart
    assert states(lc.terminate()) == ["terminated"]
    with pytest.raises(IllegalTransition) as caught:
        lc._to("instantiated")
    assert caught.value.code == "illegal-transition"
    assert states(lc.request()) == ["requested"] and not lc.milestones
    other = ComponentLifecycle("x", [])
    with pytest.raises(IllegalTransition):
        other.fail("never requested")
    other.request()
    assert len(other.fail("y" * 5000)[0].reason) == 1024


def test_application_state_is_derived_and_published_as_managed_app():
    descriptor = parse_descriptor(open("%s/fixtures/xyz.xml" % __import__("os").path.dirname(__file__), "rb").read())
    echo, web = (ComponentLifecycle.for_component(c) for c in descriptor.components)
    status = ApplicationStatus("xyz1", "n1.example.org", "XYZ")
    seen = []

    def step(transitions):
        for transition in transitions:
            event = status.update([echo, web], transition)
            if event:
                seen.append(parse_pairs(event.payload.value))
    step(echo.request() + web.request())
    for milestone in (Milestone.FETCHED, Milestone.UNPACKED):
        step(echo.reach(milestone))
        step(web.reach(milestone))
    step(web.reach(Milestone.INSTALLED))
    step(web.reach(Milestone.CONFIGURED))
    step(echo.run())
    step(web.run())
    assert [pairs["status"] for pairs in seen] == ["requested", "instantiated", "initialized", "installed", "running"]
    assert seen[0] == {"hostname": "n1.example.org", "component": "org.dsmt.component.deployment-agent",
                       "managed": "XYZ", "slice": "xyz1", "status": "requested"}
    step(web.fail("crashed"))
    assert application_state([echo, web]) == "failed"
    step(web.run())
    step(echo.terminate())
    assert [p["status"] for p in seen][-3:] == ["failed", "running", "terminated"]


def test_no_installed_state_without_install_commands():
    a, b = ComponentLifecycle("a", []), ComponentLifecycle("b", [])
    a.request(), b.request(), a.advance(), b.advance(), a.run()
    assert application_state([a, b]) == "initialized"


def test_hostile_names_refused_up_front():
    with pytest.raises(ValueError):
        ApplicationStatus("xyz1", "n1", "XYZ,status=running")

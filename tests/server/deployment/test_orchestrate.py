"""Running plans across nodes: order, timing, batches, thresholds, barriers — against in-memory engines on a
task.Clock that keep the EngineCalls contract (bounded parallelism, per-node timeout, never failing)."""
import os

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from dsmt.server.deployment.engine import Report, StepFailure
from dsmt.server.deployment.orchestrate import Orchestrator, PlanEvent, node_result
from dsmt.server.deployment.plan import (
    FAILED, OK, OPERATIONS, SKIPPED, PlanError, dry_run, parse_plan, read_descriptors, read_plan,
)
from dsmt.server.slicemanager.calls import TIMEOUT, NodeCallError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


class Engines:
    """Every node's engine in memory: a call to ``node`` takes ``durations.get(node, 1)`` seconds of
    ``clock`` and answers ``outcomes[(operation, node)]`` (default: an ok Report)."""

    def __init__(self, clock, durations=None, outcomes=None):
        self.clock = clock
        self.durations = durations or {}
        self.outcomes = outcomes or {}
        self.calls = []       # (start time, operation, node, kwargs)
        self.finished = []    # (end time, operation, node)
        self.in_flight = self.max_in_flight = 0

    def run(self, operation, requests, *, parallelism, timeout, on_result=None):
        assert operation in OPERATIONS
        for request in requests:
            assert set(request.kwargs) == set(OPERATIONS[operation]), request.kwargs
        semaphore = defer.DeferredSemaphore(parallelism)
        outcomes = {}

        def one(request):
            node = request.node
            self.calls.append((self.clock.seconds(), operation, node, dict(request.kwargs)))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            duration = self.durations.get(node, 1.0)
            if timeout is not None and duration > timeout:
                duration, outcome = timeout, NodeCallError(TIMEOUT, f"no answer from {node} in {timeout:g} s")
            else:
                outcome = self.outcomes.get((operation, node), Report("XYZ", True, {}))
            done = defer.Deferred()

            def answer():
                self.in_flight -= 1
                self.finished.append((self.clock.seconds(), operation, node))
                outcomes[node] = outcome
                if on_result is not None:
                    on_result(node, outcome)
                done.callback(None)
            self.clock.callLater(duration, answer)
            return done

        done = defer.gatherResults([semaphore.run(one, request) for request in requests])
        return done.addCallback(lambda _: {request.node: outcomes[request.node] for request in requests})


def run_plan(plan, nodes, engines, descriptors=None, *, until=100.0, **options):
    events = []
    orchestrator = Orchestrator(engines, on_event=events.append, **options)
    result = []
    orchestrator.run(plan, nodes, descriptors).addBoth(result.append)
    clock = engines.clock
    while not result and clock.getDelayedCalls() and clock.seconds() < until:
        clock.advance(min(call.getTime() for call in clock.getDelayedCalls()) - clock.seconds())
    assert result, "the plan did not finish"
    if isinstance(result[0], Failure):
        result[0].raiseException()
    return result[0], events


def started(engines, operation=None):
    return [(round(at, 3), node) for at, op, node, _ in engines.calls if operation in (None, op)]


def xyz_failure(code="install", reason="the install step exited with status 2"):
    return Report("XYZ", False, {"xyz-web": "failed"}, (StepFailure("install", "xyz-web", code, reason),))


# ---------------------------------------------------------------- the paper's BPEL example

def test_install_on_node_a_then_on_node_b():
    plan = read_plan(os.path.join(FIXTURES, "plan-bpel.xml"))
    descriptors = read_descriptors(plan, FIXTURES)
    engines = Engines(task.Clock(), durations={"10.0.0.1": 3.0, "10.0.0.2": 2.0})
    report, events = run_plan(plan, {"10.0.0.1": "http://a/engine", "10.0.0.2": "http://b/engine"}, engines,
                              descriptors)
    assert started(engines) == [(0.0, "10.0.0.1"), (3.0, "10.0.0.2")]  # B starts when A has finished
    assert [(round(at, 3), node) for at, _, node in engines.finished] == [(3.0, "10.0.0.1"), (5.0, "10.0.0.2")]
    assert engines.calls[0][3] == {"descriptor": descriptors["xyz"], "parameters": {"node": "10.0.0.1"}}
    assert engines.calls[1][3]["parameters"] == {"node": "10.0.0.2"}
    assert report.ok and report.complete and not report.stopped
    assert [(s.name, dict((n, r.status) for n, r in s.results.items())) for s in report.steps] == [
        ("install-a", {"10.0.0.1": OK}), ("install-b", {"10.0.0.2": OK})]
    assert [(e.kind, e.step, e.node) for e in events] == [
        ("step", "install-a", None), ("batch", "install-a", None), ("node", "install-a", "10.0.0.1"),
        ("done", "install-a", None), ("step", "install-b", None), ("batch", "install-b", None),
        ("node", "install-b", "10.0.0.2"), ("done", "install-b", None)]


def test_when_a_fails_b_is_never_called_and_reported_skipped():
    plan = read_plan(os.path.join(FIXTURES, "plan-bpel.xml"))
    engines = Engines(task.Clock(), outcomes={("Deploy", "10.0.0.1"): xyz_failure()})
    report, events = run_plan(plan, ["10.0.0.1", "10.0.0.2"], engines, read_descriptors(plan, FIXTURES))
    assert started(engines) == [(0.0, "10.0.0.1")]
    assert not report.ok and report.stopped_by == "install-a"
    a = report.step("install-a").results["10.0.0.1"]
    assert (a.status, a.code, a.reason) == (FAILED, "install", "install xyz-web: the install step exited with status 2")
    b = report.step("install-b").results["10.0.0.2"]
    assert b.status == SKIPPED
    assert b.reason == "the plan stopped: step 'install-a' failed on 1 of 1 node(s), more than max-failures 0%"
    assert ("stopped", "install-a") in [(e.kind, e.step) for e in events]
    assert report.summary() == ["step install-a: 0 ok, 1 failed, 0 skipped (over max-failures)",
                                "step install-b: 0 ok, 0 failed, 1 skipped", "plan xyz-a-then-b: stopped by step "
                                "'install-a'"]


# ---------------------------------------------------------------- rolling deploys

NODES = [f"10.0.0.{i}" for i in range(1, 9)]


def test_rolling_deploy_with_failures_under_the_threshold_runs_every_batch():
    plan = read_plan(os.path.join(FIXTURES, "plan-rolling.xml"))
    engines = Engines(task.Clock(), outcomes={
        ("Deploy", "10.0.0.2"): NodeCallError("unreachable", "cannot reach 10.0.0.2: Connection refused"),
        ("Deploy", "10.0.0.7"): xyz_failure()})
    report, _ = run_plan(plan, NODES, engines, read_descriptors(plan, FIXTURES))
    deploys = started(engines, "Deploy")
    assert deploys == [(0.0, NODES[0]), (0.0, NODES[1]), (1.0, NODES[2]), (1.0, NODES[3]), (2.0, NODES[4]),
                       (2.0, NODES[5]), (3.0, NODES[6]), (3.0, NODES[7])]
    # 50 %: two batches of four, one after the other
    assert started(engines, "Command") == [(4.0, node) for node in NODES[:4]] + [(5.0, node) for node in NODES[4:]]
    assert [call[3]["command"] for call in engines.calls if call[1] == "Command"][:2] == [
        "APPCONFIG,10.0.0.1,XYZ,xyz-web", "APPCONFIG,10.0.0.2,XYZ,xyz-web"]
    roll = report.step("roll")
    assert not roll.exceeded and roll.nodes(FAILED) == ["10.0.0.2", "10.0.0.7"]  # 2 of 8 = 25 %, not more
    assert (roll.results["10.0.0.2"].code, roll.results["10.0.0.7"].code) == ("unreachable", "install")
    assert report.ok and not report.complete
    assert report.summary()[-1] == "plan xyz-rolling: done with tolerated failures"


def test_rolling_deploy_over_the_threshold_stops_and_reports_skipped_nodes():
    plan = read_plan(os.path.join(FIXTURES, "plan-rolling.xml"))
    failing = {("Deploy", node): xyz_failure() for node in ("10.0.0.1", "10.0.0.3", "10.0.0.4")}
    engines = Engines(task.Clock(), outcomes=failing)
    report, _ = run_plan(plan, NODES, engines, read_descriptors(plan, FIXTURES))
    # 1 of 8 after the first batch (12.5 %), 3 of 8 after the second (37.5 % > 25 %): stop there
    assert started(engines) == [(0.0, NODES[0]), (0.0, NODES[1]), (1.0, NODES[2]), (1.0, NODES[3])]
    roll = report.step("roll")
    assert roll.exceeded and report.stopped_by == "roll"
    assert [roll.results[node].status for node in NODES] == [FAILED, OK, FAILED, FAILED] + [SKIPPED] * 4
    assert roll.results["10.0.0.5"].reason == "the step stopped: 3 of 8 node(s) failed, more than max-failures 25%"
    assert set(report.step("appconfig").nodes(SKIPPED)) == set(NODES)


def test_the_run_follows_the_dry_run():
    plan = read_plan(os.path.join(FIXTURES, "plan-rolling.xml"))
    engines = Engines(task.Clock())
    run_plan(plan, NODES[:5], engines, read_descriptors(plan, FIXTURES))
    batches = {}
    for at, operation, node, _ in engines.calls:
        batches.setdefault((operation, at), []).append(node)
    printed = [line.split(": ", 1)[1] for line in dry_run(plan, NODES[:5]) if line.startswith("  batch")]
    assert [", ".join(nodes) for nodes in batches.values()] == printed


def test_parallelism_bounds_a_batch_and_timeouts_fail_single_nodes():
    plan = parse_plan(b'<plan xmlns="http://dsmt.org/ns/deployment/plan" name="p"><nodes name="all" all="true"/>'
                      b'<steps><step nodes="all" max-failures="20%"><start component="web"/></step></steps></plan>')
    engines = Engines(task.Clock(), durations={"10.0.0.8": 50.0})
    report, _ = run_plan(plan, NODES, engines, parallelism=3, timeout=5.0)
    assert engines.max_in_flight == 3
    assert [at for at, _ in started(engines)] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    late = report.step("step 1").results["10.0.0.8"]
    assert (late.status, late.code) == (FAILED, TIMEOUT)
    assert report.ok  # 1 of 8 = 12.5 % <= 20 %


# ---------------------------------------------------------------- parallel branches and barriers

SITES = ["10.0.1.1", "10.0.1.2", "west1.example.org", "10.0.2.1"]


def test_parallel_branches_wait_for_each_other_at_the_barrier():
    plan = read_plan(os.path.join(FIXTURES, "plan-parallel.xml"))
    engines = Engines(task.Clock(), durations={"west1.example.org": 0.5, "10.0.2.1": 0.5})
    report, _ = run_plan(plan, SITES, engines)
    assert [(at, op, node) for at, op, node, _ in engines.calls] == [
        (0.0, "Stop", "10.0.1.1"), (0.0, "Stop", "west1.example.org"), (0.0, "Stop", "10.0.2.1"),
        (1.0, "Stop", "10.0.1.2"),
        # west was drained at 0.5 s but waits for east (2 s) at the barrier; then both start together,
        # released in the order they arrived
        (2.0, "Start", "west1.example.org"), (2.0, "Start", "10.0.2.1"), (2.0, "Start", "10.0.1.1"),
        (2.0, "Start", "10.0.1.2")]
    assert report.complete


def test_a_branch_over_its_threshold_releases_the_barrier_and_stops_the_other_branch():
    plan = read_plan(os.path.join(FIXTURES, "plan-parallel.xml"))
    engines = Engines(task.Clock(), durations={"west1.example.org": 0.5, "10.0.2.1": 0.5},
                      outcomes={("Stop", "10.0.1.1"): NodeCallError("NoDeployment", "nothing is deployed")})
    report, _ = run_plan(plan, SITES, engines)
    assert [(at, op, node) for at, op, node, _ in engines.calls] == [
        (0.0, "Stop", "10.0.1.1"), (0.0, "Stop", "west1.example.org"), (0.0, "Stop", "10.0.2.1")]
    assert report.stopped_by == "stop-east"
    assert report.step("stop-east").nodes(SKIPPED) == ["10.0.1.2"]
    assert report.step("stop-west").nodes(OK) == ["west1.example.org", "10.0.2.1"]
    assert len(report.step("start-west").nodes(SKIPPED)) == 2 and len(report.step("start-east").nodes(SKIPPED)) == 2


# ---------------------------------------------------------------- contracts at the edges

def test_unknown_nodes_and_missing_descriptors_are_refused_before_any_call():
    plan = read_plan(os.path.join(FIXTURES, "plan-bpel.xml"))
    engines = Engines(task.Clock())
    orchestrator = Orchestrator(engines)
    with pytest.raises(PlanError) as caught:
        orchestrator.run(plan, ["10.0.0.1"], read_descriptors(plan, FIXTURES))
    assert caught.value.code == "unknown-node"
    with pytest.raises(PlanError) as caught:
        orchestrator.run(plan, ["10.0.0.1", "10.0.0.2"], {})
    assert caught.value.code == "unknown-descriptor"
    assert engines.calls == []
    with pytest.raises(ValueError):
        Orchestrator(engines, parallelism=0)
    with pytest.raises(ValueError):
        Orchestrator(engines, timeout=0)


class Broken:
    def run(self, operation, requests, **options):
        raise RuntimeError("adapter bug")


def test_a_broken_adapter_or_listener_fails_nodes_not_the_run():
    plan = read_plan(os.path.join(FIXTURES, "plan-parallel.xml"))

    def listener(event: PlanEvent):
        raise ValueError("display bug")
    result = []
    Orchestrator(Broken(), on_event=listener).run(plan, SITES).addBoth(result.append)
    report = result[0]
    first = report.step("stop-east").results["10.0.1.1"]
    assert (first.status, first.code, first.reason) == (FAILED, "error", "adapter bug")
    assert report.stopped


def test_node_results_from_outcomes():
    assert node_result(Report("XYZ", True, {})).status == OK
    assert node_result(3).status == OK
    assert node_result(Report("XYZ", False, {})).code == "failed"
    assert (node_result(ValueError("odd")).code, node_result(ValueError("odd")).reason) == ("error", "odd")

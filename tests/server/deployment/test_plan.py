"""Deployment plans: parsing (good and hostile), binding to a slice, rolling batches, the dry run."""
import os
import random

import pytest

from dsmt.server.deployment.plan import (
    FAILED, MAX_NODE_SETS, MAX_PLAN_BYTES, MAX_STEPS, OK, SKIPPED, Action, Barrier, BatchSize, NodeResult,
    Parallel, PlanError, PlanStep, Rollout, Sequence, bind, check_descriptors, dry_run, parse_plan, read_descriptors,
    read_plan,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SLICE = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.1.1", "10.0.1.2", "west1.example.org", "10.0.2.1"]


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def xyz_bytes() -> bytes:
    with open(fixture("xyz.xml"), "rb") as stream:
        return stream.read()


def plan_xml(steps: str, sets: str = '<nodes name="s"><node>10.0.0.1</node></nodes>', descriptors: str = "",
             name: str = "p") -> bytes:
    return (f'<plan xmlns="http://dsmt.org/ns/deployment/plan" name="{name}">{descriptors}{sets}'
            f"<steps>{steps}</steps></plan>").encode()


def step(nodes: str = "s", action: str = '<start component="web"/>', **attributes) -> str:
    extra = "".join(f' {key.replace("_", "-")}="{value}"' for key, value in attributes.items())
    return f'<step nodes="{nodes}"{extra}>{action}</step>'


def refused(data: bytes, code: str) -> PlanError:
    with pytest.raises(PlanError) as caught:
        parse_plan(data)
    assert caught.value.code == code, str(caught.value)
    return caught.value


# ---------------------------------------------------------------- good plans

def test_bpel_fixture_is_two_deploys_in_sequence():
    plan = read_plan(fixture("plan-bpel.xml"))
    assert plan.name == "xyz-a-then-b"
    assert [ref.href for ref in plan.descriptors] == ["xyz.xml"]
    assert isinstance(plan.steps, Sequence)
    first, second = plan.step_list()
    assert (first.name, first.nodes, second.name, second.nodes) == ("install-a", "a", "install-b", "b")
    assert first.action == Action("Deploy", descriptor="xyz", parameters=(("node", "${node}"),))
    assert first.batch == BatchSize() and first.max_failures == 0
    assert bind(plan, SLICE) == {"install-a": ("10.0.0.1",), "install-b": ("10.0.0.2",)}


def test_rolling_fixture_batches_and_threshold():
    plan = read_plan(fixture("plan-rolling.xml"))
    roll, appconfig = plan.step_list()
    assert roll.batch == BatchSize(count=2) and roll.max_failures == 25
    assert appconfig.batch == BatchSize(percent=50) and appconfig.max_failures == 0
    assert plan.node_set("slice").all
    assert appconfig.action.kwargs("10.0.0.7", {}) == {"command": "APPCONFIG,10.0.0.7,XYZ,xyz-web"}
    assert roll.action.kwargs("n1.example.org", {"xyz": b"<d/>"}) == {
        "descriptor": b"<d/>", "parameters": {"node": "n1.example.org", "port": "8080"}}


def test_parallel_fixture_resolves_includes_and_barriers():
    plan = read_plan(fixture("plan-parallel.xml"))
    assert isinstance(plan.steps, Parallel)
    assert plan.node_set("west").nodes == ("west1.example.org", "10.0.2.1")
    first_branch = plan.steps.branches[0]
    assert [type(item) for item in first_branch.steps] == [PlanStep, Barrier, PlanStep]
    assert [s.name for s in plan.step_list()] == ["stop-east", "start-east", "stop-west", "start-west"]


def test_default_step_names_count_in_document_order_and_addresses_are_normalised():
    plan = parse_plan(plan_xml("<sequence>" + step() + step(name="named") + step() + "</sequence>",
                               sets='<nodes name="s"><node>WEB1.Example.ORG.</node><node>2001:DB8::0:1</node></nodes>'))
    assert [s.name for s in plan.step_list()] == ["step 1", "named", "step 3"]
    assert plan.node_set("s").nodes == ("web1.example.org", "2001:db8::1")


def test_including_a_listed_node_again_is_a_union_not_a_duplicate():
    plan = parse_plan(plan_xml(step(nodes="b"), sets='<nodes name="a"><node>10.0.0.1</node></nodes>'
                               '<nodes name="b"><include set="a"/><node>10.0.0.1</node><node>10.0.0.2</node></nodes>'))
    assert plan.node_set("b").nodes == ("10.0.0.1", "10.0.0.2")


def test_including_an_all_set_makes_all():
    plan = parse_plan(plan_xml(step(nodes="b"), sets='<nodes name="a" all="true"/>'
                               '<nodes name="b"><include set="a"/></nodes>'))
    assert plan.node_set("b").all
    assert bind(plan, ["x.example", "y.example"]) == {"step 1": ("x.example", "y.example")}


@pytest.mark.parametrize("batch, total, size", [
    (BatchSize(), 7, 7), (BatchSize(count=2), 7, 2), (BatchSize(count=10), 3, 3), (BatchSize(percent=50), 7, 4),
    (BatchSize(percent=1), 7, 1), (BatchSize(percent=100), 7, 7), (BatchSize(percent=34), 3, 2),
    (BatchSize(count=3), 0, 0),
])
def test_batch_sizes(batch, total, size):
    assert batch.of(total) == size


# ---------------------------------------------------------------- dry run

def test_dry_run_of_the_rolling_plan_is_exact():
    plan = read_plan(fixture("plan-rolling.xml"))
    assert dry_run(plan, SLICE[:5]) == [
        "plan xyz-rolling: 2 step(s) on a slice of 5 node(s)",
        "step roll: Deploy xyz (node='${node}', port='8080') on slice (5 node(s)), batch 2, max-failures 25%",
        "  batch 1/3: 10.0.0.1, 10.0.0.2",
        "  batch 2/3: 10.0.0.3, 10.0.1.1",
        "  batch 3/3: 10.0.1.2",
        "step appconfig: Command 'APPCONFIG,${node},XYZ,xyz-web' on slice (5 node(s)), batch 50%, max-failures 0%",
        "  batch 1/2: 10.0.0.1, 10.0.0.2, 10.0.0.3",
        "  batch 2/2: 10.0.1.1, 10.0.1.2",
    ]


def test_dry_run_of_parallel_branches_with_a_barrier_is_exact():
    plan = read_plan(fixture("plan-parallel.xml"))
    assert dry_run(plan, SLICE) == [
        "plan two-sites: 4 step(s) on a slice of 7 node(s)",
        "parallel: 2 branches together",
        "  branch 1",
        "    step stop-east: Stop xyz-web on east (2 node(s)), batch 1, max-failures 0%",
        "      batch 1/2: 10.0.1.1",
        "      batch 2/2: 10.0.1.2",
        "    barrier drained",
        "    step start-east: Start xyz-web on east (2 node(s)), batch all, max-failures 0%",
        "      batch 1/1: 10.0.1.1, 10.0.1.2",
        "  branch 2",
        "    step stop-west: Stop xyz-web on west (2 node(s)), batch all, max-failures 0%",
        "      batch 1/1: west1.example.org, 10.0.2.1",
        "    barrier drained",
        "    step start-west: Start xyz-web on west (2 node(s)), batch all, max-failures 0%",
        "      batch 1/1: west1.example.org, 10.0.2.1",
        "end parallel",
    ]


def test_dry_run_of_an_empty_slice_makes_no_call():
    plan = parse_plan(plan_xml(step(nodes="all", action="<uninstall/>"), sets='<nodes name="all" all="true"/>'))
    assert dry_run(plan, []) == [
        "plan p: 1 step(s) on a slice of 0 node(s)",
        "step step 1: Uninstall every component on all (0 node(s)), batch all, max-failures 0%",
        "  no node: no call",
    ]


def test_binding_refuses_a_listed_node_outside_the_slice():
    plan = read_plan(fixture("plan-bpel.xml"))
    with pytest.raises(PlanError) as caught:
        dry_run(plan, ["10.0.0.1"])
    assert caught.value.code == "unknown-node"
    assert "10.0.0.2" in caught.value.reason and "install-b" in caught.value.reason


# ---------------------------------------------------------------- descriptors

def test_read_descriptors_checks_the_descriptor_and_the_parameters():
    plan = read_plan(fixture("plan-rolling.xml"))
    assert read_descriptors(plan, FIXTURES) == {"xyz": xyz_bytes()}


@pytest.mark.parametrize("parameters, descriptors, code, words", [
    ('<parameter name="node" value="${node}"/>', {}, "unknown-descriptor", "no content"),
    ('<parameter name="node" value="${node}"/>', {"x": b"<deployment/>"}, "descriptor", "schema"),
    ('<parameter name="node" value="${node}"/>', {"x": b"<!DOCTYPE d><d/>"}, "descriptor", "unsafe-xml"),
    ('<parameter name="node" value="${node}"/><parameter name="colour" value="red"/>', None, "parameter",
     "'colour' is not a parameter"),
    ('<parameter name="port" value="80"/>', None, "parameter", "'node' is required"),
])
def test_descriptor_problems_are_refused_before_any_call(parameters, descriptors, code, words):
    plan = parse_plan(plan_xml(step(action=f'<deploy descriptor="x">{parameters}</deploy>'),
                               descriptors='<descriptor name="x" href="xyz.xml"/>'))
    with pytest.raises(PlanError) as caught:
        check_descriptors(plan, {"x": xyz_bytes()} if descriptors is None else descriptors)
    assert caught.value.code == code and words in str(caught.value), str(caught.value)


def test_unreadable_files_are_io_errors():
    with pytest.raises(PlanError) as caught:
        read_plan("no-such-plan.xml")
    assert caught.value.code == "io" and "no-such-plan.xml" in caught.value.reason
    plan = read_plan(fixture("plan-bpel.xml"))
    with pytest.raises(PlanError) as caught:
        read_descriptors(plan, "no-such-directory")
    assert caught.value.code == "io" and "'xyz'" in caught.value.reason


# ---------------------------------------------------------------- hostile and wrong plans

def test_dtd_and_entities_are_refused():
    error = refused(b'<?xml version="1.0"?><!DOCTYPE plan [<!ENTITY x "boom">]>'
                    + plan_xml(step(action='<command>&x;</command>')), "unsafe-xml")
    assert "DOCTYPE" in error.reason


def test_oversized_plan_is_refused_at_the_door():
    data = plan_xml(step()).replace(b"<steps>", b"<!--" + b"x" * MAX_PLAN_BYTES + b"--><steps>")
    assert "over the limit" in refused(data, "unsafe-xml").reason


def test_deep_nesting_is_refused():
    data = plan_xml("<sequence>" * 40 + step() + "</sequence>" * 40)
    assert "deeper" in refused(data, "unsafe-xml").reason


@pytest.mark.parametrize("data", [b"", b"<plan", b"\xff\xfe<", b"not xml at all"])
def test_garbage_is_unsafe_xml(data):
    refused(data, "unsafe-xml")


def test_wrong_root_and_namespace_are_schema_errors():
    assert "not <plan>" in refused(b'<plan name="p"/>', "schema").reason
    assert "not <plan>" in refused(b'<deployment xmlns="http://dsmt.org/ns/deployment"/>', "schema").reason


@pytest.mark.parametrize("attributes", [
    {"batch": "150%"}, {"batch": "0"}, {"batch": "0%"}, {"batch": "-2"}, {"batch": "2.5"}, {"batch": "half"},
    {"batch": "1000000"}, {"max_failures": "101%"}, {"max_failures": "-1%"}, {"max_failures": "25"},
    {"max_failures": "abc"}, {"max_failures": "05%"}, {"max_failures": "1e2%"},
])
def test_bad_batches_and_percentages_are_schema_errors_naming_the_attribute(attributes):
    error = refused(plan_xml(step(**attributes)), "schema")
    assert list(attributes)[0].replace("_", "-") in error.reason and error.line == 1


@pytest.mark.parametrize("steps, sets, code, words", [
    (step(nodes="nope"), None, "unknown-node-set", "'nope'"),
    (step(), '<nodes name="s"><include set="ghost"/></nodes>', "unknown-node-set", "'ghost'"),
    (step(), '<nodes name="s"><include set="s"/></nodes>', "cycle", "includes itself"),
    (step(), '<nodes name="s"><include set="t"/></nodes><nodes name="t"><include set="u"/></nodes>'
             '<nodes name="u"><include set="s"/></nodes>', "cycle", "s -> t -> u -> s"),
    (step(), '<nodes name="s" all="true"><node>10.0.0.1</node></nodes>', "node-set", "either"),
    (step(), '<nodes name="s"/>', "node-set", "lists no node"),
    (step(), '<nodes name="s"><node>10.0.0.1</node></nodes><nodes name="s" all="true"/>', "duplicate",
     "declared twice"),
    (step(), '<nodes name="s"><node>10.0.0.1</node><node>10.0.0.01</node></nodes>', "node", "10.0.0.01"),
    (step(), '<nodes name="s"><node>10.0.0.1</node><node> 10.0.0.1 </node></nodes>', "duplicate", "twice"),
    (step(), '<nodes name="s"><node>fe80::1%eth0</node></nodes>', "node", "zone"),
    ("<sequence>" + step(name="x") + step(name="x") + "</sequence>", None, "duplicate", "named twice"),
    (step(action='<deploy descriptor="ghost"/>'), None, "unknown-descriptor", "'ghost'"),
    (step(action='<command>APPCONFIG,${host},XYZ,web</command>'), None, "template", "${host}"),
    (step(action='<command>cost ${</command>'), None, "template", "not closed"),
    (step(action='<deploy descriptor="d"><parameter name="n" value="${slice}"/></deploy>'), None, "template",
     "${slice}"),
    ("<sequence>" + step() + '<barrier name="b"/></sequence>', None, "barrier", "not inside a branch"),
    ("<parallel><sequence>" + step() + '<barrier name="b"/></sequence>' + step() + "</parallel>", None, "barrier",
     "only one branch"),
    ('<parallel><sequence><barrier name="x"/><barrier name="y"/></sequence>'
     '<sequence><barrier name="y"/><barrier name="x"/></sequence></parallel>', None, "barrier", "deadlock"),
])
def test_semantic_errors_have_precise_codes(steps, sets, code, words):
    data = plan_xml(steps, sets=sets or '<nodes name="s"><node>10.0.0.1</node></nodes>',
                    descriptors='<descriptor name="d" href="d.xml"/>')
    error = refused(data, code)
    assert words in error.reason, error.reason


def test_duplicate_descriptor_and_parameter_names():
    error = refused(plan_xml(step(), descriptors='<descriptor name="d" href="a.xml"/><descriptor name="d" '
                                                 'href="b.xml"/>'), "duplicate")
    assert "'d'" in error.reason
    error = refused(plan_xml(step(action='<deploy descriptor="d"><parameter name="a" value="1"/><parameter '
                                         'name="a" value="2"/></deploy>'),
                             descriptors='<descriptor name="d" href="a.xml"/>'), "duplicate")
    assert "'a' is given twice" in error.reason


def test_schema_shape_errors():
    refused(plan_xml('<step nodes="s"/>'), "schema")  # no action
    refused(plan_xml('<step nodes="s"><start component="a"/><stop component="a"/></step>'), "schema")
    refused(plan_xml("<parallel>" + step() + "</parallel>"), "schema")  # one branch
    refused(plan_xml(step(action='<start component="Web"/>')), "schema")
    refused(plan_xml(step(action="<command>  </command>")), "schema")
    refused(plan_xml(step(), sets='<nodes name="s"><node>a</node><rogue/></nodes>'), "schema")


def test_limits():
    many = "<sequence>" + "".join(step() for _ in range(MAX_STEPS + 1)) + "</sequence>"
    assert f"more than {MAX_STEPS}" in refused(plan_xml(many), "limit").reason
    sets = "".join(f'<nodes name="s{i}"><node>10.0.0.1</node></nodes>' for i in range(MAX_NODE_SETS + 1))
    assert "node sets" in refused(plan_xml(step(nodes="s0"), sets=sets), "limit").reason


def test_mutated_plans_never_raise_anything_but_plan_errors():
    with open(fixture("plan-parallel.xml"), "rb") as stream:
        original = stream.read()
    chance = random.Random(5)
    for _ in range(300):
        data = bytearray(original)
        for _ in range(chance.randint(1, 4)):
            data[chance.randrange(len(data))] = chance.choice(b'<>/="%$&{}x0 \x00')
        try:
            parse_plan(bytes(data))
        except PlanError:
            pass


# ---------------------------------------------------------------- rolling one step (pure)

def roll(nodes, batch=BatchSize(count=2), max_failures=25) -> Rollout:
    return Rollout(PlanStep("roll", "s", Action("Start", component="web"), batch, max_failures), nodes)


def test_rollout_under_the_threshold_runs_every_batch():
    rollout = roll([f"n{i}" for i in range(8)])
    assert rollout.batches == (("n0", "n1"), ("n2", "n3"), ("n4", "n5"), ("n6", "n7"))
    seen = []
    while (batch := rollout.next_batch()) is not None:
        seen.append(batch)
        for node in batch:
            rollout.record(node, NodeResult(FAILED, "timeout", "slow") if node in ("n1", "n6") else NodeResult(OK))
    assert len(seen) == 4 and not rollout.exceeded  # 2 of 8 = 25 %: not more than 25 %
    assert [r.status for r in rollout.ordered_results().values()].count(FAILED) == 2


def test_rollout_over_the_threshold_stops_and_skips_the_rest():
    rollout = roll([f"n{i}" for i in range(8)], max_failures=20)
    for node in rollout.next_batch():
        rollout.record(node, NodeResult(FAILED, "unreachable", "down"))
    assert rollout.exceeded  # 2 of 8 = 25 % > 20 %
    assert rollout.next_batch() is None
    results = rollout.ordered_results()
    assert [results[f"n{i}"].status for i in range(8)] == [FAILED] * 2 + [SKIPPED] * 6
    assert results["n5"].reason == "the step stopped: 2 of 8 node(s) failed, more than max-failures 20%"


def test_rollout_with_zero_tolerance_stops_at_the_first_failure_and_skip_rest_closes():
    rollout = roll(["a", "b", "c"], batch=BatchSize(count=1), max_failures=0)
    rollout.record(*rollout.next_batch(), NodeResult(OK))
    rollout.record(*rollout.next_batch(), NodeResult(FAILED, "x", "y"))
    assert rollout.exceeded and rollout.next_batch() is None
    assert rollout.ordered_results()["c"].status == SKIPPED
    other = roll(["a", "b"], batch=BatchSize(count=1))
    other.next_batch()
    other.skip_rest("the plan stopped")
    assert other.next_batch() is None
    assert other.ordered_results() == {"a": NodeResult(SKIPPED, reason="the plan stopped"),
                                       "b": NodeResult(SKIPPED, reason="the plan stopped")}
    with pytest.raises(ValueError):
        other.record("zz", NodeResult(OK))

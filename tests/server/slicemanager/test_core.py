"""The slice manager core over the real agent and node manager cores (an in-test adapter, no network).

The adapter implements AgentCalls on ``agent.core.Agent`` (test PKI) and
NodeCalls with ``calls.run_each`` on real ``nodemanager.core.NodeManager``
instances, keeping a tiny record of slivers for CreateSliver and the key
operations.  Nodes can be made unreachable, failing or silent (a Deferred that
never fires, with ``task.Clock`` for the timeout).
"""
from __future__ import annotations

import functools
import glob
import os

import pytest
from twisted.internet import defer, task

from dsmt.server.agent.core import Agent, NodeRegistry, ShortageError
from dsmt.server.nodemanager.core import AdmissionRefused, NodeManager, NoLease
from dsmt.server.nodemanager.sshkeys import SshKeyError, parse_private_key, parse_public_key
from dsmt.server.nodemanager.store import LeaseStore
from dsmt.server.slicemanager.calls import AgentCallError, LeaseInfo, NodeAd, NodeCallError, SliverInfo, run_each
from dsmt.server.slicemanager.core import Report, SliceManager, expiration_line, result_line
from dsmt.server.slicemanager.slicedir import LEASES, TICKETS, VMS, SliceDirectory
from dsmt.server.slicemanager.spec import SliceSpecError, parse_slice_spec

from ..agent.support import NOW, parties

NODES = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
LEASELEN = 7200
USER_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA97VFqN5fkbpwPr9JRqqs7Xz/JdKkf6PeqEzaHRTEos alice@example")


def spec(name="oceanstore", numnodes=3, ips=None) -> bytes:
    ips_xml = f"<ips>{' '.join(ips)}</ips>" if ips else ""
    return (f'<?xml version="1.0" ?><slice><name>{name}</name><numnodes>{numnodes}</numnodes>'
            f"<leaselen>{LEASELEN}</leaselen>{ips_xml}</slice>").encode()


class Clock:
    def __init__(self):
        self.t = NOW

    def __call__(self):
        return self.t


def lease_info(lease) -> LeaseInfo:
    return LeaseInfo(lease.lease_id, lease.ticket_id, lease.slice, lease.node, lease.slots, lease.granted_at,
                     lease.expires_at, lease.leaselen)


class FakeAgent:
    """AgentCalls on the real agent core."""

    def __init__(self, agent: Agent, endpoints: dict[str, str]):
        self.agent, self.endpoints, self.down, self.calls = agent, endpoints, False, []

    def _call(self, name, function):
        self.calls.append(name)
        if self.down:
            return defer.fail(AgentCallError("unreachable", "connection refused by the agent"))
        return defer.maybeDeferred(function)

    def getads(self):
        return self._call("getads", lambda: [NodeAd(ad.node, ad.slots, ad.free, self.endpoints[ad.node])
                                             for ad in self.agent.getads()])

    def issue_tickets(self, spec_xml):
        def issue():
            try:
                return self.agent.issue(parse_slice_spec(spec_xml))
            except SliceSpecError as exc:
                raise AgentCallError("InvalidSpec", str(exc)) from None
            except ShortageError as exc:
                raise AgentCallError("Shortage", str(exc)) from None
        return self._call("issue_tickets", issue)

    def release(self, ticket_ids):
        return self._call("release", lambda: sum(self.agent.registry.release(t) for t in ticket_ids))


class FakeNode:
    """One node manager: the real core for leases, a dict of slivers (slice -> set of key lines)."""

    def __init__(self, manager: NodeManager):
        self.manager, self.slivers, self.slice_keys, self.fail_create = manager, {}, {}, None

    def call(self, operation, slice=None, **kwargs):
        node, nm = self.manager.node_address, self.manager
        try:
            if operation == "Redeem":
                return lease_info(nm.redeem(kwargs["ticket"]))
            if operation == "RenewLease":
                return lease_info(nm.renew(slice))
            if operation == "CreateSliver":
                lease = nm.held(slice)
                if lease.lease_id != kwargs["leaseId"]:
                    raise NodeCallError("BadLease", f"lease {kwargs['leaseId']} is not slice {slice}'s lease")
                if self.fail_create:
                    raise NodeCallError("error", self.fail_create)
                pair = parse_private_key(kwargs["slicePrivateKey"], kwargs["slicePublicKey"])
                self.slice_keys[slice] = pair.public_line
                self.slivers.setdefault(slice, set())
                return SliverInfo(slice, node, "running", lease.lease_id, lease.expires_at, 0)
            if operation == "DeleteSliver":
                had = self.slivers.pop(slice, None)
                try:
                    nm.release(slice)
                except NoLease:
                    if had is None:
                        raise NodeCallError("NoSliver", f"slice {slice} has no sliver on {node}") from None
                return SliverInfo(slice, node, "terminated", None, None, 0)
            keys = self.slivers.get(slice)
            if keys is None:
                raise NodeCallError("NoSliver", f"slice {slice} has no sliver on {node}")
            if operation == "AddKey":
                keys.add(parse_public_key(kwargs["key"]).line)
            elif operation == "DelKey":
                keys.discard(parse_public_key(kwargs["key"]).line)
            elif operation == "NukeKeys":
                keys.clear()
            return len(keys)
        except AdmissionRefused as exc:
            raise NodeCallError(f"AdmissionRefused.{exc.code}", exc.reason) from None
        except NoLease as exc:
            raise NodeCallError("NoLease", exc.reason) from None
        except SshKeyError as exc:
            raise NodeCallError("InvalidKey", exc.reason) from None


class FakeNodes:
    """NodeCalls with run_each; nodes may be ``down`` (refused), ``silent`` (never answer) or ``gated``."""

    def __init__(self, by_endpoint: dict[str, FakeNode], reactor):
        self.by_endpoint, self.reactor = by_endpoint, reactor
        self.down, self.silent, self.gated = set(), set(), False
        self.calls, self.waiting, self.in_flight, self.most_in_flight = [], [], 0, 0
        self.runs = []

    def run(self, operation, requests, *, parallelism, timeout, on_result=None):
        self.runs.append((operation, parallelism, timeout))
        return run_each(functools.partial(self._one, operation), operation, requests, parallelism=parallelism,
                        timeout=timeout, on_result=on_result, clock=self.reactor)

    def _one(self, operation, request):
        self.calls.append((operation, request.node))
        if request.node in self.down:
            raise NodeCallError("unreachable", f"connection to {request.endpoint} refused")
        if request.node in self.silent:
            return defer.Deferred()
        answer = defer.maybeDeferred(self.by_endpoint[request.endpoint].call, operation, **request.kwargs)
        if not self.gated:
            return answer
        gate = defer.Deferred()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)

        def opened(_):
            self.in_flight -= 1
            return answer
        gate.addCallback(opened)
        self.waiting.append(gate)
        return gate

    def open_one(self):
        self.waiting.pop(0).callback(None)


class World:
    def __init__(self, tmp_path, nodes=NODES, slots=1):
        self.clock = Clock()
        self.reactor = task.Clock()
        self.registry = NodeRegistry({node: slots for node in nodes})
        party = parties().agent
        self.endpoints = {node: f"http://127.0.0.1:{9000 + i}/nodemanager" for i, node in enumerate(nodes)}
        self.agent = FakeAgent(Agent(self.registry, party.key, party.cert, self.clock), self.endpoints)
        self.nodes = {node: FakeNode(NodeManager(node, parties().trust, LeaseStore(str(tmp_path / f"{node}.db")),
                                                 self.clock, capacity_slots=slots)) for node in nodes}
        self.calls = FakeNodes({self.endpoints[n]: fake for n, fake in self.nodes.items()}, self.reactor)
        self.directory = SliceDirectory(str(tmp_path / "home"))
        self.lines: list[str] = []

    def manager(self, **options) -> SliceManager:
        options.setdefault("on_result", lambda node, outcome: self.lines.append(result_line(node, outcome)))
        return SliceManager(self.agent, self.calls, self.directory, clock=self.clock, **options)

    def files(self, name="oceanstore"):
        return self.directory.slice(name)


def done(d: defer.Deferred) -> Report:
    """The result of a Deferred that has fired (the fakes answer synchronously)."""
    results = []
    d.addBoth(results.append)
    assert results, "the command did not finish"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def test_createslice_happy_path(world):
    report = done(world.manager().createslice(spec()))
    assert report.ok and report.slice == "oceanstore" and list(report.outcomes) == NODES
    assert sorted(world.lines) == [f"Success on {node}" for node in NODES]
    files = world.files()
    assert files.nodes(VMS) == NODES and files.nodes(LEASES) == [] and files.nodes(TICKETS) == []
    assert files.spec() == spec() and files.endpoints() == world.endpoints
    private, public = files.keypair_files()
    assert all(fake.slice_keys["oceanstore"] == public for fake in world.nodes.values())   # one pair for all
    assert oct(os.stat(os.path.join(files.path, "slicekeypair", "id_ed25519")).st_mode & 0o777) == "0o600"
    assert [op for op, _ in world.calls.calls] == ["Redeem"] * 3 + ["CreateSliver"] * 3
    assert done(world.manager().nodelist("oceanstore")).values == NODES
    exp = done(world.manager().expirations("oceanstore"))
    assert [expiration_line("oceanstore", node, lease.expires_at) for node, lease in exp.outcomes.items()][0] == \
        "Sliver for slice oceanstore expires 2027-01-15 10:00:00 UTC on 10.0.0.1"
    assert world.calls.runs[0] == ("Redeem", 16, None)


def test_partial_failures_then_resume_with_newleases_and_newvms(world):
    """The HOWTO's failure story: step 2 fails on one node, step 3 on another; retry with the files left."""
    world.calls.down.add("10.0.0.2")
    world.nodes["10.0.0.3"].fail_create = "cannot create the sandbox: disk full"
    report = done(world.manager().createslice(spec()))
    assert not report.ok and report.failed == ["10.0.0.2", "10.0.0.3"] and report.succeeded == ["10.0.0.1"]
    assert sorted(world.lines) == ["Error on 10.0.0.2: connection to http://127.0.0.1:9001/nodemanager refused",
                                   "Error on 10.0.0.3: cannot create the sandbox: disk full",
                                   "Success on 10.0.0.1"]       # one line per node, its first failing step
    assert ("CreateSliver", "10.0.0.2") not in world.calls.calls   # failed at step 2: not tried at step 3
    files = world.files()
    assert (files.nodes(TICKETS), files.nodes(LEASES), files.nodes(VMS)) == (["10.0.0.2"], ["10.0.0.3"], ["10.0.0.1"])
    keypair = files.keypair_files()

    world.calls.down.clear()
    world.lines.clear()
    tickets = glob.glob(os.path.join(files.path, "tickets", "*"))
    report = done(world.manager().newleases("oceanstore", tickets))
    assert report.ok and world.lines == ["Success on 10.0.0.2"]
    assert files.nodes(TICKETS) == [] and files.nodes(LEASES) == ["10.0.0.2", "10.0.0.3"]

    world.nodes["10.0.0.3"].fail_create = None
    world.lines.clear()
    report = done(world.manager().newvms("oceanstore", glob.glob(os.path.join(files.path, "leases", "*"))))
    assert report.ok and sorted(world.lines) == ["Success on 10.0.0.2", "Success on 10.0.0.3"]
    assert files.nodes(LEASES) == [] and files.nodes(VMS) == NODES
    assert files.keypair_files() == keypair                          # generated once per slice
    assert len({fake.slice_keys["oceanstore"] for fake in world.nodes.values()}) == 1


def test_retrying_a_redeemed_ticket_returns_the_same_lease(world):
    done(world.manager().newtickets(spec()))
    files = world.files()
    tickets = [files.node_path(TICKETS, node) for node in NODES]
    copies = []
    for path in tickets:                       # keep copies: success removes tickets/<node>
        copy = path + ".copy"
        copies.append(copy)
        with open(path, "rb") as src, open(copy, "wb") as dst:
            dst.write(src.read())
    first = done(world.manager().newleases("oceanstore", tickets))
    again = done(world.manager().newleases("oceanstore", copies))
    assert first.ok and again.ok and first.outcomes == again.outcomes


@pytest.mark.parametrize("make, code", [
    (lambda w: spec(numnodes=4), "Shortage"),
    (lambda w: spec(ips=["10.0.0.1", "10.0.0.9"], numnodes=2), "Shortage"),
])
def test_agent_refusal_is_one_error_and_nothing_changes(world, make, code):
    report = done(world.manager().createslice(make(world)))
    assert report.error.code == code and "only" in report.error.reason and report.outcomes == {}
    assert world.lines == [] and world.calls.calls == []
    assert not os.path.exists(world.directory.slices_path)
    assert "failed" in report.summary()


def test_agent_unreachable_and_invalid_spec(world):
    world.agent.down = True
    report = done(world.manager().createslice(spec()))
    assert report.error.code == "unreachable" and not os.path.exists(world.directory.slices_path)
    world.agent.down = False
    world.agent.calls.clear()
    report = done(world.manager().createslice(spec(name="root")))
    assert report.error.code == "invalid-spec" and "reserved" in report.error.reason
    assert world.agent.calls == []                                   # refused locally, agent never asked
    report = done(world.manager().createslice(b"\x00" * 10))
    assert report.error.code == "invalid-spec"


def test_existing_slice_refused_and_expired_leftover_replaced(world):
    done(world.manager().createslice(spec()))
    report = done(world.manager().createslice(spec(numnodes=1)))
    assert report.error.code == "exists" and "deleteslice" not in report.error.reason
    world.clock.t += LEASELEN                                        # everything expired
    for fake in world.nodes.values():
        fake.manager.reap()
    world.registry.expire(world.clock.t + 3600)
    report = done(world.manager().newtickets(spec(numnodes=1)))
    assert report.ok and world.files().nodes(VMS) == []
    assert world.files().nodes(TICKETS) == ["10.0.0.1"]


def test_deleteslice_after_partial_creation_releases_tickets_and_removes_everything(world):
    world.calls.down.add("10.0.0.2")
    world.nodes["10.0.0.3"].fail_create = "no"
    done(world.manager().createslice(spec()))
    assert world.registry.free("10.0.0.2", world.clock()) == 0
    world.calls.down.clear()
    world.lines.clear()
    report = done(world.manager().deleteslice("oceanstore"))
    assert report.ok and sorted(world.lines) == ["Success on 10.0.0.1", "Success on 10.0.0.3"]
    assert ("DeleteSliver", "10.0.0.2") not in world.calls.calls     # ticket only: released at the agent
    assert world.registry.free("10.0.0.2", world.clock()) == 1
    assert not world.files().exists()
    assert all(fake.manager.leases() == [] for fake in world.nodes.values())


def test_deleteslice_partial_failure_keeps_what_is_left_then_retry(world):
    done(world.manager().createslice(spec()))
    world.calls.down.add("10.0.0.3")
    report = done(world.manager().deleteslice("oceanstore"))
    assert report.failed == ["10.0.0.3"] and world.files().nodes(VMS) == ["10.0.0.3"]
    world.calls.down.clear()
    assert done(world.manager().deleteslice("oceanstore")).ok and not world.files().exists()
    report = done(world.manager().deleteslice("oceanstore"))
    assert report.error.code == "no-slice"


def test_deleteslice_counts_already_gone_as_success(world):
    done(world.manager().createslice(spec()))
    world.nodes["10.0.0.2"].slivers.clear()
    world.nodes["10.0.0.2"].manager.release("oceanstore")           # gone behind our back
    report = done(world.manager().deleteslice("oceanstore"))
    assert report.ok and not world.files().exists()


def test_deleteslice_agent_down_keeps_tickets(world):
    world.calls.down.update(NODES)
    done(world.manager().createslice(spec()))
    world.agent.down = True
    report = done(world.manager().deleteslice("oceanstore"))
    assert report.error.code == "unreachable" and world.files().nodes(TICKETS) == NODES


def test_keys(world):
    done(world.manager().createslice(spec()))
    world.lines.clear()
    manager = world.manager()
    report = done(manager.addkey("oceanstore", USER_KEY + "\n"))
    assert report.ok and report.outcomes == {node: 1 for node in NODES} and len(world.lines) == 3
    assert world.files().user_keys() == [parse_public_key(USER_KEY).line]
    assert all(fake.slivers["oceanstore"] == {parse_public_key(USER_KEY).line} for fake in world.nodes.values())
    world.calls.down.add("10.0.0.1")
    report = done(manager.delkey("oceanstore", USER_KEY))
    assert report.failed == ["10.0.0.1"] and world.files().user_keys() != []   # kept: not gone everywhere
    world.calls.down.clear()
    assert done(manager.delkey("oceanstore", USER_KEY)).ok and world.files().user_keys() == []
    done(manager.addkey("oceanstore", USER_KEY))
    report = done(manager.nukekeys("oceanstore"))
    assert report.ok and report.outcomes == {node: 0 for node in NODES} and world.files().user_keys() == []


@pytest.mark.parametrize("text", ["", "not a key", USER_KEY + "\n" + USER_KEY, "ssh-rsa AAAAB3Nza", "\x00" * 100])
def test_bad_key_refused_locally(world, text):
    done(world.manager().createslice(spec()))
    world.calls.calls.clear()
    report = done(world.manager().addkey("oceanstore", text))
    assert report.error.code == "invalid-key" and report.error.reason and world.calls.calls == []


def test_key_commands_need_slivers(world):
    world.calls.down.update(NODES)
    done(world.manager().createslice(spec()))
    report = done(world.manager().nukekeys("oceanstore"))
    assert report.error.code == "no-nodes"


def test_renewslice_updates_files(world):
    world.nodes["10.0.0.3"].fail_create = "no"
    done(world.manager().createslice(spec()))
    world.clock.t += 1000
    world.calls.down.add("10.0.0.2")
    report = done(world.manager().renewslice("oceanstore"))
    assert report.failed == ["10.0.0.2"]
    files = world.files()
    assert files.lease(VMS, "10.0.0.1").expires_at == NOW + 1000 + LEASELEN
    assert files.lease(LEASES, "10.0.0.3").expires_at == NOW + 1000 + LEASELEN     # lease-only node too
    assert files.lease(VMS, "10.0.0.2").expires_at == NOW + LEASELEN               # failed: unchanged


def test_timeout_with_a_node_that_never_answers(world):
    world.calls.silent.add("10.0.0.2")
    d = world.manager(timeout=5).createslice(spec())
    assert not d.called and world.lines == []
    world.reactor.advance(4.9)
    assert not d.called
    world.reactor.advance(0.1)
    report = done(d)
    assert report.failed == ["10.0.0.2"]
    assert "Error on 10.0.0.2: no answer from 10.0.0.2 in 5 s" in world.lines
    assert world.files().nodes(TICKETS) == ["10.0.0.2"] and world.files().nodes(VMS) == ["10.0.0.1", "10.0.0.3"]
    assert world.reactor.getDelayedCalls() == []                       # no timer left behind


def test_lines_arrive_before_the_slow_node_finishes(world):
    done(world.manager().newtickets(spec()))
    world.lines.clear()
    world.calls.silent.add("10.0.0.3")
    files = world.files()
    d = world.manager(timeout=30).newleases("oceanstore", [files.node_path(TICKETS, n) for n in NODES])
    assert sorted(world.lines) == ["Success on 10.0.0.1", "Success on 10.0.0.2"] and not d.called
    assert files.nodes(LEASES) == ["10.0.0.1", "10.0.0.2"]           # saved as they arrived
    world.reactor.advance(30)
    assert done(d).failed == ["10.0.0.3"]


def test_parallelism_bound(tmp_path):
    nodes = [f"10.0.1.{i}" for i in range(1, 8)]
    world = World(tmp_path, nodes)
    done(world.manager().createslice(spec(numnodes=7)))
    world.calls.gated = True
    d = world.manager(parallelism=2).addkey("oceanstore", USER_KEY)
    while world.calls.waiting:
        assert world.calls.in_flight <= 2
        world.calls.open_one()
    report = done(d)
    assert world.calls.most_in_flight == 2 and report.ok and len(report.outcomes) == 7


def test_unknown_endpoint_is_a_node_error(world):
    done(world.manager().createslice(spec()))
    files = world.files()
    os.unlink(os.path.join(files.path, "nodes"))
    del world.agent.endpoints["10.0.0.3"]
    world.registry.unregister("10.0.0.3")
    report = done(world.manager().renewslice("oceanstore"))
    assert report.failed == ["10.0.0.3"] and "no endpoint known for 10.0.0.3" in report.outcomes["10.0.0.3"].reason
    assert files.endpoints() == {n: world.endpoints[n] for n in NODES[:2]}       # learned again from the ads


def test_a_node_that_moved_is_called_again_at_its_advertised_endpoint(world):
    done(world.manager().createslice(spec()))
    files = world.files()
    old = world.endpoints["10.0.0.2"]
    new = "http://127.0.0.1:9999/nodemanager"       # its node manager restarted on another port
    world.calls.by_endpoint[new] = world.calls.by_endpoint.pop(old)
    world.agent.endpoints["10.0.0.2"] = new

    def refused_at_old(operation, request, _one=world.calls._one):
        if request.endpoint == old:
            raise NodeCallError("unreachable", f"connection to {old} refused")
        return _one(operation, request)
    world.calls._one = refused_at_old
    report = done(world.manager().renewslice("oceanstore"))
    assert report.ok, report.outcomes
    assert files.endpoints()["10.0.0.2"] == new                                   # remembered for next time
    assert [c for c in world.calls.calls if c[1] == "10.0.0.2"][-1] == ("RenewLease", "10.0.0.2")
    # a node still unreachable where the agent says it is reports the refusal, once
    world.calls.down.add("10.0.0.3")
    report = done(world.manager().renewslice("oceanstore"))
    assert report.failed == ["10.0.0.3"] and report.outcomes["10.0.0.3"].code == "unreachable"
    assert world.lines.count([l for l in world.lines if l.startswith("Error on 10.0.0.3")][0]) == 1


def test_odd_answers_become_node_errors(world):
    done(world.manager().createslice(spec()))

    class Liar:
        def run(self, operation, requests, *, parallelism, timeout, on_result=None):
            return defer.succeed({r.node: (LeaseInfo("L", "T", "other", r.node, 1, 0, 0, 1) if i else "junk")
                                  for i, r in enumerate(requests)})
    manager = SliceManager(world.agent, Liar(), world.directory, clock=world.clock)
    report = done(manager.renewslice("oceanstore"))
    assert report.failed == NODES and "str, not LeaseInfo" in report.outcomes["10.0.0.1"].reason
    assert "slice other" in report.outcomes["10.0.0.2"].reason


@pytest.mark.parametrize("content, words", [
    (b"garbage", "is not a ticket"),
    (None, "for slice other"),
    (b"x" * 40000, "limit"),
])
def test_hostile_ticket_files(world, tmp_path, content, words):
    done(world.manager().newtickets(spec(numnodes=1)))
    world.calls.calls.clear()
    path = tmp_path / "t"
    if content is None:
        (tmp_path / "other").mkdir()
        world2 = World(tmp_path / "other")
        done(world2.manager().newtickets(spec(name="other", numnodes=1)))
        content = world2.files("other").ticket("10.0.0.1")
    path.write_bytes(content)
    report = done(world.manager().newleases("oceanstore", [str(path)]))
    assert report.error.code == "bad-file" and words in report.error.reason and world.calls.calls == []


def test_hostile_lease_files_and_missing_slice(world, tmp_path):
    done(world.manager().createslice(spec()))
    path = tmp_path / "l"
    path.write_bytes(b"<l:lease xmlns:l='http://dsmt.org/ns/lease'/>")
    report = done(world.manager().newvms("oceanstore", [str(path)]))
    assert report.error.code == "bad-file"
    report = done(world.manager().newvms("nosuch", []))
    assert report.error.code == "no-slice"
    report = done(world.manager().nodelist("../etc"))
    assert report.error.code == "bad-name"


def test_clean_and_getads(world):
    done(world.manager().createslice(spec()))
    assert done(world.manager().clean()).values == []
    world.clock.t += LEASELEN
    report = done(world.manager().clean())
    assert report.values == ["oceanstore"] and report.summary() == "clean: 1 slice removed"
    ads = done(world.manager().getads()).values
    assert [ad.node for ad in ads] == NODES and ads[0].endpoint == world.endpoints["10.0.0.1"]


def test_manager_arguments_checked(world):
    with pytest.raises(ValueError):
        world.manager(parallelism=0)
    with pytest.raises(ValueError):
        world.manager(timeout=0)


def test_ad_without_endpoint_and_agent_failure_keep_leftover(world):
    done(world.manager().createslice(spec(numnodes=1)))
    world.clock.t += LEASELEN                               # the old slice has expired
    world.registry.expire(world.clock.t + 3600)
    for fake in world.nodes.values():
        fake.manager.reap()
    world.agent.down = True
    assert done(world.manager().createslice(spec())).error.code == "unreachable"
    assert world.files().nodes(VMS) == ["10.0.0.1"]         # nothing changed locally
    world.agent.down = False
    world.agent.endpoints["10.0.0.3"] = None                # the agent knows no endpoint for this node
    report = done(world.manager().createslice(spec()))
    assert report.failed == ["10.0.0.3"] and "no endpoint known" in report.outcomes["10.0.0.3"].reason
    assert "10.0.0.3" not in world.files().endpoints()


def test_expirations_report_unreadable_vm_files(world):
    done(world.manager().createslice(spec()))
    with open(world.files().node_path(VMS, "10.0.0.2"), "wb") as handle:
        handle.write(b"junk")
    report = done(world.manager().expirations("oceanstore"))
    assert report.failed == ["10.0.0.2"] and report.summary() == "expirations oceanstore: 2 slivers, 1 unreadable"

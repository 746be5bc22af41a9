"""The engines' network adapters (``dsmt.server.deployment.remote``): the request contract, and real engines
(``twistd dsmt-engine``'s service, in this process) on a PsEPR router reached by multicast, by instance and
over HTTP — plus a plan run through them.  :class:`Engines` is the harness ``tests/client/test_dsmtc.py``
uses too."""
from __future__ import annotations

import os

import pytest
from twisted.internet import defer
from twisted.trial import unittest

from dsmt.server.deployment import daemon, remote
from dsmt.server.deployment.engine import Report
from dsmt.server.deployment.orchestrate import Orchestrator
from dsmt.server.deployment.plan import parse_plan
from dsmt.server.slicemanager.calls import TIMEOUT, UNREACHABLE, NodeRequest
from dsmt.transports.http import TreqTransport
from dsmt.transports.psepr_soap import PsEPRTransport
from tests.server.deployment.test_engine import simple_descriptor
from tests.support.psepr import PASSWORD, RouterHarness, connect

SLEEPER = simple_descriptor(["-c", "import time; time.sleep(60)"])


# ------------------------------------------------------------------ the request contract (pure)

@pytest.mark.parametrize("operation, kwargs, words", [
    ("Reboot", {}, "unknown deployment engine operation"),
    ("Deploy", {"descriptor": SLEEPER}, "takes descriptor, parameters"),
    ("Deploy", {"descriptor": "<text/>", "parameters": {}}, "descriptor is bytes"),
    ("Deploy", {"descriptor": b"\xff\xfe", "parameters": {}}, "not UTF-8"),
    ("Stage", {"descriptor": SLEEPER, "parameters": {"port": 80}}, "mapping of names to text"),
    ("Start", {"component": None}, "needs a component"),
    ("Stop", {"component": 3}, "named by text"),
    ("Command", {"command": b"START"}, "a command is text"),
    ("Status", {"component": "x"}, "takes nothing"),
])
def test_requests_outside_the_contract_are_refused_before_sending(operation, kwargs, words):
    with pytest.raises(ValueError) as caught:
        remote.check_engine_request(operation, kwargs)
    assert words in str(caught.value)


def test_requests_become_the_wsdl_arguments():
    assert remote.engine_arguments("Deploy", {"descriptor": "é".encode(), "parameters": {"b": "2", "a": "1"}}) == \
        {"descriptor": "é", "parameter": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]}
    assert remote.engine_arguments("Uninstall", {"component": None}) == {}
    assert remote.engine_arguments("Uninstall", {"component": "web"}) == {"component": "web"}
    assert remote.engine_arguments("Command", {"command": "STOP,*,XYZ,web"}) == {"command": "STOP,*,XYZ,web"}
    remote.check_engine_request("Uninstall", {"component": None})    # every component: allowed


def test_the_psepr_contract_names_the_slice_service():
    contract = remote.engine_contract("xyz1")
    assert contract.psepr_address(None) == "psepr:/org/dsmt/ns/soap/deployment.xyz1/"
    assert contract.psepr_address("a.test") == "psepr:/org/dsmt/ns/soap/deployment.xyz1/?instance=a.test"
    with pytest.raises(Exception):
        remote.engine_contract("Bad Slice")
    with pytest.raises(ValueError):
        remote.engine_contract().psepr_address("a.test")


def test_a_reply_that_is_not_the_operations_is_an_error_outcome():
    outcome = remote.engine_contract("xyz1").outcome("Deploy", object(), "a.test")
    assert outcome.code == "error" and "a.test answered Deploy" in outcome.reason


# ------------------------------------------------------------------ real engines

class Engines(unittest.TestCase):
    """A router where anyone may log in (engines log in as ``<slice>_mgr``) and engines made by
    ``daemon.makeService`` as ``twistd dsmt-engine`` makes them."""

    @defer.inlineCallbacks
    def setUp(self):
        self.router = RouterHarness()
        yield self.router.start()
        self.router.core.accounts = None
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.password_file = os.path.join(self.base, "pw")
        with open(self.password_file, "w") as handle:
            handle.write(PASSWORD + "\n")
        self.hosts = {}
        self.closing = []

    @defer.inlineCallbacks
    def tearDown(self):
        for close in reversed(self.closing):
            yield defer.maybeDeferred(close)
        for host in self.hosts.values():
            for name in list(host.engine.supervisor.procs):
                yield host.engine.supervisor.stop(name)
            yield host.stopService()
        yield self.router.stop()

    @defer.inlineCallbacks
    def engine(self, slice_name: str, host: str):
        home = os.path.join(self.base, slice_name, host)
        os.makedirs(home)
        options = daemon.Options()
        options.parseOptions(["--allow-unsigned", "--http", "tcp:0:interface=127.0.0.1", "--router", self.router.url,
                              "--password-file", self.password_file, "--slice", slice_name, "--host", host,
                              "--home", home, "--state", os.path.join(self.base, slice_name, f"{host}.sqlite")])
        service_host = daemon.makeService(options)
        service_host.startService()
        self.hosts[(slice_name, host)] = service_host
        yield service_host.daemon.started
        yield service_host.hosted[0].endpoint.start()
        yield service_host.hosted[0].connection.flush()
        (port,) = yield service_host.when_listening()
        service_host.url = f"http://127.0.0.1:{port}/deployment"
        return service_host

    @defer.inlineCallbacks
    def psepr_transport(self, user: str = "planner") -> PsEPRTransport:
        caller = yield connect(self.router.url, user, instance="planner")
        transport = PsEPRTransport(caller, timeout=10)
        yield transport.start()
        self.closing += [caller.close, transport.close]
        return transport


class EnginesOverTheNetwork(Engines):

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield defer.gatherResults([self.engine("xyz1", "a.test"), self.engine("xyz1", "b.test"),
                                   self.engine("xyz2", "c.test")])
        self.transport = yield self.psepr_transport()
        self.calls = remote.PsEPREngineCalls(self.transport, "xyz1")

    def requests(self, kwargs, nodes=("a.test", "b.test")):
        return [NodeRequest(node, "", kwargs) for node in nodes]

    @defer.inlineCallbacks
    def test_one_multicast_deploys_on_every_engine_of_the_slice_and_no_other(self):
        seen = []
        outcomes = yield self.calls.run("Deploy", self.requests({"descriptor": SLEEPER, "parameters": {}}),
                                        parallelism=2, timeout=20, on_result=lambda node, o: seen.append(node))
        assert sorted(seen) == ["a.test", "b.test"]
        for node, report in outcomes.items():
            assert isinstance(report, Report) and report.ok, (node, report)
            assert (report.application, report.states) == ("Tiny", {"app": "running"})
        other = self.hosts[("xyz2", "c.test")]
        assert other.hosted[0].endpoint.stats["received"] == 0 and other.engine.descriptor is None
        for host in ("a.test", "b.test"):
            assert self.hosts[("xyz1", host)].hosted[0].endpoint.stats["received"] == 1     # one event each
        # different arguments per node: one call each, by instance
        outcomes = yield self.calls.run("Command", [NodeRequest("a.test", "", {"command": "STOP,a.test,Tiny,app"}),
                                                    NodeRequest("b.test", "", {"command": "STOP,*,Tiny,app"})],
                                        parallelism=2, timeout=20)
        assert {n: (o.outcome, o.ok, o.report.states["app"]) for n, o in outcomes.items()} == \
            {"a.test": ("ran", True, "terminated"), "b.test": ("ran", True, "terminated")}
        status = yield self.calls.run("Status", self.requests({}), parallelism=2, timeout=20)
        assert {n: (s.host, s.slice, s.application, s.components) for n, s in status.items()} == \
            {n: (n, "xyz1", "Tiny", {"app": "terminated"}) for n in ("a.test", "b.test")}

    @defer.inlineCallbacks
    def test_refusals_keep_their_fault_codes_and_silent_nodes_time_out(self):
        outcomes = yield self.calls.run("Deploy", self.requests({"descriptor": b"<deployment/>", "parameters": {}}),
                                        parallelism=2, timeout=20)
        assert {o.code for o in outcomes.values()} == {"InvalidDescriptor"}
        assert all(o.reason.startswith("schema: ") for o in outcomes.values())
        outcomes = yield self.calls.run("Start", self.requests({"component": "app"}), parallelism=2, timeout=20)
        assert {o.code for o in outcomes.values()} == {"NoDeployment"}
        outcomes = yield self.calls.run("Command", self.requests({"command": "REBOOT,*,X"}), parallelism=2,
                                        timeout=20)
        assert {o.code for o in outcomes.values()} == {"InvalidCommand.unknown-verb"}
        # a host without an engine of this slice (c.test serves xyz2) does not answer, alone or in a multicast
        outcomes = yield self.calls.run("Status", self.requests({}, ("a.test", "c.test")), parallelism=2, timeout=0.5)
        assert outcomes["a.test"].host == "a.test" and outcomes["c.test"].code == TIMEOUT
        outcomes = yield self.calls.run("Status", self.requests({}, ("c.test",)), parallelism=1, timeout=0.5)
        assert outcomes["c.test"].code == TIMEOUT
        with pytest.raises(ValueError):
            self.calls.run("Status", self.requests({}, ("a.test", "a.test")), parallelism=1, timeout=1)

    @defer.inlineCallbacks
    def test_over_http_the_same_values(self):
        treq = TreqTransport()
        self.closing.append(lambda: defer.ensureDeferred(treq.aclose()))
        calls = remote.HttpEngineCalls(treq)
        requests = [NodeRequest(h, self.hosts[("xyz1", h)].url, {}) for h in ("a.test", "b.test")]
        requests += [NodeRequest("dead.test", "http://127.0.0.1:1/deployment", {}),
                     NodeRequest("nowhere.test", "", {})]
        outcomes = yield calls.run("Status", requests, parallelism=4, timeout=10)
        assert (outcomes["a.test"].host, outcomes["b.test"].host) == ("a.test", "b.test")
        assert outcomes["dead.test"].code == UNREACHABLE and outcomes["nowhere.test"].code == UNREACHABLE
        outcomes = yield calls.run("Stage", [NodeRequest("a.test", requests[0].endpoint,
                                                         {"descriptor": SLEEPER, "parameters": {}})],
                                   parallelism=1, timeout=10)
        assert outcomes["a.test"] == remote.StagedApplication("Tiny", "1")

    @defer.inlineCallbacks
    def test_a_plan_runs_through_the_psepr_adapter(self):
        plan = parse_plan(b"""<plan xmlns="http://dsmt.org/ns/deployment/plan" name="roll">
          <descriptor name="tiny" href="tiny.xml"/>
          <nodes name="all" all="true"/>
          <steps><sequence>
            <step name="install" nodes="all" batch="1"><deploy descriptor="tiny"/></step>
            <step name="halt" nodes="all"><stop component="app"/></step>
          </sequence></steps>
        </plan>""")
        kinds = []
        report = yield Orchestrator(self.calls, timeout=20, on_event=lambda e: kinds.append(e.kind)).run(
            plan, ["a.test", "b.test"], {"tiny": SLEEPER})
        assert report.complete, report.summary()
        assert kinds.count("batch") == 3 and kinds.count("node") == 4
        assert {h: self.hosts[("xyz1", h)].engine.status() for h in ("a.test", "b.test")} == \
            dict.fromkeys(("a.test", "b.test"), {"app": "terminated"})

"""``twistd dsmt-slicemanager``: options, and the container manager played live on a real PsEPR router.

The daemon (``makeService`` from parsed options, unsigned, HTTP port 0) drives a real agent and four real
node managers in this process; a listener on the router sees reference 003's events in order, and a
``node-exclude`` sent there deselects a node and selects a replacement.
"""
from __future__ import annotations

import os

import pytest
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage
from twisted.trial import unittest

from dsmt.server.slicemanager import daemon
from dsmt.server.slicemanager.slicedir import LEASES, VMS, SliceDirectory
from dsmt.server.statusevents import container_mgr_channel, node_exclude, parse_pairs
from dsmt.transports.http import TreqTransport
from tests.server.agent.support import NOW
from tests.server.slicemanager.test_service import Dslice, spec, zeep_service
from tests.support.psepr import PASSWORD, RouterHarness, connect, listen

NODES = ("n1.test", "n2.test", "n3.test", "n4.test")


def parse(*argv) -> daemon.Options:
    options = daemon.Options()
    options.parseOptions(list(argv))
    return options


@pytest.mark.parametrize("argv, words", [
    (["--allow-unsigned", "--http", "tcp:0"], "--agent URL"),
    (["--allow-unsigned", "--http", "tcp:0", "--agent", "ftp://x/agent"], "http:// or https://"),
    (["--allow-unsigned", "--http", "tcp:0", "--transport", "psepr"], "needs --router"),
    (["--allow-unsigned", "--http", "tcp:0", "--transport", "carrier-pigeon", "--agent", "http://a/agent"],
     "http or psepr"),
    (["--allow-unsigned", "--http", "tcp:0", "--agent", "http://a/agent", "--parallelism", "0"], "1..1024"),
    (["--allow-unsigned", "--http", "tcp:0", "--agent", "http://a/agent", "-t", "-1"], "--timeout"),
    (["--http", "tcp:0", "--agent", "http://a/agent"], "--allow-unsigned"),
])
def test_bad_options_are_usage_errors(argv, words):
    with pytest.raises(usage.UsageError) as caught:
        parse(*argv)
    assert words in str(caught.value)


def test_options_become_the_call_options(tmp_path):
    options = parse("--allow-unsigned", "--http", "tcp:0", "--agent", "http://a:8090/agent", "--parallelism", "4",
                    "-t", "2.5", "--slices-dir", str(tmp_path))
    assert (options["call-options"].transport, options["call-options"].agent_url,
            options["call-options"].timeout) == ("http", "http://a:8090/agent", 2.5)
    assert options["parallelism"] == 4


class Live(unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.router = RouterHarness()
        yield self.router.start()
        self.router.core.accounts = None   # anyone may log in: the container managers log in as <slice>_mgr
        base = self.mktemp()
        os.makedirs(base)
        self.dslice = yield Dslice(base, NODES).start()
        password_file = os.path.join(base, "pw")
        with open(password_file, "w") as handle:
            handle.write(PASSWORD + "\n")
        self.home = os.path.join(base, "slicemanager")
        options = parse("--allow-unsigned", "--http", "tcp:0:interface=127.0.0.1", "--agent",
                        self.dslice.agent_url, "--router", self.router.url, "--psepr-service", "alice",
                        "--password-file", password_file, "--instance", "sm.test", "--slices-dir", self.home,
                        "-t", "5")
        self.host = daemon.makeService(options)
        self.host.manager.clock = lambda: NOW
        self.host.startService()
        (port,) = yield self.host.when_listening()
        yield self.host.hosted[0].endpoint.start()
        self.client_transport = TreqTransport()
        self.service = zeep_service(self.client_transport, f"http://127.0.0.1:{port}/slicemanager")
        self.listener = yield connect(self.router.url, "oceanstore_mgr", instance="watcher")

    @defer.inlineCallbacks
    def tearDown(self):
        self.listener.close()
        yield defer.ensureDeferred(self.client_transport.aclose())
        yield self.host.stopService()
        yield self.dslice.stop()
        yield self.router.stop()

    def call(self, operation, **kwargs):
        return defer.ensureDeferred(getattr(self.service, operation)(**kwargs))

    @defer.inlineCallbacks
    def settle(self):
        """Every event the daemon sent has reached the listener."""
        for connection in [self.host.containers.connection, *self.host.containers.command_connections.values()]:
            if connection.connected:
                yield connection.flush()
        yield self.listener.flush()

    @defer.inlineCallbacks
    def until(self, watched, done):
        """Waits for events until ``done(events)`` holds (the test's timeout bounds it)."""
        yield self.settle()
        while not done(watched.events):
            yield watched.wait(len(watched.events) + 1)

    @staticmethod
    def states(events) -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {}
        for event in events:
            if event.payload.field == "sliver-state":
                pairs = parse_pairs(event.payload.value)
                seen.setdefault(pairs["hostname"], []).append(pairs["value"])
        return seen

    @staticmethod
    def lists(events) -> list[dict[str, str]]:
        return [dict(part.split("/") for part in event.payload.value.split(",") if part)
                for event in events if event.payload.field == "node-list"]

    @defer.inlineCallbacks
    def test_container_events_follow_createslice_exclusion_and_delete(self):
        watched = yield listen(self.listener, container_mgr_channel("oceanstore"))
        created = yield self.call("CreateSlice", spec=spec("oceanstore", 3))
        assert created.ok, created
        chosen = [r.node for r in created.result]
        yield self.until(watched, lambda events: sum(self.states(events).get(n, []).count("installed")
                                                     for n in chosen) == 3)
        events = list(watched.events)
        assert all(e.to_service == "oceanstore_mgr" and e.from_instance == "sm.test" for e in events)
        assert self.states(events) == {node: ["selected", "installing", "installed"] for node in chosen}
        lists = self.lists(events)
        assert lists[0] == {chosen[0]: "selected"}
        assert {chosen[0]: "selected", chosen[1]: "selected", chosen[2]: "selected"} in lists
        assert lists.index(dict.fromkeys(chosen, "selected")) < lists.index(
            {**dict.fromkeys(chosen, "selected"), chosen[0]: "creating"})
        assert lists[-1] == dict.fromkeys(chosen, "running")
        assert self.host.manage.metrics()["NodesRunning"] == 3

        # node-exclude: the node's sliver goes, a fourth node replaces it (keep_size 3)
        victim = chosen[1]
        (spare,) = set(NODES) - set(chosen)
        watched.events.clear()
        commander = yield connect(self.router.url, "oceanstore_mgr", instance="operator")
        commander.send(node_exclude("oceanstore", victim, sender="operator"))
        yield commander.flush()
        while self.host.containers.last_command is None:
            yield self.settle()
        yield self.host.containers.last_command
        yield self.until(watched, lambda events: "installed" in self.states(events).get(spare, []))
        commander.close()
        assert self.states(watched.events) == {victim: ["deselected"],
                                               spare: ["selected", "installing", "installed"]}
        assert self.lists(watched.events)[0] == {**dict.fromkeys(chosen, "running"), victim: "deselected"}
        assert self.lists(watched.events)[-1] == {chosen[0]: "running", chosen[2]: "running", spare: "running"}
        assert self.dslice.nodes[victim].list_slivers() == []
        assert [s.state for s in self.dslice.nodes[spare].list_slivers()] == ["running"]
        files = SliceDirectory(self.home).slice("oceanstore")
        assert sorted(files.nodes(VMS)) == sorted([chosen[0], chosen[2], spare]) and files.nodes(LEASES) == []
        listed = yield self.call("NodeList", slice="oceanstore")
        assert sorted(listed.value) == sorted([chosen[0], chosen[2], spare])

        # a forged or foreign command changes nothing
        watched.events.clear()
        self.host.containers.last_command = None
        commander = yield connect(self.router.url, "oceanstore_mgr", instance="operator")
        commander.send(node_exclude("oceanstore", "ghost.test", sender="operator"))   # not in the slice
        yield commander.flush()
        while self.host.containers.last_command is None:
            yield self.settle()
        yield self.host.containers.last_command
        commander.close()
        yield self.settle()
        assert self.states(watched.events) == {}

        deleted = yield self.call("DeleteSlice", slice="oceanstore")
        assert deleted.ok
        yield self.until(watched, lambda events: len(self.states(events)) == 3)
        assert {node: states[-1] for node, states in self.states(watched.events).items()} == \
            dict.fromkeys([chosen[0], chosen[2], spare], "deselected")
        assert "oceanstore" not in self.host.containers.containers       # retired: no lease, no timer
        assert self.host.containers.timers == {}

    @defer.inlineCallbacks
    def test_refresh_is_a_timer_at_next_refresh(self):
        created = yield self.call("CreateSlice", spec=spec("refreshed", 2))
        assert created.ok
        container = self.host.containers.containers["refreshed"]
        timer = self.host.containers.timers["refreshed"]
        assert timer.active() and timer.getTime() == pytest.approx(container.next_refresh())

    @defer.inlineCallbacks
    def test_a_timeout_is_reported_as_timeout_creating(self):
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")  # accepts, never answers
        self.addCleanup(silent.stopListening)
        self.dslice.registry.register("silent.test", 4, f"http://127.0.0.1:{silent.getHost().port}/nodemanager")
        self.host.manager.timeout = 0.2
        self.listener.close()
        self.listener = yield connect(self.router.url, "slow_mgr", instance="watcher")
        watched = yield listen(self.listener, container_mgr_channel("slow"))
        report = yield self.call("CreateSlice", spec=spec("slow", 5).replace(
            "</slice>", "<ips>n1.test n2.test n3.test n4.test silent.test</ips></slice>"))
        assert [r.code for r in report.result if not r.ok] == ["timeout"]
        yield self.until(watched, lambda events: sum(self.states(events).get(n, []).count("installed")
                                                     for n in NODES) == 4 and "silent.test" in self.states(events))
        assert self.states(watched.events)["silent.test"] == ["selected", "failed"]
        assert self.lists(watched.events)[-1]["silent.test"] == "timeout-creating"

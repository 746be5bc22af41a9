"""``dsmtc``: the table folded from reference 000's events (pure), hostile events, arguments and exit statuses,
and the commands against real engines, a real router and PLDB in this process."""
from __future__ import annotations

import importlib.util
import io
import os

import pytest
from twisted.internet import defer

from dsmt.client import dsmtc
from dsmt.server.pldb.daemon import PldbService
from dsmt.server.pldb.store import PldbStore
from dsmt.server.slicemanager.calls import LeaseInfo
from dsmt.server.slicemanager.slicedir import SliceDirectory
from dsmt.server.statusevents import DEPLOYMENT_AGENT, SLIVER_BOOTSTRAP, SLIVER_MGR, deployment_status
from dsmt.transports.psepr.client import PsEPRConnection
from dsmt.transports.psepr.event import Event
from dsmt.transports.psepr.pldbwire import PldbAttr
from tests.support.cli import Run
from tests.server.deployment.test_remote import SLEEPER, Engines
from tests.server.slicemanager.test_core import NODES, World, spec
from tests.support.psepr import PASSWORD, connect, listen

_EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "xyz1_status_events.py")
_spec = importlib.util.spec_from_file_location("xyz1_status_events", _EXAMPLE)
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)
HOSTS = reference.HOSTS


# ================================================================ the table (pure)

def test_the_reference_sequence_folds_into_every_node_running():
    events = reference.scenario()
    table = dsmtc.SliceTable("xyz1")
    changes = [change for change in map(table.apply, events) if change is not None]
    status_events = [e for e in events if e.payload.field == "deployment-status"]
    assert len(changes) == len(status_events) == 5 * 13 and table.ignored == 0   # the APPCONFIGs: not counted
    assert table.nodes == list(HOSTS)
    assert table.components == [SLIVER_MGR, SLIVER_BOOTSTRAP, DEPLOYMENT_AGENT]
    assert dsmtc.verdict(table) == "running"
    lines = dsmtc.render_table(table)
    assert lines[0].split() == ["node", "container", "engine", "XYZ"]
    assert lines[1] == "planetlab5.nbgisp.com        running    running  running"
    assert [line.split()[1:] for line in lines[1:]] == [["running"] * 3] * 5
    # the first node's story, in the reference's order, one line per change
    first = [dsmtc.change_line(c) for c in changes if c.node == HOSTS[0]]
    assert first[:2] == ["planetlab5.nbgisp.com org.dsmt.component.sliver-mgr org.dsmt.component.container: "
                         "- -> requested",
                         "planetlab5.nbgisp.com org.dsmt.component.sliver-mgr org.dsmt.component.container: "
                         "requested -> instantiated"]
    assert first[-1] == "planetlab5.nbgisp.com org.dsmt.component.deployment-agent XYZ: initialized -> running"
    assert dsmtc.recap(table)[-1] == "XYZ on 5 node(s) of slice xyz1: 5 running"


def test_midway_the_table_shows_who_is_where_and_the_verdict_waits():
    events = reference.scenario()
    table = dsmtc.fold("xyz1", events[:18], nodes=["PlanetLab-1.CN"])  # the requests, node 1 done
    assert table.nodes[0] == "planetlab-1.cn"                # the slice's nodes come first, normalised
    assert dsmtc.verdict(table) is None
    rows = {line.split()[0]: line.split()[1:] for line in dsmtc.render_table(table)[1:]}
    assert rows["planetlab5.nbgisp.com"] == ["running", "running", "running"]
    assert rows["planet-lab1.stanford.edu"] == ["requested", "-", "-"]
    recap = dsmtc.recap(table)
    assert "XYZ on 5 node(s) of slice xyz1: 4 unknown, 1 running" in recap
    assert "  planet-lab1.stanford.edu: container requested" in recap
    assert dsmtc.verdict(dsmtc.SliceTable("xyz1")) is None


def test_a_failed_node_settles_the_verdict_as_failed():
    events = reference.scenario()
    table = dsmtc.fold("xyz1", events[:-1] + [
        deployment_status("xyz1", HOSTS[-1], DEPLOYMENT_AGENT, "XYZ", "failed")])
    assert dsmtc.verdict(table) == "failed"
    assert f"  {HOSTS[-1]}: container running, engine running, XYZ failed" in dsmtc.recap(table)
    # a restart brings it back: the fold follows (failed -> running)
    change = table.apply(deployment_status("xyz1", HOSTS[-1], DEPLOYMENT_AGENT, "XYZ", "running"))
    assert (change.old, change.new) == ("failed", "running") and dsmtc.verdict(table) == "running"
    assert table.apply(deployment_status("xyz1", HOSTS[-1], DEPLOYMENT_AGENT, "XYZ", "running")) is None  # resend


def hostile_events():
    good = deployment_status("xyz1", "a.test", DEPLOYMENT_AGENT, "XYZ", "running")
    value = good.payload.value
    channel = good.channel

    def status(value, *, channel=channel, sender="a.test"):
        return Event.attribute(channel, "deployment-status", value, from_service="xyz1_mgr", from_instance=sender)
    return {
        "another slice": deployment_status("xyz2", "a.test", DEPLOYMENT_AGENT, "XYZ", "running"),
        "another slice in the value": status(value.replace("slice=xyz1", "slice=xyz2")),
        "wrong channel": status(value, channel="/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-mgr/status/"),
        "a host speaking for another": status(value, sender="b.test"),
        "unknown state": status(value.replace("status=running", "status=exploded")),
        "oversized": status(value + ",x=" + "y" * 5000),
        "extra pair": status(value + ",extra=1"),
        "missing pair": status(value.replace(",managed=XYZ", "")),
        "not pairs": status("<script>alert(1)</script>"),
        "repeated key": status(value + ",status=failed"),
        "bad host": status(value.replace("hostname=a.test", "hostname=-bad-"), sender=None),
        "component with a slash": status(value.replace(f"component={DEPLOYMENT_AGENT}", "component=../x")),
        "managed with spaces": status(value.replace("managed=XYZ", "managed=X Y")),
        "empty": status(""),
    }


@pytest.mark.parametrize("name", sorted(hostile_events()))
def test_hostile_events_are_ignored_and_counted(name):
    table = dsmtc.SliceTable("xyz1", ["a.test"])
    assert table.apply(hostile_events()[name]) is None
    assert (table.ignored, table.cells, table.nodes) == (1, {}, ["a.test"])


def test_floods_of_nodes_and_components_are_bounded(monkeypatch):
    monkeypatch.setattr(dsmtc, "MAX_ROWS", 3)
    table = dsmtc.SliceTable("xyz1")
    for n in range(5):
        table.apply(deployment_status("xyz1", f"n{n}.test", SLIVER_MGR, "org.dsmt.component.container", "requested"))
    for n in range(20):
        table.apply(deployment_status("xyz1", "n0.test", f"third.party-{n}", "thing", "running"))
    assert table.nodes == ["n0.test", "n1.test", "n2.test"]
    assert len(table.components) == dsmtc.MAX_COLUMNS and table.components[0] == SLIVER_MGR
    assert table.ignored == 2 + 20 - (dsmtc.MAX_COLUMNS - 1)


def test_pldb_attributes_fold_like_events():
    attrs = [PldbAttr(e.channel, e.payload.field, e.payload.value, 1.0, e.from_service, e.from_instance)
             for e in reference.scenario()]
    assert dsmtc.render_table(dsmtc.fold("xyz1", attrs)) == dsmtc.render_table(dsmtc.fold("xyz1",
                                                                                           reference.scenario()))


def test_the_display_redraws_in_place_on_a_terminal_and_prints_lines_elsewhere():
    events = [e for e in reference.scenario() if e.payload.field == "deployment-status"][:3]
    screen, log = io.StringIO(), io.StringIO()
    terminal, plain = dsmtc.Display(screen, tty=True), dsmtc.Display(log, tty=False)
    table = dsmtc.SliceTable("xyz1")
    for event in events:
        change = table.apply(event)
        terminal.show(table, change)
        plain.show(table, change)
    drawings = screen.getvalue().split("\x1b[")
    assert [d[:3] for d in drawings] == ["nod", "2F", "Jno", "3F", "Jno"]   # up over the last drawing, erase, redraw
    assert drawings[-1].splitlines() == ["Jnode                      container"] + [
        f"{host:<24}  requested" for host in HOSTS[:3]]
    assert log.getvalue().splitlines() == [dsmtc.change_line(c) for c in
                                           [dsmtc.SliceTable("xyz1").apply(e) for e in events]]
    plain.finish(table)
    assert log.getvalue().splitlines()[3:] == dsmtc.recap(table)
    assert dsmtc.recap(table)[4:] == ["the application on 3 node(s) of slice xyz1: 3 unknown"] + [
        f"  {host}: container requested" for host in HOSTS[:3]]
    terminal.finish(table)
    assert screen.getvalue().endswith("\x1b[4F\x1b[J" + "\n".join(dsmtc.recap(table)) + "\n")


# ================================================================ arguments and exit statuses (no network)

def run_main(*argv, **kwargs) -> Run:
    out, err = io.StringIO(), io.StringIO()
    status = dsmtc.main(list(argv), stdout=out, stderr=err, **kwargs)
    return Run(status, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("argv, words", [
    ([], "required"),
    (["frobnicate"], "invalid choice"),
    (["--router", "psepr://r:1", "deploy", "xyz1"], "required"),
    (["deploy", "xyz1", "d.xml"], "--router"),
    (["--router", "psepr://r:1", "deploy", "Bad Slice", "d.xml"], "slice"),
    (["--router", "psepr://r:1", "deploy", "xyz1", "d.xml", "--param", "novalue"], "name=value"),
    (["--router", "psepr://r:1", "deploy", "xyz1", "d.xml", "--param", "a=1", "--param", "a=2"], "given twice"),
    (["--cert", "c.pem", "status", "xyz1"], "--cert and --key"),
    (["-t", "0", "status", "xyz1"], "between"),
    (["-t", "nan", "status", "xyz1"], "between"),
    (["-p", "0", "status", "xyz1"], "between"),
    (["--router", "r", "watch", "xyz1", "--until", "done"], "invalid choice"),
    (["--router", "r", "command", "xyz1", "REBOOT", "*", "XYZ"], "unknown-verb"),
    (["--router", "r", "command", "xyz1", "APPCONFIG", "*", "XYZ"], "malformed"),
    (["--router", "r", "command", "xyz1", "START", "bad_host", "XYZ", "web"], "bad-host"),
    (["--router", "r", "command", "xyz1", "START", "a b", "XYZ", "web"], "malformed"),
    (["--router", "r", "command", "xyz1", "START,*,XYZ,Web"], "bad-name"),
    (["--router", "r", "command", "xyz1", "START"], "VERB HOST APP"),
])
def test_usage_errors_exit_2(argv, words):
    result = run_main(*argv)
    assert result.status == dsmtc.EXIT_USAGE and words in result.err, result.err
    assert result.out == "" and "Traceback" not in result.err


def test_command_values_follow_the_engines_grammar():
    assert dsmtc.command_value(["APPCONFIG", "PlanetLab5.NBGISP.com", "XYZ", "XYZ-proc"]) == \
        "APPCONFIG,planetlab5.nbgisp.com,XYZ,XYZ-proc"
    assert dsmtc.command_value(["UNINSTALL", "*", "XYZ"]) == "UNINSTALL,*,XYZ"
    assert dsmtc.command_value(["STOP,*,XYZ,xyz-web"]) == "STOP,*,XYZ,xyz-web"


def test_create_is_svms_createslice_with_the_same_lines(tmp_path):
    world = World(tmp_path)
    (tmp_path / "oceanstore.xml").write_bytes(spec())
    made = []

    def make_calls(args):
        made.append(args)
        return world.agent, world.calls, lambda: defer.succeed(None)
    result = run_main("--dir", str(tmp_path / "home"), "--agent", "http://agent.example/agent", "-t", "15",
                      "create", str(tmp_path / "oceanstore.xml"), make_calls=make_calls)
    assert result.status == 0 and sorted(result.lines) == [f"Success on {n}" for n in NODES]
    assert result.err == "createslice oceanstore: 3 succeeded, 0 failed\n"
    assert (made[0].command, made[0].timeout, made[0].agent) == ("createslice", 15.0, "http://agent.example/agent")
    result = run_main("--dir", str(tmp_path / "home"), "create", str(tmp_path / "oceanstore.xml"))
    assert result.status == 2 and "needs the agent" in result.err


def make_slice(home, nodes):
    files = SliceDirectory(str(home)).slice("xyz1").create()
    for node in nodes:
        files.put_lease("vms", LeaseInfo(f"lease-{node}", f"ticket-{node}", "xyz1", node, 1, 0, 2**31, 3600))


PLAN = b"""<plan xmlns="http://dsmt.org/ns/deployment/plan" name="roll">
  <descriptor name="tiny" href="tiny.xml"/>
  <nodes name="all" all="true"/>
  <steps><step name="install" nodes="all" batch="1"><deploy descriptor="tiny"/></step></steps>
</plan>"""


def test_plan_dry_run_needs_no_router(tmp_path):
    make_slice(tmp_path / "home", ["a.test", "b.test"])
    (tmp_path / "plan.xml").write_bytes(PLAN)
    (tmp_path / "tiny.xml").write_bytes(SLEEPER)
    result = run_main("--dir", str(tmp_path / "home"), "plan", "xyz1", str(tmp_path / "plan.xml"), "--dry-run")
    assert result.status == 0 and result.lines == [
        "plan roll: 1 step(s) on a slice of 2 node(s)",
        "step install: Deploy tiny on all (2 node(s)), batch 1, max-failures 0%",
        "  batch 1/2: a.test", "  batch 2/2: b.test"]
    (tmp_path / "plan.xml").write_bytes(PLAN.replace(b"tiny.xml", b"missing.xml"))
    result = run_main("--dir", str(tmp_path / "home"), "plan", "xyz1", str(tmp_path / "plan.xml"), "--dry-run")
    assert result.status == 3 and result.err.startswith("dsmtc: error: invalid plan (io)")


@pytest.mark.parametrize("setup, words", [
    ("no slice", "no slice xyz1"),
    ("no sliver", "has no sliver"),
    ("missing descriptor", "d.xml"),
    ("invalid descriptor", "invalid descriptor (schema)"),
    ("unsafe descriptor", "invalid descriptor (unsafe-xml)"),
])
def test_failures_before_the_nodes_exit_3(tmp_path, setup, words):
    home = tmp_path / "home"
    if setup != "no slice":
        make_slice(home, [] if setup == "no sliver" else ["a.test"])
    if setup == "invalid descriptor":
        (tmp_path / "d.xml").write_bytes(b"<deployment xmlns='http://dsmt.org/ns/deployment'/>")
    if setup == "unsafe descriptor":
        (tmp_path / "d.xml").write_bytes(b"<!DOCTYPE x [<!ENTITY a 'b'>]><x>&a;</x>")
    result = run_main("--router", "psepr://127.0.0.1:1", "--dir", str(home), "deploy", "xyz1",
                      str(tmp_path / "d.xml"))
    assert result.status == 3 and result.err.startswith("dsmtc: error: ") and words in result.err, result.err
    assert "Traceback" not in result.err


# ================================================================ against real engines, router and PLDB

class _Stream(io.StringIO):
    """Standard error that fires ``seen`` when a line containing ``text`` is written."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.seen = text, defer.Deferred()

    def write(self, data):
        written = super().write(data)
        if self.text in self.getvalue() and not self.seen.called:
            self.seen.callback(None)
        return written


class Live(Engines):

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        pldb = PsEPRConnection.from_urls(self.router.url, service="xyz1_mgr", password=PASSWORD, instance="pldb")
        self.pldb = PldbService(pldb, PldbStore(os.path.join(self.base, "pldb.sqlite")), ["/org/dsmt/ns/deployment/"])
        self.pldb.startService()
        yield defer.gatherResults([lease.ready for lease in self.pldb.leases])
        yield pldb.flush()
        self.closing.append(self.pldb.stopService)
        yield defer.gatherResults([self.engine("xyz1", "a.test"), self.engine("xyz1", "b.test")])
        self.home = os.path.join(self.base, "home")
        make_slice(self.home, ["a.test", "b.test"])
        self.descriptor = os.path.join(self.base, "tiny.xml")
        with open(self.descriptor, "wb") as handle:
            handle.write(SLEEPER)

    def dsmtc(self, *argv, err=None, **kwargs):
        out, err = io.StringIO(), err or io.StringIO()
        running = dsmtc.execute(["--router", self.router.url, "--password-file", self.password_file, "--dir",
                                 self.home, *argv], stdout=out, stderr=err, tty=False, **kwargs)
        return running.addCallback(lambda status: Run(status, out.getvalue(), err.getvalue()))

    @defer.inlineCallbacks
    def test_deploy_watch_status_and_command(self):
        err = _Stream("dsmtc: watching")
        watching = self.dsmtc("watch", "xyz1", "--until", "running", "--timeout", "30", err=err)
        yield err.seen
        deployed = yield self.dsmtc("-t", "20", "deploy", "xyz1", self.descriptor)
        assert deployed.status == 0, deployed.err
        assert sorted(deployed.lines) == ["Success on a.test", "Success on b.test"]
        assert deployed.err == "deploy Tiny on xyz1: 2 succeeded, 0 failed\n"
        watched = yield watching
        assert watched.status == 0, watched.out + watched.err
        assert "a.test org.dsmt.component.deployment-agent Tiny: initialized -> running" in watched.lines
        assert "Tiny on 2 node(s) of slice xyz1: 2 running" in watched.lines
        # PLDB kept the last values: the same table
        status = yield self.dsmtc("status", "xyz1")
        assert status.status == 0, status.err
        assert [line.split() for line in status.lines] == [
            ["node", "engine", "Tiny"], ["a.test", "running", "running"], ["b.test", "running", "running"]]
        # a command on the channel: the engines stop the component
        listener = yield connect(self.router.url, "xyz1_mgr", instance="listener")
        self.closing.append(listener.close)
        events = yield listen(listener, "/org/dsmt/ns/deployment/xyz1/")
        sent = yield self.dsmtc("command", "xyz1", "STOP", "*", "Tiny", "app")
        assert (sent.status, sent.lines) == (0, ["Sent STOP,*,Tiny,app on /org/dsmt/ns/deployment/xyz1/"
                                                 "org.dsmt.component.deployment-agent/command/"])
        while sum("status=terminated" in (e.payload.value or "") for e in events.events) < 2:
            yield events.wait(len(events.events) + 1)
        assert {h: self.hosts[("xyz1", h)].engine.status() for h in ("a.test", "b.test")} == \
            dict.fromkeys(("a.test", "b.test"), {"app": "terminated"})

    @defer.inlineCallbacks
    def test_a_refused_deploy_is_an_error_line_per_node_and_exit_1(self):
        result = yield self.dsmtc("-t", "20", "deploy", "xyz1", self.descriptor, "--param", "colour=red")
        assert result.status == 1
        assert sorted(line.split(":")[0] for line in result.lines) == ["Error on a.test", "Error on b.test"]
        assert "parameter" in result.lines[0]
        assert result.err == "deploy Tiny on xyz1: 0 succeeded, 2 failed\n"

    @defer.inlineCallbacks
    def test_a_plan_reports_its_progress(self):
        with open(os.path.join(self.base, "plan.xml"), "wb") as handle:
            handle.write(PLAN)
        result = yield self.dsmtc("-t", "20", "plan", "xyz1", os.path.join(self.base, "plan.xml"))
        assert result.status == 0, result.out + result.err
        assert result.lines == ["step install: 2 node(s)", "step install batch 1: a.test",
                                "step install: Success on a.test", "step install batch 2: b.test",
                                "step install: Success on b.test"]
        assert result.err.splitlines()[-1] == "plan roll: complete"

    @defer.inlineCallbacks
    def test_watch_ends_on_timeout_or_interrupt_with_a_recap(self):
        result = yield self.dsmtc("watch", "xyz1", "--until", "running", "--timeout", "0.3")
        assert result.status == 1 and "(timeout)" in result.err
        assert "the application on 2 node(s) of slice xyz1: 2 unknown" in result.lines
        # the table started from PLDB's last values: the engines are known to run, the application is not
        assert result.lines[-2:] == ["  a.test: engine running", "  b.test: engine running"]
        stop = defer.Deferred()
        err = _Stream("dsmtc: watching")
        watching = self.dsmtc("watch", "xyz1", err=err, interrupted=stop)
        yield err.seen
        stop.callback(None)
        result = yield watching
        assert result.status == 0 and result.lines[0].split() == ["node", "engine"]   # PLDB knew the engines

    @defer.inlineCallbacks
    def test_an_unreachable_router_or_silent_pldb_exit_3(self):
        out, err = io.StringIO(), io.StringIO()
        status = yield dsmtc.execute(["--router", "psepr://127.0.0.1:1", "--dir", self.home, "status", "xyz1"],
                                     stdout=out, stderr=err)
        assert status == 3 and err.getvalue().startswith("dsmtc: error: cannot reach the PsEPR router")
        self.pldb.stopService()
        result = yield self.dsmtc("-t", "0.3", "status", "xyz1")
        assert result.status == 3 and "no answer from PLDB" in result.err

"""``twistd dsmt-engine``: options, and the daemon on a real PsEPR router — its own bootstrap events, an APPCONFIG
event deploying XYZ with reference 000's events in order, SOAP over PsEPR multicast to one slice's engines, and
manageability."""
from __future__ import annotations

import os

import pytest
from twisted.internet import defer
from twisted.python import usage
from twisted.trial import unittest
from twisted.web import server, static
from zeep.proxy import AsyncServiceProxy

from dsmt.server.deployment import daemon
from dsmt.server.deployment.service import psepr_address
from dsmt.server.manage.wsdm import OperationalStatus
from dsmt.server.statusevents import parse_pairs
from dsmt.transports.psepr.event import ATTRIBUTE_NS, Event
from dsmt.transports.psepr_soap import PsEPRTransport, multicast_call
from dsmt.transports.soap import HTTP_TRANSPORT, PSEPR_TRANSPORT
from dsmt.transports.soap.zeepsupport import make_client
from dsmt.transports.http import TreqTransport
from tests.server.deployment.test_service import xyz_text
from tests.support.contracts import wsdl_file
from tests.support.psepr import PASSWORD, RouterHarness, connect, listen

HOST = "planetlab5.nbgisp.com"
COMMAND_CHANNEL = "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.deployment-agent/command/"
BOOTSTRAP = [("org.dsmt.component.sliver-bootstrap", "org.dsmt.component.deployment-agent", s)
             for s in ("requested", "instantiated", "initialized", "installed", "running")]
APPLICATION = [("org.dsmt.component.deployment-agent", "XYZ", s)
               for s in ("requested", "instantiated", "initialized", "running")]


def parse(*argv) -> daemon.Options:
    options = daemon.Options()
    options.parseOptions(list(argv))
    return options


@pytest.fixture
def home(tmp_path):
    (tmp_path / "home").mkdir()
    return str(tmp_path / "home")


@pytest.mark.parametrize("extra, words", [
    (["--host", "h.test", "--home", "HOME", "--state", "s.db"], "give --slice"),
    (["--slice", "xyz1", "--home", "HOME", "--state", "s.db"], "give --host"),
    (["--slice", "Bad Slice", "--host", "h.test", "--home", "HOME", "--state", "s.db"], "slice name"),
    (["--slice", "root", "--host", "h.test", "--home", "HOME", "--state", "s.db"], "reserved"),
    (["--slice", "xyz1", "--host", "not a host", "--home", "HOME", "--state", "s.db"], "node address"),
    (["--slice", "xyz1", "--host", "h.test", "--home", "/no/such/dir", "--state", "s.db"], "not a directory"),
    (["--slice", "xyz1", "--host", "h.test", "--home", "HOME", "--state", "s.db", "--resend-interval", "0"],
     "--resend-interval"),
    (["--slice", "xyz1", "--host", "h.test", "--home", "HOME", "--state", "s.db", "--resend-interval", "91"],
     "expiry"),
    (["--slice", "xyz1", "--host", "h.test", "--home", "HOME", "--state", "s.db", "--package-root", "/no/such"],
     "--package-root"),
])
def test_bad_options_are_usage_errors(home, extra, words):
    argv = ["--allow-unsigned", "--http", "tcp:0"] + [home if a == "HOME" else a for a in extra]
    with pytest.raises(usage.UsageError) as caught:
        parse(*argv)
    assert words in str(caught.value)


def test_the_engine_logs_in_as_its_slice_account_with_its_host_as_instance(home, tmp_path):
    password = tmp_path / "pw"
    password.write_text("secret\n")
    options = parse("--allow-unsigned", "--router", "psepr://127.0.0.1:1", "--password-file", str(password),
                    "--slice", "xyz1", "--host", "PlanetLab5.NBGISP.com", "--home", home, "--state",
                    str(tmp_path / "s.db"), "--package-root", home)
    assert (options["host"], options["psepr-service"], options["instance"]) == (HOST, "xyz1_mgr", HOST)
    assert options["descriptors"] == str(tmp_path / "s.db") + ".staged"
    assert options["package-root"] == [os.path.abspath(home)]
    connection = options.new_connection()
    assert (connection.service, connection.instance) == ("xyz1_mgr", HOST)


def status_triples(events):
    seen = []
    for event in events:
        if event.payload.field == "status":
            seen.append(("APPCONFIG" if event.payload.value.startswith("APPCONFIG,") else event.payload.value, None,
                         None))
        elif event.payload.field == "deployment-status":
            pairs = parse_pairs(event.payload.value)
            seen.append((pairs["component"], pairs["managed"], pairs["status"]))
    return seen


class Live(unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.router = RouterHarness()
        yield self.router.start()
        self.router.core.accounts = None   # anyone may log in: the engines log in as <slice>_mgr
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.base, "packages"))
        self.password_file = os.path.join(self.base, "pw")
        with open(self.password_file, "w") as handle:
            handle.write(PASSWORD + "\n")
        site = server.Site(static.File(os.path.join(self.base, "packages")))
        site.noisy = False
        from twisted.internet import reactor
        self.package_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.hosts = []
        self.transports = []
        self.listener = yield connect(self.router.url, "xyz1_mgr", instance="watcher")
        self.watched = yield listen(self.listener, "/org/dsmt/ns/deployment/xyz1/")

    @defer.inlineCallbacks
    def tearDown(self):
        for transport in self.transports:
            transport.close() if isinstance(transport, PsEPRTransport) else (
                yield defer.ensureDeferred(transport.aclose()))
        for host in self.hosts:
            for name in list(host.engine.supervisor.procs):
                yield host.engine.supervisor.stop(name)
            yield host.stopService()
        self.listener.close()
        yield self.package_port.stopListening()
        yield self.router.stop()

    def serve(self, name: str, data: bytes) -> str:
        with open(os.path.join(self.base, "packages", name), "wb") as out:
            out.write(data)
        return f"http://127.0.0.1:{self.package_port.getHost().port}/{name}"

    @defer.inlineCallbacks
    def engine(self, slice_name: str = "xyz1", host: str = HOST):
        home = os.path.join(self.base, slice_name, host)
        os.makedirs(home)
        options = parse("--allow-unsigned", "--http", "tcp:0:interface=127.0.0.1", "--router", self.router.url,
                        "--password-file", self.password_file, "--slice", slice_name, "--host", host, "--home", home,
                        "--state", os.path.join(self.base, slice_name, f"{host}.sqlite"))
        service_host = daemon.makeService(options)
        service_host.startService()
        self.hosts.append(service_host)
        yield service_host.daemon.started
        yield service_host.hosted[0].endpoint.start()
        (port,) = yield service_host.when_listening()
        service_host.url = f"http://127.0.0.1:{port}/deployment"
        with open(options["state"] + daemon.ENDPOINT_SUFFIX) as written:   # where a node manager finds it
            assert written.read() == service_host.url + "\n"
        return service_host

    @defer.inlineCallbacks
    def until(self, done):
        yield self.settle()
        while not done(self.watched.events):
            yield self.watched.wait(len(self.watched.events) + 1)

    @defer.inlineCallbacks
    def settle(self):
        for host in self.hosts:
            connection = host.hosted[0].connection
            if connection.connected:
                yield connection.flush()
        yield self.listener.flush()

    def http_service(self, url: str):
        transport = TreqTransport()
        self.transports.append(transport)
        client = make_client(wsdl_file("deployment"), transport, asynchronous=True)
        return AsyncServiceProxy(client, client.wsdl.bindings[self.binding(client, HTTP_TRANSPORT)], address=url)

    @staticmethod
    def binding(client, transport_uri: str):
        (name,) = [name for name, binding in client.wsdl.bindings.items()
                   if getattr(binding, "transport", None) == transport_uri]
        return name

    @defer.inlineCallbacks
    def test_an_appconfig_event_installs_xyz_with_the_reference_events_in_order(self):
        host = yield self.engine()
        yield self.until(lambda events: len(events) >= 5)
        assert status_triples(self.watched.events) == BOOTSTRAP
        # the planner's side: stage XYZ (the reference's XYZ has no install command), then APPCONFIG
        text, ports = xyz_text(self.serve)
        text = text[:text.index("    <install")] + text[text.index("</install>") + len("</install>\n"):]
        service = self.http_service(host.url)
        staged = yield defer.ensureDeferred(service.Stage(
            descriptor=text, parameter=[{"name": k, "value": v} for k, v in ports.items()]))
        assert staged.application == "XYZ"
        self.listener.send(Event.attribute(COMMAND_CHANNEL, "status", f"APPCONFIG,{HOST},XYZ,XYZ-proc",
                                           to_service="xyz1_mgr"))
        yield self.until(lambda events: status_triples(events)[-1:] == [APPLICATION[-1]])
        events = list(self.watched.events)
        assert status_triples(events) == BOOTSTRAP + [("APPCONFIG", None, None)] + APPLICATION
        for event in events:
            assert event.to_service == "xyz1_mgr" and event.payload_type == ATTRIBUTE_NS
            if event.payload.field == "deployment-status":
                pairs = parse_pairs(event.payload.value)
                assert list(pairs) == ["hostname", "component", "managed", "slice", "status"]
                assert (pairs["hostname"], pairs["slice"], event.from_instance) == (HOST, "xyz1", HOST)
                assert event.channel == f"/org/dsmt/ns/deployment/xyz1/{pairs['component']}/status/"
        assert host.engine.status() == {"xyz-echo": "running", "xyz-web": "running"}
        assert host.operations.counts["run"] == 1
        # hostile and foreign commands are refused or ignored, and change nothing
        for value in ("REBOOT,*,XYZ", f"APPCONFIG,{HOST},XYZ", "A" * 5000, "START,other.test,XYZ,xyz-web"):
            self.listener.send(Event.attribute(COMMAND_CHANNEL, "status", value, to_service="xyz1_mgr"))
        yield self.settle()
        yield self.settle()
        assert (host.operations.counts["refused"], host.operations.counts["ignored"]) == (3, 1)
        # a STOP command over the channel runs
        self.listener.send(Event.attribute(COMMAND_CHANNEL, "status", "STOP,*,XYZ,xyz-web", to_service="xyz1_mgr"))
        yield self.until(lambda events: status_triples(events)[-1][2] == "terminated")
        yield host.operations.last_command
        assert host.engine.status()["xyz-web"] == "terminated"
        # manageability: components, states, restarts, commands
        metrics = host.manage.metrics()
        assert (metrics["Application"], metrics["ApplicationState"], metrics["Components"]) == ("XYZ", "terminated", 2)
        assert (metrics["State.xyz-echo"], metrics["State.xyz-web"], metrics["Restarts.xyz-web"]) == \
            ("running", "terminated", 0)
        assert (metrics["ComponentsRunning"], metrics["ComponentsTerminated"], metrics["CommandsRun"]) == (1, 1, 2)
        assert host.manage.operational_status() == OperationalStatus.AVAILABLE

    @defer.inlineCallbacks
    def test_a_multicast_reaches_every_engine_of_the_slice_and_no_other(self):
        first = yield self.engine("xyz1", "a.test")
        second = yield self.engine("xyz1", "b.test")
        other = yield self.engine("xyz2", "c.test")
        caller = yield connect(self.router.url, "alice", instance="planner")
        self.addCleanup(caller.close)
        transport = PsEPRTransport(caller, timeout=5)
        yield transport.start()
        self.transports.append(transport)
        client = make_client(wsdl_file("deployment"), transport, asynchronous=True)
        proxy = AsyncServiceProxy(client, client.wsdl.bindings[self.binding(client, PSEPR_TRANSPORT)],
                                  address=psepr_address("xyz1"))
        results = yield multicast_call(transport, proxy, "Status", instances=["a.test", "b.test"], deadline=5)
        assert {name: (r.ok, r.value.host, r.value.slice) for name, r in results.items()} == \
            {"a.test": (True, "a.test", "xyz1"), "b.test": (True, "b.test", "xyz1")}
        # one engine alone, by instance; a command to every engine of the slice
        single = AsyncServiceProxy(client, client.wsdl.bindings[self.binding(client, PSEPR_TRANSPORT)],
                                   address=psepr_address("xyz1", "b.test"))
        status = yield defer.ensureDeferred(single.Status())
        assert status.host == "b.test" and status.application is None
        results = yield multicast_call(transport, proxy, "Command", ("UNINSTALL,a.test,XYZ",),
                                       instances=["a.test", "b.test"], deadline=5)
        assert results["a.test"].outcome == "fault" and "WrongApplication" in results["a.test"].fault.code
        assert results["b.test"].ok and results["b.test"].value.outcome == "ignored"
        yield self.settle()
        assert other.hosted[0].endpoint.stats["received"] == 0
        assert (first.hosted[0].endpoint.stats["received"], second.hosted[0].endpoint.stats["received"]) == (2, 3)

    @defer.inlineCallbacks
    def test_a_restarted_daemon_recovers_and_reports_its_bootstrap_again(self):
        host = yield self.engine()
        service = self.http_service(host.url)
        from tests.server.deployment.test_engine import simple_descriptor
        descriptor = simple_descriptor(["-c", "import time; time.sleep(60)"]).decode()
        report = yield defer.ensureDeferred(service.Deploy(descriptor=descriptor, parameter=[]))
        assert report.ok
        yield self.settle()
        pid = host.engine.supervisor.pid("app")
        yield host.stopService()            # the processes keep running
        self.hosts.remove(host)
        os.kill(pid, 0)
        count = len(self.watched.events)
        options = parse("--allow-unsigned", "--http", "tcp:0:interface=127.0.0.1", "--router", self.router.url,
                        "--password-file", self.password_file, "--slice", "xyz1", "--host", HOST, "--home",
                        host.engine.home, "--state", os.path.join(self.base, "xyz1", f"{HOST}.sqlite"))
        again = daemon.makeService(options)
        again.startService()
        self.hosts.append(again)
        yield again.daemon.started
        assert again.engine.status() == {"app": "running"} and again.engine.supervisor.pid("app") == pid
        yield self.until(lambda events: status_triples(events[count:])[-1:] == [BOOTSTRAP[-1]])
        assert status_triples(self.watched.events[count:]) == [
            BOOTSTRAP[0], BOOTSTRAP[1], ("org.dsmt.component.deployment-agent", "Tiny", "running"), *BOOTSTRAP[2:]]

"""The deployment engine over SOAP/HTTP: zeep from the committed wsdl/deployment.wsdl, deploying the XYZ fixture
with packages from a local HTTP server and real processes; commands, faults, hostile input, the served WSDL."""
from __future__ import annotations

import os
import sys

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web import resource, server, static

from dsmt.server.deployment.engine import Engine
from dsmt.server.deployment.fetch import Fetcher
from dsmt.server.deployment.service import (
    NAME, TNS, Operations, StagedDescriptors, deployment_service, psepr_address, psepr_service_for,
)
from dsmt.server.deployment.store import Store
from dsmt.server.hosting import ServiceHost
from dsmt.transports.http import TreqTransport
from dsmt.transports.soap import HTTP_TRANSPORT
from dsmt.transports.soap.zeepsupport import bind, make_client
from tests.server.deployment.test_engine import (
    ECHO, FIXTURE, WEB, app_events, free_port, sha, simple_descriptor, tar_bytes, zip_bytes,
)
from tests.support.contracts import post_soap11, soap11_envelope, ZeepCalls, assert_served_wsdl_is_committed, wsdl_file
from tests.transports.soap.service import FaultView

HOST = "planetlab5.nbgisp.com"
LOCAL = "tcp:0:interface=127.0.0.1"


class Held(resource.Resource):
    """A package whose response waits until the test releases it (a deployment held in progress)."""

    isLeaf = True

    def __init__(self, data: bytes):
        super().__init__()
        self.data, self.requests, self.arrived = data, [], defer.Deferred()

    def render_GET(self, request):
        self.requests.append(request)
        if not self.arrived.called:
            self.arrived.callback(None)
        return server.NOT_DONE_YET

    def release(self):
        for request in self.requests:
            request.write(self.data)
            request.finish()


def xyz_text(serve) -> tuple[str, dict]:
    """The fixture with its packages served by ``serve(name, data) -> url`` and free ports."""
    echo, web = tar_bytes({"echo.py": ECHO}), zip_bytes({"xyz_web.py": WEB})
    text = open(FIXTURE, encoding="utf-8").read()
    text = text.replace("https://dsmt.example.org/packages/xyz-echo-1.2.0.tar.gz", serve("xyz-echo-1.2.0.tgz", echo))
    text = text.replace("https://dsmt.example.org/packages/xyz-web-1.2.0.zip", serve("xyz-web.zip", web))
    text = text.replace("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", sha(echo))
    text = text.replace("60303AE22B998861BCE3B28F33EEC1BE758A213C86C93C076DBE9F558C11C752", sha(web))
    text = text.replace("<arg>python3</arg>", f"<arg>{sys.executable}</arg>")
    return text, {"port": str(free_port()), "echo_port": str(free_port())}


class ServiceTestBase(ZeepCalls, unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.home = os.path.join(self.dir, "home")
        self.packages = os.path.join(self.dir, "packages")
        os.makedirs(self.home)
        os.makedirs(self.packages)
        self.files = static.File(self.packages)
        site = server.Site(self.files)
        site.noisy = False
        self.package_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.package_port.getHost().port}"
        self.clock = task.Clock()
        self.published = []
        self.store = Store(os.path.join(self.dir, "engine.sqlite"))
        self.engine = Engine("xyz1", HOST, self.home, self.store, self.published.append, reactor=reactor,
                             clock=self.clock, fetcher=Fetcher(reactor=reactor, idle_timeout=5))
        self.operations = Operations(self.engine, StagedDescriptors(os.path.join(self.dir, "staged")))
        self.host = ServiceHost(http=LOCAL)
        self.host.add([deployment_service(self.operations)], TNS, NAME, path="deployment")
        self.host.startService()
        (port,) = yield self.host.when_listening()
        self.url = f"http://127.0.0.1:{port}/deployment"
        self.transport = TreqTransport()
        client = make_client(wsdl_file("deployment"), self.transport, asynchronous=True)
        from zeep.proxy import AsyncServiceProxy
        self.service = AsyncServiceProxy(client, bind(client, HTTP_TRANSPORT)._binding, address=self.url)

    @defer.inlineCallbacks
    def tearDown(self):
        for name in list(self.engine.supervisor.procs):
            yield self.engine.supervisor.stop(name)
        self.engine.close()
        self.store.close()
        yield defer.ensureDeferred(self.transport.aclose())
        yield self.host.stopService()
        yield self.package_port.stopListening()

    def serve(self, name: str, data: bytes) -> str:
        with open(os.path.join(self.packages, name), "wb") as out:
            out.write(data)
        return f"{self.base}/{name}"

    def post(self, body: bytes):
        return post_soap11(self.url, body)

    @staticmethod
    def raw(body: str) -> bytes:
        return soap11_envelope(TNS, body)

    @staticmethod
    def params(values: dict) -> list[dict]:
        return [{"name": name, "value": value} for name, value in values.items()]

    @staticmethod
    def states(report) -> dict:
        return {c.name: c.state for c in report.component}


class DeployOverHttp(ServiceTestBase):

    @defer.inlineCallbacks
    def test_xyz_deployed_operated_and_uninstalled_over_http(self):
        text, ports = xyz_text(self.serve)
        report = yield self.call("Deploy", descriptor=text, parameter=self.params(ports))
        assert report.ok and report.application == "XYZ" and report.state == "running", report
        assert self.states(report) == {"xyz-echo": "running", "xyz-web": "running"}
        assert all(c.pid and c.restarts == 0 for c in report.component)
        assert report.failure == []
        assert app_events(self.published) == ["requested", "instantiated", "initialized", "installed", "running"]
        # the engine gave the required 'node' parameter its host name
        conf = open(os.path.join(self.home, "apps/xyz-web/xyz.conf")).read()
        assert conf.startswith(f"# XYZ on {HOST}\n")

        status = yield self.call("Status")
        assert (status.slice, status.host, status.application, status.version, status.state, status.busy) == \
            ("xyz1", HOST, "XYZ", "1.2.0", "running", False)

        stopped = yield self.call("Stop", component="xyz-web")
        assert self.states(stopped)["xyz-web"] == "terminated" and stopped.state == "terminated"
        started = yield self.call("Start", component="xyz-web")
        assert self.states(started)["xyz-web"] == "running" and started.state == "running"
        reply = yield self.call("Command", command="STOP,*,XYZ,xyz-echo")
        assert (reply.command, reply.outcome) == ("STOP,*,XYZ,xyz-echo", "ran")
        assert self.states(reply.report)["xyz-echo"] == "terminated"
        other = yield self.call("Command", command="UNINSTALL,elsewhere.test,XYZ")
        assert (other.outcome, other.report) == ("ignored", None)
        assert "for elsewhere.test" in other.reason
        gone = yield self.call("Uninstall")
        assert gone.ok and set(self.states(gone).values()) == {"terminated"}
        assert not os.path.exists(os.path.join(self.home, "apps/xyz-web"))
        assert app_events(self.published)[-1] == "terminated"

    @defer.inlineCallbacks
    def test_appconfig_deploys_the_staged_descriptor_once(self):
        text, ports = xyz_text(self.serve)
        staged = yield self.call("Stage", descriptor=text, parameter=self.params(ports))
        assert (staged.application, staged.version) == ("XYZ", "1.2.0")
        assert self.published == []                      # staging deploys nothing
        reply = yield self.call("Command", command=f"APPCONFIG,{HOST},XYZ,XYZ-proc")
        assert reply.outcome == "ran" and reply.report.ok and reply.report.state == "running", reply
        count = len(self.published)
        again = yield self.call("Command", command="APPCONFIG,*,XYZ,XYZ-proc")
        assert again.report.ok and self.states(again.report) == {"xyz-echo": "running", "xyz-web": "running"}
        assert app_events(self.published[count:]) == ["running"]        # nothing redone: the status re-sent
        pids = {c.name: c.pid for c in again.report.component}
        updated = yield self.call("Command", command="UPDATE,*,XYZ")
        assert updated.report.ok and {c.name: c.pid for c in updated.report.component} != pids
        assert app_events(self.published[count + 1:]) == ["terminated", "requested", "instantiated", "initialized",
                                                          "installed", "running"]
        fault = yield self.fault("Command", command="START,*,ABC,xyz-web")
        assert fault.code.endswith("Client.WrongApplication") and "ABC is not deployed" in fault.message

    @defer.inlineCallbacks
    def test_a_deploy_in_progress_makes_the_others_busy(self):
        held = Held(tar_bytes({"x.txt": "x"}))
        self.files.putChild(b"held.tgz", held)
        data = held.data
        package = f'<package url="{self.base}/held.tgz" sha256="{sha(data)}" format="tar"/>'
        descriptor = simple_descriptor(["-c", "import time; time.sleep(60)"], package=package).decode()
        deploying = self.call("Deploy", descriptor=descriptor, parameter=[])
        yield held.arrived
        for operation, kwargs in (("Deploy", {"descriptor": descriptor, "parameter": []}),
                                  ("Start", {"component": "app"}), ("Uninstall", {}),
                                  ("Command", {"command": "UPDATE,*,Tiny"})):
            fault = yield self.fault(operation, **kwargs)
            assert fault.code.endswith("Client.Busy"), (operation, fault.code)
            assert "in progress" in fault.message
        status = yield self.call("Status")
        assert status.busy and status.application == "Tiny" and status.state == "requested"
        held.release()
        report = yield deploying
        assert report.ok and self.states(report) == {"app": "running"}
        assert not (yield self.call("Status")).busy


class Faults(ServiceTestBase):

    @defer.inlineCallbacks
    def test_refusals_are_precise_faults(self):
        cases = [
            ("Deploy", {"descriptor": "<deployment/>", "parameter": []}, "Client.InvalidDescriptor", "schema: "),
            ("Deploy", {"descriptor": "not xml at all", "parameter": []}, "Client.InvalidDescriptor", "unsafe-xml"),
            ("Deploy", {"descriptor": '<!DOCTYPE d [<!ENTITY a "aaaa">]><deployment/>', "parameter": []},
             "Client.InvalidDescriptor", "unsafe-xml"),
            ("Deploy", {"descriptor": simple_descriptor(["-c", "pass"]).decode(),
                        "parameter": [{"name": "nope", "value": "1"}]},
             "Client.InvalidDescriptor", "parameter: 'nope' is not a parameter of Tiny"),
            ("Deploy", {"descriptor": simple_descriptor(["-c", "pass"]).decode(),
                        "parameter": [{"name": "a", "value": "1"}, {"name": "a", "value": "2"}]},
             "Client.InvalidDescriptor", "given twice"),
            ("Stage", {"descriptor": "<deployment/>", "parameter": []}, "Client.InvalidDescriptor", "schema: "),
            ("Start", {"component": "xyz-web"}, "Client.NoDeployment", "nothing is deployed"),
            ("Uninstall", {}, "Client.NoDeployment", "nothing is deployed"),
            ("Command", {"command": "REBOOT,*,XYZ"}, "Client.InvalidCommand.unknown-verb", "is not a command"),
            ("Command", {"command": "START,*,XYZ"}, "Client.InvalidCommand.malformed", "3 parts"),
            ("Command", {"command": "START,no host!,XYZ,c"}, "Client.InvalidCommand.malformed", "U+0020"),
            ("Command", {"command": "START,bad_host,XYZ,c"}, "Client.InvalidCommand.bad-host", "node address"),
            ("Command", {"command": "A" * 5000}, "Client.InvalidCommand.oversized", "1024"),
            ("Command", {"command": "APPCONFIG,*,XYZ,XYZ-proc"}, "Client.NotStaged", "no descriptor of XYZ"),
            ("Command", {"command": "UPDATE,*,XYZ"}, "Client.NotStaged", "no descriptor of XYZ"),
            ("Command", {"command": "STOP,*,XYZ,xyz-web"}, "Client.WrongApplication", "nothing is"),
        ]
        for operation, kwargs, code, words in cases:
            fault = yield self.fault(operation, **kwargs)
            assert fault.code.endswith(code), (operation, kwargs, fault.code, fault.message)
            assert words in fault.message, (operation, fault.message)
            assert "Traceback" not in fault.message
        assert self.published == [] and self.store.load() is None
        yield self.call("Deploy", descriptor=simple_descriptor(["-c", "import time; time.sleep(60)"]).decode(),
                        parameter=[])
        fault = yield self.fault("Start", component="nosuch")
        assert fault.code.endswith("Client.UnknownComponent") and "'nosuch'" in fault.message
        fault = yield self.fault("Command", command="STOP,*,Tiny,nosuch")
        assert fault.code.endswith("Client.UnknownComponent")

    @defer.inlineCallbacks
    def test_a_failed_deployment_is_a_report_not_a_fault(self):
        closed = free_port()
        package = f'<package url="http://127.0.0.1:{closed}/p.tar" sha256="{"a" * 64}" format="tar"/>'
        descriptor = simple_descriptor(["-c", "pass"], package=package, steps='<do action="install" component="app"/>')
        report = yield self.call("Deploy", descriptor=descriptor.decode(), parameter=[])
        assert not report.ok and report.state == "failed"
        assert [(f.action, f.component, f.code) for f in report.failure] == [("install", "app", "unreachable")]
        (component,) = report.component
        assert component.state == "failed" and "unreachable" in component.reason

    @defer.inlineCallbacks
    def test_hostile_envelopes(self):
        view = FaultView((yield self.post(self.raw("<m:Deploy><m:descriptor>" + "a" * (2 << 20)
                                                   + "</m:descriptor></m:Deploy>"))))
        assert view.code == "Client.EnvelopeTooLarge", view.code
        view = FaultView((yield self.post(self.raw("<m:Deploy/>"))))
        assert view.code == "Client.InvalidBody", view.code
        params = "<m:parameter><m:name>p</m:name><m:value>v</m:value></m:parameter>" * 300
        view = FaultView((yield self.post(self.raw(f"<m:Deploy><m:descriptor>x</m:descriptor>{params}</m:Deploy>"))))
        assert view.code == "Client.InvalidBody", view.code
        view = FaultView((yield self.post(self.raw("<m:Command><m:command>START,*,A,\u0000</m:command></m:Command>"))))
        assert view.code in ("Client.BadXML", "Client.InvalidCommand.malformed"), view.code
        # what the envelope carries, the descriptor's own rules judge: too deep, too many components
        deep = "<a>" * 100 + "</a>" * 100
        fault = yield self.fault("Deploy", descriptor=deep, parameter=[])
        assert fault.code.endswith("Client.InvalidDescriptor") and "unsafe-xml" in fault.message, fault.message
        many = simple_descriptor(["-c", "pass"]).decode()
        component = many[many.index("<component"):many.index("</component>") + len("</component>")]
        many = many.replace(component, "".join(component.replace('name="app"', f'name="c{i}"') for i in range(70)))
        fault = yield self.fault("Deploy", descriptor=many, parameter=[])
        assert fault.code.endswith("Client.InvalidDescriptor") and "limit" in fault.message, fault.message
        assert self.published == []

    def test_served_wsdl_is_the_committed_one(self):
        return assert_served_wsdl_is_committed(self.url, "deployment")


def test_psepr_addresses_name_the_slice():
    assert psepr_service_for("xyz1") == "deployment.xyz1"
    assert psepr_address("xyz1") == "psepr:/org/dsmt/ns/soap/deployment.xyz1/"
    assert psepr_address("xyz1", HOST) == f"psepr:/org/dsmt/ns/soap/deployment.xyz1/?instance={HOST}"


def test_staged_descriptors_refuse_names_that_are_paths(tmp_path):
    from dsmt.server.refusal import Refusal
    staged = StagedDescriptors(str(tmp_path))
    for name in ("../x", "", "a/b", ".hidden"):
        try:
            staged.put(name, b"<x/>", {})
        except Refusal as refusal:
            assert refusal.code == "bad-name"
        else:
            raise AssertionError(name)
    assert staged.get("XYZ") is None
    staged.put("XYZ", b"<x/>", {"a": "1"})
    assert staged.get("XYZ") == (b"<x/>", {"a": "1"})
    (tmp_path / "XYZ.json").write_text("[1, 2]")
    try:
        staged.get("XYZ")
    except Refusal as refusal:
        assert refusal.code == "io" and "mapping" in refusal.reason
    else:
        raise AssertionError("a list of parameters was read")


HANGS = ("import signal, socket, sys, time; s = socket.socket(); "
         "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int(sys.argv[1]))); "
         "s.listen(); signal.signal(signal.SIGUSR1, lambda *a: s.close()); time.sleep(600)")


def listening(port: int) -> bool:
    import socket
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class HealthMonitor(ServiceTestBase):
    """The engine's ongoing health checks, seen through the service: a process that stops answering its check
    (but does not exit) is failed, killed and restarted under its policy."""

    @defer.inlineCallbacks
    def test_a_process_that_stops_answering_is_failed_killed_and_restarted(self):
        import signal
        from tests.server.deployment.test_engine import until
        port = free_port()
        health = f'<health interval="5" timeout="1" retries="1"><tcp port="{port}"/></health>'
        restart = '<restart maxRestarts="1" backoffInitial="2" backoffMax="2"/>'
        descriptor = simple_descriptor(["-c", HANGS, str(port)], health=health, restart=restart).decode()
        report = yield self.call("Deploy", descriptor=descriptor, parameter=[])
        assert report.ok and self.states(report) == {"app": "running"}, report
        pid = self.engine.supervisor.pid("app")
        assert [c.getTime() for c in self.clock.getDelayedCalls() if c.func == self.engine._check_health] == [5]
        self.clock.advance(5)                                   # healthy: checked again in 5 s, nothing published
        yield until(lambda: [c.getTime() for c in self.clock.getDelayedCalls()
                             if c.func == self.engine._check_health] == [10])
        assert app_events(self.published) == ["requested", "instantiated", "initialized", "running"]
        os.kill(pid, signal.SIGUSR1)                            # alive, no longer listening
        yield until(lambda: not listening(port))
        self.clock.advance(5)
        yield until(lambda: "restart 1 of 1 in 2 s" in (self.engine.lifecycles["app"].reason or ""))
        reason = self.engine.lifecycles["app"].reason
        assert f"failed its health check (1 consecutive failed checks; last: TCP 127.0.0.1:{port}" in reason, reason
        assert app_events(self.published)[-1] == "failed"
        status = yield self.call("Status")
        assert status.state == "failed" and status.component[0].restarts == 1
        self.clock.advance(2)                                   # the restart: healthy again
        yield until(lambda: self.engine.status() == {"app": "running"})
        assert app_events(self.published)[4:] == ["failed", "running"]
        assert self.engine.supervisor.pid("app") not in (None, pid)
        # stopping cancels the monitor: no timer left behind
        yield self.call("Stop", component="app")
        assert [c for c in self.clock.getDelayedCalls() if c.func == self.engine._check_health] == []

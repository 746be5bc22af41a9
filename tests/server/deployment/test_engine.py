"""The deployment engine end to end: real packages over a local HTTP server, real processes in a tmp
sliver home, exact event sequences; failures, a crash loop (backoff on a task.Clock), a health
check that never passes, and recovery after a real kill -9 of the engine's process."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import zipfile

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest
from twisted.web import server, static

from dsmt.server.deployment.descriptor import DescriptorError
from dsmt.server.deployment.engine import Engine
from dsmt.server.deployment.fetch import Fetcher
from dsmt.server.deployment.store import Store
from dsmt.server.deployment.supervisor import process_alive
from dsmt.server.statusevents import parse_pairs

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "xyz.xml")

ECHO = textwrap.dedent("""\
    import socketserver, sys
    port = int(sys.argv[1].split("=")[1])
    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(self.request.recv(1024))
    socketserver.TCPServer.allow_reuse_address = True
    socketserver.TCPServer(("127.0.0.1", port), Echo).serve_forever()
    """)
WEB = textwrap.dedent("""\
    import http.server, sys
    conf = dict(line.split(" = ", 1) for line in open(sys.argv[2]).read().splitlines() if " = " in line)
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(conf["greeting"].encode())
        def log_message(self, *args):
            pass
    http.server.HTTPServer.allow_reuse_address = True
    http.server.HTTPServer(("127.0.0.1", int(conf["port"])), Health).serve_forever()
    """)


@defer.inlineCallbacks
def until(predicate, step: float = 0.01, limit: float = 5.0):
    """Wait for ``predicate`` (a process's exit the kernel has not told us about) without a fixed sleep."""
    waited = 0.0
    while not predicate():
        if waited > limit:
            raise AssertionError("condition never became true")
        yield task.deferLater(reactor, step, lambda: None)
        waited += step


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tar_bytes(files: dict) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def zip_bytes(files: dict) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return out.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def app_events(published) -> list[str]:
    return [parse_pairs(event.payload.value)["status"] for event in published]


def simple_descriptor(start_args, *, health="", restart="", package="", steps=None, install="") -> bytes:
    args = "".join(f"<arg>{arg}</arg>" for arg in start_args)
    steps = steps or '<do action="start" component="app"/>'
    return f"""<deployment xmlns="http://dsmt.org/ns/deployment">
      <application name="Tiny" version="1"/>
      <component name="app">{package}{install}<start><arg>{sys.executable}</arg>{args}</start>
        <stop grace="5"/>{health}{restart}</component>
      <steps><sequence>{steps}</sequence></steps>
    </deployment>""".encode()


class EngineTestBase(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.home = os.path.join(self.dir, "home")
        os.makedirs(self.home)
        self.packages = os.path.join(self.dir, "packages")
        os.makedirs(self.packages)
        site = server.Site(static.File(self.packages))
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.clock = task.Clock()
        self.store_path = os.path.join(self.dir, "engine.sqlite")
        self.engine = self.make_engine()

    def make_engine(self):
        store = Store(self.store_path)
        self.addCleanup(store.close)
        self.published = []
        self.waiters = []
        engine = Engine("xyz1", "planetlab5.nbgisp.com", self.home, store, self.record, reactor=reactor,
                        clock=self.clock, fetcher=Fetcher(reactor=reactor, idle_timeout=5))
        self.addCleanup(self.shut_down, engine)
        return engine

    def record(self, event):
        self.published.append(event)
        status = parse_pairs(event.payload.value)["status"]
        for waiter in list(self.waiters):
            if waiter[0] == status:
                self.waiters.remove(waiter)
                waiter[1].callback(event)

    def next_status(self, status: str) -> defer.Deferred:
        d = defer.Deferred()
        self.waiters.append((status, d))
        return d

    @defer.inlineCallbacks
    def shut_down(self, engine):
        for name in list(engine.supervisor.procs):
            yield engine.supervisor.stop(name)
        engine.close()

    def serve(self, name: str, data: bytes) -> str:
        with open(os.path.join(self.packages, name), "wb") as out:
            out.write(data)
        return f"{self.base}/{name}"


class XyzTests(EngineTestBase):
    """The fixture deployed for real: packages served locally, ports picked free."""

    def xyz(self):
        echo = tar_bytes({"echo.py": ECHO})
        web = zip_bytes({"xyz_web.py": WEB})
        text = open(FIXTURE, encoding="utf-8").read()
        text = text.replace("https://dsmt.example.org/packages/xyz-echo-1.2.0.tar.gz",
                            self.serve("xyz-echo-1.2.0.tgz", echo))
        text = text.replace("https://dsmt.example.org/packages/xyz-web-1.2.0.zip", self.serve("xyz-web.zip", web))
        text = text.replace("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", sha(echo))
        text = text.replace("60303AE22B998861BCE3B28F33EEC1BE758A213C86C93C076DBE9F558C11C752", sha(web))
        text = text.replace("<arg>python3</arg>", f"<arg>{sys.executable}</arg>")
        self.web_sha = sha(web)
        self.ports = {"port": str(free_port()), "echo_port": str(free_port())}
        return text.encode()

    @defer.inlineCallbacks
    def test_xyz_deploys_with_the_reference_event_sequence(self):
        report = yield self.engine.deploy(self.xyz(), {"node": "planetlab5.nbgisp.com", **self.ports})
        self.assertTrue(report.ok, report.failures)
        self.assertEqual(report.states, {"xyz-echo": "running", "xyz-web": "running"})
        self.assertEqual(app_events(self.published),
                         ["requested", "instantiated", "initialized", "installed", "running"])
        first = self.published[0]
        self.assertEqual(first.channel, "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.deployment-agent/status/")
        self.assertEqual(first.payload.value,
                         "hostname=planetlab5.nbgisp.com,component=org.dsmt.component.deployment-agent,"
                         "managed=XYZ,slice=xyz1,status=requested")
        conf = open(os.path.join(self.home, "apps/xyz-web/xyz.conf")).read()
        self.assertIn(f"port = {self.ports['port']}\n", conf)
        self.assertIn("price = $5\n", conf)
        self.assertEqual(os.stat(os.path.join(self.home, "apps/xyz-web/xyz.conf")).st_mode & 0o777, 0o640)
        self.assertTrue(os.path.isdir(os.path.join(self.home, "apps/xyz-web/__pycache__")))  # install step ran
        stored = self.engine.store.load()
        self.assertEqual(stored.state, "running")
        self.assertEqual(stored.components["xyz-web"].pid, self.engine.supervisor.pid("xyz-web"))
        # Re-sending: one timer, the current state, rescheduled.
        self.assertEqual(self.engine.next_resend, self.clock.seconds() + 60)
        self.clock.advance(60)
        self.assertEqual(app_events(self.published)[-1], "running")
        self.assertEqual(len(self.published), 6)
        self.assertEqual(self.engine.next_resend, 120)
        # Stop and uninstall: terminated, trees gone.
        report = yield self.engine.uninstall()
        self.assertTrue(report.ok, report.failures)
        self.assertEqual(app_events(self.published)[-1], "terminated")
        self.assertFalse(os.path.exists(os.path.join(self.home, "apps/xyz-web")))
        self.assertFalse(os.path.exists(os.path.join(self.home, "xyz-echo")))

    @defer.inlineCallbacks
    def test_bad_checksum_fails_the_component_and_the_barrier_releases_the_other_branch(self):
        text = self.xyz().decode()
        text = text.replace(self.web_sha, "0" * 64)
        report = yield self.engine.deploy(text.encode(), {"node": "n1", **self.ports})
        self.assertFalse(report.ok)
        codes = {(f.action, f.component, f.code) for f in report.failures}
        self.assertIn(("install", "xyz-web", "checksum"), codes, report.failures)
        self.assertEqual(report.states["xyz-web"], "failed")
        self.assertIn("checksum", self.engine.lifecycles["xyz-web"].reason)
        # xyz-echo's download may finish before or after xyz-web's is refused: instantiated or not.
        self.assertIn(app_events(self.published), (["requested", "failed"], ["requested", "instantiated", "failed"]))
        self.assertEqual(report.states["xyz-echo"], "initialized")      # held at the barrier, released, not started
        self.assertIsNone(self.engine.supervisor.pid("xyz-echo"))


class FailureTests(EngineTestBase):
    @defer.inlineCallbacks
    def test_unreachable_package(self):
        closed = free_port()
        package = f'<package url="http://127.0.0.1:{closed}/p.tar" sha256="{"a" * 64}" format="tar"/>'
        report = yield self.engine.deploy(simple_descriptor(["-c", "pass"], package=package,
                                                            steps='<do action="install" component="app"/>'))
        self.assertEqual([(f.action, f.code) for f in report.failures], [("install", "unreachable")])
        self.assertEqual(app_events(self.published), ["requested", "failed"])

    @defer.inlineCallbacks
    def test_failing_install_step(self):
        install = f"<install><arg>{sys.executable}</arg><arg>-c</arg><arg>import sys; print('no'); sys.exit(3)</arg></install>"
        report = yield self.engine.deploy(simple_descriptor(["-c", "pass"], install=install))
        self.assertEqual([(f.action, f.code) for f in report.failures], [("start", "install-failed")])
        self.assertIn("exited with status 3", report.failures[0].reason)
        self.assertEqual(open(os.path.join(self.home, "logs/app.log")).read(), "no\n")
        self.assertEqual(app_events(self.published), ["requested", "instantiated", "initialized", "failed"])

    @defer.inlineCallbacks
    def test_invalid_descriptor_and_parameters_are_refused_before_anything(self):
        with self.assertRaises(DescriptorError) as caught:
            yield self.engine.deploy(b"<deployment/>")
        self.assertEqual(caught.exception.code, "schema")
        with self.assertRaises(DescriptorError) as caught:
            yield self.engine.deploy(simple_descriptor(["-c", "pass"]), {"nope": "1"})
        self.assertEqual(caught.exception.code, "parameter")
        self.assertEqual(self.published, [])
        self.assertIsNone(self.engine.store.load())

    @defer.inlineCallbacks
    def test_health_check_that_never_passes(self):
        port = free_port()
        health = f'<health interval="0.1" timeout="0.1" retries="3"><tcp port="{port}"/></health>'
        report = yield self.engine.deploy(simple_descriptor(["-c", "import time; time.sleep(60)"], health=health))
        self.assertEqual([(f.action, f.code) for f in report.failures], [("start", "unhealthy")])
        self.assertIn(f"127.0.0.1:{port}", report.failures[0].reason)
        self.assertIsNone(self.engine.supervisor.pid("app"))    # stopped again
        self.assertEqual(app_events(self.published), ["requested", "instantiated", "initialized", "failed"])

    @defer.inlineCallbacks
    def test_crash_loop_restarts_with_backoff_then_stays_failed(self):
        restart = '<restart maxRestarts="2" backoffInitial="1" backoffMax="60"/>'
        exited = self.next_status("failed")
        report = yield self.engine.deploy(simple_descriptor(["-c", "import sys; sys.exit(7)"], restart=restart))
        self.assertTrue(report.ok)
        yield exited
        self.assertIn("exited with status 7; restart 1 of 2 in 1 s", self.engine.lifecycles["app"].reason)
        self.assertEqual(self.engine.store.load().components["app"].restart_pending, True)
        running, exited = self.next_status("running"), self.next_status("failed")
        self.clock.advance(1)
        yield running
        yield exited
        self.assertIn("restart 2 of 2 in 2 s", self.engine.lifecycles["app"].reason)
        self.clock.advance(1.9)
        self.assertEqual(self.engine.status(), {"app": "failed"})        # backoff not over
        running, exited = self.next_status("running"), self.next_status("failed")
        self.clock.advance(0.1)
        yield running
        yield exited
        self.assertIn("gave up after 2 restart(s)", self.engine.lifecycles["app"].reason)
        self.assertEqual(app_events(self.published), ["requested", "instantiated", "initialized", "running",
                                                      "failed", "running", "failed", "running", "failed"])
        self.clock.advance(600)
        self.assertEqual([e for e in app_events(self.published)[9:] if e != "failed"], [])  # only re-sends


RUN_ENGINE = """
import sys
from twisted.internet import reactor, task
from dsmt.server.deployment.engine import Engine
from dsmt.server.deployment.store import Store
from dsmt.server.deployment.supervisor import process_alive
engine = Engine("xyz1", "n1", sys.argv[1], Store(sys.argv[2]), lambda event: None, reactor=reactor,
                clock=task.Clock())
def done(report):
    print("deployed", report.ok, flush=True)
engine.deploy(open(sys.argv[3], "rb").read()).addCallback(done)
reactor.run()
"""


class RecoveryTests(EngineTestBase):
    @defer.inlineCallbacks
    def test_a_new_engine_readopts_after_kill_9_then_restarts_a_lost_process(self):
        descriptor = os.path.join(self.dir, "d.xml")
        with open(descriptor, "wb") as out:
            out.write(simple_descriptor(["-c", "import time; time.sleep(60)"]))
        engine_process = subprocess.Popen([sys.executable, "-c", RUN_ENGINE, self.home, self.store_path, descriptor],
                                          stdout=subprocess.PIPE, text=True)
        line = yield threads.deferToThread(engine_process.stdout.readline)
        self.assertEqual(line, "deployed True\n")
        engine_process.send_signal(signal.SIGKILL)
        engine_process.wait()
        engine_process.stdout.close()
        record = Store(self.store_path).load().components["app"]
        os.kill(record.pid, 0)   # the application outlived its engine
        self.engine.close()
        engine = self.make_engine()
        report = yield engine.recover()
        self.assertTrue(report.ok)
        self.assertEqual(engine.status(), {"app": "running"})
        self.assertEqual(engine.supervisor.pid("app"), record.pid)      # re-adopted, not restarted
        self.assertEqual(app_events(self.published), ["running"])       # the current status, re-sent
        # The adopted process dies: noticed by the liveness check, restarted under the policy.
        os.killpg(record.pid, signal.SIGKILL)
        yield until(lambda: not process_alive(record.pid, record.pid_started))
        running = self.next_status("running")
        self.clock.advance(2)      # the liveness check: failed, restart in 1 s
        self.assertIn("exited (status unknown)", engine.lifecycles["app"].reason)
        self.clock.advance(1)
        yield running
        self.assertNotEqual(engine.supervisor.pid("app"), record.pid)
        self.assertEqual(app_events(self.published), ["running", "failed", "running"])

    @defer.inlineCallbacks
    def test_recover_reruns_a_half_done_deployment_and_restarts_lost_processes(self):
        store = Store(self.store_path)
        data = simple_descriptor(["-c", "import time; time.sleep(60)"])
        store.begin_deployment("Tiny", "1", data, {}, ["app"])
        store.record("app", state="running", pid=999999, pid_started="1")   # a pid that is not ours
        store.set_application_state("running")
        store.close()
        report = yield self.engine.recover()
        self.assertTrue(report.ok, report.failures)
        self.assertEqual(self.engine.status(), {"app": "running"})
        self.assertEqual(app_events(self.published), ["running", "failed", "running"])
        self.assertEqual(json.loads(json.dumps(self.engine.store.load().components["app"].state)), "running")

"""Application XYZ (examples/xyz): a reproducible package, a descriptor that validates, a service that
starts from the unpacked package and answers its health check, and a real deployment by the engine
from the package repository."""
from __future__ import annotations

import http.client
import importlib.util
import io
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tarfile

import pytest
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from dsmt.server.deployment.descriptor import parse_descriptor, resolve_parameters, substitute
from dsmt.server.deployment.engine import Engine
from dsmt.server.deployment.fetch import Fetcher
from dsmt.server.deployment.repository import INDEX_NAME, parse_index, repository_site
from dsmt.server.deployment.store import Store
from dsmt.server.deployment.unpack import unpack
from dsmt.server.statusevents import parse_pairs

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples", "xyz")
#: Seconds the service may take to print its "listening" line (it takes ~100 ms).
READY_SECONDS = 10.0


def load_build():
    spec = importlib.util.spec_from_file_location("xyz_build", os.path.join(EXAMPLE, "build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                      # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build = load_build()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the build ---------------------------------------------------------------------------------------


def test_the_build_is_reproducible(tmp_path):
    first = build.build(str(tmp_path / "one"), "http://127.0.0.1:8781/")
    # The same sources copied elsewhere, with other mtimes and modes, build the same bytes.
    source = tmp_path / "source"
    shutil.copytree(build.SOURCE, source, ignore=shutil.ignore_patterns("__pycache__"))
    for path in source.iterdir():
        os.utime(path, (1, 1))
        path.chmod(0o600)
    (source / "__pycache__").mkdir()
    (source / "__pycache__" / "junk.pyc").write_bytes(b"x")
    (source / ".swp").write_bytes(b"editor leftovers")
    second = build.build(str(tmp_path / "two"), "http://127.0.0.1:8781/", source=str(source))
    assert first.package.sha256 == second.package.sha256
    data = open(first.package.path, "rb").read()
    assert data == open(second.package.path, "rb").read()
    assert first.package.name == "xyz-1.0.0.tgz" and first.package.size == len(data)
    assert data[4:8] == b"\0\0\0\0"                              # gzip header mtime 0
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        infos = archive.getmembers()
    assert [info.name for info in infos] == ["xyz_server.py"]
    assert {(info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) for info in infos} == \
        {(build.MTIME, 0, 0, "", "", 0o644)}
    index = parse_index(open(tmp_path / "one" / INDEX_NAME, "rb").read())
    assert index.entries == {"xyz-1.0.0.tgz": first.package.sha256}
    # Building again into the same repository changes nothing.
    again = build.build(str(tmp_path / "one"), "http://127.0.0.1:8781/")
    assert again.package.sha256 == first.package.sha256
    assert parse_index(open(tmp_path / "one" / INDEX_NAME, "rb").read()) == index


def test_the_written_descriptor_parses_and_differs_from_the_template_only_in_the_package(tmp_path):
    result = build.build(str(tmp_path / "repo"), "http://127.0.0.1:9999/packages/",
                         str(tmp_path / "xyz.xml"))
    assert result.url == "http://127.0.0.1:9999/packages/xyz-1.0.0.tgz"
    assert result.descriptor_path == str(tmp_path / "xyz.xml")
    written = open(result.descriptor_path, "rb").read()
    descriptor = parse_descriptor(written)
    assert descriptor.application.name == "XYZ" and descriptor.application.version == "1.0.0"
    (component,) = descriptor.components
    assert component.package.url == result.url
    assert component.package.sha256 == result.package.sha256
    template = open(build.TEMPLATE, "rb").read()
    strip = re.compile(rb"<package\b[^>]*>")
    assert strip.sub(b"", written) == strip.sub(b"", template)
    assert [d.action for d in descriptor.steps.steps] == ["install", "configure", "start", "check"]
    assert component.health.kind == "http" and component.restart.max_restarts == 5


def test_the_default_descriptor_path_is_in_the_repository_but_not_served(tmp_path):
    result = build.build(str(tmp_path / "repo"), "http://127.0.0.1:8781")
    assert result.descriptor_path == str(tmp_path / "repo" / "xyz.xml")
    assert result.url == "http://127.0.0.1:8781/xyz-1.0.0.tgz"
    assert "xyz.xml" not in parse_index(open(tmp_path / "repo" / INDEX_NAME, "rb").read())


@pytest.mark.parametrize("base, words", [
    ("ftp://example.org/", "scheme 'ftp'"),
    ("http://user:secret@example.org/", "credentials"),
    ("file:///etc/", "outside the allowed directories"),
    ("http://exa mple.org/", "space or control character"),
])
def test_bad_base_urls_are_refused_before_anything_is_written(tmp_path, base, words):
    with pytest.raises(build.BuildError, match=re.escape(words)):
        build.build(str(tmp_path / "repo"), base)
    assert not (tmp_path / "repo").exists()


def test_a_file_url_inside_the_repository_is_accepted(tmp_path):
    repo = tmp_path / "repo"
    result = build.build(str(repo), repo.as_uri())
    assert parse_descriptor(open(result.descriptor_path, "rb").read()).components[0].package.url == result.url


def test_a_version_mismatch_between_descriptor_and_server_is_refused(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(build.SOURCE, source, ignore=shutil.ignore_patterns("__pycache__"))
    server = source / "xyz_server.py"
    server.write_text(server.read_text().replace('VERSION = "1.0.0"', 'VERSION = "2.0"'))
    with pytest.raises(build.BuildError, match="version 1.0.0 but .* says 2.0"):
        build.build(str(tmp_path / "repo"), "http://127.0.0.1:8781/", source=str(source))


def test_a_template_without_exactly_one_package_is_refused():
    template = open(build.TEMPLATE, "rb").read()
    package = re.search(rb"<package\b[^>]*>", template).group(0)
    with pytest.raises(build.BuildError, match="2 <package> elements"):
        build.render_descriptor(template.replace(package, package + package), "http://h/x.tgz", "a" * 64)


def test_main_reports_success_and_failure(tmp_path, capsys):
    assert build.main([str(tmp_path / "repo"), "http://127.0.0.1:8781/"]) == 0
    assert "xyz-1.0.0.tgz" in capsys.readouterr().out
    assert build.main([str(tmp_path / "repo"), "gopher://x/"]) == 1
    assert "scheme 'gopher'" in capsys.readouterr().err


# -- the service, run from the unpacked package as the descriptor says ----------------------------------


class Sliver:
    """The package unpacked into ``home`` and configured as the engine would; commands run from it."""

    def __init__(self, tmp_path, **given):
        result = build.build(str(tmp_path / "repo"), "http://127.0.0.1:8781/")
        self.descriptor = parse_descriptor(open(result.descriptor_path, "rb").read())
        (self.component,) = self.descriptor.components
        self.values = resolve_parameters(self.descriptor, {"node": "planetlab5.nbgisp.com", "slice": "xyz1",
                                                           "python": sys.executable, **given})
        self.home = tmp_path / "home"
        self.home.mkdir()
        unpack(result.package.path, str(self.home / self.component.package.dest), format="tar")
        for config in self.component.configs:
            (self.home / config.path).write_text(substitute(config.template, self.values))

    def argv(self, command):
        return [substitute(arg, self.values) for arg in command.argv]

    def spawn(self, command):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **dict(command.env)}
        return subprocess.Popen(self.argv(command), cwd=self.home / command.cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def first_line(process) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(READY_SECONDS):
            process.kill()
            raise AssertionError("the service printed nothing")
    return process.stdout.readline().decode()


def get(port: int, path: str, method: str = "GET"):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


def test_the_service_starts_from_the_unpacked_package_and_answers_its_health_check(tmp_path):
    sliver = Sliver(tmp_path, port="0", greeting="<b>hi</b> & welcome")
    assert sliver.component.install is None      # plain Python, run where it is unpacked (reference 000's states)
    process = sliver.spawn(sliver.component.start)
    try:
        line = first_line(process)
        match = re.fullmatch(r"XYZ 1\.0\.0 listening on http://127\.0\.0\.1:(\d+)/ \(node planetlab5\.nbgisp\.com, "
                             r"slice xyz1\)\n", line)
        assert match, line
        port = int(match.group(1))
        # The descriptor's own health URL, with the port it really got.
        url = substitute(sliver.component.health.url, {**sliver.values, "port": str(port)})
        assert url == f"http://127.0.0.1:{port}/health"
        assert get(port, "/health")[:2] == (200, b"ok\n")
        status, body, headers = get(port, "/")
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert b"planetlab5.nbgisp.com" in body and b"<b>xyz1</b>" in body
        assert b"&lt;b&gt;hi&lt;/b&gt; &amp; welcome" in body and b"<b>hi</b>" not in body
        assert get(port, "/nothing")[0] == 404
        assert get(port, "/health", "HEAD")[:2] == (200, b"")
        assert get(port, "/health", "POST")[0] == 501
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


@pytest.mark.parametrize("config, words", [
    ("address = 127.0.0.1\n", "sets no port"),
    ("port = 80800\n", "port '80800' is not a number from 0 to 65535"),
    ("port = 0\ncolour = blue\n", "line 2: unknown key 'colour'"),
    ("port = 0\nport = 1\n", "line 2: 'port' is set twice"),
    ("port 0\n", "line 1 is not 'key = value'"),
    ("port = 0\n" + "# padding\n" * 8000, "is over 65536 bytes"),
])
def test_a_bad_configuration_ends_the_service_with_status_2_and_a_reason(tmp_path, config, words):
    sliver = Sliver(tmp_path)
    (sliver.home / "xyz" / "xyz.conf").write_text(config)
    process = sliver.spawn(sliver.component.start)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2 and out == b""
    assert words in err.decode() and "Traceback" not in err.decode()


def test_a_port_in_use_ends_the_service_with_status_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        sliver = Sliver(tmp_path, port=str(taken.getsockname()[1]))
        process = sliver.spawn(sliver.component.start)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 2 and b"cannot listen on 127.0.0.1:" in err


# -- a real deployment: the engine downloads from the repository, unpacks, configures, starts, checks ----


class EngineDeploysXyz(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.home = os.path.join(self.dir, "home")
        os.makedirs(self.home)
        repository = os.path.join(self.dir, "repository")
        os.makedirs(repository)
        site = repository_site(repository)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.result = build.build(repository, f"http://127.0.0.1:{port.getHost().port}/")
        store = Store(os.path.join(self.dir, "engine.sqlite"))
        self.addCleanup(store.close)
        self.published = []
        self.engine = Engine("xyz1", "planetlab5.nbgisp.com", self.home, store, self.published.append,
                             reactor=reactor, clock=task.Clock(), fetcher=Fetcher(reactor=reactor, idle_timeout=5))
        self.addCleanup(self.shut_down)

    @defer.inlineCallbacks
    def shut_down(self):
        for name in list(self.engine.supervisor.procs):
            yield self.engine.supervisor.stop(name)
        self.engine.close()

    @defer.inlineCallbacks
    def test_xyz_is_deployed_from_the_repository_and_answers_its_health_check(self):
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool
        client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        port = free_port()
        data = open(self.result.descriptor_path, "rb").read()
        report = yield self.engine.deploy(data, {"node": "planetlab5.nbgisp.com", "slice": "xyz1",
                                                 "port": str(port), "python": sys.executable})
        self.assertTrue(report.ok, report.failures)
        self.assertEqual(report.states, {"xyz": "running"})
        self.assertEqual([parse_pairs(event.payload.value)["status"] for event in self.published],
                         ["requested", "instantiated", "initialized", "running"])
        self.assertEqual(self.published[-1].payload.value,
                         "hostname=planetlab5.nbgisp.com,component=org.dsmt.component.deployment-agent,"
                         "managed=XYZ,slice=xyz1,status=running")
        response = yield client.get(f"http://127.0.0.1:{port}/health")
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.content()), b"ok\n")
        page = yield (yield client.get(f"http://127.0.0.1:{port}/")).content()
        self.assertIn(b"<b>planetlab5.nbgisp.com</b>", page)
        conf = open(os.path.join(self.home, "xyz", "xyz.conf")).read()
        self.assertIn(f"port = {port}\n", conf)

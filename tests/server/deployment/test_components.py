"""Management components one by one, and the plugin registry."""
import os

import pytest
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from dsmt.server.deployment.components import (
    ACTIONS, Configure, Context, ManagementComponent, Registry, Uninstall, Unpack,
)
from dsmt.server.deployment.descriptor import BUILTIN_ACTIONS, Component, ConfigFile, Package, parse_descriptor
from dsmt.server.deployment.engine import Engine
from dsmt.server.deployment.store import Store
from dsmt.server.deployment.supervisor import Supervisor
from dsmt.server.refusal import Refusal
from tests.server.deployment.test_engine import sha, simple_descriptor, tar_bytes


class Notify(ManagementComponent):
    name = "notify-log"

    def __init__(self):
        self.calls = []

    def run(self, context, component):
        self.calls.append((context.slice_name, component.name))
        return defer.succeed(None)


def test_registry_builtins_plugins_and_refusals():
    registry = Registry()
    assert {name for names in ACTIONS.values() for name in names} <= set(registry.names())
    assert registry.actions() == BUILTIN_ACTIONS
    registry.add(Notify())
    assert "notify-log" in registry.actions()
    assert [c.name for c in registry.plan("install")] == ["download", "unpack", "install"]
    for bad, code in ((Notify(), "duplicate"), (object(), "invalid")):
        with pytest.raises(Refusal) as caught:
            registry.add(bad)
        assert caught.value.code == code
    check = Notify()
    check.name = "check"                  # a built-in action's name cannot be taken
    with pytest.raises(Refusal) as caught:
        registry.add(check)
    assert caught.value.code == "duplicate"
    with pytest.raises(Refusal) as caught:
        registry.get("nope")
    assert caught.value.code == "unknown-component"


def context(home, values=None):
    return Context("xyz1", "n1", str(home), values or {}, reactor, task.Clock(), None,
                   Supervisor(reactor, None), lambda *a, **k: None)


def test_configure_renders_atomically_and_never_outside(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    component = Component("web", configs=(ConfigFile("etc/web.conf", "port=${port} cost=$$1\n", 0o600),))
    Configure()._write(context(home, {"port": "80"}), component)
    assert (home / "etc/web.conf").read_text() == "port=80 cost=$1\n"
    assert (home / "etc/web.conf").stat().st_mode & 0o777 == 0o600
    assert [p for p in os.listdir(home / "etc") if p.startswith(".")] == []
    os.symlink(str(tmp_path), home / "out")
    hostile = Component("web", configs=(ConfigFile("out/evil.conf", "x"),))
    with pytest.raises(Refusal) as caught:
        Configure()._write(context(home), hostile)
    assert caught.value.code == "path-escape"
    assert not (tmp_path / "evil.conf").exists()


class UnpackTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_unpack_is_idempotent_and_uninstall_removes_the_tree(self):
        home = os.path.abspath(self.mktemp())
        data = tar_bytes({"a.txt": "A"})
        packages = os.path.join(home, ".deploy", "packages")
        os.makedirs(packages)
        package = Package("http://x/p.tar", sha(data), "tar", "apps/p")
        component = Component("p", package=package)
        with open(os.path.join(packages, f"p-{sha(data)[:16]}.tar"), "wb") as out:
            out.write(data)
        ctx = context(home)
        yield Unpack().run(ctx, component)
        with open(os.path.join(home, "apps/p/mine.txt"), "w") as out:
            out.write("kept")                  # same digest: not unpacked again
        yield Unpack().run(ctx, component)
        self.assertTrue(os.path.exists(os.path.join(home, "apps/p/mine.txt")))
        yield Uninstall().run(ctx, component)
        self.assertFalse(os.path.exists(os.path.join(home, "apps/p")))
        self.assertEqual(os.listdir(packages), [])

    @defer.inlineCallbacks
    def test_hostile_archive_fails_with_the_unpack_code(self):
        import io
        import tarfile
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as archive:
            info = tarfile.TarInfo("../escape.txt")
            archive.addfile(info, io.BytesIO(b""))
        data = out.getvalue()
        home = os.path.abspath(self.mktemp())
        packages = os.path.join(home, ".deploy", "packages")
        os.makedirs(packages)
        with open(os.path.join(packages, f"p-{sha(data)[:16]}.tar"), "wb") as out_file:
            out_file.write(data)
        component = Component("p", package=Package("http://x/p.tar", sha(data), "tar", "p"))
        with self.assertRaises(Refusal) as caught:
            yield Unpack().run(context(home), component)
        self.assertEqual(caught.exception.code, "parent-reference")


class PluginTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_plugin_action_runs_in_the_workflow(self):
        registry = Registry()
        notify = Notify()
        registry.add(notify)
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        store = Store(":memory:")
        engine = Engine("xyz1", "n1", home, store, lambda event: None, reactor=reactor, clock=task.Clock(),
                        fetcher=object(), registry=registry)
        data = simple_descriptor(["-c", "pass"], steps='<do action="notify-log" component="app"/>')
        with self.assertRaises(Exception):
            parse_descriptor(data)                       # unknown without the plugin
        report = yield engine.deploy(data)
        self.assertTrue(report.ok)
        self.assertEqual(notify.calls, [("xyz1", "app")])
        self.assertEqual(report.states, {"app": "initialized"})
        engine.close()

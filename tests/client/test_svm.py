"""``svm``: arguments, output lines and exit statuses, with the services faked over the real cores."""
from __future__ import annotations

import io
import os

import pytest
from twisted.internet import defer

from dsmt.client import svm
from dsmt.server.slicemanager.calls import CallOptions
from tests.support.cli import Run
from tests.server.slicemanager.test_core import NODES, USER_KEY, World, spec


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


@pytest.fixture
def run(world, tmp_path):
    made = []

    def fake_make_calls(args):
        made.append(svm.call_options(args))
        return world.agent, world.calls, lambda: defer.succeed(None)

    def run(*argv, agent="http://agent.example/agent"):
        out, err = io.StringIO(), io.StringIO()
        prefix = ["--dir", str(tmp_path / "home")] + (["--agent", agent] if agent else [])
        status = svm.main(prefix + list(argv), make_calls=fake_make_calls, stdout=out, stderr=err,
                          clock=world.clock)
        return Run(status, out.getvalue(), err.getvalue())
    run.made = made
    (tmp_path / "oceanstore.xml").write_bytes(spec())
    (tmp_path / "key.pub").write_text(USER_KEY + "\n")
    return run


def test_createslice_then_manage(run, world, tmp_path):
    result = run("-p", "4", "-t", "15", "createslice", "oceanstore.xml")
    assert result.status == 0 and sorted(result.lines) == [f"Success on {n}" for n in NODES]
    assert result.err == "createslice oceanstore: 3 succeeded, 0 failed\n"
    assert world.calls.runs[0] == ("Redeem", 4, 15.0)
    assert run.made[0] == CallOptions(agent_url="http://agent.example/agent", psepr_service="svm", timeout=15.0)

    assert run("nodelist", "oceanstore").lines == NODES
    assert run("expirations", "oceanstore").lines == [
        f"Sliver for slice oceanstore expires 2027-01-15 10:00:00 UTC on {n}" for n in NODES]
    result = run("addkey", "oceanstore", "key.pub")
    assert result.status == 0 and len(result.lines) == 3
    world.calls.down.add("10.0.0.2")
    result = run("renewslice", "oceanstore")
    assert result.status == 1 and "Error on 10.0.0.2: connection to http://127.0.0.1:9001/nodemanager refused" \
        in result.lines and result.err == "renewslice oceanstore: 2 succeeded, 1 failed\n"
    world.calls.down.clear()
    assert run("delkey", "oceanstore", "key.pub").status == 0
    assert run("nukekeys", "oceanstore").status == 0
    result = run("deleteslice", "oceanstore")
    assert result.status == 0 and len(result.lines) == 3 and not world.files().exists()


def test_partial_failure_and_resume(run, world, tmp_path):
    world.calls.down.add("10.0.0.3")
    result = run("createslice", "oceanstore.xml")
    assert result.status == 1
    assert result.lines.count("Error on 10.0.0.3: connection to http://127.0.0.1:9002/nodemanager refused") == 1
    world.calls.down.clear()
    tickets = os.path.join(world.files().path, "tickets", "10.0.0.3")
    assert run("newleases", "oceanstore", tickets).lines == ["Success on 10.0.0.3"]
    leases = os.path.join(world.files().path, "leases", "10.0.0.3")
    result = run("newvms", "oceanstore", leases)
    assert result.status == 0 and result.lines == ["Success on 10.0.0.3"]
    assert run("nodelist", "oceanstore").lines == NODES


def test_newtickets_and_getads(run, world):
    result = run("newtickets", "oceanstore.xml")
    assert result.status == 0 and sorted(result.lines) == [f"Success on {n}" for n in NODES]
    assert world.files().nodes("tickets") == NODES
    result = run("getads", "dslice.example")
    assert result.status == 0 and result.lines == NODES          # all full now, ordered by address
    assert run.made[-1].agent_url == "http://dslice.example/agent"


def test_agent_failure_is_status_3_and_changes_nothing(run, world, tmp_path):
    (tmp_path / "big.xml").write_bytes(spec(numnodes=5))
    result = run("createslice", "big.xml")
    assert result.status == 3 and result.out == ""
    assert result.err == "svm: error: slice oceanstore needs 5 nodes; only 3 are available\n"
    assert not os.path.exists(world.directory.slices_path)
    world.agent.down = True
    result = run("getads")
    assert result.status == 3 and "connection refused by the agent" in result.err


@pytest.mark.parametrize("argv, words", [
    ((), "required"),
    (("frobnicate",), "invalid choice"),
    (("createslice",), "required"),
    (("newleases", "oceanstore"), "required"),
    (("addkey", "oceanstore"), "required"),
    (("-p", "0", "clean"), "between 1 and 1024"),
    (("-p", "x", "clean"), "not a whole number"),
    (("-t", "-1", "clean"), "more than 0"),
    (("-t", "nan", "clean"), "more than 0"),
    (("--transport", "smtp", "clean"), "invalid choice"),
    (("--cert", "c.pem", "clean"), "--cert and --key"),
    (("--transport", "psepr", "clean"), "--router"),
    (("getads", "ftp://x/"), "http:// or https://"),
    (("getads", "a b"), "neither a URL"),
])
def test_usage_errors(run, argv, words):
    result = run(*argv)
    assert result.status == 2 and words in result.err and result.out == "" and "Traceback" not in result.err


def test_agent_commands_need_an_agent(run, monkeypatch):
    monkeypatch.delenv("DSMT_AGENT", raising=False)
    result = run("createslice", "oceanstore.xml", agent=None)
    assert result.status == 2 and "needs the agent" in result.err
    assert run("nodelist", "oceanstore", agent=None).status == 3        # local: no agent needed, slice unknown


def test_help_exits_zero(run, capsys):
    assert run("--help").status == 0
    assert "exit status" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (("createslice", "missing.xml"), "cannot read"),
    (("nodelist", "nosuch"), "there is no slice nosuch"),
    (("nodelist", "../etc"), "not a valid login"),
    (("addkey", "oceanstore", "key.pub"), "there is no slice"),
    (("newvms", "oceanstore", "oceanstore.xml"), "there is no slice"),
])
def test_local_failures_are_status_3(run, argv, words):
    result = run(*argv)
    assert result.status == 3 and words in result.err and "Traceback" not in result.err


def test_bad_key_file(run, tmp_path):
    run("createslice", "oceanstore.xml")
    (tmp_path / "bad.pub").write_bytes(b"\xff\xfe not a key")
    result = run("addkey", "oceanstore", "bad.pub")
    assert result.status == 3 and result.err.startswith("svm: error: ")


def test_local_commands_never_build_transports(run, world, tmp_path):
    run("createslice", "oceanstore.xml")
    run.made.clear()
    for argv in (("nodelist", "oceanstore"), ("expirations", "oceanstore"), ("clean",)):
        assert run(*argv).status == 0
    assert run.made == []
    world.clock.t += 10 ** 6
    result = run("clean")
    assert result.lines == ["Removed slice oceanstore"] and result.err == "clean: 1 slice removed\n"


def test_missing_remote_module_is_a_clean_error(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_remote(name, globals=None, locals=None, fromlist=(), level=0):
        if "remote" in (fromlist or ()) or name.endswith(".remote"):
            raise ImportError("No module named 'dsmt.server.slicemanager.remote'")
        return real_import(name, globals, locals, fromlist, level)
    monkeypatch.setattr(builtins, "__import__", no_remote)
    err = io.StringIO()
    status = svm.main(["--dir", str(tmp_path), "--agent", "http://a/agent", "getads"], stdout=io.StringIO(),
                      stderr=err)
    assert status == 3 and "remote transports cannot be loaded" in err.getvalue()

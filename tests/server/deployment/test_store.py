"""The engine's SQLite store: durable settings, one transaction per change, reload after reopen."""
import sqlite3

import pytest

from dsmt.server.deployment.lifecycle import Milestone
from dsmt.server.deployment.store import Store, StoreError


def test_round_trip_and_pragmas(tmp_path):
    path = str(tmp_path / "s.sqlite")
    store = Store(path)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2          # FULL
    assert store.load() is None
    store.begin_deployment("XYZ", "1.2.0", b"<d/>", {"port": "80"}, ["b", "a"])
    store.record("a", state="running", pid=42, pid_started="123", milestones=[Milestone.FETCHED, "configured"])
    store.record("b", state="failed", reason="boom", restarts=3, restart_pending=True)
    store.set_application_state("failed")
    store.close()
    loaded = Store(path).load()
    assert (loaded.application, loaded.version, loaded.descriptor, loaded.parameters, loaded.state) == \
        ("XYZ", "1.2.0", b"<d/>", {"port": "80"}, "failed")
    assert list(loaded.components) == ["b", "a"]                      # descriptor order kept
    a, b = loaded.components["a"], loaded.components["b"]
    assert (a.state, a.pid, a.pid_started, a.milestones) == ("running", 42, "123", {"fetched", "configured"})
    assert (b.reason, b.restarts, b.restart_pending) == ("boom", 3, True)


def test_new_deployment_replaces_the_old(tmp_path):
    store = Store(str(tmp_path / "s.sqlite"))
    store.begin_deployment("A", "1", b"x", {}, ["one"])
    store.record("one", state="running")
    store.begin_deployment("B", "2", b"y", {}, ["two"])
    loaded = store.load()
    assert loaded.application == "B" and list(loaded.components) == ["two"]
    assert loaded.components["two"].state is None
    with pytest.raises(KeyError):
        store.record("one", state="failed")
    with pytest.raises(TypeError):
        store.record("two", colour="red")


def test_a_record_with_the_application_state_is_one_transaction(tmp_path):
    store = Store(str(tmp_path / "s.sqlite"))
    store.begin_deployment("A", "1", b"x", {}, ["one"])
    before = store.db.total_changes
    store.record("one", state="running", application_state="running")
    assert store.db.total_changes - before == 2                       # both rows, committed together
    assert (store.load().state, store.load().components["one"].state) == ("running", "running")
    store.record("one", application_state=None)                        # None is a state: unpublished
    assert store.load().state is None and store.load().components["one"].state == "running"
    with pytest.raises(KeyError):                                      # the component row is checked first:
        store.record("two", state="failed", application_state="failed")
    assert store.load().state is None                                  # … and nothing was written


def test_foreign_or_broken_files_are_refused(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError) as caught:
        Store(str(junk))
    assert caught.value.code == "store"
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("PRAGMA user_version=7")
    db.close()
    with pytest.raises(StoreError) as caught:
        Store(str(other))
    assert "schema version 7" in caught.value.reason

"""PLDB's store: the newest value per channel, field and sender; the first schema's rows carried over."""
from __future__ import annotations

import sqlite3

from dsmt.server.pldb.store import PldbStore
from dsmt.transports.psepr.pldbwire import PldbAttr

CHANNEL = "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-mgr/status/"


def attr(value, instance, time=1.0, service="xyz1_mgr", expire=None):
    return PldbAttr(CHANNEL, "deployment-status", value, time, service, instance, expire)


def test_every_node_keeps_its_own_newest_status(tmp_path):
    store = PldbStore(str(tmp_path / "pldb.sqlite"))
    store.record(attr("hostname=a,status=requested", "a"))
    store.record(attr("hostname=b,status=requested", "b"))
    store.record(attr("hostname=a,status=running", "a", time=2.0))
    values = store.query("/org/dsmt/ns/deployment/xyz1/", now=3.0)
    assert [(v.from_instance, v.value) for v in values] == [("a", "hostname=a,status=running"),
                                                           ("b", "hostname=b,status=requested")]
    store.record(PldbAttr(CHANNEL, "deployment-status", "anonymous", 4.0, None, None, None))
    anonymous = [v for v in store.query(CHANNEL, now=5.0) if v.from_instance is None]
    assert [(v.from_service, v.value) for v in anonymous] == [(None, "anonymous")]
    assert len(store) == 3


def test_the_first_schema_is_migrated_once(tmp_path):
    path = str(tmp_path / "old.sqlite")
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE last_value (channel TEXT NOT NULL, field TEXT NOT NULL, value TEXT NOT NULL, time REAL NOT NULL,
            from_service TEXT, from_instance TEXT, expire INTEGER, PRIMARY KEY (channel, field)) WITHOUT ROWID;
        INSERT INTO last_value VALUES ('/c/', 'f', 'v', 1.0, 's', NULL, 90);""")
    old.commit()
    old.close()
    store = PldbStore(path)
    ((value,),) = [store.query("/c/", now=2.0)]
    assert (value.value, value.from_service, value.from_instance, value.expire) == ("v", "s", None, 90)
    store.close()
    assert len(PldbStore(path)) == 1          # opened again: nothing left to migrate, nothing lost

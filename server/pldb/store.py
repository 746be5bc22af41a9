"""PLDB's store: the last ``(channel, field) → value, time, sender`` in SQLite.

Contract: :meth:`PldbStore.record` keeps, for each channel and field, only the
newest value (one transaction per value, WAL journal, so a crash loses at most
the value being written and never corrupts the others).  :meth:`query`
returns the values under a channel subtree, optionally one field only,
leaving out values whose ``expire`` has passed.  The store survives restarts:
open the same path again and everything is there.
"""
from __future__ import annotations

import sqlite3

from dsmt.transports.psepr.pldbwire import PldbAttr

__all__ = ["PldbStore", "MAX_QUERY_ROWS"]

#: Most values one query returns.  A deployment of 1,000 nodes with a dozen
#: status fields each is ~12,000; the bound keeps one query from reading an
#: unbounded table into memory.
MAX_QUERY_ROWS = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS last_value (
    channel TEXT NOT NULL,
    field TEXT NOT NULL,
    value TEXT NOT NULL,
    time REAL NOT NULL,
    from_service TEXT,
    from_instance TEXT,
    expire INTEGER,
    PRIMARY KEY (channel, field)
) WITHOUT ROWID;
"""


class PldbStore:
    def __init__(self, path: str):
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def record(self, attr: PldbAttr) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO last_value (channel, field, value, time, from_service, from_instance, expire)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (channel, field) DO UPDATE SET value=excluded.value, time=excluded.time,"
                " from_service=excluded.from_service, from_instance=excluded.from_instance,"
                " expire=excluded.expire",
                (attr.channel, attr.field, attr.value, attr.time, attr.from_service, attr.from_instance,
                 attr.expire))

    def query(self, channel: str, field: str | None = None, *, now: float) -> list[PldbAttr]:
        """Unexpired values on ``channel`` and below, ordered by channel and field."""
        sql = ("SELECT channel, field, value, time, from_service, from_instance, expire FROM last_value"
               " WHERE channel >= ? AND channel < ? AND (expire IS NULL OR time + expire > ?)")
        # Every channel under "/a/b/" sorts between "/a/b/" and "/a/b0" ('0' follows '/'):
        # a range the primary key index answers directly.
        args: list = [channel, channel[:-1] + "0", now]
        if field is not None:
            sql += " AND field = ?"
            args.append(field)
        sql += " ORDER BY channel, field LIMIT ?"
        args.append(MAX_QUERY_ROWS)
        return [PldbAttr(*row) for row in self._db.execute(sql, args)]

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM last_value").fetchone()[0]

"""PLDB's store: the last ``(channel, field, sender) → value, time`` in SQLite.

Contract: :meth:`PldbStore.record` keeps, for each channel, field and sender
(``from/service`` + ``from/instance``), only the newest value — per sender,
because the status protocol puts every node's status on one channel per
component (``/org/dsmt/ns/deployment/<slice>/<component>/status/``, the node
in the value and the sender): the last value per channel alone would keep one
node of a slice and forget the others.  Each value is written (one transaction per value, WAL journal, so a crash loses at most
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

# Senders are stored as '' when absent (a primary key of a WITHOUT ROWID table holds no NULL).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS last_values (
    channel TEXT NOT NULL,
    field TEXT NOT NULL,
    from_service TEXT NOT NULL,
    from_instance TEXT NOT NULL,
    value TEXT NOT NULL,
    time REAL NOT NULL,
    expire INTEGER,
    PRIMARY KEY (channel, field, from_service, from_instance)
) WITHOUT ROWID;
"""
#: The first schema kept one value per (channel, field); its rows are carried over once.
_MIGRATE = """
INSERT OR IGNORE INTO last_values (channel, field, from_service, from_instance, value, time, expire)
    SELECT channel, field, coalesce(from_service, ''), coalesce(from_instance, ''), value, time, expire
    FROM last_value;
DROP TABLE last_value;
"""


class PldbStore:
    def __init__(self, path: str):
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'last_value'").fetchone():
            self._db.executescript("BEGIN IMMEDIATE;" + _MIGRATE + "COMMIT;")

    def close(self) -> None:
        self._db.close()

    def record(self, attr: PldbAttr) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO last_values (channel, field, from_service, from_instance, value, time, expire)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (channel, field, from_service, from_instance) DO UPDATE SET value=excluded.value,"
                " time=excluded.time, expire=excluded.expire",
                (attr.channel, attr.field, attr.from_service or "", attr.from_instance or "", attr.value, attr.time,
                 attr.expire))

    def query(self, channel: str, field: str | None = None, *, now: float) -> list[PldbAttr]:
        """Unexpired values on ``channel`` and below, ordered by channel, field and sender."""
        sql = ("SELECT channel, field, value, time, nullif(from_service, ''), nullif(from_instance, ''), expire"
               " FROM last_values"
               " WHERE channel >= ? AND channel < ? AND (expire IS NULL OR time + expire > ?)")
        # Every channel under "/a/b/" sorts between "/a/b/" and "/a/b0" ('0' follows '/'):
        # a range the primary key index answers directly.
        args: list = [channel, channel[:-1] + "0", now]
        if field is not None:
            sql += " AND field = ?"
            args.append(field)
        sql += " ORDER BY channel, field, from_service, from_instance LIMIT ?"
        args.append(MAX_QUERY_ROWS)
        return [PldbAttr(*row) for row in self._db.execute(sql, args)]

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM last_values").fetchone()[0]

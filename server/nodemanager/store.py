"""Durable lease store for the node manager (SQLite, WAL, one transaction per change).

``synchronous=FULL``: a lease is an admission decision that a caller has been
told about; losing the last committed leases on power loss (possible with
NORMAL in WAL mode) would let capacity be granted twice and would break
"redeeming the same ticket returns the same lease" across a restart.  Lease
changes are rare, so the extra fsync costs nothing that matters.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass

ACTIVE = "active"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    lease_id   TEXT PRIMARY KEY,
    ticket_id  TEXT NOT NULL UNIQUE,
    slice      TEXT NOT NULL UNIQUE,
    node       TEXT NOT NULL,
    slots      INTEGER NOT NULL CHECK (slots >= 0),
    granted_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    leaselen   INTEGER NOT NULL CHECK (leaselen > 0),
    state      TEXT NOT NULL
);
-- Every ticket ever redeemed here, kept until it can no longer verify (not_after + skew),
-- so a released or reaped lease's ticket cannot be redeemed a second time.
CREATE TABLE IF NOT EXISTS redeemed (
    ticket_id  TEXT PRIMARY KEY,
    not_after  INTEGER NOT NULL
);
"""
_COLUMNS = "lease_id, ticket_id, slice, node, slots, granted_at, expires_at, leaselen, state"


@dataclass(frozen=True)
class Lease:
    """One slice's lease on this node; valid while ``now < expires_at``."""
    lease_id: str
    ticket_id: str
    slice: str
    node: str
    slots: int
    granted_at: int
    expires_at: int
    leaselen: int
    state: str = ACTIVE


class LeaseStore:
    """Leases by ticket id and by slice (at most one per slice: one sliver per slice per node)."""

    def __init__(self, path: str):
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _one(self, where: str, arg) -> Lease | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM leases WHERE {where} = ?", (arg,)).fetchone()
        return Lease(*row) if row else None

    def by_ticket(self, ticket_id: str) -> Lease | None:
        return self._one("ticket_id", ticket_id)

    def by_slice(self, slice_name: str) -> Lease | None:
        return self._one("slice", slice_name)

    def all(self) -> list[Lease]:
        return [Lease(*r) for r in self._db.execute(f"SELECT {_COLUMNS} FROM leases ORDER BY expires_at, slice")]

    def was_redeemed(self, ticket_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM redeemed WHERE ticket_id = ?", (ticket_id,)).fetchone() is not None

    def forget_redeemed(self, before: int) -> None:
        """Drop replay records of tickets whose not_after < ``before`` (they can no longer verify)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM redeemed WHERE not_after < ?", (before,))

    def insert(self, lease: Lease, not_after: int) -> None:
        """Add a lease and its ticket's replay record in one transaction.

        Raises ``sqlite3.IntegrityError`` on a duplicate ticket or slice.
        """
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT INTO redeemed (ticket_id, not_after) VALUES (?, ?)", (lease.ticket_id, not_after))
            self._db.execute(f"INSERT INTO leases ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                             (lease.lease_id, lease.ticket_id, lease.slice, lease.node, lease.slots,
                              lease.granted_at, lease.expires_at, lease.leaselen, lease.state))

    def set_expiry(self, slice_name: str, expires_at: int) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE leases SET expires_at = ? WHERE slice = ?", (expires_at, slice_name))

    def delete(self, lease_ids: list[str]) -> None:
        """Remove leases in one transaction."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM leases WHERE lease_id = ?", [(i,) for i in lease_ids])

"""Durable lease and sliver store for the node manager (SQLite, WAL, one transaction per change).

Two tables hold what must survive kill -9:

* ``leases`` — admission decisions (one per slice), with the ``owner`` (the
  certificate subject that redeemed the ticket, NULL when unsigned).  A
  database made before ``owner`` existed gains the column on open
  (``ALTER TABLE … ADD COLUMN``; old leases have no owner).
* ``slivers`` — the sliver lifecycle's *intent* per slice (``state`` one of
  reference 000's states, ``reason`` of a failure, ``updated_at``), written
  before the sliver backend is touched so a restart knows what was under way.

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
    state      TEXT NOT NULL,
    owner      TEXT
);
-- Every ticket ever redeemed here, kept until it can no longer verify (not_after + skew),
-- so a released or reaped lease's ticket cannot be redeemed a second time.
CREATE TABLE IF NOT EXISTS redeemed (
    ticket_id  TEXT PRIMARY KEY,
    not_after  INTEGER NOT NULL
);
-- The sliver lifecycle of a slice on this node (docs/dslice.md "Sliver lifecycle on a node").
CREATE TABLE IF NOT EXISTS slivers (
    slice      TEXT PRIMARY KEY,
    lease_id   TEXT NOT NULL,
    state      TEXT NOT NULL,
    reason     TEXT,
    updated_at INTEGER NOT NULL
);
"""
_COLUMNS = "lease_id, ticket_id, slice, node, slots, granted_at, expires_at, leaselen, state, owner"
_SLIVER_COLUMNS = "slice, lease_id, state, reason, updated_at"


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
    #: Certificate subject that redeemed the ticket; None when the request was unsigned.
    owner: str | None = None


@dataclass(frozen=True)
class SliverRecord:
    """The recorded lifecycle state of one slice's sliver (``reason``: why it failed, else None)."""
    slice: str
    lease_id: str
    state: str
    reason: str | None
    updated_at: int


class LeaseStore:
    """Leases by ticket id and by slice (at most one per slice: one sliver per slice per node)."""

    def __init__(self, path: str):
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a database made by an older version up to this schema (idempotent)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")     # checked inside the transaction: two openers, one ALTER
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(leases)")}
            if "owner" not in columns:
                self._db.execute("ALTER TABLE leases ADD COLUMN owner TEXT")

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
            self._db.execute(f"INSERT INTO leases ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                             (lease.lease_id, lease.ticket_id, lease.slice, lease.node, lease.slots,
                              lease.granted_at, lease.expires_at, lease.leaselen, lease.state, lease.owner))

    def set_expiry(self, slice_name: str, expires_at: int) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE leases SET expires_at = ? WHERE slice = ?", (expires_at, slice_name))

    def delete(self, lease_ids: list[str]) -> None:
        """Remove leases in one transaction."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM leases WHERE lease_id = ?", [(i,) for i in lease_ids])

    # -- slivers ------------------------------------------------------------------------------------

    def sliver(self, slice_name: str) -> SliverRecord | None:
        row = self._db.execute(f"SELECT {_SLIVER_COLUMNS} FROM slivers WHERE slice = ?", (slice_name,)).fetchone()
        return SliverRecord(*row) if row else None

    def slivers(self) -> list[SliverRecord]:
        return [SliverRecord(*r) for r in self._db.execute(f"SELECT {_SLIVER_COLUMNS} FROM slivers ORDER BY slice")]

    def set_sliver(self, record: SliverRecord) -> None:
        """Insert or replace the sliver record of ``record.slice`` in one transaction."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(f"INSERT OR REPLACE INTO slivers ({_SLIVER_COLUMNS}) VALUES (?,?,?,?,?)",
                             (record.slice, record.lease_id, record.state, record.reason, record.updated_at))

    def delete_sliver(self, slice_name: str) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM slivers WHERE slice = ?", (slice_name,))

    def release_slice(self, slice_name: str) -> None:
        """Remove a slice's lease and sliver record together, in one transaction."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM slivers WHERE slice = ?", (slice_name,))
            self._db.execute("DELETE FROM leases WHERE slice = ?", (slice_name,))

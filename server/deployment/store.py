"""What a deployment engine deployed, in SQLite, so an engine restarted after kill -9 recovers it.

One store per engine (one sliver, one application at a time).  Held:

* the deployment: application name and version, the descriptor's bytes, the parameters given,
  the application's published state;
* per component: lifecycle state, failure reason, milestones reached, the supervised process
  (pid and its start time from ``/proc/<pid>/stat``, so a pid reused by another process after a
  reboot is never mistaken for ours), restarts so far, and whether a restart was pending.

Durability: WAL journal with ``synchronous=FULL`` — a state change the engine published is on disk
before the event leaves (the engine writes, then publishes); every method is one transaction, so a
kill -9 leaves the state before or after a change, never half of it.

**Recovery rule** (what :meth:`dsmt.server.deployment.engine.Engine.recover` does with it):

* a component recorded ``running`` whose process is alive with the recorded start time is
  re-adopted (supervised again, no event but the re-sent status); one whose process is gone
  becomes ``failed`` ("lost while the engine was down") and is restarted under its restart policy,
  as if it had crashed;
* a component in a progress state short of ``running`` (``requested`` … ``installed``) was in the
  middle of the deployment: the deployment's steps are run again from the start.  Every step is
  idempotent — a verified package is not downloaded again, an unpack already done (same digest)
  is kept, config files are rewritten whole, a component already running is not started twice;
  the install command is re-run, which is why descriptors must give idempotent install commands;
* a ``failed`` component with a pending restart is restarted; other ``failed`` and ``terminated``
  components stay as they are.

Errors: :class:`StoreError` (a Refusal, code ``store``) when the database cannot be opened or is
not one of ours.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field

from dsmt.server.refusal import Refusal

__all__ = ["Store", "StoreError", "StoredDeployment", "ComponentRecord", "SCHEMA_VERSION"]

#: Schema version in ``PRAGMA user_version``; a database with another one is refused, not guessed at.
SCHEMA_VERSION = 1
#: Seconds a writer waits for the database lock: one engine owns its store, so a wait means another
#: process opened it by mistake; 5 s reports that instead of hanging.
BUSY_TIMEOUT_SECONDS = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployment (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    application TEXT NOT NULL,
    version TEXT NOT NULL,
    descriptor BLOB NOT NULL,
    parameters TEXT NOT NULL,
    state TEXT
);
CREATE TABLE IF NOT EXISTS component (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    state TEXT,
    reason TEXT,
    milestones TEXT NOT NULL DEFAULT '',
    pid INTEGER,
    pid_started TEXT,
    restarts INTEGER NOT NULL DEFAULT 0,
    restart_pending INTEGER NOT NULL DEFAULT 0
);
"""


class StoreError(Refusal):
    """The store cannot be used (code ``store``)."""


@dataclass(frozen=True)
class ComponentRecord:
    name: str
    state: str | None = None
    reason: str | None = None
    milestones: frozenset[str] = frozenset()
    pid: int | None = None
    pid_started: str | None = None
    restarts: int = 0
    restart_pending: bool = False


@dataclass(frozen=True)
class StoredDeployment:
    application: str
    version: str
    descriptor: bytes
    parameters: dict[str, str]
    state: str | None
    components: dict[str, ComponentRecord] = field(default_factory=dict)


_FIELDS = ("state", "reason", "milestones", "pid", "pid_started", "restarts", "restart_pending")
#: :meth:`Store.record`'s "leave the application's state alone" (None is a state: not yet published).
_KEEP = object()


class Store:
    """The engine's SQLite file at ``path`` (``":memory:"`` for tests that need no restart)."""

    def __init__(self, path: str):
        try:
            self.db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise StoreError("store", f"{path} has schema version {version}; this engine knows "
                                 f"{SCHEMA_VERSION}")
            with self._transaction():
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise StoreError("store", f"cannot use {path} as a deployment store: {exc}") from None

    def close(self) -> None:
        self.db.close()

    class _Tx:
        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, kind, value, tb):
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")

    def _transaction(self):
        return self._Tx(self.db)

    def begin_deployment(self, application: str, version: str, descriptor: bytes, parameters: dict[str, str],
                         components: list[str]) -> None:
        """Record a new deployment, replacing the previous one; its components start undefined."""
        with self._transaction():
            self.db.execute("DELETE FROM deployment")
            self.db.execute("DELETE FROM component")
            self.db.execute("INSERT INTO deployment (id, application, version, descriptor, parameters) "
                            "VALUES (1, ?, ?, ?, ?)", (application, version, bytes(descriptor),
                                                       json.dumps(parameters, sort_keys=True)))
            self.db.executemany("INSERT INTO component (name, position) VALUES (?, ?)",
                                [(name, position) for position, name in enumerate(components)])

    def record(self, name: str, *, application_state=_KEEP, **changes) -> None:
        """Change fields of component ``name`` (any of state, reason, milestones — an iterable of
        names —, pid, pid_started, restarts, restart_pending) in one transaction — with the
        application's state too when ``application_state`` is given (a state change the engine
        publishes is one commit, hence one fsync, not two)."""
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise TypeError(f"unknown component fields: {', '.join(sorted(unknown))}")
        if "milestones" in changes:
            changes["milestones"] = ",".join(sorted(str(getattr(m, "value", m)) for m in changes["milestones"]))
        if "restart_pending" in changes:
            changes["restart_pending"] = int(bool(changes["restart_pending"]))
        if not changes and application_state is _KEEP:
            return
        columns = ", ".join(f"{key} = ?" for key in changes)
        with self._transaction():
            if changes:
                cursor = self.db.execute(f"UPDATE component SET {columns} WHERE name = ?", (*changes.values(), name))
                if cursor.rowcount != 1:
                    raise KeyError(name)
            if application_state is not _KEEP:
                self._set_application_state(application_state)

    def set_application_state(self, state: str | None) -> None:
        with self._transaction():
            self._set_application_state(state)

    def _set_application_state(self, state: str | None) -> None:
        self.db.execute("UPDATE deployment SET state = ? WHERE id = 1", (state,))

    def load(self) -> StoredDeployment | None:
        """The recorded deployment, or None."""
        row = self.db.execute("SELECT application, version, descriptor, parameters, state FROM deployment").fetchone()
        if row is None:
            return None
        components = {}
        for name, *values in self.db.execute(f"SELECT name, {', '.join(_FIELDS)} FROM component ORDER BY position"):
            state, reason, milestones, pid, pid_started, restarts, pending = values
            components[name] = ComponentRecord(name, state, reason, frozenset(filter(None, milestones.split(","))),
                                               pid, pid_started, restarts, bool(pending))
        return StoredDeployment(row[0], row[1], bytes(row[2]), json.loads(row[3]), row[4], components)

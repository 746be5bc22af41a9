"""The node service: leases, slivers and their lifecycle events on one node.  Pure: no reactor.

What the node manager's SOAP face (:mod:`.service`) wraps; the contract is
docs/dslice.md ("Node manager service", "Sliver lifecycle on a node").  It
combines the ticket → lease core (:class:`~.core.NodeManager`, whose clock it
uses), the durable store (:mod:`.store`: leases with their owner, and one
sliver record per slice), a sliver backend (:class:`~.sliver.SliverBackend`)
and a ``publish`` callback taking the sliver manager's ``deployment-status``
events (:func:`dsmt.server.statusevents.deployment_status`, hostname = the
node address).

**Owner.**  :meth:`NodeService.redeem` records the caller (a signed request's
certificate subject, None when unsigned) as the lease's owner.  When an owner
is recorded, every later operation on the slice — including redeeming the same
ticket again — must come from that subject (:class:`NotOwner`); a lease without
owner (unsigned deployment) is open to every caller.

**Lifecycle** of a slice's sliver (the ``slivers`` record, always written
*before* the backend is touched, and published after it is written)::

    CreateSliver: requested -> instantiated -> initialized -> running
                  any step fails -> failed (backend rolled back, reason kept)
    DeleteSliver: terminated (the intent) -> backend deleted -> lease and record removed
    reap():       leases whose term ended removed -> their slivers deleted, terminated

A backend builds a sliver atomically with its keys (``create``), so
``instantiated`` is published once the sandbox exists, ``initialized`` once
its keys read back (resource limits are the backend's configuration, applied
to every process it starts), and ``running`` right after.

A ``failed`` record means "lease held, no sliver": the backend holds nothing
for the slice and CreateSliver may be called again with the same lease id.
CreateSliver on a ``running`` sliver of the same lease id returns it unchanged
and publishes nothing.

**Recovery rule** (:meth:`NodeService.recover`, at start, after kill -9 at any
point).  The backend repairs itself first (``backend.recover()``); then:

1. a record whose lease is gone (or is another lease) is an orphan: its sliver
   is deleted, the record removed, ``terminated`` published;
2. a ``terminated`` record is a DeleteSliver under way: it is finished (sliver
   deleted, lease and record removed, ``terminated`` published);
3. a ``requested``/``instantiated``/``initialized`` record, or a ``running``
   one whose sandbox is gone, is rolled back to "lease held, no sliver": its
   backend state deleted, the record set ``failed`` (reason
   :data:`INTERRUPTED`), ``failed`` published — the caller's retry of
   CreateSliver (``svm newvms``) then builds the sliver afresh;
4. a ``failed`` record keeps its lease; any backend state left is deleted;
5. a backend sandbox without a record is deleted (nothing was announced for
   it, so nothing is published).

No lease is removed except by a DeleteSliver the caller asked for (rule 2);
leases whose term ended are left to :meth:`NodeService.reap`, which the daemon
runs when :meth:`NodeService.next_expiry` says (at once after a restart if a
term ended while it was down).

**Refusals** are :class:`~dsmt.server.refusal.Refusal` subclasses naming their
SOAP fault in a ``fault`` class attribute, which
:func:`dsmt.server.faults.refusal_fault` maps mechanically:
``AdmissionRefused`` → ``Client.AdmissionRefused.<code>``, every other →
``Client.<fault>`` (NoLease, NoSliver, BadLease, NotOwner, InvalidKey,
SliverFailed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from dsmt.server.refusal import Refusal
from dsmt.server.statusevents import CONTAINER, SLIVER_MGR, deployment_status
from dsmt.transports.psepr.event import Event
from .core import AdmissionRefused, NodeManager, NoLease, quoted
from .sliver import NO_SLIVER, TOO_MANY_KEYS, SliverBackend, SliverError
from .sshkeys import SliceKeyPair, SshKeyError, parse_private_key, parse_public_key
from .store import Lease, SliverRecord

__all__ = [
    "REQUESTED", "INSTANTIATED", "INITIALIZED", "RUNNING", "FAILED", "TERMINATED", "LIFECYCLE", "INTERRUPTED",
    "NodeService", "SliverInfo", "RecoveryAction", "Recovery", "AdmissionRefused", "NoLease", "NoSliver",
    "BadLease", "NotOwner", "InvalidKey", "SliverFailed",
]

REQUESTED = "requested"
INSTANTIATED = "instantiated"
INITIALIZED = "initialized"
RUNNING = "running"
FAILED = "failed"
TERMINATED = "terminated"
#: Reference 000's states a sliver passes through here, in order (``installed`` belongs to applications).
LIFECYCLE = (REQUESTED, INSTANTIATED, INITIALIZED, RUNNING, FAILED, TERMINATED)
#: States of a CreateSliver that had not finished.
_UNFINISHED = (REQUESTED, INSTANTIATED, INITIALIZED)

#: Reason recorded for a creation rolled back by :meth:`NodeService.recover`.
INTERRUPTED = "the node manager restarted before the sliver was running; create it again"
#: Reason recorded for a running sliver whose sandbox is gone after a restart.
VANISHED = "the sliver's sandbox is gone; create it again"
#: Longest reason kept from a backend error: a sentence, not a dump.
MAX_REASON_CHARS = 500


class NoSliver(Refusal):
    """The slice has no (running) sliver here."""
    fault = "NoSliver"

    def __init__(self, reason: str):
        super().__init__("no-sliver", reason)


class BadLease(Refusal):
    """The lease id given is not the slice's lease here."""
    fault = "BadLease"

    def __init__(self, reason: str):
        super().__init__("bad-lease", reason)


class NotOwner(Refusal):
    """The caller is not the subject that redeemed the slice's ticket."""
    fault = "NotOwner"

    def __init__(self, reason: str):
        super().__init__("not-owner", reason)


class InvalidKey(Refusal):
    """A public key line or a slice key pair is not acceptable."""
    fault = "InvalidKey"

    def __init__(self, reason: str):
        super().__init__("invalid-key", reason)


class SliverFailed(Refusal):
    """The backend failed a step; ``code`` is the backend's (``backend``, ``exists``…), ``reason`` its sentence."""
    fault = "SliverFailed"


@dataclass(frozen=True)
class SliverInfo:
    """What the service answers about a slice's sliver (``keys``: user keys in ``authorized_keys``)."""
    slice: str
    node: str
    state: str
    lease_id: str | None
    expires_at: int | None
    keys: int
    reason: str | None = None


@dataclass(frozen=True)
class RecoveryAction:
    """One repair by :meth:`NodeService.recover`: ``slice`` went from ``before`` to ``after`` (None: no record)."""
    slice: str
    before: str | None
    after: str | None
    why: str


@dataclass
class Recovery:
    """What :meth:`NodeService.recover` did: the backend's own report, then one action per repair."""
    backend: object = None
    actions: list[RecoveryAction] = field(default_factory=list)


def _reason(exc: BaseException) -> tuple[str, str]:
    """(code, sentence) of a backend failure."""
    if isinstance(exc, Refusal):
        code, text = exc.code, exc.reason
    elif isinstance(exc, OSError):
        code, text = "backend", f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    else:
        code, text = "backend", f"{type(exc).__name__}: {exc}"
    return code, text[:MAX_REASON_CHARS]


class NodeService:
    """The node manager's operations (see the module docstring); every method is one request."""

    def __init__(self, manager: NodeManager, backend: SliverBackend, publish: Callable[[Event], None]):
        self._manager, self._backend, self._publish = manager, backend, publish
        self._store = manager.store
        self.node = manager.node_address

    @property
    def backend(self) -> SliverBackend:
        """The sliver backend (the daemon's sliver bootstrap starts processes in it)."""
        return self._backend

    # -- helpers --------------------------------------------------------------------------------------

    def _announce(self, slice_name: str, state: str) -> None:
        self._publish(deployment_status(slice_name, self.node, SLIVER_MGR, CONTAINER, state))

    def _enter(self, slice_name: str, lease_id: str, state: str, reason: str | None = None) -> None:
        """Persist ``state`` for the slice, then publish it."""
        self._store.set_sliver(SliverRecord(slice_name, lease_id, state, reason, self._manager.now()))
        self._announce(slice_name, state)

    def _check_owner(self, lease: Lease, caller: str | None) -> None:
        if lease.owner is not None and caller != lease.owner:
            who = "an unsigned caller" if caller is None else f"caller {quoted(caller)}"
            raise NotOwner(f"slice {quoted(lease.slice)} on {self.node} belongs to the subject that redeemed "
                           f"its ticket, not to {who}")

    def _owned(self, slice_name: str, caller: str | None) -> Lease:
        lease = self._manager.held(slice_name)
        self._check_owner(lease, caller)
        return lease

    def _running(self, slice_name: str, caller: str | None) -> Lease:
        """The unexpired, caller-owned lease of a slice whose sliver is running, else NoSliver / NotOwner."""
        lease = self._manager.lease(slice_name)
        if lease is not None:
            self._check_owner(lease, caller)
        record = self._store.sliver(slice_name)
        if (lease is None or self._manager.now() >= lease.expires_at or record is None
                or record.lease_id != lease.lease_id or record.state != RUNNING):
            state = f" (it is {record.state})" if record is not None and record.state != RUNNING else ""
            raise NoSliver(f"slice {quoted(slice_name)} has no running sliver on {self.node}{state}")
        return lease

    def _info(self, record: SliverRecord, lease: Lease | None = None) -> SliverInfo:
        state, keys = record.state, 0
        if state == RUNNING:
            try:
                keys = len(self._backend.keys(record.slice))
            except (SliverError, OSError):
                keys = 0
        expires = lease.expires_at if lease is not None and lease.lease_id == record.lease_id else None
        return SliverInfo(record.slice, self.node, state, record.lease_id, expires, keys, record.reason)

    def _discard(self, slice_name: str) -> None:
        """Delete whatever the backend holds for the slice (nothing when it holds nothing)."""
        if self._backend.exists(slice_name):
            self._backend.delete(slice_name)

    @staticmethod
    def _keypair(public_line: str | None, private_key: bytes | None) -> SliceKeyPair | None:
        if public_line is None and private_key is None:
            return None
        if public_line is None or private_key is None:
            raise InvalidKey("the slice key pair needs both its public key line and its private key")
        try:
            return parse_private_key(private_key, public_line)
        except SshKeyError as exc:
            raise InvalidKey(exc.reason) from None

    @staticmethod
    def _user_key(key_line: str):
        try:
            return parse_public_key(key_line)
        except SshKeyError as exc:
            raise InvalidKey(exc.reason) from None

    @staticmethod
    def _backend_call(operation, *args):
        """``operation(*args)`` with backend errors as this service's refusals (no-sliver → NoSliver, a key
        error or too many keys → InvalidKey — the caller's to fix —, any other SliverError or OSError →
        SliverFailed with the backend's code)."""
        try:
            return operation(*args)
        except SshKeyError as exc:
            raise InvalidKey(exc.reason) from None
        except SliverError as exc:
            if exc.code == NO_SLIVER:
                raise NoSliver(exc.reason) from None
            if exc.code == TOO_MANY_KEYS:
                raise InvalidKey(exc.reason) from None
            raise SliverFailed(*_reason(exc)) from None
        except OSError as exc:
            raise SliverFailed(*_reason(exc)) from None

    def _key_op(self, slice_name: str, caller: str | None, operation, *args) -> int:
        self._running(slice_name, caller)
        return self._backend_call(operation, slice_name, *args)

    # -- operations -----------------------------------------------------------------------------------

    def redeem(self, ticket_bytes: bytes, caller: str | None) -> Lease:
        """Redeem a ticket into a lease owned by ``caller``; AdmissionRefused, or NotOwner for the same ticket
        redeemed again by another subject.

        When some lease's term has ended, :meth:`reap` runs first, so a new ticket for a slice whose lease
        just ran out is not refused ``already-leased`` while the reaper's timer is pending.
        """
        due = self.next_expiry()
        if due is not None and due <= self._manager.now():
            self.reap()
        lease = self._manager.redeem(ticket_bytes, caller)
        self._check_owner(lease, caller)
        return lease

    def create_sliver(self, slice_name: str, lease_id: str, public_line: str | None, private_key: bytes | None,
                      caller: str | None) -> SliverInfo:
        """Build the slice's sliver on its lease; NoLease, NotOwner, BadLease, InvalidKey, SliverFailed.

        Refusals before ``requested`` change nothing and publish nothing.
        """
        lease = self._owned(slice_name, caller)
        if lease_id != lease.lease_id:
            raise BadLease(f"lease {quoted(lease_id)} is not the lease of slice {quoted(slice_name)} on {self.node}")
        record = self._store.sliver(slice_name)
        if (record is not None and record.state == RUNNING and record.lease_id == lease_id
                and self._backend_call(self._backend.exists, slice_name)):
            return self._info(record, lease)
        keypair = self._keypair(public_line, private_key)
        self._enter(slice_name, lease_id, REQUESTED)
        try:
            self._discard(slice_name)           # a failed attempt's leftovers (normally nothing)
            self._backend.create(slice_name, keypair)
            self._enter(slice_name, lease_id, INSTANTIATED)
            self._backend.keys(slice_name)      # the backend installs keys in create(): check they read back
            self._enter(slice_name, lease_id, INITIALIZED)
            self._enter(slice_name, lease_id, RUNNING)
        except Exception as exc:
            code, reason = _reason(exc)
            try:
                self._discard(slice_name)
            except Exception as cleanup:
                reason = f"{reason}; rollback failed too: {_reason(cleanup)[1]}"[:MAX_REASON_CHARS]
            self._enter(slice_name, lease_id, FAILED, reason)
            if isinstance(exc, (Refusal, OSError)):
                raise SliverFailed(code, reason) from None
            raise
        return self._info(self._store.sliver(slice_name), lease)

    def delete_sliver(self, slice_name: str, caller: str | None) -> SliverInfo:
        """Delete the slice's sliver (if any) and release its lease (expired or not); NoLease, NotOwner,
        SliverFailed (the deletion stays recorded: calling again, or a restart, finishes it)."""
        lease = self._manager.lease(slice_name)
        if lease is None:
            raise NoLease(f"slice {quoted(slice_name)} holds no lease on {self.node}")
        self._check_owner(lease, caller)
        record = self._store.sliver(slice_name)
        done = SliverRecord(slice_name, lease.lease_id, TERMINATED, None, self._manager.now())
        if record is None and not self._backend_call(self._backend.exists, slice_name):
            self._store.release_slice(slice_name)
            return self._info(done, lease)
        self._store.set_sliver(done)
        self._backend_call(self._discard, slice_name)
        self._store.release_slice(slice_name)
        self._announce(slice_name, TERMINATED)
        return self._info(done, lease)

    def add_key(self, slice_name: str, key_line: str, caller: str | None) -> int:
        """Add one user key to the running sliver; the count of user keys now."""
        return self._key_op(slice_name, caller, self._backend.add_key, self._user_key(key_line))

    def del_key(self, slice_name: str, key_line: str, caller: str | None) -> int:
        """Remove one user key from the running sliver; the count of user keys now."""
        return self._key_op(slice_name, caller, self._backend.del_key, self._user_key(key_line))

    def nuke_keys(self, slice_name: str, caller: str | None) -> int:
        """Remove every user key from the running sliver; 0."""
        return self._key_op(slice_name, caller, self._backend.nuke_keys)

    def renew(self, slice_name: str, caller: str | None) -> Lease:
        """Extend the slice's unexpired lease to now + leaselen; NoLease, NotOwner."""
        self._owned(slice_name, caller)
        return self._manager.renew(slice_name)

    def get_sliver(self, slice_name: str) -> SliverInfo:
        record = self._store.sliver(slice_name)
        if record is None:
            raise NoSliver(f"slice {quoted(slice_name)} has no sliver on {self.node}")
        return self._info(record, self._manager.lease(slice_name))

    def list_slivers(self) -> list[SliverInfo]:
        """Every recorded sliver, by slice name."""
        return [self._info(record, self._manager.lease(record.slice)) for record in self._store.slivers()]

    # -- expiry -------------------------------------------------------------------------------------

    def next_expiry(self) -> int | None:
        """When the next lease term ends (POSIX seconds; ≤ now: reap now), None with no lease."""
        leases = self._store.all()
        return leases[0].expires_at if leases else None

    def reap(self) -> list[SliverInfo]:
        """End the leases whose term is over (NodeManager.reap), delete their slivers, publish ``terminated``.

        Returns one SliverInfo (``terminated``) per lease ended and per orphan record swept.  A backend
        that fails to delete a sliver keeps its record (the reason noted); the next reap or recover retries.
        """
        gone = self._manager.reap()
        swept = {info.slice: info for info in self._sweep()}
        for lease in gone:
            if lease.slice not in swept and self._store.sliver(lease.slice) is None:
                swept[lease.slice] = SliverInfo(lease.slice, self.node, TERMINATED, lease.lease_id,
                                                lease.expires_at, 0)
        return sorted(swept.values(), key=lambda info: info.slice)

    def _sweep(self, actions: list[RecoveryAction] | None = None) -> list[SliverInfo]:
        """Delete every recorded sliver whose lease is gone (recovery rule 1)."""
        out = []
        for record in self._store.slivers():
            lease = self._manager.lease(record.slice)
            if lease is not None and lease.lease_id == record.lease_id:
                continue
            try:
                self._discard(record.slice)
            except Exception as exc:
                note = f"deleting the sliver failed: {_reason(exc)[1]}"[:MAX_REASON_CHARS]
                self._store.set_sliver(SliverRecord(record.slice, record.lease_id, record.state, note,
                                                    record.updated_at))
                continue
            self._store.delete_sliver(record.slice)
            self._announce(record.slice, TERMINATED)
            out.append(SliverInfo(record.slice, self.node, TERMINATED, record.lease_id, None, 0))
            if actions is not None:
                actions.append(RecoveryAction(record.slice, record.state, None, "its lease is gone"))
        return out

    # -- restart --------------------------------------------------------------------------------------

    def recover(self) -> Recovery:
        """Reconcile records, leases and backend after a crash (the module docstring's recovery rule)."""
        report = Recovery(backend=self._backend.recover())
        actions = report.actions
        self._sweep(actions)
        for record in self._store.slivers():
            try:
                self._repair(record, actions)
            except Exception as exc:
                actions.append(RecoveryAction(record.slice, record.state, record.state,
                                              f"repair failed, retried at the next restart: {_reason(exc)[1]}"))
        recorded = {record.slice for record in self._store.slivers()}
        for name in self._backend.list():
            if name in recorded:
                continue
            try:
                self._backend.delete(name)
                why = "a sandbox without a sliver record was deleted"
            except Exception as exc:
                why = f"deleting a sandbox without a sliver record failed: {_reason(exc)[1]}"
            actions.append(RecoveryAction(name, None, None, why))
        return report

    def _repair(self, record: SliverRecord, actions: list[RecoveryAction]) -> None:
        """Recovery rules 2–4 for one record whose lease is held."""
        if record.state == TERMINATED:
            self._discard(record.slice)
            self._store.release_slice(record.slice)
            self._announce(record.slice, TERMINATED)
            actions.append(RecoveryAction(record.slice, TERMINATED, None, "its deletion was under way"))
        elif record.state in _UNFINISHED or (record.state == RUNNING and not self._backend.exists(record.slice)):
            why = INTERRUPTED if record.state in _UNFINISHED else VANISHED
            self._discard(record.slice)
            self._enter(record.slice, record.lease_id, FAILED, why)
            actions.append(RecoveryAction(record.slice, record.state, FAILED, why))
        elif record.state == FAILED and self._backend.exists(record.slice):
            self._discard(record.slice)
            actions.append(RecoveryAction(record.slice, FAILED, FAILED, "its leftover sandbox was deleted"))

    # -- manageability --------------------------------------------------------------------------------

    @property
    def capacity_slots(self) -> int:
        return self._manager.capacity_slots

    def slots_in_use(self) -> int:
        return self._manager.slots_in_use()

    def slivers_by_state(self) -> dict[str, int]:
        """Count of recorded slivers per lifecycle state (every state of :data:`LIFECYCLE`, zeros included)."""
        counts = dict.fromkeys(LIFECYCLE, 0)
        for record in self._store.slivers():
            counts[record.state] = counts.get(record.state, 0) + 1
        return counts

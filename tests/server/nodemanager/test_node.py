"""Node service: owner, sliver lifecycle and its events, keys, reaping, crash recovery at every step."""
from __future__ import annotations

import sqlite3

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from dsmt.server.agent.tickets import sign_ticket
from dsmt.server.faults import refusal_fault
from dsmt.server.nodemanager.core import AdmissionRefused, NodeManager, NoLease
from dsmt.server.nodemanager.node import (
    FAILED, INTERRUPTED, RUNNING, TERMINATED, BadLease, InvalidKey, NodeService, NoSliver, NotOwner, SliverFailed,
    SliverInfo,
)
from dsmt.server.nodemanager.sliver import DirectorySandbox, SliverError
from dsmt.server.nodemanager.sshkeys import generate_slice_keypair
from dsmt.server.nodemanager.store import LeaseStore
from dsmt.server.statusevents import parse_pairs

from ..agent.support import NOW, parties, ticket

NODE = "141.213.4.201"
SLICE = "oceanstore"
ALICE = "CN=alice,O=dsmt"
BOB = "CN=bob,O=dsmt"
LEASELEN = 3600
CREATE_STATES = ["requested", "instantiated", "initialized", "running"]


class Clock:
    def __init__(self, t=NOW):
        self.t = t

    def __call__(self):
        return self.t


class Crash(BaseException):
    """kill -9: nothing after this point runs (not an Exception, so no handler of the service sees it)."""


def signed(**changes) -> bytes:
    party = parties().agent
    changes.setdefault("leaselen", LEASELEN)
    return sign_ticket(ticket(party, **changes), party.key, party.cert)


def user_key(comment="alice@laptop") -> str:
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}"


KEYPAIR = generate_slice_keypair(SLICE)


class World:
    """A node service on files under ``tmp_path``; :meth:`restart` builds a new one on the same files."""

    def __init__(self, tmp_path, backend_class=DirectorySandbox):
        self.db, self.root = str(tmp_path / "nm.sqlite"), tmp_path / "slivers"
        self.root.mkdir()
        self.clock = Clock()
        self.events = []
        self.crash_on = None                # a status: publishing it crashes (after it was persisted)
        self.store = None
        self.restart(backend_class)

    def publish(self, event):
        self.events.append(event)
        if self.crash_on is not None and parse_pairs(event.payload.value)["status"] == self.crash_on:
            raise Crash(self.crash_on)

    def restart(self, backend_class=DirectorySandbox):
        if self.store is not None:
            self.store.close()
        self.store = LeaseStore(self.db)
        self.manager = NodeManager(NODE, parties().trust, self.store, self.clock, capacity_slots=4)
        self.backend = backend_class(str(self.root))
        self.node = NodeService(self.manager, self.backend, self.publish)
        self.crash_on = None
        self.events.clear()
        return self.node

    def statuses(self):
        return [parse_pairs(event.payload.value)["status"] for event in self.events]

    def leased(self, owner=ALICE, **changes):
        return self.node.redeem(signed(**changes), owner)

    def created(self, owner=ALICE):
        lease = self.leased(owner)
        info = self.node.create_sliver(SLICE, lease.lease_id, KEYPAIR.public_line, KEYPAIR.private_openssh, owner)
        self.events.clear()
        return lease, info


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.store.close()


def exact_value(status, slice_name=SLICE):
    return (f"hostname={NODE},component=org.dsmt.component.sliver-mgr,managed=org.dsmt.component.container,"
            f"slice={slice_name},status={status}")


# -- redeem and owner ---------------------------------------------------------------------------------


def test_redeem_records_owner_and_same_ticket_by_another_subject_is_refused(world):
    data = signed()
    lease = world.node.redeem(data, ALICE)
    assert lease.owner == ALICE and world.store.by_slice(SLICE).owner == ALICE
    assert world.node.redeem(data, ALICE) == lease
    for other in (BOB, None):
        with pytest.raises(NotOwner) as exc:
            world.node.redeem(data, other)
        assert exc.value.code == "not-owner"


def test_unsigned_lease_has_no_owner_check(world):
    lease = world.leased(owner=None)
    assert lease.owner is None
    info = world.node.create_sliver(SLICE, lease.lease_id, None, None, BOB)
    assert info.state == RUNNING
    assert world.node.renew(SLICE, "CN=anyone").lease_id == lease.lease_id


def test_old_database_gains_owner_column(tmp_path):
    path = str(tmp_path / "old.sqlite")
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE leases (lease_id TEXT PRIMARY KEY, ticket_id TEXT NOT NULL UNIQUE, slice TEXT NOT NULL UNIQUE,
            node TEXT NOT NULL, slots INTEGER NOT NULL, granted_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
            leaselen INTEGER NOT NULL, state TEXT NOT NULL);
        INSERT INTO leases VALUES ('L1', 'T-1', 'oceanstore', '141.213.4.201', 1, 10, 20, 10, 'active');
    """)
    db.commit()
    db.close()
    store = LeaseStore(path)
    assert store.by_slice(SLICE).owner is None and store.by_slice(SLICE).lease_id == "L1"
    store.close()
    store = LeaseStore(path)                # a second open migrates nothing
    assert [row[1] for row in store._db.execute("PRAGMA table_info(leases)")].count("owner") == 1
    store.close()


def test_redeem_reaps_first_when_a_term_has_ended(world):
    world.created()
    world.clock.t = NOW + LEASELEN
    lease = world.node.redeem(signed(ticket_id="T-2"), BOB)
    assert lease.owner == BOB and lease.ticket_id == "T-2"
    assert world.statuses() == ["terminated"] and not world.backend.exists(SLICE)


def test_admission_refusals_pass_through(world):
    with pytest.raises(AdmissionRefused) as exc:
        world.node.redeem(b"<not a ticket", ALICE)
    assert exc.value.code == "malformed"
    assert str(refusal_fault(exc.value).faultcode) == "Client.AdmissionRefused.malformed"


# -- CreateSliver ---------------------------------------------------------------------------------------


def test_create_walks_the_lifecycle_with_exact_events(world):
    lease = world.leased()
    info = world.node.create_sliver(SLICE, lease.lease_id, KEYPAIR.public_line, KEYPAIR.private_openssh, ALICE)
    assert info == SliverInfo(SLICE, NODE, RUNNING, lease.lease_id, lease.expires_at, 0)
    assert world.statuses() == CREATE_STATES
    for event, status in zip(world.events, CREATE_STATES):
        assert event.channel == f"/org/dsmt/ns/deployment/{SLICE}/org.dsmt.component.sliver-mgr/status/"
        assert (event.payload.field, event.payload.value) == ("deployment-status", exact_value(status))
        assert (event.to_service, event.from_service, event.from_instance) == (f"{SLICE}_mgr", f"{SLICE}_mgr", NODE)
    assert world.backend.exists(SLICE)
    assert world.store.sliver(SLICE).state == RUNNING
    assert world.node.get_sliver(SLICE) == info and world.node.list_slivers() == [info]


def test_create_again_is_idempotent_without_events(world):
    lease, info = world.created()
    again = world.node.create_sliver(SLICE, lease.lease_id, KEYPAIR.public_line, KEYPAIR.private_openssh, ALICE)
    assert again == info and world.events == []


def test_create_without_slice_key_pair(world):
    lease = world.leased()
    assert world.node.create_sliver(SLICE, lease.lease_id, None, None, ALICE).state == RUNNING


@pytest.mark.parametrize("how, refusal, code, fault", [
    ("no-lease", NoLease, "no-lease", "Client.NoLease"),
    ("bad-lease", BadLease, "bad-lease", "Client.BadLease"),
    ("not-owner", NotOwner, "not-owner", "Client.NotOwner"),
    ("unsigned", NotOwner, "not-owner", "Client.NotOwner"),
    ("public-only", InvalidKey, "invalid-key", "Client.InvalidKey"),
    ("mismatch", InvalidKey, "invalid-key", "Client.InvalidKey"),
    ("garbage-private", InvalidKey, "invalid-key", "Client.InvalidKey"),
    ("huge-private", InvalidKey, "invalid-key", "Client.InvalidKey"),
    ("options-in-public", InvalidKey, "invalid-key", "Client.InvalidKey"),
])
def test_create_refusals_change_nothing(world, how, refusal, code, fault):
    lease = world.leased()
    slice_name, lease_id, public, private, caller = (SLICE, lease.lease_id, KEYPAIR.public_line,
                                                     KEYPAIR.private_openssh, ALICE)
    if how == "no-lease":
        slice_name = "x" * 100_000
    elif how == "bad-lease":
        lease_id = "L" * 100_000
    elif how == "not-owner":
        caller = BOB
    elif how == "unsigned":
        caller = None
    elif how == "public-only":
        private = None
    elif how == "mismatch":
        public = generate_slice_keypair(SLICE).public_line
    elif how == "garbage-private":
        private = b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
    elif how == "huge-private":
        private = b"A" * 10_000_000
    elif how == "options-in-public":
        public = 'command="/bin/sh" ' + public
    with pytest.raises(refusal) as exc:
        world.node.create_sliver(slice_name, lease_id, public, private, caller)
    assert exc.value.code == code and str(refusal_fault(exc.value).faultcode) == fault
    assert len(exc.value.reason) < 300
    assert world.events == [] and world.store.sliver(SLICE) is None and not world.backend.exists(SLICE)


def test_create_on_expired_lease_is_no_lease(world):
    lease = world.leased()
    world.clock.t = lease.expires_at
    with pytest.raises(NoLease):
        world.node.create_sliver(SLICE, lease.lease_id, None, None, ALICE)


class FailingCreate(DirectorySandbox):
    def create(self, slice_name, keypair=None):
        super().create(slice_name, keypair)
        raise SliverError("backend", "cannot set the resource limits: operation not permitted")


class OsErrorCreate(DirectorySandbox):
    def create(self, slice_name, keypair=None):
        super().create(slice_name, keypair)
        raise PermissionError(13, "Permission denied", "/srv/slivers/oceanstore")


@pytest.mark.parametrize("backend_class, code, reason", [
    (FailingCreate, "backend", "cannot set the resource limits: operation not permitted"),
    (OsErrorCreate, "backend", "Permission denied: /srv/slivers/oceanstore"),
])
def test_backend_failure_fails_rolls_back_and_retry_works(world, backend_class, code, reason):
    world.restart(backend_class)
    lease = world.leased()
    with pytest.raises(SliverFailed) as exc:
        world.node.create_sliver(SLICE, lease.lease_id, None, None, ALICE)
    assert (exc.value.code, exc.value.reason) == (code, reason)
    assert str(refusal_fault(exc.value).faultcode) == "Client.SliverFailed"
    assert world.statuses() == ["requested", "failed"]
    assert world.events[-1].payload.value == exact_value("failed")
    assert not world.backend.exists(SLICE)
    info = world.node.get_sliver(SLICE)
    assert (info.state, info.reason, info.keys, info.lease_id) == (FAILED, reason, 0, lease.lease_id)
    assert world.store.by_slice(SLICE) == lease                 # lease held, no sliver
    world.restart()
    assert world.node.create_sliver(SLICE, lease.lease_id, None, None, ALICE).state == RUNNING
    assert world.statuses() == CREATE_STATES


# -- DeleteSliver ---------------------------------------------------------------------------------------


def test_delete_sliver_releases_lease_and_publishes_terminated(world):
    lease, _ = world.created()
    info = world.node.delete_sliver(SLICE, ALICE)
    assert (info.state, info.lease_id, info.keys) == (TERMINATED, lease.lease_id, 0)
    assert world.statuses() == ["terminated"] and world.events[0].payload.value == exact_value("terminated")
    assert not world.backend.exists(SLICE) and world.store.by_slice(SLICE) is None
    assert world.store.sliver(SLICE) is None
    with pytest.raises(NoSliver) as exc:
        world.node.get_sliver(SLICE)
    assert str(refusal_fault(exc.value).faultcode) == "Client.NoSliver"
    with pytest.raises(NoLease):
        world.node.delete_sliver(SLICE, ALICE)


def test_delete_lease_without_sliver(world):
    lease = world.leased()
    info = world.node.delete_sliver(SLICE, ALICE)
    assert (info.state, info.lease_id) == (TERMINATED, lease.lease_id)
    assert world.events == [] and world.store.by_slice(SLICE) is None


def test_delete_by_non_owner_refused(world):
    world.created()
    with pytest.raises(NotOwner):
        world.node.delete_sliver(SLICE, BOB)
    assert world.backend.exists(SLICE) and world.events == []


def test_delete_after_failed_create_publishes_terminated(world):
    world.restart(FailingCreate)
    lease = world.leased()
    with pytest.raises(SliverFailed):
        world.node.create_sliver(SLICE, lease.lease_id, None, None, ALICE)
    world.events.clear()
    assert world.node.delete_sliver(SLICE, ALICE).state == TERMINATED
    assert world.statuses() == ["terminated"] and world.store.sliver(SLICE) is None


# -- keys and renew ------------------------------------------------------------------------------------


def test_add_del_nuke_keys(world):
    world.created()
    a, b = user_key("a@x"), user_key("b@y")
    assert world.node.add_key(SLICE, a, ALICE) == 1
    assert world.node.add_key(SLICE, b, ALICE) == 2
    assert world.node.get_sliver(SLICE).keys == 2
    assert world.node.del_key(SLICE, a, ALICE) == 1
    assert world.node.nuke_keys(SLICE, ALICE) == 0
    assert world.node.get_sliver(SLICE).keys == 0
    assert world.events == []


@pytest.mark.parametrize("line", ["", "ssh-dss AAAA", "x" * 100_000, user_key() + "\nssh-ed25519 AAAA",
                                  'command="rm -rf /" ' + user_key()])
def test_bad_user_key_is_invalid_key(world, line):
    world.created()
    with pytest.raises(InvalidKey) as exc:
        world.node.add_key(SLICE, line, ALICE)
    assert exc.value.code == "invalid-key" and len(exc.value.reason) < 300
    assert world.node.get_sliver(SLICE).keys == 0


def test_key_operations_need_a_running_sliver_and_the_owner(world):
    with pytest.raises(NoSliver):
        world.node.add_key(SLICE, user_key(), ALICE)
    lease = world.leased()
    with pytest.raises(NoSliver):
        world.node.nuke_keys(SLICE, ALICE)
    world.node.create_sliver(SLICE, lease.lease_id, None, None, ALICE)
    for call in (lambda: world.node.add_key(SLICE, user_key(), BOB), lambda: world.node.nuke_keys(SLICE, None),
                 lambda: world.node.del_key(SLICE, user_key(), BOB)):
        with pytest.raises(NotOwner):
            call()


def test_renew_owner_only(world):
    lease = world.leased()
    world.clock.t += 100
    with pytest.raises(NotOwner):
        world.node.renew(SLICE, BOB)
    assert world.node.renew(SLICE, ALICE).expires_at == NOW + 100 + LEASELEN
    with pytest.raises(NoLease) as exc:
        world.node.renew("nothing", ALICE)
    assert exc.value.code == "no-lease"
    assert world.store.by_slice(SLICE).expires_at == lease.expires_at + 100


# -- reaping ------------------------------------------------------------------------------------------


def test_reap_at_exact_expiry(world):
    assert world.node.next_expiry() is None
    lease, _ = world.created()
    world.node.redeem(signed(ticket_id="T-2", slice_name="other", leaselen=2 * LEASELEN), None)
    assert world.node.next_expiry() == lease.expires_at
    world.clock.t = lease.expires_at - 1
    assert world.node.reap() == [] and world.events == []
    world.clock.t = lease.expires_at
    reaped = world.node.reap()
    assert [(i.slice, i.state, i.lease_id) for i in reaped] == [(SLICE, TERMINATED, lease.lease_id)]
    assert world.statuses() == ["terminated"] and not world.backend.exists(SLICE)
    assert world.store.by_slice(SLICE) is None and world.store.sliver(SLICE) is None
    assert world.node.next_expiry() == NOW + 2 * LEASELEN
    assert world.node.reap() == []


def test_reap_of_lease_without_sliver_publishes_nothing(world):
    lease = world.leased()
    world.clock.t = lease.expires_at
    assert [i.slice for i in world.node.reap()] == [SLICE] and world.events == []


# -- metrics -------------------------------------------------------------------------------------------


def test_capacity_and_state_counts(world):
    world.created()
    world.node.redeem(signed(ticket_id="T-2", slice_name="beta", resources={"slots": 2}), None)
    assert (world.node.capacity_slots, world.node.slots_in_use()) == (4, 3)
    counts = world.node.slivers_by_state()
    assert counts["running"] == 1 and sum(counts.values()) == 1 and "failed" in counts


# -- crash recovery ------------------------------------------------------------------------------------


def assert_rolled_back(world, lease):
    """Recovery rule 3: lease held, no sliver, record failed, ``failed`` published; a retry then works."""
    assert world.statuses() == ["failed"]
    assert not world.backend.exists(SLICE) and world.store.by_slice(SLICE) == lease
    info = world.node.get_sliver(SLICE)
    assert (info.state, info.reason) == (FAILED, INTERRUPTED)
    world.events.clear()
    assert world.node.create_sliver(SLICE, lease.lease_id, KEYPAIR.public_line, KEYPAIR.private_openssh,
                                    ALICE).state == RUNNING
    assert world.statuses() == CREATE_STATES


@pytest.mark.parametrize("crash_on", CREATE_STATES)
def test_crash_after_each_persisted_state(world, crash_on):
    lease = world.leased()
    world.crash_on = crash_on
    with pytest.raises(Crash):
        world.node.create_sliver(SLICE, lease.lease_id, KEYPAIR.public_line, KEYPAIR.private_openssh, ALICE)
    assert world.store.sliver(SLICE).state == crash_on
    world.restart()
    report = world.node.recover()
    if crash_on == RUNNING:
        assert report.actions == [] and world.events == []
        assert world.node.get_sliver(SLICE).state == RUNNING and world.backend.exists(SLICE)
    else:
        assert [(a.slice, a.before, a.after) for a in report.actions] == [(SLICE, crash_on, FAILED)]
        assert_rolled_back(world, lease)


class CrashInCreate(DirectorySandbox):
    """Dies after making the sandbox, before the service records ``instantiated``."""

    def create(self, slice_name, keypair=None):
        super().create(slice_name, keypair)
        raise Crash("create")


def test_crash_inside_backend_create(world):
    world.restart(CrashInCreate)
    lease = world.leased()
    with pytest.raises(Crash):
        world.node.create_sliver(SLICE, lease.lease_id, KEYPAIR.public_line, KEYPAIR.private_openssh, ALICE)
    assert world.store.sliver(SLICE).state == "requested" and world.backend.exists(SLICE)
    world.restart()
    world.node.recover()
    assert_rolled_back(world, lease)


class CrashBeforeDelete(DirectorySandbox):
    def delete(self, slice_name):
        raise Crash("delete")


class CrashAfterDelete(DirectorySandbox):
    def delete(self, slice_name):
        super().delete(slice_name)
        raise Crash("delete")


@pytest.mark.parametrize("backend_class", [CrashBeforeDelete, CrashAfterDelete])
def test_crash_during_delete_is_finished_by_recover(world, backend_class):
    lease, _ = world.created()
    world.restart(backend_class)
    with pytest.raises(Crash):
        world.node.delete_sliver(SLICE, ALICE)
    assert world.store.sliver(SLICE).state == TERMINATED and world.store.by_slice(SLICE) == lease
    world.restart()
    report = world.node.recover()
    assert [(a.before, a.after) for a in report.actions] == [(TERMINATED, None)]
    assert world.statuses() == ["terminated"]
    assert not world.backend.exists(SLICE) and world.store.by_slice(SLICE) is None
    assert world.store.sliver(SLICE) is None


def test_crash_during_reap_leaves_no_orphan(world):
    lease, _ = world.created()
    world.restart(CrashBeforeDelete)
    world.clock.t = lease.expires_at
    with pytest.raises(Crash):
        world.node.reap()
    assert world.store.by_slice(SLICE) is None and world.store.sliver(SLICE).state == RUNNING
    world.restart()
    report = world.node.recover()
    assert [(a.slice, a.before, a.after) for a in report.actions] == [(SLICE, RUNNING, None)]
    assert world.statuses() == ["terminated"]
    assert not world.backend.exists(SLICE) and world.store.sliver(SLICE) is None


def test_recover_deletes_sandbox_without_record_and_keeps_leases(world):
    lease, _ = world.created()
    other = world.node.redeem(signed(ticket_id="T-2", slice_name="beta"), None)
    world.backend.create("stray", None)             # no lease, no record
    world.backend.create("beta", None)              # a lease, but no record: never announced
    world.restart()
    report = world.node.recover()
    assert sorted((a.slice, a.before, a.after) for a in report.actions) == [("beta", None, None),
                                                                            ("stray", None, None)]
    assert world.events == []
    assert world.backend.list() == [SLICE]
    assert world.store.by_slice(SLICE) == lease and world.store.by_slice("beta") == other
    assert world.node.get_sliver(SLICE).state == RUNNING


def test_recover_running_whose_sandbox_vanished(world):
    lease, _ = world.created()
    world.backend.delete(SLICE)
    world.restart()
    report = world.node.recover()
    assert [(a.before, a.after) for a in report.actions] == [(RUNNING, FAILED)]
    assert world.statuses() == ["failed"] and world.store.by_slice(SLICE) == lease


def test_recover_on_clean_state_does_nothing(world):
    world.created()
    world.restart()
    assert world.node.recover().actions == [] and world.events == []
    assert world.node.recover().actions == []


def test_crash_leaving_a_half_built_sandbox(world):
    lease = world.leased()
    world.crash_on = "requested"
    with pytest.raises(Crash):
        world.node.create_sliver(SLICE, lease.lease_id, None, None, ALICE)
    (world.root / f".creating-{SLICE}" / "home" / ".ssh").mkdir(parents=True)     # killed inside create()
    world.restart()
    report = world.node.recover()
    assert report.backend.removed == (f".creating-{SLICE}",)
    assert [(a.before, a.after) for a in report.actions] == [("requested", FAILED)]
    assert sorted(p.name for p in world.root.iterdir()) == []
    assert_rolled_back(world, lease)


# -- hostile input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc", "x" * 1_000_000, "", "root", "a/b", "Ocean\x00store"])
def test_hostile_slice_names_are_precise_refusals(world, name):
    world.created()
    for call, refusal in [(lambda: world.node.get_sliver(name), NoSliver),
                          (lambda: world.node.delete_sliver(name, ALICE), NoLease),
                          (lambda: world.node.renew(name, ALICE), NoLease),
                          (lambda: world.node.add_key(name, user_key(), ALICE), NoSliver),
                          (lambda: world.node.nuke_keys(name, ALICE), NoSliver),
                          (lambda: world.node.create_sliver(name, "L", None, None, ALICE), NoLease)]:
        with pytest.raises(refusal) as exc:
            call()
        assert len(exc.value.reason) < 200
    assert world.events == [] and world.backend.list() == [SLICE]


def test_sandbox_replaced_by_a_link_fails_delete_precisely(world, tmp_path):
    lease, _ = world.created()
    (world.root / SLICE).rename(tmp_path / "moved")
    (world.root / SLICE).symlink_to(tmp_path / "moved")
    with pytest.raises(SliverFailed) as exc:
        world.node.delete_sliver(SLICE, ALICE)
    assert exc.value.code == "backend" and "symbolic link" in exc.value.reason
    assert world.store.by_slice(SLICE) == lease and world.events == []


def test_recover_removes_a_failed_slivers_leftover_sandbox(world):
    world.restart(FailingCreate)
    lease = world.leased()
    with pytest.raises(SliverFailed):
        world.node.create_sliver(SLICE, lease.lease_id, None, None, ALICE)
    DirectorySandbox(str(world.root)).create(SLICE, None)      # e.g. a rollback cut short
    world.restart()
    report = world.node.recover()
    assert [(a.before, a.after) for a in report.actions] == [(FAILED, FAILED)]
    assert world.events == [] and not world.backend.exists(SLICE) and world.store.by_slice(SLICE) == lease

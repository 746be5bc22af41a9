"""Node manager core: redeem, idempotence, refusals, renew, reap, durability."""
from __future__ import annotations

import pytest

from dsmt.server.agent.tickets import sign_ticket
from dsmt.server.nodemanager.core import AdmissionRefused, NodeManager, NoLease
from dsmt.server.nodemanager.store import LeaseStore

from ..agent.support import NOW, parties, ticket

NODE = "141.213.4.201"
DAY = 86400


class Clock:
    def __init__(self, t=NOW):
        self.t = t

    def __call__(self):
        return self.t


def signed(party=None, **changes) -> bytes:
    party = party or parties().agent
    return sign_ticket(ticket(party, **changes), party.key, party.cert)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "nm.sqlite")


def manager(path, clock, **kw):
    kw.setdefault("capacity_slots", 4)
    return NodeManager(NODE, parties().trust, LeaseStore(path), clock, **kw)


def test_redeem_happy_path(path):
    nm = manager(path, Clock())
    lease = nm.redeem(signed(leaselen=3600))
    assert (lease.slice, lease.node, lease.slots, lease.granted_at, lease.expires_at, lease.leaselen) == \
        ("oceanstore", NODE, 1, NOW, NOW + 3600, 3600)
    assert nm.leases() == [lease] and nm.expirations() == {"oceanstore": NOW + 3600}


def test_redeem_is_idempotent_also_after_reopen(path):
    clock = Clock()
    nm = manager(path, clock)
    data = signed()
    first = nm.redeem(data)
    clock.t += 10
    assert nm.redeem(data) == first
    nm._store.close()                       # crash: nothing else
    again = manager(path, clock)
    assert again.redeem(data) == first and again.leases() == [first]


@pytest.mark.parametrize("make, code", [
    (lambda: signed(parties().rogue), "untrusted-issuer"),
    (lambda: signed().replace(b"oceanstore", b"oceanstorf"), "bad-signature"),
    (lambda: signed(not_before=NOW - 7200, not_after=NOW - 3600), "expired"),
    (lambda: signed(node="10.0.0.1"), "wrong-node"),
    (lambda: b"\x00garbage<not xml", "malformed"),
    (lambda: b"", "malformed"),
])
def test_bad_tickets_refused_with_precise_codes(path, make, code):
    nm = manager(path, Clock())
    with pytest.raises(AdmissionRefused) as exc:
        nm.redeem(make())
    assert exc.value.code == code
    assert nm.leases() == []


def test_capacity_refusal_changes_nothing(path):
    nm = manager(path, Clock(), capacity_slots=3)
    held = nm.redeem(signed(ticket_id="A", slice_name="alpha", resources={"slots": 2}))
    with pytest.raises(AdmissionRefused) as exc:
        nm.redeem(signed(ticket_id="B", slice_name="beta", resources={"slots": 2}))
    assert exc.value.code == "capacity"
    assert nm.leases() == [held]
    assert nm.redeem(signed(ticket_id="C", slice_name="gamma", resources={"slots": 1})).slots == 1


def test_policy_refusal(path):
    nm = manager(path, Clock(), policy=lambda t: "slice is denied" if t.slice_name == "oceanstore" else None)
    with pytest.raises(AdmissionRefused) as exc:
        nm.redeem(signed())
    assert (exc.value.code, exc.value.reason) == ("policy", "slice is denied")
    assert nm.leases() == []


def test_second_ticket_for_leased_slice_refused(path):
    nm = manager(path, Clock())
    nm.redeem(signed(ticket_id="A"))
    with pytest.raises(AdmissionRefused) as exc:
        nm.redeem(signed(ticket_id="B"))
    assert exc.value.code == "already-leased"


def test_renew_extends_from_now(path):
    clock = Clock()
    nm = manager(path, clock)
    nm.redeem(signed(leaselen=3600))
    clock.t += 1000
    renewed = nm.renew("oceanstore")
    assert renewed.expires_at == NOW + 1000 + 3600
    clock.t = renewed.expires_at
    with pytest.raises(NoLease):
        nm.renew("oceanstore")


def test_reap_at_exact_expiry(path):
    clock = Clock()
    nm = manager(path, clock)
    lease = nm.redeem(signed(leaselen=3600))
    clock.t = NOW + 3599
    assert nm.reap() == [] and nm.leases() == [lease]
    clock.t = NOW + 3600
    assert nm.leases() == []
    assert nm.reap() == [lease]
    assert nm.reap() == []


def test_lease_capped(path):
    nm = manager(path, Clock(), max_lease_seconds=7 * DAY)
    assert nm.redeem(signed(leaselen=14 * DAY)).leaselen == 7 * DAY
    nm2 = manager(path + "2", Clock())
    assert nm2.redeem(signed(leaselen=14 * DAY)).expires_at == NOW + 14 * DAY


def test_release(path):
    nm = manager(path, Clock())
    lease = nm.redeem(signed())
    assert nm.release("oceanstore") == lease and nm.leases() == []
    with pytest.raises(NoLease):
        nm.release("oceanstore")


def test_store_reopen_keeps_everything(path):
    clock = Clock()
    nm = manager(path, clock, capacity_slots=2)
    a = nm.redeem(signed(ticket_id="A", slice_name="alpha"))
    clock.t += 5
    b = nm.redeem(signed(ticket_id="B", slice_name="beta"))
    nm.renew("alpha")
    nm._store.close()
    again = manager(path, clock, capacity_slots=2)
    leases = {l.slice: l for l in again.leases()}
    assert leases["beta"] == b and leases["alpha"].expires_at == NOW + 5 + a.leaselen
    with pytest.raises(AdmissionRefused) as exc:
        again.redeem(signed(ticket_id="C", slice_name="gamma"))
    assert exc.value.code == "capacity"


def test_released_or_reaped_ticket_cannot_be_redeemed_again(path):
    clock = Clock()
    nm = manager(path, clock)
    data = signed(leaselen=60)
    nm.redeem(data)
    nm.release("oceanstore")
    with pytest.raises(AdmissionRefused) as exc:
        nm.redeem(data)
    assert exc.value.code == "replayed"
    other = signed(ticket_id="T-2", leaselen=60)
    nm.redeem(other)
    clock.t += 60
    assert len(nm.reap()) == 1
    with pytest.raises(AdmissionRefused) as exc:
        manager(path, clock).redeem(other)
    assert exc.value.code == "replayed"


def test_new_ticket_after_expiry_needs_reap_first(path):
    clock = Clock()
    nm = manager(path, clock)
    old = nm.redeem(signed(ticket_id="A", leaselen=60))
    clock.t += 60
    with pytest.raises(AdmissionRefused) as exc:
        nm.redeem(signed(ticket_id="B", leaselen=60))
    assert exc.value.code == "already-leased"
    assert nm.reap() == [old]
    assert nm.redeem(signed(ticket_id="B", leaselen=60)).ticket_id == "B"

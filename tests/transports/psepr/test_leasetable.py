"""Lease table: subtree delivery, filters, narrowing, grant caps, renewal and expiry on a fake clock."""
import pytest
from hypothesis import given, strategies as st

from dsmt.transports.psepr.channel import ChannelError
from dsmt.transports.psepr.event import ATTRIBUTE_NS, LEASE_NS, LEGACY_ATTRIBUTE_NS
from dsmt.transports.psepr.leasetable import LeaseError, LeaseTable
from tests.support.psepr import FakeClock


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def table(clock):
    return LeaseTable(clock=clock, max_duration=600)


def test_subtree_delivery_and_sibling_safety(table):
    table.grant("root", "l", "/", 60)
    table.grant("slice", "l", "/org/dsmt/ns/deployment/xyz1/", 60)
    table.grant("exact", "l", "/org/dsmt/ns/deployment/xyz1/comp/status/", 60)
    table.grant("ten", "l", "/org/dsmt/ns/deployment/xyz10/", 60)
    table.grant("evil", "l", "/org/dsmt/ns/deployment/xyz1.evil/", 60)
    assert table.receivers("/org/dsmt/ns/deployment/xyz1/comp/status/") == ["root", "slice", "exact"]
    assert table.receivers("/org/dsmt/ns/deployment/xyz1/") == ["root", "slice"]
    assert table.receivers("/org/dsmt/ns/deployment/xyz10/") == ["root", "ten"]
    assert table.receivers("/org/dsmt/ns/deployment/xyz1.evil/a/") == ["root", "evil"]
    assert table.receivers("/org/") == ["root"]


def test_payload_type_filter_accepts_legacy_spelling(table):
    table.grant("attrs", "l", "/a/", 60, payload_type=LEGACY_ATTRIBUTE_NS)
    table.grant("leases", "l", "/a/", 60, payload_type=LEASE_NS)
    table.grant("all", "l", "/a/", 60, payload_type="")
    assert table.receivers("/a/b/", ATTRIBUTE_NS) == ["attrs", "all"]
    assert table.receivers("/a/b/", LEGACY_ATTRIBUTE_NS) == ["attrs", "all"]
    assert table.receivers("/a/b/", "urn:other") == ["all"]


def test_service_and_instance_narrowing(table):
    table.grant("h1", "l", "/s/", 60, service="xyz1_mgr", instance="node1")
    table.grant("h2", "l", "/s/", 60, service="xyz1_mgr", instance="node2")
    table.grant("h3", "l", "/s/", 60, service="other", instance="node1")
    assert table.receivers("/s/") == ["h1", "h2", "h3"]
    assert table.receivers("/s/", to_service="xyz1_mgr") == ["h1", "h2"]
    assert table.receivers("/s/", to_instance="node1") == ["h1", "h3"]
    assert table.receivers("/s/", to_service="xyz1_mgr", to_instance="node2") == ["h2"]
    assert table.receivers("/s/", to_service="nobody") == []


def test_a_holder_is_listed_once(table):
    table.grant("h", "one", "/a/", 60)
    table.grant("h", "two", "/a/b/", 60)
    assert table.receivers("/a/b/c/") == ["h"]


def test_grant_is_capped_and_renew_extends(table, clock):
    lease = table.grant("h", "l", "/a/", 7200)
    assert lease.duration == 600 and lease.expires_at == 1600
    clock.now = 1500
    renewed = table.grant("h", "l", "/a/", 100)
    assert renewed.expires_at == 1600 and len(table) == 1
    clock.now = 1599
    assert table.receivers("/a/") == ["h"]
    clock.now = 1600
    assert table.receivers("/a/") == []  # lapsed, even before the reaper runs
    assert [lease.identifier for lease in table.expire()] == ["l"]
    assert len(table) == 0 and table.next_expiry() is None


def test_renewal_with_another_channel_moves_the_lease(table):
    table.grant("h", "l", "/a/", 60)
    table.grant("h", "l", "/b/", 60)
    assert table.receivers("/a/") == [] and table.receivers("/b/") == ["h"]


def test_expiry_order_and_stale_heap_entries(table, clock):
    table.grant("h", "short", "/a/", 10)
    table.grant("h", "long", "/a/", 100)
    table.grant("h", "short", "/a/", 50)  # renewal leaves a stale heap entry at t+10
    assert table.next_expiry() == 1050
    clock.now = 1060
    assert [lease.identifier for lease in table.expire()] == ["short"]
    assert table.next_expiry() == 1100


def test_release_and_release_holder(table):
    table.grant("h", "a", "/x/", 60)
    table.grant("h", "b", "/x/y/", 60)
    table.grant("g", "a", "/x/", 60)
    assert table.release("h", "a").channel == "/x/"
    assert table.release("h", "a") is None
    assert table.receivers("/x/y/") == ["g", "h"]  # root-most lease first
    assert len(table.release_holder("h")) == 1
    assert table.receivers("/x/y/") == ["g"] and table.holders() == 1


def test_bad_requests_are_refused(table):
    with pytest.raises(ChannelError):
        table.grant("h", "l", "/no//", 60)
    with pytest.raises(LeaseError, match="at least 1 second"):
        table.grant("h", "l", "/a/", 0)


def test_per_holder_limit(clock):
    table = LeaseTable(clock=clock, max_leases_per_holder=3)
    for n in range(3):
        table.grant("h", str(n), "/a/", 60)
    with pytest.raises(LeaseError, match="3 leases"):
        table.grant("h", "3", "/a/", 60)
    table.grant("h", "0", "/b/", 60)  # renewing an existing one is fine
    table.grant("g", "0", "/a/", 60)  # other holders are unaffected


@given(st.lists(st.tuples(st.sampled_from("hgk"), st.sampled_from("123"),
                          st.sampled_from(["/", "/a/", "/a/b/", "/ab/", "/a/b/c/"]),
                          st.booleans()), max_size=40))
def test_matches_a_brute_force_model(operations):
    """The trie answers exactly what a linear scan over live leases answers."""
    table = LeaseTable(clock=lambda: 0.0)
    model = {}
    for holder, identifier, channel, release in operations:
        if release:
            table.release(holder, identifier)
            model.pop((holder, identifier), None)
        else:
            table.grant(holder, identifier, channel, 60)
            model[(holder, identifier)] = channel
    for target in ["/", "/a/", "/a/b/", "/ab/", "/a/b/c/", "/a/b/c/d/", "/z/"]:
        expected = {holder for (holder, _), channel in model.items() if target.startswith(channel)}
        assert set(table.receivers(target)) == expected
    assert len(table) == len(model)

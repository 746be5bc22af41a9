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


# ---------------------------------------------------------------- the receivers cache

_CHANNELS = ["/", "/a/", "/a/b/", "/ab/", "/a/b/c/"]
_TARGETS = _CHANNELS + ["/a/b/c/d/", "/z/"]
_TYPES = [None, ATTRIBUTE_NS, LEGACY_ATTRIBUTE_NS, LEASE_NS]
_operations = st.lists(st.one_of(
    st.tuples(st.just("grant"), st.sampled_from("hgk"), st.sampled_from("12"), st.sampled_from(_CHANNELS),
              st.integers(1, 6), st.sampled_from(_TYPES), st.sampled_from([None, "s1", "s2"]),
              st.sampled_from([None, "i1"])),
    st.tuples(st.just("release"), st.sampled_from("hgk"), st.sampled_from("12")),
    st.tuples(st.just("release_holder"), st.sampled_from("hgk")),
    st.tuples(st.just("clock"), st.integers(-2, 4)),  # landing exactly on an expiry is common
    st.tuples(st.just("expire")),
    st.tuples(st.just("lookup"), st.sampled_from(_TARGETS), st.sampled_from(_TYPES + ["urn:x"]),
              st.sampled_from([None, "s1", "s2"]), st.sampled_from([None, "i1", "i2"])),
), max_size=60)


@given(_operations)
def test_cached_answers_match_a_model_through_changes_and_time(operations):
    """Lookups interleaved with grants, renewals, releases, reaping and clock moves (backwards too).

    The model is a plain list of live leases: a lease receives while ``expires_at > now``;
    holders come in lease order (root-most channel first, then in order of grant), each once.
    """
    from dsmt.transports.psepr.event import canonical_payload_type

    clock = FakeClock(100.0)
    table = LeaseTable(clock=clock, max_duration=600)
    model: dict[tuple, tuple] = {}  # (holder, identifier) -> (sequence, channel, type, service, instance, expires_at)
    sequence = 0

    def expected(target, payload_type=None, to_service=None, to_instance=None):
        payload_type = canonical_payload_type(payload_type)
        matching = sorted(
            (channel.count("/"), seq, holder)
            for (holder, _), (seq, channel, lease_type, service, instance, expires_at) in model.items()
            if target.startswith(channel) and expires_at > clock.now
            and (lease_type is None or lease_type == payload_type)
            and (to_service is None or service == to_service) and (to_instance is None or instance == to_instance))
        return list(dict.fromkeys(holder for _, _, holder in matching))

    for operation in operations:
        kind, *arguments = operation
        if kind == "grant":
            holder, identifier, channel, duration, payload_type, service, instance = arguments
            table.grant(holder, identifier, channel, duration, payload_type=payload_type, service=service,
                        instance=instance)
            sequence += 1
            model[(holder, identifier)] = (sequence, channel, canonical_payload_type(payload_type), service,
                                           instance, clock.now + duration)
        elif kind == "release":
            table.release(*arguments)
            model.pop(tuple(arguments), None)
        elif kind == "release_holder":
            table.release_holder(arguments[0])
            model = {key: value for key, value in model.items() if key[0] != arguments[0]}
        elif kind == "clock":
            clock.now += arguments[0]
        elif kind == "expire":
            table.expire()
            model = {key: value for key, value in model.items() if value[-1] > clock.now}
        else:
            assert table.receivers(*arguments) == expected(*arguments), (operation, clock.now)
        now = clock.now
        for shift in (0, 1, 0, -1, 0):  # the same keys again and again, a second on either side of now
            clock.now = now + shift
            for target in _TARGETS:
                assert table.receivers(target) == expected(target), (operation, target, clock.now)
                assert table.receivers(target, ATTRIBUTE_NS) == expected(target, ATTRIBUTE_NS), (operation, target)
        clock.now = now
    assert len(table) == len(model)


def test_cached_answer_lapses_exactly_at_the_earliest_expiry(table, clock):
    table.grant("long", "l", "/a/", 100)
    table.grant("short", "l", "/a/b/", 10)
    assert table.receivers("/a/b/") == ["long", "short"]
    clock.now = 1009.999
    assert table.receivers("/a/b/") == ["long", "short"]  # from the cache
    clock.now = 1010
    assert table.receivers("/a/b/") == ["long"]           # the short lease lapsed, no reaper needed
    clock.now = 1099
    assert table.receivers("/a/b/") == ["long"]
    clock.now = 1100
    assert table.receivers("/a/b/") == []


def test_every_change_is_a_new_generation(table, clock):
    def changes(action) -> bool:
        before = table.generation
        action()
        return table.generation > before

    assert changes(lambda: table.grant("h", "l", "/a/", 10))
    assert changes(lambda: table.grant("h", "l", "/a/", 20))  # renewal
    assert not changes(lambda: table.release("h", "nothing"))
    assert changes(lambda: table.release("h", "l"))
    table.grant("h", "m", "/a/", 10)
    assert changes(lambda: table.release_holder("h"))
    assert not changes(lambda: table.release_holder("h"))
    table.grant("h", "n", "/a/", 10)
    assert not changes(table.expire)  # nothing due
    clock.now += 10
    assert changes(table.expire)
    assert table.receivers("/a/") == []


def test_answers_are_the_callers_to_keep(table):
    table.grant("h", "l", "/a/", 60)
    answer = table.receivers("/a/")
    answer.append("intruder")
    assert table.receivers("/a/") == ["h"]
    table.receivers("/a/").clear()
    assert table.receivers("/a/") == ["h"]


def test_cache_holds_no_departed_holder():
    import gc
    import weakref

    class Holder:
        pass

    table = LeaseTable(clock=FakeClock())
    holder = Holder()
    table.grant(holder, "l", "/a/", 60)
    assert table.receivers("/a/") == [holder]
    table.release_holder(holder)
    table.next_expiry()  # drops the expiry heap's stale entry, which refers to the lease too
    gone = weakref.ref(holder)
    del holder
    gc.collect()
    assert gone() is None


def test_cache_is_bounded(clock):
    from dsmt.transports.psepr import leasetable

    table = LeaseTable(clock=clock)
    table.grant("h", "l", "/", 60)
    for number in range(leasetable.RECEIVERS_CACHE_SIZE + 10):
        assert table.receivers(f"/c{number}/") == ["h"]
        assert len(table._cache) <= leasetable.RECEIVERS_CACHE_SIZE
    long_type = "urn:" + "t" * leasetable.MAX_CACHED_KEY_CHARS
    table._cache.clear()
    assert table.receivers("/a/", long_type) == ["h"] and not table._cache  # answered, not remembered
    for number in range(leasetable.MAX_CACHED_HOLDERS):
        table.grant(f"h{number}", "l", "/big/", 60)
    assert len(table.receivers("/big/")) == leasetable.MAX_CACHED_HOLDERS + 1 and not table._cache

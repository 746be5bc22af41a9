"""Micro-benchmark of the router's per-event path without sockets: parse, look up, write.

One :class:`RouterCore` with logged-in :class:`RouterSession`\\ s whose ``send``
only counts bytes: ``--subscribers`` (default 1) lease
``/org/dsmt/ns/deployment/xyz1/`` as the throughput benchmark's subscribers do,
and one more session holds ``--other-leases`` (default 1,000) leases on sibling
slices, so the lease table is not trivially small.  A publisher session is fed
``--count`` (default 100,000) ~1 KB attribute events on the status channels of
50 hosts (``bench/psepr_throughput.py``'s traffic, same wire form as a
``PsEPRConnection`` sends) in 64 KiB chunks, as a socket read hands them over.

Prints µs per event for:

* ``parse``: the publisher's :class:`StreamParser` alone on the same bytes (these events are in the
  canonical form, so most take the parser's fast path; a stanza cut by a chunk boundary goes to expat);
* ``parse, expat only``: the same with ``fast_path=False``, every stanza through expat;
* ``receivers``: ``LeaseTable.receivers`` alone, for the 50 headers in turn;
* ``route``: ``RouterSession.data_received`` end to end (parse, checks,
  lookup, one write per receiver), and what that makes in events/s on one core.

Run: ``PYTHONPATH=.dev .venv/bin/python bench/router_route.py [--count N] [--subscribers N] [--profile]``
(``--profile`` prints the top of a cProfile of one ``route`` run).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from dsmt.transports.psepr import stream
from dsmt.transports.psepr.event import Event, LeasePayload, event_to_xml
from dsmt.transports.psepr.router import RouterCore, RouterSession
from _common import CHUNK_BYTES, STANZA_BYTES, best_of

HOSTS = 50
SLICE = "/org/dsmt/ns/deployment/xyz1/"
FIELD = "deployment-status"


def channel_of(host_number: int) -> str:
    return f"{SLICE}org.dsmt.component.sliver-mgr/status/planetlab{host_number}.nbgisp.com/"


def event_stanza(host_number: int) -> bytes:
    """An attribute event as ``PsEPRConnection`` sends it (from/service, from/instance), padded to ~1 KB.

    (Not ``_common.event_stanza``: routing needs the same channels as the leases set up here.)
    """
    def stanza(value: str) -> bytes:
        event = Event.attribute(channel_of(host_number), FIELD, value, from_service="bench",
                                from_instance="publisher.example.org")
        return stream.wrap_message(event_to_xml(event))

    prefix = f"hostname=planetlab{host_number}.nbgisp.com,status=running,detail="
    return stanza(prefix + "x" * max(0, STANZA_BYTES - len(stanza(prefix))))


def make_stream(count: int) -> bytes:
    """The events only (the publisher's header and login go in first, separately)."""
    stanzas = [event_stanza(host) for host in range(HOSTS)]
    return b"".join(stanzas[index % HOSTS] for index in range(count))


class Sink:
    """A session's ``send``: counts what would be written to the socket."""

    def __init__(self):
        self.writes = 0
        self.bytes = 0

    def __call__(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)


def logged_in(core: RouterCore, user: str, sink: Sink) -> RouterSession:
    session = RouterSession(core, sink, lambda: None)
    session.data_received(stream.stream_header(to="psepr"))
    session.data_received(stream.auth_request("login", user, "secret", "bench"))
    assert session.state == RouterSession.OPEN, session.state
    return session


def lease(session: RouterSession, identifier: str, channel: str) -> None:
    request = Event(channel, LeasePayload(identifier, 3600))
    session.data_received(stream.wrap_message(event_to_xml(request)))


def build(subscribers: int, other_leases: int):
    """A router core with its sessions; returns (core, publisher, subscriber sinks)."""
    core = RouterCore(accounts=None, clock=time.monotonic)  # accounts=None: every login accepted at once
    sinks = []
    for number in range(subscribers):
        sink = Sink()
        lease(logged_in(core, f"sub{number}", sink), "slice", SLICE)
        sinks.append(sink)
    others = logged_in(core, "others", Sink())
    for number in range(other_leases):
        lease(others, f"o{number}", f"/org/dsmt/ns/deployment/s{number}/")
    assert len(core.leases) == subscribers + other_leases
    publisher = logged_in(core, "bench", Sink())
    return core, publisher, sinks


def route(publisher: RouterSession, data: bytes) -> None:
    for start in range(0, len(data), CHUNK_BYTES):
        publisher.data_received(data[start:start + CHUNK_BYTES])


def parse_only(data: bytes, fast_path: bool = True) -> int:
    parser = stream.StreamParser(fast_path=fast_path)
    parser.feed(stream.stream_header(to="psepr"))
    stanzas = 0
    for start in range(0, len(data), CHUNK_BYTES):
        stanzas += len(parser.feed(data[start:start + CHUNK_BYTES]))
    return stanzas


def headers(count: int) -> list[tuple]:
    """The route headers of the events, as the parser makes them (new strings each time, like the router's)."""
    parser = stream.StreamParser()
    parser.feed(stream.stream_header(to="psepr"))
    found = [item.route for item in parser.feed(make_stream(HOSTS))]
    return [tuple(found[index % HOSTS]) for index in range(count)]


def lookups(core: RouterCore, routes: list[tuple]) -> None:
    receivers = core.leases.receivers
    for channel, to_service, to_instance, _, _, payload_type in routes:
        receivers(channel, payload_type, to_service, to_instance)


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--count", type=int, default=100_000)
    options.add_argument("--subscribers", type=int, default=1)
    options.add_argument("--other-leases", type=int, default=1000)
    options.add_argument("--runs", type=int, default=5, help="best of this many runs is reported")
    options.add_argument("--profile", action="store_true")
    args = options.parse_args()
    data = make_stream(args.count)
    core, publisher, sinks = build(args.subscribers, args.other_leases)
    count = args.count

    assert parse_only(data) == count
    parse_s = best_of(args.runs, parse_only, data)
    assert parse_only(data, False) == count
    expat_s = best_of(args.runs, parse_only, data, False)
    routes = headers(count)
    lookup_s = best_of(args.runs, lookups, core, routes)
    before = sum(sink.writes for sink in sinks)  # the stream header, login result and grant
    route_s = best_of(args.runs, route, publisher, data)
    delivered = sum(sink.writes for sink in sinks) - before
    assert delivered == args.runs * count * args.subscribers, delivered
    assert core.counters.undeliverable == 0 and core.counters.rejected == 0, core.counters

    size = len(event_stanza(0))
    print(f"{count:,} events of {size} bytes, {args.subscribers} subscriber(s), "
          f"{len(core.leases):,} leases; best of {args.runs}:")
    print(f"  {'parse':<18}{parse_s / count * 1e6:6.2f} µs/event")
    print(f"  {'parse, expat only':<18}{expat_s / count * 1e6:6.2f} µs/event")
    print(f"  {'receivers':<18}{lookup_s / count * 1e6:6.2f} µs/event")
    print(f"  {'route':<18}{route_s / count * 1e6:6.2f} µs/event  ({count / route_s:,.0f} events/s, "
          f"{count * args.subscribers / route_s:,.0f} deliveries/s)")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(route, publisher, data)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()

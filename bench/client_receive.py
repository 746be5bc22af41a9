"""Micro-benchmark of a subscriber's receive path: router stream bytes → Event → lease callback.

Everything a ``PsEPRConnection`` subscriber does per received event, in one
process and without sockets: ``--count`` (default 200,000) ~1 KB attribute
events, each in the ``<message>`` wrapper the router forwards, on
``/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-mgr/status/<host>/``
(as ``bench/stream_parse.py`` builds them), are fed in 64 KiB reads (``--chunk``;
0 gives one event per read, as a paced subscriber gets them) to the real
``RouterLinkProtocol`` on a fake transport.  The link is logged in and its
connection holds one lease on ``/org/dsmt/ns/deployment/xyz1/``, granted by the
fake router; the lease's callback counts the deliveries, and the run fails
unless every event was delivered.  Prints µs per event (best of ``--runs``)
and the process RSS before and after the runs (the input is built before: the
two are equal when nothing accumulates).

``--path legacy`` runs the previous receive path instead, kept below for the
comparison: expat framing (``stream.StreamParser``) and then a second parse of
each stanza's bytes with lxml (``event.parse_event``).  ``--breakdown`` also
times the new path's parts alone.  ``--profile`` prints the top of a cProfile.

Run: ``PYTHONPATH=.dev .venv/bin/python bench/client_receive.py [--count N] [--chunk B] [--path new|legacy]``

Measured 2026-11-23 on the 2-vCPU bench machine (Python 3.11.7, lxml 6.1.3 /
libxml2 2.14.6; other sessions were using the machine, so each figure is the
best of three interleaved invocations, each itself best of 3 × 100,000
events), µs per event:

                                                    64 KiB reads   one event per read
  before: commit ad940cd (StreamParser, then               37.8              48.1
    parse_event on each stanza's bytes; run with
    PYTHONPATH on an export of that commit)
  --path legacy on this tree (the old framing in           31.1              38.5
    front of the faster event_from_element)
  after: StanzaReader + event_from_element                 13.5              15.1
    (--breakdown: reader alone 5.6, with events 11.6)

End to end, ``bench/psepr_throughput.py --backends router --no-raw --leases 0
--router-launcher python --repeat 2`` on the same, then quiet, machine: the
subscriber process spent 14.1 µs of CPU per event 1→1 unthrottled (37,000–40,000
events/s delivered) and 16.5 µs per delivery 1→10; paced p99 was 1.05 ms 1→1 at
5,000/s and 2.65 ms 1→10 at 2,000/s, where each subscriber wakes for each event
(35–48 µs per event, most of it the reactor and the socket read).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

from twisted.internet import task

from dsmt.transports.psepr import backend_router, stream
from dsmt.transports.psepr.backend_router import RouterLinkProtocol
from dsmt.transports.psepr.client import Address, PsEPRConnection
from dsmt.transports.psepr.event import (
    Event, EventError, LeasePayload, event_from_element, event_to_xml, parse_event)
from dsmt.transports.psepr.router import ROUTER_SERVICE
from _common import CHUNK_BYTES, best_of, event_stanza

LEASE_CHANNEL = "/org/dsmt/ns/deployment/xyz1/"


def event_chunks(count: int, chunk_bytes: int = CHUNK_BYTES) -> list[bytes]:
    """``count`` event stanzas as socket reads of ``chunk_bytes`` (stanzas cut anywhere), or one per read if 0."""
    stanzas = [event_stanza(i) for i in range(count)]
    if not chunk_bytes:
        return stanzas
    body = b"".join(stanzas)
    return [body[start:start + chunk_bytes] for start in range(0, len(body), chunk_bytes)]


class LegacyRouterLinkProtocol(RouterLinkProtocol):
    """The receive path before ``StanzaReader`` (commit ad940cd), for comparison: expat, then lxml per stanza."""

    def __init__(self, handler, address):
        super().__init__(handler, address)
        self.parser = stream.StreamParser()

    def dataReceived(self, data):
        try:
            items = self.parser.feed(data)
        except stream.StreamError as exc:
            self._fail(f"router sent a broken stream: {exc.condition}: {exc.text}")
            return
        for item in items:
            if isinstance(item, stream.Stanza):
                if item.name == stream.STREAM_ERROR_NAME:
                    try:
                        condition, text = stream.parse_stream_error(item.raw)
                    except stream.StreamError as exc:
                        condition, text = "unreadable stream error", exc.text
                    self._fail(f"router ended the stream: {condition}: {text}")
                else:
                    self._legacy_stanza(item)
            elif isinstance(item, stream.StreamClosed):
                self._fail("router closed the stream")

    def _legacy_stanza(self, stanza):
        if stanza.name == "iq":
            iq = stream.parse_iq(stanza.raw)
            if not self._logged_in and iq.iq_id == backend_router.LOGIN_ID and iq.kind == "result":
                self._logged_in = True
                self.ready.callback(self)
            return
        if not self._logged_in or stanza.name != "message":
            return
        try:
            if stream.is_error_message(stanza.raw):
                return
            event = parse_event(stanza.raw)
        except (EventError, stream.StreamError):
            return
        if event.payload_type == LeasePayload.namespace and event.from_service == ROUTER_SERVICE:
            self.handler.link_granted(event.payload.identifier, event.payload.duration)
        else:
            self.handler.link_event(event)


class FakeTransport:
    connected = True

    def __init__(self):
        self.written = 0

    def write(self, data):
        self.written += len(data)

    def setTcpNoDelay(self, enabled):
        pass

    def loseConnection(self):
        self.connected = False


class FakeBackend:
    """What ``backend_router.connect`` does, on a fake transport: the link is up once the login result is fed."""

    def __init__(self, link_class):
        self.link_class = link_class
        self.link = None

    def connect(self, reactor, address, handler):
        self.link = self.link_class(handler, address)
        self.link.makeConnection(FakeTransport())
        return self.link.ready


def subscribed(link_class):
    """A logged-in connection with one granted lease; returns (link, lease, deliveries counter)."""
    clock = task.Clock()
    connection = PsEPRConnection([Address("psepr", "bench", 1)], service="xyz1_mgr", password="pw",
                                 instance="bench", reactor=clock)
    connection.backend = backend = FakeBackend(link_class)
    connected = connection.connect(retry=False)
    backend.link.dataReceived(stream.stream_header(sender="psepr", stream_id="bench")
                              + stream.auth_result(backend_router.LOGIN_ID))
    assert connected.called and connection.connected, "login not accepted"
    delivered = [0]

    def count(event):
        delivered[0] += 1

    lease = connection.lease(LEASE_CHANNEL, 3600, callback=count)
    grant = Event(LEASE_CHANNEL, LeasePayload(lease.identifier, 3600), from_service=ROUTER_SERVICE,
                  from_instance="psepr")
    backend.link.dataReceived(stream.wrap_message(event_to_xml(grant)))
    assert lease.ready.called and lease.granted == 3600, "lease not granted"
    return backend.link, lease, delivered


def receive(link_class, chunks: list[bytes]) -> tuple[float, int]:
    """Seconds to feed ``chunks`` to a fresh subscribed link, and how many events its lease got."""
    link, lease, delivered = subscribed(link_class)
    started = time.perf_counter()
    for chunk in chunks:
        link.dataReceived(chunk)
    elapsed = time.perf_counter() - started
    assert not link._closing, "the link failed"
    return elapsed, delivered[0]


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def breakdown(chunks: list[bytes], count: int, runs: int) -> None:
    """The new path's parts alone: the reader, then the reader with the event builder."""
    header = stream.stream_header(sender="psepr", stream_id="bench")

    def reader_only():
        reader = backend_router.StanzaReader()
        reader.feed(header)
        for chunk in chunks:
            reader.feed(chunk)

    def reader_and_events():
        reader = backend_router.StanzaReader()
        reader.feed(header)
        for chunk in chunks:
            for element in reader.feed(chunk):
                event_from_element(element, max_depth=backend_router.STANZA_DEPTH)

    for name, run in (("StanzaReader alone", reader_only), ("+ event_from_element", reader_and_events)):
        print(f"  {name:<24} {best_of(runs, run) / count * 1e6:6.2f} µs/event")


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--count", type=int, default=200_000)
    options.add_argument("--runs", type=int, default=3, help="best of this many runs is reported")
    options.add_argument("--path", choices=("new", "legacy"), default="new")
    options.add_argument("--chunk", type=int, default=CHUNK_BYTES,
                         help="bytes per read (default 64 KiB); 0: one event per read, as a paced subscriber gets them")
    options.add_argument("--breakdown", action="store_true", help="also time the new path's parts alone")
    options.add_argument("--profile", action="store_true")
    args = options.parse_args()
    link_class = RouterLinkProtocol if args.path == "new" else LegacyRouterLinkProtocol
    chunks = event_chunks(args.count, args.chunk)
    before = rss_mb()
    best = float("inf")
    for _ in range(args.runs):
        elapsed, delivered = receive(link_class, chunks)
        assert delivered == args.count, f"{delivered} of {args.count} events delivered"
        best = min(best, elapsed)
    after = rss_mb()
    reads = f"{args.chunk}-byte reads" if args.chunk else "one event per read"
    print(f"{args.path} path, {reads}: {args.count} events of {len(event_stanza(0))} bytes, best of {args.runs}: "
          f"{best / args.count * 1e6:.2f} µs/event ({args.count / best:,.0f} events/s); "
          f"RSS {before:.0f} → {after:.0f} MB (input {sum(map(len, chunks)) / 1e6:.0f} MB)")
    if args.breakdown:
        breakdown(chunks, args.count, args.runs)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(receive, link_class, chunks)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()

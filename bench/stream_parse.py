"""Micro-benchmark of the PsEPR stream parser, the router's hot path.

Feeds a stream of ``--count`` (default 100,000) ~1 KB ``<message>`` stanzas —
a realistic attribute event on a deep channel
``/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-mgr/status/<host>/``
— to one :class:`StreamParser` in 64 KiB chunks (a socket read) and prints
stanzas/s and MB/s.  The router must route ≥ 20,000 events/s end to end in
one process, so parsing should manage ≥ 60,000 stanzas/s.  It also times
:func:`is_error_message` on each stanza, the test a client makes on every
message it receives.

Run: ``PYTHONPATH=.dev .venv/bin/python bench/stream_parse.py [--count N] [--profile]``
(``--profile`` prints the top of a cProfile of one run).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from dsmt.transports.psepr.stream import (
    STREAM_CLOSE, Stanza, StreamParser, is_error_message, stream_header)
from _common import CHUNK_BYTES, event_stanza



def make_stream(count: int) -> bytes:
    return stream_header(to="psepr") + b"".join(event_stanza(i) for i in range(count)) + STREAM_CLOSE


def parse(data: bytes) -> int:
    """Feed ``data`` in socket-sized chunks; return how many stanzas came out."""
    parser = StreamParser()
    stanzas = 0
    for start in range(0, len(data), CHUNK_BYTES):
        for item in parser.feed(data[start:start + CHUNK_BYTES]):
            stanzas += type(item) is Stanza
    return stanzas


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--count", type=int, default=100_000)
    options.add_argument("--runs", type=int, default=3, help="best of this many runs is reported")
    options.add_argument("--profile", action="store_true")
    args = options.parse_args()
    data = make_stream(args.count)
    best = float("inf")
    for _ in range(args.runs):
        started = time.perf_counter()
        stanzas = parse(data)
        best = min(best, time.perf_counter() - started)
    assert stanzas == args.count, stanzas
    print(f"{stanzas} stanzas of {len(event_stanza(0))} bytes in {best:.3f} s: "
          f"{stanzas / best:,.0f} stanzas/s, {len(data) / best / 1e6:.1f} MB/s")
    raws = [event_stanza(i) for i in range(1000)]
    best = float("inf")
    for _ in range(args.runs):
        started = time.perf_counter()
        for _ in range(100):
            for raw in raws:
                is_error_message(raw)
        best = min(best, time.perf_counter() - started)
    assert not any(is_error_message(raw) for raw in raws)
    print(f"is_error_message: {best / (100 * len(raws)) * 1e6:.2f} µs per message")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(parse, data)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()

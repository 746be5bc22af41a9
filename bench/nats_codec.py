"""Micro-benchmark of the NATS codec: parse MSG frames, build PUB commands.

Run: ``PYTHONPATH=.dev .venv/bin/python bench/nats_codec.py [count]``.  Prints
frames per second for one big chunk and for 64 KiB reads (what a Twisted TCP
transport hands ``dataReceived``), and PUB commands built per second.
"""
import sys
import time

from dsmt.transports.psepr.nats import NatsParser, pub_command

SUBJECT = "psepr.org.dsmt.ns.deployment.xyz1.org%2Edsmt%2Ecomponent%2Esliver-mgr.status"
PAYLOAD = b"<event><status>ok</status></event>" * 6  # about 200 bytes, a typical PsEPR event
READ_SIZE = 64 * 1024


def parse_rate(stream: bytes, chunk: int, count: int) -> float:
    parser = NatsParser()
    started = time.perf_counter()
    parsed = sum(len(parser.feed(stream[i:i + chunk])) for i in range(0, len(stream), chunk))
    elapsed = time.perf_counter() - started
    assert parsed == count
    return count / elapsed


def build_rate(count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        pub_command(SUBJECT, PAYLOAD)
    return count / (time.perf_counter() - started)


def main(count: int = 200_000) -> None:
    frame = b"MSG %s 17 %d\r\n%s\r\n" % (SUBJECT.encode(), len(PAYLOAD), PAYLOAD)
    stream = frame * count
    print(f"parse, one {len(stream) >> 20} MiB chunk: {parse_rate(stream, len(stream), count):>10,.0f} MSG/s")
    print(f"parse, {READ_SIZE >> 10} KiB reads:       {parse_rate(stream, READ_SIZE, count):>10,.0f} MSG/s")
    print(f"build PUB:                 {build_rate(count):>10,.0f} PUB/s")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))

"""Micro-benchmark of the NATS publish path of a PsEPR client: ``NatsLink.send`` down to the transport.

A real :class:`NatsClientProtocol`, handshaken over a transport that only
counts what is written, under a real :class:`NatsLink`; ``--count`` (default
200,000) sends of ~1 KB attribute events cycling through the status channels
of 50 hosts (``bench/psepr_throughput.py``'s traffic).  The event's XML is
made once per host beforehand: what is timed is what ``PsEPRConnection.send``
pays on this backend after serialising, i.e. the channel's subject, the
``PUB`` line and its checks, and the write.

Prints µs per call for ``channel_to_subject``, ``pub_command`` and
``NatsLink.send``; the receiving side's subject check
(``channel_to_subject`` of each received event) costs what the first line says.

Run: ``PYTHONPATH=.dev .venv/bin/python bench/nats_publish.py [--count N] [--profile]``.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats

from dsmt.transports.psepr.backend_nats import NatsLink
from dsmt.transports.psepr.event import Event, event_to_xml
from dsmt.transports.psepr.nats import NatsClientProtocol, channel_to_subject, pub_command
from _common import best_of

HOSTS = 50
EVENT_BYTES = 1024
INFO = b'INFO {"server_id":"bench","max_payload":1048576}\r\n'


def channel_of(host_number: int) -> str:
    return ("/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-mgr/status/"
            f"planetlab{host_number}.nbgisp.com/")


def event_of(host_number: int) -> tuple[Event, bytes]:
    def build(value: str) -> Event:
        return Event.attribute(channel_of(host_number), "deployment-status", value, from_service="bench",
                               from_instance="publisher.example.org")

    prefix = f"hostname=planetlab{host_number}.nbgisp.com,status=running,detail="
    event = build(prefix + "x" * max(0, EVENT_BYTES - len(event_to_xml(build(prefix)))))
    return event, event_to_xml(event)


class CountingTransport:
    """Enough of a TCP transport for the protocol: writes are counted, not sent."""

    def __init__(self):
        self.writes = 0
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)

    def writeSequence(self, data) -> None:
        for piece in data:
            self.write(piece)

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    abortConnection = loseConnection


class Handler:
    """What a NatsLink reports to (``PsEPRConnection`` in real use)."""

    service, instance, password = "bench", "publisher.example.org", None

    def link_lost(self, link, reason) -> None:
        raise AssertionError(f"link lost: {reason}")


def connected_link() -> tuple[NatsLink, CountingTransport]:
    protocol = NatsClientProtocol(name="bench")
    transport = CountingTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(INFO)    # -> CONNECT, PING
    protocol.dataReceived(b"PONG\r\n")  # the handshake's answer: ready
    assert protocol.ready.called
    return NatsLink(protocol, Handler(), reactor=None), transport


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--count", type=int, default=200_000)
    options.add_argument("--runs", type=int, default=5, help="best of this many runs is reported")
    options.add_argument("--profile", action="store_true")
    args = options.parse_args()
    count = args.count
    events = [event_of(host) for host in range(HOSTS)]
    sequence = [events[index % HOSTS] for index in range(count)]
    subject = channel_to_subject(channel_of(0))
    payload = events[0][1]
    link, transport = connected_link()

    def subjects():
        # Channels as a receiver has them: a new string per event (parse_event makes one each
        # time), so each is hashed once in here.  Copying them costs ~0.1 µs, included.
        for event, _ in sequence:
            channel_to_subject(event.channel[:-1] + "/")

    def pubs():
        for _ in range(count):
            pub_command(subject, payload)

    def sends():
        send = link.send
        for event, data in sequence:
            send(event, data)

    before = transport.writes
    results = [(name, best_of(args.runs, function)) for name, function in
               (("channel_to_subject", subjects), ("pub_command", pubs), ("NatsLink.send", sends))]
    assert transport.writes - before == args.runs * count, transport.writes
    print(f"{count:,} events of {len(payload)} bytes of XML, {HOSTS} channels; best of {args.runs}:")
    for name, seconds in results:
        print(f"  {name:<20} {seconds / count * 1e6:6.2f} µs/call")
    print(f"  NatsLink.send: {count / results[-1][1]:,.0f} sends/s on one core")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(sends)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()

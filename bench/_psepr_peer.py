"""One process of the PsEPR throughput benchmark: a publisher, a subscriber or a lease holder.

Started by ``bench/psepr_throughput.py``, never by hand.  Each peer uses the
real :class:`~dsmt.transports.psepr.client.PsEPRConnection` over the backend
its URL names, and is driven by JSON lines on stdin; it answers with JSON
lines on stdout (``{"event": ...}``).  Errors go to stderr and exit non-zero.

Roles::

    _psepr_peer.py sub    URL --channel C --instance I --lat-dir D [--raw]
    _psepr_peer.py pub    URL --instance I
    _psepr_peer.py leases URL --instance I

* ``sub`` holds one subtree lease on ``C``; says ``ready`` once it is
  granted (and flushed).  ``{"cmd": "raw"}`` (or ``--raw``) turns it into a
  raw reader for good: it scans the received bytes for the send stamps
  instead of letting the client parse them.  ``{"cmd": "arm", "round": R, "expect": N, ...}``
  starts a round: it answers ``armed``, counts the events of round ``R``,
  writes each one's latency (receive − send, ``time.monotonic_ns``, which is
  system-wide on Linux) to ``D/lat-<instance>-<R>.bin`` and answers ``done``
  once ``N`` arrived, after ``idle`` seconds without one, or at ``deadline``.
* ``pub`` sends ``{"cmd": "run", "round": R, "count": N, "rate": E}``: ``N``
  events of ~1 KB on deep status channels, as fast as the socket drains
  (``rate`` 0) or at ``E`` events/s in 1 ms ticks; answers ``sent``.
* ``leases`` takes ``{"cmd": "lease", "count": N}`` and holds ``N`` leases on
  distinct channels; answers ``leased`` once every grant is in.

Every peer quits on ``{"cmd": "quit"}`` or when stdin closes.
"""
from __future__ import annotations

import argparse
import array
import json
import os
import re
import sys
import time

from twisted.internet import defer, reactor, stdio
from twisted.internet.interfaces import IPushProducer
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from dsmt.transports.psepr.client import PsEPRConnection
from dsmt.transports.psepr.event import Event, event_to_xml

#: Where the publisher sends: the status channel of one of HOSTS hosts under
#: the xyz1 deployment; subscribers lease DEPLOYMENT (a subtree).
DEPLOYMENT = "/org/dsmt/ns/deployment/xyz1/"
STATUS_CHANNEL = DEPLOYMENT + "org.dsmt.component.sliver-mgr/status/{host}/"
HOSTS = 50
FIELD = "deployment-status"
#: Bytes of the serialised ``<event>`` document (what NATS carries; the
#: router's ``<message>`` wrapper adds about 80).
EVENT_BYTES = 1024
#: Value prefix: round number and send time, fixed width so padding is computed once per host.
STAMP = "{round:06d}|{sent:020d}|"
STAMP_LEN = len(STAMP.format(round=0, sent=0))
#: Unthrottled publishing: events written per reactor turn.
BATCH = 64
#: Paced publishing: tick length.
TICK = 0.001
LEASE_SECONDS = 600


def emit(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def host_name(number: int) -> str:
    return f"planetlab{number}.nbgisp.com"


def _transport(conn: PsEPRConnection):
    """The TCP transport under a connected PsEPRConnection (for flow control only)."""
    link = conn.link
    return getattr(link, "transport", None) or link.protocol.transport


def flush(conn: PsEPRConnection) -> defer.Deferred:
    """``conn.flush()``; succeeds at once on a backend that has none yet (says so on stderr)."""
    try:
        return conn.flush()
    except (AttributeError, NotImplementedError) as exc:
        sys.stderr.write(f"flush unavailable on this backend ({exc}); continuing without it\n")
        return defer.succeed(None)


class Commands(LineReceiver):
    """JSON commands on stdin → ``handler(dict)``; stdin closing means quit."""

    delimiter = b"\n"

    def __init__(self, handler, on_close):
        self.handler = handler
        self.on_close = on_close

    def lineReceived(self, line):
        if line.strip():
            command = json.loads(line)
            try:
                self.handler(command)
            except Exception as exc:  # a harness bug: report it and quit
                sys.stderr.write(f"command {command!r} failed: {exc!r}\n")
                self.on_close()

    def connectionLost(self, reason):
        self.on_close()


class Peer:
    def __init__(self, args):
        self.args = args
        self.conn: PsEPRConnection | None = None
        self._stopping = False

    def stop(self, code: int = 0) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.exit_code = code
        if self.conn is not None:
            self.conn.close()
        reactor.callLater(0.05, reactor.stop)

    @defer.inlineCallbacks
    def start(self):
        try:
            self.conn = PsEPRConnection.from_urls(self.args.url, service=self.args.service,
                                                  password=self.args.password, instance=self.args.instance)
            yield self.conn.connect(retry=False)
            yield self.started()
        except Exception as exc:
            sys.stderr.write(f"{self.args.role} {self.args.instance}: start failed: {exc!r}\n")
            self.stop(2)
            return
        stdio.StandardIO(Commands(self.command, self.stop))

    def started(self):
        emit(event="ready")

    def command(self, command: dict) -> None:
        if command["cmd"] == "quit":
            self.stop()
        else:
            getattr(self, "cmd_" + command["cmd"])(command)


#: What a raw reader looks for in the bytes of either backend: the stamp at the start of a value.
RAW_STAMP = re.compile(rb"<value>(\d{6})\|(\d{20})\|")
RAW_KEEP = len(b"<value>000000|00000000000000000000|") - 1


class Subscriber(Peer):
    """Holds one subtree lease; counts and times the events of the armed round.

    With ``--raw`` (a diagnostic of the server alone), once the lease is
    granted the connection's protocol stops parsing: received bytes are only
    scanned for value stamps, so the subscriber costs ~1 µs per event instead
    of the client's full parse.
    """

    @defer.inlineCallbacks
    def started(self):
        self.round = None
        lease = self.conn.lease(self.args.channel, LEASE_SECONDS, callback=self.on_event)
        yield lease.ready
        yield flush(self.conn)
        self.stray = 0
        if self.args.raw:
            self.go_raw()
        emit(event="ready")

    def go_raw(self) -> None:
        """From now on scan the received bytes for stamps instead of parsing them (one way)."""
        link = self.conn.link
        protocol = link if hasattr(link, "dataReceived") else link.protocol
        self._tail = b""
        protocol.dataReceived = self.raw_data

    def cmd_raw(self, command: dict) -> None:
        self.go_raw()
        emit(event="raw")

    def raw_data(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buffer = self._tail + data
        end = 0
        for match in RAW_STAMP.finditer(buffer):
            end = match.end()
            self.on_stamp(now, int(match.group(1)), int(match.group(2)))
        self._tail = buffer[max(end, len(buffer) - RAW_KEEP):]

    def on_stamp(self, now: int, round_number: int, sent: int) -> None:
        if self.round is None or round_number != self.round:
            self.stray += 1
            return
        if self.finished:
            return
        if not self.latencies:
            self.first = now
            self.cpu_first = time.process_time()
        self.latencies.append(now - sent)
        self.last = now
        if len(self.latencies) >= self.expect:
            self.finish("complete")

    def cmd_arm(self, command: dict) -> None:
        self.round = command["round"]
        self.expect = command["expect"]
        self.idle_ns = int(command.get("idle", 3.0) * 1e9)
        self.latencies = array.array("q")
        self.first = self.last = 0
        self.cpu_start = time.process_time()
        self.cpu_first = None
        self.finished = False
        self._deadline = reactor.callLater(command.get("deadline", 60.0), self.finish, "deadline")
        self._idle_check = reactor.callLater(0.5, self.check_idle)
        emit(event="armed", round=self.round)

    def on_event(self, event: Event) -> None:
        value = event.payload.value
        self.on_stamp(time.monotonic_ns(), int(value[:6]), int(value[7:27]))

    def check_idle(self) -> None:
        self._idle_check = None
        if self.finished:
            return
        if self.latencies and time.monotonic_ns() - self.last > self.idle_ns:
            self.finish("idle")
        else:
            self._idle_check = reactor.callLater(0.25, self.check_idle)

    def finish(self, why: str) -> None:
        if self.finished:
            return
        self.finished = True
        cpu_end = time.process_time()
        for call in (self._deadline, self._idle_check):
            if call is not None and call.active():
                call.cancel()
        path = os.path.join(self.args.lat_dir, f"lat-{self.args.instance}-{self.round}.bin")
        with open(path, "wb") as out:
            self.latencies.tofile(out)
        emit(event="done", round=self.round, why=why, count=len(self.latencies), first=self.first,
             last=self.last, lat_file=path, stray=self.stray, connected=self.conn.connected,
             cpu=cpu_end - (self.cpu_first if self.cpu_first is not None else self.cpu_start))


@implementer(IPushProducer)
class _Drain:
    """Told by the transport when its buffer passes the high-water mark and when it drained."""

    def __init__(self):
        self.paused = False
        self.waiter: defer.Deferred | None = None

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.callback(None)

    def stopProducing(self):
        self.resumeProducing()

    def drained(self) -> defer.Deferred:
        if not self.paused:
            return defer.succeed(None)
        self.waiter = defer.Deferred()
        return self.waiter


class Publisher(Peer):
    """Sends ~1 KB attribute events to the status channels of HOSTS hosts, unthrottled or paced."""

    def started(self):
        # Pad each host's value so that every serialised <event> is EVENT_BYTES long.
        self.targets = []
        for number in range(HOSTS):
            channel = STATUS_CHANNEL.format(host=host_name(number))
            detail = f"hostname={host_name(number)},status=running,detail="
            probe = Event.attribute(channel, FIELD, "0" * STAMP_LEN + detail, from_service=self.args.service,
                                    from_instance=self.args.instance)
            self.targets.append((channel, detail + "x" * max(0, EVENT_BYTES - len(event_to_xml(probe)))))
        self.drain = _Drain()
        _transport(self.conn).registerProducer(self.drain, True)
        sample = self.make_event(0, 0)
        sample = Event.attribute(sample.channel, FIELD, sample.payload.value, from_service=self.args.service,
                                 from_instance=self.args.instance)
        emit(event="ready", event_bytes=len(event_to_xml(sample)))

    def make_event(self, round_number: int, index: int) -> Event:
        channel, padding = self.targets[index % HOSTS]
        value = STAMP.format(round=round_number, sent=time.monotonic_ns()) + padding
        return Event.attribute(channel, FIELD, value)

    @defer.inlineCallbacks
    def cmd_run(self, command: dict):
        round_number, count, rate = command["round"], command["count"], command["rate"]
        send, make = self.conn.send, self.make_event
        cpu_start = time.process_time()
        start = time.monotonic_ns()
        sent = 0
        late_ticks = 0
        if rate <= 0:
            while sent < count:
                for index in range(sent, min(count, sent + BATCH)):
                    send(make(round_number, index))
                sent = min(count, sent + BATCH)
                yield self.drain.drained()
                yield _turn()
        else:
            while sent < count:
                due = min(count, int((time.monotonic_ns() - start) * rate / 1e9) + 1)
                if due - sent > 2 * rate * TICK + 1:
                    late_ticks += 1
                for index in range(sent, due):
                    send(make(round_number, index))
                sent = max(sent, due)
                if sent < count:
                    yield _sleep(TICK)
        end = time.monotonic_ns()
        cpu_end = time.process_time()
        yield flush(self.conn)
        emit(event="sent", round=round_number, sent=sent, start=start, end=end, flushed=time.monotonic_ns(),
             cpu=cpu_end - cpu_start, late_ticks=late_ticks)


def _turn() -> defer.Deferred:
    """Let the reactor run once (the socket drains, input is read)."""
    d = defer.Deferred()
    reactor.callLater(0, d.callback, None)
    return d


def _sleep(seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class LeaseHolder(Peer):
    """Holds many leases on distinct channels (the router's memory per lease)."""

    @defer.inlineCallbacks
    def cmd_lease(self, command: dict):
        count = command["count"]
        started = time.monotonic()
        leases = [self.conn.lease(f"/org/dsmt/ns/deployment/bench{n % 100}/slice{n}/", LEASE_SECONDS)
                  for n in range(count)]
        yield defer.gatherResults([lease.ready for lease in leases], consumeErrors=True)
        yield flush(self.conn)
        emit(event="leased", count=len(leases), seconds=time.monotonic() - started)


ROLES = {"sub": Subscriber, "pub": Publisher, "leases": LeaseHolder}


def main(argv=None) -> int:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("role", choices=sorted(ROLES))
    options.add_argument("url")
    options.add_argument("--service", default="bench")
    options.add_argument("--password", default=None)
    options.add_argument("--instance", required=True)
    options.add_argument("--channel", default=DEPLOYMENT)
    options.add_argument("--lat-dir", default=".")
    options.add_argument("--raw", action="store_true", help="sub: count stamps in the received bytes, do not parse")
    options.add_argument("--profile", metavar="FILE", help="write a cProfile of this process to FILE")
    args = options.parse_args(argv)
    if args.password is None:
        args.password = os.environ.get("PSEPR_BENCH_PASSWORD")
    peer = ROLES[args.role](args)
    peer.exit_code = 0
    reactor.callWhenRunning(peer.start)
    if args.profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.runcall(reactor.run)
        profiler.dump_stats(args.profile)
    else:
        reactor.run()
    return peer.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""PsEPR over NATS: subject mapping, a sans-I/O protocol codec, a thin Twisted adapter.

The module has three layers, each usable without the ones after it:

1. **Subject mapping** (pure): PsEPR channels <-> NATS subjects.
2. **Codec** (pure, h11-style, no I/O): :class:`NatsParser` turns server bytes
   into frames; ``*_command`` builders turn requests into client bytes.
3. **Twisted adapter**: :class:`NatsClientProtocol` wires the codec to a TCP
   transport, and :func:`connect_nats` connects one and waits for the handshake.

It speaks the NATS client protocol (https://docs.nats.io/reference/reference-protocols/nats-protocol)
as served by nats-server 2.9: ``INFO``, ``MSG``, ``PING``, ``PONG``, ``+OK`` and
``-ERR`` from the server; ``CONNECT``, ``PUB``, ``SUB``, ``UNSUB``, ``PING`` and
``PONG`` from the client.  Message headers are not negotiated: ``CONNECT`` says
``"headers": false``, so a server never sends ``HMSG`` and one arriving is
treated as a protocol violation rather than parsed.

Subject mapping
---------------
A channel such as ``/a/b.c/`` becomes the subject ``psepr.a.b%2Ec``: the root
token :data:`SUBJECT_ROOT`, then one token per channel segment.  Within a
segment every byte outside ``[A-Za-z0-9_~:@+=,-]`` is written ``%XX`` (upper-case
hex of its UTF-8 bytes).  For a valid channel (see ``channel.py``) that escapes
only ``.``; it also covers ``*``, ``>``, ``%``, whitespace and anything else, so
the mapping is total on slash paths and reversible, and every segment is
exactly one NATS token.  That is what makes subtree leases sibling-safe: the
subtree of ``/xyz1/`` is ``psepr.xyz1`` plus ``psepr.xyz1.>``, which matches
neither ``psepr.xyz10`` nor ``psepr.xyz1%2Eevil`` (the one token of ``/xyz1.evil/``).

Why a 1024-byte channel fits NATS' 4096-byte control line: each channel byte
maps to at most three subject bytes (``.`` -> ``%2E``; valid channels have no
other escaped byte), and slashes map one-to-one onto dots, so the worst valid
channel, one 1022-byte segment of dots, gives ``psepr.`` + 3066 bytes = 3072
bytes, 3074 with the subtree's ``.>``.  ``SUB <subject> <sid>`` or
``PUB <subject> <reply> <size>`` then leaves about 1000 bytes of the 4096 for a
reply subject, a sid and a size, so no valid channel can produce a line the
server refuses with ``maximum control line exceeded``.
"""
from __future__ import annotations

import functools
import itertools
import json
import re
from collections import deque
from dataclasses import dataclass
from typing import Callable, Union
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "SUBJECT_ROOT", "MAX_CONTROL_LINE", "DEFAULT_MAX_PAYLOAD", "MAX_PAYLOAD_CEILING", "SUBJECT_CACHE_SIZE",
    "NatsError", "NatsProtocolError", "NatsServerError", "NatsAuthorizationError",
    "NatsNotConnectedError",
    "channel_to_subject", "subject_to_channel", "subtree_subjects",
    "Info", "Msg", "Ping", "Pong", "Ok", "Err", "Frame", "NatsParser",
    "PING", "PONG", "connect_command", "pub_command", "sub_command", "unsub_command",
    "NatsClientProtocol", "connect_nats",
]

#: First token of every PsEPR subject, so PsEPR traffic shares a server with
#: other NATS users without colliding and ``/`` has a subject of its own.
SUBJECT_ROOT = "psepr"

#: Longest control line (without its CRLF) either side may send: nats-server's
#: default ``max_control_line``, beyond which the server drops a client.  The
#: parser holds the server to the same bound: a ``MSG`` line is the ``PUB``
#: line that fit plus a sid, and an ``INFO`` line is a few hundred bytes unless
#: the cluster is large (``NatsParser(max_control_line=...)`` raises it).
MAX_CONTROL_LINE = 4096

#: nats-server's default ``max_payload``, assumed until ``INFO`` says otherwise.
DEFAULT_MAX_PAYLOAD = 1024 * 1024

#: Largest ``max_payload`` the parser adopts from ``INFO``: nats-server refuses
#: a ``max_payload`` above ``max_pending``, whose default is 64 MiB.  Capping it
#: keeps a hostile or misconfigured server from making the parser buffer more.
MAX_PAYLOAD_CEILING = 64 * 1024 * 1024

CRLF = b"\r\n"

#: Channels whose subject, and subjects whose validated ``PUB <subject> `` prefix,
#: are remembered (two LRU caches of this size).  Mapping a channel costs a
#: regular-expression pass per segment and validating a subject one more pass:
#: ~7 and ~4 µs, against ~3 µs for the rest of a publish.  A client publishes to
#: the channels of its own components and receives from those under its leases
#: (the receiving side checks each event's subject): tens to a few thousand
#: channels; 4,096 covers a PLDB watching a large deployment.  Memory per channel
#: in both caches (its channel, subject and prefix): ~0.6 KB for a real one,
#: 2.5 MB when full; ~7.4 KB for the longest valid one (1 KiB of dots), so at
#: most 30 MB were every channel like that.
SUBJECT_CACHE_SIZE = 4096


class NatsError(Exception):
    """Base class of every error raised by this module."""


class NatsProtocolError(NatsError):
    """The server's byte stream is malformed, oversized or hostile.

    The stream cannot be resynchronised: drop the connection.
    """


class NatsServerError(NatsError):
    """The server sent ``-ERR``; :attr:`message` is its text without quotes."""

    def __init__(self, message: str):
        super().__init__(f"nats-server error: {message}")
        self.message = message


class NatsAuthorizationError(NatsServerError):
    """The server refused our credentials (``Authorization Violation`` and kin)."""


class NatsNotConnectedError(NatsError):
    """An operation needs a connection that has completed its handshake and is still open."""


# --------------------------------------------------------------------------
# Subject mapping
# --------------------------------------------------------------------------

_UNSAFE_IN_TOKEN = re.compile(r"[^A-Za-z0-9_~:@+=,\-]+")


def _percent_escape(match: re.Match[str]) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group().encode("utf-8"))


@functools.lru_cache(maxsize=SUBJECT_CACHE_SIZE)
def channel_to_subject(channel: str) -> str:
    """Map a channel (``/``-delimited path, ``/`` for the root) to its NATS subject.

    Total on every string that starts and ends with ``/`` and has no empty
    segment; raises :class:`ValueError` otherwise.  Character rules and the
    1024-byte limit are ``channel.py``'s job; this function escapes whatever
    it is given so that each segment stays exactly one NATS token.  Results
    are remembered (:data:`SUBJECT_CACHE_SIZE` channels, least recently used
    forgotten first).
    """
    if not (channel.startswith("/") and channel.endswith("/")):
        raise ValueError(f"channel {channel!r} must start and end with '/'")
    if channel == "/":
        return SUBJECT_ROOT
    segments = channel[1:-1].split("/")
    if "" in segments:
        raise ValueError(f"channel {channel!r} has an empty segment")
    return ".".join([SUBJECT_ROOT, *(_UNSAFE_IN_TOKEN.sub(_percent_escape, s) for s in segments)])


def subject_to_channel(subject: str) -> str:
    """Inverse of :func:`channel_to_subject`.

    Accepts only canonical subjects, those :func:`channel_to_subject` produces
    (no lower-case or needless escapes), so every channel has exactly one
    subject; anything else raises :class:`ValueError`.
    """
    root, _, rest = subject.partition(".")
    if root != SUBJECT_ROOT:
        raise ValueError(f"subject {subject!r} is not under {SUBJECT_ROOT!r}")
    if not rest:
        channel = "/"
    else:
        try:
            segments = [unquote_to_bytes(token).decode("utf-8") for token in rest.split(".")]
        except UnicodeDecodeError:
            raise ValueError(f"subject {subject!r} escapes bytes that are not UTF-8") from None
        channel = "/" + "/".join(segments) + "/"
    try:
        canonical = channel_to_subject(channel)
    except ValueError:
        canonical = None
    if canonical != subject:
        raise ValueError(f"subject {subject!r} is not a canonical PsEPR subject")
    return channel


def subtree_subjects(channel: str) -> tuple[str, str]:
    """The two subscriptions a subtree lease on *channel* needs: the channel itself and all below it."""
    subject = channel_to_subject(channel)
    return subject, subject + ".>"


# --------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Info:
    """``INFO``: the server's JSON options (``server_id``, ``max_payload``, ``connect_urls``...)."""
    options: dict


@dataclass(frozen=True, slots=True)
class Msg:
    """``MSG``: a message delivered for subscription *sid*; *reply* is ``None`` when absent."""
    subject: str
    sid: str
    reply: str | None
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    """``PING``: the server checks we are alive; answer :data:`PONG`."""


@dataclass(frozen=True, slots=True)
class Pong:
    """``PONG``: answer to our oldest unanswered ``PING``."""


@dataclass(frozen=True, slots=True)
class Ok:
    """``+OK``: acknowledgement, only sent in verbose mode."""


@dataclass(frozen=True, slots=True)
class Err:
    """``-ERR``: *message* is the server's text without its single quotes."""
    message: str


Frame = Union[Info, Msg, Ping, Pong, Ok, Err]


# --------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------

class NatsParser:
    """Incremental parser of the server-to-client byte stream.

    :meth:`feed` takes bytes as they arrive, in chunks of any size, and returns
    the frames they complete.  Memory is bounded: besides the chunk being fed,
    the parser holds at most one incomplete control line
    (``max_control_line`` bytes) or one incomplete ``MSG`` payload
    (``max_payload`` bytes).  Work is linear in the input: consumed bytes are
    tracked by an offset and dropped once per :meth:`feed`, and payload bytes
    are never rescanned.

    ``max_payload`` starts at *max_payload* and, with *follow_info*, follows
    the server's ``INFO`` (capped at :data:`MAX_PAYLOAD_CEILING`).  A client
    in a cluster must not follow it: a node forwards messages accepted by
    peers configured with a larger ``max_payload``, so
    :class:`NatsClientProtocol` receives up to the ceiling and lets the layer
    above refuse what it considers too large.  Any malformed, oversized or
    unknown input raises :class:`NatsProtocolError`; after that the parser is
    spent and every later :meth:`feed` raises too.
    """

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD, max_control_line: int = MAX_CONTROL_LINE,
                 follow_info: bool = True):
        self.max_payload = max_payload
        self.follow_info = follow_info
        self.max_control_line = max_control_line
        self._buffer = bytearray()
        self._offset = 0
        self._pending: tuple[str, str, str | None, int] | None = None  # a MSG head awaiting its payload
        self._failure: NatsProtocolError | None = None

    def feed(self, data: bytes) -> list[Frame]:
        """Append *data* and return every frame completed so far, in stream order."""
        if self._failure is not None:
            raise NatsProtocolError(f"parser already failed: {self._failure}")
        self._buffer += data
        try:
            with memoryview(self._buffer) as view:
                frames = self._parse(view)
        except NatsProtocolError as error:
            self._failure = error
            self._buffer.clear()
            raise
        del self._buffer[:self._offset]
        self._offset = 0
        return frames

    def _parse(self, view: memoryview) -> list[Frame]:
        buffer, end, offset = self._buffer, len(self._buffer), self._offset
        frames: list[Frame] = []
        while True:
            if self._pending is not None:
                subject, sid, reply, size = self._pending
                stop = offset + size
                if stop + 2 > end:
                    break
                if buffer[stop] != 13 or buffer[stop + 1] != 10:
                    raise NatsProtocolError(f"MSG payload of {size} bytes on {subject!r} is not followed by CRLF")
                frames.append(Msg(subject, sid, reply, bytes(view[offset:stop])))
                self._pending = None
                offset = stop + 2
                continue
            eol = buffer.find(CRLF, offset, offset + self.max_control_line + 2)
            if eol < 0:
                if end - offset >= self.max_control_line + 2:
                    raise NatsProtocolError(f"control line longer than {self.max_control_line} bytes")
                break
            frame = self._control_line(bytes(view[offset:eol]))
            offset = eol + 2
            if frame is not None:
                frames.append(frame)
        self._offset = offset
        return frames

    def _control_line(self, line: bytes) -> Frame | None:
        """Parse one control line; a ``MSG`` head is stored as pending and yields ``None``."""
        op, _, argument = line.partition(b" ")
        op = op.upper()
        if op == b"MSG":
            self._pending = self._msg_head(argument)
            return None
        if op == b"PING" and not argument.strip():
            return Ping()
        if op == b"PONG" and not argument.strip():
            return Pong()
        if op == b"+OK" and not argument.strip():
            return Ok()
        if op == b"-ERR":
            return Err(argument.strip().strip(b"'").decode("utf-8", "replace"))
        if op == b"INFO":
            return self._info(argument)
        if op == b"HMSG":
            raise NatsProtocolError("HMSG (message with headers) received although CONNECT declared headers: false")
        raise NatsProtocolError(f"unknown or malformed control line {line[:40]!r}")

    def _msg_head(self, argument: bytes) -> tuple[str, str, str | None, int]:
        fields = argument.split()
        if len(fields) == 3:
            subject, sid, size = fields
            reply = None
        elif len(fields) == 4:
            subject, sid, reply, size = fields
        else:
            raise NatsProtocolError(f"MSG needs 3 or 4 arguments, got {len(fields)}")
        if not size.isdigit() or len(size) > 10:
            raise NatsProtocolError(f"MSG size {size[:20]!r} is not a decimal byte count")
        length = int(size)
        if length > self.max_payload:
            raise NatsProtocolError(f"MSG payload of {length} bytes exceeds max_payload {self.max_payload}")
        try:
            return subject.decode(), sid.decode(), None if reply is None else reply.decode(), length
        except UnicodeDecodeError:
            raise NatsProtocolError("MSG subject, sid or reply is not UTF-8") from None

    def _info(self, argument: bytes) -> Info:
        try:
            options = json.loads(argument)
        except (ValueError, RecursionError):
            raise NatsProtocolError(f"INFO is not valid JSON: {argument[:40]!r}") from None
        if not isinstance(options, dict):
            raise NatsProtocolError("INFO is not a JSON object")
        if "max_payload" in options:
            advertised = options["max_payload"]
            if type(advertised) is not int or advertised <= 0:
                raise NatsProtocolError(f"INFO max_payload {advertised!r} is not a positive integer")
            if self.follow_info:
                self.max_payload = min(advertised, MAX_PAYLOAD_CEILING)
        return Info(options)


# --------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------

#: Client keep-alive messages, complete with CRLF.
PING = b"PING\r\n"
PONG = b"PONG\r\n"

_WHITESPACE = re.compile(rb"\s")


def _subject_bytes(subject: str, *, wildcards: bool) -> bytes:
    """Validate a subject: non-empty dot-separated tokens, no whitespace.

    With *wildcards*, ``*`` may stand as a whole token and ``>`` as the whole
    last token; without, neither may appear, because nats-server (non-pedantic)
    accepts a ``PUB`` to ``a.*`` and delivers it to ``a.>`` subscribers under
    that literal name.
    """
    raw = subject.encode("utf-8")
    if _WHITESPACE.search(raw):
        raise ValueError(f"subject {subject!r} contains whitespace")
    tokens = raw.split(b".")
    if not all(tokens):
        raise ValueError(f"subject {subject!r} has an empty token")
    for index, token in enumerate(tokens):
        if b"*" not in token and b">" not in token:
            continue
        if not wildcards:
            raise ValueError(f"subject {subject!r} has a wildcard, which only subscriptions may use")
        if token != b"*" and not (token == b">" and index == len(tokens) - 1):
            raise ValueError(f"subject {subject!r}: wildcards must be whole tokens, '>' only the last")
    return raw


def _sid_bytes(sid: int | str) -> bytes:
    raw = str(sid).encode("utf-8")
    if not raw or _WHITESPACE.search(raw):
        raise ValueError(f"sid {sid!r} must be non-empty without whitespace")
    return raw


def _command(*fields: bytes) -> bytes:
    """Join *fields* into one control line, refusing lines the server would reject as too long."""
    line = b" ".join(fields)
    if len(line) > MAX_CONTROL_LINE:
        raise ValueError(f"{fields[0].decode()} line of {len(line)} bytes exceeds {MAX_CONTROL_LINE}")
    return line + CRLF


def connect_command(options: dict) -> bytes:
    """``CONNECT {json}``: *options* as compact ASCII JSON (so no raw CR or LF can slip in)."""
    return _command(b"CONNECT", json.dumps(options, separators=(",", ":")).encode("ascii"))


@functools.lru_cache(maxsize=SUBJECT_CACHE_SIZE)
def _pub_prefix(subject: str) -> bytes:
    """``PUB <subject> `` for a literal subject, validated once and remembered (ValueError if invalid)."""
    return b"PUB " + _subject_bytes(subject, wildcards=False) + b" "


def pub_command(subject: str, payload: bytes, reply: str | None = None) -> bytes:
    """``PUB`` with its payload; *subject* and *reply* must be literal (no wildcards).

    The payload size is not checked here: the limit is the connected server's
    ``max_payload``, which :meth:`NatsClientProtocol.publish` enforces.
    Without *reply* (what PsEPR sends), the validated ``PUB <subject> `` is
    remembered per subject.
    """
    if reply is None:
        prefix = _pub_prefix(subject)
        size = b"%d" % len(payload)
        if len(prefix) + len(size) > MAX_CONTROL_LINE:
            raise ValueError(f"PUB line of {len(prefix) + len(size)} bytes exceeds {MAX_CONTROL_LINE}")
        return prefix + size + CRLF + payload + CRLF
    fields = (b"PUB", _subject_bytes(subject, wildcards=False), _subject_bytes(reply, wildcards=False),
              b"%d" % len(payload))
    return _command(*fields) + payload + CRLF


def sub_command(subject: str, sid: int | str) -> bytes:
    """``SUB <subject> <sid>``; *subject* may use ``*`` and a final ``>``."""
    return _command(b"SUB", _subject_bytes(subject, wildcards=True), _sid_bytes(sid))


def unsub_command(sid: int | str, max_msgs: int | None = None) -> bytes:
    """``UNSUB <sid> [max_msgs]``: stop now, or after *max_msgs* more messages."""
    if max_msgs is None:
        return _command(b"UNSUB", _sid_bytes(sid))
    if type(max_msgs) is not int or max_msgs <= 0:
        raise ValueError(f"max_msgs {max_msgs!r} must be a positive integer")
    return _command(b"UNSUB", _sid_bytes(sid), b"%d" % max_msgs)


# --------------------------------------------------------------------------
# Twisted adapter
# --------------------------------------------------------------------------

Subscriber = Callable[[str, bytes, Union[str, None]], object]


def _server_error(message: str) -> NatsServerError:
    lowered = message.lower()
    if "authoriz" in lowered or "authenticat" in lowered:
        return NatsAuthorizationError(message)
    return NatsServerError(message)


class NatsClientProtocol(Protocol):
    """A NATS client connection: the codec plus Twisted plumbing, nothing more.

    Handshake: on the server's first ``INFO`` it sends ``CONNECT`` (non-verbose,
    non-pedantic, ``protocol: 1`` so the server may send later ``INFO`` updates)
    and a ``PING``; the first ``PONG`` proves ``CONNECT`` was accepted and fires
    :attr:`ready` with the protocol.  A ``-ERR`` before that (say
    ``Authorization Violation``) errbacks :attr:`ready` with
    :class:`NatsServerError` or :class:`NatsAuthorizationError`; losing the
    connection first errbacks it with the reason.  Cancelling :attr:`ready`
    aborts the connection.

    After :attr:`ready`: :meth:`publish`, :meth:`subscribe`, :meth:`unsubscribe`
    and :meth:`flush`; server ``PING`` is answered; later ``-ERR`` is logged
    (the fatal ones are followed by the server closing the connection).  An
    exception from a subscriber callback is logged and does not affect the
    connection or other subscribers.  A protocol violation by the server is
    logged and aborts the connection.
    """

    _log = Logger()

    def __init__(self, name: str = "dsmt", user: str | None = None, password: str | None = None):
        self._connect_options = {
            "verbose": False, "pedantic": False, "name": name, "lang": "python-twisted",
            "protocol": 1, "headers": False,
        }
        if user is not None:
            self._connect_options["user"] = user
        if password is not None:
            self._connect_options["pass"] = password
        self.ready: Deferred[NatsClientProtocol] = Deferred(canceller=self._abort)
        #: The latest ``INFO`` options; ``None`` until the first arrives.
        self.server_info: dict | None = None
        self._parser = NatsParser(max_payload=MAX_PAYLOAD_CEILING, follow_info=False)
        self._pongs: deque[Deferred[None]] = deque()
        self._subscribers: dict[str, Subscriber] = {}
        self._sids = itertools.count(1)
        self._connected = False
        self._lost_reason: Failure | None = None
        self._lost_waiters: list[Deferred[Exception]] = []

    # -- Twisted callbacks ---------------------------------------------------

    def connectionMade(self) -> None:
        # Without TCP_NODELAY, Nagle's algorithm holds a small PUB back until the
        # previous segment is acknowledged, and delayed ACKs make that 40 ms.
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._parser.feed(data)
        except NatsProtocolError:
            self._log.failure("NATS protocol violation by the server; aborting the connection")
            self._fail_handshake(Failure())
            self.transport.abortConnection()
            return
        for frame in frames:
            self._handle(frame)

    def connectionLost(self, reason: Failure) -> None:
        self._connected = False
        self._lost_reason = reason
        self._fail_handshake(reason)
        pongs, self._pongs = self._pongs, deque()
        for pong in pongs:
            pong.errback(reason)
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(reason.value)

    # -- frames ---------------------------------------------------------------

    def _handle(self, frame: Frame) -> None:
        match frame:
            case Msg():
                self._deliver(frame)
            case Ping():
                self.transport.write(PONG)
            case Pong():
                self._on_pong()
            case Info():
                self._on_info(frame)
            case Err():
                self._on_error(frame.message)
            case Ok():
                pass  # only sent in verbose mode, which CONNECT turns off

    def _deliver(self, msg: Msg) -> None:
        subscriber = self._subscribers.get(msg.sid)
        if subscriber is None:  # in flight when unsubscribed
            return
        try:
            subscriber(msg.subject, msg.payload, msg.reply)
        except Exception:
            self._log.failure("subscriber callback failed for a message on {subject}", subject=msg.subject)

    def _on_pong(self) -> None:
        if self._pongs:
            self._pongs.popleft().callback(None)
        else:
            self._log.warn("unsolicited PONG from the server ignored")

    def _on_info(self, info: Info) -> None:
        first = self.server_info is None
        self.server_info = info.options
        if first:
            self.transport.write(connect_command(self._connect_options))
            handshake = self._ping()
            handshake.addCallbacks(self._become_ready, self._fail_handshake)

    def _on_error(self, message: str) -> None:
        if self.ready.called:
            self._log.error("nats-server reported: {message}", message=message)
            return
        self.ready.errback(_server_error(message))
        self.transport.loseConnection()

    def _become_ready(self, _: None) -> None:
        if not self.ready.called:
            self._connected = True
            self.ready.callback(self)

    def _abort(self, _: Deferred) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def _fail_handshake(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(reason)

    def _ping(self) -> Deferred[None]:
        """Queue a Deferred for the next PONG, then send PING (PONGs answer PINGs in order)."""
        pong: Deferred[None] = Deferred()
        self._pongs.append(pong)
        self.transport.write(PING)
        return pong

    # -- public API -----------------------------------------------------------

    def _require_connected(self) -> None:
        if not self._connected:
            raise NatsNotConnectedError("NATS connection is not ready or already lost")

    def publish(self, subject: str, payload: bytes, reply: str | None = None) -> None:
        """Send *payload* to *subject*; ``ValueError`` if it exceeds the server's ``max_payload``."""
        self._require_connected()
        limit = self.server_info.get("max_payload", DEFAULT_MAX_PAYLOAD)
        if len(payload) > limit:
            raise ValueError(f"payload of {len(payload)} bytes exceeds the server's max_payload {limit}")
        self.transport.write(pub_command(subject, payload, reply))

    def subscribe(self, subject: str, callback: Subscriber) -> int:
        """Call ``callback(subject, payload, reply)`` for each message on *subject*; returns the sid."""
        self._require_connected()
        sid = next(self._sids)
        command = sub_command(subject, sid)
        self._subscribers[str(sid)] = callback
        self.transport.write(command)
        return sid

    def unsubscribe(self, sid: int) -> None:
        """Stop delivery to *sid* at once, even of messages already in flight; unknown sids are ignored."""
        if self._subscribers.pop(str(sid), None) is not None and self._connected:
            self.transport.write(unsub_command(sid))

    def flush(self) -> Deferred[None]:
        """A PING/PONG round trip: fires once the server has processed everything sent before it."""
        self._require_connected()
        return self._ping()

    def when_connection_lost(self) -> Deferred[Exception]:
        """A new Deferred firing with the exception that ended the connection (``ConnectionDone`` if clean)."""
        if self._lost_reason is not None:
            return succeed(self._lost_reason.value)
        waiter: Deferred[Exception] = Deferred()
        self._lost_waiters.append(waiter)
        return waiter

    def close(self) -> Deferred[Exception]:
        """Close the connection; the result fires like :meth:`when_connection_lost`."""
        lost = self.when_connection_lost()
        self.transport.loseConnection()
        return lost


def connect_nats(reactor, host: str, port: int, *, timeout: float = 10, **options) -> Deferred[NatsClientProtocol]:
    """Connect to nats-server at *host*:*port* and fire with the protocol once :attr:`~NatsClientProtocol.ready`.

    *options* go to :class:`NatsClientProtocol` (``name``, ``user``, ``password``).
    *timeout* bounds the TCP connect and, separately, the handshake (a
    handshake timeout fails with :class:`twisted.internet.defer.TimeoutError`).
    When the handshake fails, the connection is closed before the result
    fails, so a failed attempt leaves nothing open behind it.
    """
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    connecting = connectProtocol(endpoint, NatsClientProtocol(**options))
    return connecting.addCallback(_handshake, reactor, timeout)


def _handshake(protocol: NatsClientProtocol, reactor, timeout: float) -> Deferred[NatsClientProtocol]:
    """*protocol*'s :attr:`~NatsClientProtocol.ready`, bounded by *timeout*, failing only once closed."""

    def close_then_fail(failure: Failure) -> Deferred:
        protocol.transport.abortConnection()
        return protocol.when_connection_lost().addCallback(lambda _: failure)

    return protocol.ready.addTimeout(timeout, reactor).addErrback(close_then_fail)

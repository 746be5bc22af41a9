"""NATS layer without a server or a reactor: subject mapping, codec, and the adapter on a fake transport."""
import json
import time

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dsmt.transports.psepr.channel import MAX_CHANNEL_BYTES, covers, validate_channel
from dsmt.transports.psepr.nats import (
    DEFAULT_MAX_PAYLOAD, MAX_CONTROL_LINE, MAX_PAYLOAD_CEILING, PING, PONG, Err, Info, Msg,
    NatsAuthorizationError, NatsClientProtocol, NatsNotConnectedError, NatsParser, NatsProtocolError,
    NatsServerError, Ok, Ping, Pong, channel_to_subject, connect_command, pub_command, sub_command,
    subject_to_channel, subtree_subjects, unsub_command)

# Characters channel.py allows in a segment.
CHANNEL_SEGMENT = st.text(alphabet="abcxyzABC0123456789._~:@+=,-", min_size=1, max_size=16)
CHANNEL = st.lists(CHANNEL_SEGMENT, max_size=8).map(lambda segments: "/" + "".join(s + "/" for s in segments))
# Anything but '/', to check the mapping stays total and reversible beyond valid channels.
ANY_SEGMENT = st.text(alphabet=st.characters(blacklist_characters="/", blacklist_categories=("Cs",)),
                      min_size=1, max_size=16)


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or token not in ("*", tokens[index]):
            return False
    return len(tokens) == len(wanted)


def server_msg(subject: str, sid: str, payload: bytes, reply: str | None = None) -> bytes:
    """The bytes nats-server sends for one message."""
    head = " ".join(["MSG", subject, sid] + ([reply] if reply else []) + [str(len(payload))])
    return head.encode() + b"\r\n" + payload + b"\r\n"


# -- subject mapping -------------------------------------------------------------

@pytest.mark.parametrize("channel, subject", [
    ("/", "psepr"),
    ("/a/", "psepr.a"),
    ("/a/b.c/", "psepr.a.b%2Ec"),
    ("/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-mgr/status/",
     "psepr.org.dsmt.ns.deployment.xyz1.org%2Edsmt%2Ecomponent%2Esliver-mgr.status"),
    ("/host:8080/user@site/k=v,w~x_y+z/", "psepr.host:8080.user@site.k=v,w~x_y+z"),
    ("/a*b/>/%/x y\t/", "psepr.a%2Ab.%3E.%25.x%20y%09"),
    ("/ü/", "psepr.%C3%BC"),
])
def test_channel_subject_examples(channel, subject):
    assert channel_to_subject(channel) == subject
    assert subject_to_channel(subject) == channel


@given(CHANNEL)
def test_valid_channels_round_trip_into_valid_subjects(channel):
    subject = channel_to_subject(channel)
    assert subject_to_channel(subject) == channel
    assert len(subject.split(".")) == channel.count("/")  # the root token, then one per segment
    sub_command(subject, 1)  # a legal subject: no whitespace, no empty token
    pub_command(subject, b"")  # and no wildcard


@given(st.lists(ANY_SEGMENT, max_size=6))
def test_mapping_is_total_and_reversible_on_any_segments(segments):
    channel = "/" + "".join(s + "/" for s in segments)
    subject = channel_to_subject(channel)
    assert subject_to_channel(subject) == channel
    assert len(subject.split(".")) == len(segments) + 1
    pub_command(subject, b"")


@pytest.mark.parametrize("channel", ["", "a/", "/a", "//", "/a//b/"])
def test_non_channels_are_refused(channel):
    with pytest.raises(ValueError):
        channel_to_subject(channel)


@pytest.mark.parametrize("subject", [
    "", "other.a", "psepr2.a", "psepr.", "psepr..a", "psepr.a.", "psepr.a%2eb", "psepr.%41", "psepr.a%2",
    "psepr.%zz", "psepr.%FF", "psepr.*", "psepr.>", "psepr.a b",
])
def test_non_canonical_subjects_are_refused(subject):
    with pytest.raises(ValueError):
        subject_to_channel(subject)


def test_subtree_subjects():
    assert subtree_subjects("/") == ("psepr", "psepr.>")
    assert subtree_subjects("/a/xyz1/") == ("psepr.a.xyz1", "psepr.a.xyz1.>")


def test_subtree_is_sibling_safe():
    own, below = subtree_subjects("/d/xyz1/")
    assert channel_to_subject("/d/xyz1.evil/") == "psepr.d.xyz1%2Eevil"  # one token, not xyz1 + evil
    for sibling in ["/d/xyz10/", "/d/xyz1.evil/", "/d/", "/d/xyz/"]:
        subject = channel_to_subject(sibling)
        assert not matches(own, subject) and not matches(below, subject), sibling
    for inside in ["/d/xyz1/", "/d/xyz1/status/", "/d/xyz1/a.b/c/"]:
        subject = channel_to_subject(inside)
        assert matches(own, subject) or matches(below, subject), inside


@given(CHANNEL, CHANNEL)
def test_subtree_covers_exactly_the_channels_below(lease, channel):
    covered = any(matches(pattern, channel_to_subject(channel)) for pattern in subtree_subjects(lease))
    assert covered == channel.startswith(lease) == covers(lease, channel)


def test_longest_channel_fits_the_control_line():
    worst = validate_channel("/" + "." * (MAX_CHANNEL_BYTES - 2) + "/")  # every segment byte escaped
    subject = channel_to_subject(worst)
    assert len(subject) == 3072
    assert len(sub_command(subtree_subjects(worst)[1], 2**31)) < MAX_CONTROL_LINE
    assert len(pub_command(subject, b"x" * 100, reply="_INBOX." + "r" * 64)) - 102 < MAX_CONTROL_LINE


# -- parser: well-formed input ---------------------------------------------------------

INFO_LINE = b'INFO {"server_id":"S","max_payload":2048,"proto":1} \r\n'


def test_parses_every_frame_type():
    frames = NatsParser().feed(
        INFO_LINE + b"PING\r\nPONG\r\n+OK\r\n-ERR 'Authorization Violation'\r\n"
        + server_msg("a.b", "7", b"hi") + server_msg("a.c", "8", b"\r\nx\r\n", reply="_INBOX.1")
        + server_msg("a.d", "9", b""))
    assert frames == [
        Info({"server_id": "S", "max_payload": 2048, "proto": 1}), Ping(), Pong(), Ok(),
        Err("Authorization Violation"), Msg("a.b", "7", None, b"hi"),
        Msg("a.c", "8", "_INBOX.1", b"\r\nx\r\n"), Msg("a.d", "9", None, b"")]


def test_operations_are_case_insensitive_and_arguments_may_use_tabs():
    assert NatsParser().feed(b"ping\r\nmsg a\t1  2\r\nok\r\n") == [Ping(), Msg("a", "1", None, b"ok")]


def test_info_max_payload_is_adopted_and_capped():
    parser = NatsParser()
    assert parser.max_payload == DEFAULT_MAX_PAYLOAD
    parser.feed(INFO_LINE)
    assert parser.max_payload == 2048
    parser.feed(b'INFO {"max_payload":%d}\r\n' % (10 * MAX_PAYLOAD_CEILING))
    assert parser.max_payload == MAX_PAYLOAD_CEILING


def test_incomplete_input_waits():
    parser = NatsParser()
    assert parser.feed(b"MSG a 1 5\r\nab") == []
    assert parser.feed(b"cde\r") == []
    assert parser.feed(b"\nPI") == [Msg("a", "1", None, b"abcde")]
    assert parser.feed(b"NG\r\n") == [Ping()]


MSGS = st.builds(
    server_msg,
    st.lists(st.text("abc%~", min_size=1, max_size=5), min_size=1, max_size=4).map(".".join),
    st.integers(1, 10**6).map(str),
    st.binary(max_size=64),
    st.none() | st.just("_INBOX.x"))


@given(st.lists(MSGS | st.sampled_from([b"PING\r\n", b"PONG\r\n", INFO_LINE]), max_size=10), st.data())
def test_any_chunking_gives_the_same_frames(pieces, data):
    stream = b"".join(pieces)
    whole = NatsParser().feed(stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    parser = NatsParser()
    chunked = []
    for start, stop in zip([0, *cuts], [*cuts, len(stream)]):
        chunked += parser.feed(stream[start:stop])
    assert chunked == whole
    assert len(whole) == len(pieces)


def test_byte_by_byte_feeding():
    stream = INFO_LINE + server_msg("x.y", "1", b"payload\r\n", reply="r") + b"PING\r\n"
    parser = NatsParser()
    frames = [frame for byte in stream for frame in parser.feed(bytes([byte]))]
    assert frames == NatsParser().feed(stream)


def test_many_messages_in_one_chunk_parse_in_linear_time():
    count = 100_000
    stream = server_msg("psepr.org.dsmt.status", "12", b"<event/>" * 16) * count
    started = time.perf_counter()
    frames = NatsParser().feed(stream)
    elapsed = time.perf_counter() - started
    assert len(frames) == count and frames[-1].payload == b"<event/>" * 16
    assert elapsed < 5, f"{count} messages took {elapsed:.2f} s"  # about 0.2 s; quadratic copying takes minutes


def test_large_payload_fed_in_small_chunks():
    payload = bytes(range(256)) * 4096  # exactly 1 MiB, the default max_payload
    stream = server_msg("big", "1", payload)
    parser = NatsParser()
    frames = []
    for start in range(0, len(stream), 4096):
        frames += parser.feed(stream[start:start + 4096])
    assert frames == [Msg("big", "1", None, payload)]


# -- parser: hostile input -----------------------------------------------------------

@pytest.mark.parametrize("stream, complaint", [
    (b"HMSG a 1 10 12\r\n", "HMSG"),
    (b"BOGUS\r\n", "unknown"),
    (b"\r\n", "unknown"),
    (b"PING extra\r\n", "unknown"),
    (b"MSG a 1\r\n", "3 or 4 arguments"),
    (b"MSG a 1 r x 2\r\n", "3 or 4 arguments"),
    (b"MSG a 1 -1\r\n", "decimal"),
    (b"MSG a 1 0x10\r\n", "decimal"),
    (b"MSG a 1 " + b"9" * 4000 + b"\r\n", "decimal"),
    (b"MSG a 1 1048577\r\n", "exceeds max_payload"),
    (b"MSG a 1 2\r\nabc\r\n", "not followed by CRLF"),
    (b"MSG \xff 1 1\r\n", "UTF-8"),
    (b"INFO {nope}\r\n", "JSON"),
    (b"INFO [1]\r\n", "JSON object"),
    (b"INFO " + b"[" * 4000 + b"\r\n", "JSON"),
    (b'INFO {"max_payload":-1}\r\n', "max_payload"),
    (b'INFO {"max_payload":true}\r\n', "max_payload"),
    (b"PING" + b" " * MAX_CONTROL_LINE + b"\r\n", "longer than 4096"),
    (b"x" * (MAX_CONTROL_LINE + 2), "longer than 4096"),
])
def test_hostile_input_is_refused_with_a_reason(stream, complaint):
    with pytest.raises(NatsProtocolError, match=complaint):
        NatsParser().feed(stream)


def test_control_line_limit_is_inclusive():
    line = b"-ERR '" + b"e" * (MAX_CONTROL_LINE - 7) + b"'"
    assert len(line) == MAX_CONTROL_LINE
    assert NatsParser().feed(line + b"\r\n") == [Err("e" * (MAX_CONTROL_LINE - 7))]


def test_unterminated_line_fails_once_it_cannot_fit():
    parser = NatsParser()
    for _ in range(MAX_CONTROL_LINE + 1):
        assert parser.feed(b"a") == []
    with pytest.raises(NatsProtocolError, match="longer than"):
        parser.feed(b"a")


def test_oversized_payload_is_refused_before_it_arrives():
    parser = NatsParser()
    parser.feed(INFO_LINE)
    with pytest.raises(NatsProtocolError, match="2049 bytes exceeds max_payload 2048"):
        parser.feed(b"MSG a 1 2049\r\n")


def test_parser_is_spent_after_an_error():
    parser = NatsParser()
    with pytest.raises(NatsProtocolError):
        parser.feed(b"BOGUS\r\n")
    with pytest.raises(NatsProtocolError, match="already failed"):
        parser.feed(b"PING\r\n")


@settings(max_examples=300)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_protocol_errors(data):
    try:
        NatsParser(max_control_line=128).feed(data)
    except NatsProtocolError:
        pass


@settings(max_examples=300)
@given(st.lists(st.sampled_from([b"MSG", b"INFO", b"PING", b"-ERR", b"HMSG", b" ", b"\r\n", b"\r", b"1", b"99",
                                 b"a.b", b"{", b"}", b'"max_payload":', b"-", b"\xff", b"\t"]), max_size=40),
       st.integers(1, 8))
def test_protocol_like_garbage_raises_only_protocol_errors(pieces, chunk):
    stream = b"".join(pieces)
    parser = NatsParser()
    try:
        for start in range(0, len(stream), chunk):
            parser.feed(stream[start:start + chunk])
    except NatsProtocolError:
        pass


# -- builders --------------------------------------------------------------------------------

def test_builders():
    assert PING == b"PING\r\n" and PONG == b"PONG\r\n"
    assert pub_command("a.b", b"hi") == b"PUB a.b 2\r\nhi\r\n"
    assert pub_command("a.b", b"", reply="_INBOX.1") == b"PUB a.b _INBOX.1 0\r\n\r\n"
    assert sub_command("a.*.c.>", 3) == b"SUB a.*.c.> 3\r\n"
    assert unsub_command(3) == b"UNSUB 3\r\n"
    assert unsub_command("3", max_msgs=5) == b"UNSUB 3 5\r\n"
    command = connect_command({"verbose": False, "name": "x\r\ny"})
    assert command.startswith(b"CONNECT ") and command.count(b"\r\n") == 1
    assert json.loads(command[8:]) == {"verbose": False, "name": "x\r\ny"}


@pytest.mark.parametrize("build", [
    lambda: pub_command("", b""),
    lambda: pub_command("a..b", b""),
    lambda: pub_command(".a", b""),
    lambda: pub_command("a b", b""),
    lambda: pub_command("a\r\nPUB", b""),
    lambda: pub_command("a.*", b""),
    lambda: pub_command("a.>", b""),
    lambda: pub_command("a", b"", reply="r.*"),
    lambda: sub_command("a.b*", 1),
    lambda: sub_command("a.>.b", 1),
    lambda: sub_command("a", "1 2"),
    lambda: sub_command("a", ""),
    lambda: sub_command("a" * MAX_CONTROL_LINE, 1),
    lambda: unsub_command(1, max_msgs=0),
    lambda: connect_command({"pass": "p" * MAX_CONTROL_LINE}),
])
def test_builders_refuse_what_the_server_would(build):
    with pytest.raises(ValueError):
        build()


# -- adapter on a fake transport ----------------------------------------------------------

class FakeTCPTransport(StringTransport):
    """A StringTransport that records TCP_NODELAY and aborts."""
    no_delay = aborted = False

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


class AdapterTests(SynchronousTestCase):
    def connect(self, **options):
        protocol = NatsClientProtocol(**options)
        transport = FakeTCPTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def handshake(self, **options):
        protocol, transport = self.connect(**options)
        protocol.dataReceived(INFO_LINE)
        transport.clear()
        protocol.dataReceived(b"PONG\r\n")
        self.successResultOf(protocol.ready)
        return protocol, transport

    def test_handshake(self):
        protocol, transport = self.connect(name="sliver-mgr", user="u", password="p")
        self.assertTrue(transport.no_delay)
        self.assertEqual(transport.value(), b"")  # nothing before INFO
        protocol.dataReceived(INFO_LINE)
        connect, ping = transport.value().split(b"\r\n", 1)
        self.assertEqual(ping, PING)
        self.assertEqual(json.loads(connect.removeprefix(b"CONNECT ")), {
            "verbose": False, "pedantic": False, "name": "sliver-mgr", "lang": "python-twisted",
            "protocol": 1, "headers": False, "user": "u", "pass": "p"})
        self.assertNoResult(protocol.ready)
        self.assertRaises(NatsNotConnectedError, protocol.publish, "a", b"")
        protocol.dataReceived(b"PONG\r\n")
        self.assertIs(self.successResultOf(protocol.ready), protocol)
        self.assertEqual(protocol.server_info["server_id"], "S")

    def test_error_during_handshake(self):
        for message, error in [("Authorization Violation", NatsAuthorizationError),
                               ("Authentication Timeout", NatsAuthorizationError),
                               ("Unknown Protocol Operation", NatsServerError)]:
            protocol, transport = self.connect()
            protocol.dataReceived(INFO_LINE + f"-ERR '{message}'\r\n".encode())
            failure = self.failureResultOf(protocol.ready, error)
            self.assertEqual(failure.value.message, message)
            self.assertTrue(transport.disconnecting)
            protocol.connectionLost(Failure(ConnectionDone()))  # the handshake PING is dropped quietly

    def test_connection_lost_during_handshake(self):
        protocol, _ = self.connect()
        protocol.dataReceived(INFO_LINE)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(protocol.ready, ConnectionDone)

    def test_cancelling_ready_aborts(self):
        protocol, transport = self.connect()
        protocol.ready.cancel()
        self.assertTrue(transport.aborted)
        self.failureResultOf(protocol.ready, CancelledError)

    def test_protocol_violation_aborts(self):
        protocol, transport = self.connect()
        protocol.dataReceived(b"HMSG a 1 0 0\r\n")
        self.failureResultOf(protocol.ready, NatsProtocolError)
        self.assertTrue(transport.aborted)
        self.assertEqual(len(self.flushLoggedErrors(NatsProtocolError)), 1)

    def test_answers_server_ping(self):
        protocol, transport = self.handshake()
        protocol.dataReceived(b"PING\r\n")
        self.assertEqual(transport.value(), PONG)

    def test_publish_subscribe_unsubscribe(self):
        protocol, transport = self.handshake()
        received = []
        sid = protocol.subscribe("a.>", lambda *message: received.append(message))
        self.assertEqual(transport.value(), b"SUB a.> %d\r\n" % sid)
        transport.clear()
        protocol.publish("a.b", b"x", reply="r")
        self.assertEqual(transport.value(), b"PUB a.b r 1\r\nx\r\n")
        protocol.dataReceived(server_msg("a.b", str(sid), b"x", reply="r") + server_msg("a.c", "999", b"y"))
        self.assertEqual(received, [("a.b", b"x", "r")])
        transport.clear()
        protocol.unsubscribe(sid)
        protocol.unsubscribe(sid)
        self.assertEqual(transport.value(), b"UNSUB %d\r\n" % sid)
        protocol.dataReceived(server_msg("a.b", str(sid), b"late"))  # in flight when unsubscribed
        self.assertEqual(len(received), 1)

    def test_publish_respects_server_max_payload(self):
        protocol, _ = self.handshake()
        protocol.publish("a", b"x" * 2048)
        self.assertRaises(ValueError, protocol.publish, "a", b"x" * 2049)

    def test_failing_subscriber_is_logged_and_isolated(self):
        protocol, transport = self.handshake()
        received = []
        bad = protocol.subscribe("a", lambda *message: 1 / 0)
        good = protocol.subscribe("a", lambda *message: received.append(message))
        protocol.dataReceived(server_msg("a", str(bad), b"1") + server_msg("a", str(good), b"2"))
        self.assertEqual(received, [("a", b"2", None)])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertFalse(transport.disconnecting)

    def test_flush_fires_in_order(self):
        protocol, transport = self.handshake()
        first, second = protocol.flush(), protocol.flush()
        self.assertEqual(transport.value(), PING * 2)
        protocol.dataReceived(b"PONG\r\n")
        self.successResultOf(first)
        self.assertNoResult(second)
        protocol.dataReceived(b"PONG\r\n")
        self.successResultOf(second)

    def test_later_info_updates_and_later_error_is_logged(self):
        protocol, transport = self.handshake()
        protocol.dataReceived(b'INFO {"server_id":"S","max_payload":4096,"connect_urls":["x:1"]}\r\n'
                              b"-ERR 'Permissions Violation for Publish to a'\r\n")
        self.assertEqual(protocol.server_info["connect_urls"], ["x:1"])
        self.assertEqual(transport.value(), b"")  # no second CONNECT
        self.assertFalse(transport.disconnecting)

    def test_connection_lost(self):
        protocol, _ = self.handshake()
        pending = protocol.flush()
        lost = protocol.when_connection_lost()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(pending, ConnectionDone)
        self.assertIsInstance(self.successResultOf(lost), ConnectionDone)
        self.assertIsInstance(self.successResultOf(protocol.when_connection_lost()), ConnectionDone)
        self.assertRaises(NatsNotConnectedError, protocol.subscribe, "a", print)
        protocol.unsubscribe(1)  # harmless once closed

    def test_close(self):
        protocol, transport = self.handshake()
        closed = protocol.close()
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closed)

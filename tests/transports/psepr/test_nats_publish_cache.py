"""The remembered NATS subjects and ``PUB`` prefixes: same bytes, same refusals, bounded caches."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from dsmt.transports.psepr import nats
from dsmt.transports.psepr.nats import (
    CRLF, MAX_CONTROL_LINE, SUBJECT_CACHE_SIZE, NatsClientProtocol, channel_to_subject, pub_command)

from tests.transports.psepr.test_nats_protocol import FakeTCPTransport


def uncached_pub(subject: str, payload: bytes) -> bytes:
    """``pub_command`` as it was built before the prefix was remembered."""
    raw = nats._subject_bytes(subject, wildcards=False)
    return nats._command(b"PUB", raw, b"%d" % len(payload)) + payload + CRLF


_segment = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8).filter(
    lambda text: "/" not in text)


@given(st.lists(_segment, max_size=4), st.binary(max_size=64))
def test_cached_subject_and_pub_are_what_they_were(segments, payload):
    channel = "/" + "".join(segment + "/" for segment in segments)
    subject = channel_to_subject(channel)
    assert subject == channel_to_subject.__wrapped__(channel)
    assert channel_to_subject(channel) == subject  # remembered: same answer
    assert pub_command(subject, payload) == uncached_pub(subject, payload)
    assert pub_command(subject, payload) == pub_command(subject, payload, reply=None)


@pytest.mark.parametrize("subject", ["", "a..b", ".a", "a b", "a\r\nPUB", "a.*", "a.>"])
def test_invalid_subjects_are_refused_every_time(subject):
    for _ in range(2):  # a refusal is never remembered as an answer
        with pytest.raises(ValueError):
            pub_command(subject, b"x")


@pytest.mark.parametrize("channel", ["", "a/", "/a", "//", "/a//b/"])
def test_invalid_channels_are_refused_every_time(channel):
    for _ in range(2):
        with pytest.raises(ValueError):
            channel_to_subject(channel)


def test_control_line_limit_is_exact():
    # "PUB " + subject + " " + size: the longest subject that fits with a 1-digit size, then one more byte
    subject = "s" * (MAX_CONTROL_LINE - len("PUB  1"))
    assert pub_command(subject, b"x") == b"PUB " + subject.encode() + b" 1\r\nx\r\n"
    with pytest.raises(ValueError, match=f"PUB line of {MAX_CONTROL_LINE + 1} bytes exceeds {MAX_CONTROL_LINE}"):
        pub_command(subject, b"x" * 10)  # the same subject, remembered, with a 2-digit size
    with pytest.raises(ValueError, match=f"exceeds {MAX_CONTROL_LINE}"):
        pub_command(subject + "s", b"x")


def test_caches_are_bounded():
    assert channel_to_subject.cache_info().maxsize == SUBJECT_CACHE_SIZE
    assert nats._pub_prefix.cache_info().maxsize == SUBJECT_CACHE_SIZE


def test_publish_still_checks_the_servers_max_payload():
    protocol = NatsClientProtocol()
    transport = FakeTCPTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b'INFO {"server_id":"S","max_payload":16}\r\n')
    protocol.dataReceived(b"PONG\r\n")
    transport.clear()
    subject = channel_to_subject("/a/b/")
    protocol.publish(subject, b"x" * 16)
    assert transport.value() == b"PUB psepr.a.b 16\r\n" + b"x" * 16 + b"\r\n"
    with pytest.raises(ValueError, match="exceeds the server's max_payload 16"):
        protocol.publish(subject, b"x" * 17)

"""Channel-name rules and subtree coverage."""
import pytest
from hypothesis import given, strategies as st

from dsmt.transports.psepr.channel import (
    MAX_CHANNEL_BYTES, ChannelError, channel_segments, covers, join_channel, validate_channel)

SEGMENT = st.text(alphabet="abcXYZ019._~:@+=,-", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@pytest.mark.parametrize("channel", [
    "/", "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-mgr/status/",
    "/a/", "/host:8080/user@site/k=v,w/",
])
def test_valid_channels(channel):
    assert validate_channel(channel) == channel


@pytest.mark.parametrize("channel, complaint", [
    ("", "empty"),
    ("a/b/", "begin and end"),
    ("/a/b", "begin and end"),
    ("/a//b/", "empty segment"),
    ("/a/../b/", "relative segment"),
    ("/a/ b/", "not allowed"),
    ("/a/*/", "not allowed"),
    ("/a/>/", "not allowed"),
    ("/caf\u00e9/", "not allowed"),
    ("/a\x00/", "not allowed"),
    ("/" + "a" * MAX_CHANNEL_BYTES + "/", "longer than 1024"),
])
def test_invalid_channels_name_the_problem(channel, complaint):
    with pytest.raises(ChannelError, match=complaint):
        validate_channel(channel)


def test_non_text_channel_is_refused():
    with pytest.raises(ChannelError, match="text"):
        validate_channel(b"/a/")


@given(st.lists(SEGMENT, max_size=8))
def test_join_and_split_round_trip(segments):
    assert channel_segments(join_channel(*segments)) == tuple(segments)


def test_covers_is_segment_wise():
    assert covers("/", "/anything/")
    assert covers("/xyz1/", "/xyz1/")
    assert covers("/xyz1/", "/xyz1/a/b/")
    assert not covers("/xyz1/", "/xyz10/")
    assert not covers("/xyz1/", "/xyz1.evil/")
    assert not covers("/xyz1/a/", "/xyz1/")

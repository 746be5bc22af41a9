"""PsEPR channel names.

A channel is a slash path that begins and ends with ``/``; ``/`` alone is the
root.  Between the slashes are non-empty segments made of letters, digits and
``. _ ~ : @ + = , -`` — enough for host names, slice names and dotted component
names (``org.dsmt.component.sliver-mgr``), and nothing that needs quoting in
XML, a URL path or a shell.  ``.`` and ``..`` alone are refused so every
channel has one spelling.

A lease on a channel covers the channel and every channel below it, segment by
segment: ``/xyz1/`` covers ``/xyz1/a/`` but not ``/xyz10/`` nor ``/xyz1.evil/``.
"""
from __future__ import annotations

import functools
import re

__all__ = ["ChannelError", "MAX_CHANNEL_BYTES", "validate_channel", "channel_problem", "channel_segments", "covers",
           "join_channel"]

#: Longest channel name in bytes.  The NATS backend maps a channel to a subject
#: whose ``.`` characters are escaped as ``%2E`` (at worst three times longer)
#: and NATS refuses control lines over 4096 bytes; 1024 keeps the longest
#: mapped subject (3072 bytes plus a root token and the command) under that.
#: Real channels are under 200 bytes.
MAX_CHANNEL_BYTES = 1024

_SEGMENT = re.compile(r"[A-Za-z0-9._~:@+=,\-]+\Z")


class ChannelError(ValueError):
    """A channel name breaks the rules above; the message says which."""


def validate_channel(channel: str) -> str:
    """Return ``channel`` unchanged if it is a valid channel name, else raise :class:`ChannelError`."""
    channel_segments(channel)
    return channel


def channel_segments(channel: str) -> tuple[str, ...]:
    """The segments of a valid channel (``()`` for the root ``/``)."""
    if not isinstance(channel, str):
        raise ChannelError(f"channel must be text, not {type(channel).__name__}")
    if not channel:
        raise ChannelError("channel is empty")
    if len(channel.encode("utf-8")) > MAX_CHANNEL_BYTES:
        raise ChannelError(f"channel is longer than {MAX_CHANNEL_BYTES} bytes")
    if channel[0] != "/" or channel[-1] != "/":
        raise ChannelError(f"channel {channel[:80]!r} must begin and end with '/'")
    if channel == "/":
        return ()
    segments = tuple(channel[1:-1].split("/"))
    for segment in segments:
        if not segment:
            raise ChannelError(f"channel {channel[:80]!r} has an empty segment ('//')")
        if segment in (".", ".."):
            raise ChannelError(f"channel {channel[:80]!r} has a relative segment {segment!r}")
        if not _SEGMENT.match(segment):
            bad = next(ch for ch in segment if not _SEGMENT.match(ch))
            raise ChannelError(f"channel {channel[:80]!r} has a character not allowed in channels: {bad!r}")
    return segments


@functools.lru_cache(maxsize=8192)
def channel_problem(channel: str) -> str | None:
    """None for a valid channel, else the reason; cached, for hot paths where the same channels recur."""
    try:
        channel_segments(channel)
    except ChannelError as exc:
        return str(exc)
    return None


def covers(lease_channel: str, channel: str) -> bool:
    """True when a lease on ``lease_channel`` receives events sent to ``channel``."""
    return channel.startswith(lease_channel)


def join_channel(*segments: str) -> str:
    """Build a channel from segments and validate it: ``join_channel('a', 'b') == '/a/b/'``."""
    channel = "/" + "".join(segment + "/" for segment in segments)
    return validate_channel(channel)

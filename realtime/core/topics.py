"""Channel names and MQTT-style topic filters (`+` one level, `#` the rest).

The same filters serve token permissions (`"subscribe": ["rooms/+", "users/alice/#"]`) and,
later, MQTT subscriptions, so WebSocket apps and MQTT devices share one permission model.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_CHANNEL_BYTES = 255


def channel_error(channel: str) -> str | None:
    """Why `channel` is not a valid channel name, or None when it is."""
    if not channel:
        return "channel name is empty"
    if len(channel.encode()) > MAX_CHANNEL_BYTES:
        return f"channel name is longer than {MAX_CHANNEL_BYTES} bytes"
    if channel[0] == "$":
        return "channel names starting with '$' are reserved"
    for char in channel:
        if char in "+#" or char <= " " or char == "\x7f":
            return f"channel name may not contain {char!r}"
    return None


def filter_error(topic_filter: str) -> str | None:
    """Why `topic_filter` is not a valid filter, or None when it is."""
    if not topic_filter:
        return "filter is empty"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole last level"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def filter_matches(topic_filter: str, channel: str) -> bool:
    if topic_filter == channel:
        return True
    if "+" not in topic_filter and "#" not in topic_filter:
        return False
    levels = channel.split("/")
    parts = topic_filter.split("/")
    for i, part in enumerate(parts):
        if part == "#":
            return True
        if i >= len(levels):
            return False
        if part != "+" and part != levels[i]:
            return False
    return len(parts) == len(levels)


class FilterSet:
    """A set of filters with a fast path for exact names."""

    __slots__ = ("exact", "wildcards")

    def __init__(self, filters: Iterable[str]) -> None:
        self.exact: frozenset[str] = frozenset(f for f in filters if "+" not in f and "#" not in f)
        self.wildcards: tuple[str, ...] = tuple(f for f in filters if "+" in f or "#" in f)

    def matches(self, channel: str) -> bool:
        if channel in self.exact:
            return True
        return any(filter_matches(f, channel) for f in self.wildcards)

    def __bool__(self) -> bool:
        return bool(self.exact or self.wildcards)

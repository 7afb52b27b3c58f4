"""Topic name and topic filter syntax (3.1.1 section 4.7, 5.0 section 4.7 and 4.8.2).

Pure checks, no matching: the decoder uses them on every PUBLISH, SUBSCRIBE and UNSUBSCRIBE,
and a session can use them on names it builds. Both assume a string that already passed the
UTF-8 checks (no U+0000).
"""

from __future__ import annotations

from typing import Final

SHARE_PREFIX: Final = "$share/"


def is_valid_topic_name(topic: str) -> bool:
    """At least one character, no wildcard (MQTT-4.7.3-1, MQTT-3.3.2-2)."""
    return bool(topic) and "+" not in topic and "#" not in topic


def split_shared(topic_filter: str) -> tuple[str, str] | None:
    """``(share name, filter)`` for a 5.0 shared subscription ``$share/{name}/{filter}``."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    name, sep, rest = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not sep:
        return None
    return name, rest


def is_valid_topic_filter(topic_filter: str, *, shared: bool = False) -> bool:
    """At least one character; ``+`` alone in its level; ``#`` alone and last.

    With ``shared`` (5.0), ``$share/{name}/{filter}`` also needs a non-empty share name
    without ``/``, ``+`` or ``#`` and a valid filter after it; in 3.1.1 it is a plain filter.
    """
    if shared and topic_filter.startswith(SHARE_PREFIX):
        parts = split_shared(topic_filter)
        if parts is None:
            return False
        name, topic_filter = parts
        if not name or "+" in name or "#" in name:
            return False
    if not topic_filter:
        return False
    if "+" not in topic_filter and "#" not in topic_filter:
        return True
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if level == "+":
            continue
        if level == "#":
            if index != last:
                return False
        elif "+" in level or "#" in level:
            return False
    return True

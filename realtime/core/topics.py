"""Channel names and MQTT-style topic filters (`+` one level, `#` the rest).

The same filters serve token permissions (`"subscribe": ["rooms/+", "users/alice/#"]`) and,
later, MQTT subscriptions, so WebSocket apps and MQTT devices share one permission model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

MAX_CHANNEL_BYTES = 255
# Wildcards, whitespace, control characters: one regex scan instead of a Python loop (this
# runs on every publication).
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f+#]")


def channel_error(channel: str) -> str | None:
    """Why `channel` is not a valid channel name, or None when it is."""
    if not channel:
        return "channel name is empty"
    if len(channel.encode()) > MAX_CHANNEL_BYTES:
        return f"channel name is longer than {MAX_CHANNEL_BYTES} bytes"
    if channel[0] == "$":
        return "channel names starting with '$' are reserved"
    bad = _FORBIDDEN.search(channel)
    if bad is not None:
        return f"channel name may not contain {bad.group()!r}"
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


def is_exact(topic_filter: str) -> bool:
    """True for a filter that names one channel (no wildcard, not `$share/...`, not a
    `$` topic): what makes an MQTT device present in a channel."""
    return "+" not in topic_filter and "#" not in topic_filter and not topic_filter.startswith("$")


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


def filter_covers(permission: str, topic_filter: str) -> bool:
    """True when every channel `topic_filter` can match is matched by `permission`
    (so a wildcard subscription is allowed only inside what the token grants)."""
    granted = permission.split("/")
    wanted = topic_filter.split("/")
    for i, level in enumerate(granted):
        if level == "#":
            return True
        if i >= len(wanted) or wanted[i] == "#":
            return False
        if level != "+" and level != wanted[i]:
            return False  # a literal never covers "+" or another literal
    return len(granted) == len(wanted)


class FilterSet:
    """A set of filters with a fast path for exact names."""

    __slots__ = ("everything", "exact", "wildcards")

    def __init__(self, filters: Iterable[str]) -> None:
        filters = tuple(filters)
        self.exact: frozenset[str] = frozenset(f for f in filters if "+" not in f and "#" not in f)
        self.wildcards: tuple[str, ...] = tuple(f for f in filters if "+" in f or "#" in f)
        self.everything = "#" in self.wildcards  # device tokens often grant "#"

    def matches(self, channel: str) -> bool:
        if self.everything or channel in self.exact:
            return True
        return any(filter_matches(f, channel) for f in self.wildcards)

    def covers(self, topic_filter: str) -> bool:
        if topic_filter in self.exact:
            return True
        return any(filter_covers(f, topic_filter) for f in self.wildcards)

    def __bool__(self) -> bool:
        return bool(self.exact or self.wildcards)


_MEMO_SIZE = 4096


# Shared by every node until it needs a dict of its own: most nodes are leaves (a device's
# own topic) that use one of the three, and idle memory per connection counts. Never
# written to: every write site swaps in a fresh dict first.
_NONE: dict[Any, Any] = {}
_MISSING: Any = object()  # a pop's default: values may be None


class _Node(Generic[K, V]):
    __slots__ = ("children", "members", "multi", "single")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K, V]] = _NONE
        self.single: _Node[K, V] | None = None  # the "+" child
        self.multi: dict[K, V] = _NONE  # members of "<this level>/#"
        self.members: dict[K, V] = _NONE  # members of a filter ending here

    def empty(self) -> bool:
        return not (self.children or self.single or self.multi or self.members)


class _One(Generic[K, V]):
    """The only member of an exact filter: a topic's own device, most often. 48 bytes,
    where a one-entry dict costs ~220."""

    __slots__ = ("member", "value")

    def __init__(self, member: K, value: V) -> None:
        self.member = member
        self.value = value


class FilterTrie(Generic[K, V]):
    """Filters -> {member: value}, matched against a channel. Wildcard filters live in a
    trie, matched level by level, so the cost of a publication does not grow with the
    number of filters; filters without wildcards (a device's own topic, the common case) in
    a dict by topic, with no trie node, and no dict of members while there is only one."""

    def __init__(self) -> None:
        self._root: _Node[K, V] = _Node()
        self._exact: dict[str, _One[K, V] | dict[K, V]] = {}
        self.size = 0
        # channel -> match result; publications repeat channels, subscriptions change
        # rarely. A change to an exact filter drops its own channel (unless it only changed
        # a members dict that memoized results share); a wildcard one's clears them all.
        self._memo: dict[str, list[dict[K, V]]] = {}

    def add(self, topic_filter: str, member: K, value: V) -> None:
        if "+" not in topic_filter and "#" not in topic_filter:
            self._add_exact(topic_filter, member, value)
            return
        self._memo.clear()
        node = self._root
        levels = topic_filter.split("/")
        for level in levels:
            if level == "#":
                if member not in node.multi:
                    self.size += 1
                if node.multi is _NONE:
                    node.multi = {}
                node.multi[member] = value
                return
            if level == "+":
                if node.single is None:
                    node.single = _Node()
                node = node.single
            else:
                child = node.children.get(level)
                if child is None:
                    if node.children is _NONE:
                        node.children = {}
                    child = node.children[level] = _Node()
                node = child
        if member not in node.members:
            self.size += 1
        if node.members is _NONE:
            node.members = {}
        node.members[member] = value

    def _add_exact(self, topic: str, member: K, value: V) -> None:
        entry = self._exact.get(topic)
        if isinstance(entry, dict):
            if member not in entry:
                self.size += 1
            entry[member] = value
            return
        if entry is None:
            self._exact[topic] = _One(member, value)
            self.size += 1
        elif entry.member == member:
            entry.value = value
        else:
            self._exact[topic] = {entry.member: entry.value, member: value}
            self.size += 1
        self._memo.pop(topic, None)

    def remove(self, topic_filter: str, member: K) -> bool:
        if "+" not in topic_filter and "#" not in topic_filter:
            return self._remove_exact(topic_filter, member)
        self._memo.clear()
        path: list[tuple[_Node[K, V], str]] = []
        node: _Node[K, V] | None = self._root
        for level in topic_filter.split("/"):
            assert node is not None
            if level == "#":
                if node.multi.pop(member, _MISSING) is _MISSING:
                    return False
                path.append((node, ""))
                break
            path.append((node, level))
            node = node.single if level == "+" else node.children.get(level)
            if node is None:
                return False
        else:
            assert node is not None
            if node.members.pop(member, _MISSING) is _MISSING:
                return False
            path.append((node, ""))
        self.size -= 1
        # Prune empty nodes bottom-up.
        for (parent, level), (child, _) in zip(
            reversed(path[:-1]), reversed(path[1:]), strict=True
        ):
            if not child.empty():
                break
            if level == "+":
                parent.single = None
            else:
                del parent.children[level]
        return True

    def _remove_exact(self, topic: str, member: K) -> bool:
        entry = self._exact.get(topic)
        if entry is None:
            return False
        if isinstance(entry, dict):
            if entry.pop(member, _MISSING) is _MISSING:
                return False
            if len(entry) == 1:
                ((other, value),) = entry.items()
                self._exact[topic] = _One(other, value)
                self._memo.pop(topic, None)
        elif entry.member == member:
            del self._exact[topic]
            self._memo.pop(topic, None)
        else:
            return False
        self.size -= 1
        return True

    def get(self, topic_filter: str, member: K) -> V | None:
        """The value `member` has under `topic_filter`, or None."""
        if "+" not in topic_filter and "#" not in topic_filter:
            entry = self._exact.get(topic_filter)
            if isinstance(entry, dict):
                return entry.get(member)
            return entry.value if entry is not None and entry.member == member else None
        node = self._root
        for level in topic_filter.split("/"):
            if level == "#":
                return node.multi.get(member)
            child = node.single if level == "+" else node.children.get(level)
            if child is None:
                return None
            node = child
        return node.members.get(member)

    def match(self, channel: str) -> list[dict[K, V]]:
        """The member dicts of every filter that matches `channel` (do not modify)."""
        found = self._memo.get(channel)
        if found is None:
            found = self._match(channel)
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[channel] = found
        return found

    def _match(self, channel: str) -> list[dict[K, V]]:
        exact = self._exact.get(channel)
        found: list[dict[K, V]]
        if exact is None:
            found = []
        elif isinstance(exact, dict):
            found = [exact]
        else:
            found = [{exact.member: exact.value}]  # kept in the memo while it is used
        levels = channel.split("/")
        last = len(levels)

        def walk(node: _Node[K, V], i: int) -> None:
            if node.multi:  # "a/#" also matches "a" itself
                found.append(node.multi)
            if i == last:
                if node.members:
                    found.append(node.members)
                return
            child = node.children.get(levels[i])
            if child is not None:
                walk(child, i + 1)
            if node.single is not None:
                walk(node.single, i + 1)

        walk(self._root, 0)
        return found

"""Channels and their local subscribers; fan-out of publications.

Subscribers are grouped by wire format (a transport and an encoding, e.g. WebSocket +
protobuf). A publication is encoded *and framed* once per format that has subscribers,
and the same bytes are pushed to each subscriber's outbound queue: no per-delivery
encoding, framing, task, future or log line.

A subscriber that is still recovering (its subscribe reply is being built from history) is
*buffering*: publications for it are kept aside and merged, by offset, when the reply is
ready, so nothing is lost or doubled while history and live traffic race.
"""

from __future__ import annotations

from typing import Protocol

from realtime.core.broker import Publication
from realtime.core.writer import Outbound


class WireFormat(Protocol):
    """What a kind of connection receives: complete, ready-to-write bytes."""

    def frame(self, message: bytes) -> bytes:
        """Wrap one encoded message for the transport."""
        ...

    def encode_publication(
        self,
        channel: str,
        offset: int,
        data: bytes,
        user: str,
        client: str,
        tags: dict[str, str] | None,
    ) -> bytes: ...


class Channel:
    __slots__ = ("buffering", "groups", "name", "size")

    def __init__(self, name: str) -> None:
        self.name = name
        self.groups: dict[WireFormat, set[Outbound]] = {}
        self.buffering: dict[Outbound, list[Publication]] = {}
        self.size = 0


class Hub:
    def __init__(self) -> None:
        self.channels: dict[str, Channel] = {}
        self.deliveries = 0  # messages handed to outbound queues, for metrics
        self.publications = 0

    def add(self, channel: str, outbound: Outbound, fmt: WireFormat, *, buffering: bool) -> bool:
        """Add a subscriber; True when it is the channel's first on this node."""
        ch = self.channels.get(channel)
        first = ch is None
        if ch is None:
            ch = self.channels[channel] = Channel(channel)
        if buffering:
            ch.buffering[outbound] = []
        else:
            ch.groups.setdefault(fmt, set()).add(outbound)
        ch.size += 1
        return first

    def go_live(self, channel: str, outbound: Outbound, fmt: WireFormat) -> list[Publication]:
        """End buffering: the subscriber gets live publications from now on. Returns what
        was buffered, in arrival order."""
        ch = self.channels[channel]
        buffered = ch.buffering.pop(outbound)
        ch.groups.setdefault(fmt, set()).add(outbound)
        return buffered

    def remove(self, channel: str, outbound: Outbound, fmt: WireFormat) -> bool:
        """Remove a subscriber; True when the channel has no local subscriber left."""
        ch = self.channels.get(channel)
        if ch is None:
            return False
        group = ch.groups.get(fmt)
        if group is not None and outbound in group:
            group.discard(outbound)
            if not group:
                del ch.groups[fmt]
        elif ch.buffering.pop(outbound, None) is None:
            return False
        ch.size -= 1
        if ch.size == 0:
            del self.channels[channel]
            return True
        return False

    def handle_publication(self, channel: str, pub: Publication) -> None:
        ch = self.channels.get(channel)
        if ch is None:
            return
        self.publications += 1
        for fmt, outbounds in ch.groups.items():
            payload = fmt.encode_publication(
                channel, pub.offset, pub.data, pub.user, pub.client, pub.tags
            )
            for outbound in outbounds:
                outbound.push(payload)
            self.deliveries += len(outbounds)
        if ch.buffering:
            for pending in ch.buffering.values():
                pending.append(pub)

    def subscriber_count(self, channel: str) -> int:
        ch = self.channels.get(channel)
        return ch.size if ch is not None else 0

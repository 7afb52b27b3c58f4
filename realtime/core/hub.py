"""Channels and their local subscribers; fan-out of publications.

Subscribers are grouped by wire format (a transport and an encoding, e.g. WebSocket +
protobuf). A publication is encoded *and framed* once per format that has subscribers,
and the same bytes are pushed to each subscriber's outbound queue: no per-delivery
encoding, framing, task, future or log line.

A subscriber that is still recovering (its subscribe reply is being built from history) is
*buffering*: publications for it are kept aside and merged, by offset, when the reply is
ready, so nothing is lost or doubled while history and live traffic race.

Filter subscribers (MQTT sessions: wildcards, a QoS and a packet id per delivery) live in a
`FilterTrie`. Each gets a publication once, with every matching subscription's value, so
overlapping filters deliver one copy (at the highest QoS, with all subscription ids).
"""

from __future__ import annotations

from typing import Protocol

from realtime.core.broker import Publication
from realtime.core.topics import FilterTrie
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


class FilterSubscriber(Protocol):
    def deliver(self, channel: str, pub: Publication, matched: list[object]) -> None:
        """`matched`: the values of every subscription of this subscriber that matched."""
        ...


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
        self.filters: FilterTrie[FilterSubscriber, object] = FilterTrie()
        self.deliveries = 0  # messages handed to outbound queues, for metrics

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
        if self.filters.size:
            self._deliver_filtered(channel, pub)
        ch = self.channels.get(channel)
        if ch is None:
            return
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

    def add_filter(self, topic_filter: str, member: FilterSubscriber, value: object) -> None:
        self.filters.add(topic_filter, member, value)

    def remove_filter(self, topic_filter: str, member: FilterSubscriber) -> bool:
        return self.filters.remove(topic_filter, member)

    def _deliver_filtered(self, channel: str, pub: Publication) -> None:
        found = self.filters.match(channel)
        if not found:
            return
        if len(found) == 1:
            members = found[0]
            for member, value in members.items():
                member.deliver(channel, pub, [value])
            self.deliveries += len(members)
            return
        merged: dict[FilterSubscriber, list[object]] = {}
        for members in found:
            for member, value in members.items():
                merged.setdefault(member, []).append(value)
        for member, values in merged.items():
            member.deliver(channel, pub, values)
        self.deliveries += len(merged)

    def subscriber_count(self, channel: str) -> int:
        ch = self.channels.get(channel)
        return ch.size if ch is not None else 0

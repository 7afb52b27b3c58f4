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

Delta subscribers (WebSocket clients that asked for Fossil deltas) are kept apart: *fresh*
ones get the next publication in full, then become *ready* and get a delta against the
channel's previous publication. The delta is computed once per publication, and only when
the offsets are consecutive, so a lost publication never becomes a wrong base.

Ephemeral events (join, leave, typing) go to the live WebSocket subscribers only, encoded
once per wire format. The hub also remembers who is typing where, so it can tell receivers
that typing ended (timeout, or the typist published in the channel).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from realtime.core.broker import Publication, StreamPosition
from realtime.core.topics import FilterTrie
from realtime.core.writer import Outbound
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.delta import make_delta


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
        delta: bool = False,
    ) -> bytes: ...

    def encode_reply(self, reply: pb.Reply) -> bytes:
        """A complete frame carrying `reply` (pushes, pings)."""
        ...


class FilterSubscriber(Protocol):
    def deliver(self, channel: str, pub: Publication, matched: list[object]) -> None:
        """`matched`: the values of every subscription of this subscriber that matched."""
        ...


class DeltaGroup:
    """Delta subscribers of one wire format in one channel."""

    __slots__ = ("fresh", "ready")

    def __init__(self) -> None:
        self.fresh: set[Outbound] = set()  # the next publication goes to them in full
        self.ready: set[Outbound] = set()  # they hold the previous publication as a base


class Channel:
    __slots__ = (
        "buffering",
        "deltas",
        "epoch",
        "groups",
        "last",
        "name",
        "offset",
        "size",
        "typing",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.groups: dict[WireFormat, set[Outbound]] = {}
        self.buffering: dict[Outbound, list[Publication]] = {}
        self.deltas: dict[WireFormat, DeltaGroup] | None = None
        self.last: Publication | None = None  # the delta base, while there are deltas
        # user -> (client, typing expires at) for typists seen here.
        self.typing: dict[str, tuple[str, float]] | None = None
        self.size = 0
        # The stream position of the last publication handed to its subscribers (epoch
        # from the latest subscribe; "" for a channel without history).
        self.offset = 0
        self.epoch = ""


class Hub:
    def __init__(self) -> None:
        self.channels: dict[str, Channel] = {}
        self.filters: FilterTrie[FilterSubscriber, object] = FilterTrie()
        self.deliveries = 0  # messages handed to outbound queues, for metrics
        self.deltas_sent = 0  # deliveries that carried a delta instead of the payload
        self.typing_channels: set[str] = set()  # channels with a typist seen here
        # The outbound of a local client by id (set by the node): typing never goes back
        # to the connection that typed.
        self.outbound_of: Callable[[str], Outbound | None] = lambda client: None

    def add(
        self,
        channel: str,
        outbound: Outbound,
        fmt: WireFormat,
        *,
        buffering: bool,
        delta: bool = False,
    ) -> bool:
        """Add a subscriber; True when it is the channel's first on this node."""
        ch = self.channels.get(channel)
        first = ch is None
        if ch is None:
            ch = self.channels[channel] = Channel(channel)
        if buffering:
            ch.buffering[outbound] = []
        else:
            self._join(ch, outbound, fmt, delta)
        ch.size += 1
        return first

    @staticmethod
    def _join(ch: Channel, outbound: Outbound, fmt: WireFormat, delta: bool) -> None:
        if not delta:
            ch.groups.setdefault(fmt, set()).add(outbound)
            return
        if ch.deltas is None:
            ch.deltas = {}
        group = ch.deltas.get(fmt)
        if group is None:
            group = ch.deltas[fmt] = DeltaGroup()
        group.fresh.add(outbound)

    def go_live(
        self, channel: str, outbound: Outbound, fmt: WireFormat, delta: bool = False
    ) -> list[Publication]:
        """End buffering: the subscriber gets live publications from now on. Returns what
        was buffered, in arrival order."""
        ch = self.channels[channel]
        buffered = ch.buffering.pop(outbound)
        self._join(ch, outbound, fmt, delta)
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
        elif ch.buffering.pop(outbound, None) is None and not self._leave_delta(ch, outbound, fmt):
            return False
        ch.size -= 1
        if ch.size == 0:
            del self.channels[channel]
            self.typing_channels.discard(channel)
            return True
        return False

    @staticmethod
    def _leave_delta(ch: Channel, outbound: Outbound, fmt: WireFormat) -> bool:
        group = ch.deltas.get(fmt) if ch.deltas else None
        if group is None or (outbound not in group.fresh and outbound not in group.ready):
            return False
        group.fresh.discard(outbound)
        group.ready.discard(outbound)
        if not group.fresh and not group.ready:
            assert ch.deltas is not None
            del ch.deltas[fmt]
            if not ch.deltas:
                ch.deltas = None
                ch.last = None
        return True

    def handle_publication(self, channel: str, pub: Publication) -> None:
        if self.filters.size:
            self._deliver_filtered(channel, pub)
        ch = self.channels.get(channel)
        if ch is None:
            return
        ch.offset = pub.offset
        if ch.deltas is not None:
            self._deliver_with_deltas(ch, channel, pub)
        else:
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
        if ch.typing is not None and pub.user in ch.typing:
            # Publishing ends typing (the message the user was typing has arrived).
            client, _ = ch.typing.pop(pub.user)
            self._push_typing(ch, pub.user, client, active=False)

    def _deliver_with_deltas(self, ch: Channel, channel: str, pub: Publication) -> None:
        assert ch.deltas is not None
        last, ch.last = ch.last, pub
        delta: bytes | None = None
        if last is not None and pub.offset and pub.offset == last.offset + 1:
            delta = make_delta(last.data, pub.data)
        full: dict[WireFormat, bytes] = {}
        for fmt, outbounds in ch.groups.items():
            payload = full[fmt] = fmt.encode_publication(
                channel, pub.offset, pub.data, pub.user, pub.client, pub.tags
            )
            for outbound in outbounds:
                outbound.push(payload)
            self.deliveries += len(outbounds)
        for fmt, group in ch.deltas.items():
            if group.ready:
                if delta is not None:
                    payload = fmt.encode_publication(
                        channel, pub.offset, delta, pub.user, pub.client, pub.tags, True
                    )
                    self.deltas_sent += len(group.ready)
                else:
                    payload = self._full(full, fmt, channel, pub)
                for outbound in group.ready:
                    outbound.push(payload)
                self.deliveries += len(group.ready)
            if group.fresh:
                payload = self._full(full, fmt, channel, pub)
                for outbound in group.fresh:
                    outbound.push(payload)
                self.deliveries += len(group.fresh)
                group.ready |= group.fresh
                group.fresh = set()

    @staticmethod
    def _full(
        full: dict[WireFormat, bytes], fmt: WireFormat, channel: str, pub: Publication
    ) -> bytes:
        """The full encoding for `fmt`, made once per publication."""
        payload = full.get(fmt)
        if payload is None:
            payload = full[fmt] = fmt.encode_publication(
                channel, pub.offset, pub.data, pub.user, pub.client, pub.tags
            )
        return payload

    # ------------------------------------------------------------------ ephemeral events

    def note_position(self, channel: str, top: StreamPosition, delivered: int) -> None:
        """A subscribe read the stream's `top`; `delivered` is the last offset its
        subscriber got (the backlog may reach past the top)."""
        ch = self.channels.get(channel)
        if ch is None:
            return
        if ch.epoch != top.epoch:
            ch.epoch, ch.offset = top.epoch, delivered
        elif delivered > ch.offset:
            ch.offset = delivered

    def position(self, channel: str) -> StreamPosition | None:
        """Where this node's subscribers of `channel` are, or None when unknown."""
        ch = self.channels.get(channel)
        if ch is None or not ch.epoch:
            return None
        return StreamPosition(ch.offset, ch.epoch)

    def push_event(self, channel: str, reply: pb.Reply, exclude: Outbound | None = None) -> int:
        """Send a push (join, leave, typing) to the channel's live WebSocket subscribers,
        except `exclude`; returns how many got it."""
        ch = self.channels.get(channel)
        if ch is None:
            return 0
        return self._push(ch, reply, exclude)

    def _push(self, ch: Channel, reply: pb.Reply, exclude: Outbound | None) -> int:
        encoded: dict[WireFormat, bytes] = {}
        sent = 0
        groups = list(ch.groups.items())
        if ch.deltas:
            for fmt, group in ch.deltas.items():
                groups.append((fmt, group.fresh))
                groups.append((fmt, group.ready))
        for fmt, outbounds in groups:
            if not outbounds:
                continue
            payload = encoded.get(fmt)
            if payload is None:
                payload = encoded[fmt] = fmt.encode_reply(reply)
            for outbound in outbounds:
                if outbound is not exclude:
                    outbound.push(payload)
                    sent += 1
        return sent

    def typing_started(self, channel: str, user: str, client: str, until: float) -> None:
        ch = self.channels.get(channel)
        if ch is None:
            return
        if ch.typing is None:
            ch.typing = {}
            self.typing_channels.add(channel)
        ch.typing[user] = (client, until)
        self._push_typing(ch, user, client, active=True)

    def typing_stopped(self, channel: str, user: str) -> None:
        ch = self.channels.get(channel)
        if ch is None or ch.typing is None or user not in ch.typing:
            return
        client, _ = ch.typing.pop(user)
        self._push_typing(ch, user, client, active=False)

    def _push_typing(self, ch: Channel, user: str, client: str, *, active: bool) -> None:
        if ch.typing is not None and not ch.typing:
            ch.typing = None
            self.typing_channels.discard(ch.name)
        typing = pb.Typing(user=user, client=client, active=active)
        reply = pb.Reply(push=pb.Push(channel=ch.name, typing=typing))
        self._push(ch, reply, self.outbound_of(client))

    def expire_typing(self, now: float) -> None:
        """Tell receivers that typing stopped where it was not renewed in time."""
        for channel in list(self.typing_channels):
            ch = self.channels.get(channel)
            if ch is None or ch.typing is None:
                self.typing_channels.discard(channel)
                continue
            for user, (client, until) in list(ch.typing.items()):
                if until <= now:
                    del ch.typing[user]
                    self._push_typing(ch, user, client, active=False)

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

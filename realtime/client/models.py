"""Value types handed to applications."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from realtime.protocol import realtime_pb2 as pb

__all__ = [
    "Backgrounded",
    "ChannelPoll",
    "ClientInfo",
    "PollResult",
    "PresenceStats",
    "Publication",
    "StreamPosition",
    "Typing",
    "UserStatus",
]


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """A position in a channel's stream: ``offset`` within the stream generation ``epoch``."""

    offset: int
    epoch: str

    @classmethod
    def from_pb(cls, position: pb.StreamPosition) -> StreamPosition:
        return cls(offset=position.offset, epoch=position.epoch)

    def to_pb(self) -> pb.StreamPosition:
        return pb.StreamPosition(offset=self.offset, epoch=self.epoch)


@dataclass(frozen=True, slots=True)
class Publication:
    """One message published on a channel.

    ``offset`` is the position in the channel's stream, 0 when the channel keeps no
    history. ``user``/``client`` identify the publisher when the server tells. ``data``
    is always the full payload, also on subscriptions that receive Fossil deltas (the
    subscription applies them).
    """

    channel: str
    offset: int
    data: bytes
    user: str = ""
    client: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_pb(
        cls, channel: str, publication: pb.Publication, data: bytes | None = None
    ) -> Publication:
        """``data`` replaces the message's own (a delta already applied)."""
        return cls(
            channel=channel,
            offset=publication.offset,
            data=publication.data if data is None else data,
            user=publication.info.user,
            client=publication.info.client,
            tags=dict(publication.tags),
        )


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """A connection present in a channel (presence, join and leave events).

    ``client`` is the connection id (a WebSocket client id or an MQTT client id),
    ``device`` and ``info`` the token's ``device`` and ``info`` claims (``info`` as JSON
    bytes, empty when the token has none; see :meth:`info_json`), ``transport``
    ``"websocket"`` or ``"mqtt"`` (presence results; may be empty in events).
    """

    user: str
    client: str
    device: str = ""
    info: bytes = b""
    transport: str = ""

    @classmethod
    def from_pb(cls, info: pb.ClientInfo) -> ClientInfo:
        return cls(
            user=info.user,
            client=info.client,
            device=info.device,
            info=info.info,
            transport=info.transport,
        )

    def info_json(self) -> Any:
        """``info`` decoded from JSON; None when there is none."""
        return json.loads(self.info) if self.info else None


@dataclass(frozen=True, slots=True)
class PresenceStats:
    """How many connections (``clients``) and distinct users are present in a channel."""

    clients: int
    users: int


@dataclass(frozen=True, slots=True)
class UserStatus:
    """Whether ``user`` is connected, and when they last were (Unix time in seconds: now
    when online; 0 when not seen within the server's ``presence.last_seen_ttl``)."""

    user: str
    online: bool
    last_seen: int

    @classmethod
    def from_pb(cls, status: pb.UserStatus) -> UserStatus:
        return cls(user=status.user, online=status.online, last_seen=status.last_seen)


@dataclass(frozen=True, slots=True)
class Typing:
    """Someone else's typing state in ``channel`` changed.

    ``active`` False means they stopped: they said so, published in the channel, or did
    not renew within the namespace's ``typing_timeout``.
    """

    channel: str
    user: str
    client: str
    active: bool

    @classmethod
    def from_pb(cls, channel: str, typing: pb.Typing) -> Typing:
        return cls(channel=channel, user=typing.user, client=typing.client, active=typing.active)


@dataclass(frozen=True, slots=True)
class Backgrounded:
    """The gateway's answer to :meth:`Client.background`: the position it keeps of each
    of the connection's channels (what a poll starts from; channels without history at
    offset 0) and how many seconds it keeps the detached session (``detach_ttl``)."""

    positions: dict[str, StreamPosition]
    detach_ttl: int

    @classmethod
    def from_pb(cls, result: pb.AppStateResult) -> Backgrounded:
        positions = {ch: StreamPosition.from_pb(p) for ch, p in result.positions.items()}
        return cls(positions=positions, detach_ttl=result.detach_ttl)


@dataclass(frozen=True, slots=True)
class ChannelPoll:
    """One channel in a :class:`PollResult`.

    ``publications`` are those after the position polled from, in stream order, with
    their offsets (the same the socket delivers: dedupe by offset). ``position`` is where
    the next poll (or the foreground subscribe, as ``since``) goes on from. ``recovered``
    False: history no longer reaches back to the position polled from (or the stream was
    reset): no publications, ``position`` is the stream's top, reload the channel.
    """

    channel: str
    publications: list[Publication]
    position: StreamPosition
    recovered: bool


@dataclass(frozen=True, slots=True)
class PollResult:
    """One answer of ``GET /v1/poll`` (:meth:`Client.poll`): the device's channels that
    keep history, and ``more`` when the page was full (poll again at once)."""

    channels: dict[str, ChannelPoll]
    more: bool

    @property
    def positions(self) -> dict[str, StreamPosition]:
        """The position reached in each channel: ``since`` of the next poll, and of
        ``Client.subscribe(channel, since=...)`` on coming back to the foreground."""
        return {channel: found.position for channel, found in self.channels.items()}

    @property
    def publications(self) -> list[Publication]:
        """Every channel's publications, channel by channel (each in stream order)."""
        return [pub for found in self.channels.values() for pub in found.publications]

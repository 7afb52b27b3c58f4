"""The broker interface the hub talks to, and the values that cross it.

A broker assigns stream positions, keeps channel history and carries publications between
nodes. The memory broker (embedded default) runs one node alone; a Redis broker joins many.
The contract every implementation keeps:

- `publish` stores the publication in history and assigns its offset *atomically* with
  delivery, so every node and every recovery sees the same order; it returns the position.
- a node receives publications only for channels it `subscribe`d to (per node, not per
  client), through the `BrokerHandler` given to `start`.
- `history(since=...)` returns the publications after a position, oldest first, plus the
  current top position, from which the caller decides whether recovery is complete.
- presence entries live for a TTL and are refreshed by re-adding them, so a node that dies
  without cleaning up leaves nothing behind for long; an entry that expires is announced
  to the handler as a leave event, like a clean removal.
- ephemeral events (join, leave, typing) reach every node subscribed to the channel, like
  publications, but are never stored and carry no position.
- when publications of subscribed channels may have been lost on the way to this node
  (its pub/sub link to a Redis instance dropped and came back, or its pub/sub queue
  overflowed), the broker calls `handle_stream_gap` with those channels, once it receives
  them again; their subscribers must recover from their last position. A broker that
  cannot lose a publication on the way (the memory broker) never calls it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class StreamPosition:
    offset: int
    epoch: str


class Publication:
    """One publication as it travels through the node. Immutable by convention."""

    __slots__ = ("client", "data", "meta", "offset", "tags", "user")

    def __init__(
        self,
        offset: int,
        data: bytes,
        user: str = "",
        client: str = "",
        tags: dict[str, str] | None = None,
        meta: object = None,
    ) -> None:
        self.offset = offset
        self.data = data
        self.user = user
        self.client = client
        self.tags = tags
        # Transport details the hub carries untouched (MQTT: QoS, retain, v5 properties).
        self.meta = meta

    def __repr__(self) -> str:
        return f"Publication(offset={self.offset}, {len(self.data)} bytes)"


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    """How much history a channel keeps (from its namespace)."""

    size: int
    ttl: float  # seconds a publication stays in history
    meta_ttl: float  # seconds an idle stream's epoch/offset are kept


@dataclass(frozen=True, slots=True)
class PresenceEntry:
    """One client present in a channel: a WebSocket connection or an MQTT device."""

    client: str
    user: str
    device: str = ""
    info: dict[str, Any] | None = None
    transport: str = ""  # "websocket" or "mqtt"


JOIN, LEAVE, TYPING = "join", "leave", "typing"


@dataclass(frozen=True, slots=True)
class ChannelEvent:
    """Something that happened in a channel and is not a publication: never stored,
    never recovered, never a mobile push."""

    kind: str  # JOIN, LEAVE or TYPING
    entry: PresenceEntry  # who (for TYPING only client and user matter)
    active: bool = False  # TYPING: started (True) or stopped (False)


@dataclass(frozen=True, slots=True)
class UserStatus:
    user: str
    online: bool
    last_seen: float  # unix time; 0 when unknown


@dataclass(frozen=True, slots=True)
class PresenceStats:
    clients: int
    users: int


@dataclass(frozen=True, slots=True)
class PublishResult:
    position: StreamPosition  # offset 0 and epoch "" when the channel keeps no history
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class HistoryResult:
    publications: list[Publication]
    position: StreamPosition  # the stream's top when history was read


class BrokerUnavailable(Exception):
    """The broker cannot take the operation now; the caller should retry later."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BrokerHandler(Protocol):
    def handle_publication(self, channel: str, pub: Publication) -> None: ...

    def handle_event(self, channel: str, event: ChannelEvent) -> None: ...

    def handle_stream_gap(self, channels: list[str]) -> None:
        """Publications of these channels may have been lost on the way to this node
        (pub/sub reconnect, queue overflow); their subscribers must recover."""
        ...


class Broker(ABC):
    """What the hub needs from a broker. All methods may raise BrokerUnavailable."""

    name: str
    # True when `publish_nowait` works (nothing to wait for, as in the memory broker).
    publishes_at_once = False
    # True when the calling node is the broker's only node (the memory broker): what the
    # node knows itself, such as who is connected, is all there is, and need not be
    # written to the broker for other nodes.
    single_node = False

    @abstractmethod
    async def start(self, handler: BrokerHandler) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        user: str = "",
        client: str = "",
        tags: dict[str, str] | None = None,
        history: HistoryPolicy | None = None,
        idempotency_key: str = "",
        idempotency_ttl: float = 300.0,
        meta: object = None,
    ) -> PublishResult: ...

    def publish_nowait(
        self,
        channel: str,
        data: bytes,
        user: str,
        client: str,
        history: HistoryPolicy | None,
        idempotency_ttl: float,
        meta: object,
    ) -> PublishResult | None:
        """`publish` (without idempotency key or tags) done at once, for brokers that never
        need to wait; the others return None and the caller awaits `publish`."""
        return None

    @abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Start receiving this channel's publications on this node (`channel` may be an
        MQTT-style filter with `+` and `#`)."""

    @abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving them (the last local subscriber left)."""

    @abstractmethod
    async def history(
        self,
        channel: str,
        policy: HistoryPolicy,
        *,
        since: StreamPosition | None = None,
        limit: int = 0,
        reverse: bool = False,
    ) -> HistoryResult:
        """Publications after `since` (all retained ones when None), oldest first.

        `limit` 0 means no limit and a negative limit only reads the position. With
        `reverse` the newest come first (and `limit` keeps the newest).

        When `since` is from another epoch, returns no publications and the current top.
        """

    @abstractmethod
    async def publish_event(self, channel: str, event: ChannelEvent) -> None:
        """Hand `event` to every node subscribed to `channel` (this one included)."""

    @abstractmethod
    async def add_presence(self, channel: str, entry: PresenceEntry, ttl: float) -> bool:
        """Add or refresh `entry`; it disappears `ttl` seconds after its last refresh.
        True when it was not present before."""

    async def refresh_presence(self, entries: list[tuple[str, PresenceEntry]], ttl: float) -> None:
        """Refresh many entries at once (brokers may batch this)."""
        for channel, entry in entries:
            await self.add_presence(channel, entry, ttl)

    @abstractmethod
    async def remove_presence(self, channel: str, client: str) -> bool:
        """True when the entry was present."""

    @abstractmethod
    async def presence(self, channel: str) -> dict[str, PresenceEntry]:
        """Live entries by client id."""

    @abstractmethod
    async def presence_stats(self, channel: str) -> PresenceStats: ...

    @abstractmethod
    async def set_users_online(self, users: list[str], ttl: float, last_seen_ttl: float) -> None:
        """Mark users online (from this node) for `ttl` seconds; last seen = now."""

    @abstractmethod
    async def set_user_offline(self, user: str, last_seen_ttl: float) -> None:
        """This node has no connection of `user` left; last seen = now."""

    @abstractmethod
    async def user_status(self, users: list[str]) -> list[UserStatus]:
        """Online state and last-seen time, in the order asked."""

    @abstractmethod
    async def set_retained(self, channel: str, pub: Publication | None) -> None:
        """Keep `pub` as the channel's retained message (None or empty data clears it)."""

    @abstractmethod
    async def retained(self, topic_filter: str) -> list[tuple[str, Publication]]:
        """Retained messages of the channels `topic_filter` matches."""

    async def position(self, channel: str, policy: HistoryPolicy) -> StreamPosition:
        """The stream's current top (creating the stream so its epoch is stable)."""
        return (await self.history(channel, policy, limit=-1)).position

    async def housekeeping(self, now: float) -> None:  # noqa: B027 - optional hook
        """Called about once a second: expire what has to expire."""

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
- such a broker (`delivery_may_gap`) also answers `positions`, the tops of many streams
  at once, so that the node can notice a loss that no later publication reveals.
- control messages (`send_control`) reach every node, or the one named, through the same
  pub/sub as publications (so they are as lossy: requests carry timeouts); nodes list
  themselves with their load (`register_node`, `nodes`).
- a multi-node broker may offer a `SessionStore` (`session_store`): MQTT persistent
  sessions that a device can resume through any node.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from realtime.core.devices import DetachedStore, DeviceRegistry


@dataclass(frozen=True, slots=True)
class StreamPosition:
    offset: int
    epoch: str


class Publication:
    """One publication as it travels through the node. Immutable by convention."""

    __slots__ = ("client", "data", "epoch", "meta", "offset", "tags", "user")

    def __init__(
        self,
        offset: int,
        data: bytes,
        user: str = "",
        client: str = "",
        tags: dict[str, str] | None = None,
        meta: object = None,
        epoch: str = "",
    ) -> None:
        self.offset = offset
        self.data = data
        self.user = user
        self.client = client
        self.tags = tags
        # Transport details the hub carries untouched (MQTT: QoS, retain, v5 properties).
        self.meta = meta
        # The stream's epoch, where the broker carries it with each publication (Redis);
        # "" where it does not (the memory broker, whose deliveries cannot gap).
        self.epoch = epoch

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


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """A message between nodes: a request, its answer, or a notice."""

    kind: str  # what to do ("disconnect_user", "mqtt_takeover", ...) or REPLY
    sender: str  # node id
    target: str = ""  # node id; "" for every node (the sender included)
    request: int = 0  # request number, for the answer; 0 when none is wanted
    body: dict[str, Any] | None = None


REPLY = "reply"


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

    def handle_control(self, message: ControlMessage) -> None:
        """A control message for this node (or for every node)."""
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
    # True when publications can be lost on the way to this node (Redis pub/sub): the node
    # then notes what it received of each channel and checks it against `positions`.
    delivery_may_gap = False
    # This node's identity among the broker's nodes; new on every start of the process.
    node_id: str = ""
    # MQTT persistent sessions shared by the nodes (None: each node keeps its own).
    session_store: SessionStore | None = None
    # Mobile devices (core/devices.py): push tokens, and sessions of apps that are away.
    device_registry: DeviceRegistry
    detached_sessions: DetachedStore

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

    async def histories(
        self, reads: Mapping[str, tuple[HistoryPolicy, StreamPosition]]
    ) -> dict[str, HistoryResult]:
        """`history(channel, policy, since=position)` of many channels (brokers batch
        this: one round trip per instance)."""
        return {
            channel: await self.history(channel, policy, since=since)
            for channel, (policy, since) in reads.items()
        }

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

    async def positions(self, channels: Mapping[str, HistoryPolicy]) -> dict[str, StreamPosition]:
        """The current tops of many streams (as `position`, which creates a missing stream
        so its epoch is stable). Channels whose position cannot be read now (their broker
        instance is unavailable) are left out of the answer. Brokers batch this."""
        tops: dict[str, StreamPosition] = {}
        for channel, policy in channels.items():
            try:
                tops[channel] = await self.position(channel, policy)
            except BrokerUnavailable:
                continue
        return tops

    async def housekeeping(self, now: float) -> None:  # noqa: B027 - optional hook
        """Called about once a second: expire what has to expire."""

    # ------------------------------------------------------------------ nodes

    @abstractmethod
    async def send_control(self, message: ControlMessage) -> None:
        """Hand `message` to its target node, or to every node (this one included)."""

    @abstractmethod
    async def register_node(self, info: dict[str, Any], ttl: float) -> None:
        """List this node (`info`: JSON-able, with its load) for `ttl` seconds."""

    @abstractmethod
    async def unregister_node(self) -> None:
        """This node stops: take it off the list at once."""

    @abstractmethod
    async def nodes(self) -> list[dict[str, Any]]:
        """The listed nodes' latest `info`, each with its `node_id`."""


@dataclass(slots=True)
class StoredMessage:
    """A QoS 1/2 message of an MQTT session, as kept between nodes."""

    channel: str
    data: bytes
    qos: int
    retain: bool
    properties: Any  # realtime.mqtt.packets.Properties or None
    expires_at: float = 0.0  # unix time; 0 = never
    packet_id: int = 0  # in flight under this id (0: queued, never sent)
    released: bool = False  # QoS 2: PUBREC received, PUBREL sent


@dataclass(slots=True)
class StoredSubscription:
    topic_filter: str
    options: int  # the 5.0 subscription options byte
    identifier: int = 0


@dataclass(slots=True)
class StoredSession:
    """An MQTT session as another node needs it to carry on."""

    user: str
    expiry: int  # seconds it outlives its connection (0xFFFFFFFF: never expires)
    subscriptions: list[StoredSubscription]
    messages: list[StoredMessage]  # in flight first (by packet id), then queued, in order
    next_packet_id: int = 1


@dataclass(frozen=True, slots=True)
class SessionClaim:
    """The answer to `SessionStore.claim`."""

    owner: str  # node id that held the session before ("" when none did)
    exists: bool  # a stored session was found
    subscriptions: list[StoredSubscription]


class SessionStore(ABC):
    """MQTT persistent sessions kept outside any node, so a device can come back through
    any node. One node owns a session at a time: the one its device is connected to, or
    the one it was connected to last (which queues for it meanwhile)."""

    @abstractmethod
    async def claim(self, client_id: str, user: str) -> SessionClaim | None:
        """Make this node the session's owner; None when it belongs to another user."""

    @abstractmethod
    async def load(self, client_id: str) -> StoredSession | None:
        """The whole stored session (its queue handed over: the caller holds it now)."""

    @abstractmethod
    async def save(
        self, client_id: str, session: StoredSession, ttl: float, *, handing_to: str = ""
    ) -> None:
        """Replace the stored session if this node (or `handing_to`) owns it; it
        disappears `ttl` seconds after the last save or touch (0: never)."""

    @abstractmethod
    async def append(self, queued: dict[str, list[StoredMessage]], limit: int) -> None:
        """Messages queued for absent devices, appended to their sessions (at most
        `limit` per session)."""

    @abstractmethod
    async def touch(self, ttls: dict[str, float]) -> None:
        """Keep these sessions for `ttl` more seconds (0: never expire)."""

    @abstractmethod
    async def delete(self, client_id: str) -> None:
        """The session ended (if this node still owns it)."""

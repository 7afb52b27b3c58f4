"""The node: sessions, the hub and the broker together; the operations all transports share.

Client commands and the server API both end up here (publish, subscribe with recovery,
history, presence, typing, disconnect). The node is the broker's handler: publications
go straight to the hub; ephemeral events (join, leave, typing) are checked against the
channel's namespace first; a stream gap (publications may have been lost on the way to
this node) ends the local WebSocket subscriptions of the channels that keep history with
an `unsubscribe` push (code 2500) that tells their clients to resubscribe with recovery;
where publications can be lost on the way, the node also checks what it received against
the streams' positions to find such gaps itself (`core/positions.py`).
One housekeeping task per node does what would otherwise need a timer per connection:
pings in buckets, token expiry, connect deadlines, presence refresh, typing expiry.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import socket
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from realtime import __version__
from realtime.auth import Principal, TokenVerifier
from realtime.config import Config, NamespaceConfig, parse_version
from realtime.core.background import BackgroundApps
from realtime.core.broker import (
    TYPING,
    Broker,
    BrokerUnavailable,
    ChannelEvent,
    HistoryPolicy,
    HistoryResult,
    PresenceEntry,
    PresenceStats,
    Publication,
    PublishResult,
    StreamPosition,
    UserStatus,
)
from realtime.core.cluster import Cluster
from realtime.core.devices import BACKGROUND, DROPPED, PROVIDERS, DeviceRecord
from realtime.core.hub import Hub, WireFormat
from realtime.core.poll import PollGate
from realtime.core.positions import PositionTracker
from realtime.core.presence import PresenceTracker
from realtime.core.ratelimit import TokenBucket
from realtime.core.replies import pb_client_info, pb_position, pb_publications
from realtime.core.session import CLOSING, CONNECTED, Session
from realtime.core.topics import channel_error
from realtime.core.typing_state import TypingThrottle
from realtime.core.writer import FlushScheduler, Outbound
from realtime.log import event
from realtime.metrics import Metrics
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codes import Action, CloseCode, ErrorCode, ProtocolError, UnsubscribeCode
from realtime.protocol.delta import DELTA_TYPES

if TYPE_CHECKING:
    from realtime.core.mqtt_session import MqttServer

log = logging.getLogger("realtime.node")

MAX_HISTORY_LIMIT = 1000
MAX_PUSH_TOKEN_BYTES = 4096
PUSH_ENVIRONMENTS = ("production", "sandbox")
DEVICE_PRUNE_INTERVAL = 86_400.0  # seconds between two prunings of unused push tokens
PING = pb.Reply(push=pb.Push(ping=pb.ServerPing()))


def _printable_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable() and " " not in text


def _check_id(what: str, value: str) -> None:
    if not value or len(value) > 256:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what} must be 1..256 characters")


def _check_text(what: str, value: str, limit: int) -> None:
    if len(value) > limit or not value.isprintable():
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"{what} must be printable, at most {limit} characters"
        )


class Namespace:
    __slots__ = ("config", "history", "name")

    def __init__(self, name: str, config: NamespaceConfig) -> None:
        self.name = name
        self.config = config
        self.history = (
            HistoryPolicy(config.history_size, config.history_ttl, config.history_meta_ttl)
            if config.history_size > 0
            else None
        )


class Node:
    def __init__(self, config: Config, broker: Broker, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.broker = broker
        self.loop = loop
        self.name = config.server.node_name or socket.gethostname()
        self.version = __version__
        self.verifier = TokenVerifier(config.auth)
        self.metrics = Metrics()
        self.hub = Hub()
        self.flusher = FlushScheduler(loop)
        self.namespaces = {name: Namespace(name, ns) for name, ns in config.namespaces.items()}
        self.min_versions: dict[str, tuple[int, ...]] = {}
        for platform, text in config.client.min_version.items():
            version = parse_version(text)
            assert version is not None  # validated with the config
            self.min_versions[platform] = version
        self.sessions: set[Session] = set()  # every open transport session
        self.by_id: dict[str, Session] = {}
        self.connecting: set[Session] = set()  # not yet through connect
        self.users: dict[str, set[Session]] = {}  # connected sessions by user
        self.user_buckets: dict[str, TokenBucket] = {}
        self.draining = False
        self.ready = False
        self._expiry: list[tuple[float, int, Session]] = []
        self._expiry_seq = 0
        interval = config.client.ping_interval
        self._ping_buckets: list[set[Session]] = [set() for _ in range(interval)]
        self._ping_next = 0
        self._ping_second: int | None = None  # the last second whose bucket was pinged
        self._pings: dict[WireFormat, bytes] = {}  # one shared ping frame per wire format
        self._housekeeper: asyncio.Task[None] | None = None
        # Other protocols' once-a-second work (MQTT keep-alive).
        self.tickers: list[Callable[[float], None]] = []
        self._filter_refs: dict[str, int] = {}
        self.wall_time = time.time
        self.presence = PresenceTracker(broker, config.presence, loop)
        self.typing = TypingThrottle()
        self._typing_tasks: set[asyncio.Task[None]] = set()  # stops sent for closed typists
        self._typing_horizon = max(ns.typing_timeout for ns in config.namespaces.values())
        # Broker handler: publications go to the hub without an extra call, unless they can
        # be lost on the way: then their positions are noted and checked (core/positions.py).
        self.handle_publication = self.hub.handle_publication
        self.positions = PositionTracker(config.broker.position_check_interval)
        self._tracking = broker.delivery_may_gap
        self._position_check: asyncio.Task[None] | None = None
        if self._tracking:
            self.handle_publication = self._handle_publication_checked
        self.hub.outbound_of = self._outbound_of
        self.mqtt: MqttServer | None = None  # set by the MQTT server, when enabled
        self.cluster = Cluster(
            broker,
            self.name,
            self._load,
            announce_interval=config.broker.node_announce_interval,
            node_ttl=config.broker.node_ttl,
            request_timeout=config.broker.control_timeout,
        )
        self.handle_control = self.cluster.handle
        self.background = BackgroundApps(self)
        self.polls = PollGate(config.background)
        self.cluster.on("disconnect_user", self._disconnect_user_request)
        # Push tokens unused for push.token_max_idle_days are pruned once a day (first a
        # few minutes after start, so that nodes restarted often still do it).
        self._device_prune_at = loop.time() + random.uniform(60.0, 600.0)
        self._device_tasks: set[asyncio.Task[Any]] = set()
        self._register_gauges()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.broker.start(self)
        await self.cluster.announce(self.loop.time())
        self._housekeeper = self.loop.create_task(self._housekeeping())
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for task in (self._housekeeper, self._position_check):
            # Cancelled again until it ends: Python 3.11's asyncio.wait_for (redis-py
            # sends with it) swallows a cancellation that races the result it waits for.
            while task is not None and not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.5)
        for task in list(self._device_tasks) + list(self._typing_tasks):
            task.cancel()  # touches, pruning, typing stops: made up later or expire
        await self.background.close()
        await self.cluster.leave()
        await self.broker.close()

    def _register_gauges(self) -> None:
        m = self.metrics
        m.gauge("connections", "Open client connections.", lambda: len(self.sessions))
        m.gauge("users", "Distinct connected users.", lambda: len(self.users))
        m.gauge("channels", "Channels with local subscribers.", lambda: len(self.hub.channels))
        m.gauge(
            "subscriptions",
            "Client subscriptions on this node.",
            lambda: sum(ch.size for ch in self.hub.channels.values()),
        )
        m.gauge("draining", "1 while the node shuts down.", lambda: float(self.draining))
        m.deliveries = lambda: self.hub.deliveries
        m.delta_deliveries = lambda: self.hub.deltas_sent
        self.positions.register_metrics(m)
        m.gauge(
            "presence_entries",
            "Presence entries this node keeps alive.",
            lambda: sum(len(c) for c in self.presence.local.values()),
        )

    # ------------------------------------------------------------------ sessions

    def attach(self, session: Session) -> None:
        """A transport opened a session (not yet connected)."""
        self.sessions.add(session)
        self.by_id[session.id] = session
        self.connecting.add(session)

    def _outbound_of(self, client: str) -> Outbound | None:
        session = self.by_id.get(client)
        return session.outbound if session is not None else None

    def register(self, session: Session) -> None:
        """The session completed connect."""
        assert session.principal is not None
        self.connecting.discard(session)
        self.users.setdefault(session.principal.user, set()).add(session)
        self._ping_buckets[self._ping_next].add(session)
        self._ping_next = (self._ping_next + 1) % len(self._ping_buckets)
        self.metrics.connections_accepted += 1
        self.presence.user_connected(session.principal.user)
        if session.principal.device:  # its push token was used now: off the hot path
            self._device_task(self._touch_device(session.principal.user, session.principal.device))
        device = session.principal.device
        if device:  # an app coming back ends its detached session (and a pending wake)
            self.background.attach_soon(session.principal.user, device)

    def unregister(self, session: Session) -> None:
        principal = session.principal
        if (
            principal is not None
            and principal.device
            and session.channels
            and not session.detached
            and not session.shut_out
            and not (self.draining and self.broker.single_node)
            and session.state >= CONNECTED
        ):
            # The socket dropped without app_state: the app may be suspended. Keep its
            # place (and wake it) as for a backgrounded app; not when we shut it out, and
            # while draining only where other nodes can serve its polls.
            self.background.detach_soon(session, DROPPED)
        self.sessions.discard(session)
        self.by_id.pop(session.id, None)
        self.connecting.discard(session)
        for bucket in self._ping_buckets:
            bucket.discard(session)
        user = session.user
        if user and session.channels and self.typing.active:
            self._typing_gone(session, user)
        if user:
            sessions = self.users.get(user)
            if sessions is not None and session in sessions:
                sessions.discard(session)
                if not sessions:
                    del self.users[user]
                self.presence.user_disconnected(user)
        for channel in session.channels:
            self.presence_leave(channel, session.id)
            if self.hub.remove(channel, session.outbound, session.wire):
                self._release_channel(channel)
        session.channels.clear()

    def _release_channel(self, channel: str) -> None:
        self.loop.create_task(self._broker_unsubscribe(channel))

    async def _broker_unsubscribe(self, channel: str) -> None:
        # An MQTT device subscribed to exactly this channel still needs it.
        if self.hub.subscriber_count(channel) == 0 and channel not in self._filter_refs:
            try:
                await self.broker.unsubscribe(channel)
            except Exception:
                log.exception("broker_unsubscribe_failed", extra={"fields": {"channel": channel}})

    def watch_expiry(self, session: Session) -> None:
        self._expiry_seq += 1
        heapq.heappush(self._expiry, (session.expires_at, self._expiry_seq, session))

    # ------------------------------------------------------------------ channels

    def namespace(self, channel: str) -> Namespace:
        prefix, sep, _ = channel.partition("/")
        if sep:
            ns = self.namespaces.get(prefix)
            if ns is not None:
                return ns
        return self.namespaces["default"]

    @staticmethod
    def check_channel(channel: str) -> None:
        problem = channel_error(channel)
        if problem:
            raise ProtocolError(ErrorCode.BAD_CHANNEL, problem)

    def _may_subscribe(self, principal: Principal, ns: Namespace, channel: str) -> bool:
        return ns.config.subscribe == "authenticated" or principal.subscribe.matches(channel)

    def may_subscribe(self, principal: Principal, channel: str) -> bool:
        return self._may_subscribe(principal, self.namespace(channel), channel)

    def may_subscribe_filter(self, principal: Principal, topic_filter: str) -> bool:
        """A wildcard filter is allowed when the token covers all it can match, or when it
        stays inside one namespace open to every authenticated client."""
        if principal.subscribe.covers(topic_filter):
            return True
        first, sep, _ = topic_filter.partition("/")
        if not sep or first in ("+", "#"):
            return False
        ns = self.namespaces.get(first)
        return ns is not None and ns.config.subscribe == "authenticated"

    def may_publish(self, principal: Principal, channel: str) -> bool:
        return self._may_publish(principal, self.namespace(channel), channel)

    def _may_publish(self, principal: Principal, ns: Namespace, channel: str) -> bool:
        policy = ns.config.publish
        if policy == "none":
            return False
        return policy == "authenticated" or principal.publish.matches(channel)

    async def subscribe(
        self, session: Session, channel: str, since: StreamPosition | None, delta: str = ""
    ) -> tuple[pb.SubscribeResult, list[Publication]]:
        """Subscribe and (with `since`) recover. Returns the reply and the publications
        that arrived while it was built, to send right after it."""
        self.check_channel(channel)
        assert session.principal is not None
        ns = self.namespace(channel)
        if not self._may_subscribe(session.principal, ns, channel):
            raise ProtocolError(ErrorCode.PERMISSION_DENIED, f"may not subscribe to {channel}")
        if delta:
            if delta not in DELTA_TYPES:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"unknown delta type {delta[:32]!r} (supported: {', '.join(DELTA_TYPES)})",
                )
            if not ns.config.delta:
                raise ProtocolError(
                    ErrorCode.NOT_AVAILABLE,
                    f"namespace {ns.name!r} does not offer deltas: subscribe without delta",
                )
        if channel in session.channels:
            raise ProtocolError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {channel}")
        if len(session.channels) >= self.config.limits.max_subscriptions:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"at most {self.config.limits.max_subscriptions} subscriptions per connection",
            )
        policy = ns.history
        out, wire = session.outbound, session.wire
        first = self.hub.add(channel, out, wire, buffering=policy is not None, delta=bool(delta))
        if first and self._tracking:
            self.positions.forget(channel)  # what it knew is from before: start over
        session.channels.add(channel)
        result = pb.SubscribeResult()
        try:
            if first:
                await self.broker.subscribe(channel)
            await self._join_presence(session, ns, channel)
            if policy is None:
                return result, []
            if since is not None:
                history = await self.broker.history(channel, policy, since=since)
                top = history.position
                recovered = (
                    since.epoch == top.epoch
                    and since.offset <= top.offset
                    and len(history.publications) == top.offset - since.offset
                )
                result.recovered = recovered
                if recovered:
                    pubs = pb_publications(history.publications, deltas=bool(delta))
                    result.publications.extend(pubs)
                    if delta:
                        self.hub.deltas_sent += sum(pub.delta for pub in pubs)
            else:
                top = await self.broker.position(channel, policy)
        except BaseException:
            if session.state < CLOSING and channel in session.channels:
                session.channels.discard(channel)
                self.presence_leave(channel, session.id)
                if self.hub.remove(channel, out, wire):
                    self._release_channel(channel)
            raise
        if session.state >= CLOSING:
            return result, []
        if channel not in session.channels:
            # A stream gap ended it while history was read: what was buffered may miss
            # publications. The client retries, from its position.
            raise ProtocolError(
                ErrorCode.BROKER_UNAVAILABLE,
                "publications may have been lost while subscribing: retry",
                temporary=True,
                retry_after_ms=100,
                action=Action.RETRY,
            )
        buffered = self.hub.go_live(channel, out, wire, bool(delta))
        if self._tracking:
            self.positions.seed(channel, top)
        result.recoverable = True
        result.position.CopyFrom(pb_position(top))
        # Whatever arrived while history was read: keep only what lies past the reply.
        backlog = [pub for pub in buffered if pub.offset > top.offset]
        self.hub.note_position(channel, top, backlog[-1].offset if backlog else top.offset)
        return result, backlog

    async def _join_presence(self, session: Session, ns: Namespace, channel: str) -> None:
        if not ns.config.presence or session.state >= CLOSING:
            return
        assert session.principal is not None
        principal = session.principal
        entry = PresenceEntry(
            session.id, principal.user, principal.device, principal.info or None, "websocket"
        )
        await self.presence.join(channel, entry, ns.config.join_leave)

    async def presence_join(self, channel: str, entry: PresenceEntry) -> None:
        """Another transport's client (an MQTT device) is present in `channel`."""
        ns = self.namespace(channel)
        if ns.config.presence:
            await self.presence.join(channel, entry, ns.config.join_leave)

    def presence_join_soon(self, channel: str, entry: PresenceEntry) -> None:
        ns = self.namespace(channel)
        if ns.config.presence:
            self.presence.join_soon(channel, entry, ns.config.join_leave)

    def presence_leave(self, channel: str, client: str) -> None:
        ns = self.namespace(channel)
        if ns.config.presence:
            self.presence.leave(channel, client, ns.config.join_leave)

    def hold_filter(self, topic_filter: str) -> None:
        """`subscribe_filter` counted at once (the broker subscribes in the background)."""
        if self._count_filter(topic_filter):
            self._device_task(self.broker.subscribe(topic_filter))

    def delivered_position(self, channel: str) -> StreamPosition | None:
        """The position of the last publication of `channel` this node delivered."""
        return self.hub.position(channel)

    async def app_state(
        self, session: Session, background: bool, given: dict[str, StreamPosition]
    ) -> pb.AppStateResult:
        principal = session.principal
        assert principal is not None
        if not principal.device:
            raise ProtocolError(
                ErrorCode.DEVICE_REQUIRED,
                "app_state needs a token with a device claim (mint it with device=...)",
            )
        if not background:
            session.detached = False
            await self.background.attach(principal.user, principal.device)
            return pb.AppStateResult()
        positions = await self.background.detach(session, BACKGROUND, given)
        session.detached = True
        result = pb.AppStateResult(detach_ttl=int(self.config.background.detach_ttl))
        for channel, position in positions.items():
            result.positions[channel].CopyFrom(pb_position(position))
        return result

    async def subscribe_filter(self, topic_filter: str) -> None:
        """Count a filter subscription on this node; the first one subscribes the broker."""
        if self._count_filter(topic_filter):
            await self.broker.subscribe(topic_filter)

    def _count_filter(self, topic_filter: str) -> bool:
        """One more filter subscription here; True for the first."""
        count = self._filter_refs.get(topic_filter, 0)
        self._filter_refs[topic_filter] = count + 1
        return count == 0

    async def unsubscribe_filter(self, topic_filter: str) -> None:
        count = self._filter_refs.get(topic_filter, 0) - 1
        if count > 0:
            self._filter_refs[topic_filter] = count
            return
        self._filter_refs.pop(topic_filter, None)
        # A WebSocket client subscribed to exactly this channel still needs it.
        if count == 0 and self.hub.subscriber_count(topic_filter) == 0:
            await self.broker.unsubscribe(topic_filter)

    async def unsubscribe(self, session: Session, channel: str) -> None:
        if channel not in session.channels:
            raise ProtocolError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {channel}")
        session.channels.discard(channel)
        self.presence_leave(channel, session.id)
        if self.hub.remove(channel, session.outbound, session.wire):
            await self._broker_unsubscribe(channel)

    # ------------------------------------------------------------------ publish

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        user: str = "",
        client: str = "",
        tags: dict[str, str] | None = None,
        idempotency_key: str = "",
        source: str = "api",
        meta: object = None,
    ) -> PublishResult:
        self.check_channel(channel)
        ns = self.namespace(channel)
        if len(idempotency_key) > 128:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "idempotency_key is longer than 128")
        result = await self.broker.publish(
            channel,
            data,
            user=user,
            client=client,
            tags=tags or None,
            history=ns.history,
            idempotency_key=idempotency_key,
            idempotency_ttl=ns.config.idempotency_window,
            meta=meta,
        )
        if not result.duplicate:
            self.metrics.publishes[source] += 1
        return result

    def publish_nowait(
        self, channel: str, data: bytes, *, user: str, client: str, source: str, meta: object
    ) -> PublishResult | None:
        """`publish` without waiting, when the broker can (the memory broker); None when it
        cannot and the caller must await `publish`. The channel must be valid already."""
        ns = self.namespace(channel)
        result = self.broker.publish_nowait(
            channel, data, user, client, ns.history, ns.config.idempotency_window, meta
        )
        if result is not None:
            self.metrics.publishes[source] += 1
        return result

    async def client_publish(self, session: Session, req: pb.PublishRequest) -> pb.PublishResult:
        principal = session.principal
        assert principal is not None
        channel = req.channel
        self.check_channel(channel)
        if not self._may_publish(principal, self.namespace(channel), channel):
            raise ProtocolError(ErrorCode.PERMISSION_DENIED, f"may not publish to {channel}")
        now = self.loop.time()
        bucket = self.user_buckets.get(principal.user)
        if bucket is None:
            limits = self.config.limits
            bucket = TokenBucket(limits.user_publishes_per_second, limits.user_publish_burst, now)
            self.user_buckets[principal.user] = bucket
        retry_ms = bucket.take(now)
        if retry_ms:
            raise ProtocolError(
                ErrorCode.TOO_MANY_REQUESTS,
                "publish rate limit for this user exceeded",
                temporary=True,
                retry_after_ms=retry_ms,
                action=Action.RETRY,
            )
        result = await self.publish(
            channel,
            req.data,
            user=principal.user,
            client=session.id,
            tags=dict(req.tags),
            idempotency_key=req.idempotency_key,
            source="client",
        )
        self.typing.published(channel, principal.user)
        return pb.PublishResult(position=pb_position(result.position), duplicate=result.duplicate)

    # ------------------------------------------------------------------ history

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int = 0,
        reverse: bool = False,
    ) -> HistoryResult:
        self.check_channel(channel)
        policy = self.namespace(channel).history
        if policy is None:
            raise ProtocolError(
                ErrorCode.NOT_AVAILABLE, f"{channel}: its namespace keeps no history"
            )
        limit = min(limit or MAX_HISTORY_LIMIT, MAX_HISTORY_LIMIT)
        return await self.broker.history(channel, policy, since=since, limit=limit, reverse=reverse)

    async def client_history(self, session: Session, req: pb.HistoryRequest) -> pb.HistoryResult:
        assert session.principal is not None
        self.check_channel(req.channel)
        ns = self.namespace(req.channel)
        if not self._may_subscribe(session.principal, ns, req.channel):
            raise ProtocolError(ErrorCode.PERMISSION_DENIED, f"may not read {req.channel}")
        since = StreamPosition(req.since.offset, req.since.epoch) if req.HasField("since") else None
        result = await self.history(req.channel, since=since, limit=req.limit, reverse=req.reverse)
        return pb.HistoryResult(
            publications=pb_publications(result.publications),
            position=pb_position(result.position),
        )

    # ------------------------------------------------------------------ presence

    def _namespace_with(self, channel: str, feature: str, what: str) -> Namespace:
        """The channel's namespace, when it has `feature` (a NamespaceConfig flag) on."""
        self.check_channel(channel)
        ns = self.namespace(channel)
        if not getattr(ns.config, feature):
            raise ProtocolError(
                ErrorCode.NOT_AVAILABLE, f"{channel}: {what} not enabled in namespace {ns.name!r}"
            )
        return ns

    def _check_reader(self, principal: Principal, ns: Namespace, channel: str) -> None:
        if not self._may_subscribe(principal, ns, channel):
            raise ProtocolError(ErrorCode.PERMISSION_DENIED, f"may not see who is in {channel}")

    async def presence_list(
        self, channel: str, principal: Principal | None = None
    ) -> dict[str, PresenceEntry]:
        """Who is in `channel`; `principal` None is the server API (no permission check)."""
        ns = self._namespace_with(channel, "presence", "presence is")
        if principal is not None:
            self._check_reader(principal, ns, channel)
        return await self.broker.presence(channel)

    async def presence_stats(
        self, channel: str, principal: Principal | None = None
    ) -> PresenceStats:
        ns = self._namespace_with(channel, "presence", "presence is")
        if principal is not None:
            self._check_reader(principal, ns, channel)
        return await self.broker.presence_stats(channel)

    async def user_status(
        self, users: list[str], principal: Principal | None = None
    ) -> list[UserStatus]:
        config = self.config.presence
        if principal is not None and config.user_status == "none":
            raise ProtocolError(
                ErrorCode.PERMISSION_DENIED, "user status is only available to the server API"
            )
        if not users:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "give at least one user id")
        if len(users) > config.max_users_per_query:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"at most {config.max_users_per_query} users per query",
            )
        if any(not user or len(user) > 256 for user in users):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "user ids must be 1..256 characters")
        statuses = await self.broker.user_status(users)
        now = self.wall_time()
        return [
            UserStatus(s.user, True, now) if self.presence.is_online(s.user) else s
            for s in statuses
        ]

    # ------------------------------------------------------------------ typing

    async def client_typing(self, session: Session, channel: str, active: bool) -> bool:
        """Forward a typing change; False when throttled (an earlier event still holds)."""
        assert session.principal is not None
        ns = self._namespace_with(channel, "typing", "typing indicators are")
        if channel not in session.channels:
            raise ProtocolError(
                ErrorCode.NOT_SUBSCRIBED, f"subscribe to {channel} before typing in it"
            )
        user = session.principal.user
        if active:
            now = self.loop.time()
            if not self.typing.start(channel, user, session.id, now, ns.config.typing_throttle):
                self.metrics.channel_events["typing_throttled"] += 1
                return False
        elif not self.typing.stop(channel, user):
            return True  # was not typing: nothing to tell anyone
        await self._publish_typing(channel, session.id, user, active)
        return True

    async def _publish_typing(self, channel: str, client: str, user: str, active: bool) -> None:
        """Every node with subscribers of `channel` (this one too) hears of it in
        handle_event: the hub starts or ends the indicator and tells the subscribers."""
        entry = PresenceEntry(client, user)
        await self.broker.publish_event(channel, ChannelEvent(TYPING, entry, active))

    def _typing_gone(self, session: Session, user: str) -> None:
        """`session` goes away (closed, kicked, dropped): where it was typing, the others
        are told at once that typing stopped, as by an explicit stop, instead of waiting
        for typing_timeout. Typing is per user and channel, so an indicator stays while
        another connection of the user on this node typed there within typing_timeout (it
        goes on renewing it, or it expires). Connections on other nodes are not known
        here: a user typing on two nodes at once loses the indicator until the other
        node forwards its next renewal."""
        now = self.loop.time()
        for channel in session.channels:
            timeout = self.namespace(channel).config.typing_timeout
            if self.typing.gone(channel, user, session.id, now, timeout):
                task = self.loop.create_task(self._stop_typing(channel, session.id, user))
                self._typing_tasks.add(task)
                task.add_done_callback(self._typing_tasks.discard)

    async def _stop_typing(self, channel: str, client: str, user: str) -> None:
        try:
            await self._publish_typing(channel, client, user, False)
        except BrokerUnavailable:
            pass  # receivers expire the indicator after typing_timeout
        except Exception:
            log.exception("typing_stop_failed", extra={"fields": {"channel": channel}})

    def handle_event(self, channel: str, event: ChannelEvent) -> None:
        """Broker handler: an ephemeral event for a channel this node subscribes to."""
        config = self.namespace(channel).config
        if event.kind == TYPING:
            if not config.typing:
                return
            entry = event.entry
            if event.active:
                until = self.loop.time() + config.typing_timeout
                self.hub.typing_started(channel, entry.user, entry.client, until)
            else:
                self.hub.typing_stopped(channel, entry.user)
        elif config.join_leave:
            limit = config.join_leave_max_subscribers
            if limit and self.hub.subscriber_count(channel) > limit:
                self.metrics.channel_events["join_leave_over_limit"] += 1
                return
            info = pb_client_info(event.entry)
            push = pb.Push(channel=channel)
            getattr(push, event.kind).CopyFrom(info)
            # Others hear of a join; the joiner knows already.
            self.hub.push_event(channel, pb.Reply(push=push), self._outbound_of(info.client))
        self.metrics.channel_events[event.kind] += 1

    def handle_stream_gap(self, channels: list[str]) -> None:
        """Publications of `channels` may have been lost on the way to this node: the
        broker says so (its pub/sub link dropped, its queue overflowed), or the node's
        position checks found it (a publication arrived past lost ones, or the stream's
        top stayed ahead of what the node received: core/positions.py). Each local
        WebSocket subscription of a channel that keeps history ends
        here with an `unsubscribe` push (UnsubscribeCode.RESUBSCRIBE): the client
        resubscribes from its last position and recovers what was lost (or learns that it
        cannot). Channels without history have no position to recover from: nothing to
        do. MQTT devices neither: their delivery is QoS 0 across nodes (persistent QoS 1
        sessions kept in Redis are future work)."""
        gapped = {
            channel
            for channel in channels
            if channel in self.hub.channels and self.namespace(channel).history is not None
        }
        if not gapped:
            return
        self.metrics.channel_events["stream_gap"] += len(gapped)
        for channel in gapped:
            self.positions.forget(channel)
        unsubscribed = pb.Unsubscribed(
            code=UnsubscribeCode.RESUBSCRIBE, reason="stream gap: resubscribe with recovery"
        )
        for session in list(self.sessions):
            hit = session.channels & gapped
            if not hit:
                continue
            for channel in hit:
                ch = self.hub.channels.get(channel)
                subscribing = ch is not None and session.outbound in ch.buffering
                session.channels.discard(channel)
                self.presence_leave(channel, session.id)
                if self.hub.remove(channel, session.outbound, session.wire):
                    self._release_channel(channel)
                if subscribing:
                    continue  # its subscribe is answered with a temporary error instead
                push = pb.Reply(push=pb.Push(channel=channel, unsubscribe=unsubscribed))
                session.push_raw(session.wire.frame(session.codec.encode_reply(push)))

    # ------------------------------------------------------------------ devices

    @staticmethod
    def require_device(principal: Principal, what: str) -> str:
        """The token's `device` claim, which device commands need."""
        if not principal.device:
            raise ProtocolError(
                ErrorCode.DEVICE_REQUIRED,
                f"{what} needs a token with a device claim (the app install's id): "
                "mint the app's token with device=...",
            )
        return principal.device

    async def register_device(
        self, principal: Principal, req: pb.RegisterDeviceRequest
    ) -> DeviceRecord:
        """`register_device` from an app: its push token, for the token's device."""
        device = self.require_device(principal, "register_device")
        record, _ = await self.add_device(
            principal.user,
            device,
            req.provider,
            req.token,
            environment=req.environment,
            app_id=req.app_id,
            platform=req.platform,
        )
        return record

    async def unregister_device(self, principal: Principal) -> bool:
        """`unregister_device` from an app (logout): True when it had a push token."""
        device = self.require_device(principal, "unregister_device")
        return await self.remove_device(principal.user, device)

    async def add_device(
        self,
        user: str,
        device: str,
        provider: str,
        token: str,
        *,
        environment: str = "",
        app_id: str = "",
        platform: str = "",
    ) -> tuple[DeviceRecord, bool]:
        """Register a device's push token (taking it from whoever had it): the record,
        and whether the token moved from another user or device."""
        _check_id("user", user)
        _check_id("device", device)
        if provider not in PROVIDERS:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"provider must be one of {', '.join(PROVIDERS)} (got {provider[:32]!r})",
            )
        if not token:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "token (the provider's) is required")
        if len(token) > MAX_PUSH_TOKEN_BYTES or not _printable_ascii(token):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"token must be printable ASCII without spaces, at most "
                f"{MAX_PUSH_TOKEN_BYTES} bytes",
            )
        environment = environment or "production"
        if environment not in PUSH_ENVIRONMENTS:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"environment must be production or sandbox (got {environment[:32]!r})",
            )
        _check_text("app_id", app_id, 255)
        _check_text("platform", platform, 32)
        now = self.wall_time()
        record = DeviceRecord(
            user, device, provider, token, environment, app_id, platform, now, now
        )
        moved = await self.broker.device_registry.register(record)
        self.metrics.push_devices_registered += 1
        if moved:
            self.metrics.push_tokens_moved += 1
        event(
            log,
            "device_registered",
            logging.DEBUG,
            user=user,
            device=device,
            provider=provider,
            platform=platform,
            moved=moved,
        )
        return record, moved

    async def remove_device(self, user: str, device: str) -> bool:
        """Forget the device's push token; True when it had one."""
        _check_id("user", user)
        _check_id("device", device)
        return await self.broker.device_registry.unregister(user, device)

    async def list_devices(self, user: str) -> list[DeviceRecord]:
        _check_id("user", user)
        return await self.broker.device_registry.devices(user)

    async def prune_devices(self) -> int:
        """Remove push tokens unused for push.token_max_idle_days (0: never); how many."""
        days = self.config.push.token_max_idle_days
        if days <= 0:
            return 0
        pruned = await self.broker.device_registry.prune(self.wall_time() - days * 86_400.0)
        self.metrics.push_tokens_pruned += pruned
        if pruned:
            event(log, "push_tokens_pruned", count=pruned, idle_days=days)
        return pruned

    def _maybe_prune_devices(self, now: float) -> None:
        if now < self._device_prune_at:
            return
        self._device_prune_at = now + DEVICE_PRUNE_INTERVAL
        self._device_task(self.prune_devices())

    async def _touch_device(self, user: str, device: str) -> None:
        await self.broker.device_registry.touch(user, device, self.wall_time())

    def _device_task(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run device work in the background (registry touches and pruning, the broker
        subscriptions of stand-ins); failures are logged, not raised (a missed touch or
        prune is made up later; a lost subscription comes back with the broker's)."""

        async def run() -> None:
            try:
                await work
            except BrokerUnavailable:
                pass
            except Exception:
                log.exception("device_registry_failed")

        task = self.loop.create_task(run())
        self._device_tasks.add(task)
        task.add_done_callback(self._device_tasks.discard)

    def _handle_publication_checked(self, channel: str, pub: Publication) -> None:
        """Broker handler when publications can be lost on the way: a publication that
        arrives past lost ones ends the channel's subscriptions first (a stream gap)."""
        if (
            pub.offset
            and channel in self.hub.channels
            and self.positions.arrived(channel, pub.offset, pub.epoch)
        ):
            self.handle_stream_gap([channel])
        self.hub.handle_publication(channel, pub)

    async def check_positions(self) -> None:
        """One round of position checks (core/positions.py): the suspects of the last
        round that are still behind are stream gaps; then the next batch of channels is
        compared with the broker's tops, in one batched read."""
        tracker, live = self.positions, self.hub.channels
        try:
            gapped = tracker.confirm(live)
            if gapped:
                log.warning("stream_gap_found", extra={"fields": {"channels": len(gapped)}})
                self.handle_stream_gap(gapped)
            policies: dict[str, HistoryPolicy] = {}
            for channel in tracker.pick(live):
                policy = self.namespace(channel).history
                if policy is not None:
                    policies[channel] = policy
            if policies:
                tracker.compare(await self.broker.positions(policies))
        except BrokerUnavailable:
            pass  # the next round, then
        except Exception:
            log.exception("position_check_failed")

    # ------------------------------------------------------------------ control

    def disconnect_user(self, user: str, *, reconnect: bool, reason: str) -> int:
        """Close `user`'s connections on this node (WebSocket and MQTT); how many."""
        sessions = list(self.users.get(user, ()))
        code = CloseCode.FORCE_RECONNECT if reconnect else CloseCode.FORBIDDEN
        for session in sessions:
            session.close(code, reason)
        devices = self.mqtt.disconnect_user(user, reason) if self.mqtt is not None else 0
        return len(sessions) + devices

    async def disconnect_user_everywhere(
        self, user: str, *, reconnect: bool, reason: str
    ) -> dict[str, Any]:
        """`disconnect_user` on every node: how many connections, which nodes did not
        answer in time (they may still have done it)."""
        body = {"user": user, "reconnect": reconnect, "reason": reason}
        answers, missing = await self.cluster.broadcast("disconnect_user", body)
        count = sum(int(answer.get("disconnected", 0)) for answer in answers.values())
        return {"disconnected": count, "nodes": len(answers), "unanswered": missing}

    async def _disconnect_user_request(self, body: dict[str, Any]) -> dict[str, Any]:
        user, reason = str(body.get("user", "")), str(body.get("reason", ""))
        count = self.disconnect_user(user, reconnect=bool(body.get("reconnect")), reason=reason)
        if count:
            event(log, "user_disconnected", user=user, connections=count, reason=reason)
        return {"disconnected": count}

    def _load(self) -> dict[str, Any]:
        """This node's load, for the cluster's node list."""
        mqtt = self.mqtt
        return {
            "version": self.version,
            "broker": self.broker.name,
            "connections": len(self.sessions),
            "users": len(self.users),
            "channels": len(self.hub.channels),
            "subscriptions": sum(ch.size for ch in self.hub.channels.values()),
            "mqtt_connections": mqtt.open_connections if mqtt is not None else 0,
            "mqtt_sessions": len(mqtt.sessions) if mqtt is not None else 0,
            "deliveries": self.hub.deliveries,
            "draining": self.draining,
        }

    def begin_drain(self) -> None:
        """Tell every client to reconnect (elsewhere) after a jittered delay."""
        self.draining = True
        self.ready = False
        jitter_ms = int(self.config.server.reconnect_jitter * 1000)
        for session in list(self.sessions):
            session.close(
                CloseCode.SHUTDOWN,
                "server shutting down",
                reconnect_after_ms=random.randint(0, jitter_ms) if jitter_ms else 0,
            )

    # ------------------------------------------------------------------ housekeeping

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.tick(self.loop.time())
                await self.broker.housekeeping(self.loop.time())
                await self.cluster.announce(self.loop.time())
                self._maybe_prune_devices(self.loop.time())
            except Exception:
                log.exception("housekeeping_failed")

    def tick(self, now: float) -> None:
        """Once a second: connect deadlines, the ping buckets due, token expiry, idle buckets."""
        deadline = self.config.client.connect_timeout
        for session in [s for s in self.connecting if now - s.last_rx > deadline]:
            if session.state < CONNECTED:
                session.close(CloseCode.CONNECT_TIMEOUT, "no connect command in time")
        client = self.config.client
        silent_limit = client.ping_interval + client.pong_timeout
        # Every second's bucket, also the seconds a late tick jumped over (a busy loop, a
        # GC pause): a skipped bucket would get no ping for a whole ping_interval and its
        # live clients would be closed with NO_PONG. At most one round of buckets.
        buckets = self._ping_buckets
        second = int(now)
        last = self._ping_second
        first = second if last is None else max(last + 1, second - len(buckets) + 1)
        if second >= first:
            self._ping_second = second
        for due in range(first, second + 1):
            bucket = buckets[due % len(buckets)]
            if not bucket:
                continue
            for session in list(bucket):
                if now - session.last_rx > silent_limit:
                    session.close(CloseCode.NO_PONG, "no pong: the connection looks dead")
                else:
                    ping = self._pings.get(session.wire)
                    if ping is None:
                        message = session.codec.encode_reply(PING)
                        ping = self._pings[session.wire] = session.wire.frame(message)
                    session.push_raw(ping)
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            expires_at, _, session = heapq.heappop(expiry)
            if session.state == CONNECTED and session.expires_at == expires_at:
                session.fail(
                    0,
                    ProtocolError(ErrorCode.TOKEN_EXPIRED, "token expired", False),
                    close=CloseCode.TOKEN_EXPIRED,
                )
        if len(expiry) > 2 * len(self.sessions) + 1000:
            # Closed sessions stay in the heap until their token would expire: compact it
            # so that reconnect churn cannot pin them in memory.
            self._expiry = [item for item in expiry if item[2].state == CONNECTED]
            heapq.heapify(self._expiry)
        for ticker in self.tickers:
            ticker(now)
        if self._tracking and self.positions.due(now):
            check = self._position_check
            if check is None or check.done():  # else the last one still waits for the broker
                self._position_check = self.loop.create_task(self.check_positions())
        self.background.tick(now)
        self.polls.prune(now)
        self.presence.tick(now)
        if self.hub.typing_channels:
            self.hub.expire_typing(now)
        self.typing.prune(now, self._typing_horizon)
        if len(self.user_buckets) > len(self.users):
            idle = [u for u, b in self.user_buckets.items() if u not in self.users and b.full(now)]
            for user in idle:
                del self.user_buckets[user]

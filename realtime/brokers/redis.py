"""Redis broker: many nodes, one set of channels, positions, presence and retained messages.

Every channel lives on one Redis instance (consistent hashing over `broker.redis_urls`,
`redis_ring.py`). Its publications go through one Lua script there (`redis_scripts.py`):
idempotency check, offset from the stream's meta hash, XADD to a capped stream, PUBLISH of
the same msgpack bytes (`redis_envelope.py`). So every node, and every recovery, sees one
order. Each node keeps one pub/sub connection per instance (`redis_pubsub.py`) and
subscribes to a channel's Redis channel while it has local subscribers; MQTT wildcard
filters become PSUBSCRIBE patterns on every instance.

Keys, with `p` the configured `key_prefix` and `<ch>` a channel name:

    p:m:<ch>        hash   stream meta: e (epoch), o (top offset); EXPIRE history_meta_ttl
    p:s:<ch>        stream publications (field p: the envelope), MAXLEN history_size,
                           PEXPIRE history_ttl; entries older than history_ttl are skipped
    p:i:<ch> <key>  string idempotency key -> "offset epoch", PX idempotency_window
    p:c:<ch>        -      the pub/sub channel (publications and events)
    p:p:<ch>        hash   presence: client -> entry
    p:pz:<ch>       zset   presence: client -> expiry (ms, Redis time)
    p:pidx          zset   per instance: channel -> when to look for expired entries
    p:u:<user>      hash   user status: <node id> -> "until:refreshed" (ms), seen (ms)
    p:r:<ch>        string retained message (envelope), PX from the MQTT message expiry
    p:ridx          zset   per instance: channels with a retained message (lex order)
    p:c:$control    -      control messages between nodes (one instance: CONTROL_KEY's)
    p:nodes         hash   node id -> its listing (msgpack), on CONTROL_KEY's instance
    p:nodez         zset   node id -> listing expiry (ms, Redis time)
    p:ms:, p:mq:    MQTT persistent sessions (redis_sessions.py)
    p:d:, p:dt:, p:dz  push tokens of mobile devices (redis_devices.py)

Redis 6.2 or newer (ZADD LT, XREVRANGE with COUNT); pub/sub is not scoped by database, so
nodes of different clusters sharing an instance need different key prefixes.
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import msgpack  # type: ignore[import-untyped]
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from realtime.brokers import redis_scripts as lua
from realtime.brokers.redis_detached import RedisDetachedStore
from realtime.brokers.redis_devices import RedisDeviceRegistry
from realtime.brokers.redis_envelope import (
    PUBLICATION_HEAD,
    control_message,
    decode,
    decode_publication,
    entry_bytes,
    entry_from_bytes,
    event_message,
    pack_publication,
    publication_message,
    publication_tail,
)
from realtime.brokers.redis_pubsub import Address, PubSubShard, filter_pattern
from realtime.brokers.redis_ring import HashRing
from realtime.brokers.redis_sessions import RedisSessionStore
from realtime.config import BrokerConfig
from realtime.core.broker import (
    LEAVE,
    Broker,
    BrokerHandler,
    BrokerUnavailable,
    ChannelEvent,
    ControlMessage,
    HistoryPolicy,
    HistoryResult,
    PresenceEntry,
    PresenceStats,
    Publication,
    PublishResult,
    StreamPosition,
    UserStatus,
)
from realtime.core.mqtt_session import MqttMeta
from realtime.core.topics import FilterTrie, filter_matches
from realtime.metrics import Metrics

T = TypeVar("T")

_NO_POSITION = PublishResult(StreamPosition(0, ""))
# What makes an instance unavailable for now (as opposed to a bug in a command).
_UNAVAILABLE = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError (LOADING after a restart)
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica promoted under us
    OSError,
)
KEYS_PER_CALL = 500  # users per user-status script call
POSITIONS_PER_CALL = 500  # channels per POSITIONS script call (about 1 ms of Redis time)
# The channel whose instance carries control messages and the node list.
CONTROL_KEY = "$control"


class _Shard:
    """One Redis instance: a command client (connection pool) and the pub/sub connection."""

    def __init__(self, address: Address, client: aioredis.Redis, pubsub: PubSubShard) -> None:
        self.address = address
        self.name = address.name
        self.client = client
        self.pubsub = pubsub
        reg = client.register_script
        self.publish: AsyncScript = reg(lua.PUBLISH)
        self.history: AsyncScript = reg(lua.HISTORY)
        self.positions: AsyncScript = reg(lua.POSITIONS)
        self.presence_add: AsyncScript = reg(lua.PRESENCE_ADD)
        self.presence_remove: AsyncScript = reg(lua.PRESENCE_REMOVE)
        self.presence_get: AsyncScript = reg(lua.PRESENCE_GET)
        self.presence_expire: AsyncScript = reg(lua.PRESENCE_EXPIRE)
        self.users_online: AsyncScript = reg(lua.USERS_ONLINE)
        self.user_offline: AsyncScript = reg(lua.USER_OFFLINE)
        self.user_status: AsyncScript = reg(lua.USER_STATUS)
        self.node_register: AsyncScript = reg(lua.NODE_REGISTER)
        self.nodes: AsyncScript = reg(lua.NODES)
        self.session_claim: AsyncScript = reg(lua.SESSION_CLAIM)
        self.session_save: AsyncScript = reg(lua.SESSION_SAVE)
        self.session_append: AsyncScript = reg(lua.SESSION_APPEND)
        self.session_load: AsyncScript = reg(lua.SESSION_LOAD)
        self.session_touch: AsyncScript = reg(lua.SESSION_TOUCH)


def _history_result(raw: list[Any], newest_first: bool) -> HistoryResult:
    """The HISTORY script's answer: top offset, epoch, then the publications (newest
    first when read after a position: `newest_first` turns them oldest first)."""
    pubs = [decode_publication(message) for message in raw[2:]]
    if newest_first:
        pubs.reverse()
    return HistoryResult(pubs, StreamPosition(int(raw[0]), raw[1].decode()))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _literal_prefix(topic_filter: str) -> str:
    """The part of a wildcard filter before its first wildcard level ("a/#" -> "a": the
    filter matches "a" itself too)."""
    cut = min(i for i in (topic_filter.find("+"), topic_filter.find("#")) if i >= 0)
    prefix = topic_filter[:cut]
    if topic_filter[cut] == "#" and prefix.endswith("/"):
        prefix = prefix[:-1]
    return prefix


class RedisBroker(Broker):
    name = "redis"
    publishes_at_once = False
    single_node = False
    delivery_may_gap = True

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        # This node's identity in user-status marks; new on every start.
        self.node_id = secrets.token_hex(8)
        prefix = config.key_prefix
        self._k = prefix + ":"
        self._channel_prefix = f"{prefix}:c:"
        self._handler: BrokerHandler | None = None
        self._shards: list[_Shard] = []
        self._ring: HashRing[_Shard] | None = None
        # MQTT filters this node subscribed to -> their Redis pattern.
        self._filters: FilterTrie[str, bytes] = FilterTrie()
        self._filter_patterns: dict[str, bytes] = {}
        self._pattern_refs: dict[bytes, int] = {}
        self._addresses = [Address(url, dict(parse_url(url))) for url in config.redis_urls]
        self.session_store = RedisSessionStore(self)
        self.device_registry = RedisDeviceRegistry(self)
        self.detached_sessions = RedisDetachedStore(self)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler
        loop = asyncio.get_running_loop()
        config = self.config
        shards: list[tuple[str, _Shard]] = []
        for address in self._addresses:
            # A bounded pool that makes a command wait for a free connection (up to the
            # command timeout) rather than fail: redis-py's default pool refuses the 101st
            # concurrent command with "Too many connections" (a reconnect storm does that).
            pool = aioredis.BlockingConnectionPool.from_url(
                address.url,
                max_connections=config.connections_per_instance,
                timeout=config.command_timeout,
                socket_connect_timeout=config.connect_timeout,
                socket_timeout=config.command_timeout,
                # No silent retries: a publish that may have happened is reported, and the
                # caller retries with its idempotency key.
                retry=Retry(NoBackoff(), 0),
                decode_responses=False,
            )
            client = aioredis.Redis(connection_pool=pool)
            pubsub = PubSubShard(
                address,
                self._channel_prefix.encode(),
                self._filters,
                self._dispatch,
                loop,
                gap=self._stream_gap,
                queue_size=config.pubsub_queue_size,
                unsubscribe_delay=config.unsubscribe_delay,
                connect_timeout=config.connect_timeout,
                command_timeout=config.command_timeout,
                reconnect_max_delay=config.reconnect_max_delay,
            )
            shards.append((address.name, _Shard(address, client, pubsub)))
        self._ring = HashRing(shards)
        self._shards = self._ring.shards
        for shard in self._shards:
            shard.pubsub.start()
        # Wait for the first connections, but run on without them: nodes keep serving
        # (and refuse what needs Redis with a temporary error) until Redis is reachable.
        await asyncio.gather(
            *(shard.pubsub.wait_up(config.connect_timeout) for shard in self._shards)
        )
        # Control messages: subscribed while the node runs (again after every reconnect).
        control = self._shard(CONTROL_KEY)
        await control.pubsub.subscribe((self._channel_prefix + CONTROL_KEY).encode())
        metrics = getattr(handler, "metrics", None)
        if isinstance(metrics, Metrics):
            self._register_gauges(metrics)

    def _register_gauges(self, metrics: Metrics) -> None:
        shards = self._shards
        metrics.gauge(
            "redis_up",
            "Redis instances this node is connected to (of broker.redis_urls).",
            lambda: sum(s.pubsub.up for s in shards),
        )
        metrics.gauge(
            "redis_pubsub_dropped",
            "Pub/sub messages dropped because the node fell behind (since start).",
            lambda: sum(s.pubsub.dropped for s in shards),
        )
        metrics.gauge(
            "redis_pubsub_received",
            "Pub/sub messages received (since start).",
            lambda: sum(s.pubsub.messages for s in shards),
        )
        metrics.gauge(
            "redis_pubsub_queued",
            "Pub/sub messages waiting to be handled.",
            lambda: sum(len(s.pubsub.queue) for s in shards),
        )
        metrics.gauge(
            "redis_reconnects",
            "Pub/sub connections lost and made again (since start).",
            lambda: sum(s.pubsub.reconnects for s in shards),
        )

    async def close(self) -> None:
        for shard in self._shards:
            await shard.pubsub.close()
            await shard.client.aclose()
            await shard.client.connection_pool.disconnect()  # ours: aclose leaves it open
        self._handler = None

    @property
    def shards(self) -> list[_Shard]:
        return self._shards

    def _shard(self, key: str) -> _Shard:
        ring = self._ring
        assert ring is not None, "start the broker first"
        return ring.get(key)

    shard_of = _shard  # for the session store

    @property
    def key_prefix(self) -> str:
        return self._k

    async def _guard(self, shard: _Shard, call: Awaitable[T]) -> T:
        """Run a command on `shard`; an unreachable instance is `BrokerUnavailable`."""
        pubsub = shard.pubsub
        if not pubsub.up:
            if inspect.iscoroutine(call):
                call.close()
            raise BrokerUnavailable(
                f"redis {shard.name} is unreachable", retry_after=pubsub.retry_after()
            )
        try:
            return await call
        except _UNAVAILABLE as exc:
            raise BrokerUnavailable(f"redis {shard.name}: {exc}", retry_after=1.0) from exc

    guard = _guard

    def _dispatch(self, channel: str, message: bytes) -> None:
        handler = self._handler
        if handler is None:
            return
        item = decode(message)
        if isinstance(item, Publication):
            handler.handle_publication(channel, item)
        elif isinstance(item, ChannelEvent):
            handler.handle_event(channel, item)
        elif channel == CONTROL_KEY:  # nothing else may send one (names with $ are ours)
            handler.handle_control(item)

    def _stream_gap(self, channels: list[str]) -> None:
        handler = self._handler
        channels = [c for c in channels if c != CONTROL_KEY]  # no positions: requests time out
        if handler is not None and channels:
            handler.handle_stream_gap(channels)

    # ------------------------------------------------------------------ publish, history

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
    ) -> PublishResult:
        shard = self._shard(channel)
        name = self._channel_prefix + channel
        size = history.size if history is not None else 0
        if size <= 0 and not idempotency_key:
            message = publication_message(0, "", data, user, client, tags, meta)
            await self._guard(shard, shard.client.publish(name, message))
            return _NO_POSITION
        k = self._k
        keys = [f"{k}m:{channel}", f"{k}s:{channel}"]
        if idempotency_key:
            keys.append(f"{k}i:{channel} {idempotency_key}")
        args: list[Any] = [
            name,
            PUBLICATION_HEAD,
            publication_tail(data, user, client, tags, meta),
            size,
            _ms(history.ttl) if history is not None else 0,
            max(1, round(history.meta_ttl)) if history is not None else 0,
            secrets.token_hex(4),
            _ms(idempotency_ttl),
        ]
        offset, epoch, duplicate = await self._guard(shard, shard.publish(keys=keys, args=args))
        return PublishResult(StreamPosition(int(offset), epoch.decode()), bool(duplicate))

    async def history(
        self,
        channel: str,
        policy: HistoryPolicy,
        *,
        since: StreamPosition | None = None,
        limit: int = 0,
        reverse: bool = False,
    ) -> HistoryResult:
        shard = self._shard(channel)
        keys, args = self._history_call(channel, policy, since, limit, reverse)
        raw = await self._guard(shard, shard.history(keys=keys, args=args))
        result = _history_result(raw, since is not None and not reverse)
        if since is not None and limit > 0:
            return HistoryResult(result.publications[:limit], result.position)
        return result

    def _history_call(
        self,
        channel: str,
        policy: HistoryPolicy,
        since: StreamPosition | None,
        limit: int = 0,
        reverse: bool = False,
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the HISTORY script."""
        k = self._k
        args: list[Any] = [
            secrets.token_hex(4),
            max(1, round(policy.meta_ttl)),
            _ms(policy.ttl),
            since.offset if since is not None else -1,
            since.epoch if since is not None else "",
            limit,
            1 if reverse else 0,
        ]
        return [f"{k}m:{channel}", f"{k}s:{channel}"], args

    async def histories(
        self, reads: Mapping[str, tuple[HistoryPolicy, StreamPosition]]
    ) -> dict[str, HistoryResult]:
        """One pipeline of HISTORY script calls per instance, the instances at once (a poll
        reads all its channels in one round trip)."""
        if len(reads) == 1:
            [(channel, (policy, since))] = reads.items()
            return {channel: await self.history(channel, policy, since=since)}
        found: dict[str, HistoryResult] = {}

        async def pipeline(shard: _Shard, names: list[str]) -> list[Any]:
            # EVALSHA by hand: a Script in a pipeline costs a SCRIPT EXISTS round trip
            # on every execute.
            pipe = shard.client.pipeline(transaction=False)
            for channel in names:
                keys, args = self._history_call(channel, *reads[channel])
                pipe.evalsha(shard.history.sha, len(keys), *keys, *args)
            answers: list[Any] = await pipe.execute()
            return answers

        async def read(shard: _Shard, names: list[str]) -> None:
            try:
                answers = await self._guard(shard, pipeline(shard, names))
            except redis.exceptions.NoScriptError:
                # Never loaded here, or a restarted Redis forgot it: load it, once more.
                await self._guard(shard, shard.client.script_load(shard.history.script))
                answers = await self._guard(shard, pipeline(shard, names))
            for channel, raw in zip(names, answers, strict=True):
                found[channel] = _history_result(raw, True)

        await asyncio.gather(*(read(shard, names) for shard, names in self._by_shard(list(reads))))
        return found

    async def positions(self, channels: Mapping[str, HistoryPolicy]) -> dict[str, StreamPosition]:
        """The tops of many streams: one POSITIONS script call per instance (a pipeline of
        them past POSITIONS_PER_CALL channels), the instances at once; an instance that is
        down or fails leaves its channels out."""
        k = self._k
        tops: dict[str, StreamPosition] = {}

        async def read(shard: _Shard, names: list[str]) -> None:
            calls: list[tuple[list[str], list[Any]]] = []
            for i in range(0, len(names), POSITIONS_PER_CALL):
                keys: list[str] = []
                args: list[Any] = [secrets.token_hex(4)]
                for channel in names[i : i + POSITIONS_PER_CALL]:
                    keys += (f"{k}m:{channel}", f"{k}s:{channel}")
                    args.append(max(1, round(channels[channel].meta_ttl)))
                calls.append((keys, args))
            try:
                if len(calls) == 1:
                    keys, args = calls[0]
                    answers = [await self._guard(shard, shard.positions(keys=keys, args=args))]
                else:
                    pipe = shard.client.pipeline(transaction=False)
                    for keys, args in calls:
                        await shard.positions(keys=keys, args=args, client=pipe)
                    answers = await self._guard(shard, pipe.execute())
            except BrokerUnavailable:
                return
            flat = [item for answer in answers for item in answer]
            for j, channel in enumerate(names):
                tops[channel] = StreamPosition(int(flat[2 * j]), flat[2 * j + 1].decode())

        await asyncio.gather(
            *(read(shard, names) for shard, names in self._by_shard(list(channels)))
        )
        return tops

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(self, channel: str) -> None:
        if "+" in channel or "#" in channel:
            pattern = self._filter_patterns.get(channel)
            if pattern is not None:
                return
            pattern = filter_pattern(self._channel_prefix, channel).encode()
            self._filter_patterns[channel] = pattern
            self._filters.add(channel, channel, pattern)
            refs = self._pattern_refs.get(pattern, 0)
            self._pattern_refs[pattern] = refs + 1
            # Channels spread over every instance: the pattern goes to each.
            await asyncio.gather(*(s.pubsub.subscribe(pattern, True) for s in self._shards))
        else:
            shard = self._shard(channel)
            await shard.pubsub.subscribe((self._channel_prefix + channel).encode())

    async def unsubscribe(self, channel: str) -> None:
        if "+" in channel or "#" in channel:
            pattern = self._filter_patterns.pop(channel, None)
            if pattern is None:
                return
            self._filters.remove(channel, channel)
            refs = self._pattern_refs.pop(pattern, 0) - 1
            if refs > 0:
                self._pattern_refs[pattern] = refs
                return
            for shard in self._shards:
                shard.pubsub.unsubscribe(pattern, True)
        else:
            shard = self._shard(channel)
            shard.pubsub.unsubscribe((self._channel_prefix + channel).encode())

    # ------------------------------------------------------------------ events, presence

    async def publish_event(self, channel: str, event: ChannelEvent) -> None:
        shard = self._shard(channel)
        await self._guard(
            shard, shard.client.publish(self._channel_prefix + channel, event_message(event))
        )

    def _presence_keys(self, channel: str) -> list[str]:
        k = self._k
        return [f"{k}p:{channel}", f"{k}pz:{channel}", f"{k}pidx"]

    async def add_presence(self, channel: str, entry: PresenceEntry, ttl: float) -> bool:
        shard = self._shard(channel)
        args: list[Any] = [entry.client, entry_bytes(entry), _ms(ttl), channel]
        added = await self._guard(
            shard, shard.presence_add(keys=self._presence_keys(channel), args=args)
        )
        return bool(added)

    async def refresh_presence(self, entries: list[tuple[str, PresenceEntry]], ttl: float) -> None:
        by_shard: dict[int, list[tuple[str, PresenceEntry]]] = {}
        for channel, entry in entries:
            by_shard.setdefault(id(self._shard(channel)), []).append((channel, entry))
        ttl_ms = _ms(ttl)
        failure: BrokerUnavailable | None = None
        for shard in self._shards:
            batch = by_shard.get(id(shard))
            if not batch:
                continue
            for i in range(0, len(batch), KEYS_PER_CALL):
                pipe = shard.client.pipeline(transaction=False)
                for channel, entry in batch[i : i + KEYS_PER_CALL]:
                    args: list[Any] = [entry.client, entry_bytes(entry), ttl_ms, channel]
                    await shard.presence_add(
                        keys=self._presence_keys(channel), args=args, client=pipe
                    )
                try:
                    await self._guard(shard, pipe.execute())
                except BrokerUnavailable as exc:  # the other instances still get theirs
                    failure = exc
                    break
        if failure is not None:
            raise failure

    async def remove_presence(self, channel: str, client: str) -> bool:
        shard = self._shard(channel)
        keys = self._presence_keys(channel)[:2]
        removed = await self._guard(shard, shard.presence_remove(keys=keys, args=[client]))
        return bool(removed)

    async def presence(self, channel: str) -> dict[str, PresenceEntry]:
        shard = self._shard(channel)
        keys = self._presence_keys(channel)[:2]
        raw = await self._guard(shard, shard.presence_get(keys=keys))
        entries = (entry_from_bytes(data) for data in raw)
        return {entry.client: entry for entry in entries}

    async def presence_stats(self, channel: str) -> PresenceStats:
        live = await self.presence(channel)
        return PresenceStats(clients=len(live), users=len({e.user for e in live.values()}))

    # ------------------------------------------------------------------ user status

    def _by_shard(self, keys: list[str]) -> list[tuple[_Shard, list[str]]]:
        groups: dict[int, tuple[_Shard, list[str]]] = {}
        for key in keys:
            shard = self._shard(key)
            groups.setdefault(id(shard), (shard, []))[1].append(key)
        return list(groups.values())

    group_by_shard = _by_shard

    async def set_users_online(self, users: list[str], ttl: float, last_seen_ttl: float) -> None:
        k = self._k
        failure: BrokerUnavailable | None = None
        for shard, group in self._by_shard(users):
            for i in range(0, len(group), KEYS_PER_CALL):
                keys = [f"{k}u:{user}" for user in group[i : i + KEYS_PER_CALL]]
                args: list[Any] = [self.node_id, _ms(ttl), _ms(last_seen_ttl)]
                try:
                    await self._guard(shard, shard.users_online(keys=keys, args=args))
                except BrokerUnavailable as exc:
                    failure = exc
                    break
        if failure is not None:
            raise failure

    async def set_user_offline(self, user: str, last_seen_ttl: float) -> None:
        shard = self._shard(user)
        args: list[Any] = [self.node_id, _ms(last_seen_ttl)]
        await self._guard(shard, shard.user_offline(keys=[f"{self._k}u:{user}"], args=args))

    async def user_status(self, users: list[str]) -> list[UserStatus]:
        k = self._k
        found: dict[str, UserStatus] = {}
        for shard, group in self._by_shard(list(dict.fromkeys(users))):
            for i in range(0, len(group), KEYS_PER_CALL):
                chunk = group[i : i + KEYS_PER_CALL]
                keys = [f"{k}u:{user}" for user in chunk]
                raw = await self._guard(shard, shard.user_status(keys=keys))
                for j, user in enumerate(chunk):
                    online, seen = raw[2 * j], raw[2 * j + 1]
                    found[user] = UserStatus(user, bool(online), int(seen) / 1000)
        return [found[user] for user in users]

    # ------------------------------------------------------------------ retained

    async def set_retained(self, channel: str, pub: Publication | None) -> None:
        shard = self._shard(channel)
        key, index = f"{self._k}r:{channel}", f"{self._k}ridx"
        pipe = shard.client.pipeline(transaction=True)
        if pub is None or not pub.data:
            pipe.delete(key)
            pipe.zrem(index, channel)
        else:
            meta = pub.meta
            expiry = 0
            if isinstance(meta, MqttMeta) and meta.properties is not None:
                expiry = meta.properties.message_expiry_interval or 0
            pipe.set(key, pack_publication(pub), ex=expiry or None)
            pipe.zadd(index, {channel: 0})
        await self._guard(shard, pipe.execute())

    async def retained(self, topic_filter: str) -> list[tuple[str, Publication]]:
        k = self._k
        if "+" not in topic_filter and "#" not in topic_filter:
            shard = self._shard(topic_filter)
            data: Any = await self._guard(shard, shard.client.get(f"{k}r:{topic_filter}"))
            return [(topic_filter, decode_publication(data))] if data is not None else []
        prefix = _literal_prefix(topic_filter).encode()
        low, high = (b"[" + prefix, b"(" + prefix + b"\xff") if prefix else (b"-", b"+")
        out: list[tuple[str, Publication]] = []
        for shard in self._shards:
            names: Any = await self._guard(shard, shard.client.zrangebylex(f"{k}ridx", low, high))
            channels = [n.decode() for n in names if filter_matches(topic_filter, n.decode())]
            for i in range(0, len(channels), KEYS_PER_CALL):
                chunk = channels[i : i + KEYS_PER_CALL]
                values: Any = await self._guard(
                    shard, shard.client.mget([f"{k}r:{channel}" for channel in chunk])
                )
                gone = []
                for channel, data in zip(chunk, values, strict=True):
                    if data is None:
                        gone.append(channel)  # expired (MQTT message expiry)
                    else:
                        out.append((channel, decode_publication(data)))
                if gone:
                    await self._guard(shard, shard.client.zrem(f"{k}ridx", *gone))
        return out

    # ------------------------------------------------------------------ housekeeping

    async def housekeeping(self, now: float) -> None:
        """Check pub/sub connections; announce presence entries whose node stopped
        refreshing them (the script removes each once, so exactly one node announces)."""
        loop_now = asyncio.get_running_loop().time()
        k = self._k
        for shard in self._shards:
            shard.pubsub.check(loop_now)
            if not shard.pubsub.up:
                continue
            try:
                raw = await self._guard(
                    shard,
                    shard.presence_expire(keys=[f"{k}pidx"], args=[f"{k}p:", f"{k}pz:", 1000]),
                )
                for i in range(0, len(raw), 2):
                    entry = entry_from_bytes(raw[i + 1])
                    await self.publish_event(raw[i].decode(), ChannelEvent(LEAVE, entry))
            except BrokerUnavailable:
                continue

    # ------------------------------------------------------------------ nodes

    async def send_control(self, message: ControlMessage) -> None:
        shard = self._shard(CONTROL_KEY)
        name = self._channel_prefix + CONTROL_KEY
        await self._guard(shard, shard.client.publish(name, control_message(message)))

    def _node_keys(self) -> list[str]:
        return [f"{self._k}nodes", f"{self._k}nodez"]

    async def register_node(self, info: dict[str, Any], ttl: float) -> None:
        shard = self._shard(CONTROL_KEY)
        packed = msgpack.packb(dict(info, node_id=self.node_id))
        args: list[Any] = [self.node_id, packed, _ms(ttl)]
        await self._guard(shard, shard.node_register(keys=self._node_keys(), args=args))

    async def unregister_node(self) -> None:
        shard = self._shard(CONTROL_KEY)
        pipe = shard.client.pipeline(transaction=True)
        pipe.hdel(self._node_keys()[0], self.node_id)
        pipe.zrem(self._node_keys()[1], self.node_id)
        await self._guard(shard, pipe.execute())

    async def nodes(self) -> list[dict[str, Any]]:
        shard = self._shard(CONTROL_KEY)
        raw = await self._guard(shard, shard.nodes(keys=self._node_keys()))
        return [msgpack.unpackb(info) for info in raw]

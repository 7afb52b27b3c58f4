"""In-memory broker: one node alone, no Redis. The embedded default.

History lives in a bounded deque per channel. The epoch of a stream is random per process,
so after a restart every old position is from another epoch and recovery says so
(`recovered=false`) instead of pretending.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections import deque
from typing import Any

from realtime.brokers.memory_devices import MemoryDeviceRegistry
from realtime.core.broker import (
    LEAVE,
    Broker,
    BrokerHandler,
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
from realtime.core.devices import DetachedSession, DetachedStore
from realtime.core.topics import FilterTrie, filter_matches

_NO_POSITION = StreamPosition(0, "")


class _Stream:
    __slots__ = ("entries", "epoch", "last_used", "meta_ttl", "top")

    def __init__(self, size: int, meta_ttl: float, now: float) -> None:
        self.epoch = secrets.token_hex(4)
        self.meta_ttl = meta_ttl
        self.top = 0
        # (expires_at, publication), oldest first.
        self.entries: deque[tuple[float, Publication]] = deque(maxlen=max(size, 1))
        self.last_used = now

    def trim(self, now: float) -> None:
        entries = self.entries
        while entries and entries[0][0] <= now:
            entries.popleft()


class MemoryDetachedStore(DetachedStore):
    """Detached sessions of this node's devices, with their expiry (monotonic time)."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, str], tuple[float, DetachedSession]] = {}
        self._wakes: dict[tuple[str, str], deque[float]] = {}  # wake times in the window
        self._now = time.monotonic

    def _live(self, key: tuple[str, str]) -> DetachedSession | None:
        found = self._sessions.get(key)
        if found is None:
            return None
        if found[0] <= self._now():
            del self._sessions[key]
            return None
        return found[1]

    async def detach(self, session: DetachedSession, ttl: float) -> None:
        key = (session.user, session.device)
        kept = dataclasses.replace(session, positions=dict(session.positions))
        self._sessions[key] = (self._now() + ttl, kept)
        if len(self._sessions) % 1024 == 0:  # drop expired ones now and then
            for other in [k for k, (until, _) in self._sessions.items() if until <= self._now()]:
                del self._sessions[other]

    async def get(self, user: str, device: str) -> DetachedSession | None:
        found = self._live((user, device))
        if found is None:
            return None
        return dataclasses.replace(found, positions=dict(found.positions))

    async def advance(self, user: str, device: str, positions: dict[str, StreamPosition]) -> None:
        found = self._live((user, device))
        if found is not None:
            for channel, position in positions.items():
                if channel in found.positions:
                    found.positions[channel] = position

    async def attach(self, user: str, device: str) -> DetachedSession | None:
        found = self._live((user, device))
        self._sessions.pop((user, device), None)
        return found

    async def spend_wake(
        self, user: str, device: str, now: float, budget: int, window: float
    ) -> bool:
        key = (user, device)
        spent = self._wakes.get(key)
        if spent is None:
            spent = self._wakes[key] = deque()
        while spent and spent[0] <= now - window:
            spent.popleft()
        if len(spent) >= budget:
            return False
        spent.append(now)
        if len(self._wakes) > 2 * len(self._sessions) + 1000:  # devices long gone
            for other in [k for k, s in self._wakes.items() if not s or s[-1] <= now - window]:
                del self._wakes[other]
        return True


class MemoryBroker(Broker):
    name = "memory"
    publishes_at_once = True
    single_node = True

    def __init__(self) -> None:
        self.node_id = secrets.token_hex(8)
        self.device_registry = MemoryDeviceRegistry()
        self.detached_sessions = MemoryDetachedStore()
        self._handler: BrokerHandler | None = None
        self._node_info: dict[str, Any] | None = None
        self._streams: dict[str, _Stream] = {}
        # Channels with subscribers, in a dict rather than a set: less than half the memory
        # per entry (there is one per device topic).
        self._subscribed: dict[str, None] = {}
        self._filters: FilterTrie[str, None] = FilterTrie()  # wildcard node subscriptions
        self._retained: dict[str, Publication] = {}
        # (channel, key) -> (expires_at, result)
        self._idempotency: dict[tuple[str, str], tuple[float, PublishResult]] = {}
        # channel -> client -> (expires_at, entry)
        self._presence: dict[str, dict[str, tuple[float, PresenceEntry]]] = {}
        # user -> (online until (monotonic), unix time of that refresh): one tuple shared by
        # every user of a batch, so an online device costs one dict entry here.
        self._online: dict[str, tuple[float, float]] = {}
        # user -> (last seen, kept until), unix times; only users who went offline.
        self._last_seen: dict[str, tuple[float, float]] = {}
        self._last_seen_ttl = 2_592_000.0  # as configured, learnt from the calls
        self._next_last_seen_sweep = 0.0
        self._now = time.monotonic
        self._wall = time.time

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler

    async def close(self) -> None:
        self._handler = None

    def _stream(self, channel: str, policy: HistoryPolicy, now: float) -> _Stream:
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream(policy.size, policy.meta_ttl, now)
        elif stream.entries.maxlen != max(policy.size, 1):
            # The namespace's history size changed (config reload): keep what fits.
            stream.entries = deque(stream.entries, maxlen=max(policy.size, 1))
        stream.last_used = now
        return stream

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
        return self._publish(
            channel, data, user, client, tags, history, idempotency_key, idempotency_ttl, meta
        )

    def publish_nowait(
        self,
        channel: str,
        data: bytes,
        user: str,
        client: str,
        history: HistoryPolicy | None,
        idempotency_ttl: float,
        meta: object,
    ) -> PublishResult:
        return self._publish(channel, data, user, client, None, history, "", idempotency_ttl, meta)

    def _publish(
        self,
        channel: str,
        data: bytes,
        user: str,
        client: str,
        tags: dict[str, str] | None,
        history: HistoryPolicy | None,
        idempotency_key: str,
        idempotency_ttl: float,
        meta: object,
    ) -> PublishResult:
        now = self._now()
        if idempotency_key:
            seen = self._idempotency.get((channel, idempotency_key))
            if seen is not None and seen[0] > now:
                return PublishResult(seen[1].position, duplicate=True)
        if history is not None and history.size > 0:
            stream = self._stream(channel, history, now)
            stream.top += 1
            pub = Publication(stream.top, data, user, client, tags, meta)
            stream.entries.append((now + history.ttl, pub))
            result = PublishResult(StreamPosition(stream.top, stream.epoch))
        else:
            pub = Publication(0, data, user, client, tags, meta)
            result = PublishResult(_NO_POSITION)
        if idempotency_key:
            self._idempotency[(channel, idempotency_key)] = (now + idempotency_ttl, result)
        if self._handler is not None and (
            channel in self._subscribed or (self._filters.size and self._filters.match(channel))
        ):
            self._handler.handle_publication(channel, pub)
        return result

    async def subscribe(self, channel: str) -> None:
        if "+" in channel or "#" in channel:
            self._filters.add(channel, channel, None)
        else:
            self._subscribed[channel] = None

    async def unsubscribe(self, channel: str) -> None:
        if "+" in channel or "#" in channel:
            self._filters.remove(channel, channel)
        else:
            self._subscribed.pop(channel, None)

    async def set_retained(self, channel: str, pub: Publication | None) -> None:
        if pub is None or not pub.data:
            self._retained.pop(channel, None)
        else:
            self._retained[channel] = pub

    async def retained(self, topic_filter: str) -> list[tuple[str, Publication]]:
        if "+" not in topic_filter and "#" not in topic_filter:
            pub = self._retained.get(topic_filter)
            return [(topic_filter, pub)] if pub is not None else []
        return [(c, p) for c, p in self._retained.items() if filter_matches(topic_filter, c)]

    async def history(
        self,
        channel: str,
        policy: HistoryPolicy,
        *,
        since: StreamPosition | None = None,
        limit: int = 0,
        reverse: bool = False,
    ) -> HistoryResult:
        now = self._now()
        stream = self._stream(channel, policy, now)
        position = StreamPosition(stream.top, stream.epoch)
        if limit < 0:
            return HistoryResult([], position)
        stream.trim(now)
        if since is not None:
            if since.epoch != stream.epoch:
                return HistoryResult([], position)
            # From the newest back: an up-to-date reader (most polls) costs nothing.
            pubs = []
            for _, pub in reversed(stream.entries):
                if pub.offset <= since.offset:
                    break
                pubs.append(pub)
            pubs.reverse()
        else:
            pubs = [pub for _, pub in stream.entries]
        if reverse:
            pubs.reverse()
        if limit:
            pubs = pubs[:limit]
        return HistoryResult(pubs, position)

    def _subscribed_to(self, channel: str) -> bool:
        return channel in self._subscribed or bool(
            self._filters.size and self._filters.match(channel)
        )

    async def publish_event(self, channel: str, event: ChannelEvent) -> None:
        if self._handler is not None and self._subscribed_to(channel):
            self._handler.handle_event(channel, event)

    async def add_presence(self, channel: str, entry: PresenceEntry, ttl: float) -> bool:
        entries = self._presence.setdefault(channel, {})
        now = self._now()
        old = entries.get(entry.client)
        entries[entry.client] = (now + ttl, entry)
        return old is None or old[0] <= now

    async def refresh_presence(self, entries: list[tuple[str, PresenceEntry]], ttl: float) -> None:
        until = self._now() + ttl
        presence = self._presence
        for channel, entry in entries:
            presence.setdefault(channel, {})[entry.client] = (until, entry)

    async def remove_presence(self, channel: str, client: str) -> bool:
        entries = self._presence.get(channel)
        if entries is None:
            return False
        old = entries.pop(client, None)
        if not entries:
            del self._presence[channel]
        return old is not None and old[0] > self._now()

    async def set_users_online(self, users: list[str], ttl: float, last_seen_ttl: float) -> None:
        mark = (self._now() + ttl, self._wall())
        online, last_seen = self._online, self._last_seen
        for user in users:
            online[user] = mark
            if last_seen:
                last_seen.pop(user, None)
        self._last_seen_ttl = last_seen_ttl

    async def set_user_offline(self, user: str, last_seen_ttl: float) -> None:
        self._online.pop(user, None)
        wall = self._wall()
        self._last_seen[user] = (wall, wall + last_seen_ttl)

    async def user_status(self, users: list[str]) -> list[UserStatus]:
        now, wall = self._now(), self._wall()
        out = []
        for user in users:
            mark = self._online.get(user)
            if mark is not None and mark[0] > now:
                out.append(UserStatus(user, True, wall))
                continue
            seen, kept_until = self._last_seen.get(user, (0.0, 0.0))
            if mark is not None and mark[1] > seen:  # its node stopped refreshing it
                seen, kept_until = mark[1], mark[1] + self._last_seen_ttl
            out.append(UserStatus(user, False, seen if kept_until > wall else 0.0))
        return out

    def _live_presence(self, channel: str) -> list[PresenceEntry]:
        now = self._now()
        entries = self._presence.get(channel, {})
        return [entry for until, entry in entries.values() if until > now]

    async def presence(self, channel: str) -> dict[str, PresenceEntry]:
        return {entry.client: entry for entry in self._live_presence(channel)}

    async def presence_stats(self, channel: str) -> PresenceStats:
        live = self._live_presence(channel)
        return PresenceStats(clients=len(live), users=len({entry.user for entry in live}))

    async def housekeeping(self, now: float) -> None:
        now = self._now()
        for channel in list(self._presence):
            entries = self._presence[channel]
            gone = [c for c, (until, _) in entries.items() if until <= now]
            for client in gone:
                _, entry = entries.pop(client)
                # Its node stopped refreshing it without removing it: announce the leave.
                await self.publish_event(channel, ChannelEvent(LEAVE, entry))
            if not entries:
                del self._presence[channel]
        for user in [u for u, (until, _) in self._online.items() if until <= now]:
            # Its node stopped refreshing it (it died): offline, last seen at the last refresh.
            _, refreshed = self._online.pop(user)
            self._last_seen[user] = (refreshed, refreshed + self._last_seen_ttl)
        wall = self._wall()
        if wall >= self._next_last_seen_sweep:
            # Kept for days (last_seen_ttl): once a minute is plenty, and the marks of every
            # user seen lately are too many to walk each second.
            self._next_last_seen_sweep = wall + 60.0
            for user in [u for u, (_, kept) in self._last_seen.items() if kept <= wall]:
                del self._last_seen[user]
        expired = [key for key, (until, _) in self._idempotency.items() if until <= now]
        for key in expired:
            del self._idempotency[key]
        idle: list[str] = []
        for channel, stream in self._streams.items():
            stream.trim(now)
            if not stream.entries and now - stream.last_used > stream.meta_ttl:
                idle.append(channel)
        for channel in idle:
            del self._streams[channel]

    def stream_count(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ nodes

    async def send_control(self, message: ControlMessage) -> None:
        # One node: every message is for it. Delivered on the next loop turn, as a
        # message through Redis would be, so a request's sender is waiting by then.
        handler = self._handler
        if handler is not None and message.target in ("", self.node_id):
            asyncio.get_running_loop().call_soon(handler.handle_control, message)

    async def register_node(self, info: dict[str, Any], ttl: float) -> None:
        self._node_info = dict(info, node_id=self.node_id)

    async def unregister_node(self) -> None:
        self._node_info = None

    async def nodes(self) -> list[dict[str, Any]]:
        return [self._node_info] if self._node_info is not None else []

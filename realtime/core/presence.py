"""Presence and user status as one node sees them: its own clients, kept alive in the broker.

The broker holds the shared view (entries with a TTL, online marks, last-seen times). This
module owns what *this node* put there and keeps it alive: every `ttl / 3` seconds it
refreshes all of its entries and online marks in one batch, so when the node dies its
clients drop out of presence within `ttl` seconds, with a leave event. With a single-node
broker (memory) online marks are not written at all: the node's own count answers, which
keeps an idle device's cost for user status to one dict entry.

Broker calls run in order on one worker task that exists only while calls are waiting,
so a quick leave-then-join (or offline-then-online) can never land in the wrong order,
and a connect or disconnect costs no task of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from realtime.config import PresenceConfig
from realtime.core.broker import JOIN, LEAVE, Broker, ChannelEvent, PresenceEntry
from realtime.log import event

log = logging.getLogger("realtime.presence")

BrokerCall = Callable[[], Awaitable[None]]


class PresenceTracker:
    def __init__(
        self, broker: Broker, config: PresenceConfig, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.broker = broker
        self.config = config
        self.loop = loop
        self.local: dict[str, dict[str, PresenceEntry]] = {}  # channel -> client -> entry
        self.online: dict[str, int] = {}  # user -> connections on this node
        self._calls: deque[BrokerCall] = deque()
        self._coming_online: list[str] = []  # waiting for the queued _mark_online
        self._worker: asyncio.Task[None] | None = None
        self._next_refresh = 0.0

    # ------------------------------------------------------------------ channels

    async def join(self, channel: str, entry: PresenceEntry, announce: bool) -> None:
        """Add `entry` (awaited: the caller's reply follows the broker's answer)."""
        self.local.setdefault(channel, {})[entry.client] = entry
        new = await self.broker.add_presence(channel, entry, self.config.ttl)
        if new and announce:
            await self.broker.publish_event(channel, ChannelEvent(JOIN, entry))

    def join_soon(self, channel: str, entry: PresenceEntry, announce: bool) -> None:
        """`join` in the background (from code that cannot wait, e.g. a session resuming)."""

        async def call() -> None:
            await self.join(channel, entry, announce)

        self._enqueue(call)

    def leave(self, channel: str, client: str, announce: bool) -> None:
        """Remove the entry in the background (called from disconnects, which cannot wait)."""
        entries = self.local.get(channel)
        if entries is None:
            return
        entry = entries.pop(client, None)
        if not entries:
            del self.local[channel]
        if entry is None:
            return

        async def call() -> None:
            if await self.broker.remove_presence(channel, client) and announce:
                await self.broker.publish_event(channel, ChannelEvent(LEAVE, entry))

        self._enqueue(call)

    # ------------------------------------------------------------------ users

    def user_connected(self, user: str) -> None:
        count = self.online.get(user, 0)
        self.online[user] = count + 1
        if count == 0 and not self.broker.single_node:
            # Users coming online together (a reconnect storm) go in one broker call: the
            # call queued first takes every user added until it runs.
            self._coming_online.append(user)
            if len(self._coming_online) == 1:
                self._enqueue(self._mark_online)

    async def _mark_online(self) -> None:
        users, self._coming_online = self._coming_online, []
        users = [u for u in dict.fromkeys(users) if u in self.online]  # not gone since
        if users:
            config = self.config
            await self.broker.set_users_online(users, config.ttl, config.last_seen_ttl)

    def is_online(self, user: str) -> bool:
        """Connected to this node (the broker knows about the others)."""
        return user in self.online

    def user_disconnected(self, user: str) -> None:
        count = self.online.get(user, 0) - 1
        if count > 0:
            self.online[user] = count
            return
        self.online.pop(user, None)
        if count < 0:
            return

        async def call() -> None:
            if user not in self.online:  # not back on this node in the meantime
                await self.broker.set_user_offline(user, self.config.last_seen_ttl)

        self._enqueue(call)

    # ------------------------------------------------------------------ upkeep

    def tick(self, now: float) -> None:
        """Once a second: every ttl / 3 seconds, refresh everything this node holds."""
        if now < self._next_refresh:
            return
        self._next_refresh = now + self.config.ttl / 3
        if not self.local and not self.online:
            return
        entries = [
            (channel, entry)
            for channel, clients in self.local.items()
            for entry in clients.values()
        ]
        # A single-node broker asks this node who is online (`is_online`) instead.
        users = [] if self.broker.single_node else list(self.online)
        config = self.config

        async def call() -> None:
            if entries:
                await self.broker.refresh_presence(entries, config.ttl)
            if users:
                await self.broker.set_users_online(users, config.ttl, config.last_seen_ttl)

        self._enqueue(call)

    def _enqueue(self, call: BrokerCall) -> None:
        self._calls.append(call)
        if self._worker is None:
            self._worker = self.loop.create_task(self._work())

    async def _work(self) -> None:
        try:
            while self._calls:
                call = self._calls.popleft()
                try:
                    await call()
                except Exception as exc:  # the next refresh repairs what this one missed
                    event(log, "presence_update_failed", logging.WARNING, error=str(exc))
        finally:
            self._worker = None

    async def flush(self) -> None:
        """Wait until every queued broker call is done (drain, tests)."""
        while self._worker is not None:
            await asyncio.shield(self._worker)

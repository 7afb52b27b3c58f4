"""Polling by backgrounded apps: what they missed on their channels, over plain HTTP.

`GET /v1/poll` (transports/websocket.py) lands here. The app's detached session says
which channels it had and the position it has of each (the app may send fresher ones:
its own word wins). For every channel that keeps history, the publications after that
position come back in stream order, at most `limit` in all, with the next position; a
channel whose history no longer covers the gap (or whose stream was reset: another epoch)
says `recovered=false` with the current position, as a recovering subscribe would. These
are the publications and offsets the socket would have delivered (never as deltas), so
an app that dedupes by offset gets each once, and its foreground reconnect recovers from
the positions it polled to. The positions reached are written back, so the next poll
(without positions) goes on from there.

With `wait`, a poll that finds nothing waits (up to `background.poll_max_wait`) for a
publication on those channels, then reads once more: long polling.

Every poll reads the broker, so `PollGate` bounds them: a token bucket per device
(`background.poll_rate`/`poll_burst`: enough for a wake's few pages, not for a loop) and
at most `background.max_polls_in_flight` on the node (long polls hold a connection).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from realtime.auth import Principal
from realtime.core.broker import HistoryPolicy, Publication, StreamPosition
from realtime.core.ratelimit import TokenBucket
from realtime.protocol.codes import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from realtime.config import BackgroundConfig
    from realtime.core.node import Node


@dataclass(slots=True)
class ChannelPoll:
    publications: list[Publication]
    position: StreamPosition  # where the next poll starts (the last one returned, or top)
    recovered: bool  # False: history does not reach back to the app's position


@dataclass(slots=True)
class PollResult:
    channels: dict[str, ChannelPoll] = field(default_factory=dict)
    more: bool = False  # the limit was reached: poll again right away


class _Waiter:
    """A poll waiting for any publication on its channels (a hub filter member)."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def deliver(self, channel: str, pub: Publication, matched: list[object]) -> None:
        self.event.set()


class NoDetachedSession(ProtocolError):
    """The app has no detached session: it is in the foreground, or it expired."""


class PollRefused(ProtocolError):
    """Too many polls: this device's rate (TOO_MANY_REQUESTS) or the node's in-flight
    bound (NOT_AVAILABLE); `retry_after_ms` says when to try again."""


class PollGate:
    """Admission of polls: a token bucket per device, a bound on polls in flight."""

    __slots__ = ("buckets", "burst", "in_flight", "max_in_flight", "next_prune", "rate")

    def __init__(self, config: BackgroundConfig) -> None:
        self.rate = config.poll_rate
        self.burst = config.poll_burst
        self.max_in_flight = config.max_polls_in_flight
        self.buckets: dict[tuple[str, str], TokenBucket] = {}
        self.in_flight = 0
        self.next_prune = 0.0

    def admit(self, user: str, device: str, now: float) -> None:
        """Count a poll in (`done` counts it out) or raise PollRefused."""
        if self.in_flight >= self.max_in_flight:
            raise PollRefused(
                ErrorCode.NOT_AVAILABLE,
                "this node serves too many polls now: try again shortly (or another node)",
                temporary=True,
                retry_after_ms=1000,
            )
        key = (user, device)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst, now)
        wait_ms = bucket.take(now)
        if wait_ms:
            raise PollRefused(
                ErrorCode.TOO_MANY_REQUESTS,
                "this device polls too often: poll after a wake, while `more` is true, or "
                "with `wait` for long polling",
                temporary=True,
                retry_after_ms=wait_ms,
            )
        self.in_flight += 1

    def done(self) -> None:
        self.in_flight -= 1

    def prune(self, now: float) -> None:
        """Forget devices whose bucket is full again (called every second, works once a
        minute)."""
        if now < self.next_prune:
            return
        self.next_prune = now + 60.0
        for key in [k for k, b in self.buckets.items() if b.full(now)]:
            del self.buckets[key]


async def poll(
    node: Node,
    principal: Principal,
    since: dict[str, StreamPosition],
    *,
    wait: float = 0.0,
    limit: int = 0,
) -> PollResult:
    if not principal.device:
        raise ProtocolError(
            ErrorCode.DEVICE_REQUIRED, "poll needs a token with a device claim (device=...)"
        )
    gate = node.polls
    gate.admit(principal.user, principal.device, node.loop.time())
    try:
        return await _poll(node, principal, since, wait, limit)
    finally:
        gate.done()


async def _poll(
    node: Node, principal: Principal, since: dict[str, StreamPosition], wait: float, limit: int
) -> PollResult:
    config = node.config.background
    limit = min(limit or config.poll_page_size, config.poll_page_size)
    wait = min(max(wait, 0.0), config.poll_max_wait)
    store = node.broker.detached_sessions
    detached = await store.get(principal.user, principal.device)
    if detached is None:
        raise NoDetachedSession(
            ErrorCode.NOT_AVAILABLE,
            "no detached session for this device: it is in the foreground or its session "
            "expired; reconnect and subscribe with recovery",
        )
    positions = {
        channel: since.get(channel, position)
        for channel, position in detached.positions.items()
        if node.namespace(channel).history is not None and node.may_subscribe(principal, channel)
    }
    result = await _read(node, positions, limit)
    if wait and not any(c.publications for c in result.channels.values()) and positions:
        waiter = _Waiter()
        for channel in positions:
            node.hub.add_filter(channel, waiter, None)
            node.hold_filter(channel)
        try:
            # Read again after subscribing: a publication between the first read and the
            # subscription would otherwise be waited for in vain.
            result = await _read(node, positions, limit)
            if not any(c.publications for c in result.channels.values()):
                try:
                    await asyncio.wait_for(waiter.event.wait(), wait)
                except TimeoutError:
                    pass
                else:
                    result = await _read(node, positions, limit)
        finally:
            for channel in positions:
                node.hub.remove_filter(channel, waiter)
                await node.unsubscribe_filter(channel)
    stored = detached.positions
    moved = {
        channel: c.position
        for channel, c in result.channels.items()
        if c.position != stored.get(channel)
    }
    if moved:  # most polls find nothing new: nothing to write back
        await store.advance(principal.user, principal.device, moved)
    return result


async def _read(node: Node, positions: dict[str, StreamPosition], limit: int) -> PollResult:
    """The publications after `positions`, at most `limit`, channels in name order: all
    channels read at once (`Broker.histories`: one round trip per instance)."""
    reads: dict[str, tuple[HistoryPolicy, StreamPosition]] = {}
    for channel, position in positions.items():
        policy = node.namespace(channel).history
        assert policy is not None
        reads[channel] = (policy, position)
    found = await node.broker.histories(reads)
    result = PollResult()
    left = limit
    for channel, position in sorted(positions.items()):
        history = found[channel]
        top = history.position
        pubs = history.publications
        if (
            position.epoch != top.epoch
            or position.offset > top.offset
            or (len(pubs) != top.offset - position.offset)
        ):
            # History does not reach back to the app's position: it must reload.
            result.channels[channel] = ChannelPoll([], top, False)
            continue
        if len(pubs) > left:
            pubs = pubs[: max(left, 0)]
            result.more = True
        left -= len(pubs)
        # Nothing taken: either nothing new (position is the top) or no room left in this
        # page (the next one starts from the same place).
        reached = StreamPosition(pubs[-1].offset, top.epoch) if pubs else position
        result.channels[channel] = ChannelPoll(pubs, reached, True)
    return result

"""Backgrounded apps: detached sessions and the wakes that bring them back.

A mobile app in the background (the `app_state` command) or whose socket dropped is
*detached*: its channels and the position it has of each are kept in the broker's
`DetachedStore` for `background.detach_ttl`, so a poll on any node can serve it. On the
node where it detached, a `DetachedDevice` stands in for it in the hub, on the channels of
namespaces with `push = true`: a publication there arms one wake after
`background.wake_delay`; later ones only move the cursor. When the wake is due the node
checks that the app is still away (it may have come back through another node), spends
one of the device's `background.wakes_per_hour` (counted by the broker, so across nodes),
and hands one silent push per registered token to the push sender: no message content,
only a hint to sync. A namespace with
`push_notification` sends that generic text as a visible notification instead, collapsed
per channel, except during its quiet hours.

Coming back (foreground, or a new connection of the same user and device) attaches the
app again: the detached session ends and a pending wake is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import time
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from realtime.config import parse_quiet_hours
from realtime.core.broker import BrokerUnavailable, Publication, StreamPosition
from realtime.core.devices import DetachedSession, DeviceRecord
from realtime.log import event

if TYPE_CHECKING:
    from realtime.core.node import Node
    from realtime.core.session import Session
    from realtime.push.messages import Wake

log = logging.getLogger("realtime.background")

T = TypeVar("T")
HOUR = 3600.0
RELEASE = "release_device"  # control message: stop standing in for a device
ADOPT_INTERVAL = 5.0  # seconds between looks for the stand-ins of nodes that are gone
ADOPT_BATCH = 500
WAKE_TTL = 3600  # seconds a provider keeps trying to deliver a wake


class WakeSink(Protocol):
    def submit(self, wake: Wake) -> bool: ...


class DetachedDevice:
    """A detached app this node stands in for, on its push channels (exact names)."""

    __slots__ = ("channels", "detached_at", "device", "pending", "user")

    def __init__(self, user: str, device: str, detached_at: float) -> None:
        self.user = user
        self.device = device
        self.detached_at = detached_at
        self.channels: tuple[str, ...] = ()
        self.pending: WakeBatch | None = None  # its wake, armed and not yet due


class WakeBatch:
    """The wakes one publication armed: one timer for all of them. A device leaves the
    batch by no longer pointing at it (`DetachedDevice.pending`)."""

    __slots__ = ("devices", "timer")

    def __init__(self, devices: list[DetachedDevice]) -> None:
        self.devices = devices
        self.timer: asyncio.TimerHandle | None = None


class StandIns:
    """The detached devices this node stands in for on one channel: a single hub filter
    member for all of them, so that a publication costs the same however many there are
    (it visits only the `idle` ones, whose wake is not armed yet)."""

    __slots__ = ("apps", "devices", "idle", "last_seq")

    def __init__(self, apps: BackgroundApps) -> None:
        self.apps = apps
        self.devices: set[DetachedDevice] = set()
        self.idle: set[DetachedDevice] = set()
        self.last_seq = 0  # BackgroundApps' publication counter at the latest one here

    def deliver(self, channel: str, pub: Publication, matched: list[object]) -> None:
        self.apps.published(self)


def in_quiet_hours(spec: str, now: float) -> bool:
    hours = parse_quiet_hours(spec) if spec else None
    if hours is None:
        return False
    start, end = hours
    minute = int(now // 60) % 1440  # UTC
    return start <= minute < end if start <= end else minute >= start or minute < end


class BackgroundApps:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = node.config.background
        self.sink: WakeSink | None = None  # the push sender, when providers are configured
        self.local: dict[tuple[str, str], DetachedDevice] = {}
        self.stand_ins: dict[str, StandIns] = {}  # by channel
        self._published = 0  # publications seen on stand-in channels (a clock for cursors)
        # (detached_at, n, key, device) of the devices standing in, oldest first: expiry.
        self._expiry: list[tuple[float, int, tuple[str, str], DetachedDevice]] = []
        self._watched = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Per device, the store write last started: the next one waits for it.
        self._writes: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._next_adoption = 0.0
        self._adoption: asyncio.Task[None] | None = None
        self.wall_time = time.time
        self.counts = node.metrics.wakes
        self.node_id = node.broker.node_id
        node.cluster.on(RELEASE, self._release_request)
        metrics = node.metrics
        metrics.gauge(
            "detached_devices",
            "Backgrounded apps this node stands in for (arms their wakes).",
            lambda: len(self.local),
        )
        metrics.gauge(
            "wakes_pending",
            "Wakes armed and not yet due on this node.",
            lambda: sum(1 for m in self.local.values() if m.pending is not None),
        )
        metrics.gauge("polls_in_flight", "GET /v1/poll being served.", lambda: node.polls.in_flight)

    # ------------------------------------------------------------------ detach, attach

    def positions_of(
        self, session: Session, given: dict[str, StreamPosition] | None
    ) -> dict[str, StreamPosition]:
        """What the app has of each of its channels: its own word first, else the last
        position this node delivered (StreamPosition(0, "") without history)."""
        node = self.node
        positions: dict[str, StreamPosition] = {}
        for channel in session.channels:
            position = (given or {}).get(channel) or node.delivered_position(channel)
            positions[channel] = position or StreamPosition(0, "")
        return positions

    async def detach(
        self,
        session: Session,
        state: str,
        given: dict[str, StreamPosition] | None = None,
    ) -> dict[str, StreamPosition]:
        """The app went away (`state`): keep its session, stand in for it here."""
        detached = self._detached(session, state, given)
        await self._in_order(
            (detached.user, detached.device),
            self.node.broker.detached_sessions.detach(detached, self.config.detach_ttl),
        )
        event(
            log,
            "app_detached",
            logging.DEBUG,
            user=detached.user,
            device=detached.device,
            state=state,
            channels=len(detached.positions),
        )
        return detached.positions

    def detach_soon(self, session: Session, state: str) -> None:
        """`detach` for a session that is going away now: its positions are taken at
        once, the store is written in the background."""

        async def write() -> None:
            try:
                await self.node.broker.detached_sessions.detach(detached, self.config.detach_ttl)
            except BrokerUnavailable as exc:
                event(log, "detach_failed", logging.WARNING, user=detached.user, error=str(exc))

        detached = self._detached(session, state, None)
        self._spawn(self._in_order((detached.user, detached.device), write()))

    def _detached(
        self, session: Session, state: str, given: dict[str, StreamPosition] | None
    ) -> DetachedSession:
        """The detached session of `session`'s app, stood in for here from now on."""
        principal = session.principal
        assert principal is not None and principal.device
        now = self.wall_time()
        positions = self.positions_of(session, given)
        self.watch(principal.user, principal.device, now, list(positions))
        return DetachedSession(
            principal.user, principal.device, state, now, positions, self.node_id
        )

    def watch(self, user: str, device: str, detached_at: float, channels: list[str]) -> None:
        """Stand in for the app in the hub on its push channels (replacing an older one)."""
        node = self.node
        self.forget(user, device)
        member = DetachedDevice(user, device, detached_at)
        member.channels = tuple(c for c in channels if node.namespace(c).config.push)
        if not member.channels:
            return
        key = (user, device)
        self.local[key] = member
        self._watched += 1
        heapq.heappush(self._expiry, (detached_at, self._watched, key, member))
        for channel in member.channels:
            group = self.stand_ins.get(channel)
            if group is None:
                group = self.stand_ins[channel] = StandIns(self)
                node.hub.add_filter(channel, group, None)
                node.hold_filter(channel)
            group.devices.add(member)
            group.idle.add(member)

    def forget(self, user: str, device: str) -> bool:
        """Stop standing in for the app here; True when a wake was pending."""
        member = self.local.pop((user, device), None)
        if member is None:
            return False
        pending = member.pending is not None
        member.pending = None  # its batch skips it
        node = self.node
        for channel in member.channels:
            group = self.stand_ins[channel]
            group.devices.discard(member)
            group.idle.discard(member)
            if not group.devices:
                del self.stand_ins[channel]
                node.hub.remove_filter(channel, group)
                self._spawn(node.unsubscribe_filter(channel))
        return pending

    async def attach(self, user: str, device: str) -> DetachedSession | None:
        """The app is back (foreground, or connected again): end its detached session."""
        self._let_go(user, device)
        return await self._in_order((user, device), self._end_detached(user, device))

    async def _end_detached(self, user: str, device: str) -> DetachedSession | None:
        found = await self.node.broker.detached_sessions.attach(user, device)
        if found is not None:
            event(log, "app_attached", logging.DEBUG, user=user, device=device)
            if found.node and found.node != self.node_id:
                # Back through another node: the one standing in lets go now (else it
                # would hold its hub entries until its next wake finds the app back).
                body = {"user": user, "device": device, "detached_at": found.detached_at}
                with contextlib.suppress(BrokerUnavailable):  # then its next wake does
                    await self.node.cluster.tell(found.node, RELEASE, body)
        return found

    async def _release_request(self, body: dict[str, Any]) -> dict[str, Any]:
        """Another node: the app we stand in for came back there."""
        key = (str(body.get("user", "")), str(body.get("device", "")))
        member = self.local.get(key)
        if member is not None and member.detached_at == body.get("detached_at"):
            self._let_go(*key)  # (not when it detached here again since)
        return {}

    def _let_go(self, user: str, device: str) -> None:
        """The app is back: stop standing in for it; a wake it had pending is cancelled."""
        if self.forget(user, device):
            self.counts["cancelled"] += 1

    def attach_soon(self, user: str, device: str) -> None:
        """`attach` for a connection that just opened: the stand-in goes at once, the
        store is written in the background (before any later detach of the device)."""
        self._let_go(user, device)

        async def end() -> None:
            with contextlib.suppress(BrokerUnavailable):  # its wake checks the store anyway
                await self._end_detached(user, device)

        self._spawn(self._in_order((user, device), end()))

    def _in_order(self, key: tuple[str, str], step: Awaitable[T]) -> Coroutine[Any, Any, T]:
        """`step`, a store write of device `key`, to run after the writes asked for before
        it: a connect followed at once by a drop or app_state (even in the same frame) must
        not have its attach land after the detach. Its turn is taken now, at the call."""
        before = self._writes.get(key)
        done: asyncio.Future[None] = self.node.loop.create_future()
        self._writes[key] = done
        return self._run_in_turn(key, before, done, step)

    async def _run_in_turn(
        self,
        key: tuple[str, str],
        before: asyncio.Future[None] | None,
        done: asyncio.Future[None],
        step: Awaitable[T],
    ) -> T:
        try:
            if before is not None:  # bounded: a write that never ran must not block forever
                await asyncio.wait([before], timeout=2 * self.node.config.broker.command_timeout)
            return await step
        finally:
            if isinstance(step, Coroutine):
                step.close()  # cancelled before it started: never to run
            done.set_result(None)
            if self._writes.get(key) is done:
                del self._writes[key]

    # ------------------------------------------------------------------ wakes

    def published(self, group: StandIns) -> None:
        """A publication on `group`'s channel: arm a wake for each device there without
        one (one timer for them all); the others only count it."""
        self._published += 1
        group.last_seq = self._published
        idle = group.idle
        coalesced = len(group.devices) - len(idle)
        if coalesced:
            self.counts["coalesced"] += coalesced
        if not idle:
            return
        batch = WakeBatch(list(idle))
        for member in batch.devices:
            member.pending = batch
            for channel in member.channels:
                self.stand_ins[channel].idle.discard(member)
        self.counts["armed"] += len(batch.devices)
        batch.timer = self.node.loop.call_later(self.config.wake_delay, self._due, batch)

    def _due(self, batch: WakeBatch) -> None:
        for member in batch.devices:
            if member.pending is not batch:
                continue  # forgotten (came back) since
            member.pending = None
            for channel in member.channels:  # the next publication arms a new wake
                self.stand_ins[channel].idle.add(member)
            self._spawn(self._wake(member))

    def latest_channel(self, member: DetachedDevice) -> str:
        """The device's channel with the latest publication (what its wake is about)."""
        groups = self.stand_ins
        return max(member.channels, key=lambda c: groups[c].last_seq if c in groups else 0)

    async def _wake(self, member: DetachedDevice) -> None:
        try:
            await self._wake_now(member)
        except Exception:
            log.exception("wake_failed", extra={"fields": {"user": member.user}})

    async def _wake_now(self, member: DetachedDevice) -> None:
        key = (member.user, member.device)
        node = self.node
        try:
            stored = await node.broker.detached_sessions.get(member.user, member.device)
            if (
                stored is None
                or stored.detached_at != member.detached_at
                or stored.node not in ("", self.node_id)
            ):
                # Back (maybe through another node), detached again elsewhere, or taken
                # over by another node (which thought this one dead).
                if self.local.get(key) is member:
                    self.forget(member.user, member.device)
                self.counts["cancelled"] += 1
                return
            if not await node.broker.detached_sessions.spend_wake(
                member.user, member.device, self.wall_time(), self.config.wakes_per_hour, HOUR
            ):
                self.counts["over_budget"] += 1
                return
            record = await node.broker.device_registry.device(member.user, member.device)
        except BrokerUnavailable as exc:
            event(log, "wake_failed", logging.WARNING, user=member.user, error=str(exc))
            return
        if record is None:
            self.counts["no_token"] += 1
            return
        wake = self.wake_for(record, self.latest_channel(member))
        sink = self.sink
        if sink is not None and sink.submit(wake):
            self.counts["sent"] += 1
            event(log, "wake_sent", logging.DEBUG, user=member.user, device=member.device)

    def wake_for(self, record: DeviceRecord, channel: str) -> Wake:
        from realtime.push.messages import Wake

        ns = self.node.namespace(channel).config
        visible = bool(ns.push_notification) and not in_quiet_hours(
            ns.push_quiet_hours, self.wall_time()
        )
        return Wake(
            provider=record.provider,
            token=record.token,
            environment=record.environment,
            app_id=record.app_id,
            platform=record.platform,
            kind="visible" if visible else "silent",
            # One notification per channel on the device; the id says nothing of it.
            collapse_id="ch-" + hashlib.blake2b(channel.encode(), digest_size=8).hexdigest()
            if visible
            else "sync",
            hint={"t": "sync"},
            title="",
            body=ns.push_notification if visible else "",
            ttl=WAKE_TTL,
            registered_at=record.registered_at,
        )

    # ------------------------------------------------------------------ housekeeping

    async def adopt_orphans(self) -> int:
        """Stand in for the detached devices of nodes that are gone (killed, or stopped
        for a deploy): without this their apps would get no wake until they came back.
        How many were taken over here."""
        store = self.node.broker.detached_sessions
        candidates = await store.orphaned_nodes()
        if not candidates:
            return 0
        live = {str(n["node_id"]) for n in await self.node.cluster.nodes()} | {self.node_id}
        ttl = self.config.detach_ttl
        total = 0
        for dead in candidates:
            if dead in live:
                continue
            taken = 0
            while adopted := await store.adopt(dead, self.node_id, ADOPT_BATCH, ttl):
                for session in adopted:
                    self.watch(
                        session.user, session.device, session.detached_at, list(session.positions)
                    )
                taken += len(adopted)
            if taken:
                event(log, "detached_devices_adopted", node=dead, devices=taken)
            total += taken
        return total

    async def _adopt_orphans(self) -> None:
        try:
            await self.adopt_orphans()
        except BrokerUnavailable:
            pass  # the next round
        except Exception:
            log.exception("adopt_failed")

    def tick(self, now: float) -> None:
        """Once a second: stop standing in for apps whose detached session expired (the
        oldest first, so the work is what expired, not how many stand); now and then,
        take over the stand-ins of nodes that are gone."""
        if now >= self._next_adoption and not self.node.broker.single_node:
            self._next_adoption = now + ADOPT_INTERVAL
            if self._adoption is None or self._adoption.done():
                self._adoption = self.node.loop.create_task(self._adopt_orphans())
        horizon = self.wall_time() - self.config.detach_ttl
        expiry = self._expiry
        while expiry and expiry[0][0] < horizon:
            _, _, key, member = heapq.heappop(expiry)
            if self.local.get(key) is member:
                self.forget(*key)
        if len(expiry) > 2 * len(self.local) + 1000:  # forgotten ones pile up: compact
            self._expiry = [item for item in expiry if self.local.get(item[2]) is item[3]]
            heapq.heapify(self._expiry)

    async def close(self, timeout: float = 1.0) -> None:
        """The node stops: no more wakes; detach writes in flight get `timeout` seconds
        to reach the broker (so an app whose socket the drain closed is found by the node
        it reconnects to), then are cancelled."""
        if self._adoption is not None:
            self._adoption.cancel()
        for member in self.local.values():
            if member.pending is not None and member.pending.timer is not None:
                member.pending.timer.cancel()
            member.pending = None
        self.local.clear()
        if self._tasks:
            _, late = await asyncio.wait(list(self._tasks), timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=timeout)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.node.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

"""MQTT persistent sessions across nodes: a device comes back through any node.

With a broker that has a `SessionStore` (Redis), every MQTT session is owned by one node:
the one its device is connected to, or was connected to last. The store holds what another
node needs to carry on: user, expiry, subscriptions (written whenever they change) and,
while the device is away, its messages (in flight and queued).

A CONNECT on node B, once authenticated:

1. B *claims* the session in the store (refused when the client id belongs to another
   user). The claim names the previous owner A and the stored subscriptions.
2. Unless the device asked for a clean start, B subscribes to those filters at once, so
   publications from now on queue in B's copy of the session.
3. B asks A (`mqtt_takeover`) to let go, unless A stopped listing itself (dead): A closes
   the old connection (`SESSION_TAKEN_OVER`, will per the rules), writes the session's
   messages to the store and forgets the session without ending it.
4. B loads the stored messages: in flight ones are sent again with DUP under their packet
   ids, queued ones before what B queued itself meanwhile.

Between A's last write and B's subscribe a QoS 1/2 message may reach both copies, so the
device can get it twice (at least once, as QoS 1 allows); none is lost while A is alive.
When A died, what A had not written yet is lost: messages queued for an absent device are
appended to the store within `FLUSH_DELAY`; messages in flight to a connected device are
not written (that would be a Redis write per delivery), and neither is a will (nobody
knows the device is gone).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from realtime.auth import Principal
from realtime.core.broker import (
    BrokerUnavailable,
    SessionClaim,
    SessionStore,
    StoredMessage,
    StoredSession,
    StoredSubscription,
)
from realtime.core.mqtt_session import (
    NEVER_EXPIRES,
    Message,
    SessionState,
    SubscriptionValue,
    subscription_value,
)
from realtime.log import event
from realtime.mqtt.packets import SubscriptionOptions
from realtime.mqtt.topics import split_shared

if TYPE_CHECKING:
    from realtime.core.mqtt_session import MqttServer

log = logging.getLogger("realtime.mqtt")

FLUSH_DELAY = 0.05  # seconds: changes and queued messages are written in batches
TOUCH_INTERVAL = 60.0  # seconds between renewals of connected sessions' TTL
CONNECTED_GRACE = 3 * TOUCH_INTERVAL  # a connected session's record outlives its node this long
APPEND_BATCH = 500  # messages per session per append call


def options_byte(options: SubscriptionOptions) -> int:
    """The 5.0 SUBSCRIBE options byte (3.8.3.1)."""
    return (
        options.qos
        | options.no_local << 2
        | options.retain_as_published << 3
        | options.retain_handling << 4
    )


def options_from_byte(value: int) -> SubscriptionOptions:
    return SubscriptionOptions(
        qos=value & 3,
        no_local=bool(value & 4),
        retain_as_published=bool(value & 8),
        retain_handling=(value >> 4) & 3,
    )


def stored_message(
    message: Message, packet_id: int, loop_now: float, wall_now: float
) -> StoredMessage:
    expires_at = message.expires_at - loop_now + wall_now if message.expires_at else 0.0
    return StoredMessage(
        message.channel,
        message.data,
        message.qos,
        message.retain,
        message.props,
        expires_at,
        packet_id,
        message.released,
    )


def message_from_stored(stored: StoredMessage, loop_now: float, wall_now: float) -> Message | None:
    """The message to deliver, or None when it expired (5.0 message expiry)."""
    expires_at = 0.0
    if stored.expires_at:
        remaining = stored.expires_at - wall_now
        if remaining <= 0:
            return None
        expires_at = loop_now + remaining
    message = Message(
        stored.channel, stored.data, stored.qos, stored.retain, stored.properties, expires_at
    )
    message.released = stored.released
    return message


class SessionSync:
    """Keeps this node's MQTT sessions in the broker's session store."""

    def __init__(self, server: MqttServer, store: SessionStore) -> None:
        self.server = server
        self.store = store
        self.node = server.node
        self._dirty: dict[str, None] = {}  # sessions to write whole, in order
        self._queued: dict[str, list[Message]] = {}  # appended to absent devices' sessions
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._next_touch = 0.0
        self.node.cluster.on("mqtt_takeover", self._takeover_request)

    # ------------------------------------------------------------------ connect

    def ttl(self, state: SessionState) -> float:
        """Seconds the stored record may outlive its last write (0: forever)."""
        if state.expiry == NEVER_EXPIRES:
            return 0.0
        if state.connection is not None:
            return state.expiry + CONNECTED_GRACE
        if state.expires_at:
            return max(1.0, state.expires_at - self.node.loop.time())
        return float(state.expiry or 1)

    async def claim(self, client_id: str, principal: Principal) -> SessionClaim | None:
        return await self.store.claim(client_id, principal.user)

    async def take_from(self, owner: str, client_id: str) -> None:
        """Ask node `owner` to let go of the session (not when it stopped listing itself:
        it died, and what it wrote is all there is)."""
        cluster = self.node.cluster
        if owner == cluster.node_id or not await cluster.is_listed(owner):
            return
        body = {"client_id": client_id, "to": cluster.node_id}
        answer = await cluster.request(owner, "mqtt_takeover", body)
        if answer is None:
            event(log, "mqtt_takeover_unanswered", logging.WARNING, client_id=client_id, node=owner)

    async def subscribe(self, state: SessionState, subscriptions: list[StoredSubscription]) -> None:
        """Restore the stored subscriptions into the hub (before the old owner lets go)."""
        server, node = self.server, self.node
        for sub in subscriptions:
            topic_filter = sub.topic_filter
            if topic_filter in state.subscriptions:
                continue
            value = subscription_value(options_from_byte(sub.options), sub.identifier or None)
            state.subscriptions += (topic_filter,)
            shared = split_shared(topic_filter)
            if shared is not None:
                await server.join_group(shared[0], shared[1], state, value)
            else:
                node.hub.add_filter(topic_filter, state, value)
                await node.subscribe_filter(topic_filter)

    async def load(self, state: SessionState) -> bool:
        """The old owner let go: its messages come first, then what queued here since.
        False when no session was stored."""
        stored = await self.store.load(state.client_id)
        if stored is None:
            return False
        loop_now, wall_now = self.node.loop.time(), time.time()
        inflight: dict[int, Message] = {}
        queued: list[Message] = []
        for item in stored.messages:
            message = message_from_stored(item, loop_now, wall_now)
            if message is None:
                continue
            if item.packet_id and item.packet_id not in inflight:
                inflight[item.packet_id] = message
            else:
                queued.append(message)
        if inflight:
            state.inflight = inflight
        state.next_packet_id = stored.next_packet_id or 1
        for message in reversed(queued):
            state.requeue(message)
        await self.subscribe(state, stored.subscriptions)  # changed while we waited
        return True

    # ------------------------------------------------------------------ the old owner

    async def _takeover_request(self, body: dict[str, Any]) -> dict[str, Any]:
        client_id, to = str(body.get("client_id", "")), str(body.get("to", ""))
        had = await self.hand_over(client_id, to)
        return {"had_session": had}

    async def hand_over(self, client_id: str, to: str) -> bool:
        """Another node takes this session: close its connection, write its messages for
        the new owner, and forget it here (without ending it: no will on the way out
        unless the connection's rules say so)."""
        server = self.server
        state = server.sessions.get(client_id)
        if state is None:
            return False
        event(log, "mqtt_session_handed_over", logging.INFO, client_id=client_id, node=to)
        server.close_for_takeover(state)
        if state.delayed_will is not None:  # the device came back (elsewhere): no will
            state.delayed_will[1].cancel()
            state.delayed_will = None
        self._dirty.pop(client_id, None)
        self._queued.pop(client_id, None)
        snapshot = self.snapshot(state)
        await server.forget(state)
        await self.node.presence.flush()  # its leaves before the new owner's joins
        try:
            await self.store.save(client_id, snapshot, self.ttl(state), handing_to=to)
        except BrokerUnavailable:
            event(log, "mqtt_session_lost", logging.WARNING, client_id=client_id)
        return True

    # ------------------------------------------------------------------ writing

    def snapshot(self, state: SessionState) -> StoredSession:
        subscriptions: list[StoredSubscription] = []
        hub, groups = self.node.hub, self.server.groups
        for topic_filter in state.subscriptions:
            shared = split_shared(topic_filter)
            value: object
            if shared is not None:
                group = groups.get(shared)
                value = group.members.get(state) if group is not None else None
            else:
                value = hub.filters.get(topic_filter, state)
            if isinstance(value, SubscriptionValue):
                subscriptions.append(
                    StoredSubscription(
                        topic_filter, options_byte(value.options), value.identifier or 0
                    )
                )
        messages: list[StoredMessage] = []
        if state.connection is None:  # a connected device's messages stay here
            loop_now, wall_now = self.node.loop.time(), time.time()
            for packet_id, message in state.inflight.items():
                messages.append(stored_message(message, packet_id, loop_now, wall_now))
            for message in state.pending or ():
                messages.append(stored_message(message, 0, loop_now, wall_now))
        return StoredSession(
            state.principal.user, state.expiry, subscriptions, messages, state.next_packet_id
        )

    def changed(self, state: SessionState) -> None:
        """Write the session (subscriptions, expiry; messages while its device is away)."""
        self._dirty[state.client_id] = None
        self._queued.pop(state.client_id, None)  # the whole write includes them
        self._schedule()

    def queued(self, state: SessionState, message: Message) -> None:
        """A message queued for an absent device."""
        if state.client_id in self._dirty:
            return
        self._queued.setdefault(state.client_id, []).append(message)
        self._schedule()

    def ended(self, client_id: str) -> None:
        """The session ended here: deleted from the store (in order with its writes)."""
        self._dirty[client_id] = None
        self._queued.pop(client_id, None)
        self._schedule()

    def _schedule(self) -> None:
        if self._flush_handle is None and self._flushing is None:
            self._flush_handle = self.node.loop.call_later(FLUSH_DELAY, self._start_flush)

    def _start_flush(self) -> None:
        self._flush_handle = None
        self._flushing = self.node.loop.create_task(self._flush())

    async def _flush(self) -> None:
        """One writer at a time, in order: whole sessions, then appended messages."""
        try:
            while self._dirty or self._queued:
                dirty, self._dirty = self._dirty, {}
                queued, self._queued = self._queued, {}
                sessions = self.server.sessions
                for client_id in dirty:
                    state = sessions.get(client_id)
                    try:
                        if state is None:  # ended (the store keeps it only if we own it)
                            await self.store.delete(client_id)
                        else:
                            await self.store.save(client_id, self.snapshot(state), self.ttl(state))
                    except BrokerUnavailable:
                        self._dirty[client_id] = None  # written again with the next change
                        await asyncio.sleep(1.0)
                appends: dict[str, list[StoredMessage]] = {}
                loop_now, wall_now = self.node.loop.time(), time.time()
                for client_id, messages in queued.items():
                    state = sessions.get(client_id)
                    if state is None or state.connection is not None:
                        continue
                    appends[client_id] = [
                        stored_message(m, 0, loop_now, wall_now) for m in messages[-APPEND_BATCH:]
                    ]
                if appends:
                    try:
                        await self.store.append(appends, self.node.config.mqtt.max_queued_messages)
                    except BrokerUnavailable:
                        for client_id in appends:  # written whole once Redis is back
                            self._dirty[client_id] = None
                        await asyncio.sleep(1.0)
        except Exception:
            log.exception("mqtt_session_store_failed")
        finally:
            self._flushing = None
            if self._dirty or self._queued:
                self._schedule()

    def tick(self, now: float) -> None:
        """Once a second: renew connected sessions' records now and then."""
        if now < self._next_touch:
            return
        self._next_touch = now + TOUCH_INTERVAL
        ttls = {
            client_id: self.ttl(state)
            for client_id, state in self.server.sessions.items()
            if state.connection is not None
        }
        if ttls:
            self.node.loop.create_task(self._touch(ttls))

    async def _touch(self, ttls: dict[str, float]) -> None:
        try:
            await self.store.touch(ttls)
        except BrokerUnavailable:
            self._next_touch = 0.0  # again next second

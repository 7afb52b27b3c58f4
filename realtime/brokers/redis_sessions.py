"""MQTT persistent sessions in Redis (`SessionStore`), so a device can resume on any node.

Keys, with `p` the key prefix, on the instance the client id hashes to:

    p:ms:<client id>  hash  o (owner node id), u (user), x (expiry s), s (subscriptions),
                            m (messages, when the session was written whole), n (next
                            packet id); PEXPIRE: the session expiry (+ a grace while its
                            device is connected, renewed by the owner)
    p:mq:<client id>  list  messages queued for the absent device after that write

Subscriptions and messages are msgpack: a subscription ``[filter, options byte, id]``, a
message ``[channel, data, qos, retain, properties, expires_at, packet id, released]``
with properties ``[payload format, message expiry, content type, response topic,
correlation data, user properties, subscription ids]`` or nil. Every write checks the
owner inside its script, so a node that lost a session to another cannot overwrite it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack  # type: ignore[import-untyped]

from realtime.core.broker import (
    SessionClaim,
    SessionStore,
    StoredMessage,
    StoredSession,
    StoredSubscription,
)
from realtime.mqtt.packets import Properties

if TYPE_CHECKING:
    from realtime.brokers.redis import RedisBroker

CLAIM_GRACE_MS = 180_000  # a claimed record outlives a node that dies before writing it


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000)) if seconds > 0 else 0


def pack_properties(props: Properties | None) -> list[Any] | None:
    if props is None:
        return None
    return [
        props.payload_format_indicator,
        props.message_expiry_interval,
        props.content_type,
        props.response_topic,
        props.correlation_data,
        [list(pair) for pair in props.user_properties],
        list(props.subscription_identifiers),
    ]


def unpack_properties(raw: list[Any] | None) -> Properties | None:
    if raw is None:
        return None
    return Properties(
        payload_format_indicator=raw[0],
        message_expiry_interval=raw[1],
        content_type=raw[2],
        response_topic=raw[3],
        correlation_data=raw[4],
        user_properties=[(str(k), str(v)) for k, v in raw[5]],
        subscription_identifiers=[int(i) for i in raw[6]],
    )


def pack_message(m: StoredMessage) -> list[Any]:
    return [
        m.channel,
        m.data,
        m.qos,
        m.retain,
        pack_properties(m.properties),
        m.expires_at,
        m.packet_id,
        m.released,
    ]


def unpack_message(raw: list[Any]) -> StoredMessage:
    channel, data, qos, retain, props, expires_at, packet_id, released = raw
    return StoredMessage(
        channel, data, qos, bool(retain), unpack_properties(props), expires_at, packet_id, released
    )


def pack_subscriptions(subscriptions: list[StoredSubscription]) -> bytes:
    packed: bytes = msgpack.packb(
        [[s.topic_filter, s.options, s.identifier] for s in subscriptions]
    )
    return packed


def unpack_subscriptions(data: bytes) -> list[StoredSubscription]:
    if not data:
        return []
    return [StoredSubscription(f, o, i) for f, o, i in msgpack.unpackb(data)]


class RedisSessionStore(SessionStore):
    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker

    def _keys(self, client_id: str) -> list[str]:
        k = self.broker.key_prefix
        return [f"{k}ms:{client_id}", f"{k}mq:{client_id}"]

    async def claim(self, client_id: str, user: str) -> SessionClaim | None:
        broker = self.broker
        shard = broker.shard_of(client_id)
        args: list[Any] = [broker.node_id, user, CLAIM_GRACE_MS]
        raw = await broker.guard(
            shard, shard.session_claim(keys=self._keys(client_id)[:1], args=args)
        )
        if not raw[0]:
            return None
        owner = raw[1].decode()
        return SessionClaim(owner, bool(raw[3]), unpack_subscriptions(raw[2]))

    async def load(self, client_id: str) -> StoredSession | None:
        broker = self.broker
        shard = broker.shard_of(client_id)
        raw = await broker.guard(
            shard, shard.session_load(keys=self._keys(client_id), args=[broker.node_id])
        )
        if not raw:
            return None
        user, expiry, subscriptions, messages, next_id = raw[:5]
        stored = [unpack_message(m) for m in msgpack.unpackb(messages)] if messages else []
        stored.extend(unpack_message(msgpack.unpackb(item)) for item in raw[5:])
        return StoredSession(
            user.decode(), int(expiry), unpack_subscriptions(subscriptions), stored, int(next_id)
        )

    async def save(
        self, client_id: str, session: StoredSession, ttl: float, *, handing_to: str = ""
    ) -> None:
        broker = self.broker
        shard = broker.shard_of(client_id)
        args: list[Any] = [
            broker.node_id,
            handing_to,
            session.user,
            session.expiry,
            pack_subscriptions(session.subscriptions),
            msgpack.packb([pack_message(m) for m in session.messages]),
            session.next_packet_id,
            _ms(ttl),
        ]
        await broker.guard(shard, shard.session_save(keys=self._keys(client_id), args=args))

    async def append(self, queued: dict[str, list[StoredMessage]], limit: int) -> None:
        broker = self.broker
        by_shard = broker.group_by_shard(list(queued))
        for shard, client_ids in by_shard:
            pipe = shard.client.pipeline(transaction=False)
            for client_id in client_ids:
                args: list[Any] = [broker.node_id, max(1, limit)]
                args.extend(msgpack.packb(pack_message(m)) for m in queued[client_id])
                await shard.session_append(keys=self._keys(client_id), args=args, client=pipe)
            await broker.guard(shard, pipe.execute())

    async def touch(self, ttls: dict[str, float]) -> None:
        broker = self.broker
        for shard, client_ids in broker.group_by_shard(list(ttls)):
            pipe = shard.client.pipeline(transaction=False)
            for client_id in client_ids:
                args: list[Any] = [broker.node_id, _ms(ttls[client_id])]
                await shard.session_touch(keys=self._keys(client_id), args=args, client=pipe)
            await broker.guard(shard, pipe.execute())

    async def delete(self, client_id: str) -> None:
        broker = self.broker
        shard = broker.shard_of(client_id)
        await broker.guard(
            shard, shard.session_touch(keys=self._keys(client_id), args=[broker.node_id, -1])
        )

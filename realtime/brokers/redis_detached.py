"""Detached sessions of backgrounded apps in Redis (`DetachedStore`), for every node.

One hash per device, on the instance its user hashes to: ``p:dd:<user> <device>`` with
``_`` = msgpack ``[state, detached_at, node id]`` and ``c:<channel>`` = msgpack ``[offset, epoch]``
per channel; PEXPIRE `background.detach_ttl`. A poll on any node reads and advances it;
coming back to the foreground deletes it. The node standing in for it keeps an index of
its sessions on each instance, ``p:dn:<node id>`` (a set of msgpack ``[user, device]``),
and ``p:dnodes`` (on the first instance) lists the nodes with such an index: when a node
dies, the others take its sessions over from there (`adopt`). The device's wake budget is
a sorted set of the times of its wakes in the last window, ``p:wb:<user> <device>``,
expiring with the window.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import TYPE_CHECKING, Any

import msgpack  # type: ignore[import-untyped]

from realtime.core.broker import StreamPosition
from realtime.core.devices import DetachedSession, DetachedStore

if TYPE_CHECKING:
    from realtime.brokers.redis import RedisBroker

# KEYS: session hash; ARGV: field, value, ... -> advances only channels it keeps
ADVANCE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""

# KEYS: session hash, the new node's index; ARGV: head as read, new head, index member,
# index ttl ms -> 1 when the session still had that head and now names the new node
ADOPT = """
if redis.call('HGET', KEYS[1], '_') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], '_', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""

# KEYS: the device's wake times (sorted set); ARGV: now, budget, window s, member
# -> 1 when a wake was left and is now spent
SPEND_WAKE = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return 1
"""


def _session(user: str, device: str, fields: dict[bytes, bytes]) -> DetachedSession | None:
    head = fields.get(b"_")
    if head is None:
        return None
    state, detached_at, *rest = msgpack.unpackb(head)
    positions: dict[str, StreamPosition] = {}
    for name, value in fields.items():
        if name.startswith(b"c:"):
            offset, epoch = msgpack.unpackb(value)
            positions[name[2:].decode()] = StreamPosition(int(offset), str(epoch))
    node = str(rest[0]) if rest else ""
    return DetachedSession(user, device, str(state), float(detached_at), positions, node)


def _member(user: str, device: str) -> bytes:
    """A device in a node's index."""
    packed: bytes = msgpack.packb([user, device])
    return packed


def _position_fields(positions: dict[str, StreamPosition]) -> dict[str, bytes]:
    return {f"c:{c}": msgpack.packb([p.offset, p.epoch]) for c, p in positions.items()}


class RedisDetachedStore(DetachedStore):
    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self._advance: Any = None
        self._spend_wake: Any = None
        self._adopt: Any = None

    def _key(self, user: str, device: str) -> str:
        return f"{self.broker.key_prefix}dd:{user} {device}"

    async def detach(self, session: DetachedSession, ttl: float) -> None:
        broker = self.broker
        shard = broker.shard_of(session.user)
        key = self._key(session.user, session.device)
        head = [session.state, session.detached_at, session.node]
        mapping: dict[str, bytes] = {"_": msgpack.packb(head)}
        mapping.update(_position_fields(session.positions))
        pipe = shard.client.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
        pipe.pexpire(key, max(1, int(ttl * 1000)))
        first = broker.shards[0]
        if session.node:
            index = self._index(session.node)
            pipe.sadd(index, _member(session.user, session.device))
            pipe.pexpire(index, max(1, int(ttl * 1000)))
            if shard is first:
                pipe.sadd(self._nodes_key(), session.node)
        await broker.guard(shard, pipe.execute())
        if session.node and shard is not first:
            # Every time: another node may have found this one's index empty and dropped it.
            await broker.guard(first, first.client.sadd(self._nodes_key(), session.node))

    def _index(self, node: str) -> str:
        return f"{self.broker.key_prefix}dn:{node}"

    def _nodes_key(self) -> str:
        return f"{self.broker.key_prefix}dnodes"

    async def orphaned_nodes(self) -> list[str]:
        first = self.broker.shards[0]
        raw: Any = await self.broker.guard(first, first.client.smembers(self._nodes_key()))
        return sorted(n.decode() for n in raw)

    async def adopt(self, dead: str, node: str, count: int, ttl: float) -> list[DetachedSession]:
        broker = self.broker
        adopted: list[DetachedSession] = []
        left = False
        for shard in broker.shards:
            members: Any = await broker.guard(
                shard, shard.client.spop(self._index(dead), count - len(adopted))
            )
            for member in members or ():
                user, device = msgpack.unpackb(member)
                fields: Any = await broker.guard(
                    shard, shard.client.hgetall(self._key(user, device))
                )
                session = _session(user, device, fields)
                if session is None or session.node != dead:
                    continue  # back, expired, or standing on another node since
                if self._adopt is None:
                    self._adopt = shard.client.register_script(ADOPT)
                head = msgpack.packb([session.state, session.detached_at, node])
                keys = [self._key(user, device), self._index(node)]
                args = [fields[b"_"], head, member, max(1, int(ttl * 1000))]
                won = await broker.guard(
                    shard, self._adopt(keys=keys, args=args, client=shard.client)
                )
                if won:
                    adopted.append(dataclasses.replace(session, node=node))
            if len(adopted) >= count:
                left = True
                break
        if not left and not adopted:  # its index is empty everywhere: forget the node
            first = broker.shards[0]
            await broker.guard(first, first.client.srem(self._nodes_key(), dead))
        return adopted

    async def get(self, user: str, device: str) -> DetachedSession | None:
        broker = self.broker
        shard = broker.shard_of(user)
        fields: Any = await broker.guard(shard, shard.client.hgetall(self._key(user, device)))
        return _session(user, device, fields)

    async def advance(self, user: str, device: str, positions: dict[str, StreamPosition]) -> None:
        if not positions:
            return
        broker = self.broker
        shard = broker.shard_of(user)
        if self._advance is None:
            self._advance = shard.client.register_script(ADVANCE)
        args: list[Any] = []
        for name, value in _position_fields(positions).items():
            args += [name, value]
        await broker.guard(
            shard, self._advance(keys=[self._key(user, device)], args=args, client=shard.client)
        )

    async def attach(self, user: str, device: str) -> DetachedSession | None:
        broker = self.broker
        shard = broker.shard_of(user)
        key = self._key(user, device)
        pipe = shard.client.pipeline(transaction=True)
        pipe.hgetall(key)
        pipe.delete(key)
        fields, _ = await broker.guard(shard, pipe.execute())
        found = _session(user, device, fields)
        if found is not None and found.node:
            index = self._index(found.node)
            await broker.guard(shard, shard.client.srem(index, _member(user, device)))
        return found

    async def spend_wake(
        self, user: str, device: str, now: float, budget: int, window: float
    ) -> bool:
        broker = self.broker
        shard = broker.shard_of(user)
        if self._spend_wake is None:
            self._spend_wake = shard.client.register_script(SPEND_WAKE)
        key = f"{broker.key_prefix}wb:{user} {device}"
        member = f"{now!r}:{secrets.token_hex(4)}"
        spent = await broker.guard(
            shard,
            self._spend_wake(keys=[key], args=[now, budget, window, member], client=shard.client),
        )
        return bool(spent)

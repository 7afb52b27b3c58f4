"""Push tokens in Redis (`DeviceRegistry`), for every node.

Keys, with `p` the key prefix and `<member>` = ``<provider>:<token>``:

    p:dt:<member>  hash  the token's record, on the instance the member hashes to: u (user),
                         d (device), n (nonce: this registration), e (environment),
                         a (app id), pf (platform), r (registered, unix ms),
                         l (last used, unix ms)
    p:dz           zset  per instance: member -> last used (unix ms), for pruning
    p:d:<user>     hash  on the instance the user hashes to: device -> "<nonce>|<member>"

**Sharding.** The record is keyed and sharded by its token and names its owner; the
user's hash only points at the records of the user's devices. So "a token belongs to one
user at a time" is one key written by one script: `DEVICE_PUT` replaces the owner, so
moving a token on re-login is atomic even when the old user, the new user and the token
live on three different instances; and the provider's "this token is invalid"
(`remove_token`, with the APNs 410 rule on the registration time) is one script on one
instance. A pointer counts only while the record it points to carries the same nonce
(a random id per registration): reads (`device`, `devices`) check it, so a pointer left
behind (the old owner's after a move, or one a failed step did not clean) is never a
device, and clean-ups remove a pointer only when it is still exactly the one found stale
(a registration made meanwhile has a new nonce and stays). A registration is four steps,
each atomic on its instance: the record; the device's pointer; removing the device's
previous record (if still that registration); removing the old owner's pointer. A
failure between them leaves at worst a record nobody points to (pruned once unused for
`push.token_max_idle_days`) or a dangling pointer (ignored, removed when met), never a
token with two owners; the same token registered by two users at the same instant may
end with neither (the app registers again on its next launch). The registry spreads
over the instances like channels (adding one moves ~1/N of the records: apps register
again on launch). Reads cost two round trips (the pointer, then the record; `devices`
pipelines the records per instance).
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from redis.commands.core import AsyncScript

from realtime.brokers import redis_scripts as lua
from realtime.core.broker import BrokerUnavailable
from realtime.core.devices import DeviceRecord, DeviceRegistry

if TYPE_CHECKING:
    from realtime.brokers.redis import RedisBroker, _Shard

PRUNE_BATCH = 1000  # records looked at per prune script call


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


Raw = bytes | str  # as Redis gave it (compared as stored when cleaning up)


def _str(raw: Raw) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


def member_of(provider: str, token: str) -> str:
    return f"{provider}:{token}"


def split_member(member: str) -> tuple[str, str] | None:
    """ "apns:abc" -> ("apns", "abc"); None when malformed."""
    provider, sep, token = member.partition(":")
    return (provider, token) if sep and provider and token else None


def pointer_of(nonce: str, member: str) -> str:
    return f"{nonce}|{member}"


def split_pointer(pointer: str) -> tuple[str, str] | None:
    """ "<nonce>|<member>" -> (nonce, member); None when malformed."""
    nonce, sep, member = pointer.partition("|")
    return (nonce, member) if sep and nonce and split_member(member) else None


def record_args(record: DeviceRecord, nonce: str) -> list[Any]:
    """`DEVICE_PUT`'s ARGV after the member: the record's fields (times in ms)."""
    return [
        record.user,
        record.device,
        nonce,
        record.environment,
        record.app_id,
        record.platform,
        _ms(record.registered_at),
        _ms(record.last_used),
    ]


def _text(fields: dict[bytes, bytes], name: bytes) -> str:
    return fields.get(name, b"").decode()


def record_from_fields(
    provider: str, token: str, fields: dict[bytes, bytes]
) -> tuple[DeviceRecord, str] | None:
    """A record and its nonce from its hash (HGETALL); None when missing or malformed."""
    if b"u" not in fields or b"d" not in fields or b"n" not in fields:
        return None
    try:
        record = DeviceRecord(
            user=_text(fields, b"u"),
            device=_text(fields, b"d"),
            provider=provider,
            token=token,
            environment=_text(fields, b"e") or "production",
            app_id=_text(fields, b"a"),
            platform=_text(fields, b"pf"),
            registered_at=int(fields.get(b"r", b"0")) / 1000,
            last_used=int(fields.get(b"l", b"0")) / 1000,
        )
        return record, _text(fields, b"n")
    except (UnicodeDecodeError, ValueError, OverflowError):
        return None


class _Scripts:
    def __init__(self, shard: _Shard) -> None:
        reg = shard.client.register_script
        self.put: AsyncScript = reg(lua.DEVICE_PUT)
        self.point: AsyncScript = reg(lua.DEVICE_POINT)
        self.unpoint: AsyncScript = reg(lua.DEVICE_UNPOINT)
        self.drop: AsyncScript = reg(lua.DEVICE_DROP)
        self.touch: AsyncScript = reg(lua.DEVICE_TOUCH)
        self.prune: AsyncScript = reg(lua.DEVICE_PRUNE)


class RedisDeviceRegistry(DeviceRegistry):
    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self._scripts: dict[int, _Scripts] = {}
        self._wall = time.time

    # ------------------------------------------------------------------ plumbing

    def _at(self, key: str) -> tuple[_Shard, _Scripts]:
        shard = self.broker.shard_of(key)
        return shard, self._scripts_of(shard)

    def _scripts_of(self, shard: _Shard) -> _Scripts:
        scripts = self._scripts.get(id(shard))
        if scripts is None:
            scripts = self._scripts[id(shard)] = _Scripts(shard)
        return scripts

    def _user_key(self, user: str) -> str:
        return f"{self.broker.key_prefix}d:{user}"

    def _token_keys(self, member: str) -> list[str]:
        k = self.broker.key_prefix
        return [f"{k}dt:{member}", f"{k}dz"]

    async def _pointer(self, user: str, device: str) -> tuple[str, str] | None:
        """The device's (nonce, member), if it has a well-formed pointer."""
        shard, _ = self._at(user)
        raw = await self.broker.guard(shard, shard.client.hget(self._user_key(user), device))
        return split_pointer(_str(raw)) if raw is not None else None

    async def _drop(self, member: str, nonce: str = "", before: float = 0.0) -> list[str]:
        """Remove the token's record (only registration `nonce`'s when given; only when
        registered before `before` when given) -> [user, device, nonce] of what was
        removed, or []."""
        shard, scripts = self._at(member)
        args: list[Any] = [member, nonce, _ms(before) if before else 0]
        raw = await self.broker.guard(shard, scripts.drop(keys=self._token_keys(member), args=args))
        return [_str(item) for item in raw]

    async def _unpoint(self, pointers: Iterable[tuple[str, Raw, Raw]]) -> None:
        """Clean-up: remove (user, device, pointer) pointers where the device still has
        exactly that pointer. Best effort: a pointer left behind is ignored anyway."""
        by_user: dict[str, list[tuple[Raw, Raw]]] = {}
        for user, device, pointer in pointers:
            by_user.setdefault(user, []).append((device, pointer))
        for shard, users in self.broker.group_by_shard(list(by_user)):
            scripts = self._scripts_of(shard)
            pipe = shard.client.pipeline(transaction=False)
            for user in users:
                for device, pointer in by_user[user]:
                    keys = [self._user_key(user)]
                    await scripts.unpoint(keys=keys, args=[device, pointer], client=pipe)
            with contextlib.suppress(BrokerUnavailable):
                await self.broker.guard(shard, pipe.execute())

    # ------------------------------------------------------------------ DeviceRegistry

    async def register(self, record: DeviceRecord) -> bool:
        registered_at = record.registered_at or self._wall()
        record = dataclasses.replace(
            record, registered_at=registered_at, last_used=max(record.last_used, registered_at)
        )
        member = member_of(record.provider, record.token)
        nonce = secrets.token_hex(6)
        shard, scripts = self._at(member)
        args = [member, *record_args(record, nonce)]
        raw = await self.broker.guard(shard, scripts.put(keys=self._token_keys(member), args=args))
        previous = [_str(item) for item in raw]
        # The device points at its new record; its previous one goes (if still its).
        shard, scripts = self._at(record.user)
        keys = [self._user_key(record.user)]
        pointer = pointer_of(nonce, member)
        old = await self.broker.guard(
            shard, scripts.point(keys=keys, args=[record.device, pointer])
        )
        old_pointer = split_pointer(_str(old)) if old is not None else None
        if old_pointer is not None and old_pointer[1] != member:
            with contextlib.suppress(BrokerUnavailable):
                await self._drop(old_pointer[1], old_pointer[0])
        if not previous:
            return False
        user, device, previous_nonce = previous
        if (user, device) != (record.user, record.device):
            # Moved: the old owner's pointer goes too.
            await self._unpoint([(user, device, pointer_of(previous_nonce, member))])
            return True
        return False

    async def unregister(self, user: str, device: str) -> bool:
        shard, scripts = self._at(user)
        old = await self.broker.guard(
            shard, scripts.point(keys=[self._user_key(user)], args=[device, ""])
        )
        old_pointer = split_pointer(_str(old)) if old is not None else None
        if old_pointer is None:
            return False
        return bool(await self._drop(old_pointer[1], old_pointer[0]))

    async def device(self, user: str, device: str) -> DeviceRecord | None:
        pointer = await self._pointer(user, device)
        if pointer is None:
            return None
        found = await self._records(user, [(device, pointer_of(*pointer))])
        return found[0] if found else None

    async def devices(self, user: str) -> list[DeviceRecord]:
        shard, _ = self._at(user)
        raw = await self.broker.guard(shard, shard.client.hgetall(self._user_key(user)))
        return await self._records(user, list(raw.items())) if raw else []

    async def _records(self, user: str, pointers: list[tuple[Raw, Raw]]) -> list[DeviceRecord]:
        """The records the user's pointers (device, pointer) lead to, when they are
        still that registration; the other pointers are removed (compared as stored)."""
        split = [(device, pointer, split_pointer(_str(pointer))) for device, pointer in pointers]
        members = list({found[1] for _, _, found in split if found is not None})
        records: dict[str, tuple[DeviceRecord, str] | None] = {}
        for shard, group in self.broker.group_by_shard(members):
            pipe = shard.client.pipeline(transaction=False)
            for member in group:
                pipe.hgetall(self._token_keys(member)[0])
            results = await self.broker.guard(shard, pipe.execute())
            for member, fields in zip(group, results, strict=True):
                provider, token = split_member(member) or ("", "")
                records[member] = record_from_fields(provider, token, fields)
        out: list[DeviceRecord] = []
        stale: list[tuple[str, Raw, Raw]] = []
        for device, pointer, found in split:
            got = records.get(found[1]) if found is not None else None
            if (
                found is not None
                and got is not None
                and got[1] == found[0]
                and (got[0].user, got[0].device) == (user, _str(device))
            ):
                out.append(got[0])
            else:
                stale.append((user, device, pointer))
        if stale:
            await self._unpoint(stale)
        return out

    async def remove_token(self, provider: str, token: str, registered_before: float = 0.0) -> bool:
        member = member_of(provider, token)
        removed = await self._drop(member, before=registered_before)
        if not removed:
            return False
        user, device, nonce = removed
        await self._unpoint([(user, device, pointer_of(nonce, member))])
        return True

    async def touch(self, user: str, device: str, now: float) -> None:
        pointer = await self._pointer(user, device)
        if pointer is None:
            return
        nonce, member = pointer
        shard, scripts = self._at(member)
        args: list[Any] = [member, nonce, _ms(now)]
        await self.broker.guard(shard, scripts.touch(keys=self._token_keys(member), args=args))

    async def prune(self, unused_since: float) -> int:
        """Every reachable instance's records unused since then; an unreachable one is
        skipped (pruning runs again the next day)."""
        k = self.broker.key_prefix
        removed: list[tuple[str, str, str]] = []
        for shard in self.broker.shards:
            scripts = self._scripts_of(shard)
            args: list[Any] = [f"{k}dt:", _ms(unused_since), PRUNE_BATCH]
            try:
                while True:
                    raw = await self.broker.guard(shard, scripts.prune(keys=[f"{k}dz"], args=args))
                    items = [_str(item) for item in raw[1:]]
                    for i in range(0, len(items), 4):
                        member, user, device, nonce = items[i : i + 4]
                        removed.append((user, device, pointer_of(nonce, member)))
                    if int(raw[0]) < PRUNE_BATCH:
                        break
            except BrokerUnavailable:
                continue
        if removed:
            await self._unpoint(removed)
        return len(removed)

"""The memory broker's device registry: push tokens of this node's users, in two dicts.

Records by user and device, and an index by provider token that says which (user, device)
holds each token now, so a token has one owner at a time and moving it on re-login is one
step. Nothing survives a restart (apps register their token again on every launch).
"""

from __future__ import annotations

import dataclasses
import time

from realtime.core.devices import DeviceRecord, DeviceRegistry


class MemoryDeviceRegistry(DeviceRegistry):
    def __init__(self) -> None:
        self._devices: dict[str, dict[str, DeviceRecord]] = {}  # user -> device -> record
        # (provider, token) -> the (user, device) holding it now
        self._owners: dict[tuple[str, str], tuple[str, str]] = {}
        self._wall = time.time

    def _drop(self, user: str, device: str) -> DeviceRecord | None:
        """Remove the device's record and its token's index entry (if it points here)."""
        records = self._devices.get(user)
        if records is None:
            return None
        record = records.pop(device, None)
        if not records:
            del self._devices[user]
        if record is not None:
            key = (record.provider, record.token)
            if self._owners.get(key) == (user, device):
                del self._owners[key]
        return record

    async def register(self, record: DeviceRecord) -> bool:
        registered_at = record.registered_at or self._wall()
        record = dataclasses.replace(
            record,
            registered_at=registered_at,
            last_used=max(record.last_used, registered_at),
        )
        owner = (record.user, record.device)
        key = (record.provider, record.token)
        previous = self._owners.get(key)
        moved = previous is not None and previous != owner
        if moved:
            assert previous is not None
            self._drop(*previous)
        self._drop(*owner)  # the device's previous token
        self._devices.setdefault(record.user, {})[record.device] = record
        self._owners[key] = owner
        return moved

    async def unregister(self, user: str, device: str) -> bool:
        return self._drop(user, device) is not None

    async def device(self, user: str, device: str) -> DeviceRecord | None:
        return self._devices.get(user, {}).get(device)

    async def devices(self, user: str) -> list[DeviceRecord]:
        return list(self._devices.get(user, {}).values())

    async def remove_token(self, provider: str, token: str, registered_before: float = 0.0) -> bool:
        owner = self._owners.get((provider, token))
        if owner is None:
            return False
        record = self._devices[owner[0]][owner[1]]
        if registered_before and record.registered_at >= registered_before:
            return False  # registered again after the provider saw it invalid
        self._drop(*owner)
        return True

    async def touch(self, user: str, device: str, now: float) -> None:
        records = self._devices.get(user)
        record = records.get(device) if records is not None else None
        if records is not None and record is not None and record.last_used < now:
            records[device] = dataclasses.replace(record, last_used=now)

    async def prune(self, unused_since: float) -> int:
        stale = [
            (user, device)
            for user, records in self._devices.items()
            for device, record in records.items()
            if record.last_used < unused_since
        ]
        for user, device in stale:
            self._drop(user, device)
        return len(stale)

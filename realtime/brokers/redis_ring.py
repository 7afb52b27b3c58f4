"""Consistent hashing over Redis shards: which instance holds a channel (or a user).

Each shard is placed on the ring at `VNODES` points derived from its identity (host, port
and database, not its position in the list, nor its password), and a key belongs to the
first point at or after the key's hash. Every node computes the same answer from the same
list. Adding a shard moves about 1/N of the keys to it; what moved starts afresh there
(a new stream epoch, so subscribers are told `recovered=false` once, and presence
re-filled by the next refresh within `presence.ttl / 3`).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

VNODES = 160


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing(Generic[T]):
    def __init__(self, shards: Sequence[tuple[str, T]], vnodes: int = VNODES) -> None:
        if not shards:
            raise ValueError("a ring needs at least one shard")
        names = [name for name, _ in shards]
        if len(set(names)) != len(names):
            raise ValueError(f"the same shard appears twice: {names}")
        self.shards = [shard for _, shard in shards]
        points = sorted(
            (key_hash(f"{name}#{i}"), index)
            for index, (name, _) in enumerate(shards)
            for i in range(vnodes)
        )
        self._hashes = [h for h, _ in points]
        self._owners = [self.shards[index] for _, index in points]
        self._only = self.shards[0] if len(self.shards) == 1 else None

    def get(self, key: str) -> T:
        if self._only is not None:
            return self._only
        i = bisect.bisect_left(self._hashes, key_hash(key))
        return self._owners[i % len(self._owners)]

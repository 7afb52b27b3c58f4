from __future__ import annotations

from realtime.brokers.memory import MemoryBroker
from realtime.core.broker import (
    HistoryPolicy,
    PresenceEntry,
    PresenceStats,
    Publication,
    StreamPosition,
)

POLICY = HistoryPolicy(size=3, ttl=60, meta_ttl=3600)


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def handle_publication(self, channel: str, pub: Publication) -> None:
        self.seen.append((channel, pub.offset))


async def test_offsets_history_and_delivery_only_when_subscribed() -> None:
    broker = MemoryBroker()
    recorder = Recorder()
    await broker.start(recorder)
    await broker.publish("a", b"0", history=POLICY)
    await broker.subscribe("a")
    results = [await broker.publish("a", str(i).encode(), history=POLICY) for i in range(1, 5)]
    assert [r.position.offset for r in results] == [2, 3, 4, 5]
    assert recorder.seen == [("a", 2), ("a", 3), ("a", 4), ("a", 5)]
    epoch = results[0].position.epoch
    history = await broker.history("a", POLICY)
    assert [p.offset for p in history.publications] == [3, 4, 5]  # bounded to 3
    since = await broker.history("a", POLICY, since=StreamPosition(3, epoch))
    assert [p.offset for p in since.publications] == [4, 5]
    other_epoch = await broker.history("a", POLICY, since=StreamPosition(3, "zz"))
    assert other_epoch.publications == [] and other_epoch.position.offset == 5
    newest = await broker.history("a", POLICY, reverse=True, limit=2)
    assert [p.offset for p in newest.publications] == [5, 4]
    await broker.unsubscribe("a")
    await broker.publish("a", b"x", history=POLICY)
    assert len(recorder.seen) == 4


async def test_history_ttl_and_idle_streams_keep_their_position() -> None:
    broker = MemoryBroker()
    clock = [100.0]
    broker._now = lambda: clock[0]
    await broker.start(Recorder())
    policy = HistoryPolicy(size=10, ttl=5, meta_ttl=50)
    first = await broker.publish("a", b"1", history=policy)
    clock[0] += 10
    history = await broker.history("a", policy)
    assert history.publications == [] and history.position == first.position
    await broker.housekeeping(0)
    assert broker.stream_count() == 1  # meta kept
    clock[0] += 100
    await broker.housekeeping(0)
    assert broker.stream_count() == 0


async def test_idempotency_keys() -> None:
    broker = MemoryBroker()
    recorder = Recorder()
    await broker.start(recorder)
    await broker.subscribe("a")
    first = await broker.publish("a", b"1", history=POLICY, idempotency_key="k")
    again = await broker.publish("a", b"1", history=POLICY, idempotency_key="k")
    other = await broker.publish("a", b"1", history=POLICY, idempotency_key="k2")
    assert again.duplicate and again.position == first.position
    assert other.position.offset == 2 and len(recorder.seen) == 2
    no_history = await broker.publish("b", b"1")
    assert no_history.position == StreamPosition(0, "")


async def test_presence_entries_expire_unless_refreshed() -> None:
    broker = MemoryBroker()
    clock = [0.0]
    broker._now = lambda: clock[0]
    await broker.add_presence("room", PresenceEntry("c1", "alice"), ttl=10)
    await broker.add_presence("room", PresenceEntry("c2", "alice", device="phone"), ttl=10)
    await broker.add_presence("room", PresenceEntry("c3", "bob"), ttl=10)
    assert await broker.presence_stats("room") == PresenceStats(clients=3, users=2)
    await broker.remove_presence("room", "c3")
    assert set(await broker.presence("room")) == {"c1", "c2"}
    clock[0] = 8
    await broker.add_presence("room", PresenceEntry("c1", "alice"), ttl=10)  # refresh
    clock[0] = 12  # c2 was not refreshed: gone, as after a node died without cleaning up
    assert set(await broker.presence("room")) == {"c1"}
    await broker.housekeeping(0)
    clock[0] = 30
    await broker.housekeeping(0)
    assert await broker.presence_stats("room") == PresenceStats(0, 0)
    assert broker._presence == {}

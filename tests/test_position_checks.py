"""Position checks: a node notices publications lost on their way to it even when no
later publication reveals the loss (core/positions.py), and its subscribers recover.

Unit tests of `PositionTracker`; the Redis broker's batched `positions`; and gateways (in
this process) on a real redis-server, where a publication is "lost" by running the
broker's own publish script with a pub/sub channel nobody listens to: the stream and its
meta move on exactly as for a real publication, but no node receives it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from realtime.app import Gateway
from realtime.brokers import redis as redis_broker
from realtime.brokers.memory import MemoryBroker
from realtime.brokers.redis import RedisBroker
from realtime.brokers.redis_envelope import PUBLICATION_HEAD, publication_tail
from realtime.client import Client, Subscription
from realtime.config import BrokerConfig, ConfigError, config_from_dict
from realtime.core.broker import ChannelEvent, HistoryPolicy, StreamPosition
from realtime.core.positions import PositionTracker
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codes import UnsubscribeCode

from .conftest import GatewayFactory, RawClient, make_token, publish, ws_url
from .redis_server import RedisServer
from .test_redis_broker import cluster_config, eventually
from .test_server_api import http_get

E1, E2 = "e1", "e2"


# ----------------------------------------------------------------------------- the tracker


def test_arrivals_in_order_are_no_gap() -> None:
    tracker = PositionTracker(0)
    assert not tracker.arrived("a", 7, E1)  # the first one sets where the channel stands
    assert not tracker.arrived("a", 8, E1)
    assert not tracker.arrived("a", 9, E1)
    assert tracker.position("a") == StreamPosition(9, E1)
    assert tracker.arrival_gaps == 0


def test_an_arrival_past_lost_ones_or_in_another_epoch_is_a_gap() -> None:
    tracker = PositionTracker(0)
    tracker.arrived("a", 1, E1)
    assert tracker.arrived("a", 3, E1)  # 2 was lost
    assert tracker.position("a") == StreamPosition(3, E1)
    assert not tracker.arrived("a", 4, E1)
    # The stream started over: offset 1 of a new epoch (a client would take it for a
    # duplicate of the old offset 1).
    assert tracker.arrived("a", 1, E2)
    assert tracker.position("a") == StreamPosition(1, E2)
    assert tracker.arrived("a", 5, E1)  # back to another epoch again: a gap too
    assert tracker.arrival_gaps == 3


def test_an_arrival_at_or_below_the_seeded_top_is_no_gap() -> None:
    """A subscribe read top 5 while publication 5 was on its way to the node."""
    tracker = PositionTracker(0)
    tracker.seed("a", StreamPosition(5, E1))
    assert not tracker.arrived("a", 5, E1)
    assert not tracker.arrived("a", 4, E1)
    assert tracker.position("a") == StreamPosition(5, E1)
    assert not tracker.arrived("a", 6, E1)


def test_seed_only_where_nothing_arrived_and_forget() -> None:
    tracker = PositionTracker(0)
    tracker.arrived("a", 8, E1)  # arrived while the subscribe read the top
    tracker.seed("a", StreamPosition(7, E1))
    assert tracker.position("a") == StreamPosition(8, E1)
    tracker.seed("b", StreamPosition(0, E2))
    assert tracker.position("b") == StreamPosition(0, E2)
    tracker.compare({"b": StreamPosition(1, E2)})
    assert tracker.suspects
    tracker.forget("b")
    assert tracker.position("b") is None and not tracker.suspects
    tracker.forget("never-seen")
    assert len(tracker) == 1


def test_publications_in_flight_at_a_check_are_not_a_gap() -> None:
    tracker = PositionTracker(0)
    tracker.seed("a", StreamPosition(5, E1))
    assert tracker.compare({"a": StreamPosition(7, E1)}) == ["a"]  # behind: a suspect
    assert tracker.checked == 1
    tracker.arrived("a", 6, E1)
    tracker.arrived("a", 7, E1)  # they were in flight
    assert tracker.confirm({"a"}) == []
    assert not tracker.suspects and tracker.check_gaps == 0


def test_a_channel_still_behind_the_top_seen_last_time_is_a_gap() -> None:
    tracker = PositionTracker(0)
    tracker.seed("a", StreamPosition(5, E1))
    tracker.seed("b", StreamPosition(5, E1))
    tracker.seed("c", StreamPosition(3, E1))
    tracker.compare({"a": StreamPosition(7, E1), "b": StreamPosition(5, E1)})
    tracker.compare({"c": StreamPosition(0, E2)})  # the stream started over
    tracker.arrived("a", 6, E1)  # 7 never comes
    assert sorted(tracker.confirm({"a", "b", "c"})) == ["a", "c"]
    assert tracker.check_gaps == 2 and tracker.checked == 3
    # Confirmed once: the suspects are gone (the node ends those subscriptions).
    assert tracker.confirm({"a", "b", "c"}) == []


def test_a_suspect_that_caught_up_is_cleared_even_if_more_is_in_flight() -> None:
    tracker = PositionTracker(0)
    tracker.seed("a", StreamPosition(5, E1))
    tracker.compare({"a": StreamPosition(7, E1)})
    for offset in (6, 7, 8):
        tracker.arrived("a", offset, E1)
    # At the next check the top is 10 (9 and 10 in flight): reached 7, so no gap; the
    # channel is compared again when its turn comes.
    assert tracker.confirm({"a"}) == []


def test_suspects_that_lost_their_subscribers_are_not_gaps() -> None:
    tracker = PositionTracker(0)
    tracker.seed("a", StreamPosition(5, E1))
    tracker.compare({"a": StreamPosition(9, E1)})
    assert tracker.confirm(set()) == []


def test_compare_ignores_channels_forgotten_while_the_broker_answered() -> None:
    tracker = PositionTracker(0)
    tracker.seed("a", StreamPosition(1, E1))
    assert tracker.compare({"a": StreamPosition(2, E1), "gone": StreamPosition(9, E1)}) == ["a"]
    assert tracker.checked == 1 and "gone" not in tracker.suspects


def test_pick_rotates_in_bounded_batches_and_forgets_channels_without_subscribers() -> None:
    tracker = PositionTracker(0, per_round=2)
    for name in "abcde":
        tracker.seed(name, StreamPosition(1, E1))
    live = set("abcde") - {"d"}
    assert tracker.pick(live) == ["a", "b"]
    tracker.seed("f", StreamPosition(1, E1))  # joins the next pass
    assert tracker.pick(live) == ["c", "e"]  # d has no subscriber left: forgotten
    assert tracker.position("d") is None
    live.add("f")
    assert tracker.pick(live) == ["a", "b"]  # the next pass
    assert tracker.pick(live) == ["c", "e"]
    assert tracker.pick(live) == ["f"]
    tracker.forget("a")
    assert tracker.pick(live) == ["b", "c"]


def test_due_every_interval_and_never_when_off() -> None:
    tracker = PositionTracker(10.0)
    assert tracker.due(100.0)
    assert not tracker.due(105.0)
    assert tracker.due(110.0)
    off = PositionTracker(0)
    assert not off.due(0.0) and not off.due(1e9)


def test_config_key() -> None:
    assert BrokerConfig().position_check_interval == 40.0
    config = config_from_dict({"broker": {"type": "redis", "position_check_interval": 0}})
    assert config.broker.position_check_interval == 0
    with pytest.raises(ConfigError, match=r"broker\.position_check_interval: must be >= 0"):
        config_from_dict({"broker": {"type": "redis", "position_check_interval": -1}})


# ----------------------------------------------------------------------------- brokers


async def test_the_default_positions_is_position_per_channel() -> None:
    broker = MemoryBroker()
    policy = HistoryPolicy(size=10, ttl=60, meta_ttl=3600)
    await broker.publish("a", b"1", history=policy)
    await broker.publish("a", b"2", history=policy)
    tops = await broker.positions({"a": policy, "b": policy})
    a, b = await broker.position("a", policy), await broker.position("b", policy)
    assert tops == {"a": a, "b": b}
    assert tops["a"].offset == 2 and tops["b"].offset == 0
    assert not broker.delivery_may_gap


async def test_redis_positions_batch_per_instance(
    make_redis_server: Callable[[], RedisServer],
) -> None:
    one, two = make_redis_server(), make_redis_server()
    broker = RedisBroker(
        BrokerConfig(
            type="redis",
            redis_urls=[one.url, two.url],
            key_prefix="pos",
            connect_timeout=1.0,
            reconnect_max_delay=0.5,
        )
    )
    await broker.start(Recorder())
    try:
        policy = HistoryPolicy(size=10, ttl=60, meta_ttl=3600)
        channels = [f"room/{i}" for i in range(1200)]  # > POSITIONS_PER_CALL per instance
        per_shard: dict[str, int] = {}
        for channel in channels:
            name = broker._shard(channel).name
            per_shard[name] = per_shard.get(name, 0) + 1
        assert min(per_shard.values()) > redis_broker.POSITIONS_PER_CALL
        published = {}
        for i in range(0, 1200, 100):
            for _ in range(i % 7 + 1):
                result = await broker.publish(channels[i], b"x", history=policy)
            published[channels[i]] = result.position
        tops = await broker.positions(dict.fromkeys(channels, policy))
        assert len(tops) == 1200
        for channel, top in published.items():
            assert tops[channel] == top
        # A stream that did not exist is made (as `position` does), its epoch kept.
        fresh = tops[channels[1]]
        assert fresh.offset == 0 and fresh.epoch
        assert await broker.position(channels[1], policy) == fresh
        assert (await broker.publish(channels[1], b"x", history=policy)).position == (
            StreamPosition(1, fresh.epoch)
        )
        # An instance down: its channels are left out, the others answered.
        two.kill()
        await eventually(lambda: sum(s.pubsub.up for s in broker.shards) == 1)
        partial = await broker.positions(dict.fromkeys(channels, policy))
        up = next(s.name for s in broker.shards if s.pubsub.up)
        assert set(partial) == {c for c in channels if broker._shard(c).name == up}
    finally:
        await broker.close()


def test_the_envelope_carries_the_epoch() -> None:
    import msgpack  # type: ignore[import-untyped]

    from realtime.brokers.redis_envelope import decode

    # As the publish script makes it: cmsgpack.pack(offset, epoch) between head and tail.
    message = PUBLICATION_HEAD + msgpack.packb(7) + msgpack.packb("ab12")
    message += publication_tail(b"x", "u", "c", None, None)
    pub = decode(message)
    assert not isinstance(pub, ChannelEvent)
    assert (pub.offset, pub.epoch, pub.data, pub.user) == (7, "ab12", b"x", "u")


class Recorder:
    def handle_publication(self, channel: str, pub: Any) -> None:
        pass

    def handle_event(self, channel: str, event: Any) -> None:
        pass

    def handle_stream_gap(self, channels: list[str]) -> None:
        pass


# ----------------------------------------------------------------------------- gateways

CHANNEL = "chat/room"


async def two_gateways(
    make_gateway: GatewayFactory, url: str, interval: float
) -> tuple[Gateway, Gateway]:
    config = cluster_config(url, f"pc{secrets.token_hex(4)}")
    config["broker"]["position_check_interval"] = interval
    return await make_gateway(**config), await make_gateway(**config)


async def publish_unseen(gateway: Gateway, channel: str, data: Any) -> StreamPosition:
    """What the broker's publish does, except that the PUBLISH goes to a pub/sub channel
    nobody listens to: the publication is in the stream, and no node ever receives it."""
    broker = gateway.node.broker
    assert isinstance(broker, RedisBroker)
    policy = gateway.node.namespace(channel).history
    assert policy is not None
    k = broker.config.key_prefix
    keys = [f"{k}:m:{channel}", f"{k}:s:{channel}"]
    args: list[Any] = [
        f"{k}:lost",
        PUBLICATION_HEAD,
        publication_tail(json.dumps(data).encode(), "", "", None, None),
        policy.size,
        int(policy.ttl * 1000),
        int(policy.meta_ttl),
        secrets.token_hex(4),
        1000,
    ]
    offset, epoch, _ = await broker._shard(channel).publish(keys=keys, args=args)
    return StreamPosition(int(offset), epoch.decode())


async def drop_stream(gateway: Gateway, url: str, channel: str) -> None:
    """The stream's data is gone from Redis (a failover to a replica that had not got it,
    a FLUSHALL) while the pub/sub connections stay up."""
    k = gateway.node.broker.config.key_prefix  # type: ignore[attr-defined]
    client = aioredis.Redis.from_url(url)
    await client.delete(f"{k}:m:{channel}", f"{k}:s:{channel}")
    await client.aclose()


async def unsubscribe_push(client: RawClient, timeout: float = 15.0) -> pb.Push:
    """The next `unsubscribe` push, skipping publications and join/leave."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        push = await client.push(timeout=max(remaining, 0.01))
        if push.HasField("unsubscribe"):
            return push


async def received(sub: Subscription, count: int) -> list[tuple[int, Any]]:
    return [
        (pub.offset, json.loads(pub.data))
        for pub in [await sub.get(timeout=15) for _ in range(count)]
    ]


async def metric(gateway: Gateway, name: str) -> float:
    status, text = await http_get(gateway, "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


async def test_the_lost_last_publications_of_a_burst_are_found_by_the_position_check(
    make_gateway: GatewayFactory, redis_server: RedisServer, clients: list[RawClient]
) -> None:
    one, two = await two_gateways(make_gateway, redis_server.url, 0.5)
    failed: list[Subscription] = []
    watcher = await RawClient.open(two)
    clients.append(watcher)
    async with Client(ws_url(two), token=make_token("py")) as client:
        sub = await client.subscribe(CHANNEL)
        sub.on_recovery_failed = failed.append
        await watcher.subscribe(CHANNEL)
        for i in (1, 2, 3):
            await publish(one, CHANNEL, i)
        assert await received(sub, 3) == [(1, 1), (2, 2), (3, 3)]
        # The last two of the burst never reach any node; nothing comes after them.
        assert (await publish_unseen(one, CHANNEL, 4)).offset == 4
        assert (await publish_unseen(one, CHANNEL, 5)).offset == 5
        push = await unsubscribe_push(watcher)
        assert push.channel == CHANNEL
        assert push.unsubscribe.code == UnsubscribeCode.RESUBSCRIBE == 2500
        # The Python client resubscribed from offset 3 by itself and recovered 4 and 5.
        assert await received(sub, 2) == [(4, 4), (5, 5)]
        assert sub.recovered and not failed
        await publish(one, CHANNEL, 6)
        assert await received(sub, 1) == [(6, 6)]
        assert sub.qsize() == 0
        tracker = two.node.positions
        assert tracker.check_gaps == 1 and tracker.arrival_gaps == 0 and tracker.checked >= 1
        assert await metric(two, "realtime_position_gaps_on_check") == 1
        assert await metric(two, "realtime_position_checks") >= 1
        assert two.node.metrics.channel_events["stream_gap"] == 1
        # The node that published everything had nothing to find.
        assert one.node.positions.check_gaps == 0


async def test_a_stream_that_started_over_quietly_is_found_by_the_position_check(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    one, two = await two_gateways(make_gateway, redis_server.url, 0.5)
    failed: list[Subscription] = []
    async with Client(ws_url(two), token=make_token("py")) as client:
        sub = await client.subscribe(CHANNEL)
        sub.on_recovery_failed = failed.append
        for i in (1, 2, 3):
            await publish(one, CHANNEL, i)
        assert await received(sub, 3) == [(1, 1), (2, 2), (3, 3)]
        old = sub.position
        assert old is not None
        await drop_stream(one, redis_server.url, CHANNEL)
        new = await publish_unseen(one, CHANNEL, "lost")  # a new epoch, offset 1
        assert new.epoch != old.epoch and new.offset == 1
        await eventually(lambda: bool(failed), timeout=15)
        assert failed == [sub] and not sub.recovered
        assert sub.position is not None
        assert (sub.position.offset, sub.position.epoch) == (new.offset, new.epoch)
        # The new epoch's next publication is delivered (offset 2 < the old 3: it must
        # not be taken for a duplicate).
        await publish(one, CHANNEL, "after")
        assert await received(sub, 1) == [(2, "after")]
        assert two.node.positions.check_gaps == 1


async def test_a_publication_past_lost_ones_ends_the_subscription_on_arrival(
    make_gateway: GatewayFactory, redis_server: RedisServer, clients: list[RawClient]
) -> None:
    """Periodic checks off: the arrival check alone. A publication whose offset skips
    lost ones, and one of a new epoch, each end the subscription at once."""
    one, two = await two_gateways(make_gateway, redis_server.url, 0)
    failed: list[Subscription] = []
    watcher = await RawClient.open(two)
    clients.append(watcher)
    async with Client(ws_url(two), token=make_token("py")) as client:
        sub = await client.subscribe(CHANNEL)
        sub.on_recovery_failed = failed.append
        await watcher.subscribe(CHANNEL)
        await publish(one, CHANNEL, 1)
        await publish_unseen(one, CHANNEL, 2)
        await publish(one, CHANNEL, 3)
        push = await unsubscribe_push(watcher, timeout=5)
        assert push.unsubscribe.code == 2500
        assert await received(sub, 3) == [(1, 1), (2, 2), (3, 3)]  # nothing lost, no dup
        assert sub.recovered and not failed
        # The stream starts over: offset 1 of a new epoch arrives, below the client's 3.
        await drop_stream(one, redis_server.url, CHANNEL)
        await publish(one, CHANNEL, "new")
        await eventually(lambda: bool(failed), timeout=10)
        assert not sub.recovered and sub.position is not None and sub.position.offset == 1
        await publish(one, CHANNEL, "next")
        assert await received(sub, 1) == [(2, "next")]
        tracker = two.node.positions
        assert tracker.arrival_gaps == 2 and tracker.checked == 0


async def test_no_gap_is_found_while_publications_flow(
    make_gateway: GatewayFactory, redis_server: RedisServer, clients: list[RawClient]
) -> None:
    """Publications in flight during checks are no gap: 300 publications over ~3 s,
    checked every housekeeping second, and no subscriber is told to resubscribe."""
    one, two = await two_gateways(make_gateway, redis_server.url, 0.5)
    watcher = await RawClient.open(two)
    clients.append(watcher)
    await watcher.subscribe(CHANNEL)
    await watcher.subscribe("chat/other")  # checked too, never published to
    tracker = two.node.positions
    for i in range(1, 301):
        await publish(one, CHANNEL, i)
        if i % 10 == 0:
            await asyncio.sleep(0.1)
    offsets = []
    while len(offsets) < 300:
        push = await watcher.push(timeout=10)
        assert not push.HasField("unsubscribe"), push
        if push.HasField("pub"):
            offsets.append(push.pub.offset)
    assert offsets == list(range(1, 301))
    await eventually(lambda: tracker.checked >= 6, timeout=10)
    assert tracker.check_gaps == 0 and tracker.arrival_gaps == 0
    assert two.node.metrics.channel_events["stream_gap"] == 0


async def test_a_node_on_the_memory_broker_tracks_nothing(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway()
    node = gateway.node
    assert node.handle_publication == node.hub.handle_publication
    client = await RawClient.open(gateway)
    try:
        await client.subscribe(CHANNEL)
        await publish(gateway, CHANNEL, 1)
        assert (await client.publication()).pub.offset == 1
        node.tick(node.loop.time())
        assert len(node.positions) == 0 and node._position_check is None
    finally:
        await client.close()

"""The Redis broker against real redis-server processes.

Several `RedisBroker`s in one test process stand for several nodes: each has its own
pub/sub connections and handler, and they meet only in Redis. Tests keep apart by key
prefix on the session's shared server; the ones that kill Redis or shard over two
instances start their own.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from paho.mqtt import properties as paho_properties
from paho.mqtt.packettypes import PacketTypes

from realtime.app import make_broker
from realtime.brokers.redis import RedisBroker
from realtime.brokers.redis_pubsub import filter_pattern
from realtime.client import Client, Subscription
from realtime.config import BrokerConfig, ConfigError, config_from_dict, load_config
from realtime.core.broker import (
    JOIN,
    LEAVE,
    TYPING,
    BrokerUnavailable,
    ChannelEvent,
    HistoryPolicy,
    PresenceEntry,
    PresenceStats,
    Publication,
    StreamPosition,
)
from realtime.core.mqtt_session import MqttMeta
from realtime.mqtt.packets import Properties
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codes import ErrorCode, UnsubscribeCode

from .conftest import GatewayFactory, RawClient, api_post, make_token, publish, ws_url
from .redis_server import RedisServer, free_port
from .test_mqtt import Device

POLICY = HistoryPolicy(size=3, ttl=60, meta_ttl=3600)
BIG = HistoryPolicy(size=1000, ttl=60, meta_ttl=3600)


class Recorder:
    """A node's handler: what reached it, in order."""

    def __init__(self) -> None:
        self.pubs: list[tuple[str, Publication]] = []
        self.events: list[tuple[str, ChannelEvent]] = []
        self.gaps: list[list[str]] = []

    def handle_publication(self, channel: str, pub: Publication) -> None:
        self.pubs.append((channel, pub))

    def handle_event(self, channel: str, event: ChannelEvent) -> None:
        self.events.append((channel, event))

    def handle_stream_gap(self, channels: list[str]) -> None:
        self.gaps.append(sorted(channels))

    def seen(self, channel: str | None = None) -> list[tuple[str, int, bytes]]:
        return [(c, p.offset, p.data) for c, p in self.pubs if channel in (None, c)]

    def data(self, channel: str | None = None) -> list[bytes]:
        return [p.data for c, p in self.pubs if channel in (None, c)]


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


Node = tuple[RedisBroker, Recorder]
NodeFactory = Callable[..., Any]


@pytest.fixture
async def make_node(redis_server: RedisServer) -> AsyncIterator[NodeFactory]:
    """Start a broker ("a node") with its own recorder; all of a test share a key prefix
    unless told otherwise, and use the session's Redis unless given URLs."""
    prefix = f"t{secrets.token_hex(4)}"
    started: list[RedisBroker] = []

    async def factory(urls: list[str] | None = None, **overrides: Any) -> Node:
        settings: dict[str, Any] = {
            "type": "redis",
            "redis_urls": urls or [redis_server.url],
            "key_prefix": prefix,
            "unsubscribe_delay": 0.05,
            "connect_timeout": 1.0,
            "reconnect_max_delay": 0.5,
        }
        settings.update(overrides)
        broker = RedisBroker(BrokerConfig(**settings))
        recorder = Recorder()
        await broker.start(recorder)
        started.append(broker)
        return broker, recorder

    yield factory
    for broker in started:
        await broker.close()


def channel_names(broker: RedisBroker) -> list[bytes]:
    """The Redis channels a broker subscribes to for channels (not its control channel)."""
    return [n for s in broker.shards for n in s.pubsub.channels if not n.endswith(b"$control")]


# ----------------------------------------------------------------------------- contract


async def test_offsets_history_and_delivery_only_when_subscribed(make_node: NodeFactory) -> None:
    broker, recorder = await make_node()
    await broker.publish("a", b"0", history=POLICY)
    await broker.subscribe("a")
    results = [await broker.publish("a", str(i).encode(), history=POLICY) for i in range(1, 5)]
    assert [r.position.offset for r in results] == [2, 3, 4, 5]
    await eventually(lambda: len(recorder.pubs) == 4)
    assert recorder.seen() == [("a", 2, b"1"), ("a", 3, b"2"), ("a", 4, b"3"), ("a", 5, b"4")]
    epoch = results[0].position.epoch
    assert epoch and all(r.position.epoch == epoch for r in results)
    history = await broker.history("a", POLICY)
    assert [p.offset for p in history.publications] == [3, 4, 5]  # bounded to 3
    assert history.position == StreamPosition(5, epoch)
    since = await broker.history("a", POLICY, since=StreamPosition(3, epoch))
    assert [p.offset for p in since.publications] == [4, 5]
    other_epoch = await broker.history("a", POLICY, since=StreamPosition(3, "zz"))
    assert other_epoch.publications == [] and other_epoch.position.offset == 5
    newest = await broker.history("a", POLICY, reverse=True, limit=2)
    assert [p.offset for p in newest.publications] == [5, 4]
    oldest = await broker.history("a", POLICY, limit=2)
    assert [p.offset for p in oldest.publications] == [3, 4]
    position_only = await broker.history("a", POLICY, limit=-1)
    assert position_only.publications == [] and position_only.position.offset == 5
    assert await broker.position("a", POLICY) == StreamPosition(5, epoch)
    await broker.unsubscribe("a")
    await eventually(lambda: not channel_names(broker))  # after the delay
    await broker.publish("a", b"x", history=POLICY)
    await broker.subscribe("b")
    await broker.publish("b", b"marker")
    await eventually(lambda: len(recorder.pubs) == 5)
    assert recorder.seen()[-1] == ("b", 0, b"marker")  # nothing more from "a"


async def test_history_since_with_limits_and_a_new_stream(make_node: NodeFactory) -> None:
    broker, _ = await make_node()
    # A new stream has an epoch at once, and keeps it.
    start = await broker.position("s", BIG)
    assert start.offset == 0 and start.epoch
    for i in range(10):
        await broker.publish("s", b"%d" % i, history=BIG)
    since = StreamPosition(4, start.epoch)
    forward = await broker.history("s", BIG, since=since, limit=3)
    assert [p.offset for p in forward.publications] == [5, 6, 7]
    backward = await broker.history("s", BIG, since=since, limit=3, reverse=True)
    assert [p.offset for p in backward.publications] == [10, 9, 8]
    everything = await broker.history("s", BIG, since=StreamPosition(0, start.epoch))
    assert [p.data for p in everything.publications] == [b"%d" % i for i in range(10)]
    at_top = await broker.history("s", BIG, since=StreamPosition(10, start.epoch))
    assert at_top.publications == []
    ahead = await broker.history("s", BIG, since=StreamPosition(99, start.epoch))
    assert ahead.publications == [] and ahead.position == StreamPosition(10, start.epoch)


async def test_history_ttl_and_idle_stream_meta_expiry(
    make_node: NodeFactory, redis_server: RedisServer
) -> None:
    broker, _ = await make_node()
    policy = HistoryPolicy(size=10, ttl=0.2, meta_ttl=1)
    first = await broker.publish("a", b"1", history=policy)
    # Past the history TTL the publication is gone, the position stays.
    deadline = time.monotonic() + 10
    while (await broker.history("a", policy)).publications:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    kept = await broker.history("a", policy)
    assert kept.position == first.position
    # Idle (neither written nor read) past meta_ttl: a new epoch, so old positions are
    # "from another epoch" instead of silently meaning something else.
    observer = sync_redis.Redis(port=redis_server.port)
    while observer.exists(f"{broker.config.key_prefix}:m:a"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    observer.close()
    fresh = await broker.position("a", policy)
    assert fresh.offset == 0 and fresh.epoch != first.position.epoch


async def test_idempotency_keys_hold_across_nodes(make_node: NodeFactory) -> None:
    a, recorder = await make_node()
    b, _ = await make_node()
    await a.subscribe("a")
    first = await a.publish("a", b"1", history=POLICY, idempotency_key="k")
    again = await b.publish("a", b"1", history=POLICY, idempotency_key="k")
    other = await b.publish("a", b"1", history=POLICY, idempotency_key="k2")
    assert again.duplicate and again.position == first.position
    assert not other.duplicate and other.position.offset == 2
    no_history = await a.publish("b", b"1", idempotency_key="k")
    repeat = await b.publish("b", b"1", idempotency_key="k")
    assert no_history.position == StreamPosition(0, "") and not no_history.duplicate
    assert repeat.duplicate
    await eventually(lambda: len(recorder.pubs) == 2)
    assert [p.offset for _, p in recorder.pubs] == [1, 2]
    # Past the idempotency window the same key publishes again.
    window = {"history": POLICY, "idempotency_key": "k", "idempotency_ttl": 0.1}
    short = await a.publish("c", b"1", **window)  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while (again := await b.publish("c", b"1", **window)).duplicate:  # type: ignore[arg-type]
        assert again.position == short.position
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert again.position.offset == 2


async def test_retained_messages(make_node: NodeFactory) -> None:
    a, _ = await make_node()
    b, _ = await make_node()
    props = Properties(content_type="text/plain", user_properties=[("k", "v")])
    for channel in ("home/kitchen/temp", "home/hall/temp", "home", "office/temp"):
        meta = MqttMeta(1, True, props if channel == "home" else None)
        await a.set_retained(channel, Publication(0, channel.encode(), "u", "c", None, meta))
    exact = await b.retained("home/kitchen/temp")
    assert [(c, p.data) for c, p in exact] == [("home/kitchen/temp", b"home/kitchen/temp")]
    meta = exact[0][1].meta
    assert isinstance(meta, MqttMeta) and meta.qos == 1 and meta.retain
    assert sorted(c for c, _ in await b.retained("home/+/temp")) == [
        "home/hall/temp",
        "home/kitchen/temp",
    ]
    everything_home = dict(await b.retained("home/#"))
    assert sorted(everything_home) == ["home", "home/hall/temp", "home/kitchen/temp"]
    home_meta = everything_home["home"].meta
    assert isinstance(home_meta, MqttMeta) and home_meta.properties is not None
    assert home_meta.properties.content_type == "text/plain"
    assert home_meta.properties.user_properties == [("k", "v")]
    assert sorted(c for c, _ in await b.retained("#")) == sorted(
        ["home/kitchen/temp", "home/hall/temp", "home", "office/temp"]
    )
    assert sorted(c for c, _ in await b.retained("+/temp")) == ["office/temp"]
    await b.set_retained("home/hall/temp", Publication(0, b""))  # empty payload clears
    await b.set_retained("office/temp", None)
    assert sorted(c for c, _ in await a.retained("#")) == ["home", "home/kitchen/temp"]
    assert await a.retained("nothing/here") == []
    # MQTT message expiry applies to a retained message too.
    expiring = MqttMeta(0, True, Properties(message_expiry_interval=1))
    await a.set_retained("home/door", Publication(0, b"open", meta=expiring))
    assert [c for c, _ in await b.retained("home/door")] == ["home/door"]
    deadline = time.monotonic() + 10
    while [c for c, _ in await b.retained("home/+")]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


# ----------------------------------------------------------------------------- across nodes


async def test_two_nodes_see_each_others_publications_in_one_order(
    make_node: NodeFactory,
) -> None:
    a, seen_a = await make_node()
    b, seen_b = await make_node()
    await a.subscribe("room")
    await b.subscribe("room")
    sends = [
        (a if i % 2 else b).publish("room", b"%d" % i, history=BIG, user=f"u{i % 2}")
        for i in range(200)
    ]
    results = await asyncio.gather(*sends)
    assert sorted(r.position.offset for r in results) == list(range(1, 201))
    await eventually(lambda: len(seen_a.pubs) == 200 and len(seen_b.pubs) == 200)
    assert [p.offset for _, p in seen_a.pubs] == list(range(1, 201))
    assert seen_a.seen() == seen_b.seen()
    by_offset = {r.position.offset: i for i, r in enumerate(results)}
    assert all(p.data == b"%d" % by_offset[p.offset] for _, p in seen_a.pubs)
    history = await b.history("room", BIG)
    assert [p.offset for p in history.publications] == list(range(1, 201))


async def test_events_reach_every_subscribed_node(make_node: NodeFactory) -> None:
    a, seen_a = await make_node()
    b, seen_b = await make_node()
    c, seen_c = await make_node()
    await a.subscribe("room")
    await b.subscribe("room")
    await c.subscribe("elsewhere")
    alice = PresenceEntry("c1", "alice", "phone", {"name": "Alice"}, "websocket")
    await a.publish_event("room", ChannelEvent(JOIN, alice))
    await b.publish_event("room", ChannelEvent(TYPING, PresenceEntry("c2", "bob"), True))
    await a.publish("room", b"after", history=POLICY)
    await b.publish("elsewhere", b"marker")
    for recorder in (seen_a, seen_b):
        await eventually(lambda r=recorder: len(r.pubs) == 1)  # type: ignore[misc]
        assert [(ch, e.kind, e.entry, e.active) for ch, e in recorder.events] == [
            ("room", JOIN, alice, False),
            ("room", TYPING, PresenceEntry("c2", "bob"), True),
        ]
    await eventually(lambda: len(seen_c.pubs) == 1)
    assert seen_c.events == []


async def test_wildcard_subscriptions_deliver_each_publication_once(
    make_node: NodeFactory,
) -> None:
    a, seen = await make_node()
    b, _ = await make_node()
    for subscription in ("dev/+/temp", "dev/#", "dev/1/temp", "+"):
        await a.subscribe(subscription)
    published = ["dev/1/temp", "dev/2/temp", "dev", "dev/x", "other/1/temp", "solo", "dev*x"]
    for channel in published:
        await b.publish(channel, channel.encode())
    await b.publish("dev/end", b"end")
    await eventually(lambda: b"end" in seen.data())
    # Exactly once each, whatever number of subscriptions matched; "other/1/temp" none.
    assert seen.data() == [
        b"dev/1/temp", b"dev/2/temp", b"dev", b"dev/x", b"solo", b"dev*x", b"end"
    ]  # fmt: skip
    # Without the exact subscription, the patterns still deliver it once.
    await a.unsubscribe("dev/1/temp")
    await a.unsubscribe("+")
    await eventually(lambda: not channel_names(a))
    seen.pubs.clear()
    for channel in ("dev/1/temp", "solo", "dev/end"):
        await b.publish(channel, channel.encode())
    await eventually(lambda: b"dev/end" in seen.data())
    assert seen.data() == [b"dev/1/temp", b"dev/end"]
    # MQTT details travel with the publication.
    props = Properties(
        payload_format_indicator=1,
        message_expiry_interval=30,
        content_type="application/json",
        response_topic="dev/1/reply",
        correlation_data=b"\x00\x01",
        user_properties=[("a", "1"), ("a", "2")],
    )
    await b.publish("dev/1/temp", b"{}", meta=MqttMeta(2, True, props), client="dev-1")
    await eventually(lambda: b"{}" in seen.data())
    meta = seen.pubs[-1][1].meta
    assert isinstance(meta, MqttMeta) and (meta.qos, meta.retain) == (2, True)
    assert meta.properties == props
    assert seen.pubs[-1][1].client == "dev-1"
    await a.unsubscribe("dev/+/temp")
    await a.unsubscribe("dev/#")
    await eventually(lambda: not a.shards[0].pubsub.patterns)
    await a.subscribe("marker")
    await b.publish("dev/1/temp", b"late")
    await b.publish("marker", b"marker")
    await eventually(lambda: b"marker" in seen.data())
    assert b"late" not in seen.data()


async def test_subscribing_again_while_the_unsubscribe_is_on_its_way(
    make_node: NodeFactory,
) -> None:
    a, seen = await make_node(unsubscribe_delay=0)
    b, _ = await make_node()
    await a.subscribe("x")
    await a.subscribe("x/+")
    for i in range(30):
        await a.unsubscribe("x")
        await a.unsubscribe("x/+")
        for _ in range(i % 4):  # let the UNSUBSCRIBE go out, or not yet
            await asyncio.sleep(0)
        await a.subscribe("x")
        await a.subscribe("x/+")
        await b.publish("x", b"%d" % i)
        await b.publish("x/y", b"y%d" % i)
        # (What is still on its way when the node unsubscribes is not for it any more.)
        await eventually(lambda i=i: len(seen.pubs) == 2 * i + 2)  # type: ignore[misc]
    expected = [data for i in range(30) for data in (b"%d" % i, b"y%d" % i)]
    assert seen.data() == expected


def test_filter_patterns() -> None:
    assert filter_pattern("rt:c:", "a/+/c") == "rt:c:a/*/c"
    assert filter_pattern("rt:c:", "a/#") == "rt:c:a*"
    assert filter_pattern("rt:c:", "#") == "rt:c:*"
    assert filter_pattern("p[1]:c:", "x*?/+") == "p\\[1\\]:c:x\\*\\?/*"


async def test_presence_expiry_is_announced_once(make_node: NodeFactory) -> None:
    a, seen_a = await make_node()
    b, seen_b = await make_node()
    await a.subscribe("room")
    await b.subscribe("room")
    assert await a.add_presence("room", PresenceEntry("c1", "alice"), ttl=60)
    assert not await b.add_presence("room", PresenceEntry("c1", "alice"), ttl=60)  # refresh
    await a.add_presence("room", PresenceEntry("c2", "alice", device="phone"), ttl=60)
    await b.add_presence("room", PresenceEntry("c3", "bob", info={"n": 1}), ttl=60)
    assert await b.presence_stats("room") == PresenceStats(clients=3, users=2)
    assert (await a.presence("room"))["c3"] == PresenceEntry("c3", "bob", info={"n": 1})
    assert await a.remove_presence("room", "c3")
    assert not await a.remove_presence("room", "c3")
    assert set(await b.presence("room")) == {"c1", "c2"}
    # c2's node stops refreshing it (it died): gone from presence after its TTL...
    await b.refresh_presence([("room", PresenceEntry("c2", "alice", device="phone"))], ttl=0.2)
    deadline = time.monotonic() + 10
    while "c2" in await b.presence("room"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    # ...and both nodes' housekeeping, at the same time, announce it exactly once.
    for _ in range(3):
        await asyncio.gather(a.housekeeping(0), b.housekeeping(0))
    await a.publish("room", b"marker")  # published after every announcement
    for recorder in (seen_a, seen_b):
        await eventually(lambda r=recorder: len(r.pubs) == 1)  # type: ignore[misc]
        assert [(e.kind, e.entry.client) for _, e in recorder.events] == [(LEAVE, "c2")]
    assert set(await a.presence("room")) == {"c1"}
    await a.refresh_presence([("room", PresenceEntry("c1", "alice"))], ttl=60)
    assert await a.presence_stats("room") == PresenceStats(1, 1)


async def test_user_status_across_nodes(make_node: NodeFactory) -> None:
    a, _ = await make_node()
    b, _ = await make_node()
    before = time.time()
    await a.set_users_online(["alice"], ttl=60, last_seen_ttl=3600)
    await b.set_users_online(["alice"], ttl=60, last_seen_ttl=3600)
    (status,) = await b.user_status(["alice"])
    assert status.online
    await a.set_user_offline("alice", last_seen_ttl=3600)  # still on node b
    assert (await a.user_status(["alice"]))[0].online
    await b.set_user_offline("alice", last_seen_ttl=3600)
    alice, nobody = await a.user_status(["alice", "nobody"])
    assert not alice.online and alice.last_seen >= before - 1
    assert nobody.user == "nobody" and not nobody.online and nobody.last_seen == 0
    # A node that dies stops refreshing: offline after the TTL, last seen at the refresh.
    await b.set_users_online(["bob", "carol"], ttl=0.2, last_seen_ttl=3600)
    deadline = time.monotonic() + 10
    while any(s.online for s in await a.user_status(["bob", "carol"])):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    bob, carol = await a.user_status(["bob", "carol"])
    assert bob.last_seen >= before - 1 and carol.last_seen >= before - 1
    # Back online on another node: the dead node's mark is folded away.
    await a.set_users_online(["bob"], ttl=60, last_seen_ttl=3600)
    assert [s.online for s in await b.user_status(["carol", "bob", "carol"])] == [
        False,
        True,
        False,
    ]


async def test_events_and_publications_keep_one_order(make_node: NodeFactory) -> None:
    a, seen = await make_node()
    b, _ = await make_node()
    await a.subscribe("chat")
    entry = PresenceEntry("c9", "zoe")
    await b.publish("chat", b"1", history=POLICY)
    await b.publish_event("chat", ChannelEvent(TYPING, entry, True))
    await b.publish("chat", b"2", history=POLICY)
    await eventually(lambda: len(seen.pubs) == 2)
    assert len(seen.events) == 1  # between them: it was handled before "2"


# ----------------------------------------------------------------------------- sharding


async def test_channels_spread_over_two_instances(
    make_node: NodeFactory, make_redis_server: Callable[[], RedisServer]
) -> None:
    one, two = make_redis_server(), make_redis_server()
    a, seen = await make_node([one.url, two.url])
    b, _ = await make_node([two.url, one.url])  # order does not matter
    channels = [f"room/{i}" for i in range(40)]
    assert all(a._shard(c).name == b._shard(c).name for c in channels)
    for channel in channels:
        await a.subscribe(channel)
    await a.subscribe("dev/+")
    for i, channel in enumerate(channels):
        await b.publish(channel, b"%d" % i, history=POLICY)
        await b.publish(f"dev/{i}", b"dev%d" % i)
    await eventually(lambda: len(seen.pubs) == 80)
    expected = [b"%d" % i for i in range(40)] + [b"dev%d" % i for i in range(40)]
    assert sorted(seen.data()) == sorted(expected)
    counts = []
    for server in (one, two):
        client = sync_redis.Redis(port=server.port)
        counts.append(len(client.keys(f"{a.config.key_prefix}:m:*")))
        client.close()
    assert sum(counts) == 40 and min(counts) > 0  # both hold some streams
    for i, channel in enumerate(channels):
        history = await a.history(channel, POLICY)
        assert [p.data for p in history.publications] == [b"%d" % i]


# ----------------------------------------------------------------------------- faults


async def test_redis_restart_refuses_then_reconnects_and_resubscribes(
    make_node: NodeFactory, make_redis_server: Callable[[], RedisServer]
) -> None:
    server = make_redis_server()
    a, seen = await make_node([server.url])
    b, _ = await make_node([server.url])
    await a.subscribe("room")
    await a.subscribe("dev/+")
    before = await b.publish("room", b"before", history=POLICY)
    await eventually(lambda: len(seen.pubs) == 1)
    server.kill()
    with pytest.raises(BrokerUnavailable) as refused:
        await b.publish("room", b"lost?", history=POLICY)
    assert refused.value.retry_after > 0
    await eventually(lambda: not a.shards[0].pubsub.up and not b.shards[0].pubsub.up)
    for call in (
        b.publish("room", b"during", history=POLICY),
        b.history("room", POLICY),
        b.publish_event("room", ChannelEvent(TYPING, PresenceEntry("c", "u"), True)),
        b.add_presence("room", PresenceEntry("c", "u"), 10),
        b.user_status(["u"]),
        b.retained("x"),
    ):
        with pytest.raises(BrokerUnavailable):
            await call
    await a.subscribe("late")  # accepted: made when Redis is back
    await a.housekeeping(0)  # does not raise while Redis is down
    server.start()
    await eventually(lambda: a.shards[0].pubsub.up and b.shards[0].pubsub.up, timeout=20)
    await eventually(
        lambda: (
            all(a.shards[0].pubsub.is_active(n) for n in a.shards[0].pubsub.wanted())
            and all(a.shards[0].pubsub.is_active(n, True) for n in a.shards[0].pubsub.wanted(True))
        )
    )
    after = await b.publish("room", b"after", history=POLICY)
    await b.publish("dev/1", b"dev")
    await b.publish("late", b"late")
    await eventually(lambda: len(seen.pubs) == 4)
    assert seen.data() == [b"before", b"after", b"dev", b"late"]
    # Redis lost its data: a new epoch, so old positions are not "recovered" by mistake.
    assert after.position.epoch != before.position.epoch and after.position.offset == 1
    assert a.shards[0].pubsub.reconnects == 1
    # What was published meanwhile never reached `a`: its channels (not the pattern) are
    # reported once as a stream gap; `late` was first subscribed while Redis was down.
    assert sorted(c for gap in seen.gaps for c in gap) == ["late", "room"]


async def test_unreachable_redis_at_start(make_node: NodeFactory) -> None:
    broker, _ = await make_node([f"redis://127.0.0.1:{free_port()}/0"], connect_timeout=0.5)
    assert not broker.shards[0].pubsub.up
    with pytest.raises(BrokerUnavailable) as refused:
        await broker.publish("a", b"x")
    assert refused.value.retry_after > 0
    await broker.subscribe("a")  # kept for when Redis comes


async def test_a_node_that_falls_behind_drops_and_counts(
    make_node: NodeFactory, redis_server: RedisServer
) -> None:
    a, seen = await make_node(pubsub_queue_size=5)
    await a.subscribe("flood")
    name = f"{a.config.key_prefix}:c:flood"
    publisher = sync_redis.Redis(port=redis_server.port)
    pipe = publisher.pipeline(transaction=False)
    from realtime.brokers.redis_envelope import publication_message

    for i in range(50):
        pipe.publish(name, publication_message(i + 1, "e", b"%d" % i, "", "", None, None))
    pipe.execute()
    # The node is busy (its loop blocked) while all 50 arrive; then reads them in one go.
    time.sleep(0.3)
    publisher.close()
    await eventually(lambda: a.shards[0].pubsub.messages == 50)
    await eventually(lambda: len(seen.pubs) == 5)
    assert a.shards[0].pubsub.dropped == 45
    assert [p.offset for _, p in seen.pubs] == [1, 2, 3, 4, 5]
    assert seen.gaps == [["flood"]]  # reported once per drain, not once per message
    await a.publish("flood", b"next")
    await eventually(lambda: len(seen.pubs) == 6)
    assert seen.gaps == [["flood"]]


# ----------------------------------------------------------------------------- gateways


def cluster_config(url: str, prefix: str) -> dict[str, Any]:
    return {
        "broker": {
            "type": "redis",
            "redis_urls": [url],
            "key_prefix": prefix,
            "unsubscribe_delay": 0.05,
            "connect_timeout": 1.0,
            "reconnect_max_delay": 0.5,
        },
        "namespaces": {"chat": {"history_size": 50, "presence": True, "join_leave": True}},
    }


async def test_websocket_clients_on_two_gateways_share_channels(
    make_gateway: GatewayFactory, redis_server: RedisServer, clients: list[RawClient]
) -> None:
    config = cluster_config(redis_server.url, f"g{secrets.token_hex(4)}")
    one = await make_gateway(**config)
    two = await make_gateway(**config)
    alice = await RawClient.open(one, token=make_token("alice"))
    bob = await RawClient.open(two, token=make_token("bob"))
    clients.extend([alice, bob])
    subscribed = await alice.subscribe("chat/room")
    assert subscribed.recoverable and subscribed.position.offset == 0
    await bob.subscribe("chat/room")
    joined = await alice.push()  # bob joined, on the other gateway
    assert joined.HasField("join") and joined.join.user == "bob"
    reply = await bob.request(publish=pb.PublishRequest(channel="chat/room", data=b'"hi"'))
    assert not reply.HasField("error"), reply.error
    assert reply.publish.position.offset == 1
    pushed = await alice.publication()
    assert (pushed.pub.offset, pushed.pub.data, pushed.pub.info.user) == (1, b'"hi"', "bob")
    assert (await bob.publication()).pub.offset == 1  # the publisher's own node too
    # Presence and user status from either node.
    reply = await alice.request(presence=pb.PresenceRequest(channel="chat/room"))
    assert sorted(c.user for c in reply.presence.clients.values()) == ["alice", "bob"]
    reply = await alice.request(user_status=pb.UserStatusRequest(users=["bob", "carol"]))
    assert [(s.user, s.online) for s in reply.user_status.statuses] == [
        ("bob", True),
        ("carol", False),
    ]
    # Alice leaves; what she misses is published on the other node (server API too) and
    # recovered when she comes back through that node.
    last = pb.StreamPosition(offset=1, epoch=subscribed.position.epoch)
    await alice.close()
    left = await bob.push()
    assert left.HasField("leave") and left.leave.user == "alice"
    for i in range(3):
        await publish(two, "chat/room", i)
    back = await RawClient.open(two, token=make_token("alice"))
    clients.append(back)
    result = await back.subscribe("chat/room", recover=True, since=last)
    assert result.recovered
    assert [p.offset for p in result.publications] == [2, 3, 4]
    assert [json.loads(p.data) for p in result.publications] == [0, 1, 2]
    await publish(one, "chat/room", "live")
    assert (await back.publication()).pub.offset == 5


async def test_gateways_ride_out_a_redis_restart(
    make_gateway: GatewayFactory,
    make_redis_server: Callable[[], RedisServer],
    clients: list[RawClient],
) -> None:
    server = make_redis_server()
    config = cluster_config(server.url, "r")
    one = await make_gateway(**config)
    two = await make_gateway(**config)
    listener = await RawClient.open(one)
    talker = await RawClient.open(two)
    clients.extend([listener, talker])
    await listener.subscribe("open/news")
    server.kill()
    await eventually(lambda: not one.node.broker.shards[0].pubsub.up)  # type: ignore[attr-defined]
    reply = await talker.request(publish=pb.PublishRequest(channel="open/news", data=b"1"))
    assert reply.error.code == ErrorCode.BROKER_UNAVAILABLE
    assert reply.error.temporary and reply.error.retry_after_ms > 0
    server.start()
    deadline = time.monotonic() + 20
    while True:  # a client retrying as told
        reply = await talker.request(publish=pb.PublishRequest(channel="open/news", data=b"2"))
        if not reply.HasField("error"):
            break
        assert reply.error.code == ErrorCode.BROKER_UNAVAILABLE
        assert time.monotonic() < deadline
        await asyncio.sleep(reply.error.retry_after_ms / 1000)
    # The listener's node resubscribed by itself: the next publication arrives.
    await eventually(lambda: one.node.broker.shards[0].pubsub.is_active(b"r:c:open/news"))  # type: ignore[attr-defined]
    await talker.request(publish=pb.PublishRequest(channel="open/news", data=b"3"))
    data = [(await listener.publication()).pub.data]
    if data == [b"2"]:  # published before the listener's node was back: may be missed
        data.append((await listener.publication()).pub.data)
    assert data[-1] == b"3"


async def test_mqtt_devices_on_two_gateways(
    make_gateway: GatewayFactory, redis_server: RedisServer, clients: list[RawClient]
) -> None:
    config = cluster_config(redis_server.url, f"m{secrets.token_hex(4)}")
    config["mqtt"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
    one = await make_gateway(**config)
    two = await make_gateway(**config)
    listener = Device(one, "listener", v5=True)
    sender = Device(two, "sender", v5=True)
    made = [listener, sender]
    try:
        await listener.connect()
        await sender.connect()
        await listener.subscribe("sensors/+/temp", qos=1)
        watcher = await RawClient.open(one)
        clients.append(watcher)
        await watcher.subscribe("sensors/1/temp")
        props = paho_properties.Properties(PacketTypes.PUBLISH)
        props.ContentType = "text/plain"
        props.UserProperty = [("unit", "C")]
        info = sender.client.publish(
            "sensors/1/temp", b"21.5", qos=1, retain=True, properties=props
        )
        await asyncio.to_thread(info.wait_for_publish, 5)
        message = await listener.message()
        assert (message.topic, message.payload, message.qos) == ("sensors/1/temp", b"21.5", 1)
        assert message.properties.ContentType == "text/plain"
        assert message.properties.UserProperty == [("unit", "C")]
        assert (await watcher.publication()).pub.data == b"21.5"
        # The retained message is in Redis: a device subscribing through the other node
        # gets it.
        late = Device(one, "late", v5=True)
        made.append(late)
        await late.connect()
        await late.subscribe("sensors/#", qos=1)
        retained = await late.message()
        assert (retained.payload, retained.retain) == (b"21.5", True)
        assert retained.properties.ContentType == "text/plain"
    finally:
        for device in made:
            await asyncio.to_thread(device.stop)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("broker", "message"),
    [
        ({"type": "redis", "redis_urls": []}, "broker.redis_urls: list at least one"),
        ({"type": "redis", "redis_urls": ["http://x"]}, r"broker.redis_urls\[0\]: 'http://x'"),
        ({"type": "redis", "redis_urls": ["redis://h/x"]}, r"redis_urls\[0\].*not a number"),
        (
            {"type": "redis", "redis_urls": ["redis://h:1/0", "redis://u:p@h:1/0"]},
            r"broker.redis_urls\[1\]: .*listed twice",
        ),
        ({"type": "redis", "key_prefix": "a b"}, "broker.key_prefix"),
        ({"type": "redis", "pubsub_queue_size": 0}, "broker.pubsub_queue_size"),
        ({"type": "redis", "unsubscribe_delay": -1}, "broker.unsubscribe_delay"),
        ({"type": "redis", "connect_timeout": 0}, "broker.connect_timeout"),
        ({"type": "kafka"}, "broker.type: 'kafka' is not one of memory, redis"),
    ],
)
def test_broker_config_errors_name_the_key(broker: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"broker": broker})


def test_cluster_config_builds_a_redis_broker() -> None:
    config = load_config(Path(__file__).parent.parent / "config" / "cluster.toml", environ={})
    broker = make_broker(config)
    assert isinstance(broker, RedisBroker) and not broker.single_node
    assert [a.name for a in broker._addresses] == ["127.0.0.1:6379/0"]
    unix = config_from_dict({"broker": {"type": "redis", "redis_urls": ["unix:///tmp/r.sock"]}})
    assert unix.broker.redis_urls == ["unix:///tmp/r.sock"]


async def publish_when_up(gateway: Any, channel: str, data: Any) -> dict[str, Any]:
    """Publish through the server API, retrying while the node's Redis is not back."""
    deadline = time.monotonic() + 20
    while True:
        status, body = await api_post(gateway, "publish", {"channel": channel, "data": data})
        if status == 200:
            result: dict[str, Any] = body
            return result
        assert time.monotonic() < deadline, (status, body)
        await asyncio.sleep(0.1)


async def test_a_redis_restart_tells_websocket_subscribers_to_resubscribe(
    make_gateway: GatewayFactory,
    make_redis_server: Callable[[], RedisServer],
    clients: list[RawClient],
) -> None:
    """Publications made while a node's pub/sub link was down never reach it: its
    subscribers of channels with history get an `unsubscribe` push with code 2500 and
    resubscribe from their position (here Redis restarted empty: recovered=false, a new
    epoch); channels without history keep their subscription."""
    server = make_redis_server()
    config = cluster_config(server.url, "gap")
    one = await make_gateway(**config)
    two = await make_gateway(**config)
    listener = await RawClient.open(one)
    other = await RawClient.open(one)
    clients.extend([listener, other])
    first = await listener.subscribe("chat/room")
    await other.subscribe("chat/room")
    assert (await listener.push()).HasField("join")  # the other one
    await listener.subscribe("open/news")
    await publish(two, "chat/room", "before")
    assert (await listener.publication()).pub.offset == 1
    assert (await other.publication()).pub.offset == 1
    server.restart()
    for client in (listener, other):
        while True:
            push = await client.push(timeout=20)
            if push.HasField("unsubscribe"):
                break
            assert not push.HasField("pub")  # nothing from the new epoch before it
        assert push.channel == "chat/room"
        assert push.unsubscribe.code == UnsubscribeCode.RESUBSCRIBE == 2500
        assert push.unsubscribe.reason == "stream gap: resubscribe with recovery"
    gaps = one.node.metrics.channel_events["stream_gap"]
    assert gaps == 1
    since = pb.StreamPosition(offset=1, epoch=first.position.epoch)
    deadline = time.monotonic() + 20
    while True:  # as told: resubscribe, retrying temporary errors (Redis just came back)
        request = pb.SubscribeRequest(channel="chat/room", recover=True, since=since)
        reply = await listener.request(subscribe=request)
        if not reply.HasField("error"):
            break
        assert reply.error.temporary and time.monotonic() < deadline, reply.error
        await asyncio.sleep(reply.error.retry_after_ms / 1000)
    again = reply.subscribe
    assert not again.recovered and again.position.epoch != first.position.epoch
    await publish_when_up(two, "chat/room", "after")
    pushed = await listener.publication()
    assert (pushed.channel, json.loads(pushed.pub.data)) == ("chat/room", "after")
    # Still subscribed to the channel without history: nothing to recover there.
    reply = await listener.request(subscribe=pb.SubscribeRequest(channel="open/news"))
    assert reply.error.code == ErrorCode.ALREADY_SUBSCRIBED


async def test_the_python_client_resubscribes_after_a_stream_gap(
    make_gateway: GatewayFactory, make_redis_server: Callable[[], RedisServer]
) -> None:
    server = make_redis_server()
    config = cluster_config(server.url, "gapc")
    one = await make_gateway(**config)
    two = await make_gateway(**config)
    failed: list[Subscription] = []
    async with Client(ws_url(one), token=make_token("py")) as client:
        sub = await client.subscribe("chat/room")
        sub.on_recovery_failed = failed.append
        await publish(two, "chat/room", "before")
        assert json.loads((await sub.get(timeout=5)).data) == "before"
        old = sub.position
        assert old is not None and old.offset == 1
        server.restart()
        await eventually(lambda: bool(failed), timeout=20)
        assert failed == [sub] and not sub.recovered and not sub.closed
        assert client.subscriptions["chat/room"] is sub
        result = await publish_when_up(two, "chat/room", "after")
        pub = await sub.get(timeout=5)
        assert json.loads(pub.data) == "after" and pub.offset == 1
        assert sub.position is not None and sub.position.epoch != old.epoch
        assert result["position"]["epoch"] == sub.position.epoch


async def test_more_concurrent_commands_than_connections_wait_for_one(
    make_node: NodeFactory,
) -> None:
    """A burst beyond the pool (a reconnect storm) waits for connections instead of
    failing with redis-py's "Too many connections"."""
    broker, _ = await make_node(connections_per_instance=4)
    results = await asyncio.gather(
        *(broker.publish("burst", b"x", history=BIG) for _ in range(300))
    )
    assert sorted(r.position.offset for r in results) == list(range(1, 301))

"""The parts under the cluster features, against a real redis-server: the MQTT session
store's contract (ownership, handing over, queue, expiry), control requests between
nodes, and the session encoding (property tests)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from realtime.brokers.redis import RedisBroker
from realtime.brokers.redis_sessions import (
    pack_message,
    pack_subscriptions,
    unpack_message,
    unpack_subscriptions,
)
from realtime.config import BrokerConfig
from realtime.core.broker import (
    ChannelEvent,
    ControlMessage,
    Publication,
    SessionStore,
    StoredMessage,
    StoredSession,
    StoredSubscription,
)
from realtime.core.cluster import Cluster
from realtime.core.mqtt_cluster import options_byte, options_from_byte
from realtime.mqtt.packets import Properties, SubscriptionOptions

from .redis_server import RedisServer


class ControlHandler:
    """A node's broker handler that only cares for control messages."""

    def __init__(self) -> None:
        self.cluster: Cluster | None = None

    def handle_publication(self, channel: str, pub: Publication) -> None:
        pass

    def handle_event(self, channel: str, event: ChannelEvent) -> None:
        pass

    def handle_stream_gap(self, channels: list[str]) -> None:
        pass

    def handle_control(self, message: ControlMessage) -> None:
        assert self.cluster is not None
        self.cluster.handle(message)


@pytest.fixture
async def brokers(redis_server: RedisServer) -> AsyncIterator[list[tuple[RedisBroker, Cluster]]]:
    prefix = "t" + secrets.token_hex(4)
    made: list[tuple[RedisBroker, Cluster]] = []
    for name in ("a", "b"):
        broker = RedisBroker(
            BrokerConfig(type="redis", redis_urls=[redis_server.url], key_prefix=prefix)
        )
        handler = ControlHandler()
        await broker.start(handler)
        cluster = Cluster(
            broker,
            name,
            lambda: {"connections": 0},
            announce_interval=1.0,
            node_ttl=3.0,
            request_timeout=1.0,
        )
        handler.cluster = cluster
        await cluster.announce(0.0)
        made.append((broker, cluster))
    yield made
    for broker, _ in made:
        await broker.close()


def store_of(broker: RedisBroker) -> SessionStore:
    assert broker.session_store is not None
    return broker.session_store


def message(n: int, packet_id: int = 0) -> StoredMessage:
    return StoredMessage(f"dev/{n}", b"m%d" % n, 1, False, None, 0.0, packet_id)


def session(messages: list[StoredMessage], user: str = "u1") -> StoredSession:
    subs = [StoredSubscription("dev/#", options_byte(SubscriptionOptions(qos=1)), 7)]
    return StoredSession(user, 300, subs, messages, next_packet_id=5)


# ----------------------------------------------------------------------------- store


async def test_claim_ownership_and_other_users(brokers: list[Any]) -> None:
    (a, _), (b, _) = brokers
    first = await store_of(a).claim("dev-1", "u1")
    assert first is not None and first.owner == "" and not first.exists
    await store_of(a).save("dev-1", session([message(1)]), 300)
    second = await store_of(b).claim("dev-1", "u1")
    assert second is not None and second.owner == a.node_id and second.exists
    assert [s.topic_filter for s in second.subscriptions] == ["dev/#"]
    assert second.subscriptions[0].identifier == 7
    assert await store_of(b).claim("dev-1", "someone-else") is None


async def test_only_the_owner_or_the_node_handed_to_may_write(brokers: list[Any]) -> None:
    (a, _), (b, _) = brokers
    await store_of(a).claim("dev-2", "u1")
    await store_of(a).save("dev-2", session([message(1)]), 300)
    await store_of(b).claim("dev-2", "u1")  # b owns it now
    await store_of(a).save("dev-2", session([message(9)]), 300)  # refused: not a's
    await store_of(a).append({"dev-2": [message(10)]}, 100)  # refused too
    await store_of(a).delete("dev-2")  # refused too
    loaded = await store_of(b).load("dev-2")
    assert loaded is not None and [m.data for m in loaded.messages] == [b"m1"]
    # Handing over: a writes what it had for b.
    await store_of(a).save(
        "dev-2", session([message(2, packet_id=3), message(3)]), 300, handing_to=b.node_id
    )
    loaded = await store_of(b).load("dev-2")
    assert loaded is not None
    assert [(m.data, m.packet_id) for m in loaded.messages] == [(b"m2", 3), (b"m3", 0)]
    assert loaded.next_packet_id == 5 and loaded.user == "u1" and loaded.expiry == 300


async def test_queue_appends_in_order_capped_and_handed_over_once(brokers: list[Any]) -> None:
    (a, _), _ = brokers
    store = store_of(a)
    await store.claim("dev-3", "u1")
    await store.save("dev-3", session([message(0)]), 300)
    await store.append({"dev-3": [message(1), message(2)]}, 3)
    await store.append({"dev-3": [message(3), message(4)]}, 3)  # the queue keeps 3
    loaded = await store.load("dev-3")
    assert loaded is not None
    assert [m.data for m in loaded.messages] == [b"m0", b"m1", b"m2", b"m3"]
    again = await store.load("dev-3")  # the messages are the loader's now
    assert again is not None and again.messages == []
    assert [s.topic_filter for s in again.subscriptions] == ["dev/#"]


async def test_expiry_and_delete(brokers: list[Any], redis_server: RedisServer) -> None:
    (a, _), _ = brokers
    store = store_of(a)
    await store.claim("dev-4", "u1")
    await store.save("dev-4", session([message(1)]), 0.2)
    await asyncio.sleep(0.4)
    assert await store.load("dev-4") is None  # expired with its session expiry
    fresh = await store.claim("dev-4", "u2")  # gone: another user may take the id
    assert fresh is not None and not fresh.exists
    await store.save("dev-4", session([], user="u2"), 300)
    await store.delete("dev-4")
    assert await store.load("dev-4") is None


# ----------------------------------------------------------------------------- control


async def test_requests_and_broadcasts_between_nodes(brokers: list[Any]) -> None:
    (a, cluster_a), (b, cluster_b) = brokers
    cluster_b.on("echo", _echo("b"))
    cluster_a.on("echo", _echo("a"))
    assert await cluster_a.request(b.node_id, "echo", {"x": 1}) == {"node": "b", "x": 1}
    answers, missing = await cluster_a.broadcast("echo", {"x": 2})
    assert answers == {a.node_id: {"node": "a", "x": 2}, b.node_id: {"node": "b", "x": 2}}
    assert missing == []
    assert await cluster_a.request("no-such-node", "echo", {}, timeout=0.2) is None
    assert [n["name"] for n in await cluster_a.nodes()] == ["a", "b"]
    assert await cluster_a.is_listed(b.node_id)
    await cluster_b.leave()
    assert [n["name"] for n in await cluster_a.nodes()] == ["a"]
    assert not await cluster_a.is_listed(b.node_id)


def _echo(name: str) -> Any:
    async def answer(body: dict[str, Any]) -> dict[str, Any]:
        return {"node": name, **body}

    return answer


# ----------------------------------------------------------------------------- encoding

properties = st.none() | st.builds(
    Properties,
    payload_format_indicator=st.none() | st.integers(0, 1),
    message_expiry_interval=st.none() | st.integers(0, 2**32 - 1),
    content_type=st.none() | st.text(max_size=20),
    response_topic=st.none() | st.text(max_size=20),
    correlation_data=st.none() | st.binary(max_size=20),
    user_properties=st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3),
    subscription_identifiers=st.lists(st.integers(1, 268_435_455), max_size=3),
)
stored_messages = st.builds(
    StoredMessage,
    channel=st.text(min_size=1, max_size=30),
    data=st.binary(max_size=100),
    qos=st.integers(1, 2),
    retain=st.booleans(),
    properties=properties,
    expires_at=st.floats(0, 2e9),
    packet_id=st.integers(0, 65535),
    released=st.booleans(),
)


@given(stored_messages)
def test_stored_messages_round_trip(m: StoredMessage) -> None:
    import msgpack  # type: ignore[import-untyped]

    assert unpack_message(msgpack.unpackb(msgpack.packb(pack_message(m)))) == m


@given(
    st.lists(
        st.builds(
            StoredSubscription,
            topic_filter=st.text(min_size=1, max_size=30),
            options=st.integers(0, 0x3F),
            identifier=st.integers(0, 268_435_455),
        ),
        max_size=5,
    )
)
def test_subscriptions_round_trip(subs: list[StoredSubscription]) -> None:
    assert unpack_subscriptions(pack_subscriptions(subs)) == subs


@given(
    st.builds(
        SubscriptionOptions,
        qos=st.integers(0, 2),
        no_local=st.booleans(),
        retain_as_published=st.booleans(),
        retain_handling=st.integers(0, 2),
    )
)
def test_subscription_options_byte_round_trip(options: SubscriptionOptions) -> None:
    assert options_from_byte(options_byte(options)) == options

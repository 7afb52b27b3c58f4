"""The device registry (#6): push tokens by user and device.

The registry's contract runs against the memory registry and the Redis registry on a real
redis-server (one instance, and two instances so that a user's pointers and the token's
record live on different ones). Then the socket commands (`register_device`,
`unregister_device`) with real WebSocket clients, the server API endpoints, touching on
connect, pruning, and property tests of the Redis record decoding.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis as sync_redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realtime.app import Gateway
from realtime.brokers.memory_devices import MemoryDeviceRegistry
from realtime.brokers.redis import RedisBroker
from realtime.brokers.redis_devices import (
    member_of,
    pointer_of,
    record_args,
    record_from_fields,
    split_member,
    split_pointer,
)
from realtime.config import BrokerConfig
from realtime.core.broker import ChannelEvent, ControlMessage, Publication
from realtime.core.devices import PROVIDERS, DeviceRecord, DeviceRegistry
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codes import ErrorCode

from .conftest import GatewayFactory, RawClient, api_post, make_token
from .redis_server import RedisServer

DAY = 86_400.0


class Handler:
    """A broker handler that ignores everything (the registry needs none of it)."""

    def handle_publication(self, channel: str, pub: Publication) -> None:
        pass

    def handle_event(self, channel: str, event: ChannelEvent) -> None:
        pass

    def handle_stream_gap(self, channels: list[str]) -> None:
        pass

    def handle_control(self, message: ControlMessage) -> None:
        pass


async def redis_broker(urls: list[str], prefix: str = "") -> RedisBroker:
    config = BrokerConfig(
        type="redis", redis_urls=urls, key_prefix=prefix or "t" + secrets.token_hex(4)
    )
    broker = RedisBroker(config)
    await broker.start(Handler())
    return broker


@pytest.fixture(params=["memory", "redis", "redis-2-instances"])
async def registry(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    make_redis_server: Callable[[], RedisServer],
) -> AsyncIterator[DeviceRegistry]:
    if request.param == "memory":
        yield MemoryDeviceRegistry()
        return
    urls = [redis_server.url]
    if request.param == "redis-2-instances":
        urls = [make_redis_server().url, make_redis_server().url]
    broker = await redis_broker(urls)
    yield broker.device_registry
    await broker.close()


def rec(
    user: str,
    device: str,
    token: str,
    provider: str = "apns",
    *,
    registered_at: float = 0.0,
    last_used: float = 0.0,
    **fields: Any,
) -> DeviceRecord:
    return DeviceRecord(
        user,
        device,
        provider,
        token,
        registered_at=registered_at,
        last_used=last_used,
        **fields,
    )


def owners(records: list[DeviceRecord]) -> list[tuple[str, str, str]]:
    return sorted((r.user, r.device, r.token) for r in records)


# ----------------------------------------------------------------------------- contract


async def test_register_and_read(registry: DeviceRegistry) -> None:
    before = time.time()
    record = rec(
        "alice", "phone", "a" * 64, environment="sandbox", app_id="com.x.chat", platform="ios"
    )
    assert await registry.register(record) is False
    found = await registry.device("alice", "phone")
    assert found is not None
    assert (found.provider, found.token, found.environment) == ("apns", "a" * 64, "sandbox")
    assert (found.app_id, found.platform) == ("com.x.chat", "ios")
    assert before - 0.01 <= found.registered_at <= time.time() + 0.01
    assert found.last_used >= found.registered_at
    # Many devices per user, of both providers.
    await registry.register(rec("alice", "tablet", "fcm-token:1", "fcm", platform="android"))
    assert owners(await registry.devices("alice")) == [
        ("alice", "phone", "a" * 64),
        ("alice", "tablet", "fcm-token:1"),
    ]
    assert await registry.device("alice", "laptop") is None
    assert await registry.devices("nobody") == []


async def test_register_replaces_the_devices_previous_token(registry: DeviceRegistry) -> None:
    await registry.register(rec("alice", "phone", "old"))
    assert await registry.register(rec("alice", "phone", "new")) is False
    assert owners(await registry.devices("alice")) == [("alice", "phone", "new")]
    # The old token is nobody's now: the provider reporting it changes nothing, and
    # someone registering it takes it from nobody.
    assert await registry.remove_token("apns", "old") is False
    assert await registry.register(rec("bob", "phone", "old")) is False
    assert owners(await registry.devices("alice")) == [("alice", "phone", "new")]


async def test_a_token_moves_to_the_user_registering_it(registry: DeviceRegistry) -> None:
    await registry.register(rec("alice", "phone", "T1"))
    await registry.register(rec("alice", "tablet", "T2"))
    # Bob logs in on alice's phone: the token is his now, and only his.
    assert await registry.register(rec("bob", "phone-b", "T1")) is True
    assert owners(await registry.devices("alice")) == [("alice", "tablet", "T2")]
    assert await registry.device("alice", "phone") is None
    assert owners(await registry.devices("bob")) == [("bob", "phone-b", "T1")]
    # Between devices of one user too (the app was reinstalled under another id).
    assert await registry.register(rec("bob", "phone-c", "T1")) is True
    assert owners(await registry.devices("bob")) == [("bob", "phone-c", "T1")]
    # The same token again for the same device is no move; its registration time renews.
    first = await registry.device("bob", "phone-c")
    assert first is not None
    await asyncio.sleep(0.01)
    assert await registry.register(rec("bob", "phone-c", "T1")) is False
    again = await registry.device("bob", "phone-c")
    assert again is not None and again.registered_at > first.registered_at
    # The same token string of another provider is another token.
    assert await registry.register(rec("carol", "p", "T1", "fcm")) is False
    assert owners(await registry.devices("bob")) == [("bob", "phone-c", "T1")]


async def test_concurrent_registrations_leave_one_owner(registry: DeviceRegistry) -> None:
    users = [f"u{i}" for i in range(20)]
    await asyncio.gather(*(registry.register(rec(user, "d", "shared")) for user in users))
    holders = [user for user in users if await registry.device(user, "d") is not None]
    assert len(holders) == 1


async def test_unregister(registry: DeviceRegistry) -> None:
    await registry.register(rec("alice", "phone", "T"))
    assert await registry.unregister("alice", "phone") is True
    assert await registry.unregister("alice", "phone") is False
    assert await registry.devices("alice") == []
    assert await registry.remove_token("apns", "T") is False
    assert await registry.register(rec("bob", "x", "T")) is False  # nobody had it


async def test_remove_token_honours_the_registration_time(registry: DeviceRegistry) -> None:
    await registry.register(rec("alice", "phone", "T", registered_at=1_000_000.0))
    # APNs 410 with a timestamp before the registration: the app registered again since.
    assert await registry.remove_token("apns", "T", registered_before=999_999.0) is False
    assert await registry.remove_token("apns", "T", registered_before=1_000_000.0) is False
    assert await registry.device("alice", "phone") is not None
    # A timestamp after it: the token is gone (and only that provider's).
    await registry.register(rec("alice", "tablet", "T", "fcm"))
    assert await registry.remove_token("apns", "T", registered_before=1_000_000.5) is True
    assert await registry.device("alice", "phone") is None
    assert owners(await registry.devices("alice")) == [("alice", "tablet", "T")]
    # No timestamp (FCM unregistered, APNs BadDeviceToken): removed whenever registered.
    assert await registry.remove_token("fcm", "T") is True
    assert await registry.remove_token("fcm", "T") is False
    assert await registry.devices("alice") == []


async def test_touch(registry: DeviceRegistry) -> None:
    await registry.register(rec("alice", "phone", "T", registered_at=1000.0))
    found = await registry.device("alice", "phone")
    assert found is not None and found.last_used == 1000.0
    await registry.touch("alice", "phone", 5000.0)
    await registry.touch("alice", "phone", 4000.0)  # never backwards
    found = await registry.device("alice", "phone")
    assert found is not None and found.last_used == 5000.0 and found.registered_at == 1000.0
    await registry.touch("alice", "laptop", 6000.0)  # no such device: nothing happens
    await registry.touch("nobody", "phone", 6000.0)
    assert owners(await registry.devices("alice")) == [("alice", "phone", "T")]
    # After a move the old owner's touch does not keep the token alive.
    await registry.register(rec("bob", "b", "T", registered_at=2000.0))
    await registry.touch("alice", "phone", 9000.0)
    moved = await registry.device("bob", "b")
    assert moved is not None and moved.last_used == 2000.0


async def test_prune(registry: DeviceRegistry) -> None:
    now = time.time()
    await registry.register(rec("alice", "old", "T-old", registered_at=now - 100 * DAY))
    await registry.register(rec("alice", "used", "T-used", registered_at=now - 100 * DAY))
    await registry.touch("alice", "used", now - DAY)
    await registry.register(rec("bob", "new", "T-new"))
    for i in range(5):
        await registry.register(rec(f"u{i}", "d", f"T{i}", "fcm", registered_at=now - 61 * DAY))
    assert await registry.prune(now - 60 * DAY) == 6
    assert await registry.prune(now - 60 * DAY) == 0  # idempotent
    assert owners(await registry.devices("alice")) == [("alice", "used", "T-used")]
    assert owners(await registry.devices("bob")) == [("bob", "new", "T-new")]
    assert await registry.devices("u0") == []
    # A pruned token is nobody's: registering it again moves nothing.
    assert await registry.register(rec("carol", "c", "T-old")) is False


# ----------------------------------------------------------------------------- Redis only


@pytest.fixture
async def two_shards(
    make_redis_server: Callable[[], RedisServer],
) -> AsyncIterator[RedisBroker]:
    broker = await redis_broker([make_redis_server().url, make_redis_server().url])
    yield broker
    await broker.close()


def apart(broker: RedisBroker, first: str, second: str) -> tuple[str, str]:
    """Names starting with `first` and `second` that live on different instances."""
    for i in range(1000):
        a, b = f"{first}{i}", f"{second}{i}"
        if broker.shard_of(a) is not broker.shard_of(b):
            return a, b
    raise AssertionError("no names on different instances")


async def test_redis_move_across_instances(two_shards: RedisBroker) -> None:
    """The old owner, the new owner and the token on different instances."""
    broker = two_shards
    registry = broker.device_registry
    alice, bob = apart(broker, "alice", "bob")
    token = next(
        f"tok{i}"
        for i in range(1000)
        if broker.shard_of(member_of("apns", f"tok{i}")) is not broker.shard_of(bob)
    )
    await registry.register(rec(alice, "phone", token))
    assert await registry.register(rec(bob, "phone", token)) is True
    assert await registry.devices(alice) == []
    assert owners(await registry.devices(bob)) == [(bob, "phone", token)]
    # The old owner's pointer was removed, not only ignored.
    user_shard = broker.shard_of(alice)
    assert await user_shard.client.hgetall(f"{broker.key_prefix}d:{alice}") == {}
    assert await registry.remove_token("apns", token) is True
    assert await registry.devices(bob) == []
    assert await broker.shard_of(bob).client.hgetall(f"{broker.key_prefix}d:{bob}") == {}


async def test_redis_stale_and_garbage_pointers_are_ignored(redis_server: RedisServer) -> None:
    broker = await redis_broker([redis_server.url])
    try:
        registry = broker.device_registry
        client = broker.shard_of("x").client
        k = broker.key_prefix
        await registry.register(rec("alice", "phone", "T"))
        # Left behind by failed steps: a pointer to a record that is another
        # registration's, one to nothing, and garbage.
        await client.hset(f"{k}d:alice", "ghost", pointer_of("abcd", member_of("apns", "T")))
        await client.hset(f"{k}d:alice", "gone", pointer_of("abcd", member_of("fcm", "none")))
        await client.hset(f"{k}d:alice", "junk", b"\xff\x00no pointer")
        # A record with garbage fields, pointed to.
        await client.hset(f"{k}dt:apns:bad", mapping={"u": "alice", "d": "bad", "n": "n1"})
        await client.hset(f"{k}dt:apns:bad", "r", "not a number")
        await client.hset(f"{k}d:alice", "bad", pointer_of("n1", member_of("apns", "bad")))
        assert owners(await registry.devices("alice")) == [("alice", "phone", "T")]
        assert await registry.device("alice", "ghost") is None
        assert await registry.device("alice", "bad") is None
        # Reads removed them.
        assert sorted(await client.hkeys(f"{k}d:alice")) == [b"phone"]
        await registry.touch("alice", "ghost", time.time())  # no effect, no error
    finally:
        await broker.close()


async def test_redis_record_left_by_a_failed_registration_is_pruned(
    redis_server: RedisServer,
) -> None:
    """A registration that stopped after writing the record (its instance for the
    pointer was down) leaves a record nobody points to; pruning removes it."""
    broker = await redis_broker([redis_server.url])
    try:
        registry = broker.device_registry
        await registry.register(rec("alice", "phone", "T", registered_at=time.time() - 90 * DAY))
        await broker.shard_of("alice").client.delete(f"{broker.key_prefix}d:alice")
        assert await registry.devices("alice") == []
        assert await registry.prune(time.time() - 60 * DAY) == 1
        assert await broker.shard_of("x").client.exists(f"{broker.key_prefix}dt:apns:T") == 0
    finally:
        await broker.close()


# ----------------------------------------------------------------------------- decoding

names = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    user=names,
    device=names,
    provider=st.sampled_from(PROVIDERS),
    token=names,
    environment=st.sampled_from(["production", "sandbox"]),
    app_id=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
    platform=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=10),
    registered_at=times,
    last_used=times,
)
def test_record_round_trip_through_redis(
    redis_server: RedisServer,
    user: str,
    device: str,
    provider: str,
    token: str,
    environment: str,
    app_id: str,
    platform: str,
    registered_at: float,
    last_used: float,
) -> None:
    record = DeviceRecord(
        user, device, provider, token, environment, app_id, platform, registered_at, last_used
    )
    client = sync_redis.Redis.from_url(redis_server.url)
    try:
        key = "prop:" + secrets.token_hex(8)
        names_ = ["u", "d", "n", "e", "a", "pf", "r", "l"]
        client.hset(key, mapping=dict(zip(names_, record_args(record, "n0nce"), strict=True)))
        decoded = record_from_fields(provider, token, client.hgetall(key))  # type: ignore[arg-type]
        client.delete(key)
    finally:
        client.close()
    assert decoded is not None
    got, nonce = decoded
    assert nonce == "n0nce"
    assert got == DeviceRecord(
        user,
        device,
        provider,
        token,
        environment,
        app_id,
        platform,
        int(registered_at * 1000) / 1000,
        int(last_used * 1000) / 1000,
    )


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([b"u", b"d", b"n", b"e", b"a", b"pf", b"r", b"l", b"x"]),
        st.binary(max_size=30) | st.integers().map(lambda i: str(i).encode()),
    )
)
def test_decoding_garbage_never_raises(fields: dict[bytes, bytes]) -> None:
    decoded = record_from_fields("apns", "t", fields)
    if decoded is not None:
        assert isinstance(decoded[0], DeviceRecord)


@given(st.text(max_size=60))
def test_pointer_and_member_parsing_never_raise(text: str) -> None:
    split_pointer(text)
    split_member(text)


@given(st.text(alphabet="0123456789abcdef", min_size=1, max_size=12), names, names)
def test_pointer_round_trip(nonce: str, provider: str, token: str) -> None:
    member = member_of(provider.replace(":", ""), token)
    expected = (nonce, member) if split_member(member) is not None else None
    assert split_pointer(pointer_of(nonce, member)) == expected


# ----------------------------------------------------------------------------- socket


def device_token(user: str = "alice", device: str | None = "phone", **claims: Any) -> str:
    if device is not None:
        claims["device"] = device
    return make_token(user, **claims)


async def register(client: RawClient, **fields: Any) -> pb.Reply:
    return await client.request(register_device=pb.RegisterDeviceRequest(**fields))


async def devices_of(gateway: Gateway, user: str) -> list[dict[str, Any]]:
    status, body = await api_post(gateway, "devices", {"user": user})
    assert status == 200, body
    found: list[dict[str, Any]] = body["devices"]
    return found


async def test_register_device_over_the_socket(
    make_gateway: GatewayFactory, clients: list[RawClient]
) -> None:
    gateway = await make_gateway()
    for fmt in ("proto", "json"):
        client = await RawClient.open(gateway, token=device_token(device=f"phone-{fmt}"), fmt=fmt)
        clients.append(client)
        reply = await register(
            client,
            provider="apns",
            token=f"{fmt}-" + "ab" * 32,
            environment="sandbox",
            app_id="com.example.chat",
            platform="ios",
        )
        assert not reply.HasField("error"), reply.error
        assert reply.WhichOneof("result") == "register_device"
    found = await devices_of(gateway, "alice")
    assert [(d["device"], d["token"], d["environment"]) for d in found] == [
        ("phone-json", "json-" + "ab" * 32, "sandbox"),
        ("phone-proto", "proto-" + "ab" * 32, "sandbox"),
    ]
    assert found[0]["app_id"] == "com.example.chat" and found[0]["platform"] == "ios"
    assert found[0]["provider"] == "apns" and found[0]["registered_at"] > 0
    # FCM, environment defaulting to production; then unregister (logout).
    client = clients[0]
    assert not (await register(client, provider="fcm", token="f:APA91b-x_y")).HasField("error")
    found = await devices_of(gateway, "alice")
    assert ("fcm", "f:APA91b-x_y", "production") in [
        (d["provider"], d["token"], d["environment"]) for d in found
    ]
    reply = await client.request(unregister_device=pb.UnregisterDeviceRequest())
    assert not reply.HasField("error") and reply.WhichOneof("result") == "unregister_device"
    assert [d["device"] for d in await devices_of(gateway, "alice")] == ["phone-json"]
    # Unregistering again is fine (nothing to forget).
    reply = await client.request(unregister_device=pb.UnregisterDeviceRequest())
    assert not reply.HasField("error")
    metrics = gateway.node.metrics.render()
    assert "realtime_push_devices_registered_total 3" in metrics


async def test_device_commands_need_a_device_claim(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    client = await RawClient.open(gateway, token=device_token(device=None))
    clients.append(client)
    reply = await register(client, provider="apns", token="ab" * 32)
    assert reply.error.code == ErrorCode.DEVICE_REQUIRED
    assert "device claim" in reply.error.message and not reply.error.temporary
    reply = await client.request(unregister_device=pb.UnregisterDeviceRequest())
    assert reply.error.code == ErrorCode.DEVICE_REQUIRED
    # The connection is still fine.
    assert not (await client.request(ping=pb.PingRequest())).HasField("error")


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"provider": "apn", "token": "ab"}, "provider"),
        ({"provider": "", "token": "ab"}, "provider"),
        ({"provider": "apns", "token": ""}, "token"),
        ({"provider": "apns", "token": "a" * 4097}, "token"),
        ({"provider": "fcm", "token": "has space"}, "token"),
        ({"provider": "fcm", "token": "ctl\x00char"}, "token"),
        ({"provider": "fcm", "token": "n\u00f6n-ascii"}, "token"),
        ({"provider": "apns", "token": "ab", "environment": "staging"}, "environment"),
        ({"provider": "apns", "token": "ab", "app_id": "x" * 256}, "app_id"),
        ({"provider": "apns", "token": "ab", "platform": "p" * 33}, "platform"),
        ({"provider": "apns", "token": "ab", "platform": "ios\n"}, "platform"),
    ],
)
async def test_register_device_refuses_bad_input(
    gateway: Gateway, clients: list[RawClient], fields: dict[str, str], says: str
) -> None:
    client = await RawClient.open(gateway, token=device_token())
    clients.append(client)
    reply = await register(client, **fields)
    assert reply.error.code == ErrorCode.BAD_REQUEST, reply
    assert says in reply.error.message
    assert await devices_of(gateway, "alice") == []


async def test_largest_token_is_accepted(gateway: Gateway, clients: list[RawClient]) -> None:
    client = await RawClient.open(gateway, token=device_token())
    clients.append(client)
    assert not (await register(client, provider="fcm", token="a" * 4096)).HasField("error")


async def test_garbage_register_device_closes_like_any_malformed_frame(
    gateway: Gateway,
) -> None:
    client = await RawClient.open(gateway, token=device_token(), fmt="json")
    try:
        await client.ws.send('{"id":7,"register_device":{"provider":["apns"],"token":5}}')
        code, _ = await client.wait_closed()
        assert code == 3501
    finally:
        await client.close()


async def test_token_moves_between_users_over_the_socket(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    alice = await RawClient.open(gateway, token=device_token("alice", "phone"))
    bob = await RawClient.open(gateway, token=device_token("bob", "phone-2"))
    clients.extend([alice, bob])
    assert not (await register(alice, provider="apns", token="cafe" * 16)).HasField("error")
    assert not (await register(bob, provider="apns", token="cafe" * 16)).HasField("error")
    assert await devices_of(gateway, "alice") == []
    assert [d["device"] for d in await devices_of(gateway, "bob")] == ["phone-2"]
    assert "realtime_push_tokens_moved_total 1" in gateway.node.metrics.render()


async def test_device_commands_are_rate_limited(
    make_gateway: GatewayFactory, clients: list[RawClient]
) -> None:
    gateway = await make_gateway(limits={"commands_per_second": 0.5, "command_burst": 2})
    client = await RawClient.open(gateway, token=device_token())
    clients.append(client)
    codes = [(await register(client, provider="apns", token=f"t{i}")).error.code for i in range(3)]
    assert codes[:2] == [0, 0]
    assert codes[2] == ErrorCode.TOO_MANY_REQUESTS


async def test_connect_with_a_device_claim_touches_its_token(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    registry = gateway.node.broker.device_registry
    await registry.register(rec("alice", "phone", "T", registered_at=1000.0))
    clients.append(await RawClient.open(gateway, token=device_token("alice", "phone")))
    deadline = time.monotonic() + 5
    while True:
        found = await registry.device("alice", "phone")
        assert found is not None
        if found.last_used > time.time() - 60:
            break
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.02)


async def test_broker_unavailable_is_a_temporary_error(
    make_gateway: GatewayFactory,
    make_redis_server: Callable[[], RedisServer],
    clients: list[RawClient],
) -> None:
    server = make_redis_server()
    gateway = await make_gateway(
        broker={"type": "redis", "redis_urls": [server.url], "connect_timeout": 0.5}
    )
    client = await RawClient.open(gateway, token=device_token())
    clients.append(client)
    assert not (await register(client, provider="apns", token="T")).HasField("error")
    server.kill()
    deadline = time.monotonic() + 10
    while True:
        reply = await register(client, provider="apns", token="T2")
        if reply.HasField("error"):
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert reply.error.code == ErrorCode.BROKER_UNAVAILABLE and reply.error.temporary
    status, body = await api_post(gateway, "devices", {"user": "alice"})
    assert status == 503 and body["error"]["code"] == "broker_unavailable"


async def test_two_nodes_over_redis_share_the_registry(
    make_gateway: GatewayFactory, redis_server: RedisServer, clients: list[RawClient]
) -> None:
    broker = {"type": "redis", "redis_urls": [redis_server.url], "key_prefix": secrets.token_hex(4)}
    one = await make_gateway(broker=broker)
    two = await make_gateway(broker=broker)
    alice = await RawClient.open(one, token=device_token("alice", "phone"))
    bob = await RawClient.open(two, token=device_token("bob", "phone"))
    clients.extend([alice, bob])
    assert not (await register(alice, provider="fcm", token="shared:tok")).HasField("error")
    assert [d["user"] for d in await devices_of(two, "alice")] == ["alice"]
    assert not (await register(bob, provider="fcm", token="shared:tok")).HasField("error")
    assert await devices_of(one, "alice") == []
    assert [d["token"] for d in await devices_of(one, "bob")] == ["shared:tok"]


# ----------------------------------------------------------------------------- server API


async def test_server_api_device_endpoints(gateway: Gateway) -> None:
    body = {
        "user": "alice",
        "device": "phone",
        "provider": "apns",
        "token": "ab" * 32,
        "environment": "sandbox",
        "app_id": "com.example.chat",
        "platform": "ios",
    }
    status, answer = await api_post(gateway, "register_device", body)
    assert status == 200, answer
    assert answer["moved"] is False
    device = answer["device"]
    assert {k: device[k] for k in body} == body
    assert device["registered_at"] > 0 and device["last_used"] >= device["registered_at"]
    assert await devices_of(gateway, "alice") == [device]
    # The same token for bob: moved.
    status, answer = await api_post(
        gateway, "register_device", dict(body, user="bob", device="b1", environment="production")
    )
    assert status == 200 and answer["moved"] is True
    assert await devices_of(gateway, "alice") == []
    status, answer = await api_post(gateway, "unregister_device", {"user": "bob", "device": "b1"})
    assert (status, answer) == (200, {"removed": True})
    status, answer = await api_post(gateway, "unregister_device", {"user": "bob", "device": "b1"})
    assert (status, answer) == (200, {"removed": False})
    assert await devices_of(gateway, "bob") == []


@pytest.mark.parametrize(
    ("endpoint", "body", "says"),
    [
        ("register_device", {"device": "d", "provider": "apns", "token": "t"}, "user"),
        ("register_device", {"user": "u", "provider": "apns", "token": "t"}, "device"),
        ("register_device", {"user": "u", "device": "d", "token": "t"}, "provider"),
        ("register_device", {"user": "u", "device": "d", "provider": "apns"}, "token"),
        (
            "register_device",
            {"user": "u", "device": "d", "provider": "gcm", "token": "t"},
            "provider",
        ),
        ("register_device", {"user": "u", "device": "d", "provider": "apns", "token": 5}, "token"),
        (
            "register_device",
            {"user": "u", "device": "d", "provider": "apns", "token": "t" * 4097},
            "token",
        ),
        (
            "register_device",
            {"user": "u", "device": "d", "provider": "apns", "token": "t", "extra": 1},
            "extra",
        ),
        (
            "register_device",
            {"user": "u", "device": "d", "provider": "apns", "token": "t", "environment": "x"},
            "environment",
        ),
        ("register_device", {"user": "", "device": "d", "provider": "apns", "token": "t"}, "user"),
        (
            "register_device",
            {"user": "u", "device": "d" * 257, "provider": "fcm", "token": "t"},
            "device",
        ),
        ("unregister_device", {"user": "u"}, "device"),
        ("unregister_device", {"user": "u", "device": None}, "device"),
        ("devices", {}, "user"),
        ("devices", {"user": ["u"]}, "user"),
        ("devices", {"user": "u", "device": "d"}, "device"),
    ],
)
async def test_server_api_device_errors(
    gateway: Gateway, endpoint: str, body: dict[str, Any], says: str
) -> None:
    status, answer = await api_post(gateway, endpoint, body)
    assert status == 400, answer
    assert answer["error"]["code"] == "bad_request"
    assert says in answer["error"]["message"]


async def test_server_api_device_endpoints_need_the_key(gateway: Gateway) -> None:
    status, _ = await api_post(gateway, "devices", {"user": "alice"}, key=None)
    assert status == 401


# ----------------------------------------------------------------------------- pruning


async def test_node_prunes_unused_tokens(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(push={"token_max_idle_days": 30})
    registry = gateway.node.broker.device_registry
    now = time.time()
    await registry.register(rec("alice", "old", "T-old", registered_at=now - 31 * DAY))
    await registry.register(rec("alice", "recent", "T-recent", registered_at=now - 29 * DAY))
    assert await gateway.node.prune_devices() == 1
    assert [d["device"] for d in await devices_of(gateway, "alice")] == ["recent"]
    assert "realtime_push_tokens_pruned_total 1" in gateway.node.metrics.render()


async def test_pruning_off(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(push={"token_max_idle_days": 0})
    registry = gateway.node.broker.device_registry
    await registry.register(rec("alice", "old", "T", registered_at=1000.0))
    assert await gateway.node.prune_devices() == 0
    assert await registry.device("alice", "old") is not None


async def test_housekeeping_prunes_once_a_day(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(push={"token_max_idle_days": 1})
    node = gateway.node
    registry = node.broker.device_registry
    # Not at start: a few minutes later, then once a day.
    assert node._device_prune_at - node.loop.time() >= 50
    await registry.register(rec("alice", "old", "T", registered_at=time.time() - 2 * DAY))
    node._device_prune_at = 0.0
    deadline = time.monotonic() + 5
    while await registry.device("alice", "old") is not None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert node._device_prune_at - node.loop.time() > DAY - 10
    await registry.register(rec("alice", "old", "T", registered_at=time.time() - 2 * DAY))
    await asyncio.sleep(1.5)  # housekeeping ran again, pruning did not
    assert await registry.device("alice", "old") is not None

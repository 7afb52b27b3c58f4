"""Typing indicators over real WebSocket connections: forwarding, throttle, expiry, the
publication that ends typing, and the typist's disconnect that ends it (on one node and
across nodes)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest

from realtime.app import Gateway
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codes import CloseCode, ErrorCode
from tests.conftest import GatewayFactory, RawClient, api_post, make_token, merge, publish
from tests.redis_server import RedisServer
from tests.test_redis_broker import cluster_config

TYPING_CONFIG: dict[str, Any] = {
    "namespaces": {
        "room": {
            "typing": True,
            "typing_throttle": 1.0,
            "typing_timeout": 2.0,
            "history_size": 10,
            "publish": "token",
        },
        "chat": {"history_size": 10},  # no typing
    },
    "limits": {"commands_per_second": 20.0, "command_burst": 40, "flood_close_after": 50},
}


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(**TYPING_CONFIG)


async def typing_push(client: RawClient, timeout: float = 5.0) -> pb.Typing:
    while True:
        push = await client.push(timeout)
        if push.HasField("typing"):
            return push.typing


async def no_typing_push(client: RawClient, wait: float) -> bool:
    try:
        await typing_push(client, wait)
    except TimeoutError:
        return True
    return False


async def typing(client: RawClient, channel: str, active: bool = True) -> pb.Reply:
    return await client.request(typing=pb.TypingRequest(channel=channel, active=active))


async def room(gateway: Gateway, channel: str) -> tuple[RawClient, RawClient, RawClient]:
    alice = await RawClient.open(gateway, token=make_token("alice"))
    bob = await RawClient.open(gateway, token=make_token("bob"))
    carol = await RawClient.open(gateway, token=make_token("carol"))
    for client in (alice, bob, carol):
        await client.subscribe(channel)
    return alice, bob, carol


async def test_typing_reaches_the_others_not_the_sender(gateway: Gateway) -> None:
    alice, bob, carol = await room(gateway, "room/1")
    reply = await typing(alice, "room/1")
    assert not reply.HasField("error") and not reply.typing.throttled
    for receiver in (bob, carol):
        event = await typing_push(receiver)
        assert (event.user, event.active) == ("alice", True)
    assert await no_typing_push(alice, 0.3)
    # An explicit stop.
    await typing(alice, "room/1", active=False)
    for receiver in (bob, carol):
        event = await typing_push(receiver)
        assert (event.user, event.active) == ("alice", False)
    for client in (alice, bob, carol):
        await client.close()


async def test_typing_is_throttled_per_user_and_channel(gateway: Gateway) -> None:
    alice, bob, _ = await room(gateway, "room/2")
    assert not (await typing(alice, "room/2")).typing.throttled
    # Within the throttle window: accepted but not forwarded.
    for _ in range(5):
        assert (await typing(alice, "room/2")).typing.throttled
    assert (await typing_push(bob)).active
    assert await no_typing_push(bob, 0.5)
    # After the window, the renewal goes out again.
    await asyncio.sleep(1.0)
    assert not (await typing(alice, "room/2")).typing.throttled
    event = await typing_push(bob)
    assert (event.user, event.active) == ("alice", True)


async def test_typing_expires_when_not_renewed(gateway: Gateway) -> None:
    alice, bob, _ = await room(gateway, "room/3")
    await typing(alice, "room/3")
    assert (await typing_push(bob)).active
    # typing_timeout is 2 s; the node checks once a second.
    event = await typing_push(bob, timeout=4.0)
    assert (event.user, event.active) == ("alice", False)


async def test_a_publication_ends_typing(gateway: Gateway) -> None:
    alice, bob, _ = await room(gateway, "room/4")
    await typing(alice, "room/4")
    assert (await typing_push(bob)).active
    reply = await alice.request(publish=pb.PublishRequest(channel="room/4", data=b'"hi"'))
    assert not reply.HasField("error"), reply.error
    # bob gets the publication, then the end of alice's typing.
    pushes = [await bob.push(), await bob.push()]
    kinds = [push.WhichOneof("event") for push in pushes]
    assert kinds == ["pub", "typing"]
    assert (pushes[1].typing.user, pushes[1].typing.active) == ("alice", False)
    # The next keystroke starts a new indicator at once (the throttle was reset).
    assert not (await typing(alice, "room/4")).typing.throttled
    assert (await typing_push(bob)).active


async def test_typing_is_never_stored_or_recovered(gateway: Gateway) -> None:
    alice, _bob, _ = await room(gateway, "room/5")
    first = await publish(gateway, "room/5", {"n": 1})
    await typing(alice, "room/5")
    await publish(gateway, "room/5", {"n": 2})
    late = await RawClient.open(gateway, token=make_token("late"))
    since = pb.StreamPosition(offset=0, epoch=first["position"]["epoch"])
    result = await late.subscribe("room/5", recover=True, since=since)
    assert result.recovered
    assert [p.data for p in result.publications] == [b'{"n":1}', b'{"n":2}']
    history = await late.request(history=pb.HistoryRequest(channel="room/5"))
    assert len(history.history.publications) == 2


async def test_typing_errors(gateway: Gateway) -> None:
    alice = await RawClient.open(gateway, token=make_token("alice"))
    reply = await typing(alice, "room/6")
    assert reply.error.code == ErrorCode.NOT_SUBSCRIBED
    await alice.subscribe("chat/1")
    reply = await typing(alice, "chat/1")
    assert reply.error.code == ErrorCode.NOT_AVAILABLE
    assert "typing indicators are not enabled" in reply.error.message
    reply = await typing(alice, "room/#")
    assert reply.error.code == ErrorCode.BAD_CHANNEL
    # Stopping when not typing is fine and tells nobody.
    await alice.subscribe("room/6")
    assert not (await typing(alice, "room/6", active=False)).HasField("error")


async def test_typing_flood_is_rate_limited_then_closed(gateway: Gateway) -> None:
    alice, bob, _ = await room(gateway, "room/7")
    # Far more typing commands than the command rate allows, in one go.
    for _ in range(200):
        await alice.send(typing=pb.TypingRequest(channel="room/7", active=True))
    code, _ = await alice.wait_closed()
    assert code == CloseCode.FLOOD
    # bob saw one typing event (the throttle), and is still fine.
    assert (await typing_push(bob)).user == "alice"
    assert (await bob.request(ping=pb.PingRequest())).HasField("ping")


# A typing_timeout far beyond the waits below: a stop that arrives came from the
# disconnect, not from the expiry. The long throttle keeps renewals from being forwarded.
GONE_CONFIG = merge(
    TYPING_CONFIG,
    {"namespaces": {"room": {"typing_timeout": 30.0, "typing_throttle": 10.0}}},
)


async def test_typing_ends_when_the_typist_disconnects(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(**GONE_CONFIG)
    alice, bob, carol = await room(gateway, "room/8")
    await typing(alice, "room/8")
    for receiver in (bob, carol):
        assert (await typing_push(receiver)).active
    await alice.close()  # the socket closes, no typing=false before
    for receiver in (bob, carol):
        event = await typing_push(receiver, timeout=5.0)
        assert (event.user, event.active) == ("alice", False)
    # It ended as an explicit stop would: alice typing again (a new connection, within
    # the throttle) is forwarded at once.
    again = await RawClient.open(gateway, token=make_token("alice"))
    await again.subscribe("room/8")
    assert not (await typing(again, "room/8")).typing.throttled
    assert (await typing_push(bob)).active
    for client in (again, bob, carol):
        await client.close()


async def test_typing_ends_when_the_typist_is_kicked(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(**GONE_CONFIG)
    alice, bob, _ = await room(gateway, "room/9")
    await typing(alice, "room/9")
    assert (await typing_push(bob)).active
    status, _ = await api_post(gateway, "disconnect", {"user": "alice", "reconnect": False})
    assert status == 200
    event = await typing_push(bob, timeout=5.0)
    assert (event.user, event.active) == ("alice", False)
    assert (await alice.wait_closed())[0] == CloseCode.FORBIDDEN


async def test_typing_stays_while_another_connection_of_the_user_types(
    make_gateway: GatewayFactory,
) -> None:
    """Typing is per user and channel: a connection of the user that goes away ends it
    only when none of the user's other connections is typing there."""
    gateway = await make_gateway(**GONE_CONFIG)
    node = gateway.node
    laptop, bob, _ = await room(gateway, "room/10")
    phone = await RawClient.open(gateway, token=make_token("alice"))
    idle = await RawClient.open(gateway, token=make_token("alice"))
    for client in (phone, idle):
        await client.subscribe("room/10")
    assert not (await typing(laptop, "room/10")).typing.throttled
    assert (await typing_push(bob)).active
    assert (await typing(phone, "room/10")).typing.throttled  # typing, not forwarded

    async def close(client: RawClient) -> None:
        count = len(node.sessions)
        await client.close()
        while len(node.sessions) != count - 1:  # the node let the session go
            await asyncio.sleep(0.01)

    await close(idle)  # never typed
    assert await no_typing_push(bob, 0.5)
    await close(laptop)  # typed, but the phone still does
    assert await no_typing_push(bob, 0.5)
    await close(phone)  # the last typist
    event = await typing_push(bob, timeout=5.0)
    assert (event.user, event.active) == ("alice", False)
    await bob.close()


async def test_typing_ends_across_nodes_when_the_typist_disconnects(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    config = merge(GONE_CONFIG, cluster_config(redis_server.url, f"ty{secrets.token_hex(4)}"))
    one = await make_gateway(**config)
    two = await make_gateway(**config)
    alice = await RawClient.open(one, token=make_token("alice"))
    bob = await RawClient.open(two, token=make_token("bob"))
    await alice.subscribe("room/11")
    await bob.subscribe("room/11")
    assert not (await typing(alice, "room/11")).typing.throttled
    assert (await typing_push(bob)).active  # through Redis
    await alice.close()
    event = await typing_push(bob, timeout=5.0)
    assert (event.user, event.active) == ("alice", False)
    await bob.close()

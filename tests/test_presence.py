"""Presence, join/leave pushes and user status over real WebSocket connections."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from realtime.app import Gateway
from realtime.brokers.memory import MemoryBroker
from realtime.core.broker import JOIN, LEAVE, ChannelEvent, PresenceEntry, Publication
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codec import JSON
from realtime.protocol.codes import ErrorCode
from tests.conftest import GatewayFactory, RawClient, api_post, make_token, ws_url

PRESENCE_CONFIG: dict[str, Any] = {
    "namespaces": {
        "room": {"presence": True, "join_leave": True},
        "quiet": {"presence": True},  # presence without join/leave pushes
        "chat": {"history_size": 50},  # no presence
    },
    "presence": {"ttl": 6.0, "max_users_per_query": 3},
}


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(**PRESENCE_CONFIG)


async def presence(client: RawClient, channel: str) -> dict[str, pb.ClientInfo]:
    reply = await client.request(presence=pb.PresenceRequest(channel=channel))
    assert not reply.HasField("error"), reply.error
    return dict(reply.presence.clients)


async def next_event(client: RawClient, kind: str, timeout: float = 5.0) -> pb.ClientInfo:
    while True:
        push = await client.push(timeout)
        if push.HasField(kind):
            info: pb.ClientInfo = getattr(push, kind)
            return info


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_presence_lists_clients_with_token_info(gateway: Gateway) -> None:
    alice = await RawClient.open(
        gateway, token=make_token("alice", device="phone-1", info={"name": "Alice"})
    )
    bob = await RawClient.open(gateway, token=make_token("bob"))
    await alice.subscribe("room/1")
    await bob.subscribe("room/1")
    clients = await presence(bob, "room/1")
    assert len(clients) == 2
    by_user = {info.user: info for info in clients.values()}
    assert by_user["alice"].device == "phone-1"
    assert json.loads(by_user["alice"].info) == {"name": "Alice"}
    assert by_user["alice"].transport == "websocket"
    assert all(client == info.client for client, info in clients.items())
    stats = await bob.request(presence_stats=pb.PresenceStatsRequest(channel="room/1"))
    assert (stats.presence_stats.clients, stats.presence_stats.users) == (2, 2)
    # A second connection of the same user: three clients, two users.
    alice2 = await RawClient.open(gateway, token=make_token("alice"))
    await alice2.subscribe("room/1")
    stats = await bob.request(presence_stats=pb.PresenceStatsRequest(channel="room/1"))
    assert (stats.presence_stats.clients, stats.presence_stats.users) == (3, 2)
    for client in (alice, bob, alice2):
        await client.close()


async def test_presence_in_json_shows_info_as_a_json_value(gateway: Gateway) -> None:
    token = make_token("alice", info={"a": 1})
    async with connect(ws_url(gateway), subprotocols=[Subprotocol(JSON.name)]) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
        await ws.send(json.dumps({"id": 2, "subscribe": {"channel": "room/json"}}))
        await ws.send(json.dumps({"id": 3, "presence": {"channel": "room/json"}}))
        while True:
            reply = json.loads(await ws.recv())
            if reply.get("id") == 3:
                break
    (info,) = reply["presence"]["clients"].values()
    assert info["info"] == {"a": 1} and info["user"] == "alice"


async def test_join_and_leave_pushes(gateway: Gateway) -> None:
    watcher = await RawClient.open(gateway, token=make_token("watcher"))
    await watcher.subscribe("room/2")
    alice = await RawClient.open(gateway, token=make_token("alice"))
    await alice.subscribe("room/2")
    joined = await next_event(watcher, "join")
    assert joined.user == "alice"
    # Unsubscribe is a leave.
    await alice.request(unsubscribe=pb.UnsubscribeRequest(channel="room/2"))
    left = await next_event(watcher, "leave")
    assert (left.user, left.client) == ("alice", joined.client)
    # A clean close is a leave.
    bob = await RawClient.open(gateway, token=make_token("bob"))
    await bob.subscribe("room/2")
    assert (await next_event(watcher, "join")).user == "bob"
    await bob.close()
    assert (await next_event(watcher, "leave")).user == "bob"
    assert [i.user for i in (await presence(watcher, "room/2")).values()] == ["watcher"]
    await alice.close()
    await watcher.close()


async def test_unclean_disconnect_leaves_presence(gateway: Gateway) -> None:
    watcher = await RawClient.open(gateway, token=make_token("watcher"))
    await watcher.subscribe("room/3")
    alice = await RawClient.open(gateway, token=make_token("alice"))
    await alice.subscribe("room/3")
    await next_event(watcher, "join")
    # No close frame, no FIN handshake: the socket is reset.
    transport = alice.ws.transport
    transport.abort()
    left = await next_event(watcher, "leave")
    assert left.user == "alice"
    assert [i.user for i in (await presence(watcher, "room/3")).values()] == ["watcher"]
    await watcher.close()


async def test_a_silent_client_leaves_when_its_pings_go_unanswered(
    make_gateway: GatewayFactory,
) -> None:
    """A client that vanished without a trace (no FIN, no RST): the node's liveness check
    ends it, and it leaves presence."""
    gateway = await make_gateway(**PRESENCE_CONFIG, client={"ping_interval": 1, "pong_timeout": 1})
    watcher = await RawClient.open(gateway, token=make_token("watcher"))
    await watcher.subscribe("room/silent")
    ghost = await RawClient.open(gateway, token=make_token("ghost"))
    await ghost.subscribe("room/silent")
    assert (await next_event(watcher, "join")).user == "ghost"
    ghost._reader.cancel()  # reads nothing more, answers no ping: as if its network died
    while True:  # the watcher answers its pings and stays
        push = await watcher.push(timeout=8, pings=True)
        if push.HasField("ping"):
            await watcher.send(id=0, ping=pb.PingRequest())
        elif push.HasField("leave"):
            assert push.leave.user == "ghost"
            break
    assert [i.user for i in (await presence(watcher, "room/silent")).values()] == ["watcher"]
    await watcher.close()


async def test_no_join_leave_pushes_unless_enabled(gateway: Gateway) -> None:
    watcher = await RawClient.open(gateway, token=make_token("watcher"))
    await watcher.subscribe("quiet/1")
    alice = await RawClient.open(gateway, token=make_token("alice"))
    await alice.subscribe("quiet/1")
    assert len(await presence(watcher, "quiet/1")) == 2
    await alice.close()
    await wait_until(lambda: _count(watcher, "quiet/1", 1))
    assert watcher.unexpected_pushes() == []
    await watcher.close()


async def _count(client: RawClient, channel: str, expected: int) -> bool:
    return len(await presence(client, channel)) == expected


async def test_presence_errors(gateway: Gateway) -> None:
    limited = await RawClient.open(gateway, token=make_token("eve", subscribe=["room/open"]))
    # Namespace without presence.
    reply = await limited.request(presence=pb.PresenceRequest(channel="chat/1"))
    assert reply.error.code == ErrorCode.NOT_AVAILABLE
    assert "presence is not enabled" in reply.error.message
    # No subscribe permission on the channel.
    reply = await limited.request(presence=pb.PresenceRequest(channel="room/secret"))
    assert reply.error.code == ErrorCode.PERMISSION_DENIED
    reply = await limited.request(presence_stats=pb.PresenceStatsRequest(channel="room/secret"))
    assert reply.error.code == ErrorCode.PERMISSION_DENIED
    # A bad channel name.
    reply = await limited.request(presence=pb.PresenceRequest(channel="room/+"))
    assert reply.error.code == ErrorCode.BAD_CHANNEL
    # Allowed: empty, but fine.
    assert await presence(limited, "room/open") == {}
    # The connection is still usable.
    assert (await limited.request(ping=pb.PingRequest())).HasField("ping")
    await limited.close()


async def test_user_status(gateway: Gateway) -> None:
    asker = await RawClient.open(gateway, token=make_token("asker"))
    alice = await RawClient.open(gateway, token=make_token("alice"))
    before = int(time.time())

    async def status(*users: str) -> list[pb.UserStatus]:
        reply = await asker.request(user_status=pb.UserStatusRequest(users=list(users)))
        assert not reply.HasField("error"), reply.error
        return list(reply.user_status.statuses)

    async def alice_online() -> bool:
        return (await status("alice"))[0].online

    await wait_until(alice_online)
    statuses = await status("alice", "nobody")
    assert [(s.user, s.online) for s in statuses] == [("alice", True), ("nobody", False)]
    assert statuses[0].last_seen >= before and statuses[1].last_seen == 0
    # Two connections: online until the last one goes.
    alice2 = await RawClient.open(gateway, token=make_token("alice"))
    await alice.close()
    await asyncio.sleep(0.1)
    assert await alice_online()
    await alice2.close()

    async def alice_offline() -> bool:
        return not await alice_online()

    await wait_until(alice_offline)
    (gone,) = await status("alice")
    assert before <= gone.last_seen <= time.time() + 1
    # Limits and bad input.
    reply = await asker.request(user_status=pb.UserStatusRequest(users=["a", "b", "c", "d"]))
    assert reply.error.code == ErrorCode.LIMIT_EXCEEDED
    reply = await asker.request(user_status=pb.UserStatusRequest(users=[]))
    assert reply.error.code == ErrorCode.BAD_REQUEST
    reply = await asker.request(user_status=pb.UserStatusRequest(users=[""]))
    assert reply.error.code == ErrorCode.BAD_REQUEST
    await asker.close()


async def test_user_status_in_json(gateway: Gateway) -> None:
    token = make_token("alice")
    async with connect(ws_url(gateway), subprotocols=[Subprotocol(JSON.name)]) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
        await ws.send(json.dumps({"id": 2, "user_status": {"users": ["alice", "zed"]}}))
        while (reply := json.loads(await ws.recv())).get("id") != 2:
            pass
        statuses = reply["user_status"]["statuses"]
        assert [(s["user"], s.get("online", False)) for s in statuses] == [
            ("alice", True),
            ("zed", False),
        ]
        # A string where the list goes: a malformed command, and the reason says where.
        await ws.send(json.dumps({"id": 3, "user_status": {"users": "alice"}}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 3501
    assert "command.user_status.users: expected a list" in closed.value.rcvd.reason


async def test_user_status_can_be_reserved_for_the_server_api(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(presence={"user_status": "none"})
    asker = await RawClient.open(gateway, token=make_token("asker"))
    reply = await asker.request(user_status=pb.UserStatusRequest(users=["asker"]))
    assert reply.error.code == ErrorCode.PERMISSION_DENIED
    status, body = await api_post(gateway, "user_status", {"users": ["asker"]})
    assert status == 200 and body["statuses"][0]["user"] == "asker"
    await asker.close()


async def test_server_api_presence(gateway: Gateway) -> None:
    alice = await RawClient.open(gateway, token=make_token("alice", info={"n": 1}))
    await alice.subscribe("room/api")
    status, body = await api_post(gateway, "presence", {"channel": "room/api"})
    assert status == 200
    (info,) = body["clients"].values()
    assert info["user"] == "alice" and info["info"] == {"n": 1}
    assert info["transport"] == "websocket"
    status, body = await api_post(gateway, "presence_stats", {"channel": "room/api"})
    assert (status, body) == (200, {"clients": 1, "users": 1})
    status, body = await api_post(gateway, "presence", {"channel": "chat/1"})
    assert status == 409 and body["error"]["code"] == "not_available"
    status, body = await api_post(gateway, "presence", {"channel": 5})
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, body = await api_post(gateway, "user_status", {"users": "alice"})
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, body = await api_post(gateway, "user_status", {"users": ["alice"]})
    assert status == 200 and body["statuses"][0]["online"] is True
    await alice.close()


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, ChannelEvent]] = []

    def handle_publication(self, channel: str, pub: Publication) -> None:
        pass

    def handle_event(self, channel: str, event: ChannelEvent) -> None:
        self.events.append((channel, event))


async def test_memory_broker_expires_entries_that_are_not_refreshed() -> None:
    """The TTL path: a node that stops refreshing (it died) loses its entries, with a
    leave event for each. Across processes this is what the Redis broker relies on."""
    broker = MemoryBroker()
    recorder = _Recorder()
    await broker.start(recorder)
    await broker.subscribe("room/ttl")
    entry = PresenceEntry("c1", "alice")
    assert await broker.add_presence("room/ttl", entry, ttl=0.2) is True
    assert await broker.add_presence("room/ttl", entry, ttl=0.2) is False  # a refresh
    await broker.add_presence("room/ttl", PresenceEntry("c2", "bob"), ttl=30)
    await broker.set_users_online(["alice"], ttl=0.2, last_seen_ttl=60)
    await asyncio.sleep(0.3)
    assert set(await broker.presence("room/ttl")) == {"c2"}  # expired even before cleanup
    await broker.housekeeping(0)
    assert [(c, e.kind, e.entry.client) for c, e in recorder.events] == [("room/ttl", LEAVE, "c1")]
    (status,) = await broker.user_status(["alice"])
    assert not status.online and status.last_seen > 0
    # Removing an entry that had expired is not a leave (it was announced already).
    assert await broker.remove_presence("room/ttl", "c1") is False
    assert await broker.remove_presence("room/ttl", "c2") is True
    await broker.publish_event("room/ttl", ChannelEvent(JOIN, entry))
    assert recorder.events[-1][1].kind == JOIN
    await broker.publish_event("elsewhere", ChannelEvent(JOIN, entry))  # not subscribed
    assert len(recorder.events) == 2


async def test_join_leave_stop_above_the_subscriber_limit(make_gateway: GatewayFactory) -> None:
    """Past join_leave_max_subscribers on the node, joins are no longer pushed to everyone
    (N^2 pushes in a big room); presence queries still answer."""
    gateway = await make_gateway(
        namespaces={"room": {"presence": True, "join_leave": True, "join_leave_max_subscribers": 3}}
    )
    watcher = await RawClient.open(gateway, token=make_token("watcher"))
    await watcher.subscribe("room/big")
    joined: list[str] = []
    others: list[RawClient] = []
    for n in range(4):
        other = await RawClient.open(gateway, token=make_token(f"user-{n}"))
        others.append(other)
        await other.subscribe("room/big")
        if n < 2:  # 2 and 3 subscribers: below the limit, the join is pushed
            joined.append((await next_event(watcher, "join")).user)
    assert joined == ["user-0", "user-1"]
    assert len(await presence(watcher, "room/big")) == 5
    await asyncio.sleep(0.3)
    assert watcher.unexpected_pushes() == []  # the 4th and 5th subscribers' joins were not
    assert gateway.node.metrics.channel_events["join_leave_over_limit"] == 2
    for client in [watcher, *others]:
        await client.close()

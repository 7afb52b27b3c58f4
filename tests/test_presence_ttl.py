"""The TTL path of presence, for real: a gateway process dies without cleaning up (SIGKILL),
and within `presence.ttl` seconds its client leaves the presence list another gateway
serves, with a leave push. Two gateways share a real redis-server."""

from __future__ import annotations

import secrets
from typing import Any

from realtime.app import Gateway
from tests.conftest import GatewayFactory, RawClient, make_token
from tests.gateway_process import start_gateway_process
from tests.redis_server import RedisServer
from tests.test_presence import next_event, presence

TTL = 3.0


def shared_config(redis_url: str, prefix: str) -> dict[str, Any]:
    return {
        "broker": {"type": "redis", "redis_urls": [redis_url], "key_prefix": prefix},
        "presence": {"ttl": TTL},
        "namespaces": {"room": {"presence": True, "join_leave": True}},
    }


async def test_a_dead_node_s_clients_leave_presence(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    prefix = "ttl" + secrets.token_hex(4)
    survivor: Gateway = await make_gateway(**shared_config(redis_server.url, prefix))
    node = await start_gateway_process(
        redis_server.url,
        prefix,
        REALTIME_PRESENCE__TTL=str(TTL),
        REALTIME_NAMESPACES__ROOM__PRESENCE="true",
        REALTIME_NAMESPACES__ROOM__JOIN_LEAVE="true",
    )
    try:
        watcher = await RawClient.open(survivor, token=make_token("watcher"))
        await watcher.subscribe("room/ttl")
        # A client of the other node joins; the watcher hears of it across nodes.
        doomed_gateway = _PortOnly(node.ws_port)
        doomed = await RawClient.open(doomed_gateway, token=make_token("doomed"))  # type: ignore[arg-type]
        await doomed.subscribe("room/ttl")
        joined = await next_event(watcher, "join")
        assert joined.user == "doomed"
        assert {i.user for i in (await presence(watcher, "room/ttl")).values()} == {
            "watcher",
            "doomed",
        }
        # The node dies without a word: no leave is sent, no entry removed.
        await node.kill()
        # Its entry expires (ttl) and the survivor's housekeeping announces the leave.
        left = await next_event(watcher, "leave", timeout=TTL + 5)
        assert (left.user, left.client) == ("doomed", joined.client)
        assert [i.user for i in (await presence(watcher, "room/ttl")).values()] == ["watcher"]
        await watcher.close()
    finally:
        await node.kill()


class _PortOnly:
    """Enough of a Gateway for RawClient.open: where its WebSocket listener is."""

    def __init__(self, port: int) -> None:
        self.websocket = type("Listener", (), {"port": port})()


async def test_users_coming_online_together_take_one_broker_call(
    make_gateway: GatewayFactory, redis_server: RedisServer, monkeypatch: Any
) -> None:
    """A reconnect storm: the online marks of users connecting together go to Redis in
    one call (not one per user), and every one of them is online for the other nodes."""
    prefix = "storm" + secrets.token_hex(4)
    one: Gateway = await make_gateway(**shared_config(redis_server.url, prefix))
    two: Gateway = await make_gateway(**shared_config(redis_server.url, prefix))
    broker = one.node.broker
    calls: list[list[str]] = []
    real = broker.set_users_online

    async def counted(users: list[str], ttl: float, last_seen_ttl: float) -> None:
        calls.append(list(users))
        await real(users, ttl, last_seen_ttl)

    monkeypatch.setattr(broker, "set_users_online", counted)
    tracker = one.node.presence
    users = [f"storm-{n}" for n in range(100)]
    for user in users:
        tracker.user_connected(user)
    tracker.user_disconnected("storm-7")  # gone again before the marks were written
    await tracker.flush()
    assert calls == [[u for u in users if u != "storm-7"]]
    statuses = await two.node.broker.user_status(users)
    assert [s.user for s in statuses if s.online] == [u for u in users if u != "storm-7"]

"""A cluster for real (issue #5): `realtime serve` processes on a real `redis-server`, with
WebSocket clients (the project's Python client), MQTT devices (paho-mqtt) and the server
API on different nodes.

- publications cross nodes whichever way they enter (device, WebSocket client, server API);
- presence and user status are the same seen from every node;
- nodes list each other with their load; a user is disconnected everywhere at once;
- a device's persistent session is resumed on another node: subscriptions, the messages
  queued while it was away, also after the node that held it was killed; a connected
  device is taken over across nodes; another user's client id is refused everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import paho.mqtt.client as paho
import pytest

from realtime.client import Client
from tests.conftest import make_token
from tests.gateway_process import GatewayProcess, start_gateway_process
from tests.test_cluster_faults import ApiConnection
from tests.test_mqtt import Device

MQTT = {
    "REALTIME_MQTT__ENABLED": "true",
    "REALTIME_NAMESPACES__ROOMS__HISTORY_SIZE": "100",
    "REALTIME_NAMESPACES__ROOMS__PRESENCE": "true",
    "REALTIME_NAMESPACES__ROOMS__PUBLISH": "token",
    "REALTIME_BROKER__NODE_ANNOUNCE_INTERVAL": "1",
    "REALTIME_BROKER__NODE_TTL": "3",
}
WAIT = 20.0


@pytest.fixture
async def nodes(make_redis_server: Any) -> AsyncIterator[list[GatewayProcess]]:
    """Two nodes (a, b) on one redis-server; a test may start a third itself."""
    redis = make_redis_server()
    prefix = "t" + secrets.token_hex(3)
    started = [await start_gateway_process(redis.url, prefix, name, **MQTT) for name in "ab"]
    started[0].redis_url, started[0].prefix = redis.url, prefix  # type: ignore[attr-defined]
    yield started
    for node in started:
        await node.kill()


@pytest.fixture
async def devices() -> AsyncIterator[list[Device]]:
    made: list[Device] = []
    yield made
    for device in made:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(device.stop)


async def api(node: GatewayProcess, endpoint: str, body: Any) -> dict[str, Any]:
    connection = ApiConnection(node.api_port)
    try:
        status, answer = await connection.post(endpoint, body)
    finally:
        connection.close()
    assert status == 200, answer
    return answer


async def eventually(check: Any, timeout: float = WAIT) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


def device_token(user: str = "device", topics: str = "rooms/#") -> str:
    return make_token(user, subscribe=[topics], publish=[topics])


async def connect(
    devices: list[Device],
    node: GatewayProcess,
    client_id: str,
    *,
    v5: bool = False,
    clean: bool = True,
    user: str = "device",
) -> Device:
    device = Device(node.mqtt_port, client_id, v5=v5, clean=clean, session_expiry=300)
    devices.append(device)
    code = await device.connect(device_token(user))
    assert code == 0
    return device


async def stop(device: Device, devices: list[Device]) -> None:
    await asyncio.to_thread(device.stop)
    devices.remove(device)


# ----------------------------------------------------------------------------- across nodes


async def test_publications_presence_and_status_cross_nodes(
    nodes: list[GatewayProcess], devices: list[Device]
) -> None:
    a, b = nodes
    device = await connect(devices, a, "sensor-1")
    assert await device.subscribe("rooms/lobby", 1) == [1]
    client = Client(b.url, token=make_token("alice", subscribe=["rooms/#"], publish=["rooms/#"]))
    await client.connect()
    try:
        sub = await client.subscribe("rooms/lobby")
        # Through b's server API, a's device, and b's own client: everyone gets all three.
        await api(b, "publish", {"channel": "rooms/lobby", "data": {"from": "api"}})
        device.client.publish("rooms/lobby", b'{"from": "device"}', qos=1)
        await client.publish("rooms/lobby", b"{\"from\":\"websocket\"}")
        received = [await device.message() for _ in range(3)]
        assert sorted(m.payload for m in received) == sorted(
            [b'{"from":"api"}', b'{"from": "device"}', b'{"from":"websocket"}']
        )
        got = [await sub.get(WAIT) for _ in range(3)]
        assert [p.offset for p in got] == [1, 2, 3]  # one stream, one order

        # Presence: the device (exact topic) and the WebSocket client, from either node.
        for node in (a, b):
            present = await api(node, "presence", {"channel": "rooms/lobby"})
            users = sorted(entry["user"] for entry in present["clients"].values())
            assert users == ["alice", "device"], (node, present)
            status = await api(node, "user_status", {"users": ["alice", "device", "nobody"]})
            assert [s["online"] for s in status["statuses"]] == [True, True, False]
    finally:
        await client.close()


async def test_nodes_list_with_load_and_disconnect_everywhere(
    nodes: list[GatewayProcess], devices: list[Device]
) -> None:
    a, b = nodes
    bob_ws = Client(b.url, token=make_token("bob"))
    await bob_ws.connect()
    closed = asyncio.Event()
    bob_ws.on_disconnect = lambda code, reason, reconnecting: closed.set()
    bob_device = await connect(devices, a, "bob-phone", user="bob")

    async def both_listed() -> list[dict[str, Any]] | None:
        listed: list[dict[str, Any]] = (await api(a, "nodes", {}))["nodes"]
        loaded = [n for n in listed if n["connections"] + n["mqtt_connections"] > 0]
        return listed if len(listed) == 2 and len(loaded) == 2 else None

    listed = await eventually(both_listed)
    assert sorted(n["name"] for n in listed) == ["a", "b"]
    by_name = {n["name"]: n for n in listed}
    assert by_name["a"]["mqtt_connections"] == 1 and by_name["b"]["connections"] >= 1
    assert all(n["rss_bytes"] > 0 and n["uptime"] >= 0 for n in listed)

    answer = await api(a, "disconnect", {"user": "bob", "reason": "account closed"})
    assert answer == {"disconnected": 2, "nodes": 2, "unanswered": []}
    kind, _ = await bob_device.event()
    assert kind == "disconnect"
    await asyncio.wait_for(closed.wait(), WAIT)
    await bob_ws.close()

    # A node that is gone leaves the list within node_ttl; the others answer without it.
    await b.kill()

    async def only_a() -> bool:
        names = [n["name"] for n in (await api(a, "nodes", {}))["nodes"]]
        return names == ["a"]

    await eventually(only_a)
    answer = await api(a, "disconnect", {"user": "nobody"})
    assert answer == {"disconnected": 0, "nodes": 1, "unanswered": []}


# ----------------------------------------------------------------------------- MQTT sessions


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
async def test_persistent_session_resumes_on_another_node(
    nodes: list[GatewayProcess], devices: list[Device], v5: bool
) -> None:
    a, b = nodes
    device = await connect(devices, a, "meter-7", v5=v5, clean=False)
    assert device.session_present is False
    assert await device.subscribe("rooms/meter-7/#", 1) == [1]
    await stop(device, devices)
    # Away: publications queue in the session (on a, and in Redis for any node).
    for i in range(3):
        await api(b, "publish", {"channel": f"rooms/meter-7/cmd{i}", "data": {"n": i}})
    await asyncio.sleep(0.3)
    back = await connect(devices, b, "meter-7", v5=v5, clean=False)
    assert back.session_present is True
    queued = [await back.message() for _ in range(3)]
    assert [m.topic for m in queued] == [f"rooms/meter-7/cmd{i}" for i in range(3)]
    assert all(m.qos == 1 for m in queued)
    # The subscription came along: live publications through either node arrive on b.
    await api(a, "publish", {"channel": "rooms/meter-7/cmd3", "data": {"n": 3}})
    assert (await back.message()).topic == "rooms/meter-7/cmd3"
    assert await back.nothing_more()
    # a let go of it: nothing is queued there any more (no double delivery later).
    await stop(back, devices)
    await api(b, "publish", {"channel": "rooms/meter-7/cmd4", "data": {"n": 4}})
    await asyncio.sleep(0.3)
    again = await connect(devices, a, "meter-7", v5=v5, clean=False)
    assert again.session_present is True
    assert (await again.message()).topic == "rooms/meter-7/cmd4"
    assert await again.nothing_more()


async def test_connected_device_is_taken_over_across_nodes(
    nodes: list[GatewayProcess], devices: list[Device]
) -> None:
    a, b = nodes
    first = await connect(devices, a, "cam-3", clean=False)
    assert await first.subscribe("rooms/cam-3", 1) == [1]
    second = await connect(devices, b, "cam-3", clean=False)
    assert second.session_present is True
    kind, _ = await first.event()
    assert kind == "disconnect"  # a closed the old connection
    first.client.reconnect_delay_set(60, 120)  # paho must not fight for the id
    await api(a, "publish", {"channel": "rooms/cam-3", "data": "x"})
    assert (await second.message()).payload == b'"x"'
    assert await first.nothing_more()


async def test_session_resumes_after_its_node_was_killed(
    nodes: list[GatewayProcess], devices: list[Device]
) -> None:
    a, b = nodes
    device = await connect(devices, a, "tracker-9", clean=False)
    assert await device.subscribe("rooms/tracker-9/+", 1) == [1]
    await stop(device, devices)
    for i in range(2):
        await api(b, "publish", {"channel": f"rooms/tracker-9/m{i}", "data": i})
    await asyncio.sleep(0.5)  # written to Redis within a fraction of a second
    await a.kill()  # the node that held the session dies without a word
    back = await connect(devices, b, "tracker-9", clean=False)
    assert back.session_present is True
    assert [(await back.message()).topic for _ in range(2)] == [
        "rooms/tracker-9/m0",
        "rooms/tracker-9/m1",
    ]
    await api(b, "publish", {"channel": "rooms/tracker-9/m2", "data": 2})
    assert (await back.message()).topic == "rooms/tracker-9/m2"


async def test_another_users_client_id_is_refused_on_every_node(
    nodes: list[GatewayProcess], devices: list[Device]
) -> None:
    a, b = nodes
    await connect(devices, a, "shared-id", clean=False, user="owner")
    thief = Device(b.mqtt_port, "shared-id")
    devices.append(thief)
    code = await thief.connect(device_token("thief"))
    assert code != 0  # identifier rejected: the owner's session stays untouched
    assert code == paho.CONNACK_REFUSED_IDENTIFIER_REJECTED or "identifier" in str(code).lower()

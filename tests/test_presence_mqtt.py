"""MQTT devices and WebSocket clients in one presence list, with MQTT clients others wrote
(paho-mqtt) and raw sockets for the ways a device can vanish."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from realtime.app import Gateway
from realtime.mqtt.codec import PacketDecoder, encode
from realtime.mqtt.packets import (
    MQTT_3_1_1,
    ConnAck,
    Connect,
    SubAck,
    Subscribe,
    SubscriptionOptions,
)
from realtime.protocol import realtime_pb2 as pb
from tests.conftest import GatewayFactory, RawClient, make_token, publish
from tests.test_mqtt import Device, raw_device
from tests.test_presence import next_event, presence, wait_until

CONFIG: dict[str, Any] = {
    "mqtt": {"enabled": True, "host": "127.0.0.1", "port": 0},
    "namespaces": {"room": {"presence": True, "join_leave": True, "typing": True}},
}


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(**CONFIG)


@pytest.fixture
async def devices() -> Any:
    made: list[Device] = []
    yield made
    for device in made:
        await asyncio.to_thread(device.stop)


async def watcher(gateway: Gateway, channel: str) -> RawClient:
    client = await RawClient.open(gateway, token=make_token("watcher"))
    await client.subscribe(channel)
    return client


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
async def test_devices_and_apps_share_one_presence_list(
    gateway: Gateway, devices: list[Device], v5: bool
) -> None:
    app = await watcher(gateway, "room/1")
    device = Device(gateway, "sensor-1", v5=v5)
    devices.append(device)
    await device.connect(token=make_token("dev-user", device="sensor-hw-1"))
    assert await device.subscribe("room/1", qos=1) == [1]
    joined = await next_event(app, "join")
    assert (joined.client, joined.user, joined.transport) == ("sensor-1", "dev-user", "mqtt")
    assert joined.device == "sensor-hw-1"
    clients = await presence(app, "room/1")
    assert {(c, i.transport) for c, i in clients.items()} == {
        ("sensor-1", "mqtt"),
        (next(c for c, i in clients.items() if i.user == "watcher"), "websocket"),
    }
    stats = await app.request(presence_stats=pb.PresenceStatsRequest(channel="room/1"))
    assert (stats.presence_stats.clients, stats.presence_stats.users) == (2, 2)
    # A wildcard subscription makes a device present nowhere.
    assert await device.subscribe("room/+", qos=0) == [0]
    assert len(await presence(app, "room/1")) == 2
    # Unsubscribe is a leave.
    device.client.unsubscribe("room/1")
    left = await next_event(app, "leave")
    assert left.client == "sensor-1"
    # The user is online while the device is connected.
    reply = await app.request(user_status=pb.UserStatusRequest(users=["dev-user"]))
    assert reply.user_status.statuses[0].online


async def test_a_clean_disconnect_is_a_leave(gateway: Gateway, devices: list[Device]) -> None:
    app = await watcher(gateway, "room/2")
    device = Device(gateway, "sensor-2")
    await device.connect(token=make_token("dev-user"))
    await device.subscribe("room/2")
    assert (await next_event(app, "join")).client == "sensor-2"
    await asyncio.to_thread(device.stop)
    assert (await next_event(app, "leave")).client == "sensor-2"
    assert [i.user for i in (await presence(app, "room/2")).values()] == ["watcher"]

    async def offline() -> bool:
        reply = await app.request(user_status=pb.UserStatusRequest(users=["dev-user"]))
        status = reply.user_status.statuses[0]
        return not status.online and status.last_seen > 0

    await wait_until(offline)


async def connect_raw(gateway: Gateway, client_id: str, keep_alive: int) -> Any:
    reader, writer = await raw_device(gateway)
    token = make_token(client_id).encode()
    packet = Connect(client_id, keep_alive=keep_alive, username=client_id, password=token)
    writer.write(encode(packet, MQTT_3_1_1))
    writer.write(encode(Subscribe(1, [("room/3", SubscriptionOptions(qos=0))]), MQTT_3_1_1))
    decoder = PacketDecoder(MQTT_3_1_1, server=False)
    packets: list[Any] = []
    while len(packets) < 2:  # CONNACK, SUBACK
        packets.extend(decoder.feed(await asyncio.wait_for(reader.read(4096), 5)))
    assert isinstance(packets[0], ConnAck) and isinstance(packets[1], SubAck)
    return reader, writer


async def test_a_dropped_connection_is_a_leave(gateway: Gateway) -> None:
    app = await watcher(gateway, "room/3")
    _, writer = await connect_raw(gateway, "sensor-3", keep_alive=60)
    assert (await next_event(app, "join")).client == "sensor-3"
    writer.transport.abort()  # no DISCONNECT
    assert (await next_event(app, "leave")).client == "sensor-3"


async def test_keep_alive_expiry_is_a_leave(gateway: Gateway) -> None:
    app = await watcher(gateway, "room/3")
    _, writer = await connect_raw(gateway, "sensor-4", keep_alive=1)
    assert (await next_event(app, "join")).client == "sensor-4"
    # Silence: the gateway ends the session after 1.5 x keep-alive.
    assert (await next_event(app, "leave", timeout=6)).client == "sensor-4"
    writer.close()


async def test_devices_do_not_see_typing(gateway: Gateway, devices: list[Device]) -> None:
    alice = await watcher(gateway, "room/5")
    device = Device(gateway, "sensor-5")
    devices.append(device)
    await device.connect(token=make_token("dev-user"))
    await device.subscribe("room/5")
    reply = await alice.request(typing=pb.TypingRequest(channel="room/5", active=True))
    assert not reply.HasField("error")
    assert await device.nothing_more(0.5)


async def test_a_websocket_client_leaving_a_channel_keeps_the_device_on_it(
    gateway: Gateway, devices: list[Device]
) -> None:
    """The node subscribes the broker once per channel for both kinds of subscriber; the
    last of either kind to leave unsubscribes it, not the first."""
    app = await RawClient.open(gateway, token=make_token("app"))
    await app.subscribe("shared/1")
    device = Device(gateway, "sensor-6")
    devices.append(device)
    await device.connect(token=make_token("dev-user"))
    await device.subscribe("shared/1")
    await app.request(unsubscribe=pb.UnsubscribeRequest(channel="shared/1"))
    await publish(gateway, "shared/1", {"n": 1})
    assert (await device.message()).payload == b'{"n":1}'
    # And the other way round.
    await app.subscribe("shared/1")
    device.client.unsubscribe("shared/1")
    await asyncio.sleep(0.2)
    await publish(gateway, "shared/1", {"n": 2})
    assert (await app.publication()).pub.data == b'{"n":2}'

"""MQTT 5.0 features, one by one, with raw devices (packets from our codec) so each test
controls exactly what a device sends and checks exactly what it gets."""

from __future__ import annotations

import asyncio
import json

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from realtime.app import Gateway
from realtime.core.broker import Publication
from realtime.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
    ConnAck,
    Connect,
    Disconnect,
    Properties,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    SubscriptionOptions,
)

from .conftest import GatewayFactory, make_token, publish
from .test_mqtt_sessions import RawDevice

BASE = {"enabled": True, "host": "127.0.0.1", "port": 0}


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(mqtt=BASE)


async def connect(
    gateway: Gateway,
    client_id: str,
    props: Properties | None = None,
    *,
    keep_alive: int = 60,
    version: int = MQTT_5,
    token: str | None = "default",
) -> tuple[RawDevice, ConnAck]:
    device = RawDevice(gateway, version)
    device.reader, device.writer = await asyncio.open_connection("127.0.0.1", device.port)
    password = make_token(client_id).encode() if token == "default" else token
    device.send(
        Connect(
            client_id,
            keep_alive=keep_alive,
            username=client_id if password else None,
            password=password.encode() if isinstance(password, str) else password,
            properties=props,
        )
    )
    return device, await device.next(ConnAck)


async def test_request_response_and_user_properties_are_forwarded(gateway: Gateway) -> None:
    responder, _ = await connect(gateway, "responder")
    await responder.subscribe("svc/requests")
    requester, _ = await connect(gateway, "requester")
    props = Properties(
        response_topic="svc/replies/requester",
        correlation_data=b"\x01\x02",
        user_properties=[("trace", "abc"), ("trace", "def")],
        content_type="application/json",
        payload_format_indicator=1,
    )
    requester.send(Publish("svc/requests", b'{"q":1}', qos=1, packet_id=1, properties=props))
    assert (await requester.next(PubAck)).reason_code == 0
    got = await responder.next(Publish)
    assert got.properties.response_topic == "svc/replies/requester"
    assert got.properties.correlation_data == b"\x01\x02"
    assert got.properties.user_properties == [("trace", "abc"), ("trace", "def")]
    assert got.properties.content_type == "application/json"
    assert got.properties.payload_format_indicator == 1


async def test_payload_format_is_checked(gateway: Gateway) -> None:
    device, _ = await connect(gateway, "sender")
    bad = Properties(payload_format_indicator=1)
    device.send(Publish("t/1", b"\xff\xfe", qos=1, packet_id=3, properties=bad))
    assert (await device.next(PubAck)).reason_code == 0x99


async def test_subscription_identifier_no_local_retain_as_published(gateway: Gateway) -> None:
    device, _ = await connect(gateway, "opts")
    device.send(
        Subscribe(
            1,
            [("opts/own", SubscriptionOptions(qos=1, no_local=True))],
            Properties(subscription_identifiers=[7]),
        )
    )
    await device.next(SubAck)
    device.send(Subscribe(2, [("opts/rap", SubscriptionOptions(qos=1, retain_as_published=True))]))
    await device.next(SubAck)
    device.send(Publish("opts/own", b"mine", qos=1, packet_id=10))
    await device.next(PubAck)
    assert await device.quiet()  # no-local: not echoed back
    other, _ = await connect(gateway, "other")
    other.send(Publish("opts/own", b"theirs", qos=1, packet_id=11))
    other.send(Publish("opts/rap", b"kept", qos=1, packet_id=12, retain=True))
    got = await device.next(Publish)
    assert got.payload == b"theirs" and got.properties.subscription_identifiers == [7]
    kept = await device.next(Publish)
    assert kept.payload == b"kept" and kept.retain  # retain as published


async def test_retain_handling(gateway: Gateway) -> None:
    await gateway.node.broker.set_retained("rh/x", Publication(0, b"kept"))
    device, _ = await connect(gateway, "rh")
    device.send(Subscribe(1, [("rh/#", SubscriptionOptions(retain_handling=2))]))
    await device.next(SubAck)
    assert await device.quiet()  # 2: never
    device.send(Subscribe(2, [("rh/+", SubscriptionOptions(retain_handling=1))]))
    await device.next(SubAck)
    assert (await device.next(Publish)).retain  # 1: on a new subscription ...
    device.send(Subscribe(3, [("rh/+", SubscriptionOptions(retain_handling=1))]))
    await device.next(SubAck)
    assert await device.quiet()  # ... not when it already existed


async def test_receive_maximum_limits_unacknowledged_deliveries(gateway: Gateway) -> None:
    device, _ = await connect(gateway, "flow", Properties(receive_maximum=2))
    await device.subscribe("flow/#", qos=1)
    for i in range(4):
        await publish(gateway, f"flow/{i}", i)
    first, second = await device.next(Publish), await device.next(Publish)
    assert await device.quiet()  # the third waits for an acknowledgement
    device.send(PubAck(first.packet_id))
    third = await device.next(Publish)
    device.send(PubAck(second.packet_id))
    device.send(PubAck(third.packet_id))
    fourth = await device.next(Publish)
    assert [json.loads(p.payload) for p in (first, second, third, fourth)] == [0, 1, 2, 3]


async def test_maximum_packet_size_of_the_device(gateway: Gateway) -> None:
    device, _ = await connect(gateway, "tiny", Properties(maximum_packet_size=64))
    await device.subscribe("size/#", qos=0)
    await publish(gateway, "size/1", "x" * 200)  # too big for this device: not sent
    await publish(gateway, "size/1", "small")
    assert json.loads((await device.next(Publish)).payload) == "small"


async def test_inbound_topic_aliases(gateway: Gateway) -> None:
    watcher, _ = await connect(gateway, "alias-watcher")
    await watcher.subscribe("alias/#", qos=0)
    device, _ = await connect(gateway, "aliaser")
    device.send(Publish("alias/t", b"1", properties=Properties(topic_alias=1)))
    device.send(Publish("", b"2", properties=Properties(topic_alias=1)))
    got = [await watcher.next(Publish) for _ in range(2)]
    assert [(p.topic, p.payload) for p in got] == [("alias/t", b"1"), ("alias/t", b"2")]
    device.send(Publish("", b"3", properties=Properties(topic_alias=2)))
    assert (await device.next(Disconnect)).reason_code == 0x82  # an alias never set


async def test_oversized_packet_from_a_device(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(mqtt={**BASE, "max_packet_size": 512})
    device, ack = await connect(gateway, "big")
    assert ack.properties.maximum_packet_size == 512
    device.send(Publish("t/1", b"x" * 1000))
    assert (await device.next(Disconnect)).reason_code == 0x95


async def test_server_keep_alive(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(mqtt={**BASE, "max_keep_alive": 10})
    _, ack = await connect(gateway, "ka", keep_alive=100)
    assert ack.properties.server_keep_alive == 10


async def test_publish_rate_limit(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(mqtt={**BASE, "publishes_per_second": 1.0, "publish_burst": 2})
    device, _ = await connect(gateway, "chatty")
    for packet_id in (1, 2, 3):
        device.send(Publish("t/1", b"x", qos=1, packet_id=packet_id))
    codes = [(await device.next(PubAck)).reason_code for _ in range(3)]
    assert codes == [0, 0, 0x97]


async def test_anonymous_devices_where_configured(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(
        mqtt={**BASE, "allow_anonymous": True},
        namespaces={"public": {"subscribe": "authenticated", "publish": "authenticated"}},
    )
    device, ack = await connect(gateway, "anon", token=None)
    assert ack.reason_code == 0
    device.send(
        Subscribe(
            1,
            [("public/#", SubscriptionOptions()), ("private/#", SubscriptionOptions())],
        )
    )
    assert (await device.next(SubAck)).reason_codes == [0, 0x87]


async def test_connection_limit(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(mqtt={**BASE, "max_connections": 1})
    first, _ = await connect(gateway, "first")  # kept referenced: it must stay open
    _, ack = await connect(gateway, "second")
    assert ack.reason_code == 0x89
    _, ack = await connect(gateway, "third", version=MQTT_3_1_1)
    assert ack.reason_code == 3  # 3.1.1: server unavailable
    first.disconnect()


async def test_paho_v5_subscription_ids(gateway: Gateway) -> None:
    """paho sees its subscription identifier (paho does not implement inbound topic
    aliases, so it must not ask for them; test_outbound_topic_aliases covers those)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="paho5", protocol=paho.MQTTv5)
    received: asyncio.Queue[paho.MQTTMessage] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    client.on_message = lambda c, u, m: loop.call_soon_threadsafe(received.put_nowait, m)
    client.username_pw_set("paho5", make_token("paho5"))
    assert gateway.mqtt is not None
    await asyncio.to_thread(client.connect, "127.0.0.1", gateway.mqtt.port, 30)
    client.loop_start()
    try:
        sub_props = PahoProperties(PacketTypes.SUBSCRIBE)
        sub_props.SubscriptionIdentifier = 42
        client.subscribe("alias/#", qos=0, properties=sub_props)
        await asyncio.sleep(0.3)
        for _ in range(3):
            await publish(gateway, "alias/long/topic/name", "v")
        for _ in range(3):
            message = await asyncio.wait_for(received.get(), 5)
            assert message.topic == "alias/long/topic/name"
            assert message.properties.SubscriptionIdentifier == [42]
    finally:
        client.disconnect()
        client.loop_stop()

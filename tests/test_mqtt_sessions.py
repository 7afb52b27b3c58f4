"""Persistent MQTT sessions: offline queues, re-sending on resume, expiry, will delay.

Devices here are raw sockets speaking packets from our codec, so that each test controls
exactly what a device acknowledges and when it vanishes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from realtime.app import Gateway
from realtime.mqtt.codec import PacketDecoder, encode
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
    Will,
)

from .conftest import GatewayFactory, make_token, publish


class RawDevice:
    def __init__(self, gateway: Gateway, version: int = MQTT_5) -> None:
        assert gateway.mqtt is not None
        self.port = gateway.mqtt.port
        self.version = version
        self.decoder = PacketDecoder(version, server=False)
        self.packets: list[Any] = []
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(
        self,
        client_id: str,
        *,
        clean: bool,
        expiry: int | None = None,
        will: Will | None = None,
    ) -> ConnAck:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.decoder = PacketDecoder(self.version, server=False)
        props = Properties(session_expiry_interval=expiry) if expiry is not None else None
        self.send(
            Connect(
                client_id,
                clean_start=clean,
                keep_alive=60,
                username=client_id,
                password=make_token(client_id).encode(),
                will=will,
                properties=props,
            )
        )
        ack = await self.next(ConnAck)
        assert ack.reason_code == 0, ack
        return ack

    def send(self, packet: Any) -> None:
        assert self.writer is not None
        self.writer.write(encode(packet, self.version))

    async def next(self, kind: type, timeout: float = 5.0) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, packet in enumerate(self.packets):
                if isinstance(packet, kind):
                    return self.packets.pop(i)
            assert self.reader is not None
            data = await asyncio.wait_for(self.reader.read(65536), deadline - loop.time())
            if not data:
                raise ConnectionError(f"closed while waiting for {kind.__name__}")
            self.packets.extend(self.decoder.feed(data))

    async def quiet(self, wait: float = 0.3) -> bool:
        """True when nothing more arrives within `wait` seconds."""
        try:
            packet = await self.next(Publish, wait)
        except (TimeoutError, ConnectionError):
            return True
        self.packets.insert(0, packet)
        return False

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.send(Subscribe(1, [(topic_filter, SubscriptionOptions(qos=qos))]))
        assert (await self.next(SubAck)).reason_codes == [qos]

    def vanish(self) -> None:
        """The network goes away: no DISCONNECT."""
        assert self.writer is not None
        self.writer.transport.abort()

    def disconnect(self) -> None:
        self.send(Disconnect())
        assert self.writer is not None
        self.writer.close()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(
        mqtt={"enabled": True, "host": "127.0.0.1", "port": 0, "max_queued_messages": 3}
    )


async def wait_for_detach(gateway: Gateway, client_id: str) -> None:
    assert gateway.mqtt is not None
    for _ in range(100):
        state = gateway.mqtt.server.sessions.get(client_id)
        if state is None or state.connection is None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the session never noticed the connection ended")


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5], ids=["3.1.1", "5.0"])
async def test_offline_queue_and_session_present(gateway: Gateway, version: int) -> None:
    device = RawDevice(gateway, version)
    expiry = 60 if version == MQTT_5 else None
    ack = await device.connect("meter-1", clean=False, expiry=expiry)
    assert not ack.session_present
    await device.subscribe("meters/+/cmd")
    device.vanish()
    await wait_for_detach(gateway, "meter-1")
    for i in range(5):  # more than the queue holds (3)
        await publish(gateway, "meters/1/cmd", i)
    ack = await device.connect("meter-1", clean=False, expiry=expiry)
    assert ack.session_present
    got = []
    for _ in range(3):
        packet = await device.next(Publish)
        got.append(json.loads(packet.payload))
        device.send(PubAck(packet.packet_id))
    assert got == [0, 1, 2]
    assert await device.quiet()
    # The subscription survived too: live publications keep coming.
    await publish(gateway, "meters/1/cmd", "live")
    assert json.loads((await device.next(Publish)).payload) == "live"
    # A clean start throws the session away.
    device.disconnect()
    await wait_for_detach(gateway, "meter-1")
    ack = await device.connect("meter-1", clean=True)
    assert not ack.session_present
    await publish(gateway, "meters/1/cmd", "gone")
    assert await device.quiet()
    device.disconnect()


async def test_unacknowledged_messages_are_resent_with_dup(gateway: Gateway) -> None:
    device = RawDevice(gateway)
    await device.connect("pump", clean=False, expiry=60)
    await device.subscribe("pumps/#")
    await publish(gateway, "pumps/1", "start")
    first = await device.next(Publish)
    assert not first.dup
    device.vanish()  # without acknowledging
    await wait_for_detach(gateway, "pump")
    ack = await device.connect("pump", clean=False, expiry=60)
    assert ack.session_present
    again = await device.next(Publish)
    assert again.dup and again.packet_id == first.packet_id and again.payload == first.payload
    device.send(PubAck(again.packet_id))
    assert await device.quiet()
    device.disconnect()


async def test_session_expiry(gateway: Gateway) -> None:
    device = RawDevice(gateway)
    await device.connect("short", clean=False, expiry=1)
    await device.subscribe("s/#")
    device.vanish()
    await asyncio.sleep(2.5)  # the node's housekeeping runs once a second
    ack = await device.connect("short", clean=False, expiry=1)
    assert not ack.session_present
    device.disconnect()


async def test_will_delay_is_cancelled_by_a_quick_return(gateway: Gateway) -> None:
    watcher = RawDevice(gateway)
    await watcher.connect("watcher", clean=True)
    await watcher.subscribe("status/#", qos=0)
    will = Will("status/gw", b"offline", properties=Properties(will_delay_interval=2))
    device = RawDevice(gateway)
    await device.connect("gw", clean=False, expiry=30, will=will)
    device.vanish()
    await wait_for_detach(gateway, "gw")
    await device.connect("gw", clean=False, expiry=30)  # back within the delay
    assert await watcher.quiet(2.5)
    # Now it vanishes for good (with its will): the will comes after the delay.
    device.disconnect()
    await device.connect("gw", clean=False, expiry=30, will=will)
    device.vanish()
    assert await watcher.quiet(1.0)
    packet = await watcher.next(Publish, timeout=4)
    assert (packet.topic, packet.payload) == ("status/gw", b"offline")
    watcher.disconnect()


async def test_message_expiry_while_queued(gateway: Gateway) -> None:
    device = RawDevice(gateway)
    await device.connect("slowpoke", clean=False, expiry=60)
    await device.subscribe("news/#")
    device.vanish()
    await wait_for_detach(gateway, "slowpoke")
    sender = RawDevice(gateway)
    await sender.connect("sender", clean=True)
    props = Properties(message_expiry_interval=1)
    sender.send(Publish("news/1", b"stale soon", qos=1, packet_id=5, properties=props))
    sender.send(Publish("news/1", b"keeps", qos=1, packet_id=6))
    await sender.next(PubAck)
    await sender.next(PubAck)
    await asyncio.sleep(1.5)
    await device.connect("slowpoke", clean=False, expiry=60)
    packet = await device.next(Publish)
    assert packet.payload == b"keeps"
    assert await device.quiet()
    device.disconnect()
    sender.disconnect()


async def test_shared_subscription_round_robin(gateway: Gateway) -> None:
    workers = [RawDevice(gateway, version) for version in (MQTT_5, MQTT_5, MQTT_3_1_1)]
    for i, worker in enumerate(workers):
        await worker.connect(f"worker-{i}", clean=True)
        await worker.subscribe("$share/pool/jobs/#")
    watcher = RawDevice(gateway)
    await watcher.connect("watcher", clean=True)
    await watcher.subscribe("jobs/#")
    for i in range(9):
        await publish(gateway, f"jobs/{i}", i)
    seen: list[int] = []
    for worker in workers:
        mine = []
        for _ in range(3):
            packet = await worker.next(Publish)
            worker.send(PubAck(packet.packet_id))
            mine.append(json.loads(packet.payload))
        assert await worker.quiet(0.2)
        seen += mine
    assert sorted(seen) == list(range(9))  # each job exactly once across the group
    for _ in range(9):  # a plain subscription still sees every one
        packet = await watcher.next(Publish)
        watcher.send(PubAck(packet.packet_id))
    for device in (*workers, watcher):
        device.disconnect()


async def test_outbound_topic_aliases(gateway: Gateway) -> None:
    device = RawDevice(gateway)
    device.reader, device.writer = await asyncio.open_connection("127.0.0.1", device.port)
    device.send(
        Connect(
            "aliased",
            username="aliased",
            password=make_token("aliased").encode(),
            properties=Properties(topic_alias_maximum=1),
        )
    )
    await device.next(ConnAck)
    await device.subscribe("a/#", qos=0)
    for topic in ("a/first", "a/first", "a/second"):
        await publish(gateway, topic, topic)
    first, again, other = [await device.next(Publish) for _ in range(3)]
    assert (first.topic, first.properties.topic_alias) == ("a/first", 1)
    assert (again.topic, again.properties.topic_alias) == ("", 1)
    assert json.loads(again.payload) == "a/first"
    # Only one alias allowed: a new topic travels in full, without an alias.
    assert other.topic == "a/second" and not (other.properties and other.properties.topic_alias)
    device.disconnect()


async def test_client_id_of_another_user_is_refused(gateway: Gateway) -> None:
    owner = RawDevice(gateway)
    await owner.connect("shared-id", clean=False, expiry=60)
    await owner.subscribe("own/#")
    other = RawDevice(gateway)
    other.reader, other.writer = await asyncio.open_connection("127.0.0.1", other.port)
    other.send(Connect("shared-id", username="mallory", password=make_token("mallory").encode()))
    ack = await other.next(ConnAck)
    assert ack.reason_code == 0x85  # client identifier not valid
    await publish(gateway, "own/1", "still the owner's")  # the owner's session is untouched
    assert json.loads((await owner.next(Publish)).payload) == "still the owner's"
    owner.disconnect()

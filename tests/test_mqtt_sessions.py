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
        keep_alive: int = 60,
    ) -> ConnAck:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.decoder = PacketDecoder(self.version, server=False)
        props = Properties(session_expiry_interval=expiry) if expiry is not None else None
        self.send(
            Connect(
                client_id,
                clean_start=clean,
                keep_alive=keep_alive,
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


async def test_an_idle_device_is_one_object_with_nothing_made_in_advance(
    gateway: Gateway,
) -> None:
    """Idle memory per device counts: the connection object is its own outbound queue and
    protocol, and every buffer or container waits until something needs it."""
    assert gateway.mqtt is not None
    server = gateway.mqtt.server
    devices = [RawDevice(gateway, MQTT_3_1_1) for _ in range(2)]
    for i, device in enumerate(devices):
        await device.connect(f"idle-{i}", clean=True, keep_alive=300)
        await device.subscribe(f"idle/{i}", qos=0)
    assert server.open_connections == 2 and not server.connecting
    first, second = (server.sessions[f"idle-{i}"] for i in range(2))
    for state in (first, second):
        connection = state.connection
        assert connection is not None
        assert connection.sink is connection  # no separate Outbound, no bound callback
        assert connection.items is None and connection.queue is None
        assert connection.runner is None and connection.bucket is None
        assert connection.allowed is None and connection.negotiated is None
        assert connection.decoder.buffered == 0 and connection.decoder._buffer is None
        assert connection.remote.startswith("127.0.0.1:")
        assert not state.inflight and state.pending is None and state.awaiting_release is None
        assert state.client_id is state.principal.user  # one string for both
    assert first.subscriptions == ("idle/0",)
    assert first.connection is not None and second.connection is not None
    assert first.connection.keep_alive is second.connection.keep_alive  # one int for 300
    # Both plain QoS 0 subscriptions share one value; each topic has no dict of members.
    (members,) = gateway.node.hub.filters.match("idle/0")
    assert members[first] is gateway.node.hub.filters.match("idle/1")[0][second]
    for device in devices:
        device.disconnect()
    for _ in range(100):
        if server.open_connections == 0:
            break
        await asyncio.sleep(0.02)
    assert server.open_connections == 0 and not server.sessions


async def test_slow_reader_is_cut_off_without_delaying_others(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(
        mqtt={"enabled": True, "host": "127.0.0.1", "port": 0},
        limits={"max_queue_bytes": 262144},
    )
    assert gateway.mqtt is not None
    server = gateway.mqtt.server
    fast, slow = RawDevice(gateway, MQTT_3_1_1), RawDevice(gateway, MQTT_3_1_1)
    for device, name in ((fast, "fast"), (slow, "slow")):
        await device.connect(name, clean=True)
        await device.subscribe("flood", qos=0)
    assert slow.writer is not None
    slow.writer.transport.pause_reading()  # then it never reads: its socket buffers fill up
    payload = b"x" * 4000
    count = 3000  # 12 MB: more than the slow device's socket buffers and queue can hold
    for i in range(count):
        await gateway.node.publish("flood", payload)
        if i % 10 == 9:
            for _ in range(10):  # the fast device keeps up
                assert (await fast.next(Publish)).payload == payload
    slow_connection = server.sessions["slow"].connection
    assert slow_connection is not None and slow_connection.closed
    slow.vanish()
    for _ in range(100):
        if server.open_connections == 1:
            break
        await asyncio.sleep(0.02)
    assert server.open_connections == 1 and "slow" not in server.sessions
    fast.disconnect()

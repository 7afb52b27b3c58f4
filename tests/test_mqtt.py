"""MQTT devices in the hub, driven by clients others wrote (paho-mqtt, mosquitto_pub/sub)
and by raw packets where a misbehaving device is the point."""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from realtime.app import Gateway
from realtime.core.broker import Publication
from realtime.mqtt.codec import PacketDecoder, encode
from realtime.mqtt.packets import MQTT_3_1_1, MQTT_5, ConnAck, Connect, Disconnect, Will
from realtime.protocol import realtime_pb2 as pb

from .conftest import GatewayFactory, RawClient, make_token, publish

MQTT_CONFIG = {"mqtt": {"enabled": True, "host": "127.0.0.1", "port": 0}}
# rooms/* keeps history, so WebSocket subscribers see stream offsets on device publications.
ROOMS = {"rooms": {"history_size": 100, "publish": "token"}}


@pytest.fixture
async def mqtt_gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(**MQTT_CONFIG, namespaces=ROOMS)


def port(gateway: Gateway) -> int:
    assert gateway.mqtt is not None
    return gateway.mqtt.port


class Device:
    """A paho-mqtt client; paho runs its own network thread, the test awaits its queues."""

    def __init__(
        self,
        gateway: Gateway | int,
        client_id: str,
        *,
        v5: bool = False,
        websocket: bool = False,
        clean: bool = True,
        session_expiry: int = 0,
    ) -> None:
        """`gateway`: an in-process gateway, or the MQTT port of one in another process.
        `clean` False with `session_expiry` (5.0) asks for a persistent session."""
        protocol = paho.MQTTv5 if v5 else paho.MQTTv311
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            transport="websockets" if websocket else "tcp",
            clean_session=None if v5 else clean,
        )
        self.clean = clean
        self.session_expiry = session_expiry
        if isinstance(gateway, int):
            self.port = gateway
        else:
            self.port = gateway.websocket.port if websocket else port(gateway)
        self.v5 = v5
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.session_present: bool | None = None

        def on_connect(c: Any, u: Any, flags: Any, rc: Any, p: Any) -> None:
            self.session_present = bool(flags.session_present)
            self.events.put(("connect", rc))

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.events.put(("suback", rcs))
        self.client.on_disconnect = lambda c, u, f, rc, p: self.events.put(("disconnect", rc))
        self.client.on_publish = lambda c, u, mid, rc, p: self.events.put(("puback", mid))
        if not websocket:  # under "websockets" paho hands over a wrapper, not the socket
            self.client.on_socket_open = lambda c, u, sock: sock.setsockopt(6, 1, 1)  # NODELAY

    async def connect(self, token: str | None = "default", keepalive: int = 30) -> Any:
        if token == "default":
            token = make_token("device")
        if token is not None:
            self.client.username_pw_set("device", token)
        # In a thread: over WebSocket, paho's connect() waits for the handshake answer from
        # the gateway, which runs on this event loop.
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            if self.session_expiry:
                props.SessionExpiryInterval = self.session_expiry
            await asyncio.to_thread(
                self.client.connect,
                "127.0.0.1",
                self.port,
                keepalive,
                clean_start=self.clean,
                properties=props,
            )
        else:
            await asyncio.to_thread(self.client.connect, "127.0.0.1", self.port, keepalive)
        self.client.loop_start()
        kind, code = await self.event()
        assert kind == "connect"
        return code

    async def event(self, timeout: float = 5.0) -> tuple[str, Any]:
        return await asyncio.to_thread(self.events.get, True, timeout)

    async def subscribe(self, topic: str, qos: int = 0) -> list[Any]:
        self.client.subscribe(topic, qos)
        while True:
            kind, codes = await self.event()
            if kind == "suback":
                return list(codes)

    async def message(self, timeout: float = 5.0) -> paho.MQTTMessage:
        return await asyncio.to_thread(self.messages.get, True, timeout)

    async def nothing_more(self, wait: float = 0.3) -> bool:
        await asyncio.sleep(wait)
        return self.messages.empty()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
async def devices() -> AsyncIterator[list[Device]]:
    made: list[Device] = []
    yield made
    for device in made:
        await asyncio.to_thread(device.stop)


async def raw_device(gateway: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port(gateway))


async def read_packets(
    reader: asyncio.StreamReader, version: int, timeout: float = 5.0
) -> list[Any]:
    """Everything the server sends until it closes the connection."""
    decoder = PacketDecoder(version, server=False)
    packets: list[Any] = []
    data = await asyncio.wait_for(reader.read(), timeout)
    packets.extend(decoder.feed(data))
    return packets


# ----------------------------------------------------------------------------- bridging


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
async def test_device_and_websocket_meet_in_one_channel(
    mqtt_gateway: Gateway, devices: list[Device], clients: list[RawClient], v5: bool
) -> None:
    device = Device(mqtt_gateway, "sensor-1", v5=v5)
    devices.append(device)
    assert await device.connect() == 0
    assert await device.subscribe("rooms/+", qos=1) == [1]
    app = await RawClient.open(mqtt_gateway)
    clients.append(app)
    subscribed = await app.subscribe("rooms/42")
    assert subscribed.recoverable and subscribed.position.offset == 0

    # Device -> WebSocket app, with its place in the channel's stream.
    device.client.publish("rooms/42", b'{"t":21.5}', qos=1)
    push = await app.publication()
    assert push.channel == "rooms/42" and json.loads(push.pub.data) == {"t": 21.5}
    assert push.pub.offset == 1 and push.pub.info.user == "device"
    assert (await device.message()).payload == b'{"t":21.5}'  # its own subscription too

    # WebSocket app -> device, and server API -> device (through the wildcard).
    reply = await app.request(publish=pb.PublishRequest(channel="rooms/42", data=b"from-app"))
    assert reply.publish.position.offset == 2
    assert (await app.publication()).pub.offset == 2
    assert (await device.message()).payload == b"from-app"
    result = await publish(mqtt_gateway, "rooms/42", {"from": "api"})
    assert result["position"]["offset"] == 3
    assert (await app.publication()).pub.offset == 3
    assert (await device.message()).payload == b'{"from":"api"}'
    # A WebSocket app that was away recovers the device's publication by offset too.
    late = await RawClient.open(mqtt_gateway)
    clients.append(late)
    recovered = await late.subscribe(
        "rooms/42",
        recover=True,
        since=pb.StreamPosition(offset=0, epoch=subscribed.position.epoch),
    )
    assert recovered.recovered and [p.offset for p in recovered.publications] == [1, 2, 3]


async def test_qos_levels_end_to_end_with_downgrade(
    mqtt_gateway: Gateway, devices: list[Device]
) -> None:
    sub2, sub0, pub = (Device(mqtt_gateway, name, v5=True) for name in ("s2", "s0", "p"))
    devices += [sub2, sub0, pub]
    for device in (sub2, sub0, pub):
        await device.connect()
    assert await sub2.subscribe("q/#", qos=2) == [2]
    assert await sub0.subscribe("q/#", qos=0) == [0]
    for qos in (0, 1, 2):
        info = pub.client.publish(f"q/{qos}", f"m{qos}".encode(), qos=qos)
        await asyncio.to_thread(info.wait_for_publish, 5)
    got2 = [await sub2.message() for _ in range(3)]
    got0 = [await sub0.message() for _ in range(3)]
    assert [(m.topic, m.qos) for m in got2] == [("q/0", 0), ("q/1", 1), ("q/2", 2)]
    assert [(m.topic, m.qos) for m in got0] == [("q/0", 0), ("q/1", 0), ("q/2", 0)]
    assert await sub2.nothing_more()  # QoS 2: exactly once


async def test_overlapping_subscriptions_deliver_once(
    mqtt_gateway: Gateway, devices: list[Device]
) -> None:
    device = Device(mqtt_gateway, "overlap")
    devices.append(device)
    await device.connect()
    await device.subscribe("a/#", qos=0)
    await device.subscribe("a/+", qos=1)
    await publish(mqtt_gateway, "a/b", "x")
    message = await device.message()
    assert message.qos == 1
    assert await device.nothing_more()


async def test_retained_set_replace_clear(mqtt_gateway: Gateway, devices: list[Device]) -> None:
    pub = Device(mqtt_gateway, "retainer")
    devices.append(pub)
    await pub.connect()
    for payload in (b"first", b"second"):
        info = pub.client.publish("status/door", payload, qos=1, retain=True)
        await asyncio.to_thread(info.wait_for_publish, 5)
    late = Device(mqtt_gateway, "late")
    devices.append(late)
    await late.connect()
    await late.subscribe("status/#")
    message = await late.message()
    assert (message.payload, message.retain) == (b"second", True)
    info = pub.client.publish("status/door", b"", qos=1, retain=True)  # clears it
    await asyncio.to_thread(info.wait_for_publish, 5)
    assert (await late.message()).payload == b""  # the live empty publication
    later = Device(mqtt_gateway, "later")
    devices.append(later)
    await later.connect()
    await later.subscribe("status/#")
    assert await later.nothing_more()


async def test_acl_on_subscribe_publish_and_retained(
    mqtt_gateway: Gateway, devices: list[Device], clients: list[RawClient]
) -> None:
    await mqtt_gateway.node.broker.set_retained("secret/plans", Publication(0, b"x"))
    limited = Device(mqtt_gateway, "limited", v5=True)
    devices.append(limited)
    token = make_token("limited", subscribe=["rooms/+"], publish=["rooms/1"])
    await limited.connect(token)
    assert [int(c.value) for c in await limited.subscribe("#")] == [0x87]
    assert [int(c.value) for c in await limited.subscribe("secret/+")] == [0x87]
    assert [int(c.value) for c in await limited.subscribe("rooms/+", qos=1)] == [1]
    assert await limited.nothing_more()  # no retained message leaked from secret/
    app = await RawClient.open(mqtt_gateway)
    clients.append(app)
    await app.subscribe("rooms/2")
    info = limited.client.publish("rooms/2", b"not allowed", qos=1)
    await asyncio.to_thread(info.wait_for_publish, 5)
    await asyncio.sleep(0.2)
    assert app.unexpected_pushes() == []


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
async def test_mqtt_over_websocket(
    mqtt_gateway: Gateway, devices: list[Device], clients: list[RawClient], v5: bool
) -> None:
    device = Device(mqtt_gateway, "browser-device", v5=v5, websocket=True)
    devices.append(device)
    assert await device.connect() == 0
    assert await device.subscribe("rooms/#", qos=1) == [1]
    await publish(mqtt_gateway, "rooms/5", "to the ws device")
    assert (await device.message()).payload == b'"to the ws device"'
    app = await RawClient.open(mqtt_gateway)
    clients.append(app)
    await app.subscribe("rooms/6")
    info = device.client.publish("rooms/6", b"from the ws device", qos=1)
    await asyncio.to_thread(info.wait_for_publish, 5)
    assert (await app.publication()).pub.data == b"from the ws device"


# ----------------------------------------------------------------------------- sessions


async def test_anonymous_devices_are_refused_by_default(
    mqtt_gateway: Gateway, devices: list[Device]
) -> None:
    device = Device(mqtt_gateway, "anon")
    devices.append(device)
    code = await device.connect(token=None)
    assert str(code) == "Not authorized"  # 3.1.1 return code 5, as paho names it


async def test_takeover_only_after_authentication(
    mqtt_gateway: Gateway, devices: list[Device]
) -> None:
    first = Device(mqtt_gateway, "dev-1", v5=True)
    devices.append(first)
    await first.connect()
    await first.subscribe("rooms/+")
    intruder = Device(mqtt_gateway, "dev-1", v5=True)
    devices.append(intruder)
    code = await intruder.connect(token="not-a-valid-token")
    assert int(code.value) == 0x86
    await publish(mqtt_gateway, "rooms/1", "still mine")
    assert (await first.message()).payload == b'"still mine"'  # untouched

    second = Device(mqtt_gateway, "dev-1", v5=True)
    devices.append(second)
    assert await second.connect() == 0
    kind, reason = await first.event()
    while kind != "disconnect":
        kind, reason = await first.event()
    assert int(reason.value) == 0x8E  # session taken over


async def test_will_on_keep_alive_expiry(mqtt_gateway: Gateway, devices: list[Device]) -> None:
    watcher = Device(mqtt_gateway, "watcher")
    devices.append(watcher)
    await watcher.connect()
    await watcher.subscribe("devices/+/status", qos=1)
    reader, writer = await raw_device(mqtt_gateway)
    will = Will("devices/d9/status", b"offline", qos=1, retain=False)
    connect = Connect(
        "d9", keep_alive=1, username="d9", password=make_token("d9").encode(), will=will
    )
    writer.write(encode(connect, MQTT_3_1_1))
    # Then silence: no PINGREQ. The gateway must end it after 1.5 s and publish the will.
    message = await watcher.message(timeout=6)
    assert (message.topic, message.payload) == ("devices/d9/status", b"offline")
    packets = await read_packets(reader, MQTT_3_1_1)
    assert isinstance(packets[0], ConnAck)
    writer.close()


async def test_clean_disconnect_discards_the_will(
    mqtt_gateway: Gateway, devices: list[Device]
) -> None:
    watcher = Device(mqtt_gateway, "watcher2")
    devices.append(watcher)
    await watcher.connect()
    await watcher.subscribe("devices/#")
    reader, writer = await raw_device(mqtt_gateway)
    will = Will("devices/d8/status", b"offline")
    writer.write(encode(Connect("d8", password=make_token("d8").encode(), will=will), MQTT_5))
    writer.write(encode(Disconnect(), MQTT_5))
    await read_packets(reader, MQTT_5)
    assert await watcher.nothing_more(0.5)
    writer.close()


async def test_empty_client_id_is_assigned_in_v5(mqtt_gateway: Gateway) -> None:
    reader, writer = await raw_device(mqtt_gateway)
    writer.write(encode(Connect("", password=make_token().encode()), MQTT_5))
    writer.write(encode(Disconnect(), MQTT_5))
    (ack,) = await read_packets(reader, MQTT_5)
    assert ack.reason_code == 0 and ack.properties.assigned_client_identifier
    writer.close()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("data", "expect_connack"),
    [
        # MQTT 3.1 ("MQIsdp", level 3): refused with return code 1, then closed.
        (bytes.fromhex("101100064d51497364700302003c0003616263"), 1),
        (bytes.fromhex("300400026178"), None),  # PUBLISH before CONNECT
        (bytes.fromhex("10ffffffff7f"), None),  # remaining length of 5 bytes
    ],
    ids=["old-protocol", "publish-first", "bad-length"],
)
async def test_bad_first_packets_are_refused(
    mqtt_gateway: Gateway, devices: list[Device], data: bytes, expect_connack: int | None
) -> None:
    bystander = Device(mqtt_gateway, "bystander")
    devices.append(bystander)
    await bystander.connect()
    await bystander.subscribe("rooms/#")
    reader, writer = await raw_device(mqtt_gateway)
    writer.write(data)
    raw = await asyncio.wait_for(reader.read(), 5)  # the server closes, never hangs
    writer.close()
    if expect_connack is None:
        assert raw == b""
    else:
        assert raw == bytes((0x20, 2, 0, expect_connack))
    await publish(mqtt_gateway, "rooms/1", "ok")
    assert (await bystander.message()).payload == b'"ok"'


@pytest.mark.parametrize(
    ("packet_hex", "reason"),
    [
        ("3606000261780001", 0x81),  # QoS 3
        ("30040002612b", 0x90),  # wildcard in a PUBLISH topic
        (encode(Connect("again"), MQTT_5).hex(), 0x82),  # a second CONNECT
    ],
    ids=["qos3", "wildcard-topic", "second-connect"],
)
async def test_protocol_violations_after_connect(
    mqtt_gateway: Gateway, packet_hex: str, reason: int
) -> None:
    reader, writer = await raw_device(mqtt_gateway)
    writer.write(encode(Connect("v", password=make_token().encode()), MQTT_5))
    writer.write(bytes.fromhex(packet_hex))
    packets = await read_packets(reader, MQTT_5)
    writer.close()
    assert isinstance(packets[0], ConnAck)
    assert isinstance(packets[-1], Disconnect)
    assert packets[-1].reason_code == reason


# ----------------------------------------------------------------------------- mosquitto


async def test_mosquitto_clients(mqtt_gateway: Gateway, clients: list[RawClient]) -> None:
    assert shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub"), (
        "mosquitto-clients is missing: ./scripts/test.sh installs it (apt-get)"
    )
    token = make_token("mosq")
    args = ["-h", "127.0.0.1", "-p", str(port(mqtt_gateway)), "-u", "mosq", "-P", token]
    sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub",
        *args,
        "-t",
        "feeds/#",
        "-C",
        "1",
        "-v",
        "-q",
        "1",
        "-W",
        "10",
        stdout=subprocess.PIPE,
    )
    for _ in range(50):  # until its subscription is in the hub
        if mqtt_gateway.node.hub.filters.size:
            break
        await asyncio.sleep(0.05)
    await publish(mqtt_gateway, "feeds/1", {"n": 1})
    out, _ = await asyncio.wait_for(sub.communicate(), 10)
    assert out.decode().strip() == 'feeds/1 {"n":1}'

    app = await RawClient.open(mqtt_gateway)
    clients.append(app)
    await app.subscribe("feeds/2")
    pub = await asyncio.create_subprocess_exec(
        "mosquitto_pub", *args, "-t", "feeds/2", "-m", "hello", "-q", "1"
    )
    assert await asyncio.wait_for(pub.wait(), 10) == 0
    assert (await app.publication()).pub.data == b"hello"


async def test_mqtt_over_tls(make_gateway: GatewayFactory, tmp_path: Any) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    gateway = await make_gateway(
        mqtt={
            **MQTT_CONFIG["mqtt"],
            "tls_port": 0,
            "tls_cert_file": str(cert_file),
            "tls_key_file": str(key_file),
        }
    )
    assert gateway.mqtt is not None and gateway.mqtt.tls_port
    device = Device(gateway, "tls-device")
    device.port = gateway.mqtt.tls_port
    device.client.tls_set(ca_certs=str(cert_file))
    try:
        assert await device.connect() == 0
        await device.subscribe("secure/#")
        await publish(gateway, "secure/1", "over tls")
        assert (await device.message()).payload == b'"over tls"'
    finally:
        await asyncio.to_thread(device.stop)

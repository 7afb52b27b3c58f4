"""MQTT codec: every malformed case gets its spec reason code; fuzzing; the packet size limit.

Byte strings are written as hex with spaces between fields.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    ConnAck,
    Connect,
    Disconnect,
    MqttError,
    Packet,
    PacketDecoder,
    PingReq,
    Properties,
    PubAck,
    Publish,
    ReasonCode,
    Subscribe,
    SubscriptionOptions,
    UnsubAck,
    Unsubscribe,
    Will,
    connack_return_code,
    encode,
    encode_publish,
)
from tests.test_mqtt_codec import (
    VERSIONS,
    connacks,
    connected_decoder,
    connects,
    h,
    packet_strategies,
)

MALFORMED = ReasonCode.MALFORMED_PACKET
PROTOCOL = ReasonCode.PROTOCOL_ERROR
V4_CONNECT = h("10 0f 0004 4d515454 04 02 003c 0003 616263")
V5_CONNECT = h("10 10 0004 4d515454 05 02 003c 00 0003 616263")


def error_of(decoder: PacketDecoder, data: bytes) -> MqttError:
    with pytest.raises(MqttError) as info:
        decoder.feed(data)
    return info.value


def connect_v(version: int, flags: str, props: str = "", payload: str = "0003 616263") -> bytes:
    """A CONNECT built from hex parts; computes the remaining length."""
    body = h("0004 4d515454") + bytes((version,)) + h(flags) + h("003c")
    if version == MQTT_5:
        props_bytes = h(props)
        body += bytes((len(props_bytes),)) + props_bytes
    body += h(payload)
    return bytes((0x10, len(body))) + body


def packet(first: int, body: str) -> bytes:
    raw = h(body)
    assert len(raw) < 128
    return bytes((first, len(raw))) + raw


# ----------------------------------------------------------------------------- CONNECT

CONNECT_CASES = [
    # (name, bytes, reason code)
    ("publish before connect", packet(0x30, "0001 74"), PROTOCOL),
    ("subscribe before connect", packet(0x82, "0001 0001 74 00"), PROTOCOL),
    ("connect header flags", b"\x11" + V4_CONNECT[1:], MALFORMED),
    ("reserved type 0", h("00 00"), MALFORMED),
    (
        "MQTT 3.1",
        packet(0x10, "0006 4d5149736470 03 02 003c 0003 616263"),
        ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    ),
    (
        "level 3 under MQTT",
        packet(0x10, "0004 4d515454 03 02 003c 0003 616263"),
        ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    ),
    (
        "level 6",
        packet(0x10, "0004 4d515454 06 02 003c 0003 616263"),
        ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    ),
    ("unknown protocol name", packet(0x10, "0004 4d515458 04 02 003c 0003 616263"), PROTOCOL),
    ("truncated protocol name", packet(0x10, "0004 4d51"), MALFORMED),
    ("missing level", packet(0x10, "0004 4d515454"), MALFORMED),
    ("v4 reserved flag", connect_v(4, "03"), MALFORMED),
    ("v5 reserved flag", connect_v(5, "03"), MALFORMED),
    ("v4 will qos without will", connect_v(4, "0a"), MALFORMED),
    ("v5 will retain without will", connect_v(5, "22"), MALFORMED),
    ("will qos 3", connect_v(4, "1e", payload="0003 616263 0001 74 0000"), MALFORMED),
    ("v4 password without username", connect_v(4, "42", payload="0003 616263 0001 70"), MALFORMED),
    (
        "v4 empty client id without clean session",
        connect_v(4, "00", payload="0000"),
        ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
    ),
    ("client id with U+0000", connect_v(4, "02", payload="0003 610062"), MALFORMED),
    ("client id with a surrogate", connect_v(4, "02", payload="0003 eda080"), MALFORMED),
    ("client id overlong UTF-8", connect_v(4, "02", payload="0002 c0af"), MALFORMED),
    ("client id invalid UTF-8", connect_v(5, "02", payload="0001 ff"), MALFORMED),
    ("client id past the end", connect_v(4, "02", payload="0009 616263"), MALFORMED),
    ("trailing bytes", connect_v(4, "02", payload="0003 616263 00"), MALFORMED),
    (
        "will topic with wildcard",
        connect_v(4, "06", payload="0003 616263 0003 612f23 0000"),
        ReasonCode.TOPIC_NAME_INVALID,
    ),
    (
        "empty will topic",
        connect_v(4, "06", payload="0003 616263 0000 0000"),
        ReasonCode.TOPIC_NAME_INVALID,
    ),
    ("missing will payload", connect_v(4, "06", payload="0003 616263 0001 74"), MALFORMED),
    ("missing username", connect_v(4, "82"), MALFORMED),
    # 5.0 properties
    ("property not allowed in CONNECT", connect_v(5, "02", props="23 0001"), MALFORMED),
    ("unknown property", connect_v(5, "02", props="7f 00"), MALFORMED),
    ("repeated property", connect_v(5, "02", props="11 0000000a 11 0000000a"), PROTOCOL),
    ("receive maximum 0", connect_v(5, "02", props="21 0000"), PROTOCOL),
    ("maximum packet size 0", connect_v(5, "02", props="27 00000000"), PROTOCOL),
    ("request problem information 2", connect_v(5, "02", props="17 02"), PROTOCOL),
    ("auth data without method", connect_v(5, "02", props="16 0001 78"), PROTOCOL),
    ("truncated property", connect_v(5, "02", props="11 0000"), MALFORMED),
    (
        "will property in CONNECT properties",
        connect_v(5, "02", props="18 00000001"),
        MALFORMED,
    ),
    (
        "will properties: response topic with wildcard",
        connect_v(5, "06", payload="0003 616263 04 08 0001 2b 0001 74 0000"),
        PROTOCOL,
    ),
    (
        "will properties: session expiry not allowed",
        connect_v(5, "06", payload="0003 616263 05 11 00000001 0001 74 0000"),
        MALFORMED,
    ),
    (
        "property length past the end",
        packet(0x10, "0004 4d515454 05 02 003c 09 1100"),
        MALFORMED,
    ),
    (
        "property length of 5 bytes",
        packet(0x10, "0004 4d515454 05 02 003c 8080808001"),
        MALFORMED,
    ),
]


@pytest.mark.parametrize(
    ("data", "code"), [case[1:] for case in CONNECT_CASES], ids=[c[0] for c in CONNECT_CASES]
)
def test_malformed_connect(data: bytes, code: ReasonCode) -> None:
    assert error_of(PacketDecoder(), data).reason_code == code


def test_unsupported_version_maps_to_connack_1() -> None:
    decoder = PacketDecoder()
    exc = error_of(decoder, packet(0x10, "0004 4d515454 06 02 003c 0003 616263"))
    assert decoder.version is None  # answer in 3.1.1 form, return code 1
    assert connack_return_code(exc.reason_code) == 1


def test_version_is_known_when_a_later_field_is_bad() -> None:
    # So a session can answer a v5 client with a v5 CONNACK 0x81.
    decoder = PacketDecoder()
    error_of(decoder, connect_v(5, "03"))
    assert decoder.version == MQTT_5


def test_v5_allows_password_without_username_and_empty_client_id() -> None:
    (connect,) = PacketDecoder().feed(connect_v(5, "40", payload="0000 0002 7077"))
    assert connect == Connect("", False, 60, None, b"pw")


def test_second_connect_is_a_protocol_error() -> None:
    decoder = PacketDecoder()
    assert decoder.feed(V4_CONNECT) == [Connect("abc", True, 60)]
    assert error_of(decoder, V4_CONNECT).reason_code == PROTOCOL


# ----------------------------------------------------------------------------- after CONNECT

SERVER_CASES = [
    # (name, versions, bytes, reason code)
    ("publish QoS 3", VERSIONS, packet(0x36, "0001 74 0001"), MALFORMED),
    ("publish QoS 0 with DUP", VERSIONS, packet(0x38, "0001 74"), MALFORMED),
    ("publish topic +", VERSIONS, packet(0x30, "0003 612f2b 00"), ReasonCode.TOPIC_NAME_INVALID),
    ("publish topic #", VERSIONS, packet(0x30, "0001 23 00"), ReasonCode.TOPIC_NAME_INVALID),
    ("publish topic U+0000", VERSIONS, packet(0x30, "0002 6100 00"), MALFORMED),
    ("publish topic surrogate", VERSIONS, packet(0x30, "0003 edbfbf 00"), MALFORMED),
    ("publish topic past the end", VERSIONS, packet(0x30, "0009 74"), MALFORMED),
    ("publish truncated topic length", VERSIONS, packet(0x30, "00"), MALFORMED),
    ("publish packet id 0", VERSIONS, packet(0x32, "0001 74 0000 00"), PROTOCOL),
    ("publish missing packet id", VERSIONS, packet(0x32, "0001 74"), MALFORMED),
    ("v4 publish empty topic", (4,), packet(0x30, "0000 78"), PROTOCOL),
    ("v5 publish empty topic, no alias", (5,), packet(0x30, "0000 00 78"), PROTOCOL),
    ("v5 publish missing properties", (5,), packet(0x30, "0001 74"), MALFORMED),
    ("v5 topic alias 0", (5,), packet(0x30, "0001 74 03 230000"), ReasonCode.TOPIC_ALIAS_INVALID),
    ("v5 subscription id from client", (5,), packet(0x30, "0001 74 02 0b01"), PROTOCOL),
    ("v5 subscription id 0", (5,), packet(0x30, "0001 74 02 0b00"), PROTOCOL),
    ("v5 payload format 2", (5,), packet(0x30, "0001 74 02 0102"), PROTOCOL),
    ("v5 repeated expiry", (5,), packet(0x30, "0001 74 0a 0200000001 0200000001"), PROTOCOL),
    ("v5 response topic wildcard", (5,), packet(0x30, "0001 74 04 0800012b"), PROTOCOL),
    ("v5 reason string in publish", (5,), packet(0x30, "0001 74 04 1f000178"), MALFORMED),
    ("v5 property varint of 5 bytes", (5,), packet(0x30, "0001 74 8080808001"), MALFORMED),
    ("subscribe flags 0", VERSIONS, packet(0x80, "0001 0001 74 00"), MALFORMED),
    ("unsubscribe flags 0", VERSIONS, packet(0xA0, "0001 0001 74"), MALFORMED),
    ("pubrel flags 0", VERSIONS, packet(0x60, "0001"), MALFORMED),
    ("puback flags 2", VERSIONS, packet(0x42, "0001"), MALFORMED),
    ("pingreq flags 1", VERSIONS, h("c1 00"), MALFORMED),
    ("pingreq with a body", VERSIONS, h("c0 01 00"), MALFORMED),
    ("v4 subscribe without filters", (4,), packet(0x82, "0001"), PROTOCOL),
    ("v5 subscribe without filters", (5,), packet(0x82, "0001 00"), PROTOCOL),
    ("subscribe packet id 0", VERSIONS, packet(0x82, "0000 0001 74 00"), PROTOCOL),
    (
        "v4 subscribe a/#/b",
        (4,),
        packet(0x82, "0001 0005 612f232f62 00"),
        ReasonCode.TOPIC_FILTER_INVALID,
    ),
    ("v4 subscribe a+", (4,), packet(0x82, "0001 0002 612b 00"), ReasonCode.TOPIC_FILTER_INVALID),
    ("v4 subscribe empty", (4,), packet(0x82, "0001 0000 00"), ReasonCode.TOPIC_FILTER_INVALID),
    (
        "v5 subscribe a#",
        (5,),
        packet(0x82, "0001 00 0002 6123 00"),
        ReasonCode.TOPIC_FILTER_INVALID,
    ),
    (
        "v5 subscribe $share/g",
        (5,),
        packet(0x82, "0001 00 0008 247368617265 2f67 00"),
        ReasonCode.TOPIC_FILTER_INVALID,
    ),
    ("v4 subscribe QoS 3", (4,), packet(0x82, "0001 0001 74 03"), MALFORMED),
    ("v5 subscribe QoS 3", (5,), packet(0x82, "0001 00 0001 74 03"), MALFORMED),
    ("v4 subscribe reserved bits", (4,), packet(0x82, "0001 0001 74 04"), MALFORMED),
    ("v5 subscribe reserved bits", (5,), packet(0x82, "0001 00 0001 74 40"), MALFORMED),
    ("v5 retain handling 3", (5,), packet(0x82, "0001 00 0001 74 30"), PROTOCOL),
    ("v5 shared no local", (5,), packet(0x82, "0001 00 000a 247368617265 2f672f74 04"), PROTOCOL),
    ("v5 two subscription ids", (5,), packet(0x82, "0001 04 0b01 0b02 0001 74 00"), PROTOCOL),
    ("subscribe missing options", (4,), packet(0x82, "0001 0001 74"), MALFORMED),
    ("v4 unsubscribe without filters", (4,), packet(0xA2, "0001"), PROTOCOL),
    ("v5 unsubscribe without filters", (5,), packet(0xA2, "0001 00"), PROTOCOL),
    (
        "unsubscribe bad filter",
        (4,),
        packet(0xA2, "0001 0003 232f61"),
        ReasonCode.TOPIC_FILTER_INVALID,
    ),
    ("v4 puback with reason", (4,), packet(0x40, "0001 00"), MALFORMED),
    ("puback packet id 0", VERSIONS, packet(0x40, "0000"), PROTOCOL),
    ("puback truncated", VERSIONS, packet(0x40, "00"), MALFORMED),
    ("v5 puback reason 0x81", (5,), packet(0x40, "0001 81"), PROTOCOL),
    ("v5 pubrel reason 0x10", (5,), packet(0x62, "0001 10"), PROTOCOL),
    ("v5 puback trailing", (5,), packet(0x40, "0001 00 00 00"), MALFORMED),
    ("v4 disconnect with body", (4,), packet(0xE0, "00"), MALFORMED),
    ("v5 disconnect reason 0x01", (5,), packet(0xE0, "01"), PROTOCOL),
    ("v5 disconnect assigned id", (5,), packet(0xE0, "00 04 12000178"), MALFORMED),
    ("v4 AUTH is reserved", (4,), h("f0 00"), MALFORMED),
    ("v5 auth reason 0x01", (5,), packet(0xF0, "01 00"), PROTOCOL),
    ("connack from client", VERSIONS, packet(0x20, "0000"), PROTOCOL),
    ("suback from client", VERSIONS, packet(0x90, "0001 00"), PROTOCOL),
    ("unsuback from client", VERSIONS, packet(0xB0, "0001"), PROTOCOL),
    ("pingresp from client", VERSIONS, h("d0 00"), PROTOCOL),
    ("remaining length of 5 bytes", VERSIONS, h("30 80 80 80 80 01"), MALFORMED),
]


@pytest.mark.parametrize(
    ("version", "data", "code"),
    [(v, data, code) for _, versions, data, code in SERVER_CASES for v in versions],
    ids=[f"{name}-v{v}" for name, versions, _, _ in SERVER_CASES for v in versions],
)
def test_malformed_from_client(version: int, data: bytes, code: ReasonCode) -> None:
    assert error_of(connected_decoder(version, server=True), data).reason_code == code


CLIENT_CASES = [
    ("v4 connack reserved flags", (4,), packet(0x20, "02 00"), MALFORMED),
    ("v5 connack reserved flags", (5,), packet(0x20, "80 00 00"), MALFORMED),
    ("v4 connack return code 6", (4,), packet(0x20, "00 06"), PROTOCOL),
    ("v4 connack too long", (4,), packet(0x20, "00 00 00"), MALFORMED),
    ("v5 connack missing properties", (5,), packet(0x20, "00 00"), MALFORMED),
    ("v5 connack reason 0x8e", (5,), packet(0x20, "00 8e 00"), PROTOCOL),
    ("v4 session present on refusal", (4,), packet(0x20, "01 05"), PROTOCOL),
    ("v5 session present on refusal", (5,), packet(0x20, "01 87 00"), PROTOCOL),
    ("v5 connack topic alias", (5,), packet(0x20, "00 00 03 230001"), MALFORMED),
    ("v5 connack maximum QoS 2", (5,), packet(0x20, "00 00 02 2402"), PROTOCOL),
    ("publish before connack", VERSIONS, packet(0x30, "0001 74 00"), PROTOCOL),
    ("pingresp before connack", VERSIONS, h("d0 00"), PROTOCOL),
    ("connect to a client", VERSIONS, V4_CONNECT, PROTOCOL),
]


@pytest.mark.parametrize(
    ("version", "data", "code"),
    [(v, data, code) for _, versions, data, code in CLIENT_CASES for v in versions],
    ids=[f"{name}-v{v}" for name, versions, _, _ in CLIENT_CASES for v in versions],
)
def test_malformed_from_server_before_connack(version: int, data: bytes, code: ReasonCode) -> None:
    decoder = PacketDecoder(version, server=False)
    assert error_of(decoder, data).reason_code == code


CONNECTED_CLIENT_CASES = [
    ("v4 second connack", (4,), packet(0x20, "00 00"), PROTOCOL),
    ("v5 second connack", (5,), packet(0x20, "00 00 00"), PROTOCOL),
    ("v4 disconnect from server", (4,), h("e0 00"), PROTOCOL),
    ("v4 suback code 3", (4,), packet(0x90, "0001 03"), PROTOCOL),
    ("v5 suback code 0x8e", (5,), packet(0x90, "0001 00 8e"), PROTOCOL),
    ("v4 suback without codes", (4,), packet(0x90, "0001"), PROTOCOL),
    ("v4 unsuback with codes", (4,), packet(0xB0, "0001 00"), MALFORMED),
    ("v5 unsuback without codes", (5,), packet(0xB0, "0001 00"), PROTOCOL),
    ("v5 unsuback code 0x10", (5,), packet(0xB0, "0001 00 10"), PROTOCOL),
    ("subscribe to a client", VERSIONS, packet(0x82, "0001 0001 74 00"), PROTOCOL),
    ("pingreq to a client", VERSIONS, h("c0 00"), PROTOCOL),
    ("v5 repeated topic alias", (5,), packet(0x30, "0001 74 06 230001 230001"), PROTOCOL),
]


@pytest.mark.parametrize(
    ("version", "data", "code"),
    [(v, data, code) for _, versions, data, code in CONNECTED_CLIENT_CASES for v in versions],
    ids=[f"{name}-v{v}" for name, versions, _, _ in CONNECTED_CLIENT_CASES for v in versions],
)
def test_malformed_from_server(version: int, data: bytes, code: ReasonCode) -> None:
    assert error_of(connected_decoder(version, server=False), data).reason_code == code


def test_v5_empty_topic_with_alias_is_accepted() -> None:
    (publish,) = connected_decoder(MQTT_5, server=True).feed(packet(0x30, "0000 03 230005 78"))
    assert publish == Publish("", b"x", properties=Properties(topic_alias=5))


def test_v5_auth_before_connack_is_accepted() -> None:
    decoder = PacketDecoder(MQTT_5, server=False)
    assert len(decoder.feed(packet(0xF0, "18 00") + packet(0x20, "00 00 00"))) == 2


# ----------------------------------------------------------------------------- decoder state


def test_error_is_sticky_and_keeps_preceding_packets() -> None:
    decoder = connected_decoder(MQTT_3_1_1, server=True)
    good = encode(Publish("a", b"1"), MQTT_3_1_1) + h("c0 00")
    exc = error_of(decoder, good + packet(0x30, "0001 23"))
    assert exc.packets == [Publish("a", b"1"), PingReq()]
    assert error_of(decoder, h("c0 00")) is exc
    assert exc.packets == []


def test_bytes_after_disconnect_are_ignored() -> None:
    decoder = connected_decoder(MQTT_5, server=True)
    assert decoder.feed(h("c0 00 e0 00 ff ff ff")) == [PingReq(), Disconnect()]
    assert decoder.feed(h("00 00")) == []
    assert decoder.buffered == 0


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        PacketDecoder(server=False)  # a client knows its version
    with pytest.raises(ValueError):
        PacketDecoder(MQTT_5)  # a server learns it from CONNECT
    with pytest.raises(ValueError):
        PacketDecoder(3, server=False)
    with pytest.raises(ValueError):
        PacketDecoder(max_packet_size=1)


# ----------------------------------------------------------------------------- size limit


def test_huge_declared_length_is_refused_before_buffering() -> None:
    decoder = PacketDecoder(max_packet_size=1024)
    decoder.feed(V4_CONNECT)
    # 268,435,455 bytes declared; only the 5 header bytes have arrived.
    exc = error_of(decoder, h("30 ff ff ff 7f"))
    assert exc.reason_code == ReasonCode.PACKET_TOO_LARGE
    assert decoder.buffered == 0


def test_size_limit_counts_the_fixed_header() -> None:
    at_limit = encode(Publish("t", bytes(1000)), MQTT_3_1_1)
    decoder = connected_decoder(MQTT_3_1_1, server=True)
    decoder.max_packet_size = len(at_limit)
    assert len(decoder.feed(at_limit)) == 1
    decoder.max_packet_size = len(at_limit) - 1
    # Refused on the length bytes alone, with the body still to come.
    assert error_of(decoder, at_limit[:3]).reason_code == ReasonCode.PACKET_TOO_LARGE


def test_default_limit_and_partial_packets_are_buffered() -> None:
    decoder = connected_decoder(MQTT_3_1_1, server=True)
    wire = encode(Publish("t", bytes(500_000)), MQTT_3_1_1)
    assert decoder.feed(wire[:100_000]) == []
    assert decoder.buffered == 100_000
    assert decoder.feed(wire[100_000:]) == [Publish("t", bytes(500_000))]
    assert error_of(decoder, encode(Publish("t", bytes(2 << 20)), MQTT_3_1_1)[:10]).reason_code == (
        ReasonCode.PACKET_TOO_LARGE
    )


# ----------------------------------------------------------------------------- encoder checks


@pytest.mark.parametrize(
    ("packet_", "version"),
    [
        (Publish("t", b"", qos=3, packet_id=1), 4),
        (Publish("t", b"", qos=1, packet_id=0), 4),
        (Publish("t", b"", qos=0, dup=True), 5),
        (Publish("t", b"", properties=Properties(topic_alias=1)), 4),
        (Publish("t", b"", properties=Properties(session_expiry_interval=1)), 5),
        (Publish("t", b"", properties=Properties(topic_alias=0)), 5),
        (Publish("\ud800", b""), 5),
        (Publish("t" * 70_000, b""), 5),
        (PubAck(1, ReasonCode.NO_MATCHING_SUBSCRIBERS), 4),
        (PubAck(1, ReasonCode.PROTOCOL_ERROR), 5),
        (PubAck(0), 5),
        (Subscribe(1, []), 4),
        (Subscribe(1, [("a", SubscriptionOptions(1, no_local=True))]), 4),
        (Subscribe(1, [("a", SubscriptionOptions(3))]), 5),
        (UnsubAck(1, [0]), 4),
        (UnsubAck(1), 5),
        (Unsubscribe(1, []), 5),
        (Connect("c", password=b"p"), 4),
        (Connect("c", will=Will("t", b"", qos=3)), 4),
        (Connect("c", keep_alive=70_000), 4),
        (ConnAck(True, 5), 4),
        (ConnAck(False, 6), 4),
        (ConnAck(False, ReasonCode.SESSION_TAKEN_OVER), 5),
        (Disconnect(ReasonCode.SERVER_BUSY), 4),
        (Disconnect(ReasonCode.GRANTED_QOS_1), 5),
        (Publish("t", b"x"), 3),
    ],
)
def test_encoder_refuses_what_cannot_be_sent(packet_: Any, version: int) -> None:
    with pytest.raises(ValueError):
        encode(packet_, version)


def test_encode_rejects_non_packets() -> None:
    with pytest.raises(TypeError):
        encode("PINGREQ", MQTT_5)  # type: ignore[arg-type]


def test_user_properties_keep_order_and_repeats() -> None:
    props = Properties(user_properties=[("b", "1"), ("a", "2"), ("b", "3")])
    wire = encode_publish("t", b"", 0, False, False, 0, MQTT_5, props)
    assert connected_decoder(MQTT_5, server=True).feed(wire) == [Publish("t", properties=props)]


# ----------------------------------------------------------------------------- fuzzing


def _roles() -> list[Callable[[], PacketDecoder]]:
    """Every kind of decoder: fresh server, fresh client, and past the handshake."""
    roles: list[Callable[[], PacketDecoder]] = [lambda: PacketDecoder(max_packet_size=4096)]
    for version in VERSIONS:
        roles.append(functools.partial(PacketDecoder, version, server=False))
        for server in (True, False):
            roles.append(functools.partial(PacketDecoder, version, server=server, connected=True))
    return roles


def _feed_all(decoder: PacketDecoder, chunks: list[bytes]) -> list[Any]:
    """Feed the chunks; only MqttError may escape. Returns the packets decoded."""
    packets: list[Any] = []
    try:
        for chunk in chunks:
            packets += decoder.feed(chunk)
    except MqttError as exc:
        assert isinstance(exc.reason_code, ReasonCode)
        assert exc.reason_code >= 0x80
        packets += exc.packets
    return packets


def _check(role: Callable[[], PacketDecoder], chunks: list[bytes]) -> None:
    """Only MqttError escapes; whatever decodes encodes again and decodes the same."""
    decoder = role()
    packets = _feed_all(decoder, chunks)
    if packets:
        assert decoder.version is not None
        wire = b"".join(encode(p, decoder.version) for p in packets)
        assert role().feed(wire) == packets


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_fuzz_random_bytes(chunks: list[bytes]) -> None:
    for role in _roles():
        _check(role, chunks)


def _mutations(wire: bytes) -> st.SearchStrategy[bytes]:
    n = len(wire)
    flip = st.builds(
        lambda i, x: wire[:i] + bytes((wire[i] ^ x,)) + wire[i + 1 :],
        st.integers(0, n - 1),
        st.integers(1, 255),
    )
    truncate = st.integers(0, n - 1).map(lambda i: wire[:i])
    extend = st.binary(min_size=1, max_size=8).map(lambda extra: wire + extra)
    insert = st.builds(
        lambda i, extra: wire[:i] + extra + wire[i:],
        st.integers(0, n),
        st.binary(min_size=1, max_size=4),
    )
    delete = st.integers(0, n - 1).map(lambda i: wire[:i] + wire[i + 1 :])
    return st.one_of(flip, truncate, extend, insert, delete)


def _mutated(data: st.DataObject, wire: bytes) -> list[bytes]:
    """One to three mutations of ``wire``, cut in two chunks at a random point."""
    for _ in range(data.draw(st.integers(1, 3))):
        wire = data.draw(_mutations(wire)) or b"\x00"
    cut = data.draw(st.integers(0, len(wire)))
    return [wire[:cut], wire[cut:]]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("server", [True, False], ids=["to-server", "to-client"])
@settings(max_examples=80)
@given(data=st.data())
def test_fuzz_mutated_packets(version: int, server: bool, data: st.DataObject) -> None:
    strategies = list(packet_strategies(version, server).values())
    handshake: st.SearchStrategy[Packet] = connects(version) if server else connacks(version)
    first = data.draw(handshake)
    rest: list[Packet] = data.draw(st.lists(st.one_of(*strategies), min_size=1, max_size=2))
    after_handshake = b"".join(encode(p, version) for p in rest)
    fresh = PacketDecoder if server else functools.partial(PacketDecoder, version, server=False)
    _check(fresh, _mutated(data, encode(first, version) + after_handshake))
    connected = functools.partial(PacketDecoder, version, server=server, connected=True)
    _check(connected, _mutated(data, after_handshake))

"""MQTT codec: round trips of every packet type in both versions, and bytes from the specs.

Malformed input, fuzzing and the packet size limit are in test_mqtt_codec_errors.py, which
reuses the packet strategies defined here.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    PROPERTIES,
    Auth,
    ConnAck,
    Connect,
    ConnectReturnCode,
    Disconnect,
    MqttError,
    Packet,
    PacketDecoder,
    PacketType,
    PingReq,
    PingResp,
    Properties,
    PropertyId,
    PropertyType,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    ReasonCode,
    SubAck,
    Subscribe,
    SubscriptionOptions,
    UnsubAck,
    Unsubscribe,
    Will,
    connack_return_code,
    encode,
    encode_publish,
    is_valid_topic_filter,
    is_valid_topic_name,
    split_shared,
)
from realtime.mqtt.properties import WILL
from realtime.mqtt.reason_codes import (
    AUTH_REASON_CODES,
    CONNACK_REASON_CODES,
    DISCONNECT_REASON_CODES,
    PUBACK_REASON_CODES,
    PUBREL_REASON_CODES,
    SUBACK_REASON_CODES,
    UNSUBACK_REASON_CODES,
    V311_SUBACK_CODES,
)
from realtime.mqtt.wire import MAX_VARINT, encode_string, encode_varint, read_string, read_varint

VERSIONS = (MQTT_3_1_1, MQTT_5)

# ----------------------------------------------------------------------------- strategies

# Any MQTT UTF-8 string: no U+0000, no surrogates (neither can be encoded).
texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)
_level = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00+#/"), max_size=6)
topic_names = st.lists(_level, min_size=1, max_size=4).map("/".join).filter(bool)
_filters = st.builds(
    lambda levels, multi: "/".join([*levels, "#"] if multi else levels),
    st.lists(_level | st.just("+"), max_size=4),
    st.booleans(),
).filter(bool)
_share_names = _level.filter(bool)
shared_filters = st.builds(lambda name, f: f"$share/{name}/{f}", _share_names, _filters)
packet_ids = st.integers(1, 0xFFFF)


def _value(spec_kind: PropertyType, low: int | None, high: int | None) -> st.SearchStrategy[Any]:
    limits = {
        PropertyType.BYTE: 0xFF,
        PropertyType.UINT16: 0xFFFF,
        PropertyType.UINT32: 0xFFFF_FFFF,
        PropertyType.VARINT: MAX_VARINT,
    }
    if spec_kind in limits:
        return st.integers(
            low if low is not None else 0, high if high is not None else limits[spec_kind]
        )
    if spec_kind is PropertyType.STRING:
        return texts
    if spec_kind is PropertyType.BINARY:
        return st.binary(max_size=12)
    return st.tuples(texts, texts)


def properties(packet_type: int, *, exclude: frozenset[PropertyId] = frozenset()) -> Any:
    """Valid properties for a packet type (or WILL); None stands for "no properties"."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for spec in PROPERTIES:
        if packet_type not in spec.packets or spec.id in exclude:
            continue
        value = _value(spec.kind, spec.low, spec.high)
        if spec.id == PropertyId.RESPONSE_TOPIC:
            value = topic_names
        if spec.id in (PropertyId.USER_PROPERTY, PropertyId.SUBSCRIPTION_IDENTIFIER):
            repeats = packet_type in spec.repeats_in
            fields[spec.name] = st.lists(value, max_size=3 if repeats else 1)
        else:
            fields[spec.name] = st.none() | value

    def build(kwargs: dict[str, Any]) -> Properties | None:
        props = Properties(**kwargs)
        return None if props == Properties() else props

    return st.none() | st.fixed_dictionaries({}, optional=fields).map(build)


def _codes(codes: frozenset[ReasonCode]) -> st.SearchStrategy[ReasonCode]:
    return st.sampled_from(sorted(codes))


def _v5(version: int, strategy: st.SearchStrategy[Any], default: Any = None) -> Any:
    return strategy if version == MQTT_5 else st.just(default)


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    v5 = version == MQTT_5
    clean_start = draw(st.booleans())
    client_id = draw(texts if v5 or clean_start else texts.filter(bool))
    will = None
    if draw(st.booleans()):
        will = Will(
            draw(topic_names),
            draw(st.binary(max_size=20)),
            draw(st.integers(0, 2)),
            draw(st.booleans()),
            draw(_v5(version, properties(WILL))),
        )
    username = draw(st.none() | texts)
    password = draw(st.none() | st.binary(max_size=12))
    if not v5 and username is None:
        password = None
    props = draw(_v5(version, properties(PacketType.CONNECT)))
    if props is not None and props.authentication_method is None:
        props.authentication_data = None  # data without a method is a protocol error
        if props == Properties():
            props = None
    keep_alive = draw(st.integers(0, 0xFFFF))
    return Connect(client_id, clean_start, keep_alive, username, password, will, props)


@st.composite
def connacks(draw: st.DrawFn, version: int, accepted: bool = False) -> ConnAck:
    if accepted:
        code: int = ReasonCode.SUCCESS
    elif version == MQTT_5:
        code = draw(_codes(CONNACK_REASON_CODES))
    else:
        code = draw(st.sampled_from(ConnectReturnCode))
    session_present = draw(st.booleans()) and not code
    return ConnAck(session_present, code, draw(_v5(version, properties(PacketType.CONNACK))))


@st.composite
def publishes(draw: st.DrawFn, version: int, server: bool) -> Publish:
    qos = draw(st.integers(0, 2))
    # What a client sends (decoded by a server) cannot carry subscription identifiers.
    exclude = frozenset({PropertyId.SUBSCRIPTION_IDENTIFIER}) if server else frozenset()
    props = draw(_v5(version, properties(PacketType.PUBLISH, exclude=exclude)))
    topic = draw(topic_names)
    if props is not None and props.topic_alias is not None and draw(st.booleans()):
        topic = ""  # 5.0: the alias stands for the topic
    return Publish(
        topic,
        draw(st.binary(max_size=300)),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(packet_ids) if qos else 0,
        props,
    )


def acks(cls: type[PubAck | PubRec | PubRel | PubComp], version: int) -> Any:
    codes = PUBACK_REASON_CODES if cls in (PubAck, PubRec) else PUBREL_REASON_CODES
    return st.builds(
        cls,
        packet_ids,
        _v5(version, _codes(codes), ReasonCode.SUCCESS),
        _v5(version, properties(cls.packet_type)),
    )


def _options(version: int, shared: bool) -> st.SearchStrategy[SubscriptionOptions]:
    if version != MQTT_5:
        return st.builds(SubscriptionOptions, st.integers(0, 2))
    return st.builds(
        SubscriptionOptions,
        st.integers(0, 2),
        st.just(False) if shared else st.booleans(),
        st.booleans(),
        st.integers(0, 2),
    )


def subscribes(version: int) -> Any:
    plain = st.tuples(_filters, _options(version, False))
    shared = st.tuples(shared_filters, _options(version, True))
    return st.builds(
        Subscribe,
        packet_ids,
        st.lists(plain | shared if version == MQTT_5 else plain, min_size=1, max_size=4),
        _v5(version, properties(PacketType.SUBSCRIBE)),
    )


def subacks(version: int) -> Any:
    codes = SUBACK_REASON_CODES if version == MQTT_5 else frozenset(V311_SUBACK_CODES)
    return st.builds(
        SubAck,
        packet_ids,
        st.lists(st.sampled_from(sorted(codes)), min_size=1, max_size=5),
        _v5(version, properties(PacketType.SUBACK)),
    )


def unsubscribes(version: int) -> Any:
    return st.builds(
        Unsubscribe,
        packet_ids,
        st.lists(
            _filters | shared_filters if version == MQTT_5 else _filters, min_size=1, max_size=4
        ),
        _v5(version, properties(PacketType.UNSUBSCRIBE)),
    )


def unsubacks(version: int) -> Any:
    return st.builds(
        UnsubAck,
        packet_ids,
        _v5(version, st.lists(_codes(UNSUBACK_REASON_CODES), min_size=1, max_size=4), []),
        _v5(version, properties(PacketType.UNSUBACK)),
    )


def disconnects(version: int) -> Any:
    return st.builds(
        Disconnect,
        _v5(version, _codes(DISCONNECT_REASON_CODES), ReasonCode.SUCCESS),
        _v5(version, properties(PacketType.DISCONNECT)),
    )


def auths() -> Any:
    return st.builds(Auth, _codes(AUTH_REASON_CODES), properties(PacketType.AUTH))


@functools.cache
def packet_strategies(version: int, server: bool) -> dict[str, st.SearchStrategy[Any]]:
    """Packets a decoder in that role receives after the handshake, by name."""
    common: dict[str, st.SearchStrategy[Any]] = {
        "PUBLISH": publishes(version, server),
        "PUBACK": acks(PubAck, version),
        "PUBREC": acks(PubRec, version),
        "PUBREL": acks(PubRel, version),
        "PUBCOMP": acks(PubComp, version),
    }
    if server:
        common |= {
            "SUBSCRIBE": subscribes(version),
            "UNSUBSCRIBE": unsubscribes(version),
            "PINGREQ": st.just(PingReq()),
            "DISCONNECT": disconnects(version),
        }
    else:
        common |= {
            "SUBACK": subacks(version),
            "UNSUBACK": unsubacks(version),
            "PINGRESP": st.just(PingResp()),
        }
        if version == MQTT_5:
            common["DISCONNECT"] = disconnects(version)
    if version == MQTT_5:
        common["AUTH"] = auths()
    return common


def connected_decoder(version: int, server: bool) -> PacketDecoder:
    return PacketDecoder(version, server=server, connected=True)


def feed_in_pieces(decoder: PacketDecoder, data: bytes, cuts: list[int]) -> list[Packet]:
    packets: list[Packet] = []
    start = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        packets += decoder.feed(data[start:cut])
        start = cut
    packets += decoder.feed(data[start:])
    return packets


cut_points = st.lists(st.integers(0, 10_000), max_size=6)

# ----------------------------------------------------------------------------- round trips

ROLES = [(version, server) for version in VERSIONS for server in (True, False)]
CASES = [
    (version, server, name)
    for version, server in ROLES
    for name in packet_strategies(version, server)
]


@pytest.mark.parametrize(("version", "server", "name"), CASES)
@settings(max_examples=30)
@given(data=st.data(), cuts=cut_points)
def test_round_trip(
    version: int, server: bool, name: str, data: st.DataObject, cuts: list[int]
) -> None:
    packet = data.draw(packet_strategies(version, server)[name])
    encoded = encode(packet, version)
    assert feed_in_pieces(connected_decoder(version, server), encoded, cuts) == [packet]


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=60)
@given(data=st.data(), cuts=cut_points)
def test_connect_round_trip_teaches_the_version(
    version: int, data: st.DataObject, cuts: list[int]
) -> None:
    connect = data.draw(connects(version))
    decoder = PacketDecoder()
    assert decoder.version is None
    assert feed_in_pieces(decoder, encode(connect, version), cuts) == [connect]
    assert decoder.version == version


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=40)
@given(data=st.data(), cuts=cut_points)
def test_connack_round_trip(version: int, data: st.DataObject, cuts: list[int]) -> None:
    connack = data.draw(connacks(version))
    decoder = PacketDecoder(version, server=False)
    assert feed_in_pieces(decoder, encode(connack, version), cuts) == [connack]


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=25)
@given(data=st.data(), cuts=cut_points)
def test_session_streams_split_anywhere(version: int, data: st.DataObject, cuts: list[int]) -> None:
    """A whole conversation in each direction, as one byte stream cut at random points."""
    to_server: list[Packet] = [data.draw(connects(version))]
    to_client: list[Packet] = [data.draw(connacks(version, accepted=True))]
    for server, stream in ((True, to_server), (False, to_client)):
        # DISCONNECT ends a stream; it has its own round trip.
        options = [s for n, s in packet_strategies(version, server).items() if n != "DISCONNECT"]
        stream += data.draw(st.lists(st.one_of(*options), max_size=8))
    server_decoder = PacketDecoder()
    client_decoder = PacketDecoder(version, server=False)
    wire = b"".join(encode(p, version) for p in to_server)
    assert feed_in_pieces(server_decoder, wire, cuts) == to_server
    wire = b"".join(encode(p, version) for p in to_client)
    assert feed_in_pieces(client_decoder, wire, cuts) == to_client
    assert server_decoder.buffered == client_decoder.buffered == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_byte_at_a_time(version: int) -> None:
    packets: list[Packet] = [
        Publish("a/b", b"x" * 200, 1, packet_id=7),
        PingReq(),
        Subscribe(1, [("a/+/c", SubscriptionOptions(1))]),
        Publish("c", b"", 0),
    ]
    wire = b"".join(encode(p, version) for p in packets)
    decoder = connected_decoder(version, server=True)
    out: list[Packet] = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i : i + 1])
    assert out == packets
    assert decoder.buffered == 0


def test_buffer_only_while_a_packet_is_split() -> None:
    """No buffer is held between whole packets: idle connections keep none."""
    wire = encode(Publish("a/b", b"x" * 100), MQTT_3_1_1)
    decoder = connected_decoder(MQTT_3_1_1, server=True)
    assert decoder.feed(wire) == [Publish("a/b", b"x" * 100)]
    assert decoder._buffer is None
    assert decoder.feed(wire[:10]) == []
    assert decoder.buffered == 10
    assert decoder.feed(wire[10:] + wire[:1]) == [Publish("a/b", b"x" * 100)]
    assert decoder.buffered == 1
    assert decoder.feed(wire[1:]) == [Publish("a/b", b"x" * 100)]
    assert decoder.buffered == 0 and decoder._buffer is None


def test_error_stays_readable() -> None:
    decoder = connected_decoder(MQTT_3_1_1, server=True)
    assert decoder.error is None
    with pytest.raises(MqttError) as raised:
        decoder.feed(b"\x00\x00")  # reserved packet type 0
    assert decoder.error is raised.value


@pytest.mark.parametrize("version", VERSIONS)
@given(
    topic=topic_names,
    payload=st.binary(max_size=20_000),
    qos=st.integers(0, 2),
    retain=st.booleans(),
    data=st.data(),
)
def test_encode_publish_matches_encode(
    version: int, topic: str, payload: bytes, qos: int, retain: bool, data: st.DataObject
) -> None:
    dup = data.draw(st.booleans()) if qos else False
    packet_id = data.draw(packet_ids) if qos else 0
    props = data.draw(_v5(version, properties(PacketType.PUBLISH)))
    fast = encode_publish(topic, payload, qos, retain, dup, packet_id, version, props)
    packet = Publish(topic, payload, qos, retain, dup, packet_id, props)
    assert fast == encode(packet, version)
    assert connected_decoder(version, server=False).feed(fast) == [packet]


def test_decoder_accepts_bytearray_and_memoryview() -> None:
    wire = encode(Publish("t", b"payload"), MQTT_5)
    for data in (bytearray(wire), memoryview(wire)):
        (packet,) = connected_decoder(MQTT_5, server=True).feed(data)
        assert isinstance(packet, Publish)
        assert type(packet.payload) is bytes


# ----------------------------------------------------------------------------- spec bytes


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def test_v311_connect_from_the_spec() -> None:
    # CONNECT, protocol "MQTT" level 4, clean session, keep alive 60, client id "abc".
    wire = h("10 0f 0004 4d515454 04 02 003c 0003 616263")
    decoder = PacketDecoder()
    assert decoder.feed(wire) == [Connect("abc", clean_start=True, keep_alive=60)]
    assert decoder.version == MQTT_3_1_1
    assert encode(Connect("abc", keep_alive=60), MQTT_3_1_1) == wire


def test_v311_connect_with_will_username_password() -> None:
    wire = h(
        "10 25 0004 4d515454 04 ee 000a"  # flags: user, password, will retain, will QoS 1, will
        "0002 6964"  # client id "id"
        "0003 612f77 0004 64656164"  # will topic "a/w", will message "dead"
        "0004 75736572 0004 70617373"  # username "user", password "pass"
    )
    connect = Connect("id", True, 10, "user", b"pass", Will("a/w", b"dead", 1, True))
    assert PacketDecoder().feed(wire) == [connect]
    assert encode(connect, MQTT_3_1_1) == wire


def test_v5_connect_with_a_property() -> None:
    # Level 5, clean start, keep alive 60, Receive Maximum 20, empty client id.
    wire = h("10 10 0004 4d515454 05 02 003c 03 210014 0000")
    decoder = PacketDecoder()
    assert decoder.feed(wire) == [Connect("", True, 60, properties=Properties(receive_maximum=20))]
    assert decoder.version == MQTT_5
    assert encode(decoder_packet(wire), MQTT_5) == wire


def decoder_packet(wire: bytes) -> Packet:
    (packet,) = PacketDecoder().feed(wire)
    return packet


def test_ping_and_disconnect_bytes() -> None:
    for version in VERSIONS:
        server = connected_decoder(version, server=True)
        assert server.feed(h("c000")) == [PingReq()]
        assert encode(PingReq(), version) == h("c000")
        assert connected_decoder(version, server=False).feed(h("d000")) == [PingResp()]
        assert encode(PingResp(), version) == h("d000")
        assert server.feed(h("e000")) == [Disconnect()]
        assert encode(Disconnect(), version) == h("e000")


def test_v5_connack_with_a_property() -> None:
    # Success, no session, Topic Alias Maximum 10.
    wire = h("20 06 00 00 03 22000a")
    connack = ConnAck(False, ReasonCode.SUCCESS, Properties(topic_alias_maximum=10))
    assert PacketDecoder(MQTT_5, server=False).feed(wire) == [connack]
    assert encode(connack, MQTT_5) == wire


def test_v311_connack_bytes() -> None:
    decoder = PacketDecoder(MQTT_3_1_1, server=False)
    assert decoder.feed(h("20 02 01 00")) == [ConnAck(True, ConnectReturnCode.ACCEPTED)]
    assert encode(ConnAck(False, ConnectReturnCode.NOT_AUTHORIZED), MQTT_3_1_1) == h("20020005")


def test_v311_publish_from_the_spec() -> None:
    # Topic "a/b", packet identifier 10 (3.1.1 figure 3.11), QoS 1, payload "hi".
    wire = h("32 09 0003 612f62 000a 6869")
    publish = Publish("a/b", b"hi", qos=1, packet_id=10)
    assert connected_decoder(MQTT_3_1_1, server=True).feed(wire) == [publish]
    assert encode_publish("a/b", b"hi", 1, False, False, 10, MQTT_3_1_1) == wire


def test_v5_publish_with_properties() -> None:
    # QoS 0, retain, topic "t", properties: Payload Format Indicator 1, User Property (k, v),
    # then the payload "{}".
    wire = h("31 0f 0001 74 09 0101 26 0001 6b 0001 76 7b7d")
    props = Properties(payload_format_indicator=1, user_properties=[("k", "v")])
    publish = Publish("t", b"{}", retain=True, properties=props)
    assert connected_decoder(MQTT_5, server=True).feed(wire) == [publish]
    assert encode(publish, MQTT_5) == wire


def test_v5_publish_to_a_client_with_subscription_identifiers() -> None:
    wire = h("30 09 0001 74 04 0b01 0b02 78")
    publish = Publish("t", b"x", properties=Properties(subscription_identifiers=[1, 2]))
    assert connected_decoder(MQTT_5, server=False).feed(wire) == [publish]
    assert encode(publish, MQTT_5) == wire


def test_v311_subscribe_and_suback_from_the_spec() -> None:
    # Packet identifier 10; "a/b" at QoS 1 and "c/d" at QoS 2 (3.1.1 section 3.8).
    wire = h("82 0e 000a 0003 612f62 01 0003 632f64 02")
    subscribe = Subscribe(10, [("a/b", SubscriptionOptions(1)), ("c/d", SubscriptionOptions(2))])
    assert connected_decoder(MQTT_3_1_1, server=True).feed(wire) == [subscribe]
    assert encode(subscribe, MQTT_3_1_1) == wire
    suback = h("90 05 000a 00 02 80")
    assert connected_decoder(MQTT_3_1_1, server=False).feed(suback) == [SubAck(10, [0, 2, 0x80])]


def test_v5_subscribe_options_byte() -> None:
    # No local, retain as published, retain handling 2, QoS 1: 0b0010_1101.
    wire = h("82 09 0001 00 0003 612f62 2d")
    options = SubscriptionOptions(1, no_local=True, retain_as_published=True, retain_handling=2)
    subscribe = Subscribe(1, [("a/b", options)])
    assert connected_decoder(MQTT_5, server=True).feed(wire) == [subscribe]
    assert encode(subscribe, MQTT_5) == wire


def test_v5_short_acks_and_disconnect() -> None:
    # The reason code and property length may be left out (5.0 3.4.2.1, 3.14.2.1).
    client = connected_decoder(MQTT_5, server=False)
    assert client.feed(h("40 02 0001")) == [PubAck(1)]
    assert client.feed(h("40 03 0001 10")) == [PubAck(1, ReasonCode.NO_MATCHING_SUBSCRIBERS)]
    assert client.feed(h("40 04 0001 10 00")) == [PubAck(1, ReasonCode.NO_MATCHING_SUBSCRIBERS)]
    assert encode(PubAck(1, ReasonCode.NO_MATCHING_SUBSCRIBERS), MQTT_5) == h("40 03 0001 10")
    assert client.feed(h("e0 01 8e")) == [Disconnect(ReasonCode.SESSION_TAKEN_OVER)]
    client = connected_decoder(MQTT_5, server=False)
    assert client.feed(h("e0 02 8e 00")) == [Disconnect(ReasonCode.SESSION_TAKEN_OVER)]
    assert encode(Disconnect(ReasonCode.SESSION_TAKEN_OVER), MQTT_5) == h("e0 01 8e")
    assert encode(PubRel(5), MQTT_5) == h("62 02 0005")


def test_v311_unsubscribe_and_unsuback() -> None:
    wire = h("a2 07 0003 0003 612f2b")
    assert connected_decoder(MQTT_3_1_1, server=True).feed(wire) == [Unsubscribe(3, ["a/+"])]
    assert encode(UnsubAck(3), MQTT_3_1_1) == h("b0 02 0003")


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, "00"),
        (127, "7f"),
        (128, "8001"),
        (16_383, "ff7f"),
        (16_384, "808001"),
        (2_097_151, "ffff7f"),
        (2_097_152, "80808001"),
        (268_435_455, "ffffff7f"),
    ],
)
def test_variable_byte_integers_from_the_spec(value: int, wire: str) -> None:
    assert encode_varint(value) == h(wire)
    assert read_varint(h(wire), 0, len(wire) // 2) == (value, len(wire) // 2)


def test_remaining_length_of_two_to_four_bytes() -> None:
    for size in (127, 128, 16_383, 16_384, 300_000):
        publish = Publish("t", bytes(size))
        (packet,) = connected_decoder(MQTT_3_1_1, server=True).feed(encode(publish, MQTT_3_1_1))
        assert packet == publish


def test_non_minimal_remaining_length_is_accepted() -> None:
    # PINGREQ with remaining length 0 written on two bytes: not minimal, not malformed.
    assert connected_decoder(MQTT_3_1_1, server=True).feed(h("c0 80 00")) == [PingReq()]


def test_utf8_string_from_the_spec() -> None:
    # "A" then U+2A6D4 (3.1.1 figure 1.3).
    wire = h("0005 41 f0aa9b94")
    assert encode_string("A\U0002a6d4") == wire
    assert read_string(wire, 0, len(wire)) == ("A\U0002a6d4", 7)
    # A byte order mark is a character like any other, not skipped.
    assert read_string(h("0003 efbbbf"), 0, 5) == ("\ufeff", 5)


# ----------------------------------------------------------------------------- topics, codes


def test_topic_syntax() -> None:
    assert is_valid_topic_name("a/b/c")
    assert is_valid_topic_name("/")
    assert not is_valid_topic_name("")
    assert not is_valid_topic_name("a/+")
    assert not is_valid_topic_name("a/#")
    for good in ("#", "+", "a/#", "+/+/#", "a/+/b", "/", "$SYS/#", "a//b"):
        assert is_valid_topic_filter(good), good
    for bad in ("", "a#", "a/#/b", "a+", "a/b+/c", "#/a", "++"):
        assert not is_valid_topic_filter(bad), bad
    assert is_valid_topic_filter("$share/g/a/+", shared=True)
    assert split_shared("$share/g/a/+") == ("g", "a/+")
    for bad in ("$share/g", "$share//a", "$share/g+/a", "$share/g/", "$share/g/a#"):
        assert not is_valid_topic_filter(bad, shared=True), bad
    assert is_valid_topic_filter("$share/g")  # 3.1.1: just a filter


def test_reason_code_names() -> None:
    expected = {
        "MALFORMED_PACKET": 0x81,
        "PROTOCOL_ERROR": 0x82,
        "RECEIVE_MAXIMUM_EXCEEDED": 0x93,
        "TOPIC_ALIAS_INVALID": 0x94,
        "PACKET_TOO_LARGE": 0x95,
        "WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED": 0xA2,
        "NORMAL_DISCONNECTION": 0,
        "GRANTED_QOS_0": 0,
    }
    for name, value in expected.items():
        assert ReasonCode[name] == value
    assert len({int(code) for code in ReasonCode}) == 43
    assert connack_return_code(ReasonCode.UNSUPPORTED_PROTOCOL_VERSION) == 1
    assert connack_return_code(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID) == 2
    assert connack_return_code(ReasonCode.SERVER_BUSY) == 3
    assert connack_return_code(ReasonCode.BAD_USER_NAME_OR_PASSWORD) == 4
    assert connack_return_code(ReasonCode.NOT_AUTHORIZED) == 5


def test_property_registry_matches_the_dataclass() -> None:
    names = {spec.name for spec in PROPERTIES}
    assert names == set(Properties.__dataclass_fields__)
    assert len({spec.id for spec in PROPERTIES}) == len(PROPERTIES) == 27

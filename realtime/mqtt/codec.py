"""Sans-I/O MQTT 3.1.1 / 5.0 codec: `encode` packets to bytes, `PacketDecoder` bytes to packets.

No sockets, no event loop: the session layer feeds whatever the transport delivered and writes
whatever `encode` returns. The decoder checks everything a packet can be checked for on its
own (fixed header flags, lengths, UTF-8, wildcards, property placement, reason codes, which
packet types may travel in which direction and in which order) and raises `MqttError` with
the reason code the spec prescribes. Checks that need session state (packet identifiers in
use, topic alias maximum, receive maximum, authorization) belong to the session.

PUBLISH is the hot path both ways: `encode_publish` builds a packet once per publication (the
same bytes go to every QoS 0 subscriber) and `PacketDecoder.feed` decodes PUBLISH inline,
without parsing properties when the property length is 0.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import cache
from typing import Any, Final

from realtime.mqtt.errors import MqttError, malformed, protocol_error
from realtime.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
    VERSIONS,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    SubscriptionOptions,
    UnsubAck,
    Unsubscribe,
    Will,
)
from realtime.mqtt.properties import WILL, decode_properties, encode_properties
from realtime.mqtt.reason_codes import (
    AUTH_REASON_CODES,
    CONNACK_REASON_CODES,
    DISCONNECT_REASON_CODES,
    PUBACK_REASON_CODES,
    PUBREL_REASON_CODES,
    SUBACK_REASON_CODES,
    UNSUBACK_REASON_CODES,
    V311_SUBACK_CODES,
    ConnectReturnCode,
    ReasonCode,
)
from realtime.mqtt.topics import is_valid_topic_filter, is_valid_topic_name
from realtime.mqtt.wire import (
    MAX_UINT16,
    MAX_VARINT,
    check_packet_id,
    encode_binary,
    encode_string,
    encode_varint,
    pack_uint16,
    read_binary,
    read_string,
)

# The largest packet the wire format can describe: fixed header byte, 4-byte length, body.
MAX_PACKET_SIZE: Final = 1 + 4 + MAX_VARINT
# Decoder default: generous for devices, small enough that a hostile length prefix cannot
# make a connection hold hundreds of megabytes. Sessions pass their configured limit.
DEFAULT_MAX_PACKET_SIZE: Final = 1 << 20

P = PacketType
_PROTOCOL_NAME: Final = b"\x00\x04MQTT"
_pack_head1 = struct.Struct(">BBH").pack  # fixed header with a 1-byte length + topic length
_pack_head2 = struct.Struct(">BBBH").pack  # same with a 2-byte length


# ----------------------------------------------------------------------------- encoding


def _check_version(version: int) -> None:
    if version not in VERSIONS:
        raise ValueError(f"unsupported MQTT protocol level: {version!r} (4 or 5)")


def _frame(first: int, body: bytes) -> bytes:
    length = len(body)
    if length < 0x80:
        return bytes((first, length)) + body
    return bytes((first,)) + encode_varint(length) + body


def _v5_only(packet: object, version: int, what: str) -> None:
    if version != MQTT_5:
        raise ValueError(f"{type(packet).__name__}: {what} needs MQTT 5")


def encode_publish(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    packet_id: int,
    version: int,
    properties: Properties | None = None,
) -> bytes:
    """One PUBLISH packet. The topic is trusted (checked by whoever accepted it)."""
    raw_topic = topic.encode()
    topic_len = len(raw_topic)
    if topic_len > MAX_UINT16:
        raise ValueError(f"topic too long for MQTT: {topic_len} bytes")
    if qos == 0:
        if dup or packet_id:
            raise ValueError("a QoS 0 PUBLISH has no DUP flag and no packet identifier")
        packet_id_bytes = b""
        first = 0x30
    elif qos == 1 or qos == 2:
        check_packet_id(packet_id)
        packet_id_bytes = pack_uint16(packet_id)
        first = 0x38 | qos << 1 if dup else 0x30 | qos << 1
    else:
        raise ValueError(f"QoS must be 0, 1 or 2, not {qos!r}")
    if retain:
        first |= 1
    if version == MQTT_5:
        props = b"\x00" if properties is None else encode_properties(properties, P.PUBLISH)
    elif version == MQTT_3_1_1:
        if properties is not None:
            raise ValueError("PUBLISH: properties need MQTT 5")
        props = b""
    else:
        _check_version(version)
        props = b""
    length = 2 + topic_len + len(packet_id_bytes) + len(props) + len(payload)
    if length < 0x80:
        head = _pack_head1(first, length, topic_len)
    elif length < 0x4000:
        head = _pack_head2(first, length & 0x7F | 0x80, length >> 7, topic_len)
    else:
        head = bytes((first,)) + encode_varint(length) + pack_uint16(topic_len)
    return b"".join((head, raw_topic, packet_id_bytes, props, payload))


def _encode_publish(packet: Publish, version: int) -> bytes:
    return encode_publish(
        packet.topic,
        packet.payload,
        packet.qos,
        packet.retain,
        packet.dup,
        packet.packet_id,
        version,
        packet.properties,
    )


def _encode_connect(packet: Connect, version: int) -> bytes:
    flags = 0x02 if packet.clean_start else 0
    if not 0 <= packet.keep_alive <= MAX_UINT16:
        raise ValueError(f"CONNECT: keep alive must be 0..65535, not {packet.keep_alive}")
    v5 = version == MQTT_5
    if not v5 and packet.properties is not None:
        _v5_only(packet, version, "properties")
    payload = [encode_string(packet.client_id)]
    will = packet.will
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise ValueError(f"CONNECT: will QoS must be 0, 1 or 2, not {will.qos!r}")
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        if v5:
            payload.append(encode_properties(will.properties, WILL))
        elif will.properties is not None:
            _v5_only(packet, version, "will properties")
        payload.append(encode_string(will.topic))
        payload.append(encode_binary(will.payload))
    if packet.username is not None:
        flags |= 0x80
        payload.append(encode_string(packet.username))
    if packet.password is not None:
        if packet.username is None and not v5:
            raise ValueError("CONNECT: MQTT 3.1.1 needs a username to send a password")
        flags |= 0x40
        payload.append(encode_binary(packet.password))
    header = _PROTOCOL_NAME + bytes((version, flags)) + pack_uint16(packet.keep_alive)
    if v5:
        header += encode_properties(packet.properties, P.CONNECT)
    return _frame(0x10, header + b"".join(payload))


def _encode_connack(packet: ConnAck, version: int) -> bytes:
    code = packet.reason_code
    if packet.session_present and code:
        raise ValueError("CONNACK: a refusal cannot have session present set")
    flags = 1 if packet.session_present else 0
    if version == MQTT_5:
        if code not in CONNACK_REASON_CODES:
            raise ValueError(f"CONNACK: reason code 0x{code:02X} is not allowed")
        return _frame(0x20, bytes((flags, code)) + encode_properties(packet.properties, P.CONNACK))
    if packet.properties is not None:
        _v5_only(packet, version, "properties")
    if code not in ConnectReturnCode._value2member_map_:
        raise ValueError(f"CONNACK: MQTT 3.1.1 return code must be 0..5, not {code}")
    return bytes((0x20, 2, flags, code))


def _ack_encoder(
    first: int, codes: frozenset[ReasonCode]
) -> Callable[[PubAck | PubRec | PubRel | PubComp, int], bytes]:
    def encode_ack(packet: PubAck | PubRec | PubRel | PubComp, version: int) -> bytes:
        check_packet_id(packet.packet_id)
        head = pack_uint16(packet.packet_id)
        code = packet.reason_code
        props = packet.properties
        if version == MQTT_5:
            if code not in codes:
                raise ValueError(f"{type(packet).__name__}: reason code 0x{code:02X} not allowed")
            if props is not None:
                return _frame(first, head + bytes((code,)) + encode_properties(props, first >> 4))
            if code:
                return bytes((first, 3)) + head + bytes((code,))
        elif code or props is not None:
            _v5_only(packet, version, "a reason code or properties")
        return bytes((first, 2)) + head

    return encode_ack


def _encode_subscribe(packet: Subscribe, version: int) -> bytes:
    check_packet_id(packet.packet_id)
    if not packet.subscriptions:
        raise ValueError("SUBSCRIBE: needs at least one topic filter")
    parts = [pack_uint16(packet.packet_id)]
    if version == MQTT_5:
        parts.append(encode_properties(packet.properties, P.SUBSCRIBE))
    elif packet.properties is not None:
        _v5_only(packet, version, "properties")
    for topic_filter, options in packet.subscriptions:
        if options.qos not in (0, 1, 2) or options.retain_handling not in (0, 1, 2):
            raise ValueError(f"SUBSCRIBE: invalid options for {topic_filter!r}: {options}")
        byte = options.qos
        if options.no_local or options.retain_as_published or options.retain_handling:
            _v5_only(packet, version, "subscription options other than QoS")
            byte |= (
                (4 if options.no_local else 0)
                | (8 if options.retain_as_published else 0)
                | options.retain_handling << 4
            )
        parts.append(encode_string(topic_filter) + bytes((byte,)))
    return _frame(0x82, b"".join(parts))


def _encode_suback(packet: SubAck, version: int) -> bytes:
    check_packet_id(packet.packet_id)
    if not packet.reason_codes:
        raise ValueError("SUBACK: needs at least one reason code")
    allowed = SUBACK_REASON_CODES if version == MQTT_5 else V311_SUBACK_CODES
    for code in packet.reason_codes:
        if code not in allowed:
            raise ValueError(f"SUBACK: reason code 0x{code:02X} is not allowed")
    head = pack_uint16(packet.packet_id)
    if version == MQTT_5:
        head += encode_properties(packet.properties, P.SUBACK)
    elif packet.properties is not None:
        _v5_only(packet, version, "properties")
    return _frame(0x90, head + bytes(packet.reason_codes))


def _encode_unsubscribe(packet: Unsubscribe, version: int) -> bytes:
    check_packet_id(packet.packet_id)
    if not packet.topic_filters:
        raise ValueError("UNSUBSCRIBE: needs at least one topic filter")
    parts = [pack_uint16(packet.packet_id)]
    if version == MQTT_5:
        parts.append(encode_properties(packet.properties, P.UNSUBSCRIBE))
    elif packet.properties is not None:
        _v5_only(packet, version, "properties")
    parts.extend(encode_string(topic_filter) for topic_filter in packet.topic_filters)
    return _frame(0xA2, b"".join(parts))


def _encode_unsuback(packet: UnsubAck, version: int) -> bytes:
    check_packet_id(packet.packet_id)
    head = pack_uint16(packet.packet_id)
    if version != MQTT_5:
        if packet.reason_codes or packet.properties is not None:
            _v5_only(packet, version, "reason codes or properties")
        return bytes((0xB0, 2)) + head
    if not packet.reason_codes:
        raise ValueError("UNSUBACK: MQTT 5 needs one reason code per topic filter")
    for code in packet.reason_codes:
        if code not in UNSUBACK_REASON_CODES:
            raise ValueError(f"UNSUBACK: reason code 0x{code:02X} is not allowed")
    props = encode_properties(packet.properties, P.UNSUBACK)
    return _frame(0xB0, head + props + bytes(packet.reason_codes))


def _encode_pingreq(packet: PingReq, version: int) -> bytes:
    return b"\xc0\x00"


def _encode_pingresp(packet: PingResp, version: int) -> bytes:
    return b"\xd0\x00"


def _encode_disconnect(packet: Disconnect, version: int) -> bytes:
    code = packet.reason_code
    if version != MQTT_5:
        if code or packet.properties is not None:
            _v5_only(packet, version, "a reason code or properties")
        return b"\xe0\x00"
    if code not in DISCONNECT_REASON_CODES:
        raise ValueError(f"DISCONNECT: reason code 0x{code:02X} is not allowed")
    if packet.properties is not None:
        return _frame(0xE0, bytes((code,)) + encode_properties(packet.properties, P.DISCONNECT))
    return bytes((0xE0, 1, code)) if code else b"\xe0\x00"


def _encode_auth(packet: Auth, version: int) -> bytes:
    _v5_only(packet, version, "AUTH")
    code = packet.reason_code
    if code not in AUTH_REASON_CODES:
        raise ValueError(f"AUTH: reason code 0x{code:02X} is not allowed")
    if not code and packet.properties is None:
        return b"\xf0\x00"
    return _frame(0xF0, bytes((code,)) + encode_properties(packet.properties, P.AUTH))


_ENCODERS: Final[dict[type, Callable[[Any, int], bytes]]] = {
    Connect: _encode_connect,
    ConnAck: _encode_connack,
    Publish: _encode_publish,
    PubAck: _ack_encoder(0x40, PUBACK_REASON_CODES),
    PubRec: _ack_encoder(0x50, PUBACK_REASON_CODES),
    PubRel: _ack_encoder(0x62, PUBREL_REASON_CODES),
    PubComp: _ack_encoder(0x70, PUBREL_REASON_CODES),
    Subscribe: _encode_subscribe,
    SubAck: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    UnsubAck: _encode_unsuback,
    PingReq: _encode_pingreq,
    PingResp: _encode_pingresp,
    Disconnect: _encode_disconnect,
    Auth: _encode_auth,
}


def encode(packet: Packet, version: int) -> bytes:
    """The bytes of one packet for protocol level ``version`` (4: 3.1.1, 5: 5.0).

    Raises ValueError for a packet the version cannot carry or the spec forbids sending
    (properties in 3.1.1, packet identifier 0, a reason code not valid for the packet...).
    String contents are trusted: callers pass topics and filters they validated.
    """
    _check_version(version)
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise TypeError(f"not an MQTT packet: {packet!r}")
    return encoder(packet, version)


# ----------------------------------------------------------------------------- decoding
#
# Each decoder below gets the packet body as data[pos:end] and must consume it exactly:
# bytes left over make the packet malformed.


def _packet_id(data: bytes, pos: int, end: int, name: str) -> int:
    if end - pos < 2:
        raise malformed(f"{name}: truncated packet identifier")
    packet_id = (data[pos] << 8) | data[pos + 1]
    if not packet_id:
        raise protocol_error(f"{name}: packet identifier 0")
    return packet_id


def _trailing(pos: int, end: int, name: str) -> None:
    if pos != end:
        raise malformed(f"{name}: {end - pos} unexpected bytes at the end of the packet")


def _reason(code: int, allowed: frozenset[int], name: str) -> ReasonCode:
    if code not in allowed:
        raise protocol_error(f"{name}: reason code 0x{code:02X} is not allowed")
    return ReasonCode(code)


def _check_response_topic(props: Properties | None, name: str) -> None:
    topic = None if props is None else props.response_topic
    if topic is not None and not is_valid_topic_name(topic):
        raise protocol_error(f"{name}: invalid response topic {topic!r}")


def _decode_connack(data: bytes, pos: int, end: int, version: int) -> ConnAck:
    if end - pos < 2:
        raise malformed("CONNACK: truncated")
    flags = data[pos]
    code = data[pos + 1]
    if flags & 0xFE:
        raise malformed("CONNACK: reserved acknowledge flags are set")
    props = None
    reason: int
    if version == MQTT_5:
        reason = _reason(code, CONNACK_REASON_CODES, "CONNACK")
        if end - pos < 3:
            raise malformed("CONNACK: missing property length")
        props, pos = decode_properties(data, pos + 2, end, P.CONNACK)
        _trailing(pos, end, "CONNACK")
    else:
        _trailing(pos + 2, end, "CONNACK")
        if code not in ConnectReturnCode._value2member_map_:
            raise protocol_error(f"CONNACK: reserved return code {code}")
        reason = ConnectReturnCode(code)
    if flags and code:
        raise protocol_error("CONNACK: session present set on a refusal")
    return ConnAck(bool(flags), reason, props)


def _ack_decoder(
    cls: type[PubAck | PubRec | PubRel | PubComp], allowed: frozenset[ReasonCode]
) -> Callable[[bytes, int, int, int], Packet]:
    name = cls.packet_type.name
    ptype = cls.packet_type

    def decode_ack(data: bytes, pos: int, end: int, version: int) -> Packet:
        packet_id = _packet_id(data, pos, end, name)
        length = end - pos
        if length == 2:
            return cls(packet_id)
        if version != MQTT_5:
            raise malformed(f"{name}: remaining length must be 2, not {length}")
        reason = _reason(data[pos + 2], allowed, name)
        # Remaining length 3: the reason code without a property length (5.0 3.4.2.2).
        props = None
        if length > 3:
            props, pos = decode_properties(data, pos + 3, end, ptype)
            _trailing(pos, end, name)
        return cls(packet_id, reason, props)

    return decode_ack


def _subscription(data: bytes, pos: int, end: int) -> tuple[str, int, int]:
    topic_filter, pos = read_string(data, pos, end)
    if pos >= end:
        raise malformed("SUBSCRIBE: missing subscription options")
    return topic_filter, data[pos], pos + 1


# Shared option instances for 3.1.1, where only the QoS varies.
_QOS_OPTIONS: Final = tuple(SubscriptionOptions(qos) for qos in range(3))


def _decode_subscribe(data: bytes, pos: int, end: int, version: int) -> Subscribe:
    packet_id = _packet_id(data, pos, end, "SUBSCRIBE")
    pos += 2
    props = None
    v5 = version == MQTT_5
    if v5:
        props, pos = decode_properties(data, pos, end, P.SUBSCRIBE)
    subscriptions: list[tuple[str, SubscriptionOptions]] = []
    while pos < end:
        topic_filter, byte, pos = _subscription(data, pos, end)
        if byte & 0x03 == 3:
            raise malformed(f"SUBSCRIBE: QoS 3 for {topic_filter!r}")
        if not v5:
            if byte & 0xFC:
                raise malformed(f"SUBSCRIBE: reserved option bits set for {topic_filter!r}")
            if not is_valid_topic_filter(topic_filter):
                raise MqttError(
                    ReasonCode.TOPIC_FILTER_INVALID, f"SUBSCRIBE: invalid filter {topic_filter!r}"
                )
            subscriptions.append((topic_filter, _QOS_OPTIONS[byte]))
            continue
        if byte & 0xC0:
            raise malformed(f"SUBSCRIBE: reserved option bits set for {topic_filter!r}")
        retain_handling = (byte >> 4) & 0x03
        if retain_handling == 3:
            raise protocol_error(f"SUBSCRIBE: retain handling 3 for {topic_filter!r}")
        if not is_valid_topic_filter(topic_filter, shared=True):
            raise MqttError(
                ReasonCode.TOPIC_FILTER_INVALID, f"SUBSCRIBE: invalid filter {topic_filter!r}"
            )
        no_local = bool(byte & 0x04)
        if no_local and topic_filter.startswith("$share/"):
            raise protocol_error(f"SUBSCRIBE: no local on shared subscription {topic_filter!r}")
        options = SubscriptionOptions(byte & 0x03, no_local, bool(byte & 0x08), retain_handling)
        subscriptions.append((topic_filter, options))
    if not subscriptions:
        raise protocol_error("SUBSCRIBE: no topic filter")
    return Subscribe(packet_id, subscriptions, props)


def _decode_suback(data: bytes, pos: int, end: int, version: int) -> SubAck:
    packet_id = _packet_id(data, pos, end, "SUBACK")
    pos += 2
    props = None
    if version == MQTT_5:
        props, pos = decode_properties(data, pos, end, P.SUBACK)
        allowed: frozenset[int] = SUBACK_REASON_CODES
    else:
        allowed = V311_SUBACK_CODES
    if pos >= end:
        raise protocol_error("SUBACK: no return code")
    codes: list[int] = [_reason(code, allowed, "SUBACK") for code in data[pos:end]]
    return SubAck(packet_id, codes, props)


def _decode_unsubscribe(data: bytes, pos: int, end: int, version: int) -> Unsubscribe:
    packet_id = _packet_id(data, pos, end, "UNSUBSCRIBE")
    pos += 2
    props = None
    v5 = version == MQTT_5
    if v5:
        props, pos = decode_properties(data, pos, end, P.UNSUBSCRIBE)
    topic_filters: list[str] = []
    while pos < end:
        topic_filter, pos = read_string(data, pos, end)
        if not is_valid_topic_filter(topic_filter, shared=v5):
            raise MqttError(
                ReasonCode.TOPIC_FILTER_INVALID, f"UNSUBSCRIBE: invalid filter {topic_filter!r}"
            )
        topic_filters.append(topic_filter)
    if not topic_filters:
        raise protocol_error("UNSUBSCRIBE: no topic filter")
    return Unsubscribe(packet_id, topic_filters, props)


def _decode_unsuback(data: bytes, pos: int, end: int, version: int) -> UnsubAck:
    packet_id = _packet_id(data, pos, end, "UNSUBACK")
    pos += 2
    if version != MQTT_5:
        _trailing(pos, end, "UNSUBACK")
        return UnsubAck(packet_id)
    props, pos = decode_properties(data, pos, end, P.UNSUBACK)
    if pos >= end:
        raise protocol_error("UNSUBACK: no reason code")
    codes: list[int] = [_reason(code, UNSUBACK_REASON_CODES, "UNSUBACK") for code in data[pos:end]]
    return UnsubAck(packet_id, codes, props)


def _decode_pingreq(data: bytes, pos: int, end: int, version: int) -> PingReq:
    _trailing(pos, end, "PINGREQ")
    return PingReq()


def _decode_pingresp(data: bytes, pos: int, end: int, version: int) -> PingResp:
    _trailing(pos, end, "PINGRESP")
    return PingResp()


def _decode_disconnect(data: bytes, pos: int, end: int, version: int) -> Disconnect:
    if pos == end:
        return Disconnect()
    if version != MQTT_5:
        raise malformed("DISCONNECT: remaining length must be 0")
    reason = _reason(data[pos], DISCONNECT_REASON_CODES, "DISCONNECT")
    props = None
    if end - pos > 1:
        props, pos = decode_properties(data, pos + 1, end, P.DISCONNECT)
        _trailing(pos, end, "DISCONNECT")
    return Disconnect(reason, props)


def _decode_auth(data: bytes, pos: int, end: int, version: int) -> Auth:
    if pos == end:
        return Auth()
    reason = _reason(data[pos], AUTH_REASON_CODES, "AUTH")
    props = None
    if end - pos > 1:
        props, pos = decode_properties(data, pos + 1, end, P.AUTH)
        _trailing(pos, end, "AUTH")
    return Auth(reason, props)


_DECODERS: Final[dict[int, Callable[[bytes, int, int, int], Packet]]] = {
    P.CONNACK: _decode_connack,
    P.PUBACK: _ack_decoder(PubAck, PUBACK_REASON_CODES),
    P.PUBREC: _ack_decoder(PubRec, PUBACK_REASON_CODES),
    P.PUBREL: _ack_decoder(PubRel, PUBREL_REASON_CODES),
    P.PUBCOMP: _ack_decoder(PubComp, PUBREL_REASON_CODES),
    P.SUBSCRIBE: _decode_subscribe,
    P.SUBACK: _decode_suback,
    P.UNSUBSCRIBE: _decode_unsubscribe,
    P.UNSUBACK: _decode_unsuback,
    P.PINGREQ: _decode_pingreq,
    P.PINGRESP: _decode_pingresp,
    P.DISCONNECT: _decode_disconnect,
    P.AUTH: _decode_auth,
}

_FLAGS_0010: Final = frozenset({P.PUBREL, P.SUBSCRIBE, P.UNSUBSCRIBE})
_COMMON: Final = frozenset({P.PUBLISH, P.PUBACK, P.PUBREC, P.PUBREL, P.PUBCOMP, P.DISCONNECT})
_FROM_CLIENT: Final = _COMMON | {P.SUBSCRIBE, P.UNSUBSCRIBE, P.PINGREQ, P.AUTH}
_FROM_SERVER: Final = _COMMON | {P.SUBACK, P.UNSUBACK, P.PINGRESP, P.AUTH}


def _allowed_types(version: int | None, server: bool, connected: bool) -> frozenset[int]:
    if server:
        allowed = _FROM_CLIENT if connected else frozenset({P.CONNECT})
    else:
        allowed = _FROM_SERVER if connected else frozenset({P.CONNACK, P.AUTH})
        if version != MQTT_5:
            allowed -= {P.DISCONNECT}  # a 3.1.1 server just closes
    if version != MQTT_5:
        allowed -= {P.AUTH}
    return allowed


def _first_byte_error(
    first: int, version: int | None, server: bool, connected: bool
) -> MqttError | None:
    """Why a fixed header byte is refused in this state; None when it is accepted."""
    ptype = first >> 4
    flags = first & 0x0F
    if ptype == 0 or (ptype == P.AUTH and version == MQTT_3_1_1):
        return malformed(f"reserved packet type {ptype}")
    name = P(ptype).name
    if ptype == P.PUBLISH:
        if flags & 0x06 == 0x06:
            return malformed("PUBLISH: QoS 3")
        if flags & 0x0E == 0x08:
            return malformed("PUBLISH: DUP set on a QoS 0 message")
    elif flags != (2 if ptype in _FLAGS_0010 else 0):
        return malformed(f"{name}: invalid fixed header flags 0x{flags:X}")
    if ptype not in _allowed_types(version, server, connected):
        if server and not connected:
            return protocol_error(f"{name} before CONNECT")
        if not server and not connected:
            return protocol_error(f"{name} before CONNACK")
        if ptype in (P.CONNECT, P.CONNACK):
            return protocol_error(f"second {name}")
        sender = "client" if server else "server"
        return protocol_error(f"{name} cannot come from the {sender} in MQTT level {version}")
    return None


@cache
def _first_byte_table(version: int | None, server: bool, connected: bool) -> bytes:
    """One entry per fixed header byte: 0 if acceptable in this state, else the refusal code."""
    errors = (_first_byte_error(first, version, server, connected) for first in range(256))
    return bytes(0 if error is None else error.reason_code for error in errors)


class _State:
    """Where a decoder is, and what it accepts there. Immutable, and shared by every decoder
    in the same state: a connection's decoder holds little more than a pointer to it."""

    __slots__ = ("closed", "connected", "max_packet_size", "server", "table", "version")

    def __init__(
        self, version: int | None, server: bool, connected: bool, closed: bool, max_packet_size: int
    ) -> None:
        self.version = version
        self.server = server
        self.connected = connected
        self.closed = closed  # after a DISCONNECT: later bytes are ignored
        self.max_packet_size = max_packet_size
        self.table = _first_byte_table(version, server, connected)


@cache
def _state(
    version: int | None, server: bool, connected: bool, closed: bool, max_packet_size: int
) -> _State:
    return _State(version, server, connected, closed, max_packet_size)


class PacketDecoder:
    """Streaming decoder for one direction of one connection.

    ``server=True`` decodes what a client sends (the first packet must be CONNECT, whose
    protocol level sets `version`); ``server=False`` decodes what a server sends to a client of
    the given ``version`` (the first packet must be CONNACK, or AUTH in 5.0). ``connected=True``
    starts after that handshake, with ``version`` given.

    `feed` takes bytes as they arrive, split anywhere, and returns the complete packets. A
    packet whose declared size exceeds ``max_packet_size`` (fixed header included, as 5.0
    Maximum Packet Size counts it) is refused as soon as its length is read, before its body
    is buffered. After an `MqttError` the decoder is dead: every later `feed` raises it again.
    After a DISCONNECT, later bytes are ignored (the sender must not send any).
    """

    __slots__ = ("_buffer", "_error", "_need", "_state")

    def __init__(
        self,
        version: int | None = None,
        *,
        server: bool = True,
        connected: bool = False,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    ) -> None:
        if version is not None:
            _check_version(version)
        if version is None and (connected or not server):
            raise ValueError("a client, or a server past CONNECT, must know the version")
        if version is not None and server and not connected:
            raise ValueError("a server learns the version from CONNECT: pass connected=True")
        if not 2 <= max_packet_size <= MAX_PACKET_SIZE:
            raise ValueError(f"max_packet_size must be 2..{MAX_PACKET_SIZE}")
        self._state = _state(version, server, connected, False, max_packet_size)
        # Only while a packet is split across chunks: idle connections hold no buffer.
        self._buffer: bytearray | None = None
        self._need = 0  # bytes the buffer must hold before the next packet can be decoded
        self._error: MqttError | None = None

    @property
    def version(self) -> int | None:
        """The protocol level: given, or learnt from CONNECT (None until then)."""
        return self._state.version

    @property
    def server(self) -> bool:
        return self._state.server

    @property
    def max_packet_size(self) -> int:
        return self._state.max_packet_size

    @max_packet_size.setter
    def max_packet_size(self, value: int) -> None:
        state = self._state
        self._state = _state(state.version, state.server, state.connected, state.closed, value)

    def _enter(self, version: int | None, connected: bool, closed: bool = False) -> None:
        state = self._state
        self._state = _state(version, state.server, connected, closed, state.max_packet_size)

    @property
    def buffered(self) -> int:
        """Bytes held for a packet that is not complete yet."""
        return len(self._buffer) if self._buffer is not None else 0

    @property
    def error(self) -> MqttError | None:
        """The error that ended the stream (raised by `feed`), if any."""
        return self._error

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[Packet]:
        """Take the next bytes of the stream; return the packets they complete, in order."""
        if self._error is not None:
            self._error.packets = []  # those were handed out with the first raise
            raise self._error
        state = self._state
        if state.closed:
            return []
        buffer = self._buffer
        if buffer is not None:
            buffer += chunk
            if len(buffer) < self._need:
                return []
            data = bytes(buffer)
            self._buffer = None
        elif type(chunk) is bytes:
            data = chunk
        else:
            data = bytes(chunk)  # payloads are sliced out of it and must be bytes
        packets: list[Packet] = []
        append = packets.append
        end = len(data)
        pos = 0
        table = state.table
        limit = state.max_packet_size
        v5 = state.version == MQTT_5
        try:
            # The loop is one function on purpose: PUBLISH is decoded inline, without a call.
            while pos < end:
                first = data[pos]
                if table[first]:
                    error = _first_byte_error(first, state.version, state.server, state.connected)
                    assert error is not None
                    raise error
                # Remaining length: a variable byte integer of 1 to 4 bytes.
                if pos + 1 >= end:
                    self._need = 2
                    break
                byte = data[pos + 1]
                if byte < 0x80:
                    body = pos + 2
                    length = byte
                elif pos + 2 < end and data[pos + 2] < 0x80:  # 128..16383 bytes
                    body = pos + 3
                    length = (byte & 0x7F) | (data[pos + 2] << 7)
                else:
                    length = byte & 0x7F
                    body = pos + 2
                    shift = 7
                    while True:
                        if body >= end:
                            length = -1
                            break
                        byte = data[body]
                        body += 1
                        length |= (byte & 0x7F) << shift
                        if byte < 0x80:
                            break
                        if shift == 21:
                            raise malformed("remaining length longer than 4 bytes")
                        shift += 7
                    if length < 0:
                        self._need = body - pos + 1
                        break
                stop = body + length
                if stop - pos > limit:
                    raise MqttError(
                        ReasonCode.PACKET_TOO_LARGE,
                        f"packet of {stop - pos} bytes exceeds the maximum of {limit}",
                    )
                if stop > end:
                    self._need = stop - pos
                    break

                if first >> 4 != 3:
                    append(self._decode_other(first >> 4, data, body, stop))
                    pos = stop
                    state = self._state
                    if state.closed:
                        break
                    table = state.table
                    v5 = state.version == MQTT_5
                    continue

                # PUBLISH; its fixed header flags were checked through the table.
                if length < 2:
                    raise malformed("PUBLISH: truncated topic name")
                p = body + 2 + ((data[body] << 8) | data[body + 1])
                if p > stop:
                    raise malformed("PUBLISH: topic name runs past the end of the packet")
                try:
                    topic = data[body + 2 : p].decode()
                except UnicodeDecodeError as exc:
                    raise malformed(f"PUBLISH: invalid UTF-8 topic name: {exc.reason}") from None
                # Searching the str is several times faster than searching the bytes.
                if "\x00" in topic:
                    raise malformed("PUBLISH: topic name contains U+0000")
                if "+" in topic or "#" in topic:
                    raise MqttError(
                        ReasonCode.TOPIC_NAME_INVALID, f"PUBLISH: wildcard in topic name {topic!r}"
                    )
                qos = (first >> 1) & 0x03
                if qos:
                    if p + 2 > stop:
                        raise malformed("PUBLISH: truncated packet identifier")
                    packet_id = (data[p] << 8) | data[p + 1]
                    if not packet_id:
                        raise protocol_error("PUBLISH: packet identifier 0")
                    p += 2
                else:
                    packet_id = 0
                props = None
                if v5:
                    if p >= stop:
                        raise malformed("PUBLISH: missing property length")
                    if data[p]:
                        props, p = decode_properties(data, p, stop, P.PUBLISH)
                        self._check_publish_properties(props, topic)
                    else:
                        p += 1
                if not topic and props is None:
                    raise protocol_error("PUBLISH: empty topic name without a topic alias")
                append(
                    Publish(
                        topic, data[p:stop], qos, first & 1 == 1, first & 8 == 8, packet_id, props
                    )
                )
                pos = stop
        except MqttError as exc:
            exc.packets = packets
            self._error = exc
            raise
        if pos < end and not state.closed:
            self._buffer = bytearray(memoryview(data)[pos:])
        return packets

    def _check_publish_properties(self, props: Properties | None, topic: str) -> None:
        if props is None:
            return
        if not topic and props.topic_alias is None:
            raise protocol_error("PUBLISH: empty topic name without a topic alias")
        if self._state.server and props.subscription_identifiers:
            raise protocol_error("PUBLISH: subscription identifier from a client")
        _check_response_topic(props, "PUBLISH")

    def _decode_other(self, ptype: int, data: bytes, pos: int, end: int) -> Packet:
        if ptype == P.CONNECT:
            packet: Packet = self._decode_connect(data, pos, end)
            self._enter(self._state.version, True)
            return packet
        state = self._state
        assert state.version is not None  # the table refuses all but CONNECT until known
        packet = _DECODERS[ptype](data, pos, end, state.version)
        if ptype == P.CONNACK:
            self._enter(state.version, True)
        elif ptype == P.DISCONNECT:
            self._enter(state.version, state.connected, closed=True)
        return packet

    def _decode_connect(self, data: bytes, pos: int, end: int) -> Connect:
        name, pos = read_string(data, pos, end)
        if pos >= end:
            raise malformed("CONNECT: missing protocol level")
        level = data[pos]
        pos += 1
        if name == "MQIsdp":
            raise MqttError(ReasonCode.UNSUPPORTED_PROTOCOL_VERSION, "CONNECT: MQTT 3.1")
        if name != "MQTT":
            raise protocol_error(f"CONNECT: protocol name {name!r} is not MQTT")
        if level not in VERSIONS:
            raise MqttError(
                ReasonCode.UNSUPPORTED_PROTOCOL_VERSION, f"CONNECT: protocol level {level}"
            )
        # Known from here on, so that a later fault in this CONNECT is answered in its dialect.
        self._enter(level, False)
        v5 = level == MQTT_5
        if end - pos < 3:
            raise malformed("CONNECT: truncated variable header")
        flags = data[pos]
        keep_alive = (data[pos + 1] << 8) | data[pos + 2]
        pos += 3
        if flags & 0x01:
            raise malformed("CONNECT: reserved flag set")
        will_flag = flags & 0x04
        will_qos = (flags >> 3) & 0x03
        will_retain = bool(flags & 0x20)
        if will_flag:
            if will_qos == 3:
                raise malformed("CONNECT: will QoS 3")
        elif will_qos or will_retain:
            raise malformed("CONNECT: will QoS or retain set without a will")
        has_username = flags & 0x80
        has_password = flags & 0x40
        if has_password and not has_username and not v5:
            raise malformed("CONNECT: password without a username")
        props = None
        if v5:
            props, pos = decode_properties(data, pos, end, P.CONNECT)
            if (
                props is not None
                and props.authentication_data is not None
                and props.authentication_method is None
            ):
                raise protocol_error("CONNECT: authentication data without a method")
        client_id, pos = read_string(data, pos, end)
        clean_start = bool(flags & 0x02)
        if not client_id and not clean_start and not v5:
            raise MqttError(
                ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                "CONNECT: empty client identifier needs a clean session",
            )
        will = None
        if will_flag:
            will_props = None
            if v5:
                will_props, pos = decode_properties(data, pos, end, WILL)
                _check_response_topic(will_props, "CONNECT will")
            will_topic, pos = read_string(data, pos, end)
            if not is_valid_topic_name(will_topic):
                raise MqttError(
                    ReasonCode.TOPIC_NAME_INVALID, f"CONNECT: invalid will topic {will_topic!r}"
                )
            will_payload, pos = read_binary(data, pos, end)
            will = Will(will_topic, will_payload, will_qos, will_retain, will_props)
        username = password = None
        if has_username:
            username, pos = read_string(data, pos, end)
        if has_password:
            password, pos = read_binary(data, pos, end)
        _trailing(pos, end, "CONNECT")
        return Connect(client_id, clean_start, keep_alive, username, password, will, props)

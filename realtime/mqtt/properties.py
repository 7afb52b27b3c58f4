"""MQTT 5.0 properties (spec 2.2.2): the registry of identifiers and their wire encoding.

Each property has an identifier, a data type, the packets it may appear in and, for some, the
values the spec allows. Per spec 2.2.2.2 an identifier not valid for its packet type (or an
unknown one) makes the packet malformed; a property repeated where only one is allowed, or a
value the spec forbids (0 for Receive Maximum, 2 for a boolean-like byte...), is a protocol
error. Only User Property repeats everywhere; Subscription Identifier repeats in PUBLISH.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum
from operator import attrgetter
from typing import Any, Final

from realtime.mqtt.errors import MqttError, malformed, protocol_error
from realtime.mqtt.packets import PacketType, Properties
from realtime.mqtt.reason_codes import ReasonCode
from realtime.mqtt.wire import (
    MAX_UINT16,
    MAX_UINT32,
    MAX_VARINT,
    encode_binary,
    encode_string,
    encode_varint,
    pack_uint16,
    pack_uint32,
    read_binary,
    read_string,
    read_varint,
)

# Pseudo packet type for the will properties inside CONNECT (0 is no real packet type).
WILL: Final = 0


class PropertyId(IntEnum):
    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


class PropertyType(Enum):
    BYTE = "byte"
    UINT16 = "two byte integer"
    UINT32 = "four byte integer"
    VARINT = "variable byte integer"
    STRING = "UTF-8 string"
    BINARY = "binary data"
    STRING_PAIR = "UTF-8 string pair"


@dataclass(frozen=True, slots=True)
class PropertySpec:
    id: PropertyId
    name: str  # the `Properties` field
    kind: PropertyType
    packets: frozenset[int]  # packet types (and WILL) that may carry it
    repeats_in: frozenset[int] = frozenset()  # where it may appear more than once
    low: int | None = None  # allowed integer range, when narrower than the type's
    high: int | None = None
    error: ReasonCode = ReasonCode.PROTOCOL_ERROR  # for a value outside low..high


P = PacketType
T = PropertyType
_ALL: Final = frozenset(P) | {WILL}

PROPERTIES: Final[tuple[PropertySpec, ...]] = (
    PropertySpec(PropertyId.PAYLOAD_FORMAT_INDICATOR, "payload_format_indicator", T.BYTE,
                 frozenset({P.PUBLISH, WILL}), low=0, high=1),
    PropertySpec(PropertyId.MESSAGE_EXPIRY_INTERVAL, "message_expiry_interval", T.UINT32,
                 frozenset({P.PUBLISH, WILL})),
    PropertySpec(PropertyId.CONTENT_TYPE, "content_type", T.STRING,
                 frozenset({P.PUBLISH, WILL})),
    PropertySpec(PropertyId.RESPONSE_TOPIC, "response_topic", T.STRING,
                 frozenset({P.PUBLISH, WILL})),
    PropertySpec(PropertyId.CORRELATION_DATA, "correlation_data", T.BINARY,
                 frozenset({P.PUBLISH, WILL})),
    PropertySpec(PropertyId.SUBSCRIPTION_IDENTIFIER, "subscription_identifiers", T.VARINT,
                 frozenset({P.PUBLISH, P.SUBSCRIBE}), repeats_in=frozenset({P.PUBLISH}),
                 low=1, high=MAX_VARINT),
    PropertySpec(PropertyId.SESSION_EXPIRY_INTERVAL, "session_expiry_interval", T.UINT32,
                 frozenset({P.CONNECT, P.CONNACK, P.DISCONNECT})),
    PropertySpec(PropertyId.ASSIGNED_CLIENT_IDENTIFIER, "assigned_client_identifier", T.STRING,
                 frozenset({P.CONNACK})),
    PropertySpec(PropertyId.SERVER_KEEP_ALIVE, "server_keep_alive", T.UINT16,
                 frozenset({P.CONNACK})),
    PropertySpec(PropertyId.AUTHENTICATION_METHOD, "authentication_method", T.STRING,
                 frozenset({P.CONNECT, P.CONNACK, P.AUTH})),
    PropertySpec(PropertyId.AUTHENTICATION_DATA, "authentication_data", T.BINARY,
                 frozenset({P.CONNECT, P.CONNACK, P.AUTH})),
    PropertySpec(PropertyId.REQUEST_PROBLEM_INFORMATION, "request_problem_information", T.BYTE,
                 frozenset({P.CONNECT}), low=0, high=1),
    PropertySpec(PropertyId.WILL_DELAY_INTERVAL, "will_delay_interval", T.UINT32,
                 frozenset({WILL})),
    PropertySpec(PropertyId.REQUEST_RESPONSE_INFORMATION, "request_response_information",
                 T.BYTE, frozenset({P.CONNECT}), low=0, high=1),
    PropertySpec(PropertyId.RESPONSE_INFORMATION, "response_information", T.STRING,
                 frozenset({P.CONNACK})),
    PropertySpec(PropertyId.SERVER_REFERENCE, "server_reference", T.STRING,
                 frozenset({P.CONNACK, P.DISCONNECT})),
    PropertySpec(PropertyId.REASON_STRING, "reason_string", T.STRING,
                 frozenset({P.CONNACK, P.PUBACK, P.PUBREC, P.PUBREL, P.PUBCOMP, P.SUBACK,
                            P.UNSUBACK, P.DISCONNECT, P.AUTH})),
    PropertySpec(PropertyId.RECEIVE_MAXIMUM, "receive_maximum", T.UINT16,
                 frozenset({P.CONNECT, P.CONNACK}), low=1, high=MAX_UINT16),
    PropertySpec(PropertyId.TOPIC_ALIAS_MAXIMUM, "topic_alias_maximum", T.UINT16,
                 frozenset({P.CONNECT, P.CONNACK})),
    # The upper bound is the receiver's Topic Alias Maximum: a session check.
    PropertySpec(PropertyId.TOPIC_ALIAS, "topic_alias", T.UINT16, frozenset({P.PUBLISH}),
                 low=1, high=MAX_UINT16, error=ReasonCode.TOPIC_ALIAS_INVALID),
    PropertySpec(PropertyId.MAXIMUM_QOS, "maximum_qos", T.BYTE, frozenset({P.CONNACK}),
                 low=0, high=1),
    PropertySpec(PropertyId.RETAIN_AVAILABLE, "retain_available", T.BYTE,
                 frozenset({P.CONNACK}), low=0, high=1),
    PropertySpec(PropertyId.USER_PROPERTY, "user_properties", T.STRING_PAIR,
                 _ALL - {P.PINGREQ, P.PINGRESP}, repeats_in=_ALL),
    PropertySpec(PropertyId.MAXIMUM_PACKET_SIZE, "maximum_packet_size", T.UINT32,
                 frozenset({P.CONNECT, P.CONNACK}), low=1, high=MAX_UINT32),
    PropertySpec(PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE, "wildcard_subscription_available",
                 T.BYTE, frozenset({P.CONNACK}), low=0, high=1),
    PropertySpec(PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
                 "subscription_identifier_available", T.BYTE, frozenset({P.CONNACK}),
                 low=0, high=1),
    PropertySpec(PropertyId.SHARED_SUBSCRIPTION_AVAILABLE, "shared_subscription_available",
                 T.BYTE, frozenset({P.CONNACK}), low=0, high=1),
)  # fmt: skip

# Internal tables: integer kind codes and plain tuples, because Enum member lookups and
# dataclass attribute reads were a large share of the per-property cost.
_BYTE, _UINT16, _UINT32, _VARINT, _STRING, _BINARY, _PAIR = range(7)
_KIND: Final = {
    T.BYTE: _BYTE,
    T.UINT16: _UINT16,
    T.UINT32: _UINT32,
    T.VARINT: _VARINT,
    T.STRING: _STRING,
    T.BINARY: _BINARY,
    T.STRING_PAIR: _PAIR,
}
_TYPE_MAX: Final = {_BYTE: 0xFF, _UINT16: MAX_UINT16, _UINT32: MAX_UINT32, _VARINT: MAX_VARINT}
_LISTS: Final = frozenset({PropertyId.SUBSCRIPTION_IDENTIFIER, PropertyId.USER_PROPERTY})

# (spec, field name, kind, allowed packets, low, high, is a list field); low is None when
# any value of the type is allowed.
_Entry = tuple[PropertySpec, str, int, frozenset[int], int | None, int, bool]


def _entry(spec: PropertySpec) -> _Entry:
    kind = _KIND[spec.kind]
    high = spec.high if spec.high is not None else _TYPE_MAX.get(kind, 0)
    return (spec, spec.name, kind, spec.packets, spec.low, high, spec.id in _LISTS)


# Indexed by identifier byte; identifiers are one byte in 5.0 (a VBI below 0x80).
_BY_ID: Final[tuple[_Entry | None, ...]] = tuple(
    next((_entry(spec) for spec in PROPERTIES if spec.id == i), None) for i in range(256)
)
_IN_ORDER: Final = tuple(_entry(spec) for spec in PROPERTIES)
_ID_BYTE: Final = {spec.name: bytes((spec.id,)) for spec in PROPERTIES}


def _getter(entries: list[_Entry]) -> Callable[[Properties], tuple[Any, ...]]:
    names = [entry[1] for entry in entries]
    if not names:
        return lambda props: ()
    if len(names) == 1:
        return lambda props: (getattr(props, names[0]),)
    getter: Callable[[Properties], tuple[Any, ...]] = attrgetter(*names)
    return getter


# Per packet type: the fields it may carry (and a getter for them), and a getter for all the
# others with the value they must have (None, or [] for lists). Encoding then looks at a few
# fields instead of all 27: with 27 a Python loop costs more than the encoding.
_Plan = tuple[
    tuple[_Entry, ...],
    Callable[[Properties], tuple[Any, ...]],
    tuple[_Entry, ...],
    Callable[[Properties], tuple[Any, ...]],
    tuple[Any, ...],
]


def _plan(packet_type: int) -> _Plan:
    allowed = [entry for entry in _IN_ORDER if packet_type in entry[3]]
    others = [entry for entry in _IN_ORDER if packet_type not in entry[3]]
    unset: tuple[Any, ...] = tuple([] if entry[6] else None for entry in others)
    return (tuple(allowed), _getter(allowed), tuple(others), _getter(others), unset)


_PLANS: Final = {packet_type: _plan(packet_type) for packet_type in (*PacketType, WILL)}


def _where(packet_type: int) -> str:
    return "will properties" if packet_type == WILL else PacketType(packet_type).name


def decode_properties(
    data: bytes, pos: int, end: int, packet_type: int
) -> tuple[Properties | None, int]:
    """Read a property length and the properties after it; None when the length is 0."""
    length, pos = read_varint(data, pos, end)
    if not length:
        return None, pos
    stop = pos + length
    if stop > end:
        raise malformed(f"{_where(packet_type)}: property length runs past the end of the packet")
    props = Properties()
    while pos < stop:
        ident = data[pos]
        pos += 1
        entry = _BY_ID[ident]
        if entry is None:
            raise malformed(f"{_where(packet_type)}: unknown property identifier 0x{ident:02X}")
        spec, name, kind, packets, low, high, is_list = entry
        if packet_type not in packets:
            raise malformed(f"{_where(packet_type)}: property {name} is not allowed here")
        value: Any
        if kind == _STRING:
            value, pos = read_string(data, pos, stop)
        elif kind == _BYTE:
            if pos >= stop:
                raise malformed(f"{_where(packet_type)}: truncated property {name}")
            value = data[pos]
            pos += 1
        elif kind == _UINT16:
            if pos + 2 > stop:
                raise malformed(f"{_where(packet_type)}: truncated property {name}")
            value = (data[pos] << 8) | data[pos + 1]
            pos += 2
        elif kind == _UINT32:
            if pos + 4 > stop:
                raise malformed(f"{_where(packet_type)}: truncated property {name}")
            value = int.from_bytes(data[pos : pos + 4], "big")
            pos += 4
        elif kind == _PAIR:
            key, pos = read_string(data, pos, stop)
            text, pos = read_string(data, pos, stop)
            value = (key, text)
        elif kind == _VARINT:
            value, pos = read_varint(data, pos, stop)
        else:
            value, pos = read_binary(data, pos, stop)
        if low is not None and not low <= value <= high:
            raise MqttError(spec.error, f"{_where(packet_type)}: property {name} cannot be {value}")
        if is_list:
            values: list[Any] = getattr(props, name)
            if values and packet_type not in spec.repeats_in:
                raise protocol_error(f"{_where(packet_type)}: property {name} repeated")
            values.append(value)
        elif getattr(props, name) is not None:
            raise protocol_error(f"{_where(packet_type)}: property {name} repeated")
        else:
            setattr(props, name, value)
    return props, stop


def _encode_value(entry: _Entry, value: Any) -> bytes:
    _, name, kind, _, low, high, _ = entry
    if kind == _STRING:
        return encode_string(value)
    if kind == _PAIR:
        key, text = value
        return encode_string(key) + encode_string(text)
    if kind == _BINARY:
        return encode_binary(value)
    low = low or 0
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"property {name} must be an integer in {low}..{high}: {value!r}")
    if kind == _BYTE:
        return bytes((value,))
    if kind == _UINT16:
        return pack_uint16(value)
    if kind == _UINT32:
        return pack_uint32(value)
    return encode_varint(value)


def encode_properties(props: Properties | None, packet_type: int) -> bytes:
    """The property length and the properties, in identifier order; ``b"\\x00"`` for None."""
    if props is None:
        return b"\x00"
    allowed, get_allowed, others, get_others, unset = _PLANS[packet_type]
    values = get_others(props)
    if values != unset:
        name = next(e[1] for e, v, u in zip(others, values, unset, strict=True) if v != u)
        raise ValueError(f"{_where(packet_type)}: property {name} is not allowed")
    parts: list[bytes] = []
    for entry, value in zip(allowed, get_allowed(props), strict=True):
        if value is None:
            continue
        spec, name, _, _, _, _, is_list = entry
        if is_list:
            if not value:
                continue
            if len(value) > 1 and packet_type not in spec.repeats_in:
                raise ValueError(f"{_where(packet_type)}: property {name} cannot repeat")
        ident = _ID_BYTE[name]
        for item in value if is_list else (value,):
            parts.append(ident)
            parts.append(_encode_value(entry, item))
    body = b"".join(parts)
    return encode_varint(len(body)) + body

"""MQTT control packets as plain data: one slotted dataclass per packet type.

The same classes serve 3.1.1 (protocol level 4) and 5.0 (level 5); the version is an argument
of `encode` and a property of the decoder, not of the packets. Fields that 3.1.1 cannot carry
(properties, reason codes other than success, subscription options other than QoS) must keep
their defaults when encoding for 3.1.1, and decode as those defaults.

``properties`` is None when a packet has no properties (a zero property length): the decoder
never builds an empty `Properties` on the hot path. A 3.1.1 CONNACK's ``reason_code`` holds the
3.1.1 return code (`ConnectReturnCode`, 0-5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, Final

from realtime.mqtt.reason_codes import ReasonCode

MQTT_3_1_1: Final = 4
MQTT_5: Final = 5
VERSIONS: Final = (MQTT_3_1_1, MQTT_5)


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15  # 5.0 only; reserved in 3.1.1


@dataclass(slots=True)
class Properties:
    """MQTT 5.0 properties (spec 2.2.2.2), one field per property identifier; None = absent.

    Which property a packet may carry, and how each is encoded, is in
    `realtime.mqtt.properties.PROPERTIES`. User properties keep their order and may repeat;
    a PUBLISH from the server may carry several subscription identifiers.
    """

    payload_format_indicator: int | None = None  # 0x01
    message_expiry_interval: int | None = None  # 0x02
    content_type: str | None = None  # 0x03
    response_topic: str | None = None  # 0x08
    correlation_data: bytes | None = None  # 0x09
    subscription_identifiers: list[int] = field(default_factory=list)  # 0x0B
    session_expiry_interval: int | None = None  # 0x11
    assigned_client_identifier: str | None = None  # 0x12
    server_keep_alive: int | None = None  # 0x13
    authentication_method: str | None = None  # 0x15
    authentication_data: bytes | None = None  # 0x16
    request_problem_information: int | None = None  # 0x17
    will_delay_interval: int | None = None  # 0x18
    request_response_information: int | None = None  # 0x19
    response_information: str | None = None  # 0x1A
    server_reference: str | None = None  # 0x1C
    reason_string: str | None = None  # 0x1F
    receive_maximum: int | None = None  # 0x21
    topic_alias_maximum: int | None = None  # 0x22
    topic_alias: int | None = None  # 0x23
    maximum_qos: int | None = None  # 0x24
    retain_available: int | None = None  # 0x25
    user_properties: list[tuple[str, str]] = field(default_factory=list)  # 0x26
    maximum_packet_size: int | None = None  # 0x27
    wildcard_subscription_available: int | None = None  # 0x28
    subscription_identifier_available: int | None = None  # 0x29
    shared_subscription_available: int | None = None  # 0x2A


@dataclass(slots=True, frozen=True)
class SubscriptionOptions:
    qos: int = 0
    no_local: bool = False  # 5.0 only
    retain_as_published: bool = False  # 5.0 only
    retain_handling: int = 0  # 5.0 only: 0 send at subscribe, 1 only if new, 2 never


@dataclass(slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties | None = None  # 5.0 will properties


@dataclass(slots=True)
class Connect:
    packet_type: ClassVar[PacketType] = PacketType.CONNECT
    client_id: str = ""
    clean_start: bool = True  # "clean session" in 3.1.1
    keep_alive: int = 0
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties | None = None


@dataclass(slots=True)
class ConnAck:
    packet_type: ClassVar[PacketType] = PacketType.CONNACK
    session_present: bool = False
    reason_code: int = ReasonCode.SUCCESS  # 3.1.1: a ConnectReturnCode
    properties: Properties | None = None


@dataclass(slots=True)
class Publish:
    packet_type: ClassVar[PacketType] = PacketType.PUBLISH
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0  # 0 for QoS 0, 1..65535 otherwise
    properties: Properties | None = None


@dataclass(slots=True)
class _Ack:
    packet_id: int
    reason_code: int = ReasonCode.SUCCESS
    properties: Properties | None = None


@dataclass(slots=True)
class PubAck(_Ack):
    packet_type: ClassVar[PacketType] = PacketType.PUBACK


@dataclass(slots=True)
class PubRec(_Ack):
    packet_type: ClassVar[PacketType] = PacketType.PUBREC


@dataclass(slots=True)
class PubRel(_Ack):
    packet_type: ClassVar[PacketType] = PacketType.PUBREL


@dataclass(slots=True)
class PubComp(_Ack):
    packet_type: ClassVar[PacketType] = PacketType.PUBCOMP


@dataclass(slots=True)
class Subscribe:
    packet_type: ClassVar[PacketType] = PacketType.SUBSCRIBE
    packet_id: int
    subscriptions: list[tuple[str, SubscriptionOptions]]
    properties: Properties | None = None  # subscription identifier, user properties


@dataclass(slots=True)
class SubAck:
    packet_type: ClassVar[PacketType] = PacketType.SUBACK
    packet_id: int
    reason_codes: list[int]  # one per filter; 3.1.1: 0, 1, 2 or 0x80
    properties: Properties | None = None


@dataclass(slots=True)
class Unsubscribe:
    packet_type: ClassVar[PacketType] = PacketType.UNSUBSCRIBE
    packet_id: int
    topic_filters: list[str]
    properties: Properties | None = None


@dataclass(slots=True)
class UnsubAck:
    packet_type: ClassVar[PacketType] = PacketType.UNSUBACK
    packet_id: int
    reason_codes: list[int] = field(default_factory=list)  # 5.0 only: one per filter
    properties: Properties | None = None


@dataclass(slots=True)
class PingReq:
    packet_type: ClassVar[PacketType] = PacketType.PINGREQ


@dataclass(slots=True)
class PingResp:
    packet_type: ClassVar[PacketType] = PacketType.PINGRESP


@dataclass(slots=True)
class Disconnect:
    packet_type: ClassVar[PacketType] = PacketType.DISCONNECT
    reason_code: int = ReasonCode.NORMAL_DISCONNECTION
    properties: Properties | None = None


@dataclass(slots=True)
class Auth:
    """5.0 only: enhanced authentication exchange."""

    packet_type: ClassVar[PacketType] = PacketType.AUTH
    reason_code: int = ReasonCode.SUCCESS
    properties: Properties | None = None


Packet = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
    | Auth
)

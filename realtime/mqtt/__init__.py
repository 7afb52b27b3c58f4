"""MQTT 3.1.1 and 5.0, sans-I/O: packets as data, an encoder, and a streaming decoder.

The gateway's own MQTT core (amqtt is 3.1.1-only and about ten times slower per packet): this
package knows bytes and packets only; the session layer (asyncio.Protocol, keep-alive, QoS
flows, routing) sits on top.

- `packets`: one dataclass per control packet, `Properties`, `SubscriptionOptions`, `Will`.
- `codec`: `encode(packet, version)`, the fast `encode_publish`, and `PacketDecoder`.
- `properties`: the 5.0 property registry (identifier, type, packets it may appear in).
- `reason_codes`: 5.0 reason codes, 3.1.1 CONNACK return codes, what each packet may carry.
- `topics`: topic name and filter syntax.
- `wire`: the field encodings (variable byte integer, UTF-8 string, binary data).
- `errors`: `MqttError`, raised by the decoder with the reason code the spec prescribes.
"""

from realtime.mqtt.codec import (
    DEFAULT_MAX_PACKET_SIZE,
    MAX_PACKET_SIZE,
    PacketDecoder,
    encode,
    encode_publish,
)
from realtime.mqtt.errors import MqttError
from realtime.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
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
from realtime.mqtt.properties import PROPERTIES, PropertyId, PropertySpec, PropertyType
from realtime.mqtt.reason_codes import (
    SUBACK_FAILURE,
    ConnectReturnCode,
    ReasonCode,
    connack_return_code,
)
from realtime.mqtt.topics import is_valid_topic_filter, is_valid_topic_name, split_shared

__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "MAX_PACKET_SIZE",
    "MQTT_3_1_1",
    "MQTT_5",
    "PROPERTIES",
    "SUBACK_FAILURE",
    "Auth",
    "ConnAck",
    "Connect",
    "ConnectReturnCode",
    "Disconnect",
    "MqttError",
    "Packet",
    "PacketDecoder",
    "PacketType",
    "PingReq",
    "PingResp",
    "Properties",
    "PropertyId",
    "PropertySpec",
    "PropertyType",
    "PubAck",
    "PubComp",
    "PubRec",
    "PubRel",
    "Publish",
    "ReasonCode",
    "SubAck",
    "Subscribe",
    "SubscriptionOptions",
    "UnsubAck",
    "Unsubscribe",
    "Will",
    "connack_return_code",
    "encode",
    "encode_publish",
    "is_valid_topic_filter",
    "is_valid_topic_name",
    "split_shared",
]

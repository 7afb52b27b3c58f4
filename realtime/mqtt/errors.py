"""The one exception the MQTT decoder raises: the peer sent something the spec forbids.

``reason_code`` is the MQTT 5.0 reason code the spec prescribes for the fault (0x81 malformed,
0x82 protocol error, 0x95 packet too large, ...). A v5 session sends it in its CONNACK (before
the connection is accepted) or DISCONNECT; a 3.1.1 session has no DISCONNECT from the server,
so it just closes, except before CONNACK where `connack_return_code` maps the reason to one of
the six 3.1.1 return codes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from realtime.mqtt.reason_codes import ReasonCode

if TYPE_CHECKING:
    from realtime.mqtt.packets import Packet


class MqttError(Exception):
    """A packet from the peer is malformed or breaks the protocol; the connection must end.

    ``packets`` holds the well-formed packets that preceded the bad one in the same
    `PacketDecoder.feed` call, in order, so a session can still act on them (the spec has the
    receiver process packets in order up to the fault).
    """

    def __init__(self, reason_code: ReasonCode, message: str) -> None:
        super().__init__(f"{message} ({reason_code.name}, 0x{reason_code:02X})")
        self.reason_code = reason_code
        self.message = message
        self.packets: list[Packet] = []


def malformed(message: str) -> MqttError:
    return MqttError(ReasonCode.MALFORMED_PACKET, message)


def protocol_error(message: str) -> MqttError:
    return MqttError(ReasonCode.PROTOCOL_ERROR, message)

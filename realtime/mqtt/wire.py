"""MQTT data representation (spec section 1.5 of 3.1.1 and 5.0): the fields packets are made of.

Readers take ``(data, pos, end)``, return ``(value, position after it)`` and raise `MqttError`
(malformed) when a field runs past ``end`` (the end of the packet or of the enclosing property
block) or is not well-formed. Writers raise ValueError for values the wire cannot carry: those
are bugs in the caller, not faults of the peer.
"""

from __future__ import annotations

import struct
from typing import Final

from realtime.mqtt.errors import malformed

# The largest value of a 4-byte variable byte integer, hence of a remaining length.
MAX_VARINT: Final = 268_435_455
MAX_UINT16: Final = 0xFFFF
MAX_UINT32: Final = 0xFFFF_FFFF

pack_uint16 = struct.Struct(">H").pack
pack_uint32 = struct.Struct(">I").pack


def encode_varint(value: int) -> bytes:
    """A variable byte integer (1 to 4 bytes, 7 bits each, least significant first)."""
    if value < 0x80:
        if value < 0:
            raise ValueError(f"variable byte integer cannot be negative: {value}")
        return bytes((value,))
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    if value < 0x20_0000:
        return bytes((value & 0x7F | 0x80, (value >> 7) & 0x7F | 0x80, value >> 14))
    if value <= MAX_VARINT:
        return bytes(
            (
                value & 0x7F | 0x80,
                (value >> 7) & 0x7F | 0x80,
                (value >> 14) & 0x7F | 0x80,
                value >> 21,
            )
        )
    raise ValueError(f"variable byte integer too large: {value} > {MAX_VARINT}")


def read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    # Non-minimal encodings (0x80 0x00 for 0) are accepted: the spec does not require
    # receivers to reject them, only a fifth byte is malformed.
    value = 0
    shift = 0
    for _ in range(4):
        if pos >= end:
            raise malformed("truncated variable byte integer")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise malformed("variable byte integer longer than 4 bytes")


def read_binary(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise malformed("truncated binary data length")
    stop = pos + 2 + ((data[pos] << 8) | data[pos + 1])
    if stop > end:
        raise malformed("binary data runs past the end of the packet")
    return data[pos + 2 : stop], stop


def decode_utf8(raw: bytes) -> str:
    """Check an MQTT UTF-8 string: well-formed and without U+0000.

    Python's strict UTF-8 codec already refuses overlong forms, code points above U+10FFFF
    and encoded surrogates (U+D800..U+DFFF), all of which the spec calls malformed.
    """
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise malformed(f"invalid UTF-8 string: {exc.reason}") from None
    # Searching the str is several times faster than searching the bytes for b"\x00".
    if "\x00" in text:
        raise malformed("UTF-8 string contains U+0000")
    return text


def read_string(data: bytes, pos: int, end: int) -> tuple[str, int]:
    if pos + 2 > end:
        raise malformed("truncated string length")
    stop = pos + 2 + ((data[pos] << 8) | data[pos + 1])
    if stop > end:
        raise malformed("string runs past the end of the packet")
    return decode_utf8(data[pos + 2 : stop]), stop


def encode_string(value: str) -> bytes:
    # str.encode raises UnicodeEncodeError (a ValueError) on lone surrogates.
    raw = value.encode()
    if len(raw) > MAX_UINT16:
        raise ValueError(f"string too long for MQTT: {len(raw)} bytes > {MAX_UINT16}")
    return pack_uint16(len(raw)) + raw


def encode_binary(value: bytes) -> bytes:
    if len(value) > MAX_UINT16:
        raise ValueError(f"binary data too long for MQTT: {len(value)} bytes > {MAX_UINT16}")
    return pack_uint16(len(value)) + value


def check_packet_id(packet_id: int) -> None:
    """Encoder-side check: packets that carry a packet identifier need 1..65535."""
    if not 0 < packet_id <= MAX_UINT16:
        raise ValueError(f"packet identifier must be 1..65535, not {packet_id}")

"""Varint length-prefixed framing of the ``realtime.v1.proto`` subprotocol.

Every binary WebSocket frame carries one or more protobuf messages, each prefixed by its
length as a protobuf varint (unsigned LEB128). Shared by the server codec and the client.
"""

from __future__ import annotations

from collections.abc import Iterable

# A 64-bit value needs at most 10 varint bytes.
MAX_VARINT_BYTES = 10
_MAX_VARINT = (1 << 64) - 1


class FrameError(ValueError):
    """The frame cannot be decoded at all: the sender is broken."""


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer (< 2**64) as a protobuf varint."""
    if value < 0:
        raise ValueError(f"varint cannot encode a negative value: {value}")
    if value > _MAX_VARINT:
        raise ValueError(f"varint value too large: {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int]:
    """Decode the varint at ``data[pos]``; return ``(value, position after it)``."""
    result = 0
    shift = 0
    end = len(data)
    start = pos
    while True:
        if pos >= end:
            raise FrameError(f"truncated varint at offset {start} (input ends at {end})")
        if pos - start >= MAX_VARINT_BYTES:
            raise FrameError(f"varint at offset {start} is longer than {MAX_VARINT_BYTES} bytes")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result > _MAX_VARINT:
                raise FrameError(f"varint at offset {start} exceeds 64 bits")
            return result, pos
        shift += 7


def encode_delimited(messages: Iterable[bytes]) -> bytes:
    """Concatenate serialized messages, each prefixed by its varint length."""
    return b"".join(encode_varint(len(message)) + message for message in messages)


def split_delimited(
    data: bytes | bytearray | memoryview, max_messages: int | None = None
) -> list[bytes]:
    """Split a frame into the serialized messages it carries (an empty frame: none)."""
    view = memoryview(data)
    messages: list[bytes] = []
    pos = 0
    end = len(view)
    while pos < end:
        length, body = decode_varint(view, pos)
        if length > end - body:
            raise FrameError(
                f"truncated message at offset {pos}: length prefix says {length} bytes, "
                f"{end - body} left in the frame"
            )
        messages.append(bytes(view[body : body + length]))
        pos = body + length
        if max_messages is not None and len(messages) > max_messages:
            raise FrameError(f"more than {max_messages} messages in one frame")
    return messages

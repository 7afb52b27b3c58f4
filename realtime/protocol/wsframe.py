"""Server-side WebSocket frame headers (RFC 6455 section 5.2), for pre-framed writes.

Server frames are unmasked, so one frame can be built once and written to any number of
connections. The transport joins queued messages into one frame per flush.
"""

from __future__ import annotations

import struct
from typing import Final

OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2

_FIN: Final = 0x80
_U16 = struct.Struct("!BBH")
_U64 = struct.Struct("!BBQ")


def frame_header(opcode: int, length: int) -> bytes:
    first = _FIN | opcode
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return _U16.pack(first, 126, length)
    return _U64.pack(first, 127, length)


def build_frame(opcode: int, payload: bytes) -> bytes:
    return frame_header(opcode, len(payload)) + payload

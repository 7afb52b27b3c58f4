"""Fossil deltas for publications (delta pushes).

The format is Fossil's (https://fossil-scm.org/home/doc/tip/www/delta_format.wiki), so
the decoders that exist for JavaScript, Go, Swift and others apply what the gateway sends.
A delta is used only when it is smaller than the payload it replaces.
"""

from __future__ import annotations

import re
import sys
from array import array
from typing import Final

import fossil_delta

FOSSIL: Final = "fossil"
DELTA_TYPES: Final = (FOSSIL,)


class DeltaError(ValueError):
    """A delta that does not apply to the base it was given (lost or corrupt base)."""


def make_delta(base: bytes, data: bytes) -> bytes | None:
    """The delta from `base` to `data`, or None when sending `data` itself is smaller."""
    delta: bytes = fossil_delta.create_delta(base, data)
    return delta if len(delta) < len(data) else None


def apply_delta(base: bytes, delta: bytes) -> bytes:
    """`data` from `base` and a delta; DeltaError when they do not fit.

    A Fossil delta carries the target's length and checksum. The C library checks the
    length but is built without its checksum test, so the checksum is checked here: that
    is what catches a wrong base of the right length.
    """
    try:
        data: bytes = fossil_delta.apply_delta(base, delta)
    except Exception as exc:  # the C extension raises a bare Exception
        raise DeltaError(f"delta does not apply: {exc}") from None
    if checksum(data) != _declared_checksum(delta):
        raise DeltaError("delta does not apply: checksum mismatch (wrong base)")
    return data


_DIGITS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
_VALUES = {digit: value for value, digit in enumerate(_DIGITS)}


def checksum(data: bytes) -> int:
    """Fossil's checksum: the sum of the big-endian 32-bit words, zero-padded, mod 2**32."""
    if len(data) % 4:
        data = data + bytes(4 - len(data) % 4)
    words = array("I")  # 4 bytes on every platform CPython supports
    words.frombytes(data)
    if sys.byteorder == "little":
        words.byteswap()
    return sum(words) & 0xFFFFFFFF


_INT = re.compile(rb"[0-9A-Za-z_~]+")


def _read_int(delta: bytes, pos: int) -> tuple[int, int]:
    match = _INT.match(delta, pos)
    if match is None:
        raise DeltaError("delta does not apply: malformed delta")
    value = 0
    for digit in match.group():
        value = (value << 6) + _VALUES[digit]
    return value, match.end()


def _declared_checksum(delta: bytes) -> int:
    """Walk the delta's records ("N\n", then N@O, N:bytes, and a final N;) to its checksum."""
    _, pos = _read_int(delta, 0)
    if delta[pos : pos + 1] != b"\n":
        raise DeltaError("delta does not apply: malformed header")
    pos += 1
    while pos < len(delta):
        count, pos = _read_int(delta, pos)
        op = delta[pos : pos + 1]
        if op == b"@":
            _, pos = _read_int(delta, pos + 1)
            if delta[pos : pos + 1] != b",":
                raise DeltaError("delta does not apply: malformed copy record")
            pos += 1
        elif op == b":":
            pos += 1 + count
        elif op == b";":
            return count & 0xFFFFFFFF
        else:
            raise DeltaError("delta does not apply: malformed record")
    raise DeltaError("delta does not apply: no checksum record")

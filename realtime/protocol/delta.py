"""Fossil deltas for publications (delta pushes).

The format is Fossil's (https://fossil-scm.org/home/doc/tip/www/delta_format.wiki), so
the decoders that exist for JavaScript, Go, Swift and others apply what the gateway sends.
A delta is used only when it is smaller than the payload it replaces.
"""

from __future__ import annotations

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
    """`data` from `base` and a delta; DeltaError when they do not fit (Fossil deltas carry
    the target's length and checksum, so a wrong base is detected)."""
    try:
        data: bytes = fossil_delta.apply_delta(base, delta)
    except Exception as exc:  # the C extension raises a bare Exception
        raise DeltaError(f"delta does not apply: {exc}") from None
    return data

"""Pure reconnect/backoff/refresh decisions (no I/O, easy to test)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from realtime.protocol.codes import Action, CloseCode, ErrorCode

__all__ = [
    "DisconnectInfo",
    "ReconnectDecision",
    "backoff_delay",
    "decide_after_close",
    "decide_after_error",
    "decide_after_http_status",
    "reconnect_delay",
    "refresh_delay",
]

# 2**_MAX_EXPONENT * backoff_min is far above any sane backoff_max; capping the exponent
# keeps the float arithmetic finite for any attempt number.
_MAX_EXPONENT = 62

# Errors answered to `connect` that a new token may cure.
_TOKEN_ERRORS = frozenset({ErrorCode.UNAUTHORIZED, ErrorCode.TOKEN_EXPIRED})
# Close codes that a new token may cure.
_TOKEN_CLOSES = frozenset({CloseCode.INVALID_TOKEN, CloseCode.TOKEN_EXPIRED})


def backoff_delay(
    attempt: int,
    backoff_min: float,
    backoff_max: float,
    *,
    rng: random.Random | None = None,
) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, min * 2**attempt)]."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    ceiling = min(backoff_max, backoff_min * 2 ** min(attempt, _MAX_EXPONENT))
    if ceiling <= 0:
        return 0.0
    return (rng or random).uniform(0.0, ceiling)


def reconnect_delay(
    attempt: int,
    backoff_min: float,
    backoff_max: float,
    *,
    min_delay: float = 0.0,
    rng: random.Random | None = None,
) -> float:
    """The backoff delay, but never below ``min_delay`` (a server-given hint such as
    ``Disconnect.reconnect_after_ms``, which the server already jittered)."""
    return max(min_delay, backoff_delay(attempt, backoff_min, backoff_max, rng=rng))


def refresh_delay(expires_in: float, *, rng: random.Random | None = None) -> float:
    """When to refresh a token valid for ``expires_in`` seconds: at 80-90% of its life."""
    if expires_in <= 0:
        raise ValueError("expires_in must be > 0")
    return expires_in * (rng or random).uniform(0.80, 0.90)


@dataclass(frozen=True, slots=True)
class DisconnectInfo:
    """The content of a ``Disconnect`` push."""

    code: int
    reason: str
    reconnect: bool
    reconnect_after_ms: int


@dataclass(frozen=True, slots=True)
class ReconnectDecision:
    reconnect: bool
    # Fetch a new token with get_token before reconnecting.
    new_token: bool = False
    # Minimum delay before the next attempt, in seconds.
    min_delay: float = 0.0


def decide_after_close(
    code: int | None,
    disconnect: DisconnectInfo | None = None,
    *,
    can_refresh_token: bool = False,
) -> ReconnectDecision:
    """Whether to reconnect after the connection closed with ``code`` (None: no close
    frame, e.g. the TCP connection dropped), given the ``Disconnect`` push that preceded
    the close, if any.

    - 3500 (invalid token) and 3003 (token expired) with a get_token: new token, reconnect;
    - >= 3500 (and the private 4000-4999 range): do not reconnect;
    - a Disconnect push with ``reconnect: false``: do not reconnect;
    - anything else (1000-2999, 3000-3499, no code): reconnect, no sooner than
      ``Disconnect.reconnect_after_ms``.
    """
    if code is None and disconnect is not None:
        code = disconnect.code
    min_delay = disconnect.reconnect_after_ms / 1000 if disconnect is not None else 0.0
    if code in _TOKEN_CLOSES and can_refresh_token:
        return ReconnectDecision(True, new_token=True, min_delay=min_delay)
    if code is not None and code >= CloseCode.INVALID_TOKEN:
        return ReconnectDecision(False)
    if disconnect is not None and not disconnect.reconnect:
        return ReconnectDecision(False)
    return ReconnectDecision(True, min_delay=min_delay)


def decide_after_error(
    code: int,
    *,
    temporary: bool = False,
    retry_after_ms: int = 0,
    action: int = Action.NONE,
    can_refresh_token: bool = False,
) -> ReconnectDecision:
    """Whether to try connecting again after ``connect`` was answered with an error."""
    min_delay = retry_after_ms / 1000
    if action == Action.REFRESH_TOKEN or code in _TOKEN_ERRORS:
        if can_refresh_token:
            return ReconnectDecision(True, new_token=True, min_delay=min_delay)
        return ReconnectDecision(False)
    if action == Action.UPDATE_APP or code == ErrorCode.APP_VERSION_TOO_OLD:
        return ReconnectDecision(False)
    if temporary or action in (Action.RETRY, Action.RECONNECT):
        return ReconnectDecision(True, min_delay=min_delay)
    return ReconnectDecision(False)


def decide_after_http_status(status: int, *, can_refresh_token: bool = False) -> ReconnectDecision:
    """Whether to try again after the server refused the WebSocket upgrade with ``status``."""
    if status == 401 and can_refresh_token:
        return ReconnectDecision(True, new_token=True)
    if status in (408, 429) or status >= 500:
        return ReconnectDecision(True)
    return ReconnectDecision(False)

"""Stable error codes and WebSocket close codes.

Numbers here are part of the public protocol (docs/PROTOCOL.md): never renumber one.
Close codes 3000-3499 mean "reconnect with backoff"; 3500-3999 mean "do not reconnect
until something changes" (a new token, a new app version, a fixed client).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from realtime.protocol import realtime_pb2 as pb


class Action(IntEnum):
    NONE = pb.ACTION_NONE
    RETRY = pb.ACTION_RETRY
    REFRESH_TOKEN = pb.ACTION_REFRESH_TOKEN
    UPDATE_APP = pb.ACTION_UPDATE_APP
    RECONNECT = pb.ACTION_RECONNECT
    RESUBSCRIBE = pb.ACTION_RESUBSCRIBE


class ErrorCode(IntEnum):
    INTERNAL = 100
    UNAUTHORIZED = 101
    BAD_CHANNEL = 102
    PERMISSION_DENIED = 103
    UNKNOWN_COMMAND = 104
    ALREADY_SUBSCRIBED = 105
    LIMIT_EXCEEDED = 106
    BAD_REQUEST = 107
    NOT_AVAILABLE = 108
    TOKEN_EXPIRED = 109
    NOT_SUBSCRIBED = 110
    TOO_MANY_REQUESTS = 111
    UNRECOVERABLE_POSITION = 112
    APP_VERSION_TOO_OLD = 113
    # 114 is not used: a message over limits.max_frame_bytes closes the connection (1009).
    BROKER_UNAVAILABLE = 115
    NOT_CONNECTED = 116
    ALREADY_CONNECTED = 117
    DEVICE_REQUIRED = 118  # the token has no `device` claim (mobile device commands)


@dataclass(frozen=True, slots=True)
class ProtocolError(Exception):
    """An error answered to one command; the connection stays open."""

    code: ErrorCode
    message: str
    temporary: bool = False
    retry_after_ms: int = 0
    action: Action = Action.NONE

    def __str__(self) -> str:
        return f"{self.code.name.lower()} ({int(self.code)}): {self.message}"


class UnsubscribeCode(IntEnum):
    """Codes of an `unsubscribe` push (the server ended one subscription).

    2000-2499: unsubscribed by the server, do not resubscribe.
    2500-2999: resubscribe now, with recovery from the last position.
    """

    RESUBSCRIBE = 2500  # publications may have been lost on the way (a stream gap)

    @property
    def resubscribe(self) -> bool:
        return is_resubscribe_code(self)


def is_resubscribe_code(code: int) -> bool:
    """Whether an `unsubscribe` push with `code` asks to resubscribe with recovery."""
    return 2500 <= code <= 2999


class CloseCode(IntEnum):
    # Reconnect with backoff.
    SHUTDOWN = 3000  # node is draining: reconnect (to another node) after the hinted delay
    SLOW = 3001  # the client did not read fast enough; reconnect and recover
    NO_PONG = 3002  # no answer to pings
    TOKEN_EXPIRED = 3003  # refresh the token, then reconnect
    INTERNAL = 3004
    FORCE_RECONNECT = 3005  # asked by the server API
    CONNECT_TIMEOUT = 3006  # no connect command in time
    # Do not reconnect (until the cause is fixed).
    INVALID_TOKEN = 3500
    BAD_REQUEST = 3501  # malformed frame or protocol misuse: a client bug
    FORBIDDEN = 3502  # disconnected by the server API without reconnect
    APP_VERSION_TOO_OLD = 3503
    FLOOD = 3504  # far past the rate limit

    @property
    def reconnect(self) -> bool:
        return self < 3500


# WebSocket (RFC 6455) codes the transport also uses.
WS_MESSAGE_TOO_BIG = 1009
WS_INVALID_DATA = 1007

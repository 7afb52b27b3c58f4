"""Exceptions raised by the client."""

from __future__ import annotations

from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codes import ErrorCode

__all__ = ["DisconnectedError", "PollError", "RealtimeError", "SubscriptionClosedError"]

# The JSON error codes of GET /v1/poll and the protocol's ErrorCode each stands for.
_POLL_CODES: dict[str, int] = {
    "unauthorized": ErrorCode.UNAUTHORIZED,
    "device_required": ErrorCode.DEVICE_REQUIRED,
    "bad_request": ErrorCode.BAD_REQUEST,
    "no_detached_session": ErrorCode.NOT_AVAILABLE,
    "too_many_requests": ErrorCode.TOO_MANY_REQUESTS,
    "busy": ErrorCode.NOT_AVAILABLE,
    "unavailable": ErrorCode.BROKER_UNAVAILABLE,
    "internal": ErrorCode.INTERNAL,
}
# Answers worth trying again (after retry_after_ms).
_TEMPORARY_STATUSES = frozenset({429, 502, 503, 504})


class RealtimeError(Exception):
    """The server answered a command with ``Reply.error``.

    ``code`` is an :class:`realtime.protocol.codes.ErrorCode` value, ``action`` an
    :class:`realtime.protocol.codes.Action` value (kept as plain ints so that codes added
    by a newer server do not break an older client).
    """

    def __init__(
        self,
        code: int,
        message: str,
        *,
        temporary: bool = False,
        retry_after_ms: int = 0,
        action: int = 0,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.temporary = temporary
        self.retry_after_ms = retry_after_ms
        self.action = action

    @classmethod
    def from_pb(cls, error: pb.Error) -> RealtimeError:
        return cls(
            error.code,
            error.message,
            temporary=error.temporary,
            retry_after_ms=error.retry_after_ms,
            action=int(error.action),
        )

    def __str__(self) -> str:
        text = f"error {self.code}: {self.message}"
        if self.temporary:
            text += " (temporary)"
        return text

    def __repr__(self) -> str:
        return (
            f"RealtimeError(code={self.code}, message={self.message!r}, "
            f"temporary={self.temporary}, retry_after_ms={self.retry_after_ms}, "
            f"action={self.action})"
        )


class PollError(RealtimeError):
    """``GET /v1/poll`` answered with an error (any status but 200).

    ``status`` is the HTTP status, ``error`` the JSON error code: ``unauthorized`` (401),
    ``device_required`` or ``bad_request`` (400), ``no_detached_session`` (404: the
    device is attached, or its session expired: reconnect and subscribe with recovery),
    ``too_many_requests`` (429), ``busy`` or ``unavailable`` (503); empty when the answer
    was not the gateway's JSON (a proxy's error page). ``retry_after_ms`` says when to
    try again (429, 503). ``code`` is the matching :class:`ErrorCode` (0 when none
    matches), so that handlers of :class:`RealtimeError` see the same numbers as on the
    socket.
    """

    def __init__(self, status: int, error: str, message: str, *, retry_after_ms: int = 0) -> None:
        code = _POLL_CODES.get(error)
        if code is None:
            code = ErrorCode.__members__.get(error.upper(), 0)
        super().__init__(
            int(code),
            message,
            temporary=status in _TEMPORARY_STATUSES,
            retry_after_ms=retry_after_ms,
        )
        self.status = status
        self.error = error

    def __str__(self) -> str:
        text = f"poll answered {self.status} {self.error or 'error'}: {self.message}"
        if self.retry_after_ms:
            text += f" (retry after {self.retry_after_ms} ms)"
        return text

    def __repr__(self) -> str:
        return (
            f"PollError(status={self.status}, error={self.error!r}, code={self.code}, "
            f"message={self.message!r}, retry_after_ms={self.retry_after_ms})"
        )


class DisconnectedError(Exception):
    """A command could not complete: the connection is gone or the client was closed.

    ``code`` is the WebSocket close code when one is known, ``reconnect`` tells whether
    the client is (or would be) reconnecting.
    """

    def __init__(self, code: int | None, reason: str, reconnect: bool) -> None:
        super().__init__(code, reason, reconnect)
        self.code = code
        self.reason = reason
        self.reconnect = reconnect

    def __str__(self) -> str:
        code = "no close code" if self.code is None else f"code {self.code}"
        again = "reconnecting" if self.reconnect else "not reconnecting"
        return f"disconnected ({code}, {again}): {self.reason}"

    def __repr__(self) -> str:
        return (
            f"DisconnectedError(code={self.code}, reason={self.reason!r}, "
            f"reconnect={self.reconnect})"
        )


class SubscriptionClosedError(Exception):
    """The subscription ended: the server unsubscribed the client (``Unsubscribed`` push),
    a resubscribe after a reconnect was refused, or the application unsubscribed.

    ``code`` is the Unsubscribed code or the error code of the refusal, None when the
    application unsubscribed.
    """

    def __init__(self, channel: str, code: int | None, reason: str) -> None:
        super().__init__(channel, code, reason)
        self.channel = channel
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        code = "" if self.code is None else f" (code {self.code})"
        return f"subscription to {self.channel!r} closed{code}: {self.reason}"

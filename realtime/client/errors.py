"""Exceptions raised by the client."""

from __future__ import annotations

from realtime.protocol import realtime_pb2 as pb

__all__ = ["DisconnectedError", "RealtimeError", "SubscriptionClosedError"]


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

"""Plain values of push: what to send to one device, and what the provider answered.

Also the small interface every provider implements (`PushProvider`). A wake never carries
message content: only a hint (`{"t": "sync", "ch": channel, "o": "123"}`); the app fetches
the content over the authenticated poll.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

APNS, FCM = "apns", "fcm"
PROVIDERS = (APNS, FCM)
PRODUCTION, SANDBOX = "production", "sandbox"
SILENT, VISIBLE = "silent", "visible"

# APNs refuses an apns-collapse-id longer than this many bytes.
MAX_COLLAPSE_ID_BYTES = 64


def collapse_id_for(name: str) -> str:
    """A collapse id for `name` (a channel): itself when it fits in 64 bytes, else a
    stable digest of it (the same channel always collapses with itself)."""
    if len(name.encode()) <= MAX_COLLAPSE_ID_BYTES:
        return name
    return "h:" + hashlib.blake2b(name.encode(), digest_size=24).hexdigest()


@dataclass(frozen=True, slots=True)
class Wake:
    """One push to one device."""

    provider: str  # APNS or FCM
    token: str  # the provider's device token
    environment: str = PRODUCTION  # APNs: PRODUCTION or SANDBOX
    app_id: str = ""  # APNs topic (bundle id); "" = the configured topic. FCM: informational
    platform: str = ""  # "ios", "android", ...
    kind: str = SILENT  # SILENT (content-available) or VISIBLE (a generic alert)
    collapse_id: str = ""  # at most 64 bytes: see collapse_id_for
    hint: dict[str, str] = field(default_factory=dict)  # small, string values, no content
    title: str = ""  # VISIBLE only
    body: str = ""  # VISIBLE only
    ttl: int = 3600  # seconds the provider keeps trying to deliver
    registered_at: float = 0.0  # unix time the token was registered (APNs 410 rule)
    thread_id: str = ""  # VISIBLE on iOS: groups notifications ("" = the collapse id)

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"Wake.provider must be one of {PROVIDERS}, not {self.provider!r}")
        if not self.token:
            raise ValueError("Wake.token is empty")
        if self.environment not in (PRODUCTION, SANDBOX):
            raise ValueError("Wake.environment must be production or sandbox")
        if self.kind not in (SILENT, VISIBLE):
            raise ValueError(f"Wake.kind must be silent or visible, not {self.kind!r}")
        if len(self.collapse_id.encode()) > MAX_COLLAPSE_ID_BYTES:
            raise ValueError("Wake.collapse_id is longer than 64 bytes: use collapse_id_for()")
        if self.ttl < 0:
            raise ValueError("Wake.ttl must be >= 0")
        for key, value in self.hint.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError("Wake.hint keys and values must be strings")
        if "aps" in self.hint:
            raise ValueError("Wake.hint may not use the key 'aps' (APNs reserves it)")


class Outcome(StrEnum):
    SENT = "sent"
    TOKEN_INVALID = "token_invalid"  # remove the token
    RETRY = "retry"  # temporary: try again later (after retry_after when given)
    CONFIG_ERROR = "config_error"  # our credentials or topic are wrong: keep the token
    FAILED = "failed"  # other permanent error for this message


@dataclass(frozen=True, slots=True)
class PushOutcome:
    """What became of one `Wake`. `reason` is the provider's short code (APNs "reason",
    FCM error code, or ours: "timeout", "connection"), fit for a metric label; `detail` is
    free text for logs."""

    outcome: Outcome
    reason: str = ""
    detail: str = ""
    retry_after: float | None = None  # RETRY: seconds the provider asked us to wait
    status: int = 0  # the HTTP status when there was one
    # TOKEN_INVALID: unix time the provider found the token invalid (APNs 410 timestamp),
    # 0 = unknown. A registration after it is a new one and stays.
    invalid_since: float = 0.0

    @classmethod
    def sent(cls, status: int = 200) -> PushOutcome:
        return cls(Outcome.SENT, status=status)

    @classmethod
    def token_invalid(
        cls, reason: str, detail: str = "", status: int = 0, invalid_since: float = 0.0
    ) -> PushOutcome:
        return cls(
            Outcome.TOKEN_INVALID, reason, detail, status=status, invalid_since=invalid_since
        )

    @classmethod
    def retry(
        cls, reason: str, detail: str = "", retry_after: float | None = None, status: int = 0
    ) -> PushOutcome:
        return cls(Outcome.RETRY, reason, detail, retry_after, status)

    @classmethod
    def config_error(cls, reason: str, detail: str = "", status: int = 0) -> PushOutcome:
        return cls(Outcome.CONFIG_ERROR, reason, detail, status=status)

    @classmethod
    def failed(cls, reason: str, detail: str = "", status: int = 0) -> PushOutcome:
        return cls(Outcome.FAILED, reason, detail, status=status)


class PushProvider(Protocol):
    """A push service. `send` never raises for a provider answer or a network problem: it
    returns a `PushOutcome` (and stops at its own deadline)."""

    name: str

    async def start(self) -> None: ...

    async def send(self, wake: Wake) -> PushOutcome: ...

    async def close(self) -> None: ...

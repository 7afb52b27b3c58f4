"""Mobile devices: their push tokens, and their sessions while the app is away.

A device is a user's app install, named by the token's `device` claim. Two stores, each
offered by every broker (memory: this node; Redis: every node):

- `DeviceRegistry`: push tokens by user and device. A provider token belongs to one user
  at a time: registering it for another user (re-login) moves it. Tokens the provider
  reports invalid are removed; tokens unused for long are pruned.
- `DetachedStore`: a *detached session*: the channels a backgrounded (or disconnected)
  app was subscribed to and the stream position it has of each, kept for
  `push.detach_ttl`. Publications on those channels wake the app; the app polls from the
  positions; coming back to the foreground attaches it again (and ends the session).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from realtime.core.broker import StreamPosition

APNS, FCM = "apns", "fcm"
PROVIDERS = (APNS, FCM)
BACKGROUND, DROPPED = "background", "dropped"


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    user: str
    device: str  # the token's `device` claim
    provider: str  # APNS or FCM
    token: str  # the provider's device token
    environment: str = "production"  # APNs: "production" or "sandbox"
    app_id: str = ""  # APNs: bundle id (the topic)
    platform: str = ""  # "ios", "android", ...
    registered_at: float = 0.0  # unix time
    last_used: float = 0.0  # unix time of the last connect or push


class DeviceRegistry(ABC):
    @abstractmethod
    async def register(self, record: DeviceRecord) -> bool:
        """Keep `record` as the user's device (replacing that device's previous token);
        the same provider token registered by anyone else before is removed there. True
        when the token was taken from another user or device (moved). `registered_at` 0
        means now; the registration counts as a use (`last_used`)."""

    @abstractmethod
    async def unregister(self, user: str, device: str) -> bool:
        """Forget the device's token; True when there was one."""

    @abstractmethod
    async def device(self, user: str, device: str) -> DeviceRecord | None: ...

    @abstractmethod
    async def devices(self, user: str) -> list[DeviceRecord]: ...

    @abstractmethod
    async def remove_token(self, provider: str, token: str, registered_before: float = 0.0) -> bool:
        """The provider says `token` is invalid: remove it (only when it was registered
        before `registered_before`, a unix time, when given: APNs 410). True if removed."""

    @abstractmethod
    async def touch(self, user: str, device: str, now: float) -> None:
        """The device was used (connected, woken) at `now`."""

    @abstractmethod
    async def prune(self, unused_since: float) -> int:
        """Remove tokens not used since `unused_since` (unix time); how many."""


@dataclass(slots=True)
class DetachedSession:
    user: str
    device: str
    state: str  # BACKGROUND (app_state) or DROPPED (the socket went)
    detached_at: float  # unix time
    # channel -> the last position the device has of it (what a poll starts after);
    # StreamPosition(0, "") for a channel without history (woken for, nothing to poll)
    positions: dict[str, StreamPosition] = field(default_factory=dict)
    node: str = ""  # id of the node standing in for it (arming its wakes)


class DetachedStore(ABC):
    @abstractmethod
    async def detach(self, session: DetachedSession, ttl: float) -> None:
        """Keep `session` for `ttl` seconds (replacing one of the same device)."""

    @abstractmethod
    async def get(self, user: str, device: str) -> DetachedSession | None: ...

    @abstractmethod
    async def advance(self, user: str, device: str, positions: dict[str, StreamPosition]) -> None:
        """A poll delivered up to `positions`: later polls start there."""

    @abstractmethod
    async def attach(self, user: str, device: str) -> DetachedSession | None:
        """The app is back: end the detached session, returning it."""

    async def orphaned_nodes(self) -> list[str]:
        """Ids of the nodes that stood in for detached devices (live or not); a node alone
        (the memory broker) has none to hand over."""
        return []

    async def adopt(self, dead: str, node: str, count: int, ttl: float) -> list[DetachedSession]:
        """Up to `count` detached sessions that node `dead` stood in for, now naming
        `node` (whose index of them keeps `ttl` seconds); [] when none is left (then `dead`
        is forgotten). Atomic per session: two nodes adopting at once never get the same
        one."""
        return []

    @abstractmethod
    async def spend_wake(
        self, user: str, device: str, now: float, budget: int, window: float
    ) -> bool:
        """One of the device's `budget` wakes per `window` seconds, counted across nodes
        (it outlives detached sessions: an app that comes and goes stays within it); False
        when none is left. `now` is unix time."""

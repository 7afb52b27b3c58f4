"""The sending side of typing indicators: which typing commands become events.

A client renews "typing" every few seconds while the user types; the node forwards at
most one event per user and channel per `throttle` seconds. Receivers (the hub) expire an
indicator that is not renewed within the namespace's `typing_timeout`, which is longer
than the throttle, so renewals always arrive in time.
"""

from __future__ import annotations


class TypingThrottle:
    __slots__ = ("_forwarded",)

    def __init__(self) -> None:
        self._forwarded: dict[tuple[str, str], float] = {}  # (channel, user) -> when

    def start(self, channel: str, user: str, now: float, throttle: float) -> bool:
        """True when this typing event should be forwarded."""
        key = (channel, user)
        last = self._forwarded.get(key)
        if last is not None and now - last < throttle:
            return False
        self._forwarded[key] = now
        return True

    def stop(self, channel: str, user: str) -> bool:
        """True when the user was typing there (so receivers must hear that it stopped)."""
        return self._forwarded.pop((channel, user), None) is not None

    def published(self, channel: str, user: str) -> None:
        """A publication ended the typing: the next keystroke starts a new indicator."""
        if self._forwarded:
            self._forwarded.pop((channel, user), None)

    def prune(self, now: float, horizon: float) -> None:
        """Forget indicators older than `horizon` seconds (receivers expired them)."""
        stale = [key for key, when in self._forwarded.items() if now - when >= horizon]
        for key in stale:
            del self._forwarded[key]

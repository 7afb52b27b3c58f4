"""The sending side of typing indicators: which typing commands become events.

A client renews "typing" every few seconds while the user types; the node forwards at
most one event per user and channel per `throttle` seconds. Receivers (the hub) expire an
indicator that is not renewed within the namespace's `typing_timeout`, which is longer
than the throttle, so renewals always arrive in time.

Typing is per user and channel (as receivers show it), but the node also notes which of
the user's local connections said "typing" when: a connection that goes away while typing
ends the indicator at once (`gone`), unless another of the user's connections here still
types.
"""

from __future__ import annotations


class TypingThrottle:
    __slots__ = ("_forwarded", "_typists")

    def __init__(self) -> None:
        self._forwarded: dict[tuple[str, str], float] = {}  # (channel, user) -> when
        # (channel, user) -> {client: its last "typing" command, forwarded or throttled}.
        # Same keys as _forwarded.
        self._typists: dict[tuple[str, str], dict[str, float]] = {}

    def start(self, channel: str, user: str, client: str, now: float, throttle: float) -> bool:
        """True when this typing event should be forwarded."""
        key = (channel, user)
        typists = self._typists.get(key)
        if typists is None:
            typists = self._typists[key] = {}
        typists[client] = now
        last = self._forwarded.get(key)
        if last is not None and now - last < throttle:
            return False
        self._forwarded[key] = now
        return True

    def stop(self, channel: str, user: str) -> bool:
        """True when the user was typing there (so receivers must hear that it stopped)."""
        key = (channel, user)
        self._typists.pop(key, None)
        return self._forwarded.pop(key, None) is not None

    def published(self, channel: str, user: str) -> None:
        """A publication ended the typing: the next keystroke starts a new indicator."""
        if self._forwarded:
            key = (channel, user)
            self._forwarded.pop(key, None)
            self._typists.pop(key, None)

    def gone(self, channel: str, user: str, client: str, now: float, timeout: float) -> bool:
        """`client`, a connection of `user`, went away. True when the user's typing in
        `channel` must end now, as by `stop`: this connection said "typing" there within
        `timeout` seconds and none of the user's other connections here did."""
        key = (channel, user)
        typists = self._typists.get(key)
        if typists is None:
            return False
        when = typists.pop(client, None)
        if when is not None and now - when < timeout:
            for other in typists.values():
                if now - other < timeout:
                    return False  # another connection of the user still types
            return self.stop(channel, user)
        if not typists:  # its indicator expired already and nobody else types
            self.stop(channel, user)
        return False

    @property
    def active(self) -> bool:
        """Some local connection may be typing somewhere."""
        return bool(self._typists)

    def prune(self, now: float, horizon: float) -> None:
        """Forget indicators older than `horizon` seconds (receivers expired them)."""
        stale = [key for key, when in self._forwarded.items() if now - when >= horizon]
        for key in stale:
            del self._forwarded[key]
            self._typists.pop(key, None)

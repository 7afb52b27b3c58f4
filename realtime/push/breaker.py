"""A circuit breaker: stop calling a provider that keeps failing, try again after a pause.

Pure: the caller passes the time (any monotonic clock) and nothing here awaits.

- **closed**: calls go through. It opens after `failures` consecutive failures, or when at
  least `min_requests` calls ended in the last `window` seconds and `failure_ratio` of them
  failed (0 turns the ratio rule off).
- **open**: calls are refused for `cooldown` seconds, then the breaker is half-open.
- **half-open**: one trial call goes through (others are refused); its success closes the
  breaker, its failure opens it for another cooldown. A trial that never reports back is
  given up after `cooldown` seconds and another one is let through.
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum

_BUCKETS = 10  # the ratio window is kept as this many counts, not one entry per call


class BreakerState(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        *,
        failures: int = 5,
        cooldown: float = 30.0,
        failure_ratio: float = 0.5,
        window: float = 60.0,
        min_requests: int = 20,
    ) -> None:
        if failures < 1:
            raise ValueError("failures must be >= 1")
        if cooldown <= 0 or window <= 0:
            raise ValueError("cooldown and window must be > 0")
        if not 0 <= failure_ratio <= 1:
            raise ValueError("failure_ratio must be between 0 and 1")
        self.failures = failures
        self.cooldown = cooldown
        self.failure_ratio = failure_ratio
        self.window = window
        self.min_requests = max(1, min_requests)
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._trial_started: float | None = None
        self._bucket_width = window / _BUCKETS
        # (bucket index, successes, failures), oldest first
        self._buckets: deque[list[int]] = deque()
        self.times_opened = 0

    # ------------------------------------------------------------------ queries

    def state(self, now: float) -> BreakerState:
        """The state at `now` (an open breaker whose cooldown is over is half-open)."""
        if self._state is BreakerState.OPEN and now >= self._opened_at + self.cooldown:
            self._state = BreakerState.HALF_OPEN
            self._trial_started = None
        return self._state

    def allow(self, now: float) -> bool:
        """May a call start now? In half-open this takes the one trial slot."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        if self._trial_started is None or now >= self._trial_started + self.cooldown:
            self._trial_started = now
            return True
        return False

    # ------------------------------------------------------------------ results

    def record_success(self, now: float) -> None:
        state = self.state(now)
        if state is BreakerState.OPEN:
            return  # a call that started before the breaker opened
        if state is BreakerState.HALF_OPEN:
            self._close()
            return
        self._consecutive = 0
        self._count(now, failed=False)

    def record_failure(self, now: float) -> None:
        state = self.state(now)
        if state is BreakerState.OPEN:
            return
        if state is BreakerState.HALF_OPEN:
            self._open(now)
            return
        self._consecutive += 1
        self._count(now, failed=True)
        if self._consecutive >= self.failures or self._ratio_exceeded():
            self._open(now)

    # ------------------------------------------------------------------ internals

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._trial_started = None
        self.times_opened += 1

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._trial_started = None
        self._buckets.clear()

    def _count(self, now: float, *, failed: bool) -> None:
        index = int(now // self._bucket_width)
        while self._buckets and self._buckets[0][0] <= index - _BUCKETS:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append([index, 0, 0])
        self._buckets[-1][2 if failed else 1] += 1

    def _ratio_exceeded(self) -> bool:
        if self.failure_ratio <= 0:
            return False
        successes = sum(b[1] for b in self._buckets)
        failed = sum(b[2] for b in self._buckets)
        total = successes + failed
        return total >= self.min_requests and failed >= self.failure_ratio * total

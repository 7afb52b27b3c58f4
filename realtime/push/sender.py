"""`PushSender`: hands `Wake`s to the providers with a bounded queue and a few workers.

- `submit(wake)` never waits: past `queue_size` wakes (queued plus waiting to retry) the
  wake is dropped and counted; so is one for a provider whose circuit breaker is open.
- A fixed number of worker tasks send, whatever the rate (no task per push).
- A `retry` outcome is tried again after an exponential backoff with jitter (at least the
  provider's Retry-After), at most `max_retries` times; the wait is a timer, not a worker.
- Temporary failures and configuration errors count against the provider's
  `CircuitBreaker`; while it is open that provider's wakes are dropped at once and the
  gateway carries on. Answers that concern one token (invalid, failed) do not count.
- `on_token_invalid(provider, token, reason, registered_before)` is called once per
  `token_invalid` outcome, for the device registry to remove the token unless it was
  registered at or after `registered_before` (a unix time: the provider's word on when it
  found the token invalid, else when the send started): a re-registration racing the
  answer is a new registration and stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from realtime.log import event
from realtime.metrics import Metrics
from realtime.push.breaker import BreakerState, CircuitBreaker
from realtime.push.messages import APNS, FCM, Outcome, PushOutcome, PushProvider, Wake

if TYPE_CHECKING:
    from realtime.config import PushConfig

log = logging.getLogger("realtime.push")

TokenInvalidCallback = Callable[[str, str, str, float], Awaitable[None] | None]

QUEUE_FULL = "queue_full"
BREAKER_OPEN = "breaker_open"
RETRIES_EXHAUSTED = "retries_exhausted"
NO_PROVIDER = "no_provider"
CLOSED = "closed"

# A configuration error is logged at most this often per provider and reason.
CONFIG_ERROR_LOG_INTERVAL = 60.0


@dataclass(slots=True)
class _Item:
    wake: Wake
    retries: int = 0  # retries already made


def _token_hint(token: str) -> str:
    return token[:8] + "..." if len(token) > 8 else token


class PushSender:
    def __init__(
        self,
        providers: Iterable[PushProvider] | Mapping[str, PushProvider],
        metrics: Metrics | None = None,
        *,
        workers: int = 4,
        queue_size: int = 10_000,
        max_retries: int = 3,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 60.0,
        breaker_failures: int = 5,
        breaker_cooldown: float = 30.0,
        breaker_failure_ratio: float = 0.5,
        breaker_window: float = 60.0,
        breaker_min_requests: int = 20,
        on_token_invalid: TokenInvalidCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if isinstance(providers, Mapping):
            self.providers: dict[str, PushProvider] = dict(providers)
        else:
            self.providers = {p.name: p for p in providers}
        self.metrics = metrics if metrics is not None else Metrics()
        self.workers = max(1, workers)
        self.queue_size = max(1, queue_size)
        self.max_retries = max(0, max_retries)
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = max(retry_backoff, retry_backoff_max)
        self.on_token_invalid = on_token_invalid
        self.clock = clock
        self.wall_clock = wall_clock
        self.rand = rand
        self.breakers = {
            name: CircuitBreaker(
                failures=breaker_failures,
                cooldown=breaker_cooldown,
                failure_ratio=breaker_failure_ratio,
                window=breaker_window,
                min_requests=breaker_min_requests,
            )
            for name in self.providers
        }
        for name, breaker in self.breakers.items():
            self.metrics.push_breakers[name] = self._state_reader(breaker)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._timers: dict[asyncio.TimerHandle, _Item] = {}  # wakes waiting to be retried
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._started = False
        self._closed = False
        self._config_logged: dict[tuple[str, str], float] = {}

    @classmethod
    def from_config(
        cls,
        config: PushConfig,
        metrics: Metrics | None = None,
        *,
        on_token_invalid: TokenInvalidCallback | None = None,
        providers: Iterable[PushProvider] | None = None,
    ) -> PushSender:
        """The sender for `config.push`, with the providers it configures (or `providers`)."""
        if providers is None:
            from realtime.push.apns import ApnsProvider
            from realtime.push.fcm import FcmProvider

            built: list[PushProvider] = []
            if config.apns.configured:
                built.append(ApnsProvider.from_config(config.apns, config.deadline))
            if config.fcm.configured:
                built.append(FcmProvider.from_config(config.fcm, config.deadline))
            providers = built
        return cls(
            providers,
            metrics,
            workers=config.workers,
            queue_size=config.queue_size,
            max_retries=config.max_retries,
            retry_backoff=config.retry_backoff,
            retry_backoff_max=config.retry_backoff_max,
            breaker_failures=config.breaker_failures,
            breaker_cooldown=config.breaker_cooldown,
            breaker_failure_ratio=config.breaker_failure_ratio,
            breaker_window=config.breaker_window,
            breaker_min_requests=config.breaker_min_requests,
            on_token_invalid=on_token_invalid,
        )

    def _state_reader(self, breaker: CircuitBreaker) -> Callable[[], float]:
        return lambda: float(breaker.state(self.clock()))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the providers (raises ValueError for an unusable credential) and workers."""
        if self._started:
            return
        self._started = True
        for provider in self.providers.values():
            await provider.start()
            describe = getattr(provider, "describe", None)
            fields: dict[str, Any] = describe() if callable(describe) else {}
            event(log, "push_provider_started", provider=provider.name, **fields)
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"push-worker-{i}")
            for i in range(self.workers)
        ]

    async def close(self, drain: float = 0.0) -> None:
        """Stop: wait up to `drain` seconds for queued wakes, then drop the rest (counted),
        stop the workers and close the providers."""
        if self._closed:
            return
        if drain > 0 and self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), drain)
        self._closed = True
        for timer, item in self._timers.items():
            timer.cancel()
            self._drop(item.wake, CLOSED)
        self._timers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        while not self._queue.empty():
            self._drop(self._queue.get_nowait().wake, CLOSED)
        for provider in self.providers.values():
            try:
                await provider.close()
            except Exception as exc:
                event(
                    log,
                    "push_provider_close_failed",
                    logging.WARNING,
                    provider=provider.name,
                    error=repr(exc),
                )
        self._update_idle()

    # ------------------------------------------------------------------ queries

    @property
    def pending(self) -> int:
        """Wakes queued, being sent or waiting to be retried."""
        return self._queue.qsize() + self._in_flight + len(self._timers)

    def breaker_state(self, provider: str) -> BreakerState:
        return self.breakers[provider].state(self.clock())

    async def wait_idle(self) -> None:
        """Until nothing is queued, in flight or waiting to be retried."""
        await self._idle.wait()

    # ------------------------------------------------------------------ submit

    def submit(self, wake: Wake) -> bool:
        """Queue `wake`; False (and counted) when it is dropped. Never waits."""
        name = wake.provider
        if self._closed:
            self._drop(wake, CLOSED)
            return False
        breaker = self.breakers.get(name)
        if breaker is None:
            self._drop(wake, NO_PROVIDER)
            return False
        if breaker.state(self.clock()) is BreakerState.OPEN:
            self._drop(wake, BREAKER_OPEN)
            return False
        if self._queue.qsize() + len(self._timers) >= self.queue_size:
            self._drop(wake, QUEUE_FULL)
            return False
        self._queue.put_nowait(_Item(wake))
        self._idle.clear()
        return True

    def _drop(self, wake: Wake, why: str) -> None:
        self.metrics.push_dropped[(wake.provider, why)] += 1

    # ------------------------------------------------------------------ workers

    async def _worker(self) -> None:
        while True:
            item = await self._queue.get()
            self._in_flight += 1
            try:
                await self._process(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug: keep the worker alive
                event(log, "push_worker_error", logging.ERROR, error=repr(exc))
            finally:
                self._in_flight -= 1
                self._update_idle()

    def _update_idle(self) -> None:
        if self.pending == 0:
            self._idle.set()
        else:
            self._idle.clear()

    async def _process(self, item: _Item) -> None:
        wake = item.wake
        name = wake.provider
        provider = self.providers[name]
        breaker = self.breakers[name]
        if not breaker.allow(self.clock()):
            self._drop(wake, BREAKER_OPEN)
            return
        started = self.wall_clock()
        try:
            outcome = await provider.send(wake)
        except asyncio.CancelledError:  # close() while sending
            self._drop(wake, CLOSED)
            raise
        except Exception as exc:  # providers should not raise; treat it as temporary
            outcome = PushOutcome.retry("exception", repr(exc))
        if outcome.outcome is Outcome.SENT:
            self._record(name, breaker, ok=True)
            self.metrics.push_sent[name] += 1
            return
        self.metrics.push_errors[(name, outcome.reason or outcome.outcome.value)] += 1
        if outcome.outcome is Outcome.TOKEN_INVALID:
            self._record(name, breaker, ok=True)
            await self._token_invalid(wake, outcome, outcome.invalid_since or started)
        elif outcome.outcome is Outcome.FAILED:
            self._record(name, breaker, ok=True)
            event(
                log,
                "push_failed",
                logging.WARNING,
                provider=name,
                reason=outcome.reason,
                detail=outcome.detail,
                token=_token_hint(wake.token),
            )
        elif outcome.outcome is Outcome.CONFIG_ERROR:
            self._record(name, breaker, ok=False)
            self._log_config_error(name, outcome)
        else:  # RETRY
            self._record(name, breaker, ok=False)
            self._retry(item, outcome)

    def _record(self, name: str, breaker: CircuitBreaker, *, ok: bool) -> None:
        now = self.clock()
        before = breaker.state(now)
        if ok:
            breaker.record_success(now)
        else:
            breaker.record_failure(now)
        after = breaker.state(now)
        if after is before:
            return
        if after is BreakerState.OPEN:
            event(
                log,
                "push_breaker_open",
                logging.WARNING,
                provider=name,
                cooldown=breaker.cooldown,
            )
        elif after is BreakerState.CLOSED:
            event(log, "push_breaker_closed", provider=name)

    async def _token_invalid(
        self, wake: Wake, outcome: PushOutcome, registered_before: float
    ) -> None:
        name = wake.provider
        self.metrics.push_tokens_removed[name] += 1
        event(
            log,
            "push_token_invalid",
            provider=name,
            reason=outcome.reason,
            token=_token_hint(wake.token),
        )
        if self.on_token_invalid is None:
            return
        try:
            result = self.on_token_invalid(name, wake.token, outcome.reason, registered_before)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            event(log, "push_token_callback_failed", logging.ERROR, provider=name, error=repr(exc))

    def _log_config_error(self, name: str, outcome: PushOutcome) -> None:
        key = (name, outcome.reason)
        now = self.clock()
        last = self._config_logged.get(key)
        if last is not None and now - last < CONFIG_ERROR_LOG_INTERVAL:
            return
        self._config_logged[key] = now
        event(
            log,
            "push_config_error",
            logging.ERROR,
            provider=name,
            reason=outcome.reason,
            detail=outcome.detail,
            status=outcome.status,
            hint="check the push credentials and topic/project in [push]; tokens are kept",
        )

    def retry_delay(self, retries: int, retry_after: float | None) -> float:
        """Backoff before retry number `retries + 1`: exponential, capped, with jitter (half
        fixed, half random), and never shorter than the provider's Retry-After."""
        base = min(self.retry_backoff_max, self.retry_backoff * (2.0**retries))
        delay = base / 2 + self.rand() * base / 2
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def _retry(self, item: _Item, outcome: PushOutcome) -> None:
        if item.retries >= self.max_retries or self._closed:
            self._drop(item.wake, RETRIES_EXHAUSTED)
            event(
                log,
                "push_retries_exhausted",
                logging.WARNING,
                provider=item.wake.provider,
                reason=outcome.reason,
                retries=item.retries,
            )
            return
        delay = self.retry_delay(item.retries, outcome.retry_after)
        item.retries += 1
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def requeue() -> None:
            assert timer is not None
            if self._timers.pop(timer, None) is not None:
                self._queue.put_nowait(item)

        timer = loop.call_later(delay, requeue)
        self._timers[timer] = item


def providers_configured(config: PushConfig) -> tuple[str, ...]:
    """Names of the providers `config` sets up (push is off when empty)."""
    out = []
    if config.apns.configured:
        out.append(APNS)
    if config.fcm.configured:
        out.append(FCM)
    return tuple(out)

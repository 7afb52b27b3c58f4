"""The circuit breaker of the push sender: pure, time passed in."""

from __future__ import annotations

import pytest

from realtime.push.breaker import BreakerState, CircuitBreaker

CLOSED, HALF_OPEN, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN


def test_opens_after_consecutive_failures() -> None:
    breaker = CircuitBreaker(failures=3, cooldown=10, failure_ratio=0)
    for t in range(2):
        breaker.record_failure(t)
        assert breaker.state(t) is CLOSED
        assert breaker.allow(t)
    breaker.record_failure(2)
    assert breaker.state(2) is OPEN
    assert not breaker.allow(2)
    assert breaker.times_opened == 1


def test_a_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker(failures=3, cooldown=10, failure_ratio=0)
    for t in range(10):
        breaker.record_failure(t)
        breaker.record_failure(t)
        breaker.record_success(t)
    assert breaker.state(10) is CLOSED


def test_opens_on_the_failure_ratio_in_the_window() -> None:
    breaker = CircuitBreaker(
        failures=100, cooldown=10, failure_ratio=0.5, window=10, min_requests=10
    )
    # alternate: never 100 in a row, but half of the calls fail
    for i in range(9):
        now = i * 0.1
        if i % 2:
            breaker.record_failure(now)
        else:
            breaker.record_success(now)
    assert breaker.state(1) is CLOSED  # 9 calls: under min_requests
    breaker.record_failure(1.0)  # 10 calls, 5 failed
    assert breaker.state(1.0) is OPEN


def test_old_failures_leave_the_window() -> None:
    breaker = CircuitBreaker(
        failures=100, cooldown=10, failure_ratio=0.5, window=10, min_requests=4
    )
    breaker.record_failure(0)
    breaker.record_failure(0.5)
    breaker.record_success(1)
    # 30 s later the two failures are outside the 10 s window
    breaker.record_success(30)
    breaker.record_success(30.5)
    breaker.record_failure(31)
    assert breaker.state(31) is CLOSED  # 1 failure of 3 recent calls
    breaker.record_success(31.5)
    assert breaker.state(31.5) is CLOSED


def test_half_open_lets_one_trial_through_and_closes_on_success() -> None:
    breaker = CircuitBreaker(failures=1, cooldown=5, failure_ratio=0)
    breaker.record_failure(0)
    assert breaker.state(4.9) is OPEN
    assert not breaker.allow(4.9)
    assert breaker.state(5) is HALF_OPEN
    assert breaker.allow(5)  # the trial
    assert not breaker.allow(5.1)  # only one at a time
    breaker.record_success(5.2)
    assert breaker.state(5.2) is CLOSED
    assert breaker.allow(5.3)
    assert breaker.allow(5.3)


def test_a_failed_trial_opens_it_again_for_a_full_cooldown() -> None:
    breaker = CircuitBreaker(failures=1, cooldown=5, failure_ratio=0)
    breaker.record_failure(0)
    assert breaker.allow(5)
    breaker.record_failure(6)
    assert breaker.state(6) is OPEN
    assert breaker.state(10.9) is OPEN
    assert breaker.state(11) is HALF_OPEN
    assert breaker.times_opened == 2


def test_a_trial_that_never_reports_is_given_up_after_the_cooldown() -> None:
    breaker = CircuitBreaker(failures=1, cooldown=5, failure_ratio=0)
    breaker.record_failure(0)
    assert breaker.allow(5)
    assert not breaker.allow(9)
    assert breaker.allow(10)


def test_results_of_calls_started_before_it_opened_are_ignored() -> None:
    breaker = CircuitBreaker(failures=2, cooldown=5, failure_ratio=0)
    breaker.record_failure(0)
    breaker.record_failure(0)
    breaker.record_success(1)  # late success: still open
    assert breaker.state(1) is OPEN
    breaker.record_failure(4)  # late failure: does not extend the cooldown
    assert breaker.state(5) is HALF_OPEN


def test_closing_forgets_the_window() -> None:
    breaker = CircuitBreaker(failures=100, cooldown=1, failure_ratio=0.5, window=60, min_requests=4)
    for t in range(4):
        breaker.record_failure(t * 0.1)
    assert breaker.state(0.4) is OPEN
    assert breaker.allow(2)
    breaker.record_success(2)
    breaker.record_failure(2.1)  # 1 of 2 since closing: under min_requests
    assert breaker.state(2.1) is CLOSED


@pytest.mark.parametrize(
    "kwargs",
    [{"failures": 0}, {"cooldown": 0}, {"window": 0}, {"failure_ratio": 1.5}],
)
def test_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]

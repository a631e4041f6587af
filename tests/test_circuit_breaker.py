"""The circuit breaker's states, driven by a clock the test moves."""

from __future__ import annotations

import re

import pytest

from retrieval.circuit_breaker import BreakerConfig, BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def changes() -> list[BreakerState]:
    return []


@pytest.fixture
def breaker(clock, changes) -> CircuitBreaker:
    return CircuitBreaker("redis", BreakerConfig(failures_to_open=3, cool_down_s=0.5),
                          on_change=changes.append, clock=clock)


def test_it_stays_closed_until_that_many_consecutive_failures(breaker):
    for _ in range(2):
        breaker.record_failure()
    breaker.record_success()  # the count restarts
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()


def test_after_the_cool_down_one_probe_goes_through_and_its_success_closes(breaker, clock,
                                                                              changes):
    for _ in range(3):
        breaker.record_failure()
    clock.now += 0.49
    assert not breaker.allow()
    clock.now += 0.02
    assert breaker.allow()                       # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()                   # others still skip while it runs
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_a_failed_probe_opens_it_for_another_cool_down(breaker, clock):
    for _ in range(3):
        breaker.record_failure()
    clock.now += 0.5
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.now += 0.5
    assert breaker.allow()


def test_a_probe_that_never_reports_back_is_replaced_after_a_cool_down(breaker, clock):
    for _ in range(3):
        breaker.record_failure()
    clock.now += 0.5
    assert breaker.allow()  # this probe's call is cancelled: no success, no failure
    clock.now += 0.5
    assert breaker.allow()
    assert breaker.state is BreakerState.HALF_OPEN


@pytest.mark.parametrize("kwargs, message", [
    (dict(failures_to_open=0), "failures_to_open must be an integer >= 1 (got 0)"),
    (dict(cool_down_s=0), "cool_down_s must be a number of seconds in (0, 3600] (got 0)"),
    (dict(cool_down_s=True), "cool_down_s must be"),
])
def test_bad_settings_are_refused_naming_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BreakerConfig(**kwargs)

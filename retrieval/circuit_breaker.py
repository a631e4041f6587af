"""A circuit breaker: stop waiting on a dependency that keeps failing, probe it now and then.

    closed ──(failures_to_open consecutive failures)──▶ open
    open ──(cool_down_s passed; the next call is let through as a probe)──▶ half_open
    half_open ──(the probe succeeds)──▶ closed
    half_open ──(the probe fails)──▶ open (a new cool-down starts)
    half_open ──(no answer in cool_down_s: the probe was cancelled)──▶ a new probe

While open, and while a half-open probe is in flight, ``allow()`` is False: the caller skips
the dependency at once (the retriever answers from cold start, flagged degraded) instead of
spending its timeout on every call. The serving batches' compute threads drive it; a lock
makes each transition whole when there are several.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real

log = logging.getLogger(__name__)


class BreakerState(enum.IntEnum):
    """The value is what the metrics gauge shows."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True)
class BreakerConfig:
    failures_to_open: int = 3   # consecutive failed calls that open the breaker
    cool_down_s: float = 0.5    # how long it stays open before one probe call is let through

    def __post_init__(self) -> None:
        n = self.failures_to_open
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"failures_to_open must be an integer >= 1 (got {n!r})")
        s = self.cool_down_s
        if isinstance(s, bool) or not isinstance(s, Real) or not 0 < s <= 3600:
            raise ValueError(f"cool_down_s must be a number of seconds in (0, 3600] (got {s!r})")


class CircuitBreaker:
    """``name`` appears in the log lines of state changes; ``on_change(state)`` is called
    on each change (the server sets a metrics gauge); ``clock`` is seconds, monotonic."""

    def __init__(self, name: str, config: BreakerConfig = BreakerConfig(),
                 on_change: Callable[[BreakerState], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.config = name, config
        self._on_change, self._clock = on_change, clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._lock = threading.Lock()

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """Whether the caller should try the dependency now. In the open state, the first
        call after the cool-down is allowed as the probe and the breaker turns half-open."""
        if self._state is BreakerState.CLOSED:
            return True
        with self._lock:
            return self._allow_probe()

    def _allow_probe(self) -> bool:
        now = self._clock()
        if now - self._opened_at < self.config.cool_down_s:
            return False
        # Open and cooled down; or half-open with a probe that never reported back (its
        # call was cancelled): let one more probe through.
        self._opened_at = now
        if self._state is BreakerState.OPEN:
            self._set(BreakerState.HALF_OPEN)
        return True

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            if self._state is not BreakerState.CLOSED:
                self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN or (
                    self._state is BreakerState.CLOSED
                    and self._failures >= self.config.failures_to_open):
                self._opened_at = self._clock()
                self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is BreakerState.OPEN:
            log.warning("%s circuit breaker open after %d failed calls: skipping it for %.0f ms",
                        self.name, self._failures, self.config.cool_down_s * 1000)
        elif state is BreakerState.CLOSED:
            log.info("%s circuit breaker closed: the probe call succeeded", self.name)
        self._state = state
        if self._on_change is not None:
            self._on_change(state)

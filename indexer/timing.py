"""Where the job's time goes: seconds inside Faiss calls versus everything else.

The job's budget is stated against the raw Faiss work it does (train, add, search, write):
everything outside a ``FaissClock.timed`` block is overhead to keep small.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class FaissClock:
    """Accumulates wall seconds per Faiss phase ("train", "add", "search", ...)."""

    phases: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - start

    @property
    def faiss_seconds(self) -> float:
        return sum(self.phases.values())

    @property
    def total_seconds(self) -> float:
        return time.perf_counter() - self.started

    def summary(self) -> dict[str, float]:
        total = self.total_seconds
        out = {f"{phase}_seconds": round(s, 3) for phase, s in sorted(self.phases.items())}
        out.update(faiss_seconds=round(self.faiss_seconds, 3), total_seconds=round(total, 3),
                   overhead_ratio=round(total / max(self.faiss_seconds, 1e-9), 3))
        return out

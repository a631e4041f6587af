"""The CPUs a serving process may use, and which of them each worker runs on.

``serve --cpu-affinity`` places every thread of a worker (event loop, gRPC's threads, the
compute thread, Faiss's OpenMP threads) on a set of CPUs of its own:

- ``off`` (the default): the kernel places threads where it likes;
- ``auto``: the CPUs this process may run on (its affinity), split among the workers;
- a list such as ``0,2-3``: those CPUs, split among the workers.

N workers over a list of C CPUs: with N <= C, contiguous groups as even as possible
(4 CPUs, 2 workers: ``{0,1}``, ``{2,3}``); with N > C, one CPU each, in turn.

Why: one worker is one GIL, so its threads take turns anyway. Spread over every core, each
hand-off between them (a call to the compute thread and its reply back, a Faiss search
and the GIL after it) wakes a thread on another core, queued behind whatever else runs
there (on this 2-core machine, the load generator). Kept on one core, a hand-off is a
switch on the same core. Measured on the 1M-item pair, one worker on CPU 0 and ghz on
CPU 1 against both floating (docs/serving-history.md, "Stop 21", medians of 3 and 2 alternated
runs): 0.50 against 0.68 ms of CPU a call at c=50; at half the maximum rate p50 2.7×
against 3.3× the c=1 p50, p99 2.3× against 3.8× echo's.

``auto`` pins only where the process's CPUs are its own: a CPU quota (cgroup) below the
number of CPUs in its affinity means a shared pool (Kubernetes without the static CPU
manager policy, Docker's ``--cpus``), where every replica would stack its workers on the
same first CPUs; there ``auto`` logs why and leaves placement to the kernel.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "max 100000" or "200000 100000"
CFS_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")  # cgroup v1
CFS_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")

Placement = tuple[tuple[int, ...], ...]  # worker i runs on placement[i]


def usable_cores(cpu_max: Path = CPU_MAX) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a
    container limited to ``cpu: "1"`` sees every core of its node in its affinity), at
    least 1."""
    cores = len(os.sched_getaffinity(0))
    quota = cpu_quota(cpu_max)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cpu_quota(cpu_max: Path = CPU_MAX) -> float | None:
    """The cgroup's CPU limit in cores (v2, else v1); None without one or unreadable."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota, period = int(CFS_QUOTA.read_text()), int(CFS_PERIOD.read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``0,2-3`` -> (0, 2, 3): sorted, without repeats. ValueError names the bad part."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        try:
            low, high = int(first), int(last) if dash else int(first)
        except ValueError:
            raise ValueError(f"{part[:20]!r} is not a CPU number or range such as 2-5 "
                             "(expected off, auto or a list such as 0,2-3)") from None
        if low < 0 or high < low:
            raise ValueError(f"{part[:20]!r} is not a CPU range (expected LOW-HIGH, "
                             "0 <= LOW <= HIGH)")
        cpus.update(range(low, high + 1))
    return tuple(sorted(cpus))


def place_workers(affinity: str, workers: int, cpu_max: Path = CPU_MAX) -> Placement | None:
    """Each worker's CPUs for ``--cpu-affinity`` (off, auto or a CPU list); None: no pinning.

    ValueError for a list that is not a CPU list or names a CPU this process may not use.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1 (got {workers})")
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    if affinity == "off":
        return None
    if affinity == "auto":
        quota = cpu_quota(cpu_max)
        if quota is not None and quota < len(allowed):
            log.warning("--cpu-affinity auto: not pinning; a CPU quota of %g cores over %d "
                        "CPUs is a shared pool, where every replica would pin to the same "
                        "CPUs (give the pod whole CPUs of its own, or list them)",
                        quota, len(allowed))
            return None
        cpus = allowed
    else:
        cpus = parse_cpu_list(affinity)
        outside = sorted(set(cpus) - set(allowed))
        if outside:
            raise ValueError(f"CPU {outside[0]} is not one this process may run on "
                             f"(its CPUs: {_ranges(allowed)})")
    return split(cpus, workers)


def split(cpus: Sequence[int], workers: int) -> Placement:
    """Contiguous groups as even as possible; one CPU each, in turn, past one a CPU."""
    n = len(cpus)
    if workers > n:
        return tuple((cpus[i % n],) for i in range(workers))
    return tuple(tuple(cpus[i * n // workers:(i + 1) * n // workers]) for i in range(workers))


def pin_process(cpus: Sequence[int]) -> None:
    """Run every thread of this process, and every thread it starts later, on ``cpus``.

    The affinity is a thread's own (new threads inherit their creator's), so each thread
    that already exists is moved too; one that ends meanwhile is skipped."""
    wanted = set(cpus)
    os.sched_setaffinity(0, wanted)
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), wanted)
        except (ProcessLookupError, FileNotFoundError):
            continue
    log.info("running on CPU %s", _ranges(tuple(sorted(wanted))))


def _ranges(cpus: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2,5'."""
    parts, start = [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            parts.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(parts)

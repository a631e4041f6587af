"""The server's threads as the operating system sees them: their names and their CPU time.

Python (before 3.14) names a thread only for itself: every thread of ``serve`` shows as
``two-tower`` (or ``python``) to the tools outside it, beside gRPC's own, which are named
(``event_engine``, ``grpc_global_tim``). ``name_os_thread`` gives the calling thread its
Python name there too (Linux keeps 15 bytes of it); the micro-batcher's threads
(``retrieve-work``; ``retrieve-read`` and ``retrieve-comput`` with ``--overlap-reads``),
SimilarItems' (``similar_0``) and the watcher's reads (``pair-watcher-io``) call it when
they start, so ``top -H``, ``perf``, ``py-spy`` and /proc/PID/task/TID/comm tell them apart.

``thread_times(pid)`` reads each live thread's name and CPU seconds from /proc;
``CpuByThread`` turns repeated readings into CPU seconds by thread name that only rise
(a thread that ended keeps what was seen of it), which the server exports as
``two_tower_thread_cpu_seconds_total{thread}`` (retrieval.metrics) and the load test
reads for other processes (app.processes.thread_cpu_seconds).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_NAME = 15  # prctl(2): set the calling thread's name
MAX_BYTES = 15    # the kernel's TASK_COMM_LEN, less its terminating NUL
MAIN_THREAD = "main"  # a process's first thread: in serve, the event loop's

_prctl = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        _prctl = None


def name_os_thread(name: str | None = None) -> bool:
    """Give the calling thread ``name`` (default: its Python name) as the OS sees it, cut
    to 15 bytes; False where the platform has no such name (nothing else changes)."""
    if _prctl is None:
        return False
    text = (name if name is not None else threading.current_thread().name)
    raw = text.encode("utf-8", "replace")[:MAX_BYTES]
    if _prctl(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) != 0:
        log.debug("could not name thread %r (errno %d)", text, ctypes.get_errno())
        return False
    return True


def thread_times(pid: int | None = None) -> dict[int, tuple[str, float]]:
    """thread id → (name, CPU seconds) for each live thread of ``pid`` (this
    process by default); the first thread is named ``main``. {} without /proc or once the
    process has exited."""
    pid = os.getpid() if pid is None else pid
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
            name = (MAIN_THREAD if task.name == str(pid)
                    else stat[stat.index("(") + 1:stat.rindex(")")])
            out[int(task.name)] = (name, _on_cpu_seconds(task, stat, ticks))
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
    return out


def _on_cpu_seconds(task: Path, stat: str, ticks: int) -> float:
    """The thread's time on a CPU: schedstat's nanoseconds where the kernel keeps them,
    else stat's user + system clock ticks (10 ms each: a thread that ran 5 ms reads 0)."""
    try:
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks


class CpuByThread:
    """CPU seconds by thread name that only rise: each ``update`` adds what every live
    thread used since it was last seen (all of it for a thread seen the first time)."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self._seen: dict[int, float] = {}

    def update(self) -> dict[str, float]:
        """Seconds each thread name used since the last update."""
        now = thread_times(self.pid)
        added: dict[str, float] = {}
        for tid, (name, seconds) in now.items():
            delta = seconds - self._seen.get(tid, 0.0)
            if delta > 0:
                added[name] = added.get(name, 0.0) + delta
        self._seen = {tid: seconds for tid, (_, seconds) in now.items()}
        return added

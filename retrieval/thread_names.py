"""The operating system's name of a thread, so that ``top -H``, ``perf``, ``py-spy`` and
/proc/PID/task/TID/comm tell the server's threads apart.

Python (before 3.14) names a thread only for itself: every thread of ``serve`` shows as
``two-tower`` (or ``python``) to the tools outside it, beside gRPC's own, which are named
(``event_engine``, ``grpc_global_tim``). ``name_os_thread`` gives the calling thread its
Python name there too (Linux keeps 15 bytes of it); the micro-batcher's threads
(``retrieve-work``; ``retrieve-read`` and ``retrieve-comput`` with ``--overlap-reads``),
SimilarItems' (``similar_0``) and the watcher's reads (``pair-watcher-io``) call it when
they start. The load test splits a server's CPU by these names (benchmarks.loadtest).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading

log = logging.getLogger(__name__)

PR_SET_NAME = 15  # prctl(2): set the calling thread's name
MAX_BYTES = 15    # the kernel's TASK_COMM_LEN, less its terminating NUL

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

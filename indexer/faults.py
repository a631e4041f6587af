"""Test-only fault injection: make the job die at a named point, as a crash would.

``TWO_TOWER_INDEXER_CRASH_AT=<point>`` makes the process SIGKILL itself when it reaches
``<point>``: ``mid-write`` (index file written, manifest not yet) or ``before-pointer``
(version directory complete, CURRENT not yet moved). Nothing else reads this variable.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)
ENV = "TWO_TOWER_INDEXER_CRASH_AT"
POINTS = ("mid-write", "before-pointer")


def crash_point(point: str) -> None:
    if os.environ.get(ENV) == point:
        log.error("%s=%s: killing this process (test hook)", ENV, point)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)

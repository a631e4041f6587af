"""Log lines as one JSON object each, for log pipelines (``--log-format json``).

Every record becomes {"ts", "level", "logger", "message"} plus ``request_id`` when the
code logged one (``log.info(..., extra={"request_id": rid})``) and ``exc`` with the
traceback of an exception.

``fold_unsent_replies`` turns gRPC's traceback for each reply it could not send into a
count and one line a minute.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if getattr(record, "request_id", None):
            line["request_id"] = record.request_id
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


# grpc.aio logs this, with a traceback, for every reply its core failed to send (a caller
# that reset its stream or dropped its connection while the reply waited): an abuser who
# opens streams and never reads can fill the log with them.
_GRPC_LOGGER = "grpc._cython.cygrpc"
_UNSENT = ("ExecuteBatchError raised in core", "Failed sending error status")


class UnsentReplyFilter(logging.Filter):
    """Drops gRPC's per-reply traceback; calls ``count()`` for each, and logs one line
    (no traceback) for the first and then at most one per ``every_s`` with the number
    folded since the last line."""

    def __init__(self, count: Callable[[], None], every_s: float = 60.0) -> None:
        super().__init__()
        self._count, self._every_s = count, every_s
        self._folded, self._last_line = 0, -float("inf")
        self._lock = threading.Lock()
        self._log = logging.getLogger("retrieval.server")

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_UNSENT):
            return True
        self._count()
        with self._lock:
            self._folded += 1
            now = time.monotonic()
            if now - self._last_line < self._every_s:
                return False
            folded, self._folded, self._last_line = self._folded, 0, now
        self._log.warning("%d repl%s could not be sent (the caller reset the stream or "
                          "closed the connection first; gRPC: %s); counted in "
                          "two_tower_unsent_replies_total, logged at most once a minute",
                          folded, "y" if folded == 1 else "ies", record.getMessage())
        return False


def fold_unsent_replies(count: Callable[[], None]) -> UnsentReplyFilter:
    """Install the filter on gRPC's logger (replacing one installed before)."""
    logger = logging.getLogger(_GRPC_LOGGER)
    for old in [f for f in logger.filters if isinstance(f, UnsentReplyFilter)]:
        logger.removeFilter(old)
    folding = UnsentReplyFilter(count)
    logger.addFilter(folding)
    return folding

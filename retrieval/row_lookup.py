"""id → row dictionaries of million-item tables, built beside a serving event loop.

Not one ``dict(zip(ids, rows))``: that holds the GIL about half a second per million ids,
and in a 1M-item hot swap building in paced chunks keeps serving's p99 at 0.06-0.22 s
against 0.7-1.2 s unpaced (measured as below).

A server builds these when it loads a model and index pair, usually while it keeps
serving the old pair (a hot swap). Building a dict of 1M ids is about half a second of C
under the GIL, and serving at 300 calls/s needs about a quarter of the GIL. Measured on a
1M-item swap under that load (benchmarks/swap_load.py), with the two dicts of a pair (the
history vocabulary and the index's item ids) built in 4,096-id chunks, p99 of the run was
0.7-1.2 s (0.55 s with 0.2 ms pauses between chunks), the calls queueing while the dicts
were built. ``rows_by_id`` builds a chunk at a time and, after each chunk, sleeps as long
as the chunk took, so serving keeps at least half of the GIL (p99 0.06-0.22 s for the whole
swap); the build takes twice as long, and the lookups on the hot path stay the dict's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

CHUNK = 1_024  # ids a step: about 0.25 ms of dict inserts


def rows_by_id(ids: Sequence[str] | np.ndarray,
               rows: Sequence[int] | np.ndarray | None = None) -> dict[str, int]:
    """{ids[i]: rows[i]} (rows default to 0, 1, ...); an id given twice keeps its last row,
    as a comprehension does. ``ids`` and ``rows`` may be lists or NumPy arrays."""
    if rows is not None and len(rows) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(rows)} rows")
    out: dict[str, int] = {}

    def insert(start: int) -> None:
        stop = min(start + CHUNK, len(ids))
        chunk = range(start, stop) if rows is None else _listed(rows[start:stop])
        out.update(zip(_listed(ids[start:stop]), chunk))

    _paced(insert, range(0, len(ids), CHUNK))
    return out


def empty_politely(table: dict) -> None:
    """Empty ``table`` a chunk at a time, paced as ``rows_by_id`` is: freeing 1M ids in
    one go holds the GIL for about 30 ms (more on busy cores), which a server would spend
    on the event loop's thread when the last call of a replaced pair finishes."""
    def remove(_: int) -> None:
        for _ in range(min(CHUNK, len(table))):
            table.popitem()

    _paced(remove, range(0, len(table), CHUNK))


def _paced(step, starts: range) -> None:
    """``step(start)`` for each start; after each but the last, sleep as long as it took
    (the GIL is free meanwhile: serving keeps at least half of it)."""
    for n, start in enumerate(starts):
        began = time.perf_counter()
        step(start)
        if n < len(starts) - 1:
            time.sleep(time.perf_counter() - began)


def _listed(values):
    """NumPy slices become lists of Python objects here, a chunk at a time."""
    return values.tolist() if isinstance(values, np.ndarray) else values

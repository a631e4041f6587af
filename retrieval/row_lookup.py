"""id → row of million-item tables without a Python object per id.

A server builds these when it loads a model and index pair, usually while it keeps serving
the old pair (a hot swap). They used to be dicts: building one of 1M ids is about half a
second of C under the GIL, freeing it 30 ms more, and serving at 300 calls/s needs about a
quarter of the GIL, so a 1M-item swap had to build them in paced chunks (p99 0.06-0.22 s
against 0.01-0.015 s steady, benchmarks/swap_load.py).

``IdRows`` is a hash table made of NumPy arrays: the ids (one fixed-width unicode array)
sorted by a 64-bit hash of their characters, and where each run of hashes begins. Built
with whole-array operations that release the GIL (a 1M-id table: about 0.3 s, no pause of
another thread longer than a few ms, where ``dict(zip(...))`` paused them 0.47 s), freed
in microseconds, and looked up a batch at a time: hash the batch, find each hash in its
run (one or two array reads an id), compare the id found. Measured on 1M ids: 180-270 ns
an id in batches of 640-1,600 ids against a dict's 150-190, plus about 50 µs a call, so a
table of at most ``SMALL`` ids (a categorical feature's) stays a dict.

``IdRows.cached(key, make)`` keeps a built table's arrays in the cache directory of
retrieval.mapped_cache under a key made of the artifact's checksums, and memory-maps them
when they are there: the workers of ``serve --workers`` (and a server restarted on the same pair)
share one copy of a 1M-id table instead of each building its own. A cache that cannot be
used (not ours, not writable, a file missing or of the wrong shape) is logged once and
the table is built in memory, as without it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from retrieval import mapped_cache

log = logging.getLogger(__name__)

MISSING = -1
SMALL = 8_192  # ids: a smaller table is a dict (a few ms to build, ~100 ns a lookup)
# A lookup of at most RECENT_QUERY ids (a serving batch's histories) first tries a dict of
# the ids this process looked up lately, at most RECENT_IDS of them (emptied when full:
# bounded, and the hot ids of skewed traffic are back within a few calls). The hashed path
# costs ~30 NumPy operations a call whatever its size (80 µs for one 10-item history).
RECENT_QUERY, RECENT_IDS = 1_024, 65_536
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)
_MIX, _S33 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(33)


class IdRows:
    """``rows(ids)``: the row of each id (``MISSING`` for an id the table does not hold).

    ``ids`` a 1-d NumPy unicode array (an object array or a list is converted once);
    ``rows`` the row of each (default 0, 1, ...). An id given twice keeps its last row.
    """

    def __init__(self, ids: Sequence[str] | np.ndarray,
                 rows: Sequence[int] | np.ndarray | None = None) -> None:
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"ids must be 1-d (got shape {ids.shape})")
        rows = np.arange(len(ids), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        if rows.shape != ids.shape:
            raise ValueError(f"{len(ids)} ids but {len(rows)} rows")
        self._small: dict[str, int] | None = None
        if len(ids) <= SMALL:  # NumPy's fixed cost per call (~30 µs) would dominate
            self._small = dict(zip(map(str, ids.tolist()), rows.tolist()))
            return
        width = ids.dtype.itemsize // 4 if ids.dtype.kind == "U" and ids.size else max(
            (len(str(i)) for i in ids.tolist()), default=0)
        ids = _cast(ids, np.dtype(f"<U{max(2, width + width % 2)}"))  # whole 8-byte words
        hashes = _hash(ids)
        order = np.argsort(hashes, kind="stable")  # by hash, then as given
        hashes, ids, rows = hashes[order], ids[order], rows[order]
        # an id given twice: keep the last of its run (equal ids hash equal, so adjacent)
        last = np.ones(len(ids), dtype=bool)
        last[:-1] = (hashes[1:] != hashes[:-1]) | (ids[1:] != ids[:-1])
        if not last.all():  # (masking a string array holds the GIL: only when needed)
            hashes, ids, rows = hashes[last], ids[last], rows[last]
        # where the run of each top-`bits` hash prefix begins: about one id a run
        bits = max(1, int(np.ceil(np.log2(max(len(ids), 2)))))
        prefixes = np.arange(2 ** bits + 1, dtype=np.uint64)
        prefixes[-1] = prefixes[-2]  # the end of the last run: searched below as "past it"
        starts = np.searchsorted(hashes, prefixes << np.uint64(64 - bits)).astype(np.int64)
        starts[-1] = len(ids)
        self._adopt(hashes, ids, rows, starts)

    def _adopt(self, hashes: np.ndarray, ids: np.ndarray, rows: np.ndarray,
               starts: np.ndarray) -> None:
        """The hashed table's arrays (built, or mapped from the cache): ids sorted by hash,
        and ``starts`` (2**bits + 1 entries) where each hash prefix's run begins."""
        self._small = None
        self._recent: dict[str, int] = {}  # id → row (or MISSING), see RECENT_IDS
        self._hashes, self._ids, self._rows, self._starts = hashes, ids, rows, starts
        self._dtype = ids.dtype
        self._bits = int(np.log2(len(starts) - 1))
        self._shift = np.uint64(64 - self._bits)

    _ARRAYS = ("hashes", "ids", "rows", "starts")

    @classmethod
    def cached(cls, key: str | None, make: Callable[[], tuple[np.ndarray, np.ndarray | None]],
               cache_dir: Path | None = None) -> IdRows:
        """The table of the (ids, rows) ``make()`` returns (see the module docstring), mapped
        from the cache when it holds ``key`` (a name made of the checksums of what the ids
        and rows come from; None: no cache): a warm cache never calls ``make``."""
        root = mapped_cache.cache_dir() if cache_dir is None and key is not None else None
        directory = cache_dir if cache_dir is not None else (
            root / "id-rows" if root is not None else None)
        if directory is None or key is None or not mapped_cache.KEY.fullmatch(key):
            return cls(*make())
        entry = directory / key
        if entry.is_dir():
            try:
                return cls._mapped(entry)
            except (OSError, ValueError) as exc:
                log.warning("id table cache %s unusable (%s): building it again", entry, exc)
                shutil.rmtree(entry, ignore_errors=True)
        table = cls(*make())
        if table._small is not None:  # a dict: cheap to build, nothing to share
            return table
        table._save(entry)
        try:  # map what is there (this process's or a concurrent writer's): one copy a host
            return cls._mapped(entry)
        except (OSError, ValueError):
            return table

    @classmethod
    def _mapped(cls, entry: Path) -> IdRows:
        # plain views of the maps: np.memmap's subclass hooks cost a few µs an operation
        arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="r",
                                allow_pickle=False).view(np.ndarray) for name in cls._ARRAYS}
        n = len(arrays["ids"])
        if (arrays["ids"].dtype.kind != "U" or arrays["hashes"].shape != (n,)
                or arrays["rows"].shape != (n,) or arrays["starts"].ndim != 1
                or len(arrays["starts"]) < 2 or int(arrays["starts"][-1]) != n):
            raise ValueError("arrays of mismatched shapes")
        table = cls.__new__(cls)
        table._adopt(*(arrays[name] for name in cls._ARRAYS))
        return table

    def _save(self, entry: Path) -> None:
        """Write the arrays beside ``entry`` and rename them into place (a concurrent
        writer of the same key loses the race harmlessly)."""
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            for name, array in zip(self._ARRAYS, (self._hashes, self._ids, self._rows,
                                                  self._starts), strict=True):
                np.save(tmp / f"{name}.npy", array, allow_pickle=False)
            os.replace(tmp, entry)  # refused when a concurrent writer's entry is there
            mapped_cache.prune(entry.parent)
        except OSError as exc:
            if not entry.is_dir():
                log.warning("id table not cached in %s: %s", entry.parent, exc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def __len__(self) -> int:
        return len(self._small) if self._small is not None else len(self._ids)

    @property
    def small(self) -> dict[str, int] | None:
        """The id → row dict of a table of at most SMALL ids (None for a larger one), for
        callers that look up a few ids without NumPy; not to be changed."""
        return self._small

    def get(self, item_id: str, default: int | None = None) -> int | None:
        row = int(self.rows([item_id])[0])
        return default if row == MISSING else row

    def rows(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """int64 rows, ``MISSING`` where the id is not held; same shape as ``ids``."""
        query = np.asarray(ids)
        shape = query.shape
        if self._small is not None:
            get = self._small.get
            return np.fromiter((get(i, MISSING) for i in query.ravel().tolist()),
                               dtype=np.int64, count=query.size).reshape(shape)
        if query.size == 0 or len(self._ids) == 0:
            return np.full(shape, MISSING, dtype=np.int64)
        if query.size <= RECENT_QUERY:
            return self._recent_rows(query.ravel().tolist()).reshape(shape)
        return self._hashed_rows(query.ravel()).reshape(shape)

    def _recent_rows(self, ids: list) -> np.ndarray:
        """A few ids: from the dict of recent lookups, the others through the hashed table
        (and then into the dict)."""
        recent = self._recent
        found = [recent.get(i) for i in ids]
        unknown = [i for i, row in zip(ids, found, strict=True) if row is None]
        if unknown:
            new = dict(zip(unknown, self._hashed_rows(np.asarray(unknown)).tolist(), strict=True))
            if len(recent) + len(new) > RECENT_IDS:
                recent.clear()  # (dict operations are atomic under the GIL: threads may share)
            # str keys only: 5 and 5.0 are one dict key but hash to different ids
            recent.update((i, row) for i, row in new.items() if isinstance(i, str))
            found = [new[i] if row is None else row for i, row in zip(ids, found, strict=True)]
        return np.array(found, dtype=np.int64)

    def _hashed_rows(self, query: np.ndarray) -> np.ndarray:
        """1-d ids → int64 rows through the hashed arrays (see the module docstring)."""
        if query.dtype.kind != "U":
            query = query.astype(str)
        too_long = None
        if query.dtype.itemsize > self._dtype.itemsize:
            # cast down, a longer id would be cut to a prefix that may be held: refuse it
            too_long = np.char.str_len(query) > self._dtype.itemsize // 4
            query = np.where(too_long, "", query)
        query = query.astype(self._dtype)
        wanted = _hash(query)
        bucket = (wanted >> self._shift).astype(np.intp)
        at, end = self._starts[bucket], self._starts[bucket + 1]
        # walk each id's run to the first hash >= its own (runs are about one id long)
        live = np.flatnonzero(at < end)
        while live.size:
            live = live[self._hashes[at[live]] < wanted[live]]
            at[live] += 1
            live = live[at[live] < end[live]]
        at = np.minimum(at, len(self._ids) - 1)
        found = (self._hashes[at] == wanted) & (self._ids[at] == query)
        # two different ids with one hash (about 1 in 10^7 tables of 1M): look past
        clash = np.flatnonzero(~found & (self._hashes[at] == wanted))
        for i in clash:
            j = at[i]
            while j < len(self._ids) and self._hashes[j] == wanted[i]:
                if self._ids[j] == query[i]:
                    at[i], found[i] = j, True
                    break
                j += 1
        if too_long is not None:
            found &= ~too_long
        return np.where(found, self._rows[at], MISSING)


def _cast(ids: np.ndarray, dtype: np.dtype, chunk: int = 32_768) -> np.ndarray:
    """``ids.astype(dtype)``, a chunk at a time: NumPy holds the GIL while it converts
    strings (25 ms for 1M ids at once), and a serving thread must not wait that long."""
    if ids.dtype == dtype:
        return ids
    out = np.empty(len(ids), dtype=dtype)
    for start in range(0, len(ids), chunk):
        out[start : start + chunk] = ids[start : start + chunk]
        time.sleep(0)  # let a waiting thread have the GIL
    return out


def _hash(ids: np.ndarray) -> np.ndarray:
    """FNV-1a over the 8-byte words of fixed-width unicode ids, then a 64-bit mix: uint64
    [n]. Whole-column NumPy operations (the GIL is released while each runs)."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.uint64)
    words = np.ascontiguousarray(ids).view(np.uint64).reshape(len(ids), -1)
    h = np.full(len(ids), _FNV_OFFSET, dtype=np.uint64)
    for column in words.T:
        h ^= column
        h *= _FNV_PRIME
    h ^= h >> _S33
    h *= _MIX
    h ^= h >> _S33
    return h

"""A directory of this user's own where one process leaves derived arrays for the next
to memory-map: the workers of ``serve --workers`` (and a restarted server) then share one
copy of a pair's large tables in the page cache instead of each building or reading its
own (retrieval.row_lookup's id tables, the NumPy tower's item table, the index's reply
records and metadata rows).

``TWO_TOWER_CACHE_DIR``, else ``two-tower-<uid>`` under the system's temporary directory,
used only when it is this user's alone (another user could plant arrays there). Entries
are named by the checksums of the artifact files they derive from, written to a temporary
name and renamed into place, so a reader never sees half an entry and two writers of one
entry do no harm. Each write keeps the ``KEEP`` newest entries of its kind and deletes the
rest (a process that still maps a deleted file keeps its pages until it lets go), so the
cache holds a few pairs' worth however many versions are published. A cache that cannot be
used is logged and skipped: everything then works as without it, in memory.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
KEY = re.compile(r"[A-Za-z0-9._-]{1,200}")
KEEP = 8  # entries of a kind: a pair has up to 3 (two id tables, the tower's item table)
Arrays = dict[str, np.ndarray]


def cache_dir() -> Path | None:
    given = os.environ.get("TWO_TOWER_CACHE_DIR")
    root = Path(given) if given else Path(tempfile.gettempdir()) / f"two-tower-{os.getuid()}"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = root.stat()
    except OSError as exc:
        log.warning("no cache of mapped tables (%s): each process keeps its own", exc)
        return None
    if info.st_uid != os.getuid() or (not given and info.st_mode & 0o077):
        log.warning("no cache of mapped tables: %s is not this user's alone", root)
        return None
    return root


def mapped_array(key: str, make) -> np.ndarray:
    """The array ``make()`` returns, as a read-only map of an aligned .npy kept in the cache
    under ``key`` (made once; later calls only map it); in memory without a cache. A plain
    ndarray view of the map: np.memmap's subclass hooks cost a few µs an operation."""
    root = cache_dir()
    if root is None or not KEY.fullmatch(key):
        return make()
    path = root / "arrays" / f"{key}.npy"
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
        except (OSError, ValueError) as exc:
            log.warning("cached array %s unusable (%s): making it again", path, exc)
    array = make()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)
        try:  # a link, not a rename: the first writer's file stays, and every process maps it
            os.link(tmp, path)
            prune(path.parent)
        except FileExistsError:
            pass
        return np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
    except (OSError, ValueError) as exc:
        log.warning("array not cached in %s: %s", path.parent, exc)
        return array
    finally:
        tmp.unlink(missing_ok=True)


def mapped_arrays(kind: str, key: str, make: Callable[[], Arrays],
                  check: Callable[[Arrays], None] = lambda arrays: None) -> Arrays:
    """The arrays ``make()`` returns (name → array, made together), each a read-only map of
    an .npy in the cache entry ``kind/key`` (a directory, written whole under a temporary
    name and renamed into place: an entry is complete or absent); in memory without a
    cache, or when the entry cannot be written. An entry that cannot be read, or that
    ``check`` refuses (ValueError: a file missing, a shape that does not fit), is logged,
    deleted and made again."""
    root = cache_dir()
    if root is None or not KEY.fullmatch(key) or not KEY.fullmatch(kind):
        return make()
    entry = root / kind / key
    if entry.is_dir():
        try:
            return _map_entry(entry, check)
        except (OSError, ValueError) as exc:
            log.warning("cached arrays %s unusable (%s): making them again", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
    with _one_maker(entry.parent):
        if entry.is_dir():  # made by the process this one waited for
            try:
                return _map_entry(entry, check)
            except (OSError, ValueError):
                shutil.rmtree(entry, ignore_errors=True)
        return _make_entry(entry, make, check)


@contextmanager
def _one_maker(directory: Path) -> Iterator[None]:
    """Held while an entry of ``directory`` is made: the workers of ``serve --workers``
    start together, and the second then maps what the first made instead of making it
    too (and keeping the allocator's leftovers of making it). Without a lock (a file
    system without flock): nothing is waited for."""
    fd = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _make_entry(entry: Path, make: Callable[[], Arrays], check: Callable[[Arrays], None]
                ) -> Arrays:
    arrays = make()
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        try:
            os.replace(tmp, entry)  # refused when a concurrent writer's entry is there
            prune(entry.parent)
        except OSError:
            if not entry.is_dir():
                raise
        # map what is there (this process's or a concurrent writer's): one copy a host
        return _map_entry(entry, check)
    except (OSError, ValueError) as exc:
        log.warning("arrays not cached in %s: %s", entry.parent, exc)
        return arrays
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _map_entry(entry: Path, check: Callable[[Arrays], None]) -> Arrays:
    # plain views of the maps: np.memmap's subclass hooks cost a few µs an operation
    arrays = {path.stem: np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
              for path in sorted(entry.glob("*.npy"))}
    check(arrays)
    return arrays


def prune(directory: Path, keep: int = KEEP) -> None:
    """Delete all but the ``keep`` most recently written entries of ``directory`` (files
    or directories; names starting with "." are writes in progress and left alone)."""
    try:
        entries = sorted((e for e in directory.iterdir() if not e.name.startswith(".")),
                         key=lambda e: e.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in entries[keep:]:
        try:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        except OSError as exc:
            log.warning("could not prune %s from the cache: %s", old, exc)

"""A directory of this user's own where one process leaves derived arrays for the next
to memory-map: the workers of ``serve --workers`` (and a restarted server) then share one
copy of a pair's large tables in the page cache instead of each building or reading its
own (retrieval.row_lookup's id tables, the NumPy tower's item table).

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

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
KEY = re.compile(r"[A-Za-z0-9._-]{1,200}")
KEEP = 8  # entries of a kind: a pair has up to 3 (two id tables, the tower's item table)


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

"""Which model and index to serve, and swapping to a newly published pair.

``--index`` is an index version directory (pinned) or an index store whose CURRENT names
the version (indexer.publish). ``--model`` is a model version directory (pinned) or a model
store holding version directories; with a store, the model is the one the index names, so
a new index built from a new model brings that model along.

``PairWatcher`` polls the pointer. On a change it loads the new pair beside the old one
(checksums, model version, dimension and metric are checked by retrieval.pair.load_pair)
and swaps one reference; in-flight requests finish on the pair they started with. A
refused version is logged with the reason and not retried until the pointer moves again;
the old pair keeps serving and health stays SERVING. Once the replaced pair's last call
has finished, ``retire`` empties its large id tables in pieces, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from pathlib import Path

from contracts.index_store import resolve_index_dir
from retrieval.pair import ServingPair, load_pair
from retrieval.retriever import Retriever
from retrieval.row_lookup import empty_politely
from contracts.model_manifest import MANIFEST
from contracts.errors import ArtifactError

log = logging.getLogger(__name__)


def resolve_pair_dirs(model_arg: Path, index_arg: Path) -> tuple[Path, Path]:
    """(model version dir, index version dir) to serve now."""
    index_dir = resolve_index_dir(index_arg)
    if (Path(model_arg) / MANIFEST).is_file():
        return Path(model_arg), index_dir
    model_version = _index_model_version(index_dir)
    model_dir = Path(model_arg) / model_version
    if not (model_dir / MANIFEST).is_file():
        raise ArtifactError(str(model_dir), f"the index {index_dir.name} was built from model "
                            f"{model_version!r}, which the model store {model_arg} does not hold")
    return model_dir, index_dir


def _index_model_version(index_dir: Path) -> str:
    path = index_dir / MANIFEST
    try:
        version = str(json.loads(path.read_text())["model_version"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(str(path), f"cannot read the model version: {exc!r}") from exc
    if not version or "/" in version or "\\" in version or version.startswith("."):
        # it becomes a path below the model store: it must not lead out of it
        raise ArtifactError(str(path), f"model_version must be a version directory name "
                            f"(got {version!r})")
    return version


class PairWatcher:
    """Polls the index pointer every ``interval_s`` and swaps to a new, valid pair."""

    def __init__(self, retriever: Retriever, model_arg: Path, index_arg: Path,
                 user_tower: str, interval_s: float, serving: Path) -> None:
        self.retriever, self.model_arg, self.index_arg = retriever, model_arg, index_arg
        self.user_tower, self.interval_s = user_tower, interval_s
        self.serving: Path = serving  # the index version dir being served
        self.refused: Path | None = None
        self.retiring: set[asyncio.Task] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()

    async def check(self) -> bool:
        """Swap when the pointer names a new version that loads; True when swapped."""
        try:
            index_dir = resolve_index_dir(self.index_arg)
        except ArtifactError as exc:
            log.error("index pointer unreadable, still serving %s: %s", self.serving.name, exc)
            return False
        if index_dir in (self.serving, self.refused):
            return False
        try:
            model_dir, index_dir = resolve_pair_dirs(self.model_arg, self.index_arg)
            pair = await asyncio.to_thread(load_pair, model_dir, index_dir, self.user_tower)
        except (ArtifactError, OSError, ValueError) as exc:
            self.refused = index_dir
            log.error("refused index %s, still serving %s: %s", index_dir.name,
                      self.serving.name, exc)
            return False
        old = self.retriever.pair
        self.retriever.set_pair(pair)
        self.serving, self.refused = index_dir, None
        log.info("swapped to model %s / index %s (was %s / %s)", pair.model_version,
                 pair.index_version, old.model_version if old else None,
                 old.index_version if old else None)
        if old is not None:
            self.retiring.add(task := asyncio.create_task(retire(old)))
            task.add_done_callback(self.retiring.discard)
        return True


async def retire(pair: ServingPair, poll_s: float = 0.5) -> None:
    """Free a replaced pair's large id tables off the event loop, a piece at a time.

    Calls in flight keep the pair they started with, so the tables are held here and
    emptied only once the pair itself is gone (its last call finished). Freed at once
    wherever that last reference went, the 1M-entry dicts of a 1M-item pair held the GIL
    for 30 ms or more, on the event loop's thread as often as not."""
    tables = pair.id_tables()
    gone = weakref.ref(pair)
    del pair
    while gone() is not None:
        await asyncio.sleep(poll_s)
    for table in tables:
        await asyncio.to_thread(empty_politely, table)

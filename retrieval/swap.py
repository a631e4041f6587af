"""Which model and index to serve, and swapping to a newly published pair.

``--index`` is an index version directory (pinned) or an index store whose CURRENT names
the version (indexer.publish). ``--model`` is a model version directory (pinned) or a model
store holding version directories; with a store, the model is the one the index names, so
a new index built from a new model brings that model along.

``PairWatcher`` polls the pointer. On a change it loads the new pair beside the old one
(checksums, model version, dimension and metric are checked by retrieval.pair.load_pair)
and swaps one reference; in-flight requests finish on the pair they started with. A
refused version is logged with the reason and not retried until the pointer moves again;
the old pair keeps serving and health stays SERVING. A replaced pair is freed when its last
call finishes; its id tables are NumPy arrays (retrieval.row_lookup), so freeing it takes
microseconds wherever that happens.

No failure of one check ends the watcher: an unreadable CURRENT (not UTF-8, a directory, a
FIFO), a manifest of the wrong shape, a path leading out of the store, an exception of any
kind. Each failed check is counted (two_tower_version_watch_errors_total{reason}), logged
once per distinct cause with the file it is about, and the next poll tries again. All
artifact I/O runs in a thread of its own with a timeout, so a stalled filesystem delays
swaps but never the event loop; files that are not regular are refused before they are
read (contracts.model_manifest.open_regular).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from contracts.errors import ArtifactError
from contracts.index_store import POINTER, resolve_index_dir
from contracts.model_manifest import MANIFEST, check_inside, read_json
from retrieval.os_threads import name_os_thread
from retrieval.pair import ServingPair, load_pair
from retrieval.retriever import Retriever

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 10.0   # reading CURRENT (a few bytes)
LOAD_TIMEOUT_S = 600.0  # verifying and loading a new pair: checksums of a large index


def resolve_pair_dirs(model_arg: Path, index_arg: Path) -> tuple[Path, Path]:
    """(model version dir, index version dir) to serve now."""
    index_dir = resolve_index_dir(index_arg)
    return model_dir_for(model_arg, index_dir), index_dir


def model_dir_for(model_arg: Path, index_dir: Path) -> Path:
    """``model_arg`` when it is a version directory; else the version of the model store
    that ``index_dir`` was built from, which must not lead out of the store."""
    if (Path(model_arg) / MANIFEST).is_file():
        return Path(model_arg)
    model_version = _index_model_version(index_dir)
    model_dir = Path(model_arg) / model_version
    check_inside(model_dir, Path(model_arg), "the model store")
    if not (model_dir / MANIFEST).is_file():
        raise ArtifactError(str(model_dir), f"the index {index_dir.name} was built from model "
                            f"{model_version!r}, which the model store {model_arg} does not hold")
    return model_dir


def _index_model_version(index_dir: Path) -> str:
    path = index_dir / MANIFEST
    try:
        version = str(read_json(path)["model_version"])
    except (OSError, KeyError, TypeError) as exc:
        raise ArtifactError(str(path), f"cannot read the model version: {exc!r}") from exc
    if not version or "/" in version or "\\" in version or version.startswith("."):
        # it becomes a path below the model store: it must not lead out of it
        raise ArtifactError(str(path), f"model_version must be a version directory name "
                            f"(got {version[:80]!r})")
    return version


class WatchFailure(Exception):
    """One failed check; ``reason`` labels two_tower_version_watch_errors_total."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PairWatcher:
    """Polls the index pointer every ``interval_s`` and swaps to a new, valid pair.

    ``unready_after_s``: after that long without a successful check (one that found the
    pair CURRENT names being served), ``set_ready(False)``; ``set_ready(True)`` once a
    check succeeds again. None: readiness does not depend on the watcher."""

    def __init__(self, retriever: Retriever, model_arg: Path, index_arg: Path,
                 user_tower: str, interval_s: float, serving: Path,
                 unready_after_s: float | None = None,
                 set_ready: Callable[[bool], Awaitable[None]] | None = None,
                 read_timeout_s: float = READ_TIMEOUT_S,
                 load_timeout_s: float = LOAD_TIMEOUT_S) -> None:
        self.retriever, self.model_arg, self.index_arg = retriever, model_arg, index_arg
        self.user_tower, self.interval_s = user_tower, interval_s
        self.serving: Path = serving  # the index version dir being served
        self.refused: Path | None = None
        self.unready_after_s, self.set_ready = unready_after_s, set_ready
        self.read_timeout_s, self.load_timeout_s = read_timeout_s, load_timeout_s
        self.metrics = retriever.metrics
        self.last_success = time.monotonic()
        self.metrics.set_function(self.metrics.watch_age,
                                  lambda: time.monotonic() - self.last_success)
        self._refusal = ""
        self._logged: set[tuple[str, str]] = set()  # causes logged since the last success
        self._io: asyncio.Future | None = None  # the artifact read or load in its thread
        self._unready = False

    async def run(self) -> None:
        """Check every ``interval_s`` until cancelled; no failure ends the loop."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # check() handles its own; this is the last guard
                log.exception("version watcher: a check failed unexpectedly; still watching")
                self.metrics.watch_errors.labels("unexpected").inc()

    async def check(self) -> bool:
        """Swap when the pointer names a new version that loads; True when swapped."""
        try:
            swapped = await self._follow()
        except WatchFailure as failure:
            await self._failed(failure)
            return False
        except Exception as exc:  # noqa: BLE001 - one check's bug must not end the watcher
            await self._failed(WatchFailure("unexpected", f"{type(exc).__name__}: {exc}"), exc)
            return False
        await self._succeeded()
        return swapped

    async def _follow(self) -> bool:
        try:
            index_dir = await self._off_loop(resolve_index_dir, self.index_arg,
                                             timeout_s=self.read_timeout_s,
                                             what=Path(self.index_arg) / POINTER)
        except ArtifactError as exc:
            raise WatchFailure("pointer", f"index pointer unreadable, still serving "
                               f"{self.serving.name}: {exc}") from exc
        if index_dir == self.serving:
            return False
        if index_dir == self.refused:
            raise WatchFailure("refused", self._refusal)
        try:
            pair = await self._off_loop(self._load, index_dir, timeout_s=self.load_timeout_s,
                                        what=index_dir)
        except WatchFailure:
            raise  # timed out: tried again at the next check
        except Exception as exc:  # whatever a version does wrong refuses it
            self.refused = index_dir
            self._refusal = (f"refused index {index_dir.name}, still serving "
                             f"{self.serving.name}: {exc}")
            raise WatchFailure("refused", self._refusal) from exc
        self._swap(index_dir, pair)
        return True

    def _load(self, index_dir: Path) -> ServingPair:
        """In the watcher's own thread, at a lower CPU priority than serving (Linux: nice
        is per thread): on a busy host the load takes the cores serving leaves idle, and a
        new index of the model being served keeps its user tower, already verified."""
        _lower_this_threads_priority()
        return load_pair(model_dir_for(self.model_arg, index_dir), index_dir, self.user_tower,
                         reuse=self.retriever.pair)

    def _swap(self, index_dir: Path, pair: ServingPair) -> None:
        old = self.retriever.pair
        self.retriever.set_pair(pair)
        self.serving, self.refused = index_dir, None
        log.info("swapped to model %s / index %s (was %s / %s)", pair.model_version,
                 pair.index_version, old.model_version if old else None,
                 old.index_version if old else None)

    async def _off_loop(self, fn: Callable[..., Any], *args: Any, timeout_s: float,
                        what: Path) -> Any:
        """``fn(*args)`` in a daemon thread of its own, awaited for at most ``timeout_s``.
        A read stuck on a stalled filesystem cannot be cancelled: it is left behind, and
        no other is started until it returns, rather than holding the event loop, the
        default executor's threads or the process's exit."""
        if self._io is not None and not self._io.done():
            raise WatchFailure("timeout", f"an earlier read or load under {self.index_arg} "
                               "has not returned; not starting another (a stalled filesystem?)")
        loop = asyncio.get_running_loop()
        self._io = future = loop.create_future()
        future.add_done_callback(_consume)
        threading.Thread(target=_run_into, args=(loop, future, fn, args), daemon=True,
                         name="pair-watcher-io").start()
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError as exc:
            raise WatchFailure("timeout", f"{what}: no answer after {timeout_s:g} s (a stalled "
                               f"filesystem?); still serving {self.serving.name}") from exc

    async def _failed(self, failure: WatchFailure, exc: BaseException | None = None) -> None:
        self.metrics.watch_errors.labels(failure.reason).inc()
        cause = (failure.reason, str(failure))
        if cause not in self._logged:
            if len(self._logged) >= 64:  # causes that never repeat: keep the set small
                self._logged.clear()
            self._logged.add(cause)
            log.error("version watcher: %s", failure, exc_info=exc)
        stale_s = time.monotonic() - self.last_success
        if (self.unready_after_s and self.set_ready is not None and not self._unready
                and stale_s > self.unready_after_s):
            self._unready = True
            log.error("version watcher: no successful check for %.1f s (limit %g s): "
                      "NOT_SERVING until one succeeds", stale_s, self.unready_after_s)
            await self.set_ready(False)

    async def _succeeded(self) -> None:
        self.last_success = time.monotonic()
        if self._logged:
            self._logged.clear()
            log.info("version watcher: checks succeed again, serving index %s",
                     self.serving.name)
        if self._unready and self.set_ready is not None:
            self._unready = False
            log.info("version watcher: SERVING again")
            await self.set_ready(True)


LOAD_NICE = 10  # added to the loading thread's nice value


def _lower_this_threads_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                       min(19, os.getpriority(os.PRIO_PROCESS, 0) + LOAD_NICE))
    except (OSError, AttributeError):  # not Linux, or not allowed: load at serving's priority
        pass


def _run_into(loop: asyncio.AbstractEventLoop, future: asyncio.Future,
              fn: Callable[..., Any], args: tuple) -> None:
    name_os_thread()  # pair-watcher-io
    try:
        result, error = fn(*args), None
    except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side whole
        result, error = None, exc
    try:
        loop.call_soon_threadsafe(_settle, future, result, error)
    except RuntimeError:  # the loop closed while this ran: nobody waits for it
        pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _consume(future: asyncio.Future) -> None:
    """Mark an exception retrieved: one that arrives after its timeout is no news."""
    if not future.cancelled():
        future.exception()


def start_watching(watcher: PairWatcher) -> asyncio.Task:
    task = asyncio.create_task(watcher.run(), name="pair-watcher")
    task.add_done_callback(_report_end)
    return task


def _report_end(task: asyncio.Task) -> None:
    if not task.cancelled():
        log.error("the version watcher stopped (%r): new publishes are ignored until a "
                  "restart", task.exception(), exc_info=task.exception())


def stop_watching(task: asyncio.Task) -> None:
    """At shutdown: say so if the watcher had died, then cancel it."""
    if task.done() and not task.cancelled():
        log.error("at shutdown: the version watcher had stopped earlier (%r); publishes "
                  "since then were not followed", task.exception())
    task.cancel()

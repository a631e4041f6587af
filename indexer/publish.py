"""The publish contract between the index job and running servers.

A **store** is a directory of index versions and one pointer::

    <store>/
      CURRENT               one line: the name of the current version directory, e.g.
                            "i-20261125T142729Z-6d8405\\n". Replaced with os.replace (atomic
                            on POSIX), so a reader sees the old name or the new one, never a mix.
      i-20261125T…-6d8405/  complete, checksummed versions (indexer.artifact), newest
      i-20261124T…-a1b2c3/  kept for rollback (the last ``keep``, default 5, plus CURRENT)
      .tmp-i-…/             a version being written; never pointed to; removed by the next job
      .lock                 flock'd while a job publishes, so two jobs cannot interleave

**Publishing** a version, in this order: every file of the version is written and
fsynced under ``.tmp-<version>``; the directory is renamed to ``<version>``; CURRENT is
written to ``CURRENT.tmp`` and moved over CURRENT with os.replace; the store directory is
fsynced; then the notification goes out. A job killed at any earlier point leaves CURRENT
naming the old, intact version.

**Servers** are given ``--index <store>`` (or a version directory, which pins it) and either
watch CURRENT (poll its content; cheap) or subscribe to the Redis channel below. On a
change they load the named version, which verifies checksums and refuses a model-version
mismatch, and swap only when that succeeded.

**Notification**: one Redis PUBLISH on channel ``tt:v1:index-published`` whose payload is
a JSON object::

    {"event": "index-published",        # the only event so far
     "format": "two-tower-index/2",     # of the published version
     "store": "/abs/path/to/store",
     "index_version": "i-…",            # what CURRENT now names
     "path": "/abs/path/to/store/i-…",
     "model_version": "m-…",            # the model it must be served with
     "previous_version": "i-…" | null,  # what CURRENT named before
     "reason": "build" | "update" | "rollback",
     "num_items": 123, "live_items": 120,
     "published_at": "2026-11-25T14:27:29.123456+00:00"}

The pointer is the truth; the message is a hint to reload now instead of at the next poll.
A lost message delays a swap, never breaks one.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.index_store import POINTER, current_version, fsync_dir, versions
from indexer.artifact import INDEX_FORMAT, load_index_artifact
from indexer.faults import crash_point
from contracts.model_manifest import MANIFEST, check_inside, read_json
from contracts.redaction import redact_url
from contracts.errors import ArtifactError, TwoTowerError

log = logging.getLogger(__name__)

CHANNEL = "tt:v1:index-published"
DEFAULT_KEEP = 5


class NotificationError(TwoTowerError):
    """The version is published (CURRENT moved) but the notification could not be sent."""


@dataclass(frozen=True)
class Published:
    store: Path
    index_version: str
    previous_version: str | None
    message: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.store / self.index_version


@contextmanager
def store_lock(store: str | Path) -> Iterator[None]:
    """Exclusive lock on the store for one publish/rollback (blocks until free)."""
    Path(store).mkdir(parents=True, exist_ok=True)
    with open(Path(store) / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def publish(version_dir: str | Path, reason: str, notify_url: str | None = None,
            keep: int = DEFAULT_KEEP, notify_options: dict[str, Any] | None = None
            ) -> Published:
    """Make ``version_dir`` (a complete version inside its store) current, prune old
    versions beyond ``keep``, then notify (``notify_options``: credentials and TLS for
    ``redis.Redis.from_url``). Call it only after the gate passed."""
    version_dir = Path(version_dir)
    store = version_dir.parent
    with store_lock(store):
        previous = current_version(store)
        crash_point("before-pointer")
        move_pointer(store, version_dir.name)
        prune(store, keep)
    message = notification(store, version_dir.name, previous, reason)
    log.info("published %s (%s); CURRENT was %s", version_dir.name, reason, previous)
    if notify_url:
        send_notification(notify_url, message, notify_options)
    return Published(store, version_dir.name, previous, message)


def move_pointer(store: Path, version: str) -> None:
    tmp = store / f"{POINTER}.tmp"
    with open(tmp, "w") as fh:
        fh.write(version + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, store / POINTER)
    fsync_dir(store)


def prune(store: Path, keep: int) -> None:
    """Delete leftovers of killed jobs and all but the newest ``keep`` versions (never CURRENT)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep})")
    for child in store.glob(".tmp-*"):
        shutil.rmtree(child, ignore_errors=True)
    current = current_version(store)
    for name in versions(store)[:-keep]:
        if name != current:
            shutil.rmtree(store / name, ignore_errors=True)
            log.info("pruned old index version %s", name)


def rollback(store: str | Path, to: str | None = None, notify_url: str | None = None,
             notify_options: dict[str, Any] | None = None) -> Published:
    """Point CURRENT back at ``to``, or at the newest older version built from the same
    model; the target is loaded and verified before the pointer moves."""
    store = Path(store)
    with store_lock(store):
        current = _current_for_rollback(store, to)
        target = to or _previous_version(store, current)
        if not (store / target / MANIFEST).is_file() or "/" in target or target.startswith("."):
            raise ArtifactError(str(store / target), f"not a version in the store; have: "
                                f"{', '.join(versions(store)) or 'none'}")
        check_inside(store / target, store, "the index store")
        load_index_artifact(store / target)  # refuses a corrupt version before it is current
        move_pointer(store, target)
    message = notification(store, target, current, "rollback")
    log.info("rolled back %s → %s", current, target)
    if notify_url:
        send_notification(notify_url, message, notify_options)
    return Published(store, target, current, message)


def _current_for_rollback(store: Path, to: str | None) -> str | None:
    """CURRENT's version; with an explicit target, an unreadable CURRENT is what the
    rollback repairs, so it is logged and passed over."""
    try:
        return current_version(store)
    except ArtifactError as exc:
        if to is None:
            raise
        log.warning("replacing an unreadable pointer: %s", exc)
        return None


def _previous_version(store: Path, current: str | None) -> str:
    if current is None:
        raise ArtifactError(str(store / POINTER), "missing: nothing was published here yet")
    names = versions(store)
    model = _manifest(store / current)["model_version"]
    older = names[: names.index(current)] if current in names else names
    same_model = [n for n in older if _manifest(store / n)["model_version"] == model]
    if not same_model:
        raise ArtifactError(str(store), f"no version older than {current} built from model "
                            f"{model!r} to roll back to; name one with --to (have: "
                            f"{', '.join(names)})")
    return same_model[-1]


def _manifest(directory: Path) -> dict[str, Any]:
    doc = read_json(directory / MANIFEST)
    if not isinstance(doc, dict):
        raise ArtifactError(str(directory / MANIFEST), f"must be a JSON object (got "
                            f"{type(doc).__name__})")
    return doc


def notification(store: Path, version: str, previous: str | None, reason: str) -> dict[str, Any]:
    doc = _manifest(store / version)
    return {
        "event": "index-published",
        "format": doc.get("format", INDEX_FORMAT),
        "store": str(store.resolve()),
        "index_version": version,
        "path": str((store / version).resolve()),
        "model_version": doc["model_version"],
        "previous_version": previous,
        "reason": reason,
        "num_items": doc["num_items"],
        "live_items": doc.get("live_items", doc["num_items"]),
        "published_at": dt.datetime.now(dt.UTC).isoformat(),
    }


def send_notification(redis_url: str, message: dict[str, Any],
                      client_options: dict[str, Any] | None = None) -> int:
    """PUBLISH the message on CHANNEL; returns how many subscribers received it.
    ``client_options``: password, ACL user and TLS files for ``Redis.from_url``."""
    import redis

    try:
        with redis.Redis.from_url(redis_url, socket_timeout=5, **(client_options or {})) as client:
            receivers = int(client.publish(CHANNEL, json.dumps(message, sort_keys=True)))
    except redis.RedisError as exc:
        raise NotificationError(
            f"published {message['index_version']} (CURRENT moved) but could not notify "
            f"{redact_url(redis_url)} on {CHANNEL}: {exc}; servers watching CURRENT still pick "
            "it up") from exc
    log.info("notified %d subscriber(s) on %s", receivers, CHANNEL)
    return receivers

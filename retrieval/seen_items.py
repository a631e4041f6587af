"""Every item a user has interacted with, kept apart from the model's history, for
``RetrieveRequest.exclude_seen``.

The *history* (retrieval.feature_store) is what the user tower reads: the latest
``history_length`` (20) items. The *seen set* is what ``exclude_seen`` drops: the items of
all the user's interactions, at most ``cap`` a user (``--seen-items-cap``, default 10,000;
past it the oldest interaction is dropped first). Both are written together, by
``load-features`` (every interaction of the dataset, or of a prepared output's
train/valid/test splits) and by RecordInteraction(s); the seen set is read only for the
requests of a batch that ask ``exclude_seen``, in the batch's one read round trip.

Redis key layout, beside the feature store's ``user`` and ``history`` keys::

    {prefix}:seen:{user_id}   ZSET  member: an item id; score: when the user last
                                    interacted with it, in seconds since the epoch (the
                                    dataset's timestamps; the server's clock for
                                    RecordInteraction(s)). At most cap members: the newest
                                    by (score, member).

A write queues ``ZADD key GT t1 i1 t2 i2 …`` then ``ZREMRANGEBYRANK key 0 -(cap+1)`` (and
the history's EXPIRE) in the MULTI/EXEC that writes the history: one round trip, and no
reader ever sees more than cap members. A read is ``ZRANGE key -cap -1``. Why a sorted set
rather than a list and a set: an item seen again only moves to its newer time (``GT``), so
each item is held once and the key's size is bounded by cap alone, in one key; the
prepared splits' rows are shuffled, and with the time as score the newest items are kept
whatever the order of the writes; trimming is one command on the same key. The in-process
store (``SeenSets``) follows the same rules.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import numpy as np

from contracts.dataset import Dataset

DEFAULT_SEEN_ITEMS_CAP = 10_000
SeenEvent = tuple[str, str, float]  # user_id, item_id, seconds since the epoch
_RECORD_STEP_S = 1e-6  # events of one RecordInteractions call: the last is the newest


def check_cap(cap: int) -> int:
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"seen_items_cap must be an integer >= 1 (got {cap!r})")
    return cap


def recorded_events(events: Sequence[tuple[str, str]],
                    now: float | None = None) -> list[SeenEvent]:
    """Recorded (user_id, item_id) pairs with their times: the server's clock, a microsecond
    apart in the given order, so that the last of a call is the most recent."""
    start = time.time() if now is None else now
    return [(u, i, start + n * _RECORD_STEP_S) for n, (u, i) in enumerate(events)]


def by_user(events: Iterable[SeenEvent]) -> dict[str, dict[str, float]]:
    """user → {item: its latest time} (an item repeated in one write keeps its newest)."""
    grouped: dict[str, dict[str, float]] = {}
    for user_id, item_id, at in events:
        items = grouped.setdefault(user_id, {})
        if at >= items.get(item_id, -np.inf):
            items[item_id] = at
    return grouped


# --- Redis ----------------------------------------------------------------------------


def seen_key(prefix: str, user_id: str) -> str:
    return f"{prefix}:seen:{user_id}"


def queue_add(pipe: Any, key: str, items: Mapping[str, float], cap: int,
              ttl_s: int | None = None) -> None:
    """Add items to one user's seen set, keeping the newest ``cap`` (3 commands at most)."""
    pipe.zadd(key, dict(items), gt=True)
    pipe.zremrangebyrank(key, 0, -(cap + 1))
    if ttl_s:
        pipe.expire(key, ttl_s)


def read_command(key: str, cap: int) -> tuple[str, str, int, int]:
    """The command that reads a user's seen set (its newest ``cap`` items)."""
    return ("ZRANGE", key, -cap, -1)


def decode(reply: Sequence[str | bytes]) -> frozenset[str]:
    return frozenset(i.decode() if isinstance(i, bytes) else i for i in reply)


# --- in process -----------------------------------------------------------------------


class SeenSets:
    """The in-process seen sets: user id → {item id: time}, at most ``cap`` items a user,
    the oldest by (time, item id) dropped first, as the Redis sorted set does. Not locked:
    the InMemoryFeatureStore calls it under its own lock."""

    def __init__(self, cap: int = DEFAULT_SEEN_ITEMS_CAP) -> None:
        self.cap = check_cap(cap)
        self._users: dict[str, _Seen] = {}

    def __len__(self) -> int:
        return len(self._users)

    def items_of(self, user_id: str) -> frozenset[str]:
        seen = self._users.get(user_id)
        return frozenset(seen.times) if seen is not None else frozenset()

    def add(self, user_id: str, items: Mapping[str, float]) -> None:
        seen = self._users.get(user_id)
        if seen is None:
            seen = self._users[user_id] = _Seen()
        seen.add(items, self.cap)

    def drop(self, user_id: str) -> None:
        self._users.pop(user_id, None)


class _Seen:
    """One user's items by time. ``times`` is in insertion order, which is (time, item)
    order while ``ordered``: then the oldest are the first entries and trimming is O(1)
    an item; events recorded online arrive in that order, a load in any order."""

    __slots__ = ("ordered", "times")

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.ordered = True

    def add(self, items: Mapping[str, float], cap: int) -> None:
        times = self.times
        for item_id, at in items.items():
            item_id = sys.intern(item_id)  # one string an item, however many users saw it
            old = times.get(item_id)
            if old is not None:
                if old >= at:
                    continue
                del times[item_id]
            if self.ordered and times:
                last = next(reversed(times))
                self.ordered = (times[last], last) <= (at, item_id)
            times[item_id] = at
        if len(times) > cap:
            self._trim(cap)

    def _trim(self, cap: int) -> None:
        if not self.ordered:
            self.times = dict(sorted(self.times.items(), key=lambda e: (e[1], e[0])))
            self.ordered = True
        for item_id in list(islice(self.times, len(self.times) - cap)):
            del self.times[item_id]


# --- from a dataset ---------------------------------------------------------------------


def iter_dataset_seen(dataset: Dataset, batch_size: int = 100_000) -> Iterator[list[SeenEvent]]:
    """Every interaction of the dataset as (user_id, item_id, timestamp), grouped by user
    and oldest first within a user, in lists of at most ``batch_size``."""
    cols = dataset.spec.columns
    user_ids = np.asarray(dataset.interactions[cols.user_id]).astype(str)
    item_ids = np.asarray(dataset.interactions[cols.item_id]).astype(str)
    timestamps = np.asarray(dataset.interactions[cols.timestamp], dtype=np.int64)
    order = np.lexsort((np.arange(len(user_ids)), timestamps, user_ids))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield list(zip(user_ids[rows].tolist(), item_ids[rows].tolist(),
                       timestamps[rows].astype(float).tolist(), strict=True))

"""User features for serving, behind one small interface.

    FeatureStore                 read_users / get_user / put_users / record_interactions /
                                 ping / close
    ├── InMemoryFeatureStore     dicts in this process: the embedded default, capped at
    │                            max_users (LRU and TTL eviction of recorded users)
    └── RedisFeatureStore        redis.asyncio: the store shared by a deployment

Redis key layout. This is a contract between every writer (batch loaders, online updaters)
and every reader; change it only together with the prefix version (default ``tt:v1``)::

    {prefix}:user:{user_id}      HASH  one field per stored user feature (every user-tower
                                       feature except the user id and the history); the value
                                       is JSON text: a number for a numeric feature, a string
                                       for a categorical one, a list of strings for a bag.
                                       Example: age -> 31.5, country -> "fr",
                                       genres -> ["jazz","rock"]
    {prefix}:history:{user_id}   LIST  the user's latest item ids, most recent first (LPUSH
                                       order), at most history_length long. An online writer
                                       records an interaction with LPUSH then
                                       LTRIM 0 history_length-1.
    {prefix}:seen:{user_id}      ZSET  every item the user interacted with, for exclude_seen,
                                       at most seen_items_cap: retrieval.seen_items.
    {prefix}:history_time:{user_id}
                                 LIST  beside the history, written and trimmed with it in the
                                       same MULTI/EXEC: "<unix seconds> <item id>" per history
                                       entry, in the same order, for the ages a sequence
                                       feature reads. An entry counts only where its item is
                                       the history's at that position; any other (a history
                                       written by an older writer, or none at all) reads as
                                       an unknown time, so older data stays readable.

A user is unknown (``get_user`` returns None) when both keys are missing; Redis keeps no empty
hashes or lists, so a user with no features and no history is unknown too. ``read_users``
reads both keys of every user of a serving batch in one pipelined round trip (2·n commands,
and the seen set of each user whose request asks exclude_seen),
blocking, from the compute thread that serves the batch: the event loop never waits on
Redis for a Retrieve and spends no CPU on it (see "The request path" in the README);
``get_user`` is the same read for one user, awaitable. ``put_users`` replaces each user's
keys (DEL of the three, then HSET / RPUSH; ``add_seen`` then fills the seen set), one MULTI/EXEC round trip per batch, so re-loading is idempotent and a reader
never sees a user half-written. The in-memory store follows the same rules.

Errors (redis exceptions are translated in one place, ``RedisFeatureStore._translate``)::

    TwoTowerError                       (contracts.errors)
    └── FeatureStoreError               Redis failed, or holds data this layout cannot read
        └── FeatureStoreUnavailable     Redis cannot be reached or did not answer in time
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Real
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as SyncRetry

from contracts.dataset import Dataset, is_missing, table_columns
from contracts.errors import DataError, TwoTowerError, Unavailable
from retrieval import seen_items
from retrieval.seen_items import DEFAULT_SEEN_ITEMS_CAP, SeenEvent, SeenSets

logger = logging.getLogger(__name__)

FeatureValue = str | float | tuple[str, ...]

DEFAULT_HISTORY_LENGTH = 20
UNKNOWN_TIME = -1  # StoredUser.history_times: the item's time is not known
DEFAULT_KEY_PREFIX = "tt:v1"
DEFAULT_TIMEOUT_S = 0.25
DEFAULT_BATCH_SIZE = 1000
# In-process store: ~0.6 KiB a user with a full history (+0.3 KiB with its items' times),
# so at most about 0.3-0.45 GB.
DEFAULT_MAX_USERS = 500_000


class FeatureStoreError(TwoTowerError):
    """The feature store failed, or holds data that does not follow the key layout."""


class FeatureStoreUnavailable(FeatureStoreError, Unavailable):
    """The feature store cannot be reached or did not answer within its timeout. Callers
    are told only that (the message names hosts, for the log)."""

    def public_message(self) -> str:
        return "feature store unavailable"


@dataclass(frozen=True)
class StoredUser:
    """What the store keeps for one user. Values are normalised on construction: numbers
    become float, bags become tuples of str; anything else is a TypeError."""

    features: Mapping[str, FeatureValue]  # user-tower features by name, except id and history
    history: tuple[str, ...]  # the user's latest item ids, most recent first
    # Read only (read_users with seen): the user's seen set; written by add_seen and
    # record_interactions with the times that order it (retrieval.seen_items).
    seen: frozenset[str] = frozenset()
    # each history item's time, whole seconds since the epoch (a sequence feature's ages,
    # contracts.inputs.UserRequest.history_times); given as ints or None (unknown), kept
    # as an int64 array with UNKNOWN_TIME for None (a tuple of 20 ints took 920 B more a
    # user in the in-process store, the array 200 B); () when all are unknown. Not part of
    # equality: two records of the same items are the same user's record. ``times``: the
    # tuple view, None where unknown.
    history_times: Sequence[int | None] = dataclasses.field(default=(), compare=False)

    def __post_init__(self) -> None:
        features = {str(name): _feature_value(name, v) for name, v in self.features.items()}
        object.__setattr__(self, "features", MappingProxyType(features))
        object.__setattr__(self, "history", tuple(_item_id(i) for i in self.history))
        times = array("q", (UNKNOWN_TIME if t is None else int(t) for t in self.history_times))
        if times and len(times) != len(self.history):
            raise ValueError(f"history_times must be empty or one per history item (got "
                             f"{len(times)} for {len(self.history)})")
        known = any(t != UNKNOWN_TIME for t in times)
        object.__setattr__(self, "history_times", times if known else ())  # () is shared

    @classmethod
    def decoded(cls, features: dict[str, FeatureValue], history: tuple[str, ...],
                history_times: array | tuple = ()) -> StoredUser:
        """A user whose parts are already what construction would make of them (the
        feature store's decoding: values checked, ids str, times an int64 array with a
        known time or ``()``), without normalising them again: a serving batch decodes a
        user or more a call."""
        user = cls.__new__(cls)
        for name, value in (("features", MappingProxyType(features)), ("history", history),
                            ("seen", frozenset()), ("history_times", history_times)):
            object.__setattr__(user, name, value)
        return user

    @property
    def times(self) -> tuple[int | None, ...]:
        """history_times as a tuple, None where unknown (empty when all are)."""
        return tuple(None if t == UNKNOWN_TIME else t for t in self.history_times)

    def cut(self, history_length: int) -> StoredUser:
        """The same user with the history (and its times) cut to ``history_length``."""
        return dataclasses.replace(self, history=self.history[:history_length],
                                   history_times=self.history_times[:history_length])


UserRead = StoredUser | None | FeatureStoreError  # one user of read_users


class FeatureStore(Protocol):
    def read_users(self, user_ids: Sequence[str], seen: Sequence[bool] = (),
                   times: bool = False) -> list[UserRead]:
        """Blocking, for a worker thread (never the event loop): each user's stored record,
        None for an unknown user, or a FeatureStoreError in the place of a user whose record
        cannot be read; ``seen[i]`` also reads user i's seen set into ``StoredUser.seen``;
        ``times`` also reads the history's times (for a model with a sequence feature;
        Redis reads them only then, one more LRANGE a user).
        Raises FeatureStoreUnavailable when the store cannot answer in time."""
        ...

    async def get_user(self, user_id: str) -> StoredUser | None:
        """The stored user, or None when the user is unknown (read_users of one user, with
        times)."""
        ...

    async def put_users(self, users: Mapping[str, StoredUser]) -> None:
        """Replace what is stored for each of these users."""
        ...

    async def record_interactions(self, events: Sequence[tuple[str, str]],
                                  ttl_s: int | None = None) -> None:
        """Prepend each (user_id, item_id), in the given order (the last is the most recent),
        to its user's history, cut to the history length, and to its seen set at the server's time;
        ``ttl_s`` expires a history (and seen set) that stops receiving events."""
        ...

    async def add_seen(self, events: Sequence[SeenEvent]) -> None:
        """Add (user_id, item_id, time) to the users' seen sets, keeping each user's newest
        ``seen_items_cap`` (the bulk load: load-features, serve --features)."""
        ...

    async def ping(self) -> None:
        """Return when the store answers; raise FeatureStoreUnavailable otherwise."""
        ...

    async def close(self) -> None: ...


class InMemoryFeatureStore:
    """A dict in this process, with the same rules as Redis: histories are cut to
    ``history_length``, and a user with no features and no history reads as None.

    Bounded, like a Redis with ``maxmemory-policy allkeys-lru`` and the history's EXPIRE:

    - users written by ``put_users`` (``serve --features``) are *preloaded*: kept for the
      life of the process, never evicted, and their count must not exceed ``max_users``;
    - users the store learns from ``record_interactions`` alone share the rest of
      ``max_users``; past it the least recently used (read or written) is evicted, and one
      whose last recorded event is older than ``ttl_s`` (of that call) reads as unknown
      and is dropped: lazily when touched, and from the least recently used end on writes.

    ``read_users`` runs on the compute thread and moves what it reads to the recent end,
    so both sides take one lock for a few dict operations per user. ``on_evict(reason, n)``
    (reason ``lru`` or ``ttl``) is called outside the lock.
    """

    def __init__(self, *, history_length: int = DEFAULT_HISTORY_LENGTH,
                 max_users: int = DEFAULT_MAX_USERS,
                 seen_items_cap: int = DEFAULT_SEEN_ITEMS_CAP,
                 on_evict: Callable[[str, int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._history_length = _check_history_length(history_length)
        if isinstance(max_users, bool) or not isinstance(max_users, int) or max_users < 1:
            raise ValueError(f"max_users must be an integer >= 1 (got {max_users!r})")
        self.max_users = max_users
        self._preloaded: dict[str, StoredUser] = {}
        # user id -> (user, monotonic deadline or None); least recently used first
        self._recorded: OrderedDict[str, tuple[StoredUser, float | None]] = OrderedDict()
        self._seen = SeenSets(seen_items_cap)  # of preloaded and recorded users, dropped with them
        self._lock = threading.Lock()
        self._on_evict, self._clock = on_evict, clock

    def __len__(self) -> int:
        return len(self._preloaded) + len(self._recorded)

    @property
    def preloaded(self) -> int:
        return len(self._preloaded)

    def read_users(self, user_ids: Sequence[str], seen: Sequence[bool] = (),
                   times: bool = False) -> list[UserRead]:
        """``times`` costs nothing here: the history's times are always returned."""
        now, expired = self._clock(), 0
        found: list[UserRead] = []
        with self._lock:
            for i, user_id in enumerate(user_ids):
                user = self._preloaded.get(user_id)
                if user is None and (entry := self._recorded.get(user_id)) is not None:
                    if entry[1] is not None and entry[1] <= now:
                        del self._recorded[user_id]
                        self._seen.drop(user_id)
                        expired += 1
                    else:
                        self._recorded.move_to_end(user_id)
                        user = entry[0]
                if user is not None and i < len(seen) and seen[i]:
                    user = dataclasses.replace(user, seen=self._seen.items_of(user_id))
                found.append(user)
        self._count("ttl", expired)
        return found

    async def get_user(self, user_id: str) -> StoredUser | None:
        found = self.read_users([user_id])[0]
        return found if isinstance(found, StoredUser) else None

    async def put_users(self, users: Mapping[str, StoredUser]) -> None:
        """Preload: these users are kept until the process ends. Raises ValueError, storing
        nothing, when the preloaded users would outnumber ``max_users``."""
        kept = {user_id: dataclasses.replace(user.cut(self._history_length), seen=frozenset())
                for user_id, user in users.items()}
        with self._lock:
            after = self._preloaded.keys() | {u for u, user in kept.items() if user.features
                                              or user.history}
            after -= {u for u, user in kept.items() if not (user.features or user.history)}
            if len(after) > self.max_users:
                raise ValueError(f"{len(after)} preloaded users exceed the in-process store's "
                                 f"cap of {self.max_users} users; raise it (serve "
                                 "--store-max-users) or use Redis (--redis-url)")
            for user_id, user in kept.items():
                self._recorded.pop(user_id, None)
                self._seen.drop(user_id)
                if user.features or user.history:
                    self._preloaded[user_id] = user
                else:
                    self._preloaded.pop(user_id, None)
            evicted = self._evict_over_cap()
        self._count("lru", evicted)

    async def record_interactions(self, events: Sequence[tuple[str, str]],
                                  ttl_s: int | None = None) -> None:
        now = self._clock()
        deadline = now + ttl_s if ttl_s else None
        with self._lock:
            expired = 0
            for user_id, item_id, at in seen_items.recorded_events(events):
                if (user := self._preloaded.get(user_id)) is not None:
                    self._preloaded[user_id] = _prepend(user, item_id, at, self._history_length)
                    self._seen.add(user_id, {item_id: at})
                    continue
                entry = self._recorded.pop(user_id, None)
                if entry is not None and entry[1] is not None and entry[1] <= now:
                    entry, expired = None, expired + 1
                    self._seen.drop(user_id)
                self._seen.add(user_id, {item_id: at})
                user = _NO_USER if entry is None else entry[0]
                self._recorded[user_id] = (_prepend(user, item_id, at, self._history_length),
                                           deadline)
            expired += self._expire_oldest(now)
            evicted = self._evict_over_cap()
        self._count("ttl", expired)
        self._count("lru", evicted)

    async def add_seen(self, events: Sequence[SeenEvent]) -> None:
        """Fill the seen sets of users the store holds (put_users first); others are
        skipped, so the store stays bounded by max_users."""
        with self._lock:
            for user_id, items in seen_items.by_user(events).items():
                if user_id in self._preloaded or user_id in self._recorded:
                    self._seen.add(user_id, items)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _evict_over_cap(self) -> int:
        over = max(0, len(self._preloaded) + len(self._recorded) - self.max_users)
        for _ in range(over):
            self._seen.drop(self._recorded.popitem(last=False)[0])
        return over

    def _expire_oldest(self, now: float, most: int = 16) -> int:
        """Drop expired users from the least recently used end, stopping at a live one."""
        dropped = 0
        while dropped < most and self._recorded:
            deadline = next(iter(self._recorded.values()))[1]
            if deadline is None or deadline > now:
                break
            self._seen.drop(self._recorded.popitem(last=False)[0])
            dropped += 1
        return dropped

    def _count(self, reason: str, n: int) -> None:
        if n and self._on_evict is not None:
            self._on_evict(reason, n)


_NO_USER = StoredUser({}, ())


def _prepend(user: StoredUser, item_id: str, at: float, history_length: int) -> StoredUser:
    times = user.history_times or array("q", [UNKNOWN_TIME]) * len(user.history)
    return StoredUser(user.features, ((item_id,) + user.history)[:history_length],
                      history_times=(array("q", [int(at)]) + times)[:history_length])


class RedisFeatureStore:
    """The Redis implementation; see the module docstring for the key layout.

    ``client`` (a ``redis.asyncio.Redis``) writes and pings from the event loop; ``reader``
    (a ``redis.Redis`` on the same server, thread-safe through its connection pool) reads
    users from worker threads. The store owns both and closes them in ``close``. Prefer
    ``from_url``, which makes both with the same options, sets the timeouts and turns
    retries off.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        reader: redis.Redis,
        *,
        history_length: int = DEFAULT_HISTORY_LENGTH,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        batch_size: int = DEFAULT_BATCH_SIZE,
        seen_items_cap: int = DEFAULT_SEEN_ITEMS_CAP,
    ) -> None:
        if not isinstance(key_prefix, str) or not key_prefix:
            raise ValueError(f"key_prefix must be a non-empty string (got {key_prefix!r})")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1 (got {batch_size!r})")
        self._client, self._reader = client, reader
        self._history_length = _check_history_length(history_length)
        self._prefix = key_prefix
        self._batch_size = batch_size
        self._seen_cap = seen_items.check_cap(seen_items_cap)
        self._where = _describe(client)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        history_length: int = DEFAULT_HISTORY_LENGTH,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        batch_size: int = DEFAULT_BATCH_SIZE,
        client_options: Mapping[str, Any] | None = None,
        seen_items_cap: int = DEFAULT_SEEN_ITEMS_CAP,
    ) -> RedisFeatureStore:
        """A store on ``url`` (``redis://host:port/db``). Connecting and each reply are
        bounded by ``timeout_s`` seconds; there are no retries, so a failure surfaces within
        one timeout and the caller decides what to do (the server answers degraded)."""
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, Real) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a number of seconds > 0 (got {timeout_s!r})")
        options = dict(decode_responses=True, socket_timeout=timeout_s,
                       socket_connect_timeout=timeout_s,
                       **(client_options or {}))  # credentials, TLS: retrieval.redis_options
        try:
            client = aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)
            reader = redis.Redis.from_url(url, retry=SyncRetry(NoBackoff(), 0), **options)
        except ValueError as exc:
            raise ValueError(f"{exc} (expected a URL like redis://127.0.0.1:6379/0)") from exc
        return cls(client, reader, history_length=history_length, key_prefix=key_prefix,
                   batch_size=batch_size, seen_items_cap=seen_items_cap)

    def read_users(self, user_ids: Sequence[str], seen: Sequence[bool] = (),
                   times: bool = False) -> list[UserRead]:
        """Both keys of every user, and the seen set of those ``seen`` asks for (and with
        ``times`` the history's times), in one pipeline: one round trip, bounded by the
        socket timeouts. A key of the wrong type fails its own user, not the batch."""
        keys = [self._keys(user_id) for user_id in user_ids]
        with_seen = [i < len(seen) and bool(seen[i]) for i in range(len(user_ids))]
        what = f"user {user_ids[0]!r}" if len(user_ids) == 1 else f"{len(user_ids)} users"
        last = self._history_length - 1
        commands: list[tuple] = []
        for user_id, (user_key, history_key), wanted in zip(user_ids, keys, with_seen,
                                                             strict=True):
            commands += [("HGETALL", user_key), ("LRANGE", history_key, 0, last)]
            if times:
                commands.append(("LRANGE", self._times_key(user_id), 0, last))
            if wanted:
                commands.append(seen_items.read_command(self._seen_key(user_id),
                                                        self._seen_cap))
        with self._translate(f"reading {what}"):
            replies = iter(self._round_trip(commands))
        return [self._user_of(user_id, user_key, _fields(next(replies)), next(replies),
                              next(replies) if times else [], next(replies) if wanted else [])
                for user_id, (user_key, _), wanted in zip(user_ids, keys, with_seen, strict=True)]

    def _round_trip(self, commands: Sequence[tuple]) -> list[Any]:
        """Every command written at once on one pooled connection, then its replies in
        order: a pipeline without redis-py's Pipeline object and its bookkeeping
        (read_users, decoding included: one user 0.126 against 0.149 ms of CPU, 12 users
        0.42 against 0.47). An error reply stands in its command's place, as
        ``Pipeline.execute(raise_on_error=False)`` has it; a connection that fails raises
        and is dropped by redis-py (disconnected), so it is never reused half-read."""
        pool = self._reader.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command(connection.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(connection.read_response())
                except ResponseError as exc:  # this command's own error reply
                    replies.append(exc)
            return replies
        finally:
            pool.release(connection)

    async def get_user(self, user_id: str) -> StoredUser | None:
        found = (await asyncio.to_thread(self.read_users, [user_id], (), True))[0]
        if isinstance(found, FeatureStoreError):
            raise found
        return found

    def _user_of(self, user_id: str, user_key: str, fields: Any, history: Any, times: Any,
                 seen: Any) -> UserRead:
        for reply in (fields, history, times, seen):
            if isinstance(reply, RedisError):
                error = FeatureStoreError(f"Redis at {self._where} failed while reading user "
                                          f"{user_id!r}: {reply}")
                error.__cause__ = reply
                return error
        if not fields and not history and not seen:
            return None
        try:
            user = _decode_user(user_key, fields, history, times)
        except FeatureStoreError as exc:
            return exc
        return dataclasses.replace(user, seen=seen_items.decode(seen)) if seen else user

    async def put_users(self, users: Mapping[str, StoredUser]) -> None:
        pending = list(users.items())
        for start in range(0, len(pending), self._batch_size):
            batch = pending[start : start + self._batch_size]
            with self._translate(f"writing {len(batch)} users"):
                async with self._client.pipeline(transaction=True) as pipe:
                    for user_id, user in batch:
                        self._queue_replace(pipe, user_id, user)
                    await pipe.execute()
        logger.info("wrote %d users to Redis at %s", len(pending), self._where)

    def write_batch(self, batch: Sequence[tuple[str, StoredUser]]) -> None:
        """Blocking put_users of one batch, without logging: the unit of a streamed bulk
        load (`load-features --prepared`), which has no event loop to keep free. One
        MULTI/EXEC round trip on the reader's client, whose C command packing (hiredis)
        writes 1.7x the users/s of the asyncio client (22.7k against 13.4k a second)."""
        with self._translate(f"writing {len(batch)} users"), \
                self._reader.pipeline(transaction=True) as pipe:
            for user_id, user in batch:
                self._queue_replace(pipe, user_id, user)
            pipe.execute()

    async def record_interactions(self, events: Sequence[tuple[str, str]],
                                  ttl_s: int | None = None) -> None:
        """One round trip: LPUSH, LTRIM (and EXPIRE) of the history and ZADD,
        ZREMRANGEBYRANK (and EXPIRE) of the seen set per user, in a MULTI/EXEC so a reader
        never sees a history longer than history_length nor a seen set over its cap."""
        recorded = seen_items.recorded_events(events)
        by_user: dict[str, list[tuple[str, float]]] = {}
        for user_id, item_id, at in recorded:
            by_user.setdefault(user_id, []).append((item_id, at))
        seen = seen_items.by_user(recorded)
        with self._translate(f"recording {len(events)} interactions"):
            async with self._client.pipeline(transaction=True) as pipe:
                for user_id, items in by_user.items():
                    _, history_key = self._keys(user_id)
                    pipe.lpush(history_key, *(item for item, _ in items))
                    pipe.lpush(self._times_key(user_id), *(_time_entry(item, at)
                                                           for item, at in items))
                    for key in (history_key, self._times_key(user_id)):
                        pipe.ltrim(key, 0, self._history_length - 1)
                        if ttl_s:
                            pipe.expire(key, ttl_s)
                    seen_items.queue_add(pipe, self._seen_key(user_id), seen[user_id],
                                         self._seen_cap, ttl_s)
                await pipe.execute()

    async def add_seen(self, events: Sequence[SeenEvent]) -> None:
        for start in range(0, len(events), self._batch_size):
            batch = events[start : start + self._batch_size]
            with self._translate(f"writing {len(batch)} seen items"):
                async with self._client.pipeline(transaction=True) as pipe:
                    self._queue_seen(pipe, batch)
                    await pipe.execute()

    def write_seen_batch(self, events: Sequence[SeenEvent]) -> None:
        """Blocking add_seen of one batch in one MULTI/EXEC (the streamed bulk load)."""
        with self._translate(f"writing {len(events)} seen items"), \
                self._reader.pipeline(transaction=True) as pipe:
            self._queue_seen(pipe, events)
            pipe.execute()

    def _queue_seen(self, pipe: Any, events: Sequence[SeenEvent]) -> None:
        for user_id, items in seen_items.by_user(events).items():
            seen_items.queue_add(pipe, self._seen_key(user_id), items, self._seen_cap)

    async def ping(self) -> None:
        with self._translate("pinging"):
            await self._client.ping()

    async def close(self) -> None:
        with self._translate("closing the connection"):
            await self._client.aclose()
        with self._translate("closing the reader's connections"):
            self._reader.close()

    def _keys(self, user_id: str) -> tuple[str, str]:
        return f"{self._prefix}:user:{user_id}", f"{self._prefix}:history:{user_id}"

    def _seen_key(self, user_id: str) -> str:
        return seen_items.seen_key(self._prefix, user_id)

    def _times_key(self, user_id: str) -> str:
        return f"{self._prefix}:history_time:{user_id}"

    def _queue_replace(self, pipe: Any, user_id: str, user: StoredUser) -> None:
        user_key, history_key = self._keys(user_id)
        pipe.delete(user_key, history_key, self._seen_key(user_id), self._times_key(user_id))
        if user.features:
            pipe.hset(user_key, mapping={n: _encode(v) for n, v in user.features.items()})
        if user.history:
            pipe.rpush(history_key, *user.history[: self._history_length])
        if user.history_times:
            pipe.rpush(self._times_key(user_id), *(
                _time_entry(item, at) for item, at in zip(
                    user.history[: self._history_length],
                    user.history_times[: self._history_length], strict=True)))

    @contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        """The one place where redis exceptions become feature-store errors."""
        try:
            yield
        except RedisAuthenticationError as exc:  # a ConnectionError, but not transient
            raise FeatureStoreError(
                f"Redis at {self._where} refused the credentials while {action}: {exc} "
                "Check --redis-username and the password (--redis-password-file or "
                "--redis-password-env)."
            ) from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:  # OSError: TimeoutError
            raise FeatureStoreUnavailable(
                f"Redis at {self._where} is unavailable while {action}: "
                f"{str(exc) or type(exc).__name__}. "
                "Check that redis-server runs there and is reachable, or raise timeout_s."
            ) from exc
        except RedisError as exc:
            raise FeatureStoreError(f"Redis at {self._where} failed while {action}: {exc}") from exc


def users_from_dataset(
    dataset: Dataset, history_length: int = DEFAULT_HISTORY_LENGTH
) -> dict[str, StoredUser]:
    """Every user of the dataset as the store keeps them: the users-table features (every
    user-tower feature except the user id and history) and the last ``history_length``
    item ids by timestamp, most recent first; on equal timestamps the later row is the more
    recent. Users seen only in interactions get no features; users seen only in the users
    table get no history. One sort over the interactions: 1M rows take about a second."""
    _check_history_length(history_length)
    features = _user_features(dataset)
    histories = _latest_items(dataset, history_length)
    user_ids = dict.fromkeys([*features, *histories])
    none: tuple[tuple[str, ...], tuple[int, ...]] = ((), ())
    return {u: StoredUser(features.get(u, {}), histories.get(u, none)[0],
                          history_times=histories.get(u, none)[1]) for u in user_ids}


def _user_features(dataset: Dataset) -> dict[str, dict[str, Any]]:
    spec, users = dataset.spec, dataset.users
    names = [c.name for c in table_columns(spec)["users"] if not isinstance(c, str)]
    for name in (spec.columns.user_id, *names):
        if name not in users:
            raise DataError("<users table>", f"missing column (has: {', '.join(users)})",
                            column=name)
    columns = {name: users[name].tolist() for name in names}
    user_ids = [str(u) for u in users[spec.columns.user_id].tolist()]
    # a missing value is not stored: serving reads it as missing, as training did
    return {u: {n: values[i] for n, values in columns.items() if not is_missing(values[i])}
            for i, u in enumerate(user_ids)}


def _latest_items(dataset: Dataset, history_length: int
                  ) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """user → (latest item ids, their timestamps), most recent first."""
    cols = dataset.spec.columns
    user_ids = np.asarray(dataset.interactions[cols.user_id]).astype(str)
    if len(user_ids) == 0:
        return {}
    item_ids = np.asarray(dataset.interactions[cols.item_id]).astype(str)
    timestamps = np.asarray(dataset.interactions[cols.timestamp], dtype=np.int64)
    users, user_codes = np.unique(user_ids, return_inverse=True)
    rows = np.arange(len(user_ids))
    # Group by user, newest first; among equal timestamps the later row is the newer.
    order = np.lexsort((-rows, -timestamps, user_codes))
    sorted_codes = user_codes[order]
    first = np.searchsorted(sorted_codes, np.arange(len(users)))
    keep = order[rows - first[sorted_codes] < history_length]
    counts = np.bincount(user_codes[keep], minlength=len(users))
    bounds = np.cumsum(counts)[:-1]
    chunks = np.split(item_ids[keep], bounds)
    times = np.split(timestamps[keep], bounds)
    return {u: (tuple(c.tolist()), tuple(t.tolist()))
            for u, c, t in zip(users.tolist(), chunks, times, strict=True)}


def _check_history_length(history_length: int) -> int:
    if isinstance(history_length, bool) or not isinstance(history_length, int) or (
        history_length < 1
    ):
        raise ValueError(f"history_length must be an integer >= 1 (got {history_length!r})")
    return history_length


def _feature_value(name: object, value: object) -> FeatureValue:
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Real) and not isinstance(value, bool):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"feature {name!r} must be a finite number (got {value!r})")
        return number
    if isinstance(value, tuple | list) and all(isinstance(t, str) for t in value):
        return tuple(str(t) for t in value)
    raise TypeError(
        f"feature {name!r} must be a number, a string or a sequence of strings "
        f"(got {type(value).__name__} {value!r})"
    )


def _item_id(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"history item ids must be strings (got {type(value).__name__} {value!r})")
    return str(value)


def _encode(value: FeatureValue) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))


def _time_entry(item_id: str, at: float | None) -> str:
    """An entry of the history_time list: "<unix seconds> <item id>" ("- <item>": unknown)."""
    return f"{'-' if at is None or at == UNKNOWN_TIME else int(at)} {item_id}"


def _decode_times(history: tuple[str, ...], entries: list[Any]) -> array | tuple:
    """Each history item's time from the history_time entries: where the entry at the same
    position names the same item; anything else (no list, an older writer's history that
    moved ahead of it, a malformed entry) is an unknown time, never an error. As
    StoredUser.history_times keeps them: an int64 array, or () when none is known."""
    if not entries:
        return ()
    times = array("q")
    for j, item in enumerate(history):
        seconds, _, named = _text(entries[j]).partition(" ") if j < len(entries) else ("", "", "")
        times.append(int(seconds) if named == item and seconds.isdigit() else UNKNOWN_TIME)
    return times if any(t != UNKNOWN_TIME for t in times) else ()


def _decode_user(user_key: str, fields: Mapping[Any, Any], history: list[Any],
                 times: list[Any] = ()) -> StoredUser:
    features = {}
    for name, raw in fields.items():
        try:
            features[_text(name)] = _feature_value(_text(name), json.loads(raw))
        except (ValueError, TypeError) as exc:
            raise FeatureStoreError(
                f"{user_key} field {_text(name)!r} holds {raw!r}, which is not a feature value "
                f"({exc}); expected JSON text: a number, a string or a list of strings"
            ) from exc
    items = tuple(_text(i) for i in history)
    return StoredUser.decoded(features, items, _decode_times(items, list(times)))


def _fields(reply: Any) -> Any:
    """HGETALL's reply as a dict: RESP2 sends [field, value, …], RESP3 a map; an error
    reply is kept as it is."""
    return dict(zip(reply[::2], reply[1::2], strict=True)) if isinstance(reply, list) else reply


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _describe(client: aioredis.Redis) -> str:
    """Where the client points, without credentials."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"

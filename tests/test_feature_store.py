"""Specs of the user feature store.

Both implementations obey one set of rules (each rule runs against the in-memory store and
against a real redis-server); the Redis one also keeps the documented key layout, reads a
user in one round trip and fails fast when Redis is gone. ``users_from_dataset`` is checked
by hand on a tiny dataset and against a plain-Python oracle on seeded data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import numpy as np
import pytest
import redis

from retrieval.feature_store import (
    FeatureStore,
    FeatureStoreError,
    FeatureStoreUnavailable,
    InMemoryFeatureStore,
    RedisFeatureStore,
    StoredUser,
    users_from_dataset,
)
from contracts.dataset import Dataset
from contracts.feature_spec import parse_feature_spec

T = TypeVar("T")
OpenStore = Callable[..., contextlib.AbstractAsyncContextManager[FeatureStore]]

ALICE = StoredUser(
    features={"age": 31.5, "country": "fr", "genres": ("jazz", "rock")},
    history=("i3", "i2", "i1"),
)
TEST_TIMEOUT_S = 2.0  # generous: these tests are about behaviour, not latency


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


@pytest.fixture(params=["in_memory", "redis"])
def open_store(request: pytest.FixtureRequest) -> OpenStore:
    """Opens (and at the end closes) a store of each implementation."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    @contextlib.asynccontextmanager
    async def open_(history_length: int = 20) -> AsyncIterator[FeatureStore]:
        store: FeatureStore
        if url is None:
            store = InMemoryFeatureStore(history_length=history_length)
        else:
            store = RedisFeatureStore.from_url(
                url, history_length=history_length, timeout_s=TEST_TIMEOUT_S
            )
        try:
            yield store
        finally:
            await store.close()

    return open_


def put_then_get(
    open_store: OpenStore, loads: list[Mapping[str, StoredUser]], user_id: str,
    history_length: int = 20,
) -> StoredUser | None:
    """Put each batch of users in turn, then read one user back."""
    async def scenario() -> StoredUser | None:
        async with open_store(history_length=history_length) as store:
            for users in loads:
                await store.put_users(users)
            return await store.get_user(user_id)

    return run(scenario)


# --- Rules both stores follow ------------------------------------------------------------


@pytest.mark.parametrize("user_id, user", [
    ("alice", ALICE),
    ("features-only", StoredUser({"age": 0.0, "genres": ()}, ())),
    ("history-only", StoredUser({}, ("i9",))),
    ("team:42/zoë", StoredUser({"country": "ñ \"quoted\" |x"}, ("item:1", "é"))),
])
def test_a_stored_user_reads_back_equal(open_store: OpenStore, user_id: str,
                                        user: StoredUser) -> None:
    assert put_then_get(open_store, [{user_id: user}], user_id) == user


@pytest.mark.parametrize("times", [(1_700_000_000, None, 1_600_000_000), (None, None, None),
                                   ()])
def test_a_user_read_back_is_the_user_construction_makes(open_store: OpenStore, times) -> None:
    """What a read decodes (StoredUser.decoded, without normalising again) has the types
    and the history times that construction gives the same user."""
    user = StoredUser({"age": 7, "genres": ["a"], "country": "fr"}, ("i3", "i2", "i1"),
                      history_times=times)
    read = put_then_get(open_store, [{"u": user}], "u")
    assert read == user and dict(read.features) == {"age": 7.0, "genres": ("a",),
                                                     "country": "fr"}
    assert {k: type(v) for k, v in read.features.items()} == {
        k: type(v) for k, v in user.features.items()}
    assert read.times == user.times and type(read.history_times) is type(user.history_times)
    assert type(read.history) is tuple and read.seen == frozenset()


def test_an_unknown_user_reads_as_none(open_store: OpenStore) -> None:
    assert put_then_get(open_store, [{"alice": ALICE}], "bob") is None


def test_a_user_with_no_features_and_no_history_reads_as_none(open_store: OpenStore) -> None:
    assert put_then_get(open_store, [{"nobody": StoredUser({}, ())}], "nobody") is None


def test_history_is_most_recent_first_and_cut_to_history_length(open_store: OpenStore) -> None:
    user = StoredUser({"age": 1.0}, ("i5", "i4", "i3", "i2", "i1"))
    got = put_then_get(open_store, [{"u": user}], "u", history_length=3)
    assert got == StoredUser({"age": 1.0}, ("i5", "i4", "i3"))


def test_recorded_interactions_are_prepended_and_cut(open_store: OpenStore) -> None:
    async def scenario() -> tuple[StoredUser | None, StoredUser | None]:
        async with open_store(history_length=4) as store:
            await store.put_users({"alice": ALICE})
            await store.record_interactions([("alice", "i4"), ("new", "x1"), ("alice", "i5")])
            return await store.get_user("alice"), await store.get_user("new")

    alice, new = run(scenario)
    assert alice == StoredUser(ALICE.features, ("i5", "i4", "i3", "i2"))
    assert new == StoredUser({}, ("x1",))


def test_recorded_history_expires_in_redis(redis_url: str) -> None:
    async def scenario() -> int:
        store = RedisFeatureStore.from_url(redis_url, timeout_s=TEST_TIMEOUT_S)
        try:
            await store.record_interactions([("u", "i1")], ttl_s=600)
        finally:
            await store.close()
        with redis.Redis.from_url(redis_url) as client:
            return int(client.ttl("tt:v1:history:u"))

    assert 590 <= run(scenario) <= 600


def test_reloading_replaces_old_values(open_store: OpenStore) -> None:
    new = StoredUser({"age": 32.0}, ("i7",))
    assert put_then_get(open_store, [{"alice": ALICE}, {"alice": new}], "alice") == new


def test_reloading_a_user_as_empty_forgets_the_user(open_store: OpenStore) -> None:
    loads = [{"alice": ALICE}, {"alice": StoredUser({}, ())}]
    assert put_then_get(open_store, loads, "alice") is None


def test_reloading_the_same_users_is_idempotent(open_store: OpenStore) -> None:
    assert put_then_get(open_store, [{"alice": ALICE}] * 3, "alice") == ALICE


def test_a_dataset_loads_into_the_store_and_reads_back(open_store: OpenStore) -> None:
    users = users_from_dataset(small_dataset(), history_length=3)
    for user_id in ("alice", "bob", "carol", "dave"):
        assert put_then_get(open_store, [users], user_id, history_length=3) == users[user_id]


def test_ping_answers_when_the_store_is_up(open_store: OpenStore) -> None:
    async def scenario() -> None:
        async with open_store() as store:
            await store.ping()

    run(scenario)


# --- StoredUser and options --------------------------------------------------------------


def test_stored_values_are_normalised_numbers_to_float_bags_to_tuples() -> None:
    user = StoredUser({"age": 3, "weight": np.float32(0.5), "genres": ["a", "b"]}, ("i1",))
    assert dict(user.features) == {"age": 3.0, "weight": 0.5, "genres": ("a", "b")}
    assert all(type(v) in (float, tuple) for v in user.features.values())


@pytest.mark.parametrize("features, history, message", [
    ({"age": None}, (), "feature 'age' must be a number, a string or a sequence of strings"),
    ({"flag": True}, (), "feature 'flag' must be a number"),
    ({"genres": ("a", 1)}, (), "feature 'genres' must be a number"),
    ({"age": float("nan")}, (), "feature 'age' must be a finite number"),
    ({}, ("i1", 2), "history item ids must be strings"),
])
def test_a_value_the_store_cannot_keep_is_rejected_saying_what_was_expected(
    features: dict[str, Any], history: tuple[Any, ...], message: str
) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        StoredUser(features, history)


def test_options_are_checked_when_the_store_is_made() -> None:
    with pytest.raises(ValueError, match=r"history_length must be an integer >= 1 \(got 0\)"):
        InMemoryFeatureStore(history_length=0)
    with pytest.raises(ValueError, match=r"timeout_s must be a number of seconds > 0"):
        RedisFeatureStore.from_url("redis://127.0.0.1:1/0", timeout_s=0)
    with pytest.raises(ValueError, match=r"history_length must be an integer >= 1"):
        RedisFeatureStore.from_url("redis://127.0.0.1:1/0", history_length=-1)
    with pytest.raises(ValueError, match=r"expected a URL like redis://"):
        RedisFeatureStore.from_url("http://127.0.0.1:1/0")


# --- The Redis key layout ----------------------------------------------------------------


def put_with_redis(url: str, users: Mapping[str, StoredUser], **options: Any) -> None:
    async def scenario() -> None:
        store = RedisFeatureStore.from_url(url, timeout_s=TEST_TIMEOUT_S, **options)
        try:
            await store.put_users(users)
        finally:
            await store.close()

    run(scenario)


def get_with_redis(url: str, user_id: str, **options: Any) -> StoredUser | None:
    async def scenario() -> StoredUser | None:
        store = RedisFeatureStore.from_url(url, timeout_s=TEST_TIMEOUT_S, **options)
        try:
            return await store.get_user(user_id)
        finally:
            await store.close()

    return run(scenario)


def test_redis_key_layout_is_the_documented_one(redis_url: str) -> None:
    put_with_redis(redis_url, {"alice": ALICE}, history_length=2)
    with redis.Redis.from_url(redis_url, decode_responses=True) as raw:
        assert set(raw.keys("*")) == {"tt:v1:user:alice", "tt:v1:history:alice"}
        assert raw.type("tt:v1:user:alice") == "hash"
        assert raw.hgetall("tt:v1:user:alice") == {
            "age": "31.5", "country": '"fr"', "genres": '["jazz","rock"]',
        }
        assert raw.type("tt:v1:history:alice") == "list"
        assert raw.lrange("tt:v1:history:alice", 0, -1) == ["i3", "i2"]


def test_the_key_prefix_namespaces_every_key(redis_url: str) -> None:
    put_with_redis(redis_url, {"alice": ALICE}, key_prefix="shop7:v2")
    with redis.Redis.from_url(redis_url, decode_responses=True) as raw:
        assert set(raw.keys("*")) == {"shop7:v2:user:alice", "shop7:v2:history:alice"}
    assert get_with_redis(redis_url, "alice") is None
    assert get_with_redis(redis_url, "alice", key_prefix="shop7:v2") == ALICE


def test_the_store_reads_what_a_plain_redis_writer_wrote(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url, decode_responses=True) as raw:
        raw.hset("tt:v1:user:bob", mapping={"age": "40", "country": '"de"', "genres": "[]"})
        raw.lpush("tt:v1:history:bob", "i1", "i2", "i3")  # interactions in time order
        raw.lpush("tt:v1:history:bob", "i4")  # an online writer records one more ...
        raw.ltrim("tt:v1:history:bob", 0, 2)  # ... and keeps history_length of them
    expected = StoredUser({"age": 40.0, "country": "de", "genres": ()}, ("i4", "i3", "i2"))
    assert get_with_redis(redis_url, "bob", history_length=3) == expected


def test_a_value_that_breaks_the_layout_is_reported_with_its_key_and_field(
    redis_url: str,
) -> None:
    with redis.Redis.from_url(redis_url, decode_responses=True) as raw:
        raw.hset("tt:v1:user:bob", "age", "forty")
        raw.set("tt:v1:user:carol", "not a hash")
    with pytest.raises(FeatureStoreError, match=r"tt:v1:user:bob field 'age' holds 'forty'"):
        get_with_redis(redis_url, "bob")
    with pytest.raises(FeatureStoreError, match=r"WRONGTYPE") as info:
        get_with_redis(redis_url, "carol")
    assert isinstance(info.value.__cause__, redis.ResponseError)


def test_put_users_writes_every_batch(redis_url: str) -> None:
    users = {f"u{i}": StoredUser({"age": float(i)}, (f"i{i}",)) for i in range(5)}
    put_with_redis(redis_url, users, batch_size=2)
    for user_id, user in users.items():
        assert get_with_redis(redis_url, user_id) == user


def test_get_user_is_one_round_trip(redis_url: str) -> None:
    """The server counts the reads it does from client sockets; a pipelined HGETALL +
    LRANGE arrives in one read, two sequential commands would take two."""
    with redis.Redis.from_url(redis_url, decode_responses=True) as raw:

        def reads() -> int:
            return int(raw.info("stats")["total_reads_processed"])

        async def scenario() -> list[int]:
            store = RedisFeatureStore.from_url(redis_url, timeout_s=TEST_TIMEOUT_S)
            try:
                await store.put_users({"alice": ALICE})
                await store.get_user("alice")  # connect first: the handshake is not counted
                counts = []
                for user_id in ("alice", "nobody", None):
                    before = reads()
                    if user_id is not None:
                        await store.get_user(user_id)
                    counts.append(reads() - before)
                return counts
            finally:
                await store.close()

        known, unknown, baseline = run(scenario)
    assert (known - baseline, unknown - baseline) == (1, 1)


def test_concurrent_reads_of_many_users_each_get_their_own(open_store: OpenStore) -> None:
    users = {f"u{i}": StoredUser({"age": float(i)}, (f"i{i}", f"i{i + 1}")) for i in range(50)}

    async def scenario() -> list[StoredUser | None]:
        async with open_store() as store:
            await store.put_users(users)
            return list(await asyncio.gather(*(store.get_user(u) for u in [*users, "nobody"])))

    assert run(scenario) == [*users.values(), None]


def test_a_batch_read_gives_each_user_in_place_and_none_for_the_unknown(
    open_store: OpenStore,
) -> None:
    users = {f"u{i}": StoredUser({"age": float(i)}, (f"i{i}",)) for i in range(30)}
    asked = ["u7", "nobody", "u0", "u7", *users]

    async def scenario() -> list[Any]:
        async with open_store() as store:
            await store.put_users(users)
            return await asyncio.to_thread(store.read_users, asked)  # a worker thread's call

    assert run(scenario) == [users["u7"], None, users["u0"], users["u7"], *users.values()]


def test_a_batch_read_is_one_round_trip(redis_url: str) -> None:
    """Forty users read for one serving batch arrive at the server in one socket read."""
    with redis.Redis.from_url(redis_url, decode_responses=True) as raw:

        async def scenario() -> tuple[int, list[Any]]:
            store = RedisFeatureStore.from_url(redis_url, timeout_s=TEST_TIMEOUT_S)
            try:
                await store.put_users({f"u{i}": ALICE for i in range(40)})
                store.read_users(["u0"])  # connect first: the handshake is not counted
                before = int(raw.info("stats")["total_reads_processed"])
                found = store.read_users([f"u{i}" for i in range(40)])
                return int(raw.info("stats")["total_reads_processed"]) - before, found
            finally:
                await store.close()

        reads, found = run(scenario)
    assert found == [ALICE] * 40
    assert reads <= 2  # the batch, and INFO's own read


def test_a_broken_record_in_a_batch_fails_only_its_own_user(redis_url: str) -> None:
    put_with_redis(redis_url, {"alice": ALICE, "dave": ALICE})
    with redis.Redis.from_url(redis_url, decode_responses=True) as raw:
        raw.hset("tt:v1:user:bob", "age", "forty")
        raw.set("tt:v1:history:carol", "not a list")

    async def scenario() -> list[Any]:
        store = RedisFeatureStore.from_url(redis_url, timeout_s=TEST_TIMEOUT_S)
        try:
            return store.read_users(["alice", "bob", "carol", "dave"])
        finally:
            await store.close()

    alice, bob, carol, dave = run(scenario)
    assert alice == dave == ALICE
    assert isinstance(bob, FeatureStoreError) and "tt:v1:user:bob field 'age'" in str(bob)
    assert isinstance(carol, FeatureStoreError) and "WRONGTYPE" in str(carol)
    assert isinstance(carol.__cause__, redis.ResponseError)
    assert not isinstance(bob, FeatureStoreUnavailable)


# --- Redis down --------------------------------------------------------------------------


def test_a_stopped_redis_raises_unavailable_within_the_timeout(private_redis_server: Any) -> None:
    timeout_s = 0.5

    async def scenario() -> list[tuple[BaseException, float]]:
        store = RedisFeatureStore.from_url(private_redis_server.url, timeout_s=timeout_s)
        try:
            await store.put_users({"alice": ALICE})
            private_redis_server.process.terminate()
            private_redis_server.process.wait(timeout=5)
            calls = [store.ping, lambda: store.get_user("alice"),
                     lambda: store.put_users({"bob": ALICE})]
            return [await timed_failure(call) for call in calls]
        finally:
            await store.close()

    for error, elapsed in run(scenario):
        assert isinstance(error, FeatureStoreUnavailable)
        assert isinstance(error.__cause__, redis.RedisError)
        assert "is unavailable while" in str(error)
        assert elapsed < timeout_s


def test_a_paused_redis_raises_unavailable_within_the_timeout(private_redis_server: Any) -> None:
    """A hung server accepts connections but never answers: only the timeout ends the wait."""
    timeout_s = 0.3
    slack_s = 0.5  # scheduling noise on a busy machine

    async def scenario() -> list[tuple[BaseException, float]]:
        connected = RedisFeatureStore.from_url(private_redis_server.url, timeout_s=timeout_s)
        fresh = RedisFeatureStore.from_url(private_redis_server.url, timeout_s=timeout_s)
        try:
            await connected.ping()
            os.kill(private_redis_server.process.pid, signal.SIGSTOP)
            try:
                return [await timed_failure(lambda: connected.get_user("alice")),
                        await timed_failure(fresh.ping)]
            finally:
                os.kill(private_redis_server.process.pid, signal.SIGCONT)
        finally:
            await connected.close()
            await fresh.close()

    for error, elapsed in run(scenario):
        assert isinstance(error, FeatureStoreUnavailable)
        # get_user is bounded as a whole (asyncio), ping by the socket timeout (redis)
        assert isinstance(error.__cause__, redis.TimeoutError | TimeoutError)
        assert timeout_s * 0.9 <= elapsed < timeout_s + slack_s


async def timed_failure(call: Callable[[], Coroutine[Any, Any, Any]]) -> tuple[BaseException,
                                                                              float]:
    start = time.monotonic()
    try:
        await call()
    except Exception as exc:  # noqa: BLE001 - the caller checks what came
        return exc, time.monotonic() - start
    raise AssertionError("expected the call to fail, but it returned")


# --- users_from_dataset ------------------------------------------------------------------

SPEC_TOML = """
[columns]
user_id = "user_id"
item_id = "item_id"
timestamp = "timestamp"

[features.user_id]
tower = "user"
kind = "categorical"

[features.age]
tower = "user"
kind = "numeric"

[features.country]
tower = "user"
kind = "categorical"

[features.genres]
tower = "user"
kind = "bag"

[features.history]
tower = "user"
kind = "history"
max_length = 3

[features.item_id]
tower = "item"
kind = "categorical"

[features.hour_of_day]
tower = "context"
kind = "categorical"
dtype = "int"
derive = "hour_of_day"
"""


def objects(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def make_dataset(interactions: list[tuple[str, str, int]],
                 users: list[tuple[str, float, str, tuple[str, ...]]]) -> Dataset:
    spec = parse_feature_spec(tomllib.loads(SPEC_TOML))
    user_ids, item_ids, timestamps = zip(*interactions, strict=True) if interactions else ((),) * 3
    return Dataset(
        spec=spec,
        interactions={"user_id": objects(list(user_ids)), "item_id": objects(list(item_ids)),
                      "timestamp": np.array(timestamps, dtype=np.int64)},
        users={"user_id": objects([u[0] for u in users]),
               "age": np.array([u[1] for u in users], dtype=np.float32),
               "country": objects([u[2] for u in users]),
               "genres": objects([u[3] for u in users])},
        items={"item_id": objects(sorted(set(item_ids)))},
    )


def small_dataset() -> Dataset:
    return make_dataset(
        interactions=[("alice", "i1", 100), ("bob", "i9", 50), ("alice", "i2", 300),
                      ("alice", "i3", 200), ("alice", "i4", 300), ("carol", "i7", 10)],
        users=[("alice", 31.5, "fr", ("jazz", "rock")), ("bob", 40.0, "de", ()),
               ("dave", 22.0, "it", ("pop",))],
    )


def test_users_from_dataset_gives_features_and_latest_items_most_recent_first() -> None:
    users = users_from_dataset(small_dataset(), history_length=3)
    assert users == {
        # i2 and i4 share the newest timestamp; i4's row comes later, so i4 is newer.
        "alice": StoredUser({"age": 31.5, "country": "fr", "genres": ("jazz", "rock")},
                            ("i4", "i2", "i3")),
        "bob": StoredUser({"age": 40.0, "country": "de", "genres": ()}, ("i9",)),
        "carol": StoredUser({}, ("i7",)),  # only in interactions: no features
        "dave": StoredUser({"age": 22.0, "country": "it", "genres": ("pop",)}, ()),
    }


def test_users_from_dataset_without_interactions_gives_features_only() -> None:
    users = users_from_dataset(make_dataset([], [("dave", 22.0, "it", ())]))
    assert users == {"dave": StoredUser({"age": 22.0, "country": "it", "genres": ()}, ())}


@pytest.mark.parametrize("history_length", [1, 4, 50])
def test_users_from_dataset_histories_equal_a_plain_python_oracle(history_length: int) -> None:
    rng = np.random.default_rng(7)
    n = 3000
    rows = list(zip([f"u{u}" for u in rng.integers(0, 60, n)],
                    [f"i{i}" for i in rng.integers(0, 500, n)],
                    rng.integers(0, 40, n).tolist(), strict=True))  # few timestamps: many ties
    users = users_from_dataset(make_dataset(rows, []), history_length=history_length)

    expected: dict[str, tuple[str, ...]] = {}
    for user_id in {r[0] for r in rows}:
        mine = [(ts, row, item) for row, (u, item, ts) in enumerate(rows) if u == user_id]
        newest_first = sorted(mine, reverse=True)[:history_length]
        expected[user_id] = tuple(item for _, _, item in newest_first)
    assert {u: s.history for u, s in users.items()} == expected


@pytest.mark.slow
def test_users_from_dataset_handles_a_million_interactions_in_seconds() -> None:
    rng = np.random.default_rng(0)
    n, n_users = 1_000_000, 100_000
    spec = parse_feature_spec(tomllib.loads(SPEC_TOML))
    user_ids = np.char.add("u", rng.integers(0, n_users, n).astype(str)).astype(object)
    item_ids = np.char.add("i", rng.integers(0, 50_000, n).astype(str)).astype(object)
    dataset = Dataset(
        spec=spec,
        interactions={"user_id": user_ids, "item_id": item_ids,
                      "timestamp": rng.integers(0, 10**9, n, dtype=np.int64)},
        users={"user_id": objects([]), "age": np.array([], np.float32),
               "country": objects([]), "genres": objects([])},
        items={"item_id": np.unique(item_ids)},
    )
    start = time.monotonic()
    users = users_from_dataset(dataset, history_length=20)
    elapsed = time.monotonic() - start
    _, counts = np.unique(user_ids.astype(str), return_counts=True)
    assert len(users) == len(counts)
    assert sum(len(u.history) for u in users.values()) == np.minimum(counts, 20).sum()
    assert elapsed < 10.0, f"users_from_dataset took {elapsed:.1f}s for {n} interactions"

"""The seen set (retrieval.seen_items) in both stores against a plain Python oracle, and a
request's large exclusions refused inside the Faiss search against exact search."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import numpy as np
import pytest
import redis

from indexer.artifact import IndexArtifact
from indexer.build import IndexSpec, build_index
from retrieval.candidate_index import SHARED_EXCLUSIONS, CandidateIndex
from retrieval.feature_store import InMemoryFeatureStore, RedisFeatureStore, StoredUser
from retrieval.query import ItemRules


def _events(seed: int, users: int = 3, n: int = 600) -> list[tuple[str, str, float]]:
    """Out of order (as the shuffled prepared splits are), items repeated, times tied."""
    rng = np.random.default_rng(seed)
    return [(f"u{rng.integers(users)}", f"i{rng.integers(150)}", float(rng.integers(40)))
            for _ in range(n)]


def _oracle(events, user: str, cap: int) -> frozenset[str]:
    """The newest ``cap`` items by (latest time, item id), as a Redis sorted set keeps them."""
    latest: dict[str, float] = {}
    for u, item, at in events:
        if u == user:
            latest[item] = max(at, latest.get(item, at))
    return frozenset(sorted(latest, key=lambda i: (latest[i], i))[-cap:])


def _read_seen(store, users: list[str]) -> dict[str, frozenset[str]]:
    return {u: found.seen for u, found in zip(users, store.read_users(users, [True] * len(users)),
                                              strict=True)}


@pytest.mark.parametrize("cap", [1, 50, 10_000])
def test_both_stores_keep_each_users_newest_items_up_to_the_cap(redis_url, cap):
    events, users = _events(seed=cap), ["u0", "u1", "u2"]
    expected = {u: _oracle(events, u, cap) for u in users}
    known = {u: StoredUser({}, ("h",)) for u in users}

    async def fill(store) -> dict[str, frozenset[str]]:
        await store.put_users(known)
        for start in range(0, len(events), 97):  # several writes, each out of order
            await store.add_seen(events[start : start + 97])
        return _read_seen(store, users)

    assert asyncio.run(fill(InMemoryFeatureStore(seen_items_cap=cap))) == expected

    async def fill_redis() -> dict[str, frozenset[str]]:
        store = RedisFeatureStore.from_url(redis_url, seen_items_cap=cap, batch_size=50)
        try:
            return await fill(store)
        finally:
            await store.close()

    assert asyncio.run(fill_redis()) == expected
    with redis.Redis.from_url(redis_url) as client:
        assert max(client.zcard(f"tt:v1:seen:{u}") for u in users) <= cap


def test_recorded_interactions_are_seen_newest_last_and_reloading_clears_them(redis_url):
    async def run(store) -> tuple[frozenset[str], StoredUser | None, StoredUser | None]:
        await store.record_interactions([("ann", f"i{n}") for n in range(30)])
        await store.record_interactions([("ann", "i0")])  # seen again: now the newest
        await store.record_interactions([("ann", "new")])
        seen = _read_seen(store, ["ann"])["ann"]
        plain = store.read_users(["ann"])[0]
        await store.put_users({"ann": StoredUser({}, ("h",))})  # a reload replaces the user
        return seen, plain, store.read_users(["ann"], [True])[0]

    def check(seen, plain, reloaded) -> None:
        assert seen == {"new", "i0", "i29", "i28"}  # cap 4: i0's second event is newer
        assert plain.seen == frozenset() and len(plain.history) == 20  # not read unless asked
        assert reloaded == StoredUser({}, ("h",))

    check(*asyncio.run(run(InMemoryFeatureStore(seen_items_cap=4))))

    async def on_redis():
        store = RedisFeatureStore.from_url(redis_url, seen_items_cap=4)
        try:
            return await run(store)
        finally:
            await store.close()

    check(*asyncio.run(on_redis()))


def test_an_evicted_or_expired_user_takes_its_seen_set_along():
    now = [0.0]
    store = InMemoryFeatureStore(max_users=2, clock=lambda: now[0])
    asyncio.run(store.record_interactions([("a", "x"), ("b", "y")], ttl_s=10))
    asyncio.run(store.record_interactions([("c", "z")]))  # evicts a, the least recent
    assert store.read_users(["a"], [True]) == [None]
    now[0] = 11.0  # b expired
    asyncio.run(store.record_interactions([("b", "w")]))
    assert store.read_users(["b"], [True])[0].seen == {"w"}
    assert len(store._seen) == 2  # c and b: nothing of a user the store let go


# --- exclusions inside the search -----------------------------------------------------------

N, D = 3000, 16


def _index(factory: str, search: dict, metadata: bool = False) -> tuple[CandidateIndex, np.ndarray]:
    rng = np.random.default_rng(7)
    xb = rng.normal(size=(N, D)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    spec = IndexSpec(factory, search=search)
    path = Path(tempfile.mkdtemp())
    if metadata:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from indexer.artifact import METADATA

        pq.write_table(pa.table({"item_id": [f"i{n}" for n in range(N)],
                                 "category": [f"c{n % 3}" for n in range(N)]}), path / METADATA)
    artifact = IndexArtifact(path, "i-test", "m-test", D, "dot", spec,
                             build_index(xb, spec, "dot"), np.array([f"i{n}" for n in range(N)]),
                             {})
    return CandidateIndex(artifact), xb


@pytest.mark.parametrize("factory,search", [("Flat", {}), ("HNSW32", {"ef_search": 16}),
                                            ("IVF16,Flat", {"nprobe": 16})])
@pytest.mark.parametrize("rules", [False, True])
def test_k_come_back_whatever_the_exclusions_and_match_exact_search(factory, search, rules):
    """Rows of one batch excluding nothing, a few (the shared over-fetch), the 1,500
    nearest items and all but 10 of the eligible (each alone, with an ID selector)."""
    index, xb = _index(factory, search, metadata=rules)
    rule = ItemRules({"category": frozenset({"c0", "c1"})}, {}) if rules else ItemRules({}, {})
    eligible = np.array([not rules or n % 3 != 2 for n in range(N)])
    xq = np.random.default_rng(8).normal(size=(4, D)).astype(np.float32)
    exact = np.argsort(-(xq @ xb.T), axis=1, kind="stable")
    ids = index.item_ids
    ranked = [exact[r][eligible[exact[r]]] for r in range(4)]
    exclude = [frozenset(), frozenset(ids[ranked[1][:SHARED_EXCLUSIONS]]),
               frozenset(ids[ranked[2][:1500]]) | {"not-in-the-index"},
               frozenset(ids[ranked[3][:-10]])]
    k = 50
    found = index.search(xq, k, exclude, [rule] * 4)
    for r, candidates in enumerate(found):
        want = [i for i in ids[ranked[r]] if i not in exclude[r]][:k]
        got = candidates.item_ids
        assert len(got) == len(want) == (10 if r == 3 else k)
        assert not set(got) & exclude[r] and len(set(got)) == len(got)
        overlap = len(set(got) & set(want)) / len(want)
        assert overlap == 1.0 if factory != "HNSW32" else overlap >= 0.9, (r, overlap)


def test_searches_of_different_depths_on_one_index_each_get_their_own_depth():
    """The index keeps its search parameters per depth (fetch_k): HNSW's efSearch (16 here)
    must rise to a deeper search's k after a shallower one, and a shallow one after it
    must not pay for the deep one's depth."""
    index, xb = _index("HNSW32", {"ef_search": 16})
    xq = np.random.default_rng(3).normal(size=(1, D)).astype(np.float32)
    exact = index.item_ids[np.argsort(-(xq @ xb.T)[0], kind="stable")]
    for k in (10, 200, 10, 200):
        got = index.search(xq, k, [frozenset()])[0].item_ids
        assert len(got) == k and len(set(got)) == k
        assert len(set(got) & set(exact[:k])) / k >= 0.9

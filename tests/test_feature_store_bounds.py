"""The in-process feature store is bounded: a cap on users with LRU eviction of recorded
users, a TTL on recorded histories, preloaded users kept, all counted in metrics."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

from retrieval.client import build_request
from retrieval.feature_store import InMemoryFeatureStore, StoredUser
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as pb_grpc
from tests.conftest import start_server, stop_server

NIGHT = {"hour_of_day": 22, "device": "tv"}
WEDNESDAY = 1_700_611_200


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bounded_store(max_users: int, clock: Clock | None = None):
    evictions: dict[str, int] = {}

    def count(reason: str, n: int) -> None:
        evictions[reason] = evictions.get(reason, 0) + n

    store = InMemoryFeatureStore(history_length=3, max_users=max_users, on_evict=count,
                                 clock=clock or Clock())
    return store, evictions


def test_past_the_cap_the_least_recently_used_recorded_user_goes():
    store, evictions = bounded_store(max_users=3)

    async def scenario():
        await store.record_interactions([("a", "i1"), ("b", "i1"), ("c", "i1")])
        store.read_users(["a"])  # a read makes "a" recent: "b" is now the oldest
        await store.record_interactions([("d", "i2")])
        return store.read_users(["a", "b", "c", "d"])

    a, b, c, d = asyncio.run(scenario())
    assert b is None and a == c == StoredUser({}, ("i1",)) and d == StoredUser({}, ("i2",))
    assert len(store) == 3 and evictions == {"lru": 1}


def test_preloaded_users_are_never_evicted_and_may_not_exceed_the_cap():
    store, evictions = bounded_store(max_users=3)
    alice = StoredUser({"age": 31.0}, ("i9",))

    async def scenario():
        await store.put_users({"alice": alice})
        await store.record_interactions([(f"new{i}", "i1") for i in range(10)])
        await store.record_interactions([("alice", "i8")])
        return store.read_users(["alice", "new9", "new8", "new7"])

    got = asyncio.run(scenario())
    assert got == [StoredUser({"age": 31.0}, ("i8", "i9")), StoredUser({}, ("i1",)),
                   StoredUser({}, ("i1",)), None]
    assert len(store) == 3 and evictions == {"lru": 8}
    with pytest.raises(ValueError, match=r"5 preloaded users exceed .* cap of 3 users.*"
                                         r"--store-max-users"):
        asyncio.run(store.put_users({f"p{i}": alice for i in range(4)}))
    assert len(store) == 3 and store.preloaded == 1  # nothing of the refused load is kept


def test_a_recorded_history_expires_ttl_after_its_last_event():
    clock = Clock()
    store, evictions = bounded_store(max_users=100, clock=clock)

    async def scenario():
        await store.record_interactions([("old", "i1"), ("kept", "i1")], ttl_s=60)
        clock.now += 50
        await store.record_interactions([("kept", "i2")], ttl_s=60)  # its deadline moves
        clock.now += 20
        return store.read_users(["old", "kept"])

    assert asyncio.run(scenario()) == [None, StoredUser({}, ("i2", "i1"))]
    assert len(store) == 1 and evictions == {"ttl": 1}


def test_expired_users_are_dropped_on_writes_without_being_read():
    clock = Clock()
    store, evictions = bounded_store(max_users=100, clock=clock)

    async def scenario():
        await store.record_interactions([(f"u{i}", "i1") for i in range(10)], ttl_s=5)
        clock.now += 10
        await store.record_interactions([("fresh", "i1")], ttl_s=5)

    asyncio.run(scenario())
    assert len(store) == 1 and evictions == {"ttl": 10}


# --- against a real server -----------------------------------------------------------------

CAP = 1000


def metric(server, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=5).read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))


def record_new_users(stub, first: int, count: int, items: list[str]) -> None:
    for start in range(first, first + count, 1000):
        events = [pb.Interaction(user_id=f"new-{u}", item_id=items[u % len(items)])
                  for u in range(start, min(start + 1000, first + count))]
        assert stub.RecordInteractions(pb.RecordInteractionsRequest(interactions=events),
                                       timeout=30).recorded == len(events)


def test_new_users_past_the_cap_are_evicted_and_memory_stays_bounded(pipeline, tmp_path):
    """300 users preloaded from --features, a cap of 1000: 30,000 new users later the store
    holds 1000, 29,300 evictions are counted, RSS grew by less than a quarter of what the
    users would take unbounded, the latest users' histories still steer Retrieve, an
    evicted one is a cold start again, and the preloaded users are all kept."""
    server = start_server(["--model", str(pipeline.model_dir), "--index",
                           str(pipeline.index_dir), "--features", str(pipeline.data_dir),
                           "--metrics-port", "0", "--store-max-users", str(CAP)], tmp_path)
    try:
        assert re.search(r"in-process feature store: 300 preloaded users .* room for 700 more",
                         server.log())
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)

            def ids(user: str, recent=()) -> list[str]:
                reply = stub.Retrieve(build_request(user, 10, NIGHT, WEDNESDAY, recent=recent),
                                      timeout=10)
                return [c.item_id for c in reply.candidates]

            items = ids("nobody", ())  # real item ids of the catalogue
            cold = ids("nobody")
            preloaded = ids("u1")
            record_new_users(stub, 0, 5_000, items)
            rss_at_cap = rss_kib(server.process.pid)
            record_new_users(stub, 5_000, 25_000, items)
            grown_kib = rss_kib(server.process.pid) - rss_at_cap

            assert metric(server, "two_tower_feature_store_users") == CAP
            assert metric(server, 'two_tower_feature_store_evictions_total{reason="lru"}') \
                == 30_000 - (CAP - 300)
            # 25,000 users at ~0.6 KiB each would take ~15 MB unbounded.
            assert grown_kib < 25_000 * 0.6 / 4, f"RSS grew {grown_kib} KiB past the cap"
            latest = 29_999
            item = items[latest % len(items)]
            assert ids(f"new-{latest}") == ids("nobody", recent=[item]) != cold
            assert ids("new-0") == cold  # evicted: unknown again
            assert ids("u1") == preloaded
    finally:
        stop_server(server)
    assert "Traceback" not in server.log()


def test_a_cap_below_the_preloaded_users_is_refused_at_start(pipeline, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--model", str(pipeline.model_dir),
         "--index", str(pipeline.index_dir), "--features", str(pipeline.data_dir),
         "--port", "0", "--store-max-users", "100"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "300 preloaded users exceed the in-process store's cap of 100 users" in done.stderr
    assert "--store-max-users" in done.stderr and "Traceback" not in done.stderr

"""A sequence feature end to end: the feature store keeps each history item's time (both
stores; old data without times still reads), and a model with a sequence feature, trained
by `two-tower train` on small ordered synthetic data, is served over real gRPC — from the
in-process store and from Redis — with the offline towers' ranking."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tomllib

import grpc
import numpy as np
import pytest
import redis

from contracts.dataset import Dataset, load_dataset, write_dataset
from contracts.feature_spec import parse_feature_spec
from contracts.inputs import UserRequest, user_inputs
from retrieval.feature_store import (
    InMemoryFeatureStore,
    RedisFeatureStore,
    StoredUser,
    users_from_dataset,
)
from tests.conftest import start_redis_server, start_server, stop_redis_server, stop_server

BOB = StoredUser({"age": 40.0}, ("i3", "i2", "i1"), history_times=(300, None, 100))
WHEN = 1_706_000_000  # after every synthetic event


def run(coro):
    return asyncio.run(coro)


def open_store(kind: str, url: str | None, history_length: int = 20):
    if kind == "in_memory":
        return InMemoryFeatureStore(history_length=history_length)
    return RedisFeatureStore.from_url(url, history_length=history_length, timeout_s=2.0)


@pytest.fixture(params=["in_memory", "redis"])
def store_kind(request) -> tuple[str, str | None]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return request.param, url


def test_history_times_read_back_and_are_cut_with_the_history(store_kind):
    async def scenario():
        store = open_store(*store_kind, history_length=2)
        try:
            await store.put_users({"bob": BOB})
            return await store.get_user("bob")
        finally:
            await store.close()

    user = run(scenario())
    assert (user.features, user.history, user.times) == (
        {"age": 40.0}, ("i3", "i2"), (300, None))


def test_recorded_interactions_carry_the_servers_time(store_kind):
    import time

    async def scenario():
        store = open_store(*store_kind, history_length=3)
        try:
            await store.put_users({"bob": BOB})
            before = time.time()
            await store.record_interactions([("bob", "i7"), ("bob", "i8")])
            return before, await store.get_user("bob"), time.time()
        finally:
            await store.close()

    before, user, after = run(scenario())
    assert user.history == ("i8", "i7", "i3")
    assert all(int(before) <= t <= after for t in user.times[:2])
    assert user.times[2] == 300


def test_a_dataset_stores_each_history_items_timestamp():
    spec = parse_feature_spec({"features": {
        "user_id": {"tower": "user", "kind": "categorical"},
        "item_id": {"tower": "item", "kind": "categorical"}}})
    inter = {"user_id": np.array(["u", "u", "v"], object),
             "item_id": np.array(["a", "b", "c"], object),
             "timestamp": np.array([10, 20, 5])}
    users = users_from_dataset(Dataset(spec, inter, {"user_id": np.array([], object)},
                                       {"item_id": np.array(["a", "b", "c"], object)}))
    assert (users["u"].history, users["u"].times) == (("b", "a"), (20, 10))
    assert (users["v"].history, users["v"].times) == (("c",), (5,))


def test_histories_written_without_times_or_by_an_older_writer_read_as_unknown(redis_url):
    with redis.Redis.from_url(redis_url, decode_responses=True) as raw:
        raw.rpush("tt:v1:history:old", "i2", "i1")  # written before times were kept
        raw.rpush("tt:v1:history:mixed", "i2", "i1")
        raw.rpush("tt:v1:history_time:mixed", "50 i2", "40 i1")
        raw.lpush("tt:v1:history:mixed", "i3")  # an older writer: the history alone
        raw.rpush("tt:v1:history:bad", "i1")
        raw.rpush("tt:v1:history_time:bad", "soon i1")

    async def scenario():
        store = open_store("redis", redis_url)
        try:
            return [await store.get_user(u) for u in ("old", "mixed", "bad")]
        finally:
            await store.close()

    old, mixed, bad = run(scenario())
    assert (old.history, old.times) == (("i2", "i1"), ())
    # every position now names another item than its time entry: all unknown, none wrong
    assert (mixed.history, mixed.times) == (("i3", "i2", "i1"), ())
    assert (bad.history, bad.times) == (("i1",), ())


def test_a_history_time_list_follows_the_documented_layout(redis_url):
    async def scenario():
        store = open_store("redis", redis_url)
        try:
            await store.put_users({"bob": BOB})
        finally:
            await store.close()

    run(scenario())
    with redis.Redis.from_url(redis_url, decode_responses=True) as raw:
        assert raw.lrange("tt:v1:history_time:bob", 0, -1) == ["300 i3", "- i2", "100 i1"]


# --- end to end over gRPC ------------------------------------------------------------------

TINY = dict(num_users=150, num_items=80, num_clusters=4, interactions_per_user=10, seed=5,
            order_strength=0.7)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`two-tower generate`-like data with a sequence spec, `train`, `build-index`."""
    from indexer.build import IndexSpec
    from indexer.gated_build import GateConfig
    from indexer.job import JobOptions, run_build_index
    from training.synthetic import SyntheticConfig, generate_synthetic

    root = tmp_path_factory.mktemp("sequence")
    dataset, spec_toml = generate_synthetic(SyntheticConfig(**TINY))
    spec_toml = spec_toml.replace('kind = "history"\nembedding_dim = 32\nmax_length = 10',
                                  'kind = "sequence"\nmax_length = 6\nheads = 4')
    assert tomllib.loads(spec_toml)["features"]["recent_items"]["kind"] == "sequence"
    write_dataset(dataset, root / "data", spec_toml)
    subprocess.run([sys.executable, "-m", "app.cli", "train", "--data", str(root / "data"),
                    "--out", str(root / "models"), "--epochs", "2", "--no-eval"],
                   check=True, capture_output=True)
    (model_dir,) = [p for p in (root / "models").iterdir() if not p.name.startswith(".")]
    index_dir = run_build_index(model_dir, root / "indexes", IndexSpec("Flat"),
                                JobOptions(items=root / "data",
                                           gate=GateConfig(target_recall=1.0)))
    return root / "data", model_dir, index_dir


def offline_top(model_dir, data, user: str, k: int = 10) -> tuple[list[str], np.ndarray]:
    """The ranking the exported SavedModel user tower gives the stored user at WHEN."""
    from contracts.model_manifest import load_item_embeddings, load_model_manifest
    from training.saved_model_tower import SavedModelUserTower

    manifest = load_model_manifest(model_dir)
    stored = users_from_dataset(load_dataset(data))[user]
    request = UserRequest(user, stored.features, stored.history, {}, WHEN,
                          stored.history_times)
    user_emb = SavedModelUserTower(manifest)(user_inputs(manifest.feature_spec, [request]))
    item_emb, item_ids = load_item_embeddings(manifest)
    scores = item_emb @ user_emb[0]
    top = np.argsort(-scores, kind="stable")[:k]
    return [str(item_ids[i]) for i in top], scores[top]


def served_top(address: str, user: str, k: int = 10, when: int = WHEN):
    from retrieval.v1 import retrieval_pb2 as pb
    from retrieval.v1 import retrieval_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.RetrievalServiceStub(channel).Retrieve(
            pb.RetrieveRequest(user_id=user, k=k, event_time_unix_seconds=when), timeout=10)
    assert not reply.degraded
    return [c.item_id for c in reply.candidates], np.array([c.score for c in reply.candidates])


@pytest.mark.slow
@pytest.mark.parametrize("store", ["in_memory", "redis"])
def test_a_sequence_model_is_served_as_the_offline_towers_rank(trained, store, tmp_path):
    data, model_dir, index_dir = trained
    args = ["--model", str(model_dir), "--index", str(index_dir)]
    redis_process = None
    if store == "redis":
        redis_process = start_redis_server(tmp_path / "redis")
        url = f"redis://127.0.0.1:{redis_process.port}/0"
        subprocess.run([sys.executable, "-m", "app.cli", "load-features", "--data", str(data),
                        "--redis-url", url], check=True, capture_output=True)
        args += ["--redis-url", url, "--redis-timeout-ms", "2000"]
    else:
        args += ["--features", str(data)]
    running = start_server(args, tmp_path / "server")
    try:
        users = ["u0", "u7", "u42"]
        for user in users:
            want_ids, want_scores = offline_top(model_dir, data, user)
            got_ids, got_scores = served_top(running.address, user)
            assert got_ids == want_ids
            np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
        # the stored times are used: the same history a year later scores otherwise
        _, later = served_top(running.address, "u0", when=WHEN + 365 * 86400)
        _, now = served_top(running.address, "u0")
        assert np.abs(later - now).max() > 1e-4
    finally:
        stop_server(running)
        if redis_process is not None:
            stop_redis_server(redis_process)


def test_a_batch_read_fetches_the_times_only_when_asked(redis_url):
    """Models without a sequence feature pay nothing for the times: no LRANGE of them."""
    async def scenario():
        store = open_store("redis", redis_url)
        try:
            await store.put_users({"bob": BOB})
            return store.read_users(["bob"])[0], store.read_users(["bob"], times=True)[0]
        finally:
            await store.close()

    plain, timed = run(scenario())
    assert plain.history == timed.history == BOB.history
    assert (plain.times, timed.times) == ((), (300, None, 100))

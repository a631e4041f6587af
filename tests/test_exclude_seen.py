"""exclude_seen as a caller meets it: a real `two-tower serve` (in-process store and Redis),
real gRPC, users loaded by `serve --features` and `two-tower load-features`.

The catalogue has 6,000 items so that a user can have seen 5,000 of them and still be owed
k = 100: the model is trained on a small synthetic set, and the index is HNSW, whose graph
the seen items cut up most (the hardest case for an ID selector)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from retrieval.client import build_request
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as pb_grpc
from tests.conftest import start_redis_server, start_server, stop_redis_server, stop_server

HEAVY, SEEN = "heavy", 5000
NIGHT = {"hour_of_day": 22, "device": "tv"}
WEDNESDAY = 1_700_611_200


@dataclasses.dataclass(frozen=True)
class Catalogue:
    model_dir: Path
    index_dir: Path
    data_dir: Path            # the training data and a user who has seen 5,000 items
    item_ids: list[str]
    heavy_seen: list[str]     # oldest first


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Catalogue:
    from contracts.dataset import write_dataset
    from indexer.build import IndexSpec
    from indexer.gated_build import GateConfig
    from indexer.job import JobOptions, run_build_index
    from training.pipeline import run_training
    from training.synthetic import SyntheticConfig, generate_synthetic
    from training.train import TrainConfig

    root = tmp_path_factory.mktemp("catalogue")
    dataset, spec_toml = generate_synthetic(SyntheticConfig(
        num_users=200, num_items=6000, num_clusters=6, interactions_per_user=10, seed=5))
    write_dataset(dataset, root / "train-data", spec_toml)
    model_dir, _ = run_training(dataset, root / "models", TrainConfig(epochs=2))
    index_dir = run_build_index(model_dir, root / "indexes", IndexSpec("HNSW32"),
                                JobOptions(items=root / "train-data",
                                           gate=GateConfig(target_recall=0.9)))
    # A user who arrived after training and has interacted with 5,000 of the 6,000 items.
    item_ids = [str(i) for i in dataset.items["item_id"]]
    seen = [str(i) for i in np.random.default_rng(6).permutation(item_ids)[:SEEN]]
    rows = dataset.interactions
    extra = {name: np.resize(column, SEEN) for name, column in rows.items()}
    extra.update(user_id=np.full(SEEN, HEAVY, dtype=object), item_id=np.array(seen, dtype=object),
                 timestamp=WEDNESDAY - 86_400 + np.arange(SEEN, dtype=np.int64))
    users = {name: np.concatenate([column, column[:1]]).astype(column.dtype if name != "user_id"
                                                                else object)
             for name, column in dataset.users.items()}
    users["user_id"][-1] = HEAVY
    with_heavy = dataclasses.replace(
        dataset, users=users,
        interactions={n: np.concatenate([rows[n], extra[n]]) for n in rows})
    write_dataset(with_heavy, root / "data", spec_toml)
    return Catalogue(model_dir, index_dir, root / "data", item_ids, seen)


def _serve(catalogue: Catalogue, workdir: Path, *args: str):
    return start_server(["--model", str(catalogue.model_dir), "--index",
                         str(catalogue.index_dir), "--redis-timeout-ms", "2000", *args], workdir)


def _load_features(data: Path, url: str, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "app.cli", "load-features", "--data", str(data),
                    "--redis-url", url, *args], check=True, capture_output=True)


@pytest.fixture(scope="module", params=["in-process", "redis"])
def served(request, catalogue, tmp_path_factory):
    """(stub, redis url or None): a server whose store was filled from the dataset."""
    workdir = tmp_path_factory.mktemp(f"serve-{request.param}")
    redis_server = url = None
    if request.param == "redis":
        redis_server = start_redis_server(workdir / "redis")
        url = redis_server.url
        _load_features(catalogue.data_dir, url)
        running = _serve(catalogue, workdir, "--redis-url", url)
    else:
        running = _serve(catalogue, workdir, "--features", str(catalogue.data_dir))
    channel = grpc.insecure_channel(running.address)
    try:
        yield pb_grpc.RetrievalServiceStub(channel), url
    finally:
        channel.close()
        stop_server(running)
        if redis_server is not None:
            stop_redis_server(redis_server)


def _retrieve(stub, user: str, k: int, exclude_seen: bool, **kw) -> list[str]:
    request = build_request(user, k, NIGHT, WEDNESDAY, **kw)
    request.exclude_seen = exclude_seen
    reply = stub.Retrieve(request, timeout=30)
    assert not reply.degraded
    return [c.item_id for c in reply.candidates]


def test_a_user_who_has_seen_5000_items_gets_none_of_them_and_k(served, catalogue):
    stub, url = served
    got = _retrieve(stub, HEAVY, 100, exclude_seen=True)
    assert len(got) == 100 == len(set(got))
    assert not set(got) & set(catalogue.heavy_seen)
    # the same search as passing every seen item in exclude_item_ids
    assert got == _retrieve(stub, HEAVY, 100, exclude_seen=False, exclude=catalogue.heavy_seen)
    if url is not None:  # load-features wrote every interaction, not the history's 20
        with redis.Redis.from_url(url) as client:
            assert client.zcard(f"tt:v1:seen:{HEAVY}") == SEEN
            assert client.llen(f"tt:v1:history:{HEAVY}") == 20


def test_without_exclude_seen_seen_items_still_come_back(served, catalogue):
    stub, _ = served
    got = _retrieve(stub, HEAVY, 100, exclude_seen=False)
    assert len(got) == 100 and set(got) & set(catalogue.heavy_seen)


def test_every_loaded_interaction_is_excluded_not_only_the_history(served, catalogue):
    """Ordinary users with 10 interactions each, of which the model's history keeps 5 here
    (--history-length 5 on a fresh load): none of the 10 comes back."""
    stub, url = served
    from contracts.dataset import load_dataset

    rows = load_dataset(catalogue.data_dir).interactions
    users = [f"u{n}" for n in range(0, 200, 20)]
    if url is not None:
        _load_features(catalogue.data_dir, url, "--history-length", "5")
    for user in users:
        seen = set(rows["item_id"][rows["user_id"] == user].tolist())
        got = _retrieve(stub, user, 1000, exclude_seen=True)
        assert len(got) == 1000 and not set(got) & seen, user


def test_the_seen_set_survives_a_record_storm_within_its_cap(catalogue, tmp_path):
    """--seen-items-cap 300 on Redis, 24 RecordInteractions of 1,000 events from 8 threads:
    the key never holds more than 300 items, and after a last call of 300 items exactly
    those are excluded: the older ones come back."""
    redis_server = start_redis_server(tmp_path / "redis")
    running = _serve(catalogue, tmp_path, "--redis-url", redis_server.url,
                     "--seen-items-cap", "300")
    key, sizes = "tt:v1:seen:stormy", []
    rng = np.random.default_rng(9)
    try:
        with grpc.insecure_channel(running.address) as channel, \
                redis.Redis.from_url(redis_server.url) as client:
            stub = pb_grpc.RetrievalServiceStub(channel)

            def record(items) -> int:
                sizes.append(client.zcard(key))
                interactions = [pb.Interaction(user_id="stormy", item_id=i) for i in items]
                done = stub.RecordInteractions(
                    pb.RecordInteractionsRequest(interactions=interactions), timeout=30)
                return done.recorded

            calls = [rng.choice(catalogue.item_ids, 1000).tolist() for _ in range(24)]
            with ThreadPoolExecutor(8) as pool:
                assert sum(pool.map(record, calls)) == 24_000
            last = list(dict.fromkeys(rng.permutation(catalogue.item_ids)[:300].tolist()))
            record(last)
            assert max(sizes) <= 300 and client.zcard(key) == 300
            assert set(client.zrange(key, 0, -1)) == {i.encode() for i in last}
            history = [i.decode() for i in client.lrange("tt:v1:history:stormy", 0, -1)]
            got = _retrieve(stub, "stormy", 1000, exclude_seen=True)
            assert len(got) == 1000 and not set(got) & set(last)
            assert got == _retrieve(stub, "stormy", 1000, exclude_seen=False,
                                    exclude=last + history)
    finally:
        stop_server(running)
        stop_redis_server(redis_server)


def test_recorded_interactions_are_excluded_by_the_in_process_store(catalogue, tmp_path):
    running = _serve(catalogue, tmp_path, "--seen-items-cap", "300")
    rng = np.random.default_rng(10)
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            older = rng.permutation(catalogue.item_ids)[:600].tolist()
            for start in (0, 300):  # 600 distinct items: the first 300 drop out
                stub.RecordInteractions(pb.RecordInteractionsRequest(interactions=[
                    pb.Interaction(user_id="newcomer", item_id=i)
                    for i in older[start : start + 300]]), timeout=30)
            got = _retrieve(stub, "newcomer", 1000, exclude_seen=True)
            assert len(got) == 1000 and not set(got) & set(older[300:])
            assert got == _retrieve(stub, "newcomer", 1000, exclude_seen=False,
                                    exclude=older[300:])
    finally:
        stop_server(running)


def test_load_features_fills_the_seen_sets_from_a_prepared_output(redis_url, tmp_path):
    """The splits' rows are shuffled: the newest items by timestamp are kept whatever the
    order they are written in (--seen-items-cap 3)."""
    import json

    from app.cli import main
    from benchmarks.load_features_scale import users_manifest

    prepared = tmp_path / "prepared"
    (prepared / "users").mkdir(parents=True)
    (prepared / "train").mkdir()
    pq.write_table(pa.table({"user_id": ["ann", "bob"], "history": [["i5"], ["i9"]]}),
                   prepared / "users" / "users-00000-of-00001.parquet")
    events = [("ann", "i1", 10), ("bob", "i9", 5), ("ann", "i5", 50), ("ann", "i2", 20),
              ("ann", "i4", 40), ("ann", "i3", 30), ("ann", "i1", 60)]  # i1 again, newest
    shard = prepared / "train" / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"user_id": [e[0] for e in events], "item_id": [e[1] for e in events],
                             "timestamp": pa.array([e[2] for e in events], pa.int64())}),
                   shard, row_group_size=2)
    manifest = users_manifest(2, history_length=20)
    manifest["splits"]["train"] = {"rows": len(events), "shards": [
        {"path": "train/train-00000-of-00001.parquet", "rows": len(events),
         "bytes": shard.stat().st_size}]}
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    assert main(["load-features", "--prepared", str(prepared), "--redis-url", redis_url,
                 "--seen-items-cap", "3", "--batch-size", "1"]) in (0, None)
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        assert client.zrange("tt:v1:seen:ann", 0, -1) == ["i4", "i5", "i1"]
        assert client.zrange("tt:v1:seen:bob", 0, -1) == ["i9"]

"""Training streamed from prepared shards (issue 17, items 2, 3 and 5): the stream is the
in-memory examples, the model as good, the evaluation the same on every user and bounded on
a sample, the shards split between workers, a changed spec refused."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from app.cli import main
from app.processes import free_port
from contracts.dataset import load_dataset, write_dataset
from contracts.errors import ArtifactError
from contracts.feature_spec import load_feature_spec
from contracts.inputs import training_examples
from contracts.prepared import load_prepared
from training.distributed import WorkerRole
from training.synthetic import SyntheticConfig, generate_synthetic

pytest.importorskip("pyspark", reason="the preparation job needs the [prepare] extra")
prepare = pytest.importorskip("preparation").prepare
PrepareConfig = pytest.importorskip("preparation").PrepareConfig

EPOCHS, SEED = 3, 0
ROWS_PER_SHARD = 8000  # the demo's 56,000 train rows in 8 shards


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's data (2,000 users, 1,000 items, 60,000 interactions), prepared."""
    root = tmp_path_factory.mktemp("shards")
    dataset, spec_toml = generate_synthetic(SyntheticConfig(num_users=2000, num_items=1000))
    write_dataset(dataset, root / "data", spec_toml)
    prepared = prepare(root / "data", root / "prepared",
                       PrepareConfig(rows_per_shard=ROWS_PER_SHARD, seed=SEED))
    return root, load_dataset(root / "data"), load_prepared(prepared)


@pytest.fixture(scope="module")
def streamed(demo):
    """A model trained from the shards, with its summary."""
    from training.pipeline import run_training_from_prepared
    from training.train import TrainConfig

    root, _, manifest = demo
    return run_training_from_prepared(manifest.path, root / "streamed",
                                      TrainConfig(epochs=EPOCHS, seed=SEED))


def _rows(inputs: dict[str, np.ndarray], names: list[str]) -> collections.Counter:
    """The examples as a multiset of rows (floats rounded: float32 either way)."""
    columns = [inputs[n] for n in names]

    def cell(column, i):
        if column.ndim == 2:
            return tuple(str(v) for v in column[i])
        if column.dtype == np.float32:
            return round(float(column[i]), 3)
        return str(column[i])

    return collections.Counter(tuple(cell(c, i) for c in columns)
                               for i in range(len(columns[0])))


def _as_numpy(batch) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(str).astype(object) if v.dtype.name == "string" else v.numpy()
            for k, v in batch.items()}


def _stream_rows(manifest, role=WorkerRole(1, 0)) -> collections.Counter:
    from training.shards import StreamConfig, stream_examples

    names = sorted(f.name for f in manifest.spec.features)
    rows: collections.Counter = collections.Counter()
    config = StreamConfig(batch_size=1000, repeat=False)
    for batch in stream_examples(manifest, ("train",), config, role):
        rows.update(_rows(_as_numpy(batch), names))
    return rows


@pytest.mark.slow
def test_the_stream_yields_exactly_the_in_memory_training_examples(demo):
    from training.protocols import temporal_leave_one_out

    _, dataset, manifest = demo
    examples = training_examples(dataset)
    train = temporal_leave_one_out(dataset).train
    names = sorted(f.name for f in dataset.spec.features)
    expected = _rows({k: v[train] for k, v in examples.items()}, names)
    got = _stream_rows(manifest)
    assert sum(got.values()) == len(train) == manifest.splits["train"].rows
    assert got == expected


@pytest.mark.slow
def test_streamed_training_reaches_the_in_memory_quality(demo, streamed, tmp_path):
    from training.pipeline import run_training
    from training.train import TrainConfig

    _, dataset, _ = demo
    _, in_memory = run_training(dataset, tmp_path, TrainConfig(epochs=EPOCHS, seed=SEED))
    _, summary = streamed
    both = [s["evaluation"]["model"] for s in (in_memory, summary)]
    assert abs(both[0]["recall@10"] - both[1]["recall@10"]) <= 0.03, both
    assert abs(both[0]["recall@100"] - both[1]["recall@100"]) <= 0.03, both
    assert summary["evaluation"]["sampled_users"] == summary["evaluation"]["test_users"] == 2000
    assert both[1]["recall@10"] > 2 * summary["evaluation"]["popularity"]["recall@10"]
    assert len(summary["history"]["val_ndcg@10"]) == EPOCHS


@pytest.mark.slow
def test_evaluation_of_every_user_gives_the_in_memory_figures(demo):
    from training.holdout import popularity_metrics, sample_holdout
    from training.pipeline import sampled_stage_metrics, stage_metrics
    from training.protocols import popularity_ranking, temporal_leave_one_out
    from training.train import TrainConfig
    from training.train_shards import load_catalogue, prepared_item_counts, train_from_shards

    _, dataset, manifest = demo
    catalogue = load_catalogue(manifest)
    trained = train_from_shards(manifest, catalogue, TrainConfig(epochs=1, seed=SEED))
    examples, split = training_examples(dataset), temporal_leave_one_out(dataset)
    item_ids = catalogue.items["item_id"]
    for stage in ("valid", "test"):
        sample = sample_holdout(manifest, stage, item_ids, users=10_000)
        assert sample.n_users == sample.held_out == 2000
        in_memory = stage_metrics(trained, examples, split, stage).as_dict()
        sampled = sampled_stage_metrics(trained, sample).as_dict()
        assert sampled.keys() == in_memory.keys()
        for name, value in in_memory.items():
            assert sampled[name] == pytest.approx(value, abs=1e-9), name
    popularity = popularity_metrics(prepared_item_counts(manifest, item_ids), sample)
    assert popularity.as_dict() == pytest.approx(popularity_ranking(split, "test").as_dict(),
                                                 abs=1e-12)


@pytest.mark.slow
def test_a_sample_of_n_users_uses_n_users_seeded(demo):
    from training.holdout import holdout_metrics, sample_holdout

    _, dataset, manifest = demo
    item_ids = dataset.items["item_id"]
    a, b = (sample_holdout(manifest, "test", item_ids, users=300, seed=7) for _ in range(2))
    other = sample_holdout(manifest, "test", item_ids, users=300, seed=8)
    assert (a.n_users, a.held_out) == (300, 2000)
    assert list(a.inputs["user_id"]) == list(b.inputs["user_id"])  # the seed fixes the sample
    assert set(a.inputs["user_id"]) != set(other.inputs["user_id"])
    rng = np.random.default_rng(0)
    user_emb = rng.normal(size=(300, 8)).astype(np.float32)
    item_emb = rng.normal(size=(len(item_ids), 8)).astype(np.float32)
    assert holdout_metrics(user_emb, item_emb, a).n_users == 300


def _evaluation_peak(n_users: int, n_items: int) -> int:
    """Peak bytes allocated (NumPy, traced) evaluating n_users against n_items."""
    from training.holdout import HoldoutSample, holdout_metrics
    from training.metrics import UserItems

    rng = np.random.default_rng(0)
    user_emb = rng.normal(size=(n_users, 16)).astype(np.float32)
    item_emb = rng.normal(size=(n_items, 16)).astype(np.float32)
    seen = UserItems.from_lists([rng.integers(0, n_items, 20) for _ in range(n_users)])
    sample = HoldoutSample("test", {}, rng.integers(0, n_items, n_users), seen, n_users, 0)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        assert holdout_metrics(user_emb, item_emb, sample).n_users == n_users
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_evaluation_memory_does_not_grow_with_the_sampled_users():
    """Scores are computed a chunk of users at a time: 4x the users, not 4x the memory."""
    small, large = _evaluation_peak(300, 100_000), _evaluation_peak(1200, 100_000)
    assert large < 1.25 * small, f"{small / 2**20:.0f} MiB, then {large / 2**20:.0f} MiB"


@pytest.mark.slow
def test_a_spec_other_than_the_prepared_one_is_refused(demo, tmp_path, capsys):
    from training.pipeline import run_training_from_prepared

    root, _, manifest = demo
    spec_file = root / "data" / "features.toml"
    original = spec_file.read_text()
    changed = original.replace("embedding_dim = 32", "embedding_dim = 24", 1)
    assert changed != original
    try:
        spec_file.write_text(changed)
        assert main(["train", "--prepared", str(manifest.path), "--out", str(tmp_path / "m"),
                     "--epochs", "1"]) == 2
        err = capsys.readouterr().err
        assert "does not match the prepared shards' fingerprint" in err
        assert "prepare again" in err
        with pytest.raises(ArtifactError, match="prepare again"):
            run_training_from_prepared(manifest.path, tmp_path / "m",
                                       spec=load_feature_spec(spec_file))
    finally:
        spec_file.write_text(original)
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def _worker(prepared, out, tf_config) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "train", "--prepared", str(prepared), "--out",
         str(out), "--epochs", "1", "--batch-size", "128", "--seed", "1", "--no-eval"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TF_CONFIG": json.dumps(tf_config)})


@pytest.mark.slow
def test_two_workers_read_half_the_shards_each_and_end_with_the_same_weights(demo, tmp_path):
    _, _, manifest = demo
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(2)]}
    workers = [_worker(manifest.path, tmp_path / f"w{i}",
                       {"cluster": cluster, "task": {"type": "worker", "index": i}})
               for i in range(2)]
    logs = [w.communicate(timeout=900)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(logs)
    reads = [re.search(r"worker (\d)/2 reads (\d+) of (\d+) shards \((\d+) examples\): (.*)",
                       log) for log in logs]
    assert all(reads), "\n".join(logs)
    files = [set(r.group(5).split()) for r in reads]
    every = {s.path.name for split in ("train", "valid", "test")
             for s in manifest.splits[split].shards}
    assert not files[0] & files[1] and files[0] | files[1] == every
    total = sum(manifest.splits[s].rows for s in ("train", "valid", "test"))
    largest = max(s.rows for split in manifest.splits.values() for s in split.shards)
    for r in reads:
        assert abs(int(r.group(4)) - total / 2) <= largest, r.group(0)
    sha = [re.search(r"worker \d/2 final weights sha256 (\w+)", log).group(1) for log in logs]
    assert sha[0] == sha[1]

    # what each worker's stream actually yields, counted: its files' rows, together all
    counted = [sum(_stream_rows(manifest, WorkerRole(2, i)).values()) for i in range(2)]
    train_rows = manifest.splits["train"].rows
    assert sum(counted) == train_rows
    shard_rows = max(s.rows for s in manifest.splits["train"].shards)
    assert all(abs(c - train_rows / 2) <= shard_rows for c in counted), counted

"""What keeps preparation's cost bounded by the data's shape (issue 17): a heavy user's
hold-out rows carry only the latest --max-seen-items items, and a hashed feature gets no
vocabulary (its values are never counted) while training from the shards still works."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.dataset import load_dataset, write_dataset
from contracts.prepared import SEEN_ITEMS, load_prepared
from tests.conftest import TINY
from tests.test_hashed_features import HASHED, _hashed
from tests.test_preparation import _in_memory, _prepare, spark, tiny  # noqa: F401

pytest.importorskip("pyspark")
# Spark on the shared 2-core machine under load took minutes per small job: above the 600 s
# default for two preparations and a training
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
CAP = 4  # TINY users have 15 events: 12-13 before each hold-out event


def _split_rows(prepared, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(s.path) for s in load_prepared(prepared)
                             .splits[split].shards])


def _earlier_items(data) -> dict[tuple[str, str], list[str]]:
    """(split, user) → the items the in-memory protocol masks for that hold-out row (valid:
    the user's train events, test: train and valid), oldest first (ties by row)."""
    ds, _, split = _in_memory(data)
    cols = ds.spec.columns
    users = ds.interactions[cols.user_id].astype(str)
    times = np.asarray(ds.interactions[cols.timestamp], np.int64)
    items = ds.interactions[cols.item_id].astype(str)
    out = {}
    for name, masked in (("valid", split.train),
                         ("test", np.concatenate([split.train, split.valid]))):
        masked = masked[np.lexsort((masked, times[masked]))]
        for row in masked:
            out.setdefault((name, users[row]), []).append(items[row])
    return out


def test_holdout_rows_keep_the_latest_max_seen_items(spark, tiny, tmp_path):  # noqa: F811
    prepared = _prepare(spark, tiny, tmp_path / "capped", max_seen_items=CAP)
    assert load_prepared(prepared).config["max_seen_items"] == CAP
    cols = load_dataset(tiny).spec.columns
    earlier = _earlier_items(tiny)
    checked = 0
    for split in ("valid", "test"):
        table = _split_rows(prepared, split).to_pydict()
        for user, seen in zip(table[cols.user_id], table[SEEN_ITEMS], strict=True):
            assert len(earlier[split, user]) > CAP  # every user has more events than the cap
            assert seen == earlier[split, user][-CAP:], (split, user)
            checked += 1
    assert checked == 2 * TINY["num_users"]


def test_a_hashed_feature_gets_no_vocabulary_and_trains(spark, tmp_path):  # noqa: F811
    from training.pipeline import run_training_from_prepared
    from training.synthetic import SyntheticConfig, generate_synthetic
    from training.train import TrainConfig

    dataset, spec_toml = generate_synthetic(SyntheticConfig(**TINY))
    for name, buckets in HASHED.items():
        spec_toml = _hashed(spec_toml, name, buckets)
    data = write_dataset(dataset, tmp_path / "data", spec_toml)
    manifest = load_prepared(_prepare(spark, data, tmp_path / "prepared"))
    assert {f.name for f in manifest.spec.features if f.hashed} == set(HASHED)
    assert set(manifest.vocabularies) == {"category", "hour_of_day", "day_of_week"}
    assert not list((manifest.path / "vocab").glob("user_id*"))
    assert manifest.item_counts.exists()  # logQ still has the items' counts

    path, summary = run_training_from_prepared(manifest.path, tmp_path / "model",
                                               TrainConfig(epochs=2, seed=1))
    assert (path / "manifest.json").exists()
    evaluation = summary["evaluation"]
    assert evaluation["test_users"] == TINY["num_users"]
    assert evaluation["model"]["recall@100"] > evaluation["popularity"]["recall@100"] / 2

"""User-level training from prepared shards: a spec without the user-id feature prepares
(the shards still carry the user id), the per-user examples read from the hold-out rows are
those built in memory, and training from them learns and exports."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from tests.test_user_level import SMALL, _config, _history_only, _spec_toml

pytest.importorskip("pyspark", reason="the preparation job needs the [prepare] extra")
prepare = pytest.importorskip("preparation").prepare
PrepareConfig = pytest.importorskip("preparation").PrepareConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from contracts.dataset import load_dataset, write_dataset
    from contracts.prepared import load_prepared
    from training.synthetic import SyntheticConfig, generate_synthetic

    root = tmp_path_factory.mktemp("user-level-shards")
    dataset, _ = generate_synthetic(SyntheticConfig(**SMALL))
    dataset = _history_only(dataset)
    write_dataset(dataset, root / "data", _spec_toml(dataset.spec))
    path = prepare(root / "data", root / "prepared", PrepareConfig(rows_per_shard=3000))
    return root, load_dataset(root / "data"), load_prepared(path)


def _as_rows(examples: dict[str, np.ndarray], catalogue: np.ndarray) -> collections.Counter:
    from training.user_level import TARGETS

    return collections.Counter(
        (tuple(h), tuple(sorted(catalogue[t[t >= 0]].tolist())))
        for h, t in zip(examples["recent_items"].tolist(), examples[TARGETS], strict=True))


@pytest.mark.parametrize("every", [False, True])
def test_examples_from_the_hold_out_rows_are_the_in_memory_ones(prepared, every):
    import pyarrow.parquet as pq

    from training.protocols import temporal_leave_one_out
    from training.user_level import prepared_user_examples, user_examples

    _, dataset, manifest = prepared
    shard = manifest.splits["train"].shards[0].path
    assert "user_id" in pq.read_schema(shard).names  # no feature, still in the rows
    catalogue = np.asarray(dataset.items["item_id"]).astype(str)
    got = prepared_user_examples(manifest, dataset.spec, catalogue, every=every)
    rows = None if every else temporal_leave_one_out(dataset).train
    assert _as_rows(got, catalogue) == _as_rows(user_examples(dataset, rows), catalogue)


def test_trains_from_shards_learns_and_exports(prepared):
    from contracts.model_manifest import load_model_manifest
    from retrieval.numpy_tower import NumpyUserTower
    from training.pipeline import run_training_from_prepared

    root, dataset, manifest = prepared
    model_dir, summary = run_training_from_prepared(manifest.path, root / "models", _config(),
                                                    spec=dataset.spec)
    model, popularity = summary["evaluation"]["model"], summary["evaluation"]["popularity"]
    assert model["recall@10"] > 2 * popularity["recall@10"]
    assert load_model_manifest(model_dir).feature_spec.feature("recent_items").max_length == 64
    assert NumpyUserTower.load(model_dir).input_names == ("recent_items",)

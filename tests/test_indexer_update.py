"""Incremental updates: new items become findable, retired items are never returned."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from indexer.artifact import load_index_artifact, load_item_metadata
from indexer.build import IndexSpec
from indexer.embed import ItemTowerSource
from indexer.items import load_items
from indexer.job import JobOptions, run_build_index
from contracts.index_store import current_version, versions
from indexer.update import run_update_index
from retrieval.candidate_index import CandidateIndex
from contracts.model_manifest import load_model_manifest
from contracts.dataset import load_dataset
from contracts.errors import ArtifactError, DataError

NEW = [f"new{i}" for i in range(5)]


def _catalogue(pipeline, path, drop: int, new=NEW):
    """The dataset's items without the first ``drop``, plus ``new`` items, as a CSV table."""
    items = load_dataset(pipeline.data_dir).items
    lines = ["item_id,category,tags"]
    lines += [f"{i},{c},{'|'.join(t)}" for i, c, t in
              zip(items["item_id"][drop:], items["category"][drop:], items["tags"][drop:],
                  strict=True)]
    lines += [f"{i},cat1,tag3|tag4" for i in new]
    path.write_text("\n".join(lines) + "\n")
    return path, set(items["item_id"][:drop])


def _everything_returned(artifact, pipeline) -> set[str]:
    """Item ids returned for 300 queries asking for every live item."""
    rng = np.random.default_rng(0)
    item_emb = np.load(pipeline.model_dir / "item_embeddings.npy")
    xq = np.concatenate([item_emb, rng.normal(size=(100, item_emb.shape[1]))]).astype(np.float32)
    index = CandidateIndex(artifact)
    found = index.search(xq, index.size, [frozenset()] * len(xq))
    return {item for candidates in found for item in candidates.item_ids}


@pytest.mark.parametrize("spec", [IndexSpec("Flat"),
                                  IndexSpec("HNSW32", search={"ef_search": 256})])
def test_an_update_adds_new_items_and_never_returns_removed_ones(pipeline, tmp_path, spec):
    store = tmp_path / "indexes"
    base = run_build_index(pipeline.model_dir, store, spec,
                           JobOptions(items=pipeline.data_dir, gate=_lenient()))
    catalogue, removed = _catalogue(pipeline, tmp_path / "items.csv", drop=10)
    updated = run_update_index(store, pipeline.model_dir, catalogue)
    artifact = load_index_artifact(store)
    assert artifact.path == updated and current_version(store) == updated.name != base.name
    doc = artifact.manifest
    assert (doc["num_items"], doc["live_items"], doc["num_tombstones"]) == (205, 195, 10)
    assert doc["updates"][-1]["from_version"] == base.name
    assert (doc["updates"][-1]["added"], doc["updates"][-1]["removed"]) == (5, 10)
    returned = _everything_returned(artifact, pipeline)
    assert not returned & removed
    if spec.factory == "Flat":  # exact search reaches every live item
        assert returned == set(load_items(catalogue, _spec(pipeline)).item_ids)
    assert list(load_item_metadata(artifact)["category"][-5:]) == ["cat1"] * 5


def test_removed_items_are_refused_as_exclusions_and_do_not_count_against_k(pipeline, tmp_path):
    store = tmp_path / "indexes"
    run_build_index(pipeline.model_dir, store, IndexSpec("Flat"),
                    JobOptions(items=pipeline.data_dir))
    catalogue, removed = _catalogue(pipeline, tmp_path / "items.csv", drop=10, new=[])
    run_update_index(store, pipeline.model_dir, catalogue)
    index = CandidateIndex(load_index_artifact(store))
    xq = np.random.default_rng(1).normal(size=(20, 32)).astype(np.float32)
    for candidates in index.search(xq, 100, [frozenset(removed)] * 20):
        assert len(candidates.item_ids) == 100 and not set(candidates.item_ids) & removed
    assert index.size == 190


def test_past_the_tombstone_threshold_the_update_is_a_full_rebuild(pipeline, tmp_path):
    store = tmp_path / "indexes"
    run_build_index(pipeline.model_dir, store, IndexSpec("Flat"),
                    JobOptions(items=pipeline.data_dir))
    catalogue, removed = _catalogue(pipeline, tmp_path / "items.csv", drop=50)
    run_update_index(store, pipeline.model_dir, catalogue, max_tombstone_fraction=0.2)
    doc = load_index_artifact(store).manifest
    assert (doc["num_items"], doc["num_tombstones"], doc["updates"]) == (155, 0, [])
    assert not set(load_index_artifact(store).item_ids) & removed


def test_an_unchanged_catalogue_publishes_nothing_new(pipeline, tmp_path):
    store = tmp_path / "indexes"
    base = run_build_index(pipeline.model_dir, store, None, JobOptions(items=pipeline.data_dir))
    assert run_update_index(store, pipeline.model_dir, pipeline.data_dir) == base
    assert versions(store) == [base.name]


def test_an_update_with_another_model_is_refused(pipeline, tmp_path):
    store = tmp_path / "indexes"
    run_build_index(pipeline.model_dir, store, None, JobOptions(items=pipeline.data_dir))
    other = tmp_path / "m-other"
    shutil.copytree(pipeline.model_dir, other)
    doc = json.loads((other / "manifest.json").read_text())
    doc["model_version"] = "m-other"
    (other / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="built from model .* not 'm-other'.*build-index"):
        run_update_index(store, other, pipeline.data_dir)


def test_update_index_from_the_command_line(pipeline, tmp_path):
    store = tmp_path / "indexes"
    run_build_index(pipeline.model_dir, store, None, JobOptions(items=pipeline.data_dir))
    catalogue, _ = _catalogue(pipeline, tmp_path / "items.csv", drop=3)
    job = subprocess.run([sys.executable, "-m", "app.cli", "update-index", "--store",
                          str(store), "--model", str(pipeline.model_dir), "--items",
                          str(catalogue)], capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr
    assert job.stdout.strip() == str(store / current_version(store))
    assert load_index_artifact(store).manifest["live_items"] == 202


def test_the_item_tower_reproduces_the_exported_embeddings(pipeline):
    model = load_model_manifest(pipeline.model_dir)
    source = ItemTowerSource(model, load_items(pipeline.data_dir, model.feature_spec))
    exported = np.load(pipeline.model_dir / "item_embeddings.npy")
    np.testing.assert_allclose(np.concatenate(list(source.chunks(64))), exported, atol=1e-5)


def test_an_items_table_without_a_model_feature_names_the_file_and_column(pipeline, tmp_path):
    table = tmp_path / "items.csv"
    table.write_text("item_id,category\ni1,cat1\n")
    with pytest.raises(DataError, match=r"items.csv:1: column 'tags': missing column"):
        load_items(table, _spec(pipeline))


def _spec(pipeline):
    return load_model_manifest(pipeline.model_dir).feature_spec


def _lenient():
    from indexer.gated_build import GateConfig

    return GateConfig(target_recall=0.9)  # HNSW on a 200-item dot-product graph tops out ≈ 0.95

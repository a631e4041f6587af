"""The index: recall against exact search, the artifact contract, pairing with a model."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pyarrow as pa
import pytest

from indexer.artifact import (
    load_index_artifact,
    load_item_metadata,
    load_metadata_rows,
    metadata_rows,
)
from indexer.build import IndexSpec, build_index, recall_against_exact
from indexer.exact import exact_search
from indexer.source import ArraySource, NpySource
from contracts.errors import ArtifactError


def _clustered(n=4000, d=32, clusters=50, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    x = centers[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("spec, floor", [
    (IndexSpec("Flat"), 1.0),
    (IndexSpec("HNSW32", ef_construction=200, search={"ef_search": 256}), 0.95),
    (IndexSpec("IVF64,Flat", search={"nprobe": 16}), 0.9),
    (IndexSpec("IVF64,SQ8", search={"nprobe": 16}), 0.9),
    (IndexSpec("IVF64,PQ8x4fs,Refine(SQ8)", search={"nprobe": 16, "k_factor": 8}), 0.9),
])
def test_index_types_reach_their_recall_against_exact_search(spec, floor):
    xb = _clustered()
    xq = _clustered(n=100, seed=1)
    index = build_index(xb, spec, "dot")
    assert recall_against_exact(index, spec, xb, xq, k=100) >= floor


def test_streamed_exact_search_equals_one_shot_exact_search(tmp_path):
    xb, xq = _clustered(n=3000), _clustered(n=20, seed=1)
    np.save(tmp_path / "xb.npy", xb)
    _, chunked = exact_search(NpySource(tmp_path / "xb.npy"), xq, 50, chunk_size=700)
    _, whole = faiss.knn(xq, xb, 50, metric=faiss.METRIC_INNER_PRODUCT)
    assert (chunked == whole).mean() > 0.99  # ties may swap places; nothing else may differ


def test_index_uses_the_inner_product_of_a_dot_product_model():
    for factory in ("Flat", "HNSW32", "IVF16,Flat", "IVF16,PQ8x4fs,Refine(SQ8)"):
        index = build_index(_clustered(n=2000), IndexSpec(factory), "dot")
        assert index.metric_type == faiss.METRIC_INNER_PRODUCT, factory


def test_unknown_similarity_factory_and_search_parameter_are_refused():
    with pytest.raises(ValueError, match="similarity must be one of"):
        build_index(_clustered(n=10), IndexSpec(), "l2")
    with pytest.raises(ValueError, match="invalid Faiss factory string 'NoSuchIndex'"):
        build_index(_clustered(n=10), IndexSpec("NoSuchIndex"), "dot")
    with pytest.raises(ValueError, match=r"unknown search parameter\(s\) \['probes'\]"):
        IndexSpec("IVF16,Flat", search={"probes": 4})
    with pytest.raises(ValueError, match="nprobe must be an integer >= 1"):
        IndexSpec("IVF16,Flat", search={"nprobe": 0})


def test_the_build_streams_chunks_and_labels_are_rows():
    xb = _clustered(n=1000)
    index = build_index(xb, IndexSpec("Flat"), "dot", chunk=128)
    _, rows = index.search(xb[:5], 1)
    whole = faiss.knn(xb[:5], xb, 1, metric=faiss.METRIC_INNER_PRODUCT)[1]
    assert (rows == whole).all() and index.ntotal == 1000
    assert len(list(ArraySource(xb).chunks(128))) == 8


def test_index_manifest_names_the_model_it_was_built_from(pipeline):
    artifact = load_index_artifact(pipeline.index_dir)
    assert artifact.model_version == pipeline.model_dir.name
    assert artifact.spec.factory == "HNSW32" and artifact.index.ntotal == 200
    assert artifact.measured["recall@100"] >= 0.9  # the fixture's gate, on held-out users
    assert artifact.measured["query_source"].startswith("user_tower")
    assert artifact.manifest["format"] == "two-tower-index/2"
    assert set(artifact.manifest["metadata_columns"]) == {"category", "tags"}


def test_truncated_index_file_is_refused(pipeline, tmp_path):
    copy = tmp_path / "i"
    shutil.copytree(pipeline.index_dir, copy)
    data = (copy / "index.faiss").read_bytes()
    (copy / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="index.faiss: checksum mismatch"):
        load_index_artifact(copy)


def test_an_index_file_with_one_flipped_byte_is_refused(pipeline, tmp_path):
    copy = tmp_path / "i"
    shutil.copytree(pipeline.index_dir, copy)
    data = bytearray((copy / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="index.faiss: checksum mismatch"):
        load_index_artifact(copy)


def test_pair_from_different_model_versions_is_refused(pipeline, tmp_path):
    from retrieval.pair import load_pair

    copy = tmp_path / "i"
    shutil.copytree(pipeline.index_dir, copy)
    doc = json.loads((copy / "manifest.json").read_text())
    doc["model_version"] = "m-other"
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=r"manifest.json: index was built from model 'm-other'"):
        load_pair(pipeline.model_dir, copy)


def test_indexed_vectors_can_be_read_back_from_an_ivf_index(pipeline, tmp_path):
    """SimilarItems needs an item's own vector; IVF stores it behind inverted lists."""
    from indexer.gated_build import GateConfig
    from indexer.job import JobOptions, run_build_index
    from retrieval.candidate_index import CandidateIndex
    from contracts.model_manifest import load_item_embeddings, load_model_manifest

    version = run_build_index(pipeline.model_dir, tmp_path, IndexSpec("IVF8,Flat"),
                              JobOptions(gate=GateConfig(target_recall=0.9)))
    index = CandidateIndex(load_index_artifact(version))
    item_emb, item_ids = load_item_embeddings(load_model_manifest(pipeline.model_dir))
    row = list(item_ids).index("i7")
    np.testing.assert_allclose(index.vector("i7"), item_emb[row], atol=1e-6)
    assert index.vector("no-such-item") is None


def test_metadata_rows_of_a_built_index_are_the_rows_each_value_is_on(pipeline):
    artifact = load_index_artifact(pipeline.index_dir)
    columns = load_item_metadata(artifact)
    rows = load_metadata_rows(artifact)
    assert set(rows) == {"category", "tags"}
    for name, by_value in rows.items():
        holding: dict[str, set[int]] = {}
        for row, value in enumerate(columns[name]):
            for v in value if isinstance(value, tuple) else (value,):
                holding.setdefault(str(v), set()).add(row)
        assert {v: set(r.tolist()) for v, r in by_value.items()} == holding


def test_metadata_rows_skip_nulls_key_values_as_text_and_keep_rows_ascending():
    table = pa.table({
        "item_id": ["a", "b", "c", "d"],
        "category": ["x", None, "y", "x"],
        "tags": pa.array([["t1", "t2"], None, ["t2", "t2"], []], pa.list_(pa.string())),
        "year": [1999, 2001, 1999, None],
    })
    rows = metadata_rows(table)
    assert "item_id" not in rows
    assert {v: r.tolist() for v, r in rows["category"].items()} == {"x": [0, 3], "y": [2]}
    # a list row holding a value twice is on that value's rows (once is enough for a mask)
    assert {v: sorted(set(r.tolist())) for v, r in rows["tags"].items()} == {
        "t1": [0], "t2": [0, 2]}
    assert {v: r.tolist() for v, r in rows["year"].items()} == {"1999": [0, 2], "2001": [1]}
    assert all(r.dtype == np.int64 for by in rows.values() for r in by.values())

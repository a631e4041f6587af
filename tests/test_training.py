"""Training and the model artifact, as the indexer and the service rely on them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from contracts.model_manifest import load_item_embeddings, load_model_manifest
from contracts.errors import ArtifactError


def test_trained_model_beats_popularity_by_a_clear_margin(pipeline):
    evaluation = pipeline.summary["evaluation"]
    model, popularity = evaluation["model"], evaluation["popularity"]
    for metric in ("recall@10", "ndcg@10"):
        assert model[metric] >= 1.5 * popularity[metric], (metric, model, popularity)
    assert model["recall@50"] >= popularity["recall@50"] + 0.15  # 50 of 200 items: both high


def test_exported_user_tower_gives_the_training_embeddings(pipeline):
    """The SavedModel the service loads must agree with the Keras tower it came from."""
    from training.saved_model_tower import SavedModelUserTower
    from contracts.dataset import load_dataset
    from contracts.inputs import training_examples
    from training.model import TowerConfig
    from training.train import TrainConfig, train

    dataset = load_dataset(pipeline.data_dir)
    examples = {k: v[:64] for k, v in training_examples(dataset).items()}
    trained = train(dataset, TrainConfig(epochs=1, tower=TowerConfig(embedding_dim=8)), examples)
    from training.artifact import export_model

    exported = load_model_manifest(export_model(trained, pipeline.model_dir.parent / "rt", {}))
    expected = trained.user_embeddings(examples)
    got = SavedModelUserTower(exported)({k: examples[k] for k in
                                         [f.name for f in dataset.spec.user_input_features]})
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    item_emb, _ = load_item_embeddings(exported)
    np.testing.assert_allclose(item_emb, trained.item_embeddings(), atol=1e-5, rtol=0)


def test_manifest_describes_the_model(pipeline):
    manifest = load_model_manifest(pipeline.model_dir)
    assert manifest.model_version == pipeline.model_dir.name
    assert manifest.similarity == "dot" and manifest.embedding_dim == 32
    assert {f.name for f in manifest.feature_spec.tower("context")} == {
        "hour_of_day", "day_of_week", "device"}
    item_emb, item_ids = load_item_embeddings(manifest)
    assert item_emb.shape == (200, 32) and len(set(item_ids.tolist())) == 200


def test_a_default_model_has_unit_length_embeddings_for_a_cosine_index(pipeline):
    """Trained with the defaults (the pipeline fixture passes none): normalised towers."""
    item_emb, _ = load_item_embeddings(load_model_manifest(pipeline.model_dir))
    np.testing.assert_allclose(np.linalg.norm(item_emb, axis=1), 1.0, atol=1e-5)


def test_train_flags_default_to_normalised_towers_and_can_turn_them_off():
    from app.cli import build_parser as _parser

    default = _parser().parse_args(["train", "--data", "d", "--out", "o"])
    assert (default.normalize, default.temperature) == (True, 0.05)
    raw = _parser().parse_args(["train", "--data", "d", "--out", "o", "--no-normalize",
                                "--temperature", "1"])
    assert (raw.normalize, raw.temperature) == (False, 1.0)


def test_altered_artifact_file_is_refused_naming_it(pipeline, tmp_path):
    copy = tmp_path / pipeline.model_dir.name
    shutil.copytree(pipeline.model_dir, copy)
    with open(copy / "item_embeddings.npy", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="item_embeddings.npy: checksum mismatch"):
        load_model_manifest(copy)


def test_directory_without_manifest_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        load_model_manifest(tmp_path)


def test_manifest_of_another_format_is_refused(pipeline, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(pipeline.model_dir, copy)
    doc = json.loads((copy / "manifest.json").read_text())
    doc["format"] = "something-else/9"
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="format must be 'two-tower-model/1'"):
        load_model_manifest(copy)

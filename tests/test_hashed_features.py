"""Hashed categorical features (spec ``hash_buckets``): what the spec accepts, and the
exported NumPy user tower equal to the SavedModel to 1e-5 with hashed ids, histories and
context, with no vocabulary computed or stored for them."""

from __future__ import annotations

import dataclasses
import json
import tomllib

import numpy as np
import pytest

from tests.tower_parity import Exported, assert_towers_agree, training_inputs

from contracts.errors import FeatureSpecError
from contracts.feature_spec import parse_feature_spec
from contracts.inputs import PAD, UserRequest, user_inputs

MINIMAL = """
[features.user_id]
tower = "user"
kind = "categorical"

[features.item_id]
tower = "item"
kind = "categorical"
"""
HISTORY = '\n[features.recent]\ntower = "user"\nkind = "history"\n'


def parse(text: str):
    return parse_feature_spec(tomllib.loads(text), "spec.toml")


def _hashed(text: str, feature: str, n: int) -> str:
    return text.replace(f"[features.{feature}]\n", f"[features.{feature}]\nhash_buckets = {n}\n")


# --- the spec --------------------------------------------------------------------------------

def test_hash_buckets_parse_and_round_trip_through_the_manifest_form():
    spec = parse(_hashed(_hashed(_hashed(MINIMAL + HISTORY, "user_id", 1000), "item_id", 64),
                         "recent", 64))
    user_id = spec.feature("user_id")
    assert user_id.hash_buckets == 1000 and user_id.hashed and not user_id.uses_vocabulary
    assert spec.feature("recent").hash_buckets == 64
    assert parse_feature_spec(spec.to_dict()) == spec
    assert "oov_buckets" not in spec.to_dict()["features"]["user_id"]


def test_a_spec_without_hashing_keeps_its_manifest_form():
    """Specs written before hash_buckets existed: same dict, hence the same fingerprint."""
    spec = parse(MINIMAL)
    assert spec.feature("user_id").hash_buckets is None
    assert "hash_buckets" not in spec.to_dict()["features"]["user_id"]


@pytest.mark.parametrize("text, key, message", [
    (_hashed(MINIMAL, "user_id", 0), "features.user_id.hash_buckets", "must be an integer >= 1"),
    (_hashed(MINIMAL, "user_id", "'many'"), "features.user_id.hash_buckets",
     "must be an integer >= 1"),
    (_hashed(MINIMAL, "user_id", "true"), "features.user_id.hash_buckets",
     "must be an integer >= 1"),
    (_hashed(MINIMAL, "user_id", 10).replace('kind = "categorical"\n',
                                             'kind = "categorical"\noov_buckets = 2\n', 1),
     "features.user_id.hash_buckets", "cannot be combined with oov_buckets"),
    (MINIMAL + '[features.age]\ntower = "user"\nkind = "numeric"\nhash_buckets = 8\n',
     "features.age.hash_buckets", "only categorical, bag and history"),
    (MINIMAL + '[features.hour]\ntower = "context"\nkind = "categorical"\n'
     'derive = "hour_of_day"\nhash_buckets = 8\n',
     "features.hour.hash_buckets", "cannot be combined with derive"),
    (_hashed(MINIMAL, "user_id", 10).replace("hash_buckets", "hash_bucket"),
     "features.user_id.hash_bucket", "unknown key"),
    (_hashed(MINIMAL + HISTORY, "item_id", 64), "features.recent.hash_buckets",
     "a history shares the item id's lookup"),
    (_hashed(MINIMAL + HISTORY, "recent", 64), "features.recent.hash_buckets",
     "a history shares the item id's lookup"),
    (_hashed(_hashed(MINIMAL + HISTORY, "item_id", 64), "recent", 32),
     "features.recent.hash_buckets", "a history shares the item id's lookup"),
])
def test_a_bad_hash_buckets_names_its_key(text, key, message):
    with pytest.raises(FeatureSpecError) as err:
        parse(text)
    assert str(err.value).startswith(f"spec.toml: {key}: {message}")


# --- training and serving compute the same ----------------------------------------------------

TINY = {"num_users": 80, "num_items": 60, "num_clusters": 4, "interactions_per_user": 6}
# fewer buckets than ids for users and items, so collisions happen and are served the same
HASHED = {"user_id": 37, "item_id": 23, "recent_items": 23, "country": 5, "device": 1,
          "tags": 7}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    from contracts.model_manifest import load_model_manifest
    from retrieval.numpy_tower import NumpyUserTower
    from training.artifact import export_model
    from training.model import TowerConfig
    from training.saved_model_tower import SavedModelUserTower
    from training.synthetic import SyntheticConfig, generate_synthetic
    from training.train import TrainConfig, train

    dataset, _ = generate_synthetic(SyntheticConfig(**TINY))
    features = tuple(dataclasses.replace(f, hash_buckets=HASHED.get(f.name))
                     for f in dataset.spec.features)
    dataset = dataclasses.replace(dataset, spec=dataclasses.replace(dataset.spec,
                                                                    features=features))
    tower = TowerConfig(embedding_dim=16, hidden_dims=(16,), normalize=True)
    trained = train(dataset, TrainConfig(epochs=1, tower=tower))
    model_dir = export_model(trained, tmp_path_factory.mktemp("hashed"), {})
    manifest = load_model_manifest(model_dir)
    return Exported(trained, model_dir, SavedModelUserTower(manifest),
                    NumpyUserTower.load(model_dir))


@pytest.mark.slow
def test_numpy_tower_equals_the_saved_model_on_trainingtraining_inputs(exported):
    assert_towers_agree(exported, training_inputs(exported))


@pytest.mark.slow
def test_numpy_tower_equals_the_saved_model_on_ids_never_seen_in_training(exported):
    """Hashing gives unseen ids a trained bucket instead of the OOV row: still equal."""
    requests = [
        UserRequest(f"stranger-{i}", {"country": f"land-{i}"},
                    tuple(f"new-item-{i}-{j}" for j in range(i % 4)),
                    {"device": f"gadget-{i}"}, event_time=1_700_000_000 + 3_600 * i)
        for i in range(20)
    ] + [
        UserRequest("", {"country": ""}, ("", "i3"), {}, event_time=0),
        UserRequest("ünïcödé-👤", {}, ("ïtem", "a" * 200), {"device": "tv"}, event_time=0),
    ]
    assert_towers_agree(exported, user_inputs(exported.spec, requests))
    inputs = training_inputs(exported, 30)
    inputs["recent_items"] = np.full_like(inputs["recent_items"], PAD)
    assert_towers_agree(exported, inputs)


@pytest.mark.slow
def test_no_vocabulary_is_computed_or_stored_for_a_hashed_feature(exported):
    assert not set(exported.trained.stats.vocabularies) & set(HASHED)
    assert set(exported.trained.stats.vocabularies) == {"hour_of_day", "day_of_week",
                                                        "category"}
    graph = json.loads((exported.model_dir / "user_tower_numpy.json").read_text())
    entries = {e["name"]: e for e in graph["features"]}
    for name in ("user_id", "recent_items", "country", "device"):
        assert entries[name]["hash_buckets"] == HASHED[name]
        assert "vocabulary" not in entries[name] and "num_oov" not in entries[name]
    with np.load(exported.model_dir / "user_tower_numpy.npz", allow_pickle=False) as npz:
        assert {n for n in npz.files if n.endswith(".vocabulary")} == {
            "hour_of_day.vocabulary", "day_of_week.vocabulary"}
        assert len(npz["user_id_embedding"]) == HASHED["user_id"]
        assert len(npz["item_id_embedding"]) == HASHED["item_id"]


@pytest.mark.slow
def test_the_exported_item_tower_hashes_as_the_user_tower_does(exported):
    """The history's bucket of an item is the item tower's row of that item: one table."""
    from retrieval.numpy_tower import oov_buckets
    from training.tf_env import keras

    ids = [f"i{n}" for n in range(60)] + ["unseen", ""]
    lookup = exported.trained.user_tower.get_layer("item_id_lookup")
    assert isinstance(lookup, keras.layers.Hashing)
    np.testing.assert_array_equal(lookup(np.array(ids, dtype=object)).numpy(),
                                  oov_buckets(ids, HASHED["item_id"]))

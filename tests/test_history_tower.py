"""The history-as-user tower (training.history; TowerConfig history_pooling, history_table,
history_activation): no user-id feature, a long history, and the NumPy tower equal to the
exported SavedModel to 1e-5 on every option."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tests.tower_parity import Exported, assert_towers_agree, training_inputs

from contracts.errors import FeatureSpecError
from contracts.feature_spec import parse_feature_spec
from contracts.inputs import PAD

pytestmark = pytest.mark.slow

TINY = dict(num_users=80, num_items=60, num_clusters=4, interactions_per_user=12)
LONG = 300  # a history cap well above the 200 items an ml-1m bag held
HISTORY_ONLY = ("recent_items", "item_id")
VARIANTS = {  # name: (features kept (None = all), TowerConfig options)
    "history-only normalized_sum own tanh": (HISTORY_ONLY, dict(
        hidden_dims=(), output_layer=False, history_pooling="normalized_sum",
        history_table="own", history_activation="tanh", history_dropout=0.5)),
    "all features normalized_sum shared tanh": (None, dict(
        hidden_dims=(32,), history_pooling="normalized_sum", history_activation="tanh")),
    "history-only mean own linear": (HISTORY_ONLY, dict(
        hidden_dims=(), output_layer=False, normalize=False, history_table="own")),
}


def _dataset(keep):
    from training.synthetic import SyntheticConfig, generate_synthetic

    dataset, _ = generate_synthetic(SyntheticConfig(**TINY))
    spec = dataset.spec
    features = tuple(dataclasses.replace(f, max_length=LONG) if f.kind == "history" else f
                     for f in spec.features if keep is None or f.name in keep)
    if keep is not None:  # the item id alone: its width is the history's (no output layer)
        features = tuple(dataclasses.replace(f, embedding_dim=16) if f.name == "item_id"
                         else f for f in features)
    return dataclasses.replace(dataset, spec=dataclasses.replace(spec, features=features))


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory) -> Exported:
    from contracts.model_manifest import load_model_manifest
    from retrieval.numpy_tower import NumpyUserTower
    from training.artifact import export_model
    from training.model import TowerConfig
    from training.saved_model_tower import SavedModelUserTower
    from training.train import TrainConfig, train

    keep, options = VARIANTS[request.param]
    tower = TowerConfig(**{"embedding_dim": 16, **options})
    trained = train(_dataset(keep), TrainConfig(epochs=1, tower=tower))
    model_dir = export_model(trained, tmp_path_factory.mktemp("history"), {})
    manifest = load_model_manifest(model_dir)
    return Exported(trained, model_dir, SavedModelUserTower(manifest),
                    NumpyUserTower.load(model_dir))


def test_agrees_on_training_inputs(exported):
    assert_towers_agree(exported, training_inputs(exported))


def test_agrees_on_full_empty_and_unknown_histories(exported):
    inputs = training_inputs(exported, 4)
    items = [str(i) for i in exported.trained.dataset.items["item_id"]]
    history = np.full((4, LONG), PAD, dtype=object)
    history[0, :] = [items[i % len(items)] for i in range(LONG)]  # every slot, repeats
    history[2, :3] = ["never-seen-item", items[0], "another-unknown"]
    inputs["recent_items"] = history  # row 1 and 3: empty
    assert_towers_agree(exported, inputs)


def test_writes_format_4_with_the_history_options(exported):
    graph = json.loads((exported.model_dir / "user_tower_numpy.json").read_text())
    entry = next(e for e in graph["features"] if e["name"] == "recent_items")
    config = exported.trained.config.tower
    assert graph["format"] == "two-tower-numpy-user-tower/4"
    assert (entry["pooling"], entry["activation"], entry["max_length"]) == (
        config.history_pooling, config.history_activation, LONG)
    own = config.history_table == "own"
    assert entry["embedding"] == ("recent_items_embedding" if own else "item_id_embedding")


def test_a_user_tower_without_the_user_id_feature_is_a_valid_spec():
    doc = {"features": {"history": {"tower": "user", "kind": "history", "max_length": 4000},
                        "item_id": {"tower": "item", "kind": "categorical"}}}
    spec = parse_feature_spec(doc)
    assert [f.name for f in spec.user_input_features] == ["history"]
    with pytest.raises(FeatureSpecError, match="features: the user tower has no feature"):
        parse_feature_spec({"features": {"item_id": {"tower": "item", "kind": "categorical"}}})


@pytest.mark.parametrize("option,value", [("history_pooling", "sum"),
                                          ("history_table", "item"),
                                          ("history_activation", "relu")])
def test_unknown_history_options_are_refused_naming_them(option, value):
    from training.model import TowerConfig

    with pytest.raises(ValueError, match=f"{option} must be one of .*got '{value}'"):
        TowerConfig(**{option: value})

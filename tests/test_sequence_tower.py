"""The sequence feature (kind = "sequence"): spec options, leak-free training inputs with
age buckets, and the NumPy tower equal to the Keras and SavedModel towers to 1e-5
(training.sequence → training.numpy_export → retrieval.sequence_tower)."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from tests.tower_parity import ATOL, Exported, assert_towers_agree

from contracts.dataset import Dataset
from contracts.errors import FeatureSpecError
from contracts.feature_spec import load_feature_spec, parse_feature_spec
from contracts.inputs import PAD, UserRequest, gap_buckets, training_examples, user_inputs

TINY = dict(num_users=80, num_items=60, num_clusters=4, interactions_per_user=8)
LENGTH = 8
VARIANTS = {  # name: (blocks, heads, item hash_buckets)
    "one-block": (1, 2, None),
    "two-blocks-hashed": (2, 4, 97),
}


def sequence_spec_doc(spec_toml: str, blocks: int = 1, heads: int = 2,
                      hash_buckets: int | None = None) -> dict:
    """The synthetic spec with its history replaced by a sequence of LENGTH items."""
    doc = tomllib.loads(spec_toml)
    doc["features"].pop("recent_items")
    doc["features"]["recent"] = {"tower": "user", "kind": "sequence", "max_length": LENGTH,
                                 "blocks": blocks, "heads": heads}
    if hash_buckets:
        for name in ("item_id", "recent"):
            doc["features"][name]["hash_buckets"] = hash_buckets
    return doc


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory) -> Exported:
    from contracts.model_manifest import load_model_manifest
    from retrieval.numpy_tower import NumpyUserTower
    from training.artifact import export_model
    from training.model import TowerConfig
    from training.saved_model_tower import SavedModelUserTower
    from training.synthetic import SyntheticConfig, generate_synthetic
    from training.train import TrainConfig, train

    blocks, heads, hashed = VARIANTS[request.param]
    dataset, spec_toml = generate_synthetic(SyntheticConfig(**TINY))
    spec = parse_feature_spec(sequence_spec_doc(spec_toml, blocks, heads, hashed))
    dataset = Dataset(spec, dataset.interactions, dataset.users, dataset.items)
    tower = TowerConfig(embedding_dim=16, hidden_dims=(32,), history_dropout=0.1)
    trained = train(dataset, TrainConfig(epochs=2, tower=tower))
    model_dir = export_model(trained, tmp_path_factory.mktemp(request.param), {})
    return Exported(trained, model_dir, SavedModelUserTower(load_model_manifest(model_dir)),
                    NumpyUserTower.load(model_dir))


def random_inputs(exported: Exported, n: int, seed: int) -> dict[str, np.ndarray]:
    """Requests with sequences of every length 0..LENGTH (unknown items among them), random
    ages (some unknown) and random other features, through contracts.inputs.user_inputs."""
    rng = np.random.default_rng(seed)
    items = [str(i) for i in exported.trained.dataset.items["item_id"]] + ["never-seen"]
    requests = []
    for i in range(n):
        length = i % (LENGTH + 2)  # 0 (empty) up to one more than fits
        history = tuple(rng.choice(items, length))
        now = 1_700_000_000
        times = [None if rng.random() < 0.2 else now - int(rng.integers(0, 10**8))
                 for _ in history]
        requests.append(UserRequest(str(rng.integers(0, 100)), {"age": float(rng.normal(35, 9)),
                                    "country": "fr"}, history, {"device": "tv"}, now, times))
    return user_inputs(exported.spec, requests)


def test_numpy_tower_agrees_with_keras_and_saved_model_on_training_rows(exported):
    examples = training_examples(exported.trained.dataset)
    names = [n for f in exported.spec.user_input_features for n in f.input_names]
    inputs = {n: examples[n][:300] for n in names}
    assert_towers_agree(exported, inputs)
    keras_emb = exported.trained.user_tower(inputs, training=False).numpy()
    np.testing.assert_allclose(exported.numpy_tower(inputs), keras_emb, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 37])
def test_numpy_tower_agrees_on_random_empty_and_short_sequences(exported, n):
    inputs = random_inputs(exported, n, seed=n)
    assert_towers_agree(exported, inputs)
    keras_emb = exported.trained.user_tower(inputs, training=False).numpy()
    np.testing.assert_allclose(exported.numpy_tower(inputs), keras_emb, atol=ATOL, rtol=0)


def test_sequence_changes_the_embedding_with_order_and_age(exported):
    """What the feature adds over a bag: the same items in another order, or at other ages,
    give another user embedding."""
    items = [str(i) for i in exported.trained.dataset.items["item_id"][:4]]
    base = {"user_id": "1", "features": {}, "context": {}, "event_time": 10**9}
    requests = [UserRequest(history=items, history_times=[10**9 - 60] * 4, **base),
                UserRequest(history=items[::-1], history_times=[10**9 - 60] * 4, **base),
                UserRequest(history=items, history_times=[10**9 - 10**7] * 4, **base)]
    emb = exported.numpy_tower(user_inputs(exported.spec, requests))
    assert np.abs(emb[0] - emb[1]).max() > 1e-4
    assert np.abs(emb[0] - emb[2]).max() > 1e-4


def test_wrong_gap_inputs_are_refused_naming_them(exported):
    inputs = random_inputs(exported, 3, seed=0)
    bad = {**inputs, "recent_gaps": inputs["recent_gaps"][:, :2]}
    with pytest.raises(ValueError, match="recent_gaps"):
        exported.numpy_tower(bad)
    without = {k: v for k, v in inputs.items() if k != "recent_gaps"}
    with pytest.raises(ValueError, match=r"missing \['recent_gaps'\]"):
        exported.numpy_tower(without)


# --- inputs ---------------------------------------------------------------------------------

def test_gap_buckets_are_log2_octaves_with_zero_for_unknown():
    ages = np.array([[np.nan, 0, 1, 2, 3, 1022, 1023, 1e12, -5]])
    np.testing.assert_array_equal(gap_buckets(ages, 16), [[0, 1, 2, 2, 3, 10, 11, 16, 1]])


def test_training_sequences_hold_only_earlier_events_with_their_ages():
    spec = parse_feature_spec({"features": {
        "user_id": {"tower": "user", "kind": "categorical"},
        "item_id": {"tower": "item", "kind": "categorical", "embedding_dim": 4},
        "recent": {"tower": "user", "kind": "sequence", "max_length": 3}}})
    inter = {"user_id": np.array(["u", "v", "u", "u", "u"], object),
             "item_id": np.array(["a", "x", "b", "c", "d"], object),
             "timestamp": np.array([100, 50, 103, 1124, 1124])}
    dataset = Dataset(spec, inter, {"user_id": np.array([], object)},
                      {"item_id": np.array(["a", "b", "c", "d", "x"], object)})
    examples = training_examples(dataset)
    assert examples["recent"].tolist() == [[PAD] * 3, [PAD] * 3, ["a", PAD, PAD],
                                           ["b", "a", PAD], ["c", "b", "a"]]
    # ages 0, 3, 1021 and 1024 s: buckets 1 + floor(log2(1 + age)) = 1, 3, 10, 11
    assert examples["recent_gaps"].tolist() == [[0, 0, 0], [0, 0, 0], [3, 0, 0],
                                                [10, 11, 0], [1, 10, 11]]


def test_serving_inputs_take_ages_from_history_times_and_unknown_as_zero():
    spec = parse_feature_spec({"features": {
        "user_id": {"tower": "user", "kind": "categorical"},
        "item_id": {"tower": "item", "kind": "categorical", "embedding_dim": 4},
        "recent": {"tower": "user", "kind": "sequence", "max_length": 3}}})
    requests = [UserRequest("u", {}, ("a", "b", "c", "d"), {}, 2000, (1999, None, 978, 1)),
                UserRequest("v", {}, ("a",), {}, 2000)]
    inputs = user_inputs(spec, requests)
    assert inputs["recent"].tolist() == [["a", "b", "c"], ["a", PAD, PAD]]
    assert inputs["recent_gaps"].tolist() == [[2, 0, 10], [0, 0, 0]]
    assert inputs["recent_gaps"].dtype == np.int32


# --- spec -----------------------------------------------------------------------------------

SPEC = """\
[features.user_id]
tower = "user"
kind = "categorical"

[features.item_id]
tower = "item"
kind = "categorical"
embedding_dim = 32

[features.recent]
tower = "user"
kind = "sequence"
max_length = 50
"""


@pytest.mark.parametrize("extra, key, message", [
    ('heads = 3', "features.recent.heads", "must divide the item embedding width"),
    ('blocks = 0', "features.recent.blocks", r"must be an integer in \[1, 4\] \(got 0\)"),
    ('time_buckets = 65', "features.recent.time_buckets", r"must be an integer in \[2, 64\]"),
    ('heads = "2"', "features.recent.heads", "must be an integer"),
    ('tower = "context"', "features.recent.kind", "sequence is a user-tower feature"),
])
def test_bad_sequence_options_name_the_file_line_and_key(tmp_path, extra, key, message):
    path = tmp_path / "spec.toml"
    text = SPEC.replace('tower = "user"\nkind = "sequence"', 'kind = "sequence"')
    path.write_text(text + (extra if "tower" in extra else 'tower = "user"\n' + extra) + "\n")
    with pytest.raises(FeatureSpecError, match=f"spec.toml:\\d+: {key}: {message}") as err:
        load_feature_spec(path)
    line = int(str(err.value).split(":")[1])
    wanted = extra.split("=")[0].strip() if key.endswith(extra.split("=")[0].strip()) else None
    if wanted:
        assert path.read_text().splitlines()[line - 1].startswith(wanted)


def test_sequence_options_are_refused_on_other_kinds_and_the_gap_name_is_reserved():
    doc = tomllib.loads(SPEC)
    doc["features"]["bag"] = {"tower": "user", "kind": "history", "blocks": 2}
    with pytest.raises(FeatureSpecError, match="features.bag.blocks: only sequence features"):
        parse_feature_spec(doc)
    doc = tomllib.loads(SPEC)
    doc["features"]["recent_gaps"] = {"tower": "user", "kind": "numeric"}
    with pytest.raises(FeatureSpecError, match="features.recent_gaps: the name is taken"):
        parse_feature_spec(doc)


def test_defaults_fill_in_and_a_spec_without_sequences_keeps_its_form():
    spec = parse_feature_spec(tomllib.loads(SPEC))
    recent = spec.feature("recent")
    assert (recent.blocks, recent.heads, recent.time_buckets) == (1, 2, 32)
    assert spec.to_dict()["features"]["recent"]["heads"] == 2
    assert parse_feature_spec(spec.to_dict()) == spec
    assert "heads" not in spec.to_dict()["features"]["item_id"]

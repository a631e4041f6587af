"""User-level training (TrainConfig examples="users", training.user_level): one example
per user, a multinomial likelihood over the catalogue; with a history-as-user tower it
learns, exports, indexes and serves through the ordinary path."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from tests.conftest import start_server, stop_server
from tests.tower_parity import ATOL

pytestmark = pytest.mark.slow

SMALL = dict(num_users=500, num_items=200, num_clusters=8, interactions_per_user=20)
KEEP = ("recent_items", "item_id")  # the history is the user: no user id, no context


def _history_only(dataset, max_length=64):
    spec = dataset.spec
    features = tuple(dataclasses.replace(f, max_length=max_length) if f.kind == "history"
                     else dataclasses.replace(f, embedding_dim=32) if f.name == "item_id"
                     else f for f in spec.features if f.name in KEEP)
    return dataclasses.replace(dataset, spec=dataclasses.replace(spec, features=features))


def _config(**kw):
    from training.model import LossConfig, TowerConfig
    from training.train import TrainConfig

    tower = TowerConfig(embedding_dim=32, hidden_dims=(), output_layer=False,
                        history_pooling="normalized_sum", history_table="own",
                        history_activation="tanh", history_dropout=0.5)
    return TrainConfig(tower=tower, loss=LossConfig(temperature=0.1), epochs=15,
                       batch_size=64, learning_rate=0.01, examples="users", **kw)


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    from contracts.dataset import write_dataset
    from indexer.build import IndexSpec
    from indexer.job import JobOptions, run_build_index
    from training.pipeline import run_training
    from training.synthetic import SyntheticConfig, generate_synthetic

    root = tmp_path_factory.mktemp("user-level")
    dataset, spec_toml = generate_synthetic(SyntheticConfig(**SMALL))
    dataset = _history_only(dataset)
    spec_toml = _spec_toml(dataset.spec)
    write_dataset(dataset, root / "data", spec_toml)
    model_dir, summary = run_training(dataset, root / "models", _config())
    index_dir = run_build_index(model_dir, root / "indexes", IndexSpec("Flat"),
                                JobOptions(items=root / "data", data=root / "data"))
    return dataset, root, model_dir, index_dir, summary


def _spec_toml(spec) -> str:
    lines = [f'[columns]\nuser_id = "{spec.columns.user_id}"\nitem_id = "{spec.columns.item_id}"'
             f'\ntimestamp = "{spec.columns.timestamp}"']
    for f in spec.features:
        lines.append(f'[features.{f.name}]\ntower = "{f.tower}"\nkind = "{f.kind}"\n'
                     f"embedding_dim = {f.embedding_dim}\nmax_length = {f.max_length}")
    return "\n\n".join(lines) + "\n"


def test_learns_held_out_recall_well_above_popularity(trained_pair):
    _, _, _, _, summary = trained_pair
    model, popularity = summary["evaluation"]["model"], summary["evaluation"]["popularity"]
    assert summary["examples"] == SMALL["num_users"]  # one per user with train events
    assert model["recall@10"] > 2 * popularity["recall@10"]
    assert model["recall@50"] > popularity["recall@50"] + 0.15


def test_exported_numpy_tower_equals_the_saved_model(trained_pair):
    from contracts.model_manifest import load_model_manifest
    from retrieval.numpy_tower import NumpyUserTower
    from training.saved_model_tower import SavedModelUserTower
    from training.user_level import user_examples

    dataset, _, model_dir, _, _ = trained_pair
    examples = user_examples(dataset)
    inputs = {"recent_items": examples["recent_items"][:50]}
    expected = SavedModelUserTower(load_model_manifest(model_dir))(inputs)
    np.testing.assert_allclose(NumpyUserTower.load(model_dir)(inputs), expected, atol=ATOL)


def test_serves_a_user_from_their_history(trained_pair, tmp_path):
    assert_serves_a_user(trained_pair, tmp_path)


def assert_serves_a_user(pair, tmp_path) -> None:
    """A real server on the pair answers a user of its data with 10 candidates."""
    from retrieval.client import build_request
    from retrieval.v1 import retrieval_pb2_grpc as pb_grpc

    dataset, root, model_dir, index_dir, _ = pair
    server = start_server(["--model", str(model_dir), "--index", str(index_dir),
                           "--features", str(root / "data"), "--metrics-port", "0"], tmp_path)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            user = str(dataset.interactions["user_id"][0])
            reply = stub.Retrieve(build_request(user, 10, {}, 0), timeout=10)
        assert len(reply.candidates) == 10
        assert reply.model_version == model_dir.name
    finally:
        stop_server(server)


def test_context_features_are_refused_naming_them():
    from training.synthetic import SyntheticConfig, generate_synthetic
    from training.train import train

    dataset, _ = generate_synthetic(SyntheticConfig(num_users=20, num_items=20,
                                                    num_clusters=2, interactions_per_user=3))
    with pytest.raises(ValueError, match="remove the context features .*hour_of_day"):
        train(dataset, _config())


def test_unknown_examples_kind_is_refused():
    from training.train import TrainConfig

    with pytest.raises(ValueError, match="examples must be one of events, users"):
        TrainConfig(examples="sessions")


@pytest.mark.parametrize("weighted", [False, True])
def test_loss_is_the_multinomial_log_likelihood_of_the_targets(weighted):
    from training.tf_env import keras, tf
    from training.user_level import TARGET_WEIGHTS, TARGETS, UserLevelModel

    rng = np.random.default_rng(0)
    user_emb, item_emb = rng.normal(size=(2, 3)), rng.normal(size=(5, 3))
    u, v = keras.Input(shape=(3,), name="u"), keras.Input(shape=(3,), name="v")
    model = UserLevelModel(keras.Model({"u": u}, u), keras.Model({"v": v}, v),
                           {"v": item_emb.astype(np.float32)}, temperature=0.5)
    targets = np.array([[0, 2, -1], [4, -1, -1]], np.int32)
    weights = np.array([[1.0, 0.5, 7.0], [2.0, 0.0, 0.0]], np.float32)
    features = {"u": tf.constant(user_emb, tf.float32), TARGETS: tf.constant(targets)}
    if weighted:
        features[TARGET_WEIGHTS] = tf.constant(weights)
    logits = user_emb @ item_emb.T / 0.5
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    w = weights if weighted else np.ones_like(weights)
    expected = np.mean([-(w[0, 0] * log_p[0, 0] + w[0, 1] * log_p[0, 2]),
                        -w[1, 0] * log_p[1, 4]])
    np.testing.assert_allclose(float(model.compute_loss(features)), expected, rtol=1e-5)

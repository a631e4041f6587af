"""A closed-form low-rank linear model served beside the towers (training.linear_part):
its SVD is the exact one, its served vectors score cosine + α · linear in one dot product,
and a model trained with it exports, serves and answers through the ordinary path."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tests.test_user_level import SMALL, _config, _history_only, _spec_toml, assert_serves_a_user
from tests.tower_parity import ATOL


def _random_interactions(n_users=300, n_items=120, per_user=12, seed=0):
    from training.linear_part import Interactions

    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    items = rng.zipf(1.5, users.size) % n_items
    return Interactions.of(users, items, n_users, n_items)


def _dense(x):
    m = np.zeros((x.n_users, x.n_items), np.float64)
    m[x.users, x.items] = 1.0
    return m


@pytest.mark.parametrize("path", ["exact", "exact over users", "randomized"])
def test_low_rank_matches_numpys_svd(path, monkeypatch):
    from training import linear_part

    if path == "randomized":
        monkeypatch.setattr(linear_part, "EXACT_LIMIT", 10)  # take the sketch at this size
    # fewer users than items: the Gram matrix over users; most items are never picked
    x = (_random_interactions(n_users=60, n_items=400) if path == "exact over users"
         else _random_interactions())
    factors = linear_part.low_rank(x, 16)
    _, s, vt = np.linalg.svd(_dense(x), full_matrices=False)
    np.testing.assert_allclose(factors.singular_values, s[:16], rtol=1e-2)
    # the same subspace: projecting the exact vectors onto it keeps them whole
    kept = np.linalg.norm(factors.item_vectors.T @ vt[:16].T, axis=0)
    assert kept.min() > 0.98


def test_served_dot_product_is_cosine_plus_alpha_times_the_linear_score():
    from training.linear_part import LinearConfig, fit_linear_part

    x = _random_interactions()
    part = fit_linear_part(x, LinearConfig(rank=16, l2=50.0, weight=0.5))
    _, s, vt = np.linalg.svd(_dense(x), full_matrices=False)
    v, s2 = vt[:16].T, s[:16] ** 2
    linear_scores = _dense(x) @ (v * (s2 / (s2 + 50.0))) @ v.T
    served = part.user_vectors(x) @ part.item_table.T
    np.testing.assert_allclose(served, part.alpha * linear_scores, atol=1e-4 * served.max())
    # α puts a typical user's best linear score at the weight, on the cosine's scale
    assert np.median(served.max(axis=1)) == pytest.approx(0.5, rel=0.05)


def test_a_linear_part_needs_per_user_examples_and_one_history():
    from training.linear_part import LinearConfig
    from training.train import TrainConfig

    with pytest.raises(ValueError, match="train with examples 'users'"):
        TrainConfig(linear=LinearConfig(rank=8))
    with pytest.raises(ValueError, match="linear rank must be >= 0"):
        LinearConfig(rank=-1)


@pytest.fixture(scope="module")
def mixed_pair(tmp_path_factory):
    from contracts.dataset import write_dataset
    from indexer.build import IndexSpec
    from indexer.job import JobOptions, run_build_index
    from training.linear_part import LinearConfig
    from training.pipeline import run_training
    from training.synthetic import SyntheticConfig, generate_synthetic

    root = tmp_path_factory.mktemp("linear")
    dataset, _ = generate_synthetic(SyntheticConfig(**SMALL))
    dataset = _history_only(dataset)
    write_dataset(dataset, root / "data", _spec_toml(dataset.spec))
    config = dataclasses.replace(_config(), linear=LinearConfig(rank=8, l2=5.0, weight=0.75))
    model_dir, summary = run_training(dataset, root / "models", config)
    index_dir = run_build_index(model_dir, root / "indexes", IndexSpec("Flat"),
                                JobOptions(items=root / "data", data=root / "data"))
    return dataset, root, model_dir, index_dir, summary


@pytest.mark.slow
def test_the_served_vectors_are_the_towers_and_the_linear_part(mixed_pair):
    _, _, model_dir, _, summary = mixed_pair
    manifest = json.loads((model_dir / "manifest.json").read_text())
    graph = json.loads((model_dir / "user_tower_numpy.json").read_text())
    assert manifest["embedding_dim"] == 32 + 8 and manifest["normalized"] is False
    assert graph["format"] == "two-tower-numpy-user-tower/5"
    assert graph["linear"]["pooling"] == "sum"
    items = np.load(model_dir / "item_embeddings.npy")
    # the towers' part is a unit vector, the linear part follows it
    np.testing.assert_allclose(np.linalg.norm(items[:, :32], axis=1), 1.0, atol=1e-5)
    assert np.abs(items[:, 32:]).max() > 0
    evaluation = summary["evaluation"]
    assert evaluation["model"]["recall@10"] > 2 * evaluation["popularity"]["recall@10"]


@pytest.mark.slow
def test_numpy_tower_equals_the_saved_model_with_a_linear_part(mixed_pair):
    from contracts.model_manifest import load_model_manifest
    from retrieval.numpy_tower import NumpyUserTower
    from training.saved_model_tower import SavedModelUserTower
    from training.user_level import user_examples

    dataset, _, model_dir, _, _ = mixed_pair
    history = user_examples(dataset)["recent_items"][:50].copy()
    history[0, :] = ""  # no history: the linear part adds nothing
    history[1, 0] = "never-seen-item"  # an unknown item adds nothing either
    inputs = {"recent_items": history}
    expected = SavedModelUserTower(load_model_manifest(model_dir))(inputs)
    got = NumpyUserTower.load(model_dir)(inputs)
    assert got.shape == (50, 40)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(got[0, 32:], 0.0)


@pytest.mark.slow
def test_serves_a_user_through_the_mixed_model(mixed_pair, tmp_path):
    assert_serves_a_user(mixed_pair, tmp_path)


def test_the_linear_part_ranks_a_user_s_unseen_group_items_first():
    """Two groups of users, each picking among its own half of the items: the linear
    model alone puts the user's group ahead of the other group."""
    from training.linear_part import Interactions, LinearConfig, fit_linear_part

    rng = np.random.default_rng(3)
    n_users, n_items = 400, 40
    group = np.arange(n_users) % 2
    picks = rng.random((n_users, n_items // 2)) < 0.3
    users, cols = np.nonzero(picks)
    items = cols + (n_items // 2) * group[users]
    x = Interactions.of(users, items, n_users, n_items)
    part = fit_linear_part(x, LinearConfig(rank=4, l2=10.0, weight=1.0))
    scores = part.user_vectors(x) @ part.item_table.T
    own = (np.arange(n_items)[None, :] // (n_items // 2)) == group[:, None]
    assert scores[own].reshape(n_users, -1).min(axis=1).mean() > \
        scores[~own].reshape(n_users, -1).max(axis=1).mean()

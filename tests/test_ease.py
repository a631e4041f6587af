"""EASE (training.ease) against a brute-force oracle and on an obvious co-occurrence
structure; its row in the quality benchmark."""

import numpy as np
import pytest

from benchmarks.quality import run_ease
from training.ease import choose_ease, fit_ease, interaction_matrix
from training.protocols import popularity_ranking, recbole_general


def _two_groups(rng, n_users=200, n_items=10, p=0.6):
    """Users of group 0 pick among items 0-4, group 1 among items 5-9."""
    group = np.arange(n_users) % 2
    half = n_items // 2
    x = (rng.random((n_users, half)) < p).astype(np.float32)
    full = np.zeros((n_users, n_items), np.float32)
    full[group == 0, :half] = x[group == 0]
    full[group == 1, half:] = x[group == 1]
    return full, group


def test_diagonal_is_zero_and_each_column_is_the_ridge_regression_on_the_others():
    rng = np.random.default_rng(0)
    x = (rng.random((60, 8)) < 0.3).astype(np.float32)
    l2 = 3.0
    b = fit_ease(x, l2).weights
    assert np.all(np.diag(b) == 0.0)
    for j in range(x.shape[1]):  # min ||x_j - X_{-j} w||² + λ||w||²
        others = np.delete(np.arange(x.shape[1]), j)
        a = x[:, others].astype(np.float64)
        w = np.linalg.solve(a.T @ a + l2 * np.eye(len(others)), a.T @ x[:, j])
        np.testing.assert_allclose(b[others, j], w, atol=1e-5)


def test_recovers_co_occurrence_a_user_s_unseen_items_of_their_group_rank_first():
    x, group = _two_groups(np.random.default_rng(1))
    b = fit_ease(x, 10.0).weights
    assert b[:5, :5].sum() > 0 and b[5:, 5:].sum() > 0
    assert np.abs(b[:5, 5:]).max() < 1e-6  # the groups never co-occur
    probe = np.zeros((2, 10), np.float32)
    probe[0, 0], probe[1, 7] = 1.0, 1.0
    scores = fit_ease(x, 10.0).scores(probe)
    assert set(np.argsort(-scores[0])[:4]) == {1, 2, 3, 4}
    assert set(np.argsort(-scores[1])[:4]) == {5, 6, 8, 9}


def test_choose_keeps_the_lambda_validation_likes_best_and_refuses_nonpositive():
    x, _ = _two_groups(np.random.default_rng(2))
    model, tried = choose_ease(x, lambda m: -abs(m.l2 - 100.0), lambdas=(10.0, 100.0, 1000.0))
    assert model.l2 == 100.0 and set(tried) == {10.0, 100.0, 1000.0}
    with pytest.raises(ValueError, match="must be > 0"):
        fit_ease(x, 0.0)


def test_interaction_matrix_counts_repeats_once():
    x = interaction_matrix(np.array([0, 0, 1]), np.array([2, 2, 0]), 2, 3)
    np.testing.assert_array_equal(x, [[0, 0, 1], [1, 0, 0]])


def test_quality_row_beats_popularity_on_grouped_users():
    rng = np.random.default_rng(3)
    x, _ = _two_groups(rng, n_users=400, n_items=40, p=0.5)
    users, items = np.nonzero(x)
    split = recbole_general(users, items, np.full(len(users), 5), seed=0, min_count=2)
    row = run_ease(split)
    # a user has ~10 unseen items of their group for 10 slots; popularity mixes both groups
    popularity = popularity_ranking(split, "test").recall[10]
    assert row["test"]["recall@10"] > 0.8 > popularity + 0.2
    assert row["l2"] > 0 and len(row["valid_ndcg@10_by_l2"]) > 1


def test_distilled_targets_are_unseen_top_items_weighing_share_of_the_user_s_items():
    from benchmarks.quality import _matrix, with_ease_targets
    from training.user_level import TARGET_WEIGHTS, TARGETS

    x, _ = _two_groups(np.random.default_rng(4), n_users=100, n_items=20, p=0.5)
    users, items = np.nonzero(x)
    split = recbole_general(users, items, np.full(len(users), 5), seed=0, min_count=2)
    run_ease(split)  # fits the teacher on train
    seen = _matrix(split, split.train)
    held = np.full((split.n_users, int(seen.sum(axis=1).max())), -1, np.int32)
    for u in range(split.n_users):
        rows = np.flatnonzero(seen[u])
        held[u, :len(rows)] = rows
    out = with_ease_targets(split, {TARGETS: held}, k=3, share=0.5, temperature=0.1)
    teacher, weights = out[TARGETS][:, held.shape[1]:], out[TARGET_WEIGHTS]
    assert not seen[np.arange(split.n_users)[:, None], teacher].any()
    np.testing.assert_allclose(weights[:, held.shape[1]:].sum(axis=1),
                               0.5 * seen.sum(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(weights[:, :held.shape[1]], (held >= 0).astype(np.float32))

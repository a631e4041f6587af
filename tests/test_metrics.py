"""Ranking metrics: hand-computed toy cases, the tie rule, and a brute-force oracle."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate import (DEFAULT_KS, evaluate_split, evaluate_split_metrics,
                               split_last_per_user)
from training.metrics import (METRICS, UserItems, evaluate_ranking, popularity_scorer,
                              popularity_scores, top_k, user_metrics)

TOL = 1e-12


def _d(rank: int) -> float:
    """The DCG discount of a 1-based rank."""
    return 1.0 / np.log2(rank + 1)


# 4 users × 6 items. Rankings after masking (ties → lower item row):
#   u0: excl {0}; 1, 2, 3, 4, 5          relevant {2, 4} → hits at ranks 2 and 4
#   u1: excl {4}; 0, 1, 2, 5 (tied .5), 3 relevant {3, 5} → hits at ranks 5 and 4
#   u2: excl {1}; 4, 3, 2, 0, 5          relevant {0, 1} → hit at rank 4; item 1 is masked
#                                        but still one of the 2 relevant items
#   u3: no relevant item → not evaluated
TOY_SCORES = np.array([
    [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
    [0.5, 0.5, 0.5, 0.1, 0.9, 0.5],
    [0.1, 0.9, 0.2, 0.3, 0.8, 0.0],
    [0.3, 0.2, 0.1, 0.0, 0.5, 0.4],
])
TOY_EXCLUDE = [[0], [4], [1], []]
TOY_RELEVANT = [[2, 4], [3, 5], [0, 1], []]
TOY_KS = (1, 3, 5)
IDCG_2 = _d(1) + _d(2)  # two relevant items: 1 + 1/log2(3) = 1.6309297535714575


def test_toy_metrics_per_user_match_the_hand_computation():
    per_user = user_metrics(TOY_SCORES[:3], _dense(TOY_RELEVANT[:3]), _dense(TOY_EXCLUDE[:3]),
                            TOY_KS)
    expected = {  # rows u0, u1, u2; columns K = 1, 3, 5
        "recall": [[0, 1 / 2, 2 / 2],  # u0: top3 {1,2,3} ∋ 2; top5 ∋ 2, 4
                   [0, 0, 2 / 2],      # u1: top3 {0,1,2}; top5 adds 5, 3
                   [0, 0, 1 / 2]],     # u2: only item 0, at rank 4
        "ndcg": [[0, _d(2) / IDCG_2, (_d(2) + _d(4)) / IDCG_2],  # 0.386853, 0.650921
                 [0, 0, (_d(4) + _d(5)) / IDCG_2],               # 0.501266
                 [0, 0, _d(4) / IDCG_2]],                        # 0.264068
        "hit": [[0, 1, 1], [0, 0, 1], [0, 0, 1]],
        "mrr": [[0, 1 / 2, 1 / 2], [0, 0, 1 / 4], [0, 0, 1 / 4]],
    }
    for name in METRICS:
        np.testing.assert_allclose(per_user[name], expected[name], atol=TOL, err_msg=name)


def test_toy_means_skip_users_without_relevant_items():
    got = evaluate_ranking(lambda rows: TOY_SCORES[rows], TOY_RELEVANT, TOY_EXCLUDE, TOY_KS)
    assert got.n_users == 3  # u3 has no relevant item
    # K=3: recall (1/2 + 0 + 0) / 3; ndcg 0.386853 / 3; hit 1/3; mrr (1/2) / 3
    # K=5: recall (1 + 1 + 1/2) / 3 = 0.833333
    #      ndcg (0.650921 + 0.501266 + 0.264068) / 3 = 0.472085
    #      hit 3/3; mrr (1/2 + 1/4 + 1/4) / 3 = 1/3
    expected = {
        "recall": {1: 0.0, 3: 0.5 / 3, 5: 2.5 / 3},
        "ndcg": {1: 0.0, 3: 0.38685280723454163 / 3, 5: 0.47208496257387017},
        "hit": {1: 0.0, 3: 1 / 3, 5: 1.0},
        "mrr": {1: 0.0, 3: 0.5 / 3, 5: 1 / 3},
    }
    for name in METRICS:
        for k in TOY_KS:
            assert getattr(got, name)[k] == pytest.approx(expected[name][k], abs=TOL), (name, k)


def test_ties_go_to_the_lower_item_row_and_short_lists_are_padded():
    scores = np.array([[0.2, 0.5, 0.5, 0.5, 0.1],
                       [1.0, 1.0, 1.0, 1.0, 1.0]])
    exclude = np.array([[False, False, True, False, False],
                        [True, True, True, False, True]])
    np.testing.assert_array_equal(top_k(scores, 3, exclude), [[1, 3, 0], [3, -1, -1]])
    np.testing.assert_array_equal(top_k(scores, 7)[0], [1, 2, 3, 0, 4, -1, -1])


def test_a_constant_scorer_is_not_rewarded_for_ties():
    # All items tie, so the ranking is 0, 1, 2, 3: relevant item 3 is at rank 4, not 1.
    got = evaluate_ranking(lambda rows: np.zeros((len(rows), 4)), [[3]], ks=(1, 4))
    assert got.recall == {1: 0.0, 4: 1.0}
    assert got.mrr[4] == pytest.approx(1 / 4, abs=TOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_ranking_matches_a_brute_force_full_sort(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items, ks = 57, 40, (1, 5, 10, 20, 50)  # 50 > n_items: lists end early
    scores = rng.integers(0, 6, (n_users, n_items)).astype(np.float32)  # many ties
    exclude = [rng.choice(n_items, rng.integers(0, 30), replace=False) for _ in range(n_users)]
    relevant = [rng.choice(n_items, rng.integers(0, 6), replace=False) for _ in range(n_users)]
    got = evaluate_ranking(lambda rows: scores[rows], relevant, exclude, ks, chunk_size=8)
    expected, n = _brute_force(scores, relevant, exclude, ks)
    assert got.n_users == n
    for name in METRICS:
        for k in ks:
            assert getattr(got, name)[k] == pytest.approx(expected[name][k], abs=1e-12)


def test_a_scorer_an_iterator_of_chunks_and_any_chunk_size_agree():
    rng = np.random.default_rng(7)
    scores = rng.normal(size=(23, 30))
    relevant = UserItems.from_pairs(rng.integers(0, 23, 60), rng.integers(0, 30, 60), 23)
    exclude = UserItems.from_pairs(rng.integers(0, 23, 90), rng.integers(0, 30, 90), 23)
    reference = evaluate_ranking(lambda rows: scores[rows], relevant, exclude, (3, 10), 100)
    for size in (1, 5, 23):
        chunks = (scores[i:i + size] for i in range(0, 23, size))
        for got in (evaluate_ranking(chunks, relevant, exclude, (3, 10), size),
                    evaluate_ranking(lambda rows: scores[rows], relevant, exclude, (3, 10), size)):
            assert got.n_users == reference.n_users
            assert got.as_dict() == pytest.approx(reference.as_dict(), abs=1e-12)


def test_a_large_catalogue_is_scored_in_chunks_of_bounded_size(monkeypatch):
    """A Scorer is never asked for more than MAX_CHUNK_SCORES scores at once (1024 users of
    a 1M-item catalogue would be GBs), and the metrics are those of one big chunk."""
    import training.metrics as metrics

    rng = np.random.default_rng(3)
    scores = rng.normal(size=(40, 500))
    relevant = UserItems.from_pairs(rng.integers(0, 40, 80), rng.integers(0, 500, 80), 40)
    reference = evaluate_ranking(lambda rows: scores[rows], relevant, None, (5, 50), 1024)
    asked: list[int] = []

    def scorer(rows):
        asked.append(len(rows) * scores.shape[1])
        return scores[rows]

    monkeypatch.setattr(metrics, "MAX_CHUNK_SCORES", 2_000)  # 4 users of 500 items
    got = evaluate_ranking(scorer, relevant, None, (5, 50), 1024)
    assert max(asked) <= 2_000 and sum(asked) == reference.n_users * 500
    assert got.as_dict() == pytest.approx(reference.as_dict(), abs=1e-12)


def test_user_items_from_pairs_take_and_dense():
    table = UserItems.from_pairs(np.array([2, 0, 2, 0]), np.array([5, 1, 3, 4]), n_users=3)
    np.testing.assert_array_equal(table.indptr, [0, 2, 2, 4])  # user 1 has none
    np.testing.assert_array_equal(table.indices, [1, 4, 5, 3])  # order kept within a user
    taken = table.take(np.array([2, 2, 1]))
    np.testing.assert_array_equal(taken.indptr, [0, 2, 4, 4])
    np.testing.assert_array_equal(taken.indices, [5, 3, 5, 3])
    np.testing.assert_array_equal(table.dense(np.array([0]), 6), [[0, 1, 0, 0, 1, 0]])


def test_popularity_scores_count_training_occurrences():
    counts = popularity_scores(np.array([2, 0, 2, 2]), n_items=4)
    np.testing.assert_array_equal(counts, [1, 0, 3, 0])
    np.testing.assert_array_equal(popularity_scorer(counts)(np.array([5, 9])), [counts, counts])


@pytest.mark.parametrize("call, message", [
    (lambda: top_k(np.array([[0.1, np.nan]]), 1), "NaN"),
    (lambda: evaluate_ranking(iter([np.zeros((2, 3))]), [[0], [1], [2]]), "covered 2 users"),
    (lambda: evaluate_ranking(lambda r: np.zeros((len(r), 3)), [[0]], ks=(0,)), "positive"),
    (lambda: evaluate_ranking(lambda r: np.zeros((len(r), 3)), [[7]]), "n_items = 3"),
])
def test_bad_input_is_reported(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_evaluate_split_keeps_its_output_and_matches_a_brute_force_ranking():
    from training.synthetic import SyntheticConfig, generate_synthetic

    dataset, _ = generate_synthetic(SyntheticConfig(num_users=40, num_items=30,
                                                    interactions_per_user=6, seed=1))
    split = split_last_per_user(dataset)
    rng = np.random.default_rng(0)
    user_emb = rng.normal(size=(int(split.test.sum()), 4)).astype(np.float32)
    item_emb = rng.normal(size=(len(dataset.items["item_id"]), 4)).astype(np.float32)
    recall = evaluate_split(dataset, split, user_emb, item_emb)
    assert set(recall) == {"model", "popularity"}
    assert all(set(by_k) == set(DEFAULT_KS) for by_k in recall.values())

    full = evaluate_split_metrics(dataset, split, user_emb, item_emb, ks=(1, 5, 10))
    relevant, exclude = _events(dataset, split)
    expected, _ = _brute_force(user_emb @ item_emb.T, relevant, exclude, (1, 5, 10))
    for name in METRICS:
        for k in (1, 5, 10):
            assert getattr(full["model"], name)[k] == pytest.approx(expected[name][k], abs=1e-12)


def _dense(lists: list[list[int]], n_items: int = 6) -> np.ndarray:
    out = np.zeros((len(lists), n_items), dtype=bool)
    for row, items in enumerate(lists):
        out[row, items] = True
    return out


def _brute_force(scores, relevant, exclude, ks):
    """Per-user full stable sort with excluded items removed, metrics by their definitions."""
    sums = {name: dict.fromkeys(ks, 0.0) for name in METRICS}
    n = 0
    for row, rel in enumerate(relevant):
        rel = set(int(i) for i in rel)
        if not rel:
            continue
        n += 1
        banned = set(int(i) for i in exclude[row])
        order = [i for i in np.argsort(-scores[row], kind="stable") if i not in banned]
        for k in ks:
            hits = [i in rel for i in order[:k]]
            ideal = sum(1 / np.log2(r + 2) for r in range(min(k, len(rel))))
            sums["recall"][k] += sum(hits) / len(rel)
            sums["ndcg"][k] += sum(h / np.log2(r + 2) for r, h in enumerate(hits)) / ideal
            sums["hit"][k] += float(any(hits))
            sums["mrr"][k] += 1 / (hits.index(True) + 1) if any(hits) else 0.0
    return {name: {k: v / n for k, v in by_k.items()} for name, by_k in sums.items()}, n


def _events(dataset, split):
    """Per test event: [its target item row], and the user's training item rows."""
    ids = list(dataset.items["item_id"].astype(str))
    users = dataset.interactions["user_id"].astype(str)
    items = np.array([ids.index(i) for i in dataset.interactions["item_id"].astype(str)])
    seen = {u: items[split.train & (users == u)] for u in set(users)}
    test_rows = np.flatnonzero(split.test)
    return [[items[r]] for r in test_rows], [seen[users[r]] for r in test_rows]

"""Exact, full-corpus evaluation: every item is ranked for every evaluated user.

The protocol here is temporal leave-last-out: each user's last interaction is the test
event; everything before it is training data, and its history and context come only from
before the event. Items the user interacted with in training are masked from the ranking.
The popularity ranking (training counts) is scored on the same split, side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from training.dataset import Dataset

DEFAULT_KS = (10, 50, 100)


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # bool [n_interactions]
    test: np.ndarray   # bool [n_interactions]


def split_last_per_user(dataset: Dataset) -> Split:
    """The last interaction (by time, then row order) of every user with at least two is test."""
    cols = dataset.spec.columns
    users = dataset.interactions[cols.user_id].astype(str)
    order = np.lexsort((np.arange(len(users)), dataset.interactions[cols.timestamp], users))
    last_in_order = np.ones(len(users), dtype=bool)
    last_in_order[:-1] = users[order][1:] != users[order][:-1]
    first_in_order = np.ones(len(users), dtype=bool)
    first_in_order[1:] = users[order][1:] != users[order][:-1]
    test = np.zeros(len(users), dtype=bool)
    test[order] = last_in_order & ~first_in_order  # users with one event stay in training
    return Split(train=~test, test=test)


def recall_at_k(scores: np.ndarray, targets: np.ndarray, seen: Sequence[np.ndarray],
                ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Fraction of rows whose target item ranks in the top k.

    scores [n, n_items] float, targets [n] int item rows, seen[i] item rows masked for row i.
    """
    scores = scores.astype(np.float32, copy=True)
    for i, rows in enumerate(seen):
        scores[i, rows] = -np.inf
    target_scores = scores[np.arange(len(targets)), targets][:, None]
    rank = (scores > target_scores).sum(axis=1)  # 0 = best; ties favour the target
    return {k: float((rank < k).mean()) for k in ks}


def evaluate_split(dataset: Dataset, split: Split, user_emb: np.ndarray, item_emb: np.ndarray,
                   ks: Sequence[int] = DEFAULT_KS, chunk: int = 2048) -> dict[str, dict[int, float]]:
    """Recall@k of the model (user_emb of the test events · item_emb) and of popularity.

    user_emb [n_test, d] in the order of the test rows; item_emb [n_items, d] in item-table order.
    """
    item_rows = _item_rows(dataset)
    inter = dataset.interactions
    cols = dataset.spec.columns
    train_items = item_rows(inter[cols.item_id][split.train])
    popularity = np.bincount(train_items, minlength=len(item_emb)).astype(np.float32)
    seen_by_user = _seen_by_user(inter[cols.user_id][split.train].astype(str), train_items)
    test_users = inter[cols.user_id][split.test].astype(str)
    targets = item_rows(inter[cols.item_id][split.test])
    totals = {"model": {k: 0.0 for k in ks}, "popularity": {k: 0.0 for k in ks}}
    for start in range(0, len(targets), chunk):
        sl = slice(start, start + chunk)
        seen = [seen_by_user.get(u, np.empty(0, np.int64)) for u in test_users[sl]]
        for name, scores in (("model", user_emb[sl] @ item_emb.T),
                             ("popularity", np.broadcast_to(popularity, (len(seen), len(popularity))))):
            for k, value in recall_at_k(scores, targets[sl], seen, ks).items():
                totals[name][k] += value * len(seen)
    n = max(len(targets), 1)
    return {name: {k: v / n for k, v in by_k.items()} for name, by_k in totals.items()}


def _item_rows(dataset: Dataset):
    """A function mapping item ids to their rows in the item table."""
    ids = dataset.items[dataset.spec.columns.item_id].astype(str)
    lookup = {item: row for row, item in enumerate(ids)}
    return lambda keys: np.fromiter((lookup[str(k)] for k in keys), np.int64, count=len(keys))


def _seen_by_user(users: np.ndarray, item_rows: np.ndarray) -> dict[str, np.ndarray]:
    order = np.argsort(users, kind="stable")
    users_sorted, rows_sorted = users[order], item_rows[order]
    starts = np.flatnonzero(np.r_[True, users_sorted[1:] != users_sorted[:-1]])
    ends = np.r_[starts[1:], len(users_sorted)]
    return {users_sorted[s]: rows_sorted[s:e] for s, e in zip(starts, ends, strict=True)}

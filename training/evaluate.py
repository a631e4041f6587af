"""Exact, full-corpus evaluation: every item is ranked for every evaluated user.

The protocol here is temporal leave-last-out: each user's last interaction is the test
event; everything before it is training data, and its history and context come only from
before the event. Items the user interacted with in training are masked from the ranking.
The popularity ranking (training counts) is scored on the same split, side by side.
Metrics and their tie rule (ties go to the lower item row, not to the target) are in
training.metrics; the protocols behind published comparisons (RecBole ml-1m, ml-100k
temporal leave-one-out) are in training.protocols.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from contracts.dataset import Dataset
from training.metrics import (DEFAULT_CHUNK, RankingMetrics, UserItems, evaluate_ranking,
                              popularity_scorer, popularity_scores)

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


def evaluate_split_metrics(dataset: Dataset, split: Split, user_emb: np.ndarray,
                           item_emb: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                           chunk: int = DEFAULT_CHUNK) -> dict[str, RankingMetrics]:
    """Recall, NDCG, Hit and MRR@k of the model and of popularity on the test events.

    Each test event is ranked on its own: one relevant item (its target), the user's
    training items excluded (training.metrics gives the definitions and the tie rule).
    user_emb [n_test, d] in the order of the test rows; item_emb [n_items, d] in item-table
    order. Popularity is the count of each item among the training interactions.
    """
    item_rows = _item_rows(dataset)
    inter, cols = dataset.interactions, dataset.spec.columns
    train_items = item_rows(inter[cols.item_id][split.train])
    users, user_rows = np.unique(inter[cols.user_id].astype(str), return_inverse=True)
    seen = UserItems.from_pairs(user_rows[split.train], train_items, len(users))
    targets = item_rows(inter[cols.item_id][split.test])
    relevant = UserItems(np.arange(len(targets) + 1), targets)
    exclude = seen.take(user_rows[split.test])
    scorers = {"model": lambda rows: user_emb[rows] @ item_emb.T,
               "popularity": popularity_scorer(popularity_scores(train_items, len(item_emb)))}
    return {name: evaluate_ranking(scorer, relevant, exclude, ks, chunk)
            for name, scorer in scorers.items()}


def evaluate_split(dataset: Dataset, split: Split, user_emb: np.ndarray, item_emb: np.ndarray,
                   ks: Sequence[int] = DEFAULT_KS,
                   chunk: int = DEFAULT_CHUNK) -> dict[str, dict[int, float]]:
    """Recall@k of the model and of popularity: {"model": {k: recall}, "popularity": ...}.

    See :func:`evaluate_split_metrics`, which also gives NDCG, Hit and MRR.
    """
    metrics = evaluate_split_metrics(dataset, split, user_emb, item_emb, ks, chunk)
    return {name: dict(m.recall) for name, m in metrics.items()}


def _item_rows(dataset: Dataset):
    """A function mapping item ids to their rows in the item table."""
    ids = dataset.items[dataset.spec.columns.item_id].astype(str)
    lookup = {item: row for row, item in enumerate(ids)}
    return lambda keys: np.fromiter((lookup[str(k)] for k in keys), np.int64, count=len(keys))

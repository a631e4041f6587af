"""Evaluation protocols: which interactions train a model, which validate it, which test it.

Each protocol is a function returning a :class:`ProtocolSplit`: every interaction as a
dense (user row, item row) pair, and the interaction rows of train, valid and test.
:func:`evaluate_protocol` ranks every item for every user of the valid or test part
(training.metrics); :func:`popularity_ranking` is the baseline under any protocol.

Masking (RecBole's full-sort setting): on valid, the user's train items are excluded from
the ranking; on test, the user's train and valid items.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from contracts.dataset import Dataset
from contracts.errors import DataError
from training.metrics import (KS, RankingMetrics, Scorer, UserItems, evaluate_ranking,
                              popularity_scorer, popularity_scores)

Stage = Literal["valid", "test"]
ML1M_COLUMNS = ("user_id", "item_dense_id", "rating")
ML1M_EXPECTED = {"interactions": 834_449, "users": 6_033, "items": 3_123}
RECBOLE_RATIOS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class ProtocolSplit:
    """Interactions and their split. Rows of ``train``/``valid``/``test`` (int64, ascending)
    index ``users``/``items``; for a protocol over a Dataset they are its interaction rows.

    users, items int64 [n_interactions]: dense user row in [0, n_users), item row in
    [0, n_items). user_ids [n_users], item_ids [n_items]: the id behind each row.
    """

    name: str
    users: np.ndarray
    items: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def items_by_user(self, rows: np.ndarray) -> UserItems:
        """The items of interaction ``rows``, grouped per user row (all n_users rows)."""
        return UserItems.from_pairs(self.users[rows], self.items[rows], self.n_users)

    def held_out(self, stage: Stage) -> tuple[UserItems, UserItems]:
        """(relevant, exclude) per user for ``stage``: its items, and the items masked."""
        if stage == "valid":
            return self.items_by_user(self.valid), self.items_by_user(self.train)
        if stage == "test":
            seen = np.concatenate([self.train, self.valid])
            return self.items_by_user(self.test), self.items_by_user(seen)
        raise ValueError(f"stage must be 'valid' or 'test' (got {stage!r})")


def recbole_ml1m_general(ratings_path: str | Path, seed: int = 2020) -> ProtocolSplit:
    """RecBole's ml-1m general-recommendation protocol on ``ratings_no_timestamps.csv``.

    1. Keep ratings >= 3 (an implicit positive).
    2. Iterative 10-core: drop interactions of users or items with fewer than 10 until no
       count changes. Must leave 834,449 interactions, 6,033 users, 3,123 items, else a
       DataError: the file is not the ml-1m one this protocol is defined on.
    3. Shuffle all interactions (seeded), group them by user keeping the shuffled order,
       and split each user's list 8:1:1 into train / valid / test with RecBole's sizes
       (:func:`ratio_split_sizes`): the first part to train, the next to valid, the rest
       to test.

    RecBole (``eval_args: split RS [0.8,0.1,0.1], order RO, group_by user, mode full``)
    does the same with ``torch.randperm`` and ``Dataset.split_by_ratio``. Differences:
    the shuffle is NumPy's (``default_rng(seed).permutation``), so which interactions land
    in valid/test differs from any RecBole run; the per-user sizes are identical. RecBole
    counts one padding id more for users and items and masks it; here there is none.
    """
    users, items, ratings = _read_dense_ratings(Path(ratings_path))
    split = recbole_general(users, items, ratings, seed, name="recbole-ml1m-general")
    got = {"interactions": len(split.users), "users": split.n_users, "items": split.n_items}
    if got != ML1M_EXPECTED:
        raise DataError(str(ratings_path), f"after ratings >= 3 and 10-core filtering expected "
                        f"{ML1M_EXPECTED} (got {got}); pass ml-1m's ratings_no_timestamps.csv")
    return split


def recbole_general(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, seed: int,
                    min_rating: int = 3, min_count: int = 10,
                    ratios: Sequence[float] = RECBOLE_RATIOS,
                    name: str = "recbole-general") -> ProtocolSplit:
    """Steps 1-3 of :func:`recbole_ml1m_general` on any (user id, item id, rating) arrays
    [n]; ids are ints, rows are assigned in ascending id order."""
    keep = np.asarray(ratings) >= min_rating
    users, items = np.asarray(users)[keep], np.asarray(items)[keep]
    core = k_core(users, items, min_count)
    user_ids, user_rows = np.unique(users[core], return_inverse=True)
    item_ids, item_rows = np.unique(items[core], return_inverse=True)
    order = _shuffled_by_user(user_rows, np.random.default_rng(seed))
    sizes = ratio_split_sizes(np.bincount(user_rows, minlength=len(user_ids)), ratios)
    part = _part_by_position(user_rows[order], sizes)
    train, valid, test = (np.sort(order[part == p]) for p in range(3))
    return ProtocolSplit(name, user_rows.astype(np.int64), item_rows.astype(np.int64),
                         user_ids, item_ids, train, valid, test)


def temporal_leave_one_out(dataset: Dataset) -> ProtocolSplit:
    """Temporal leave-one-out on any canonical Dataset (e.g. ml-100k from convert_ml100k).

    Per user, events are ordered by timestamp, equal timestamps by interaction row. The
    last event is test, the second-last valid, the rest train. A user with two events has
    train and test only; with one, train only (RecBole's leave-one-out, leave_one_num=2).
    Rows are the Dataset's interaction rows; item rows follow its items table (the order
    of ``item_emb``); user rows follow the sorted user ids. Features of an event must come
    from before it: the examples builder (contracts.inputs) guarantees that.
    """
    cols = dataset.spec.columns
    user_ids, users = np.unique(dataset.interactions[cols.user_id].astype(str),
                                return_inverse=True)
    item_ids = dataset.items[cols.item_id].astype(str)
    items = _rows_of(item_ids, dataset.interactions[cols.item_id].astype(str))
    row = np.arange(len(users))
    order = np.lexsort((row, dataset.interactions[cols.timestamp], users))
    from_end, size = _position_from_end(users[order]), _group_sizes(users[order])
    part = np.zeros(len(order), dtype=np.int64)
    part[(from_end == 1) & (size >= 3)] = 1
    part[(from_end == 0) & (size >= 2)] = 2
    train, valid, test = (np.sort(order[part == p]) for p in range(3))
    return ProtocolSplit("ml100k-temporal-leave-one-out", users.astype(np.int64), items,
                         user_ids, item_ids, train, valid, test)


ml100k_temporal_leave_one_out = temporal_leave_one_out


def evaluate_protocol(split: ProtocolSplit, scores: Scorer, stage: Stage = "test",
                      ks: Sequence[int] = KS) -> RankingMetrics:
    """Rank every item for every user with a ``stage`` item, masking per the protocol.

    ``scores(user_rows [b]) -> [b, n_items]`` in the split's user and item rows.
    """
    relevant, exclude = split.held_out(stage)
    return evaluate_ranking(scores, relevant, exclude, ks)


def popularity_ranking(split: ProtocolSplit, stage: Stage = "test",
                       ks: Sequence[int] = KS) -> RankingMetrics:
    """The popularity baseline: items ranked by their count in ``train``, evaluated on
    ``stage``. Like RecBole's Pop it is fitted on the train part only; unlike it, the counts
    are exact: RecBole's ``item_cnt[item] += 1`` over a batch adds 1 per batch however often
    the item occurs in it, so its counts saturate for popular items (simulated on ml-1m
    with one epoch of shuffled 2048-row batches: Recall@10 0.003-0.005 lower, NDCG@10
    0.010-0.013 lower)."""
    counts = popularity_scores(split.items[split.train], split.n_items)
    return evaluate_protocol(split, popularity_scorer(counts), stage, ks)


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """bool [n]: the interactions left after repeatedly dropping those whose user or item
    has fewer than ``k`` of the remaining ones, until no count changes (RecBole's
    ``_filter_by_inter_num``: both counts are taken, then both filters applied, per round).
    The result is the largest subset where every user and item has >= k: it does not
    depend on the order of removal."""
    _, users = np.unique(users, return_inverse=True)
    _, items = np.unique(items, return_inverse=True)
    keep = np.ones(len(users), dtype=bool)
    while True:
        user_count = np.bincount(users[keep], minlength=users.max(initial=-1) + 1)
        item_count = np.bincount(items[keep], minlength=items.max(initial=-1) + 1)
        drop = keep & ((user_count[users] < k) | (item_count[items] < k))
        if not drop.any():
            return keep
        keep &= ~drop


def ratio_split_sizes(n: np.ndarray, ratios: Sequence[float] = RECBOLE_RATIOS) -> np.ndarray:
    """int64 [len(n), len(ratios)]: how many of a user's n interactions go to each part.

    RecBole's ``Dataset._calcu_split_ids``: ratios are normalised by their sum; every part
    but the first gets ``int(ratio * n)``, the first the rest. Then, from the last part
    backwards, a part whose ``ratio * n`` is in (0, 1) takes one from the first part, as
    long as the first has more than one (the loop stops at the first part of size <= 1).
    For 8:1:1: n=10 → 8/1/1, 11 → 9/1/1, 3 → 1/1/1, 2 → 1/0/1, 1 → 1/0/0.
    """
    total = sum(ratios)  # Python's left-to-right sum, as RecBole
    ratios = np.array([r / total for r in ratios], dtype=np.float64)
    n = np.asarray(n, dtype=np.int64)
    exact = ratios[None, :] * n[:, None]
    sizes = np.floor(exact).astype(np.int64)
    sizes[:, 0] = n - sizes[:, 1:].sum(axis=1)
    live = np.ones(len(n), dtype=bool)
    for i in range(1, len(ratios)):
        live &= sizes[:, 0] > 1
        bump = live & (exact[:, -i] > 0) & (exact[:, -i] < 1)
        sizes[bump, -i] += 1
        sizes[bump, 0] -= 1
    return sizes


def _read_dense_ratings(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``user_id,item_dense_id,rating`` CSV → three int64 [n] arrays."""
    types = {c: pa.int64() for c in ML1M_COLUMNS}
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(str(path), f"cannot read the ratings: {exc}") from exc
    if tuple(table.column_names) != ML1M_COLUMNS:
        raise DataError(str(path), f"expected columns {ML1M_COLUMNS} (got "
                        f"{tuple(table.column_names)})", line=1)
    return tuple(table.column(c).to_numpy().astype(np.int64) for c in ML1M_COLUMNS)


def _shuffled_by_user(users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Interaction rows grouped by user row, each user's rows in a random order."""
    perm = rng.permutation(len(users))
    return perm[np.argsort(users[perm], kind="stable")]


def _part_by_position(grouped_users: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """int [n]: the part (0, 1, 2, ...) of each row of a by-user grouping, from its position
    in its user's group and the user's part sizes [n_users, n_parts]."""
    position = _group_sizes(grouped_users) - 1 - _position_from_end(grouped_users)
    bounds = np.cumsum(sizes, axis=1)[grouped_users]  # [n, n_parts]
    return (position[:, None] >= bounds[:, :-1]).sum(axis=1)


def _position_from_end(grouped: np.ndarray) -> np.ndarray:
    """int64 [n]: for keys grouped contiguously, how many rows of the group follow each."""
    if len(grouped) == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.r_[grouped[1:] != grouped[:-1], True]
    end_index = np.flatnonzero(ends)
    group = np.cumsum(np.r_[0, ends[:-1]])
    return end_index[group] - np.arange(len(grouped))


def _group_sizes(grouped: np.ndarray) -> np.ndarray:
    """int64 [n]: the size of each row's group, for keys grouped contiguously."""
    if len(grouped) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.r_[True, grouped[1:] != grouped[:-1]]
    group = np.cumsum(starts) - 1
    return np.bincount(group)[group]


def _rows_of(ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """int64 rows of ``keys`` in ``ids`` (unique); a key not in ``ids`` is a DataError."""
    order = np.argsort(ids)
    pos = np.clip(np.searchsorted(ids[order], keys), 0, max(len(ids) - 1, 0))
    found = ids[order][pos] == keys if len(ids) else np.zeros(len(keys), dtype=bool)
    if not found.all():
        raise DataError("interactions", f"item {keys[~found][0]!r} is not in the items table")
    return order[pos].astype(np.int64)

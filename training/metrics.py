"""Exact full-corpus ranking metrics: every item is ranked for every evaluated user.

Vocabulary: ``scores [n_users, n_items]`` float, one row per user; ``relevant`` the user's
held-out items; ``exclude`` the items removed from the user's ranking (their training
history). Both are :class:`UserItems`, a CSR layout of item rows per user.

Definitions (those of RecBole's full-sort evaluation; ``R_u`` the set of relevant items,
``hit_i`` = 1 when the item at rank i (1-based) is relevant):

    Recall@K = sum_{i<=K} hit_i / |R_u|
    NDCG@K   = DCG / IDCG,  DCG = sum_{i<=K} hit_i / log2(i + 1),
               IDCG = sum_{i<=min(K, |R_u|)} 1 / log2(i + 1)          (binary relevance)
    Hit@K    = 1 if any hit_i = 1 for i <= K, else 0
    MRR@K    = 1 / (rank of the first relevant item) if it is within K, else 0

Each is computed per user and averaged over the users with at least one relevant item;
users without any are skipped. ``relevant`` is a set: a repeated item counts once.

Ranking rule:
- excluded items are removed from the ranking: they never occupy a top-K slot, and a
  relevant item that is also excluded still counts in |R_u| but can never be a hit;
- a score of -inf means "not ranked" as well; NaN scores are an error;
- ties: equal scores are ordered by ascending item row. The rule ignores relevance, so a
  constant scorer is not rewarded; it is deterministic, unlike torch.topk in RecBole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

KS: tuple[int, ...] = (10, 20, 50, 100)
METRICS: tuple[str, ...] = ("recall", "ndcg", "hit", "mrr")
DEFAULT_CHUNK = 1024
MAX_CHUNK_SCORES = 1 << 24  # a Scorer's chunk holds at most this many scores (64 MB float32)

Scorer = Callable[[np.ndarray], np.ndarray]
"""user rows int64 [b] → scores [b, n_items] float."""


@dataclass(frozen=True)
class UserItems:
    """Item rows per user in CSR form: user u's items are ``indices[indptr[u]:indptr[u+1]]``.

    indptr int64 [n_users + 1], starting at 0 and non-decreasing; indices int64 [nnz] >= 0.
    """

    indptr: np.ndarray
    indices: np.ndarray

    def __post_init__(self) -> None:
        indptr, indices = np.asarray(self.indptr), np.asarray(self.indices)
        if indptr.ndim != 1 or len(indptr) == 0 or indptr[0] != 0 or indptr[-1] != len(indices):
            raise ValueError(f"indptr must run from 0 to len(indices) = {len(indices)} "
                             f"(got {indptr[:1].tolist()}..{indptr[-1:].tolist()})")
        if (np.diff(indptr) < 0).any() or (indices < 0).any():
            raise ValueError("indptr must be non-decreasing and indices non-negative")
        object.__setattr__(self, "indptr", indptr.astype(np.int64, copy=False))
        object.__setattr__(self, "indices", indices.astype(np.int64, copy=False))

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, n_users: int) -> UserItems:
        """From parallel arrays of (user row, item row); each user's items keep their order."""
        users = np.asarray(users, dtype=np.int64)
        if len(users) and (users.min() < 0 or users.max() >= n_users):
            raise ValueError(f"user rows must be in [0, {n_users}) "
                             f"(got {users.min()}..{users.max()})")
        order = np.argsort(users, kind="stable")
        counts = np.bincount(users, minlength=n_users)
        return cls(np.r_[0, np.cumsum(counts)], np.asarray(items, dtype=np.int64)[order])

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int] | np.ndarray]) -> UserItems:
        lengths = np.fromiter((len(x) for x in lists), np.int64, len(lists))
        parts = [np.asarray(x, dtype=np.int64).reshape(-1) for x in lists]
        return cls(np.r_[0, np.cumsum(lengths)], np.concatenate(parts) if parts else
                   np.empty(0, np.int64))

    def take(self, rows: np.ndarray) -> UserItems:
        """The item lists of ``rows`` (int [m], repeats allowed), as a new [m]-user table."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        indptr = np.r_[0, np.cumsum(lengths)]
        gather = np.repeat(self.indptr[rows] - indptr[:-1], lengths) + np.arange(indptr[-1])
        return UserItems(indptr, self.indices[gather])

    def dense(self, rows: np.ndarray, n_items: int) -> np.ndarray:
        """bool [len(rows), n_items]: True where the item belongs to the row's user."""
        sub = self.take(rows)
        if len(sub.indices) and sub.indices.max() >= n_items:
            raise ValueError(f"item rows must be < n_items = {n_items} "
                             f"(got {sub.indices.max()})")
        out = np.zeros((len(rows), n_items), dtype=bool)
        out[np.repeat(np.arange(len(rows)), sub.lengths), sub.indices] = True
        return out


def as_user_items(value: UserItems | Sequence[Sequence[int] | np.ndarray]) -> UserItems:
    """A UserItems as is; a list of per-user item arrays converted."""
    return value if isinstance(value, UserItems) else UserItems.from_lists(value)


@dataclass(frozen=True)
class RankingMetrics:
    """Means over ``n_users`` evaluated users, each a {K: value} dict."""

    recall: dict[int, float]
    ndcg: dict[int, float]
    hit: dict[int, float]
    mrr: dict[int, float]
    n_users: int

    def as_dict(self) -> dict[str, float]:
        """Flat {"recall@10": ..., "ndcg@10": ..., ...}."""
        return {f"{name}@{k}": v for name in METRICS for k, v in getattr(self, name).items()}


def top_k(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """The k best item rows per user, best first: int64 [n, k].

    scores [n, n_items] float; exclude bool [n, n_items] or None. Ties go to the lower item
    row. Slots left when fewer than k items are rankable (not excluded, not -inf) hold -1.
    """
    scores = _checked_scores(scores, exclude)
    n, n_items = scores.shape
    width = min(k, n_items)
    ranked = np.full((n, k), -1, dtype=np.int64)
    if width == 0 or n == 0:
        return ranked
    kth = np.partition(scores, n_items - width, axis=1)[:, n_items - width, None]
    above = scores > kth
    at = scores == kth
    room = width - above.sum(axis=1, keepdims=True)
    chosen = above | (at & (np.cumsum(at, axis=1) <= room))  # exactly `width` per row
    cols = np.nonzero(chosen)[1].reshape(n, width)  # ascending item row within each row
    vals = np.take_along_axis(scores, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")  # stable: ties keep ascending rows
    best = np.take_along_axis(cols, order, axis=1)
    best[np.take_along_axis(vals, order, axis=1) == -np.inf] = -1
    ranked[:, :width] = best
    return ranked


def user_metrics(scores: np.ndarray, relevant: np.ndarray, exclude: np.ndarray | None = None,
                 ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """Per-user metrics: {"recall"|"ndcg"|"hit"|"mrr": float64 [n, len(ks)]}.

    scores [n, n_items] float; relevant, exclude bool [n, n_items]. Rows without a relevant
    item get NaN (they are not evaluated).
    """
    ks = _checked_ks(ks)
    ranked = top_k(scores, max(ks), exclude)
    hits = np.take_along_axis(relevant, np.maximum(ranked, 0), axis=1) & (ranked >= 0)
    return _metrics_from_hits(hits, relevant.sum(axis=1), ks)


def evaluate_ranking(scores: Scorer | Iterable[np.ndarray],
                     relevant: UserItems | Sequence[Sequence[int] | np.ndarray],
                     exclude: UserItems | Sequence[Sequence[int] | np.ndarray] | None = None,
                     ks: Sequence[int] = KS, chunk_size: int = DEFAULT_CHUNK) -> RankingMetrics:
    """Mean Recall/NDCG/Hit/MRR@K over the users of ``relevant`` that have relevant items.

    ``scores`` is either a :data:`Scorer` (called with ascending user rows, ``chunk_size``
    at a time, only for users with relevant items: e.g. ``lambda u: user_emb[u] @ item_emb.T``)
    or an iterable of score chunks [b, n_items] covering users 0..n_users-1 in order.
    ``relevant`` and ``exclude`` hold item rows per user (UserItems or a list of arrays).
    Memory: a few [chunk_size, n_items] arrays at a time (1024 × 3,700 items is ~30 MB); a
    Scorer's chunks are cut to MAX_CHUNK_SCORES scores (16 users at 1M items), so a large
    catalogue is evaluated in bounded memory. An iterable sets its own chunk sizes.
    """
    ks = _checked_ks(ks)
    relevant = as_user_items(relevant)
    exclude = None if exclude is None else as_user_items(exclude)
    if exclude is not None and exclude.n_users != relevant.n_users:
        raise ValueError(f"exclude has {exclude.n_users} users; relevant has {relevant.n_users}")
    sums = {name: np.zeros(len(ks)) for name in METRICS}
    n_evaluated = 0
    for rows, chunk in _score_chunks(scores, relevant, chunk_size):
        n_items = chunk.shape[1]
        mask = None if exclude is None else exclude.dense(rows, n_items)
        per_user = user_metrics(chunk, relevant.dense(rows, n_items), mask, ks)
        keep = relevant.lengths[rows] > 0
        for name in METRICS:
            sums[name] += per_user[name][keep].sum(axis=0)
        n_evaluated += int(keep.sum())
    denominator = max(n_evaluated, 1)
    means = {name: dict(zip(ks, (sums[name] / denominator).tolist(), strict=True))
             for name in METRICS}
    return RankingMetrics(**means, n_users=n_evaluated)


def popularity_scores(train_items: np.ndarray, n_items: int) -> np.ndarray:
    """float64 [n_items]: how often each item row occurs in ``train_items`` (int [n])."""
    return np.bincount(np.asarray(train_items, dtype=np.int64), minlength=n_items).astype(
        np.float64)


def popularity_scorer(item_scores: np.ndarray) -> Scorer:
    """A Scorer giving every user the same item scores [n_items] (e.g. popularity_scores)."""
    item_scores = np.asarray(item_scores)
    return lambda rows: np.broadcast_to(item_scores, (len(rows), len(item_scores)))


def _metrics_from_hits(hits: np.ndarray, n_relevant: np.ndarray,
                       ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """hits bool [n, max(ks)] in rank order; n_relevant int [n] → per-user [n, len(ks)]."""
    n = len(hits)
    discount = 1.0 / np.log2(np.arange(2, hits.shape[1] + 2))  # rank i → 1 / log2(i + 1)
    dcg = np.cumsum(hits * discount, axis=1)
    ideal = np.cumsum(discount)
    n_hits = np.cumsum(hits, axis=1)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, np.iinfo(np.int64).max)
    out = {name: np.full((n, len(ks)), np.nan) for name in METRICS}
    ok = n_relevant > 0
    for j, k in enumerate(ks):
        out["recall"][ok, j] = n_hits[ok, k - 1] / n_relevant[ok]
        out["ndcg"][ok, j] = dcg[ok, k - 1] / ideal[np.minimum(k, n_relevant[ok]) - 1]
        out["hit"][ok, j] = n_hits[ok, k - 1] > 0
        out["mrr"][ok, j] = np.where(first[ok] <= k, 1.0 / first[ok], 0.0)
    return out


def _score_chunks(scores: Scorer | Iterable[np.ndarray], relevant: UserItems,
                  chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(user rows [b], scores [b, n_items]) chunks, from a Scorer or an iterable of chunks."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    if callable(scores):
        users = np.flatnonzero(relevant.lengths > 0)
        if len(users) == 0:
            return
        # One user first, to learn the catalogue size: 1024 users × 1M items would be
        # several GB of scores, masks and ranks at once.
        first = _as_matrix(scores(users[:1]), 1)
        yield users[:1], first
        chunk_size = max(1, min(chunk_size, MAX_CHUNK_SCORES // max(first.shape[1], 1)))
        for start in range(1, len(users), chunk_size):
            rows = users[start:start + chunk_size]
            yield rows, _as_matrix(scores(rows), len(rows))
        return
    start = 0
    for chunk in scores:
        chunk = _as_matrix(chunk, None)
        rows = np.arange(start, start + len(chunk))
        if rows[-1:].size and rows[-1] >= relevant.n_users:
            raise ValueError(f"score chunks cover more users than relevant has "
                             f"({relevant.n_users})")
        yield rows, chunk
        start += len(chunk)
    if start != relevant.n_users:
        raise ValueError(f"score chunks covered {start} users; relevant has {relevant.n_users}")


def _as_matrix(chunk: np.ndarray, n_rows: int | None) -> np.ndarray:
    chunk = np.asarray(chunk)
    if chunk.ndim != 2 or (n_rows is not None and len(chunk) != n_rows):
        raise ValueError(f"scores must be [{n_rows or 'b'}, n_items] (got shape {chunk.shape})")
    return chunk


def _checked_scores(scores: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n_users, n_items] (got shape {scores.shape})")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; expected finite scores (or -inf for unranked)")
    if exclude is None:
        return scores
    if exclude.shape != scores.shape:
        raise ValueError(f"exclude must have the shape of scores {scores.shape} "
                         f"(got {exclude.shape})")
    return np.where(exclude, -np.inf, scores).astype(scores.dtype, copy=False)


def _checked_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs, e.g. {KS} (got {ks})")
    return ks

"""A closed-form low-rank linear model served beside the learned towers, in the same
dot product (issue 21, item 4: "a mix of EASE's low-rank factors with the trained towers").

With X the binary user × item matrix of training interactions and X ≈ U S Vᵀ its rank-r
truncated SVD, the linear model scores a user with items x (their row of X)::

    x · V diag(s² / (s² + λ)) · Vᵀ

the rank-r ridge regression of X on itself (an autoencoder with a linear encoder and
decoder: λ shrinks the weak directions as EASE's λ does its weights, without EASE's dense
n_items² matrix, so it fits a catalogue of millions). Beside towers whose outputs are unit
vectors (cosine scores), the served vectors are::

    user  [ tower(user) , α · Σ_{i ∈ history} V_i diag(s²/(s²+λ)) ]      (d + r)
    item  [ tower(item) , V_i ]

so one inner product is the cosine plus α times the linear score: an ensemble of the two
models in one ANN search. α = ``weight`` / (the median over users of their best linear
score), so ``weight`` is on the cosine's scale (1: the linear model's top score for a
typical user weighs as much as a perfect cosine). λ and ``weight`` are chosen on
validation (benchmarks.quality); ``rank`` adds r to the served dimension.

The SVD is exact when users or items number at most EXACT_LIMIT: the eigenvectors of the
smaller Gram matrix (XᵀX or XXᵀ, float64, built from dense blocks of X). Otherwise it is
randomized (Halko, Martinsson & Tropp 2011: a Gaussian sketch twice the rank wide, power
iterations, then an exact SVD of the small projected matrix) over the interaction pairs,
NumPy only: memory O((n_users + n_items) · r), no dense X.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EXACT_LIMIT = 8192  # users or items: the exact SVD through the smaller Gram matrix
POWER_ITERATIONS = 4  # randomized: (X Xᵀ)^q sharpens the spectrum
BLOCK_VALUES = 1 << 25  # a dense block of X has at most this many entries
SCALE_USERS = 512  # users sampled to set α's scale


@dataclass(frozen=True)
class LinearConfig:
    """``rank`` 0: no linear part. See the module docstring for ``l2`` (λ) and ``weight``."""

    rank: int = 0
    l2: float = 3000.0
    weight: float = 0.75

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"linear rank must be >= 0 (got {self.rank})")
        if not self.l2 >= 0:
            raise ValueError(f"linear l2 must be >= 0 (got {self.l2})")
        if not self.weight > 0:
            raise ValueError(f"linear weight must be > 0 (got {self.weight})")


@dataclass(frozen=True)
class Interactions:
    """X as its pairs: user rows and item rows (catalogue order), each pair counted once."""

    users: np.ndarray  # int64 [m], sorted
    items: np.ndarray  # int64 [m]
    n_users: int
    n_items: int

    @classmethod
    def of(cls, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int
           ) -> Interactions:
        users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
        if users.shape != items.shape:
            raise ValueError(f"users {users.shape} and items {items.shape} differ in shape")
        if users.size and (users.min() < 0 or users.max() >= n_users
                           or items.min() < 0 or items.max() >= n_items):
            raise ValueError("a user or item row is outside [0, n_users) × [0, n_items)")
        pairs = np.unique(users * n_items + items)  # sorted by user, then item; repeats once
        return cls(pairs // n_items, pairs % n_items, n_users, n_items)

    @classmethod
    def of_targets(cls, targets: np.ndarray, n_items: int) -> Interactions:
        """From per-user rows of item rows padded with -1 (training.user_level.TARGETS)."""
        targets = np.asarray(targets)
        users, slots = np.nonzero(targets >= 0)
        return cls.of(users, targets[users, slots], len(targets), n_items)

    def times(self, m: np.ndarray) -> np.ndarray:
        """X · m: m [n_items, k] → [n_users, k]."""
        return _segment_sums(m[self.items], self.users, self.n_users)

    def transposed_times(self, m: np.ndarray) -> np.ndarray:
        """Xᵀ · m: m [n_users, k] → [n_items, k]."""
        order = np.argsort(self.items, kind="stable")
        return _segment_sums(m[self.users[order]], self.items[order], self.n_items)


@dataclass(frozen=True)
class LowRank:
    """The top ``rank`` singular values [r] and right singular vectors [n_items, r] of X."""

    singular_values: np.ndarray
    item_vectors: np.ndarray

    def user_table(self, l2: float) -> np.ndarray:
        """[n_items, r]: V diag(s² / (s² + λ)), summed over a user's items for their part."""
        s2 = self.singular_values.astype(np.float64) ** 2
        return (self.item_vectors * (s2 / (s2 + l2)).astype(np.float32)).astype(np.float32)


def low_rank(x: Interactions, rank: int, seed: int = 0) -> LowRank:
    """The rank-``rank`` truncated SVD of X by randomized range finding."""
    if not 0 < rank <= min(x.n_users, x.n_items):
        raise ValueError(f"linear rank must be in [1, min(users, items)] = "
                         f"[1, {min(x.n_users, x.n_items)}] (got {rank})")
    if min(x.n_users, x.n_items) <= EXACT_LIMIT:
        return _exact(x, rank)
    width = min(2 * rank, x.n_users, x.n_items)
    rng = np.random.default_rng(seed)
    basis = _orthonormal(x.times(rng.standard_normal((x.n_items, width)).astype(np.float32)))
    for _ in range(POWER_ITERATIONS):
        basis = _orthonormal(x.times(_orthonormal(x.transposed_times(basis))))
    projected = x.transposed_times(basis).T  # Qᵀ X: [width, n_items]
    _, s, vt = np.linalg.svd(projected.astype(np.float64), full_matrices=False)
    return LowRank(s[:rank].astype(np.float32), np.ascontiguousarray(vt[:rank].T, np.float32))


@dataclass(frozen=True)
class LinearPart:
    """The served tables, catalogue rows: ``user_table`` already multiplied by α."""

    user_table: np.ndarray  # [n_items, r] float32
    item_table: np.ndarray  # [n_items, r] float32
    config: LinearConfig
    alpha: float

    def user_vectors(self, x: Interactions) -> np.ndarray:
        """[n_users, r]: each user's part from their items."""
        return x.times(self.user_table)


def linear_part(factors: LowRank, x: Interactions, config: LinearConfig,
                seed: int = 0) -> LinearPart:
    """The served tables for λ = config.l2 and weight = config.weight, α set on a sample of
    the users of X (see the module docstring)."""
    table = factors.user_table(config.l2)
    users = np.flatnonzero(np.bincount(x.users, minlength=x.n_users))
    if users.size == 0:
        raise ValueError("the linear part needs at least one interaction")
    sample = np.random.default_rng(seed).choice(users, min(SCALE_USERS, users.size),
                                                replace=False)
    keep = np.isin(x.users, sample)
    sub = Interactions(np.searchsorted(np.sort(sample), x.users[keep]), x.items[keep],
                       sample.size, x.n_items)
    best = (sub.times(table) @ factors.item_vectors.T).max(axis=1)
    typical = float(np.median(best))
    if not typical > 0:
        raise ValueError(f"the linear model's median best score is {typical}: too few "
                         "interactions for a linear part")
    alpha = config.weight / typical
    return LinearPart((table * np.float32(alpha)).astype(np.float32), factors.item_vectors,
                      config, alpha)


def fit_linear_part(x: Interactions, config: LinearConfig, seed: int = 0) -> LinearPart:
    return linear_part(low_rank(x, config.rank, seed), x, config, seed)


def _exact(x: Interactions, rank: int) -> LowRank:
    """Through the eigenvectors of the smaller of XᵀX and XXᵀ (float64)."""
    by_items = x.n_items <= x.n_users
    n = x.n_items if by_items else x.n_users
    rows, cols = (x.users, x.items) if by_items else (x.items, x.users)
    present, rows = np.unique(rows, return_inverse=True)  # rows without a 1 add nothing
    other = len(present)
    gram = np.zeros((n, n), np.float64)
    step = max(1, BLOCK_VALUES // n)
    for start in range(0, other, step):  # dense blocks of X's present users (or items)
        end = min(other, start + step)
        keep = (rows >= start) & (rows < end)
        block = np.zeros((end - start, n), np.float64)
        block[rows[keep] - start, cols[keep]] = 1.0
        gram += block.T @ block
    values, vectors = np.linalg.eigh(gram)  # ascending
    top = np.argsort(values)[::-1][:rank]
    s = np.sqrt(np.maximum(values[top], 0.0))
    if by_items:
        v = vectors[:, top]
    else:  # V = Xᵀ U / s
        v = x.transposed_times(vectors[:, top].astype(np.float32)) / np.maximum(s, 1e-12)
    return LowRank(s.astype(np.float32), np.ascontiguousarray(v, np.float32))


def _orthonormal(m: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(m.astype(np.float64))
    return q.astype(np.float32)


def _segment_sums(values: np.ndarray, segments: np.ndarray, n: int) -> np.ndarray:
    """Rows of ``values`` summed by ``segments`` (sorted ascending) → [n, k]."""
    out = np.zeros((n, values.shape[1]), np.float32)
    if len(segments) == 0:
        return out
    starts = np.flatnonzero(np.r_[True, segments[1:] != segments[:-1]])
    out[segments[starts]] = np.add.reduceat(values, starts, axis=0)
    return out

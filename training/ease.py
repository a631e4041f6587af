"""EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"): a linear
item-to-item model in closed form, the strongest simple baseline on MovieLens.

With X the binary user × item matrix of training interactions and λ > 0::

    P = (XᵀX + λI)⁻¹,   B = I − P · diagMat(1 / diag(P)),   so diag(B) = 0

and a user's scores are ``x_u B`` (x_u their row of X). B is dense [n_items, n_items]:
this is for catalogues of thousands to a few tens of thousands of items (the inverse is
O(n_items³), float64 for accuracy; B is kept as float32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

LAMBDAS = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)  # a grid to choose λ from on validation


@dataclass(frozen=True)
class Ease:
    """weights B float32 [n_items, n_items] with a zero diagonal; ``l2`` the λ it was fit with."""

    weights: np.ndarray
    l2: float

    def scores(self, x: np.ndarray) -> np.ndarray:
        """x [n, n_items] (0/1 rows of users) → scores [n, n_items] float32."""
        return np.asarray(x, np.float32) @ self.weights


def interaction_matrix(users: np.ndarray, items: np.ndarray, n_users: int,
                       n_items: int) -> np.ndarray:
    """X float32 [n_users, n_items]: 1 where (user row, item row) occurs (repeats count once)."""
    x = np.zeros((n_users, n_items), np.float32)
    x[np.asarray(users, np.int64), np.asarray(items, np.int64)] = 1.0
    return x


def fit_ease(x: np.ndarray, l2: float) -> Ease:
    """The closed form on X [n_users, n_items] (0/1) with L2 weight ``l2`` (λ > 0)."""
    if not l2 > 0:
        raise ValueError(f"l2 (λ) must be > 0 (got {l2})")
    x = np.asarray(x, np.float64)
    gram = x.T @ x
    gram[np.diag_indices_from(gram)] += l2
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]  # B = I − P diagMat(1/diag P): off-diagonal −P_ij / P_jj
    b[np.diag_indices_from(b)] = 0.0
    return Ease(b.astype(np.float32), float(l2))


def choose_ease(x: np.ndarray, validate: Callable[[Ease], float],
                lambdas: Sequence[float] = LAMBDAS) -> tuple[Ease, dict[float, float]]:
    """Fits EASE for every λ in ``lambdas`` on X and keeps the one ``validate`` (e.g. the
    validation NDCG@10) scores highest → (model, {λ: validation score})."""
    if not lambdas:
        raise ValueError("lambdas must name at least one λ")
    best, tried = None, {}
    for l2 in lambdas:
        model = fit_ease(x, l2)
        tried[float(l2)] = float(validate(model))
        if best is None or tried[float(l2)] > tried[best.l2]:
            best = model
    return best, tried

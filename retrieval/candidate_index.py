"""Nearest-item search over a loaded index artifact, with exclusions.

Excluded ids are filtered after the search; the search over-fetches by the number of
exclusions the index actually holds, so k candidates come back whenever the index has them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from indexer.artifact import IndexArtifact
from indexer.build import search_parameters


@dataclass(frozen=True)
class Candidates:
    item_ids: list[str]
    scores: list[float]


class CandidateIndex:
    def __init__(self, artifact: IndexArtifact) -> None:
        self.artifact = artifact
        self.item_ids = artifact.item_ids
        self._row_of = {item: row for row, item in enumerate(artifact.item_ids.tolist())}

    @property
    def size(self) -> int:
        return len(self.item_ids)

    def search(self, user_emb: np.ndarray, k: int, exclude: Iterable[frozenset[str]]) -> list[Candidates]:
        """user_emb [n, d] float32; one exclusion set per row → n candidate lists of ≤ k."""
        excluded_rows = [self._rows(ids) for ids in exclude]
        fetch_k = min(self.size, k + max((len(r) for r in excluded_rows), default=0))
        if fetch_k == 0:
            return [Candidates([], []) for _ in excluded_rows]
        index = self.artifact.index
        scores, rows = index.search(np.ascontiguousarray(user_emb, dtype=np.float32), fetch_k,
                                    params=search_parameters(index, self.artifact.spec, fetch_k))
        return [self._keep(s, r, ex, k) for s, r, ex in zip(scores, rows, excluded_rows, strict=True)]

    def _rows(self, item_ids: frozenset[str]) -> set[int]:
        return {self._row_of[i] for i in item_ids if i in self._row_of}

    def _keep(self, scores: np.ndarray, rows: np.ndarray, excluded: set[int], k: int) -> Candidates:
        keep = [(int(r), float(s)) for s, r in zip(scores, rows, strict=True)
                if r >= 0 and int(r) not in excluded][:k]
        return Candidates([str(self.item_ids[r]) for r, _ in keep], [s for _, s in keep])

"""Exact inner-product search, streamed: the oracle every approximate index is held to.

``ExactTopK`` folds chunks of item embeddings into a running top-k per query, so the
ground truth of the recall queries is computed in the same pass that fills the index and
never needs the whole embedding matrix in memory.
"""

from __future__ import annotations

import faiss
import numpy as np

from indexer.source import EmbeddingSource


class ExactTopK:
    """Running top-k by inner product for queries xq [nq, d] float32.

    Not faiss.contrib.exhaustive_search.knn_ground_truth: it pulls chunks from an iterator
    and copies each into an IndexFlat (+66 MB peak RSS for 1M×64 items in 262,144-row
    chunks), while this takes the chunks the index build pushes, searched in place.
    """

    def __init__(self, xq: np.ndarray, k: int) -> None:
        self.xq = np.ascontiguousarray(xq, dtype=np.float32)
        self.k = k
        self._heap = faiss.ResultHeap(len(self.xq), k, keep_max=True)

    def add(self, chunk: np.ndarray, first_row: int) -> None:
        """Fold in item_emb rows [first_row, first_row + len(chunk))."""
        k = min(self.k, len(chunk))
        scores, rows = faiss.knn(self.xq, np.ascontiguousarray(chunk), k,
                                 metric=faiss.METRIC_INNER_PRODUCT)
        self._heap.add_result(scores, rows + first_row)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(D [nq, k] float32 scores best first, I [nq, k] int64 rows)."""
        self._heap.finalize()
        return self._heap.D, self._heap.I


def exact_search(source: EmbeddingSource, xq: np.ndarray, k: int,
                 chunk_size: int = 262144) -> tuple[np.ndarray, np.ndarray]:
    top = ExactTopK(xq, min(k, source.num_items))
    first = 0
    for chunk in source.chunks(chunk_size):
        top.add(chunk, first)
        first += len(chunk)
    return top.result()


def recall_at_k(truth: np.ndarray, found: np.ndarray) -> float:
    """Fraction of the exact top-k (truth [nq, k]) that the index returned (found [nq, ≥k]).

    Faiss's own intersection measure; found's -1 ("fewer than k found") never counts, as
    truth holds only real rows (k ≤ number of items).
    """
    # imported here: it pulls in unittest and multiprocessing (~30 ms), and serving imports
    # this module through indexer.build without ever measuring recall
    from faiss.contrib.evaluation import knn_intersection_measure

    return float(knn_intersection_measure(truth, found[:, :truth.shape[1]]))

"""The recall gate: an index that misses the target recall is never published.

Recall@k is measured against exact search on the gate queries (real user embeddings when
a dataset is given, else a sample of item embeddings), and latency as single-thread,
one-query-at-a-time searches — what one serving worker sees.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from indexer.build import IndexSpec, search_parameters
from indexer.exact import recall_at_k
from indexer.timing import FaissClock
from contracts.errors import TwoTowerError

LATENCY_QUERIES = 1000


class RecallGateError(TwoTowerError):
    """The built index is below the target recall; nothing was published."""


@dataclass(frozen=True)
class Measurement:
    recall: float          # recall@k against exact search
    k: int
    queries: int
    query_source: str      # "user_tower: …" or "item_embeddings: …"
    p50_ms: float          # single-thread, one query per call
    p99_ms: float
    qps_single_thread: float

    def to_dict(self) -> dict:
        out = asdict(self)
        out[f"recall@{self.k}"] = out.pop("recall")
        return out


def measure(index: faiss.Index, spec: IndexSpec, xq: np.ndarray, truth: np.ndarray,
            query_source: str, clock: FaissClock | None = None) -> Measurement:
    clock = clock or FaissClock()
    k = truth.shape[1]
    params = search_parameters(index, spec, k)
    with clock.timed("search"):
        _, found = index.search(xq, k, params=params)
        seconds = single_query_seconds(index, xq[:LATENCY_QUERIES], k, params)
    return Measurement(round(recall_at_k(truth, found), 4), k, len(xq), query_source,
                       round(1e3 * float(np.median(seconds)), 4),
                       round(1e3 * float(np.quantile(seconds, 0.99)), 4),
                       round(len(seconds) / float(seconds.sum()), 1))


def single_query_seconds(index: faiss.Index, xq: np.ndarray, k: int, params) -> np.ndarray:
    """Wall seconds of each of len(xq) single-query searches on one thread."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        out = np.empty(len(xq))
        for i in range(len(xq)):
            start = time.perf_counter()
            index.search(xq[i:i + 1], k, params=params)
            out[i] = time.perf_counter() - start
        return out
    finally:
        faiss.omp_set_num_threads(threads)


def check(measurement: Measurement, target: float, spec: IndexSpec) -> None:
    """Raise RecallGateError unless recall@k ≥ target."""
    if measurement.recall < target:
        raise RecallGateError(
            f"recall gate failed: {spec.factory} with {dict(spec.search) or 'default search'} "
            f"reaches recall@{measurement.k} {measurement.recall:.4f} against exact search on "
            f"{measurement.queries} {measurement.query_source} queries; expected >= {target}. "
            "Nothing was published. Raise nprobe / ef_search (or leave them out to tune), use "
            "a finer code (IVF…,Flat or SQ8 instead of PQ), or run with --index auto")

"""Tuning the search parameter (nprobe or efSearch) to a target recall at the lowest cost.

Recall and cost both grow with nprobe / efSearch, so the cheapest setting that reaches the
target is found on a fixed grid — walked up from the cheap end, then bisected — measuring
recall against exact search on the tuning queries (never the queries the gate judges on).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np

from indexer.build import IndexSpec, nlist_of, search_parameters, tunable_parameter
from indexer.exact import recall_at_k
from indexer.timing import FaissClock

log = logging.getLogger(__name__)

GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 256, 320,
        384, 448, 512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096, 6144, 8192, 12288,
        16384, 24576, 32768, 65536)
TUNING_MARGIN = 0.005  # at least this far above the target: the gate judges on other queries
SAMPLE_SPREAD = 3.0    # ...and this many standard errors of the two samples' difference


@dataclass(frozen=True)
class TuneResult:
    spec: IndexSpec
    recall: float          # on the tuning queries
    reached: bool          # False: even the largest setting stays below the target
    tried: dict[int, float]


def measure_recall(index: faiss.Index, spec: IndexSpec, xq: np.ndarray, truth: np.ndarray,
                   clock: FaissClock | None = None) -> float:
    """recall@k (k = truth.shape[1]) of ``index`` searched with ``spec``'s parameters."""
    return recall_at_k(truth, _search(index, spec, xq, truth.shape[1], clock))


def query_recalls(index: faiss.Index, spec: IndexSpec, xq: np.ndarray, truth: np.ndarray,
                  clock: FaissClock | None = None) -> np.ndarray:
    """Each query's recall@k [nq]: the share of its exact top k the index returned."""
    found = _search(index, spec, xq, truth.shape[1], clock)
    return np.array([np.isin(row, found[i]).mean()
                     for i, row in enumerate(truth)])


def tuning_goal(target: float, recalls: np.ndarray, gate_queries: int) -> float:
    """The recall the tuning queries must show so that the gate's other queries show the
    target too: the target plus TUNING_MARGIN, or plus SAMPLE_SPREAD standard errors of
    the difference between the two samples' means if that is more (the queries' recalls
    spread: at 1M items, 500 tuning queries measured 0.956 at an nprobe where 1,000 gate
    queries measured 0.949), capped at 1."""
    margin = TUNING_MARGIN
    if gate_queries > 0 and len(recalls) > 1:
        spread = float(np.std(recalls, ddof=1))
        margin = max(margin, SAMPLE_SPREAD * spread * np.sqrt(1 / len(recalls)
                                                               + 1 / gate_queries))
    return min(target + margin, 1.0)


def _search(index: faiss.Index, spec: IndexSpec, xq: np.ndarray, k: int,
            clock: FaissClock | None) -> np.ndarray:
    clock = clock or FaissClock()
    with clock.timed("search"):
        _, found = index.search(xq, k, params=search_parameters(index, spec, k))
    return found


def candidate_values(index: faiss.Index, spec: IndexSpec, k: int) -> list[int]:
    param = tunable_parameter(index)
    if param == "nprobe":
        lists = nlist_of(spec.factory) or faiss.extract_index_ivf(index).nlist
        return [v for v in GRID if v < lists] + [lists]
    return [v for v in GRID if v >= k and v <= max(16 * k, 4096)]


def tune(index: faiss.Index, spec: IndexSpec, xq: np.ndarray, truth: np.ndarray,
         target: float, clock: FaissClock | None = None, gate_queries: int = 0
         ) -> TuneResult:
    """The smallest grid value of the index's tunable parameter reaching the tuning goal
    on (xq, truth): ``target`` plus a margin for the gate's ``gate_queries`` other queries
    (tuning_goal, from the spread of the queries' recalls at that value); an index with
    nothing to tune is measured as it is."""
    param = tunable_parameter(index)
    if param is None:
        recall = measure_recall(index, spec, xq, truth, clock)
        return TuneResult(spec, recall, recall >= target, {})
    values = candidate_values(index, spec, truth.shape[1])
    tried: dict[int, float] = {}
    goals: dict[int, float] = {}

    def recall_at(i: int) -> float:
        if values[i] not in tried:
            recalls = query_recalls(index, spec.with_search(**{param: values[i]}), xq, truth,
                                    clock)
            tried[values[i]] = float(recalls.mean())
            goals[values[i]] = tuning_goal(target, recalls, gate_queries)
            log.info("tuning %s: %s=%d → recall %.4f (goal %.4f)", spec.factory, param,
                     values[i], tried[values[i]], goals[values[i]])
        return tried[values[i]]

    def reaches(i: int) -> bool:
        return recall_at(i) >= goals[values[i]]

    lo, hi = _bracket(recall_at, reaches, len(values))
    if hi is None:
        best = max(tried, key=lambda v: (tried[v], -v))
        return TuneResult(spec.with_search(**{param: best}), tried[best], tried[best] >= target,
                          tried)
    while lo < hi:  # invariant: values[hi] reaches its goal, values below lo do not
        mid = (lo + hi) // 2
        if reaches(mid):
            hi = mid
        else:
            lo = mid + 1
    best = values[hi]
    return TuneResult(spec.with_search(**{param: best}), tried[best], True, tried)


def _bracket(recall_at, reaches, n: int, stride: int = 4) -> tuple[int, int | None]:
    """Walk up the grid from its cheap end in strides (≈ ×2.5 per stride) until a value
    reaches its goal: (lo, hi) brackets the cheapest such value. hi is None when none does,
    or when recall stops growing (a graph whose unreachable items no breadth will find)."""
    lo, last = 0, -1.0
    for hi in [*range(stride - 1, n - 1, stride), n - 1]:
        if reaches(hi):
            return lo, hi
        recall = recall_at(hi)
        if recall <= last:
            return lo, None
        lo, last = hi + 1, recall
    return lo, None

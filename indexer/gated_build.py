"""One pass from embeddings to a gated index: build, exact truth, tune, measure, check.

The exact neighbours of the recall queries are folded in while the index is filled, from
the same chunks, so the whole job reads the embeddings once. Tuning uses its own queries;
the gate judges on others, so the tuned setting is not graded on the data it was fit to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np

from indexer.build import CHUNK, IndexSpec, build_streaming, tunable_parameter
from indexer.exact import ExactTopK
from indexer.gate import Measurement, check, measure
from indexer.source import EmbeddingSource
from indexer.timing import FaissClock
from indexer.tune import TuneResult, tune

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateConfig:
    target_recall: float = 0.95
    k: int = 100
    gate_queries: int = 1000
    tune_queries: int = 500

    def __post_init__(self) -> None:
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target recall must be in (0, 1] (got {self.target_recall})")
        for name in ("k", "gate_queries", "tune_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")


@dataclass(frozen=True)
class RecallQueries:
    """Query embeddings [n, d] float32 for tuning and for the gate, and where they came from."""

    tune: np.ndarray
    gate: np.ndarray
    source: str


@dataclass(frozen=True)
class GatedIndex:
    index: faiss.Index
    spec: IndexSpec            # with the search parameters it was gated at
    measurement: Measurement
    tuning: TuneResult | None


def build_and_gate(source: EmbeddingSource, spec: IndexSpec, similarity: str,
                   queries: RecallQueries, config: GateConfig = GateConfig(),
                   clock: FaissClock | None = None, chunk_size: int = CHUNK) -> GatedIndex:
    """Build ``spec`` over ``source``; raise RecallGateError if it misses the target."""
    clock = clock or FaissClock()
    k = min(config.k, source.num_items)
    xq = np.ascontiguousarray(np.concatenate([queries.tune, queries.gate]), dtype=np.float32)
    truth = ExactTopK(xq, k)

    def fold(chunk: np.ndarray, first_row: int) -> None:
        with clock.timed("exact"):
            truth.add(chunk, first_row)

    index = build_streaming(source, spec, similarity, clock, chunk_size, on_chunk=fold)
    _, exact = truth.result()
    tuned = _tune_if_open(index, spec, queries.tune, exact[: len(queries.tune)], config, clock)
    spec = tuned.spec if tuned is not None else spec
    measured = measure(index, spec, queries.gate, exact[len(queries.tune):], queries.source,
                       clock)
    log.info("%s %s: recall@%d %.4f on %d %s queries; %.0f single-thread queries/s",
             spec.factory, dict(spec.search), measured.k, measured.recall, measured.queries,
             queries.source, measured.qps_single_thread)
    check(measured, config.target_recall, spec)
    return GatedIndex(index, spec, measured, tuned)


def _tune_if_open(index: faiss.Index, spec: IndexSpec, xq: np.ndarray, truth: np.ndarray,
                  config: GateConfig, clock: FaissClock) -> TuneResult | None:
    param = tunable_parameter(index)
    if param is None or param in spec.search or len(xq) == 0:
        return None
    return tune(index, spec, xq, truth, config.target_recall, clock, config.gate_queries)

"""Building a Faiss index over item embeddings, described as data.

An index is a Faiss factory string plus search parameters (``IndexSpec``); the metric is
never chosen here but taken from the model manifest, so a dot-product model always gets
an inner-product index. Row i of the index is row i of the item table: the external id
map (row → item id) travels beside the index in the artifact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

log = logging.getLogger(__name__)

METRICS = {"dot": faiss.METRIC_INNER_PRODUCT}
SEARCH_PARAMS = ("ef_search", "nprobe")


@dataclass(frozen=True)
class IndexSpec:
    """``factory``: a Faiss factory string ("HNSW32", "Flat", "IVF256,Flat", ...).
    ``ef_construction`` applies to HNSW builds; ``search`` holds search parameters."""

    factory: str = "HNSW32"
    ef_construction: int = 200
    search: dict[str, int] = field(default_factory=lambda: {"ef_search": 256})

    def __post_init__(self) -> None:
        unknown = set(self.search) - set(SEARCH_PARAMS)
        if unknown:
            raise ValueError(f"unknown search parameter(s) {sorted(unknown)}; "
                             f"expected {', '.join(SEARCH_PARAMS)}")
        if self.ef_construction < 1:
            raise ValueError(f"ef_construction must be >= 1 (got {self.ef_construction})")


def build_index(item_emb: np.ndarray, spec: IndexSpec, similarity: str,
                chunk: int = 65536) -> faiss.Index:
    """item_emb [n, d] float32 → a trained, filled index (labels = rows)."""
    if similarity not in METRICS:
        raise ValueError(f"similarity must be one of {sorted(METRICS)} (got {similarity!r})")
    xb = np.ascontiguousarray(item_emb, dtype=np.float32)
    n, d = xb.shape
    try:
        index = faiss.index_factory(d, spec.factory, METRICS[similarity])
    except RuntimeError as exc:
        raise ValueError(f"invalid Faiss factory string {spec.factory!r}: {exc}") from exc
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        faiss.downcast_index(index).hnsw.efConstruction = spec.ef_construction
    start = time.perf_counter()
    if not index.is_trained:
        index.train(xb)
    for lo in range(0, n, chunk):
        index.add(xb[lo:lo + chunk])
        log.info("index build: %d/%d items added (%.1fs)", min(lo + chunk, n), n,
                 time.perf_counter() - start)
    return index


def search_parameters(index: faiss.Index, spec: IndexSpec, fetch_k: int):
    """Per-call Faiss search parameters (thread-safe: the index itself is not mutated).
    efSearch is raised to fetch_k when needed: HNSW cannot return more than efSearch items."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(spec.search.get("ef_search", 16), fetch_k)
        return params
    if isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = spec.search.get("nprobe", 1)
        return params
    return None


def recall_against_exact(index: faiss.Index, spec: IndexSpec, item_emb: np.ndarray,
                         xq: np.ndarray, k: int) -> float:
    """recall@k of ``index`` against exact inner-product search for queries xq [nq, d]."""
    k = min(k, len(item_emb))
    exact = faiss.IndexFlatIP(item_emb.shape[1])
    exact.add(np.ascontiguousarray(item_emb, dtype=np.float32))
    _, truth = exact.search(xq, k)
    _, found = index.search(xq, k, params=search_parameters(index, spec, k))
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth, found, strict=True))
    return hits / truth.size

"""Building a Faiss index over item embeddings, described as data.

An index is a Faiss factory string plus search parameters (``IndexSpec``): ``Flat``,
``HNSW32``, ``IVF4096,Flat``, ``IVF4096,SQ8``, ``IVF4096,PQ32`` with an optional refine
stage (``IVF4096,PQ32,RFlat``, ``…,Refine(SQ8)``). The metric is never chosen here but
taken from the model manifest, so a dot-product model always gets an inner-product index.

The build streams: an IVF or PQ index is trained on a sample, then every chunk of
embeddings is added as the source yields it. Label i of the index is row i of the item
table; the id map (row → external item id) travels beside the index in the artifact.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import faiss
import numpy as np

from indexer.exact import exact_search, recall_at_k
from indexer.source import ArraySource, EmbeddingSource
from indexer.timing import FaissClock

log = logging.getLogger(__name__)

METRICS = {"dot": faiss.METRIC_INNER_PRODUCT}
SEARCH_PARAMS = ("ef_search", "nprobe", "k_factor")
TRAIN_POINTS_PER_LIST = 50   # k-means quality flattens out well before faiss's cap of 256
MIN_TRAIN_SIZE = 65536       # PQ/SQ codebooks want tens of thousands of points
CHUNK = 65536


@dataclass(frozen=True)
class IndexSpec:
    """``factory``: a Faiss factory string. ``ef_construction`` applies to HNSW builds.
    ``search``: search parameters (``ef_search``, ``nprobe``, ``k_factor``); a missing
    tunable parameter is tuned by the job to the target recall. ``train_size``: vectors an
    IVF/PQ index trains on (None: 50 per inverted list, at least 65,536)."""

    factory: str = "HNSW32"
    ef_construction: int = 200
    search: Mapping[str, int] = field(default_factory=dict)
    train_size: int | None = None

    def __post_init__(self) -> None:
        unknown = set(self.search) - set(SEARCH_PARAMS)
        if unknown:
            raise ValueError(f"unknown search parameter(s) {sorted(unknown)}; "
                             f"expected {', '.join(SEARCH_PARAMS)}")
        for name, value in [("ef_construction", self.ef_construction), *self.search.items()]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")

    def with_search(self, **params: int) -> IndexSpec:
        return IndexSpec(self.factory, self.ef_construction, {**self.search, **params},
                         self.train_size)

    def to_dict(self) -> dict:
        return {"factory": self.factory, "ef_construction": self.ef_construction,
                "search": dict(self.search), "train_size": self.train_size}


def new_index(dim: int, spec: IndexSpec, similarity: str) -> faiss.Index:
    """An empty index of ``spec`` with the model's metric."""
    if similarity not in METRICS:
        raise ValueError(f"similarity must be one of {sorted(METRICS)} (got {similarity!r})")
    try:
        index = faiss.index_factory(dim, spec.factory, METRICS[similarity])
    except RuntimeError as exc:
        raise ValueError(f"invalid Faiss factory string {spec.factory!r}: {exc}") from exc
    hnsw = _find(index, faiss.IndexHNSW)
    if hnsw is not None:
        hnsw.hnsw.efConstruction = spec.ef_construction
    return index


def nlist_of(factory: str) -> int | None:
    match = re.match(r"IVF(\d+)", factory)
    return int(match.group(1)) if match else None


def train_size(spec: IndexSpec, num_items: int) -> int:
    if spec.train_size is not None:
        return min(spec.train_size, num_items)
    lists = nlist_of(spec.factory) or 0
    return min(num_items, max(TRAIN_POINTS_PER_LIST * lists, MIN_TRAIN_SIZE))


ChunkHook = Callable[[np.ndarray, int], None]


def build_streaming(source: EmbeddingSource, spec: IndexSpec, similarity: str,
                    clock: FaissClock | None = None, chunk_size: int = CHUNK,
                    on_chunk: ChunkHook | None = None, seed: int = 0) -> faiss.Index:
    """Train on a sample of ``source``, then add it chunk by chunk (labels = rows).

    ``on_chunk(chunk, first_row)`` sees every chunk after it is added, e.g. to compute the
    exact neighbours of the recall queries in the same pass.
    """
    clock = clock or FaissClock()
    index = new_index(source.dim, spec, similarity)
    if not index.is_trained:
        xt = source.sample(train_size(spec, source.num_items), seed)
        log.info("training %s on %d of %d items", spec.factory, len(xt), source.num_items)
        with clock.timed("train"):
            index.train(xt)
        del xt
    start, added = time.perf_counter(), 0
    for chunk in source.chunks(chunk_size):
        with clock.timed("add"):
            index.add(chunk)
        if on_chunk is not None:
            on_chunk(chunk, added)
        added += len(chunk)
        _log_progress(added, source.num_items, time.perf_counter() - start)
    return index


def _log_progress(done: int, total: int, seconds: float) -> None:
    rate = done / max(seconds, 1e-9)
    log.info("index build: %d/%d items (%.0f items/s, %.0fs left)", done, total, rate,
             (total - done) / max(rate, 1e-9))


def build_index(item_emb: np.ndarray, spec: IndexSpec, similarity: str,
                chunk: int = CHUNK) -> faiss.Index:
    """item_emb [n, d] float32 → a trained, filled index (labels = rows)."""
    return build_streaming(ArraySource(item_emb), spec, similarity, chunk_size=chunk)


def search_parameters(index: faiss.Index, spec: IndexSpec, fetch_k: int,
                      selector: faiss.IDSelector | None = None) -> faiss.SearchParameters | None:
    """Per-call Faiss search parameters (thread-safe: the index itself is not mutated).

    efSearch is raised to fetch_k when needed: HNSW cannot return more than efSearch items.
    ``selector`` keeps only the labels it accepts (tombstoned items are filtered this way).
    """
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexRefine):
        base = search_parameters(inner.base_index, spec, fetch_k, selector)
        return faiss.IndexRefineSearchParameters(k_factor=float(spec.search.get("k_factor", 4)),
                                                 base_index_params=base)
    if isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(spec.search.get("ef_search", 16), fetch_k)
    elif isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = min(spec.search.get("nprobe", 1), inner.nlist)
    elif selector is not None:
        params = faiss.SearchParameters()
    else:
        return None
    if selector is not None:
        params.sel = selector
    return params


def tunable_parameter(index: faiss.Index) -> str | None:
    """The search parameter that trades recall for speed: nprobe, ef_search, or none."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexRefine):
        return tunable_parameter(inner.base_index)
    if isinstance(inner, faiss.IndexHNSW):
        return "ef_search"
    if isinstance(inner, faiss.IndexIVF):
        return "nprobe"
    return None


def _find(index: faiss.Index, kind: type) -> faiss.Index | None:
    inner = faiss.downcast_index(index)
    if isinstance(inner, kind):
        return inner
    if isinstance(inner, faiss.IndexRefine):
        return _find(inner.base_index, kind)
    return None


def recall_against_exact(index: faiss.Index, spec: IndexSpec, item_emb: np.ndarray,
                         xq: np.ndarray, k: int) -> float:
    """recall@k of ``index`` against exact inner-product search for queries xq [nq, d]."""
    k = min(k, len(item_emb))
    _, truth = exact_search(ArraySource(item_emb), xq, k)
    _, found = index.search(xq, k, params=search_parameters(index, spec, k))
    return recall_at_k(truth, found)

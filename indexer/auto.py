"""``--index auto``: the index kind and size chosen from the item count and a memory budget.

Rules (measured on this project's benchmark, see benchmarks/index_scale.py):

* up to 20,000 items: ``Flat``. Exact search is cheap at that size and recall is 1.
* otherwise IVF with nlist ≈ 4·√n (a power of two, 64 … 65,536) and the densest code that
  fits the budget: ``Flat`` (4·d bytes per item), else ``SQ8`` (d bytes), else ``PQ{m}``
  (m bytes, m the largest divisor of d that fits). On our benchmark IVF-Flat reaches
  recall@100 0.95 at several times the queries/s of HNSW and builds faster, so HNSW is
  never picked automatically; ask for it with ``--index HNSW32``.

The search parameter (nprobe) is left open: the job tunes it to the target recall.
"""

from __future__ import annotations

import math

from indexer.build import IndexSpec

FLAT_MAX_ITEMS = 20_000
ID_BYTES = 8          # IVF lists store an int64 label per item
OVERHEAD = 1.2        # inverted-list slack, centroids, the id map


def choose_spec(num_items: int, dim: int, memory_budget: int) -> IndexSpec:
    """The index for ``num_items`` embeddings of ``dim`` floats in ``memory_budget`` bytes."""
    if num_items <= FLAT_MAX_ITEMS:
        return _fits(IndexSpec("Flat"), num_items * 4 * dim, memory_budget)
    nlist = 2 ** round(math.log2(4 * math.sqrt(num_items)))
    nlist = min(max(nlist, 64), 65536)
    for code, per_item in (("Flat", 4 * dim), ("SQ8", dim)):
        if num_items * (per_item + ID_BYTES) * OVERHEAD <= memory_budget:
            return IndexSpec(f"IVF{nlist},{code}")
    for m in sorted((m for m in range(1, dim + 1) if dim % m == 0), reverse=True):
        if m <= 64 and num_items * (m + ID_BYTES) * OVERHEAD <= memory_budget:
            return IndexSpec(f"IVF{nlist},PQ{m}")
    need = num_items * (1 + ID_BYTES) * OVERHEAD
    raise ValueError(f"memory budget {memory_budget} bytes cannot hold {num_items} items even "
                     f"as IVF-PQ with 1-byte codes (needs ≈ {need:.0f}); raise --memory-budget "
                     "or shard the catalogue")


def _fits(spec: IndexSpec, size: int, memory_budget: int) -> IndexSpec:
    if size > memory_budget:
        raise ValueError(f"memory budget {memory_budget} bytes is below the {size} bytes a "
                         f"{spec.factory} index of this catalogue needs; raise --memory-budget")
    return spec

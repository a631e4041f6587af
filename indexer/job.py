"""The index build job: model artifact → Faiss index → index artifact."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from indexer.artifact import write_index_artifact
from indexer.build import IndexSpec, build_index, recall_against_exact
from training.artifact import load_item_embeddings, load_model_manifest

log = logging.getLogger(__name__)
RECALL_K = 100
RECALL_QUERIES = 200


def run_build_index(model_dir: str | Path, store: str | Path,
                    spec: IndexSpec = IndexSpec(), seed: int = 0) -> Path:
    """Build an index over the model's item embeddings and publish it under ``store``.

    The recall of the index against exact search is measured on item embeddings used as
    queries and recorded in the manifest.
    """
    model = load_model_manifest(model_dir)
    item_emb, item_ids = load_item_embeddings(model)
    start = time.perf_counter()
    index = build_index(item_emb, spec, model.similarity)
    build_seconds = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    xq = item_emb[rng.choice(len(item_emb), min(RECALL_QUERIES, len(item_emb)), replace=False)]
    recall = recall_against_exact(index, spec, item_emb, xq, RECALL_K)
    log.info("built %s over %d items in %.2fs; recall@%d vs exact %.4f",
             spec.factory, len(item_ids), build_seconds, RECALL_K, recall)
    measured = {"build_seconds": round(build_seconds, 3), f"recall@{RECALL_K}": recall}
    path = write_index_artifact(index, spec, item_ids, model, store, measured)
    log.info("index artifact written: %s (model %s)", path, model.model_version)
    return path

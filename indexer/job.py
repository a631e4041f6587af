"""The index build job: model (+ item features) → gated Faiss index → published version.

    two-tower build-index --model MODELS/m-… --items DATA --data DATA --out INDEXES

1. item embeddings: the model's item tower over ``--items`` (a dataset directory or an
   items table), in chunks, so cold-start items get one too; without ``--items``, the
   ``item_embeddings.npy`` the model artifact was exported with (same tower, catalogue of
   training time), read from disk chunk by chunk.
2. the index: ``--index auto`` (indexer.auto) or a factory string; the metric comes from
   the model manifest; unset nprobe / efSearch are tuned to the target recall.
3. the gate: recall@k against exact search on held-out user embeddings (``--data``) or on
   item embeddings; below the target the job fails and publishes nothing.
4. the artifact: a new version directory, then the CURRENT pointer (indexer.publish).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexer.artifact import IndexContents, write_index_artifact
from indexer.auto import choose_spec
from indexer.build import CHUNK, IndexSpec
from indexer.gated_build import GateConfig, GatedIndex, build_and_gate
from indexer.publish import DEFAULT_KEEP, publish
from indexer.queries import item_queries, user_queries
from indexer.source import EmbeddingSource, NpySource
from indexer.timing import FaissClock
from contracts.index_store import current_version
from contracts.model_manifest import ModelManifest, load_model_manifest, load_npy
from contracts.errors import ArtifactError

log = logging.getLogger(__name__)
GiB = 1 << 30


@dataclass(frozen=True)
class JobOptions:
    items: Path | None = None          # dataset dir or items table; None: the model's embeddings
    data: Path | None = None           # dataset whose held-out users give the gate queries
    gate: GateConfig = field(default_factory=GateConfig)
    memory_budget: int = 8 * GiB       # for --index auto
    keep: int = DEFAULT_KEEP           # versions kept for rollback
    notify_url: str | None = None      # Redis URL for the publish notification
    # credentials and TLS for it (RedisAuth.client_kwargs): kept off the URL
    notify_options: dict[str, Any] = field(default_factory=dict, repr=False)
    chunk_size: int = CHUNK
    seed: int = 0


@dataclass(frozen=True)
class ItemSide:
    source: EmbeddingSource
    item_ids: np.ndarray
    metadata: dict[str, np.ndarray]
    description: dict[str, Any]


def run_build_index(model_dir: str | Path, store: str | Path, spec: IndexSpec | None = None,
                    options: JobOptions = JobOptions()) -> Path:
    """Build, gate and publish an index of the model's items; returns the version directory.

    ``spec`` None means ``--index auto``. Raises RecallGateError (nothing published) when
    the index misses the target recall.
    """
    clock = FaissClock()
    # an unreadable CURRENT would refuse the publish at the end: say so before the build
    current_version(store)
    model = load_model_manifest(model_dir)
    items = item_side(model, options)
    spec = spec or choose_spec(items.source.num_items, model.embedding_dim, options.memory_budget)
    log.info("building %s over %d items of model %s", spec.factory, items.source.num_items,
             model.model_version)
    queries = (user_queries(model, options.data, options.gate, options.seed) if options.data
               else item_queries(items.source, options.gate, options.seed))
    gated = build_and_gate(items.source, spec, model.similarity, queries, options.gate, clock,
                           options.chunk_size)
    contents = IndexContents(gated.index, gated.spec, items.item_ids,
                             measured(gated, clock, items.source), metadata=items.metadata,
                             source=items.description)
    path = write_index_artifact(contents, model, store)
    publish(path, "build", options.notify_url, options.keep, options.notify_options)
    return path


def item_side(model: ModelManifest, options: JobOptions) -> ItemSide:
    if options.items is None:
        log.info("no --items given: indexing the %d item embeddings exported with the model",
                 model.num_items)
        source = NpySource(model.path / "item_embeddings.npy")
        item_ids = load_npy(model.path / "item_ids.npy")
        if (source.num_items, source.dim) != (len(item_ids), model.embedding_dim):
            raise ArtifactError(str(source.path), f"shape ({source.num_items}, {source.dim}) "
                                f"does not match {len(item_ids)} ids of dim {model.embedding_dim}")
        return ItemSide(source, item_ids, {}, {"embeddings": "model item_embeddings.npy"})
    from indexer.embed import ItemTowerSource
    from indexer.items import load_items

    table = load_items(options.items, model.feature_spec)
    return ItemSide(ItemTowerSource(model, table), table.item_ids, table.metadata(),
                    {"embeddings": "item_tower", "items": str(Path(options.items).resolve())})


def measured(gated: GatedIndex, clock: FaissClock, source: EmbeddingSource) -> dict[str, Any]:
    out: dict[str, Any] = {**gated.measurement.to_dict(), **clock.summary()}
    embed_seconds = getattr(source, "seconds", None)
    if embed_seconds is not None:
        out["embed_seconds"] = round(embed_seconds, 3)
    if gated.tuning is not None:
        out["tuning"] = {str(k): round(v, 4) for k, v in sorted(gated.tuning.tried.items())}
    return out


def spec_from_args(index: str, ef_construction: int, search: Mapping[str, int]) -> IndexSpec | None:
    """``--index auto`` → None (chosen by size and memory); else a factory string."""
    if index == "auto":
        if search:
            raise ValueError("--index auto tunes its own search parameters; drop "
                             f"{', '.join('--' + k.replace('_', '-') for k in search)} or "
                             "name a factory with --index")
        return None
    return IndexSpec(index, ef_construction, dict(search))

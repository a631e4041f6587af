"""Incremental index updates: add new items, retire removed ones, without a full rebuild.

    two-tower update-index --store INDEXES --model MODELS/m-… --items CATALOGUE

``--items`` is the catalogue as it is now. Against the current version: ids that are new
are embedded with the item tower and added (labels continue after the last row); ids that
are gone become **tombstones**, labels every search filters out with a Faiss ID selector
(HNSW cannot delete, and one mechanism for every index type keeps labels = rows). When
tombstones would pass ``max_tombstone_fraction`` of the index, the job runs a full,
gated rebuild of the catalogue instead. Either way a new version is published and the
manifest's ``updates`` records what changed since the last full build.

An update adds to an index trained on the earlier catalogue (IVF centroids, PQ codebooks
stay); the recall measured at the full build is carried over, not re-measured.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from pathlib import Path

import numpy as np

from indexer.artifact import (
    IndexArtifact,
    IndexContents,
    load_index_artifact,
    load_item_metadata,
    write_index_artifact,
)
from indexer.items import ItemTable, load_items
from indexer.job import JobOptions, run_build_index
from contracts.index_store import resolve_index_dir
from indexer.publish import publish
from indexer.timing import FaissClock
from contracts.model_manifest import ModelManifest, load_model_manifest
from contracts.errors import ArtifactError

log = logging.getLogger(__name__)
MAX_TOMBSTONE_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class CatalogueDiff:
    added_rows: np.ndarray      # rows of the catalogue table to add
    removed_labels: np.ndarray  # live labels of the index to tombstone


def diff_catalogue(current: IndexArtifact, table: ItemTable) -> CatalogueDiff:
    live = np.setdiff1d(np.arange(len(current.item_ids)), current.tombstones)
    live_ids = current.item_ids[live].astype(str)
    catalogue = table.item_ids
    added = np.flatnonzero(~np.isin(catalogue, live_ids))
    removed = live[~np.isin(live_ids, catalogue)]
    return CatalogueDiff(added, removed.astype(np.int64))


def run_update_index(store: str | Path, model_dir: str | Path, items: str | Path,
                     options: JobOptions = JobOptions(),
                     max_tombstone_fraction: float = MAX_TOMBSTONE_FRACTION) -> Path:
    """Publish the current version plus the catalogue's changes; returns the version dir
    (the current one, unchanged, when the catalogue did not change)."""
    if not 0.0 <= max_tombstone_fraction < 1.0:
        raise ValueError(f"max tombstone fraction must be in [0, 1) (got {max_tombstone_fraction})")
    if resolve_index_dir(store) == Path(store):
        raise ArtifactError(str(Path(store) / "CURRENT"), "missing: update-index needs a store "
                            "with a current version (give the store, not a version directory)")
    model = load_model_manifest(model_dir)
    current = load_index_artifact(store)
    _check_same_model(current, model)
    table = load_items(items, model.feature_spec)
    diff = diff_catalogue(current, table)
    if len(diff.added_rows) == 0 and len(diff.removed_labels) == 0:
        log.info("catalogue unchanged: %s stays current", current.index_version)
        return current.path
    tombstones = np.union1d(current.tombstones, diff.removed_labels)
    total = len(current.item_ids) + len(diff.added_rows)
    if len(tombstones) > max_tombstone_fraction * total:
        log.info("%d tombstones would be %.0f%% of the index (limit %.0f%%): full rebuild",
                 len(tombstones), 100 * len(tombstones) / total, 100 * max_tombstone_fraction)
        spec = dataclasses.replace(current.spec, search={})  # retune for the new catalogue
        return run_build_index(model_dir, Path(store), spec,
                               dataclasses.replace(options, items=Path(items)))
    contents = _apply(current, model, table, diff, tombstones, options)
    path = write_index_artifact(contents, model, store)
    publish(path, "update", options.notify_url, options.keep, options.notify_options)
    return path


def _check_same_model(current: IndexArtifact, model: ModelManifest) -> None:
    if current.model_version != model.model_version:
        raise ArtifactError(str(current.path / "manifest.json"),
                            f"index was built from model {current.model_version!r}, not "
                            f"{model.model_version!r}: embeddings of two models cannot share an "
                            "index; run `two-tower build-index` for the new model")


def _apply(current: IndexArtifact, model: ModelManifest, table: ItemTable, diff: CatalogueDiff,
           tombstones: np.ndarray, options: JobOptions) -> IndexContents:
    from indexer.embed import ItemTowerSource

    clock = FaissClock()
    added = table.take(diff.added_rows)
    if added.num_items:
        source = ItemTowerSource(model, added)
        for chunk in source.chunks(options.chunk_size):
            with clock.timed("add"):
                current.index.add(chunk)
        log.info("added %d items, tombstoned %d", added.num_items, len(diff.removed_labels))
    item_ids = np.concatenate([current.item_ids.astype(str), added.item_ids])
    record = {"from_version": current.index_version, "added": int(added.num_items),
              "removed": int(len(diff.removed_labels)),
              "at": dt.datetime.now(dt.UTC).isoformat(), **clock.summary()}
    measured = {**current.measured, "measured_on_version": current.manifest.get(
        "measured", {}).get("measured_on_version", current.index_version)}
    return IndexContents(current.index, current.spec, item_ids, measured, tombstones,
                         _metadata(current, added), dict(current.manifest.get("source", {})),
                         [*current.manifest.get("updates", []), record])


def _metadata(current: IndexArtifact, added: ItemTable) -> dict[str, np.ndarray]:
    old = load_item_metadata(current)
    new = added.metadata()
    if not old:
        return {}
    return {name: np.concatenate([old[name], _as_object(new[name])])
            for name in old if name != "item_id" and name in new}


def _as_object(values: np.ndarray) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out

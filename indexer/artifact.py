"""The versioned index artifact: one Faiss index built from one named model version.

Layout of ``<store>/<index_version>/`` (the store and its CURRENT pointer: contracts.index_store)::

    manifest.json          format "two-tower-index/2", index_version, model_version (the model
                           it was built from), embedding_dim, similarity, factory,
                           ef_construction, search parameters, num_items (labels in the
                           index), live_items, num_tombstones, measured (recall@k against
                           exact search, the queries it was measured on, single-thread
                           latency and queries/s, build timings), source, updates (the
                           incremental updates since the last full build), sha256 of files
    index.faiss            the Faiss index; label i = row i of item_ids
    item_ids.npy           unicode [num_items]: the id map, row (int64 label) → item id
    tombstones.npy         int64 [num_tombstones], sorted: labels of removed items, which a
                           search must filter out (indexer.build.search_parameters selector)
    item_metadata.parquet  optional: item_id + categorical/bag item features, row-aligned,
                           for filtering (e.g. category)

Written under ``.tmp-<version>`` with every file fsynced, then renamed into place; loading
verifies every checksum before Faiss reads a byte. Nothing is pickled. Format
``two-tower-index/1`` (no tombstones, no metadata) still loads.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from indexer.build import IndexSpec
from indexer.faults import crash_point
from contracts.index_store import fsync_dir, resolve_index_dir
from contracts.model_manifest import (
    MANIFEST,
    ModelManifest,
    checksums,
    load_npy,
    new_version,
    read_manifest_json,
    verify_checksums,
)
from contracts.errors import ArtifactError

INDEX_FORMAT = "two-tower-index/2"
LEGACY_FORMAT = "two-tower-index/1"
METADATA = "item_metadata.parquet"


@dataclass(frozen=True)
class IndexContents:
    """Everything a version holds besides its name and checksums."""

    index: faiss.Index
    spec: IndexSpec
    item_ids: np.ndarray                       # str [num_items]
    measured: dict[str, Any]
    tombstones: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    metadata: dict[str, np.ndarray] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    updates: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class IndexArtifact:
    path: Path
    index_version: str
    model_version: str
    embedding_dim: int
    similarity: str
    spec: IndexSpec
    index: faiss.Index
    item_ids: np.ndarray
    measured: dict[str, Any]
    tombstones: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def live_items(self) -> int:
        return len(self.item_ids) - len(self.tombstones)


def write_index_artifact(contents: IndexContents, model: ModelManifest,
                         store: str | Path) -> Path:
    """Write a new version directory under ``store`` (not yet current) and return it."""
    version = new_version("i")
    store = Path(store)
    tmp = store / f".tmp-{version}"
    tmp.mkdir(parents=True)
    try:
        _write_files(contents, tmp)
        crash_point("mid-write")
        manifest = _manifest(contents, model, version, checksums(tmp))
        _write_durably(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        fsync_dir(tmp)
        final = store / version
        os.replace(tmp, final)
        fsync_dir(store)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_files(contents: IndexContents, directory: Path) -> None:
    faiss.write_index(contents.index, str(directory / "index.faiss"))
    _fsync(directory / "index.faiss")
    _save_npy(directory / "item_ids.npy", np.asarray(contents.item_ids).astype(str))
    _save_npy(directory / "tombstones.npy", np.unique(contents.tombstones).astype(np.int64))
    if contents.metadata:
        columns = {"item_id": pa.array(contents.item_ids.astype(str).tolist(), pa.string())}
        columns.update({name: _arrow(values) for name, values in contents.metadata.items()})
        pq.write_table(pa.table(columns), directory / METADATA)
        _fsync(directory / METADATA)


def _manifest(contents: IndexContents, model: ModelManifest, version: str,
              files: dict[str, str]) -> dict[str, Any]:
    num_items, tombstones = int(contents.index.ntotal), len(np.unique(contents.tombstones))
    return {
        "format": INDEX_FORMAT,
        "index_version": version,
        "model_version": model.model_version,
        "embedding_dim": model.embedding_dim,
        "similarity": model.similarity,
        **contents.spec.to_dict(),
        "num_items": num_items,
        "live_items": num_items - tombstones,
        "num_tombstones": tombstones,
        "metadata_columns": sorted(contents.metadata),
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "measured": contents.measured,
        "source": contents.source,
        "updates": contents.updates,
        "files": files,
    }


def load_index_artifact(directory: str | Path, mmap: bool = False) -> IndexArtifact:
    """Load a version directory, or the current version of a store (CURRENT pointer).

    ``mmap``: read-only, the Faiss index and the item ids mapped from their files rather
    than copied into the process (Faiss IO_FLAG_MMAP_IFC: Flat, IVF-Flat, IVF-SQ, HNSW
    tested), so the worker processes of one host share one copy in the page cache; the
    index must not be modified (a server only searches it).

    Raises ArtifactError naming the file: a manifest that is not UTF-8 JSON or has a field
    of the wrong type, a listed file missing, altered, not a regular file or leading out of
    the version directory through a symbolic link, or contents that disagree with it."""
    directory = resolve_index_dir(directory)
    doc = _read_manifest(directory)
    manifest = directory / MANIFEST
    try:
        verify_checksums(directory, _object(doc, "files"), _files_read(directory))
        spec = IndexSpec(factory=str(doc["factory"]), ef_construction=int(doc["ef_construction"]),
                         search={str(k): int(v) for k, v in _object(doc, "search").items()})
        fields = (str(doc["index_version"]), str(doc["model_version"]), int(doc["embedding_dim"]),
                  str(doc["similarity"]), int(doc["num_items"]))
        measured = _object(doc, "measured", {})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(str(manifest), f"malformed manifest: {exc!r}") from exc
    index_version, model_version, dim, similarity, num_items = fields
    index = _read_index(directory / "index.faiss", mmap)
    item_ids = _load_ids(directory / "item_ids.npy", mmap)
    tombstones = _load_tombstones(directory)
    if index.d != dim or index.ntotal != num_items or len(item_ids) != num_items:
        raise ArtifactError(str(directory / "index.faiss"),
                            f"holds {index.ntotal} items of dim {index.d}, manifest says "
                            f"{num_items} of dim {dim} with {len(item_ids)} ids")
    if len(tombstones) and (tombstones[0] < 0 or tombstones[-1] >= num_items):
        raise ArtifactError(str(directory / "tombstones.npy"),
                            f"labels must be in [0, {num_items}) (got {tombstones[[0, -1]]})")
    return IndexArtifact(directory, index_version, model_version, dim, similarity, spec, index,
                         item_ids, measured, tombstones, doc)


def _object(doc: dict[str, Any], key: str, default: dict | None = None) -> dict[str, Any]:
    """The manifest's JSON object ``key``; a TypeError saying what came instead."""
    value = doc[key] if default is None else doc.get(key, default)
    if not isinstance(value, dict):
        raise TypeError(f"{key!r} must be a JSON object (got {type(value).__name__})")
    return value


def load_item_metadata(artifact: IndexArtifact) -> dict[str, np.ndarray]:
    """Row-aligned metadata columns (item_id included); empty when the build had none."""
    path = artifact.path / METADATA
    if not path.exists():
        return {}
    table = pq.read_table(path)
    out = {}
    for name in table.column_names:
        values = [tuple(v) if isinstance(v, list) else v for v in table.column(name).to_pylist()]
        out[name] = np.empty(len(values), dtype=object)
        out[name][:] = values
    return out


def load_metadata_rows(artifact: IndexArtifact) -> dict[str, dict[str, np.ndarray]]:
    """column → value → the rows holding it (int64, ascending); a row of a list column
    holds each of its values, and a null holds none. Values are keyed by ``str(value)``.

    Built column-wise in Arrow and NumPy, with no Python object per item: a server loads
    this beside the pair it is serving, and per-item objects would hold the GIL in one C
    call for seconds (``to_pylist`` of 1M rows) and fill the garbage collector's
    generations (full collections of 0.2 s), both stalling every call in flight."""
    path = artifact.path / METADATA
    if not path.exists():
        return {}
    rows = metadata_rows(pq.read_table(path))
    # Arrow's allocator keeps what the read and the grouping freed (about 140 MB at 1M
    # items with a list column): hand it back, or every serving worker keeps it
    pa.default_memory_pool().release_unused()
    return rows


def metadata_rows(table: pa.Table) -> dict[str, dict[str, np.ndarray]]:
    """``load_metadata_rows`` of a metadata table already read."""
    out = {}
    for name in table.column_names:
        if name == "item_id":
            continue
        column = table.column(name).combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            rows = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
            values = pc.list_flatten(column)
        else:
            rows, values = np.arange(len(column), dtype=np.int64), column
        out[name] = _rows_by_value(values, rows.astype(np.int64, copy=False))
    return out


def _rows_by_value(values: pa.Array, rows: np.ndarray) -> dict[str, np.ndarray]:
    encoded = pc.dictionary_encode(values)
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False)
    keep = codes >= 0
    codes, rows = codes[keep], rows[keep]
    order = np.argsort(codes, kind="stable")  # rows stay ascending within a value
    codes, rows = codes[order], rows[order]
    starts = np.searchsorted(codes, np.arange(len(encoded.dictionary)))
    groups = np.split(rows, starts[1:])
    return {str(value): group  # the dictionary's values are distinct, so are their texts
            for value, group in zip(encoded.dictionary.to_pylist(), groups, strict=True)}


def _files_read(directory: Path) -> tuple[str, ...]:
    """What loading reads besides the manifest: each must be covered by its checksums."""
    optional = tuple(n for n in ("tombstones.npy", METADATA) if (directory / n).exists())
    return ("index.faiss", "item_ids.npy", *optional)


def _read_manifest(directory: Path) -> dict[str, Any]:
    try:
        return read_manifest_json(directory, INDEX_FORMAT)
    except ArtifactError as exc:
        try:
            return read_manifest_json(directory, LEGACY_FORMAT)
        except ArtifactError:
            raise exc from None


def _read_index(path: Path, mmap: bool = False) -> faiss.Index:
    try:
        if mmap:
            try:
                return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
            except RuntimeError:  # a type Faiss cannot map: read it whole
                pass
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise ArtifactError(str(path), f"Faiss cannot read it: {exc}") from exc


def _load_ids(path: Path, mmap: bool) -> np.ndarray:
    if not mmap:
        return load_npy(path)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # as load_npy says it
        raise ArtifactError(str(path), f"cannot be read without pickle ({exc}); artifacts "
                            "hold plain arrays only: rebuild it") from exc


def _load_tombstones(directory: Path) -> np.ndarray:
    path = directory / "tombstones.npy"
    if not path.exists():  # format 1
        return np.zeros(0, np.int64)
    return np.unique(load_npy(path).astype(np.int64))


def _arrow(values: np.ndarray) -> pa.Array:
    if len(values) and isinstance(values[0], (tuple, list)):
        return pa.array([list(v) for v in values], pa.list_(pa.string()))
    return pa.array([str(v) for v in values], pa.string())


def _save_npy(path: Path, array: np.ndarray) -> None:
    np.save(path, array, allow_pickle=False)
    _fsync(path)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())

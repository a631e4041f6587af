"""The versioned index artifact: one Faiss index built from one named model version.

Layout of ``<store>/<index_version>/``::

    manifest.json   format, index_version, model_version (the model it was built from),
                    embedding_dim, similarity, factory, ef_construction, search parameters,
                    num_items, measured recall against exact search, build time, sha256 of files
    index.faiss     the Faiss index; label i = row i of item_ids
    item_ids.npy    unicode [n_items]: the id map, row → external item id

Written under a temporary name and renamed into place; loading verifies every checksum
before Faiss reads a byte.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.build import IndexSpec
from training.artifact import (
    MANIFEST, ModelManifest, checksums, new_version, read_manifest_json, verify_checksums,
)
from training.errors import ArtifactError

INDEX_FORMAT = "two-tower-index/1"


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


def write_index_artifact(index: faiss.Index, spec: IndexSpec, item_ids: np.ndarray,
                         model: ModelManifest, store: str | Path,
                         measured: dict[str, Any]) -> Path:
    version = new_version("i")
    store = Path(store)
    tmp = store / f".tmp-{version}"
    tmp.mkdir(parents=True)
    try:
        faiss.write_index(index, str(tmp / "index.faiss"))
        np.save(tmp / "item_ids.npy", np.asarray(item_ids).astype(str), allow_pickle=False)
        manifest = {
            "format": INDEX_FORMAT,
            "index_version": version,
            "model_version": model.model_version,
            "embedding_dim": model.embedding_dim,
            "similarity": model.similarity,
            "factory": spec.factory,
            "ef_construction": spec.ef_construction,
            "search": dict(spec.search),
            "num_items": int(index.ntotal),
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "measured": measured,
            "files": checksums(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        final = store / version
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_index_artifact(directory: str | Path) -> IndexArtifact:
    directory = Path(directory)
    doc = read_manifest_json(directory, INDEX_FORMAT)
    try:
        verify_checksums(directory, dict(doc["files"]))
        spec = IndexSpec(factory=str(doc["factory"]), ef_construction=int(doc["ef_construction"]),
                         search={str(k): int(v) for k, v in doc["search"].items()})
        fields = (str(doc["index_version"]), str(doc["model_version"]), int(doc["embedding_dim"]),
                  str(doc["similarity"]), int(doc["num_items"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(str(directory / MANIFEST), f"malformed manifest: {exc!r}") from exc
    index_version, model_version, dim, similarity, num_items = fields
    index = faiss.read_index(str(directory / "index.faiss"))
    item_ids = np.load(directory / "item_ids.npy", allow_pickle=False)
    if index.d != dim or index.ntotal != num_items or len(item_ids) != num_items:
        raise ArtifactError(str(directory / "index.faiss"),
                            f"holds {index.ntotal} items of dim {index.d}, manifest says "
                            f"{num_items} of dim {dim} with {len(item_ids)} ids")
    return IndexArtifact(directory, index_version, model_version, dim, similarity, spec, index,
                         item_ids, dict(doc.get("measured", {})))

"""The versioned model artifact, written by training and read by the indexer and the service.

Layout of ``<store>/<model_version>/``::

    manifest.json          format, model_version, embedding_dim, similarity, feature spec,
                           training summary, sha256 of every other file
    user_tower/            SavedModel; signature "serving_default" takes the raw user and
                           context features (training.inputs) and returns {"user_emb": [n, d]}
    item_tower/            SavedModel; the same for item features, {"item_emb": [n, d]}
    item_embeddings.npy    float32 [n_items, d], every catalogue item
    item_ids.npy           unicode [n_items], external item ids in the same order
    user_tower_numpy.npz   the user tower as plain arrays, and .json its layer graph: what
    user_tower_numpy.json  the service runs online (retrieval.numpy_tower), no TensorFlow

The directory is written under a temporary name and renamed into place, so a reader never
sees half an artifact.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import ArtifactError
from training.feature_spec import Feature, FeatureSpec, parse_feature_spec

MODEL_FORMAT = "two-tower-model/1"
MANIFEST = "manifest.json"
SIMILARITY = "dot"


@dataclass(frozen=True)
class ModelManifest:
    path: Path
    model_version: str
    embedding_dim: int
    similarity: str
    normalized: bool
    feature_spec: FeatureSpec
    num_items: int
    files: dict[str, str]
    training: dict[str, Any]


def new_version(prefix: str) -> str:
    """Sortable, unique: prefix-YYYYmmddTHHMMSSZ-<6 hex>."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{prefix}-{stamp}-{secrets.token_hex(3)}"


def export_model(trained, store: str | Path, training_summary: dict[str, Any]) -> Path:
    """Write ``trained`` (training.train.TrainedModel) as a new version under ``store``."""
    from training.tf_env import tf

    spec = trained.dataset.spec
    version = new_version("m")
    store = Path(store)
    tmp = store / f".tmp-{version}"
    tmp.mkdir(parents=True)
    try:
        item_emb = trained.item_embeddings()
        _save_tower(tf, trained.user_tower, spec.user_input_features, "user_emb", tmp / "user_tower")
        _save_tower(tf, trained.item_tower, spec.tower("item"), "item_emb", tmp / "item_tower")
        np.save(tmp / "item_embeddings.npy", item_emb, allow_pickle=False)
        item_ids = trained.dataset.items[spec.columns.item_id].astype(str)
        np.save(tmp / "item_ids.npy", item_ids, allow_pickle=False)
        write_numpy_user_tower(trained, tmp)
        manifest = {
            "format": MODEL_FORMAT,
            "model_version": version,
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "embedding_dim": int(item_emb.shape[1]),
            "similarity": SIMILARITY,
            "normalized": bool(trained.config.tower.normalize),
            "num_items": int(item_emb.shape[0]),
            "feature_spec": spec.to_dict(),
            "training": training_summary,
            "files": checksums(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        final = store / version
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _save_tower(tf, tower, features: tuple[Feature, ...], output: str, path: Path) -> None:
    signature = {f.name: _tensor_spec(tf, f) for f in features}

    @tf.function(input_signature=[signature])
    def serve(inputs):
        return {output: tower(inputs, training=False)}

    tf.saved_model.save(tower, str(path), signatures={"serving_default": serve})


def _tensor_spec(tf, f: Feature):
    if f.kind == "numeric":
        return tf.TensorSpec([None], tf.float32, name=f.name)
    shape = [None, f.max_length] if f.is_sequence else [None]
    return tf.TensorSpec(shape, tf.string, name=f.name)


def checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file below ``directory`` except the manifest, by relative path."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            out[path.relative_to(directory).as_posix()] = _sha256(path)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(directory: Path, expected: dict[str, str],
                     required: tuple[str, ...] = ()) -> None:
    """Raise ArtifactError naming the first missing or altered file, a listed path outside
    ``directory``, or a ``required`` file (one the loader reads) the manifest does not list:
    nothing is read that the checksums do not cover."""
    for rel in required:
        if rel not in expected:
            raise ArtifactError(str(directory / rel), "not listed in the manifest's checksums; "
                                "it would be read unverified: rebuild the artifact")
    for rel, digest in expected.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ArtifactError(str(directory / MANIFEST),
                                f"lists {rel!r}, outside the artifact directory")
        path = directory / rel
        if not path.is_file():
            raise ArtifactError(str(path), "missing (listed in the manifest)")
        if _sha256(path) != digest:
            raise ArtifactError(str(path), "checksum mismatch: the file is corrupt or was altered")


def read_manifest_json(directory: Path, expected_format: str) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(str(path), "missing: not an artifact directory") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(str(path), f"not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != expected_format:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ArtifactError(str(path), f"format must be {expected_format!r} (got {got!r})")
    return doc


def load_model_manifest(directory: str | Path, verify: bool = True) -> ModelManifest:
    directory = Path(directory)
    doc = read_manifest_json(directory, MODEL_FORMAT)
    try:
        manifest = ModelManifest(
            path=directory,
            model_version=str(doc["model_version"]),
            embedding_dim=int(doc["embedding_dim"]),
            similarity=str(doc["similarity"]),
            normalized=bool(doc["normalized"]),
            feature_spec=parse_feature_spec(doc["feature_spec"], str(directory / MANIFEST)),
            num_items=int(doc["num_items"]),
            files=dict(doc["files"]),
            training=dict(doc.get("training", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(str(directory / MANIFEST), f"malformed manifest: {exc!r}") from exc
    if verify:
        verify_checksums(directory, manifest.files, MODEL_FILES_READ)
    return manifest


MODEL_FILES_READ = ("item_embeddings.npy", "item_ids.npy")  # the towers: retrieval.pair


def load_npy(path: Path) -> np.ndarray:
    """A .npy of numbers or strings. One of Python objects is refused: only pickle reads
    those, and unpickling runs whatever code the file names."""
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ArtifactError(str(path), f"cannot be read without pickle ({exc}); artifacts "
                            "hold plain arrays only: rebuild it") from exc


def load_item_embeddings(manifest: ModelManifest) -> tuple[np.ndarray, np.ndarray]:
    """(item_emb [n, d] float32, item_ids [n] str) of a model artifact."""
    item_emb = load_npy(manifest.path / "item_embeddings.npy")
    item_ids = load_npy(manifest.path / "item_ids.npy")
    if item_emb.shape != (manifest.num_items, manifest.embedding_dim) or len(item_ids) != len(item_emb):
        raise ArtifactError(str(manifest.path / "item_embeddings.npy"),
                            f"shape {item_emb.shape} does not match the manifest "
                            f"({manifest.num_items}, {manifest.embedding_dim})")
    return item_emb.astype(np.float32, copy=False), item_ids


def write_numpy_user_tower(trained, directory: Path) -> None:
    """user_tower_numpy.{npz,json} into ``directory``: the user tower as plain arrays and a
    layer graph (training.numpy_export), served by retrieval.numpy_tower without TensorFlow.
    Call it before the manifest's checksums are taken, so the files are listed there."""
    from training.numpy_export import export_numpy_user_tower

    export_numpy_user_tower(trained.user_tower, trained.dataset.spec, trained.stats, directory)

"""The model artifact's manifest: what training writes and the indexer and service read.

Layout of ``<store>/<model_version>/``::

    manifest.json          format, model_version, embedding_dim, similarity, feature spec,
                           training summary, sha256 of every other file
    user_tower/            SavedModel; signature "serving_default" takes the raw user and
                           context features (contracts.inputs) and returns {"user_emb": [n, d]}
    item_tower/            SavedModel; the same for item features, {"item_emb": [n, d]}
    item_embeddings.npy    float32 [n_items, d], every catalogue item
    item_ids.npy           unicode [n_items], external item ids in the same order
    user_tower_numpy.npz   the user tower as plain arrays, and .json its layer graph: what
    user_tower_numpy.json  the service runs online (retrieval.numpy_tower), no TensorFlow

The training summary (``training``) says which model this is: ``fit`` "train-split" (each
user's last two events were held out: the model evaluated) or "all-events" (trained on
every event: a final fit after evaluation, or no evaluation); ``epochs`` it trained (the
one early stopping kept); ``evaluation`` the held-out figures, always of the train-split
model (``evaluation.model_evaluated``), so for a final fit the figures it was chosen on;
``final_fit`` its examples, epochs and loss history.

Training writes it (training.artifact); this module reads and checks it, with no
TensorFlow: the serving install has none.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from contracts.errors import ArtifactError
from contracts.feature_spec import FeatureSpec, parse_feature_spec

MODEL_FORMAT = "two-tower-model/1"
MANIFEST = "manifest.json"
SIMILARITY = "dot"
# the NumPy user tower (written by training.numpy_export, run by retrieval.numpy_tower)
NUMPY_TOWER_FORMAT = "two-tower-numpy-user-tower/3"  # 2 + missing rows and indicators
# 3 + a history's "pooling" (mean | normalized_sum) and "activation" (linear | tanh);
# written only by a model whose history uses them (training.history)
NUMPY_TOWER_FORMAT_4 = "two-tower-numpy-user-tower/4"
# 4 + "linear": a low-rank linear part's table, summed over the history and appended to
# the (normalised) output (training.linear_part); written only by a model that has one
NUMPY_TOWER_FORMAT_5 = "two-tower-numpy-user-tower/5"
NUMPY_TOWER_FORMAT_2 = "two-tower-numpy-user-tower/2"
NUMPY_TOWER_FORMAT_1 = "two-tower-numpy-user-tower/1"  # vocabularies as JSON lists
NUMPY_TOWER_ARRAYS = "user_tower_numpy.npz"
NUMPY_TOWER_GRAPH = "user_tower_numpy.json"
MISSING = (FileNotFoundError, NotADirectoryError)  # no such file: open_regular lets these by


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

    @property
    def fit(self) -> str:
        """"all-events" or "train-split" (see the module's docstring); for an artifact
        written before the summary said so, what its evaluation implies."""
        stated = self.training.get("fit")
        if stated:
            return str(stated)
        return "train-split" if "evaluation" in self.training else "all-events"


def new_version(prefix: str) -> str:
    """Sortable, unique: prefix-YYYYmmddTHHMMSSZ-<6 hex>."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{prefix}-{stamp}-{secrets.token_hex(3)}"


def checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file below ``directory`` except the manifest, by relative path."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            out[path.relative_to(directory).as_posix()] = _sha256(path)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file; ArtifactError naming it if not.

    Opened non-blocking, then checked with fstat: a FIFO (or a device) put where an
    artifact file belongs is refused at once, instead of blocking the reader until
    something writes to it. MISSING errors pass through (callers word "missing")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except MISSING:
        raise
    except OSError as exc:  # a directory, a permission, a stalled mount
        raise ArtifactError(str(path), f"cannot be read: {exc.strerror or exc}") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ArtifactError(str(path), f"is {_kind(mode)}, not a regular file: refused")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), f"of mode {mode:o}")


def read_regular(path: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (open_regular); ArtifactError naming it when
    it cannot be read or is longer than ``max_bytes``."""
    try:
        with open_regular(path) as fh:
            data = fh.read(-1 if max_bytes is None else max_bytes + 1)
    except OSError as exc:
        if isinstance(exc, MISSING):
            raise
        raise ArtifactError(str(path), f"cannot be read: {exc.strerror or exc}") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise ArtifactError(str(path), f"is longer than {max_bytes} bytes: not what belongs here")
    return data


def read_json(path: Path) -> Any:
    """A JSON document; ArtifactError naming ``path`` when it is not UTF-8 JSON."""
    data = read_regular(path)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ArtifactError(str(path), f"not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                            f"offset {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(str(path), f"not valid JSON: {exc}") from exc


def check_inside(path: Path, root: Path, what: str = "the artifact directory") -> Path:
    """``path``'s real location (symlinks followed), which must lie below ``root``'s real
    location; ArtifactError naming ``path`` when a symlink leads out of it."""
    real, real_root = path.resolve(), root.resolve()
    if real != real_root and not real.is_relative_to(real_root):
        raise ArtifactError(str(path), f"leads to {real} through a symbolic link, outside "
                            f"{what} {real_root}: refused")
    return real


def verify_checksums(directory: Path, expected: dict[str, str],
                     required: tuple[str, ...] = ()) -> None:
    """Raise ArtifactError naming the first missing or altered file, a listed path outside
    ``directory`` (by its text, or by where its symbolic links lead), one that is not a
    regular file, or a ``required`` file (one the loader reads) the manifest does not list:
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
        if not path.exists():
            raise ArtifactError(str(path), "missing (listed in the manifest)")
        check_inside(path, directory)
        if _sha256(path) != digest:
            raise ArtifactError(str(path), "checksum mismatch: the file is corrupt or was altered")


def read_manifest_json(directory: Path, expected_format: str) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        doc = read_json(path)
    except MISSING as exc:
        raise ArtifactError(str(path), "missing: not an artifact directory") from exc
    check_inside(path, directory)
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
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
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

"""A model and the index built from it, loaded together and served together.

The pair is the unit of serving: the user tower of one model version and an index whose
manifest names that same version. A mismatch is refused at load time.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.artifact import load_index_artifact
from retrieval.candidate_index import CandidateIndex
from contracts.model_manifest import ModelManifest, load_model_manifest
from contracts.errors import ArtifactError
from contracts.inputs import UserRequest, user_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingPair:
    model: ModelManifest
    user_tower: Callable[[dict[str, np.ndarray]], np.ndarray]  # raw inputs → user_emb [n, d]
    index: CandidateIndex
    user_tower_kind: str = "auto"  # as asked for: auto | numpy | savedmodel

    @property
    def model_version(self) -> str:
        return self.model.model_version

    @property
    def index_version(self) -> str:
        return self.index.artifact.index_version

    def warm_up(self) -> None:
        """One cold-start request through tower and index: the first real call is not slow."""
        request = UserRequest(user_id="", features={}, history=(), context={}, event_time=0)
        user_emb = self.user_tower(user_inputs(self.model.feature_spec, [request]))
        self.index.search(user_emb, 1, [frozenset()])


def return_freed_heap() -> None:
    """Hand back to the system the heap that loading allocated and freed: glibc keeps it in
    its arenas for later allocations (30-50 MB of a 1M-item pair's temporaries in each
    worker of ``serve --workers``, which a server that only searches never asks for again).
    Nothing happens with another C library."""
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the GIL is released meanwhile: a few ms
    except (OSError, AttributeError):
        pass


USER_TOWERS = ("auto", "numpy", "savedmodel")


def load_user_tower(model: ModelManifest, kind: str = "auto"):
    """The NumPy tower (15-25x faster per call than the SavedModel here, and exactly equal
    to it, tests/test_numpy_tower.py) whenever the artifact has it; the SavedModel for older
    artifacts or when asked for."""
    if kind not in USER_TOWERS:
        raise ValueError(f"user tower must be one of {', '.join(USER_TOWERS)} (got {kind!r})")
    has_numpy = "user_tower_numpy.npz" in model.files
    if kind == "numpy" or (kind == "auto" and has_numpy):
        from retrieval.numpy_tower import NumpyUserTower

        return NumpyUserTower.from_manifest(model)
    try:
        from training.saved_model_tower import SavedModelUserTower
    except ImportError as exc:  # the serving install has no TensorFlow
        raise ArtifactError(str(model.path / "user_tower"), "this artifact has no NumPy user "
                            "tower, and the SavedModel one needs TensorFlow: install "
                            "two-tower-retrieval[train], or re-export the model") from exc
    return SavedModelUserTower(model)


def load_pair(model_dir: str | Path, index_dir: str | Path, user_tower: str = "auto",
              reuse: ServingPair | None = None) -> ServingPair:
    """Load and cross-check; raises ArtifactError naming the file and what did not match.
    ``reuse``: the pair being served; when its model is the same version directory, its
    manifest and user tower are kept (a version directory never changes once published),
    so a new index of the same model costs no second checksum pass over the model."""
    same_model = (reuse is not None and reuse.model.path.resolve() == Path(model_dir).resolve()
                  and reuse.user_tower_kind == user_tower)
    model = reuse.model if same_model else load_model_manifest(model_dir)
    # mapped, not copied: the workers of `serve --workers` share the pages (retrieval.workers)
    index = load_index_artifact(index_dir, mmap=True)
    manifest = index.path / "manifest.json"
    if index.model_version != model.model_version:
        raise ArtifactError(str(manifest), f"index was built from model {index.model_version!r} "
                            f"but the model to serve is {model.model_version!r}")
    if index.embedding_dim != model.embedding_dim:
        raise ArtifactError(str(manifest), f"embedding_dim {index.embedding_dim} does not match "
                            f"the model's {model.embedding_dim}")
    if index.similarity != model.similarity:
        raise ArtifactError(str(manifest), f"similarity {index.similarity!r} does not match the "
                            f"model's {model.similarity!r}")
    tower = reuse.user_tower if same_model else load_user_tower(model, user_tower)
    pair = ServingPair(model, tower, CandidateIndex(index), user_tower)
    pair.warm_up()
    return_freed_heap()
    log.info("loaded model %s (%s user tower) with index %s (%d items)", pair.model_version,
             type(pair.user_tower).__name__, pair.index_version, pair.index.size)
    return pair

"""The exported user tower as a SavedModel: the online tower of artifacts without the
NumPy one, and the reference the NumPy tower is tested against. Needs TensorFlow."""

from __future__ import annotations

import numpy as np

from contracts.errors import ArtifactError
from contracts.model_manifest import ModelManifest


class SavedModelUserTower:
    """The exported user tower: raw input dict → user_emb [n, d] float32."""

    def __init__(self, manifest: ModelManifest) -> None:
        from training.tf_env import tf

        self._tf = tf
        path = manifest.path / "user_tower"
        try:
            self._fn = tf.saved_model.load(str(path)).signatures["serving_default"]
        except (OSError, ValueError, KeyError) as exc:
            raise ArtifactError(str(path), f"cannot load the user tower SavedModel: {exc}") from exc

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        tensors = {k: self._tf.constant(v) for k, v in inputs.items()}
        return self._fn(**tensors)["user_emb"].numpy()

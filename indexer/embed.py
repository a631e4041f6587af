"""Item embeddings from item features: the model's exported item tower, run in batches.

Used when the job is given ``--items``: new and cold-start items get embeddings from their
features, the same function that produced the training-time embeddings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np

from indexer.items import ItemTable
from indexer.source import sample_rows
from contracts.model_manifest import ModelManifest
from contracts.errors import ArtifactError
from contracts.inputs import item_inputs

log = logging.getLogger(__name__)
BATCH = 4096


class ItemTowerSource:
    """An EmbeddingSource over ``items``: item_tower/ SavedModel → {"item_emb": [n, d]}."""

    def __init__(self, model: ModelManifest, items: ItemTable, batch_size: int = BATCH) -> None:
        from training.tf_env import tf

        self._tf, self._batch = tf, batch_size
        path = model.path / "item_tower"
        try:
            self._fn = tf.saved_model.load(str(path)).signatures["serving_default"]
        except (OSError, ValueError, KeyError) as exc:
            raise ArtifactError(str(path), f"cannot load the item tower SavedModel: {exc}") from exc
        self._inputs = item_inputs(model.feature_spec, items.columns)
        self.num_items, self.dim = items.num_items, model.embedding_dim
        self.seconds = 0.0  # spent in the tower, for the job's timing summary

    def embed(self, rows: np.ndarray | slice) -> np.ndarray:
        """item_emb [len(rows), d] float32 of the given catalogue rows."""
        start = time.perf_counter()
        inputs = {name: values[rows] for name, values in self._inputs.items()}
        n = len(next(iter(inputs.values())))
        parts = [self._run({k: v[lo:lo + self._batch] for k, v in inputs.items()})
                 for lo in range(0, n, self._batch)]
        self.seconds += time.perf_counter() - start
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def _run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        out = self._fn(**{k: self._tf.constant(v) for k, v in batch.items()})["item_emb"]
        item_emb = out.numpy().astype(np.float32, copy=False)
        if item_emb.shape[1] != self.dim:
            raise ArtifactError("item_tower", f"returns dim {item_emb.shape[1]}, the manifest "
                                f"says {self.dim}")
        return item_emb

    def sample(self, size: int, seed: int) -> np.ndarray:
        return self.embed(sample_rows(self.num_items, size, seed))

    def chunks(self, chunk_size: int) -> Iterator[np.ndarray]:
        for lo in range(0, self.num_items, chunk_size):
            yield self.embed(slice(lo, lo + chunk_size))

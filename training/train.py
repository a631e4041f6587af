"""Training entry point: dataset in, fitted towers out."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from training.dataset import Dataset
from training.inputs import item_inputs, training_examples
from training.model import FeatureStats, Towers, TowerConfig, TwoTowerModel, compute_feature_stats
from training.tf_env import keras, tf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    tower: TowerConfig = field(default_factory=TowerConfig)
    epochs: int = 5
    batch_size: int = 256
    learning_rate: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0 (got {self.learning_rate})")


@dataclass
class TrainedModel:
    model: TwoTowerModel
    stats: FeatureStats
    dataset: Dataset
    history: dict[str, list[float]]

    @property
    def user_tower(self) -> keras.Model:
        return self.model.user_tower

    @property
    def item_tower(self) -> keras.Model:
        return self.model.item_tower

    def item_embeddings(self, batch_size: int = 4096) -> np.ndarray:
        """[n_items, d] float32 embeddings of every catalogue item, in item-table order."""
        inputs = item_inputs(self.dataset.spec, self.dataset.items)
        return _predict(self.item_tower, inputs, batch_size)

    def user_embeddings(self, inputs: dict[str, np.ndarray], batch_size: int = 4096):
        return _predict(self.user_tower, inputs, batch_size)


def train(dataset: Dataset, config: TrainConfig = TrainConfig(),
          examples: dict[str, np.ndarray] | None = None) -> TrainedModel:
    """Fit a two-tower model on ``examples`` (default: every interaction of ``dataset``)."""
    keras.utils.set_random_seed(config.seed)
    if examples is None:
        examples = training_examples(dataset)
    stats = compute_feature_stats(dataset.spec, examples, dataset.items)
    towers = Towers(dataset.spec, stats, config.tower)
    model = TwoTowerModel(towers.user_tower(), towers.item_tower())
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
    n = len(next(iter(examples.values())))
    data = (
        tf.data.Dataset.from_tensor_slices(examples)
        .shuffle(n, seed=config.seed, reshuffle_each_iteration=True)
        .batch(config.batch_size, drop_remainder=n >= config.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    log.info("training on %d examples, %d epochs, batch %d", n, config.epochs, config.batch_size)
    fit = model.fit(data, epochs=config.epochs, verbose=0,
                    callbacks=[EpochProgress(config.epochs, n)])
    return TrainedModel(model, stats, dataset, {k: list(v) for k, v in fit.history.items()})


class EpochProgress(keras.callbacks.Callback):
    """Logs one line per epoch: loss, time, throughput."""

    def __init__(self, epochs: int, examples: int) -> None:
        super().__init__()
        self.epochs, self.examples, self._start = epochs, examples, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        log.info("epoch %d/%d  loss %.4f  %.1fs  %.0f examples/s", epoch + 1, self.epochs,
                 (logs or {}).get("loss", float("nan")), seconds, self.examples / seconds)


def _predict(tower: keras.Model, inputs: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    inputs = {k: inputs[k] for k in tower.input}  # other towers' features are not ours
    n = len(next(iter(inputs.values())))
    parts = []
    for start in range(0, n, batch_size):
        batch = {k: tf.constant(v[start:start + batch_size]) for k, v in inputs.items()}
        parts.append(tower(batch, training=False).numpy())
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)

"""Training entry point: dataset in, fitted towers out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from contracts.dataset import Dataset
from training.distributed import training_strategy
from training.linear_part import Interactions, LinearConfig, LinearPart, fit_linear_part
from contracts.inputs import item_inputs, training_examples
from training.model import (
    CANDIDATE_Q, FeatureStats, LossConfig, Towers, TowerConfig, TwoTowerModel,
    compute_feature_stats,
)
from training.sampling import corpus_sampling_weights, exact_item_frequencies
from training.optimizers import OPTIMIZERS, make_optimizer
from training.tf_env import keras, tf

log = logging.getLogger(__name__)


LEARNING_RATE_SCHEDULES = ("constant", "cosine")
EXAMPLE_KINDS = ("events", "users")


@dataclass(frozen=True)
class TrainConfig:
    tower: TowerConfig = field(default_factory=TowerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    epochs: int = 5
    batch_size: int = 256
    learning_rate: float = 0.01
    seed: int = 0
    checkpoint_dir: str | None = None    # resume from the latest checkpoint found there
    checkpoint_every_steps: int = 1000   # streamed training: also every N steps (resume.py)
    tensorboard_dir: str | None = None
    early_stopping_patience: int = 0     # epochs without validation gain; 0 = off
    # constant, or cosine: decayed from learning_rate to 0 over all epochs' steps
    learning_rate_schedule: str = "constant"
    # adam, lazy-adam (sparse updates of the embedding rows a batch touched), or auto:
    # lazy-adam when an embedding table has 100k rows or more, else adam (optimizers.py)
    optimizer: str = "auto"
    # events: one example per interaction (sampled softmax, training.model); users: one per
    # user, their history in, their items out (multinomial likelihood, training.user_level)
    examples: str = "events"
    # a closed-form low-rank linear model served beside the towers (training.linear_part);
    # rank 0: none. Fit on the per-user examples' targets, so examples "users" only
    linear: LinearConfig = field(default_factory=LinearConfig)

    def __post_init__(self) -> None:
        if self.examples not in EXAMPLE_KINDS:
            raise ValueError(f"examples must be one of {', '.join(EXAMPLE_KINDS)} "
                             f"(got {self.examples!r})")
        if self.linear.rank and self.examples != "users":
            raise ValueError("a linear part (linear rank > 0) is fit on per-user examples: "
                             "train with examples 'users'")
        for name in ("epochs", "batch_size", "checkpoint_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0 (got {self.learning_rate})")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)} "
                             f"(got {self.optimizer!r})")
        if self.learning_rate_schedule not in LEARNING_RATE_SCHEDULES:
            raise ValueError(f"learning_rate_schedule must be one of "
                             f"{', '.join(LEARNING_RATE_SCHEDULES)} "
                             f"(got {self.learning_rate_schedule!r})")


@dataclass
class TrainedModel:
    model: TwoTowerModel
    stats: FeatureStats
    dataset: Dataset
    history: dict[str, list[float]]
    config: TrainConfig = field(default_factory=TrainConfig)
    # the epoch whose weights these are (1-based): early stopping's best, else the last run
    kept_epoch: int = 0
    # served beside the towers when set (training.linear_part); set after training
    linear: LinearPart | None = None
    _served: tuple | None = field(default=None, repr=False)

    @property
    def user_tower(self) -> keras.Model:
        """The user tower as served: the trained one, with the linear part when there is one."""
        return self._served_towers()[0] if self.linear is not None else self.model.user_tower

    @property
    def item_tower(self) -> keras.Model:
        return self._served_towers()[1] if self.linear is not None else self.model.item_tower

    def with_linear(self, part: LinearPart | None) -> TrainedModel:
        """Serve ``part`` beside the trained towers (None: the towers alone)."""
        self.linear, self._served = part, None
        return self

    def _served_towers(self) -> tuple:
        if self._served is None:
            from training.linear_towers import served_towers

            spec = self.dataset.spec
            self._served = served_towers(self.model.user_tower, self.model.item_tower, spec,
                                         self.dataset.items[spec.columns.item_id], self.linear)
        return self._served

    def item_embeddings(self, batch_size: int = 4096) -> np.ndarray:
        """[n_items, d] float32 embeddings of every catalogue item, in item-table order."""
        inputs = item_inputs(self.dataset.spec, self.dataset.items)
        return _predict(self.item_tower, inputs, batch_size)

    def user_embeddings(self, inputs: dict[str, np.ndarray], batch_size: int = 4096):
        return _predict(self.user_tower, inputs, batch_size)


Validator = Callable[["TrainedModel"], dict[str, float]]
VALIDATION_METRIC = "ndcg@10"


def train(dataset: Dataset, config: TrainConfig = TrainConfig(),
          examples: dict[str, np.ndarray] | None = None,
          validate: Validator | None = None) -> TrainedModel:
    """Fit a two-tower model on ``examples`` (default: every interaction of ``dataset``).

    ``validate`` (optional) is called after every epoch with the model so far and returns
    validation metrics; with early stopping the weights of the best epoch by ndcg@10 are kept.
    With ``config.examples`` "users", ``examples`` are per-user rows
    (training.user_level.user_examples; default: every user of ``dataset``).
    """
    if config.examples == "users":
        return train_users(dataset, config, examples, validate)
    keras.utils.set_random_seed(config.seed)
    if examples is None:
        examples = training_examples(dataset)
    spec = dataset.spec
    stats = compute_feature_stats(spec, examples, dataset.items)
    examples = _with_candidate_q(examples, spec.columns.item_id)
    counts = None
    if config.loss.corpus_negatives:
        counts = _item_counts(examples[spec.columns.item_id],
                              np.asarray(dataset.items[spec.columns.item_id], dtype=object))
    n = len(examples[spec.columns.item_id])
    model = compiled_model(spec, stats, config, n, dataset.items, counts)
    data = (
        tf.data.Dataset.from_tensor_slices(examples)
        .shuffle(min(n, 1_000_000), seed=config.seed, reshuffle_each_iteration=True)
        .batch(config.batch_size, drop_remainder=n >= config.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    return fit(TrainedModel(model, stats, dataset, {}, config), data, n, validate)


def train_users(dataset: Dataset, config: TrainConfig,
                examples: dict[str, np.ndarray] | None = None,
                validate: Validator | None = None,
                stats: FeatureStats | None = None) -> TrainedModel:
    """:func:`train` for ``config.examples`` "users" (training.user_level): ``examples`` per
    user (default: every user of ``dataset``), the same callbacks; ``stats`` (default:
    computed from the examples and the catalogue) as prepared shards give them."""
    from training import user_level

    keras.utils.set_random_seed(config.seed)
    spec = dataset.spec
    user_level.check_user_level_spec(spec)
    if config.linear.rank:  # refused before training: the linear part reads the history
        from training.linear_towers import linear_history_feature

        linear_history_feature(spec)
    if examples is None:
        examples = user_level.user_examples(dataset)
    if stats is None:
        stats = compute_feature_stats(
            spec, user_level.stats_examples(spec, examples, dataset.items), dataset.items)
    n = len(examples[user_level.TARGETS])
    model = user_level.compiled_user_level_model(spec, stats, config,
                                                 _learning_rate(config, n), dataset.items)
    data = (tf.data.Dataset.from_tensor_slices(dict(examples))
            .shuffle(n, seed=config.seed, reshuffle_each_iteration=True)
            .batch(config.batch_size, drop_remainder=n >= config.batch_size)
            .prefetch(tf.data.AUTOTUNE))
    trained = fit(TrainedModel(model, stats, dataset, {}, config), data, n, validate)
    if config.linear.rank:
        n_items = len(dataset.items[spec.columns.item_id])
        log.info("fitting the linear part: rank %d, λ %g, weight %g", config.linear.rank,
                 config.linear.l2, config.linear.weight)
        trained.with_linear(fit_linear_part(
            Interactions.of_targets(examples[user_level.TARGETS], n_items), config.linear,
            config.seed))
    return trained


def fit(trained: TrainedModel, data, n: int, validate: Validator | None = None,
        steps_per_epoch: int | None = None,
        checkpoint: keras.callbacks.Callback | None = None) -> TrainedModel:
    """Run Keras's fit of ``trained.model`` on ``data`` (``n`` examples an epoch) with our
    callbacks (checkpoint resume, validation, early stopping, progress); ``steps_per_epoch``
    for an endless stream; ``checkpoint``: a callback that saves and restores itself, instead
    of the per-epoch EpochCheckpoint of ``config.checkpoint_dir``."""
    config = trained.config
    callbacks = _callbacks(config, trained, n, validate, checkpoint)
    initial_epoch = callbacks[0].restore() if isinstance(callbacks[0], EpochCheckpoint) else 0
    log.info("training on %d examples, %d epochs, batch %d, loss %s", n, config.epochs,
             config.batch_size, config.loss)
    history = trained.model.fit(data, epochs=config.epochs, initial_epoch=initial_epoch,
                                steps_per_epoch=steps_per_epoch, verbose=0,
                                callbacks=callbacks)
    trained.history = {k: [float(x) for x in v] for k, v in history.history.items()}
    # history.epoch holds the epochs run, numbered from 0 over the whole run (a checkpoint
    # callback may have resumed at a later epoch than initial_epoch)
    last = history.epoch[-1] + 1 if history.epoch else initial_epoch
    trained.kept_epoch = _kept_epoch(callbacks, last)
    return trained


def _kept_epoch(callbacks: list, last_epoch: int) -> int:
    """The epoch (1-based) whose weights the model holds once fit returns."""
    stopping = next((c for c in callbacks if isinstance(c, _EarlyStopping)), None)
    if stopping is not None and stopping.best_weights is not None:
        return int(stopping.best_epoch) + 1
    return last_epoch


def compiled_model(spec, stats: FeatureStats, config: TrainConfig, n: int,
                   items: dict[str, np.ndarray], item_counts: np.ndarray | None) -> TwoTowerModel:
    """The model, built and compiled in the training strategy's scope; ``items`` is the
    catalogue (corpus negatives), ``item_counts`` [n_items] its training counts (corpus
    sampling weights; needed with corpus negatives only)."""
    corpus, corpus_probs = None, None
    if config.loss.uses_corpus:
        corpus = item_inputs(spec, items)
    if config.loss.corpus_negatives:
        corpus_probs = corpus_sampling_weights(item_counts, config.loss.corpus_distribution,
                                               config.loss.corpus_beta)
    return _compiled_model(spec, stats, config, n, corpus, corpus_probs)


def _compiled_model(spec, stats, config: TrainConfig, n: int, corpus, corpus_probs):
    with training_strategy().scope():
        towers = Towers(spec, stats, config.tower)
        model = TwoTowerModel(towers.user_tower(), towers.item_tower(), spec.columns.item_id,
                              config.loss, config.batch_size, corpus, corpus_probs)
        model.compile(optimizer=make_optimizer(config.optimizer, _learning_rate(config, n),
                                               model))
    return model


def _learning_rate(config: TrainConfig, n: int):
    if config.learning_rate_schedule == "constant":
        return config.learning_rate
    steps = config.epochs * max(1, n // config.batch_size)
    return keras.optimizers.schedules.CosineDecay(config.learning_rate, steps)


def _with_candidate_q(examples: dict[str, np.ndarray], item_id: str) -> dict[str, np.ndarray]:
    freq = exact_item_frequencies(examples[item_id])
    q = np.fromiter((freq[str(i)] for i in examples[item_id]), np.float32,
                    count=len(examples[item_id]))
    return {**examples, CANDIDATE_Q: q}


def _item_counts(example_items: np.ndarray, catalogue: np.ndarray) -> np.ndarray:
    freq = exact_item_frequencies(example_items)
    return np.array([freq.get(str(i), 0.0) for i in catalogue]) * len(example_items)


def _callbacks(config: TrainConfig, trained: TrainedModel, n: int, validate,
               checkpoint: keras.callbacks.Callback | None = None) -> list:
    callbacks: list = []
    if checkpoint is not None:
        callbacks.append(checkpoint)
    elif config.checkpoint_dir:
        callbacks.append(EpochCheckpoint(trained.model, config.checkpoint_dir))
    if validate is not None:
        callbacks.append(Validation(trained, validate))  # before EarlyStopping: it reads val_*
        if config.early_stopping_patience:
            callbacks.append(_EarlyStopping(config.early_stopping_patience))
    callbacks.append(EpochProgress(config.epochs, n, config.batch_size))
    if config.tensorboard_dir:
        callbacks.append(keras.callbacks.TensorBoard(config.tensorboard_dir, update_freq="epoch"))
    return callbacks


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves model and optimizer state after each epoch; ``restore`` resumes from the last.

    Not Keras's BackupAndRestore: it keeps only the last epoch, under a ``chief/`` folder,
    and cannot resume the ``ckpt-N`` files (the last three epochs) a --checkpoint-dir holds.
    """

    def __init__(self, model: TwoTowerModel, directory: str, keep: int = 3) -> None:
        super().__init__()
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer,
                                              epoch=self.epoch)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=keep)

    def restore(self) -> int:
        if self.manager.latest_checkpoint is None:
            return 0
        self.checkpoint.restore(self.manager.latest_checkpoint)
        log.info("resumed from %s (epoch %d done)", self.manager.latest_checkpoint,
                 int(self.epoch.numpy()))
        return int(self.epoch.numpy())

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)


class Validation(keras.callbacks.Callback):
    """Validation metrics every epoch, into ``logs`` (so the fit history and EarlyStopping
    see them) as val_*; Keras has no callback for a metric computed outside the model."""

    def __init__(self, trained: TrainedModel, validate: Validator) -> None:
        super().__init__()
        self.trained, self.validate = trained, validate

    def on_epoch_end(self, epoch, logs=None):
        metrics = self.validate(self.trained)
        for name, value in metrics.items():
            (logs if logs is not None else {})[f"val_{name}"] = value
        log.info("epoch %d validation %s", epoch + 1,
                 "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


class _EarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's early stopping on validation ndcg@10, best epoch's weights restored at the
    end; this subclass only writes its two messages to the log instead of stdout."""

    def __init__(self, patience: int) -> None:
        super().__init__(monitor=f"val_{VALIDATION_METRIC}", mode="max", patience=patience,
                         restore_best_weights=True)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.model.stop_training and self.stopped_epoch == epoch:
            log.info("early stopping: no %s gain for %d epochs", VALIDATION_METRIC,
                     self.patience)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        if self.best_weights is not None:
            log.info("restored the weights of epoch %d (%s %.4f)", self.best_epoch + 1,
                     VALIDATION_METRIC, self.best)


class EpochProgress(keras.callbacks.Callback):
    """Progress in the log: every tenth of an epoch (steps, loss, examples/s, the epoch's
    ETA) and one line per epoch (loss, time, throughput)."""

    def __init__(self, epochs: int, examples: int, batch_size: int = 256) -> None:
        super().__init__()
        self.epochs, self.examples, self._start, self._epoch = epochs, examples, 0.0, 0
        self.steps = max(1, examples // batch_size)
        self.every = max(1, self.steps // 10)

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._epoch = time.perf_counter(), epoch

    def on_train_batch_end(self, batch, logs=None):
        step = batch + 1
        if step % self.every == 0 and step < self.steps:
            seconds = time.perf_counter() - self._start
            rate = step * self.examples / self.steps / seconds
            log.info("epoch %d/%d  step %d/%d (%3.0f%%)  loss %.4f  %.0f examples/s  ETA %s",
                     self._epoch + 1, self.epochs, step, self.steps, 100 * step / self.steps,
                     (logs or {}).get("loss", float("nan")), rate,
                     _duration(seconds * (self.steps - step) / step))

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        log.info("epoch %d/%d  loss %.4f  %.1fs  %.0f examples/s", epoch + 1, self.epochs,
                 (logs or {}).get("loss", float("nan")), seconds, self.examples / seconds)


def _duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _predict(tower: keras.Model, inputs: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    inputs = {k: inputs[k] for k in tower.input}  # other towers' features are not ours
    n = len(next(iter(inputs.values())))
    out = np.zeros((0, 0), np.float32)
    for start in range(0, n, batch_size):
        batch = {k: tf.constant(v[start:start + batch_size]) for k, v in inputs.items()}
        emb = tower(batch, training=False).numpy()
        if start == 0:  # filled in place: [n, d] is made once (1M items × 512: 2 GB, not 6)
            out = np.empty((n, emb.shape[1]), np.float32)
        out[start:start + len(emb)] = emb
    return out

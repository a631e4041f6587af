"""Checkpoints inside an epoch, for training streamed from shards (training.train_shards).

``StepCheckpoint`` is Keras's BackupAndRestore saving every N steps and at each epoch's end,
its checkpoint kept after training (so a rerun with more epochs continues, as
``--checkpoint-dir`` always did). Keras restores the model, the optimizer and the position
(epoch, step) itself when fit starts, and then runs only the rest of that epoch; it does not
move the data. ``resume_position`` reads that position before the stream is built, so the
stream can start where the interrupted run stopped: the shard order and row shuffle are
seeded per pass (training.shards), so the examples after global step g of a rerun are those
the first run would have trained on.

Under TF_CONFIG every worker restores the chief's checkpoint (``<dir>/chief``, a directory
all workers must see) and skips its own stream's rows, so a resumed multi-worker run is the
same run too.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from contracts.errors import ArtifactError
from training.tf_env import keras, tf

log = logging.getLogger(__name__)
_EPOCH = "ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE"   # BackupAndRestore's own variables
_BATCH = "ckpt_saved_batch/.ATTRIBUTES/VARIABLE_VALUE"


@dataclass(frozen=True)
class Position:
    """Where training resumes: ``epoch`` (0-based) after ``step`` of its steps."""

    epoch: int
    step: int
    steps_per_epoch: int

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step


class StepCheckpoint(keras.callbacks.BackupAndRestore):
    """BackupAndRestore every ``every`` steps and after each epoch, kept after training."""

    def __init__(self, directory: str, every: int, steps_per_epoch: int) -> None:
        super().__init__(directory, save_freq=every, delete_checkpoint=False)
        self.steps_per_epoch = steps_per_epoch

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self._batches_count == 0:
            log.debug("checkpoint at epoch %d step %d", self._current_epoch + 1, batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        # the step counter saves inside epochs only; a finished epoch is always saved
        if self._batches_count:
            self._batches_count = 0
            self._backup(epoch=epoch, batch=self.steps_per_epoch - 1)


def resume_position(directory: str | None, steps_per_epoch: int) -> Position:
    """The position a StepCheckpoint in ``directory`` resumes at, as Keras computes it when
    fit restores it (epoch 0 step 0 without one)."""
    latest = tf.train.latest_checkpoint(os.path.join(directory, "chief")) if directory else None
    if latest is None:
        return Position(0, 0, steps_per_epoch)
    reader = tf.train.load_checkpoint(latest)
    epoch, batch = int(reader.get_tensor(_EPOCH)), int(reader.get_tensor(_BATCH))
    if batch >= steps_per_epoch:
        raise ArtifactError(latest, f"checkpoint after step {batch + 1} of an epoch, but this "
                            f"run has {steps_per_epoch} steps per epoch (another batch size "
                            f"or data?): resume with the same options or use a new "
                            f"--checkpoint-dir")
    if batch < 0:
        position = Position(max(epoch, 0), 0, steps_per_epoch)
    elif batch == steps_per_epoch - 1:
        position = Position(epoch + 1, 0, steps_per_epoch)
    else:
        position = Position(epoch, batch + 1, steps_per_epoch)
    log.info("resuming from %s at epoch %d step %d of %d (global step %d)", latest,
             position.epoch + 1, position.step, steps_per_epoch, position.global_step)
    return position

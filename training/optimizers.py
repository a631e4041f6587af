"""The optimizers `train` offers, by name.

``adam`` is Keras's Adam. Given an embedding table's sparse gradient it still decays both
of its slots and moves the variable over every row on every step (the IndexedSlices branch
of tf_keras's Adam.update_step), so a step costs O(vocabulary × dim): at 1M items and 400k
users a step took 5.7× the 100k-item one (docs/training.md).

``lazy-adam`` updates only the rows a batch touched: their moments decay and move, the
others keep theirs until their next use (as TF Addons' LazyAdam did, which is no longer
maintained). Dense variables (the MLP) get Adam's update unchanged.

``auto`` (what `two-tower train` defaults to) is lazy-adam when the model's largest
embedding table has ``LAZY_FROM_ROWS`` rows or more, where Adam's dense slot updates
dominate a step (at 1M items lazy-adam trained 18,735 examples/s against Adam's 2,013), and
Adam below, where both are fast and Adam is the optimizer the MovieLens settings were chosen
with (docs/training.md has both measurements).
"""

from __future__ import annotations

import logging

from training.tf_env import keras, tf

log = logging.getLogger(__name__)

OPTIMIZERS = ("auto", "adam", "lazy-adam")
LAZY_FROM_ROWS = 100_000  # auto: lazy-adam from this many rows in one embedding table


class LazyAdam(keras.optimizers.Adam):
    """Adam whose sparse (embedding) updates touch only the rows of the batch."""

    def update_step(self, gradient, variable):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        lr = tf.cast(self.learning_rate, dtype)
        alpha = lr * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
        key = self._var_key(variable)
        m = self._momentums[self._index_dict[key]]
        v = self._velocities[self._index_dict[key]]
        rows, position = tf.unique(gradient.indices)  # a row may appear several times
        grad = tf.math.unsorted_segment_sum(gradient.values, position, tf.shape(rows)[0])
        m_rows = beta_1 * tf.gather(m, rows) + (1 - beta_1) * grad
        v_rows = beta_2 * tf.gather(v, rows) + (1 - beta_2) * tf.square(grad)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        variable.scatter_sub(tf.IndexedSlices(
            alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon), rows))


def make_optimizer(name: str, learning_rate, model=None):
    """The optimizer ``name``; ``auto`` picks by ``model``'s largest embedding table."""
    if name == "auto":
        name = chosen_for(model)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "lazy-adam":
        return LazyAdam(learning_rate)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {name!r})")


def chosen_for(model) -> str:
    """lazy-adam for a model with an embedding table of LAZY_FROM_ROWS rows or more, else
    adam; logged, since it decides a step's cost at scale."""
    tables = [m.input_dim for m in model.submodules if isinstance(m, keras.layers.Embedding)]
    largest = max(tables, default=0)
    name = "lazy-adam" if largest >= LAZY_FROM_ROWS else "adam"
    log.info("optimizer auto: %s (largest embedding table %s rows; lazy-adam from %s)",
             name, f"{largest:,}", f"{LAZY_FROM_ROWS:,}")
    return name

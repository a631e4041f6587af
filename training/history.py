"""The history encoder of a history-as-user tower (training.model.TowerConfig's
``history_pooling``, ``history_table`` and ``history_activation``).

A history of thousands of items is mostly padding for most users, so only the real ids
are looked up and embedded: ``HistoryKeep`` keeps the non-"" ids of each row (minus those
input dropout leaves out, in training) as one flat vector with the row each came from;
the lookup and the Embedding run on that vector; ``HistoryPool`` sums per row and divides
by the count (``mean``) or its square root (``normalized_sum``: the L2-normalised multi-hot
times the table, Mult-DAE's input layer), then applies the activation. An empty row is
zeros (tanh(0) = 0). The Embedding stays a layer of the tower's graph under its own name,
so the NumPy export finds it as it finds any other (training.numpy_export).
"""

from __future__ import annotations

from training.tf_env import keras, tf

POOLINGS = ("mean", "normalized_sum")
HISTORY_TABLES = ("shared", "own")  # the item-id table, or one of the history's own
HISTORY_ACTIVATIONS = ("linear", "tanh")


class HistoryKeep(keras.layers.Layer):
    """ids [n, L] string → (kept ids [m] string, their row in [0, n) int64 [m]): the
    non-"" ids, each left out with probability ``dropout`` in training only."""

    def __init__(self, dropout: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dropout = dropout

    def get_config(self) -> dict:
        return {**super().get_config(), "dropout": self.dropout}

    def call(self, ids, training=None):
        present = tf.not_equal(ids, "")
        if training and self.dropout > 0.0:
            present &= tf.random.uniform(tf.shape(ids)) >= self.dropout
        where = tf.where(present)
        return tf.gather_nd(ids, where), where[:, 0]


class HistoryPool(keras.layers.Layer):
    """(embedded [m, d], row [m] int64, ids [n, L]) → [n, d]: per row, the sum of its
    embeddings over count (mean) or sqrt(count) (normalized_sum), then the activation."""

    def __init__(self, pooling: str = "mean", activation: str = "linear", **kwargs) -> None:
        super().__init__(**kwargs)
        self.pooling, self.activation = pooling, activation

    def get_config(self) -> dict:
        return {**super().get_config(), "pooling": self.pooling, "activation": self.activation}

    def call(self, embedded, rows, ids):
        n = tf.shape(ids)[0]
        total = tf.math.unsorted_segment_sum(embedded, rows, n)
        ones = tf.ones(tf.shape(rows), embedded.dtype)
        count = tf.maximum(tf.math.unsorted_segment_sum(ones, rows, n), 1.0)[:, tf.newaxis]
        pooled = total / (count if self.pooling == "mean" else tf.sqrt(count))
        return tf.tanh(pooled) if self.activation == "tanh" else pooled


def encode_history(name: str, ids, lookup, embedding, pooling: str, activation: str,
                   dropout: float):
    """ids [n, L] string → [n, d] through ``lookup`` and ``embedding`` (Keras layers)."""
    kept, rows = HistoryKeep(dropout, name=f"{name}_keep")(ids)
    embedded = embedding(lookup(kept))
    return HistoryPool(pooling, activation, name=f"{name}_pool")(embedded, rows, ids)

"""The two-tower model, built from a feature spec.

Each tower is a Keras functional model over a dict of raw inputs (training.inputs): every
feature is encoded (vocabulary lookup + embedding, normalisation, or masked mean of a bag),
the encodings are concatenated and an MLP maps them to the embedding. The user tower's
history feature shares the item-id vocabulary and embedding table with the item tower.

Training is in-batch softmax (``tfrs.tasks.Retrieval``): each positive item is scored
against the other items of the batch; scores are dot products.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from training.feature_spec import Feature, FeatureSpec
from training.tf_env import keras, tf, tfrs


@dataclass(frozen=True)
class TowerConfig:
    embedding_dim: int = 32
    hidden_dims: tuple[int, ...] = (64,)


@dataclass(frozen=True)
class FeatureStats:
    """What the encoders learn from the training data: vocabularies and numeric moments."""

    vocabularies: Mapping[str, tuple[str, ...]]
    means: Mapping[str, float]
    variances: Mapping[str, float]


def compute_feature_stats(spec: FeatureSpec, examples: Mapping[str, np.ndarray],
                          items: Mapping[str, np.ndarray]) -> FeatureStats:
    """Vocabularies from the training examples, plus every catalogue item (so items nobody
    interacted with still get an id embedding) and the full range of derived context."""
    vocab, means, variances = {}, {}, {}
    for f in spec.features:
        if f.kind == "numeric":
            values = examples[f.name]
            values = values[np.isfinite(values)]
            means[f.name] = float(values.mean()) if len(values) else 0.0
            variances[f.name] = float(values.var()) if len(values) else 1.0
        elif f.kind != "history":
            source = examples[f.name]
            if f.tower == "item":
                source = np.concatenate([np.ravel(source), np.ravel(_item_column(f, items))])
            vocab[f.name] = _vocabulary(np.ravel(source), f)
    return FeatureStats(vocab, means, variances)


def _item_column(f: Feature, items: Mapping[str, np.ndarray]) -> np.ndarray:
    values = items[f.name]
    if f.kind == "bag":
        return np.array([t for row in values for t in row], dtype=object)
    return values


def _vocabulary(values: np.ndarray, f: Feature) -> tuple[str, ...]:
    if f.derive == "hour_of_day":
        return tuple(str(h) for h in range(24))
    if f.derive == "day_of_week":
        return tuple(str(d) for d in range(7))
    uniq = np.unique(values.astype(str))
    return tuple(v for v in uniq.tolist() if v != "")


class MaskedMeanPool(keras.layers.Layer):
    """Mean of the embeddings of the non-padding ids; zeros for an empty row."""

    def call(self, embeddings, ids):
        mask = tf.cast(tf.not_equal(ids, ""), embeddings.dtype)[..., tf.newaxis]
        total = tf.reduce_sum(embeddings * mask, axis=1)
        count = tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
        return total / count


class Towers:
    """Builds the user and item towers; holds the layers they share."""

    def __init__(self, spec: FeatureSpec, stats: FeatureStats, config: TowerConfig) -> None:
        self.spec, self.stats, self.config = spec, stats, config
        item_id = spec.feature(spec.columns.item_id)
        self._item_lookup, self._item_embedding = self._lookup_and_embedding(item_id)

    def user_tower(self) -> keras.Model:
        return self._tower("user_tower", self.spec.user_input_features)

    def item_tower(self) -> keras.Model:
        return self._tower("item_tower", self.spec.tower("item"))

    def _tower(self, name: str, features: tuple[Feature, ...]) -> keras.Model:
        inputs = {f.name: _input(f) for f in features}
        encoded = [self._encode(f, inputs[f.name]) for f in features]
        x = keras.layers.Concatenate()(encoded) if len(encoded) > 1 else encoded[0]
        for i, width in enumerate(self.config.hidden_dims):
            x = keras.layers.Dense(width, activation="relu", name=f"{name}_hidden{i}")(x)
        out = keras.layers.Dense(self.config.embedding_dim, name=f"{name}_out")(x)
        return keras.Model(inputs=inputs, outputs=out, name=name)

    def _encode(self, f: Feature, x):
        if f.kind == "numeric":
            mean, var = self.stats.means[f.name], max(self.stats.variances[f.name], 1e-12)
            x = tf.where(tf.math.is_finite(x), x, mean)  # unknown → the training mean
            return keras.layers.Reshape((1,))((x - mean) / np.sqrt(var))
        if f.kind == "history" or f.name == self.spec.columns.item_id:
            lookup, embedding = self._item_lookup, self._item_embedding
        else:
            lookup, embedding = self._lookup_and_embedding(f)
        embedded = embedding(lookup(x))
        return MaskedMeanPool(name=f"{f.name}_pool")(embedded, x) if f.is_sequence else embedded

    def _lookup_and_embedding(self, f: Feature):
        vocabulary = list(self.stats.vocabularies[f.name])
        lookup = keras.layers.StringLookup(
            vocabulary=vocabulary, num_oov_indices=f.oov_buckets, name=f"{f.name}_lookup"
        )
        embedding = keras.layers.Embedding(
            len(vocabulary) + f.oov_buckets, f.embedding_dim, name=f"{f.name}_embedding"
        )
        return lookup, embedding


def _input(f: Feature):
    if f.kind == "numeric":
        return keras.Input(shape=(), dtype=tf.float32, name=f.name)
    shape = (f.max_length,) if f.is_sequence else ()
    return keras.Input(shape=shape, dtype=tf.string, name=f.name)


class TwoTowerModel(tfrs.Model):
    """In-batch softmax over dot-product scores of the two towers."""

    def __init__(self, user_tower: keras.Model, item_tower: keras.Model) -> None:
        super().__init__()
        self.user_tower, self.item_tower = user_tower, item_tower
        self.user_keys = tuple(user_tower.input.keys())
        self.item_keys = tuple(item_tower.input.keys())
        self.task = tfrs.tasks.Retrieval()

    def compute_loss(self, features, training: bool = False):
        user_emb = self.user_tower({k: features[k] for k in self.user_keys}, training=training)
        item_emb = self.item_tower({k: features[k] for k in self.item_keys}, training=training)
        return self.task(user_emb, item_emb, compute_metrics=False)

"""The two-tower model, built from a feature spec.

Each tower is a Keras functional model over a dict of raw inputs (contracts.inputs): every
feature is encoded (vocabulary lookup or, with ``hash_buckets``, hashing + embedding,
normalisation, or masked mean of a bag), the encodings are concatenated and an MLP maps
them to the embedding. The user tower's history feature shares the item-id lookup and
embedding table with the item tower.

Missing values: a categorical feature's "" reads its own row, the last of its embedding
table (``MissingRow``; not an OOV row: a missing value is not an unseen one, and a hashed
feature has no OOV row to send it to); a numeric NaN is the training mean, plus a 0/1
column (``MissingIndicator``) when the spec sets ``missing_indicator``; bags and
histories are empty. Ids and derived context are never missing and get no such row.

Training is a sampled softmax (``tfrs.tasks.Retrieval``): each positive item is scored
against the other items of the batch and, optionally, items drawn from the whole corpus
(mixed negative sampling), each candidate's logit corrected by the log of its sampling
probability (logQ, training.sampling); scores are dot products of the (optionally
L2-normalised) tower outputs divided by a temperature.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from contracts.feature_spec import GAPS_SUFFIX, Feature, FeatureSpec
from training.tf_env import keras, tf, tfrs


@dataclass(frozen=True)
class TowerConfig:
    """``history_dropout``: share of history items dropped from each bag at training time
    only (the user tower then cannot lean on the user-id embedding alone; for a sequence
    feature, the dropout rate inside its attention encoder); ``embedding_l2``:
    L2 penalty on every embedding table, ``embedding_l2 · Σ w²``, added to the loss."""

    embedding_dim: int = 32
    hidden_dims: tuple[int, ...] = (64,)
    # L2-normalised outputs (scores are cosines): the default because unnormalised towers
    # drift into one shared direction that IVF and HNSW cannot split (docs/training.md)
    normalize: bool = True
    output_layer: bool = True  # False: the concatenated encodings are the embedding (the
                               # TFRS tutorial's plain id-embedding towers)
    history_dropout: float = 0.0
    embedding_l2: float = 0.0
    # the history encoder (training.history): mean | normalized_sum (sum / sqrt(n));
    # shared (the item-id table) | own (a table of its own, Mult-DAE's encoder); linear | tanh
    history_pooling: str = "mean"
    history_table: str = "shared"
    history_activation: str = "linear"

    def __post_init__(self) -> None:
        if not 0.0 <= self.history_dropout < 1.0:
            raise ValueError(f"history_dropout must be in [0, 1) (got {self.history_dropout})")
        if not self.embedding_l2 >= 0.0:
            raise ValueError(f"embedding_l2 must be >= 0 (got {self.embedding_l2})")
        from training.history import HISTORY_ACTIVATIONS, HISTORY_TABLES, POOLINGS

        for name, choices in (("history_pooling", POOLINGS), ("history_table", HISTORY_TABLES),
                              ("history_activation", HISTORY_ACTIVATIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)} "
                                 f"(got {getattr(self, name)!r})")

    @property
    def plain_history(self) -> bool:
        """Whether the history is the mean of shared item embeddings (MaskedMeanPool)."""
        return (self.history_pooling, self.history_table, self.history_activation) == (
            "mean", "shared", "linear")


LOGQ_MODES = ("none", "exact", "streaming")
CORPUS_DISTRIBUTIONS = ("uniform", "unigram", "full")


@dataclass(frozen=True)
class LossConfig:
    """The sampled softmax. ``logq``: none | exact (training counts) | streaming (Yi et al.).
    ``corpus_negatives``: extra negatives per batch drawn from the catalogue by
    ``corpus_distribution`` (uniform | unigram, count^corpus_beta); ``full`` instead adds
    every catalogue item to every batch (a full softmax, for catalogues of thousands; each
    then has q = 1) and leaves ``corpus_negatives`` at 0. ``hard_negatives``: keep only the
    top-scoring negatives per row (0 = all)."""

    logq: str = "exact"
    corpus_negatives: int = 0
    corpus_distribution: str = "unigram"
    corpus_beta: float = 0.75
    remove_accidental_hits: bool = True
    temperature: float = 0.05  # cosines lie in [-1, 1]: logits need the scale
    hard_negatives: int = 0
    streaming_buckets: int = 1 << 20
    streaming_alpha: float = 0.01

    def __post_init__(self) -> None:
        if self.logq not in LOGQ_MODES:
            raise ValueError(f"logq must be one of {', '.join(LOGQ_MODES)} (got {self.logq!r})")
        if self.corpus_negatives < 0 or self.hard_negatives < 0:
            raise ValueError("corpus_negatives and hard_negatives must be >= 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature})")
        if self.corpus_distribution not in CORPUS_DISTRIBUTIONS:
            raise ValueError(f"corpus_distribution must be one of "
                             f"{', '.join(CORPUS_DISTRIBUTIONS)} (got {self.corpus_distribution!r})")
        if self.corpus_distribution == "full" and self.corpus_negatives:
            raise ValueError(f"corpus_distribution 'full' adds every catalogue item; leave "
                             f"corpus_negatives at 0 (got {self.corpus_negatives})")

    @property
    def uses_corpus(self) -> bool:
        """Whether candidates beyond the batch's positives are scored."""
        return self.corpus_negatives > 0 or self.corpus_distribution == "full"


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
        elif f.kind not in ("history", "sequence") and not f.hashed:  # hashed: none to compute
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
    """Mean of the embeddings of the non-padding ids; zeros for an empty row. With
    ``dropout`` > 0, each id is left out with that probability, in training only."""

    def __init__(self, dropout: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dropout = dropout

    def get_config(self) -> dict:
        return {**super().get_config(), "dropout": self.dropout}

    def call(self, embeddings, ids, training=None):
        present = tf.not_equal(ids, "")
        if training and self.dropout > 0.0:
            present &= tf.random.uniform(tf.shape(ids)) >= self.dropout
        mask = tf.cast(present, embeddings.dtype)[..., tf.newaxis]
        total = tf.reduce_sum(embeddings * mask, axis=1)
        count = tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
        return total / count


class MissingRow(keras.layers.Layer):
    """Embedding rows of a lookup's ids, with "" (a missing value) sent to ``row``: the
    extra last row of the feature's table. ids [n] string, rows [n] int64 → [n] int64."""

    def __init__(self, row: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.row = row

    def get_config(self) -> dict:
        return {**super().get_config(), "row": self.row}

    def call(self, ids, rows):
        return tf.where(tf.equal(ids, ""), tf.constant(self.row, rows.dtype), rows)


class MissingIndicator(keras.layers.Layer):
    """[n] float → [n, 1]: 1.0 where the value is missing (NaN or ±inf), else 0.0."""

    def call(self, x):
        return tf.cast(tf.logical_not(tf.math.is_finite(x)), tf.float32)[:, tf.newaxis]


class L2Normalize(keras.layers.Layer):
    def call(self, x):
        return tf.math.l2_normalize(x, axis=-1)


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
        inputs.update({f.name + GAPS_SUFFIX: _gaps_input(f) for f in features
                       if f.kind == "sequence"})
        encoded = [self._encode_sequence(f, inputs) if f.kind == "sequence"
                   else self._encode(f, inputs[f.name]) for f in features]
        indicators = {f.name: MissingIndicator(name=f"{f.name}_missing_indicator")(inputs[f.name])
                      for f in features if f.missing_indicator}
        # each indicator right after its value: the concatenation order is spec order
        encoded = [e for f, v in zip(features, encoded, strict=True)
                   for e in ([v, indicators[f.name]] if f.name in indicators else [v])]
        x = keras.layers.Concatenate()(encoded) if len(encoded) > 1 else encoded[0]
        for i, width in enumerate(self.config.hidden_dims):
            x = keras.layers.Dense(width, activation="relu", name=f"{name}_hidden{i}")(x)
        out = x
        if self.config.output_layer or self.config.hidden_dims:
            out = keras.layers.Dense(self.config.embedding_dim, name=f"{name}_out")(x)
        if self.config.normalize:
            out = L2Normalize(name=f"{name}_l2")(out)
        return keras.Model(inputs=inputs, outputs=out, name=name)

    def _encode(self, f: Feature, x):
        if f.kind == "numeric":
            mean, var = self.stats.means[f.name], max(self.stats.variances[f.name], 1e-12)
            x = tf.where(tf.math.is_finite(x), x, mean)  # unknown → the training mean
            return keras.layers.Reshape((1,))((x - mean) / np.sqrt(var))
        if f.kind == "history" and not self.config.plain_history:
            return self._encode_history(f, x)
        if f.kind == "history" or f.name == self.spec.columns.item_id:
            lookup, embedding = self._item_lookup, self._item_embedding
        else:
            lookup, embedding = self._lookup_and_embedding(f)
        rows = lookup(x)
        if f.has_missing_row(self.spec):
            rows = MissingRow(embedding.input_dim - 1, name=f"{f.name}_missing_row")(x, rows)
        embedded = embedding(rows)
        if not f.is_sequence:
            return embedded
        dropout = self.config.history_dropout if f.kind == "history" else 0.0
        return MaskedMeanPool(dropout, name=f"{f.name}_pool")(embedded, x)

    def _encode_sequence(self, f: Feature, inputs):
        """training.sequence: attention over the item embeddings, their order and ages."""
        from training.sequence import SequenceEncoder

        ids = inputs[f.name]
        embedded = self._item_embedding(self._item_lookup(ids))
        encoder = SequenceEncoder(f.max_length, self._item_embedding.output_dim, f.blocks,
                                  f.heads, f.time_buckets, self.config.history_dropout,
                                  name=f"{f.name}_sequence")
        return encoder(embedded, ids, inputs[f.name + GAPS_SUFFIX])

    def _encode_history(self, f: Feature, x):
        """training.history: the real ids only, pooled as the config says."""
        from training.history import encode_history

        c, embedding = self.config, self._item_embedding
        if c.history_table == "own":  # the item-id vocabulary, a table of its own
            embedding = keras.layers.Embedding(
                embedding.input_dim, embedding.output_dim, name=f"{f.name}_embedding",
                embeddings_regularizer=embedding.embeddings_regularizer)
        return encode_history(f.name, x, self._item_lookup, embedding, c.history_pooling,
                              c.history_activation, c.history_dropout)

    def _lookup_and_embedding(self, f: Feature):
        if f.hashed:  # FarmHash Fingerprint64 mod N (no salt), as StringLookup's OOV buckets
            lookup = keras.layers.Hashing(num_bins=f.hash_buckets, name=f"{f.name}_lookup")
            rows = f.hash_buckets
        else:
            vocabulary = list(self.stats.vocabularies[f.name])
            lookup = keras.layers.StringLookup(
                vocabulary=vocabulary, num_oov_indices=f.oov_buckets, name=f"{f.name}_lookup"
            )
            rows = len(vocabulary) + f.oov_buckets
        rows += f.has_missing_row(self.spec)  # the missing value's own row, the last
        l2 = self.config.embedding_l2
        embedding = keras.layers.Embedding(
            rows, f.embedding_dim, name=f"{f.name}_embedding",
            embeddings_regularizer=keras.regularizers.L2(l2) if l2 else None,
        )
        return lookup, embedding


def _gaps_input(f: Feature):
    return keras.Input(shape=(f.max_length,), dtype=tf.int32, name=f.name + GAPS_SUFFIX)


def _input(f: Feature):
    if f.kind == "numeric":
        return keras.Input(shape=(), dtype=tf.float32, name=f.name)
    shape = (f.max_length,) if f.is_sequence else ()
    return keras.Input(shape=shape, dtype=tf.string, name=f.name)


ID_HASH_BUCKETS = (1 << 62) - 1
CANDIDATE_Q = "_candidate_q"  # per-example feature: expected count of the positive in a batch


class TwoTowerModel(tfrs.Model):
    """Sampled softmax over dot-product scores of the two towers (see the module docstring).

    ``corpus`` (item-tower inputs of every catalogue item) and ``corpus_probs`` (the
    probability of drawing each) are needed only with corpus negatives (the probabilities
    not with the full corpus).
    """

    def __init__(self, user_tower: keras.Model, item_tower: keras.Model, item_id: str,
                 loss: LossConfig = LossConfig(), batch_size: int = 256,
                 corpus: Mapping[str, np.ndarray] | None = None,
                 corpus_probs: np.ndarray | None = None) -> None:
        super().__init__()
        self.user_tower, self.item_tower = user_tower, item_tower
        self.user_keys = tuple(user_tower.input.keys())
        self.item_keys = tuple(item_tower.input.keys())
        self.item_id, self.loss_config, self.batch_size = item_id, loss, float(batch_size)
        self.task = tfrs.tasks.Retrieval(
            temperature=loss.temperature,
            num_hard_negatives=loss.hard_negatives or None,
            remove_accidental_hits=loss.remove_accidental_hits,
        )
        self.estimator = None
        if loss.logq == "streaming":
            from training.sampling import StreamingFrequencyEstimator

            self.estimator = StreamingFrequencyEstimator(loss.streaming_buckets,
                                                         loss.streaming_alpha)
        self._corpus = None
        if loss.uses_corpus:
            sampled = loss.corpus_distribution != "full"
            if corpus is None or (sampled and corpus_probs is None):
                raise ValueError("corpus negatives need the corpus and its sampling probabilities")
            self._corpus = {k: tf.constant(corpus[k]) for k in self.item_keys}
            if sampled:
                self._corpus_log_probs = tf.constant(np.log(corpus_probs)[None, :], tf.float32)
                self._corpus_probs = tf.constant(corpus_probs, tf.float32)

    def compute_loss(self, features, training: bool = False):
        user_emb = self.user_tower({k: features[k] for k in self.user_keys}, training=training)
        item_emb = self.item_tower({k: features[k] for k in self.item_keys}, training=training)
        ids = features[self.item_id]
        q = self._in_batch_q(features, ids)
        if self._corpus is not None:
            neg_emb, neg_ids, neg_q = self._corpus_negatives(training)
            item_emb = tf.concat([item_emb, neg_emb], axis=0)
            ids = tf.concat([ids, neg_ids], axis=0)
            q = None if q is None else tf.concat([q, neg_q], axis=0)
        if q is not None:
            # The softmax only sees differences of log q within a row, so q may be rescaled;
            # TFRS clips it to [1e-6, 1], so the largest is brought to 1 (not past it).
            q = q / tf.reduce_max(q)
        # accidental hits are found by comparing ids: as 64-bit hashes, not strings, since
        # the comparison is [batch, candidates] (collisions: ~1e-10 at a million items)
        return self.task(user_emb, item_emb, candidate_sampling_probability=q,
                         candidate_ids=tf.strings.to_hash_bucket_fast(ids, ID_HASH_BUCKETS),
                         compute_metrics=False)

    def _in_batch_q(self, features, ids):
        """Expected number of times each in-batch candidate appears in a batch."""
        if self.loss_config.logq == "exact":
            return features[CANDIDATE_Q] * self.batch_size
        if self.loss_config.logq == "streaming":
            return self.estimator.update_and_estimate(ids)
        return None

    def _corpus_negatives(self, training: bool):
        if self.loss_config.corpus_distribution == "full":  # each item once: q = 1
            # through a gather, as sampled rows are (feeding the constants straight in is
            # several times slower to train with a history bag sharing the item embedding)
            rows = tf.range(tf.shape(self._corpus[self.item_id])[0])
            features = {k: tf.gather(v, rows) for k, v in self._corpus.items()}
            emb = self.item_tower(features, training=training)
            return emb, features[self.item_id], tf.ones(tf.shape(rows), tf.float32)
        m = self.loss_config.corpus_negatives
        rows = tf.random.categorical(self._corpus_log_probs, m)[0]
        features = {k: tf.gather(v, rows) for k, v in self._corpus.items()}
        emb = self.item_tower(features, training=training)
        return emb, features[self.item_id], tf.gather(self._corpus_probs, rows) * float(m)

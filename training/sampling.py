"""Sampling probabilities of candidates, for the logQ correction, and corpus negatives.

In-batch negatives are the positives of other examples, so an item is a negative about as
often as it is clicked: popular items are over-represented and a plain softmax learns to
push them down. The correction subtracts ``log q(item)`` from each candidate's logit, with
``q`` the item's expected count among the candidates (Yi et al. 2019, "Sampling-Bias-
Corrected Neural Modeling for Large Corpus Item Recommendations"). Two estimates of q:

* ``exact_item_frequencies``: counts over the training examples (a known, bounded id space).
* ``StreamingFrequencyEstimator``: the paper's hashed estimator for unbounded id streams.
  Per hash bucket it keeps A (the step the id was last seen) and B (a moving average of the
  gap between sightings): ``B ← (1−α)·B + α·(t − A)``, ``A ← t``; then ``q = 1/B`` is the
  per-step rate of the id.

Mixed negative sampling (Yang et al. 2020) adds negatives drawn from the whole corpus,
uniformly or by unigram^β; ``corpus_sampling_weights`` gives those distributions.
"""

from __future__ import annotations

import numpy as np

from training.tf_env import keras, tf


def exact_item_frequencies(item_ids: np.ndarray) -> dict[str, float]:
    """Fraction of the training examples whose positive is each item."""
    ids, counts = np.unique(np.asarray(item_ids).astype(str), return_counts=True)
    return dict(zip(ids.tolist(), (counts / counts.sum()).tolist(), strict=True))


def corpus_sampling_weights(counts: np.ndarray, distribution: str, beta: float) -> np.ndarray:
    """Probabilities [n_items] of drawing each catalogue item as a corpus negative.

    uniform: 1/n. unigram: count^β normalised (β=0.75 flattens popularity as in word2vec);
    items never seen get the weight of a count of one, so cold items are negatives too.
    """
    n = len(counts)
    if distribution == "uniform":
        return np.full(n, 1.0 / n)
    if distribution != "unigram":
        raise ValueError(f"distribution must be 'uniform' or 'unigram' (got {distribution!r})")
    weights = np.maximum(np.asarray(counts, dtype=np.float64), 1.0) ** beta
    return weights / weights.sum()


class StreamingFrequencyEstimator(keras.layers.Layer):
    """Yi et al. 2019 (Algorithm 2): hashed last-seen time A and average gap B per bucket.

    Time is counted in examples, not batches: with batches of hundreds, popular items occur
    several times per batch and a per-batch clock would cap their rate at one. Occurrences
    of one bucket within a batch are applied as ``m`` successive gap observations, their mean
    gap entering the average with weight ``1 − (1−α)^m`` (exact when the gaps are equal).

    ``update_and_estimate(ids)`` is called once per training step with the batch's
    candidate ids and returns each id's expected count in a batch of that size, n/B. Hash
    collisions share a bucket, which overestimates rare ids' rates when buckets are too few.
    """

    def __init__(self, num_buckets: int = 1 << 20, alpha: float = 0.01, **kwargs) -> None:
        super().__init__(trainable=False, **kwargs)
        if num_buckets < 1 or not 0 < alpha <= 1:
            raise ValueError(f"need num_buckets >= 1 and 0 < alpha <= 1 (got {num_buckets}, {alpha})")
        self.num_buckets, self.alpha = num_buckets, alpha
        self.build(None)  # eagerly: variables cannot be created inside the training tf.function

    def build(self, input_shape) -> None:
        zeros = keras.initializers.Zeros()
        self.clock = self.add_weight("clock", shape=(), dtype=tf.float32, initializer=zeros,
                                     trainable=False)
        # 0 marks "unknown" in both arrays: never seen / no gap observed yet.
        self.last_seen = self.add_weight("last_seen", shape=(self.num_buckets,), dtype=tf.float32,
                                         initializer=zeros, trainable=False)
        self.gap = self.add_weight("gap", shape=(self.num_buckets,), dtype=tf.float32,
                                   initializer=zeros, trainable=False)
        self.built = True

    def update_and_estimate(self, ids):
        """ids [n] string → [n] float32: expected count of each id in a batch of n."""
        n = tf.cast(tf.size(ids), tf.float32)
        buckets, occurrence = tf.unique(tf.strings.to_hash_bucket_fast(ids, self.num_buckets))
        k = tf.size(buckets)
        position = self.clock + 1.0 + tf.range(n)  # example times of this batch
        count = tf.math.unsorted_segment_sum(tf.ones_like(position), occurrence, k)
        first = tf.math.unsorted_segment_min(position, occurrence, k)
        last = tf.math.unsorted_segment_max(position, occurrence, k)
        self.clock.assign_add(n)
        previous = tf.gather(self.last_seen, buckets)
        known = previous > 0.0
        gaps = tf.where(known, count, count - 1.0)           # gap observations this batch
        span = tf.where(known, last - previous, last - first)
        mean_gap = tf.math.divide_no_nan(span, gaps)
        old = tf.gather(self.gap, buckets)
        weight = 1.0 - tf.pow(1.0 - self.alpha, gaps)
        new = tf.where(gaps > 0.0, tf.where(old > 0.0, (1.0 - weight) * old + weight * mean_gap,
                                            mean_gap), old)
        self.gap.scatter_update(tf.IndexedSlices(new, buckets))
        self.last_seen.scatter_update(tf.IndexedSlices(last, buckets))
        gap_now = tf.where(new > 0.0, new, self.clock)  # seen once: about once so far
        return n / tf.gather(gap_now, occurrence)

    def call(self, ids):
        return self.update_and_estimate(ids)

"""Sampling-bias correction: the estimators, and the sign of the correction."""

from __future__ import annotations

import numpy as np
import pytest

from training.sampling import (
    StreamingFrequencyEstimator, corpus_sampling_weights, exact_item_frequencies,
)
from training.tf_env import tf


def test_exact_frequencies_are_shares_of_the_examples():
    assert exact_item_frequencies(np.array(["a", "b", "a", "c"])) == {"a": 0.5, "b": 0.25, "c": 0.25}


def test_streaming_estimator_converges_to_the_true_frequencies():
    """Batches drawn from a known item distribution (popular items occur several times
    per batch): n/B estimates each item's expected count per batch within 10 %."""
    rng = np.random.default_rng(0)
    probs = np.array([0.3, 0.2, 0.15, 0.1] + [0.25 / 50] * 50)
    ids = np.array([f"item{i}" for i in range(len(probs))])
    batch = 64
    estimator = StreamingFrequencyEstimator(num_buckets=1 << 16, alpha=0.01)
    step = tf.function(estimator.update_and_estimate)
    for _ in range(3000):
        step(tf.constant(rng.choice(ids, batch, p=probs)))
    head = step(tf.constant(ids[:5])).numpy() / 5 * batch  # expected count in a batch of 64
    np.testing.assert_allclose(head, probs[:5] * batch, rtol=0.1)
    buckets = tf.strings.to_hash_bucket_fast(ids, estimator.num_buckets)
    per_example = 1.0 / tf.gather(estimator.gap, buckets).numpy()
    np.testing.assert_allclose(per_example[4:].mean(), probs[4:].mean(), rtol=0.1)
    assert np.all(np.diff(per_example[:5]) < 0)  # the popularity order is kept


def test_unigram_corpus_weights_flatten_popularity_and_keep_cold_items():
    weights = corpus_sampling_weights(np.array([100.0, 1.0, 0.0]), "unigram", beta=0.5)
    np.testing.assert_allclose(weights, np.array([10.0, 1.0, 1.0]) / 12.0)
    np.testing.assert_allclose(corpus_sampling_weights(np.zeros(4), "uniform", 0.5), 0.25)
    with pytest.raises(ValueError, match="distribution must be"):
        corpus_sampling_weights(np.ones(3), "zipf", 1.0)


def test_logq_correction_pushes_popular_items_down():
    """With equal raw scores, the corrected logit of a frequently sampled candidate is the
    lower one, so the softmax stops rewarding the model for demoting popular items."""
    import tensorflow_recommenders as tfrs

    scores = tf.constant([[2.0, 2.0]])
    popular_then_rare = tf.constant([0.5, 0.01])
    corrected = tfrs.layers.loss.SamplingProbablityCorrection()(scores, popular_then_rare).numpy()
    assert corrected[0, 0] < corrected[0, 1]
    np.testing.assert_allclose(corrected[0], 2.0 - np.log([0.5, 0.01]), rtol=1e-6)

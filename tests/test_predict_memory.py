"""training.train._predict (item and user embeddings at export) makes its [n, d] result
once: at 1M items × 512 dimensions (issue 21's model with a linear part) the parts, their
concatenation and a float32 copy of it took 6 GB and the export was killed for memory."""

from __future__ import annotations

import tracemalloc

import numpy as np


def test_embeddings_are_made_in_one_array_of_the_result_size():
    from training.tf_env import keras
    from training.train import _predict

    x = keras.Input(shape=(8,), name="x")
    tower = keras.Model({"x": x}, keras.layers.Dense(64, name="d")(x))
    inputs = {"x": np.random.default_rng(0).normal(size=(20_000, 8)).astype(np.float32)}
    expected = tower({"x": inputs["x"]}, training=False).numpy()
    result_bytes = 20_000 * 64 * 4

    tracemalloc.start()
    try:
        emb = _predict(tower, inputs, batch_size=1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    np.testing.assert_allclose(emb, expected, atol=1e-5)
    assert emb.dtype == np.float32 and emb.shape == (20_000, 64)
    assert peak < 1.5 * result_bytes, f"peak {peak / result_bytes:.2f}× the result's size"


def test_no_rows_give_an_empty_result():
    from training.tf_env import keras
    from training.train import _predict

    x = keras.Input(shape=(8,), name="x")
    tower = keras.Model({"x": x}, keras.layers.Dense(4)(x))
    assert _predict(tower, {"x": np.zeros((0, 8), np.float32)}, 16).shape == (0, 0)

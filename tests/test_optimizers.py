"""lazy-adam: the embedding rows a batch did not touch keep their values and moments; the
rows it touched get exactly Adam's update when their moments match; dense variables get
Adam's update unchanged."""

from __future__ import annotations

import numpy as np
import pytest


def _step(optimizer, table, rows: list[int], grads: np.ndarray):
    from training.tf_env import tf

    gradient = tf.IndexedSlices(tf.constant(grads, tf.float32), tf.constant(rows, tf.int64),
                                tf.constant(table.shape, tf.int64))
    optimizer.apply_gradients([(gradient, table)])


def _tables(n_rows: int = 6, dim: int = 3):
    from training.tf_env import tf

    start = np.arange(n_rows * dim, dtype=np.float32).reshape(n_rows, dim) / 10
    return tf.Variable(start), tf.Variable(start), start


def test_untouched_rows_keep_their_values_where_adam_moves_them():
    from training.optimizers import make_optimizer

    lazy_table, adam_table, start = _tables()
    lazy, adam = make_optimizer("lazy-adam", 0.1), make_optimizer("adam", 0.1)
    for optimizer, table in ((lazy, lazy_table), (adam, adam_table)):
        _step(optimizer, table, [1], np.ones((1, 3)))       # row 1 gets momentum
        _step(optimizer, table, [3], np.full((1, 3), 2.0))  # then only row 3 is touched
    lazy_now, adam_now = lazy_table.numpy(), adam_table.numpy()
    untouched = [0, 2, 4, 5]
    np.testing.assert_array_equal(lazy_now[untouched], start[untouched])
    np.testing.assert_array_equal(adam_now[untouched], start[untouched])  # zero moments
    # row 1: Adam keeps moving it by its momentum in step 2; lazy-adam leaves it
    assert not np.allclose(adam_now[1], lazy_now[1])
    # row 3 had zero moments in both: the same update
    np.testing.assert_allclose(lazy_now[3], adam_now[3], rtol=1e-6)


def test_repeated_rows_in_one_batch_add_up_as_adams_do():
    from training.optimizers import make_optimizer

    lazy_table, adam_table, _ = _tables()
    for name, table in (("lazy-adam", lazy_table), ("adam", adam_table)):
        _step(make_optimizer(name, 0.05), table, [2, 2, 4], np.array(
            [[1.0, 0.0, -1.0], [0.5, 0.5, 0.5], [-1.0, 2.0, 0.0]]))
    np.testing.assert_allclose(lazy_table.numpy(), adam_table.numpy(), rtol=1e-6)


def test_an_unknown_optimizer_is_refused_naming_the_choices():
    from training.optimizers import make_optimizer
    from training.train import TrainConfig

    with pytest.raises(ValueError, match="adam, lazy-adam"):
        make_optimizer("sgd", 0.1)
    with pytest.raises(ValueError, match="optimizer must be one of auto, adam, lazy-adam"):
        TrainConfig(optimizer="sgd")


@pytest.mark.parametrize("items, chosen", [(1_000, "adam"), (100_000, "lazy-adam")])
def test_auto_takes_lazy_adam_for_a_model_with_a_large_embedding_table(items, chosen, caplog):
    """The default: dense Adam's per-step cost grows with the vocabulary, lazy-adam's not."""
    from training.optimizers import LazyAdam, make_optimizer
    from training.tf_env import keras

    model = keras.Sequential([keras.layers.Embedding(items, 4), keras.layers.Dense(2)])
    with caplog.at_level("INFO", logger="training.optimizers"):
        optimizer = make_optimizer("auto", 0.1, model)
    assert isinstance(optimizer, LazyAdam) == (chosen == "lazy-adam")
    assert f"optimizer auto: {chosen} (largest embedding table {items:,} rows" in caplog.text

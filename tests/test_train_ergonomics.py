"""What a person running long training relies on: resume, early stopping, logs."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from training.synthetic import SyntheticConfig, generate_synthetic
from training.train import TrainConfig, train

SMALL = SyntheticConfig(num_users=60, num_items=50, num_clusters=4, interactions_per_user=6)


@pytest.fixture(scope="module")
def dataset():
    return generate_synthetic(SMALL)[0]


def test_training_resumes_from_the_last_checkpoint(dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    first = train(dataset, TrainConfig(epochs=2, checkpoint_dir=str(tmp_path)))
    assert len(first.history["loss"]) == 2
    resumed = train(dataset, TrainConfig(epochs=3, checkpoint_dir=str(tmp_path)))
    assert len(resumed.history["loss"]) == 1  # only epoch 3 ran
    assert "resumed from" in caplog.text and "epoch 2 done" in caplog.text


def test_early_stopping_keeps_the_best_epoch(dataset):
    scores = iter([0.5, 0.4, 0.3, 0.2, 0.1])
    snapshots = []

    def validate(trained):
        snapshots.append([w.copy() for w in trained.model.get_weights()])
        return {"ndcg@10": next(scores)}

    trained = train(dataset, TrainConfig(epochs=5, early_stopping_patience=2), validate=validate)
    assert len(trained.history["loss"]) == 3  # epoch 1 best, then two without gain
    assert trained.history["val_ndcg@10"] == [0.5, 0.4, 0.3]
    for got, best in zip(trained.model.get_weights(), snapshots[0], strict=True):
        np.testing.assert_array_equal(got, best)


def test_tensorboard_logs_are_written(dataset, tmp_path):
    train(dataset, TrainConfig(epochs=1, tensorboard_dir=str(tmp_path)))
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_cosine_schedule_decays_the_learning_rate_to_zero_over_all_epochs(dataset):
    rates = {}
    for schedule in ("constant", "cosine"):
        config = TrainConfig(epochs=2, batch_size=32, learning_rate=0.01,
                             learning_rate_schedule=schedule)
        rates[schedule] = float(train(dataset, config).model.optimizer.learning_rate)
    assert rates["constant"] == pytest.approx(0.01)
    assert rates["cosine"] < 1e-4  # the rate of the last of the epochs' steps: near zero


def test_unknown_learning_rate_schedule_is_refused():
    with pytest.raises(ValueError, match="learning_rate_schedule must be one of constant, cosine"):
        TrainConfig(learning_rate_schedule="step")


def test_a_small_dataset_trains_in_memory_and_streamed_prepares_it(tmp_path, caplog):
    """`train --data` on a small dataset needs no Spark: it trains on the examples in memory
    (the same ones preparation writes); --streamed and --prepared-dir prepare instead."""
    from app.cli import build_parser
    from app.commands.train import _checked_source
    from contracts.dataset import Dataset, write_dataset
    from tests.conftest import TINY
    from training.synthetic import SyntheticConfig, generate_synthetic

    dataset, spec_toml = generate_synthetic(SyntheticConfig(**TINY))
    data = write_dataset(dataset, tmp_path / "data", spec_toml)

    def source(*flags):
        return _checked_source(build_parser().parse_args(
            ["train", "--data", str(data), "--out", str(tmp_path / "m"), *flags]))

    with caplog.at_level("INFO", logger="two_tower"):
        chosen = source()
    assert isinstance(chosen, Dataset) and chosen.num_interactions == dataset.num_interactions
    assert "trained in memory" in caplog.text and "--streamed" in caplog.text
    assert source("--streamed") == data
    assert source("--prepared-dir", str(tmp_path / "p")) == data

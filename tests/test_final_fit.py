"""Early stopping by default and the final fit on every event (issue 18, points 4 and 5):
`two-tower train` keeps the best epoch and says which, then trains again on every event,
the held-out ones included, for that many epochs and exports that; the manifest says which
model it is and the held-out figures it was chosen on."""

from __future__ import annotations

import numpy as np
import pytest

from app.cli import main
from contracts.dataset import load_dataset, write_dataset
from contracts.model_manifest import load_item_embeddings, load_model_manifest
from tests.conftest import TINY
from training.synthetic import SyntheticConfig, generate_synthetic


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    dataset, spec_toml = generate_synthetic(SyntheticConfig(**TINY))
    return write_dataset(dataset, tmp_path_factory.mktemp("final_fit") / "data", spec_toml)


def _train(data, out, *flags) -> tuple:
    assert main(["train", "--data", str(data), "--in-memory", "--out", str(out),
                 "--batch-size", "128", *flags]) == 0
    (model_dir,) = out.iterdir()
    return model_dir, load_model_manifest(model_dir)


@pytest.mark.slow
def test_train_stops_early_keeps_the_best_epoch_then_fits_every_event(data, tmp_path, capsys):
    _, manifest = _train(data, tmp_path / "m", "--max-epochs", "4",
                         "--early-stopping-patience", "1")
    summary = manifest.training
    ndcg = summary["history"]["val_ndcg@10"]
    kept = int(np.argmax(ndcg)) + 1  # the first best: a tie is no gain
    assert summary["config"]["early_stopping_patience"] == 1 and len(ndcg) <= 4
    assert manifest.fit == summary["fit"] == "all-events"
    assert summary["epochs"] == summary["final_fit"]["epochs"] == kept
    assert len(summary["final_fit"]["history"]["loss"]) == kept
    events = load_dataset(data).num_interactions
    assert summary["final_fit"]["examples"] == events  # the held-out events are trained on
    assert summary["examples"] == events - 2 * TINY["num_users"]  # the evaluated model's
    assert summary["evaluation"]["model_evaluated"] == "train-split"
    assert summary["evaluation"]["model"]["recall@10"] > 0
    log = capsys.readouterr().err  # what the user reads
    assert f"kept epoch {kept} of the {len(ndcg)} trained" in log
    assert f"final fit: {events} examples" in log


@pytest.mark.slow
def test_no_final_fit_exports_the_evaluated_model(data, tmp_path):
    final_dir, final = _train(data, tmp_path / "a", "--epochs", "2")
    split_dir, split = _train(data, tmp_path / "b", "--epochs", "2", "--no-final-fit")
    assert (final.fit, split.fit) == ("all-events", "train-split")
    assert split.training["epochs"] == 2 and "final_fit" not in split.training
    assert len(split.training["history"]["loss"]) == 2  # --epochs: no early stopping
    # the same seed and selection run: equal figures, different exported weights
    assert final.training["evaluation"] == split.training["evaluation"]
    assert final.training["weights_sha256"] != split.training["weights_sha256"]
    a, b = (load_item_embeddings(m)[0] for m in (final, split))
    assert not np.allclose(a, b, atol=1e-3)


def test_the_epoch_flags_resolve_to_a_budget_and_a_patience():
    from app.cli import build_parser
    from app.commands.train import _schedule

    def schedule(*flags):
        return _schedule(build_parser().parse_args(["train", "--data", "d", "--out", "o",
                                                    *flags]))

    assert schedule() == (30, 2)  # early stopping by default
    assert schedule("--max-epochs", "8") == (8, 2)
    assert schedule("--epochs", "5") == (5, 0)  # a fixed count
    assert schedule("--epochs", "5", "--early-stopping-patience", "3") == (5, 3)
    assert schedule("--no-eval") == (5, 0)  # nothing to stop on
    with pytest.raises(ValueError, match="--max-epochs is early stopping's budget"):
        schedule("--no-eval", "--max-epochs", "8")
    with pytest.raises(SystemExit):  # argparse: not allowed with
        schedule("--epochs", "3", "--max-epochs", "8")


@pytest.mark.slow
def test_the_final_fit_from_prepared_shards_streams_every_split(data, tmp_path):
    pytest.importorskip("pyspark", reason="the preparation job needs the [prepare] extra")
    from contracts.prepared import SPLITS, load_prepared
    from preparation import PrepareConfig, prepare
    from training.pipeline import run_training_from_prepared
    from training.train import TrainConfig

    prepared = load_prepared(prepare(data, tmp_path / "prepared",
                                     PrepareConfig(rows_per_shard=1000, seed=1)))
    config = TrainConfig(epochs=2, early_stopping_patience=1, batch_size=128)
    model_dir, summary = run_training_from_prepared(prepared.path, tmp_path / "m", config,
                                                    final_fit=True)
    every = sum(prepared.splits[s].rows for s in SPLITS)
    assert every == load_dataset(data).num_interactions
    assert summary["examples"] == prepared.splits["train"].rows
    assert summary["final_fit"]["examples"] == every
    assert load_model_manifest(model_dir).fit == "all-events"
    assert summary["evaluation"]["model_evaluated"] == "train-split"

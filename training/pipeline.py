"""The training job: dataset → split → fit → evaluate against popularity → model artifact."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from training.artifact import export_model
from training.dataset import Dataset
from training.evaluate import DEFAULT_KS, evaluate_split, split_last_per_user
from training.inputs import training_examples
from training.train import TrainConfig, TrainedModel, train

log = logging.getLogger(__name__)


def run_training(dataset: Dataset, store: str | Path, config: TrainConfig = TrainConfig(),
                 evaluate: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train, evaluate (temporal leave-last-out, when ``evaluate``) and export.

    With evaluation on, each user's last interaction is held out of training, so the
    reported recall is honest; the exported model is the one that was evaluated.
    Returns the artifact directory and the training summary stored in its manifest.
    """
    start = time.perf_counter()
    examples = training_examples(dataset)
    split = split_last_per_user(dataset) if evaluate else None
    train_rows = split.train if split is not None else slice(None)
    trained = train(dataset, config, {k: v[train_rows] for k, v in examples.items()})
    summary: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "examples": int(len(examples[dataset.spec.columns.user_id][train_rows])),
        "loss": trained.history.get("loss", []),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if split is not None:
        summary["evaluation"] = _evaluate(trained, examples, split)
    path = export_model(trained, store, summary)
    log.info("model artifact written: %s", path)
    return path, summary


def _evaluate(trained: TrainedModel, examples, split) -> dict[str, Any]:
    test = {k: v[split.test] for k, v in examples.items()}
    user_emb = trained.user_embeddings(test)
    recall = evaluate_split(trained.dataset, split, user_emb, trained.item_embeddings(), DEFAULT_KS)
    for k in DEFAULT_KS:
        log.info("recall@%d  model %.4f  popularity %.4f", k, recall["model"][k],
                 recall["popularity"][k])
    return {
        "protocol": "temporal leave-last-out, train items masked, full corpus",
        "test_events": int(split.test.sum()),
        "recall": {name: {str(k): v for k, v in by_k.items()} for name, by_k in recall.items()},
    }

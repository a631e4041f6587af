"""The training job: dataset → temporal split → fit (early stopping on validation) →
test against popularity → model artifact."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.artifact import export_model
from contracts.dataset import Dataset
from training.distributed import worker_role
from contracts.inputs import training_examples
from training.metrics import RankingMetrics
from training.protocols import (
    ProtocolSplit, evaluate_protocol, popularity_ranking, temporal_leave_one_out,
)
from training.train import TrainConfig, TrainedModel, train

log = logging.getLogger(__name__)
PROTOCOL = ("temporal leave-one-out: per user the last event is test, the second-last "
            "validation; train(+valid) items masked; every item ranked")


def run_training(dataset: Dataset, store: str | Path, config: TrainConfig = TrainConfig(),
                 evaluate: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train, evaluate (when ``evaluate``) and export.

    With evaluation on, each user's last two events are held out: the second-last drives
    validation (and early stopping when configured), the last is the test reported next
    to popularity. The exported model is the one evaluated. Returns the artifact directory
    and the training summary stored in its manifest.
    """
    start = time.perf_counter()
    examples = training_examples(dataset)
    split = temporal_leave_one_out(dataset) if evaluate else None
    train_rows = split.train if split is not None else slice(None)
    validate = _validator(examples, split) if split is not None else None
    trained = train(dataset, config, {k: v[train_rows] for k, v in examples.items()}, validate)
    summary: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "examples": int(len(examples[dataset.spec.columns.user_id][train_rows])),
        "history": trained.history,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if split is not None:
        summary["evaluation"] = _test(trained, examples, split)
    summary["weights_sha256"] = weights_fingerprint(trained)
    role = worker_role()
    log.info("worker %d/%d final weights sha256 %s", role.index, role.num_workers,
             summary["weights_sha256"])
    if not role.is_chief:  # every worker takes part in saving; only the chief's is kept
        with tempfile.TemporaryDirectory() as scratch:
            export_model(trained, scratch, summary)
        return Path(store), summary
    path = export_model(trained, store, summary)
    log.info("model artifact written: %s", path)
    return path, summary


def weights_fingerprint(trained: TrainedModel) -> str:
    """sha256 of every weight's bytes: equal on all workers of one synchronous run."""
    digest = hashlib.sha256()
    for weight in trained.model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def stage_metrics(trained: TrainedModel, examples: dict[str, np.ndarray], split: ProtocolSplit,
                  stage: str) -> RankingMetrics:
    """Every user with a ``stage`` event is scored with the features of that event
    (history and context from before it) against every item."""
    rows = split.valid if stage == "valid" else split.test
    event_of_user = np.zeros(split.n_users, dtype=np.int64)
    event_of_user[split.users[rows]] = rows
    user_emb = trained.user_embeddings({k: v[event_of_user] for k, v in examples.items()})
    item_emb = trained.item_embeddings()
    return evaluate_protocol(split, lambda users: user_emb[users] @ item_emb.T, stage)


def _validator(examples, split: ProtocolSplit):
    if len(split.valid) == 0:
        return None

    def validate(trained: TrainedModel) -> dict[str, float]:
        metrics = stage_metrics(trained, examples, split, "valid")
        return {"recall@10": metrics.recall[10], "ndcg@10": metrics.ndcg[10]}

    return validate


def _test(trained: TrainedModel, examples, split: ProtocolSplit) -> dict[str, Any]:
    model = stage_metrics(trained, examples, split, "test")
    popularity = popularity_ranking(split, "test")
    for k in (10, 50, 100):
        log.info("test recall@%d  model %.4f  popularity %.4f", k, model.recall[k],
                 popularity.recall[k])
    return {"protocol": PROTOCOL, "test_users": int(model.n_users),
            "model": model.as_dict(), "popularity": popularity.as_dict()}

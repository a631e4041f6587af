"""The training job: dataset (in memory, or prepared shards streamed) → temporal split →
fit (early stopping on validation) → test against popularity → model artifact."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from contracts.dataset import Dataset
from contracts.feature_spec import FeatureSpec
from contracts.inputs import training_examples
from contracts.prepared import SPLITS, load_prepared
from training.artifact import export_model
from training.distributed import worker_role
from training.holdout import (DEFAULT_USERS, HoldoutSample, holdout_metrics, popularity_metrics,
                              sample_holdout)
from training.metrics import RankingMetrics
from training.protocols import (
    ProtocolSplit, evaluate_protocol, popularity_ranking, temporal_leave_one_out,
)
from training.train import TrainConfig, TrainedModel, train
from training.train_shards import (check_prepared, load_catalogue, prepared_item_counts,
                                   train_from_shards)

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
    return _export(trained, store, summary)


def run_training_from_prepared(prepared: str | Path, store: str | Path,
                               config: TrainConfig = TrainConfig(), evaluate: bool = True,
                               eval_users: int = DEFAULT_USERS,
                               spec: FeatureSpec | None = None) -> tuple[Path, dict[str, Any]]:
    """:func:`run_training` on prepared shards (contracts.prepared), streamed.

    Refuses shards prepared with another spec than ``spec`` (default: the source dataset's
    features.toml). With evaluation on, ``eval_users`` users sampled (seeded by
    ``config.seed``) from the valid split drive validation, and as many from the test split
    are reported next to popularity; without, every split is trained on.
    """
    start = time.perf_counter()
    manifest = load_prepared(prepared)
    catalogue = load_catalogue(manifest, check_prepared(manifest, spec))
    item_ids = np.asarray(catalogue.items[manifest.spec.columns.item_id], dtype=object)
    validate = None
    if evaluate and manifest.splits["valid"].rows:
        validate = _sampled_validator(sample_holdout(manifest, "valid", item_ids, eval_users,
                                                     config.seed))
    splits = ("train",) if evaluate else SPLITS
    trained = train_from_shards(manifest, catalogue, config, validate, splits=splits)
    summary: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "examples": sum(manifest.splits[s].rows for s in splits),
        "prepared": {"path": str(manifest.path), "spec_fingerprint": manifest.spec_fingerprint,
                     "engine": manifest.engine},
        "history": trained.history,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if evaluate:
        test = sample_holdout(manifest, "test", item_ids, eval_users, config.seed)
        counts = prepared_item_counts(manifest, item_ids)
        summary["evaluation"] = _sampled_test(trained, test, counts)
    return _export(trained, store, summary)


def _export(trained: TrainedModel, store: str | Path,
            summary: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
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


def sampled_stage_metrics(trained: TrainedModel, sample: HoldoutSample) -> RankingMetrics:
    """The model on a hold-out sample (training.holdout): every item ranked per user."""
    user_emb = trained.user_embeddings(sample.inputs)
    return holdout_metrics(user_emb, trained.item_embeddings(), sample)


def _sampled_validator(sample: HoldoutSample):
    log.info("validation on %d of %d users (seed %d)", sample.n_users, sample.held_out,
             sample.seed)

    def validate(trained: TrainedModel) -> dict[str, float]:
        metrics = sampled_stage_metrics(trained, sample)
        return {"recall@10": metrics.recall[10], "ndcg@10": metrics.ndcg[10]}

    return validate


def _sampled_test(trained: TrainedModel, sample: HoldoutSample,
                  item_counts: np.ndarray) -> dict[str, Any]:
    model = sampled_stage_metrics(trained, sample)
    popularity = popularity_metrics(item_counts, sample)
    for k in (10, 50, 100):
        log.info("test recall@%d  model %.4f  popularity %.4f  (%d of %d users, seed %d)", k,
                 model.recall[k], popularity.recall[k], sample.n_users, sample.held_out,
                 sample.seed)
    return {"protocol": PROTOCOL, "test_users": int(model.n_users), **sample.describe(),
            "model": model.as_dict(), "popularity": popularity.as_dict()}


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

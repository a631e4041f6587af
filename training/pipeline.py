"""The training job: dataset (in memory, or prepared shards streamed) → temporal split →
fit (early stopping on validation) → test against popularity → optionally a final fit on
every event for the epochs chosen → model artifact."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable
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
from training.train import VALIDATION_METRIC, TrainConfig, TrainedModel, train
from training.train_shards import (check_prepared, load_catalogue, prepared_item_counts,
                                   train_from_shards)

log = logging.getLogger(__name__)
PROTOCOL = ("temporal leave-one-out: per user the last event is test, the second-last "
            "validation; train(+valid) items masked; every item ranked")


def run_training(dataset: Dataset, store: str | Path, config: TrainConfig = TrainConfig(),
                 evaluate: bool = True, final_fit: bool = False) -> tuple[Path, dict[str, Any]]:
    """Train, evaluate (when ``evaluate``) and export.

    With evaluation on, each user's last two events are held out: the second-last drives
    validation (and early stopping when configured), the last is the test reported next
    to popularity. Exported is the model evaluated, or with ``final_fit`` one trained again
    on every event (hold-out included) for the epochs the evaluated one was kept at: the
    manifest says which (``fit``), and its figures are the evaluated model's. Returns the
    artifact directory and the training summary stored in its manifest.
    """
    start = time.perf_counter()
    examples = training_examples(dataset)
    split = temporal_leave_one_out(dataset) if evaluate else None
    train_rows = split.train if split is not None else slice(None)
    validate = _validator(examples, split) if split is not None else None
    _warn_without_validation(config, validate, evaluate)
    fit_examples = _fit_examples(dataset, config, examples, train_rows)
    trained = train(dataset, config, fit_examples, validate)
    summary: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "examples": _count(fit_examples),
        "history": trained.history,
    }
    if split is not None:
        _log_kept(trained)
        summary["evaluation"] = _test(trained, examples, split)
        if final_fit:
            every = _fit_examples(dataset, config, examples, slice(None))
            trained = _final_fit(trained, summary, _count(every),
                                 lambda again: train(dataset, again, every))
    _record_fit(trained, summary, held_out=split is not None, start=start)
    return _export(trained, store, summary)


def _fit_examples(dataset: Dataset, config: TrainConfig, examples: dict[str, np.ndarray],
                  rows) -> dict[str, np.ndarray]:
    """The events' ``rows`` as the examples ``config.examples`` trains on: per event, or
    per user (training.user_level) from the same interactions."""
    if config.examples == "users":
        from training.user_level import user_examples

        return user_examples(dataset, np.arange(_count(examples))[rows])
    return {k: v[rows] for k, v in examples.items()}


def _count(examples: dict[str, np.ndarray]) -> int:
    return int(len(next(iter(examples.values()))))


def run_training_from_prepared(prepared: str | Path, store: str | Path,
                               config: TrainConfig = TrainConfig(), evaluate: bool = True,
                               eval_users: int = DEFAULT_USERS,
                               spec: FeatureSpec | None = None,
                               final_fit: bool = False) -> tuple[Path, dict[str, Any]]:
    """:func:`run_training` on prepared shards (contracts.prepared), streamed.

    Refuses shards prepared with another spec than ``spec`` (default: the source dataset's
    features.toml). With evaluation on, ``eval_users`` users sampled (seeded by
    ``config.seed``) from the valid split drive validation, and as many from the test split
    are reported next to popularity; without, every split is trained on, as the
    ``final_fit`` is (the hold-out rows are examples like the train rows; vocabularies,
    statistics and item counts stay the train split's, as prepared).
    """
    start = time.perf_counter()
    manifest = load_prepared(prepared)
    catalogue = load_catalogue(manifest, check_prepared(manifest, spec))
    item_ids = np.asarray(catalogue.items[manifest.spec.columns.item_id], dtype=object)
    validate = None
    if evaluate and manifest.splits["valid"].rows:
        validate = _sampled_validator(sample_holdout(manifest, "valid", item_ids, eval_users,
                                                     config.seed))
    _warn_without_validation(config, validate, evaluate)
    splits = ("train",) if evaluate else SPLITS
    trained = train_from_shards(manifest, catalogue, config, validate, splits=splits)
    summary: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "examples": sum(manifest.splits[s].rows for s in splits),
        "prepared": {"path": str(manifest.path), "spec_fingerprint": manifest.spec_fingerprint,
                     "engine": manifest.engine},
        "history": trained.history,
    }
    if evaluate:
        _log_kept(trained)
        test = sample_holdout(manifest, "test", item_ids, eval_users, config.seed)
        counts = prepared_item_counts(manifest, item_ids)
        summary["evaluation"] = _sampled_test(trained, test, counts)
        if final_fit:
            every = sum(manifest.splits[s].rows for s in SPLITS)
            trained = _final_fit(trained, summary, every, lambda again: train_from_shards(
                manifest, catalogue, again, splits=SPLITS))
    _record_fit(trained, summary, held_out=evaluate, start=start)
    return _export(trained, store, summary)


def _warn_without_validation(config: TrainConfig, validate, evaluate: bool) -> None:
    if evaluate and validate is None and config.early_stopping_patience:
        log.warning("no user has a validation event (each needs 3 or more events): early "
                    "stopping is off, all %d epochs are trained", config.epochs)


FIT_ALL_EVENTS, FIT_TRAIN_SPLIT = "all-events", "train-split"
FINAL_FIT = "final-fit"  # its checkpoints and TensorBoard logs: a folder of the run's own


def _final_fit(chosen: TrainedModel, summary: dict[str, Any], examples: int,
               refit: Callable[[TrainConfig], TrainedModel]) -> TrainedModel:
    """``refit`` (every event) for the epochs ``chosen`` was kept at, from a fresh start
    with the same seed and no validation (nothing is held out any more)."""
    start = time.perf_counter()
    config = chosen.config
    again = dataclasses.replace(
        config, epochs=chosen.kept_epoch, early_stopping_patience=0,
        checkpoint_dir=config.checkpoint_dir and str(Path(config.checkpoint_dir) / FINAL_FIT),
        tensorboard_dir=config.tensorboard_dir and str(Path(config.tensorboard_dir) / FINAL_FIT))
    log.info("final fit: %d examples (every event, the hold-out included), %d epochs as "
             "chosen on validation; the held-out figures above are the train-split model's",
             examples, again.epochs)
    final = refit(again)
    summary["final_fit"] = {"examples": examples, "epochs": again.epochs,
                            "history": final.history,
                            "seconds": round(time.perf_counter() - start, 2)}
    return final


def _record_fit(trained: TrainedModel, summary: dict[str, Any], held_out: bool,
                start: float) -> None:
    """What the exported model is (contracts.model_manifest: ``fit``, ``epochs``), said in
    the log too."""
    final = "final_fit" in summary
    summary["fit"] = FIT_ALL_EVENTS if final or not held_out else FIT_TRAIN_SPLIT
    summary["epochs"] = trained.kept_epoch
    if held_out:
        summary["evaluation"]["model_evaluated"] = FIT_TRAIN_SPLIT
    log.info("exported: %s, %d epochs", "a final fit on every event" if final else
             "the train-split model" if held_out else "every event", trained.kept_epoch)
    summary["seconds"] = round(time.perf_counter() - start, 2)


def _log_kept(trained: TrainedModel) -> None:
    """Which epoch the evaluated model is (early stopping's best, or the last)."""
    best = trained.history.get(f"val_{VALIDATION_METRIC}", [])
    trained_epochs = len(trained.history.get("loss", []))
    chosen = trained.kept_epoch
    score = (f" (validation {VALIDATION_METRIC} {best[chosen - 1]:.4f})"
             if 0 < chosen <= len(best) else "")
    log.info("kept epoch %d of the %d trained%s", chosen, trained_epochs, score)


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

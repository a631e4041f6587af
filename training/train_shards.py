"""Training from prepared shards (contracts.prepared): the same model, loss and callbacks
as training.train, fed by training.shards instead of arrays in memory.

What the in-memory path computes from its examples comes from the manifest here: the
vocabularies and numeric statistics (FeatureStats), and the item counts (logQ and corpus
sampling). The catalogue (item embeddings, corpus negatives, export) is the source items
file, read as the in-memory path reads it. Memory holds the catalogue, the vocabularies and
the stream's buffers, never the examples.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from contracts.dataset import SPEC_FILE, Dataset, read_table, table_columns
from contracts.errors import ArtifactError
from contracts.feature_spec import FeatureSpec, load_feature_spec
from contracts.prepared import SPLITS, PreparedManifest, check_spec
from training.distributed import WorkerRole, training_strategy
from training.model import FeatureStats
from training.resume import Position, StepCheckpoint, resume_position
from training.shards import (
    SHUFFLE_BUFFER,
    StreamConfig,
    candidate_q_table,
    split_shards,
    steps_per_epoch,
    stream_examples,
    worker_shards,
)
from training.tf_env import keras
from training.train import (TrainConfig, TrainedModel, Validator, compiled_model, fit,
                            train_users)
from training.user_level import TARGETS, prepared_user_examples

log = logging.getLogger(__name__)
# derived context: its full range, in the order training.model.compute_feature_stats gives
DERIVED_VOCABULARIES = {"hour_of_day": tuple(str(h) for h in range(24)),
                        "day_of_week": tuple(str(d) for d in range(7))}


def train_from_shards(manifest: PreparedManifest, catalogue: Dataset,
                      config: TrainConfig = TrainConfig(), validate: Validator | None = None,
                      shuffle_buffer: int = SHUFFLE_BUFFER,
                      splits: tuple[str, ...] = ("train",)) -> TrainedModel:
    """Fit a two-tower model on the prepared ``splits``, streamed (all three: every
    interaction, as the in-memory path without evaluation); ``catalogue`` is
    :func:`load_catalogue`'s. Validation and early stopping as training.train.train.

    With ``config.checkpoint_dir`` a checkpoint is saved every
    ``config.checkpoint_every_steps`` steps and after each epoch (training.resume); a rerun
    with the same directory restores the model and optimizer and goes on from the step it
    stopped at, on the examples the interrupted run would have seen next."""
    keras.utils.set_random_seed(config.seed)
    spec = catalogue.spec  # the spec in hand: the manifest's has the same fingerprint, but
    stats = prepared_feature_stats(manifest)  # its features in sorted order
    item_ids = np.asarray(catalogue.items[spec.columns.item_id], dtype=object)
    if config.examples == "users":  # one row per user, held in memory (training.user_level)
        examples = prepared_user_examples(manifest, spec, item_ids,
                                          every=set(splits) == set(SPLITS))
        log.info("user-level examples from the hold-out rows: %d users of %d",
                 len(examples[TARGETS]), manifest.users_rows)
        return train_users(catalogue, config, examples, validate, stats)
    counts = prepared_item_counts(manifest, item_ids)
    n = sum(manifest.splits[split].rows for split in splits)
    model = compiled_model(spec, stats, config, n, catalogue.items,
                           counts if config.loss.corpus_negatives else None)
    steps = steps_per_epoch(n, config.batch_size)
    start = resume_position(config.checkpoint_dir, steps)
    checkpoint = None
    if config.checkpoint_dir:
        checkpoint = StepCheckpoint(config.checkpoint_dir, config.checkpoint_every_steps, steps)
    data = training_strategy().distribute_datasets_from_function(
        lambda context: _worker_stream(manifest, splits, config, shuffle_buffer, item_ids,
                                       counts, context, start))
    trained = fit(TrainedModel(model, stats, catalogue, {}, config), data, n, validate, steps,
                  checkpoint)
    trained.kept_epoch = max(trained.kept_epoch, start.epoch)  # a finished run, run again
    return trained


def _worker_stream(manifest, splits, config: TrainConfig, shuffle_buffer: int, item_ids,
                   counts, context, start: Position):
    """This worker's stream (called once per input pipeline by the strategy)."""
    role = WorkerRole(context.num_input_pipelines, context.input_pipeline_id)
    every = split_shards(manifest, splits)
    shards = worker_shards(every, role)
    log.info("worker %d/%d reads %d of %d shards (%d examples): %s", role.index,
             role.num_workers, len(shards), len(every), sum(s.rows for s in shards),
             " ".join(s.path.name for s in shards))
    batch = context.get_per_replica_batch_size(config.batch_size)
    stream = StreamConfig(batch_size=batch, seed=config.seed, shuffle_buffer=shuffle_buffer,
                          start_row=start.global_step * batch)
    if stream.start_row:
        log.info("worker %d/%d skips the %d rows of its stream trained on before", role.index,
                 role.num_workers, stream.start_row)
    return stream_examples(manifest, splits, stream, role, candidate_q_table(item_ids, counts))


def prepared_feature_stats(manifest: PreparedManifest) -> FeatureStats:
    """FeatureStats from the manifest's vocabularies and statistics (what
    training.model.compute_feature_stats finds in memory)."""
    vocab, means, variances = {}, {}, {}
    for f in manifest.spec.features:
        if f.kind == "numeric":
            stat = manifest.statistics.get(f.name, {})
            counted = stat.get("count", 0) > 0
            means[f.name] = float(stat["mean"]) if counted else 0.0
            variances[f.name] = float(stat["variance"]) if counted else 1.0
        elif f.derive in DERIVED_VOCABULARIES:
            vocab[f.name] = DERIVED_VOCABULARIES[f.derive]
        elif f.kind != "history" and not f.hashed:  # hashed: no vocabulary
            if f.name not in manifest.vocabularies:
                raise ArtifactError(str(manifest.path / "manifest.json"),
                                    f"no vocabulary for feature {f.name!r}; prepare again")
            vocab[f.name] = tuple(v for v in manifest.vocabulary(f.name) if v != "")
    return FeatureStats(vocab, means, variances)


def prepared_item_counts(manifest: PreparedManifest, item_ids: np.ndarray) -> np.ndarray:
    """float64 [len(item_ids)]: each item's count among the train examples (0 if none)."""
    table = pq.read_table(manifest.item_counts)
    ids = table.column(0).to_numpy(zero_copy_only=False).astype(str)
    counts = table.column(1).to_numpy(zero_copy_only=False).astype(np.float64)
    wanted = np.asarray(item_ids).astype(str)
    order = np.argsort(ids)
    pos = np.searchsorted(ids[order], wanted).clip(0, max(len(ids) - 1, 0))
    found = ids[order][pos] == wanted if len(ids) else np.zeros(len(wanted), bool)
    return np.where(found, counts[order][pos] if len(ids) else 0.0, 0.0)


def load_catalogue(manifest: PreparedManifest, spec: FeatureSpec | None = None) -> Dataset:
    """The source items table (every catalogue item, in file order), as a Dataset without
    interactions: what item embeddings, corpus negatives and the export read. ``spec``
    (default: :func:`check_prepared`'s) orders the towers' features."""
    spec = spec if spec is not None else check_prepared(manifest)
    path = source_path(manifest, manifest.source["items"])
    items = read_table(path, table_columns(spec)["items"], spec)
    empty = {spec.columns.user_id: np.array([], dtype=object)}
    return Dataset(spec, dict(empty), dict(empty), items)


def source_spec(manifest: PreparedManifest) -> FeatureSpec:
    """The spec now beside the source data (features.toml next to the items file), or the
    manifest's own when the source has none."""
    path = source_path(manifest, manifest.source["items"]).parent / SPEC_FILE
    return load_feature_spec(path) if path.exists() else manifest.spec


def check_prepared(manifest: PreparedManifest, spec: FeatureSpec | None = None) -> FeatureSpec:
    """Refuse shards prepared with another spec than ``spec`` (default: the source
    dataset's features.toml as it is now), with a message saying to prepare again; returns
    the spec checked."""
    check_spec(manifest, manifest.spec)  # the manifest's spec against its own fingerprint
    spec = spec if spec is not None else source_spec(manifest)
    check_spec(manifest, spec)
    return spec


def source_path(manifest: PreparedManifest, name: str) -> Path:
    """A source file named in the manifest: absolute, or relative to where preparation ran
    (tried from here, then from the prepared directory's parent)."""
    path = Path(name)
    if path.is_absolute() or path.exists():
        return path
    beside = manifest.path.parent / path
    if beside.exists():
        return beside
    raise ArtifactError(str(manifest.path / "manifest.json"),
                        f"source file {name!r} not found (from here nor from "
                        f"{manifest.path.parent}); run from where the data was prepared")

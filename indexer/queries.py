"""The queries the recall gate is judged on.

With a dataset (``--data``): real user embeddings — each user's last interaction (the
held-out event of training's evaluation) with its context and the history before it, run
through the exported user tower. Without one, a sample of item embeddings stands in, and
the job says so: recall on item queries is a weaker promise than recall on user queries.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from indexer.gated_build import GateConfig, RecallQueries
from indexer.source import EmbeddingSource
from contracts.model_manifest import ModelManifest

log = logging.getLogger(__name__)
USER_BATCH = 4096


def item_queries(source: EmbeddingSource, config: GateConfig, seed: int) -> RecallQueries:
    xq = source.sample(config.tune_queries + config.gate_queries, seed + 1)
    xq = np.random.default_rng(seed).permutation(xq)
    tune, gate = _split(xq, config)
    log.warning("no --data given: the recall gate uses %d item embeddings as queries; give "
                "--data DATASET to gate on real user embeddings", len(gate))
    return RecallQueries(tune, gate, "item_embeddings")


def user_queries(model: ModelManifest, data_dir: str | Path, config: GateConfig,
                 seed: int) -> RecallQueries:
    """User embeddings [n, d] of held-out events of the dataset at ``data_dir``."""
    from training.saved_model_tower import SavedModelUserTower
    from contracts.dataset import load_dataset
    from training.evaluate import split_last_per_user
    from contracts.inputs import training_examples

    dataset = load_dataset(data_dir)
    events = np.flatnonzero(split_last_per_user(dataset).test)
    if len(events) == 0:
        raise ValueError(f"{data_dir}: no user has two interactions, so there is no held-out "
                         "event to build a gate query from; give a larger dataset or leave "
                         "out --data")
    rng = np.random.default_rng(seed)
    events = rng.permutation(events)[: config.tune_queries + config.gate_queries]
    examples = training_examples(dataset)
    names = [n for f in model.feature_spec.user_input_features for n in f.input_names]
    inputs = {name: examples[name][events] for name in names}
    tower = SavedModelUserTower(model)
    user_emb = np.concatenate([
        tower({k: v[lo:lo + USER_BATCH] for k, v in inputs.items()})
        for lo in range(0, len(events), USER_BATCH)]).astype(np.float32)
    tune, gate = _split(user_emb, config)
    log.info("recall gate queries: %d held-out user events through the user tower "
             "(%d more for tuning)", len(gate), len(tune))
    return RecallQueries(tune, gate, "user_tower")


def _split(xq: np.ndarray, config: GateConfig) -> tuple[np.ndarray, np.ndarray]:
    """Tuning queries first, gate queries after; a short supply keeps two thirds for the gate."""
    wanted = config.tune_queries + config.gate_queries
    n_tune = config.tune_queries if len(xq) >= wanted else len(xq) // 3
    return xq[:n_tune], xq[n_tune:]

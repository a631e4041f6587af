"""Data-parallel training across processes or machines, from the environment alone.

``TF_CONFIG`` (the standard TensorFlow variable) selects ``MultiWorkerMirroredStrategy``:
every worker runs the same ``two-tower train`` command; the workers find each other through
the ``cluster`` addresses and synchronise gradients with all-reduce each step. Example for
two machines (worker 0 is the chief, the one whose model artifact is kept)::

    TF_CONFIG='{"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]},
                "task": {"type": "worker", "index": 0}}' two-tower train --data … --out …

``--batch-size`` is the global batch: each of W workers steps on batch / W rows (in memory,
``--data --in-memory``: Keras splits every batch of the dataset, which each worker reads
whole and shards by data; streamed, ``--prepared``: each worker batches its own files at
the per-replica size, training.shards). The retrieval loss is a sum over rows and the
all-reduce sums the workers' gradients, so a step's gradient covers the same batch rows as
one worker's step; what changes is the in-batch softmax: each row's negatives are the other
rows of its own worker's batch / W, not of the whole batch (docs/training.md measures
it). Without TF_CONFIG (or with one worker) the default single-process strategy is used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # TensorFlow loads only when a strategy is asked for: `train` reads
    from training.tf_env import tf  # TF_CONFIG (worker_role) before it checks the data


@dataclass(frozen=True)
class WorkerRole:
    num_workers: int
    index: int

    @property
    def is_chief(self) -> bool:
        return self.index == 0


def worker_role() -> WorkerRole:
    """This process's place in the TF_CONFIG cluster (1 worker, index 0 without one)."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return WorkerRole(1, 0)
    try:
        config = json.loads(raw)
        workers = config["cluster"]["worker"]
        index = int(config["task"]["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"TF_CONFIG must name cluster.worker and task.index (got {raw!r})") from exc
    return WorkerRole(len(workers), index)


_STRATEGY: tf.distribute.Strategy | None = None


def training_strategy() -> tf.distribute.Strategy:
    """One strategy per process (TensorFlow allows a single multi-worker strategy)."""
    from training.tf_env import tf

    global _STRATEGY
    if _STRATEGY is None:
        if worker_role().num_workers > 1:
            _STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()
        else:
            _STRATEGY = tf.distribute.get_strategy()
    return _STRATEGY

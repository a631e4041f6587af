"""The unavoidable parts of a Retrieve call's CPU, measured apart, and the server's own
stage timings read from its /metrics: what benchmarks.loadtest compares the server with.

    parts = measure_parts(model_dir, index_dir, redis_url, user_ids, batch=8)

* ``ann_ms_per_query``: one Faiss search of ``batch`` queries at the served setting (the
  index's tuned nprobe / efSearch, k=100), one OpenMP thread, divided by ``batch``;
* ``tower_ms_per_user``: the NumPy user tower on ``batch`` users' raw inputs (their stored
  features and histories, a varied context), per user;
* ``redis_parse_ms_per_user``: the feature store's read of ``batch`` users, CPU time of the
  calling thread only (the round trip's wait is not CPU), per user.

Echo's CPU per call, the fourth part, comes from the echo server's own run. Each part is
timed over repeated calls after a warm-up; the median of ``rounds`` rounds is kept.
"""

from __future__ import annotations

import re
import statistics
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

K = 100
STAGE = re.compile(r'^two_tower_stage_seconds_(sum|count)\{rpc="Retrieve",stage="([a-z]+)"\} '
                   r'([0-9.e+-]+)$', re.M)
BATCH = re.compile(r"^two_tower_batch_size_(sum|count) ([0-9.e+-]+)$", re.M)


def scrape(metrics_port: int | None) -> dict[str, float]:
    """Sums and counts of the Retrieve stages and of the batch size, from /metrics;
    {} without a metrics port."""
    if not metrics_port:
        return {}
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=10).read().decode()
    out = {f"{stage}_{kind}": float(v) for kind, stage, v in STAGE.findall(text)}
    out.update({f"batch_{kind}": float(v) for kind, v in BATCH.findall(text)})
    return out


def stage_means_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean ms per observation of each stage between two scrapes (the batch's stages are
    observed once a batch, the others once a call), and the mean batch size."""
    out = {}
    for key in after:
        if key.endswith("_count"):
            name = key[: -len("_count")]
            n = after[key] - before.get(key, 0.0)
            if n > 0:
                total = after[f"{name}_sum"] - before.get(f"{name}_sum", 0.0)
                out[name if name == "batch" else f"{name}_ms"] = (
                    total / n if name == "batch" else 1e3 * total / n)
    return out


def measure_parts(model_dir: Path, index_dir: Path, redis_url: str,
                  user_ids: Sequence[str], batch: int, rounds: int = 5) -> dict[str, float]:
    import faiss

    from contracts.inputs import UserRequest, user_inputs
    from indexer.build import search_parameters
    from retrieval.feature_store import RedisFeatureStore
    from retrieval.pair import load_pair

    batch = max(1, int(round(batch)))
    pair = load_pair(model_dir, index_dir)
    store = RedisFeatureStore.from_url(redis_url)
    spec = pair.model.feature_spec
    users = list(user_ids)[: max(batch * 20, 200)]
    groups = [users[i : i + batch] for i in range(0, len(users) - batch + 1, batch)]
    stored = [store.read_users(g) for g in groups]
    requests = [[UserRequest(u, s.features if s else {}, s.history if s else (),
                             {"hour_of_day": (7 * j) % 24, "device": "tv"}, 1_700_000_000)
                 for j, (u, s) in enumerate(zip(g, found, strict=True))]
                for g, found in zip(groups, stored, strict=True)]
    inputs = [user_inputs(spec, r) for r in requests]
    embeddings = [pair.user_tower(x) for x in inputs]

    index = pair.index.artifact.index
    faiss.omp_set_num_threads(1)
    params = search_parameters(index, pair.index.artifact.spec, K, None)

    def ann() -> None:
        for emb in embeddings:
            index.search(np.ascontiguousarray(emb, dtype=np.float32), K, params=params)

    def tower() -> None:
        for x in inputs:
            pair.user_tower(x)

    def redis() -> None:
        for g in groups:
            store.read_users(g)

    per = len(groups) * batch
    return {
        "batch": batch,
        "ann_ms_per_query": _median_ms(ann, rounds, time.perf_counter) / per,
        "tower_ms_per_user": _median_ms(tower, rounds, time.perf_counter) / per,
        # the thread's CPU only: the wait for Redis's reply is not work of ours
        "redis_parse_ms_per_user": _median_ms(redis, rounds, time.thread_time) / per,
    }


def _median_ms(fn: Callable[[], None], rounds: int, clock: Callable[[], float]) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1e3 * statistics.median(times)

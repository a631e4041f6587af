"""Shared fixtures.

Processes are started and stopped by app.processes, as the benchmarks and the demo do.
Redis: integration tests talk to a real redis-server on a free loopback port, never a mock.
``redis_server`` starts one per session; ``redis_url`` hands each test an empty database;
``private_redis_server`` starts one a test may pause or kill.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from app.processes import ProcessStartError, RedisProcess, ServeProcess

RedisServer = RedisProcess  # a redis-server of the tests: .port, .process, .url


def start_redis_server(directory: Path, port: int | None = None,
                       extra_args: tuple[str, ...] = ()) -> RedisServer:
    """A redis-server on 127.0.0.1 (on ``port``, to restart one where it was); the caller
    stops it with ``stop_redis_server``. A test fails, naming why, when none starts."""
    try:
        return RedisProcess.start(directory, port=port, extra_args=extra_args)
    except ProcessStartError as exc:
        pytest.fail(f"the integration tests need a real redis-server: {exc}")


def stop_redis_server(server: RedisServer) -> None:
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        stop_redis_server(server)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session server's URL, emptied first so tests do not see each other's keys."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    yield redis_server.url


@pytest.fixture
def private_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, for tests that pause or stop it."""
    server = start_redis_server(tmp_path)
    try:
        yield server
    finally:
        stop_redis_server(server)


# --- the trained pipeline: tiny synthetic data → model artifact → index artifact ----------

TINY = dict(num_users=300, num_items=200, num_clusters=6, interactions_per_user=15, seed=3)


@dataclass(frozen=True)
class Pipeline:
    data_dir: Path
    model_dir: Path
    index_dir: Path
    summary: dict


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """Trained once per session: what `two-tower generate`, `train` and `build-index` make."""
    from indexer.build import IndexSpec
    from indexer.gated_build import GateConfig
    from indexer.job import JobOptions, run_build_index
    from contracts.dataset import write_dataset
    from training.pipeline import run_training
    from training.synthetic import SyntheticConfig, generate_synthetic
    from training.train import TrainConfig

    root = tmp_path_factory.mktemp("pipeline")
    dataset, spec_toml = generate_synthetic(SyntheticConfig(**TINY))
    write_dataset(dataset, root / "data", spec_toml)
    model_dir, summary = run_training(dataset, root / "models", TrainConfig(epochs=8))
    # As the nightly job runs it: item tower over the catalogue (so item metadata for
    # filtering is stored), recall gate on held-out users of the dataset. HNSW on a
    # 200-item inner-product catalogue levels off near 0.955 recall@100 and its parallel
    # build is not deterministic, so the gate here is 0.9: the test is about the path.
    index_dir = run_build_index(model_dir, root / "indexes", IndexSpec("HNSW32"),
                                JobOptions(items=root / "data", data=root / "data",
                                           gate=GateConfig(target_recall=0.9)))
    return Pipeline(root / "data", model_dir, index_dir, summary)


# --- real server processes on free loopback ports ------------------------------------------


ServerProcess = ServeProcess  # a `two-tower serve` child: .address, .process, .log()


def start_server(args: list[str], workdir: Path, timeout_s: float = 120.0,
                 env: dict[str, str] | None = None) -> ServerProcess:
    """`two-tower serve ARGS --port 0` as a child process (with ``env`` when given);
    returns once it is SERVING."""
    return ServeProcess.start(args, workdir, timeout_s, env)


def stop_server(server: ServerProcess) -> int:
    return server.stop()


@pytest.fixture(scope="session")
def server(pipeline: Pipeline, tmp_path_factory) -> Iterator[ServerProcess]:
    """Serving the pipeline's pair with the in-process feature store (the default). The
    batching wait is 2 ms so that concurrent test calls batch whatever the machine's speed
    (the default, 0, batches only calls that arrive while a batch runs)."""
    workdir = tmp_path_factory.mktemp("server")
    running = start_server(["--model", str(pipeline.model_dir), "--index",
                            str(pipeline.index_dir), "--features", str(pipeline.data_dir),
                            "--metrics-port", "0", "--max-wait-us", "2000"], workdir)
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def redis_backed_server(pipeline: Pipeline, tmp_path_factory):
    """Serving the same pair with user features in a real Redis of its own (other tests
    flush theirs), loaded by `two-tower load-features`. Its Redis timeout is 2 s, not the
    30 ms default: these tests compare exact candidates, and on a loaded machine one slow
    read would turn a reply into a degraded cold start (tests/test_faults.py covers that)."""
    redis_process = start_redis_server(tmp_path_factory.mktemp("redis-for-server"))
    url = f"redis://127.0.0.1:{redis_process.port}/0"
    subprocess.run([sys.executable, "-m", "app.cli", "load-features", "--data",
                    str(pipeline.data_dir), "--redis-url", url], check=True, capture_output=True)
    workdir = tmp_path_factory.mktemp("redis-server")
    running = start_server(["--model", str(pipeline.model_dir), "--index",
                            str(pipeline.index_dir), "--redis-url", url,
                            "--redis-timeout-ms", "2000"], workdir)
    yield running, url
    stop_server(running)
    stop_redis_server(redis_process)


@pytest.fixture
def features_redis(pipeline, redis_url) -> str:
    """A fresh Redis filled with the pipeline's user features (`two-tower load-features`)."""
    subprocess.run([sys.executable, "-m", "app.cli", "load-features", "--data",
                    str(pipeline.data_dir), "--redis-url", redis_url], check=True,
                   capture_output=True)
    return redis_url

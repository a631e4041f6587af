"""Shared fixtures.

Redis: integration tests talk to a real redis-server on a free loopback port, never a mock.
``redis_server`` starts one per session; ``redis_url`` hands each test an empty database;
``private_redis_server`` starts one a test may pause or kill.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_REDIS_START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RedisServer:
    """A redis-server process of the test session, bound to 127.0.0.1."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = _start_redis_server(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        _stop_redis_server(server)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session server's URL, emptied first so tests do not see each other's keys."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    yield redis_server.url


@pytest.fixture
def private_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, for tests that pause or stop it."""
    server = _start_redis_server(tmp_path)
    try:
        yield server
    finally:
        _stop_redis_server(server)


def start_redis_server(directory: Path, port: int | None = None,
                       extra_args: tuple[str, ...] = ()) -> RedisServer:
    """A redis-server on 127.0.0.1 (on ``port``, to restart one where it was); the caller
    stops it with ``stop_redis_server``."""
    return _start_redis_server(directory, port=port, extra_args=extra_args)


def stop_redis_server(server: RedisServer) -> None:
    _stop_redis_server(server)


def _start_redis_server(directory: Path, attempts: int = 3, port: int | None = None,
                        extra_args: tuple[str, ...] = ()) -> RedisServer:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(binary, os.X_OK):
        pytest.fail(
            "redis-server not found (looked on PATH and at /usr/bin/redis-server); the "
            "integration tests need a real one. Run `make test`, which installs it."
        )
    fixed = port
    for attempt in range(attempts):  # another process may take the free port before us
        port = fixed or _free_port()
        log = directory / f"redis-{port}.log"
        process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--dir", str(directory), "--logfile", str(log),
             *extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        server = RedisServer(port, process)
        if _wait_until_ready(server):
            return server
        _stop_redis_server(server)
    text = log.read_text() if log.exists() else "(no log)"
    pytest.fail(f"redis-server did not answer PING after {attempts} attempts; last log:\n{text}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_ready(server: RedisServer) -> bool:
    deadline = time.monotonic() + _REDIS_START_TIMEOUT_S
    while time.monotonic() < deadline and server.process.poll() is None:
        try:
            with redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=0.5,
                             retry=Retry(NoBackoff(), 0)) as client:
                if client.ping():
                    return True
        except redis.RedisError:
            time.sleep(0.02)
    return False


def _stop_redis_server(server: RedisServer) -> None:
    process = server.process
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGCONT)  # a paused server would not act on SIGTERM
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path
    metrics_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()


def start_server(args: list[str], workdir: Path, timeout_s: float = 120.0,
                 env: dict[str, str] | None = None) -> ServerProcess:
    """`two-tower serve ARGS --port 0` as a child process (with ``env`` when given);
    returns once it is SERVING."""
    port_file = workdir / "port"
    log_path = workdir / "server.log"
    command = [sys.executable, "-m", "app.cli", "serve", *args, "--port", "0",
               "--port-file", str(port_file)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    from app.processes import wait_for_port_file

    try:
        ports = wait_for_port_file(process, port_file, log_path, timeout_s)
    except TimeoutError:
        process.kill()
        raise
    return ServerProcess(process, ports[0], log_path, (ports[1:] or [None])[0])


def stop_server(server: ServerProcess) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            return server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            return server.process.wait()
    return server.process.returncode


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
    redis_process = _start_redis_server(tmp_path_factory.mktemp("redis-for-server"))
    url = f"redis://127.0.0.1:{redis_process.port}/0"
    subprocess.run([sys.executable, "-m", "app.cli", "load-features", "--data",
                    str(pipeline.data_dir), "--redis-url", url], check=True, capture_output=True)
    workdir = tmp_path_factory.mktemp("redis-server")
    running = start_server(["--model", str(pipeline.model_dir), "--index",
                            str(pipeline.index_dir), "--redis-url", url,
                            "--redis-timeout-ms", "2000"], workdir)
    yield running, url
    stop_server(running)
    _stop_redis_server(redis_process)

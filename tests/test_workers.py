"""`serve --workers 2`: two real worker processes on one port under a supervisor, called
over loopback gRPC with user features in a real Redis (retrieval.workers)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from app.processes import child_pids
from retrieval.client import build_request, retrieve
from tests.conftest import start_server, stop_server
from tests.test_hot_swap import _build_index

NIGHT = {"hour_of_day": 22, "device": "tv"}
# Each channel its own subchannel pool, so its own TCP connection: the kernel spreads
# connections, not calls, over the workers.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _start(pipeline, redis_url: str, workdir: Path, *extra: str, index: Path | None = None):
    return start_server(["--model", str(pipeline.model_dir), "--index",
                         str(index or pipeline.index_dir), "--redis-url", redis_url,
                         "--redis-timeout-ms", "2000", "--metrics-port", "0",
                         "--workers", "2", *extra], workdir)


async def _one_call_per_connection(address: str, n: int, timeout: float = 20.0) -> list:
    async def one(i: int):
        async with grpc.aio.insecure_channel(address, options=OWN_CONNECTION) as channel:
            return await retrieve(channel, build_request(f"u{i % 50}", 10, NIGHT,
                                                         1_700_611_200), timeout)

    return await asyncio.gather(*(one(i) for i in range(n)))


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    samples = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def _wait_for(predicate, timeout_s: float = 60.0, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s:.0f}s: {what}")


@pytest.mark.slow
def test_two_workers_answer_on_one_port_and_one_metrics_endpoint_sums_them(
        pipeline, features_redis, tmp_path):
    running = _start(pipeline, features_redis, tmp_path)
    try:
        workers = child_pids(running.process.pid)
        assert len(workers) == 2
        replies = asyncio.run(_one_call_per_connection(running.address, 24))
        assert all(len(r.response.candidates) == 10 for r in replies)
        metrics = _metrics(running.metrics_port)
        per_worker = [metrics.get(f'two_tower_worker_requests_total{{worker="{i}"}}', 0)
                      for i in (0, 1)]
        assert min(per_worker) > 0, per_worker  # both workers answered some
        assert sum(per_worker) == 24
        assert metrics['two_tower_requests_total{code="OK",rpc="Retrieve"}'] == 24
        assert metrics['two_tower_stage_seconds_count{rpc="Retrieve",stage="total"}'] == 24
        assert metrics["two_tower_workers"] == 2
        assert metrics["two_tower_worker_restarts_total"] == 0
        serving = {k: v for k, v in metrics.items() if k.startswith("two_tower_serving_info")}
        assert list(serving.values()) == [2.0]  # both workers serve the one pair
        # the workers' threads' CPU, written once a second, summed by thread name (the
        # event loops: each has loaded a pair, the batch threads' 24 calls may be a few ms)
        _wait_for(lambda: _metrics(running.metrics_port).get(
            'two_tower_thread_cpu_seconds_total{thread="main"}', 0) > 0.1,
            what="the workers' event loops' CPU in the supervisor's metrics")
    finally:
        code = stop_server(running)
        assert code == 0, running.log()[-3000:]
    assert "SERVING with 2 workers" in running.log()


@pytest.mark.slow
def test_sigterm_drains_every_worker_and_exits_0(pipeline, features_redis, tmp_path):
    # A 2 s batching window keeps the calls in flight, on both workers, when SIGTERM lands.
    running = _start(pipeline, features_redis, tmp_path, "--max-batch", "1000",
                     "--max-wait-us", "2000000", "--grace-seconds", "5")
    workers = child_pids(running.process.pid)

    async def scenario():
        calls = asyncio.ensure_future(_one_call_per_connection(running.address, 16))
        await asyncio.sleep(1.0)
        os.kill(running.process.pid, signal.SIGTERM)
        return await calls

    try:
        replies = asyncio.run(scenario())
        exit_code = running.process.wait(timeout=40)
    finally:
        stop_server(running)
    assert all(len(r.response.candidates) == 10 for r in replies)  # any failure raised
    assert exit_code == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
    assert running.log().count("stopping: NOT_SERVING, draining") == 2  # each worker


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_counted_and_a_crash_loop_ends_it(
        pipeline, features_redis, tmp_path):
    running = _start(pipeline, features_redis, tmp_path)
    try:
        victim = child_pids(running.process.pid)[0]
        os.kill(victim, signal.SIGKILL)
        _wait_for(lambda: _metrics(running.metrics_port).get(
            "two_tower_worker_restarts_total") == 1, what="the restart counted")
        _wait_for(lambda: len(set(child_pids(running.process.pid)) - {victim}) == 2,
                  what="a new worker in its place")
        # the new worker loads, then binds: every call succeeds meanwhile and after
        replies = asyncio.run(_one_call_per_connection(running.address, 8))
        assert all(len(r.response.candidates) == 10 for r in replies)
        assert "exited unasked with signal SIGKILL: starting it again" in running.log()

        # kill every worker as it appears: past 5 unasked exits a minute, the supervisor
        # gives up and exits non-zero
        deadline = time.monotonic() + 90
        while running.process.poll() is None and time.monotonic() < deadline:
            for pid in child_pids(running.process.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        assert running.process.wait(timeout=30) == 1
    finally:
        stop_server(running)
    assert "a crash loop; stopping every worker" in running.log()


@pytest.mark.slow
def test_every_worker_follows_a_publish(pipeline, features_redis, tmp_path):
    store = tmp_path / "indexes"
    first = _build_index(pipeline.model_dir, store, "HNSW32")
    running = _start(pipeline, features_redis, tmp_path / "server", "--watch-interval", "0.2",
                     index=store)
    try:
        assert {r.response.index_version for r in
                asyncio.run(_one_call_per_connection(running.address, 8))} == {first}
        second = _build_index(pipeline.model_dir, store, "Flat")
        key = (f'two_tower_serving_info{{index_version="{second}",'
               f'model_version="{pipeline.model_dir.name}"}}')
        _wait_for(lambda: _metrics(running.metrics_port).get(key) == 2,
                  what="both workers serving the new pair")
        metrics = _metrics(running.metrics_port)
        assert [k for k in metrics if k.startswith("two_tower_serving_info")] == [key]
        replies = asyncio.run(_one_call_per_connection(running.address, 24))
        assert {r.response.index_version for r in replies} == {second}
        assert len(re.findall(r"swapped to model \S+ / index " + second, running.log())) == 2
    finally:
        code = stop_server(running)
        assert code == 0, running.log()[-3000:]


def test_more_than_one_worker_needs_redis(pipeline, tmp_path):
    done = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--model",
                           str(pipeline.model_dir), "--index", str(pipeline.index_dir),
                           "--workers", "2", "--port", "0"], check=False, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "--workers 2 needs --redis-url" in done.stderr


def test_a_workers_configuration_crosses_as_json_and_comes_back_equal(tmp_path):
    import json

    from retrieval.redis_options import RedisAuth
    from retrieval.security import TlsConfig, TokenSet
    from retrieval.server import ServerConfig
    from retrieval.workers import decode_config, encode_config

    config = ServerConfig(model_dir=tmp_path / "m", index_dir=tmp_path / "i",
                          redis_url="redis://127.0.0.1:1/0", worker=1,
                          tls=TlsConfig(b"-----chain-----", b"-----key-----", None),
                          auth=TokenSet.from_text("ci:0123456789abcdef0123\n", "tokens"),
                          redis_auth=RedisAuth("reader", "a password"))
    assert decode_config(json.loads(json.dumps(encode_config(config)))) == config
    with pytest.raises(ValueError, match="names 'os'"):
        decode_config({"dataclass": "os:system", "fields": {}})

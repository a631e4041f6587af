"""Publishing a new pair while the service answers: swapped with no failed call, and a
bad version refused while the old one keeps serving."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retrieval.client import build_request, retrieve
from tests.conftest import start_server, stop_server

NIGHT = {"hour_of_day": 22, "device": "tv"}


def _build_index(model_dir, store, factory: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "build-index", "--model", str(model_dir),
         "--out", str(store), "--index", factory, "--target-recall", "0.5"],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return (store / "CURRENT").read_text().strip()


async def _load(address: str, stop: asyncio.Event, seen: list) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        i = 0
        while not stop.is_set():
            reply = await retrieve(channel, build_request(f"u{i % 50}", 20, NIGHT, 1_700_611_200))
            seen.append((reply.response.model_version, reply.response.index_version,
                         len(reply.response.candidates)))
            i += 1


async def _load_while(address: str, action, settle_s: float) -> list:
    seen: list = []
    stop = asyncio.Event()
    workers = [asyncio.create_task(_load(address, stop, seen)) for _ in range(4)]
    await asyncio.sleep(0.5)
    await asyncio.to_thread(action)
    await asyncio.sleep(settle_s)
    stop.set()
    await asyncio.gather(*workers)  # any failed call raises here
    return seen


@pytest.mark.slow
def test_new_pair_is_swapped_in_under_load_and_a_bad_one_refused(pipeline, tmp_path):
    store = tmp_path / "indexes"
    first = _build_index(pipeline.model_dir, store, "HNSW32")
    running = start_server(["--model", str(pipeline.model_dir), "--index", str(store),
                            "--features", str(pipeline.data_dir), "--watch-interval", "0.2"],
                           tmp_path)
    try:
        second: list[str] = []
        seen = asyncio.run(_load_while(
            running.address,
            lambda: second.append(_build_index(pipeline.model_dir, store, "Flat")), 2.0))
        model = pipeline.model_dir.name
        assert {s[0] for s in seen} == {model}
        assert {s[1] for s in seen} == {first, second[0]}  # both served, nothing else
        assert seen[-1][1] == second[0] and all(s[2] == 20 for s in seen)

        bad = store / "i-bad-version"
        shutil.copytree(store / second[0], bad)
        doc = json.loads((bad / "manifest.json").read_text())
        doc["model_version"] = "m-another-model"
        (bad / "manifest.json").write_text(json.dumps(doc))
        seen = asyncio.run(_load_while(
            running.address, lambda: (store / "CURRENT").write_text("i-bad-version\n"), 1.0))
        assert {s[1] for s in seen} == {second[0]}  # the old pair kept serving
        with grpc.insecure_channel(running.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        time.sleep(0.3)
        assert "refused index i-bad-version" in running.log()
        assert "m-another-model" in running.log()
    finally:
        stop_server(running)


def test_a_new_index_of_the_served_model_keeps_its_user_tower_and_loads_at_low_priority(
        pipeline):
    """retrieval.pair.load_pair(reuse=): the served pair's verified model and tower are kept
    for an index of the same model version directory; the watcher's loading thread runs at
    a lower CPU priority than serving (nice is per thread on Linux)."""
    import os
    import threading

    from retrieval.pair import load_pair
    from retrieval.swap import LOAD_NICE, _lower_this_threads_priority

    served = load_pair(pipeline.model_dir, pipeline.index_dir)
    again = load_pair(pipeline.model_dir, pipeline.index_dir, reuse=served)
    assert again.user_tower is served.user_tower and again.index is not served.index
    other_kind = load_pair(pipeline.model_dir, pipeline.index_dir, "numpy", reuse=served)
    assert other_kind.user_tower is not served.user_tower  # asked for another tower kind

    seen = {}

    def loader():
        _lower_this_threads_priority()
        seen["loader"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread = threading.Thread(target=loader)
    thread.start()
    thread.join()
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen["loader"] == min(19, base + LOAD_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # serving's

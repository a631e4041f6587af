"""Faults, short forms: the feature store dead or slow, overload, SIGTERM under load.

Every test runs a real `two-tower serve` process against a real redis-server, both on free
loopback ports, with load from an async gRPC client that is bounded in calls and time.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
from dataclasses import dataclass

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retrieval.client import build_request
from retrieval.feature_store import RedisFeatureStore, users_from_dataset
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as pb_grpc
from tests.conftest import (
    RedisServer, start_redis_server, start_server, stop_redis_server, stop_server,
)
from contracts.dataset import load_dataset

NIGHT = {"hour_of_day": 22, "device": "tv"}
WEDNESDAY = 1_700_611_200
TIMEOUT_MS = 30


@dataclass
class Outcome:
    code: grpc.StatusCode
    latency_s: float
    reply: pb.RetrieveResponse | None
    started: float  # time.monotonic() when the call was sent


async def _call(stub, request, timeout: float = 10.0) -> Outcome:
    start = time.monotonic()
    try:
        reply = await stub.Retrieve(request, timeout=timeout)
        return Outcome(grpc.StatusCode.OK, time.monotonic() - start, reply, start)
    except grpc.aio.AioRpcError as exc:
        return Outcome(exc.code(), time.monotonic() - start, None, start)


async def _burst(address: str, requests: list, concurrency: int) -> list[Outcome]:
    """Every request, ``concurrency`` at a time, over one channel."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        gate = asyncio.Semaphore(concurrency)

        async def one(request):
            async with gate:
                return await _call(stub, request)

        return list(await asyncio.gather(*(one(r) for r in requests)))


def _requests(n: int, k: int = 10) -> list:
    return [build_request(f"u{i % 300}", k, NIGHT, WEDNESDAY) for i in range(n)]


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _metric(metrics_port: int, pattern: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=5).read().decode()
    return sum(float(v) for v in re.findall(r"(?m)^" + pattern + r" (\S+)$", text))


class RestartableRedis:
    """A redis-server holding the pipeline's users, which a test may kill and restart on
    the same port."""

    def __init__(self, directory, data_dir) -> None:
        self.directory, self.data_dir = directory, data_dir
        self.server: RedisServer = start_redis_server(directory)
        self.load()

    @property
    def url(self) -> str:
        return self.server.url

    def load(self) -> None:
        users = users_from_dataset(load_dataset(self.data_dir))

        async def write() -> None:
            store = RedisFeatureStore.from_url(self.url)
            try:
                await store.put_users(users)
            finally:
                await store.close()

        asyncio.run(write())

    def kill(self) -> None:
        self.server.process.kill()
        self.server.process.wait()

    def restart(self) -> float:
        """Start it again on its port; returns time.monotonic() once it answers PING."""
        self.server = start_redis_server(self.directory, port=self.server.port)
        return time.monotonic()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.server.port, socket_timeout=5)


@pytest.fixture
def feature_redis(tmp_path, pipeline):
    running = RestartableRedis(tmp_path, pipeline.data_dir)
    yield running
    stop_redis_server(running.server)


@pytest.fixture
def redis_served(feature_redis, pipeline, tmp_path):
    running = start_server(["--model", str(pipeline.model_dir), "--index",
                            str(pipeline.index_dir), "--redis-url", feature_redis.url,
                            "--redis-timeout-ms", str(TIMEOUT_MS), "--breaker-failures", "3",
                            "--breaker-cool-down-ms", "500", "--metrics-port", "0"], tmp_path)
    yield running
    assert stop_server(running) == 0


def _first_normal_reply_after(address: str, since: float, limit_s: float = 5.0) -> float:
    """Seconds from ``since`` to the first reply that is not degraded."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        while time.monotonic() - since < limit_s:
            reply = stub.Retrieve(build_request("u1", 10, NIGHT, WEDNESDAY), timeout=5)
            if not reply.degraded:
                return time.monotonic() - since
            time.sleep(0.02)
    raise AssertionError(f"still degraded {limit_s}s after the feature store came back")


@pytest.mark.slow
def test_a_dead_redis_gives_fast_degraded_replies_and_normal_ones_once_it_is_back(
        feature_redis, redis_served):
    asyncio.run(_burst(redis_served.address, _requests(20), 4))  # warm: connections made
    before = asyncio.run(_burst(redis_served.address, _requests(20), 1))
    assert all(o.code == grpc.StatusCode.OK and not o.reply.degraded for o in before)

    feature_redis.kill()
    during = asyncio.run(_burst(redis_served.address, _requests(300), 8))
    assert {o.code for o in during} == {grpc.StatusCode.OK}
    assert all(o.reply.degraded and len(o.reply.candidates) == 10 for o in during)
    assert _p([o.latency_s for o in during[50:]], 0.99) < 0.1  # the breaker: no waiting
    port = redis_served.metrics_port
    assert _metric(port, r'two_tower_degraded_replies_total\{reason="breaker_open"\}') > 0
    assert _metric(port, r"two_tower_feature_store_breaker_state") == 2

    # The request's own history still shapes a degraded reply (as for a cold start).
    with grpc.insecure_channel(redis_served.address) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        plain = stub.Retrieve(build_request("u1", 10, NIGHT, WEDNESDAY), timeout=5)
        recent = stub.Retrieve(build_request("u1", 10, NIGHT, WEDNESDAY,
                                             recent=["i3", "i7", "i11"]), timeout=5)
        assert plain.degraded and recent.degraded
        assert [c.item_id for c in plain.candidates] != [c.item_id for c in recent.candidates]
        # A write cannot be degraded: it fails fast with UNAVAILABLE.
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.RecordInteraction(pb.Interaction(user_id="u1", item_id="i3"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 1.0

    back = feature_redis.restart()
    assert _first_normal_reply_after(redis_served.address, back) <= 1.0
    assert _metric(port, r"two_tower_feature_store_breaker_state") == 0


@pytest.mark.slow
def test_a_slow_redis_gives_degraded_replies_within_the_timeout_not_late(
        feature_redis, redis_served):
    with feature_redis.client() as admin:
        admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # every command waits 1.5 s
        paused = time.monotonic()
        during = asyncio.run(_burst(redis_served.address, _requests(200), 8))
        assert time.monotonic() - paused < 1.5  # all of them answered while Redis was paused
        admin.execute_command("CLIENT", "UNPAUSE")
        unpaused = time.monotonic()
    assert {o.code for o in during} == {grpc.StatusCode.OK}
    assert all(o.reply.degraded for o in during)
    # Before the breaker opens a call waits one timeout (30 ms); none waits for Redis.
    assert max(o.latency_s for o in during) < 0.3
    assert _first_normal_reply_after(redis_served.address, unpaused) <= 1.0


@pytest.mark.slow
def test_overload_is_shed_with_resource_exhausted_and_the_server_recovers(pipeline, tmp_path):
    running = start_server(["--model", str(pipeline.model_dir), "--index",
                            str(pipeline.index_dir), "--max-batch", "1", "--max-queue", "4"],
                           tmp_path)
    try:
        # 800 at once against a queue of 4. (Past about 1000 calls waiting for the event
        # loop, gRPC's core itself cancels new streams: grpc.server.max_pending_requests.)
        offered = []
        for _ in range(2):
            offered += asyncio.run(_burst(running.address, _requests(800, k=100), 800))
        codes = [o.code for o in offered]
        shed = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert 0 < shed < len(codes)
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        accepted = [o.latency_s for o in offered if o.code == grpc.StatusCode.OK]
        assert _p(accepted, 0.99) < 3.0  # the queue is bounded, so is the wait
        after = asyncio.run(_burst(running.address, _requests(50), 2))
        assert {o.code for o in after} == {grpc.StatusCode.OK}
        assert _p([o.latency_s for o in after], 0.5) < 0.1
    finally:
        assert stop_server(running) == 0


@pytest.mark.slow
def test_sigterm_turns_health_not_serving_and_finishes_every_accepted_call(pipeline,
                                                                             tmp_path):
    # A 6 s batching window keeps the calls in flight when the signal lands, 2.5 s after
    # they were sent: time for a loaded machine to accept all 40 (gRPC cancels calls it
    # had not yet handed to the service when the server stops; clean-clone CI runs saw
    # some of them UNAVAILABLE with 0.4 s, and once with 1 s on a machine 25 % slower).
    running = start_server(["--model", str(pipeline.model_dir), "--index",
                            str(pipeline.index_dir), "--features", str(pipeline.data_dir),
                            "--max-batch", "1000", "--max-wait-us", "6000000",
                            "--grace-seconds", "5"], tmp_path)

    async def scenario():
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            calls = [asyncio.create_task(_call(stub, r)) for r in _requests(40)]
            await asyncio.sleep(2.5)  # on the server, waiting in the batch
            signalled = time.monotonic()
            os.kill(running.process.pid, signal.SIGTERM)
            status = (await watch.read()).status
            seen_not_serving = time.monotonic()
            watch.cancel()
            return await asyncio.gather(*calls), status, seen_not_serving - signalled

    try:
        outcomes, status, delay = asyncio.run(scenario())
        # Its own exit after the one SIGTERM: stop_server would send a second one, which
        # may land after the handler is gone (the loop closed) and kill it with -15.
        exit_code = running.process.wait(timeout=30)
    finally:
        stop_server(running)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert delay < 0.5  # before the in-flight calls were answered
    assert {o.code for o in outcomes} == {grpc.StatusCode.OK}
    assert all(len(o.reply.candidates) == 10 for o in outcomes)
    assert exit_code == 0
    assert "stopping: NOT_SERVING" in running.log()

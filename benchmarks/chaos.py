"""Chaos benchmark: faults under load against a real server, and a table of what happened.

    python -m benchmarks.chaos [--workdir W] [--outage-seconds 10] [--soak-seconds 1800]
        [--scenarios redis_down,slow_redis,overload,sigterm,bad_publish,hot_swap,watcher,soak]
        [--out benchmarks/results]

Each scenario starts `two-tower serve` (and, where it needs one, a redis-server) on free
loopback ports, puts it under load from an async gRPC client in a thread of this process
(closed loop: N callers, each sending its next call when the last returned; the soak runs
open loop at half the measured capacity), does one thing to it, and checks the outcome:

    redis_down    kill redis-server for --outage-seconds, restart it on its port: no call
                  fails, outage replies are degraded, normal replies within 1 s of return
    slow_redis    CLIENT PAUSE for 3 s: no call fails, p99 stays within steady p99 + 3 ×
                  the Redis timeout (degraded, not late)
    overload      2 × 800 calls at once against --max-queue 4: only OK and
                  RESOURCE_EXHAUSTED, then normal service
    sigterm       SIGTERM with calls in flight: health NOT_SERVING, every call sent before
                  the signal OK, exit code 0
    bad_publish   a truncated index file, a checksum mismatch, an index of another model
                  version, one of another dimension, each made CURRENT in turn: refused
                  with a log line, the old pair serving, health SERVING, no call failed
    hot_swap      a new index built and published under load: no call failed, every
                  reply's versions one of the two pairs, p99 during ≤ 2 × steady
    watcher       CURRENT overwritten with bytes that are not UTF-8 for 3 s, then a valid
                  new version published, under load (--watch-interval 1): the malformed
                  pointer counted on /metrics with the old pair serving, the new version
                  served within two watch intervals, no call failed
    soak          --soak-seconds at half capacity: no error, RSS growth ≤ 5 %

Artifacts (synthetic data, a model, an index store) are made in --workdir once with the
`two-tower` command. Writes chaos.json and chaos.md to --out. Everything targets 127.0.0.1
and every run is bounded in calls and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retrieval.client import build_request
from app.processes import RedisProcess, ServeProcess
from retrieval.v1 import retrieval_pb2_grpc as pb_grpc

log = logging.getLogger("chaos")
CLI = [sys.executable, "-m", "app.cli"]
NIGHT = {"hour_of_day": 22, "device": "tv"}
REDIS_TIMEOUT_MS = 30
SCENARIOS = ("redis_down", "slow_redis", "overload", "sigterm", "bad_publish", "hot_swap",
             "watcher", "soak")
WATCH_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Sample:
    start: float      # time.monotonic() when sent
    latency_s: float
    code: str
    degraded: bool = False
    versions: tuple[str, str] = ("", "")


@dataclass
class Row:
    scenario: str
    action: str
    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # non-OK codes
    p99_steady_ms: float | None = None
    p99_during_ms: float | None = None
    passed: bool = False
    notes: str = ""


# --- load ------------------------------------------------------------------------------


class Load:
    """Calls Retrieve from a thread of its own until ``stop()``: ``workers`` closed-loop
    callers, or open loop at ``rate`` calls/s when given (at most ``workers`` in flight)."""

    def __init__(self, address: str, workers: int = 4, rate: float | None = None,
                 timeout_s: float = 5.0) -> None:
        self.address, self.workers, self.rate, self.timeout_s = address, workers, rate, timeout_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(timeout=60)
        return self.samples

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            if self.rate is None:
                await asyncio.gather(*(self._closed(stub, w) for w in range(self.workers)))
            else:
                await self._open(stub)

    async def _closed(self, stub, worker: int) -> None:
        i = worker
        while not self._stop.is_set():
            await self._call(stub, i)
            i += self.workers

    async def _open(self, stub) -> None:
        gate, pending, i = asyncio.Semaphore(self.workers), set(), 0
        start = time.monotonic()
        while not self._stop.is_set():
            await asyncio.sleep(max(0.0, start + i / self.rate - time.monotonic()))
            await gate.acquire()
            task = asyncio.create_task(self._call(stub, i))
            task.add_done_callback(lambda _: gate.release())
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        await asyncio.gather(*pending)

    async def _call(self, stub, i: int) -> None:
        request = build_request(f"u{i % 300}", 20, NIGHT, 1_700_611_200)
        start = time.monotonic()
        try:
            r = await stub.Retrieve(request, timeout=self.timeout_s)
            sample = Sample(start, time.monotonic() - start, "OK", r.degraded,
                            (r.model_version, r.index_version))
        except grpc.aio.AioRpcError as exc:
            sample = Sample(start, time.monotonic() - start, exc.code().name)
        self.samples.append(sample)


def p99_ms(samples: list[Sample]) -> float | None:
    ok = sorted(s.latency_s for s in samples if s.code == "OK")
    return round(ok[min(len(ok) - 1, int(0.99 * len(ok)))] * 1000, 2) if ok else None


def between(samples: list[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.start < end]


def errors_of(samples: list[Sample]) -> dict[str, int]:
    return dict(Counter(s.code for s in samples if s.code != "OK"))


# --- processes -------------------------------------------------------------------------


def Redis(workdir: Path) -> RedisProcess:  # noqa: N802 - reads as the thing it starts
    """A redis-server that a scenario may kill and restart on the same port."""
    return RedisProcess.start(workdir)


class Server(ServeProcess):
    """`two-tower serve` with what the scenarios read from it: metrics and health."""

    def __init__(self, workdir: Path, args: list[str]) -> None:
        started = ServeProcess.start(args, workdir, 120)
        super().__init__(started.process, started.port, started.log_path, started.metrics_port)

    def metric(self, line_prefix: str) -> float:
        """The value of the /metrics line starting with ``line_prefix`` (needs
        --metrics-port)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(line_prefix + " "):
                    return float(line.split()[-1])
        raise KeyError(f"{line_prefix} not on {url}")

    def health(self) -> int:
        with grpc.insecure_channel(self.address) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5).status


@dataclass(frozen=True)
class Artifacts:
    data: Path
    model: Path
    store: Path  # index store with CURRENT


def make_artifacts(workdir: Path) -> Artifacts:
    data, models, store = workdir / "data", workdir / "models", workdir / "indexes"
    if not (store / "CURRENT").exists():
        shutil.rmtree(workdir, ignore_errors=True)
        _run("generate", "--out", data, "--users", "300", "--items", "500",
             "--interactions-per-user", "15", "--seed", "3")
        _run("train", "--data", data, "--out", models, "--epochs", "3", "--no-eval")
        model = next(models.iterdir())
        _build_index(model, store, "HNSW32", data)
    return Artifacts(data, next(models.iterdir()), store)


def _run(*args) -> str:
    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"two-tower {args[0]} failed: {done.stderr[-2000:]}")
    return done.stdout.strip()


def _build_index(model: Path, store: Path, factory: str, data: Path) -> str:
    _run("build-index", "--model", model, "--out", store, "--index", factory, "--items", data,
         "--target-recall", "0.5")
    return (store / "CURRENT").read_text().strip()


def _serve_args(a: Artifacts, *extra: str) -> list[str]:
    return ["--model", str(a.model), "--index", str(a.store), *extra]


# --- scenarios -------------------------------------------------------------------------


def _server_on(redis: Redis, a: Artifacts, work: Path) -> Server:
    """A server reading user features from ``redis``, which load-features fills first."""
    _run("load-features", "--data", a.data, "--redis-url", redis.url)
    return Server(work / "server", _serve_args(
        a, "--redis-url", redis.url, "--redis-timeout-ms", str(REDIS_TIMEOUT_MS)))


def redis_down(a: Artifacts, work: Path, opts) -> Row:
    redis = Redis(work)
    row = Row("redis_down", f"kill redis-server for {opts.outage_seconds:g} s, restart it")
    try:
        server = _server_on(redis, a, work)
        with Load(server.address) as load:
            time.sleep(3)
            killed = time.monotonic()
            redis.kill()
            time.sleep(opts.outage_seconds)
            restarting = time.monotonic()  # replies from here on may be normal again
            redis.restart()
            back = time.monotonic()  # Redis answers PING
            time.sleep(3)
        samples = load.samples
        after = [s for s in samples if s.start >= back and not s.degraded and s.code == "OK"]
        recovery = (after[0].start - back) if after else float("inf")
        outage = between(samples, killed + 0.05, restarting)
        row.calls, row.errors = len(samples), errors_of(samples)
        row.p99_steady_ms = p99_ms(between(samples, 0, killed))
        row.p99_during_ms = p99_ms(outage)
        degraded = sum(s.degraded for s in outage)
        row.passed = not row.errors and degraded == len(outage) > 0 and recovery <= 1.0
        row.notes = (f"{degraded}/{len(outage)} outage replies degraded; normal again "
                     f"{recovery * 1000:.0f} ms after Redis returned")
        server.stop()
    finally:
        redis.kill()
    return row


def slow_redis(a: Artifacts, work: Path, opts) -> Row:
    redis = Redis(work)
    row = Row("slow_redis", "CLIENT PAUSE 3000 ALL (every Redis command waits 3 s)")
    try:
        server = _server_on(redis, a, work)
        with Load(server.address) as load:
            time.sleep(3)
            redis.command("CLIENT", "PAUSE", "3000", "ALL")
            paused = time.monotonic()  # after redis-cli returned: the pause is on
            time.sleep(5)
        samples = load.samples
        during = between(samples, paused, paused + 2.9)
        row.calls, row.errors = len(samples), errors_of(samples)
        row.p99_steady_ms = p99_ms(between(samples, 0, paused))
        row.p99_during_ms = p99_ms(during)
        budget = (row.p99_steady_ms or 0) + 3 * REDIS_TIMEOUT_MS
        row.passed = (not row.errors and bool(during) and all(s.degraded for s in during[20:])
                      and (row.p99_during_ms or 0) <= budget)
        row.notes = (f"budget p99 ≤ {budget:.0f} ms; {sum(s.degraded for s in during)}/"
                     f"{len(during)} degraded")
        server.stop()
    finally:
        redis.kill()
    return row


def overload(a: Artifacts, work: Path, opts) -> Row:
    row = Row("overload", "2 × 800 calls at once, server --max-batch 1 --max-queue 4")
    server = Server(work / "server", _serve_args(a, "--features", str(a.data),
                                                 "--max-batch", "1", "--max-queue", "4"))
    with Load(server.address, workers=2) as steady:
        time.sleep(2)

    async def burst(n: int) -> list[Sample]:
        load = Load(server.address)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            await asyncio.gather(*(load._call(stub, i) for i in range(n)))
        return load.samples

    during = asyncio.run(burst(800)) + asyncio.run(burst(800))
    with Load(server.address, workers=2) as after:
        time.sleep(2)
    codes = Counter(s.code for s in during)
    row.calls = len(during) + len(steady.samples) + len(after.samples)
    row.errors = errors_of(during + after.samples)
    row.p99_steady_ms, row.p99_during_ms = p99_ms(steady.samples), p99_ms(during)
    row.passed = (set(codes) == {"OK", "RESOURCE_EXHAUSTED"} and not errors_of(after.samples)
                  and (row.p99_during_ms or 1e9) < 3000)
    row.notes = (f"{codes['RESOURCE_EXHAUSTED']} shed, {codes['OK']} answered; afterwards "
                 f"p99 {p99_ms(after.samples)} ms, no error")
    server.stop()
    return row


def sigterm(a: Artifacts, work: Path, opts) -> Row:
    row = Row("sigterm", "SIGTERM with 40 calls in flight (1 s batching window)")
    server = Server(work / "server", _serve_args(a, "--features", str(a.data), "--max-batch",
                                                 "1000", "--max-wait-us", "1000000"))

    async def scenario():
        load = Load(server.address)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            await watch.read()
            calls = [asyncio.create_task(load._call(stub, i)) for i in range(40)]
            await asyncio.sleep(0.4)  # all accepted, waiting in the batch
            server.process.send_signal(signal.SIGTERM)
            status = (await watch.read()).status
            watch.cancel()
            await asyncio.gather(*calls)
        return load.samples, status

    samples, status = asyncio.run(scenario())
    code = server.process.wait(timeout=30)
    row.calls, row.errors, row.p99_during_ms = len(samples), errors_of(samples), p99_ms(samples)
    row.passed = (status == health_pb2.HealthCheckResponse.NOT_SERVING and not row.errors
                  and code == 0)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    row.notes = f"health {name} first; exit {code}"
    return row


def _corruptions(good: Path) -> dict[str, Callable[[Path], None]]:
    def truncate(d: Path) -> None:
        f = d / "index.faiss"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    def flip(d: Path) -> None:
        f = d / "item_ids.npy"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))

    def manifest(key: str, value) -> Callable[[Path], None]:
        def edit(d: Path) -> None:
            doc = json.loads((d / "manifest.json").read_text())
            doc[key] = value
            (d / "manifest.json").write_text(json.dumps(doc))
        return edit

    return {"truncated index file": truncate, "checksum mismatch": flip,
            "index of another model version": manifest("model_version", "m-another-model"),
            "index of another dimension": manifest("embedding_dim", 16)}


def bad_publish(a: Artifacts, work: Path, opts) -> Row:
    store = work / "indexes"
    shutil.copytree(a.store, store)
    good = (store / "CURRENT").read_text().strip()
    server = Server(work / "server", ["--model", str(a.model), "--index", str(store),
                                      "--features", str(a.data), "--watch-interval", "0.2"])
    row = Row("bad_publish", "made CURRENT in turn: " + ", ".join(_corruptions(store)))
    refused = []
    with Load(server.address) as load:
        time.sleep(1)
        for i, (name, corrupt) in enumerate(_corruptions(store).items()):
            bad = store / f"i-bad-{i}"
            shutil.copytree(store / good, bad)
            corrupt(bad)
            (store / "CURRENT").write_text(bad.name + "\n")
            time.sleep(1.0)
            refused.append(f"refused index {bad.name}" in server.log_path.read_text()
                           and server.health() == health_pb2.HealthCheckResponse.SERVING)
    samples = load.samples
    versions = {s.versions[1] for s in samples if s.code == "OK"}
    row.calls, row.errors, row.p99_during_ms = len(samples), errors_of(samples), p99_ms(samples)
    row.passed = all(refused) and not row.errors and versions == {good}
    row.notes = f"{sum(refused)}/4 refused with a log line, health SERVING; served {versions}"
    server.stop()
    return row


def hot_swap(a: Artifacts, work: Path, opts) -> Row:
    store = work / "indexes"
    shutil.copytree(a.store, store)
    first = (store / "CURRENT").read_text().strip()
    server = Server(work / "server", ["--model", str(a.model), "--index", str(store),
                                      "--features", str(a.data), "--watch-interval", "0.2"])
    # Built beforehand, as the nightly job does on its own machine (here, a build beside the
    # server takes one of the two cores and doubles p99), and its version directory put in
    # the store; under load, CURRENT is moved to it atomically, as indexer.publish does.
    second = _build_index(a.model, work / "staging", "Flat", a.data)
    shutil.copytree(work / "staging" / second, store / second)
    row = Row("hot_swap", "move CURRENT to a new (Flat) index version under load")
    with Load(server.address) as load:
        time.sleep(3)
        began = time.monotonic()
        (store / "CURRENT.tmp").write_text(second + "\n")
        os.replace(store / "CURRENT.tmp", store / "CURRENT")
        time.sleep(2)
        ended = time.monotonic()
    samples = load.samples
    versions = {s.versions for s in samples if s.code == "OK"}
    row.calls, row.errors = len(samples), errors_of(samples)
    row.p99_steady_ms = p99_ms(between(samples, 0, began))
    row.p99_during_ms = p99_ms(between(samples, began, ended))
    row.passed = (not row.errors and {v[1] for v in versions} == {first, second}
                  and len({v[0] for v in versions}) == 1
                  and (row.p99_during_ms or 1e9) <= 2 * (row.p99_steady_ms or 0))
    row.notes = f"served {first} then {second}, one model, no mixed reply"
    server.stop()
    return row


def watcher(a: Artifacts, work: Path, opts) -> Row:
    store = work / "indexes"
    shutil.copytree(a.store, store)
    first = (store / "CURRENT").read_text().strip()
    server = Server(work / "server", ["--model", str(a.model), "--index", str(store),
                                      "--features", str(a.data), "--metrics-port", "0",
                                      "--watch-interval", str(WATCH_INTERVAL_S)])
    second = _build_index(a.model, work / "staging", "Flat", a.data)  # built beforehand
    shutil.copytree(work / "staging" / second, store / second)
    errors = 'two_tower_version_watch_errors_total{reason="pointer"}'
    row = Row("watcher", "CURRENT made non-UTF-8 bytes for 3 s, then a valid version "
                         f"published (--watch-interval {WATCH_INTERVAL_S:g})")
    with Load(server.address) as load:
        time.sleep(2)
        counted = server.metric(errors)
        (store / "CURRENT").write_bytes(b"\xff\xfei-\x80\n")  # in place, as a bad editor would
        time.sleep(3)
        counted = server.metric(errors) - counted
        healthy = server.health() == health_pb2.HealthCheckResponse.SERVING
        (store / "CURRENT.tmp").write_text(second + "\n")
        os.replace(store / "CURRENT.tmp", store / "CURRENT")
        published = time.monotonic()
        time.sleep(2 * WATCH_INTERVAL_S + 1)
    samples = load.samples
    new = [s.start + s.latency_s for s in samples if s.code == "OK" and s.versions[1] == second]
    took = (min(new) - published) if new else float("inf")
    before = {s.versions[1] for s in between(samples, 0, published) if s.code == "OK"}
    logged = f"{store / 'CURRENT'}: is not UTF-8" in server.log_path.read_text()
    row.calls, row.errors, row.p99_during_ms = len(samples), errors_of(samples), p99_ms(samples)
    row.passed = (not row.errors and counted >= 2 and healthy and logged and before == {first}
                  and took <= 2 * WATCH_INTERVAL_S and server.process.poll() is None)
    row.notes = (f"{counted:.0f} failed checks counted, {'' if logged else 'NOT '}logged "
                 f"naming CURRENT, health "
                 f"{'SERVING' if healthy else 'not SERVING'}, {first} served meanwhile; "
                 f"{second} served {took:.2f} s after the publish")
    server.stop()
    return row


def soak(a: Artifacts, work: Path, opts) -> Row:
    server = Server(work / "server", _serve_args(a, "--features", str(a.data)))
    with Load(server.address, workers=8) as probe:
        time.sleep(3)
    capacity = len(probe.samples) / 3
    rate = capacity / 2
    row = Row("soak", f"{opts.soak_seconds:g} s open loop at half capacity ({rate:.0f} of "
                      f"{capacity:.0f} calls/s)")
    with Load(server.address, workers=64, rate=rate) as load:
        time.sleep(min(10.0, opts.soak_seconds / 10))
        rss_start = server.rss_kib()
        time.sleep(opts.soak_seconds - min(10.0, opts.soak_seconds / 10))
        rss_end = server.rss_kib()
    samples = load.samples
    growth = (rss_end - rss_start) / rss_start if rss_start else 0.0
    row.calls, row.errors = len(samples), errors_of(samples)
    row.p99_steady_ms = p99_ms(samples[: len(samples) // 10])
    row.p99_during_ms = p99_ms(samples)
    row.passed = not row.errors and growth <= 0.05 and bool(samples)
    row.notes = f"RSS {rss_start // 1024} → {rss_end // 1024} MiB ({growth:+.1%})"
    server.stop()
    return row


# --- report ----------------------------------------------------------------------------


def markdown(rows: list[Row]) -> str:
    lines = ["| scenario | what was done | calls | errors by code | p99 steady ms | "
             "p99 during ms | result | notes |", "|---|---|---:|---|---:|---:|---|---|"]
    for r in rows:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "none"
        lines.append(f"| {r.scenario} | {r.action} | {r.calls} | {errors} | "
                     f"{r.p99_steady_ms if r.p99_steady_ms is not None else '–'} | "
                     f"{r.p99_during_ms if r.p99_during_ms is not None else '–'} | "
                     f"{'pass' if r.passed else 'FAIL'} | {r.notes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("build/chaos"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--outage-seconds", type=float, default=10.0)
    p.add_argument("--soak-seconds", type=float, default=1800.0)
    opts = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    chosen = [s.strip() for s in opts.scenarios.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    artifacts = make_artifacts(opts.workdir / "artifacts")
    rows = []
    for name in chosen:
        work = opts.workdir / "runs" / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        log.info("scenario %s", name)
        try:
            rows.append(globals()[name](artifacts, work, opts))
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the rest
            log.exception("scenario %s crashed", name)
            rows.append(Row(name, "(crashed)", notes=f"{type(exc).__name__}: {exc}"))
        log.info("%s: %s", name, "pass" if rows[-1].passed else "FAIL")
    table = markdown(rows)
    print(table)
    opts.out.mkdir(parents=True, exist_ok=True)
    meta = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "argv": sys.argv[1:]}
    (opts.out / "chaos.json").write_text(json.dumps(
        {"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    (opts.out / "chaos.md").write_text(f"Chaos run {meta['when']} on {meta['machine']}: "
                                       f"`python -m benchmarks.chaos {' '.join(meta['argv'])}`"
                                       f"\n\n{table}\n")
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

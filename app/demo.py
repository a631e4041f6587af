"""The end-to-end demo: synthetic data → train → index → real server process → queries.

Each stage is the same code the CLI runs; the server is a separate ``two-tower serve``
process reached over loopback gRPC, stopped with SIGTERM at the end.
"""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from retrieval.client import Reply, build_request, format_reply, retrieve
from app.processes import wait_for_port_file

DAY_HOUR, NIGHT_HOUR = 10, 22
WEDNESDAY = 1_700_611_200  # 2023-11-22 00:00 UTC


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("demo-run")
    users: int = 2000
    items: int = 1000
    epochs: int = 5
    latency_calls: int = 200
    startup_timeout_s: float = 180.0


def run_demo(config: DemoConfig) -> int:
    from indexer.job import JobOptions, run_build_index
    from contracts.dataset import write_dataset
    from training.pipeline import run_training
    from training.synthetic import SyntheticConfig, generate_synthetic
    from training.train import TrainConfig

    shutil.rmtree(config.workdir, ignore_errors=True)
    data_dir = config.workdir / "data"
    _banner("1/4 generate synthetic data")
    dataset, spec_toml = generate_synthetic(SyntheticConfig(num_users=config.users,
                                                            num_items=config.items))
    write_dataset(dataset, data_dir, spec_toml)
    print(f"{dataset.num_interactions} interactions, {config.users} users, {config.items} items "
          f"→ {data_dir}")
    _banner("2/4 train the two towers")
    model_dir, summary = run_training(dataset, config.workdir / "models",
                                      TrainConfig(epochs=config.epochs))
    _print_recall(summary["evaluation"])
    _banner("3/4 build, gate and publish the index")
    index_dir = run_build_index(model_dir, config.workdir / "indexes",
                                options=JobOptions(items=data_dir, data=data_dir))
    manifest = json.loads((index_dir / "manifest.json").read_text())
    measured = manifest["measured"]
    print(f"model {model_dir.name}\nindex {index_dir.name}: {manifest['factory']} "
          f"{dict(manifest['search'])}, recall@{measured.get('k', 100)} against exact search "
          f"{measured.get('recall@100', float('nan')):.3f} on {measured.get('query_source', '')} "
          f"queries")
    _banner("4/4 serve and query over gRPC")
    categories = dict(zip(dataset.items["item_id"], dataset.items["category"], strict=True))
    return _serve_and_query(config, model_dir, index_dir, data_dir, categories)


def _serve_and_query(config, model_dir, index_dir, data_dir, categories) -> int:
    port_file = config.workdir / "server.port"
    command = [sys.executable, "-m", "app.cli", "serve", "--model", str(model_dir),
               "--index", str(index_dir), "--features", str(data_dir), "--port", "0",
               "--port-file", str(port_file)]
    server = subprocess.Popen(command, stderr=open(config.workdir / "server.log", "w"))
    try:
        port = wait_for_port_file(server, port_file, config.workdir / "server.log",
                                  config.startup_timeout_s)[0]
        print(f"server pid {server.pid} SERVING on 127.0.0.1:{port} "
              f"(log: {config.workdir / 'server.log'})")
        asyncio.run(_queries(f"127.0.0.1:{port}", categories, config.latency_calls))
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
        print(f"server stopped (exit code {code})")
    return 0


async def _queries(address: str, categories: dict, latency_calls: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        calls = [
            ("user u7, daytime on mobile", "u7", {"hour_of_day": DAY_HOUR, "device": "mobile"}, ()),
            ("user u7, night on tv", "u7", {"hour_of_day": NIGHT_HOUR, "device": "tv"}, ()),
            ("user u7, night, top 3 of the line above excluded", "u7",
             {"hour_of_day": NIGHT_HOUR, "device": "tv"}, None),
            ("unknown user (cold start), night on tv", "new-user-42",
             {"hour_of_day": NIGHT_HOUR, "device": "tv"}, ()),
        ]
        previous: Reply | None = None
        for title, user, context, exclude in calls:
            if exclude is None:
                exclude = [c.item_id for c in previous.response.candidates[:3]]
            reply = await retrieve(channel, build_request(user, 10, context, WEDNESDAY, (),
                                                          exclude, f"demo-{user}"))
            print(f"\n{title}  (context {context}, excluded {list(exclude)})")
            print(format_reply(reply))
            print("categories of the candidates:", _category_counts(reply, categories))
            previous = reply
        await _latency(channel, latency_calls)


def _category_counts(reply: Reply, categories: dict) -> str:
    counts = collections.Counter(categories[c.item_id] for c in reply.response.candidates)
    return ", ".join(f"{cat}×{n}" for cat, n in counts.most_common())


async def _latency(channel, calls: int) -> None:
    rng = np.random.default_rng(0)
    latencies = []
    for i in range(calls):
        context = {"hour_of_day": int(rng.integers(0, 24)), "device": "mobile"}
        reply = await retrieve(channel, build_request(f"u{i}", 100, context, WEDNESDAY))
        latencies.append(reply.latency_ms)
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    print(f"\nper-call latency over {calls} sequential Retrieve calls (k=100, loopback, "
          f"client-measured): p50 {p50:.2f} ms, p90 {p90:.2f} ms, p99 {p99:.2f} ms")


def _print_recall(evaluation: dict) -> None:
    print(f"held-out test: {evaluation['protocol']}; {evaluation['test_users']} users")
    columns = [f"{m}@{k}" for m in ("recall", "ndcg") for k in (10, 50, 100)]
    print(f"{'':>12} " + " ".join(f"{c:>10}" for c in columns))
    for name in ("model", "popularity"):
        print(f"{name:>12} " + " ".join(f"{evaluation[name][c]:>10.4f}" for c in columns))


def _banner(text: str) -> None:
    print(f"\n== {text} ==", flush=True)


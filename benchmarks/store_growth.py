"""What new users cost the in-process feature store: server RSS per 100,000 new users
recorded with RecordInteractions, below and past ``--store-max-users``.

    python -m benchmarks.store_growth [--model M --index I --features D] [--workdir W]
        [--users 300000] [--cap 100000] [--out benchmarks/results]

Each new user gets one interaction (1,000 a call). The server runs twice: with the default
cap (every user kept) and with ``--cap``; the table gives RSS after each 100,000 users and
the store's size and evictions from /metrics. Writes store_growth.json and .md to --out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import grpc

from benchmarks.stream_abuse import ensure_pipeline, rss_mb, start
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as pb_grpc

STEP = 100_000


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def grow(args, serve_args: list[str]) -> list[dict]:
    process, address, _ = start(args.model, args.index, args.features, args.workdir,
                                ["--metrics-port", "0", *serve_args])
    metrics_port = int((args.workdir / "port").read_text().split()[1])
    rows = [{"users": 0, "rss_mb": round(rss_mb(process.pid), 1)}]
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            for start_at in range(0, args.users, 1000):
                stub.RecordInteractions(pb.RecordInteractionsRequest(interactions=[
                    pb.Interaction(user_id=f"new-{u}", item_id=f"item-{u % 997}")
                    for u in range(start_at, start_at + 1000)]), timeout=30)
                if (start_at + 1000) % STEP == 0:
                    rows.append({
                        "users": start_at + 1000, "rss_mb": round(rss_mb(process.pid), 1),
                        "store_users": _metric(metrics_port, "two_tower_feature_store_users"),
                        "evictions": _metric(metrics_port, 'two_tower_feature_store_evictions_'
                                                           'total{reason="lru"}')})
    finally:
        process.terminate()
        process.wait(timeout=30)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--index", type=Path)
    p.add_argument("--features", type=Path)
    p.add_argument("--workdir", type=Path, default=Path("artifacts/stream_abuse"))
    p.add_argument("--users", type=int, default=300_000)
    p.add_argument("--cap", type=int, default=100_000)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        args.model, args.index, args.features = ensure_pipeline(args.workdir)
    runs = {"default cap (500,000)": grow(args, []),
            f"--store-max-users {args.cap}": grow(args, ["--store-max-users", str(args.cap)])}
    lines = ["| run | new users | RSS (MB) | +MB per 100k since last | store users | "
             "LRU evictions |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, rows in runs.items():
        for before, row in zip(rows, rows[1:]):
            lines.append(f"| {name} | {row['users']:,} | {row['rss_mb']} | "
                         f"{row['rss_mb'] - before['rss_mb']:+.1f} | "
                         f"{int(row['store_users']):,} | {int(row['evictions']):,} |")
    table = "\n".join(lines)
    print(table)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "store_growth.json").write_text(json.dumps({"measured_at": stamp,
                                                            "runs": runs}, indent=2))
    command = " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "store_growth.md").write_text(
        f"Measured {stamp} with `python -m benchmarks.store_growth {command}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

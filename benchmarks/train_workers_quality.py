"""Held-out quality and wall time of one training worker against two, at the same global
batch, epochs and seed, trained from the same prepared shards.

    python -m benchmarks.train_workers_quality [--users 4000] [--items 3000]
        [--interactions-per-user 40] [--epochs 3] [--batch-size 512] [--seed 0]
        [--prepared P | --in-memory]

Generates a synthetic set (`two-tower generate`), prepares it once (`two-tower prepare`),
then runs `two-tower train --prepared P` twice: one process without TF_CONFIG, and two
processes on loopback ports with TF_CONFIG (MultiWorkerMirroredStrategy; the chief's artifact
is read). Both evaluate every test user against every item (the temporal hold-out).
``--prepared P`` reuses a prepared set instead of generating one; ``--in-memory`` trains
both sides with `--data D --in-memory` (no Spark: each worker reads the whole set and keeps
its share of every batch), the same batch semantics.

Under TF_CONFIG `--batch-size` is the global batch: each of W workers steps on batch / W rows
of its own shards, and the in-batch softmax (tfrs.tasks.Retrieval) takes each row's
negatives from its worker's rows only: batch / W - 1 of them instead of batch - 1. This is
what the comparison measures. Prints a table; writes benchmarks/results/
train_workers_quality.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
METRICS = ("recall@10", "recall@100", "ndcg@10")


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def _wait(*processes: subprocess.Popen) -> list[str]:
    logs = [p.communicate()[0] for p in processes]
    for p, log in zip(processes, logs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(p.args[2:])} failed:\n{log[-3000:]}")
    return logs


def _timed(*processes: subprocess.Popen) -> tuple[list[str], float]:
    start = time.perf_counter()
    logs = _wait(*processes)
    return logs, round(time.perf_counter() - start, 1)


def _train_args(args, source: Path, out: Path) -> list[str]:
    given = ["--data", str(source), "--in-memory"] if args.in_memory else ["--prepared",
                                                                            str(source)]
    return ["train", *given, "--out", str(out), "--epochs",
            str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
            "--eval-users", str(10**9), "--no-final-fit"]  # the evaluated model is compared


def _result(out: Path, seconds: float, workers: int, batch_size: int) -> dict:
    [version] = [p for p in out.iterdir() if p.name.startswith("m-")]
    summary = json.loads((version / "manifest.json").read_text())["training"]
    model = summary["evaluation"]["model"]
    return {"workers": workers, "per_worker_batch": batch_size // workers,
            "negatives_per_row": batch_size // workers - 1, "wall_seconds": seconds,
            "train_seconds": summary["seconds"], "test_users": summary["evaluation"]["test_users"],
            **{m: model[m] for m in METRICS},
            "popularity_recall@10": summary["evaluation"]["popularity"]["recall@10"]}


def _one_worker(args, prepared: Path, tmp: Path) -> dict:
    started = time.perf_counter()
    _wait(_cli(*_train_args(args, prepared, tmp / "one")))
    return _result(tmp / "one", round(time.perf_counter() - started, 1), 1, args.batch_size)


def _two_workers(args, prepared: Path, tmp: Path) -> dict:
    from app.processes import free_port

    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(2)]}
    started = time.perf_counter()
    workers = [_cli(*_train_args(args, prepared, tmp / f"two-{i}"), env={"TF_CONFIG": json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": i}})}) for i in range(2)]
    _wait(*workers)
    return _result(tmp / "two-0", round(time.perf_counter() - started, 1), 2, args.batch_size)


def _source(args, tmp: Path) -> tuple[Path, float | None]:
    """What both sides train from (generated, then prepared unless in memory), and the
    preparation's seconds."""
    if args.prepared is not None:
        return args.prepared, None
    _wait(_cli("generate", "--out", str(tmp / "data"), "--users", str(args.users), "--items",
               str(args.items), "--interactions-per-user", str(args.interactions_per_user),
               "--seed", str(args.seed)))
    if args.in_memory:
        return tmp / "data", None
    _, seconds = _timed(_cli("prepare", "--data", str(tmp / "data"), "--out",
                             str(tmp / "prepared"), "--rows-per-shard", "25000"))
    return tmp / "prepared", seconds


def _table(runs: list[dict]) -> str:
    lines = [(f"{'workers':>7} {'batch/worker':>12} {'recall@10':>10} {'recall@100':>11} "
              f"{'ndcg@10':>8} {'wall s':>7}")]
    for r in runs:
        lines.append(f"{r['workers']:>7} {r['per_worker_batch']:>12} {r['recall@10']:>10.4f} "
                     f"{r['recall@100']:>11.4f} {r['ndcg@10']:>8.4f} {r['wall_seconds']:>7.1f}")
    return "\n".join(lines)


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (quality, wall) = plt.subplots(1, 2, figsize=(9, 3.5))
    width = 0.35
    for i, r in enumerate(runs):
        xs = [j + (i - 0.5) * width for j in range(len(METRICS))]
        quality.bar(xs, [r[m] for m in METRICS], width, label=f"{r['workers']} worker(s)")
    quality.set_xticks(range(len(METRICS)), METRICS)
    quality.set(title="held-out test, same global batch", ylabel="value")
    quality.legend(fontsize=8)
    wall.bar([str(r["workers"]) for r in runs], [r["wall_seconds"] for r in runs])
    wall.set(title="wall time (train + evaluation)", xlabel="workers", ylabel="seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=4000)
    p.add_argument("--items", type=int, default=3000)
    p.add_argument("--interactions-per-user", type=int, default=40)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=512, help="global batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prepared", type=Path, help="a prepared set to train from (no generate)")
    p.add_argument("--in-memory", action="store_true", help="train in memory, no preparation")
    p.add_argument("--out", type=Path, default=RESULTS / "train_workers_quality.json")
    args = p.parse_args(argv)
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="workers-quality-") as scratch:
        tmp = Path(scratch)
        source, prepare_seconds = _source(args, tmp)
        runs = [_one_worker(args, source, tmp), _two_workers(args, source, tmp)]
    print(_table(runs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python -m benchmarks.train_workers_quality " + " ".join(argv or sys.argv[1:]),
        "data": {"users": args.users, "items": args.items,
                 "interactions": args.users * args.interactions_per_user},
        "path": "in memory" if args.in_memory else "streamed from prepared shards",
        "epochs": args.epochs, "global_batch": args.batch_size, "seed": args.seed,
        "prepare_seconds": prepare_seconds, "cpus": os.cpu_count(),
        "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
        "runs": runs, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    _plot(runs, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

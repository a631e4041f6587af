"""Training throughput and memory: one epoch streamed from prepared shards, and (with
--in-memory-data) the in-memory path on the same data, same model and batch size, in the
same run.

    python -m benchmarks.train_scale --prepared P [--in-memory-data D] [--batch-size 1024]

Each path runs in its own child process, so each peak RSS (VmHWM from /proc/self/status,
read by the child at its end) is that path's alone. Both train on every interaction (as
``two-tower train --no-eval``: the streamed path reads the train, valid and test shards).
Prints a table (examples/s of the epoch, the whole run's wall time, peak RSS) and writes
benchmarks/results/train_scale.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    runs = [_spawn(args, "shards")]
    if args.in_memory_data:
        runs.append(_spawn(args, "in-memory"))
    _print_table(runs)
    if len(runs) == 2:
        ratio = runs[0]["examples_per_s"] / runs[1]["examples_per_s"]
        print(f"streamed / in-memory examples/s: {ratio:.2f}")
    record = {"command": "python -m benchmarks.train_scale " + " ".join(argv or sys.argv[1:]),
              "batch_size": args.batch_size, "optimizer": args.optimizer, "epochs": 1,
              "cpus": os.cpu_count(),
              "load_average_at_start": os.getloadavg(), "python": platform.python_version(),
              "runs": runs, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"written {args.out}")
    return 0


def _spawn(args, path: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.train_scale", "--child", path,
               "--batch-size", str(args.batch_size), "--seed", str(args.seed),
               "--optimizer", args.optimizer,
               "--prepared", str(args.prepared)]
    if path == "in-memory":
        command += ["--in-memory-data", str(args.in_memory_data)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{path} run failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "process_wall_s": round(time.perf_counter() - start, 1)}


def _child(args) -> dict:
    from training.train import TrainConfig

    epoch = _EpochRate()
    logging.getLogger("training.train").addHandler(epoch)
    logging.getLogger("training.train").setLevel(logging.INFO)
    config = TrainConfig(epochs=1, batch_size=args.batch_size, seed=args.seed,
                         optimizer=args.optimizer)
    start = time.perf_counter()
    if args.child == "shards":
        from contracts.prepared import SPLITS, load_prepared
        from training.train_shards import load_catalogue, train_from_shards

        manifest = load_prepared(args.prepared)
        train_from_shards(manifest, load_catalogue(manifest), config, splits=SPLITS)
        source = str(args.prepared)
    else:
        from contracts.dataset import load_dataset
        from training.train import train

        train(load_dataset(args.in_memory_data), config)
        source = str(args.in_memory_data)
    wall = time.perf_counter() - start
    return {"path": args.child, "source": source, "examples": epoch.examples,
            "epoch_s": round(epoch.seconds, 1),
            "examples_per_s": round(epoch.examples / epoch.seconds),
            "wall_s": round(wall, 1), "peak_rss_mib": _vm_hwm_mib()}


class _EpochRate(logging.Handler):
    """Catches training.train's end-of-epoch line: its seconds and examples."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds, self.examples = float("nan"), 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("epoch %d/%d  loss"):
            self.seconds = float(record.args[3])
            self.examples = int(round(record.args[4] * self.seconds))


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _print_table(runs: list[dict]) -> None:
    print(f"{'path':<10} {'examples':>10} {'examples/s':>11} {'epoch s':>8} {'wall s':>8} "
          f"{'peak RSS MiB':>13}")
    for r in runs:
        print(f"{r['path']:<10} {r['examples']:>10} {r['examples_per_s']:>11} "
              f"{r['epoch_s']:>8} {r['wall_s']:>8} {r['peak_rss_mib']:>13}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepared", type=Path, required=True, help="prepared examples")
    p.add_argument("--in-memory-data", type=Path,
                   help="the dataset the shards were prepared from: also train in memory")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", choices=("auto", "adam", "lazy-adam"), default="adam")
    p.add_argument("--out", type=Path, default=RESULTS / "train_scale.json",
                   help="where the JSON record goes")
    p.add_argument("--child", choices=("shards", "in-memory"), help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    sys.exit(main())

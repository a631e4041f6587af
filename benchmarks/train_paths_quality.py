"""Held-out quality of the two training paths on the same data, seed and hold-out: the
in-memory path (`two-tower train --data D --in-memory`) and the path streamed from prepared
shards (`two-tower train --prepared P`, every test user evaluated).

    python -m benchmarks.train_paths_quality --data D --prepared P [--epochs 1] [--batch-size 1024]

Both are the same model, loss, batch size and seed; both hold out each user's last event
for test and the second-last for validation (the temporal protocol) and rank every item.
What differs is the order examples arrive in (NumPy's shuffle against the shards' seeded
order and tf.data's bounded shuffle). Prints recall@10/@100 and NDCG@10 of each and their
differences; writes benchmarks/results/train_paths_quality.json.
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


def _train(args, extra: list[str], out: Path) -> dict:
    command = [sys.executable, "-m", "app.cli", "train", "--out", str(out), "--epochs",
               str(args.epochs), "--batch-size", str(args.batch_size), "--seed",
               str(args.seed), "--no-final-fit", *extra]  # the evaluated model is compared
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    [version] = [p for p in out.iterdir() if p.name.startswith("m-")]
    summary = json.loads((version / "manifest.json").read_text())["training"]
    model = summary["evaluation"]["model"]
    return {"command": " ".join(command[2:]), "seconds": round(time.perf_counter() - start, 1),
            "test_users": summary["evaluation"]["test_users"],
            "recall@10": model["recall@10"], "recall@100": model["recall@100"],
            "ndcg@10": model["ndcg@10"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--prepared", type=Path, required=True, help="prepared from --data")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "train_paths_quality.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "in-memory": _train(args, ["--data", str(args.data), "--in-memory"],
                                Path(tmp) / "in-memory"),
            "streamed": _train(args, ["--prepared", str(args.prepared), "--eval-users",
                                      str(10**9)], Path(tmp) / "streamed"),
        }
    print(f"{'path':<10} {'test users':>10} {'recall@10':>10} {'recall@100':>11} "
          f"{'ndcg@10':>8} {'seconds':>8}")
    for name, r in runs.items():
        print(f"{name:<10} {r['test_users']:>10,} {r['recall@10']:>10.4f} "
              f"{r['recall@100']:>11.4f} {r['ndcg@10']:>8.4f} {r['seconds']:>8.1f}")
    diff = {k: runs["streamed"][k] - runs["in-memory"][k]
            for k in ("recall@10", "recall@100", "ndcg@10")}
    print("streamed - in-memory: " + ", ".join(f"{k} {v:+.4f}" for k, v in diff.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python -m benchmarks.train_paths_quality " + " ".join(argv or sys.argv[1:]),
        "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "runs": runs,
        "difference": diff, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

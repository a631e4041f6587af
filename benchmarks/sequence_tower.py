"""What a sequence feature costs a request: the NumPy user tower per user, at batch sizes
1 and 32, with the last 50 items read by self-attention against the same 50 items
mean-pooled, in the same run.

    .venv/bin/python -m benchmarks.sequence_tower [--length 50] [--dim 64] [--items 10000]
                                                  [--repeats 300]

The towers are built untrained (training.model.Towers; weights do not change the cost)
from one spec per variant: a user id, the history feature (kind history: the mean bag;
kind sequence with 1 or 2 blocks of 2 heads), the item id at width --dim, a 256-wide
hidden layer and a --dim output (benchmarks.quality's ml-100k model), exported with
training.numpy_export and loaded as retrieval.numpy_tower serves it. Every request has a
full history of --length items with known ages. Timed per call (median of --repeats, the
cases taking turns in 10 rounds), inputs built beforehand: "tower" is NumpyUserTower(inputs)
alone, "inputs + tower" adds contracts.inputs.user_inputs from the requests, what the
server does per batch; "fastest call" is the quickest of those calls, the cost with the
least interference on a shared machine.

OpenBLAS threads: as the environment says (the server sets none). On the shared 2 cores
under load, OpenBLAS's default two threads made some [32, ·] matmuls wait about a scheduler
slice (16 ms a call, for the mean bag too); OPENBLAS_NUM_THREADS=1 gives the tower's own cost.

Writes benchmarks/results/sequence_tower.json and sequence_tower.png; prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from contracts.feature_spec import parse_feature_spec
from contracts.inputs import UserRequest, user_inputs

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
BATCHES = (1, 32)
ROUNDS = 10
NOW = 1_700_000_000


def variants(length: int) -> dict[str, dict]:
    history = {"tower": "user", "max_length": length}
    return {"mean bag": {**history, "kind": "history"},
            "sequence, 1 block": {**history, "kind": "sequence", "blocks": 1, "heads": 2},
            "sequence, 2 blocks": {**history, "kind": "sequence", "blocks": 2, "heads": 2}}


def build_tower(feature: dict, dim: int, n_items: int, n_users: int, workdir: Path):
    """An untrained user tower for the spec, exported and loaded as served."""
    from retrieval.numpy_tower import NumpyUserTower, _read
    from training.model import FeatureStats, TowerConfig, Towers
    from training.numpy_export import export_numpy_user_tower

    spec = parse_feature_spec({"features": {
        "user_id": {"tower": "user", "kind": "categorical", "embedding_dim": dim},
        "recent": feature,
        "item_id": {"tower": "item", "kind": "categorical", "embedding_dim": dim}}})
    stats = FeatureStats({"user_id": tuple(f"u{u}" for u in range(n_users)),
                          "item_id": tuple(f"i{i}" for i in range(n_items))}, {}, {})
    towers = Towers(spec, stats, TowerConfig(embedding_dim=dim, hidden_dims=(256,)))
    user_tower = towers.user_tower()
    export_numpy_user_tower(user_tower, spec, stats, workdir)
    graph, arrays = _read(workdir)
    return spec, NumpyUserTower(graph, arrays)


def requests(n: int, length: int, n_items: int, n_users: int, seed: int) -> list[UserRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        items = tuple(f"i{i}" for i in rng.integers(0, n_items, length))
        ages = np.sort(rng.integers(60, 90 * 86400, length))
        out.append(UserRequest(f"u{rng.integers(0, n_users)}", {}, items, {}, NOW,
                               tuple(int(NOW - a) for a in ages)))
    return out


def time_calls(fn, n: int) -> list[float]:
    """Seconds of each of ``n`` calls."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def measure(args) -> dict:
    """Every (variant, batch) timed in turns, ``rounds`` times ``repeats / rounds`` calls,
    so that all meet the same load from the rest of the machine; medians of all calls."""
    cases = []
    for name, feature in variants(args.length).items():
        with tempfile.TemporaryDirectory() as tmp:
            spec, tower = build_tower(feature, args.dim, args.items, args.users, Path(tmp))
        for batch in BATCHES:
            reqs = requests(batch, args.length, args.items, args.users, seed=batch)
            inputs = user_inputs(spec, reqs)
            cases.append({"variant": name, "batch": batch, "tower": lambda t=tower, x=inputs: t(x),
                          "both": lambda t=tower, s=spec, r=reqs: t(user_inputs(s, r)),
                          "tower_s": [], "both_s": []})
    per_round = max(1, args.repeats // ROUNDS)
    for case in cases:  # warm-up
        time_calls(case["both"], 5)
    for _ in range(ROUNDS):
        for case in cases:
            case["tower_s"] += time_calls(case["tower"], per_round)
            case["both_s"] += time_calls(case["both"], per_round)
    rows = [{"variant": c["variant"], "batch": c["batch"],
             "tower_us_per_user": 1e6 * statistics.median(c["tower_s"]) / c["batch"],
             "inputs_and_tower_us_per_user": 1e6 * statistics.median(c["both_s"]) / c["batch"],
             "tower_us_per_call": 1e6 * statistics.median(c["tower_s"]),
             # the fastest call: the cost with the least interference from other processes
             "inputs_and_tower_min_us_per_user": 1e6 * min(c["both_s"]) / c["batch"]}
            for c in cases]
    return {"length": args.length, "dim": args.dim, "items": args.items, "users": args.users,
            "repeats": per_round * ROUNDS, "rows": rows}


def format_table(result: dict) -> str:
    lines = [(f"NumPy user tower, history of {result['length']} items, d = {result['dim']}, "
              f"{result['items']} items; median µs per user"),
             (f"{'variant':<22}{'batch':>6}{'tower':>10}{'inputs+tower':>14}{'× bag':>8}"
             f"{'fastest call':>14}{'× bag':>8}")]
    bag = {r["batch"]: r for r in result["rows"] if r["variant"] == "mean bag"}
    for r in result["rows"]:
        ratio = r["inputs_and_tower_us_per_user"] / bag[r["batch"]]["inputs_and_tower_us_per_user"]
        fastest = r["inputs_and_tower_min_us_per_user"]
        fastest_ratio = fastest / bag[r["batch"]]["inputs_and_tower_min_us_per_user"]
        lines.append(f"{r['variant']:<22}{r['batch']:>6}{r['tower_us_per_user']:>10.1f}"
                     f"{r['inputs_and_tower_us_per_user']:>14.1f}{ratio:>8.2f}"
                     f"{fastest:>14.1f}{fastest_ratio:>8.2f}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["variant"] for r in result["rows"]))
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for j, batch in enumerate(BATCHES):
        values = [next(r["inputs_and_tower_us_per_user"] for r in result["rows"]
                       if r["variant"] == n and r["batch"] == batch) for n in names]
        ax.bar(np.arange(len(names)) + 0.4 * j, values, 0.4, label=f"batch {batch}")
    ax.set_xticks(np.arange(len(names)) + 0.2, names)
    ax.set(ylabel="µs per user (inputs + tower)",
           title=f"history of {result['length']} items, d = {result['dim']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    result = measure(args)
    result.update(load_average_start=load_start, load_average_end=os.getloadavg(),
                  openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS", "default"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sequence_tower.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / "sequence_tower.png")
    print(format_table(result))
    print(f"load average {load_start} → {result['load_average_end']}")


if __name__ == "__main__":
    main()

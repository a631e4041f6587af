"""Does the final fit on every event help? Measured on an event neither model has seen.

    python -m benchmarks.final_fit [--seeds 0 1 2] [--users 2000] [--items 1000]

With the final fit the exported model has trained on the held-out events, so its own
held-out figures say nothing (they are the train-split model's, the figures it was chosen
on). The fair check moves the split one step earlier: on the demo data (`two-tower
generate`'s defaults), each user's last event is put aside as the *future*; `train` runs on
the rest as it would (the last two of those held out, early stopping on the second-last,
at most 30 epochs, patience 2), giving the **train-split** model (trained on all but the
last 3 events of each user); the **final fit** trains again on all but the last event for
the epochs kept. Both are scored on the future event: every item ranked, the user's
earlier items masked, history and context from before the event (training.protocols'
test stage). Popularity (item counts over all but the last two events) is the floor.

Prints a table per seed and the mean; writes benchmarks/results/final_fit.json and
final_fit.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
METRICS = ("recall@10", "ndcg@10", "recall@100")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds (the data is the demo's, seed 0)")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "final_fit.json")
    args = p.parse_args(argv)
    from app.quiet import quiet_start

    quiet_start()
    from training.synthetic import SyntheticConfig, generate_synthetic

    full, _ = generate_synthetic(SyntheticConfig(num_users=args.users, num_items=args.items))
    load_start = os.getloadavg()
    runs = [run_seed(full, seed, args.max_epochs, args.patience) for seed in args.seeds]
    report = {"data": {"users": args.users, "items": args.items,
                       "interactions": full.num_interactions},
              "max_epochs": args.max_epochs, "patience": args.patience, "runs": runs,
              "mean": _mean(runs), "cpus": os.cpu_count(),
              "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    _print(report)
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def run_seed(full, seed: int, max_epochs: int, patience: int) -> dict:
    """Train-split model and final fit on ``full`` minus each user's last event; both (and
    popularity) scored on that last event."""
    from contracts.inputs import training_examples
    from training.pipeline import _final_fit, _validator, stage_metrics
    from training.protocols import popularity_ranking, temporal_leave_one_out
    from training.train import TrainConfig, train

    future = temporal_leave_one_out(full)  # its test stage: the event put aside
    past = _without(full, future.test)
    split = temporal_leave_one_out(past)
    examples = training_examples(past)
    config = TrainConfig(epochs=max_epochs, early_stopping_patience=patience, seed=seed)
    start = time.perf_counter()
    chosen = train(past, config, {k: v[split.train] for k, v in examples.items()},
                   _validator(examples, split))
    chosen_seconds = time.perf_counter() - start
    chosen_on = stage_metrics(chosen, examples, split, "test").as_dict()
    summary: dict = {}
    final = _final_fit(chosen, summary, len(split.users), lambda again: train(past, again,
                                                                               examples))
    full_examples = training_examples(full)
    scored = {name: stage_metrics(model, full_examples, future, "test").as_dict()
              for name, model in (("train_split", chosen), ("final_fit", final))}
    scored["popularity"] = popularity_ranking(future, "test").as_dict()
    return {"seed": seed, "epochs_trained": len(chosen.history["loss"]),
            "epochs_kept": chosen.kept_epoch,
            "valid_ndcg@10": chosen.history["val_ndcg@10"][chosen.kept_epoch - 1],
            "chosen_on_test": _pick(chosen_on), "next_event": {k: _pick(v) for k, v in
                                                               scored.items()},
            "seconds": {"train_split": round(chosen_seconds, 1),
                        "final_fit": summary["final_fit"]["seconds"]}}


def _without(dataset, rows: np.ndarray):
    keep = np.ones(dataset.num_interactions, dtype=bool)
    keep[rows] = False
    return dataclasses.replace(dataset, interactions={k: v[keep] for k, v in
                                                      dataset.interactions.items()})


def _pick(metrics: dict) -> dict:
    return {m: float(metrics[m]) for m in METRICS}


def _mean(runs: list[dict]) -> dict:
    names = runs[0]["next_event"].keys()
    return {name: {m: float(np.mean([r["next_event"][name][m] for r in runs]))
                   for m in METRICS} for name in names}


def _print(report: dict) -> None:
    print(f"next event of each of {report['data']['users']} users, every item ranked "
          f"(load average {report['load_average_at_start'][0]:.1f} → "
          f"{report['load_average_at_end'][0]:.1f} on {report['cpus']} CPUs)")
    print(f"{'seed':>4} {'kept':>8} {'model':<12}" + "".join(f"{m:>12}" for m in METRICS))
    for r in report["runs"]:
        kept = f"{r['epochs_kept']}/{r['epochs_trained']}"
        for name, values in r["next_event"].items():
            print(f"{r['seed']:>4} {kept:>8} {name:<12}" +
                  "".join(f"{values[m]:>12.4f}" for m in METRICS))
    for name, values in report["mean"].items():
        print(f"{'mean':>4} {'':>8} {name:<12}" + "".join(f"{values[m]:>12.4f}"
                                                         for m in METRICS))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("popularity", "train_split", "final_fit")
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
    for ax, metric in zip(axes, METRICS, strict=True):
        for i, name in enumerate(names):
            values = [r["next_event"][name][metric] for r in report["runs"]]
            ax.bar(i, np.mean(values), color=f"C{i}", alpha=0.7)
            ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(metric)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("the next (unseen) event: train-split model vs final fit (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

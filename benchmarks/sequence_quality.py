"""The sequence-aware user tower against the mean-pooled history, seeds side by side.

    python -m benchmarks.sequence_quality [--protocols synthetic-ordered,ml100k-temporal]
                                          [--seeds 0,1,2] [--tune]

Both protocols are temporal leave-one-out (training.protocols.temporal_leave_one_out):
ml-100k, and a synthetic set whose users have order (training.synthetic with
``order_strength``: most events follow the cluster of the user's previous item). On each,
"ours" (benchmarks.quality's model, the history a mean bag) and "ours sequence" (the same
with the history read by training.sequence: order and ages) are trained with the same
budget and early stopping on validation NDCG@10, for each seed; test HR@10 (hit@10) and
NDCG@10 are reported as mean ± std over the seeds, with the ratio of the means.

``--tune`` trains only seed 0 of a small grid of sequence settings on ml-100k and prints
their validation NDCG@10 (test untouched): what benchmarks.quality.sequence_config and
SEQUENCE_FEATURE were chosen from.

Writes benchmarks/results/sequence_quality.json (or sequence_tuning.json) and
sequence_quality.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tomllib
from pathlib import Path

import numpy as np

from benchmarks.quality import (
    DEFAULT_DATA,
    HISTORY,
    RESULTS,
    SEQUENCE,
    SEQUENCE_FEATURE,
    Protocol,
    Variant,
    ml100k_temporal,
    ours_config,
    run_variant,
    sequence_config,
    sequence_features,
    temporal_protocol,
)
from contracts.dataset import Dataset
from contracts.feature_spec import parse_feature_spec
from training.protocols import temporal_leave_one_out

log = logging.getLogger("benchmarks.sequence_quality")
SYNTHETIC = {"num_users": 2000, "num_items": 1000, "num_clusters": 20, "interactions_per_user": 30,
             "order_strength": 0.7}
SYNTHETIC_FEATURES = ("user_id", "age", "country", HISTORY, "hour_of_day", "day_of_week",
                      "device", "item_id", "category", "tags")


def synthetic_ordered(data: Path) -> Protocol:
    """training.synthetic with order (SYNTHETIC), temporal leave-one-out; ``data`` unused."""
    from training.synthetic import SyntheticConfig, generate_synthetic

    raw, spec_toml = generate_synthetic(SyntheticConfig(**SYNTHETIC))
    spec_doc = tomllib.loads(spec_toml)
    spec_doc["features"][HISTORY] = spec_doc["features"].pop("recent_items")
    spec_doc["features"][HISTORY]["max_length"] = 20
    spec_doc["features"][SEQUENCE] = {**SEQUENCE_FEATURE, "max_length": 20}
    raw = Dataset(parse_feature_spec(spec_doc), raw.interactions, raw.users, raw.items)
    return _temporal("synthetic-ordered", raw, spec_doc)


def _temporal(name: str, raw: Dataset, spec_doc: dict) -> Protocol:
    return temporal_protocol(name, raw, spec_doc, temporal_leave_one_out(raw))


PROTOCOLS = {"synthetic-ordered": synthetic_ordered, "ml100k-temporal": ml100k_temporal}


def pair(protocol: str, seed: int) -> list[Variant]:
    """The mean bag and the sequence, same budget, same seed."""
    bag_features = SYNTHETIC_FEATURES if protocol == "synthetic-ordered" else None
    ours, seq = ours_config("ml100k-temporal"), sequence_config()
    from benchmarks.quality import EVERYTHING

    bag_features = bag_features or EVERYTHING
    seq_features = (tuple(SEQUENCE if f == HISTORY else f for f in bag_features)
                    if protocol == "synthetic-ordered" else sequence_features())
    return [Variant("ours", bag_features, dataclasses.replace(ours, seed=seed)),
            Variant("ours sequence", seq_features, dataclasses.replace(seq, seed=seed))]


TUNING_GRID = ((20, 1, 0.0), (20, 1, 0.2), (20, 2, 0.0), (20, 2, 0.2), (50, 1, 0.2))


def tuning_grid() -> list[tuple[str, dict, float]]:
    """(label, sequence feature options, encoder dropout): (max_length, blocks, dropout)."""
    return [(f"L{length} blocks{blocks} dropout{dropout}",
             {**SEQUENCE_FEATURE, "max_length": length, "blocks": blocks}, dropout)
            for length, blocks, dropout in TUNING_GRID]


def tune(data: Path, done: dict) -> dict:
    """Each grid point not in ``done`` (earlier results, kept), on ml-100k validation."""
    out = dict(done)
    for label, feature, dropout in tuning_grid():
        if label in out:
            continue
        protocol = ml100k_temporal(data)
        protocol.spec_doc["features"][SEQUENCE] = feature
        protocol = _temporal(protocol.name, Dataset(parse_feature_spec(protocol.spec_doc),
                             protocol.dataset.interactions, protocol.dataset.users,
                             protocol.dataset.items), protocol.spec_doc)
        config = sequence_config()
        config = dataclasses.replace(config, tower=dataclasses.replace(
            config.tower, history_dropout=dropout))
        result = run_variant(protocol, Variant(label, sequence_features(), config))
        out[label] = {"valid_ndcg@10": max(result["valid_ndcg@10"]),
                      "epochs": result["epochs"], "seconds": result["seconds"]}
        print(f"{label:<28} valid NDCG@10 {out[label]['valid_ndcg@10']:.4f} "
              f"({result['epochs']} epochs, {result['seconds']:.0f} s)", flush=True)
    return out


def compare(protocol: Protocol, seeds: list[int]) -> dict:
    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        for variant in pair(protocol.name, seed):
            result = run_variant(protocol, variant)
            runs.setdefault(variant.name, []).append(
                {"seed": seed, "hit@10": result["test"]["hit@10"],
                 "ndcg@10": result["test"]["ndcg@10"], "epochs": result["epochs"],
                 "seconds": result["seconds"],
                 "valid_ndcg@10": max(result["valid_ndcg@10"])})
            log.info("%s / %s seed %d: %s", protocol.name, variant.name, seed, runs[variant.name][-1])
    summary = {name: {m: _mean_std([r[m] for r in rs]) for m in ("hit@10", "ndcg@10")}
               for name, rs in runs.items()}
    ratio = {m: summary["ours sequence"][m]["mean"] / summary["ours"][m]["mean"]
             for m in ("hit@10", "ndcg@10")}
    return {"protocol": protocol.name, "seeds": seeds, "runs": runs, "summary": summary,
            "ratio": ratio}


def _mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def format_table(result: dict) -> str:
    lines = [f"\n{result['protocol']}: test, full corpus, seeds {result['seeds']}",
             f"{'model':<16}{'HR@10':>18}{'NDCG@10':>18}{'epochs':>10}{'train s':>10}"]
    for name, s in result["summary"].items():
        runs = result["runs"][name]
        lines.append(f"{name:<16}" + "".join(
            f"{s[m]['mean']:>10.4f} ± {s[m]['std']:.4f}" for m in ("hit@10", "ndcg@10"))
            + f"{np.mean([r['epochs'] for r in runs]):>10.1f}"
            + f"{np.mean([r['seconds'] for r in runs]):>10.0f}")
    lines.append(f"{'ratio':<16}{result['ratio']['hit@10']:>18.3f}"
                 f"{result['ratio']['ndcg@10']:>18.3f}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        names = list(result["summary"])
        for j, metric in enumerate(("hit@10", "ndcg@10")):
            means = [result["summary"][n][metric]["mean"] for n in names]
            stds = [result["summary"][n][metric]["std"] for n in names]
            ax.bar(np.arange(len(names)) + 0.38 * j, means, 0.38, yerr=stds, capsize=3,
                   label=metric)
        ax.set_xticks(np.arange(len(names)) + 0.19, names)
        ax.set(title=f"{name} (test, {len(result['seeds'])} seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocols", default="synthetic-ordered,ml100k-temporal")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--tune", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    load = {"load_average_start": os.getloadavg()}
    if args.tune:
        path = RESULTS / "sequence_tuning.json"
        done = json.loads(path.read_text())["grid"] if path.exists() else {}
        out = {**load, "grid": tune(args.data, done), "load_average_end": os.getloadavg()}
        path.write_text(json.dumps(out, indent=2))
        return
    path = RESULTS / "sequence_quality.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in args.protocols.split(","):
        result = compare(PROTOCOLS[name](args.data), seeds)
        result.update(load, load_average_end=os.getloadavg())
        results[name] = result
        print(format_table(result), flush=True)
        path.write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "sequence_quality.png")
    print(f"\nwrote {path} and {RESULTS / 'sequence_quality.png'}")


if __name__ == "__main__":
    main()

"""One tuning run of our model on the RecBole ml-1m protocol, scored on validation only.

    python -m benchmarks.quality_tune NAME [--history 200] [--tower '{"embedding_l2": 0.05}']
        [--loss '{"temperature": 0.03}'] [--train '{"epochs": 3}']

Starts from ``benchmarks.quality.ours_config("recbole-ml1m")``, replaces the fields given as
JSON objects (``TowerConfig``, ``LossConfig``, ``TrainConfig``), trains on the protocol's
train split and prints validation Recall@10 / NDCG@10 per epoch. Test metrics are never
computed here: settings are chosen on these numbers, then ``benchmarks.quality`` reports
test once. Each run is appended to ``--log`` (one JSON object a line); the runs behind the
current settings are in benchmarks/results/quality_tuning.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from benchmarks import quality


def main(argv: list[str] | None = None) -> dict:
    args = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    base = quality.ours_config("recbole-ml1m")
    try:
        config = dataclasses.replace(
            base, tower=dataclasses.replace(base.tower, **args.tower),
            loss=dataclasses.replace(base.loss, **args.loss), **args.train)
    except (TypeError, ValueError) as exc:  # an unknown field or a refused value
        raise SystemExit(f"quality_tune: {exc}") from None
    protocol = quality.recbole_ml1m(args.data, args.history)
    variant = quality.Variant(args.name, quality.EVERYTHING, config)
    trained, seconds, _ = quality.train_variant(protocol, variant)
    run = {"run": args.name, "history": args.history, "tower": args.tower, "loss": args.loss,
           "train": args.train,
           "valid_ndcg@10": [round(x, 4) for x in trained.history.get("val_ndcg@10", [])],
           "valid_recall@10": [round(x, 4) for x in trained.history.get("val_recall@10", [])],
           "seconds": round(seconds)}
    print(json.dumps(run), flush=True)
    with open(args.log, "a") as fh:
        fh.write(json.dumps(run) + "\n")
    return run


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object (got {text!r})")
    return value


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="a label for the run")
    p.add_argument("--history", type=int, default=quality.ML1M_HISTORY,
                   help="items in a history bag")
    for part in ("tower", "loss", "train"):
        p.add_argument(f"--{part}", type=_json_object, default={},
                       help=f"fields of the {part} config to replace, as a JSON object")
    p.add_argument("--data", type=Path, default=quality.DEFAULT_DATA)
    p.add_argument("--log", type=Path, default=Path("quality_tuning_runs.jsonl"))
    return p.parse_args(argv)


if __name__ == "__main__":
    main()

"""Several load-test runs side by side: each target's ratio per run, grouped by placement.

    python -m benchmarks.loadtest_runs benchmarks/results/loadtest-1m-targets-stop21/run* \
        [--out benchmarks/results/loadtest-1m-targets-stop21]

Reads each run's ``loadtest.json`` (benchmarks.loadtest), recomputes its target figures
from its rows and timed parts (``target_figures``, as the run printed them), prints one
line per run and the median of each group (``meta.placement``: split, shared), and saves
``loadtest_runs.json`` and ``loadtest_runs.png`` (each ratio per run, the target drawn
across). Runs on a shared machine drift by a third between hours, so the groups are
compared run by run, alternated, not against figures of another day.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from benchmarks.ghz import Row
from benchmarks.loadtest import target_figures

# (label, how to read it from target_figures, target, True when lower is better)
MEASURES = (
    ("server calls/s, c=50", lambda f: f["naive"]["server"], None, False),
    ("CPU ms/call, c=50", lambda f: f["cpu"]["server"], None, True),
    ("CPU ÷ parts (echo at server's rate)", lambda f: f["cpu_at_rate"]["ratio"], 1.2, True),
    ("½ max p50 ÷ c=1 p50", lambda f: f["half"]["p50_ratio"], 1.5, True),
    ("½ max p99 ÷ echo's p99", lambda f: f["half"]["p99_ratio"], 2.0, True),
    # gRPC alone: echo's p50 at half its own maximum over its c=1 p50
    ("echo's own ½ max p50 ÷ c=1 p50", lambda f: f["half"]["echo_own_p50_ratio"], None, True),
    ("2 workers' CPU ÷ 1", lambda f: f["workers2"]["cpu_ratio"], 1.1, True),
    # the same tail targets for 2 workers, at their own half-max rate
    ("2 workers ½ max p50 ÷ c=1 p50", lambda f: f["workers2"]["half"]["p50_ratio"], 1.5, True),
    ("2 workers ½ max p99 ÷ echo's", lambda f: f["workers2"]["half"]["p99_ratio"], 2.0, True),
    ("× naive", lambda f: f["naive"]["ratio"], 3.0, False),
    # how busy the server's CPU is at half its maximum, and the tail ratios at the
    # nominally half-busy rate (--rate half-busy; not a target, for comparison)
    ("core busy at ½ max", lambda f: f["fixed"]["half"]["busy"], None, True),
    ("half-busy p50 ÷ c=1 p50", lambda f: f["half_busy"]["p50_ratio"], 1.5, True),
    ("half-busy p99 ÷ echo's", lambda f: f["half_busy"]["p99_ratio"], 2.0, True),
    # what the half-load and 2-worker targets hang on (loadtest.batch_cost): a batch's fixed
    # CPU and a call's own, from the c=1 and c=50 rows
    ("F: a batch's fixed CPU ms", lambda f: f["fixed"]["fixed_ms"], None, True),
    ("m: a call's own CPU ms", lambda f: f["fixed"]["per_call_ms"], None, True),
)


def load_run(path: Path) -> dict:
    """A run directory (or its loadtest.json) → name, placement and target figures."""
    file = path / "loadtest.json" if path.is_dir() else path
    data = json.loads(file.read_text())
    rows = [Row(**{k: math.nan if v is None else v for k, v in r.items()})
            for r in data["rows"]]
    top_c = max(r.concurrency for r in rows if r.mode == "closed")
    placement = data["meta"].get("placement", {})
    group = "shared" if placement.get("ghz", "any") == "any" else "split"
    return {"run": file.parent.name, "placement": group,
            "figures": target_figures(rows, data["meta"].get("cpu_parts") or {}, top_c,
                                      data["meta"].get("server_cpus", 1))}


def measures(run: dict) -> dict[str, float]:
    out = {}
    for label, read, _, _ in MEASURES:
        try:
            out[label] = float(read(run["figures"]))
        except KeyError:  # the run lacks that variant or load
            out[label] = math.nan
    return out


def table(runs: list[dict]) -> str:
    labels = [m[0] for m in MEASURES]
    lines = [" | ".join(["run", "placement", *labels]),
             " | ".join(["---"] * (len(labels) + 2))]
    for run in runs:
        values = measures(run)
        lines.append(" | ".join([run["run"], run["placement"],
                                 *(f"{values[label]:,.2f}" for label in labels)]))
    for group in sorted({r["placement"] for r in runs}):
        members = [measures(r) for r in runs if r["placement"] == group]
        medians = [statistics.median(m[label] for m in members) for label in labels]
        lines.append(" | ".join([f"median of {len(members)}", group,
                                 *(f"{v:,.2f}" for v in medians)]))
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [m for m in MEASURES if m[2] is not None]
    fig, axes = plt.subplots(1, len(ratios), figsize=(3.2 * len(ratios), 3.6))
    colours = {"split": "tab:blue", "shared": "tab:orange"}
    for ax, (label, _, target, _) in zip(axes, ratios, strict=True):
        for i, run in enumerate(runs):
            ax.bar(i, measures(run)[label], color=colours.get(run["placement"], "grey"))
        ax.axhline(target, color="black", linestyle="--", linewidth=1)
        ax.set_title(label, fontsize=8)
        ax.set_xticks(range(len(runs)), [r["run"] for r in runs], rotation=60, fontsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, [f"--placement {g}" for g in colours], loc="upper right", fontsize=7)
    fig.suptitle("load-test targets per run (dashed: the target)", fontsize=9)
    fig.tight_layout()
    path = out / "loadtest_runs.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadtest_runs",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (or loadtest.json)")
    p.add_argument("--out", type=Path, help="where loadtest_runs.json/.png go (default: "
                                            "the first run's parent directory)")
    args = p.parse_args(argv)
    try:
        runs = [load_run(path) for path in args.runs]
    except (OSError, ValueError, KeyError) as exc:
        print(f"loadtest_runs: error: {exc}", file=sys.stderr)
        return 2
    out = args.out or args.runs[0].resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    print(table(runs))
    (out / "loadtest_runs.json").write_text(json.dumps(
        {"runs": [{**r, "measures": measures(r)} for r in runs]}, indent=2,
        default=lambda v: None) + "\n")
    print(f"wrote {out / 'loadtest_runs.json'} and {plot(runs, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

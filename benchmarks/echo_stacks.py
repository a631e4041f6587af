"""What gRPC's two Python stacks cost a call alone and under load, and their queue at half
their own maximum: the floor under the service's half-load tail target.

    python -m benchmarks.echo_stacks [--rounds 2] [--duration 6s] [--out DIR]

The echo server (``benchmarks.echo_server``: a canned 100-candidate reply, no work) runs
on grpc.aio (``aio``, the service's stack) and on gRPC's thread-pool server (``sync``),
one CPU each time, ghz on the last CPU (as the load test's split placement). Each round
runs both stacks, alternated, at c=1 and c=50 closed loop and then open loop at half the
c=50 rate. Per stack and round it gives the CPU per call at the three loads (/proc, every
thread of the server), how busy that leaves the server's core at half its maximum, and the
half-load p50 over the c=1 p50, the ratio the service's target holds at 1.5.

Why: a server whose CPU per call at half its maximum rate is r times its CPU per call at
that maximum keeps its core r/2 busy there. The service batches, so its r is large (a
batch's fixed cost is spread over one or two calls at half load, over twenty at c=50); this
benchmark shows what r the gRPC stack alone has, with nothing to batch.

Writes ``echo_stacks.json`` (rows and per-round figures) and ``echo_stacks.png`` to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from benchmarks.ghz import Plan, Row, call_data, find_ghz, ghz_version
from benchmarks.loadtest import ECHO, Placement, Variant, measure

log = logging.getLogger(__name__)
STACKS = {"aio": [], "sync": ["--sync"]}
USERS = [f"u{i}" for i in range(64)]


def stack_figures(rows: list[Row]) -> dict:
    """One stack's c=1, c=50 (the top concurrency) and half-max open rows → the CPU per
    call at each, the half-load CPU over the maximum's (r), the core's busy share at half
    load and the half-load p50 over c=1's."""
    closed = sorted((r for r in rows if r.mode == "closed"), key=lambda r: r.concurrency)
    one, top = closed[0], closed[-1]
    half = next(r for r in rows if r.mode == "open")
    return {"c1_rps": one.rps, "max_rps": top.rps, "half_rps": half.rps,
            "cpu_c1": one.cpu_ms_per_call, "cpu_max": top.cpu_ms_per_call,
            "cpu_half": half.cpu_ms_per_call,
            "half_over_max_cpu": half.cpu_ms_per_call / top.cpu_ms_per_call,
            "half_busy": half.rps * half.cpu_ms_per_call / 1e3,
            "c1_p50": one.p50_ms, "half_p50": half.p50_ms,
            "p50_ratio": half.p50_ms / one.p50_ms, "half_p99": half.p99_ms}


def table(rounds: list[dict[str, dict]]) -> str:
    head = ("| stack | round | calls/s c=1 / c=50 | CPU ms/call c=1 / c=50 / ½ max | "
            "½ max CPU ÷ c=50 | core busy at ½ max | p50 c=1 / ½ max ms | ½ max p50 ÷ c=1 |")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, by_stack in enumerate(rounds, 1):
        for stack, f in by_stack.items():
            lines.append(
                f"| {stack} | {i} | {f['c1_rps']:,.0f} / {f['max_rps']:,.0f} | "
                f"{f['cpu_c1']:.3f} / {f['cpu_max']:.3f} / {f['cpu_half']:.3f} | "
                f"{f['half_over_max_cpu']:.2f} | {100 * f['half_busy']:.0f} % | "
                f"{f['c1_p50']:.2f} / {f['half_p50']:.2f} | {f['p50_ratio']:.2f} |")
    for stack in rounds[0]:
        ratios = [r[stack]["p50_ratio"] for r in rounds]
        busy = [r[stack]["half_busy"] for r in rounds]
        lines.append(f"| {stack} | median | | | "
                     f"{statistics.median(r[stack]['half_over_max_cpu'] for r in rounds):.2f} | "
                     f"{100 * statistics.median(busy):.0f} % | | "
                     f"{statistics.median(ratios):.2f} |")
    return "\n".join(lines)


def save_plot(rounds: list[dict[str, dict]], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    stacks = list(rounds[0])
    for ax, key, label, line in (
            (axes[0], "half_over_max_cpu", "CPU per call at ½ max ÷ at c=50", None),
            (axes[1], "p50_ratio", "p50 at ½ max ÷ p50 at c=1", 1.5)):
        for j, stack in enumerate(stacks):
            values = [r[stack][key] for r in rounds]
            ax.bar([i + 0.4 * j for i in range(len(values))], values, width=0.4, label=stack)
        if line:
            ax.axhline(line, color="k", ls="--", lw=1, label=f"target {line}")
        ax.set_xticks([i + 0.2 for i in range(len(rounds))],
                      [f"round {i + 1}" for i in range(len(rounds))])
        ax.set_title(label)
        ax.legend()
    fig.suptitle("gRPC's Python stacks with nothing to do (echo), server on one CPU")
    fig.tight_layout()
    path = out / "echo_stacks.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.echo_stacks",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", default="6s", help="each ghz run (ghz -z)")
    p.add_argument("--concurrency", type=int, default=50, help="the closed-loop maximum's")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/echo-stacks"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ghz = find_ghz()
    if ghz is None:
        print("ghz is not installed: bash .ci/install-ghz.sh", file=sys.stderr)
        return 2
    placement = Placement.of("split")
    cpus = [] if placement.servers is None else ["--cpus",
                                                 ",".join(map(str, placement.servers))]
    plan = Plan(concurrency=(1, args.concurrency), rates=(0.5,), duration=args.duration,
                connections=args.connections)
    rounds: list[dict[str, dict]] = []
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="echo-stacks-") as tmp:
        work = Path(tmp)
        data_file = work / "call-data.json"
        data_file.write_text(json.dumps(call_data(USERS)))
        for i in range(args.rounds):
            by_stack = {}
            for stack, flags in STACKS.items():
                variant = Variant(stack, [*ECHO, *flags, *cpus])
                got, _ = measure(ghz, variant, plan, data_file, work / f"{stack}-{i}",
                                 warmup=2000, ghz_cpus=placement.ghz)
                by_stack[stack] = stack_figures(got)
                rows += [{**asdict(r), "round": i + 1} for r in got]
                log.info("round %d %s: %s", i + 1, stack, by_stack[stack])
            rounds.append(by_stack)
    print(table(rounds))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.echo_stacks " + " ".join(argv or sys.argv[1:]),
            "ghz": ghz_version(ghz), "placement": placement.describe(),
            "host": f"{os.uname().nodename} ({os.cpu_count()} cores)"}
    (args.out / "echo_stacks.json").write_text(json.dumps(
        {"meta": meta, "rounds": rounds, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out / 'echo_stacks.json'} and {save_plot(rounds, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

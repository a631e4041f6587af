"""How long `two-tower prepare` takes, and how much memory its whole process tree (Python
driver + Spark's JVM + any Python worker) holds, at a given number of interactions.

    python -m benchmarks.prepare_scale --interactions 2000000 [20000000 ...]

Per size: `two-tower generate` writes a seeded synthetic dataset (kept in --workdir and
reused by a later run) (50 events a user;
2M: 40k users, 100k items, 10 clusters; 20M: 400k users, 1M items, 1,000 clusters), then
`two-tower prepare` runs while /proc is sampled every 0.2 s (sum of the RSS of the command
and all its descendants). Prints a table; writes benchmarks/results/prepare_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
EVENTS_PER_USER = 50


def shape(interactions: int) -> dict[str, int]:
    users = interactions // EVENTS_PER_USER
    return {"users": users, "items": max(1000, users * 5 // 2),
            "clusters": 1000 if interactions >= 10_000_000 else 10}


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(c) for c in fh.read().split()]
    except OSError:
        return []


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_rss_kib(root: int) -> int:
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += _rss_kib(pid)
        todo.extend(_children(pid))
    return total


def measure(cmd: list[str], log_path: Path) -> dict:
    """Wall seconds and peak tree RSS of ``cmd``; its output goes to ``log_path``."""
    start, peak = time.perf_counter(), 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, _tree_rss_kib(proc.pid))
            time.sleep(0.2)
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "peak_tree_rss_mib": round(peak / 1024)}


def run_size(interactions: int, work: Path, cli: list[str], driver_memory: str) -> dict:
    s = shape(interactions)
    data, out = work / f"data-{interactions}", work / f"prepared-{interactions}"
    if not (data / "features.toml").exists():  # a dataset generated before is reused
        gen = measure([*cli, "generate", "--out", str(data), "--users", str(s["users"]),
                       "--items", str(s["items"]), "--clusters", str(s["clusters"]),
                       "--interactions-per-user", str(EVENTS_PER_USER)], work / "generate.log")
        if gen["rc"]:
            raise SystemExit(f"generate failed: {(work / 'generate.log').read_text()[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    result = measure([*cli, "prepare", "--data", str(data), "--out", str(out),
                      "--driver-memory", driver_memory], work / f"prepare-{interactions}.log")
    log = (work / f"prepare-{interactions}.log").read_text()
    if result["rc"]:
        raise SystemExit(f"prepare failed:\n{log[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"interactions": interactions, **s, **result,
            "interactions_per_s": round(interactions / result["wall_s"]),
            "train_shards": len(manifest["splits"]["train"]["shards"]),
            "rows": {k: v["rows"] for k, v in manifest["splits"].items()},
            "steps": [line.split("prepare: ", 1)[1] for line in log.splitlines()
                      if "prepare: " in line]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prepare_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interactions", type=int, nargs="+", default=[2_000_000])
    p.add_argument("--workdir", type=Path, help="keep data and output here (default: a "
                   "temporary directory, removed)")
    p.add_argument("--driver-memory", default="4g", help="Spark driver memory (JVM size)")
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="prepare_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "app.cli"]
    try:
        rows = [run_size(n, work, cli, args.driver_memory) for n in args.interactions]
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'interactions':>12} {'wall s':>8} {'peak RSS MiB':>13} {'interactions/s':>15}")
    for r in rows:
        print(f"{r['interactions']:>12,} {r['wall_s']:>8.1f} {r['peak_tree_rss_mib']:>13,} "
              f"{r['interactions_per_s']:>15,}")
    RESULTS.mkdir(exist_ok=True)
    command = ["python", "-m", "benchmarks.prepare_scale", *(argv or sys.argv[1:])]
    doc = {"benchmark": "prepare_scale", "command": " ".join(command),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_average_at_end": os.getloadavg()},
           "results": rows}
    (RESULTS / "prepare_scale.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

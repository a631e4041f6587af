"""A hot swap under open-loop load: what callers see while the server loads a new pair.

    python -m benchmarks.swap_load [--model M --index I --swap-to I2 [--data D]]
        [--workdir artifacts/loadtest] [--items N] [--clusters C] [--content-dims D]
        [--index-spec S] [--swap-spec S2]
        [--rate 300] [--duration 20s] [--swap-after 4] [--out benchmarks/results]

The server (``two-tower serve``, Redis on, as the load test runs it) watches an index
store of this run's own whose CURRENT names the first index. ghz sends ``--rate`` calls a
second, open loop, twice for ``--duration``: once with nothing else happening (the
baseline, same run and machine), once with CURRENT moved to the second index
``--swap-after`` seconds in. The server then loads the second pair beside the first, on
the same cores, and swaps; the table compares the two runs (calls, errors, latency
percentiles, calls over 50 ms) and gives when the swap finished, from the server's log.

Both indexes must be built from the same model (the pinned ``--model``). Without
``--model``/``--index``/``--swap-to`` the pair comes from the load test's workdir
(benchmarks/loadtest.py ``ensure_artifacts``: ``--items``, ``--clusters``,
``--content-dims``, ``--index-spec``), and a second index of ``--swap-spec`` is built from
the same model once, then reused. A swap between two versions of one index is what a
nightly rebuild publishes; a new model brings its own user tower as well, which is
loaded the same way.

Writes swap_load.json, swap_load.md and swap_load.png (latency of every call over time,
both runs, with the moment CURRENT moved and the moment the server swapped) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import os
import shlex
import shutil
import sys
import threading
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from benchmarks.ghz import (
    Load,
    call_data,
    find_ghz,
    ok_latencies_ms,
    parse_duration,
    read_user_ids,
    run_ghz,
)
from benchmarks.loadtest import (
    DEFAULT_USERS,
    ArtifactsUnavailable,
    Placement,
    Variant,
    filled_redis,
    _two_tower,
    ensure_artifacts,
    running,
    serve_command,
)
from app.processes import ProcessStartError
from indexer.publish import move_pointer

log = logging.getLogger("benchmarks.swap_load")
SLOW_MS = 50.0
POLL_S = 0.5  # the server's --watch-interval here


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ghz = find_ghz()
    if ghz is None:
        print("swap_load: ghz not found in .tools/bin or on PATH; run "
              "`bash .ci/install-ghz.sh`", file=sys.stderr)
        return 2
    try:
        if args.rate < 1:
            raise ValueError(f"--rate must be >= 1 call/s (got {args.rate})")
        if not 0 < args.swap_after < parse_duration(args.duration):
            raise ValueError(f"--swap-after must be inside --duration (got {args.swap_after})")
        model, first, second, data = _pair(args)
        with ExitStack() as stack:
            url = filled_redis(stack, args.workdir, data)
            result = measure(ghz, args, model, first, second, url)
    except (ValueError, OSError, ProcessStartError, ArtifactsUnavailable) as exc:
        print(f"swap_load: error: {exc}", file=sys.stderr)
        return 2
    write_results(result, args.out)
    print(format_table(result))
    return 0 if result["swapped"] and not any(r["errors"] for r in result["runs"]) else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.swap_load",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model version directory (pinned)")
    p.add_argument("--index", type=Path, help="index version served first")
    p.add_argument("--swap-to", type=Path, help="index version swapped to (same model)")
    p.add_argument("--data", type=Path, help="dataset whose users fill Redis")
    p.add_argument("--workdir", type=Path, default=Path("artifacts/loadtest"))
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--content-dims", type=int, default=0)
    p.add_argument("--index-spec", default="auto")
    p.add_argument("--swap-spec", default="IVF1024,Flat",
                   help="the second index, built from the same model when not given")
    p.add_argument("--rate", type=int, default=300, help="calls per second, open loop")
    p.add_argument("--duration", default="20s", help="each of the two runs (ghz -z)")
    p.add_argument("--swap-after", type=float, default=4.0,
                   help="seconds into the second run at which CURRENT moves")
    p.add_argument("--users", type=Path, default=DEFAULT_USERS)
    p.add_argument("--placement", choices=("split", "shared"), default="split",
                   help="split: ghz on the last CPU, the server on the others (serve "
                        "--cpu-affinity), as in the load test; shared: nothing pinned")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return p


def _pair(args) -> tuple[Path, Path, Path, Path]:
    given = [args.model, args.index, args.swap_to]
    if any(given) and not all(given):
        raise ValueError("--model, --index and --swap-to go together")
    if all(given):
        if args.data is None:
            raise ValueError("--data DIR is needed to fill Redis with the users")
        return args.model, args.index, args.swap_to, args.data
    model, first, data = ensure_artifacts(args.workdir, False, args.items, args.content_dims,
                                          args.clusters, args.index_spec)
    return model, first, _second_index(model, first, data, args.swap_spec), data


def _second_index(model: Path, first: Path, data: Path, spec: str) -> Path:
    """An index of ``spec`` from the same model in the same store, built once."""
    note = first.parent / f"swap-index-{re.sub(r'[^A-Za-z0-9]+', '_', spec)}.txt"
    if note.exists():
        made = Path(note.read_text().strip())
        if made.is_dir() and made != first:
            return made
    made = Path(_two_tower("build-index", "--model", str(model), "--out", str(first.parent),
                           "--index", spec, "--items", str(data), "--data", str(data)))
    note.write_text(f"{made}\n")
    return made


def _hard_link_tree(version: Path, dest: Path) -> None:
    """``dest`` as a copy of the version directory made of hard links (a copy where the
    filesystems differ): servers refuse a version that is a symbolic link out of the store."""
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    shutil.rmtree(dest, ignore_errors=True)
    for path in sorted(version.rglob("*")):
        target = dest / path.relative_to(version)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def measure(ghz: Path, args, model: Path, first: Path, second: Path, redis_url: str) -> dict:
    """Serve from a private index store (hard links of both versions), run ghz twice, swap in
    the second run; the two runs' per-call latencies and the swap's timing."""
    work = args.workdir / "swap-load"
    store = work / "indexes"
    store.mkdir(parents=True, exist_ok=True)
    for version in (first, second):
        _hard_link_tree(version, store / version.name)
    move_pointer(store, first.name)
    data_file = work / "call-data.json"
    data_file.write_text(json.dumps(call_data(read_user_ids(args.users))))
    placement = Placement.of(args.placement)
    pinned = ([] if placement.servers is None
              else ["--cpu-affinity", ",".join(map(str, placement.servers))])
    variant = Variant("server", serve_command(model, store, None, redis_url,
                                              ["--watch-interval", str(POLL_S), *pinned]))
    runs, moved_at = [], None
    with running(variant, work) as server:
        address = server.address
        run_ghz(ghz, address, Load("closed", 4, total=600), data_file, work / "warmup.json",
                placement.ghz)
        for swap in (False, True):
            timer = None
            if swap:
                def move() -> None:
                    nonlocal moved_at
                    moved_at = time.time()
                    move_pointer(store, second.name)
                timer = threading.Timer(args.swap_after, move)
            started = time.time()
            if timer:
                timer.start()
            report = run_ghz(ghz, address, Load("open", 1, args.duration, rps=args.rate),
                             data_file, work / f"ghz-{'swap' if swap else 'steady'}.json",
                             placement.ghz)
            if timer:
                timer.join()
            runs.append(_run_summary("swap" if swap else "steady", report, started))
        time.sleep(POLL_S * 2)
    swapped_at = _swap_time(work / "server.log", second.name)
    return {"utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": shlex.join(["python", "-m", "benchmarks.swap_load", *sys.argv[1:]]),
            "placement": placement.describe(),
            "model": model.name, "first": first.name, "second": second.name,
            "rate": args.rate, "duration": args.duration, "runs": runs,
            "moved_s": None if moved_at is None else round(moved_at - runs[1]["started"], 3),
            "swapped_s": None if swapped_at is None else round(swapped_at - runs[1]["started"], 3),
            "swapped": swapped_at is not None}


def _run_summary(name: str, report: dict, started: float) -> dict:
    latency = ok_latencies_ms(report)
    sent = [_epoch(d["timestamp"]) - started
            for d in report.get("details") or [] if d.get("status") == "OK"]
    errors = {code: int(n) for code, n in (report.get("statusCodeDistribution") or {}).items()
              if code != "OK" and n}
    pct = (lambda q: round(float(np.percentile(latency, q)), 2)) if len(latency) else (
        lambda q: float("nan"))
    return {"run": name, "started": started, "calls": int(report["count"]), "errors": errors,
            "p50_ms": pct(50), "p99_ms": pct(99), "p999_ms": pct(99.9),
            "max_ms": round(float(latency.max()), 2) if len(latency) else float("nan"),
            "over_50ms": int((latency > SLOW_MS).sum()),
            "series": [[round(t, 4), round(float(v), 3)] for t, v in zip(sent, latency,
                                                                        strict=True)]}


def _epoch(stamp: str) -> float:
    """ghz's RFC 3339 timestamps carry nanoseconds, which datetime does not parse."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    whole = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return whole.timestamp() + (float(f"0.{frac}") if frac else 0.0)


_SWAPPED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*swapped to model \S+ / index (\S+)")


def _swap_time(server_log: Path, version: str) -> float | None:
    """When the server logged its swap to ``version`` (epoch seconds), or None."""
    for line in server_log.read_text().splitlines():
        found = _SWAPPED.match(line)
        if found and found.group(2) == version:
            stamp = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f")
            return stamp.astimezone().timestamp()  # the server logs local time
    return None


def format_table(result: dict) -> str:
    title = (f"Hot swap under {result['rate']} calls/s, open loop, {result['duration']} a run "
             f"({result['first']} → {result['second']}, model {result['model']})")
    lines = [title, "",
             "| run | calls | errors | p50 ms | p99 ms | p99.9 ms | max ms | calls > 50 ms |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "none"
        lines.append(f"| {r['run']} | {r['calls']} | {errors} | {r['p50_ms']} | {r['p99_ms']} "
                     f"| {r['p999_ms']} | {r['max_ms']} | {r['over_50ms']} |")
    swap = (f"CURRENT moved {result['moved_s']} s into the swap run; the server swapped at "
            f"{result['swapped_s']} s" if result["swapped"] else
            "the server did NOT swap to the second index (see swap-load/server.log)")
    return "\n".join([*lines, "", swap])


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "swap_load.json").write_text(json.dumps(result, separators=(",", ":")) + "\n")
    (out / "swap_load.md").write_text(format_table(result) + "\n")
    _plot(result, out / "swap_load.png")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for run, colour in zip(result["runs"], ("tab:blue", "tab:red"), strict=True):
        series = np.array(run["series"]).reshape(-1, 2)
        ax.scatter(series[:, 0], series[:, 1], s=3, color=colour, alpha=0.5,
                   label=f"{run['run']} (p99 {run['p99_ms']} ms)")
    for key, style, label in (("moved_s", ":", "CURRENT moved"),
                              ("swapped_s", "--", "server swapped")):
        if result.get(key) is not None:
            ax.axvline(result[key], color="black", linestyle=style, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("seconds into the run (when the call was sent)")
    ax.set_ylabel("latency, ms")
    ax.set_title(f"Hot swap at {result['rate']} calls/s: {result['first']} → {result['second']}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

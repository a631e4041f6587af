"""How much a pair's load takes from serving: load a model+index pair in this process while
a probe thread, standing in for the event loop, sleeps 0.5 ms in a loop and records how
late it wakes (it wakes late when the load holds the GIL or the CPU).

    python -m benchmarks.pair_load [--items 1000000 --clusters 1000 --content-dims 8
        --index-spec IVF4096,SQ8 --swap-spec IVF4096,Flat] [--workdir artifacts/loadtest]

The pair is the load test's (benchmarks.loadtest.ensure_artifacts; the second index is
swap_load's). Rows: the probe alone (the machine's own noise), the first load with an
empty cache of mapped tables (retrieval.mapped_cache: the id tables are built and
written), a second load of the same pair (mapped from the cache, as a second worker or a
restarted server does), and a load of the other index of the same model (a swap).
Writes benchmarks/results/pair_load.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.loadtest import ensure_artifacts
from benchmarks.swap_load import _second_index

REPO = Path(__file__).resolve().parents[1]
SLEEP_S = 0.0005


def probed(fn) -> dict:
    """fn() with the probe running: its seconds and the probe's lateness p50/p99/max."""
    late: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            time.sleep(SLEEP_S)
            late.append(time.perf_counter() - start - SLEEP_S)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    time.sleep(0.2)
    start = time.perf_counter()
    fn()
    took = time.perf_counter() - start
    stop.set()
    thread.join()
    ms = np.array(late) * 1e3
    return {"seconds": took, "late_p50_ms": float(np.percentile(ms, 50)),
            "late_p99_ms": float(np.percentile(ms, 99)), "late_max_ms": float(ms.max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pair_load",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=REPO / "artifacts/loadtest")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--content-dims", type=int, default=8)
    p.add_argument("--index-spec", default="IVF4096,SQ8")
    p.add_argument("--swap-spec", default="IVF4096,Flat")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model, first, data = ensure_artifacts(args.workdir, False, args.items, args.content_dims,
                                          args.clusters, args.index_spec)
    second = _second_index(model, first, data, args.swap_spec)

    from retrieval.pair import load_pair

    cache = Path(tempfile.mkdtemp(prefix="pair-load-cache-"))
    os.environ["TWO_TOWER_CACHE_DIR"] = str(cache)  # empty: the first load builds
    held = []
    try:
        rows = {"probe alone (3 s)": probed(lambda: time.sleep(3))}
        for label, index in (("first load, cache empty", first),
                             ("same pair again, cache warm", first),
                             ("the other index of the model (a swap)", second)):
            rows[label] = probed(lambda index=index: held.append(load_pair(model, index)))
            held.clear()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    load = os.getloadavg()
    print(f"{'':<40} {'s':>6} {'late p50 ms':>12} {'p99 ms':>8} {'max ms':>8}")
    for label, r in rows.items():
        print(f"{label:<40} {r['seconds']:>6.2f} {r['late_p50_ms']:>12.2f} "
              f"{r['late_p99_ms']:>8.2f} {r['late_max_ms']:>8.1f}")
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pair_load.json").write_text(json.dumps(
        {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": str(model),
         "index": str(first), "other_index": str(second), "load_average": load,
         "rows": rows}, indent=2) + "\n")
    _plot(rows, args.out / "pair_load.png")
    print(f"wrote {args.out / 'pair_load.json'} and {args.out / 'pair_load.png'}")
    return 0


def _plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.barh(labels, [rows[k]["seconds"] for k in labels])
    left.set_xlabel("seconds")
    left.set_title("load time")
    right.barh(labels, [rows[k]["late_max_ms"] for k in labels], label="max")
    right.barh(labels, [rows[k]["late_p99_ms"] for k in labels], label="p99")
    right.set_xlabel("ms a 0.5 ms sleep woke late")
    right.set_title("what the load took from another thread")
    right.legend()
    right.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

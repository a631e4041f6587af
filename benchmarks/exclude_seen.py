"""exclude_seen at 1M items: calls/s and p50 with it on (users who have seen 1,000 items)
against off, in the same run, Redis on.

    .venv/bin/python -m benchmarks.exclude_seen [--items 1000000] [--users 1000]
        [--seen 1000] [--concurrency 16] [--duration 10s] [--rounds 3]

1. A small model: `two-tower generate --users U --items 2000`, trained one epoch in this
   process (training.pipeline.run_training, no evaluation; the default recipe, which is
   benchmarks.loadtest.MODEL_RECIPE), kept in --workdir for the next run.
2. A 1M-item catalogue for it, the cheap way benchmarks.index_scale makes its sets: the
   model's items plus synthetic items around them (a model item's embedding plus Gaussian
   noise, normalised as the model's are), indexed as the 1M load test's is (IVF4096,SQ8,
   nprobe 64 here, fixed), written as an index version of that model.
3. A real Redis filled by `two-tower load-features --data`, then 1,000 seen items for
   each user: half among the user's 2,000 nearest items (the served tower's embedding in
   the requests' context, searched in the index), half anywhere, so that the exclusions
   fall where the search looks, as a real user's do.
4. `two-tower serve --redis-url` (one process), and ghz closed loop at --concurrency, the
   same requests (every user, k=100) with exclude_seen false and true, alternated for
   --rounds rounds so that both meet the same load from the rest of the machine.

Writes benchmarks/results/exclude_seen.{json,md} and exclude_seen.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from benchmarks.ghz import Load, find_ghz, ghz_version, parse_report, run_ghz
from benchmarks.loadtest import _two_tower

log = logging.getLogger("benchmarks.exclude_seen")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks/results"
CONTEXT = {"hour_of_day": 22, "device": "tv"}
EVENT_TIME = 1_700_611_200
FACTORY, NPROBE, K, NEAR = "IVF4096,SQ8", 64, 100, 2000


def make_model(workdir: Path, users: int) -> tuple[Path, Path]:
    """(model dir, data dir), reused when an earlier run made them."""
    data, done = workdir / "data", workdir / "model.txt"
    if done.exists() and Path(done.read_text().strip()).is_dir():
        return Path(done.read_text().strip()), data
    if not (data / "features.toml").exists():
        _two_tower("generate", "--out", str(data), "--users", str(users), "--items", "2000",
                   prints_path=False)
    from contracts.dataset import load_dataset
    from training.pipeline import run_training
    from training.train import TrainConfig

    model, _ = run_training(load_dataset(data), workdir / "models", TrainConfig(epochs=1),
                            evaluate=False)
    done.write_text(f"{model}\n")
    return Path(model), data


def make_catalogue(model_dir: Path, workdir: Path, items: int, seed: int = 0) -> Path:
    """An index version of the model holding its items and ``items`` in all."""
    from contracts.model_manifest import load_item_embeddings, load_model_manifest
    from indexer.artifact import IndexContents, write_index_artifact
    from indexer.build import IndexSpec, build_index

    marker = workdir / f"index-{items}.txt"
    if marker.exists() and Path(marker.read_text().strip()).is_dir():
        return Path(marker.read_text().strip())
    model = load_model_manifest(model_dir)
    item_emb, item_ids = load_item_embeddings(model)
    rng = np.random.default_rng(seed)
    extra = items - len(item_ids)
    base = item_emb[rng.integers(len(item_ids), size=extra)]
    norms = np.linalg.norm(item_emb, axis=1).mean()
    xb = np.concatenate([item_emb, base + rng.normal(
        scale=0.5 * norms / np.sqrt(item_emb.shape[1]), size=base.shape).astype(np.float32)])
    if np.allclose(np.linalg.norm(item_emb, axis=1), 1.0, atol=1e-3):
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    ids = np.concatenate([item_ids.astype(str), [f"syn{n}" for n in range(extra)]])
    spec = IndexSpec(FACTORY, search={"nprobe": NPROBE})
    started = time.monotonic()
    index = build_index(np.ascontiguousarray(xb, dtype=np.float32), spec, model.similarity)
    log.info("built %s over %d items in %.0f s", FACTORY, items, time.monotonic() - started)
    version = write_index_artifact(IndexContents(index, spec, ids, {}), model,
                                   workdir / "indexes")
    marker.write_text(f"{version}\n")
    return version


def seen_items(model_dir: Path, index_dir: Path, data: Path, per_user: int,
               seed: int = 1) -> dict[str, list[str]]:
    """user → ``per_user`` item ids: half among its NEAR nearest in the index, half anywhere."""
    import faiss

    from contracts.dataset import load_dataset
    from contracts.inputs import UserRequest, user_inputs
    from retrieval.feature_store import users_from_dataset
    from retrieval.pair import load_pair

    pair = load_pair(model_dir, index_dir)
    stored = users_from_dataset(load_dataset(data))
    users = sorted(stored)
    requests = [UserRequest(u, stored[u].features, stored[u].history, CONTEXT, EVENT_TIME)
                for u in users]
    user_emb = np.concatenate([pair.user_tower(user_inputs(pair.model.feature_spec,
                                                           requests[i : i + 256]))
                               for i in range(0, len(requests), 256)])
    params = faiss.SearchParametersIVF(nprobe=NPROBE)
    _, near = pair.index.artifact.index.search(user_emb, NEAR, params=params)
    rng, ids = np.random.default_rng(seed), pair.index.item_ids
    out = {}
    for u, rows in zip(users, near, strict=True):
        close = rng.choice(rows[rows >= 0], per_user // 2, replace=False)
        anywhere = rng.choice(len(ids), per_user - len(close), replace=False)
        out[u] = list(dict.fromkeys(ids[np.concatenate([close, anywhere])].tolist()))
    return out


def fill_redis(url: str, data: Path, seen: dict[str, list[str]]) -> None:
    from retrieval.feature_store import RedisFeatureStore

    _two_tower("load-features", "--data", str(data), "--redis-url", url, prints_path=False)

    async def write() -> None:
        store = RedisFeatureStore.from_url(url, timeout_s=10.0)
        try:
            events = [(u, item, float(EVENT_TIME - 86_400 + n))
                      for u, items in seen.items() for n, item in enumerate(items)]
            for start in range(0, len(events), 20_000):
                await store.add_seen(events[start : start + 20_000])
        finally:
            await store.close()

    asyncio.run(write())


def call_data(users: list[str], exclude_seen: bool) -> list[dict]:
    context = {"hour_of_day": {"int_value": CONTEXT["hour_of_day"]},
               "device": {"string_value": CONTEXT["device"]}}
    return [{"user_id": u, "k": K, "context": context, "event_time_unix_seconds": EVENT_TIME,
             "exclude_seen": exclude_seen} for u in users]


def measure(ghz: Path, address: str, users: list[str], args, workdir: Path) -> list[dict]:
    files = {}
    for variant, flag in (("off", False), ("on", True)):
        files[variant] = workdir / f"requests-{variant}.json"
        files[variant].write_text(json.dumps(call_data(users, flag)))
    load = Load("closed", args.concurrency, duration=args.duration)
    run_ghz(ghz, address, Load("closed", args.concurrency, total=2000), files["on"],
            workdir / "warm-up.json")  # warm both paths before measuring
    rows = []
    for round_ in range(args.rounds):
        for variant in ("off", "on"):
            report = run_ghz(ghz, address, load, files[variant], workdir / f"{variant}.json")
            row = parse_report(report, variant, load)
            rows.append({"round": round_, "variant": variant, "rps": row.rps,
                         "p50_ms": row.p50_ms, "p99_ms": row.p99_ms, "ok": row.ok,
                         "errors": row.errors, "load_avg": os.getloadavg()[0]})
            log.info("round %d exclude_seen %s: %.0f calls/s, p50 %.2f ms", round_, variant,
                     row.rps, row.p50_ms)
    return rows


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for variant in ("off", "on"):
        mine = [r for r in rows if r["variant"] == variant]
        out[variant] = {"rps": statistics.median(r["rps"] for r in mine),
                        "p50_ms": statistics.median(r["p50_ms"] for r in mine),
                        "p99_ms": statistics.median(r["p99_ms"] for r in mine)}
    return out


def markdown(summary: dict, rows: list[dict], meta: dict) -> str:
    off, on = summary["off"], summary["on"]
    lines = [f"# exclude_seen at {meta['items']:,} items, Redis on", "",
             f"`{meta['command']}`", "",
             (f"{meta['users']:,} users with {meta['seen']:,} seen items each (half among "
              f"their {NEAR:,} nearest), k={K}, {FACTORY} nprobe {NPROBE}, ghz closed loop "
              f"c={meta['concurrency']}, {meta['rounds']} rounds of {meta['duration']} each "
              f"way, alternated; medians over rounds. Load average before: "
              f"{meta['load_before']}, after: {meta['load_after']} ({meta['host']})."), "",
             "| exclude_seen | calls/s | p50 ms | p99 ms |", "| --- | ---: | ---: | ---: |",
             f"| off | {off['rps']:,.0f} | {off['p50_ms']:.2f} | {off['p99_ms']:.2f} |",
             f"| on | {on['rps']:,.0f} | {on['p50_ms']:.2f} | {on['p99_ms']:.2f} |",
             (f"| on / off | {on['rps'] / off['rps']:.2f}x | "
              f"{on['p50_ms'] / off['p50_ms']:.2f}x | {on['p99_ms'] / off['p99_ms']:.2f}x |"),
             "", "Every round:", "",
             "| round | exclude_seen | calls/s | p50 ms | p99 ms | errors | load avg |",
             "| ---: | --- | ---: | ---: | ---: | --- | ---: |"]
    lines += [f"| {r['round']} | {r['variant']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {', '.join(f'{k}x{v}' for k, v in r['errors'].items()) or '-'}"
              f" | {r['load_avg']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for variant, colour in (("off", "tab:blue"), ("on", "tab:orange")):
        mine = [r for r in rows if r["variant"] == variant]
        rounds = [r["round"] for r in mine]
        left.plot(rounds, [r["rps"] for r in mine], "o-", color=colour,
                  label=f"exclude_seen {variant}")
        right.plot(rounds, [r["p50_ms"] for r in mine], "o-", color=colour)
    left.set(xlabel="round", ylabel="calls/s", ylim=(0, None), title="throughput")
    right.set(xlabel="round", ylabel="p50 ms", ylim=(0, None), title="median latency")
    left.legend()
    for ax in (left, right):
        ax.set_xticks(sorted({r["round"] for r in rows}))
    fig.suptitle("exclude_seen at 1M items (1,000 seen items a user), Redis on")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.exclude_seen")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--seen", type=int, default=1000, help="seen items a user")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", default="10s")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=REPO / "artifacts/exclude_seen")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ghz = find_ghz()
    if ghz is None:
        print("ghz is missing: run .ci/install-ghz.sh", file=sys.stderr)
        return 1
    from app.processes import RedisProcess, ServeProcess

    workdir = args.workdir / f"users-{args.users}"
    workdir.mkdir(parents=True, exist_ok=True)
    model, data = make_model(workdir, args.users)
    index = make_catalogue(model, workdir, args.items)
    seen = seen_items(model, index, data, args.seen)
    load_before = os.getloadavg()
    with ExitStack() as stack:
        redis_server = RedisProcess.start(workdir / "redis")
        stack.callback(redis_server.stop)
        fill_redis(redis_server.url, data, seen)
        server = ServeProcess.start(["--model", str(model), "--index", str(index),
                                     "--redis-url", redis_server.url, "--watch-interval", "0"],
                                    workdir / "serve")
        stack.callback(server.stop)
        rows = measure(ghz, server.address, sorted(seen), args, workdir)
    meta = {"command": "python -m benchmarks.exclude_seen " + " ".join(argv or sys.argv[1:]),
            "items": args.items, "users": args.users, "seen": args.seen,
            "concurrency": args.concurrency, "duration": args.duration, "rounds": args.rounds,
            "index": f"{FACTORY} nprobe {NPROBE}", "k": K, "ghz": ghz_version(ghz),
            "host": f"{os.uname().nodename} ({os.cpu_count()} cores)",
            "load_before": " ".join(f"{x:.2f}" for x in load_before),
            "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    summary = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exclude_seen.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=2) + "\n")
    table = markdown(summary, rows, meta)
    (args.out / "exclude_seen.md").write_text(table)
    plot(rows, args.out / "exclude_seen.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What `two-tower load-features --prepared` costs at scale: users/s and peak RSS of the
streamed load against the all-in-memory path, into a real redis-server.

    python -m benchmarks.load_features_scale [--users 1000000] [--batch-size 1000]
        [--history-length 20] [--workdir artifacts/load_features_scale]
        [--out benchmarks/results]

Writes a synthetic prepared output (users/*.parquet in the preparation job's format:
user_id, age float32 with NaN, country string with "", genres list<string>, history
list<string> of 0..history-length items; 250,000 users a file, row groups of 50,000),
starts a redis-server (app.processes.RedisProcess) and loads it twice, each in a child
process that reports its RSS after imports and its peak (VmHWM):

* streamed: `two-tower load-features --prepared` (one record batch of --batch-size users
  held, one MULTI/EXEC round trip each);
* in memory: every user read into one list first (as `load-features --data` holds the
  users it builds), then written with the same batches and round trips.

After the streamed load it reads users back through RedisFeatureStore and compares them.
Prints a table; writes load_features_scale.json and .md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROWS_PER_FILE = 250_000
ROW_GROUP = 50_000
ITEMS = 100_000
COUNTRIES = [f"c{i:02d}" for i in range(30)]
GENRES = [f"g{i}" for i in range(10)]
MODES = ("streamed", "in-memory")


def write_users(prepared: Path, users: int, history_length: int = 20, seed: int = 0,
                rows_per_file: int = ROWS_PER_FILE) -> Path:
    """A prepared output holding only users/ and its manifest entry; returns ``prepared``."""
    rng = np.random.default_rng(seed)
    directory = prepared / "users"
    directory.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, users, rows_per_file)):
        table = _users_table(rng, start, min(rows_per_file, users - start), history_length)
        pq.write_table(table, directory / f"users-{index:05d}.parquet",
                       row_group_size=ROW_GROUP)
    (prepared / "manifest.json").write_text(json.dumps(users_manifest(users, history_length),
                                                       indent=1))
    return prepared


SPEC = {"columns": {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp"},
        "features": {"user_id": {"tower": "user", "kind": "categorical"},
                     "age": {"tower": "user", "kind": "numeric"},
                     "country": {"tower": "user", "kind": "categorical"},
                     "genres": {"tower": "user", "kind": "bag"},
                     "recent_items": {"tower": "user", "kind": "history"},
                     "item_id": {"tower": "item", "kind": "categorical"}}}


def users_manifest(users: int, history_length: int) -> dict:
    """A contracts.prepared manifest of an output holding only users/ (the splits empty)."""
    from contracts.feature_spec import parse_feature_spec
    from contracts.prepared import PREPARED_FORMAT, spec_fingerprint

    spec = parse_feature_spec(SPEC)
    return {"format": PREPARED_FORMAT, "engine": "benchmarks.load_features_scale",
            "spec_fingerprint": spec_fingerprint(spec), "spec": spec.to_dict(), "config": {},
            "source": {}, "splits": {s: {"rows": 0, "shards": []}
                                     for s in ("train", "valid", "test")},
            "vocabularies": {}, "statistics": {},
            "item_counts": {"path": "item_counts.parquet", "items": 0, "examples": 0},
            "users": {"path": "users/", "rows": users, "history_length": history_length},
            "created": datetime.now(UTC).isoformat()}


def _users_table(rng: np.random.Generator, start: int, n: int, history_length: int):
    age = rng.uniform(18, 70, n).astype(np.float32)
    age[rng.random(n) < 0.05] = np.nan
    country = pa.array(COUNTRIES + [""]).take(
        pa.array(rng.integers(0, len(COUNTRIES) + 1, n)))
    return pa.table({
        "user_id": pa.array([f"u{i}" for i in range(start, start + n)]),
        "age": pa.array(age),
        "country": country,
        "genres": _lists(rng, pa.array(GENRES), rng.integers(0, 4, n)),
        "history": _lists(rng, pa.array([f"i{i}" for i in range(ITEMS)]),
                          rng.integers(0, history_length + 1, n)),
    })


def _lists(rng: np.random.Generator, values: pa.Array, lengths: np.ndarray) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = values.take(pa.array(rng.integers(0, len(values), int(offsets[-1]))))
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


def measure(mode: str, prepared: Path, redis_url: str, batch_size: int = 1000,
            history_length: int = 20) -> dict:
    """Loads ``prepared`` into ``redis_url`` in a child process: users, seconds, users/s,
    RSS after imports, peak RSS and their difference (MB)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.load_features_scale", "--child", mode,
         "--prepared", str(prepared), "--redis-url", redis_url,
         "--batch-size", str(batch_size), "--history-length", str(history_length)],
        capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} load failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(args) -> None:
    """In the child: imports, then RSS, then the load, then the peak."""
    from app.cli import main as cli
    from retrieval.feature_store import RedisFeatureStore
    from retrieval.prepared_users import iter_user_batches, open_prepared_users

    baseline = _status_mb("VmRSS")
    start = time.monotonic()
    if args.child == "streamed":
        code = cli(["load-features", "--prepared", str(args.prepared), "--redis-url",
                    args.redis_url, "--batch-size", str(args.batch_size),
                    "--history-length", str(args.history_length)])
        if code:
            raise SystemExit(code)
        users = open_prepared_users(args.prepared).rows
    else:
        import pyarrow

        pyarrow.set_memory_pool(pyarrow.system_memory_pool())  # as load-features does
        everyone = [pair for batch in iter_user_batches(open_prepared_users(args.prepared),
                                                        50_000) for pair in batch]
        users = len(everyone)
        store = RedisFeatureStore.from_url(args.redis_url, timeout_s=30.0,
                                           history_length=args.history_length)
        try:  # the same writes as the streamed path, so only what is held differs
            for start_at in range(0, users, args.batch_size):
                store.write_batch(everyone[start_at:start_at + args.batch_size])
        finally:
            asyncio.run(store.close())
    seconds = time.monotonic() - start
    peak = _status_mb("VmHWM")
    print(json.dumps({"mode": args.child, "users": users, "batch_size": args.batch_size,
                      "seconds": round(seconds, 2), "users_per_s": round(users / seconds),
                      "rss_after_imports_mb": round(baseline, 1), "peak_rss_mb": round(peak, 1),
                      "growth_mb": round(peak - baseline, 1)}))


def _status_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def check_round_trip(prepared: Path, redis_url: str, history_length: int,
                     sample: int = 1000) -> int:
    """Reads the first ``sample`` users of the first file back from Redis; returns how many
    differ from the file (0 when the load is right)."""
    from retrieval.feature_store import RedisFeatureStore, StoredUser
    from retrieval.prepared_users import iter_user_batches, open_prepared_users

    expected = next(iter_user_batches(open_prepared_users(prepared), sample))
    store = RedisFeatureStore.from_url(redis_url, history_length=history_length,
                                       timeout_s=30.0)
    try:
        got = store.read_users([u for u, _ in expected])
    finally:
        asyncio.run(store.close())
    return sum(read != (StoredUser(user.features, user.history[:history_length])
                        if user.features or user.history else None)
               for (_, user), read in zip(expected, got, strict=True))


def _redis_used_mb(redis_url: str) -> float:
    import redis

    with redis.Redis.from_url(redis_url) as client:
        return client.info("memory")["used_memory"] / 2**20


def _flush(redis_url: str) -> None:
    import redis

    with redis.Redis.from_url(redis_url, socket_timeout=600) as client:  # 1M users: seconds
        client.flushall()


def run(args) -> dict:
    from app.processes import RedisProcess

    prepared = args.workdir / f"prepared-{args.users}"
    started, written_s = time.monotonic(), None  # None: reused from an earlier run
    if not (prepared / "manifest.json").exists():
        write_users(prepared, args.users, args.history_length)
        written_s = round(time.monotonic() - started, 1)
    server = RedisProcess.start(args.workdir / "redis")
    rows = []
    try:
        for mode in MODES:
            _flush(server.url)
            row = measure(mode, prepared, server.url, args.batch_size, args.history_length)
            row["redis_used_mb"] = round(_redis_used_mb(server.url), 1)
            if mode == "streamed":
                row["mismatched_of_1000_read_back"] = check_round_trip(
                    prepared, server.url, args.history_length)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.stop()
    return {"benchmark": "load_features_scale", "date": datetime.now(UTC).isoformat(),
            "users": args.users, "batch_size": args.batch_size,
            "history_length": args.history_length, "write_synthetic_s": written_s,
            "parquet_mb": round(sum(p.stat().st_size for p in (prepared / "users").iterdir())
                                / 2**20, 1),
            "rows": rows}


def _table(result: dict) -> str:
    lines = [(f"{result['users']:,} users, batches of {result['batch_size']:,}, "
              f"{result['parquet_mb']} MB of Parquet"), "",
             ("| path | seconds | users/s | RSS after imports (MB) | peak RSS (MB) | "
              "growth (MB) | Redis used (MB) |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['seconds']} | {r['users_per_s']:,} | "
                     f"{r['rss_after_imports_mb']} | {r['peak_rss_mb']} | {r['growth_mb']} | "
                     f"{r['redis_used_mb']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--history-length", type=int, default=20)
    p.add_argument("--workdir", type=Path, default=Path("artifacts/load_features_scale"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--prepared", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = run(args)
    table = _table(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load_features_scale.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "load_features_scale.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

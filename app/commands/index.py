"""`build-index`, `update-index` and `rollback`: the index store's jobs."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.commands.redis_args import add_redis_auth_args, redis_auth


def add_build_index(sub) -> None:
    p = sub.add_parser("build-index",
                       help="build, gate and publish a Faiss index of a model's items")
    p.add_argument("--model", type=Path, required=True, help="model artifact directory")
    p.add_argument("--out", type=Path, required=True,
                   help="index store: a version dir is added and CURRENT moved to it")
    p.add_argument("--items", type=Path,
                   help="dataset dir or items table (.parquet/.csv) to embed with the item "
                        "tower (default: the embeddings exported with the model)")
    p.add_argument("--data", type=Path,
                   help="dataset whose held-out user events are the recall-gate queries "
                        "(default: item embeddings as queries)")
    p.add_argument("--index", "--factory", dest="index", default="auto",
                   help="'auto' (by item count and --memory-budget) or a Faiss factory "
                        "string: Flat, HNSW32, IVF4096,Flat, IVF4096,SQ8, IVF4096,PQ32, "
                        "IVF4096,PQ32x4fs,Refine(SQ8)")
    _add_search_args(p)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--memory-budget", type=_bytes, default="8GiB",
                   help="for --index auto: bytes the index may take (e.g. 512MiB, 8GiB)")
    _add_gate_args(p)
    _add_publish_args(p)
    p.set_defaults(run=_build_index)


def add_update_index(sub) -> None:
    p = sub.add_parser("update-index", help="add new items and retire removed ones in place "
                       "of a full rebuild; publishes a new version")
    p.add_argument("--store", type=Path, required=True, help="index store with a CURRENT version")
    p.add_argument("--model", type=Path, required=True,
                   help="the model artifact the current index was built from")
    p.add_argument("--items", type=Path, required=True,
                   help="the catalogue now (dataset dir or items table): new ids are added, "
                        "missing ids are tombstoned")
    p.add_argument("--max-tombstone-fraction", type=float, default=0.2,
                   help="above this share of tombstones, rebuild in full instead")
    _add_gate_args(p)
    p.add_argument("--data", type=Path, help="gate queries for a full rebuild (see build-index)")
    _add_publish_args(p)
    p.set_defaults(run=_update_index)


def add_rollback(sub) -> None:
    p = sub.add_parser("rollback", help="point an index store's CURRENT back at an older version")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--to", help="version to make current (default: the newest older version "
                                "built from the same model)")
    p.add_argument("--notify-redis", metavar="URL", help="PUBLISH the change on Redis")
    add_redis_auth_args(p)
    p.set_defaults(run=_rollback)


def _add_search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nprobe", type=int, help="IVF lists searched (default: tuned)")
    p.add_argument("--ef-search", type=int, help="HNSW search breadth (default: tuned)")
    p.add_argument("--k-factor", type=int, help="refine stage: candidates re-scored per result")

def _add_gate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="recall@k against exact search the index must reach to be published")
    p.add_argument("--recall-k", type=int, default=100)
    p.add_argument("--gate-queries", type=int, default=1000)

def _add_publish_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", type=int, default=5, help="versions kept for rollback")
    p.add_argument("--notify-redis", metavar="URL",
                   help="PUBLISH the new version on Redis channel tt:v1:index-published "
                        "(credentials: --redis-password-file / --redis-password-env)")
    add_redis_auth_args(p)

def _bytes(text: str) -> int:
    units = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
    number = text.upper().rstrip("KMGTIB")
    unit = text.upper()[len(number):]
    try:
        return int(float(number) * units[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a size like 512MiB or 8GiB (got {text!r})") \
            from None

def _job_options(args, items: Path | None):
    from indexer.gated_build import GateConfig
    from indexer.job import JobOptions

    gate = GateConfig(target_recall=args.target_recall, k=args.recall_k,
                      gate_queries=args.gate_queries)
    return JobOptions(items=items, data=args.data, gate=gate,
                      memory_budget=getattr(args, "memory_budget", JobOptions.memory_budget),
                      keep=args.keep, notify_url=args.notify_redis,
                      notify_options=_notify_options(args))

def _build_index(args) -> None:
    from indexer.job import run_build_index, spec_from_args

    search = {k: v for k, v in (("nprobe", args.nprobe), ("ef_search", args.ef_search),
                                ("k_factor", args.k_factor)) if v is not None}
    spec = spec_from_args(args.index, args.ef_construction, search)
    print(run_build_index(args.model, args.out, spec, _job_options(args, args.items)))

def _update_index(args) -> None:
    from indexer.update import run_update_index

    print(run_update_index(args.store, args.model, args.items, _job_options(args, args.items),
                           args.max_tombstone_fraction))

def _rollback(args) -> None:
    from indexer.publish import rollback

    print(rollback(args.store, args.to, args.notify_redis, _notify_options(args)).path)

def _notify_options(args) -> dict:
    """Redis client options for --notify-redis; contradictions (a password in the URL and
    in a file, TLS files on redis://) are refused before any work starts."""
    auth = redis_auth(args)
    return auth.client_kwargs(args.notify_redis) if args.notify_redis else {}

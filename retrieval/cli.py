"""The ``two-tower`` command: one subcommand per job, each a thin call into its stage."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from training.errors import TwoTowerError

log = logging.getLogger("two_tower")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args) or 0
    except (TwoTowerError, ValueError, OSError) as exc:
        print(f"two-tower {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="two-tower", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="write the seeded synthetic dataset")
    p.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--interactions-per-user", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    p.set_defaults(run=_generate)

    p = sub.add_parser("convert-movielens", help="MovieLens 100K / 1M → canonical dataset")
    p.add_argument("--kind", choices=("ml-100k", "ml-1m"), required=True)
    p.add_argument("--source", type=Path, required=True, help="folder of the raw files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    p.set_defaults(run=_convert)

    p = sub.add_parser("train", help="train the two towers and write a model artifact")
    p.add_argument("--data", type=Path, required=True, help="dataset directory")
    p.add_argument("--out", type=Path, required=True, help="model store; a version dir is added")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--embedding-dim", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eval", action="store_true",
                   help="train on every interaction; skip the held-out evaluation")
    p.set_defaults(run=_train)

    p = sub.add_parser("build-index", help="build a Faiss index from a model artifact")
    p.add_argument("--model", type=Path, required=True, help="model artifact directory")
    p.add_argument("--out", type=Path, required=True, help="index store; a version dir is added")
    p.add_argument("--factory", default="HNSW32", help="Faiss factory string")
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef-search", type=int, default=256)
    p.set_defaults(run=_build_index)

    p = sub.add_parser("serve", help="run the gRPC retrieval service")
    _add_serve_args(p)
    p.set_defaults(run=_serve)

    p = sub.add_parser("load-features", help="write users' features and histories to Redis")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--history-length", type=int, default=20)
    p.set_defaults(run=_load_features)

    p = sub.add_parser("query", help="call Retrieve on a running server, print a table")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--user-id", required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--event-time", type=int, default=0, help="unix seconds; 0 = now")
    p.add_argument("--recent", action="append", default=[], metavar="ITEM_ID")
    p.add_argument("--exclude", action="append", default=[], metavar="ITEM_ID")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    p.set_defaults(run=_query)

    p = sub.add_parser("demo", help="generate → train → index → serve → query, end to end")
    p.add_argument("--workdir", type=Path, default=Path("demo-run"))
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=5)
    p.set_defaults(run=_demo)
    return parser


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="model artifact directory")
    p.add_argument("--index", type=Path, required=True, help="index artifact directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0 = any free port")
    p.add_argument("--redis-url", help="read user features from Redis (default: in-process)")
    p.add_argument("--features", type=Path,
                   help="dataset directory that fills the in-process feature store")
    p.add_argument("--port-file", type=Path, help="write the bound port here once SERVING")


def _generate(args) -> None:
    from training.dataset import write_dataset
    from training.synthetic import SyntheticConfig, generate_synthetic

    dataset, spec_toml = generate_synthetic(SyntheticConfig(
        num_users=args.users, num_items=args.items,
        interactions_per_user=args.interactions_per_user, seed=args.seed))
    write_dataset(dataset, args.out, spec_toml, args.format)
    log.info("wrote %d interactions, %d users, %d items to %s", dataset.num_interactions,
             args.users, args.items, args.out)


def _convert(args) -> None:
    from training.movielens import main_convert

    main_convert(args.kind, str(args.source), str(args.out), args.format)


def _train(args) -> None:
    from training.dataset import load_dataset
    from training.model import TowerConfig
    from training.pipeline import run_training
    from training.train import TrainConfig

    config = TrainConfig(tower=TowerConfig(embedding_dim=args.embedding_dim), epochs=args.epochs,
                         batch_size=args.batch_size, learning_rate=args.learning_rate,
                         seed=args.seed)
    path, _ = run_training(load_dataset(args.data), args.out, config, evaluate=not args.no_eval)
    print(path)


def _build_index(args) -> None:
    from indexer.build import IndexSpec
    from indexer.job import run_build_index

    spec = IndexSpec(factory=args.factory, ef_construction=args.ef_construction,
                     search={"ef_search": args.ef_search} if "HNSW" in args.factory else {})
    print(run_build_index(args.model, args.out, spec))


def _serve(args) -> None:
    from retrieval.server import ServerConfig, serve

    config = ServerConfig(model_dir=args.model, index_dir=args.index, host=args.host,
                          port=args.port, redis_url=args.redis_url, features_from=args.features)
    asyncio.run(serve(config, args.port_file))


def _load_features(args) -> None:
    from retrieval.feature_store import RedisFeatureStore, users_from_dataset
    from training.dataset import load_dataset

    users = users_from_dataset(load_dataset(args.data), args.history_length)

    async def write() -> None:
        store = RedisFeatureStore.from_url(args.redis_url, history_length=args.history_length)
        try:
            await store.put_users(users)
        finally:
            await store.close()

    asyncio.run(write())
    log.info("wrote features and histories of %d users", len(users))


def _query(args) -> int:
    import grpc

    from retrieval.client import build_request, format_reply, parse_context_arg, retrieve

    context = dict(parse_context_arg(c) for c in args.context)
    request = build_request(args.user_id, args.k, context, args.event_time, args.recent,
                            args.exclude)

    async def call():
        async with grpc.aio.insecure_channel(args.address) as channel:
            return await retrieve(channel, request, args.timeout)

    try:
        reply = asyncio.run(call())
    except grpc.aio.AioRpcError as exc:
        print(f"two-tower query: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(format_reply(reply))
    return 0


def _demo(args) -> int:
    from retrieval.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(workdir=args.workdir, users=args.users, items=args.items,
                               epochs=args.epochs))


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``two-tower`` command: one subcommand per job, each a thin call into its stage."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from retrieval.logs import configure_logging
from training.errors import TwoTowerError

log = logging.getLogger("two_tower")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_format)
    try:
        return args.run(args) or 0
    except (TwoTowerError, ValueError, OSError) as exc:
        print(f"two-tower {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="two-tower", description=__doc__)
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="json: one JSON object per log line (before the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="write the seeded synthetic dataset")
    p.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--interactions-per-user", type=int, default=30)
    p.add_argument("--clusters", type=int, default=10,
                   help="taste clusters (users watch within theirs; items belong to one)")
    p.add_argument("--content-dims", type=int, default=0,
                   help="dense numeric content features per item (content0 …): cold items "
                        "then differ by their features, as in a real catalogue")
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
    p.add_argument("--learning-rate-schedule", choices=("constant", "cosine"),
                   default="constant", help="cosine: decay to 0 over all epochs")
    p.add_argument("--embedding-dim", type=int, default=32)
    p.add_argument("--hidden-dims", default="64", help="comma-separated MLP widths; '' = none")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="L2-normalise tower outputs (scores are cosines); "
                        "--no-normalize trains raw inner products")
    p.add_argument("--history-dropout", type=float, default=0.0,
                   help="share of history items dropped per example, in training only")
    p.add_argument("--embedding-l2", type=float, default=0.0,
                   help="L2 penalty on the embedding tables")
    p.add_argument("--logq", choices=("none", "exact", "streaming"), default="exact",
                   help="sampling-bias correction of the softmax")
    p.add_argument("--corpus-negatives", type=int, default=0,
                   help="extra negatives per batch drawn from the whole catalogue")
    p.add_argument("--corpus-distribution", choices=("uniform", "unigram", "full"),
                   default="unigram",
                   help="how corpus negatives are drawn; full = every item in every batch "
                        "(with --corpus-negatives 0)")
    p.add_argument("--temperature", type=float, default=0.05,
                   help="logits are scores / T (use about 1 with --no-normalize)")
    p.add_argument("--hard-negatives", type=int, default=0, help="0 = every negative counts")
    p.add_argument("--keep-accidental-hits", action="store_true",
                   help="do not mask negatives equal to the positive")
    p.add_argument("--checkpoint-dir", help="save each epoch here and resume from it")
    p.add_argument("--tensorboard-dir", help="write TensorBoard logs here")
    p.add_argument("--early-stopping-patience", type=int, default=0,
                   help="stop after this many epochs without validation NDCG@10 gain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eval", action="store_true",
                   help="train on every interaction; skip the held-out evaluation")
    p.set_defaults(run=_train)

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

    p = sub.add_parser("rollback", help="point an index store's CURRENT back at an older version")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--to", help="version to make current (default: the newest older version "
                                "built from the same model)")
    p.add_argument("--notify-redis", metavar="URL", help="PUBLISH the change on Redis")
    _add_redis_auth_args(p)
    p.set_defaults(run=_rollback)

    p = sub.add_parser("serve", help="run the gRPC retrieval service")
    _add_serve_args(p)
    p.set_defaults(run=_serve)

    p = sub.add_parser("load-features", help="write users' features and histories to Redis")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--history-length", type=int, default=20)
    _add_redis_auth_args(p)
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
    _add_client_security_args(p)
    p.set_defaults(run=_query)

    p = sub.add_parser("demo", help="generate → train → index → serve → query, end to end")
    p.add_argument("--workdir", type=Path, default=Path("demo-run"))
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=5)
    p.set_defaults(run=_demo)
    return parser


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True,
                   help="model version dir (pinned) or model store (the version the index names)")
    p.add_argument("--index", type=Path, required=True,
                   help="index version dir (pinned) or index store (its CURRENT, watched)")
    p.add_argument("--watch-interval", type=float, default=2.0,
                   help="seconds between checks of the index pointer; 0 = never swap")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0 = any free port")
    p.add_argument("--redis-url", help="read user features from Redis (default: in-process)")
    p.add_argument("--features", type=Path,
                   help="dataset directory that fills the in-process feature store")
    p.add_argument("--port-file", type=Path,
                   help="write the bound port (and the metrics port) here once SERVING")
    p.add_argument("--metrics-port", type=int,
                   help="serve Prometheus /metrics over HTTP on this port (0 = any free port)")
    p.add_argument("--user-tower", choices=("auto", "numpy", "savedmodel"), default="auto",
                   help="how the user tower runs online (auto: NumPy when the artifact has it)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="requests gathered into one tower + ANN call")
    p.add_argument("--max-wait-us", type=int, default=0,
                   help="how long the first request of a batch may wait for others")
    _add_serve_security_args(p)
    _add_redis_auth_args(p)
    p.add_argument("--max-queue", type=int, default=2048,
                   help="requests waiting for the compute thread; beyond, RESOURCE_EXHAUSTED")
    p.add_argument("--redis-timeout-ms", type=float, default=30.0,
                   help="bound on connecting to Redis and on each reply of a batch's user "
                        "read; past it the batch's replies are degraded (cold start, "
                        "degraded=true), and writes fail with UNAVAILABLE")
    p.add_argument("--breaker-failures", type=int, default=3,
                   help="consecutive failed Redis reads (one a batch) that open the breaker")
    p.add_argument("--breaker-cool-down-ms", type=float, default=500.0,
                   help="how long the open breaker skips Redis before one probe call")
    p.add_argument("--max-message-bytes", type=int, default=4 << 20,
                   help="largest request message accepted (larger: RESOURCE_EXHAUSTED)")
    p.add_argument("--faiss-threads", type=int, default=None,
                   help="OpenMP threads of one batched Faiss search (waiting passively); "
                        "default 2, or 1 on a single usable core")
    p.add_argument("--gil-switch-interval-us", type=int, default=5000,
                   help="how long a Python thread may hold the GIL while another waits "
                        "(sys.setswitchinterval); the compute thread waits this long at worst")
    p.add_argument("--grace-seconds", type=float, default=5.0,
                   help="on SIGTERM, how long in-flight calls may take to finish")


def _add_serve_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", type=Path, metavar="FILE",
                   help="PEM certificate chain of the server; with --tls-key the port is TLS-only")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, metavar="FILE",
                   help="PEM CA(s): clients must present a certificate they signed (mutual TLS)")
    p.add_argument("--auth-tokens-file", type=Path, metavar="FILE",
                   help="bearer tokens, one per line ('token' or 'name:token'); every call "
                        "but grpc.health.v1 then needs 'authorization: Bearer <token>'")
    p.add_argument("--auth-tokens-env", metavar="VAR",
                   help="as --auth-tokens-file, from this environment variable")


def _add_redis_auth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-username", metavar="NAME", help="Redis ACL user (default: default)")
    p.add_argument("--redis-password-file", type=Path, metavar="FILE",
                   help="file holding the Redis password (kept off the command line)")
    p.add_argument("--redis-password-env", metavar="VAR",
                   help="environment variable holding the Redis password")
    p.add_argument("--redis-tls-ca", type=Path, metavar="FILE",
                   help="rediss:// only: PEM CA of the Redis server's certificate")
    p.add_argument("--redis-tls-cert", type=Path, metavar="FILE",
                   help="rediss:// only: client certificate, when Redis asks for one")
    p.add_argument("--redis-tls-key", type=Path, metavar="FILE", help="key of --redis-tls-cert")


def _add_client_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls", action="store_true",
                   help="TLS, trusting the system's CAs (implied by the other --tls-* flags)")
    p.add_argument("--tls-ca", type=Path, metavar="FILE", help="PEM CA of the server's certificate")
    p.add_argument("--tls-cert", type=Path, metavar="FILE",
                   help="PEM client certificate, for a server that asks for one (mutual TLS)")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--tls-server-name", metavar="NAME",
                   help="name to check the server's certificate against (default: the host)")
    p.add_argument("--token-file", type=Path, metavar="FILE", help="file holding a bearer token")
    p.add_argument("--token-env", metavar="VAR", default="TWO_TOWER_TOKEN",
                   help="environment variable holding a bearer token, used when set "
                        "(default: TWO_TOWER_TOKEN)")


def _serve_security(args) -> dict:
    from retrieval.security import SecurityConfigError, TlsConfig, TokenSet

    if (args.tls_cert is None) != (args.tls_key is None):
        raise SecurityConfigError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    if args.auth_tokens_file is not None and args.auth_tokens_env is not None:
        raise SecurityConfigError("pass one of --auth-tokens-file and --auth-tokens-env")
    tls = (TlsConfig.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)
           if args.tls_cert else None)
    auth = (TokenSet.from_file(args.auth_tokens_file) if args.auth_tokens_file else
            TokenSet.from_env(args.auth_tokens_env) if args.auth_tokens_env else None)
    redis_auth = _redis_auth(args)
    if args.redis_url:
        redis_auth.client_kwargs(args.redis_url)  # contradictions are refused before loading
    return {"tls": tls, "auth": auth, "redis_auth": redis_auth}


def _redis_auth(args):
    from retrieval.redis_options import RedisAuth

    return RedisAuth.from_sources(args.redis_username, args.redis_password_file,
                                  args.redis_password_env, args.redis_tls_ca,
                                  args.redis_tls_cert, args.redis_tls_key)


def _client_channel(args):
    from retrieval.client import open_channel
    from retrieval.security import ClientTls, read_token

    wants_tls = args.tls or any((args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name))
    tls = ClientTls.from_files(args.tls_ca, args.tls_cert, args.tls_key,
                               args.tls_server_name) if wants_tls else None
    token = read_token(args.token_file) if args.token_file else (
        read_token(variable=args.token_env) if os.environ.get(args.token_env) else None)
    return open_channel(args.address, tls, token)


def _generate(args) -> None:
    from training.dataset import write_dataset
    from training.synthetic import SyntheticConfig, generate_synthetic

    dataset, spec_toml = generate_synthetic(SyntheticConfig(
        num_users=args.users, num_items=args.items,
        num_clusters=args.clusters,
        interactions_per_user=args.interactions_per_user, seed=args.seed,
        content_dims=args.content_dims))
    write_dataset(dataset, args.out, spec_toml, args.format)
    log.info("wrote %d interactions, %d users, %d items to %s", dataset.num_interactions,
             args.users, args.items, args.out)


def _convert(args) -> None:
    from training.movielens import main_convert

    main_convert(args.kind, str(args.source), str(args.out), args.format)


def _train(args) -> None:
    from training.dataset import load_dataset
    from training.model import LossConfig, TowerConfig
    from training.pipeline import run_training
    from training.train import TrainConfig

    hidden = tuple(int(w) for w in args.hidden_dims.split(",") if w.strip())
    config = TrainConfig(
        tower=TowerConfig(embedding_dim=args.embedding_dim, hidden_dims=hidden,
                          normalize=args.normalize, history_dropout=args.history_dropout,
                          embedding_l2=args.embedding_l2),
        loss=LossConfig(logq=args.logq, corpus_negatives=args.corpus_negatives,
                        corpus_distribution=args.corpus_distribution,
                        temperature=args.temperature, hard_negatives=args.hard_negatives,
                        remove_accidental_hits=not args.keep_accidental_hits),
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        learning_rate_schedule=args.learning_rate_schedule,
        seed=args.seed, checkpoint_dir=args.checkpoint_dir, tensorboard_dir=args.tensorboard_dir,
        early_stopping_patience=args.early_stopping_patience)
    path, _ = run_training(load_dataset(args.data), args.out, config, evaluate=not args.no_eval)
    print(path)


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
    _add_redis_auth_args(p)


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
    auth = _redis_auth(args)
    return auth.client_kwargs(args.notify_redis) if args.notify_redis else {}


def _serve(args) -> None:
    # Before Faiss loads libgomp: idle OpenMP workers sleep instead of spinning on the
    # cores the event loop and the compute thread need.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from retrieval.circuit_breaker import BreakerConfig
    from retrieval.retriever import BatchingConfig, default_faiss_threads
    from retrieval.server import ServerConfig, serve

    config = ServerConfig(model_dir=args.model, index_dir=args.index, host=args.host,
                          **_serve_security(args),
                          port=args.port, redis_url=args.redis_url, features_from=args.features,
                          metrics_port=args.metrics_port,
                          batching=BatchingConfig(max_batch=args.max_batch,
                                                  max_wait_us=args.max_wait_us,
                                                  max_queue=args.max_queue,
                                                  faiss_threads=(
                                                      default_faiss_threads()
                                                      if args.faiss_threads is None
                                                      else args.faiss_threads)),
                          user_tower=args.user_tower,
                          watch_interval_s=args.watch_interval or None,
                          redis_timeout_s=args.redis_timeout_ms / 1000,
                          breaker=BreakerConfig(args.breaker_failures,
                                                args.breaker_cool_down_ms / 1000),
                          max_message_bytes=args.max_message_bytes,
                          gil_switch_interval_s=args.gil_switch_interval_us / 1e6,
                          grace_seconds=args.grace_seconds)
    asyncio.run(serve(config, args.port_file))


def _load_features(args) -> None:
    from retrieval.feature_store import RedisFeatureStore, users_from_dataset
    from training.dataset import load_dataset

    users = users_from_dataset(load_dataset(args.data), args.history_length)

    async def write() -> None:
        store = RedisFeatureStore.from_url(
            args.redis_url, history_length=args.history_length,
            client_options=_redis_auth(args).client_kwargs(args.redis_url))
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
        async with _client_channel(args) as channel:
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

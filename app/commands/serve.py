"""`serve`, `load-features` and `query`: run the service, fill its feature store, call it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from app.commands.redis_args import add_redis_auth_args, redis_auth

log = logging.getLogger("two_tower")


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC retrieval service")
    _add_serve_args(p)
    p.set_defaults(run=_serve)


def add_load_features(sub) -> None:
    p = sub.add_parser("load-features", help="write users' features and histories to Redis")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path,
                        help="canonical dataset directory (users and interactions, in memory)")
    source.add_argument("--prepared", type=Path,
                        help="prepared output: its users/*.parquet, streamed a batch at a time")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--history-length", type=int, default=20)
    p.add_argument("--seen-items-cap", type=int, default=10_000,
                   help="items kept in a user's seen set (exclude_seen), the oldest dropped "
                        "first; the server's --seen-items-cap should match")
    p.add_argument("--batch-size", type=int, default=1000,
                   help="users (and 10x as many interactions) written per pipelined round "
                        "trip (MULTI/EXEC)")
    add_redis_auth_args(p)
    p.set_defaults(run=_load_features)


def add_query(sub) -> None:
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


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True,
                   help="model version dir (pinned) or model store (the version the index names)")
    p.add_argument("--index", type=Path, required=True,
                   help="index version dir (pinned) or index store (its CURRENT, watched)")
    p.add_argument("--watch-interval", type=float, default=2.0,
                   help="seconds between checks of the index pointer; 0 = never swap")
    p.add_argument("--watch-unready-after", type=float, default=0.0, metavar="SECONDS",
                   help="report NOT_SERVING after this long without a successful check of "
                        "the index pointer (unreadable, refused, stalled); 0 = never")
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
    add_redis_auth_args(p)
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
    p.add_argument("--overlap-reads", action="store_true",
                   help="read a batch's users from the store in a second thread while the "
                        "batch before it computes: for a store whose round trip is near a "
                        "batch's compute time; one thread does both by default")
    p.add_argument("--faiss-threads", type=int, default=None,
                   help="OpenMP threads of one batched Faiss search (waiting passively); "
                        "default 2, or 1 on a single usable core")
    p.add_argument("--gil-switch-interval-us", type=int, default=5000,
                   help="how long a Python thread may hold the GIL while another waits "
                        "(sys.setswitchinterval); the compute thread waits this long at worst")
    p.add_argument("--max-streams-per-connection", type=int, default=1000,
                   help="calls one connection may have open at once (HTTP/2 "
                        "MAX_CONCURRENT_STREAMS); more are refused; 0 = no limit")
    p.add_argument("--max-concurrent-rpcs", type=int, default=2000,
                   help="calls in progress on all connections together; more get "
                        "RESOURCE_EXHAUSTED; 0 = no limit")
    p.add_argument("--max-connection-age-seconds", type=float, default=300.0,
                   help="a connection is asked to close (GOAWAY) after this long; clients "
                        "reconnect; 0 = never")
    p.add_argument("--max-connection-age-grace-seconds", type=float, default=10.0,
                   help="then its calls have this long to finish before it is closed: "
                        "a reply nobody reads is held at most age + grace")
    p.add_argument("--seen-items-cap", type=int, default=10_000,
                   help="items kept in a user's seen set, what exclude_seen drops (every "
                        "interaction, the oldest dropped first past it); both stores")
    p.add_argument("--store-max-users", type=int, default=500_000,
                   help="in-process store: most users held, preloaded (--features, never "
                        "evicted) and recorded; past it the least recently used recorded "
                        "user is evicted (~0.6 KiB a user)")
    p.add_argument("--history-ttl-seconds", type=int, default=90 * 86400,
                   help="a history that receives no event for this long expires (Redis "
                        "EXPIRE; in-process: the recorded user is dropped); 0 = never")
    p.add_argument("--grace-seconds", type=float, default=5.0,
                   help="on SIGTERM, how long in-flight calls may take to finish")
    p.add_argument("--cpu-affinity", default="off", metavar="off|auto|LIST",
                   help="run each worker's threads on CPUs of its own: auto = this "
                        "process's CPUs split among the workers (not under a CPU quota "
                        "narrower than them: a shared pool), or a list such as 0,2-3; "
                        "off = wherever the kernel puts them (retrieval.cpus)")
    p.add_argument("--workers", type=int, default=None,
                   help="serving processes on the one port, each with its own GIL "
                        "(retrieval.workers); default: the usable cores with --redis-url, "
                        "1 with the in-process feature store; 1 = a single process")

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
    redis = redis_auth(args)
    if args.redis_url:
        redis.client_kwargs(args.redis_url)  # contradictions are refused before loading
    return {"tls": tls, "auth": auth, "redis_auth": redis}

def _client_channel(args):
    from retrieval.client import open_channel
    from retrieval.security import ClientTls, read_token

    wants_tls = args.tls or any((args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name))
    tls = ClientTls.from_files(args.tls_ca, args.tls_cert, args.tls_key,
                               args.tls_server_name) if wants_tls else None
    token = read_token(args.token_file) if args.token_file else (
        read_token(variable=args.token_env) if os.environ.get(args.token_env) else None)
    return open_channel(args.address, tls, token)

def _workers(args) -> int:
    """--workers, or its default; more than one needs Redis: each in-process store would be
    one worker's alone, and a history recorded by one unseen by the others."""
    from retrieval.cpus import usable_cores

    if args.workers is None:
        return usable_cores() if args.redis_url else 1
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1 (got {args.workers})")
    if args.workers > 1 and not args.redis_url:
        raise ValueError(f"--workers {args.workers} needs --redis-url: the in-process feature "
                         "store is one per process, so a history recorded by one worker "
                         "would be unseen by the others")
    return args.workers

def _serve(args) -> int | None:
    # Before Faiss loads libgomp: idle OpenMP workers sleep instead of spinning on the
    # cores the event loop and the compute thread need.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Before NumPy loads OpenBLAS: the user tower's products are a few rows by ~100 columns,
    # where a second BLAS thread only costs a wake-up and a spin (measured at load 7-10:
    # 1,475 µs a user for a two-block sequence tower at batch 32 against 175 with one
    # thread; benchmarks/sequence_tower.py). The serving threads are the parallelism.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from retrieval.circuit_breaker import BreakerConfig
    from retrieval.cpus import place_workers
    from retrieval.retriever import BatchingConfig, default_faiss_threads
    from retrieval.server import ServerConfig, StreamLimits, serve

    workers = _workers(args)
    try:
        placement = place_workers(args.cpu_affinity, workers)
    except ValueError as exc:
        raise ValueError(f"--cpu-affinity: {exc}") from None
    fewest_cpus = min(placement, key=len) if placement else None

    config = ServerConfig(model_dir=args.model, index_dir=args.index, host=args.host,
                          **_serve_security(args),
                          port=args.port, redis_url=args.redis_url, features_from=args.features,
                          metrics_port=args.metrics_port,
                          batching=BatchingConfig(max_batch=args.max_batch,
                                                  max_wait_us=args.max_wait_us,
                                                  max_queue=args.max_queue,
                                                  overlap_reads=args.overlap_reads,
                                                  faiss_threads=(
                                                      default_faiss_threads(fewest_cpus)
                                                      if args.faiss_threads is None
                                                      else args.faiss_threads)),
                          user_tower=args.user_tower,
                          watch_interval_s=args.watch_interval or None,
                          watch_unready_after_s=args.watch_unready_after or None,
                          redis_timeout_s=args.redis_timeout_ms / 1000,
                          breaker=BreakerConfig(args.breaker_failures,
                                                args.breaker_cool_down_ms / 1000),
                          max_message_bytes=args.max_message_bytes,
                          gil_switch_interval_s=args.gil_switch_interval_us / 1e6,
                          store_max_users=args.store_max_users,
                          seen_items_cap=args.seen_items_cap,
                          streams=StreamLimits(args.max_streams_per_connection or None,
                                               args.max_concurrent_rpcs or None,
                                               args.max_connection_age_seconds or None,
                                               args.max_connection_age_grace_seconds),
                          history_ttl_s=args.history_ttl_seconds or None,
                          grace_seconds=args.grace_seconds,
                          cpus=placement[0] if placement and workers == 1 else None)
    if workers > 1:
        from retrieval.workers import SupervisorConfig, exec_supervisor

        # the supervisor replaces this process: it keeps none of what was imported here
        exec_supervisor(config, SupervisorConfig(workers, log_format=args.log_format,
                                                 placement=placement or ()),
                        args.port_file)
    asyncio.run(serve(config, args.port_file))
    return None

def _load_features(args) -> None:
    if args.prepared is not None:
        return _load_prepared_features(args)
    from contracts.dataset import load_dataset
    from retrieval.feature_store import RedisFeatureStore, users_from_dataset
    from retrieval.seen_items import iter_dataset_seen

    dataset = load_dataset(args.data)
    users = users_from_dataset(dataset, args.history_length)

    async def write() -> int:
        store = RedisFeatureStore.from_url(
            args.redis_url, history_length=args.history_length, batch_size=args.batch_size,
            client_options=redis_auth(args).client_kwargs(args.redis_url),
            seen_items_cap=args.seen_items_cap)
        try:
            await store.put_users(users)
            seen = 0
            for events in iter_dataset_seen(dataset, 10 * args.batch_size):
                await store.add_seen(events)
                seen += len(events)
            return seen
        finally:
            await store.close()

    seen = asyncio.run(write())
    log.info("wrote features and histories of %d users, and %d interactions to their seen "
             "sets", len(users), seen)


PROGRESS_EVERY_S = 5.0
LOAD_TIMEOUT_S = 5.0  # a bulk write of a batch, not a request's read: no 0.25 s deadline


def _load_prepared_features(args) -> None:
    """Stream users/*.parquet of a prepared output into Redis: one record batch of
    --batch-size users in memory, written in one MULTI/EXEC round trip; rate in the log."""
    import time

    import pyarrow as pa

    from retrieval.feature_store import RedisFeatureStore
    from retrieval.prepared_users import (iter_seen_batches, iter_user_batches,
                                          open_prepared_users)

    users = open_prepared_users(args.prepared)
    if users.history_length < args.history_length:
        log.warning("%s holds histories of at most %d items (--history-length %d)",
                    args.prepared, users.history_length, args.history_length)
    store = RedisFeatureStore.from_url(
        args.redis_url, history_length=args.history_length, timeout_s=LOAD_TIMEOUT_S,
        client_options=redis_auth(args).client_kwargs(args.redis_url),
        seen_items_cap=args.seen_items_cap)
    written, seen, start = 0, 0, time.monotonic()
    reported, pool = start, pa.default_memory_pool()
    # Arrow's default pool (mimalloc) keeps what each batch freed: 45 MB of growth over
    # 50,000 users against 15 MB with the system allocator (benchmarks.load_features_scale)
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        for batch in iter_user_batches(users, args.batch_size):
            store.write_batch(batch)
            written += len(batch)
            if time.monotonic() - reported >= PROGRESS_EVERY_S:
                reported = time.monotonic()
                log.info("load-features: %d of %d users written, %.0f users/s", written,
                         users.rows, written / (reported - start))
        # after the users: writing a user clears its seen set, which the splits then fill
        for events in iter_seen_batches(users, 10 * args.batch_size):
            store.write_seen_batch(events)
            seen += len(events)
    finally:
        pa.set_memory_pool(pool)
        asyncio.run(store.close())
    seconds = time.monotonic() - start
    log.info("wrote features and histories of %d users from %s in %.1f s (%.0f users/s)",
             written, args.prepared, seconds, written / max(seconds, 1e-9))
    log.info("wrote %d interactions to the users' seen sets (exclude_seen)", seen)

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

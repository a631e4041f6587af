"""The server factory: gRPC service, health, reflection, error boundary, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from retrieval import long_lived
from retrieval.circuit_breaker import BreakerConfig
from retrieval.cpus import pin_process
from retrieval.feature_store import (
    DEFAULT_MAX_USERS, FeatureStore, InMemoryFeatureStore, RedisFeatureStore,
    users_from_dataset,
)
from retrieval.logs import fold_unsent_replies
from retrieval.metrics import ServiceMetrics
from retrieval.pair import load_pair
from retrieval.query import Limits
from retrieval.redis_options import RedisAuth
from retrieval.seen_items import DEFAULT_SEEN_ITEMS_CAP, check_cap, iter_dataset_seen
from retrieval.retriever import BatchingConfig, Retriever
from retrieval.security import AuthInterceptor, TlsConfig, TokenSet
from retrieval.swap import PairWatcher, resolve_pair_dirs, start_watching, stop_watching
from retrieval.servicer import ErrorBoundary, RetrievalServicer, add_to_server
from retrieval.signals import stop_signalled
from retrieval.v1 import retrieval_pb2 as pb

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RetrievalService"].full_name


@dataclass(frozen=True)
class StreamLimits:
    """What callers may hold open: streams that are never read pin their replies in the
    server (about 50 KB each for a k=1000 Retrieve), so their number and lifetime are
    bounded. None: gRPC's default (no limit)."""

    # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; more are refused (RST_STREAM). Not lower: a
    # grpc.aio client that opens a channel with a burst of calls does not wait for this
    # setting; at 100, 587 of a burst of 800 failed with UNAVAILABLE.
    per_connection: int | None = 1000
    # Calls in progress on all connections; more get RESOURCE_EXHAUSTED. Twice the above,
    # so that one connection cannot take every slot.
    total: int | None = 2000
    # A connection is sent GOAWAY after this long, and closed, cancelling what it still
    # holds, ``connection_age_grace_s`` later: a held stream pins memory for at most both.
    connection_age_s: float | None = 300.0
    connection_age_grace_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("per_connection", "total"):
            n = getattr(self, name)
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"{name} streams must be an integer >= 1 or None (got {n!r})")
        for name in ("connection_age_s", "connection_age_grace_s"):
            t = getattr(self, name)
            if t is None and name == "connection_age_s":
                continue
            if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 2592000:
                raise ValueError(f"{name} must be in (0, 2592000] seconds (got {t!r})")

    def options(self) -> list[tuple[str, int]]:
        options = []
        if self.per_connection is not None:
            options.append(("grpc.max_concurrent_streams", self.per_connection))
        if self.connection_age_s is not None:
            options += [("grpc.max_connection_age_ms", int(self.connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms",
                         int(self.connection_age_grace_s * 1000))]
        return options


@dataclass(frozen=True)
class ServerConfig:
    model_dir: Path
    index_dir: Path
    host: str = "127.0.0.1"
    port: int = 50051          # 0: any free port (the bound port is returned)
    redis_url: str | None = None
    features_from: Path | None = None  # dataset dir that fills the in-process store
    history_length: int = 20
    history_ttl_s: int | None = 90 * 86400  # a history without events expires; None: never
    store_max_users: int = DEFAULT_MAX_USERS  # in-process store: preloaded + recorded users
    seen_items_cap: int = DEFAULT_SEEN_ITEMS_CAP  # a user's seen set (exclude_seen), both stores
    grace_seconds: float = 5.0
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; 0: any free port
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    user_tower: str = "auto"  # auto | numpy | savedmodel (retrieval.pair.load_user_tower)
    watch_interval_s: float | None = 2.0  # poll the index pointer; None: never swap
    # NOT_SERVING after this long without a successful check of the pointer; None: never
    watch_unready_after_s: float | None = None
    limits: Limits = field(default_factory=Limits)
    tls: TlsConfig | None = None  # set: the port is TLS-only (mutual with a client CA)
    auth: TokenSet | None = None  # set: every call but grpc.health.v1 needs a token
    redis_auth: RedisAuth = field(default_factory=RedisAuth)  # user, password, TLS
    # Redis: bound on one user read (connect + reply); past it the reply is degraded.
    redis_timeout_s: float = 0.03
    breaker: BreakerConfig = field(default_factory=BreakerConfig)  # when to stop asking Redis
    max_message_bytes: int = 4 << 20  # largest request accepted (gRPC's own default)
    streams: StreamLimits = field(default_factory=StreamLimits)
    # sys.setswitchinterval: the longest the compute thread waits for the GIL after Faiss
    # returns while the event loop holds it (Python's default is 5 ms).
    gil_switch_interval_s: float = 0.005
    # Set by retrieval.workers for a worker of `serve --workers N`: its index (0 … N-1). A
    # worker shares the port with the others (SO_REUSEPORT) and binds it only once loaded,
    # so the kernel never hands a connection to a worker that cannot answer yet.
    worker: int | None = None
    # The CPUs every thread of this process runs on (retrieval.cpus: serve --cpu-affinity);
    # None: wherever the kernel puts them.
    cpus: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        c = self.cpus
        if c is not None and (not isinstance(c, tuple) or not c or not all(
                isinstance(cpu, int) and not isinstance(cpu, bool) and cpu >= 0 for cpu in c)):
            raise ValueError(f"cpus must be a non-empty tuple of CPU numbers or None "
                             f"(got {c!r:.60})")
        t = self.redis_timeout_s
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 60:
            raise ValueError(f"redis_timeout_s must be in (0, 60] seconds (got {t!r})")
        m = self.max_message_bytes
        if isinstance(m, bool) or not isinstance(m, int) or not 64 << 10 <= m <= 1 << 30:
            raise ValueError(f"max_message_bytes must be an integer in [65536, 2**30] "
                             f"(got {m!r})")
        u = self.store_max_users
        if isinstance(u, bool) or not isinstance(u, int) or u < 1:
            raise ValueError(f"store_max_users must be an integer >= 1 (got {u!r})")
        check_cap(self.seen_items_cap)
        h = self.history_ttl_s
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ValueError(f"history_ttl_s must be an integer >= 1 or None (got {h!r})")
        g = self.gil_switch_interval_s
        if isinstance(g, bool) or not isinstance(g, int | float) or not 1e-5 <= g <= 0.1:
            raise ValueError(f"gil_switch_interval_s must be in [1e-5, 0.1] seconds (got {g!r})")


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    retriever: Retriever
    health: health.aio.HealthServicer
    metrics_port: int | None = None
    watch_task: asyncio.Task | None = None
    refresh_task: asyncio.Task | None = None

    async def load(self, config: ServerConfig,
                   before_ready: Callable[[], None] | None = None) -> None:
        """Load the model/index pair (off the event loop), then report SERVING and start
        watching the index pointer for new versions; ``before_ready`` runs just before
        SERVING (``serve``: freezing the loaded heap, a pause of its own)."""
        model_dir, index_dir = await asyncio.to_thread(resolve_pair_dirs, config.model_dir,
                                                       config.index_dir)
        pair = await asyncio.to_thread(load_pair, model_dir, index_dir, config.user_tower)
        await self.retriever.store.ping()
        self.retriever.set_pair(pair)
        if config.watch_interval_s:
            watcher = PairWatcher(self.retriever, config.model_dir, config.index_dir,
                                  config.user_tower, config.watch_interval_s, index_dir,
                                  config.watch_unready_after_s, self.set_ready)
            self.watch_task = start_watching(watcher)
        if before_ready is not None:
            before_ready()
        await self.set_ready(True)

    async def set_ready(self, ready: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if ready
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def listen(self, config: ServerConfig) -> None:
        """Bind the port and start answering on it."""
        self.port = _bind(self.server, config)
        if self.port == 0:
            raise OSError(f"cannot bind {config.host}:{config.port}")
        await self.server.start()
        worker = "" if config.worker is None else f"worker {config.worker} (pid {os.getpid()}) "
        log.info("%slistening on %s:%d, %s", worker, config.host, self.port, _security(config))

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()  # NOT_SERVING first, so probes move away
        if self.watch_task is not None:
            stop_watching(self.watch_task)
        if self.refresh_task is not None:
            self.refresh_task.cancel()
        await self.server.stop(grace)
        await self.retriever.close()
        await self.retriever.store.close()


async def create_server(config: ServerConfig) -> RunningServer:
    """Build and start the server, NOT_SERVING until ``RunningServer.load``. A worker of
    ``serve --workers`` is built but not bound: ``listen`` once loaded."""
    import faiss

    faiss.omp_set_num_threads(config.batching.faiss_threads)
    metrics = ServiceMetrics(config.worker)
    retriever = Retriever(await _feature_store(config, metrics), config.limits,
                          config.history_ttl_s, metrics, config.batching, config.breaker)
    fold_unsent_replies(metrics.unsent_replies.inc)
    server = grpc.aio.server(interceptors=_interceptors(config, metrics), options=[
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Explicit although grpcio sets it on Linux: workers of one host share the port.
        ("grpc.so_reuseport", 1),
        *config.streams.options()], maximum_concurrent_rpcs=config.streams.total)
    # every service registers through the boundary, so each of its unary methods is
    # wrapped once (statuses, counts, timing) rather than intercepted on every call
    boundary = ErrorBoundary(server, metrics)
    add_to_server(RetrievalServicer(retriever), boundary)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, boundary)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)  # streaming only: the boundary wraps no method of it
    running = RunningServer(server, 0, retriever, health_servicer)
    running.refresh_task = asyncio.create_task(_refresh(metrics), name="metrics-refresh")
    if config.worker is not None:
        return running
    await running.listen(config)
    log.info("NOT_SERVING until the model and index are loaded")
    if config.metrics_port is not None:
        running.metrics_port = metrics.serve_http(config.host, config.metrics_port)
        log.info("metrics on http://%s:%d/metrics", config.host, running.metrics_port)
    return running


async def _refresh(metrics: ServiceMetrics, every_s: float = 1.0) -> None:
    """The CPU by thread, and in multiprocess mode (where the scrape reads files) the
    computed gauges, written once a second, in a thread of the default executor: reading
    /proc for each of the process's ~15 threads takes 0.8 ms, which on the event loop
    held every call that arrived meanwhile (loop lag p99 1.5-1.7 against 0.9-1.0 ms with
    the refresh 20 times a second, docs/serving-history.md "Stop 23")."""
    while True:
        try:
            await asyncio.to_thread(metrics.refresh)
        except Exception:  # a gauge's bug must not end the refreshes
            log.exception("refreshing the computed metrics failed; trying again")
        await asyncio.sleep(every_s)


def _interceptors(config: ServerConfig, metrics: ServiceMetrics) -> list:
    """Only the token check runs on every call, and only when tokens are configured (its
    refusals are counted by code too: retrieval.security)."""
    return [] if config.auth is None else [AuthInterceptor(config.auth, metrics)]


def _bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    """One port: TLS-only when TLS is configured, plaintext otherwise; never both."""
    address = f"{config.host}:{config.port}"
    if config.tls is not None:
        return server.add_secure_port(address, config.tls.server_credentials())
    if config.auth is not None:
        log.warning("bearer tokens without TLS can be read on the network; pass --tls-cert "
                    "and --tls-key unless a proxy or mesh encrypts the connection")
    return server.add_insecure_port(address)


def _security(config: ServerConfig) -> str:
    tls = "plaintext" if config.tls is None else "mutual TLS" if config.tls.mutual else "TLS"
    if config.auth is None:
        return f"{tls}, no token needed"
    return f"{tls}, {len(config.auth.names)} bearer token(s), none needed for grpc.health.v1"


def _redis_options(config: ServerConfig) -> dict:
    return config.redis_auth.client_kwargs(config.redis_url or "")


async def _feature_store(config: ServerConfig, metrics: ServiceMetrics) -> FeatureStore:
    if config.redis_url:
        return RedisFeatureStore.from_url(config.redis_url, client_options=_redis_options(config),
                                          history_length=config.history_length,
                                          timeout_s=config.redis_timeout_s,
                                          seen_items_cap=config.seen_items_cap)
    store = InMemoryFeatureStore(history_length=config.history_length,
                                 max_users=config.store_max_users,
                                 seen_items_cap=config.seen_items_cap,
                                 on_evict=metrics.count_store_evictions)
    metrics.watch_store_size(store.__len__)
    if config.features_from is not None:
        from contracts.dataset import load_dataset

        dataset = await asyncio.to_thread(load_dataset, config.features_from)
        await store.put_users(users_from_dataset(dataset, config.history_length))
        for events in iter_dataset_seen(dataset):  # every interaction: exclude_seen
            await store.add_seen(events)
    room = store.max_users - store.preloaded
    ttl = f"{config.history_ttl_s} s" if config.history_ttl_s else "never"
    log.log(logging.WARNING if room < store.max_users // 10 else logging.INFO,
            "in-process feature store: %d preloaded users (never evicted), room for %d more "
            "(--store-max-users %d; least recently used evicted beyond it); a recorded "
            "user's history expires %s after its last event", store.preloaded, room,
            store.max_users, ttl)
    return store


async def serve(config: ServerConfig, port_file: Path | None = None) -> None:
    """Run until SIGTERM/SIGINT: load, serve, then drain in-flight calls and stop."""
    if config.cpus is not None:  # first: the threads started from here on inherit it
        pin_process(config.cpus)
    sys.setswitchinterval(config.gil_switch_interval_s)
    running = await create_server(config)
    try:
        # the cyclic GC kept off the loaded pair (retrieval/long_lived.py), before SERVING
        await running.load(config, before_ready=long_lived.enable)
        if config.worker is not None:
            await running.listen(config)
    except BaseException:
        await running.stop(0)
        raise
    log.info("SERVING model %s with index %s", running.retriever.pair.model_version,
             running.retriever.pair.index_version)
    if port_file is not None:  # "PORT" or "PORT METRICS_PORT", written once SERVING
        ports = [running.port] + ([running.metrics_port] if running.metrics_port else [])
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(" ".join(map(str, ports)))
        os.replace(tmp, port_file)  # readers never see half a line
    await stop_signalled()
    log.info("stopping: NOT_SERVING, draining for up to %.1fs", config.grace_seconds)
    await running.stop(config.grace_seconds)

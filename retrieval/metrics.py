"""Prometheus metrics of the service, on their own registry and HTTP port.

    two_tower_stage_seconds{rpc, stage}      latency per stage: queue (submit → the batch's
                                             read), features, handoff (read → compute),
                                             tower, ann (once a batch), return (the batch's
                                             end → the handler resuming), total (per call)
    two_tower_requests_total{rpc, code}      every finished call by gRPC status code
    two_tower_batch_size                     requests answered by one tower + ANN call
    two_tower_feature_store_errors_total     feature-store calls that failed
    two_tower_auth_failures_total{reason}    calls refused for their token: missing, invalid
    two_tower_degraded_replies_total{reason} replies computed without stored features:
                                             unavailable (Redis failed or timed out),
                                             breaker_open (Redis skipped), bad_data
    two_tower_feature_store_breaker_state    0 closed, 1 half-open (probing), 2 open
    two_tower_serving_info{model_version, index_version}   1 for the pair being served
    two_tower_version_watch_errors_total{reason}   checks of the index pointer that failed
                                             (one per poll while the cause lasts): pointer
                                             (CURRENT unreadable or naming no version),
                                             refused (the version named does not load),
                                             timeout (artifact I/O did not return in time),
                                             unexpected (anything else; logged with its
                                             traceback)
    two_tower_version_watch_last_success_age_seconds   seconds since a check last found the
                                             pair CURRENT names being served (0 without a
                                             watcher: --watch-interval 0)
    two_tower_feature_store_users            users held by the in-process store (preloaded
                                             and recorded); absent with Redis
    two_tower_feature_store_evictions_total{reason}   recorded users the in-process store
                                             dropped: lru (over --store-max-users), ttl
    two_tower_unsent_replies_total           replies gRPC could not send: the caller reset
                                             the stream or its connection closed first
    two_tower_thread_cpu_seconds_total{thread}   CPU time of the server's threads by name
                                             (retrieval.os_threads): main (the event loop),
                                             retrieve-work (the batches), event_engine
                                             (gRPC's), similar_0, ...; updated once a second
    two_tower_worker_requests_total{worker}  `serve --workers N` only: finished calls by
                                             worker index (0 … N-1), to see how connections
                                             spread over the workers

With ``serve --workers N`` (retrieval.workers) each worker writes its values to files in
PROMETHEUS_MULTIPROC_DIR and the supervisor's one /metrics sums them: counters and
histograms over every worker that ever ran (a restarted worker's counts stay); gauges per
their ``multiprocess_mode``, over the live workers: the breaker state and the watcher's
age are the worst worker's (livemax), ``two_tower_serving_info`` is the number of workers
serving that pair (livesum: two series during a swap, until every worker has swapped).
Gauges computed at scrape time are written once a second instead (``refresh``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import values as _values

from retrieval.os_threads import CpuByThread

# 50 µs … 2.5 s: the stages of one call span four orders of magnitude.
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
                   0.25, 0.5, 1.0, 2.5)
WATCH_ERROR_REASONS = ("pointer", "refused", "timeout", "unexpected")


def multiprocess_mode() -> bool:
    """Whether this process writes its values to PROMETHEUS_MULTIPROC_DIR (decided by
    prometheus_client when first imported)."""
    return bool(getattr(_values.ValueClass, "_multiprocess", False))


class ServiceMetrics:
    def __init__(self, worker: int | None = None) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = multiprocess_mode()
        self._functions: list[tuple[Gauge, Callable[[], float]]] = []
        self._serving: tuple[str, str] | None = None
        self.stage_seconds = Histogram(
            "two_tower_stage_seconds", "Latency of one stage of a call", ("rpc", "stage"),
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("two_tower_requests_total", "Finished calls by status code",
                                ("rpc", "code"), registry=self.registry)
        self.batch_size = Histogram("two_tower_batch_size", "Requests per tower + ANN call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.feature_store_errors = Counter("two_tower_feature_store_errors_total",
                                            "Feature-store calls that failed",
                                            registry=self.registry)
        self.degraded = Counter("two_tower_degraded_replies_total",
                                "Replies computed without stored user features, by reason",
                                ("reason",), registry=self.registry)
        self.breaker_state = Gauge("two_tower_feature_store_breaker_state",
                                   "Feature-store circuit breaker: 0 closed, 1 half-open, 2 open",
                                   registry=self.registry, multiprocess_mode="livemax")
        self.auth_failures = Counter("two_tower_auth_failures_total",
                                     "Calls refused for a missing or invalid bearer token",
                                     ("reason",), registry=self.registry)
        self.watch_errors = Counter("two_tower_version_watch_errors_total",
                                    "Checks of the index pointer that failed, by reason",
                                    ("reason",), registry=self.registry)
        for reason in WATCH_ERROR_REASONS:  # exported at 0 from the start: rises are visible
            self.watch_errors.labels(reason)
        self.watch_age = Gauge("two_tower_version_watch_last_success_age_seconds",
                               "Seconds since the version watcher last saw CURRENT's pair "
                               "served", registry=self.registry, multiprocess_mode="livemax")
        self.serving = Gauge("two_tower_serving_info", "The model and index being served "
                             "(with --workers: how many workers serve it)",
                             ("model_version", "index_version"), registry=self.registry,
                             multiprocess_mode="livesum")
        self.unsent_replies = Counter("two_tower_unsent_replies_total",
                                      "Replies gRPC could not send (stream reset or "
                                      "connection closed before the reply went out)",
                                      registry=self.registry)
        self.store_evictions = Counter("two_tower_feature_store_evictions_total",
                                       "Users the in-process feature store dropped, by reason: "
                                       "lru (over its cap), ttl (history expired)",
                                       ("reason",), registry=self.registry)

        self.thread_cpu = Counter("two_tower_thread_cpu_seconds",
                                  "CPU time of the server's threads by name: main (the event "
                                  "loop), retrieve-work (the batches), event_engine (gRPC's)",
                                  ("thread",), registry=self.registry)
        self._cpu_by_thread = CpuByThread()

        self._worker_requests = None
        if worker is not None:
            self._worker_requests = Counter(
                "two_tower_worker_requests_total", "Finished calls by worker index",
                ("worker",), registry=self.registry).labels(str(worker))

        # labels() takes a lock and hashes its arguments: the hot path keeps the children.
        self._stage_children: dict[tuple[str, str], Histogram] = {}
        self._request_children: dict[tuple[str, str], Counter] = {}

    @contextmanager
    def stage(self, rpc: str, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe_stage(rpc, stage, time.perf_counter() - start)

    def observe_stage(self, rpc: str, stage: str, seconds: float) -> None:
        child = self._stage_children.get((rpc, stage))
        if child is None:
            child = self._stage_children[rpc, stage] = self.stage_seconds.labels(rpc, stage)
        child.observe(seconds)

    def count_request(self, rpc: str, code: str) -> None:
        child = self._request_children.get((rpc, code))
        if child is None:
            child = self._request_children[rpc, code] = self.requests.labels(rpc, code)
        child.inc()
        if self._worker_requests is not None:
            self._worker_requests.inc()

    def set_serving(self, model_version: str, index_version: str) -> None:
        if not self.multiprocess:
            self.serving.clear()
        elif self._serving is not None:  # a file cannot drop a series: the old one goes to 0
            self.serving.labels(*self._serving).set(0)
        self._serving = (model_version, index_version)
        self.serving.labels(model_version, index_version).set(1)

    def set_function(self, gauge: Gauge, value: Callable[[], float]) -> None:
        """``gauge`` reads ``value()`` at each scrape; in multiprocess mode, where the
        scrape reads files, at each ``refresh`` (the server calls it once a second)."""
        if self.multiprocess:
            self._functions.append((gauge, value))
            gauge.set(value())
        else:
            gauge.set_function(value)

    def refresh(self) -> None:
        """Once a second (the server's refresh task): the computed gauges of multiprocess
        mode, and the CPU each thread used since the last refresh."""
        for gauge, value in self._functions:
            gauge.set(value())
        for thread, seconds in self._cpu_by_thread.update().items():
            self.thread_cpu.labels(thread).inc(seconds)

    def count_store_evictions(self, reason: str, n: int) -> None:
        self.store_evictions.labels(reason).inc(n)

    def watch_store_size(self, size: Callable[[], int]) -> None:
        """A gauge of the in-process store's users, read at each scrape."""
        gauge = Gauge("two_tower_feature_store_users",
                      "Users held by the in-process feature store", registry=self.registry,
                      multiprocess_mode="livesum")
        self.set_function(gauge, size)

    def serve_http(self, host: str, port: int) -> int:
        """Expose /metrics; returns the bound port (port 0: any free one)."""
        server, _ = start_http_server(port, host, registry=self.registry)
        return server.server_port

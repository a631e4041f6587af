"""The request path as plain code: query → features → user tower → ANN → candidates."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from retrieval import long_lived
from retrieval.batcher import MicroBatcher
from retrieval.candidate_index import Candidates, use_search_threads
from retrieval.circuit_breaker import BreakerConfig, CircuitBreaker
from retrieval.cpus import usable_cores
from contracts.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    quote,
)
from retrieval.feature_store import (
    FeatureStore,
    FeatureStoreError,
    FeatureStoreUnavailable,
    StoredUser,
)
from retrieval.metrics import ServiceMetrics
from retrieval.os_threads import name_os_thread
from retrieval.pair import ServingPair
from retrieval.query import (
    Limits,
    RetrieveQuery,
    check_batch_candidates,
    check_batch_size,
    validate_interactions,
    validate_query,
    validate_similar,
)
from contracts.inputs import UserRequest, user_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrieveResult:
    candidates: Candidates
    model_version: str
    index_version: str
    degraded: bool = False  # answered without stored features: the store failed or was skipped
    # the reply's serialised candidates, made in the compute stage (None: make them when
    # encoding): the event loop's thread is the one a server runs out of first
    candidate_bytes: bytes | None = None


def default_faiss_threads(cpus: Sequence[int] | None = None) -> int:
    """Two OpenMP threads for a batch's search, one on a single usable core (or a worker
    pinned to one CPU: ``cpus``, retrieval.cpus).

    Measured with the load test (Redis on, ghz on the same 2 cores, c=50): two threads
    served +19-20 % calls/s with a 1M-item IVF index (two runs) and +6-7 % at 50k items,
    with open-loop p99 at the same share of the maximum unchanged. While the compute thread
    searches, the event loop's core is often idle; more threads than two only queue behind
    the loop and the load generator for the same cores."""
    return min(2, len(cpus) if cpus else usable_cores())


@dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 32
    max_wait_us: int = 0  # batches form from calls arriving while one runs; a timer costs ms
    max_queue: int = 2048   # beyond this, RESOURCE_EXHAUSTED instead of unbounded latency
    threads: int = 1
    faiss_threads: int = field(default_factory=default_faiss_threads)  # of one batch's search
    # the store read of a batch in a thread of its own, overlapping the batch before it's
    # compute: for a store far away (a round trip near a batch's compute time); on the
    # same host one thread for both costs less (retrieval.batcher)
    overlap_reads: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "threads", "faiss_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
        if not isinstance(self.overlap_reads, bool):
            raise ValueError(f"overlap_reads must be true or false (got {self.overlap_reads!r})")


@dataclass(frozen=True, slots=True)
class _Job:
    pair: ServingPair
    query: RetrieveQuery
    deadline: float | None  # time.monotonic() after which the answer is of no use
    # time.perf_counter() when the call was handed to the batcher
    queued_at: float = field(default_factory=time.perf_counter)


_Read = tuple[StoredUser | None, bool]  # the stored user (None: cold), degraded
_LATE = object()  # in place of a _Read: the deadline passed before the user was read


class _ReadBatch(list):
    """The read stage's output for a batch: one _Read (or _LATE) a job, and when it ended."""

    done_at: float = 0.0


@dataclass(frozen=True, slots=True)
class _Answer:
    candidates: Candidates
    degraded: bool
    finished_at: float  # time.perf_counter() when the batch's work for it was done
    wire: bytes  # the reply's serialised candidates (Candidates.wire)


class Retriever:
    """Holds the serving pair and the feature store; one instance per server."""

    def __init__(self, store: FeatureStore, limits: Limits = Limits(),
                 history_ttl_s: int | None = None,
                 metrics: ServiceMetrics | None = None,
                 batching: BatchingConfig = BatchingConfig(),
                 breaker: BreakerConfig = BreakerConfig()) -> None:
        self.store, self.limits, self.history_ttl_s = store, limits, history_ttl_s
        self.metrics = metrics or ServiceMetrics()
        self.breaker = CircuitBreaker("feature store", breaker,
                                      on_change=self.metrics.breaker_state.set)
        self._pair: ServingPair | None = None
        # One thread of the batcher reads a batch's users from the store (a network round
        # trip, waiting without the GIL), then runs the tower and Faiss on it; with
        # overlap_reads a second thread reads the next batch meanwhile. The event loop
        # thread only decodes, validates and encodes.
        # OpenMP's thread count is per calling thread: set it in the compute thread itself,
        # or Faiss there forks a team of one per core whose spinning workers eat the core
        # the event loop needs (measured: 2 ms of CPU per call instead of ~0.5).
        self._batcher = MicroBatcher(self._compute_batch, batching.max_batch,
                                     batching.max_wait_us, max_queue=batching.max_queue,
                                     prepare=self._read_batch, name="retrieve",
                                     on_compute_thread=lambda: use_search_threads(
                                         batching.faiss_threads),
                                     overlap=batching.overlap_reads)
        # SimilarItems: no user to read, one search a call, on a thread of its own
        self._executor = ThreadPoolExecutor(batching.threads, thread_name_prefix="similar",
                                            initializer=_start_similar_thread,
                                            initargs=(batching.faiss_threads,))

    @property
    def pair(self) -> ServingPair | None:
        return self._pair

    def set_pair(self, pair: ServingPair) -> None:
        swapped = self._pair is not None
        self._pair = pair  # one reference swap: a request uses the pair it started with
        self.metrics.set_serving(pair.model_version, pair.index_version)
        if swapped:
            long_lived.pair_changed()  # the old pair's cycles may be collected again

    async def retrieve(self, query: RetrieveQuery, deadline: float | None = None
                       ) -> RetrieveResult:
        """``deadline``: time.monotonic() after which the answer is of no use to the caller."""
        pair = self._pair
        if pair is None:
            raise FailedPrecondition("no model and index loaded yet")
        validate_query(query, pair.model.feature_spec, self.limits)
        pair.index.check_rules(query.rules)
        _check_deadline(deadline, "before the request was queued")
        answer = await self._batcher.submit(_Job(pair, query, deadline))
        # the hand-back: from the compute thread's end of the batch to this call resuming
        self.metrics.observe_stage("Retrieve", "return", time.perf_counter() - answer.finished_at)
        return RetrieveResult(answer.candidates, pair.model_version, pair.index_version,
                              answer.degraded, answer.wire)

    async def batch_retrieve(self, queries: list[RetrieveQuery], deadline: float | None = None
                             ) -> list[RetrieveResult]:
        """Every query validated first (errors name requests[i].field), then answered
        concurrently: they share micro-batches like independent calls."""
        pair = self._pair
        if pair is None:
            raise FailedPrecondition("no model and index loaded yet")
        check_batch_size(queries, self.limits)
        for i, query in enumerate(queries):
            try:
                validate_query(query, pair.model.feature_spec, self.limits)
                pair.index.check_rules(query.rules)
            except InvalidArgument as exc:
                raise exc.within(f"requests[{i}]") from None
        check_batch_candidates(queries, self.limits)
        return list(await asyncio.gather(*(self.retrieve(q, deadline) for q in queries)))

    async def similar_items(self, item_id: str, k: int, exclude: frozenset[str]
                            ) -> RetrieveResult:
        pair = self._pair
        if pair is None:
            raise FailedPrecondition("no model and index loaded yet")
        validate_similar(item_id, k, exclude, self.limits)
        candidates = await asyncio.get_running_loop().run_in_executor(
            self._executor, _similar, pair, item_id, k, exclude | {item_id})
        return RetrieveResult(candidates, pair.model_version, pair.index_version)

    async def record_interactions(self, events: list[tuple[str, str]], batch: bool = True) -> int:
        """Append the events to their users' histories; returns how many were recorded."""
        validate_interactions(events, self.limits, batch)
        try:
            await self.store.record_interactions(events, self.history_ttl_s)
        except Exception:
            self.metrics.feature_store_errors.inc()
            raise
        return len(events)

    async def close(self) -> None:
        await self._batcher.close()
        self._executor.shutdown(wait=True)

    def _read_batch(self, jobs: list[_Job]) -> _ReadBatch:
        """The read stage: every live user of the batch in one read of the store. A
        request whose deadline passed while it queued is not worked on."""
        self.metrics.batch_size.observe(len(jobs))
        started = time.perf_counter()
        for job in jobs:  # the wait: from the handler's submit to this batch starting
            self.metrics.observe_stage("Retrieve", "queue", started - job.queued_at)
        now = time.monotonic()
        live = [r for r, job in enumerate(jobs) if job.deadline is None or now < job.deadline]
        out = _ReadBatch([_LATE] * len(jobs))
        if live:
            with self.metrics.stage("Retrieve", "features"):
                users = self._read_users([jobs[r].query.user_id for r in live],
                                         [jobs[r].query.exclude_seen for r in live],
                                         any(_reads_times(jobs[r].pair) for r in live))
            for r, user in zip(live, users, strict=True):
                out[r] = user
        out.done_at = time.perf_counter()
        return out

    def _compute_batch(self, jobs: list[_Job], read: list
                       ) -> list[_Answer | DeadlineExceeded]:
        """The compute stage: one tower call and one ANN search per serving pair in the
        batch (a hot swap can put requests of two pairs in one batch; each is answered by
        the pair it started with)."""
        # the hand-off: from the read's end to this stage starting (the batch before it ran);
        # a batch the batcher cut (callers gone) comes as a plain list
        if isinstance(read, _ReadBatch):
            self.metrics.observe_stage("Retrieve", "handoff", time.perf_counter() - read.done_at)
        results: list[_Answer | DeadlineExceeded | None] = [None] * len(jobs)
        live = []
        for row, user in enumerate(read):
            if user is _LATE:
                results[row] = DeadlineExceeded("deadline passed before the user was read; "
                                                "the work was not done")
            else:
                live.append(row)
        for pair, rows in _group_by_pair(jobs, live):
            requests = [_user_request(jobs[r].query, read[r][0]) for r in rows]
            with self.metrics.stage("Retrieve", "tower"):
                user_emb = pair.user_tower(user_inputs(pair.model.feature_spec, requests))
            k = max(jobs[r].query.k for r in rows)
            exclude = [_excluded(jobs[r].query, request, read[r][0])
                       for r, request in zip(rows, requests, strict=True)]
            with self.metrics.stage("Retrieve", "ann"):
                found = pair.index.search(user_emb, k, exclude, [jobs[r].query.rules for r in rows])
            tops = [candidates.top(jobs[r].query.k) for r, candidates in zip(rows, found,
                                                                             strict=True)]
            # here, not on the event loop; one gather for the batch's replies
            wires = pair.index.wire.records_many([t.rows for t in tops],
                                                 [t.score_array for t in tops])
            finished = time.perf_counter()
            for r, top, wire in zip(rows, tops, wires, strict=True):
                results[r] = _Answer(top, read[r][1], finished, wire)
        return results

    def _embed_and_search_batch(self, jobs: list[_Job]) -> list[_Answer | DeadlineExceeded]:
        """Both stages in a row, in the calling thread (tests drive a batch with it)."""
        return self._compute_batch(jobs, self._read_batch(jobs))

    def _read_users(self, user_ids: list[str], seen: list[bool], times: bool = False
                    ) -> list[tuple[StoredUser | None, bool]]:
        """(the stored user or None, degraded) per user, in one read of the store (with the
        seen set of the users whose request asks exclude_seen). A store
        that fails, times out or holds unreadable data never fails a call: the user is
        served as a cold start (request history and context only) and the reply is flagged
        degraded. While the breaker is open the store is not asked at all."""
        cold = [(None, True)] * len(user_ids)
        if not self.breaker.allow():
            self.metrics.degraded.labels("breaker_open").inc(len(user_ids))
            return cold
        try:
            args = (user_ids, seen) if any(seen) else (user_ids,)
            # the history's times only for a sequence feature (one more LRANGE a user)
            found = (self.store.read_users(*args, times=True) if times
                     else self.store.read_users(*args))
        except FeatureStoreUnavailable:
            self.breaker.record_failure()
            self.metrics.feature_store_errors.inc()
            self.metrics.degraded.labels("unavailable").inc(len(user_ids))
            return cold
        except FeatureStoreError as exc:  # the store answered, but not with users
            self.breaker.record_success()
            found = [exc] * len(user_ids)
        else:
            self.breaker.record_success()
        out: list[tuple[StoredUser | None, bool]] = []
        for user_id, user in zip(user_ids, found, strict=True):
            if isinstance(user, FeatureStoreError):  # one user's record is bad
                log.warning("serving user %s as a cold start: %s", quote(user_id), user)
                self.metrics.feature_store_errors.inc()
                self.metrics.degraded.labels("bad_data").inc()
                out.append((None, True))
            else:
                out.append((user, False))
        return out


def _reads_times(pair: ServingPair) -> bool:
    """Whether the pair's user tower has a sequence feature, which reads item ages."""
    return any(f.kind == "sequence" for f in pair.model.feature_spec.user_input_features)


def _user_request(query: RetrieveQuery, stored: StoredUser | None) -> UserRequest:
    from_store = not query.recent_item_ids and stored is not None
    return UserRequest(
        user_id=query.user_id,
        features=stored.features if stored else {},
        history=query.recent_item_ids or (stored.history if stored else ()),
        context=query.context,
        event_time=query.event_time,
        # the stored items' times (a sequence's ages); recent_item_ids come without any
        history_times=stored.history_times if from_store else (),
    )


def _excluded(query: RetrieveQuery, request: UserRequest, stored: StoredUser | None
              ) -> frozenset[str]:
    """The request's exclusions, plus, when exclude_seen, the user's seen set and the
    history the request was answered with (recent_item_ids, or the stored history)."""
    if not query.exclude_seen:
        return query.exclude_item_ids
    seen = stored.seen if stored is not None else frozenset()
    return query.exclude_item_ids | seen | frozenset(request.history)


def _start_similar_thread(faiss_threads: int) -> None:
    name_os_thread()
    use_search_threads(faiss_threads)


def _similar(pair: ServingPair, item_id: str, k: int, exclude: frozenset[str]) -> Candidates:
    item_emb = pair.index.vector(item_id)
    if item_emb is None:
        raise NotFound("item_id", f"{quote(item_id)} is not in the served index "
                       f"{pair.index_version}")
    return pair.index.search(item_emb[None, :], k, [exclude])[0]


def _group_by_pair(jobs: list[_Job], rows: list[int]) -> list[tuple[ServingPair, list[int]]]:
    groups: dict[int, tuple[ServingPair, list[int]]] = {}
    for row in rows:
        groups.setdefault(id(jobs[row].pair), (jobs[row].pair, []))[1].append(row)
    return list(groups.values())


def _check_deadline(deadline: float | None, where: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(f"deadline passed {where}; the work was not done")

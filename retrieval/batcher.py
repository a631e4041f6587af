"""Micro-batching for grpc.aio handlers: concurrent requests share one call of a batch
function (the user tower, the index search) run in a thread of its own, never on the
event loop.

    batcher = MicroBatcher(embed_batch, max_batch=32, max_wait_us=0,
                           prepare=read_users)          # optional I/O step
    user_emb = await batcher.submit(request)           # in each handler
    await batcher.close()                              # at shutdown: drains what is queued

By default one thread works the batches: it takes every request queued (up to
``max_batch``) as soon as it is free, runs ``prepare(items)`` (the batch's I/O: the
feature-store read, waiting on its socket without the GIL), then ``fn(items, prepared)``
(or ``fn(items)`` without ``prepare``), and hands the results back.

``overlap=True`` splits that into two stages, each a thread, one batch in each at a time:
the **read** stage prepares a batch while the **compute** stage runs ``fn`` on the one
before it, so a slow store's round trip does not hold the compute. When nothing else is
queued and the compute stage is idle, the read thread runs ``fn`` itself instead of
handing the batch over (``on_compute_thread`` then also runs once in the read thread).
With a store on the same host the second thread costs more than it saves: two threads
taking turns at the GIL and waking each other (1M items, Redis on loopback, c=50: 1,197-
1,272 calls/s at 0.86-0.92 ms of CPU a call with two stages, 1,339-1,389 at 0.78-0.82 with
one; at 573 calls/s p99 11.4-13.7 against 10.2-11.2 ms; docs/request-path.md).

Either way the hand-offs cost no event-loop turn: ``submit`` queues the request for the
working thread directly, and a whole batch's results go back with one
``call_soon_threadsafe`` (an asyncio collector task and ``run_in_executor`` cost two loop
turns each way, and at half load a loop turn waits behind other calls' gRPC work).
``max_wait_us`` > 0 holds a batch that long after its first request for more to arrive;
at 0 a batch is whatever arrived while the one before it was being worked on.

A result that is an exception instance is raised to that request alone; an exception
raised by ``prepare`` or ``fn`` reaches every request of the batch. A request whose caller
went away (its ``submit`` was cancelled: deadline exceeded, client gone) is dropped from
its batch if the batch has not started, and its result is discarded if it has.

    Overloaded       a ResourceExhausted (contracts.errors): ``max_queue`` requests wait
    BatcherClosed    an Unavailable: submitted after ``close()``, or a stage's thread died
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from contracts.errors import ResourceExhausted, Unavailable
from retrieval.os_threads import name_os_thread

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Overloaded(ResourceExhausted):
    pass


class BatcherClosed(Unavailable):
    pass


@dataclass(frozen=True, slots=True)
class _Waiter:
    item: Any
    future: asyncio.Future
    deadline: float  # time.monotonic() by which the batch it starts must be taken


class MicroBatcher(Generic[Item, Result]):
    """``await submit(item) -> result``, with ``fn`` called once per batch of items."""

    def __init__(self, fn: Callable[..., Sequence[Result | BaseException]],
                 max_batch: int, max_wait_us: int, *, max_queue: int = 1024,
                 prepare: Callable[[list[Item]], Sequence[Any]] | None = None,
                 on_compute_thread: Callable[[], None] | None = None,
                 name: str = "batcher", overlap: bool = False) -> None:
        for label, value, low in (("max_batch", max_batch, 1), ("max_wait_us", max_wait_us, 0),
                                  ("max_queue", max_queue, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an integer >= {low} (got {value!r})")
        self._fn, self._prepare, self._on_compute_thread = fn, prepare, on_compute_thread
        self.max_batch, self.max_queue, self.name = max_batch, max_queue, name
        self._overlap = overlap and prepare is not None  # two stages: read, then compute
        self._max_wait_s = max_wait_us / 1e6
        # one lock, a condition for each thread's waits: a wake-up goes to the one thread
        # that has something to do (notify_all on a shared condition woke both)
        self._lock = threading.Lock()
        self._for_read = threading.Condition(self._lock)     # requests queued, a slot freed
        self._for_compute = threading.Condition(self._lock)  # a batch handed over
        self._queue: deque[_Waiter] = deque()          # submitted, not yet taken
        self._handed: list[tuple[list[_Waiter], Sequence[Any] | None]] = []  # read → compute
        self._closed = False
        self._dead: BaseException | None = None        # a stage's thread stopped on a bug
        self._read_done = False                        # closed, and every batch taken
        self._working: dict[str, list[_Waiter]] = {}   # stage → the batch it works on
        self._computing = False      # a thread runs fn (the compute stage's, or the read's)
        self._read_computes = False  # the read thread has run fn (its set-up is done)
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not yet taken by the read stage)."""
        return len(self._queue)

    async def submit(self, item: Item) -> Result:
        """The result of ``item``; raises Overloaded at once when the queue is full."""
        loop = self._bind_loop()
        future = loop.create_future()
        with self._lock:
            if self._closed:
                raise BatcherClosed("the server is shutting down; retry on another replica")
            if self._dead is not None:
                raise BatcherClosed("the micro-batcher stopped (see the server log)")
            if len(self._queue) >= self.max_queue:
                self._drop_cancelled()
                if len(self._queue) >= self.max_queue:
                    raise Overloaded(f"overloaded: {self.max_queue} requests already wait for "
                                     "the user tower; retry with backoff")
            self._queue.append(_Waiter(item, future, time.monotonic() + self._max_wait_s))
            if len(self._queue) == 1 or len(self._queue) >= self.max_batch:
                self._for_read.notify()
        return await future  # cancelling the caller cancels the future

    async def close(self) -> None:
        """Refuse new requests, dispatch what is queued without waiting, wait for it all."""
        with self._lock:
            self._closed = True
            self._for_read.notify()
        threads = list(self._threads)
        if threads:
            await asyncio.to_thread(lambda: [t.join() for t in threads])

    # --- the event loop's side -------------------------------------------------------

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            stages = [("read", self._read_stage, False), ("compute", self._compute_stage, True)]
            if not self._overlap:  # one stage: take, prepare, compute, deliver
                stages = [("work", self._read_stage, True)]
            for stage, target, computes in stages:
                thread = threading.Thread(target=self._guarded, args=(target, computes),
                                          daemon=True, name=f"{self.name}-{stage}")
                self._threads.append(thread)
                thread.start()
        elif self._loop is not loop:
            raise RuntimeError("a MicroBatcher serves one event loop; create one per loop")
        return loop

    def _deliver(self, batch: list[_Waiter], results: Sequence[Any] | BaseException) -> None:
        """On the loop: each caller gets its result (or the batch's exception)."""
        for i, w in enumerate(batch):
            if w.future.done():  # the caller went away
                continue
            result = results if isinstance(results, BaseException) else results[i]
            if isinstance(result, BaseException):
                w.future.set_exception(result)
            else:
                w.future.set_result(result)

    def _send(self, batch: list[_Waiter], results: Sequence[Any] | BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, batch, results)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    # --- the stages' threads ----------------------------------------------------------

    def _guarded(self, stage: Callable[[], None], computes: bool) -> None:
        """A bug in a stage must not leave callers waiting forever: fail them, refuse
        new calls, log it."""
        name_os_thread()  # retrieve-work in top -H, perf and /proc, not "two-tower"
        try:
            if computes and self._on_compute_thread is not None:
                self._on_compute_thread()
            stage()
        except BaseException as exc:
            log.exception("micro-batcher %s stopped", threading.current_thread().name)
            with self._lock:
                self._dead = exc
                stranded = (list(self._queue) + [w for b, _ in self._handed for w in b]
                            + [w for b in self._working.values() for w in b])
                self._queue.clear()
                self._handed.clear()
                self._for_read.notify()
                self._for_compute.notify()
            self._send(stranded, BatcherClosed("the micro-batcher stopped (see the server log)"))

    def _read_stage(self) -> None:
        """Take batches; prepare and compute them (one stage), or prepare them for the
        compute stage (overlap), computing one here when that stage is idle and nothing waits."""
        while True:
            if self._overlap:
                with self._lock:
                    # one batch waits for the compute stage at most: the next is taken only
                    # once that one is, so it holds everything that arrived meanwhile
                    while self._handed and self._dead is None:
                        self._for_read.wait()
                    if self._dead is not None:
                        raise RuntimeError("the compute stage stopped")
            batch = self._take_batch()
            self._working["read"] = batch or []
            if batch is None:
                with self._lock:  # closed and drained: the compute stage ends after its last
                    self._read_done = True
                    self._for_compute.notify()
                return
            items = [w.item for w in batch]
            if self._prepare is None:
                self._send(batch, self._call(self._fn, items))
                continue
            prepared = self._call(self._prepare, items)
            if not self._overlap:  # one stage: compute here
                self._compute(batch, prepared)
                continue
            with self._lock:
                if self._dead is not None:
                    raise RuntimeError("the compute stage stopped")
                # nothing queued and the compute stage idle: a hand-off would only make
                # this thread wait while that one wakes up; compute here instead
                inline = not self._queue and not self._handed and not self._computing
                if inline:
                    self._computing = True
                else:
                    self._handed.append((batch, prepared))
                    self._for_compute.notify()
            if inline:
                if not self._read_computes:  # its OpenMP threads, as the compute stage's
                    self._read_computes = True
                    if self._on_compute_thread is not None:
                        self._on_compute_thread()
                self._compute_releasing(batch, prepared)

    def _compute_stage(self) -> None:
        while True:
            with self._lock:
                while not self._handed:
                    if self._read_done or self._dead is not None:
                        return
                    self._for_compute.wait()
                batch, prepared = self._handed.pop()
                self._working["compute"] = batch
                self._computing = True
                self._for_read.notify()
            self._compute_releasing(batch, prepared)

    def _compute_releasing(self, batch: list[_Waiter],
                           prepared: Sequence[Any] | BaseException) -> None:
        """``_compute``, then the compute slot taken with ``_computing`` is free again."""
        try:
            self._compute(batch, prepared)
        finally:
            with self._lock:
                self._computing = False

    def _compute(self, batch: list[_Waiter], prepared: Sequence[Any] | BaseException) -> None:
        """fn on a prepared batch's live requests, and the results sent to their callers."""
        if isinstance(prepared, BaseException):
            self._send(batch, prepared)
            return
        items = [w.item for w in batch]
        live = [i for i, w in enumerate(batch) if not w.future.done()]
        if not live:
            return
        if len(live) < len(batch):  # callers gone while their users were read
            batch = [batch[i] for i in live]
            items = [items[i] for i in live]
            prepared = [prepared[i] for i in live]
        self._send(batch, self._call(self._fn, items, prepared))

    def _take_batch(self) -> list[_Waiter] | None:
        """Up to max_batch live requests, once max_batch wait, the first one's max_wait is
        over, or the batcher is closing; None once closed and drained."""
        with self._lock:
            while True:
                self._drop_cancelled_head()
                if self._queue:
                    wait = self._queue[0].deadline - time.monotonic()
                    if self._closed or len(self._queue) >= self.max_batch or wait <= 0:
                        batch: list[_Waiter] = []
                        while self._queue and len(batch) < self.max_batch:
                            waiter = self._queue.popleft()
                            if not waiter.future.done():
                                batch.append(waiter)
                        if batch:
                            return batch
                        continue
                    self._for_read.wait(wait)
                elif self._closed:
                    return None
                else:
                    self._for_read.wait()

    @staticmethod
    def _call(fn: Callable[..., Sequence[Any]], items: list, *extra: Any
              ) -> Sequence[Any] | BaseException:
        """fn's results, checked to be one per item; or the exception for every caller."""
        try:
            results = fn(items, *extra)
            if len(results) != len(items):
                raise RuntimeError(f"the batch function returned {len(results)} results "
                                   f"for {len(items)} items")
            return results
        except Exception as exc:
            return exc

    def _drop_cancelled_head(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    def _drop_cancelled(self) -> None:
        self._queue = deque(w for w in self._queue if not w.future.done())

"""Micro-batching for grpc.aio handlers: concurrent requests share one call of a batch
function (the user tower, the index search) run in a thread pool.

    batcher = MicroBatcher(embed_batch, max_batch=32, max_wait_us=500, executor=pool)
    user_emb = await batcher.submit(request)      # in each handler
    await batcher.close()                         # at shutdown: drains what is queued

A batch is dispatched when ``max_batch`` requests are queued, or ``max_wait_us`` after its
first request was queued, whichever comes first; while ``max_in_flight`` batches are
running, requests keep queueing and go in the next batch, so batches grow with the load.
``fn(items) -> results`` runs once per batch in ``executor``, never on the event loop.
A result that is an exception instance is raised to that request alone; an exception
raised by ``fn`` reaches every request of the batch. A request whose caller went away
(its ``submit`` was cancelled: deadline exceeded, client gone) is dropped from its batch
if the batch has not started, and its result is discarded if it has.

    Overloaded       a ResourceExhausted (contracts.errors): ``max_queue`` requests wait
    BatcherClosed    an Unavailable: submitted after ``close()``
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from contracts.errors import ResourceExhausted, Unavailable

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
    deadline: float  # loop time at which the batch this request starts must be dispatched


class MicroBatcher(Generic[Item, Result]):
    """``await submit(item) -> result``, with ``fn`` called once per batch of items."""

    def __init__(self, fn: Callable[[list[Item]], Sequence[Result | BaseException]],
                 max_batch: int, max_wait_us: int, executor: Executor, *,
                 max_queue: int = 1024, max_in_flight: int = 1) -> None:
        for name, value, low in (("max_batch", max_batch, 1), ("max_wait_us", max_wait_us, 0),
                                 ("max_queue", max_queue, 1), ("max_in_flight", max_in_flight, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low} (got {value!r})")
        self._fn, self._executor = fn, executor
        self.max_batch, self.max_queue, self.max_in_flight = max_batch, max_queue, max_in_flight
        self._max_wait_s = max_wait_us / 1e6
        self._queue: deque[_Waiter] = deque()
        self._running: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._collector: asyncio.Task | None = None
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._closed = False

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not yet handed to ``fn``)."""
        return len(self._queue)

    async def submit(self, item: Item) -> Result:
        """The result of ``item``; raises Overloaded at once when the queue is full."""
        if self._closed:
            raise BatcherClosed("the server is shutting down; retry on another replica")
        if self._collector is not None and self._collector.done():
            raise BatcherClosed("the micro-batcher stopped (see the server log)")
        if len(self._queue) >= self.max_queue:
            self._drop_cancelled()
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"overloaded: {self.max_queue} requests already wait for "
                                 "the user tower; retry with backoff")
        loop = self._bind_loop()
        waiter = _Waiter(item, loop.create_future(), loop.time() + self._max_wait_s)
        self._queue.append(waiter)
        if len(self._queue) == 1 or len(self._queue) >= self.max_batch:
            self._wakeup.set()
        return await waiter.future  # cancelling the caller cancels the future

    async def close(self) -> None:
        """Refuse new requests, dispatch what is queued without waiting, wait for it all."""
        self._closed = True
        self._wakeup.set()
        if self._collector is not None:
            await self._collector
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._collector = loop.create_task(self._collect(), name="micro-batcher")
        elif self._loop is not loop:
            raise RuntimeError("a MicroBatcher serves one event loop; create one per loop")
        return loop

    async def _collect(self) -> None:
        try:
            while not (self._closed and not self._queue):
                await self._until_batch_due()
                await self._slots.acquire()
                batch = self._take_batch()
                if not batch:
                    self._slots.release()
                    continue
                task = asyncio.create_task(self._run(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        except asyncio.CancelledError:  # the loop is shutting down
            for w in self._queue:
                w.future.cancel()
            self._queue.clear()
            raise
        except Exception as exc:  # a bug here must not leave callers waiting forever
            log.exception("micro-batcher stopped")
            self._fail(list(self._queue), exc)
            self._queue.clear()
            raise

    async def _until_batch_due(self) -> None:
        """Until max_batch requests wait, the first one's max_wait is over, or closing."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            self._drop_cancelled_head()
            if len(self._queue) >= self.max_batch:
                return
            timeout = None
            if self._queue:
                timeout = self._queue[0].deadline - loop.time()
                if timeout <= 0:
                    return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Waiter]:
        batch: list[_Waiter] = []
        while self._queue and len(batch) < self.max_batch:
            waiter = self._queue.popleft()
            if not waiter.future.done():
                batch.append(waiter)
        return batch

    async def _run(self, batch: list[_Waiter]) -> None:
        try:
            items = [w.item for w in batch]
            loop = asyncio.get_running_loop()
            try:
                results = await loop.run_in_executor(self._executor, self._fn, items)
                if len(results) != len(items):
                    raise RuntimeError(f"the batch function returned {len(results)} results "
                                       f"for {len(items)} items")
            except asyncio.CancelledError:
                for w in batch:
                    w.future.cancel()
                raise
            except Exception as exc:
                self._fail(batch, exc)
                return
            for w, result in zip(batch, results, strict=True):
                if w.future.done():  # the caller went away
                    continue
                if isinstance(result, BaseException):
                    w.future.set_exception(result)
                else:
                    w.future.set_result(result)
        finally:
            self._slots.release()

    @staticmethod
    def _fail(waiters: list[_Waiter], exc: BaseException) -> None:
        for w in waiters:
            if not w.future.done():
                w.future.set_exception(exc)

    def _drop_cancelled_head(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    def _drop_cancelled(self) -> None:
        self._queue = deque(w for w in self._queue if not w.future.done())

"""Request coalescing on one event loop: concurrent look-ups share one fetch of many keys.

    reads = Coalescer(fetch_users, max_batch=64, max_in_flight=2)
    user = await reads.get(user_id)        # in each handler

``fetch(keys) -> results`` (a coroutine, one result per key) is awaited once for every key
that asked in the same turn of the event loop, and for every key that asked while
``max_in_flight`` fetches were already running: the batch grows with the load and costs
no timer. A Redis pipeline of 2·n commands costs far less client CPU than n pipelines of
two (one connection check-out, one write, one read loop), and the event loop's thread is
the one a grpc.aio server runs out of first.

A result that is an exception instance is raised to its key's caller alone; an exception
raised by ``fetch`` reaches every caller of that batch. A caller that went away (cancelled,
timed out) before its batch started is dropped from it; its result is discarded otherwise.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Key = TypeVar("Key")
Result = TypeVar("Result")


class Coalescer(Generic[Key, Result]):
    """``await get(key) -> result``, with ``fetch`` awaited once per batch of keys."""

    def __init__(self, fetch: Callable[[list[Key]], Awaitable[Sequence[Result | BaseException]]],
                 max_batch: int = 64, max_in_flight: int = 2) -> None:
        for name, value in (("max_batch", max_batch), ("max_in_flight", max_in_flight)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
        self._fetch = fetch
        self.max_batch, self.max_in_flight = max_batch, max_in_flight
        self._waiting: deque[tuple[Key, asyncio.Future]] = deque()
        self._in_flight = 0
        self._dispatch_due = False
        self._tasks: set[asyncio.Task] = set()

    async def get(self, key: Key) -> Result:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((key, future))
        self._schedule_dispatch(loop)
        return await future  # cancelling the caller cancels the future: it leaves the batch

    def _schedule_dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        # call_soon runs after every handler already ready in this turn has asked
        if not self._dispatch_due and self._in_flight < self.max_in_flight:
            self._dispatch_due = True
            loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_due = False
        while self._waiting and self._in_flight < self.max_in_flight:
            batch = self._take_batch()
            if not batch:
                return
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take_batch(self) -> list[tuple[Key, asyncio.Future]]:
        batch: list[tuple[Key, asyncio.Future]] = []
        while self._waiting and len(batch) < self.max_batch:
            key, future = self._waiting.popleft()
            if not future.done():
                batch.append((key, future))
        return batch

    async def _run(self, batch: list[tuple[Key, asyncio.Future]]) -> None:
        try:
            results = await self._fetch([key for key, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"fetch returned {len(results)} results for {len(batch)} keys")
        except asyncio.CancelledError:  # the loop is shutting down
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            if self._waiting:
                self._schedule_dispatch(asyncio.get_running_loop())

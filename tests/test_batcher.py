"""The micro-batcher: batches form, results reach the right callers, failures and
cancellations stay contained, the queue is bounded and the event loop never blocks."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from retrieval.batcher import BatcherClosed, MicroBatcher, Overloaded
from retrieval.errors import status_of

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A batch function that squares its items and remembers the batches it saw."""

    def __init__(self, sleep_s: float = 0.0, fail_on: object = None) -> None:
        self.batches: list[list] = []
        self.sleep_s, self.fail_on = sleep_s, fail_on
        self.started = threading.Event()

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.started.set()
        time.sleep(self.sleep_s)
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on!r}")
        return [x * x for x in items]


def run(main):
    return asyncio.run(main())


def test_concurrent_submits_share_a_few_calls_with_each_result_in_its_place():
    fn = Recorder()

    async def main():
        batcher = MicroBatcher(fn, max_batch=16, max_wait_us=20_000)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(50)))
        await batcher.close()
        return results

    assert run(main) == [i * i for i in range(50)]
    assert len(fn.batches) <= 4 and all(len(b) <= 16 for b in fn.batches)
    assert sorted(x for b in fn.batches for x in b) == list(range(50))


def test_a_lone_request_is_dispatched_after_max_wait():
    fn = Recorder()

    async def main():
        batcher = MicroBatcher(fn, max_batch=16, max_wait_us=50_000)
        start = time.monotonic()
        result = await batcher.submit(3)
        elapsed = time.monotonic() - start
        await batcher.close()
        return result, elapsed

    result, elapsed = run(main)
    assert result == 9 and fn.batches == [[3]]
    assert 0.025 <= elapsed < 1.0  # waited for company, not much longer (machine is busy)


def test_an_exception_of_fn_reaches_every_caller_of_its_batch_and_the_next_batch_works():
    fn = Recorder(fail_on=2)

    async def main():
        batcher = MicroBatcher(fn, max_batch=4, max_wait_us=10_000)
        failed = await asyncio.gather(*(batcher.submit(i) for i in range(4)),
                                      return_exceptions=True)
        after = await asyncio.gather(*(batcher.submit(i) for i in (5, 6)))
        await batcher.close()
        return failed, after

    failed, after = run(main)
    assert all(isinstance(r, ValueError) and "bad item 2" in str(r) for r in failed)
    assert after == [25, 36]


def test_an_exception_returned_for_one_item_reaches_that_caller_alone():
    def fn(items):
        return [KeyError(x) if x == 1 else x for x in items]

    async def main():
        batcher = MicroBatcher(fn, max_batch=3, max_wait_us=10_000)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(3)),
                                       return_exceptions=True)
        await batcher.close()
        return results

    first, second, third = run(main)
    assert (first, third) == (0, 2) and isinstance(second, KeyError)


def test_a_wrong_number_of_results_fails_the_batch_clearly():
    async def main():
        batcher = MicroBatcher(lambda items: items[:-1], max_batch=2, max_wait_us=10_000)
        results = await asyncio.gather(batcher.submit(1), batcher.submit(2),
                                       return_exceptions=True)
        await batcher.close()
        return results

    for r in run(main):
        assert isinstance(r, RuntimeError) and "returned 1 results for 2 items" in str(r)


def test_a_caller_gone_before_dispatch_is_dropped_and_the_others_are_served():
    fn = Recorder()

    async def main():
        batcher = MicroBatcher(fn, max_batch=16, max_wait_us=50_000)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
        await asyncio.sleep(0)  # all three are queued
        tasks[1].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.close()
        return results

    first, second, third = run(main)
    assert (first, third) == (0, 4) and isinstance(second, asyncio.CancelledError)
    assert fn.batches == [[0, 2]]


def test_a_caller_gone_while_its_batch_runs_does_not_break_it():
    fn = Recorder(sleep_s=0.2)

    async def main():
        batcher = MicroBatcher(fn, max_batch=3, max_wait_us=1_000)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
        await asyncio.to_thread(fn.started.wait, 5)
        with pytest.raises(TimeoutError):  # a caller's deadline runs out
            await asyncio.wait_for(tasks[0], timeout=0.01)
        results = await asyncio.gather(*tasks[1:])
        after = await batcher.submit(7)
        await batcher.close()
        return results, after

    assert run(main) == ([1, 4], 49)
    assert fn.batches == [[0, 1, 2], [7]]


def test_a_full_queue_refuses_at_once_with_resource_exhausted_and_close_drains():
    fn = Recorder()

    async def main():
        batcher = MicroBatcher(fn, max_batch=100, max_wait_us=10_000_000,
                               max_queue=4)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(4)]
        await asyncio.sleep(0)
        assert batcher.queued == 4
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(99)
        start = time.monotonic()
        await batcher.close()  # does not wait out the 10 s max_wait
        drained_s = time.monotonic() - start
        with pytest.raises(BatcherClosed):
            await batcher.submit(5)
        return refused.value, [t.result() for t in tasks], drained_s

    refused, results, drained_s = run(main)
    assert status_of(refused)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "4 requests" in str(refused)
    assert results == [0, 1, 4, 9] and drained_s < 5.0
    assert fn.batches == [[0, 1, 2, 3]]


def test_the_event_loop_keeps_running_while_fn_blocks():
    fn = Recorder(sleep_s=0.2)
    ticks: list[float] = []

    async def ticker():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def main():
        batcher = MicroBatcher(fn, max_batch=1, max_wait_us=0)
        tick_task = asyncio.create_task(ticker())
        start = time.monotonic()
        await batcher.submit(1)
        end = time.monotonic()
        tick_task.cancel()
        await batcher.close()
        return start, end

    start, end = run(main)
    assert end - start >= 0.2
    assert sum(start <= t <= end for t in ticks) >= 5  # ~20 expected; the machine is busy


def test_options_are_validated():
    with pytest.raises(ValueError, match=r"max_batch must be an integer >= 1 \(got 0\)"):
        MicroBatcher(lambda items: items, max_batch=0, max_wait_us=0)


async def _one_then_four(batcher: MicroBatcher, reading: threading.Event) -> list:
    """Submit 1, then, once its batch is being read, 2 to 5 (they queue meanwhile); the
    answers, after closing the batcher."""
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.to_thread(reading.wait, 5)
    rest = [asyncio.create_task(batcher.submit(i)) for i in range(2, 6)]
    results = await asyncio.gather(first, *rest)
    await batcher.close()
    return results


def test_by_default_one_thread_reads_then_computes_each_batch():
    """prepare (the store read) and fn of a batch run in one thread, after each other, with
    the compute set-up run once there; the next batch holds everything that arrived."""
    events: list[tuple[str, list, str]] = []
    set_up: list[str] = []
    reading = threading.Event()

    def prepare(items):
        events.append(("read", list(items), threading.current_thread().name))
        reading.set()
        time.sleep(0.1 if items == [1] else 0)  # others queue while batch [1] is read
        return [f"user-{i}" for i in items]

    def fn(items, prepared):
        events.append(("compute", list(items), threading.current_thread().name))
        return [f"{p}:{i * i}" for i, p in zip(items, prepared)]

    async def main():
        return await _one_then_four(
            MicroBatcher(fn, max_batch=16, max_wait_us=0, prepare=prepare, name="one",
                         on_compute_thread=lambda: set_up.append(
                             threading.current_thread().name)), reading)

    assert run(main) == [f"user-{i}:{i * i}" for i in range(1, 6)]
    assert events == [("read", [1], "one-work"), ("compute", [1], "one-work"),
                      ("read", [2, 3, 4, 5], "one-work"), ("compute", [2, 3, 4, 5], "one-work")]
    assert set_up == ["one-work"]


def test_with_overlap_the_next_batch_is_read_while_the_one_before_it_computes():
    """Two stages: prepare (the store read) of a batch overlaps fn of the batch before it,
    fn gets each item's prepared value, and the next read holds everything that arrived."""
    events: list[tuple[str, list, float]] = []
    reading, computing = threading.Event(), threading.Event()

    def prepare(items):
        events.append(("read", list(items), time.monotonic()))
        reading.set()
        time.sleep(0.1 if items == [1] else 0)  # others queue while batch [1] is read
        return [f"user-{i}" for i in items]

    def fn(items, prepared):
        events.append(("compute", list(items), time.monotonic()))
        computing.set()
        time.sleep(0.2)
        events.append(("computed", list(items), time.monotonic()))
        return [f"{p}:{i * i}" for i, p in zip(items, prepared)]

    async def main():
        return await _one_then_four(
            MicroBatcher(fn, max_batch=16, max_wait_us=0, prepare=prepare, overlap=True),
            reading)

    assert run(main) == [f"user-{i}:{i * i}" for i in range(1, 6)]
    reads = [e for e in events if e[0] == "read"]
    first_done = next(t for kind, items, t in events if kind == "computed" and items == [1])
    assert [items for _, items, _ in reads] == [[1], [2, 3, 4, 5]]
    assert reads[1][2] < first_done  # read while batch [1] was still computing


def test_with_overlap_a_lone_batch_is_computed_without_a_hand_off_and_set_up_runs_there():
    """Nothing else queued and the compute stage idle: the thread that read the batch
    computes it (no second thread woken per call at low load), after running the compute
    stage's set-up once, as the compute thread does."""
    set_up, computed_by = [], []

    def fn(items, prepared):
        computed_by.append(threading.current_thread().name)
        return [p + 1 for p in prepared]

    async def main():
        batcher = MicroBatcher(fn, max_batch=8, max_wait_us=0, prepare=lambda items: items,
                               on_compute_thread=lambda: set_up.append(
                                   threading.current_thread().name), name="lone",
                               overlap=True)
        answers = [await batcher.submit(i) for i in range(3)]
        await batcher.close()
        return answers

    assert run(main) == [1, 2, 3]
    assert computed_by == ["lone-read"] * 3
    assert sorted(set_up) == ["lone-compute", "lone-read"]


def test_an_exception_of_prepare_reaches_every_caller_of_its_batch_only():
    def prepare(items):
        if 13 in items:
            raise ConnectionError("store down")
        return items

    async def main():
        batcher = MicroBatcher(lambda items, prepared: [p * 2 for p in prepared],
                               max_batch=4, max_wait_us=20_000, prepare=prepare)
        bad = await asyncio.gather(*(batcher.submit(i) for i in (12, 13)),
                                   return_exceptions=True)
        good = await batcher.submit(7)
        await batcher.close()
        return bad, good

    bad, good = run(main)
    assert all(isinstance(e, ConnectionError) for e in bad) and good == 14


def test_a_bug_that_stops_a_stage_fails_its_callers_and_refuses_new_ones(monkeypatch):
    async def main():
        batcher = MicroBatcher(lambda items: items, max_batch=4, max_wait_us=0)
        monkeypatch.setattr(batcher, "_call", lambda *a: 1 / 0)  # a bug outside fn
        with pytest.raises(BatcherClosed, match="stopped"):
            await asyncio.wait_for(batcher.submit(1), 5)
        with pytest.raises(BatcherClosed, match="stopped"):
            await batcher.submit(2)
        await batcher.close()

    run(main)


def test_a_caller_gone_while_its_user_is_read_is_not_computed():
    reading, release = threading.Event(), threading.Event()
    computed: list[list] = []

    def prepare(items):
        reading.set()
        release.wait(5)
        return [f"user-{i}" for i in items]

    def fn(items, prepared):
        computed.append(list(prepared))
        return [p.upper() for p in prepared]

    async def main():
        batcher = MicroBatcher(fn, max_batch=8, max_wait_us=20_000, prepare=prepare)
        gone, kept = (asyncio.create_task(batcher.submit(i)) for i in (1, 2))
        await asyncio.to_thread(reading.wait, 5)
        gone.cancel()
        release.set()
        result = await kept
        await batcher.close()
        return result

    assert run(main) == "USER-2" and computed == [["user-2"]]

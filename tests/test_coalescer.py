"""Request coalescing: concurrent look-ups share fetches, every caller gets its own result,
failures stay with the callers they belong to, and a caller that leaves is dropped."""

from __future__ import annotations

import asyncio

import pytest

from retrieval.coalescer import Coalescer

pytestmark = pytest.mark.timeout(30)


class Fetcher:
    """A fetch of many keys at once (squares them) that remembers the batches it saw;
    ``gate`` holds every fetch until it is set."""

    def __init__(self, fail_key: object = None, bad_key: object = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_key, self.bad_key = fail_key, bad_key
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, keys: list[int]) -> list[int | BaseException]:
        self.batches.append(list(keys))
        await self.gate.wait()
        if self.fail_key in keys:
            raise ConnectionError(f"the store went away while fetching {keys}")
        return [ValueError(f"key {k} is unreadable") if k == self.bad_key else k * k
                for k in keys]


def test_calls_made_together_share_one_fetch_and_each_gets_its_own_result():
    fetch = Fetcher()

    async def main():
        reads = Coalescer(fetch, max_batch=64, max_in_flight=1)
        return await asyncio.gather(*(reads.get(k) for k in range(40)))

    assert asyncio.run(main()) == [k * k for k in range(40)]
    assert fetch.batches == [list(range(40))]


def test_calls_made_while_fetches_run_go_in_the_next_batch_up_to_max_batch():
    fetch = Fetcher()

    async def main():
        reads = Coalescer(fetch, max_batch=8, max_in_flight=1)
        fetch.gate.clear()
        first = asyncio.ensure_future(reads.get(0))
        await asyncio.sleep(0.01)  # the first fetch is running now
        later = [asyncio.ensure_future(reads.get(k)) for k in range(1, 21)]
        await asyncio.sleep(0.01)
        assert fetch.batches == [[0]], "no second fetch while max_in_flight are running"
        fetch.gate.set()
        return await asyncio.gather(first, *later)

    assert asyncio.run(main()) == [k * k for k in range(21)]
    assert fetch.batches == [[0], list(range(1, 9)), list(range(9, 17)), list(range(17, 21))]


def test_a_bad_key_fails_its_own_caller_and_the_others_still_get_theirs():
    fetch = Fetcher(bad_key=3)

    async def main():
        reads = Coalescer(fetch)
        return await asyncio.gather(*(reads.get(k) for k in range(6)), return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[3], ValueError) and "key 3" in str(results[3])
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 4, 16, 25]


def test_a_failed_fetch_reaches_every_caller_of_its_batch_and_the_next_batch_runs():
    fetch = Fetcher(fail_key=2)

    async def main():
        reads = Coalescer(fetch, max_in_flight=1)
        failed = await asyncio.gather(*(reads.get(k) for k in range(4)), return_exceptions=True)
        return failed, await reads.get(5)

    failed, after = asyncio.run(main())
    assert all(isinstance(r, ConnectionError) for r in failed)
    assert after == 25


def test_a_caller_that_leaves_before_its_batch_starts_is_not_fetched():
    fetch = Fetcher()

    async def main():
        reads = Coalescer(fetch, max_in_flight=1)
        fetch.gate.clear()
        running = asyncio.ensure_future(reads.get(0))
        await asyncio.sleep(0.01)
        leaving = asyncio.ensure_future(reads.get(1))
        staying = asyncio.ensure_future(reads.get(2))
        await asyncio.sleep(0.01)
        leaving.cancel()
        fetch.gate.set()
        return await running, await staying, leaving.cancelled()

    assert asyncio.run(main()) == (0, 4, True)
    assert fetch.batches == [[0], [2]]


def test_a_caller_that_times_out_during_its_fetch_leaves_the_others_answered():
    fetch = Fetcher()

    async def main():
        reads = Coalescer(fetch, max_in_flight=1)
        fetch.gate.clear()

        async def impatient():
            async with asyncio.timeout(0.01):
                return await reads.get(7)

        tasks = [asyncio.ensure_future(impatient()), asyncio.ensure_future(reads.get(3))]
        await asyncio.sleep(0.05)
        fetch.gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    timed_out, answered = asyncio.run(main())
    assert isinstance(timed_out, TimeoutError) and answered == 9


@pytest.mark.parametrize("name, value", [("max_batch", 0), ("max_in_flight", 0),
                                         ("max_batch", 2.5), ("max_in_flight", True)])
def test_options_are_checked_when_made(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be an integer >= 1 \(got {value!r}\)"):
        Coalescer(Fetcher(), **{name: value})

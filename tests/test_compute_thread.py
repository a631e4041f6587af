"""The compute thread searches with the OpenMP thread count it is configured with."""

import asyncio

import faiss
import pytest

from retrieval.feature_store import InMemoryFeatureStore
from retrieval.retriever import BatchingConfig, Retriever


@pytest.mark.parametrize("threads", [1, 2])
def test_faiss_in_the_compute_thread_uses_the_configured_threads(threads):
    # omp_set_num_threads is per calling thread: set on the event loop's thread only, the
    # compute thread would search with one OpenMP thread per core, spinning between batches.
    faiss.omp_set_num_threads(1)
    retriever = Retriever(InMemoryFeatureStore(), batching=BatchingConfig(faiss_threads=threads))
    try:
        assert retriever._executor.submit(faiss.omp_get_max_threads).result() == threads
    finally:
        asyncio.run(retriever.close())


@pytest.mark.parametrize("field", ["max_batch", "max_queue", "threads", "faiss_threads"])
def test_a_batching_config_below_one_is_refused_naming_the_field(field):
    with pytest.raises(ValueError, match=f"{field} must be an integer >= 1"):
        BatchingConfig(**{field: 0})


def test_the_default_search_uses_two_threads_unless_one_core_is_usable(monkeypatch):
    from retrieval.retriever import default_faiss_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert BatchingConfig().faiss_threads == default_faiss_threads() == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {3})
    assert BatchingConfig().faiss_threads == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert default_faiss_threads((2,)) == 1  # a worker pinned to one CPU (retrieval.cpus)


def test_overlap_reads_must_be_a_boolean():
    with pytest.raises(ValueError, match="overlap_reads must be true or false"):
        BatchingConfig(overlap_reads="yes")


def test_a_search_of_a_few_queries_runs_on_one_openmp_thread_and_a_larger_on_all():
    """A second OpenMP thread costs a wake-up that 2-3 queries do not repay
    (candidate_index.PARALLEL_QUERIES); the answers do not depend on it."""
    import threading

    import numpy as np

    from retrieval.candidate_index import PARALLEL_QUERIES, use_search_threads
    from tests.test_seen_items import D, _index

    index, _ = _index("IVF16,Flat", {"nprobe": 16})
    xq = np.random.default_rng(5).normal(size=(PARALLEL_QUERIES, D)).astype(np.float32)
    seen = {}

    def search_in_a_thread_of_its_own() -> None:  # (as the compute thread does)
        use_search_threads(2)
        for n in (1, PARALLEL_QUERIES - 1, PARALLEL_QUERIES, 1):
            found = index.search(xq[:n], 10, [frozenset()] * n)
            seen.setdefault(n, []).append((faiss.omp_get_max_threads(),
                                           [c.item_ids for c in found]))

    thread = threading.Thread(target=search_in_a_thread_of_its_own)
    thread.start()
    thread.join()
    assert [threads for threads, _ in seen[1]] == [1, 1]
    assert seen[PARALLEL_QUERIES - 1][0][0] == 1 and seen[PARALLEL_QUERIES][0][0] == 2
    # the same candidates for the first query however many threads searched it
    assert seen[PARALLEL_QUERIES][0][1][0] == seen[1][0][1][0]
    with pytest.raises(ValueError, match="search threads must be an integer >= 1"):
        use_search_threads(0)

"""The compute thread searches with the OpenMP thread count it is configured with."""

import asyncio

import faiss

from retrieval.feature_store import InMemoryFeatureStore
from retrieval.retriever import BatchingConfig, Retriever


def test_faiss_in_the_compute_thread_uses_the_configured_threads():
    # omp_set_num_threads is per calling thread: set on the event loop's thread only, the
    # compute thread would search with one OpenMP thread per core, spinning between batches.
    faiss.omp_set_num_threads(1)
    retriever = Retriever(InMemoryFeatureStore(), batching=BatchingConfig(faiss_threads=1))
    try:
        assert retriever._executor.submit(faiss.omp_get_max_threads).result() == 1
    finally:
        asyncio.run(retriever.close())

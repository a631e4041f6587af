"""The request path as plain code: query → features → user tower → ANN → candidates."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from retrieval.candidate_index import Candidates
from retrieval.errors import DeadlineExceeded, FailedPrecondition
from retrieval.feature_store import FeatureStore
from retrieval.metrics import ServiceMetrics
from retrieval.pair import ServingPair
from retrieval.query import Limits, RetrieveQuery, validate_interactions, validate_query
from training.inputs import UserRequest, user_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrieveResult:
    candidates: Candidates
    model_version: str
    index_version: str


class Retriever:
    """Holds the serving pair and the feature store; one instance per server."""

    def __init__(self, store: FeatureStore, limits: Limits = Limits(),
                 history_ttl_s: int | None = None,
                 metrics: ServiceMetrics | None = None) -> None:
        self.store, self.limits, self.history_ttl_s = store, limits, history_ttl_s
        self.metrics = metrics or ServiceMetrics()
        self._pair: ServingPair | None = None

    @property
    def pair(self) -> ServingPair | None:
        return self._pair

    def set_pair(self, pair: ServingPair) -> None:
        self._pair = pair  # one reference swap: a request uses the pair it started with
        self.metrics.set_serving(pair.model_version, pair.index_version)

    async def retrieve(self, query: RetrieveQuery, deadline: float | None = None
                       ) -> RetrieveResult:
        """``deadline``: time.monotonic() after which the answer is of no use to the caller."""
        pair = self._pair
        if pair is None:
            raise FailedPrecondition("no model and index loaded yet")
        validate_query(query, pair.model.feature_spec, self.limits)
        with self.metrics.stage("Retrieve", "features"):
            stored = await self._get_user(query.user_id)
        _check_deadline(deadline, "after reading features")
        request = UserRequest(
            user_id=query.user_id,
            features=stored.features if stored else {},
            history=query.recent_item_ids or (stored.history if stored else ()),
            context=query.context,
            event_time=query.event_time,
        )
        candidates = await asyncio.to_thread(self._embed_and_search, pair, request, query)
        return RetrieveResult(candidates, pair.model_version, pair.index_version)

    async def _get_user(self, user_id: str):
        try:
            return await self.store.get_user(user_id)
        except Exception:
            self.metrics.feature_store_errors.inc()
            raise

    def _embed_and_search(self, pair: ServingPair, request: UserRequest,
                          query: RetrieveQuery) -> Candidates:
        with self.metrics.stage("Retrieve", "tower"):
            user_emb = pair.user_tower(user_inputs(pair.model.feature_spec, [request]))
        self.metrics.batch_size.observe(1)
        with self.metrics.stage("Retrieve", "ann"):
            return pair.index.search(user_emb, query.k, [query.exclude_item_ids])[0]

    async def record_interactions(self, events: list[tuple[str, str]], batch: bool = True) -> int:
        """Append the events to their users' histories; returns how many were recorded."""
        validate_interactions(events, self.limits, batch)
        await self.store.record_interactions(events, self.history_ttl_s)
        return len(events)


def _check_deadline(deadline: float | None, where: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(f"deadline passed {where}; the work was not done")

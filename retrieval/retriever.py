"""The request path as plain code: query → features → user tower → ANN → candidates."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from retrieval.candidate_index import Candidates
from retrieval.errors import FailedPrecondition
from retrieval.feature_store import FeatureStore
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
                 history_ttl_s: int | None = None) -> None:
        self.store, self.limits, self.history_ttl_s = store, limits, history_ttl_s
        self._pair: ServingPair | None = None

    @property
    def pair(self) -> ServingPair | None:
        return self._pair

    def set_pair(self, pair: ServingPair) -> None:
        self._pair = pair  # one reference swap: a request uses the pair it started with

    async def retrieve(self, query: RetrieveQuery) -> RetrieveResult:
        pair = self._pair
        if pair is None:
            raise FailedPrecondition("no model and index loaded yet")
        validate_query(query, pair.model.feature_spec, self.limits)
        stored = await self.store.get_user(query.user_id)
        request = UserRequest(
            user_id=query.user_id,
            features=stored.features if stored else {},
            history=query.recent_item_ids or (stored.history if stored else ()),
            context=query.context,
            event_time=query.event_time,
        )
        candidates = await asyncio.to_thread(_embed_and_search, pair, request, query)
        return RetrieveResult(candidates, pair.model_version, pair.index_version)

    async def record_interactions(self, events: list[tuple[str, str]], batch: bool = True) -> int:
        """Append the events to their users' histories; returns how many were recorded."""
        validate_interactions(events, self.limits, batch)
        await self.store.record_interactions(events, self.history_ttl_s)
        return len(events)


def _embed_and_search(pair: ServingPair, request: UserRequest, query: RetrieveQuery) -> Candidates:
    inputs = user_inputs(pair.model.feature_spec, [request])
    user_emb = pair.user_tower(inputs)
    return pair.index.search(user_emb, query.k, [query.exclude_item_ids])[0]

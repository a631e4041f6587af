"""Thin gRPC layer: decode proto → Retriever → encode proto, and the error interceptor."""

from __future__ import annotations

import logging
import time
import uuid

import grpc

from retrieval.errors import InvalidArgument, status_of
from retrieval.metrics import ServiceMetrics
from retrieval.query import ItemRules, RetrieveQuery
from retrieval.retriever import RetrieveResult, Retriever
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class RetrievalServicer(pb_grpc.RetrievalServiceServicer):
    def __init__(self, retriever: Retriever) -> None:
        self.retriever = retriever

    async def Retrieve(self, request: pb.RetrieveRequest, context) -> pb.RetrieveResponse:
        query = decode_retrieve(request)
        result = await self.retriever.retrieve(query, _deadline(context))
        return encode_retrieve(result, query.request_id)

    async def BatchRetrieve(self, request: pb.BatchRetrieveRequest, context
                            ) -> pb.BatchRetrieveResponse:
        queries = []
        for i, r in enumerate(request.requests):
            try:
                queries.append(decode_retrieve(r))
            except InvalidArgument as exc:
                raise InvalidArgument(f"requests[{i}].{exc.field}",
                                      str(exc).split(": ", 1)[1]) from None
        results = await self.retriever.batch_retrieve(queries, _deadline(context))
        return pb.BatchRetrieveResponse(responses=[
            encode_retrieve(result, q.request_id) for result, q in zip(results, queries, strict=True)])

    async def SimilarItems(self, request: pb.SimilarItemsRequest, context
                           ) -> pb.SimilarItemsResponse:
        result = await self.retriever.similar_items(request.item_id, request.k,
                                                    frozenset(request.exclude_item_ids))
        c = result.candidates
        return pb.SimilarItemsResponse(
            candidates=[pb.Candidate(item_id=i, score=s)
                        for i, s in zip(c.item_ids, c.scores, strict=True)],
            model_version=result.model_version, index_version=result.index_version)

    async def RecordInteraction(self, request: pb.Interaction, context
                                ) -> pb.RecordInteractionsResponse:
        recorded = await self.retriever.record_interactions(
            [(request.user_id, request.item_id)], batch=False)
        return pb.RecordInteractionsResponse(recorded=recorded)

    async def RecordInteractions(self, request: pb.RecordInteractionsRequest, context
                                 ) -> pb.RecordInteractionsResponse:
        events = [(i.user_id, i.item_id) for i in request.interactions]
        return pb.RecordInteractionsResponse(
            recorded=await self.retriever.record_interactions(events))


def _deadline(context) -> float | None:
    """The caller's deadline as time.monotonic(), or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def decode_retrieve(request: pb.RetrieveRequest) -> RetrieveQuery:
    context = {}
    for key, value in request.context.items():
        which = value.WhichOneof("value")
        if which is None:
            raise InvalidArgument(f"context[{key!r}]", "no value set")
        context[key] = getattr(value, which)
    return RetrieveQuery(
        user_id=request.user_id,
        k=request.k,
        context=context,
        event_time=request.event_time_unix_seconds or int(time.time()),
        recent_item_ids=tuple(request.recent_item_ids),
        exclude_item_ids=frozenset(request.exclude_item_ids),
        request_id=request.request_id or uuid.uuid4().hex,
        rules=ItemRules({c: frozenset(v.values) for c, v in request.allow.items()},
                        {c: frozenset(v.values) for c, v in request.block.items()}),
        exclude_seen=request.exclude_seen,
    )


def encode_retrieve(result: RetrieveResult, request_id: str) -> pb.RetrieveResponse:
    c = result.candidates
    return pb.RetrieveResponse(
        candidates=[pb.Candidate(item_id=i, score=s) for i, s in zip(c.item_ids, c.scores, strict=True)],
        model_version=result.model_version,
        index_version=result.index_version,
        request_id=request_id,
        degraded=result.degraded,
    )


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The one place exceptions become statuses (retrieval.errors.status_of); it also
    counts every finished call by code and times it."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, method = handler.unary_unary, handler_call_details.method
        rpc = method.rsplit("/", 1)[-1]

        async def guarded(request, context):
            code = grpc.StatusCode.OK
            try:
                with self.metrics.stage(rpc, "total"):
                    return await inner(request, context)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as exc:  # noqa: BLE001 - the boundary: everything is mapped here
                status = status_of(exc)
                if status is None:
                    log.exception("internal error in %s", method,
                                  extra={"request_id": getattr(request, "request_id", "")})
                    status = (grpc.StatusCode.INTERNAL, "internal error")
                code = status[0]
                await context.abort(*status)
            finally:
                self.metrics.requests.labels(rpc, code.name).inc()

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

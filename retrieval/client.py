"""A small client: a channel (TLS, bearer token), one Retrieve call, the reply as a table."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc

from retrieval.security import ClientTls
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Reply:
    response: pb.RetrieveResponse
    latency_ms: float


def context_value(value: str | int | float) -> pb.ContextValue:
    if isinstance(value, bool):
        raise TypeError("context values are str, int or float")
    if isinstance(value, int):
        return pb.ContextValue(int_value=value)
    if isinstance(value, float):
        return pb.ContextValue(double_value=value)
    return pb.ContextValue(string_value=value)


def parse_context_arg(text: str) -> tuple[str, str | int | float]:
    """"key=value" from the command line; integers and floats are typed as such."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"context must be key=value (got {text!r})")
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, raw


def build_request(user_id: str, k: int, context: Mapping[str, str | int | float] = {},
                  event_time: int = 0, recent: Sequence[str] = (), exclude: Sequence[str] = (),
                  request_id: str = "") -> pb.RetrieveRequest:
    return pb.RetrieveRequest(
        user_id=user_id, k=k, context={k_: context_value(v) for k_, v in context.items()},
        event_time_unix_seconds=event_time, recent_item_ids=list(recent),
        exclude_item_ids=list(exclude), request_id=request_id,
    )


class BearerToken(grpc.aio.UnaryUnaryClientInterceptor):
    """Client side: adds ``authorization: Bearer <token>`` to every unary call. An
    interceptor rather than call credentials so that it works on a plaintext channel too
    (e.g. behind a mesh that terminates TLS); the token is then readable on the wire."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:
        return "BearerToken(<redacted>)"

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), self._header)
        details = client_call_details._replace(metadata=metadata)
        return await continuation(details, request)


def open_channel(address: str, tls: ClientTls | None = None,
                 token: str | None = None) -> grpc.aio.Channel:
    """An aio channel to ``address``: TLS when ``tls`` is given, with a bearer token when
    ``token`` is. Plaintext only when asked for (tls None); never a fallback."""
    interceptors = [BearerToken(token)] if token else None
    if tls is None:
        return grpc.aio.insecure_channel(address, interceptors=interceptors)
    return grpc.aio.secure_channel(address, tls.channel_credentials(),
                                   options=tls.channel_options(), interceptors=interceptors)


async def retrieve(channel: grpc.aio.Channel, request: pb.RetrieveRequest,
                   timeout: float = 5.0) -> Reply:
    stub = pb_grpc.RetrievalServiceStub(channel)
    start = time.perf_counter()
    response = await stub.Retrieve(request, timeout=timeout)
    return Reply(response, (time.perf_counter() - start) * 1000)


def format_reply(reply: Reply, limit: int | None = None) -> str:
    r = reply.response
    lines = [f"model {r.model_version}  index {r.index_version}  request {r.request_id}  "
             f"{reply.latency_ms:.2f} ms",
             f"{'rank':>4}  {'item_id':<16} {'score':>9}"]
    for rank, c in enumerate(r.candidates[:limit], start=1):
        lines.append(f"{rank:>4}  {c.item_id:<16} {c.score:>9.4f}")
    if limit is not None and len(r.candidates) > limit:
        lines.append(f"   … {len(r.candidates) - limit} more")
    return "\n".join(lines)

"""Abuse of the request path, as an independent probe did it (issue 20, items 6-8), against
real `two-tower serve` processes over real gRPC:

- without a token, a body that does not parse is UNAUTHENTICATED, not INVALID_ARGUMENT
  naming a field: credentials are checked before anything is read of the request;
- a 100 KiB unknown context key, ``allow`` column, ``hour_of_day`` string or SimilarItems
  item id is INVALID_ARGUMENT naming the field in a short message (the whole value in the
  message overflowed gRPC's 16 KiB metadata limit: RESOURCE_EXHAUSTED, "Stream removed");
- a 3 MiB context value, and a BatchRetrieve asking for more candidates in all than the
  documented limit, are refused naming the field; just under the limits still works.
"""

from __future__ import annotations

import grpc
import pytest

from retrieval.query import Limits
from retrieval.security import INVALID_TOKEN, MISSING_TOKEN
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as pb_grpc
from tests.conftest import start_server, stop_server

SERVICE = "/two_tower.retrieval.v1.RetrievalService/"
TOKEN = "limits-test-token-0123456789abcdef"
HUGE = "x" * (100 << 10)  # 100 KiB: far over gRPC's 16 KiB limit on a status message
SHORT_MESSAGE = 1024
LIMITS = Limits()
NOT_UTF8_USER_ID = b"\x0a\x02\xff\xfe" + b"\x10\x0a"  # user_id = b"\xff\xfe", k = 10


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.RetrievalServiceStub(channel)


@pytest.fixture(scope="module")
def token_server(pipeline, tmp_path_factory):
    """Bearer tokens on a plaintext port (TLS is tests/test_security.py's subject)."""
    workdir = tmp_path_factory.mktemp("token-server")
    tokens = workdir / "tokens"
    tokens.write_text(f"limits:{TOKEN}\n")
    running = start_server(["--model", str(pipeline.model_dir), "--index",
                            str(pipeline.index_dir), "--features", str(pipeline.data_dir),
                            "--watch-interval", "0", "--auth-tokens-file", str(tokens)], workdir)
    yield running
    stop_server(running)


def _refusal(call, request, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30, **kw)
    return caught.value.code(), caught.value.details() or ""


def _raw(channel: grpc.Channel, method: str):
    return channel.unary_unary(SERVICE + method, request_serializer=lambda raw: raw,
                               response_deserializer=lambda raw: raw)


def _invalid(stub_call, request, field: str) -> str:
    code, details = _refusal(stub_call, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details[:300])
    assert details.startswith(field), details[:300]
    assert len(details) < SHORT_MESSAGE, len(details)
    return details


# --- 6: credentials before parsing ----------------------------------------------------------


@pytest.mark.parametrize("method", ["Retrieve", "BatchRetrieve", "SimilarItems",
                                    "RecordInteractions"])
def test_an_unparseable_body_without_a_token_is_unauthenticated_naming_no_field(
        token_server, method):
    with grpc.insecure_channel(token_server.address) as channel:
        call = _raw(channel, method)
        for body in (NOT_UTF8_USER_ID, b"\xff\xff\xff\xff", b"\x0a\x7f"):  # bad UTF-8, cut short
            assert _refusal(call, body) == (grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)
            assert _refusal(call, body, metadata=[("authorization", "Bearer wrong-token-0123")]
                            ) == (grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN)


def test_a_body_over_the_message_limit_without_a_token_names_no_field(token_server):
    """gRPC refuses it on receipt (--max-message-bytes), before any handler: the caller
    learns the transport's limit, nothing of the API."""
    with grpc.insecure_channel(token_server.address) as channel:
        code, details = _refusal(_raw(channel, "Retrieve"), b"\x0a" * (5 << 20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert "RetrieveRequest" not in details and "user_id" not in details, details


def test_with_a_valid_token_the_same_body_is_invalid_argument_naming_the_field(token_server):
    with grpc.insecure_channel(token_server.address) as channel:
        code, details = _refusal(_raw(channel, "Retrieve"), NOT_UTF8_USER_ID,
                                 metadata=[("authorization", f"Bearer {TOKEN}")])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("user_id:"), details


# --- 8: a caller's value is never echoed whole ----------------------------------------------


def test_a_huge_unknown_context_key_is_invalid_argument_in_a_short_message(stub, server):
    request = pb.RetrieveRequest(user_id="u1", k=5,
                                 context={HUGE: pb.ContextValue(string_value="tv")})
    details = _invalid(stub.Retrieve, request, "context[")
    assert f"at most {LIMITS.max_name_bytes} bytes" in details
    assert HUGE[:1000] not in server.log()


def test_a_huge_allow_or_block_column_is_invalid_argument_in_a_short_message(stub):
    for rule in ("allow", "block"):
        request = pb.RetrieveRequest(user_id="u1", k=5,
                                     **{rule: {HUGE: pb.StringList(values=["cat1"])}})
        _invalid(stub.Retrieve, request, f"{rule}[")


def test_a_long_but_allowed_unknown_name_is_quoted_short(stub):
    name = "n" * LIMITS.max_name_bytes  # within the limit, unknown: the message quotes it cut
    request = pb.RetrieveRequest(user_id="u1", k=5,
                                 context={name: pb.ContextValue(string_value="tv")})
    details = _invalid(stub.Retrieve, request, "context[")
    assert "unknown context feature" in details and name not in details
    allow = pb.RetrieveRequest(user_id="u1", k=5, allow={name: pb.StringList(values=["a"])})
    assert "unknown item metadata column" in _invalid(stub.Retrieve, allow, "allow[")


def test_a_huge_hour_of_day_string_is_invalid_argument_in_a_short_message(stub):
    request = pb.RetrieveRequest(user_id="u1", k=5,
                                 context={"hour_of_day": pb.ContextValue(string_value=HUGE)})
    _invalid(stub.Retrieve, request, "context['hour_of_day']:")


def test_a_huge_similar_items_id_is_invalid_argument_in_a_short_message(stub):
    details = _invalid(stub.SimilarItems, pb.SimilarItemsRequest(item_id=HUGE, k=5), "item_id:")
    assert f"at most {LIMITS.max_item_id_bytes} bytes" in details
    # an unknown id within the limit is NOT_FOUND, and quoted short too
    code, details = _refusal(stub.SimilarItems,
                             pb.SimilarItemsRequest(item_id="z" * LIMITS.max_item_id_bytes, k=5))
    assert code == grpc.StatusCode.NOT_FOUND and len(details) < SHORT_MESSAGE, details


def test_a_huge_id_inside_a_batch_names_the_request(stub):
    requests = [pb.RetrieveRequest(user_id="u1", k=5),
                pb.RetrieveRequest(user_id="u1", k=5,
                                   context={HUGE: pb.ContextValue(string_value="tv")})]
    _invalid(stub.BatchRetrieve, pb.BatchRetrieveRequest(requests=requests), "requests[1].context[")


# --- 7: limits on context values and on a batch's reply -------------------------------------


def test_a_3_mib_context_value_is_invalid_argument(stub):
    request = pb.RetrieveRequest(user_id="u1", k=5, context={
        "device": pb.ContextValue(string_value="d" * (3 << 20))})
    details = _invalid(stub.Retrieve, request, "context['device']:")
    assert f"at most {LIMITS.max_context_value_bytes} bytes" in details


def test_a_context_value_at_the_limit_is_served(stub):
    request = pb.RetrieveRequest(user_id="u1", k=5, context={
        "device": pb.ContextValue(string_value="d" * LIMITS.max_context_value_bytes)})
    assert len(stub.Retrieve(request, timeout=30).candidates) == 5


def test_a_batch_asking_for_too_many_candidates_in_all_is_refused_naming_the_field(stub):
    per_request = LIMITS.max_k
    over = LIMITS.max_batch_candidates // per_request + 1
    requests = [pb.RetrieveRequest(user_id=f"u{i}", k=per_request) for i in range(over)]
    details = _invalid(stub.BatchRetrieve, pb.BatchRetrieveRequest(requests=requests),
                       "requests:")
    assert f"at most {LIMITS.max_batch_candidates}" in details
    assert f"got {over * per_request}" in details


def test_a_batch_at_the_candidate_limit_is_served(stub):
    per_request = LIMITS.max_k
    n = LIMITS.max_batch_candidates // per_request
    requests = [pb.RetrieveRequest(user_id=f"u{i}", k=per_request) for i in range(n)]
    reply = stub.BatchRetrieve(pb.BatchRetrieveRequest(requests=requests), timeout=60)
    assert len(reply.responses) == n and all(r.candidates for r in reply.responses)

"""The gRPC service as a caller sees it: a real server process on a loopback port."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retrieval.client import build_request
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as pb_grpc
from tests.conftest import start_server, stop_server

NIGHT = {"hour_of_day": 22, "device": "tv"}
WEDNESDAY = 1_700_611_200


@pytest.fixture(params=["in-process store", "redis store"])
def address(request) -> str:
    if request.param == "in-process store":
        return request.getfixturevalue("server").address
    running, _ = request.getfixturevalue("redis_backed_server")
    return running.address


@pytest.fixture
def stub(address):
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.RetrievalServiceStub(channel)


def retrieve(stub, user="u1", k=10, context=NIGHT, **kw):
    return stub.Retrieve(build_request(user, k, context, WEDNESDAY, **kw), timeout=10)


def test_health_is_serving_once_loaded(address):
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "two_tower.retrieval.v1.RetrievalService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_retrieve_returns_k_distinct_items_best_first_with_versions(stub, pipeline):
    reply = retrieve(stub, k=50)
    ids = [c.item_id for c in reply.candidates]
    scores = [c.score for c in reply.candidates]
    assert len(ids) == 50 and len(set(ids)) == 50
    assert scores == sorted(scores, reverse=True)
    assert reply.model_version == pipeline.model_dir.name
    assert reply.index_version == pipeline.index_dir.name


def test_excluded_items_are_absent_and_k_is_still_met(stub):
    first = [c.item_id for c in retrieve(stub, k=10).candidates]
    reply = retrieve(stub, k=10, exclude=first[:5] + ["retired-item-not-in-index"])
    ids = [c.item_id for c in reply.candidates]
    assert len(ids) == 10 and not set(ids) & set(first[:5])
    assert ids[:5] == first[5:]


def test_context_changes_the_candidates(stub):
    day = [c.item_id for c in retrieve(stub, context={"hour_of_day": 10, "device": "mobile"}).candidates]
    night = [c.item_id for c in retrieve(stub, context=NIGHT).candidates]
    assert day != night


def test_recent_items_in_the_request_change_the_candidates(stub):
    plain = [c.item_id for c in retrieve(stub, user="never-seen").candidates]
    recent = [c.item_id for c in retrieve(stub, user="never-seen", recent=["i1", "i2", "i3"]).candidates]
    assert plain != recent


def test_unknown_user_is_answered_from_context(stub):
    reply = retrieve(stub, user="a-user-nobody-has-seen", k=20)
    assert len(reply.candidates) == 20


def test_request_id_is_echoed(stub):
    assert retrieve(stub, request_id="abc-123").request_id == "abc-123"


@pytest.mark.parametrize("kwargs, field", [
    (dict(k=0), "k"),
    (dict(k=5000), "k"),
    (dict(user=""), "user_id"),
    (dict(context={"weather": "rain"}), "context['weather']"),
    (dict(context={"device": 3}), "context['device']"),
    (dict(context={"hour_of_day": "22"}), "context['hour_of_day']"),
    (dict(context={"hour_of_day": 24}), "context['hour_of_day']"),
    (dict(request_id="r" * 129), "request_id"),
    (dict(recent=["i1", "é" * 129]), "recent_item_ids[1]"),
])
def test_bad_input_is_invalid_argument_naming_the_field(stub, kwargs, field):
    with pytest.raises(grpc.RpcError) as err:
        retrieve(stub, **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()


def test_query_command_prints_the_candidates_as_a_table(server):
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "query", "--address", server.address,
         "--user-id", "u3", "--k", "5", "--context", "hour_of_day=22", "--context", "device=tv"],
        capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 5 and "item_id" in out and "model m-" in out


def test_query_command_reports_the_status_of_a_bad_request(server):
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "query", "--address", server.address,
         "--user-id", "u3", "--k", "0"], capture_output=True, text=True)
    assert done.returncode == 1 and "INVALID_ARGUMENT: k: must be in [1, 1000]" in done.stderr


def test_server_refuses_to_start_on_a_mismatched_pair(pipeline, tmp_path):
    import json
    import shutil

    index_copy = tmp_path / "index"
    shutil.copytree(pipeline.index_dir, index_copy)
    doc = json.loads((index_copy / "manifest.json").read_text())
    doc["model_version"] = "m-some-other-model"
    (index_copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(RuntimeError) as err:
        start_server(["--model", str(pipeline.model_dir), "--index", str(index_copy)], tmp_path)
    assert "index was built from model 'm-some-other-model'" in str(err.value)
    assert str(index_copy / "manifest.json") in str(err.value)


def test_sigterm_stops_the_server_cleanly(pipeline, tmp_path):
    running = start_server(["--model", str(pipeline.model_dir), "--index",
                            str(pipeline.index_dir)], tmp_path)
    assert stop_server(running) == 0


def test_recorded_interactions_reach_the_next_retrieve(stub, request):
    user = f"recorder-{request.node.callspec.id}"
    before = [c.item_id for c in retrieve(stub, user=user).candidates]
    events = [pb.Interaction(user_id=user, item_id=i) for i in ("i1", "i2", "i3")]
    reply = stub.RecordInteractions(pb.RecordInteractionsRequest(interactions=events), timeout=10)
    assert reply.recorded == 3
    after = [c.item_id for c in retrieve(stub, user=user).candidates]
    as_if_passed = [c.item_id for c in retrieve(stub, user="someone-else",
                                                  recent=["i3", "i2", "i1"]).candidates]
    assert after != before and after == as_if_passed
    single = stub.RecordInteraction(pb.Interaction(user_id=user, item_id="i4"), timeout=10)
    assert single.recorded == 1


@pytest.mark.parametrize("events, field", [
    ([("u", "i1"), ("u", "")], "interactions[1].item_id"),
    ([("", "i1")], "interactions[0].user_id"),
    ([], "interactions"),
    ([("u", "i1"), ("u", "x" * 257)], "interactions[1].item_id"),
])
def test_bad_interactions_are_invalid_argument_naming_the_field(stub, events, field):
    request = pb.RecordInteractionsRequest(
        interactions=[pb.Interaction(user_id=u, item_id=i) for u, i in events])
    with pytest.raises(grpc.RpcError) as err:
        stub.RecordInteractions(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()


def test_metrics_endpoint_exposes_stage_latencies_and_codes(server):
    import urllib.request

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        retrieve(stub, k=5)
        with pytest.raises(grpc.RpcError):
            retrieve(stub, k=0)
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        with pytest.raises(grpc.RpcError):
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for stage in ("features", "tower", "ann", "total"):
        assert f'two_tower_stage_seconds_count{{rpc="Retrieve",stage="{stage}"}}' in text
    assert 'two_tower_requests_total{code="INVALID_ARGUMENT",rpc="Retrieve"}' in text
    assert 'two_tower_requests_total{code="OK",rpc="Retrieve"}' in text
    # every service's calls are counted, the health service's too
    assert 'two_tower_requests_total{code="OK",rpc="Check"}' in text
    assert 'two_tower_requests_total{code="NOT_FOUND",rpc="Check"}' in text
    assert "two_tower_serving_info{index_version=" in text


def test_an_expired_deadline_is_deadline_exceeded(stub):
    # gRPC sends a timeout rounded up to whole milliseconds, so even 1 µs is now and then
    # met by a fast call over loopback: a few tries, each DEADLINE_EXCEEDED or answered,
    # never another status. Deadlines the server itself checks: the test below.
    codes = []
    for _ in range(20):
        try:
            stub.Retrieve(build_request("u1", 10, NIGHT, WEDNESDAY), timeout=1e-6)
        except grpc.RpcError as err:
            codes.append(err.code())
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                break
    assert codes and set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert retrieve(stub).candidates  # and the server keeps answering


def test_the_server_does_no_work_for_a_call_whose_deadline_has_passed(pipeline):
    """Before queueing, and in the batch when it passed while the call waited: the call
    gets DeadlineExceeded and its user is not read."""
    import asyncio
    import time

    from contracts.errors import DeadlineExceeded
    from retrieval.feature_store import InMemoryFeatureStore
    from retrieval.pair import load_pair
    from retrieval.query import ItemRules, RetrieveQuery
    from retrieval.retriever import Retriever, _Job

    class CountingStore(InMemoryFeatureStore):
        reads = 0

        def read_users(self, user_ids):
            CountingStore.reads += len(user_ids)
            return super().read_users(user_ids)

    retriever = Retriever(CountingStore())
    pair = load_pair(pipeline.model_dir, pipeline.index_dir)
    retriever.set_pair(pair)
    query = RetrieveQuery(user_id="u1", k=10, context=NIGHT, event_time=WEDNESDAY,
                          recent_item_ids=(), exclude_item_ids=frozenset(), request_id="r",
                          rules=ItemRules({}, {}), exclude_seen=False)
    try:
        past = time.monotonic() - 0.001
        with pytest.raises(DeadlineExceeded, match="before the request was queued"):
            asyncio.run(retriever.retrieve(query, past))
        answers = retriever._embed_and_search_batch([_Job(pair, query, past),
                                                     _Job(pair, query, None)])
        assert isinstance(answers[0], DeadlineExceeded) and len(answers[1].candidates.rows) == 10
        assert CountingStore.reads == 1  # the live call's user only
    finally:
        asyncio.run(retriever.close())


def test_concurrent_calls_are_batched_and_answered_as_if_alone(server):
    """64 calls at once share tower and ANN calls, and each gets exactly the candidates it
    gets when sent alone."""
    import asyncio
    import re
    import urllib.request

    from retrieval.client import retrieve as call

    requests = [build_request(f"u{i}", 5 + i % 20, NIGHT if i % 2 else {"hour_of_day": 9},
                              WEDNESDAY, exclude=["i1"] if i % 3 == 0 else ())
                for i in range(64)]

    def batches() -> tuple[float, float]:
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
        count = float(re.search(r"two_tower_batch_size_count (\S+)", text).group(1))
        total = float(re.search(r"two_tower_batch_size_sum (\S+)", text).group(1))
        return count, total

    async def run(concurrently: bool):
        async with grpc.aio.insecure_channel(server.address) as channel:
            if concurrently:
                replies = await asyncio.gather(*(call(channel, r) for r in requests))
            else:
                replies = [await call(channel, r) for r in requests]
        return [[c.item_id for c in reply.response.candidates] for reply in replies]

    alone = asyncio.run(run(concurrently=False))
    count_before, total_before = batches()
    together = asyncio.run(run(concurrently=True))
    count_after, total_after = batches()
    assert together == alone
    assert total_after - total_before == 64
    assert count_after - count_before < 32  # on average at least two requests per batch


def test_batch_retrieve_answers_each_request_as_retrieve_would(stub):
    requests = [build_request(f"u{i}", 5 + i, NIGHT, WEDNESDAY, request_id=f"r{i}")
                for i in range(6)]
    batch = stub.BatchRetrieve(pb.BatchRetrieveRequest(requests=requests), timeout=10)
    assert [r.request_id for r in batch.responses] == [f"r{i}" for i in range(6)]
    for request, reply in zip(requests, batch.responses, strict=True):
        alone = stub.Retrieve(request, timeout=10)
        assert [c.item_id for c in reply.candidates] == [c.item_id for c in alone.candidates]


def test_batch_retrieve_names_the_bad_request(stub):
    requests = [build_request("u1", 5, NIGHT), build_request("u2", 0, NIGHT)]
    with pytest.raises(grpc.RpcError) as err:
        stub.BatchRetrieve(pb.BatchRetrieveRequest(requests=requests), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("requests[1].k:")


def test_similar_items_are_nearest_neighbours_without_the_item_itself(stub, pipeline):
    import numpy as np

    from contracts.model_manifest import load_item_embeddings, load_model_manifest

    reply = stub.SimilarItems(pb.SimilarItemsRequest(item_id="i5", k=10), timeout=10)
    ids = [c.item_id for c in reply.candidates]
    assert len(ids) == 10 and "i5" not in ids
    item_emb, item_ids = load_item_embeddings(load_model_manifest(pipeline.model_dir))
    scores = item_emb @ item_emb[list(item_ids).index("i5")]
    exact = [item_ids[r] for r in np.argsort(-scores) if item_ids[r] != "i5"][:10]
    assert len(set(ids) & set(exact)) >= 8  # an approximate index, close to exact
    with pytest.raises(grpc.RpcError) as err:
        stub.SimilarItems(pb.SimilarItemsRequest(item_id="no-such-item", k=10), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _categories(pipeline) -> dict[str, str]:
    from contracts.dataset import load_dataset

    items = load_dataset(pipeline.data_dir).items
    return dict(zip(items["item_id"], items["category"], strict=True))


def test_category_rules_are_honoured_and_k_is_still_met(stub, pipeline):
    category = _categories(pipeline)
    allow = {"category": pb.StringList(values=["cat1", "cat3"])}
    reply = stub.Retrieve(pb.RetrieveRequest(user_id="u1", k=30, allow=allow), timeout=10)
    assert len(reply.candidates) == 30
    assert {category[c.item_id] for c in reply.candidates} <= {"cat1", "cat3"}
    block = {"category": pb.StringList(values=["cat0", "cat2", "cat4"])}
    reply = stub.Retrieve(pb.RetrieveRequest(user_id="u1", k=30, block=block), timeout=10)
    assert len(reply.candidates) == 30
    assert not {category[c.item_id] for c in reply.candidates} & {"cat0", "cat2", "cat4"}


def test_rules_on_an_unknown_column_are_invalid_argument(stub):
    allow = {"colour": pb.StringList(values=["red"])}
    with pytest.raises(grpc.RpcError) as err:
        stub.Retrieve(pb.RetrieveRequest(user_id="u1", k=5, allow=allow), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("allow['colour']: unknown item metadata column")


def test_exclude_seen_drops_the_history(stub):
    recent = [c.item_id for c in retrieve(stub, user="seen-test", k=5).candidates]
    reply = stub.Retrieve(pb.RetrieveRequest(user_id="seen-test", k=20, recent_item_ids=recent,
                                             exclude_seen=True), timeout=10)
    ids = [c.item_id for c in reply.candidates]
    assert len(ids) == 20 and not set(ids) & set(recent)

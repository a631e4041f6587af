"""Replies assembled by retrieval.wire parse as the messages the generated code builds."""

import numpy as np
import pytest

from retrieval.v1 import retrieval_pb2 as pb
from retrieval.wire import (
    CandidateWire,
    _any_table,
    _ascii_table,
    repeated_messages,
    response_bytes,
    varint,
)

ITEM_IDS = np.array(["i0", "i1", "", "é" * 70, "x" * 300, "日本語", *(f"item-{n}" for n in range(200))])
# Every id ASCII and at most 120 characters: the table is built with array operations.
ASCII_IDS = np.array(["i0", "", "x" * 120, "a\x00b", "#~ ", *(f"item-{n}" for n in range(200))])


def expected(rows, scores, item_ids=ITEM_IDS, **fields) -> pb.RetrieveResponse:
    return pb.RetrieveResponse(
        candidates=[pb.Candidate(item_id=str(item_ids[r]), score=float(s))
                    for r, s in zip(rows, scores, strict=True)], **fields)


@pytest.mark.parametrize("value", [1, 127, 128, 300, 16383, 16384, 2**31, 2**63 - 1])
def test_varint_matches_protobuf(value):
    serialized = pb.RetrieveRequest(event_time_unix_seconds=value).SerializeToString()
    assert serialized == bytes([4 << 3]) + varint(value)  # field 4, wire type VARINT


@pytest.mark.parametrize("item_ids", [ITEM_IDS, ASCII_IDS], ids=["any", "ascii"])
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("m", [0, 1, 7, 100, 200])
def test_a_reply_parses_as_the_generated_message(seed, m, item_ids):
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(item_ids))[:m].astype(np.int64)
    scores = rng.normal(size=m).astype(np.float32)
    if m > 2:
        scores[:3] = (0.0, -0.0, np.inf)
    fields = dict(model_version="m-20261202T000000Z-abcdef", index_version="i-1",
                  request_id="req-" * seed, degraded=bool(seed % 2))
    got = pb.RetrieveResponse.FromString(
        response_bytes(CandidateWire(item_ids).records(rows, scores), **fields))
    assert got == expected(rows, scores, item_ids, **fields)


@pytest.mark.parametrize("item_ids", [ASCII_IDS, np.array(["only"]), np.array(["", ""])])
def test_the_array_built_table_is_the_record_at_a_time_table(item_ids):
    fast, slow = _ascii_table(item_ids), _any_table(item_ids)
    assert fast is not None
    for got, want in zip(fast, slow, strict=True):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("item_ids", [ITEM_IDS, np.array(["x" * 121]), ASCII_IDS.astype(object)])
def test_ids_that_are_not_short_ascii_text_take_the_record_at_a_time_build(item_ids):
    assert _ascii_table(item_ids) is None


def test_scores_keep_their_float32_bits():
    scores = np.array([1e-30, -3.4e38, 0.1], dtype=np.float32)
    body = CandidateWire(ITEM_IDS).records(np.array([0, 1, 2]), scores)
    got = pb.RetrieveResponse.FromString(response_bytes(body, "m", "i"))
    assert np.array_equal(np.array([c.score for c in got.candidates], dtype=np.float32), scores)


def test_the_same_bytes_are_a_similar_items_reply():
    rows, scores = np.array([5, 0, 3]), np.array([0.9, 0.5, 0.1], dtype=np.float32)
    got = pb.SimilarItemsResponse.FromString(
        response_bytes(CandidateWire(ITEM_IDS).records(rows, scores), "m-1", "i-1"))
    assert [c.item_id for c in got.candidates] == [str(ITEM_IDS[r]) for r in rows]
    assert (got.model_version, got.index_version) == ("m-1", "i-1")


def test_batch_replies_are_repeated_retrieve_replies():
    wire = CandidateWire(ITEM_IDS)
    replies = [response_bytes(wire.records(np.array([r]), np.array([r / 10], np.float32)),
                              "m", "i", f"r{r}") for r in range(4)]
    got = pb.BatchRetrieveResponse.FromString(repeated_messages(1, replies))
    assert [r.request_id for r in got.responses] == ["r0", "r1", "r2", "r3"]
    assert [r.candidates[0].item_id for r in got.responses] == [str(i) for i in ITEM_IDS[:4]]


@pytest.mark.parametrize("item_ids", [ITEM_IDS, ASCII_IDS], ids=["any", "ascii"])
@pytest.mark.parametrize("sizes", [[], [0], [7], [0, 0], [3, 0, 100, 1], [0, 5], [200, 200]])
def test_a_batch_of_replies_gathered_at_once_is_each_reply_gathered_alone(item_ids, sizes):
    rng = np.random.default_rng(len(sizes))
    rows = [rng.permutation(len(item_ids))[:m].astype(np.int64) for m in sizes]
    scores = [rng.normal(size=m).astype(np.float32) for m in sizes]
    wire = CandidateWire(item_ids)
    got = wire.records_many(rows, scores)
    assert got == [wire.records(r, s) for r, s in zip(rows, scores)]
    for body, r, s in zip(got, rows, scores):
        assert pb.RetrieveResponse.FromString(response_bytes(body, "m", "i")) == expected(
            r, s, item_ids, model_version="m", index_version="i")

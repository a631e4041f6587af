"""Bad input, fuzzed: ≥ 10,000 requests, generated (hypothesis) and hand-written, to a real
server. Every reply is OK, INVALID_ARGUMENT whose message starts with the field at fault,
DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED; never INTERNAL or UNKNOWN; the server lives on.

Requests go as raw bytes through a generic unary call, so a test can write what no
well-behaved client would: invalid UTF-8 in a string field, a cut-short message."""

from __future__ import annotations

import asyncio
import math
import re

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval.v1 import retrieval_pb2 as pb
from retrieval.wire import varint

METHOD = "/two_tower.retrieval.v1.RetrievalService/Retrieve"
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
FIELD = re.compile(r"^(user_id|k|context|event_time_unix_seconds|recent_item_ids|"
                   r"exclude_item_ids|request_id|allow|block|exclude_seen|request)\b")
CONTEXT_NAMES = ["hour_of_day", "day_of_week", "device", "nope", ""]
COLUMNS = ["category", "tags", "nope", ""]
NOT_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"a\x80b", b"\xc0\xaf"]
EXAMPLES = 1000  # × 10 variants each


def _len_field(number: int, payload: bytes) -> bytes:
    return bytes([(number << 3) | 2]) + varint(len(payload)) + payload


class Sender:
    """One event loop and one channel for the whole test; ``send`` fires calls at once."""

    def __init__(self, address: str) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)  # grpc.aio binds its objects to the current loop
        self.channel = self.loop.run_until_complete(self._open(address))
        self.call = self.channel.unary_unary(METHOD, request_serializer=lambda b: b,
                                             response_deserializer=pb.RetrieveResponse.FromString)
        self.sent = 0
        self.codes: dict[grpc.StatusCode, int] = {}

    async def _open(self, address: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 16 << 20)])

    def send(self, cases: list[tuple[bytes, float]]) -> None:
        outcomes = self.loop.run_until_complete(
            asyncio.gather(*(self._one(raw, timeout) for raw, timeout in cases)))
        for (raw, _), (code, details) in zip(cases, outcomes, strict=True):
            self.sent += 1
            self.codes[code] = self.codes.get(code, 0) + 1
            assert code in ALLOWED, (code, details, raw[:200])
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert FIELD.match(details), (details, raw[:200])

    async def _one(self, raw: bytes, timeout: float) -> tuple[grpc.StatusCode, str]:
        try:
            await self.call(raw, timeout=timeout)
            return grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close())
        self.loop.close()
        asyncio.set_event_loop(None)


@pytest.fixture
def sender(server):
    running = Sender(server.address)
    yield running
    running.close()


_CONTEXT_VALUES = st.one_of(
    st.integers(-2**63, 2**63 - 1).map(lambda v: pb.ContextValue(int_value=v)),
    st.integers(-3, 30).map(lambda v: pb.ContextValue(int_value=v)),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda v: pb.ContextValue(double_value=v)),
    st.text(max_size=12).map(lambda v: pb.ContextValue(string_value=v)),
    st.just(pb.ContextValue()),
)
_ID = st.one_of(st.text(max_size=12), st.integers(0, 250).map(lambda i: f"i{i}"))
_RULES = st.dictionaries(st.sampled_from(COLUMNS), st.lists(_ID, max_size=4), max_size=2).map(
    lambda d: {c: pb.StringList(values=v) for c, v in d.items()})
REQUESTS = st.builds(
    pb.RetrieveRequest,
    user_id=st.one_of(st.integers(0, 400).map(lambda i: f"u{i}"), st.text(max_size=300)),
    k=st.one_of(st.integers(1, 1000), st.integers(-2**31, 2**31 - 1),
                st.sampled_from([0, 1, 10, 1000, 1001])),
    context=st.one_of(st.just({}), st.dictionaries(
        st.one_of(st.sampled_from(CONTEXT_NAMES), st.text(max_size=8)), _CONTEXT_VALUES,
        max_size=4)),
    event_time_unix_seconds=st.one_of(st.just(0), st.integers(-2**63, 2**63 - 1)),
    recent_item_ids=st.lists(_ID, max_size=30),
    exclude_item_ids=st.lists(_ID, max_size=60),
    request_id=st.text(max_size=40),
    allow=_RULES, block=_RULES, exclude_seen=st.booleans(),
)


def variants(message: pb.RetrieveRequest) -> list[tuple[bytes, float]]:
    """The message as sent, and mangled the ways no well-behaved client would: a value
    that is not UTF-8 appended to each string field (protobuf reads the later value too),
    trailing garbage, cut short at three points, and with a 1 ms deadline."""
    raw = message.SerializeToString()
    out = [(raw, 5.0), (raw, 0.001), (raw + b"\xff\x07", 5.0)]
    out += [(raw + _len_field(n, bad), 5.0)
            for n, bad in zip((1, 5, 6, 7), NOT_UTF8, strict=False)]
    out += [(raw[: len(raw) * i // 4], 5.0) for i in (1, 2, 3)]
    return out


def _nasty_corpus() -> list[tuple[bytes, float]]:
    def req(**kw) -> bytes:
        return pb.RetrieveRequest(**{"user_id": "u1", "k": 10, **kw}).SerializeToString()

    base = req()
    ctx = pb.ContextValue
    cases = [
        req(k=2**31 - 1), req(k=-2**31), req(k=0), req(k=1001), req(user_id=""),
        req(user_id="x" * 257), req(user_id="x" * (1 << 20)),  # 1 MB: user_id's length
        req(user_id="x" * (5 << 20)),  # over the 4 MiB message limit: RESOURCE_EXHAUSTED
        req(user_id="\x00"), req(user_id="é" * 128), req(user_id="🙂" * 64),
        b"", b"\xff\xff\xff\xff", b"\x08", b"\x0a\xff\xff\xff\xff\x0f",
        base + _len_field(1, b"\xff\xfe"), base + _len_field(5, b"\xc3"),
        base + _len_field(3, _len_field(1, b"\xff") + _len_field(2, _len_field(3, b"a"))),
        base + _len_field(8, _len_field(1, b"category") + _len_field(2, _len_field(1, b"\x80"))),
        req(context={"hour_of_day": ctx(double_value=math.nan)}),
        req(context={"hour_of_day": ctx(double_value=math.inf)}),
        req(context={"hour_of_day": ctx(int_value=2**62)}),
        req(context={"hour_of_day": ctx(int_value=-1)}),
        req(context={"device": ctx(int_value=3)}), req(context={"device": ctx()}),
        req(context={"nope": ctx(string_value="x")}), req(context={"": ctx(string_value="")}),
        req(event_time_unix_seconds=-2**63), req(event_time_unix_seconds=2**63 - 1),
        req(exclude_item_ids=[f"i{i}" for i in range(10_000)]),
        req(exclude_item_ids=[f"i{i}" for i in range(10_001)]),
        req(k=1000, exclude_item_ids=[f"x{i}" for i in range(9_999)]),
        req(recent_item_ids=[f"i{i}" for i in range(1001)]),
        req(recent_item_ids=["", "\x00", "nope" * 1000]),
        req(allow={"category": pb.StringList()}), req(allow={"": pb.StringList(values=[""])}),
        req(block={"tags": pb.StringList(values=["x"] * 5000)}),
        req(allow={"nope": pb.StringList(values=["a"])}, exclude_seen=True),
        req(request_id="r" * 100_000),
    ]
    deadlines = [(req(user_id=f"u{i}"), 0.001) for i in range(200)]  # 1 ms deadlines
    return [(raw, 10.0) for raw in cases] * 5 + deadlines


@pytest.mark.slow
def test_ten_thousand_bad_requests_get_ok_or_a_precise_status_and_the_server_lives(
        sender, server):
    sender.send(_nasty_corpus())

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(REQUESTS)
    def generated(message):
        sender.send(variants(message))

    generated()
    assert sender.sent >= 10_000, sender.sent
    assert sender.codes.get(grpc.StatusCode.OK, 0) > 100  # the walk reaches the happy path
    assert sender.codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 1000
    assert server.process.poll() is None
    sender.send([(pb.RetrieveRequest(user_id="u1", k=10).SerializeToString(), 10.0)])
    assert "internal error" not in server.log()

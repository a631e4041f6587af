"""Streams opened and never read: a raw HTTP/2 client announces a stream window of 0, so
the server can send none of its replies, and holds thousands of Retrieve calls open. The
server bounds how many it takes (per connection and in total), for how long (connection
age), stays within its memory, keeps answering others, and logs the unsent replies as
one counted line instead of a traceback each."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from benchmarks.stream_abuse import hold, normal_calls, retrieve_message, rss_mb
from retrieval.logs import fold_unsent_replies
from retrieval.server import StreamLimits
from tests.conftest import start_server, stop_server

LIMITS = ["--max-streams-per-connection", "50", "--max-concurrent-rpcs", "200",
          "--max-connection-age-seconds", "4", "--max-connection-age-grace-seconds", "1"]


@pytest.fixture
def limited_server(pipeline, tmp_path):
    running = start_server(["--model", str(pipeline.model_dir), "--index",
                            str(pipeline.index_dir), "--features", str(pipeline.data_dir),
                            "--metrics-port", "0", *LIMITS], tmp_path)
    yield running
    stop_server(running)


def unsent_replies(server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=5).read().decode()
    return float(re.search(r"^two_tower_unsent_replies_total (\S+)$", text, re.M).group(1))


def test_thousands_of_unread_streams_on_one_connection_are_refused_past_the_limit(
        limited_server):
    """2,000 streams on one connection: the server takes 50 and refuses the rest, its RSS
    stays within a few MB, a caller on another connection is answered throughout, and the
    aged connection is closed, ending the held calls."""
    before = rss_mb(limited_server.process.pid)
    [attacker] = hold(limited_server.address, 2000, 1, retrieve_message("u1", 1000))
    time.sleep(1.5)
    assert attacker.refused >= 2000 - 50
    assert rss_mb(limited_server.process.pid) - before < 10
    assert normal_calls(limited_server.address, 20) == {"OK": 20}
    deadline = time.monotonic() + 15
    while not attacker.goaway and time.monotonic() < deadline:
        time.sleep(0.2)
    assert attacker.goaway, "the connection was not aged out"
    attacker.close()
    assert normal_calls(limited_server.address, 5) == {"OK": 5}


def test_unread_streams_on_many_connections_meet_the_total_then_age_out(limited_server):
    """Ten connections holding 50 streams each fill the total of 200: further calls get a
    prompt RESOURCE_EXHAUSTED (not a hang), and once the connections age out the server
    answers again. The log gets no traceback for the replies it could not send."""
    held = hold(limited_server.address, 500, 10, retrieve_message("u1", 1000))
    time.sleep(1.0)
    started = time.monotonic()
    codes = normal_calls(limited_server.address, 5)
    assert codes == {"RESOURCE_EXHAUSTED": 5} and time.monotonic() - started < 5
    deadline = time.monotonic() + 20
    while normal_calls(limited_server.address, 1) != {"OK": 1}:
        assert time.monotonic() < deadline, "held streams were never released"
        time.sleep(0.5)
    assert all(conn.goaway for conn in held)
    for conn in held:
        conn.close()
    assert normal_calls(limited_server.address, 20) == {"OK": 20}
    log = limited_server.log()
    assert "Traceback" not in log
    assert log.count("could not be sent") <= 1  # one line a minute at most, with a count
    assert log.count("ExecuteBatchError") == log.count("could not be sent")
    assert unsent_replies(limited_server) >= 0


def test_grpc_unsent_reply_tracebacks_fold_into_a_count_and_one_line(caplog):
    """What grpc.aio logs per unsent reply (message and traceback) becomes a counter and
    at most one line a minute."""
    import logging

    counted = []
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    before = list(grpc_log.filters)  # a server started in this process installed its own
    folding = fold_unsent_replies(lambda: counted.append(1))
    try:
        with caplog.at_level(logging.INFO):
            for _ in range(185):
                try:
                    raise RuntimeError("Failed \"execute_batch\"")
                except RuntimeError:
                    grpc_log.exception("ExecuteBatchError raised in core by servicer method "
                                       "[/two_tower.retrieval.v1.RetrievalService/Retrieve]")
            grpc_log.error("something else")
    finally:
        grpc_log.removeFilter(folding)
        for f in before:
            grpc_log.addFilter(f)
    assert len(counted) == 185
    lines = [r for r in caplog.records if "could not be sent" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert "1 reply could not be sent" in lines[0].getMessage()
    assert [r.getMessage() for r in caplog.records if r.name == "grpc._cython.cygrpc"] == [
        "something else"]


@pytest.mark.parametrize("kw", [dict(per_connection=0), dict(total=-1),
                                dict(connection_age_s=0.0), dict(connection_age_grace_s=None)])
def test_stream_limits_refuse_nonsense(kw):
    with pytest.raises(ValueError):
        StreamLimits(**kw)


def test_serve_defaults_are_documented(tmp_path):
    """The flags' defaults are what StreamLimits holds."""
    from app.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "m", "--index", "i"])
    limits = StreamLimits()
    assert (args.max_streams_per_connection, args.max_concurrent_rpcs,
            args.max_connection_age_seconds, args.max_connection_age_grace_seconds) == (
        limits.per_connection, limits.total, limits.connection_age_s,
        limits.connection_age_grace_s)

"""The load-test harness (benchmarks.loadtest) and ghz runs and reports (benchmarks.ghz).

tests/data/ghz_report_sample.json was captured from ghz v0.120.0 (`-O json`, -n 40 -c 2)
against `two-tower serve`, with one request in four sent with k=0, so it holds both OK
replies and INVALID_ARGUMENT errors.
"""

from __future__ import annotations

import dataclasses
import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.ghz import (
    HALF_BUSY, HALF_MAX, Load, Plan, Row, call_data, find_ghz, format_table, parse_rates,
    parse_report, run_ghz, summary,
)
from benchmarks.loadtest import ECHO, NAIVE, Variant, running, serve_command

SAMPLE = Path(__file__).parent / "data" / "ghz_report_sample.json"


def _ghz():
    ghz = find_ghz()
    if ghz is None:
        pytest.skip("ghz is not installed (looked in .tools/bin and on PATH); "
                    "install it with `bash .ci/install-ghz.sh`")
    return ghz


def test_parser_turns_the_captured_report_into_a_row():
    report = json.loads(SAMPLE.read_text())
    row = parse_report(report, "naive", Load("closed", 2, total=40))

    assert (row.variant, row.mode, row.concurrency, row.target_rps) == ("naive", "closed", 2, 0)
    assert (row.count, row.ok) == (40, 30)
    assert row.errors == {"InvalidArgument": 10}
    assert row.error_text == "InvalidArgument×10"
    assert row.rps == pytest.approx(30 / (report["total"] / 1e9))
    ok_ms = sorted(d["latency"] / 1e6 for d in report["details"] if d["status"] == "OK")
    # nearest rank over the 30 OK latencies: p50 = 15th, p90 = 27th, p99 = p99.9 = 30th
    assert row.p50_ms == pytest.approx(ok_ms[14])
    assert row.p90_ms == pytest.approx(ok_ms[26])
    assert row.p99_ms == row.p999_ms == pytest.approx(ok_ms[-1])
    assert row.p50_ms <= row.p90_ms <= row.p99_ms


def test_parser_of_a_run_without_ok_replies():
    report = {"count": 3, "total": 1_000_000_000, "statusCodeDistribution": {"Unavailable": 3},
              "details": [{"latency": 1000, "status": "Unavailable"}] * 3}
    row = parse_report(report, "echo", Load("open", 10, rps=50))
    assert (row.ok, row.rps, row.errors) == (0, 0.0, {"Unavailable": 3})
    assert math.isnan(row.p50_ms)
    assert "open@50/s" in format_table([row])


def test_call_data_sends_every_user_with_varied_context():
    data = call_data(["u1", "u2", "u3"])
    assert len(data) == 72  # lcm(3 users, 24 hours × 3 devices)
    assert {d["user_id"] for d in data} == {"u1", "u2", "u3"}
    assert all(d["k"] == 100 for d in data)
    hours = {int(d["context"]["hour_of_day"]["int_value"]) for d in data}
    devices = {d["context"]["device"]["string_value"] for d in data}
    assert hours == set(range(24)) and devices == {"mobile", "desktop", "tv"}
    assert len({d["user_id"] for d in data[:3]}) == 3  # round-robin: consecutive users differ


def test_ghz_smoke_against_the_real_server(server, tmp_path):
    ghz = _ghz()
    data_file = tmp_path / "call-data.json"
    data_file.write_text(json.dumps(call_data([f"u{i}" for i in range(50)] + ["nobody"])))

    report = run_ghz(ghz, server.address, Load("closed", 4, total=300), data_file,
                     tmp_path / "report.json")
    row = parse_report(report, "server", Load("closed", 4, total=300))

    assert row.errors == {}, f"ghz saw errors: {report.get('errorDistribution')}"
    assert (row.count, row.ok) == (300, 300)
    assert row.rps > 0 and 0 < row.p50_ms <= row.p999_ms


def test_ghz_open_loop_against_the_echo_server(tmp_path):
    ghz = _ghz()
    data_file = tmp_path / "call-data.json"
    data_file.write_text(json.dumps(call_data(["u1", "u2"])))
    echo = Variant("echo", ECHO)
    with running(echo, tmp_path / "echo") as server:
        load = Load("open", 4, rps=100, total=100)
        row = parse_report(run_ghz(ghz, server.address, load, data_file, tmp_path / "r.json"),
                           "echo", load)
    assert (row.count, row.ok, row.errors) == (100, 100, {})
    assert np.isfinite(row.p999_ms)


def test_the_thread_pool_echo_server_answers_like_the_asyncio_one(tmp_path):
    ghz = _ghz()
    data_file = tmp_path / "call-data.json"
    data_file.write_text(json.dumps(call_data(["u1", "u2"])))
    replies = {}
    for name, flags in (("aio", []), ("sync", ["--sync"])):
        with running(Variant(name, [*ECHO, *flags]), tmp_path / name) as server:
            load = Load("closed", 2, total=50)
            row = parse_report(run_ghz(ghz, server.address, load, data_file,
                                       tmp_path / f"{name}.json"), name, load)
            assert (row.ok, row.errors) == (50, {})
            replies[name] = _retrieve(server.address)
    assert replies["aio"] == replies["sync"]
    assert len(replies["sync"].candidates) == 100 and replies["sync"].request_id == "r-1"


def _retrieve(address: str):
    import grpc

    from retrieval.v1 import retrieval_pb2 as pb
    from retrieval.v1 import retrieval_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        return pb_grpc.RetrievalServiceStub(channel).Retrieve(
            pb.RetrieveRequest(user_id="u1", k=100, request_id="r-1"), timeout=10)


def test_the_echo_stacks_benchmark_gives_how_busy_half_the_maximum_keeps_the_core():
    """At c=50 a call costs 0.25 ms and the maximum is 3,000/s; at half of it (1,500/s) a
    call costs 0.40 ms, 1.6 times as much, so the core is 60 % busy and not 50 %."""
    from benchmarks.echo_stacks import stack_figures

    rows = [dataclasses.replace(_row("aio", "closed", 1, 1200.0, p50=0.6), cpu_ms_per_call=0.45),
            dataclasses.replace(_row("aio", "closed", 50, 3000.0, p50=15.0),
                                cpu_ms_per_call=0.25),
            dataclasses.replace(_row("aio", "open", 50, 1500.0, p50=0.9, target=1500),
                                cpu_ms_per_call=0.40)]
    f = stack_figures(rows)
    assert f["half_over_max_cpu"] == pytest.approx(1.6)
    assert f["half_busy"] == pytest.approx(0.6)
    assert f["p50_ratio"] == pytest.approx(1.5)
    assert (f["cpu_c1"], f["max_rps"], f["half_rps"]) == (0.45, 3000.0, 1500.0)


def test_naive_baseline_serves_the_pipeline_pair_without_errors(pipeline, tmp_path):
    ghz = _ghz()
    data_file = tmp_path / "call-data.json"
    data_file.write_text(json.dumps(call_data([f"u{i}" for i in range(20)]) + [
        {"user_id": "u1", "k": 0}]))  # the last one is invalid: the status must say so
    naive = Variant("naive", serve_command(pipeline.model_dir, pipeline.index_dir,
                                           pipeline.data_dir, None, base=NAIVE))
    with running(naive, tmp_path / "naive") as server:
        load = Load("closed", 2, total=len(json.loads(data_file.read_text())))
        row = parse_report(run_ghz(ghz, server.address, load, data_file, tmp_path / "r.json"),
                           "naive", load)
    assert row.errors == {"InvalidArgument": 1}
    assert row.ok == row.count - 1


def test_without_a_model_index_pair_only_the_echo_server_is_measured(monkeypatch, tmp_path):
    from benchmarks import loadtest

    def fail(*args):
        raise loadtest.ArtifactsUnavailable("`two-tower build-index` failed (exit 2): boom")

    monkeypatch.setattr(loadtest, "ensure_artifacts", fail)
    args = loadtest._parser().parse_args(["--workdir", str(tmp_path)])
    pair = loadtest._pair(args)
    assert pair is None
    assert [v.name for v in loadtest._variants(args, pair)] == ["echo"]
    with pytest.raises(ValueError, match="--variant: expected NAME"):
        loadtest._variants(loadtest._parser().parse_args(["--variant", "noname"]),
                           (tmp_path, tmp_path, None))


def test_split_placement_gives_ghz_the_last_cpu_and_every_server_the_others(tmp_path):
    from benchmarks import loadtest

    placement = loadtest.Placement.of("split", [0, 1, 2])
    assert (placement.servers, placement.ghz) == ((0, 1), (2,))
    assert loadtest.Placement.of("shared", [0, 1]) == loadtest.Placement()
    assert loadtest.Placement.of("split", [0]) == loadtest.Placement()  # nothing to split
    args = loadtest._parser().parse_args(["--variant", "workers2=--workers 2 --cpu-affinity "
                                          "auto"])
    variants = {v.name: v.command for v in loadtest._variants(
        args, (tmp_path / "m", tmp_path / "i", None), placement)}
    assert variants["echo"][-2:] == ["--cpus", "0,1"]
    assert variants["naive"][-2:] == ["--cpus", "0,1"]
    server = variants["server"]
    assert server[server.index("--cpu-affinity") + 1] == "0,1"
    workers = variants["workers2"]  # its own flag comes later, so it wins
    assert workers[-2:] == ["--cpu-affinity", "auto"]


def test_a_pair_made_with_another_index_spec_keeps_its_model_and_gets_a_new_index(
        pipeline, tmp_path):
    """`--index-spec` is part of what a made pair is: asking for another index rebuilds the
    index from the same model (real `two-tower build-index`), and asking again reuses it."""
    from benchmarks import loadtest

    made = tmp_path / f"quick-{loadtest.RECIPE_TAG}"
    made.mkdir()
    (made / "pair.json").write_text(json.dumps({
        "model": str(pipeline.model_dir), "index": str(pipeline.index_dir),
        "data": str(pipeline.data_dir)}))  # an older pair.json: no index_spec, i.e. auto

    model, index, data = loadtest.ensure_artifacts(tmp_path, quick=True, index_spec="Flat")

    assert (model, data) == (pipeline.model_dir, pipeline.data_dir)
    assert index != pipeline.index_dir and index.parent == made / "indexes"
    assert json.loads((index / "manifest.json").read_text())["factory"] == "Flat"
    assert json.loads((made / "pair.json").read_text())["index_spec"] == "Flat"
    assert loadtest.ensure_artifacts(tmp_path, quick=True, index_spec="Flat")[1] == index


def test_the_harness_serves_from_a_redis_of_its_own(pipeline, tmp_path):
    """`--redis`: a private redis-server filled by load-features, every variant reads it,
    and it is gone after the run."""
    _ghz()
    from benchmarks import loadtest

    code = loadtest.main([
        "--model", str(pipeline.model_dir), "--index", str(pipeline.index_dir),
        "--features", str(pipeline.data_dir), "--redis", "--variants", "server",
        "--concurrency", "2", "--duration", "1s", "--rate", "0", "--warmup", "10",
        "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])

    assert code == 0
    rows = json.loads((tmp_path / "out" / "loadtest.json").read_text())["rows"]
    assert rows and all(r["errors"] == {} and r["ok"] > 0 for r in rows)
    # the server's CPU and memory around each run, and where its calls' time went
    assert all(r["cpu_ms_per_call"] > 0 and r["pss_mib"] > 10 for r in rows)
    assert all(r["stages"]["features_ms"] > 0 and r["stages"]["ann_ms"] > 0
               and r["stages"]["total_ms"] >= r["stages"]["ann_ms"] for r in rows)
    # and which of its threads spent the CPU: the event loop and the batches' thread
    assert all({"main", "retrieve-work"} <= r["cpu_by_thread"].keys() for r in rows)
    assert all(0 < sum(r["cpu_by_thread"].values()) <= r["cpu_ms_per_call"] * 1.1 for r in rows)
    assert (tmp_path / "out" / "loadtest_cpu_threads.png").stat().st_size > 0
    parts = json.loads((tmp_path / "out" / "loadtest.json").read_text())["meta"]["cpu_parts"]
    assert {"ann_ms_per_query", "tower_ms_per_user", "redis_parse_ms_per_user"} <= parts.keys()
    assert all(v > 0 for v in parts.values())
    command = json.loads((tmp_path / "out" / "loadtest.json").read_text())["meta"]["variants"]
    assert "--redis-url redis://127.0.0.1:" in command["server"]
    redis_logs = list((tmp_path / "work" / "redis").glob("redis-*.log"))
    assert redis_logs and "ready to accept connections" in redis_logs[0].read_text().lower()


def _row(variant, mode, c, rps, p99=1.0, target=0, p50=0.5):
    return Row(variant, mode, c, target, count=100, ok=100, rps=rps, p50_ms=p50, p90_ms=0.8,
               p99_ms=p99, p999_ms=p99)


def test_half_max_rate_is_half_the_best_closed_loop_rps_of_the_variant():
    plan = Plan((1, 10, 50), parse_rates(HALF_MAX), "2s")
    rows = [_row("server", "closed", 1, 400.0), _row("server", "closed", 50, 1201.0),
            _row("server", "closed", 10, 900.0)]
    assert plan.opens(rows) == [Load("open", 50, "2s", rps=600)]
    assert Plan((4,), parse_rates("0"), "2s").opens(rows) == []
    assert [load.rps for load in Plan((4,), parse_rates("250"), "2s").opens(rows)] == [250]


def test_several_open_loop_rates_run_in_the_order_given_as_shares_or_per_second():
    rows = [_row("server", "closed", 50, 1200.0)]
    plan = Plan((1, 50), parse_rates("0.25max,half-max,700,0.75max"), "2s")
    assert [load.rps for load in plan.opens(rows)] == [300, 600, 700, 900]
    assert {load.label for load in plan.opens(rows)} == {"open@300/s", "open@600/s",
                                                         "open@700/s", "open@900/s"}


def test_half_busy_rate_is_where_the_c1_cpu_per_call_fills_half_the_cpus():
    """A call costs 2 ms of CPU at c=1 (batches of one): 250 of them a second would keep
    one CPU half busy, 500 two CPUs, whatever batching gains at c=50."""
    rows = [dataclasses.replace(_row("server", "closed", 1, 400.0), cpu_ms_per_call=2.0),
            dataclasses.replace(_row("server", "closed", 50, 1200.0), cpu_ms_per_call=0.8)]
    assert parse_rates("half-busy,half-max") == (HALF_BUSY, 0.5)
    assert [load.rps for load in Plan((1, 50), (HALF_BUSY, 0.5), "2s").opens(rows)] == [250, 600]
    assert [load.rps for load in Plan((1, 50), (HALF_BUSY,), "2s", cpus=2).opens(rows)] == [500]
    # without the c=1 run's CPU (echo's CPU unmeasured, say) there is no such run
    assert Plan((1, 50), (HALF_BUSY,), "2s").opens([_row("echo", "closed", 1, 900.0)]) == []


def test_the_tail_ratios_are_also_given_at_the_nominally_half_busy_rate():
    from benchmarks.loadtest import target_figures, target_lines

    rows = [dataclasses.replace(r, cpu_ms_per_call=2.0) if r.variant == "server"
            and r.concurrency == 1 and r.mode == "closed" else r for r in _target_rows()]
    rows += [dataclasses.replace(_row("server", "open", 50, 250.0, p99=2.0, p50=0.6,
                                      target=250), cpu_ms_per_call=1.6),
             _row("echo@srv", "open", 50, 250.0, p99=1.25, target=250)]
    f = target_figures(rows, PARTS, 50)
    assert f["half_busy"]["rps"] == 250 and f["half_busy"]["busy"] == pytest.approx(0.4)
    text = "\n".join(target_lines(rows, PARTS, 50))
    assert ("not a target, the same ratios at the nominally half-busy rate (250/s; "
            "measured 40 % of 1 CPU busy): p99 2.00 ms, 1.60x echo's 1.25; "
            "p50 0.60, 1.20x c=1's") in text
    # the half-max verdicts are printed as before
    assert "half load (500/s): p99 3.00 ms against echo's 1.00" in text


@pytest.mark.parametrize("text", ["-5", "fast", "1.5", "0max", "-1max", "100,fast", "5max"])
def test_a_bad_rate_is_refused_naming_the_flag(text):
    with pytest.raises(ValueError, match="--rate"):
        parse_rates(text)


def test_summary_gives_the_ratios_the_targets_are_stated_in():
    rows = [_row("echo", "closed", 50, 2000.0), _row("naive", "closed", 50, 400.0),
            _row("server", "closed", 1, 300.0), _row("server", "closed", 50, 1500.0),
            _row("server", "open", 50, 750.0, p99=3.5, target=750)]
    lines = summary(rows)
    assert "server: best 1,500 RPS (c=50), 0.75× echo, 3.75× naive" in lines
    assert "server: open loop at 750/s: p99 3.50 ms, errors -" in lines


PARTS = {"batch": 8, "ann_ms_per_query": 0.3, "tower_ms_per_user": 0.05,
         "redis_parse_ms_per_user": 0.05}


def _target_rows(server_p99: float = 3.0) -> list[Row]:
    def with_cpu(row, cpu, pss=100.0):
        return dataclasses.replace(row, cpu_ms_per_call=cpu, pss_mib=pss)

    return [with_cpu(_row("echo", "closed", 50, 2000.0), 0.4),
            with_cpu(_row("naive", "closed", 50, 300.0), 3.0),
            dataclasses.replace(with_cpu(_row("server", "closed", 1, 300.0), 1.5),
                                stages={"batch": 1.0}),
            dataclasses.replace(with_cpu(_row("server", "closed", 50, 1000.0), 1.0),
                                stages={"batch": 10.0}),
            with_cpu(_row("workers2", "closed", 50, 1500.0), 1.05, pss=140.0),
            _row("server", "open", 50, 500.0, p99=server_p99, target=500),
            _row("echo@srv", "open", 50, 500.0, p99=1.0, target=500),
            with_cpu(_row("echo@srv", "open", 50, 1000.0, p99=1.5, target=1000), 0.6)]


def test_the_targets_are_computed_from_the_rows_and_parts_of_the_run():
    from benchmarks.loadtest import target_lines

    rows, parts = _target_rows(), PARTS
    text = "\n".join(target_lines(rows, parts, 50))
    assert "server 1.000 ms against the parts' 0.800" in text and "1.25x (<= 1.2: NOT met)" in text
    # gRPC's CPU per call at the server's own rate in place of echo's at its maximum
    assert "echo 0.600 ms in place of 0.400 at its own 2,000/s): parts 1.000, 1.00x" in text
    assert "CPU per call 1.05x (<= 1.10: met)" in text and "1.40x (<= 1.3: NOT met)" in text
    assert "p99 3.00 ms against echo's 1.00 at that rate, 3.00x (<= 2: NOT met)" in text
    assert "p50 0.50 against 0.50 at c=1, 1.00x (<= 1.5: met)" in text
    assert "3.33x (>= 3: met)" in text


def test_each_worker_variant_is_held_to_the_tail_targets_at_its_own_half_max_rate():
    """2 workers, best 1,500/s: their half load is 750/s, against echo at 750/s and their
    own c=1 p50, not the one-worker server's."""
    from benchmarks.loadtest import target_lines

    rows = _target_rows() + [
        _row("workers2", "closed", 1, 400.0, p50=0.8),
        _row("workers2", "open", 50, 750.0, p99=2.4, p50=1.6, target=750),
        _row("echo@srv", "open", 50, 750.0, p99=1.6, target=750)]
    lines = [line for line in target_lines(rows, PARTS, 50) if "half load" in line]
    assert lines[0].startswith("  half load (500/s): p99 3.00 ms")  # the server's, as before
    # beside it, echo's own queueing at half its maximum (1,000/s): p50 0.9 against 0.6
    echo_rows = [_row("echo", "closed", 1, 1500.0, p50=0.6),
                 _row("echo", "open", 50, 1000.0, p50=0.9, target=1000)]
    text = "\n".join(target_lines(rows + echo_rows, PARTS, 50))
    assert "(echo at half its own maximum: p50 1.50x its c=1 p50)" in text
    assert lines[1] == ("  half load, workers2 at its own (750/s): p99 2.40 ms against echo's "
                        "1.60 at that rate, 1.50x (<= 2: met); p50 1.60 against 0.80 at c=1, "
                        "2.00x (<= 1.5: NOT met); errors -")


def test_runs_side_by_side_give_each_targets_ratio_and_the_median_of_each_placement(
        tmp_path, capsys):
    from benchmarks import loadtest_runs

    for name, ghz_cpu, p99 in (("a", "1", 2.0), ("b", "any", 4.0), ("c", "1", 3.0)):
        (tmp_path / name).mkdir()
        meta = {"placement": {"servers": "0", "ghz": ghz_cpu}, "cpu_parts": PARTS}
        rows = [dataclasses.asdict(r) for r in _target_rows(server_p99=p99)]
        (tmp_path / name / "loadtest.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    assert loadtest_runs.main([str(tmp_path / n) for n in "abc"] + ["--out",
                                                                   str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # the half-load p99 over echo's (1.0 ms): 2, 4 and 3; split's median of runs a and c
    assert lines[2].startswith("a | split |") and " | 2.00 | " in lines[2]
    assert lines[-3].startswith("median of 1 | shared |") and " | 4.00 | " in lines[-3]
    assert lines[-2].startswith("median of 2 | split |") and " | 2.50 | " in lines[-2]
    # and a batch's fixed CPU beside a call's own: 1.5 ms at batches of 1, 1.0 at 10
    assert "F: a batch's fixed CPU ms | m: a call's own CPU ms" in lines[0]
    assert lines[2].endswith(" | 0.56 | 0.94")
    saved = json.loads((tmp_path / "loadtest_runs.json").read_text())
    assert [r["measures"]["× naive"] for r in saved["runs"]] == [1000 / 300] * 3
    assert (tmp_path / "loadtest_runs.png").stat().st_size > 0


def test_the_swap_benchmark_swaps_under_load_without_a_failed_call(pipeline, tmp_path):
    """benchmarks.swap_load on the pipeline's model: a second index built from it (real
    build-index), served from a redis of its own, CURRENT moved under open-loop load."""
    _ghz()
    from benchmarks import swap_load
    from benchmarks.loadtest import _two_tower

    second = Path(_two_tower("build-index", "--model", str(pipeline.model_dir), "--out",
                             str(tmp_path / "indexes"), "--index", "Flat", "--items",
                             str(pipeline.data_dir), "--data", str(pipeline.data_dir)))

    code = swap_load.main([
        "--model", str(pipeline.model_dir), "--index", str(pipeline.index_dir),
        "--swap-to", str(second), "--data", str(pipeline.data_dir), "--rate", "40",
        "--duration", "4s", "--swap-after", "1", "--workdir", str(tmp_path / "work"),
        "--out", str(tmp_path / "out")])

    assert code == 0
    result = json.loads((tmp_path / "out" / "swap_load.json").read_text())
    assert result["swapped"] and result["second"] == second.name
    assert 1.0 <= result["moved_s"] < result["swapped_s"] < 4.0 + 2 * swap_load.POLL_S
    assert [r["run"] for r in result["runs"]] == ["steady", "swap"]
    assert all(r["errors"] == {} and r["calls"] >= 100 for r in result["runs"])
    assert (tmp_path / "out" / "swap_load.png").stat().st_size > 0
    assert "| swap |" in (tmp_path / "out" / "swap_load.md").read_text()


def test_the_swap_benchmark_refuses_a_partial_pair_naming_the_flags(tmp_path, capsys):
    _ghz()
    from benchmarks import swap_load

    assert swap_load.main(["--model", str(tmp_path), "--workdir", str(tmp_path)]) == 2
    assert "--model, --index and --swap-to go together" in capsys.readouterr().err


def test_requests_carry_only_the_context_features_asked_for():
    both = call_data(["u1", "u2"])
    assert all(set(d["context"]) == {"hour_of_day", "device"} for d in both)
    hours_only = call_data(["u1", "u2"], context=("hour_of_day",))
    assert all(set(d["context"]) == {"hour_of_day"} for d in hours_only)
    assert all("context" not in d for d in call_data(["u1", "u2"], context=()))


def test_the_load_test_sends_a_model_without_context_no_context(tmp_path):
    """A history-only user-level model has no context features and its server refuses
    hour_of_day/device (INVALID_ARGUMENT "unknown context feature"): the harness reads the
    model's spec and every call it sends is answered."""
    _ghz()
    from benchmarks import loadtest
    from contracts.dataset import write_dataset
    from indexer.build import IndexSpec
    from indexer.job import JobOptions, run_build_index
    from tests.test_user_level import _config, _history_only, _spec_toml
    from training.pipeline import run_training
    from training.synthetic import SyntheticConfig, generate_synthetic

    dataset, _ = generate_synthetic(SyntheticConfig(num_users=60, num_items=40, num_clusters=4,
                                                    interactions_per_user=8))
    dataset = _history_only(dataset, max_length=16)
    write_dataset(dataset, tmp_path / "data", _spec_toml(dataset.spec))
    model, _ = run_training(dataset, tmp_path / "models",
                            dataclasses.replace(_config(), epochs=1))
    index = run_build_index(model, tmp_path / "indexes", IndexSpec("Flat"),
                            JobOptions(items=tmp_path / "data"))
    assert loadtest.served_context(model) == ()
    users = tmp_path / "users.txt"
    users.write_text("\n".join(str(u) for u in dataset.interactions["user_id"][:20]))

    code = loadtest.main([
        "--model", str(model), "--index", str(index), "--features", str(tmp_path / "data"),
        "--users", str(users), "--variants", "server", "--concurrency", "2",
        "--duration", "1s", "--rate", "0", "--warmup", "10", "--no-cpu-parts",
        "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])

    assert code == 0
    rows = json.loads((tmp_path / "out" / "loadtest.json").read_text())["rows"]
    assert rows and all(r["errors"] == {} and r["ok"] > 0 for r in rows)


def test_runs_spread_their_calls_over_the_connections_asked_for(tmp_path):
    """--connections reaches ghz (serve --workers N shares its port by connection); closed
    loop never asks for more connections than workers."""
    ghz = _ghz()
    plan = Plan((1, 8), parse_rates(HALF_MAX), "2s", total=80, connections=4)
    assert [load.connections for load in plan.closed()] == [1, 4]
    data_file = tmp_path / "call-data.json"
    data_file.write_text(json.dumps(call_data(["u1", "u2"])))
    with running(Variant("echo", ECHO), tmp_path / "echo") as server:
        load = plan.closed()[1]
        report = run_ghz(ghz, server.address, load, data_file, tmp_path / "r.json")
    assert report["options"]["connections"] == 4
    assert parse_report(report, "echo", load).ok == 80


def test_the_batch_cost_benchmark_prices_each_stage_of_a_batch_by_its_size(pipeline,
                                                                          redis_url, tmp_path):
    """benchmarks.batch_cost on the pipeline's pair, its users in a real Redis: each stage's
    CPU a batch at each size, a fixed part and a part a call for each, table, JSON, plot."""
    from benchmarks import batch_cost
    from retrieval.feature_store import RedisFeatureStore, users_from_dataset
    from contracts.dataset import load_dataset

    stored = users_from_dataset(load_dataset(pipeline.data_dir))

    async def fill() -> None:
        store = RedisFeatureStore.from_url(redis_url)
        await store.put_users(stored)
        await store.close()

    asyncio.run(fill())
    users = tmp_path / "users.txt"
    users.write_text("\n".join(sorted(stored)[:20]) + "\n")
    code = batch_cost.main(["--model", str(pipeline.model_dir), "--index",
                            str(pipeline.index_dir), "--data", str(pipeline.data_dir),
                            "--redis-url", redis_url, "--users", str(users), "--sizes", "1,4",
                            "--rounds", "10", "--out", str(tmp_path / "out")])
    assert code == 0
    result = json.loads((tmp_path / "out" / "batch_cost.json").read_text())
    per = {int(n): row for n, row in result["ms_per_batch"].items()}
    assert per.keys() == {1, 4}
    assert all(per[n][stage] > 0 for n in per for stage in (*batch_cost.STAGES, "batch"))
    # four users' search costs more than one's
    assert per[4]["search"] > per[1]["search"]
    assert set(result["fits"]) == {*batch_cost.STAGES, "batch"}
    assert (tmp_path / "out" / "batch_cost.png").stat().st_size > 0

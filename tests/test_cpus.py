"""Where serving runs: the usable cores, `serve --cpu-affinity` parsed and split among the
workers, and a process pinned with every thread it has (retrieval.cpus)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest

from app.processes import child_pids
from retrieval.client import build_request, retrieve
from retrieval.cpus import parse_cpu_list, place_workers, split, usable_cores
from tests.conftest import start_server, stop_server
from tests.test_workers import NIGHT, _start


@pytest.fixture(autouse=True)
def no_cgroup_v1_quota(monkeypatch, tmp_path):
    """The host's own cgroup v1 files (a CI runner's quota) out of the way."""
    monkeypatch.setattr("retrieval.cpus.CFS_QUOTA", tmp_path / "v1-absent")


@pytest.fixture
def four_cpus(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})


@pytest.mark.parametrize("cpu_max, cores", [("max 100000\n", 4), ("100000 100000\n", 1),
                                            ("150000 100000\n", 2), ("800000 100000\n", 4),
                                            ("garbled\n", 4)])
def test_a_cgroup_cpu_quota_caps_the_usable_cores(four_cpus, tmp_path, cpu_max, cores):
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert usable_cores(tmp_path / "cpu.max") == cores
    assert usable_cores(tmp_path / "absent") == 4


def test_the_cpu_list_reads_numbers_and_ranges_in_order_without_repeats():
    assert parse_cpu_list("3,0-1,1") == (0, 1, 3)
    assert parse_cpu_list(" 2-4 ") == (2, 3, 4)


@pytest.mark.parametrize("text, names", [("x", "'x'"), ("1-0", "'1-0'"), ("0,,1", "''"),
                                         ("-1", "'-1'")])
def test_a_bad_cpu_list_is_refused_naming_the_part(text, names):
    with pytest.raises(ValueError, match=names):
        parse_cpu_list(text)


@pytest.mark.parametrize("cpus, workers, groups", [
    ((0, 1, 2, 3), 2, ((0, 1), (2, 3))),
    ((0, 1, 2), 2, ((0,), (1, 2))),
    ((0, 1), 1, ((0, 1),)),
    ((4, 5), 3, ((4,), (5,), (4,))),  # more workers than CPUs: one CPU each, in turn
])
def test_workers_get_contiguous_groups_or_one_cpu_each_in_turn(cpus, workers, groups):
    assert split(cpus, workers) == groups


def test_off_pins_nothing_and_auto_splits_the_process_cpus(four_cpus, tmp_path):
    no_quota = tmp_path / "absent"
    assert place_workers("off", 2, no_quota) is None
    assert place_workers("auto", 4, no_quota) == ((0,), (1,), (2,), (3,))
    assert place_workers("1,3", 2, no_quota) == ((1,), (3,))


def test_auto_does_not_pin_in_a_shared_pool_and_says_why(four_cpus, tmp_path, caplog):
    # a quota of 2 cores over 4 CPUs: other replicas share those CPUs, pinning would
    # stack every replica's workers on CPUs 0 and 1
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    with caplog.at_level(logging.WARNING, logger="retrieval.cpus"):
        assert place_workers("auto", 2, tmp_path / "cpu.max") is None
    assert "shared pool" in caplog.text


def test_a_cpu_the_process_may_not_use_is_refused(four_cpus, tmp_path):
    with pytest.raises(ValueError, match=r"CPU 7 is not one this process may run on "
                                         r"\(its CPUs: 0-3\)"):
        place_workers("2,7", 1, tmp_path / "absent")


def test_pinning_moves_the_threads_already_running_and_those_started_after():
    # in a child process: pinning this test run would slow every test after it
    code = textwrap.dedent("""
        import os, threading
        from pathlib import Path
        from retrieval.cpus import pin_process
        stop = threading.Event()
        before = threading.Thread(target=stop.wait); before.start()
        cpu = min(os.sched_getaffinity(0))
        pin_process([cpu])
        after = threading.Thread(target=stop.wait); after.start()
        print(sorted({os.sched_getaffinity(int(t.name)) == {cpu}
                      for t in Path("/proc/self/task").iterdir()}), len(list(
                      Path("/proc/self/task").iterdir())))
        stop.set()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    pinned, threads = done.stdout.split(" ", 1)[0], int(done.stdout.rsplit(" ", 1)[1])
    assert pinned == "[True]"  # every thread, the one started before included
    assert threads == 3


def _cpus_of_threads(pid: int) -> set[tuple[int, ...]]:
    return {tuple(sorted(os.sched_getaffinity(int(task.name))))
            for task in Path(f"/proc/{pid}/task").iterdir()}


@pytest.mark.slow
def test_serve_runs_every_thread_on_the_cpu_it_is_given(pipeline, tmp_path):
    cpu = max(os.sched_getaffinity(0))
    running = start_server(["--model", str(pipeline.model_dir), "--index",
                            str(pipeline.index_dir), "--cpu-affinity", str(cpu)], tmp_path)
    try:
        _answers(running.address, NIGHT)
        assert _cpus_of_threads(running.process.pid) == {(cpu,)}  # gRPC's, Faiss's: all
    finally:
        assert stop_server(running) == 0
    assert f"running on CPU {cpu}" in running.log()


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_two_workers_run_on_a_cpu_each(pipeline, features_redis, tmp_path):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    running = _start(pipeline, features_redis, tmp_path, "--cpu-affinity",
                     ",".join(map(str, cpus)))
    try:
        _answers(running.address, NIGHT)
        placed = sorted(tuple(_cpus_of_threads(pid)) for pid in child_pids(running.process.pid))
        assert placed == [((cpus[0],),), ((cpus[1],),)]  # every thread of each worker
    finally:
        assert stop_server(running) == 0


def _answers(address: str, context: dict) -> None:
    async def call():
        async with grpc.aio.insecure_channel(address) as channel:
            return await retrieve(channel, build_request("u1", 5, context, 1_700_611_200), 20)

    assert len(asyncio.run(call()).response.candidates) == 5


def test_the_supervisor_refuses_a_placement_that_does_not_name_each_worker():
    from retrieval.workers import SupervisorConfig

    assert SupervisorConfig(2, placement=[[0], [1]]).placement == ((0,), (1,))  # from JSON
    for placement in (((0,),), ((0,), ())):
        with pytest.raises(ValueError, match="placement must name the CPUs of each of the 2"):
            SupervisorConfig(2, placement=placement)

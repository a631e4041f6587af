"""Which thread of a server spends its CPU: threads named for the tools outside the
process (retrieval.os_threads), CPU time read per thread from /proc
(app.processes.thread_cpu_seconds), and the load test's split of a call's CPU into a
batch's fixed part and a call's own (benchmarks.loadtest.batch_cost)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest

from app.processes import thread_cpu_seconds
from benchmarks.ghz import Row
from benchmarks.loadtest import batch_cost, target_lines
from retrieval.client import build_request
from retrieval.os_threads import MAIN_THREAD, CpuByThread, name_os_thread
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as pb_grpc
from tests.test_workers import NIGHT

linux_only = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")


def _os_name(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


@linux_only
def test_a_thread_takes_its_python_name_or_the_one_given_cut_to_15_bytes():
    seen = {}

    def run():
        seen["before"] = _os_name(threading.get_native_id())
        assert name_os_thread()
        seen["own"] = _os_name(threading.get_native_id())
        assert name_os_thread("a-thread-with-a-long-name")
        seen["given"] = _os_name(threading.get_native_id())

    thread = threading.Thread(target=run, name="retrieve-work")
    thread.start()
    thread.join()
    assert seen["before"] != "retrieve-work"  # Python alone does not name it (3.11)
    assert seen["own"] == "retrieve-work"
    assert seen["given"] == "a-thread-with-a"


@linux_only
def test_cpu_time_is_told_apart_by_thread_name():
    """A process whose named thread has spun while its main thread waited."""
    code = textwrap.dedent("""
        import sys, threading, time
        from retrieval.os_threads import name_os_thread
        spun = threading.Event()
        def spin():
            name_os_thread()
            end = time.process_time() + 0.6
            while time.process_time() < end:
                pass
            spun.set()
            sys.stdin.readline()
        threading.Thread(target=spin, name="spinner", daemon=True).start()
        spun.wait()
        print("spun", flush=True)
        sys.stdin.readline()
        """)
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert child.stdout.readline().strip() == "spun"
        seconds = thread_cpu_seconds(child.pid)
        assert seconds["spinner"] >= 0.5
        assert seconds[MAIN_THREAD] < seconds["spinner"]
    finally:
        child.communicate("\n\n", timeout=30)


@linux_only
@pytest.mark.slow
def test_a_servers_batches_and_similar_items_run_on_threads_named_for_them(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        for i in range(100):
            stub.Retrieve(build_request(f"u{i % 5}", 10, NIGHT, 1_700_611_200), timeout=10)
        stub.SimilarItems(pb.SimilarItemsRequest(item_id="i5", k=10), timeout=10)
    names = {Path(task, "comm").read_text().strip()
             for task in Path(f"/proc/{server.process.pid}/task").iterdir()}
    assert {"retrieve-work", "similar_0"} <= names
    seconds = server.thread_cpu_seconds()
    assert seconds["retrieve-work"] > 0 and seconds[MAIN_THREAD] > 0
    # and the server says so on /metrics, refreshed once a second
    from tests.test_workers import _metrics, _wait_for

    exported = _wait_for(lambda: _metrics(server.metrics_port).get(
        'two_tower_thread_cpu_seconds_total{thread="retrieve-work"}', 0),
        what="the batch thread's CPU on /metrics")
    assert 0 < exported <= seconds["retrieve-work"] + 0.05


@linux_only
def test_cpu_by_thread_only_rises_and_keeps_what_an_ended_thread_used():
    counted = CpuByThread()
    counted.update()  # what ran before this test
    spun, finish = threading.Event(), threading.Event()

    def spin():
        name_os_thread("cpu-spinner")
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        spun.set()
        finish.wait()

    thread = threading.Thread(target=spin)
    thread.start()
    spun.wait()
    first = counted.update()
    assert first["cpu-spinner"] >= 0.25
    finish.set()
    thread.join()
    later = counted.update()  # the thread is gone: nothing added, nothing taken back
    assert later.get("cpu-spinner", 0.0) < 0.05 and all(v > 0 for v in later.values())


def _row(c: int, batch: float, cpu: float, by_thread: dict[str, float]) -> Row:
    return Row("server", "closed", c, 0, count=100, ok=100, rps=1000.0, p50_ms=1.0,
               p90_ms=1.0, p99_ms=1.0, p999_ms=1.0, cpu_ms_per_call=cpu,
               stages={"batch": batch}, cpu_by_thread=by_thread)


def _costs(batch: float, threads: dict[str, tuple[float, float]]) -> tuple[float, dict]:
    """CPU a call at mean batch ``batch`` with each thread's (F, m): F / b + m."""
    by_thread = {name: f / batch + m for name, (f, m) in threads.items()}
    return sum(by_thread.values()), by_thread


THREADS = {"main": (0.2, 0.2), "retrieve-work": (0.8, 0.3), "event_engine": (0.1, 0.0)}


def test_a_batchs_fixed_cpu_and_a_calls_own_come_from_two_batch_sizes():
    one, many = (_row(c, b, *_costs(b, THREADS)) for c, b in ((1, 1.0), (50, 20.0)))
    fit = batch_cost(one, many)
    assert fit["fixed_ms"] == pytest.approx(1.1) and fit["per_call_ms"] == pytest.approx(0.5)
    assert fit["by_thread"]["retrieve-work"] == pytest.approx(
        {"fixed_ms": 0.8, "per_call_ms": 0.3})
    assert fit["by_thread"]["event_engine"]["per_call_ms"] == pytest.approx(0.0, abs=1e-12)
    # the same batch size twice, or a run without its batch size, tells nothing
    assert batch_cost(one, dataclasses.replace(many, stages={"batch": 1.0})) is None
    assert batch_cost(one, dataclasses.replace(many, stages={})) is None
    assert batch_cost(None, many) is None


def test_the_targets_say_how_busy_the_worker_is_at_half_load_and_why():
    one, many = (_row(c, b, *_costs(b, THREADS)) for c, b in ((1, 1.0), (50, 20.0)))
    half_cpu, _ = _costs(2.0, THREADS)  # 1.05 ms a call
    half = dataclasses.replace(_row(50, 2.0, half_cpu, {}), mode="open", target_rps=400,
                               rps=400.0)
    one, many = dataclasses.replace(one, rps=300.0), dataclasses.replace(many, rps=800.0)
    text = "\n".join(target_lines([one, many, half], {}, 50))
    assert ("why: CPU a call = F/b + m over batches of b (c=1: 1.0, c=50: 20.0): F 1.100 ms "
            "a batch (retrieve-work 0.800, main 0.200, event_engine 0.100), m 0.500") in text
    assert "at half load (400/s) batches of 2.0 at 1.050 ms a call: the worker 42 % busy" in text


@linux_only
def test_the_processes_mapping_a_directorys_files_are_found(tmp_path):
    """The sharers a PSS figure divides pages with: a process holding a mapped array."""
    import numpy as np

    from app.processes import pids_mapping

    np.save(tmp_path / "table.npy", np.zeros(100_000, np.float32))
    code = ("import sys, numpy as np; t = np.load(sys.argv[1], mmap_mode='r'); "
            "print(float(t.sum()), flush=True); sys.stdin.readline()")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "table.npy")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "0.0"
        assert pids_mapping([tmp_path]) == {child.pid: str(tmp_path / "table.npy")}
        assert pids_mapping([tmp_path], exclude=[child.pid]) == {}
        assert pids_mapping([tmp_path / "elsewhere"]) == {}
    finally:
        child.communicate("\n", timeout=30)
    assert pids_mapping([tmp_path]) == {}


@linux_only
@pytest.mark.slow
def test_the_load_test_names_a_server_left_running_on_the_pair(server, pipeline):
    from benchmarks.loadtest import _sharers

    assert server.process.pid in _sharers((pipeline.model_dir, pipeline.index_dir, None))


def test_the_metrics_refresh_reads_proc_off_the_event_loop_and_survives_a_failure():
    """Reading /proc for every thread takes ~1 ms: on the loop it would hold the calls
    that arrive meanwhile, once a second. A refresh that raises is logged and retried."""
    import asyncio

    from retrieval.metrics import ServiceMetrics
    from retrieval.server import _refresh

    on_loop_thread, calls = [], []

    class Recording(ServiceMetrics):
        def refresh(self) -> None:
            on_loop_thread.append(threading.current_thread() is threading.main_thread())
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("a gauge's bug")
            super().refresh()

    async def run() -> None:
        task = asyncio.create_task(_refresh(Recording(), every_s=0.01))
        await asyncio.sleep(0.3)
        task.cancel()

    asyncio.run(run())
    assert len(calls) >= 4 and not any(on_loop_thread)

"""The reply records and metadata rows of an index are made once per host and mapped by
every serving process (retrieval.mapped_cache): a second worker of `serve --workers` holds
no copy of its own, answers exactly as one that built them, and a cache that cannot be used
only costs memory."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest

from app.processes import child_pids, pss_kib
from indexer.artifact import load_index_artifact, load_metadata_rows
from retrieval.candidate_index import CandidateIndex
from retrieval.query import ItemRules
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as pb_grpc
from retrieval.wire import CandidateWire
from tests.conftest import start_server, stop_server

REPO = Path(__file__).resolve().parents[1]
ASCII_IDS = np.array([f"item-{n:06d}" for n in range(300_000)])
OTHER_IDS = np.array(["é-日本", "plain", "x" * 130, ""])  # not the ASCII fast path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TWO_TOWER_CACHE_DIR", str(root))
    return root


def _replies(table: CandidateWire, n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(20):
        rows = rng.integers(0, n, 100)
        out.append(table.records(rows, rng.standard_normal(100).astype(np.float32)))
    return out


@pytest.mark.parametrize("ids", [ASCII_IDS, OTHER_IDS], ids=["ascii", "any"])
def test_mapped_reply_records_give_the_replies_of_built_ones(ids, cache):
    built = CandidateWire(ids)
    first = CandidateWire(ids, "index-abc")   # made, saved, mapped back
    second = CandidateWire(ids, "index-abc")  # only mapped
    assert isinstance(second._buffer.base, np.memmap)
    assert _replies(first, len(ids)) == _replies(second, len(ids)) == _replies(built, len(ids))


def _private_kib(pid_smaps: str, under: Path) -> dict[str, int]:
    """KiB of the mappings of files under ``under``: rss, private and anonymous."""
    out = {"rss": 0, "private": 0, "anonymous": 0}
    inside = False
    for line in pid_smaps.splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            inside = len(head) > 5 and head[5].startswith(str(under))
        elif inside and head[0] in ("Rss:", "Private_Clean:", "Private_Dirty:", "Anonymous:"):
            name = {"Rss:": "rss", "Anonymous:": "anonymous"}.get(head[0], "private")
            out[name] += int(head[1])
    return out


SECOND_WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from retrieval.wire import CandidateWire
    ids = np.array([f"item-{n:06d}" for n in range(300_000)])
    table = CandidateWire(ids, "index-abc")
    for first in range(0, len(ids), 10_000):  # every record read once
        table.records(np.arange(first, first + 10_000), np.ones(10_000, np.float32))
    print(open("/proc/self/smaps").read())
""")


def test_a_second_process_maps_the_reply_records_and_holds_no_copy_of_its_own(cache):
    """The first worker makes the records; the second maps the same pages: its share of
    them is shared page cache, not private memory."""
    table = CandidateWire(ASCII_IDS, "index-abc")
    table.records(np.arange(len(ASCII_IDS)), np.ones(len(ASCII_IDS), np.float32))  # all read
    size_kib = sum(a.nbytes for a in (table._buffer, table._starts, table._lengths)) // 1024
    done = subprocess.run([sys.executable, "-c", SECOND_WORKER], cwd=REPO, check=True,
                          capture_output=True, text=True, env=os.environ)
    second = _private_kib(done.stdout, cache)
    assert second["rss"] >= 0.9 * size_kib  # it did read them all, from the cache's files
    assert second["anonymous"] == 0 and second["private"] < 0.05 * size_kib


MAKER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from retrieval import mapped_cache
    def make():
        with open(sys.argv[1], "a") as log:
            log.write("made\\n")
        time.sleep(1.0)  # long enough for the other process to arrive meanwhile
        return {"table": np.arange(1000)}
    arrays = mapped_cache.mapped_arrays("replies", "index-slow", make)
    assert arrays["table"].tolist() == list(range(1000))
    print(type(arrays["table"].base).__name__)
""")


def test_workers_that_start_together_make_a_table_once_and_both_map_it(cache, tmp_path):
    made = tmp_path / "made.log"
    makers = [subprocess.Popen([sys.executable, "-c", MAKER, str(made)], cwd=REPO,
                               stdout=subprocess.PIPE, text=True, env=os.environ)
              for _ in range(2)]
    outputs = [m.communicate(timeout=60)[0].strip() for m in makers]
    assert [m.returncode for m in makers] == [0, 0]
    assert made.read_text() == "made\n"
    assert outputs == ["memmap", "memmap"]


def test_a_damaged_entry_is_made_again_and_answers_the_same(cache, caplog):
    first = _replies(CandidateWire(ASCII_IDS, "index-abc"), len(ASCII_IDS))
    entry = cache / "replies" / "index-abc"
    (entry / "lengths.npy").unlink()
    with caplog.at_level(logging.WARNING):
        again = CandidateWire(ASCII_IDS, "index-abc")
    assert "unusable" in caplog.text
    assert _replies(again, len(ASCII_IDS)) == first and (entry / "lengths.npy").is_file()
    # an entry of another table under the same key (ids of another length) is not used
    shorter = CandidateWire(ASCII_IDS[:1000], "index-abc")
    assert _replies(shorter, 1000) == _replies(CandidateWire(ASCII_IDS[:1000]), 1000)


def test_an_unusable_cache_builds_the_tables_in_memory(tmp_path, monkeypatch, caplog):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("TWO_TOWER_CACHE_DIR", str(not_a_dir))
    with caplog.at_level(logging.WARNING):
        table = CandidateWire(ASCII_IDS[:5000], "index-abc")
    assert "no cache of mapped tables" in caplog.text
    assert not isinstance(table._buffer.base, np.memmap)
    assert _replies(table, 5000) == _replies(CandidateWire(ASCII_IDS[:5000]), 5000)


def _category(index_dir: Path) -> tuple[str, np.ndarray]:
    rows = load_metadata_rows(load_index_artifact(index_dir))
    value, held = max(rows["category"].items(), key=lambda kv: len(kv[1]))
    return value, held


def test_an_index_mapping_its_tables_answers_as_one_that_built_them(pipeline, cache,
                                                                    tmp_path, monkeypatch):
    """Metadata rules, exclusions and reply bytes: the same from the mapped tables (made
    by one process, mapped by the next) as from tables built without a cache."""
    artifact = load_index_artifact(pipeline.index_dir, mmap=True)
    CandidateIndex(artifact)  # makes the entries
    mapped = CandidateIndex(artifact)
    assert any((cache / "metadata-rows").iterdir()) and any((cache / "replies").iterdir())
    monkeypatch.setenv("TWO_TOWER_CACHE_DIR", str(tmp_path / "none"))
    (tmp_path / "none").write_text("")  # unusable: built in memory
    built = CandidateIndex(artifact)
    assert {c: {v: r.tolist() for v, r in by.items()} for c, by in
            mapped._rows_by_value.items()} == {c: {v: r.tolist() for v, r in by.items()}
                                               for c, by in built._rows_by_value.items()}
    value, _ = _category(pipeline.index_dir)
    rules = [ItemRules({"category": frozenset([value])}, {}), ItemRules({}, {}),
             ItemRules({}, {"category": frozenset([value])})]
    rng = np.random.default_rng(1)
    user_emb = rng.standard_normal((3, artifact.embedding_dim)).astype(np.float32)
    exclude = [frozenset(), frozenset(artifact.item_ids[:5].tolist()), frozenset()]
    ours, theirs = mapped.search(user_emb, 10, exclude, rules), built.search(user_emb, 10,
                                                                             exclude, rules)
    assert [c.wire() for c in ours] == [c.wire() for c in theirs]
    assert [c.item_ids for c in ours] == [c.item_ids for c in theirs]
    assert all(len(c.rows) for c in ours)


@pytest.mark.slow
@pytest.mark.parametrize("usable", [True, False], ids=["cache", "no-cache"])
def test_two_workers_serve_metadata_rules_with_or_without_a_usable_cache(
        usable, pipeline, features_redis, tmp_path):
    cache_dir = tmp_path / "cache"
    if not usable:
        cache_dir.write_text("")  # a file: every worker builds its own tables, logged
    value, held = _category(pipeline.index_dir)
    held_ids = set(load_index_artifact(pipeline.index_dir).item_ids[held].tolist())
    running = start_server(["--model", str(pipeline.model_dir), "--index",
                            str(pipeline.index_dir), "--redis-url", features_redis,
                            "--workers", "2"], tmp_path,
                           env={**os.environ, "TWO_TOWER_CACHE_DIR": str(cache_dir)})
    try:
        replies = []
        for i in range(8):  # one connection each: the kernel spreads them over the workers
            with grpc.insecure_channel(running.address,
                                       options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                request = pb.RetrieveRequest(user_id=f"u{i}", k=5)
                request.allow["category"].values.append(value)
                replies.append(pb_grpc.RetrievalServiceStub(ch).Retrieve(request, timeout=20))
    finally:
        assert stop_server(running) == 0
    assert all(r.candidates and {c.item_id for c in r.candidates} <= held_ids for r in replies)
    log = running.log()
    if usable:
        assert "no cache" not in log and any((cache_dir / "replies").iterdir())
    else:
        assert log.count("no cache of mapped tables") >= 2  # each worker said so


@pytest.mark.slow
def test_the_supervisor_holds_none_of_the_serving_libraries(pipeline, features_redis,
                                                            tmp_path):
    """`serve --workers 2`: the process started (same pid) ends up a supervisor that has
    not loaded grpc, NumPy or Faiss, only the workers have: a second worker is not paid
    for with a third copy of them."""
    running = start_server(["--model", str(pipeline.model_dir), "--index",
                            str(pipeline.index_dir), "--redis-url", features_redis,
                            "--workers", "2"], tmp_path)
    try:
        supervisor_maps = Path(f"/proc/{running.process.pid}/maps").read_text()
        workers = child_pids(running.process.pid)
        worker_maps = Path(f"/proc/{workers[0]}/maps").read_text()
        supervisor_pss = pss_kib(running.process.pid)
    finally:
        assert stop_server(running) == 0
    heavy = ("_multiarray_umath", "cygrpc", "_swigfaiss")
    assert len(workers) == 2 and all(lib in worker_maps for lib in heavy)
    assert not any(lib in supervisor_maps for lib in heavy)
    assert supervisor_pss < 40 * 1024  # KiB; it was about 65 MiB


def test_a_port_taken_by_another_program_is_refused_before_any_worker_starts(
        pipeline, redis_url, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        done = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--model",
                               str(pipeline.model_dir), "--index", str(pipeline.index_dir),
                               "--redis-url", redis_url, "--workers", "2", "--port",
                               str(taken.getsockname()[1])], cwd=REPO, capture_output=True,
                              text=True, timeout=120, check=False)
    finally:
        taken.close()
    assert done.returncode == 2
    assert "two-tower serve: error: cannot bind 127.0.0.1" in done.stderr
    assert "worker 0 started" not in done.stderr

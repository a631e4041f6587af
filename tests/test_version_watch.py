"""The version watcher against what an operator's mistake or an attacker can put in an index
store: a CURRENT that is not UTF-8, a directory or a FIFO; a manifest whose "measured" is
not an object; a file or a version directory linked out of the store. Each is refused
naming the file, the old pair keeps serving (health answering within a second), the
failure is counted on /metrics, and the next valid publish is followed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contracts.errors import ArtifactError
from contracts.index_store import current_version, resolve_index_dir, versions
from contracts.model_manifest import load_model_manifest, read_manifest_json
from indexer.artifact import INDEX_FORMAT, load_index_artifact
from indexer.publish import move_pointer
from retrieval.client import build_request
from retrieval.v1 import retrieval_pb2_grpc as pb_grpc
from tests.conftest import start_server, stop_server

NIGHT = {"hour_of_day": 22, "device": "tv"}
SERVING = health_pb2.HealthCheckResponse.SERVING


def _build_index(model_dir: Path, store: Path, factory: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "build-index", "--model", str(model_dir),
         "--out", str(store), "--index", factory, "--target-recall", "0.5"],
        capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def built_store(pipeline, tmp_path_factory) -> tuple[Path, str, str]:
    """An index store built by `two-tower build-index` holding two versions (HNSW, Flat)."""
    store = tmp_path_factory.mktemp("watch") / "indexes"
    names = []
    for factory in ("HNSW32", "Flat"):
        done = _build_index(pipeline.model_dir, store, factory)
        assert done.returncode == 0, done.stderr
        names.append(current_version(store))
    return store, names[0], names[1]


@pytest.fixture
def store(built_store, tmp_path) -> tuple[Path, str, str]:
    """A copy of the built store this test may damage, CURRENT naming the first version."""
    source, first, second = built_store
    copy = tmp_path / "indexes"
    shutil.copytree(source, copy)
    move_pointer(copy, first)
    return copy, first, second


# --- the readers name the file ---------------------------------------------------------


def _bad_copy(store: Path, name: str, new: str) -> Path:
    bad = store / new
    shutil.copytree(store / name, bad)
    return bad


def test_every_artifact_reader_names_the_file_it_refuses(store, pipeline, tmp_path):
    store, first, _ = store
    pointer = store / "CURRENT"
    pointer.write_bytes(b"\xff\xfei-\x80\n")
    for read in (resolve_index_dir, current_version, load_index_artifact):
        with pytest.raises(ArtifactError, match="not UTF-8") as caught:
            read(store)
        assert caught.value.path == str(pointer)

    pointer.unlink()
    pointer.mkdir()
    with pytest.raises(ArtifactError, match="a directory, not a regular file") as caught:
        resolve_index_dir(store)
    assert caught.value.path == str(pointer)

    pointer.rmdir()
    os.mkfifo(pointer)
    began = time.monotonic()
    with pytest.raises(ArtifactError, match="a FIFO, not a regular file") as caught:
        current_version(store)
    assert caught.value.path == str(pointer) and time.monotonic() - began < 1.0
    pointer.unlink()

    bad = _bad_copy(store, first, "i-measured-list")
    doc = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**doc, "measured": [1, 2]}))
    with pytest.raises(ArtifactError, match="'measured' must be a JSON object") as caught:
        load_index_artifact(bad)
    assert caught.value.path == str(bad / "manifest.json")

    (bad / "manifest.json").write_bytes(b'{"format": "\xff"}')
    with pytest.raises(ArtifactError, match="not UTF-8") as caught:
        read_manifest_json(bad, INDEX_FORMAT)
    assert caught.value.path == str(bad / "manifest.json")
    assert first in versions(store) and "i-measured-list" not in versions(store)

    model = tmp_path / "model"
    shutil.copytree(pipeline.model_dir, model)
    (model / "manifest.json").write_bytes(b"\xff")
    with pytest.raises(ArtifactError, match="not UTF-8") as caught:
        load_model_manifest(model)
    assert caught.value.path == str(model / "manifest.json")
    with pytest.raises(ArtifactError) as caught:
        versions(tmp_path / "no-such-store")
    assert caught.value.path == str(tmp_path / "no-such-store")


def test_paths_that_leave_the_store_are_refused_naming_them(store, pipeline, tmp_path):
    store, first, _ = store
    outside = tmp_path / "outside"
    outside.mkdir()
    linked = _bad_copy(store, first, "i-linked-file")
    shutil.move(linked / "index.faiss", outside / "index.faiss")  # same bytes, same checksum
    (linked / "index.faiss").symlink_to(outside / "index.faiss")
    with pytest.raises(ArtifactError, match="through a symbolic link, outside") as caught:
        load_index_artifact(linked)
    assert caught.value.path == str(linked / "index.faiss")

    shutil.copytree(store / first, outside / "i-evil")
    (store / "i-evil").symlink_to(outside / "i-evil")
    move_pointer(store, "i-evil")
    with pytest.raises(ArtifactError, match="outside the index store") as caught:
        load_index_artifact(store)
    assert caught.value.path == str(store / "i-evil")
    assert "i-evil" not in versions(store)

    model = tmp_path / "model"
    shutil.copytree(pipeline.model_dir, model)
    (model / "item_ids.npy").rename(outside / "item_ids.npy")
    (model / "item_ids.npy").symlink_to(outside / "item_ids.npy")
    with pytest.raises(ArtifactError, match="outside the artifact directory") as caught:
        load_model_manifest(model)
    assert caught.value.path == str(model / "item_ids.npy")


@pytest.mark.slow
def test_build_index_with_a_malformed_current_names_it(store, pipeline):
    store, _, _ = store
    (store / "CURRENT").write_bytes(b"\xff\xfe\n")
    done = _build_index(pipeline.model_dir, store, "Flat")
    assert done.returncode != 0
    assert f"{store / 'CURRENT'}: is not UTF-8 text" in done.stderr, done.stderr
    assert "codec can't decode" not in done.stderr


# --- a real server under each attack --------------------------------------------------


class Probe:
    """What a user of the running server sees: the served index, health, /metrics."""

    def __init__(self, running) -> None:
        self.running = running
        self.channel = grpc.insecure_channel(running.address)

    def served(self) -> str:
        request = build_request("u1", 10, NIGHT, 1_700_611_200)
        reply = pb_grpc.RetrievalServiceStub(self.channel).Retrieve(request, timeout=5)
        assert len(reply.candidates) == 10
        return reply.index_version

    def health(self, timeout: float = 1.0) -> int:
        return health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout).status

    def metric(self, name: str, labels: str = "") -> float:
        url = f"http://127.0.0.1:{self.running.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        found = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
        assert found, f"{name}{labels} not on /metrics"
        return float(found.group(1))

    def errors(self, reason: str) -> float:
        return self.metric("two_tower_version_watch_errors_total", f'{{reason="{reason}"}}')

    def wait_for(self, condition, timeout_s: float, what: str) -> float:
        began = time.monotonic()
        while not condition():
            assert time.monotonic() - began < timeout_s, f"{what}: not within {timeout_s} s"
            time.sleep(0.05)
        return time.monotonic() - began


def _non_utf8(store: Path, name: str, tmp: Path) -> None:
    (store / "CURRENT").write_bytes(b"\xff\xfei-\x80\n")


def _directory(store: Path, name: str, tmp: Path) -> None:
    (store / "CURRENT").unlink()
    (store / "CURRENT").mkdir()


def _fifo(store: Path, name: str, tmp: Path) -> None:
    (store / "CURRENT").unlink()
    os.mkfifo(store / "CURRENT")


def _measured_not_object(store: Path, name: str, tmp: Path) -> None:
    bad = _bad_copy(store, name, f"i-measured-{name}")
    doc = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**doc, "measured": "fast"}))
    move_pointer(store, bad.name)


def _linked_file(store: Path, name: str, tmp: Path) -> None:
    bad = _bad_copy(store, name, f"i-linked-{name}")
    outside = tmp / f"outside-{name}"
    outside.mkdir()
    shutil.move(bad / "item_ids.npy", outside / "item_ids.npy")
    (bad / "item_ids.npy").symlink_to(outside / "item_ids.npy")
    move_pointer(store, bad.name)


def _linked_version(store: Path, name: str, tmp: Path) -> None:
    shutil.copytree(store / name, tmp / f"evil-{name}")
    (store / f"i-evil-{name}").symlink_to(tmp / f"evil-{name}")
    move_pointer(store, f"i-evil-{name}")


ATTACKS = [(_non_utf8, "pointer", "is not UTF-8 text"),
           (_directory, "pointer", "is a directory, not a regular file"),
           (_fifo, "pointer", "is a FIFO, not a regular file"),
           (_measured_not_object, "refused", "'measured' must be a JSON object"),
           (_linked_file, "refused", "through a symbolic link, outside the artifact"),
           (_linked_version, "pointer", "through a symbolic link, outside the index store")]


def _publish(store: Path, name: str) -> None:
    pointer = store / "CURRENT"
    if pointer.is_dir() and not pointer.is_symlink():
        pointer.rmdir()
    elif not pointer.is_file():
        pointer.unlink(missing_ok=True)
    move_pointer(store, name)


@pytest.mark.slow
def test_the_watcher_survives_each_attack_and_follows_the_next_publish(store, pipeline,
                                                                        tmp_path):
    store, serving, other = store
    running = start_server(["--model", str(pipeline.model_dir), "--index", str(store),
                            "--features", str(pipeline.data_dir), "--watch-interval", "0.2",
                            "--metrics-port", "0"], tmp_path)
    probe = Probe(running)
    try:
        versions_of = {v: load_index_artifact(store / v).index_version for v in (serving, other)}
        assert probe.served() == versions_of[serving]
        for attack, reason, message in ATTACKS:
            before = probe.errors(reason)
            attack(store, serving, tmp_path)
            probe.wait_for(lambda r=reason, n=before: probe.errors(r) >= n + 3, 10,
                           attack.__name__)
            for _ in range(5):  # over several watch intervals: answering, the old pair
                assert probe.health(timeout=1.0) == SERVING
                assert probe.served() == versions_of[serving]
                time.sleep(0.1)
            log = running.log()
            assert log.count(message) == 1, (attack.__name__, log[-3000:])  # once per cause
            assert probe.metric("two_tower_version_watch_last_success_age_seconds") > 0.3

            _publish(store, other)
            took = probe.wait_for(lambda v=versions_of[other]: probe.served() == v, 10,
                                  f"publish after {attack.__name__}")
            assert took < 5, (attack.__name__, took)
            probe.wait_for(
                lambda: probe.metric("two_tower_version_watch_last_success_age_seconds") < 1,
                5, "a successful check")
            serving, other = other, serving
        assert "version watcher stopped" not in running.log()
    finally:
        probe.channel.close()
        code = stop_server(running)
    assert code == 0
    assert "had stopped" not in running.log()


@pytest.mark.slow
def test_readiness_follows_the_watcher_when_asked(store, pipeline, tmp_path):
    store, serving, other = store
    running = start_server(["--model", str(pipeline.model_dir), "--index", str(store),
                            "--features", str(pipeline.data_dir), "--watch-interval", "0.2",
                            "--watch-unready-after", "0.6", "--metrics-port", "0"], tmp_path)
    probe = Probe(running)
    try:
        _non_utf8(store, serving, tmp_path)
        probe.wait_for(lambda: probe.health() != SERVING, 5, "NOT_SERVING")
        assert probe.served()  # still answers calls; only the probe moves traffic away
        _publish(store, other)
        probe.wait_for(lambda: probe.health() == SERVING, 5, "SERVING again")
        assert probe.served() == load_index_artifact(store / other).index_version
        assert "NOT_SERVING until one succeeds" in running.log()
    finally:
        probe.channel.close()
        stop_server(running)

"""Publishing: versioned directories, one atomic CURRENT pointer, rollback, the notification.

The crash tests run the real `two-tower build-index` as a child process that SIGKILLs
itself at a named point (indexer.faults); the store must still serve its old version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from indexer.artifact import load_index_artifact
from indexer.faults import ENV
from indexer.job import JobOptions, run_build_index
from contracts.index_store import current_version, versions
from indexer.publish import CHANNEL, rollback
from contracts.errors import ArtifactError


def _build(pipeline, store, **options):
    return run_build_index(pipeline.model_dir, store, None, JobOptions(**options))


def test_a_build_adds_a_version_and_moves_current_to_it(pipeline, tmp_path):
    store = tmp_path / "indexes"
    first = _build(pipeline, store)
    second = _build(pipeline, store)
    assert current_version(store) == second.name
    assert versions(store) == [first.name, second.name]
    assert load_index_artifact(store).index_version == second.name


def test_the_server_pair_loads_from_a_store_through_its_pointer(pipeline, tmp_path):
    from retrieval.pair import load_pair

    store = tmp_path / "indexes"
    built = _build(pipeline, store)
    pair = load_pair(pipeline.model_dir, store)
    assert pair.index_version == built.name and pair.model_version == pipeline.model_dir.name


@pytest.mark.parametrize("point", ["mid-write", "before-pointer"])
def test_a_job_killed_before_the_pointer_moves_leaves_the_old_version_current(
        pipeline, tmp_path, point):
    store = tmp_path / "indexes"
    old = _build(pipeline, store)
    job = subprocess.run(
        [sys.executable, "-m", "app.cli", "build-index", "--model",
         str(pipeline.model_dir), "--out", str(store)],
        env={**os.environ, ENV: point}, capture_output=True, text=True, timeout=120)
    assert job.returncode == -signal.SIGKILL, job.stderr
    assert current_version(store) == old.name
    assert load_index_artifact(store).index_version == old.name  # intact: checksums pass
    survivor = _build(pipeline, store)  # the next job cleans up and publishes normally
    assert current_version(store) == survivor.name
    assert not list(store.glob(".tmp-*"))


def test_rollback_returns_to_the_previous_version_and_can_be_named(pipeline, tmp_path):
    store = tmp_path / "indexes"
    first, second, third = (_build(pipeline, store) for _ in range(3))
    assert rollback(store).index_version == second.name
    assert rollback(store).index_version == first.name
    assert load_index_artifact(store).index_version == first.name
    cli = subprocess.run([sys.executable, "-m", "app.cli", "rollback", "--store",
                          str(store), "--to", third.name], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == str(third) and current_version(store) == third.name


def test_rollback_refuses_a_corrupt_target_and_keeps_current(pipeline, tmp_path):
    store = tmp_path / "indexes"
    first, second = _build(pipeline, store), _build(pipeline, store)
    (first / "item_ids.npy").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="item_ids.npy: checksum mismatch"):
        rollback(store)
    assert current_version(store) == second.name


def test_rollback_with_nothing_older_says_so(pipeline, tmp_path):
    store = tmp_path / "indexes"
    _build(pipeline, store)
    with pytest.raises(ArtifactError, match="no version older than .* to roll back to"):
        rollback(store)


def test_only_the_last_versions_are_kept(pipeline, tmp_path):
    store = tmp_path / "indexes"
    built = [_build(pipeline, store, keep=2) for _ in range(4)]
    assert versions(store) == [built[2].name, built[3].name]


def test_a_pointer_naming_a_missing_version_is_refused_with_the_fix(pipeline, tmp_path):
    store = tmp_path / "indexes"
    _build(pipeline, store)
    (store / "CURRENT").write_text("i-gone\n")
    with pytest.raises(ArtifactError, match=r"CURRENT: names 'i-gone'.*two-tower rollback"):
        load_index_artifact(store)


def test_a_store_with_an_unreadable_pointer_is_refused_before_anything_is_built(
        pipeline, tmp_path):
    store = tmp_path / "indexes"
    kept = _build(pipeline, store)
    (store / "CURRENT").write_bytes(b"\xff\xfe not a version\n")
    with pytest.raises(ArtifactError, match=r"CURRENT: is not UTF-8 text.*two-tower rollback"):
        _build(pipeline, store)
    # nothing was written: the only directory is the version that was there
    assert sorted(p.name for p in store.iterdir()) == [".lock", "CURRENT", kept.name]


def test_publishing_sends_the_documented_message_on_redis(pipeline, tmp_path, redis_url):
    store = tmp_path / "indexes"
    first = _build(pipeline, store)
    with redis.Redis.from_url(redis_url) as client:
        subscriber = client.pubsub(ignore_subscribe_messages=True)
        subscriber.subscribe(CHANNEL)
        second = _build(pipeline, store, notify_url=redis_url)
        message = _next_message(subscriber)
        subscriber.close()
    assert message["event"] == "index-published" and message["reason"] == "build"
    assert message["index_version"] == second.name == current_version(store)
    assert message["previous_version"] == first.name
    assert message["path"] == str(second.resolve()) and message["store"] == str(store.resolve())
    assert message["model_version"] == pipeline.model_dir.name
    assert message["format"] == "two-tower-index/2" and message["num_items"] == 200
    assert set(message) == {"event", "format", "store", "index_version", "path",
                            "model_version", "previous_version", "reason", "num_items",
                            "live_items", "published_at"}


def _next_message(subscriber, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = subscriber.get_message(timeout=0.1)
        if message is not None:
            return json.loads(message["data"])
    raise AssertionError(f"no message on {CHANNEL} within {timeout_s}s")

"""Data-parallel training from TF_CONFIG alone: two local workers on loopback ports."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from contracts.model_manifest import load_model_manifest
from contracts.dataset import write_dataset
from training.synthetic import SyntheticConfig, generate_synthetic


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _train(data, out, env_extra=None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "train", "--data", str(data), "--out", str(out),
         "--epochs", "3", "--batch-size", "128", "--seed", "1", "--no-final-fit"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.slow
def test_two_workers_agree_and_match_single_worker_training(tmp_path):
    dataset, spec_toml = generate_synthetic(SyntheticConfig(
        num_users=300, num_items=200, num_clusters=6, interactions_per_user=15, seed=3))
    write_dataset(dataset, tmp_path / "data", spec_toml)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    workers = [
        _train(tmp_path / "data", tmp_path / f"worker{i}", {"TF_CONFIG": json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": i}})})
        for i in range(2)
    ]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(logs)
    fingerprints = [re.search(r"worker (\d)/2 final weights sha256 (\w+)", log) for log in logs]
    assert all(fingerprints), "\n".join(logs)
    assert fingerprints[0].group(2) == fingerprints[1].group(2)  # synchronous: same weights

    single = _train(tmp_path / "data", tmp_path / "single")
    single_log = single.communicate(timeout=600)[0]
    assert single.returncode == 0, single_log
    (chief_dir,) = (tmp_path / "worker0").iterdir()
    assert not list((tmp_path / "worker1").glob("m-*"))  # only the chief's artifact is kept
    (single_dir,) = (tmp_path / "single").iterdir()
    both = [load_model_manifest(d).training["evaluation"]["model"]
            for d in (chief_dir, single_dir)]
    for metric in ("recall@10", "recall@50"):
        assert abs(both[0][metric] - both[1][metric]) <= 0.1, both

"""The serving install has no TensorFlow and no Spark (`pip install .[serve]`, the image's
serve target): `serve`, `load-features` and `query` work in a Python where
`import tensorflow` (or pyspark) fails.

The child processes get a sitecustomize that refuses TensorFlow, tf-keras and TFRS at
import and records every attempt, so the test fails both when serving breaks without them
and when anything on the serving path so much as tries to import them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from retrieval.client import build_request, retrieve
from tests.conftest import start_server, stop_server

BLOCKER = '''
import os, sys

class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tf_keras", "tensorflow_recommenders", "pyspark"):
            with open(os.environ["TT_TF_ATTEMPTS"], "a") as fh:
                fh.write(name + "\\n")
            raise ImportError(f"{name} is not installed (serving install)")

sys.meta_path.insert(0, _NoTensorFlow())
'''


def _env_without_tensorflow(tmp_path: Path) -> tuple[dict[str, str], Path]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    attempts = tmp_path / "tensorflow-imports.txt"
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(root)]),
               TT_TF_ATTEMPTS=str(attempts))
    return env, attempts


def test_the_blocker_makes_import_tensorflow_fail(tmp_path):
    env, attempts = _env_without_tensorflow(tmp_path)
    done = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not installed (serving install)" in done.stderr
    assert attempts.read_text().split() == ["tensorflow"]


@pytest.mark.slow
def test_serve_load_features_and_query_run_where_tensorflow_cannot_be_imported(
        pipeline, redis_url, tmp_path):
    env, attempts = _env_without_tensorflow(tmp_path)
    cli = [sys.executable, "-m", "app.cli"]
    loaded = subprocess.run([*cli, "load-features", "--data", str(pipeline.data_dir),
                             "--redis-url", redis_url], env=env, capture_output=True,
                            text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    running = start_server(["--model", str(pipeline.model_dir), "--index",
                            str(pipeline.index_dir), "--redis-url", redis_url,
                            "--redis-timeout-ms", "2000"], tmp_path, env=env)
    try:
        async def call():
            async with grpc.aio.insecure_channel(running.address) as channel:
                return await retrieve(channel, build_request("u1", 10, {}, 1_700_000_000))

        reply = asyncio.run(call())
        assert len(reply.response.candidates) == 10 and not reply.response.degraded
        queried = subprocess.run([*cli, "query", "--address", running.address, "--user-id",
                                  "u1", "--k", "5"], env=env, capture_output=True, text=True,
                                 timeout=60)
        assert queried.returncode == 0, queried.stderr
        assert len([line for line in queried.stdout.splitlines() if line.strip()]) >= 5
    finally:
        assert stop_server(running) == 0, running.log()
    assert not attempts.exists(), f"the serving path tried to import {attempts.read_text()}"

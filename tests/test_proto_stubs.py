"""The checked-in Python stubs are exactly what protoc makes of proto/ today."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = "retrieval/v1/retrieval.proto"


def test_checked_in_stubs_match_the_proto(tmp_path):
    # protoc runs in its own process: grpc_tools' native module must not share one with
    # TensorFlow and Faiss (loading it after them has crashed the interpreter).
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         str(ROOT / "proto" / PROTO)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("retrieval_pb2.py", "retrieval_pb2.pyi", "retrieval_pb2_grpc.py"):
        fresh, checked_in = tmp_path / "retrieval/v1" / name, ROOT / "retrieval/v1" / name
        assert filecmp.cmp(fresh, checked_in, shallow=False), (
            f"{checked_in} is stale: run `make proto` and commit the result")

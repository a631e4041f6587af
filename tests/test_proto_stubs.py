"""The checked-in Python stubs are exactly what protoc makes of proto/ today."""

from __future__ import annotations

import filecmp
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO = "retrieval/v1/retrieval.proto"


def test_checked_in_stubs_match_the_proto(tmp_path):
    code = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}",
                        f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                        str(ROOT / "proto" / PROTO)])
    assert code == 0
    for name in ("retrieval_pb2.py", "retrieval_pb2.pyi", "retrieval_pb2_grpc.py"):
        fresh, checked_in = tmp_path / "retrieval/v1" / name, ROOT / "retrieval/v1" / name
        assert filecmp.cmp(fresh, checked_in, shallow=False), (
            f"{checked_in} is stale: run `make proto` and commit the result")


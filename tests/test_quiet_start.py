"""A quiet, fast start (issue 18, point 6): no CUDA, oneDNN or faiss loader lines unless
asked for (`two-tower -v`), and a data error reported before TensorFlow is imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.test_cli_bad_input import _csv_dataset, _edit_line

# what TensorFlow, CUDA, absl and faiss print while loading on a CPU machine
NOISE = ("cuInit", "oneDNN", "cuda_", "cpu_feature_guard", "faiss.loader",
         "ModuleNotFoundError", "Assets written to", "absl")


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`two-tower ARGS` in a fresh interpreter; its stdout's last line says whether
    TensorFlow was imported."""
    code = ("import sys; from app.cli import main; rc = main(sys.argv[1:]); "
            "print('tensorflow imported:', 'tensorflow' in sys.modules); sys.exit(rc)")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TF_CPP_MIN_LOG_LEVEL", "TWO_TOWER_VERBOSE")}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=600, env={**clean, **(env or {})})


def _noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(n in line for n in NOISE)]


@pytest.mark.parametrize("path", [[], ["--in-memory"]], ids=["default", "in-memory"])
def test_a_bad_cell_is_reported_before_tensorflow_is_imported(tmp_path, path):
    data = _csv_dataset(tmp_path)
    _edit_line(data / "users.csv", 3, lambda line: line.replace(line.split(",")[1], "old", 1))
    done = _cli(["train", "--data", str(data), "--out", str(tmp_path / "models"), *path])
    assert done.returncode == 2, done.stderr
    assert "users.csv:3: column 'age': expected a number (got 'old')" in done.stderr
    assert "tensorflow imported: False" in done.stdout  # so no 4 s of import first
    assert _noise(done.stderr) == []
    assert not (tmp_path / "models").exists()


def test_a_missing_interactions_table_is_reported_before_tensorflow_is_imported(tmp_path):
    data = _csv_dataset(tmp_path)
    (data / "interactions.csv").rename(data / "ratings.csv")
    done = _cli(["train", "--data", str(data), "--out", str(tmp_path / "models")])
    assert done.returncode == 2
    assert "interactions" in done.stderr and "ratings.csv" in done.stderr, done.stderr
    assert "tensorflow imported: False" in done.stdout


@pytest.mark.slow
def test_training_logs_no_loader_noise(tmp_path):
    data = _csv_dataset(tmp_path)
    done = _cli(["train", "--data", str(data), "--in-memory", "--no-eval", "--epochs", "1",
                 "--out", str(tmp_path / "models")])
    assert done.returncode == 0, done.stderr
    assert "tensorflow imported: True" in done.stdout
    assert _noise(done.stderr) == []
    assert "epoch 1/1" in done.stderr  # our own log is kept


@pytest.mark.slow
def test_indexing_logs_no_faiss_loader_lines_unless_verbose(pipeline, tmp_path):
    build = ["build-index", "--model", str(pipeline.model_dir), "--index", "Flat"]
    quiet = _cli([*build, "--out", str(tmp_path / "a")])
    assert quiet.returncode == 0, quiet.stderr
    assert _noise(quiet.stderr) == []
    assert "published" in quiet.stderr
    verbose = _cli(["-v", *build, "--out", str(tmp_path / "b")])
    by_env = _cli([*build, "--out", str(tmp_path / "c")], {"TWO_TOWER_VERBOSE": "1"})
    for done in (verbose, by_env):
        assert done.returncode == 0, done.stderr
        assert any("faiss.loader" in line for line in _noise(done.stderr)), done.stderr

"""The chaos benchmark's scenarios, short forms, on the session's pipeline: a soak at half
capacity (2 minutes here, as the fault issue asks; 30 min in `make chaos`), four bad publishes
under load, and a malformed CURRENT followed by a valid publish (the watcher)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks import chaos


@pytest.fixture
def artifacts(pipeline) -> chaos.Artifacts:
    return chaos.Artifacts(pipeline.data_dir, pipeline.model_dir, pipeline.index_dir.parent)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["bad_publish", "watcher", "soak"])
def test_the_scenario_passes_under_load(scenario, artifacts, tmp_path):
    row = getattr(chaos, scenario)(artifacts, tmp_path,
                                   SimpleNamespace(soak_seconds=120.0, outage_seconds=3.0))
    assert row.calls > 0 and not row.errors, row
    assert row.passed, row
    assert f"| {scenario} |" in chaos.markdown([row])

"""The recall gate and tuning: what reaches the target is published, what misses it is not."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.artifact import load_index_artifact
from indexer.auto import choose_spec
from indexer.build import IndexSpec
from indexer.exact import exact_search
from indexer.gate import RecallGateError
from indexer.gated_build import GateConfig, RecallQueries, build_and_gate
from indexer.job import JobOptions, run_build_index
from indexer.source import ArraySource
from indexer.tune import candidate_values, measure_recall, query_recalls, tuning_goal

GiB = 1 << 30


def _mixture(n, seed, d=32, clusters=100):
    """Gaussian mixture, unnormalised: inner-product neighbours spread over clusters."""
    centers = np.random.default_rng(0).normal(size=(clusters, d))
    rng = np.random.default_rng(seed)
    return (centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def mixture():
    return _mixture(20000, seed=1), RecallQueries(_mixture(300, 2), _mixture(300, 3), "mixture")


@pytest.mark.parametrize("factory", ["IVF128,Flat", "IVF128,SQ8", "HNSW16"])
def test_an_open_search_parameter_is_tuned_to_the_target_at_the_lowest_cost(mixture, factory):
    xb, queries = mixture
    gated = build_and_gate(ArraySource(xb), IndexSpec(factory, ef_construction=40), "dot",
                           queries, GateConfig(target_recall=0.9))
    assert gated.measurement.recall >= 0.9  # on the gate queries, not the tuning ones
    (param, value), = ((p, v) for p, v in gated.spec.search.items() if p != "k_factor")
    cheaper = [v for v in candidate_values(gated.index, gated.spec, 100) if v < value]
    if cheaper:  # one grid step cheaper misses the tuning goal (target + margin)
        _, truth = exact_search(ArraySource(xb), queries.tune, 100)
        spec = gated.spec.with_search(**{param: cheaper[-1]})
        recalls = query_recalls(gated.index, spec, queries.tune, truth)
        assert recalls.mean() < tuning_goal(0.9, recalls, len(queries.gate))


def test_a_fixed_search_parameter_is_kept_and_judged_as_given(mixture):
    xb, queries = mixture
    gated = build_and_gate(ArraySource(xb), IndexSpec("IVF128,Flat", search={"nprobe": 128}),
                           "dot", queries, GateConfig(target_recall=0.99))
    assert gated.spec.search == {"nprobe": 128} and gated.measurement.recall == 1.0
    assert gated.measurement.qps_single_thread > 0 and gated.measurement.p99_ms > 0


def test_a_configuration_below_the_target_fails_with_what_to_do(mixture):
    xb, queries = mixture
    with pytest.raises(RecallGateError) as failure:
        build_and_gate(ArraySource(xb), IndexSpec("IVF128,Flat", search={"nprobe": 1}), "dot",
                       queries, GateConfig(target_recall=0.95))
    message = str(failure.value)
    assert "recall gate failed: IVF128,Flat with {'nprobe': 1} reaches recall@100 0." in message
    assert "expected >= 0.95. Nothing was published. Raise nprobe" in message


def test_the_job_publishes_nothing_when_the_gate_fails(pipeline, tmp_path):
    store = tmp_path / "indexes"
    bad = IndexSpec("IVF16,Flat", search={"nprobe": 1})
    with pytest.raises(RecallGateError, match="Nothing was published"):
        run_build_index(pipeline.model_dir, store, bad)
    assert not store.exists() or sorted(p.name for p in store.iterdir()) == []


def test_the_job_fails_a_bad_build_and_the_current_version_stays(pipeline, tmp_path):
    store = tmp_path / "indexes"
    good = run_build_index(pipeline.model_dir, store)
    with pytest.raises(RecallGateError):
        run_build_index(pipeline.model_dir, store, IndexSpec("IVF16,Flat", search={"nprobe": 1}))
    assert load_index_artifact(store).path == good


def test_the_gate_runs_on_held_out_user_embeddings_when_a_dataset_is_given(pipeline, tmp_path):
    path = run_build_index(pipeline.model_dir, tmp_path / "indexes", IndexSpec("IVF8,Flat"),
                           JobOptions(data=pipeline.data_dir))
    measured = load_index_artifact(path).measured
    assert measured["query_source"] == "user_tower"
    assert measured["recall@100"] >= 0.95 and measured["queries"] >= 100
    assert 1 <= load_index_artifact(path).spec.search["nprobe"] <= 8


@pytest.mark.parametrize("num_items, budget, factory", [
    (5_000, 8 * GiB, "Flat"),
    (100_000, 8 * GiB, "IVF1024,Flat"),
    (1_000_000, 8 * GiB, "IVF4096,Flat"),
    (1_000_000, 100_000_000, "IVF4096,SQ8"),
    (10_000_000, 8 * GiB, "IVF16384,Flat"),
    (100_000_000, 8 * GiB, "IVF32768,PQ32"),
    (100_000_000, 4 * GiB, "IVF32768,PQ16"),
])
def test_auto_picks_the_index_by_item_count_and_memory_budget(num_items, budget, factory):
    spec = choose_spec(num_items, 64, budget)
    assert spec.factory == factory and spec.search == {}  # search parameters are tuned


def test_auto_refuses_a_budget_nothing_fits_in():
    with pytest.raises(ValueError, match="cannot hold 100000000 items .* shard the catalogue"):
        choose_spec(100_000_000, 64, 500_000_000)


def test_the_tuning_goal_widens_with_the_spread_of_the_queries_recalls():
    from indexer.tune import SAMPLE_SPREAD, TUNING_MARGIN, tuning_goal

    assert tuning_goal(0.95, np.full(500, 0.97), 1000) == pytest.approx(0.95 + TUNING_MARGIN)
    spread = np.array([0.8, 1.0] * 25)  # 50 queries, standard deviation 0.101
    want = 0.9 + SAMPLE_SPREAD * spread.std(ddof=1) * np.sqrt(1 / 50 + 1 / 1000)
    assert tuning_goal(0.9, spread, 1000) == pytest.approx(want) and want > 0.94
    assert tuning_goal(0.99, spread, 1000) == 1.0  # capped
    assert tuning_goal(0.9, spread, 0) == pytest.approx(0.9 + TUNING_MARGIN)  # no gate


def test_a_tuned_setting_passes_the_gate_on_other_queries_far_more_often(mixture):
    """Forty random splits of 1,050 queries into 50 to tune on and 1,000 for the gate: tuned
    only a fixed margin above the target, the setting misses it on the gate's queries in
    several; tuned to the goal the spread of the recalls asks for, in one at most."""
    from indexer.build import build_index
    from indexer.tune import tune

    xb, _ = mixture
    queries = _mixture(3000, seed=5)
    spec = IndexSpec("IVF128,Flat")
    index = build_index(xb, spec, "dot")
    _, truth = exact_search(ArraySource(xb), queries, 100)
    nprobe8 = spec.with_search(nprobe=8)  # each query's recall averages to Faiss's measure
    assert query_recalls(index, nprobe8, queries, truth).mean() == pytest.approx(
        measure_recall(index, nprobe8, queries, truth))
    misses = {"fixed margin": 0, "spread": 0}
    for seed in range(40):
        order = np.random.default_rng(seed).permutation(len(queries))
        tuning, gate = order[:50], order[50:1050]
        for way, gate_queries in (("fixed margin", 0), ("spread", len(gate))):
            tuned = tune(index, spec, queries[tuning], truth[tuning], 0.9,
                         gate_queries=gate_queries)
            misses[way] += measure_recall(index, tuned.spec, queries[gate], truth[gate]) < 0.9
    assert misses["fixed margin"] >= 5 and misses["spread"] <= 1, misses

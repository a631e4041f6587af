"""Missing values, as a user's tables have them (empty cells, nulls, NaN) and as requests
send them (a feature left out, sent without a value, "" or NaN): read, trained on, and
served identically — the NumPy user tower equals the SavedModel to 1e-5 on them, and a
real server answers a request with missing features as the offline towers rank it."""

from __future__ import annotations

import tomllib

import grpc
import numpy as np
import pytest

from contracts.dataset import load_dataset
from contracts.errors import DataError, FeatureSpecError
from contracts.feature_spec import parse_feature_spec
from contracts.inputs import PAD, UserRequest, training_examples, user_inputs
from contracts.prepared import spec_fingerprint
from tests.missing_data import gappy_dataset, write_gappy
from tests.tower_parity import Exported, assert_towers_agree, training_inputs
from training.synthetic import SPEC_TOML

WHEN = 1_700_611_200


@pytest.fixture(scope="module")
def gappy():
    return gappy_dataset()


@pytest.mark.parametrize("form", ["csv", "parquet-nulls", "parquet-nan"])
def test_gaps_read_as_missing_values_in_every_form(gappy, tmp_path, form):
    dataset, spec_toml = gappy
    loaded = load_dataset(write_gappy(dataset, spec_toml, tmp_path / form, form))
    assert np.isnan(loaded.users["age"][::3]).all() and np.isfinite(loaded.users["age"][1::3]).all()
    assert set(loaded.users["country"][::4]) == {PAD}
    assert set(loaded.users["languages"][::5]) == {()}
    assert set(loaded.interactions["device"][::6]) == {PAD}
    assert np.isnan(loaded.interactions["battery"][::4]).all()
    assert set(loaded.items["category"][::7]) == {PAD}
    for table in ("interactions", "users", "items"):
        for column, values in getattr(dataset, table).items():
            got = getattr(loaded, table)[column]
            if values.dtype.kind == "f":
                np.testing.assert_array_equal(got, values, err_msg=column)
            else:
                assert got.tolist() == values.tolist(), (table, column)


@pytest.mark.parametrize(("table", "column", "line"), [
    ("interactions.csv", "user_id", 5), ("interactions.csv", "item_id", 3),
    ("interactions.csv", "timestamp", 9), ("items.csv", "item_id", 4)])
def test_ids_and_timestamps_may_not_be_missing(gappy, tmp_path, table, column, line):
    dataset, spec_toml = gappy
    data = write_gappy(dataset, spec_toml, tmp_path / "d", "csv")
    _blank(data / table, line, column)
    with pytest.raises(DataError) as caught:
        load_dataset(data)
    assert (caught.value.line, caught.value.column) == (line, column)


def test_a_numeric_that_is_text_or_infinite_is_still_an_error(gappy, tmp_path):
    dataset, spec_toml = gappy
    data = write_gappy(dataset, spec_toml, tmp_path / "d", "csv")
    _set(data / "users.csv", 3, "age", "inf")
    with pytest.raises(DataError, match=r"users.csv:3: column 'age': expected a finite "
                                        r"number \(got 'inf'\); leave the cell empty"):
        load_dataset(data)


def test_missing_indicator_is_a_validated_numeric_option():
    spec = parse_feature_spec(tomllib.loads(gappy_dataset()[1]), "spec.toml")
    assert spec.feature("age").missing_indicator and not spec.feature("country").missing_indicator
    for bad, message in (('kind = "categorical"\nmissing_indicator = true',
                          "only numeric features take a missing indicator"),
                         ('kind = "numeric"\nmissing_indicator = "yes"',
                          "must be true or false")):
        text = SPEC_TOML.replace('[features.country]\ntower = "user"\nkind = "categorical"',
                                 f'[features.country]\ntower = "user"\n{bad}')
        with pytest.raises(FeatureSpecError, match=message) as caught:
            parse_feature_spec(tomllib.loads(text), "spec.toml")
        assert caught.value.key == "features.country.missing_indicator"


def test_specs_without_the_new_options_keep_their_fingerprint():
    """Prepared shards and models made before the options still match their spec."""
    spec = parse_feature_spec(tomllib.loads(SPEC_TOML), "spec.toml")
    doc = spec.to_dict()
    assert "timestamp_unit" not in doc["columns"]
    assert all("missing_indicator" not in f for f in doc["features"].values())
    assert parse_feature_spec(doc) == spec and spec_fingerprint(parse_feature_spec(doc)) == \
        spec_fingerprint(spec)


# --- trained on gaps, served with gaps ----------------------------------------------------


@pytest.fixture(scope="module")
def exported(gappy, tmp_path_factory) -> Exported:
    from contracts.model_manifest import load_model_manifest
    from retrieval.numpy_tower import NumpyUserTower
    from training.artifact import export_model
    from training.model import TowerConfig
    from training.saved_model_tower import SavedModelUserTower
    from training.train import TrainConfig, train

    dataset, spec_toml = gappy
    data = write_gappy(dataset, spec_toml, tmp_path_factory.mktemp("gappy") / "data", "csv")
    trained = train(load_dataset(data), TrainConfig(epochs=2, tower=TowerConfig(
        embedding_dim=16, hidden_dims=(32,))))
    model_dir = export_model(trained, tmp_path_factory.mktemp("models"), {})
    return Exported(trained, model_dir, SavedModelUserTower(load_model_manifest(model_dir)),
                    NumpyUserTower.load(model_dir))


@pytest.mark.slow
def test_a_table_with_gaps_trains_and_the_towers_agree_on_its_rows(exported):
    assert np.isfinite(exported.trained.history["loss"]).all()
    inputs = training_inputs(exported, 300)
    assert np.isnan(inputs["age"]).any() and (inputs["country"] == PAD).any()
    assert (inputs["device"] == PAD).any() and np.isnan(inputs["battery"]).any()
    assert (inputs["languages"] == PAD).all(axis=1).any()
    assert_towers_agree(exported, inputs)


@pytest.mark.slow
def test_missing_values_at_serving_embed_as_in_training(exported):
    """A request whose features are missing gets the embedding of a training row whose
    features are missing, in both towers; one feature at a time and all at once."""
    spec = exported.spec
    rows = training_inputs(exported, 10_000)
    row = int(np.flatnonzero(np.isnan(rows["age"]) & (rows["country"] == PAD)
                             & (rows["languages"] == PAD).all(axis=1)
                             & (rows["device"] == PAD) & np.isnan(rows["battery"]))[0])
    user = str(rows["user_id"][row])
    history = tuple(h for h in rows["recent_items"][row] if h)
    hour, day = int(rows["hour_of_day"][row]), int(rows["day_of_week"][row])
    when = WHEN + 3600 * ((hour - WHEN // 3600 % 24) % 24) + 86400 * ((day - 2) % 7)
    sent_missing = [({}, {}), ({"age": None, "country": None, "languages": None},
                               {"device": None, "battery": None}),
                    ({"country": ""}, {"device": "", "battery": float("nan")})]
    requests = [UserRequest(user, features, history, context, when)
                for features, context in sent_missing]
    served = user_inputs(spec, requests)
    assert served["hour_of_day"][0] == str(hour) and served["day_of_week"][0] == str(day)
    expected = exported.saved_model({k: v[row:row + 1] for k, v in rows.items()})
    for i in range(len(requests)):
        np.testing.assert_allclose(exported.numpy_tower({k: v[i:i + 1] for k, v in
                                                         served.items()}), expected,
                                   atol=1e-5, rtol=0)
    assert_towers_agree(exported, served)


@pytest.mark.slow
def test_each_kind_missing_alone_agrees_and_missing_is_not_unseen(exported):
    inputs = training_inputs(exported, 60)
    full = ~np.isnan(inputs["age"]) & (inputs["country"] != PAD) & (inputs["device"] != PAD)
    inputs = {k: v[full] for k, v in inputs.items()}
    for name, missing in (("age", np.nan), ("battery", np.nan), ("country", PAD),
                          ("device", PAD)):
        gap = {**inputs, name: np.full_like(inputs[name], missing)}
        assert_towers_agree(exported, gap)
    gap = {**inputs, "languages": np.full_like(inputs["languages"], PAD)}
    assert_towers_agree(exported, gap)
    # categorical: the missing row is not the OOV row an unseen value reads
    missing = exported.numpy_tower({**inputs, "country": np.full_like(inputs["country"], PAD)})
    unseen = exported.numpy_tower({**inputs, "country": np.full_like(inputs["country"], "xx")})
    assert np.abs(missing - unseen).max() > 1e-3
    # numeric with an indicator: missing is not the same as a value at the training mean
    mean = np.float32(exported.trained.stats.means["age"])
    at_mean = exported.numpy_tower({**inputs, "age": np.full_like(inputs["age"], mean)})
    nan = exported.numpy_tower({**inputs, "age": np.full_like(inputs["age"], np.nan)})
    assert np.abs(at_mean - nan).max() > 1e-3


def test_the_exported_graph_says_which_features_have_a_missing_row(exported):
    import json

    graph = json.loads((exported.model_dir / "user_tower_numpy.json").read_text())
    entries = {e["name"]: e for e in graph["features"]}
    assert {n for n, e in entries.items() if e.get("missing_row")} == {"country", "device"}
    assert {n for n, e in entries.items() if e.get("missing_indicator")} == {"age", "battery"}


# --- over real gRPC -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(gappy, exported, tmp_path_factory):
    from indexer.build import IndexSpec
    from indexer.gated_build import GateConfig
    from indexer.job import JobOptions, run_build_index
    from tests.conftest import start_server, stop_server

    dataset, spec_toml = gappy
    data = write_gappy(dataset, spec_toml, tmp_path_factory.mktemp("served") / "data",
                       "parquet-nulls")
    index_dir = run_build_index(exported.model_dir, tmp_path_factory.mktemp("indexes"),
                                IndexSpec("Flat"),
                                JobOptions(items=data, gate=GateConfig(target_recall=1.0)))
    running = start_server(["--model", str(exported.model_dir), "--index", str(index_dir),
                            "--features", str(data)], tmp_path_factory.mktemp("server"))
    yield running, data
    stop_server(running)


@pytest.mark.slow
def test_a_served_request_with_missing_features_ranks_as_the_offline_towers(exported, served):
    from contracts.model_manifest import load_item_embeddings, load_model_manifest
    from retrieval.client import context_value
    from retrieval.feature_store import users_from_dataset
    from retrieval.v1 import retrieval_pb2 as pb
    from retrieval.v1 import retrieval_pb2_grpc as pb_grpc

    running, data = served
    stored = users_from_dataset(load_dataset(data))
    user = "u0"  # every 3rd/4th/5th user from 0: age, country and languages are missing
    assert stored[user].features == {"languages": ()}  # an empty bag: no languages
    item_emb, item_ids = load_item_embeddings(load_model_manifest(exported.model_dir))
    request = UserRequest(user, stored[user].features, stored[user].history, {}, WHEN)
    scores = item_emb @ exported.numpy_tower(user_inputs(exported.spec, [request]))[0]
    want = [str(item_ids[i]) for i in np.argsort(-scores, kind="stable")[:10]]
    contexts = [{}, {"device": pb.ContextValue(), "battery": pb.ContextValue()},
                {"device": context_value(""), "battery": context_value(float("nan"))}]
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        replies = [stub.Retrieve(pb.RetrieveRequest(user_id=user, k=10, context=context,
                                                    event_time_unix_seconds=WHEN), timeout=10)
                   for context in contexts]
        with pytest.raises(grpc.RpcError) as caught:
            stub.Retrieve(pb.RetrieveRequest(user_id=user, k=10, context={
                "battery": context_value("full")}, event_time_unix_seconds=WHEN), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "battery" in caught.value.details()
    for reply in replies:
        got = [c.item_id for c in reply.candidates]
        assert got == want
        np.testing.assert_allclose([c.score for c in reply.candidates],
                                   np.sort(scores)[::-1][:10], atol=1e-5)


def _blank(path, line: int, column: str) -> None:
    _set(path, line, column, "")


def _set(path, line: int, column: str, value: str) -> None:
    import csv
    import io

    rows = list(csv.reader(io.StringIO(path.read_text())))
    rows[line - 1][rows[0].index(column)] = value
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    path.write_text(out.getvalue())


def test_training_examples_of_a_user_absent_from_the_users_table_are_missing(gappy):
    dataset, _ = gappy
    keep = dataset.users["user_id"] != "u1"
    users = {k: v[keep] for k, v in dataset.users.items()}
    import dataclasses

    examples = training_examples(dataclasses.replace(dataset, users=users))
    rows = dataset.interactions["user_id"] == "u1"
    assert np.isnan(examples["age"][rows]).all() and set(examples["country"][rows]) == {PAD}
    assert (examples["languages"][rows] == PAD).all()


def test_a_format_2_tower_still_reads_a_missing_value_as_unseen(exported):
    """Models exported before the missing row was trained with "" as an unknown id: their
    NumPy tower still sends it to the OOV row, as their SavedModel does."""
    import json

    from retrieval.numpy_tower import NumpyUserTower, _read

    graph, arrays = _read(exported.model_dir)
    graph = json.loads(json.dumps(graph).replace("/3", "/2"))
    for entry in graph["features"]:
        if entry.pop("missing_row", False):
            arrays[entry["embedding"]] = arrays[entry["embedding"]][:-1]
    old = NumpyUserTower(graph, arrays)
    inputs = training_inputs(exported, 20)
    unseen = old({**inputs, "country": np.full_like(inputs["country"], "xx")})
    missing = old({**inputs, "country": np.full_like(inputs["country"], PAD)})
    np.testing.assert_array_equal(missing, unseen)

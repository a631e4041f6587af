"""The Spark preparation job against the in-memory path it replaces at scale.

One SparkSession (module scope) and one prepared tiny dataset serve most tests: the
examples, hold-out, vocabularies, statistics, item counts and users/ must equal what
contracts.inputs.training_examples + training.protocols.temporal_leave_one_out +
training.model.compute_feature_stats and retrieval.feature_store.users_from_dataset build.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.dataset import load_dataset, write_dataset
from contracts.errors import ArtifactError, ConfigError, DataError
from contracts.feature_spec import FeatureSpec
from contracts.inputs import training_examples
from contracts.prepared import SEEN_ITEMS, check_spec, load_prepared, spec_fingerprint
from tests.conftest import TINY

pytest.importorskip("pyspark")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
ROWS_PER_SHARD = 1000


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    from preparation.config import PrepareConfig
    from preparation.session import spark_session

    work = tmp_path_factory.mktemp("spark")
    with spark_session(PrepareConfig(master="local[2]"), work, 4) as session:
        yield session


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from training.synthetic import SyntheticConfig, generate_synthetic

    dataset, spec_toml = generate_synthetic(SyntheticConfig(**TINY))
    return write_dataset(dataset, tmp_path_factory.mktemp("data") / "tiny", spec_toml)


def _prepare(spark, data: Path, out: Path, **config) -> Path:
    from preparation import PrepareConfig, prepare

    return prepare(data, out, PrepareConfig(rows_per_shard=ROWS_PER_SHARD, **config), spark)


@pytest.fixture(scope="module")
def prepared(spark, tiny, tmp_path_factory) -> Path:
    return _prepare(spark, tiny, tmp_path_factory.mktemp("prepared") / "out")


def _in_memory(data: Path):
    from training.protocols import temporal_leave_one_out

    ds = load_dataset(data)
    examples = training_examples(ds)
    examples[ds.spec.columns.timestamp] = ds.interactions[ds.spec.columns.timestamp]
    return ds, examples, temporal_leave_one_out(ds)


def _read_split(prepared: Path, split: str, spec: FeatureSpec) -> dict[str, np.ndarray]:
    """A prepared split in the in-memory path's layout (sequences padded with "")."""
    manifest = load_prepared(prepared)
    tables = [pq.read_table(s.path) for s in manifest.splits[split].shards]
    table = pa.concat_tables(tables)
    out = {}
    for f in spec.features:
        values = table.column(f.name).to_pylist()
        if f.is_sequence:
            assert all(len(v) <= f.max_length for v in values)  # not padded, bounded
            arr = np.full((len(values), f.max_length), "", dtype=object)
            for i, v in enumerate(values):
                arr[i, :len(v)] = v
            out[f.name] = arr
        elif f.kind == "numeric":
            out[f.name] = np.asarray(values, np.float32)
        else:
            out[f.name] = np.asarray(values, dtype=object)
    out[spec.columns.timestamp] = np.asarray(table.column(spec.columns.timestamp))
    if split != "train":
        out[SEEN_ITEMS] = np.array([tuple(v) for v in table.column(SEEN_ITEMS).to_pylist()]
                                   + [None], dtype=object)[:-1]
    return out


def _sorted(examples: dict[str, np.ndarray], spec: FeatureSpec) -> dict[str, np.ndarray]:
    cols = spec.columns
    order = np.lexsort((examples[cols.item_id].astype(str), examples[cols.timestamp],
                        examples[cols.user_id].astype(str)))
    return {k: v[order] for k, v in examples.items()}


def _assert_same_examples(prepared: Path, data: Path) -> None:
    ds, examples, split = _in_memory(data)
    spec = ds.spec
    for name in ("train", "valid", "test"):
        rows = getattr(split, name)
        want = _sorted({k: v[rows] for k, v in examples.items()}, spec)
        got = _sorted(_read_split(prepared, name, spec), spec)
        assert len(got[spec.columns.user_id]) == len(rows), name
        for key, values in want.items():
            if values.dtype.kind == "f":
                np.testing.assert_array_equal(got[key], values, err_msg=f"{name}.{key}")
            else:
                assert (got[key] == values).all(), f"{name}.{key} differs"


def test_examples_and_holdout_are_exactly_the_in_memory_paths(prepared, tiny):
    _assert_same_examples(prepared, tiny)


def test_holdout_rows_carry_every_earlier_item_of_the_user(prepared, tiny):
    ds, _, split = _in_memory(tiny)
    cols = ds.spec.columns
    for name, masked in (("valid", split.train),
                         ("test", np.concatenate([split.train, split.valid]))):
        got = _read_split(prepared, name, ds.spec)
        users = ds.interactions[cols.user_id][masked].astype(str)
        items = ds.interactions[cols.item_id][masked].astype(str)
        for user, seen in zip(got[cols.user_id], got[SEEN_ITEMS], strict=True):
            assert sorted(seen) == sorted(items[users == user].tolist())


def test_vocabularies_statistics_and_item_counts_equal_compute_feature_stats(prepared, tiny):
    from training.model import compute_feature_stats

    ds, examples, split = _in_memory(tiny)
    stats = compute_feature_stats(ds.spec, {k: v[split.train] for k, v in examples.items()},
                                  ds.items)
    manifest = load_prepared(prepared)
    assert set(manifest.vocabularies) == set(stats.vocabularies)
    for name, vocab in stats.vocabularies.items():
        assert manifest.vocabulary(name) == list(vocab), name
        assert manifest.vocabulary_sizes[name] == len(vocab)
    assert set(manifest.statistics) == set(stats.means) == {"age"}
    for name, mean in stats.means.items():
        assert manifest.statistics[name]["mean"] == pytest.approx(mean, rel=1e-5)
        assert manifest.statistics[name]["variance"] == pytest.approx(stats.variances[name],
                                                                      rel=1e-4)
    counts = pq.read_table(manifest.item_counts).to_pydict()
    ids, n = np.unique(examples[ds.spec.columns.item_id][split.train].astype(str),
                       return_counts=True)
    assert dict(zip(counts["item_id"], counts["count"], strict=True)) == \
        dict(zip(ids.tolist(), n.tolist(), strict=True))
    assert manifest.item_count_examples == len(split.train)


def test_shards_are_bounded_even_in_number_and_sum_to_the_split(prepared, tiny):
    _, _, split = _in_memory(tiny)
    manifest = load_prepared(prepared)
    for name in ("train", "valid", "test"):
        s = manifest.splits[name]
        assert len(s.shards) % 2 == 0 and len(s.shards) >= 2
        rows = [pq.ParquetFile(x.path).metadata.num_rows for x in s.shards]
        assert rows == [x.rows for x in s.shards]
        assert max(rows) <= ROWS_PER_SHARD and max(rows) - min(rows) <= 1
        assert sum(rows) == s.rows == len(getattr(split, name))
    assert len(manifest.splits["train"].shards) == 4  # 3900 rows, 1000 a shard
    assert manifest.source["num_interactions"] == TINY["num_users"] * \
        TINY["interactions_per_user"]


def test_training_shards_are_shuffled_by_the_seed(prepared):
    manifest = load_prepared(prepared)
    users = pq.read_table(manifest.splits["train"].shards[0].path).column("user_id")
    users = users.to_pylist()
    assert users != sorted(users)  # not in the window's per-user order
    assert len(set(users[:50])) > 25


def test_users_output_is_what_load_features_stores(prepared, tiny):
    from retrieval.feature_store import users_from_dataset

    want = users_from_dataset(load_dataset(tiny), history_length=20)
    manifest = load_prepared(prepared)
    table = pa.concat_tables([pq.read_table(p) for p in sorted(manifest.users.glob("*"))])
    got = {r["user_id"]: r for r in table.to_pylist()}
    assert manifest.users_rows == len(got) == len(want)
    for user, stored in want.items():
        assert tuple(got[user]["history"]) == stored.history, user
        assert got[user]["country"] == stored.features["country"]
        assert got[user]["age"] == pytest.approx(stored.features["age"])


def test_a_directory_of_parquet_files_by_date_gives_the_same_examples(spark, tiny, tmp_path):
    data = _copy_tables(tiny, tmp_path / "by_date")
    inter = pq.read_table(tiny / "interactions.parquet")
    days = [dt.datetime.fromtimestamp(t, dt.UTC).date().isoformat()
            for t in inter.column("timestamp").to_pylist()]
    for day in sorted(set(days)):
        rows = [i for i, d in enumerate(days) if d == day]
        (data / "interactions" / f"date={day}").mkdir(parents=True)
        pq.write_table(inter.take(rows), data / "interactions" / f"date={day}" / "part-0.parquet")
    assert len(set(days)) > 10
    out = _prepare(spark, data, tmp_path / "out")
    _assert_same_examples(out, tiny)
    assert len(load_prepared(out).source["interactions"]) == len(set(days))


def test_csv_dataset_gives_the_same_examples(spark, tiny, tmp_path):
    ds = load_dataset(tiny)
    spec_toml = (tiny / "features.toml").read_text()
    data = write_dataset(ds, tmp_path / "csv", spec_toml, fmt="csv")
    out = _prepare(spark, data, tmp_path / "out")
    _assert_same_examples(out, tiny)


def test_a_malformed_row_in_the_third_of_four_files_names_it_and_publishes_nothing(
        spark, tiny, tmp_path):
    data = _copy_tables(tiny, tmp_path / "parts")
    inter = pq.read_table(tiny / "interactions.parquet")
    (data / "interactions").mkdir()
    quarter = -(-inter.num_rows // 4)
    for k in range(4):
        part = inter.slice(k * quarter, quarter)
        if k == 2:
            users = part.column("user_id").to_pylist()
            users[7] = ""
            part = part.set_column(0, "user_id", pa.array(users, pa.string()))
        pq.write_table(part, data / "interactions" / f"part-{k}.parquet")
    out = tmp_path / "out"
    with pytest.raises(DataError) as caught:
        _prepare(spark, data, out)
    err = caught.value
    assert err.path == str(data / "interactions" / "part-2.parquet")
    assert err.column == "user_id" and "row 7:" in str(err)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["parts"]  # no staging left


def test_a_malformed_csv_row_names_its_line(spark, tiny, tmp_path):
    ds = load_dataset(tiny)
    data = write_dataset(ds, tmp_path / "csv", (tiny / "features.toml").read_text(), "csv")
    lines = (data / "interactions.csv").read_text().splitlines()
    fields = lines[41].split(",")
    fields[2] = "yesterday"  # timestamp
    lines[41] = ",".join(fields)
    (data / "interactions.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        _prepare(spark, data, tmp_path / "out")
    assert (caught.value.line, caught.value.column) == (42, "timestamp")
    assert "'yesterday'" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused(spark, tiny, prepared):
    before = (prepared / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        _prepare(spark, tiny, prepared)
    assert (prepared / "manifest.json").read_bytes() == before


def test_the_manifest_round_trips_and_a_changed_spec_is_refused(prepared, tiny):
    manifest = load_prepared(prepared)
    spec = load_dataset(tiny).spec
    assert manifest.spec == spec and manifest.spec_fingerprint == spec_fingerprint(spec)
    check_spec(manifest, spec)
    feature = dataclasses.replace(spec.feature("country"), embedding_dim=9)
    changed = FeatureSpec(spec.columns, tuple(feature if f.name == "country" else f
                                              for f in spec.features))
    with pytest.raises(ArtifactError) as caught:
        check_spec(manifest, changed)
    message = str(caught.value)
    assert "does not match the prepared shards' fingerprint" in message
    assert "country" in message and "two-tower prepare" in message


def test_a_missing_or_corrupt_manifest_is_refused_naming_it(prepared, tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        load_prepared(tmp_path)
    doc = json.loads((prepared / "manifest.json").read_text())
    del doc["splits"]
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=r"manifest.json: malformed manifest: .*splits"):
        load_prepared(tmp_path)


def test_contracts_imports_with_pyspark_blocked():
    code = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'pyspark':
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import contracts
for info in pkgutil.walk_packages(contracts.__path__, 'contracts.'):
    importlib.import_module(info.name)
print('ok')
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def _copy_tables(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("features.toml", "users.parquet", "items.parquet"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


# --- missing values, time units, a missing table -----------------------------------------


@pytest.fixture(scope="module")
def gappy_data(tmp_path_factory):
    from tests.missing_data import gappy_dataset, write_gappy

    dataset, spec_toml = gappy_dataset()
    root = tmp_path_factory.mktemp("gappy")
    return {form: write_gappy(dataset, spec_toml, root / form, form)
            for form in ("csv", "parquet-nulls", "parquet-nan")}


@pytest.mark.parametrize("form", ["csv", "parquet-nulls", "parquet-nan"])
def test_tables_with_gaps_prepare_exactly_as_the_in_memory_path(spark, gappy_data, form,
                                                                 tmp_path):
    from retrieval.feature_store import users_from_dataset
    from training.model import compute_feature_stats

    data = gappy_data[form]
    out = _prepare(spark, data, tmp_path / "out")
    _assert_same_examples(out, data)
    ds, examples, split = _in_memory(data)
    stats = compute_feature_stats(ds.spec, {k: v[split.train] for k, v in examples.items()},
                                  ds.items)
    manifest = load_prepared(out)
    for name, vocab in stats.vocabularies.items():
        assert manifest.vocabulary(name) == list(vocab), name
    assert "" not in manifest.vocabulary("category")
    for name in ("age", "battery"):
        assert manifest.statistics[name]["mean"] == pytest.approx(stats.means[name], rel=1e-5)
        assert manifest.statistics[name]["count"] == \
            np.isfinite(examples[name][split.train]).sum()
    want = users_from_dataset(ds, history_length=20)
    table = pa.concat_tables([pq.read_table(p) for p in sorted(manifest.users.glob("*"))])
    got = {r["user_id"]: r for r in table.to_pylist()}
    assert len(got) == len(want)
    for user, stored in want.items():
        row = got[user]
        present = {n: v for n, v in row.items() if n not in ("user_id", "history")
                   and v is not None and not (isinstance(v, float) and np.isnan(v))}
        present = {n: tuple(v) if isinstance(v, list) else v for n, v in present.items()}
        assert present.keys() == stored.features.keys(), user
        for name, value in present.items():
            want_value = stored.features[name]
            assert value == (pytest.approx(want_value) if isinstance(value, float)
                             else want_value), (user, name)


def _times(data: Path, values: pa.Array) -> None:
    path = data / "interactions.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.column_names.index("timestamp"), "timestamp",
                                    values), path)


def _copy_all(source: Path, target: Path, unit: str | None = None) -> Path:
    _copy_tables(source, target)
    (target / "interactions.parquet").write_bytes((source / "interactions.parquet").read_bytes())
    if unit:
        spec = (source / "features.toml").read_text().replace(
            'timestamp = "timestamp"\n', f'timestamp = "timestamp"\ntimestamp_unit = "{unit}"\n', 1)
        (target / "features.toml").write_text(spec)
    return target


def test_milliseconds_iso_text_and_parquet_timestamps_prepare_as_seconds(spark, tiny, tmp_path):
    seconds = pq.read_table(tiny / "interactions.parquet").column("timestamp").to_numpy()
    ms = _copy_all(tiny, tmp_path / "ms", unit="ms")
    _times(ms, pa.array(seconds * 1000 + 999))
    iso = _copy_all(tiny, tmp_path / "iso")
    forms = ["%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S.5+00:00"]
    _times(iso, pa.array([dt.datetime.fromtimestamp(int(t), dt.UTC).strftime(forms[i % 3])
                          for i, t in enumerate(seconds)]))
    typed = _copy_all(tiny, tmp_path / "typed")
    _times(typed, pa.array(seconds * 1000 + 1).cast(pa.timestamp("ms", tz="UTC")))
    for data in (ms, iso, typed):
        _assert_same_examples(_prepare(spark, data, tmp_path / f"out-{data.name}"), tiny)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_milliseconds_read_as_seconds_are_refused_as_in_memory(spark, tiny, tmp_path, fmt):
    ds = load_dataset(tiny)
    seconds = ds.interactions["timestamp"]
    ds.interactions["timestamp"] = seconds * 1000
    data = write_dataset(ds, tmp_path / "d", (tiny / "features.toml").read_text(), fmt)
    ds.interactions["timestamp"] = seconds
    with pytest.raises(DataError) as in_memory:
        load_dataset(data)
    with pytest.raises(DataError) as prepared:
        _prepare(spark, data, tmp_path / "out")
    assert str(prepared.value) == str(in_memory.value)
    assert 'set timestamp_unit = "ms" under [columns]' in str(prepared.value)
    assert not (tmp_path / "out").exists()


def test_a_missing_interactions_table_names_what_was_looked_for(spark, tiny, tmp_path):
    data = _copy_tables(tiny, tmp_path / "d")
    (data / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(DataError) as caught:
        _prepare(spark, data, tmp_path / "out")
    message = str(caught.value)
    assert "missing table 'interactions': looked for interactions.parquet, interactions.csv " \
           "or a directory interactions/" in message
    assert "the directory holds features.toml, items.parquet, ratings.csv, users.parquet" \
        in message

"""Event times as users' tables hold them: seconds, milliseconds, microseconds, ISO-8601
text, Parquet timestamps; implausible ones refused with the fix; and a missing table named
with what was looked for and what is there."""

from __future__ import annotations

import datetime as dt
import tomllib

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from contracts.dataset import load_dataset, write_dataset
from contracts.errors import DataError, FeatureSpecError
from contracts.feature_spec import parse_feature_spec
from training.synthetic import SPEC_TOML, SyntheticConfig, generate_synthetic

SMALL = SyntheticConfig(num_users=30, num_items=40, num_clusters=3, interactions_per_user=5)


@pytest.fixture(scope="module")
def small():
    return generate_synthetic(SMALL)


def _with_times(data, values: pa.Array, fmt: str) -> None:
    """Replace the interactions' timestamp column (written by write_dataset in ``fmt``)."""
    path = data / f"interactions.{fmt}"
    table = pq.read_table(path) if fmt == "parquet" else pacsv.read_csv(path)
    table = table.set_column(table.column_names.index("timestamp"), "timestamp", values)
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path)


def _unit_spec(spec_toml: str, unit: str) -> str:
    return spec_toml.replace('timestamp = "timestamp"\n',
                             f'timestamp = "timestamp"\ntimestamp_unit = "{unit}"\n', 1)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_milliseconds_read_as_seconds_are_refused_with_the_fix(small, tmp_path, fmt):
    dataset, spec_toml = small
    data = write_dataset(dataset, tmp_path, spec_toml, fmt)
    seconds = dataset.interactions["timestamp"]
    _with_times(data, pa.array(seconds * 1000 + 123), fmt)
    with pytest.raises(DataError) as caught:
        load_dataset(data)
    err = str(caught.value)
    assert caught.value.column == "timestamp" and f"interactions.{fmt}" in err
    assert (":2:" if fmt == "csv" else "row 0:") in err
    assert f"implausible timestamp {seconds[0] * 1000 + 123}" in err
    assert 'it looks like ms: set timestamp_unit = "ms" under [columns] in features.toml' in err


@pytest.mark.parametrize(("unit", "factor"), [("ms", 1000), ("us", 1_000_000)])
def test_timestamp_unit_reads_finer_units_as_the_same_seconds(small, tmp_path, unit, factor):
    dataset, spec_toml = small
    data = write_dataset(dataset, tmp_path, _unit_spec(spec_toml, unit), "parquet")
    seconds = dataset.interactions["timestamp"]
    _with_times(data, pa.array(seconds * factor + factor - 1), "parquet")  # floored
    loaded = load_dataset(data)
    assert loaded.spec.columns.timestamp_unit == unit
    np.testing.assert_array_equal(loaded.interactions["timestamp"], seconds)


def test_a_timestamp_before_1970_is_refused(small, tmp_path):
    dataset, spec_toml = small
    data = write_dataset(dataset, tmp_path, spec_toml, "csv")
    _with_times(data, pa.array(np.r_[-5, dataset.interactions["timestamp"][1:]]), "csv")
    with pytest.raises(DataError, match=r"interactions.csv:2: column 'timestamp': implausible "
                                        r"timestamp -5: .*before 1970"):
        load_dataset(data)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_iso_8601_text_is_read_in_utc(small, tmp_path, fmt):
    dataset, spec_toml = small
    data = write_dataset(dataset, tmp_path, spec_toml, fmt)
    seconds = dataset.interactions["timestamp"]
    forms = ["%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S.250000+00:00"]
    text = [dt.datetime.fromtimestamp(int(t), dt.UTC).strftime(forms[i % 3])
            for i, t in enumerate(seconds)]
    text[3] = dt.datetime.fromtimestamp(int(seconds[3]) + 7200, dt.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S+02:00")  # two hours ahead of UTC: the same instant
    _with_times(data, pa.array(text), fmt)
    np.testing.assert_array_equal(load_dataset(data).interactions["timestamp"], seconds)


@pytest.mark.parametrize("zone", ["UTC", None])
def test_a_parquet_timestamp_column_is_read_as_its_instant(small, tmp_path, zone):
    dataset, spec_toml = small
    data = write_dataset(dataset, tmp_path, spec_toml, "parquet")
    seconds = dataset.interactions["timestamp"]
    millis = pa.array(seconds * 1000 + 999).cast(pa.timestamp("ms", tz=zone))
    _with_times(data, millis, "parquet")
    np.testing.assert_array_equal(load_dataset(data).interactions["timestamp"], seconds)


def test_text_that_is_no_time_names_the_unit_and_iso(small, tmp_path):
    dataset, spec_toml = small
    data = write_dataset(dataset, tmp_path, _unit_spec(spec_toml, "ms"), "csv")
    text = dataset.interactions["timestamp"].astype(str).astype(object)
    text[4] = "01/02/2024"
    _with_times(data, pa.array(text.tolist()), "csv")
    with pytest.raises(DataError, match=r"interactions.csv:6: column 'timestamp': timestamp "
                                        r"must be milliseconds since the epoch .* or ISO-8601"):
        load_dataset(data)


def test_timestamp_unit_is_validated():
    text = SPEC_TOML.replace('timestamp = "timestamp"\n',
                             'timestamp = "timestamp"\ntimestamp_unit = "minutes"\n')
    with pytest.raises(FeatureSpecError, match=r"columns.timestamp_unit: must be one of s, ms, "
                                               r"us \(got 'minutes'\)"):
        parse_feature_spec(tomllib.loads(text), "spec.toml")


def test_a_missing_table_names_what_was_looked_for_and_what_is_there(small, tmp_path):
    dataset, spec_toml = small
    data = write_dataset(dataset, tmp_path, spec_toml, "csv")
    (data / "interactions.csv").rename(data / "ratings.csv")
    with pytest.raises(DataError) as caught:
        load_dataset(data)
    assert str(caught.value) == (
        f"{data}: missing table 'interactions': looked for interactions.parquet or "
        "interactions.csv; the directory holds features.toml, items.csv, ratings.csv, "
        "users.csv; rename or convert the interactions file to one of those names")

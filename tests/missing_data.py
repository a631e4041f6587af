"""A small synthetic dataset with gaps in every kind of feature, written as a user's
tables would hold them: empty CSV cells, Parquet nulls, NaN. Shared by the tests of
missing values (reading, training, tower parity, preparation, serving)."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from contracts.dataset import SPEC_FILE, Dataset
from contracts.feature_spec import BAG_SEPARATOR, parse_feature_spec

GAPPY = dict(num_users=80, num_items=60, num_clusters=4, interactions_per_user=6, seed=7)
EXTRA_SPEC = """
[features.languages]
tower = "user"
kind = "bag"
max_length = 3
embedding_dim = 4

[features.battery]
tower = "context"
kind = "numeric"
missing_indicator = true
"""
LANGUAGES = ("en", "fr", "de", "ja")


def gappy_dataset() -> tuple[Dataset, str]:
    """The synthetic data plus a user bag (languages) and a numeric context (battery),
    age with a missing indicator, and gaps: every 3rd user's age, every 4th user's
    country, every 5th user's languages, every 6th event's device, every 4th event's
    battery, every 7th item's category and every 5th item's tags are missing."""
    from training.synthetic import SyntheticConfig, generate_synthetic

    dataset, spec_toml = generate_synthetic(SyntheticConfig(**GAPPY))
    age = '[features.age]\ntower = "user"\nkind = "numeric"\n'
    assert age in spec_toml
    spec_toml = spec_toml.replace(age, age + "missing_indicator = true\n") + EXTRA_SPEC
    spec = parse_feature_spec(tomllib.loads(spec_toml), "<gappy>")
    users = {k: v.copy() for k, v in dataset.users.items()}
    n_users = len(users["user_id"])
    users["languages"] = _objects([LANGUAGES[: 1 + i % 3] for i in range(n_users)])
    users["age"][::3] = np.nan
    users["country"][::4] = ""
    users["languages"][::5] = _objects([()] * len(users["languages"][::5]))
    inter = {k: v.copy() for k, v in dataset.interactions.items()}
    n_events = len(inter["user_id"])
    inter["battery"] = np.linspace(5, 100, n_events).astype(np.float32)
    inter["device"][::6] = ""
    inter["battery"][::4] = np.nan
    items = {k: v.copy() for k, v in dataset.items.items()}
    items["category"][::7] = ""
    items["tags"][::5] = _objects([()] * len(items["tags"][::5]))
    return dataclasses.replace(dataset, spec=spec, interactions=inter, users=users,
                               items=items), spec_toml


def write_gappy(dataset: Dataset, spec_toml: str, directory: Path, form: str) -> Path:
    """Write with gaps as ``form`` holds them: "csv" (empty cells), "parquet-nulls"
    (nulls), "parquet-nan" (NaN numbers, "" strings, empty lists)."""
    directory.mkdir(parents=True)
    (directory / SPEC_FILE).write_text(spec_toml)
    for name in ("interactions", "users", "items"):
        columns = getattr(dataset, name)
        table = pa.table({c: _arrow(v, form) for c, v in columns.items()})
        if form == "csv":
            pacsv.write_csv(table, directory / f"{name}.csv")
        else:
            pq.write_table(table, directory / f"{name}.parquet")
    return directory


def _arrow(values: np.ndarray, form: str) -> pa.Array:
    nulls = form != "parquet-nan"
    if values.dtype.kind == "f":
        return pa.array(values.tolist(), pa.float32(), mask=np.isnan(values) & nulls)
    if values.dtype.kind in "iu":
        return pa.array(values)
    if len(values) and isinstance(values[0], tuple):
        if form == "csv":
            return pa.array([BAG_SEPARATOR.join(v) or None for v in values], pa.string())
        return pa.array([list(v) if v or not nulls else None for v in values],
                        pa.list_(pa.string()))
    return pa.array([v if v or not nulls else None for v in values.tolist()], pa.string())


def _objects(rows: list) -> np.ndarray:
    out = np.empty(len(rows), dtype=object)
    out[:] = rows
    return out

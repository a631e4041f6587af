"""The canonical input: interactions, user features, item features and a feature spec.

A dataset is a directory::

    features.toml                 the feature spec (contracts.feature_spec)
    interactions.{parquet,csv}    user_id, item_id, timestamp, + non-derived context columns
    users.{parquet,csv}           user_id + user features (optional when there are none)
    items.{parquet,csv}           item_id + item features: the whole catalogue, including
                                  items nobody interacted with yet

Column names come from the spec. In CSV a bag feature is one "|"-separated string; in
Parquet it may also be a list<string> column. Every reader error names the file, the line
(CSV: 1 is the header) and the column.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from contracts.errors import DataError
from contracts.feature_spec import BAG_SEPARATOR, Feature, FeatureSpec, load_feature_spec

Table = dict[str, np.ndarray]
SPEC_FILE = "features.toml"


@dataclass(frozen=True)
class Dataset:
    """Columns as NumPy arrays: categorical → object array of str, numeric → float32,
    bag → object array of tuples of str, timestamp → int64 seconds."""

    spec: FeatureSpec
    interactions: Table
    users: Table
    items: Table

    @property
    def num_interactions(self) -> int:
        return len(self.interactions[self.spec.columns.user_id])


def table_columns(spec: FeatureSpec) -> dict[str, list[Feature | str]]:
    """Which spec features live in which table (strings are the id/time columns)."""
    cols = spec.columns
    context = [f for f in spec.tower("context") if f.derive is None]
    users = [f for f in spec.tower("user") if f.kind != "history" and f.name != cols.user_id]
    items = [f for f in spec.tower("item") if f.name != cols.item_id]
    return {
        "interactions": [cols.user_id, cols.item_id, cols.timestamp, *context],
        "users": [cols.user_id, *users],
        "items": [cols.item_id, *items],
    }


def load_dataset(directory: str | Path) -> Dataset:
    directory = Path(directory)
    spec = load_feature_spec(directory / SPEC_FILE)
    layout = table_columns(spec)
    tables = {}
    for name, columns in layout.items():
        path = _find_table(directory, name, required=name != "users" or len(columns) > 1)
        tables[name] = read_table(path, columns, spec) if path else {
            spec.columns.user_id: np.array([], dtype=object)
        }
    _check_unique(tables["items"], spec.columns.item_id, directory / "items")
    _check_unique(tables["users"], spec.columns.user_id, directory / "users")
    _check_known_items(tables["interactions"], tables["items"], spec, directory)
    return Dataset(spec, tables["interactions"], tables["users"], tables["items"])


def write_dataset(dataset: Dataset, directory: str | Path, spec_toml: str,
                  fmt: str = "parquet") -> Path:
    """Write a dataset in canonical form; ``spec_toml`` is the spec's TOML text."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SPEC_FILE).write_text(spec_toml)
    for name in ("interactions", "users", "items"):
        table = getattr(dataset, name)
        arrow = pa.table({col: _to_arrow(values, fmt) for col, values in table.items()})
        path = directory / f"{name}.{fmt}"
        tmp = path.with_suffix(path.suffix + ".tmp")
        if fmt == "parquet":
            pq.write_table(arrow, tmp)
        elif fmt == "csv":
            pacsv.write_csv(arrow, tmp)
        else:
            raise ValueError(f"fmt must be 'parquet' or 'csv' (got {fmt!r})")
        os.replace(tmp, path)
    return directory


def _to_arrow(values: np.ndarray, fmt: str) -> pa.Array:
    if values.dtype == object and len(values) and isinstance(values[0], tuple):
        if fmt == "csv":
            return pa.array([BAG_SEPARATOR.join(v) for v in values], pa.string())
        return pa.array([list(v) for v in values], pa.list_(pa.string()))
    if values.dtype == object:
        return pa.array(values.tolist(), pa.string())
    return pa.array(values)


def _find_table(directory: Path, name: str, required: bool) -> Path | None:
    for suffix in ("parquet", "csv"):
        path = directory / f"{name}.{suffix}"
        if path.exists():
            return path
    if required:
        raise DataError(str(directory / f"{name}.parquet"), f"missing table {name!r} "
                        "(expected a .parquet or .csv file)")
    return None


def read_table(path: Path, columns: list[Feature | str], spec: FeatureSpec) -> Table:
    is_csv = path.suffix == ".csv"
    try:
        if is_csv:
            arrow = pacsv.read_csv(
                path, convert_options=pacsv.ConvertOptions(
                    column_types={_name(c): pa.string() for c in columns},
                    strings_can_be_null=False),
            )
        else:
            arrow = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        bad_row = csv_row_error(path) if is_csv and isinstance(exc, pa.ArrowInvalid) else None
        raise (bad_row or DataError(str(path), f"cannot read table: {exc}")) from exc
    out: Table = {}
    for col in columns:
        name = _name(col)
        if name not in arrow.column_names:
            raise DataError(str(path), f"missing column (has: {', '.join(arrow.column_names)})",
                            line=1 if is_csv else None, column=name)
        values = arrow.column(name).to_pylist()
        out[name] = _convert(values, col, spec, str(path), first_line=2 if is_csv else None)
    return out


def csv_row_error(path: Path) -> DataError | None:
    """The first row whose field count differs from the header's, as a DataError naming its
    line and the first column it lacks (or that it has one too many); pyarrow's own message
    quotes the row but not where it is."""
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        for row in reader:
            if row and len(row) != len(header):
                column = header[len(row)] if len(row) < len(header) else "(beyond the header)"
                return DataError(str(path), f"row has {len(row)} fields, the header "
                                 f"{len(header)}", line=reader.line_num, column=column)
    return None


def _name(col: Feature | str) -> str:
    return col if isinstance(col, str) else col.name


def _convert(values: list, col: Feature | str, spec: FeatureSpec, path: str,
             first_line: int | None) -> np.ndarray:
    def fail(row: int, message: str) -> DataError:
        line = None if first_line is None else first_line + row
        where = message if first_line is not None else f"row {row}: {message}"
        return DataError(path, where, line=line, column=_name(col))

    if col == spec.columns.timestamp:
        out = np.empty(len(values), dtype=np.int64)
        for i, v in enumerate(values):
            try:
                out[i] = int(float(v))
            except (TypeError, ValueError):
                raise fail(i, f"timestamp must be seconds since the epoch (got {v!r})") from None
        return out
    if isinstance(col, str) or col.kind == "categorical":
        out = np.empty(len(values), dtype=object)
        for i, v in enumerate(values):
            if v is None or v == "":
                raise fail(i, "empty value; every row needs one")
            out[i] = _as_id(v)
        return out
    if col.kind == "numeric":
        out = np.empty(len(values), dtype=np.float32)
        for i, v in enumerate(values):
            try:
                out[i] = float(v)
            except (TypeError, ValueError):
                raise fail(i, f"expected a number (got {v!r})") from None
            if not np.isfinite(out[i]):
                raise fail(i, f"expected a finite number (got {v!r})")
        return out
    out = np.empty(len(values), dtype=object)  # bag
    for i, v in enumerate(values):
        if v is None:
            out[i] = ()
        elif isinstance(v, str):
            out[i] = tuple(t for t in v.split(BAG_SEPARATOR) if t)
        else:
            out[i] = tuple(_as_id(t) for t in v)
    return out


def _as_id(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _check_unique(table: Table, column: str, path: Path) -> None:
    ids = table[column]
    if len(ids) == 0:
        return
    uniq, counts = np.unique(ids.astype(str), return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        raise DataError(str(path), f"id {dup!r} appears more than once", column=column)


def _check_known_items(interactions: Table, items: Table, spec: FeatureSpec,
                       directory: Path) -> None:
    """Every interacted item must be in the catalogue: the item tower needs its features."""
    col = spec.columns.item_id
    unknown = ~np.isin(interactions[col].astype(str), items[col].astype(str))
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise DataError(str(directory / "interactions"),
                        f"row {row}: item {interactions[col][row]!r} is not in the items table "
                        f"({int(unknown.sum())} interactions name unknown items)", column=col)

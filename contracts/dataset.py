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

Missing values: an empty cell, a Parquet null or NaN is a missing value of a feature (read
as "" for categorical, NaN for numeric, an empty bag); the user id, item id and timestamp
may not be missing. Timestamps are read into int64 seconds (UTC) from a number in the
spec's ``columns.timestamp_unit`` (s, ms, us), an ISO-8601 string or a Parquet timestamp;
one before 1970 or after 2199 is refused, naming the unit it looks like.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import os
import re
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
TABLE_SUFFIXES = ("parquet", "csv")
UNIT_SECONDS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
UNIT_WORDS = {"s": "seconds", "ms": "milliseconds", "us": "microseconds"}
# plausible event times in seconds: from 1970 up to (not including) 2200-01-01
LATEST_SECONDS = 7_258_118_400
# ISO-8601 extended form (what Spark's timestamp cast also reads): a date, or a date and
# time with optional seconds, fraction and offset (no offset: UTC)
ISO_8601 = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2})?)?$"
_ISO_8601 = re.compile(ISO_8601)


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
    users = [f for f in spec.tower("user")
             if f.kind not in ("history", "sequence") and f.name != cols.user_id]
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
    for suffix in TABLE_SUFFIXES:
        path = directory / f"{name}.{suffix}"
        if path.exists():
            return path
    if required:
        raise missing_table(directory, name, f"{name}.parquet or {name}.csv")
    return None


def missing_table(directory: Path, name: str, looked_for: str) -> DataError:
    """A required table that is not there, naming what was looked for and what is."""
    there = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir()
                   if not p.name.startswith(".")) if directory.is_dir() else []
    return DataError(str(directory), f"missing table {name!r}: looked for {looked_for}; "
                     f"the directory holds {', '.join(there) or 'nothing'}; rename or convert "
                     f"the {name} file to one of those names")


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
        values = _pylist(arrow.column(name), col == spec.columns.timestamp)
        out[name] = _convert(values, col, spec, str(path), first_line=2 if is_csv else None)
    return out


def _pylist(column: pa.ChunkedArray, is_timestamp: bool) -> list:
    """A column's values; a Parquet timestamp column as whole seconds since the epoch (its
    unit and time zone are in its type; floored, as numbers in a finer unit are)."""
    if is_timestamp and pa.types.is_timestamp(column.type):
        per_second = UNIT_SECONDS[column.type.unit]
        return [None if v is None else v // per_second
                for v in column.cast(pa.int64()).to_pylist()]
    return column.to_pylist()


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
        return _timestamps(values, spec.columns.timestamp_unit, fail)
    if isinstance(col, str):  # an id: every row needs one
        out = np.empty(len(values), dtype=object)
        for i, v in enumerate(values):
            if v is None or v == "":
                raise fail(i, "empty value; every row needs one")
            out[i] = _as_id(v)
        return out
    if col.kind == "categorical":  # missing → "" (its own embedding row)
        out = np.empty(len(values), dtype=object)
        out[:] = ["" if _missing(v) else _as_id(v) for v in values]
        return out
    if col.kind == "numeric":  # missing (empty, null, NaN) → NaN (the training mean)
        out = np.empty(len(values), dtype=np.float32)
        for i, v in enumerate(values):
            try:
                out[i] = np.nan if v is None or v == "" else float(v)
            except (TypeError, ValueError):
                raise fail(i, f"expected a number (got {v!r})") from None
            if np.isinf(out[i]):
                raise fail(i, f"expected a finite number (got {v!r}); leave the cell empty "
                           "or NaN for a missing value")
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


def _timestamps(values: list, unit: str, fail) -> np.ndarray:
    """Event times → int64 seconds since the epoch; DataError for a missing, unreadable or
    implausible one (before 1970, after 2199)."""
    per_second = UNIT_SECONDS[unit]
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        seconds = parse_timestamp(v, per_second)
        if seconds is None:
            raise fail(i, timestamp_message(unit, v))
        if not 0 <= seconds < LATEST_SECONDS:
            raise fail(i, implausible_timestamp(v, seconds, unit))
        out[i] = seconds
    return out


def timestamp_message(unit: str, value: object) -> str:
    return (f"timestamp must be {UNIT_WORDS[unit]} since the epoch (the spec's [columns] "
            f"timestamp_unit) or ISO-8601 text like 2024-05-01T12:30:00Z (got {value!r})")


def parse_timestamp(value: object, per_second: int) -> int | None:
    """Whole seconds since the epoch (floored) of a number in units of 1/per_second s, or
    of ISO-8601 text (no offset: UTC); None when it is neither."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value // per_second
    text = str(value).strip()
    try:
        number = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            return _iso_seconds(text)
    if isinstance(number, float):
        if not math.isfinite(number):
            return None
        return math.floor(number / per_second)
    return number // per_second


def _iso_seconds(text: str) -> int | None:
    if not _ISO_8601.match(text):
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace(" ", "T", 1))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return math.floor(when.timestamp())


def implausible_timestamp(value: object, seconds: int, unit: str) -> str:
    """What a timestamp outside 1970-2199 looks like, and how to read it right."""
    guess = next((u for u in ("ms", "us", "ns") if UNIT_SECONDS[u] > UNIT_SECONDS[unit] and
                  0 <= seconds * UNIT_SECONDS[unit] // UNIT_SECONDS[u] < LATEST_SECONDS),
                 None)
    when = "before 1970" if seconds < 0 else "after 2199"
    read = f"as {UNIT_WORDS[unit]} since the epoch it is {when}"
    if guess in ("ms", "us"):
        fix = f"it looks like {guess}: set timestamp_unit = \"{guess}\" under [columns] in " \
              f"{SPEC_FILE}"
    elif guess == "ns":
        fix = "it looks like nanoseconds: convert the column to seconds, ms or us"
    else:
        fix = (f"expected {UNIT_WORDS[unit]} since 1970-01-01 UTC; set [columns] "
               f"timestamp_unit in {SPEC_FILE} to the column's unit (s, ms or us)")
    return f"implausible timestamp {value}: {read}; {fix}"


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def is_missing(value: object) -> bool:
    """Whether a feature value read from a table is missing: "", NaN or None (an empty
    bag is a value: the empty set)."""
    return _missing(value) or value == ""


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

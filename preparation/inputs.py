"""The canonical dataset on Spark: finding its files, reading them typed, and the first
malformed row as a DataError naming the file, the row (CSV: the line) and the column.

A table is one file (``interactions.parquet``, ``interactions.csv``) or a directory of
many (``interactions/``, any depth, e.g. ``date=2024-01-01/part-0.parquet``), sorted by
path: a row's source ordinal is (index of its file in that order, row in the file), the
row order of the single-file form. Values are read as contracts.dataset reads them: ids
as strings (an integral float as an integer), timestamps as int64 seconds (from a number
in the spec's timestamp_unit, ISO-8601 text or a Parquet timestamp; 1970-2199), numbers as
float32, bags "|"-separated in CSV or list<string> in Parquet. A missing value (empty
cell, null, NaN) of a feature is null here (categorical, numeric) or an empty bag; the id
and time columns may not be missing.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from contracts.dataset import (
    ISO_8601,
    LATEST_SECONDS,
    SPEC_FILE,
    UNIT_SECONDS,
    csv_row_error,
    implausible_timestamp,
    missing_table,
    parse_timestamp,
    table_columns,
    timestamp_message,
)
from contracts.errors import DataError
from contracts.feature_spec import BAG_SEPARATOR, Feature, FeatureSpec, load_feature_spec

FILE, ROW, BAD = "_file", "_row", "_bad"
CORRUPT = "_corrupt_record"
SUFFIXES = (".parquet", ".csv")


@dataclass(frozen=True)
class Inputs:
    spec: FeatureSpec
    directory: Path
    interactions: tuple[Path, ...]
    users: tuple[Path, ...]  # empty: no users table
    items: tuple[Path, ...]


def find_inputs(directory: str | Path) -> Inputs:
    directory = Path(directory)
    spec = load_feature_spec(directory / SPEC_FILE)
    needs_users = len(table_columns(spec)["users"]) > 1
    return Inputs(spec, directory, _find(directory, "interactions", True),
                  _find(directory, "users", needs_users), _find(directory, "items", True))


def _find(directory: Path, name: str, required: bool) -> tuple[Path, ...]:
    for suffix in SUFFIXES:
        if (directory / f"{name}{suffix}").is_file():
            return (directory / f"{name}{suffix}",)
    folder = directory / name
    if folder.is_dir():
        files = sorted((p for p in folder.rglob("*") if p.suffix in SUFFIXES and p.is_file()
                        and not any(part.startswith((".", "_")) for part in
                                    p.relative_to(folder).parts)), key=str)
        if not files:
            raise DataError(str(folder), "no .parquet or .csv files in this directory")
        if len({p.suffix for p in files}) > 1:
            raise DataError(str(folder), "mixes .parquet and .csv files; use one format")
        return tuple(files)
    if required:
        raise missing_table(directory, name, f"{name}.parquet, {name}.csv or a directory "
                            f"{name}/")
    return ()


def read_table(spark: SparkSession, files: tuple[Path, ...], columns: list[Feature | str],
               spec: FeatureSpec) -> DataFrame:
    """The table's ``columns`` typed, plus FILE (int index into ``files``), ROW (the row's
    ordinal in its file) and BAD (index of the first failed check, null when the row is
    good). Raises DataError for a missing column; :func:`check_rows` for a bad row."""
    raw = _read_raw(spark, files)
    names = [_name(c) for c in columns]
    for name in names:
        if name not in raw.columns:
            raise DataError(str(files[0]), f"missing column (has: "
                            f"{', '.join(c for c in raw.columns if not c.startswith('_'))})",
                            line=1 if _is_csv(files) else None, column=name)
    typed, bad = [], []
    for col in columns:
        value, failed = _typed(raw, col, spec)
        typed.append(value.alias(_name(col)))
        bad.append(failed)
    if _is_csv(files):
        bad.insert(0, F.col(CORRUPT).isNotNull())
    first_bad = F.coalesce(*[F.when(b, F.lit(i)) for i, b in enumerate(bad)], F.lit(None))
    return raw.select(*typed, FILE, ROW, first_bad.cast("int").alias(BAD),
                      *[F.col(n).cast("string").alias(f"_raw_{n}") for n in names])


def check_rows(table: DataFrame, files: tuple[Path, ...], columns: list[Feature | str],
               spec: FeatureSpec) -> None:
    """Raise DataError for the table's first bad row (by file, then row)."""
    first = (table.where(F.col(BAD).isNotNull()).orderBy(FILE, ROW).limit(1).collect())
    if not first:
        return
    row = first[0]
    checks = ([(None, None)] if _is_csv(files) else []) + [(c, _name(c)) for c in columns]
    col, name = checks[row[BAD]]
    path = files[row[FILE]]
    if col is None:  # the file's first row of the wrong width, worded as contracts.dataset does
        raise csv_row_error(path) or DataError(
            str(path), "row has a different number of fields than the header",
            line=_line(table, row), column="(the row)")
    message = _message(col, spec, row[f"_raw_{name}"])
    if _is_csv(files):
        raise DataError(str(path), message, line=_line(table, row), column=name)
    raise DataError(str(path), f"row {row[ROW]}: {message}", column=name)


def where(files: tuple[Path, ...], table: DataFrame, row) -> tuple[str, int | None, str]:
    """(path, CSV line or None, 'row N: ' prefix or '') of one row of ``table``."""
    path = str(files[row[FILE]])
    if _is_csv(files):
        return path, _line(table, row), ""
    return path, None, f"row {row[ROW]}: "


def _line(table: DataFrame, row) -> int:
    """A CSV row's line (1 is the header): its rank in its file. Only on the error path."""
    before = table.where((F.col(FILE) == row[FILE]) & (F.col(ROW) < row[ROW])).count()
    return before + 2


def _message(col: Feature | str, spec: FeatureSpec, raw: str | None) -> str:
    """Worded as contracts.dataset words the same value."""
    if col == spec.columns.timestamp:
        unit = spec.columns.timestamp_unit
        seconds = parse_timestamp(raw, UNIT_SECONDS[unit])
        if seconds is None:
            return timestamp_message(unit, raw)
        return implausible_timestamp(raw, seconds, unit)
    if isinstance(col, str):
        return "empty value; every row needs one"
    try:
        float(raw or "")
    except ValueError:
        return f"expected a number (got {raw!r})"
    return (f"expected a finite number (got {raw!r}); leave the cell empty or NaN for a "
            "missing value")


def _typed(raw: DataFrame, col: Feature | str, spec: FeatureSpec) -> tuple[Column, Column]:
    """(typed value, failed check) of one column."""
    name = _name(col)
    c, kind = F.col(name), raw.schema[name].dataType
    if col == spec.columns.timestamp:
        value = _seconds(c, kind, UNIT_SECONDS[spec.columns.timestamp_unit])
        return value, value.isNull() | (value < 0) | (value >= LATEST_SECONDS)
    if isinstance(col, str):  # an id: every row needs one
        value = _as_id(c, kind)
        return value, value.isNull() | (value == "")
    if col.kind == "categorical":  # missing ("", null, NaN) → null
        value = _as_id(c, kind)
        if isinstance(kind, T.FloatType | T.DoubleType):
            value = F.when(~F.isnan(c), value)
        return F.when(value != "", value), F.lit(False)
    if col.kind == "numeric":  # missing ("", null) → null; NaN stays NaN; text, ±inf fail
        number = c.try_cast("double")
        empty = c.isNull() | (c.cast("string") == "")
        bad = number.isNull() | (F.abs(number) == float("inf"))
        return F.when(~empty, number.cast("float")), ~empty & bad
    if isinstance(kind, T.ArrayType):
        value = F.transform(c, lambda x: _as_id(x, kind.elementType))
    else:
        value = F.filter(F.split(c.cast("string"), "\\" + BAG_SEPARATOR, -1), lambda x: x != "")
    return F.coalesce(value, F.array().cast("array<string>")), F.lit(False)


def _seconds(c: Column, kind: T.DataType, per_second: int) -> Column:
    """Whole seconds since the epoch (floored), as contracts.dataset.parse_timestamp reads
    the same value: a Parquet timestamp, a number in units of 1/per_second s, or ISO-8601
    text (no offset: UTC, the session's time zone); null when it is none of those."""
    if isinstance(kind, T.TimestampType | T.TimestampNTZType):
        return F.unix_seconds(c.cast("timestamp"))
    number = c.try_cast("double")
    from_number = F.when(~F.isnan(number) & (F.abs(number) != float("inf")),
                         F.floor(number / per_second))
    if not isinstance(kind, T.StringType):
        return from_number.cast("long")
    text = F.trim(c)
    from_text = F.when(text.rlike(ISO_8601), F.unix_seconds(text.try_cast("timestamp")))
    return F.coalesce(from_number, from_text).cast("long")


def _as_id(c: Column, kind: T.DataType) -> Column:
    """An id as contracts.dataset reads it: an integral float as an integer."""
    if isinstance(kind, T.FloatType | T.DoubleType):
        return F.when(c == F.floor(c), c.try_cast("long").cast("string")) \
            .otherwise(c.cast("string"))
    return c.cast("string")


def _read_raw(spark: SparkSession, files: tuple[Path, ...]) -> DataFrame:
    paths = [str(p.resolve()) for p in files]  # Spark reports absolute paths
    if _is_csv(files):
        header = _csv_header(files)
        schema = T.StructType([T.StructField(h, T.StringType()) for h in header]
                              + [T.StructField(CORRUPT, T.StringType())])
        df = (spark.read.schema(schema).option("header", "true").option("mode", "PERMISSIVE")
              .option("columnNameOfCorruptRecord", CORRUPT).csv(paths))
        row = F.monotonically_increasing_id()  # increases with the row within a file
    else:
        df = spark.read.parquet(*paths)
        row = F.col("_metadata.row_index")
    index = spark.createDataFrame([(p, i) for i, p in enumerate(paths)],
                                  "_local string, " + FILE + " int")
    local = F.url_decode(F.regexp_replace(F.col("_metadata.file_path"), "^file:/*", "/"))
    df = df.select("*", local.alias("_local"), row.alias(ROW))
    return df.join(F.broadcast(index), "_local").drop("_local")


def _csv_header(files: tuple[Path, ...]) -> list[str]:
    headers = {}
    for path in files:
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            headers[path] = next(csv.reader(fh), [])
    first = headers[files[0]]
    for path, header in headers.items():
        if header != first:
            raise DataError(str(path), f"header {header} differs from {files[0]}'s {first}",
                            line=1)
    return first


def _is_csv(files: tuple[Path, ...]) -> bool:
    return files[0].suffix == ".csv"


def _name(col: Feature | str) -> str:
    return col if isinstance(col, str) else col.name

"""MovieLens adapters: raw ml-100k / ml-1m / "latest"-format (ml-latest, ml-latest-small,
ml-20m, ml-25m, ml-32m) files → (canonical Dataset, spec TOML text).

Feedback is implicit: every rating is an interaction (``min_rating`` filters) and the
rating itself is dropped. Ids become decimal strings. ml-100k and ml-1m files are read as
latin-1 (the encoding of the titles), the "latest" CSV files as UTF-8. A malformed line raises DataError naming the file and line. The
ml-1m ``ratings_no_timestamps.csv`` has dense item ids and no times, so its spec has no item
features, no time-of-day context and no recent-items history.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import compress
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from contracts.dataset import Dataset, Table, write_dataset
from contracts.errors import DataError
from contracts.feature_spec import DERIVATIONS, parse_feature_spec

logger = logging.getLogger(__name__)

ML100K_GENRES: tuple[str, ...] = tuple(
    "unknown|Action|Adventure|Animation|Children's|Comedy|Crime|Documentary|Drama|Fantasy|"
    "Film-Noir|Horror|Musical|Mystery|Romance|Sci-Fi|Thriller|War|Western".split("|"))
DENSE_RATINGS_HEADER = "user_id,item_dense_id,rating"
UNKNOWN_YEAR = "unknown"
NO_GENRES = "(no genres listed)"  # the "latest" releases' movies.csv: an empty bag
KINDS = ("ml-100k", "ml-1m", "ml-latest")

_USER_FEATURES_100K = (("age", "numeric"), ("gender", "categorical"),
                       ("occupation", "categorical"), ("zip_prefix", "categorical"))
# ML-1M ages are bucket codes (1, 18, 25, ...), so they are categories, not numbers.
_USER_FEATURES_1M = (("gender", "categorical"), ("age", "categorical"),
                     ("occupation", "categorical"), ("zip_prefix", "categorical"))
_ITEM_FEATURES = (("genres", "bag"), ("year", "categorical"))
_RELEASE_YEAR = re.compile(r"^\d{1,2}-[A-Za-z]{3}-(\d{4})$")  # u.item: 01-Jan-1995
_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")                 # movies.dat: Heat (1995)
_DIGITS = frozenset("0123456789")


@dataclass(frozen=True)
class _Rows:
    """The fields of a delimited file, column by column, with each row's 1-based line."""

    path: Path
    lines: np.ndarray  # int [n]
    columns: list[list[str]]

    def fail(self, row: int, message: str) -> DataError:
        return DataError(str(self.path), message, line=int(self.lines[row]))

    def ints(self, col: int, name: str) -> np.ndarray:
        """Column ``col`` as int64 [n]; the first bad value is reported with its line."""
        values = self.columns[col]
        try:
            return np.fromiter(map(int, values), np.int64, len(values))
        except (ValueError, OverflowError):
            row = next(i for i, v in enumerate(values) if not _is_int64(v))
            raise self.fail(row, f"{name} must be an integer (got {values[row]!r})") from None

    def strings(self, col: int, name: str) -> np.ndarray:
        """Column ``col`` as an object array of non-empty str [n]."""
        values = self.columns[col]
        empty = [i for i, v in enumerate(values) if not v.strip()]
        if empty:
            raise self.fail(empty[0], f"{name} is empty; expected a value on every line")
        return _objects(values)


def convert_ml100k(source_dir: str | Path, min_rating: int = 0) -> tuple[Dataset, str]:
    """ml-100k → (Dataset, spec TOML): age numeric; genres bag; release year categorical."""
    src = Path(source_dir)
    genres = _ml100k_genres(src / "u.genre")
    users = _ml100k_users(_read_rows(src / "u.user", "|", 5))
    items = _ml100k_items(_read_rows(src / "u.item", "|", 5 + len(genres)), genres)
    ratings = _read_rows(src / "u.data", "\t", 4)
    interactions = _interactions(ratings, users, items, ratings.ints(3, "timestamp"), min_rating)
    return _dataset(_spec_toml(_USER_FEATURES_100K, _ITEM_FEATURES), interactions, users, items)


def convert_ml1m(source_dir: str | Path, ratings_file: str = "ratings.dat",
                 min_rating: int = 0) -> tuple[Dataset, str]:
    """ml-1m → (Dataset, spec TOML). A ``.csv`` ratings file is read as the dense,
    timestamp-free ``user_id,item_dense_id,rating`` form; anything else as ratings.dat."""
    src = Path(source_dir)
    users = _ml1m_users(_read_rows(src / "users.dat", "::", 5))
    path = src / ratings_file
    if path.suffix == ".csv":
        ratings = _read_rows(path, ",", 3, header=DENSE_RATINGS_HEADER)
        return _ml1m_without_time(ratings, users, min_rating)
    items = _ml1m_items(_read_rows(src / "movies.dat", "::", 3))
    ratings = _read_rows(path, "::", 4)
    interactions = _interactions(ratings, users, items, ratings.ints(3, "timestamp"), min_rating)
    return _dataset(_spec_toml(_USER_FEATURES_1M, _ITEM_FEATURES), interactions, users, items)


def convert_ml_latest(source_dir: str | Path, min_rating: float = 0.0) -> tuple[Dataset, str]:
    """A MovieLens "latest"-format release (ml-latest, ml-latest-small, ml-20m, ml-25m,
    ml-32m) → (Dataset, spec TOML). ratings.csv ``userId,movieId,rating,timestamp``
    (half-star ratings) and movies.csv ``movieId,title,genres`` (quoted titles,
    "|"-separated genres, "(no genres listed)" an empty bag, the year in the title), both
    UTF-8 with a header. There is no users file: users have no features but their id."""
    src = Path(source_dir)
    movies = _read_csv(src / "movies.csv", {"movieId": pa.int64(), "title": pa.string(),
                                            "genres": pa.string()})
    ratings = _read_csv(src / "ratings.csv", {"userId": pa.int64(), "movieId": pa.int64(),
                                              "rating": pa.float64(), "timestamp": pa.int64()})
    items = {"item_id": _decimal(movies["movieId"]),
             "genres": _objects(tuple(g for g in text.split("|") if g and g != NO_GENRES)
                                for text in movies["genres"]),
             "year": _years(_TITLE_YEAR, movies["title"])}
    _check_unique_csv(src / "movies.csv", movies["movieId"], "movieId")
    unknown = np.flatnonzero(~np.isin(ratings["movieId"], movies["movieId"]))
    if unknown.size:
        raise DataError(str(src / "ratings.csv"), f"movieId {ratings['movieId'][unknown[0]]} "
                        f"has no row in movies.csv ({unknown.size} ratings like this)",
                        line=int(unknown[0]) + 2, column="movieId")
    keep = ratings["rating"] >= min_rating
    interactions = {"user_id": _decimal(ratings["userId"][keep]),
                    "item_id": _decimal(ratings["movieId"][keep]),
                    "timestamp": ratings["timestamp"][keep]}
    users = {"user_id": _decimal(np.unique(ratings["userId"][keep]))}
    return _dataset(_spec_toml((), _ITEM_FEATURES), interactions, users, items)


def main_convert(kind: str, source: str, out: str, fmt: str = "parquet") -> Path:
    """Convert ``kind`` (KINDS) from ``source`` and write it to ``out``. For ml-1m,
    ratings.dat is used when present, else ratings_no_timestamps.csv."""
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"fmt must be 'parquet' or 'csv' (got {fmt!r})")
    if kind == "ml-100k":
        dataset, spec_toml = convert_ml100k(source)
    elif kind == "ml-1m":
        has_dat = (Path(source) / "ratings.dat").exists()
        dataset, spec_toml = convert_ml1m(
            source, "ratings.dat" if has_dat else "ratings_no_timestamps.csv")
    elif kind == "ml-latest":
        dataset, spec_toml = convert_ml_latest(source)
    else:
        raise ValueError(f"kind must be 'ml-100k' or 'ml-1m' or 'ml-latest' (got {kind!r})")
    directory = write_dataset(dataset, out, spec_toml, fmt)
    logger.info("%s → %s: %d users, %d items, %d interactions", kind, directory,
                len(dataset.users["user_id"]), len(dataset.items["item_id"]),
                dataset.num_interactions)
    return directory


def _read_csv(path: Path, types: dict[str, pa.DataType]) -> dict[str, np.ndarray]:
    """A "latest"-format CSV (header, quoted fields) as NumPy columns; DataError naming the
    file, and the first bad line and column (from a second, plain pass) when it is malformed."""
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types=types, include_columns=list(types), strings_can_be_null=False))
    except FileNotFoundError as exc:
        raise DataError(str(path), "missing: a MovieLens \"latest\" release has ratings.csv "
                        "and movies.csv") from exc
    except (pa.ArrowInvalid, pa.ArrowKeyError, OSError) as exc:
        raise _first_bad_cell(path, types) or DataError(str(path), f"cannot read: {exc}") \
            from exc
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in types}


def _first_bad_cell(path: Path, types: dict[str, pa.DataType]) -> DataError | None:
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        missing = [name for name in types if name not in header]
        if missing:
            return DataError(str(path), f"missing column (has: {', '.join(header)})", line=1,
                             column=missing[0])
        numeric = [(header.index(n), n) for n, t in types.items() if t != pa.string()]
        for row in reader:
            if len(row) != len(header):
                return DataError(str(path), f"row has {len(row)} fields, the header "
                                 f"{len(header)}", line=reader.line_num)
            for col, name in numeric:
                if not _is_number(row[col]):
                    return DataError(str(path), f"expected a number (got {row[col]!r})",
                                     line=reader.line_num, column=name)
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_unique_csv(path: Path, ids: np.ndarray, column: str) -> None:
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        row = np.flatnonzero(ids == dup)[1]
        raise DataError(str(path), f"{column} {dup} appears twice; expected one line per id",
                        line=int(row) + 2, column=column)


def _ml100k_genres(path: Path) -> tuple[str, ...]:
    """Genre names in flag order, from u.genre (``name|index``) or the standard 19."""
    if not path.exists():
        return ML100K_GENRES
    rows = _read_rows(path, "|", 2)
    return tuple(rows.columns[0][i] for i in np.argsort(rows.ints(1, "genre index")))


def _ml100k_users(rows: _Rows) -> Table:
    return {
        "user_id": _unique_ids(rows, 0, "user id"),
        "age": rows.ints(1, "age").astype(np.float32),
        "gender": rows.strings(2, "gender"),
        "occupation": rows.strings(3, "occupation"),
        "zip_prefix": _zip_prefix(rows.columns[4]),
    }


def _ml100k_items(rows: _Rows, genres: tuple[str, ...]) -> Table:
    flags = np.stack([rows.ints(5 + g, f"genre flag {name!r}") for g, name in enumerate(genres)],
                     axis=1)
    bad = np.argwhere((flags != 0) & (flags != 1))
    if bad.size:
        row, g = bad[0]
        raise rows.fail(row, f"genre flag {genres[g]!r} must be 0 or 1 (got {flags[row, g]})")
    names = np.array(genres, dtype=object)
    return {
        "item_id": _unique_ids(rows, 0, "item id"),
        "genres": _objects(tuple(names[row.astype(bool)]) for row in flags),
        "year": _years(_RELEASE_YEAR, rows.columns[2]),
    }


def _ml1m_users(rows: _Rows) -> Table:
    return {
        "user_id": _unique_ids(rows, 0, "user id"),
        "gender": rows.strings(1, "gender"),
        "age": _decimal(rows.ints(2, "age")),
        "occupation": _decimal(rows.ints(3, "occupation")),
        "zip_prefix": _zip_prefix(rows.columns[4]),
    }


def _ml1m_items(rows: _Rows) -> Table:
    return {
        "item_id": _unique_ids(rows, 0, "movie id"),
        "genres": _objects(tuple(g for g in text.split("|") if g) for text in rows.columns[2]),
        "year": _years(_TITLE_YEAR, rows.columns[1]),
    }


def _ml1m_without_time(ratings: _Rows, users: Table, min_rating: int) -> tuple[Dataset, str]:
    # Dense ids do not join movies.dat, so the catalogue is the ids seen in the ratings.
    logger.warning("%s has no timestamps: every interaction gets timestamp 0; the spec has no "
                   "item features, time-of-day context or recent-items history", ratings.path)
    timestamp = np.zeros(len(ratings.lines), dtype=np.int64)
    interactions = _interactions(ratings, users, None, timestamp, min_rating)
    items = {"item_id": _decimal(np.unique(ratings.ints(1, "item id")))}
    return _dataset(_spec_toml(_USER_FEATURES_1M, (), timestamps=False), interactions, users, items)


def _interactions(ratings: _Rows, users: Table, items: Table | None, timestamp: np.ndarray,
                  min_rating: int) -> Table:
    """Columns 0, 1, 2 of ``ratings`` are user, item, rating; unknown ids are errors."""
    user, item = ratings.ints(0, "user id"), ratings.ints(1, "item id")
    _check_known(ratings, user, users["user_id"], "user id")
    if items is not None:
        _check_known(ratings, item, items["item_id"], "item id")
    keep = ratings.ints(2, "rating") >= min_rating
    return {"user_id": _decimal(user[keep]), "item_id": _decimal(item[keep]),
            "timestamp": timestamp[keep]}


def _check_known(rows: _Rows, ids: np.ndarray, known: np.ndarray, name: str) -> None:
    missing = np.flatnonzero(~np.isin(ids, known.astype(np.int64)))
    if missing.size:
        row = missing[0]
        raise rows.fail(row, f"{name} {ids[row]} has no row in its features file "
                             f"({missing.size} ratings like this)")


def _unique_ids(rows: _Rows, col: int, name: str) -> np.ndarray:
    ids = rows.ints(col, name)
    _, first = np.unique(ids, return_index=True)
    if len(first) < len(ids):
        row = np.setdiff1d(np.arange(len(ids)), first)[0]
        raise rows.fail(row, f"{name} {ids[row]} appears twice; expected one line per id")
    return _decimal(ids)


def _zip_prefix(zips: Iterable[str]) -> np.ndarray:
    """First digit of each zip code; "?" for foreign (letter-first) or empty codes."""
    return _objects(z[:1] if z[:1] in _DIGITS else "?" for z in (s.strip() for s in zips))


def _years(pattern: re.Pattern[str], texts: Iterable[str]) -> np.ndarray:
    matches = (pattern.search(text.strip()) for text in texts)
    return _objects(m.group(1) if m else UNKNOWN_YEAR for m in matches)


def _spec_toml(user_features: tuple[tuple[str, str], ...],
               item_features: tuple[tuple[str, str], ...], timestamps: bool = True) -> str:
    """The spec's TOML text; time context and history only when timestamps are real."""
    entries: list[tuple[str, dict[str, object]]] = [
        ("user_id", {"tower": "user", "kind": "categorical", "embedding_dim": 32})]
    entries += [(name, {"tower": "user", "kind": kind}) for name, kind in user_features]
    if timestamps:
        entries += [(d, {"tower": "context", "kind": "categorical", "dtype": "int", "derive": d})
                    for d in DERIVATIONS]
        entries.append(("recent_items", {"tower": "user", "kind": "history", "max_length": 20}))
    entries.append(("item_id", {"tower": "item", "kind": "categorical", "embedding_dim": 32}))
    entries += [(name, {"tower": "item", "kind": kind}) for name, kind in item_features]
    blocks = ['[columns]\nuser_id = "user_id"\nitem_id = "item_id"\ntimestamp = "timestamp"\n']
    for name, keys in entries:
        body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())  # TOML-valid here
        blocks.append(f"[features.{name}]\n{body}")
    return "\n".join(blocks)


def _dataset(spec_toml: str, interactions: Table, users: Table,
             items: Table) -> tuple[Dataset, str]:
    spec = parse_feature_spec(tomllib.loads(spec_toml), "<movielens spec>")
    return Dataset(spec, interactions, users, items), spec_toml


def _read_rows(path: Path, sep: str, n_fields: int, header: str | None = None) -> _Rows:
    """Split the lines of ``path`` on ``sep``; each must have ``n_fields``. Blank lines are
    skipped. Vectorised: one split of the whole text, not one per line."""
    lines = _read_lines(path)
    keep = [bool(line.strip()) for line in lines]
    lines, numbers = list(compress(lines, keep)), np.flatnonzero(keep) + 1
    if header is not None:
        got = lines[0] if lines else ""
        if got != header:
            raise DataError(str(path), f"expected header {header!r} (got {got!r})",
                            line=int(numbers[0]) if lines else 1)
        lines, numbers = lines[1:], numbers[1:]
    counts = np.fromiter(map(str.count, lines, [sep] * len(lines)), np.int64, len(lines))
    bad = np.flatnonzero(counts != n_fields - 1)
    if bad.size:
        raise DataError(str(path), f"expected {n_fields} fields separated by {sep!r} "
                                   f"(got {counts[bad[0]] + 1})", line=int(numbers[bad[0]]))
    # Lines hold no "\n", so after the replace every line gives exactly n_fields tokens.
    flat = "\n".join(lines).replace(sep, "\n").split("\n") if lines else []
    return _Rows(path, numbers, [flat[c::n_fields] for c in range(n_fields)])


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("latin-1")
    except OSError as exc:
        raise DataError(str(path), f"cannot read the MovieLens file: {exc.strerror}") from exc
    # split on "\n" only: str.splitlines would also split at latin-1 control bytes (0x85).
    return text.replace("\r\n", "\n").split("\n")


def _objects(values: Iterable[object]) -> np.ndarray:
    """A 1-D object array; tuples stay elements (np.array would make them a 2-D array)."""
    return np.fromiter(values, dtype=object)


def _decimal(ints: np.ndarray) -> np.ndarray:
    """int64 [n] → object array of Python str [n]; formats each distinct value once."""
    uniq, inverse = np.unique(ints, return_inverse=True)
    return uniq.astype(str).astype(object)[inverse.reshape(-1)]


def _is_int64(text: str) -> bool:
    try:
        return -(2**63) <= int(text) < 2**63
    except ValueError:
        return False

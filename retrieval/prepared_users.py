"""The users of a prepared output, streamed as batches of StoredUser for the feature store
(`two-tower load-features --prepared`), then its interactions for the users' seen sets.

What it reads of a prepared directory (contracts.prepared, docs/preparation.md)::

    manifest.json       "users": {"path": "users/", "rows": n, "history_length": L}, and
                        the spec, whose columns.user_id names the user id column
    users/*.parquet     the user id, the user-tower features (not id, not history) and
                        ``history``: list<string>, the user's last L items, most recent first
    train/ valid/ test/ every interaction, one example row each (shuffled): of these only
                        the user id, item id and timestamp columns are read, for the
                        seen sets (retrieval.seen_items)

Files are read in name order, one record batch at a time (pyarrow ``iter_batches``): what
is held is one batch of users and Arrow's buffers for the row group being read, whatever
the number of users. Values are stored as the canonical dataset's are (contracts.dataset):
a string, a number or a list of strings; a null, or NaN of a numeric feature, is a missing
value and is not stored (serving then reads it as missing: "" or NaN).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from contracts.errors import DataError
from contracts.prepared import HISTORY as HISTORY_COLUMN
from contracts.prepared import SPLITS, load_prepared
from retrieval.feature_store import StoredUser
from retrieval.seen_items import SeenEvent

UserBatch = list[tuple[str, StoredUser]]


@dataclass(frozen=True)
class PreparedUsers:
    """Where a prepared output's users are: ``files`` in read order, the user id column,
    and the manifest's counts (``rows`` users, histories of ``history_length`` items);
    ``examples``: the train, valid and test shards, whose (``user_id``, ``item_id``,
    ``timestamp``) columns are every interaction."""

    files: tuple[Path, ...]
    user_id: str
    rows: int
    history_length: int
    examples: tuple[Path, ...] = ()
    item_id: str = "item_id"
    timestamp: str = "timestamp"


def open_prepared_users(prepared: str | Path) -> PreparedUsers:
    """Reads the manifest (contracts.prepared: ArtifactError when it is missing, of another
    format or malformed) and the users files' schemas (DataError naming the file and the
    column that is missing or of a type the store cannot hold)."""
    manifest = load_prepared(prepared)
    files = tuple(sorted(manifest.users.glob("*.parquet")))
    if not files and manifest.users_rows:
        raise DataError(str(manifest.users), f"no .parquet files, but the manifest counts "
                        f"{manifest.users_rows} users; prepare again")
    user_id = manifest.spec.columns.user_id
    for path in files:  # footers only: a wrong file is refused before anything is written
        _feature_columns(pq.read_schema(path), user_id, path)
    cols = manifest.spec.columns
    examples = tuple(s.path for split in SPLITS for s in manifest.splits[split].shards)
    for path in examples:
        _interaction_columns(pq.read_schema(path), cols.user_id, cols.item_id, cols.timestamp,
                             path)
    return PreparedUsers(files, user_id, manifest.users_rows, manifest.history_length,
                         examples, cols.item_id, cols.timestamp)


def iter_user_batches(users: PreparedUsers, batch_size: int) -> Iterator[UserBatch]:
    """(user_id, StoredUser) lists of at most ``batch_size`` users, file by file."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (got {batch_size!r})")
    for path in users.files:
        parquet = pq.ParquetFile(path)
        features = _feature_columns(parquet.schema_arrow, users.user_id, path)
        first_row = 0
        for batch in parquet.iter_batches(batch_size=batch_size):
            yield _users_of(batch, users.user_id, features, path, first_row)
            first_row += batch.num_rows


def iter_seen_batches(users: PreparedUsers, batch_size: int) -> Iterator[list[SeenEvent]]:
    """Every interaction of the splits as (user_id, item_id, timestamp), in lists of at
    most ``batch_size``, shard by shard (three columns of one record batch in memory)."""
    columns = [users.user_id, users.item_id, users.timestamp]
    for path in users.examples:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
            user_ids, item_ids, times = (batch.column(c).to_pylist() for c in columns)
            yield [(str(u), str(i), float(t))
                   for u, i, t in zip(user_ids, item_ids, times, strict=True)]


def _interaction_columns(schema: pa.Schema, user_id: str, item_id: str, timestamp: str,
                         path: Path) -> None:
    for name, ok, wanted in ((user_id, _is_text, "string"), (item_id, _is_text, "string"),
                             (timestamp, pa.types.is_integer, "int64 seconds")):
        if name not in schema.names:
            raise DataError(str(path), f"missing column; expected {wanted} (has: "
                            f"{', '.join(schema.names)})", column=name)
        if not ok(schema.field(name).type):
            raise DataError(str(path), f"expected {wanted} (got {schema.field(name).type})",
                            column=name)


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _feature_columns(schema: pa.Schema, user_id: str, path: Path) -> list[str]:
    for name, wanted in ((user_id, "a string user id"),
                         (HISTORY_COLUMN, "list<string> of item ids")):
        if name not in schema.names:
            raise DataError(str(path), f"missing column; expected {wanted} (has: "
                            f"{', '.join(schema.names)})", column=name)
    features = [n for n in schema.names if n not in (user_id, HISTORY_COLUMN)]
    for name in features:
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_integer(kind) or pa.types.is_floating(kind)
                or (pa.types.is_list(kind) or pa.types.is_large_list(kind))
                and pa.types.is_string(kind.value_type)):
            raise DataError(str(path), f"a user feature must be a string, a number or "
                            f"list<string> (got {kind})", column=name)
    return features


def _users_of(batch: pa.RecordBatch, user_id: str, features: list[str], path: Path,
              first_row: int) -> UserBatch:
    ids = batch.column(user_id).to_pylist()
    histories = batch.column(HISTORY_COLUMN).to_pylist()
    values = {name: batch.column(name).to_pylist() for name in features}
    out: UserBatch = []
    for i, (uid, history) in enumerate(zip(ids, histories, strict=True)):
        stored = {n: v[i] for n, v in values.items() if _present(v[i])}
        try:
            if uid is None or uid == "":
                raise ValueError("the user id is empty")
            out.append((str(uid), StoredUser(stored, tuple(history or ()))))
        except (TypeError, ValueError) as exc:
            raise DataError(str(path), f"row {first_row + i}: {exc}") from exc
    return out


def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))

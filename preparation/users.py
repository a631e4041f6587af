"""users/: what ``load-features`` writes to the feature store, one row per user.

Columns: the user id, every users-table feature (null for a user seen only in the
interactions, and for a missing value: the store then keeps no such feature, as
retrieval.feature_store.users_from_dataset does not) and HISTORY, the user's last
``history_length`` items, most recent first (empty for a user with no interactions), in
the order of retrieval.feature_store.users_from_dataset (timestamp, then source ordinal).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from contracts.feature_spec import FeatureSpec
from contracts.prepared import HISTORY
from preparation.examples import POS, SIZE


def write_users(examples: DataFrame, users: DataFrame | None, spec: FeatureSpec,
                history_length: int, rows_per_file: int, scratch: Path, stage: Path) -> int:
    """Write users/part-*.parquet under ``stage``; the number of users."""
    uid, iid = spec.columns.user_id, spec.columns.item_id
    latest = (examples.where(F.col(POS) >= F.col(SIZE) - history_length).groupBy(uid)
              .agg(F.sort_array(F.collect_list(F.struct(POS, iid)), asc=False).alias("_h")))
    latest = latest.select(uid, F.transform("_h", lambda e: e[iid]).alias(HISTORY))
    table = latest if users is None else users.join(latest, uid, "full_outer")
    table = table.withColumn(HISTORY, F.coalesce(HISTORY, F.array().cast("array<string>")))
    written = scratch / "users"
    table.orderBy(uid).write.option("maxRecordsPerFile", rows_per_file).parquet(str(written))
    target = stage / "users"
    target.mkdir()
    files = sorted(written.glob("*.parquet"))
    for i, path in enumerate(files):
        path.rename(target / f"users-{i:05d}.parquet")
    return sum(pq.ParquetFile(p).metadata.num_rows for p in target.iterdir())

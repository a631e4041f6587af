"""Parquet shards of bounded size, a multiple of ``shard_multiple`` of them, each in a
seeded random order.

Rows are numbered densely (the offsets of Spark's partitions plus the row within its
partition: no shuffle), shard = number mod the shard count, so shard sizes differ by at
most one row and never exceed ``rows_per_shard``. Inside a shard, rows are sorted by a
seeded hash of (user, position): the shuffle. Spark writes one file per shard (partitioned
by the shard number); they are renamed ``<split>-00003-of-00008.parquet``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from preparation.config import PrepareConfig
from preparation.examples import KEY

SHARD, INDEX, MID = "_shard", "_index", "_mid"
ROW_BITS = 33  # monotonically_increasing_id: partition id << 33 | row within the partition


def shard_count(rows: int, config: PrepareConfig) -> int:
    if rows == 0:
        return 0
    n = -(-rows // config.rows_per_shard)
    return -(-n // config.shard_multiple) * config.shard_multiple


def write_shards(df: DataFrame, columns: list[str], split: str, stage: Path, scratch: Path,
                 config: PrepareConfig) -> list[dict]:
    """Write ``df`` (which must be persisted: its partitions are read twice and must not
    change) as the shards of ``split`` under ``stage``; their manifest entries."""
    numbered, rows = _dense_index(df)
    n = shard_count(rows, config)
    target = stage / split
    target.mkdir(parents=True)
    if n == 0:
        return []
    written = scratch / split
    (numbered.withColumn(SHARD, (F.col(INDEX) % n).cast("int"))
     .repartition(n, SHARD).sortWithinPartitions(SHARD, KEY)
     .select(*columns, SHARD).write.partitionBy(SHARD).parquet(str(written)))
    schema = pq.read_schema(next(written.glob(f"{SHARD}=*/*.parquet")))
    shards = [_move(written, target, split, k, n, schema) for k in range(n)]
    shutil.rmtree(written)
    return shards


def _dense_index(df: DataFrame) -> tuple[DataFrame, int]:
    """``df`` with INDEX: 0 … rows-1 in partition order; and the row count."""
    df = df.withColumn(MID, F.monotonically_increasing_id())
    partition = F.shiftright(F.col(MID), ROW_BITS).cast("int")
    counts = dict(df.groupBy(partition.alias("p")).count().collect())
    offsets, total = [], 0
    for p in range(max(counts, default=-1) + 1):
        offsets.append(total)
        total += counts.get(p, 0)
    if not offsets:
        return df.withColumn(INDEX, F.lit(0).cast("long")), 0
    offset = F.element_at(F.array(*[F.lit(o).cast("long") for o in offsets]), partition + 1)
    within = F.col(MID).bitwiseAND((1 << ROW_BITS) - 1)
    return df.withColumn(INDEX, offset + within), total


def _move(written: Path, target: Path, split: str, k: int, n: int, schema: pa.Schema) -> dict:
    path = target / f"{split}-{k:05d}-of-{n:05d}.parquet"
    files = sorted((written / f"{SHARD}={k}").glob("*.parquet"))
    if len(files) > 1:
        raise RuntimeError(f"shard {k} of {split} came out as {len(files)} files")
    if files:
        files[0].rename(path)
    else:  # fewer rows than shards: an empty shard keeps the count a multiple
        pq.write_table(pa.Table.from_batches([], schema), path)
    rows = pq.ParquetFile(path).metadata.num_rows
    return {"path": f"{split}/{path.name}", "rows": rows, "bytes": path.stat().st_size}

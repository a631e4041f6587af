"""The preparation job, step by step:

    read and check the tables (first bad row: file, row, column; duplicate ids; unknown items)
      → examples: window per user (position, history, hold-out), broadcast joins
      → statistics over train rows (one aggregation for counts, one for moments)
      → train shards, then valid/test shards with seen_items, then users/
      → vocabularies, item counts, manifest → atomic publish
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from contracts.dataset import table_columns
from contracts.errors import ConfigError, DataError
from contracts.prepared import SEEN_ITEMS, SPLITS, spec_fingerprint
from preparation.config import PrepareConfig
from preparation.examples import KNOWN, PART, build_examples, with_seen_items
from preparation.inputs import FILE, ROW, Inputs, check_rows, find_inputs, read_table, where
from preparation.publish import abandon, new_stage, publish
from preparation.session import spark_session
from preparation.shards import write_shards
from preparation.stats import compute_statistics, write_statistics
from preparation.users import write_users

log = logging.getLogger("two_tower")
BYTES_PER_PARTITION = 16 << 20


def prepare(data: str | Path, out: str | Path, config: PrepareConfig | None = None,
            spark: SparkSession | None = None) -> Path:
    """Prepare the canonical dataset ``data`` into ``out`` (which must not exist).

    ``spark``: a running session to use (left running); by default one is started from
    ``config`` (master, driver memory) with its scratch files under the staging directory.
    """
    out, config = Path(out), config or PrepareConfig()
    inputs = find_inputs(data)
    _refuse_sequences(inputs)
    stage = new_stage(out)
    try:
        with _session(config, stage / "_spark", inputs, spark) as session:
            manifest = _run(session, inputs, config, stage)
        shutil.rmtree(stage / "_spark", ignore_errors=True)
        published = publish(stage, out, manifest)
    except BaseException:
        abandon(stage)
        raise
    log.info("prepare: published %s (%d train, %d valid, %d test examples)", published,
             *(manifest["splits"][s]["rows"] for s in SPLITS))
    return published


def _refuse_sequences(inputs: Inputs) -> None:
    """The shards hold no item ages yet, so a sequence feature trains in memory only."""
    names = [f.name for f in inputs.spec.features if f.kind == "sequence"]
    if names:
        raise ConfigError(f"features {', '.join(names)}: prepare does not build sequence "
                          "features (their item ages) yet; train them in memory with "
                          "`two-tower train --data DIR --in-memory` (up to about 1M "
                          "interactions), or use kind = \"history\"")


@contextlib.contextmanager
def _session(config: PrepareConfig, workdir: Path, inputs: Inputs,
             spark: SparkSession | None) -> Iterator[SparkSession]:
    if spark is not None:
        yield spark
        return
    size = sum(p.stat().st_size for p in inputs.interactions)
    partitions = config.shuffle_partitions or max(4, min(2000, size // BYTES_PER_PARTITION))
    clock = _Clock()
    with spark_session(config, workdir, partitions) as session:
        clock(f"Spark started ({config.master}, {partitions} shuffle partitions)")
        yield session


def _run(spark: SparkSession, inputs: Inputs, config: PrepareConfig,
         stage: Path) -> dict[str, Any]:
    spec, clock = inputs.spec, _Clock()
    scratch = stage / "_spark" / "out"
    events, users, items = _read_checked(spark, inputs)
    clock("read and checked the tables")
    examples = build_examples(events, users, items, spec, config.seed).persist()
    _check_known_items(examples, inputs)
    train = examples.where(F.col(PART) == "train")
    stats = compute_statistics(train, items, spec, config.min_count)
    clock("examples (histories, hold-out, joins) and statistics")
    # the user id even when no feature uses it: hold-out sampling and user-level training
    # (training.user_level) key rows by it
    columns = list(dict.fromkeys([*(f.name for f in spec.features), spec.columns.user_id,
                                  spec.columns.timestamp]))
    splits = {"train": write_shards(train, columns, "train", stage, scratch, config)}
    clock("train shards")
    holdout = with_seen_items(examples.where(F.col(PART) != "train"), examples, spec,
                              config.max_seen_items).persist()
    for split in ("valid", "test"):
        part = holdout.where(F.col(PART) == split)
        splits[split] = write_shards(part, columns + [SEEN_ITEMS], split, stage, scratch,
                                     config)
    clock("valid and test shards (with seen_items)")
    n_users = write_users(examples, users, spec, config.history_length,
                          config.rows_per_shard, scratch, stage)
    clock(f"users/ ({n_users} users, last {config.history_length} items)")
    manifest = _manifest(inputs, config, splits)
    manifest.update(write_statistics(stats, stage))
    manifest["users"] = {"path": "users/", "rows": n_users,
                         "history_length": config.history_length}
    examples.unpersist()
    holdout.unpersist()
    return manifest


def _read_checked(spark: SparkSession, inputs: Inputs):
    """(events, users or None, items): typed, every row checked, ids unique."""
    spec, layout = inputs.spec, table_columns(inputs.spec)
    tables = {}
    for name, files in (("items", inputs.items), ("users", inputs.users),
                        ("interactions", inputs.interactions)):
        if not files:
            continue
        table = read_table(spark, files, layout[name], spec)
        check_rows(table, files, layout[name], spec)
        keep = [c if isinstance(c, str) else c.name for c in layout[name]]
        tables[name] = table.select(*keep, FILE, ROW) if name == "interactions" \
            else table.select(*keep)
    _check_unique(tables["items"], spec.columns.item_id, inputs, "items")
    if "users" in tables:
        _check_unique(tables["users"], spec.columns.user_id, inputs, "users")
    return tables["interactions"], tables.get("users"), tables["items"]


def _check_unique(table: DataFrame, column: str, inputs: Inputs, name: str) -> None:
    dup = table.groupBy(column).count().where(F.col("count") > 1).limit(1).collect()
    if dup:
        files = getattr(inputs, name)
        path = files[0] if len(files) == 1 else inputs.directory / name
        raise DataError(str(path), f"id {dup[0][column]!r} appears more than once",
                        column=column)


def _check_known_items(examples: DataFrame, inputs: Inputs) -> None:
    """Every interacted item must be in the catalogue: the item tower needs its features.
    """
    iid = inputs.spec.columns.item_id
    unknown = (examples.where(F.col(KNOWN).isNull()).orderBy(FILE, ROW)
               .select(FILE, ROW, iid).limit(1).collect())
    if unknown:
        row = unknown[0]
        path, line, prefix = where(inputs.interactions, examples, row)
        raise DataError(path, f"{prefix}item {row[iid]!r} is not in the items table",
                        line=line, column=iid)


def _manifest(inputs: Inputs, config: PrepareConfig,
              splits: dict[str, list[dict]]) -> dict[str, Any]:
    import pyspark

    def one(files: tuple[Path, ...], name: str) -> str | None:
        if not files:
            return None
        return str(files[0] if len(files) == 1 else inputs.directory / name)

    rows = {s: sum(x["rows"] for x in shards) for s, shards in splits.items()}
    return {
        "engine": f"pyspark {pyspark.__version__}",
        "spec_fingerprint": spec_fingerprint(inputs.spec),
        "spec": inputs.spec.to_dict(),
        "config": config.to_dict(),
        "source": {"interactions": [str(p) for p in inputs.interactions],
                   "users": one(inputs.users, "users"), "items": one(inputs.items, "items"),
                   "num_interactions": sum(rows.values())},
        "splits": {s: {"rows": rows[s], "shards": splits[s]} for s in SPLITS},
    }


class _Clock:
    """Logs each step with the seconds it took."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        log.info("prepare: %-56s %6.1f s", step, now - self.last)
        self.last = now


"""Vocabularies, numeric statistics and item counts over the train examples, as
training.model.compute_feature_stats computes them: vocabularies sorted (np.unique's
order), without ""; item-tower vocabularies also hold every catalogue value, derived
context its full range; numeric mean and population variance over finite values (0 and 1
when there are none). ``min_count`` drops rarer values of the other features. A hashed
feature (``hash_buckets``) has no vocabulary: its values are neither counted nor listed
(an id space too large to list costs nothing here), except the item id's counts, which
logQ and corpus sampling need."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from contracts.feature_spec import Feature, FeatureSpec
from contracts.inputs import PAD

DERIVED_RANGE = {"hour_of_day": 24, "day_of_week": 7}


@dataclass(frozen=True)
class Statistics:
    vocabularies: dict[str, list[str]]
    numeric: dict[str, dict[str, float]]   # feature → count, mean, variance
    item_counts: dict[str, int]            # item id → train examples


def compute_statistics(train: DataFrame, items: DataFrame, spec: FeatureSpec,
                       min_count: int) -> Statistics:
    counts = _value_counts(train, spec)
    catalogue = _catalogue(items, spec)
    vocab = {}
    for f in spec.features:
        if f.kind in ("numeric", "history") or f.hashed:
            continue
        if f.derive:
            vocab[f.name] = [str(v) for v in range(DERIVED_RANGE[f.derive])]
            continue
        seen = counts.get(f.name, {})
        floor = 1 if f.tower == "item" else min_count
        kept = {v for v, n in seen.items() if n >= floor} | catalogue.get(f.name, set())
        kept -= {PAD, None}  # a missing value ("" in examples, null in the catalogue)
        vocab[f.name] = sorted(kept)
    item_counts = counts.get(spec.columns.item_id, {})
    return Statistics(vocab, _moments(train, spec), item_counts)


def _counted(f: Feature, spec: FeatureSpec) -> bool:
    """Features whose train values are counted: the catalogue covers the other item
    features, derived context has a fixed range."""
    if f.name == spec.columns.item_id:
        return True  # item counts, hashed or not
    if f.kind not in ("categorical", "bag") or f.derive or f.hashed:
        return False
    return f.tower != "item"


def _value_counts(train: DataFrame, spec: FeatureSpec) -> dict[str, dict[str, int]]:
    """feature → value → count over train rows (bags: per element), in one aggregation."""
    pairs = []
    for f in spec.features:
        if not _counted(f, spec):
            continue
        if f.kind == "bag":
            pairs.append(F.transform(f.name, _tagged(f.name)))
        else:
            pairs.append(F.array(F.struct(F.lit(f.name).alias("f"),
                                          F.col(f.name).alias("v"))))
    if not pairs:
        return {}
    stacked = train.select(F.explode(F.concat(*pairs)).alias("p")).select("p.f", "p.v")
    counts: dict[str, dict[str, int]] = {}
    for row in stacked.groupBy("f", "v").count().toLocalIterator():
        counts.setdefault(row["f"], {})[row["v"]] = row["count"]
    return counts


def _tagged(name: str):
    """element → (name, element). A one-argument function: F.transform passes a lambda of
    two arguments the element's index as the second (``lambda v, n=name`` would tag each
    element with its position)."""
    return lambda v: F.struct(F.lit(name).alias("f"), v.alias("v"))


def _catalogue(items: DataFrame, spec: FeatureSpec) -> dict[str, set[str]]:
    """Every value of every item-tower categorical or bag feature in the items table."""
    out = {}
    for f in spec.tower("item"):
        if f.hashed:
            continue
        if f.kind == "categorical":
            column = items.select(F.col(f.name).alias("v"))
        elif f.kind == "bag":
            column = items.select(F.explode(f.name).alias("v"))
        else:
            continue
        out[f.name] = {r["v"] for r in column.distinct().toLocalIterator()}
    return out


def _moments(train: DataFrame, spec: FeatureSpec) -> dict[str, dict[str, float]]:
    names = [f.name for f in spec.features if f.kind == "numeric"]
    if not names:
        return {}
    aggs = []
    for n in names:
        x = F.when(~F.isnan(n), F.col(n).cast("double"))
        aggs += [F.count(x), F.avg(x), F.var_pop(x)]
    row = train.agg(*aggs).collect()[0]
    out = {}
    for i, n in enumerate(names):
        count = row[3 * i]
        out[n] = {"count": count, "mean": row[3 * i + 1] if count else 0.0,
                  "variance": row[3 * i + 2] if count else 1.0}
    return out


def write_statistics(stats: Statistics, stage: Path) -> dict[str, Any]:
    """vocab/<feature>.txt and item_counts.parquet (item_id, count) under ``stage``; their
    manifest entries."""
    (stage / "vocab").mkdir(parents=True, exist_ok=True)
    vocabularies = {}
    for name, values in stats.vocabularies.items():
        (stage / "vocab" / f"{name}.txt").write_text("".join(v + "\n" for v in values),
                                                     encoding="utf-8")
        vocabularies[name] = {"path": f"vocab/{name}.txt", "size": len(values)}
    ids = sorted(stats.item_counts)
    table = pa.table({"item_id": pa.array(ids, pa.string()),
                      "count": pa.array([stats.item_counts[i] for i in ids], pa.int64())})
    pq.write_table(table, stage / "item_counts.parquet")
    return {"vocabularies": vocabularies, "statistics": stats.numeric,
            "item_counts": {"path": "item_counts.parquet", "items": len(ids),
                            "examples": int(sum(stats.item_counts.values()))}}

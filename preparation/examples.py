"""One example per interaction, as contracts.inputs.training_examples builds it, split as
training.protocols.temporal_leave_one_out splits it — with Spark's window functions.

Per user, events are ordered by (timestamp, file, row). An event's history is the items of
the user's events strictly before it, most recent first, at most ``max_length`` of them
(a bounded window frame: a user with millions of events costs no more per row). The last
event of a user with >= 2 events is test, the second-last of a user with >= 3 is valid,
every other is train. Hold-out rows also carry SEEN_ITEMS: the items the user had before,
the latest ``max_seen`` of them (a user with millions of events would otherwise make one
straggling task and one huge row).
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from contracts.feature_spec import Feature, FeatureSpec
from contracts.inputs import EPOCH_WEEKDAY, PAD, SECONDS_PER_DAY, SECONDS_PER_HOUR
from contracts.prepared import SEEN_ITEMS
from preparation.inputs import FILE, ROW

POS, SIZE, PART, KEY, KNOWN = "_pos", "_size", "_part", "_key", "_known"


def build_examples(events: DataFrame, users: DataFrame | None, items: DataFrame,
                   spec: FeatureSpec, seed: int) -> DataFrame:
    """Every interaction as an example: the spec's features, the timestamp, PART (train,
    valid, test), POS and SIZE (the event's place among the user's), FILE/ROW, KNOWN (null
    when the item is not in the items table) and KEY (a seeded hash: the shuffle order)."""
    cols = spec.columns
    uid, iid, ts = cols.user_id, cols.item_id, cols.timestamp
    ordered = Window.partitionBy(uid).orderBy(ts, FILE, ROW)
    df = (events.withColumn(POS, F.row_number().over(ordered) - 1)
          .withColumn(SIZE, F.count(F.lit(1)).over(Window.partitionBy(uid))))
    for f in spec.features:
        if f.kind == "history":
            frame = ordered.rowsBetween(-f.max_length, -1)
            df = df.withColumn(f.name, F.reverse(F.collect_list(iid).over(frame)))
    df = df.withColumn(PART, _part(F.col(SIZE) - 1 - F.col(POS), F.col(SIZE)))
    if users is not None:
        df = df.join(F.broadcast(users), uid, "left")
    df = df.join(F.broadcast(items.withColumn(KNOWN, F.lit(True))), iid, "left")
    features = [_feature(f, ts).alias(f.name) for f in spec.features]
    if uid not in {f.name for f in spec.features}:  # a history-as-user spec: the id is no
        features.append(F.col(uid).cast("string").alias(uid))  # feature, still the user's key
    key = F.xxhash64(F.lit(seed), F.col(uid), F.col(POS)).alias(KEY)
    return df.select(*features, F.col(ts), PART, POS, SIZE, FILE, ROW, KNOWN, key)


def _part(from_end: Column, size: Column) -> Column:
    return (F.when((from_end == 0) & (size >= 2), "test")
            .when((from_end == 1) & (size >= 3), "valid").otherwise("train"))


def _feature(f: Feature, ts: str) -> Column:
    """A feature's column as training_examples has it; unknown users' features are missing
    ("" / NaN / empty)."""
    c = F.col(f.name)
    if f.derive == "hour_of_day":
        return F.pmod(F.floor(F.col(ts) / SECONDS_PER_HOUR), F.lit(24)).cast("string")
    if f.derive == "day_of_week":
        days = F.floor(F.col(ts) / SECONDS_PER_DAY) + EPOCH_WEEKDAY
        return F.pmod(days, F.lit(7)).cast("string")
    if f.kind == "numeric":
        return F.coalesce(c.cast("float"), F.lit(float("nan")).cast("float"))
    if f.is_sequence:
        return F.coalesce(c, F.array().cast("array<string>"))
    return F.coalesce(c.cast("string"), F.lit(PAD))


def with_seen_items(holdout: DataFrame, examples: DataFrame, spec: FeatureSpec,
                    max_seen: int) -> DataFrame:
    """Hold-out rows with SEEN_ITEMS: the user's items before the event, oldest first, the
    latest ``max_seen`` of them. Hold-out events are a user's last two, so only the user's
    last ``max_seen`` + 2 events are gathered: a list per user bounded whatever its size."""
    uid, iid = spec.columns.user_id, spec.columns.item_id
    held_users = holdout.select(uid).distinct()
    recent = examples.where(F.col(POS) >= F.col(SIZE) - 2 - max_seen)
    events = (recent.join(held_users, uid, "left_semi").groupBy(uid)
              .agg(F.sort_array(F.collect_list(F.struct(POS, iid))).alias("_events")))
    before = F.filter("_events", lambda e: (e[POS] < F.col(POS))
                      & (e[POS] >= F.col(POS) - max_seen))
    seen = F.transform(before, lambda e: e[iid])
    return holdout.join(events, uid).withColumn(SEEN_ITEMS, seen).drop("_events")

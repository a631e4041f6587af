"""Held-out evaluation from prepared shards: every item ranked for a seeded sample of users.

The prepared valid and test splits hold one row per user (temporal leave-one-out): the
event's features (history and context from before it), its item (the one relevant item)
and ``seen_items`` (every earlier item of the user, masked from the ranking as the
in-memory protocol masks train, and for test train + valid, items). A pass over a split's
shards keeps the ``users`` rows whose user id has the smallest seeded hash, so the sample is
uniform, the same for a seed whatever the shard order, and memory is bounded by the sample
(plus one record batch). Ranking and metrics are training.metrics' (``evaluate_ranking``
in chunks of users, every item scored); with every user sampled the figures are those of
training.pipeline's in-memory evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from contracts.errors import DataError
from contracts.prepared import SEEN_ITEMS, PreparedManifest
from training.metrics import KS, RankingMetrics, UserItems, evaluate_ranking, popularity_scorer
from training.shards import READ_ROWS, arrow_inputs
from training.tf_env import tf

DEFAULT_USERS = 10_000
_HASH_BUCKETS = (1 << 63) - 1


@dataclass(frozen=True)
class HoldoutSample:
    """``inputs``: the user-tower inputs of the sampled rows [n]; ``targets`` int64 [n] the
    held-out item's row in the catalogue; ``seen``: the item rows masked, per row;
    ``held_out``: rows (users) the split has; ``seed`` of the sample."""

    stage: str
    inputs: dict[str, np.ndarray]
    targets: np.ndarray
    seen: UserItems
    held_out: int
    seed: int

    @property
    def n_users(self) -> int:
        return len(self.targets)

    def describe(self) -> dict[str, int]:
        return {"sampled_users": self.n_users, "held_out_users": self.held_out,
                "sample_seed": self.seed}


def sample_holdout(manifest: PreparedManifest, stage: str, item_ids: np.ndarray,
                   users: int = DEFAULT_USERS, seed: int = 0,
                   read_rows: int = READ_ROWS) -> HoldoutSample:
    """Read ``users`` rows (users) of hold-out split ``stage`` (all when it has fewer);
    item_ids [n_items] is the catalogue in item-embedding order."""
    if users < 1:
        raise ValueError(f"users must be >= 1 (got {users})")
    spec = manifest.spec
    kept = _sampled_rows(manifest, stage, users, seed, read_rows)
    rows_of = _item_rows(item_ids)
    where = f"{stage} split of {manifest.path}"
    targets = rows_of(kept.column(spec.columns.item_id).to_pylist(), where)
    seen_lists = kept.column(SEEN_ITEMS).to_pylist()
    seen = UserItems.from_lists([rows_of(items or [], where) for items in seen_lists])
    inputs = arrow_inputs(kept, spec, spec.user_input_features)
    return HoldoutSample(stage, inputs, targets, seen, manifest.splits[stage].rows, seed)


def holdout_metrics(user_emb: np.ndarray, item_emb: np.ndarray, sample: HoldoutSample,
                    ks: Sequence[int] = KS) -> RankingMetrics:
    """The model's metrics on the sample: user_emb [n, d] of the sample's rows, item_emb
    [n_items, d] in catalogue order; scores are computed a chunk of users at a time."""
    return evaluate_ranking(lambda rows: user_emb[rows] @ item_emb.T, _relevant(sample),
                            sample.seen, ks)


def popularity_metrics(item_counts: np.ndarray, sample: HoldoutSample,
                       ks: Sequence[int] = KS) -> RankingMetrics:
    """Items ranked by their train count [n_items] (training.protocols.popularity_ranking),
    on the same sample."""
    return evaluate_ranking(popularity_scorer(np.asarray(item_counts, np.float64)),
                            _relevant(sample), sample.seen, ks)


def _relevant(sample: HoldoutSample) -> UserItems:
    return UserItems(np.arange(sample.n_users + 1), sample.targets)


def _sampled_rows(manifest: PreparedManifest, stage: str, users: int, seed: int,
                  read_rows: int) -> pa.Table:
    """The rows of the ``users`` smallest seeded user-id hashes, in hash order."""
    spec = manifest.spec
    columns = [f.name for f in spec.user_input_features] + [spec.columns.user_id,
                                                             spec.columns.item_id, SEEN_ITEMS]
    columns = list(dict.fromkeys(columns))
    kept, kept_hash = None, np.empty(0, np.int64)
    for shard in manifest.splits[stage].shards:
        with pq.ParquetFile(shard.path) as reader:
            for batch in reader.iter_batches(batch_size=read_rows, columns=columns):
                table = pa.Table.from_batches([batch])
                hashes = _user_hash(table.column(spec.columns.user_id), seed)
                kept = table if kept is None else pa.concat_tables([kept, table])
                kept_hash = np.concatenate([kept_hash, hashes])
                if len(kept_hash) > users:
                    keep = np.argpartition(kept_hash, users - 1)[:users]
                    kept, kept_hash = kept.take(keep), kept_hash[keep]
    if kept is None:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return kept.take(np.argsort(kept_hash, kind="stable"))


def _user_hash(user_ids: pa.ChunkedArray, seed: int) -> np.ndarray:
    """int64 [n]: a keyed (SipHash) hash of each user id, the key drawn from ``seed``."""
    strings = tf.constant(np.asarray(user_ids.to_pylist(), dtype=object).astype(str))
    key = [int(seed) & 0x7FFFFFFF, 0x5EED]
    return tf.strings.to_hash_bucket_strong(strings, _HASH_BUCKETS, key).numpy()


def _item_rows(item_ids: np.ndarray):
    """A function: item ids → int64 rows in ``item_ids``; an unknown id is a DataError."""
    lookup = {str(item): row for row, item in enumerate(np.asarray(item_ids).tolist())}

    def rows(keys: Sequence[str], where: str) -> np.ndarray:
        try:
            return np.fromiter((lookup[str(k)] for k in keys), np.int64, count=len(keys))
        except KeyError as exc:
            raise DataError(where, f"item {exc.args[0]!r} is not in the items table") from None

    return rows


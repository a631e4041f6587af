"""`prepare`: the canonical dataset → prepared examples, on Apache Spark (preparation/)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("two_tower")


def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="prepare training examples with Apache Spark "
                       "(shards, hold-out, vocabularies, users/)")
    p.add_argument("--data", type=Path, required=True, help="canonical dataset directory")
    p.add_argument("--out", type=Path, required=True,
                   help="prepared directory to create (must not exist)")
    p.add_argument("--rows-per-shard", type=int, default=100_000,
                   help="upper bound on the rows of a shard")
    p.add_argument("--min-count", type=int, default=1,
                   help="vocabularies keep values seen at least this often in train "
                        "(item-tower features keep the whole catalogue)")
    p.add_argument("--history-length", type=int, default=20,
                   help="items per user in users/ (what load-features stores)")
    p.add_argument("--max-seen-items", type=int, default=10_000,
                   help="hold-out rows keep the user's latest N earlier items as seen_items "
                        "(masked in evaluation); bounds a heavy user's row")
    p.add_argument("--seed", type=int, default=0, help="seed of the training shuffle")
    p.add_argument("--master", default="local[*]",
                   help="Spark master URL (local[*]: this machine, every core)")
    p.add_argument("--driver-memory", default="4g", help="Spark driver memory (JVM size)")
    p.set_defaults(run=_prepare)


def _prepare(args) -> None:
    from preparation import PrepareConfig, prepare

    config = PrepareConfig(rows_per_shard=args.rows_per_shard, min_count=args.min_count,
                           history_length=args.history_length,
                           max_seen_items=args.max_seen_items, seed=args.seed,
                           master=args.master, driver_memory=args.driver_memory)
    prepare(args.data, args.out, config)

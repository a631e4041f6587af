"""`generate` and `convert-movielens`: write a canonical dataset."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("two_tower")


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="write the seeded synthetic dataset")
    p.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--interactions-per-user", type=int, default=30)
    p.add_argument("--clusters", type=int, default=10,
                   help="taste clusters (users watch within theirs; items belong to one)")
    p.add_argument("--content-dims", type=int, default=0,
                   help="dense numeric content features per item (content0 …): cold items "
                        "then differ by their features, as in a real catalogue")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    p.set_defaults(run=_generate)


def add_convert(sub) -> None:
    p = sub.add_parser("convert-movielens",
                       help="MovieLens 100K / 1M / \"latest\"-format → canonical dataset")
    p.add_argument("--kind", choices=("ml-100k", "ml-1m", "ml-latest"), required=True,
                   help="ml-latest: any release of ratings.csv + movies.csv (ml-latest, "
                        "ml-latest-small, ml-20m, ml-25m, ml-32m)")
    p.add_argument("--source", type=Path, required=True, help="folder of the raw files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    p.set_defaults(run=_convert)


def _generate(args) -> None:
    from contracts.dataset import write_dataset
    from training.synthetic import SyntheticConfig, generate_synthetic

    dataset, spec_toml = generate_synthetic(SyntheticConfig(
        num_users=args.users, num_items=args.items,
        num_clusters=args.clusters,
        interactions_per_user=args.interactions_per_user, seed=args.seed,
        content_dims=args.content_dims))
    write_dataset(dataset, args.out, spec_toml, args.format)
    log.info("wrote %d interactions, %d users, %d items to %s", dataset.num_interactions,
             args.users, args.items, args.out)

def _convert(args) -> None:
    from training.movielens import main_convert

    main_convert(args.kind, str(args.source), str(args.out), args.format)

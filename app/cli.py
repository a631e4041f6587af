"""The ``two-tower`` command: one subcommand per job, each a thin call into its stage."""

from __future__ import annotations

import argparse
import logging
import sys

from app.commands import data, demo, index, prepare, serve, train
from app.quiet import VERBOSE_ENV, quiet_start
from contracts.errors import TwoTowerError
from retrieval.logs import configure_logging

log = logging.getLogger("two_tower")

# (module, its parser adders) in the order `two-tower --help` lists them
_COMMANDS = (
    (data, (data.add_generate, data.add_convert)),
    (prepare, (prepare.add_prepare,)),
    (train, (train.add_train,)),
    (index, (index.add_build_index, index.add_update_index, index.add_rollback)),
    (serve, (serve.add_serve, serve.add_load_features, serve.add_query)),
    (demo, (demo.add_demo,)),
)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format)
    quiet_start(args.verbose)  # before any command imports TensorFlow or faiss
    try:
        return args.run(args) or 0
    except (TwoTowerError, ValueError, OSError) as exc:
        print(f"two-tower {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="two-tower", description=__doc__)
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="json: one JSON object per log line (before the subcommand)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="keep what TensorFlow, CUDA and faiss log while loading (quiet "
                             f"by default; also {VERBOSE_ENV}=1; before the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True)
    for _, adders in _COMMANDS:
        for add in adders:
            add(sub)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())

"""`train`: train the two towers and write a model artifact.

From prepared shards (``--prepared``, streamed), or from a dataset (``--data``). A small
dataset (single files up to 64 MiB, at most 1M interactions) is trained on arrays in memory:
the examples are those preparation would write (tests/test_preparation.py pins it) without
starting Spark. A larger one is prepared in-process first (preparation.prepare, into a
temporary directory or ``--prepared-dir``), then streamed. ``--in-memory`` and
``--streamed`` force either path; several workers given ``--data`` train in memory (each
would prepare its own copy).

By default training stops early on validation NDCG@10 (patience 2, at most 30 epochs) and
keeps the best epoch; then a final fit trains again on every event, the held-out ones
included, for that many epochs, and that model is exported (``--no-final-fit``: the
evaluated one). The input is checked before TensorFlow loads. docs/training.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import tempfile
from pathlib import Path

log = logging.getLogger("two_tower")
MAX_EPOCHS, PATIENCE = 30, 2  # early stopping on validation, the default
NO_EVAL_EPOCHS = 5            # no validation to stop on: a fixed count
PRECHECK_BYTES = 64 << 20     # --data tables up to this size are read whole before Spark
IN_MEMORY_INTERACTIONS = 1_000_000  # --data up to this many is trained in memory (~2.5 GB)


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train the two towers and write a model artifact")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path,
                        help="dataset directory (small: trained in memory; large: prepared, "
                             "then streamed)")
    source.add_argument("--prepared", type=Path,
                        help="prepared examples (two-tower prepare), streamed from the shards")
    p.add_argument("--prepared-dir", type=Path,
                   help="with --data: keep the prepared examples here (must not exist)")
    path = p.add_mutually_exclusive_group()
    path.add_argument("--in-memory", action="store_true",
                      help="with --data: train on arrays in memory, without preparing")
    path.add_argument("--streamed", action="store_true",
                      help=f"with --data: prepare (Spark) and stream, even below "
                           f"{IN_MEMORY_INTERACTIONS:,} interactions")
    p.add_argument("--eval-users", type=int, default=10_000,
                   help="streamed evaluation: users sampled (seeded by --seed) from each "
                        "hold-out split, every item ranked for each")
    p.add_argument("--out", type=Path, required=True, help="model store; a version dir is added")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-epochs", type=int,
                        help=f"most epochs with early stopping on validation NDCG@10 (the "
                             f"default, {MAX_EPOCHS}); the best epoch's weights are kept")
    budget.add_argument("--epochs", type=int,
                        help=f"exactly this many epochs, no early stopping (unless "
                             f"--early-stopping-patience is given: then the most); "
                             f"{NO_EVAL_EPOCHS} by default with --no-eval")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--optimizer", choices=("auto", "adam", "lazy-adam"), default="auto",
                   help="lazy-adam: update only the embedding rows a batch touched (much "
                        "faster with large vocabularies); auto: lazy-adam when an embedding "
                        "table has 100,000 rows or more, else adam (docs/training.md)")
    p.add_argument("--learning-rate-schedule", choices=("constant", "cosine"),
                   default="constant", help="cosine: decay to 0 over all epochs")
    p.add_argument("--embedding-dim", type=int, default=32)
    p.add_argument("--hidden-dims", default="64", help="comma-separated MLP widths; '' = none")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="L2-normalise tower outputs (scores are cosines); "
                        "--no-normalize trains raw inner products")
    p.add_argument("--history-dropout", type=float, default=0.0,
                   help="share of history items dropped per example, in training only")
    p.add_argument("--history-pooling", choices=("mean", "normalized_sum"), default="mean",
                   help="history bag: mean, or sum / sqrt(n) (L2-normalised multi-hot)")
    p.add_argument("--history-table", choices=("shared", "own"), default="shared",
                   help="history embeddings: the item-id table, or one of its own")
    p.add_argument("--history-activation", choices=("linear", "tanh"), default="linear",
                   help="applied to the pooled history")
    p.add_argument("--output-layer", action=argparse.BooleanOptionalAction, default=True,
                   help="a Dense layer to --embedding-dim on top of the towers; without it "
                        "(and --hidden-dims '') the encodings are the embedding")
    p.add_argument("--examples", choices=("events", "users"), default="events",
                   help="events: one example per interaction (sampled softmax); users: one "
                        "per user, their items as a multi-label softmax target (no context "
                        "features)")
    p.add_argument("--linear-rank", type=int, default=0,
                   help="with --examples users: serve a closed-form rank-R linear model "
                        "(ridge-shrunk SVD of the interactions) beside the towers, adding R "
                        "to the served dimension; 0 = none (docs/training.md)")
    p.add_argument("--linear-l2", type=float, default=3000.0,
                   help="the linear part's shrinkage λ: s^2 / (s^2 + λ) per direction")
    p.add_argument("--linear-weight", type=float, default=0.75,
                   help="the linear part's weight beside the towers' cosine (1: a typical "
                        "user's best linear score weighs as much as a perfect cosine)")
    p.add_argument("--embedding-l2", type=float, default=0.0,
                   help="L2 penalty on the embedding tables")
    p.add_argument("--logq", choices=("none", "exact", "streaming"), default="exact",
                   help="sampling-bias correction of the softmax")
    p.add_argument("--corpus-negatives", type=int, default=0,
                   help="extra negatives per batch drawn from the whole catalogue")
    p.add_argument("--corpus-distribution", choices=("uniform", "unigram", "full"),
                   default="unigram",
                   help="how corpus negatives are drawn; full = every item in every batch "
                        "(with --corpus-negatives 0)")
    p.add_argument("--temperature", type=float, default=0.05,
                   help="logits are scores / T (use about 1 with --no-normalize)")
    p.add_argument("--hard-negatives", type=int, default=0, help="0 = every negative counts")
    p.add_argument("--keep-accidental-hits", action="store_true",
                   help="do not mask negatives equal to the positive")
    p.add_argument("--checkpoint-dir", help="save each epoch here and resume from it "
                   "(streamed: also every --checkpoint-every-steps, resumed mid-epoch)")
    p.add_argument("--checkpoint-every-steps", type=int, default=1000,
                   help="streamed training with --checkpoint-dir: steps between checkpoints")
    p.add_argument("--tensorboard-dir", help="write TensorBoard logs here")
    p.add_argument("--early-stopping-patience", type=int,
                   help=f"stop after this many epochs without validation NDCG@10 gain "
                        f"(default {PATIENCE}; 0 = off, every --max-epochs trained)")
    p.add_argument("--final-fit", action=argparse.BooleanOptionalAction, default=True,
                   help="after evaluation, train again on every event (the held-out last "
                        "two per user included) for the epochs kept, and export that; "
                        "--no-final-fit exports the evaluated train-split model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eval", action="store_true",
                   help="train on every interaction; skip the held-out evaluation")
    p.set_defaults(run=_train)


def _train(args) -> None:
    epochs, patience = _schedule(args)
    source = _checked_source(args)  # before TensorFlow loads (training.model imports it)
    from training.linear_part import LinearConfig
    from training.model import LossConfig, TowerConfig
    from training.train import TrainConfig

    hidden = tuple(int(w) for w in args.hidden_dims.split(",") if w.strip())
    config = TrainConfig(
        tower=TowerConfig(embedding_dim=args.embedding_dim, hidden_dims=hidden,
                          normalize=args.normalize, history_dropout=args.history_dropout,
                          embedding_l2=args.embedding_l2, output_layer=args.output_layer,
                          history_pooling=args.history_pooling,
                          history_table=args.history_table,
                          history_activation=args.history_activation),
        loss=LossConfig(logq=args.logq, corpus_negatives=args.corpus_negatives,
                        corpus_distribution=args.corpus_distribution,
                        temperature=args.temperature, hard_negatives=args.hard_negatives,
                        remove_accidental_hits=not args.keep_accidental_hits),
        epochs=epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        learning_rate_schedule=args.learning_rate_schedule, optimizer=args.optimizer,
        seed=args.seed, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every_steps=args.checkpoint_every_steps, tensorboard_dir=args.tensorboard_dir,
        early_stopping_patience=patience, examples=args.examples,
        linear=LinearConfig(args.linear_rank, args.linear_l2, args.linear_weight))
    path = _run(args, config, source)
    print(path)


def _schedule(args) -> tuple[int, int]:
    """(epochs, early-stopping patience) from --max-epochs, --epochs, --early-stopping-patience."""
    patience = args.early_stopping_patience
    if patience is not None and patience < 0:
        raise ValueError(f"--early-stopping-patience must be >= 0 (got {patience})")
    if args.epochs is not None:
        return args.epochs, patience or 0
    if args.no_eval:
        if args.max_epochs is not None:
            raise ValueError("--max-epochs is early stopping's budget, which needs the "
                             "validation that --no-eval skips: give --epochs N instead")
        return NO_EVAL_EPOCHS, 0
    return args.max_epochs or MAX_EPOCHS, PATIENCE if patience is None else patience


def _checked_source(args):
    """The input, checked before TensorFlow is imported so that a data error is reported in
    well under a second: the prepared manifest (``--prepared``), the dataset read whole
    (``--data`` in memory), or the ``--data`` directory, checked (_check_before_preparing)."""
    if args.eval_users < 1:
        raise ValueError(f"--eval-users must be >= 1 (got {args.eval_users})")
    if args.prepared is not None:
        if args.prepared_dir or args.in_memory or args.streamed:
            raise ValueError("--prepared-dir, --in-memory and --streamed go with --data, "
                             "not --prepared")
        from contracts.prepared import load_prepared

        return load_prepared(args.prepared)
    from contracts.dataset import load_dataset

    if args.in_memory or not _streams():
        return load_dataset(args.data)
    small = _check_before_preparing(args.data)
    if small is not None and not args.streamed and args.prepared_dir is None \
            and small.num_interactions <= IN_MEMORY_INTERACTIONS:
        log.info("train: %s interactions: trained in memory (the examples preparation would "
                 "write; --streamed prepares and streams them)", f"{small.num_interactions:,}")
        return small
    return args.data


def _run(args, config, source) -> Path:
    from contracts.dataset import Dataset
    from training.pipeline import run_training, run_training_from_prepared

    evaluate, final_fit = not args.no_eval, args.final_fit and not args.no_eval
    if isinstance(source, Dataset):
        return run_training(source, args.out, config, evaluate=evaluate,
                            final_fit=final_fit)[0]

    def streamed(prepared: Path) -> Path:
        return run_training_from_prepared(prepared, args.out, config, evaluate,
                                          args.eval_users, final_fit=final_fit)[0]

    if args.prepared is not None:
        return streamed(args.prepared)
    from preparation import prepare

    if args.prepared_dir is not None:
        return streamed(prepare(args.data, args.prepared_dir))
    with tempfile.TemporaryDirectory(prefix="two-tower-prepared-") as scratch:
        return streamed(prepare(args.data, Path(scratch) / "prepared"))


def _check_before_preparing(data: Path):
    """Tables of single files up to PRECHECK_BYTES in all are read and checked as the
    in-memory path reads them (about a second), so that a bad cell is named before Spark
    starts, and returned; larger ones, or tables in folders, are checked by the preparation
    job (which runs before TensorFlow loads, too): None."""
    from contracts.dataset import load_dataset

    entries = list(data.glob("*")) if data.is_dir() else []
    if any(p.is_dir() and p.name in ("interactions", "users", "items") for p in entries):
        return None
    tables = [p for p in entries if p.suffix in (".csv", ".parquet") and p.is_file()]
    if sum(p.stat().st_size for p in tables) <= PRECHECK_BYTES:
        return load_dataset(data)
    return None


def _streams() -> bool:
    """Whether ``--data`` is prepared and streamed (else trained in memory, said in the log)."""
    from training.distributed import worker_role

    if worker_role().num_workers > 1:
        log.info("train: several workers with --data train in memory (each would prepare "
                 "its own copy); prepare once with `two-tower prepare` and pass --prepared "
                 "to stream")
        return False
    if importlib.util.find_spec("preparation") is None or \
            importlib.util.find_spec("pyspark") is None:
        log.info("train: the preparation job is not installed (pip install "
                 "'two-tower-retrieval[prepare]'); training in memory")
        return False
    return True

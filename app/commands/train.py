"""`train`: train the two towers and write a model artifact."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train the two towers and write a model artifact")
    p.add_argument("--data", type=Path, required=True, help="dataset directory")
    p.add_argument("--out", type=Path, required=True, help="model store; a version dir is added")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--learning-rate-schedule", choices=("constant", "cosine"),
                   default="constant", help="cosine: decay to 0 over all epochs")
    p.add_argument("--embedding-dim", type=int, default=32)
    p.add_argument("--hidden-dims", default="64", help="comma-separated MLP widths; '' = none")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="L2-normalise tower outputs (scores are cosines); "
                        "--no-normalize trains raw inner products")
    p.add_argument("--history-dropout", type=float, default=0.0,
                   help="share of history items dropped per example, in training only")
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
    p.add_argument("--checkpoint-dir", help="save each epoch here and resume from it")
    p.add_argument("--tensorboard-dir", help="write TensorBoard logs here")
    p.add_argument("--early-stopping-patience", type=int, default=0,
                   help="stop after this many epochs without validation NDCG@10 gain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eval", action="store_true",
                   help="train on every interaction; skip the held-out evaluation")
    p.set_defaults(run=_train)


def _train(args) -> None:
    from contracts.dataset import load_dataset
    from training.model import LossConfig, TowerConfig
    from training.pipeline import run_training
    from training.train import TrainConfig

    hidden = tuple(int(w) for w in args.hidden_dims.split(",") if w.strip())
    config = TrainConfig(
        tower=TowerConfig(embedding_dim=args.embedding_dim, hidden_dims=hidden,
                          normalize=args.normalize, history_dropout=args.history_dropout,
                          embedding_l2=args.embedding_l2),
        loss=LossConfig(logq=args.logq, corpus_negatives=args.corpus_negatives,
                        corpus_distribution=args.corpus_distribution,
                        temperature=args.temperature, hard_negatives=args.hard_negatives,
                        remove_accidental_hits=not args.keep_accidental_hits),
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        learning_rate_schedule=args.learning_rate_schedule,
        seed=args.seed, checkpoint_dir=args.checkpoint_dir, tensorboard_dir=args.tensorboard_dir,
        early_stopping_patience=args.early_stopping_patience)
    path, _ = run_training(load_dataset(args.data), args.out, config, evaluate=not args.no_eval)
    print(path)

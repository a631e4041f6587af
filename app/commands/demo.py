"""`demo`: generate → train → index → serve → query, end to end."""

from __future__ import annotations

from pathlib import Path


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="generate → train → index → serve → query, end to end")
    p.add_argument("--workdir", type=Path, default=Path("demo-run"))
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=5)
    p.set_defaults(run=_demo)


def _demo(args) -> int:
    from app.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(workdir=args.workdir, users=args.users, items=args.items,
                               epochs=args.epochs))

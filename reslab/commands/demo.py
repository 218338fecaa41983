"""``reslab demo [--out DIR]``: offline, about a minute on two quiet CPU cores (see README)."""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="offline demo: a ResNet and its plain twin on digits -> report.md",
                              description="Train cifar_resnet20 and cifar_plain20 on scikit-learn's digits "
                                          "(offline), evaluate both and write DIR/report.md with training curves.")
    p.add_argument("--out", default="reslab_demo", help="output directory (default reslab_demo)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per model (default: the demo's setting)")
    p.add_argument("--force", action="store_true", help="reuse a non-empty --out (its demo files are replaced)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (default: bars on a terminal, a line per phase and epoch otherwise)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from reslab.report.demo import run_demo

    res = run_demo(args.out, epochs=args.epochs, force=args.force, progress=not args.no_progress)
    for label, r in res["models"].items():
        print(f"{label:>14}: test top1 {r['top1']:.4f}  loss {r['loss']:.4f}  ({r['train_seconds']:.0f} s)")
    print(f"report: {res['report']}  (wall time {res['seconds']['total']:.0f} s)")
    return 0

"""``reslab eval RUN_DIR|CHECKPOINT [--json]``: accuracy of a trained model."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate a run's best/last checkpoint or a .safetensors file",
                              description="Rebuild the model from the checkpoint's metadata and evaluate it on "
                                          "the run's evaluation set (from the config stored in the checkpoint).")
    p.add_argument("path", help="run directory, checkpoint (.safetensors) or pretrained MODEL:TAG")
    p.add_argument("--which", choices=("best", "last"), default="best", help="for a run directory (default best)")
    p.add_argument("--data-dir", help="where the data lives, if not where the run had it")
    p.add_argument("--tta", choices=("none", "flip", "flip-translate"), help="test-time augmentation (default: the run's eval.tta)")
    p.add_argument("--batch-size", type=int, help="evaluation batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true", help='print one JSON object {"top1": ..., "loss": ..., ...}')
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from reslab.train import evaluate_checkpoint

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    res = evaluate_checkpoint(args.path, which=args.which, data_dir=args.data_dir, tta=args.tta,
                              batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps(res))
    else:
        extra = f" (single view {res['top1_single']:.4f})" if "top1_single" in res else ""
        print(f"{res['model']} step {res['step']} on {res['data']} ({res['n']} images, tta {res['tta']}): "
              f"top1 {res['top1']:.4f}{extra}, loss {res['loss']:.4f}  [{res['checkpoint']}]")
    return 0

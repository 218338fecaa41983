"""``reslab train CONFIG | --model M --data D [...] --out RUN_DIR [--resume]``."""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train a model (a YAML recipe or --model/--data); torchrun for several processes",
        description="Train a model into a run directory. Recipes live in configs/; --set changes any field "
                    "(e.g. --set train.epochs=10 --set model.kwargs.dropout=0.3). Under torchrun every process "
                    "runs this command; rank 0 writes the run directory.")
    p.add_argument("config", nargs="?", help="YAML config (configs/*.yaml); omit with --model/--data or --resume")
    p.add_argument("--model", help="model name (sets model.name)")
    p.add_argument("--data", help="data set: cifar10, cifar100, digits, folder, synthetic (sets data.name)")
    p.add_argument("--data-dir", help="where the data lives (sets data.data_dir)")
    p.add_argument("--epochs", type=int, help="sets train.epochs")
    p.add_argument("--batch-size", type=int, help="global batch size (sets train.batch_size)")
    p.add_argument("--lr", type=float, help="sets optim.lr")
    p.add_argument("--seed", type=int, help="sets train.seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (dotted key, YAML value); repeatable")
    p.add_argument("--out", required=True, help="run directory (must not exist unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    pairs = [("model.name", args.model), ("data.name", args.data), ("data.data_dir", args.data_dir),
             ("train.epochs", args.epochs), ("train.batch_size", args.batch_size), ("optim.lr", args.lr),
             ("train.seed", args.seed)]
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in pairs if v is not None]


def _remove_unfinished_run(out: Path, made: bool) -> None:
    """A fresh run that stopped on a user error (e.g. the loss diverged at once) before committing a
    checkpoint leaves nothing to resume: remove what it wrote, so --out can be used again as given."""
    if not out.is_dir() or (out / "checkpoints" / "last.json").exists():
        return
    if made:
        shutil.rmtree(out, ignore_errors=True)
    else:  # the empty folder the user gave stays, empty
        for p in out.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    from reslab.train import load_config, resume_config, train
    from reslab.train.checkpoint import CheckpointWriteError

    overrides = _flag_overrides(args) + list(args.overrides)
    out = Path(args.out)
    if args.resume:
        base = args.config or (out / "config.yaml")
        if not Path(base).is_file():
            raise FileNotFoundError(f"cannot resume: {out}/config.yaml not found; is {out} a reslab run directory?")
        cfg = resume_config(out, load_config(base, overrides))
    else:
        if not args.config and not (args.model and args.data):
            raise ValueError("give a CONFIG file, or --model and --data (see `reslab train --help`)")
        cfg = load_config(args.config, overrides)
    fresh = not args.resume and not (out.is_dir() and any(out.iterdir()))
    made = fresh and not out.exists()
    try:
        result = train(cfg, out, resume=args.resume, progress=False if args.no_progress else None)
    except CheckpointWriteError as e:  # a full or failing disk: one line, the committed checkpoint is kept
        from reslab.cli import UserError

        raise UserError(str(e)) from None
    except (ValueError, FileNotFoundError, NotImplementedError):
        if fresh and int(os.environ.get("RANK", "0")) == 0:
            _remove_unfinished_run(out, made)
        raise
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        best, final = result.best, result.final
        msg = f"{out}: {result.steps} steps, {result.epochs} epochs"
        if final:
            split = final.get("split", "test")
            msg += f"; final {split} top1 {final['top1']:.4f} (tta {final['tta']})"
            if best:  # chosen on the validation split only
                msg += f", best val top1 {best['top1']:.4f} at epoch {best['epoch']}"
        print(msg)
    return 0

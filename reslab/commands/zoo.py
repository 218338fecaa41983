"""``reslab zoo [--models ...] [--batch B] [--json]``: params, MACs, CPU speed and peak memory per model."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "zoo", help="params, MACs, CPU images/s and peak memory of several models in one table",
        description="Measure each model at its native input (32x32 CIFAR, 224x224 ImageNet): parameters, MACs per "
                    "image (torch.utils.flop_counter, FLOPs / 2), CPU inference and training images/s (batch / "
                    "median iteration time; training = forward + backward + SGD step) and the peak tensor "
                    "memory allocated during one pass (torch.profiler allocation events; weights and input "
                    "excluded). Default: a small CIFAR set. CPU timings depend on threads and load: compare "
                    "models measured in one run.")
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="model names or fnmatch patterns (e.g. 'cifar_resnet*' dpn98); default: a small CIFAR set")
    p.add_argument("--batch", type=int, help="batch size for every model (default: 16 at 32x32, 2 at 224x224)")
    p.add_argument("--compare", nargs=2, action="append", metavar=("A", "B"), default=[],
                   help="also print A relative to B (size, MACs, speed, memory); repeatable")
    p.add_argument("--dpn-claim", action="store_true",
                   help="check the DPN paper's claim: measure dpn98 and resnext101_64x4d (224x224) and compare them")
    p.add_argument("--min-time", type=float, default=1.0, metavar="S",
                   help="seconds of timed iterations per measurement (default 1.0; at least 2 iterations)")
    p.add_argument("--no-train", action="store_true", help="skip the training measurements")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-speed", action="store_true", help="skip the timings")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's current setting)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of Markdown")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from reslab.models.zoo import DPN_CLAIM, compare, comparison_markdown, resolve_models, run_zoo, zoo_markdown

    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.min_time < 0:
        raise ValueError(f"--min-time must be >= 0, got {args.min_time}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    items = list(args.models or [])
    pairs = [tuple(p) for p in args.compare]
    if args.dpn_claim:
        items += [DPN_CLAIM["a"], DPN_CLAIM["b"]]
        pairs.append((DPN_CLAIM["a"], DPN_CLAIM["b"]))
    names = resolve_models(items)
    for a, b in pairs:
        for n in (a, b):
            if n not in names:
                raise ValueError(f"--compare {a} {b}: {n!r} is not among the measured models; add it to --models")

    def progress(name: str) -> None:
        if not args.json:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)

    rows = run_zoo(names, args.batch, speed=not args.no_speed, train=not args.no_train, memory=not args.no_memory,
                   min_time=args.min_time, progress=progress)
    comparisons = [compare(rows, a, b) for a, b in pairs]
    if args.json:
        print(json.dumps(dict(models=[r.to_dict() for r in rows], comparisons=comparisons,
                              threads=torch.get_num_threads(), torch=torch.__version__), indent=1))
    else:
        print(zoo_markdown(rows))
        print(f"\nCPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}; MACs per image; peak = tensor "
              "memory allocated during one pass (weights and input excluded).")
        for c in comparisons:
            print()
            print(comparison_markdown(c))
    return 1 if any(r.error for r in rows) else 0

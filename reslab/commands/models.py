"""``reslab models [--pattern P] [--json | --markdown]``: the zoo with parameters and FLOPs."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "models", help="list the registered models with params and FLOPs",
        description="List registered models with their parameter count and FLOPs at the native input size "
                    "(32x32 CIFAR, 224x224 ImageNet), counted by torch.utils.flop_counter for one image. "
                    "FLOPs count 2 per multiply-add; MACs = FLOPs / 2 is the figure the papers print.")
    p.add_argument("--pattern", default="*", help="fnmatch pattern on the name, e.g. 'cifar_*' (default: all)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON list of objects")
    fmt.add_argument("--markdown", action="store_true",
                     help="print a markdown table with the papers' parameter counts (docs/models.md)")
    p.set_defaults(func=run)
    return p


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _g(n: int) -> str:
    return f"{n / 1e9:.3g}"


def run(args: argparse.Namespace) -> int:
    from reslab.models.complexity import PAPER_PARAMS, format_reference, model_description, model_info
    from reslab.models.registry import list_models

    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no model name matches {args.pattern!r}; run `reslab models` for the list")
    rows = [model_info(n, stages=False) for n in names]
    if args.json:
        print(json.dumps([{k: r[k] for k in ("name", "params", "flops", "macs", "input_size", "residual_units")}
                          for r in rows], indent=1))
        return 0
    if args.markdown:
        print("| model | description | input | params | paper's params (source) | diff | GMACs | GFLOPs | units |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ref = PAPER_PARAMS.get(r["name"])
            if ref:
                paper = f"{format_reference(ref[0])} ({ref[1]})"
                diff = f"{100 * (r['params'] / ref[0] - 1):+.1f}%"
            else:
                paper, diff = "—", "—"
            size = "x".join(str(s) for s in r["input_size"][1:])
            desc = model_description(r["name"]).replace("|", "\\|")
            print(f"| `{r['name']}` | {desc} | {size} | {r['params']:,} | {paper} | {diff} "
                  f"| {_g(r['macs'])} | {_g(r['flops'])} | {r['residual_units']} |")
        return 0
    width = max(len(n) for n in names)
    print(f"{'model':<{width}}  {'input':>7}  {'params':>9}  {'GMACs':>7}  {'GFLOPs':>7}  {'units':>5}")
    for r in rows:
        size = "x".join(str(s) for s in r["input_size"][1:])
        print(f"{r['name']:<{width}}  {size:>7}  {_m(r['params']):>9}  {_g(r['macs']):>7}  {_g(r['flops']):>7}  "
              f"{r['residual_units']:>5}")
    return 0

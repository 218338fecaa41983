"""``reslab models [PATTERN] [--flops] [--json | --markdown]``: the zoo with parameters and FLOPs.

Answers at once: the numbers come from ``reslab/models/complexity_table.json``, written by
``python benchmarks/tools/complexity_table.py --write`` and checked against the live counter by
``tests/test_cli_models.py``; nothing here imports torch unless ``--flops`` (count live) or
``--markdown`` (the papers' reference counts and the model descriptions) asks for it.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
from typing import Any

TABLE_FIELDS = ("name", "params", "flops", "macs", "input_size", "residual_units")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "models", help="list the registered models with params and FLOPs",
        description="List registered models with their parameter count and FLOPs at the native input size "
                    "(32x32 CIFAR, 224x224 ImageNet) for one image, as torch.utils.flop_counter counts them. "
                    "FLOPs count 2 per multiply-add; MACs = FLOPs / 2 is the figure the papers print. "
                    "The numbers come from a table kept in the package (checked against the counter by the "
                    "test suite); --flops counts them live instead.")
    p.add_argument("pattern", nargs="?", default=None, metavar="PATTERN",
                   help="fnmatch pattern on the name, e.g. 'cifar_*' (default: all)")
    p.add_argument("--pattern", dest="pattern_opt", default=None, metavar="PATTERN",
                   help="the same as the positional PATTERN")
    p.add_argument("--flops", action="store_true",
                   help="build the models and count params and FLOPs live (seconds to minutes) instead of "
                        "reading the table")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON list of objects")
    fmt.add_argument("--markdown", action="store_true",
                     help="print a markdown table with the papers' parameter counts (docs/models.md)")
    p.set_defaults(func=run)
    return p


def load_table() -> list[dict[str, Any]]:
    """The package's complexity table (rows sorted by name), read without importing torch."""
    from importlib import resources

    path = resources.files("reslab") / "models" / "complexity_table.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"the complexity table {path} is missing from the installation; regenerate it "
                                "with `python benchmarks/tools/complexity_table.py --write` or pass --flops") from None
    return sorted(doc["models"], key=lambda r: r["name"])


def _pattern(args: argparse.Namespace) -> str:
    a, b = args.pattern, args.pattern_opt
    if a is not None and b is not None and a != b:
        raise ValueError(f"two patterns given ({a!r} and --pattern {b!r}); pass one")
    return a or b or "*"


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _g(n: int) -> str:
    return f"{n / 1e9:.3g}"


def _rows(pattern: str, live: bool) -> list[dict[str, Any]]:
    if live:
        from reslab.models.complexity import complexity_table
        from reslab.models.registry import list_models

        names = list_models(pattern)
        return complexity_table(names) if names else []
    return [r for r in load_table() if fnmatch.fnmatchcase(r["name"], pattern)]


def run(args: argparse.Namespace) -> int:
    pattern = _pattern(args)
    rows = _rows(pattern, args.flops)
    if not rows:
        raise ValueError(f"no model name matches {pattern!r}; run `reslab models` for the list")
    if args.json:
        print(json.dumps([{k: r[k] for k in TABLE_FIELDS} for r in rows], indent=1))
        return 0
    if args.markdown:
        from reslab.models.complexity import PAPER_PARAMS, format_reference, model_description

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
    width = max(len(r["name"]) for r in rows)
    print(f"{'model':<{width}}  {'input':>7}  {'params':>9}  {'GMACs':>7}  {'GFLOPs':>7}  {'units':>5}")
    for r in rows:
        size = "x".join(str(s) for s in r["input_size"][1:])
        print(f"{r['name']:<{width}}  {size:>7}  {_m(r['params']):>9}  {_g(r['macs']):>7}  {_g(r['flops']):>7}  "
              f"{r['residual_units']:>5}")
    return 0

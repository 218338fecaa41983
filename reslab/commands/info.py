"""``reslab info MODEL [--set k=v ...] [--json]``: one model's params, FLOPs, stages and units."""
from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "info", help="parameters, FLOPs, stage shapes and residual units of one model",
        description="Build one model (with optional create_model overrides) and print its parameter count, "
                    "FLOPs and MACs for one image (torch.utils.flop_counter; FLOPs = 2 x MACs), the output "
                    "shape of each stage and the number of residual units.")
    p.add_argument("model", help="registered model name (see `reslab models`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="create_model keyword, value parsed as YAML (e.g. --set depth=56 --set shortcut=B)")
    p.add_argument("--input-size", type=int, metavar="PIXELS",
                   help="square input side (default: the model's native size)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["depth=56", "shortcut=B"]`` -> ``{"depth": 56, "shortcut": "B"}`` (values as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r} (e.g. --set depth=56)")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ValueError(f"--set {key.strip()}: cannot parse the value {raw!r}") from None
    return out


def run(args: argparse.Namespace) -> int:
    from reslab.models.complexity import model_info
    from reslab.models.registry import default_input_size

    overrides = parse_overrides(args.overrides)
    size = None
    if args.input_size is not None:
        if args.input_size < 1:
            raise ValueError(f"--input-size must be >= 1, got {args.input_size}")
        size = (default_input_size(args.model)[0], args.input_size, args.input_size)
    info = model_info(args.model, input_size=size, **overrides)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    opts = ", ".join(f"{k}={v!r}" for k, v in info["overrides"].items())
    print(f"{info['name']}" + (f" ({opts})" if opts else ""))
    print(f"  input           {'x'.join(map(str, info['input_size']))}")
    print(f"  params          {info['params']:,} ({info['params'] / 1e6:.2f}M)")
    print(f"  MACs            {info['macs']:,} ({info['macs'] / 1e9:.3g} G)")
    print(f"  FLOPs           {info['flops']:,} ({info['flops'] / 1e9:.3g} G, 2 per multiply-add)")
    print(f"  residual units  {info['residual_units']} ({info['downsampling_units']} downsampling)")
    print(f"  features        {info['num_features']}, classes {info['num_classes']}")
    print("  stages:")
    for s in info["stages"]:
        print(f"    {s['module']:<12} {str(s['shape']):<20} reduction {s['reduction']}")
    return 0

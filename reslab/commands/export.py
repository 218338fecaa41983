"""``reslab export MODEL|RUN|MODEL:TAG --format exported|torchscript|onnx --out FILE [--fuse-bn]``.

The target is resolved like ``reslab eval``'s (a run directory, a ``.safetensors`` checkpoint, a
published tag folder, a pretrained ``MODEL:TAG``, or a bare ``MODEL`` for its default weights);
``--random-init`` exports a registered architecture with fresh weights instead. The model is put in
eval mode, a stochastic-depth model has its test-time scaling folded into the branch weights
(``fold_survival_into_branch`` then ``remove_stochastic_depth``), and the file written is loaded back
and compared with the eager model (the largest absolute difference is printed).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="export a model for inference: torch.export (.pt2), TorchScript (.pt) or ONNX",
        description="Export a trained run, a pretrained MODEL:TAG or (with --random-init) an architecture for "
                    "inference, in eval mode with stochastic depth folded into the weights, and check the file "
                    "against the eager model. The exported network takes normalised (N, C, H, W) tensors "
                    "(no mean/std inside); the batch dimension is dynamic for exported and onnx.")
    p.add_argument("target", help="run directory, .safetensors checkpoint, MODEL:TAG, or MODEL")
    p.add_argument("--format", required=True, choices=("exported", "torchscript", "onnx"),
                   help="exported: torch.export (.pt2); torchscript: torch.jit.trace (.pt); onnx (pip install "
                        "'reslab[export]')")
    p.add_argument("--out", required=True, help="output file (.pt2 for --format exported)")
    p.add_argument("--fuse-bn", action="store_true", help="fold BatchNorm into the preceding convolutions first")
    p.add_argument("--random-init", action="store_true",
                   help="TARGET is a registered model name: export it with fresh (untrained) weights")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="create_model keyword for --random-init (e.g. --set depth=56)")
    p.add_argument("--which", choices=("best", "last"), default="last",
                   help="checkpoint of a run directory (default last)")
    p.add_argument("--input-size", type=int, metavar="PIXELS",
                   help="square side of the example input (default: the run's image size, else the model's "
                        "native size)")
    p.add_argument("--batch-size", type=int, default=2, help="batch of the example input (default 2)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


def load_target(target: str, random_init: bool, overrides: dict[str, Any], which: str
                ) -> tuple[nn.Module, str, int | None, str]:
    """(model, architecture name, the run's image size or None, a description of the weights)."""
    from reslab.models import create_model, list_models

    if random_init:
        if target not in list_models():
            raise ValueError(f"--random-init needs a registered model name, got {target!r} (see `reslab models`)")
        return create_model(target, **overrides), target, None, "random initialisation (untrained)"
    if overrides:
        raise ValueError("--set applies to --random-init only; a checkpoint rebuilds its own architecture")
    # The shared resolver of run directories, checkpoints and MODEL:TAG (reslab eval uses it too).
    from reslab.train.evaluate import load_model_from_checkpoint

    model, info, wpath = load_model_from_checkpoint(target, which=which)
    size = (info.config.get("data") or {}).get("image_size") if isinstance(info.config, dict) else None
    return model, info.model, int(size) if size else None, str(wpath)


def _in_chans(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError(f"{type(model).__name__} has no convolution; cannot infer its input channels")


def fold_gates(model: nn.Module) -> bool:
    """Fold stochastic depth's test-time scaling into the branches and switch it off; True if the
    model had stochastic depth."""
    from reslab.regularize.stochastic_depth import (fold_survival_into_branch, remove_stochastic_depth,
                                                    residual_units)

    if not any(u.sd_mode != "off" for u in residual_units(model)):
        return False
    fold_survival_into_branch(model)
    remove_stochastic_depth(model)
    return True


def run(args: argparse.Namespace) -> int:
    from reslab.commands.info import parse_overrides
    from reslab.models.export import export_model
    from reslab.models.registry import default_input_size

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.input_size is not None and args.input_size < 1:
        raise ValueError(f"--input-size must be >= 1, got {args.input_size}")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it or choose another --out")
    print(f"export: loading {args.target}", file=sys.stderr)
    model, name, run_size, source = load_target(args.target, args.random_init, parse_overrides(args.overrides),
                                                args.which)
    model = model.cpu().eval()
    folded = fold_gates(model)
    size = args.input_size or run_size or default_input_size(name)[1]
    x = torch.randn(args.batch_size, _in_chans(model), size, size, generator=torch.Generator().manual_seed(0))
    print(f"export: {name} -> {args.format} ({'BN fused, ' if args.fuse_bn else ''}example input "
          f"{tuple(x.shape)})", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # the ONNX exporter reports its steps on stdout
        res = export_model(model, out, args.format, x, fuse_bn=args.fuse_bn)
    summary = {"model": name, "weights": source, "format": res.format, "out": str(res.path),
               "input_shape": list(res.input_shape), "fused_bn": res.fused_bn, "stochastic_depth_folded": folded,
               "max_abs_diff": res.max_abs_diff, "bytes": res.path.stat().st_size}
    if args.json:
        print(json.dumps(summary))
        return 0
    check = ("not checked (onnxruntime is not installed)" if res.max_abs_diff is None
             else f"max |exported - eager| = {res.max_abs_diff:.3g}")
    print(f"{name} ({source}) -> {res.path} [{res.format}, {summary['bytes'] / 1e6:.2f} MB, input "
          f"{'x'.join(map(str, res.input_shape))}{', BN fused' if res.fused_bn else ''}"
          f"{', stochastic depth folded' if folded else ''}]: {check}")
    return 0

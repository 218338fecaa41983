"""reslab's pre-activation ResNets beside timm's ``resnetv2_*``: parameters and outputs.

    python benchmarks/compare_timm_preact.py [--depths 18 34 50 101 152] [--image-size 224]
                                             [--batch 2] [--seed 0] [--json]

Needs timm (not a reslab dependency). For each depth: timm's ``resnetv2_<d>`` (1000 classes) with
random BatchNorm statistics and affine parameters, its weights mapped into reslab's
``preact_resnet<d>`` by ``reslab.models.interop.from_timm_resnetv2``; then both run the same
random batch in eval mode (running statistics) and in train mode (batch statistics), in float32
on the CPU. Prints the parameter counts of both and the largest absolute output difference beside
the largest absolute output. A comparison, not a benchmark: no timing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

import reslab
from reslab.models.interop import from_timm_resnetv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/_helpers.py
from tests._helpers import randomize_bn  # noqa: E402  (the suite's own BN randomiser, same statistics)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compare(depth: int, image_size: int, batch: int, seed: int) -> dict:
    import timm

    torch.manual_seed(seed)
    tm = timm.create_model(f"resnetv2_{depth}")
    randomize_bn(tm, seed)
    name = f"preact_resnet{depth}"
    ours = reslab.create_model(name)
    ours.load_state_dict(from_timm_resnetv2(tm.state_dict(), name=name), strict=True)
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed + 1))
    out = dict(depth=depth, timm=f"resnetv2_{depth}", reslab=name, params_timm=_params(tm),
               params_reslab=_params(ours), image_size=image_size, batch=batch)
    with torch.no_grad():
        for mode in ("eval", "train"):
            tm.train(mode == "train")
            ours.train(mode == "train")
            a, b = ours(x), tm(x)
            out[f"max_abs_diff_{mode}"] = float((a - b).abs().max())
            out[f"max_abs_out_{mode}"] = float(b.abs().max())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[18, 34, 50, 101, 152])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        import timm  # noqa: F401
    except ImportError:
        print("error: timm is not installed; install it (pip install timm) to compare with resnetv2", file=sys.stderr)
        return 2
    rows = []
    for d in args.depths:
        print(f"[compare] resnetv2_{d} vs preact_resnet{d} ...", file=sys.stderr, flush=True)
        r = compare(d, args.image_size, args.batch, args.seed)
        rows.append(r)
        print(f"preact_resnet{d}: params {r['params_reslab']:,} (timm {r['params_timm']:,}); max |diff| eval "
              f"{r['max_abs_diff_eval']:.3g} (max |out| {r['max_abs_out_eval']:.3g}), train "
              f"{r['max_abs_diff_train']:.3g} (max |out| {r['max_abs_out_train']:.3g})", flush=True)
    if args.json:
        import timm

        print(json.dumps(dict(rows=rows, torch=torch.__version__, timm=timm.__version__), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``reslab unravel --units N [--json]``: the unravelled view, checked numerically.

Linear units: the 2^N path terms sum to the forward output; the gradient formula
dL/dW_i = (I + W_{i+1}^T)...(I + W_{N-1}^T) dL/dx_N x_i^T matches autograd. A real network
(a small ResNet with N units, or --model NAME), float64: the input gradients summed over all
2^N branch/shortcut routings equal the full gradient (eval- and train-mode BatchNorm).
Exit status 1 if any error exceeds --tol.
"""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("unravel", help="check the unravelled (2^n paths) view numerically",
                              description=__doc__.split("\n", 2)[2] if __doc__ else None,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=3, help="number of residual units N (1..12, default 3)")
    p.add_argument("--model", help="registered model for the route identity instead of the small N-unit ResNet "
                                   "(at most 12 residual units)")
    p.add_argument("--image-size", type=int, default=8, help="input side for the route identity (default 8)")
    p.add_argument("--at", choices=("unit", "image"), default="unit",
                   help="where input gradients are taken: first unit's input (default) or the image")
    p.add_argument("--dim", type=int, default=4, help="size of the linear units' vectors (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-6, help="largest accepted error (default 1e-6)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from reslab.analysis.unravel import MAX_ROUTE_UNITS, unravel_report

    if not 1 <= args.units <= MAX_ROUTE_UNITS:
        raise ValueError(f"--units must be in [1, {MAX_ROUTE_UNITS}] (2^N routings are run), got {args.units}")
    model = None
    if args.model:
        from reslab import create_model

        model = create_model(args.model)
    res = unravel_report(args.units, dim=args.dim, seed=args.seed, model=model, image_size=args.image_size, at=args.at)
    keys = ["max_abs_err", "grad_formula_err", "grad_three_units_err", "route_rel_err"]
    ok = all(res[k] <= args.tol for k in keys if k in res)
    res["ok"], res["tol"] = ok, args.tol
    if args.json:
        print(json.dumps(res))
    else:
        n = res["n_units"]
        print(f"linear units: {n} units, {res['n_paths']} path terms (per length: {res['paths_per_length']})")
        print(f"  path sum vs forward, max abs error:        {res['max_abs_err']:.3e}")
        print(f"  dL/dW_i formula vs autograd, max rel err:  {res['grad_formula_err']:.3e}")
        if "grad_three_units_err" in res:
            print(f"  (I+W1^T)(I+W2^T) dL/dx3 x0^T vs autograd:  {res['grad_three_units_err']:.3e}")
        print(f"route identity ({res['route_units']} units, {res['n_routes']} routings, float64, gradient at "
              f"{'first unit input' if res['route_at'] == 'unit' else 'image'}):")
        print(f"  eval-mode BN rel err:  {res['route_rel_err_eval_bn']:.3e}")
        print(f"  train-mode BN rel err: {res['route_rel_err_train_bn']:.3e}")
        print("OK" if ok else f"FAIL: an error exceeds {args.tol:g}")
    return 0 if ok else 1

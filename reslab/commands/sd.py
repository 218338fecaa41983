"""``reslab sd {schedule,sweep,grad,test}``: stochastic depth (Huang et al. 2016).

Thin wrappers over :mod:`reslab.regularize.stochastic_depth` and the study code in
:mod:`reslab.studies.huang2016` (the same functions ``reslab study huang2016`` uses).
"""
from __future__ import annotations

import argparse
import json
import math


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _words(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="base YAML config (configs/*.yaml); or give --model and --data")
    p.add_argument("--model", help="model name (sets model.name)")
    p.add_argument("--data", help="data set (sets data.name)")
    p.add_argument("--data-dir", help="sets data.data_dir")
    p.add_argument("--epochs", type=int, help="sets train.epochs")
    p.add_argument("--batch-size", type=int, help="sets train.batch_size")
    p.add_argument("--seed", type=int, help="sets train.seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (dotted key, YAML value); repeatable")
    p.add_argument("--mode", default=None,
                   help="batch (paper), batch-mask or row (default: the config's stochastic_depth.mode, else batch)")
    p.add_argument("--out", required=True, help="output directory (one run directory per variant inside)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="training progress: a bar on a terminal, a line per epoch otherwise (default: on)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sd", help="stochastic depth: schedules, p_L sweep, gradient strength, test error",
                              description="Stochastic depth (Huang et al. 2016). Apply it to any model with "
                                          "model.kwargs.stochastic_depth in a config (see docs/stochastic_depth.md).")
    sub = p.add_subparsers(dest="sd_command", metavar="SUBCOMMAND")

    s = sub.add_parser("schedule", help="survival probability of every unit and the expected depth")
    s.add_argument("model", nargs="?", help="a registered model (units, downsampling flags from it)")
    s.add_argument("--units", type=int, help="number of units L (instead of a model)")
    s.add_argument("--survival", type=float, default=0.5, help="final survival probability p_L (default 0.5)")
    s.add_argument("--rule", default="linear", help="linear (paper), uniform or timm")
    s.add_argument("--drop-downsample", action="store_true", help="let downsampling units be dropped too")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_schedule)

    w = sub.add_parser("sweep", help="test error against p_L for several rules (the paper's sensitivity figure)")
    _add_run_args(w)
    w.add_argument("--survival", type=_floats, default=[0.2, 0.5, 0.8], help="p_L values (default 0.2,0.5,0.8)")
    w.add_argument("--rules", type=_words, default=["linear", "uniform"], help="default linear,uniform")
    w.add_argument("--no-constant", action="store_true", help="skip the constant-depth baseline")
    w.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                   help="also report the error after re-estimating BN statistics on N training batches")
    w.set_defaults(func=run_sweep)

    g = sub.add_parser("grad", help="mean |gradient| at the first residual block, with vs without stochastic depth")
    _add_run_args(g)
    g.add_argument("--survival", type=float, default=0.5, help="p_L of the stochastic-depth run (default 0.5)")
    g.add_argument("--rule", default="linear")
    g.add_argument("--probe", choices=("first_conv", "unit0_convs"), default="first_conv",
                   help="first_conv: the first conv of the first residual block (the paper's layer, default); "
                        "unit0_convs: mean over every conv weight of the first unit")
    g.set_defaults(func=run_grad)

    t = sub.add_parser("test", help="test error of a run's best (validation-selected) or last checkpoint")
    t.add_argument("run", help="run directory or checkpoint")
    t.add_argument("--which", choices=("best", "last"), default="best")
    t.add_argument("--split", choices=("test", "eval"), default="test",
                   help="test set (default) or the run's own evaluation set")
    t.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                   help="also report the error after re-estimating BN statistics on N training batches")
    t.add_argument("--data-dir", help="where the data lives, if not where the run had it")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=run_test)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p


# ---- schedule -------------------------------------------------------------------------------------
def run_schedule(args: argparse.Namespace) -> int:
    from reslab.regularize.stochastic_depth import (StochasticDepth, apply_stochastic_depth, model_expected_depth,
                                                    residual_units, survival_probs)

    if (args.model is None) == (args.units is None):
        raise ValueError("give a model name or --units L (one of them)")
    spec = StochasticDepth(final_survival=args.survival, rule=args.rule, drop_downsample=args.drop_downsample)
    if args.model:
        import torch

        import reslab

        with torch.device("meta"):
            model = apply_stochastic_depth(reslab.create_model(args.model), spec)
        rows = [{"unit": i + 1, "stage": u.stage, "index": u.index, "downsample": u.downsample,
                 "survival": u.survival_prob} for i, u in enumerate(residual_units(model))]
        depth = model_expected_depth(model)
    else:
        probs = survival_probs(args.units, spec.final_survival, spec.rule)
        rows = [{"unit": i + 1, "survival": p} for i, p in enumerate(probs)]
        depth = math.fsum(probs)
    if args.json:
        print(json.dumps({"rule": spec.rule, "final_survival": spec.final_survival, "units": len(rows),
                          "expected_depth": depth, "survival": [r["survival"] for r in rows]}))
        return 0
    for r in rows:
        ds = "  (downsampling)" if r.get("downsample") else ""
        print(f"unit {r['unit']:4d}  p = {r['survival']:.4f}{ds}")
    print(f"{args.model or 'L = ' + str(args.units)}: rule {spec.rule}, p_L = {spec.final_survival}, "
          f"expected active units {depth:.4f} of {len(rows)}")
    return 0


# ---- training experiments --------------------------------------------------------------------------
def _show_progress(args: argparse.Namespace) -> bool:
    """--progress / --no-progress; default on (a bar on a terminal, a line per epoch otherwise)."""
    import sys

    # Default on: the engine shows a bar on a terminal and a line per epoch otherwise.
    return True if args.progress is None else bool(args.progress)


def _base_config(args: argparse.Namespace):
    from reslab.train import load_config

    if not args.config and not (args.model and args.data):
        raise ValueError("give a CONFIG file, or --model and --data")
    pairs = [("model.name", args.model), ("data.name", args.data), ("data.data_dir", args.data_dir),
             ("train.epochs", args.epochs), ("train.batch_size", args.batch_size), ("train.seed", args.seed)]
    flags = [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in pairs if v is not None]
    cfg = load_config(args.config, flags + list(args.overrides))
    # A base config's stochastic_depth options (drop_downsample, fill_missing_grads, scale, seed, mode)
    # are kept: the sweep varies only final_survival and rule (reslab.studies.huang2016.sweep_configs).
    return cfg


def run_sweep(args: argparse.Namespace) -> int:
    from reslab.studies.huang2016 import sweep

    rows = sweep(_base_config(args), args.out, args.survival, args.rules, mode=args.mode,
                 recalibrate_bn=args.recalibrate_bn, progress=_show_progress(args), constant=not args.no_constant)
    for r in rows:
        extra = (f", recalibrated {100 * r['test_error_final_recal']:.2f}%"
                 if r.get("test_error_final_recal") is not None else "")
        best = r.get("test_error_at_best_val")
        best_txt = (f"test error at best-val epoch {r['best_val_epoch']}: {100 * best:.2f}%" if best is not None
                    else "no validation split: no best epoch")
        print(f"{r['variant']:>18s}  E[depth] {r['expected_depth']:6.2f}  final-epoch test error "
              f"{100 * r['test_error_final']:.2f}%  {best_txt}{extra}")
    print(f"wrote {args.out}/sweep.csv, sweep.md, sweep.png")
    return 0


def run_grad(args: argparse.Namespace) -> int:
    from reslab.studies.huang2016 import gradient_strength

    res = gradient_strength(_base_config(args), args.out, args.survival, args.rule, mode=args.mode,
                            probe=args.probe, progress=_show_progress(args))
    for label, r in res["runs"].items():
        vals = [e["grad_abs_mean"] for e in r["per_epoch"] if e.get("grad_abs_mean") is not None]
        mean = sum(vals) / len(vals) if vals else float("nan")
        print(f"{label:>14s}: mean |grad| ({args.probe}) over epochs {mean:.3e}; "
              f"final-epoch test error {100 * r['test_error_final']:.2f}%")
    print(f"wrote {args.out}/gradient_strength.json, .csv, .png")
    return 0


def run_test(args: argparse.Namespace) -> int:
    from reslab.studies.huang2016 import run_test_error

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    res = run_test_error(args.run, args.which, args.recalibrate_bn, args.split, args.batch_size,
                         data_dir=args.data_dir)
    if args.json:
        print(json.dumps(res))
    else:
        extra = f"; after BN recalibration {100 * res['error_recal']:.2f}%" if "error_recal" in res else ""
        sel = " (chosen on the validation split)" if res["selected_on"] == "val" else ""
        print(f"{res['checkpoint']} (epoch {res['epoch']}{sel}): {res['split']} error {100 * res['error']:.2f}% "
              f"on {res['n']} images{extra}")
    return 0

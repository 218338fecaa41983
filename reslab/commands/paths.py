"""``reslab paths [RUN_DIR|CHECKPOINT ...] [--units N]``: path-length analysis (Veit et al. 2016 §5).

With targets: the gradient magnitude at the input per path length (forward unchanged,
backward through the branches of k sampled units and the shortcuts of the others), the
total gradient per length and the effective-path range; writes paths.csv / paths.png /
paths_summary.json. With ``--units N`` alone: the path-length distribution of N units.

Method: ``--method sample`` (default) is the paper's Monte-Carlo protocol (``--samples`` random
k-subsets per length; the paper's quantity C(n, k) x E||g_path||, Fig. 6); ``--method exact`` sums
the gradients of ALL paths of each length in one backward sweep per batch (reslab's
``exact_path_gradients``; ``summed_norm`` per length, paths can cancel, so it is not the paper's
total; no PNG). The default stays ``sample`` because that is the quantity the paper plots.

Data: the gradients are measured on random batches of the TRAINING set by default (Veit et
al. 2016 §5: "random batches from the training set"; ``--grad-data test`` takes batches of the
evaluated split, ``--split test|val``, default test); every output says which.
"""
from __future__ import annotations

import argparse
import json

from reslab.commands.lesion import _int_list, add_common, default_out, labels_for, make_progress


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "paths", help="path lengths: distribution, gradient magnitude per length (Veit et al. 2016) -> CSV + PNG",
        description="Unravel a residual network into 2^n paths and measure how much gradient paths of each length "
                    "carry. The gradient is measured at the input of the first residual unit (--at unit, default) "
                    "or at the image (--at image), with eval-mode BatchNorm (default) or batch statistics "
                    "(--bn train).")
    p.add_argument("targets", nargs="*", metavar="RUN_DIR|CHECKPOINT|MODEL:TAG",
                   help="runs, checkpoints or pretrained MODEL:TAG to analyse")
    p.add_argument("--units", type=int, help="without targets: print the path-length distribution of N units")
    p.add_argument("--samples", type=int, default=20,
                   help="(batch, subset) samples per path length (default 20; the paper used ~1000)")
    p.add_argument("--method", choices=("sample", "exact"), default="sample",
                   help="sample: the paper's Monte-Carlo protocol (default); exact: the exact sum of all paths of "
                        "each length, one backward sweep with n+1 components per batch (--samples/--ks ignored)")
    p.add_argument("--ks", type=_int_list, help="numbers of branch-routed units to measure, e.g. '0-20' (default all)")
    p.add_argument("--at", choices=("unit", "image"), default="unit", help="where the gradient is measured")
    p.add_argument("--bn", choices=("eval", "train"), default="eval", help="BatchNorm mode of the measurement")
    p.add_argument("--mass", type=float, default=0.9, help="share of the total gradient in the effective range")
    p.add_argument("--batch-size", type=int, default=32, help="images per sample (default 32)")
    p.add_argument("--max-images", type=int, default=1024,
                   help="images to draw batches from (default 1024): max-images // batch-size random training "
                        "batches with --grad-data train, a fixed subset of the split with --grad-data test")
    p.add_argument("--grad-data", choices=("train", "test"), default="train",
                   help="data of the gradient measurement: random training batches (default; Veit et al. 2016 §5) "
                        "or batches of the evaluated split (--split)")
    add_common(p)
    p.set_defaults(func=run)
    return p


def _distribution(args: argparse.Namespace) -> int:
    from reslab.analysis.lesion import write_csv
    from reslab.analysis.paths import central_range, fraction_within, path_length_distribution

    n = args.units
    if n is None or n < 1:
        raise ValueError("give RUN_DIR|CHECKPOINT targets, or --units N (N >= 1) for the distribution alone")
    rows = path_length_distribution(n)
    lo, hi = central_range(n, 0.95)
    summary = dict(n_units=n, n_paths=2**n, mean=n / 2, range_95=[lo, hi],
                   fraction_in_range_95=fraction_within(n, lo, hi))
    if args.out:
        summary["csv"] = write_csv(rows, f"{args.out}/path_length_distribution.csv")
    if args.json:
        print(json.dumps(dict(summary, distribution=rows)))
        return 0
    print(f"{n} units: 2^{n} = {2**n} paths; length ~ Binomial({n}, 1/2); 95% of paths in [{lo}, {hi}] "
          f"({100 * summary['fraction_in_range_95']:.2f}%)")
    for r in rows:
        print(f"{r['length']:>4} {r['paths']:>22} {r['fraction']:.3e}")
    return 0


def run(args: argparse.Namespace) -> int:
    if not args.targets:
        return _distribution(args)
    from reslab.analysis.report_sections import grad_data_name, run_paths_experiment
    from reslab.studies.inputs import load_for_analysis

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if not 0 < args.mass <= 1:
        raise ValueError(f"--mass must be in (0, 1], got {args.mass}")
    models, evals = {}, {}
    for target, label in zip(args.targets, labels_for(args)):
        on_train = args.grad_data == "train"
        inp = load_for_analysis(target, device=args.device, which=args.which, data_dir=args.data_dir,
                                max_images=args.max_images, batch_size=args.batch_size, split=args.split,
                                train_batches=max(1, args.max_images // args.batch_size) if on_train else 0,
                                label=label)
        if inp.label in models:
            raise ValueError(f"two targets are both named {inp.label!r}; name them with --labels a,b,...")
        models[inp.label], evals[inp.label] = inp.model, inp.train if on_train else inp.batches
    grad_data = "train" if args.grad_data == "train" else args.split
    out = args.out or default_out(args.targets[0])
    with make_progress(args) as progress:
        res = run_paths_experiment(models, evals, out, ks=args.ks, samples=args.samples, at=args.at, bn=args.bn,
                                   seed=args.seed, mass=args.mass, progress=progress.update, grad_data=grad_data,
                                   method=args.method)
    if args.json:
        print(json.dumps(dict(method=args.method, grad_data=grad_data, summary=res["summary"], files=res["files"])))
        return 0
    where = "first residual unit's input" if args.at == "unit" else "image"
    for label, r in res["results"].items():
        s = res["summary"][label]
        print(f"{label}: {r.n_units} units, {r.n_routable} with a shortcut; 95% of paths have length "
              f"{s['path_range_95'][0]}-{s['path_range_95'][1]}; gradient at the {where}, {args.bn}-mode BN, on "
              f"{grad_data_name(grad_data)}; method {args.method}")
        if args.method == "exact":
            _print_exact(r, s, args.mass)
            continue
        print(f"{'length':>6} {'paths':>22} {'grad/path':>11} {'total':>11} {'share':>7}")
        for row in r.rows:
            print(f"{row['length']:>6} {row['paths']:>22} {row['grad_mean']:11.4e} {row['total']:11.4e} "
                  f"{100 * row['total_fraction']:6.2f}%")
        if s["effective_range"]:
            lo, hi = s["effective_range"]
            print(f"effective paths: {args.mass:.0%} of the total gradient from lengths {lo}-{hi} "
                  f"({100 * s['effective_paths_fraction']:.3g}% of all paths)"
                  + (" [interpolated between measured lengths]" if s["interpolated"] else ""))
    print("wrote " + ", ".join(res["files"].values()))
    return 0


def _print_exact(r: object, s: dict, mass: float) -> None:
    """The table of ``--method exact`` (an :class:`~reslab.analysis.paths.ExactPathResult`)."""
    print(f"exact sum over all paths of each length, {s['images']} images; sum over lengths vs the ordinary "
          f"gradient: {s['sum_rel_err']:.2e} relative error; {s['backward_equivalents']:.0f} backward-pass "
          "equivalents")
    print(f"{'length':>6} {'paths':>22} {'summed_norm':>11} {'norm_share':>10} {'proj_share':>10}")
    for row in r.rows:  # type: ignore[attr-defined]
        print(f"{row['length']:>6} {row['paths']:>22} {row['summed_norm']:11.4e} "
              f"{100 * row['summed_fraction']:9.2f}% {100 * row['projection_share']:9.2f}%")
    if s["effective_range_summed"]:
        lo, hi = s["effective_range_summed"]
        print(f"{mass:.0%} of the summed norms from lengths {lo}-{hi} ({100 * s['effective_paths_fraction']:.3g}% of "
              "all paths); summed_norm is the norm of the sum over paths, not the paper's C(n,k) x E||g_path||")

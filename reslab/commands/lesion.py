"""``reslab lesion RUN_DIR|CHECKPOINT [...] --mode single|k|reorder``: Veit et al. 2016 lesion study.

Several run directories / checkpoints (e.g. a ResNet, its plain twin, an SD-trained ResNet)
go into one table and one plot. Writes ``lesion_<mode>.csv`` and ``.png`` to ``--out``.

The error is measured on the TEST split by default, also for runs trained with
``data.val_split`` (``--split val`` takes their validation images); every output names the
split. ``--bn recalibrated`` re-estimates the BN statistics on training batches augmented like
the run's training (``--calib augmented``, default; ``--calib plain``: un-augmented images,
which estimate the statistics of another input distribution). Loading: reslab.studies.inputs.
"""
from __future__ import annotations

import argparse
import json
import os


def _int_list(text: str) -> list[int]:
    try:
        out: list[int] = []
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like '0,1,2,4' or '0-10', got {text!r}") from None


def default_out(target: str) -> str:
    """``RUN_DIR/analysis`` for a run directory; ``<checkpoint folder>/analysis`` for a file;
    ``analysis/MODEL.TAG`` (in the current folder) for pretrained weights ``MODEL:TAG``."""
    p = os.path.abspath(target)
    if not os.path.exists(p):  # a MODEL:TAG target (the loader has resolved it already)
        return os.path.join("analysis", target.replace(":", "."))
    if os.path.isfile(p):
        folder = os.path.dirname(p)
        if os.path.basename(folder) == "checkpoints":
            folder = os.path.dirname(folder)
        return os.path.join(folder, "analysis")
    return os.path.join(p, "analysis")


def add_common(p: argparse.ArgumentParser) -> None:
    """Options shared by ``lesion`` and ``paths`` for loading runs."""
    p.add_argument("--labels", help="comma-separated names for the targets (default: run directory names)")
    p.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint of a run directory")
    p.add_argument("--data-dir", help="where the data lives, if not where the run had it")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="evaluated split: test (default, whatever the run's data.val_split) or val (the run's "
                        "held-out validation images; needs a run trained with data.val_split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (default 0)")
    p.add_argument("--out", help="output directory (default: FIRST_TARGET/analysis)")
    p.add_argument("--json", action="store_true", help="print one JSON object (summary and file paths)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (default: a bar per phase on a terminal, a line per phase otherwise)")


def make_progress(args: argparse.Namespace):
    """The command's progress reporter on stderr (see ``reslab.report.progress``)."""
    from reslab.report.progress import PhaseProgress

    return PhaseProgress(enabled=not getattr(args, "no_progress", False))


def labels_for(args: argparse.Namespace) -> list[str | None]:
    if not args.labels:
        return [None] * len(args.targets)
    labels = [s.strip() for s in args.labels.split(",")]
    if len(labels) != len(args.targets):
        raise ValueError(f"--labels has {len(labels)} names for {len(args.targets)} targets; give one per target")
    return labels


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "lesion", help="lesion study (Veit et al. 2016): delete / reorder residual units -> CSV + PNG",
        description="Delete residual branches at test time and measure the test error: each single unit "
                    "(--mode single), k random units (--mode k) or random swaps of equal-shape units (--mode "
                    "reorder). BN protocols: frozen running statistics (the paper's, default) and/or statistics "
                    "recalibrated on training images for each lesioned network. Several targets are compared "
                    "side by side.")
    p.add_argument("targets", nargs="+", metavar="RUN_DIR|CHECKPOINT|MODEL:TAG",
                   help="one or more runs, checkpoints or pretrained MODEL:TAG")
    p.add_argument("--mode", choices=("single", "k", "reorder"), default="single", help="experiment (default single)")
    p.add_argument("--bn", choices=("frozen", "recalibrated", "both"), default="frozen",
                   help="BatchNorm protocol (default frozen = the paper's)")
    p.add_argument("--ks", type=_int_list, help="k values for --mode k, e.g. '0-20' or '0,2,4' (default all)")
    p.add_argument("--swaps", type=_int_list, help="swap counts for --mode reorder (default 0,1,2,4,...)")
    p.add_argument("--repeats", type=int, default=10, help="random draws per k / swap count (default 10)")
    p.add_argument("--include-downsample", action="store_true",
                   help="--mode k: also delete downsampling units (of residual networks)")
    p.add_argument("--max-images", type=int, help="evaluate on a fixed random subset of this many test images")
    p.add_argument("--batch-size", type=int, default=250, help="evaluation batch size (default 250)")
    p.add_argument("--calib-batches", type=int, default=20,
                   help="training batches for BN recalibration (default 20; with --bn recalibrated/both)")
    p.add_argument("--calib", choices=("augmented", "plain"), default="augmented",
                   help="BN recalibration batches: augmented like the run's training (default; the stored running "
                        "statistics were estimated on augmented batches) or plain (un-augmented training images)")
    p.add_argument("--no-cache", action="store_true", help="--mode single: naive sweep without prefix caching")
    add_common(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from reslab.analysis.report_sections import run_lesion_experiment
    from reslab.studies.inputs import load_for_analysis

    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.calib_batches < 1:
        raise ValueError(f"--calib-batches must be >= 1, got {args.calib_batches}")
    need_calib = args.bn != "frozen"
    models, evals, calibs = {}, {}, {}
    for target, label in zip(args.targets, labels_for(args)):
        inp = load_for_analysis(target, device=args.device, which=args.which, data_dir=args.data_dir,
                                max_images=args.max_images, batch_size=args.batch_size,
                                calib_batches=args.calib_batches if need_calib else 0,
                                calib_augment=args.calib == "augmented", split=args.split, label=label)
        if inp.label in models:
            raise ValueError(f"two targets are both named {inp.label!r}; name them with --labels a,b,...")
        models[inp.label], evals[inp.label], calibs[inp.label] = inp.model, inp.batches, inp.calib
    out = args.out or default_out(args.targets[0])
    kw: dict = dict(n_calib=args.calib_batches)
    if args.mode == "single":
        kw["cached"] = not args.no_cache
    elif args.mode == "k":
        kw.update(ks=args.ks, repeats=args.repeats, seed=args.seed, include_downsample=args.include_downsample)
    else:
        kw.update(swaps=args.swaps, repeats=args.repeats, seed=args.seed)
    with make_progress(args) as progress:
        res = run_lesion_experiment(models, evals, args.mode, out, bn=args.bn,
                                    calib_batches=calibs if need_calib else None, progress=progress.update,
                                    split=args.split, **kw)
    calib = args.calib if need_calib else None
    if args.json:
        print(json.dumps(dict(mode=args.mode, bn=args.bn, split=args.split, calib=calib, summary=res["summary"],
                              files=res["files"])))
        return 0
    print(f"error on the {'test' if args.split == 'test' else 'validation'} split"
          + ("" if calib is None else f"; BN recalibrated on {calib} training batches"))
    _print_human(res)
    print(f"wrote {res['files']['csv']} and {res['files']['png']}")
    return 0


def _pct(v: float | None) -> str:
    return "      -" if v is None else f"{100 * v:6.2f}%"


def _print_human(res: dict) -> None:
    mode, rows = res["mode"], res["rows"]
    if mode == "single":
        for s in res["summary"]:
            print(f"{s['model']} ({s['bn']} BN): intact {_pct(s['baseline']).strip()}")
        print(f"{'model':>16} {'bn':>12} {'unit':>4} {'stage':>5} {'down':>4} {res['split'] + ' err':>8} "
              f"{'delta':>8}")
        for r in rows:
            if r["unit"] == -1:
                continue
            d = "-" if r["delta"] is None else f"{100 * r['delta']:+.2f}"
            down = "yes" if r["downsample"] else ""
            print(f"{r['model']:>16} {r['bn']:>12} {r['unit']:>4} {r['stage']:>5} {down:>4} "
                  f"{_pct(r['error'])} {d:>8}")
    else:
        by = "k" if mode == "k" else "swaps"
        extra = "" if mode == "k" else f" {'tau':>6}"
        print(f"{'model':>16} {'bn':>12} {by:>5} {res['split'] + ' err':>8} {'std':>6}{extra}")
        for s in res["summary"]:
            t = "" if mode == "k" else f" {s['tau_mean']:6.3f}"
            print(f"{s['model']:>16} {s['bn']:>12} {s[by]:>5} {_pct(s['mean'])} {100 * s['std']:6.2f}{t}")

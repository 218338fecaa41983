"""``reslab study list`` | ``reslab study NAME [--budget B] [--data-dir D] [--store S] [--out O] [--plan|--collect]``.

A study is a paper's experiment end to end: the runs it needs are trained, resumed or reused
in the run store (one lock per run, so several processes may share it), then analysed into
OUT/report.md, OUT/results.json and PNG figures. --plan prints one `reslab train` command per
missing run for any launcher (a SLURM array, GNU parallel, torchrun), --collect writes the
report from finished runs only.
"""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "study", help="run a paper's experiment end to end (runs in the store -> report.md, results.json)",
        description=__doc__.split("\n", 2)[2] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="a study (see `reslab study list`), or `list`")
    p.add_argument("--budget", default="smoke",
                   help="smoke (minutes, tiny data: checks the pipeline), laptop (a 2-core CPU: hours) or paper "
                        "(the paper's recipes); default smoke")
    p.add_argument("--data-dir", metavar="DATA", help="where the data sets live (sets data.data_dir of every run)")
    p.add_argument("--store", metavar="DIR", help="run store (default $RESLAB_HOME/store, else ~/.cache/reslab/store)")
    p.add_argument("--out", metavar="DIR", help="output folder (default ./study_NAME_BUDGET)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--plan", action="store_true",
                   help="print a `reslab train` command per missing run (stdout) and train nothing")
    p.add_argument("--collect", action="store_true", help="write the report from finished runs only")
    p.add_argument("--pretrained", action="store_true",
                   help="use shipped weights (`reslab weights list`) for the runs that name them, instead of training")
    p.add_argument("--recompute", action="store_true",
                   help="redo the analyses even when the store already holds them for these runs and options")
    p.set_defaults(func=run)
    return p


def _list() -> int:
    from reslab.studies import list_studies

    studies = list_studies()
    if not studies:
        print("no studies in this installation")
        return 0
    width = max(len(s.name) for s in studies)
    for s in studies:
        counts = ", ".join(f"{b} {len(s.plan(b).runs)}" for b in ("smoke", "laptop", "paper"))
        print(f"{s.name:<{width}}  {s.title}")
        print(f"{'':<{width}}  {s.paper}; runs per budget: {counts}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.name == "list":
        return _list()
    from reslab.studies import get_study
    from reslab.studies.base import check_budget
    from reslab.studies.runner import run_study

    study = get_study(args.name)
    check_budget(args.budget)
    device = args.device
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")

    def err(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = run_study(study, args.budget, store=args.store, out=args.out, data_dir=args.data_dir, device=device,
                       plan_only=args.plan, collect_only=args.collect, pretrained=args.pretrained,
                       recompute=args.recompute,
                       progress=err if args.plan else (lambda m: print(m, flush=True)))
    if args.plan:
        for line in result:
            print(line)
    return 0

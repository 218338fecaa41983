"""``reslab demo``: a residual network and its plain twin on the offline digits data set.

:func:`run_demo` trains both models with one recipe, evaluates them, and writes
``report.md`` with training curves. The report is a list of *sections*: functions that
take the :class:`DemoContext` (trained runs, data, output folder) and return a
:class:`ReportSection` (or ``None`` to skip). :func:`default_sections` is the extension
point: later analyses (lesion study, path lengths) add their section functions there, or a
caller passes its own list to ``run_demo(sections=...)``.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from reslab.data import ImageDataset
from reslab.report.markdown import ReportSection, markdown_table, write_report
from reslab.report.plots import training_curves
from reslab.report.progress import PhaseProgress
from reslab.train import Callback, TrainConfig, TrainResult, load_config, load_model_from_checkpoint, train
from reslab.train.logging import read_metrics

# (label, model name): the residual network and its plain twin (same layers, no shortcuts).
DEMO_MODELS: tuple[tuple[str, str], ...] = (("ResNet-20", "cifar_resnet20"), ("plain-20", "cifar_plain20"))
DEMO_EPOCHS = 15


def demo_config(model_name: str, epochs: int = DEMO_EPOCHS, seed: int = 0) -> TrainConfig:
    """The demo recipe: digits (8x8 grey), batch 64, SGD + Nesterov, cosine with a 1-epoch warm-up."""
    return load_config(None, [
        f"model.name={model_name}", "data.name=digits", f"train.epochs={epochs}", "train.batch_size=64",
        "optim.lr=0.1", "optim.nesterov=true", "optim.weight_decay=5e-4", "schedule.name=cosine",
        "schedule.warmup=linear", "schedule.warmup_epochs=1", f"train.seed={seed}", "train.log_every_steps=10",
        "train.device=cpu", "train.tensorboard=false", "eval.batch_size=400",
    ])


@dataclass
class DemoRun:
    """One trained model of the demo."""

    label: str
    model_name: str
    run_dir: Path
    result: TrainResult
    params: int
    train_seconds: float

    @property
    def top1(self) -> float:
        return float(self.result.final["top1"])

    @property
    def loss(self) -> float:
        return float(self.result.final["loss"])


@dataclass
class DemoContext:
    """What a report section can use."""

    out_dir: Path
    runs: dict[str, DemoRun]
    eval_set: ImageDataset
    train_set: ImageDataset
    epochs: int
    extras: dict[str, Any] = field(default_factory=dict)  # sections may leave results here for later ones
    progress: Callable[[str, int, int], None] | None = None  # progress(phase, done, total); sections call it

    def load_model(self, label: str, which: str = "last") -> nn.Module:
        """The trained model of run ``label`` (eval mode, CPU)."""
        model, _, _ = load_model_from_checkpoint(self.runs[label].run_dir, which=which)
        return model


Section = Callable[[DemoContext], "ReportSection | None"]


def setup_section(ctx: DemoContext) -> ReportSection:
    """What was trained, on what, how."""
    r = next(iter(ctx.runs.values())).result.config
    body = (f"Data: scikit-learn's `digits` ({len(ctx.train_set)} training / {len(ctx.eval_set)} test images, "
            f"8x8 grey, shipped with scikit-learn, so the demo runs offline). Augmentation: pad {r.data.crop_padding} "
            f"+ random crop, no flip (mirrored digits are other symbols).\n\n"
            f"Recipe (same for both models): {ctx.epochs} epochs, batch {r.train.batch_size}, SGD momentum "
            f"{r.optim.momentum} (Nesterov), lr {r.optim.lr}, cosine schedule with a 1-epoch linear warm-up, "
            f"weight decay {r.optim.weight_decay}, seed {r.train.seed}.\n\n"
            "The plain network is the ResNet's twin: the same convolutions, batch norms and widths, without the "
            "identity shortcuts (He et al. 2015, \"plain\" baselines).")
    return ReportSection("Setup", body)


def results_section(ctx: DemoContext) -> ReportSection:
    """Final test accuracy of each model, and the curves."""
    rows = [(r.label, f"`{r.model_name}`", f"{r.params:,}", f"{100 * r.top1:.2f}", f"{100 * (1 - r.top1):.2f}",
             f"{r.loss:.4f}", f"{r.train_seconds:.0f}") for r in ctx.runs.values()]
    table = markdown_table(["model", "name", "params", "test top-1 (%)", "test error (%)", "test loss",
                            "train time (s)"], rows)
    fig = training_curves({r.label: r.run_dir for r in ctx.runs.values()}, ctx.out_dir / "training_curves.png",
                          title="digits: residual vs plain")
    labels = list(ctx.runs)
    note = ""
    if len(labels) == 2:
        a, b = (ctx.runs[k] for k in labels)
        diff = 100 * (a.top1 - b.top1)
        note = (f"\n\n{a.label} ends {abs(diff):.2f} points {'above' if diff >= 0 else 'below'} {b.label} on the "
                f"test set. Single runs on a small data set: differences of a point or two are within seed noise.")
    return ReportSection("Results", table + note, [(fig.name, "Training loss and train/test error per epoch.")])


# ---- the analysis sections (Veit et al. 2016): data from reslab.studies.inputs, analysis pure -------------
def demo_lesion_section(ctx: DemoContext) -> ReportSection:
    """Lesion study of every demo network (ResNet and plain twin side by side) on the test split,
    frozen BN and BN recalibrated on augmented training batches (the demo's own training
    augmentation; reslab.studies.inputs)."""
    from reslab.analysis.report_sections import LESION_TITLE, _lesion_body
    from reslab.studies.inputs import DEMO_CALIB_BATCHES, demo_batches, demo_calib_batches, demo_models

    models, _ = demo_models(ctx)
    calib = demo_calib_batches(ctx, DEMO_CALIB_BATCHES)
    augmented = _demo_has_config(ctx)
    results: dict[str, Any] = {}
    body, figs = _lesion_body(models, demo_batches(ctx.eval_set), ctx.out_dir, calib=calib, ks=None, repeats=5,
                              seed=0, n_calib=DEMO_CALIB_BATCHES, progress=getattr(ctx, "progress", None),
                              results=results, split="test",
                              calib_kind="augmented training batches" if augmented else "training images")
    if isinstance(getattr(ctx, "extras", None), dict):
        ctx.extras["lesion"] = results  # the report's first paragraph quotes these numbers
    return ReportSection(LESION_TITLE, body, figs)


def _demo_has_config(ctx: Any) -> bool:
    run = next(iter(ctx.runs.values()), None)
    return isinstance(getattr(getattr(run, "result", None), "config", None), TrainConfig)


def demo_paths_section(ctx: DemoContext) -> ReportSection | None:
    """Path-length analysis of the demo's residual network (the plain twin has a single path),
    gradients on random training batches (Veit et al. 2016 §5); ``None`` without a residual network."""
    from reslab.analysis.report_sections import PATHS_TITLE, _paths_body
    from reslab.studies.inputs import demo_batches, demo_models

    models, residual = demo_models(ctx)
    if residual is None:
        return None
    train_set = getattr(ctx, "train_set", None)
    if train_set is not None:
        batches, grad_data = demo_batches(train_set.subset(min(len(train_set), 8 * 32), seed=2), 32), "train"
    else:
        batches, grad_data = demo_batches(ctx.eval_set, 32), "test"
    body, figs = _paths_body(models[residual], batches, ctx.out_dir, label=residual, samples=8, at="unit",
                             bn="eval", seed=0, mass=0.9, progress=getattr(ctx, "progress", None), grad_data=grad_data)
    return ReportSection(PATHS_TITLE, body, figs)


def demo_sections() -> list[Section]:
    """The analysis sections :func:`default_sections` appends: lesion study, path lengths."""
    return [demo_lesion_section, demo_paths_section]


def default_sections() -> list[Section]:
    """The report's sections, in order (a fresh list; extend it to add analyses):
    setup, results, then the lesion study and path-length analysis (Veit et al. 2016)."""
    return [setup_section, results_section, *demo_sections()]


def _prepare_out(out: Path, labels: list[str], force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force to replace the demo's files, or choose "
                                  f"another --out")
        shutil.rmtree(out / "runs", ignore_errors=True)
        for f in ("report.md", "training_curves.png"):
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


# ---- the first paragraph: where the two networks differ, computed from the measurements --------------
TIE_POINTS = 1.0        # test accuracies closer than this (points) are called a tie: single runs, seed noise
CONVERGED_ERROR = 0.05  # "converged": training error (running, augmented) at or below 5%
LESION_CONTRAST = 10.0  # points of extra error (one unit deleted) that count as a contrast


def _epoch_records(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir) if r.get("kind") == "epoch"]


def training_facts(run: DemoRun) -> dict[str, Any]:
    """Convergence of one demo run from its ``metrics.jsonl``: the first epoch with training
    error <= ``CONVERGED_ERROR`` (None if never), the mean and final training loss."""
    recs = _epoch_records(run.run_dir)
    first = next((r["epoch"] for r in recs if 1 - r["train_acc"] <= CONVERGED_ERROR), None)
    losses = [float(r["train_loss"]) for r in recs]
    return dict(epochs=len(recs), converged_epoch=first, mean_loss=sum(losses) / len(losses) if losses else math.nan,
                final_loss=losses[-1] if losses else math.nan)


def _lesion_means(ctx: DemoContext) -> tuple[str, dict[str, tuple[float, float]]] | None:
    """(BN protocol, {label: (intact error, mean error with one non-downsampling unit deleted)})."""
    summary = ctx.extras.get("lesion", {}).get("single")
    if not summary:
        return None
    protos = {s["bn"] for s in summary}
    proto = "recalibrated" if "recalibrated" in protos else "frozen"
    out = {s["model"]: (s["baseline"], s["non_downsampling"]["mean"]) for s in summary
           if s["bn"] == proto and s["non_downsampling"]["mean"] is not None}
    return proto, out


def lesson_paragraph(ctx: DemoContext) -> str:
    """The report's first paragraph: where the residual network and its plain twin differ, from
    this run's numbers only (test accuracy, convergence of the training loss, the lesion study).
    A contrast the numbers do not show is said not to show."""
    labels = list(ctx.runs)
    if len(labels) != 2:
        return ""
    a, b = (ctx.runs[k] for k in labels)
    n_test = len(ctx.eval_set)
    diff = 100 * (a.top1 - b.top1)
    found: list[str] = []
    if abs(diff) < TIE_POINTS:
        acc = (f"On the test set the two are a tie: {a.label} {100 * a.top1:.2f}% and {b.label} {100 * b.top1:.2f}% "
               f"top-1 ({round(abs(diff) * n_test / 100)} of {n_test} images apart; single runs, within seed noise), "
               "so accuracy is not where this demo shows the difference.")
    else:
        hi, lo = (a, b) if diff > 0 else (b, a)
        acc = (f"On the test set {hi.label} is ahead: {100 * hi.top1:.2f}% against {100 * lo.top1:.2f}% top-1 "
               f"({abs(diff):.2f} points, {round(abs(diff) * n_test / 100)} of {n_test} images; one seed each).")
        if hi is a:
            found.append("accuracy")
    fa, fb = training_facts(a), training_facts(b)

    def when(f: dict[str, Any]) -> str:
        return (f"after {f['converged_epoch']} of {f['epochs']} epochs" if f["converged_epoch"] is not None
                else f"in none of its {f['epochs']} epochs")

    ca = fa["converged_epoch"] if fa["converged_epoch"] is not None else math.inf
    cb = fb["converged_epoch"] if fb["converged_epoch"] is not None else math.inf
    conv = (f"{a.label} reached a training error of {100 * CONVERGED_ERROR:.0f}% {when(fa)}, {b.label} {when(fb)}; "
            f"mean training loss over the run {fa['mean_loss']:.3f} against {fb['mean_loss']:.3f}, final "
            f"{fa['final_loss']:.4f} against {fb['final_loss']:.4f}")
    if ca < cb and fa["mean_loss"] < fb["mean_loss"]:
        conv = f"Training: the residual network converged faster. {conv}."
        found.append("speed of convergence")
    elif ca == cb or (ca < cb) != (fa["mean_loss"] < fb["mean_loss"]):
        conv = f"Training: no clear difference in convergence in this run. {conv}."
    else:
        conv = f"Training: in this run the plain twin converged faster. {conv}."
    les = ""
    lm = _lesion_means(ctx)
    if lm is not None and a.label in lm[1] and b.label in lm[1]:
        proto, m = lm
        (ba, ma), (bb, mb) = m[a.label], m[b.label]
        nums = (f"deleting one non-downsampling unit at test time ({proto} BN) takes {a.label} from {100 * ba:.1f}% "
                f"to {100 * ma:.1f}% error on average, and {b.label} from {100 * bb:.1f}% to {100 * mb:.1f}%")
        if 100 * ((mb - bb) - (ma - ba)) >= LESION_CONTRAST:
            les = (f"Lesions: {nums}. The residual network behaves like an ensemble of many paths, most of which "
                   f"survive the loss of one unit; every unit of the plain network lies on its only path "
                   "(Veit et al. 2016).")
            found.append("the lesion study")
        else:
            les = f"Lesions: {nums}; this run does not show the expected contrast."
    if found:
        lead = f"**Where {a.label} and its plain twin differ in this run: {', '.join(found)}.**"
    else:
        lead = f"**This run does not show where {a.label} and its plain twin differ**; the numbers are below."
    return " ".join(x for x in (lead, acc, conv, les) if x)


class _EpochLines(Callback):
    """A line per epoch through the progress reporter (used when no tqdm bar is shown)."""

    def __init__(self, progress: PhaseProgress, phase: str, epochs: int) -> None:
        self.progress, self.phase, self.epochs = progress, phase, epochs

    def epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        self.progress.update(self.phase, epoch, self.epochs)


def run_demo(out_dir: str | os.PathLike = "reslab_demo", epochs: int | None = None,
             sections: list[Section] | None = None, force: bool = False, progress: bool = True,
             models: tuple[tuple[str, str], ...] = DEMO_MODELS, seed: int = 0,
             progress_file: Any = None) -> dict[str, Any]:
    """Train the demo models, evaluate them, write the report.

    ``progress``: training bars and a bar per analysis phase on a terminal, a line per phase
    (and per training epoch) on ``progress_file`` (default stderr) otherwise; ``False``: silent.
    Returns ``{"out_dir", "report", "models": {label: {"model", "top1", "loss", "params",
    "train_seconds", "run_dir"}}, "seconds": {phase: wall s}, "context": DemoContext}``.
    """
    out = Path(out_dir)
    epochs = epochs or DEMO_EPOCHS
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    _prepare_out(out, [m[0] for m in models], force)
    reporter = PhaseProgress(enabled=progress, file=progress_file if progress_file is not None else sys.stderr)
    t_start = time.perf_counter()
    runs: dict[str, DemoRun] = {}
    train_set = eval_set = None
    for label, name in models:
        cfg = demo_config(name, epochs, seed)
        run_dir = out / "runs" / name
        phase = f"train {name}"
        t0 = time.perf_counter()
        if reporter.bars:  # the engine's own tqdm bar
            reporter.line(f"{phase}: {epochs} epochs")
            result = train(cfg, run_dir, progress=True)
        else:
            reporter.update(phase, 0, epochs)
            result = train(cfg, run_dir, progress=False, callbacks=[_EpochLines(reporter, phase, epochs)])
        seconds = time.perf_counter() - t0
        reporter.end()
        reporter.times[phase] = seconds
        model, _, _ = load_model_from_checkpoint(run_dir, which="last")
        params = sum(p.numel() for p in model.parameters())
        runs[label] = DemoRun(label, name, run_dir, result, params, seconds)
    from reslab.train.engine import prepare_data

    _, train_set, eval_set = prepare_data(next(iter(runs.values())).result.config)
    ctx = DemoContext(out_dir=out, runs=runs, eval_set=eval_set, train_set=train_set, epochs=epochs,
                      progress=reporter.update)
    built = []
    for fn in (sections if sections is not None else default_sections()):
        sec = fn(ctx)
        reporter.end()
        if sec:
            built.append(sec)
    total = time.perf_counter() - t_start
    times = dict(reporter.times, total=total)
    lesson = lesson_paragraph(ctx)
    intro = "\n\n".join(x for x in (
        lesson,
        "A residual network and its plain twin trained with the same recipe on a small offline data set. "
        f"Written by `reslab demo` (torch {torch.__version__}, {torch.get_num_threads()} CPU threads) in "
        f"{total:.0f} s wall time ({', '.join(f'{k} {v:.0f} s' for k, v in reporter.times.items())})."
    ) if x)
    report = write_report(out / "report.md", "reslab demo: residual vs plain on digits", built, intro)
    reporter.line(f"demo done in {total:.0f} s")
    return {"out_dir": str(out), "report": str(report), "context": ctx, "seconds": times,
            "models": {k: {"model": r.model_name, "top1": r.top1, "loss": r.loss, "params": r.params,
                           "train_seconds": r.train_seconds, "run_dir": str(r.run_dir)} for k, r in runs.items()}}

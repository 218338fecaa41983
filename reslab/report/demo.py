"""``reslab demo``: a residual network and its plain twin on the offline digits data set.

:func:`run_demo` trains both models with one recipe, evaluates them, and writes
``report.md`` with training curves. The report is a list of *sections*: functions that
take the :class:`DemoContext` (trained runs, data, output folder) and return a
:class:`ReportSection` (or ``None`` to skip). :func:`default_sections` is the extension
point: later analyses (lesion study, path lengths) add their section functions there, or a
caller passes its own list to ``run_demo(sections=...)``.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from reslab.data import ImageDataset
from reslab.report.markdown import ReportSection, markdown_table, write_report
from reslab.report.plots import training_curves
from reslab.train import TrainConfig, TrainResult, load_config, load_model_from_checkpoint, train

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


def default_sections() -> list[Section]:
    """The report's sections, in order (a fresh list; extend it to add analyses):
    setup, results, then the lesion study and path-length analysis (Veit et al. 2016)."""
    from reslab.analysis.report_sections import demo_sections

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


def run_demo(out_dir: str | os.PathLike = "reslab_demo", epochs: int | None = None,
             sections: list[Section] | None = None, force: bool = False, progress: bool = True,
             models: tuple[tuple[str, str], ...] = DEMO_MODELS, seed: int = 0) -> dict[str, Any]:
    """Train the demo models, evaluate them, write the report.

    Returns ``{"out_dir", "report", "models": {label: {"model", "top1", "loss", "params",
    "train_seconds", "run_dir"}}, "context": DemoContext}``.
    """
    out = Path(out_dir)
    epochs = epochs or DEMO_EPOCHS
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    _prepare_out(out, [m[0] for m in models], force)
    runs: dict[str, DemoRun] = {}
    train_set = eval_set = None
    for label, name in models:
        cfg = demo_config(name, epochs, seed)
        run_dir = out / "runs" / name
        t0 = time.perf_counter()
        result = train(cfg, run_dir, progress=progress)
        seconds = time.perf_counter() - t0
        model, _, _ = load_model_from_checkpoint(run_dir, which="last")
        params = sum(p.numel() for p in model.parameters())
        runs[label] = DemoRun(label, name, run_dir, result, params, seconds)
    from reslab.train.engine import prepare_data

    _, train_set, eval_set = prepare_data(next(iter(runs.values())).result.config)
    ctx = DemoContext(out_dir=out, runs=runs, eval_set=eval_set, train_set=train_set, epochs=epochs)
    built = [s for s in (fn(ctx) for fn in (sections if sections is not None else default_sections())) if s]
    intro = ("A residual network and its plain twin trained with the same recipe on a small offline data set. "
             f"Written by `reslab demo` (torch {torch.__version__}).")
    report = write_report(out / "report.md", "reslab demo: residual vs plain on digits", built, intro)
    return {"out_dir": str(out), "report": str(report), "context": ctx,
            "models": {k: {"model": r.model_name, "top1": r.top1, "loss": r.loss, "params": r.params,
                           "train_seconds": r.train_seconds, "run_dir": str(r.run_dir)} for k, r in runs.items()}}

"""Plots for reports (matplotlib's Agg canvas: no display, no global backend switch)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from reslab.analysis.plots import error_axis
from reslab.train.logging import read_metrics


def training_curves(runs: Mapping[str, str | os.PathLike], path: str | os.PathLike, title: str | None = None) -> Path:
    """PNG with two panels per epoch: training loss, and train/test top-1 error (%) of each run.

    ``runs`` maps a legend label to a run directory (its ``metrics.jsonl`` is read).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_err = fig.subplots(1, 2)
    for i, (label, run_dir) in enumerate(runs.items()):
        color = f"C{i}"
        epochs = [r for r in read_metrics(run_dir) if r.get("kind") == "epoch"]
        if not epochs:
            continue
        ep = [r["epoch"] for r in epochs]
        ax_loss.plot(ep, [r["train_loss"] for r in epochs], color=color, marker="o", ms=3, label=label)
        ax_err.plot(ep, [100 * (1 - r["train_acc"]) for r in epochs], color=color, ls="--", marker="x", ms=4,
                    label=f"{label} train")
        for split in ("val", "test"):
            ev = [(r["epoch"], 100 * (1 - r[f"{split}_top1"])) for r in epochs if f"{split}_top1" in r]
            if ev:
                ax_err.plot(*zip(*ev), color=color, marker="o" if split == "test" else "s", ms=3,
                            label=f"{label} {split}")
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    ax_err.set(xlabel="epoch", title="error (dashed: train, solid: val or test, as labelled)")
    error_axis(ax_err, "top-1 error")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        # below the axes, off the curves
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncols=2, borderaxespad=0.0)
    if title:
        fig.suptitle(title)
    from reslab.analysis.plots import save_figure

    return Path(save_figure(fig, path))

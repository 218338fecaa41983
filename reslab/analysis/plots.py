"""Figures of the lesion and path-length analyses (matplotlib's Agg canvas, PNG files).

Layouts follow Veit et al. 2016: single-unit lesion (error per deleted unit, Fig. 3),
k-unit lesion (error vs number of deleted units, Fig. 5a), reordering (error vs Kendall's
tau, Fig. 5b) and the path-length figure (Fig. 6 a, b, c). Every curve is labelled with the
network and the BatchNorm protocol; what was not measured is left as a gap (NaN breaks the
line); error bands are clipped to [0, 100]%; legends sit outside the axes; every error bar
or band is named in the legend.

Each ``*_figure`` function returns the :class:`matplotlib.figure.Figure` (for tests and
notebooks); each ``plot_*`` function draws it and writes the PNG.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

from reslab.analysis.lesion import summarize
from reslab.analysis.paths import path_length_distribution

NAN = float("nan")
# Error axis of the lesion plots: linear below 1%, logarithmic above, so that an intact
# network at 0.5% error and a broken one at 90% are both readable.
ERROR_TICKS = (0, 0.5, 1, 2, 5, 10, 20, 50, 100)


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kw: Any) -> str:
    """Write ``fig`` as PNG (the folder is created; written to a temporary name, then renamed, so a
    reader never sees half a file); returns the path."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp")
    fig.savefig(tmp, format="png", **savefig_kw)
    os.replace(tmp, path)
    return str(path)


def _curves(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for r in rows:
        key = (r["model"], r["bn"])
        if key not in seen:
            seen.append(key)
    return seen


def error_axis(ax: Any, label: str = "test error") -> None:
    """A 0-100% error axis, linear below 1% and logarithmic above (``ERROR_TICKS``)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    ax.set_yscale("symlog", linthresh=1.0, linscale=0.6)
    ax.set_ylim(0, 100)
    ax.yaxis.set_major_locator(FixedLocator(ERROR_TICKS))
    ax.yaxis.set_minor_locator(FixedLocator([]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel(f"{label} (%; log scale above 1%)")
    ax.grid(alpha=0.3, which="major")


def error_label(rows: Sequence[dict[str, Any]]) -> str:
    """"test error" / "val error": the split the rows were measured on (their ``split`` key;
    test when they do not say)."""
    splits = {r.get("split", "test") for r in rows} or {"test"}
    return f"{'/'.join(sorted(splits))} error"


def _legend_outside(ax: Any, **kw: Any) -> Any:
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, **kw)


def _pct_clip(v: float) -> float:
    return min(100.0, max(0.0, v))


# ---- single-unit lesion --------------------------------------------------------------------------
def single_lesion_figure(rows: Sequence[dict[str, Any]], title: str | None = None) -> Any:
    """Test error with each single unit deleted, one curve per (network, BN protocol).

    Units that could not be deleted (downsampling units of a plain network) are gaps in the
    curve (NaN) and crosses at the bottom of the axes; downsampling units are open squares;
    the intact network's error is a dashed line of the curve's colour, in the legend."""
    fig = _figure((9, 4.2))
    ax = fig.add_subplot()
    not_measured_done = down_done = False
    for j, (m, b) in enumerate(_curves(rows)):
        sel = [r for r in rows if r["model"] == m and r["bn"] == b]
        base = next(r["error"] for r in sel if r["unit"] == -1)
        units = sorted((r for r in sel if r["unit"] != -1), key=lambda r: r["unit"])
        color = f"C{j}"
        xs = [r["unit"] for r in units]
        ys = [NAN if r["error"] is None else 100 * r["error"] for r in units]
        ax.plot(xs, ys, "o-", ms=3.5, color=color, label=f"{m} ({b} BN), one unit deleted")
        ds = [r for r in units if r["downsample"] and r["error"] is not None]
        if ds:
            ax.plot([r["unit"] for r in ds], [100 * r["error"] for r in ds], "s", ms=8, mfc="none", color=color,
                    label=None if down_done else "downsampling unit")
            down_done = True
        ax.axhline(100 * base, ls=(0, (5, 3)), lw=1.6, color=color, label=f"{m} ({b} BN), intact: {100 * base:.2f}%")
        missing = [r["unit"] for r in units if r["error"] is None]
        if missing:
            ax.plot(missing, [0.02] * len(missing), "x", ms=7, mew=1.5, color=color, ls="none",
                    transform=ax.get_xaxis_transform(), clip_on=False,
                    label=None if not_measured_done else "not deletable (not measured)")
            not_measured_done = True
    error_axis(ax, error_label(rows))
    if rows:
        n = 1 + max(r["unit"] for r in rows)
        ax.set_xticks(range(n))
        ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel("deleted unit (0-based index, input to output)")
    ax.set_title(title or "Deleting one residual unit at test time")
    _legend_outside(ax)
    return fig


def plot_single_lesion(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> str:
    """:func:`single_lesion_figure` written to ``path`` (PNG)."""
    return save_figure(single_lesion_figure(rows, title), path)


# ---- k-unit lesion ---------------------------------------------------------------------------------
def k_lesion_figure(rows: Sequence[dict[str, Any]], title: str | None = None) -> Any:
    """Mean test error vs the number k of deleted units; band: mean ± one (population) std
    over the random draws of each k, clipped to [0, 100]%."""
    fig = _figure((8, 4.2))
    ax = fig.add_subplot()
    summ = summarize(rows, "k")
    draws = max((r["n"] for r in summ), default=0)
    for j, (m, b) in enumerate(_curves(rows)):
        s = sorted((r for r in summ if r["model"] == m and r["bn"] == b), key=lambda r: r["k"])
        k = [r["k"] for r in s]
        mu = [100 * r["mean"] for r in s]
        sd = [100 * r["std"] for r in s]
        ax.plot(k, mu, "o-", ms=3.5, color=f"C{j}", label=f"{m} ({b} BN), mean")
        ax.fill_between(k, [_pct_clip(a - c) for a, c in zip(mu, sd)], [_pct_clip(a + c) for a, c in zip(mu, sd)],
                        color=f"C{j}", alpha=0.2, lw=0, label=f"{m} ({b} BN), ± 1 std")
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"{error_label(rows)} (%)")
    ax.grid(alpha=0.3)
    ax.set_xlabel("number of deleted units k (k = 0: intact)")
    ax.set_title(title or f"Deleting k random units (band: ± 1 std over {draws} draws per k, within [0, 100]%)",
                 fontsize=10)
    _legend_outside(ax)
    return fig


def plot_k_lesion(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> str:
    """:func:`k_lesion_figure` written to ``path`` (PNG)."""
    return save_figure(k_lesion_figure(rows, title), path)


# ---- reordering --------------------------------------------------------------------------------------
def reorder_figure(rows: Sequence[dict[str, Any]], title: str | None = None) -> Any:
    """Mean test error vs mean Kendall's tau for each number of swaps (x axis decreasing);
    error bars: ± one std over the draws, clipped to [0, 100]%."""
    fig = _figure((8, 4.2))
    ax = fig.add_subplot()
    summ = summarize(rows, "swaps")
    draws = max((r["n"] for r in summ), default=0)
    for j, (m, b) in enumerate(_curves(rows)):
        s = sorted((r for r in summ if r["model"] == m and r["bn"] == b), key=lambda r: -r["tau_mean"])
        mu = [100 * r["mean"] for r in s]
        sd = [100 * r["std"] for r in s]
        lo = [a - _pct_clip(a - c) for a, c in zip(mu, sd)]
        hi = [_pct_clip(a + c) - a for a, c in zip(mu, sd)]
        ax.errorbar([r["tau_mean"] for r in s], mu, yerr=[lo, hi], fmt="o-", ms=3.5, capsize=2, color=f"C{j}",
                    label=f"{m} ({b} BN), mean ± 1 std")
    ax.invert_xaxis()
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_xlabel("Kendall's tau (original order = 1)")
    ax.set_ylabel(f"{error_label(rows)} (%)")
    ax.set_title(title or f"Reordering units (error bars: ± 1 std over {draws} draws per swap count)", fontsize=10)
    _legend_outside(ax)
    return fig


def plot_reorder(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> str:
    """:func:`reorder_figure` written to ``path`` (PNG)."""
    return save_figure(reorder_figure(rows, title), path)


# ---- path lengths ------------------------------------------------------------------------------------
def paths_figure(results: dict[str, Any], title: str | None = None) -> Any:
    """Veit et al. Fig. 6: (a) number of paths per length (bars: the distribution is
    discrete), (b) gradient magnitude at the input per path length (log scale; error bars:
    ± the standard error of the mean over the (batch, subset) samples), (c) total gradient
    magnitude per length (magnitude x number of paths), shaded: the effective range.
    ``results`` maps a label to a :class:`~reslab.analysis.paths.PathResult`."""
    fig = _figure((15, 4.8))
    axes = fig.subplots(1, 3)
    n_curves = max(1, len(results))
    width = 0.8 / n_curves
    for j, (label, res) in enumerate(results.items()):
        c = f"C{j}"
        rows = res.rows
        L = [r["length"] for r in rows]
        dist = path_length_distribution(res.n_routable)
        off = (j - (n_curves - 1) / 2) * width
        axes[0].bar([d["length"] + res.n_fixed + off for d in dist], [d["paths"] for d in dist], width=width,
                    color=c, alpha=0.8, label=label)
        sem = [r["grad_sem"] if not math.isnan(r["grad_sem"]) else 0.0 for r in rows]
        bar_name = (f"mean ± s.e.m. over {res.samples} samples" if res.samples > 1
                    else "1 sample per length: no error bar")
        axes[1].errorbar(L, [r["grad_mean"] for r in rows], yerr=sem, fmt="o-", ms=3.5, capsize=2, color=c,
                         label=f"{label}: {bar_name}")
        axes[2].plot(L, [r["total"] for r in rows], "o-", ms=3.5, color=c, label=label)
        if res.effective_range is not None:
            lo, hi = res.effective_range
            axes[2].axvspan(lo - 0.5, hi + 0.5, color=c, alpha=0.12,
                            label=f"{label}: {res.effective_mass:.0%} of the total (lengths {lo}-{hi})")
    first = next(iter(results.values()), None)
    where = "first unit's input" if first is None or first.at == "unit" else "image"
    bn = "eval" if first is None else first.bn
    axes[0].set(title="(a) number of paths per length", xlabel="path length", ylabel="number of paths")
    axes[1].set(title=f"(b) gradient magnitude per path\n(at the {where}, {bn}-mode BN)", xlabel="path length",
                ylabel="gradient norm at input", yscale="log")
    axes[2].set(title="(c) total gradient per length\n(magnitude x number of paths)", xlabel="path length",
                ylabel="total gradient magnitude")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(10)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), borderaxespad=0.0)
    if title:
        fig.suptitle(title)
    return fig


def plot_paths(results: dict[str, Any], path: str | os.PathLike, title: str | None = None) -> str:
    """:func:`paths_figure` written to ``path`` (PNG)."""
    return save_figure(paths_figure(results, title), path)

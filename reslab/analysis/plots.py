"""Figures of the lesion and path-length analyses (matplotlib, Agg backend, PNG files).

Layouts follow Veit et al. 2016: single-unit lesion (error per deleted unit, Fig. 3),
k-unit lesion (error vs number of deleted units, Fig. 5a), reordering (error vs Kendall's
tau, Fig. 5b) and the path-length figure (Fig. 6 a, b, c). Every curve is labelled with the
network and the BatchNorm protocol.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from reslab.analysis.lesion import summarize
from reslab.analysis.paths import path_length_distribution


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return str(path)


def _curves(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for r in rows:
        key = (r["model"], r["bn"])
        if key not in seen:
            seen.append(key)
    return seen


def plot_single_lesion(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> str:
    """Test error with each single unit deleted; dashed line: the intact network; downsampling
    units are marked with an open square; ineligible units are left out."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, (m, b) in enumerate(_curves(rows)):
        sel = [r for r in rows if r["model"] == m and r["bn"] == b]
        base = next(r["error"] for r in sel if r["unit"] == -1)
        pts = [r for r in sel if r["unit"] != -1 and r["error"] is not None]
        color = f"C{j}"
        ax.plot([r["unit"] for r in pts], [100 * r["error"] for r in pts], "o-", ms=3, color=color,
                label=f"{m} ({b} BN)")
        ds = [r for r in pts if r["downsample"]]
        if ds:
            ax.plot([r["unit"] for r in ds], [100 * r["error"] for r in ds], "s", ms=8, mfc="none", color=color)
        ax.axhline(100 * base, ls="--", lw=1, color=color)
    ax.set_xlabel("deleted unit (open squares: downsampling)")
    ax.set_ylabel("test error (%)")
    ax.set_title(title or "Single-unit lesion (dashed: intact network)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_k_lesion(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> str:
    """Mean test error (band: +- one std over the random draws) vs the number of deleted units."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    summ = summarize(rows, "k")
    for j, (m, b) in enumerate(_curves(rows)):
        s = sorted((r for r in summ if r["model"] == m and r["bn"] == b), key=lambda r: r["k"])
        k = [r["k"] for r in s]
        mu = [100 * r["mean"] for r in s]
        sd = [100 * r["std"] for r in s]
        ax.plot(k, mu, "o-", ms=3, color=f"C{j}", label=f"{m} ({b} BN)")
        ax.fill_between(k, [a - c for a, c in zip(mu, sd)], [a + c for a, c in zip(mu, sd)], color=f"C{j}", alpha=0.2)
    ax.set_xlabel("number of deleted units k")
    ax.set_ylabel("test error (%)")
    ax.set_title(title or "Deleting k random units")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_reorder(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> str:
    """Mean test error vs mean Kendall's tau for each number of swaps (x axis decreasing)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    summ = summarize(rows, "swaps")
    for j, (m, b) in enumerate(_curves(rows)):
        s = sorted((r for r in summ if r["model"] == m and r["bn"] == b), key=lambda r: -r["tau_mean"])
        ax.errorbar([r["tau_mean"] for r in s], [100 * r["mean"] for r in s], yerr=[100 * r["std"] for r in s],
                    fmt="o-", ms=3, capsize=2, color=f"C{j}", label=f"{m} ({b} BN)")
    ax.invert_xaxis()
    ax.set_xlabel("Kendall's tau (original order = 1)")
    ax.set_ylabel("test error (%)")
    ax.set_title(title or "Reordering units")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_paths(results: dict[str, Any], path: str | os.PathLike, title: str | None = None) -> str:
    """Veit et al. Fig. 6: (a) number of paths per length, (b) gradient magnitude at the input
    per path length (log scale), (c) total gradient magnitude per length (magnitude x paths).
    ``results`` maps a label to a :class:`~reslab.analysis.paths.PathResult`."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for j, (label, res) in enumerate(results.items()):
        c = f"C{j}"
        rows = res.rows
        L = [r["length"] for r in rows]
        dist = path_length_distribution(res.n_routable)
        axes[0].plot([d["length"] + res.n_fixed for d in dist], [d["paths"] for d in dist], "-", color=c, label=label)
        axes[1].errorbar(L, [r["grad_mean"] for r in rows], yerr=[r["grad_sem"] if r["grad_sem"] == r["grad_sem"]
                                                                  else 0.0 for r in rows],
                         fmt="o-", ms=3, capsize=2, color=c, label=label)
        axes[2].plot(L, [r["total"] for r in rows], "o-", ms=3, color=c, label=label)
        if res.effective_range is not None:
            lo, hi = res.effective_range
            axes[2].axvspan(lo - 0.5, hi + 0.5, color=c, alpha=0.12)
    axes[0].set_title("(a) distribution of path length")
    axes[0].set_xlabel("path length")
    axes[0].set_ylabel("number of paths")
    first = next(iter(results.values()))
    where = "first unit's input" if first.at == "unit" else "image"
    axes[1].set_title(f"(b) gradient magnitude per path ({where}, {first.bn} BN)")
    axes[1].set_xlabel("path length")
    axes[1].set_ylabel("gradient norm at input")
    axes[1].set_yscale("log")
    axes[2].set_title(f"(c) total gradient per length (shaded: {first.effective_mass:.0%} of it)")
    axes[2].set_xlabel("path length")
    axes[2].set_ylabel("total gradient magnitude")
    for ax in axes:
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)

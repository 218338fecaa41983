"""Run the ensemble-view experiments end to end (CSV + PNG + a summary) and render report sections.

* :func:`run_lesion_experiment` / :func:`run_paths_experiment`: what ``reslab lesion`` and
  ``reslab paths`` do, as library calls (several networks side by side).
* :func:`lesion_section` / :func:`paths_section`: markdown sections, ``(model, batches,
  out_dir) -> str``; images and CSVs are written to ``out_dir`` and linked by file name
  (relative to the report). ``reslab demo``'s adapters live in :mod:`reslab.report.demo`.

Pure: the caller loads the runs and builds the batches (:mod:`reslab.studies.inputs`) and
says which split they are (``split``) and which data the path gradients use (``grad_data``);
both labels go into every row, summary and plot title.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Sequence

import torch.nn as nn

from reslab.analysis import plots
from reslab.analysis.lesion import (as_batch_list, check_bn, compare_lesions, k_lesion_eligible, summarize,
                                    write_csv)
from reslab.analysis.paths import (PATH_METHODS, PathResult, central_range, exact_path_lengths,
                                   gradient_per_path_length)

LESION_FILES = {"single": "lesion_single", "k": "lesion_k", "reorder": "lesion_reorder"}
# progress(phase, done, total): called by the experiments below as they go (the caller prints;
# reslab.report.progress.PhaseProgress.update is one).
Progress = Callable[[str, int, int], None]


def _tick(progress: Progress | None, phase: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(phase, done, total)


def _summary_single(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for key in dict.fromkeys((r["model"], r["bn"]) for r in rows):
        sel = [r for r in rows if (r["model"], r["bn"]) == key]
        base = next(r["error"] for r in sel if r["unit"] == -1)
        plain = [r for r in sel if r["unit"] != -1 and r["error"] is not None and not r["downsample"]]
        down = [r for r in sel if r["unit"] != -1 and r["error"] is not None and r["downsample"]]
        inel = [r["unit"] for r in sel if r["unit"] != -1 and r["error"] is None]

        def stats(rs: list[dict[str, Any]]) -> dict[str, Any]:
            if not rs:
                return dict(mean=None, max=None, argmax=None)
            worst = max(rs, key=lambda r: r["error"])
            return dict(mean=sum(r["error"] for r in rs) / len(rs), max=worst["error"], argmax=worst["unit"])

        out.append(dict(model=key[0], bn=key[1], baseline=base, non_downsampling=stats(plain),
                        downsampling=stats(down), ineligible=inel))
    return out


SPLIT_NAMES = {"test": "test split", "val": "validation split"}


def split_name(split: str | None) -> str:
    """``"test split"`` / ``"validation split"`` (any other label as given; ``None``: ``"evaluation set"``)."""
    return "evaluation set" if split is None else SPLIT_NAMES.get(split, f"{split} split")


def _lesion_title(mode: str, split: str | None, repeats: int) -> str:
    base = {"single": "Deleting one residual unit at test time",
            "k": f"Deleting k random units (band: ± 1 std over {repeats} draws per k, within [0, 100]%)",
            "reorder": f"Reordering units (error bars: ± 1 std over {repeats} draws per swap count)"}[mode]
    return f"{base}; error on the {split_name(split)}"


def run_lesion_experiment(models: dict[str, nn.Module], batches: Iterable[Any] | dict[str, Iterable[Any]],
                          mode: str = "single", out_dir: str | os.PathLike | None = None, *, bn: str = "frozen",
                          calib_batches: Any = None, progress: Progress | None = None, split: str | None = None,
                          **kwargs: Any) -> dict[str, Any]:
    """One lesion experiment on several networks; writes ``lesion_<mode>.csv`` and ``.png`` to
    ``out_dir`` (when given) and returns ``{"mode", "bn", "split", "rows", "summary", "files"}``.
    ``split`` (``"test"``/``"val"``, given by the caller that built ``batches``) is added to
    every row and summary entry and named in the plot title. ``progress(phase, done, total)``
    is called per network as it goes (phase ``"lesion <mode>: <label>"``)."""
    if isinstance(calib_batches, dict):
        for label in models:
            check_bn(bn, calib_batches.get(label))
    else:
        check_bn(bn, calib_batches)
    rows = []
    for label, m in models.items():
        rows += compare_lesions({label: m}, batches, mode, bn=bn, calib_batches=calib_batches,
                                progress=_tick(progress, f"lesion {mode}: {label}"), **kwargs)
    if mode == "single":
        summary: Any = _summary_single(rows)
    else:
        summary = summarize(rows, "k" if mode == "k" else "swaps")
    if split is not None:
        rows = [dict(r, split=split) for r in rows]
        summary = [dict(s, split=split) for s in summary]
    files: dict[str, str] = {}
    if out_dir is not None:
        stem = os.path.join(str(out_dir), LESION_FILES[mode])
        files["csv"] = write_csv(rows, stem + ".csv")
        plot = {"single": plots.plot_single_lesion, "k": plots.plot_k_lesion, "reorder": plots.plot_reorder}[mode]
        files["png"] = plot(rows, stem + ".png", title=_lesion_title(mode, split, int(kwargs.get("repeats", 10))))
    return dict(mode=mode, bn=bn, split=split, rows=rows, summary=summary, files=files)


def run_paths_experiment(models: dict[str, nn.Module], batches: Iterable[Any] | dict[str, Iterable[Any]],
                         out_dir: str | os.PathLike | None = None, progress: Progress | None = None,
                         grad_data: str | None = None, method: str = "sample", **kwargs: Any) -> dict[str, Any]:
    """Path-length analysis of several networks; writes ``paths.csv`` (one row per network and
    length), ``paths.png`` (Fig. 6 a-c) and ``paths_summary.json``; returns
    ``{"results": {label: PathResult}, "summary": {label: dict}, "grad_data", "files"}``.
    ``grad_data`` names the data ``batches`` come from (``"train"``/``"test"``, given by the
    caller; Veit et al. 2016 §5 use random training batches): it goes into every CSV row, the
    summary and the plot title. ``progress(phase,
    done, total)`` is called per measured length (phase ``"paths: <label>"``). ``method="exact"``:
    :func:`exact_path_lengths` instead of the paper's sampler (``ks``, ``samples``, ``seed``
    ignored; rows hold ``summed_norm``, not the paper's ``total``; no PNG); ``method`` goes into
    every row and summary."""
    if method not in PATH_METHODS:
        raise ValueError(f"method must be one of {PATH_METHODS}, got {method!r}")
    shared = None if isinstance(batches, dict) else as_batch_list(batches)
    results: dict[str, Any] = {}
    for label, m in models.items():
        ev = batches[label] if shared is None else shared
        tick = _tick(progress, f"paths: {label}")
        if method == "exact":
            opts = {k: v for k, v in kwargs.items() if k in ("at", "bn", "mass", "chunk")}
            results[label] = exact_path_lengths(m, ev, progress=tick, **opts)
        else:
            results[label] = gradient_per_path_length(m, ev, progress=tick, **kwargs)
    gd: dict[str, Any] = {} if grad_data is None else {"grad_data": grad_data}
    summary = {label: dict(r.summary(), method=method, **gd) for label, r in results.items()}
    files: dict[str, str] = {}
    if out_dir is not None:
        rows = [dict(model=label, method=method, **gd, at=r.at, bn=r.bn, **row) for label, r in results.items()
                for row in r.rows]
        files["csv"] = write_csv(rows, os.path.join(str(out_dir), "paths.csv"))
        title = None if grad_data is None else f"Gradient per path length, measured on {grad_data_name(grad_data)}"
        if method == "sample":
            files["png"] = plots.plot_paths(results, os.path.join(str(out_dir), "paths.png"), title=title)
        p = os.path.join(str(out_dir), "paths_summary.json")
        with open(p, "w") as f:
            json.dump(summary, f, indent=1)
        files["json"] = p
    return dict(results=results, summary=summary, grad_data=grad_data, files=files)


def grad_data_name(grad_data: str | None) -> str:
    """Words for the data of the path gradients: ``"train"`` -> random training batches, ..."""
    return {None: "the given batches", "train": "random training batches",
            "test": "test-split batches", "val": "validation-split batches"}.get(grad_data, f"{grad_data} batches")


# ---- markdown ---------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _single_table(summary: list[dict[str, Any]]) -> list[str]:
    lines = ["| network | BN | intact | delete one non-downsampling unit: mean / worst | "
             "delete a downsampling unit: worst | not deletable |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        nd, dn = s["non_downsampling"], s["downsampling"]
        worst_nd = "-" if nd["max"] is None else f"{_pct(nd['max'])} (unit {nd['argmax']})"
        worst_dn = "-" if dn["max"] is None else f"{_pct(dn['max'])} (unit {dn['argmax']})"
        inel = ", ".join(map(str, s["ineligible"])) or "-"
        lines.append(f"| {s['model']} | {s['bn']} | {_pct(s['baseline'])} | {_pct(nd['mean'])} / {worst_nd} | "
                     f"{worst_dn} | {inel} |")
    return lines


def _k_table(summary: list[dict[str, Any]]) -> list[str]:
    curves = list(dict.fromkeys((s["model"], s["bn"]) for s in summary))
    ks = sorted({s["k"] for s in summary})
    head = "| k | " + " | ".join(f"{m} ({b})" for m, b in curves) + " |"
    lines = [head, "|---" * (len(curves) + 1) + "|"]
    for k in ks:
        cells = []
        for m, b in curves:
            s = next((s for s in summary if s["model"] == m and s["bn"] == b and s["k"] == k), None)
            cells.append("-" if s is None else f"{_pct(s['mean'])} ± {100 * s['std']:.1f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def _lesion_body(models: dict[str, nn.Module], batches: list, out_dir: str | os.PathLike, *,
                 calib: list | None, ks: Sequence[int] | None, repeats: int, seed: int, n_calib: int,
                 progress: Progress | None = None, results: dict[str, Any] | None = None,
                 split: str | None = None, calib_kind: str = "training images"
                 ) -> tuple[str, list[tuple[str, str]]]:
    bn = "both" if calib is not None else "frozen"
    single = run_lesion_experiment(models, batches, "single", out_dir, bn=bn, calib_batches=calib, n_calib=n_calib,
                                   progress=progress, split=split)
    n_elig = min(len(k_lesion_eligible(m)) for m in models.values())
    if ks is None:
        step = max(1, n_elig // 8)
        ks = sorted(set(list(range(0, n_elig + 1, step)) + [n_elig]))
    kres = run_lesion_experiment(models, batches, "k", out_dir, bn=bn, calib_batches=calib, n_calib=n_calib,
                                 ks=ks, repeats=repeats, seed=seed, progress=progress, split=split)
    if results is not None:
        results.update(single=single["summary"], k=kres["summary"], n_images=sum(int(y.numel()) for _, y in batches),
                       split=split)
    n_img = sum(int(y.numel()) for _, y in batches)
    body = "\n".join([
        f"Residual branches deleted at test time (Veit et al. 2016), error on {n_img} images of the "
        f"{split_name(split)}. BN protocol "
        "*frozen*: the stored running statistics (the paper's protocol); *recalibrated*: statistics re-estimated "
        f"on {calib_kind} for each lesioned network. A deleted plain unit passes its input through; "
        "downsampling plain units cannot be deleted (listed as not deletable).", "",
        *_single_table(single["summary"]), "",
        f"Deleting k random non-downsampling units ({repeats} draws per k; mean error ± std in points):", "",
        *_k_table(kres["summary"]), "",
        f"Data: `{os.path.basename(single['files']['csv'])}`, `{os.path.basename(kres['files']['csv'])}`."])
    figs = [(os.path.basename(single["files"]["png"]),
             "Error with one unit deleted, one point per deleted unit (dashed: the intact network; open squares: "
             "downsampling units; crosses and gaps in a curve: units that cannot be deleted, not measured). "
             "Error axis linear below 1%, logarithmic above."),
            (os.path.basename(kres["files"]["png"]),
             f"Error with k random units deleted: mean over {repeats} random draws per k (k = 0: the intact network, "
             "one evaluation); band: ± one standard deviation over the draws, clipped to [0, 100]%.")]
    return body, figs


def _paths_body(model: nn.Module, batches: list, out_dir: str | os.PathLike, *, label: str, samples: int, at: str,
                bn: str, seed: int, mass: float, progress: Progress | None = None,
                grad_data: str | None = None) -> tuple[str, list[tuple[str, str]]]:
    res = run_paths_experiment({label: model}, batches, out_dir, samples=samples, at=at, bn=bn, seed=seed, mass=mass,
                               progress=progress, grad_data=grad_data)
    s = res["summary"][label]
    r: PathResult = res["results"][label]
    lo, hi = central_range(r.n_routable, 0.95)
    where = "the input of the first residual unit" if at == "unit" else "the image"
    peak = max(r.rows, key=lambda row: row["total"])
    eff = s["effective_range"]
    eff_line = (f"* {mass:.0%} of the total gradient comes from paths of length {eff[0]}-{eff[1]} "
                f"({100 * s['effective_paths_fraction']:.2f}% of all paths)." if eff else
                "* effective range undefined (zero gradient).")
    body = "\n".join([
        f"{label}: {r.n_units} residual units unravel into 2^{r.n_routable} paths; path length ~ Binomial"
        f"({r.n_routable}, 1/2), 95% of the paths have length {lo + r.n_fixed}-{hi + r.n_fixed}. "
        f"Gradient measured at {where}, {bn}-mode BatchNorm, on {grad_data_name(grad_data)}, {samples} (batch, "
        f"subset) samples of {r.batch_size} images per length (forward unchanged; backward through the branches of k units and the "
        "shortcuts of the others).", "",
        f"* gradient magnitude per path: {r.rows[0]['grad_mean']:.3g} at length {r.rows[0]['length']}, "
        f"{r.rows[-1]['grad_mean']:.3g} at length {r.rows[-1]['length']};",
        f"* total gradient (magnitude x number of paths) peaks at length {peak['length']};", eff_line, "",
        f"Data: `{os.path.basename(res['files']['csv'])}`."])
    sem = (f"error bars: mean ± standard error of the mean over the {samples} (batch, subset) samples per length"
           if samples > 1 else "one sample per length, so no error bars")
    figs = [(os.path.basename(res["files"]["png"]),
             f"(a) number of paths per length (bars: the exact Binomial({r.n_routable}, 1/2) counts); (b) gradient "
             f"magnitude per path, {sem}; (c) total gradient per length (magnitude x number of paths), shaded: the "
             f"shortest range of lengths carrying {mass:.0%} of it.")]
    return body, figs


def _render(title: str, body: str, figs: list[tuple[str, str]], level: int) -> str:
    parts = [f"{'#' * level} {title}", "", body, ""]
    for rel, cap in figs:
        parts += [f"![{cap}]({rel})", ""]
    return "\n".join(parts)


LESION_TITLE = "Lesion study"
PATHS_TITLE = "Path lengths"


def lesion_section(model: nn.Module, batches: Iterable[Any], out_dir: str | os.PathLike, *,
                   plain_model: nn.Module | None = None, extra_models: dict[str, nn.Module] | None = None,
                   calib_batches: Iterable[Any] | None = None, label: str = "resnet", plain_label: str = "plain",
                   ks: Sequence[int] | None = None, repeats: int = 5, seed: int = 0, n_calib: int = 10,
                   heading_level: int = 2, split: str | None = None, calib_kind: str = "training images",
                   progress: Progress | None = None, results: dict[str, Any] | None = None) -> str:
    """Markdown section: single-unit and k-unit lesions of ``model`` (and of its plain twin and
    any ``extra_models``, side by side), frozen BN, plus recalibrated BN when ``calib_batches``
    are given. Writes lesion_single / lesion_k CSV + PNG into ``out_dir``; links them by name.
    ``split`` names the split of ``batches`` and ``calib_kind`` the calibration data (both only
    words in the text; the caller built the batches); ``results``, if given, receives the
    summaries."""
    models = {label: model}
    if plain_model is not None:
        models[plain_label] = plain_model
    models.update(extra_models or {})
    calib = as_batch_list(calib_batches) if calib_batches is not None else None
    body, figs = _lesion_body(models, as_batch_list(batches), out_dir, calib=calib, ks=ks, repeats=repeats,
                              seed=seed, n_calib=n_calib, progress=progress, results=results, split=split,
                              calib_kind=calib_kind)
    return _render(LESION_TITLE, body, figs, heading_level)


def paths_section(model: nn.Module, batches: Iterable[Any], out_dir: str | os.PathLike, *, samples: int = 8,
                  label: str = "resnet", at: str = "unit", bn: str = "eval", seed: int = 0, mass: float = 0.9,
                  heading_level: int = 2, grad_data: str | None = None, progress: Progress | None = None) -> str:
    """Markdown section: path-length distribution and gradient per path length of ``model``
    (Veit et al. 2016 Fig. 6). Writes paths.csv / paths.png / paths_summary.json into ``out_dir``.
    ``grad_data`` names where ``batches`` come from (``"train"``: random training batches, the
    paper's §5 choice)."""
    body, figs = _paths_body(model, as_batch_list(batches), out_dir, label=label, samples=samples, at=at, bn=bn,
                             seed=seed, mass=mass, progress=progress, grad_data=grad_data)
    return _render(PATHS_TITLE, body, figs, heading_level)

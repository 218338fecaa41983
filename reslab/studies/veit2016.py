"""Veit, Wilber & Belongie 2016, "Residual Networks Behave Like Ensembles of Relatively Shallow
Networks" (arXiv 1605.06431), as a study: lesions, reordering and path lengths.

Runs (one role each): ``resnet`` (a residual network), ``plain`` (its plain twin: the same layers
with every shortcut removed; the paper's contrast is a VGG) and ``sd`` (the same residual network
trained with stochastic depth, Huang et al. 2016 linear rule, p_L = 0.5).

Analyses (experiments.md §1; every number goes to ``results``):

a) ``intact``: test error of each network (test split, single view, stored BN statistics);
b) ``single``: error with the residual branch of one unit deleted, for every unit, BN frozen
   (the paper's protocol, §4.1) and recalibrated (statistics re-estimated on augmented training
   batches for each lesioned network; not in the paper). Downsampling units are flagged; a plain
   net's non-downsampling unit deleted passes its input through (a layer removed), its
   downsampling units cannot be removed and are reported as not deletable;
c) ``k``: error with k random non-downsampling units deleted, mean ± std over draws, k = 0..all
   (paper §4.2);
d) ``reorder``: error after random swaps of equal-shape units against Kendall's tau (paper §4.3);
e) ``paths``: the path-length distribution Binomial(n, 1/2) and, on the ResNet, the paper's
   Monte-Carlo gradient per path length (§5: random training batches, the gradient norm at the
   input, eval-mode BN; quantity ``C(n,k)·E‖g_path‖``) next to the exact decomposition
   (experiments.md §1.5; quantity ``‖G_k‖``, the norm of the *summed* gradient of all length-k
   paths, in which paths can cancel). The two are named apart everywhere;
f) ``sd_vs_resnet``: the SD-trained network's single and k-unit lesions against the normal one.

Cost at the laptop budget, estimated from ResNet-20's ~600 evaluated images/s on two CPU threads
(in full-network image passes): frozen single-unit sweeps over the full 10,000-image test split,
about 5 passes per net with prefix caching (~140k); recalibrated single sweeps on the 2,000-image
subset with 500 calibration images each (~63k); k-deletion of the ResNet and the SD net, 3 draws
per k (~51k); reordering, 7 orders per net (~28k); Monte-Carlo path gradients (20 x 16 images x
10 lengths, ~10k) and the exact decomposition (256 images, ~6k): about 300k passes, 8-9 minutes.
The paper budget is planned only.

Trends are computed from the numbers by :func:`veit_trends` with thresholds from the plan's
options (``thresholds``), stated in each trend's evidence.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from reslab.studies.base import (Comparison, jsonable, PaperValue, Plan, RunSpec, Study, StudyContext,
                                 StudyResult, check_budget)
from reslab.studies.recipes import LAPTOP_EPOCHS, laptop_config, sd_kwargs

ROLES = ("resnet", "plain", "sd")
SOURCE = "arXiv 1605.06431"

# Trend thresholds (fractions of 1, i.e. 0.05 = 5 percentage points); stated in the evidence.
THRESHOLDS: dict[str, float] = {
    "single_small": 0.05,  # ResNet: mean rise from deleting one non-downsampling unit at most this
    "single_jump": 0.25,  # plain twin: mean rise at least this ...
    "single_ratio": 5.0,  # ... and at least this many times the ResNet's
    "monotone_tol": 0.01,  # a mean error may fall by at most this from one k (or swap count) to the next
    "max_step_share": 0.5,  # "smooth": no single step of k carries more than this share of the total rise
}

# ---- options per budget ----------------------------------------------------------------------
_COMMON: dict[str, Any] = {
    "seed": 0,  # k-subsets, swaps, path subsets, the test subset
    "path_at": "image",  # gradient measured at the input image (the paper: "at the input")
    "path_bn": "eval",  # eval-mode BN: one Jacobian per image (experiments.md §1.2)
    "effective_mass": 0.9,  # share of the total gradient the effective range holds (ours; not stated)
    "typical_mass": 0.95,  # the paper's "95% of paths"
    "thresholds": dict(THRESHOLDS),
}

SMOKE_OPTIONS: dict[str, Any] = {
    **_COMMON,
    "which": "best", "batch_size": 100, "eval_images": None, "subset_images": 200, "calib_batches": 2,
    "single_bn": ["frozen", "recalibrated"],
    "k_models": ["resnet", "sd", "plain"], "k_bn": ["frozen"], "k_repeats": 2,
    "reorder_models": ["resnet", "sd"], "reorder_bn": ["frozen"], "reorder_swaps": [0, 1], "reorder_repeats": 2,
    "path_models": ["resnet"], "train_batches": 1, "path_batch_size": 10, "path_samples": 3,
    "exact_images": 20, "exact_batch_size": 10,
}

LAPTOP_OPTIONS: dict[str, Any] = {
    **_COMMON,
    "which": "best", "batch_size": 250, "eval_images": None, "subset_images": 2000, "calib_batches": 4,
    "single_bn": ["frozen", "recalibrated"],
    "k_models": ["resnet", "sd"], "k_bn": ["frozen"], "k_repeats": 3,
    "reorder_models": ["resnet", "sd"], "reorder_bn": ["frozen"], "reorder_swaps": [0, 1, 2, 4], "reorder_repeats": 2,
    "path_models": ["resnet"], "train_batches": 2, "path_batch_size": 16, "path_samples": 20,
    "exact_images": 256, "exact_batch_size": 32,
}

PAPER_OPTIONS: dict[str, Any] = {
    **_COMMON,
    "which": "last", "batch_size": 250, "eval_images": None, "subset_images": None, "calib_batches": 20,
    "single_bn": ["frozen", "recalibrated"],
    "k_models": ["resnet", "sd", "plain"], "k_bn": ["frozen", "recalibrated"], "k_repeats": 10,
    "reorder_models": ["resnet", "sd"], "reorder_bn": ["frozen"], "reorder_swaps": [0, 1, 2, 4, 8, 16, 32],
    "reorder_repeats": 10,
    "path_models": ["resnet"], "train_batches": 40, "path_batch_size": 128, "path_samples": 1000,
    "exact_images": 1000, "exact_batch_size": 50,
}

OPTIONS = {"smoke": SMOKE_OPTIONS, "laptop": LAPTOP_OPTIONS, "paper": PAPER_OPTIONS}


# ---- run configs ---------------------------------------------------------------------------------
def smoke_config(plain: bool = False, sd: bool = False, epochs: int = 2) -> dict[str, Any]:
    """A tiny digits run (8x8 grey; 200 training images held out to pick the checkpoint, 384 of the
    rest trained on): ``cifar_resnet`` depth 14 (6 units, 2 per stage), seconds on one CPU
    thread. Not a paper recipe."""
    kwargs: dict[str, Any] = {"depth": 14}
    if plain:
        kwargs["plain"] = True
    if sd:
        kwargs["stochastic_depth"] = sd_kwargs(0.5)
    d: dict[str, Any] = {
        "model": {"name": "cifar_resnet", "kwargs": kwargs},
        "data": {"name": "digits", "val_split": 200, "train_subset": 384},
        "optim": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5.0e-4},
        "schedule": {"name": "cosine"},
        "train": {"epochs": epochs, "batch_size": 64, "seed": 0, "log_every_steps": 10, "tensorboard": False},
        "eval": {"every_epochs": 1, "batch_size": 400},
    }
    if sd:
        d["train"]["ddp_find_unused_parameters"] = True
    return d


def paper_config(model: str, plain: bool = False, sd: bool = False) -> dict[str, Any]:
    """He et al. 2016 (arXiv 1603.05027) CIFAR recipe as in configs/he2016_preact164_c10.yaml: SGD
    momentum 0.9, wd 1e-4, batch 128, lr 0.1 (400-step warm-up at 0.01), /10 at 32k and 48k steps,
    64k steps (about 164 epochs on 50k images), 4-px crops and flips."""
    kwargs: dict[str, Any] = {}
    if plain:
        kwargs["plain"] = True
    if sd:
        kwargs["stochastic_depth"] = sd_kwargs(0.5)
    d: dict[str, Any] = {
        "model": {"name": model, "kwargs": kwargs},
        "data": {"name": "cifar10", "crop_padding": 4, "pad_mode": "zeros", "flip": True},
        "optim": {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1.0e-4},
        "schedule": {"name": "multistep", "milestones": [32000, 48000], "unit": "step", "gamma": 0.1,
                     "warmup": "he", "warmup_lr": 0.01, "warmup_steps": 400, "warmup_until_error": None},
        "train": {"steps": 64000, "batch_size": 128, "seed": 0},
    }
    if sd:
        d["train"]["ddp_find_unused_parameters"] = True
    return d


def _deviations(budget: str, o: Mapping[str, Any]) -> list[str]:
    sub = ("the full test split" if o["subset_images"] is None
           else f"a fixed seeded subset of {o['subset_images']:,} test images")
    common = [
        f"Single-unit deletion with frozen BN and the intact errors: the full test split; recalibrated-BN single "
        f"deletions, k-deletion and reordering: {sub}.",
        f"BN recalibration (not in the paper, whose protocol is frozen BN): {o['calib_batches']} batches of "
        f"{o['batch_size']} augmented training images per lesioned network.",
        f"k-deletion: {o['k_repeats']} random draws per k of non-downsampling units; reordering: "
        f"{', '.join(map(str, o['reorder_swaps']))} random swaps, {o['reorder_repeats']} draws each (the paper's "
        "draw counts: not stated in the text we hold).",
        f"Gradient per path length: {o['path_samples']} (batch, subset) samples of {o['path_batch_size']} training "
        f"images per length (paper: 1,000 measurements per length, batch size not stated); gradient norm at the "
        f"input image, eval-mode BN. Exact decomposition on {o['exact_images']} training images.",
        f"Effective-path range: the shortest range of lengths holding {o['effective_mass']:.0%} of the total gradient "
        "(the paper does not state its threshold).",
        "Retraining on effective paths only (paper: 5.96% vs 6.10%, exact wording unconfirmed) is not run.",
    ]
    if budget == "paper":
        return [
            "Planned only (not run on a laptop). Networks: cifar_preact_resnet110 (54 units), its plain twin "
            "(same layers, no shortcuts; the paper's contrast is a VGG whose depth is unconfirmed) and an "
            "SD-trained twin (linear rule, p_L = 0.5); He et al. 2016 recipe (64k steps, about 164 epochs), "
            "final weights; the paper's own training recipe is not stated in the text we hold.",
            *common,
        ]
    if budget == "laptop":
        return [
            "ResNet-20 (9 units, v1 post-activation, option-A shortcuts) instead of the paper's 110-layer "
            "pre-activation ResNet with 54 units (papers.md §6, secondary).",
            f"Training: {LAPTOP_EPOCHS} epochs of a fast one-cycle recipe (reslab.studies.recipes) on 45k images "
            "(5k held out to pick the checkpoint) instead of the paper's full-length training.",
            "Plain twin: a 20-layer plain net (ResNet-20 with every shortcut removed), not the paper's VGG.",
            "Stochastic-depth twin: the same ResNet-20 and recipe with Huang et al.'s linear rule, p_L = 0.5 "
            "(the paper's SD comparison network is not described in the text we hold).",
            *common,
        ]
    return [
        "Smoke test only: digits (8x8 grey) instead of CIFAR-10, cifar_resnet depth 14 (6 units) and its plain "
        "and SD twins, 2 epochs on 384 images; numbers say nothing about the paper.",
        *common,
    ]


# ---- the analyses' building blocks (pure functions of models and batches) ------------------------
Batch = tuple[torch.Tensor, torch.Tensor]


def take_subset(batches: Sequence[Batch], n: int | None, seed: int = 0, batch_size: int | None = None,
                drop_last: bool = False) -> list[Batch]:
    """A fixed seeded subset of ``n`` images of ``batches`` (original order kept), re-batched to
    ``batch_size`` (default: the first batch's size). ``n=None`` or ``n >=`` all: every image.
    ``drop_last``: leave out a last, smaller batch (unless it is the only one)."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    if n is not None and n < len(y):
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        x, y = x[idx.to(x.device)], y[idx.to(y.device)]
    bs = batch_size or int(batches[0][0].shape[0])
    out = [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(y), bs)]
    if drop_last and len(out) > 1 and len(out[-1][1]) < bs:
        out.pop()
    return out


def _n_images(batches: Sequence[Batch]) -> int:
    return sum(int(b[1].numel()) for b in batches)


def single_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Summary of one (network, protocol) single-unit sweep: intact error, each unit's error,
    mean / max rise for non-downsampling and downsampling units, the units not deletable."""
    base = next(r["error"] for r in rows if r["unit"] == -1)
    units = [dict(unit=r["unit"], stage=r["stage"], index=r["index"], downsample=r["downsample"],
                  eligible=r["eligible"], error=r["error"], delta=r["delta"]) for r in rows if r["unit"] != -1]

    def stats(rs: list[dict[str, Any]]) -> dict[str, Any]:
        if not rs:
            return dict(mean_error=None, mean_delta=None, max_delta=None, argmax=None, n=0)
        worst = max(rs, key=lambda r: r["delta"])
        return dict(mean_error=sum(r["error"] for r in rs) / len(rs), mean_delta=sum(r["delta"] for r in rs) / len(rs),
                    max_delta=worst["delta"], argmax=worst["unit"], n=len(rs))

    measured = [u for u in units if u["error"] is not None]
    return dict(intact_error=base, units=units,
                non_downsampling=stats([u for u in measured if not u["downsample"]]),
                downsampling=stats([u for u in measured if u["downsample"]]),
                not_deletable=[u["unit"] for u in units if u["error"] is None])


def curve_summary(rows: Sequence[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Mean / std / count of the error per ``by`` (``k`` or ``swaps``), sorted; one protocol, one net."""
    from reslab.analysis.lesion import summarize

    out = []
    for s in sorted(summarize(rows, by), key=lambda r: r[by]):
        row = {by: s[by], "mean": s["mean"], "std": s["std"], "n": s["n"]}
        if "tau_mean" in s:
            row["tau_mean"] = s["tau_mean"]
        out.append(row)
    return out


def exact_path_norms(model: torch.nn.Module, batches: Sequence[Batch], *, at: str, bn: str,
                     mass: float = 0.9) -> dict[str, Any]:
    """The exact path-length decomposition (experiments.md §1.5) with
    :func:`reslab.analysis.paths.exact_path_lengths` over ``batches``: per length, ``summed_norm``
    = the per-image ‖G_k‖ (norm of the summed gradient of all length-k paths) averaged over the
    images, its share, the signed projection share, the shortest range holding ``mass`` of
    Σ_k ‖G_k‖, and the exactness check ‖Σ_k G_k - ∇‖ / ‖∇‖.

    Raises ``RuntimeError`` when this reslab has no exact decomposition."""
    from reslab.analysis import paths as P

    fn = getattr(P, "exact_path_lengths", None)
    if fn is None:
        raise RuntimeError("reslab.analysis.paths.exact_path_lengths is missing in this reslab; the exact "
                           "path-length decomposition (experiments.md §1.5) needs it: update reslab")
    r = fn(model, batches, at=at, bn=bn, mass=mass)
    rows = [dict(length=row["length"], paths=row["paths"], summed_norm=row["summed_norm"],
                 share=row["summed_fraction"], projection_share=row["projection_share"]) for row in r.rows]
    return dict(rows=rows, images=_n_images(batches), sum_check_rel_error=r.sum_rel_err,
                effective_range=None if r.effective_range is None else list(r.effective_range),
                full_norm=r.full_norm)


def gradient_weighted_mean_length(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    tot = sum(r[key] for r in rows)
    if not tot > 0:
        return None
    return sum(r["length"] * r[key] for r in rows) / tot


# ---- trends ----------------------------------------------------------------------------------------
def _pp(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _dpp(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.2f} pp"


def _curve_trend(curve: Sequence[dict[str, Any]], by: str, th: Mapping[str, float]) -> tuple[bool | None, str]:
    """Whether the mean error rises smoothly along ``curve`` (in order): never falls by more than
    ``monotone_tol`` between neighbours, ends above where it starts, and no single step carries
    more than ``max_step_share`` of the total rise. ``None`` with fewer than three points (one
    step cannot show smoothness)."""
    means = [c["mean"] for c in curve]
    pts = ", ".join(f"{c[by]}: {_pp(c['mean'])}" for c in curve)
    if len(means) < 3:
        return None, f"mean error by {by}: {pts}; fewer than three points, so smoothness cannot be judged"
    steps = [b - a for a, b in zip(means, means[1:])]
    rise = means[-1] - means[0]
    monotone = all(s >= -th["monotone_tol"] for s in steps)
    smooth = rise > 0 and max(steps) <= th["max_step_share"] * rise
    ev = (f"mean error by {by}: {pts}; total rise {_dpp(rise)}, largest step {_dpp(max(steps))}, largest fall "
          f"{_dpp(max(0.0, -min(steps)))} (smooth = no fall above {_dpp(th['monotone_tol'])}, a rise, and no step "
          f"above {th['max_step_share']:.0%} of it)")
    return monotone and smooth, ev


def veit_trends(results: Mapping[str, Any], thresholds: Mapping[str, float] | None = None
                ) -> list[tuple[str, bool | None, str]]:
    """The paper's trends checked against ``results`` (frozen BN, the paper's protocol):
    ``(stated trend, shows?, evidence)``; ``None`` where the numbers needed were not measured."""
    th = {**THRESHOLDS, **(thresholds or {})}
    out: list[tuple[str, bool | None, str]] = []
    single = results.get("single", {})

    def nd(role: str) -> dict[str, Any] | None:
        s = single.get(role, {}).get("frozen")
        return None if s is None else s["non_downsampling"]

    # 1. one non-downsampling unit: ResNet little, plain twin jumps (§4.1)
    r, p = nd("resnet"), nd("plain")
    t = "Deleting one non-downsampling unit changes the ResNet's error little, while the plain twin's error jumps"
    if r is None or p is None or r["mean_delta"] is None or p["mean_delta"] is None:
        out.append((t, None, "single-unit deletions of the ResNet or the plain twin not measured"))
    else:
        small = r["mean_delta"] <= th["single_small"]
        jump = p["mean_delta"] >= th["single_jump"] and p["mean_delta"] >= th["single_ratio"] * max(r["mean_delta"], 0)
        out.append((t, small and jump,
                    f"frozen BN, mean rise over the non-downsampling units: ResNet {_dpp(r['mean_delta'])} (worst "
                    f"{_dpp(r['max_delta'])}; 'little' = at most {_dpp(th['single_small'])}), plain twin "
                    f"{_dpp(p['mean_delta'])} (worst {_dpp(p['max_delta'])}; 'jumps' = at least "
                    f"{_dpp(th['single_jump'])} and {th['single_ratio']:g}x the ResNet's)"))
    # 2. downsampling units matter more (§4.1, secondary)
    s = single.get("resnet", {}).get("frozen")
    t = "Deleting a downsampling unit hurts the ResNet more than deleting a non-downsampling unit"
    if s is None or s["downsampling"]["mean_delta"] is None or s["non_downsampling"]["mean_delta"] is None:
        out.append((t, None, "no downsampling or no non-downsampling unit measured"))
    else:
        d, n = s["downsampling"]["mean_delta"], s["non_downsampling"]["mean_delta"]
        out.append((t, d > n, f"frozen BN, mean rise: downsampling units {_dpp(d)}, non-downsampling units {_dpp(n)}"))
    # 3. error rises smoothly with k (§4.2)
    kres = results.get("k", {})
    t = "The ResNet's error rises smoothly with the number k of deleted units"
    kr = kres.get("resnet", {}).get("frozen")
    if kr is None:
        out.append((t, None, "k-unit deletion of the ResNet not measured"))
    else:
        shows, ev = _curve_trend(kr["curve"], "k", th)
        out.append((t, shows, "ResNet, frozen BN, " + ev))
    # 4. SD-trained net degrades less with k
    t = "The SD-trained network degrades less than the normally trained one as units are deleted"
    ks = kres.get("sd", {}).get("frozen")
    if kr is None or ks is None:
        out.append((t, None, "k-unit deletion of the ResNet or the SD net not measured"))
    else:
        rr, rs = mean_rise(kr["curve"]), mean_rise(ks["curve"])
        if rr is None or rs is None:
            out.append((t, None, "no k >= 1 measured"))
        else:
            out.append((t, rs < rr, f"frozen BN, mean rise over k >= 1 above the intact error: SD net {_dpp(rs)} "
                                    f"(intact {_pp(ks['curve'][0]['mean'])}), ResNet {_dpp(rr)} (intact "
                                    f"{_pp(kr['curve'][0]['mean'])})"))
    # 5. reordering: error rises smoothly as tau falls (§4.3)
    t = "The ResNet's error rises smoothly as Kendall's tau falls (units reordered)"
    ro = results.get("reorder", {}).get("resnet", {}).get("frozen")
    if ro is None:
        out.append((t, None, "reordering of the ResNet not measured"))
    else:
        curve = sorted(ro["curve"], key=lambda c: (-c["tau_mean"], c["swaps"]))
        shows, ev = _curve_trend(curve, "swaps", th)
        taus = ", ".join(f"{c['swaps']}: {c['tau_mean']:.3f}" for c in curve)
        out.append((t, shows, f"ResNet, frozen BN, {ev}; mean tau by swaps: {taus}"))
    # 6. effective paths much shorter than typical paths (§5)
    paths = results.get("paths", {}).get("resnet")
    t = "Effective paths (most of the gradient, paper protocol) are much shorter than the typical path"
    if paths is None or paths.get("monte_carlo") is None or paths["monte_carlo"].get("effective_range") is None:
        out.append((t, None, "gradient per path length not measured"))
    else:
        mc = paths["monte_carlo"]
        lo, hi = mc["effective_range"]
        tlo, thi = paths["typical_range"]
        out.append((t, hi < tlo,
                    f"Monte-Carlo C(n,k)·E‖g_path‖: {mc['mass']:.0%} of the total gradient from lengths {lo}-{hi} "
                    f"(gradient-weighted mean length {mc['weighted_mean_length']:.2f}); typical paths: "
                    f"{paths['typical_mass']:.0%} have length {tlo}-{thi} (mean {paths['mean_length']:.1f}); "
                    "'much shorter' = the effective range lies entirely below the typical range"))
    # 7. same question for the exact decomposition (a different quantity, named)
    t = "Exact decomposition: the summed gradient ‖G_k‖ is concentrated on paths shorter than the typical path"
    ex = None if paths is None else paths.get("exact")
    if ex is None or ex.get("effective_range") is None:
        why = "not measured" if ex is None else ex.get("error", "effective range undefined")
        out.append((t, None, f"exact decomposition: {why}"))
    else:
        lo, hi = ex["effective_range"]
        tlo, thi = paths["typical_range"]
        out.append((t, hi < tlo, f"exact ‖G_k‖: {ex['mass']:.0%} of Σ_k ‖G_k‖ from lengths {lo}-{hi} "
                                 f"(weighted mean length {ex['weighted_mean_length']:.2f}); typical range "
                                 f"{tlo}-{thi}"))
    return out


def mean_rise(curve: Sequence[dict[str, Any]]) -> float | None:
    """Mean over k >= 1 of (mean error at k - error at k = 0)."""
    base = next((c["mean"] for c in curve if c["k"] == 0), None)
    rest = [c["mean"] for c in curve if c["k"] > 0]
    if base is None or not rest:
        return None
    return sum(rest) / len(rest) - base


# ---- the study -------------------------------------------------------------------------------------
def _loader() -> Callable[..., Any]:
    try:
        from reslab.studies.inputs import load_for_analysis
    except ImportError as e:
        raise RuntimeError("reslab.studies.inputs.load_for_analysis is missing in this reslab; the veit2016 study "
                           "loads its runs with it: update reslab") from e
    return load_for_analysis


class Veit2016(Study):
    name = "veit2016"
    title = "Residual networks behave like ensembles of relatively shallow networks"
    paper = "Veit, Wilber, Belongie 2016, arXiv 1605.06431"

    # -- plan -----------------------------------------------------------------------------------
    def plan(self, budget: str) -> Plan:
        check_budget(budget)
        o = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
             for k, v in OPTIONS[budget].items()}
        if budget == "smoke":
            runs = (RunSpec("resnet", smoke_config()), RunSpec("plain", smoke_config(plain=True)),
                    RunSpec("sd", smoke_config(sd=True)))
            data = "digits"
        elif budget == "laptop":
            runs = (RunSpec("resnet", laptop_config("cifar_resnet20"), pretrained="cifar_resnet20:fast_c10"),
                    RunSpec("plain", laptop_config("cifar_plain20"), pretrained="cifar_plain20:fast_c10"),
                    RunSpec("sd", laptop_config("cifar_resnet20", sd_kwargs(0.5))))
            data = "cifar10"
        else:
            runs = (RunSpec("resnet", paper_config("cifar_preact_resnet110")),
                    RunSpec("plain", paper_config("cifar_preact_resnet110", plain=True)),
                    RunSpec("sd", paper_config("cifar_preact_resnet110", sd=True)))
            data = "cifar10"
        return Plan(study=self.name, budget=budget, runs=runs, options=o, deviations=tuple(_deviations(budget, o)),
                    data=data)

    # -- paper values ---------------------------------------------------------------------------
    def paper_values(self) -> Sequence[PaperValue]:
        """papers.md §6, sources as written there; rows it marks unconfirmed or without a number: None."""
        return [
            PaperValue("paths.headline", "share of the gradient by path depth, 110-layer ResNet",
                       "most of the gradient comes from paths that are only 10–34 layers deep",
                       f"{SOURCE} abstract (NeurIPS 2016)", unit=""),
            PaperValue("lesion.network", "network of the lesion study",
                       "110-layer pre-activation ResNet on CIFAR-10, 54 residual modules, no stochastic depth or "
                       "dropout", f"{SOURCE} (secondary)", unit=""),
            PaperValue("single.statement", "deleting one residual module (CIFAR-10)",
                       "removing single layers … does not noticeably affect their performance; removing a "
                       "downsampling block has a modest impact; deleting a layer from VGG causes a dramatic loss",
                       f"{SOURCE} §4.1 (secondary, quoted)", unit=""),
            PaperValue("single.resnet.error", "test error with one module deleted, ResNet-110", None,
                       f"{SOURCE} §4.1 (secondary): no number"),
            PaperValue("single.plain.error", "test error with one layer deleted, VGG (collapse to ~chance; 15 "
                       "layers)", None, "— (unconfirmed)"),
            PaperValue("imagenet.single.error", "ImageNet lesion errors (ResNet-200)", None,
                       f"{SOURCE} (secondary): unconfirmed, trend only"),
            PaperValue("k.statement", "error vs number of deleted modules",
                       "smooth increase; deleting 10 blocks leaves 2^44 paths … error remains around 0.2; "
                       "removing 20 modules gives a severe drop", f"{SOURCE} §4.2 and §6 (secondary, quoted)",
                       unit=""),
            PaperValue("k.10_of_54.error", "error with 10 of 54 modules deleted", "around 0.2",
                       f"{SOURCE} §4.2 and §6 (secondary, quoted)", unit=""),
            PaperValue("reorder.statement", "reordering modules",
                       "swap k random pairs of blocks; error rises smoothly as Kendall τ falls",
                       f"{SOURCE} (secondary, quoted)", unit=""),
            PaperValue("paths.distribution", "path-length distribution, 54 modules",
                       "Binomial(54, 0.5); 95% of paths have length 19–35", f"{SOURCE} (secondary)", unit=""),
            PaperValue("paths.effective", "effective paths",
                       "almost all gradient comes from paths 5–17 modules long, 0.45% of all paths",
                       f"{SOURCE} (secondary)", unit=""),
            PaperValue("paths.method", "gradient-per-path-length measurement",
                       "trained net with 54 modules; 1,000 measurements for each length k using random batches "
                       "from the training set; norm of the gradient at the input; magnitude falls exponentially "
                       "with k", f"{SOURCE} §5 (secondary copy of the text)", unit=""),
            PaperValue("paths.effective.threshold", "share of the gradient that defines the effective range", None,
                       f"{SOURCE} (secondary): not stated"),
            PaperValue("retrain.effective_only", "retraining on effective paths only vs the full ResNet-110",
                       "5.96% vs 6.10% error (exact wording unconfirmed)", f"{SOURCE} (secondary)", unit=""),
        ]

    # -- analyses -------------------------------------------------------------------------------
    def analyse(self, ctx: StudyContext) -> StudyResult:
        from reslab.analysis import paths as P
        from reslab.analysis import plots
        from reslab.analysis.lesion import (k_lesion_eligible, k_unit_lesion, reorder_study, single_unit_lesion,
                                            write_csv)

        o = {**OPTIONS[ctx.plan.budget], **dict(ctx.plan.options)}
        th = {**THRESHOLDS, **dict(o.get("thresholds") or {})}
        out = Path(ctx.out)
        out.mkdir(parents=True, exist_ok=True)
        load = _loader()
        missing = [r for r in ROLES if r not in ctx.runs]
        if missing:
            raise ValueError(f"veit2016 needs the runs {', '.join(ROLES)}; missing {', '.join(missing)}")

        inputs: dict[str, Any] = {}
        for role in ROLES:
            ctx.progress(f"veit2016: loading {role}")
            inputs[role] = load(ctx.runs[role], device=ctx.device, which=o["which"], data_dir=ctx.data_dir,
                                max_images=o["eval_images"], batch_size=o["batch_size"],
                                calib_batches=o["calib_batches"], calib_augment=True, split="test",
                                train_batches=o["train_batches"] if role in o["path_models"] else 0)
        n_test = {role: _n_images(inp.batches) for role, inp in inputs.items()}
        if len(set(n_test.values())) != 1:
            raise ValueError(f"the three runs evaluate different test sets ({n_test}); train them on one data set")
        full = {role: list(inp.batches) for role, inp in inputs.items()}
        subset = {role: take_subset(b, o["subset_images"], o["seed"]) for role, b in full.items()}
        calib = {role: (list(inp.calib) if inp.calib else None) for role, inp in inputs.items()}
        models = {role: inp.model for role, inp in inputs.items()}

        results: dict[str, Any] = {
            "study": self.name, "budget": ctx.plan.budget,
            "networks": {role: dict(run=str(ctx.runs[role]), source=ctx.source.get(role, ""),
                                    model=_model_name(inputs[role]), units=len(models[role].residual_units()),
                                    downsampling_units=[i for i, u in enumerate(models[role].residual_units())
                                                        if u.downsample],
                                    split=str(getattr(inputs[role], "split", "test")))
                         for role in ROLES},
            "protocol": dict(test_images=n_test["resnet"], subset_images=_n_images(subset["resnet"]),
                             subset_seed=o["seed"], calib_images=_n_images(calib["resnet"] or []),
                             checkpoint=o["which"], options=jsonable(o)),
        }
        figures: list[Path] = []
        csv_rows: dict[str, list[dict[str, Any]]] = {"single": [], "k": [], "reorder": []}

        # a, b) intact and single-unit deletion
        single: dict[str, Any] = {}
        for role in ROLES:
            single[role] = {}
            for proto in o["single_bn"]:
                ctx.progress(f"veit2016: single-unit deletion, {role}, {proto} BN")
                ev = full[role] if proto == "frozen" else subset[role]
                rows = single_unit_lesion(models[role], ev, bn=proto, calib_batches=calib[role],
                                          n_calib=o["calib_batches"], label=role)
                csv_rows["single"] += rows
                single[role][proto] = {"images": _n_images(ev), **single_summary(rows)}
        results["single"] = single
        results["intact"] = {role: dict(test_error=single[role]["frozen"]["intact_error"], images=n_test[role],
                                        bn="frozen") for role in ROLES if "frozen" in single[role]}

        # c) k-unit deletion
        kres: dict[str, Any] = {}
        for role in o["k_models"]:
            kres[role] = {}
            for proto in o["k_bn"]:
                ctx.progress(f"veit2016: k-unit deletion, {role}, {proto} BN")
                rows = k_unit_lesion(models[role], subset[role], repeats=o["k_repeats"], bn=proto,
                                     calib_batches=calib[role], n_calib=o["calib_batches"], seed=o["seed"], label=role)
                csv_rows["k"] += rows
                kres[role][proto] = dict(images=_n_images(subset[role]), repeats=o["k_repeats"],
                                         eligible_units=k_lesion_eligible(models[role]), curve=curve_summary(rows, "k"))
        results["k"] = kres

        # d) reordering
        rres: dict[str, Any] = {}
        for role in o["reorder_models"]:
            rres[role] = {}
            for proto in o["reorder_bn"]:
                ctx.progress(f"veit2016: reordering, {role}, {proto} BN")
                rows = reorder_study(models[role], subset[role], swaps=o["reorder_swaps"], repeats=o["reorder_repeats"],
                                     bn=proto, calib_batches=calib[role], n_calib=o["calib_batches"], seed=o["seed"],
                                     label=role)
                csv_rows["reorder"] += rows
                rres[role][proto] = dict(images=_n_images(subset[role]), repeats=o["reorder_repeats"],
                                         curve=curve_summary(rows, "swaps"))
        results["reorder"] = rres

        # e) path lengths
        pres: dict[str, Any] = {}
        mc_objs: dict[str, Any] = {}
        for role in o["path_models"]:
            model = models[role]
            train = getattr(inputs[role], "train", None)
            n_units = len(model.residual_units())
            m = len(P.routable_units(model))
            n_fixed = n_units - m
            tlo, thi = P.central_range(m, o["typical_mass"])
            entry: dict[str, Any] = dict(
                n_units=n_units, n_routable=m,
                distribution=[dict(d, length=d["length"] + n_fixed) for d in P.path_length_distribution(m)],
                typical_range=[tlo + n_fixed, thi + n_fixed], typical_mass=o["typical_mass"],
                typical_fraction=P.fraction_within(m, tlo, thi), mean_length=n_fixed + m / 2,
                at=o["path_at"], bn=o["path_bn"], monte_carlo=None, exact=None)
            if not train:
                entry["monte_carlo"] = None
                entry["exact"] = {"error": "no training batches were loaded"}
                pres[role] = entry
                continue
            tb = take_subset(list(train), None, o["seed"], o["path_batch_size"], drop_last=True)
            ctx.progress(f"veit2016: gradient per path length (Monte Carlo, paper protocol), {role}")
            mc = P.gradient_per_path_length(model, tb, samples=o["path_samples"], at=o["path_at"], bn=o["path_bn"],
                                            seed=o["seed"], mass=o["effective_mass"])
            mc_objs[role] = mc
            s = mc.summary()
            entry["monte_carlo"] = dict(
                quantity="C(n,k)·E‖g_path‖ (paper protocol: one sampled path per measurement, norm, then times "
                         "the number of paths)",
                rows=[{k: v for k, v in r.items()} for r in mc.rows], samples=o["path_samples"],
                batch_size=mc.batch_size, images_per_length=o["path_samples"] * mc.batch_size,
                effective_range=s["effective_range"], mass=o["effective_mass"],
                effective_paths_fraction=s.get("effective_paths_fraction"),
                weighted_mean_length=gradient_weighted_mean_length(mc.rows, "total"),
                peak_length=max(mc.rows, key=lambda r: r["total"])["length"])
            ctx.progress(f"veit2016: exact path-length decomposition, {role}")
            eb = take_subset(list(train), o["exact_images"], o["seed"], o["exact_batch_size"])
            try:
                ex = exact_path_norms(model, eb, at=o["path_at"], bn=o["path_bn"], mass=o["effective_mass"])
            except RuntimeError as e:
                entry["exact"] = {"error": str(e)}
            else:
                eff = ex["effective_range"]
                entry["exact"] = dict(
                    quantity="‖G_k‖ (norm of the exact sum of the gradients of all length-k paths; "
                             "paths can cancel)",
                    rows=ex["rows"], images=ex["images"], sum_check_rel_error=ex["sum_check_rel_error"],
                    effective_range=eff, mass=o["effective_mass"],
                    effective_paths_fraction=None if eff is None else P.fraction_within(m, eff[0] - n_fixed,
                                                                                         eff[1] - n_fixed),
                    weighted_mean_length=gradient_weighted_mean_length(ex["rows"], "summed_norm"),
                    peak_length=max(ex["rows"], key=lambda r: r["summed_norm"])["length"])
            pres[role] = entry
        results["paths"] = pres

        # f) SD-trained vs normal
        results["sd_vs_resnet"] = _sd_vs_resnet(results)

        # figures and data files
        ctx.progress("veit2016: figures")
        for proto in o["single_bn"]:
            rows = [r for r in csv_rows["single"] if r["bn"] == proto]
            if rows:
                imgs = single["resnet"][proto]["images"]
                figures.append(Path(plots.plot_single_lesion(
                    rows, out / f"single_{proto}.png",
                    title=f"Deleting one unit at test time, {proto} BN ({imgs:,} test images)")))
        if csv_rows["k"]:
            figures.append(Path(plots.plot_k_lesion(csv_rows["k"], out / "k_deletion.png")))
        if csv_rows["reorder"]:
            figures.append(Path(plots.plot_reorder(csv_rows["reorder"], out / "reorder.png")))
        if mc_objs:
            figures.append(Path(plots.plot_paths(
                mc_objs, out / "paths_monte_carlo.png",
                title="Gradient per path length, paper protocol (Monte Carlo): C(n,k)·E‖g_path‖")))
        for role, entry in pres.items():
            if entry.get("monte_carlo") and entry.get("exact") and entry["exact"].get("rows"):
                figures.append(_plot_mc_vs_exact(entry, out / f"paths_exact_{role}.png", role))
        for name, rows in csv_rows.items():
            if rows:
                write_csv(rows, out / f"{name}.csv")
        prow = [dict(model=role, quantity="monte_carlo", **r) for role, e in pres.items() if e.get("monte_carlo")
                for r in e["monte_carlo"]["rows"]]
        prow += [dict(model=role, quantity="exact", **r) for role, e in pres.items()
                 if e.get("exact") and e["exact"].get("rows") for r in e["exact"]["rows"]]
        if prow:
            write_csv(prow, out / "paths.csv")

        trends = veit_trends(results, th)
        results["trends"] = [dict(trend=t, shows=s, evidence=e) for t, s, e in trends]
        return StudyResult(results=results, comparisons=self._comparisons(results),
                           sections=_sections(results, o), figures=figures, trends=trends)

    # -- paper vs measured ------------------------------------------------------------------------
    def _comparisons(self, res: Mapping[str, Any]) -> list[Comparison]:
        pv = {p.key: p for p in self.paper_values()}
        nets = res["networks"]
        rows: list[Comparison] = []

        def add(key: str, measured: str, note: str = "") -> None:
            p = pv[key]
            rows.append(Comparison(p.what, measured, p.shown(), p.source, note))

        add("lesion.network", f"{nets['resnet']['model']} ({nets['resnet']['units']} units); plain twin "
            f"{nets['plain']['model']}; SD twin {nets['sd']['model']}", "much shallower network")
        s = res["single"]
        for role, key in (("resnet", "single.resnet.error"), ("plain", "single.plain.error")):
            fr = s.get(role, {}).get("frozen")
            if fr:
                nd = fr["non_downsampling"]
                add(key, f"mean {_pp(nd['mean_error'])}, worst {_pp((nd['max_delta'] or 0) + fr['intact_error'])} "
                    f"over non-downsampling units (intact {_pp(fr['intact_error'])}; test, frozen BN, "
                    f"{fr['images']:,} images)")
        fr = s.get("resnet", {}).get("frozen")
        if fr:
            add("single.statement", f"ResNet mean rise {_dpp(fr['non_downsampling']['mean_delta'])} "
                "(non-downsampling), "
                f"{_dpp(fr['downsampling']['mean_delta'])} (downsampling); plain twin "
                f"{_dpp(s.get('plain', {}).get('frozen', {}).get('non_downsampling', {}).get('mean_delta'))} "
                "(test, frozen BN)", "see trends")
        add("imagenet.single.error", "not run (CIFAR only)")
        kr = res["k"].get("resnet", {}).get("frozen")
        if kr:
            curve = kr["curve"]
            add("k.statement", "; ".join(f"k={c['k']}: {_pp(c['mean'])}" for c in curve) +
                f" (test subset, frozen BN, {kr['repeats']} draws)", "see trends")
            n = nets["resnet"]["units"]
            k_eq = min(max(round(10 / 54 * n), 1), max(c["k"] for c in curve))
            c = next((c for c in curve if c["k"] == k_eq), None)
            if c is not None:
                add("k.10_of_54.error", f"{c['mean']:.3f} ± {c['std']:.3f} (error as a fraction) with k={k_eq} of "
                    f"{n} units deleted", f"k={k_eq} of {n} is about the paper's fraction 10/54 of the units; "
                    "not the paper's k")
        ro = res["reorder"].get("resnet", {}).get("frozen")
        if ro:
            order = sorted(ro["curve"], key=lambda c: (-c["tau_mean"], c["swaps"]))
            add("reorder.statement", "; ".join(f"tau={c['tau_mean']:.2f}: {_pp(c['mean'])}" for c in order) +
                " (test subset, frozen BN)", "see trends")
        pr = res["paths"].get("resnet")
        if pr:
            n = pr["n_routable"]
            lo54, hi54 = _central_54()
            add("paths.distribution", f"Binomial({n}, 0.5) for our {pr['n_units']} units; {pr['typical_mass']:.0%} "
                f"central range {pr['typical_range'][0]}-{pr['typical_range'][1]} "
                f"({100 * pr['typical_fraction']:.1f}% of paths)",
                f"for n = 54 the narrowest range with 95% is {lo54[0]}-{lo54[1]} ({100 * lo54[2]:.1f}%); 19-35 "
                f"holds {100 * hi54:.1f}% (arithmetic, not measured)")
            mc = pr.get("monte_carlo")
            if mc and mc.get("effective_range"):
                e = mc["effective_range"]
                add("paths.effective", f"Monte Carlo C(n,k)·E‖g_path‖: {mc['mass']:.0%} of the total from lengths "
                    f"{e[0]}-{e[1]} ({100 * (mc['effective_paths_fraction'] or 0):.2f}% of all paths); training "
                    f"batches, {pr['at']} gradient, {pr['bn']}-mode BN")
                add("paths.method", f"{mc['samples']} samples of {mc['batch_size']} training images per length; "
                    f"gradient norm at the {'input image' if pr['at'] == 'image' else 'first unit input'}; "
                    f"{pr['bn']}-mode BN")
            ex = pr.get("exact")
            if ex and ex.get("effective_range"):
                e = ex["effective_range"]
                add("paths.effective", f"exact ‖G_k‖ (summed gradient, a different quantity): {ex['mass']:.0%} of "
                    f"Σ‖G_k‖ from lengths {e[0]}-{e[1]}", "exact decomposition, experiments.md §1.5; not the "
                    "paper's quantity")
            elif ex and ex.get("error"):
                add("paths.effective", f"exact decomposition not measured: {ex['error']}")
        add("paths.effective.threshold", f"{res['protocol']['options']['effective_mass']:.0%} (our choice)")
        mc = (pr or {}).get("monte_carlo")
        if mc and mc.get("effective_range"):
            e = mc["effective_range"]
            add("paths.headline", f"{mc['mass']:.0%} of the total gradient (paper protocol) from paths through "
                f"{e[0]}-{e[1]} units, i.e. {2 * e[0]}-{2 * e[1]} conv layers (2 per unit)",
                "the paper's 10–34 layers are its 5–17 modules x 2")
        add("retrain.effective_only", "not run")
        return rows


def _central_54() -> tuple[tuple[int, int, float], float]:
    from reslab.analysis.paths import central_range, fraction_within

    lo, hi = central_range(54, 0.95)
    return (lo, hi, fraction_within(54, lo, hi)), fraction_within(54, 19, 35)


def _model_name(inp: Any) -> str:
    """``cifar_resnet20``, ``cifar_resnet (depth=14, plain=True)``, ``... + SD (p_L=0.5, linear)``."""
    info = getattr(inp, "info", None)
    name = str(getattr(info, "model", None) or type(inp.model).__name__)
    kw = dict(getattr(info, "model_kwargs", None) or {})
    sd = kw.pop("stochastic_depth", None)
    kw.pop("in_chans", None)
    if kw:
        name += " (" + ", ".join(f"{k}={v}" for k, v in sorted(kw.items())) + ")"
    if isinstance(sd, Mapping):
        name += f" + SD (p_L={sd.get('final_survival')}, {sd.get('rule', 'linear')})"
    elif sd is not None:
        name += f" + SD (p_L={sd})"
    return name


def _sd_vs_resnet(res: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"single": {}, "k": {}}
    for role in ("resnet", "sd"):
        for proto, s in res["single"].get(role, {}).items():
            out["single"].setdefault(proto, {})[role] = dict(
                intact_error=s["intact_error"], mean_delta_non_downsampling=s["non_downsampling"]["mean_delta"],
                max_delta_non_downsampling=s["non_downsampling"]["max_delta"],
                mean_delta_downsampling=s["downsampling"]["mean_delta"],
                errors=[u["error"] for u in s["units"]])
        for proto, kk in res["k"].get(role, {}).items():
            out["k"].setdefault(proto, {})[role] = dict(
                k=[c["k"] for c in kk["curve"]], mean=[c["mean"] for c in kk["curve"]],
                std=[c["std"] for c in kk["curve"]], mean_rise=mean_rise(kk["curve"]))
    return out


def _plot_mc_vs_exact(entry: Mapping[str, Any], path: Path, role: str) -> Path:
    """Share of the total per path length: the paper's C(n,k)·E‖g_path‖ against the exact ‖G_k‖,
    with the Binomial path distribution (all three normalised to sum to 1)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    dist = entry["distribution"]
    ax.bar([d["length"] for d in dist], [d["fraction"] for d in dist], color="0.8", label="share of paths "
           f"(Binomial({entry['n_routable']}, 1/2))")
    mc, ex = entry["monte_carlo"], entry["exact"]
    ax.plot([r["length"] for r in mc["rows"]], [r["total_fraction"] for r in mc["rows"]], "o-", ms=4, color="C0",
            label="paper protocol: C(n,k)·E‖g_path‖, share (Monte Carlo)")
    ax.plot([r["length"] for r in ex["rows"]], [r["share"] for r in ex["rows"]], "s--", ms=4, color="C3",
            label="exact: ‖G_k‖ of the summed length-k gradient, share")
    tlo, thi = entry["typical_range"]
    ax.axvspan(tlo - 0.5, thi + 0.5, color="0.5", alpha=0.08, label=f"typical paths ({entry['typical_mass']:.0%})")
    ax.set(xlabel="path length (residual branches on the path)", ylabel="share of the total",
           title=f"{role}: where the gradient comes from, two quantities")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    from reslab.analysis.plots import save_figure

    return Path(save_figure(fig, path))


# ---- markdown ----------------------------------------------------------------------------------------
def _sections(res: Mapping[str, Any], o: Mapping[str, Any]) -> list[str]:
    secs: list[str] = []
    nets, prot = res["networks"], res["protocol"]
    lines = ["## Networks and protocol", "",
             "| role | model | residual units | downsampling units | run | source |", "|---|---|---|---|---|---|"]
    for role, n in nets.items():
        lines.append(f"| {role} | {n['model']} | {n['units']} | {', '.join(map(str, n['downsampling_units'])) or '-'} "
                     f"| `{n['run']}` | {n['source'] or '-'} |")
    lines += ["", f"Intact errors and frozen-BN single deletions: the {prot['test_images']:,}-image test split "
              f"(single view). Recalibrated-BN single deletions, k-deletion and reordering: a fixed seeded subset of "
              f"{prot['subset_images']:,} test images (seed {prot['subset_seed']}). BN *frozen*: the stored running "
              f"statistics (the paper's protocol); *recalibrated*: re-estimated on {prot['calib_images']:,} augmented "
              f"training images for each lesioned network. Checkpoint: `{prot['checkpoint']}`."]
    secs.append("\n".join(lines))

    # intact + single
    lines = ["## Deleting one unit (paper §4.1)", "", "| network | BN | images | intact | mean / worst, one "
             "non-downsampling unit deleted | mean / worst, one downsampling unit deleted | not deletable |",
             "|---|---|---|---|---|---|---|"]
    for role, by in res["single"].items():
        for proto, s in by.items():
            nd, dn = s["non_downsampling"], s["downsampling"]

            def mw(x: Mapping[str, Any]) -> str:
                if x["mean_error"] is None:
                    return "-"
                return f"{_pp(x['mean_error'])} / {_pp(x['max_delta'] + s['intact_error'])} (unit {x['argmax']})"
            lines.append(f"| {role} | {proto} | {s['images']:,} | {_pp(s['intact_error'])} | {mw(nd)} | {mw(dn)} | "
                         f"{', '.join(map(str, s['not_deletable'])) or '-'} |")
    heads = [(role, proto) for role, by in res["single"].items() for proto in by]
    lines += ["", "Error per deleted unit (D: downsampling unit; '-': not deletable):", "",
              "| unit | " + " | ".join(f"{r} ({p})" for r, p in heads) + " |", "|---" * (len(heads) + 1) + "|"]
    n_max = max(len(res["single"][r][p]["units"]) for r, p in heads)
    for i in range(n_max):
        cells, ds = [], False
        for r, p in heads:
            us = res["single"][r][p]["units"]
            u = us[i] if i < len(us) else None
            ds = ds or bool(u and u["downsample"])
            cells.append("-" if u is None or u["error"] is None else _pp(u["error"]))
        lines.append(f"| {i}{' D' if ds else ''} | " + " | ".join(cells) + " |")
    lines += ["", "A deleted unit of the plain twin passes its input through (a layer removed from the plain "
              "network); its downsampling units change the shape and cannot be removed, so they are not measured."]
    secs.append("\n".join(lines))

    # k
    if res["k"]:
        curves = [(r, p) for r, by in res["k"].items() for p in by]
        ks = sorted({c["k"] for r, p in curves for c in res["k"][r][p]["curve"]})
        lines = ["## Deleting k units (paper §4.2)", "",
                 f"k random non-downsampling units deleted, {o['k_repeats']} draws per k (mean ± std, points), "
                 f"{prot['subset_images']:,} test images.", "",
                 "| k | " + " | ".join(f"{r} ({p})" for r, p in curves) + " |", "|---" * (len(curves) + 1) + "|"]
        for k in ks:
            cells = []
            for r, p in curves:
                c = next((c for c in res["k"][r][p]["curve"] if c["k"] == k), None)
                cells.append("-" if c is None else f"{_pp(c['mean'])} ± {100 * c['std']:.2f}")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        secs.append("\n".join(lines))

    # reorder
    if res["reorder"]:
        lines = ["## Reordering units (paper §4.3)", "",
                 f"Random swaps of two non-downsampling units of one stage, {o['reorder_repeats']} draws per swap "
                 f"count, {prot['subset_images']:,} test images.", "",
                 "| network | BN | swaps | mean Kendall tau | error (mean ± std, points) |", "|---|---|---|---|---|"]
        for r, by in res["reorder"].items():
            for p, rr in by.items():
                for c in rr["curve"]:
                    lines.append(f"| {r} | {p} | {c['swaps']} | {c['tau_mean']:.3f} | {_pp(c['mean'])} ± "
                                 f"{100 * c['std']:.2f} |")
        secs.append("\n".join(lines))

    # paths
    for role, e in res["paths"].items():
        where = "the input image" if e["at"] == "image" else "the input of the first residual unit"
        lines = [f"## Path lengths, {role} (paper §5)", "",
                 f"{e['n_units']} units unravel into 2^{e['n_routable']} paths; length ~ Binomial({e['n_routable']}, "
                 f"1/2): {e['typical_mass']:.0%} of the paths ({100 * e['typical_fraction']:.1f}%) have length "
                 f"{e['typical_range'][0]}-{e['typical_range'][1]}, mean {e['mean_length']:.1f}. Gradients of the "
                 f"cross-entropy at {where}, {e['bn']}-mode BN, training images. Two quantities, not to be confused:",
                 "", "* **paper protocol (Monte Carlo)**, `C(n,k)·E‖g_path‖`: per measurement the gradient of one "
                 "random path of length k (forward unchanged, backward through the branches of k units and the "
                 "shortcuts of the others), its norm, averaged, times the number of paths of that length;",
                 "* **exact decomposition**, `‖G_k‖`: the norm of the exact sum of the gradients of all length-k "
                 "paths (one backward pass carrying n+1 components; paths can cancel, so it is not the sum of "
                 "norms).", ""]
        mc, ex = e.get("monte_carlo"), e.get("exact")
        exr = {r["length"]: r for r in (ex or {}).get("rows", [])} if ex else {}
        if mc:
            lines += [f"Monte Carlo: {mc['samples']} samples of {mc['batch_size']} images per length.", "",
                      "| length | paths | E‖g_path‖ ± s.e.m. | C(n,k)·E‖g_path‖ | share | exact ‖G_k‖ "
                      "| share |",
                      "|---|---|---|---|---|---|---|"]
            for r in mc["rows"]:
                x = exr.get(r["length"])
                lines.append(f"| {r['length']} | {r['paths']:,} | {r['grad_mean']:.3g} ± {r['grad_sem']:.2g} | "
                             f"{r['total']:.3g} | {100 * r['total_fraction']:.1f}% | "
                             f"{'-' if x is None else format(x['summed_norm'], '.3g')} | "
                             f"{'-' if x is None else format(100 * x['share'], '.1f') + '%'} |")
            eff = mc.get("effective_range")
            lines += ["", f"* paper protocol: {mc['mass']:.0%} of the total from lengths "
                          f"{eff[0]}-{eff[1]} ({100 * (mc['effective_paths_fraction'] or 0):.2f}% of all paths), "
                          f"peak at length {mc['peak_length']}, gradient-weighted mean length "
                          f"{mc['weighted_mean_length']:.2f}." if eff else "* paper protocol: zero gradient."]
        if ex and ex.get("rows"):
            eff = ex.get("effective_range")
            lines.append(f"* exact: {ex['mass']:.0%} of Σ‖G_k‖ from lengths {eff[0]}-{eff[1]}, peak at length "
                         f"{ex['peak_length']}, weighted mean length {ex['weighted_mean_length']:.2f}; "
                         f"{ex['images']} images; check: Σ_k G_k equals the ordinary gradient to "
                         f"{ex['sum_check_rel_error']:.1e} (relative)." if eff else "* exact: zero gradient.")
        elif ex and ex.get("error"):
            lines.append(f"* exact decomposition not measured: {ex['error']}")
        secs.append("\n".join(lines))

    # SD vs normal
    sv = res["sd_vs_resnet"]
    if sv["single"] or sv["k"]:
        lines = ["## The SD-trained network against the normal one", ""]
        for proto, by in sv["single"].items():
            if "resnet" in by and "sd" in by:
                a, b = by["resnet"], by["sd"]
                lines.append(f"* one unit deleted ({proto} BN): ResNet intact {_pp(a['intact_error'])}, mean rise "
                             f"{_dpp(a['mean_delta_non_downsampling'])} (non-downsampling); SD net intact "
                             f"{_pp(b['intact_error'])}, mean rise {_dpp(b['mean_delta_non_downsampling'])}.")
        for proto, by in sv["k"].items():
            if "resnet" in by and "sd" in by:
                a, b = by["resnet"], by["sd"]
                pairs = ", ".join(f"k={k}: {_pp(x)} vs {_pp(y)}" for k, x, y in zip(a["k"], a["mean"], b["mean"]))
                lines.append(f"* k units deleted ({proto} BN), ResNet vs SD net: {pairs}; mean rise over k >= 1: "
                             f"{_dpp(a['mean_rise'])} vs {_dpp(b['mean_rise'])}.")
        secs.append("\n".join(lines))
    return secs


STUDY = Veit2016()

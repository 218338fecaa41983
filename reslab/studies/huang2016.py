"""Huang, Sun, Liu, Sedra, Weinberger 2016, "Deep Networks with Stochastic Depth" (arXiv 1603.09382).

The study (:class:`Huang2016`, ``STUDY``) and the experiment functions behind ``reslab sd``:

* :func:`sweep`: test error for several final survival probabilities p_L and survival rules
  (the paper's Fig. 8 left) plus the constant-depth baseline;
* :func:`gradient_strength`: the engine's gradient probe (``train.grad_probe``, default
  ``first_conv``: the first conv of the first residual block, the paper's layer, §5 / Fig. 7)
  with and without stochastic depth;
* :func:`run_test_error`: the test error of a run's ``best`` checkpoint (the epoch chosen on the
  validation split ``data.val_split``, the paper's protocol, Table 1) or its ``last`` one.

Protocol (papers.md §5, experiments.md §2.1): the paper reports the **test** error at the epoch
with the lowest **validation** error (45k/5k split). Every error here says which split it was
measured on; a "best" epoch is only ever chosen on a validation split — a run without one has a
final-epoch test error and no "best" (asking for it raises ``ValueError``).

Variants of a sweep keep every stochastic-depth option of the base config (``drop_downsample``,
``fill_missing_grads``, ``scale``, ``seed``, ``mode``) and vary only ``final_survival`` and ``rule``.
Every training run goes through :func:`reslab.train.train`; a variant whose run directory already
holds a current ``sd_result.json`` is read back, an interrupted one resumed.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from reslab.regularize.stochastic_depth import StochasticDepth
from reslab.studies.base import (Comparison, PaperValue, Plan, RunSpec, Study, StudyContext, StudyResult,
                                 check_budget)
from reslab.studies.recipes import LAPTOP_EPOCHS, laptop_config, sd_kwargs
from reslab.train.callbacks import sd_spec_of
from reslab.train.engine import Callback

RESULT_FILE = "sd_result.json"
RESULT_SCHEMA = 2  # sd_result.json written before the split-labelled protocol (schema 1) is recomputed
PROBE_TARGETS = ("first_conv", "unit0_convs")

__all__ = ["Huang2016", "RESULT_FILE", "STUDY", "gradient_strength", "paper_config", "plot_gradient_strength",
           "plot_sweep", "run_name", "run_summary", "run_test_error", "sweep", "sweep_configs", "sweep_markdown",
           "train_throughput", "train_variant", "variant_name", "variant_spec", "with_stochastic_depth"]


# ---- configs --------------------------------------------------------------------------------
def with_stochastic_depth(cfg: Any, spec: StochasticDepth | dict[str, Any] | float | None) -> Any:
    """``cfg`` with ``model.kwargs.stochastic_depth`` set to ``spec`` (removed when None).
    Skipping modes also switch on ``train.ddp_find_unused_parameters`` (needed under DDP)."""
    kwargs = dict(cfg.model.kwargs)
    kwargs.pop("stochastic_depth", None)
    train = cfg.train
    if spec is not None:
        sd = StochasticDepth.coerce(spec)
        kwargs["stochastic_depth"] = {k: v for k, v in sd.to_dict().items()
                                      if v != StochasticDepth.__dataclass_fields__[k].default}
        kwargs["stochastic_depth"]["final_survival"] = sd.final_survival
        if sd.mode == "batch" and sd.final_survival < 1.0:
            train = replace(train, ddp_find_unused_parameters=True)
    return replace(cfg, model=replace(cfg.model, kwargs=kwargs), train=train)


def variant_spec(base: StochasticDepth | None, final_survival: float, rule: str,
                 mode: str | None = None) -> StochasticDepth | None:
    """The spec of a sweep variant: ``base``'s options (drop_downsample, fill_missing_grads,
    scale, seed, mode) with ``final_survival`` and ``rule`` replaced; ``mode`` overrides the
    base's mode when given. None (constant depth) for p_L >= 1."""
    if float(final_survival) >= 1.0:
        return None
    base = base if base is not None else StochasticDepth()
    return replace(base, final_survival=final_survival, rule=rule, mode=mode or base.mode)


def _fmt_p(p: float) -> str:
    return f"{p:.3f}".rstrip("0").rstrip(".")


def variant_name(spec: StochasticDepth | None) -> str:
    """Run-directory name of a sweep variant: ``constant`` or ``<rule>-pL<p>[-<mode>]``."""
    if spec is None or spec.final_survival >= 1.0:
        return "constant"
    name = f"{spec.rule}-pL{_fmt_p(spec.final_survival)}"
    return name if spec.mode == "batch" else f"{name}-{spec.mode}"


def sweep_configs(base_cfg: Any, survivals: Sequence[float] = (0.2, 0.5, 0.8),
                  rules: Sequence[str] = ("linear", "uniform"), mode: str | None = None,
                  constant: bool = True) -> dict[str, Any]:
    """``{variant name: config}`` of a sweep: one per (rule, p_L < 1), plus constant depth first
    (when ``constant`` or some p_L is 1). Each keeps ``base_cfg``'s stochastic-depth options."""
    if not survivals:
        raise ValueError("give at least one final survival probability (e.g. --survival 0.5)")
    base = sd_spec_of(base_cfg)
    out: dict[str, Any] = {}
    if constant or any(float(p) >= 1.0 for p in survivals):
        out["constant"] = with_stochastic_depth(base_cfg, None)
    for r in rules:
        for p in survivals:
            spec = variant_spec(base, p, r, mode)
            if spec is not None:
                out[variant_name(spec)] = with_stochastic_depth(base_cfg, spec)
    return out


# ---- reading a finished run -----------------------------------------------------------------
def _epoch_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    from reslab.train.logging import read_metrics

    last: dict[int, dict[str, Any]] = {}
    for r in read_metrics(run_dir):
        if r.get("kind") == "epoch":
            last[int(r["epoch"])] = r  # a resumed run may repeat an epoch: keep the latest record
    return [last[e] for e in sorted(last)]


def train_throughput(run_dir: str | os.PathLike, batch_size: int) -> dict[str, Any]:
    """Training time from ``metrics.jsonl``: the engine logs ``img_s`` (training images per
    second, evaluation excluded) every ``train.log_every_steps``; the time of an interval is its
    images over ``img_s``. Returns ``{train_seconds, images, img_s}`` (None without records)."""
    from reslab.train.logging import read_metrics

    seconds, images, prev = 0.0, 0, 0
    for r in read_metrics(run_dir):
        kind = r.get("kind")
        if kind == "resume":
            prev = int(r.get("step", 0))
        elif kind == "train" and r.get("img_s"):
            n = (int(r["step"]) - prev) * batch_size
            prev = int(r["step"])
            if n > 0:
                seconds += n / float(r["img_s"])
                images += n
    if not images:
        return {"train_seconds": None, "images": 0, "img_s": None}
    return {"train_seconds": seconds, "images": images, "img_s": images / seconds}


def _check_best_exists(run_dir: Path, cfg: Any) -> None:
    if not cfg.data.val_split:
        raise ValueError(f"{run_dir} was trained without a validation split (data.val_split = 0), so it has no "
                         "best epoch: it is never chosen on the test set; use which='last' (final epoch) or train "
                         "with data.val_split > 0")


def run_test_error(run_dir: str | os.PathLike, which: str = "best", recalibrate_bn: int = 0,
                   split: str = "test", batch_size: int = 128, device: str = "cpu",
                   data_dir: str | None = None) -> dict[str, Any]:
    """Error of a run's ``best`` checkpoint (the epoch chosen on the validation split) or its
    ``last`` one, on the ``test`` split or the run's own evaluation set (``split="eval"``: the
    validation split when the run has one).

    ``best`` needs a run trained with ``data.val_split > 0`` (``ValueError`` otherwise: a best
    epoch is never chosen on the test set). With ``recalibrate_bn`` = n > 0, ``error_recal`` is
    measured again after re-estimating every BN's statistics with all units active (n batches of
    un-augmented training images; :func:`reslab.analysis.bn.recalibrate_bn`).
    """
    from reslab.analysis.bn import recalibrate_bn as _recal
    from reslab.train import checkpoint as ckpt
    from reslab.train.config import config_from_dict
    from reslab.train.engine import evaluate, prepare_data
    from reslab.train.evaluate import eval_dataset, load_model_from_checkpoint

    if split not in ("test", "eval"):
        raise ValueError(f"split must be 'test' or 'eval', got {split!r}")
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    model, info, wpath = load_model_from_checkpoint(run_dir, which, device)
    if not info.config:
        raise ValueError(f"{wpath} carries no run config; cannot tell which data to evaluate on")
    cfg = config_from_dict(info.config)
    if which == "best":
        _check_best_exists(Path(run_dir), cfg)
        if Path(run_dir).is_dir() and wpath.name != "best.safetensors":
            raise ValueError(f"{run_dir} has no {ckpt.CKPT_DIR}/best.safetensors (no validation-selected epoch yet); "
                             "use which='last'")
    if data_dir is not None:
        cfg = replace(cfg, data=replace(cfg.data, data_dir=data_dir))
    eval_cfg = replace(cfg, data=replace(cfg.data, val_split=0)) if split == "test" else cfg
    data = eval_dataset(eval_cfg)
    res = evaluate(model, data, batch_size, "none", device)
    measured_on = "test" if split == "test" or not cfg.data.val_split else "val"
    out: dict[str, Any] = {"checkpoint": str(wpath), "epoch": info.epoch, "which": which,
                           "selected_on": "val" if which == "best" else None, "split": measured_on,
                           "n": res["n"], "error": 1.0 - res["top1"]}
    if recalibrate_bn:
        _, train_set, _ = prepare_data(cfg)
        _recal(model, train_batches(train_set, batch_size, recalibrate_bn), recalibrate_bn)
        out["error_recal"] = 1.0 - evaluate(model, data, batch_size, "none", device)["top1"]
        out["recalibrate_batches"] = recalibrate_bn
    return out


def run_summary(run_dir: str | os.PathLike, data_dir: str | None = None, device: str = "cpu",
                batch_size: int = 500) -> dict[str, Any]:
    """Every number of one finished run, each labelled with its split (errors in [0, 1]):

    ``test_error_final`` (last checkpoint, test split); with a validation split also
    ``best_val_epoch``, ``best_val_error`` and ``test_error_at_best_val`` (the best checkpoint,
    chosen on validation, evaluated on the test split: the paper's number); ``grad_curve``
    (per-epoch ``grad_abs_mean`` when ``train.grad_probe`` was on) and the training time.
    """
    from reslab.train.config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    records = _epoch_records(run_dir)
    last = run_test_error(run_dir, "last", split="test", batch_size=batch_size, device=device, data_dir=data_dir)
    out: dict[str, Any] = {
        "run_dir": str(run_dir), "model": cfg.model.name, "data": cfg.data.name, "val_split": cfg.data.val_split,
        "eval_split": "val" if cfg.data.val_split else "test", "epochs": len(records),
        "sd": spec.to_dict() if (spec := sd_spec_of(cfg)) else None,
        "test_error_final": last["error"], "final_epoch": last["epoch"], "test_images": last["n"],
        "best_val_epoch": None, "best_val_error": None, "test_error_at_best_val": None,
    }
    if cfg.data.val_split:
        vals = [(r["val_top1"], -int(r["epoch"]), r) for r in records if r.get("val_top1") is not None]
        if vals:
            rec = max(vals, key=lambda t: (t[0], t[1]))[2]  # first epoch of the highest val top-1
            out["best_val_epoch"], out["best_val_error"] = int(rec["epoch"]), 1.0 - rec["val_top1"]
            out["final_val_error"] = 1.0 - records[-1]["val_top1"] if records[-1].get("val_top1") is not None else None
        best = run_test_error(run_dir, "best", split="test", batch_size=batch_size, device=device, data_dir=data_dir)
        out["test_error_at_best_val"] = best["error"]
        out["best_checkpoint_epoch"] = best["epoch"]
    else:
        out["best_note"] = "no validation split: no best epoch (never selected on the test set)"
    if cfg.train.grad_probe:
        out["grad_probe"] = cfg.train.grad_probe
        out["grad_curve"] = [{"epoch": int(r["epoch"]), "grad_abs_mean": r.get("grad_abs_mean"),
                              "steps": r.get("grad_probe_steps"), "steps_ran": r.get("grad_probe_steps_ran")}
                             for r in records]
    t = train_throughput(run_dir, cfg.train.batch_size)
    out["train_seconds"], out["train_img_s"] = t["train_seconds"], t["img_s"]
    out["train_seconds_per_epoch"] = t["train_seconds"] / len(records) if t["train_seconds"] and records else None
    return out


# ---- runs -----------------------------------------------------------------------------------
def _read_result(run_dir: Path) -> dict[str, Any] | None:
    f = run_dir / RESULT_FILE
    if f.is_file():
        res = json.loads(f.read_text())
        if res.get("schema") == RESULT_SCHEMA:
            return res
    return None


def _write_result(run_dir: Path, result: dict[str, Any]) -> None:
    tmp = run_dir / f".{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
    os.replace(tmp, run_dir / RESULT_FILE)


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def train_variant(cfg: Any, run_dir: str | os.PathLike, callbacks: Sequence[Callback] = (),
                  progress: bool = False, recalibrate_bn: int = 0) -> dict[str, Any]:
    """Train one config into ``run_dir`` (or read its ``sd_result.json``); returns
    :func:`run_summary` (every error labelled with its split) plus ``steps``. ``recalibrate_bn``
    > 0 adds ``test_error_final_recal``: the last checkpoint's test error after re-estimating BN
    statistics on that many training batches."""
    from reslab.train import resume_config, train

    run_dir = Path(run_dir)
    cached = _read_result(run_dir)
    if cached is not None:
        return cached
    if (run_dir / "config.yaml").is_file():  # interrupted earlier (or an old result): continue from the last checkpoint
        res = train(resume_config(run_dir, cfg), run_dir, resume=True, callbacks=list(callbacks), progress=progress)
    else:
        res = train(cfg, run_dir, callbacks=list(callbacks), progress=progress)
    out = {"schema": RESULT_SCHEMA, **run_summary(run_dir, batch_size=cfg.eval.batch_size), "steps": res.steps}
    if recalibrate_bn:
        rec = run_test_error(run_dir, which="last", recalibrate_bn=recalibrate_bn, split="test")
        out["test_error_final_recal"] = rec["error_recal"]
    if _is_main():
        _write_result(run_dir, out)
    return out


def _expected_depth_of(cfg: Any) -> float:
    from reslab.models.registry import create_model
    from reslab.regularize.stochastic_depth import model_expected_depth

    kw = dict(cfg.model.kwargs)
    kw.pop("num_classes", None)
    with torch.device("meta"):
        model = create_model(cfg.model.name, **kw)
    return model_expected_depth(model)


def sweep(base_cfg: Any, out_dir: str | os.PathLike, survivals: Sequence[float] = (0.2, 0.5, 0.8),
          rules: Sequence[str] = ("linear", "uniform"), mode: str | None = None, recalibrate_bn: int = 0,
          progress: bool = False, constant: bool = True) -> list[dict[str, Any]]:
    """Train ``base_cfg`` once per (rule, p_L) plus once with constant depth (p_L = 1);
    write ``sweep.csv``, ``sweep.md`` and ``sweep.png`` into ``out_dir``; return the rows.

    Huang et al. 2016 (Fig. 8, left) plot test error against p_L for the linear and the
    uniform rule on CIFAR-10 with ResNet-110. Each row has ``rule``, ``final_survival``,
    ``expected_depth`` (sum of p_l over the model's units as configured), ``test_error_final``
    and, with ``data.val_split``, ``test_error_at_best_val`` (None without a validation split).
    The variants keep the base config's stochastic-depth options (:func:`sweep_configs`).
    """
    cfgs = sweep_configs(base_cfg, survivals, rules, mode, constant)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, cfg in cfgs.items():
        spec = sd_spec_of(cfg)
        res = train_variant(cfg, out / name, progress=progress, recalibrate_bn=recalibrate_bn)
        rows.append({"variant": name, "rule": spec.rule if spec else "constant",
                     "final_survival": spec.final_survival if spec else 1.0,
                     "expected_depth": _expected_depth_of(cfg),
                     **{k: res.get(k) for k in ("test_error_at_best_val", "test_error_final", "best_val_epoch",
                                                "best_val_error", "test_error_final_recal") if k in res},
                     "val_split": res.get("val_split")})
    if _is_main():
        write_rows_csv(rows, out / "sweep.csv")
        (out / "sweep.md").write_text(sweep_markdown(rows, base_cfg) + "\n")
        plot_sweep(rows, out / "sweep.png", title=f"{base_cfg.model.name} on {base_cfg.data.name}")
    return rows


def write_rows_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    import csv

    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in keys} for r in rows)
    return path


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def sweep_markdown(rows: Sequence[dict[str, Any]], cfg: Any) -> str:
    from reslab.report.markdown import markdown_table

    recal = any("test_error_final_recal" in r for r in rows)
    header = ["rule", "p_L", "E[active units]", "test error at best val epoch (%)", "best val epoch",
              "final-epoch test error (%)"]
    if recal:
        header.append("final-epoch test error, BN recalibrated (%)")
    body = []
    for r in rows:
        line = [r["rule"], f"{r['final_survival']:.2f}", f"{r['expected_depth']:.2f}",
                _pct(r.get("test_error_at_best_val")), r.get("best_val_epoch") or "—", _pct(r["test_error_final"])]
        if recal:
            line.append(_pct(r.get("test_error_final_recal")))
        body.append(line)
    note = ("" if cfg.data.val_split else " No validation split (data.val_split = 0): no best epoch is reported; "
            "it is never chosen on the test set.")
    intro = (f"Stochastic-depth sweep: {cfg.model.name} on {cfg.data.name}, {cfg.train.epochs} epochs; errors on "
             f"the test split (Huang et al. 2016 Fig. 8 uses ResNet-110, CIFAR-10, 500 epochs).{note}\n\n")
    return intro + markdown_table(header, body)


def _figure(size: tuple[float, float] = (6, 4)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    from reslab.analysis.plots import save_figure

    return Path(save_figure(fig, path))


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """Test error (%) against p_L, one line per rule, constant depth as a dashed line: at the
    best-validation epoch when the runs have a validation split, else at the final epoch."""
    key = "test_error_at_best_val" if rows and all(r.get("test_error_at_best_val") is not None for r in rows) \
        else "test_error_final"
    label = "test error at best-val epoch (%)" if key == "test_error_at_best_val" else "final-epoch test error (%)"
    fig = _figure()
    ax = fig.subplots()
    rules = [r for r in dict.fromkeys(row["rule"] for row in rows) if r != "constant"]
    for i, rule in enumerate(rules):
        pts = sorted((r["final_survival"], 100 * r[key]) for r in rows if r["rule"] == rule)
        ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=f"{rule} rule")
    const = [r for r in rows if r["rule"] == "constant"]
    if const:
        ax.axhline(100 * const[0][key], color="k", ls="--", lw=1, label="constant depth")
    ax.set(xlabel="final survival probability $p_L$", ylabel=label, title=title or "stochastic depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def gradient_strength(base_cfg: Any, out_dir: str | os.PathLike, final_survival: float = 0.5,
                      rule: str = "linear", mode: str | None = None, probe: str = "first_conv",
                      progress: bool = False) -> dict[str, Any]:
    """Train with and without stochastic depth with the engine's gradient probe on
    (``train.grad_probe = probe``; default ``first_conv``, the paper's layer: the first conv of the
    first residual block, Huang et al. 2016 §5, Fig. 7; ``unit0_convs``: every conv weight of
    unit 0); writes ``gradient_strength.json``, ``.csv`` and ``.png`` (per-epoch mean |gradient|,
    from the runs' ``metrics.jsonl``) into ``out_dir``. Steps where the probed unit was dropped
    are not averaged in. The SD run keeps the base config's stochastic-depth options."""
    if probe not in PROBE_TARGETS:
        raise ValueError(f"probe must be one of {', '.join(PROBE_TARGETS)}; got {probe!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = replace(base_cfg, train=replace(base_cfg.train, grad_probe=probe))
    spec = variant_spec(sd_spec_of(base_cfg), final_survival, rule, mode)
    result: dict[str, Any] = {"probe": probe, "model": base_cfg.model.name, "data": base_cfg.data.name, "runs": {}}
    for label, s in (("constant", None), (variant_name(spec), spec)):
        res = train_variant(with_stochastic_depth(base_cfg, s), out / label, progress=progress)
        result["runs"][label] = {"sd": s.to_dict() if s else None, "per_epoch": res.get("grad_curve", []),
                                 "test_error_final": res["test_error_final"],
                                 "test_error_at_best_val": res["test_error_at_best_val"]}
    if _is_main():
        (out / "gradient_strength.json").write_text(json.dumps(result, indent=1) + "\n")
        rows = [{"run": k, **e} for k, r in result["runs"].items() for e in r["per_epoch"]]
        write_rows_csv(rows, out / "gradient_strength.csv")
        plot_gradient_strength(result, out / "gradient_strength.png")
    return result


def plot_gradient_strength(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Per-epoch mean |gradient| at the probed layer, one line per run (log scale)."""
    fig = _figure()
    ax = fig.subplots()
    plotted = False
    for i, (label, r) in enumerate(result["runs"].items()):
        pts = [(e["epoch"], e["grad_abs_mean"]) for e in r["per_epoch"] if e.get("grad_abs_mean")]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{i}", label=label)
            plotted = True
    where = ("first conv of the first residual block" if result.get("probe", "first_conv") == "first_conv"
             else "conv weights of the first residual unit")
    ax.set(xlabel="epoch", ylabel="mean |gradient|", yscale="log" if plotted else "linear",
           title=f"gradient strength, {where}\n({result['model']})")
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def train_batches(data: Any, batch_size: int, n_batches: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """``n_batches`` normalised, un-augmented training batches in a seeded random order
    (inputs for :func:`reslab.analysis.bn.recalibrate_bn`)."""
    from reslab.data import EvalTransform

    transform = EvalTransform(data.mean, data.std, data.eval_crop)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    for i in range(min(n_batches, math.ceil(len(data) / batch_size))):
        idx = perm[i * batch_size:(i + 1) * batch_size]
        yield transform(data.images[idx])


# ---- the study --------------------------------------------------------------------------------
PAPER_EPOCHS = 500
PAPER_PL_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))  # Fig. 8 left: 0.1 .. 1.0
PAPER_DEPTHS = (20, 32, 44, 56, 110)  # Fig. 8 right (heat map): our choice of registered depths, see deviations
LAPTOP_PL_GRID = (0.2, 0.5, 1.0)
RULES = ("linear", "uniform")

# Huang et al. 2016 recipe for CIFAR (§4; configs/huang2016_sd_resnet110_c10.yaml).
PAPER_C10: dict[str, Any] = {
    "data": {"name": "cifar10", "val_split": 5000, "crop_padding": 4, "pad_mode": "zeros", "flip": True},
    "optim": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1.0e-4},
    "schedule": {"name": "multistep", "milestones": [250, 375], "unit": "epoch", "gamma": 0.1},
    "train": {"epochs": PAPER_EPOCHS, "batch_size": 128, "seed": 0, "grad_probe": "first_conv"},
    "eval": {"every_epochs": 1, "tta": "none"},
}


def paper_config(model: str, sd: dict[str, Any] | None = None) -> dict[str, Any]:
    """The paper's CIFAR-10 recipe for ``model`` (optionally with stochastic depth) as a config dict."""
    d = copy.deepcopy(PAPER_C10)
    d["model"] = {"name": model, "kwargs": {"stochastic_depth": dict(sd)} if sd else {}}
    if sd and sd.get("mode", "batch") == "batch" and sd["final_survival"] < 1:
        d["train"]["ddp_find_unused_parameters"] = True
    return d


def _smoke_config(sd: dict[str, Any] | None) -> dict[str, Any]:
    """A tiny digits run (offline, a few seconds on one thread): depth-8 CIFAR ResNet (3 units), 2 epochs."""
    d = laptop_config("cifar_resnet", sd, epochs=2)
    d["model"]["kwargs"]["depth"] = 8
    d["data"] = {"name": "digits", "val_split": 237}
    d["train"].update({"batch_size": 64, "log_every_steps": 5, "channels_last": False, "tensorboard": False,
                       "progress": False})
    return d


def run_name(rule: str, p: float) -> str:
    """RunSpec name of a grid point: ``constant`` for p_L = 1, else ``sd_<rule>_<p_L>`` (e.g. ``sd_linear_0.5``)."""
    return "constant" if float(p) >= 1.0 else f"sd_{rule}_{float(p):g}"


def _grid_specs(make: Any, grid: Sequence[float], prefix: str = "") -> list[RunSpec]:
    runs = [RunSpec(prefix + "constant", make(None))]
    for p in grid:
        if p < 1.0:
            for rule in RULES:
                runs.append(RunSpec(prefix + run_name(rule, p), make(sd_kwargs(p, rule))))
    return runs


def _pct_or_none(v: float | None) -> float | None:
    return None if v is None else 100.0 * v


class Huang2016(Study):
    """Stochastic depth vs constant depth (Table 1, Table 2), gradient strength at the first block
    (Fig. 7) and the p_L sensitivity of the linear and uniform rules (Fig. 8)."""

    name = "huang2016"
    title = "Deep Networks with Stochastic Depth"
    paper = "Huang, Sun, Liu, Sedra, Weinberger 2016, arXiv 1603.09382"

    def plan(self, budget: str) -> Plan:
        check_budget(budget)
        common = ("Single seed per configuration (the paper's Table 1 numbers are single runs as well; no spread "
                  "is reported here).",
                  "Downsampling shortcut: He et al. option A (strided subsampling + zero padding); the official SD "
                  "code average-pools. The downsampling units are never dropped (official code can drop them).",
                  "PyTorch SGD skips dropped units' parameters (no weight decay / momentum step); Torch7 still "
                  "updated them (stochastic_depth.fill_missing_grads reproduces it; off here).")
        opts: dict[str, Any] = {"reference": "constant", "sd": "sd_linear_0.5", "rules": list(RULES)}
        if budget == "laptop":
            runs = (RunSpec("constant", laptop_config("cifar_resnet20")),
                    RunSpec("sd_linear_0.5", laptop_config("cifar_resnet20", sd_kwargs(0.5))),
                    RunSpec("sd_uniform_0.5", laptop_config("cifar_resnet20", sd_kwargs(0.5, "uniform"))),
                    RunSpec("sd_linear_0.2", laptop_config("cifar_resnet20", sd_kwargs(0.2))),
                    RunSpec("sd_uniform_0.2", laptop_config("cifar_resnet20", sd_kwargs(0.2, "uniform"))))
            dev = ("ResNet-20 (9 residual units) instead of ResNet-110 (54 units).",
                   f"{LAPTOP_EPOCHS} epochs instead of 500.",
                   "Recipe (reslab.studies.recipes.laptop_c10) instead of the paper's: one-cycle SGD (15% linear "
                   "warm-up from lr/25, linear decay), batch 64 at peak lr 0.2, Nesterov, weight decay 5e-4 with "
                   "none on BN and biases; paper: batch 128, lr 0.1 ÷10 at epochs 250 and 375, wd 1e-4. Kept: "
                   "45k/5k train/validation split, 4-px crops and flips.",
                   "p_L grid {0.2, 0.5, 1.0} for both rules instead of Fig. 8's 0.1..1.0.",
                   "Training time measured on a shared 2-core CPU (img/s logged by the engine), not GPU wall clock.",
                   *common)
            return Plan(self.name, budget, runs, {**opts, "pl_grid": list(LAPTOP_PL_GRID),
                                                  "note": f"ResNet-20, {LAPTOP_EPOCHS} epochs, laptop recipe"},
                        dev, data="cifar10")
        if budget == "smoke":
            runs = tuple(_grid_specs(_smoke_config, (0.2, 0.5, 1.0)))
            dev = ("Smoke budget: scikit-learn digits (8x8, offline) instead of CIFAR-10; depth-8 CIFAR ResNet "
                   "(3 units); 2 epochs; 237 validation images. Checks the machinery only.", *common)
            return Plan(self.name, budget, runs, {**opts, "pl_grid": [0.2, 0.5, 1.0],
                                                  "note": "smoke: digits, depth-8 ResNet, 2 epochs"}, dev, data="digits")
        runs_l = _grid_specs(lambda sd: paper_config("cifar_resnet110", sd), PAPER_PL_GRID)
        runs_r: list[RunSpec] = []
        for depth in PAPER_DEPTHS:
            if depth == 110:
                continue  # the Fig. 8 left runs
            runs_r.append(RunSpec(f"d{depth}_constant", paper_config(f"cifar_resnet{depth}")))
            runs_r += [RunSpec(f"d{depth}_{run_name('linear', p)}", paper_config(f"cifar_resnet{depth}",
                                                                               sd_kwargs(p)))
                       for p in PAPER_PL_GRID if p < 1.0]
        dev = ("Fig. 8 right (depth x p_L heat map): the paper's grid values are read from the figure only; this "
               f"plan uses depths {', '.join(map(str, PAPER_DEPTHS))} (registered CIFAR ResNets), linear rule, "
               "p_L 0.1..1.0.", *common)
        return Plan(self.name, budget, tuple(runs_l + runs_r),
                    {**opts, "pl_grid": list(PAPER_PL_GRID), "depths": list(PAPER_DEPTHS), "note": ""}, dev,
                    data="cifar10")

    def paper_values(self) -> Sequence[PaperValue]:
        t1 = "arXiv 1603.09382 Table 1"
        t2 = "arXiv 1603.09382 Table 2"
        return (
            PaperValue("constant.test_error_at_best_val", "test error at best-val epoch, 110-layer, constant depth, "
                       "C10+", 6.41, t1),
            PaperValue("sd_linear_0.5.test_error_at_best_val", "test error at best-val epoch, 110-layer, stochastic "
                       "depth (linear, p_L = 0.5), C10+", 5.25, t1),
            PaperValue("constant.test_error_final", "final-epoch test error, constant depth", None, t1),
            PaperValue("sd_linear_0.5.test_error_final", "final-epoch test error, stochastic depth", None, t1),
            PaperValue("train_time.constant", "training time, 110-layer, constant depth, C10+", "20h42m", t2, ""),
            PaperValue("train_time.sd", "training time, 110-layer, stochastic depth (p_L = 0.5), C10+", "15h7m", t2,
                       ""),
            PaperValue("train_time.ratio", "training time SD / constant (p_L = 0.5)", "≈0.75 (≈25% saving)",
                       "arXiv 1603.09382 §3 (training time savings) and Table 2", ""),
            PaperValue("expected_depth.fraction", "E[active units] / L, linear rule, p_L = 0.5", "≈3/4 (40 of 54)",
                       "arXiv 1603.09382 §3", ""),
            PaperValue("grad.first_block.sd_over_constant", "gradient magnitude at the first conv of the first "
                       "block, SD vs constant", None, "arXiv 1603.09382 §5, Fig. 7 (figure only)", ""),
            PaperValue("pl_table", "test error against p_L, linear and uniform rules", None,
                       "arXiv 1603.09382 Fig. 8 left (figure only)", ""),
        )

    # -- analysis ------------------------------------------------------------------------------
    def analyse(self, ctx: StudyContext) -> StudyResult:
        from reslab.report.markdown import markdown_table

        plan = ctx.plan
        ref, sdn = plan.options.get("reference", "constant"), plan.options.get("sd", "sd_linear_0.5")
        grid = [float(p) for p in plan.options.get("pl_grid", LAPTOP_PL_GRID)]
        out = Path(ctx.out)
        out.mkdir(parents=True, exist_ok=True)
        summaries: dict[str, dict[str, Any]] = {}
        for spec in plan.runs:
            if spec.name not in ctx.runs:
                continue
            if not spec.config.get("data", {}).get("val_split"):
                raise ValueError(f"run {spec.name!r} has no data.val_split; this study reports the test error at the "
                                 "best-validation epoch and never selects on the test set")
            ctx.progress(f"evaluating {spec.name}")
            summaries[spec.name] = run_summary(ctx.runs[spec.name], data_dir=ctx.data_dir, device=ctx.device)
        for need in (ref, sdn):
            if need not in summaries:
                raise ValueError(f"study {self.name}: run {need!r} is missing; train it first (reslab study --plan)")

        def pct(name: str, key: str) -> float | None:
            return _pct_or_none(summaries[name].get(key)) if name in summaries else None

        runs_res = {name: {"test_error_at_best_val_pct": pct(name, "test_error_at_best_val"),
                           "test_error_final_pct": pct(name, "test_error_final"),
                           "best_val_epoch": s["best_val_epoch"], "best_val_error_pct": pct(name, "best_val_error"),
                           "final_epoch": s["final_epoch"], "test_images": s["test_images"],
                           "train_seconds_per_epoch": s["train_seconds_per_epoch"], "train_img_s": s["train_img_s"],
                           "grad_curve": s.get("grad_curve"), "sd": s["sd"], "run_dir": s["run_dir"]}
                    for name, s in summaries.items()}
        # training time
        t_ref, t_sd = summaries[ref]["train_seconds_per_epoch"], summaries[sdn]["train_seconds_per_epoch"]
        time_ratio = t_sd / t_ref if t_ref and t_sd else None
        # expected depth of the SD run's model
        from reslab.train.config import config_from_dict

        e_depth = _expected_depth_of(config_from_dict(dict(plan.run(sdn).config)))
        n_units = _num_units(config_from_dict(dict(plan.run(sdn).config)))
        # gradient strength
        g = {name: [e for e in (summaries[name].get("grad_curve") or []) if e.get("grad_abs_mean")] for name in (ref, sdn)}
        common_epochs = sorted(set(e["epoch"] for e in g[ref]) & set(e["epoch"] for e in g[sdn]))
        gr = {n: {e["epoch"]: e["grad_abs_mean"] for e in g[n]} for n in g}
        ratios = [gr[sdn][e] / gr[ref][e] for e in common_epochs]
        mean_ratio = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else None
        # p_L table
        pl_table: dict[str, list[dict[str, Any]]] = {}
        for rule in RULES:
            rows = []
            for p in grid:
                name = run_name(rule, p)
                if name in summaries:
                    rows.append({"p_L": p, "run": name, "test_error_at_best_val_pct": pct(name, "test_error_at_best_val"),
                                 "test_error_final_pct": pct(name, "test_error_final"),
                                 "best_val_epoch": summaries[name]["best_val_epoch"]})
            pl_table[rule] = rows
        results: dict[str, Any] = {
            "protocol": "test error of the best-validation checkpoint (chosen on data.val_split) and of the last "
                        "checkpoint, both on the test split",
            "runs": runs_res,
            "sd_vs_constant": {"reference": ref, "sd": sdn,
                               "test_error_at_best_val_pct": {ref: pct(ref, "test_error_at_best_val"),
                                                              sdn: pct(sdn, "test_error_at_best_val")},
                               "test_error_final_pct": {ref: pct(ref, "test_error_final"),
                                                        sdn: pct(sdn, "test_error_final")}},
            "train_time": {"seconds_per_epoch": {ref: t_ref, sdn: t_sd}, "ratio_sd_over_constant": time_ratio,
                           "source": "metrics.jsonl img_s (training images/s, evaluation excluded)"},
            "expected_depth": {"units": n_units, "expected_active_units": e_depth,
                               "fraction": e_depth / n_units if n_units else None},
            "gradient_strength": {"probe": summaries[ref].get("grad_probe"), "epochs": common_epochs,
                                  ref: [gr[ref][e] for e in common_epochs], sdn: [gr[sdn][e] for e in common_epochs],
                                  "per_epoch_ratio_sd_over_constant": ratios, "geomean_ratio": mean_ratio},
            "pl_table": pl_table,
        }
        if plan.options.get("depths"):
            results["depth_pl_table"] = {
                str(d): {f"{p:g}": (pct(f"d{d}_{run_name('linear', p)}" if d != 110 else run_name("linear", p),
                                        "test_error_at_best_val")) for p in grid}
                for d in plan.options["depths"]}
        figures = []
        if any(gr[n] for n in gr):
            figures.append(plot_gradient_strength(
                {"probe": summaries[ref].get("grad_probe"), "model": summaries[ref]["model"],
                 "runs": {n: {"per_epoch": g[n]} for n in (ref, sdn)}}, out / "huang2016_gradient_strength.png"))
        sweep_rows = [{"rule": "constant" if r["run"] == ref else rule, "final_survival": r["p_L"],
                       "test_error_at_best_val": summaries[r["run"]]["test_error_at_best_val"],
                       "test_error_final": summaries[r["run"]]["test_error_final"]}
                      for rule, rows in pl_table.items() for r in rows]
        if sweep_rows:
            figures.append(plot_sweep(sweep_rows, out / "huang2016_pl_sweep.png",
                                      title=f"{summaries[ref]['model']} on {summaries[ref]['data']}"))
        comparisons = self._comparisons(plan, results, ref, sdn)
        trends = self._trends(results, ref, sdn, pl_table, grid, time_ratio, ratios)
        sections = self._sections(results, ref, sdn, pl_table, markdown_table)
        return StudyResult(results=results, comparisons=comparisons, sections=sections, figures=figures,
                           trends=trends)

    def _comparisons(self, plan: Plan, results: dict[str, Any], ref: str, sdn: str) -> list[Comparison]:
        pv = {v.key: v for v in self.paper_values()}
        note = str(plan.options.get("note", ""))
        rr = results["runs"]

        def m(name: str, key: str, what: str) -> str:
            v = rr[name][key]
            if v is None:
                return "—"
            ep = rr[name]["best_val_epoch"] if "best_val" in key else rr[name]["final_epoch"]
            return f"{v:.2f}% ({what}, epoch {ep})"

        def row(key: str, measured: str, n: str = note) -> Comparison:
            p = pv[key]
            return Comparison(p.what, measured, p.shown(), p.source, n)

        tr = results["train_time"]
        ed = results["expected_depth"]
        gs = results["gradient_strength"]
        return [
            row("constant.test_error_at_best_val", m(ref, "test_error_at_best_val_pct", "test, best-val checkpoint")),
            row("sd_linear_0.5.test_error_at_best_val", m(sdn, "test_error_at_best_val_pct",
                                                          "test, best-val checkpoint")),
            row("constant.test_error_final", m(ref, "test_error_final_pct", "test, last checkpoint")),
            row("sd_linear_0.5.test_error_final", m(sdn, "test_error_final_pct", "test, last checkpoint")),
            row("train_time.constant", _secs(tr["seconds_per_epoch"][ref])),
            row("train_time.sd", _secs(tr["seconds_per_epoch"][sdn])),
            row("train_time.ratio", "—" if tr["ratio_sd_over_constant"] is None
                else f"{tr['ratio_sd_over_constant']:.3f} (training img/s, evaluation excluded)"),
            row("expected_depth.fraction", f"{ed['fraction']:.3f} ({ed['expected_active_units']:.2f} of "
                                           f"{ed['units']} units)", "downsampling units never dropped"),
            row("grad.first_block.sd_over_constant", "—" if gs["geomean_ratio"] is None
                else f"{gs['geomean_ratio']:.3f} (geometric mean over epochs of the per-epoch ratio)"),
        ]

    @staticmethod
    def _trends(results: dict[str, Any], ref: str, sdn: str, pl_table: dict[str, list[dict[str, Any]]],
                grid: Sequence[float], time_ratio: float | None, ratios: Sequence[float]) -> list[tuple[str, bool | None, str]]:
        rr = results["runs"]
        e_ref, e_sd = rr[ref]["test_error_at_best_val_pct"], rr[sdn]["test_error_at_best_val_pct"]
        trends: list[tuple[str, bool | None, str]] = []
        trends.append(("Stochastic depth (linear, p_L = 0.5) lowers the test error of the 110-layer ResNet "
                       "(6.41 -> 5.25, Table 1)",
                       None if e_ref is None or e_sd is None else e_sd < e_ref,
                       f"test error at best-val epoch: constant {_f(e_ref)}%, SD {_f(e_sd)}%"))
        trends.append(("Stochastic depth trains faster (≈25% less time at p_L = 0.5, §3 and Table 2)",
                       None if time_ratio is None else time_ratio < 1.0,
                       f"training time per epoch SD / constant = {_f(time_ratio, 3)} (img/s from metrics.jsonl; "
                       "shared CPU, so noisy)"))
        pairs = []
        for p in grid:
            if p >= 1.0:
                continue
            a = next((r for r in pl_table.get("linear", []) if r["p_L"] == p), None)
            b = next((r for r in pl_table.get("uniform", []) if r["p_L"] == p), None)
            if a and b and a["test_error_at_best_val_pct"] is not None and b["test_error_at_best_val_pct"] is not None:
                pairs.append((p, a["test_error_at_best_val_pct"], b["test_error_at_best_val_pct"]))
        trends.append(("The linear decay rule beats the uniform rule consistently (§5, Fig. 8 left)",
                       None if not pairs else all(a < b for _, a, b in pairs),
                       "; ".join(f"p_L {p:g}: linear {a:.2f}% vs uniform {b:.2f}%" for p, a, b in pairs) or "no pairs"))
        low = next((r for r in pl_table.get("linear", []) if r["p_L"] == 0.2), None)
        e_low = low["test_error_at_best_val_pct"] if low else None
        trends.append(("p_L = 0.2 (linear) still performs well: about the constant-depth error with ~40% less "
                       "training time (§5, Fig. 8 left)",
                       None if e_low is None or e_ref is None else e_low <= e_ref,
                       f"test error at best-val epoch: linear p_L 0.2 {_f(e_low)}%, constant {_f(e_ref)}%"))
        trends.append(("The gradient at the first conv of the first block is larger with stochastic depth (§5, "
                       "Fig. 7)",
                       None if not ratios else sum(r > 1.0 for r in ratios) > len(ratios) / 2,
                       f"SD / constant mean |grad| per epoch: {', '.join(f'{r:.2f}' for r in ratios) or 'none'}"))
        return trends

    @staticmethod
    def _sections(results: dict[str, Any], ref: str, sdn: str, pl_table: dict[str, list[dict[str, Any]]],
                  markdown_table: Any) -> list[str]:
        rr = results["runs"]
        s1 = ["## Stochastic depth vs constant depth\n",
              markdown_table(["run", "test error at best-val epoch (%)", "best val epoch", "val error there (%)",
                              "final-epoch test error (%)", "train s/epoch"],
                             [[n, _f(rr[n]["test_error_at_best_val_pct"]), rr[n]["best_val_epoch"],
                               _f(rr[n]["best_val_error_pct"]), _f(rr[n]["test_error_final_pct"]),
                               _f(rr[n]["train_seconds_per_epoch"], 1)] for n in (ref, sdn)])]
        body = [[rule, f"{r['p_L']:g}", _f(r["test_error_at_best_val_pct"]), r["best_val_epoch"],
                 _f(r["test_error_final_pct"])] for rule, rows in pl_table.items() for r in rows]
        s2 = ["## Test error against p_L (Fig. 8 left)\n",
              markdown_table(["rule", "p_L", "test error at best-val epoch (%)", "best val epoch",
                              "final-epoch test error (%)"], body),
              "\np_L = 1 is the constant-depth run."]
        gs = results["gradient_strength"]
        s3 = [f"## Gradient strength ({gs['probe']}, Fig. 7)\n",
              markdown_table(["epoch", f"{ref} mean |grad|", f"{sdn} mean |grad|", "ratio"],
                             [[e, f"{a:.3e}", f"{b:.3e}", f"{r:.2f}"] for e, a, b, r in
                              zip(gs["epochs"], gs[ref], gs[sdn], gs["per_epoch_ratio_sd_over_constant"])])]
        return ["\n".join(s1), "\n".join(s2), "\n".join(s3)]


def _num_units(cfg: Any) -> int:
    from reslab.models.registry import create_model
    from reslab.regularize.stochastic_depth import residual_units

    kw = dict(cfg.model.kwargs)
    kw.pop("num_classes", None)
    with torch.device("meta"):
        return len(residual_units(create_model(cfg.model.name, **kw)))


def _f(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _secs(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f} s per epoch (training only)"


STUDY = Huang2016()

"""Stochastic depth in the training engine, and the paper's experiments.

* :class:`FillMissingGrads`: engine callback for optimiser fidelity with the Torch7 code
  (dropped units keep getting weight decay and momentum), enabled by
  ``stochastic_depth.fill_missing_grads: true``; :func:`sd_callbacks` builds the callbacks a
  config asks for.
* :class:`GradientStrengthProbe`: mean |gradient| of the first residual unit's conv weights
  at every step (Huang et al. 2016, §5 "Improved gradient strength").
* :func:`sweep`: test error for several final survival probabilities and survival rules
  (the paper's sensitivity figure); :func:`gradient_strength`: the probe with and without
  stochastic depth; :func:`run_test_error`: the test error of a run's best checkpoint (the
  paper selects the epoch on a validation split and reports the test error there), with
  optional BN recalibration (:func:`reslab.analysis.bn.recalibrate_bn`).

Every training run goes through :func:`reslab.train.train`; a variant whose run directory
already holds ``sd_result.json`` is read back instead of retrained, so an interrupted sweep
continues where it stopped.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from reslab.regularize.stochastic_depth import StochasticDepth, fill_missing_grads, residual_units
from reslab.train.engine import Callback

RESULT_FILE = "sd_result.json"


# ---- callbacks ----------------------------------------------------------------------------
class FillMissingGrads(Callback):
    """After backward (and the DDP reduction), give parameters without a gradient a zero one,
    so SGD applies weight decay and momentum to dropped units as Torch7 ``optim.sgd`` does."""

    def __init__(self) -> None:
        self.filled = 0  # parameters filled at the last step

    def after_backward(self, model: nn.Module, step: int) -> None:
        self.filled = fill_missing_grads(model)


class GradientStrengthProbe(Callback):
    """Mean |grad| of the conv weights of residual unit ``unit_index`` (default the first).

    Records ``(step, value)`` per optimiser step, ``value`` None when the unit was dropped
    (its gradient is None), and the per-epoch mean of the recorded values. Put it before
    :class:`FillMissingGrads` in the callback list.
    """

    def __init__(self, unit_index: int = 0) -> None:
        self.unit_index = unit_index
        self.steps: list[tuple[int, float | None]] = []
        self.epochs: list[dict[str, Any]] = []
        self._since = 0

    def after_backward(self, model: nn.Module, step: int) -> None:
        units = residual_units(model)
        if not -len(units) <= self.unit_index < len(units):
            raise ValueError(f"gradient probe unit {self.unit_index} out of range: the model has {len(units)} units")
        unit = units[self.unit_index]
        weights = [p for p in unit.branch.parameters() if p.ndim > 1]
        if not weights:
            raise ValueError(f"unit {self.unit_index} has no conv/linear weights to probe")
        if any(p.grad is None for p in weights) or unit.last_gate_open is False:
            self.steps.append((step, None))
            return
        with torch.no_grad():
            total = sum(p.grad.abs().sum() for p in weights)
            n = sum(p.numel() for p in weights)
            self.steps.append((step, float(total) / n))

    def epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        vals = [v for _, v in self.steps[self._since:] if v is not None]
        n_all = len(self.steps) - self._since
        self.epochs.append({"epoch": epoch, "mean_abs_grad": sum(vals) / len(vals) if vals else None,
                            "steps": n_all, "steps_unit_ran": len(vals)})
        self._since = len(self.steps)


def sd_spec_of(obj: Any) -> StochasticDepth | None:
    """The stochastic-depth spec of a model (``model.sd_config``) or a TrainConfig
    (``model.kwargs.stochastic_depth``); None when there is none."""
    if isinstance(obj, nn.Module):
        spec = getattr(obj, "sd_config", None)
        return spec if isinstance(spec, StochasticDepth) else None
    kwargs = getattr(getattr(obj, "model", None), "kwargs", None)
    if kwargs is None:
        raise ValueError(f"expected a model or a TrainConfig, got {type(obj).__name__}")
    raw = kwargs.get("stochastic_depth")
    return None if raw is None else StochasticDepth.coerce(raw)


def sd_callbacks(cfg: Any) -> list[Callback]:
    """The engine callbacks a config's stochastic-depth options ask for (``[]`` if none).
    Use as ``train(cfg, out, callbacks=sd_callbacks(cfg))``."""
    spec = sd_spec_of(cfg)
    return [FillMissingGrads()] if spec is not None and spec.fill_missing_grads else []


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


# ---- runs -------------------------------------------------------------------------------------
def _read_result(run_dir: Path) -> dict[str, Any] | None:
    f = run_dir / RESULT_FILE
    if f.is_file():
        return json.loads(f.read_text())
    return None


def _write_result(run_dir: Path, result: dict[str, Any]) -> None:
    tmp = run_dir / f".{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
    os.replace(tmp, run_dir / RESULT_FILE)


def train_variant(cfg: Any, run_dir: str | os.PathLike, callbacks: Sequence[Callback] = (),
                  progress: bool = False, recalibrate_bn: int = 0) -> dict[str, Any]:
    """Train one config into ``run_dir`` (or read its ``sd_result.json``); returns
    ``{final_error, best_error, best_epoch, epochs, sd, ...}`` (errors on the run's
    evaluation set, in [0, 1]). ``recalibrate_bn`` > 0 adds ``*_recal`` errors measured after
    re-estimating BN statistics of the final model on that many training batches."""
    from reslab.train import resume_config, train

    run_dir = Path(run_dir)
    cached = _read_result(run_dir)
    if cached is not None:
        return cached
    cbs = list(callbacks) + sd_callbacks(cfg)
    if (run_dir / "config.yaml").is_file():  # interrupted earlier: continue from its last checkpoint
        res = train(resume_config(run_dir, cfg), run_dir, resume=True, callbacks=cbs, progress=progress)
    else:
        res = train(cfg, run_dir, callbacks=cbs, progress=progress)
    spec = sd_spec_of(cfg)
    out: dict[str, Any] = {
        "run_dir": str(run_dir), "model": cfg.model.name, "data": cfg.data.name, "epochs": res.epochs,
        "steps": res.steps, "sd": spec.to_dict() if spec else None,
        "final_error": 1.0 - res.final["top1"], "best_error": 1.0 - res.best["top1"],
        "best_epoch": res.best.get("epoch"), "eval_images": res.final.get("n"),
        "eval_split": "validation" if cfg.data.val_split else "test",
    }
    if recalibrate_bn:
        rec = run_test_error(run_dir, which="last", recalibrate_bn=recalibrate_bn, split="eval")
        out["final_error_recal"] = rec["error_recal"]
    if _is_main():
        _write_result(run_dir, out)
    return out


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _fmt_p(p: float) -> str:
    return f"{p:.3f}".rstrip("0").rstrip(".")


def variant_name(spec: StochasticDepth | None) -> str:
    """Run-directory name of a sweep variant: ``constant`` or ``<rule>-pL<p>[-<mode>]``."""
    if spec is None or spec.final_survival >= 1.0:
        return "constant"
    name = f"{spec.rule}-pL{_fmt_p(spec.final_survival)}"
    return name if spec.mode == "batch" else f"{name}-{spec.mode}"


def sweep(base_cfg: Any, out_dir: str | os.PathLike, survivals: Sequence[float] = (0.2, 0.5, 0.8),
          rules: Sequence[str] = ("linear", "uniform"), mode: str = "batch", recalibrate_bn: int = 0,
          progress: bool = False, constant: bool = True) -> list[dict[str, Any]]:
    """Train ``base_cfg`` once per (rule, p_L) plus once with constant depth (p_L = 1);
    write ``sweep.csv``, ``sweep.md`` and ``sweep.png`` into ``out_dir``; return the rows.

    Huang et al. 2016 (Fig. 8, left) plot test error against p_L for the linear and the
    uniform rule on CIFAR-10 with ResNet-110. Each row has ``rule``, ``final_survival``,
    ``expected_depth`` (sum of p_l over the model's units as configured), ``final_error``,
    ``best_error``.
    """
    if not survivals:
        raise ValueError("give at least one final survival probability (e.g. --survival 0.5)")
    specs: list[StochasticDepth | None] = []
    for r in rules:
        for p in survivals:
            s = StochasticDepth(final_survival=p, rule=r, mode=mode)
            if s.final_survival < 1.0:
                specs.append(s)
    if constant or any(float(p) >= 1.0 for p in survivals):
        specs.insert(0, None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in specs:
        name = variant_name(spec)
        cfg = with_stochastic_depth(base_cfg, spec)
        res = train_variant(cfg, out / name, progress=progress, recalibrate_bn=recalibrate_bn)
        rows.append({"variant": name, "rule": spec.rule if spec else "constant",
                     "final_survival": spec.final_survival if spec else 1.0,
                     "expected_depth": _expected_depth_of(cfg), **{k: res[k] for k in res
                                                                   if k.endswith("error") or k.endswith("recal")},
                     "best_epoch": res.get("best_epoch"), "eval_split": res.get("eval_split")})
    if _is_main():
        write_rows_csv(rows, out / "sweep.csv")
        (out / "sweep.md").write_text(sweep_markdown(rows, base_cfg) + "\n")
        plot_sweep(rows, out / "sweep.png", title=f"{base_cfg.model.name} on {base_cfg.data.name}")
    return rows


def _expected_depth_of(cfg: Any) -> float:
    from reslab.models.registry import create_model
    from reslab.regularize.stochastic_depth import model_expected_depth

    kw = dict(cfg.model.kwargs)
    kw.pop("num_classes", None)
    with torch.device("meta"):
        model = create_model(cfg.model.name, **kw)
    return model_expected_depth(model)


def write_rows_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    import csv

    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def sweep_markdown(rows: Sequence[dict[str, Any]], cfg: Any) -> str:
    from reslab.report.markdown import markdown_table

    recal = any("final_error_recal" in r for r in rows)
    header = ["rule", "p_L", "E[active units]", "final error (%)", "best error (%)", "best epoch"]
    if recal:
        header.append("final error, BN recalibrated (%)")
    body = []
    for r in rows:
        line = [r["rule"], f"{r['final_survival']:.2f}", f"{r['expected_depth']:.2f}",
                f"{100 * r['final_error']:.2f}", f"{100 * r['best_error']:.2f}", r.get("best_epoch")]
        if recal:
            v = r.get("final_error_recal")
            line.append("" if v is None else f"{100 * v:.2f}")
        body.append(line)
    split = rows[0].get("eval_split", "test") if rows else "test"
    intro = (f"Stochastic-depth sweep: {cfg.model.name} on {cfg.data.name}, {cfg.train.epochs} epochs"
             f" (errors on the {split} set; Huang et al. 2016 Fig. 8 uses ResNet-110, CIFAR-10, 500 epochs).\n\n")
    return intro + markdown_table(header, body)


def _figure(size: tuple[float, float] = (6, 4)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """Test error (%) against p_L, one line per rule, constant depth as a dashed line."""
    fig = _figure()
    ax = fig.subplots()
    rules = [r for r in dict.fromkeys(row["rule"] for row in rows) if r != "constant"]
    for i, rule in enumerate(rules):
        pts = sorted((r["final_survival"], 100 * r["final_error"]) for r in rows if r["rule"] == rule)
        ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=f"{rule} rule")
    const = [r for r in rows if r["rule"] == "constant"]
    if const:
        ax.axhline(100 * const[0]["final_error"], color="k", ls="--", lw=1, label="constant depth")
    ax.set(xlabel="final survival probability $p_L$", ylabel="test error (%)", title=title or "stochastic depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def gradient_strength(base_cfg: Any, out_dir: str | os.PathLike, final_survival: float = 0.5,
                      rule: str = "linear", mode: str = "batch", unit_index: int = 0,
                      progress: bool = False) -> dict[str, Any]:
    """Train with and without stochastic depth, probing the mean |gradient| of residual unit
    ``unit_index``'s conv weights at every step (Huang et al. 2016, Fig. 7); writes
    ``gradient_strength.json``, ``gradient_strength.csv`` (per step) and ``gradient_strength.png``
    (per-epoch means) into ``out_dir``. Steps where the probed unit was dropped are skipped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = StochasticDepth(final_survival=final_survival, rule=rule, mode=mode)
    result: dict[str, Any] = {"unit_index": unit_index, "model": base_cfg.model.name, "data": base_cfg.data.name,
                              "runs": {}}
    for label, s in (("constant", None), (variant_name(spec), spec)):
        run_dir = out / label
        done = run_dir / "gradient_probe.json"
        if done.is_file():
            result["runs"][label] = json.loads(done.read_text())
            continue
        probe = GradientStrengthProbe(unit_index)
        res = train_variant(with_stochastic_depth(base_cfg, s), run_dir, callbacks=[probe], progress=progress)
        rec = {"sd": s.to_dict() if s else None, "per_epoch": probe.epochs, "per_step": probe.steps,
               "final_error": res["final_error"]}
        if _is_main():
            done.write_text(json.dumps(rec) + "\n")
        result["runs"][label] = rec
    if _is_main():
        (out / "gradient_strength.json").write_text(json.dumps(result, indent=1) + "\n")
        rows = [{"run": k, "step": st, "mean_abs_grad": v} for k, r in result["runs"].items()
                for st, v in r["per_step"]]
        write_rows_csv(rows, out / "gradient_strength.csv")
        plot_gradient_strength(result, out / "gradient_strength.png")
    return result


def plot_gradient_strength(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Per-epoch mean |gradient| at the probed unit, one line per run (log scale)."""
    fig = _figure()
    ax = fig.subplots()
    for i, (label, r) in enumerate(result["runs"].items()):
        pts = [(e["epoch"], e["mean_abs_grad"]) for e in r["per_epoch"] if e["mean_abs_grad"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{i}", label=label)
    ax.set(xlabel="epoch", ylabel="mean |gradient|", yscale="log",
           title=f"gradient strength at residual unit {result['unit_index'] + 1} ({result['model']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ---- evaluation of a finished run -------------------------------------------------------------
def train_batches(data: Any, batch_size: int, n_batches: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """``n_batches`` normalised, un-augmented training batches in a seeded random order
    (inputs for :func:`reslab.analysis.bn.recalibrate_bn`)."""
    from reslab.data import EvalTransform

    transform = EvalTransform(data.mean, data.std, data.eval_crop)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    for i in range(min(n_batches, math.ceil(len(data) / batch_size))):
        idx = perm[i * batch_size:(i + 1) * batch_size]
        yield transform(data.images[idx])


def run_test_error(run_dir: str | os.PathLike, which: str = "best", recalibrate_bn: int = 0,
                   split: str = "test", batch_size: int = 128, device: str = "cpu",
                   data_dir: str | None = None) -> dict[str, Any]:
    """Error of a run's ``best`` (selected on the run's evaluation set) or ``last`` checkpoint
    on the ``test`` split, or on the run's own evaluation set (``split="eval"``).

    With ``data.val_split`` the run selected its best epoch on held-out training images, so
    this gives the paper's protocol (test error at the best validation epoch). With
    ``recalibrate_bn`` = n > 0, ``error_recal`` is measured again after re-estimating every
    BN's statistics with all units active (n batches of un-augmented training images;
    :func:`reslab.analysis.bn.recalibrate_bn`).
    """
    from reslab.analysis.bn import recalibrate_bn as _recal
    from reslab.train.config import config_from_dict
    from reslab.train.engine import evaluate, prepare_data
    from reslab.train.evaluate import eval_dataset, load_model_from_checkpoint

    if split not in ("test", "eval"):
        raise ValueError(f"split must be 'test' or 'eval', got {split!r}")
    model, info, wpath = load_model_from_checkpoint(run_dir, which, device)
    if not info.config:
        raise ValueError(f"{wpath} carries no run config; cannot tell which data to evaluate on")
    cfg = config_from_dict(info.config)
    if data_dir is not None:
        cfg = replace(cfg, data=replace(cfg.data, data_dir=data_dir))
    eval_cfg = replace(cfg, data=replace(cfg.data, val_split=0)) if split == "test" else cfg
    data = eval_dataset(eval_cfg)
    res = evaluate(model, data, batch_size, "none", device)
    out: dict[str, Any] = {"checkpoint": str(wpath), "epoch": info.epoch, "split": split, "n": res["n"],
                           "error": 1.0 - res["top1"]}
    if recalibrate_bn:
        _, train_set, _ = prepare_data(cfg)
        _recal(model, train_batches(train_set, batch_size, recalibrate_bn), recalibrate_bn)
        out["error_recal"] = 1.0 - evaluate(model, data, batch_size, "none", device)["top1"]
        out["recalibrate_batches"] = recalibrate_bn
    return out

"""Engine callbacks for stochastic depth (Huang et al. 2016, arXiv 1603.09382).

* :class:`FillMissingGrads`: optimiser fidelity with the official Torch7 code (dropped units
  keep getting weight decay and momentum, experiments.md §2.3 pitfall 1), enabled by
  ``stochastic_depth.fill_missing_grads: true``; :func:`sd_callbacks` builds the callbacks a
  config asks for (the engine installs them itself).
* :class:`GradientStrengthProbe`: per-step mean |gradient| of the conv/linear weights of any
  residual unit. The paper's measure (§5, Fig. 7: the first conv of the first block, per epoch)
  is built into the engine as ``train.grad_probe: first_conv`` (:mod:`reslab.train.probes`);
  this callback is for other units and per-step curves.

These live in the ``train`` layer (``regularize`` does not import ``train``, design.md "Layers");
they were ``reslab.regularize.sd_train`` before.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from reslab.regularize.stochastic_depth import StochasticDepth, fill_missing_grads, residual_units
from reslab.train.engine import Callback

__all__ = ["FillMissingGrads", "GradientStrengthProbe", "sd_callbacks", "sd_spec_of"]


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
    :func:`reslab.train.train` adds them itself unless a :class:`FillMissingGrads` is given."""
    spec = sd_spec_of(cfg)
    return [FillMissingGrads()] if spec is not None and spec.fill_missing_grads else []

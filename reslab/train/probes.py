"""Measurements taken inside the training loop and written to each epoch record.

:class:`GradientProbe` is Huang et al. 2016's "gradient strength" (arXiv 1603.09382 §5,
Fig. 7): the mean absolute value of the gradient of the **first convolutional layer of the
first residual block**, per epoch (``target="first_conv"``, the paper's layer). The earlier
reslab measure, the mean over every conv/linear weight of unit 0's branch, stays available as
``target="unit0_convs"``. Steps on which stochastic depth dropped the unit (its gradient is
None) are not averaged in; the record says on how many steps the unit ran.

Enable it from a config with ``train.grad_probe: first_conv`` (or ``unit0_convs``): the epoch
records in ``metrics.jsonl`` then carry ``grad_abs_mean``, ``grad_probe_steps`` and
``grad_probe_steps_ran``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

PROBE_TARGETS = ("first_conv", "unit0_convs")


def probe_parameters(model: nn.Module, target: str) -> list[torch.nn.Parameter]:
    """The weights a probe reads: the first conv of the first residual unit's branch
    (``first_conv``) or every conv/linear weight of that branch (``unit0_convs``)."""
    if target not in PROBE_TARGETS:
        raise ValueError(f"grad_probe must be one of {', '.join(PROBE_TARGETS)}; got {target!r}")
    units = model.residual_units() if hasattr(model, "residual_units") else []
    if not units:
        raise ValueError(f"grad_probe needs a model with residual units; {type(model).__name__} has none")
    branch = units[0].branch
    if target == "first_conv":
        convs = [m for m in branch.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ValueError("grad_probe=first_conv: the first residual unit's branch has no convolution")
        return [convs[0].weight]
    weights = [p for p in branch.parameters() if p.ndim > 1]
    if not weights:
        raise ValueError("grad_probe=unit0_convs: the first residual unit has no conv/linear weights")
    return weights


class GradientProbe:
    """Accumulates mean |grad| of :func:`probe_parameters` over the optimiser steps of an epoch."""

    def __init__(self, model: nn.Module, target: str = "first_conv") -> None:
        self.target = target
        self.params = probe_parameters(model, target)
        self.unit = model.residual_units()[0]
        self.reset()

    def reset(self) -> None:
        self.total, self.ran, self.steps = 0.0, 0, 0

    def after_backward(self) -> None:
        self.steps += 1
        if any(p.grad is None for p in self.params) or getattr(self.unit, "last_gate_open", None) is False:
            return
        with torch.no_grad():
            s = sum(float(p.grad.abs().sum()) for p in self.params)
        self.total += s / sum(p.numel() for p in self.params)
        self.ran += 1

    def record(self) -> dict[str, Any]:
        """The epoch's values (then :meth:`reset`)."""
        out = {"grad_probe": self.target, "grad_abs_mean": self.total / self.ran if self.ran else None,
               "grad_probe_steps": self.steps, "grad_probe_steps_ran": self.ran}
        self.reset()
        return out

"""Stochastic depth on a model: survival schedules, the spec, applying it (Huang, Sun, Liu, Sedra,
Weinberger 2016, arXiv 1603.09382, §3 eq. 4).

The part of stochastic depth that :func:`reslab.models.create_model` (``stochastic_depth=...``)
needs lives here, in the ``models`` layer, so that ``models`` imports nothing above it
(design.md "Layers"). :mod:`reslab.regularize.stochastic_depth` re-exports every name and adds
the rest (gate seeding, scale folding, gate statistics, optimiser fidelity); the full
description of rules, modes and scaling is its docstring.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn

from reslab.models.units import ResidualUnit

RULES = ("linear", "uniform", "timm")
MODES = ("batch", "batch-mask", "row")
SCALES = ("test", "train")

__all__ = ["MODES", "RULES", "SCALES", "StochasticDepth", "apply_stochastic_depth", "expected_depth",
           "model_expected_depth", "remove_stochastic_depth", "residual_units", "survival_probs"]


# ---- schedules -------------------------------------------------------------------------
def _check_p(final_survival: float) -> float:
    try:
        p = float(final_survival)
    except (TypeError, ValueError):
        raise ValueError(f"final_survival must be a number in (0, 1], got {final_survival!r}") from None
    if not 0.0 < p <= 1.0 or math.isnan(p):
        raise ValueError(f"final_survival must be in (0, 1] (the survival probability of the last unit), got {p}; "
                         "for a drop rate r use 1 - r")
    return p


def survival_probs(num_units: int, final_survival: float, rule: str = "linear") -> list[float]:
    """Survival probability of each of ``num_units`` units, in forward order.

    ``rule``: ``linear`` (Huang et al. 2016: ``p_l = 1 - l/L (1 - p_L)``, l = 1..L),
    ``uniform`` (``p_l = p_L``) or ``timm`` (drop rate ``(1 - p_L) i/(L - 1)``, i = 0..L-1).
    """
    if not isinstance(num_units, int) or isinstance(num_units, bool) or num_units < 0:
        raise ValueError(f"num_units must be an integer >= 0, got {num_units!r}")
    p_last = _check_p(final_survival)
    death = 1.0 - p_last
    L = num_units
    if rule == "linear":
        return [1.0 - (l / L) * death for l in range(1, L + 1)]
    if rule == "uniform":
        return [p_last] * L
    if rule == "timm":
        if L == 1:
            return [1.0]  # torch.linspace(0, rate, 1) == [0]: a single block is never dropped
        return [1.0 - death * i / (L - 1) for i in range(L)]
    raise ValueError(f"unknown survival rule {rule!r}; use one of {', '.join(RULES)}")


def expected_depth(num_units: int, final_survival: float, rule: str = "linear") -> float:
    """Expected number of active units during training, ``sum_l p_l`` (the paper's E[L~]).

    For ``linear`` this is ``L - (1 - p_L)(L + 1)/2``: 40.25 for L = 54 and p_L = 0.5.
    Counts every unit; for a model whose downsampling units are kept use
    :func:`model_expected_depth`.
    """
    return math.fsum(survival_probs(num_units, final_survival, rule))


# ---- the configuration ----------------------------------------------------------------
@dataclass(frozen=True)
class StochasticDepth:
    """How stochastic depth is applied to a model (see the module docstring).

    Args:
        final_survival: p_L, the survival probability of the last unit (paper: 0.5).
        rule: ``linear`` (paper), ``uniform`` or ``timm``.
        mode: ``batch`` (paper, skips compute), ``batch-mask`` or ``row`` (per sample).
        scale: ``test`` (paper: branch x p_l at evaluation) or ``train`` (branch / p_l in training).
        drop_downsample: also drop the downsampling units (default: they always survive).
        seed: seed of the model's shared gate generator; ``None`` derives one from
            ``torch.initial_seed()`` at application time. Under DDP every rank must use
            the same seed (:func:`reslab.regularize.stochastic_depth.set_gate_seed` / ``sync_gate_seed``).
        fill_missing_grads: optimiser fidelity with the official Torch7 code: dropped units
            get a zero gradient, so SGD still applies weight decay and momentum to them.
            Default ``False`` = PyTorch semantics (``grad`` stays None, SGD skips the
            parameter). Read by the training callbacks, see :mod:`reslab.train.callbacks`.
    """

    final_survival: float = 0.5
    rule: str = "linear"
    mode: str = "batch"
    scale: str = "test"
    drop_downsample: bool = False
    seed: int | None = None
    fill_missing_grads: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "final_survival", _check_p(self.final_survival))
        if self.rule not in RULES:
            raise ValueError(f"unknown stochastic_depth rule {self.rule!r}; use one of {', '.join(RULES)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown stochastic_depth mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.scale not in SCALES:
            raise ValueError(f"unknown stochastic_depth scale {self.scale!r}; use one of {', '.join(SCALES)}")
        if not isinstance(self.drop_downsample, bool):
            raise ValueError(f"stochastic_depth drop_downsample must be true or false, got {self.drop_downsample!r}")
        if not isinstance(self.fill_missing_grads, bool):
            raise ValueError("stochastic_depth fill_missing_grads must be true or false, "
                             f"got {self.fill_missing_grads!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise ValueError(f"stochastic_depth seed must be an integer >= 0 or null, got {self.seed!r}")

    @classmethod
    def from_drop_rate(cls, drop_rate: float, **kw: Any) -> "StochasticDepth":
        """timm's vocabulary: ``drop_path_rate`` r is the final *drop* rate; rule defaults to ``timm``."""
        kw.setdefault("rule", "timm")
        try:
            rate = float(drop_rate)
        except (TypeError, ValueError):
            raise ValueError(f"stochastic_depth drop_rate must be a number in [0, 1), got {drop_rate!r}") from None
        return cls(final_survival=1.0 - rate, **kw)

    @classmethod
    def coerce(cls, spec: "StochasticDepth | Mapping[str, Any] | float") -> "StochasticDepth":
        """Accept the dataclass, a float (p_L, other fields default) or a dict of fields
        (``drop_rate`` is accepted instead of ``final_survival``)."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, bool):
            raise ValueError("stochastic_depth must be a final survival probability, a dict or a StochasticDepth, "
                             f"got {spec!r}")
        if isinstance(spec, (int, float)):
            return cls(final_survival=float(spec))
        if isinstance(spec, Mapping):
            d = dict(spec)
            names = {f.name for f in dataclasses.fields(cls)}
            if "drop_rate" in d:
                if "final_survival" in d:
                    raise ValueError("give stochastic_depth either final_survival or drop_rate, not both")
                return cls.from_drop_rate(d.pop("drop_rate"), **_known(d, names | {"drop_rate"}))
            return cls(**_known(d, names))
        raise ValueError("stochastic_depth must be a final survival probability, a dict or a StochasticDepth, "
                         f"got {type(spec).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _known(d: dict[str, Any], names: set[str]) -> dict[str, Any]:
    unknown = sorted(k for k in d if k not in names)
    if unknown:
        raise ValueError(f"unknown stochastic_depth option {unknown[0]!r} (known: {', '.join(sorted(names))})")
    return d


# ---- applying it to a model ------------------------------------------------------------
def residual_units(model: nn.Module) -> list[ResidualUnit]:
    """The model's residual units in forward order (``model.residual_units()`` when present)."""
    if hasattr(model, "residual_units"):
        units = list(model.residual_units())
    else:
        units = [m for m in model.modules() if isinstance(m, ResidualUnit)]
    return units


def _default_seed() -> int:
    # Derived from the global seed so `torch.manual_seed(s)` before building gives reproducible gates,
    # while the gates keep their own stream (drawing them does not shift the global RNG).
    return (torch.initial_seed() * 0x9E3779B1 + 0x5D) % (2**63)


def apply_stochastic_depth(model: nn.Module, spec: "StochasticDepth | Mapping[str, Any] | float") -> nn.Module:
    """Set every residual unit's gate from ``spec`` (a float p_L, a dict of
    :class:`StochasticDepth` fields, or the dataclass) and attach one shared gate
    generator. Returns ``model``; the resolved spec is stored as ``model.sd_config``.

    Unit l (1-based over *all* units of the model, paper indexing) gets ``p_l`` of the rule;
    downsampling units get 1 unless ``drop_downsample``. Units without a shortcut (plain
    twins) cannot be dropped: ``ValueError``.
    """
    sd = StochasticDepth.coerce(spec)
    units = residual_units(model)
    if not units:
        raise ValueError(f"{type(model).__name__} has no residual units; stochastic depth needs a residual network")
    probs = survival_probs(len(units), sd.final_survival, sd.rule)
    gen = torch.Generator()
    gen.manual_seed(sd.seed if sd.seed is not None else _default_seed())
    for unit, p in zip(units, probs):
        if unit.downsample and not sd.drop_downsample:
            p = 1.0
        if p < 1.0 and unit.shortcut is None:
            raise ValueError(f"unit {unit.global_index} has no shortcut (a plain network), so it cannot be dropped; "
                             "use stochastic depth on residual networks only")
        unit.survival_prob = float(p)
        unit.sd_mode = sd.mode
        unit.sd_scale = sd.scale
        unit.gate_generator = gen
    model.sd_config = sd
    return model


def remove_stochastic_depth(model: nn.Module) -> nn.Module:
    """Turn stochastic depth off (all p = 1, mode ``off``). A ``train``-scaled model is
    unchanged at evaluation; a ``test``-scaled one loses its p_l factors, so call
    :func:`fold_survival_into_branch` first to keep its function."""
    for unit in residual_units(model):
        unit.survival_prob, unit.sd_mode, unit.sd_scale, unit.gate_generator = 1.0, "off", "test", None
    if hasattr(model, "sd_config"):
        del model.sd_config
    return model


def model_expected_depth(model: nn.Module) -> float:
    """``sum_l p_l`` over the model's units as configured (downsampling units count 1 if kept)."""
    return math.fsum(u.survival_prob if u.sd_mode != "off" else 1.0 for u in residual_units(model))

"""Stochastic depth (Huang, Sun, Liu, Sedra, Weinberger 2016, arXiv 1603.09382).

During training each residual unit ``l`` keeps its branch with *survival probability* ``p_l``
and is otherwise reduced to its shortcut; at test time every branch is active. This module
sets the gate attributes that :class:`reslab.models.units.ResidualUnit` already has
(``survival_prob``, ``sd_mode``, ``sd_scale``, ``gate_generator``), so it works on every
family built from residual units (ResNet, pre-activation, Wide ResNet, ResNeXt, DPN,
merge-and-run) without touching ``forward``.

Vocabulary: the API speaks of **survival** probabilities (the paper's p_l, final p_L);
timm's drop-path *rate* (1 - p) is converted at the edge (:meth:`StochasticDepth.from_drop_rate`).

Survival rules (``rule``), for L units indexed over the whole network:

* ``linear`` (the paper, eq. 4 and the official Torch7 ``main.lua``):
  ``p_l = 1 - (l / L) (1 - p_L)`` for ``l = 1..L``; the first unit already has ``p < 1``;
  ``sum p_l = L - (1 - p_L)(L + 1) / 2`` (40.25 for L = 54, p_L = 0.5, i.e. (3L - 1)/4).
* ``uniform``: ``p_l = p_L`` for every unit (the paper's comparison rule).
* ``timm``: drop rate ``(1 - p_L) * i / (L - 1)`` for ``i = 0..L-1`` (timm's ResNet ramp): the
  first unit is never dropped, the last has exactly ``p_L``; one unit gives ``p = 1``.

Downsampling units are indexed like every other unit (l counts *all* units, as in the
paper), but they keep ``p = 1`` unless ``drop_downsample=True``. Deviation from the
official code, which can drop them too (its downsampling shortcut is parameter free).

Modes (``mode``): ``batch`` (the paper: one draw per unit per mini-batch; a dropped branch
is **not computed**, so it saves time and its BN statistics are untouched), ``batch-mask``
(one draw, the branch is computed and multiplied by 0 or 1: no savings, graph always
connected), ``row`` (per-sample drop path as in timm / torchvision ``mode="row"``).
Scaling (``scale``): ``test`` multiplies the branch by ``p_l`` at evaluation (the paper);
``train`` divides kept branches by ``p_l`` during training and leaves evaluation alone.
:func:`fold_survival_into_branch` converts a ``test`` model into an equivalent ``train``
one (and :func:`unfold_survival_from_branch` back) by scaling the branch's last layer.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from reslab.models.units import ResidualUnit

RULES = ("linear", "uniform", "timm")
MODES = ("batch", "batch-mask", "row")
SCALES = ("test", "train")

__all__ = [
    "GateCounter", "MODES", "RULES", "SCALES", "StochasticDepth", "apply_stochastic_depth", "expected_depth",
    "fill_missing_grads", "fold_survival_into_branch", "gate_state", "gate_stats", "model_expected_depth",
    "needs_find_unused_parameters", "remove_stochastic_depth", "residual_units", "set_gate_seed",
    "set_gate_state", "survival_probs", "sync_gate_seed", "unfold_survival_from_branch",
]


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
            the same seed (:func:`set_gate_seed` / :func:`sync_gate_seed`).
        fill_missing_grads: optimiser fidelity with the official Torch7 code: dropped units
            get a zero gradient, so SGD still applies weight decay and momentum to them.
            Default ``False`` = PyTorch semantics (``grad`` stays None, SGD skips the
            parameter). Read by the training callbacks, see :mod:`reslab.regularize.sd_train`.
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


# ---- the gate generator (rank synchronisation, resume) --------------------------------
def _generators(model: nn.Module) -> list[torch.Generator]:
    gens: list[torch.Generator] = []
    for u in residual_units(model):
        g = u.gate_generator
        if g is not None and all(g is not h for h in gens):
            gens.append(g)
    return gens


def set_gate_seed(model: nn.Module, seed: int) -> torch.Generator:
    """Give every unit one shared CPU generator seeded with ``seed``.

    Under DDP call it with the same seed on every rank (e.g. derived from the run seed):
    all ranks then draw the same gate sequence, so a dropped unit is dropped everywhere.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"gate seed must be an integer >= 0, got {seed!r}")
    gen = torch.Generator()
    gen.manual_seed(seed)
    for u in residual_units(model):
        u.gate_generator = gen
    return gen


def sync_gate_seed(model: nn.Module, seed: int | None = None) -> int:
    """Seed the gates identically on every rank of the default process group: rank 0's
    ``seed`` (or a fresh one) is broadcast. Without an initialised group it just seeds."""
    import torch.distributed as dist

    if seed is None:
        seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(_default_seed())))
    if dist.is_available() and dist.is_initialized():
        obj = [seed]
        dist.broadcast_object_list(obj, src=0)
        seed = int(obj[0])
    set_gate_seed(model, seed)
    return seed


def gate_state(model: nn.Module) -> torch.Tensor | None:
    """The shared gate generator's state (save it in checkpoints for an exact resume)."""
    gens = _generators(model)
    if len(gens) > 1:
        raise ValueError("the model's units use several gate generators; call set_gate_seed(model, seed) first")
    return gens[0].get_state() if gens else None


def set_gate_state(model: nn.Module, state: torch.Tensor) -> None:
    """Restore a state saved by :func:`gate_state` (creates the shared generator if needed)."""
    gens = _generators(model)
    if len(gens) != 1:
        gen = set_gate_seed(model, 0)
    else:
        gen = gens[0]
    gen.set_state(state)


# ---- scale conversion ------------------------------------------------------------------
_SCALABLE = (nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd, nn.Linear, nn.GroupNorm, nn.LayerNorm)
_TRANSPARENT = (nn.Identity, nn.Dropout, nn.Dropout2d)


def _last_layer(branch: nn.Module) -> nn.Module | None:
    """The layer that produces the branch output, following the last child of Sequentials
    (skipping identities and dropout). None when the branch is not such a chain."""
    m = branch
    while isinstance(m, nn.Sequential):
        children = [c for c in m.children() if not isinstance(c, _TRANSPARENT)]
        if not children:
            return None
        m = children[-1]
    return m if isinstance(m, _SCALABLE) else None


@torch.no_grad()
def _scale_branch(unit: ResidualUnit, factor: float) -> None:
    hook = getattr(unit.branch, "scale_output_", None)
    if callable(hook):  # duck-typed hook for branches that are not a layer chain (DPN, merge-and-run)
        hook(factor)
        return
    last = _last_layer(unit.branch)
    if last is None:
        raise ValueError(
            f"cannot fold p into unit {unit.global_index}: its branch does not end in a BatchNorm/conv/linear layer; "
            "give the branch a scale_output_(factor) method")
    weight = getattr(last, "weight", None)
    if weight is None:
        raise ValueError(f"cannot fold p into unit {unit.global_index}: its last layer "
                         f"{type(last).__name__} has no affine weight")
    weight.mul_(factor)
    bias = getattr(last, "bias", None)
    if bias is not None:
        bias.mul_(factor)


def fold_survival_into_branch(model: nn.Module) -> nn.Module:
    """Convert a test-time-scaling model (``scale='test'``, the paper) into an equivalent
    train-time-scaling one (``scale='train'``), in place.

    The branch's last layer absorbs ``p_l``: a BatchNorm's affine weight and bias (ResNet
    v1), or a conv's weight (and bias) when the branch ends in a conv (pre-activation,
    Wide ResNet). Evaluation outputs are unchanged, and so are training outputs
    (``(p f) / p = f``); only the parametrisation seen by the optimiser differs.
    """
    for u in residual_units(model):
        if u.sd_mode != "off" and u.sd_scale == "test" and u.survival_prob < 1.0:
            _scale_branch(u, float(u.survival_prob))
            u.sd_scale = "train"
        elif u.sd_mode != "off":
            u.sd_scale = "train"
    if isinstance(getattr(model, "sd_config", None), StochasticDepth):
        model.sd_config = dataclasses.replace(model.sd_config, scale="train")
    return model


def unfold_survival_from_branch(model: nn.Module) -> nn.Module:
    """Inverse of :func:`fold_survival_into_branch`: divide the branch's last layer by
    ``p_l`` and switch to ``scale='test'``."""
    for u in residual_units(model):
        if u.sd_mode != "off" and u.sd_scale == "train" and u.survival_prob < 1.0:
            _scale_branch(u, 1.0 / float(u.survival_prob))
            u.sd_scale = "test"
        elif u.sd_mode != "off":
            u.sd_scale = "test"
    if isinstance(getattr(model, "sd_config", None), StochasticDepth):
        model.sd_config = dataclasses.replace(model.sd_config, scale="test")
    return model


# ---- gate statistics ----------------------------------------------------------------------
def gate_stats(model: nn.Module) -> list[dict[str, Any]]:
    """One row per unit: position, survival probability, mode, scale and whether its branch
    ran in the last forward (``last_gate_open``; None before the first forward)."""
    return [{"unit": i, "stage": u.stage, "index": u.index, "downsample": u.downsample,
             "survival_prob": u.survival_prob, "mode": u.sd_mode, "scale": u.sd_scale,
             "last_gate_open": u.last_gate_open} for i, u in enumerate(residual_units(model))]


class GateCounter:
    """Counts, per unit, the training forwards in which its branch ran (``batch`` mode),
    through forward hooks; use as a context manager::

        with GateCounter(model) as gc:
            for x in batches: model(x)
        gc.frequencies()   # empirical survival frequency of each unit
    """

    def __init__(self, model: nn.Module) -> None:
        self.units = residual_units(model)
        self.opened = [0] * len(self.units)
        self.forwards = [0] * len(self.units)
        self._handles: list[Any] = []

    def _hook(self, i: int):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if module.training:
                self.forwards[i] += 1
                self.opened[i] += int(bool(module.last_gate_open))
        return hook

    def __enter__(self) -> "GateCounter":
        self._handles = [u.register_forward_hook(self._hook(i)) for i, u in enumerate(self.units)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def frequencies(self) -> list[float | None]:
        return [o / n if n else None for o, n in zip(self.opened, self.forwards)]

    def mean_active(self) -> float:
        """Mean number of units whose branch ran per training forward."""
        n = max(self.forwards) if self.forwards else 0
        return sum(self.opened) / n if n else 0.0


# ---- DDP --------------------------------------------------------------------------------
def needs_find_unused_parameters(model: nn.Module) -> bool:
    """Whether DDP must run with ``find_unused_parameters=True`` for this model: true when
    a unit can skip its branch (``batch`` mode with p < 1). Without it the reduction of the
    next step fails ("Expected to have finished reduction in the prior iteration").
    ``static_graph=True`` is never valid with skipping (the used set changes every step)."""
    return any(u.sd_mode == "batch" and u.survival_prob < 1.0 for u in residual_units(model))


# ---- optimiser fidelity ------------------------------------------------------------------
@torch.no_grad()
def fill_missing_grads(params: nn.Module | Iterable[torch.Tensor]) -> int:
    """Give every trainable parameter whose ``grad is None`` a zero gradient; returns how many.

    Reproduces the Torch7 behaviour of the official code (one flat gradient vector, so a
    dropped unit still gets weight decay and momentum). PyTorch's default (``grad`` left
    None, SGD skips the parameter) is reslab's default; call this after ``backward`` (and
    after the DDP reduction) and before ``optimizer.step()`` to opt in.
    """
    it = params.parameters() if isinstance(params, nn.Module) else params
    n = 0
    for p in it:
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
            n += 1
    return n

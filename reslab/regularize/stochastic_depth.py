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
from typing import Any, Iterable

import torch
import torch.nn as nn

# The model-side part (schedules, the spec, applying it) lives in the models layer so that
# reslab.models.create_model(stochastic_depth=...) imports nothing above models; re-exported here.
from reslab.models.stochastic_depth import (MODES, RULES, SCALES, StochasticDepth, _check_p,  # noqa: F401
                                            _default_seed, _known, apply_stochastic_depth, expected_depth,
                                            model_expected_depth, remove_stochastic_depth, residual_units,
                                            survival_probs)
from reslab.models.units import ResidualUnit

__all__ = [
    "GateCounter", "MODES", "RULES", "SCALES", "StochasticDepth", "apply_stochastic_depth", "expected_depth",
    "fill_missing_grads", "fold_survival_into_branch", "gate_state", "gate_stats", "model_expected_depth",
    "needs_find_unused_parameters", "remove_stochastic_depth", "residual_units", "set_gate_seed",
    "set_gate_state", "survival_probs", "sync_gate_seed", "unfold_survival_from_branch",
]


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

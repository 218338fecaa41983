"""The unravelled view of a residual network, checked numerically (Veit et al. 2016 §3).

For n *linear* residual units ``x_{i+1} = x_i + W_i x_i`` the output is

    x_n = (I + W_{n-1}) ... (I + W_0) x_0 = sum over subsets S of {0..n-1} of (prod_{i in S} W_i) x_0,

2^n path terms, one per subset (the factors in increasing order of i, applied right to
left). The gradient of a loss L with respect to W_i is

    dL/dW_i = (I + W_{i+1}^T) ... (I + W_{n-1}^T) dL/dx_n x_i^T,

for three units and i = 0: ``dL/dW_0 = (I + W_1^T)(I + W_2^T) dL/dx_3 x_0^T``.

For a real (nonlinear) network the same decomposition holds for the backward pass: with
the forward fixed, backpropagation is linear in the upstream gradient, and each unit's
Jacobian is ``D (J_shortcut + J_branch)``, so summing the input gradients over all 2^n
routings (each unit passing the gradient through its branch only or its shortcut only,
``unit.route``) reproduces the full gradient (the *route identity*).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from reslab.analysis.lesion import preserved_bn_stats
from reslab.analysis.paths import input_gradient, measurement_mode, routable_units, routed

MAX_ROUTE_UNITS = 12
MAX_LINEAR_UNITS = 20


# ---- linear units ----------------------------------------------------------------------------
def linear_chain(n_units: int, dim: int = 4, seed: int = 0, scale: float = 0.5,
                 dtype: torch.dtype = torch.float64) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random weights ``W_0..W_{n-1}`` (dim x dim, entries N(0, scale^2 / dim)) and an input ``x_0``."""
    if not 1 <= n_units <= MAX_LINEAR_UNITS:
        raise ValueError(f"n_units must be in [1, {MAX_LINEAR_UNITS}] (2^n path terms), got {n_units}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(dim, dim, generator=g, dtype=dtype) * (scale / math.sqrt(dim)) for _ in range(n_units)]
    x0 = torch.randn(dim, generator=g, dtype=dtype)
    return ws, x0


def linear_forward(ws: list[torch.Tensor], x0: torch.Tensor) -> list[torch.Tensor]:
    """``[x_0, x_1, ..., x_n]`` with ``x_{i+1} = x_i + W_i x_i``."""
    xs = [x0]
    for w in ws:
        xs.append(xs[-1] + w @ xs[-1])
    return xs


def path_terms(ws: list[torch.Tensor], x0: torch.Tensor) -> dict[int, torch.Tensor]:
    """The 2^n path terms, keyed by the bit mask of the subset S (bit i set: W_i on the path)."""
    n = len(ws)
    terms = {}
    for mask in range(2**n):
        v = x0
        for i in range(n):
            if mask >> i & 1:
                v = ws[i] @ v
        terms[mask] = v
    return terms


def grad_w0_three_units(w1: torch.Tensor, w2: torch.Tensor, grad_x3: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The seed's formula written out: ``dL/dW_0 = (I + W_1^T)(I + W_2^T) dL/dx_3 x_0^T``."""
    eye = torch.eye(w1.shape[0], dtype=w1.dtype)
    return torch.outer((eye + w1.T) @ (eye + w2.T) @ grad_x3, x0)


def grad_formula(ws: list[torch.Tensor], xs: list[torch.Tensor], grad_xn: torch.Tensor, i: int) -> torch.Tensor:
    """``dL/dW_i = (I + W_{i+1}^T) ... (I + W_{n-1}^T) dL/dx_n x_i^T``."""
    v = grad_xn
    for w in reversed(ws[i + 1:]):
        v = v + w.T @ v
    return torch.outer(v, xs[i])


def _loss(xn: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # A nonlinear loss, so dL/dx_n depends on x_n.
    return 0.5 * ((xn - target) ** 2).sum() + torch.tanh(xn).sum()


def unravel_linear(n_units: int, dim: int = 4, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """Check the path expansion and the gradient formula on random linear units.

    Returns ``max_abs_err`` (path sum vs forward), ``grad_formula_err`` (max over i of the
    relative error of the formula for dL/dW_i vs autograd), ``grad_three_units_err`` (the
    written-out formula for dL/dW_0 on the first three units, when n >= 3), ``n_paths``
    and ``paths_per_length`` (C(n, k)).
    """
    ws, x0 = linear_chain(n_units, dim, seed, dtype=dtype)
    xs = linear_forward(ws, x0)
    terms = path_terms(ws, x0)
    path_sum = torch.stack(list(terms.values())).sum(0)
    max_abs_err = float((path_sum - xs[-1]).abs().max())
    by_len = [0] * (n_units + 1)
    for mask in terms:
        by_len[bin(mask).count("1")] += 1

    target = torch.randn(dim, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    wp = [w.clone().requires_grad_(True) for w in ws]
    xs_ag = linear_forward(wp, x0)
    xn = xs_ag[-1]
    loss = _loss(xn, target)
    grads = torch.autograd.grad(loss, wp + [xn])
    gw, g_xn = grads[:-1], grads[-1].detach()
    errs = []
    for i in range(n_units):
        f = grad_formula(ws, xs, g_xn, i)
        errs.append(float((f - gw[i]).norm() / gw[i].norm().clamp_min(1e-300)))
    out: dict[str, Any] = dict(n_units=n_units, n_paths=len(terms), paths_per_length=by_len, max_abs_err=max_abs_err,
                               grad_formula_err=max(errs))
    if n_units >= 3:
        # three-unit chain made of the first three weights
        w3 = [w.clone().requires_grad_(True) for w in ws[:3]]
        x3 = linear_forward(w3, x0)[-1]
        l3 = _loss(x3, target)
        g = torch.autograd.grad(l3, w3 + [x3])
        f3 = grad_w0_three_units(ws[1], ws[2], g[-1].detach(), x0)
        out["grad_three_units_err"] = float((f3 - g[0]).norm() / g[0].norm())
    return out


# ---- route identity on a real model ------------------------------------------------------------
def route_identity(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, at: str = "unit",
                   bn: str = "eval", seed: int = 0, max_units: int = MAX_ROUTE_UNITS) -> dict[str, Any]:
    """Sum the input gradient over all 2^m branch/shortcut routings of the m units with a
    shortcut and compare with the full gradient.

    ``bn="train"`` runs BatchNorm with batch statistics; the running statistics are
    restored before every pass (they would otherwise drift) and on exit. Without ``y`` the
    loss is a fixed random projection of the logits. Returns ``route_rel_err``
    (||sum - full|| / ||full||), ``n_routes``, ``grad_norm``.
    """
    units = routable_units(model)
    m = len(units)
    if m == 0:
        raise ValueError("the route identity needs residual units with a shortcut; this network has none (plain)")
    if m > max_units:
        raise ValueError(f"{m} units give 2^{m} routings; use a network with at most {max_units} units")
    weights = None
    with measurement_mode(model, bn):
        if y is None:
            with torch.no_grad():
                nc = model(x).shape[1]
            g = torch.Generator().manual_seed(seed)
            weights = torch.randn(nc, generator=g, dtype=torch.float64).to(dtype=x.dtype, device=x.device)
        with preserved_bn_stats(model):
            full = input_gradient(model, x, y, at=at, loss_weights=weights)
        acc = torch.zeros_like(full)
        for mask in range(2**m):
            with routed(model, [i for i in range(m) if mask >> i & 1]), preserved_bn_stats(model):
                acc += input_gradient(model, x, y, at=at, loss_weights=weights)
    err = float((acc - full).norm() / full.norm().clamp_min(1e-300))
    return dict(route_rel_err=err, n_routes=2**m, n_units=len(model.residual_units()), grad_norm=float(full.norm()),
                at=at, bn=bn)


def tiny_residual_net(n_units: int, preact: bool = False, width: int = 8, num_classes: int = 10,
                      in_chans: int = 3) -> nn.Module:
    """A small CIFAR-style ResNet with exactly ``n_units`` residual units: two stages (the second
    starts with an option-A downsampling unit) when n_units >= 2, for the route identity."""
    from reslab.models.resnet import NetSpec, ResNet, StageSpec

    if n_units < 1:
        raise ValueError(f"n_units must be >= 1, got {n_units}")
    if n_units == 1:
        stages = (StageSpec(1, width, 1),)
    else:
        a = (n_units + 1) // 2
        stages = (StageSpec(a, width, 1), StageSpec(n_units - a, 2 * width, 2))
    spec = NetSpec(stages, block="basic", preact=preact, stem="cifar_preact" if preact else "cifar", stem_chs=width,
                   shortcut="A")
    return ResNet(spec, num_classes=num_classes, in_chans=in_chans)


def unravel_report(n_units: int, *, dim: int = 4, seed: int = 0, model: nn.Module | None = None,
                   image_size: int = 8, batch: int = 4, at: str = "unit") -> dict[str, Any]:
    """Everything ``reslab unravel`` prints: the linear checks and the route identity on a real
    network (``model`` or :func:`tiny_residual_net` with ``n_units`` units), in float64 with
    eval-mode and train-mode BatchNorm. ``route_rel_err`` is the worse of the two."""
    out = unravel_linear(n_units, dim, seed)
    net = model if model is not None else tiny_residual_net(n_units)
    net = net.double()
    g = torch.Generator().manual_seed(seed)
    in_chans = next(m for m in net.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.randn(batch, in_chans, image_size, image_size, generator=g, dtype=torch.float64)
    ev = route_identity(net, x, at=at, bn="eval", seed=seed)
    tr = route_identity(net, x, at=at, bn="train", seed=seed)
    out.update(route_rel_err=max(ev["route_rel_err"], tr["route_rel_err"]), route_rel_err_eval_bn=ev["route_rel_err"],
               route_rel_err_train_bn=tr["route_rel_err"], route_units=ev["n_units"], n_routes=ev["n_routes"],
               route_at=at, dtype="float64")
    return out


__all__ = ["linear_chain", "linear_forward", "path_terms", "grad_w0_three_units", "grad_formula", "unravel_linear",
           "route_identity", "tiny_residual_net", "unravel_report"]

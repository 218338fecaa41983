"""Path-length analysis of residual networks (Veit, Wilber & Belongie 2016, arXiv 1605.06431 §5).

A network of n residual units unravels into 2^n paths; a path through k residual branches
(and n - k shortcuts) has length k, so lengths follow Binomial(n, 1/2).

The gradient experiment: the forward pass is the full network, unchanged; in the backward
pass, k sampled units pass the gradient only through their residual branch
(``unit.route = "branch"``) and the other n - k only through their shortcut
(``route = "shortcut"``). The gradient norm at the input, averaged over many (batch, subset)
samples, is the gradient magnitude of a path of length k; times the number of paths of
length k (C(n, k)) it is the total gradient that paths of length k carry.

Where the gradient is measured: ``at="unit"`` (default) is the input of the first residual
unit (the stem's output, so the stem's Jacobian, common to all paths, is left out);
``at="image"`` is the input image. The magnitude is the L2 norm of one image's gradient of
its own cross-entropy loss (the loss is summed over the batch), averaged over the images.

BatchNorm: ``bn="eval"`` (default) uses the running statistics, so every image has its own
Jacobian; ``bn="train"`` uses batch statistics (the images of a batch are coupled; running
statistics are restored afterwards). Stochastic-depth gates and dropout stay inactive in
both modes (only BatchNorm layers are switched to training mode).

Units without a shortcut (plain units) have only one route, through their branch; they
add a fixed length to every path (a plain network has one path, of length n).

Deviation: the paper sampled about 1,000 (batch, subset) pairs per length on ResNet-110;
the default here is smaller (``samples``) because it runs on CPUs.

Exact decomposition (reslab's, not in the paper; experiments.md §1.5):
:func:`exact_path_gradients` (one batch) and :func:`exact_path_lengths` (several) compute
G_k, the exact SUM of the input gradients of all C(m, k) paths of each length, in one
backward sweep with m + 1 components (batched vector-Jacobian products per unit). Its
``summed_norm`` is the norm of that sum (paths can cancel); the paper's quantity,
C(m, k) x E||g_path|| (norms before summing), is what the sampler's ``total`` estimates.
The two are never reported under one name.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.analysis.lesion import (as_batch_list, forward_head_from, preserved_bn_stats, preserved_modes,
                                    run_units_from, units_in_order)
from reslab.models.units import ResidualUnit

GRAD_AT = ("unit", "image")
GRAD_BN = ("eval", "train")
PATH_METHODS = ("sample", "exact")  # the paper's Monte-Carlo protocol; the exact sum (exact_path_gradients)


# ---- the path-length distribution --------------------------------------------------------
def path_length_distribution(n: int) -> list[dict[str, Any]]:
    """Number and fraction of the 2^n paths of each length k = 0..n (Binomial(n, 1/2))."""
    if n < 0:
        raise ValueError(f"the number of units must be >= 0, got {n}")
    total = 2**n
    return [dict(length=k, paths=math.comb(n, k), fraction=math.comb(n, k) / total) for k in range(n + 1)]


def fraction_within(n: int, lo: int, hi: int) -> float:
    """Fraction of the 2^n paths with length in [lo, hi] (exact, as a float)."""
    lo, hi = max(lo, 0), min(hi, n)
    if lo > hi:
        return 0.0
    return sum(math.comb(n, k) for k in range(lo, hi + 1)) / 2**n


def central_range(n: int, mass: float = 0.95) -> tuple[int, int]:
    """The narrowest interval [lo, hi] of path lengths holding at least ``mass`` of all paths
    (symmetric around n/2). For n = 54 and mass 0.95 this is [20, 34] (96.0% of the paths);
    the paper's wider [19, 35] holds 98.0%, so its "95% of paths" statement is consistent."""
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    lo, hi = n // 2, (n + 1) // 2
    while fraction_within(n, lo, hi) < mass:
        lo, hi = lo - 1, hi + 1
    return max(lo, 0), min(hi, n)


# ---- routing ------------------------------------------------------------------------------
def routable_units(model: nn.Module) -> list[ResidualUnit]:
    """Units with a shortcut (two routes); plain units always route through their branch."""
    return [u for u in model.residual_units() if u.has_shortcut]


@contextmanager
def routed(model: nn.Module, branch: Iterable[int], others: str = "shortcut") -> Iterator[nn.Module]:
    """Inside the block, the routable units at positions ``branch`` (indices into
    :func:`routable_units`) send the gradient only through their branch, the others only
    through their shortcut (``others="shortcut"``) or both (``others="both"``). Routes are
    restored on exit. The forward value is unchanged."""
    units = routable_units(model)
    saved = [(u, u.route) for u in units]
    chosen = set(int(i) for i in branch)
    for i in chosen:
        if not 0 <= i < len(units):
            raise ValueError(f"routable unit index {i} out of range (0..{len(units) - 1})")
    try:
        for i, u in enumerate(units):
            u.route = "branch" if i in chosen else others
        yield model
    finally:
        for u, r in saved:
            u.route = r


@contextmanager
def measurement_mode(model: nn.Module, bn: str = "eval") -> Iterator[nn.Module]:
    """Eval mode, or eval mode with BatchNorm layers in training mode (``bn="train"``); the
    modes, the running statistics and ``requires_grad`` of the parameters are restored on exit.
    Parameters do not require gradients inside (only input gradients are measured)."""
    if bn not in GRAD_BN:
        raise ValueError(f"bn must be one of {GRAD_BN}, got {bn!r}")
    params = [(p, p.requires_grad) for p in model.parameters()]
    with preserved_modes(model), preserved_bn_stats(model):
        try:
            model.eval()
            if bn == "train":
                for m in model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.train()
            for p, _ in params:
                p.requires_grad_(False)
            yield model
        finally:
            for p, r in params:
                p.requires_grad_(r)


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, at: str = "unit",
                   loss_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of the summed loss w.r.t. the input of the first residual unit (``at="unit"``)
    or the image (``at="image"``), with the model's current modes and routes.

    The loss is the summed cross-entropy with targets ``y``, or ``(logits * loss_weights).sum()``
    when ``y`` is None.
    """
    if at not in GRAD_AT:
        raise ValueError(f"at must be one of {GRAD_AT}, got {at!r}")
    with torch.enable_grad():
        if at == "unit":
            units = units_in_order(model)
            with torch.no_grad():
                h0 = model.stem(x)
            inp = h0.detach().requires_grad_(True)
            logits = run_units_from(model, inp, 0, units)
        else:
            inp = x.detach().requires_grad_(True)
            logits = model(inp)
        if y is not None:
            loss = F.cross_entropy(logits, y, reduction="sum")
        else:
            if loss_weights is None:
                raise ValueError("pass targets y or loss_weights")
            loss = (logits * loss_weights).sum()
        (g,) = torch.autograd.grad(loss, inp)
    return g


# ---- gradient per path length --------------------------------------------------------------
@dataclass
class PathResult:
    """Result of :func:`gradient_per_path_length`.

    ``rows``: one per length k measured: ``length, k_routable, paths, fraction, grad_mean,
    grad_std, grad_sem, samples, measurements, total, total_fraction``; ``total`` =
    grad_mean x number of paths of that length; ``total_fraction`` its share of the sum.
    """

    rows: list[dict[str, Any]]
    n_units: int
    n_routable: int
    at: str
    bn: str
    samples: int
    batch_size: int
    effective_range: tuple[int, int] | None
    effective_mass: float
    interpolated: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        n = self.n_routable
        lo, hi = central_range(n, 0.95)
        eff = self.effective_range
        out = dict(n_units=self.n_units, n_routable=self.n_routable, at=self.at, bn=self.bn, samples=self.samples,
                   batch_size=self.batch_size, path_range_95=[lo + self.n_fixed, hi + self.n_fixed],
                   effective_range=None if eff is None else list(eff), effective_mass=self.effective_mass,
                   interpolated=self.interpolated)
        if eff is not None:
            frac = fraction_within(n, eff[0] - self.n_fixed, eff[1] - self.n_fixed)
            out["effective_paths_fraction"] = frac
        out.update(self.meta)
        return out

    @property
    def n_fixed(self) -> int:
        return self.n_units - self.n_routable


def effective_range(lengths: Sequence[int], totals: Sequence[float], mass: float = 0.9) -> tuple[int, int]:
    """The shortest contiguous range of path lengths carrying at least ``mass`` of the total
    gradient (ties: the one with the most mass). ``lengths`` must be consecutive integers.

    The paper names 5-17 for ResNet-110 without stating a threshold; ``mass`` is ours.
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    if list(lengths) != list(range(lengths[0], lengths[0] + len(lengths))):
        raise ValueError("effective_range needs consecutive lengths")
    tot = float(sum(totals))
    if tot <= 0:
        raise ValueError("the total gradient is zero; cannot define an effective range")
    best = None
    n = len(totals)
    for i in range(n):
        s = 0.0
        for j in range(i, n):
            s += totals[j]
            if s >= mass * tot * (1 - 1e-12):
                cand = (j - i, -s, lengths[i], lengths[j])
                if best is None or cand < best:
                    best = cand
                break
    assert best is not None
    return best[2], best[3]


def _interp_log(ks: list[int], vals: list[float], grid: list[int]) -> list[float]:
    """Log-linear interpolation of positive ``vals`` at ``grid`` (inside [ks[0], ks[-1]])."""
    out = []
    logs = [math.log(max(v, 1e-300)) for v in vals]
    for k in grid:
        if k <= ks[0]:
            out.append(vals[0])
        elif k >= ks[-1]:
            out.append(vals[-1])
        else:
            j = next(i for i in range(1, len(ks)) if ks[i] >= k)
            t = (k - ks[j - 1]) / (ks[j] - ks[j - 1])
            out.append(math.exp(logs[j - 1] + t * (logs[j] - logs[j - 1])))
    return out


def gradient_per_path_length(model: nn.Module, batches: Iterable[Any], ks: Sequence[int] | None = None,
                             samples: int = 20, *, at: str = "unit", bn: str = "eval", seed: int = 0,
                             mass: float = 0.9, progress: Callable[[int, int], None] | None = None) -> PathResult:
    """Gradient magnitude at the input for paths of each length (Veit et al. 2016 Fig. 6).

    For each k in ``ks`` (numbers of routable units sent through their branch; default all
    0..m) and each of ``samples`` draws: a batch (cycling through ``batches``) and a random
    k-subset of the routable units; forward unchanged, backward through the branches of the
    subset and the shortcuts of the others; record each image's input-gradient L2 norm.

    Lengths in the result count plain units too (length = k + number of plain units).
    ``effective_range`` is computed on all lengths; when ``ks`` skips some, the magnitudes
    in between are interpolated log-linearly (``interpolated=True``), within the measured span.
    ``progress(done, total)``, if given, is called after each measured length (the caller prints).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    batches = as_batch_list(batches)
    units = units_in_order(model)
    routable = routable_units(model)
    m, n = len(routable), len(units)
    n_fixed = n - m
    ks = list(range(m + 1)) if ks is None else sorted(set(int(k) for k in ks))
    for k in ks:
        if not 0 <= k <= m:
            raise ValueError(f"k={k} is out of range: the network has {m} units with a shortcut (0..{m})")
    g = torch.Generator().manual_seed(seed)
    rows = []
    if progress is not None:
        progress(0, len(ks))
    with measurement_mode(model, bn):
        for k in ks:
            norms: list[torch.Tensor] = []
            for s in range(samples):
                x, y = batches[(s + k * samples) % len(batches)]
                subset = torch.randperm(m, generator=g)[:k].tolist()
                with routed(model, subset), preserved_bn_stats(model):
                    grad = input_gradient(model, x, y, at=at)
                norms.append(grad.flatten(1).norm(dim=1).double())
            allv = torch.cat(norms)
            per_sample = torch.stack([v.mean() for v in norms])
            mean = float(allv.mean())
            std = float(allv.std()) if allv.numel() > 1 else 0.0
            sem = float(per_sample.std() / math.sqrt(samples)) if samples > 1 else float("nan")
            rows.append(dict(length=k + n_fixed, k_routable=k, paths=math.comb(m, k), fraction=math.comb(m, k) / 2**m,
                             grad_mean=mean, grad_std=std, grad_sem=sem, samples=samples,
                             measurements=int(allv.numel()), total=mean * math.comb(m, k)))
            if progress is not None:
                progress(len(rows), len(ks))
    tot = sum(r["total"] for r in rows)
    for r in rows:
        r["total_fraction"] = r["total"] / tot if tot > 0 else float("nan")
    interpolated = ks != list(range(ks[0], ks[-1] + 1))
    eff = None
    if tot > 0:
        grid = list(range(ks[0], ks[-1] + 1))  # measured span only; no extrapolation
        mags = _interp_log(ks, [r["grad_mean"] for r in rows], grid) if interpolated else [r["grad_mean"] for r in rows]
        totals = [mg * math.comb(m, k) for mg, k in zip(mags, grid)]
        lo, hi = effective_range(grid, totals, mass)
        eff = (lo + n_fixed, hi + n_fixed)
    bsz = int(batches[0][0].shape[0])
    return PathResult(rows=rows, n_units=n, n_routable=m, at=at, bn=bn, samples=samples, batch_size=bsz,
                      effective_range=eff, effective_mass=mass, interpolated=interpolated,
                      meta=dict(measured_lengths=[ks[0] + n_fixed, ks[-1] + n_fixed], seed=seed))


# ---- exact path-length decomposition ---------------------------------------------------------
def _leaves(obj: Any) -> list[torch.Tensor]:
    """The tensors of a unit state (a tensor or a (named) tuple / list of tensors), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _leaves(o)]
    raise TypeError(f"unsupported type in residual state: {type(obj).__name__}")


def _rebuild(template: Any, leaves: Iterator[torch.Tensor]) -> Any:
    """``template`` with its tensors replaced, in order, by ``leaves``."""
    if isinstance(template, torch.Tensor):
        return next(leaves)
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return type(template)(*(_rebuild(o, leaves) for o in template))
    return type(template)(_rebuild(o, leaves) for o in template)


def _batched_vjp(fn: Callable[[Any], Any], inp: Any, cots: list[torch.Tensor], chunk: int | None) -> list[torch.Tensor]:
    """Vector-Jacobian products of ``fn`` at ``inp`` for C cotangents at once: ``cots`` are the
    output leaves' cotangents with a leading component axis of size C; returns the input leaves'
    gradients with the same leading axis (zeros where the output does not depend on a leaf).
    ``chunk`` bounds the number of components per backward call (memory)."""
    leaves_in = [t.detach().requires_grad_(True) for t in _leaves(inp)]
    with torch.enable_grad():
        out = fn(_rebuild(inp, iter(leaves_in)))
    leaves_out = _leaves(out)
    assert len(leaves_out) == len(cots), "cotangents do not match the unit's output"
    c = cots[0].shape[0]
    step = c if chunk is None else max(1, int(chunk))
    parts: list[list[torch.Tensor]] = []
    for lo in range(0, c, step):
        sl = [t[lo:lo + step] for t in cots]
        retain = lo + step < c
        gs = torch.autograd.grad(leaves_out, leaves_in, sl, retain_graph=retain, allow_unused=True,
                                 is_grads_batched=True)
        parts.append([torch.zeros((sl[0].shape[0], *t.shape), dtype=t.dtype, device=t.device) if g is None else g
                      for g, t in zip(gs, leaves_in)])
    return [torch.cat([p[j] for p in parts]) if len(parts) > 1 else parts[0][j] for j in range(len(leaves_in))]


@dataclass
class ExactPathResult:
    """Result of :func:`exact_path_gradients` / :func:`exact_path_lengths`.

    ``grads``: G, shape ``(n_units + 1, *input_shape)``; ``grads[L]`` is the exact sum of the input
    gradients of all paths through L residual branches (plain units count: lengths below
    ``n_fixed`` are zero), or None when not kept. ``full_grad``: the ordinary input gradient.

    ``rows``: one per k_routable = 0..n_routable (length = k_routable + n_fixed), with ``length,
    k_routable, paths`` (C(m, k)), ``fraction`` (of all paths), ``summed_norm`` (the L2 norm of one
    image's summed gradient G_k, averaged over the images), ``summed_fraction`` (summed_norm over the
    sum of summed_norm), ``projection_share`` (sum over images of <G_k, grad> / sum of ||grad||^2:
    signed, sums to 1 over k exactly), ``mean_path_vector_norm`` (summed_norm / paths: the norm of
    the mean path gradient, a lower bound on the mean of the path norms).

    Not here: the paper's quantity C(m, k) x E||g_path|| (norms before summing), which
    :func:`gradient_per_path_length` estimates (its rows' ``total``); paths can cancel, so
    ``summed_norm`` is at most that.

    ``sum_rel_err``: ||sum_k G_k - grad|| / ||grad|| over the whole batch (the exactness check).
    ``full_norm``: the per-image L2 norm of the ordinary gradient, averaged. ``units``: the
    global indices of the routable units, ``plain_units`` those without a shortcut.
    ``backward_equivalents``: unit vector-Jacobian products (one per component) divided by
    ``n_units`` (about n_units + 1), excluding the ordinary gradient computed for the check.
    """

    rows: list[dict[str, Any]]
    n_units: int
    n_routable: int
    at: str
    bn: str
    batch_size: int
    full_norm: float
    sum_rel_err: float
    units: list[int]
    plain_units: list[int]
    backward_equivalents: float
    grads: torch.Tensor | None = None
    full_grad: torch.Tensor | None = None
    effective_range: tuple[int, int] | None = None
    effective_mass: float = 0.9
    method: str = "exact"
    sums: dict[str, Any] = field(default_factory=dict, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_fixed(self) -> int:
        return self.n_units - self.n_routable

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors). ``effective_range_summed`` is the shortest range of
        lengths carrying ``effective_mass`` of the sum of ``summed_norm`` (not the paper's total)."""
        lo, hi = central_range(self.n_routable, 0.95)
        eff = self.effective_range
        out = dict(method=self.method, n_units=self.n_units, n_routable=self.n_routable, at=self.at, bn=self.bn,
                   batch_size=self.batch_size, images=self.sums.get("images", self.batch_size),
                   path_range_95=[lo + self.n_fixed, hi + self.n_fixed], full_norm=self.full_norm,
                   sum_rel_err=self.sum_rel_err, units=self.units, plain_units=self.plain_units,
                   backward_equivalents=self.backward_equivalents,
                   effective_range_summed=None if eff is None else list(eff), effective_mass=self.effective_mass)
        if eff is not None:
            out["effective_paths_fraction"] = fraction_within(self.n_routable, eff[0] - self.n_fixed,
                                                              eff[1] - self.n_fixed)
        out.update(self.meta)
        return out


def _exact_sums(grads: torch.Tensor, full: torch.Tensor, n_fixed: int, m: int) -> dict[str, Any]:
    """Per-batch sums from which the rows of :class:`ExactPathResult` are formed (float64)."""
    g = grads[n_fixed:n_fixed + m + 1].flatten(2).double()   # (m+1, B, D)
    f = full.flatten(1).double()                             # (B, D)
    return dict(images=int(f.shape[0]), norm=g.norm(dim=2).sum(1).tolist(), dot=(g * f).sum((1, 2)).tolist(),
                full_sq=float((f * f).sum()), full_norm=float(f.norm(dim=1).sum()),
                err_sq=float(((grads.flatten(2).double().sum(0)) - f).pow(2).sum()))


def _exact_from_sums(sums: dict[str, Any], m: int, n_fixed: int, mass: float) -> tuple[list[dict[str, Any]], Any]:
    b = sums["images"]
    norms = [v / b for v in sums["norm"]]
    tot = sum(norms)
    rows = []
    for k in range(m + 1):
        paths = math.comb(m, k)
        rows.append(dict(length=k + n_fixed, k_routable=k, paths=paths, fraction=paths / 2**m, summed_norm=norms[k],
                         summed_fraction=norms[k] / tot if tot > 0 else float("nan"),
                         projection_share=sums["dot"][k] / sums["full_sq"] if sums["full_sq"] > 0 else float("nan"),
                         mean_path_vector_norm=norms[k] / paths))
    eff = None
    if tot > 0:
        lo, hi = effective_range(list(range(m + 1)), norms, mass)
        eff = (lo + n_fixed, hi + n_fixed)
    return rows, eff


def exact_path_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, at: str = "unit",
                         bn: str = "eval", chunk: int | None = None, loss_weights: torch.Tensor | None = None,
                         keep_grads: bool = True, mass: float = 0.9) -> ExactPathResult:
    """The exact path-length decomposition of the input gradient (the sum of all paths of each
    length of Veit et al. 2016, arXiv 1605.06431 §5, in one backward sweep; reslab's method,
    not the paper's sampling protocol).

    With the forward pass fixed, backpropagation is linear in the upstream gradient, so the
    sum over all C(m, k) paths with k residual branches is carried exactly as component k of a
    backward sweep with n + 1 components: per unit, the shortcut-routed VJP (``route =
    "shortcut"``) keeps a component's length and the branch-routed VJP (``route = "branch"``)
    adds one; a plain unit (no shortcut) adds one to every component. The post-merge activation's
    mask is shared (both VJPs run through the same merge at the unit's real input), so
    component k equals the sum over the explicit ``routed`` assignments with k branch-routed
    units that the 2^n enumeration of :func:`reslab.analysis.unravel.route_identity` sums.

    Loss, ``at`` and ``bn`` are those of :func:`input_gradient` / :func:`gradient_per_path_length`
    (summed cross-entropy with ``y``, else ``(logits * loss_weights).sum()``). ``chunk`` bounds
    the components per batched VJP (memory grows as components x one unit activation).
    Lesioned units are refused.
    """
    if at not in GRAD_AT:
        raise ValueError(f"at must be one of {GRAD_AT}, got {at!r}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1 or None, got {chunk}")
    if y is None and loss_weights is None:
        raise ValueError("pass targets y or loss_weights")
    units = units_in_order(model)
    for u in units:
        if u.lesioned:
            raise ValueError(f"unit {u.global_index} is lesioned; the path decomposition needs the intact network "
                             "(clear unit.lesioned first)")
    n = len(units)
    routable_ids = [u.global_index for u in units if u.has_shortcut]
    plain_ids = [u.global_index for u in units if not u.has_shortcut]
    m = len(routable_ids)
    saved = [(u, u.route) for u in units]
    unit_vjps = 0
    with measurement_mode(model, bn), preserved_bn_stats(model):
        try:
            with torch.no_grad():
                h0 = model.stem(x)
                states = [h0]
                for u in units:
                    states.append(u(states[-1]))

            def head(h: Any) -> torch.Tensor:
                logits = forward_head_from(model, h)
                if y is not None:
                    return F.cross_entropy(logits, y, reduction="sum")
                return (logits * loss_weights).sum()

            # dL/dy_n as the single component 0.
            leaves_n = [t.detach().requires_grad_(True) for t in _leaves(states[-1])]
            with torch.enable_grad():
                loss = head(_rebuild(states[-1], iter(leaves_n)))
                g_n = torch.autograd.grad(loss, leaves_n, allow_unused=True)
            comps = [torch.zeros_like(t)[None] if g is None else g[None] for g, t in zip(g_n, leaves_n)]
            lo = 0  # length of component 0 of ``comps``
            for i in range(n - 1, -1, -1):
                u, h = units[i], states[i]
                c = comps[0].shape[0]
                if not u.has_shortcut:
                    comps = _batched_vjp(u, h, comps, chunk)
                    lo += 1
                    unit_vjps += c
                    continue
                u.route = "shortcut"
                gs = _batched_vjp(u, h, comps, chunk)
                u.route = "branch"
                gb = _batched_vjp(u, h, comps, chunk)
                u.route = "both"
                unit_vjps += 2 * c
                comps = [torch.cat([a, torch.zeros_like(a[:1])]) + torch.cat([torch.zeros_like(b[:1]), b])
                         for a, b in zip(gs, gb)]
            if at == "image":
                comps = _batched_vjp(model.stem, x, comps, chunk)
            (gin,) = comps
            assert lo == n - m and gin.shape[0] == m + 1, "component bookkeeping"
            grads = torch.zeros((n + 1, *gin.shape[1:]), dtype=gin.dtype, device=gin.device)
            grads[lo:lo + m + 1] = gin
        finally:
            for u, r in saved:
                u.route = r
        with preserved_bn_stats(model):
            full = input_gradient(model, x, y, at=at, loss_weights=loss_weights)
    sums = _exact_sums(grads, full, n - m, m)
    rows, eff = _exact_from_sums(sums, m, n - m, mass)
    b = int(x.shape[0])
    return ExactPathResult(rows=rows, n_units=n, n_routable=m, at=at, bn=bn, batch_size=b,
                           full_norm=sums["full_norm"] / b, sum_rel_err=math.sqrt(sums["err_sq"] / sums["full_sq"])
                           if sums["full_sq"] > 0 else float("nan"), units=routable_ids, plain_units=plain_ids,
                           backward_equivalents=unit_vjps / max(n, 1), grads=grads.detach() if keep_grads else None,
                           full_grad=full.detach() if keep_grads else None, effective_range=eff, effective_mass=mass,
                           sums=sums, meta=dict(chunk=chunk))


def exact_path_lengths(model: nn.Module, batches: Iterable[Any], *, at: str = "unit", bn: str = "eval",
                       chunk: int | None = None, mass: float = 0.9,
                       progress: Callable[[int, int], None] | None = None) -> ExactPathResult:
    """:func:`exact_path_gradients` on every batch of ``batches``, aggregated over all images
    (``summed_norm`` averaged per image, ``projection_share`` from the summed dot products,
    ``sum_rel_err`` over all images, ``backward_equivalents`` summed). Gradients are not kept.
    ``progress(done, total)`` is called after each batch."""
    batches = as_batch_list(batches)
    tot: dict[str, Any] = {}
    first: ExactPathResult | None = None
    bwd = 0.0
    if progress is not None:
        progress(0, len(batches))
    for j, (x, y) in enumerate(batches):
        r = exact_path_gradients(model, x, y, at=at, bn=bn, chunk=chunk, keep_grads=False, mass=mass)
        first = r if first is None else first
        bwd += r.backward_equivalents
        for key, v in r.sums.items():
            if key not in tot:
                tot[key] = v
            elif isinstance(v, list):
                tot[key] = [a + b for a, b in zip(tot[key], v)]
            else:
                tot[key] = tot[key] + v
        if progress is not None:
            progress(j + 1, len(batches))
    assert first is not None, "as_batch_list returns at least one batch"
    rows, eff = _exact_from_sums(tot, first.n_routable, first.n_fixed, mass)
    rel = math.sqrt(tot["err_sq"] / tot["full_sq"]) if tot["full_sq"] > 0 else float("nan")
    return ExactPathResult(rows=rows, n_units=first.n_units, n_routable=first.n_routable, at=at, bn=bn,
                           batch_size=first.batch_size, full_norm=tot["full_norm"] / tot["images"],
                           sum_rel_err=rel, units=first.units, plain_units=first.plain_units,
                           backward_equivalents=bwd,
                           effective_range=eff, effective_mass=mass, sums=tot,
                           meta=dict(chunk=chunk, batches=len(batches)))

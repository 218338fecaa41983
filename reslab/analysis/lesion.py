"""Lesion studies of residual networks (Veit, Wilber & Belongie 2016, arXiv 1605.06431).

Three experiments on a trained network, all at test time:

* **single-unit lesion**: remove the residual branch of one unit (``unit.lesioned = True``,
  so the unit computes ``merge(shortcut(x), None)``) and measure the test error, for every
  unit. Downsampling units are flagged: their lesioned form is not the identity (option A
  zero-pads the new channels, option B keeps the 1x1 projection).
* **k-unit lesion**: remove ``k`` random units, ``repeats`` times per ``k``.
* **reordering**: swap random pairs of units of equal shape (same stage, non-downsampling)
  and plot the error against Kendall's tau between the new order and the original.

BatchNorm protocols (experiments.md §1.2), every row is labelled with its protocol:

* ``frozen`` (default, the paper's): eval mode with the stored running statistics;
* ``recalibrated``: the running statistics are re-estimated for each lesioned network with
  :func:`reslab.analysis.bn.recalibrate_bn` on calibration (training) batches, then
  restored afterwards. The caller builds those batches (:mod:`reslab.studies.inputs`:
  augmented like training by default, since the stored statistics were estimated on
  augmented batches); this module loads no run or data set.

The plain twin (``shortcut=None``) is the contrast: a lesioned plain unit returns its input
(a layer deleted from a plain network); a downsampling plain unit cannot be deleted and is
reported as ineligible.

Deviation from the paper: the paper lesions a 110-layer pre-activation ResNet; any network
whose stages hold :class:`~reslab.models.units.ResidualUnit` works here.
"""
from __future__ import annotations

import csv
import itertools
import math
import os
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from reslab.analysis.bn import recalibrate_bn
from reslab.models.units import ResidualUnit

BN_PROTOCOLS = ("frozen", "recalibrated")
Batch = tuple[torch.Tensor, torch.Tensor]


# ---- walking the unit list ---------------------------------------------------------------
def units_in_order(model: nn.Module) -> list[ResidualUnit]:
    """The flattened unit list of a ``stem -> stages[i].units -> final_norm -> head`` network.

    Raises ``NotImplementedError`` for networks whose stages hold other modules (FractalNet)
    or that lack that structure: prefix caching and reordering need it.
    """
    for attr in ("stem", "stages", "final_norm", "head"):
        if not hasattr(model, attr):
            raise NotImplementedError(
                f"{type(model).__name__} has no '{attr}': unit-wise analyses need a stem -> stages -> "
                "final_norm -> head network")
    units: list[ResidualUnit] = []
    for si, stage in enumerate(model.stages):
        mods = getattr(stage, "units", None)
        if mods is None:
            raise NotImplementedError(f"stage {si} of {type(model).__name__} has no 'units' list")
        for m in mods:
            if not isinstance(m, ResidualUnit):
                raise NotImplementedError(
                    f"stage {si} of {type(model).__name__} holds a {type(m).__name__}, not a residual unit "
                    "(e.g. FractalNet); unit-wise lesions and prefix caching need residual units only")
            units.append(m)
    return units


def forward_head_from(model: nn.Module, h: Any) -> torch.Tensor:
    """``final_norm`` then the classifier head (the end of ``model.forward``)."""
    h = model.final_norm(h)
    if hasattr(model, "forward_head"):
        return model.forward_head(h)
    return model.head(h)


def run_units_from(model: nn.Module, h: Any, start: int, units: Sequence[nn.Module] | None = None) -> torch.Tensor:
    """Logits of ``model`` given ``h``, the input of unit ``start`` (0 = the stem's output):
    units ``start..n-1`` of the flattened list, ``final_norm`` and the head."""
    units = units_in_order(model) if units is None else units
    if not 0 <= start <= len(units):
        raise ValueError(f"start must be in [0, {len(units)}], got {start}")
    for u in units[start:]:
        h = u(h)
    return forward_head_from(model, h)


# ---- lesions and reordering as context managers -------------------------------------------
def lesion_eligible(unit: ResidualUnit) -> bool:
    """Whether removing ``unit``'s branch gives a valid network: every unit with a shortcut;
    a plain (no-shortcut) unit only if it keeps the shape (not downsampling)."""
    return unit.has_shortcut or not unit.downsample


def _check_indices(units: Sequence[ResidualUnit], indices: Iterable[int]) -> list[int]:
    idx = [int(i) for i in indices]
    for i in idx:
        if not 0 <= i < len(units):
            raise ValueError(f"unit index {i} is out of range; the network has {len(units)} residual units "
                             f"(0..{len(units) - 1})")
    return idx


@contextmanager
def lesioned(model: nn.Module, indices: Iterable[int]) -> Iterator[nn.Module]:
    """Remove the residual branch of units ``indices`` (positions in ``model.residual_units()``)
    inside the block; the previous ``lesioned`` flags are restored on exit.

    Raises ``ValueError`` for a downsampling unit of a plain network (it cannot be removed).
    """
    units = model.residual_units()
    idx = _check_indices(units, indices)
    for i in idx:
        if not lesion_eligible(units[i]):
            raise ValueError(f"unit {i} is a downsampling unit of a plain network and cannot be removed; "
                             "lesion only non-downsampling units of plain networks")
    saved = [(u, u.lesioned) for u in units]
    try:
        for i in idx:
            units[i].lesioned = True
        yield model
    finally:
        for u, flag in saved:
            u.lesioned = flag


def reorder_eligible(unit: ResidualUnit) -> bool:
    """Units that may move: non-downsampling (equal input and output shape)."""
    return not unit.downsample


def _validate_perm(model: nn.Module, units: Sequence[ResidualUnit], perm: Sequence[int]) -> list[int]:
    n = len(units)
    perm = [int(p) for p in perm]
    if sorted(perm) != list(range(n)):
        raise ValueError(f"perm must be a permutation of 0..{n - 1} (one entry per residual unit), got {perm}")
    stage_of = {}
    for si, stage in enumerate(model.stages):
        for u in stage.units:
            stage_of[id(u)] = si
    for pos, src in enumerate(perm):
        if pos == src:
            continue
        a, b = units[pos], units[src]
        if stage_of[id(a)] != stage_of[id(b)]:
            raise ValueError(f"cannot move unit {src} to position {pos}: they are in different stages "
                             "(different shapes); reorder only within a stage")
        for j, u in ((src, b), (pos, a)):
            if not reorder_eligible(u):
                raise ValueError(f"unit {j} is a downsampling unit (its input and output shapes differ) and "
                                 "cannot be reordered; swap only non-downsampling units of one stage")
    return perm


@contextmanager
def reordered(model: nn.Module, perm: Sequence[int]) -> Iterator[nn.Module]:
    """Run the units in the order ``perm`` inside the block: position ``p`` of the flattened
    unit list holds original unit ``perm[p]``. Only non-downsampling units of one stage may
    move (equal shapes); anything else raises ``ValueError``. The ``stages[i].units``
    ModuleLists are permuted in place and restored on exit."""
    units = units_in_order(model)
    perm = _validate_perm(model, units, perm)
    saved = [list(stage.units) for stage in model.stages]
    try:
        pos = 0
        for stage in model.stages:
            for j in range(len(stage.units)):
                stage.units[j] = units[perm[pos]]
                pos += 1
        yield model
    finally:
        for stage, mods in zip(model.stages, saved):
            for j, m in enumerate(mods):
                stage.units[j] = m


def kendall_tau(perm: Sequence[int]) -> float:
    """Kendall's tau between the identity order and ``perm`` (no ties): 1 - 4 * inversions / (n (n-1))."""
    n = len(perm)
    if n < 2:
        return 1.0
    inv = sum(1 for i, j in itertools.combinations(range(n), 2) if perm[i] > perm[j])
    return 1.0 - 4.0 * inv / (n * (n - 1))


def random_swaps(model: nn.Module, swaps: int, generator: torch.Generator | None = None) -> list[int]:
    """A permutation made of ``swaps`` random transpositions of reorder-eligible units of one
    stage (Veit et al. 2016 §4.3: swap k random pairs). Returns the permutation (see :func:`reordered`)."""
    units = units_in_order(model)
    groups: list[list[int]] = []
    pos = 0
    for stage in model.stages:
        g = [pos + j for j, u in enumerate(stage.units) if reorder_eligible(u)]
        pos += len(stage.units)
        if len(g) >= 2:
            groups.append(g)
    perm = list(range(len(units)))
    if swaps and not groups:
        raise ValueError("no stage has two non-downsampling units, so nothing can be swapped")
    candidates = [p for g in groups for p in g]
    group_of = {p: g for g in groups for p in g}
    for _ in range(swaps):
        a = candidates[int(torch.randint(len(candidates), (), generator=generator))]
        others = [p for p in group_of[a] if p != a]
        b = others[int(torch.randint(len(others), (), generator=generator))]
        perm[a], perm[b] = perm[b], perm[a]
    return perm


# ---- evaluation ---------------------------------------------------------------------------
def as_batch_list(batches: Iterable[Any]) -> list[Batch]:
    """Materialise ``(x, y, ...)`` batches once so they can be visited many times."""
    out = []
    for b in batches:
        if not isinstance(b, (tuple, list)) or len(b) < 2:
            raise ValueError("batches must yield (inputs, targets) pairs")
        out.append((b[0], b[1]))
    if not out:
        raise ValueError("no evaluation batches; pass a non-empty iterable of (inputs, targets)")
    return out


@torch.no_grad()
def count_correct(model: nn.Module, batches: Sequence[Batch]) -> tuple[int, int]:
    """(correct, total) top-1 over ``batches`` with the model as it is (mode unchanged)."""
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(1) == y).sum())
        total += int(y.numel())
    return correct, total


def _bn_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for b in (m.running_mean, m.running_var, m.num_batches_tracked):
                if b is not None:
                    out.append((b, b.detach().clone()))
    return out


@contextmanager
def preserved_bn_stats(model: nn.Module) -> Iterator[None]:
    """Snapshot every BatchNorm's running statistics and restore them on exit."""
    saved = _bn_buffers(model)
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, val in saved:
                buf.copy_(val)


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's ``training`` flag on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


def check_bn(bn: str, calib_batches: Any) -> list[str]:
    """Expand ``bn`` ('frozen' | 'recalibrated' | 'both') into protocol names, checking inputs."""
    protocols = list(BN_PROTOCOLS) if bn == "both" else [bn]
    for p in protocols:
        if p not in BN_PROTOCOLS:
            raise ValueError(f"bn must be 'frozen', 'recalibrated' or 'both', got {bn!r}")
    if "recalibrated" in protocols and calib_batches is None:
        raise ValueError("the recalibrated BN protocol needs calibration batches (training data); "
                         "pass calib_batches or use bn='frozen'")
    return protocols


def error_rate(model: nn.Module, batches: Sequence[Batch], bn: str = "frozen",
               calib_batches: Sequence[Any] | None = None, n_calib: int = 20) -> float:
    """Top-1 error of ``model`` as it is now (lesions/reorders applied) under BN protocol ``bn``.

    ``recalibrated`` re-estimates the running statistics on ``calib_batches`` first and
    restores the stored ones afterwards, so the model is unchanged on return.
    """
    check_bn(bn, calib_batches)
    with preserved_modes(model), preserved_bn_stats(model):
        if bn == "recalibrated":
            recalibrate_bn(model, calib_batches, n_calib)
        model.eval()
        c, t = count_correct(model, batches)
    return 1.0 - c / t



def _unit_info(u: ResidualUnit, i: int) -> dict[str, Any]:
    return dict(unit=i, stage=u.stage, index=u.index, downsample=bool(u.downsample), plain=not u.has_shortcut)


# ---- single-unit lesion ---------------------------------------------------------------------
@torch.no_grad()
def _single_sweep_cached(model: nn.Module, batches: Sequence[Batch], eligible: list[int]) -> tuple[int, dict[int, int]]:
    """Frozen-BN single-unit sweep that runs the stem and the unchanged prefix once per batch:
    unit i's input is cached, and only unit i (lesioned) and the suffix are recomputed."""
    units = units_in_order(model)
    base = 0
    correct = {i: 0 for i in eligible}
    first = True
    for x, y in batches:
        h = model.stem(x)
        acts = []
        for u in units:
            acts.append(h)
            h = u(h)
        logits = forward_head_from(model, h)
        if first:  # structural check (tolerant: GPU kernels may pick other algorithms per call)
            ref = model(x)
            if not torch.allclose(logits, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-6):
                raise NotImplementedError(
                    f"{type(model).__name__}.forward is not stem -> units -> final_norm -> head; "
                    "use the uncached sweep (cached=False)")
            first = False
        base += int((logits.argmax(1) == y).sum())
        for i in eligible:
            units[i].lesioned = True
            try:
                z = run_units_from(model, acts[i], i, units)
            finally:
                units[i].lesioned = False
            correct[i] += int((z.argmax(1) == y).sum())
    return base, correct


def single_unit_lesion(model: nn.Module, batches: Iterable[Any], *, bn: str = "frozen",
                       calib_batches: Iterable[Any] | None = None, n_calib: int = 20, cached: bool = True,
                       label: str = "model", progress: Callable[[int, int], None] | None = None
                       ) -> list[dict[str, Any]]:
    """Error of the network with each single unit's branch removed (Veit et al. 2016 §4.1).

    Returns one row per (protocol, unit) plus a baseline row (``unit = -1``) per protocol:
    ``model, bn, unit, stage, index, downsample, plain, eligible, error, delta`` (delta =
    error - baseline error). Ineligible units (downsampling units of plain networks) get
    ``error = None``. ``cached=True`` uses prefix caching for the frozen protocol (the
    errors are identical to the naive sweep on the CPU, where every forward repeats the same
    kernels; see :func:`_single_sweep_cached`). ``progress(done, total)``, if given, is called
    as the networks are evaluated (the caller prints).
    """
    batches = as_batch_list(batches)
    protocols = check_bn(bn, calib_batches)
    calib = as_batch_list(calib_batches) if calib_batches is not None else None
    units = model.residual_units()
    if not units:
        raise ValueError(f"{type(model).__name__} has no residual units to lesion")
    eligible = [i for i, u in enumerate(units) if lesion_eligible(u)]
    total = sum(int(y.numel()) for _, y in batches)
    rows: list[dict[str, Any]] = []
    n_work, done = len(protocols) * (1 + len(eligible)), 0
    if progress is not None:
        progress(0, n_work)
    for proto in protocols:
        use_cache = proto == "frozen" and cached
        if use_cache:
            try:
                with preserved_modes(model):
                    model.eval()
                    base_c, corr = _single_sweep_cached(model, batches, eligible)
                base = 1.0 - base_c / total
                errs = {i: 1.0 - c / total for i, c in corr.items()}
                done += 1 + len(eligible)
                if progress is not None:
                    progress(done, n_work)
            except NotImplementedError as e:
                warnings.warn(f"{e}; falling back to the naive sweep", stacklevel=2)
                use_cache = False
        if not use_cache:
            base = error_rate(model, batches, proto, calib, n_calib)
            errs = {}
            done += 1
            if progress is not None:
                progress(done, n_work)
            for i in eligible:
                with lesioned(model, [i]):
                    errs[i] = error_rate(model, batches, proto, calib, n_calib)
                done += 1
                if progress is not None:
                    progress(done, n_work)
        rows.append(dict(model=label, bn=proto, unit=-1, stage=None, index=None, downsample=None, plain=None,
                         eligible=True, error=base, delta=0.0))
        for i, u in enumerate(units):
            e = errs.get(i)
            rows.append(dict(model=label, bn=proto, **_unit_info(u, i), eligible=i in errs, error=e,
                             delta=None if e is None else e - base))
    return rows


# ---- k-unit lesion ---------------------------------------------------------------------------
def k_lesion_eligible(model: nn.Module, include_downsample: bool = False) -> list[int]:
    """Units the k-unit lesion samples from: non-downsampling units by default (for the plain
    twin these are the only removable ones, so both networks get the same candidate set);
    ``include_downsample=True`` adds the downsampling units of residual networks."""
    return [i for i, u in enumerate(model.residual_units())
            if not u.downsample or (include_downsample and lesion_eligible(u))]


def k_unit_lesion(model: nn.Module, batches: Iterable[Any], ks: Sequence[int] | None = None, repeats: int = 10, *,
                  bn: str = "frozen", calib_batches: Iterable[Any] | None = None, n_calib: int = 20, seed: int = 0,
                  include_downsample: bool = False, label: str = "model",
                  progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Error with ``k`` randomly chosen units removed, ``repeats`` draws per k (Veit et al. 2016 §4.2).

    ``ks`` defaults to every k from 0 to the number of eligible units (see
    :func:`k_lesion_eligible`). The same random subsets are used for every BN protocol.
    Rows: ``model, bn, k, repeat, units (space-separated), error``; k = 0 is the baseline
    (one row). ``progress(done, total)``, if given, is called after each lesioned network.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    batches = as_batch_list(batches)
    protocols = check_bn(bn, calib_batches)
    calib = as_batch_list(calib_batches) if calib_batches is not None else None
    cand = k_lesion_eligible(model, include_downsample)
    if not cand:
        raise ValueError("no unit is eligible for the k-unit lesion (every unit downsamples)")
    ks = list(range(len(cand) + 1)) if ks is None else [int(k) for k in ks]
    for k in ks:
        if not 0 <= k <= len(cand):
            raise ValueError(f"k={k} is out of range: {len(cand)} units are eligible (0..{len(cand)})")
    g = torch.Generator().manual_seed(seed)
    draws: list[tuple[int, int, list[int]]] = []
    for k in ks:
        for r in range(1 if k == 0 else repeats):
            pick = torch.randperm(len(cand), generator=g)[:k].tolist()
            draws.append((k, r, sorted(cand[p] for p in pick)))
    rows = []
    if progress is not None:
        progress(0, len(protocols) * len(draws))
    for proto in protocols:
        for k, r, subset in draws:
            with lesioned(model, subset):
                err = error_rate(model, batches, proto, calib, n_calib)
            rows.append(dict(model=label, bn=proto, k=k, repeat=r, units=" ".join(map(str, subset)), error=err))
            if progress is not None:
                progress(len(rows), len(protocols) * len(draws))
    return rows


def summarize(rows: Sequence[dict[str, Any]], by: str, value: str = "error") -> list[dict[str, Any]]:
    """Mean, std (population) and count of ``value`` grouped by (model, bn, ``by``)."""
    groups: dict[tuple, list[float]] = {}
    extra: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        if r.get(value) is None:
            continue
        key = (r["model"], r["bn"], r[by])
        groups.setdefault(key, []).append(float(r[value]))
        if "tau" in r:
            extra.setdefault(key, {}).setdefault("tau", []).append(float(r["tau"]))
    out = []
    for (m, b, v), vals in groups.items():
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((e - mean) ** 2 for e in vals) / len(vals))
        row = dict(model=m, bn=b, **{by: v}, mean=mean, std=std, n=len(vals))
        if (m, b, v) in extra:
            taus = extra[(m, b, v)]["tau"]
            row["tau_mean"] = sum(taus) / len(taus)
        out.append(row)
    return out


# ---- reordering ------------------------------------------------------------------------------
def reorder_study(model: nn.Module, batches: Iterable[Any], swaps: Sequence[int] | None = None, repeats: int = 10, *,
                  bn: str = "frozen", calib_batches: Iterable[Any] | None = None, n_calib: int = 20, seed: int = 0,
                  label: str = "model", progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Error after ``s`` random swaps of equal-shape units, ``repeats`` draws per s
    (Veit et al. 2016 §4.3), with Kendall's tau of each order against the original.

    ``swaps`` defaults to 0, 1, 2, 4, ... up to the number of reorderable units.
    Rows: ``model, bn, swaps, repeat, tau, perm, error``. ``progress(done, total)``, if given, is
    called after each reordered network.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    batches = as_batch_list(batches)
    protocols = check_bn(bn, calib_batches)
    calib = as_batch_list(calib_batches) if calib_batches is not None else None
    n_movable = sum(reorder_eligible(u) for u in units_in_order(model))
    if swaps is None:
        swaps = [0] + [2**i for i in range(max(1, math.ceil(math.log2(max(n_movable, 2)))) + 1)]
    g = torch.Generator().manual_seed(seed)
    draws = []
    for s in swaps:
        if s < 0:
            raise ValueError(f"swap counts must be >= 0, got {s}")
        for r in range(1 if s == 0 else repeats):
            draws.append((int(s), r, random_swaps(model, int(s), g)))
    rows = []
    if progress is not None:
        progress(0, len(protocols) * len(draws))
    for proto in protocols:
        for s, r, perm in draws:
            with reordered(model, perm):
                err = error_rate(model, batches, proto, calib, n_calib)
            rows.append(dict(model=label, bn=proto, swaps=s, repeat=r, tau=kendall_tau(perm),
                             perm=" ".join(map(str, perm)), error=err))
            if progress is not None:
                progress(len(rows), len(protocols) * len(draws))
    return rows


# ---- several networks side by side -----------------------------------------------------------
MODES = ("single", "k", "reorder")


def compare_lesions(models: dict[str, nn.Module], batches: Iterable[Any], mode: str = "single", *,
                    calib_batches: dict[str, Iterable[Any]] | Iterable[Any] | None = None,
                    **kwargs: Any) -> list[dict[str, Any]]:
    """Run one lesion experiment on several networks (e.g. a ResNet, its plain twin and an
    SD-trained ResNet) and return all rows in one table, labelled by the dict keys.

    ``batches`` is shared, or a dict per label; so is ``calib_batches``. ``kwargs`` go to
    :func:`single_unit_lesion`, :func:`k_unit_lesion` or :func:`reorder_study`.
    """
    fn = {"single": single_unit_lesion, "k": k_unit_lesion, "reorder": reorder_study}.get(mode)
    if fn is None:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rows: list[dict[str, Any]] = []
    shared_eval = None if isinstance(batches, dict) else as_batch_list(batches)
    for label, m in models.items():
        ev = batches[label] if shared_eval is None else shared_eval
        cal = calib_batches.get(label) if isinstance(calib_batches, dict) else calib_batches
        rows.extend(fn(m, ev, calib_batches=cal, label=label, **kwargs))
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> str:
    """Write ``rows`` (dicts; the union of keys, first-seen order) as CSV; returns the path."""
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    return str(path)

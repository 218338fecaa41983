"""The model zoo table: size, compute, CPU speed and peak memory per model, side by side.

For each model: parameters and MACs (via :mod:`reslab.models.complexity`; MACs = FLOPs / 2,
the figure the papers print), then on the CPU, at batch ``B`` and the model's native input
(32x32 CIFAR, 224x224 ImageNet):

* **inference images/s**: eval mode, ``torch.no_grad()``;
* **training images/s**: train mode, forward + cross-entropy + backward + SGD (momentum) step;
* **peak memory (MiB)**: the peak of live tensor bytes *allocated during one pass* by torch's
  CPU allocator, read from ``torch.profiler`` allocation events (``profile_memory=True``). It
  excludes what was alive before the pass (weights, the input batch, optimizer state) and
  everything outside torch tensors (the Python heap, allocator slack). For training the
  gradients are released before the pass, so they count. It is the CPU analogue of CUDA's
  ``max_memory_allocated`` delta, not the process RSS.

Every measurement runs the *full* network: stochastic path regularisers are switched off for
its duration (stochastic-depth gates of residual units, FractalNet drop-path), so a figure does
not depend on which paths one batch happened to sample and matches the MACs column (dropout
stays on in training). Stochastic depth in ``batch`` mode and FractalNet's global drop-path make
real training cheaper than these figures.

Timing: one warm-up iteration, then iterations until ``min_time`` seconds have passed (at least
``min_iters``, at most ``max_iters``); the reported rate is ``batch / median(iteration time)``.
CPU numbers depend on the thread count (reported) and on other load; compare models measured in
one run. :func:`compare` gives the relative size, compute, speed and memory of two models, e.g.
the DPN paper's claim (Chen et al. 2017, arXiv 1707.01629) for DPN-98 vs ResNeXt-101 (64x4d).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.models.complexity import count_flops, count_params
from reslab.models.registry import create_model, default_input_size, list_models

__all__ = [
    "DEFAULT_MODELS", "DPN_CLAIM", "ZooRow", "resolve_models", "default_batch", "full_network", "time_pass",
    "peak_pass_memory",
    "benchmark_model", "run_zoo", "compare", "zoo_markdown", "comparison_markdown",
]

#: A small, fast CIFAR set: one or two models per family.
DEFAULT_MODELS: tuple[str, ...] = (
    "cifar_resnet20", "cifar_resnet56", "cifar_resnet110", "cifar_preact_resnet164", "cifar_dpn26",
    "cifar_dmrnet_mr1", "cifar_dfn_il", "cifar_fractalnet_c3b5",
)

#: The DPN paper's comparison (abstract of arXiv 1707.01629); papers.md §8 identifies the shallow
#: DPN as DPN-98 (61.57M vs 83.46M params, 11.7 vs ~15.6 GFLOPs).
DPN_CLAIM: dict[str, Any] = dict(
    a="dpn98", b="resnext101_64x4d",
    text="a shallow DPN surpasses ResNeXt-101 (64x4d) with 26% smaller model size, 25% less computational "
         "cost and 8% lower memory consumption (Chen et al. 2017, abstract; GPU training memory)",
    params=-0.26, macs=-0.25, train_peak_mib=-0.08,
)

_MIB = 2.0 ** 20


@dataclass
class ZooRow:
    """One model's measurements; speeds in images/s, memory in MiB (``None``: not measured)."""

    name: str
    input_size: tuple[int, int, int]
    batch: int
    params: int
    macs: int
    flops: int
    infer_images_per_s: float | None = None
    train_images_per_s: float | None = None
    infer_peak_mib: float | None = None
    train_peak_mib: float | None = None
    threads: int = 1
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d


# ---- model selection -------------------------------------------------------------------
def resolve_models(items: Sequence[str] | None) -> list[str]:
    """Names or fnmatch patterns -> registered names, in the given order, without duplicates.
    ``None`` or empty gives :data:`DEFAULT_MODELS` (those registered)."""
    if not items:
        known = set(list_models())
        return [n for n in DEFAULT_MODELS if n in known]
    out: list[str] = []
    for item in items:
        if any(ch in item for ch in "*?["):
            names = list_models(item)
            if not names:
                raise ValueError(f"no model name matches {item!r}; run `reslab models` for the list")
        else:
            default_input_size(item)  # raises ValueError with a close-match hint
            names = [item]
        out += [n for n in names if n not in out]
    return out


def default_batch(input_size: Sequence[int]) -> int:
    """16 for CIFAR-sized inputs (<= 64x64 pixels), 2 for ImageNet-sized ones (slow CPUs)."""
    return 16 if input_size[1] * input_size[2] <= 64 * 64 else 2


# ---- measurements ------------------------------------------------------------------------
def _make_step(model: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], None]:
    if not train:
        def infer() -> None:
            with torch.no_grad():
                model(x)
        return infer
    target = torch.zeros(x.shape[0], dtype=torch.long)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
    return step


def time_pass(model: nn.Module, x: torch.Tensor, train: bool, min_time: float = 1.0, min_iters: int = 2,
              max_iters: int = 50) -> float:
    """Images per second of inference (``train=False``) or of a training step, as
    ``batch / median(iteration seconds)`` after one warm-up iteration. The model's training
    flags, weights and BN statistics are restored afterwards."""
    if min_iters < 1 or max_iters < min_iters:
        raise ValueError(f"need 1 <= min_iters <= max_iters, got {min_iters}, {max_iters}")
    modes = {m: m.training for m in model.modules()}
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()} if train else None
    try:
        model.train(train)
        step = _make_step(model, x, train)
        step()  # warm-up
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_time):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    finally:
        for m, t in modes.items():
            m.training = t
        if saved is not None:
            model.load_state_dict(saved)
            model.zero_grad(set_to_none=True)
    return x.shape[0] / statistics.median(times)


@contextlib.contextmanager
def full_network(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily switch off stochastic path regularisers: residual units' stochastic-depth
    gates (``sd_mode``) and a boolean ``drop_path`` switch (FractalNet). Restored on exit."""
    units = list(model.residual_units()) if hasattr(model, "residual_units") else []
    saved_modes = [u.sd_mode for u in units]
    saved_dp = getattr(model, "drop_path", None)
    try:
        for u in units:
            u.sd_mode = "off"
        if isinstance(saved_dp, bool):
            model.drop_path = False  # type: ignore[assignment]
        yield model
    finally:
        for u, m in zip(units, saved_modes):
            u.sd_mode = m
        if isinstance(saved_dp, bool):
            model.drop_path = saved_dp  # type: ignore[assignment]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (C++ logging) for the duration of the block."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover - no fd 2
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def peak_pass_memory(model: nn.Module, x: torch.Tensor, train: bool) -> int | None:
    """Peak bytes of tensors allocated (and still live) during one inference pass or one
    forward + backward, from the profiler's allocation events; ``None`` if the profiler does
    not expose them. Weights, ``x`` and anything allocated before the pass are excluded."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover - depends on the torch build
        return None
    modes = {m: m.training for m in model.modules()}
    target = torch.zeros(x.shape[0], dtype=torch.long)
    try:
        model.train(train)
        model.zero_grad(set_to_none=True)
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():  # the profiler backend logs start/stop lines on fd 2
            prof.start()
        try:
            if train:
                F.cross_entropy(model(x), target).backward()
            else:
                with torch.no_grad():
                    model(x)
        finally:
            with _quiet_stderr():
                prof.stop()
        model.zero_grad(set_to_none=True)
        try:
            tree = prof.profiler.kineto_results.experimental_event_tree()
        except AttributeError:  # pragma: no cover
            return None
        allocs: list[tuple[int, int]] = []
        stack = list(tree)
        while stack:
            e = stack.pop()
            if e.tag == _EventType.Allocation:
                allocs.append((e.start_time_ns, int(e.extra_fields.alloc_size)))
            stack.extend(e.children)
    finally:
        for m, t in modes.items():
            m.training = t
    if not allocs:
        return None
    allocs.sort()
    cur = peak = 0
    for _, size in allocs:  # alloc_size is negative for frees
        cur += size
        peak = max(peak, cur)
    return peak


def benchmark_model(name: str, batch: int | None = None, input_size: Sequence[int] | None = None,
                    speed: bool = True, train: bool = True, memory: bool = True, min_time: float = 1.0,
                    max_iters: int = 50, seed: int = 0, **overrides: Any) -> ZooRow:
    """Measure one registered model (see the module docstring); ``overrides`` go to create_model."""
    size = tuple(int(s) for s in (input_size or default_input_size(name)))
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size must be (C, H, W) with positive entries, got {size}")
    b = default_batch(size) if batch is None else int(batch)
    if b < 1:
        raise ValueError(f"batch must be >= 1, got {b}")
    torch.manual_seed(seed)
    model = create_model(name, **overrides)
    row = ZooRow(name, size, b, count_params(model), 0, 0, threads=torch.get_num_threads())  # type: ignore[arg-type]
    row.flops = count_flops(model, size)  # type: ignore[arg-type]
    row.macs = row.flops // 2
    x = torch.randn(b, *size)
    with full_network(model):
        _measure(row, model, x, speed, train, memory, min_time, max_iters)
    return row


def _measure(row: ZooRow, model: nn.Module, x: torch.Tensor, speed: bool, train: bool, memory: bool,
             min_time: float, max_iters: int) -> None:
    if speed:
        row.infer_images_per_s = time_pass(model, x, False, min_time, max_iters=max_iters)
        if train:
            row.train_images_per_s = time_pass(model, x, True, min_time, max_iters=max_iters)
    if memory:
        peak = peak_pass_memory(model, x, False)
        row.infer_peak_mib = None if peak is None else peak / _MIB
        if train:
            peak = peak_pass_memory(model, x, True)
            row.train_peak_mib = None if peak is None else peak / _MIB


def run_zoo(names: Sequence[str], batch: int | None = None, *, speed: bool = True, train: bool = True,
            memory: bool = True, min_time: float = 1.0, max_iters: int = 50, keep_going: bool = True,
            progress: Callable[[str], None] | None = None) -> list[ZooRow]:
    """:func:`benchmark_model` for each name. With ``keep_going`` a model that fails to build or
    run gets a row with ``error`` set instead of stopping the table."""
    rows = []
    for name in names:
        if progress is not None:
            progress(name)
        try:
            rows.append(benchmark_model(name, batch, speed=speed, train=train, memory=memory, min_time=min_time,
                                        max_iters=max_iters))
        except Exception as e:  # noqa: BLE001 - reported in the table
            if not keep_going:
                raise
            size = default_input_size(name)
            rows.append(ZooRow(name, size, batch or default_batch(size), 0, 0, 0, threads=torch.get_num_threads(),
                               error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"))
    return rows


# ---- comparison and formatting -----------------------------------------------------------
_COMPARED = ("params", "macs", "infer_images_per_s", "train_images_per_s", "infer_peak_mib", "train_peak_mib")


def compare(rows: Sequence[ZooRow], a: str, b: str) -> dict[str, Any]:
    """Relative differences ``a / b - 1`` for size, compute, speed and memory (``None`` where a
    value is missing). Both models must be in ``rows``."""
    by = {r.name: r for r in rows}
    for n in (a, b):
        if n not in by:
            raise ValueError(f"cannot compare {n!r}: it is not in the table; add it with --models")
    ra, rb = by[a], by[b]
    rel: dict[str, float | None] = {}
    for k in _COMPARED:
        va, vb = getattr(ra, k), getattr(rb, k)
        rel[k] = None if va is None or vb is None or vb == 0 else va / vb - 1.0
    out: dict[str, Any] = dict(a=a, b=b, relative=rel, same_batch=ra.batch == rb.batch)
    if {a, b} == {DPN_CLAIM["a"], DPN_CLAIM["b"]}:
        out["paper_claim"] = {k: DPN_CLAIM[k] for k in ("text", "params", "macs", "train_peak_mib")}
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def zoo_markdown(rows: Sequence[ZooRow]) -> str:
    """The zoo as one Markdown table."""
    header = ["model", "input", "batch", "params (M)", "GMACs/img", "infer img/s", "train img/s",
              "infer peak MiB", "train peak MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        size = "x".join(str(s) for s in r.input_size[1:])
        if r.error:
            cells = [f"`{r.name}`", size, str(r.batch), f"error: {r.error}"] + [""] * (len(header) - 4)
        else:
            cells = [f"`{r.name}`", size, str(r.batch), f"{r.params / 1e6:.2f}", f"{r.macs / 1e9:.3g}",
                     _fmt(r.infer_images_per_s, ".1f"), _fmt(r.train_images_per_s, ".1f"),
                     _fmt(r.infer_peak_mib, ".1f"), _fmt(r.train_peak_mib, ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_markdown(cmp: dict[str, Any]) -> str:
    """A short table of ``a`` relative to ``b`` (with the paper's claim for DPN-98 vs ResNeXt-101)."""
    labels = dict(params="parameters", macs="MACs", infer_images_per_s="inference speed",
                  train_images_per_s="training speed", infer_peak_mib="inference peak memory",
                  train_peak_mib="training peak memory")
    claim = cmp.get("paper_claim")
    # the claim is DPN relative to ResNeXt; invert it when the table compares the other way round
    reversed_claim = claim is not None and cmp["a"] != DPN_CLAIM["a"]
    head = f"`{cmp['a']}` relative to `{cmp['b']}`"
    lines = [head, "", "| quantity | measured | paper |" if claim else "| quantity | measured |",
             "|---|---:|---:|" if claim else "|---|---:|"]
    for k, label in labels.items():
        v = cmp["relative"][k]
        cell = "—" if v is None else f"{100 * v:+.1f}%"
        if claim:
            p = claim.get(k)
            if p is not None and reversed_claim:
                p = 1 / (1 + p) - 1
            pc = "—" if p is None else f"{100 * p:+.0f}%"
            lines.append(f"| {label} | {cell} | {pc} |")
        else:
            lines.append(f"| {label} | {cell} |")
    if claim:
        lines += ["", f"Paper: {claim['text']}."]
    if not cmp["same_batch"]:
        lines += ["", "Note: the two models were measured at different batch sizes."]
    return "\n".join(lines)

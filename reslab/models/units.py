"""The residual unit: ``y = merge(shortcut(x), g * branch(x))`` with a gate ``g``.

Every residual family in reslab (ResNet v1, pre-activation, Wide ResNet, ResNeXt, DPN,
merge-and-run) is a stack of :class:`ResidualUnit`. The gate is the single place where
stochastic depth, lesions and gradient routing act, so the analysis tools never patch
``forward`` (the design: one unit with separable parts, README "The library").

Gate states:

* **stochastic depth** (training): ``sd_mode`` ``"batch"`` draws one Bernoulli(p) per unit
  per mini-batch and, when it closes, the branch is *not computed* (Huang et al. 2016);
  ``"batch-mask"`` multiplies the computed branch by one draw; ``"row"`` draws per sample.
  ``sd_scale="test"`` scales the branch by p at evaluation (the paper), ``"train"``
  divides by p in training instead.
* **lesion**: ``lesioned = True`` removes the branch at any time (Veit et al. 2016).
* **gradient routing**: ``route`` ``"both"`` (default), ``"branch"`` (gradient only through
  the branch) or ``"shortcut"`` (only through the shortcut). The forward value is unchanged
  bit for bit; only ``detach`` is applied.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
from torch.nn.modules import module as _torch_module

SD_MODES = ("off", "batch", "batch-mask", "row")
SD_SCALES = ("test", "train")
ROUTES = ("both", "branch", "shortcut")


def tree_map(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """Apply ``fn`` to every tensor in a tensor / (named) tuple / list structure."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(tree_map(fn, o) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(tree_map(fn, o) for o in obj)
    if obj is None:
        return None
    raise TypeError(f"unsupported type in residual state: {type(obj).__name__}")


def _first_tensor(obj: Any) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    for o in obj:
        return _first_tensor(o)
    raise TypeError("empty state")


def _call_module(module: nn.Module, x: Any) -> Any:
    return module(x)


# Compiled callers of unit branches, one per group of alike units (a cache, not configuration):
# each caller is built from its own copy of _call_module's code object, so that each group has its own
# dynamo cache and recompile limit (one code object shared by all units would hit the limit of 8
# entries on a deep network once train and eval mode are both compiled).
_COMPILED_CALLERS: dict[tuple[Any, ...], Callable[..., Any]] = {}
_COMPILE_KWARGS: dict[str, dict[str, Any]] = {}  # torch.compile arguments by their repr (the key's last item)


def _compiled_caller(key: tuple[Any, ...]) -> Callable[..., Any]:
    fn = _COMPILED_CALLERS.get(key)
    if fn is None:
        import types

        code = _call_module.__code__.replace(co_name=f"_call_module_{len(_COMPILED_CALLERS)}")
        fresh = types.FunctionType(code, _call_module.__globals__, code.co_name)
        fn = _COMPILED_CALLERS[key] = torch.compile(fresh, **_COMPILE_KWARGS[key[-1]])
    return fn


def compile_units(model: nn.Module, enable: bool = True, **compile_kwargs: Any) -> int:
    """``torch.compile`` every residual unit's branch while the gate stays in eager Python.

    Stochastic depth's batch mode then still skips a closed branch (nothing of it runs) and a new
    gate pattern needs no recompilation: the compiled graphs are per branch *kind*, not per
    pattern. Units of one stage with the same layout share one compiled caller (so the number of
    compilations is bounded by the number of distinct unit layouts times the train/eval modes,
    whatever the depth); the modules, their parameters and the state dict are unchanged, and a
    ``copy.deepcopy`` of the model runs its own weights through the same compiled code.
    ``compile_kwargs`` go to :func:`torch.compile` (e.g. ``backend``, ``mode``). Returns the number
    of units compiled. Undo with ``compile_units(model, enable=False)``.
    """
    units = [m for m in model.modules() if isinstance(m, ResidualUnit)]
    if not units:
        raise ValueError(f"{type(model).__name__} has no residual units; compile it whole with torch.compile(model)")
    kw = repr(sorted(compile_kwargs.items()))  # hashable even when a value (e.g. ``options``) is not
    _COMPILE_KWARGS[kw] = dict(compile_kwargs)
    for u in units:
        u.compiled_branch = (type(u.branch).__name__, u.stage, u.downsample, kw) if enable else None
    return len(units) if enable else 0


def _has_global_hooks() -> bool:
    """Whether global module hooks (``torch.nn.modules.module.register_module_*_hook``) are installed."""
    return any(getattr(_torch_module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                               "_global_backward_hooks", "_global_backward_pre_hooks"))


def _any_hooked(root: nn.Module) -> bool:
    """``_hooked`` for ``root`` or any module below it (an explicit walk: this runs on every forward
    of every unit, and ``nn.Module.modules()`` builds names and a memo set it does not need)."""
    stack = [root]
    while stack:
        m = stack.pop()
        if _hooked(m):
            return True
        stack.extend(c for c in m._modules.values() if c is not None)
    return False


def _hooked(m: nn.Module, pre: bool = False) -> bool:
    """Whether ``m`` has hooks that may hold or wrap its output (forward, or full backward hooks;
    ``pre``: forward pre-hooks too, for a module the fast path would not call)."""
    return bool(m._forward_hooks or m._backward_hooks or m._backward_pre_hooks or (pre and m._forward_pre_hooks))


class Gate(NamedTuple):
    """One forward's gate decision: ``open`` (branch computed?) and an optional multiplier
    ``mask`` (a scalar or per-sample tensor) applied to the branch output."""

    open: bool
    mask: torch.Tensor | None = None


class AddMerge(nn.Module):
    """``act(s + f)``: ReLU after the add for ResNet v1 (``post_act=True``), identity for
    pre-activation units. ``f is None`` (branch removed) gives ``act(s)``; ``s is None``
    (plain twin, no shortcut) gives ``act(f)``.

    :meth:`forward_inplace` computes the same value by adding ``s`` into ``f``'s storage and
    applying the ReLU in place (timm's blocks do the same; it saves two activation-sized
    allocations per unit). :class:`ResidualUnit` calls it only when nothing else can read ``f``.
    """

    supports_inplace = True

    def __init__(self, post_act: bool = False) -> None:
        super().__init__()
        self.post_act = post_act
        # Not in place: s may be the unit's input (identity shortcut).
        self.act = nn.ReLU() if post_act else nn.Identity()

    def forward(self, s: torch.Tensor | None, f: torch.Tensor | None) -> torch.Tensor:
        if s is None:
            assert f is not None
            y = f
        elif f is None:
            y = s
        else:
            y = s + f
        return self.act(y)

    def forward_inplace(self, s: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """``act(s + f)`` written into ``f`` (bit-identical to :meth:`forward`: IEEE addition
        commutes and ReLU's backward reads its output either way)."""
        y = f.add_(s)
        return torch.relu_(y) if self.post_act else y


class ResidualUnit(nn.Module):
    """A residual unit with separable ``shortcut`` / ``branch`` / ``merge`` and a gate.

    Args:
        branch: the residual function F.
        shortcut: identity, option A/B shortcut, or ``None`` for a plain (no-shortcut) unit.
        merge: combines ``(s, f)``; default :class:`AddMerge` without activation.
        preact: optional pre-activation (BN-ReLU) applied to ``x`` before the branch (He et al. 2016).
        shortcut_from_preact: the shortcut also reads the pre-activated input (projection units
            of pre-activation networks).
        stage, index, downsample: position of the unit, set by the network builder.
    """

    def __init__(
        self,
        branch: nn.Module,
        shortcut: nn.Module | None,
        merge: nn.Module | None = None,
        *,
        preact: nn.Module | None = None,
        shortcut_from_preact: bool = False,
        stage: int = 0,
        index: int = 0,
        downsample: bool = False,
    ) -> None:
        super().__init__()
        self.preact = preact
        self.branch = branch
        self.shortcut = shortcut
        self.merge = merge if merge is not None else AddMerge(post_act=False)
        self.shortcut_from_preact = shortcut_from_preact
        self.stage, self.index, self.downsample = stage, index, downsample
        self.global_index = 0  # position in model.residual_units(), set by the network
        # Gate state (plain attributes: not parameters, not buffers, not in the state dict).
        self.survival_prob: float = 1.0
        self.sd_mode: str = "off"
        self.sd_scale: str = "test"
        self.gate_generator: torch.Generator | None = None
        self.lesioned: bool = False
        self.route: str = "both"
        self.last_gate_open: bool | None = None
        # The in-place merge (AddMerge.forward_inplace) where it is safe; False forces the reference merge.
        self.inplace_merge: bool = True
        # Set by compile_units: the key of the compiled caller that runs the branch (None: eager).
        self.compiled_branch: tuple[Any, ...] | None = None

    # ---- properties -------------------------------------------------------------------
    @property
    def has_shortcut(self) -> bool:
        return self.shortcut is not None

    def extra_repr(self) -> str:
        parts = [f"stage={self.stage}", f"index={self.index}"]
        if self.downsample:
            parts.append("downsample=True")
        if self.sd_mode != "off":
            parts.append(f"sd={self.sd_mode}(p={self.survival_prob:.4g}, scale={self.sd_scale})")
        if self.lesioned:
            parts.append("lesioned=True")
        if self.route != "both":
            parts.append(f"route={self.route}")
        return ", ".join(parts)

    # ---- gate -------------------------------------------------------------------------
    def _uniform(self, shape: tuple[int, ...] = ()) -> torch.Tensor:
        return torch.rand(shape, generator=self.gate_generator)

    def draw_gate(self, x: Any) -> Gate:
        """Sample this forward's gate (stochastic depth); deterministic outside training."""
        if self.sd_mode not in SD_MODES:
            raise ValueError(f"sd_mode must be one of {SD_MODES}, got {self.sd_mode!r}")
        if self.sd_scale not in SD_SCALES:
            raise ValueError(f"sd_scale must be one of {SD_SCALES}, got {self.sd_scale!r}")
        p = float(self.survival_prob)
        if not self.training or self.sd_mode == "off" or p >= 1.0:
            return Gate(True, None)
        inv = 1.0 / p if self.sd_scale == "train" and p > 0 else 1.0
        ref = _first_tensor(x)
        if self.sd_mode == "batch":
            is_open = bool(self._uniform() < p)
            if not is_open:
                return Gate(False, None)
            return Gate(True, None if inv == 1.0 else torch.tensor(inv, dtype=ref.dtype, device=ref.device))
        if self.sd_mode == "batch-mask":
            keep = (self._uniform() < p).to(ref.dtype) * inv
            return Gate(True, keep.to(ref.device))
        # row: one draw per sample
        n = ref.shape[0]
        keep = (self._uniform((n,)) < p).to(ref.dtype) * inv
        return Gate(True, keep.view(n, *([1] * (ref.dim() - 1))).to(ref.device))

    # ---- forward ----------------------------------------------------------------------
    def forward(self, x: Any) -> Any:
        return self.forward_gated(x, self.draw_gate(x))

    def forward_gated(self, x: Any, gate: Gate) -> Any:
        """Forward with a given gate decision (used by gradient checkpointing, so that the
        recomputation sees the same draw)."""
        self.last_gate_open = gate.open and not self.lesioned
        removed = self.lesioned or not gate.open
        if self.shortcut is None:  # plain twin: no shortcut
            if removed:
                if self.downsample:
                    raise ValueError(
                        f"cannot remove unit {self.global_index} of a plain network: it changes the shape "
                        "(downsampling); lesion only non-downsampling units of plain networks")
                return x
            h = self.preact(x) if self.preact is not None else x
            f = self._scale(self._run_branch(h), gate.mask)
            return self.merge(None, f)
        need_h = self.preact is not None and (not removed or self.shortcut_from_preact)
        h = self.preact(x) if need_h else x
        s = self.shortcut(h if self.shortcut_from_preact else x)
        if removed:
            return self.merge(s, None)
        f = self._scale(self._run_branch(h), gate.mask)
        if self.route == "branch":
            s = tree_map(torch.Tensor.detach, s)
        elif self.route == "shortcut":
            f = tree_map(torch.Tensor.detach, f)
        elif self.route != "both":
            raise ValueError(f"route must be one of {ROUTES}, got {self.route!r}")
        elif self._may_overwrite(f, s, x, h):
            return self.merge.forward_inplace(s, f)
        return self.merge(s, f)

    def _run_branch(self, h: Any) -> Any:
        if self.compiled_branch is None:
            return self.branch(h)
        return _compiled_caller(self.compiled_branch)(self.branch, h)

    def _may_overwrite(self, f: Any, s: Any, x: Any, h: Any) -> bool:
        """Whether the merge may write into the branch output ``f``: route "both" (the caller's
        check), a merge with ``forward_inplace``, ``f`` a fresh tensor (not the unit's input, its
        pre-activation, the shortcut, a view or a leaf), and no hook that could hold or wrap ``f``
        (forward or backward hooks on the branch's modules, any hook on the merge, global module
        hooks): then nothing but the merge reads it.
        Lesions never get here (the branch is not run) and routed gradients take the reference merge."""
        if not (self.inplace_merge and getattr(self.merge, "supports_inplace", False)):
            return False
        if not isinstance(f, torch.Tensor) or not isinstance(s, torch.Tensor):
            return False
        if f is x or f is h or f is s or f._base is not None or (f.requires_grad and f.grad_fn is None):
            return False
        if f.shape != s.shape or f.dtype != s.dtype or f.stride() != s.stride():
            return False  # broadcasting, promotion or another memory layout: the reference merge decides
        if _has_global_hooks() or _hooked(self.merge, pre=True):
            return False
        return not _any_hooked(self.branch)

    def _scale(self, f: Any, mask: torch.Tensor | None) -> Any:
        if mask is not None:
            return tree_map(lambda t: t * mask, f)
        if not self.training and self.sd_mode != "off" and self.sd_scale == "test" and self.survival_prob < 1.0:
            p = float(self.survival_prob)
            return tree_map(lambda t: t * p, f)
        return f

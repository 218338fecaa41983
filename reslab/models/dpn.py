"""Dual Path Networks (Chen et al. 2017, arXiv 1707.01629) as stacks of residual units.

The state between units is a :class:`DualPathState` ``(resid, dense)``: a residual path of fixed
width ``bw`` per stage and a densely connected path that grows by ``inc`` channels per unit. One
unit (the block of the official MXNet code cypw/DPNs, also in the Cadene and timm ports) is a
:class:`~reslab.models.units.ResidualUnit` with

* ``preact``: :class:`DualPathConcat`, the parameter-free ``x_in = cat(resid, dense)`` shared by
  the projection and the branch (computed once per unit);
* ``shortcut``: :class:`DualPathIdentity` (both paths pass unchanged) or, for the first unit of a
  stage, :class:`DualPathProjection` (``c1x1_w``: BN-ReLU-1x1 conv, stride 1 "proj" in the first
  stage, stride 2 "down" after, output ``bw + 2*inc`` channels split into ``(resid0, dense0)``);
* ``branch``: :class:`DualPathBranch`, the pre-activation ``c1x1_a`` (1x1) - ``c3x3_b`` (grouped
  3x3, stride) - ``c1x1_c`` (1x1 to ``bw + inc``) stack, returning ``(resid_inc, dense_inc)``;
* ``merge``: :class:`DualPathMerge`, ``(resid0 + resid_inc, cat(dense0, dense_inc))``. A removed
  branch (lesion, closed stochastic-depth gate) gives no residual update and a ZERO dense
  increment of ``inc`` channels, so every later unit still sees the shapes it was built for.

Stochastic depth: the gate multiplies the whole increment ``(resid_inc, dense_inc)`` (``tree_map``
scales both slices), and test-time scaling by ``p`` scales both. A dropped unit contributes zeros
to the dense path during training, so ``p * dense_inc`` is the training-time expectation of those
channels, exactly as for the residual slice; leaving the dense slice unscaled would feed later
units larger dense features at test time than they saw on average in training. (Chen et al. do not
use stochastic depth; this is reslab's choice.)

Names inside a block follow the Cadene/timm ports (``c1x1_w`` for the projection, ``c1x1_a``,
``c3x3_b``, ``c1x1_c``; ``c1x1_c1``/``c1x1_c2`` in the 'b' variant; each with ``bn``, ``act``,
``conv``), so :func:`from_timm_dpn` maps pretrained weights key by key. BatchNorm eps is 1e-3
everywhere (cypw convention). The classifier is a ``Linear`` (same parameter count as the 1x1-conv
classifier of Cadene/timm; :func:`from_timm_dpn` reshapes its weight). Pooling is a plain global
average (no test-time pooling). Weights are initialised like reslab's ResNets (Kaiming normal,
fan-out), not with PyTorch's default as in timm.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from reslab.models.base import ResidualNetBase, Stage, check_model_args, he_init_
from reslab.models.layers import ClassifierHead
from reslab.models.registry import register_model
from reslab.models.units import ResidualUnit

BN_EPS = 1e-3
IMAGENET_INPUT = (3, 224, 224)
CIFAR_INPUT = (3, 32, 32)
STEMS = ("imagenet", "imagenet_small", "cifar")


class DualPathState(NamedTuple):
    """The state between DPN units: residual path (``bw`` channels) and dense path."""

    resid: torch.Tensor
    dense: torch.Tensor


def _cat(x: torch.Tensor | DualPathState) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.cat((x.resid, x.dense), dim=1)


# ---- layers -------------------------------------------------------------------------------
class BnAct(nn.Module):
    """BatchNorm (eps 1e-3) + ReLU; a :class:`DualPathState` input is concatenated first."""

    def __init__(self, chs: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(chs, eps=BN_EPS)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor | DualPathState) -> torch.Tensor:
        return self.act(self.bn(_cat(x)))


class BnActConv2d(nn.Module):
    """Pre-activation convolution: BN (eps 1e-3) - ReLU - conv (no bias, padding k//2)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_chs, eps=BN_EPS)
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2,
                              groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.bn(x)))


class DualPathConcat(nn.Module):
    """``cat(resid, dense)`` (parameter-free); a plain tensor (the stem output) passes through."""

    def forward(self, x: torch.Tensor | DualPathState) -> torch.Tensor:
        return _cat(x)


class DualPathIdentity(nn.Module):
    """The shortcut of a normal DPN unit: both paths unchanged."""

    def forward(self, x: DualPathState) -> DualPathState:
        if not isinstance(x, DualPathState):
            raise ValueError("a normal DPN unit needs a DualPathState input; the first unit of a network "
                             "or stage must be a projection unit")
        return x


class DualPathProjection(nn.Module):
    """The shortcut of a 'proj' (stride 1) or 'down' (stride 2) unit: BN-ReLU-1x1 conv of the
    concatenated input to ``bw + 2*inc`` channels; the first ``bw`` are the residual path."""

    def __init__(self, in_chs: int, bw: int, inc: int, stride: int) -> None:
        super().__init__()
        self.bw, self.inc, self.stride = bw, inc, stride
        self.c1x1_w = BnActConv2d(in_chs, bw + 2 * inc, 1, stride)

    def forward(self, x_in: torch.Tensor) -> DualPathState:
        w = self.c1x1_w(x_in)
        return DualPathState(w[:, : self.bw], w[:, self.bw:])

    def extra_repr(self) -> str:
        return f"bw={self.bw}, inc={self.inc}, stride={self.stride}"


class DualPathBranch(nn.Module):
    """The residual function of a DPN unit: ``c1x1_a`` (1x1 to ``r``), ``c3x3_b`` (3x3, ``groups``,
    ``stride``), ``c1x1_c`` (1x1 to ``bw + inc``), all BN-ReLU-conv; output ``(resid_inc,
    dense_inc)``. ``b=True`` is the 'b' variant (one shared BN-ReLU ``c1x1_c``, then two 1x1 convs
    ``c1x1_c1`` (bw) and ``c1x1_c2`` (inc)): a re-parameterisation of the same function."""

    def __init__(self, in_chs: int, r: int, bw: int, inc: int, groups: int, stride: int = 1, b: bool = False) -> None:
        super().__init__()
        if r % groups:
            raise ValueError(f"the 3x3 width {r} is not divisible by groups={groups}; choose k_r so that R is "
                             "a multiple of the groups")
        self.bw, self.inc, self.b = bw, inc, b
        self.c1x1_a = BnActConv2d(in_chs, r, 1)
        self.c3x3_b = BnActConv2d(r, r, 3, stride, groups)
        if b:
            self.c1x1_c: nn.Module = BnAct(r)
            self.c1x1_c1: nn.Module | None = nn.Conv2d(r, bw, 1, bias=False)
            self.c1x1_c2: nn.Module | None = nn.Conv2d(r, inc, 1, bias=False)
        else:
            self.c1x1_c = BnActConv2d(r, bw + inc, 1)
            self.c1x1_c1 = self.c1x1_c2 = None

    def forward(self, x_in: torch.Tensor) -> DualPathState:
        h = self.c1x1_c(self.c3x3_b(self.c1x1_a(x_in)))
        if self.c1x1_c1 is not None:
            return DualPathState(self.c1x1_c1(h), self.c1x1_c2(h))
        return DualPathState(h[:, : self.bw], h[:, self.bw:])

    @torch.no_grad()
    def scale_output_(self, factor: float) -> None:
        """Multiply both output slices by ``factor`` (folds stochastic-depth scaling into the last
        convolution(s); the branch ends in a bias-free conv, so this is exact)."""
        convs = [self.c1x1_c1, self.c1x1_c2] if self.c1x1_c1 is not None else [self.c1x1_c.conv]
        for conv in convs:
            conv.weight.mul_(factor)


class DualPathMerge(nn.Module):
    """``(resid0 + resid_inc, cat(dense0, dense_inc))``; with no branch (``f is None``) the
    residual path is unchanged and the dense path gets ``inc`` zero channels."""

    def __init__(self, inc: int) -> None:
        super().__init__()
        self.inc = inc

    def forward(self, s: DualPathState | None, f: DualPathState | None) -> DualPathState:
        assert s is not None, "DPN units always have a shortcut"
        if f is None:
            d = s.dense
            zeros = d.new_zeros((d.shape[0], self.inc, *d.shape[2:]))
            return DualPathState(s.resid, torch.cat((d, zeros), dim=1))
        return DualPathState(s.resid + f.resid, torch.cat((s.dense, f.dense), dim=1))

    def extra_repr(self) -> str:
        return f"inc={self.inc}"


# ---- configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class DPNStageSpec:
    """One stage: ``depth`` units, residual width ``bw``, 1x1/3x3 width ``r``, dense increment
    ``inc``; the first unit projects with ``stride`` (1: 'proj', 2: 'down')."""

    depth: int
    bw: int
    r: int
    inc: int
    stride: int


@dataclass(frozen=True)
class DPNSpec:
    """A whole DPN: stages, 3x3 groups, stem kind (``imagenet``: 7x7/2 + max-pool;
    ``imagenet_small``: 3x3/2 + max-pool (DPN-68); ``cifar``: 3x3/1, no pool), stem width,
    'b' variant."""

    stages: tuple[DPNStageSpec, ...]
    groups: int = 32
    stem: str = "imagenet"
    stem_chs: int = 64
    b: bool = False

    def __post_init__(self) -> None:
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        if not self.stages:
            raise ValueError("a DPN needs at least one stage")
        if self.groups < 1 or self.stem_chs < 1:
            raise ValueError(f"groups and stem_chs must be >= 1, got {self.groups}, {self.stem_chs}")
        for s in self.stages:
            if min(s.depth, s.bw, s.r, s.inc, s.stride) < 1:
                raise ValueError(f"DPN stage sizes must be >= 1, got {s}")
            if s.r % self.groups:
                raise ValueError(f"the 3x3 width {s.r} is not divisible by groups={self.groups}; "
                                 "choose k_r so that R is a multiple of the groups")


def dpn_spec(k_r: int, groups: int, k_sec: tuple[int, ...], inc_sec: tuple[int, ...], init_features: int,
             small: bool = False, stem: str | None = None, b: bool = False) -> DPNSpec:
    """The official parameterisation: ``bw = 64 * f * 2^i`` (f = 1 for 'small', else 4),
    ``R = k_r * bw / (64 * f)``; stage strides 1, 2, 2, 2."""
    if len(k_sec) != len(inc_sec):
        raise ValueError(f"k_sec and inc_sec need one entry per stage, got {len(k_sec)} and {len(inc_sec)}")
    f = 1 if small else 4
    stages = []
    for i, (n, inc) in enumerate(zip(k_sec, inc_sec)):
        bw = 64 * f * 2 ** i
        stages.append(DPNStageSpec(n, bw, k_r * bw // (64 * f), inc, 1 if i == 0 else 2))
    stem = stem or ("imagenet_small" if small else "imagenet")
    return DPNSpec(tuple(stages), groups, stem, init_features, b)


def cifar_dpn_spec(k_sec: tuple[int, ...], b: bool = False) -> DPNSpec:
    """CIFAR DPN with kuangliu/pytorch-cifar's widths (R 96/192/384/768, bw 256/512/1024/2048,
    inc 16/32/24/128, groups 32, 3x3/1 stem of 64 channels, strides 1, 2, 2, 2) but the OFFICIAL
    block: pre-activation, projection to ``bw + 2*inc`` (kuangliu: post-activation, projection to
    ``bw + inc``, one ``inc`` fewer per stage)."""
    if len(k_sec) != 4:
        raise ValueError(f"a CIFAR DPN has 4 stages, got {len(k_sec)} depths")
    widths = ((96, 256, 16), (192, 512, 32), (384, 1024, 24), (768, 2048, 128))
    stages = tuple(DPNStageSpec(n, bw, r, inc, 1 if i == 0 else 2)
                   for i, (n, (r, bw, inc)) in enumerate(zip(k_sec, widths)))
    return DPNSpec(stages, 32, "cifar", 64, b)


def _stem(kind: str, in_chans: int, chs: int) -> tuple[nn.Sequential, int]:
    L: OrderedDict[str, nn.Module] = OrderedDict()
    if kind == "cifar":
        L["conv"] = nn.Conv2d(in_chans, chs, 3, stride=1, padding=1, bias=False)
    else:
        k = 3 if kind == "imagenet_small" else 7
        L["conv"] = nn.Conv2d(in_chans, chs, k, stride=2, padding=k // 2, bias=False)
    L["bn"] = nn.BatchNorm2d(chs, eps=BN_EPS)
    L["act"] = nn.ReLU(inplace=True)
    if kind != "cifar":
        L["pool"] = nn.MaxPool2d(3, stride=2, padding=1)
    return nn.Sequential(L), (1 if kind == "cifar" else 4)


# ---- network ------------------------------------------------------------------------------
class DPN(ResidualNetBase):
    """Dual Path Network built from a :class:`DPNSpec` (Chen et al. 2017).

    Stage outputs are :class:`DualPathState` pairs; ``feature_info[i]['num_chs']`` is the
    concatenated width ``bw + (depth + 2) * inc`` and :meth:`forward_stages` returns the
    concatenated tensors. ``final_norm`` is BN-ReLU of the concatenation.
    """

    def __init__(self, spec: DPNSpec, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__()
        check_model_args(num_classes, in_chans, drop_rate)
        self.spec = spec
        self.num_classes = num_classes
        self.stem, red = _stem(spec.stem, in_chans, spec.stem_chs)
        chs = spec.stem_chs
        stages, self.feature_info = [], []
        for si, st in enumerate(spec.stages):
            units = []
            for ui in range(st.depth):
                units.append(self._unit(spec, chs, st, si, ui))
                chs = st.bw + (ui + 3) * st.inc
            red *= st.stride
            stages.append(Stage(units))
            self.feature_info.append(dict(num_chs=chs, reduction=red, module=f"stages.{si}"))
        self.stages = nn.ModuleList(stages)
        self.final_norm = BnAct(chs)
        self.num_features = chs
        self.head = ClassifierHead(chs, num_classes, drop_rate)
        he_init_(self)
        self._finish_init()

    @staticmethod
    def _unit(spec: DPNSpec, in_chs: int, st: DPNStageSpec, si: int, ui: int) -> ResidualUnit:
        first = ui == 0
        stride = st.stride if first else 1
        shortcut: nn.Module = DualPathProjection(in_chs, st.bw, st.inc, stride) if first else DualPathIdentity()
        branch = DualPathBranch(in_chs, st.r, st.bw, st.inc, spec.groups, stride, spec.b)
        return ResidualUnit(branch, shortcut, DualPathMerge(st.inc), preact=DualPathConcat(),
                            shortcut_from_preact=first, stage=si, index=ui, downsample=first)

    def feature_tensor(self, state: torch.Tensor | DualPathState) -> torch.Tensor:
        """A stage state as one tensor ``cat(resid, dense)`` (forward_intermediates hook, base.py)."""
        return _cat(state)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output as one tensor ``cat(resid, dense)`` (``feature_info`` channels)."""
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(_cat(x))
        return outs


# ---- 'b' variant and pretrained weights ---------------------------------------------------
def convert_dpn_b(model: DPN, b: bool) -> DPN:
    """Re-parameterise every unit of ``model`` in place to the 'b' variant (``b=True``: shared
    BN-ReLU, then ``c1x1_c1`` (bw) and ``c1x1_c2`` (inc)) or back (``b=False``: one ``c1x1_c``
    conv whose weight is the concatenation). Bit-exact; returns ``model``."""
    if not isinstance(model, DPN):
        raise ValueError(f"convert_dpn_b needs a DPN, got {type(model).__name__}")
    for unit in model.residual_units():
        unit.branch = convert_dpn_branch(unit.branch, b)
    model.spec = DPNSpec(model.spec.stages, model.spec.groups, model.spec.stem, model.spec.stem_chs, b)
    return model


def convert_dpn_branch(branch: DualPathBranch, b: bool) -> DualPathBranch:
    """The same branch in the 'b' (``b=True``) or normal layout, modified in place and returned."""
    if branch.b == b:
        return branch
    with torch.no_grad():
        if b:
            old = branch.c1x1_c
            w = old.conv.weight
            c1 = nn.Conv2d(w.shape[1], branch.bw, 1, bias=False).to(w.device, w.dtype)
            c2 = nn.Conv2d(w.shape[1], branch.inc, 1, bias=False).to(w.device, w.dtype)
            c1.weight.copy_(w[: branch.bw])
            c2.weight.copy_(w[branch.bw:])
            bnact = BnAct(w.shape[1])
            bnact.bn = old.bn
            branch.c1x1_c, branch.c1x1_c1, branch.c1x1_c2 = bnact, c1, c2
        else:
            w1, w2 = branch.c1x1_c1.weight, branch.c1x1_c2.weight
            conv = BnActConv2d(w1.shape[1], branch.bw + branch.inc, 1).to(w1.device, w1.dtype)
            conv.bn = branch.c1x1_c.bn
            conv.conv.weight.copy_(torch.cat((w1, w2), dim=0))
            branch.c1x1_c, branch.c1x1_c1, branch.c1x1_c2 = conv, None, None
    branch.b = b
    return branch


_TIMM_BLOCK = re.compile(
    r"^features\.conv(\d+)_(\d+)\.(c1x1_w_s1|c1x1_w_s2|c1x1_a|c3x3_b|c1x1_c1|c1x1_c2|c1x1_c)\.(.+)$")


def from_timm_dpn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a timm (``features.conv{s}_{j}...``, ``classifier``) or Cadene DPN state dict to
    reslab's keys (``stem``, ``stages.{s-2}.units.{j-1}.{shortcut,branch}...``, ``final_norm``,
    ``head.fc``); the 1x1-conv classifier weight becomes a Linear weight. Tensors are not copied."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        m = _TIMM_BLOCK.match(k)
        if m:
            s, j, name, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            if name.startswith("c1x1_w"):
                key = f"stages.{s - 2}.units.{j - 1}.shortcut.c1x1_w.{rest}"
            else:
                key = f"stages.{s - 2}.units.{j - 1}.branch.{name}.{rest}"
        elif k.startswith("features.conv1_1."):
            key = "stem." + k[len("features.conv1_1."):]
        elif k.startswith("features.conv5_bn_ac.bn."):
            key = "final_norm.bn." + k[len("features.conv5_bn_ac.bn."):]
        elif k in ("classifier.weight", "last_linear.weight"):
            key, v = "head.fc.weight", v.reshape(v.shape[0], -1)
        elif k in ("classifier.bias", "last_linear.bias"):
            key = "head.fc.bias"
        else:
            raise ValueError(f"unexpected key {k!r} in a timm/Cadene DPN state dict; is this a DPN checkpoint?")
        out[key] = v
    return out


def to_timm_dpn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`from_timm_dpn` for a 4-stage reslab DPN state dict (timm layout)."""
    out: dict[str, torch.Tensor] = {}
    pat = re.compile(r"^stages\.(\d+)\.units\.(\d+)\.(shortcut|branch)\.(\w+)\.(.+)$")
    for k, v in state_dict.items():
        m = pat.match(k)
        if m:
            si, ui, part, name, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4), m.group(5)
            if part == "shortcut":
                name = "c1x1_w_s1" if si == 0 else "c1x1_w_s2"
            out[f"features.conv{si + 2}_{ui + 1}.{name}.{rest}"] = v
        elif k.startswith("stem."):
            out["features.conv1_1." + k[len("stem."):]] = v
        elif k.startswith("final_norm.bn."):
            out["features.conv5_bn_ac.bn." + k[len("final_norm.bn."):]] = v
        elif k == "head.fc.weight":
            out["classifier.weight"] = v.reshape(*v.shape, 1, 1)
        elif k == "head.fc.bias":
            out["classifier.bias"] = v
        else:
            raise ValueError(f"unexpected key {k!r} in a reslab DPN state dict")
    return out


# ---- entry points -------------------------------------------------------------------------
_IMAGENET_CONFIGS: dict[str, dict[str, Any]] = {
    # name: k_r, groups, k_sec, inc_sec, init features, small (papers.md section 8; timm dpn.py)
    "dpn68": dict(k_r=128, groups=32, k_sec=(3, 4, 12, 3), inc_sec=(16, 32, 32, 64), init_features=10, small=True),
    "dpn92": dict(k_r=96, groups=32, k_sec=(3, 4, 20, 3), inc_sec=(16, 32, 24, 128), init_features=64),
    "dpn98": dict(k_r=160, groups=40, k_sec=(3, 6, 20, 3), inc_sec=(16, 32, 32, 128), init_features=96),
    "dpn107": dict(k_r=200, groups=50, k_sec=(4, 8, 20, 3), inc_sec=(20, 64, 64, 128), init_features=128),
    "dpn131": dict(k_r=160, groups=40, k_sec=(4, 8, 28, 3), inc_sec=(16, 32, 32, 128), init_features=128),
}


def _imagenet_entry(name: str, doc: str):
    cfg = _IMAGENET_CONFIGS[name]

    def fn(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, b: bool = False) -> DPN:
        return DPN(dpn_spec(**cfg, b=b), num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)

    fn.__name__ = name
    fn.__qualname__ = name
    fn.__doc__ = doc
    return register_model(fn, input_size=IMAGENET_INPUT)


dpn68 = _imagenet_entry("dpn68", "DPN-68 (Chen et al. 2017): small (3x3/2 stem, 10 features), k_R 128, G 32; "
                                 "final 832 channels; 12,611,602 parameters at 1000 classes (timm).")
dpn92 = _imagenet_entry("dpn92", "DPN-92 (Chen et al. 2017): k_R 96, G 32, blocks (3,4,20,3), inc (16,32,24,128); "
                                 "final 2688 channels.")
dpn98 = _imagenet_entry("dpn98", "DPN-98 (Chen et al. 2017): k_R 160, G 40, blocks (3,6,20,3).")
dpn107 = _imagenet_entry("dpn107", "DPN-107 (Chen et al. 2017): k_R 200, G 50, blocks (4,8,20,3).")
dpn131 = _imagenet_entry("dpn131", "DPN-131 (Chen et al. 2017): k_R 160, G 40, blocks (4,8,28,3).")


@register_model(input_size=CIFAR_INPUT)
def cifar_dpn26(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, b: bool = False) -> DPN:
    """DPN-26 for CIFAR: kuangliu's widths, blocks (2,2,2,2), with the official pre-activation block
    (projection to bw + 2*inc; final 2560 channels, kuangliu's has 2432)."""
    return DPN(cifar_dpn_spec((2, 2, 2, 2), b), num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


@register_model(input_size=CIFAR_INPUT)
def cifar_dpn92(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, b: bool = False) -> DPN:
    """DPN-92 for CIFAR: kuangliu's widths, blocks (3,4,20,3), with the official pre-activation block
    (projection to bw + 2*inc; final 2688 channels as DPN-92, kuangliu's has 2560)."""
    return DPN(cifar_dpn_spec((3, 4, 20, 3), b), num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


__all__ = [
    "DualPathState", "DualPathConcat", "DualPathIdentity", "DualPathProjection", "DualPathBranch",
    "DualPathMerge", "BnAct", "BnActConv2d", "DPN", "DPNSpec", "DPNStageSpec", "dpn_spec", "cifar_dpn_spec",
    "convert_dpn_b", "convert_dpn_branch", "from_timm_dpn", "to_timm_dpn",
    "dpn68", "dpn92", "dpn98", "dpn107", "dpn131", "cifar_dpn26", "cifar_dpn92",
]

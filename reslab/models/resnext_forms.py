"""The three equivalent forms of the ResNeXt bottleneck, and exact converters between them.

Xie et al. 2017 (arXiv 1611.05431, Fig. 3) show one aggregated transformation in three forms:

* **(a) split-transform-merge** (:class:`SplitTransformMergeBranch`): ``C`` explicit paths, each
  1x1 (Cin -> d) - BN - ReLU - 3x3 (d -> d) - BN - ReLU - 1x1 (d -> Cout); the paths are summed and
  ONE BatchNorm follows the sum.
* **(b) early concatenation** (:class:`EarlyConcatBranch`): ``C`` paths of 1x1 + 3x3 (each with
  BN - ReLU), concatenated, then one 1x1 (C*d -> Cout) and BN. This is ``resnext_bottleneck_B`` of
  the official Torch code.
* **(c) grouped convolution** (:class:`GroupedBranch`): dense 1x1 (Cin -> C*d), 3x3 with
  ``groups=C``, 1x1 (C*d -> Cout). This is the branch reslab's ResNet engine builds
  (``reslab.models.resnet._branch``; same module names ``conv1 bn1 act1 conv2 bn2 act2 conv3 bn3``),
  and ``resnext_bottleneck_C`` of the official code.

In every form the FIRST 1x1 of each path sees all input channels; only the 3x3 is grouped. BN and
ReLU in the hidden layers act per channel, so they are branch-local and the forms compute the same
function once the weights are mapped (:func:`convert_branch`): the first 1x1 and 3x3 weights and the
hidden BN parameters/statistics of the paths are concatenated along the output channels, the last
1x1 weights of the paths (form a) along the input channels, and per-path biases of the last 1x1 (if
any) are summed. Converters copy weights, they never re-initialise: PyTorch's fan computation for a
grouped conv uses the *total* output channels (fan_out = C*d*k*k), so a re-initialised form (c)
would differ from forms (a)/(b) in fan-out mode (experiments.md section 6.2).

Forms (a) and (b) loop over ``C`` Python-level paths: slow and memory-hungry. Train with form (c);
use (a) and (b) for tests and analysis.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, NamedTuple

import torch
import torch.nn as nn

FORMS = ("a", "b", "c")
_FORM_NAMES = {"a": "split-transform-merge", "b": "early concatenation", "c": "grouped convolution"}


# ---- complexity ---------------------------------------------------------------------------
class BottleneckTemplate(NamedTuple):
    """A bottleneck template of Xie et al. 2017 Table 2: input / output channels, the width of the
    1x64d baseline (cardinality 1) and the kernel of the middle convolution."""

    in_chs: int
    out_chs: int
    width: int = 64
    kernel_size: int = 3


#: The conv2 template of ResNet-50 (256 -> 64 -> 64 -> 256), about 70k parameters.
RESNET50_CONV2 = BottleneckTemplate(256, 256, 64, 3)


def bottleneck_params(template: BottleneckTemplate | tuple[int, ...], cardinality: int, width: int) -> int:
    """Convolution weights of one bottleneck with ``cardinality`` paths of width ``width``:
    ``C * (Cin*d + k*k*d*d + d*Cout)`` (Xie et al. 2017 section 3.3; BN parameters not counted)."""
    t = BottleneckTemplate(*template)
    if cardinality < 1 or width < 1:
        raise ValueError(f"cardinality and width must be >= 1, got {cardinality}, {width}")
    k2 = t.kernel_size * t.kernel_size
    return cardinality * (t.in_chs * width + k2 * width * width + width * t.out_chs)


def cardinality_for_complexity(template: BottleneckTemplate | tuple[int, ...], cardinality: int) -> int:
    """The path width ``d`` whose ``C x d`` bottleneck has the parameter count closest to the
    template's ``1 x width`` baseline (ties: the smaller ``d``).

    For ResNet-50's conv2 template this gives the paper's 1x64d, 2x40d, 4x24d, 8x14d, 32x4d
    (Xie et al. 2017 Table 2).
    """
    t = BottleneckTemplate(*template)
    if cardinality < 1:
        raise ValueError(f"cardinality must be >= 1, got {cardinality}")
    if t.width < 1 or t.in_chs < 1 or t.out_chs < 1 or t.kernel_size < 1:
        raise ValueError(f"template sizes must be >= 1, got {tuple(t)}")
    target = bottleneck_params(t, 1, t.width)
    best = min(range(1, t.width + 1), key=lambda d: (abs(bottleneck_params(t, cardinality, d) - target), d))
    return best


# ---- building blocks ----------------------------------------------------------------------
def _bn(chs: int, ref: nn.BatchNorm2d | None = None) -> nn.BatchNorm2d:
    if ref is None:
        return nn.BatchNorm2d(chs)
    return nn.BatchNorm2d(chs, eps=ref.eps, momentum=ref.momentum, affine=ref.affine,
                          track_running_stats=ref.track_running_stats)


def _check_sizes(in_chs: int, out_chs: int, cardinality: int, width: int, stride: int, drop_rate: float) -> None:
    if min(in_chs, out_chs, cardinality, width, stride) < 1:
        raise ValueError(f"in_chs, out_chs, cardinality, width and stride must be >= 1, got "
                         f"{in_chs}, {out_chs}, {cardinality}, {width}, {stride}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")


class _FormBase(nn.Module):
    form: str = ""

    def _set_config(self, in_chs: int, out_chs: int, cardinality: int, width: int, stride: int,
                    final_bn: bool, bias: bool, drop_rate: float) -> None:
        _check_sizes(in_chs, out_chs, cardinality, width, stride, drop_rate)
        self.in_chs, self.out_chs, self.cardinality, self.width = in_chs, out_chs, cardinality, width
        self.stride, self.final_bn, self.bias, self.drop_rate = stride, final_bn, bias, drop_rate

    def extra_repr(self) -> str:
        return (f"form={self.form!r}, {self.in_chs}->{self.out_chs}, {self.cardinality}x{self.width}d, "
                f"stride={self.stride}")


def _hidden_path(in_chs: int, width: int, stride: int, last_out: int | None, bias: bool,
                 drop_rate: float) -> nn.Sequential:
    """One path: 1x1 (in -> d) BN ReLU, 3x3 (d -> d) BN ReLU [, dropout, 1x1 (d -> last_out)]."""
    L: OrderedDict[str, nn.Module] = OrderedDict()
    L["conv1"] = nn.Conv2d(in_chs, width, 1, bias=False)
    L["bn1"] = nn.BatchNorm2d(width)
    L["act1"] = nn.ReLU(inplace=True)
    L["conv2"] = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
    L["bn2"] = nn.BatchNorm2d(width)
    L["act2"] = nn.ReLU(inplace=True)
    if last_out is not None:
        if drop_rate > 0:
            L["drop"] = nn.Dropout(drop_rate)
        L["conv3"] = nn.Conv2d(width, last_out, 1, bias=bias)
    return nn.Sequential(L)


class SplitTransformMergeBranch(_FormBase):
    """Form (a): ``y = BN(sum_i T_i(x))`` with ``C`` paths ``T_i`` = 1x1-BN-ReLU-3x3-BN-ReLU-1x1.

    ``final_bn=False`` drops the BN after the sum (pre-activation bottlenecks have none).
    ``bias=True`` gives every path's last 1x1 a bias (their sum is form (c)'s bias). Dropout
    (``drop_rate``) acts per path, so in training it matches form (c) in distribution, not draw
    for draw.
    """

    form = "a"

    def __init__(self, in_chs: int, out_chs: int, cardinality: int, width: int, stride: int = 1,
                 final_bn: bool = True, bias: bool = False, drop_rate: float = 0.0) -> None:
        super().__init__()
        self._set_config(in_chs, out_chs, cardinality, width, stride, final_bn, bias, drop_rate)
        self.paths = nn.ModuleList(
            _hidden_path(in_chs, width, stride, out_chs, bias, drop_rate) for _ in range(cardinality))
        self.bn3 = nn.BatchNorm2d(out_chs) if final_bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.paths[0](x)
        for path in self.paths[1:]:
            y = y + path(x)
        return self.bn3(y) if self.bn3 is not None else y


class EarlyConcatBranch(_FormBase):
    """Form (b): ``y = BN(W3 * cat_i(P_i(x)))`` with ``C`` paths ``P_i`` = 1x1-BN-ReLU-3x3-BN-ReLU
    (``resnext_bottleneck_B`` of the official Torch code)."""

    form = "b"

    def __init__(self, in_chs: int, out_chs: int, cardinality: int, width: int, stride: int = 1,
                 final_bn: bool = True, bias: bool = False, drop_rate: float = 0.0) -> None:
        super().__init__()
        self._set_config(in_chs, out_chs, cardinality, width, stride, final_bn, bias, drop_rate)
        self.paths = nn.ModuleList(
            _hidden_path(in_chs, width, stride, None, bias, drop_rate) for _ in range(cardinality))
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else None
        self.conv3 = nn.Conv2d(cardinality * width, out_chs, 1, bias=bias)
        self.bn3 = nn.BatchNorm2d(out_chs) if final_bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([path(x) for path in self.paths], dim=1)
        if self.drop is not None:
            h = self.drop(h)
        y = self.conv3(h)
        return self.bn3(y) if self.bn3 is not None else y


class GroupedBranch(nn.Sequential):
    """Form (c): dense 1x1 (Cin -> C*d), BN, ReLU, 3x3 with ``groups=C`` (stride here), BN, ReLU,
    1x1 (C*d -> Cout) [, BN]. Module names and order equal the bottleneck branch of reslab's ResNet
    engine, so a converted branch loads the engine's state dict."""

    form = "c"

    def __init__(self, in_chs: int, out_chs: int, cardinality: int, width: int, stride: int = 1,
                 final_bn: bool = True, bias: bool = False, drop_rate: float = 0.0) -> None:
        _check_sizes(in_chs, out_chs, cardinality, width, stride, drop_rate)
        mid = cardinality * width
        L: OrderedDict[str, nn.Module] = OrderedDict()
        L["conv1"] = nn.Conv2d(in_chs, mid, 1, bias=False)
        L["bn1"] = nn.BatchNorm2d(mid)
        L["act1"] = nn.ReLU(inplace=True)
        L["conv2"] = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        L["bn2"] = nn.BatchNorm2d(mid)
        L["act2"] = nn.ReLU(inplace=True)
        if drop_rate > 0:
            L["drop"] = nn.Dropout(drop_rate)
        L["conv3"] = nn.Conv2d(mid, out_chs, 1, bias=bias)
        if final_bn:
            L["bn3"] = nn.BatchNorm2d(out_chs)
        super().__init__(L)
        self.in_chs, self.out_chs, self.cardinality, self.width = in_chs, out_chs, cardinality, width
        self.stride, self.final_bn, self.bias, self.drop_rate = stride, final_bn, bias, drop_rate


_FORM_CLASSES: dict[str, type[nn.Module]] = {
    "a": SplitTransformMergeBranch, "b": EarlyConcatBranch, "c": GroupedBranch}


def make_branch(form: str, in_chs: int, out_chs: int, cardinality: int, width: int, stride: int = 1,
                final_bn: bool = True, bias: bool = False, drop_rate: float = 0.0) -> nn.Module:
    """A fresh (PyTorch-default initialised) branch of the given form."""
    _check_form(form)
    return _FORM_CLASSES[form](in_chs, out_chs, cardinality, width, stride, final_bn, bias, drop_rate)


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS} (a: split-transform-merge, b: early concatenation, "
                         f"c: grouped convolution), got {form!r}")


# ---- canonical (grouped) parameters ---------------------------------------------------------
class _Canonical(NamedTuple):
    """A branch's parameters in the grouped (form c) layout, plus its configuration."""

    in_chs: int
    out_chs: int
    cardinality: int
    width: int
    stride: int
    drop_rate: float
    w1: torch.Tensor            # (C*d, Cin, 1, 1)
    bn1: dict[str, torch.Tensor]
    w2: torch.Tensor            # (C*d, d, 3, 3)
    bn2: dict[str, torch.Tensor]
    w3: torch.Tensor            # (Cout, C*d, 1, 1)
    b3: torch.Tensor | None     # (Cout,)
    bn3: dict[str, torch.Tensor] | None
    bn_refs: tuple[nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm2d | None]
    training: bool


def branch_form(branch: nn.Module) -> str | None:
    """``'a'``, ``'b'`` or ``'c'`` for a ResNeXt/ResNet bottleneck branch in one of the three forms
    (a plain ``nn.Sequential`` with ``conv1`` 1x1, ``conv2`` 3x3, ``conv3`` 1x1 counts as form c);
    ``None`` for anything else (basic blocks, DPN blocks, ...)."""
    if isinstance(branch, (SplitTransformMergeBranch, EarlyConcatBranch)):
        return branch.form
    if isinstance(branch, nn.Sequential):
        names = dict(branch.named_children())
        convs = [names.get(k) for k in ("conv1", "conv2", "conv3")]
        if all(isinstance(c, nn.Conv2d) for c in convs):
            c1, c2, c3 = convs
            if c1.kernel_size == (1, 1) and c2.kernel_size == (3, 3) and c3.kernel_size == (1, 1):
                return "c"
    return None


def _bn_state(bn: nn.Module) -> dict[str, torch.Tensor]:
    if not isinstance(bn, nn.BatchNorm2d):
        raise ValueError(f"expected BatchNorm2d in a ResNeXt branch, found {type(bn).__name__}; "
                         "only BN-ReLU bottlenecks can be converted")
    return {k: v.detach() for k, v in bn.state_dict().items()}


def _check_relu(*acts: nn.Module | None) -> None:
    for a in acts:
        if not isinstance(a, nn.ReLU):
            raise ValueError(f"expected ReLU in a ResNeXt branch, found {type(a).__name__}; "
                             "only BN-ReLU bottlenecks can be converted")


def _cat_bn(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for k in states[0]:
        if states[0][k].dim() == 0:  # num_batches_tracked: equal for all paths trained together
            out[k] = states[0][k].clone()
        else:
            out[k] = torch.cat([s[k] for s in states], dim=0)
    return out


def _slice_bn(state: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    return {k: (v.clone() if v.dim() == 0 else v[lo:hi].clone()) for k, v in state.items()}


def _drop_rate(mod: nn.Module | None) -> float:
    return float(mod.p) if isinstance(mod, nn.Dropout) else 0.0


def _canonical(branch: nn.Module) -> _Canonical:
    form = branch_form(branch)
    if form is None:
        raise ValueError(f"{type(branch).__name__} is not a ResNeXt bottleneck branch in form a, b or c; "
                         "pass a bottleneck branch (conv1 1x1, grouped conv2 3x3, conv3 1x1)")
    if form == "c":
        m = dict(branch.named_children())
        c1, c2, c3 = m["conv1"], m["conv2"], m["conv3"]
        C = c2.groups
        if c1.groups != 1:
            raise ValueError("the first 1x1 of a ResNeXt branch must be dense (groups=1); a grouped first "
                             "1x1 is not one of the equivalent forms")
        if c1.stride != (1, 1) or c3.stride != (1, 1):
            raise ValueError("the stride of a ResNeXt branch must sit on its 3x3 conv; this branch strides "
                             "a 1x1 (build it with stride_on='3x3' to convert it)")
        if c1.bias is not None or c2.bias is not None:
            raise ValueError("only the last 1x1 of a ResNeXt branch may have a bias")
        if c2.in_channels != c2.out_channels or c2.padding != (1, 1) or c2.dilation != (1, 1):
            raise ValueError("conv2 of a ResNeXt branch must be a padded 3x3 with equal in/out channels")
        _check_relu(m.get("act1"), m.get("act2"))
        bn3 = m.get("bn3")
        bn1, bn2 = m.get("bn1"), m.get("bn2")
        return _Canonical(
            c1.in_channels, c3.out_channels, C, c2.out_channels // C, c2.stride[0], _drop_rate(m.get("drop")),
            c1.weight.detach(), _bn_state(bn1), c2.weight.detach(), _bn_state(bn2), c3.weight.detach(),
            None if c3.bias is None else c3.bias.detach(), None if bn3 is None else _bn_state(bn3),
            (bn1, bn2, bn3), branch.training)
    # forms a and b
    paths = list(branch.paths)
    for p in paths:
        _check_relu(p.act1, p.act2)
    w1 = torch.cat([p.conv1.weight.detach() for p in paths], dim=0)
    w2 = torch.cat([p.conv2.weight.detach() for p in paths], dim=0)
    bn1 = _cat_bn([_bn_state(p.bn1) for p in paths])
    bn2 = _cat_bn([_bn_state(p.bn2) for p in paths])
    if form == "a":
        w3 = torch.cat([p.conv3.weight.detach() for p in paths], dim=1)
        b3 = None
        if paths[0].conv3.bias is not None:
            b3 = paths[0].conv3.bias.detach().clone()
            for p in paths[1:]:
                b3 = b3 + p.conv3.bias.detach()
    else:
        w3 = branch.conv3.weight.detach()
        b3 = None if branch.conv3.bias is None else branch.conv3.bias.detach()
    bn3 = None if branch.bn3 is None else _bn_state(branch.bn3)
    return _Canonical(branch.in_chs, branch.out_chs, branch.cardinality, branch.width, branch.stride,
                      branch.drop_rate, w1, bn1, w2, bn2, w3, b3, bn3,
                      (paths[0].bn1, paths[0].bn2, branch.bn3), branch.training)


def _load(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    module.load_state_dict(state, strict=True)


def _build(cn: _Canonical, to: str) -> nn.Module:
    ref1, ref2, ref3 = cn.bn_refs
    new = make_branch(to, cn.in_chs, cn.out_chs, cn.cardinality, cn.width, cn.stride,
                      final_bn=cn.bn3 is not None, bias=cn.b3 is not None, drop_rate=cn.drop_rate)
    # Carry the BN hyper-parameters (eps, momentum, affine, running stats) of the source.
    if to == "c":
        new.bn1 = _bn(new.bn1.num_features, ref1)
        new.bn2 = _bn(new.bn2.num_features, ref2)
        if cn.bn3 is not None:
            new.bn3 = _bn(new.bn3.num_features, ref3)
    else:
        for p in new.paths:
            p.bn1 = _bn(cn.width, ref1)
            p.bn2 = _bn(cn.width, ref2)
        if cn.bn3 is not None:
            new.bn3 = _bn(cn.out_chs, ref3)
    new = new.to(device=cn.w1.device, dtype=cn.w1.dtype)
    d, C = cn.width, cn.cardinality
    with torch.no_grad():
        if to == "c":
            new.conv1.weight.copy_(cn.w1)
            _load(new.bn1, cn.bn1)
            new.conv2.weight.copy_(cn.w2)
            _load(new.bn2, cn.bn2)
            new.conv3.weight.copy_(cn.w3)
            if cn.b3 is not None:
                new.conv3.bias.copy_(cn.b3)
        else:
            for i, p in enumerate(new.paths):
                lo, hi = i * d, (i + 1) * d
                p.conv1.weight.copy_(cn.w1[lo:hi])
                _load(p.bn1, _slice_bn(cn.bn1, lo, hi))
                p.conv2.weight.copy_(cn.w2[lo:hi])
                _load(p.bn2, _slice_bn(cn.bn2, lo, hi))
                if to == "a":
                    p.conv3.weight.copy_(cn.w3[:, lo:hi])
                    if cn.b3 is not None:
                        # The split of a summed bias is not unique: all of it goes to path 0.
                        p.conv3.bias.copy_(cn.b3 if i == 0 else torch.zeros_like(cn.b3))
            if to == "b":
                new.conv3.weight.copy_(cn.w3)
                if cn.b3 is not None:
                    new.conv3.bias.copy_(cn.b3)
        if cn.bn3 is not None:
            _load(new.bn3, cn.bn3)
    assert C * d == cn.w1.shape[0]
    return new.train(cn.training)


def convert_branch(branch: nn.Module, to: str) -> nn.Module:
    """A new branch of form ``to`` (``'a'``, ``'b'`` or ``'c'``) computing the same function.

    Weights, biases, BN parameters and running statistics are copied (never re-initialised), the
    BN hyper-parameters, dtype, device and train/eval mode are kept; the source is not modified.
    Converting to the source's own form returns an independent copy.
    """
    _check_form(to)
    return _build(_canonical(branch), to)


def convert_resnext(model: nn.Module, form: str) -> nn.Module:
    """Swap the branch of every bottleneck unit of a reslab ResNet/ResNeXt ``model`` for its
    form-``form`` equivalent, in place; returns ``model``. Units that are not bottlenecks are
    left alone; a model without any bottleneck unit raises ``ValueError``."""
    _check_form(form)
    if not hasattr(model, "residual_units"):
        raise ValueError(f"{type(model).__name__} is not a reslab residual network (no residual_units()); "
                         "build it with reslab.create_model")
    n = 0
    for unit in model.residual_units():
        if branch_form(unit.branch) is not None:
            unit.branch = convert_branch(unit.branch, form)
            n += 1
    if n == 0:
        raise ValueError(f"{type(model).__name__} has no bottleneck units to convert; use a ResNeXt or "
                         "bottleneck ResNet (e.g. cifar_resnext29_8x64d, resnext50_32x4d)")
    return model


def count_params(branch: nn.Module, merge_biases: bool = True) -> int:
    """Trainable parameters of a branch; with ``merge_biases`` the per-path last-layer biases of
    form (a) count once (as their sum does in forms b and c)."""
    n = sum(p.numel() for p in branch.parameters())
    if merge_biases and isinstance(branch, SplitTransformMergeBranch) and branch.bias:
        n -= (branch.cardinality - 1) * branch.out_chs
    return n


def grouped_conv_fans(conv: nn.Conv2d) -> dict[str, Any]:
    """Fan-in/fan-out of a (grouped) conv as PyTorch computes them, and those of one of its
    ``groups`` per-path convs (the form a/b equivalent): fan-in agrees, PyTorch's fan-out of the
    grouped conv is ``groups`` times the per-path one (experiments.md section 6.2)."""
    k = math.prod(conv.kernel_size)
    g = conv.groups
    return dict(fan_in=conv.in_channels // g * k, fan_out=conv.out_channels * k,
                path_fan_in=conv.in_channels // g * k, path_fan_out=conv.out_channels // g * k)


__all__ = [
    "FORMS", "BottleneckTemplate", "RESNET50_CONV2", "bottleneck_params", "cardinality_for_complexity",
    "SplitTransformMergeBranch", "EarlyConcatBranch", "GroupedBranch", "make_branch", "branch_form",
    "convert_branch", "convert_resnext", "count_params", "grouped_conv_fans",
]

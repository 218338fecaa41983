"""Deeply-fused networks: merge-and-run (DMRNet / DFN-MR) and the inception-like block (DFN-IL).

Papers: Zhao, Wang, Li, Tu, Zeng, "Deep Convolutional Neural Networks with Merge-and-Run
Mappings" (arXiv 1611.07718; v1 "On the Connection of Deep Fusion to Ensembling") and Wang,
Wei, Zhang, Zeng, "Deeply-Fused Nets" (arXiv 1605.07716). Reference code: zlmzju/fusenet
(MXNet, ``network/cross.py`` = DFN-MR, ``network/half.py`` = DFN-IL).

Merge-and-run unit (two streams, state :class:`TwoStream`)::

    m   = (S1(x1) + S2(x2)) / 2          # S_i: identity, or 1x1 conv stride 2 + BN per stream
    x1' = ReLU(m + F1(x1)),  x2' = ReLU(m + F2(x2))
    F_i = Conv3x3-BN-ReLU-Conv3x3-BN     # own weights per stream

As a :class:`~reslab.models.units.ResidualUnit`: ``shortcut`` maps ``(x1, x2) -> (m, m)``,
``branch`` maps ``(x1, x2) -> (F1(x1), F2(x2))`` and ``merge`` is ``ReLU(s + f)`` per stream,
so stochastic depth, lesions and gradient routing work unchanged; a lesioned (or dropped)
unit gives ``(ReLU(m), ReLU(m))``. The network starts with ``x1 = x2 = stem(x)``; the last
unit is the CIFAR head of fusenet, ``out = ReLU(m + F1(x1) + F2(x2))`` (both streams carry
``out``), followed by global average pooling and the classifier.

DFN-IL unit (one stream): ``x' = ReLU(S(x) + F1(x) + F2(x))`` (one projection S when
downsampling, as in fusenet ``half.py``).

Depth semantics (experiments.md §4.2): fusenet's ``depth`` is the *equivalent plain depth*, an
MR/IL block counting as 4 layers; blocks per stage follow fusenet's Python-2 integer rule
(:func:`fusenet_blocks`), e.g. 110 -> (9, 9, 9), 62 -> (5, 5, 5), 98 -> (8, 8, 8), 56 -> (4, 4, 5).
The README's "depth" column is the longest path, ``2 * blocks + 2``: 56, 32 and 50 for the three
published models. Widths are ``16w, 16w, 32w, 64w`` (stem, stages); fusenet's stem already has
``16w`` channels, so the first stage has no projection even when ``w > 1``.

ImageNet variant (:class:`DMRNetImageNet`, entry points :func:`dmrnet` and :func:`dmrnet50`; the
paper's ImageNet section, built as fusenet ``network/imagenet/symbol_cross.py`` builds it):

* stem 7x7/2 conv (64) - BN - ReLU - 3x3/2 max-pool **without padding** (fusenet: ``pad=(0, 0)``;
  224 -> 112 -> 55, then 28, 14, 7 after the stages; torchvision-style ResNets pad by 1: 56);
* four stages of MR blocks with **bottleneck** branches ``F_i = 1x1 (w/4) - BN - ReLU - 3x3 (w/4,
  stride) - BN - ReLU - 1x1 (w) - BN``, stride on the 3x3 conv, widths 256/512/1024/2048, stride 1
  in stage 1 (its first block only widens 64 -> 256 through per-stream 1x1 projections + BN) and 2
  at the first block of stages 2-4;
* every block ``x_i' = ReLU(m + F_i(x_i))`` except the **last**, which has no ReLU; the head is
  ``ReLU(x1 + x2)`` -> global average pool -> fc. Unlike the CIFAR head (``ReLU(m + F1 + F2)``,
  the skip term once) this counts the skip term twice: ``ReLU(2m + F1 + F2)``.
* ``depth`` is the longest path, ``3 * blocks + 2`` (not the CIFAR code's equivalent plain depth):
  fusenet's table 26 (2, 2, 3, 1), 29 (2, 2, 4, 1), 44 (2, 2, 8, 2), 50 (3, 4, 6, 3),
  101 (3, 4, 23, 3), 152 (3, 8, 36, 3); fusenet's default is 29.

Deviations: BatchNorm uses PyTorch defaults (momentum 0.1, eps 1e-5; fusenet: MXNet momentum
0.99 = PyTorch 0.01, eps 2e-5); convolutions use He (fan-out) initialisation like the rest of
reslab. The published 24.8M model (DFN-MR3) is not reproduced by an integer widen factor, see
:func:`cifar_dmrnet_mr3`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.models.base import ResidualNetBase, Stage, check_model_args, he_init_
from reslab.models.layers import ClassifierHead, conv1x1, conv3x3, make_shortcut, make_stem, projection_shortcut
from reslab.models.registry import register_model
from reslab.models.units import AddMerge, ResidualUnit

__all__ = [
    "TwoStream", "ToTwoStream", "StreamMean", "MergeShortcut", "TwoStreamBranch", "MergeRunMerge", "SumBranch",
    "DeepFusionNet", "fusenet_blocks", "merge_run_unit", "inception_unit", "basic_branch", "bottleneck_branch",
    "StreamSumReLU", "DMRNetImageNet", "IMAGENET_BLOCKS",
    "cifar_dmrnet", "cifar_dmrnet_mr1", "cifar_dmrnet_mr2", "cifar_dmrnet_mr3", "cifar_dfn_il", "dmrnet", "dmrnet50",
]

CIFAR_INPUT = (3, 32, 32)
FUSIONS = ("merge_run", "inception")


class TwoStream(NamedTuple):
    """The state of a merge-and-run network: one tensor per stream."""

    x1: torch.Tensor
    x2: torch.Tensor


class ToTwoStream(nn.Module):
    """``x -> (x, x)``: both streams start from the stem output."""

    def forward(self, x: torch.Tensor) -> TwoStream:
        return TwoStream(x, x)


class StreamMean(nn.Module):
    """``(x1, x2) -> (x1 + x2) / 2``: how the two-stream state is reported as one tensor
    (``feature_info``, ``forward_stages``, ``forward_features``). After the CIFAR head both
    streams hold the same tensor, so this returns it exactly."""

    def forward(self, x: TwoStream) -> torch.Tensor:
        if x.x1 is x.x2:
            return x.x1
        return 0.5 * (x.x1 + x.x2)


def basic_branch(in_chs: int, out_chs: int, stride: int = 1) -> nn.Sequential:
    """``F = Conv3x3-BN-ReLU-Conv3x3-BN`` (fusenet ``get_two``). Module names match the
    basic branch of :mod:`reslab.models.resnet` (``conv1, bn1, act1, conv2, bn2``)."""
    return nn.Sequential(OrderedDict(
        conv1=conv3x3(in_chs, out_chs, stride), bn1=nn.BatchNorm2d(out_chs), act1=nn.ReLU(inplace=True),
        conv2=conv3x3(out_chs, out_chs), bn2=nn.BatchNorm2d(out_chs)))


def bottleneck_branch(in_chs: int, out_chs: int, stride: int = 1) -> nn.Sequential:
    """``F = 1x1 (out/4) - BN - ReLU - 3x3 (out/4, stride) - BN - ReLU - 1x1 (out) - BN`` (fusenet
    ImageNet ``get_deep``; stride on the 3x3 conv). Module names match the bottleneck branch of
    :mod:`reslab.models.resnet` (``conv1 .. bn3``)."""
    if out_chs % 4:
        raise ValueError(f"a bottleneck branch needs a width divisible by 4, got {out_chs}")
    mid = out_chs // 4
    return nn.Sequential(OrderedDict(
        conv1=conv1x1(in_chs, mid), bn1=nn.BatchNorm2d(mid), act1=nn.ReLU(inplace=True),
        conv2=conv3x3(mid, mid, stride), bn2=nn.BatchNorm2d(mid), act2=nn.ReLU(inplace=True),
        conv3=conv1x1(mid, out_chs), bn3=nn.BatchNorm2d(out_chs)))


@torch.no_grad()
def _scale_last_bn(branch: nn.Sequential, factor: float) -> None:
    bn = branch.bn3 if hasattr(branch, "bn3") else branch.bn2
    bn.weight.mul_(factor)
    bn.bias.mul_(factor)


class MergeShortcut(nn.Module):
    """The merge: ``(x1, x2) -> (m, m)`` with ``m = (S1(x1) + S2(x2)) / 2``.

    ``S_i`` is the identity, or (when the shape changes) a per-stream 1x1 convolution with
    ``stride`` followed by BN (fusenet ``get_zero``); a shared projection would be another model.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        proj = in_chs != out_chs or stride != 1
        self.s1 = projection_shortcut(in_chs, out_chs, stride) if proj else nn.Identity()
        self.s2 = projection_shortcut(in_chs, out_chs, stride) if proj else nn.Identity()

    def forward(self, x: TwoStream) -> TwoStream:
        m = 0.5 * (self.s1(x.x1) + self.s2(x.x2))
        return TwoStream(m, m)


class TwoStreamBranch(nn.Module):
    """``(x1, x2) -> (F1(x1), F2(x2))`` with independent weights."""

    def __init__(self, f1: nn.Module, f2: nn.Module) -> None:
        super().__init__()
        self.f1, self.f2 = f1, f2

    def forward(self, x: TwoStream) -> TwoStream:
        return TwoStream(self.f1(x.x1), self.f2(x.x2))

    def scale_output_(self, factor: float) -> None:
        """Multiply both branch outputs by ``factor`` (folds stochastic-depth scaling)."""
        _scale_last_bn(self.f1, factor)
        _scale_last_bn(self.f2, factor)


class MergeRunMerge(nn.Module):
    """The run: ``x_i' = act(s_i + f_i)`` per stream.

    ``fuse=True`` is fusenet's CIFAR head (the network's last unit):
    ``out = act(m + f1 + f2)`` on both streams. ``f is None`` (branch removed by a lesion or
    stochastic depth) gives ``(act(m), act(m))``. ``post_act=False`` drops the ReLU (the linear
    part analysed in the paper).
    """

    def __init__(self, post_act: bool = True, fuse: bool = False) -> None:
        super().__init__()
        self.post_act, self.fuse = post_act, fuse

    def _act(self, t: torch.Tensor) -> torch.Tensor:
        return F.relu(t) if self.post_act else t

    def forward(self, s: TwoStream, f: TwoStream | None) -> TwoStream:
        if f is None:
            if s.x1 is s.x2:
                y = self._act(s.x1)
                return TwoStream(y, y)
            return TwoStream(self._act(s.x1), self._act(s.x2))
        if self.fuse:
            # s = (m, m); the skip term counts once (fusenet cross.py, last=True).
            y = self._act(s.x1 + f.x1 + f.x2)
            return TwoStream(y, y)
        return TwoStream(self._act(s.x1 + f.x1), self._act(s.x2 + f.x2))

    def extra_repr(self) -> str:
        return f"post_act={self.post_act}, fuse={self.fuse}"


class StreamSumReLU(nn.Module):
    """``(x1, x2) -> ReLU(x1 + x2)``: the ImageNet head of fusenet (``fusion = data1 + data2``,
    then ReLU), applied after the last MR block (which has no ReLU of its own)."""

    def forward(self, x: TwoStream) -> torch.Tensor:
        return F.relu(x.x1 + x.x2)


class SumBranch(nn.Module):
    """``x -> F1(x) + F2(x)``: the two parallel branches of the inception-like block."""

    def __init__(self, f1: nn.Module, f2: nn.Module) -> None:
        super().__init__()
        self.f1, self.f2 = f1, f2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f1(x) + self.f2(x)

    def scale_output_(self, factor: float) -> None:
        """Multiply the branch output by ``factor`` (folds stochastic-depth scaling)."""
        _scale_last_bn(self.f1, factor)
        _scale_last_bn(self.f2, factor)


def merge_run_unit(in_chs: int, out_chs: int, stride: int = 1, *, fuse: bool = False, post_act: bool = True,
                   stage: int = 0, index: int = 0, bottleneck: bool = False) -> ResidualUnit:
    """One merge-and-run unit (state :class:`TwoStream` in and out); ``bottleneck=True`` gives
    the ImageNet branches (:func:`bottleneck_branch`) instead of :func:`basic_branch`."""
    make = bottleneck_branch if bottleneck else basic_branch
    branch = TwoStreamBranch(make(in_chs, out_chs, stride), make(in_chs, out_chs, stride))
    downsample = stride != 1 or in_chs != out_chs
    return ResidualUnit(branch, MergeShortcut(in_chs, out_chs, stride), MergeRunMerge(post_act, fuse),
                        stage=stage, index=index, downsample=downsample)


def inception_unit(in_chs: int, out_chs: int, stride: int = 1, *, post_act: bool = True,
                   stage: int = 0, index: int = 0) -> ResidualUnit:
    """One DFN-IL unit ``ReLU(S(x) + F1(x) + F2(x))`` (single tensor state)."""
    branch = SumBranch(basic_branch(in_chs, out_chs, stride), basic_branch(in_chs, out_chs, stride))
    downsample = stride != 1 or in_chs != out_chs
    return ResidualUnit(branch, make_shortcut("B", in_chs, out_chs, stride), AddMerge(post_act=post_act),
                        stage=stage, index=index, downsample=downsample)


def fusenet_blocks(depth: int, block_depth: int = 4, num_stages: int = 3) -> tuple[int, ...]:
    """Blocks per stage from fusenet's equivalent plain depth (``FuseNet.set_blocks``).

    Stage i gets ``(depth - used) // (block_depth * (num_stages - i))`` blocks, where ``used``
    starts at 2 (stem + classifier) and grows by ``block_depth`` per block: Python 2's integer
    division, which the original relies on (hence uneven splits such as 56 -> (4, 4, 5)).
    """
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise ValueError(f"depth must be an integer (equivalent plain depth), got {depth!r}")
    blocks, used = [], 2
    for i in range(num_stages):
        n = (depth - used) // (block_depth * (num_stages - i))
        used += n * block_depth
        blocks.append(n)
    if min(blocks) < 1:
        raise ValueError(f"depth {depth} gives stages {tuple(blocks)} with no block; use an equivalent plain "
                         f"depth of at least {2 + block_depth * num_stages} (e.g. 56, 62, 98, 110)")
    return tuple(blocks)


class DeepFusionNet(ResidualNetBase):
    """A CIFAR deeply-fused network: stem, three stages of MR (or IL) units, pooled classifier.

    Args:
        blocks: units per stage.
        widths: output channels per stage; the stem has ``widths[0]`` channels and the first
            unit of stages 2 and 3 downsamples by 2 (fusenet: stride 2 whenever widths change).
        fusion: ``"merge_run"`` (DFN-MR / DMRNet) or ``"inception"`` (DFN-IL).
        fused_head: merge-and-run only; the last unit computes ``ReLU(m + F1 + F2)`` (fusenet's
            CIFAR head). ``False`` keeps a plain MR unit and averages the two streams instead.
        drop_rate: dropout before the classifier (not in the paper; default 0).
        zero_init_last: zero the last BN of every branch (not in the paper).

    ``feature_info`` / ``forward_stages`` report each stage's two-stream output as the stream
    average ``(x1 + x2) / 2`` (``num_chs`` = the stage width). ``forward_features`` returns the
    head output (the stream average, equal to either stream after the fused head).
    """

    def __init__(self, blocks: Sequence[int] = (9, 9, 9), widths: Sequence[int] = (16, 32, 64),
                 fusion: str = "merge_run", num_classes: int = 10, in_chans: int = 3, fused_head: bool = True,
                 drop_rate: float = 0.0, zero_init_last: bool = False) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        blocks, widths = tuple(int(b) for b in blocks), tuple(int(w) for w in widths)
        if len(blocks) != len(widths) or not blocks:
            raise ValueError(f"blocks {blocks} and widths {widths} must be non-empty and of equal length")
        if min(blocks) < 1 or min(widths) < 1:
            raise ValueError(f"every stage needs >= 1 block and >= 1 channel, got blocks {blocks}, widths {widths}")
        check_model_args(num_classes, in_chans, drop_rate)
        self.blocks_per_stage, self.widths, self.fusion = blocks, widths, fusion
        self.num_classes = num_classes
        two = fusion == "merge_run"
        stem = make_stem("cifar", in_chans, widths[0])
        if two:
            stem.add_module("split", ToTwoStream())
        self.stem = stem
        chs, red = widths[0], 1
        stages, self.feature_info = [], []
        n_total = sum(blocks)
        k = 0
        for si, (n, w) in enumerate(zip(blocks, widths)):
            units = []
            for ui in range(n):
                stride = 2 if (ui == 0 and w != chs) else 1
                k += 1
                if two:
                    units.append(merge_run_unit(chs, w, stride, fuse=fused_head and k == n_total, stage=si, index=ui))
                else:
                    units.append(inception_unit(chs, w, stride, stage=si, index=ui))
                red *= stride
                chs = w
            stages.append(Stage(units))
            self.feature_info.append(dict(num_chs=chs, reduction=red, module=f"stages.{si}"))
        self.stages = nn.ModuleList(stages)
        self.final_norm = StreamMean() if two else nn.Identity()
        self.num_features = chs
        self.head = ClassifierHead(chs, num_classes, drop_rate)
        self._init_weights(zero_init_last)
        self._finish_init()

    def _init_weights(self, zero_init_last: bool) -> None:
        he_init_(self)
        if zero_init_last:
            for u in self.residual_units():
                u.branch.scale_output_(0.0)

    def feature_tensor(self, state: torch.Tensor | TwoStream) -> torch.Tensor:
        """A stage state as one tensor, the stream average (forward_intermediates hook, base.py)."""
        return StreamMean()(state) if isinstance(state, TwoStream) else state

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output as one tensor (the stream average for merge-and-run)."""
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(StreamMean()(x) if isinstance(x, TwoStream) else x)
        return outs


IMAGENET_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    26: (2, 2, 3, 1), 29: (2, 2, 4, 1), 44: (2, 2, 8, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
"""MR blocks per stage by longest-path depth (fusenet ``network/imagenet/symbol_cross.py``)."""


class DMRNetImageNet(ResidualNetBase):
    """The ImageNet merge-and-run network (Zhao et al. arXiv 1611.07718, ImageNet section; fusenet
    ``network/imagenet/symbol_cross.py``): see the module docstring.

    Args:
        blocks: MR blocks per stage (four stages in the paper's layout; any number is accepted).
        widths: output channels per stage (bottleneck width ``w/4``); 256, 512, 1024, 2048.
        stem_chs: channels of the 7x7 stem (64).
        pool_padding: padding of the stem's 3x3/2 max-pool; 0 as fusenet (1 = torchvision layout).
        drop_rate: dropout before the classifier (not in the paper; default 0).
        zero_init_last: zero the last BN of every branch (not in the paper).

    The first stage runs at stride 1, every later stage downsamples by 2 in its first block;
    every block whose shape changes has one 1x1 projection + BN per stream. ``feature_info`` /
    ``forward_stages`` report each stage's two-stream state as the stream average (as the CIFAR
    builds); ``forward_features`` returns the head ``ReLU(x1 + x2)``.
    """

    def __init__(self, blocks: Sequence[int] = (3, 4, 6, 3), widths: Sequence[int] = (256, 512, 1024, 2048),
                 stem_chs: int = 64, num_classes: int = 1000, in_chans: int = 3, pool_padding: int = 0,
                 drop_rate: float = 0.0, zero_init_last: bool = False) -> None:
        super().__init__()
        blocks, widths = tuple(int(b) for b in blocks), tuple(int(w) for w in widths)
        if len(blocks) != len(widths) or not blocks:
            raise ValueError(f"blocks {blocks} and widths {widths} must be non-empty and of equal length")
        if min(blocks) < 1 or min(widths) < 4 or stem_chs < 1:
            raise ValueError(f"every stage needs >= 1 block and a width >= 4, got blocks {blocks}, widths {widths}")
        if pool_padding not in (0, 1):
            raise ValueError(f"pool_padding must be 0 (fusenet) or 1 (torchvision layout), got {pool_padding}")
        check_model_args(num_classes, in_chans, drop_rate)
        self.blocks_per_stage, self.widths, self.fusion = blocks, widths, "merge_run"
        self.num_classes = num_classes
        stem = make_stem("imagenet", in_chans, stem_chs)
        stem.pool = nn.MaxPool2d(3, stride=2, padding=pool_padding)
        stem.add_module("split", ToTwoStream())
        self.stem = stem
        chs, red = stem_chs, 4
        stages, self.feature_info = [], []
        n_total, k = sum(blocks), 0
        for si, (n, w) in enumerate(zip(blocks, widths)):
            units = []
            for ui in range(n):
                stride = 2 if (ui == 0 and si > 0) else 1
                k += 1
                units.append(merge_run_unit(chs, w, stride, post_act=k < n_total, stage=si, index=ui,
                                            bottleneck=True))
                red *= stride
                chs = w
            stages.append(Stage(units))
            self.feature_info.append(dict(num_chs=chs, reduction=red, module=f"stages.{si}"))
        self.stages = nn.ModuleList(stages)
        self.final_norm = StreamSumReLU()
        self.num_features = chs
        self.head = ClassifierHead(chs, num_classes, drop_rate)
        he_init_(self)
        if zero_init_last:
            for u in self.residual_units():
                u.branch.scale_output_(0.0)
        self._finish_init()

    @property
    def depth(self) -> int:
        """Longest path in weighted layers: stem conv + 3 per MR block + fc."""
        return 3 * sum(self.blocks_per_stage) + 2

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output as one tensor, the stream average ``(x1 + x2) / 2``."""
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(StreamMean()(x))
        return outs

    def feature_tensor(self, state: torch.Tensor | TwoStream) -> torch.Tensor:
        """A stage state as one tensor, the stream average (forward_intermediates hook, base.py);
        the head output ``ReLU(x1 + x2)`` is already one tensor."""
        return StreamMean()(state) if isinstance(state, TwoStream) else state


# ---- entry points ----------------------------------------------------------------------
def _widths(widen_factor: float) -> tuple[int, int, int]:
    if not widen_factor > 0:
        raise ValueError(f"widen_factor must be > 0, got {widen_factor}")
    return tuple(max(1, int(round(b * widen_factor))) for b in (16, 32, 64))  # type: ignore[return-value]


def _build(fusion: str, depth: int, widen_factor: float, blocks: Sequence[int] | None, **kw: Any) -> DeepFusionNet:
    nb = tuple(blocks) if blocks is not None else fusenet_blocks(depth)
    return DeepFusionNet(nb, _widths(widen_factor), fusion=fusion, **kw)


@register_model(input_size=CIFAR_INPUT)
def cifar_dmrnet(depth: int = 110, widen_factor: float = 1.0, num_classes: int = 10, in_chans: int = 3,
                 blocks: Sequence[int] | None = None, fused_head: bool = True, drop_rate: float = 0.0,
                 zero_init_last: bool = False) -> DeepFusionNet:
    """Merge-and-run network (DMRNet / DFN-MR, Zhao et al. arXiv 1611.07718) for CIFAR.

    ``depth`` is fusenet's equivalent plain depth (4 layers per MR block, blocks per stage by
    :func:`fusenet_blocks`); ``blocks`` overrides it. Widths ``round(16w), round(32w), round(64w)``.
    """
    return _build("merge_run", depth, widen_factor, blocks, num_classes=num_classes, in_chans=in_chans,
                  fused_head=fused_head, drop_rate=drop_rate, zero_init_last=zero_init_last)


@register_model(input_size=CIFAR_INPUT)
def cifar_dmrnet_mr1(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0,
                     zero_init_last: bool = False) -> DeepFusionNet:
    """DFN-MR1 (fusenet README: depth 56, 1.7M): equivalent depth 110 -> 27 MR blocks (9, 9, 9) at
    widths 16/32/64; longest path 2 * 27 + 2 = 56. 1,710,426 parameters with 10 classes."""
    return cifar_dmrnet(110, 1.0, num_classes, in_chans, drop_rate=drop_rate, zero_init_last=zero_init_last)


@register_model(input_size=CIFAR_INPUT)
def cifar_dmrnet_mr2(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0,
                     zero_init_last: bool = False) -> DeepFusionNet:
    """DFN-MR2 (fusenet README: wide, depth 32, 14.9M): equivalent depth 62 -> (5, 5, 5) MR blocks,
    widen factor 4 (widths 64/128/256); longest path 2 * 15 + 2 = 32. 14,851,402 parameters."""
    return cifar_dmrnet(62, 4.0, num_classes, in_chans, drop_rate=drop_rate, zero_init_last=zero_init_last)


@register_model(input_size=CIFAR_INPUT)
def cifar_dmrnet_mr3(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0,
                     zero_init_last: bool = False) -> DeepFusionNet:
    """DFN-MR3 (fusenet README: wide, depth 50, 24.8M): equivalent depth 98 -> (8, 8, 8) MR blocks
    (longest path 2 * 24 + 2 = 50) at widths 65/130/260 (widen factor 65/16), 24,911,975 parameters.

    A fit, not a derivation: the integer widen factor 4 gives 24,151,882 parameters (-2.6%), and
    no integer widen factor with a depth-50 block plan matches 24.8M; the base width 65 is the
    only integer width within 1% (64: -2.6%, 66: +3.6%). Use ``cifar_dmrnet(98, 4)`` for w = 4.
    """
    return cifar_dmrnet(98, 65 / 16, num_classes, in_chans, drop_rate=drop_rate, zero_init_last=zero_init_last)


@register_model(input_size=CIFAR_INPUT)
def cifar_dfn_il(depth: int = 110, widen_factor: float = 1.0, num_classes: int = 10, in_chans: int = 3,
                 blocks: Sequence[int] | None = None, drop_rate: float = 0.0,
                 zero_init_last: bool = False) -> DeepFusionNet:
    """Deeply-fused net with inception-like blocks ``ReLU(x + F1(x) + F2(x))`` (DFN-IL; Wang et
    al. arXiv 1605.07716; fusenet ``half.py``). Depth semantics as :func:`cifar_dmrnet`."""
    return _build("inception", depth, widen_factor, blocks, num_classes=num_classes, in_chans=in_chans,
                  drop_rate=drop_rate, zero_init_last=zero_init_last)


@register_model
def dmrnet(depth: int = 29, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
           zero_init_last: bool = False, pool_padding: int = 0) -> DMRNetImageNet:
    """ImageNet merge-and-run network (DMRNet, Zhao et al. arXiv 1611.07718, ImageNet section) with
    bottleneck branches and the ``ReLU(x1 + x2)`` head. ``depth`` is the longest path, one of
    :data:`IMAGENET_BLOCKS` (26, 29, 44, 50, 101, 152; default 29, fusenet's default)."""
    if depth not in IMAGENET_BLOCKS:
        raise ValueError(f"ImageNet DMRNet depth must be one of {sorted(IMAGENET_BLOCKS)} (fusenet's table), "
                         f"got {depth!r}")
    return DMRNetImageNet(IMAGENET_BLOCKS[depth], num_classes=num_classes, in_chans=in_chans,
                          pool_padding=pool_padding, drop_rate=drop_rate, zero_init_last=zero_init_last)


@register_model
def dmrnet50(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, zero_init_last: bool = False,
             pool_padding: int = 0) -> DMRNetImageNet:
    """ImageNet DMRNet of longest path 50: (3, 4, 6, 3) MR blocks, i.e. 32 bottleneck branches
    (two per block) in ResNet-50's stage layout; 49,055,528 parameters with 1000 classes, exactly
    ``2 * resnet50 - stem - fc`` (every branch and projection doubled). Paper's count: not stated
    in the sources we hold (see docs/architectures.md)."""
    return dmrnet(50, num_classes, in_chans, drop_rate, zero_init_last, pool_padding)

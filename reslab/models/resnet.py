"""One stage engine for the ResNet family, and its configurations.

A network is a :class:`NetSpec`: a stem, a block type, and a tuple of :class:`StageSpec`
(depth, output channels, stride, bottleneck width, groups). :class:`ResNet` builds
``stem -> stages[i].units[j] -> final_norm -> head`` from it. Family configs and
registered entry points live in ``resnet_cifar.py`` and ``resnet_imagenet.py``.

Papers: He et al. 2015 (arXiv 1512.03385), He et al. 2016 (arXiv 1603.05027),
Zagoruyko & Komodakis 2016 (arXiv 1605.07146), Xie et al. 2017 (arXiv 1611.05431).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from reslab.models.base import ResidualNetBase, Stage, check_model_args, he_init_
from reslab.models.layers import ClassifierHead, conv1x1, conv3x3, make_shortcut, make_stem, norm_act, stem_reduction
from reslab.models.units import AddMerge, ResidualUnit

BLOCKS = ("basic", "bottleneck")
STRIDE_ON = ("3x3", "1x1")
SHARED_PREACT = ("projection", "stage_first")


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``depth`` units producing ``out_chs`` channels; the first unit has ``stride``.

    ``mid_chs`` is the bottleneck (inner) width, ``groups`` the cardinality of the 3x3 conv
    (ResNeXt); both are ignored by basic blocks.
    """

    depth: int
    out_chs: int
    stride: int = 1
    mid_chs: int | None = None
    groups: int = 1


@dataclass(frozen=True)
class NetSpec:
    """A whole network. ``shortcut``: 'A' (zero-pad), 'B' (1x1 conv + BN), 'B-nobn' (bare 1x1 conv:
    WRN, and the pre-activation nets of He et al. 2016). ``plain=True`` removes every shortcut (the
    plain twin used as a control).

    ``stride_on`` (bottlenecks): '3x3' puts a downsampling unit's stride on the 3x3 conv (torchvision
    "v1.5", fb.resnet.torch, timm); '1x1' on the first 1x1 conv (He et al. 2015's Caffe models, and
    the CIFAR bottlenecks of KaimingHe/resnet-1k-layers).

    ``shared_preact`` (pre-activation nets): which units apply their BN-ReLU *before* the split, so
    that the shortcut reads the pre-activated input too. 'projection': units with a projection
    shortcut (timm ``resnetv2``, the WRN code); 'stage_first': the first unit of every stage whatever
    its shortcut (fb.resnet.torch ``preresnet.lua`` "both_preact"; resnet-1k-layers' "common BN,
    ReLU"), so stage 1's skip path carries BN-ReLU(conv1) (He et al. 2016 appendix). Other units apply
    it on the residual path only.
    """

    stages: tuple[StageSpec, ...]
    block: str = "basic"
    preact: bool = False
    stem: str = "cifar"
    stem_chs: int = 16
    shortcut: str = "A"
    plain: bool = False
    dropout: float = 0.0
    zero_init_last: bool = False
    stride_on: str = "3x3"
    shared_preact: str = "projection"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.stages:
            raise ValueError("a network needs at least one stage")
        if self.stride_on not in STRIDE_ON:
            raise ValueError(f"stride_on must be one of {STRIDE_ON}, got {self.stride_on!r}")
        if self.shared_preact not in SHARED_PREACT:
            raise ValueError(f"shared_preact must be one of {SHARED_PREACT}, got {self.shared_preact!r}")
        for s in self.stages:
            if s.depth < 1:
                raise ValueError(f"every stage needs depth >= 1, got {s.depth}")
            if s.out_chs < 1:
                raise ValueError(f"stage widths must be >= 1, got {s.out_chs}")
            if self.block == "bottleneck":
                mid = s.mid_chs or s.out_chs // 4
                if s.groups < 1 or mid % s.groups:
                    raise ValueError(
                        f"cardinality {s.groups} does not divide the bottleneck width {mid}; "
                        "choose a width that is a multiple of the cardinality")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _branch(spec: NetSpec, in_chs: int, st: StageSpec, stride: int) -> nn.Sequential:
    """The residual function F of one unit (names are part of the state-dict API)."""
    L: OrderedDict[str, nn.Module] = OrderedDict()
    if spec.block == "basic":
        L["conv1"] = conv3x3(in_chs, st.out_chs, stride)
        L["bn1"] = nn.BatchNorm2d(st.out_chs)
        L["act1"] = nn.ReLU(inplace=True)
        if spec.dropout > 0:
            L["drop"] = nn.Dropout(spec.dropout)
        L["conv2"] = conv3x3(st.out_chs, st.out_chs)
        if not spec.preact:
            L["bn2"] = nn.BatchNorm2d(st.out_chs)
    else:
        mid = st.mid_chs or st.out_chs // 4
        s1, s3 = (stride, 1) if spec.stride_on == "1x1" else (1, stride)
        L["conv1"] = conv1x1(in_chs, mid, s1)
        L["bn1"] = nn.BatchNorm2d(mid)
        L["act1"] = nn.ReLU(inplace=True)
        L["conv2"] = conv3x3(mid, mid, s3, groups=st.groups)
        L["bn2"] = nn.BatchNorm2d(mid)
        L["act2"] = nn.ReLU(inplace=True)
        if spec.dropout > 0:
            L["drop"] = nn.Dropout(spec.dropout)
        L["conv3"] = conv1x1(mid, st.out_chs)
        if not spec.preact:
            L["bn3"] = nn.BatchNorm2d(st.out_chs)
    return nn.Sequential(L)


class ResNet(ResidualNetBase):
    """ResNet / pre-activation ResNet / Wide ResNet / ResNeXt built from a :class:`NetSpec`.

    Deviations: ImageNet bottlenecks put the stride on the 3x3 conv (torchvision's "v1.5";
    ``NetSpec.stride_on``); option A pads the new channels after the old ones.
    """

    def __init__(self, spec: NetSpec, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__()
        check_model_args(num_classes, in_chans, drop_rate)
        self.spec = spec
        self.num_classes = num_classes
        self.stem = make_stem(spec.stem, in_chans, spec.stem_chs)
        chs, red = spec.stem_chs, stem_reduction(spec.stem)
        stages, self.feature_info = [], []
        for si, st in enumerate(spec.stages):
            units = []
            for ui in range(st.depth):
                stride = st.stride if ui == 0 else 1
                units.append(self._unit(spec, chs, st, stride, si, ui))
                chs = st.out_chs
            red *= st.stride
            stages.append(Stage(units))
            self.feature_info.append(dict(num_chs=chs, reduction=red, module=f"stages.{si}"))
        self.stages = nn.ModuleList(stages)
        self.final_norm = norm_act(chs) if spec.preact else nn.Identity()
        self.num_features = chs
        self.head = ClassifierHead(chs, num_classes, drop_rate)
        self._init_weights(spec.zero_init_last)
        self._finish_init()

    @staticmethod
    def _unit(spec: NetSpec, in_chs: int, st: StageSpec, stride: int, si: int, ui: int) -> ResidualUnit:
        downsample = stride != 1 or in_chs != st.out_chs
        branch = _branch(spec, in_chs, st, stride)
        shortcut = None if spec.plain else make_shortcut(spec.shortcut, in_chs, st.out_chs, stride)
        if spec.preact:
            # He et al. 2016: BN-ReLU before the branch; where it comes before the split (see
            # NetSpec.shared_preact) the shortcut reads it too.
            preact = norm_act(in_chs)
            if spec.shared_preact == "stage_first":
                from_pre = ui == 0 or isinstance(shortcut, nn.Sequential)
            else:
                from_pre = isinstance(shortcut, nn.Sequential)
            return ResidualUnit(branch, shortcut, AddMerge(post_act=False), preact=preact,
                                shortcut_from_preact=from_pre, stage=si, index=ui, downsample=downsample)
        return ResidualUnit(branch, shortcut, AddMerge(post_act=True), stage=si, index=ui, downsample=downsample)

    def _init_weights(self, zero_init_last: bool) -> None:
        he_init_(self)
        if zero_init_last:
            for u in self.residual_units():
                last = [m for m in u.branch.modules() if isinstance(m, (nn.BatchNorm2d, nn.Conv2d))][-1]
                nn.init.zeros_(last.weight)

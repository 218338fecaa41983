"""Small building blocks: convolutions, shortcuts (He et al. option A / B), stems, heads."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3x3(in_chs: int, out_chs: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)


def norm_act(chs: int, act: bool = True) -> nn.Sequential:
    """BatchNorm followed by ReLU (``bn``, ``act``): the pre-activation of He et al. 2016."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(bn=nn.BatchNorm2d(chs))
    if act:
        layers["act"] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


class ZeroPadShortcut(nn.Module):
    """Option A of He et al. 2015: subsample by ``stride`` and zero-pad the new channels.

    Parameter-free. The extra channels are appended after the existing ones (the paper
    does not say where they go; reference code varies).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(f"option A shortcut cannot reduce channels ({in_chs} -> {out_chs}); use option B")
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.out_chs > self.in_chs:
            x = F.pad(x, (0, 0, 0, 0, 0, self.out_chs - self.in_chs))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_chs}, {self.out_chs}, stride={self.stride}"


def projection_shortcut(in_chs: int, out_chs: int, stride: int, norm: bool = True) -> nn.Sequential:
    """Option B of He et al. 2015: 1x1 convolution (stride) followed by BatchNorm.

    ``norm=False`` gives the plain 1x1 convolution of Wide ResNets (Zagoruyko & Komodakis).
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict(conv=conv1x1(in_chs, out_chs, stride))
    if norm:
        layers["bn"] = nn.BatchNorm2d(out_chs)
    return nn.Sequential(layers)


def make_shortcut(kind: str, in_chs: int, out_chs: int, stride: int) -> nn.Module:
    """Identity when shapes match; otherwise option ``A`` (zero-pad), ``B`` (1x1 conv + BN) or
    ``B-nobn`` (a bare 1x1 conv: Wide ResNets, and the pre-activation projection of
    KaimingHe/resnet-1k-layers, fb.resnet.torch ``preresnet.lua`` and timm ``resnetv2``)."""
    if in_chs == out_chs and stride == 1:
        return nn.Identity()
    if kind == "A":
        return ZeroPadShortcut(in_chs, out_chs, stride)
    if kind == "B":
        return projection_shortcut(in_chs, out_chs, stride, norm=True)
    if kind == "B-nobn":
        return projection_shortcut(in_chs, out_chs, stride, norm=False)
    raise ValueError(f"unknown shortcut type {kind!r}; use 'A', 'B' or 'B-nobn'")


def make_stem(kind: str, in_chans: int, out_chs: int) -> nn.Sequential:
    """Network stems.

    * ``cifar``: 3x3 conv, BN, ReLU (He et al. 2015 CIFAR networks);
    * ``cifar_preact``: 3x3 conv only: pre-activation networks normalise in the first unit, before
      its split into the two paths (resnet-1k-layers' "common BN, ReLU"; ``NetSpec.shared_preact``);
    * ``imagenet``: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool (He et al. 2015, torchvision layout);
    * ``imagenet_preact``: 7x7/2 conv, 3x3/2 max-pool.
    """
    if kind in ("cifar", "cifar_preact"):
        layers: OrderedDict[str, nn.Module] = OrderedDict(conv=conv3x3(in_chans, out_chs))
        if kind == "cifar":
            layers["bn"] = nn.BatchNorm2d(out_chs)
            layers["act"] = nn.ReLU(inplace=True)
        return nn.Sequential(layers)
    if kind in ("imagenet", "imagenet_preact"):
        layers = OrderedDict(conv=nn.Conv2d(in_chans, out_chs, 7, stride=2, padding=3, bias=False))
        if kind == "imagenet":
            layers["bn"] = nn.BatchNorm2d(out_chs)
            layers["act"] = nn.ReLU(inplace=True)
        layers["pool"] = nn.MaxPool2d(3, stride=2, padding=1)
        return nn.Sequential(layers)
    raise ValueError(f"unknown stem {kind!r}")


def stem_reduction(kind: str) -> int:
    return 4 if kind.startswith("imagenet") else 1


class ClassifierHead(nn.Module):
    """Global average pool, flatten, (dropout), linear ``fc``."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc: nn.Module = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.flatten(self.pool(x)))
        return x if pre_logits else self.fc(x)

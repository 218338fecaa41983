"""Fold inference-mode BatchNorm into the preceding convolution (Conv-BN fusion).

``BN(conv(x)) = gamma * (W*x + b - mu) / sqrt(var + eps) + beta`` is again a convolution with
weight ``W * s`` and bias ``(b - mu) * s + beta``, ``s = gamma / sqrt(var + eps)`` (per output
channel), so in eval mode the BN can be removed. reslab names its layers inside
``nn.Sequential`` containers (stems, branches, projection shortcuts), so a BN that *directly
follows* a Conv2d in a Sequential is fused; pre-activation BNs (BN before the conv, and the
final BN-ReLU of pre-act networks) are not preceded by a conv and stay.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def fuse_conv_bn_(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn``'s running statistics and affine parameters into ``conv`` in place (adds a bias)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fuse a BatchNorm without running statistics (track_running_stats=False)")
    if conv.out_channels != bn.num_features:
        raise ValueError(f"conv has {conv.out_channels} output channels but the BatchNorm {bn.num_features}")
    with torch.no_grad():
        w = conv.weight.double()
        b = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64,
                                                                         device=w.device)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(b)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(b)
        scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
        new_w = w * scale.view(-1, *([1] * (w.dim() - 1)))
        new_b = (b - bn.running_mean.double()) * scale + beta
        conv.weight.copy_(new_w.to(conv.weight.dtype))
        conv.bias = nn.Parameter(new_b.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def _plain_sequential(m: nn.Module) -> bool:
    """An nn.Sequential (or subclass) whose forward is Sequential's: children run in order."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def fuse_bn(model: nn.Module) -> nn.Module:
    """A fused deep copy of ``model`` for inference; ``model`` itself is not changed.

    Every ``BatchNorm2d`` that directly follows a ``Conv2d`` inside an ``nn.Sequential`` (one that
    does not override ``forward``) is folded
    into that conv (which gains a bias) and replaced by ``nn.Identity``. The copy is put in eval
    mode: fusion uses the running statistics, so the fused network equals the original *in eval
    mode* only (training it would train without those BNs). Works for every reslab family; BNs it
    cannot see (not after a conv in a Sequential) are left in place.
    """
    fused = copy.deepcopy(model).eval()
    for seq in fused.modules():
        if not _plain_sequential(seq):
            continue
        names = list(seq._modules)
        for prev, cur in zip(names, names[1:]):
            conv, bn = seq._modules[prev], seq._modules[cur]
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                fuse_conv_bn_(conv, bn)
                seq._modules[cur] = nn.Identity()
    return fused


def count_fusable(model: nn.Module) -> int:
    """Number of (Conv2d, BatchNorm2d) pairs :func:`fuse_bn` would fold."""
    n = 0
    for seq in model.modules():
        if _plain_sequential(seq):
            mods = list(seq._modules.values())
            n += sum(1 for a, b in zip(mods, mods[1:])
                     if isinstance(a, nn.Conv2d) and type(b) is nn.BatchNorm2d and b.track_running_stats)
    return n

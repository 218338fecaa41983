"""Helpers shared by several test modules."""
from __future__ import annotations

import torch
import torch.nn as nn


def randomize_bn(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (weight and variance in
    [0.5, 1.5), bias and mean ~ N(0, scale^2)), so that eval-mode comparisons, weight mappings and
    scalings are visible. Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * scale)
                m.running_mean.copy_(torch.randn(n, generator=g) * scale)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model
